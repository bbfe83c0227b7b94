"""Saving and reloading the KV-cache setup: ``save_pretrained`` of a model compressed with a KV
recipe writes each layer's KV format (KVQuant's calibrated codebooks and key scales included) in
the manifest, and ``from_pretrained`` / ``checkpoint.load`` install the compressed cache again:
the reloaded model generates the same tokens with a ``CompressedKVCache``; a corrupted entry
raises naming it."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from lowbit_compiler import LowbitError, checkpoint, compress, kv, zoo


def _generate(model, ids):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        cache = model(ids, use_cache=True).past_key_values
    return out, cache


@pytest.mark.parametrize("recipe", [pytest.param("w4a16+kv4", marks=pytest.mark.slow), "kv4", "kv3-kvquant"])
def test_save_pretrained_reinstalls_the_compressed_cache(tmp_path, recipe):
    model, inputs = zoo.build("llama")
    ids = inputs["input_ids"]
    calibration = [torch.randint(3, zoo.V, (1, 48), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    compress(model, recipe, calibration=calibration if "kvquant" in recipe else None, progress=False)
    expected, _ = _generate(model, ids)
    model.save_pretrained(tmp_path / "ckpt")
    entry = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]["kv_cache"]
    assert sorted(entry["layers"]) == ["0", "1"]
    reloaded = type(model).from_pretrained(tmp_path / "ckpt").eval()
    assert reloaded.config._attn_implementation == kv.ATTENTION_NAME
    saved, loaded = model._lowbit_kv_formats, reloaded._lowbit_kv_formats
    assert saved == loaded  # every field of every layer's format
    if "kvquant" in recipe:  # the calibrated constants, bit for bit
        for a, b in zip(saved, loaded):
            for name in ("key_codebook", "value_codebook", "key_center", "key_scale"):
                assert torch.equal(getattr(a.params, name), getattr(b.params, name)), name
    out, cache = _generate(reloaded, ids)
    assert type(cache).__name__ == "CompressedKVCache" and cache.nbytes()["packed"] > 0
    assert torch.equal(out.sequences, expected.sequences)
    torch.testing.assert_close(torch.cat(out.logits), torch.cat(expected.logits), atol=1e-5, rtol=1e-5)
    assert reloaded.lowbit_summary["kv_cache"]["applied"]


def test_checkpoint_load_and_a_corrupted_entry(tmp_path):
    """checkpoint.save / checkpoint.load (into a fresh float model) carry the KV setup too; a bad
    format in the manifest raises before loading, naming the field."""
    model, inputs = zoo.build("llama")
    fresh = copy.deepcopy(model)
    formats = {0: kv.get_format("kivi2"), 1: kv.get_format("int4")}
    kv.install(model, formats)
    checkpoint.save(model, tmp_path / "ckpt")
    checkpoint.load(tmp_path / "ckpt", fresh)
    assert fresh.config._attn_implementation == kv.ATTENTION_NAME
    assert fresh._lowbit_kv_formats == [formats[0], formats[1]]
    with torch.no_grad():
        assert type(fresh(inputs["input_ids"], use_cache=True).past_key_values).__name__ == "CompressedKVCache"
    config = tmp_path / "ckpt" / "config.json"
    data = json.loads(config.read_text())
    data["quantization_config"]["kv_cache"]["layers"]["1"]["bits"] = 11
    config.write_text(json.dumps(data))
    with pytest.raises(LowbitError, match="bits=11"):
        type(model).from_pretrained(tmp_path / "ckpt")
