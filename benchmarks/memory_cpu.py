"""Peak resident memory per flow on the CPU: float load, ``compress``, ``torch.compile`` + first
forward, and loading a saved checkpoint.

A Llama-style decoder with random weights (hidden 2048, intermediate 5632, 4 layers, 16 heads /
4 KV heads, vocab 32000: about 0.3B parameters). Each flow runs in a fresh subprocess; the
subprocess imports torch, transformers and lowbit_compiler, reads its resident set (the
*baseline*: the Python/torch runtime, warmed by compressing a tiny model of the same
architecture first unless ``--cold``, so that Dynamo's own memory counts as runtime), resets the kernel's peak counter (``/proc/self/clear_refs``)
and then builds the model and runs the flow; the peak is ``VmHWM`` from ``/proc/self/status``
(the kernel's count: torch's CPU allocator is not visible to tracemalloc). Reported per flow:
peak RSS, peak above the baseline, resident memory at the end, and the ratio of the peak above
baseline to the float model's (the float flow: build the fp32 model, one forward).

    python benchmarks/memory_cpu.py [--layers 4] [--recipe w4a16] [--json benchmarks/results/memory_cpu.json]

Flows (``--flows`` picks some): ``float`` (build + forward), ``compress`` (build + compress +
forward), ``compile`` (build + torch.compile(backend="lowbit") + first forward), ``compile_drop``
(the same, then the float weights dropped with ``lowbit_compiler.drop_float_weights``),
``load`` (a checkpoint saved by ``compress`` + ``save_pretrained``, loaded with
``from_pretrained``; the checkpoint is written by a setup subprocess that is not measured).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

FLOWS = ("float", "compress", "compile", "compile_drop", "load")


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build_config(layers: int, hidden: int = 2048, intermediate: int = 5632, vocab: int = 32000,
                 heads: int = 16, kv_heads: int = 4):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                       max_position_embeddings=4096, tie_word_embeddings=False)


class PeakStack:
    """Samples the resident set every 2 ms in a thread and keeps the main thread's Python stack
    (the frames of this project) at the highest sample: where the peak happens."""

    def __init__(self) -> None:
        import threading

        self.main = threading.get_ident()
        self.top, self.stack, self.running = 0, [], True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        import time
        import traceback

        while self.running:
            rss = status_kb("VmRSS")
            if rss > self.top:
                self.top = rss
                frame = sys._current_frames().get(self.main)
                if frame is not None:
                    self.stack = [f"{os.path.relpath(f.filename)}:{f.lineno} {f.name}"
                                  for f in traceback.extract_stack(frame)
                                  if "site-packages" not in f.filename and "<frozen" not in f.filename]
            time.sleep(0.002)

    def stop(self) -> dict:
        self.running = False
        self.thread.join()
        return {"sampled_peak_MB": self.top / 1024, "peak_stack": self.stack}


def run_flow(flow: str, cfg_kwargs: dict, recipe: str, checkpoint_dir: str | None, prompt: int,
             warm: bool = True, peak_stack: bool = False) -> dict:
    """One flow in this process (the child); returns its measurements in MB."""
    import torch
    import transformers  # noqa: F401  (in the baseline)
    from transformers import LlamaForCausalLM

    import lowbit_compiler
    from lowbit_compiler import offline  # noqa: F401

    torch.manual_seed(0)
    ids = torch.randint(0, cfg_kwargs["vocab"], (1, prompt), generator=torch.Generator().manual_seed(1))
    cfg = build_config(**cfg_kwargs)
    if warm:  # the runtime the flows share (Dynamo, the passes, the kernels) belongs to the baseline
        tiny = LlamaForCausalLM(build_config(1, hidden=128, intermediate=256, vocab=256, heads=4, kv_heads=2)).eval()
        with torch.no_grad():
            lowbit_compiler.compress(tiny, recipe, progress=False)(input_ids=ids % 256)
        del tiny
        import gc

        gc.collect()
        torch._dynamo.reset()
    baseline = status_kb("VmRSS")
    reset_peak()
    trace = os.environ.get("LOWBIT_MEMORY_TRACE") == "1"
    sampler = PeakStack() if peak_stack else None

    def mark(stage: str) -> None:
        if trace:
            print(f"TRACE {flow} {stage}: rss {status_kb('VmRSS') / 1024:.0f} MB, "
                  f"peak {status_kb('VmHWM') / 1024:.0f} MB", file=sys.stderr, flush=True)

    with torch.no_grad():
        if flow == "load":
            model = LlamaForCausalLM.from_pretrained(checkpoint_dir).eval()
        else:
            model = LlamaForCausalLM(cfg).eval()
        mark("model built")
        if flow == "compress":
            lowbit_compiler.compress(model, recipe, progress=False)
            mark("compressed")
        if flow in ("compile", "compile_drop"):
            compiled = torch.compile(model, backend="lowbit", options={"recipe": recipe})
            compiled(input_ids=ids)
            mark("compiled, first forward")
            if flow == "compile_drop":
                lowbit_compiler.drop_float_weights(model)
                compiled(input_ids=ids)
        else:
            model(input_ids=ids)
    import gc

    gc.collect()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in list(model.parameters()) + list(model.buffers())}
    params = sum(storages.values())  # what the tensors hold (dropped float weights hold nothing)
    result = {"flow": flow, "baseline_MB": baseline / 1024, "peak_MB": status_kb("VmHWM") / 1024,
              "end_MB": status_kb("VmRSS") / 1024, "model_tensors_MB": params / 2 ** 20}
    if sampler is not None:
        result.update(sampler.stop())
    return result


def child_main(args: argparse.Namespace) -> None:
    cfg_kwargs = {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
                  "vocab": args.vocab}
    if args.flow == "save":
        import torch
        from transformers import LlamaForCausalLM

        import lowbit_compiler

        torch.manual_seed(0)
        model = LlamaForCausalLM(build_config(**cfg_kwargs)).eval()
        lowbit_compiler.compress(model, args.recipe, progress=False)
        model.save_pretrained(args.checkpoint)
        return
    result = run_flow(args.flow, cfg_kwargs, args.recipe, args.checkpoint, args.prompt, not args.cold,
                      args.peak_stack)
    print("RESULT " + json.dumps(result))


def measure(flow: str, args: argparse.Namespace, checkpoint_dir: str | None = None) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", flow, "--layers", str(args.layers),
           "--hidden", str(args.hidden), "--intermediate", str(args.intermediate), "--vocab", str(args.vocab),
           "--recipe", args.recipe, "--prompt", str(args.prompt)]
    if checkpoint_dir:
        cmd += ["--checkpoint", checkpoint_dir]
    if args.cold:
        cmd.append("--cold")
    if args.peak_stack:
        cmd.append("--peak-stack")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stderr.splitlines():
        if line.startswith("TRACE "):
            print(line[len("TRACE "):])
    if proc.returncode != 0:
        raise RuntimeError(f"flow {flow} failed:\n{proc.stderr[-4000:]}")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--recipe", default="w4a16")
    parser.add_argument("--prompt", type=int, default=8)
    parser.add_argument("--flows", default=",".join(FLOWS))
    parser.add_argument("--json", default="benchmarks/results/memory_cpu.json")
    parser.add_argument("--cold", action="store_true",
                        help="baseline = the imports only (default: also a tiny model compressed first, so that "
                             "Dynamo's and the passes' own memory counts as runtime, not as the flow's)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each flow N times (fresh processes); the table shows the median run by peak, "
                             "and the min-max of the peak above baseline")
    parser.add_argument("--peak-stack", action="store_true",
                        help="sample RSS every 2 ms and print this project's Python stack at each flow's peak")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.flow = args.child
        child_main(args)
        return

    flows = [f for f in args.flows.split(",") if f]
    unknown = sorted(set(flows) - set(FLOWS))
    if unknown:
        parser.error(f"unknown flows {unknown}; expected some of {FLOWS}")
    if "float" not in flows:
        flows.insert(0, "float")
    rows = []
    with tempfile.TemporaryDirectory(prefix="lowbit-mem-") as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        for flow in flows:
            if flow == "load":
                measure("save", args, ckpt)
            runs = sorted((measure(flow, args, ckpt if flow == "load" else None) for _ in range(args.repeat)),
                          key=lambda r: r["peak_MB"] - r["baseline_MB"])
            row = dict(runs[len(runs) // 2])
            above = [r["peak_MB"] - r["baseline_MB"] for r in runs]
            row["runs_peak_above_baseline_MB"] = above
            if args.peak_stack:
                for r in runs:
                    print(f"{flow}: peak {r['peak_MB'] - r['baseline_MB']:.0f} MB above baseline at\n    "
                          + "\n    ".join(r["peak_stack"][-8:]))
            rows.append(row)
    float_above = rows[0]["peak_MB"] - rows[0]["baseline_MB"]
    for r in rows:
        r["peak_above_baseline_MB"] = r["peak_MB"] - r["baseline_MB"]
        r["vs_float_peak"] = r["peak_MB"] / rows[0]["peak_MB"]
        r["vs_float_above_baseline"] = r["peak_above_baseline_MB"] / float_above
        for k, v in list(r.items()):
            if isinstance(v, float):
                r[k] = round(v, 2 if k.startswith("vs") else 1)
    print(f"peak resident memory, Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
          f"recipe {args.recipe}, prompt {args.prompt} tokens; each flow in its own process")
    header = ["flow", "baseline MB", "peak MB", "peak - baseline MB", "vs float (peak)", "vs float (above baseline)",
              "end MB", "model tensors MB"] + ([f"vs float (above baseline), {args.repeat} runs"] if args.repeat > 1 else [])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['flow']} | {r['baseline_MB']:.0f} | {r['peak_MB']:.0f} | {r['peak_above_baseline_MB']:.0f} | "
              f"{r['vs_float_peak']:.2f}x | {r['vs_float_above_baseline']:.2f}x | {r['end_MB']:.0f} | "
              f"{r['model_tensors_MB']:.0f} |"
              + (f" {min(r['runs_peak_above_baseline_MB']) / float_above:.2f}-"
                 f"{max(r['runs_peak_above_baseline_MB']) / float_above:.2f}x |" if args.repeat > 1 else ""))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"config": {k: v for k, v in vars(args).items() if k not in ("child", "checkpoint")},
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
