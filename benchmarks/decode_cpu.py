"""Batch-1 cached decode on the CPU: eager fp32 / bf16 against the lowbit backend.

A Llama-style decoder with random weights (hidden 2048, intermediate 5632, 8 layers, 16 heads /
4 KV heads, vocab 32000). Every contender decodes from its own DynamicCache after the same
prefill; steps are interleaved (one step of each contender in turn) so that drift in machine speed
hits all alike. Reported: median ms per token, speedup against eager fp32 and eager bf16, the
fraction of the memory-bandwidth floor (bytes that must be read per token / read bandwidth
measured in this run, divided by the measured time), and compile + first token (the prompt and
one decode step, the first time: for compiled contenders this includes compiling both graphs).

Peers (``--no-peers`` leaves them out): ``torch.compile`` (Inductor) on the bf16 model, and
torchao's int8 weight-only quantization + Inductor when torchao is installed (the ``bench``
extra pins the version that works with torch 2.13).

Sparse recipes (issue 13) run beside the dense recipe of the same weight format in the same run:
``--recipes w8a16,w4a16,teal-50+w8a16,teal-50+w4a16,s24-w8a16`` (or ``--sparse``, which also
leaves the peers out). Each sparse row gets ``vs dense format`` (the dense recipe's ms/token over
its own: ``teal-50+w8a16`` and ``s24-w8a16`` against ``w8a16``, ``teal-50+w4a16`` against
``w4a16``) and ``sparse calls`` (what the sparse CPU kernels' dispatch ran during the timed steps,
from ``cpu_sparse.dispatch_counter``: a TEAL row whose calls all ran the dense kernel measures the
threshold op, not the sparse kernel).

    python benchmarks/decode_cpu.py [--steps 16] [--layers 8] [--no-peers] [--builds] [--sparse] [--json benchmarks/results/decode_cpu.json] [--plot [SVG]]
    python benchmarks/decode_cpu.py --from-json benchmarks/results/decode_cpu.json --plot [SVG]   (plot only)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import collections

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from lowbit_compiler.backends import cpu_sparse

SPARSE_RECIPES = "w8a16,w4a16,teal-50+w8a16,teal-50+w4a16,s24-w8a16"


def dense_baseline(recipe: str) -> str | None:
    """The dense recipe of the same weight format as a sparse one (None: not a sparse recipe)."""
    if recipe.startswith(("teal", "wina", "cats")) and "+" in recipe:
        return recipe.split("+", 1)[1]
    return {"s24-w8a16": "w8a16", "s24-w4a16": "w4a16"}.get(recipe)


def needs_calibration(recipe: str) -> bool:
    """Whether a recipe has a data-driven pass (activation thresholds, Wanda scores, GPTQ): such
    recipes are compressed with :func:`calibration_prompts` first, then compiled."""
    from lowbit_compiler.recipe import get_recipe

    return bool(get_recipe(recipe).data_driven_passes())


def calibration_prompts(vocab_size: int, count: int) -> list[torch.Tensor]:
    """``count`` random 64-token prompts, the same in every run."""
    return [torch.randint(0, vocab_size, (1, 64), generator=torch.Generator().manual_seed(100 + i))
            for i in range(count)]


def read_bandwidth(nbytes: int = 1 << 29, repeats: int = 9) -> float:
    """Bytes per second for summing a large fp32 tensor (a read-dominated stream), median."""
    x = torch.ones(nbytes // 4)
    x.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times)


def interleaved(calls: dict, repeats: int, warmup: int = 3) -> tuple[dict, dict]:
    """Time each call ``repeats`` times, one call of each in turn (so drift in machine speed hits
    all alike) after ``warmup`` rounds: (median seconds, fastest seconds) per name."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return ({name: statistics.median(t) for name, t in times.items()}, {name: min(t) for name, t in times.items()})


def linear_bytes(model: torch.nn.Module, dtype_bytes: int) -> int:
    return sum(m.weight.numel() * dtype_bytes for m in model.modules() if isinstance(m, torch.nn.Linear))


def quantized_bytes(dump_dir: str | dict, model: torch.nn.Module) -> int:
    """Bytes of the quantized linears (from the dump, or a ``compress`` summary's ``layers``) plus
    the float linears left alone."""
    from lowbit_compiler.dump import load_summaries

    layers: dict[str, dict] = {}
    if isinstance(dump_dir, dict):
        layers = dump_dir
    else:
        for summary in load_summaries(dump_dir):
            layers.update(summary["layers"])
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            layer = layers.get(name)
            total += layer["bytes_after"] if layer and "bytes_after" in layer else module.weight.numel() * module.weight.element_size()
    return total


class Contender:
    def __init__(self, name: str, model: torch.nn.Module, call, bytes_per_token: int):
        self.name, self.model, self.call, self.bytes_per_token = name, model, call, bytes_per_token
        self.times: list[float] = []
        self.ran: collections.Counter = collections.Counter()  # sparse dispatch during the timed steps
        self.cache = None
        self.next_token = None

    def prefill(self, ids: torch.Tensor) -> None:
        """The prompt, then one decode step; ``first_s`` is their time: for a compiled contender,
        compile (prefill and decode graphs) + first token."""
        start = time.perf_counter()
        self.cache = DynamicCache()
        out = self.call(input_ids=ids, cache=self.cache, use_cache=True)
        self.next_token = out.logits[:, -1:].argmax(-1)
        self.step(record=False)
        self.first_s = time.perf_counter() - start

    def step(self, record: bool) -> None:
        before = collections.Counter(cpu_sparse.dispatch_counter)
        start = time.perf_counter()
        out = self.call(input_ids=self.next_token, cache=self.cache, use_cache=True)
        self.next_token = out.logits[:, -1:].argmax(-1)
        if record:
            self.times.append(time.perf_counter() - start)
            self.ran.update({f"{fmt}:{kind}": n for (fmt, kind), n in
                             (collections.Counter(cpu_sparse.dispatch_counter) - before).items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--json", default="benchmarks/results/decode_cpu.json")
    parser.add_argument("--plot", nargs="?", const="benchmarks/results/decode_cpu.svg", default=None, metavar="SVG",
                        help="also draw ms/token per contender (default benchmarks/results/decode_cpu.svg)")
    parser.add_argument("--from-json", default=None, help="only plot this earlier result (with --plot)")
    parser.add_argument("--no-peers", action="store_true", help="leave out Inductor and torchao")
    parser.add_argument("--recipes", default="none,w8a16,w4a16",
                        help="lowbit recipes to compile (comma-separated); data-driven ones (teal-50+w8a16, "
                             "s24-w8a16, ...) calibrate on --calibration random prompts")
    parser.add_argument("--calibration", type=int, default=4, help="random 64-token prompts for data-driven recipes")
    parser.add_argument("--flow", choices=("compile", "compress"), default="compile",
                        help="compile: torch.compile(fp32, backend='lowbit', options={'recipe': ...}); compress: "
                             "compress(copy of fp32, recipe) then torch.compile(backend='lowbit'). Data-driven recipes "
                             "always take compress (the compile flow cannot calibrate the decode step's graph)")
    parser.add_argument("--sparse", action="store_true",
                        help=f"--recipes {SPARSE_RECIPES} --no-peers: the sparse recipes against the dense "
                             "ones of the same weight format")
    parser.add_argument("--builds", action="store_true",
                        help="also w4a16 and w8a16 without the split-int8 integer path (LOWBIT_CPU_SPLIT8=0), and "
                             "w4a16 with the AVX2 build and without the CPU fusion groups (LOWBIT_CPU_ISA / "
                             "LOWBIT_CPU_FUSE): before/after ratios on one machine")
    args = parser.parse_args()
    if args.sparse:  # every recipe through the same flow: the rows differ only by the sparsity
        args.recipes, args.no_peers, args.flow = SPARSE_RECIPES, True, "compress"
        # the activation-sparse sites' in-model trial (cpu_sparse.SiteTrial: 2 + 2 x TRIAL_ROWS decode
        # rows) is over before the timed steps: what is timed is the policy it chose
        args.warmup = max(args.warmup, 16)
    if args.from_json:
        with open(args.from_json) as f:
            plot(json.load(f), args.plot or "benchmarks/results/decode_cpu.svg")
        return

    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 64  # three compiled contenders share one forward
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.layers,
                      num_attention_heads=16, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)
    with torch.device("cpu"):
        fp32 = LlamaForCausalLM(cfg).eval()
    bf16 = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in fp32.state_dict().items()})

    contenders = [
        Contender("eager fp32", fp32, fp32, linear_bytes(fp32, 4)),
        Contender("eager bf16", bf16, bf16, linear_bytes(bf16, 2)),
    ]
    if not args.no_peers:
        # the peers a user would pick: Inductor on the bf16 model, and torchao's int8 weight-only
        # quantization + Inductor (pip install -e '.[bench]')
        contenders.append(Contender("Inductor bf16", bf16, torch.compile(bf16), linear_bytes(bf16, 2)))
        try:
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
        except ImportError:
            print("torchao is not installed (pip install -e '.[bench]'): its contender is left out")
        else:
            tao = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
            tao.load_state_dict(bf16.state_dict())
            quantize_(tao, Int8WeightOnlyConfig())
            # int8 codes + one bf16 scale per output channel
            tao_bytes = sum(m.weight.shape[0] * (m.weight.shape[1] + 2) for m in bf16.modules()
                            if isinstance(m, torch.nn.Linear))
            contenders.append(Contender("torchao int8wo + Inductor", tao, torch.compile(tao), tao_bytes))
    dumps = tempfile.mkdtemp(prefix="lowbit-bench-")
    calibration = calibration_prompts(cfg.vocab_size, args.calibration)
    summaries = {}  # recipe -> compress summary's layers (compress flow)
    for recipe in args.recipes.split(","):
        dump_dir = os.path.join(dumps, recipe)
        data_driven = needs_calibration(recipe)
        if (args.flow == "compress" or data_driven) and recipe != "none":
            from lowbit_compiler import compress

            model = LlamaForCausalLM(cfg).eval()
            model.load_state_dict(fp32.state_dict())
            compress(model, recipe, calibration=calibration if data_driven else None, progress=False)
            summaries[recipe] = model.lowbit_summary["layers"]
            compiled = torch.compile(model, backend="lowbit", options={"dump_dir": dump_dir, "progress": False})
            contenders.append(Contender(f"lowbit {recipe}", model, compiled, 0))
            continue
        options = {"recipe": recipe, "dump_dir": dump_dir, "progress": False}
        compiled = torch.compile(fp32, backend="lowbit", options=options)
        contenders.append(Contender(f"lowbit {recipe}", fp32, compiled, 0))

    if args.builds:
        for recipe, label, env in (
                ("w4a16", "float path", {"LOWBIT_CPU_SPLIT8": "0"}), ("w8a16", "float path", {"LOWBIT_CPU_SPLIT8": "0"}),
                ("w4a16", "AVX2 build, unfused", {"LOWBIT_CPU_ISA": "avx2", "LOWBIT_CPU_FUSE": "0"}),
                ("w4a16", "unfused", {"LOWBIT_CPU_FUSE": "0"}), ("w4a16", "AVX2 build", {"LOWBIT_CPU_ISA": "avx2"})):
            compiled = torch.compile(fp32, backend="lowbit", options={"recipe": recipe})
            contenders.append(Contender(f"lowbit {recipe} ({label})", fp32, with_env(compiled, env), 0))

    ids = torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for c in contenders:
            c.prefill(ids)
        for step in range(args.warmup + args.steps):
            for c in contenders:
                c.step(record=step >= args.warmup)
    for c in contenders:
        if not c.name.startswith("lowbit") or "(" in c.name:
            continue
        recipe = c.name.split()[-1]
        c.bytes_per_token = (linear_bytes(fp32, 4) if recipe == "none"
                             else quantized_bytes(summaries.get(recipe) or os.path.join(dumps, recipe), fp32))
    for c in contenders:
        if c.name.startswith(("lowbit w4a16 (", "lowbit w8a16 (")):  # the same weights, other builds
            c.bytes_per_token = next(d.bytes_per_token for d in contenders if d.name == c.name.split(" (")[0])
    bandwidth = read_bandwidth()

    base = {c.name: statistics.median(c.times) for c in contenders}
    rows = []
    for c in contenders:
        ms = base[c.name] * 1e3
        floor_ms = c.bytes_per_token / bandwidth * 1e3
        rows.append({"contender": c.name, "ms_per_token": round(ms, 2),
                     "speedup_vs_eager_fp32": round(base["eager fp32"] / base[c.name], 2),
                     "speedup_vs_eager_bf16": round(base["eager bf16"] / base[c.name], 2),
                     "weight_MB_per_token": round(c.bytes_per_token / 1e6, 1),
                     "bandwidth_floor_fraction": round(floor_ms / ms, 2),
                     "compile_plus_first_token_s": round(c.first_s, 2)})
        dense = dense_baseline(c.name.split()[-1]) if c.name.startswith("lowbit") else None
        if dense is not None and f"lowbit {dense}" in base:
            rows[-1]["vs_dense_format"] = round(base[f"lowbit {dense}"] / base[c.name], 2)
            rows[-1]["dense_format"] = dense
        if c.ran:
            rows[-1]["sparse_calls"] = dict(c.ran)
    header = ["contender", "ms/token", "vs fp32", "vs bf16", "MB read/token", "of BW floor", "compile + first token"]
    print(f"decode, batch 1, {args.layers} layers, prompt {args.prompt}, median of {args.steps} steps; "
          f"threads={torch.get_num_threads()}, read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['contender']} | {r['ms_per_token']:.1f} | {r['speedup_vs_eager_fp32']:.2f}x | "
              f"{r['speedup_vs_eager_bf16']:.2f}x | {r['weight_MB_per_token']:.0f} | {r['bandwidth_floor_fraction']:.2f} | "
              f"{r['compile_plus_first_token_s']:.1f} s |")
    for r in rows:
        if "vs_dense_format" in r or "sparse_calls" in r:
            print(f"{r['contender']}: {r.get('vs_dense_format', '-')}x lowbit {r.get('dense_format', '-')} in this run; "
                  f"sparse calls {r.get('sparse_calls', {})}")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "read_bandwidth_GBps": round(bandwidth / 1e9, 2), "rows": rows}, f, indent=2)
    if args.plot:
        plot({"config": vars(args), "read_bandwidth_GBps": round(bandwidth / 1e9, 2), "rows": rows}, args.plot)


def with_env(call, env: dict):
    """``call`` with ``env`` set during each call (compile included) and restored after it."""
    def wrapped(*args, **kwargs):
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return call(*args, **kwargs)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return wrapped


def plot(result: dict, path: str) -> None:
    """ms/token per contender as an SVG (benchmarks/plots.py)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from plots import decode_svg

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(decode_svg(result))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
