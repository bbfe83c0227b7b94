"""benchmarks/accuracy.py on tiny saved models (any directory works; tests never use ../shared)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import pytest

from tests.conftest import make_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("accuracy", os.path.join(ROOT, "benchmarks", "accuracy.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["accuracy"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.heavy
def test_harness_reports_every_column_for_causal_lms_and_encoders(harness, arch, tmp_path, capsys):
    model_dir = tmp_path / arch
    make_model(arch).save_pretrained(model_dir)  # vocabulary of 256: the harness tokenizes bytes
    text = tmp_path / "text.txt"
    text.write_text(open(os.path.join(ROOT, "lowbit_compiler", "formats.py")).read() * 2)
    out = tmp_path / "result.json"
    assert harness.main([str(model_dir), "--recipes", "w8a16", "w3a16-gptq", "--text", str(text), "--seq-len", "64",
                         "--calib-seqs", "2", "--eval-seqs", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["recipe"]: r for r in result["rows"]}
    assert list(rows) == ["float", "w8a16", "w3a16-gptq"] and result["causal"] == (arch == "llama")
    assert 8 < rows["w8a16"]["bits_per_weight"] < 8.2  # + one bf16 scale per row of 128-256 weights
    assert rows["w3a16-gptq"]["bits_per_weight"] == pytest.approx(3 + 24 / 128)
    for r in (rows["w8a16"], rows["w3a16-gptq"]):
        assert r["weight_sqnr_min"] <= r["weight_sqnr_median"] and r["seconds"] > 0
    if arch == "llama":
        assert rows["float"]["kl"] == 0 and 0 <= rows["w8a16"]["kl"] < rows["w3a16-gptq"]["kl"]
        assert all(math.isfinite(r["perplexity"]) for r in rows.values())
    else:
        assert rows["w8a16"]["embedding_cosine"] > rows["w3a16-gptq"]["embedding_cosine"]
        assert rows["w8a16"]["output_sqnr_db"] > 25
    table = capsys.readouterr().out
    assert "| w3a16-gptq | 3.19 |" in table
