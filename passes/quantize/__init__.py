"""The quantize family: passes that choose how weights (and activations) become low-bit.

| pass | file | what |
|---|---|---|
| ``insert_weight_quant`` | ``rtn.py`` | round to nearest (``rounding``: rtn / mse / hqq) |
| ``hqq`` | ``rtn.py`` | Half-Quadratic Quantization, data-free |
| ``gptq`` | ``gptq.py`` | GPTQ, block by block on the calibration engine |
| ``spqr`` | ``spqr.py`` | SpQR-style fp16 outliers beside the dense part |
| ``mixed_precision`` | ``mixed_precision.py`` | a format per linear under a bits budget |
| ``observe_activations`` | ``observe.py`` | static activation scales from calibration |

``common.py`` holds what they share (selection, per-linear formats, the linear -> ``lowbit::`` op
rewrite, the cache of data-driven results); the rounding math is ``lowbit_compiler/rounding.py``.
"""
from lowbit_compiler.passes.quantize import common, gptq, mixed_precision, observe, rtn, spqr  # noqa: F401
from lowbit_compiler.passes.quantize.rtn import QUANT_CACHE, InsertWeightQuant, quantize_parameter  # noqa: F401
