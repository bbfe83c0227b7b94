"""What each recipe costs in accuracy, on any Hugging Face causal LM or encoder saved locally.

    python benchmarks/accuracy.py MODEL_DIR [--recipes w8a16 w4a16 ...] [--text FILE]
                                  [--seq-len 256] [--calib-seqs 8] [--eval-seqs 16]
                                  [--json benchmarks/results/accuracy_<model>.json] [--plot [SVG]]
    python benchmarks/accuracy.py --from-json benchmarks/results/accuracy_<model>.json --plot [SVG]

``--plot`` also draws bits per weight against the accuracy loss of every recipe, the Pareto front
marked (``benchmarks/plots.py``; default ``benchmarks/results/accuracy_<model>.svg``); with
``--from-json`` it plots an earlier run without measuring again.

Per recipe (each on a fresh copy of the model, through ``lowbit_compiler.compress``):

* bits/weight: true bytes of the quantized linears (codes + scales + zero points / second-level
  scales, and R-Sparse's float low-rank factors beside them) x 8 / their parameter count (float
  R-Sparse: 32 + its factors' bits over the linears they sit beside);
* weight SQNR min / median over the quantized linears;
* calibration time (``compress`` wall time, calibration included);
* causal LMs: perplexity on the evaluation text and the mean KL(float || quantized) of the
  next-token distributions; encoders: mean cosine similarity of mean-pooled embeddings to the
  float model's, and SQNR of the last hidden state (KL does not apply).

``--reference``: for the recipes llm-compressor implements on a CPU (RTN ``w8a16``/``w4a16``/
``w3a16``, GPTQ ``w4a16-gptq``/``w3a16-gptq``, SmoothQuant + GPTQ ``w8a8-smooth-gptq``; its AWQ
needs an accelerator), also run llm-compressor's ``oneshot`` with the same format (bits, group,
symmetry, the recipe's excluded layers), the same calibration sequences and its sequential
pipeline, and put its perplexity and KL beside ours. llm-compressor pins its own transformers:
run this script from a virtual environment that has it (see ``benchmarks/gptq_reference.py``).

Quantized linears compute with fp32 activations here (``eager_compute_dtype("activation")``), so
the numbers are the formats' and algorithms' error, not bf16 activation rounding.

Default text, offline and licence-clean: the Python standard library's own source on this machine;
calibration and evaluation sequences come from disjoint files (even / odd positions in the sorted
file list). ``--text FILE`` uses the first half of a file for calibration and the second for
evaluation. Tokenizer: the model directory's, or bytes (token = byte value) for a 256-entry
vocabulary without one.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import statistics
import sys
import sysconfig
import time
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if importlib.util.find_spec("lowbit_compiler") is None:  # not installed in this environment (llm-compressor's):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # gptq_reference makes this checkout importable
    import gptq_reference  # noqa: F401,E402
DEFAULT_RECIPES = [  # every preset but "none", grouped as the README's tables are
    "w8a16", "w4a16", "w4a16-hqq", "w4a16-gptq", "w4a16-awq", "w4a16-awq-gptq", "w3a16", "w3a16-gptq",
    "w3a16-awq-gptq", "w4a16-spqr", "w4a16-spqr-hqq", "mixed-4.5", "mixed-4.5-gptq", "nf4", "mxfp4", "nvfp4",
    "w8a8", "w8a8-static", "w8a8-smooth", "w8a8-smooth-gptq", "w4a8", "fp8",
    "rotate", "w4a4", "w4a4-rot", "w4a4-rot-gptq", "w4a8-rot", "w4a4-spin", "w4a4-spin-gptq", "w4a4-flat",
    "s24", "s24-wanda", "s24-sparsegpt", "s24-w8a16", "s24-w4a16"]


SPARSITY_ALGOS = ("teal", "wina", "cats", "rsparse")
SPARSITY_RECIPES = [  # activation sparsity at 25 / 40 / 50 % (not presets: see activation_sparsity_recipe)
    f"{algo}-{pct}" for algo in SPARSITY_ALGOS for pct in (25, 40, 50)]


def activation_sparsity_recipe(name: str):
    """``teal-40`` / ``wina-25`` / ``cats-40`` / ``rsparse-40`` (any percentage): the ``*-50`` preset
    with the pass's ``sparsity`` option set; R-Sparse takes a rank too, ``rsparse-50-r8`` (default 32),
    and composes with a weight preset, ``rsparse-50-r8+w4a16``; every other name is a preset,
    returned as given."""
    from lowbit_compiler.recipe import PRESETS

    base, plus, weights = name.partition("+")
    algo, _, rest = base.partition("-")
    pct, _, rank = rest.partition("-r")
    if name in PRESETS or algo not in SPARSITY_ALGOS or not pct.isdigit() or (rank and not (
            algo == "rsparse" and rank.isdigit())) or f"{algo}-50{plus}{weights}" not in PRESETS:
        return name
    options = {"sparsity": int(pct) / 100, **({"rank": int(rank)} if rank else {})}
    return PRESETS[f"{algo}-50{plus}{weights}"].replace(name=name, options={algo: options})


# ---- model and text --------------------------------------------------------------------------

def load(model_dir: str):
    """(model, tokenize(text) -> list[int], wrap(ids) -> ids with the model's special tokens, is_causal)."""
    import transformers as tf

    config = tf.AutoConfig.from_pretrained(model_dir)
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    cls = tf.AutoModelForCausalLM if causal else tf.AutoModel
    model = cls.from_pretrained(model_dir, dtype=torch.float32).eval()
    has_tokenizer = any(os.path.exists(os.path.join(model_dir, f)) for f in ("tokenizer.json", "vocab.txt",
                                                                             "tokenizer.model"))
    if has_tokenizer:
        tok = tf.AutoTokenizer.from_pretrained(model_dir)
        first, last = [tok.cls_token_id], [tok.sep_token_id]
        wrap = (lambda ids: ids) if causal or None in (first[0], last[0]) else (lambda ids: first + ids + last)
        return model, lambda text: tok(text, add_special_tokens=False)["input_ids"], wrap, causal
    if config.vocab_size == 256:
        return model, lambda text: list(text.encode("utf-8")), lambda ids: ids, causal
    raise SystemExit(f"{model_dir}: no tokenizer files and the vocabulary is not bytes; add a tokenizer")


def stdlib_texts() -> tuple[str, str]:
    """Calibration and evaluation text from disjoint standard-library files."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) if "site-packages" not in d
                   for f in fs if f.endswith(".py"))
    read = lambda paths: "\n".join(open(p, encoding="utf-8", errors="replace").read() for p in paths)  # noqa: E731
    return read(files[0:400:2]), read(files[1:400:2])


def sequences(ids: list[int], seq_len: int, count: int, wrap=lambda ids: ids) -> list[torch.Tensor]:
    """``count`` windows spread over the text, each ``seq_len`` tokens with the special tokens."""
    body = seq_len - len(wrap([]))
    step = max(body, (len(ids) - body) // max(count, 1))
    out = [torch.tensor([wrap(ids[i:i + body])]) for i in range(0, len(ids) - body, step)][:count]
    if len(out) < count:
        raise SystemExit(f"not enough text for {count} sequences of {seq_len} tokens")
    return out


# ---- measurements ----------------------------------------------------------------------------

@torch.no_grad()
def causal_metrics(model, reference_logits: list[torch.Tensor], evaluation: list[torch.Tensor]) -> dict[str, float]:
    nll, kl, tokens = 0.0, 0.0, 0
    for ids, ref in zip(evaluation, reference_logits):
        logits = model(ids).logits.float()
        logp = torch.log_softmax(logits[0, :-1], -1)
        nll -= logp.gather(-1, ids[0, 1:, None]).sum().item()
        ref_logp = torch.log_softmax(ref[0, :-1], -1)
        kl += (ref_logp.exp() * (ref_logp - logp)).sum().item()
        tokens += ids.shape[1] - 1
    return {"perplexity": math.exp(nll / tokens), "kl": kl / tokens}


@torch.no_grad()
def encoder_outputs(model, evaluation: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(ids).last_hidden_state.float() for ids in evaluation]


def encoder_metrics(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> dict[str, float]:
    from lowbit_compiler.formats import sqnr_db

    cos = [torch.nn.functional.cosine_similarity(o.mean(1), r.mean(1)).item() for o, r in zip(outputs, reference)]
    return {"embedding_cosine": statistics.mean(cos),
            "output_sqnr_db": sqnr_db(torch.cat(reference, 1), torch.cat(outputs, 1))}


def weight_report(summary: dict[str, Any]) -> dict[str, Any]:
    layers = [d for d in summary["layers"].values() if "bytes_after" in d]
    pruned = [d for d in summary["layers"].values() if "sparsity" in d]  # sparsify passes (float or stored sparse)
    sparsity = {"sparsity": statistics.mean(d["sparsity"] for d in pruned)} if pruned else {}
    params = sum(d["in_features"] * d["out_features"] for d in layers)
    sqnr = [d["weight_sqnr_db"] for d in (layers or pruned)]
    # R-Sparse's float low-rank factors count against the linears they sit beside
    lowrank = {name: d["lowrank"]["bytes"] for name, d in summary["layers"].items() if "lowrank" in d}
    if not layers:  # a recipe that quantizes nothing (rotate alone; pruning, activation sparsity on float weights)
        extra = {"weight_sqnr_min": min(sqnr), "weight_sqnr_median": statistics.median(sqnr)} if sqnr else {}
        weights = summary.get("coverage", {}).get("weights", {}).values()
        elements = sum(w["elements"] for w in weights if w.get("layer") in lowrank and w["role"] == "matmul")
        bits = 32.0 + (sum(lowrank.values()) * 8 / elements if elements else 0.0)
        return {"layers": len(pruned) or len(lowrank), "bits_per_weight": bits, **extra, **sparsity}
    return {"layers": len(layers), "bits_per_weight": (sum(d["bytes_after"] for d in layers) + sum(lowrank.values()))
            * 8 / max(params, 1),
            "weight_sqnr_min": min(sqnr), "weight_sqnr_median": statistics.median(sqnr), **sparsity}


# recipe -> what llm-compressor runs for it (same format; see reference_model)
REFERENCE = {"w8a16": "rtn", "w4a16": "rtn", "w3a16": "rtn", "w4a16-gptq": "gptq", "w3a16-gptq": "gptq",
             "w8a8-smooth-gptq": "smoothquant+gptq"}


def reference_model(base, recipe_name: str, calibration: list[torch.Tensor]):
    """llm-compressor's model for one of our presets (see REFERENCE), or None when it has none."""
    from lowbit_compiler.recipe import PRESETS

    method = REFERENCE.get(recipe_name)
    if method is None:
        return None
    if os.path.join(ROOT, "benchmarks") not in sys.path:
        sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from gptq_reference import llmc_oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    recipe = PRESETS[recipe_name]
    fmt = recipe.weight
    weights = {"num_bits": fmt.bits, "type": "int", "symmetric": fmt.symmetric,
               "strategy": "group" if fmt.group_size else "channel", "group_size": fmt.group_size}
    ignore = [p for p in recipe.exclude]
    if method == "smoothquant+gptq":
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        alpha = recipe.pass_options("smoothquant").get("alpha", 0.5)
        modifiers = [SmoothQuantModifier(smoothing_strength=alpha),
                     GPTQModifier(targets="Linear", scheme="W8A8", ignore=ignore)]
    else:
        cls = GPTQModifier if method == "gptq" else QuantizationModifier
        modifiers = cls(ignore=ignore, config_groups={"group_0": {"targets": ["Linear"], "weights": weights}})
    return llmc_oneshot(base, calibration, modifiers)


def evaluate(model_dir: str, recipes: list[str], text: str | None, seq_len: int, calib_seqs: int,
             eval_seqs: int, reference_runs: bool = False) -> dict[str, Any]:
    from lowbit_compiler import compress
    from lowbit_compiler.backends.cpu_kernels import eager_compute_dtype

    base, tokenize, wrap, causal = load(model_dir)
    if text is None:
        calib_text, eval_text = stdlib_texts()
    else:
        with open(text, encoding="utf-8") as f:
            content = f.read()
        calib_text, eval_text = content[: len(content) // 2], content[len(content) // 2:]
    calibration = sequences(tokenize(calib_text), seq_len, calib_seqs, wrap)
    evaluation = sequences(tokenize(eval_text), seq_len, eval_seqs, wrap)
    with torch.no_grad():
        reference = [base(ids).logits.float() for ids in evaluation] if causal else encoder_outputs(base, evaluation)
    rows = []
    float_row = {"recipe": "float", "bits_per_weight": 32.0}
    if causal:
        float_row.update(causal_metrics(base, reference, evaluation))
    else:
        float_row.update(embedding_cosine=1.0, output_sqnr_db=math.inf)
    rows.append(float_row)
    for recipe in recipes:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        model = compress(model, activation_sparsity_recipe(recipe), calibration=calibration, progress=False)
        row = {"recipe": recipe, "seconds": time.perf_counter() - start, **weight_report(model.lowbit_summary)}
        with eager_compute_dtype("activation"):
            if causal:
                row.update(causal_metrics(model, reference, evaluation))
            else:
                row.update(encoder_metrics(encoder_outputs(model, evaluation), reference))
        if reference_runs and causal:
            start = time.perf_counter()
            theirs = reference_model(base, recipe, calibration)
            if theirs is not None:
                metrics = causal_metrics(theirs, reference, evaluation)
                row["reference"] = {"method": f"llm-compressor {REFERENCE[recipe]}",
                                    "seconds": time.perf_counter() - start, **metrics}
        rows.append(row)
        print(format_row(row, causal), flush=True)
    versions = {"torch": torch.__version__}
    if reference_runs:
        import llmcompressor

        versions["llmcompressor"] = llmcompressor.__version__
    return {"model": os.path.abspath(model_dir), "causal": causal, "versions": versions, "seq_len": seq_len, "calibration_seqs": calib_seqs,
            "evaluation_seqs": eval_seqs, "text": text or "python stdlib (disjoint files)", "rows": rows}


# ---- output ----------------------------------------------------------------------------------

def format_row(r: dict[str, Any], causal: bool) -> str:
    metric = (f"ppl {r['perplexity']:.3f}  KL {r.get('kl', 0):.4f}" if causal
              else f"cos {r['embedding_cosine']:.5f}  out SQNR {r['output_sqnr_db']:.1f} dB")
    ref = r.get("reference")
    theirs = f"  | {ref['method']}: ppl {ref['perplexity']:.3f}  KL {ref['kl']:.4f}" if ref else ""
    return f"{r['recipe']:<12} {r['bits_per_weight']:.3f} b/w  {metric}{theirs}"


def table(result: dict[str, Any]) -> str:
    causal = result["causal"]
    header = ["recipe", "bits/w", "weight SQNR min/med", "calib s"] + (
        ["perplexity", "KL vs float"] if causal else ["emb. cosine", "output SQNR dB"])
    with_reference = any("reference" in r for r in result["rows"])
    if with_reference:
        header += ["llm-compressor perplexity", "llm-compressor KL"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in result["rows"]:
        sq = f"{r['weight_sqnr_min']:.1f} / {r['weight_sqnr_median']:.1f}" if "weight_sqnr_min" in r else "–"
        name = r["recipe"] + (f" ({r['sparsity']:.0%} zeros)" if "sparsity" in r else "")
        cells = [name, f"{r['bits_per_weight']:.2f}", sq, f"{r['seconds']:.1f}" if "seconds" in r else "–"]
        if causal:
            cells += [f"{r['perplexity']:.3f}", f"{r['kl']:.4f}" if "kl" in r else "0"]
        else:
            cells += [f"{r['embedding_cosine']:.5f}", "∞" if math.isinf(r["output_sqnr_db"]) else f"{r['output_sqnr_db']:.1f}"]
        if with_reference:
            ref = r.get("reference")
            cells += [f"{ref['perplexity']:.3f}", f"{ref['kl']:.4f}"] if ref else ["–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="?", help="the model (not needed with --from-json)")
    parser.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES)
    parser.add_argument("--text", default=None)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calib-seqs", type=int, default=8)
    parser.add_argument("--eval-seqs", type=int, default=16)
    parser.add_argument("--json", default=None)
    parser.add_argument("--reference", action="store_true",
                        help="also run llm-compressor on the recipes it implements (needs llmcompressor)")
    parser.add_argument("--plot", nargs="?", const="", default=None, metavar="SVG",
                        help="draw bits/weight against accuracy loss (default benchmarks/results/accuracy_<model>.svg)")
    parser.add_argument("--from-json", default=None, help="plot (and print) this earlier result instead of measuring")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
        print(table(result))
        plot(result, args.plot if args.plot is not None else "")
        return 0
    if args.model_dir is None:
        parser.error("model_dir is required (or --from-json with an earlier result)")
    if args.reference and importlib.util.find_spec("llmcompressor") is None:
        raise SystemExit("--reference needs llm-compressor in this environment "
                         "(see benchmarks/gptq_reference.py for a virtual environment that has it)")
    torch.manual_seed(0)
    result = evaluate(args.model_dir, args.recipes, args.text, args.seq_len, args.calib_seqs, args.eval_seqs,
                      args.reference)
    print(table(result))
    path = args.json or os.path.join("benchmarks", "results",
                                     f"accuracy_{os.path.basename(os.path.normpath(args.model_dir))}.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
    if args.plot is not None:
        plot(result, args.plot)
    return 0


def plot(result: dict[str, Any], path: str) -> None:
    """The SVG of bits/weight against accuracy loss (``path`` "": next to the results JSON)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from plots import accuracy_svg

    path = path or os.path.join("benchmarks", "results",
                                f"accuracy_{os.path.basename(os.path.normpath(result['model']))}.svg")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(accuracy_svg(result))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
