"""Recipes: which passes run, in which order, with which formats, on which layers.

A :class:`Recipe` is a frozen dataclass. Named presets live in ``PRESETS``; a recipe can also be
loaded from a TOML file (``load_recipe("my.toml")``)::

    [recipe]
    base = "w4a16"                         # optional: start from a preset
    passes = ["canonicalize", "count_linears", "insert_weight_quant"]
    exclude = ["lm_head", "*.mlp.down_proj"]   # FQN globs (fnmatch)
    pad_to_group = false

    [recipe.weight]                        # the weight-only format
    bits = 4
    group_size = 64
    symmetric = true

    [recipe.options.count_linears]         # keyword options for one pass
    verbose = true
"""
from __future__ import annotations

import dataclasses
import fnmatch
import os
import sys
from typing import Any, Mapping

from lowbit_compiler.formats import FormatError, WeightFormat
from lowbit_compiler.pass_base import LowbitError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A compression recipe.

    Args:
        name: shown in dumps and logs.
        passes: pass names, run in this order (see ``lowbit_compiler.registered_passes()``).
        weight: the weight-only format applied by ``insert_weight_quant`` (None: no weight quant).
        include: FQN globs of the linears a pass may rewrite (layer FQN, e.g. ``model.layers.*``).
        exclude: FQN globs left alone even when included.
        pad_to_group: pad K up to a multiple of the group size instead of refusing the layer.
        options: per-pass keyword options, as ``((pass_name, ((key, value), ...)), ...)``.
        activation: activation quantization of the quantized linears: None (weight-only),
            ``"int8_dynamic"`` (per-token int8 scales computed at run time; int8 or int4 weights) or
            ``"fp8_dynamic"`` (per-token fp8 e4m3; fp8_e4m3 weights) or ``"int8_static"`` (one
            per-tensor int8 scale per layer from calibration data: ``compress`` only).
    """

    name: str
    passes: tuple[str, ...] = ()
    weight: WeightFormat | None = None
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    pad_to_group: bool = False
    options: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    activation: str | None = None

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATION_SCHEMES:
            raise LowbitError(f"recipe {self.name!r}: activation={self.activation!r}; expected one of "
                              f"{ACTIVATION_SCHEMES}")
        if self.activation:
            act, weights = ACTIVATIONS[self.activation]
            kind = None if self.weight is None else (self.weight.kind if self.weight.kind != "int"
                                                     else f"int{self.weight.bits}")
            if kind not in weights:
                raise LowbitError(f"recipe {self.name!r}: activation={self.activation!r} multiplies {act} activations "
                                  f"with {' or '.join(weights)} weights; got {self.weight.key if self.weight else None}")
        for field in ("passes", "include", "exclude"):
            value = getattr(self, field)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise LowbitError(f"recipe {self.name!r}: `{field}` must be a list of strings, got {value!r}")
            object.__setattr__(self, field, tuple(value))

    def applies_to(self, layer: str) -> bool:
        """Whether the include/exclude globs select this layer FQN."""
        return (any(fnmatch.fnmatchcase(layer, p) for p in self.include)
                and not any(fnmatch.fnmatchcase(layer, p) for p in self.exclude))

    def pass_options(self, pass_name: str) -> dict[str, Any]:
        return dict(dict(self.options).get(pass_name, ()))

    @property
    def mixed_bits(self) -> float | None:
        """The average-bits budget of mixed precision (``insert_weight_quant``'s ``mixed_bits``), or None."""
        return self.pass_options("insert_weight_quant").get("mixed_bits")

    @property
    def smoothquant(self) -> float | None:
        """SmoothQuant's migration strength alpha (``insert_weight_quant``'s ``smoothquant``), or None."""
        return self.pass_options("insert_weight_quant").get("smoothquant")

    @property
    def rounding(self) -> str:
        """The weight rounding algorithm (``insert_weight_quant``'s ``rounding`` option)."""
        return self.pass_options("insert_weight_quant").get("rounding", "rtn")

    def replace(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "passes": list(self.passes),
            "weight": None if self.weight is None else self.weight.key, "activation": self.activation,
            "include": list(self.include), "exclude": list(self.exclude),
            "pad_to_group": self.pad_to_group,
            "options": {k: dict(v) for k, v in self.options},
        }


_WEIGHT_ONLY = ("canonicalize", "insert_weight_quant")
_ROTATED = ("canonicalize", "rotate", "insert_weight_quant")
_LEARNED = ("canonicalize", "spinquant", "insert_weight_quant")
# activation scheme -> (what lowbit::qa_linear's `act` is, the weight formats it multiplies with)
ACTIVATIONS = {"int8_dynamic": ("int8", ("int8", "int4")), "fp8_dynamic": ("fp8_e4m3", ("fp8_e4m3",)),
               "int4_dynamic": ("int4", ("int8", "int4")),  # W4A4 (per-token, symmetric [-7, 7])
               # one per-tensor scale per layer, measured on calibration data (compress)
               "int8_static": ("int8", ("int8", "int4"))}
ACTIVATION_SCHEMES = (None, *ACTIVATIONS)

PRESETS: dict[str, Recipe] = {
    # capture and run: no pass rewrites anything
    "none": Recipe("none"),
    "w8a16": Recipe("w8a16", _WEIGHT_ONLY, WeightFormat(8)),
    "w4a16": Recipe("w4a16", _WEIGHT_ONLY, WeightFormat(4, 128, symmetric=False)),
    # 3-bit round-to-nearest: the baseline GPTQ/AWQ are measured against at 3 bits
    "w3a16": Recipe("w3a16", _WEIGHT_ONLY, WeightFormat(3, 128, symmetric=False)),
    # rounding algorithms (lowbit_compiler/rounding.py); gptq needs compress(..., calibration=...)
    "w4a16-hqq": Recipe("w4a16-hqq", _WEIGHT_ONLY, WeightFormat(4, 128, symmetric=False),
                        options=(("insert_weight_quant", (("rounding", "hqq"),)),)),
    "w4a16-gptq": Recipe("w4a16-gptq", _WEIGHT_ONLY, WeightFormat(4, 128, symmetric=False),
                         options=(("insert_weight_quant", (("rounding", "gptq"),)),)),
    # SpQR-style: 1% of the weights (largest RTN error) kept in fp16 beside a 3-bit dense part
    "w4a16-spqr": Recipe("w4a16-spqr", _WEIGHT_ONLY, WeightFormat(3, 128, symmetric=False),
                         options=(("insert_weight_quant", (("rounding", "spqr"),)),)),
    "w4a16-awq": Recipe("w4a16-awq", _WEIGHT_ONLY, WeightFormat(4, 128, symmetric=False),
                        options=(("insert_weight_quant", (("rounding", "awq"),)),)),
    "w3a16-gptq": Recipe("w3a16-gptq", _WEIGHT_ONLY, WeightFormat(3, 128, symmetric=False),
                         options=(("insert_weight_quant", (("rounding", "gptq"),)),)),
    "nf4": Recipe("nf4", _WEIGHT_ONLY, WeightFormat(4, 64, kind="nf4")),
    # per-layer int3 / int4 / int8 from measured sensitivity, 4.5 bits per weight on average
    "mixed-4.5": Recipe("mixed-4.5", _WEIGHT_ONLY, WeightFormat(4, 128, symmetric=False),
                        options=(("insert_weight_quant", (("mixed_bits", 4.5),)),)),
    # int8 weights x int8 per-token activations on integer matmuls (torch._int_mm on CPU)
    "w8a8": Recipe("w8a8", _WEIGHT_ONLY, WeightFormat(8), activation="int8_dynamic"),
    # int4 weights x int8 per-token activations (one integer matmul per weight group)
    "w4a8": Recipe("w4a8", _WEIGHT_ONLY, WeightFormat(4, 128, symmetric=False), activation="int8_dynamic"),
    # fp8 e4m3 weights (per channel) x fp8 e4m3 activations (per token, dynamic)
    "fp8": Recipe("fp8", _WEIGHT_ONLY, WeightFormat.parse("fp8_e4m3"), activation="fp8_dynamic"),
    # ... with SmoothQuant: activation outliers migrated into the weights (needs calibration)
    "w8a8-smooth": Recipe("w8a8-smooth", _WEIGHT_ONLY, WeightFormat(8), activation="int8_dynamic",
                          options=(("insert_weight_quant", (("smoothquant", 0.5),)),)),
    # rotations only (R1 on the residual stream, R2 per head): the outputs do not change
    "rotate": Recipe("rotate", ("canonicalize", "rotate")),
    # int4 weights x int4 per-token activations; with rotations (QuaRot: R1 + R2 + online R4)
    "w4a4": Recipe("w4a4", _WEIGHT_ONLY, WeightFormat(4, 128, symmetric=True), activation="int4_dynamic"),
    "w4a4-rot": Recipe("w4a4-rot", _ROTATED, WeightFormat(4, 128, symmetric=True), activation="int4_dynamic",
                       options=(("rotate", (("r4", True),)),)),
    "w4a8-rot": Recipe("w4a8-rot", _ROTATED, WeightFormat(4, 128, symmetric=True), activation="int8_dynamic",
                       options=(("rotate", (("r4", True),)),)),
    "w4a4-spin": Recipe("w4a4-spin", _LEARNED, WeightFormat(4, 128, symmetric=True), activation="int4_dynamic",
                        options=(("spinquant", (("r4", True),)),)),
    "w4a4-flat": Recipe("w4a4-flat", ("canonicalize", "flatquant", "insert_weight_quant"),
                        WeightFormat(4, 128, symmetric=True), activation="int4_dynamic"),
    "w4a4-rot-gptq": Recipe("w4a4-rot-gptq", _ROTATED, WeightFormat(4, 128, symmetric=True),
                            activation="int4_dynamic",
                            options=(("rotate", (("r4", True),)), ("insert_weight_quant", (("rounding", "gptq"),)))),
    "mxfp4": Recipe("mxfp4", _WEIGHT_ONLY, WeightFormat.parse("mxfp4")),
    "nvfp4": Recipe("nvfp4", _WEIGHT_ONLY, WeightFormat.parse("nvfp4")),
}


def get_recipe(recipe: "str | os.PathLike | Recipe | None") -> Recipe:
    """A Recipe from a preset name, a TOML path, or a Recipe (returned as is)."""
    if recipe is None:
        return PRESETS["none"]
    if isinstance(recipe, Recipe):
        return recipe
    text = os.fspath(recipe)
    if text.endswith(".toml"):
        return load_recipe(text)
    if text not in PRESETS:
        raise LowbitError(f"unknown recipe {text!r}; presets: {sorted(PRESETS)}, "
                          "or give a path to a .toml recipe file")
    return PRESETS[text]


def recipe_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> Recipe:
    """Build a Recipe from the ``[recipe]`` table of a TOML file (or an equivalent dict)."""
    data = dict(data)
    known = {"name", "base", "passes", "weight", "include", "exclude", "pad_to_group", "options", "activation"}
    unknown = set(data) - known
    if unknown:
        raise LowbitError(f"{source}: unknown recipe keys {sorted(unknown)}; known keys: {sorted(known)}")
    base_name = data.pop("base", None)
    base = get_recipe(base_name) if base_name else Recipe(name="custom")
    changes: dict[str, Any] = {"name": data.pop("name", base.name if base_name else _file_stem(source))}
    if "weight" in data:
        w = data.pop("weight")
        if w is None or w == {}:
            changes["weight"] = None
        else:
            w = dict(w)
            unknown_w = set(w) - {"format", "bits", "group_size", "symmetric", "kind"}
            if unknown_w or ("format" in w and len(w) > 1):
                raise LowbitError(f"{source}: [recipe.weight] takes either format = '<key>' (e.g. 'int4_g128_asym', "
                                  "'nf4_g64', 'mxfp4') or bits, group_size, symmetric, kind; "
                                  f"got {sorted(w)}")
            try:
                changes["weight"] = WeightFormat.parse(w["format"]) if "format" in w else WeightFormat(**w)
            except (FormatError, TypeError) as e:
                raise LowbitError(f"{source}: [recipe.weight]: {e}") from None
    if "options" in data:
        opts = data.pop("options")
        changes["options"] = tuple((k, tuple(sorted(dict(v).items()))) for k, v in sorted(opts.items()))
    for key in ("passes", "include", "exclude", "pad_to_group", "activation"):
        if key in data:
            changes[key] = data.pop(key)
    return dataclasses.replace(base, **changes)


def _file_stem(source: str) -> str:
    return os.path.splitext(os.path.basename(source))[0] or "custom"


def load_recipe(path: "str | os.PathLike") -> Recipe:
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    if "recipe" not in doc:
        raise LowbitError(f"{path}: no [recipe] table; see lowbit_compiler/recipe.py for the format")
    return recipe_from_dict(doc["recipe"], source=os.fspath(path))
