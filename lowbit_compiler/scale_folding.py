"""Per-channel input scales folded into the producer, found from the graph (AWQ, SmoothQuant).

``y = W x`` is unchanged when the columns of ``W`` are multiplied by ``s`` and ``x`` is divided by
``s`` -- if the division can be folded into whatever produced ``x``. :func:`scale_groups` reads a
canonical graph and finds, for every set of linears reading the same input, that producer:

* a norm (RMSNorm / LayerNorm with a weight): divide its weight (and bias) by ``s``;
* a linear whose output is used only here: divide its rows (and bias) by ``s``;
* the ``up`` side of a gated product ``act(gate) * up``: divide ``up``'s rows;
* attention's output, through the layout ops after SDPA, back to the value projection, when
  queries and values have as many heads (with grouped KV heads one value channel feeds several
  output channels, which would need equal scales; refused);

and says why it refuses the others (a norm whose output also feeds the residual stream, as in
BERT's post-norm blocks; a non-linear op; a weight tied to another module; Gemma's ``1 + w``).
No module names are used.

:func:`awq_scales` searches AWQ's scale ``s = mean|x|^alpha`` (normalised) over a grid of alpha,
scoring each by the layer-output error ``tr(dW H dW^T)`` with the input Hessian ``H`` (no stored
activations needed); :func:`fold_in_graph` computes the folded tensors of a group and
:func:`apply_tensors` puts them into the graph module (never the user's model: the offline flow
writes them back).
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from lowbit_compiler import ir
from lowbit_compiler.formats import WeightFormat, dequantize, quantize

LAYOUT_OPS = {"view", "reshape", "transpose", "contiguous", "permute", torch.reshape, torch.transpose}


@dataclasses.dataclass
class ScaleGroup:
    """Linears reading one input, and where a per-channel scale of that input can be folded."""

    consumers: list[str]
    producer: tuple[str, ...] | None  # ("norm", weight_fqn, bias_fqn or "") | ("linear", layer_fqn)
    reason: str | None = None          # why there is no producer
    nodes: list[fx.Node] = dataclasses.field(default_factory=list)  # the consumer linears
    producer_node: fx.Node | None = None  # the norm or linear whose output is divided by s


def _linear_layer(node: Any) -> str | None:
    if isinstance(node, fx.Node) and ir.is_linear(node):
        parts = ir.linear_parts(node)
        if parts.weight_node is not None:
            return ir.layer_name(node, parts.weight_node.target)
    return None


def _through_layout(node: Any, exclusive: bool = True) -> Any:
    """Down through head-layout ops (view, transpose, ...) to the node that produced the data;
    ``exclusive``: only through layout nodes with a single user."""
    while (isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.target in LAYOUT_OPS
           and (not exclusive or len(node.users) == 1)):
        node = node.args[0]
    return node


def sdpa_new_values(value: Any, exclusive: bool = True) -> Any:
    """The node that produced an attention's (new) values: below the head-layout ops and, with a
    KV cache (``torch.cat`` of past and new values), its last piece. Shared by the scale folding
    (exclusive chains only: it rescales the values) and the rotation analysis (R2)."""
    v = _through_layout(value, exclusive)
    if isinstance(v, fx.Node) and v.target is torch.cat:
        v = _through_layout(v.args[0][-1], exclusive)
    return v


def _producer_node(x: fx.Node, consumers: set[fx.Node]) -> tuple[tuple[str, ...] | None, str | None, fx.Node | None]:
    if set(x.users) - consumers:
        users = ", ".join(sorted(u.name for u in set(x.users) - consumers))
        return None, f"the input {x.name} is also used by {users} (e.g. the residual stream)", None
    if x.target is operator.getitem and _keeps_channels(x):
        return _producer_node(x.args[0], {x})  # row selection (generate() keeps the last position): see through
    if x.target in (F.rms_norm, F.layer_norm):
        spec = ir.get(x, ir.NORM)
        weight = x.args[2] if len(x.args) > 2 else x.kwargs.get("weight")
        bias = (x.args[3] if len(x.args) > 3 else x.kwargs.get("bias")) if x.target is F.layer_norm else None
        if spec is not None and spec.weight_offset:
            return None, "the norm scales by (1 + w): fold the offset first", None
        if ir.param_fqn(weight) is None:
            return None, f"norm {x.name} has no weight parameter", None
        return ("norm", ir.param_fqn(weight), ir.param_fqn(bias) or ""), None, x
    if (layer := _linear_layer(x)) is not None:
        return ("linear", layer), None, x
    if x.target in (operator.mul, torch.mul, "mul") and len(x.args) == 2:
        for side in x.args:
            if (layer := _linear_layer(side)) is not None and len(side.users) == 1:
                return ("linear", layer), None, side  # act(gate) * up: scale up's rows
    src = _through_layout(x)
    if isinstance(src, fx.Node) and src.target is F.scaled_dot_product_attention and len(src.users) == 1:
        q, v = src.args[0], src.args[2] if len(src.args) > 2 else src.kwargs.get("value")
        qv, vv = q.meta.get("example_value"), v.meta.get("example_value")
        if qv is None or vv is None or qv.shape[1] != vv.shape[1]:
            return None, "grouped KV heads: one value channel feeds several output channels", None
        v = sdpa_new_values(v)
        if (layer := _linear_layer(v)) is not None:
            return ("linear", layer), None, v
        return None, "attention values do not come straight from a linear", None
    return None, f"the input comes from {getattr(x.target, '__name__', x.target)}: no scale can be folded into it", None


def _keeps_channels(node: fx.Node) -> bool:
    """A getitem that selects rows but keeps the last (channel) dimension whole."""
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    whole_last = isinstance(index[-1], slice) and index[-1] == slice(None) and Ellipsis not in index[:-1]
    src, out = node.args[0].meta.get("example_value"), node.meta.get("example_value")
    return (whole_last and src is not None and out is not None and src.dim() == out.dim() == len(index)
            and src.shape[-1] == out.shape[-1])


def scale_groups(gm: fx.GraphModule) -> list[ScaleGroup]:
    """Every set of parameter linears sharing an input, with its producer (canonical graph)."""
    by_input: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if _linear_layer(node) is not None:
            by_input.setdefault(node.args[0], []).append(node)
    groups = []
    for x, linears in by_input.items():
        producer, reason, node = _producer_node(x, set(linears))
        shared = [n for n in linears if len(ir.linear_parts(n).weight_node.users) > 1]
        if producer is not None and shared:  # a head tied to the embedding: scaling it would scale both
            producer, reason, node = None, f"weight of {_linear_layer(shared[0])} is shared with another op (tied)", None
        if producer is not None and producer[0] == "linear" and len(ir.linear_parts(node).weight_node.users) > 1:
            producer, reason, node = None, f"weight of the producer {producer[1]} is shared with another op (tied)", None
        groups.append(ScaleGroup([_linear_layer(n) for n in linears], producer, reason, list(linears), node))
    return groups


def fold_in_graph(gm: fx.GraphModule, group: ScaleGroup, s: torch.Tensor) -> dict[str, torch.Tensor]:
    """The new tensors of a fold (consumers' input columns times ``s``, the producer's output
    divided by ``s``), computed in each tensor's dtype from the graph module's current tensors;
    ``{fqn: tensor}``, to apply with :func:`apply_tensors`."""
    out: dict[str, torch.Tensor] = {}
    for node in group.nodes:
        parts = ir.linear_parts(node)
        w = ir.fetch_attr(gm, parts.weight_node.target).detach()
        out[parts.weight_node.target] = w * (s.to(w.dtype)[:, None] if parts.transposed else s.to(w.dtype)[None, :])
    kind = group.producer[0]
    p = group.producer_node
    if kind == "norm":
        fqns = [f for f in group.producer[1:] if f]
        for fqn in fqns:
            t = ir.fetch_attr(gm, fqn).detach()
            out[fqn] = t / s.to(t.dtype)
    else:
        parts = ir.linear_parts(p)
        w = ir.fetch_attr(gm, parts.weight_node.target).detach()
        out[parts.weight_node.target] = w / (s.to(w.dtype)[None, :] if parts.transposed else s.to(w.dtype)[:, None])
        if ir.param_fqn(parts.bias) is not None:
            b = ir.fetch_attr(gm, parts.bias.target).detach()
            out[parts.bias.target] = b / s.to(b.dtype)
    return out


def apply_tensors(gm: fx.GraphModule, tensors: dict[str, torch.Tensor]) -> None:
    for fqn, t in tensors.items():
        if not ir.replace_attr(gm, fqn, t):
            raise RuntimeError(f"scale folding: no tensor {fqn} in the graph module")


def awq_scales(weights: list[torch.Tensor], hessian: torch.Tensor, mean_abs: torch.Tensor, fmt: WeightFormat,
               grid: int = 20) -> tuple[torch.Tensor, float, float]:
    """(s, alpha, relative error) minimising sum_i tr(dW_i H dW_i^T) over alpha in [0, 1]."""
    W = torch.cat([w.detach().float() for w in weights])
    H = hessian.float()
    m = mean_abs.float().clamp(min=1e-5)
    best = (torch.ones_like(m), 0.0, float("inf"))
    base = None
    for i in range(grid + 1):
        alpha = i / grid
        s = m ** alpha
        s = s / (s.max() * s.min()).sqrt()
        dW = W - dequantize(quantize(W * s, fmt)) / s
        err = float(((dW @ H) * dW).sum())
        base = err if base is None else base
        if err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], best[2] / max(base, 1e-30)


def smoothquant_scales(x_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's migration: ``s_j = max|x_j|^alpha / max_i |W_ij|^(1 - alpha)`` over the linears
    sharing the input (dividing x by s flattens activation outlier channels into the weights)."""
    w_max = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0).clamp(min=1e-5)
    return (x_absmax.float().clamp(min=1e-5) ** alpha / w_max ** (1 - alpha)).clamp(min=1e-5)
