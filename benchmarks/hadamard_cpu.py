"""The online Hadamard (``lowbit::hadamard``) on the CPU against a copy of the same tensor.

For each row count M, three contenders run interleaved (one call of each in turn, medians over
``--repeats`` rounds): ``x.clone()`` (the baseline: one read and one write of x), the op
(``lowbit_compiler.hadamard.transform``: 16-wide Kronecker factors), and plain torch with the dense
orthogonal matrix (``x @ H``). Reported: median microseconds and the ratio to the copy. The target
(issue 5): the op at dimension 4096 costs at most 10x a copy for M >= 64.

    python benchmarks/hadamard_cpu.py [--dim 4096] [--rows 1 64 256 1024] [--json benchmarks/results/hadamard_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from lowbit_compiler import hadamard


def measure(dim: int, rows: int, repeats: int) -> dict[str, float]:
    x = torch.randn(rows, dim)
    dense = hadamard.matrix(dim, torch.float32)
    contenders = {"copy": x.clone, "lowbit::hadamard": lambda: hadamard.transform(x), "dense x @ H": lambda: x @ dense}
    assert torch.allclose(hadamard.transform(x), x @ dense, atol=1e-4)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = []
    print(f"lowbit::hadamard at dimension {args.dim}, {torch.get_num_threads()} threads (median us; ratio to a copy)")
    print(f"{'M':>6} {'copy':>9} {'hadamard':>9} {'ratio':>6} {'dense x@H':>10} {'ratio':>6}")
    for m in args.rows:
        t = measure(args.dim, m, args.repeats)
        row = {"M": m, **{k: round(v, 1) for k, v in t.items()},
               "hadamard_over_copy": round(t["lowbit::hadamard"] / t["copy"], 2),
               "dense_over_copy": round(t["dense x @ H"] / t["copy"], 2)}
        rows.append(row)
        print(f"{m:>6} {t['copy']:>9.1f} {t['lowbit::hadamard']:>9.1f} {row['hadamard_over_copy']:>6.1f} "
              f"{t['dense x @ H']:>10.1f} {row['dense_over_copy']:>6.1f}")
    result = {"dim": args.dim, "threads": torch.get_num_threads(), "rows": rows}
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
