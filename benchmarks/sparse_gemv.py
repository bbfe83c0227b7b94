"""Sparse CPU kernels at decode sizes. 2:4 sparse + int8 weights: the generated kernel that reads
only the kept values and their 2-bit indices (``s24+int8``, ``backends/cpu_codegen.py``) against
the dense int8 kernels over the same (pruned) weight: the generated int8 kernel and torch's packed
int8 kernel (``aten._weight_int8pack_mm``, bf16 activations). Activation sparsity (one row): the
K-major activation-sparse GEMV (``backends/cpu_sparse.py``) at ``--act-sparsities`` (fractions of
zeroed inputs) against the dense generated kernel of the same format (int8, int4 g128), the sparse
kernel forced and as dispatched by measurement (``cpu_sparse.max_kept``: above the measured
crossover the dense kernel runs, so "dispatched" should never be much below 1x).

For the linear shapes of ``cpu_gemv.py`` (a Llama-style decoder, hidden 2048, intermediate 5632)
and M in {1, 4, 16} rows, the contenders run interleaved (one call of each in turn, medians over
``--repeats``). Reported: ms per call (median) and the speedup of the sparse kernel over each
dense one, from the medians and from the minima (on a machine shared with other jobs a median
can land on a preempted call: the minimum is the better estimate of an idle machine's time).
Timings on a shared machine: re-measure on an idle one.

    python benchmarks/sparse_gemv.py [--repeats 31] [--threads 1] [--rows 1,4,16] [--act-sparsities 0,0.25,0.4,0.5,0.7]
                                     [--json benchmarks/results/sparse_gemv.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from lowbit_compiler import formats
from lowbit_compiler.backends import cpu_codegen, cpu_kernels, cpu_sparse
from lowbit_compiler.formats import WeightFormat

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_cpu import interleaved  # noqa: E402  (one-call-each-in-turn timing, as every CPU benchmark)

SHAPES = {"q/o proj": (2048, 2048), "gate/up": (5632, 2048), "down": (2048, 5632)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rows", default="1,4,16")
    parser.add_argument("--act-sparsities", default="0,0.25,0.4,0.5,0.7")
    parser.add_argument("--act-formats", default="int8,int4_g128_asym")
    parser.add_argument("--json", default="benchmarks/results/sparse_gemv.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sparse, dense = WeightFormat.parse("s24+int8"), WeightFormat.parse("int8")
    if cpu_codegen.kernel(sparse.key) is None or cpu_codegen.kernel(dense.key) is None:
        raise SystemExit(f"no generated kernel: {cpu_codegen._disabled_reason}")
    rows = []
    print(f"threads {args.threads}")
    print("shape | M | s24+int8 ms | int8 generated ms | int8 torch packed ms | vs generated | vs torch | "
          "vs generated (min) | vs torch (min)")
    for label, (n, k) in SHAPES.items():
        w = torch.randn(n, k) * 0.02
        qs = formats.quantize(w, sparse)  # magnitude 2:4, then int8 of the kept values
        pruned = formats.dequantize(qs)  # the same weight, dense with zeros
        qd = formats.quantize(pruned, dense)
        packed = cpu_kernels.prepack(qd.qweight, qd.scale, None, dense.key, k, torch.bfloat16)
        for m in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(m, k)
            calls = {
                "sparse": lambda: cpu_codegen.linear(x, qs.qweight, qs.scale, None, None, sparse.key, k),
                "int8_generated": lambda: cpu_codegen.linear(x, qd.qweight, qd.scale, None, None, dense.key, k),
                "int8_torch": lambda: cpu_kernels.packed_linear(x, packed, None, torch.bfloat16),
            }
            torch.testing.assert_close(calls["sparse"](), x @ pruned.T, rtol=1e-4, atol=1e-4)
            med, low = interleaved(calls, args.repeats)
            row = {"shape": label, "N": n, "K": k, "M": m, **{f"{a}_ms": round(v * 1e3, 4) for a, v in med.items()},
                   **{f"{a}_min_ms": round(v * 1e3, 4) for a, v in low.items()},
                   "speedup_vs_int8_generated": round(med["int8_generated"] / med["sparse"], 3),
                   "speedup_vs_int8_torch": round(med["int8_torch"] / med["sparse"], 3),
                   "min_speedup_vs_int8_generated": round(low["int8_generated"] / low["sparse"], 3),
                   "min_speedup_vs_int8_torch": round(low["int8_torch"] / low["sparse"], 3)}
            rows.append(row)
            print(f"{label} {n}x{k} | {m} | {med['sparse'] * 1e3:.3f} | {med['int8_generated'] * 1e3:.3f} | "
                  f"{med['int8_torch'] * 1e3:.3f} | {row['speedup_vs_int8_generated']:.2f}x | "
                  f"{row['speedup_vs_int8_torch']:.2f}x | {row['min_speedup_vs_int8_generated']:.2f}x | "
                  f"{row['min_speedup_vs_int8_torch']:.2f}x")
    act_rows = activation_sparse(args) if args.act_sparsities else []
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"threads": args.threads, "torch": torch.__version__, "rows": rows, "activation_rows": act_rows},
                  f, indent=2)


def activation_sparse(args) -> list[dict]:
    """One row thresholded to each sparsity: the dense generated kernel, the activation-sparse
    kernel forced, and the measured dispatch, interleaved; ratios of the medians over the shapes'
    summed medians too."""
    rows = []
    print("\nactivation sparsity, M = 1: format | shape | sparsity | dense ms | sparse ms | dispatched ms | "
          "sparse vs dense | dispatched vs dense | dispatched ran")
    gen = torch.Generator().manual_seed(1)
    for fmt in args.act_formats.split(","):
        f = WeightFormat.parse(fmt)
        weights = {label: formats.quantize(torch.randn(n, k, generator=gen) * 0.02, f)
                   for label, (n, k) in SHAPES.items()}
        for sparsity in [float(s) for s in args.act_sparsities.split(",")]:
            total = {"dense": 0.0, "sparse": 0.0, "dispatched": 0.0}
            for label, (n, k) in SHAPES.items():
                qw = weights[label]
                x = torch.randn(1, k, generator=gen)
                if sparsity > 0:
                    x = torch.where(x.abs() >= torch.quantile(x.abs(), sparsity), x, torch.zeros(()))
                w = cpu_sparse.kmajor_cpu(qw.qweight, qw.scale, qw.zero, fmt, k)
                x32 = x.reshape(k).contiguous()
                before = dict(cpu_sparse.dispatch_counter)
                calls = {"dense": lambda: cpu_codegen.linear(x, qw.qweight, qw.scale, qw.zero, None, fmt, k),
                         "sparse": lambda: cpu_sparse.run(x32, w, None, fmt, k),
                         "dispatched": lambda: cpu_sparse.sparse_or_dense(x, qw.qweight, qw.scale, qw.zero, None, fmt, k)}
                torch.testing.assert_close(calls["sparse"](), calls["dense"]().reshape(n), rtol=1e-4, atol=1e-4)
                med, _ = interleaved(calls, args.repeats)
                ran = {key[1]: v - before.get(key, 0) for key, v in cpu_sparse.dispatch_counter.items()
                       if key[0] == fmt and v != before.get(key, 0)}
                for c in total:
                    total[c] += med[c]
                row = {"format": fmt, "shape": label, "N": n, "K": k, "sparsity": sparsity,
                       **{f"{c}_ms": round(v * 1e3, 4) for c, v in med.items()},
                       "sparse_vs_dense": round(med["dense"] / med["sparse"], 3),
                       "dispatched_vs_dense": round(med["dense"] / med["dispatched"], 3), "dispatched_ran": ran}
                rows.append(row)
                print(f"{fmt} | {label} {n}x{k} | {sparsity:.0%} | {med['dense'] * 1e3:.3f} | {med['sparse'] * 1e3:.3f} | "
                      f"{med['dispatched'] * 1e3:.3f} | {row['sparse_vs_dense']:.2f}x | {row['dispatched_vs_dense']:.2f}x"
                      f" | {ran}")
            rows.append({"format": fmt, "shape": "all (sum of medians)", "sparsity": sparsity,
                         "sparse_vs_dense": round(total["dense"] / total["sparse"], 3),
                         "dispatched_vs_dense": round(total["dense"] / total["dispatched"], 3)})
            print(f"{fmt} | all three shapes | {sparsity:.0%} | {total['dense'] * 1e3:.3f} | {total['sparse'] * 1e3:.3f} | "
                  f"{total['dispatched'] * 1e3:.3f} | {rows[-1]['sparse_vs_dense']:.2f}x | "
                  f"{rows[-1]['dispatched_vs_dense']:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
