"""transformers integration: ``quant_method: "lowbit"`` for ``save_pretrained`` / ``from_pretrained``.

Importing ``lowbit_compiler`` registers :class:`LowbitConfig` and :class:`LowbitHfQuantizer` with
transformers (``register_quantization_config`` / ``register_quantizer``), so that

* ``compress(model, ...)`` then ``model.save_pretrained(dir)`` writes safetensors and a
  ``config.json`` whose ``quantization_config`` is the checkpoint manifest
  (:mod:`lowbit_compiler.checkpoint`);
* ``AutoModelForCausalLM.from_pretrained(dir)`` (or ``AutoModel``) in a fresh process, after
  ``import lowbit_compiler``, checks every tensor against the manifest before loading and rebuilds
  the compressed modules, bit-identical;
* ``from_pretrained(float_dir, quantization_config=LowbitConfig(recipe="w4a16"))`` loads the float
  weights and compresses them with a data-free recipe (data-driven recipes need calibration data:
  they raise, naming ``compress``).
"""
from __future__ import annotations

import json
import os
from typing import Any

from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                         register_quantization_config, register_quantizer)
from transformers.utils.quantization_config import QuantizationConfigMixin

from lowbit_compiler import checkpoint
from lowbit_compiler.pass_base import LowbitError


class LowbitConfig(QuantizationConfigMixin):
    """``quantization_config`` of a lowbit model.

    Args:
        recipe: a preset name, a ``.toml`` path or a recipe dict: compress while loading float
            weights (``from_pretrained(float_dir, quantization_config=LowbitConfig(recipe=...))``);
            in a saved checkpoint, the recipe that produced it.
        format_version, modules, tensors, aliases, R3, kv_cache: the checkpoint manifest
            (:mod:`lowbit_compiler.checkpoint`); present in saved checkpoints only.
    """

    def __init__(self, recipe: Any = None, format_version: int | None = None, modules: dict | None = None,
                 tensors: dict | None = None, aliases: dict | None = None, R3: dict | None = None,
                 layers: dict | None = None, totals: dict | None = None, kv_cache: dict | None = None, **kwargs: Any):
        kwargs.pop("quant_method", None)  # always "lowbit" (written by to_dict)
        self.quant_method = checkpoint.QUANT_METHOD
        self.recipe = recipe
        self.format_version = format_version
        self.modules = modules
        self.tensors = tensors
        self.aliases = aliases or {}
        self.R3 = R3
        self.layers, self.totals = layers, totals  # what compress reported (lowbit inspect)
        self.kv_cache = kv_cache  # the compressed KV cache's formats, reinstalled when loading
        if kwargs:
            raise LowbitError(f"LowbitConfig: unknown fields {sorted(kwargs)}; known: recipe, format_version, modules, "
                              "tensors, aliases, R3, layers, totals, kv_cache")

    @property
    def is_checkpoint(self) -> bool:
        return self.modules is not None

    def manifest(self) -> dict[str, Any]:
        return {"quant_method": self.quant_method, "format_version": self.format_version, "recipe": self.recipe,
                "modules": self.modules, "tensors": self.tensors, "aliases": self.aliases, "R3": self.R3,
                "layers": self.layers, "totals": self.totals, "kv_cache": self.kv_cache}


class LowbitHfQuantizer(HfQuantizer):
    """Loads lowbit checkpoints (validated, modules rebuilt before the weights arrive) and
    compresses float checkpoints with a data-free recipe after loading."""

    requires_calibration = False

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        config = self.quantization_config
        if self.pre_quantized:  # the manifest is validated with the files' tables before any weight is read
            if not config.is_checkpoint:
                raise LowbitError("from_pretrained: the checkpoint's quantization_config (quant_method 'lowbit') has no "
                                  "module table; it was not written by save_pretrained of a compressed model")
            return
        from lowbit_compiler.recipe import get_recipe

        if config.recipe is None:
            raise LowbitError("LowbitConfig: pass recipe=... (a preset such as 'w4a16') to compress while loading")
        recipe = get_recipe(config.recipe)
        needs = recipe.data_driven_passes()
        if needs:
            raise LowbitError(f"from_pretrained(quantization_config=LowbitConfig(recipe={recipe.name!r})): pass "
                              f"{needs[0]!r} needs calibration data, which loading does not have; load the float model, "
                              f"then call lowbit_compiler.compress(model, {recipe.name!r}, calibration=batches)")

    def update_dtype(self, dtype: Any) -> Any:
        return dtype

    def _process_model_before_weight_loading(self, model: Any, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> Any:
        if not self.pre_quantized:
            return model
        meta = self.quantization_config.manifest()
        checkpoint.validate(meta, checkpoint.headers(list(checkpoint_files)) if checkpoint_files else None)
        checkpoint.prepare(model, meta, device="meta")
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        if self.pre_quantized:
            meta = self.quantization_config.manifest()
            checkpoint.tie_aliases(model, meta)
            checkpoint.materialize_stand_ins(model)
            keep_names(model)
            model.lowbit_summary = checkpoint.loaded_summary(meta, getattr(model, "name_or_path", None))
            checkpoint._install_kv(model, meta)
            return model
        from lowbit_compiler.offline import compress

        compress(model, self.quantization_config.recipe)
        return model

    def get_state_dict_and_metadata(self, model: Any) -> tuple[dict[str, Any], dict[str, str]]:
        """Called by ``save_pretrained``: the manifest is refreshed from the modules as they are now.
        Buffers shared between modules (FlatQuant's transform of q/k/v, stored by each projection)
        are written once per name, since safetensors stores no aliases and transformers only
        removes the aliases it knows (tied embeddings); loading shares them again."""
        config = refresh(model)
        state = model.state_dict()
        buffers = {name for name, _ in model.named_buffers(remove_duplicate=False)}
        for key in config.aliases:
            if key in buffers:
                state[key] = state[key].clone()
        return state, {}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def refresh(model: Any) -> LowbitConfig:
    """Set ``model.config.quantization_config`` to the manifest of the model as it is; untie the
    head in the config when the compressed model no longer shares it with the embedding (a
    quantized or rotated head), so that loading does not tie them again."""
    meta = checkpoint.manifest(model)
    config = LowbitConfig(**{k: v for k, v in meta.items() if k != "quant_method"})
    model.config.quantization_config = config
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is not None and outputs is not None and getattr(outputs, "weight", None) is not inputs.weight:
        for c in {id(model.config): model.config, id(model.config.get_text_config()): model.config.get_text_config()}.values():
            if getattr(c, "tie_word_embeddings", False):
                c.tie_word_embeddings = False
    return config


def keep_names(model: Any) -> None:
    """Save tensors under the model's own names: transformers' save_pretrained otherwise reverts its
    load-time renamings (Mixtral's ``mlp`` -> ``block_sparse_moe``) on the way out, and the manifest
    names the modules as they are; loading accepts the new names as they are."""
    model._weight_conversions = []


def attach(model: Any) -> None:
    """Make a compressed transformers model saveable with ``save_pretrained``."""
    config = refresh(model)
    keep_names(model)
    model.hf_quantizer = LowbitHfQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = checkpoint.QUANT_METHOD


def register() -> None:
    """Register ``quant_method: "lowbit"`` with transformers (once per process)."""
    if checkpoint.QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(checkpoint.QUANT_METHOD)(LowbitConfig)
    if checkpoint.QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(checkpoint.QUANT_METHOD)(LowbitHfQuantizer)


def load_pretrained(directory: str | os.PathLike) -> Any:
    """A saved lowbit checkpoint (``save_pretrained`` of a compressed transformers model), loaded
    with the architecture class its ``config.json`` names (what ``lowbit export`` reads)."""
    import transformers

    directory = os.fspath(directory)
    meta = checkpoint.read_manifest(directory)
    if meta.get("quant_method") != checkpoint.QUANT_METHOD:
        raise LowbitError(f"{directory} is not a lowbit checkpoint (quant_method {meta.get('quant_method')!r})")
    with open(os.path.join(directory, "config.json")) as f:
        architectures = json.load(f).get("architectures") or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        raise LowbitError(f"{directory}/config.json names architectures {architectures}, which transformers does not "
                          "have; load the model yourself and call the export function on it")
    return cls.from_pretrained(directory).eval()
