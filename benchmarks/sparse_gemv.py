"""2:4 sparse + int8 weights at decode sizes on the CPU: the generated kernel that reads only the
kept values and their 2-bit indices (``s24+int8``, ``backends/cpu_codegen.py``) against the dense
int8 kernels over the same (pruned) weight: the generated int8 kernel and torch's packed int8
kernel (``aten._weight_int8pack_mm``, bf16 activations).

For the linear shapes of ``cpu_gemv.py`` (a Llama-style decoder, hidden 2048, intermediate 5632)
and M in {1, 4, 16} rows, the contenders run interleaved (one call of each in turn, medians over
``--repeats``). Reported: ms per call (median) and the speedup of the sparse kernel over each
dense one, from the medians and from the minima (on a machine shared with other jobs a median
can land on a preempted call: the minimum is the better estimate of an idle machine's time).
Timings on a shared machine: re-measure on an idle one.

    python benchmarks/sparse_gemv.py [--repeats 31] [--threads 1] [--json benchmarks/results/sparse_gemv.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from lowbit_compiler import formats
from lowbit_compiler.backends import cpu_codegen, cpu_kernels
from lowbit_compiler.formats import WeightFormat

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_cpu import interleaved  # noqa: E402  (one-call-each-in-turn timing, as every CPU benchmark)

SHAPES = {"q/o proj": (2048, 2048), "gate/up": (5632, 2048), "down": (2048, 5632)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rows", default="1,4,16")
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
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"threads": args.threads, "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
