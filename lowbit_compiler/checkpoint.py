"""Saving and loading compressed models: safetensors plus a JSON manifest, nothing pickled.

A checkpoint directory holds::

    model.safetensors    every tensor of the compressed model's ``state_dict()`` (tensors that alias
                         each other, such as tied weights, stored once)
    lowbit_config.json   the manifest (models that are not from transformers), or
    config.json          the model's config, whose ``quantization_config`` is the manifest
                         (``quant_method: "lowbit"``; transformers' ``save_pretrained``)

The manifest (``FORMAT_VERSION`` 1, documented in ``docs/checkpoint.md``) says which modules the
compression replaced and how to rebuild them, and the dtype and shape of every stored tensor::

    {"quant_method": "lowbit", "format_version": 1, "recipe": {...},
     "modules": {"model.layers.0.mlp.down_proj": {"kind": "LowbitLinear", "fmt": "int4_g128_asym",
                     "act": null, "in_features": 256, "out_features": 128, "input_hadamard": true,
                     "weight_dtype": "float32"},
                 "model.norm": {"kind": "FoldedRMSNorm", "eps": 1e-06}, ...},
     "tensors": {"model.layers.0.mlp.down_proj.qweight": {"dtype": "U8", "shape": [128, 128]}, ...},
     "aliases": {"lm_head.weight": "model.embed_tokens.weight"},
     "R3": null}

Loading (:func:`load`, and transformers' ``from_pretrained`` through :mod:`lowbit_compiler.hf`)
reads the safetensors header itself (a length and JSON: no code runs), checks it against the
manifest and each quantized module's tensors against its format's layout
(``WeightFormat.layout``), then rebuilds the modules (:func:`prepare`) and loads the tensors. Any
mismatch (unknown version or format, a missing, extra, truncated, mis-shaped or mis-typed tensor,
a format that does not fit the tensors' sizes) raises :class:`LowbitError` naming the tensor.
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

import torch

from lowbit_compiler.formats import FormatError, WeightFormat
from lowbit_compiler.pass_base import LowbitError

FORMAT_VERSION = 1
QUANT_METHOD = "lowbit"
WEIGHTS_NAME = "model.safetensors"
MANIFEST_NAME = "lowbit_config.json"

# safetensors' dtype names
DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64",
               torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
ACTIVATIONS = (None, "int8", "int4", "fp8_e4m3")  # LowbitLinear.act values (lowbit::qa_linear)


def _dtype_name(t: torch.Tensor, key: str) -> str:
    if t.dtype not in DTYPE_NAMES:
        raise LowbitError(f"save: tensor {key} has dtype {t.dtype}, which safetensors cannot store")
    return DTYPE_NAMES[t.dtype]


# --------------------------------------------------------------------------------------------
# The manifest of a compressed model
# --------------------------------------------------------------------------------------------

def module_records(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """What the compression put into ``model``, module by module, without tensors."""
    from lowbit_compiler.offline import (FoldedRMSNorm, GraphRMSNorm, LowbitExperts, LowbitLinear, RSparseLinear,
                                         input_transforms_of)

    records: dict[str, dict[str, Any]] = {}
    for fqn, module in model.named_modules():
        if isinstance(module, LowbitExperts):
            records[fqn] = {"kind": "LowbitExperts", "projections": {}}
            for name in module.quantized:
                fmt, in_features, act, dtype = getattr(module, f"{name}_spec")
                qweight = getattr(module, f"{name}_qweight")
                records[fqn]["projections"][name] = {
                    "fmt": fmt, "act": act, "in_features": in_features, "num_experts": qweight.shape[0],
                    "out_features": getattr(module, f"{name}_scale").shape[1],
                    "weight_dtype": str(dtype).removeprefix("torch.")}
        elif isinstance(module, LowbitLinear):
            # R-Sparse's low-rank part beside the quantized matmul: its own kind, so that a reader that
            # predates it refuses the checkpoint instead of loading the factors and ignoring them
            lowrank = module.lowrank_left is not None
            records[fqn] = {"kind": "RSparseLinear" if lowrank else "LowbitLinear", "fmt": module.fmt,
                            "act": module.act, "in_features": module.in_features,
                            "out_features": module.out_features, "input_hadamard": bool(module.input_hadamard),
                            "weight_dtype": str(module.weight_dtype).removeprefix("torch."),
                            **({"rank": module.lowrank_left.shape[1]} if lowrank else {})}
        elif isinstance(module, RSparseLinear):  # R-Sparse on a float weight
            records[fqn] = {"kind": "RSparseLinear", "fmt": None, "in_features": module.in_features,
                            "out_features": module.out_features, "rank": module.lowrank_left.shape[1],
                            "transposed": module.transposed}
        elif isinstance(module, FoldedRMSNorm):
            records[fqn] = {"kind": "FoldedRMSNorm", "eps": module.eps,
                            "weight_dtype": str(module.weight.dtype).removeprefix("torch.")}
        elif isinstance(module, GraphRMSNorm):
            records[fqn] = {"kind": "GraphRMSNorm", "eps": module.eps, "offset": module.offset}
        elif (transforms := input_transforms_of(module)) is not None:
            records[fqn] = {"kind": "InputTransforms", "input_hadamard": bool(transforms["input_hadamard"])}
        elif hasattr(module, "lowbit_output_threshold"):  # CATS: a threshold on an activation's output
            records[fqn] = {"kind": "OutputThreshold"}
    return records


def _state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to store (each storage once) and the aliases: key -> the stored key it reads."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        t = t.detach()
        if t.device.type == "meta":
            raise LowbitError(f"save: tensor {key} is on the meta device (not loaded); nothing to save")
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and ident in first:
            aliases[key] = first[ident]
            continue
        first[ident] = key
        tensors[key] = t
    return tensors, aliases


def manifest(model: torch.nn.Module) -> dict[str, Any]:
    """The manifest of a compressed model (module docstring)."""
    summary = getattr(model, "lowbit_summary", None) or {}
    tensors, aliases = _state(model)
    r3 = summary.get("R3")
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "recipe": summary.get("recipe"),
            "modules": module_records(model),
            "tensors": {k: {"dtype": _dtype_name(t, k), "shape": list(t.shape)} for k, t in tensors.items()},
            "aliases": aliases, "R3": r3 if r3 and r3.get("applied") else None,
            # what compress reported (for ``lowbit inspect`` on the checkpoint); not read when loading
            "layers": _plain(summary.get("layers", {})), "totals": _plain(summary.get("coverage", {}).get("totals")),
            # the compressed KV cache's formats (lowbit_compiler.kv.install), reinstalled when loading
            "kv_cache": _kv_entry(model)}


def _kv_entry(model: torch.nn.Module) -> dict[str, Any] | None:
    from lowbit_compiler import kv

    return kv.manifest_entry(model)


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# --------------------------------------------------------------------------------------------
# Reading a safetensors file without trusting it
# --------------------------------------------------------------------------------------------

def read_header(path: str) -> dict[str, dict[str, Any]]:
    """The tensor table of a safetensors file (name -> dtype, shape, data_offsets), checked for
    truncation; reads only the header."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise LowbitError(f"checkpoint {path}: truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise LowbitError(f"checkpoint {path}: truncated header ({n} bytes announced, {size - 8} in the file)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise LowbitError(f"checkpoint: {path} does not exist (the weights file of the checkpoint)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LowbitError(f"checkpoint {path}: the safetensors header is not valid JSON ({e})") from None
    header.pop("__metadata__", None)
    data = size - 8 - n
    for name, entry in header.items():
        start, end = entry.get("data_offsets", (0, -1))
        dtype = DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise LowbitError(f"checkpoint {path}: tensor {name} has unknown dtype {entry.get('dtype')!r}")
        expected = math.prod(entry.get("shape", ())) * _bits(dtype) // 8
        if end - start != expected:
            raise LowbitError(f"checkpoint {path}: tensor {name} holds {end - start} bytes, its shape "
                              f"{entry.get('shape')} and dtype {entry['dtype']} need {expected}")
        if end > data:
            raise LowbitError(f"checkpoint {path}: tensor {name} is truncated (its data ends at byte {end} of the "
                              f"data section, which has {data}); the file was cut short")
    return header


def headers(files: list[str]) -> dict[str, dict[str, Any]]:
    """The tensor table of several weight files (each entry names its file)."""
    found: dict[str, dict[str, Any]] = {}
    for path in files:
        for name, entry in read_header(path).items():
            found[name] = {**entry, "file": path}
    return found


# --------------------------------------------------------------------------------------------
# Validation: manifest against itself (formats) and against the files
# --------------------------------------------------------------------------------------------

def _expect(key: str, declared: dict[str, Any] | None, dtype: torch.dtype, shape: tuple[int, ...], why: str) -> None:
    if declared is None:
        raise LowbitError(f"checkpoint: tensor {key} is missing; {why} needs it ({DTYPE_NAMES[dtype]} {list(shape)})")
    if DTYPES.get(declared["dtype"]) != dtype:
        raise LowbitError(f"checkpoint: tensor {key} has dtype {declared['dtype']}; {why} stores "
                          f"{DTYPE_NAMES[dtype]}")
    if tuple(declared["shape"]) != tuple(shape):
        raise LowbitError(f"checkpoint: tensor {key} has shape {declared['shape']}; {why} needs {list(shape)}")


def _check_layout(fmt: WeightFormat, n: int, k: int, prefix: str, lead: tuple[int, ...], tensors: dict[str, Any],
                  why: str) -> None:
    """The stored tensors (``<prefix>qweight`` / ``scale`` / ``zero``) are ``fmt.layout(n, k)``, with
    ``lead`` dimensions in front (the experts of stacked weights)."""
    for part, entry in fmt.layout(n, k).items():
        key = prefix + part
        if entry is None:
            if key in tensors:
                raise LowbitError(f"checkpoint: tensor {key} is present but format {fmt.key} has no {part}")
            continue
        dtype, shape = entry
        _expect(key, tensors.get(key), dtype, (*lead, *shape), why)


def _check_linear(fqn: str, record: dict[str, Any], tensors: dict[str, Any]) -> None:
    try:
        fmt = WeightFormat.parse(record["fmt"])
    except (FormatError, KeyError, TypeError) as e:
        raise LowbitError(f"checkpoint: module {fqn}: unknown weight format {record.get('fmt')!r} ({e}); this version "
                          "of lowbit_compiler cannot read it") from None
    if record.get("act") not in ACTIVATIONS:
        raise LowbitError(f"checkpoint: module {fqn}: unknown activation format {record.get('act')!r}; expected one "
                          f"of {list(ACTIVATIONS)}")
    n, k = record.get("out_features"), record.get("in_features")
    if not (isinstance(n, int) and isinstance(k, int) and n > 0 and k > 0):
        raise LowbitError(f"checkpoint: module {fqn}: in_features/out_features must be positive integers, got "
                          f"{k!r}/{n!r}")
    if fmt.group_size and fmt.padded_k(k) - k >= fmt.group_size:
        raise LowbitError(f"checkpoint: module {fqn}: format {fmt.key} does not fit in_features={k}")
    _check_layout(fmt, n, k, f"{fqn}.", (), tensors, f"format {fmt.key} for a [{n}, {k}] weight")
    for name, shape in (("bias", (n,)), ("x_scale", None), ("input_signs", (k,))):
        declared = tensors.get(f"{fqn}.{name}")
        if declared is not None and shape is not None and tuple(declared["shape"]) != shape:
            raise LowbitError(f"checkpoint: tensor {fqn}.{name} has shape {declared['shape']}; module {fqn} "
                              f"(out_features={n}, in_features={k}) needs {list(shape)}")
    left, right = tensors.get(f"{fqn}.transform_left"), tensors.get(f"{fqn}.transform_right")
    if (left is None) != (right is None) or (left is not None and left["shape"][0] * right["shape"][0] != k):
        raise LowbitError(f"checkpoint: module {fqn}: transform_left/right must both be present and their sizes "
                          f"multiply to in_features={k}")
    outliers = [tensors.get(f"{fqn}.outlier_{p}") for p in ("rows", "cols", "values")]
    if any(o is not None for o in outliers) and (any(o is None for o in outliers)
                                                 or len({tuple(o["shape"]) for o in outliers}) != 1):
        raise LowbitError(f"checkpoint: module {fqn}: outlier_rows/cols/values must all be present with one shape")


def _check_rsparse(fqn: str, record: dict[str, Any], tensors: dict[str, Any]) -> None:
    """R-Sparse: a quantized linear (``fmt``; as LowbitLinear) or a float one (``fmt`` null: ``weight``
    [N, K]), its threshold, and the low-rank factors ``lowrank_left`` [N, r] / ``lowrank_right`` [r, K]
    in one float dtype."""
    n, k, r = record.get("out_features"), record.get("in_features"), record.get("rank")
    if not all(isinstance(v, int) and v > 0 for v in (n, k, r)):
        raise LowbitError(f"checkpoint: module {fqn}: out_features/in_features/rank must be positive integers, got "
                          f"{n!r}/{k!r}/{r!r}")
    if record.get("fmt") is not None:
        _check_linear(fqn, record, tensors)
    else:
        weight, shape = tensors.get(f"{fqn}.weight"), (k, n) if record.get("transposed") else (n, k)
        if weight is None or tuple(weight["shape"]) != shape:
            raise LowbitError(f"checkpoint: module {fqn}: a float R-Sparse linear needs weight {list(shape)}, found "
                              f"{None if weight is None else weight['shape']}")
    left, right = tensors.get(f"{fqn}.lowrank_left"), tensors.get(f"{fqn}.lowrank_right")
    threshold = tensors.get(f"{fqn}.input_threshold")
    if threshold is None:
        raise LowbitError(f"checkpoint: tensor {fqn}.input_threshold is missing; R-Sparse module {fqn} needs it")
    for key, entry, shape in (("lowrank_left", left, (n, r)), ("lowrank_right", right, (r, k))):
        if entry is None or tuple(entry["shape"]) != shape:
            raise LowbitError(f"checkpoint: tensor {fqn}.{key} has shape {None if entry is None else entry['shape']}; "
                              f"R-Sparse module {fqn} (rank {r}) needs {list(shape)}")
    if left["dtype"] != right["dtype"] or DTYPES.get(left["dtype"]) not in (torch.float16, torch.bfloat16,
                                                                             torch.float32, torch.float64):
        raise LowbitError(f"checkpoint: module {fqn}: lowrank_left/right must share one float dtype, found "
                          f"{left['dtype']}/{right['dtype']}")


def _declared(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every tensor of the model by name, aliases included (an alias has its target's entry)."""
    tensors = meta["tensors"]
    return {**tensors, **{k: tensors[v] for k, v in meta.get("aliases", {}).items()}}


def _check_experts(fqn: str, record: dict[str, Any], tensors: dict[str, Any]) -> None:
    """Stacked experts: each projection's tensors are its format's layout with the experts in front."""
    projections = record.get("projections")
    if not isinstance(projections, dict) or not projections:
        raise LowbitError(f"checkpoint: module {fqn}: LowbitExperts without projections")
    for name, p in projections.items():
        where = f"{fqn}.{name}"
        try:
            fmt = WeightFormat.parse(p["fmt"])
        except (FormatError, KeyError, TypeError) as e:
            raise LowbitError(f"checkpoint: module {where}: unknown weight format {p.get('fmt')!r} ({e})") from None
        if p.get("act") not in ACTIVATIONS:
            raise LowbitError(f"checkpoint: module {where}: unknown activation format {p.get('act')!r}")
        e, n, k = p.get("num_experts"), p.get("out_features"), p.get("in_features")
        if not all(isinstance(v, int) and v > 0 for v in (e, n, k)):
            raise LowbitError(f"checkpoint: module {where}: num_experts/out_features/in_features must be positive "
                              f"integers, got {e!r}/{n!r}/{k!r}")
        _check_layout(fmt, n, k, f"{fqn}.{name}_", (e,), tensors, f"format {fmt.key} for {e} experts of [{n}, {k}]")


def validate(meta: dict[str, Any], stored: dict[str, dict[str, Any]] | None = None) -> None:
    """Check a manifest (and, given the files' tensor table ``stored``, the files against it);
    raises :class:`LowbitError` naming the first mismatch."""
    if meta.get("quant_method") != QUANT_METHOD:
        raise LowbitError(f"checkpoint: quant_method {meta.get('quant_method')!r} is not {QUANT_METHOD!r}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise LowbitError(f"checkpoint: format_version {version!r} is unknown; this lowbit_compiler reads version "
                          f"{FORMAT_VERSION} (upgrade lowbit_compiler to read newer checkpoints)")
    tensors = meta.get("tensors")
    modules = meta.get("modules")
    if not isinstance(tensors, dict) or not isinstance(modules, dict):
        raise LowbitError("checkpoint: the manifest has no 'tensors' / 'modules' tables")
    for key, entry in tensors.items():
        if DTYPES.get(entry.get("dtype")) is None or not isinstance(entry.get("shape"), list):
            raise LowbitError(f"checkpoint: tensor {key}: bad manifest entry {entry}")
    if meta.get("kv_cache"):
        from lowbit_compiler import kv

        kv.formats_from_manifest(meta["kv_cache"])  # raises naming the bad entry
    for key, target in meta.get("aliases", {}).items():
        if target not in tensors:
            raise LowbitError(f"checkpoint: tensor {key} aliases {target}, which is not stored")
    declared = _declared(meta)
    for fqn, record in modules.items():
        kind = record.get("kind")
        if kind == "LowbitLinear":
            _check_linear(fqn, record, declared)
        elif kind == "LowbitExperts":
            _check_experts(fqn, record, declared)
        elif kind == "RSparseLinear":
            _check_rsparse(fqn, record, declared)
        elif kind not in ("FoldedRMSNorm", "GraphRMSNorm", "InputTransforms", "OutputThreshold"):
            raise LowbitError(f"checkpoint: module {fqn}: unknown module kind {kind!r}")
    if stored is None:
        return
    for key, entry in tensors.items():
        found = stored.get(key)
        if found is None:
            raise LowbitError(f"checkpoint: tensor {key} is missing from the weights file "
                              f"({entry['dtype']} {entry['shape']} declared)")
        if found["dtype"] != entry["dtype"] or list(found["shape"]) != list(entry["shape"]):
            raise LowbitError(f"checkpoint: tensor {key} is {found['dtype']} {found['shape']} in "
                              f"{os.path.basename(found['file'])}; the manifest declares {entry['dtype']} {entry['shape']}")
    aliases = meta.get("aliases", {})
    for key in set(stored) & set(aliases):  # an alias written as a copy (transformers stores buffers so)
        found, entry = stored[key], tensors[aliases[key]]
        if found["dtype"] != entry["dtype"] or list(found["shape"]) != list(entry["shape"]):
            raise LowbitError(f"checkpoint: tensor {key} is {found['dtype']} {found['shape']}; it aliases "
                              f"{aliases[key]}, declared {entry['dtype']} {entry['shape']}")
    extra = sorted(set(stored) - set(tensors) - set(aliases))
    if extra:
        raise LowbitError(f"checkpoint: tensors {extra[:5]} are in the weights file but not in the manifest")


# --------------------------------------------------------------------------------------------
# Rebuilding the modules
# --------------------------------------------------------------------------------------------

def _empty(entry: dict[str, Any] | None, device: Any) -> torch.Tensor | None:
    return None if entry is None else torch.empty(entry["shape"], dtype=DTYPES[entry["dtype"]], device=device)


def _set_module(model: torch.nn.Module, fqn: str, module: torch.nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def prepare(model: torch.nn.Module, meta: dict[str, Any], device: Any = None) -> torch.nn.Module:
    """Turn a float model of the checkpoint's architecture into the compressed model's skeleton:
    modules replaced as the manifest says, with empty tensors of the declared dtypes and shapes;
    tensors the float model does not have (biases folding created, untied heads) added. The
    tensors are then loaded by name."""
    from lowbit_compiler.offline import (FoldedRMSNorm, GraphRMSNorm, LowbitExperts, LowbitLinear, RSparseLinear,
                                         _attention_r3, add_input_transforms, add_output_threshold)

    tensors = meta["tensors"]
    declared = _declared(meta)
    t = lambda fqn, name: _empty(declared.get(f"{fqn}.{name}"), device)  # noqa: E731
    for fqn, record in meta["modules"].items():
        try:
            current = model.get_submodule(fqn)
        except AttributeError:
            raise LowbitError(f"checkpoint: module {fqn} is not in {type(model).__name__}; the checkpoint was saved "
                              "from another architecture") from None
        kind = record["kind"]
        lowrank = (t(fqn, "lowrank_left"), t(fqn, "lowrank_right")) if kind == "RSparseLinear" else None
        if kind == "RSparseLinear" and record.get("fmt") is None:  # R-Sparse on the float model's own linear
            _set_module(model, fqn, RSparseLinear(current, t(fqn, "input_threshold"), lowrank,
                                                  transposed=bool(record.get("transposed", False))))
        elif kind in ("LowbitLinear", "RSparseLinear"):
            rows, cols, values = t(fqn, "outlier_rows"), t(fqn, "outlier_cols"), t(fqn, "outlier_values")
            left, right = t(fqn, "transform_left"), t(fqn, "transform_right")
            qweight = t(fqn, "qweight")
            module = LowbitLinear(record["fmt"], qweight, t(fqn, "scale"), t(fqn, "zero"), t(fqn, "bias"),
                                  record["in_features"], record.get("act"),
                                  None if values is None else (rows, cols, values), t(fqn, "x_scale"),
                                  input_hadamard=record.get("input_hadamard", False),
                                  input_transform=None if left is None else (left, right),
                                  input_signs=t(fqn, "input_signs"),
                                  weight_dtype=getattr(torch, record.get("weight_dtype", "float32")),
                                  input_threshold=t(fqn, "input_threshold"),
                                  input_col_scale=t(fqn, "input_col_scale"), lowrank=lowrank)
            _set_module(model, fqn, module)
        elif kind == "LowbitExperts":  # built around the float experts module (its gate, act_fn, flags)
            quantized = {name: {"qweight": t(fqn, f"{name}_qweight"), "scale": t(fqn, f"{name}_scale"),
                                "zero": t(fqn, f"{name}_zero"), "fmt": p["fmt"], "in_features": p["in_features"],
                                "act": p.get("act")}
                         for name, p in record["projections"].items()}
            module = LowbitExperts(current, quantized)
            for name, p in record["projections"].items():  # the float weight's dtype, as write-back keeps it
                fmt, in_features, act, _ = getattr(module, f"{name}_spec")
                setattr(module, f"{name}_spec", (fmt, in_features, act, getattr(torch, p.get("weight_dtype", "float32"))))
            _set_module(model, fqn, module)
        elif kind == "FoldedRMSNorm":  # its zero-size stand-in weight keeps the folded weight's dtype
            like = torch.empty(0, dtype=getattr(torch, record.get("weight_dtype", "float32")), device=device)
            _set_module(model, fqn, FoldedRMSNorm(record["eps"], like))
        elif kind == "GraphRMSNorm":
            _set_module(model, fqn, GraphRMSNorm(_empty(tensors[f"{fqn}.weight"], device), record["eps"],
                                                 record.get("offset", 0.0)))
        elif kind == "InputTransforms":
            left = t(fqn, "lowbit_transform_left")
            add_input_transforms(current, record.get("input_hadamard", False), t(fqn, "lowbit_input_signs"),
                                 None if left is None else (left, t(fqn, "lowbit_transform_right")),
                                 t(fqn, "lowbit_input_threshold"), t(fqn, "lowbit_input_col_scale"))
        elif kind == "OutputThreshold":
            add_output_threshold(current, t(fqn, "lowbit_output_threshold"), t(fqn, "lowbit_output_col_scale"))
    # tensors the float model lacks, or shares where the compressed model does not (an untied head)
    aliases = meta.get("aliases", {})
    present = model.state_dict(keep_vars=True)
    owners: dict[int, str] = {}
    for key in tensors:
        current = present.get(key)
        ident = None if current is None else id(current)
        if current is None or ident in owners:
            owner_name, _, attr = key.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            new = _empty(tensors[key], device)
            if attr in owner._buffers:
                owner.register_buffer(attr, new)
            else:
                setattr(owner, attr, torch.nn.Parameter(new, requires_grad=False))
        else:
            owners[ident] = key
    for key in aliases:  # loaded through their targets (after loading: tie)
        if key not in present:
            raise LowbitError(f"checkpoint: tensor {key} (an alias) is not in {type(model).__name__}")
    if meta.get("R3"):
        _attention_r3(model, strict=True)
    return model


def materialize_stand_ins(model: torch.nn.Module) -> None:
    """Zero-size, non-persistent stand-ins (``FoldedRMSNorm.weight``) built on the meta device
    while transformers loads: moved to the device of the model's parameters (nothing to load)."""
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device.type == "meta" and buffer.numel() == 0:
                module._buffers[name] = torch.empty(0, dtype=buffer.dtype, device=device)


def tie_aliases(model: torch.nn.Module, meta: dict[str, Any]) -> None:
    """Make each alias the same tensor as its target (tied weights stay tied)."""
    for key, target in meta.get("aliases", {}).items():
        owner_name, _, attr = key.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        source_name, _, source_attr = target.rpartition(".")
        source = getattr(model.get_submodule(source_name) if source_name else model, source_attr)
        if getattr(owner, attr) is not source:
            if attr in owner._buffers:
                owner._buffers[attr] = source
            else:
                setattr(owner, attr, source)


# --------------------------------------------------------------------------------------------
# Save / load for any nn.Module
# --------------------------------------------------------------------------------------------

def is_transformers_model(model: torch.nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def save(model: torch.nn.Module, directory: str | os.PathLike) -> str:
    """Save a compressed model to ``directory``: transformers models through ``save_pretrained``
    (the manifest in ``config.json``'s ``quantization_config``), any other module as
    ``model.safetensors`` + ``lowbit_config.json``. Returns the directory."""
    directory = os.fspath(directory)
    if is_transformers_model(model):
        from lowbit_compiler import hf

        hf.attach(model)
        model.save_pretrained(directory)
        return directory
    from safetensors.torch import save_file

    meta = manifest(model)
    tensors, _ = _state(model)
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(directory, WEIGHTS_NAME),
              metadata={"format": "pt", "quant_method": QUANT_METHOD})
    with open(os.path.join(directory, MANIFEST_NAME), "w") as f:
        json.dump(meta, f, indent=1)
    return directory


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a checkpoint directory (``lowbit_config.json``, or ``config.json``'s
    ``quantization_config``)."""
    directory = os.fspath(directory)
    for name, pick in ((MANIFEST_NAME, lambda d: d), ("config.json", lambda d: d.get("quantization_config"))):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            try:
                with open(path) as f:
                    meta = pick(json.load(f))
            except json.JSONDecodeError as e:
                raise LowbitError(f"checkpoint: {path} is not valid JSON ({e})") from None
            if meta is not None:
                return meta
    raise LowbitError(f"checkpoint: {directory} has no {MANIFEST_NAME} and no config.json with a quantization_config; "
                      "it was not written by lowbit_compiler.save / save_pretrained of a compressed model")


def weight_files(directory: str) -> list[str]:
    index = os.path.join(directory, WEIGHTS_NAME + ".index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(directory, n) for n in names]
    return [os.path.join(directory, WEIGHTS_NAME)]


def load(directory: str | os.PathLike, model: torch.nn.Module) -> torch.nn.Module:
    """Load a checkpoint written by :func:`save` into ``model`` (a float model of the same
    architecture, e.g. freshly constructed): checks every tensor against the manifest and its
    format, rebuilds the compressed modules and loads the tensors; returns ``model``."""
    from safetensors import safe_open

    directory = os.fspath(directory)
    meta = read_manifest(directory)
    files = weight_files(directory)
    validate(meta, headers(files))
    prepare(model, meta)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    aliases = meta.get("aliases", {})
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)  # dtypes as stored
    missing = [k for k in missing if k not in aliases]
    if missing or unexpected:
        raise LowbitError(f"checkpoint {directory}: the model does not match the checkpoint (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]})")
    tie_aliases(model, meta)
    model.lowbit_summary = loaded_summary(meta, directory)
    _install_kv(model, meta)
    return model


def _install_kv(model: torch.nn.Module, meta: dict[str, Any]) -> None:
    """Put the saved KV setup back on a loaded model (the manifest's ``kv_cache``)."""
    from lowbit_compiler import kv

    info = kv.install_from_manifest(model, meta)
    if info is not None:
        model.lowbit_summary["kv_cache"] = info


def loaded_summary(meta: dict[str, Any], source: str | None) -> dict[str, Any]:
    """``model.lowbit_summary`` of a loaded model: what compress reported when it was saved."""
    return {"recipe": meta.get("recipe"), "loaded_from": source, "layers": meta.get("layers") or {},
            "coverage": {"totals": meta.get("totals")}}


def is_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a lowbit checkpoint (``lowbit inspect`` reads it so)."""
    try:
        return os.path.isdir(directory) and read_manifest(directory).get("quant_method") == QUANT_METHOD
    except LowbitError:
        return False


def inspect_summary(directory: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint as ``lowbit inspect`` prints a dump's graph: recipe, per-layer table, totals."""
    meta = read_manifest(directory)
    validate(meta, headers(weight_files(os.fspath(directory))))
    summary = loaded_summary(meta, os.fspath(directory))
    stored = sum(math.prod(e["shape"]) * _bits(DTYPES[e["dtype"]]) // 8 for e in meta["tensors"].values())
    return {**summary, "graph": f"checkpoint {os.fspath(directory)} (format version {meta['format_version']}, "
                                f"{len(meta['tensors'])} tensors, {stored} bytes)",
            "recipe": meta.get("recipe") or {"name": "?"}, "target": "-", "inputs": "-", "frozen_parameters": "-"}


def _bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits if dtype.is_floating_point else 8 if dtype == torch.bool else torch.iinfo(dtype).bits
