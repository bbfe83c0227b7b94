"""The ``torch.compile`` backend: ``torch.compile(model, backend="lowbit", options={...})``.

Registered through the ``torch_dynamo_backends`` entry point, so it works without importing
``lowbit_compiler``. The whole backend, top to bottom::

    capture -> run_pipeline(recipe) -> lower(target) -> dump -> callable

When options are checked: ``backend=lowbit_compiler.backend(**options)`` checks them (and the
recipe) right there, inside the ``torch.compile(...)`` / ``model.compile(...)`` call. With
``backend="lowbit", options={...}`` torch hands the options to the backend only when Dynamo
compiles the first graph (at the first forward): a bad option, or anything else that stops a graph
from compiling, then raises a :class:`LowbitError` of ours from that forward (not Dynamo's
``BackendCompilerFailed`` wrapper), and the dump's summary.json records the error.

Options (all optional):

    recipe             preset name ("none", "w8a16", "w4a16"), a .toml path, or a Recipe
    target             "auto" (default) | "cpu" | "triton"
    dump_dir           where to write dumps (default: $LOWBIT_DUMP_DIR, else no dumps)
    strict             raise on any fallback instead of logging it (default False)
    debug              lint + verify the IR after every pass (implied by strict)
    inner              what runs the non-lowbit ops: "eager" (default) | "inductor" (fuses the rest of
                       the graph -- attention glue, RoPE, casts -- at a compile cost of seconds per
                       graph; on CPU it needs a C++ compiler)
    autotune           time candidate tilings per kernel on the GPU (default False; off on CPU and
                       under the interpreter, with the reason logged)
    calibration        data for the recipe's data-driven passes (gptq, awq, smoothquant, mixed
                       precision, static activation scales, learned rotations): token-id tensors or
                       dicts of model inputs, as ``compress(..., calibration=)`` takes; they run on the
                       graph whose inputs have the batches' shapes (call the compiled model first with
                       one of them), and the later graphs (decode) reuse the results
    progress           show the calibration progress bar (default True)
    cpu_compute_dtype  "bfloat16" (default: fp32 activations are cast at the linear's boundary,
                       which is what makes the packed kernels fast) | "activation"
    cuda_graphs        capture each compiled graph into a CUDA graph per input signature and replay
                       it (default False; decode is launch-bound at small sizes): see
                       backends/cuda_graphs.py. Needs a CUDA device (refused with the reason
                       otherwise; strict raises); use fixed shapes per step (a static KV cache)
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Sequence

import torch
import torch.fx as fx

import lowbit_compiler.ops  # noqa: F401  (registers lowbit:: ops before any graph uses them)
from lowbit_compiler import _dynamo_adapter, ir, kv, memory, opdecl
from lowbit_compiler.calibration import as_batches, for_graph
from lowbit_compiler.capture import capture
from lowbit_compiler.formats import WeightFormat
from lowbit_compiler.dump import DumpRun, resolve_dump_dir
from lowbit_compiler.pass_base import LowbitError, PassContext, record_fallback
from lowbit_compiler.pipeline import run_pipeline
from lowbit_compiler.recipe import Recipe, get_recipe
from lowbit_compiler.backends import cpu_kernels
from lowbit_compiler.backends.lowering import TARGETS, codegen_totals, lower, resolve_target

log = logging.getLogger("lowbit_compiler")

INNER = ("eager", "inductor")

# Process-wide statistics: backend calls (one per graph Dynamo compiles), graphs lowered.
stats: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    recipe: Recipe
    target: str = "auto"
    dump_dir: str | None = None
    strict: bool = False
    debug: bool = False
    inner: str = "eager"
    autotune: bool = False
    cpu_compute_dtype: str = "bfloat16"
    calibration: Any = None
    progress: bool = True
    cuda_graphs: bool = False
    # the run's dump folder (one per BackendOptions, i.e. per torch.compile call): made from dump_dir
    run: DumpRun = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.run is None:
            info = {"recipe": self.recipe.name, "options": {
                f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("recipe", "calibration", "run")},
                "calibration_batches": len(self.calibration or ())}
            object.__setattr__(self, "run", DumpRun(self.dump_dir, self.recipe.name, info))

    @staticmethod
    def from_dict(options: dict[str, Any] | None) -> "BackendOptions":
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(BackendOptions)} - {"run"}
        unknown = set(options) - known
        if unknown:
            raise LowbitError(f"backend='lowbit': unknown options {sorted(unknown)}; known options: {sorted(known)}")
        options["recipe"] = get_recipe(options.get("recipe"))
        options["calibration"] = as_batches(options.get("calibration")) or None
        options["dump_dir"] = resolve_dump_dir(options.get("dump_dir"))
        if options.get("target", "auto") not in TARGETS:
            raise LowbitError(f"backend='lowbit': target={options['target']!r}; expected one of {TARGETS}")
        if options.get("inner", "eager") not in INNER:
            raise LowbitError(f"backend='lowbit': inner={options['inner']!r}; expected one of {INNER}")
        if options.get("cpu_compute_dtype", "bfloat16") not in cpu_kernels.COMPUTE_DTYPES:
            raise LowbitError(f"backend='lowbit': cpu_compute_dtype must be one of {sorted(cpu_kernels.COMPUTE_DTYPES)}")
        return BackendOptions(**options)


ENCODER_OUTSIDE = (
    "this graph takes encoder_outputs: the encoder ran outside it (generate() calls model.get_encoder() "
    "directly, which model.compile / torch.compile(model) does not cover), so the encoder's linears are not "
    "compiled here; compile the encoder with the same backend too: lowbit_compiler.compile(model, recipe=...) "
    "does both, or b = lowbit_compiler.backend(...); model.compile(backend=b); model.get_encoder().compile(backend=b)")


def compile_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], opts: BackendOptions,
                  module_state: dict[int, tuple[str, bool]] | None = None):
    """Capture, rewrite and lower one Dynamo graph; returns the callable and the summary.

    If anything raises, the graph's summary.json records the error and the stage it was raised in
    (``lowbit inspect`` shows it), and the exception propagates."""
    dump = opts.run.graph()
    summary: dict[str, Any] = {"graph": dump.name, "recipe": opts.recipe.to_dict()}
    passes = list(opts.recipe.passes)
    where = ["capture"]  # the stage being worked on (what a failure names)
    done: list[str] = []  # the passes that finished

    def on_stage(name: str, gm_: fx.GraphModule) -> None:
        dump.stage(name, gm_)
        done.append(name)
        where[0] = f"pass {passes[len(done)]!r}" if len(done) < len(passes) else "coverage (after the passes)"

    try:
        if resolve_target(opts.target) == "cpu":  # gcc runs beside the capture and the quantization
            cpu_kernels.prebuild([opts.recipe.weight.key] if opts.recipe.weight is not None else [],
                                 attention=_has_attention(gm))
        kv_status = None  # the compressed KV cache on the compiled module (not for a graph compiled again)
        if module_state is None:
            where[0] = "KV cache (installing the compressed cache on the compiled module)"
            kv_status = kv.install_for_compiled_graph(gm, example_inputs, opts.recipe, opts.strict, opts.calibration)
            where[0] = "capture"
        captured = capture(gm, example_inputs, module_state)
        ir_gm = captured.gm
        dump.stage("captured", ir_gm)
        summary.update(inputs=len(captured.kept_inputs), frozen_parameters=len(captured.frozen))
        if opts.run.graphs == 1 and any(n.op == "placeholder" and _dynamo_adapter.reads_argument(n, "encoder_outputs")
                                        for n in gm.graph.nodes):  # the first graph of its run: no encoder graph before
            summary["notes"] = [ENCODER_OUTSIDE]
        where[0] = "calibration (matching the batches to the graph's inputs)"
        calibration = (for_graph(ir_gm, opts.calibration, opts.progress, captured.call_args(example_inputs))
                       if opts.calibration else None)
        where[0] = f"pass {passes[0]!r}" if passes else "coverage"
        ctx = PassContext(recipe=opts.recipe, strict=opts.strict, calibration=calibration)
        report = run_pipeline(ir_gm, opts.recipe, debug=opts.debug, on_stage=on_stage, ctx=ctx)
        if kv_status not in (None, kv.INSTALLED) and any(ir.get(n, ir.KV_CACHE) is not None
                                                         for n in ir_gm.graph.nodes):
            ctx.fallback("mark_kv_cache", f"KV cache: the compiled graph keeps the model's own float cache "
                         f"({kv_status}); compress the model first: lowbit_compiler.compress(model, recipe).compile("
                         "backend='lowbit') runs with the compressed cache and its attention")
        layers = {**_prequantized_layers(ir_gm), **report.layers}
        summary.update(passes=[dataclasses.asdict(p) for p in report.passes], layers=layers,
                       coverage=report.coverage, fallbacks=dict(ctx.fallbacks))
        where[0] = f"lowering (target {opts.target!r})"
        lowering = lower(ir_gm, ctx, opts.target, opts.cpu_compute_dtype, dump, opts.inner, opts.autotune)
        memory.release_freed()  # packing's temporaries
        memory.release_mmap_threshold()  # quantizing and packing are over: large blocks come from the heap again
        dump.stage("lowered", ir_gm)
        run = ir_gm
        if opts.inner == "inductor":
            where[0] = "Inductor (inner='inductor')"
            run = _dynamo_adapter.inductor_compile(ir_gm, captured.call_args(example_inputs))
    except Exception as error:
        memory.release_mmap_threshold()
        if not _dynamo_adapter.is_restart(error):  # the KV cache was installed: Dynamo traces again
            dump.failure(error, where[0], {**summary, "passes_done": done})
        raise
    summary.update({
        "target": lowering.target,
        "kernels": lowering.kernels,
        "kernel_counts": lowering.counts,
        "cpu_fusions": lowering.fusions,
        "implementations": lowering.implementations,
        "generated_kernels": lowering.generated,
        "codegen": codegen_totals(lowering.generated),
        "fallbacks": dict(ctx.fallbacks),
    })
    summary = {k: summary[k] for k in _SUMMARY_ORDER if k in summary} | summary
    dump.summary(summary)

    return LowbitCompiled(gm, opts, captured, summary, run), summary


def _has_attention(gm: fx.GraphModule) -> bool:
    """Whether the graph calls scaled_dot_product_attention (a decode graph's attention then runs
    the generated decode attention kernel)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return any(n.op == "call_function" and n.target in (sdpa, torch.ops.aten.scaled_dot_product_attention.default)
               for n in gm.graph.nodes)


_SUMMARY_ORDER = ("graph", "recipe", "target", "inputs", "frozen_parameters", "passes", "layers", "coverage",
                  "kernels", "kernel_counts", "cpu_fusions", "implementations", "generated_kernels", "codegen", "fallbacks")


class LowbitCompiled:
    """The callable handed back to Dynamo: runs the lowered graph on Dynamo's non-frozen arguments.

    If a frozen parameter was replaced or edited in place since compilation (Dynamo does not guard
    on parameters it passes as inputs), the graph is compiled again from Dynamo's original graph
    with the current tensors, rather than computing with stale weights.
    """

    MAX_VARIANTS = 256  # parameter sets kept per Dynamo graph (the layers of the largest models)

    def __init__(self, dynamo_gm: fx.GraphModule, opts: BackendOptions, captured, summary: dict[str, Any],
                 run: Any):
        self.dynamo_gm, self.opts = dynamo_gm, opts
        self.captured, self.lowbit_summary, self.run = captured, summary, _with_cuda_graphs(run, opts)
        # one compiled variant per set of parameter objects: Dynamo reuses one graph for several
        # modules when their forward's code is shared (a decoder layer's resume function after a
        # graph break in its attention, e.g. the compressed KV cache's: every layer calls the same
        # graph with its own parameters), which must not recompile on every call
        self._variants: collections.OrderedDict = collections.OrderedDict()
        self._variants[self._key(captured)] = (captured, summary, self.run)

    @staticmethod
    def _key(captured) -> tuple[int, ...]:
        return (tuple(id(param) for _, _, param, _ in captured.frozen_parameters)
                + tuple(id(buffer) for _, _, buffer in captured.frozen_buffers))

    @property
    def lowbit_graph(self) -> fx.GraphModule:
        return self.captured.gm

    def __call__(self, *args: Any) -> Any:
        if self.captured.stale_parameter(args) is not None:
            self._switch(args)
        return self.run(*self.captured.call_args(args))

    def _switch(self, args: Sequence[Any]) -> None:
        """The variant compiled for these parameters, else a new one (the parameters are another
        module's, or were replaced or edited in place since compilation: compiled again rather than
        computed with stale weights)."""
        for key, variant in self._variants.items():
            if variant[0].stale_parameter(args) is None:
                self._variants.move_to_end(key)
                self.captured, self.lowbit_summary, self.run = variant
                return
        stale = self.captured.stale_parameter(args)
        edited = all(args[i] is param for i, _, param, _ in self.captured.frozen_parameters)
        (log.warning if edited else log.info)(
            "lowbit: graph %s called with %s parameter %s; compiling it for them",
            self.lowbit_summary.get("graph") or "(no dump)", "an edited" if edited else "another module's (or a replaced)",
            stale)
        stats["refreezes"] += 1
        fresh, _ = compile_graph(self.dynamo_gm, args, self.opts, self.captured.module_state)
        self.captured, self.lowbit_summary, self.run = fresh.captured, fresh.lowbit_summary, fresh.run
        key = self._key(fresh.captured)
        self._variants.pop(key, None)  # the same parameters edited in place: the old variant is stale
        self._variants[key] = (self.captured, self.lowbit_summary, self.run)
        while len(self._variants) > self.MAX_VARIANTS:
            self._variants.popitem(last=False)


def _with_cuda_graphs(run: Any, opts: BackendOptions) -> Any:
    """``run`` replayed through CUDA graphs when ``cuda_graphs=True`` and a CUDA device exists;
    otherwise ``run``, with the reason logged (strict mode raises)."""
    if not opts.cuda_graphs:
        return run
    from lowbit_compiler.backends import cuda_graphs

    reason = cuda_graphs.unavailable_reason()
    if reason is None:
        return cuda_graphs.GraphRunner(run)
    if opts.strict:
        raise LowbitError(f"backend='lowbit': {reason} (strict)")
    log.warning("lowbit: %s", reason)
    stats["cuda_graphs_refused"] += 1
    return run


def _prequantized_layers(gm: fx.GraphModule) -> dict[str, dict[str, Any]]:
    """Layer records for lowbit ops that arrived already quantized (a compress()ed model)."""
    layers = {}
    for node in gm.graph.nodes:
        if opdecl.is_module(node, opdecl.LINEAR) and ir.get(node, ir.WEIGHT_QUANT) is None:
            args = ir.op_args(node)
            fmt, in_features = args["fmt"], args["in_features"]
            n = ir.fetch_attr(gm, args["scale"].target).shape[0]
            f = WeightFormat.parse(fmt)
            module = ir.get(node, ir.MODULE)
            layers[module.fqn if module else node.name] = {
                "format": fmt, "in_features": in_features, "out_features": n,
                "bytes_after": f.storage_bytes(n, in_features), "bits_per_weight": f.bits_per_weight(n, in_features),
                "source": "already quantized in the model (compress)"}
        elif opdecl.is_module(node, opdecl.EXPERTS) and ir.get(node, ir.WEIGHT_QUANT) is None:
            args = ir.op_args(node)  # a LowbitExperts: <experts>.<projection>_qweight
            fmt, in_features = args["fmt"], args["in_features"]
            experts, n = ir.fetch_attr(gm, args["scale"].target).shape[:2]
            f = WeightFormat.parse(fmt)
            layers[args["qweight"].target.removesuffix("_qweight")] = {
                "format": fmt, "in_features": in_features, "out_features": n, "experts": experts,
                "bytes_after": experts * f.storage_bytes(n, in_features),
                "bits_per_weight": f.bits_per_weight(n, in_features),
                "source": "already quantized in the model (compress)"}
    return layers


class LowbitBackend:
    """The backend for one ``torch.compile`` call, its options checked when it is made:
    ``torch.compile(model, backend=lowbit_compiler.backend(recipe="w4a16", dump_dir="dumps"))``
    raises a :class:`LowbitError` for a bad option or recipe inside that call. Every graph it
    compiles goes into the same run folder of the dump. A graph that fails to compile raises a
    :class:`LowbitError` of ours from the forward that triggered it (see :func:`lowbit_backend`)."""

    compiler_name = __name__ = "lowbit"

    def __init__(self, **options: Any):
        self.options = BackendOptions.from_dict(options)

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]):
        stats["backend_calls"] += 1
        opts = self.options
        try:
            compiled, summary = compile_graph(gm, example_inputs, opts)
        except Exception as error:
            if _dynamo_adapter.is_restart(error):
                raise
            return _raises(_ours(error, f"compiling a graph with recipe {opts.recipe.name!r}"))
        for note in summary.get("notes", ()):
            log.warning("lowbit: graph %s: %s", summary["graph"] or "(no dump)", note)
        quantized = sum(1 for v in summary["layers"].values() if v.get("format", "float") != "float")
        log.info("lowbit: graph %s compiled with recipe %r: %d layers quantized, kernels %s",
                 summary["graph"] or "(no dump)", opts.recipe.name, quantized, summary["kernel_counts"])
        stats["graphs_lowered"] += 1
        if quantized:
            _watch_recompile_limit()
        return compiled


RECOMPILE_LIMIT_REASON = "Dynamo's recompile limit: a compiled function now runs eagerly"


def _compiling_backend() -> tuple[bool, bool]:
    """(whether the backend of the Dynamo compile on this thread's stack is lowbit's, whether it is
    strict), from ``_dynamo_adapter.compiling_backend`` (torch.compile's wrapper holds our backend
    after its first graph, the name and options before); (True, False) when no compile is found
    (a torch that moved Dynamo's frame: report, do not guess strictness)."""
    fn = _dynamo_adapter.compiling_backend()
    if fn is None:
        return True, False
    backend = getattr(fn, "_lowbit_backend", fn)  # set on torch.compile's wrapper at its first graph
    if isinstance(backend, LowbitBackend):
        return True, backend.options.strict
    if getattr(fn, "compiler_fn", None) is lowbit_backend:  # no graph compiled yet for this call
        return True, bool((getattr(fn, "kwargs", {}).get("options") or {}).get("strict", False))
    return False, False


class _RecompileLimitReporter(logging.Handler):
    """Dynamo's recompile-limit warning, said again as a lowbit fallback. Past
    ``torch._dynamo.config.recompile_limit`` Dynamo stops compiling a function and runs it eagerly
    from then on; whatever it computes with the model's weights then uses the float weights (the
    quantized copies live in the compiled graphs only), which Dynamo reports only as a recompile
    warning. Attached to Dynamo's logger once a graph with quantized layers was compiled; functions
    compiled by other backends are left to Dynamo's own warning. With ``strict=True`` the hit
    raises :class:`LowbitError` instead, from the call that hit the limit, before anything runs
    eagerly (raised out of Dynamo's warning: a logging handler's exception reaches the caller)."""

    def emit(self, record: logging.LogRecord) -> None:
        if not str(record.msg).startswith("torch._dynamo hit config."):
            return
        ours, strict = _compiling_backend()
        if not ours:
            return
        args = record.args if isinstance(record.args, tuple) else ()
        limit, value, function = args[:3] if len(args) >= 3 else ("recompile_limit", "?", "?")
        stats["recompile_limit_hits"] += 1
        what = (f"{RECOMPILE_LIMIT_REASON}: Dynamo hit config.{limit} ({value}) at {function} and runs it eagerly "
                "from now on: the weights it reads are the model's float weights, not the quantized ones. Raise "
                "torch._dynamo.config.recompile_limit, or compress(model, recipe) first (the eager path is then "
                "quantized too)")
        if strict:
            raise LowbitError(f"backend='lowbit' (strict=True): {what}")
        record_fallback(RECOMPILE_LIMIT_REASON)
        log.warning("lowbit fallback: %s", what)


_REPORTER = _RecompileLimitReporter()


def _watch_recompile_limit() -> None:
    dynamo_log = logging.getLogger("torch._dynamo.convert_frame")
    if _REPORTER not in dynamo_log.handlers:
        dynamo_log.addHandler(_REPORTER)


def _ours(error: BaseException, doing: str) -> LowbitError:
    """``error`` as a LowbitError whose first line says what failed (a LowbitError is kept)."""
    if isinstance(error, LowbitError):
        return error
    wrapped = LowbitError(f"backend='lowbit' failed {doing}: {type(error).__name__}: {error}")
    wrapped.__cause__ = error
    return wrapped


class _raises:
    """What Dynamo gets back for a graph that could not be compiled: a callable that raises the
    error, so the forward that triggered the compile raises it as itself. (Raised inside the
    backend, Dynamo would wrap it in ``BackendCompilerFailed`` under its own first line.)"""

    def __init__(self, error: LowbitError):
        self.error = error

    def __call__(self, *args: Any) -> Any:
        raise self.error


def _dump_option_error(options: dict[str, Any] | None, error: LowbitError) -> None:
    """Options that do not validate still leave a trace in the dump (when ``dump_dir`` itself is
    usable): a run folder whose graph summary holds the error, for ``lowbit inspect``."""
    try:
        root = resolve_dump_dir((options or {}).get("dump_dir"))
    except TypeError:
        return
    if root is None:
        return
    recipe = (options or {}).get("recipe")
    name = recipe if isinstance(recipe, str) else getattr(recipe, "name", "none" if recipe is None else "?")
    shown = {k: v for k, v in (options or {}).items() if k != "calibration"}
    run = DumpRun(root, f"{name}-bad-options", {"recipe": name, "options": shown})
    run.graph().failure(error, "checking the options (before capture)", {"recipe": {"name": name}})


def lowbit_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any] | None = None):
    """Dynamo backend entry point (``backend="lowbit"``). The options arrive here, at the first
    graph; one :class:`LowbitBackend` serves all graphs of one ``torch.compile`` call (one run
    folder in the dump)."""
    call = _dynamo_adapter.torch_compile_call()
    backend = getattr(call, "_lowbit_backend", None)
    if backend is None:
        try:
            backend = LowbitBackend(**(options or {}))
        except Exception as error:
            stats["backend_calls"] += 1
            error = _ours(error, "checking its options")
            _dump_option_error(options, error)
            return _raises(error)
        if call is not None:
            call._lowbit_backend = backend
    return backend(gm, example_inputs)
