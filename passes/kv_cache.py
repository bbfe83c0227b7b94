"""mark_kv_cache: find every attention, its key/value producers and cache update, and record how its
KV cache is stored.

Where it runs: anywhere after ``canonicalize`` (it reads the graph and rewrites nothing). What it
finds, per attention consumer, ``F.scaled_dot_product_attention`` or the eager form
``matmul(softmax(matmul(q, k^T) * s [+ mask]), v)``:

* the cache update (``torch.cat([cached, new], dim=-2)``, what ``DynamicCache.update`` traces to;
  absent when the forward ran with ``use_cache=False``);
* the new keys after RoPE (what the cache receives) and before it (the last node on the key path
  that no cos/sin reaches), the value states, and the ``k_proj`` / ``v_proj`` linears (a fused
  ``qkv`` linear is named for both);
* MHA / GQA / MQA from the query and key head counts (GQA's ``repeat_kv`` is walked through).

It records an :class:`ir.KVDecision` (the recipe's KV format for that layer) on the consumer node,
shown by ``lowbit inspect``; ``compress`` installs a :class:`lowbit_compiler.kv.CompressedKVCache`
from these decisions; under ``torch.compile(backend="lowbit")`` the backend installs it on the compiled
module (``kv.install_for_compiled_graph``). An attention whose keys it cannot trace back to
a linear is reported, not guessed.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from lowbit_compiler import ir, kv
from lowbit_compiler.pass_base import Pass, PassContext, PassResult, register_pass

_SDPA = (torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_MATMUL = (torch.matmul, operator.matmul, torch.bmm)
_SOFTMAX = (torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax)
# ops that only move, copy or retype a tensor: walked through on the way back to a producer
_LAYOUT_FUNCS = {torch.transpose, torch.permute, torch.reshape, torch.Tensor.contiguous, torch.flatten,
                 torch.unsqueeze, torch.squeeze, operator.getitem, torch.nn.functional.dropout}
_LAYOUT_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "to", "float", "type_as", "expand",
                   "unsqueeze", "squeeze", "flatten", "clone", "half", "bfloat16"}


def _is_call(node: Any, targets: tuple) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _is_method(node: Any, names: set[str]) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def _is_layout(node: Any) -> bool:
    return (isinstance(node, fx.Node) and ((node.op == "call_function" and node.target in _LAYOUT_FUNCS)
                                           or _is_method(node, _LAYOUT_METHODS)))


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    value = node.meta.get("example_value", node.meta.get("val"))
    shape = getattr(value, "shape", None)
    try:
        return tuple(int(s) for s in shape) if shape is not None else None
    except (TypeError, ValueError):  # symbolic sizes
        return None


def _through_layout(node: Any) -> Any:
    while _is_layout(node) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _cache_update(node: fx.Node) -> tuple[fx.Node | None, fx.Node]:
    """(the cat that appends to the cache, the new states) walking back from attention's K or V."""
    node = _through_layout(node)
    if _is_call(node, (torch.cat,)):
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        parts = node.args[0]
        if dim in (-2, 2) and isinstance(parts, (list, tuple)) and len(parts) == 2:
            return node, parts[1]
    return None, node


def _ancestors(node: fx.Node, stop: set[fx.Node]) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in stop:
            continue
        todo.extend(a for a in n.all_input_nodes)
    return seen


def _producer(new: fx.Node) -> tuple[fx.Node | None, fx.Node | None, fx.Node]:
    """(the linear that made these states, the pre-RoPE node or None without RoPE, post-RoPE node)."""
    # the nearest linear on the path (not through get_attr weights)
    linear, todo, seen = None, [new], set()
    while todo:
        n = todo.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if ir.is_linear(n) or (n.op == "call_function" and "linear" in str(n.target)):
            linear = n
            break
        todo.extend(a for a in n.all_input_nodes if a.op != "get_attr")
    if linear is None:
        return None, None, new
    path = _ancestors(new, {linear})
    from_linear, todo = {linear}, [linear]  # the key path: nodes on the way that the linear feeds
    while todo:
        for user in todo.pop().users:
            if user in path and user not in from_linear:
                from_linear.add(user)
                todo.append(user)
    # RoPE: a tensor computed at run time from elsewhere (cos/sin of the positions) enters the key
    # path; parameters (a k_norm's weight) and Python scalars do not count
    side = {a for n in from_linear if n is not linear for a in n.all_input_nodes
            if a not in from_linear and a.op != "get_attr"}
    if not side:
        return linear, None, new
    rotated = {n for n in from_linear if _ancestors(n, {linear}) & side}
    candidates = [n for n in from_linear if n not in rotated and any(u in rotated for u in n.users)]
    if not candidates:
        return linear, None, new
    # the keys before RoPE: the latest node every branch into the rotation comes from (rotate_half's
    # slices and a partial rotary's pass-through part share it)
    common = set.intersection(*(_ancestors(c, {linear}) for c in candidates))
    order = {n: i for i, n in enumerate(new.graph.nodes)}
    return linear, max(common, key=order.__getitem__), new


def _eager_attention(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(query, key, value) of ``matmul(softmax(matmul(q, k^T) ...), v)`` anchored at the last matmul."""
    if not _is_call(node, _MATMUL) or len(node.args) < 2:
        return None
    probs, value = node.args[0], node.args[1]
    p = _through_layout(probs)
    if not (_is_call(p, _SOFTMAX) or _is_method(p, {"softmax"})):
        return None
    x = p.args[0]
    for _ in range(8):  # scale, mask, softcap, dtype casts between the scores matmul and the softmax
        x = _through_layout(x)
        if _is_call(x, _MATMUL):
            break
        if not isinstance(x, fx.Node) or not x.all_input_nodes:
            return None
        x = x.all_input_nodes[0] if x.op != "call_function" or not isinstance(x.args[0], fx.Node) else x.args[0]
    if not _is_call(x, _MATMUL):
        return None
    query, key_t = x.args[0], x.args[1]
    return query, key_t, value


def _repeat_free(node: fx.Node) -> fx.Node:
    """Through GQA's ``repeat_kv`` (``x[:, :, None].expand(...).reshape(...)``) and layout ops."""
    return _through_layout(node)


def find_attentions(gm: fx.GraphModule) -> list[dict[str, Any]]:
    """Every attention of the graph with its pieces (module docstring), in graph order."""
    found = []
    for node in gm.graph.nodes:
        if _is_call(node, _SDPA):
            q, k, v = (node.args + tuple(node.kwargs.get(n) for n in ("query", "key", "value")))[:3]
            consumer = "sdpa"
        else:
            parts = _eager_attention(node)
            if parts is None:
                continue
            (q, k, v), consumer = parts, "eager"
        update_k, new_k = _cache_update(_repeat_free(k))
        update_v, new_v = _cache_update(_repeat_free(v))
        k_linear, pre_rope, post_rope = _producer(new_k)
        v_linear, _, _ = _producer(new_v)
        module = ir.get(node, ir.MODULE)
        found.append({"node": node, "consumer": consumer, "query": q, "key": k, "value": v,
                      "cache_update": (update_k, update_v), "new_keys": new_k, "new_values": new_v,
                      "k_linear": k_linear, "v_linear": v_linear, "pre_rope": pre_rope, "post_rope": post_rope,
                      "attention": module.fqn if module is not None else f"attention_{len(found)}"})
    return found


def _heads(site: dict[str, Any]) -> tuple[int, int, int] | None:
    q, k = _shape(site["query"]), _shape(site["new_keys"])
    if q is None or k is None or len(q) != 4 or len(k) != 4:
        return None
    return q[1], k[1], k[3]


@register_pass
class MarkKVCache(Pass):
    """Options: ``scheme`` (a name in ``lowbit_compiler.kv.KV_FORMATS``: int8, int4, int3, int2, fp8,
    kivi2, kivi4, kvquant3, gear4, ...), and ``bits`` / ``group`` / ``window`` / ``sinks`` / ``outliers`` /
    ``rank`` to override that format's.

    ``kvquant*`` is data-driven: the calibration engine runs the graph on the calibration batches,
    observing each attention's keys before RoPE (``keys_pre_rope``; the new keys when the model has
    no RoPE) and its values, and :func:`lowbit_compiler.kv.fit_kvquant` fits that layer's codebooks
    and key channel scales; the fitted :class:`lowbit_compiler.kv.KVFormat` rides on the decision."""

    name = "mark_kv_cache"
    requires = ("canonical",)
    ensures = ("kv_cache_marked",)

    def __init__(self, scheme: str = "int4", group: int | None = None, window: int | None = None,
                 sinks: int | None = None, outliers: float | None = None, rank: int | None = None,
                 bits: int | None = None) -> None:
        super().__init__(scheme=scheme, group=group, window=window, sinks=sinks, outliers=outliers, rank=rank,
                         bits=bits)
        base = kv.get_format(scheme)
        changes = {k: v for k, v in (("group", group), ("window", window), ("sinks", sinks), ("outliers", outliers),
                                     ("rank", rank), ("bits", bits)) if v is not None}
        self.format = kv.KVFormat(**{**vars(base), **changes}) if changes else base

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        sites = find_attentions(gm)
        decisions: dict[str, dict[str, Any]] = {}
        refused: dict[str, str] = {}
        accepted: list[tuple[int, dict[str, Any], tuple[int, int, int]]] = []
        for index, site in enumerate(sites):
            where = f"attention {site['attention']} (node {site['node'].name})"
            heads = _heads(site)
            reason = None
            if not ctx.recipe.applies_to(site["attention"]):
                reason = "excluded by the recipe"
            elif None in site["cache_update"]:
                # the packed cache hands the attention handles, not tensors: nothing may sit between
                # the cache update and the attention (MLA's value padding does), and without an update
                # in the graph (captured with use_cache=False) that cannot be checked
                reason = ("no cache update (cat along the sequence) feeds the attention's keys and values through "
                          "layout ops alone (an encoder, a forward captured with use_cache=False, or a model that edits keys/values after "
                          "the cache, as MLA pads its values); the cache stays float")
            elif heads is None:
                reason = "the key/query shapes are unknown (symbolic or not 4-D); the cache stays float"
            elif site["k_linear"] is None:
                reason = "its keys do not come from a linear the pass can find; the cache stays float"
            else:
                try:
                    self.format.channel_group(heads[2])
                except Exception as e:  # noqa: BLE001 (the format's own message names the fix)
                    reason = str(e)
            if reason is not None:
                refused[site["attention"]] = reason
                if reason != "excluded by the recipe":
                    ctx.fallback(where, reason)
                continue
            accepted.append((index, site, heads))
        formats = {id(site): self.format for _, site, _ in accepted}
        calibration = None
        if self.format.scheme == "kvquant" and accepted:
            formats, calibration = self._calibrate(accepted, ctx, refused)
        for index, site, heads in accepted:
            fmt = formats.get(id(site))
            if fmt is None:
                continue
            hq, hkv, d = heads
            kind = "MHA" if hq == hkv else ("MQA" if hkv == 1 else "GQA")
            nodes = [("k_proj", site["k_linear"]), ("v_proj", site["v_linear"]), ("keys_pre_rope", site["pre_rope"]),
                     ("keys_post_rope", site["post_rope"] if site["pre_rope"] is not None else None),
                     ("values", site["new_values"]), ("key_cache_update", site["cache_update"][0]),
                     ("value_cache_update", site["cache_update"][1]), ("consumer", site["node"])]
            rope = site["pre_rope"] is not None
            decision = ir.KVDecision(
                attention=site["attention"], layer_index=index, consumer=site["consumer"], kind=kind, heads=hq,
                kv_heads=hkv, head_dim=d, format=fmt.key, scheme=fmt.scheme, bits=fmt.bits,
                group=fmt.group, window=fmt.window, sinks=fmt.sinks,
                keys_quantized=("pre_rope" if fmt.key_rope == "pre" else "post_rope") if rope else "no_rope",
                nodes=tuple((role, n.name) for role, n in nodes if n is not None), kv_format=fmt)
            ir.put(site["node"], ir.KV_CACHE, decision)
            decisions[site["attention"]] = {k: v for k, v in vars(decision).items()
                                            if k not in ("attention", "nodes", "kv_format")}
            decisions[site["attention"]]["nodes"] = dict(decision.nodes)
            decisions[site["attention"]]["bytes_per_token"] = fmt.bytes_per_token(hkv, d)
            decisions[site["attention"]]["constant_bytes"] = fmt.constant_bytes(hkv, d)
            decisions[site["attention"]]["bf16_bytes_per_token"] = 2 * 2 * hkv * d
            if fmt.params is not None:
                decisions[site["attention"]]["codebooks"] = {
                    "keys": [round(float(c), 4) for c in fmt.params.key_codebook],
                    "values": [round(float(c), 4) for c in fmt.params.value_codebook],
                    "calibration_tokens": fmt.params.tokens}
        return PassResult(False, len(decisions), {"format": self.format.key, "attentions": decisions,
                                                  "refused": refused,
                                                  **({"calibration": calibration} if calibration else {})})

    def _calibrate(self, accepted: list, ctx: PassContext, refused: dict[str, str]) -> tuple[dict[int, Any], dict]:
        """KVQuant's per-layer constants from the calibration engine: each accepted attention's keys
        before RoPE and values, observed on every calibration batch, fitted by ``kv.fit_kvquant``.
        Returns (id(site) -> fitted format, the engine's run info); a layer whose activations cannot
        be read as (B, KV heads, T, head_dim) is reported and left float."""
        engine = ctx.calibration_for(self.name)
        observe: dict[fx.Node, tuple[dict[str, Any], str]] = {}
        for _, site, _ in accepted:
            observe[site["pre_rope"] if site["pre_rope"] is not None else site["new_keys"]] = (site, "keys")
            observe[site["new_values"]] = (site, "values")
        seen: dict[fx.Node, Any] = {}

        def on_block(block, stats) -> bool:
            seen.update(stats)
            return False

        info = engine.run(self.name, lambda n: n in observe, {"samples"}, on_block, at="output")
        fitted: dict[int, Any] = {}
        for _, site, (hq, hkv, d) in accepted:
            where = f"attention {site['attention']} (node {site['node'].name})"
            tensors, why = {}, None
            for node, (owner, role) in observe.items():
                if owner is not site:
                    continue
                stats = seen.get(node)
                shape = _shape(node)
                if stats is None or not stats.samples:
                    why = f"no calibration data reached its {role} ({node.name})"
                elif shape is None or len(shape) != 4 or shape[-1] != d or hkv not in shape[1:3]:
                    why = (f"its {role} ({node.name}) have shape {shape}, not (batch, {hkv} KV heads, tokens, {d}) "
                           "or (batch, tokens, heads, dim)")
                else:
                    parts = [x.reshape(-1, *shape[1:]) for x in stats.samples]
                    parts = [x if x.shape[1] == hkv else x.transpose(1, 2) for x in parts]
                    tensors[role] = torch.cat([x.reshape(1, hkv, -1, d) for x in parts], 2)
            if why is None:
                try:
                    params = kv.fit_kvquant(tensors["keys"], tensors["values"], self.format)
                except Exception as e:  # noqa: BLE001 (the message says what failed)
                    why = f"fitting its codebooks failed: {e}"
            if why is not None:
                reason = f"KVQuant: {why}; the cache stays float"
                refused[site["attention"]] = reason
                ctx.fallback(where, reason)
                continue
            rope = "pre" if site["pre_rope"] is not None and self.format.key_rope == "pre" else "post"
            fitted[id(site)] = kv.KVFormat(**{**vars(self.format), "key_rope": rope, "params": params})
        return fitted, info
