"""The ``torch.compile`` backend: ``torch.compile(model, backend="lowbit", options={...})``.

Registered through the ``torch_dynamo_backends`` entry point, so it works without importing
``lowbit_compiler``. The whole backend, top to bottom::

    capture -> run_pipeline(recipe) -> lower(target) -> dump -> callable

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
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Sequence

import torch
import torch.fx as fx

import lowbit_compiler.ops  # noqa: F401  (registers lowbit:: ops before any graph uses them)
from lowbit_compiler import _dynamo_adapter, ir, opdecl
from lowbit_compiler.calibration import as_batches, for_graph
from lowbit_compiler.capture import capture
from lowbit_compiler.formats import WeightFormat
from lowbit_compiler.dump import DumpWriter, resolve_dump_dir
from lowbit_compiler.pass_base import LowbitError, PassContext
from lowbit_compiler.pipeline import run_pipeline
from lowbit_compiler.recipe import Recipe, get_recipe
from lowbit_compiler.backends import cpu_kernels
from lowbit_compiler.backends.lowering import TARGETS, codegen_totals, lower

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

    @staticmethod
    def from_dict(options: dict[str, Any] | None) -> "BackendOptions":
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(BackendOptions)}
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


def compile_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], opts: BackendOptions,
                  module_state: dict[int, tuple[str, bool]] | None = None):
    """Capture, rewrite and lower one Dynamo graph; returns the callable and the summary."""
    dump = DumpWriter(opts.dump_dir)
    captured = capture(gm, example_inputs, module_state)
    ir_gm = captured.gm
    dump.stage("captured", ir_gm)
    calibration = (for_graph(ir_gm, opts.calibration, opts.progress, captured.call_args(example_inputs))
                   if opts.calibration else None)
    ctx = PassContext(recipe=opts.recipe, strict=opts.strict, calibration=calibration)
    report = run_pipeline(ir_gm, opts.recipe, debug=opts.debug, on_stage=dump.stage, ctx=ctx)
    layers = {**_prequantized_layers(ir_gm), **report.layers}
    lowering = lower(ir_gm, ctx, opts.target, opts.cpu_compute_dtype, dump, opts.inner, opts.autotune)
    dump.stage("lowered", ir_gm)
    run = ir_gm
    if opts.inner == "inductor":
        run = _dynamo_adapter.inductor_compile(ir_gm, captured.call_args(example_inputs))
    summary = {
        "graph": dump.name,
        "recipe": opts.recipe.to_dict(),
        "target": lowering.target,
        "inputs": len(captured.kept_inputs),
        "frozen_parameters": len(captured.frozen),
        "passes": [dataclasses.asdict(p) for p in report.passes],
        "layers": layers,
        "coverage": report.coverage,
        "kernels": lowering.kernels,
        "kernel_counts": lowering.counts,
        "generated_kernels": lowering.generated,
        "codegen": codegen_totals(lowering.generated),
        "fallbacks": dict(ctx.fallbacks),
    }
    dump.summary(summary)

    return LowbitCompiled(gm, opts, captured, summary, run), summary


class LowbitCompiled:
    """The callable handed back to Dynamo: runs the lowered graph on Dynamo's non-frozen arguments.

    If a frozen parameter was replaced or edited in place since compilation (Dynamo does not guard
    on parameters it passes as inputs), the graph is compiled again from Dynamo's original graph
    with the current tensors, rather than computing with stale weights.
    """

    def __init__(self, dynamo_gm: fx.GraphModule, opts: BackendOptions, captured, summary: dict[str, Any],
                 run: Any):
        self.dynamo_gm, self.opts = dynamo_gm, opts
        self.captured, self.lowbit_summary, self.run = captured, summary, run

    @property
    def lowbit_graph(self) -> fx.GraphModule:
        return self.captured.gm

    def __call__(self, *args: Any) -> Any:
        stale = self.captured.stale_parameter(args)
        if stale is not None:
            log.warning("lowbit: parameter %s changed since compilation; compiling the graph again", stale)
            stats["refreezes"] += 1
            fresh, _ = compile_graph(self.dynamo_gm, args, self.opts, self.captured.module_state)
            self.captured, self.lowbit_summary, self.run = fresh.captured, fresh.lowbit_summary, fresh.run
        return self.run(*self.captured.call_args(args))


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


def lowbit_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any] | None = None):
    """Dynamo backend entry point."""
    stats["backend_calls"] += 1
    opts = BackendOptions.from_dict(options)
    compiled, summary = compile_graph(gm, example_inputs, opts)
    quantized = sum(1 for v in summary["layers"].values() if v.get("format", "float") != "float")
    log.info("lowbit: graph %s compiled with recipe %r: %d layers quantized, kernels %s",
             summary["graph"] or "(no dump)", opts.recipe.name, quantized, summary["kernel_counts"])
    stats["graphs_lowered"] += 1
    return compiled
