"""How large ``lowbit report`` gets and how long Chromium takes to render it; the README's screenshot.

    python benchmarks/report_size.py                    # random Llama like decode_cpu.py's model
                                                        # (hidden 2048, 8 layers, 0.49B parameters)
    python benchmarks/report_size.py --layers 24 --hidden 512   # as many blocks as Qwen2.5-0.5B
    python benchmarks/report_size.py --model ../shared/models/byte-llama-stdlib --recipe w4a4-rot \\
        --screenshot docs/img/report.png                # the README's screenshot

Compiles the model with ``backend="lowbit"`` and ``dump_dir`` (one prefill of ``--prompt`` tokens),
writes the report, and loads it in headless Chromium (``--dump-dom``) ``--repeats`` times, beside
an empty page loaded as many times, interleaved: the render time is the median difference (browser
start-up taken out). The graph's size does not depend on the hidden size, only on the number of
blocks and the passes of the recipe, so the random model's weights are never used beyond the
compile. Writes ``benchmarks/results/report_size.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def browser(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([chromium(), "--headless", "--disable-gpu", "--no-sandbox", *args],
                          capture_output=True, text=True, timeout=timeout)


def render_seconds(page: str, repeats: int) -> tuple[float, str]:
    """Median (page load - empty page load) seconds of ``--dump-dom``, and the page's render mark."""
    empty = os.path.join(os.path.dirname(page), "empty.html")
    with open(empty, "w") as f:
        f.write("<!DOCTYPE html><html><body>empty</body></html>")
    deltas, mark = [], "?"
    for _ in range(repeats):
        start = time.perf_counter()
        browser("--dump-dom", "file://" + empty)
        base = time.perf_counter() - start
        start = time.perf_counter()
        dom = browser("--dump-dom", "file://" + os.path.abspath(page)).stdout
        deltas.append(time.perf_counter() - start - base)
        found = dom.split('data-rendered="', 1)
        mark = found[1].split('"', 1)[0] if len(found) > 1 else "no mark"
    return statistics.median(deltas), mark


def model_and_prompt(args: argparse.Namespace):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        text = open(os.path.join(os.path.dirname(os.__file__), "textwrap.py"), "rb").read()[: args.prompt]
        return model, torch.tensor([list(text)]), os.path.basename(os.path.normpath(args.model))
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                      num_attention_heads=16, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    params = sum(p.numel() for p in model.parameters())
    return model, ids, f"random Llama hidden {args.hidden}, {args.layers} layers ({params / 1e9:.2f}B parameters)"


def main(argv: list[str] | None = None) -> int:
    from lowbit_compiler.report import write_report

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a local Hugging Face causal LM (default: random Llama)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048, help="random Llama: hidden size (intermediate 2.75x); the "
                        "report's size does not depend on it")
    parser.add_argument("--recipe", default="w4a16")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="the report (default: a temporary directory)")
    parser.add_argument("--screenshot", default=None, help="also save a PNG of the report's first screen")
    parser.add_argument("--json", default="benchmarks/results/report_size.json")
    args = parser.parse_args(argv)

    model, ids, what = model_and_prompt(args)
    work = tempfile.mkdtemp(prefix="lowbit-report-")
    dump_dir = os.path.join(work, "dumps")
    start = time.perf_counter()
    compiled = torch.compile(model, backend="lowbit", options={"recipe": args.recipe, "dump_dir": dump_dir})
    with torch.no_grad():
        compiled(ids)
    compile_s = time.perf_counter() - start
    page = args.out or os.path.join(work, "report.html")
    start = time.perf_counter()
    _, counts = write_report(dump_dir, page)
    write_s = time.perf_counter() - start
    size = os.path.getsize(page)
    row = {"model": what, "recipe": args.recipe, "prompt": args.prompt, "report_bytes": size,
           "write_seconds": round(write_s, 2), "compile_seconds": round(compile_s, 1), **counts}
    if chromium():
        seconds, mark = render_seconds(page, args.repeats)
        row.update(render_seconds=round(seconds, 2), rendered=mark)
        if args.screenshot:
            os.makedirs(os.path.dirname(args.screenshot) or ".", exist_ok=True)
            browser("--hide-scrollbars", "--window-size=1280,1400", f"--screenshot={os.path.abspath(args.screenshot)}",
                    "file://" + os.path.abspath(page) + "?screenshot")
            row["screenshot"] = args.screenshot
    else:
        print("chromium not found: no render time (apt-get install chromium)", file=sys.stderr)
    print("| model | recipe | report MB | layer rows | stage graphs | write s | Chromium render s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {what} | {args.recipe} | {size / 1e6:.2f} | {counts['layer_rows']} | {counts['stage_svgs']} | "
          f"{write_s:.1f} | {row.get('render_seconds', '–')} ({row.get('rendered', 'not run')}) |")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
