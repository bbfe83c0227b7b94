"""Plots of the benchmarks' JSON results, as hand-written SVG (no plotting library).

    accuracy_svg(result)   bits per weight (log scale) against the accuracy loss (KL vs float for a
                           causal LM, 1 - embedding cosine for an encoder), one point per recipe,
                           the Pareto front (no other recipe both smaller and more accurate) marked
    decode_svg(result)     ms/token per contender, horizontal bars

``benchmarks/accuracy.py --plot`` and ``benchmarks/decode_cpu.py --plot`` call these (with
``--from-json`` they plot an earlier run's JSON without measuring again).
"""
from __future__ import annotations

import html
import math
from typing import Any

FONT = 'font-family="system-ui,sans-serif" font-size="11"'
TITLE = 'font-family="system-ui,sans-serif" font-size="13" font-weight="bold"'


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def loss_of(row: dict[str, Any], causal: bool) -> float | None:
    if causal:
        return max(row.get("kl", 0.0), 0.0) if "perplexity" in row else None
    cosine = row.get("embedding_cosine")
    return None if cosine is None else max(1.0 - cosine, 0.0)


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the points no other point beats on both axes (fewer bits and less loss, one of
    them strictly)."""
    front = []
    for name, bits, loss in points:
        beaten = any((b <= bits and l <= loss) and (b < bits or l < loss) for _, b, l in points)
        if not beaten:
            front.append(name)
    return front


def accuracy_svg(result: dict[str, Any], width: int = 900, height: int = 540) -> str:
    causal = result.get("causal", True)
    points = [(r["recipe"], float(r["bits_per_weight"]), loss) for r in result["rows"]
              if (loss := loss_of(r, causal)) is not None]
    front = set(pareto_front(points))
    left, right, top, bottom = 64, 60, 34, 46
    pw, ph = width - left - right, height - top - bottom
    lo_bits, hi_bits = min(b for _, b, _ in points), max(b for _, b, _ in points)
    # x: log scale over the low-bit range on most of the width; wider formats (16, 32 bits: float,
    # rotation alone) squeezed into the last part, after a break
    knee = min(max(9.0, lo_bits * 1.5), hi_bits * 1.05)
    lo_x, knee_x, hi_x = math.log2(lo_bits * 0.93), math.log2(knee), math.log2(hi_bits * 1.05)
    split = 0.85 if hi_bits > knee else 1.0
    positive = [l for _, _, l in points if l > 0]
    floor = min(positive) / 2 if positive else 1e-4  # a loss of 0 (or below) is drawn on the floor
    lo_y, hi_y = math.log10(floor), math.log10(max(positive, default=1.0) * 1.5)

    def x(bits: float) -> float:
        if bits <= knee or split == 1.0:
            return left + (math.log2(bits) - lo_x) / (knee_x - lo_x) * split * pw
        return left + (split + 0.04 + (math.log2(bits) - knee_x) / (hi_x - knee_x) * (0.96 - split)) * pw

    def y(loss: float) -> float:
        return top + ph - (math.log10(max(loss, floor)) - lo_y) / (hi_y - lo_y) * ph

    metric = ("KL(float ‖ quantized), nats/token" if causal else "1 − embedding cosine") + " (log scale)"
    name = str(result.get("model", "")).rstrip("/").rsplit("/", 1)[-1]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="20" {TITLE}>{_esc(name)}: bits per weight against '
           f'accuracy loss, {len(points)} recipes (red: Pareto front; 0 drawn at {floor:.1g})</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>']
    for tick in (2, 3, 4, 5, 6, 8, 12, 16, 24, 32):
        if lo_bits * 0.93 <= tick <= hi_bits * 1.05 and (tick <= knee or tick in (16, 32)):
            tx = x(tick)
            out.append(f'<line x1="{tx:.1f}" y1="{top}" x2="{tx:.1f}" y2="{top + ph}" stroke="#eee"/>'
                       f'<text x="{tx:.1f}" y="{top + ph + 15}" {FONT} text-anchor="middle">{tick}</text>')
    if split < 1.0:
        bx = left + (split + 0.02) * pw
        out.append(f'<text x="{bx:.1f}" y="{top + ph + 4}" font-family="sans-serif" font-size="16" text-anchor="middle">≈</text>')
    for exponent in range(math.floor(lo_y), math.ceil(hi_y) + 1):
        for mantissa in (1, 2, 5):
            tick = mantissa * 10.0 ** exponent
            if not lo_y <= math.log10(tick) <= hi_y:
                continue
            ty = y(tick)
            out.append(f'<line x1="{left}" y1="{ty:.1f}" x2="{left + pw}" y2="{ty:.1f}" stroke="{"#ddd" if mantissa == 1 else "#f3f3f3"}"/>'
                       f'<text x="{left - 6}" y="{ty + 4:.1f}" {FONT} text-anchor="end">{tick:g}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 8}" {FONT} text-anchor="middle">bits per weight (log scale; '
               'true storage of the quantized linears)</text>'
               f'<text transform="translate(14,{top + ph / 2}) rotate(-90)" {FONT} text-anchor="middle">{_esc(metric)}</text>')
    frontier = sorted((p for p in points if p[0] in front), key=lambda p: p[1])
    if len(frontier) > 1:
        path = " ".join(f"{'M' if i == 0 else 'L'}{x(b):.1f},{y(l):.1f}" for i, (_, b, l) in enumerate(frontier))
        out.append(f'<path d="{path}" fill="none" stroke="#d33" stroke-width="1.5" stroke-dasharray="5 3"/>')
    placed: list[tuple[float, float, float, float]] = []
    for name, bits, loss in sorted(points, key=lambda p: (p[0] not in front, p[2])):
        px, py = x(bits), y(loss)
        on_front = name in front
        out.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="{4 if on_front else 3}" fill="{"#d33" if on_front else "#36c"}">'
                   f"<title>{_esc(name)}: {bits:.2f} bits/weight, loss {loss:.4f}</title></circle>")
        w = 6.2 * len(name) + 4
        for dy in (0, 12, -12, 24, -24, 36, -36, 48, -48, 60, -60):  # the first free slot right of the point
            for dx in (6, -6 - w):
                box = (px + dx, py + dy - 9, px + dx + w, py + dy + 3)
                if box[0] < 2 or box[2] > width - 2:
                    continue
                if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                    break
            else:
                continue
            break
        placed.append(box)
        if dy:
            out.append(f'<line x1="{px:.1f}" y1="{py:.1f}" x2="{box[0] if dx > 0 else box[2]:.1f}" y2="{box[3] - 4:.1f}" '
                       'stroke="#bbb"/>')
        out.append(f'<text x="{box[0] + 2:.1f}" y="{box[3] - 1:.1f}" {FONT} fill="{"#a00" if on_front else "#234"}">'
                   f"{_esc(name)}</text>")
    out.append("</svg>")
    return "\n".join(out)


def decode_svg(result: dict[str, Any], width: int = 760) -> str:
    rows = result["rows"]
    bar_h, left, right, top = 24, 130, 140, 44
    height = top + len(rows) * (bar_h + 8) + 34
    worst = max(r["ms_per_token"] for r in rows) or 1.0
    pw = width - left - right
    cfg = result.get("config", {})
    title = (f"decode, batch 1, {cfg.get('layers', '?')} layers, prompt {cfg.get('prompt', '?')}: ms/token "
             f"(median of {cfg.get('steps', '?')} steps; read bandwidth {result.get('read_bandwidth_GBps', '?')} GB/s)")
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="10" y="20" {TITLE}>{_esc(title)}</text>']
    for i, r in enumerate(rows):
        yy = top + i * (bar_h + 8)
        w = r["ms_per_token"] / worst * pw
        colour = "#36c" if r["contender"].startswith("lowbit") else "#999"
        out.append(f'<text x="{left - 8}" y="{yy + 16}" {FONT} text-anchor="end">{_esc(r["contender"])}</text>'
                   f'<rect x="{left}" y="{yy}" width="{w:.1f}" height="{bar_h}" fill="{colour}"/>'
                   f'<text x="{left + w + 6:.1f}" y="{yy + 16}" {FONT}>{r["ms_per_token"]:.1f} ms '
                   f'({r.get("speedup_vs_eager_fp32", 0):.2f}x)</text>')
    out.append(f'<text x="{left}" y="{height - 10}" {FONT} fill="#666">lower is better; (Nx): speed-up over eager fp32; '
               "grey: eager PyTorch, blue: backend=\"lowbit\"</text></svg>")
    return "\n".join(out)
