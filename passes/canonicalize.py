"""canonicalize: one spelling per op, so later passes match one pattern, not ten.

Where it runs: first in every recipe that rewrites anything (it ``ensures`` "canonical").

What it rewrites (each rule one line in ``RULES``):

* GPT-2 Conv1D ``addmm(b, x, W)`` with W a parameter stored [in, out]   -> ``linear(x, W.t(), b)``
  (and ``addmm(b, x, W.T)``                                              -> ``linear(x, W, b)``)
* ``matmul(x, W.t())`` / ``x @ W.T`` / ``mm`` with W a 2-D parameter, the transpose in any
  spelling (``.t()``, ``.T``, ``.mT``, ``transpose(0, 1)``, ``permute(1, 0)``)  -> ``linear(x, W)``
* ``x @ W`` with W a 2-D parameter stored [in, out]                      -> ``linear(x, W.t())``
* ``linear(x, W) + b`` with b a 1-D parameter (Falcon)                   -> ``linear(x, W, b)``
* ``view(linear(view(x, (-1, K)), W, b), x.shape[:-1] + (N,))`` (Conv1D's flattening)
                                                                         -> ``linear(x, W, b)``
* eval-mode ``dropout(x, p, training=False)``                            -> ``x``
* RMSNorm written out (``x * rsqrt(mean(x**2, -1) + eps)``, with the optional fp32 round trip and
  weight multiply, Gemma's ``(1 + w)`` and T5's upcast inside the mean included)
                                                                         -> ``F.rms_norm(x, [H], w, eps)``

What it only annotates: ``F.layer_norm`` and ``F.rms_norm`` nodes get an ``ir.NORM`` spec. Attention
is already one ``scaled_dot_product_attention`` node in every Hugging Face model captured with the
default ``attn_implementation="sdpa"``; the pass counts SDPA nodes and reports eager attention
(``softmax`` between two matmuls) as not recognised, rather than rewriting it.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from lowbit_compiler import ir
from lowbit_compiler.pass_base import Pass, PassContext, PassResult, PatternRule, apply_rules, register_pass


def _is_call(node: Any, *targets: Any) -> bool:
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.target in targets


def _is_param(node: Any) -> bool:
    return ir.param_fqn(node) is not None


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _param_2d(node: Any) -> bool:
    return _is_param(node) and ir.fetch_attr(node.graph.owning_module, node.target).dim() == 2


def _transposed_param(node: Any) -> fx.Node | None:
    """The 2-D parameter ``W`` when ``node`` is its transpose, in any spelling: ``W.t()``,
    ``torch.t(W)``, ``W.T`` / ``W.mT`` (``getattr``), ``W.transpose(0, 1)`` / ``(-1, -2)``,
    ``torch.transpose``, ``W.permute(1, 0)``."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return None
    t, args = node.target, node.args
    w = args[0] if args else None
    if not _param_2d(w):
        return None
    if t in (torch.t, "t"):
        return w
    if t is getattr and args[1:] in (("T",), ("mT",)):
        return w
    if t in (torch.transpose, "transpose") and len(args) == 3 and {args[1] % 2, args[2] % 2} == {0, 1}:
        return w
    if t in ("permute", torch.permute):
        dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        return w if tuple(d % 2 for d in dims) == (1, 0) else None
    return None


# ---- addmm(b, x, W) -> linear(x, W.t(), b)   (GPT-2 Conv1D stores W as [in, out]) -------------
# ---- addmm(b, x, W.T) -> linear(x, W, b)
def conv1d_addmm_pattern(node: fx.Node) -> dict | None:
    if _is_call(node, torch.addmm) and len(node.args) == 3 and not node.kwargs:
        bias, x, w = node.args
        if _param_2d(w):
            return {"bias": bias, "x": x, "w": w, "stored": "in_out"}
        if _transposed_param(w) is not None:
            return {"bias": bias, "x": x, "w": _transposed_param(w), "stored": "out_in"}
    return None


def conv1d_addmm_replacement(gm: fx.GraphModule, node: fx.Node, m: dict) -> fx.Node:
    w = gm.graph.call_function(torch.t, (m["w"],)) if m["stored"] == "in_out" else m["w"]
    return gm.graph.call_function(F.linear, (m["x"], w, m["bias"]))


# ---- matmul(x, W.t()) / x @ W.T / mm -> linear(x, W);  x @ W (W stored [in, out]) -> linear(x, W.t())
def matmul_transposed_pattern(node: fx.Node) -> dict | None:
    if _is_call(node, torch.matmul, operator.matmul, torch.mm, "matmul", "mm") and len(node.args) == 2:
        x, wt = node.args
        if _transposed_param(wt) is not None:
            return {"x": x, "w": _transposed_param(wt), "stored": "out_in"}
        if _param_2d(wt) and not _is_param(x):
            return {"x": x, "w": wt, "stored": "in_out"}
    return None


def matmul_transposed_replacement(gm: fx.GraphModule, node: fx.Node, m: dict) -> fx.Node:
    w = gm.graph.call_function(torch.t, (m["w"],)) if m["stored"] == "in_out" else m["w"]
    return gm.graph.call_function(F.linear, (m["x"], w))


# ---- linear(x, W) + b (Falcon's ``input @ W.T + bias``) -> linear(x, W, b) --------------------
def linear_bias_add_pattern(node: fx.Node) -> dict | None:
    if not (_is_call(node, operator.add, torch.add, "add") and len(node.args) == 2 and not node.kwargs):
        return None
    for lin, bias in (node.args, node.args[::-1]):
        if (_is_call(lin, F.linear) and len(lin.users) == 1 and _arg(lin, 2, "bias") is None and _is_param(bias)
                and ir.fetch_attr(bias.graph.owning_module, bias.target).dim() == 1):
            out = _shape(lin)
            n = ir.fetch_attr(bias.graph.owning_module, bias.target).shape[0]
            if out is not None and out[-1] == str(n):
                return {"linear": lin, "bias": bias}
    return None


def linear_bias_add_replacement(gm: fx.GraphModule, node: fx.Node, m: dict) -> fx.Node:
    lin = m["linear"]
    x, w = lin.args[0], _arg(lin, 1, "weight")
    out = gm.graph.call_function(F.linear, (x, w, m["bias"]))
    out.meta.update({k: v for k, v in lin.meta.items() if k != "example_value"})
    out.meta["example_value"] = node.meta.get("example_value")
    return out


# ---- view(linear(view(x, (-1, K)), W, b), (*batch, N)) -> linear(x, W, b) -------------------
def _shape(node: Any) -> list[str] | None:
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return None if value is None else [str(d) for d in value.shape]  # str: symbolic sizes compare too


def flattened_linear_pattern(node: fx.Node) -> dict | None:
    if not (_is_call(node, "view", "reshape", torch.reshape) and _is_call(node.args[0], F.linear)):
        return None
    linear = node.args[0]
    flat = linear.args[0]
    if len(linear.users) != 1 or not _is_call(flat, "view", "reshape", torch.reshape):
        return None
    x = flat.args[0]
    xs, outs, ys = _shape(x), _shape(node), _shape(linear)
    if xs is None or outs is None or ys is None or len(xs) < 2 or xs[:-1] != outs[:-1] or outs[-1] != ys[-1]:
        return None
    return {"x": x, "linear": linear}


def flattened_linear_replacement(gm: fx.GraphModule, node: fx.Node, m: dict) -> fx.Node:
    linear = m["linear"]
    out = gm.graph.call_function(F.linear, (m["x"], *linear.args[1:]), dict(linear.kwargs))
    out.meta.update({k: v for k, v in linear.meta.items() if k != "example_value"})
    out.meta["example_value"] = node.meta.get("example_value")
    return out


# ---- dropout(x, p, training=False) -> x ------------------------------------------------------
def eval_dropout_pattern(node: fx.Node) -> dict | None:
    if _is_call(node, F.dropout) and _arg(node, 2, "training", True) is False:
        return {"x": node.args[0]}
    return None


def eval_dropout_replacement(gm: fx.GraphModule, node: fx.Node, m: dict) -> fx.Node:
    return m["x"]


# ---- RMSNorm written out -> F.rms_norm ---------------------------------------------------------
def _strip_float_cast(node: Any) -> Any:
    """``x.to(torch.float32)`` / ``x.float()`` -> x (the norm's input before the upcast)."""
    if _is_call(node, "float") or (_is_call(node, "to") and torch.float32 in node.args[1:]):
        return node.args[0]
    return node


def _sole_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def rms_norm_pattern(node: fx.Node) -> dict | None:
    # anchor: mul(a, rsqrt(add(mean(pow(a, 2), -1, keepdim=True), eps)))
    if not _is_call(node, operator.mul, torch.mul, "mul") or len(node.args) != 2:
        return None
    a, r = node.args
    if _is_call(a, torch.rsqrt):
        a, r = r, a
    if not _is_call(r, torch.rsqrt):
        return None
    add = r.args[0]
    if not (_is_call(add, operator.add, torch.add, "add") and isinstance(add.args[1], float)):
        return None
    mean, eps = add.args
    if not (_is_call(mean, "mean", torch.mean) and _arg(mean, 1, "dim") in (-1, (-1,), [-1])
            and mean.kwargs.get("keepdim", _arg(mean, 2, "keepdim", False))):
        return None
    pow_ = mean.args[0]
    # the square is of the same input, upcast or not: Llama upcasts x once (a = x.float()), T5's
    # T5LayerNorm upcasts only inside the mean (x * rsqrt(mean(x.to(float32) ** 2) + eps))
    if not (_is_call(pow_, "pow", torch.pow, operator.pow) and pow_.args[1] == 2
            and _strip_float_cast(pow_.args[0]) is _strip_float_cast(a)):
        return None
    # optional cast back to the input dtype, then the weight multiply
    out, weight, offset = node, None, 0.0
    user = _sole_user(out)
    if _is_call(user, "to", "type_as"):
        out, user = user, _sole_user(user)
    if _is_call(user, operator.mul, torch.mul, "mul") and len(user.args) == 2:
        other = user.args[0] if user.args[1] is out else user.args[1]
        if _is_param(other):
            weight, out = other, user
        elif (_is_call(other, operator.add) and other.args[0] == 1.0
              and _is_param(_strip_float_cast(other.args[1]))):
            weight, offset, out = other, 1.0, user  # Gemma: (1 + w)
    return {"x": _strip_float_cast(a), "eps": eps, "weight": weight, "offset": offset, "out": out}


def rms_norm_extra_check(m: dict) -> bool:
    return isinstance(m["x"], fx.Node)


def rms_norm_replacement(gm: fx.GraphModule, node: fx.Node, m: dict) -> fx.Node:
    x = m["x"]
    value = x.meta.get("example_value")
    hidden = value.shape[-1] if value is not None else None
    if m["weight"] is not None:
        w = m["weight"] if m["offset"] == 0.0 else m["weight"].args[1]
        hidden = ir.fetch_attr(gm, _strip_float_cast(w).target).shape[-1]
    if m["offset"]:  # Gemma computes (1 + w.float()) after the anchor: move it before the norm
        add = m["weight"]
        for dep in (add.args[1], add):
            if isinstance(dep, fx.Node) and dep.op != "get_attr":
                node.prepend(dep)
    norm = gm.graph.call_function(F.rms_norm, (x, [hidden], m["weight"], m["eps"]))
    ir.put(norm, ir.NORM, ir.NormSpec("rms", float(m["eps"]), m["offset"]))
    norm.meta["example_value"] = m["out"].meta.get("example_value")
    if m["out"] is not node:
        # the anchor is the inner mul; redirect the outermost node of the norm instead
        m["out"].replace_all_uses_with(norm)
    return norm


RULES = [
    PatternRule("conv1d_addmm_to_linear", conv1d_addmm_pattern, conv1d_addmm_replacement),  # addmm(b,x,W) -> linear(x,W.t(),b)
    PatternRule("matmul_transposed_to_linear", matmul_transposed_pattern, matmul_transposed_replacement),  # x@W.t() -> linear(x,W)
    PatternRule("flattened_linear", flattened_linear_pattern, flattened_linear_replacement),  # view(linear(view(x))) -> linear(x)
    PatternRule("linear_bias_add", linear_bias_add_pattern, linear_bias_add_replacement),  # linear(x,W) + b -> linear(x,W,b)
    PatternRule("eval_dropout", eval_dropout_pattern, eval_dropout_replacement),  # dropout(x, training=False) -> x
    PatternRule("rms_norm", rms_norm_pattern, rms_norm_replacement, rms_norm_extra_check),  # x*rsqrt(mean(x^2)+eps)*w -> rms_norm
]


def _annotate_layer_norms(gm: fx.GraphModule) -> int:
    count = 0
    for node in gm.graph.nodes:
        if _is_call(node, F.layer_norm) and ir.get(node, ir.NORM) is None:
            eps = _arg(node, 4, "eps", 1e-5)
            ir.put(node, ir.NORM, ir.NormSpec("layer", float(eps)))
            count += 1
        elif _is_call(node, F.rms_norm) and ir.get(node, ir.NORM) is None:  # called directly
            eps = _arg(node, 3, "eps", None)
            ir.put(node, ir.NORM, ir.NormSpec("rms", float(eps if eps is not None else torch.finfo(torch.float32).eps)))
            count += 1
    return count


def _eager_attention_nodes(gm: fx.GraphModule) -> list[str]:
    """Softmax nodes that look like eager attention (left alone, reported)."""
    found = []
    for node in gm.graph.nodes:
        if _is_call(node, F.softmax, torch.softmax, "softmax"):
            src = node.args[0]
            while _is_call(src, operator.add, operator.truediv, operator.mul, "add", "div", "mul"):
                src = src.args[0]
            if _is_call(src, torch.matmul, operator.matmul):
                found.append(node.name)
    return found


@register_pass
class Canonicalize(Pass):
    name = "canonicalize"
    ensures = ("canonical",)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        counts = apply_rules(gm, RULES)
        layer_norms = _annotate_layer_norms(gm)
        sdpa = sum(_is_call(n, F.scaled_dot_product_attention) for n in gm.graph.nodes)
        eager_attention = _eager_attention_nodes(gm)
        for name in eager_attention:
            ctx.fallback(f"canonicalize: node {name}",
                         "eager attention (softmax between matmuls) is not rewritten to SDPA; "
                         "load the model with attn_implementation='sdpa'")
        details: dict[str, Any] = dict(counts)
        details.update(layer_norm=layer_norms, sdpa=sdpa, linear=sum(ir.is_linear(n) for n in gm.graph.nodes))
        return PassResult(modified=sum(counts.values()) > 0, matches=sum(counts.values()) + layer_norms,
                          details=details)
