"""The rotate family: rotations and transforms that leave the float model unchanged and make it
easier to quantize.

| pass | what |
|---|---|
| ``rotate`` | QuaRot: norms folded, R1 (residual stream), R2 (per head), online R3/R4 Hadamards |
| ``spinquant`` | ``rotate``, then R1/R2 learned by Cayley SGD on calibration data |
| ``flatquant`` | per-group affine Kronecker transforms learned on calibration data |

The passes are in ``rotate.py``; the region discovery and weight plans in
``lowbit_compiler/rotation.py``, the learning in ``lowbit_compiler/learned_rotation.py``, the
Hadamard matrices in ``lowbit_compiler/hadamard.py``.
"""
from lowbit_compiler.passes.rotate import rotate  # noqa: F401
from lowbit_compiler.passes.rotate.rotate import FlatQuant, Rotate, SpinQuant  # noqa: F401
