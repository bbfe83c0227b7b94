"""Data-driven sparsity recipes under the compile flow with ``generate()``: the prefill graph
calibrates (its ``position_ids`` built from the batches' ``input_ids``), every later graph (the
decode steps) reuses its thresholds / pruned weights by parameter identity, and a later graph
whose sites were never calibrated falls back with a logged reason (strict: raises)."""
from __future__ import annotations

import logging

import pytest
import torch

from lowbit_compiler import LowbitError, compress, ir
from lowbit_compiler.passes.quantize import common
from lowbit_compiler.recipe import get_recipe
from tests.conftest import make_model
from tests.helpers import Recorder

CALIBRATION = [torch.randint(3, 256, (1, 48), generator=torch.Generator().manual_seed(i)) for i in range(4)]
NEW = 8


def _details(summary: dict, name: str) -> dict:
    return next(p["details"] for p in summary["passes"] if p["name"] == name)


def _generate_compiled(recipe, **options):
    rec = Recorder(recipe=recipe, calibration=CALIBRATION, progress=False, **options)
    model = make_model("llama")
    model.compile(backend=rec)
    with torch.no_grad():
        tokens = model.generate(CALIBRATION[0], max_new_tokens=NEW, do_sample=False)
    return tokens, rec


def _generate_compressed(recipe):
    model = compress(make_model("llama"), recipe, calibration=CALIBRATION, progress=False)
    with torch.no_grad():
        return model.generate(CALIBRATION[0], max_new_tokens=NEW, do_sample=False), model


@pytest.mark.heavy
def test_teal_calibrates_the_prefill_graph_once_and_decode_graphs_reuse_its_thresholds():
    tokens, rec = _generate_compiled("teal-50")
    assert tokens.shape[1] == CALIBRATION[0].shape[1] + NEW
    assert len(rec.summaries) >= 2  # prefill + decode step(s)
    first = _details(rec.summaries[0], "teal")
    assert "runs" in first["calibration"] and len(first["sites"]) == 8  # q/k/v, o, gate/up, down x 2 blocks
    for site in first["sites"].values():
        assert abs(site["achieved"] - 0.5) <= 0.01
    derived = first["calibration"]["runs"][0]["derived_inputs"]
    assert "position_ids" in derived
    prefill_thresholds = {n: float(b) for n, b in rec.graphs[0].named_buffers() if n.endswith("act_threshold")}
    assert len(prefill_thresholds) == 8
    for summary, gm in zip(rec.summaries[1:], rec.graphs[1:]):
        later = _details(summary, "teal")
        assert later["calibration"] == {"cached": 8}  # nothing re-calibrated
        assert {k: v["threshold"] for k, v in later["sites"].items()} == \
            {k: v["threshold"] for k, v in first["sites"].items()}
        assert {n: float(b) for n, b in gm.named_buffers() if n.endswith("act_threshold")} == prefill_thresholds
        assert summary["fallbacks"] == {}
    offline, _ = _generate_compressed("teal-50")
    assert torch.equal(tokens, offline)


@pytest.mark.heavy
def test_wanda_prunes_in_the_prefill_graph_and_decode_graphs_reuse_the_pruned_weights():
    # the head is left out: generate()'s prefill graph computes its logits for the last position
    # only, so there it would be calibrated on 4 rows instead of 192 (the next test)
    recipe = get_recipe("s24-wanda").replace(name="s24-wanda-body", exclude=("lm_head",))
    tokens, rec = _generate_compiled(recipe)
    assert len(rec.summaries) >= 2
    first = _details(rec.summaries[0], "wanda")
    assert "derived_inputs" in first["calibration"] and first["pruned"] == 14 and first["mean_sparsity"] == 0.5

    def pruned(gm):
        return {n.target: ir.fetch_attr(gm, n.target) for n in gm.graph.nodes
                if n.op == "get_attr" and n.target.endswith("_proj.weight")}

    weights = pruned(rec.graphs[0])
    assert len(weights) == 14 and all(float((w == 0).float().mean()) == 0.5 for w in weights.values())
    for summary, gm in zip(rec.summaries[1:], rec.graphs[1:]):
        assert _details(summary, "wanda")["calibration"] == {"cached": 14}
        later = pruned(gm)
        assert later.keys() == weights.keys() and all(torch.equal(later[k], weights[k]) for k in weights)
    offline, model = _generate_compressed(recipe)
    state = dict(model.named_parameters())
    assert all(torch.equal(state[k], w) for k, w in weights.items())  # the compress flow pruned the same weights
    assert torch.equal(tokens, offline)


@pytest.mark.slow
def test_head_calibrated_on_the_last_position_only_is_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="lowbit_compiler"):
        _, rec = _generate_compiled("s24-wanda")
    assert _details(rec.summaries[0], "wanda")["calibration"]["fewer_rows"] == {"lm_head": 4}
    assert any("lm_head" in r.getMessage() and "compiled(batch)" in r.getMessage() for r in caplog.records)


def _forget(owner: torch.Tensor, site: str) -> int:
    """Drop the results cached for ``site`` of the model owning ``owner`` (as if no earlier graph had
    calibrated it); other tests' models in this process keep theirs."""
    keys = [k for k in common.RESULTS._entries if k[0] == id(owner) and isinstance(k[1], tuple) and k[1][-1] == site]
    for k in keys:
        del common.RESULTS._entries[k]
    return len(keys)


@pytest.mark.parametrize("strict", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_later_graph_with_an_uncalibrated_site_falls_back_loudly(strict, caplog):
    rec = Recorder(recipe="teal-50", calibration=CALIBRATION, progress=False, strict=strict)
    model = make_model("llama")
    model.compile(backend=rec)
    with torch.no_grad():
        model(CALIBRATION[0])  # the calibrated graph
    site = "model.layers.1.mlp.down_proj"
    assert _forget(model.model.layers[1].mlp.down_proj.weight, site) == 1
    short = CALIBRATION[1][:, :20]  # a prompt the calibration data does not fit: nothing to calibrate on
    with caplog.at_level(logging.WARNING, logger="lowbit_compiler"), torch.no_grad():
        if strict:
            # (the Recorder is a plain Dynamo backend: Dynamo wraps what it raises)
            with pytest.raises((LowbitError, torch._dynamo.exc.BackendCompilerFailed),
                               match=rf"\[strict\] teal: site {site}: this graph does not fit"):
                model.generate(short, max_new_tokens=1, do_sample=False)
            return
        model.generate(short, max_new_tokens=1, do_sample=False)
    later = _details(rec.summaries[1], "teal")
    assert later["calibration"]["cached"] == 7 and "does not fit the calibration data" in \
        later["calibration"]["not_calibrated"]
    assert site not in later["sites"] and len(later["sites"]) == 7
    assert any(f"teal: site {site}" in r.getMessage() and "stays dense" in r.getMessage() for r in caplog.records)


def test_first_graph_that_does_not_fit_still_raises_with_the_way_out():
    rec = Recorder(recipe="teal-50", calibration=CALIBRATION, progress=False)
    model = make_model("llama")
    model.compile(backend=rec)
    with pytest.raises((LowbitError, torch._dynamo.exc.BackendCompilerFailed),
                       match=r"pass 'teal' needs calibration data.*no calibration batch has them.*compiled\(\*\*batches"):
        with torch.no_grad():
            model.generate(CALIBRATION[1][:, :20], max_new_tokens=1, do_sample=False)
