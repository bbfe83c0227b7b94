"""The generated decode attention kernel (``backends/cpu_attention.py``) and its CPU lowering
(``lowering._fuse_cpu_decode_attention``): the new keys and values bit for bit those of RoPE + cat,
the output against a float64 reference and torch's SDPA, on GQA / MHA, strided and broadcast
inputs, an empty cache and a long one (scores off the stack); inputs it does not take run the torch
calls; in a compiled Llama every decode step's attention is one call, the prefill graph keeps
torch's, the summary counts them, and the generated tokens and logits match the unfused graph."""
from __future__ import annotations

import math

import pytest
import torch

from lowbit_compiler.backends import cpu_attention, cpu_codegen, cpu_rope

pytestmark = pytest.mark.skipif(cpu_attention.kernel() is None,
                                reason=f"no C compiler: {cpu_codegen._disabled_reason}")


def _inputs(b, hq, hkv, t, d, seed=0, cos_batch=1):
    """q/k/v as the views of a fused q/k/v output (what the graph passes), a contiguous cache."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, 1, (hq + 2 * hkv) * d, generator=g)
    q = qkv[..., : hq * d].view(b, 1, hq, d).transpose(1, 2)
    k = qkv[..., hq * d:(hq + hkv) * d].view(b, 1, hkv, d).transpose(1, 2)
    v = qkv[..., (hq + hkv) * d:].view(b, 1, hkv, d).transpose(1, 2)
    cache_k, cache_v = torch.randn(b, hkv, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g)
    angles = (torch.arange(cos_batch, dtype=torch.float32)[:, None] + t) * torch.rand(d // 2, generator=g).repeat(2)
    cos, sin = angles.cos()[:, None, None, :], angles.sin()[:, None, None, :]  # [1 or B, 1, 1, D]
    return q, k, v, cache_k, cache_v, cos, sin


def _rotate(x, cos, sin):
    """transformers' apply_rotary_pos_emb for one tensor (not the code under test)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _float64_attention(q, keys, values, scale):
    q, keys, values = q.double(), keys.double(), values.double()
    g = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(g, dim=1), values.repeat_interleave(g, dim=1)
    return torch.softmax(q @ keys.transpose(-1, -2) * scale, dim=-1) @ values


@pytest.mark.parametrize("b, hq, hkv, t, d, rope, cos_batch", [
    (1, 16, 4, 40, 128, True, 1),  # the decode benchmark's layer
    (2, 8, 8, 5, 64, True, 2),     # MHA, batch 2, per-sequence positions
    (2, 6, 2, 9, 32, True, 1),     # batch 2, cos broadcast over the batch
    (1, 4, 1, 0, 32, True, 1),     # an empty cache (the first token)
    (1, 4, 2, 5000, 16, False, 1),  # scores longer than the on-stack buffer; no RoPE
])
def test_the_kernel_matches_rope_cat_and_sdpa(b, hq, hkv, t, d, rope, cos_batch):
    q, k, v, cache_k, cache_v, cos, sin = _inputs(b, hq, hkv, t, d, seed=t, cos_batch=cos_batch)
    if not rope:
        cos = sin = None
    scale = 0.7 / math.sqrt(d)
    before = cpu_attention.calls
    keys, values, out = cpu_attention.decode_step(q, k, v, cache_k, cache_v, cos, sin, scale, hq != hkv)
    assert cpu_attention.calls == before + 1
    qr, kr = (_rotate(q, cos, sin), _rotate(k, cos, sin)) if rope else (q, k)
    assert torch.equal(keys, torch.cat([cache_k, kr], dim=-2))
    assert torch.equal(values, torch.cat([cache_v, v], dim=-2))
    assert out.shape == (b, hq, 1, d) and out.is_contiguous()
    exact = _float64_attention(qr, keys, values, scale)
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=2e-6)
    sdpa = torch.nn.functional.scaled_dot_product_attention(qr, keys, values, scale=scale, enable_gqa=hq != hkv)
    torch.testing.assert_close(out, sdpa, rtol=0, atol=2e-6)


@pytest.mark.parametrize("layout", ["token-major cache", "slices of a longer buffer"])
def test_checked_calls_read_caches_through_their_strides(layout):
    """What a checked call trusts its strides for: a cache stored [B, T, H, D] (rows H * D apart:
    the row-by-row copy) or a view into a preallocated [B', H', T_max, D] buffer (batch and head
    strides of the buffer), against the torch calls on contiguous copies."""
    b, hq, hkv, t, d = 2, 8, 2, 9, 32
    q, k, v, _, _, cos, sin = _inputs(b, hq, hkv, t, d, seed=7)
    g = torch.Generator().manual_seed(8)
    if layout == "token-major cache":
        cache_k = torch.randn(b, t, hkv, d, generator=g).transpose(1, 2)
        cache_v = torch.randn(b, t, hkv, d, generator=g).transpose(1, 2)
    else:
        cache_k = torch.randn(b + 1, hkv + 1, t + 5, d, generator=g)[1:, :hkv, :t]
        cache_v = torch.randn(b + 1, hkv + 1, t + 5, d, generator=g)[1:, :hkv, :t]
    assert not cache_k.is_contiguous()
    before = cpu_attention.calls
    got = cpu_attention.decode_step(q, k, v, cache_k, cache_v, cos, sin, None, True, checked=True)
    assert cpu_attention.calls == before + 1
    ref = cpu_attention.decode_step_reference(q, k, v, cache_k.contiguous(), cache_v.contiguous(), cos, sin,
                                              None, True)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    torch.testing.assert_close(got[2], ref[2], rtol=0, atol=2e-6)


def test_a_cache_handed_back_grows_in_place_and_nothing_else_is_written(monkeypatch):
    """The new keys and values are views of buffers with room to grow: the next step, given them
    back, appends in place (no copy of the cached rows; the same buffer until it is full, then one
    1.5 times as long); a branch that appends to a view another step already extended, and a cropped
    view, get fresh buffers, and what the earlier views show never changes. Every step's keys,
    values and output equal the torch calls'."""
    b, hq, hkv, d = 2, 8, 2, 32
    q, k, v, cache_k, cache_v, cos, sin = _inputs(b, hq, hkv, 5, d, seed=3)
    ref_k, ref_v = cache_k, cache_v
    g = torch.Generator().manual_seed(4)
    before, buffers = dict(cpu_attention.appended_in_place), []
    for step in range(70):
        k, v = torch.randn(b, hkv, 1, d, generator=g), torch.randn(b, hkv, 1, d, generator=g)
        keys, values, out = cpu_attention.decode_step(q, k, v, cache_k, cache_v, cos, sin, None, True, checked=True)
        rk, rv, rout = cpu_attention.decode_step_reference(q, k, v, ref_k, ref_v, cos, sin, None, True)
        assert torch.equal(keys, rk) and torch.equal(values, rv)
        torch.testing.assert_close(out, rout, rtol=0, atol=2e-6)
        buffers.append(keys._base.data_ptr())
        cache_k, cache_v, ref_k, ref_v = keys, values, rk, rv
    ran = {kind: n - before.get(kind, 0) for kind, n in cpu_attention.appended_in_place.items()}
    # 5 -> a buffer of 64 rows (copied), in place to 64 rows, then 97 rows (copied), in place to 75
    assert ran == {False: 2, True: 68} and len(set(buffers)) == 2, ran
    first = cpu_attention.decode_step(q, k, v, cache_k, cache_v, cos, sin, None, True)[0]
    seen = first.clone()
    other = cpu_attention.decode_step(q, k * 2, v, cache_k, cache_v, cos, sin, None, True)[0]  # a second branch
    assert other._base is not first._base and torch.equal(first, seen)
    assert torch.equal(other[:, :, -1], cpu_rope.rope(k * 2, cos, sin)[:, :, 0])
    cropped = cpu_attention.decode_step(q, k, v, first[:, :, :10], first[:, :, :10], cos, sin, None, True)[0]
    assert cropped.shape[2] == 11 and cropped._base is not first._base and torch.equal(first, seen)
    monkeypatch.setattr(cpu_attention, "grow_in_place", False)  # exact-size copies, as cat
    exact, _, out = cpu_attention.decode_step(q, k, v, first, first, cos, sin, None, True)
    assert exact._base.shape[2] == first.shape[2] + 1 and torch.equal(exact[:, :, :-1], first)


def test_one_tensor_as_both_caches_and_two_threads_from_one_view_are_never_appended_in_place():
    """A model that appends keys and values to one shared past passes the same view as both caches:
    appending both rows to that one buffer would overwrite the key with the value, so it copies.
    Threads stepping from one view at once (two requests forked from a shared prefix): the row is
    claimed before the kernel runs, so at most one appends in place and every result equals the
    torch calls'."""
    import threading

    b, hq, hkv, d = 1, 4, 2, 32
    q, k, v, cache_k, cache_v, cos, sin = _inputs(b, hq, hkv, 5, d, seed=8)
    keys, values, _ = cpu_attention.decode_step(q, k, v, cache_k, cache_v, cos, sin, None, True, checked=True)
    got = cpu_attention.decode_step(q, k * 3, v, keys, keys, cos, sin, None, True, checked=True)
    ref = cpu_attention.decode_step_reference(q, k * 3, v, keys.clone(), keys.clone(), cos, sin, None, True)
    assert got[0]._base is not keys._base and all(torch.equal(a, r) for a, r in zip(got[:2], ref[:2]))
    torch.testing.assert_close(got[2], ref[2], rtol=0, atol=2e-6)

    results, errors = {}, []

    def step(i):
        try:
            results[i] = cpu_attention.decode_step(q, k * i, v * i, keys, values, cos, sin, None, True, checked=True)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    before = dict(cpu_attention.appended_in_place)
    threads = [threading.Thread(target=step, args=(i,)) for i in range(1, 9)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert cpu_attention.appended_in_place[True] - before.get(True, 0) <= 1
    for i, (rk, rv, out) in results.items():
        ek, ev, eo = cpu_attention.decode_step_reference(q, k * i, v * i, keys, values, cos, sin, None, True)
        assert torch.equal(rk, ek) and torch.equal(rv, ev), i
        torch.testing.assert_close(out, eo, rtol=0, atol=2e-6)


class _Attention(torch.nn.Module):
    """One decode step of attention over a cache, written as transformers writes it."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, q, k, v, cache_k, cache_v, mask):
        keys, values = torch.cat([cache_k, k], dim=-2), torch.cat([cache_v, v], dim=-2)
        if self.mode == "in-place write":
            cache_k.mul_(1.0)  # between the cats and the attention: the fused call would read it late
        kw = {"attn_mask": mask} if self.mode == "mask" else {"is_causal": True} if self.mode == "causal" else {}
        out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, enable_gqa=True, **kw)
        return out, keys, values


@pytest.mark.parametrize("mode", ["plain", "mask", "causal", "in-place write"])
def test_the_lowering_fuses_only_what_the_kernel_computes(mode):
    """A maskless, non-causal one-token attention over cat'd caches becomes one call; a mask, a
    causal flag or an in-place write between the cats and SDPA leave torch's calls; outputs equal
    eager either way."""
    from tests.helpers import Recorder

    torch._dynamo.reset()
    rec = Recorder(recipe="w8a16", progress=False, target="cpu")
    args = list(_inputs(1, 4, 2, 6, 16, seed=2)[:5]) + [torch.zeros(1, 1, 1, 7)]
    eager = _Attention(mode)(*[a.clone() for a in args])
    with torch.no_grad():
        got = torch.compile(_Attention(mode), backend=rec)(*[a.clone() for a in args])
    fused = sum(n.target is cpu_attention.decode_step for gm in rec.graphs for n in gm.graph.nodes)
    assert fused == (1 if mode == "plain" else 0)
    for a, e in zip(got, eager):
        torch.testing.assert_close(a, e, rtol=0, atol=2e-6)


def test_checked_calls_and_unchecked_calls_agree_and_the_default_scale():
    args = _inputs(1, 8, 2, 7, 64, seed=3)
    before = cpu_attention.calls
    plain = cpu_attention.decode_step(*args, None, True)
    checked = cpu_attention.decode_step(*args, None, True, checked=True)
    assert cpu_attention.calls == before + 2  # both ran the kernel
    ref = cpu_attention.decode_step_reference(*args, None, True)
    for a, c in zip(plain, checked):
        assert torch.equal(a, c)
    torch.testing.assert_close(plain[2], ref[2], rtol=0, atol=2e-6)  # scale None: 1 / sqrt(D), as SDPA


@pytest.mark.parametrize("case", ["bfloat16", "two query tokens", "gqa without enable_gqa", "3-D cos",
                                  "requires grad", "column-major cache", "caches of two lengths"])
def test_inputs_the_kernel_does_not_take_run_the_torch_calls(case):
    q, k, v, cache_k, cache_v, cos, sin = _inputs(1, 4, 2, 6, 16, seed=1)
    gqa = True
    if case == "bfloat16":
        q, k, v, cache_k, cache_v = (t.bfloat16() for t in (q, k, v, cache_k, cache_v))
        cos, sin = cos.bfloat16(), sin.bfloat16()
    elif case == "two query tokens":
        q = torch.cat([q, q], dim=2)
    elif case == "gqa without enable_gqa":
        gqa = False
    elif case == "3-D cos":
        cos, sin = cos[0], sin[0]
    elif case == "requires grad":
        q = q.detach().requires_grad_(True)
    elif case == "column-major cache":
        cache_k = cache_k.transpose(-1, -2).contiguous().transpose(-1, -2)
    else:
        cache_v = cache_v[:, :, :-1]
    before = cpu_attention.calls
    if case == "gqa without enable_gqa":
        with pytest.raises(RuntimeError):  # what SDPA says of these inputs
            cpu_attention.decode_step(q, k, v, cache_k, cache_v, cos, sin, None, gqa)
    elif case == "caches of two lengths":  # a checked call still compares them: the torch calls run
        ran = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cpu_attention, "decode_step_reference", lambda *a: ran.append(a) or (None, None, None))
            cpu_attention.decode_step(q, k, v, cache_k, cache_v, cos, sin, None, gqa, checked=True)
        assert len(ran) == 1
    else:
        got = cpu_attention.decode_step(q, k, v, cache_k, cache_v, cos, sin, None, gqa,
                                        checked=case == "column-major cache")
        ref = cpu_attention.decode_step_reference(q, k, v, cache_k, cache_v, cos, sin, None, gqa)
        for a, r in zip(got, ref):
            assert torch.equal(a, r)
        if case == "requires grad":
            got[2].sum().backward()
            assert q.grad is not None
    assert cpu_attention.calls == before


def _run_llama(monkeypatch, fuse: bool, steps: int = 4):
    from lowbit_compiler.backends import lowering
    from tests.conftest import make_model
    from tests.helpers import Recorder

    torch._dynamo.reset()
    if not fuse:
        monkeypatch.setattr(lowering, "_fuse_cpu_decode_attention", lambda gm: 0)
    rec = Recorder(recipe="w4a16", progress=False)
    model = make_model("llama")
    model.compile(backend=rec)
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = cpu_attention.calls
        out = model.generate(ids, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return rec, out, cpu_attention.calls - before, model.config.num_hidden_layers


@pytest.mark.heavy
def test_a_compiled_llama_runs_each_decode_attention_as_one_call(monkeypatch):
    """Decode graphs: one ``decode_step`` per layer (RoPE, both cats and SDPA gone), counted in the
    summary and shown by ``lowbit inspect``; the prefill graph (6 query tokens) keeps torch's
    calls. Tokens equal and logits within float32 rounding of the graph compiled without it. The
    buffers' least capacity lowered to 8, 16 tokens after a 6-token prompt grow each layer's cache
    three times: made at the first step (10 rows), copied into 16 rows at 10 cached tokens and into
    25 at 16, appended in place between."""
    from lowbit_compiler.cli import format_summary

    sdpa = torch._C._nn.scaled_dot_product_attention
    monkeypatch.setattr(cpu_attention, "_MIN_CAPACITY", 8)
    before = dict(cpu_attention.appended_in_place)
    rec, out, ran, layers = _run_llama(monkeypatch, True, steps=16)
    grown = {kind: n - before.get(kind, 0) for kind, n in cpu_attention.appended_in_place.items()}
    assert ran == layers * 15  # 15 decode steps (the last token is not run)
    assert grown == {False: 3 * layers, True: 12 * layers}, grown
    decode = [(gm, s) for gm, s in zip(rec.graphs, rec.summaries)
              if any(n.target is cpu_attention.decode_step for n in gm.graph.nodes)]
    prefill = [gm for gm, s in zip(rec.graphs, rec.summaries) if (gm, s) not in decode]
    assert decode and len(prefill) == 1
    for gm, summary in decode:
        calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        assert calls.count(cpu_attention.decode_step) == layers
        assert sdpa not in calls and cpu_rope.rope not in calls
        assert calls.count(torch.cat) == 1  # the rotary table's (cos, sin); the caches' are in the calls
        assert summary["cpu_fusions"]["decode_attention"] == layers
        label = f"decode attention steps (RoPE, cache cats, SDPA) as generated calls: {layers}"
        assert label in format_summary({"graph": "g", **summary})
        assert all(n.kwargs.get("checked") is True for n in gm.graph.nodes if n.target is cpu_attention.decode_step)
    prefill_calls = [n.target for n in prefill[0].graph.nodes if n.op == "call_function"]
    assert prefill_calls.count(sdpa) == layers and cpu_attention.decode_step not in prefill_calls
    _, plain, plain_ran, _ = _run_llama(monkeypatch, False, steps=16)
    assert plain_ran == 0
    assert torch.equal(out.sequences, plain.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(plain.logits), rtol=0, atol=1e-4)
    assert torch.equal(out.logits[0], plain.logits[0])  # the prefill's logits: the same graph

