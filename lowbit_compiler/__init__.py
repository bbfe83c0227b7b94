"""lowbit-compiler: a graph-level compiler for low-bit and sparse LLM inference on PyTorch.

Three ways in:

* ``torch.compile(model, backend="lowbit", options={"recipe": "w4a16"})``, or
  ``torch.compile(model, backend=lowbit_compiler.backend(recipe="w4a16"))``, which checks the options
  inside the ``torch.compile`` call
* ``lowbit_compiler.compress(model, "w4a16")``: the offline flow, decisions written into the model
* your own passes: ``@register_pass`` a :class:`Pass` and name it in a :class:`Recipe`
"""
from lowbit_compiler import ir, ops  # noqa: F401  (ops registers the lowbit:: custom ops)
from lowbit_compiler.formats import FormatError, WeightFormat
from lowbit_compiler.pass_base import (LowbitError, Pass, PassContext, PassResult, PatternRule, apply_rules,
                                       fallback_counter, register_pass, registered_passes, replace_pattern)
from lowbit_compiler.recipe import PRESETS, Recipe, get_recipe, load_recipe

__version__ = "0.1.0"


def _register_with_transformers() -> None:
    """``quant_method: "lowbit"`` for transformers' save_pretrained / from_pretrained."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return
    from lowbit_compiler import hf

    hf.register()


_register_with_transformers()

__all__ = [
    "FormatError", "LowbitError", "PRESETS", "Pass", "PassContext", "PassResult", "PatternRule", "Recipe",
    "WeightFormat", "apply_rules", "backend", "compile", "compress", "drop_float_weights", "fallback_counter", "get_recipe", "load",
    "load_recipe", "register_pass", "registered_passes", "replace_pattern", "save",
]


def save(model, directory):
    """Save a compressed model (``lowbit_compiler.checkpoint.save``): safetensors + manifest, no pickle."""
    from lowbit_compiler.checkpoint import save as _save

    return _save(model, directory)


def load(directory, model):
    """Load a checkpoint written by :func:`save` into a float model of the same architecture."""
    from lowbit_compiler.checkpoint import load as _load

    return _load(directory, model)


def compress(model, recipe, calibration=None, example_inputs=None, **options):
    """Offline flow (see ``lowbit_compiler.offline.compress``: ``strict``, ``tokenizer``, ``progress``)."""
    from lowbit_compiler.offline import compress as _compress

    return _compress(model, recipe, calibration=calibration, example_inputs=example_inputs, **options)


def drop_float_weights(model):
    """Free the float weights ``torch.compile(model, backend="lowbit")`` quantized, when the eager
    model is no longer needed (``lowbit_compiler.memory.drop_float_weights``)."""
    from lowbit_compiler.memory import drop_float_weights as _drop

    return _drop(model)


def backend(**options):
    """The ``lowbit`` backend with these options, checked now (a bad option or recipe raises
    :class:`LowbitError` here): ``torch.compile(model, backend=lowbit_compiler.backend(recipe="w4a16"))``.
    Options as for ``backend="lowbit", options={...}`` (``lowbit_compiler/backends/lowbit_backend.py``)."""
    from lowbit_compiler.backends.lowbit_backend import LowbitBackend

    return LowbitBackend(**options)


def compile(model, **options):
    """``model.compile(backend=backend(**options))``, options checked here; for an encoder-decoder
    model (T5) the encoder too (``generate()`` calls ``model.get_encoder()`` directly, which
    ``model.compile`` alone does not cover), with the same backend: one run in the dump. Returns
    ``model``."""
    compiled_backend = backend(**options)
    model.compile(backend=compiled_backend)
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        model.get_encoder().compile(backend=compiled_backend)
    return model
