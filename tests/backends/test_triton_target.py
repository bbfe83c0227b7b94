"""target="triton" end to end on tiny Hugging Face models (generated kernels under the interpreter)."""
from __future__ import annotations

import re

import pytest
import torch

from lowbit_compiler.backends import codegen, kernel_cache
from lowbit_compiler.cli import main as cli_main
from lowbit_compiler.formats import sqnr_db
from tests.conftest import make_model, prompt
from tests.helpers import Recorder


@pytest.mark.parametrize("arch, recipe", [("llama", "w4a16"), ("qwen2", "w8a16"), ("gpt2", "w4a16"),
                                          ("bert", "w8a16")])
@pytest.mark.heavy
def test_triton_target_matches_cpu_target(arch, recipe):
    ids = prompt()
    cpu = Recorder(recipe=recipe, target="cpu", cpu_compute_dtype="activation")  # fp32 activations on both
    gpu = Recorder(recipe=recipe, target="triton", strict=True)
    with torch.no_grad():
        ref = torch.compile(make_model(arch), backend=cpu)(ids)[0]
        out = torch.compile(make_model(arch), backend=gpu)(ids)[0]
    assert sqnr_db(ref, out) >= 40
    counts = gpu.summaries[0]["kernel_counts"]
    assert set(counts) == {"triton"} and counts["triton"] <= cpu.summaries[0]["kernel_counts"]["cpu"]


@pytest.mark.slow  # 11-30 s: the default suite's 10-minute budget (make test-slow runs it)
def test_generate_uses_gemv_kernels_for_decode_and_matches_cpu_tokens():
    ids = prompt(20)  # more rows than the decode class takes (16)
    cpu = Recorder(recipe="w4a16", cpu_compute_dtype="activation")
    gpu = Recorder(recipe="w4a16", target="triton", strict=True)
    a, b = make_model("llama"), make_model("llama")
    with torch.no_grad():
        a.compile(backend=cpu)
        b.compile(backend=gpu)
        ref = a.generate(ids, max_new_tokens=3, do_sample=False)
        out = b.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.tolist() == ref.tolist()
    prefill, *decode = [{r["layer"]: r["variant"] for r in s["generated_kernels"]} for s in gpu.summaries]
    # prefill: 20 rows per layer (gemm), but generate() keeps only the last row for the head (gemv)
    assert prefill.pop("lm_head") == "gemv" and set(prefill.values()) == {"gemm"}
    assert decode and all(set(d.values()) == {"gemv"} for d in decode)


@pytest.mark.heavy
def test_bf16_model_on_triton_target():
    ids = prompt()
    ref_model, model = make_model("llama", dtype=torch.bfloat16), make_model("llama", dtype=torch.bfloat16)
    cpu = Recorder(recipe="w8a16")
    gpu = Recorder(recipe="w8a16", target="triton", strict=True)
    with torch.no_grad():
        ref = torch.compile(ref_model, backend=cpu)(ids).logits
        out = torch.compile(model, backend=gpu)(ids).logits
    assert out.dtype == torch.bfloat16 and sqnr_db(ref.float(), out.float()) >= 25


@pytest.mark.heavy
def test_dump_keeps_kernels_resources_and_inspect_prints_the_cost_model(tmp_path, capsys):
    rec = Recorder(recipe="w4a16", target="triton", dump_dir=str(tmp_path))
    with torch.no_grad():
        torch.compile(make_model("llama"), backend=rec)(prompt())
    summary = rec.summaries[0]
    graph_dir = tmp_path / summary["graph"]
    files = sorted(p.name for p in (graph_dir / "kernels").iterdir())
    names = sorted({r["kernel"] for r in summary["generated_kernels"]})
    assert files == [n + ".py" for n in names]
    for name in names:  # the dumped file is the cached, loaded source
        spec_source = (graph_dir / "kernels" / f"{name}.py").read_text()
        assert spec_source == (kernel_cache.cache_dir() / f"{name}.py").read_text()
    for r in summary["generated_kernels"]:
        assert r["gpu"]["arch"] == "sm_90" and r["gpu"]["registers"] > 0
        b = r["bytes_per_call"]
        assert b["min_read"] <= b["read"] and b["written"] >= b["min_written"] > 0
        assert r["grid"][0] == "1"  # 9 rows fit one 16-row tile
    lowered = (graph_dir / sorted(p.name for p in graph_dir.iterdir() if p.name.endswith("_lowered.py"))[0]).read_text()
    assert "gemv_int4_g128_asym_x2_rms_norm_silu_mul_" in lowered
    assert cli_main(["inspect", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "kernels/token" in text and "bytes/token" in text and "H100" in text and "3.35 TB/s" in text
    assert re.search(r"^model\.layers\.0 +4 +13$", text, re.M)


def test_symbolic_row_count_gets_the_prefill_tiling():
    """Dynamic shapes: one generated kernel per spec serves every prompt length."""
    model = make_model("llama")
    rec = Recorder(recipe="w8a16", target="triton", strict=True)
    compiled = torch.compile(model, backend=rec, dynamic=True)
    with torch.no_grad():
        for length in (5, 11):
            ids = prompt(length)
            ref = model(ids).logits
            assert sqnr_db(ref, compiled(ids).logits) > 30
    summary = rec.summaries[-1]
    assert {r["M"] for r in summary["generated_kernels"]} == {str(codegen.M)}
    assert all(r["variant"] == "gemm" and r["grid"][0] == "ceiling(M/64)" for r in summary["generated_kernels"])
    assert len(rec.summaries) == 1  # no recompile for the second length


@pytest.mark.heavy
def test_a_compressed_model_lowers_onto_generated_kernels():
    from lowbit_compiler import compress

    model = compress(make_model("llama"), "w4a16")
    ids = prompt()
    # the recipe's canonicalize pass is what turns the written-out RMSNorm into a fusable norm;
    # insert_weight_quant finds nothing left to quantize
    rec = Recorder(recipe="w4a16", target="triton", strict=True)
    with torch.no_grad():
        ref = model(ids).logits  # eager: the op's CPU kernel (bf16 compute)
        out = torch.compile(model, backend=rec)(ids).logits
    assert sqnr_db(ref, out) >= 40
    assert rec.summaries[0]["codegen"]["blocks"]["model.layers.0"] == {"kernels": 4, "ops_replaced": 13}


def test_formats_without_a_template_fall_back_with_the_reason():
    from lowbit_compiler.formats import WeightFormat
    from lowbit_compiler.recipe import Recipe

    # 4:8-sparse int8 (magnitude-pruned by the quantizer): the Triton sparse kernels take 2:4 only
    # (2:4 itself: tests/backends/test_sparse24_triton.py)
    rec = Recorder(recipe=Recipe("s48-int8", ("canonicalize", "insert_weight_quant"), WeightFormat.parse("s48+int8")),
                   target="triton")
    with torch.no_grad():
        torch.compile(make_model("llama"), backend=rec)(prompt())
    summary = rec.summaries[0]
    assert summary["kernel_counts"] == {"reference": 15} and summary["generated_kernels"] == []
    assert list(summary["fallbacks"]) == ["format s48+int8: the Triton sparse kernels take 2:4 with int8 or int4 kept values"]


@pytest.mark.parametrize("recipe", ["nf4", pytest.param("mxfp4", marks=pytest.mark.slow),
                                    pytest.param("w3a16", marks=pytest.mark.slow),
                                    pytest.param("nvfp4", marks=pytest.mark.slow)])
@pytest.mark.heavy
def test_lookup_and_3_bit_formats_run_as_generated_kernels(recipe):
    """NF4 (table in registers), int3 (8 codes in 3 bytes) and MXFP4/NVFP4 (e2m1 codes, block scales)
    have templates now: every linear is a generated kernel, none dequantises its whole weight per call."""
    ids = prompt()
    cpu = Recorder(recipe=recipe, target="cpu", cpu_compute_dtype="activation")
    gpu = Recorder(recipe=recipe, target="triton", strict=True)
    with torch.no_grad():
        ref = torch.compile(make_model("llama"), backend=cpu)(ids).logits
        out = torch.compile(make_model("llama"), backend=gpu)(ids).logits
    assert sqnr_db(ref, out) >= 40
    summary = gpu.summaries[0]
    assert set(summary["kernel_counts"]) == {"triton"} and summary["fallbacks"] == {}


@pytest.mark.parametrize("recipe, arch", [("w8a8", "llama"), ("w4a8", "qwen2"), ("fp8", "llama"),
                                          ("w8a8", "gpt2"), ("w4a8", "bert"), ("w4a4-rot", "llama")])
@pytest.mark.heavy
def test_quantized_activation_linears_run_as_generated_kernels(recipe, arch):
    """W8A8 / W4A8 / FP8: the kernel quantizes the (normalised) activations per token in its
    prologue and multiplies integer (or fp8) codes; it matches the op's CPU implementation
    (torch._int_mm), which quantizes the same fp32 values."""
    ids = prompt()
    cpu = Recorder(recipe=recipe, target="cpu")
    gpu = Recorder(recipe=recipe, target="triton", strict=True)
    with torch.no_grad():
        ref = torch.compile(make_model(arch), backend=cpu)(ids)[0]
        out = torch.compile(make_model(arch), backend=gpu)(ids)[0]
    # a fused norm rounds differently from F.rms_norm, which moves the odd code by one step
    assert sqnr_db(ref, out) >= 35
    summary = gpu.summaries[0]
    assert set(summary["kernel_counts"]) == {"triton"} and summary["fallbacks"] == {}
    records = summary["generated_kernels"]
    act = {"fp8": "quantize_fp8_e4m3", "w4a4-rot": "quantize_int4"}.get(recipe, "quantize_int8")
    # w4a4-rot: down_proj's input comes quantized from the rotate-and-quantize kernel (R4's Hadamard)
    prequantized = [r for r in records if recipe == "w4a4-rot" and r["layer"].endswith("down_proj")]
    assert records and all(act in r["fused_ops"] and "qa_linear" in r["fused_ops"]
                           for r in records if r not in prequantized)
    assert all(act not in r["fused_ops"] and "qa_linear" in r["fused_ops"] for r in prequantized)
    assert len(prequantized) == (2 if recipe == "w4a4-rot" else 0)
    if arch == "llama":  # the same grouping as weight-only: norm prologues, gate.up, residual adds
        assert summary["codegen"]["blocks"]["model.layers.0"] == {"kernels": 4, "ops_replaced": 13}


@pytest.mark.heavy
def test_static_activation_scales_run_as_generated_kernels():
    from lowbit_compiler import compress
    from lowbit_compiler.recipe import get_recipe

    recipe = get_recipe("w8a8-static")
    calibration = [torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    model = compress(make_model("llama"), recipe, calibration=calibration, progress=False)
    ids = prompt()
    rec = Recorder(recipe=recipe, target="triton", strict=True)
    with torch.no_grad():
        ref = model(ids).logits  # eager: the op's CPU implementation with the same static scales
        out = torch.compile(model, backend=rec)(ids).logits
    assert sqnr_db(ref, out) >= 35
    summary = rec.summaries[0]
    assert set(summary["kernel_counts"]) == {"triton"}
    assert all("qa_linear" in r["fused_ops"] for r in summary["generated_kernels"])



@pytest.mark.slow
def test_spqr_outliers_are_read_inside_the_generated_kernels():
    """w4a16-spqr: every linear is int3 + SpQR's fp16 outliers (lowbit::sparse_linear beside it). The
    outliers become a sparse side-read in the linear's kernel: no sparse_linear op stays in the
    graph, the norms still fuse into q/k/v and gate.up, and the logits match the CPU target
    (where the op runs its torch implementation)."""
    ids = prompt(20)  # > 16 rows: the CPU target runs the float reference for int3 (no lookup-table rounding)
    cpu = Recorder(recipe="w4a16-spqr", target="cpu", cpu_compute_dtype="activation")
    gpu = Recorder(recipe="w4a16-spqr", target="triton", strict=True)
    with torch.no_grad():
        ref = torch.compile(make_model("llama"), backend=cpu)(ids).logits
        out = torch.compile(make_model("llama"), backend=gpu)(ids).logits
    assert sqnr_db(ref, out) >= 40
    summary = gpu.summaries[0]
    assert set(summary["kernel_counts"]) == {"triton"} and summary["fallbacks"] == {}
    records = summary["generated_kernels"]
    assert sum("spqr_outliers" in r["fused_ops"] for r in records) == 15  # every linear's outliers
    # q, k, v, o, gate (+ SiLU.mul), up, down: a weight with outliers is not paired as gate.up's sibling
    # (one kernel more than without outliers); the RMSNorms still fuse into q/k/v, gate and up
    assert summary["codegen"]["blocks"]["model.layers.0"]["kernels"] == 7
    assert sum("rms_norm" in r["fused_ops"] for r in records) == 2 * 5
    assert not any("sparse_linear" in str(n.target) for g in gpu.graphs for n in g.graph.nodes)
    for r in records:  # the side-read's bytes are counted: CSR pointers + (column, value) per outlier
        assert int(r["bytes_per_call"]["min_read"]) > 0
