"""Generated kernels against their unfused torch equivalent on a CUDA GPU.

For the fusion groups of one Llama-2-7B decoder layer (hidden 4096, intermediate 11008), at
decode (M=1), small-batch (M=16) and prefill (M=512) row counts, and for each weight format:

* ``fused``: the generated kernel (norm prologue, low-bit matmul, epilogue in one launch);
* ``torch``: the same computation unfused in the model's dtype with dense fp16 weights --
  ``F.rms_norm``, ``F.linear``, ``F.silu``, ``*``, ``+`` as separate launches (what runs without
  this project);
* the int4 kernels a GPU user would pick instead, for int4 formats, timed on the group's matmuls
  only (their norm and epilogue ops would be extra launches): torchao's int4 weight-only kernel
  (``Int4WeightOnlyConfig``, tinygemm, bf16) and Marlin (IST-DASLab's ``marlin`` package, fp16,
  symmetric int4, one group size). Each is imported when installed and reported as absent (with
  the pip command) when not: ``pip install -e '.[bench]'`` / ``pip install marlin``.

Timed with ``triton.testing.do_bench`` (median). Reported per case: microseconds for both, the
speedup, the bytes the kernel moves (the analytic model, which tests check against the
interpreter's counts), and the achieved bandwidth as a fraction of the device's (measured with a
large device-to-device copy in the same run; the nominal figure is printed when the device is
known).

    python benchmarks/kernels_gpu.py [--formats int4_g128_asym int8] [--rows 1 16 512]
                                     [--json benchmarks/results/kernels_gpu.json] [--no-rotations]

A second table times ``hadamard_kernel.rotate_quantize`` (QuaRot's R4 before down_proj, FlatQuant's
learned factors) against the unfused torch ops it replaces (``lowbit::hadamard`` or
``lowbit::kron_transform``, then per-row absmax / divide / round), per variant: fp16, bf16 and
fp32 rows (the Hadamard), learned factors (fp16 rows), at Llama sizes 4096, 11008 and 14336.

Without a CUDA device (or under TRITON_INTERPRET=1) it prints why and times nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F

HIDDEN, INTER = 4096, 11008
NOMINAL_BANDWIDTH = {"H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12, "L4": 0.3e12, "4090": 1.008e12}


@dataclasses.dataclass(frozen=True)
class Case:
    """One fusion group of a Llama layer: which ops it fuses and its matmul shape."""

    label: str
    n: int
    k: int
    prologue: str | None
    epilogue: str  # "none" | "residual" | "gated"


LAYER = [
    Case("q+k+v side by side (+rms_norm)", 3 * HIDDEN, HIDDEN, "rms", "qkv"),
    Case("o_proj (+residual)", HIDDEN, HIDDEN, None, "residual"),
    Case("gate+up (+rms_norm, silu, mul)", INTER, HIDDEN, "rms", "gated"),
    Case("down_proj (+residual)", HIDDEN, INTER, None, "residual"),
]


def spec_for(case: Case, fmt: str, rows: int, dtype: str = "float16"):
    from lowbit_compiler.backends import codegen
    from lowbit_compiler.formats import WeightFormat

    extra: dict[str, Any] = {}
    if case.prologue:
        extra.update(prologue=case.prologue, norm_weight=True)
    if case.epilogue == "residual":
        extra.update(steps=(("add", ("acc0", "e0")),), externals=("full",))
    elif case.epilogue == "gated":
        extra.update(n_weights=2, steps=(("silu", ("acc0",)), ("mul", ("t0", "acc1"))))
    elif case.epilogue == "qkv":
        extra.update(parts=3)
    # n and k: the decode class's split-K count for this shape, as lowering chooses it
    tiling = codegen.choose_variant(WeightFormat.parse(fmt), rows, on_gpu=True, x_dtype=dtype, n=case.n, k=case.k)
    return codegen.KernelSpec(fmt=fmt, **tiling, x_dtype=dtype, out_dtype=dtype, **extra)


def bytes_moved(spec, case: Case, rows: int) -> dict[str, int]:
    from lowbit_compiler.backends import codegen

    size = torch.empty((), dtype=codegen.DTYPES[spec.x_dtype]).element_size()
    itemsize = {"x": size, "out": size, "norm_w": size, "e0": size}
    return codegen.traffic(spec, part_ns(spec, case), case.k, itemsize).at(rows)


def part_ns(spec, case: Case):
    """N, or each side-by-side weight's N (q, k, v: equal thirds)."""
    return (case.n // spec.parts,) * spec.parts if spec.parts > 1 else case.n


def unfused(spec, args: list[Any]):
    """The torch equivalent with dense fp16 weights, op by op."""
    from lowbit_compiler.backends import codegen
    from lowbit_compiler.formats import dequantize_parts

    named = dict(zip(codegen.launcher_params(spec), args))
    dtype = codegen.DTYPES[spec.x_dtype]
    dense = [dequantize_parts(spec.format, named[f"qw{i}"], named[f"scale{i}"], named.get(f"zero{i}"))
             [:, : named["x"].shape[-1]].to(dtype) for i in range(spec.weight_sets)]

    def run():
        h = named["x"]
        if spec.prologue:
            h = F.rms_norm(h, [h.shape[-1]], named["norm_w"], named["eps"])
        if spec.parts > 1:
            return torch.cat([F.linear(h, d) for d in dense], dim=-1)
        y = F.linear(h, dense[0])
        if spec.n_weights == 2:
            y = F.silu(y) * F.linear(h, dense[1])
        if spec.externals:
            y = y + named["e0"]
        return y

    return run


def peers(spec, args: list[Any]) -> dict[str, Any]:
    """The int4 kernels a GPU user would pick, on this group's matmuls: name -> a callable, or the
    reason it is absent (not int4, not installed, or a format it cannot hold)."""
    from lowbit_compiler.backends import codegen
    from lowbit_compiler.formats import dequantize_parts

    fmt = spec.format
    if not (fmt.kind == "int" and fmt.bits == 4):
        return {"torchao int4": "not an int4 format", "marlin": "not an int4 format"}
    named = dict(zip(codegen.launcher_params(spec), args))
    k = named["x"].shape[-1]
    dense = [dequantize_parts(fmt, named[f"qw{i}"], named[f"scale{i}"], named.get(f"zero{i}"))[:, :k]
             for i in range(spec.weight_sets)]
    out: dict[str, Any] = {}
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
    except ImportError:
        out["torchao int4"] = "torchao is not installed (pip install -e '.[bench]')"
    else:
        layers = []
        for w in dense:
            lin = torch.nn.Linear(k, w.shape[0], bias=False, device=w.device, dtype=torch.bfloat16)
            lin.weight.data.copy_(w)
            quantize_(lin, Int4WeightOnlyConfig(group_size=fmt.group_size))
            layers.append(lin)
        x = named["x"].to(torch.bfloat16)
        out["torchao int4"] = lambda: [lin(x) for lin in layers]
    try:
        import marlin
    except ImportError:
        out["marlin"] = "marlin is not installed (pip install marlin; IST-DASLab, needs sm_80+)"
    else:
        if fmt.group_size not in (128,) or not fmt.symmetric:
            out["marlin"] = f"Marlin takes symmetric int4 with groups of 128 (or per channel); this is {fmt.key}"
        else:
            layers = []
            for w in dense:
                ref = torch.nn.Linear(k, w.shape[0], bias=False, device=w.device, dtype=torch.float16)
                ref.weight.data.copy_(w)
                layer = marlin.Layer(k, w.shape[0], groupsize=fmt.group_size).to(w.device)
                scales = w.view(w.shape[0], -1, fmt.group_size).abs().amax(-1).T.half() / 7
                layer.pack(ref.cpu(), scales.cpu())
                layers.append(layer.to(w.device))
            x = named["x"].to(torch.float16)
            out["marlin"] = lambda: [layer(x) for layer in layers]
    return out


ROTATION_SIZES = (HIDDEN, INTER, 14336)
ROTATION_VARIANTS = ("hadamard fp16", "hadamard bf16", "hadamard fp32", "learned fp16")


def rotation_inputs(variant: str, n: int, rows: int, device: str = "cuda"):
    """(x, transform or None) for one rotate-and-quantize case; None when the kernel refuses it."""
    from lowbit_compiler.backends import hadamard_kernel
    from lowbit_compiler.learned_rotation import kron_split

    kind, dt = variant.split()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dt]
    g = torch.Generator().manual_seed(n + rows)
    x = torch.randn(rows, n, generator=g).to(dtype).to(device)
    if kind == "hadamard":
        return None if hadamard_kernel.unsupported_reason(n, dtype, device if device == "cuda" else None) else (x, None)
    a, b = kron_split(n)
    if hadamard_kernel.kron_unsupported_reason(a, b, n, device if device == "cuda" else None):
        return None
    left = (torch.eye(a) + 0.1 * torch.randn(a, a, generator=g)).to(device)
    right = (torch.eye(b) + 0.1 * torch.randn(b, b, generator=g)).to(device)
    return x, (left, right)


def rotation_unfused(x: torch.Tensor, act: str, transform):
    """What runs without the fused kernel: the transform op, then per-row quantization in torch."""
    from lowbit_compiler.ops import ACTIVATION_MAX

    z = (torch.ops.lowbit.hadamard(x) if transform is None else torch.ops.lowbit.kron_transform(x, *transform)).float()
    s = (z.abs().amax(-1, keepdim=True) / ACTIVATION_MAX[act]).clamp_min(1e-30)
    q = torch.round(z / s).clamp(-ACTIVATION_MAX[act], ACTIVATION_MAX[act]).to(torch.int8)
    return q, s


def rotation_rows(row_counts, peak: float) -> list[dict[str, Any]]:
    from triton.testing import do_bench

    from lowbit_compiler.backends import hadamard_kernel

    out = []
    for variant in ROTATION_VARIANTS:
        for n in ROTATION_SIZES:
            for rows in row_counts:
                case = rotation_inputs(variant, n, rows)
                if case is None:
                    continue
                x, transform = case
                fused_ms = do_bench(lambda: hadamard_kernel.rotate_quantize(x, "int4", transform))
                torch_ms = do_bench(lambda: rotation_unfused(x, "int4", transform))
                moved = x.numel() * x.element_size() + x.numel() + rows * 4  # row in, codes + scale out
                out.append({"variant": variant, "n": n, "M": rows, "fused_us": fused_ms * 1e3,
                            "torch_us": torch_ms * 1e3, "bytes": moved,
                            "fraction_of_peak": moved / (fused_ms * 1e-3) / peak})
    return out


def rotation_table(rows: list[dict[str, Any]]) -> str:
    lines = [["rotate_quantize", "n", "M", "fused us", "torch us", "speedup", "MB moved", "of copy bw"]]
    lines += [[r["variant"], str(r["n"]), str(r["M"]), f"{r['fused_us']:.1f}", f"{r['torch_us']:.1f}",
               f"{r['torch_us'] / r['fused_us']:.2f}x", f"{r['bytes'] / 1e6:.2f}", f"{r['fraction_of_peak']:.0%}"]
              for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in lines)


def device_bandwidth() -> float:
    from triton.testing import do_bench

    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x))
    return 2 * x.numel() / (ms * 1e-3)


def table(rows: list[dict[str, Any]]) -> str:
    header = ["format", "group", "M", "fused us", "torch us", "speedup", "torchao int4 us", "marlin us",
              "MB moved", "GB/s", "of copy bw"]

    def peer(r, name):
        return f"{r[name]:.1f}" if isinstance(r.get(name), float) else "-"

    lines = [header] + [[r["format"], r["group"], str(r["M"]), f"{r['fused_us']:.1f}", f"{r['torch_us']:.1f}",
                         f"{r['torch_us'] / r['fused_us']:.2f}x", peer(r, "torchao int4_us"), peer(r, "marlin_us"),
                         f"{r['bytes'] / 1e6:.2f}",
                         f"{r['bytes'] / r['fused_us'] / 1e3:.0f}", f"{r['fraction_of_peak']:.0%}"] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in lines)


def unavailable_reason() -> str | None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 is set: interpreted kernels cannot be timed meaningfully"
    if not torch.cuda.is_available():
        return "no CUDA device on this machine"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", nargs="+", default=["int4_g128_asym", "int8"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 16, 512])
    parser.add_argument("--json", default="benchmarks/results/kernels_gpu.json")
    parser.add_argument("--no-rotations", action="store_true", help="skip the rotate_quantize table")
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason is not None:
        print(f"kernels_gpu: {reason}; nothing timed (run this on a machine with a CUDA GPU)")
        return 0

    from triton.testing import do_bench

    from lowbit_compiler.backends import codegen, kernel_cache

    peak = device_bandwidth()
    absent: dict[str, str] = {}
    name = torch.cuda.get_device_name()
    nominal = next((bw for key, bw in NOMINAL_BANDWIDTH.items() if key in name), None)
    results = []
    for fmt in args.formats:
        for case in LAYER:
            for rows in args.rows:
                spec = spec_for(case, fmt, rows)
                kernel = kernel_cache.get_kernel(spec, interpret=False)
                inputs = codegen.make_inputs(spec, rows, part_ns(spec, case), case.k, device="cuda")
                fused_ms = do_bench(lambda: kernel.launch(*inputs))
                torch_ms = do_bench(unfused(spec, inputs))
                moved = bytes_moved(spec, case, rows)
                total = moved["read"] + moved["written"]  # the cost model's DRAM bytes (each tensor once)
                record = {"format": fmt, "group": case.label, "M": rows, "kernel": spec.name,
                          "fused_us": fused_ms * 1e3, "torch_us": torch_ms * 1e3, "bytes": total,
                          "fraction_of_peak": total / (fused_ms * 1e-3) / peak}
                for peer_name, run in peers(spec, inputs).items():
                    if callable(run):
                        record[f"{peer_name}_us"] = do_bench(run) * 1e3
                    else:
                        absent.setdefault(peer_name, run)
                results.append(record)
    print(f"device: {name}; copy bandwidth {peak / 1e12:.2f} TB/s"
          + (f" (nominal {nominal / 1e12:.2f} TB/s)" if nominal else ""))
    for peer_name, why in absent.items():
        print(f"peer {peer_name}: {why}")
    print(table(results))
    rotations = [] if args.no_rotations else rotation_rows(args.rows, peak)
    if rotations:
        print(rotation_table(rotations))
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"device": name, "copy_bandwidth": peak, "nominal_bandwidth": nominal, "results": results,
                   "rotations": rotations, "absent_peers": absent}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
