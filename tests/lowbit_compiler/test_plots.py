"""benchmarks/plots.py: the Pareto front, and SVGs that parse with one mark per result row."""
from __future__ import annotations

import importlib.util
import os
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location("plots", os.path.join(ROOT, "benchmarks", "plots.py"))
plots = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plots)
SVG = "{http://www.w3.org/2000/svg}"


def test_pareto_front():
    points = [("float", 32.0, 0.0), ("w8", 8.0, 0.0), ("w4", 4.2, 0.004), ("w4-gptq", 4.2, 0.001),
              ("w3", 3.2, 0.02), ("w3-gptq", 3.2, 0.006), ("nf4", 4.25, 0.004), ("mixed", 4.5, 0.0011)]
    # float loses to w8 (same loss, fewer bits); w4 and nf4 to w4-gptq; w3 to w3-gptq; mixed to w4-gptq
    assert plots.pareto_front(points) == ["w8", "w4-gptq", "w3-gptq"]


def test_accuracy_svg_has_every_recipe():
    rows = [{"recipe": "float", "bits_per_weight": 32.0, "perplexity": 2.5, "kl": 0.0},
            {"recipe": "w8a16", "bits_per_weight": 8.05, "perplexity": 2.5, "kl": 0.0},
            {"recipe": "w4a16", "bits_per_weight": 4.19, "perplexity": 2.56, "kl": 0.0041},
            {"recipe": "w4a16-gptq", "bits_per_weight": 4.19, "perplexity": 2.55, "kl": 0.0012},
            {"recipe": "w3a16", "bits_per_weight": 3.19, "perplexity": 2.59, "kl": 0.0203}]
    root = ET.fromstring(plots.accuracy_svg({"model": "/m/byte-llama", "causal": True, "rows": rows}))
    circles = root.findall(f"{SVG}circle")
    assert len(circles) == len(rows)
    red = {c.find(f"{SVG}title").text.split(":")[0] for c in circles if c.get("fill") == "#d33"}
    assert red == {"w8a16", "w4a16-gptq", "w3a16"}
    # more loss is drawn higher (smaller y)
    cy = {c.find(f"{SVG}title").text.split(":")[0]: float(c.get("cy")) for c in circles}
    assert cy["w3a16"] < cy["w4a16"] < cy["w4a16-gptq"] < cy["w8a16"]
    labels = [t.text for t in root.iter(f"{SVG}text")]
    assert all(r["recipe"] in labels for r in rows)


def test_decode_svg_has_one_bar_per_contender():
    rows = [{"contender": "eager fp32", "ms_per_token": 96.2, "speedup_vs_eager_fp32": 1.0},
            {"contender": "lowbit w4a16", "ms_per_token": 17.2, "speedup_vs_eager_fp32": 5.59}]
    root = ET.fromstring(plots.decode_svg({"config": {"layers": 8}, "rows": rows}))
    bars = [r for r in root.findall(f"{SVG}rect") if r.get("fill") in ("#36c", "#999")]
    assert len(bars) == 2
    assert abs(float(bars[1].get("width")) / float(bars[0].get("width")) - 17.2 / 96.2) < 1e-3
