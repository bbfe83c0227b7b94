"""Calibration: run data through the model, block by block, and hand each block's statistics to a
callback (the rounding algorithms quantize there, while the Hessians are in memory).

How (module hooks in the offline flow, the choice the design allows):

1. The repeated blocks are found from the module tree: the ``nn.ModuleList`` holding the most
   parameters whose children contain linear layers (``model.layers``, ``encoder.layer``, ``h``).
2. One forward per batch runs until the first block, whose inputs (positional and keyword: masks,
   rotary embeddings) are stored, then stops.
3. Each block runs alone on the stored inputs with hooks on its selected linears (``nn.Linear`` or
   GPT-2's ``Conv1D``) accumulating :class:`LinearStats`; ``on_block`` gets them and may return
   fake-quantized weights, which are swapped in to compute the block's outputs (the next block's
   inputs), as GPTQ does, so errors are seen downstream; the float weights are put back.
4. Linears outside the blocks (an LM head, a pooler) get one more full forward with hooks.

Peak memory: one block's activations for all calibration batches, plus one block's statistics.
A progress bar (tqdm) shows blocks done and the time left.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import torch

from lowbit_compiler.pass_base import LowbitError


@dataclasses.dataclass
class LinearStats:
    """What the passes ask for about one linear's input ``x`` [rows, K]."""

    rows: int = 0
    hessian: torch.Tensor | None = None  # sum of x^T x (float32); GPTQ uses 2/rows * this
    absmax: torch.Tensor | None = None   # per input channel
    abssum: torch.Tensor | None = None   # per input channel (mean |x| = abssum / rows)

    def add(self, x: torch.Tensor, hessian: bool) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.absmax is None:
            k = x.shape[-1]
            self.absmax, self.abssum = torch.zeros(k), torch.zeros(k)
            self.hessian = torch.zeros(k, k) if hessian else None
        self.rows += x.shape[0]
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        self.abssum += x.abs().sum(0)
        if self.hessian is not None:
            self.hessian += x.T @ x

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abssum / max(self.rows, 1)

    def gptq_hessian(self) -> torch.Tensor:
        return 2.0 * self.hessian / max(self.rows, 1)


def as_batches(calibration: Any, tokenizer: Any = None, max_length: int = 512) -> list[dict[str, torch.Tensor]]:
    """Model-input dicts from token-id tensors, dicts, an iterable/DataLoader of either, or strings
    with a tokenizer."""
    if calibration is None:
        return []
    if isinstance(calibration, (torch.Tensor, str, dict)):
        calibration = [calibration]
    batches = []
    for item in calibration:
        if isinstance(item, str):
            if tokenizer is None:
                raise LowbitError("calibration: strings need a tokenizer: compress(..., calibration=texts, "
                                  "tokenizer=AutoTokenizer.from_pretrained(...))")
            batches.append(dict(tokenizer(item, return_tensors="pt", truncation=True, max_length=max_length)))
        elif isinstance(item, torch.Tensor):
            if item.dtype not in (torch.long, torch.int32, torch.int64):
                raise LowbitError(f"calibration: a tensor item must hold token ids (integer); got {item.dtype}")
            batches.append({"input_ids": item if item.dim() == 2 else item.reshape(1, -1)})
        elif isinstance(item, dict):
            batches.append(dict(item))
        elif isinstance(item, (list, tuple)) and item and isinstance(item[0], torch.Tensor):
            batches.append({"input_ids": item[0] if item[0].dim() == 2 else item[0].reshape(1, -1)})
        else:
            raise LowbitError(f"calibration: unsupported item {type(item).__name__}; give token-id tensors, "
                              "dicts of model inputs, or strings with a tokenizer")
    return batches


def is_linear_module(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def weight_of(module: torch.nn.Module) -> torch.Tensor:
    """[out, in] view of a linear-like module's weight (GPT-2's Conv1D stores [in, out])."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


def find_blocks(model: torch.nn.Module) -> tuple[str, list[torch.nn.Module]]:
    best, best_params = ("", []), 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0 and all(
                any(is_linear_module(m) for m in child.modules()) for child in module):
            params = sum(p.numel() for p in module.parameters())
            if params > best_params:
                best, best_params = (name, list(module)), params
    return best


class _Stop(Exception):
    pass


StatsByLayer = dict[str, tuple[torch.nn.Module, LinearStats]]


def calibrate(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], select: Callable[[str], bool],
              on_block: Callable[[StatsByLayer], dict[str, torch.Tensor] | None], hessian: bool = True,
              progress: bool = True) -> dict[str, Any]:
    """Run ``batches`` through ``model`` block by block (see the module docstring); returns timing."""
    if not batches:
        raise LowbitError("calibrate: no calibration batches")
    start = time.perf_counter()
    names = {m: n for n, m in model.named_modules()}
    prefix, blocks = find_blocks(model)
    extra = _no_cache_kwargs(model)
    was_training = model.training
    model.eval()
    inputs: list[tuple[tuple, dict]] = []

    def grab(module, args, kwargs):
        inputs.append((args, kwargs))
        raise _Stop

    with torch.no_grad():
        done_in_blocks: set[str] = set()
        if blocks:
            handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
            try:
                for batch in batches:
                    try:
                        model(**batch, **extra)
                    except _Stop:
                        pass
            finally:
                handle.remove()
            bar = _progress(len(blocks), f"calibrating {prefix or 'blocks'}", progress)
            for block in blocks:
                linears = {names[m]: m for m in block.modules() if is_linear_module(m) and select(names[m])}
                done_in_blocks.update(names[m] for m in block.modules() if is_linear_module(m))
                stats = _observe(linears, hessian, lambda: [block(*a, **k) for a, k in inputs])
                replacements = on_block(stats) or {}
                with _swapped(linears, replacements):
                    outputs = [block(*a, **k) for a, k in inputs]
                inputs = [((_first(out),) + tuple(a[1:]), k) for out, (a, k) in zip(outputs, inputs)]
                bar.update(1)
            bar.close()
        rest = {names[m]: m for m in model.modules()
                if is_linear_module(m) and names[m] not in done_in_blocks and select(names[m])}
        if rest:
            on_block(_observe(rest, hessian, lambda: [model(**b, **extra) for b in batches]))
    model.train(was_training)
    return {"seconds": time.perf_counter() - start, "blocks": len(blocks), "batches": len(batches),
            "tokens": sum(int(b["input_ids"].numel()) for b in batches if "input_ids" in b)}


def _observe(linears: dict[str, torch.nn.Module], hessian: bool, run: Callable[[], Any]) -> StatsByLayer:
    stats = {name: (m, LinearStats()) for name, m in linears.items()}
    handles = [m.register_forward_pre_hook(lambda mod, args, s=s: s.add(args[0], hessian))
               for m, s in stats.values()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return stats


class _swapped:
    """Temporarily replace linear weights (given as [out, in]) by ``replacements``."""

    def __init__(self, linears: dict[str, torch.nn.Module], replacements: dict[str, torch.Tensor]):
        self.items = [(linears[n], w) for n, w in replacements.items() if n in linears]
        self.saved: list[torch.Tensor] = []

    def __enter__(self):
        for module, w in self.items:
            self.saved.append(module.weight.data)
            new = w.t() if type(module).__name__ == "Conv1D" else w
            module.weight.data = new.to(module.weight.dtype).contiguous()

    def __exit__(self, *exc):
        for (module, _), old in zip(self.items, self.saved):
            module.weight.data = old


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _no_cache_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return {"use_cache": False} if config is not None and hasattr(config, "use_cache") else {}


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="block", disable=not enabled, leave=False)
