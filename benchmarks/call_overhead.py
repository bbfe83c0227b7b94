"""The compiled callable's own per-call Python work against a tiny model's step, on the CPU.

``LowbitCompiled.__call__`` does, besides running the lowered graph: the frozen-parameter check
(every frozen parameter still the same object at the same version; else it re-freezes) and the
selection of the graph's arguments from Dynamo's. This measures that work against the step it
wraps -- the lowered graph of a tiny Llama (hidden 128, 2 layers, w4a16, one token, target "cpu":
the packed/generated CPU kernels) -- as ratios in the same process, calls interleaved, medians:

* ``wrapper``: the wrapper's own work alone (``stale_parameter`` + ``call_args``), timed in a loop;
* ``call - graph``: a whole call of the compiled callable minus a call of its lowered graph.

The issue's bound is 5 % of the step; ``tests/backends/test_call_overhead.py`` asserts it (ratios,
never absolute times). A GPU step is a few kernels' worth of microseconds, so there the graph's own
Python (Triton's launcher per kernel) matters too: ``cuda_graphs=True`` replays the whole step.

    python benchmarks/call_overhead.py [--repeats 200] [--arch llama]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def compiled_step(arch: str = "llama", recipe: str = "w4a16", target: str = "cpu"):
    """(the LowbitCompiled callable, the args Dynamo passes it) for one token of a tiny model."""
    from lowbit_compiler.backends.lowbit_backend import BackendOptions, compile_graph
    from tests.conftest import make_model

    opts = BackendOptions.from_dict({"recipe": recipe, "target": target})
    seen: list[tuple[Any, tuple]] = []

    def backend(gm, example_inputs):
        compiled, _ = compile_graph(gm, example_inputs, opts)

        def call(*args):
            seen.append((compiled, args))
            return compiled(*args)

        return call

    model = make_model(arch)
    ids = torch.randint(0, 256, (1, 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.compile(model, backend=backend)(ids)
    return seen[-1]


def measure(repeats: int = 200, arch: str = "llama", step: tuple | None = None) -> dict[str, float]:
    """Median seconds of: the graph, a whole call, and the wrapper's own work; and the ratios
    (``step``: a ``compiled_step()`` result to reuse)."""
    compiled, args = step or compiled_step(arch)
    inner = compiled.captured.call_args(args)

    def wrapper_work(loops: int = 20):
        for _ in range(loops):
            compiled.captured.stale_parameter(args)
            compiled.captured.call_args(args)

    calls = {"graph": lambda: compiled.run(*inner), "call": lambda: compiled(*args),
             "wrapper x20": wrapper_work}
    times = {name: [] for name in calls}
    with torch.no_grad():
        for _ in range(3):
            for call in calls.values():
                call()
        for _ in range(repeats):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    wrapper = med["wrapper x20"] / 20
    return {"graph_s": med["graph"], "call_s": med["call"], "wrapper_s": wrapper,
            "wrapper_ratio": wrapper / med["graph"], "call_minus_graph_ratio": (med["call"] - med["graph"]) / med["graph"],
            "frozen_parameters": len(compiled.captured.frozen_parameters)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--arch", default="llama")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    r = measure(args.repeats, args.arch)
    print(f"tiny {args.arch} (w4a16, target cpu, 1 token): {r['frozen_parameters']} frozen parameters checked per call")
    print(f"step (lowered graph)      {r['graph_s'] * 1e6:9.1f} us")
    print(f"wrapper's own work        {r['wrapper_s'] * 1e6:9.1f} us  = {r['wrapper_ratio']:.2%} of the step (bound 5 %)")
    print(f"whole call minus graph    {(r['call_s'] - r['graph_s']) * 1e6:9.1f} us  = "
          f"{r['call_minus_graph_ratio']:.2%} of the step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
