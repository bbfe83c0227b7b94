"""Dumps and `lowbit inspect`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from lowbit_compiler.cli import main as cli_main
from tests.conftest import make_model, prompt


def test_dump_has_every_stage_with_diffs_and_a_summary(tmp_path, capsys):
    model = make_model("llama")
    with torch.no_grad():
        torch.compile(model, backend="lowbit", options={"recipe": "w4a16", "dump_dir": str(tmp_path)})(prompt())
    graph_dir = tmp_path / "graph_000"
    assert sorted(os.listdir(graph_dir)) == [
        "00_captured.py", "01_canonicalize.diff", "01_canonicalize.py", "02_insert_weight_quant.diff",
        "02_insert_weight_quant.py", "03_lowered.diff", "03_lowered.py", "summary.json"]
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


def test_dump_dir_from_environment(tmp_path):
    code = ("import torch, torch.nn as nn\n"
            "m = nn.Sequential(nn.Linear(128, 64))\n"
            "torch.compile(m, backend='lowbit', options={'recipe': 'w8a16'})(torch.randn(2, 128))\n")
    env = dict(os.environ, LOWBIT_DUMP_DIR=str(tmp_path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
    summary = json.loads((tmp_path / "graph_000" / "summary.json").read_text())
    assert summary["layers"]["0"]["format"] == "int8"
    result = subprocess.run([sys.executable, "-m", "lowbit_compiler.cli", "inspect", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "int8" in result.stdout


def test_console_script_is_installed(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "lowbit")
    result = subprocess.run([script, "recipes"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0
    assert "w4a16" in result.stdout and "insert_weight_quant" in result.stdout


def test_inspect_on_empty_dir_fails_clearly(tmp_path, capsys):
    assert cli_main(["inspect", str(tmp_path)]) == 1
    assert "no summary.json" in capsys.readouterr().err
