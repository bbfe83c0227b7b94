"""The calibration engine: every data-driven pass runs the captured graph on calibration data here.

A data-driven pass (``gptq``, ``awq``, ``smoothquant``, ``mixed_precision``,
``observe_activations``, ``spinquant``, ``flatquant``) says what it needs and gets it from
:meth:`Calibration.run`:

* per linear input ``x`` [rows, K]: ``hessian`` (``sum x^T x``), ``absmax`` and ``mean_abs`` per
  input channel, ``samples`` (the rows of ``x``, for one block at a time); for a grouped matmul
  over stacked experts, the same per expert from the rows routed to it (``LinearStats.experts``);
* per node: ``range`` (min and max of its output);
* the model's outputs for a loss (:meth:`Calibration.outputs`), and the batches themselves as
  graph arguments (:attr:`Calibration.args`) for passes that run the graph their own way.

How the graph runs (the same in ``compress(..., calibration=)`` and ``torch.compile(...,
options={"calibration": ...})``):

1. **Blocks from the graph.** Every node carries the FQN of the module that computed it
   (``ir.MODULE``). The repeated blocks are the children of the module list that most nodes
   belong to: the first integer atom of an FQN (``model.layers.3.mlp.up_proj`` -> block
   ``model.layers.3``), whether or not the model keeps them in an ``nn.ModuleList``. Nodes before
   the first block (embeddings, masks, rotary tables) form segment 0; nodes after the last one
   (the final norm, the head) the last segment.
2. **Sequentially.** Segment by segment, every batch runs through the segment with observers on
   the nodes the pass selected; the pass's ``on_block`` then decides for that block (quantizes
   its linears, folds scales, records a choice) and may rewrite the block's nodes. If it did, the
   segment runs again, so the next block's inputs are computed with everything decided so far
   (quantized weights included: ``lowbit::`` ops run their float reference here).
3. **One block in memory.** Between segments only the values a later segment reads (the
   residual stream, masks, positions) are kept, per batch; a segment's intermediates are dropped
   as soon as it is done.

One progress bar per run (pass name, block, time left).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import re
import time
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx

from lowbit_compiler import _dynamo_adapter, ir
from lowbit_compiler.pass_base import LowbitError

log = logging.getLogger("lowbit_compiler")

NEEDS = frozenset({"hessian", "absmax", "mean_abs", "samples", "range"})


@dataclasses.dataclass
class LinearStats:
    """What the passes ask for about one observed tensor ``x`` (a linear's input [rows, K], or
    a node's output for ``range``)."""

    rows: int = 0
    hessian: torch.Tensor | None = None  # sum of x^T x (float32); GPTQ uses 2/rows * this
    absmax: torch.Tensor | None = None   # per input channel
    abssum: torch.Tensor | None = None   # per input channel (mean |x| = abssum / rows)
    samples: list[torch.Tensor] = dataclasses.field(default_factory=list)  # rows of x (float32)
    min: float = float("inf")            # range of the values seen
    max: float = float("-inf")
    experts: list["LinearStats"] | None = None  # a grouped matmul's input: the statistics of each expert's rows

    def add_grouped(self, x: torch.Tensor, offs: torch.Tensor, needs: Iterable[str]) -> None:
        """A grouped matmul's input (rows sorted by expert, ``offs`` cumulative counts): the rows
        of expert ``e`` go into ``experts[e]`` (an expert no token reached keeps ``rows == 0``)."""
        from lowbit_compiler.ops import expert_bounds

        if self.experts is None:
            self.experts = [LinearStats() for _ in range(offs.shape[0])]
        self.rows += x.shape[0]
        for e, start, end in expert_bounds(offs, x.shape[0]):
            self.experts[e].add(x[start:end], needs)

    def add(self, x: torch.Tensor, needs: Iterable[str] = ("hessian", "absmax", "mean_abs")) -> None:
        needs = set(needs)
        x = x.detach().reshape(-1, x.shape[-1]).float()
        k = x.shape[-1]
        self.rows += x.shape[0]
        if needs & {"absmax", "mean_abs", "hessian"} and self.absmax is None:
            self.absmax, self.abssum = torch.zeros(k, device=x.device), torch.zeros(k, device=x.device)
        if self.absmax is not None:
            self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
            self.abssum += x.abs().sum(0)
        if "hessian" in needs:
            self.hessian = x.T @ x if self.hessian is None else self.hessian + x.T @ x
        if "samples" in needs:
            self.samples.append(x.clone())
        if "range" in needs and x.numel():
            self.min, self.max = min(self.min, float(x.min())), max(self.max, float(x.max()))

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abssum / max(self.rows, 1)

    def gptq_hessian(self) -> torch.Tensor:
        return 2.0 * self.hessian / max(self.rows, 1)

    def sample_rows(self, limit: int | None = None) -> torch.Tensor:
        """The observed rows (at most ``limit``, evenly spaced over all calibration tokens)."""
        rows = torch.cat(self.samples) if self.samples else torch.empty(0)
        if limit is not None and rows.shape[0] > limit:
            rows = rows[torch.linspace(0, rows.shape[0] - 1, limit).long()]
        return rows


# --------------------------------------------------------------------------------------------
# Calibration data: model inputs, and the same batches as arguments of one captured graph
# --------------------------------------------------------------------------------------------

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


def fingerprint(batches: Sequence[dict[str, Any]]) -> str:
    """A digest of the calibration data: results computed from it are cached under it, so the
    prefill and decode graphs of one compiled model share them."""
    h = hashlib.sha1()
    for batch in batches:
        for key in sorted(batch):
            value = batch[key]
            h.update(key.encode())
            if isinstance(value, torch.Tensor):
                h.update(str((tuple(value.shape), value.dtype)).encode())
                h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            else:
                h.update(repr(value).encode())
    return h.hexdigest()[:16]


def for_graph(gm: fx.GraphModule, batches: list[dict[str, Any]], progress: bool = True,
              example_args: Sequence[Any] | None = None) -> "Calibration":
    """The batches as argument tuples of ``gm``: each placeholder is found by the name of the
    model input Dynamo read it from (``input_ids``, ``attention_mask``), or, for a positional
    argument, as the batch tensor the call passed (``example_args``: the graph's arguments of the
    captured call). Batches whose shapes differ from the captured ones are left out (the graph is
    specialised to its shapes); if none is left, or an input is not in the batches,
    :attr:`Calibration.unusable` says why."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = [_dynamo_adapter.input_name(p) for p in placeholders]
    for i, value in enumerate(example_args or ()):
        if i < len(names) and names[i] is None and isinstance(value, torch.Tensor):
            names[i] = next((k for b in batches for k, v in b.items() if v is value), None) or next(
                (k for b in batches for k, v in b.items() if isinstance(v, torch.Tensor) and v.shape == value.shape
                 and v.dtype == value.dtype and torch.equal(v, value)), None)
    shapes = [getattr(_dynamo_adapter.example_value(p), "shape", None) for p in placeholders]
    # batches are usually made on the CPU (tokenizers return CPU tensors): each goes to the device
    # the graph was captured on
    devices = [getattr(_dynamo_adapter.example_value(p), "device", None) for p in placeholders]
    derived = None
    if "decoder_input_ids" in names and not any("decoder_input_ids" in b for b in batches):
        batches, derived = with_decoder_inputs(batches, names, shapes, example_args)
    # the key of cached results: the data as the user gave it, before inputs derived below (a decode
    # graph, where nothing can be derived, must find what the prefill graph computed)
    fp = fingerprint(batches)
    batches, positions = with_position_inputs(batches, names, example_args)
    if positions:
        derived = "; ".join(filter(None, (derived, positions)))
    keys = sorted({k for b in batches for k in b})
    missing = [n or p.name for n, p in zip(names, placeholders) if n is None or not any(n in b for b in batches)]
    if missing:
        return Calibration(gm, [], fp, progress, unusable=(
            f"the graph's inputs {missing} are not in the calibration batches (keys {keys}); data-driven passes "
            "run on graphs whose inputs are model inputs such as input_ids (the first call's graph, not a decode "
            "step's)" + (f"; {derived}" if derived and derived.startswith("cannot") else "")
            + ("; position_ids / cache_position / attention_mask are built from input_ids only when the captured "
               "call's are those of a prompt from position 0 without padding" if set(missing) & set(_POSITIONAL)
               else "")))
    args, skipped = [], []
    for batch in batches:
        values = tuple(v.to(d) if isinstance(v, torch.Tensor) and d is not None and v.device != d else v
                       for v, d in zip((batch.get(n) for n in names), devices))
        if all(isinstance(v, torch.Tensor) and (s is None or tuple(v.shape) == tuple(s)) for v, s in zip(values, shapes)):
            args.append(values)
        else:
            skipped.append({n: tuple(getattr(v, "shape", ())) for n, v in zip(names, values)})
    if not args:
        captured = {n: tuple(s) if s is not None else None for n, s in zip(names, shapes)}
        return Calibration(gm, [], fp, progress, unusable=(
            f"the graph was captured for input shapes {captured}, and no calibration batch has them (e.g. "
            f"{skipped[0]}); call the compiled model first with a calibration batch (compiled(**batches[0])) "
            "so that its graph has the calibration shapes, or use lowbit_compiler.compress"))
    if skipped:
        log.info("calibration: %d of %d batches have the captured shapes %s; data-driven passes see those",
                 len(args), len(batches), [tuple(s) if s is not None else None for s in shapes])
    if derived:
        log.info("calibration: %s", derived)
    return Calibration(gm, args, fp, progress, derived=derived)


_POSITIONAL = ("position_ids", "cache_position", "attention_mask")


def _from_ids(name: str, captured: Any, ids: torch.Tensor) -> torch.Tensor | None:
    """``name`` for a batch of token ids ``ids`` [B, L] when the captured call's value is what a
    prompt from position 0 without padding has (``generate()``'s prefill): ``position_ids``
    ``0..L-1`` per row, ``cache_position`` ``0..L-1``, ``attention_mask`` all ones; else None."""
    if not isinstance(captured, torch.Tensor) or not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return None
    length = captured.shape[-1] if captured.dim() else 0
    ramp = torch.arange(length, device=captured.device)
    if name == "position_ids" and captured.dim() == 2 and torch.equal(captured, ramp.expand_as(captured).to(captured.dtype)):
        return torch.arange(ids.shape[1], dtype=captured.dtype, device=ids.device).expand(ids.shape[0], -1)
    if name == "cache_position" and captured.dim() == 1 and torch.equal(captured, ramp.to(captured.dtype)):
        return torch.arange(ids.shape[1], dtype=captured.dtype, device=ids.device)
    if name == "attention_mask" and captured.dim() == 2 and bool((captured == 1).all()):
        return torch.ones(ids.shape, dtype=captured.dtype, device=ids.device)
    return None


def with_position_inputs(batches: list[dict[str, Any]], names: list[str | None],
                         example_args: Sequence[Any] | None) -> tuple[list[dict[str, Any]], str | None]:
    """The inputs ``generate()`` adds to the prefill call (``position_ids``, ``cache_position``,
    ``attention_mask``) built for token-id batches that lack them, from each batch's ``input_ids``:
    only when the captured call had exactly what a prompt from position 0 without padding has
    (:func:`_from_ids`), so the prefill graph of ``model.generate(batch)`` calibrates on the data,
    and a decode step's graph (positions not from 0, a cache) does not. Returns the batches and a
    note for the report (None when nothing was built)."""
    built = []
    for i, name in enumerate(names):
        if name not in _POSITIONAL or example_args is None or i >= len(example_args):
            continue
        if any(name in b for b in batches) or not all(isinstance(b.get("input_ids"), torch.Tensor) for b in batches):
            continue
        made = [_from_ids(name, example_args[i], b["input_ids"]) for b in batches]
        if all(m is not None for m in made):
            batches = [{**b, name: m} for b, m in zip(batches, made)]
            built.append(name)
    if not built:
        return batches, None
    return batches, (f"{', '.join(built)} built for every batch from its input_ids (positions from 0, no padding), "
                     "as the captured call had them; pass dicts with these keys to choose them")


def with_decoder_inputs(batches: list[dict[str, Any]], names: list[str | None], shapes: list[Any],
                        example_args: Sequence[Any] | None) -> tuple[list[dict[str, Any]], str]:
    """Decoder inputs for an encoder-decoder graph (T5) from token-id batches: each batch's
    ``decoder_input_ids`` are its own ``input_ids`` shifted right behind the decoder's first token
    (teacher forcing, as ``shift_right(labels)`` builds them), cut to the captured decoder length.
    The first token is the one the captured call's decoder ids begin with (the decoder start
    token under ``generate()`` and for ``shift_right(labels)``). Returns the batches and a note
    for the report (starting with "cannot" when nothing could be built)."""
    i = names.index("decoder_input_ids")
    call = example_args[i] if example_args is not None and i < len(example_args) else None
    shape = shapes[i]
    if not isinstance(call, torch.Tensor) or call.dim() != 2 or shape is None or len(shape) != 2:
        return batches, ("cannot build decoder_input_ids for this encoder-decoder graph: give each calibration "
                         "batch as a dict with 'input_ids' and 'decoder_input_ids' (the decoder start token, then "
                         "the target tokens)")
    start, length = int(call.reshape(-1)[0]), int(shape[1])
    out = []
    for b in batches:
        ids = b.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            first = torch.full((ids.shape[0], 1), start, dtype=ids.dtype, device=ids.device)
            b = {**b, "decoder_input_ids": torch.cat([first, ids[:, : length - 1]], dim=1)}
        out.append(b)
    return out, (f"decoder_input_ids built for every batch: the decoder's first token {start} (as the captured call "
                 f"began), then the batch's input_ids shifted right, {length} positions (the captured decoder "
                 "length); pass dicts with 'decoder_input_ids' to choose them")


# --------------------------------------------------------------------------------------------
# Blocks, found from the layer FQNs of the graph
# --------------------------------------------------------------------------------------------

_INDEX = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")


def block_of(fqn: str) -> tuple[str, str] | None:
    """(module list, block FQN) of a module FQN: its first integer atom (``model.layers.3.mlp`` ->
    ("model.layers", "model.layers.3")), else None."""
    m = _INDEX.match(fqn)
    return (m.group(1), f"{m.group(1)}.{m.group(2)}") if m else None


def find_blocks(gm: fx.GraphModule) -> tuple[str, list[str]]:
    """The module list most nodes belong to, and its blocks in graph order ("", [] if none)."""
    votes: dict[str, int] = {}
    for node in gm.graph.nodes:
        module = ir.get(node, ir.MODULE)
        found = block_of(module.fqn) if module is not None else None
        if found is not None:
            votes[found[0]] = votes.get(found[0], 0) + 1
    if not votes:
        return "", []
    prefix = max(votes, key=votes.get)
    blocks: list[str] = []
    for node in gm.graph.nodes:
        module = ir.get(node, ir.MODULE)
        found = block_of(module.fqn) if module is not None else None
        if found is not None and found[0] == prefix and found[1] not in blocks:
            blocks.append(found[1])
    return prefix, blocks


@dataclasses.dataclass(frozen=True)
class Block:
    """One segment of the graph as the engine runs it."""

    index: int   # 0: before the first block; 1..n: the blocks; n + 1: after the last
    name: str    # "model.layers.3", "(before blocks)", "(after blocks)"


def _segments(gm: fx.GraphModule, known: dict[fx.Node, int], blocks: list[str]) -> dict[fx.Node, int]:
    """Segment of every node: its block's, carried forward through nodes without a block (nodes
    passes inserted inherit the segment of the node before them); after the last block node,
    the tail segment."""
    position = {b: i + 1 for i, b in enumerate(blocks)}
    nodes = list(gm.graph.nodes)
    seg: dict[fx.Node, int] = {}
    last_block_node = -1
    for i, node in enumerate(nodes):
        module = ir.get(node, ir.MODULE)
        found = block_of(module.fqn) if module is not None else None
        if found is not None and found[1] in position:
            last_block_node = i
    running = 0
    for i, node in enumerate(nodes):
        if node in known:
            s = known[node]
        else:
            module = ir.get(node, ir.MODULE)
            found = block_of(module.fqn) if module is not None else None
            own = position.get(found[1]) if found is not None else None
            s = own if own is not None else running
            if i > last_block_node and blocks and node.op != "output":
                s = len(blocks) + 1
        running = max(running, s)
        seg[node] = running
    return seg


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------

@functools.cache
def _reference_targets() -> dict[Any, Callable]:
    """lowbit ops run their float reference during calibration (fp32 dequantised weights, as
    fake quantization would), not the packed CPU kernels (bf16 compute)."""
    from lowbit_compiler import ops

    return {torch.ops.lowbit.wo_linear.default: ops.wo_linear_reference,
            torch.ops.lowbit.grouped_linear.default: ops.grouped_linear_reference}


@dataclasses.dataclass
class Calibration:
    """The calibration batches of one captured graph, and the engine that runs them."""

    gm: fx.GraphModule
    args: list[tuple[Any, ...]]   # one argument tuple per usable batch, in placeholder order
    fingerprint: str
    progress: bool = True
    unusable: str | None = None   # why no batch fits this graph (then ``args`` is empty)
    derived: str | None = None    # inputs built for the batches (an encoder-decoder's decoder ids)

    def require(self, pass_name: str) -> None:
        if not self.args:
            raise LowbitError(f"pass {pass_name!r} needs calibration data, and none fits this graph: {self.unusable}")

    def run(self, pass_name: str, select: Callable[[fx.Node], bool], needs: Iterable[str],
            on_block: Callable[[Block, dict[fx.Node, LinearStats]], bool] | None = None,
            at: str = "input") -> dict[str, Any]:
        """Run the graph segment by segment over all batches (module docstring). ``select(node)``
        picks the observed nodes; ``at`` = "input" observes their first argument (a linear's
        input), "output" their value.
        ``on_block(block, stats)`` returns whether it rewrote the block (then the block runs again).
        Returns timing and counts."""
        self.require(pass_name)
        needs = set(needs)
        if needs - NEEDS:
            raise LowbitError(f"calibration: unknown needs {sorted(needs - NEEDS)}; known: {sorted(NEEDS)}")
        gm = self.gm
        start = time.perf_counter()
        prefix, blocks = find_blocks(gm)
        seg = _segments(gm, {}, blocks)
        names = ["(before blocks)", *blocks, "(after blocks)"]
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        envs = [dict(zip(placeholders, a)) for a in self.args]
        bar = _progress(len(names), f"{pass_name}: calibrating {prefix or 'graph'}", self.progress)
        rewritten = 0
        rows: dict[str, int] = {}  # observed rows per node (the module's FQN)
        with torch.no_grad():
            for index, name in enumerate(names):
                seg = _segments(gm, seg, blocks)
                if not any(s == index for n, s in seg.items() if n.op not in ("placeholder", "get_attr", "output")):
                    bar.update(1)
                    continue
                stats: dict[fx.Node, LinearStats] = {}
                observe = (select, needs, stats, at)
                pending = [self._run_segment(index, seg, env, observe) for env in envs]
                for node, observed in stats.items():
                    module = ir.get(node, ir.MODULE)
                    rows[module.fqn if module is not None and module.fqn else node.name] = observed.rows
                changed = bool(on_block(Block(index, name), stats)) if on_block is not None else False
                if changed:
                    rewritten += 1
                    gm.graph.lint()
                    seg = _segments(gm, seg, blocks)
                    pending = [self._run_segment(index, seg, env, None) for env in envs]
                for env, values in zip(envs, pending):
                    env.update(values)
                    self._drop_dead(env, seg, index)
                bar.set_postfix_str(name)
                bar.update(1)
        bar.close()
        if rewritten:
            gm.recompile()
        tokens = self._tokens(placeholders)
        fewer = {k: v for k, v in rows.items() if tokens and v < tokens}
        if fewer:  # e.g. the head under generate(): its prefill graph computes the last position's logits only
            log.warning("calibration (%s): %s saw fewer rows than the %d calibration tokens: the graph computes them "
                        "for part of the tokens only (generate()'s prefill keeps the last position's logits), so "
                        "their statistics come from those rows. To calibrate them on every token, call the compiled "
                        "model on a calibration batch first (compiled(batch)), or use lowbit_compiler.compress",
                        pass_name, fewer, tokens)
        return {"seconds": round(time.perf_counter() - start, 3), "blocks": len(blocks), "batches": len(self.args),
                "segments_rewritten": rewritten, **({"derived_inputs": self.derived} if self.derived else {}),
                **({"fewer_rows": fewer} if fewer else {})}

    def outputs(self) -> list[Any]:
        """The graph's outputs for every batch (the float model's, before later passes change it)."""
        with torch.no_grad():
            return [_Executor(self.gm).run_all(a) for a in self.args]

    # ---- internals -------------------------------------------------------------------------

    def _tokens(self, placeholders: list[fx.Node]) -> int | None:
        """Calibration tokens a decoder-only graph runs (the ``input_ids`` of every batch); None for
        graphs without ``input_ids`` or with a decoder of their own (encoder and decoder lengths differ)."""
        names = [_dynamo_adapter.input_name(p) for p in placeholders]
        if "input_ids" not in names or "decoder_input_ids" in names:
            return None
        i = names.index("input_ids")
        return sum(a[i].numel() for a in self.args if isinstance(a[i], torch.Tensor))

    def _run_segment(self, index: int, seg: dict[fx.Node, int], env: dict[fx.Node, Any], observe) -> dict[fx.Node, Any]:
        """Run one segment for one batch; returns the values a later segment (or the output) reads.
        Intermediates are dropped as soon as every reader has run."""
        executor = _Executor(self.gm, env)
        local = executor.local

        def needed_later(n: fx.Node) -> bool:
            return any(seg.get(u, index) > index or u.op == "output" for u in n.users)

        executed: set[fx.Node] = set()
        for node in self.gm.graph.nodes:
            if seg.get(node) != index or node.op in ("placeholder", "get_attr", "output"):
                continue
            local[node] = executor.execute(node)
            executed.add(node)
            if observe is not None:
                select, needs, stats, at = observe
                if select(node):
                    grouped = ir.grouped_parts(node) if at == "input" else None
                    value = local[node] if at == "output" else executor.value(
                        grouped.x if grouped is not None else node.args[0])
                    if isinstance(value, torch.Tensor) and value.is_floating_point():
                        if grouped is not None:  # stacked experts: statistics per expert, from its rows
                            stats.setdefault(node, LinearStats()).add_grouped(value, executor.value(grouped.offs), needs)
                        else:
                            stats.setdefault(node, LinearStats()).add(value, needs)
            for arg in node.all_input_nodes:
                if arg in local and not needed_later(arg) and all(u in executed for u in arg.users):
                    del local[arg]
        return {n: v for n, v in local.items() if needed_later(n)}

    @staticmethod
    def _drop_dead(env: dict[fx.Node, Any], seg: dict[fx.Node, int], index: int) -> None:
        for node in list(env):
            if node.op != "placeholder" and not any(seg.get(u, index + 1) > index or u.op == "output" for u in node.users):
                del env[node]


class _Executor:
    """Runs single nodes of a graph against an environment of values (placeholders and the values
    earlier segments kept); ``get_attr`` reads the graph module; lowbit ops run their reference."""

    def __init__(self, gm: fx.GraphModule, env: dict[fx.Node, Any] | None = None):
        self.gm, self.env, self.local = gm, env if env is not None else {}, {}
        self.references = _reference_targets()

    def value(self, node: Any) -> Any:
        if not isinstance(node, fx.Node):
            return node
        if node in self.local:
            return self.local[node]
        if node in self.env:
            return self.env[node]
        if node.op == "get_attr":
            return ir.fetch_attr(self.gm, node.target)
        if node.op == "placeholder":
            raise LowbitError(f"calibration: no value for graph input {node.name}")
        # a node of an earlier segment that a pass inserted after that segment ran
        self.local[node] = self.execute(node)
        return self.local[node]

    def execute(self, node: fx.Node) -> Any:
        args = fx.node.map_arg(node.args, self.value)
        kwargs = fx.node.map_arg(node.kwargs, self.value)
        if node.op == "call_function":
            return self.references.get(node.target, node.target)(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":
            return self.gm.get_submodule(node.target)(*args, **kwargs)
        raise LowbitError(f"calibration: cannot execute node {node.name} ({node.op})")

    def run_all(self, args: tuple[Any, ...]) -> Any:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        self.env = dict(zip(placeholders, args))
        for node in self.gm.graph.nodes:
            if node.op == "output":
                return fx.node.map_arg(node.args[0], self.value)
            if node.op not in ("placeholder", "get_attr"):
                self.local[node] = self.execute(node)
        return None


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="block", disable=not enabled, leave=False)
