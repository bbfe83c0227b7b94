"""Dumps and `lowbit inspect`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

import pytest

import lowbit_compiler
from lowbit_compiler import LowbitError
from lowbit_compiler.backends import cpu_codegen
from lowbit_compiler.cli import main as cli_main
from tests.conftest import make_model, prompt


def test_dump_has_every_stage_with_diffs_and_a_summary(tmp_path, capsys):
    model = make_model("llama")
    with torch.no_grad():
        torch.compile(model, backend="lowbit", options={"recipe": "w4a16", "dump_dir": str(tmp_path)})(prompt())
    graph_dir = tmp_path / "run_000-w4a16" / "graph_000"
    assert sorted(os.listdir(tmp_path / "run_000-w4a16")) == ["graph_000", "run.json"]
    assert sorted(os.listdir(graph_dir)) == [
        "00_captured.json", "00_captured.py", "01_canonicalize.diff", "01_canonicalize.json", "01_canonicalize.py",
        "02_insert_weight_quant.diff", "02_insert_weight_quant.json", "02_insert_weight_quant.py", "03_lowered.diff",
        "03_lowered.json", "03_lowered.py", "kernels", "summary.json"]
    # the generated CPU kernel's C source, beside where Triton kernels go
    assert os.listdir(graph_dir / "kernels") == ["lowbit_cpu_int4_g128_asym.c"]
    assert (graph_dir / "kernels" / "lowbit_cpu_int4_g128_asym.c").read_text() == cpu_codegen.source("int4_g128_asym")
    captured = (graph_dir / "00_captured.py").read_text()
    assert 'getattr(self.model.layers, "0").mlp.down_proj.weight' in captured
    quant_diff = (graph_dir / "02_insert_weight_quant.diff").read_text()
    assert "+" in quant_diff and "lowbit.wo_linear" in quant_diff and "'int4_g128_asym'" in quant_diff
    assert "packed_linear" in (graph_dir / "03_lowered.py").read_text()
    summary = json.loads((graph_dir / "summary.json").read_text())
    assert [p["name"] for p in summary["passes"]] == ["canonicalize", "insert_weight_quant"]
    assert all(p["seconds"] >= 0 for p in summary["passes"])
    assert summary["passes"][1]["matches"] == 15
    layer = summary["layers"]["model.layers.0.mlp.down_proj"]
    assert layer["format"] == "int4_g128_asym" and layer["in_features"] == 256 and layer["out_features"] == 128
    assert layer["bytes_before"] == 256 * 128 * 4 and layer["bytes_after"] < layer["bytes_before"] / 7
    assert 4.1 < layer["bits_per_weight"] < 4.3 and layer["weight_sqnr_db"] > 18

    assert cli_main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "insert_weight_quant" in out and "model.layers.1.mlp.down_proj" in out and "int4_g128_asym" in out
    assert "kernels: {'cpu': 15}" in out
    assert "### run_000-w4a16: recipe 'w4a16'" in out and "== run_000-w4a16/graph_000" in out
    # o_proj and down_proj with the residual add folded into the call (the CPU fusion groups' epilogue)
    assert ("generated C kernel lowbit_cpu_int4_g128_asym_ext (M <= 16 rows, float32, residual add), else "
            "cpu_kernels.packed_linear (packed int4_g128_asym weights, bfloat16 compute) with the residual add "
            "in torch") in out


@pytest.mark.heavy
def test_dump_dir_from_environment(tmp_path):
    code = ("import torch, torch.nn as nn\n"
            "m = nn.Sequential(nn.Linear(128, 64))\n"
            "torch.compile(m, backend='lowbit', options={'recipe': 'w8a16'})(torch.randn(2, 128))\n")
    env = dict(os.environ, LOWBIT_DUMP_DIR=str(tmp_path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
    summary = json.loads((tmp_path / "run_000-w8a16" / "graph_000" / "summary.json").read_text())
    assert summary["layers"]["0"]["format"] == "int8"
    result = subprocess.run([sys.executable, "-m", "lowbit_compiler.cli", "inspect", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "int8" in result.stdout


@pytest.mark.heavy
def test_console_script_is_installed(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "lowbit")
    result = subprocess.run([script, "recipes"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0
    assert "w4a16" in result.stdout and "insert_weight_quant" in result.stdout


def test_inspect_on_empty_dir_fails_clearly(tmp_path, capsys):
    assert cli_main(["inspect", str(tmp_path)]) == 1
    assert "no summary.json" in capsys.readouterr().err


@pytest.mark.slow  # 10-21 s (two compiles and a subprocess): the default suite's 10-minute budget
def test_two_runs_into_one_dump_dir_keep_their_own_folders(tmp_path, capsys):
    """Two torch.compile calls in this process and one in another: three run folders, each with
    its run.json and its own graphs; inspect on the parent says which run each graph is from."""
    model = make_model("llama")
    with torch.no_grad():
        torch.compile(model, backend="lowbit", options={"recipe": "w8a16", "dump_dir": str(tmp_path)})(prompt())
        torch.compiler.reset()
        torch.compile(model, backend="lowbit", options={"recipe": "w4a16", "dump_dir": str(tmp_path)})(prompt())
    code = ("import torch, torch.nn as nn\n"
            f"torch.compile(nn.Linear(128, 64), backend='lowbit', options={{'recipe': 'w8a16', 'dump_dir': {str(tmp_path)!r}}})"
            "(torch.randn(2, 128))\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    runs = sorted(os.listdir(tmp_path))
    assert runs == ["run_000-w8a16", "run_001-w4a16", "run_002-w8a16"]
    for run in runs:
        assert sorted(os.listdir(tmp_path / run)) == ["graph_000", "run.json"]
    info = [json.loads((tmp_path / run / "run.json").read_text()) for run in runs]
    assert [i["recipe"] for i in info] == ["w8a16", "w4a16", "w8a16"]
    assert info[0]["pid"] == info[1]["pid"] == os.getpid() != info[2]["pid"]
    assert json.loads((tmp_path / runs[1] / "graph_000" / "summary.json").read_text())["recipe"]["name"] == "w4a16"
    assert cli_main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for run in runs:
        assert f"### {run}: recipe" in out and f"== {run}/graph_000  recipe={run.split('-', 1)[1]}" in out
    assert out.index("### run_001-w4a16") < out.index("== run_001-w4a16/graph_000") < out.index("### run_002")


def test_graphs_of_one_compile_call_share_its_run_folder(tmp_path, capsys):
    """model.compile + generate(): the prefill and the decode graphs are one run."""
    model = make_model("llama")
    model.compile(backend="lowbit", options={"recipe": "w8a16", "dump_dir": str(tmp_path)})
    with torch.no_grad():
        model.generate(prompt(), max_new_tokens=3, do_sample=False)
    assert os.listdir(tmp_path) == ["run_000-w8a16"]
    graphs = sorted(d for d in os.listdir(tmp_path / "run_000-w8a16") if d.startswith("graph_"))
    assert len(graphs) >= 2 and graphs[:2] == ["graph_000", "graph_001"]
    assert cli_main(["inspect", str(tmp_path / "run_000-w8a16" / "graph_001")]) == 0
    assert "== run_000-w8a16/graph_001  recipe=w8a16" in capsys.readouterr().out


def test_a_failed_compile_writes_its_error_and_inspect_shows_it(tmp_path, capsys):
    model = make_model("llama")
    compiled = torch.compile(model, backend="lowbit", options={"recipe": "w4a16-gptq", "dump_dir": str(tmp_path)})
    with pytest.raises(LowbitError) as raised:  # ours, not Dynamo's BackendCompilerFailed
        compiled(prompt())
    assert str(raised.value).splitlines()[0].startswith("pass 'gptq' (recipe 'w4a16-gptq') needs calibration data")
    summary = json.loads((tmp_path / "run_000-w4a16-gptq" / "graph_000" / "summary.json").read_text())
    assert summary["error"]["type"] == "LowbitError" and summary["error"]["stage"] == "pass 'gptq'"
    assert "needs calibration data" in summary["error"]["message"] and "Traceback" in summary["error"]["traceback"]
    assert summary["passes_done"] == ["canonicalize"]
    assert cli_main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert ("== run_000-w4a16-gptq/graph_000  recipe=w4a16-gptq  FAILED in pass 'gptq': LowbitError: pass 'gptq' "
            "(recipe 'w4a16-gptq') needs calibration data") in out
    assert "1 of 1 graph(s) did not compile" in out


def test_inspect_lists_a_graph_whose_compile_never_finished(tmp_path, capsys):
    """A process killed mid-compile leaves stage files and no summary.json: inspect says so."""
    model = make_model("llama")
    with torch.no_grad():
        torch.compile(model, backend="lowbit", options={"recipe": "w8a16", "dump_dir": str(tmp_path)})(prompt())
    broken = tmp_path / "run_001-w4a16" / "graph_000"
    broken.mkdir(parents=True)
    (broken / "00_captured.py").write_text("# captured\n")
    assert cli_main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "== run_000-w8a16/graph_000  recipe=w8a16" in out
    assert ("== run_001-w4a16/graph_000  NO summary.json: the compile of this graph did not finish "
            "(the process ended while compiling it; stages written: 00_captured.py)") in out
    assert "### run_001-w4a16 (no run.json" in out


@pytest.mark.parametrize("recipe, expected", [
    ("w8a8", {("lowbit::qa_linear", "eager op (lowbit_compiler/ops.py): the generated C kernel lowbit_cpu_w8a8 for "
                                    "M <= 16 rows, else one torch._int_mm (int8 x int8) per call, then both scales"): 15}),
    ("w4a4-rot", {("lowbit::qa_linear", "eager op (lowbit_compiler/ops.py): format int4_g128_sym with int4 "
                                        "activations runs one integer matmul per group of 128 on codes unpacked and "
                                        "centred on every call (the eager op has no packed low-bit integer kernel)"): 15,
                  ("lowbit::hadamard", "eager op (lowbit_compiler/ops.py): fast Walsh-Hadamard transform in torch ops "
                                       "(lowbit_compiler/hadamard.py)"): 2}),
])
def test_inspect_names_the_implementation_of_every_lowbit_op(tmp_path, capsys, recipe, expected):
    model = make_model("llama")
    with torch.no_grad():
        torch.compile(model, backend="lowbit", options={"recipe": recipe, "dump_dir": str(tmp_path)})(prompt())
    graph = tmp_path / f"run_000-{recipe}" / "graph_000"
    summary = json.loads((graph / "summary.json").read_text())
    found: dict = {}
    for record in summary["implementations"]:
        key = (record["op"], record["implementation"])
        found[key] = found.get(key, 0) + 1
    assert found == expected
    stage = sorted(f for f in os.listdir(graph) if f.endswith("insert_weight_quant.py"))[0]
    before_lowering = (graph / stage).read_text()
    assert before_lowering.count("torch.ops.lowbit.") == sum(expected.values())  # every op, none left out
    assert cli_main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for (op, implementation), calls in expected.items():
        assert any(line.startswith(op) and implementation in line and f" {calls} " in line for line in out.splitlines())


def test_options_are_checked_at_the_call_with_lowbit_compiler_backend():
    model = make_model("llama")
    with pytest.raises(LowbitError, match=r"^unknown recipe 'w5a16'; presets: \["):
        torch.compile(model, backend=lowbit_compiler.backend(recipe="w5a16"))
    with pytest.raises(LowbitError, match=r"^backend='lowbit': unknown options \['targte'\]"):
        model.compile(backend=lowbit_compiler.backend(recipe="w8a16", targte="cpu"))
    compiled = torch.compile(model, backend=lowbit_compiler.backend(recipe="w8a16"))
    with torch.no_grad():
        assert compiled(prompt()).logits.shape == (1, 9, 256)


def test_a_bad_option_by_name_raises_our_error_at_the_first_forward():
    """backend="lowbit": torch hands the options over only at the first graph; the error is a
    LowbitError whose first line is ours (no "report a bug to PyTorch" wrapper)."""
    compiled = torch.compile(make_model("llama"), backend="lowbit", options={"recipe": "w8a16", "targte": "cpu"})
    with pytest.raises(LowbitError) as raised:
        compiled(prompt())
    assert str(raised.value).splitlines()[0].startswith("backend='lowbit': unknown options ['targte']")
    assert "PyTorch" not in str(raised.value)


def test_bad_options_leave_their_error_in_the_dump(tmp_path, capsys):
    compiled = torch.compile(make_model("llama"), backend="lowbit", options={"recipe": "w5a16", "dump_dir": str(tmp_path)})
    with pytest.raises(LowbitError, match=r"^unknown recipe 'w5a16'"):
        compiled(prompt())
    summary = json.loads((tmp_path / "run_000-w5a16-bad-options" / "graph_000" / "summary.json").read_text())
    assert summary["error"]["stage"] == "checking the options (before capture)"
    assert cli_main(["inspect", str(tmp_path)]) == 0
    assert ("== run_000-w5a16-bad-options/graph_000  recipe=w5a16  FAILED in checking the options (before capture): "
            "LowbitError: unknown recipe 'w5a16'") in capsys.readouterr().out
