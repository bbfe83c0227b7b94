"""Activation sparsity: the threshold op, the fused activation-sparse GEMV against the float
reference, TEAL/WINA/CATS sites found on a tiny Llama, achieved sparsity on the calibration data
within 1 % of the target, both flows, and save/reload."""
from __future__ import annotations

import pytest
import torch

from lowbit_compiler import compress, load, save
from lowbit_compiler.backends import cpu_sparse
from lowbit_compiler.formats import WeightFormat, quantize
from lowbit_compiler.ops import act_sparsify, sparse_input_linear, sparse_input_linear_reference
from lowbit_compiler.passes.act_sparsity.activation import threshold_for
from tests.conftest import make_model
from tests.helpers import Recorder, count

CALIBRATION = [torch.randint(3, 256, (1, 48), generator=torch.Generator().manual_seed(i)) for i in range(4)]


def test_act_sparsify_zeroes_exactly_the_entries_below_the_threshold():
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    thr = torch.tensor([0.7])
    y = act_sparsify(x, thr)
    keep = x.abs() >= 0.7
    assert torch.equal(y[keep], x[keep]) and bool((y[~keep] == 0).all()) and 0 < int((~keep).sum()) < x.numel()
    col = torch.rand(64, dtype=torch.float64) * 2  # WINA: |x_i| * ||W[:, i]||
    y = act_sparsify(x, thr, col)
    keep = x.abs() * col >= 0.7
    assert torch.equal(y[keep], x[keep]) and bool((y[~keep] == 0).all())


def test_threshold_for_reaches_the_target_fraction():
    scores = torch.rand(10000, generator=torch.Generator().manual_seed(0))
    for target in (0.25, 0.4, 0.5):
        thr, achieved = threshold_for(scores, target)
        assert abs(achieved - target) < 1e-3 and abs(float((scores < thr).float().mean()) - achieved) < 1e-9


@pytest.mark.parametrize("fmt", ["int8", "int4_g128_asym", "int4_g64_sym"])
@pytest.mark.parametrize("rows", [1, 3])
def test_sparse_input_linear_matches_the_float_reference(fmt, rows):
    n, k = 1040, 384  # N spans a partial column tile (TW = 128: N is padded to 1152 in the K-major copy)
    gen = torch.Generator().manual_seed(1)
    qw = quantize(torch.randn(n, k, generator=gen), WeightFormat.parse(fmt))
    x = torch.randn(rows, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    thr = torch.tensor([0.67])  # ~50 % of standard-normal inputs zeroed
    if rows == 1:  # the activation-sparse kernel is what runs, not the dense fallback
        assert cpu_sparse.unsupported_reason(x, qw.scale, fmt, k) is None
    y = sparse_input_linear(x, thr, None, qw.qweight, qw.scale, qw.zero, bias, fmt, k)
    ref = sparse_input_linear_reference(x.double(), thr, None, qw.qweight, qw.scale, qw.zero, bias.double(), fmt, k)
    tol = 1e-4 if rows == 1 else 3e-2  # more rows: torch's packed kernels compute in bf16
    assert (y.double() - ref).abs().max() <= tol * ref.abs().max(), fmt


@pytest.mark.parametrize("fmt", ["int8", "int4_g128_asym"])
@pytest.mark.parametrize("rows", [1, 3])
def test_sparse_input_qa_linear_matches_float64_and_reads_only_kept_rows(fmt, rows):
    """W8A8 / W4A8 + a threshold, fused: one row runs the activation-sparse kernel on the activation
    codes (counted), more rows the integer matmul on the thresholded input; both against the float64
    reference (threshold, per-token int8 codes, dequantised weight)."""
    from lowbit_compiler.ops import sparse_input_qa_linear, sparse_input_qa_linear_reference

    n, k = 520, 384
    gen = torch.Generator().manual_seed(7)
    qw = quantize(torch.randn(n, k, generator=gen), WeightFormat.parse(fmt))
    x, bias, thr = torch.randn(rows, k, generator=gen), torch.randn(n, generator=gen), torch.tensor([0.67])
    before = cpu_sparse.dispatch_counter[(fmt, "sparse")]
    y = sparse_input_qa_linear(x, thr, None, qw.qweight, qw.scale, qw.zero, bias, fmt, k, "int8")
    ref = sparse_input_qa_linear_reference(x.double(), thr, None, qw.qweight, qw.scale, qw.zero, bias.double(), fmt,
                                           k, "int8")
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max(), (fmt, rows)
    assert cpu_sparse.dispatch_counter[(fmt, "sparse")] - before == (1 if rows == 1 else 0)


def test_teal_w8a8_fuses_the_threshold_into_qa_linear_and_reloads(tmp_path):
    recipe = "teal-50+w8a8"
    model = compress(make_model("llama"), recipe, calibration=CALIBRATION, progress=False)
    details = _pass_details(model, "fuse_sparse_input")
    assert details["fused"] == details["fused_qa"] == 14 and details["unfused_readers"] == []
    teal = _pass_details(model, "teal")
    assert abs(teal["mean_achieved"] - 0.5) <= 0.01
    q = model.model.layers[0].self_attn.q_proj
    assert q.act == "int8" and q.input_threshold is not None
    rec = Recorder(recipe=recipe, calibration=CALIBRATION, progress=False)
    compiled = torch.compile(make_model("llama"), backend=rec)
    with torch.no_grad():
        y_compiled = compiled(CALIBRATION[0]).logits
        y_offline = model(CALIBRATION[0]).logits
        before = cpu_sparse.dispatch_counter[("int8", "sparse")]
        model(CALIBRATION[0][:, :1])  # one row: every fused layer runs the sparse kernel on int8 codes
        assert cpu_sparse.dispatch_counter[("int8", "sparse")] - before == 14
    gm = rec.graphs[0]
    assert count(gm, "sparse_input_qa_linear.default") == 14 and count(gm, "act_sparsify.default") == 0
    assert torch.allclose(y_compiled, y_offline, rtol=0, atol=5e-2 * y_offline.abs().max())
    save(model, tmp_path)
    reloaded = load(tmp_path, make_model("llama", seed=3))
    with torch.no_grad():
        assert torch.equal(reloaded(CALIBRATION[1]).logits, model(CALIBRATION[1]).logits)


def test_triton_target_splits_the_fused_w8a8_op_back():
    """Under target='triton' the W8A8 matmul is a fusion-group anchor with its own kernel: the fused
    op is split back into act_sparsify + qa_linear (what lowering does first), same numbers."""
    import torch.fx as fx

    from lowbit_compiler.passes.act_sparsity.activation import unfuse_for_triton

    n, k = 64, 128
    qw = quantize(torch.randn(n, k), WeightFormat.parse("int8"))
    root = torch.nn.Module()
    root.register_buffer("thr", torch.tensor([0.67]))
    root.register_buffer("qweight", qw.qweight)
    root.register_buffer("scale", qw.scale)
    g = fx.Graph()
    x = g.placeholder("x")
    node = g.call_function(torch.ops.lowbit.sparse_input_qa_linear.default,
                           (x, g.get_attr("thr"), None, g.get_attr("qweight"), g.get_attr("scale"), None, None, "int8",
                            k, "int8", None))
    g.output(node)
    gm = fx.GraphModule(root, g)
    xs = torch.randn(2, 1, k)
    y_fused = gm(xs)
    assert unfuse_for_triton(gm) == {"qa": 1, "prefill": 0}
    gm.recompile()
    assert count(gm, "sparse_input_qa_linear.default") == 0
    assert count(gm, "qa_linear.default") == 1 and count(gm, "act_sparsify.default") == 1
    assert torch.equal(gm(xs), y_fused)


def test_triton_target_runs_prefill_shaped_sparse_input_as_threshold_plus_dense_kernel():
    """A fused sparse_input_linear over several rows (prefill) is split for the Triton target into
    act_sparsify + wo_linear (which the generated dense kernels take); a one-row call stays fused
    (the sparse GEMV). Same numbers either way."""
    import torch.fx as fx

    from lowbit_compiler.passes.act_sparsity.activation import unfuse_for_triton

    n, k, fmt = 64, 128, "int4_g64_asym"
    qw = quantize(torch.randn(n, k), WeightFormat.parse(fmt))
    root = torch.nn.Module()
    for name, t in (("thr", torch.tensor([0.67])), ("qweight", qw.qweight), ("scale", qw.scale), ("zero", qw.zero)):
        root.register_buffer(name, t)
    g = fx.Graph()
    outs = []
    for rows in (5, 1):
        x = g.placeholder(f"x{rows}")
        x.meta["val"] = torch.empty(1, rows, k)
        outs.append(g.call_function(torch.ops.lowbit.sparse_input_linear.default,
                                    (x, g.get_attr("thr"), None, g.get_attr("qweight"), g.get_attr("scale"),
                                     g.get_attr("zero"), None, fmt, k)))
    g.output(tuple(outs))
    gm = fx.GraphModule(root, g)
    xs = (torch.randn(1, 5, k), torch.randn(1, 1, k))
    before = gm(*xs)
    assert unfuse_for_triton(gm) == {"qa": 0, "prefill": 1}
    gm.recompile()
    assert count(gm, "wo_linear.default") == 1 and count(gm, "sparse_input_linear.default") == 1
    after = gm(*xs)
    assert torch.allclose(after[0], before[0], rtol=0, atol=1e-5 * before[0].abs().max())
    assert torch.equal(after[1], before[1])


def test_kernel_skips_all_zero_groups_and_reads_only_kept_rows():
    # a whole int4 group of zero inputs, and a weight whose rows for zeroed inputs are garbage in the
    # K-major copy: the result must not change (those rows are never read)
    fmt, n, k = "int4_g64_asym", 256, 256
    qw = quantize(torch.randn(n, k), WeightFormat.parse(fmt))
    x = torch.randn(1, k) + 3.0
    x[0, 64:128] = 0.01  # below the threshold: one whole group zeroed
    x[0, 200] = -0.02
    thr = torch.tensor([0.5])
    ref = sparse_input_linear_reference(x.double(), thr, None, qw.qweight, qw.scale, qw.zero, None, fmt, k)
    w = cpu_sparse.kmajor_cpu(qw.qweight, qw.scale, qw.zero, fmt, k)
    w.codes[64:128] = 255
    w.codes[200] = 255
    y = sparse_input_linear(x, thr, None, qw.qweight, qw.scale, qw.zero, None, fmt, k)
    assert (y.double() - ref).abs().max() <= 1e-4 * ref.abs().max()


def _zero_fraction(model, prefixes):
    """Fraction of exact zeros in the inputs of the linears named by ``prefixes`` over the
    calibration batches, measured by hooks on the compressed model (not by the pass)."""
    seen = {}

    def hook(name):
        def record(module, args):
            x = args[0]
            z, t = seen.get(name, (0, 0))
            seen[name] = (z + int((x == 0).sum()), t + x.numel())
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if any(n.endswith(p) for p in prefixes)]
    with torch.no_grad():
        for ids in CALIBRATION:
            model(ids)
    for h in handles:
        h.remove()
    return {n: z / t for n, (z, t) in seen.items()}


@pytest.mark.parametrize("recipe,sites", [("teal-50", 8), pytest.param("wina-50", 8, marks=pytest.mark.slow)])
def test_teal_and_wina_sites_and_achieved_sparsity_on_calibration_data(recipe, sites):
    model = compress(make_model("llama"), recipe, calibration=CALIBRATION, progress=False)
    summary = _pass_details(model, recipe.split("-")[0])
    assert len(summary["sites"]) == sites  # q/k/v (one input), o, gate/up (one input), down, per layer
    assert "lm_head" in summary["skipped"]
    for site, entry in summary["sites"].items():
        assert abs(entry["achieved"] - 0.5) <= 0.01, site
    if recipe == "teal-50":  # WINA's score differs from the zero fraction only through the column norms
        for name, frac in _zero_fraction(model, ("q_proj", "o_proj", "gate_proj", "down_proj")).items():
            assert abs(frac - 0.5) <= 0.01, name


def _pass_details(model, name):
    found = [p["details"] for p in model.lowbit_summary["passes"] if p["name"] == name]
    assert len(found) == 1, [p["name"] for p in model.lowbit_summary["passes"]]
    return found[0]


def test_cats_thresholds_the_gate_activation_only():
    model = compress(make_model("llama"), "cats-50", calibration=CALIBRATION, progress=False)
    summary = _pass_details(model, "cats")
    assert sorted(summary["sites"]) == ["model.layers.0.mlp.act_fn", "model.layers.1.mlp.act_fn"]
    assert model.lowbit_summary["output_hooks"] == 2
    for entry in summary["sites"].values():
        assert abs(entry["achieved"] - 0.5) <= 0.01
    zeros = {}
    act = model.model.layers[1].mlp.act_fn
    handle = act.register_forward_hook(lambda m, a, out: zeros.setdefault("f", float((out == 0).float().mean())))
    with torch.no_grad():
        model(CALIBRATION[0])
    handle.remove()
    assert abs(zeros["f"] - 0.5) <= 0.05  # one batch of the four


def test_teal_w4a16_both_flows_agree_fuse_and_reload(tmp_path):
    recipe = "teal-50+w4a16"
    model = compress(make_model("llama"), recipe, calibration=CALIBRATION, progress=False)
    assert _pass_details(model, "fuse_sparse_input")["fused"] == 14  # every block linear (q,k,v,o,gate,up,down x 2)
    teal = _pass_details(model, "teal")["sites"]
    layers = model.lowbit_summary["layers"]
    down = "model.layers.1.mlp.down_proj"
    assert layers[down]["activation_sparsity"] == teal[down]["achieved"]
    assert layers["model.layers.0.self_attn.k_proj"]["format"] == "int4_g128_asym"
    rec = Recorder(recipe=recipe, calibration=CALIBRATION, progress=False)
    compiled = torch.compile(make_model("llama"), backend=rec)
    with torch.no_grad():
        y_compiled = compiled(CALIBRATION[0]).logits
        y_offline = model(CALIBRATION[0]).logits
    gm = rec.graphs[0]
    assert count(gm, "sparse_input_linear.default") == 14 and count(gm, "act_sparsify.default") == 0
    offline = {n: b for n, b in model.named_buffers(remove_duplicate=False) if n.endswith("input_threshold")}
    graph = {n: b for n, b in gm.named_buffers() if n.endswith("act_threshold")}
    assert len(offline) == 14 and len(graph) == 8  # q/k/v share one threshold, gate/up one
    assert sorted(float(t) for t in graph.values()) == sorted({float(t) for t in offline.values()})
    assert torch.allclose(y_compiled, y_offline, rtol=0, atol=5e-2 * y_offline.abs().max())
    save(model, tmp_path)
    reloaded = load(tmp_path, make_model("llama", seed=3))
    with torch.no_grad():
        assert torch.equal(reloaded(CALIBRATION[1]).logits, model(CALIBRATION[1]).logits)


def test_recipes_place_and_bound_the_sparsity_passes():
    from lowbit_compiler import LowbitError, Recipe
    from lowbit_compiler.recipe import PRESETS

    with pytest.raises(LowbitError, match="pass 'teal' must run before 'insert_weight_quant'"):
        Recipe("late", ("canonicalize", "insert_weight_quant", "teal"), WeightFormat(8))
    with pytest.raises(LowbitError, match="fuse_sparse_input' requires"):
        Recipe("unquantized", ("canonicalize", "teal", "fuse_sparse_input"))
    with pytest.raises(LowbitError, match=r"sparsity=1.5; give the fraction"):
        PRESETS["teal-50"].replace(name="bad", options={"teal": {"sparsity": 1.5}})
    assert PRESETS["wina-50+w4a16"].passes[-1] == "fuse_sparse_input"


@pytest.mark.parametrize("recipe", ["teal-50+w8a16", pytest.param("cats-50", marks=pytest.mark.slow)])
def test_exporters_refuse_thresholds_they_cannot_express(tmp_path, recipe):
    from lowbit_compiler import LowbitError
    from lowbit_compiler.export.compressed_tensors import export_compressed_tensors
    from lowbit_compiler.export.gguf import export_gguf

    model = compress(make_model("llama"), recipe, calibration=CALIBRATION[:1], progress=False)
    what = "activation" if recipe.startswith("teal") else "CATS"
    with pytest.raises(LowbitError, match=what):
        export_compressed_tensors(model, tmp_path / "ct")
    with pytest.raises(LowbitError, match=what):
        export_gguf(model, tmp_path / "m.gguf")


def _logits(recipe, x):
    rec = Recorder(recipe=recipe, calibration=CALIBRATION, progress=False)
    compiled = torch.compile(make_model("llama"), backend=rec)
    with torch.no_grad():
        return compiled(x).logits.double(), rec


def test_lowrank_residual_matches_float64_and_rank_is_checked():
    from lowbit_compiler import LowbitError
    from lowbit_compiler.ops import lowrank_residual, lowrank_residual_reference
    from lowbit_compiler.recipe import PRESETS

    gen = torch.Generator().manual_seed(5)
    x, kept = torch.randn(2, 3, 48, generator=gen), torch.randn(2, 3, 48, generator=gen)
    left, right = torch.randn(40, 8, generator=gen), torch.randn(8, 48, generator=gen)
    ref = lowrank_residual_reference(x.double(), kept.double(), left.double(), right.double())
    assert (lowrank_residual(x, kept, left, right).double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    with pytest.raises(LowbitError, match="rank=0"):
        PRESETS["rsparse-50"].replace(name="bad", options={"rsparse": {"rank": 0}})


@pytest.mark.slow
def test_rsparse_low_rank_part_recovers_what_the_threshold_dropped():
    """R-Sparse: 50 % of each block linear's inputs zeroed (within 1 %), a low-rank part over the
    rest for all 14 readers. At full rank the model is the float model again (W sparse(x) +
    W (x - sparse(x)) = W x); at rank 32 the logits are closer to the float model than TEAL's at
    the same thresholds' target."""
    from lowbit_compiler.recipe import PRESETS

    sample = CALIBRATION[1]
    with torch.no_grad():
        ref = make_model("llama")(sample).logits.double()
    err = lambda y: float((y - ref).norm() / ref.norm())  # noqa: E731
    y_teal, _ = _logits("teal-50", sample)
    y_rs, rec = _logits("rsparse-50", sample)
    full = PRESETS["rsparse-50"].replace(name="rsparse-full", options={"rsparse": {"rank": 4096}})
    y_full, _ = _logits(full, sample)
    gm = rec.graphs[0]
    assert count(gm, "lowrank_residual.default") == 14 and count(gm, "act_sparsify.default") == 8
    details = _pass_details_of(rec.summaries[0], "rsparse")
    assert abs(details["mean_achieved"] - 0.5) <= 0.01
    assert all(abs(s["achieved"] - 0.5) <= 0.01 and s["rank"] == 32 and all(0 < e < 1 for e in s["lowrank_rel_error"])
               for s in details["sites"].values())
    assert err(y_full) < 1e-5 < err(y_rs) < 0.8 * err(y_teal), (err(y_full), err(y_rs), err(y_teal))


@pytest.mark.slow
def test_rsparse_is_refused_by_compress_with_the_way_out():
    from lowbit_compiler import LowbitError

    with pytest.raises(LowbitError, match=r"lowrank_residual.*torch.compile"):
        compress(make_model("llama"), "rsparse-50", calibration=CALIBRATION[:1], progress=False)


def _pass_details_of(summary, name):
    return next(p for p in summary["passes"] if p["name"] == name)["details"]
