"""The demo behind ``make demo`` / ``lowbit demo``: a tiny random Llama through every preset.

It prints, per preset, the logits' SQNR against eager, the greedy tokens of ``generate()``, the
backend calls, and the dump table; then compresses the model offline and shows the bytes saved.
"""
from __future__ import annotations

import os
import shutil

import torch


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def main(dump_dir: str = "dumps/demo") -> int:
    from lowbit_compiler import compress
    from lowbit_compiler.backends.lowbit_backend import stats
    from lowbit_compiler.cli import format_summary
    from lowbit_compiler.dump import load_summaries
    from lowbit_compiler.formats import sqnr_db

    shutil.rmtree(dump_dir, ignore_errors=True)
    model = tiny_llama()
    prompt = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(prompt).logits
        eager_tokens = model.generate(prompt, max_new_tokens=16, do_sample=False)[0, 12:].tolist()
    print(f"eager greedy tokens: {eager_tokens}\n")
    for recipe in ("none", "w8a16", "w4a16"):
        torch.compiler.reset()
        calls = stats["backend_calls"]
        directory = os.path.join(dump_dir, recipe)
        model.compile(backend="lowbit", options={"recipe": recipe, "dump_dir": directory})
        with torch.no_grad():
            logits = model(prompt).logits
            tokens = model.generate(prompt, max_new_tokens=16, do_sample=False)[0, 12:].tolist()
        print(f"### recipe {recipe!r}: logits SQNR vs eager {sqnr_db(reference, logits):.1f} dB, "
              f"backend calls {stats['backend_calls'] - calls}, tokens {'== eager' if tokens == eager_tokens else tokens}")
        print(format_summary(load_summaries(directory)[0]), "\n")
        model._compiled_call_impl = None  # undo model.compile for the next preset
    compressed = compress(tiny_llama(), "w4a16")
    totals = compressed.lowbit_summary["coverage"]["totals"]
    before, after = totals["bytes_before"], totals["bytes_after"]
    print(f"compress(model, 'w4a16'): {compressed.lowbit_summary['replaced_modules']} linears replaced, whole model "
          f"{before} -> {after} bytes ({before / after:.2f}x); dumps in {dump_dir}/ (try: lowbit inspect {dump_dir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
