"""KV-cache compression: bytes, accuracy on a trained model, CPU decode attention time.

1. Bytes per token per layer (keys + values, scales included) for each KV format, measured on a
   real ``CompressedKVCache`` layer (Llama-3-8B attention shape: 8 KV heads x 128) filled with
   4096 tokens, against bf16; and a memory table for 4k-32k contexts of the whole Llama-3-8B
   cache (32 layers) and Llama-2-7B (32 layers, 32 KV heads), the float window included.
2. byte-Llama (``--model``, the trained byte-level Llama): each ``--seqs`` held-out sequence of
   ``--length`` bytes run in chunks of ``--chunk`` tokens through the cache, so that every chunk
   attends to the compressed past: bits per byte, the fraction of positions whose argmax equals
   the float cache's, and greedy tokens generated after the sequence that equal the float
   cache's. KVQuant's codebooks are fitted through ``compress(model, "kv3-kvquant",
   calibration=...)`` on 8 held-out sequences of 512 bytes that overlap none of the evaluated ones.
   ``--schemes`` picks the rows. (The model was trained on 256-byte sequences: beyond that its loss rises for every
   scheme alike; the comparison is against the float cache on the same positions.)
3. CPU decode attention at ``--context`` tokens, one layer of Llama-3-8B shape (32 query heads,
   8 KV heads, 128): torch SDPA over a bf16 and a float32 cache against the generated C kernel
   over the packed int4 / int2-KIVI cache, interleaved, median of ``--repeats``; and a whole
   byte-Llama decode step at that context with the float cache and with ``kv4``. With
   ``--decode-only``: the attention table, then a whole decode step of one layer of Llama-3-8B's
   shape (bf16 / float32 weights, their float cache against ``kv4``; ``--no-step`` skips it).

    python benchmarks/kv_cache.py [--model ../shared/models/byte-llama-stdlib] [--json benchmarks/results/kv_cache.json]

Timings share the machine with whatever else runs: re-measure on an idle machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import copy
import json
import math
import os
import statistics
import time

import torch

from lowbit_compiler import kv

SCHEMES = ["int8", "fp8", "int4", "gear4", "kivi4", "int3", "kivi3", "kvquant3", "int2", "kivi2"]
RECIPE_OF = {"int8": "kv8", "fp8": "kv-fp8", "int4": "kv4", "int3": "kv3", "int2": "kv2", "kivi4": "kv4-kivi",
             "kivi3": "kv3-kivi", "kivi2": "kv2-kivi", "kvquant3": "kv3-kvquant", "gear4": "kv4-gear"}


def _table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *map(line, cells[1:])])


# --------------------------------------------------------------------------------------------
# 1. Bytes
# --------------------------------------------------------------------------------------------

def measured_bytes(tokens: int = 4096, heads: int = 8, head_dim: int = 128) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, heads, tokens, head_dim, generator=g).bfloat16()
    v = torch.randn(1, heads, tokens, head_dim, generator=g).bfloat16()
    bf16 = 2 * heads * head_dim * 2
    rows = []
    for name in SCHEMES:
        fmt = kv.get_format(name)
        rope = None
        if fmt.scheme == "kvquant":  # codebooks fitted on the same random data; positions stored, RoPE the identity
            fmt = kv.KVFormat(**{**vars(fmt), "params": kv.fit_kvquant(k.float(), v.float(), fmt)})
            rope = lambda pos: (torch.ones(*pos.shape, head_dim), torch.zeros(*pos.shape, head_dim))  # noqa: E731
        layer = kv.classes()[0](fmt, rope)
        layer.update(k, v)
        held = layer.nbytes()
        packed_tokens = layer._k.length
        per_token = held["packed"] / packed_tokens
        rows.append({"scheme": name, "format": fmt.key, "bytes_per_token": per_token,
                     "formula": fmt.bytes_per_token(heads, head_dim), "bf16_bytes_per_token": bf16,
                     "ratio": bf16 / per_token, "window_bytes": held["float"], "constant_bytes": held["constant"],
                     "ratio_with_window": bf16 * tokens / (held["packed"] + held["float"] + held["constant"])})
    return rows


def memory_table(contexts=(4096, 8192, 16384, 32768)) -> list[dict]:
    shapes = {"Llama-3-8B (32 layers, 8 KV heads x 128)": (32, 8, 128),
              "Llama-2-7B (32 layers, 32 KV heads x 128)": (32, 32, 128)}
    rows = []
    for model, (layers, heads, d) in shapes.items():
        for name in ["bf16", *SCHEMES]:
            row = {"model": model, "scheme": name}
            for ctx in contexts:
                if name == "bf16":
                    total = layers * 2 * heads * d * 2 * ctx
                else:
                    fmt = kv.get_format(name)
                    # float tokens at most, in bf16: window + a token group or GEAR chunk waiting, sinks
                    window = fmt.window + fmt.token_block - 1 + fmt.sinks
                    total = layers * (fmt.bytes_per_token(heads, d) * (ctx - window) + 2 * heads * d * 2 * window
                                      + fmt.constant_bytes(heads, d))
                row[str(ctx)] = total / 2 ** 30
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# 2. byte-Llama
# --------------------------------------------------------------------------------------------

def _chunked_logits(model, ids: torch.Tensor, chunk: int, make_cache) -> tuple[torch.Tensor, object]:
    cache = make_cache()
    out = []
    for start in range(0, ids.shape[1], chunk):
        o = model(ids[:, start:start + chunk], cache=cache, use_cache=True)
        cache = o.past_key_values
        out.append(o.logits.float())
    return torch.cat(out, 1), cache


def calibration_batches(data: torch.Tensor, starts: list[int], length: int, count: int = 8,
                        size: int = 512) -> list[torch.Tensor]:
    """``count`` held-out sequences of ``size`` bytes that overlap none of the evaluated ones (for
    KVQuant's codebooks): spread over the gap between the first two evaluated sequences."""
    lo = starts[0] + length
    hi = starts[1] if len(starts) > 1 else len(data)
    if hi - lo < count * size:
        raise SystemExit(f"no room for {count} x {size} calibration bytes between the evaluated sequences")
    return [data[s:s + size][None] for s in torch.linspace(lo, hi - size, count).long().tolist()]


def compressed_model(base, name: str, calibration: list[torch.Tensor]):
    """``base`` with the ``name`` cache: through compress() (and the calibration engine) for the
    data-driven KVQuant, else kv.install with the named format."""
    from lowbit_compiler import compress

    model = copy.deepcopy(base)
    if kv.get_format(name).scheme == "kvquant":
        return compress(model, RECIPE_OF[name], calibration=calibration, progress=False)
    kv.install(model, {i: kv.get_format(name) for i in range(base.config.num_hidden_layers)})
    return model


def accuracy(model_dir: str, seqs: int, length: int, chunk: int, new_tokens: int,
             schemes: list[str] = SCHEMES) -> list[dict]:
    from transformers import DynamicCache, LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    data = torch.load(os.path.join(model_dir, "heldout_bytes.pt"))
    starts = torch.linspace(0, len(data) - length - 1, seqs).long().tolist()
    batches = [data[s:s + length][None] for s in starts]
    calibration = calibration_batches(data, starts, length)
    rows = []
    with torch.no_grad():
        reference = []
        for ids in batches:
            logits, cache = _chunked_logits(base, ids, chunk, lambda: DynamicCache(config=base.config))
            gen = _greedy(base, ids, logits, cache, new_tokens)
            reference.append((logits, gen))
        for name in ["float", *schemes]:
            model = base if name == "float" else compressed_model(base, name, calibration)
            nll, agree, same, count = 0.0, 0, 0, 0
            for ids, (ref_logits, ref_gen) in zip(batches, reference):
                logits, cache = _chunked_logits(model, ids, chunk, lambda: kv.new_cache(
                    model) if name != "float" else DynamicCache(config=base.config))
                nll += torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
                agree += (logits[0].argmax(-1) == ref_logits[0].argmax(-1)).sum().item()
                count += ids.shape[1] - 1
                gen = _greedy(model, ids, logits, cache, new_tokens)
                same += (gen == ref_gen).sum().item()
            fmt = None if name == "float" else model._lowbit_kv_formats[0]
            rows.append({"scheme": name, "format": "bf16" if fmt is None else fmt.key,
                         "bytes_per_token": 2 * 2 * base.config.num_key_value_heads * base.config.head_dim
                         if fmt is None else fmt.bytes_per_token(base.config.num_key_value_heads, base.config.head_dim),
                         "bits_per_byte": nll / count / math.log(2),
                         "argmax_agreement": agree / (count + len(batches)),
                         "greedy_tokens_equal": same / (new_tokens * len(batches))})
            print(f"  {name}: {rows[-1]}", flush=True)
    return rows


def _greedy(model, ids, logits, cache, new_tokens):
    token = logits[:, -1:].argmax(-1)
    out = []
    for _ in range(new_tokens):
        out.append(token)
        o = model(token, cache=cache, use_cache=True)
        cache = o.past_key_values
        token = o.logits[:, -1:].argmax(-1)
    return torch.cat(out, 1)


# --------------------------------------------------------------------------------------------
# 3. CPU decode attention and a whole step
# --------------------------------------------------------------------------------------------

def _median_interleaved(fns: dict, repeats: int) -> dict[str, float]:
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm up (compiles the generated kernel once)
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def _rope(d: int, base: float = 500000.0):
    """Llama-3's rotary embedding (rotate_half, full width) as ``kv.rope_function`` returns it."""
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2).float() / d))
    rotary = torch.nn.Module()
    rotary.inv_freq, rotary.attention_scaling = inv_freq, 1.0

    def rope(pos):
        angle = pos[..., None].float() * inv_freq
        emb = torch.cat([angle, angle], -1)
        return emb.cos(), emb.sin()

    rope.rotary = rotary
    return rope


DECODE_SCHEMES = ("int8", "int4", "int3", "int2", "fp8", "kivi4", "kivi2", "kvquant3", "gear4")


def decode_attention_time(context: int, repeats: int, schemes=DECODE_SCHEMES) -> dict[str, float]:
    """One layer's decode attention (32 query heads / 8 KV heads x 128, Llama-3-8B's shape) over
    ``context`` cached tokens, every scheme's packed cache through the attention the model runs
    (``kv.packed_attention``'s choice: the generated C kernel, or the blocked torch reference for
    fp8), against torch SDPA over a bf16 and an fp32 cache; interleaved, medians."""
    from lowbit_compiler.backends import kv_cpu

    hq, hkv, d = 32, 8, 128
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, hkv, context, d, generator=g)
    v = torch.randn(1, hkv, context, d, generator=g)
    q = torch.randn(1, hq, 1, d, generator=g)
    k16, v16, q16 = k.bfloat16(), v.bfloat16(), q.bfloat16()
    rope = _rope(d)
    layers, runs = {}, {}
    for name in schemes:
        fmt = kv.get_format(name)
        if fmt.scheme == "kvquant":
            fmt = dataclasses.replace(fmt, params=kv.fit_kvquant(k, v, fmt))
        layer = layers[name] = kv.classes()[0](fmt, rope if fmt.key_rope == "pre" else None)
        cos, sin = rope(torch.arange(context)[None])
        k_in = k * cos[:, None] + kv.rotate_half(k) * sin[:, None] if fmt.key_rope == "pre" else k
        layer.update(k_in, v, kwargs={"position_ids": torch.arange(context)[None]})
        why = kv_cpu.unsupported(q, layer)
        runs[name] = "generated C kernel" if why is None and kv_cpu.decode_attention(q, layer, None, d ** -0.5) is not None \
            else f"blocked torch reference ({why})"
    sdpa = torch.nn.functional.scaled_dot_product_attention
    fns = {"bf16 cache, torch SDPA": lambda: sdpa(q16, k16, v16, enable_gqa=True),
           "fp32 cache, torch SDPA": lambda: sdpa(q, k, v, enable_gqa=True)}
    for name in schemes:
        layer = layers[name]
        fns[f"{name} cache, {runs[name]}"] = (lambda layer=layer: kv.packed_attention(
            _Attn(), q, kv.PackedKV(layer, "keys"), kv.PackedKV(layer, "values"), None, scaling=d ** -0.5)[0])
    return _median_interleaved(fns, repeats)


class _Attn(torch.nn.Module):
    layer_idx = 0


STEP_CONTENDERS = (("bfloat16", None), ("bfloat16", "int4"), ("float32", None), ("float32", "int4"))


def decode_layer_step_time(context: int, repeats: int, contenders=STEP_CONTENDERS,
                           intermediate: int = 14336) -> dict[str, float]:
    """A whole decode step (one token: norms, q/k/v/o projections, RoPE, the cache update, the
    attention, the MLP, a 256-entry head) of a one-layer Llama of Llama-3-8B's layer shape (hidden
    4096, 32 query heads, 8 KV heads x 128, MLP ``intermediate``), ``context`` tokens cached:
    float weights of each dtype with the model's own ``DynamicCache`` (SDPA) and with the ``kv4``
    ``CompressedKVCache`` (the generated C kernel); interleaved, medians. The caches are filled
    with random keys and values (no 4k-token prefill); a float cache is cropped back after each
    step, the packed one grows by one token per step (``repeats`` of ``context``)."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=intermediate, num_hidden_layers=1,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=256,
                         max_position_embeddings=2 * context + 64, rope_theta=500000.0)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    for p in base.parameters():
        p.data.normal_(0, 0.02)
    g = torch.Generator().manual_seed(1)
    k = torch.randn(1, 8, context, 128, generator=g)
    v = torch.randn(1, 8, context, 128, generator=g)
    token = torch.tensor([[7]])
    fns = {}
    for dtype_name, scheme in contenders:
        dtype = getattr(torch, dtype_name)
        model = copy.deepcopy(base).to(dtype)
        if scheme is None:
            cache = DynamicCache(config=config)
            cache.update(k.to(dtype), v.to(dtype), 0)

            def step(model=model, cache=cache):
                model(token, cache=cache, position_ids=torch.tensor([[context]]))
                cache.crop(-1)

            fns[f"{dtype_name} weights, {dtype_name} DynamicCache + SDPA"] = step
        else:
            kv.install(model, {0: kv.get_format(scheme)})
            cache = kv.new_cache(model)
            cache.layers[0].update(k.to(dtype), v.to(dtype))
            fns[f"{dtype_name} weights, {scheme} CompressedKVCache + generated C kernel"] = (
                lambda model=model, cache=cache: model(token, cache=cache, position_ids=torch.tensor([[context]])))
    with torch.no_grad():
        return _median_interleaved(fns, repeats)


def decode_step_time(model_dir: str, context: int, repeats: int) -> dict[str, float]:
    from transformers import DynamicCache, LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    compressed = copy.deepcopy(base)
    kv.install(compressed, {i: kv.get_format("int4") for i in range(base.config.num_hidden_layers)})
    data = torch.load(os.path.join(model_dir, "heldout_bytes.pt"))[:context][None]
    token = data[:, -1:]
    with torch.no_grad():
        float_cache = _chunked_logits(base, data, 512, lambda: DynamicCache(config=base.config))[1]
        packed_cache = _chunked_logits(compressed, data, 512, lambda: kv.new_cache(compressed))[1]
        # a step appends one token to the cache it is given; the float one is cropped back after
        # each step, the packed one grows by one token per step (under 1 % of the context over a run)
        def float_step():
            base(token, cache=float_cache)
            float_cache.crop(-1)

        return _median_interleaved({"float32 DynamicCache + SDPA": float_step,
                                    "kv4 CompressedKVCache + generated C kernel":
                                        lambda: compressed(token, cache=packed_cache)}, repeats)


def _same_dtype_float(name: str) -> str:
    dtype = name.split(" ")[0]
    return f"{dtype} weights, {dtype} DynamicCache + SDPA"


def zoo_table(new_tokens: int = 24) -> list[dict]:
    """Every architecture of ``lowbit_compiler.zoo`` through ``compress(model, "kv8")``: whether the
    compressed cache was installed; prefill logits SQNR against the float cache; generate() with a
    window that keeps every token in float (the cache and attention machinery alone: tokens must
    equal the float cache's) and with int8 (random weights have near-tied logits, so a few flips
    are expected)."""
    from lowbit_compiler import compress, zoo
    from lowbit_compiler.formats import sqnr_db

    rows = []
    for arch in zoo.ARCHITECTURES:
        model, inputs = zoo.build(arch)
        row = {"arch": arch}
        try:
            with torch.no_grad():
                compressed = compress(copy.deepcopy(model), "kv8", example_inputs=inputs, progress=False)
                marked = [p["details"] for p in compressed.lowbit_summary["passes"] if p["name"] == "mark_kv_cache"]
                refused = sorted({why for d in marked for why in d["refused"].values()})
                info = compressed.lowbit_summary.get("kv_cache") or {
                    "applied": False, "reason": "; ".join(refused) or "mark_kv_cache found no attention"}
                row.update(installed=info["applied"], reason=info.get("reason", ""), layers=len(info.get("layers", {})))
                if info["applied"]:
                    ids = inputs["input_ids"]
                    reference = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
                    cached = compressed(ids, use_cache=True)
                    row["cache"] = type(cached.past_key_values).__name__  # the compressed one, or the table says so
                    row["logits_sqnr_db"] = round(sqnr_db(model(ids).logits, cached.logits), 1)
                    out = compressed.generate(ids, max_new_tokens=new_tokens, do_sample=False)
                    row["int8_tokens_equal"] = (out == reference).float().mean().item()
                    formats = compressed._lowbit_kv_formats
                    compressed._lowbit_kv_formats = [
                        None if f is None else kv.KVFormat(f.scheme, f.bits, f.group, window=10 ** 6) for f in formats]
                    out = compressed.generate(ids, max_new_tokens=new_tokens, do_sample=False)
                    row["float_window_tokens_equal"] = bool(torch.equal(out, reference))
        except Exception as e:  # the table says what failed
            row.update(installed=False, reason=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
        print(f"  {row}", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="../shared/models/byte-llama-stdlib")
    parser.add_argument("--seqs", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", default="benchmarks/results/kv_cache.json")
    parser.add_argument("--decode-only", action="store_true",
                        help="only the decode timings: attention, and a whole step of one Llama-3-8B-shape layer")
    parser.add_argument("--no-step", action="store_true", help="with --decode-only: the attention table only")
    parser.add_argument("--zoo", action="store_true", help="only the zoo table (every tiny architecture, kv8)")
    parser.add_argument("--schemes", default=",".join(SCHEMES),
                        help="comma-separated formats for the byte-Llama accuracy rows (default: all)")
    args = parser.parse_args()
    result: dict = {"threads": torch.get_num_threads(), "args": vars(args)}
    if args.zoo:
        rows = zoo_table()
        print(_table([[r["arch"], r.get("cache", "no") if r["installed"] else "no", r.get("layers", 0),
                       {True: "yes", False: "NO"}.get(r.get("float_window_tokens_equal"), "-"),
                       r.get("logits_sqnr_db", "-"), r.get("int8_tokens_equal", "-"), r.get("reason", "")] for r in rows],
                     ["arch", "cache used", "layers", "generate = float (all-float window)",
                      "kv8 prefill logits SQNR dB", "kv8 generate tokens = float", "reason"]))
        path = args.json.replace(".json", "_zoo.json")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
        return

    if args.decode_only:
        times = decode_attention_time(args.context, args.repeats)
        base_ms = times["bf16 cache, torch SDPA"]
        print(f"CPU decode attention, one layer (32 q heads / 8 KV heads x 128), context {args.context}, "
              f"{result['threads']} threads, median ms")
        print(_table([[k, f"{v:.3f}", f"{base_ms / v:.2f}x"] for k, v in times.items()], ["contender", "ms", "vs bf16"]))
        result["decode_attention_ms"] = times
        if not args.no_step:
            step = decode_layer_step_time(args.context, args.repeats)
            result["decode_layer_step_ms"] = step
            print(f"\nWhole decode step, one layer of Llama-3-8B shape (hidden 4096, MLP 14336, 32 q / 8 KV heads x "
                  f"128, 256-token head), context {args.context}, {result['threads']} threads, median ms")
            print(_table([[k, f"{v:.3f}", f"{step[_same_dtype_float(k)] / v:.2f}x"] for k, v in step.items()],
                         ["contender", "ms", "vs the same weights with their float cache"]))
        path = args.json.replace(".json", "_decode.json")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        return
    rows = measured_bytes()
    result["bytes"] = rows
    print("KV bytes per token per layer, measured on a CompressedKVCache layer (8 KV heads x 128, 4096 tokens)")
    print(_table([[r["scheme"], r["format"], f"{r['bytes_per_token']:.0f}", r["bf16_bytes_per_token"],
                   f"{r['ratio']:.2f}x", f"{r['ratio_with_window']:.2f}x"] for r in rows],
                 ["scheme", "format", "bytes/token", "bf16", "vs bf16", "vs bf16 incl. window"]))
    mem = memory_table()
    result["memory_gib"] = mem
    print("\nWhole KV cache, GiB (batch 1; the float window counted in bf16)")
    print(_table([[r["model"], r["scheme"], *(f"{r[c]:.2f}" for c in ("4096", "8192", "16384", "32768"))] for r in mem],
                 ["model", "scheme", "4k", "8k", "16k", "32k"]))

    if args.repeats == 0:  # --repeats 0: no timings (accuracy only)
        if os.path.isdir(args.model):
            result["byte_llama"] = acc = accuracy(args.model, args.seqs, args.length, args.chunk, args.new_tokens,
                                                  args.schemes.split(","))
            print(_table([[r["scheme"], r["format"], f"{r['bytes_per_token']:.0f}", f"{r['bits_per_byte']:.4f}",
                           f"{r['argmax_agreement']:.4f}", f"{r['greedy_tokens_equal']:.3f}"] for r in acc],
                         ["scheme", "format", "bytes/token/layer", "bits/byte", "argmax = float cache",
                          "greedy tokens = float cache"]))
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        return
    times = decode_attention_time(args.context, args.repeats)
    result["decode_attention_ms"] = times
    print(f"\nCPU decode attention, one layer (32 q heads / 8 KV heads x 128), context {args.context}, "
          f"{result['threads']} threads, median ms")
    base_ms = times["bf16 cache, torch SDPA"]
    print(_table([[k, f"{v:.3f}", f"{base_ms / v:.2f}x"] for k, v in times.items()], ["contender", "ms", "vs bf16"]))

    if os.path.isdir(args.model):
        print(f"\nbyte-Llama: {args.seqs} x {args.length} bytes in chunks of {args.chunk}, then {args.new_tokens} greedy tokens")
        acc = accuracy(args.model, args.seqs, args.length, args.chunk, args.new_tokens, args.schemes.split(","))
        result["byte_llama"] = acc
        print(_table([[r["scheme"], r["format"], f"{r['bytes_per_token']:.0f}", f"{r['bits_per_byte']:.4f}",
                       f"{r['argmax_agreement']:.4f}", f"{r['greedy_tokens_equal']:.3f}"] for r in acc],
                     ["scheme", "format", "bytes/token/layer", "bits/byte", "argmax = float cache",
                      "greedy tokens = float cache"]))
        step = decode_step_time(args.model, args.context, args.repeats)
        result["byte_llama_decode_step_ms"] = step
        print(f"\nbyte-Llama whole decode step at context {args.context}, median ms")
        print(_table([[k, f"{v:.3f}"] for k, v in step.items()], ["contender", "ms"]))
    else:
        print(f"\n(byte-Llama not found at {args.model}: accuracy and whole-step rows skipped)")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
