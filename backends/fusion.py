"""Fusion groups: which nodes of the rewritten graph become one generated kernel.

Where it runs: in lowering, for ``target="triton"``, after every pass. It reads the graph and the
declared meta only; it does not rewrite anything (lowering does, group by group).

A group is built around an **anchor**, a low-bit matmul (``lowbit::wo_linear``, or
``lowbit::qa_linear`` whose activation quantization the kernel does in its prologue), in three
directions, each driven by a rule table a pass author extends:

* **prologue** (``PROLOGUES``): the op that produces the anchor's input, recomputed inside the
  kernel -- today RMSNorm and LayerNorm. Taken only when *every* user of the norm is an anchor, so
  the norm disappears from the graph (q/k/v each recompute it: a norm is one extra pass over a row
  the kernel reads anyway).
* **epilogue** (``ELEMENTWISE``): elementwise ops that consume the anchor's output, grown as a DAG
  (GPT-2's written-out tanh-GELU is eight nodes), whose other operands are constants, ``[N]`` rows
  or full ``[..., N]`` tensors (a residual). The grown region must have a single output: nodes
  whose value is also needed outside are trimmed off again.
* **sibling** (horizontal fusion): an epilogue operand that is another anchor reading the *same*
  input with the same format and shape (a gated MLP's ``up`` beside ``gate``) joins the group; the
  kernel runs both matmuls in one loop over K.

The analysis runs on a networkx view of the graph: an epilogue operand that depends on the group
itself (which would make the fused kernel wait on its own output) is refused by a path query.

What it leaves alone: everything else (attention, embeddings, reshapes, casts) stays in the graph
and runs eagerly (or under Inductor). Anchors that cannot be handled keep their node, and lowering
falls back to the reference with the reason :func:`anchor_of` gives.
"""
from __future__ import annotations

import dataclasses
import operator
import re
from typing import Any, Callable

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F

from lowbit_compiler import _dynamo_adapter, ir, opdecl


# ---------------------------------------------------------------------------------------------
# Rule tables
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ElementwiseOp:
    """An epilogue op: how to write it in Triton (fp32 registers) and in torch (the reference).

    Both are format strings over the operand spellings ``{0}``, ``{1}``.
    """

    name: str
    triton: str
    torch: str
    arity: int


ELEMENTWISE: dict[str, ElementwiseOp] = {}
_TARGET_TO_OP: dict[Any, str] = {}


def register_elementwise(op: ElementwiseOp, targets: tuple[Any, ...]) -> None:
    """Make ``op`` fusable into the epilogue of a low-bit matmul when a node calls one of
    ``targets`` with ``op.arity`` positional operands and no keyword arguments."""
    ELEMENTWISE[op.name] = op
    for target in targets:
        _TARGET_TO_OP[target] = op.name


# one line each: name, Triton expression, torch reference expression
register_elementwise(ElementwiseOp("add", "({0} + {1})", "({0} + {1})", 2), (operator.add, torch.add, "add"))
register_elementwise(ElementwiseOp("sub", "({0} - {1})", "({0} - {1})", 2), (operator.sub, torch.sub, "sub"))
register_elementwise(ElementwiseOp("mul", "({0} * {1})", "({0} * {1})", 2), (operator.mul, torch.mul, "mul"))
register_elementwise(ElementwiseOp("div", "({0} / {1})", "({0} / {1})", 2),
                     (operator.truediv, torch.div, "div"))
register_elementwise(ElementwiseOp("neg", "(-{0})", "(-{0})", 1), (operator.neg, torch.neg, "neg"))
register_elementwise(ElementwiseOp("relu", "tl.maximum({0}, 0.0)", "torch.relu({0})", 1),
                     (F.relu, torch.relu, "relu"))
register_elementwise(ElementwiseOp("sigmoid", "tl.sigmoid({0})", "torch.sigmoid({0})", 1),
                     (torch.sigmoid, F.sigmoid, "sigmoid"))
register_elementwise(ElementwiseOp("silu", "({0} * tl.sigmoid({0}))", "F.silu({0})", 1), (F.silu,))
# tanh(u) = 2 sigmoid(2u) - 1: one spelling that the interpreter and every GPU backend accept
register_elementwise(ElementwiseOp("tanh", "(2.0 * tl.sigmoid(2.0 * {0}) - 1.0)", "torch.tanh({0})", 1),
                     (torch.tanh, F.tanh, "tanh"))
# ops whose spelling depends on an argument: classified by _classify, not by target alone
for _op in (
    ElementwiseOp("gelu", "(0.5 * {0} * (1.0 + tl.erf({0} * 0.7071067811865476)))", "F.gelu({0})", 1),
    ElementwiseOp("gelu_tanh", "(0.5 * {0} * (1.0 + (2.0 * tl.sigmoid(1.5957691216057308 * ({0} + 0.044715 * {0} * {0} * {0})) - 1.0)))",
                  "F.gelu({0}, approximate='tanh')", 1),
    ElementwiseOp("square", "({0} * {0})", "({0} * {0})", 1),
    ElementwiseOp("cube", "({0} * {0} * {0})", "({0} * {0} * {0})", 1),
):
    ELEMENTWISE[_op.name] = _op


def _classify(node: fx.Node) -> tuple[str, list[Any]] | None:
    """(op name, operands) when ``node`` is an elementwise op the epilogue can absorb."""
    if node.op not in ("call_function", "call_method"):
        return None
    target = node.target
    if target is F.gelu:
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        if set(node.kwargs) - {"approximate"} or approximate not in ("none", "tanh"):
            return None
        return ("gelu" if approximate == "none" else "gelu_tanh"), [node.args[0]]
    if target in (torch.pow, operator.pow, "pow") and len(node.args) == 2 and not node.kwargs:
        exponent = node.args[1]
        if isinstance(exponent, (int, float)) and exponent in (2, 3):
            return ("square" if exponent == 2 else "cube"), [node.args[0]]
        return None
    if target in (F.silu, F.relu) and set(node.kwargs) <= {"inplace"} and not node.kwargs.get("inplace"):
        return _TARGET_TO_OP[target], list(node.args[:1])
    name = _TARGET_TO_OP.get(target) if not isinstance(target, str) or node.op == "call_method" else None
    if name is None or node.kwargs or len(node.args) != ELEMENTWISE[name].arity:
        return None
    return name, list(node.args)


@dataclasses.dataclass
class Anchor:
    """A low-bit matmul: ``y = x @ dequant(qweight, scale, zero).T + bias``; with ``act`` set
    (``lowbit::qa_linear``), ``x`` is quantized first (per token, or with the static per-tensor
    scale ``x_scale``)."""

    node: fx.Node
    x: fx.Node
    qweight: fx.Node
    scale: fx.Node
    zero: fx.Node | None
    bias: fx.Node | None
    fmt: str
    in_features: int
    out_features: int
    act: str | None = None  # "int8" | "fp8_e4m3": activations quantized inside the op
    x_scale: fx.Node | None = None  # static per-tensor activation scale [1] (None: per token)
    # SpQR: ``add(anchor, lowbit::sparse_linear(x, rows, cols, values, N))`` read inside the kernel
    outliers: fx.Node | None = None  # the sparse_linear node absorbed
    outlier_add: fx.Node | None = None  # the add: its value is the anchor's result (acc0)
    csr: tuple[fx.Node, fx.Node, fx.Node] | None = None  # the CSR copy's get_attr nodes (set by lowering)
    # x is already ``act`` codes from the rotate-and-quantize kernel; this node is their row scales
    prequant_scale: fx.Node | None = None

    @property
    def op(self) -> str:
        return "qa_linear" if self.act else "wo_linear"


def linear_anchor(node: fx.Node, gm: fx.GraphModule) -> Anchor:
    """The Anchor of a low-bit linear op, from its arguments by name (``lowbit::wo_linear``,
    ``lowbit::qa_linear``: the activation scheme and static scale are None for weight-only)."""
    a = opdecl.args(node)
    out_features = ir.fetch_attr(gm, a["scale"].target).shape[0]
    return Anchor(node, a["x"], a["qweight"], a["scale"], a["zero"], a["bias"], a["fmt"], a["in_features"],
                  out_features, a.get("act"), a.get("x_scale"), prequant_scale=node.meta.get(PREQUANT_SCALE))


# node.meta key lowering sets on a qa_linear whose input it replaced by rotate-and-quantize codes
PREQUANT_SCALE = "lowbit_prequant_scale"


# op -> function building the Anchor: every op its declaration calls a fusion anchor
ANCHORS: dict[Any, Callable[[fx.Node, fx.GraphModule], Anchor]] = {
    decl.op: linear_anchor for decl in opdecl.DECLARATIONS.values() if decl.fusion_anchor}


def register_anchor(target: Any, build: Callable[[fx.Node, fx.GraphModule], Anchor]) -> None:
    ANCHORS[target] = build


@dataclasses.dataclass
class Prologue:
    """A norm recomputed inside the kernel: ``x = norm(input) * (weight + offset) + bias``."""

    kind: str  # "rms" | "layer"
    node: fx.Node
    input: fx.Node
    weight: fx.Node | None
    bias: fx.Node | None
    eps: float
    offset: float


def norm_prologue(node: fx.Node, gm: fx.GraphModule) -> Prologue | None:
    spec = ir.get(node, ir.NORM)
    if spec is None:
        return None
    args = list(node.args) + [None] * 5
    x = args[0]
    if node.target is F.rms_norm:
        weight, bias, eps = node.kwargs.get("weight", args[2]), None, node.kwargs.get("eps", args[3])
    elif node.target is F.layer_norm:
        weight, bias, eps = node.kwargs.get("weight", args[2]), node.kwargs.get("bias", args[3]), node.kwargs.get("eps", args[4])
    else:
        return None
    if weight is not None and spec.weight_offset:  # Gemma: the norm reads (1 + w), maybe w.float()
        weight = weight.args[1]
        if isinstance(weight, fx.Node) and weight.target in ("float", "to"):
            weight = weight.args[0]
    for t in (weight, bias):
        if t is not None and ir.param_fqn(t) is None:
            return None  # a computed norm weight is not a kernel parameter
    if node.target is F.layer_norm and len(args[1]) != 1:
        return None
    shape = _shape(node)
    if shape is None or (weight is not None and ir.fetch_attr(gm, weight.target).shape[-1] != int(shape[-1])):
        return None
    return Prologue(spec.kind, node, x, weight, bias, float(spec.eps if eps is None else eps), spec.weight_offset)


# op -> function building the Prologue (None: not fusable); new prologue ops register here
PROLOGUES: dict[Any, Callable[[fx.Node, fx.GraphModule], Prologue | None]] = {
    F.rms_norm: norm_prologue,
    F.layer_norm: norm_prologue,
}


# ---------------------------------------------------------------------------------------------
# Groups
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class EpilogueStep:
    node: fx.Node
    op: str
    operands: list[Any]  # fx.Node (region value or external) or a Python number


@dataclasses.dataclass
class FusionGroup:
    anchors: list[Anchor]
    prologue: Prologue | None
    steps: list[EpilogueStep]
    externals: list[tuple[fx.Node, str]]  # (node, "full" | "row")
    sink: fx.Node
    # the anchors are side by side (q, k, v): one kernel, one output per anchor, no epilogue
    side_by_side: bool = False

    @property
    def nodes(self) -> list[fx.Node]:
        """Every node the kernel replaces (the norm included when fused)."""
        found = [a.node for a in self.anchors] + [s.node for s in self.steps]
        found += [n for a in self.anchors if a.outliers is not None for n in (a.outliers, a.outlier_add)]
        return found + ([self.prologue.node] if self.prologue else [])

    @property
    def fused_ops(self) -> list[str]:
        ops = [self.prologue.kind + "_norm"] if self.prologue else []
        a = self.anchors[0]
        ops += [f"quantize_{a.act}"] if a.act and a.prequant_scale is None else []  # else rotate_quantize did
        ops += [a.op for a in self.anchors]
        ops += ["bias"] * sum(a.bias is not None for a in self.anchors)
        ops += ["spqr_outliers"] * sum(a.outliers is not None for a in self.anchors)
        return ops + [s.op for s in self.steps]

    @property
    def layer(self) -> str:
        module = ir.get(self.anchors[0].node, ir.MODULE)
        return module.fqn if module is not None else self.anchors[0].node.name


@dataclasses.dataclass
class Partition:
    groups: list[FusionGroup]
    rejected: dict[str, str]  # anchor node name -> reason it is not in a group


def _shape(node: Any) -> list[str] | None:
    value = _dynamo_adapter.example_value(node) if isinstance(node, fx.Node) else None
    return None if value is None else [str(d) for d in value.shape]  # str: symbolic sizes compare


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    """Producer -> user edges between fx nodes."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        for user in node.users:
            g.add_edge(node, user)
    return g


def find_groups(gm: fx.GraphModule, eligible: Callable[[fx.Node], str | None] = lambda n: None,
                side_by_side: bool = True) -> Partition:
    """Partition the low-bit ops of ``gm`` into fusion groups.

    ``eligible(anchor_node)`` returns a reason to leave an anchor out (None: take it).
    ``side_by_side``: merge lone anchors reading one input (q, k, v) into one group.
    """
    g = to_networkx(gm.graph)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    claimed: set[fx.Node] = set()
    groups, rejected = [], {}
    anchors = {n: ANCHORS[n.target](n, gm) for n in gm.graph.nodes if n.op == "call_function" and n.target in ANCHORS}
    for node, anchor in anchors.items():
        if node in claimed:
            continue
        reason = eligible(node)
        if reason is not None:
            rejected[node.name] = reason
            continue
        group = _grow(anchor, anchors, claimed, g, order, eligible)
        claimed.update(group.nodes)
        groups.append(group)
    if side_by_side:
        groups = _merge_side_by_side(groups)
    _attach_prologues(groups, gm)
    return Partition(groups, rejected)


def _grow(anchor: Anchor, anchors: dict[fx.Node, Anchor], claimed: set[fx.Node], g: nx.DiGraph,
          order: dict[fx.Node, int], eligible: Callable) -> FusionGroup:
    out_shape = _shape(anchor.node)
    n = str(anchor.out_features)
    region: list[fx.Node] = [anchor.node]
    members = [anchor]
    side = _outlier_side(anchor)
    if side is not None:  # SpQR's outliers: a sparse side-read in the kernel, the add its result
        anchor.outliers, anchor.outlier_add = side
        region += list(side)
    steps: list[EpilogueStep] = []
    externals: dict[fx.Node, str] = {}

    def depends_on_region(node: fx.Node) -> bool:
        return any(nx.has_path(g, r, node) for r in region)

    def sibling(node: fx.Node) -> Anchor | None:
        """A second anchor with the same input, format and shape, used only by this op."""
        other = anchors.get(node)
        if (other is None or other in members or node in claimed or len(members) > 1 or len(node.users) != 1
                or eligible(node) is not None or members[0].outliers is not None):
            return None
        a = members[0]
        # same input, format and shape; quantized activations: per token (one scale for both)
        same = (other.x is a.x and other.fmt == a.fmt and other.in_features == a.in_features
                and other.prequant_scale is a.prequant_scale
                and other.out_features == a.out_features and other.act == a.act
                and other.x_scale is None and a.x_scale is None
                and (other.bias is None) == (a.bias is None))
        return other if same and not depends_on_region(node) else None

    changed = True
    while changed:
        changed = False
        frontier = [u for r in region for u in r.users if u not in region and u not in claimed]
        for user in sorted(set(frontier), key=order.__getitem__):
            classified = _classify(user)
            if classified is None or _shape(user) != out_shape:
                continue
            op, operands = classified
            new_externals, new_members = {}, []
            ok = True
            for v in operands:
                if isinstance(v, bool) or not isinstance(v, (fx.Node, int, float)):
                    ok = False
                elif not isinstance(v, fx.Node) or v in region:
                    continue
                elif (s := sibling(v)) is not None:
                    new_members.append(s)
                elif depends_on_region(v) or not _is_float_tensor(v):
                    ok = False  # waits on the group itself, or integer/unknown semantics
                elif _shape(v) == out_shape:
                    new_externals[v] = "full"
                elif (sv := _shape(v)) and sv[-1] == n and _numel(v) == anchor.out_features:
                    new_externals[v] = "row"  # [N], [1, 1, N]: broadcast over rows
                else:
                    ok = False
            if not ok:
                continue
            for s in new_members:
                members.append(s)
                region.append(s.node)
            externals.update(new_externals)
            region.append(user)
            steps.append(EpilogueStep(user, op, operands))
            changed = True
            break  # the frontier changed: recompute it
    # trim until one node's value is used outside the group: that node is the output
    while True:
        outputs = [r for r in region if any(u not in region for u in r.users) or not r.users]
        if len(outputs) <= 1 or not steps:
            break
        last = steps.pop()
        region.remove(last.node)
        for v in last.operands:
            if isinstance(v, fx.Node) and v in anchors and v is not anchor.node and anchors[v] in members:
                members.remove(anchors[v])
                region.remove(v)
    used = {v for s in steps for v in s.operands if isinstance(v, fx.Node)}
    sink = steps[-1].node if steps else (anchor.outlier_add if anchor.outliers is not None else anchor.node)
    return FusionGroup(members, None, steps, [(e, k) for e, k in externals.items() if e in used], sink)


def _merge_side_by_side(groups: list[FusionGroup]) -> list[FusionGroup]:
    """Groups of one anchor and nothing else (no epilogue, no outliers) that read the same input
    with the same format, K, activation scheme and bias presence become one group: the kernel
    runs them side by side (each column tile belongs to one weight), so one launch reads x, and
    computes a fused norm's statistics, once. q/k/v of an attention block (k/v may be narrower)."""
    def key(group: FusionGroup):
        a = group.anchors[0]
        if len(group.anchors) > 1 or group.steps or a.outliers is not None or a.x_scale is not None:
            return None
        # pre-quantized codes (rotate_quantize, shared by FlatQuant's q/k/v): one row scale for all
        return (a.x, a.fmt, a.in_features, a.act, a.bias is None, a.prequant_scale)

    merged: dict[Any, FusionGroup] = {}
    out = []
    for group in groups:
        k = key(group)
        if k is None:
            out.append(group)
        elif k in merged:
            merged[k].anchors.append(group.anchors[0])
        else:
            merged[k] = FusionGroup([group.anchors[0]], None, [], [], group.sink, side_by_side=True)
            out.append(merged[k])
    for group in out:
        if group.side_by_side and len(group.anchors) == 1:
            group.side_by_side = False
    return out


def _outlier_side(anchor: Anchor) -> tuple[fx.Node, fx.Node] | None:
    """(sparse_linear, add) when the anchor's only user adds SpQR's outliers of the same input
    (``add(anchor, lowbit::sparse_linear(x, rows, cols, values, N))``, weight-only, frozen COO
    tensors), else None."""
    users = list(anchor.node.users)
    if anchor.act is not None or len(users) != 1:
        return None
    add = users[0]
    if _classify(add) is None or _classify(add)[0] != "add":
        return None
    (other,) = [a for a in add.args if a is not anchor.node] or [None]
    if not (isinstance(other, fx.Node) and other.op == "call_function"
            and other.target is torch.ops.lowbit.sparse_linear.default and len(other.users) == 1):
        return None
    x, rows, cols, values, n = other.args
    if x is not anchor.x or n != anchor.out_features or any(t.op != "get_attr" for t in (rows, cols, values)):
        return None
    return other, add


def _is_float_tensor(node: fx.Node) -> bool:
    value = _dynamo_adapter.example_value(node)
    return value is not None and value.dtype.is_floating_point


def _numel(node: fx.Node) -> int | None:
    value = _dynamo_adapter.example_value(node)
    try:
        return int(value.numel())
    except (TypeError, ValueError, AttributeError):
        return None


def _attach_prologues(groups: list[FusionGroup], gm: fx.GraphModule) -> None:
    """Fuse a norm into every group it feeds, when all of the norm's users are grouped anchors."""
    anchor_users: dict[fx.Node, list[FusionGroup]] = {}
    for group in groups:
        x = group.anchors[0].x
        # every anchor reads x, and so does an absorbed SpQR side-read
        uses = len(group.anchors) + sum(a.outliers is not None for a in group.anchors)
        anchor_users.setdefault(x, []).extend([group] * uses)
    for x, users in anchor_users.items():
        if x.op != "call_function" or x.target not in PROLOGUES or len(users) != len(x.users):
            continue
        prologue = PROLOGUES[x.target](x, gm)
        if prologue is None:
            continue
        for group in users:
            group.prologue = prologue


def decoder_layer_of(group: FusionGroup) -> str | None:
    """The repeated block a group belongs to (``model.layers.3``), from its layer FQN."""
    m = re.match(r"(.*?\.\d+)\.", group.layer + ".")
    return m.group(1) if m else None
