"""The offline flow: ``compress(model, recipe)`` runs the same passes and writes the graph back.

1. Capture the model's forward with Dynamo (on the first calibration batch, ``example_inputs``, or
   a short dummy prompt for Hugging Face models) and run the recipe's pipeline on each captured
   graph, with the calibration engine (``lowbit_compiler/calibration.py``) over the batches, as
   ``torch.compile(..., options={"calibration": ...})`` does: the same passes see the same data
   the same way, so both flows produce bit-identical quantized tensors.
2. Write the rewritten graph back into the model (:func:`write_back`), from the graph alone:

   * every frozen tensor a pass replaced (rotated, norm-folded, smoothed weights; new biases;
     untied heads) goes back to its FQN (in place where the graph reads the model's own tensor
     there, so weights tied in the graph stay tied; as a new parameter where the graph gave the
     FQN a tensor of its own);
   * every linear that became a ``lowbit::`` op is replaced by a :class:`LowbitLinear` built from
     the op's arguments, with the input transforms in front of it (``lowbit::hadamard``, R4's
     signs, ``lowbit::kron_transform``) and SpQR's ``lowbit::sparse_linear`` beside it; a float
     linear with input transforms gets them as a forward pre-hook;
   * every experts module whose stacked 3-D weights became ``lowbit::grouped_linear`` is replaced
     by a :class:`LowbitExperts` (transformers' ``grouped_mm`` experts forward on the quantized
     tensors); a module whose forward it cannot reproduce keeps its float weights, reported;
   * norms whose affine parameters a rotation folded become :class:`FoldedRMSNorm`;
   * Hadamards on attention queries and keys (R3) go through transformers' AttentionInterface.

   A ``lowbit::`` node nothing here can represent raises (never a model that silently computes
   something else). The float weights are released, so memory really shrinks.

The model keeps its class, ``generate()`` works, ``state_dict()`` holds the quantized buffers, and
compiling it with ``backend="lowbit"`` lowers its ``lowbit::`` ops directly (the quantizing
passes only rewrite float ``F.linear`` nodes, so nothing is quantized twice).
"""
from __future__ import annotations

import inspect
import logging
import operator
from typing import Any, Callable

import torch
import torch.fx as fx

from lowbit_compiler import _dynamo_adapter, checkpoint, coverage, hadamard, ir, memory, opdecl, ops
from lowbit_compiler.calibration import as_batches, for_graph
from lowbit_compiler.capture import Captured, capture
from lowbit_compiler.formats import FormatError
from lowbit_compiler.pass_base import LowbitError, PassContext, get_pass
from lowbit_compiler.pipeline import run_pipeline
from lowbit_compiler.recipe import get_recipe

log = logging.getLogger("lowbit_compiler")


class LowbitLinear(torch.nn.Module):
    """A linear layer with quantized storage; calls ``lowbit::wo_linear`` (weight-only) or
    ``lowbit::qa_linear`` (activations quantized too: ``act`` = "int8" or "fp8_e4m3")."""

    def __init__(self, fmt: str, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 bias: torch.Tensor | None, in_features: int, act: str | None = None,
                 outliers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 x_scale: torch.Tensor | None = None, input_hadamard: bool = False,
                 input_transform: tuple[torch.Tensor, torch.Tensor] | None = None,
                 input_signs: torch.Tensor | None = None, weight_dtype: torch.dtype = torch.float32,
                 input_threshold: torch.Tensor | None = None, input_col_scale: torch.Tensor | None = None,
                 lowrank: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.fmt, self.act = fmt, act
        self.weight_dtype = weight_dtype  # the float weight's dtype (what .weight reports)
        self.input_hadamard = input_hadamard  # R4: lowbit::hadamard on the input (the weight absorbed D H)
        self.register_buffer("input_signs", input_signs)  # R4's D when applied online (else None)
        # FlatQuant: lowbit::kron_transform(x, P1, P2) after the Hadamard (the weight absorbed its inverse)
        left, right = input_transform or (None, None)
        self.register_buffer("transform_left", left)
        self.register_buffer("transform_right", right)
        self.register_buffer("x_scale", x_scale)  # static activation scale (None: per token at run time)
        # activation sparsity (TEAL/WINA): inputs whose |x| (x column norm) is below the threshold are zeroed, and
        # the matmul skips their weight rows (lowbit::sparse_input_linear, sparse_input_qa_linear)
        self.register_buffer("input_threshold", input_threshold)
        self.register_buffer("input_col_scale", input_col_scale)
        # R-Sparse: a rank-r factorisation left @ right ([N, r] x [r, K]) of the float weight, applied to the inputs
        # the threshold zeroed (lowbit::lowrank_residual) and added to the output; float, the model's dtype
        lowrank_left, lowrank_right = lowrank or (None, None)
        if (lowrank_left is not None) and input_threshold is None:
            raise LowbitError("LowbitLinear: a low-rank residual (R-Sparse) needs the input threshold it complements")
        self.register_buffer("lowrank_left", lowrank_left)
        self.register_buffer("lowrank_right", lowrank_right)
        for name, t in zip(("outlier_rows", "outlier_cols", "outlier_values"), outliers or (None,) * 3):
            self.register_buffer(name, t)  # SpQR-style fp16 outliers, added by lowbit::sparse_linear
        self.in_features = in_features
        self.out_features = scale.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """A zero-size stand-in with the float weight's dtype and the codes' device, for model code
        that reads ``.weight.dtype`` / ``.weight.device`` (T5 casts its input to ``wo.weight.dtype``).
        The weight itself is ``qweight`` + ``scale`` (+ ``zero``): any arithmetic on this raises."""
        return torch.empty(0, dtype=self.weight_dtype, device=self.qweight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.__dict__.get("_eager_group")  # linears of one input in one call (backends/eager_groups.py)
        if group is not None:
            y = group.output(self, x)
            if y is not None:
                return y
        transform = None if self.transform_left is None else (self.transform_left, self.transform_right)
        x = apply_input_transforms(x, self.input_hadamard, self.input_signs, transform)
        y = self._matmul(x)
        if self.lowrank_left is not None:  # R-Sparse: the low-rank part over the inputs the threshold zeroed
            kept = torch.ops.lowbit.act_sparsify(x, self.input_threshold, self.input_col_scale)
            y = y + torch.ops.lowbit.lowrank_residual(x, kept, self.lowrank_left, self.lowrank_right)
        return y

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The quantized matmul (behind the threshold, with SpQR's outliers) on the transformed input."""
        # eager on the CPU: the ops' implementations without the dispatcher (~100 us per decode call, measured:
        # longer than a GEMV); traced, the ops go into the graph for the backend
        direct = not torch.compiler.is_compiling() and x.device.type == "cpu" and not (
            x.requires_grad and torch.is_grad_enabled())
        if self.input_threshold is not None and not self.act and self.outlier_values is None:
            if direct:
                return ops.sparse_input_linear_eager(x, self.input_threshold, self.input_col_scale, self.qweight,
                                                     self.scale, self.zero, self.bias, self.fmt, self.in_features)
            return torch.ops.lowbit.sparse_input_linear(x, self.input_threshold, self.input_col_scale, self.qweight,
                                                        self.scale, self.zero, self.bias, self.fmt, self.in_features)
        if self.input_threshold is not None and self.outlier_values is None:
            return torch.ops.lowbit.sparse_input_qa_linear(x, self.input_threshold, self.input_col_scale, self.qweight,
                                                           self.scale, self.zero, self.bias, self.fmt,
                                                           self.in_features, self.act, self.x_scale)
        if self.input_threshold is not None:
            x = torch.ops.lowbit.act_sparsify(x, self.input_threshold, self.input_col_scale)
        if self.act:
            return torch.ops.lowbit.qa_linear(x, self.qweight, self.scale, self.zero, self.bias, self.fmt,
                                              self.in_features, self.act, self.x_scale)
        y = (ops.wo_linear_eager if direct else torch.ops.lowbit.wo_linear)(
            x, self.qweight, self.scale, self.zero, self.bias, self.fmt, self.in_features)
        if self.outlier_values is not None:
            y = y + torch.ops.lowbit.sparse_linear(x, self.outlier_rows, self.outlier_cols, self.outlier_values,
                                                   self.out_features)
        return y

    def extra_repr(self) -> str:
        act = f", act={self.act}" if self.act else ""
        rot = ", input_hadamard=True" if self.input_hadamard else ""
        if self.transform_left is not None:
            rot += f", input_transform={self.transform_left.shape[0]}x{self.transform_right.shape[0]}"
        if self.input_threshold is not None:
            rot += ", sparse_input=" + ("wina" if self.input_col_scale is not None else "threshold")
        if self.lowrank_left is not None:
            rot += f", lowrank={self.lowrank_left.shape[1]}"
        return f"{self.fmt}{act}{rot}, in_features={self.in_features}, out_features={self.out_features}"


class RSparseLinear(torch.nn.Module):
    """R-Sparse on a float linear (``rsparse-50``): ``y = W sparse(x) + b + L (R (x - sparse(x)))``,
    the threshold (``lowbit::act_sparsify``) and the low-rank part (``lowbit::lowrank_residual``)
    as the compiled graph computes them. Replaces an ``nn.Linear`` (or a GPT-2 ``Conv1D``, whose
    weight is stored [K, N]: ``transposed``) and keeps its ``weight`` / ``bias`` parameters (same
    names in ``state_dict()``; tied ones stay tied), plus buffers ``input_threshold``,
    ``lowrank_left`` [N, r] and ``lowrank_right`` [r, K] (float, the weight's dtype). Quantized
    weights use :class:`LowbitLinear` with the same buffers."""

    def __init__(self, linear: torch.nn.Module, input_threshold: torch.Tensor,
                 lowrank: tuple[torch.Tensor, torch.Tensor], transposed: bool = False):
        super().__init__()
        self.transposed = transposed
        self.weight, self.bias = linear.weight, linear.bias  # the model's parameters
        self.out_features, self.in_features = lowrank[0].shape[0], lowrank[1].shape[1]
        self.register_buffer("input_threshold", input_threshold)
        self.register_buffer("lowrank_left", lowrank[0])
        self.register_buffer("lowrank_right", lowrank[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = torch.ops.lowbit.act_sparsify(x, self.input_threshold, None)
        y = torch.nn.functional.linear(kept, self.weight.t() if self.transposed else self.weight, self.bias)
        return y + torch.ops.lowbit.lowrank_residual(x, kept, self.lowrank_left, self.lowrank_right)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
                f"{', transposed' if self.transposed else ''}, sparse_input=threshold, "
                f"lowrank={self.lowrank_left.shape[1]}")


class LowbitExperts(torch.nn.Module):
    """A transformers experts module (stacked 3-D expert weights, ``experts_implementation=
    "grouped_mm"``) whose stacked weights are quantized: the same computation as transformers'
    ``grouped_mm_experts_forward`` (tokens sorted by expert, one grouped matmul per projection,
    the module's own gate, routing weights, tokens restored), each quantized projection one
    ``lowbit::grouped_linear`` over the stacked per-expert tensors; a projection the recipe left
    float keeps its float weight (transformers' grouped matmul)."""

    def __init__(self, experts: torch.nn.Module, quantized: dict[str, dict[str, Any]]):
        super().__init__()
        self.experts_class = type(experts).__name__
        self._gate_fn = getattr(type(experts), "_apply_gate", None)
        for key, value in vars(experts).items():  # num_experts, has_gate, is_transposed, a custom gate's constants
            if not key.startswith("_") and key != "training" and isinstance(value, (bool, int, float, str, type(None))):
                setattr(self, key, value)
        for name, child in experts.named_children():  # act_fn (and any module a custom gate uses)
            self.add_module(name, child)
        self.quantized = sorted(quantized)
        for name, param in experts.named_parameters(recurse=False):
            if name in quantized:
                spec = quantized[name]
                for key in ("qweight", "scale", "zero"):
                    self.register_buffer(f"{name}_{key}", spec[key])
                setattr(self, f"{name}_spec", (spec["fmt"], spec["in_features"], spec["act"], param.dtype))
            else:  # float: another projection, biases
                setattr(self, name, param)

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._gate_fn(self, gate_up)

    def _project(self, name: str, x: torch.Tensor, offsets: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        if name in self.quantized:
            fmt, in_features, act, dtype = getattr(self, f"{name}_spec")
            out = torch.ops.lowbit.grouped_linear(x.to(dtype), offsets, getattr(self, f"{name}_qweight"),
                                                  getattr(self, f"{name}_scale"), getattr(self, f"{name}_zero"), fmt,
                                                  in_features, act)
        else:
            from transformers.integrations.moe import _grouped_mm

            weight = getattr(self, name)
            out = _grouped_mm(x, weight if self.is_transposed else weight.transpose(-2, -1), offs=offsets)
        if getattr(self, "has_bias", False):
            out = out + getattr(self, f"{name}_bias")[expert_ids]
        return out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        device = hidden_states.device
        num_top_k, num_tokens, hidden_dim = top_k_index.size(-1), hidden_states.size(0), hidden_states.size(-1)
        sample_weights, expert_ids = top_k_weights.reshape(-1), top_k_index.reshape(-1)
        expert_ids_g, perm = torch.sort(expert_ids)
        selected = hidden_states[perm // num_top_k]
        sample_weights_g = sample_weights[perm]
        histc_input = expert_ids_g.float() if device.type in ("cpu", "mps") else expert_ids_g.int()
        tokens_per_expert = torch.histc(histc_input, bins=self.num_experts, min=0, max=self.num_experts - 1)
        offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
        if self.has_gate:
            out = self._apply_gate(self._project("gate_up_proj", selected, offsets, expert_ids_g))
        else:
            out = self.act_fn(self._project("up_proj", selected, offsets, expert_ids_g))
        out = self._project("down_proj", out, offsets, expert_ids_g)
        weighted = out * sample_weights_g.unsqueeze(-1)
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(perm.size(0), device=device)
        weighted = weighted[inv_perm]
        return weighted.view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)

    def extra_repr(self) -> str:
        specs = ", ".join(f"{n}={getattr(self, f'{n}_spec')[0]}" + (f"/{getattr(self, f'{n}_spec')[2]}"
                                                                      if getattr(self, f"{n}_spec")[2] else "")
                          for n in self.quantized)
        return f"{self.experts_class}, {getattr(self, 'num_experts', '?')} experts, {specs}"


def _not_grouped_mm_experts(module: torch.nn.Module) -> str | None:
    """Why an experts module cannot become a :class:`LowbitExperts` (None: it can): it must be a
    transformers experts module running the ``grouped_mm`` implementation, whose forward
    LowbitExperts reproduces."""
    if not hasattr(module, "has_gate") or not hasattr(module, "is_transposed"):
        return (f"{type(module).__name__} is not a transformers experts module (@use_experts_implementation); its "
                "forward cannot be reproduced")
    impl = getattr(getattr(module, "config", None), "_experts_implementation", None)
    if impl != "grouped_mm":
        return f"{type(module).__name__} runs experts_implementation={impl!r}, not 'grouped_mm'"
    if getattr(module, "_is_expert_parallel", False):
        return f"{type(module).__name__} is expert-parallel (sentinel rows); not supported"
    if getattr(module, "has_post_expert_norm", False):
        return f"{type(module).__name__} has a post-expert norm; not supported"
    return None


class FoldedRMSNorm(torch.nn.Module):
    """A norm whose scale (and LayerNorm's bias) was folded into the linears it feeds, and whose
    input stream was rotated: ``rms_norm`` without parameters, in float32 at least (as HF norms).

    ``weight`` is a zero-size stand-in with the folded weight's dtype and device (a buffer, so it
    follows ``.to()``), for model code that reads ``norm.weight.dtype`` (Mamba casts its input to
    it); any arithmetic on it raises."""

    def __init__(self, eps: float, like: torch.Tensor | None = None):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.empty(0, dtype=like.dtype if like is not None else torch.float32,
                                                   device=like.device if like is not None else None),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = torch.promote_types(x.dtype, torch.float32)
        return torch.nn.functional.rms_norm(x.to(compute), (x.shape[-1],), None, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, folded"


class GraphRMSNorm(torch.nn.Module):
    """An RMSNorm as the canonical graph computes it: ``rms_norm(x) * (weight + offset)`` in the
    input's precision (float32 at least); written back for float64 models, whose Hugging Face
    norm modules would round to float32."""

    def __init__(self, weight: torch.Tensor, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = weight if isinstance(weight, torch.nn.Parameter) else torch.nn.Parameter(weight)
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = torch.promote_types(x.dtype, torch.float32)
        w = (self.weight + self.offset).to(compute)
        return torch.nn.functional.rms_norm(x.to(compute), (x.shape[-1],), w, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (f", offset={self.offset}" if self.offset else "")


def r4_input(x: torch.Tensor, signs: torch.Tensor | None) -> torch.Tensor:
    """R4 on a down projection's input: ``(x D) H`` (``D`` None when folded into ``up``)."""
    return torch.ops.lowbit.hadamard(x if signs is None else x * signs)


def _takes(model: torch.nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes the keyword ``name``: a parameter of that name, or
    ``**kwargs`` on a model with a vocabulary (a Hugging Face model's wrapped forward). A plain
    module's ``forward(*args, **kwargs)`` gets its tensors positionally."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    if name in params:
        return True
    return (any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
            and getattr(getattr(model, "config", None), "vocab_size", None) is not None)


def _with_decoder_ids(model: torch.nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Encoder-decoder models (T5) need decoder ids too: the decoder's start token, once."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" not in kwargs \
            and "decoder_inputs_embeds" not in kwargs and isinstance(kwargs.get("input_ids"), torch.Tensor):
        start = getattr(config, "decoder_start_token_id", None)
        start = 0 if start is None else start
        ids = kwargs["input_ids"]
        kwargs = {**kwargs, "decoder_input_ids": torch.full((ids.shape[0], 1), start, dtype=ids.dtype,
                                                            device=ids.device)}
    return kwargs


def _input_device(model: torch.nn.Module) -> torch.device:
    """Where the model's inputs must live: the device of its first parameter (CPU without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _to_device(batches: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    """Calibration batches on the model's device (tokenizers return CPU tensors)."""
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]


def _example_call(model: torch.nn.Module, batches: list[dict[str, Any]],
                  example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(args, kwargs) for the capture: ``example_inputs`` as given (a dict: keywords; a tensor or a
    tuple of them: positional, or ``input_ids=`` for a model whose forward takes it), else the
    first calibration batch, else token ids for a model with a vocabulary."""
    if example_inputs is not None:
        if isinstance(example_inputs, dict):
            return (), _with_decoder_ids(model, dict(example_inputs))
        args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        if len(args) == 1 and isinstance(args[0], torch.Tensor) and _takes(model, "input_ids"):
            return (), _with_decoder_ids(model, {"input_ids": args[0]})
        return args, {}
    if batches:
        return (), _with_decoder_ids(model, dict(batches[0]))
    if getattr(getattr(model, "config", None), "vocab_size", None):
        return (), _with_decoder_ids(model, {"input_ids": torch.zeros(1, 8, dtype=torch.long,
                                                                      device=_input_device(model))})
    raise LowbitError(f"compress: cannot build an input for {type(model).__name__} (no config.vocab_size); pass "
                      "example_inputs=tensor, a tuple of positional tensors, or a dict of keyword inputs")


def _capture_each(model: torch.nn.Module, call: tuple[tuple[Any, ...], dict[str, Any]],
                  handle: Callable[[Captured, tuple[Any, ...]], None]) -> None:
    """Capture the model's forward once (eval mode, no grad) and hand each captured graph to
    ``handle(captured, args)``, ``args`` the graph's arguments for this call; Dynamo's cache
    entries are dropped afterwards (see ``forget_compiled``)."""
    graphs = 0

    def backend(gm: fx.GraphModule, example: list[Any]):
        nonlocal graphs
        graphs += 1
        captured = capture(gm, example)
        handle(captured, tuple(captured.call_args(example)))
        return gm.forward

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            torch.compile(model, backend=backend, dynamic=False)(*call[0], **call[1])
    except Exception as e:  # a LowbitError (bad recipe, no calibration) or a FormatError (a layer the
        inner = _dynamo_adapter.backend_error(e)  # format cannot take, a non-finite weight) reaches the user as itself
        if isinstance(inner, (LowbitError, FormatError)):
            raise inner from None
        raise
    finally:
        _dynamo_adapter.forget_compiled(model.forward)
        _dynamo_adapter.forget_backend(backend)  # its closure holds the captured graphs (and float weights)
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
    try:
        return _compress(model, recipe, calibration, example_inputs, strict, tokenizer, progress)
    finally:  # quantizing is over, done or not: running models reuse their large blocks again
        memory.release_mmap_threshold()


def _compress(model: torch.nn.Module, recipe: Any, calibration: Any, example_inputs: Any, strict: bool,
              tokenizer: Any, progress: bool) -> torch.nn.Module:
    recipe = get_recipe(recipe)
    if recipe.weight is not None and _input_device(model).type == "cpu":  # gcc beside the capture (background)
        from lowbit_compiler.backends import cpu_kernels

        cpu_kernels.prebuild([recipe.weight.key], attention=False)
    batches = _to_device(as_batches(calibration, tokenizer), _input_device(model))
    call = _example_call(model, batches, example_inputs)
    graphs: list[tuple[Captured, Any]] = []

    def rewrite(captured: Captured, args: tuple[Any, ...]) -> None:
        calibration_ = for_graph(captured.gm, batches, progress, args) if batches else None
        ctx = PassContext(recipe=recipe, strict=strict, calibration=calibration_)
        graphs.append((captured, run_pipeline(captured.gm, recipe, ctx=ctx)))

    _capture_each(model, call, rewrite)
    whole = [p for p in recipe.passes if get_pass(p).whole_model]
    if whole and len(graphs) != 1:
        raise LowbitError(f"compress({recipe.name}): pass {whole[0]!r} needs the whole forward in one graph; Dynamo "
                          f"captured {len(graphs)} (graph breaks)")
    written: dict[str, Any] = {"replaced_modules": 0, "tensors": 0, "folded_norms": 0, "input_hooks": 0,
                               "output_hooks": 0, "eager_groups": 0, "left_float": {}}
    layers: dict[str, dict[str, Any]] = {}
    passes: list[dict[str, Any]] = []
    r3 = None
    for captured, report in graphs:
        counts, wants_r3 = write_back(model, captured, recipe.name, strict, report.layers)
        for k, v in counts.items():
            written[k] = {**written[k], **v} if isinstance(v, dict) else written[k] + v
        if wants_r3:
            r3 = _attention_r3(model, strict)
        passes.extend({"name": p.name, "matches": p.matches, "details": p.details} for p in report.passes)
        layers.update(report.layers)
        for layer, reason in counts["left_float"].items():  # what the compressed model holds, not the graph
            layers[layer] = {"format": "float", "skipped": f"not written back: {reason}"}
    _record_cpu_dispatch(layers)
    kv_cache = _install_kv_cache(model, [captured.gm for captured, _ in graphs], recipe, strict)
    if not any(written.values()) and recipe.passes and kv_cache is None:
        log.warning("compress(%s): nothing was written back (no selected linear layers, nothing rotated)", recipe.name)
    account = coverage.merge([report.coverage for _, report in graphs])
    for layer, reason in written["left_float"].items():
        for entry in account["weights"].values():
            if entry.get("layer") == layer and entry["status"] == "quantized":
                entry.update(status="float", format="float", reason=f"not written back: {reason}",
                             bytes_after=entry["bytes"])
    account["totals"] = coverage.totals(account["weights"])
    model.lowbit_summary = {"recipe": recipe.to_dict(), **written, "layers": layers, "coverage": account,
                            "passes": passes,
                            "graphs": len(graphs), **({"R3": r3} if r3 is not None else {}),
                            **({"kv_cache": kv_cache} if kv_cache is not None else {})}
    if checkpoint.is_transformers_model(model):
        from lowbit_compiler import hf

        hf.attach(model)  # model.save_pretrained(dir) writes a lowbit checkpoint
    graphs.clear()
    memory.release_freed()  # the float weights written over are gone: give their pages back
    return model


def _record_cpu_dispatch(layers: dict[str, dict[str, Any]]) -> None:
    """Each weight-only layer's ``cpu_kernel`` (formats the CPU dispatch takes: int8, int4, NF4, and
    int3 / int2 above 16 rows, their decode-sized calls running the lookup-table kernel): how its
    CPU kernel is chosen per row count (``backends/cpu_dispatch.py``; filled in per row class as
    the compressed model runs)."""
    from lowbit_compiler.backends import cpu_dispatch, cpu_kernels

    for record in layers.values():
        fmt = record.get("format", "float")
        if (fmt != "float" and not record.get("activation") and not record.get("experts")
                and cpu_kernels.unsupported_reason(torch.float32, torch.device("cpu"), fmt) is None):
            record["cpu_kernel"] = cpu_dispatch.layer_record(fmt, record["out_features"], record["in_features"],
                                                             cpu_kernels.compute_dtype_for(torch.float32))


def _install_kv_cache(model: torch.nn.Module, graphs: list[fx.GraphModule], recipe: Any,
                      strict: bool) -> dict[str, Any] | None:
    """The KV decisions ``mark_kv_cache`` recorded -> a compressed cache and its attention on the
    model (``lowbit_compiler.kv.install``); None when the recipe marks no KV cache."""
    from lowbit_compiler import kv

    decisions = [d for gm in graphs for n in gm.graph.nodes if (d := ir.get(n, ir.KV_CACHE)) is not None]
    if not decisions:
        return None
    formats: dict[int, kv.KVFormat] = {}
    for d in decisions:
        index = getattr(_submodule(model, d.attention), "layer_idx", None)
        index = d.layer_index if index is None else int(index)
        formats[index] = d.kv_format if d.kv_format is not None else kv.KVFormat(d.scheme, d.bits, d.group, d.window,
                                                                                 d.sinks)
    return kv.install(model, formats, strict)


def _submodule(model: torch.nn.Module, fqn: str) -> torch.nn.Module | None:
    try:
        return model.get_submodule(fqn)
    except AttributeError:
        return None


# --------------------------------------------------------------------------------------------
# Write-back: the rewritten graph -> the model
# --------------------------------------------------------------------------------------------

def _is(node: Any, op: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is op


def _input_transforms(gm: fx.GraphModule, x: Any) -> tuple[Any, dict[str, Any], set[fx.Node]]:
    """Walk back from a linear's input through the transforms passes put in front of it: FlatQuant's
    ``kron_transform``, R4's ``hadamard`` and its online signs (``x * signs``), activation sparsity's
    ``act_sparsify``. Returns the module's
    own input, the transforms as :class:`LowbitLinear` keywords, and the nodes walked."""
    found: dict[str, Any] = {}
    walked: set[fx.Node] = set()
    if _is(x, torch.ops.lowbit.act_sparsify.default):  # activation sparsity: the last step before the matmul
        a = opdecl.args(x)
        found["input_threshold"] = ir.fetch_attr(gm, a["threshold"].target)
        found["input_col_scale"] = None if a["col_scale"] is None else ir.fetch_attr(gm, a["col_scale"].target)
        walked.add(x)
        x = a["x"]
    if _is(x, torch.ops.lowbit.kron_transform.default):
        a = opdecl.args(x)
        found["input_transform"] = (ir.fetch_attr(gm, a["left"].target), ir.fetch_attr(gm, a["right"].target))
        walked.add(x)
        x = a["x"]
    if _is(x, torch.ops.lowbit.hadamard.default) and not all(
            _is(u, torch.nn.functional.scaled_dot_product_attention) for u in x.users):
        found["input_hadamard"] = True
        walked.add(x)
        x = opdecl.args(x)["x"]
        if (_is(x, torch.mul) and isinstance(x.args[1], fx.Node) and x.args[1].op == "get_attr"
                and ir.param_fqn(x.args[1]) is None):  # R4's random signs, online (a buffer, not a weight)
            found["input_signs"] = ir.fetch_attr(gm, x.args[1].target)
            walked.add(x)
            x = x.args[0]
    return x, found, walked


def _not_a_bare_linear(model: torch.nn.Module, gm: fx.GraphModule, node: fx.Node, layer: str,
                       own: set[fx.Node]) -> str | None:
    """Why the module at ``layer`` cannot become a :class:`LowbitLinear` (None: it can): its
    forward must be exactly the linear the graph quantized (``nn.Linear``, Conv1D, FalconLinear),
    or the replacement would change what it returns (a MoE router returns logits, weights and
    expert indices)."""
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        owner = layer.rpartition(".")[0]
        kind = type(model.get_submodule(owner)).__name__ if owner else type(model).__name__
        return f"its weight is a bare parameter of {kind} ({owner or 'the model'}), not a linear module"
    if list(module.children()):
        return f"{type(module).__name__} has submodules: more than a linear"
    extra = sorted({str(n.target if isinstance(n.target, str) else getattr(n.target, "__name__", n.target))
                    for n in gm.graph.nodes if n is not node and n not in own
                    and n.op in ("call_function", "call_method", "call_module")
                    and (info := ir.get(n, ir.MODULE)) is not None and info.fqn == layer})
    if extra:
        return f"{type(module).__name__}.forward computes {', '.join(extra)} besides its linear"
    return None


def _side_ops(gm: fx.GraphModule, node: fx.Node, x: Any, recipe_name: str) -> dict[str, Any]:
    """What is added to a linear's output (``linear + side``, chained): SpQR's outliers
    (``lowbit::sparse_linear``: rows, cols, values) and R-Sparse's low-rank part
    (``lowbit::lowrank_residual``: (left, right), with the threshold node it reads). Returns
    ``{"outliers", "lowrank", "nodes"}``, ``nodes`` the add and side nodes and the threshold the
    low-rank part reads (the module recomputes it). Raises when the low-rank part does not read
    the linear's own input and threshold (a graph the module form would compute differently)."""
    found: dict[str, Any] = {"outliers": None, "lowrank": None, "nodes": set()}
    current = node
    while len(current.users) == 1:
        add = next(iter(current.users))
        if not (_is(add, operator.add) and add.args[0] is current and opdecl.is_module(add.args[1], opdecl.SIDE)):
            break
        side = add.args[1]
        a = opdecl.args(side)
        if _is(side, torch.ops.lowbit.sparse_linear.default) and found["outliers"] is None:
            found["outliers"] = tuple(ir.fetch_attr(gm, a[k].target) for k in ("rows", "cols", "values"))
        elif _is(side, torch.ops.lowbit.lowrank_residual.default) and found["lowrank"] is None:
            kept = a["kept"]
            node_args = opdecl.args(node) if opdecl.of(node) is not None else {}
            fused = node_args if "threshold" in node_args else None  # sparse_input_(qa_)linear
            ok = _is(kept, torch.ops.lowbit.act_sparsify.default) and opdecl.args(kept)["x"] is a["x"] and (
                kept is x if fused is None else
                (fused["x"] is a["x"] and fused["threshold"] is opdecl.args(kept)["threshold"]))
            if not ok:
                raise LowbitError(f"compress({recipe_name}): the low-rank residual {side.name} beside {node.name} does "
                                  "not read the linear's own input and threshold; use torch.compile(model, "
                                  "backend='lowbit') for this graph")
            found["lowrank"] = (ir.fetch_attr(gm, a["left"].target), ir.fetch_attr(gm, a["right"].target))
            found["nodes"].add(kept)  # the module recomputes it (the fused matmul no longer reads the node)
        else:
            break
        found["nodes"].update({add, side})
        current = add
    return found


def _write_rsparse_float(model: torch.nn.Module, gm: fx.GraphModule, node: fx.Node, layer: str,
                         transforms: dict[str, Any], own: set[fx.Node],
                         lowrank: tuple[torch.Tensor, torch.Tensor], recipe_name: str) -> None:
    """R-Sparse on a float linear: the linear module at ``layer`` (``nn.Linear``, ``Conv1D``) becomes
    an :class:`RSparseLinear` over the same parameters. Anything else in front of it (R4,
    FlatQuant, WINA's column norms) or a module that computes more than its linear raises: no
    module form computes that yet."""
    other = sorted(k for k, v in transforms.items() if k != "input_threshold" and v not in (None, False))
    parts = ir.linear_parts(node)
    reason = _not_a_bare_linear(model, gm, node, layer, own)
    if reason is None and other:
        reason = f"input transforms {other} in front of the threshold"
    if reason is None and (parts.weight_node is None or not isinstance(getattr(model.get_submodule(layer), "weight",
                                                                               None), torch.nn.Parameter)):
        reason = "its weight is not the module's own parameter"
    if reason is not None:
        raise LowbitError(f"compress({recipe_name}): layer {layer} (node {node.name}): R-Sparse on a float weight: "
                          f"{reason}; no module form computes that yet (use torch.compile(model, backend='lowbit'))")
    parent, child = _weight_owner(model, layer)
    setattr(parent, child, RSparseLinear(model.get_submodule(layer), transforms["input_threshold"], lowrank,
                                         transposed=bool(parts.transposed)))


def write_back(model: torch.nn.Module, captured: Captured, recipe_name: str,
               strict: bool = False, records: dict[str, dict] | None = None) -> tuple[dict[str, Any], bool]:
    """Write one rewritten graph into ``model`` (module docstring); returns what was written and
    whether queries and keys get R3 Hadamards. A quantized linear whose module computes more than
    the linear stays float in the model (``left_float``: layer -> why; strict: an error).
    ``records``: the graph's layer records (activation-sparse sites write their kernel plan there
    when they decide)."""
    gm = captured.gm
    counts: dict[str, Any] = {"replaced_modules": 0, "tensors": 0, "folded_norms": 0, "input_hooks": 0,
                              "output_hooks": 0, "eager_groups": 0, "left_float": {}}
    represented: set[fx.Node] = set()
    with torch.no_grad():
        counts["tensors"] = _write_tensors(model, captured)
    _write_experts(model, gm, recipe_name, strict, counts, represented)
    one_input: dict[fx.Node, list[LowbitLinear]] = {}  # plain weight-only linears by the node they read
    behind_one_threshold: dict[tuple, list[LowbitLinear]] = {}  # sparse_input_linear by (x, threshold, col_scale)
    sparse_records: dict[int, tuple] = {}  # id(LowbitLinear) -> (its layer record, target sparsity)
    for node in list(gm.graph.nodes):
        quantized = opdecl.is_module(node, opdecl.LINEAR)
        if not (quantized or ir.is_linear(node)):
            continue
        module_info = ir.get(node, ir.MODULE)
        decision = ir.get(node, ir.WEIGHT_QUANT)
        layer = decision.layer if decision is not None else (module_info.fqn if module_info else None)
        x = opdecl.args(node)["x"] if quantized else ir.linear_parts(node).x
        _, transforms, walked = _input_transforms(gm, x)
        tensor = lambda a: None if a is None else ir.fetch_attr(gm, a.target)  # noqa: E731
        sides = _side_ops(gm, node, x, recipe_name)
        if not quantized and sides["lowrank"] is not None:  # R-Sparse on a float weight: an RSparseLinear
            if layer:
                _write_rsparse_float(model, gm, node, layer, transforms, walked | sides["nodes"], sides["lowrank"],
                                     recipe_name)
                represented.update(walked | sides["nodes"])
                counts["replaced_modules"] += 1
            continue
        if not quantized:  # a float linear behind transforms (R4 without quantization): a pre-hook
            if transforms:
                if not layer:
                    continue
                add_input_transforms(model.get_submodule(layer), **transforms)
                represented.update(walked)
                counts["input_hooks"] += 1
            continue
        represented.update(walked)
        represented.add(node)
        if decision is None:  # arrived quantized (the model was compressed before)
            represented.update(sides["nodes"])
            continue
        args = opdecl.args(node)
        if "threshold" in args:  # lowbit::sparse_input_(qa_)linear: the threshold is fused into the matmul
            transforms.update(input_threshold=tensor(args["threshold"]), input_col_scale=tensor(args["col_scale"]))
        outliers, lowrank = sides["outliers"], sides["lowrank"]
        represented.update(sides["nodes"])
        own = walked | sides["nodes"]
        reason = _not_a_bare_linear(model, gm, node, layer, own)
        if reason is not None:
            message = (f"compress({recipe_name}): layer {layer} (node {node.name}): {reason}; it stays float in the "
                       "compressed model (exclude it from the recipe, or use torch.compile(model, backend='lowbit'), "
                       "which quantizes it inside the graph)")
            if strict:
                raise LowbitError(message)
            log.warning(message)
            counts["left_float"][layer] = reason
            continue
        parent, child = _weight_owner(model, layer)
        old_weight = getattr(getattr(parent, child), "weight", None)
        setattr(parent, child, LowbitLinear(
            args["fmt"], tensor(args["qweight"]), tensor(args["scale"]), tensor(args["zero"]), tensor(args["bias"]),
            args["in_features"], args.get("act"), outliers, tensor(args.get("x_scale")),
            input_hadamard=transforms.get("input_hadamard", False), input_transform=transforms.get("input_transform"),
            input_signs=transforms.get("input_signs"),
            weight_dtype=old_weight.dtype if isinstance(old_weight, torch.Tensor) else torch.float32,
            input_threshold=transforms.get("input_threshold"), input_col_scale=transforms.get("input_col_scale"),
            lowrank=lowrank))
        counts["replaced_modules"] += 1
        written = getattr(parent, child)
        if (opdecl.of(node).name == "wo_linear" and not transforms and outliers is None and lowrank is None
                and isinstance(args["x"], fx.Node)):
            one_input.setdefault(args["x"], []).append(written)
        if (opdecl.of(node).name == "sparse_input_linear" and set(transforms) == {"input_threshold", "input_col_scale"}
                and outliers is None and lowrank is None and isinstance(args["x"], fx.Node)):
            spec, record = ir.get(node, ir.ACT_SPARSITY), (records or {}).get(layer)
            if record is not None and spec is not None:
                sparse_records[id(written)] = (record, float(spec.target))
            behind_one_threshold.setdefault((args["x"], args["threshold"], args["col_scale"]), []).append(written)
        elif opdecl.of(node).name == "sparse_input_linear" and lowrank is not None:
            from lowbit_compiler.passes.act_sparsity.activation import SITE_DECIDES

            record = (records or {}).get(layer)
            # no site group writes it (a forced dispatch or an unsupported format already says what runs)
            if record is not None and record.get("sparse_kernel") == SITE_DECIDES:
                record["sparse_kernel"] = (
                    "per layer (R-Sparse: the low-rank part reads the input too, so the layer runs alone): one row "
                    "takes the activation-sparse kernel when a timing at its first call on this host finds it faster "
                    "than the dense kernel (cpu_sparse.plan, cached on disk; calls counted in "
                    "cpu_sparse.dispatch_counter)")
    from lowbit_compiler.backends import eager_groups

    same = lambda ms: [m for m in ms if (m.fmt, m.in_features) == (ms[0].fmt, ms[0].in_features)]  # noqa: E731
    counts["eager_groups"] += eager_groups.link(  # same format and K: one generated call (eager_groups.py)
        [same(ms) for ms in one_input.values()])
    counts["eager_groups"] += eager_groups.link_sparse([same(ms) for ms in behind_one_threshold.values()],
                                                       sparse_records)
    for node in gm.graph.nodes:  # norms whose parameters were folded into their readers
        spec = ir.get(node, ir.NORM)
        if spec is None:
            continue
        module = ir.get(node, ir.MODULE)
        fqn = module.fqn if module is not None else ""
        target = model.get_submodule(fqn) if fqn else None
        if not spec.folded:
            weight = getattr(target, "weight", None)
            if (spec.kind == "rms" and isinstance(weight, torch.Tensor) and weight.dtype == torch.float64
                    and not list(target.children())):
                # Hugging Face RMSNorms compute in float32 even in a float64 model; the graph (and so the
                # compiled flow) computes in float64: write back the graph's norm
                parent, child = _weight_owner(model, fqn)
                setattr(parent, child, GraphRMSNorm(weight, spec.eps, spec.weight_offset))
            continue
        if target is None or list(target.children()) or "norm" not in type(target).__name__.lower():
            raise LowbitError(f"compress({recipe_name}): a folded norm (node {node.name}) was computed inside "
                              f"{fqn or 'the model'} ({type(target).__name__}), not by a norm module that can be "
                              "replaced; use torch.compile(backend='lowbit') for this model's rotations")
        if not isinstance(target, FoldedRMSNorm):
            parent, child = _weight_owner(model, fqn)
            setattr(parent, child, FoldedRMSNorm(spec.eps, getattr(target, "weight", None)))
            counts["folded_norms"] += 1
    for node in gm.graph.nodes:  # CATS: a threshold on an activation module's output (a forward hook)
        if _is(node, torch.ops.lowbit.act_sparsify.default) and node not in represented:
            a = opdecl.args(node)
            module = _activation_module(model, a["x"])
            if module is not None:
                add_output_threshold(module, ir.fetch_attr(gm, a["threshold"].target),
                                     None if a["col_scale"] is None else ir.fetch_attr(gm, a["col_scale"].target))
                represented.add(node)
                counts["output_hooks"] += 1
    r3 = False
    for node in gm.graph.nodes:  # R3: Hadamards on queries and keys right before attention
        if _is(node, torch.ops.lowbit.hadamard.default) and node not in represented and node.users and all(
                _is(u, torch.nn.functional.scaled_dot_product_attention) for u in node.users):
            represented.add(node)
            r3 = True
    leftover = [n for n in gm.graph.nodes if opdecl.of(n) is not None and n not in represented]
    if leftover:
        raise LowbitError(f"compress({recipe_name}): nodes {[n.name for n in leftover]} ({opdecl.describe(leftover[0])}) "
                          "are not in a place their module form covers (a linear's input or output, attention's "
                          "queries and keys); use torch.compile(model, backend='lowbit', options={'recipe': ...}) for "
                          "this recipe")
    return counts, r3


def _write_experts(model: torch.nn.Module, gm: fx.GraphModule, recipe_name: str, strict: bool,
                   counts: dict[str, Any], represented: set[fx.Node]) -> None:
    """Each experts module whose stacked weights became ``lowbit::grouped_linear`` nodes ->
    a :class:`LowbitExperts` holding the very tensors of those nodes. A module whose forward
    LowbitExperts cannot reproduce keeps its float weights, with a warning and ``left_float``
    (strict: an error), as a linear inside a larger module does."""
    owners: dict[str, dict[str, dict[str, Any]]] = {}
    for node in gm.graph.nodes:
        if not opdecl.is_module(node, opdecl.EXPERTS):
            continue
        represented.add(node)
        decision = ir.get(node, ir.WEIGHT_QUANT)
        if decision is None:  # arrived quantized (a LowbitExperts compiled again)
            continue
        a = opdecl.args(node)
        owner, _, attr = decision.layer.rpartition(".")
        owners.setdefault(owner, {})[attr] = {"layer": decision.layer,
            "fmt": a["fmt"], "in_features": a["in_features"], "act": a["act"],
            **{k: None if a[k] is None else ir.fetch_attr(gm, a[k].target) for k in ("qweight", "scale", "zero")}}
    for owner, quantized in owners.items():
        module = model.get_submodule(owner)
        reason = _not_grouped_mm_experts(module)
        if reason is None and (missing := sorted(set(quantized) - {n for n, _ in module.named_parameters(recurse=False)})):
            reason = f"{type(module).__name__} has no parameters {missing}"
        if reason is not None:
            message = (f"compress({recipe_name}): experts {owner or '(the model)'}: {reason}; their weights stay float "
                       "in the compressed "
                       "model (use torch.compile(model, backend='lowbit'), which quantizes them inside the graph)")
            if strict:
                raise LowbitError(message)
            log.warning(message)
            for spec in quantized.values():
                counts["left_float"][spec["layer"]] = reason
            continue
        parent, child = _weight_owner(model, owner)
        setattr(parent, child, LowbitExperts(module, quantized))
        counts["replaced_modules"] += 1


def _write_tensors(model: torch.nn.Module, captured: Captured) -> int:
    """Tensors of the model's state that the passes replaced in the graph module, written back."""
    gm = captured.gm
    written = 0
    for node in gm.graph.nodes:
        if node.op != "get_attr" or ir.get(node, ir.PARAM) is None:
            continue
        new = ir.fetch_attr(gm, node.target)
        owner_name, _, attr = node.target.rpartition(".")
        try:
            owner = model.get_submodule(owner_name) if owner_name else model
        except AttributeError:
            raise LowbitError(f"compress: the graph reads {node.target}, whose module {owner_name!r} is not in the "
                              "model") from None
        current = getattr(owner, attr, None)
        if current is new:
            continue
        if isinstance(current, torch.Tensor) and captured.frozen.get(node.target) is current:
            current.data = new.detach()  # the graph read the model's own tensor here: aliases (tied weights) follow
        elif attr in dict(owner.named_buffers(recurse=False)):
            owner.register_buffer(attr, new.detach())
        else:  # a tensor of its own under this FQN (an untied head, a bias the folding created)
            setattr(owner, attr, torch.nn.Parameter(new.detach(), requires_grad=False))
        written += 1
    return written


def _activation_module(model: torch.nn.Module, x: Any) -> torch.nn.Module | None:
    """The module whose whole forward computed ``x`` when it is a parameter-free leaf (an MLP's
    ``act_fn``): a threshold on its output becomes a forward hook. None otherwise."""
    info = ir.get(x, ir.MODULE) if isinstance(x, fx.Node) else None
    if info is None or not info.fqn:
        return None
    try:
        module = model.get_submodule(info.fqn)
    except AttributeError:
        return None
    if list(module.children()) or list(module.parameters(recurse=False)):
        return None
    others = [n for n in x.graph.nodes if n is not x and n.op in ("call_function", "call_method", "call_module")
              and (i := ir.get(n, ir.MODULE)) is not None and i.fqn == info.fqn
              and n.target is not torch.ops.lowbit.act_sparsify.default]
    return None if others else module


def add_output_threshold(module: torch.nn.Module, threshold: torch.Tensor,
                         col_scale: torch.Tensor | None = None) -> None:
    """``lowbit::act_sparsify`` on ``module``'s output, as a forward hook (CATS on the gate
    activation); the tensors become buffers (``lowbit_output_threshold``, ``lowbit_output_col_scale``)."""
    module.register_buffer("lowbit_output_threshold", threshold)
    module.register_buffer("lowbit_output_col_scale", col_scale)
    module.register_forward_hook(_output_threshold_hook)


def _output_threshold_hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return torch.ops.lowbit.act_sparsify(out, module.lowbit_output_threshold, module.lowbit_output_col_scale)


def add_input_transforms(module: torch.nn.Module, input_hadamard: bool = False,
                         input_signs: torch.Tensor | None = None,
                         input_transform: tuple[torch.Tensor, torch.Tensor] | None = None,
                         input_threshold: torch.Tensor | None = None,
                         input_col_scale: torch.Tensor | None = None) -> None:
    """Input transforms in front of a float linear, as a forward pre-hook; their tensors become
    buffers of the module (``lowbit_input_signs``, ``lowbit_transform_left/right``), so they are in
    ``state_dict()`` and saved with the model. ``module.lowbit_input_hadamard`` marks the module."""
    left, right = input_transform or (None, None)
    module.lowbit_input_hadamard = input_hadamard
    for name, t in (("lowbit_input_signs", input_signs), ("lowbit_transform_left", left),
                    ("lowbit_transform_right", right), ("lowbit_input_threshold", input_threshold),
                    ("lowbit_input_col_scale", input_col_scale)):
        if t is not None:
            module.register_buffer(name, t)
    module.register_forward_pre_hook(_input_transform_pre_hook)


def input_transforms_of(module: torch.nn.Module) -> dict[str, Any] | None:
    """The transforms :func:`add_input_transforms` put in front of ``module`` (None: none)."""
    if not hasattr(module, "lowbit_input_hadamard"):
        return None
    left = getattr(module, "lowbit_transform_left", None)
    return {"input_hadamard": module.lowbit_input_hadamard, "input_signs": getattr(module, "lowbit_input_signs", None),
            "input_transform": None if left is None else (left, module.lowbit_transform_right),
            "input_threshold": getattr(module, "lowbit_input_threshold", None),
            "input_col_scale": getattr(module, "lowbit_input_col_scale", None)}


def _input_transform_pre_hook(module: torch.nn.Module, args: tuple) -> tuple:
    return (apply_input_transforms(args[0], **input_transforms_of(module)), *args[1:])


def apply_input_transforms(x: torch.Tensor, input_hadamard: bool = False, input_signs: torch.Tensor | None = None,
                           input_transform: tuple[torch.Tensor, torch.Tensor] | None = None,
                           input_threshold: torch.Tensor | None = None,
                           input_col_scale: torch.Tensor | None = None) -> torch.Tensor:
    """What passes put in front of a linear, in graph order: R4 (``(x D) H``), then FlatQuant's
    ``kron_transform``, then activation sparsity's threshold."""
    if input_hadamard:
        x = r4_input(x, input_signs)
    if input_transform is not None:
        x = torch.ops.lowbit.kron_transform(x, *input_transform)
    if input_threshold is not None:
        x = torch.ops.lowbit.act_sparsify(x, input_threshold, input_col_scale)
    return x


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
