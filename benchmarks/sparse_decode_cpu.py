"""Activation-sparse decode on the CPU: the generated K-major GEMV (``backends/cpu_sparse.py``) at TEAL
sparsities against the dense generated kernel of the same weight format (``cpu_codegen``), and
against torch's packed kernel of that format with bf16 activations (what ``w8a16``/``w4a16`` run on
the CPU today).

Shapes: the linears of one block of a 0.49B Qwen2-style decoder (hidden 896, intermediate 4864, 2 KV
heads of 64: q 896x896, k/v 128x896, o 896x896, gate/up 4864x896, down 896x4864), batch 1. Per
format and sparsity, the block's seven GEMVs run in turn, each as dense, sparse and torch calls back
to back (interleaved), ``--repeats`` times; a step's time is the sum of the seven per-shape medians,
and the ratios of those sums are reported, with per-shape ratios. The input is a standard-normal row
thresholded to the target fraction of zeros (what ``lowbit::act_sparsify`` leaves). The machine may
be shared: ratios measured in the same process are what to compare; re-measure absolute times on an
idle machine.

    python benchmarks/sparse_decode_cpu.py [--repeats 31] [--json benchmarks/results/sparse_decode_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from lowbit_compiler.backends import cpu_codegen, cpu_kernels, cpu_sparse
from lowbit_compiler.formats import WeightFormat, quantize

SHAPES = {"q_proj": (896, 896), "k_proj": (128, 896), "v_proj": (128, 896), "o_proj": (896, 896),
          "gate_proj": (4864, 896), "up_proj": (4864, 896), "down_proj": (896, 4864)}


def _thresholded(k: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(1, k, generator=gen)
    if sparsity > 0:
        thr = torch.quantile(x.abs(), sparsity)
        x = torch.where(x.abs() >= thr, x, torch.zeros(()))
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--formats", default="int8,int4_g128_asym")
    parser.add_argument("--sparsities", default="0.25,0.4,0.5")
    parser.add_argument("--json", default="benchmarks/results/sparse_decode_cpu.json")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for fmt in args.formats.split(","):
        f = WeightFormat.parse(fmt)
        weights = {name: quantize(torch.randn(n, k, generator=gen), f) for name, (n, k) in SHAPES.items()}
        for name, (n, k) in SHAPES.items():  # build the kernels and the K-major copies before timing
            qw = weights[name]
            assert cpu_codegen.linear(torch.randn(1, k), qw.qweight, qw.scale, qw.zero, None, fmt, k) is not None
            assert cpu_sparse.linear(torch.randn(1, k), qw.qweight, qw.scale, qw.zero, None, fmt, k) is not None
        packed = {name: cpu_kernels.prepack(weights[name].qweight, weights[name].scale, weights[name].zero, fmt, k,
                                            torch.bfloat16) for name, (n, k) in SHAPES.items()}
        for sparsity in [float(s) for s in args.sparsities.split(",")]:
            xs = {name: _thresholded(k, sparsity, gen) for name, (n, k) in SHAPES.items()}
            dense_t, sparse_t, torch_t = {n: [] for n in SHAPES}, {n: [] for n in SHAPES}, {n: [] for n in SHAPES}
            for _ in range(args.repeats):
                for name, (n, k) in SHAPES.items():  # interleaved: dense, sparse, per shape
                    qw, x = weights[name], xs[name]
                    t0 = time.perf_counter()
                    cpu_codegen.linear(x, qw.qweight, qw.scale, qw.zero, None, fmt, k)
                    t1 = time.perf_counter()
                    cpu_sparse.linear(x, qw.qweight, qw.scale, qw.zero, None, fmt, k)
                    t2 = time.perf_counter()
                    cpu_kernels.packed_linear(x, packed[name], None, torch.bfloat16)
                    t3 = time.perf_counter()
                    dense_t[name].append(t1 - t0)
                    sparse_t[name].append(t2 - t1)
                    torch_t[name].append(t3 - t2)
            # a step is the sum of the per-shape medians (robust to another process taking the core mid-step)
            dense_step = sum(statistics.median(dense_t[n]) for n in SHAPES)
            sparse_step = sum(statistics.median(sparse_t[n]) for n in SHAPES)
            torch_step = sum(statistics.median(torch_t[n]) for n in SHAPES)
            per_shape = {n: round(statistics.median(dense_t[n]) / statistics.median(sparse_t[n]), 2) for n in SHAPES}
            rows.append({"format": fmt, "sparsity": sparsity, "dense_ms": round(dense_step * 1e3, 3),
                         "sparse_ms": round(sparse_step * 1e3, 3), "speedup": round(dense_step / sparse_step, 2),
                         "torch_packed_ms": round(torch_step * 1e3, 3),
                         "vs_torch_packed": round(torch_step / sparse_step, 2),
                         "per_shape_speedup": per_shape})
    print(f"threads={torch.get_num_threads()}  (interleaved medians; the machine may be shared)")
    print(f"{'format':<16}{'sparsity':>9}{'dense ms':>10}{'sparse ms':>11}{'speedup':>9}{'torch ms':>10}"
          f"{'vs torch':>10}  per shape (vs dense)")
    for r in rows:
        print(f"{r['format']:<16}{r['sparsity']:>9.2f}{r['dense_ms']:>10.3f}{r['sparse_ms']:>11.3f}"
              f"{r['speedup']:>8.2f}x{r['torch_packed_ms']:>10.3f}{r['vs_torch_packed']:>9.2f}x  "
              + " ".join(f"{k}={v}" for k, v in r["per_shape_speedup"].items()))
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump({"threads": torch.get_num_threads(), "repeats": args.repeats, "shapes": SHAPES, "rows": rows},
                  fh, indent=1)


if __name__ == "__main__":
    main()
