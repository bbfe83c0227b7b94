"""The compiled callable's per-call Python work (frozen-parameter check, argument selection) stays
below 5 % of a tiny model's step on the CPU (ratios in one process, interleaved medians; never an
absolute time), and the CUDA-graphs option's replay logic."""
from __future__ import annotations

import importlib.util
import logging
import os
import sys

import pytest
import torch

from lowbit_compiler.backends import cuda_graphs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("call_overhead", os.path.join(ROOT, "benchmarks", "call_overhead.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["call_overhead"] = module
    spec.loader.exec_module(module)
    return module


def test_per_call_python_work_is_below_5_percent_of_a_tiny_step(bench, monkeypatch):
    compiled, args = step = bench.compiled_step()
    r = bench.measure(repeats=25, step=step)
    assert r["frozen_parameters"] > 0
    assert r["wrapper_ratio"] < 0.05, r
    # the measurement can fail: a check over 100x the parameters (a model this step could not be)
    many = compiled.captured.frozen_parameters * 100
    monkeypatch.setattr(compiled.captured, "frozen_parameters", many)
    from torch.utils import benchmark

    heavy = benchmark.Timer("c.captured.stale_parameter(a)", globals={"c": compiled, "a": args}).timeit(50).median
    light = benchmark.Timer("c.captured.call_args(a)", globals={"c": compiled, "a": args}).timeit(50).median
    assert heavy > 20 * light  # the check's cost grows with the parameters it walks


class _RecordedGraph:
    """Stands in for torch.cuda.CUDAGraph: replay re-runs what was captured, on the same buffers."""

    def __init__(self, fn):
        self.fn, self.replays = fn, 0

    def replay(self):
        self.replays += 1
        out = self.fn()
        self.outputs[0].copy_(out[0]) if isinstance(out, tuple) else None


def _fake_capture(fn):
    graph = _RecordedGraph(fn)
    out = fn()
    graph.outputs = out
    return graph, out


def test_graph_runner_copies_inputs_in_mutations_back_and_clones_outputs():
    def step(x, cache, pos):  # a decode step with a static cache written in place
        cache[pos] = x.sum()
        return (x * 2 + cache.sum(),)

    runner = cuda_graphs.GraphRunner(step, capture=_fake_capture, warmup=lambda fn: fn())
    cache = torch.zeros(4)
    outs = []
    for pos, x in enumerate(torch.arange(12.0).reshape(3, 4)):
        expected_cache = cache.clone()
        expected_cache[pos] = x.sum()
        expected = x * 2 + expected_cache.sum()
        outs.append(runner(x, cache, pos)[0])
        assert torch.equal(cache, expected_cache) and torch.equal(outs[-1], expected)
    assert runner.stats == {"captures": 3, "replays": 3, "uncaptured": 0}  # pos is a value: one graph each
    assert not torch.equal(outs[0], outs[1])  # each caller's output is its own tensor
    runner(torch.ones(4), cache, 0)
    assert runner.stats["captures"] == 3 and runner.stats["replays"] == 4  # same signature: replayed


def test_graph_runner_stops_capturing_after_max_graphs(monkeypatch, caplog):
    monkeypatch.setattr(cuda_graphs, "MAX_GRAPHS", 2)
    runner = cuda_graphs.GraphRunner(lambda x: (x + 1,), capture=_fake_capture, warmup=lambda fn: fn())
    with caplog.at_level(logging.WARNING, logger="lowbit_compiler"):
        for n in (1, 2, 3, 4):
            assert torch.equal(runner(torch.zeros(n))[0], torch.ones(n))
    assert runner.stats == {"captures": 2, "replays": 2, "uncaptured": 2}
    assert sum("input signatures captured already" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_graphs_option_without_cuda_is_refused_with_the_reason(caplog):
    from lowbit_compiler.backends import lowbit_backend
    from tests.conftest import make_model, prompt
    from tests.helpers import Recorder

    before = lowbit_backend.stats["cuda_graphs_refused"]
    with caplog.at_level(logging.WARNING, logger="lowbit_compiler"), torch.no_grad():
        torch.compile(make_model("llama"), backend=Recorder(recipe="none", target="cpu", cuda_graphs=True))(prompt())
    assert lowbit_backend.stats["cuda_graphs_refused"] == before + 1
    assert any("cuda_graphs=True needs a CUDA device" in r.getMessage() for r in caplog.records)
    with pytest.raises(Exception, match="cuda_graphs=True needs a CUDA device"):
        torch._dynamo.reset()
        torch.compile(make_model("llama"), backend=Recorder(recipe="none", target="cpu", cuda_graphs=True,
                                                            strict=True))(prompt())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_replay_matches_the_uncaptured_model():
    from tests.conftest import make_model
    from tests.helpers import Recorder

    ids = torch.randint(0, 256, (1, 1), device="cuda")
    plain = Recorder(recipe="w4a16", target="triton")
    graphs = Recorder(recipe="w4a16", target="triton", cuda_graphs=True)
    a, b = make_model("llama", dtype=torch.float16).cuda(), make_model("llama", dtype=torch.float16).cuda()
    with torch.no_grad():
        ref = torch.compile(a, backend=plain)(ids).logits
        fb = torch.compile(b, backend=graphs)
        first, second = fb(ids).logits, fb(ids).logits
    assert torch.equal(first, second) and (first - ref).abs().max() < 1e-2
    assert graphs.compiled[0].run.stats["replays"] == 2
