"""Decode with CUDA graphs: the ``cuda_graphs=True`` backend option.

At decode sizes a step is launch-bound: a Llama layer is four generated kernels (plus attention
glue), each a few microseconds of GPU time behind tens of microseconds of Python and driver work
(Triton's launcher, the fx graph's own Python). With ``cuda_graphs=True`` the compiled callable
captures its lowered graph into a CUDA graph the first time it sees an input signature (shapes,
dtypes, strides) and replays it afterwards: one launch per step.

What a replay does (:class:`GraphRunner`):

* tensor arguments are copied into the buffers the graph was captured with (their addresses are
  baked into the graph); non-tensor arguments must equal the captured ones (else a new capture);
* arguments the graph changes in place (a static KV cache; seen as a version bump during the
  warm-up runs) are copied back to the caller's tensors after the replay;
* outputs are the graph's own buffers, cloned so the next replay cannot overwrite what the caller
  holds.

Use it with fixed shapes per step (``generate(..., cache_implementation="static")``): a growing
dynamic cache changes the shapes every step, and each new signature costs a capture. After
``MAX_GRAPHS`` signatures the callable stops capturing and runs uncaptured, logged once. The
split-K workspaces (``codegen.split_workspace``) are allocated per shape before capture and left
zeroed by the kernels, so replays need no memset. Without a CUDA device the option is refused
with the reason (strict mode raises) and the graph runs as usual.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

log = logging.getLogger("lowbit_compiler")

MAX_GRAPHS = 32  # input signatures captured per compiled graph
WARMUP_RUNS = 2  # eager runs on a side stream before capture (Triton compiles, allocations settle)


def unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "cuda_graphs=True needs a CUDA device; the graph runs without CUDA graphs"
    return None


def _signature(args: tuple[Any, ...]) -> tuple:
    return tuple((tuple(a.shape), a.dtype, a.device, a.stride()) if isinstance(a, torch.Tensor) else ("value", a)
                 for a in args)


class _Captured:
    def __init__(self, graph: Any, inputs: list[Any], outputs: Any, mutated: list[int]):
        self.graph, self.inputs, self.outputs, self.mutated = graph, inputs, outputs, mutated


class GraphRunner:
    """Wraps ``run`` (the lowered graph's callable): capture per input signature, then replay.

    ``capture(fn) -> (graph, outputs)`` and ``graph.replay()`` are CUDA's (``torch.cuda.graph``);
    tests substitute a recording stand-in to check the copy-in, copy-back and output handling on
    machines without CUDA."""

    def __init__(self, run: Callable[..., Any], capture: Callable[[Callable[[], Any]], tuple[Any, Any]] | None = None,
                 warmup: Callable[[Callable[[], Any]], None] | None = None):
        self.run = run
        self._capture = capture or _cuda_capture
        self._warmup = warmup or _cuda_warmup
        self.graphs: dict[tuple, _Captured] = {}
        self.stats = {"captures": 0, "replays": 0, "uncaptured": 0}
        self._full_logged = False

    def __call__(self, *args: Any) -> Any:
        key = _signature(args)
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= MAX_GRAPHS:
                if not self._full_logged:
                    log.warning("lowbit cuda_graphs: %d input signatures captured already; later new shapes run "
                                "without CUDA graphs (fix the shapes per step, e.g. a static KV cache)", MAX_GRAPHS)
                    self._full_logged = True
                self.stats["uncaptured"] += 1
                return self.run(*args)
            entry = self._record(args)
            self.graphs[key] = entry
        for dst, src in zip(entry.inputs, args):
            if isinstance(src, torch.Tensor):
                dst.copy_(src)
        entry.graph.replay()
        self.stats["replays"] += 1
        for i in entry.mutated:  # in-place updates of the caller's tensors (a static KV cache)
            args[i].copy_(entry.inputs[i])
        return _clone(entry.outputs)

    def _record(self, args: tuple[Any, ...]) -> _Captured:
        inputs = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        versions = [a._version if isinstance(a, torch.Tensor) else None for a in inputs]
        self._warmup(lambda: self.run(*inputs))
        mutated = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor) and a._version != versions[i]]
        graph, outputs = self._capture(lambda: self.run(*inputs))
        self.stats["captures"] += 1
        return _Captured(graph, inputs, outputs, mutated)


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


def _cuda_warmup(fn: Callable[[], Any]) -> None:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(WARMUP_RUNS):
            fn()
    torch.cuda.current_stream().wait_stream(stream)


def _cuda_capture(fn: Callable[[], Any]) -> tuple[Any, Any]:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs
