"""`lowbit report` (one HTML page of a dump or checkpoint) and `lowbit inspect --json`.

The page is checked twice: here as text against what the summaries hold, and in headless Chromium
(test_report_renders_in_chromium): no script error, the DOM's rows and pictures as many as the
summaries say, a click on a node shows its decisions, a click on a block expands it, sorting
sorts. The browser test skips only when Chromium is missing and LOWBIT_REQUIRE_BROWSER is unset
(CI sets it: .ci/run installs Debian's chromium).
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess

import pytest
import torch

from lowbit_compiler import PRESETS, report
from lowbit_compiler.cli import main as cli_main
from tests.conftest import make_model, prompt

FIXTURE_CHECKPOINT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "checkpoint_v1", "model")


@pytest.fixture(scope="module")
def triton_dump(tmp_path_factory):
    """A tiny Llama under w4a16 with generated kernels (Triton's interpreter), one graph."""
    root = tmp_path_factory.mktemp("dump")
    model = make_model("llama")
    torch.compiler.reset()
    with torch.no_grad():
        torch.compile(model, backend="lowbit", options={"recipe": "w4a16", "target": "triton",
                                                        "dump_dir": str(root)})(prompt())
    torch.compiler.reset()
    return root


def _summary(root) -> dict:
    (path,) = glob.glob(os.path.join(root, "run_*", "graph_*", "summary.json"))
    with open(path) as f:
        return json.load(f)


@pytest.mark.heavy
def test_report_holds_what_the_summary_holds(triton_dump, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert cli_main(["report", str(triton_dump), "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    page = out.read_text()
    summary = _summary(triton_dump)
    stages = sorted(glob.glob(os.path.join(triton_dump, "run_*", "graph_*", "[0-9][0-9]_*.py")))
    assert len(summary["generated_kernels"]) > 0
    assert page.count('<tr class="layer-row') == len(summary["layers"]) == 15
    assert page.count('<tr class="kernel-row"') == len(summary["generated_kernels"])
    assert len(re.findall(r'<div class="svgwrap"><svg class="graph"', page)) == len(stages) == 4
    # self-contained: nothing fetched
    assert not re.search(r'(src|href)="(https?:)?//', page)
    # every generated kernel's source is in the page and its row links to it
    for name in {r["kernel"] for r in summary["generated_kernels"]}:
        assert f'href="#src-g0-{name}.py"' in page and f'id="src-g0-{name}.py"' in page
    # the quantizing stage: wo_linear nodes added, with their decision in the node data
    data = json.loads(re.search(r'<script type="application/json" id="node-data">(.*?)</script>', page, re.S).group(1))
    quant_stage = data["stages"]["g0-s2"]
    added = [name for name, entry in quant_stage.items() if entry[1:] == ["added"]]
    decisions = [data["records"][quant_stage[name][0]]["lowbit"]["weight_quant"] for name in added
                 if "weight_quant" in data["records"][quant_stage[name][0]].get("lowbit", {})]
    assert sorted(d["layer"] for d in decisions) == sorted(summary["layers"])
    assert all(d["format"] == "int4_g128_asym" for d in decisions)
    # the stage picture collapses the two decoder blocks into one box each
    assert page.count('class="node block') >= 2 * len(stages)
    assert 'data-block="model.layers.1"' in page
    # the diffs are rendered as diffs
    assert '<span class="add">+' in page and "lowbit.wo_linear" in page


@pytest.mark.heavy
def test_node_kinds_and_source_lines(triton_dump):
    (path,) = glob.glob(os.path.join(triton_dump, "run_*", "graph_*", "02_insert_weight_quant.json"))
    with open(path) as f:
        nodes = json.load(f)
    kinds = {}
    for n in nodes["nodes"]:
        kinds.setdefault(report.kind_of(n), []).append(n)
    assert len(kinds["lowbit"]) == 15 and {n["module"] for n in kinds["lowbit"]} >= {"model.layers.0.mlp.down_proj"}
    assert len(kinds["norm"]) == 5 and len(kinds["attention"]) == 2
    assert "linear" not in kinds  # every linear was quantized
    assert any("modeling_llama.py" in n.get("source", "") for n in kinds["norm"])
    blocks = report.assign_blocks(nodes["nodes"])
    assert {blocks[n["name"]] for n in kinds["lowbit"] if n["module"] != "lm_head"} == {"model.layers.0", "model.layers.1"}
    assert blocks[[n for n in kinds["lowbit"] if n["module"] == "lm_head"][0]["name"]] is None


def test_timeline_lists_what_a_pass_left_alone_and_why(tmp_path):
    """Layers excluded by the recipe: the pass's refusals name them with the reason, and the layer
    table shows them float with it."""
    from lowbit_compiler import PRESETS as presets

    recipe = presets["w8a16"].replace(exclude=("lm_head", "*.mlp.down_proj"))
    with torch.no_grad():
        torch.compile(make_model("llama"), backend="lowbit", options={"recipe": recipe, "dump_dir": str(tmp_path)})(prompt())
    page, _ = report.write_report(str(tmp_path), str(tmp_path / "r.html"))
    text = open(page).read()
    row = re.search(r'<tr class="pass-row">.*?insert_weight_quant.*?</tr>', text, re.S).group(0)
    assert re.search(r"</td><td>3<details>", row)  # lm_head and two down_proj
    for layer in ("lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"):
        assert f"<li><b>{layer}</b>: excluded by the recipe" in row
        assert re.search(rf'<tr class="layer-row float"><td>{re.escape(layer)}</td>(?:(?!</tr>).)*excluded by', text)


def test_layered_layout_puts_edges_downward_without_overlap():
    units = ["a", "b", "c", "d", "e", "f"]
    edges = [("a", "c"), ("b", "d"), ("a", "e"), ("c", "e"), ("d", "f"), ("b", "f")]
    pos = report.layered_layout(units, edges)
    assert all(pos[dst][1] > pos[src][1] for src, dst in edges)
    assert pos["e"][1] > pos["c"][1] > pos["a"][1]  # longest path: e below c
    assert len(set(pos.values())) == len(units)
    # barycentre ordering: c (child of a) left of d (child of b) when a is left of b
    assert (pos["c"][0] < pos["d"][0]) == (pos["a"][0] < pos["b"][0])


def test_stage_status_and_blocks_of_inserted_nodes():
    def node(name, module=None, target="x", inputs=()):
        return {"name": name, "op": "call_function", "target": target, "inputs": list(inputs), "module": module}
    before = [node("a", "model.layers.0.mlp"), node("b", "model.layers.0.mlp", inputs=["a"]), node("c", "lm_head")]
    after = [node("a", "model.layers.0.mlp"), node("h", None, "lowbit.hadamard.default", ["a"]),
             node("b", "model.layers.0.mlp", inputs=["h"]), node("g", None), node("c2", "lm_head")]
    status, removed = report.stage_status(after, before)
    assert status == {"h": "added", "b": "changed", "g": "added", "c2": "added"} and removed == ["c"]
    blocks = report.assign_blocks(after)
    assert blocks["h"] == "model.layers.0"  # inserted between two nodes of the block: inside it
    assert blocks["g"] is None  # between the block and the head: outside


def test_report_of_a_checkpoint(tmp_path):
    out, counts = report.write_report(FIXTURE_CHECKPOINT, str(tmp_path / "c.html"))
    page = open(out).read()
    from lowbit_compiler.checkpoint import read_manifest

    layers = read_manifest(FIXTURE_CHECKPOINT)["layers"]
    assert counts["layer_rows"] == len(layers) > 0 and counts["stage_svgs"] == 0
    assert page.count('<tr class="layer-row') == len(layers)
    assert "(checkpoint)" in page


def test_report_of_a_dump_from_before_stage_json(triton_dump, tmp_path):
    """Older dumps (no NN_stage.json): the code and diffs, no pictures, no error."""
    old = tmp_path / "old"
    shutil.copytree(triton_dump, old)
    for path in glob.glob(os.path.join(old, "run_*", "graph_*", "[0-9][0-9]_*.json")):
        os.remove(path)
    _, counts = report.write_report(str(old), str(tmp_path / "o.html"))
    page = (tmp_path / "o.html").read_text()
    assert counts["stage_svgs"] == 0 and counts["layer_rows"] == 15
    assert "a dump from before graph pictures" in page and '<pre class="diff">' in page


def test_a_generated_cpu_kernel_named_by_an_implementation_links_to_its_c_source():
    """Dumps from main's CPU code generator write kernels/<name>.c; the op's row links to it."""
    summary = {"implementations": [{"op": "lowbit::wo_linear", "layer": "m.l0", "node": "n",
                                    "implementation": "generated C kernel lowbit_cpu_int4 (M <= 16 rows), else packed"}],
               "kernel_sources": {"lowbit_cpu_int4.c": "void f(void) {}", "other.c": "void g(void) {}"}}
    html_text = report.kernels_table(summary, "g0")
    assert html_text.count('<a href="#src-g0-lowbit_cpu_int4.c">') == 1 and 'href="#src-g0-other.c"' not in html_text
    assert 'id="src-g0-lowbit_cpu_int4.c"' in html_text and "void f(void) {}" in html_text


def test_report_on_nothing_fails_clearly(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path), "-o", str(tmp_path / "x.html")]) == 1
    assert "no summary.json" in capsys.readouterr().err


def test_inspect_json(triton_dump, capsys):
    assert cli_main(["inspect", str(triton_dump), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == "dump" and len(data["graphs"]) == 1
    g = data["graphs"][0]
    assert g == {**_summary(triton_dump), "graph": g["graph"], "run": g["run"]}
    assert g["run"]["recipe"] == "w4a16" and g["graph"].endswith("graph_000")
    assert cli_main(["inspect", FIXTURE_CHECKPOINT, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == "checkpoint" and data["graphs"][0]["layers"]


# ---- in a real browser -------------------------------------------------------------------------

def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("LOWBIT_REQUIRE_BROWSER"):
            pytest.fail("LOWBIT_REQUIRE_BROWSER is set but chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install chromium; CI sets LOWBIT_REQUIRE_BROWSER=1)")
    return found


def _browser(chromium: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr", "--v=0",
                           *args], capture_output=True, text=True, timeout=120)


def test_report_renders_in_chromium(triton_dump, tmp_path):
    chromium = _chromium()
    page, counts = report.write_report(str(triton_dump), str(tmp_path / "report.html"))
    url = "file://" + os.path.abspath(page)
    done = _browser(chromium, "--dump-dom", url + "?selftest")
    dom = done.stdout
    assert 'data-rendered="ok"' in dom, (re.findall(r'data-rendered="[^"]*"', dom), done.stderr[-2000:])
    assert 'data-selftest="ok"' in dom, re.findall(r'data-selftest="[^"]*"', dom)
    assert "Uncaught" not in done.stderr, done.stderr[-2000:]
    summary = _summary(triton_dump)
    rendered = re.search(r'<p id="render-counts">rendered: (\d+) layer rows, (\d+) kernel rows, (\d+) stage graphs', dom)
    assert rendered is not None
    assert [int(x) for x in rendered.groups()] == [len(summary["layers"]), len(summary["generated_kernels"]),
                                                   counts["stage_svgs"]]
    assert counts["stage_svgs"] == len(glob.glob(os.path.join(triton_dump, "run_*", "graph_*", "[0-9][0-9]_*.py")))
    shot = tmp_path / "report.png"
    _browser(chromium, "--window-size=1280,900", f"--screenshot={shot}", url + "?screenshot")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(PRESETS))
def test_report_of_every_preset(recipe, tmp_path):
    """Every preset's dump (tiny Llama, calibration for the data-driven ones) makes a report whose
    rows and pictures are what its summaries hold, and which renders without script errors."""
    calibration = [torch.randint(3, 256, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        torch.compile(make_model("llama"), backend="lowbit", options={
            "recipe": recipe, "dump_dir": str(tmp_path / "d"), "calibration": calibration, "progress": False})(calibration[0])
    page, counts = report.write_report(str(tmp_path / "d"), str(tmp_path / "r.html"))
    summaries = [json.load(open(p)) for p in glob.glob(str(tmp_path / "d" / "run_*" / "graph_*" / "summary.json"))]
    assert counts["layer_rows"] == sum(len(s["layers"]) for s in summaries) > 0
    assert counts["stage_svgs"] == len(glob.glob(str(tmp_path / "d" / "run_*" / "graph_*" / "[0-9][0-9]_*.py")))
    assert counts["stage_svgs"] == sum(len(s["passes"]) + 2 for s in summaries)  # captured + passes + lowered
    html_text = open(page).read()
    assert html_text.count('<tr class="pass-row"') == sum(len(s["passes"]) for s in summaries)
    if shutil.which("chromium"):
        dom = _browser(shutil.which("chromium"), "--dump-dom", "file://" + page + "?selftest").stdout
        assert 'data-rendered="ok"' in dom and 'data-selftest="ok"' in dom
