"""The ``lowbit`` command.

    lowbit inspect DUMP_DIR     per graph: passes (time, matches), layers (format, bits, bytes, SQNR),
                                kernels and fallbacks, read from the dumps' summary.json files
    lowbit inspect CHECKPOINT   the same per-layer table for a saved compressed model
    lowbit inspect PATH --json  the same as JSON, for scripts: {"source", "kind", "graphs": [summary]}
    lowbit report PATH [-o report.html]
                                one self-contained HTML page of a dump or checkpoint: pipeline
                                timeline, every stage's graph as a picture, layers, kernels, diffs
    lowbit export CHECKPOINT --format {compressed-tensors,gguf} OUT
                                a saved compressed model written for vLLM or llama.cpp
    lowbit recipes              the preset recipes and registered passes
    lowbit demo                 compile a tiny random Llama with each preset and print what happened
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from lowbit_compiler.rotation import ROTATION_PASSES


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *map(line, cells[1:])])


def _detail(key: str, value: Any) -> str:
    """One pass detail for the pass table: nested records (per-layer or per-group reports) are
    counted here and shown in full in summary.json."""
    if key == "calibration" and isinstance(value, dict):
        if "seconds" in value:
            return f"calibrated {value.get('blocks')} blocks x {value.get('batches')} batches in {value['seconds']:.1f} s"
        return "calibration reused (computed for an earlier graph)"
    if isinstance(value, dict) and all(isinstance(v, (int, float, str)) for v in value.values()) and len(value) <= 4:
        return f"{key}=" + " ".join(f"{k} x{v}" if isinstance(v, int) else f"{k}:{v}" for k, v in value.items())
    if isinstance(value, (dict, list)):
        return f"{key}: {len(value)}"
    return f"{key}={value}"


def format_run(run: dict[str, Any] | None, where: str) -> str:
    """The header of one run (run.json): which process wrote the graphs below it, and how."""
    if run is None:
        return f"### {where} (no run.json: a dump from before run folders)"
    options = run.get("options", {})
    shown = ", ".join(f"{k}={v!r}" for k, v in options.items() if k not in ("dump_dir",) and v not in (None, False))
    return (f"### {run.get('run', where)}: recipe {run.get('recipe')!r}, pid {run.get('pid')}, started "
            f"{run.get('started')}" + (f", {shown}" if shown else "")
            + (f"\n    command: {' '.join(run['argv'])}" if run.get("argv") else ""))


def format_summary(s: dict[str, Any]) -> str:
    if "incomplete" in s:
        return (f"== {s.get('graph', '?')}  NO summary.json: the compile of this graph did not finish (the process "
                f"ended while compiling it; stages written: {', '.join(f for f in s['incomplete'] if f.endswith('.py'))})")
    error = s.get("error")
    head = f"== {s.get('graph', '?')}  recipe={s['recipe']['name']}"
    if error:
        message = error["message"]
        out = [f"{head}  FAILED in {error.get('stage', '?')}: {error['type']}: {message}"]
        if s.get("passes_done"):
            out.append(f"passes that finished: {', '.join(s['passes_done'])}")
        out.append("(the traceback is in this graph's summary.json, 'error')")
        return "\n".join(out)
    out = [f"{head}  target={s.get('target', '?')}  "
           f"inputs={s.get('inputs', '?')}  frozen parameters={s.get('frozen_parameters', '?')}"]
    out += [f"note: {note}" for note in s.get("notes", [])]
    passes = [[p["name"], f"{p['seconds'] * 1e3:.1f}", p["matches"], "yes" if p["modified"] else "no",
               "see 'rotations' below" if p["name"] in ROTATION_PASSES else
               "see 'affine transforms' below" if p["name"] == "flatquant" and p["details"].get("groups") else
               ", ".join(_detail(k, v) for k, v in p["details"].items() if v not in (0, None, "", {}, []))]
              for p in s.get("passes", [])]
    out.append(_table(passes, ["pass", "ms", "matches", "changed", "details"]) if passes else "(no passes)")
    for p in s.get("passes", []):
        if p["name"] in ROTATION_PASSES:
            out.append(format_rotation(p["details"]))
        if p["name"] == "flatquant" and p["details"].get("groups"):
            out.append(format_affine(p["details"]))
        if p["name"] == "mark_kv_cache":
            out.append(format_kv_cache(p["details"]))
    layers = s.get("layers", {})
    if layers:
        rows, before, after = [], 0, 0
        for fqn, d in layers.items():
            if "skipped" in d:
                rows.append([fqn, d.get("format", "float"), "", "", "", "", d["skipped"]])
                continue
            if "in_features" not in d:  # a float layer a pass only annotated (activation sparsity, R-Sparse)
                notes = ([f"activation sparsity {d['activation_sparsity']:.1%}"] if "activation_sparsity" in d else []) \
                    + ([f"low-rank r={d['lowrank']['rank']} ({d['lowrank']['bytes']} B {d['lowrank']['dtype']})"]
                       if "lowrank" in d else [])
                rows.append([fqn, d.get("format", "float"), "", "", "", "", "; ".join(notes)])
                continue
            if "bytes_before" in d:
                before, after = before + d["bytes_before"], after + d["bytes_after"]
            shape = (f"{d['experts']}x" if d.get("experts") else "") + f"{d['in_features']}x{d['out_features']}"
            rows.append([fqn, d["format"], shape, f"{d['bits_per_weight']:.3f}",
                         d.get("bytes_before", "-"), d["bytes_after"],
                         f"{d['weight_sqnr_db']:.1f}" if "weight_sqnr_db" in d else d.get("source", "-")])
        out.append(_table(rows, ["layer", "format", "KxN", "bits/w", "bytes before", "bytes after", "weight SQNR dB"]))
        if after:
            out.append(f"quantized layers: {before} -> {after} bytes ({before / after:.2f}x smaller)")
    else:
        out.append("(no layers quantized)")
    totals = s.get("coverage", {}).get("totals")
    if totals and totals.get("bytes_after"):
        parts = [f"{label} {totals[key]['bytes_before']} -> {totals[key]['bytes_after']} ({totals[key]['tensors']} tensors)"
                 for key, label in (("quantized", "quantized"), ("float_matmul", "float matmul weights"),
                                    ("embeddings", "embeddings"), ("norms", "norms"), ("other", "other"),
                                    ("lowrank", "R-Sparse low-rank factors (added)"))
                 if key in totals]
        out.append(f"whole graph: {totals['bytes_before']} -> {totals['bytes_after']} bytes "
                   f"({totals['bytes_before'] / totals['bytes_after']:.2f}x smaller): " + "; ".join(parts))
    fusion_labels = {"rms_norm_rewritten": "written-out RMSNorms rewritten to rms_norm (folded into the calls)",
                     "decode_attention": "decode attention steps (RoPE, cache cats, SDPA) as generated calls"}
    fused = "".join(f"   {fusion_labels.get(what, what + ' expressions as generated calls')}: {n}"
                    for what, n in s.get("cpu_fusions", {}).items())
    out.append(f"kernels: {s.get('kernel_counts', {})}{fused}   fallbacks: {s.get('fallbacks', {}) or 'none'}")
    if s.get("implementations"):
        out.append(format_implementations(s["implementations"]))
    if s.get("generated_kernels"):
        out.append(format_generated(s["generated_kernels"], s.get("codegen", {})))
    return "\n".join(out)


def format_kv_cache(d: dict[str, Any]) -> str:
    """mark_kv_cache's per-layer decisions: the attention, its heads, where its keys and values
    come from, and the KV format with its bytes per token against bf16."""
    rows = []
    for attention, a in d.get("attentions", {}).items():
        nodes = a.get("nodes", {})
        rope = (f"{nodes.get('keys_pre_rope')} -> {nodes.get('keys_post_rope')}"
                if a["keys_quantized"] in ("post_rope", "pre_rope") else "none")
        rows.append([attention, a["layer_index"], a["consumer"], f"{a['kind']} {a['heads']}/{a['kv_heads']}x{a['head_dim']}",
                     f"{nodes.get('k_proj')}/{nodes.get('v_proj')}", rope, nodes.get("key_cache_update", "-"),
                     a["format"], a["keys_quantized"].replace("_", "-"),
                     f"{a['bytes_per_token']:.0f}/{a['bf16_bytes_per_token']}"])
    out = [f"KV cache ({d.get('format')}; stored by compress(): lowbit_compiler.kv.CompressedKVCache)"]
    if rows:
        out.append(_table(rows, ["attention", "layer", "consumer", "heads q/kv x dim", "k/v producers",
                                 "RoPE (pre -> post)", "cache update", "format", "keys quantized",
                                 "bytes/token vs bf16"]))
    out += [f"  left float: {a}: {why}" for a, why in d.get("refused", {}).items()]
    return "\n".join(out)


def format_implementations(records: list[dict[str, Any]]) -> str:
    """What runs each lowbit:: op of the graph, one row per (op, implementation)."""
    rows: dict[tuple[str, str], list[str]] = {}
    for r in records:
        rows.setdefault((r["op"], r["implementation"]), []).append(r.get("layer") or r["node"])
    table = [[op, impl, len(where), where[0] + (f" (+{len(where) - 1})" if len(where) > 1 else "")]
             for (op, impl), where in rows.items()]
    return _table(table, ["lowbit op", "implementation", "calls", "layers"])


def format_rotation(d: dict[str, Any]) -> str:
    """What the rotate pass found in the graph, what it rotated, and what it refused and why."""
    stream, rotated = d.get("stream", {}), d.get("rotated") or {}
    lines = ["rotations:",
             f"  residual stream: hidden {stream.get('hidden')}, embeddings {stream.get('embeddings')}, "
             f"{stream.get('norms', 0)} norms, {len(stream.get('readers', []))} reading linears, "
             f"{len(stream.get('writers', []))} writing linears"]
    requested = d.get("requested", {})
    refused_steps = {r["what"].split(":")[0].split(" ")[0] for r in d.get("refused", [])}

    def absent(step: str) -> str:
        if requested.get(step) is False:
            return "not requested by the recipe"
        return "refused (below)" if step in refused_steps else "not applied"

    r1 = rotated.get("R1")
    lines.append(f"  R1: {r1['linears']} linears + {r1['embeddings']} embeddings rotated, {r1['norms_folded']} norms "
                 f"folded ({r1['layer_norms_to_rms']} LayerNorm -> RMSNorm)" if r1 else f"  R1: {absent('R1')}")
    r2 = rotated.get("R2")
    lines.append(f"  R2: {r2['attentions']} attentions, head_dim {r2['head_dim']}" if r2 else f"  R2: {absent('R2')}")
    lines.append(f"  R4 (online Hadamard): {', '.join(rotated.get('R4', [])) or absent('R4')}")
    r3 = rotated.get("R3", 0)
    lines.append(f"  R3 (online Hadamard on q, k): {r3} attentions" if r3 else f"  R3 (online Hadamard on q, k): "
                 f"{absent('R3')}")
    learned = d.get("learned")
    if learned:
        db = learned["output_sqnr_db"]
        what = " and ".join(r for r in ("R1", "R2") if learned[r])
        lines.append(f"  learned (spinquant): {what} by Cayley SGD, {learned['steps']} steps on {learned['inputs']} "
                     f"calibration input(s), {learned['quantized_linears']} quantized linears; output SQNR "
                     f"{db[0]:.2f} dB at the start -> {learned['best_sqnr_db']:.2f} dB (kept)")
    for layer, u in rotated.get("untied", {}).items():
        lines.append(f"  untied {layer} from the embedding: +{u['extra_bytes']} bytes")
    lines += _refusals(d.get("refused"))
    return "\n".join(lines)


def _refusals(refused: list[dict[str, str]] | None) -> list[str]:
    return [f"  refused {r['what']}: {r['reason']}" for r in refused or []]


def format_affine(d: dict[str, Any]) -> str:
    """FlatQuant: one learned transform per group of linears sharing an input."""
    rows = [[g["linears"][0] + (f" (+{len(g['linears']) - 1})" if len(g["linears"]) > 1 else ""),
             "x".join(map(str, g["kron"])), f"{g['output_sqnr_db'][0]:.2f}", f"{g['output_sqnr_db'][1]:.2f}",
             "identity kept" if g.get("kept_identity") else "applied"] for g in d["groups"]]
    lines = [f"affine transforms (flatquant, learned on {d.get('inputs', '?')} calibration input(s)):",
             _table(rows, ["group", "P1 x P2", "quantized SQNR dB before", "after", ""])]
    lines += _refusals(d.get("refused"))
    return "\n".join(lines)


# The GPU the decode-time model assumes: memory-bound kernels streaming at HBM bandwidth.
MODEL_GPU, MODEL_BANDWIDTH = "H100 SXM (HBM3)", 3.35e12


def format_generated(records: list[dict[str, Any]], totals: dict[str, Any]) -> str:
    rows = []
    for r in records:
        b, gpu = r.get("bytes_per_call") or {}, r.get("gpu") or {}
        ops = [o for o in r["fused_ops"] if o != "wo_linear"]
        rows.append([r["call"], r["layer"] + (f" (+{len(r['layers']) - 1})" if len(r["layers"]) > 1 else ""),
                     r["variant"], " ".join(ops[:4]) + (" ..." if len(ops) > 4 else "") or "-",
                     "x".join(r["grid"]), b.get("read", r["bytes"]["read"]), b.get("written", r["bytes"]["written"]),
                     f"{b['min_read'] / b['read']:.2f}" if b else "-",
                     f"{gpu['registers']}/{gpu['spill_bytes']}" if gpu else "-"])
    out = [_table(rows, ["generated call", "layer", "shape", "fused", "grid", "bytes read", "written",
                         "min/read", "sm_90 regs/spill B"])]
    if totals:
        tokens, per_call = totals["tokens_per_call"], totals.get("bytes_per_call")
        launches = totals["launches_per_call"]
        line = f"per call: {launches} kernel launches for {tokens} token(s)"
        if isinstance(tokens, int) and per_call:
            moved = per_call["read"] + per_call["written"]
            line += (f" = {launches / tokens:.2f} kernels/token; {moved} bytes/call = {moved / tokens:.0f} bytes/token; "
                     f"modelled time {moved / MODEL_BANDWIDTH * 1e6:.2f} us/call on {MODEL_GPU}"
                     f" (assumes memory-bound kernels at {MODEL_BANDWIDTH / 1e12:.2f} TB/s, no launch latency, "
                     "generated kernels only: attention and ops left to eager/Inductor not counted)")
        out.append(line)
        blocks = [[name, b["kernels"], b["ops_replaced"]] for name, b in totals["blocks"].items()]
        out.append(_table(blocks, ["block", "kernels", "ops replaced"]))
    return "\n".join(out)


def cmd_inspect(args: argparse.Namespace) -> int:
    from lowbit_compiler.dump import load_summaries

    from lowbit_compiler import checkpoint

    if checkpoint.is_checkpoint(args.dump_dir):  # a saved compressed model: its per-layer table
        summary = checkpoint.inspect_summary(args.dump_dir)
        if args.json:
            print(json.dumps({"source": args.dump_dir, "kind": "checkpoint", "graphs": [summary]}, indent=1, default=str))
        else:
            print(format_summary(summary))
        return 0
    summaries = load_summaries(args.dump_dir)
    if not summaries:
        print(f"lowbit inspect: no summary.json under {args.dump_dir}", file=sys.stderr)
        return 1
    if args.json:  # the summaries as they are on disk, with "graph" and "run" (see dump.load_summaries)
        print(json.dumps({"source": args.dump_dir, "kind": "dump", "graphs": summaries}, indent=1, default=str))
        return 0
    blocks, current = [], object()
    for s in summaries:
        run = s.get("run")
        where = s["graph"].rsplit("/", 1)[0] if "/" in s["graph"] else args.dump_dir
        key = (run or {}).get("run", where)
        if key != current:
            blocks.append(format_run(run, where))
            current = key
        blocks.append(format_summary(s))
    print("\n\n".join(blocks))
    failed = sum(1 for s in summaries if s.get("error") or "incomplete" in s)
    if failed:
        print(f"\n{failed} of {len(summaries)} graph(s) did not compile (see above)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from lowbit_compiler.report import write_report

    try:
        out, counts = write_report(args.path, args.output)
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 1
    print(f"wrote {out} ({os.path.getsize(out)} bytes): {counts['graphs']} graph(s), {counts['layer_rows']} layer rows, "
          f"{counts['kernel_rows']} generated kernel rows, {counts['stage_svgs']} stage graphs")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A saved lowbit checkpoint written in a serving engine's format."""
    from lowbit_compiler.hf import load_pretrained

    model = load_pretrained(args.checkpoint)
    if args.format == "compressed-tensors":
        from lowbit_compiler.export.compressed_tensors import export_compressed_tensors

        report = export_compressed_tensors(model, args.out)
        groups = "; ".join(f"{g['layers']} layers {g['format']} ({g['weights']['num_bits']}-bit "
                           f"{g['weights']['type']} {g['weights']['strategy']}"
                           + (f", {g['input_activations']['type']}{g['input_activations']['num_bits']} per token"
                              if g["input_activations"] else "") + ")" for g in report["groups"].values())
        print(f"wrote {args.out}: compressed-tensors {report['format']}: {groups}; float linears (ignore): "
              f"{report['ignore'] or 'none'}; model.safetensors {report['bytes']} bytes")
    else:
        from lowbit_compiler.export.gguf import export_gguf

        report = export_gguf(model, args.out, weight_type=args.weight_type, strict=args.strict,
                             float_type=args.float_type, vocab=args.vocab)
        print(json.dumps(report, indent=1, default=str))
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from lowbit_compiler import PRESETS, registered_passes

    rows = [[name, " -> ".join(r.passes) or "(none)", r.weight.key if r.weight else "-"] for name, r in PRESETS.items()]
    print(_table(rows, ["preset", "passes", "weight format"]))
    print("\nregistered passes:", ", ".join(registered_passes()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lowbit_compiler.demo import main as demo_main

    return demo_main(args.dump_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lowbit", description="lowbit-compiler command line")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print what a dump directory says happened")
    p.add_argument("dump_dir")
    p.add_argument("--json", action="store_true", help="print the summaries as JSON (for scripts) instead of tables")
    p.set_defaults(fn=cmd_inspect)
    p = sub.add_parser("report", help="write one self-contained HTML page of a dump directory or checkpoint")
    p.add_argument("path", help="a dump directory, a run or graph folder in it, or a saved checkpoint")
    p.add_argument("-o", "--output", default=None, help="the HTML file to write (default report.html)")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("export", help="write a saved lowbit checkpoint for vLLM (compressed-tensors) or llama.cpp (GGUF)")
    p.add_argument("checkpoint", help="a directory written by save_pretrained of a compressed model")
    p.add_argument("--format", required=True, choices=("compressed-tensors", "gguf"))
    p.add_argument("out", help="output directory (compressed-tensors) or .gguf file")
    p.add_argument("--weight-type", default="auto", help="gguf: auto (our codes written exactly where a GGUF type "
                   "holds them), q8_0, q4_0, q6_k, ... (re-quantized where not exact, reported)")
    p.add_argument("--float-type", default="f32", choices=("f32", "f16"), help="gguf: embeddings and float linears")
    p.add_argument("--vocab", default=None, choices=("bytes",), help="gguf: write the byte-level vocabulary "
                   "(models with 256 byte tokens); without it the file has no tokenizer (llama.cpp needs one)")
    p.add_argument("--strict", action="store_true", help="refuse instead of re-quantizing or dropping activations")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("recipes", help="list presets and registered passes")
    p.set_defaults(fn=cmd_recipes)
    p = sub.add_parser("demo", help="compile a tiny random Llama with each preset")
    p.add_argument("--dump-dir", default="dumps/demo")
    p.set_defaults(fn=cmd_demo)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
