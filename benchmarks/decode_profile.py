"""Where one batch-1 decode step of a compiled lowbit model spends its time (the model of
``decode_cpu.py``: Llama, hidden 2048, intermediate 5632, 16 heads / 4 KV heads, vocab 32000).

For each recipe: the median step time; the time inside the generated GEMV calls
(``cpu_codegen.Bound`` / ``BoundGroup``), the activation-sparse rows (``cpu_sparse.RowCall``: TEAL
recipes such as ``teal-50+w8a16``; their floor counts the whole K-major copy, so at 50 % sparsity
the floor of what they read is half of it) and torch's packed kernels, per call kind (shape and
fusion), each against its read-bandwidth floor (bytes of codes + scales + zero points / the
bandwidth of a large fp32 sum measured in this run); and what is left outside the GEMVs, split by
torch.profiler's self CPU time per aten op (attention, norms, RoPE, KV-cache cats) plus the graph's
Python around them (step time minus the profiled ops and GEMVs).

    python benchmarks/decode_profile.py [--recipes w4a16,w8a16,teal-50+w8a16] [--layers 8] [--steps 12]

Recipes with a data-driven pass (``teal-*``, ``wina-*``, ``cats-*``, ``s24-wanda``, GPTQ, ...) are
compressed with four random 64-token prompts first, then compiled, as ``decode_cpu.py`` does.
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from lowbit_compiler.backends import cpu_codegen, cpu_kernels, cpu_sparse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_cpu import calibration_prompts, needs_calibration, read_bandwidth  # noqa: E402

_timing: dict[str, list[float]] = collections.defaultdict(list)
_bytes: dict[str, int] = {}
_active = [False]


def _weight_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _instrument() -> None:
    """Wrap the generated kernels' call objects and torch's packed path with perf_counter timers."""
    bound_call, group_call, torch_call = cpu_codegen.Bound.__call__, cpu_codegen.BoundGroup.__call__, \
        cpu_kernels.torch_packed_linear
    bound_ext, group_ext = cpu_codegen.Bound.ext, cpu_codegen.BoundGroup.ext  # with the folded norm / residual
    row_call = cpu_sparse.RowCall.__call__  # the activation-sparse kernel's decode row (TEAL / WINA / CATS)

    def timed(key: str, nbytes: int, fn, *args):
        if not _active[0]:
            return fn(*args)
        start = time.perf_counter()
        out = fn(*args)
        _timing[key].append(time.perf_counter() - start)
        _bytes[key] = nbytes
        return out

    def bound(self, x, bias):
        return timed(f"{self.fmt} N={self.n} K={self.k}", _weight_bytes(self.tensors), bound_call, self, x, bias)

    def group(self, x, biases):
        what = "silu_mul" if self.epilogue == cpu_codegen.SILU_MUL else "x" + str(self.nw)
        ns = "+".join(str(b.n) for b in self.members)
        return timed(f"{self.members[0].fmt} {what} N={ns} K={self.k}",
                     sum(_weight_bytes(b.tensors) for b in self.members), group_call, self, x, biases)

    def bound_with(self, x, *args, **kwargs):  # bias, norm weight, eps, residual, threshold, column scales
        return timed(f"{self.fmt} N={self.n} K={self.k}", _weight_bytes(self.tensors),
                     lambda: bound_ext(self, x, *args, **kwargs))

    def group_with(self, x, *args, **kwargs):  # biases, norm weight, eps, threshold, column scales
        what = "silu_mul" if self.epilogue == cpu_codegen.SILU_MUL else "x" + str(self.nw)
        ns = "+".join(str(b.n) for b in self.members)
        return timed(f"{self.members[0].fmt} {what} N={ns} K={self.k}",
                     sum(_weight_bytes(b.tensors) for b in self.members), lambda: group_ext(self, x, *args, **kwargs))

    def torch_packed(x, packed, bias, dtype):
        return timed(f"torch {packed.fmt} N={packed.out_features} K={packed.in_features}",
                     _weight_bytes(packed.quantized or ()), torch_call, x, packed, bias, dtype)

    def sparse_row(self, x, *args, **kwargs):  # the floor: every byte of the K-major copy (kept rows: a fraction)
        w = self.w
        return timed(f"activation-sparse {'int8' if w.codes.dtype == torch.int8 else 'int4'} N={self.n} K={self.k}",
                     _weight_bytes((w.codes, w.scale, w.zero)), row_call, self, x, *args, **kwargs)

    cpu_codegen.Bound.__call__ = bound
    cpu_sparse.RowCall.__call__ = sparse_row
    cpu_codegen.BoundGroup.__call__ = group
    cpu_codegen.Bound.ext = bound_with
    cpu_codegen.BoundGroup.ext = group_with
    cpu_kernels.torch_packed_linear = torch_packed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", default="w4a16,w8a16")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=16,
                        help="decode steps before the timed ones (activation-sparse sites decide by an in-model "
                             "trial over their first ~12 rows)")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    _instrument()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.layers,
                      num_attention_heads=16, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    bandwidth = read_bandwidth()
    print(f"threads={torch.get_num_threads()}, read bandwidth {bandwidth / 1e9:.1f} GB/s, {args.layers} layers")
    for recipe in args.recipes.split(","):
        torch._dynamo.reset()
        if needs_calibration(recipe):  # compressed first, as decode_cpu.py does
            from lowbit_compiler import compress

            target = LlamaForCausalLM(cfg).eval()
            target.load_state_dict(model.state_dict())
            compress(target, recipe, calibration=calibration_prompts(cfg.vocab_size, 4), progress=False)
            compiled = torch.compile(target, backend="lowbit", options={"progress": False})
        else:
            compiled = torch.compile(model, backend="lowbit", options={"recipe": recipe, "progress": False})
        with torch.no_grad():
            cache = DynamicCache()
            tok = compiled(input_ids=ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            for _ in range(args.warmup):
                tok = compiled(input_ids=tok, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            steps = []
            _timing.clear()
            _active[0] = True
            for _ in range(args.steps):
                start = time.perf_counter()
                tok = compiled(input_ids=tok, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
                steps.append(time.perf_counter() - start)
            _active[0] = False
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(args.steps):
                    tok = compiled(input_ids=tok, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        step = statistics.median(steps)
        print(f"\n## {recipe}: {step * 1e3:.2f} ms/step (median of {args.steps})")
        print("| GEMV call | calls/step | ms/step | floor ms/step | of floor |")
        print("|---|---|---|---|---|")
        gemv = floor_total = 0.0
        for key in sorted(_timing, key=lambda k: -sum(_timing[k])):
            n = len(_timing[key]) / args.steps
            ms = statistics.median(_timing[key]) * n * 1e3
            floor = _bytes[key] / bandwidth * n * 1e3
            gemv, floor_total = gemv + ms, floor_total + floor
            print(f"| {key} | {n:.0f} | {ms:.2f} | {floor:.2f} | {floor / ms:.0%} |")
        print(f"| all GEMVs | | {gemv:.2f} | {floor_total:.2f} | {floor_total / gemv:.0%} |")
        print(f"outside the GEMVs: {step * 1e3 - gemv:.2f} ms/step ({1 - gemv / (step * 1e3):.0%}); "
              f"whole step at {floor_total / (step * 1e3):.0%} of the floor")
        ops = [e for e in prof.key_averages() if not e.key.startswith(("ProfilerStep", "aten::empty", "aten::view"))]
        ops.sort(key=lambda e: -e.self_cpu_time_total)
        profiled = sum(e.self_cpu_time_total for e in prof.key_averages()) / args.steps / 1e3
        print(f"top aten ops by self CPU time (profiled; the profiler adds its own overhead), ms/step "
              f"(all profiled ops: {profiled:.2f}):")
        for e in ops[: args.top]:
            print(f"  {e.key:42s} {e.count / args.steps:6.0f} calls  {e.self_cpu_time_total / args.steps / 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
