"""Coverage: an account of every weight of the graph after the passes, so nothing is left float
without a reason and the sizes are over the whole model, not only the layers a pass touched.

``account(gm, layers, recipe)`` walks the rewritten graph. Each model tensor still read as a float
``get_attr`` is classified by what reads it (through views, transposes and casts): a **matmul**
weight (``F.linear``, ``matmul``/``mm``/``bmm``/``baddbmm``/``addmm``, ``grouped_mm``), an
**embedding** table, a **norm** weight, or **other**. Matmul weights of at least
:data:`MIN_ELEMENTS` elements that are left float get a reason: the pass's own
``ir.SKIPPED`` reason on the linear (excluded by the recipe, a MoE router, ...), or what no pass
handles yet (3-D expert weights read other than by a grouped matmul: transformers'
``batched_mm`` experts). Quantized layers come from the passes' layer records (their
``weight`` FQN). A weight a recipe selects and leaves float for a reason that is not the recipe's
own choice raises in strict mode.

The summary's ``coverage`` entry::

    {"weights": {fqn: {"elements", "bytes", "role", "status": "quantized" | "float" | "added",
                        "layer", "format", "reason"}},
     "totals": {"bytes_before", "bytes_after", "quantized": {...}, "float_matmul": {...},
                "embeddings": {...}, "norms": {...}, "other": {...}, "lowrank": {...}}}

``lowrank``: R-Sparse's float low-rank factors (``lowbit::lowrank_residual``'s ``left`` /
``right``), tensors the compression adds (0 bytes before); each reading layer's record gets
``lowrank: {rank, bytes, dtype}``.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from lowbit_compiler import ir
from lowbit_compiler.pass_base import LowbitError

MIN_ELEMENTS = 4096

_MATMULS = {F.linear, torch.matmul, operator.matmul, torch.mm, torch.bmm, torch.baddbmm, torch.addmm,
            torch.einsum, "matmul", "mm", "bmm", "baddbmm", "addmm"}
if hasattr(torch, "_grouped_mm"):
    _MATMULS.add(torch._grouped_mm)
_EMBEDDINGS = {F.embedding, torch.embedding}
_NORMS = {F.layer_norm, F.rms_norm, F.group_norm, torch.layer_norm}
_PASS_THROUGH = {"t", "T", "mT", "transpose", "permute", "view", "reshape", "to", "float", "contiguous",
                 "type_as", "expand", "unsqueeze", "squeeze", "getitem", "detach", "clone"}

# Reasons that are the recipe's own choice: strict mode accepts these.
_CHOSEN = ("excluded by", "routers stay float", "the recipe quantizes no weights", "weight is computed")


def _name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


_MATMUL_NAMES = {_name(t) for t in _MATMULS}


def _readers(node: fx.Node, depth: int = 4) -> list[fx.Node]:
    """The ops that read ``node``'s value, looking through views, transposes and casts."""
    out, frontier = [], [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for user in n.users:
                name = _name(user.target)
                if user.op in ("call_function", "call_method") and (name in _PASS_THROUGH or user.target is getattr
                                                                     or user.target is operator.getitem):
                    nxt.append(user)
                else:
                    out.append(user)
        frontier = nxt
    return out


def _is_matmul(node: fx.Node) -> bool:
    if node.target in _MATMULS or _name(node.target) in _MATMUL_NAMES:
        return True
    text = str(node.target)  # custom ops: transformers::grouped_mm_fallback, torch._grouped_mm, ...
    return "grouped_mm" in text or "matmul" in text


def _role(readers: list[fx.Node]) -> tuple[str, fx.Node | None]:
    for r in readers:
        if _is_matmul(r):
            return "matmul", r
    for r in readers:
        if r.target in _EMBEDDINGS:
            return "embedding", r
    for r in readers:
        if r.target in _NORMS or "norm" in _name(r.target):
            return "norm", r
    return "other", readers[0] if readers else None


def _float_reason(reader: fx.Node | None, value: torch.Tensor, quantizes: bool) -> str:
    skipped = ir.get(reader, ir.SKIPPED) if reader is not None else None
    if skipped is not None:
        return skipped.reason
    name = _name(reader.target) if reader is not None else "?"
    if value.dim() == 3 or "grouped_mm" in str(reader.target if reader is not None else ""):
        if not quantizes:
            return "the recipe quantizes no weights"
        return (f"{value.dim()}-D stacked expert weights read by {name}: only a grouped matmul of a frozen 3-D weight "
                "(transformers' default experts_implementation='grouped_mm') becomes lowbit::grouped_linear; left "
                "float (load the model with experts_implementation='grouped_mm')")
    if not quantizes:
        return "the recipe quantizes no weights"
    if reader is not None and ir.is_linear(reader):
        return "a linear no quantizing pass of the recipe took"
    return f"read by {name}, which no pass quantizes (only canonical F.linear weights are)"


def account(gm: fx.GraphModule, layers: dict[str, dict[str, Any]], recipe: Any, strict: bool = False) -> dict[str, Any]:
    """The coverage entry (module docstring) of one rewritten graph; adds a layer record for every
    float matmul weight of at least MIN_ELEMENTS elements that has none."""
    from lowbit_compiler.pass_base import get_pass

    quantizes = any(getattr(get_pass(p), "quantizes", False) for p in recipe.passes)
    weights: dict[str, dict[str, Any]] = {}
    for layer, record in layers.items():
        if "bytes_after" in record and record.get("format", "float") != "float":
            fqn = record.get("weight", f"{layer}.weight")
            weights[fqn] = {"elements": record.get("in_features", 0) * record.get("out_features", 0)
                            * max(record.get("experts", 0), 1),
                            "bytes": record.get("bytes_before", 0), "bytes_after": record["bytes_after"],
                            "role": "matmul", "status": "quantized", "layer": layer, "format": record["format"]}
    skipped = {r["weight"]: r["skipped"] for r in layers.values() if "skipped" in r and "weight" in r}
    problems = []
    for node in gm.graph.nodes:
        info = ir.get(node, ir.PARAM) if node.op == "get_attr" else None
        if info is None:
            continue
        value = ir.fetch_attr(gm, node.target)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        role, reader = _role(_readers(node))
        nbytes = value.numel() * value.element_size()
        entry: dict[str, Any] = {"elements": value.numel(), "bytes": nbytes, "bytes_after": nbytes, "role": role,
                                 "status": "float"}
        if node.target in weights:  # quantized for one reader (a tied head), still read float by another
            weights[node.target]["also_float_for"] = role
            weights[node.target]["bytes_after"] += nbytes
            continue
        if node.target in skipped:
            entry["reason"] = skipped[node.target]
        if role == "matmul" and value.numel() >= MIN_ELEMENTS:
            layer = ir.layer_name(reader, node.target) if reader is not None and ir.is_linear(reader) else (
                node.target.rsplit(".", 1)[0] if node.target.endswith(".weight") else node.target)
            reason = _float_reason(reader, value, quantizes)
            entry.update(layer=layer, format="float", reason=reason)
            if layer not in layers:
                layers[layer] = {"format": "float", "skipped": reason, "weight": node.target,
                                 "elements": value.numel()}
            if quantizes and recipe.applies_to(layer) and not any(c in reason for c in _CHOSEN):
                problems.append(f"{node.target} ({reason})")
        weights[node.target] = entry
    for node in gm.graph.nodes:  # R-Sparse's low-rank factors: float tensors the compression adds
        if node.op == "call_function" and node.target is torch.ops.lowbit.lowrank_residual.default:
            module = ir.get(node, ir.MODULE)
            layer = module.fqn if module is not None and module.fqn else node.name
            added = 0
            for arg in node.args[2:4]:
                value = ir.fetch_attr(gm, arg.target)
                nbytes = value.numel() * value.element_size()
                added += nbytes
                weights[arg.target] = {"elements": value.numel(), "bytes": 0, "bytes_after": nbytes, "role": "lowrank",
                                       "status": "added", "layer": layer,
                                       "format": str(value.dtype).removeprefix("torch.")}
            rank = ir.fetch_attr(gm, node.args[2].target).shape[1]
            layers.setdefault(layer, {})["lowrank"] = {"rank": rank, "bytes": added,
                                                       "dtype": weights[node.args[2].target]["format"]}
    if strict and problems:
        raise LowbitError(f"recipe {recipe.name!r} (strict): {len(problems)} weight(s) it selects stay float: "
                          + "; ".join(problems[:4]) + (" ..." if len(problems) > 4 else "")
                          + ". Exclude them (recipe exclude globs) or run without strict to keep them float")
    return {"weights": weights, "totals": totals(weights)}


def totals(weights: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Whole-model bytes before/after and per group (quantized, float matmul weights, embeddings,
    norms, other)."""
    groups: dict[str, dict[str, int]] = {}
    for entry in weights.values():
        group = "quantized" if entry["status"] == "quantized" else {
            "matmul": "float_matmul", "embedding": "embeddings", "norm": "norms",
            "lowrank": "lowrank"}.get(entry["role"], "other")
        g = groups.setdefault(group, {"tensors": 0, "elements": 0, "bytes_before": 0, "bytes_after": 0})
        g["tensors"] += 1
        g["elements"] += entry["elements"]
        g["bytes_before"] += entry["bytes"]
        g["bytes_after"] += entry["bytes_after"]
    before = sum(g["bytes_before"] for g in groups.values())
    after = sum(g["bytes_after"] for g in groups.values())
    return {"bytes_before": before, "bytes_after": after, "ratio": round(before / after, 3) if after else None,
            **groups}


def merge(accounts: list[dict[str, Any]]) -> dict[str, Any]:
    """One account for several graphs of one model (compress over graph breaks)."""
    weights: dict[str, dict[str, Any]] = {}
    for a in accounts:
        for fqn, entry in a["weights"].items():
            if fqn not in weights or entry["status"] == "quantized":
                weights[fqn] = entry
    return {"weights": weights, "totals": totals(weights)}

