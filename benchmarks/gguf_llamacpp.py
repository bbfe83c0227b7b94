"""Run our GGUF exports in llama.cpp itself and compare its logits with our compressed model's.

Needs llama-cpp-python (not in any extra: it compiles llama.cpp, about 25 minutes on two cores):
``pip install llama-cpp-python==0.3.36``. For each recipe: compress byte-llama-stdlib, export with
``vocab="bytes"``, evaluate 256 held-out bytes in llama.cpp (``Llama.eval``, all logits) and in our
model (float32 compute), and print the largest logit difference, top-1 agreement and both losses
(nats per byte). llama.cpp multiplies quantized weights with activations it quantizes itself (to
8 bits), so quantized rows differ by that rounding; the float row shows the export's structure
(names, Q/K permutation, metadata) is what llama.cpp expects.

    python benchmarks/gguf_llamacpp.py [MODEL_DIR]
"""
from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch
import transformers
from llama_cpp import Llama

from lowbit_compiler import Recipe, WeightFormat, compress
from lowbit_compiler.backends import cpu_kernels
from lowbit_compiler.export.gguf import export_gguf

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT = os.path.join(HERE, "..", "..", "shared", "models", "byte-llama-stdlib")
W4G32 = Recipe(name="w4a16-g32-sym", passes=("canonicalize", "insert_weight_quant"), weight=WeightFormat(4, 32, True))
CASES = [("float", None, "auto"), ("w8a16", "w8a16", "auto"), ("int4 g32 sym", W4G32, "auto"),
         ("w4a16", "w4a16", "auto"), ("mxfp4", "mxfp4", "auto"), ("w8a16", "w8a16", "q6_k")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=DEFAULT)
    args = ap.parse_args()
    ids = torch.load(os.path.join(args.model, "heldout_bytes.pt"), weights_only=True)[:256].long().view(1, 256)

    def nll(logits: torch.Tensor) -> float:
        return torch.nn.functional.cross_entropy(logits[:-1].float(), ids[0, 1:]).item()

    print("| recipe | weight_type | GGUF file_type | max abs logit diff | top-1 agree | loss ours | loss llama.cpp |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.gguf")
        for label, recipe, weight_type in CASES:
            model = transformers.AutoModelForCausalLM.from_pretrained(args.model).eval()
            if recipe is not None:
                compress(model, recipe, progress=False)
            report = export_gguf(model, path, weight_type=weight_type, vocab="bytes")
            with torch.no_grad(), cpu_kernels.eager_compute_dtype("activation"):
                ours = model(ids).logits[0].float()
            llm = Llama(model_path=path, n_ctx=512, n_batch=512, n_threads=1, logits_all=True, verbose=False)
            llm.eval(ids[0].tolist())
            theirs = torch.from_numpy(np.array(llm.scores[:ids.shape[1]], dtype=np.float32))
            del llm
            agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
            print(f"| {label} | {weight_type} | {report['file_type']} | {(ours - theirs).abs().max().item():.4f} | "
                  f"{agree:.3f} | {nll(ours):.4f} | {nll(theirs):.4f} |")


if __name__ == "__main__":
    main()
