"""The offline flow: ``compress(model, recipe)`` runs the same passes and writes their decisions back.

1. Capture the model's forward with Dynamo (on the first calibration batch, ``example_inputs``, or
   a short dummy prompt for Hugging Face models) and run the recipe's pipeline on each graph.
2. For every ``lowbit::wo_linear`` the pipeline produced, replace the module that owned the float
   weight (``nn.Linear``, or GPT-2's ``Conv1D``) by a :class:`LowbitLinear` holding the very
   quantized tensors the pass made. The float weight is released, so memory really shrinks.

The model keeps its class, ``generate()`` works, ``state_dict()`` holds the quantized buffers, and
compiling it with ``backend="lowbit"`` lowers its ``lowbit::`` ops directly: ``insert_weight_quant``
only rewrites float ``F.linear`` nodes, so nothing is quantized twice.

Calibration (``calibration=``: token-id tensors, dicts of model inputs, an iterable/DataLoader of
either, or strings with ``tokenizer=``): when the recipe's rounding needs data (GPTQ), step 0 runs
``lowbit_compiler.calibration.calibrate`` block by block; each block's linears are quantized while
their Hessians are in memory, the block's outputs are recomputed with the quantized weights (so the
next block sees the error), and the results reach ``insert_weight_quant`` through
``PassContext.quantized``. Data-free recipes use the first batch only as the capture input.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.fx as fx

from lowbit_compiler import _dynamo_adapter, hadamard, ir, rounding, scale_folding
from lowbit_compiler.calibration import as_batches, calibrate, weight_of
from lowbit_compiler.capture import capture
from lowbit_compiler.formats import QuantizedWeight, WeightFormat, check_layer, dequantize, quantize
from lowbit_compiler.pass_base import LowbitError, PassContext
from lowbit_compiler.pipeline import run_pipeline
from lowbit_compiler.recipe import ACTIVATIONS, Recipe, get_recipe
from lowbit_compiler.rotation import ROTATION_PASSES

log = logging.getLogger("lowbit_compiler")


class LowbitLinear(torch.nn.Module):
    """A linear layer with quantized storage; calls ``lowbit::wo_linear`` (weight-only) or
    ``lowbit::qa_linear`` (activations quantized too: ``act`` = "int8" or "fp8_e4m3")."""

    def __init__(self, fmt: str, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 bias: torch.Tensor | None, in_features: int, act: str | None = None,
                 outliers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 x_scale: torch.Tensor | None = None, input_hadamard: bool = False,
                 input_transform: tuple[torch.Tensor, torch.Tensor] | None = None,
                 input_signs: torch.Tensor | None = None):
        super().__init__()
        self.fmt, self.act = fmt, act
        self.input_hadamard = input_hadamard  # R4: lowbit::hadamard on the input (the weight absorbed D H)
        self.register_buffer("input_signs", input_signs)  # R4's D when applied online (else None)
        # FlatQuant: lowbit::kron_transform(x, P1, P2) after the Hadamard (the weight absorbed its inverse)
        left, right = input_transform or (None, None)
        self.register_buffer("transform_left", left)
        self.register_buffer("transform_right", right)
        self.register_buffer("x_scale", x_scale)  # static activation scale (None: per token at run time)
        for name, t in zip(("outlier_rows", "outlier_cols", "outlier_values"), outliers or (None,) * 3):
            self.register_buffer(name, t)  # SpQR-style fp16 outliers, added by lowbit::sparse_linear
        self.in_features = in_features
        self.out_features = scale.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_hadamard:
            x = r4_input(x, self.input_signs)
        if self.transform_left is not None:
            x = torch.ops.lowbit.kron_transform(x, self.transform_left, self.transform_right)
        if self.act:
            return torch.ops.lowbit.qa_linear(x, self.qweight, self.scale, self.zero, self.bias, self.fmt,
                                              self.in_features, self.act, self.x_scale)
        y = torch.ops.lowbit.wo_linear(x, self.qweight, self.scale, self.zero, self.bias, self.fmt,
                                       self.in_features)
        if self.outlier_values is not None:
            y = y + torch.ops.lowbit.sparse_linear(x, self.outlier_rows, self.outlier_cols, self.outlier_values,
                                                   self.out_features)
        return y

    def extra_repr(self) -> str:
        act = f", act={self.act}" if self.act else ""
        rot = ", input_hadamard=True" if self.input_hadamard else ""
        if self.transform_left is not None:
            rot += f", input_transform={self.transform_left.shape[0]}x{self.transform_right.shape[0]}"
        return f"{self.fmt}{act}{rot}, in_features={self.in_features}, out_features={self.out_features}"


class FoldedRMSNorm(torch.nn.Module):
    """A norm whose scale (and LayerNorm's bias) was folded into the linears it feeds, and whose
    input stream was rotated: ``rms_norm`` without parameters, in float32 at least (as HF norms)."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = torch.promote_types(x.dtype, torch.float32)
        return torch.nn.functional.rms_norm(x.to(compute), (x.shape[-1],), None, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, folded"


def r4_input(x: torch.Tensor, signs: torch.Tensor | None) -> torch.Tensor:
    """R4 on a down projection's input: ``(x D) H`` (``D`` None when folded into ``up``)."""
    return torch.ops.lowbit.hadamard(x if signs is None else x * signs)


def _hadamard_pre_hook(module: torch.nn.Module, args: tuple) -> tuple:
    return (r4_input(args[0], getattr(module, "lowbit_input_signs", None)), *args[1:])


def _example_kwargs(model: torch.nn.Module, batches: list[dict[str, Any]], example_inputs: Any) -> dict[str, Any]:
    if example_inputs is not None:
        return example_inputs if isinstance(example_inputs, dict) else {"input_ids": example_inputs}
    if batches:
        return dict(batches[0])
    if getattr(getattr(model, "config", None), "vocab_size", None):
        return {"input_ids": torch.zeros(1, 8, dtype=torch.long)}
    raise LowbitError("compress: cannot build an input for this model; pass example_inputs=tensor or dict")


def _capture_each(model: torch.nn.Module, kwargs: dict[str, Any],
                  handle: Callable[[fx.GraphModule, tuple[Any, ...]], None]) -> None:
    """Capture the model's forward once (eval mode, no grad) and hand each captured graph to
    ``handle(gm, args)``, ``args`` the graph's arguments for this call; Dynamo's cache entries are
    dropped afterwards (see ``forget_compiled``)."""
    graphs = 0

    def backend(gm: fx.GraphModule, example: list[Any]):
        nonlocal graphs
        graphs += 1
        captured = capture(gm, example)
        handle(captured.gm, tuple(captured.call_args(example)))
        return gm.forward

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            torch.compile(model, backend=backend, dynamic=False)(**kwargs)
    finally:
        _dynamo_adapter.forget_compiled(model.forward)
        model.train(was_training)
    if not graphs:
        raise LowbitError("compress: Dynamo did not hand the forward to the capture (a cached graph or the "
                          "recompile limit); call torch.compiler.reset() and retry")


def _weight_owner(model: torch.nn.Module, layer: str) -> tuple[torch.nn.Module, str]:
    parent_name, _, child = layer.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def compress(model: torch.nn.Module, recipe: Any, calibration: Any = None, example_inputs: Any = None,
             strict: bool = False, tokenizer: Any = None, progress: bool = True) -> torch.nn.Module:
    """Apply ``recipe`` to ``model`` in place and return it; ``model.lowbit_summary`` says what changed."""
    recipe = get_recipe(recipe)
    batches = as_batches(calibration, tokenizer)
    kwargs = _example_kwargs(model, batches, example_inputs)
    rotation_info = None
    if set(recipe.passes) & set(ROTATION_PASSES):  # rotate the float model first: calibration sees it rotated
        rotation_info = _rotate(model, recipe, kwargs, strict, batches)
        recipe = recipe.replace(passes=tuple(p for p in recipe.passes if p not in ROTATION_PASSES))
    precomputed, calibration_info = _calibrate(model, recipe, batches, progress)
    activation_scales = _static_activation_scales(model, recipe, batches, progress)
    formats = {layer: WeightFormat.parse(d["format"]) for layer, d in (calibration_info or {}).get("mixed", {}).items()}
    decisions: dict[str, tuple[fx.GraphModule, fx.Node]] = {}
    layers: dict[str, dict[str, Any]] = {}
    passes: list[dict[str, Any]] = []

    def rewrite(gm: fx.GraphModule, args: tuple[Any, ...]) -> None:
        ctx = PassContext(recipe=recipe, strict=strict, quantized=precomputed, calibrated=calibration_info is not None,
                          formats=formats, activation_scales=activation_scales,
                          inputs=_graph_inputs(args, kwargs, batches))
        report = run_pipeline(gm, recipe, ctx=ctx)
        passes.extend({"name": p.name, "matches": p.matches, "details": p.details} for p in report.passes)
        layers.update(report.layers)
        for node in gm.graph.nodes:
            decision = ir.get(node, ir.WEIGHT_QUANT)
            if decision is not None and node.target in (torch.ops.lowbit.wo_linear.default,
                                                        torch.ops.lowbit.qa_linear.default):
                decisions[decision.layer] = (gm, node)

    _capture_each(model, kwargs, rewrite)

    replaced = 0
    for layer, (gm, node) in decisions.items():
        parent, child = _weight_owner(model, layer)
        old = getattr(parent, child)
        _, qweight, scale, zero, bias, fmt, in_features, *act = node.args  # qa_linear: + act, x_scale
        act, x_scale = (act + [None, None])[:2]
        tensors = [None if a is None else ir.fetch_attr(gm, a.target) for a in (qweight, scale, zero)]
        bias_tensor = None if bias is None else getattr(old, "bias", None)
        outliers = None
        if ir.get(node, ir.WEIGHT_QUANT).outliers:
            outliers = tuple(ir.fetch_attr(gm, f"{layer}.outlier_{part}") for part in ("rows", "cols", "values"))
        transform = None
        x = node.args[0]
        if isinstance(x, fx.Node) and x.target is torch.ops.lowbit.kron_transform.default:
            transform = tuple(ir.fetch_attr(gm, t.target) for t in x.args[1:3])
        setattr(parent, child, LowbitLinear(fmt, *tensors, bias_tensor, in_features, act, outliers,
                                            None if x_scale is None else ir.fetch_attr(gm, x_scale.target),
                                            input_hadamard=getattr(old, "lowbit_input_hadamard", False),
                                            input_transform=transform,
                                            input_signs=getattr(old, "lowbit_input_signs", None)))
        replaced += 1
    if replaced == 0 and rotation_info is None:
        log.warning("compress(%s): nothing was quantized (no selected linear layers)", recipe.name)
    model.lowbit_summary = {"recipe": recipe.to_dict(), "replaced_modules": replaced, "layers": layers,
                            "passes": passes, "calibration": calibration_info, "rotation": rotation_info}
    return model


def _rotate(model: torch.nn.Module, recipe: Recipe, kwargs: dict[str, Any], strict: bool,
            batches: list[dict[str, Any]] = ()) -> dict[str, Any]:
    """Run canonicalize + the rotation pass on the captured graph and write what it changed into
    the model: the new tensors (rotated, norm-folded, centred), parameter-free norms, untied heads,
    a ``lowbit::hadamard`` pre-hook on every R4 layer, and R3 through the attention implementation
    (:func:`_attention_r3`). A learned rotation
    (``spinquant``) trains on the calibration batches that have the captured batch's shapes."""
    name = next(p for p in recipe.passes if p in ROTATION_PASSES)
    options = dict(recipe.pass_options(name))
    r3 = options.pop("r3", False)
    analysis_recipe = recipe.replace(name=f"{recipe.name}:{name}", passes=("canonicalize", name),
                                     options=((name, tuple(options.items())),))
    found: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def rotate(gm: fx.GraphModule, args: tuple[Any, ...]) -> None:
        ctx = PassContext(recipe=analysis_recipe, strict=strict, inputs=_graph_inputs(args, kwargs, batches))
        report = run_pipeline(gm, analysis_recipe, ctx=ctx)
        found.append((ctx.rotation, next(p.details for p in report.passes if p.name == name)))

    _capture_each(model, kwargs, rotate)
    if len(found) != 1:
        raise LowbitError(f"compress({recipe.name}): rotations need the whole forward in one graph; Dynamo "
                          f"captured {len(found)} (graph breaks)")
    change, details = found[0]
    if not change:
        return details
    with torch.no_grad():
        for layer, fqn in change["untied"].items():
            module = model.get_submodule(layer)
            module.weight = torch.nn.Parameter(change["tensors"][fqn], requires_grad=False)
        for fqn, t in change["tensors"].items():
            if fqn in change["untied"].values():
                continue
            owner_name, _, attr = fqn.rpartition(".")
            owner = model.get_submodule(owner_name)
            current = getattr(owner, attr, None)
            if current is None:  # a bias the folding created (a LayerNorm bias into a bias-free reader)
                setattr(owner, attr, torch.nn.Parameter(t, requires_grad=False))
            else:
                current.data = t
        for fqn, eps in change["norms"]:
            module = model.get_submodule(fqn) if fqn else None
            if module is None or list(module.children()) or "norm" not in type(module).__name__.lower():
                raise LowbitError(f"compress({recipe.name}): a folded norm was computed inside {fqn or 'the model'} "
                                  f"({type(module).__name__}), not by a norm module that can be replaced; use "
                                  "torch.compile(backend='lowbit') for this model's rotations")
            parent, child = _weight_owner(model, fqn)
            setattr(parent, child, FoldedRMSNorm(eps))
        for layer in change["hadamard_before"]:
            module = model.get_submodule(layer)
            module.lowbit_input_hadamard = True
            signs = change.get("signs_before", {}).get(layer)
            if signs is not None:  # R4's random signs, where no gated linear could absorb them
                module.register_buffer("lowbit_input_signs", signs)
            module.register_forward_pre_hook(_hadamard_pre_hook)
    if r3:
        details = {**details, "R3": _attention_r3(model, strict)}
    return details


_R3_ATTENTIONS: dict[str, str] = {}  # attention implementation -> the registered R3 wrapper's name


def _attention_r3(model: torch.nn.Module, strict: bool) -> dict[str, Any]:
    """R3 in the eager model: ``lowbit::hadamard`` on queries and keys (after RoPE and the cache
    update, as the graph's R3 before SDPA) through a wrapper registered in Hugging Face's
    AttentionInterface around the model's own attention implementation."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    head_dim = getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads if config is not None and hasattr(config, "hidden_size") else None)
    reason = None
    if impl is None or impl not in ALL_ATTENTION_FUNCTIONS:
        reason = (f"R3: attention implementation {impl!r} is not in transformers' AttentionInterface (eager attention "
                  "is model-specific); load the model with attn_implementation='sdpa'")
    elif head_dim is None or (reason := hadamard.unsupported_reason(int(head_dim))) is not None:
        reason = f"R3: head size {head_dim}: {reason or 'unknown'}"
    if reason is not None:
        if strict:
            raise LowbitError(f"[strict] {reason}")
        log.warning("lowbit fallback: %s", reason)
        return {"applied": False, "reason": reason}
    if impl.startswith("lowbit_r3_"):
        return {"applied": True, "attention": impl, "head_dim": int(head_dim)}
    if impl not in _R3_ATTENTIONS:
        base = ALL_ATTENTION_FUNCTIONS[impl]

        def attention_r3(module, query, key, value, attention_mask, **kwargs):
            return base(module, torch.ops.lowbit.hadamard(query), torch.ops.lowbit.hadamard(key), value,
                        attention_mask, **kwargs)

        _R3_ATTENTIONS[impl] = f"lowbit_r3_{impl}"
        AttentionInterface.register(_R3_ATTENTIONS[impl], attention_r3)
    config._attn_implementation = _R3_ATTENTIONS[impl]
    return {"applied": True, "attention": _R3_ATTENTIONS[impl], "head_dim": int(head_dim)}


def _graph_inputs(args: tuple[Any, ...], kwargs: dict[str, Any], batches: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """The captured graph's arguments for every calibration batch with the captured shapes: each
    graph argument is found among the capture's keyword inputs (by identity) and taken from the
    batch under the same key. Batches of other shapes (the graph is specialised) are left out; no
    calibration data gives no inputs (a learned rotation then keeps its start and says so)."""
    if not batches:
        return []
    keys = []
    for arg in args:
        key = next((k for k, v in kwargs.items() if v is arg), None)
        if key is None:
            log.info("compress: graph input %s is not one of the model's inputs; data-driven passes see the capture "
                     "batch only", type(arg).__name__)
            return [args]
        keys.append(key)
    out = []
    for batch in batches:
        values = [batch.get(k) for k in keys]
        if all(isinstance(v, torch.Tensor) and v.shape == a.shape for v, a in zip(values, args)):
            out.append(tuple(values))
    if len(out) < len(batches):
        log.info("compress: %d of %d calibration batches have the captured shapes; data-driven passes see those",
                 len(out), len(batches))
    return out or [args]


def _calibrate(model: torch.nn.Module, recipe: Any, batches: list[dict[str, torch.Tensor]],
               progress: bool) -> tuple[dict[str, QuantizedWeight], dict[str, Any] | None]:
    """Data-driven rounding, block by block (see the module docstring); {} when data-free."""
    if recipe.smoothquant is not None:
        _require_data(recipe, batches, "uses SmoothQuant")
        return {}, _smooth(model, recipe, batches, progress)
    if recipe.mixed_bits is not None:
        _require_data(recipe, batches, "assigns formats by measured sensitivity")
        return {}, _mixed_precision(model, recipe, batches, progress)
    if recipe.rounding not in rounding.NEEDS_DATA or recipe.weight is None:
        return {}, None
    _require_data(recipe, batches, f"rounds with {recipe.rounding}")
    fmt, options = recipe.weight, recipe.pass_options("insert_weight_quant")
    gptq_options = {k: options[k] for k in ("block_size", "damp", "act_order") if k in options}
    quantized: dict[str, QuantizedWeight] = {}
    groups = _scale_groups(model, batches[0]) if recipe.rounding == "awq" else {}
    awq_report: dict[str, Any] = {}

    def on_block(stats):
        if recipe.rounding == "awq":
            for group in _groups_in(stats, groups):
                awq_report[group.consumers[0]] = _awq_fold(model, group, stats, fmt)
        fake = {}
        for layer, (module, observed) in stats.items():
            w = weight_of(module).detach()
            check_layer(fmt, w.shape[1], layer, recipe.pad_to_group)
            if recipe.rounding == "gptq":
                quantized[layer] = rounding.gptq(w, fmt, observed.gptq_hessian(), **gptq_options)
            else:
                quantized[layer] = quantize(w, fmt)
            fake[layer] = dequantize(quantized[layer])
        return fake

    info = calibrate(model, batches, recipe.applies_to, on_block, hessian=True, progress=progress)
    info["layers"] = len(quantized)
    if recipe.rounding == "awq":
        info["awq"] = awq_report
    log.info("compress(%s): calibrated %d layers in %.1f s on %d batches", recipe.name, len(quantized),
             info["seconds"], info["batches"])
    return quantized, info


def _static_activation_scales(model: torch.nn.Module, recipe: Any, batches: list[dict[str, torch.Tensor]],
                               progress: bool) -> dict[str, torch.Tensor]:
    """Per layer, one activation scale: the input's abs-max over the calibration data / the code
    range (measured after any smoothing, on the model as it will be quantized)."""
    if not (recipe.activation or "").endswith("_static"):
        return {}
    _require_data(recipe, batches, f"uses {recipe.activation} activations")
    from lowbit_compiler.ops import ACTIVATION_MAX

    top = ACTIVATION_MAX[ACTIVATIONS[recipe.activation][0]]
    scales: dict[str, torch.Tensor] = {}

    def on_block(stats):
        for layer, (_, observed) in stats.items():
            scales[layer] = (observed.absmax.max().clamp(min=1e-8) / top).reshape(1).float()

    calibrate(model, batches, recipe.applies_to, on_block, hessian=False, progress=progress)
    return scales


def _smooth(model: torch.nn.Module, recipe: Any, batches: list[dict[str, torch.Tensor]], progress: bool) -> dict[str, Any]:
    """SmoothQuant: per group, s_j = max|x_j|^a / max_i |W_ij|^(1-a), folded into the producer."""
    alpha = float(recipe.smoothquant)
    groups = _scale_groups(model, batches[0])
    report: dict[str, Any] = {}

    def on_block(stats):
        for group in _groups_in(stats, groups):
            if group.producer is None:
                report[group.consumers[0]] = {"consumers": group.consumers, "skipped": group.reason}
                continue
            s = scale_folding.smoothquant_scales(stats[group.consumers[0]][1].absmax,
                                                 [weight_of(stats[layer][0]) for layer in group.consumers], alpha)
            scale_folding.fold(model, group, s)
            report[group.consumers[0]] = {"consumers": group.consumers, "producer": list(group.producer),
                                          "max_scale": float(s.max()), "min_scale": float(s.min())}
        return None

    info = calibrate(model, batches, recipe.applies_to, on_block, hessian=False, progress=progress)
    info["smoothquant"] = report
    return info


def _mixed_precision(model: torch.nn.Module, recipe: Any, batches: list[dict[str, torch.Tensor]],
                     progress: bool) -> dict[str, Any]:
    """Bits per layer under an average-bits budget, from measured sensitivity (HAWQ / SliM-LLM in
    spirit): for each layer and candidate format, the layer-output error of round-to-nearest,
    ``tr(dW H dW^T) / tr(W H W^T)`` with the calibration Hessian; then start every layer at the
    cheapest format and upgrade, greedily, the layer whose error falls most per extra bit until
    the budget is spent."""
    options = recipe.pass_options("insert_weight_quant")
    budget = float(recipe.mixed_bits)
    candidates = sorted((WeightFormat.parse(k) for k in options.get("mixed_formats", (
        "int3_g128_asym", "int4_g128_asym", "int8"))), key=lambda f: f.bits_per_weight(4096, 4096))
    table: dict[str, list[tuple[float, float]]] = {}  # layer -> [(bits, relative error)] per candidate

    def on_block(stats):
        for layer, (module, observed) in stats.items():
            w = weight_of(module).detach().float()
            h = observed.hessian
            signal = float(((w @ h) * w).sum()) or 1.0
            rows = []
            for fmt in candidates:
                check_layer(fmt, w.shape[1], layer, recipe.pad_to_group)
                dw = w - dequantize(quantize(w, fmt))
                rows.append((fmt.storage_bytes(*w.shape) * 8.0, float(((dw @ h) * dw).sum()) / signal))
            table[layer] = rows

    info = calibrate(model, batches, recipe.applies_to, on_block, hessian=True, progress=progress)
    params = {layer: weight_of(model.get_submodule(layer)).numel() for layer in table}
    choice = {layer: 0 for layer in table}
    spent = sum(table[layer][0][0] for layer in table)
    limit = budget * sum(params.values())
    while True:
        best, best_gain = None, 0.0
        for layer, i in choice.items():
            if i + 1 < len(candidates):
                (b0, e0), (b1, e1) = table[layer][i], table[layer][i + 1]
                if spent + b1 - b0 <= limit and (e0 - e1) / (b1 - b0) > best_gain:
                    best, best_gain = layer, (e0 - e1) / (b1 - b0)
        if best is None:
            break
        spent += table[best][choice[best] + 1][0] - table[best][choice[best]][0]
        choice[best] += 1
    info["mixed"] = {layer: {"format": candidates[i].key, "relative_error": table[layer][i][1],
                             "sensitivity": {candidates[j].key: round(e, 6) for j, (_, e) in enumerate(table[layer])}}
                     for layer, i in choice.items()}
    info["average_bits"] = spent / max(sum(params.values()), 1)
    info["budget_bits"] = budget
    return info


def _scale_groups(model: torch.nn.Module, example: dict[str, torch.Tensor]) -> dict[str, scale_folding.ScaleGroup]:
    """Layer FQN -> its scale group, from the canonical graph of one capture."""
    graphs: list[fx.GraphModule] = []

    def canonicalize(gm: fx.GraphModule, _args: tuple[Any, ...]) -> None:
        run_pipeline(gm, Recipe("scale-analysis", ("canonicalize",)), ctx=PassContext(recipe=None))
        graphs.append(gm)

    _capture_each(model, example, canonicalize)
    shared = _tied_parameters(model)
    groups = {}
    for gm in graphs:
        for group in scale_folding.scale_groups(gm):
            tied = [layer for layer in group.consumers if id(model.get_submodule(layer).weight) in shared]
            if group.producer is not None and tied:
                group.producer, group.reason = None, f"weight of {tied[0]} is tied to another module"
            groups.update({layer: group for layer in group.consumers})
    return groups


def _groups_in(stats: dict[str, Any], groups: dict[str, scale_folding.ScaleGroup]) -> list[scale_folding.ScaleGroup]:
    """The scale groups whose linears were observed in this block (each once)."""
    return list({id(groups[layer]): groups[layer] for layer in stats if layer in groups}.values())


def _require_data(recipe: Any, batches: list[dict[str, torch.Tensor]], what: str) -> None:
    if not batches:
        raise LowbitError(f"compress: recipe {recipe.name!r} {what}, which needs calibration data: "
                          "compress(model, recipe, calibration=[token-id tensors] or texts with tokenizer=)")


def _tied_parameters(model: torch.nn.Module) -> set[int]:
    """ids of parameters owned by more than one module (a head tied to the embedding)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return {i for i, n in owners.items() if n > 1}


def _awq_fold(model: torch.nn.Module, group: scale_folding.ScaleGroup, stats, fmt) -> dict[str, Any]:
    if group.producer is None:
        return {"consumers": group.consumers, "skipped": group.reason}
    first = stats[group.consumers[0]][1]
    weights = [weight_of(stats[layer][0]) for layer in group.consumers]
    s, alpha, relative = scale_folding.awq_scales(weights, first.hessian, first.mean_abs, fmt)
    scale_folding.fold(model, group, s)
    return {"consumers": group.consumers, "producer": list(group.producer), "alpha": alpha,
            "error_vs_rtn": round(relative, 4)}