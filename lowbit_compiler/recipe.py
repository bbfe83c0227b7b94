"""Recipes: which passes run, in which order, with which options, formats and layers.

A recipe is an ordered list of passes read top to bottom, like llm-compressor's list of
modifiers: composing two algorithms is naming both (``["canonicalize", "smoothquant", "gptq"]``).
A :class:`Recipe` is a frozen dataclass; it is checked when it is built (every pass exists,
takes the options given, finds what it requires established by an earlier pass, and no two
passes quantize the same layers). Named presets live in ``PRESETS``. Options are plain dicts in
Python::

    Recipe("w4a16-gptq-64", ("canonicalize", "gptq"), WeightFormat(4, 128, symmetric=False),
           options={"gptq": {"block_size": 64}})

and tables in a TOML file (``load_recipe("my.toml")``)::

    [recipe]
    base = "w4a16"                         # optional: start from a preset
    passes = ["canonicalize", "awq", "gptq"]
    exclude = ["lm_head", "*.mlp.down_proj"]   # FQN globs (fnmatch)
    pad_to_group = false

    [recipe.weight]                        # the weight format the quantizing pass uses
    bits = 4
    group_size = 64
    symmetric = true

    [recipe.options.gptq]                  # keyword options for one pass
    block_size = 64
"""
from __future__ import annotations

import dataclasses
import fnmatch
import inspect
import os
import sys
from typing import Any, Mapping

from lowbit_compiler.formats import FormatError, WeightFormat
from lowbit_compiler.pass_base import LowbitError, get_pass

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


# activation scheme -> (what lowbit::qa_linear's `act` is, the weight formats it multiplies with)
ACTIVATIONS = {"int8_dynamic": ("int8", ("int8", "int4")), "fp8_dynamic": ("fp8_e4m3", ("fp8_e4m3",)),
               "int4_dynamic": ("int4", ("int8", "int4")),  # W4A4 (per-token, symmetric [-7, 7])
               # one per-tensor scale per layer, measured on calibration data (observe_activations)
               "int8_static": ("int8", ("int8", "int4"))}
ACTIVATION_SCHEMES = (None, *ACTIVATIONS)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A compression recipe.

    Args:
        name: shown in dumps and logs.
        passes: pass names, run in this order (see ``lowbit_compiler.registered_passes()``).
        weight: the weight format the quantizing pass (``insert_weight_quant``, ``hqq``, ``gptq``)
            applies (None: no weight quantization); ``mixed_precision`` may choose others per layer.
        include: FQN globs of the linears a pass may rewrite (layer FQN, e.g. ``model.layers.*``).
        exclude: FQN globs left alone even when included.
        pad_to_group: pad K up to a multiple of the group size instead of refusing the layer.
        options: per-pass keyword options: ``{"gptq": {"block_size": 64}}`` (stored as sorted
            tuples ``((pass_name, ((key, value), ...)), ...)``, which are accepted too).
        activation: activation quantization of the quantized linears: None (weight-only),
            ``"int8_dynamic"`` (per-token int8 scales computed at run time; int8 or int4 weights) or
            ``"fp8_dynamic"`` (per-token fp8 e4m3; fp8_e4m3 weights), ``"int4_dynamic"`` (W4A4) or
            ``"int8_static"`` (one per-tensor int8 scale per layer, measured by the
            ``observe_activations`` pass on calibration data).
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
        object.__setattr__(self, "options", _normalise_options(self.name, self.options))
        check(self)

    def applies_to(self, layer: str) -> bool:
        """Whether the include/exclude globs select this layer FQN."""
        return (any(fnmatch.fnmatchcase(layer, p) for p in self.include)
                and not any(fnmatch.fnmatchcase(layer, p) for p in self.exclude))

    def names(self, layer: str) -> bool:
        """Whether an include glob other than the default ``"*"`` selects this layer (and no exclude
        glob drops it): how a recipe opts in to what stays float by default (MoE routers)."""
        return (any(p != "*" and fnmatch.fnmatchcase(layer, p) for p in self.include)
                and not any(fnmatch.fnmatchcase(layer, p) for p in self.exclude))

    def pass_options(self, pass_name: str) -> dict[str, Any]:
        return dict(dict(self.options).get(pass_name, ()))

    def data_driven_passes(self) -> list[str]:
        """The recipe's passes that need calibration data (``Pass.data_driven``), in order."""
        return [p for p in self.passes if get_pass(p).data_driven]

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


def _normalise_options(name: str, options: Any) -> tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]:
    """``{"gptq": {"block_size": 64}}`` (or the tuple form) -> sorted tuples."""
    try:
        items = dict(options or {}).items()
        out = []
        for pass_name, opts in items:
            opts = dict(opts or {})
            out.append((str(pass_name), tuple(sorted((str(k), _frozen(v)) for k, v in opts.items()))))
    except (TypeError, ValueError) as e:
        raise LowbitError(f"recipe {name!r}: options must map a pass name to a dict of its keyword options, e.g. "
                          f"{{'gptq': {{'block_size': 64}}}}; got {options!r} ({e})") from None
    return tuple(sorted(out))


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def check(recipe: Recipe) -> None:
    """Refuse a recipe that makes no sense, naming the passes: an unknown pass or option, a
    requirement no earlier pass ensures, a pass that must run before another, two passes
    quantizing the same layers."""
    from lowbit_compiler.pass_base import get_pass

    unknown_options = set(dict(recipe.options)) - set(recipe.passes)
    if unknown_options:
        raise LowbitError(f"recipe {recipe.name!r}: options for {sorted(unknown_options)}, which the recipe does not run "
                          f"(passes: {list(recipe.passes)})")
    established: dict[str, str] = {}  # property -> the pass that ensured it
    quantizer = None
    for pass_name in recipe.passes:
        cls = get_pass(pass_name)
        pass_ = instantiate(cls, recipe)
        missing = [r for r in pass_.required(recipe) if r not in established]
        if missing:
            providers = _providers(missing)
            raise LowbitError(f"recipe {recipe.name!r}: pass {pass_name!r} requires {missing}, which no earlier pass "
                              f"ensures; put {providers or 'the pass that ensures it'} before it")
        for prop in cls.before:
            if prop in established:
                raise LowbitError(f"recipe {recipe.name!r}: pass {pass_name!r} must run before {established[prop]!r} "
                                  f"(which ensured {prop!r}); reorder the passes")
        if cls.quantizes:
            if quantizer is not None:
                raise LowbitError(f"recipe {recipe.name!r}: passes {quantizer!r} and {pass_name!r} both quantize the "
                                  "selected linears; keep one (the other algorithms go before it)")
            quantizer = pass_name
        for prop in cls.ensures:
            established.setdefault(prop, pass_name)


def instantiate(cls: type, recipe: Recipe) -> Any:
    """The pass with the recipe's options for it; an unknown option names the ones it takes."""
    options = recipe.pass_options(cls.name)
    try:
        return cls(**options)
    except TypeError as e:
        params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "options")]
        raise LowbitError(f"recipe {recipe.name!r}: pass {cls.name!r} does not take the options {sorted(options)} "
                          f"({e}); its options: {params}") from None


def _providers(props: list[str]) -> str:
    from lowbit_compiler.pass_base import _REGISTRY, registered_passes

    registered_passes()
    names = sorted({name for name, cls in _REGISTRY.items() for p in props if p in cls.ensures})
    return " or ".join(repr(n) for n in names)


_WEIGHT_ONLY = ("canonicalize", "insert_weight_quant")
_ROTATED = ("canonicalize", "rotate", "insert_weight_quant")
_LEARNED = ("canonicalize", "spinquant", "insert_weight_quant")
_INT4 = WeightFormat(4, 128, symmetric=False)
_INT3 = WeightFormat(3, 128, symmetric=False)
_INT4_SYM = WeightFormat(4, 128, symmetric=True)
_R4 = {"rotate": {"r4": True}}
_KV = ("canonicalize", "mark_kv_cache")

PRESETS: dict[str, Recipe] = {r.name: r for r in (
    # capture and run: no pass rewrites anything
    Recipe("none"),
    Recipe("w8a16", _WEIGHT_ONLY, WeightFormat(8)),
    Recipe("w4a16", _WEIGHT_ONLY, _INT4),
    # 3-bit round-to-nearest: the baseline GPTQ/AWQ are measured against at 3 bits
    Recipe("w3a16", _WEIGHT_ONLY, _INT3),
    # rounding algorithms as passes (passes/quantize/); data-driven ones need calibration
    Recipe("w4a16-hqq", ("canonicalize", "hqq"), _INT4),
    Recipe("w4a16-gptq", ("canonicalize", "gptq"), _INT4),
    Recipe("w3a16-gptq", ("canonicalize", "gptq"), _INT3),
    # AWQ: activation-aware scales folded into the producers, then round to nearest
    Recipe("w4a16-awq", ("canonicalize", "awq", "insert_weight_quant"), _INT4),
    # SpQR-style: 1% of the weights (those that stretch their group's range most) kept in fp16
    # beside a 3-bit dense part
    Recipe("w4a16-spqr", ("canonicalize", "spqr", "insert_weight_quant"), _INT3),
    Recipe("nf4", _WEIGHT_ONLY, WeightFormat(4, 64, kind="nf4")),
    # per-layer int3 / int4 / int8 from measured sensitivity, 4.5 bits per weight on average
    Recipe("mixed-4.5", ("canonicalize", "mixed_precision", "insert_weight_quant"), _INT4,
           options={"mixed_precision": {"bits": 4.5}}),
    # int8 weights x int8 per-token activations on integer matmuls (torch._int_mm on CPU)
    Recipe("w8a8", _WEIGHT_ONLY, WeightFormat(8), activation="int8_dynamic"),
    # int8 weights x int8 activations with one static scale per layer from calibration data
    Recipe("w8a8-static", ("canonicalize", "observe_activations", "insert_weight_quant"), WeightFormat(8),
           activation="int8_static"),
    # int4 weights x int8 per-token activations (one integer matmul per weight group)
    Recipe("w4a8", _WEIGHT_ONLY, _INT4, activation="int8_dynamic"),
    # fp8 e4m3 weights (per channel) x fp8 e4m3 activations (per token, dynamic)
    Recipe("fp8", _WEIGHT_ONLY, WeightFormat.parse("fp8_e4m3"), activation="fp8_dynamic"),
    # ... with SmoothQuant: activation outliers migrated into the weights (needs calibration)
    Recipe("w8a8-smooth", ("canonicalize", "smoothquant", "insert_weight_quant"), WeightFormat(8),
           activation="int8_dynamic"),
    # rotations only (R1 on the residual stream, R2 per head): the outputs do not change
    Recipe("rotate", ("canonicalize", "rotate")),
    # int4 weights x int4 per-token activations; with rotations (QuaRot: R1 + R2 + online R4)
    Recipe("w4a4", _WEIGHT_ONLY, _INT4_SYM, activation="int4_dynamic"),
    Recipe("w4a4-rot", _ROTATED, _INT4_SYM, activation="int4_dynamic", options=_R4),
    Recipe("w4a8-rot", _ROTATED, _INT4_SYM, activation="int8_dynamic", options=_R4),
    Recipe("w4a4-spin", _LEARNED, _INT4_SYM, activation="int4_dynamic", options={"spinquant": {"r4": True}}),
    Recipe("w4a4-flat", ("canonicalize", "flatquant", "insert_weight_quant"), _INT4_SYM, activation="int4_dynamic"),
    Recipe("mxfp4", _WEIGHT_ONLY, WeightFormat.parse("mxfp4")),
    Recipe("nvfp4", _WEIGHT_ONLY, WeightFormat.parse("nvfp4")),
    # compositions: algorithms in order, as llm-compressor's modifier lists
    Recipe("w8a8-smooth-gptq", ("canonicalize", "smoothquant", "gptq"), WeightFormat(8), activation="int8_dynamic"),
    Recipe("w4a16-awq-gptq", ("canonicalize", "awq", "gptq"), _INT4),
    Recipe("w3a16-awq-gptq", ("canonicalize", "awq", "gptq"), _INT3),
    Recipe("w4a4-rot-gptq", ("canonicalize", "rotate", "gptq"), _INT4_SYM, activation="int4_dynamic", options=_R4),
    Recipe("w4a4-spin-gptq", ("canonicalize", "spinquant", "gptq"), _INT4_SYM, activation="int4_dynamic",
           options={"spinquant": {"r4": True}}),
    Recipe("mixed-4.5-gptq", ("canonicalize", "mixed_precision", "gptq"), _INT4,
           options={"mixed_precision": {"bits": 4.5}}),
    # SpQR's fp16 outliers beside a 3-bit dense part rounded by HQQ
    Recipe("w4a16-spqr-hqq", ("canonicalize", "spqr", "hqq"), _INT3),
    # N:M weight sparsity (passes/sparsify; other patterns: options={"prune": {"pattern": "4:8"}}).
    # Float-weight presets keep dense weights with zeros; sparse formats store kept values + indices
    Recipe("s24", ("canonicalize", "prune")),
    Recipe("s24-wanda", ("canonicalize", "wanda")),
    Recipe("s24-sparsegpt", ("canonicalize", "sparsegpt")),
    # SparseGPT 2:4 jointly with int4 (a scale per 64 kept values = per 128 input columns, as int4
    # g128; K needs only be a multiple of 128): 3.19 bits per weight. "s24+int4_g128_asym" (3.09
    # bits) fits layers whose K is a multiple of 256: recipe.replace(weight=...)
    Recipe("s24-w4a16", ("canonicalize", "sparsegpt_quant"), WeightFormat.parse("s24+int4_g64_asym")),
    # Wanda 2:4, then int8 per channel on the kept values: 2:4 + int8 storage (~5 bits per weight)
    Recipe("s24-w8a16", ("canonicalize", "wanda", "insert_weight_quant"), WeightFormat.parse("s24+int8")),
    # activation sparsity (passes/act_sparsity/): inputs zeroed below per-site thresholds calibrated to 50 %
    # (option sparsity); on float weights, and composed with int8 / int4 weights, the threshold fused into the
    # quantized matmul (the decode GEMV skips the weight rows of zeroed inputs)
    Recipe("teal-50", ("canonicalize", "teal")),
    Recipe("cats-50", ("canonicalize", "cats")),
    Recipe("wina-50", ("canonicalize", "wina")),
    # R-Sparse: TEAL's thresholds + a rank-32 SVD of each float weight over the zeroed inputs; with int8 / int4
    # weights the sparse part is the fused activation-sparse matmul and the low-rank factors stay float
    Recipe("rsparse-50", ("canonicalize", "rsparse")),
    Recipe("rsparse-50+w8a16", ("canonicalize", "rsparse", "insert_weight_quant", "fuse_sparse_input"),
           WeightFormat(8)),
    Recipe("rsparse-50+w4a16", ("canonicalize", "rsparse", "insert_weight_quant", "fuse_sparse_input"), _INT4),
    Recipe("teal-50+w8a16", ("canonicalize", "teal", "insert_weight_quant", "fuse_sparse_input"), WeightFormat(8)),
    Recipe("teal-50+w4a16", ("canonicalize", "teal", "insert_weight_quant", "fuse_sparse_input"), _INT4),
    Recipe("wina-50+w8a16", ("canonicalize", "wina", "insert_weight_quant", "fuse_sparse_input"), WeightFormat(8)),
    # W8A8 (int8 activations per token) behind TEAL's thresholds, fused: lowbit::sparse_input_qa_linear
    Recipe("teal-50+w8a8", ("canonicalize", "teal", "insert_weight_quant", "fuse_sparse_input"), WeightFormat(8),
           activation="int8_dynamic"),
    Recipe("wina-50+w4a16", ("canonicalize", "wina", "insert_weight_quant", "fuse_sparse_input"), _INT4),
    Recipe("cats-50+w4a16", ("canonicalize", "cats", "insert_weight_quant"), _INT4),
    # KV-cache compression (lowbit_compiler/kv.py): the weights stay float; compose with a weight
    # preset by name, "w4a16+kv4" (see get_recipe)
    Recipe("kv8", _KV, options={"mark_kv_cache": {"scheme": "int8"}}),
    Recipe("kv4", _KV, options={"mark_kv_cache": {"scheme": "int4"}}),
    Recipe("kv3", _KV, options={"mark_kv_cache": {"scheme": "int3"}}),
    Recipe("kv2", _KV, options={"mark_kv_cache": {"scheme": "int2"}}),
    Recipe("kv-fp8", _KV, options={"mark_kv_cache": {"scheme": "fp8"}}),
    # KIVI: per-channel keys (groups of 64 tokens), per-token values, 64 recent tokens in float
    Recipe("kv2-kivi", _KV, options={"mark_kv_cache": {"scheme": "kivi2"}}),
    Recipe("kv3-kivi", _KV, options={"mark_kv_cache": {"scheme": "kivi3"}}),
    Recipe("kv4-kivi", _KV, options={"mark_kv_cache": {"scheme": "kivi4"}}),
    # KVQuant (needs calibration data): pre-RoPE per-channel keys, per-layer 2**bits-level codebooks
    # fitted on the calibration activations, 1 % sparse outliers per row, 4 sink tokens in float
    Recipe("kv3-kvquant", _KV, options={"mark_kv_cache": {"scheme": "kvquant3"}}),
    Recipe("kv2-kvquant", _KV, options={"mark_kv_cache": {"scheme": "kvquant2"}}),
    Recipe("kv4-kvquant", _KV, options={"mark_kv_cache": {"scheme": "kvquant4"}}),
    # GEAR: int4 per token + rank-2 residual per 64 tokens + 1 % sparse outliers
    Recipe("kv4-gear", _KV, options={"mark_kv_cache": {"scheme": "gear4"}}),
)}


def compose(names: list[str]) -> Recipe:
    """One recipe from several, as llm-compressor composes modifiers by listing them: the passes in
    order (each once), the options of each, the one weight format and activation scheme given
    (two different ones are refused). ``get_recipe("w4a16+kv4")`` calls this."""
    parts = [get_recipe(n) for n in names]
    passes: list[str] = []
    options: dict[str, Any] = {}
    weight, activation = None, None
    for r in parts:
        for p in r.passes:
            if p not in passes:
                passes.append(p)
        for pass_name, opts in r.options:
            if pass_name in options and options[pass_name] != dict(opts):
                raise LowbitError(f"recipe {'+'.join(names)!r}: {r.name!r} and an earlier part give pass {pass_name!r} "
                                  "different options; keep one")
            options[pass_name] = dict(opts)
        for field, current in (("weight", weight), ("activation", activation)):
            value = getattr(r, field)
            if value is not None and current is not None and value != current:
                raise LowbitError(f"recipe {'+'.join(names)!r}: two {field}s ({current!r} and {value!r}); a composed "
                                  "recipe takes one weight preset")
        weight, activation = weight or r.weight, activation or r.activation
    kv_last = [p for p in passes if p == "mark_kv_cache"]
    passes = [p for p in passes if p != "mark_kv_cache"] + kv_last  # after every weight pass
    return Recipe("+".join(names), tuple(passes), weight, options=options, activation=activation)


def get_recipe(recipe: "str | os.PathLike | Recipe | None") -> Recipe:
    """A Recipe from a preset name, a TOML path, or a Recipe (returned as is)."""
    if recipe is None:
        return PRESETS["none"]
    if isinstance(recipe, Recipe):
        return recipe
    text = os.fspath(recipe)
    if text.endswith(".toml"):
        return load_recipe(text)
    if "+" in text and text not in PRESETS:
        return compose(text.split("+"))
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
        changes["options"] = opts
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
