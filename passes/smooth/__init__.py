"""The smooth family: per-channel input scales folded into the producer (``y = (W s)(x / s)``).

| pass | file | scale |
|---|---|---|
| ``smoothquant`` | ``smoothquant.py`` | ``max|x|^a / max|W|^(1-a)``: activation outliers into the weights (W8A8) |
| ``awq`` | ``awq.py`` | ``mean|x|^a``, ``a`` searched per group on the layer-output error (W4A16) |

Both find the producers from the graph (``lowbit_compiler/scale_folding.py``), run on the
calibration engine block by block, and rewrite the graph module's tensors (never the user's
model: the offline flow writes them back). Both run before the quantizing pass.
"""
from lowbit_compiler.passes.smooth import awq, smoothquant  # noqa: F401
