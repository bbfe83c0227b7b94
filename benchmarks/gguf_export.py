"""GGUF export sizes and fidelity (the table in docs/export.md, "GGUF (llama.cpp)").

For each recipe and GGUF weight type: compress a Llama, export it with ``export_gguf``, rebuild a
float Llama from the GGUF tensors alone (``gguf.GGUFReader`` + ``gguf.quants.dequantize``, Q/K rows
un-permuted) and compare its held-out loss (nats per byte) with our compressed model's (float32
compute). Needs the ``export`` extra.

    python benchmarks/gguf_export.py [MODEL_DIR]   # default ../shared/models/byte-llama-stdlib, else the zoo's tiny Llama
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
import transformers

import gguf
from lowbit_compiler import Recipe, WeightFormat, compress, zoo
from lowbit_compiler.backends import cpu_kernels
from lowbit_compiler.export.gguf import export_gguf

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT = os.path.join(HERE, "..", "..", "shared", "models", "byte-llama-stdlib")
RECIPES = [("float", None), ("w8a16", "w8a16"),
           ("int4 g32 sym", Recipe(name="w4a16-g32-sym", passes=("canonicalize", "insert_weight_quant"),
                                   weight=WeightFormat(4, 32, True))),
           ("w4a16", "w4a16"), ("mxfp4", "mxfp4"), ("nf4", "nf4")]


def rebuild(path: str, like: torch.nn.Module) -> torch.nn.Module:
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    model = transformers.LlamaForCausalLM(like.config).eval()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, like.config.num_hidden_layers)
    n_head, n_kv = like.config.num_attention_heads, like.config.num_key_value_heads
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = tensors[names.get_name(name, try_suffixes=(".weight",))]
            w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).reshape(p.shape)
            h = n_head if "q_proj" in name else n_kv if "k_proj" in name else None
            if h:  # undo convert_hf_to_gguf's LlamaModel.permute
                w = w.reshape(h, w.shape[0] // h // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
            p.copy_(w)
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=DEFAULT)
    args = ap.parse_args()
    real = os.path.isdir(args.model)

    def build() -> torch.nn.Module:
        return transformers.AutoModelForCausalLM.from_pretrained(args.model).eval() if real else zoo.build("llama")[0]

    if real:  # 1,024 held-out bytes (a plain int64 tensor; weights_only: nothing is unpickled)
        ids = torch.load(os.path.join(args.model, "heldout_bytes.pt"), weights_only=True)[:1024].long().view(4, 256)
    else:
        ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))

    def loss(model: torch.nn.Module) -> float:
        with torch.no_grad(), cpu_kernels.eager_compute_dtype("activation"):
            logits = model(ids).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()

    print("| recipe | weight_type | GGUF types | bytes | loss ours | loss GGUF | export s |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.gguf")
        for label, recipe in RECIPES:
            model = build()
            if recipe is not None:
                compress(model, recipe, progress=False)
            ours = loss(model)
            for weight_type in (["auto", "q6_k", "q4_0"] if recipe else ["auto"]):
                for float_type in ("f32", "f16") if weight_type == "auto" else ("f32",):
                    t0 = time.perf_counter()
                    report = export_gguf(model, path, weight_type=weight_type, float_type=float_type)
                    seconds = time.perf_counter() - t0
                    types: dict[str, int] = {}
                    for e in report["tensors"].values():
                        if e["source"].removesuffix(".weight").endswith(("proj", "lm_head")):
                            key = e["gguf_type"] + ("" if e["exact"] else "~")
                            types[key] = types.get(key, 0) + 1
                    sqnr = [e["sqnr_db"] for e in report["tensors"].values() if e["how"] == "requantized"]
                    kinds = ", ".join(f"{k} x{v}" for k, v in types.items())
                    if sqnr:
                        kinds += f" (min SQNR {min(sqnr):.1f} dB)"
                    wt = weight_type + ("" if float_type == "f32" else ", float_type=f16")
                    print(f"| {label} | {wt} | {kinds} | {report['file_bytes']:,} | {ours:.4f} | "
                          f"{loss(rebuild(path, model)):.4f} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
