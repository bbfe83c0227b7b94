"""The lowbit backend end to end: entry point, presets, generate(), recompiles, caching, fallbacks."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import lowbit_compiler
from lowbit_compiler import LowbitError, _dynamo_adapter
from lowbit_compiler.backends import cpu_kernels
from lowbit_compiler.backends.lowbit_backend import stats
from lowbit_compiler.formats import sqnr_db
from lowbit_compiler.passes import quantize as quantize_pass
from tests.conftest import ARCHS, make_model, prompt
from tests.helpers import Recorder, count


@pytest.mark.heavy
def test_entry_point_works_without_importing_the_package():
    code = textwrap.dedent("""
        import sys, torch, transformers
        assert "lowbit_compiler" not in sys.modules
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
        model = transformers.LlamaForCausalLM(cfg).eval()
        ids = torch.randint(0, 256, (1, 5))
        with torch.no_grad():
            ref = model(ids).logits
            out = torch.compile(model, backend="lowbit", options={"recipe": "w8a16"})(ids).logits
        from lowbit_compiler.backends.lowbit_backend import stats
        assert stats["backend_calls"] == 1, stats
        print("sqnr", float(10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum())))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split()[-1]) > 25


@pytest.mark.parametrize("arch", ARCHS)
def test_recipe_none_equals_eager(arch):
    model = make_model(arch)
    ids = prompt()
    with torch.no_grad():
        ref = model(ids)[0]
        out = torch.compile(model, backend="lowbit", options={"recipe": "none", "strict": True})(ids)[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("recipe, floor", [("w8a16", 30.0), ("w4a16", 8.0)])
@pytest.mark.heavy
def test_quantized_presets_run_all_linears_on_the_fast_path(recipe, floor):
    model = make_model("llama")
    ids = prompt()
    rec = Recorder(recipe=recipe, strict=True)
    with torch.no_grad():
        ref = model(ids).logits
        out = torch.compile(model, backend=rec)(ids).logits
    summary = rec.summaries[0]
    assert summary["kernel_counts"] == {"cpu": 15} and summary["fallbacks"] == {}
    assert len(summary["layers"]) == 15
    # per layer: o and down alone; q/k/v one fused call, gate.up + SiLU * mul another (CPU fusion groups)
    assert count(rec.graphs[0], "packed_linear") == 5 and count(rec.graphs[0], "fused_linear") == 4
    assert count(rec.graphs[0], "linear") == 0 and count(rec.graphs[0], "silu") == 0
    # end-to-end logits of a random 2-layer model: a loose sanity floor (per-layer floors are in
    # test_formats_and_ops.py and test_offline.py)
    assert sqnr_db(ref, out) >= floor


@pytest.mark.parametrize("arch, linears", [("llama", 15), ("mistral", 15), ("qwen2", 15), ("gpt2", 9), ("bert", 13)])
def test_w8a16_quantizes_every_linear_on_every_architecture(arch, linears):
    model = make_model(arch)
    ids = prompt()
    rec = Recorder(recipe="w8a16", strict=True)
    with torch.no_grad():
        ref = model(ids)[0]
        out = torch.compile(model, backend=rec)(ids)[0]
    summary = rec.summaries[0]
    assert summary["kernel_counts"] == {"cpu": linears} and len(summary["layers"]) == linears
    assert all(layer["weight_sqnr_db"] > 40 for layer in summary["layers"].values())
    assert sqnr_db(ref, out) >= 25


def test_generate_through_backend_with_recompile_budget():
    model = make_model("llama")
    ids = prompt(7)
    with torch.no_grad():
        eager = model.generate(ids, max_new_tokens=32, do_sample=False)
        eager2 = model.generate(prompt(11, seed=2), max_new_tokens=8, do_sample=False)
    calls = stats["backend_calls"]
    misses = quantize_pass.QUANT_CACHE.misses
    model.compile(backend="lowbit", options={"recipe": "none", "strict": True})
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=32, do_sample=False)
    first = stats["backend_calls"] - calls
    assert 1 <= first <= 3, first  # prefill, first decode, dynamic decode
    assert _dynamo_adapter.graph_break_count() == 0
    assert torch.equal(out, eager)
    with torch.no_grad():
        out2 = model.generate(prompt(11, seed=2), max_new_tokens=8, do_sample=False)
    assert stats["backend_calls"] - calls - first <= 1
    assert torch.equal(out2, eager2)
    assert quantize_pass.QUANT_CACHE.misses == misses  # "none" quantizes nothing


def test_quantized_weights_are_shared_by_prefill_and_decode_graphs():
    model = make_model("qwen2")
    misses, packs = quantize_pass.QUANT_CACHE.misses, cpu_kernels.PACK_CACHE.misses
    rec = Recorder(recipe="w4a16", strict=True)
    model.compile(backend=rec)
    with torch.no_grad():
        model.generate(prompt(), max_new_tokens=32, do_sample=False)
    assert 2 <= len(rec.graphs) <= 3 and _dynamo_adapter.graph_break_count() == 0
    assert quantize_pass.QUANT_CACHE.misses - misses == 15
    assert cpu_kernels.PACK_CACHE.misses - packs == 15
    packed = [{id(m) for n, m in gm.named_modules() if isinstance(m, cpu_kernels.PackedWeight)} for gm in rec.graphs]
    assert all(p == packed[0] for p in packed) and len(packed[0]) == 15


def test_bf16_model_runs_and_meets_floor():
    model = make_model("llama", dtype=torch.bfloat16)
    ids = prompt()
    rec = Recorder(recipe="w8a16", strict=True)
    with torch.no_grad():
        ref = model(ids).logits.float()
        out = torch.compile(model, backend=rec)(ids).logits
    assert out.dtype == torch.bfloat16
    assert rec.summaries[0]["kernel_counts"] == {"cpu": 15}
    assert sqnr_db(ref, out.float()) >= 25


@pytest.fixture
def no_triton_runtime(monkeypatch):
    """A machine without CUDA where TRITON_INTERPRET was not set."""
    from lowbit_compiler.backends import _triton_adapter

    monkeypatch.setattr(_triton_adapter, "interpreting", lambda: False)


def test_target_triton_falls_back_with_reason_and_counter(caplog, no_triton_runtime):
    model = make_model("llama")
    ids = prompt()
    before = lowbit_compiler.fallback_counter.copy()
    rec = Recorder(recipe="w8a16", target="triton")
    with torch.no_grad(), caplog.at_level("WARNING", logger="lowbit_compiler"):
        ref = torch.compile(make_model("llama"), backend=Recorder(recipe="w8a16", cpu_compute_dtype="activation"))(ids).logits
        out = torch.compile(model, backend=rec)(ids).logits
    summary = rec.summaries[0]
    assert summary["kernel_counts"] == {"reference": 15}
    (reason, n), = summary["fallbacks"].items()
    assert n == 15 and "needs a CUDA device" in reason and "TRITON_INTERPRET=1" in caplog.text
    assert lowbit_compiler.fallback_counter[reason] - before[reason] == 15
    assert "layer model.layers.0.self_attn.q_proj" in caplog.text
    assert sqnr_db(ref, out) > 60  # the reference path computes the same format


def test_dtype_without_packed_kernel_uses_reference_with_reason():
    model = make_model("llama", dtype=torch.float64)
    ids = prompt()
    rec = Recorder(recipe="w8a16")
    with torch.no_grad():
        ref = model(ids).logits
        out = torch.compile(model, backend=rec)(ids).logits
    summary = rec.summaries[0]
    assert summary["kernel_counts"] == {"reference": 15}
    assert summary["fallbacks"] == {"activation dtype torch.float64 has no packed CPU kernel (use "
                                    "float32/bfloat16/float16)": 15}
    assert out.dtype == torch.float64 and sqnr_db(ref, out) >= 30


def test_strict_mode_raises_on_fallback(no_triton_runtime):
    model = make_model("llama")
    compiled = torch.compile(model, backend="lowbit", options={"recipe": "w8a16", "target": "triton", "strict": True})
    with pytest.raises(Exception, match=r"\[strict\] layer model.layers.0.self_attn.q_proj .*needs a CUDA device"):
        compiled(prompt())


@pytest.mark.parametrize("options, message", [
    ({"recipe": "w5a16"}, r"unknown recipe 'w5a16'; presets: \["),
    ({"recipe": "w8a16", "targte": "cpu"}, r"unknown options \['targte'\]"),
    ({"recipe": "w8a16", "target": "gpu"}, r"target='gpu'; expected one of"),
    ({"recipe": "w8a16", "inner": "tvm"}, r"inner='tvm'; expected one of \('eager', 'inductor'\)"),
])
def test_bad_options_are_refused_with_the_fix(options, message):
    compiled = torch.compile(make_model("llama"), backend="lowbit", options=options)
    with pytest.raises(LowbitError, match=message):  # ours, not Dynamo's BackendCompilerFailed
        compiled(prompt())
    with pytest.raises(LowbitError, match=message):  # checked inside the call
        torch.compile(make_model("llama"), backend=lowbit_compiler.backend(**options))


def test_model_without_linears_compiles_and_says_nothing_was_quantized():
    class NoLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(8))

        def forward(self, x):
            return torch.relu(x * self.scale)

    rec = Recorder(recipe="w4a16", strict=True)
    x = torch.randn(3, 8)
    out = torch.compile(NoLinear(), backend=rec)(x)
    torch.testing.assert_close(out, torch.relu(x))
    quant = rec.summaries[0]["passes"][1]
    assert quant["name"] == "insert_weight_quant" and quant["matches"] == 0
    assert "nothing was quantized" in quant["details"]["note"]


def test_k_not_divisible_raises_naming_layer_or_pads():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(200, 64)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    model, x = Odd(), torch.randn(4, 200)
    with pytest.raises(Exception, match=r"layer proj: K=200 is not a multiple of group_size=128; "
                                        r".*pad_to_group"):
        torch.compile(model, backend="lowbit", options={"recipe": "w4a16"})(x)
    torch.compiler.reset()
    padded = lowbit_compiler.get_recipe("w4a16").replace(pad_to_group=True)
    rec = Recorder(recipe=padded, strict=True)
    out = torch.compile(model, backend=rec)(x)
    layer = rec.summaries[0]["layers"]["proj"]
    assert layer["padded_in_features"] == 256
    assert sqnr_db(model(x).detach(), out.detach()) >= 19


def test_replaced_or_edited_parameters_are_not_computed_with_stale_weights():
    model = make_model("llama")
    ids = prompt()
    compiled = torch.compile(model, backend="lowbit", options={"recipe": "w8a16"})
    with torch.no_grad():
        compiled(ids)
        rebuilds = stats["refreezes"] + stats["backend_calls"]
        # Dynamo does not guard on parameters: a swapped one arrives as an argument the frozen graph ignores
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.02)
        swapped = compiled(ids).logits
        assert sqnr_db(model(ids).logits, swapped) >= 25
        # an in-place edit bumps the version counter: the quantized copy is made again
        model.lm_head.weight.mul_(-1)  # stale weights would give negated logits
        edited = compiled(ids).logits
        assert sqnr_db(model(ids).logits, edited) >= 25
        compiled(ids)  # nothing changed: no further recompilation
    # each change rebuilt the graph once (by re-freezing, or by a Dynamo recompile), then no more
    assert stats["refreezes"] + stats["backend_calls"] - rebuilds == 2


@pytest.mark.slow  # Inductor compiles C++ on CPU: tens of seconds per graph
@pytest.mark.parametrize("target", ["cpu", "triton"])
def test_inner_inductor_runs_the_rest_of_the_graph(target):
    ids = prompt()
    eager = Recorder(recipe="w8a16", target=target)
    inductor = Recorder(recipe="w8a16", target=target, inner="inductor")
    with torch.no_grad():
        ref = torch.compile(make_model("llama"), backend=eager)(ids).logits
        out = torch.compile(make_model("llama"), backend=inductor)(ids).logits
    assert sqnr_db(ref, out) >= 60
    gm = inductor.graphs[0]
    lowbit_ops = {n.target for n in gm.graph.nodes if "lowbit" in str(n.target)}
    expected = torch.ops.lowbit.wo_linear.default if target == "cpu" else torch.ops.lowbit.generated.default
    assert lowbit_ops == {expected}  # the low-bit work stays ours; Inductor gets the rest


def test_dynamo_recompile_limit_is_reported_as_a_lowbit_fallback():
    """Past Dynamo's recompile limit a function runs eagerly, on the model's float weights; Dynamo
    only warns about recompiles, so the backend says it again as a fallback (counted)."""
    import copy

    from lowbit_compiler import zoo
    from lowbit_compiler.backends import lowbit_backend
    from lowbit_compiler.pass_base import fallback_counter

    model, inputs = zoo.build("llama")
    ids = inputs["input_ids"]
    before = fallback_counter[lowbit_backend.RECOMPILE_LIMIT_REASON]
    torch.compiler.reset()
    with torch._dynamo.config.patch(recompile_limit=1, automatic_dynamic_shapes=False), torch.no_grad():
        compiled = torch.compile(copy.deepcopy(model), backend="lowbit", options={"recipe": "w4a16", "progress": False})
        quantized = compiled(ids[:, :3]).logits
        eager = compiled(ids[:, :2]).logits  # a new shape, no dynamic shapes: past the limit of 1
        float_logits = model(ids[:, :2]).logits
    torch.compiler.reset()
    assert fallback_counter[lowbit_backend.RECOMPILE_LIMIT_REASON] == before + 1
    torch.testing.assert_close(eager, float_logits, atol=1e-5, rtol=1e-5)  # what the message warns of
    assert not torch.allclose(quantized[:, :2], float_logits, atol=1e-3)  # the compiled call was int4


def test_dynamo_recompile_limit_raises_in_strict_mode_and_ignores_other_backends():
    """strict=True: the call that hits the limit raises our error (naming the cause and the fix)
    instead of running on float weights; a function another backend compiled is not ours to report."""
    import copy

    from lowbit_compiler import zoo
    from lowbit_compiler.backends import lowbit_backend

    model, inputs = zoo.build("llama")
    ids = inputs["input_ids"]
    torch.compiler.reset()
    with torch._dynamo.config.patch(recompile_limit=1, automatic_dynamic_shapes=False), torch.no_grad():
        compiled = torch.compile(copy.deepcopy(model), backend="lowbit",
                                 options={"recipe": "w4a16", "progress": False, "strict": True})
        compiled(ids[:, :3])
        with pytest.raises(LowbitError, match=r"strict=True.*recompile_limit.*float weights.*Raise"):
            compiled(ids[:, :2])
        hits = lowbit_backend.stats["recompile_limit_hits"]
        other = torch.compile(lambda x: x * 2, backend="eager")
        other(torch.ones(3))
        other(torch.ones(4))  # past the limit under the eager backend: Dynamo's warning only
    torch.compiler.reset()
    assert lowbit_backend.stats["recompile_limit_hits"] == hits
