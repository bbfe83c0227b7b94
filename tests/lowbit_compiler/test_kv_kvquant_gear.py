"""KVQuant (pre-RoPE per-channel keys, calibrated non-uniform codebooks, dense-and-sparse
outliers, sink tokens) and GEAR (uniform codes + low-rank residual + sparse outliers): the
codebook fit, round-trip error against uniform int3/int4 on data with outliers, the bytes the
cache object holds, the RoPE undone and redone around the packed keys, codebooks fitted from the
calibration engine's activations, and generate() through compress()."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from lowbit_compiler import compress, kv, zoo
from lowbit_compiler.formats import sqnr_db
from lowbit_compiler.pass_base import LowbitError
from lowbit_compiler.recipe import get_recipe

H = 2


def _kv(t: int, d: int = 64, seed: int = 0, outlier_rate: float = 0.004):
    """Keys with a per-channel scale and offset (as real keys have, before RoPE) and values, both
    with rare large outliers; the channel statistics are fixed, the tokens drawn from ``seed``."""
    fixed = torch.Generator().manual_seed(1234)
    scale, offset = 0.5 + 2 * torch.rand(H, 1, d, generator=fixed), torch.randn(H, 1, d, generator=fixed)
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, H, t, d, generator=g) * scale + offset
    v = torch.randn(1, H, t, d, generator=g)
    for x in (k, v):
        hit = torch.rand(x.shape, generator=g) < outlier_rate
        x += hit * torch.randn(x.shape, generator=g) * 20
    return k, v


def _fitted(name: str = "kvquant3", **changes) -> kv.KVFormat:
    fmt = dataclasses.replace(kv.get_format(name), **{"key_rope": "post", "sinks": 0, **changes})
    return dataclasses.replace(fmt, params=kv.fit_kvquant(*_kv(1024, seed=1), fmt))


def _layer(fmt: kv.KVFormat, k: torch.Tensor, v: torch.Tensor, rope=None):
    layer = kv.classes()[0](fmt, rope)
    layer.update(k, v)
    return layer


def _roundtrip(layer) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = list(layer.blocks(torch.float64))
    return torch.cat([b[1] for b in blocks], 2), torch.cat([b[2] for b in blocks], 2)


def test_lloyd_codebook_is_the_lloyd_max_quantizer():
    """8 levels fitted on N(0, 1) are the known Lloyd-Max levels (Max 1960: 0.245, 0.756, 1.344, 2.152)."""
    x = torch.randn(1 << 18, generator=torch.Generator().manual_seed(0))
    levels = kv.lloyd_codebook(x, 8)
    expected = torch.tensor([0.2451, 0.7560, 1.3439, 2.1520])
    torch.testing.assert_close(levels, torch.cat([-expected.flip(0), expected]), atol=0.04, rtol=0)


def test_kvquant3_roundtrip_beats_uniform_int3_and_kivi3_on_outliers():
    """On keys and values with per-channel structure and rare outliers, calibrated on other tokens
    of the same distribution: KVQuant-3 reconstructs keys, values and the attention output better
    than uniform int3 and KIVI-3 at the same bits."""
    k, v = _kv(512, seed=2)
    q = torch.randn(1, 2 * H, 1, 64, generator=torch.Generator().manual_seed(3)) * 2
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(2, 1),
                                                           v.double().repeat_interleave(2, 1))
    results = {}
    for name, fmt in (("kvquant3", _fitted()), ("int3", kv.get_format("int3")),
                      ("kivi3", dataclasses.replace(kv.get_format("kivi3"), window=0))):
        layer = _layer(fmt, k, v)
        kd, vd = _roundtrip(layer)
        out = kv.packed_attention_reference(q, layer, None, 64 ** -0.5).transpose(1, 2)
        results[name] = (sqnr_db(k, kd), sqnr_db(v, vd), sqnr_db(ref, out.double()))
    for baseline in ("int3", "kivi3"):
        for i, (what, margin) in enumerate((("keys", 3), ("values", 3), ("attention", 1))):
            assert results["kvquant3"][i] >= results[baseline][i] + margin, (what, baseline, results)
    # and the outliers are what buys it: without them the clamped keys fall far behind
    no_outliers = _layer(_fitted(outliers=0.0), k, v)
    assert sqnr_db(k, _roundtrip(no_outliers)[0]) < results["int3"][0]


def test_kvquant_outliers_are_exact_and_sinks_float():
    fmt = dataclasses.replace(_fitted(), sinks=3)
    k, v = _kv(100, seed=4)
    layer = _layer(fmt, k, v)
    assert torch.equal(layer._sink_k, k[:, :, :3]) and layer._k.length == 97
    kd, vd = layer._k.block(0, 97, torch.float32), layer._v.block(0, 97, torch.float32)
    for x, xd, store in ((k, kd, layer._k), (v, vd, layer._v)):
        idx = store.fields["oidx"].long()
        assert idx.shape[-1] == 1  # 1 % of 64 channels: one per row
        torch.testing.assert_close(xd.gather(-1, idx), x[:, :, 3:].gather(-1, idx).half().float(), atol=0, rtol=0)
    # the largest deviation of each key row (in calibrated channel units) is the one kept
    p = fmt.params
    u = (k[:, :, 3:] - p.key_center.float()[None, :, None]) / p.key_scale.float()[None, :, None]
    assert torch.equal(layer._k.fields["oidx"].long()[..., 0], u.abs().argmax(-1))


@pytest.mark.parametrize("name,formula,min_ratio", [
    ("kvquant3", 8 * (2 * 48 + 2 * 3 + 4) + 4, 4.5), ("gear4", 8 * 2 * (64 + 4 + 3 + 2 * 2 + 128 * 2 * 2 / 64), 3.0)])
def test_bytes_per_token_are_what_the_cache_holds(name, formula, min_ratio):
    """Llama-3-8B attention shape (8 KV heads x 128): every tensor the layer references is counted;
    codes, scales, outliers (fp16 + index), low-rank factors and positions are all in the packed
    bytes, the calibrated constants apart, and the formula matches."""
    fmt = dataclasses.replace(kv.get_format(name), sinks=0)
    heads, d, tokens = 8, 128, 1024
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, heads, tokens, d, generator=g).bfloat16()
    v = torch.randn(1, heads, tokens, d, generator=g).bfloat16()
    rope = None
    if fmt.scheme == "kvquant":
        fmt = dataclasses.replace(fmt, params=kv.fit_kvquant(k.float(), v.float(), fmt))
        rope = lambda pos: (torch.ones(*pos.shape, d), torch.zeros(*pos.shape, d))  # noqa: E731 (identity RoPE)
    layer = _layer(fmt, k, v, rope)
    held, seen, stack = 0, set(), [layer]
    while stack:
        obj = stack.pop()
        values = list(vars(obj).values()) + list(getattr(obj, "fields", {}).values())
        for value in values:
            if isinstance(value, torch.Tensor) and value.dtype not in (torch.float32, torch.bfloat16):
                if value.untyped_storage().data_ptr() not in seen:
                    seen.add(value.untyped_storage().data_ptr())
                    held += value.untyped_storage().nbytes()
            elif type(value).__name__ in ("_KVQuantStore", "_GearStore", "KVQuantParams"):
                stack.append(value)
    nbytes = layer.nbytes(allocated=True)
    constant_fp16 = fmt.params.key_center.nbytes + fmt.params.key_scale.nbytes if fmt.params is not None else 0
    assert held == nbytes["packed"] + constant_fp16  # the float32 codebooks are the other constants
    assert nbytes["constant"] == fmt.constant_bytes(heads, d)
    assert fmt.bytes_per_token(heads, d) == pytest.approx(formula)
    assert layer.nbytes()["packed"] == pytest.approx(formula * layer._k.length)
    assert layer.nbytes()["float"] == layer._float_k.numel() * 2 * 2  # nothing float but what waits for a chunk
    assert 2 * heads * d * 2 / formula >= min_ratio


def test_gear4_roundtrip_beats_int4_and_the_low_rank_part_helps():
    k, v = _kv(256, seed=5)
    int4 = _roundtrip(_layer(kv.get_format("int4"), k, v))
    gear = _roundtrip(_layer(kv.get_format("gear4"), k, v))
    no_rank = _roundtrip(_layer(dataclasses.replace(kv.get_format("gear4"), rank=0), k, v))
    for x, a, b, c in zip((k, v), int4, gear, no_rank):
        assert sqnr_db(x, b) >= sqnr_db(x, a) + 4  # the outliers no longer stretch the per-token ranges
        assert sqnr_db(x, b) > sqnr_db(x, c) + 0.3  # the rank-2 residual adds on top
    layer = _layer(kv.get_format("gear4"), k[:, :, :100], v[:, :, :100])
    assert layer._k.length == 64 and layer._float_k.shape[2] == 36  # a chunk waits in float until it fills


@pytest.fixture(scope="module")
def llama():
    return zoo.build("llama")


def test_keys_are_stored_before_rope_and_rotated_at_read_time(llama):
    """The layer receives post-RoPE keys with their position_ids (as transformers' attention calls
    the cache), stores the keys before RoPE, and its blocks are rotated back at their positions."""
    model, _ = llama
    rope, why = kv.rope_function(model)
    assert why is None
    d = model.config.head_dim
    k, v = _kv(40, d=d, seed=6, outlier_rate=0.0)
    positions = torch.arange(7, 47)[None]  # not 0..39: the cache must use the positions it is given
    cos, sin = rope(positions)
    post = k * cos[:, None] + kv.rotate_half(k) * sin[:, None]
    fmt = _fitted("kvquant3", bits=8, key_rope="pre", sinks=2)
    fmt = dataclasses.replace(fmt, params=kv.fit_kvquant(k, v, fmt))
    layer = kv.classes()[0](fmt, rope)
    layer.update(post[:, :, :30], v[:, :, :30], kwargs={"position_ids": positions[:, :30]})
    for t in range(30, 40):
        layer.update(post[:, :, t:t + 1], v[:, :, t:t + 1], kwargs={"position_ids": positions[:, t:t + 1]})
    assert torch.equal(layer._k.positions(0, 38), positions[:, 2:].expand(1, -1))
    assert sqnr_db(k[:, :, 2:], layer._k.block(0, 38, torch.float32)) >= 40  # stored: the keys before RoPE
    assert sqnr_db(post, _roundtrip(layer)[0]) >= 40                          # read: rotated again
    without = kv.classes()[0](fmt, None)
    with pytest.raises(LowbitError, match="kv.new_cache"):
        without.update(post, v)


def test_kv3_kvquant_codebooks_come_from_the_calibration_engine(llama):
    """compress(model, "kv3-kvquant", calibration=...) fits each layer on the pre-RoPE keys and the
    values the calibration engine observed: the same as fitting on those activations read by
    hooks on k_proj / v_proj (no k_norm in Llama), and one codebook per layer."""
    model, _ = llama
    cfg = model.config
    calibration = [torch.randint(0, cfg.vocab_size, (1, 48), generator=torch.Generator().manual_seed(i))
                   for i in range(3)]
    with pytest.raises(LowbitError, match="needs calibration data"):
        compress(copy.deepcopy(model), "kv3-kvquant", progress=False)
    compressed = compress(copy.deepcopy(model), "kv3-kvquant", calibration=calibration, progress=False)
    details = next(p["details"] for p in compressed.lowbit_summary["passes"] if p["name"] == "mark_kv_cache")
    decisions = list(details["attentions"].values())
    assert [a["keys_quantized"] for a in decisions] == ["pre_rope", "pre_rope"]
    formats = compressed._lowbit_kv_formats
    assert formats[0].key_rope == "pre" and formats[0].params.tokens == 3 * 48
    assert not torch.equal(formats[0].params.key_codebook, formats[1].params.key_codebook)
    seen = {i: {"k": [], "v": []} for i in range(2)}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for name, proj in (("k", layer.self_attn.k_proj), ("v", layer.self_attn.v_proj)):
            hooks.append(proj.register_forward_hook(
                lambda m, a, out, i=i, name=name: seen[i][name].append(out.reshape(1, -1, H, cfg.head_dim).transpose(1, 2))))
    with torch.no_grad():
        for ids in calibration:
            model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    for i in range(2):
        params = kv.fit_kvquant(torch.cat(seen[i]["k"], 2), torch.cat(seen[i]["v"], 2), formats[i])
        torch.testing.assert_close(formats[i].params.key_codebook, params.key_codebook, atol=1e-5, rtol=0)
        torch.testing.assert_close(formats[i].params.value_codebook, params.value_codebook, atol=1e-5, rtol=0)
        torch.testing.assert_close(formats[i].params.key_center, params.key_center, atol=1e-3, rtol=0)
        assert decisions[i]["codebooks"]["keys"] == [round(float(c), 4) for c in params.key_codebook]
    assert decisions[0]["bytes_per_token"] == formats[0].bytes_per_token(2, cfg.head_dim)


@pytest.mark.parametrize("scheme", ["kvquant3", "gear4"])
@pytest.mark.heavy
def test_generate_at_high_rate_gives_the_float_tokens(llama, scheme):
    """The whole path (calibration, install, pre-RoPE store, RoPE at read time, the blocked
    attention in prefill and decode) at 8 bits gives the float cache's greedy tokens; at the
    recipe's own bits, generate() runs on the compressed cache and holds only packed bytes beyond
    the sinks and the pending chunk."""
    model, inputs = llama
    ids = inputs["input_ids"]
    calibration = [torch.randint(0, model.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(9))]
    sequence = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    recipe = get_recipe("kv3-kvquant" if scheme == "kvquant3" else "kv4-gear")
    with torch.no_grad():
        reference = model.generate(ids, max_new_tokens=40, do_sample=False)
        for bits in (8, None):
            r = recipe.replace(options={"mark_kv_cache": {"scheme": scheme, **({"bits": bits} if bits else {}),
                                                          **({"rank": 4} if scheme == "gear4" else {})}})
            compressed = compress(copy.deepcopy(model), r, calibration=calibration, progress=False)
            out = compressed.generate(ids, max_new_tokens=40, do_sample=False)
            if bits == 8:
                assert torch.equal(out, reference)
                # random weights leave attention nearly flat, so tokens alone barely see the keys:
                # the logits of a prefill then decode steps do (45 dB; 35 without RoPE redone)
                cache, logits = kv.new_cache(compressed), []
                for start, stop in ((0, 30), *((t, t + 1) for t in range(30, 40))):
                    logits.append(compressed(sequence[:, start:stop], cache=cache, use_cache=True).logits)
                assert sqnr_db(model(sequence).logits, torch.cat(logits, 1)) >= 45
        cache = compressed(out, use_cache=True).past_key_values
    assert type(cache).__name__ == "CompressedKVCache"
    fmt = compressed._lowbit_kv_formats[0]
    held = cache.layers[0].nbytes()
    assert held["packed"] == pytest.approx(fmt.bytes_per_token(2, model.config.head_dim) * cache.layers[0]._k.length)
    assert cache.layers[0]._k.length >= out.shape[1] - 64


def test_pre_rope_keys_refused_where_the_cache_cannot_redo_rope():
    """Phi rotates part of each head: the cache cannot redo its RoPE, so install says so and the
    model keeps its float cache (strict mode raises)."""
    model, _ = zoo.build("phi")
    fmt = dataclasses.replace(kv.get_format("kvquant3"), key_rope="pre")
    info = kv.install(model, {0: fmt})
    assert not info["applied"] and "before RoPE" in info["reason"] and "kv3-kivi" in info["reason"]
    with pytest.raises(LowbitError, match="strict.*before RoPE"):
        kv.install(model, {0: fmt}, strict=True)


@pytest.mark.parametrize("name,isa,softcap", [("kvquant3", "native", None), ("kvquant3", "avx2", None),
                                              ("kvquant3", "portable", None), ("gear4", "native", None),
                                              ("kvquant3", "native", 1.0), ("gear4", "native", 1.0)])
def test_generated_cpu_kernel_reads_codebooks_outliers_low_rank_and_pre_rope_keys(llama, name, isa, softcap,
                                                                                   monkeypatch):
    """The generated C kernel for KVQuant (codebook indices, per-channel key table, outliers, sink
    tokens, keys before RoPE rotated at their positions with the model's own cos/sin) and GEAR
    (uniform codes + rank-2 residual + outliers): against the blocked torch attention over the same
    packed cache, GQA (4 query heads per KV head), a padded second sequence. Built for the host's
    ISA (AVX-512 codebook permutes here), AVX2 (8-lane permutes) and portable C. With Gemma-2's
    logit soft-capping at 1.0 (queries scaled up so that it moves the output): the same, capped."""
    from lowbit_compiler.backends import kv_cpu

    monkeypatch.setenv("LOWBIT_CPU_ISA", isa)
    model, _ = llama
    d = model.config.head_dim
    t = 150
    k, v = _kv(t, d=d, seed=4)
    k, v = k.expand(2, -1, -1, -1).contiguous(), v.expand(2, -1, -1, -1).contiguous()
    rope = None
    if name == "kvquant3":
        rope, _ = kv.rope_function(model)
        fmt = _fitted("kvquant3", key_rope="pre", sinks=4, group=d)
        fmt = dataclasses.replace(fmt, params=kv.fit_kvquant(k[:1], v[:1], fmt))
        cos, sin = rope(torch.arange(t)[None])
        k = k * cos[:, None] + kv.rotate_half(k) * sin[:, None]  # the cache receives keys after RoPE
    else:
        fmt = dataclasses.replace(kv.get_format("gear4"), group=d, chunk=32)
    layer = kv.classes()[0](fmt, rope)
    layer.update(k[:, :, :130], v[:, :, :130], kwargs={"position_ids": torch.arange(130)[None]})
    for i in range(130, t):
        layer.update(k[:, :, i:i + 1], v[:, :, i:i + 1], kwargs={"position_ids": torch.tensor([[i]])})
    q = (8 if softcap else 1) * torch.randn(2, 4 * H, 1, d, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 1, 1, t, dtype=torch.bool)
    mask[1, ..., :7] = False
    if kv_cpu.unsupported(q, layer) is not None:
        pytest.fail(kv_cpu.unsupported(q, layer))
    out = kv_cpu.decode_attention(q, layer, mask, d ** -0.5, softcap)
    if out is None:
        pytest.skip("no C compiler: the fallback is the reference itself")
    torch.testing.assert_close(out, kv.packed_attention_reference(q, layer, mask, d ** -0.5, softcap), atol=3e-6,
                               rtol=1e-5)
    if softcap:
        assert (out - kv.packed_attention_reference(q, layer, mask, d ** -0.5)).abs().max() > 0.1
