"""Rotations found from the graph (QuaRot / SpinQuant), on any architecture: the analysis.

:func:`analyse` reads a canonical graph -- structure and shapes only, no module names -- and finds:

* the **residual stream**: from the embedding lookups (token, and position for GPT-2/OPT; a scalar
  multiply such as Gemma's normaliser is allowed) through the residual adds to the final norm;
* the **norms** that read the stream and the **reader** linears behind each (q/k/v, gate/up,
  fc1, the head), and the **writer** linears whose outputs are added into the stream (o_proj,
  down_proj, fc2);
* per attention (SDPA), the **value/output path**: the value rows (a linear, or a slice of a fused
  qkv linear) and the output projection, with the head size;
* the **down-projection inputs**: writers that are not an attention output.

It refuses what would make a rotation inexact, with the reason: a non-linear op on the stream, a
post-norm stream (the norm's output is the stream: BERT), two writers summed before the residual
add (parallel attention + MLP), a norm on a branch before it joins the stream, the stream returned
as an output, a stream linear that is already quantized.

The transformation itself is plain linear algebra on effective ``[out, in]`` weights, in float64:
:func:`plan_weights` returns the new tensor per parameter FQN; ``passes/rotate.py`` puts them into
the graph, and ``compress`` writes them back into the model.

* norm folding: ``W_r <- W_r diag(w + offset)``, ``b_r <- b_r + W_r b_norm``; the norm keeps no
  affine parameters. A LayerNorm becomes an RMSNorm after the stream is made zero-mean: every
  embedding row and every writer's output is centred (``W <- C W``, ``C = I - 11^T/d``), so the mean
  LayerNorm subtracts is zero (SliceGPT / QuaRot's OPT recipe);
* R1 (``Q``, d x d orthogonal): embeddings ``E <- E Q``, readers ``W <- W Q``, writers
  ``W <- Q^T W``, ``b <- Q^T b``. A head tied to the embedding is untied (its extra bytes reported);
* R2 (head_dim x head_dim): value rows per KV head ``W_v,h <- R^T W_v,h``, output columns per head
  ``W_o[:, h] <- W_o[:, h] R`` (one R for all heads, so grouped KV heads are fine);
* R4: random signs ``D`` and ``lowbit::hadamard`` on the down-projection input, ``W_down <- W_down D H``;
  ``D`` is folded into ``up``'s rows in a gated MLP, else applied online (:class:`R4Signs`);
* R3: ``lowbit::hadamard`` on queries and keys after RoPE (``q k^T`` unchanged).
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from lowbit_compiler import hadamard, ir
from lowbit_compiler.scale_folding import LAYOUT_OPS, sdpa_new_values

# the passes that rotate (compress() runs them on the float model before calibration; inspect
# prints their report)
ROTATION_PASSES = ("rotate", "spinquant")

CASTS = {"to", "float", "type_as", "contiguous", "half", "bfloat16", "double"}
VIEWS = {"view", "reshape", torch.reshape}


@dataclasses.dataclass
class LinearRef:
    node: fx.Node
    layer: str
    weight: str             # FQN of the weight parameter
    bias: str | None
    transposed: bool        # stored [in, out] (GPT-2 Conv1D)
    quantized: bool = False


@dataclasses.dataclass
class NormSite:
    node: fx.Node
    kind: str               # "rms" | "layer"
    weight: str | None
    bias: str | None
    offset: float
    readers: list[LinearRef]


@dataclasses.dataclass
class HeadSite:
    sdpa: fx.Node
    value: LinearRef
    rows: tuple[int, int]   # the value rows inside the (maybe fused qkv) linear
    output: LinearRef
    head_dim: int


@dataclasses.dataclass
class Analysis:
    hidden: int | None = None
    embeddings: list[str] = dataclasses.field(default_factory=list)
    norms: list[NormSite] = dataclasses.field(default_factory=list)
    writers: list[LinearRef] = dataclasses.field(default_factory=list)
    heads: list[HeadSite] = dataclasses.field(default_factory=list)
    head_refusals: list[dict[str, str]] = dataclasses.field(default_factory=list)
    refusals: list[dict[str, str]] = dataclasses.field(default_factory=list)  # what blocks R1
    # second linears of MLPs found by shape (linear(act(linear)) / linear(act(gate) * up)): the R4
    # sites when there is no stream to name the writers (post-norm BERT)
    mlp_downs: list[LinearRef] = dataclasses.field(default_factory=list)

    @property
    def stream_ok(self) -> bool:
        return not self.refusals and bool(self.embeddings) and bool(self.norms)

    @property
    def readers(self) -> list[LinearRef]:
        return [r for n in self.norms for r in n.readers]

    def down_projections(self) -> list[LinearRef]:
        if not self.writers:
            return list(self.mlp_downs)
        outputs = {h.output.node for h in self.heads}
        return [w for w in self.writers if w.node not in outputs]


def _name(node: Any) -> str:
    return node.name if isinstance(node, fx.Node) else repr(node)


def _target_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _is(node: Any, *targets: Any) -> bool:
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.target in targets


def _value(node: Any):
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def last_dim(node: Any) -> int | None:
    v = _value(node)
    try:
        return int(v.shape[-1]) if v is not None and v.dim() > 0 else None
    except (TypeError, ValueError):
        return None


def _keeps_channels(node: fx.Node, hidden: int) -> bool:
    """A cast, a view/reshape or a row-selecting getitem that leaves the channel dim alone."""
    if node.target in CASTS and node.op == "call_method" or _is(node, torch.Tensor.to):
        return True
    if _is(node, *VIEWS) or _is(node, operator.getitem):
        return last_dim(node) == hidden and last_dim(node.args[0]) == hidden
    return False


def linear_ref(node: fx.Node) -> LinearRef | None:
    if node.op != "call_function":
        return None
    if node.target in (torch.ops.lowbit.wo_linear.default, torch.ops.lowbit.qa_linear.default):
        layer = (ir.get(node, ir.MODULE).fqn if ir.get(node, ir.MODULE) else node.name)
        return LinearRef(node, layer, "", None, False, quantized=True)
    if not ir.is_linear(node):
        return None
    parts = ir.linear_parts(node)
    if parts.weight_node is None:
        return None
    bias = ir.param_fqn(parts.bias) if isinstance(parts.bias, fx.Node) else None
    if isinstance(parts.bias, fx.Node) and bias is None:
        return None
    fqn = ir.param_fqn(parts.weight_node)
    return LinearRef(node, ir.layer_name(node, parts.weight_node.target), fqn, bias, parts.transposed)


def _through(node: fx.Node, hidden: int) -> fx.Node:
    """Up through channel-preserving ops to the producer."""
    while isinstance(node, fx.Node) and _keeps_channels(node, hidden) and node.args:
        node = node.args[0]
    return node


def _scalar(node: Any) -> bool:
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return True
    v = _value(node)
    return v is not None and v.dim() == 0


def analyse(gm: fx.GraphModule) -> Analysis:
    """Find the stream, its readers and writers, and the attention value/output paths."""
    a = Analysis()
    token = [n for n in gm.graph.nodes if _is(n, F.embedding) and ir.param_fqn(n.args[1])]
    if not token:
        a.refusals.append({"what": "residual stream", "reason": "no embedding lookup of a weight parameter"})
        _find_heads(gm, a)
        _find_mlp_downs(gm, a)
        return a
    a.hidden = last_dim(token[0])
    stream: set[fx.Node] = set()
    frontier = [token[0]]
    a.embeddings.append(ir.param_fqn(token[0].args[1]))
    seen_norms: set[fx.Node] = set()
    while frontier:
        v = frontier.pop()
        if v in stream:
            continue
        stream.add(v)
        for u in list(v.users):
            if u in stream or u in seen_norms:
                continue
            reason = _classify_user(a, v, u, stream, frontier, seen_norms)
            if reason:
                a.refusals.append({"what": f"stream user {u.name} ({_target_name(u) if u.op != 'output' else 'output'})",
                                   "reason": reason})
    _find_heads(gm, a)
    _find_mlp_downs(gm, a)
    return a


def _classify_user(a: Analysis, v: fx.Node, u: fx.Node, stream: set, frontier: list, seen_norms: set) -> str | None:
    hidden = a.hidden
    if u.op == "output":
        return "the residual stream is a graph output (hidden states returned): a rotation would change it"
    if u.target == "type_as" and u.args[0] is not v:
        return None  # the stream only lends its dtype
    if _keeps_channels(u, hidden):
        frontier.append(u)
        return None
    if _is(u, operator.mul, torch.mul, "mul") and len(u.args) == 2 and any(
            _scalar(x) for x in u.args if x is not v):
        frontier.append(u)  # a scalar multiply (Gemma's sqrt(hidden) normaliser) commutes with Q
        return None
    if _is(u, operator.add, torch.add, "add") and len(u.args) == 2 and not u.kwargs:
        other = u.args[1] if u.args[0] is v else u.args[0]
        if other in stream:
            frontier.append(u)
            return None
        src = _through(other, hidden)
        if _is(src, F.embedding) and ir.param_fqn(src.args[1]) and last_dim(src) == hidden:
            a.embeddings.append(ir.param_fqn(src.args[1]))  # position embeddings join the stream
            frontier.append(u)
            return None
        ref = linear_ref(src) if isinstance(src, fx.Node) else None
        if ref is not None:
            if ref.quantized:
                return f"writer {ref.layer} is already quantized: rotations apply before quantization"
            a.writers.append(ref)
            frontier.append(u)
            return None
        if _is(src, operator.add, torch.add, "add") and all(
                linear_ref(_through(x, hidden)) is not None for x in src.args if isinstance(x, fx.Node)):
            return "two writers are summed before the residual add (parallel attention + MLP block)"
        if _is(src, F.rms_norm, F.layer_norm):
            return f"a norm ({src.name}) is applied to a branch before it joins the stream"
        return f"the residual add's other operand comes from {_name(src)}, not a linear"
    if _is(u, F.rms_norm, F.layer_norm) and u.args[0] is v:
        seen_norms.add(u)
        return _norm_site(a, u, stream)
    return f"{_target_name(u)} is not linear in the stream: a rotation cannot pass it"


def _norm_site(a: Analysis, norm: fx.Node, stream: set) -> str | None:
    spec = ir.get(norm, ir.NORM)
    if spec is None or len(norm.args[1]) != 1:
        return f"norm {norm.name} is not over the last dimension alone"
    weight = norm.args[2] if len(norm.args) > 2 else norm.kwargs.get("weight")
    bias = (norm.args[3] if len(norm.args) > 3 else norm.kwargs.get("bias")) if norm.target is F.layer_norm else None
    if weight is not None and spec.weight_offset:
        weight = weight.args[1]
        while isinstance(weight, fx.Node) and weight.op != "get_attr" and weight.args:
            weight = weight.args[0]  # (1 + w.float())
    for t in (weight, bias):
        if t is not None and ir.param_fqn(t) is None:
            return f"norm {norm.name} has a computed affine parameter"
    readers: list[LinearRef] = []
    todo = list(norm.users)
    while todo:
        r = todo.pop()
        if _keeps_channels(r, a.hidden):
            todo.extend(r.users)
            continue
        ref = linear_ref(r)
        if ref is not None and r.args[0] is not None:
            if ref.quantized:
                return f"reader {ref.layer} is already quantized: rotations apply before quantization"
            readers.append(ref)
            continue
        if _is(r, operator.add, torch.add, "add"):
            return f"post-norm stream: the output of {norm.name} is added to the residual (BERT-style); R1 needs a pre-norm stream"
        return f"norm {norm.name} feeds {r.name} ({_target_name(r)}), not only linears"
    a.norms.append(NormSite(norm, spec.kind, ir.param_fqn(weight), ir.param_fqn(bias) if bias is not None else None,
                            spec.weight_offset, readers))
    return None


_ACTIVATIONS = (F.gelu, F.relu, F.silu, torch.relu, "relu", "gelu")


def _find_mlp_downs(gm: fx.GraphModule, a: Analysis) -> None:
    """Linears fed by an activation of another linear, or by ``act(gate) * up``: MLP down projections."""
    for node in gm.graph.nodes:
        ref = linear_ref(node)
        if ref is None or ref.quantized:
            continue
        x = node.args[0]
        sides = x.args if _is(x, operator.mul, torch.mul, "mul") and len(x.args) == 2 else (x,)
        if any(_is(side, *_ACTIVATIONS) and isinstance(side.args[0], fx.Node) and linear_ref(side.args[0]) is not None
               for side in sides):
            a.mlp_downs.append(ref)


def _find_heads(gm: fx.GraphModule, a: Analysis) -> None:
    for sdpa in gm.graph.nodes:
        if not _is(sdpa, F.scaled_dot_product_attention):
            continue
        value = sdpa.args[2] if len(sdpa.args) > 2 else sdpa.kwargs.get("value")
        head_dim = last_dim(value)
        v = sdpa_new_values(value, exclusive=False)  # R2 rotates weights: other users see the same values
        rows = None
        if _is(v, operator.getitem) and _is(v.args[0], torch.split, "split"):
            split, index = v.args
            size = split.args[1]
            if isinstance(size, int):
                rows, v = (index * size, (index + 1) * size), split.args[0]
        elif _is(v, operator.getitem) and isinstance(v.args[1], tuple) and isinstance(v.args[1][-1], slice):
            s = v.args[1][-1]
            full = last_dim(v.args[0])
            if s.step in (None, 1) and full is not None:
                rows, v = (s.start or 0, full if s.stop is None else s.stop), v.args[0]
        ref = linear_ref(v) if isinstance(v, fx.Node) else None
        out = sdpa
        while len(out.users) == 1 and (next(iter(out.users)).target in LAYOUT_OPS):
            out = next(iter(out.users))
        oref = linear_ref(next(iter(out.users))) if len(out.users) == 1 else None
        where = f"attention {sdpa.name}"
        if ref is None or ref.quantized:
            a.head_refusals.append({"what": where, "reason": "the values do not come from a float linear"})
            continue
        if oref is None or oref.quantized:
            a.head_refusals.append({"what": where, "reason": "the output does not go straight into a float linear"})
            continue
        if rows is None:
            rows = (0, last_dim(v))
        if head_dim is None or (rows[1] - rows[0]) % head_dim:
            a.head_refusals.append({"what": where, "reason": "the value rows are not whole heads"})
            continue
        a.heads.append(HeadSite(sdpa, ref, rows, oref, head_dim))


# ---------------------------------------------------------------------------------------------
# The weights
# ---------------------------------------------------------------------------------------------

def orthogonal(n: int, kind: Any = "hadamard", seed: int = 0) -> torch.Tensor:
    """An n x n orthogonal matrix (float64): a random Hadamard (random signs times H_n / sqrt(n);
    a random Gaussian QR when n has no Hadamard here), ``"random"`` (QR), or a given matrix."""
    if isinstance(kind, torch.Tensor):
        q = kind.double()
        eye = torch.eye(n, dtype=torch.float64, device=q.device)
        if q.shape != (n, n) or not torch.allclose(q @ q.T, eye, atol=1e-6):
            raise ValueError(f"the rotation given is not an orthogonal {n} x {n} matrix")
        return q
    if kind == "hadamard" and hadamard.unsupported_reason(n) is None:
        return hadamard.random_orthogonal_hadamard(n, seed)
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


@dataclasses.dataclass
class WeightPlan:
    tensors: dict[str, torch.Tensor]  # FQN -> new tensor (in the stored layout and dtype)
    untied: dict[str, str]            # head layer -> new weight FQN (it was tied to an embedding)
    extra_bytes: int
    rotated_linears: int


@dataclasses.dataclass
class R4Signs:
    """Random signs ``D`` in front of an R4 Hadamard: the down projection reads ``(x D) H``. Without
    them a non-negative input (ReLU, GELU MLPs: OPT, GPT-2) puts its mean into the first Hadamard
    coefficient, an outlier of sqrt(K) times the mean that per-token quantization cannot survive."""

    signs: torch.Tensor              # +-1, float64 [K]
    fold_into: LinearRef | None      # a gated MLP's linear whose rows absorb D (else x * D runs online)


def r4_signs(sites: list[LinearRef], seed: int) -> dict[str, R4Signs]:
    """Signs per R4 site; folded into ``up`` when the input is ``act(gate) * up`` with ``up`` a float
    linear used only there (``act(g) * (D u) = D (act(g) * u)``)."""
    out = {}
    for i, ref in enumerate(sites):
        k = last_dim(ref.node.args[0])
        g = torch.Generator().manual_seed(seed * 1000 + i)
        value = _value(ref.node.args[0])
        device = value.device if isinstance(value, torch.Tensor) else None  # the activation's (CUDA models)
        signs = (torch.randint(0, 2, (k,), generator=g).to(torch.float64) * 2 - 1).to(device)
        x, fold = ref.node.args[0], None
        if _is(x, operator.mul, torch.mul, "mul") and len(x.args) == 2:
            for side in x.args:
                cand = linear_ref(side) if isinstance(side, fx.Node) and len(side.users) == 1 else None
                if cand is not None and not cand.quantized:
                    fold = cand
                    break
        out[ref.layer] = R4Signs(signs, fold)
    return out


def plan_weights(a: Analysis, fetch, r1: torch.Tensor | None, r2: torch.Tensor | None,
                 r4: list[LinearRef] = (), fold_norms: bool = True,
                 signs: dict[str, R4Signs] | None = None) -> WeightPlan:
    """New tensors for every parameter the rotation touches. ``fetch(fqn)`` returns the current one.
    Everything is computed in float64 on the parameters' device (``r1``, ``r2``, the Hadamards and
    the signs are moved there)."""
    eff: dict[str, torch.Tensor] = {}   # weight FQN -> effective [out, in] float64
    bias: dict[str, torch.Tensor] = {}  # bias FQN (or weight FQN + "#bias" when created) -> float64
    layout: dict[str, tuple[bool, torch.dtype]] = {}
    untied: dict[str, str] = {}
    extra = 0
    embeds = set(a.embeddings)

    def weight(ref: LinearRef) -> str:
        nonlocal extra
        key = ref.weight
        if key in embeds:  # a head tied to the embedding: its own copy from here on
            key = untied.setdefault(ref.layer, f"{ref.layer}.weight")
            if key not in eff:
                t = fetch(ref.weight)
                eff[key] = t.double().clone()
                layout[key] = (False, t.dtype)
                extra += t.numel() * t.element_size()
            return key
        if key not in eff:
            t = fetch(key)
            eff[key] = (t.t() if ref.transposed else t).double().clone()
            layout[key] = (ref.transposed, t.dtype)
        return key

    def bias_of(ref: LinearRef, create_rows: int | None = None) -> str | None:
        key = ref.bias
        if key is None and create_rows is None:
            return None
        if key is None:
            key = f"{ref.layer}.bias"
            if key not in bias:
                bias[key] = torch.zeros(create_rows, dtype=torch.float64, device=fetch(ref.weight).device)
                layout[key] = (False, fetch(ref.weight).dtype)
            return key
        if key not in bias:
            t = fetch(key)
            bias[key] = t.double().clone()
            layout[key] = (False, t.dtype)
        return key

    layer_norm = any(n.kind == "layer" for n in a.norms)
    if fold_norms:
        for site in a.norms:
            g = fetch(site.weight).double() + site.offset if site.weight else None
            b = fetch(site.bias).double() if site.bias else None
            for ref in site.readers:
                w = eff[weight(ref)]
                if b is not None:
                    key = bias_of(ref, create_rows=w.shape[0])
                    bias[key] += w @ b
                if g is not None:
                    w.mul_(g[None, :])
    for fqn in a.embeddings:
        t = fetch(fqn)
        eff.setdefault(fqn, t.double().clone())
        layout[fqn] = (False, t.dtype)
    if layer_norm:  # centre the stream: every row written into it has zero mean
        for fqn in a.embeddings:
            eff[fqn] -= eff[fqn].mean(1, keepdim=True)
        for ref in a.writers:
            w = eff[weight(ref)]
            w -= w.mean(0, keepdim=True)
            if (key := bias_of(ref)) is not None:
                bias[key] -= bias[key].mean()
    rotated = 0
    if r1 is not None:
        r1 = r1.to(device=eff[a.embeddings[0]].device if a.embeddings else r1.device, dtype=torch.float64)
        for fqn in a.embeddings:
            eff[fqn] = eff[fqn] @ r1
        for ref in a.readers:
            key = weight(ref)
            eff[key] = eff[key] @ r1
            rotated += 1
        for ref in a.writers:
            key = weight(ref)
            eff[key] = r1.T @ eff[key]
            if (bkey := bias_of(ref)) is not None:
                bias[bkey] = r1.T @ bias[bkey]
            rotated += 1
    if r2 is not None:  # out of place throughout: a learned R2 gets its gradient through here
        for site in a.heads:
            d, (lo, hi) = site.head_dim, site.rows
            key = weight(site.value)
            w = eff[key]
            r2 = r2.to(device=w.device, dtype=torch.float64)
            heads = (w[lo:hi].reshape(-1, d, w.shape[1]).transpose(1, 2) @ r2).transpose(1, 2)
            eff[key] = torch.cat([w[:lo], heads.reshape(hi - lo, -1), w[hi:]])
            if (bkey := bias_of(site.value)) is not None:
                b = bias[bkey]
                bias[bkey] = torch.cat([b[:lo], (b[lo:hi].reshape(-1, d) @ r2).reshape(-1), b[hi:]])
            okey = weight(site.output)
            o = eff[okey]
            eff[okey] = (o.reshape(o.shape[0], -1, d) @ r2).reshape(o.shape)
    for ref in r4:  # the down projections that get lowbit::hadamard on their input (after D)
        key = weight(ref)
        h = hadamard.matrix(eff[key].shape[1], device=eff[key].device)
        site = (signs or {}).get(ref.layer)
        if site is None:
            eff[key] = eff[key] @ h
            continue
        d = site.signs.to(device=eff[key].device, dtype=torch.float64)
        eff[key] = (eff[key] * d[None, :]) @ h
        if site.fold_into is not None:
            fkey = weight(site.fold_into)
            eff[fkey] = d[:, None] * eff[fkey]
            if (bkey := bias_of(site.fold_into)) is not None:
                bias[bkey] = d * bias[bkey]
    tensors = {}
    for key, w in list(eff.items()) + list(bias.items()):
        transposed, dtype = layout[key]
        tensors[key] = (w.t() if transposed else w).contiguous().to(dtype)
    return WeightPlan(tensors, untied, extra, rotated)


def no_heads_reason(gm: fx.GraphModule) -> str:
    """Why R2 found no attention to rotate (the graph has none it can read heads from)."""
    if not any(_is(n, F.scaled_dot_product_attention) for n in gm.graph.nodes):
        if not any(_is(n, F.softmax, torch.softmax, "softmax") for n in gm.graph.nodes):
            return "no attention in the graph (no scaled_dot_product_attention, no softmax): nothing to rotate"
        return ("no F.scaled_dot_product_attention in the graph: the attention is computed from matmul and softmax "
                "(an eager attention, e.g. for Gemma-2's logit soft-capping), and R2 finds heads and their value/"
                "output linears through SDPA's value input")
    return "no attention with value and output linears around it"


def no_down_projections_reason(a: Analysis) -> str:
    """Why R4 found no down projection to put a Hadamard before."""
    names = ", ".join(sorted({_target_name(x) if isinstance(x, fx.Node) else getattr(x, "__name__", str(x))
                              for x in _ACTIVATIONS}))
    stream = ("the residual stream has no writing linears" if a.stream_ok
              else "R1's stream analysis was refused (see above), so the stream names no writing linears")
    return (f"no MLP down projection found: {stream}, and no linear reads activation(linear) or act(gate) * up "
            f"with a recognised activation ({names}); an activation spelled out in elementwise ops (the tanh "
            "GELU of Phi and GPT-J: 0.5 * x * (1 + tanh(...))) is not recognised")


def r4_refusals(a: Analysis) -> list[dict[str, str]]:
    out = []
    for ref in a.down_projections():
        k = last_dim(ref.node.args[0])
        reason = hadamard.unsupported_reason(k) if k else "unknown input size"
        if reason:
            out.append({"what": f"R4 before {ref.layer}", "reason": reason})
    return out

