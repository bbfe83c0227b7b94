"""GPTQ against a reference: round to nearest, our GPTQ and llm-compressor's GPTQ on one model,
with the same calibration data and the same weight format; bits/byte lost over float.

Run it under a virtual environment that has llm-compressor, outside this repository (it pins its
own transformers), with this checkout importable:

    python3 -m venv /work/venvs/llmc
    /work/venvs/llmc/bin/pip install torch==2.13.0 && /work/venvs/llmc/bin/pip install llmcompressor
    /work/venvs/llmc/bin/pip install -e . --no-deps     # optional: else the repo root goes on sys.path
    OMP_NUM_THREADS=1 /work/venvs/llmc/bin/python benchmarks/gptq_reference.py ../shared/models/byte-llama-stdlib
    OMP_NUM_THREADS=1 /work/venvs/llmc/bin/python benchmarks/gptq_reference.py --tiny   # random tiny Llama

Options: ``--bits 4 3``, ``--calib-seqs 32 --seq-len 256`` (32 x 256 = 8192 calibration tokens),
``--calib-draw D`` (another sample of calibration windows, 1..8), ``--eval-tokens N`` (default: all
of the model's ``heldout_bytes.pt``, else 200,000 bytes of standard-library files not used for
calibration), ``--variants`` (our GPTQ with ``act_order=False`` too), ``--w8a8`` (SmoothQuant +
GPTQ W8A8, ours through ``compress`` and llm-compressor's), ``--json PATH`` (default
``benchmarks/results/gptq_reference.json``). On 2 cores a run takes ~10 min (set OMP_NUM_THREADS=1
on a busy 2-core machine: two contended OpenMP threads run far slower than one).

What is compared (the LM head stays float; every other linear is quantized, int<B> group 128
asymmetric; our scales are stored in bf16, llm-compressor's in the model dtype, float32 here):

* ``rtn``: ``formats.quantize``;
* ``gptq``: ``lowbit_compiler.rounding.gptq`` with its default options, on Hessians ``2/n X^T X``
  collected here layer by layer (each decoder layer calibrated on the outputs of the already
  quantized ones, as both GPTQ pipelines do);
* ``llmc-gptq``: llm-compressor's own pipeline, ``oneshot(..., GPTQModifier(...),
  pipeline="sequential")`` with its defaults (``actorder="static"``, ``block_size=128``,
  ``dampening_frac=0.01``, memoryless min-max observer); its weights are copied into a float model;
* ``llmc-gptq-sameH``: llm-compressor's ``quantize_weight`` on exactly the weights and Hessians our
  run sees, which separates the algorithm from pipeline numerics. The per-layer table (``layers``
  in the JSON) gives ``tr(dW H dW^T)`` of RTN, ours and llm-compressor's on those same inputs.

Bits/byte deltas of the order of 1e-3 move by about that much with any tiny numeric change
(GPTQ flips roundings chaotically: a 1e-5 relative jitter of llm-compressor's scales moves its
3-bit delta on the byte Llama between +0.0044 and +0.0062); compare KL to the float model, the
per-layer errors, or the mean over a few ``--calib-draw`` samples. On ``--tiny`` (random weights)
bits/byte barely depends on the weights and moves either way: read KL and the layer errors.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local model directories only
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if importlib.util.find_spec("lowbit_compiler") is None:  # not installed here: this checkout, laid out as
    # pyproject's package-dir does (lowbit_compiler.passes = passes/, lowbit_compiler.backends = backends/)
    _spec = importlib.util.spec_from_file_location(
        "lowbit_compiler", os.path.join(ROOT, "lowbit_compiler", "__init__.py"),
        submodule_search_locations=[os.path.join(ROOT, "lowbit_compiler"), ROOT])
    sys.modules["lowbit_compiler"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["lowbit_compiler"])
from lowbit_compiler import rounding  # noqa: E402
from lowbit_compiler.formats import WeightFormat, dequantize, quantize  # noqa: E402

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
GROUP = 128


# ---- model and data ---------------------------------------------------------------------------

def load_model(model_dir: str | None):
    import transformers as tf

    if model_dir is None:  # a random tiny Llama: nothing to download
        torch.manual_seed(0)
        config = tf.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        model_dir = os.path.join(tempfile.mkdtemp(prefix="tiny-llama-"), "model")
        tf.LlamaForCausalLM(config).save_pretrained(model_dir)  # oneshot reads the config back from disk
    return tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def stdlib_bytes(which: slice) -> torch.Tensor:
    root = os.path.dirname(os.__file__)
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) if "site-packages" not in d
                   for f in fs if f.endswith(".py"))
    text = "\n".join(open(p, encoding="utf-8", errors="replace").read() for p in files[which])
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def windows(ids: torch.Tensor, seq_len: int, count: int | None) -> list[torch.Tensor]:
    """``count`` windows spread evenly over ``ids`` (None: all consecutive windows)."""
    if count is None:
        return [ids[i:i + seq_len][None] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    step = (len(ids) - seq_len) // count
    return [ids[i * step:i * step + seq_len][None] for i in range(count)]


def data(model_dir: str | None, calib_seqs: int, seq_len: int, eval_tokens: int | None, draw: int = 0):
    """Calibration windows (draw 0: spread evenly over the calibration text; draw d > 0: every 8th
    of 8x as many windows, from the d-th: another sample of the same text) and evaluation windows."""
    text = stdlib_bytes(slice(0, 400, 2))
    calibration = (windows(text, seq_len, calib_seqs) if draw == 0
                   else windows(text, seq_len, 8 * calib_seqs)[(draw - 1) % 8::8][:calib_seqs])
    heldout = os.path.join(model_dir, "heldout_bytes.pt") if model_dir else None
    if heldout and os.path.exists(heldout):
        ids, source = torch.load(heldout).long().flatten(), "heldout_bytes.pt"
    else:
        ids, source = stdlib_bytes(slice(1, 400, 2)), "stdlib files[1:400:2]"
        eval_tokens = eval_tokens or 200_000  # as many as heldout_bytes.pt has
    if eval_tokens:
        ids = ids[:eval_tokens]
    return calibration, windows(ids, seq_len, None), source


@torch.no_grad()
def evaluate(model, batches: list[torch.Tensor], reference: list[torch.Tensor] | None = None):
    """(bits/byte, KL(float || model) in bits/token or None, the log-probs)."""
    nll, kl, tokens, logps = 0.0, 0.0, 0, []
    for i, ids in enumerate(batches):
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        nll -= logp.gather(-1, ids[0, 1:, None]).sum().item()
        if reference is not None:
            kl += (reference[i].exp() * (reference[i] - logp)).sum().item()
        else:
            logps.append(logp)
        tokens += ids.shape[1] - 1
    return nll / tokens / math.log(2), (kl / tokens / math.log(2) if reference is not None else None), logps


# ---- our sequential GPTQ harness --------------------------------------------------------------

@torch.no_grad()
def sequential(model, batches: list[torch.Tensor], quantize_fn: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]):
    """Layer by layer: the Hessian 2/n X^T X of every linear of a decoder layer from that layer's
    inputs (the outputs of the already quantized layers before it), then ``quantize_fn(name, W,
    H)`` -> the float weight to use."""
    layers = model.model.layers
    cached: list[tuple[tuple, dict]] = []

    class Stop(Exception):
        pass

    def grab(module, args, kwargs):
        cached.append((args, kwargs))
        raise Stop

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    for ids in batches:
        try:
            model(ids)
        except Stop:
            pass
    handle.remove()
    for li, layer in enumerate(layers):
        mods = {name: layer.get_submodule(name) for name in LINEARS}
        stats = {name: [torch.zeros(m.in_features, m.in_features, dtype=torch.float64), 0] for name, m in mods.items()}

        def hook(module, inputs, output, name):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            stats[name][0] += x.T @ x
            stats[name][1] += x.shape[0]

        hooks = [m.register_forward_hook(lambda mod, i, o, name=name: hook(mod, i, o, name)) for name, m in mods.items()]
        for args, kwargs in cached:
            layer(*args, **kwargs)
        for h in hooks:
            h.remove()
        for name, m in mods.items():
            hessian = (2.0 * stats[name][0] / stats[name][1]).float()
            m.weight.copy_(quantize_fn(f"model.layers.{li}.{name}", m.weight.detach().float().clone(), hessian))
        outputs = []
        for args, kwargs in cached:
            out = layer(*args, **kwargs)
            outputs.append(((out[0] if isinstance(out, tuple) else out,) + tuple(args[1:]), kwargs))
        cached = outputs
    return model


def layer_error(wq: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> float:
    d = (wq - w).double()
    return float(((d @ h.double()) * d).sum())


# ---- llm-compressor ---------------------------------------------------------------------------

def llmc_args(bits: int, actorder: str | None = "static"):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=GROUP,
                            actorder=actorder)


def llmc_same_hessian(bits: int) -> Callable:
    """llm-compressor's GPTQ kernel (observer + quantize_weight, its defaults) on given W and H."""
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    from llmcompressor.observers import Observer

    def fn(name, w, h):
        args = llmc_args(bits)
        observer = Observer.load_from_registry("memoryless_minmax", base_name="weight", args=args)
        observer(w)
        qp = observer.get_qparams()
        q, _, fallback = quantize_weight(w[None].clone(), h[None].clone(), qp["scale"][None], qp["zero_point"][None],
                                         None, args, blocksize=128, percdamp=0.01)
        return q[0]
    return fn


def byte_tokenizer():
    """oneshot wants a processor even for pre-tokenised data; a 256-entry word-level one."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(256)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<0>")))


def llmc_oneshot(base, calibration: list[torch.Tensor], modifiers) -> Any:
    from llmcompressor import oneshot
    from torch.utils.data import DataLoader

    loader = DataLoader([{"input_ids": c[0], "attention_mask": torch.ones_like(c[0])} for c in calibration],
                        batch_size=1)
    model = copy.deepcopy(base)
    out = oneshot(model=model, dataset=loader, processor=byte_tokenizer(), recipe=modifiers,
                  num_calibration_samples=len(calibration), pipeline="sequential")
    return out if out is not None else model


def llmc_pipeline_gptq(base, calibration: list[torch.Tensor], bits: int):
    """llm-compressor's own GPTQ pipeline; its (fake-quantized) weights copied into a float model."""
    from llmcompressor.modifiers.gptq import GPTQModifier

    modifier = GPTQModifier(ignore=["lm_head"], config_groups={"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": bits, "type": "int", "symmetric": False, "strategy": "group", "group_size": GROUP}}})
    quantized = llmc_oneshot(base, calibration, modifier)
    fresh = copy.deepcopy(base)
    weights = {f"{name}.weight": m.weight.detach().float() for name, m in quantized.named_modules()
               if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    fresh.load_state_dict(weights, strict=False)
    return fresh


# ---- the run ----------------------------------------------------------------------------------

def run(args) -> dict[str, Any]:
    import compressed_tensors
    import llmcompressor
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_model(None if args.tiny else args.model_dir)
    calibration, evaluation, source = data(None if args.tiny else args.model_dir, args.calib_seqs, args.seq_len,
                                           args.eval_tokens, args.calib_draw)
    result: dict[str, Any] = {
        "model": "random tiny Llama (seed 0)" if args.tiny else os.path.abspath(args.model_dir),
        "versions": {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
                     "torch": torch.__version__, "transformers": transformers.__version__},
        "settings": {"calibration": f"{len(calibration)} x {args.seq_len} tokens, stdlib files[0:400:2]",
                     "evaluation": f"{sum(e.shape[1] for e in evaluation)} tokens of {source}",
                     "format": f"int<bits> group {GROUP} asymmetric, lm_head float",
                     "calibration_draw": args.calib_draw,
                     "ours": "rounding.gptq defaults (block_size=128, damp=0.01, act_order=True)",
                     "llm-compressor": "GPTQModifier defaults: actorder=static, block_size=128, dampening_frac=0.01, "
                                       "memoryless_minmax observer, pipeline=sequential"},
        "float_bits_per_byte": None, "rows": [], "layers": {}}
    t = time.time()
    ref, _, ref_logp = evaluate(base, evaluation)
    result["float_bits_per_byte"] = ref
    print(f"float: {ref:.5f} bits/byte ({time.time() - t:.0f} s per evaluation)", flush=True)

    def row(method: str, bits: int, model, seconds: float, extra: dict | None = None) -> None:
        bpb, kl, _ = evaluate(model, evaluation, ref_logp)
        result["rows"].append({"method": method, "bits": bits, "delta_bits_per_byte": bpb - ref, "kl_bits": kl,
                               "seconds": round(seconds, 1), **(extra or {})})
        print(f"  {method:<22} {bits}-bit  {bpb - ref:+.5f} bits/byte  KL {kl:.5f} bits  ({seconds:.0f} s)",
              flush=True)

    for bits in args.bits:
        fmt = WeightFormat(bits, GROUP, symmetric=False)
        deq = lambda qw, w: dequantize(qw)[:, :w.shape[1]]  # noqa: E731

        t = time.time()
        model = copy.deepcopy(base)
        with torch.no_grad():
            for name, m in model.named_modules():
                if isinstance(m, torch.nn.Linear) and name != "lm_head":
                    m.weight.copy_(deq(quantize(m.weight.detach().float(), fmt), m.weight))
        row("rtn", bits, model, time.time() - t)

        reference = llmc_same_hessian(bits)
        layers: dict[str, dict[str, float]] = {}
        same_h: dict[str, torch.Tensor] = {}

        def ours(name, w, h, **options):
            q = deq(rounding.gptq(w, fmt, h, **options), w)
            if not options:  # the default run: also RTN and llm-compressor on these very W and H
                r = deq(quantize(w, fmt), w)
                same_h[name] = reference(name, w, h)
                layers[name] = {"rtn": layer_error(r, w, h), "gptq": layer_error(q, w, h),
                                "llmc-gptq": layer_error(same_h[name], w, h)}
            return q

        t = time.time()
        row("gptq", bits, sequential(copy.deepcopy(base), calibration, ours), time.time() - t)
        result["layers"][str(bits)] = layers
        totals = {k: sum(v[k] for v in layers.values()) for k in ("rtn", "gptq", "llmc-gptq")}
        result["rows"][-1]["layer_error_total"] = totals["gptq"]
        if args.variants:
            t = time.time()
            row("gptq act_order=False", bits,
                sequential(copy.deepcopy(base), calibration, lambda n, w, h: ours(n, w, h, act_order=False)),
                time.time() - t)
        t = time.time()
        row("llmc-gptq-sameH", bits, sequential(copy.deepcopy(base), calibration, reference), time.time() - t,
            {"note": "llm-compressor's quantize_weight on our harness's Hessians"})
        t = time.time()
        row("llmc-gptq", bits, llmc_pipeline_gptq(base, calibration, bits), time.time() - t,
            {"note": "llm-compressor's oneshot pipeline"})
        print(f"  layer error tr(dW H dW^T), summed over {len(layers)} linears on identical inputs: "
              + ", ".join(f"{k} {v:.4g}" for k, v in totals.items()), flush=True)
        result.setdefault("layer_error_totals", {})[str(bits)] = totals

    if args.w8a8:
        result["w8a8"] = w8a8(base, calibration, evaluation, ref, ref_logp)
    return result


def w8a8(base, calibration, evaluation, ref, ref_logp) -> dict[str, Any]:
    """SmoothQuant (alpha 0.8 in llm-compressor's examples; our preset's own) + GPTQ, W8A8 int8
    with dynamic per-token activations: ours through compress('w8a8-smooth-gptq'), llm-compressor's
    through oneshot (its quantized model run as is: it fake-quantizes the activations itself)."""
    out: dict[str, Any] = {}
    try:
        import lowbit_compiler

        t = time.time()
        model = lowbit_compiler.compress(copy.deepcopy(base), "w8a8-smooth-gptq", calibration=calibration,
                                         progress=False)
        bpb, kl, _ = evaluate(model, evaluation, ref_logp)
        out["ours"] = {"delta_bits_per_byte": bpb - ref, "kl_bits": kl, "seconds": time.time() - t}
    except Exception as e:  # the package's pipeline is not this script's subject: report, go on
        out["ours"] = {"error": f"{type(e).__name__}: {e}"}
    try:
        from llmcompressor.modifiers.gptq import GPTQModifier
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        t = time.time()
        model = llmc_oneshot(base, calibration, [SmoothQuantModifier(smoothing_strength=0.8),
                                                 GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])])
        bpb, kl, _ = evaluate(model, evaluation, ref_logp)
        out["llmc"] = {"delta_bits_per_byte": bpb - ref, "kl_bits": kl, "seconds": time.time() - t}
    except Exception as e:
        out["llmc"] = {"error": f"{type(e).__name__}: {e}"}
    for k, v in out.items():
        shown = v["error"] if "error" in v else f"{v['delta_bits_per_byte']:+.5f} bits/byte  KL {v['kl_bits']:.5f} bits"
        print(f"  w8a8 smoothquant+gptq {k:<5} {shown}", flush=True)
    return out


def table(result: dict[str, Any]) -> str:
    lines = [f"model: {result['model']}", f"float: {result['float_bits_per_byte']:.5f} bits/byte; "
             f"{result['settings']['calibration']}; eval {result['settings']['evaluation']}", "",
             "| method | bits | bits/byte over float | KL to float (bits/token) | layer error (sum) |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        total = result.get("layer_error_totals", {}).get(str(r["bits"]), {})
        key = {"rtn": "rtn", "gptq": "gptq", "llmc-gptq-sameH": "llmc-gptq"}.get(r["method"])
        err = f"{total[key]:.4g}" if key in total else ""
        lines.append(f"| {r['method']} | {r['bits']} | {r['delta_bits_per_byte']:+.5f} | {r['kl_bits']:.5f} | {err} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", nargs="?", default=os.path.join(ROOT, "..", "shared", "models", "byte-llama-stdlib"))
    parser.add_argument("--tiny", action="store_true", help="a random tiny Llama instead of model_dir")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--calib-seqs", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=None)
    parser.add_argument("--calib-draw", type=int, default=0, help="another sample of calibration windows (1..8)")
    parser.add_argument("--variants", action="store_true")
    parser.add_argument("--w8a8", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "gptq_reference.json"))
    args = parser.parse_args(argv)
    result = run(args)
    print()
    print(table(result))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
