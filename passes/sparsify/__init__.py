"""The sparsify family: passes that zero weights (N:M structured or unstructured).

| pass | file | what |
|---|---|---|
| ``prune`` | ``prune.py`` | magnitude pruning (option ``score``: magnitude / wanda / sparsegpt) |
| ``wanda`` | ``prune.py`` | Wanda: ``|W| * ||x||_2`` per input channel, from calibration |
| ``sparsegpt`` | ``prune.py`` | SparseGPT: OBS pruning through the inverse Hessian, column blocks |
| ``sparsegpt_quant`` | ``prune.py`` | SparseGPT jointly with the recipe's sparse int format (quantizer) |

The math is ``masks.py``; the compressed storage (kept values + indices + codes) is
``lowbit_compiler/sparse_formats.py``.
"""
from lowbit_compiler.passes.sparsify import masks, prune  # noqa: F401  (registration)
