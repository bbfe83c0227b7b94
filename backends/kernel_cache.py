"""Generated kernels, cached by specialisation: in memory per process, on disk across processes.

``get_kernel(spec, interpret)`` returns a :class:`GeneratedKernel`. The source is rendered only when
no file for the spec's name (which embeds a digest of the spec and of the generator) exists in the
cache directory (``$LOWBIT_CACHE_DIR``, else ``~/.cache/lowbit_compiler``); ``stats["rendered"]``
counts renders, so a second process compiling the same model shows 0. GPU resource reports (an
ahead-of-time compile for sm_90, ~1 s each) are cached the same way, beside the source.
"""
from __future__ import annotations

import collections
import hashlib
import dataclasses
import json
import os
import pathlib
from typing import Any

import torch

from lowbit_compiler.backends import _triton_adapter, codegen

stats: collections.Counter = collections.Counter()  # rendered, disk_hits, loaded, gpu_reports
_loaded: dict[tuple[str, bool], "GeneratedKernel"] = {}


def cache_dir() -> pathlib.Path:
    root = os.environ.get("LOWBIT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lowbit_compiler")
    path = pathlib.Path(root) / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclasses.dataclass
class GeneratedKernel:
    spec: codegen.KernelSpec
    path: pathlib.Path
    source: str
    launch: Any  # the launcher function (what lowered graphs call)
    kernel: Any  # the @triton.jit function
    reference: Any

    @property
    def name(self) -> str:
        return self.spec.name


def source_file(spec: codegen.KernelSpec) -> tuple[pathlib.Path, str]:
    """The kernel file for ``spec`` in the disk cache, rendered only if it is not there yet."""
    path = cache_dir() / f"{spec.name}.py"
    if path.exists():
        stats["disk_hits"] += 1
        return path, path.read_text()
    source = codegen.render(spec)
    stats["rendered"] += 1
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(source)
    os.replace(tmp, path)  # atomic: a concurrent process reads a whole file or none
    return path, source


def get_kernel(spec: codegen.KernelSpec, interpret: bool, gpu_variant: bool = False) -> GeneratedKernel:
    """The kernel of ``spec``, rendered once and imported once per process. Under the interpreter a
    kernel that computes in 16-bit floats is refused (the interpreter's bf16 arithmetic is wrong,
    silently); ``gpu_variant=True`` lets a test run a GPU variant there anyway where the
    interpreter computes it correctly (fp16 dots)."""
    name = spec.name
    key = (name, interpret)
    if key in _loaded:
        return _loaded[key]
    path, source = source_file(spec)
    if interpret and not gpu_variant and (problems := codegen.arithmetic_violations(source)):
        raise RuntimeError(f"generated kernel {name} would compute in 16-bit floats under the interpreter "
                           f"(wrong numbers, no error): {problems}")
    module = _triton_adapter.load_module(str(path), f"lowbit_kernels.{name}{'_interp' if interpret else ''}")
    stats["loaded"] += 1
    kernel = GeneratedKernel(spec, path, source, getattr(module, name), getattr(module, f"{name}_kernel"),
                             module.reference)
    _loaded[key] = kernel
    return kernel


def gpu_reports(items: list[tuple[codegen.KernelSpec, list[Any]]], arch: int = 90) -> list[dict[str, Any]]:
    """Compile each spec's kernel ahead of time for ``sm_<arch>`` with the pointer dtypes of its
    launcher arguments and return its resource report; cached on disk by kernel name and dtypes."""
    paths, jobs = [], []
    for spec, args in items:
        source_path, _ = source_file(spec)
        signature = kernel_signature(spec, args)
        # "+stats": reports now include the statistics kernel (older cached ones do not)
        tag = hashlib.sha256((repr(sorted(signature.items())) + "+stats").encode()).hexdigest()[:8]
        path = source_path.with_name(f"{spec.name}.sm{arch}.{tag}.json")
        paths.append(path)
        if not path.exists():
            jobs.append({"path": str(source_path), "name": f"{spec.name}_kernel", "signature": signature,
                         "constexprs": {"BLOCK_M": spec.block_m, "BLOCK_N": spec.block_n, "BLOCK_K": spec.block_k,
                                        **({"SPLIT_K": spec.split_k} if spec.split_k > 1 else {})},
                         "num_warps": spec.num_warps, "arch": arch, "out": str(path)})
            if spec.stats:  # the statistics kernel runs on the GPU too: in the same report
                jobs.append({"path": str(source_path), "name": f"{spec.name}_stats",
                             "signature": stats_signature(spec, signature),
                             "constexprs": {"BLOCK_K": codegen.STATS_BLOCK}, "num_warps": 4, "arch": arch,
                             "out": str(path), "stats": True})
    unique: dict[tuple[str, bool], dict] = {(job["out"], job.get("stats", False)): job for job in jobs}
    if unique:
        reports = _triton_adapter.compile_for_gpu([{k: v for k, v in job.items() if k not in ("out", "stats")}
                                                   for job in unique.values()])
        merged: dict[str, dict] = {}
        for (out, is_stats), report in zip(unique, reports):
            if is_stats:
                merged.setdefault(out, {})["stats_kernel"] = {k: report[k] for k in ("registers", "spill_bytes")}
            else:
                merged.setdefault(out, {}).update(report)
        for out, report in merged.items():
            pathlib.Path(out).write_text(json.dumps(report))
        stats["gpu_reports"] += len(merged)
    return [json.loads(p.read_text()) for p in paths]


def stats_signature(spec: codegen.KernelSpec, main: dict[str, str]) -> dict[str, str]:
    """Triton types of ``<name>_stats``'s runtime arguments (codegen._stats_kernel's order)."""
    sig = {"x_ptr": main["x_ptr"], "stride_xm": "i32"}
    sig.update({k: main[k] for k in ("norm_w_ptr", "norm_b_ptr") if k in main})
    if spec.prologue:
        sig["eps"] = "fp32"
    sig.update({"stats_ptr": "*fp32", "M": "i32", "K": "i32"})
    return sig


def kernel_signature(spec: codegen.KernelSpec, args: list[Any]) -> dict[str, str]:
    """Triton type strings of the kernel's runtime arguments, from the launcher's arguments."""
    named = dict(zip(codegen.launcher_params(spec), args))

    def ptr(t: torch.Tensor) -> str:
        return "*" + codegen.TRITON_TYPES[t.dtype]

    sig = {"x_ptr": ptr(named["x"]), "stride_xm": "i32"}
    if spec.norm_weight:
        sig["norm_w_ptr"] = ptr(named["norm_w"])
    if spec.norm_bias:
        sig["norm_b_ptr"] = ptr(named["norm_b"])
    if spec.stats:
        sig["stats_ptr"] = "*fp32"
    if spec.act_static or spec.act_prequant:
        sig["x_scale_ptr"] = ptr(named["x_scale"])
    fmt = spec.format
    for i in range(spec.weight_sets):
        sig[f"qw{i}_ptr"] = ptr(named[f"qw{i}"])
        sig[f"scale{i}_ptr"] = ptr(named[f"scale{i}"])
        if codegen.has_second(fmt):  # zero points, or NVFP4's per-tensor scale
            sig[f"zero{i}_ptr"] = ptr(named[f"zero{i}"])
        if spec.bias:
            sig[f"bias{i}_ptr"] = ptr(named[f"bias{i}"])
        sig[f"stride_qw{i}"] = "i32"
        if fmt.group_size:
            sig[f"stride_s{i}"] = "i32"
        if spec.outliers and i == 0:
            sig.update({"optr0_ptr": "*i32", "ocol0_ptr": "*i32", "oval0_ptr": ptr(named["oval0"])})
    for j, kind in enumerate(spec.externals):
        sig[f"e{j}_ptr"] = ptr(named[f"e{j}"])
        if kind == "full":
            sig[f"stride_e{j}m"] = "i32"
    sig.update({"out_ptr": "*" + codegen.TRITON_TYPES[codegen.DTYPES[spec.out_dtype]], "stride_om": "i32"})
    if spec.split_k > 1:
        sig.update({"ws_ptr": "*i32" if codegen._int32_acc(spec) else "*fp32", "count_ptr": "*i32"})
    sig.update({"M": "i32", "N": "i32", **{f"N{p}": "i32" for p in range(1, spec.parts)}, "K": "i32"})
    return sig


def loaded(name: str) -> GeneratedKernel:
    """A kernel this process has loaded, by name (what ``lowbit::generated`` calls)."""
    for (kernel_name, _), kernel in _loaded.items():
        if kernel_name == name:
            return kernel
    raise KeyError(f"generated kernel {name} is not loaded in this process")


_EAGER_SPECS: dict[tuple, codegen.KernelSpec] = {}


def eager_wo_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                    bias: torch.Tensor | None, fmt: str, in_features: int) -> torch.Tensor:
    """``lowbit::wo_linear`` outside a compiled graph on a CUDA device (``compress``ed or loaded
    models run eagerly): the generated kernel of the format's template for this row count (decode:
    one spec per row count up to ``GEMV_MAX_ROWS``, split-K for this layer's N and K; prefill: one
    symbolic-M spec), without fusion. No format dequantises its whole weight per call on CUDA.
    Under the interpreter the same kernels run on CPU tensors (how the tests check it)."""
    from lowbit_compiler.formats import WeightFormat

    k = x.shape[-1]
    rows = x.numel() // max(k, 1)
    decode_rows = rows if rows <= codegen.GEMV_MAX_ROWS else None
    dtype = str(x.dtype).split(".")[-1]
    key = (fmt, decode_rows, scale.shape[0], in_features, dtype, bias is not None)
    spec = _EAGER_SPECS.get(key)
    if spec is None:
        tiling = codegen.choose_variant(WeightFormat.parse(fmt), decode_rows, on_gpu=not _triton_adapter.interpreting(),
                                        x_dtype=dtype, n=scale.shape[0], k=in_features)
        spec = _EAGER_SPECS[key] = codegen.KernelSpec(fmt=fmt, **tiling, x_dtype=dtype, out_dtype=dtype,
                                                      bias=bias is not None)
    launch = get_kernel(spec, _triton_adapter.interpreting()).launch
    args = [x, qweight, scale] + ([zero] if codegen.has_second(spec.format) else []) + ([bias] if bias is not None else [])
    return launch(*args)


def eager_kernel_reason(fmt: str, x_dtype: torch.dtype) -> str | None:
    """Why :func:`eager_wo_linear` cannot run a call (None: it can)."""
    if x_dtype not in codegen.DTYPES.values():
        return f"activation dtype {x_dtype} has no generated kernel (use float32/bfloat16/float16)"
    return codegen.template_gap(fmt)
