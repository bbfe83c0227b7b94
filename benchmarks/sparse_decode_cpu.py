"""Sparse decode on the CPU, batch 1: the activation-sparse GEMV (``backends/cpu_sparse.py``) at TEAL
sparsities, and the 2:4 + int8 kernel (``cpu_codegen``, ``s24+int8``), against the dense generated
kernel of the same weight format (``cpu_codegen``, bound once per weight as in a model) and torch's packed kernel of that format with
bf16 activations (what ``w8a16``/``w4a16`` run on the CPU without generated kernels).

Shapes: the linears of one block of a 0.49B Qwen2-style decoder (hidden 896, intermediate 4864, 2 KV
heads of 64: q 896x896, k/v 128x896, o 896x896, gate/up 4864x896, down 896x4864), batch 1.
``--layers L`` makes L blocks of distinct weights that a step goes through in turn, as a decode
step does (24 for the 0.49B model: the weights no longer fit the last-level cache, so the kernels
read them from memory; 1 keeps one block's weights in cache). Per format and sparsity, every GEMV
runs as dense, sparse and torch calls back to back (interleaved), ``--repeats`` times; a step's time
is L times the sum of the seven per-shape medians, and the ratios of those sums are reported, with
per-shape ratios. The activation-sparse input is a standard-normal row thresholded to the target
fraction of zeros (what ``lowbit::act_sparsify`` leaves); ``s24+int8`` rows take a dense row over
magnitude-2:4-pruned weights, and their dense baseline is int8 over the same pruned weights.

Which kernel the activation-sparse calls run follows the measured dispatch (``cpu_sparse.max_kept``:
the dense kernel above the measured crossover; ``LOWBIT_SPARSE_DISPATCH=sparse`` times the sparse
kernel everywhere); the ``ran`` column counts what ran. The machine may be shared: ratios measured
in the same process are what to compare; re-measure absolute times on an idle machine.

    python benchmarks/sparse_decode_cpu.py [--repeats 31] [--layers 24] [--json benchmarks/results/sparse_decode_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from lowbit_compiler.backends import cpu_codegen, cpu_kernels, cpu_sparse
from lowbit_compiler.formats import WeightFormat, dequantize, quantize

SHAPES = {"q_proj": (896, 896), "k_proj": (128, 896), "v_proj": (128, 896), "o_proj": (896, 896),
          "gate_proj": (4864, 896), "up_proj": (4864, 896), "down_proj": (896, 4864)}


def _thresholded(k: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(1, k, generator=gen)
    if sparsity > 0:
        thr = torch.quantile(x.abs(), sparsity)
        x = torch.where(x.abs() >= thr, x, torch.zeros(()))
    return x


def _contenders(fmt: str, layers: int, gen: torch.Generator):
    """Per layer and shape: (dense call, sparse call, torch call) factories over x, and the
    sparsities to run (None: the 2:4 format, whose input is dense)."""
    f = WeightFormat.parse(fmt)
    blocks = []
    for _ in range(layers):
        block = {}
        for name, (n, k) in SHAPES.items():
            w = torch.randn(n, k, generator=gen) * 0.02
            if f.kind == "sparse":
                qs = quantize(w, f)
                qd = quantize(dequantize(qs), WeightFormat.parse(f.inner.key))
                # bound once like the dense kernel (a compiled or compressed model's 2:4 weight is a
                # PackedWeight whose bound kernel packed_linear memoises)
                nm = cpu_codegen.bind(qs.qweight, qs.scale, None, fmt, k)
                assert nm is not None, f"no generated kernel for {fmt}"
                sparse = (lambda x, nm=nm: nm(x, None))
                dfmt = f.inner.key
            else:
                qd = quantize(w, f)
                sparse = (lambda x, qd=qd, k=k: cpu_sparse.linear(x, qd.qweight, qd.scale, qd.zero, None, fmt, k))
                dfmt = fmt
            packed = cpu_kernels.prepack(qd.qweight, qd.scale, qd.zero, dfmt, k, torch.bfloat16)
            # bound once, as the models' calls are (packed_linear memoises its bound kernel): binding
            # per call costs more than the kernel at these shapes
            bound = cpu_codegen.bind(qd.qweight, qd.scale, qd.zero, dfmt, k)
            assert bound is not None, f"no dense generated kernel for {dfmt}"
            dense = (lambda x, bound=bound: bound(x, None))
            torch_call = (lambda x, packed=packed: cpu_kernels.packed_linear(x, packed, None, torch.bfloat16))
            for call in (dense, sparse):  # build the kernels, the K-major copies and the dispatch plans first
                assert call(torch.randn(1, k, generator=gen) * (torch.rand(1, k, generator=gen) < 0.3)) is not None
            torch_call(torch.randn(1, k))
            block[name] = (dense, sparse, torch_call)
        blocks.append(block)
    return blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--formats", default="int8,int4_g128_asym,s24+int8")
    parser.add_argument("--sparsities", default="0.25,0.4,0.5")
    parser.add_argument("--json", default="benchmarks/results/sparse_decode_cpu.json")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for fmt in args.formats.split(","):
        blocks = _contenders(fmt, args.layers, gen)
        is_24 = WeightFormat.parse(fmt).kind == "sparse"
        for sparsity in ([0.0] if is_24 else [float(s) for s in args.sparsities.split(",")]):
            xs = {name: _thresholded(k, sparsity, gen) for name, (n, k) in SHAPES.items()}
            times = {c: {n: [] for n in SHAPES} for c in ("dense", "sparse", "torch")}
            before = dict(cpu_sparse.dispatch_counter)
            for _ in range(args.repeats):
                for block in blocks:
                    for name in SHAPES:  # interleaved: dense, sparse, torch, per shape
                        x = xs[name]
                        for contender, call in zip(("dense", "sparse", "torch"), block[name]):
                            t0 = time.perf_counter()
                            call(x)
                            times[contender][name].append(time.perf_counter() - t0)
            # a step is the sum of the per-shape medians (robust to another process taking the core mid-step)
            step = {c: args.layers * sum(statistics.median(times[c][n]) for n in SHAPES) for c in times}
            ran = {k[1]: v - before.get(k, 0) for k, v in cpu_sparse.dispatch_counter.items() if k[0] == fmt}
            per_shape = {n: round(statistics.median(times["dense"][n]) / statistics.median(times["sparse"][n]), 2)
                         for n in SHAPES}
            rows.append({"format": fmt, "sparsity": "2:4" if is_24 else sparsity, "layers": args.layers,
                         "dense_ms": round(step["dense"] * 1e3, 3), "sparse_ms": round(step["sparse"] * 1e3, 3),
                         "speedup": round(step["dense"] / step["sparse"], 2),
                         "torch_packed_ms": round(step["torch"] * 1e3, 3),
                         "vs_torch_packed": round(step["torch"] / step["sparse"], 2),
                         "per_shape_speedup": per_shape, "ran": ran or {"sparse (2:4 kernel)": "all"}})
    print(f"threads={torch.get_num_threads()} layers={args.layers} dispatch={os.environ.get(cpu_sparse.DISPATCH_ENV, 'measure')}"
          "  (interleaved medians; the machine may be shared)")
    print(f"{'format':<16}{'sparsity':>9}{'dense ms':>10}{'sparse ms':>11}{'speedup':>9}{'torch ms':>10}"
          f"{'vs torch':>10}  per shape (vs dense); ran")
    for r in rows:
        sp = r["sparsity"] if isinstance(r["sparsity"], str) else f"{r['sparsity']:.2f}"
        print(f"{r['format']:<16}{sp:>9}{r['dense_ms']:>10.3f}{r['sparse_ms']:>11.3f}"
              f"{r['speedup']:>8.2f}x{r['torch_packed_ms']:>10.3f}{r['vs_torch_packed']:>9.2f}x  "
              + " ".join(f"{k}={v}" for k, v in r["per_shape_speedup"].items()) + f"; {r['ran']}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump({"threads": torch.get_num_threads(), "repeats": args.repeats, "layers": args.layers,
                   "dispatch": os.environ.get(cpu_sparse.DISPATCH_ENV, "measure"), "shapes": SHAPES, "rows": rows},
                  fh, indent=1)


if __name__ == "__main__":
    main()
