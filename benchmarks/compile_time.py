"""Compile + first-token time on the CPU, with a cold and a warm kernel cache.

The decode model of ``decode_cpu.py`` (Llama-style, random weights, hidden 2048, intermediate 5632,
8 layers, 16 heads / 4 KV heads, vocab 32000; ``--layers`` changes the depth). Every case runs in
its own process, so nothing but the on-disk caches carries over between cases; the time is
``torch.compile(...)`` plus the first forward of a 32-token prompt (what produces the first token),
measured in that process with ``time.perf_counter``. Building the random model is not counted.

Cases (``--cases`` picks some):

* ``inductor-cold`` / ``inductor-warm``: ``torch.compile`` (Inductor) on the bf16 model, with an
  empty and then the same, filled ``TORCHINDUCTOR_CACHE_DIR``.
* ``lowbit-cold`` / ``lowbit-warm``: ``torch.compile(backend="lowbit", options={"recipe": RECIPE})`` on
  the float model, with an empty and then the same, filled ``LOWBIT_CACHE_DIR`` (the generated C
  kernels, compiled by gcc at first use). Both quantize every weight: that is part of compiling a
  float model.
* ``lowbit-load``: the model ``compress``ed and saved once (by a setup process, not timed), then
  ``from_pretrained`` (timed separately: "load s") and ``torch.compile(backend="lowbit")`` + first
  forward with the warm kernel cache: what a user who ships the compressed checkpoint pays.

``--phases`` splits the lowbit cases' time (perf_counter around the functions named below, in
the child): ``capture``, ``quantize`` (``insert_weight_quant``: rounding, packing and the weight
SQNR, by the one-pass C kernel or the torch path), the rest of ``pipeline`` (the other passes),
``lowering``, the backend's remainder (dumps, summary), ``torch layout`` (torch's int4pack copy
built at the first call of more than 16 rows: the 32-token prompt), ``forward`` (a second call of
the same prompt: the compute itself) and ``dynamo`` (what is left: tracing and guards).
``LOWBIT_QUANTIZE_KERNEL=0`` in the environment times the torch path.

    python benchmarks/compile_time.py [--layers 8] [--recipe w4a16] [--phases] [--json benchmarks/results/compile_time.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CASES = ("inductor-cold", "inductor-warm", "lowbit-cold", "lowbit-warm", "lowbit-load")


def build_model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    import torch

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=16,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


# (module, attribute, phase): timed with --phases (nested phases are subtracted from their parents)
PHASES = (("lowbit_compiler.backends.lowbit_backend", "compile_graph", "backend"),
          ("lowbit_compiler.backends.lowbit_backend", "capture", "capture"),
          ("lowbit_compiler.backends.lowbit_backend", "run_pipeline", "pipeline"),
          ("lowbit_compiler.passes.quantize.rtn.InsertWeightQuant", "quantize_sites", "quantize"),
          ("lowbit_compiler.backends.lowbit_backend", "lower", "lowering"),
          ("lowbit_compiler.backends.cpu_kernels.PackedWeight", "torch_layout", "torch layout"))


def _time_phases() -> dict:
    import importlib

    totals: dict = {}
    for module, attr, phase in PHASES:
        owner_path, _, cls = module.rpartition(".") if module.endswith(("InsertWeightQuant", "PackedWeight")) else (module, "", "")
        owner = importlib.import_module(owner_path)
        owner = getattr(owner, cls) if cls else owner
        inner = getattr(owner, attr)

        def timed(*a, _inner=inner, _phase=phase, **k):
            t = time.perf_counter()
            try:
                return _inner(*a, **k)
            finally:
                totals[_phase] = totals.get(_phase, 0.0) + time.perf_counter() - t

        setattr(owner, attr, timed)
    return totals


def child(case: str, layers: int, recipe: str, checkpoint: str | None, phases: bool = False) -> dict:
    import torch

    import lowbit_compiler  # noqa: F401  (registers the backend; importing is not compiling)

    ids = torch.randint(0, 32000, (1, 32), generator=torch.Generator().manual_seed(1))
    result: dict = {"case": case}
    with torch.no_grad():
        if case == "save":
            model = build_model(layers)
            lowbit_compiler.compress(model, recipe, progress=False)
            model.save_pretrained(checkpoint)
            return result
        if case == "lowbit-load":
            from transformers import AutoModelForCausalLM

            start = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
            result["load_s"] = time.perf_counter() - start
        else:
            model = build_model(layers)
            if case.startswith("inductor"):
                model = model.to(torch.bfloat16)
        backend_s = [0.0]
        totals = _time_phases() if phases and case.startswith("lowbit") else None
        if case.startswith("lowbit"):  # lowbit's own share: passes, quantizing, lowering, kernel builds
            from lowbit_compiler.backends import lowbit_backend

            inner = lowbit_backend.compile_graph

            def timed(*a, **k):
                t = time.perf_counter()
                try:
                    return inner(*a, **k)
                finally:
                    backend_s[0] += time.perf_counter() - t

            lowbit_backend.compile_graph = timed
        start = time.perf_counter()
        if case.startswith("inductor"):
            compiled = torch.compile(model)
        else:
            compiled = torch.compile(model, backend="lowbit", options={"recipe": recipe})
        compiled(input_ids=ids, use_cache=True)
        result["compile_first_token_s"] = time.perf_counter() - start
        if case.startswith("lowbit"):
            result["backend_s"] = backend_s[0]
        if totals is not None:
            start = time.perf_counter()
            compiled(input_ids=ids, use_cache=True)
            forward = time.perf_counter() - start
            get = lambda name: totals.get(name, 0.0)  # noqa: E731
            result["phases"] = {
                "capture": get("capture"), "quantize": get("quantize"),
                "other passes": get("pipeline") - get("quantize"), "lowering": get("lowering"),
                "backend rest": get("backend") - get("capture") - get("pipeline") - get("lowering"),
                "torch layout": get("torch layout"), "forward": forward,
                "dynamo": result["compile_first_token_s"] - get("backend") - get("torch layout") - forward}
    return result


def run(case: str, args: argparse.Namespace, env: dict, checkpoint: str | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", case, "--layers", str(args.layers),
           "--recipe", args.recipe] + (["--phases"] if args.phases else [])
    if checkpoint:
        cmd += ["--checkpoint", checkpoint]
    out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{case} failed:\n{out.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--recipe", default="w4a16")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--phases", action="store_true", help="split the lowbit cases' time by phase")
    parser.add_argument("--json", default="benchmarks/results/compile_time.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.layers, args.recipe, args.checkpoint, args.phases)))
        return
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {', '.join(CASES)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        inductor_cache, lowbit_cache = os.path.join(tmp, "inductor"), os.path.join(tmp, "lowbit")
        # each contender gets its own Inductor cache, so "cold" is cold whatever ran before it
        envs = {"inductor": {"TORCHINDUCTOR_CACHE_DIR": inductor_cache, "LOWBIT_CACHE_DIR": lowbit_cache + "-unused"},
                "lowbit": {"TORCHINDUCTOR_CACHE_DIR": inductor_cache + "-lowbit", "LOWBIT_CACHE_DIR": lowbit_cache}}
        checkpoint = None
        if "lowbit-load" in cases:
            checkpoint = os.path.join(tmp, "checkpoint")
            run("save", args, {**envs["lowbit"], "LOWBIT_CACHE_DIR": lowbit_cache + "-save"}, checkpoint)  # keeps cold cold
        for case in CASES:
            if case not in cases:
                continue
            env = envs[case.split("-")[0]]
            if case.endswith("warm") and case.replace("warm", "cold") not in cases:
                run(case.replace("warm", "cold"), args, env)  # fill the cache the warm case reads
            r = run(case, args, env, checkpoint)
            rows.append(r)
            print(f"{case:14s} compile + first token {r['compile_first_token_s']:6.1f} s"
                  + (f"   (lowbit backend {r['backend_s']:.1f} s)" if "backend_s" in r else "")
                  + (f"   (load {r['load_s']:.1f} s)" if "load_s" in r else ""), flush=True)
            if "phases" in r:
                print("    " + ", ".join(f"{k} {v:.2f} s" for k, v in r["phases"].items()), flush=True)
    print(f"\ncompile + first token, {args.layers}-layer decode model, 32-token prompt, recipe {args.recipe}\n")
    print("| case | compile + first token s | of which lowbit backend s | load s |\n|---|---|---|---|")
    for r in rows:
        cells = [f"{r[k]:.1f}" if k in r else "–" for k in ("compile_first_token_s", "backend_s", "load_s")]
        print(f"| {r['case']} | " + " | ".join(cells) + " |")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"layers": args.layers, "recipe": args.recipe, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
