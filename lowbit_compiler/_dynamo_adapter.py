"""Every private torch._dynamo detail the project relies on, in one file.

A torch upgrade that changes Dynamo's internals should only need edits here.

* ``module_state_of(placeholder)``: Dynamo records, for each graph input, the Python expression it
  came from (``node.meta["grapharg"].source``), e.g.
  ``L['self']._modules['model']._modules['layers']._modules['0']._parameters['weight']``.
  We read the module path back from that expression.
* ``input_name(placeholder)``: the forward argument a graph input came from (``L['input_ids']``).
* ``graph_break_count()`` / ``reset_counters()``: Dynamo's global counters.
* ``torch_compile_call()``: the ``torch._TorchCompileWrapper`` of the ``torch.compile(...)`` call
  that is invoking the backend (it calls ``compiler_fn(gm, inputs, options=...)`` from its
  ``__call__``), found in the calling frames: what ties the graphs of one call together.
* ``compiled_frame_locals()`` / ``root_local(placeholder)``: the real local variables of the frame
  Dynamo is compiling now (its ``InstructionTranslator.current_tx().f_locals``) and which of them a
  graph input was read from (``L['args'][0]._modules[...]`` -> ``("args", 0)``): how the backend
  reaches the module being compiled (the KV cache is installed on it).
* ``restart_analysis(reason)``: make Dynamo trace the current frame again from its start (raised from
  the backend: the one ``RestartAnalysis`` Dynamo lets through a backend call unwrapped).
* ``raise_region_recompile_limit(n)``: the recompile limit of the ``torch.compile(...)`` call now
  compiling (what ``torch.compile(recompile_limit=n)`` sets: the ``_recompile_limit`` of its
  ``ConvertFrameAssert``, found in the calling frames; Dynamo reads it at every frame it compiles).
"""
from __future__ import annotations

import re
import sys

from typing import Any

import torch
import torch.fx as fx

_MODULE_ATOM = re.compile(r"_modules\['([^']+)'\]")
_STATE_ATOM = re.compile(r"\._(parameters|buffers)\['([^']+)'\]$")


def source_name(node: fx.Node) -> str | None:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    try:
        return source.name() if callable(source.name) else str(source.name)
    except Exception:  # a source kind without a printable name
        return None


_LOCAL = re.compile(r"^L\['([^']+)'\]$|^L\['kwargs'\]\['([^']+)'\]$")


def input_name(node: fx.Node) -> str | None:
    """The name of the forward argument a (non-parameter) placeholder was read from:
    ``L['input_ids']`` (or ``L['kwargs']['input_ids']`` through a ``**kwargs`` wrapper) ->
    ``"input_ids"``; None for anything else (a tensor inside a cache object)."""
    name = source_name(node)
    m = _LOCAL.match(name) if name else None
    return (m.group(1) or m.group(2)) if m else None


def reads_argument(node: fx.Node, name: str) -> bool:
    """Whether a placeholder's value comes from (inside) the forward argument ``name``:
    ``L['encoder_outputs']...`` or ``L['kwargs']['encoder_outputs']...``."""
    source = source_name(node)
    return source is not None and (f"L['{name}']" in source or f"L['kwargs']['{name}']" in source)


def module_state_of(node: fx.Node) -> tuple[str, bool] | None:
    """``(fqn, is_parameter)`` when a placeholder is a module's parameter or buffer, else None.

    The FQN is relative to the module that was compiled (``model.layers.0.mlp.down_proj.weight``
    for a ``LlamaForCausalLM``).
    """
    name = source_name(node)
    if name is None:
        return None
    state = _STATE_ATOM.search(name)
    if state is None:
        return None
    modules = _MODULE_ATOM.findall(name[: state.start()])
    return ".".join([*modules, state.group(2)]), state.group(1) == "parameters"


_ROOT_EXPR = re.compile(r"^L\[[^\]]+\](\[\d+\])?\.?")


def calling_module(node: fx.Node) -> tuple[str, str] | None:
    """``(fqn, class name)`` of the innermost module whose forward produced ``node``.

    Dynamo records ``node.meta["nn_module_stack"]`` as ``{key: ("L['self'].model.layers.0.mlp",
    cls)}``; the root expression is stripped.
    """
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    return _ROOT_EXPR.sub("", str(path)), getattr(cls, "__name__", str(cls))


def compiling_backend() -> Any | None:
    """The backend of the Dynamo compile on this thread's stack, unwrapped (``innermost_backend``
    of the ``compiler_fn`` of Dynamo's ``convert_frame._compile`` frame: for ``torch.compile`` the
    ``_TorchCompileWrapper`` it made, holding the backend and its options), or None when no such
    frame is on the stack (not compiling, or a torch that moved it)."""
    from torch._dynamo.eval_frame import innermost_backend

    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_compile" and "compiler_fn" in frame.f_locals:
            return innermost_backend(frame.f_locals["compiler_fn"])
        frame = frame.f_back
    return None


def torch_compile_call(max_depth: int = 6) -> Any | None:
    """The object torch.compile made for the call now invoking the backend (one per
    ``torch.compile(...)`` / ``model.compile(...)`` call, shared by all graphs Dynamo compiles for
    it), or None when the backend is called some other way."""
    wrapper = getattr(torch, "_TorchCompileWrapper", None)
    if wrapper is None:
        return None
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, wrapper):
            return candidate
        frame = frame.f_back
    return None


_ROOT_LOCAL = re.compile(r"^L\['([^']+)'\](?:\[(\d+)\])?")


def root_local(node: fx.Node) -> tuple[str, int | None] | None:
    """``(local name, index or None)`` of the frame local a placeholder was read from:
    ``L['self']._modules['model']...`` -> ``("self", None)``, ``L['args'][0]._modules[...]`` ->
    ``("args", 0)`` (Hugging Face's forward decorators take ``(*args, **kwargs)``)."""
    name = source_name(node)
    m = _ROOT_LOCAL.match(name) if name else None
    if m is None:
        return None
    return m.group(1), (int(m.group(2)) if m.group(2) is not None else None)


def compiled_frame_locals() -> dict[str, Any] | None:
    """The local variables (the objects themselves) of the frame Dynamo is compiling now, or None
    when the backend was not called from a Dynamo trace (a graph compiled again at run time)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        f_locals = getattr(InstructionTranslator.current_tx(), "f_locals", None)
    except Exception:  # no trace in progress (tls has no current_tx), or Dynamo's internals moved
        return None
    return f_locals if isinstance(f_locals, dict) else None


def restart_analysis(reason: str) -> BaseException:
    """The exception to raise from a backend call so that Dynamo traces the current frame again from
    its start (after the backend changed the module or the call's arguments; the trace's speculation
    log is cleared, as Dynamo clears it before restarts that take another path). Dynamo wraps what a
    backend raises in ``BackendCompilerFailed``, except this kind, which AOTAutograd raises from
    inside backends to restart (``output_graph._call_user_compiler`` re-raises it, ``convert_frame``
    restarts on it)."""
    from torch._dynamo.exc import TensorifyScalarRestartAnalysis
    from torch._dynamo.symbolic_convert import InstructionTranslator

    # the traced code takes another path now: the speculation log of the first trace (the choices
    # Dynamo replays on a restart) must go, or the second trace fails with SpeculationLogDivergence
    InstructionTranslator.current_tx().speculation_log.clear()
    return TensorifyScalarRestartAnalysis(restart_reason=reason)


def raise_region_recompile_limit(limit: int) -> tuple[int, int] | None:
    """Raise the recompile limit of the ``torch.compile(...)`` call whose frame Dynamo is compiling
    now to at least ``limit``, as ``torch.compile(..., recompile_limit=limit)`` would have set it: it
    holds for the frames that call compiles from then on, not for other ``torch.compile`` calls.
    Returns ``(old, new)`` (old: the call's own limit, else ``torch._dynamo.config.recompile_limit``;
    new == old when it was already high enough), or None when no Dynamo compile is on the stack."""
    from torch._dynamo import config
    from torch._dynamo.convert_frame import ConvertFrameAssert

    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self") if frame.f_code.co_name == "__call__" else None
        if isinstance(candidate, ConvertFrameAssert) and hasattr(candidate, "_recompile_limit"):
            old = candidate._recompile_limit
            old = config.recompile_limit if old is None else old
            if old < limit:
                candidate._recompile_limit = limit
            return old, max(old, limit)
        frame = frame.f_back
    return None


def is_restart(error: BaseException) -> bool:
    """Whether ``error`` is :func:`restart_analysis`'s (to be let through to Dynamo untouched)."""
    from torch._dynamo.exc import TensorifyScalarRestartAnalysis

    return isinstance(error, TensorifyScalarRestartAnalysis)


def forget_backend(fn: Any) -> None:
    """Drop Dynamo's global reference to a backend function: every ``torch.compile(backend=fn)``
    keeps its backend (through the ``_TorchCompileWrapper``) in ``eval_frame.cached_backends`` until
    ``torch._dynamo.reset()``, and with it everything the function's closure holds (``compress``'s
    captured graphs hold the model's float weights: they would never be freed)."""
    from torch._dynamo import eval_frame

    cached = getattr(eval_frame, "cached_backends", None)
    if not isinstance(cached, dict):
        return
    for key, backend in list(cached.items()):
        if backend is fn or getattr(backend, "compiler_fn", None) is fn:
            del cached[key]


def backend_error(error: BaseException) -> BaseException | None:
    """The exception a backend raised, from Dynamo's ``BackendCompilerFailed`` wrapper (None when
    ``error`` is something else)."""
    from torch._dynamo.exc import BackendCompilerFailed

    return error.inner_exception if isinstance(error, BackendCompilerFailed) else None


def graph_break_count() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def reset_counters() -> None:
    from torch._dynamo.utils import counters

    counters.clear()


def example_value(node: fx.Node) -> torch.Tensor | None:
    """The fake tensor Dynamo (or our own propagation) recorded for a node, if any."""
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def inductor_compile(gm: fx.GraphModule, example_inputs: list[Any]) -> Any:
    """Compile a lowered graph with Inductor (what ``inner="inductor"`` runs): returns a callable
    taking the graph's placeholders."""
    from torch._inductor.compile_fx import compile_fx

    with torch.no_grad():
        return compile_fx(gm, list(example_inputs))


def forget_compiled(fn: Any) -> None:
    """Drop Dynamo's cache entries on ``fn``'s code (and the code of the functions it wraps).

    ``compress`` captures through ``torch.compile`` once per call, each time with a new backend;
    the entries stay on the shared code object of the model class's ``forward`` (Hugging Face
    wraps every forward in one decorator, so even one code object for all models), and after
    eight ``compress`` calls Dynamo's recompile limit would stop capturing altogether. Other
    compiled models of the same class recompile once on their next call.
    """
    seen = set()
    while fn is not None and id(fn) not in seen:
        seen.add(id(fn))
        code = getattr(getattr(fn, "__func__", fn), "__code__", None)
        if code is not None:
            torch._dynamo.reset_code(code)
        fn = getattr(fn, "__wrapped__", None)
