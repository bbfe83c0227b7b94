"""Nothing silent (issue "One pass system", point 7): eager ``lowbit::`` calls that take a slow or
reference path log once per (op, format, reason) and count every call in ``fallback_counter``;
every op (and the dequantise / quantize / rotation-planning paths behind them) creates its tensors
on its inputs' device.

There is no GPU here, so device-awareness is checked with "meta" inputs: the implementations run
on meta tensors, and a TorchFunctionMode records every tensor any torch function returns on the
CPU. A tensor created without ``device=`` inside an op would show up there (and as the output's
device); mixing it with a meta tensor would raise.
"""
from __future__ import annotations

import logging

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from lowbit_compiler import hadamard, ops, pass_base, rotation
from lowbit_compiler.formats import WeightFormat, dequantize, dequantize_parts, quantize

N, K = 64, 256
FALLBACK = "lowbit fallback: "


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    """Each test sees the first eager fallback of every (op, format, reason) again."""
    monkeypatch.setattr(ops, "_WARNED", set())


def _layer(fmt: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    x = torch.randn(3, 5, K, generator=g)
    b = torch.randn(N, generator=g) * 0.01
    return quantize(w, WeightFormat.parse(fmt)), x, b


def _wo(qw, x, b, fn=None):
    fn = fn or torch.ops.lowbit.wo_linear
    return fn(x, qw.qweight, qw.scale, qw.zero, b, qw.format.key, qw.in_features)


def _records(caplog, needle: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "lowbit_compiler" and r.levelno == logging.WARNING
            and needle in r.getMessage()]


def _key(reason: str) -> str:
    return reason.split(";")[0]


# -- 1. eager fallbacks: logged once, counted every call ------------------------------------------

@pytest.mark.parametrize("fmt, advice", [
    ("mxfp4", "backend='lowbit') runs a generated kernel"),  # e2m1 Triton templates (CUDA); int3/int2/NF4 decode
    # calls run generated CPU kernels (test_packed_kernel_calls_are_not_fallbacks)
    ("nvfp4", "backend='lowbit') runs a generated kernel"),
    ("fp8_e4m3", "backend='lowbit') runs a generated kernel"),  # a Triton template exists (CUDA)
])
def test_wo_linear_reference_path_logs_once_and_counts_every_call(caplog, fmt, advice):
    qw, x, b = _layer(fmt)
    reason = ops.wo_linear_fallback_reason(fmt, torch.float32, "cpu")
    assert reason.startswith(f"lowbit::wo_linear: format {fmt} has no packed CPU kernel")
    assert "dequantised to float32 on every call" in reason and advice in reason
    before = pass_base.fallback_counter[_key(reason)]
    with caplog.at_level(logging.WARNING, logger="lowbit_compiler"):
        outs = [_wo(qw, x, b) for _ in range(3)]
    (record,) = _records(caplog, f"lowbit::wo_linear: format {fmt}")
    assert record.getMessage().startswith(FALLBACK + reason)
    assert pass_base.fallback_counter[_key(reason)] - before == 3
    ref = _wo(qw, x, b, ops.wo_linear_reference)  # the numbers are the reference's, bit for bit
    assert all(torch.equal(o, ref) for o in outs)


def test_each_format_and_reason_is_logged_separately(caplog):
    with caplog.at_level(logging.WARNING, logger="lowbit_compiler"):
        for fmt in ("mxfp4", "nvfp4", "mxfp4", "nvfp4"):
            qw, x, b = _layer(fmt)
            _wo(qw, x, b)
        qw, x, b = _layer("int8")
        _wo(qw, x.double(), b.double())  # int8 has a packed kernel, float64 activations do not
        _wo(qw, x.double(), b.double())
    messages = [r.getMessage() for r in _records(caplog, "lowbit::wo_linear")]
    assert len(messages) == 3
    assert [m for m in messages if "float64 activations" in m] == [
        FALLBACK + ops.wo_linear_fallback_reason("int8", torch.float64, "cpu")
        + " (logged once; later calls are counted in lowbit_compiler.fallback_counter)"]
    assert "run the model in float32 or bfloat16" in messages[-1]


@pytest.mark.parametrize("fmt", ["int8", "int4_g128_sym", "int4_g64_asym", "int3_g128_asym", "int2_g64_sym", "nf4_g64"])
def test_packed_kernel_calls_are_not_fallbacks(caplog, fmt):
    """15 rows: int8/int4 run the packed or generated kernels, int3/int2 the lookup-table kernel,
    NF4 its generated kernel."""
    qw, x, b = _layer(fmt)
    before = pass_base.fallback_counter.copy()
    with caplog.at_level(logging.WARNING, logger="lowbit_compiler"):
        for dtype in (torch.float32, torch.bfloat16):
            _wo(qw, x.to(dtype), b.to(dtype))
    assert ops.wo_linear_fallback_reason(fmt, torch.float32, "cpu") is None
    assert _records(caplog, "lowbit") == [] and pass_base.fallback_counter == before


def test_float64_reference_computes_in_float64():
    """The reference dequantises to float32 (exact for int8 codes x bf16 scales) and multiplies in
    the activation's precision when that is float64."""
    qw, x, b = _layer("int8")
    out = _wo(qw, x.double(), b.double())
    exact = x.double() @ dequantize(qw).double().T + b.double()
    assert out.dtype == torch.float64
    assert float((out - exact).abs().max() / exact.abs().max()) <= 1e-13


def test_qa_linear_emulations_log_once_and_integer_matmul_does_not(caplog):
    cases = {("int4_g128_sym", "int8"): "one integer matmul per group of 128",
             ("int4_g128_sym", "int4"): "one integer matmul per group of 128",
             ("fp8_e4m3", "fp8_e4m3"): "emulated in float32"}
    with caplog.at_level(logging.WARNING, logger="lowbit_compiler"):
        for (fmt, act), what in cases.items():
            qw, x, b = _layer(fmt)
            reason = ops.qa_linear_slow_reason(fmt, act)
            assert what in reason and "generated kernel" in reason
            before = pass_base.fallback_counter[_key(reason)]
            args = (qw.qweight, qw.scale, qw.zero, b, fmt, qw.in_features, act)
            outs = [torch.ops.lowbit.qa_linear(x, *args) for _ in range(2)]
            assert pass_base.fallback_counter[_key(reason)] - before == 2
            assert torch.equal(outs[0], outs[1])
            ref = ops.qa_linear_reference(x, *args)
            assert float((outs[0] - ref).abs().max() / ref.abs().max()) <= 1e-5
        qw, x, b = _layer("int8")  # W8A8: one torch._int_mm, a real kernel
        assert ops.qa_linear_slow_reason("int8", "int8") is None
        torch.ops.lowbit.qa_linear(x, qw.qweight, qw.scale, qw.zero, b, "int8", qw.in_features, "int8")
    messages = [r.getMessage() for r in _records(caplog, "lowbit::qa_linear")]
    assert len(messages) == 3 and not any("format int8 " in m for m in messages)


# -- 2. device-awareness, on meta inputs -----------------------------------------------------

class _CpuTensors(TorchFunctionMode):
    """Records the torch functions that return a tensor on the CPU."""

    def __init__(self):
        super().__init__()
        self.made: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in pytree.tree_leaves(out)):
            self.made.append(getattr(func, "__qualname__", getattr(func, "__name__", repr(func))))
        return out


def _on_meta(fn, *args):
    """Run ``fn`` on meta copies of ``args``; once to warm caches built from host constants (the
    Hadamard factors), then watched. Returns the output."""
    meta = pytree.tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, args)
    fn(*meta)
    with _CpuTensors() as watch:
        out = fn(*meta)
    assert watch.made == [], f"{getattr(fn, '__name__', fn)} created tensors on the CPU: {watch.made}"
    for t in pytree.tree_leaves(out):
        if isinstance(t, torch.Tensor):
            assert t.device.type == "meta"
    return out


FORMATS = ["int8", "int4_g128_asym", "int4_g64_sym", "int3_g128_asym", "int2_g64_sym", "nf4_g64", "fp8_e4m3",
           "mxfp4", "nvfp4"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_and_wo_linear_stay_on_the_inputs_device(caplog, fmt):
    qw, x, b = _layer(fmt)
    _on_meta(lambda *t: dequantize_parts(qw.format, *t), qw.qweight, qw.scale, qw.zero)
    with caplog.at_level(logging.WARNING, logger="lowbit_compiler"):
        _on_meta(lambda *t: ops.wo_linear_eager(*t, fmt, qw.in_features), x, qw.qweight, qw.scale, qw.zero, b)
    (record,) = _records(caplog, f"format {fmt} on a meta device: the eager op has packed kernels for the CPU only")


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_stays_on_the_weights_device(fmt):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(1)) * 0.02
    q = _on_meta(lambda t: quantize(t, WeightFormat.parse(fmt)), w)
    cpu = quantize(w, WeightFormat.parse(fmt))
    for got, want in zip((q.qweight, q.scale, q.zero), (cpu.qweight, cpu.scale, cpu.zero)):
        assert (got is None) == (want is None)
        if got is not None:
            assert got.shape == want.shape and got.dtype == want.dtype


@pytest.mark.parametrize("fmt, act", [("int8", "int8"), ("int4_g128_sym", "int8"), ("int4_g64_asym", "int4"),
                                      ("fp8_e4m3", "fp8_e4m3")])
def test_qa_linear_stays_on_the_inputs_device(fmt, act):
    qw, x, b = _layer(fmt)
    x = x.reshape(-1, K)
    out = _on_meta(lambda *t: ops.qa_linear_eager(*t, fmt, qw.in_features, act), x, qw.qweight, qw.scale, qw.zero, b)
    assert out.shape == (15, N)
    static = torch.tensor([0.05])
    _on_meta(lambda x_, q_, s_, z_, b_, st_: ops.qa_linear_eager(x_, q_, s_, z_, b_, fmt, qw.in_features, act, st_),
             x, qw.qweight, qw.scale, qw.zero, b, static)


def test_sparse_hadamard_and_kron_stay_on_the_inputs_device():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, K, generator=g, dtype=torch.float64)
    rows, cols = torch.tensor([0, 5, 63], dtype=torch.int32), torch.tensor([1, 200, 255], dtype=torch.int32)
    values = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float16)
    out = _on_meta(lambda *t: ops.sparse_linear_eager(*t, N), x, rows, cols, values)
    assert out.shape == (2, 3, N) and out.dtype == torch.float64
    dense = torch.zeros(N, K, dtype=torch.float64)
    dense[rows.long(), cols.long()] = values.double()
    assert torch.allclose(ops.sparse_linear_eager(x, rows, cols, values, N), x @ dense.T, rtol=0, atol=1e-12)
    for n in (K, 12 * 8, 172):  # Sylvester only, Paley x Sylvester, Goethals-Seidel
        y = torch.randn(4, n, generator=g)
        _on_meta(hadamard.transform, y)
        _on_meta(lambda t: hadamard.transform(t, transpose=True), y)
        _on_meta(ops.hadamard_reference, y)
    left, right = torch.randn(16, 16, generator=g), torch.randn(16, 16, generator=g)
    _on_meta(ops.kron_transform_eager, x, left, right)


def test_plan_weights_stays_on_the_parameters_device():
    """The rotation's planning (R1, R2, R4 with signs, created biases) on meta parameters."""
    from lowbit_compiler import ir
    from lowbit_compiler.recipe import Recipe
    from tests.conftest import make_model, prompt
    from tests.helpers import Recorder

    rec = Recorder(recipe=Recipe("canonical", ("canonicalize",)), target="cpu")
    with torch.no_grad():
        torch.compile(make_model("opt"), backend=rec)(prompt())  # LayerNorm biases: created + centred
    gm = rec.graphs[0]
    a = rotation.analyse(gm)
    assert a.stream_ok and a.heads
    sites = a.down_projections()
    signs = rotation.r4_signs(sites, 0)
    r1 = rotation.orthogonal(a.hidden, "hadamard", 0)
    r2 = rotation.orthogonal(a.heads[0].head_dim, "hadamard", 1)
    plan = _on_meta(lambda *_: rotation.plan_weights(a, lambda fqn: ir.fetch_attr(gm, fqn).to("meta"), r1, r2, sites,
                                                     signs=signs).tensors)
    cpu = rotation.plan_weights(a, lambda fqn: ir.fetch_attr(gm, fqn), r1, r2, sites, signs=signs).tensors
    assert plan.keys() == cpu.keys() and all(plan[k].shape == cpu[k].shape for k in cpu)
