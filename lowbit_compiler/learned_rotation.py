"""Learned rotations (SpinQuant): R1 and R2 optimised on the Stiefel manifold by Cayley SGD so the
*quantized* model's outputs stay close to the float model's on calibration data.

How it works (``passes/rotate.py``'s ``spinquant`` pass drives it):

1. The fixed ``rotate`` rewrite runs first with its starting rotation (a random Hadamard): norms
   folded, heads untied, R4 Hadamards inserted. The graph computes exactly what the float model
   computes.
2. On that graph an extra ``R1'`` (d x d) and ``R2'`` (head_dim x head_dim) start at the identity.
   :func:`learn` runs a *student* forward of the graph (an ``fx.Interpreter``) whose rotated
   weights are :func:`rotation.plan_weights` of ``R1'``/``R2'`` -- differentiable -- and whose
   selected linears fake-quantize their weight (the recipe's format, round to nearest) and their
   input (the recipe's per-token activation format). Gradients pass the rounding straight through
   but follow the scale: the error is ``scale * residual`` with the residual held, so a rotation
   that shrinks a token's or a group's absmax is seen to shrink its error (plain straight-through
   gradients made the loss rise: the float path is rotation-invariant). The loss is the error of
   the model's outputs (not its KV cache) relative to the float graph, ``sum ||y_q - y||^2 /
   sum ||y||^2`` over the calibration inputs (the linear form of the logit SQNR).
3. Each step takes the Riemannian gradient ``A = G Q^T - Q G^T`` (skew-symmetric), normalised, into
   a momentum buffer, and moves along the Cayley curve ``Q(t) = (I + t/2 A)^-1 (I - t/2 A) Q``,
   which stays exactly orthogonal; ``t`` follows a cosine decay from ``lr``. The rotation with the
   lowest loss seen is kept (the start included), so the calibration loss never ends above the
   random Hadamard's; the history is reported.
4. The result ``R1 = H R1'`` (``R2 = H R2'``) is written into the weights exactly like a fixed one.

Cost: one student forward + backward per step, and the weight plan (a d x d matmul with every
stream weight) per step: seconds for the tiny models of the tests, minutes for the byte Llama on
2 CPU cores (SpinQuant trains a 7B model the same way, on a GPU). Static activation scales are not
known yet when the rotation is learned: a ``*_static`` recipe is trained with per-token scales.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from lowbit_compiler import ir, rotation
from lowbit_compiler.formats import WeightFormat, dequantize, quantize
from lowbit_compiler.ops import ACTIVATION_MAX

log = logging.getLogger("lowbit_compiler")


@dataclasses.dataclass(frozen=True)
class QuantSite:
    """What the later passes will do to one linear: its weight format and activation format."""

    layer: str
    weight: WeightFormat | None
    act: str | None  # "int8" | "int4" | "fp8_e4m3" | None


def quant_sites(gm: fx.GraphModule, recipe: Any) -> dict[fx.Node, QuantSite]:
    """The linears ``insert_weight_quant`` will quantize, with the recipe's formats."""
    from lowbit_compiler.recipe import ACTIVATIONS

    if recipe is None or recipe.weight is None:
        return {}
    act = ACTIVATIONS[recipe.activation][0] if recipe.activation else None
    sites = {}
    for node in gm.graph.nodes:
        if not ir.is_linear(node):
            continue
        parts = ir.linear_parts(node)
        if parts.weight_node is None:
            continue
        layer = ir.layer_name(node, parts.weight_node.target)
        if recipe.applies_to(layer):
            sites[node] = QuantSite(layer, recipe.weight, act)
    return sites


def fake_quant_weight(w: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """Round-to-nearest in ``fmt`` forward. Backward: the rounding residual ``r`` is held fixed and
    the error ``s * r`` follows the group scale ``s`` (symmetric integer formats), so a rotation that
    shrinks a group's absmax is seen to shrink its error; other formats pass the gradient straight
    through."""
    q = dequantize(quantize(w.detach(), fmt)).to(w.dtype)
    if not (fmt.kind == "int" and fmt.symmetric and fmt.bits < 8 and w.shape[-1] % fmt.group_size == 0):
        return w + (q - w).detach()
    g = fmt.group_size
    wg = w.reshape(w.shape[0], -1, g)
    scale = wg.abs().amax(-1, keepdim=True) / (2 ** (fmt.bits - 1) - 0.5)
    residual = ((q.reshape(wg.shape) - wg) / scale.clamp(min=1e-12)).detach()
    return (wg + scale * residual).reshape(w.shape)


def fake_quant_activation(x: torch.Tensor, act: str) -> torch.Tensor:
    """Per-token symmetric quantization forward (``lowbit::qa_linear``'s). Backward as for the
    weights: the error is ``scale * residual`` with the per-token scale (absmax / top) differentiable."""
    top = ACTIVATION_MAX[act]
    scale = x.abs().amax(-1, keepdim=True) / top
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    xd, sd = x.detach(), scale.detach()
    if act == "fp8_e4m3":
        q = (xd / sd).clamp(-top, top).to(torch.float8_e4m3fn).to(x.dtype) * sd
    else:
        q = torch.round(xd / sd).clamp(-top, top) * sd
    return x + scale * ((q - xd) / sd).detach()


class _Student(fx.Interpreter):
    """The graph with some parameters replaced (``tensors``: FQN -> tensor) and fake quantization
    on the selected linears."""

    def __init__(self, gm: fx.GraphModule, tensors: dict[str, torch.Tensor], sites: dict[fx.Node, QuantSite]):
        super().__init__(gm)
        self.tensors, self.sites = tensors, sites

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "get_attr" and n.target in self.tensors:
            return self.tensors[n.target]
        site = self.sites.get(n)
        if site is None:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        args = list(args) + [None] * (3 - len(args))
        x, w, b = args[0], kwargs.get("weight", args[1]), kwargs.get("bias", args[2])
        if site.act is not None:
            x = fake_quant_activation(x, site.act)
        if site.weight is not None:
            w = fake_quant_weight(w, site.weight)
        return torch.nn.functional.linear(x, w, b)


def model_outputs(gm: fx.GraphModule) -> list[int]:
    """Positions (in the flattened graph output) of what the loss compares: the floating-point
    outputs that are not a KV cache (an output that also feeds an attention), e.g. the logits."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = pytree.tree_leaves(output.args[0])
    keep = []
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, fx.Node):
            continue
        value = leaf.meta.get("example_value")
        if value is None or not torch.is_floating_point(value):
            continue
        if any(u.target is torch.nn.functional.scaled_dot_product_attention for u in leaf.users):
            continue
        keep.append(i)
    if not keep:
        raise ValueError("the graph has no floating-point output besides its KV cache to measure the loss on")
    return keep


def _selected(out: Any, positions: list[int]) -> list[torch.Tensor]:
    leaves = pytree.tree_leaves(out)
    return [leaves[i] for i in positions]


def cayley(q: torch.Tensor, a: torch.Tensor, t: float) -> torch.Tensor:
    """``(I + t/2 A)^-1 (I - t/2 A) Q``: orthogonal for a skew-symmetric ``A`` and orthogonal ``Q``."""
    eye = torch.eye(q.shape[0], dtype=q.dtype)
    return torch.linalg.solve(eye + 0.5 * t * a, (eye - 0.5 * t * a) @ q)


@dataclasses.dataclass
class Learned:
    r1: torch.Tensor | None      # the extra rotation on top of the starting one (identity at step 0)
    r2: torch.Tensor | None
    losses: list[float]          # relative output error after each step (index 0: the start)
    evaluations: int
    best: float                  # the lowest loss seen; r1/r2 are the rotations that gave it


def learn(gm: fx.GraphModule, a: rotation.Analysis, inputs: Sequence[Sequence[Any]],
          sites: dict[fx.Node, QuantSite], *, steps: int = 20, lr: float = 0.05, momentum: float = 0.9,
          learn_r1: bool = True, learn_r2: bool = True) -> Learned:
    """Optimise ``R1'`` / ``R2'`` (see the module docstring) on the rotated graph ``gm``."""
    if not inputs:
        raise ValueError("learned rotations need calibration inputs")
    fetch = lambda fqn: ir.fetch_attr(gm, fqn)  # noqa: E731
    positions = model_outputs(gm)
    with torch.no_grad():
        targets = [[t.double() for t in _selected(gm(*args), positions)] for args in inputs]
    norm = sum(float(t.pow(2).sum()) for ts in targets for t in ts) or 1.0
    dims = {h.head_dim for h in a.heads}
    q1 = torch.eye(a.hidden, dtype=torch.float64) if learn_r1 and a.stream_ok else None
    q2 = torch.eye(dims.pop(), dtype=torch.float64) if learn_r2 and len(dims) == 1 else None
    evaluations = 0

    def loss_of(r1, r2, grad: bool):
        nonlocal evaluations
        evaluations += 1
        with torch.set_grad_enabled(grad):
            keep = a if r1 is not None else rotation.Analysis(hidden=a.hidden, heads=a.heads)
            plan = rotation.plan_weights(keep, fetch, r1, r2, fold_norms=False)
            student = _Student(gm, plan.tensors, sites)
            total = torch.zeros((), dtype=torch.float64)
            for args, ts in zip(inputs, targets):
                for y, t in zip(_selected(student.run(*args), positions), ts):
                    total = total + (y.double() - t).pow(2).sum()
            return total / norm

    params = [q for q in (q1, q2) if q is not None]
    if not params:
        return Learned(None, None, [], 0)
    for q in params:
        q.requires_grad_(True)
    loss = loss_of(q1, q2, grad=True)
    losses = [float(loss)]
    best = (float(loss), [q.detach() for q in params])
    moment = [torch.zeros_like(q) for q in params]
    for step in range(steps):
        grads = torch.autograd.grad(loss, params)
        skews = [g @ q.detach().T - q.detach() @ g.T for g, q in zip(grads, params)]
        scale = torch.sqrt(sum(s.pow(2).sum() for s in skews))
        if not torch.isfinite(scale) or scale == 0:
            break
        moment = [momentum * m + s / scale for m, s in zip(moment, skews)]
        t = lr * 0.5 * (1 + math.cos(math.pi * step / steps))  # cosine decay
        params = [cayley(q.detach(), m, t).requires_grad_(True) for q, m in zip(params, moment)]
        it = iter(params)
        q1 = next(it) if q1 is not None else None
        q2 = next(it) if q2 is not None else None
        loss = loss_of(q1, q2, grad=True)
        losses.append(float(loss))
        if float(loss) < best[0]:
            best = (float(loss), [q.detach() for q in params])
    it = iter(best[1])
    r1 = next(it) if q1 is not None else None
    r2 = next(it) if q2 is not None else None
    return Learned(r1, r2, losses, evaluations, best[0])


# ---------------------------------------------------------------------------------------------
# FlatQuant: per-layer affine transforms x -> x (P1 (x) P2), W -> W (P1 (x) P2)^-T
# ---------------------------------------------------------------------------------------------

def kron_split(k: int) -> tuple[int, int]:
    """``(a, b)``, ``a * b = k``, ``a <= b`` as close to sqrt(k) as k's divisors allow."""
    a = max(d for d in range(1, int(k ** 0.5) + 1) if k % d == 0)
    return a, k // a


def kron_rows(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``x @ (left (x) right)`` for rows of x (differentiable; ``lowbit::kron_transform``'s math)."""
    a, b = left.shape[0], right.shape[0]
    return (left.t() @ x.reshape(-1, a, b) @ right).reshape(x.shape)


@dataclasses.dataclass
class Affine:
    left: torch.Tensor    # P1 [a, a]
    right: torch.Tensor   # P2 [b, b]
    losses: list[float]   # relative output error of the group's quantized linears (index 0: identity)
    best: float


def learn_affine(x: torch.Tensor, weights: list[torch.Tensor], sites: list[QuantSite], *, steps: int = 100,
                 lr: float = 5e-3) -> Affine:
    """FlatQuant for one group of linears sharing the input rows ``x`` [rows, K]: Adam on ``P1``,
    ``P2`` (from the identity) minimising ``sum ||Q(x P) Q(W P^-T)^T - x W^T||^2 / ||x W^T||^2`` with
    the fake quantizers above. The best pair seen is returned (the identity if nothing beats it)."""
    k = x.shape[-1]
    a, b = kron_split(k)
    x = x.float()
    ws = [w.float() for w in weights]
    targets = [x @ w.t() for w in ws]
    norm = sum(float(t.pow(2).sum()) for t in targets) or 1.0
    p1 = torch.eye(a, requires_grad=True)
    p2 = torch.eye(b, requires_grad=True)
    opt = torch.optim.Adam([p1, p2], lr=lr)

    def loss_of() -> torch.Tensor:
        xt = kron_rows(x, p1, p2)
        i1, i2 = torch.linalg.inv(p1), torch.linalg.inv(p2)
        total = torch.zeros(())
        for w, t, site in zip(ws, targets, sites):
            wt = kron_rows(w, i1.t(), i2.t())
            xq = fake_quant_activation(xt, site.act) if site.act else xt
            wq = fake_quant_weight(wt, site.weight) if site.weight is not None else wt
            total = total + (xq @ wq.t() - t).pow(2).sum()
        return total / norm

    losses, best = [], (float("inf"), p1.detach().clone(), p2.detach().clone())
    with torch.enable_grad():
        for _ in range(steps + 1):
            loss = loss_of()
            value = loss.item()
            losses.append(value)
            if value < best[0]:
                best = (value, p1.detach().clone(), p2.detach().clone())
            opt.zero_grad()
            loss.backward()
            opt.step()
    losses.pop()  # the last optimiser step was never evaluated
    return Affine(best[1], best[2], losses, best[0])


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps the values of ``wanted`` nodes (as [rows, K] float32)."""

    def __init__(self, gm: fx.GraphModule, wanted: set[fx.Node]):
        super().__init__(gm)
        self.wanted = wanted
        self.seen: dict[fx.Node, list[torch.Tensor]] = {n: [] for n in wanted}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.wanted and isinstance(out, torch.Tensor):
            self.seen[n].append(out.detach().reshape(-1, out.shape[-1]).float())
        return out


def record_inputs(gm: fx.GraphModule, inputs: Sequence[Sequence[Any]], nodes: set[fx.Node],
                  max_rows: int = 4096) -> dict[fx.Node, torch.Tensor]:
    """The values each node in ``nodes`` takes over the calibration inputs (at most ``max_rows``
    rows, evenly spaced)."""
    rec = _Recorder(gm, nodes)
    with torch.no_grad():
        for args in inputs:
            rec.run(*args)
    out = {}
    for node, parts in rec.seen.items():
        rows = torch.cat(parts)
        if rows.shape[0] > max_rows:
            rows = rows[torch.linspace(0, rows.shape[0] - 1, max_rows).long()]
        out[node] = rows
    return out
