"""``lowbit report``: one self-contained HTML page of what the compiler did.

Reads what :mod:`lowbit_compiler.dump` wrote (a dump directory, one run's folder, one graph's
folder) or a saved checkpoint (:mod:`lowbit_compiler.checkpoint`'s manifest) and writes one static
HTML file: inline CSS, JS and SVG, nothing fetched from the network. Per graph:

* the pipeline as a timeline: each pass, its time, match count, and what it refused and why;
* each stage's graph as an SVG in a layered layout of our own (longest-path layers, barycentric
  ordering): the repeated blocks (``model.layers.3``, found as the calibration engine finds them)
  collapsed to one box each, which a click expands; nodes coloured by kind (lowbit op, norm,
  attention, linear, elementwise); nodes the stage's pass added or changed outlined; clicking a
  node shows its ``node.meta["lowbit"]`` decisions, shape, module and source line;
* the per-layer table (format, bits/weight, bytes, weight SQNR as a heat map, sparsity, rotation,
  or the reason it stayed float), sortable, with totals;
* the kernels: one row per generated call (fused ops, shape class, grid, bytes against the
  minimum, registers/spills, modelled time) linking to its source, and what runs every lowbit op;
* the stage-to-stage diffs, coloured.

Graph pictures need the stage ``.json`` files (dumps from before them show the code and diffs
only). The page's script marks ``<body data-rendered="ok">`` once it has set everything up with no
script error (``"error: ..."`` otherwise): the browser test reads that.
"""
from __future__ import annotations

import html
import json
import os
import re
from typing import Any

from lowbit_compiler.calibration import block_of
from lowbit_compiler.cli import MODEL_BANDWIDTH, MODEL_GPU

_STAGE = re.compile(r"^(\d\d)_(.+)\.py$")

# ---- reading ---------------------------------------------------------------------------------


def _read(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _graph_folder(directory: str) -> dict[str, Any]:
    """A graph folder's stages (code, diff, nodes) and generated kernels' sources."""
    stages = []
    for name in sorted(os.listdir(directory)):
        m = _STAGE.match(name)
        if not m:
            continue
        stem = name[:-3]
        nodes = _read(os.path.join(directory, stem + ".json"))
        stages.append({"index": int(m.group(1)), "name": m.group(2), "code": _read(os.path.join(directory, name)),
                       "diff": _read(os.path.join(directory, stem + ".diff")),
                       "nodes": json.loads(nodes)["nodes"] if nodes else None})
    kernels = {}  # kernels/<name>.py (generated Triton) and kernels/<name>.c (generated CPU C), by file name
    kdir = os.path.join(directory, "kernels")
    if os.path.isdir(kdir):
        for name in sorted(os.listdir(kdir)):
            if name.endswith((".py", ".c")):
                kernels[name] = _read(os.path.join(kdir, name))
    return {"stages": stages, "kernel_sources": kernels}


def load(path: str) -> dict[str, Any]:
    """Everything the page shows: ``{"source", "kind": "dump" | "checkpoint", "graphs": [...]}``,
    each graph its summary.json (as ``lowbit inspect`` reads it) plus ``stages`` and
    ``kernel_sources``."""
    from lowbit_compiler import checkpoint
    from lowbit_compiler.dump import load_summaries

    path = os.path.normpath(path)
    if checkpoint.is_checkpoint(path):
        summary = checkpoint.inspect_summary(path)
        summary.update(stages=[], kernel_sources={}, run=None)
        return {"source": path, "kind": "checkpoint", "graphs": [summary]}
    graphs = load_summaries(path)
    if not graphs:
        raise FileNotFoundError(f"lowbit report: no summary.json or stage files under {path} (a dump directory "
                                "from options={'dump_dir': ...}, a run or graph folder in it, or a saved checkpoint)")
    base = os.path.dirname(path)
    for g in graphs:
        rel = g["graph"]
        folder = os.path.join(path, *rel.split("/")) if os.path.isdir(os.path.join(path, *rel.split("/"))) else (
            os.path.join(base, *rel.split("/")) if os.path.isdir(os.path.join(base, *rel.split("/"))) else path)
        g.update(_graph_folder(folder))
    return {"source": path, "kind": "dump", "graphs": graphs}


# ---- node kinds and blocks -------------------------------------------------------------------

KINDS = {  # kind: (fill, label) -- the legend
    "lowbit": ("#f4a261", "lowbit op"),
    "linear": ("#e9c46a", "float matmul"),
    "norm": ("#8ecae6", "norm"),
    "attention": ("#b5a0e0", "attention"),
    "elementwise": ("#a8d5a2", "elementwise"),
    "io": ("#d9d9d9", "input / output"),
    "other": ("#f1f1f1", "view / other"),
    "block": ("#ffffff", "block (click to expand)"),
}
_ELEMENTWISE = ("add", "sub", "mul", "div", "neg", "silu", "gelu", "relu", "tanh", "sigmoid", "exp", "pow",
                "rsqrt", "sqrt", "softmax", "cat", "where", "mean", "clamp", "cos", "sin", "truediv", "iadd")


def kind_of(node: dict[str, Any]) -> str:
    target = node["target"].lower()
    if node["op"] in ("placeholder", "output"):
        return "io"
    if node["op"] == "get_attr":
        return "param"  # not drawn: the details of the nodes that read it list it
    if "lowbit" in target or "weight_quant" in node.get("lowbit", {}):  # a lowbit:: op, or bound to its kernel
        return "lowbit"
    if "norm" in target:
        return "norm"
    if "attention" in target or "sdpa" in target:
        return "attention"
    if node["op"] == "call_function" and re.search(r"(^|\.)(linear|matmul|mm|bmm|baddbmm|addmm|einsum)$", target):
        return "linear"
    leaf = target.rsplit(".", 1)[-1]
    if leaf.strip("_") in _ELEMENTWISE or leaf in _ELEMENTWISE:
        return "elementwise"
    return "other"


def assign_blocks(nodes: list[dict[str, Any]]) -> dict[str, str | None]:
    """Block of every node (``model.layers.3``) from its module FQN, the module list most nodes
    belong to winning (as the calibration engine finds blocks); a node whose module names no block
    (inserted by a pass, or a plain function such as ``apply_rotary_pos_emb``) joins the block of the
    nodes around it when the nearest such nodes before and after it are in the same block."""
    votes: dict[str, int] = {}
    found = {}
    for n in nodes:
        b = block_of(n["module"]) if n.get("module") else None
        found[n["name"]] = b
        if b:
            votes[b[0]] = votes.get(b[0], 0) + 1
    if not votes:
        return {n["name"]: None for n in nodes}
    prefix = max(votes, key=votes.get)
    direct = {name: (b[1] if b and b[0] == prefix else None) for name, b in found.items()}
    out: dict[str, str | None] = {}
    names = [n["name"] for n in nodes if n["op"] not in ("placeholder", "get_attr", "output")]
    before: str | None = None
    known_before: dict[str, str | None] = {}
    for name in names:
        if found[name] is not None:
            before = direct[name]
        known_before[name] = before
    after: str | None = None
    for name in reversed(names):
        if found[name] is not None:
            after = direct[name]
            out[name] = after
        else:
            out[name] = known_before[name] if known_before[name] == after else None
    for n in nodes:
        if n["op"] == "get_attr":
            out[n["name"]] = direct[n["name"]]
        elif n["op"] in ("placeholder", "output"):
            out[n["name"]] = None
    return out


def assign_groups(nodes: list[dict[str, Any]], min_nodes: int = 4) -> dict[str, str | None]:
    """The boxes a stage's picture collapses: the blocks (:func:`assign_blocks`), and outside them
    any module with at least ``min_nodes`` ops (``model.rotary_emb``)."""
    groups = assign_blocks(nodes)
    loose: dict[str, int] = {}
    for n in nodes:
        if groups.get(n["name"]) is None and n["op"] in ("call_function", "call_method", "call_module") and n.get("module"):
            loose[n["module"]] = loose.get(n["module"], 0) + 1
    for n in nodes:
        if groups.get(n["name"]) is None and loose.get(n.get("module") or "", 0) >= min_nodes \
                and n["op"] in ("call_function", "call_method", "call_module"):
            groups[n["name"]] = n["module"]
    return groups


# ---- layered layout --------------------------------------------------------------------------

NODE_W, NODE_H, GAP_X, GAP_Y = 180, 22, 16, 22


def layered_layout(units: list[str], edges: list[tuple[str, str]], sweeps: int = 4) -> dict[str, tuple[float, float]]:
    """Top-to-bottom positions (x, y of each box's top-left) of a DAG: each unit on the layer of its
    longest path from a source, units ordered within a layer by the mean position of their
    neighbours on the layer above (and then below), a few sweeps (Sugiyama's barycentre heuristic,
    without dummy nodes: long edges are drawn as curves)."""
    preds: dict[str, list[str]] = {u: [] for u in units}
    succs: dict[str, list[str]] = {u: [] for u in units}
    for a, b in edges:
        preds[b].append(a)
        succs[a].append(b)
    layer: dict[str, int] = {}
    for u in units:  # units come in graph (topological) order
        layer[u] = max((layer[p] + 1 for p in preds[u] if p in layer), default=0)  # a back edge (a group
        # that is not contiguous in the graph) does not move a unit down
    rows: dict[int, list[str]] = {}
    for u in units:
        rows.setdefault(layer[u], []).append(u)
    depth = max(rows, default=-1) + 1
    pos = {u: float(i) for row in rows.values() for i, u in enumerate(row)}
    for sweep in range(sweeps):
        order = range(1, depth) if sweep % 2 == 0 else range(depth - 2, -1, -1)
        for li in order:
            row = rows[li]
            near = preds if sweep % 2 == 0 else succs

            def bary(u: str) -> float:
                ns = near[u]
                return sum(pos[n] for n in ns) / len(ns) if ns else pos[u]
            row.sort(key=bary)
            for i, u in enumerate(row):
                pos[u] = float(i)
    width = max((len(r) for r in rows.values()), default=1)
    out = {}
    for li, row in rows.items():
        offset = (width - len(row)) / 2
        for i, u in enumerate(row):
            out[u] = ((offset + i) * (NODE_W + GAP_X) + 8, li * (NODE_H + GAP_Y) + 8)
    return out


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _label(node: dict[str, Any]) -> str:
    target = node["target"]
    if node["op"] in ("placeholder", "output", "get_attr"):
        text = node["name"] if node["op"] != "get_attr" else target
    else:
        text = re.sub(r"\.default$", "", target).rsplit(".", 1)[-1]  # lowbit.hadamard.default -> hadamard
        decision = node.get("lowbit", {}).get("weight_quant")
        if decision:
            text += f" {decision.get('format', '')}"
    return text if len(text) <= 22 else text[:21] + "…"


def graph_svg(nodes: list[dict[str, Any]], status: dict[str, str], sid: str, block: str | None,
              blocks: dict[str, str | None]) -> str:
    """One SVG: the stage's nodes outside every block, blocks as single boxes (``block=None``), or
    the nodes of one block. Parameters (get_attr) are not drawn (a node's details list them)."""
    by_name = {n["name"]: n for n in nodes}
    units: list[str] = []
    unit_of: dict[str, str] = {}
    box: dict[str, dict[str, Any]] = {}
    for n in nodes:
        if n["op"] == "get_attr":
            continue
        b = blocks.get(n["name"])
        if block is None and b is not None:
            u = "block:" + b
            if u not in box:
                units.append(u)
                box[u] = {"block": b, "nodes": 0, "changed": 0}
            box[u]["nodes"] += 1
            box[u]["changed"] += status.get(n["name"]) in ("added", "changed")
            unit_of[n["name"]] = u
        elif (block is None and b is None) or (block is not None and b == block):
            units.append(n["name"])
            unit_of[n["name"]] = n["name"]
    edges: list[tuple[str, str]] = []
    seen = set()
    for n in nodes:
        dst = unit_of.get(n["name"])
        if dst is None:
            continue
        for i in n["inputs"]:
            src = unit_of.get(i)
            if src is None or src == dst or (src, dst) in seen:
                continue
            seen.add((src, dst))
            edges.append((src, dst))
    pos = layered_layout(units, edges)
    width = max((x for x, _ in pos.values()), default=0) + NODE_W + 16
    height = max((y for _, y in pos.values()), default=0) + NODE_H + 16
    out = [f'<svg class="graph" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'data-stage="{sid}" data-block="{_esc(block or "")}" data-units="{len(units)}">']
    for a, b in edges:
        (x1, y1), (x2, y2) = pos[a], pos[b]
        x1, y1, x2, y2 = x1 + NODE_W / 2, y1 + NODE_H, x2 + NODE_W / 2, y2
        bend = max((y2 - y1) / 2, 12)
        out.append(f'<path class="edge" d="M{x1:.0f},{y1:.0f} C{x1:.0f},{y1 + bend:.0f} {x2:.0f},{y2 - bend:.0f} '
                   f'{x2:.0f},{y2:.0f}"/>')
    for u in units:
        x, y = pos[u]
        if u.startswith("block:"):
            info = box[u]
            cls = "node block" + (" changed" if info["changed"] else "")
            text = f'{info["block"]}: {info["nodes"]} ops' + (f', {info["changed"]} new' if info["changed"] else "")
            out.append(f'<g class="{cls}" data-block="{_esc(info["block"])}" data-stage="{sid}">'
                       f'<rect x="{x:.0f}" y="{y:.0f}" width="{NODE_W}" height="{NODE_H}" rx="8"/>'
                       f'<text x="{x + NODE_W / 2:.0f}" y="{y + 15:.0f}">{_esc(text if len(text) <= 30 else "…" + text[-29:])}</text></g>')
            continue
        n = by_name[u]
        kind = kind_of(n)
        cls = f"node k-{kind}" + (f" {status[u]}" if status.get(u) else "")
        out.append(f'<g class="{cls}" data-node="{_esc(u)}" data-stage="{sid}"><title>{_esc(n["target"])}</title>'
                   f'<rect x="{x:.0f}" y="{y:.0f}" width="{NODE_W}" height="{NODE_H}" rx="4" '
                   f'fill="{KINDS[kind][0]}"/><text x="{x + NODE_W / 2:.0f}" y="{y + 15:.0f}">{_esc(_label(n))}</text></g>')
    out.append("</svg>")
    return "".join(out)


def stage_status(nodes: list[dict[str, Any]], previous: list[dict[str, Any]] | None) -> tuple[dict[str, str], list[str]]:
    """Per node: "added" (no node of that name the stage before) or "changed" (another target,
    other inputs or other lowbit decisions); and the names of nodes the stage removed."""
    if previous is None:
        return {}, []
    before = {n["name"]: n for n in previous}
    status = {}
    for n in nodes:
        old = before.get(n["name"])
        if old is None:
            status[n["name"]] = "added"
        elif (old["target"], old["inputs"], old.get("lowbit")) != (n["target"], n["inputs"], n.get("lowbit")):
            status[n["name"]] = "changed"
    names = {n["name"] for n in nodes}
    return status, [name for name in before if name not in names]


# ---- tables ----------------------------------------------------------------------------------

def _num(value: Any, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "–"


def _heat(db: Any) -> str:
    """Background for a weight SQNR: red at 5 dB and below, green at 40 dB and above."""
    if not isinstance(db, (int, float)):
        return ""
    t = min(max((db - 5) / 35, 0.0), 1.0)
    return f' style="background:hsl({t * 120:.0f},70%,80%)"'


def _rotation_of(summary: dict[str, Any]) -> dict[str, str]:
    """Per layer, the rotations a rotate pass applied to its weight (R1 on the residual stream's
    readers and writers, R4's online Hadamard before it)."""
    out: dict[str, list[str]] = {}
    for p in summary.get("passes", []):
        d = p.get("details") or {}
        stream, rotated = d.get("stream") or {}, d.get("rotated") or {}
        if not rotated:
            continue
        if rotated.get("R1"):
            for layer in list(stream.get("readers", [])) + list(stream.get("writers", [])):
                out.setdefault(str(layer), []).append("R1")
        for layer in rotated.get("R4", []) or []:
            out.setdefault(str(layer), []).append("R4 (online Hadamard)")
    return {k: ", ".join(dict.fromkeys(v)) for k, v in out.items()}


def layer_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-layer table's rows: every layer record of the summary (quantized, or float with its
    reason), sizes from the coverage account for float ones."""
    rotation = _rotation_of(summary)
    rows = []
    for fqn, d in (summary.get("layers") or {}).items():
        elements = d.get("elements") or (d.get("in_features", 0) * d.get("out_features", 0) * max(d.get("experts", 0), 1))
        if "skipped" in d:
            nbytes = ((summary.get("coverage") or {}).get("weights") or {}).get(d.get("weight", ""), {}).get("bytes")
            rows.append({"layer": fqn, "format": d.get("format", "float"), "shape": "", "bits": None,
                         "before": nbytes, "after": nbytes, "weight_sqnr": None, "output_sqnr": None,
                         "sparsity": None, "rotation": rotation.get(fqn, ""), "note": d["skipped"]})
            continue
        shape = (f"{d['experts']}x" if d.get("experts") else "") + f"{d.get('in_features', '?')}x{d.get('out_features', '?')}"
        outliers = d.get("outliers") or 0
        rows.append({"layer": fqn, "format": d.get("format", "?"), "shape": shape, "bits": d.get("bits_per_weight"),
                     "elements": elements,
                     "before": d.get("bytes_before"), "after": d.get("bytes_after"),
                     "weight_sqnr": d.get("weight_sqnr_db"), "output_sqnr": d.get("output_sqnr_db"),
                     "sparsity": outliers / elements if outliers and elements else None,
                     "rotation": rotation.get(fqn, "input Hadamard" if d.get("input_hadamard") else ""),
                     "note": d.get("source", "")})
    return rows


def layers_table(summary: dict[str, Any]) -> str:
    rows = layer_rows(summary)
    if not rows:
        return '<p class="none">No layers quantized.</p>'
    head = [("layer", "s"), ("format", "s"), ("KxN", "s"), ("bits/w", "n"), ("bytes before", "n"), ("bytes after", "n"),
            ("weight SQNR dB", "n"), ("output SQNR dB", "n"), ("outliers", "n"), ("rotation", "s"), ("float because / note", "s")]
    out = ['<div class="tablewrap"><table class="sortable layers"><thead><tr>'
           + "".join(f'<th data-type="{t}">{_esc(h)}</th>' for h, t in head) + "</tr></thead><tbody>"]
    for r in rows:
        cells = [r["layer"], r["format"], r["shape"], _num(r["bits"], 3), r["before"] if r["before"] is not None else "–",
                 r["after"] if r["after"] is not None else "–"]
        out.append(f'<tr class="layer-row{" float" if r["format"] == "float" else ""}">'
                   + "".join(f"<td>{_esc(c)}</td>" for c in cells)
                   + f'<td class="heat"{_heat(r["weight_sqnr"])}>{_num(r["weight_sqnr"])}</td>'
                   + f"<td>{_num(r['output_sqnr'])}</td><td>{'%.3f%%' % (100 * r['sparsity']) if r['sparsity'] else '–'}</td>"
                   + f"<td>{_esc(r['rotation'])}</td><td>{_esc(r['note'])}</td></tr>")
    quantized = [r for r in rows if r["format"] != "float" and r["before"] is not None]
    before, after = sum(r["before"] for r in quantized), sum(r["after"] for r in quantized)
    out.append("</tbody><tfoot>")
    if after:
        out.append(f'<tr><td>quantized layers ({len(quantized)})</td><td></td><td></td>'
                   f"<td>{8 * after / max(sum(r['elements'] for r in quantized), 1):.3f}</td><td>{before}</td><td>{after}</td>"
                   f'<td colspan="5">{before / after:.2f}x smaller</td></tr>')
    totals = (summary.get("coverage") or {}).get("totals") or {}
    if totals.get("bytes_after"):
        out.append(f'<tr><td>whole graph (every tensor it reads)</td><td></td><td></td><td></td>'
                   f"<td>{totals['bytes_before']}</td><td>{totals['bytes_after']}</td>"
                   f'<td colspan="5">{totals["bytes_before"] / totals["bytes_after"]:.2f}x smaller</td></tr>')
    out.append("</tfoot></table></div>")
    return "".join(out)


def _refusals(value: Any, where: str = "") -> list[tuple[str, str]]:
    """Every ``{"what", "reason"}`` record and ``refused`` list in a pass's details."""
    found = []
    if isinstance(value, dict):
        if "reason" in value and isinstance(value.get("reason"), str):
            found.append((str(value.get("what") or value.get("layer") or where), value["reason"]))
        for k, v in value.items():
            if k != "reason":
                found += _refusals(v, str(k) if isinstance(v, (dict, list)) else where)
    elif isinstance(value, list):
        for v in value:
            found += _refusals(v, where)
    return found


def _detail_text(name: str, details: dict[str, Any]) -> str:
    """A pass's details as ``lowbit inspect`` prints them (rotations and affine transforms in full)."""
    from lowbit_compiler.cli import _detail, format_affine, format_rotation
    from lowbit_compiler.rotation import ROTATION_PASSES

    if name in ROTATION_PASSES:
        return format_rotation(details)
    if name == "flatquant" and details.get("groups"):
        return format_affine(details)
    return ", ".join(_detail(k, v) for k, v in details.items() if v not in (0, None, "", {}, []))


def timeline(summary: dict[str, Any]) -> str:
    passes = summary.get("passes") or []
    if not passes:
        return '<p class="none">No passes ran.</p>'
    total = sum(p["seconds"] for p in passes) or 1.0
    bar, x = [f'<svg class="timeline" xmlns="http://www.w3.org/2000/svg" width="100%" height="34" viewBox="0 0 1000 34" '
              'preserveAspectRatio="none">'], 0.0
    for i, p in enumerate(passes):
        w = 1000 * p["seconds"] / total
        bar.append(f'<rect x="{x:.1f}" y="2" width="{max(w, 1):.1f}" height="30" fill="hsl({(i * 67) % 360},55%,70%)">'
                   f'<title>{_esc(p["name"])}: {p["seconds"] * 1e3:.1f} ms</title></rect>')
        x += w
    bar.append("</svg>")
    skipped: dict[str, list[tuple[str, str]]] = {}  # pass -> the nodes it left alone (ir.SKIPPED), last stage
    last = next((st["nodes"] for st in reversed(summary.get("stages") or []) if st["nodes"]), [])
    for n in last:
        skip = (n.get("lowbit") or {}).get("skipped")
        if isinstance(skip, dict) and skip.get("pass_name"):
            skipped.setdefault(skip["pass_name"], []).append((n.get("module") or n["name"], skip.get("reason", "")))
    rows = []
    for i, p in enumerate(passes):
        refused = _refusals(p.get("details") or {})
        refused += [(w, r) for w, r in skipped.get(p["name"], []) if (w, r) not in refused]
        ref = "".join(f"<li><b>{_esc(w)}</b>: {_esc(r)}</li>" for w, r in refused[:50])
        more = f"<li>... {len(refused) - 50} more in summary.json</li>" if len(refused) > 50 else ""
        rows.append(f'<tr class="pass-row"><td><span class="swatch" style="background:hsl({(i * 67) % 360},55%,70%)">'
                    f'</span>{_esc(p["name"])}</td><td>{p["seconds"] * 1e3:.1f}</td><td>{p["matches"]}</td>'
                    f'<td>{"yes" if p.get("modified") else "no"}</td><td class="details">{_esc(_detail_text(p["name"], p.get("details") or {}))}</td>'
                    f'<td>{len(refused)}{f"<details><summary>why</summary><ul>{ref}{more}</ul></details>" if refused else ""}'
                    "</td></tr>")
    return ("".join(bar) + '<table class="passes"><thead><tr><th>pass</th><th>ms</th><th>matches</th><th>changed</th>'
            '<th>details</th><th>refused</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>")


def kernels_table(summary: dict[str, Any], gid: str) -> str:
    out = []
    generated = summary.get("generated_kernels") or []
    if generated:
        out.append('<table class="sortable kernels"><thead><tr>' + "".join(
            f'<th data-type="{t}">{h}</th>' for h, t in (
                ("generated call", "s"), ("layers", "s"), ("shape class", "s"), ("fused ops", "s"), ("grid", "s"),
                ("bytes read", "n"), ("written", "n"), ("min/read", "n"), ("sm_90 regs/spill B", "s"),
                ("modelled µs", "n"), ("source", "s"))) + "</tr></thead><tbody>")
        for r in generated:
            b, gpu = r.get("bytes_per_call") or {}, r.get("gpu") or {}
            read, written = b.get("read", r["bytes"]["read"]), b.get("written", r["bytes"]["written"])
            ops = [o for o in r.get("fused_ops", []) if o != "wo_linear"]
            regs = f"{gpu['registers']}/{gpu['spill_bytes']}" if gpu else "–"
            layers = r.get("layers") or [r.get("layer", "")]
            source = (f'<a href="#src-{gid}-{_esc(r["kernel"])}.py">{_esc(r["kernel"])}.py</a>'
                      if f'{r.get("kernel")}.py' in summary.get("kernel_sources", {}) else "–")
            out.append(f'<tr class="kernel-row"><td>{_esc(r["call"])}</td><td title="{_esc(" ".join(layers))}">'
                       f'{_esc(layers[0])}{f" (+{len(layers) - 1})" if len(layers) > 1 else ""}</td>'
                       f'<td>{_esc(r.get("variant", ""))}</td><td>{_esc(" ".join(ops) or "–")}</td>'
                       f'<td>{_esc("x".join(map(str, r.get("grid", []))))}</td><td>{read}</td><td>{written}</td>'
                       f'<td>{_num(b["min_read"] / b["read"], 2) if b.get("read") else "–"}</td>'
                       f'<td>{regs}</td>'
                       f"<td>{(read + written) / MODEL_BANDWIDTH * 1e6:.3f}</td><td>{source}</td></tr>")
        out.append(f'</tbody></table><p class="note">modelled time: bytes moved / {MODEL_BANDWIDTH / 1e12:.2f} TB/s '
                   f"({MODEL_GPU}; memory-bound kernels, no launch latency)</p>")
    impls = summary.get("implementations") or []
    if impls:
        grouped: dict[tuple[str, str], list[str]] = {}
        for r in impls:
            grouped.setdefault((r["op"], r["implementation"]), []).append(r.get("layer") or r["node"])
        out.append('<table class="impls"><thead><tr><th>lowbit op</th><th>runs on</th><th>calls</th><th>layers</th>'
                   "</tr></thead><tbody>")
        for (op, impl), where in grouped.items():
            links = "".join(f' <a href="#src-{gid}-{_esc(f)}">{_esc(f)}</a>' for f in summary.get("kernel_sources", {})
                            if f.rsplit(".", 1)[0] in impl)  # a generated CPU kernel named in the text
            out.append(f'<tr class="impl-row"><td>{_esc(op)}</td><td>{_esc(impl)}{links}</td><td>{len(where)}</td>'
                       f'<td>{_esc(", ".join(where[:6]))}{" ..." if len(where) > 6 else ""}</td></tr>')
        out.append("</tbody></table>")
    fallbacks = summary.get("fallbacks") or {}
    if fallbacks:
        out.append("<p class=\"warn\">fallbacks: " + _esc(", ".join(f"{k} x{v}" for k, v in fallbacks.items())) + "</p>")
    for name, source in summary.get("kernel_sources", {}).items():
        out.append(f'<details class="source" id="src-{gid}-{_esc(name)}"><summary>kernels/{_esc(name)}</summary>'
                   f"<pre>{_esc(source)}</pre></details>")
    return "".join(out) or '<p class="none">No lowbit ops to run (nothing quantized, or the graph did not lower).</p>'


def diff_html(diff: str | None) -> str:
    if not diff:
        return '<p class="none">no change</p>'
    lines = []
    for line in diff.splitlines():
        cls = ("add" if line.startswith("+") and not line.startswith("+++") else
               "del" if line.startswith("-") and not line.startswith("---") else
               "hunk" if line.startswith("@@") else "ctx")
        lines.append(f'<span class="{cls}">{_esc(line)}</span>')
    return '<pre class="diff">' + "\n".join(lines) + "</pre>"


# ---- the page --------------------------------------------------------------------------------

def _stages_html(g: dict[str, Any], gid: str, details: dict[str, Any]) -> str:
    out, previous = [], None
    for stage in g["stages"]:
        sid = f"{gid}-s{stage['index']}"
        nodes = stage["nodes"]
        head = f'<h4>{stage["index"]:02d} {_esc(stage["name"])}</h4>'
        if nodes is None:
            out.append(f'<div class="stage" data-stage="{sid}">{head}<p class="none">(no {stage["index"]:02d}_'
                       f'{_esc(stage["name"])}.json in this dump: a dump from before graph pictures; the code is below)</p>'
                       f'<details><summary>code</summary><pre>{_esc(stage["code"] or "")}</pre></details>'
                       f'<details><summary>diff to the stage before</summary>{diff_html(stage["diff"])}</details></div>')
            previous = None
            continue
        status, removed = stage_status(nodes, previous)
        blocks = assign_groups(nodes)
        counts = {s: sum(1 for v in status.values() if v == s) for s in ("added", "changed")}
        block_names = list(dict.fromkeys(b for b in (blocks.get(n["name"]) for n in nodes if n["op"] != "get_attr") if b))
        node_data = {}  # name -> [record index, status]: a node unchanged across stages is stored once
        params = {n["name"]: n["target"] for n in nodes if n["op"] == "get_attr"}
        for n in nodes:
            if n["op"] == "get_attr":
                continue
            record = {k: n[k] for k in ("op", "target", "module", "shape", "source", "lowbit") if n.get(k)}
            record.update(name=n["name"], inputs=[params.get(i, i) for i in n["inputs"]], kind=kind_of(n))
            key = json.dumps(record, sort_keys=True, default=str)
            if key not in details["index"]:
                details["index"][key] = len(details["records"])
                details["records"].append(record)
            node_data[n["name"]] = [details["index"][key]] + ([status[n["name"]]] if status.get(n["name"]) else [])
        details["stages"][sid] = node_data
        change = (f'{counts["added"]} nodes added, {counts["changed"]} changed, {len(removed)} removed'
                  if previous is not None else f"{len(node_data)} nodes")
        sub = "".join(f'<div class="block-view" data-block="{_esc(b)}" hidden><h5>{_esc(b)} '
                      f'<button class="collapse">collapse</button></h5><template>{graph_svg(nodes, status, sid, b, blocks)}</template></div>'
                      for b in block_names)
        last = stage is g["stages"][-1]
        code = (f'<details><summary>code</summary><pre>{_esc(stage["code"] or "")}</pre></details>'
                if previous is None or last else "")  # the stages between: their diffs say it
        out.append(f'<div class="stage" data-stage="{sid}" data-name="{_esc(stage["name"])}">{head}<p class="meta">{change}; '
                   f'{len(block_names)} blocks and modules collapsed (click one to expand it; click a node for its details)</p>'
                   f'<div class="svgwrap">{graph_svg(nodes, status, sid, None, blocks)}</div>{sub}{code}'
                   f'<details{" open" if stage["diff"] and len(stage["diff"]) < 6000 else ""}><summary>diff to the '
                   f'stage before</summary>{diff_html(stage["diff"])}</details></div>')
        previous = nodes
    return "".join(out) or '<p class="none">No stages dumped (a checkpoint, or a graph that failed at capture).</p>'


def _graph_html(g: dict[str, Any], gid: str, details: dict[str, Any]) -> str:
    title = _esc(g.get("graph", "?"))
    if "incomplete" in g:
        return (f'<section class="graph-section" id="{gid}"><h2>{title}</h2><p class="warn">No summary.json: the '
                f'compile of this graph did not finish. Stages written: {_esc(", ".join(g["incomplete"]))}</p>'
                f'<h3>Stages</h3>{_stages_html(g, gid, details)}</section>')
    recipe = (g.get("recipe") or {}).get("name", "?")
    error = g.get("error")
    head = (f'<p>recipe <b>{_esc(recipe)}</b>, target <b>{_esc(g.get("target", "?"))}</b>, inputs {_esc(g.get("inputs", "?"))}'
            f', frozen parameters {_esc(g.get("frozen_parameters", "?"))}</p>')
    head += "".join(f'<p class="note">note: {_esc(n)}</p>' for n in g.get("notes", []))
    if error:
        head += (f'<p class="warn">FAILED in {_esc(error.get("stage", "?"))}: {_esc(error["type"])}: '
                 f'{_esc(error["message"])}</p><details><summary>traceback</summary><pre>'
                 f'{_esc(error.get("traceback", ""))}</pre></details>')
    return (f'<section class="graph-section" id="{gid}"><h2>{title}</h2>{head}'
            f'<div class="part pipeline"><h3>Pipeline</h3>{timeline(g)}</div>'
            f'<div class="part layers"><h3>Layers</h3>{layers_table(g)}</div>'
            f'<div class="part kernels"><h3>Kernels</h3>{kernels_table(g, gid)}</div>'
            f'<div class="part stages"><h3>Stages</h3>{_stages_html(g, gid, details)}</div></section>')


def counts(data: dict[str, Any]) -> dict[str, int]:
    """What the page must show, from the summaries alone (the browser test checks the DOM against it):
    layer rows, generated-kernel rows, and SVG pictures of stages."""
    return {"graphs": len(data["graphs"]),
            "layer_rows": sum(len(g.get("layers") or {}) for g in data["graphs"]),
            "kernel_rows": sum(len(g.get("generated_kernels") or []) for g in data["graphs"]),
            "stage_svgs": sum(1 for g in data["graphs"] for s in g.get("stages", []) if s["nodes"] is not None)}


_CSS = """
body{font:13px/1.4 system-ui,sans-serif;margin:0;display:flex;color:#222}
nav{width:230px;flex:none;height:100vh;overflow:auto;position:sticky;top:0;background:#f6f6f6;padding:8px;box-sizing:border-box}
nav a{display:block;color:#225;text-decoration:none;padding:1px 0;word-break:break-all}
main{flex:1;padding:0 16px 40px;min-width:0}
h1{font-size:18px}h2{font-size:16px;border-bottom:2px solid #ccc;margin-top:28px}h3{font-size:14px;margin-bottom:4px}
h4{margin:14px 0 2px}table{border-collapse:collapse;margin:4px 0}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#eee;cursor:default}table.sortable th{cursor:pointer}
th.asc::after{content:" ▲"}th.desc::after{content:" ▼"}tfoot td{font-weight:bold;background:#fafafa}
tr.float td{color:#775}.warn{color:#a00}.note,.meta,.none{color:#666}
.passes td.details{white-space:pre-wrap;text-align:left;font-size:12px}.tablewrap{max-height:420px;overflow:auto}td{white-space:nowrap}.svgwrap,.block-view{overflow:auto;max-height:620px;border:1px solid #ddd;margin:4px 0}
svg.graph text{font:11px monospace;text-anchor:middle;pointer-events:none}svg.graph .block text{font-size:10px}
svg.graph .edge{fill:none;stroke:#999;stroke-width:1}
svg.graph .node rect{stroke:#666;stroke-width:1;cursor:pointer}
svg.graph .node.added rect{stroke:#d00;stroke-width:3}svg.graph .node.changed rect{stroke:#06c;stroke-width:3;stroke-dasharray:4 2}
svg.graph .block rect{fill:#fff;stroke:#333;stroke-width:2}svg.graph .node.selected rect{stroke:#000;stroke-width:4}
#panel{position:fixed;right:8px;bottom:8px;width:420px;max-height:45vh;overflow:auto;background:#fff;border:1px solid #888;
padding:8px;box-shadow:0 2px 8px #0003;font:12px monospace;white-space:pre-wrap}
pre{background:#fafafa;padding:6px;overflow:auto;max-height:480px;font-size:12px}
pre.diff .add{background:#e6ffec;color:#064}pre.diff .del{background:#ffebe9;color:#900}pre.diff .hunk{color:#06c}
.legend span{display:inline-block;padding:1px 6px;margin-right:4px;border:1px solid #666;border-radius:3px}
.swatch{display:inline-block;width:10px;height:10px;margin-right:4px}svg.timeline{border:1px solid #ccc;max-width:1000px}
"""

_JS = r"""
(function(){
var errors=[];
window.addEventListener('error',function(e){errors.push(String(e.message));mark();});
function mark(){document.body.setAttribute('data-rendered',errors.length?'error: '+errors.join('; '):'ok');}
try{
var mode=location.search.slice(1);
var details=JSON.parse(document.getElementById('node-data').textContent);
var panel=document.getElementById('panel');
function show(stage,name,g){
  var e=(details.stages[stage]||{})[name];if(!e)return;var d=details.records[e[0]],status=e[1];
  document.querySelectorAll('.node.selected').forEach(function(e){e.classList.remove('selected');});
  g.classList.add('selected');
  var text=name+'  ('+d.kind+(status?', '+status+' by this stage':'')+')\n'+d.op+' '+d.target+'\n';
  if(d.shape)text+='shape: '+d.shape+'\n';if(d.module)text+='module: '+d.module+'\n';
  if(d.source)text+='source: '+d.source+'\n';text+='inputs: '+d.inputs.join(', ')+'\n';
  text+='node.meta["lowbit"]: '+(d.lowbit?JSON.stringify(d.lowbit,null,1):'(none)');
  panel.textContent=text;panel.hidden=false;}
document.addEventListener('click',function(e){  // one listener: block pictures are filled in on first expand
  var g=e.target.closest?e.target.closest('svg.graph .node'):null;if(!g)return;
  var stage=g.getAttribute('data-stage');
  if(g.classList.contains('block')){
    var v=document.querySelector('.stage[data-stage="'+stage+'"] .block-view[data-block="'+g.getAttribute('data-block')+'"]');
    if(!v)return;var tpl=v.querySelector('template');
    if(tpl){v.appendChild(tpl.content.cloneNode(true));tpl.remove();}
    v.hidden=!v.hidden;if(!v.hidden&&mode!=='screenshot')v.scrollIntoView({block:'nearest'});
  }else show(stage,g.getAttribute('data-node'),g);});
document.querySelectorAll('button.collapse').forEach(function(b){b.addEventListener('click',function(){b.closest('.block-view').hidden=true;});});
document.getElementById('panel-close').addEventListener('click',function(){panel.hidden=true;});
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('th').forEach(function(th,i){th.addEventListener('click',function(){
    var asc=!th.classList.contains('asc');t.querySelectorAll('th').forEach(function(h){h.classList.remove('asc','desc');});
    th.classList.add(asc?'asc':'desc');var num=th.getAttribute('data-type')==='n';var body=t.tBodies[0];
    var rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){var x=a.cells[i].textContent,y=b.cells[i].textContent;
      if(num){x=parseFloat(x);y=parseFloat(y);x=isNaN(x)?-Infinity:x;y=isNaN(y)?-Infinity:y;return asc?x-y:y-x;}
      return asc?x.localeCompare(y):y.localeCompare(x);});
    rows.forEach(function(r){body.appendChild(r);});});});});
var seen={layers:document.querySelectorAll('tr.layer-row').length,kernels:document.querySelectorAll('tr.kernel-row').length,
  svgs:document.querySelectorAll('.svgwrap > svg.graph').length};
document.getElementById('render-counts').textContent='rendered: '+seen.layers+' layer rows, '+seen.kernels+
  ' kernel rows, '+seen.svgs+' stage graphs';
if(mode==='selftest'){  // what a person would click, checked (the browser test reads data-selftest)
  var problems=[],node=document.querySelector('svg.graph .node:not(.block)');
  if(node){node.dispatchEvent(new MouseEvent('click',{bubbles:true}));
    if(panel.hidden||panel.textContent.indexOf('node.meta["lowbit"]')<0)problems.push('node click showed no details');}
  var blk=document.querySelector('svg.graph .node.block');
  if(blk){blk.dispatchEvent(new MouseEvent('click',{bubbles:true}));
    var v=document.querySelector('.stage[data-stage="'+blk.getAttribute('data-stage')+'"] .block-view[data-block="'+blk.getAttribute('data-block')+'"]');
    if(!v||v.hidden||!v.querySelector('svg.graph'))problems.push('block click did not expand it');}
  var th=document.querySelector('table.layers th:nth-child(7)');
  if(th){th.click();th.click();var cells=Array.prototype.map.call(th.closest('table').tBodies[0].rows,function(r){
      var x=parseFloat(r.cells[6].textContent);return isNaN(x)?-Infinity:x;});
    for(var i=1;i<cells.length;i++)if(cells[i]>cells[i-1])problems.push('sort by weight SQNR failed');}
  document.body.setAttribute('data-selftest',problems.length?problems.join('; '):'ok');}
if(mode==='screenshot'){  // the README's picture: a graph's timeline, then the first stage its passes changed,
  // a block open, a lowbit op selected (everything else of the page hidden)
  var changed=document.querySelector('.stage[data-name^="rotate"] svg.graph .node.block.changed')||
    document.querySelector('svg.graph .node.block.changed');
  if(changed){var st=changed.closest('.stage'),sec=st.closest('.graph-section');
    Array.prototype.forEach.call(document.querySelector('main').children,function(e){
      if(e!==sec&&e.tagName!=='H1')e.style.display='none';});
    sec.querySelectorAll('.part.layers,.part.kernels,.part.stages').forEach(function(e){e.style.display='none';});
    sec.appendChild(st);
    st.querySelectorAll('details').forEach(function(d){d.open=false;});st.querySelector('.svgwrap').style.maxHeight='250px';
    changed.dispatchEvent(new MouseEvent('click',{bubbles:true}));
    var view=st.querySelector('.block-view:not([hidden])'),op=view&&(view.querySelector('.node.k-lowbit.added')||view.querySelector('.node.k-lowbit'));
    if(op){op.dispatchEvent(new MouseEvent('click',{bubbles:true}));var r=op.querySelector('rect');
      view.scrollLeft=Math.max(0,+r.getAttribute('x')-view.clientWidth/2);view.scrollTop=Math.max(0,+r.getAttribute('y')-60);
      panel.style.left='8px';panel.style.right='auto';panel.style.width='360px';}
    window.scrollTo(0,0);}}
}catch(e){errors.push(String(e&&e.stack||e));}
mark();
})();
"""


def render(data: dict[str, Any]) -> str:
    details: dict[str, Any] = {"records": [], "index": {}, "stages": {}}
    nav, sections, current = [], [], object()
    for i, g in enumerate(data["graphs"]):
        gid = f"g{i}"
        run = g.get("run") or {}
        key = run.get("run")
        if key != current and key:
            nav.append(f"<b>{_esc(key)}</b>")
            argv = " ".join(run.get("argv") or [])
            sections.append(f'<h2 class="run">run {_esc(key)}: recipe {_esc(run.get("recipe"))}, pid {_esc(run.get("pid"))}, '
                            f'started {_esc(run.get("started"))}</h2>' + (f'<p class="note">command: {_esc(argv)}</p>' if argv else ""))
            current = key
        label = g.get("graph", gid).split("/")[-1]
        nav.append(f'<a href="#{gid}">{_esc(label)}{" ✗" if g.get("error") or "incomplete" in g else ""}</a>')
        sections.append(_graph_html(g, gid, details))
    c = counts(data)
    legend = "".join(f'<span style="background:{fill}">{_esc(label)}</span>' for fill, label in KINDS.values())
    legend += '<span style="outline:3px solid #d00">added by the stage</span><span style="outline:3px dashed #06c">changed</span>'
    del details["index"]
    blob = json.dumps(details, separators=(",", ":"), default=str).replace("</", "<\\/")
    summary_line = (f'{c["graphs"]} graph(s), {c["layer_rows"]} layer rows, {c["kernel_rows"]} generated kernel rows, '
                    f'{c["stage_svgs"]} stage graphs')
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>lowbit report: "
            f"{_esc(os.path.basename(data['source']))}</title><style>{_CSS}</style></head><body>"
            f'<nav><a href="#top"><b>lowbit report</b></a>{"".join(nav)}</nav><main id="top">'
            f"<h1>lowbit report: {_esc(data['source'])} ({data['kind']})</h1>"
            f'<p id="summary" data-counts="{_esc(json.dumps(c))}">{summary_line}</p><p id="render-counts"></p>'
            f'<p class="legend">{legend}</p>{"".join(sections)}</main>'
            '<div id="panel" hidden></div><button id="panel-close" style="position:fixed;right:8px;top:8px">close details</button>'
            f'<script type="application/json" id="node-data">{blob}</script><script>{_JS}</script></body></html>')


def write_report(path: str, out: str | None = None) -> tuple[str, dict[str, Any]]:
    """Render the report of ``path`` (dump dir, run or graph folder, or checkpoint) to ``out``
    (default ``report.html``); returns the file and :func:`counts`."""
    data = load(path)
    out = out or "report.html"
    with open(out, "w", encoding="utf-8") as f:
        f.write(render(data))
    return out, counts(data)
