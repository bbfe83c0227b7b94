"""IR conventions: the one place that defines what lives in ``node.meta["lowbit"]``.

The IR is a ``torch.fx.GraphModule`` at the level of torch functions (what Dynamo hands a
backend), with three conventions:

* Parameters and module buffers are ``get_attr`` nodes whose target *is* the module FQN
  (``model.layers.0.mlp.down_proj.weight``); the attribute is the very ``nn.Parameter`` of the
  user's model, so caches keyed by identity work across graphs.
* Canonical spellings (see ``passes/canonicalize.py``): every linear is one
  ``torch.nn.functional.linear`` node whose weight is a parameter (``get_attr``) or the transpose
  of one (GPT-2's Conv1D); RMSNorm is ``torch.nn.functional.rms_norm``; LayerNorm is
  ``torch.nn.functional.layer_norm``; attention is ``scaled_dot_product_attention``.
* Decisions travel as ``node.meta["lowbit"][KEY] = spec`` where KEY is one of the constants below
  and spec is a frozen dataclass defined here (or a :class:`~lowbit_compiler.formats.WeightFormat`).
  Specs describe; they never hold tensors.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx

META = "lowbit"

# Keys of node.meta["lowbit"]
PARAM = "param"            # ParamInfo on get_attr nodes of frozen parameters/buffers
MODULE = "module"          # ModuleInfo: the module whose forward called this op (from capture)
NORM = "norm"              # NormSpec on canonical norm nodes
WEIGHT_QUANT = "weight_quant"  # WeightQuantDecision on lowbit::wo_linear / qa_linear nodes
SKIPPED = "skipped"        # SkipReason on nodes a pass looked at and left alone
WEIGHT_FORMAT = "weight_format"  # FormatChoice on linears: the format mixed_precision chose
ACT_SCALE = "activation_scale"   # StaticScale on linears: observe_activations' measured input scale
OUTLIERS = "outliers"      # OutlierSpec on linears whose fp16 outliers spqr moved to a sparse_linear
SPARSITY = "sparsity"      # SparsitySpec on linears a sparsify pass pruned (passes/sparsify)
ACT_SPARSITY = "activation_sparsity"  # ActSparsitySpec on lowbit::act_sparsify / sparse_input_linear nodes
KV_CACHE = "kv_cache"      # KVDecision on attention consumers: how mark_kv_cache stores that layer's K/V
KNOWN_KEYS = frozenset({PARAM, MODULE, NORM, WEIGHT_QUANT, SKIPPED, WEIGHT_FORMAT, ACT_SCALE, OUTLIERS, SPARSITY,
                        ACT_SPARSITY, KV_CACHE})


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """A frozen parameter or buffer: its FQN in the user's module and whether it is trainable state."""

    fqn: str
    is_parameter: bool


@dataclasses.dataclass(frozen=True)
class ModuleInfo:
    """The innermost module whose forward produced a node (``lm_head``, ``model.layers.0.mlp``)."""

    fqn: str
    class_name: str


@dataclasses.dataclass(frozen=True)
class NormSpec:
    """A recognised normalisation. ``kind`` is "rms" or "layer"; ``weight_offset`` is 1.0 for
    Gemma-style ``(1 + w)`` scales and 0.0 otherwise; ``folded``: a rotation folded its affine
    parameters into the linears it feeds (and a LayerNorm became an RMSNorm of the centred stream)."""

    kind: str
    eps: float
    weight_offset: float = 0.0
    folded: bool = False


@dataclasses.dataclass(frozen=True)
class WeightQuantDecision:
    """What insert_weight_quant did to one linear: the layer, its format and what it costs."""

    layer: str                 # module FQN of the linear (weight FQN without ".weight")
    format: str                # WeightFormat.key
    in_features: int
    out_features: int
    bits_per_weight: float     # true bytes (data + scales + zeros) * 8 / parameters
    bytes_before: int          # the float weight as stored in the model
    bytes_after: int
    weight_sqnr_db: float      # dequantised vs float weight
    padded_in_features: int = 0  # K after pad_to_group (0: no padding)
    outliers: int = 0            # weights kept in the sparse fp16 side tensor (SpQR-style)
    experts: int = 0             # stacked expert weights (lowbit::grouped_linear): E [N, K] matrices; 0: a linear


@dataclasses.dataclass(frozen=True)
class FormatChoice:
    """The weight format a pass chose for one linear (mixed precision), and why."""

    format: str                # WeightFormat.key
    chosen_by: str             # the pass
    relative_error: float      # the layer-output error of that format, tr(dW H dW^T) / tr(W H W^T)
    sensitivity: tuple[tuple[str, float], ...] = ()  # (format key, relative error) per candidate


@dataclasses.dataclass(frozen=True)
class StaticScale:
    """One per-tensor activation scale for a linear's input, measured on calibration data."""

    scale: float               # absmax / code range (the float32 value, exactly)
    absmax: float
    act: str                   # "int8" | "int4" | "fp8_e4m3"


@dataclasses.dataclass(frozen=True)
class OutlierSpec:
    """Weights of a linear kept in fp16 beside it (``+ lowbit::sparse_linear``), SpQR-style."""

    count: int
    nbytes: int                # COO storage: int32 row + int32 column + fp16 value each


@dataclasses.dataclass(frozen=True)
class SparsitySpec:
    """What a sparsify pass did to one linear's weight."""

    pattern: str               # "2:4", "4:8", ... or "unstructured"
    score: str                 # magnitude / wanda / sparsegpt
    sparsity: float            # fraction of the weight that is zero afterwards
    kept_fraction: float       # fraction the mask keeps (N/M for N:M)
    weight_sqnr_db: float      # pruned vs original weight
    output_error: float | None  # tr(dW H dW^T) / tr(W H W^T) on calibration inputs (None: data-free)


@dataclasses.dataclass(frozen=True)
class ActSparsitySpec:
    """A threshold an activation-sparsity pass calibrated: the site, the target and the fraction of
    the calibration data's scores below it."""

    pass_name: str             # "teal" | "wina" | "cats"
    site: str
    target: float
    achieved: float
    threshold: float


@dataclasses.dataclass(frozen=True)
class KVDecision:
    """One attention found by ``mark_kv_cache``: where its keys and values come from and go, and
    the KV format its cache uses (``lowbit_compiler.kv.KVFormat``)."""

    attention: str             # module FQN of the attention (``model.layers.0.self_attn``)
    layer_index: int           # position among the graph's attentions (the cache's layer index)
    consumer: str              # "sdpa" | "eager" (matmul-softmax-matmul)
    kind: str                  # "MHA" | "GQA" | "MQA"
    heads: int
    kv_heads: int
    head_dim: int
    format: str                # KVFormat.key
    scheme: str
    bits: int
    group: int
    window: int
    sinks: int
    keys_quantized: str        # "post_rope" (what the cache receives) | "pre_rope" (KVQuant) | "no_rope"
    nodes: tuple[tuple[str, str], ...] = ()  # (role, node name): key/value producers, RoPE, cache update
    # the whole lowbit_compiler.kv.KVFormat (with KVQuant's calibrated codebooks), for kv.install
    kv_format: Any = dataclasses.field(default=None, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class SkipReason:
    """Why a pass left a node alone (shown in dumps and summary.json)."""

    pass_name: str
    reason: str


def replace_attr(gm: fx.GraphModule, fqn: str, value: torch.Tensor) -> bool:
    """Swap the tensor at ``fqn`` inside ``gm`` (never in the user's model, whose tensors the graph
    module shares by reference); False if ``gm`` has nothing there. The offline flow writes the
    graph's tensors back into the model afterwards."""
    *path, attr = fqn.split(".")
    owner = gm
    for atom in path:
        if not hasattr(owner, atom):
            return False
        owner = getattr(owner, atom)
    if not hasattr(owner, attr):
        return False
    delattr(owner, attr)
    owner.register_buffer(attr, value)
    return True


def lowbit_meta(node: fx.Node) -> dict[str, Any]:
    return node.meta.setdefault(META, {})


def get(node: fx.Node, key: str, default: Any = None) -> Any:
    assert key in KNOWN_KEYS, f"unknown lowbit meta key {key!r}"
    return node.meta.get(META, {}).get(key, default)


def put(node: fx.Node, key: str, spec: Any) -> None:
    assert key in KNOWN_KEYS, f"unknown lowbit meta key {key!r}"
    assert dataclasses.is_dataclass(spec) and not isinstance(spec, type), "meta values are specs"
    lowbit_meta(node)[key] = spec


# --------------------------------------------------------------------------------------------
# Helpers every pass uses to read the canonical IR
# --------------------------------------------------------------------------------------------

def param_fqn(node: Any) -> str | None:
    """FQN of a frozen parameter node, else None."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        info = get(node, PARAM)
        return info.fqn if info is not None else None
    return None


def fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def set_attr(module: torch.nn.Module, target: str, value: Any) -> None:
    """Attach ``value`` at a dotted FQN, creating empty parent modules; tensors become buffers
    (parameters stay parameters, the very object), modules submodules."""
    *path, attr = target.split(".")
    owner = module
    for atom in path:
        if not hasattr(owner, atom):
            owner.add_module(atom, torch.nn.Module())
        owner = getattr(owner, atom)
    if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
        owner.register_buffer(attr, value)
    else:
        setattr(owner, attr, value)


# In-place spellings Dynamo leaves in a graph as functions (``x += y`` is ``operator.iadd``).
_INPLACE_OPERATORS = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv,
                                operator.ifloordiv, operator.imod, operator.ipow, operator.iand,
                                operator.ior, operator.ixor, operator.ilshift, operator.irshift,
                                operator.imatmul, operator.setitem})


# Calls made for their effect on interpreter state; nothing reads their result.
_STATE_CHANGES = frozenset({"lazy_load_decompositions", "_set_grad_enabled", "_set_fwd_grad_enabled",
                            "_enter_dual_level", "_exit_dual_level", "_enter_autocast", "_exit_autocast"})


def has_side_effects(node: fx.Node) -> bool:
    """True when removing ``node`` could change what the graph computes even though nothing
    reads its result: it writes into a tensor (``x[..., :k].copy_(y)``, ``index_put_``,
    ``x += y``, ``out=``, ``inplace=True``) or fx itself calls it impure (asserts, random ops,
    mutable schemas). A write into a view is a write into its base: the view node stays because
    the write reads it. Every dead-code elimination in the project goes through
    :func:`eliminate_dead_code`, which keeps these nodes."""
    if node.is_impure():
        return True
    if node.op == "call_method":
        name = node.target
        return (name.endswith("_") and not name.startswith("__")) or name in (
            "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ior__", "__iand__")
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            return True
        if node.kwargs.get("out") is not None or node.kwargs.get("inplace") is True:
            return True
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.startswith("_"):  # torch.relu_, Tensor.copy_ as a function
            return True
        if name in _STATE_CHANGES or name.endswith(("_increment_nesting", "_decrement_nesting")):
            return True  # functorch/autograd interpreter state (vmap levels Dynamo inlines: Mamba)
        schema = getattr(node.target, "_schema", None)
        return schema is not None and schema.is_mutable
    return False


def eliminate_dead_code(gm: fx.GraphModule) -> bool:
    """``gm.graph.eliminate_dead_code`` that never drops a write (see :func:`has_side_effects`)."""
    return gm.graph.eliminate_dead_code(is_impure_node=has_side_effects)


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.nn.functional.linear


@dataclasses.dataclass(frozen=True)
class LinearParts:
    """The pieces of a canonical linear: ``y = x @ W.T + b``.

    ``weight_node`` is the get_attr of the parameter; ``transposed`` says the parameter is stored
    as [in, out] (GPT-2 Conv1D) and the linear reads its transpose.
    """

    x: fx.Node
    weight_node: fx.Node | None
    transposed: bool
    bias: fx.Node | None


def linear_parts(node: fx.Node) -> LinearParts:
    assert is_linear(node), node
    args = list(node.args) + [None] * (3 - len(node.args))
    x, w, b = args[0], node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2])
    transposed = False
    if isinstance(w, fx.Node) and w.op in ("call_function", "call_method") and w.target in (
        torch.t, "t"
    ):
        w, transposed = w.args[0], True
    if not (isinstance(w, fx.Node) and param_fqn(w) is not None):
        w = None
    return LinearParts(x=x, weight_node=w, transposed=transposed, bias=b)


@dataclasses.dataclass(frozen=True)
class GroupedParts:
    """A grouped matmul over stacked expert weights, ``y[rows of e] = x[rows of e] @ W_e.T``
    (``torch._grouped_mm``, ``F.grouped_mm``, transformers' ``grouped_mm_fallback``: the matmul
    of transformers' default ``grouped_mm`` experts implementation).

    ``weight_node`` is the get_attr of the 3-D parameter; ``transposed`` False when it is stored
    [E, N, K] (the linear layout: Mixtral's ``gate_up_proj`` [E, 2I, H], read through
    ``transpose(-2, -1)``), True when stored [E, K, N] and read as it is. ``offs``: cumulative row
    counts per expert."""

    x: fx.Node
    weight_node: fx.Node
    transposed: bool
    offs: fx.Node


_GROUPED_MM_NAMES = ("_grouped_mm", "grouped_mm", "grouped_mm_fallback")


def is_grouped_mm(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    name = getattr(node.target, "__name__", "") or ""
    text = str(node.target)
    return name.split(".")[0] in _GROUPED_MM_NAMES or text.removesuffix(".default").endswith(
        ("transformers.grouped_mm_fallback", "aten._grouped_mm"))


def grouped_parts(node: fx.Node) -> GroupedParts | None:
    """The pieces of a grouped matmul whose weight is a frozen parameter (None: another grouped
    matmul, a bias or an output dtype fused in, or a computed weight)."""
    if not is_grouped_mm(node):
        return None
    names = ("x", "w", "offs")
    values = dict(zip(names, node.args))
    for key, alias in (("x", ("input", "mat_a", "self")), ("w", ("weight", "mat_b")), ("offs", ("offs",))):
        for a in alias:
            if a in node.kwargs:
                values[key] = node.kwargs[a]
    if any(node.kwargs.get(k) is not None for k in ("bias", "out_dtype", "scale_a", "scale_b")) or len(node.args) > 3:
        return None
    x, w, offs = values.get("x"), values.get("w"), values.get("offs")
    if not isinstance(x, fx.Node) or not isinstance(offs, fx.Node):
        return None
    transposed = True
    if (isinstance(w, fx.Node) and w.op in ("call_method", "call_function") and w.target in ("transpose", torch.transpose)
            and tuple(w.args[1:]) in ((-2, -1), (-1, -2), (1, 2), (2, 1))):
        w, transposed = w.args[0], False
    if param_fqn(w) is None:
        return None
    return GroupedParts(x=x, weight_node=w, transposed=transposed, offs=offs)


def op_args(node: fx.Node) -> dict[str, Any]:
    """The arguments of a custom-op node by name, defaults filled in from the op's schema
    (``op_args(n)["qweight"]``), so no code outside an op's declaration indexes ``node.args``."""
    schema = node.target._schema
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            out[arg.name] = None
    return out


def describe(node: fx.Node) -> str:
    """``layer model.layers.0.mlp.down_proj (node linear_6)``: how errors and logs name a node."""
    decision, module = get(node, WEIGHT_QUANT), get(node, MODULE)
    layer = decision.layer if decision is not None else (module.fqn if module is not None else None)
    return f"layer {layer} (node {node.name})" if layer else f"node {node.name}"


def layer_name(node: fx.Node, weight_fqn: str) -> str:
    """The layer a linear belongs to: the module that called it (so a head tied to the embedding is
    ``lm_head``, not ``model.embed_tokens``), else the weight FQN without ``.weight``."""
    module = get(node, MODULE)
    if module is not None and module.fqn:
        return module.fqn
    return weight_fqn.rsplit(".", 1)[0] if "." in weight_fqn else weight_fqn
