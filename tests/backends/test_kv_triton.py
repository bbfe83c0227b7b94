"""The generated Triton decode attention over the packed KV cache (``backends/kv_triton.py``) under
the interpreter: every stored format (uniform, KIVI, KVQuant with pre-RoPE keys rotated in the
kernel, GEAR, fp8) and logit soft-capping against the blocked torch attention over the same packed cache and against float64
attention over the unquantized keys, GQA and MQA, token splits with a padded (masked) sequence;
the bytes it reads; compiled for sm_90 (registers, spills)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import triton
import triton.language as tl

from lowbit_compiler import kv
from lowbit_compiler.backends import _triton_adapter, kv_triton
from lowbit_compiler.formats import sqnr_db

D = 64


def _kv(t: int, b: int, h: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    fixed = torch.Generator().manual_seed(99)  # per-channel scale and offset, fixed across seeds
    scale, offset = 0.5 + torch.rand(h, 1, D, generator=fixed), 0.5 * torch.randn(h, 1, D, generator=fixed)
    k = torch.randn(b, h, t, D, generator=g) * scale + offset
    v = torch.randn(b, h, t, D, generator=g)
    hit = torch.rand(k.shape, generator=g) < 0.005
    return k + hit * 8 * torch.randn(k.shape, generator=g), v


def _rope():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))

    class Rotary(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inv_freq, self.attention_scaling = inv_freq, 1.0

    rotary = Rotary()

    def rope(pos):
        angle = pos[..., None].float() * inv_freq
        emb = torch.cat([angle, angle], -1)
        return emb.cos(), emb.sin()

    rope.rotary = rotary
    return rope


def _layer(fmt, k, v, split, rope=None):
    layer = kv.classes()[0](fmt, rope)
    kw = {}
    if rope is not None:
        kw = {"kwargs": {"position_ids": torch.arange(split)[None]}}
    layer.update(k[:, :, :split], v[:, :, :split], **kw)
    for t in range(split, k.shape[2]):  # decode steps: the store grows (capacity > length)
        if rope is not None:
            kw = {"kwargs": {"position_ids": torch.tensor([[t]])}}
        layer.update(k[:, :, t:t + 1], v[:, :, t:t + 1], **kw)
    return layer


def _post_rope(k, rope):
    cos, sin = rope(torch.arange(k.shape[2])[None])
    return k * cos[:, None] + kv.rotate_half(k) * sin[:, None]


def _formats():
    kvq = dataclasses.replace(kv.get_format("kvquant3"), group=D, sinks=2)
    calib_k, calib_v = _kv(512, 1, 2, seed=5)
    kvq = dataclasses.replace(kvq, params=kv.fit_kvquant(calib_k, calib_v, kvq))
    return [
        ("int4-g32-window-sinks-gqa", kv.KVFormat("int", 4, 32, window=8, sinks=4), 8),
        ("int3-mqa", kv.KVFormat("int", 3, 64), 4),
        ("kivi2-g16", kv.KVFormat("kivi", 2, 16, window=16), 4),
        ("kvquant3-prerope-outliers-sinks", kvq, 4),
        ("gear4-rank2", dataclasses.replace(kv.get_format("gear4"), group=D, chunk=32), 2),
        ("fp8-g32-window-sinks-gqa", kv.KVFormat("fp8", 8, 32, window=8, sinks=2), 4),
    ]


FORMATS = _formats()


@pytest.mark.parametrize("name,fmt,hq", FORMATS, ids=[f[0] for f in FORMATS])
def test_the_kernel_matches_the_reference_over_the_same_packed_cache(name, fmt, hq):
    """Two sequences (the second padded: 5 masked tokens), 3 token splits of the packed store."""
    hkv = 1 if "mqa" in name else 2
    rope = _rope() if fmt.key_rope == "pre" else None
    k, v = _kv(203, 2, hkv, seed=1)
    k_in = _post_rope(k, rope) if rope else k  # the cache receives keys after RoPE, as in a model
    layer = _layer(fmt, k_in, v, 170, rope)
    assert layer._k.length > 2 * kv_triton.BLOCK_T
    q = torch.randn(2, hq, 1, D, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 1, 1, 203, dtype=torch.bool)
    mask[1, ..., :5] = False
    out = kv_triton.decode_attention(q, layer, mask, D ** -0.5, splits=3)
    assert out is not None
    ref = kv.packed_attention_reference(q, layer, mask, D ** -0.5)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    # and the quantization error against float64 attention over the unquantized keys: bounded
    exact = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k_in.double().repeat_interleave(hq // hkv, 1), v.double().repeat_interleave(hq // hkv, 1),
        attn_mask=mask).transpose(1, 2)
    floors = {"int4-g32-window-sinks-gqa": 14, "int3-mqa": 5, "kivi2-g16": 4, "kvquant3-prerope-outliers-sinks": 13,
              "gear4-rank2": 16, "fp8-g32-window-sinks-gqa": 27}  # measured 16.5, 6.7, 5.3, 14.9, 18.5, 29.6 dB
    assert sqnr_db(exact, out.double()) >= floors[name]


@triton.jit
def _decode_codes(codes_ptr, out_ptr, MODE: tl.constexpr):
    offs = tl.arange(0, 256)
    raw = tl.load(codes_ptr + offs)
    if MODE == 1:
        x = kv_triton._e4m3_bits(raw.to(tl.int32))
    else:
        x = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    tl.store(out_ptr + offs, x)


@pytest.mark.parametrize("mode", [kv_triton.FP8_BITS.value, kv_triton.FP8_NATIVE.value], ids=["bits", "native"])
def test_fp8_codes_decode_to_torchs_e4m3_values(mode):
    """Every e4m3 code (NaN's two aside: torch's conversion saturates, the cache never holds them)
    decodes to torch's float8_e4m3fn value, exactly: the bit construction (the interpreter's
    variant) and the fp8 conversion (the GPU variant, here as the interpreter emulates it)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    out = torch.empty(256)
    _decode_codes[(1,)](codes, out, MODE=mode)
    expected = codes.view(torch.float8_e4m3fn).float()
    valid = ~expected.isnan()
    assert int(valid.sum()) == 254
    assert torch.equal(out[valid], expected[valid])


@pytest.mark.parametrize("name", ["int4-g32-window-sinks-gqa", "fp8-g32-window-sinks-gqa"])
def test_logit_softcapping_matches_the_reference(name):
    """Gemma-2's soft-capping (softcap * tanh(s / softcap) on the scaled scores) in the kernel and
    on the float tokens it folds in, against the blocked torch attention with the same softcap;
    with queries large enough that capping at 1.0 changes the output (it must not be a no-op)."""
    fmt = dict((f[0], f[1]) for f in FORMATS)[name]
    k, v = _kv(203, 2, 2, seed=1)
    layer = _layer(fmt, k, v, 170)
    q = 8 * torch.randn(2, 8, 1, D, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 1, 1, 203, dtype=torch.bool)
    mask[1, ..., :5] = False
    capped = kv_triton.decode_attention(q, layer, mask, D ** -0.5, softcap=1.0, splits=3)
    torch.testing.assert_close(capped, kv.packed_attention_reference(q, layer, mask, D ** -0.5, 1.0),
                               atol=2e-5, rtol=1e-4)
    uncapped = kv.packed_attention_reference(q, layer, mask, D ** -0.5)
    assert (capped - uncapped).abs().max() > 0.1


def test_gqa_reads_the_packed_cache_once_per_kv_head():
    """With 4 query heads per KV head the kernel loads exactly the bytes it loads with 1, plus the
    extra queries and partial results: the packed codes and scales are read once per KV head, not
    once per query head. And the codes bytes are all read (at least the store's size)."""
    fmt = kv.KVFormat("int", 4, 64)
    k, v = _kv(128, 1, 2, seed=3)
    layer = _layer(fmt, k, v, 128)
    reads = {}
    splits = 2
    for g in (1, 4):
        q = torch.randn(1, 2 * g, 1, D)
        with _triton_adapter.count_traffic() as counts:
            kv_triton.packed_partials(q, layer, None, D ** -0.5, splits=splits)
        reads[g] = counts["read"]
    queries = 2 * splits * 3 * D * 4           # 3 more query heads per KV head, loaded by each split's program
    partials = 2 * 3 * splits * (D + 2) * 4    # and their partial acc, max and sum read by the combine
    assert reads[4] - reads[1] == queries + partials
    n = layer._k.length
    row = D * 4 // 8
    # per token and tensor: the codes (each element reads its byte and the next, the last row byte once),
    # the fp16 scale and zero gathered per element
    per_tensor = n * 2 * (D + (D - 2)) + n * 2 * D * 2 * 2
    assert reads[1] == 2 * per_tensor + 2 * splits * D * 4 + 2 * splits * (D + 2) * 4
    assert n * 2 * row * 2 <= 2 * per_tensor  # every code byte of keys and values at least once


@pytest.mark.slow  # the ahead-of-time compile runs in a child process (~10-30 s)
def test_the_kernel_compiles_for_sm90_without_spills():
    """Head size 128, 4 query heads per KV head, BLOCK_T 16, 8 warps. Measured: int4 112 registers,
    kivi2 112, kvquant3 126, gear4 143, no spills. kvquant3's 32-byte stack frame is libdevice's
    sin/cos slow path for large arguments (Payne-Hanek reduction: a local array; 0 bytes with its
    RoPE off), not register spills. fp8 (the native e4m3 conversion) 132 and int4 with logit
    soft-capping 112, no spills."""
    names = ("int4", "kivi2", "kvquant3", "gear4", "fp8")
    jobs = [kv_triton.aot_job(n, head_dim=128, group=4) for n in names]
    no_rope = kv_triton.aot_job("kvquant3", head_dim=128, group=4)
    no_rope["constexprs"]["PRE_ROPE"] = False
    softcap = kv_triton.aot_job("int4", head_dim=128, group=4, softcap=True)
    reports = _triton_adapter.compile_for_gpu(jobs + [no_rope, softcap])
    for name, report in zip(names + ("kvquant3 without RoPE", "int4 with softcap"), reports):
        print(name, report)
        stack = 32 if name == "kvquant3" else 0
        assert report["arch"] == "sm_90" and report["spill_bytes"] <= stack, (name, report)
        assert 0 < report["registers"] <= 160, (name, report)


def test_generate_through_the_triton_kernel_gives_the_c_kernels_tokens():
    """compress(llama, "kv4"), then generate() with every decode step's attention in the Triton
    kernel (LOWBIT_KV_KERNEL=triton, interpreted): the tokens and logits of the C-kernel path."""
    import copy

    from lowbit_compiler import compress, zoo

    model, inputs = zoo.build("llama")
    compressed = compress(copy.deepcopy(model), "kv4", progress=False)
    ids = inputs["input_ids"]
    calls = []
    launch = kv_triton.packed_partials

    def counted(*args, **kwargs):
        calls.append(1)
        return launch(*args, **kwargs)

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        reference = compressed.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True,
                                        return_dict_in_generate=True)
        mp.setenv(kv_triton.ENV, "triton")
        mp.setattr(kv_triton, "packed_partials", counted)
        out = compressed.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
    assert len(calls) == 3 * 2  # 3 decode steps x 2 layers
    assert torch.equal(out.sequences, reference.sequences)
    torch.testing.assert_close(torch.cat(out.logits), torch.cat(reference.logits), atol=1e-5, rtol=1e-5)


def test_gemma2_softcapping_generates_through_the_triton_kernel():
    """compress(gemma2, "kv4") with attention logit soft-capping set low enough to matter: generate()
    with every decode step's attention in the Triton kernel (interpreted) gives the tokens and
    logits of the blocked torch attention (LOWBIT_KV_KERNEL=torch)."""
    from tests.helpers import softcapped_gemma2_kv4

    compressed, ids = softcapped_gemma2_kv4()
    calls = []
    launch = kv_triton.packed_partials

    def counted(*args, **kwargs):
        calls.append(kwargs.get("softcap", args[5] if len(args) > 5 else None))
        return launch(*args, **kwargs)

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setenv(kv_triton.ENV, "torch")
        reference = compressed.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True,
                                        return_dict_in_generate=True)
        mp.setenv(kv_triton.ENV, "triton")
        mp.setattr(kv_triton, "packed_partials", counted)
        out = compressed.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
    assert calls == [0.1] * (3 * 2)  # 3 decode steps x 2 layers, each with the model's softcap
    assert torch.equal(out.sequences, reference.sequences)
    torch.testing.assert_close(torch.cat(out.logits), torch.cat(reference.logits), atol=1e-5, rtol=1e-5)
