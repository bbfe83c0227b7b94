"""Everything a lent CUDA GPU can tell us that the CPU machine cannot, in one run.

1. ``benchmarks/kernels_gpu.py``: each fusion group of a Llama-2-7B layer, generated kernel against
   the unfused fp16 torch ops, per weight format and row count (timed with do_bench).
2. Numerics of the *GPU variant* of every generated kernel (16-bit and fp8 ``tl.dot``, native
   conversions) on the device, over the same pairwise grids the interpreter tests use
   (``tests/backends/test_codegen.py``): SQNR against the kernel's float reference. The
   interpreter checks a different variant (ieee dots, fp32 weights), so this is the only check
   of what a GPU runs.
3. The MoE grouped GEMM and the Hadamard kernel on the device against float64.
4. Whole models on the device: a tiny Llama through ``torch.compile(backend="lowbit")`` per
   preset, logits SQNR against eager float, and which implementation every lowbit op got.
5. Decode-step time of two Llama-2-7B-shaped layers: eager fp16 against lowbit w4a16 / w8a16.

    python benchmarks/gpu_check.py [--out DIR] [--quick]

Each section writes its part of ``DIR/gpu_check.json`` as it finishes (a run cut short keeps what
it measured); a section that raises is recorded with its traceback and the next one runs. Without
a CUDA device it says so and does nothing.
"""
from __future__ import annotations

import argparse
import copy
import concurrent.futures as cf
import json
import os
import sys
import tempfile
import time
import traceback
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# SQNR floors of the GPU variant against the kernel's float64/float32 reference: the GEMM variant
# multiplies in the activation dtype on tensor cores (fp16: 11-bit mantissas, bf16: 8, tf32: 11),
# the GEMV variant in fp32 (only the final rounding to the output dtype differs).
# GPU_CHECK_DEVICE=cpu with TRITON_INTERPRET=1 runs the same code on the CPU (to try the script)
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")

GEMM_FLOORS = {"float32": 45.0, "float16": 50.0, "bfloat16": 35.0}
GEMV_FLOORS = {"float32": 90.0, "float16": 60.0, "bfloat16": 40.0}


def _sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _numerics_case(kind: str, case: dict[str, Any]) -> dict[str, Any]:
    """One grid case on the GPU (runs in a worker process: compiles are CPU-bound)."""
    import torch

    from lowbit_compiler.backends import codegen, kernel_cache
    from lowbit_compiler.formats import sqnr_db
    from tests.backends import test_codegen as grid

    if kind == "wo":
        spec = grid.make_spec(case["rows"], case["fmt"], case["prologue"], case["epilogue"], case["dtype"], on_gpu=True)
    else:
        spec = grid.make_qa_spec(case["rows"], case["scheme"], case["prologue"], case["epilogue"], case["dtype"],
                                 on_gpu=True)
    row = {"kind": kind, **{k: v for k, v in case.items()}, "kernel": spec.name, "variant": spec.variant,
           "dot": spec.dot}
    try:
        kernel = kernel_cache.get_kernel(spec, interpret=False)
        args = codegen.make_inputs(spec, case["rows"], case["n"], case["k"], seed=case["rows"] + case["n"] + case["k"],
                                   device=DEVICE)
        start = time.perf_counter()
        out = kernel.launch(*args)
        _sync()
        row["first_launch_s"] = time.perf_counter() - start
        ref = kernel.reference(*args)
        row["sqnr_db"] = sqnr_db(ref.float().cpu(), out.float().cpu())
        floors = GEMV_FLOORS if spec.variant == "gemv" else GEMM_FLOORS
        row["floor_db"] = floors[case["dtype"]]
        row["ok"] = bool(out.shape == (case["rows"], case["n"]) and row["sqnr_db"] >= row["floor_db"])
    except Exception as e:  # recorded, not fatal: the table shows which cases break
        row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
    return row


def numerics(quick: bool) -> dict[str, Any]:
    from tests.backends import test_codegen as grid

    cases = [("wo", c) for c in grid.PAIRWISE] + [("qa", c) for c in grid.QA_PAIRWISE]
    if quick:
        cases = cases[:6]
    rows = []
    ctx = __import__("multiprocessing").get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=min(12, os.cpu_count() or 1), mp_context=ctx) as pool:
        for row in pool.map(_numerics_case, [k for k, _ in cases], [c for _, c in cases]):
            rows.append(row)
    failed = [r for r in rows if not r["ok"]]
    print(f"numerics: {len(rows) - len(failed)}/{len(rows)} generated-kernel cases within their floor on the GPU")
    for r in failed:
        print("  FAIL", {k: r.get(k) for k in ("kernel", "rows", "n", "k", "dtype", "sqnr_db", "floor_db", "error")})
    by = {}
    for r in rows:
        if "sqnr_db" in r:
            key = f"{r['kind']}-{r['variant']}-{r['dot']}-{r['dtype']}"
            by[key] = min(by.get(key, 1e9), r["sqnr_db"])
    for key, db in sorted(by.items()):
        print(f"  worst SQNR {key}: {db:.1f} dB")
    return {"cases": rows, "failed": len(failed), "worst_by_variant": by}


def other_kernels() -> dict[str, Any]:
    import torch

    from lowbit_compiler import hadamard
    from lowbit_compiler.backends import grouped_kernel, hadamard_kernel
    from lowbit_compiler.formats import sqnr_db
    from tests.backends.test_grouped_kernel import _case

    out: dict[str, Any] = {"grouped": [], "hadamard": []}
    for fmt in ["int8", "int4_g128_asym", "int4_g32_sym", "int4_g64_asym"]:
        x, offs, qws, st, ref = _case(fmt)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            try:
                y = grouped_kernel.launch(x.to(dtype).to(DEVICE), offs.to(DEVICE), st.qweight.to(DEVICE), st.scale.to(DEVICE),
                                          None if st.zero is None else st.zero.to(DEVICE), fmt, 256)
                db = sqnr_db(ref, y.double().cpu())
                out["grouped"].append({"fmt": fmt, "dtype": str(dtype), "sqnr_db": db,
                                       "tail_zero": bool(torch.equal(y[-3:].float().cpu(), torch.zeros(3, 40)))})
            except Exception as e:
                out["grouped"].append({"fmt": fmt, "dtype": str(dtype), "error": f"{type(e).__name__}: {e}"[:1500]})
    for n in [96, 4096, 11008, 14336]:
        x = torch.randn(3, 2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
        ref = x @ hadamard.matrix(n)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            try:
                y = hadamard_kernel.launch(x.to(dtype).to(DEVICE))
                out["hadamard"].append({"n": n, "dtype": str(dtype), "sqnr_db": sqnr_db(ref, y.double().cpu())})
            except Exception as e:
                out["hadamard"].append({"n": n, "dtype": str(dtype), "error": f"{type(e).__name__}: {e}"[:1500]})
    for kind in ("grouped", "hadamard"):
        for r in out[kind]:
            print(f"  {kind}: " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    return out


def _tiny_llama(dtype):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
    return tf.LlamaForCausalLM(cfg).to(dtype).to(DEVICE).eval()


def models(quick: bool) -> dict[str, Any]:
    import torch

    import lowbit_compiler  # noqa: F401
    from lowbit_compiler.formats import sqnr_db

    recipes = ["w4a16", "w8a16", "w8a8", "fp8", "w4a8", "w4a4-rot", "w4a16-gptq", "nf4"]
    if quick:
        recipes = recipes[:2]
    results = []
    for dtype in (torch.float16, torch.bfloat16):
        model = _tiny_llama(dtype)
        ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1)).to(DEVICE)
        with torch.no_grad():
            ref = model(ids).logits.float()
        for recipe in recipes:
            row: dict[str, Any] = {"recipe": recipe, "dtype": str(dtype)}
            dump = tempfile.mkdtemp(prefix=f"gpu-{recipe}-")
            try:
                torch._dynamo.reset()
                opts = {"recipe": recipe, "dump_dir": dump}
                if recipe.endswith("gptq"):
                    opts["calibration"] = [ids]
                compiled = torch.compile(model, backend="lowbit", options=opts)
                start = time.perf_counter()
                with torch.no_grad():
                    out = compiled(ids).logits.float()
                _sync()
                row["compile_and_first_s"] = time.perf_counter() - start
                row["sqnr_db"] = sqnr_db(ref.cpu(), out.cpu())
                # the same decisions run eagerly by `compress` (reference implementations): isolates
                # the generated kernels' error from the quantization's
                twin = lowbit_compiler.compress(copy.deepcopy(model), recipe, calibration=opts.get("calibration"))
                with torch.no_grad():
                    row["sqnr_vs_compressed_eager_db"] = sqnr_db(twin(ids).logits.float().cpu(), out.cpu())
                del twin
                impls: dict[str, int] = {}
                for root, _, files in os.walk(dump):
                    if "summary.json" in files:
                        summary = json.load(open(os.path.join(root, "summary.json")))
                        for rec in summary.get("implementations") or []:
                            key = f"{rec['op']} -> {rec['implementation'].split(' (')[0]}"
                            impls[key] = impls.get(key, 0) + 1
                        row["target"] = summary.get("target")
                        row["fallbacks"] = summary.get("fallbacks")
                row["implementations"] = impls
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:3000]
                row["traceback"] = traceback.format_exc()[-3000:]
            print("  model:", {k: v for k, v in row.items() if k != "traceback"})
            results.append(row)
    return {"rows": results}


def decode_step(quick: bool) -> dict[str, Any]:
    """Two Llama-2-7B-shaped layers (hidden 4096, intermediate 11008), one token and 4 tokens without
    a cache (fixed shapes: no recompiles), eager fp16 against lowbit w4a16 / w8a16 / w8a8. The
    linear layers dominate such a step, as in decode."""
    import torch
    import transformers as tf
    from triton.testing import do_bench

    torch.manual_seed(0)
    hidden, inter = (4096, 11008) if not quick else (256, 512)
    cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=512)
    model = tf.LlamaForCausalLM(cfg).half().to(DEVICE).eval()
    out: dict[str, Any] = {}
    bench = do_bench if DEVICE == "cuda" else (lambda fn: (fn(), 0.0)[1])
    tokens = {m: torch.randint(0, 32000, (m, 1), device=DEVICE) for m in (1, 4)}

    def runner(m, ids):
        def run():
            with torch.no_grad():
                return m(ids, use_cache=False).logits
        return run

    for rows, ids in tokens.items():
        out[f"eager_fp16_M{rows}_ms"] = bench(runner(model, ids))
    for recipe in ("w4a16", "w8a16", "w8a8"):
        try:
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="lowbit", options={"recipe": recipe})
            for rows, ids in tokens.items():
                start = time.perf_counter()
                runner(compiled, ids)()
                _sync()
                out[f"{recipe}_M{rows}_compile_and_first_s"] = time.perf_counter() - start
                out[f"{recipe}_M{rows}_ms"] = bench(runner(compiled, ids))
        except Exception as e:
            out[f"{recipe}_error"] = f"{type(e).__name__}: {e}"[:3000]
            out[f"{recipe}_traceback"] = traceback.format_exc()[-3000:]
    print("  decode step:", {k: v for k, v in out.items() if "traceback" not in k})
    return out


def _warm(spec, rows: int, n: int, k: int) -> str | None:
    """Compile (and run once) one tiling in a worker: Triton's disk cache then serves the timing
    process."""
    import torch

    from lowbit_compiler.backends import codegen, kernel_cache

    try:
        kernel = kernel_cache.get_kernel(spec, interpret=False)
        kernel.launch(*codegen.make_inputs(spec, rows, n, k, device=DEVICE))
        torch.cuda.synchronize()
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}"[:300]


def sweep() -> dict[str, Any]:
    """Time a grid of tilings (BLOCK_N x num_warps) per decode/small-batch case, so the defaults in
    ``codegen.choose_variant`` come from measurements on a GPU."""
    import dataclasses

    from triton.testing import do_bench

    import kernels_gpu
    from lowbit_compiler.backends import codegen, kernel_cache

    jobs = []
    for fmt in ("int4_g128_asym", "int8"):
        for case in (kernels_gpu.LAYER[0], kernels_gpu.LAYER[2], kernels_gpu.LAYER[3]):
            for rows in (1, 4, 16):
                base = kernels_gpu.spec_for(case, fmt, rows)
                tilings = ([(bn, w) for bn in (8, 16, 32, 64) for w in (2, 4, 8)] if base.variant == "gemv"
                           else [(bn, 4) for bn in (16, 32, 64)])
                for bn, w in tilings:
                    jobs.append((fmt, case, rows, base, dataclasses.replace(base, block_n=bn, num_warps=w)))
    ctx = __import__("multiprocessing").get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=12, mp_context=ctx) as pool:
        errors = list(pool.map(_warm, [j[4] for j in jobs], [j[2] for j in jobs], [j[1].n for j in jobs],
                               [j[1].k for j in jobs]))
    rows_out = []
    for (fmt, case, rows, base, spec), error in zip(jobs, errors):
        row = {"format": fmt, "group": case.label, "M": rows, "variant": spec.variant, "block_m": spec.block_m,
               "block_n": spec.block_n, "num_warps": spec.num_warps, "default": spec == base}
        if error:
            row["error"] = error
        else:
            kernel = kernel_cache.get_kernel(spec, interpret=False)
            inputs = codegen.make_inputs(spec, rows, case.n, case.k, device=DEVICE)
            row["us"] = do_bench(lambda: kernel.launch(*inputs)) * 1e3
        rows_out.append(row)
    best: dict[str, Any] = {}
    for r in rows_out:
        key = f"{r['format']} {r['group']} M={r['M']}"
        if "us" in r and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
    for key, r in best.items():
        default = next((x for x in rows_out if x["default"] and f"{x['format']} {x['group']} M={x['M']}" == key), {})
        print(f"  {key}: best BLOCK_N={r['block_n']} warps={r['num_warps']} {r['us']:.1f} us; "
              f"default BLOCK_N={default.get('block_n')} warps={default.get('num_warps')} {default.get('us', float('nan')):.1f} us")
    return {"rows": rows_out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help="a few cases per section (to try the script)")
    parser.add_argument("--sections", nargs="+", default=["bench", "numerics", "kernels", "models", "decode", "sweep"])
    args = parser.parse_args(argv)
    import torch
    import triton

    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing checked")
        return 0
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_check.json")
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE, "torch": torch.__version__,
                              "triton": triton.__version__, "sections": {}}
    print(f"gpu_check: {report['device']}, torch {torch.__version__}, triton {triton.__version__}")
    sections = {
        "bench": lambda: __import__("kernels_gpu").main(
            ["--formats", "int4_g128_asym", "int4_g128_sym", "int8", "--rows", "1", "4", "16", "512",
             "--json", os.path.join(args.out, "kernels_gpu.json")] if not args.quick else
            ["--formats", "int8", "--rows", "1", "--json", os.path.join(args.out, "kernels_gpu.json")]),
        "numerics": lambda: numerics(args.quick),
        "sweep": sweep,
        "kernels": other_kernels,
        "models": lambda: models(args.quick),
        "decode": lambda: decode_step(args.quick),
    }
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    for name in args.sections:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        try:
            result = sections[name]()
            entry = {"result": result if isinstance(result, dict) else {"rc": result}}
        except Exception as e:
            traceback.print_exc()
            entry = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        entry["seconds"] = time.perf_counter() - start
        print(f"== {name}: {entry['seconds']:.1f} s", flush=True)
        report["sections"][name] = entry
        with open(path, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
