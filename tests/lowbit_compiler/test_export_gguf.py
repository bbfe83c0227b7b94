"""GGUF export for llama.cpp (issue "Ship the compressed model", point 4): a tiny Llama compressed
with several recipes, exported, read back with gguf.GGUFReader and decoded with gguf.quants.dequantize:
every tensor equals (bit for bit) our own dequantization of the weight, with llama.cpp's Q/K row
permutation reimplemented here from convert_hf_to_gguf.py; metadata as llama.cpp reads it;
re-quantized tensors reported (and refused in strict mode); online transforms refused naming the layer;
and a Llama rebuilt from the GGUF tensors alone reproduces the compressed model's logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF export needs the `export` extra: pip install -e '.[export]' "
                                          "(gguf==0.19.0); `make test` installs it")

from lowbit_compiler.backends import cpu_kernels  # noqa: E402
from lowbit_compiler import LowbitError, Recipe, WeightFormat, compress, formats, zoo  # noqa: E402
from lowbit_compiler.export.gguf import export_gguf, quantize_q6_k  # noqa: E402
from lowbit_compiler.offline import FoldedRMSNorm, LowbitLinear  # noqa: E402

N_LAYER, N_HEAD, N_KV, HIDDEN, FF, VOCAB = 2, 4, 2, 128, 256, 256
W4G32 = Recipe(name="w4a16-g32-sym", passes=("canonicalize", "insert_weight_quant"), weight=WeightFormat(4, 32, True))

_PROJ = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj"}
# llama.cpp's tensor names (as convert_hf_to_gguf.py writes them) -> the module they come from
NAMES = {"token_embd.weight": "model.embed_tokens", "output_norm.weight": "model.norm", "output.weight": "lm_head"}
for _i in range(N_LAYER):
    NAMES[f"blk.{_i}.attn_norm.weight"] = f"model.layers.{_i}.input_layernorm"
    NAMES[f"blk.{_i}.ffn_norm.weight"] = f"model.layers.{_i}.post_attention_layernorm"
    for _g, _h in _PROJ.items():
        NAMES[f"blk.{_i}.{_g}.weight"] = f"model.layers.{_i}.{_h}"


def _hf_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute (rows of each head: halves interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _our_weight(module: torch.nn.Module, gguf_name: str) -> torch.Tensor:
    """What our model computes with, in GGUF's row order: dequantize_parts for a LowbitLinear, ones for a
    folded norm, the float weight otherwise."""
    if isinstance(module, LowbitLinear):
        w = formats.dequantize_parts(formats.WeightFormat.parse(module.fmt), module.qweight, module.scale,
                                     module.zero)[:, :module.in_features]
    elif isinstance(module, FoldedRMSNorm):
        w = torch.ones(HIDDEN)
    else:
        w = module.weight.detach().float()
    if ".attn_q." in gguf_name:
        w = _hf_permute(w, N_HEAD)
    elif ".attn_k." in gguf_name:
        w = _hf_permute(w, N_KV)
    return w


def _compressed(recipe) -> torch.nn.Module:
    model, _ = zoo.build("llama")  # hidden 128, 2 layers, vocab 256, 4 heads, 2 kv heads
    if recipe is not None:
        compress(model, recipe, progress=False)
    return model


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {"w8a16": _compressed("w8a16"), "w4g32": _compressed(W4G32), "w4a16": _compressed("w4a16"),
            "mxfp4": _compressed("mxfp4"), "nf4": _compressed("nf4")}


def _read(path) -> tuple[dict[str, object], object]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: t for t in reader.tensors}, reader


# (model, weight_type) -> the GGUF type every quantized linear must get, exactly
EXACT = [("w8a16", "auto", "Q8_0"), ("w4g32", "auto", "Q4_0"), ("w4g32", "q4_0", "Q4_0"), ("w4g32", "q8_0", "Q8_0"),
         ("w4a16", "auto", "Q5_1"), ("w4a16", "q5_1", "Q5_1"), ("w4a16", "q8_0", "Q8_0"), ("mxfp4", "auto", "MXFP4")]


@pytest.mark.parametrize("name,weight_type,expected", EXACT, ids=[f"{m}-{w}" for m, w, _ in EXACT])
@pytest.mark.heavy
def test_exact_export_reads_back_bit_identical(models, tmp_path, name, weight_type, expected):
    model = models[name]
    path = tmp_path / "model.gguf"
    report = export_gguf(model, path, weight_type=weight_type, strict=True)
    tensors, _ = _read(path)
    assert sorted(tensors) == sorted(NAMES)
    modules = dict(model.named_modules())
    for gname, source in NAMES.items():
        t = tensors[gname]
        module = modules[source]
        ours = _our_weight(module, gname)
        got = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).reshape(ours.shape)
        assert torch.equal(got, ours), gname
        if isinstance(module, LowbitLinear):
            assert t.tensor_type.name == expected, gname
            assert report["tensors"][gname]["exact"] and report["tensors"][gname]["how"] == "exact", gname
        else:  # norms, embeddings: float32 as they are
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, gname
    assert report["dropped"] == []
    assert report["file_bytes"] == path.stat().st_size


@pytest.mark.heavy
def test_exact_export_really_holds_our_codes(models, tmp_path):
    """The Q4_0 bytes are our int4 codes and bf16 scales repacked (not a re-quantization that happens to
    agree): block 0 of the first row of blk.0.ffn_up, decoded by hand from the file."""
    model = models["w4g32"]
    export_gguf(model, tmp_path / "m.gguf")
    tensors, _ = _read(tmp_path / "m.gguf")
    raw = np.asarray(tensors["blk.0.ffn_up.weight"].data)[0, :18]
    up = model.model.layers[0].mlp.up_proj
    codes = formats.unpack_int4(up.qweight)[0, :32].numpy()
    assert raw[:2].view("<f2")[0] == np.float16(up.scale[0, 0].float().item())
    assert np.array_equal(raw[2:] & 15, codes[:16]) and np.array_equal(raw[2:] >> 4, codes[16:])


def test_metadata_as_llama_cpp_reads_it(models, tmp_path):
    export_gguf(models["w8a16"], tmp_path / "m.gguf")
    _, reader = _read(tmp_path / "m.gguf")

    def value(key):
        return reader.fields[key].contents()

    assert value("general.architecture") == "llama"
    expected = {"llama.block_count": N_LAYER, "llama.context_length": 256, "llama.embedding_length": HIDDEN,
                "llama.feed_forward_length": FF, "llama.attention.head_count": N_HEAD,
                "llama.attention.head_count_kv": N_KV, "llama.rope.dimension_count": HIDDEN // N_HEAD,
                "llama.vocab_size": VOCAB, "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0)}
    assert {k: value(k) for k in expected} == expected
    assert value("llama.rope.freq_base") == pytest.approx(10000.0)
    assert value("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)


@pytest.mark.parametrize("name,weight_type", [("w8a16", "q4_0"), ("w4a16", "q4_0"), ("nf4", "auto"),
                                              ("mxfp4", "q8_0")])
def test_requantized_tensors_are_reported_and_refused_in_strict_mode(models, tmp_path, name, weight_type):
    model = models[name]
    report = export_gguf(model, tmp_path / "m.gguf", weight_type=weight_type)
    tensors, _ = _read(tmp_path / "m.gguf")
    modules = dict(model.named_modules())
    linears = [g for g, s in NAMES.items() if isinstance(modules[s], LowbitLinear)]
    for gname in linears:
        entry = report["tensors"][gname]
        assert entry["how"] == "requantized" and entry["exact"] is False, gname
        ours = _our_weight(modules[NAMES[gname]], gname).numpy()
        got = gguf.quants.dequantize(tensors[gname].data, tensors[gname].tensor_type).reshape(ours.shape)
        assert not np.array_equal(got, ours)
        sqnr = 10 * np.log10((ours.astype(np.float64) ** 2).sum() / ((ours - got).astype(np.float64) ** 2).sum())
        assert entry["sqnr_db"] == pytest.approx(sqnr, abs=0.01)
        assert sqnr > (18 if weight_type == "q4_0" else 35), gname  # 4-bit vs 8-bit re-quantization
    with pytest.raises(LowbitError, match=r"strict.*(blk\.0\.|token_embd).*not exactly our weights"):
        export_gguf(model, tmp_path / "strict.gguf", weight_type=weight_type, strict=True)


def test_scale_that_is_not_fp16_is_requantized_not_silently_rounded(tmp_path):
    """A bf16 scale below fp16's normal range with low bits set has no exact Q8_0 d: that tensor is
    re-quantized and says so; strict refuses it."""
    model = _compressed("w8a16")
    up = model.model.layers[1].mlp.up_proj
    up.scale[3] = torch.tensor(1.2345e-7).to(torch.bfloat16)
    assert up.scale[3].float().half().float() != up.scale[3].float()
    report = export_gguf(model, tmp_path / "m.gguf")
    entry = report["tensors"]["blk.1.ffn_up.weight"]
    assert entry["how"] == "requantized"
    assert "4 int8 block scales are not fp16 numbers" in entry["note"]  # the row's 4 blocks of 32
    assert report["tensors"]["blk.1.ffn_down.weight"]["exact"]
    with pytest.raises(LowbitError, match=r"blk\.1\.ffn_up\.weight.*model\.layers\.1\.mlp\.up_proj"):
        export_gguf(model, tmp_path / "s.gguf", strict=True)


@pytest.mark.parametrize("name", ["w8a16", "w4g32", "w4a16"])
def test_an_all_zero_row_stays_exact(tmp_path, name):
    """An all-zero weight row gets the quantizer's tiny 1e-12 scale, no fp16 number; its codes decode
    to 0 whatever the scale, so the blocks get d = 0 and the tensor stays exact."""
    model, _ = zoo.build("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[7] = 0.0
    compress(model, W4G32 if name == "w4g32" else name, progress=False)
    gate = model.model.layers[0].mlp.gate_proj
    assert gate.scale[7].float().max().item() < 1e-9
    report = export_gguf(model, tmp_path / "m.gguf", strict=True)
    assert report["tensors"]["blk.0.ffn_gate.weight"]["exact"]
    tensors, _ = _read(tmp_path / "m.gguf")
    t = tensors["blk.0.ffn_gate.weight"]
    got = gguf.quants.dequantize(t.data, t.tensor_type)
    assert np.array_equal(got, _our_weight(gate, "blk.0.ffn_gate.weight").numpy()) and not got[7].any()


def test_online_hadamard_is_refused_naming_the_layer(tmp_path):
    model = _compressed("w4a4-rot")  # QuaRot: R4 is an online Hadamard on every down_proj input
    with pytest.raises(LowbitError) as info:
        export_gguf(model, tmp_path / "m.gguf")
    message = str(info.value)
    for i in range(N_LAYER):
        assert f"model.layers.{i}.mlp.down_proj: an online Hadamard" in message
    assert "q_proj" not in message
    assert not (tmp_path / "m.gguf").exists()


def test_activation_quantization_is_dropped_and_reported(tmp_path):
    model = _compressed("w8a8")
    report = export_gguf(model, tmp_path / "m.gguf")
    assert len(report["dropped"]) == 7 * N_LAYER + 1  # every quantized linear, lm_head included
    assert all(d["what"] == "int8 (dynamic) activation quantization" for d in report["dropped"])
    assert all(e["exact"] for e in report["tensors"].values())  # the int8 weights still export exactly
    with pytest.raises(LowbitError, match=r"strict.*activation quantization.*model\.layers\.0\.self_attn\.q_proj"):
        export_gguf(model, tmp_path / "s.gguf", strict=True)


def test_other_architectures_are_refused_with_the_reason(tmp_path):
    model, _ = zoo.build("gemma")
    with pytest.raises(LowbitError, match=r"GemmaForCausalLM \(model_type 'gemma'\).*norm offset"):
        export_gguf(model, tmp_path / "m.gguf")
    model, _ = zoo.build("gpt2")
    with pytest.raises(LowbitError, match=r"GPT2LMHeadModel \(model_type 'gpt2'\)"):
        export_gguf(model, tmp_path / "m.gguf")
    with pytest.raises(LowbitError, match=r"weight_type='q3_k'"):
        export_gguf(_compressed(None), tmp_path / "m.gguf", weight_type="q3_k")
    mistral, _ = zoo.build("mistral")  # convert_hf_to_gguf writes Mistral as llama; its window exceeds the context
    assert export_gguf(mistral, tmp_path / "mistral.gguf")["architecture"] == "llama"
    mistral.config.sliding_window = 64
    with pytest.raises(LowbitError, match="sliding window of 64"):
        export_gguf(mistral, tmp_path / "mistral.gguf")


def test_q6_k_round_trip_through_ggufs_dequantizer():
    """gguf 0.19 has no K-quant quantizer; ours writes blocks gguf.quants.dequantize decodes to within
    half a step of each 16-weight sub-block (a wrong bit layout would scramble them)."""
    w = torch.randn(8, 512, generator=torch.Generator().manual_seed(0)).numpy()
    w[0, :16] = 0.0  # an all-zero sub-block
    w[1] *= 100.0
    data = quantize_q6_k(w)
    assert data.shape == (8, 2 * 210) and data.dtype == np.uint8
    got = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q6_K)
    assert np.array_equal(got[0, :16], np.zeros(16, np.float32))
    # block_q6_K: ql[128], qh[64], int8 scales[16], fp16 d: every weight within half a step of its sub-block
    blocks = data.reshape(-1, 210)
    step = np.abs(blocks[:, 192:208].view(np.int8).astype(np.float32) * blocks[:, 208:].view("<f2").astype(np.float32))
    err = np.abs(got - w).reshape(-1, 16, 16)
    assert (err <= step[..., None] * 0.5 * (1 + 1e-5)).all()
    assert (step <= np.abs(w).reshape(-1, 16, 16).max(-1) / 32 * 1.2 + 1e-12).all()  # steps not inflated
    sqnr = 10 * np.log10((w ** 2).sum() / ((w - got) ** 2).sum())
    assert sqnr > 30


def test_q6_k_export_falls_back_where_k_is_not_a_multiple_of_256(models, tmp_path):
    report = export_gguf(models["w8a16"], tmp_path / "m.gguf", weight_type="q6_k")
    tensors, _ = _read(tmp_path / "m.gguf")
    for i in range(N_LAYER):  # down_proj has K = 256: Q6_K; every other linear K = 128: exact Q8_0
        assert tensors[f"blk.{i}.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q6_K
        assert report["tensors"][f"blk.{i}.ffn_down.weight"]["sqnr_db"] > 30
        entry = report["tensors"][f"blk.{i}.ffn_up.weight"]
        assert entry["gguf_type"] == "Q8_0" and entry["exact"]
        assert "not a multiple of q6_k's block of 256" in entry["note"]


def _llama_from_gguf(path, like: torch.nn.Module) -> torch.nn.Module:
    """A float LlamaForCausalLM whose every weight is read from the GGUF file (Q/K rows un-permuted)."""
    import transformers

    tensors, _ = _read(path)
    float_model = transformers.LlamaForCausalLM(like.config).eval()
    params = dict(float_model.named_parameters())
    assert sorted(f"{s}.weight" for s in NAMES.values()) == sorted(params)
    with torch.no_grad():
        for gname, source in NAMES.items():
            t = tensors[gname]
            w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
            w = w.reshape(params[f"{source}.weight"].shape)
            if ".attn_q." in gname:
                w = _hf_unpermute(w, N_HEAD)
            elif ".attn_k." in gname:
                w = _hf_unpermute(w, N_KV)
            params[f"{source}.weight"].copy_(w)
    return float_model


@pytest.mark.parametrize("recipe", ["w4g32", "w4a16", "rotate"])
@pytest.mark.heavy
def test_llama_rebuilt_from_the_gguf_reproduces_our_logits(models, tmp_path, recipe):
    model = models[recipe] if recipe in models else _compressed(recipe)  # rotate: R1/R2 folded, norms all ones
    export_gguf(model, tmp_path / "m.gguf", strict=True)
    rebuilt = _llama_from_gguf(tmp_path / "m.gguf", model)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), cpu_kernels.eager_compute_dtype("activation"):  # our kernels in float32, as HF's
        ours, theirs = model(ids).logits, rebuilt(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (ours - theirs).abs().max()
    # and the permutation matters: without un-permuting Q/K the logits are different
    assert not torch.allclose(ours, _permuted_model_logits(rebuilt, ids), atol=1e-3)


def _permuted_model_logits(rebuilt: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        for layer in rebuilt.model.layers:
            layer.self_attn.q_proj.weight.copy_(_hf_permute(layer.self_attn.q_proj.weight, N_HEAD))
            layer.self_attn.k_proj.weight.copy_(_hf_permute(layer.self_attn.k_proj.weight, N_KV))
        return rebuilt(ids).logits


def test_a_reloaded_checkpoint_exports_the_same_file(models, tmp_path):
    """What `lowbit export DIR` sees: save_pretrained, from_pretrained, export: the same bytes as exporting
    the model that was saved."""
    import transformers

    model = models["w4a16"]
    model.save_pretrained(tmp_path / "ckpt")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    export_gguf(model, tmp_path / "a.gguf")
    export_gguf(reloaded, tmp_path / "b.gguf")
    tensors_a, reader_a = _read(tmp_path / "a.gguf")
    tensors_b, reader_b = _read(tmp_path / "b.gguf")
    assert reader_b.fields["general.name"].contents() == "ckpt"  # the directory's name, not its path
    keys = sorted(k for k in reader_a.fields if k != "general.name")
    assert keys == sorted(k for k in reader_b.fields if k != "general.name")
    assert [reader_a.fields[k].contents() for k in keys] == [reader_b.fields[k].contents() for k in keys]
    for name in NAMES:
        assert tensors_a[name].tensor_type == tensors_b[name].tensor_type, name
        assert np.array_equal(np.asarray(tensors_a[name].data), np.asarray(tensors_b[name].data)), name


@pytest.mark.parametrize("recipe,expected", [("w8a16", "Q8_0"), ("w4g32", "Q4_0")])
def test_qwen2_exports_as_llama_cpps_qwen2_with_biases_and_unpermuted_rows(tmp_path, recipe, expected):
    """llama.cpp runs qwen2 with NeoX-style RoPE (Hugging Face's pairing): no row permutation; q/k/v biases."""
    import transformers

    model, _ = zoo.build("qwen2")
    compress(model, W4G32 if recipe == "w4g32" else recipe, progress=False)
    report = export_gguf(model, tmp_path / "m.gguf", strict=True)
    tensors, reader = _read(tmp_path / "m.gguf")
    assert reader.fields["general.architecture"].contents() == "qwen2"
    assert reader.fields["qwen2.attention.head_count_kv"].contents() == N_KV
    names = dict(NAMES)
    for i in range(N_LAYER):
        for g in ("attn_q", "attn_k", "attn_v"):
            names[f"blk.{i}.{g}.bias"] = f"model.layers.{i}.{_PROJ[g]}.bias"
    assert sorted(tensors) == sorted(names)
    modules = dict(model.named_modules())
    rebuilt = transformers.Qwen2ForCausalLM(model.config).eval()
    params = dict(rebuilt.named_parameters())
    assert sorted(params) == sorted(f"{s}.weight" if not s.endswith(".bias") else s for s in names.values())
    with torch.no_grad():
        for gname, source in names.items():
            t = tensors[gname]
            got = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
            if source.endswith(".bias"):
                ours = modules[source.removesuffix(".bias")].bias.detach().float()
            else:
                module = modules[source]
                ours = _our_weight(module, "")  # "": no permutation
                if isinstance(module, LowbitLinear):
                    assert t.tensor_type.name == expected and report["tensors"][gname]["exact"], gname
            assert torch.equal(got.reshape(ours.shape), ours), gname
            params[source if source.endswith(".bias") else f"{source}.weight"].copy_(got.reshape(ours.shape))
        ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
        with cpu_kernels.eager_compute_dtype("activation"):
            ours_logits = model(ids).logits
        assert torch.allclose(ours_logits, rebuilt(ids).logits, atol=1e-4, rtol=1e-4)


def test_byte_vocabulary_for_byte_level_models(models, tmp_path):
    report = export_gguf(models["w8a16"], tmp_path / "v.gguf", vocab="bytes")
    _, reader = _read(tmp_path / "v.gguf")
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == VOCAB and tokens[0] == "<0x00>" and tokens[65] == "<0x41>" and tokens[255] == "<0xFF>"
    assert set(reader.fields["tokenizer.ggml.token_type"].contents()) == {int(gguf.TokenType.BYTE)}
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert report["tokenizer"].startswith("byte-level")
    export_gguf(models["w8a16"], tmp_path / "none.gguf")
    _, reader = _read(tmp_path / "none.gguf")
    assert not any(k.startswith("tokenizer.") for k in reader.fields)
    with pytest.raises(LowbitError, match="vocab='sentencepiece'"):
        export_gguf(models["w8a16"], tmp_path / "x.gguf", vocab="sentencepiece")


def test_cli_exports_a_saved_checkpoint_to_gguf(models, tmp_path, capsys):
    """``lowbit export DIR --format gguf OUT``: the saved checkpoint's codes, read back exact."""
    from lowbit_compiler.cli import main

    model = models["w8a16"]
    model.save_pretrained(tmp_path / "lowbit")
    out = tmp_path / "model.gguf"
    assert main(["export", str(tmp_path / "lowbit"), "--format", "gguf", str(out), "--vocab", "bytes"]) == 0
    assert '"file_type": "MOSTLY_Q8_0"' in capsys.readouterr().out
    tensors, reader = _read(out)
    for name, module_name in NAMES.items():
        decoded = torch.from_numpy(np.asarray(gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type)))
        ours = _our_weight(model.get_submodule(module_name), name)
        assert torch.equal(decoded.reshape(ours.shape).float(), ours.float()), name
