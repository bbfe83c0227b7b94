"""Encoder-decoder models (T5): the encoder under generate(), T5's norm, decoder inputs."""
from __future__ import annotations

import pytest

import logging

import torch

import lowbit_compiler
from lowbit_compiler import zoo
from lowbit_compiler.backends.lowbit_backend import ENCODER_OUTSIDE
from lowbit_compiler.formats import sqnr_db
from tests.helpers import Recorder


def _quantized(summary):
    return [k for k, v in summary["layers"].items() if v.get("format", "float") != "float"]


def test_t5_layer_norm_is_canonicalized_to_rms_norm():
    """T5LayerNorm (x * rsqrt(mean(x.float() ** 2) + eps), then weight *) is an RMSNorm: 5 in the
    encoder, 7 in the decoder; the graph computes what the model does."""
    model, inputs = zoo.build("t5")
    rec = Recorder(recipe=lowbit_compiler.Recipe("canon", ("canonicalize",)))
    with torch.no_grad():
        ref = model(**inputs).logits
        out = torch.compile(model, backend=rec)(**inputs).logits
    [summary] = rec.summaries
    assert summary["passes"][0]["details"]["rms_norm"] == 12
    norms = [w for w, e in summary["coverage"]["weights"].items() if e["role"] == "norm"]
    assert len(norms) == 12 and all("layer_norm" in w for w in norms)
    assert sqnr_db(ref, out) > 100


@pytest.mark.heavy
def test_t5_generate_compiles_and_quantizes_the_encoder_with_lowbit_compiler_compile(tmp_path):
    model, inputs = zoo.build("t5")
    lowbit_compiler.compile(model, recipe="w8a16", dump_dir=str(tmp_path))
    with torch.no_grad():
        model.generate(inputs["input_ids"], max_new_tokens=2, do_sample=False)
    from lowbit_compiler.dump import load_summaries

    summaries = load_summaries(str(tmp_path))
    assert len({s["run"]["run"] for s in summaries}) == 1  # encoder and decoder graphs: one run
    encoder, decoder = summaries[0], summaries[1]
    assert len(_quantized(encoder)) == 12 and all(k.startswith("block.") for k in _quantized(encoder))
    assert len(_quantized(decoder)) == 21 and all(k.startswith(("decoder.", "lm_head")) for k in _quantized(decoder))
    assert not any(s.get("notes") for s in summaries)


def test_t5_generate_under_model_compile_says_the_encoder_ran_outside(tmp_path, caplog):
    """model.compile alone: generate() calls the encoder directly, so only the decoder compiles;
    the first graph's summary and the log say so and how to cover the encoder."""
    model, inputs = zoo.build("t5")
    model.compile(backend="lowbit", options={"recipe": "w8a16", "dump_dir": str(tmp_path)})
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="lowbit_compiler"):
        model.generate(inputs["input_ids"], max_new_tokens=2, do_sample=False)
    from lowbit_compiler.dump import load_summaries

    summaries = load_summaries(str(tmp_path))
    assert not any(k.startswith(("encoder.", "block.")) for s in summaries for k in _quantized(s))
    assert summaries[0]["notes"] == [ENCODER_OUTSIDE] and "lowbit_compiler.compile(model" in ENCODER_OUTSIDE
    assert any(ENCODER_OUTSIDE in r.getMessage() for r in caplog.records)
