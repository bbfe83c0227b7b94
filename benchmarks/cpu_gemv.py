"""Low-bit matmuls at decode sizes on the CPU: generated kernels against torch's packed kernels.

For the linear shapes of a Llama-style decoder (hidden 2048, intermediate 5632: the model of
``decode_cpu.py``) and M in {1, 4, 16} rows, each contender runs interleaved with the others
(one call of each in turn, medians over ``--repeats``): the generated kernel of
``backends/cpu_codegen.py`` (explicit AVX2 + FMA where the host has them; float32 activations and
accumulation: what ``cpu_kernels.packed_linear`` runs for M <= 16), torch's packed kernel with
bf16 activations (``aten._weight_int4pack_mm_for_cpu`` / ``_weight_int8pack_mm``: what runs
without the generated kernels, and for M > 16), and a bf16 ``F.linear`` on the dense weight.
``w8a8``: the generated int8 x int8 kernel against ``torch._int_mm`` on the same int8 codes. For int8 and
int4 groups of 64+, a trailing column puts the split-int8 integer path beside the float path of
the same kernel (``source(fmt, split8=False)``; both bound once, interleaved). For
int4 formats the last column times the opt-in kernel that quantizes activations to int8
(``LOWBIT_CPU_INT8_ACTIVATIONS=1``; lossy). NF4 (``--formats nf4_g64``: the int8-table path,
pshufb + maddubs) has no torch kernel: its "torch packed" column is torch's int4 kernel at the
same group size (the w4a16 path the issue's target compares against), the trailing column puts the
int8-table path beside the kernel's float path (two permutes and a blend per 8 codes: what ran
before), and the float reference NF4 calls ran before dispatch took them is timed like int3's.
int3 / int2 (``--formats int3_g128_asym,int2_g64_sym``; ``backends/cpu_lut.py``: T-MAC-style
lookup tables): the "torch packed" column is torch's int4 kernel at the same group size and
symmetry (the w4a16 path the issue's target compares against), and a last column times the float
reference these formats ran before (``ops.wo_linear_reference``: dequantise, then matmul; timed
after the others, not interleaved with them, since it evicts the caches).
For int8 / int4 a last column runs ``cpu_kernels.packed_linear`` as a model does: the kernel
``backends/cpu_dispatch.py`` chose by timing at its first call (the choice, and its speed against
torch's packed kernel: the "after" of the measured dispatch, where "gen/torch" is the static
rule's "before"; ``LOWBIT_CPU_DISPATCH`` applies).
Reported: ms per call (medians), speedup of the generated kernel over torch's (of the medians,
and of the fastest call of each: steadier when other processes share the cores), and the fraction of the
read-bandwidth floor (weight bytes / the bandwidth of a large fp32 sum measured in this run). The
2048-wide weights fit in the L3 cache, so repeated calls can beat the DRAM floor (> 100 %).

    python benchmarks/cpu_gemv.py [--repeats 21] [--threads N] [--json benchmarks/results/cpu_gemv.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from lowbit_compiler import formats, ops
from lowbit_compiler.backends import cpu_codegen, cpu_dispatch, cpu_kernels, cpu_lut
from lowbit_compiler.formats import WeightFormat

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_cpu import interleaved, read_bandwidth  # noqa: E402  (the decode benchmark's measurements)

SHAPES = {"q/o proj": (2048, 2048), "gate/up": (5632, 2048), "down": (2048, 5632)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--formats", default="int4_g128_asym,int4_g128_sym,int4_g64_asym,int4_g32_sym,int8,w8a8")
    parser.add_argument("--json", default="benchmarks/results/cpu_gemv.json")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch and kernel threads (0: torch's default); 1 is steadier on a shared machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth()
    rows_out = []
    # on an AVX-512 host, the AVX2 build of the same kernel too (what an AVX2-only machine runs)
    wide = cpu_codegen.host_isa().startswith("avx512")
    print(f"threads {torch.get_num_threads()}, read bandwidth {bandwidth / 1e9:.1f} GB/s, "
          f"generated kernels: {cpu_codegen.host_isa()}")
    header = ["format", "shape", "M", "generated ms", "torch packed ms", "bf16 dense ms", "gen/torch",
              "gen/torch (best)", "gen floor", "int8-act ms (best vs torch) | float ref ms (gen speedup)"] + (
                  ["vs AVX2 build (best)"] if wide else []) + ["dispatched: choice, vs torch"]
    print(" | ".join(header))
    for fmt in args.formats.split(","):
        f = WeightFormat.parse("int8" if fmt == cpu_codegen.W8A8 else fmt)
        lut = cpu_lut.supported(fmt) is None
        nf4 = f.kind == "nf4"
        if (cpu_lut.kernel(fmt) if lut else cpu_codegen.kernel(fmt)) is None:
            print(f"{fmt}: no generated kernel ({cpu_codegen._disabled_reason})")
            continue
        for label, (n, k) in SHAPES.items():
            w = torch.randn(n, k) * 0.02
            q = formats.quantize(w, f)
            # NF4, int3, int2: torch's int4 kernel at the same group (and symmetry)
            torch_fmt = (f"int4_g{f.group_size}_{'sym' if f.symmetric else 'asym'}" if lut
                         else {"int": f.key, "nf4": f"int4_g{f.group_size}_sym"}[f.kind])
            tq = q if torch_fmt == f.key else formats.quantize(w, WeightFormat.parse(torch_fmt))
            packed = cpu_kernels.prepack(tq.qweight, tq.scale, tq.zero, torch_fmt, k, torch.bfloat16)
            dense = w.to(torch.bfloat16)
            nbytes = (cpu_lut.relayout(q.qweight, q.scale, q.zero, fmt).nbytes if lut  # what the kernel reads
                      else sum(t.numel() * t.element_size() for t in (q.qweight, q.scale, q.zero) if t is not None))
            for m in (1, 4, 16):
                x = torch.randn(m, k)
                if fmt == cpu_codegen.W8A8:  # the integer matmul of qa_linear on int8 activation codes
                    xq = torch.randint(-127, 128, (m, k), dtype=torch.int8)
                    calls = {
                        "generated": lambda: cpu_codegen.int8_matmul(xq, q.qweight),
                        "torch": lambda: torch._int_mm(xq, q.qweight.t()),
                        "dense": lambda: torch.nn.functional.linear(x.to(torch.bfloat16), dense),
                    }
                    if wide:
                        calls["avx2"] = lambda: cpu_codegen.int8_matmul(xq, q.qweight, isa="avx2")
                elif lut:
                    calls = {
                        "generated": lambda: cpu_lut.linear(x, q.qweight, q.scale, q.zero, None, fmt, k),
                        "torch": lambda: cpu_kernels.torch_packed_linear(x, packed, None, torch.bfloat16),
                        "dense": lambda: torch.nn.functional.linear(x.to(torch.bfloat16), dense),
                    }
                else:
                    calls = {
                        "generated": lambda: cpu_codegen.linear(x, q.qweight, q.scale, q.zero, None, fmt, k),
                        "torch": lambda: cpu_kernels.torch_packed_linear(x, packed, None, torch.bfloat16),
                        "dense": lambda: torch.nn.functional.linear(x.to(torch.bfloat16), dense),
                    }
                    if wide:
                        calls["avx2"] = lambda: cpu_codegen.linear(x, q.qweight, q.scale, q.zero, None, fmt, k,
                                                                   isa="avx2")
                    # what packed_linear runs after cpu_dispatch's choice (timed at this first call, cached);
                    # NF4: its own packed weight (torch's int4 one above is only the comparison)
                    own = cpu_kernels.prepack(q.qweight, q.scale, q.zero, fmt, k, torch.bfloat16) if nf4 else packed
                    cpu_kernels.packed_linear(x, own, None, torch.bfloat16)
                    calls["dispatched"] = lambda: cpu_kernels.packed_linear(x, own, None, torch.bfloat16)
                    if cpu_codegen.source(fmt) != cpu_codegen.source(fmt, split8=False):
                        # the split-int8 integer path against the float path of the same kernel (both bound once)
                        split = cpu_codegen.Bound(cpu_codegen._build(fmt, "native", True), fmt, q.qweight, q.scale,
                                                  q.zero, fmt, k)
                        plain = cpu_codegen.Bound(cpu_codegen._build(fmt, "native", False), fmt, q.qweight,
                                                  q.scale, q.zero, fmt, k)
                        calls["split8"] = lambda: split(x, None)
                        calls["float_path"] = lambda: plain(x, None)
                    if cpu_codegen.supported(fmt + cpu_codegen.A8) is None:  # opt-in int8 activations
                        calls["int8act"] = lambda: cpu_codegen.linear(x, q.qweight, q.scale, q.zero, None, fmt, k,
                                                                      int8_activations=True)
                med, best = interleaved(calls, args.repeats)
                if lut or nf4:  # the float reference they ran before: timed on its own (it evicts the caches)
                    rmed, rbest = interleaved({"reference": lambda: ops.wo_linear_reference(
                        x, q.qweight, q.scale, q.zero, None, fmt, k)}, max(3, args.repeats // 4), warmup=1)
                    med.update(rmed)
                    best.update(rbest)
                floor = nbytes / bandwidth / med["generated"]
                row = {"format": fmt, "shape": label, "N": n, "K": k, "M": m,
                       **{f"{name}_ms": round(v * 1e3, 4) for name, v in med.items()},
                       **{f"{name}_best_ms": round(v * 1e3, 4) for name, v in best.items()},
                       "speedup_vs_torch": round(med["torch"] / med["generated"], 3),
                       "speedup_vs_torch_best": round(best["torch"] / best["generated"], 3),
                       "floor_fraction": round(floor, 3)}
                rows_out.append(row)
                if "avx2" in best:
                    row["speedup_vs_avx2_build_best"] = round(best["avx2"] / best["generated"], 3)
                if "split8" in best:
                    row["split8_vs_float_path_best"] = round(best["float_path"] / best["split8"], 3)
                    row["split8_vs_float_path"] = round(med["float_path"] / med["split8"], 3)
                if "int8act" in best:
                    row["int8act_speedup_vs_torch_best"] = round(best["torch"] / best["int8act"], 3)
                if "dispatched" in med:
                    row["dispatched"] = cpu_dispatch.choose(own, m, torch.bfloat16)
                    row["dispatched_vs_torch"] = round(med["torch"] / med["dispatched"], 3)
                if "reference" in med:
                    row["speedup_vs_reference"] = round(med["reference"] / med["generated"], 2)
                a8 = (f"{med['int8act'] * 1e3:.3f} ({row['int8act_speedup_vs_torch_best']:.2f}x)" if "int8act" in med
                      else f"{med['reference'] * 1e3:.3f} ({row['speedup_vs_reference']:.1f}x)" if "reference" in med
                      else "-")
                print(f"{fmt} | {label} {n}x{k} | {m} | {med['generated'] * 1e3:.3f} | {med['torch'] * 1e3:.3f} | "
                      f"{med['dense'] * 1e3:.3f} | {row['speedup_vs_torch']:.2f}x | "
                      f"{row['speedup_vs_torch_best']:.2f}x | {floor:.0%} | {a8}"
                      + (f" | {row['speedup_vs_avx2_build_best']:.2f}x" if "avx2" in best else "")
                      + (f" | {row['dispatched']} {row['dispatched_vs_torch']:.2f}x" if "dispatched" in row else "")
                      + (f" | {'int8 table' if nf4 else 'split8'} vs float path "
                         f"{row['split8_vs_float_path']:.2f}x (best "
                         f"{row['split8_vs_float_path_best']:.2f}x)" if "split8" in best else ""))
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump({"threads": torch.get_num_threads(), "read_bandwidth": bandwidth, "rows": rows_out}, fh, indent=1)


if __name__ == "__main__":
    main()
