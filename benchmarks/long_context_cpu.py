"""Decode at long context on the CPU: the KV cache grown in place against copied every step.

Hugging Face's ``DynamicCache`` appends each step's key and value with ``torch.cat``: every cached
row is copied into a new tensor, per layer and step. The fused decode attention
(``backends/cpu_attention.py``) writes into buffers with room to grow and, handed its own view back
by the cache next step, appends the new row in place. This times both in one process on the decode
model of ``decode_cpu.py`` (hidden 2048, 16 query / 4 KV heads, ``--layers`` layers, random
weights), compiled with ``backend="lowbit"``: after a ``--prompt``-token prefill, ``--steps``
greedy steps per mode, the two modes interleaved step by step (each its own cache), medians. The
copy mode sets ``cpu_attention.grow_in_place = False`` (exact-size buffers, every row copied, as
``cat``). Both modes must produce the same tokens (asserted).

    python benchmarks/long_context_cpu.py [--prompts 512,2000] [--layers 8] [--steps 24] [--recipe w4a16]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def measure(prompt: int, layers: int, steps: int, recipe: str, warmup: int = 4) -> dict:
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    import lowbit_compiler  # noqa: F401  (registers the backend)
    from lowbit_compiler.backends import cpu_attention

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=16,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=max(4096, 2 * prompt))
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, backend="lowbit", options={"recipe": recipe, "progress": False})
    modes = {"in place": True, "copied": False}
    times: dict[str, list[float]] = {m: [] for m in modes}
    before = dict(cpu_attention.appended_in_place)
    try:
        with torch.no_grad():
            caches, tokens = {}, {}
            for mode, grow in modes.items():
                cpu_attention.grow_in_place = grow
                caches[mode] = DynamicCache()
                out = compiled(input_ids=ids, past_key_values=caches[mode], use_cache=True)
                tokens[mode] = out.logits[:, -1:].argmax(-1)
            for step in range(warmup + steps):
                for mode, grow in modes.items():
                    cpu_attention.grow_in_place = grow
                    t0 = time.perf_counter()
                    out = compiled(input_ids=tokens[mode], past_key_values=caches[mode], use_cache=True)
                    tokens[mode] = out.logits[:, -1:].argmax(-1)
                    if step >= warmup:
                        times[mode].append(time.perf_counter() - t0)
                if not torch.equal(tokens["in place"], tokens["copied"]):
                    raise AssertionError(f"step {step}: the two cache modes chose different tokens")
    finally:
        cpu_attention.grow_in_place = True
    after = dict(cpu_attention.appended_in_place)
    ms = {m: statistics.median(v) * 1e3 for m, v in times.items()}
    return {"prompt": prompt, "layers": layers, "recipe": recipe, "steps": steps,
            "ms_in_place": ms["in place"], "ms_copied": ms["copied"], "speedup": ms["copied"] / ms["in place"],
            "appended_in_place": after.get(True, 0) - before.get(True, 0),
            "copied": after.get(False, 0) - before.get(False, 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="512,2000")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--recipe", default="w4a16")
    parser.add_argument("--json", default="benchmarks/results/long_context_cpu.json")
    args = parser.parse_args()
    rows = [measure(int(p), args.layers, args.steps, args.recipe) for p in args.prompts.split(",")]
    print(f"| cached tokens | in place ms/token | copied ms/token | in place vs copied | calls in place / copied |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['prompt']} | {r['ms_in_place']:.2f} | {r['ms_copied']:.2f} | **{r['speedup']:.2f}x** "
              f"| {r['appended_in_place']} / {r['copied']} |")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"rows": rows, "threads": torch.get_num_threads()}, f, indent=1)


if __name__ == "__main__":
    main()
