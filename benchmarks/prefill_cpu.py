"""Prefill on the CPU: one M-token prompt (default 512) through a Llama-style decoder with random
weights (hidden 2048, intermediate 5632, 4 layers, 16 heads / 4 KV heads, vocab 32000), eager
fp32 / bf16 against lowbit w4a16 and w8a16, compiled (``torch.compile(backend="lowbit")``) and
compressed (``compress``, run eagerly) from the float32 model, and compiled from the same weights
loaded in bf16 (``--no-bf16-model`` leaves those out).

Calls are interleaved (one forward of each contender in turn, ``--rounds`` times) so that drift in
machine speed hits all alike; reported: median seconds per prompt and the speed against eager fp32
and eager bf16; then which kernel the CPU dispatch (``backends/cpu_dispatch.py``) chose for each
quantized shape, with the times it measured (``LOWBIT_CPU_DISPATCH`` applies).

    python benchmarks/prefill_cpu.py [--prompt 512] [--layers 4] [--rounds 5] [--no-bf16-model]
                                     [--json benchmarks/results/prefill_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--recipes", default="w4a16,w8a16")
    parser.add_argument("--json", default="benchmarks/results/prefill_cpu.json")
    parser.add_argument("--no-bf16-model", action="store_true",
                        help="leave out the rows compiling the bf16 model (a user who loads it in bf16)")
    args = parser.parse_args()

    import lowbit_compiler

    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 64
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.layers,
                      num_attention_heads=16, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)
    fp32 = LlamaForCausalLM(cfg).eval()
    state = fp32.state_dict()
    bf16 = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in state.items()})
    contenders: dict[str, object] = {"eager fp32": fp32, "eager bf16": bf16}
    for recipe in [r for r in args.recipes.split(",") if r]:
        contenders[f"lowbit {recipe} compiled"] = torch.compile(fp32, backend="lowbit", options={"recipe": recipe})
        compressed = LlamaForCausalLM(cfg).eval()
        compressed.load_state_dict(state)
        contenders[f"lowbit {recipe} compressed"] = lowbit_compiler.compress(compressed, recipe, progress=False)
        if not args.no_bf16_model:  # the same weights loaded in bf16, as a bf16 user would compile them
            half = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
            half.load_state_dict(bf16.state_dict())
            contenders[f"lowbit {recipe} compiled, bf16 model"] = torch.compile(
                half, backend="lowbit", options={"recipe": recipe})

    ids = torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    times: dict[str, list[float]] = {name: [] for name in contenders}
    first: dict[str, float] = {}
    with torch.no_grad():
        for name, call in contenders.items():  # warm-up (compiles)
            start = time.perf_counter()
            call(input_ids=ids, use_cache=False)
            first[name] = time.perf_counter() - start
        for _ in range(args.rounds):
            for name, call in contenders.items():
                start = time.perf_counter()
                call(input_ids=ids, use_cache=False)
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    rows = [{"contender": name, "seconds": round(med[name], 3),
             "speedup_vs_eager_fp32": round(med["eager fp32"] / med[name], 2),
             "speedup_vs_eager_bf16": round(med["eager bf16"] / med[name], 2),
             "first_call_s": round(first[name], 2)} for name in contenders]
    print(f"prefill, {args.prompt}-token prompt, {args.layers} layers, median of {args.rounds} interleaved rounds; "
          f"threads={torch.get_num_threads()}")
    header = ["contender", "s/prompt", "vs fp32", "vs bf16", "first call (compile)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['contender']} | {r['seconds']:.2f} | {r['speedup_vs_eager_fp32']:.2f}x | "
              f"{r['speedup_vs_eager_bf16']:.2f}x | {r['first_call_s']:.1f} s |")
    from lowbit_compiler.backends import cpu_dispatch

    plans = [{"format": key[0], "N": key[1], "K": key[2], "rows": cpu_dispatch.class_label(key[3]),
              "choice": entry["choice"], "ms": entry.get("ms", {}),
              **({"busy": entry["busy"]} if "busy" in entry else {})}
             for key, entry in cpu_dispatch._PLANS.items()]
    mode = os.environ.get(cpu_dispatch.ENV, "measure")
    print(f"CPU dispatch ({cpu_dispatch.ENV}={mode}): what each quantized shape ran")
    for p in plans:
        print(f"  {p['format']} {p['N']}x{p['K']}, {p['rows']}: {p['choice']}; measured "
              + ", ".join(f"{c} {t:.1f} ms" for c, t in sorted(p["ms"].items(), key=lambda kv: kv[1]))
              + (f" (timed while busy: {p['busy']})" if "busy" in p else ""))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "threads": torch.get_num_threads(), "rows": rows, "cpu_dispatch": plans},
                      f, indent=2)


if __name__ == "__main__":
    main()
