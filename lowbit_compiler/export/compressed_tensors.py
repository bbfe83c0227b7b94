"""Export a compressed transformers model as a compressed-tensors checkpoint (what vLLM loads).

``export_compressed_tensors(model, out_dir)`` writes ``model.safetensors`` and a ``config.json``
whose ``quantization_config`` has ``quant_method: "compressed-tensors"``, one config group per
distinct scheme (the layers named exactly), and ``ignore`` listing the linears left in float.
What maps (our storage -> compressed-tensors, no re-quantization: the same codes and scales):

=================================== ========================== =====================================
ours (``LowbitLinear``)              compressed-tensors format  tensors
=================================== ========================== =====================================
``int4_g{32,64,128}_{sym,asym}``,    ``pack-quantized``         ``weight_packed`` int32 [N, K/8] (our
weight-only                                                     packed bytes: the same bit stream),
                                                                ``weight_scale`` [N, K/G],
                                                                ``weight_zero_point`` int32 [N/8, K/G]
                                                                (asym: ours - 8, packed along N),
                                                                ``weight_shape``
``int8`` weight-only                 ``pack-quantized`` 8 bit   codes + 128 as bytes, viewed as int32
``int8`` x ``int8`` per token        ``int-quantized``          ``weight`` int8 [N, K], ``weight_scale``
(W8A8, dynamic)                                                 [N, 1]; dynamic per-token int8 inputs
``fp8_e4m3`` (x fp8 per token)       ``float-quantized``        ``weight`` fp8 [N, K], ``weight_scale``
                                                                [N, 1]; dynamic per-token fp8 inputs
=================================== ========================== =====================================

N:M sparse formats (``s24+int4_g64_asym``, ``s24+int8``: ``sparse_formats.py``) are written dense
with zeros (vLLM takes 2:4 models that way): the inner format with groups of ``G * M / N`` input
columns, the code of 0 at pruned positions, the same scales, and a ``sparsity_config`` naming the
pattern; groups that come out outside 32/64/128 (``s24+int4_g128``: 256 columns) are refused.

Scales are written in the model's float dtype (our bf16 scales convert exactly to float32; a bf16
model keeps them as they are), so compressed-tensors' dequantization, ``(q - z) * s``, reproduces
ours bit for bit. Rotations folded into the weights (R1, R2) need nothing at inference; norms
whose scale was folded are written as all-ones weights.

Refused, with the reason (the export raises; nothing is written): online transforms in front of a
linear (R4 Hadamards and signs, FlatQuant's Kronecker transforms) and on queries/keys (R3), which
compressed-tensors checkpoints have no place for; activation-sparsity thresholds (TEAL/WINA on a
linear's input, CATS on an activation's output); SpQR outliers; static activation scales; int2/int3
(their packing differs between versions of compressed-tensors: dense since 0.20, padded before),
NF4, MXFP4/NVFP4 (compressed-tensors' own fp4 layouts are not written by this exporter), int4 with
group 256 or padded K, W4A4/W4A8 activations; tensors the float architecture does not have (a bias
folding created in a model whose linears have none).
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from lowbit_compiler.formats import WeightFormat
from lowbit_compiler.pass_base import LowbitError

CT_GROUP_SIZES = (32, 64, 128)  # what vLLM's group-quantized kernels take


def _weights_args(fmt: WeightFormat) -> dict[str, Any]:
    if fmt.kind == "fp8_e4m3":
        return {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "channel",
                "dynamic": False}
    return {"num_bits": fmt.bits, "type": "int", "symmetric": fmt.symmetric, "group_size": fmt.group_size,
            "strategy": "group" if fmt.group_size else "channel", "dynamic": False}


def _token_args(kind: str) -> dict[str, Any]:
    return {"num_bits": 8, "type": kind, "symmetric": True, "group_size": None, "strategy": "token", "dynamic": True}


def dense_view(module: Any) -> Any:
    """A LowbitLinear with an N:M sparse format (``sparse_formats.py``) seen as its dense-with-zeros
    equivalent (``SparseFormat.to_dense``: the same scales, the code of 0 at pruned positions,
    groups of ``G * M / N`` columns); any other module as it is."""
    import types

    from lowbit_compiler.formats import FormatError

    fmt = WeightFormat.parse(module.fmt)
    if fmt.kind != "sparse":
        return module
    try:
        dense = fmt.to_dense(module.qweight, module.scale, module.zero)
    except FormatError as e:
        return f"format {fmt.key}: {e}"
    fields = {name: getattr(module, name) for name in ("input_hadamard", "input_signs", "transform_left",
                                                        "outlier_values", "input_threshold", "x_scale", "in_features",
                                                        "out_features", "act", "bias", "lowrank_left")}
    return types.SimpleNamespace(**fields, fmt=dense.format.key, qweight=dense.qweight, scale=dense.scale,
                                 zero=dense.zero, sparsity=fmt.pattern)


def scheme_of(module: Any) -> tuple[str, dict[str, Any]] | str:
    """(compressed-tensors format, scheme without targets) for a LowbitLinear, or why it has none."""
    module = dense_view(module)
    if isinstance(module, str):
        return module
    if module.input_hadamard or module.input_signs is not None:
        return "an online Hadamard (R4) runs on its input; compressed-tensors has no online transforms"
    if module.transform_left is not None:
        return "a FlatQuant transform runs on its input; compressed-tensors has no online transforms"
    if module.outlier_values is not None:
        return "it has SpQR outliers (a sparse fp16 side matrix); compressed-tensors has no such tensor"
    if module.lowrank_left is not None:
        return ("R-Sparse: a threshold on its input and a low-rank part of the weight over the zeroed inputs "
                "(lowrank_left / lowrank_right); compressed-tensors has no place for either (the model would run "
                "dense without the low-rank correction)")
    if module.input_threshold is not None:
        return ("activation sparsity thresholds its input (TEAL/WINA, online); compressed-tensors has no place "
                "for it (the model would run dense)")
    if module.x_scale is not None:
        return "its activations use a static scale; this exporter writes dynamic per-token activations only"
    fmt = WeightFormat.parse(module.fmt)
    if fmt.padded_k(module.in_features) != module.in_features:
        return f"in_features={module.in_features} is padded to the group size {fmt.group_size}"
    act = module.act
    if fmt.kind == "fp8_e4m3" and act in (None, "fp8_e4m3"):
        scheme = {"weights": _weights_args(fmt), "input_activations": _token_args("float") if act else None}
        return "float-quantized", scheme
    if fmt.kind == "int" and fmt.bits == 8 and act in (None, "int8"):
        if act:
            return "int-quantized", {"weights": _weights_args(fmt), "input_activations": _token_args("int")}
        return "pack-quantized", {"weights": _weights_args(fmt), "input_activations": None}
    if fmt.kind == "int" and fmt.bits == 4 and act is None:
        if fmt.group_size not in CT_GROUP_SIZES:
            return f"format {fmt.key}: group size {fmt.group_size} (compressed-tensors kernels take {CT_GROUP_SIZES})"
        return "pack-quantized", {"weights": _weights_args(fmt), "input_activations": None}
    if act:
        return f"format {fmt.key} with {act} activations has no compressed-tensors scheme this exporter writes"
    if fmt.kind == "int":
        return (f"format {fmt.key}: {fmt.bits}-bit packing differs between compressed-tensors versions (dense since "
                "0.20, padded before); export 4- or 8-bit weights")
    return f"format {fmt.key} is not written by this exporter (compressed-tensors' own {fmt.kind} layout differs)"


def _tensors(module: Any, fmt_name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A LowbitLinear's compressed-tensors tensors (local names)."""
    module = dense_view(module)
    fmt = WeightFormat.parse(module.fmt)
    n, k = module.out_features, module.in_features
    scale = module.scale.to(dtype)  # bf16 -> the model's dtype: exact for float32 and bfloat16
    out: dict[str, torch.Tensor] = {}
    if fmt_name == "pack-quantized":
        if fmt.bits == 4:  # our rows: code k at bits [4k, 4k+4) of the row's byte stream = CT's dense int32 packing
            codes = module.qweight.contiguous()
        else:  # int8 codes in [-127, 127] -> unsigned bytes (code + 128), four per int32
            codes = (module.qweight.to(torch.int16) + 128).to(torch.uint8).contiguous()
        out["weight_packed"] = codes.view(torch.int32).reshape(n, -1)
        out["weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
        out["weight_scale"] = scale if fmt.group_size else scale.reshape(n, 1)
        if fmt.has_zero_points:  # ours: uint8 in [0, 15]; CT: signed, packed along N (8 per int32)
            out["weight_zero_point"] = _pack_rows(module.zero)
    else:  # int-quantized / float-quantized: codes as they are
        out["weight"] = module.qweight
        out["weight_scale"] = scale.reshape(n, 1)
    if module.bias is not None:
        out["bias"] = module.bias.detach()
    return out


def _pack_rows(zero: torch.Tensor) -> torch.Tensor:
    """Zero points [N, G] in [0, 15] -> compressed-tensors' packing along N: int32 [ceil(N/8), G],
    entry i of a column at bits [4 (i mod 8), 4 (i mod 8) + 4) of word i // 8 (stored + 8 - 8: as is)."""
    n, g = zero.shape
    padded = torch.zeros((n + 7) // 8 * 8, g, dtype=torch.int64)
    padded[:n] = zero.to(torch.int64)
    words = torch.zeros(padded.shape[0] // 8, g, dtype=torch.int64)
    for i in range(8):
        words |= padded[i::8] << (4 * i)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def _float_skeleton(model: Any) -> dict[str, torch.Tensor]:
    """The float architecture's state dict (meta tensors): the names and shapes a loader expects."""
    config = model.config.__class__.from_dict({k: v for k, v in model.config.to_dict().items()
                                               if k != "quantization_config"})
    with torch.device("meta"):
        skeleton = type(model)(config)
    return skeleton.state_dict()


def export_compressed_tensors(model: Any, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Write ``model`` (compressed by ``compress`` or loaded from a lowbit checkpoint) as a
    compressed-tensors checkpoint in ``out_dir``; returns a report (layers per scheme, ignore
    list, bytes). Raises :class:`LowbitError` listing every layer or tensor that cannot be
    expressed, before writing anything."""
    from safetensors.torch import save_file

    from lowbit_compiler.offline import (FoldedRMSNorm, GraphRMSNorm, LowbitExperts, LowbitLinear, RSparseLinear,
                                         input_transforms_of)

    if not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        raise LowbitError(f"export compressed-tensors: {type(model).__name__} is not a transformers model; "
                          "compressed-tensors checkpoints are loaded by transformers/vLLM from a model config")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    refused: list[str] = []
    if str(getattr(model.config, "_attn_implementation", "")).startswith("lowbit_r3_"):
        refused.append("attention: R3 Hadamards on queries and keys run online; compressed-tensors has no place for them")
    state = model.state_dict()
    skeleton = _float_skeleton(model)
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, Any]] = {}  # json(scheme) -> {format, scheme, targets}
    float_linears: list[str] = []
    sparse_targets: dict[str, list[str]] = {}  # N:M pattern -> layers stored dense with zeros
    owned: set[str] = set()
    for fqn, module in model.named_modules():
        prefix = f"{fqn}." if fqn else ""
        if isinstance(module, LowbitExperts):
            owned.update(prefix + name for name, _ in module.named_buffers(recurse=False))
            refused.append(f"{fqn}: quantized stacked MoE experts (lowbit::grouped_linear); this exporter does not "
                           "write compressed-tensors' expert layout yet")
        elif isinstance(module, LowbitLinear):
            owned.update(prefix + name for name, _ in module.named_buffers(recurse=False))
            owned.update(prefix + name for name, _ in module.named_parameters(recurse=False))
            found = scheme_of(module)
            if isinstance(found, str):
                refused.append(f"{fqn}: {found}")
                continue
            fmt_name, scheme = found
            pattern = getattr(dense_view(module), "sparsity", None)
            if pattern is not None:
                sparse_targets.setdefault(pattern, []).append(fqn)
            key = json.dumps([fmt_name, scheme], sort_keys=True)
            groups.setdefault(key, {"format": fmt_name, "scheme": scheme, "targets": []})["targets"].append(fqn)
            for name, t in _tensors(module, fmt_name, dtype).items():
                tensors[prefix + name] = t.contiguous()
            if module.bias is not None and prefix + "bias" not in skeleton:
                refused.append(f"{fqn}.bias: created by folding; {type(model).__name__}'s linear has no bias")
        elif isinstance(module, FoldedRMSNorm):
            expected = skeleton.get(prefix + "weight")
            if expected is None:
                refused.append(f"{fqn}: a folded norm without a weight in the float architecture")
                continue
            tensors[prefix + "weight"] = torch.ones(expected.shape, dtype=expected.dtype)
            if prefix + "bias" in skeleton:
                tensors[prefix + "bias"] = torch.zeros(skeleton[prefix + "bias"].shape, dtype=expected.dtype)
        elif isinstance(module, RSparseLinear):
            refused.append(f"{fqn}: R-Sparse (a threshold on its input and a low-rank part beside the float matmul); "
                           "compressed-tensors has no place for them")
        elif input_transforms_of(module) is not None:
            refused.append(f"{fqn}: online input transforms (R4 / FlatQuant / an activation-sparsity threshold) in "
                           "front of a float linear")
        elif hasattr(module, "lowbit_output_threshold"):
            refused.append(f"{fqn}: CATS thresholds this activation's output online; compressed-tensors has no place "
                           "for it")
        elif isinstance(module, torch.nn.Linear) and not isinstance(module, GraphRMSNorm):
            float_linears.append(fqn)
    for key, t in state.items():
        if key in owned or key in tensors or key.rsplit(".", 1)[-1].startswith("lowbit_"):
            continue
        if key not in skeleton:
            refused.append(f"{key}: the float architecture has no such tensor (written by a rotation's folding)")
            continue
        tensors[key] = t.detach().contiguous()
    if refused:
        raise LowbitError("export compressed-tensors: refused, nothing written:\n  " + "\n  ".join(refused)
                          + "\nuse a recipe without online transforms (e.g. w4a16, w8a16, w8a8, fp8, rotate's R1/R2 "
                            "only) or serve with lowbit (save_pretrained)")
    if not groups:
        raise LowbitError("export compressed-tensors: no layer of the model is quantized; a float (or only "
                          "rotated) model needs no quantization_config: save it with save_pretrained")
    formats = sorted({g["format"] for g in groups.values()})
    config_groups = {}
    for i, g in enumerate(groups.values()):
        config_groups[f"group_{i}"] = {"targets": sorted(g["targets"]), **g["scheme"], "output_activations": None,
                                       "format": g["format"] if len(formats) > 1 else None}
    quantization_config = {
        "quant_method": "compressed-tensors", "format": formats[0] if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed", "config_groups": config_groups, "ignore": sorted(float_linears),
        "kv_cache_scheme": None, "global_compression_ratio": None}
    if sparse_targets:  # compressed-tensors' sparsity config: the zeros are in the dense tensors
        if len(sparse_targets) > 1:
            raise LowbitError(f"export compressed-tensors: layers use several N:M patterns {sorted(sparse_targets)}; "
                              "a compressed-tensors sparsity config has one")
        (pattern, targets), = sparse_targets.items()
        quantization_config["sparsity_config"] = {"format": "dense", "sparsity_structure": pattern,
                                                  "targets": sorted(targets), "ignore": sorted(float_linears),
                                                  "global_sparsity": None}
    os.makedirs(out_dir, exist_ok=True)
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if outputs is not None and getattr(outputs, "weight", None) is not getattr(inputs, "weight", None):
        config["tie_word_embeddings"] = False
    # tied embeddings: one tensor under the embedding's name (as transformers writes them)
    if config.get("tie_word_embeddings") and outputs is not None:
        for key in [k for k in tensors if k.startswith(_fqn_of(model, outputs) + ".")]:
            del tensors[key]
    config.pop("_attn_implementation_autoset", None)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, default=str)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    size = os.path.getsize(os.path.join(out_dir, "model.safetensors"))
    return {"format": quantization_config["format"],
            "groups": {name: {"format": g["format"] or quantization_config["format"], "layers": len(g["targets"]),
                              "weights": g["weights"], "input_activations": g["input_activations"]}
                       for name, g in config_groups.items()},
            "ignore": quantization_config["ignore"], "bytes": size}


def _fqn_of(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)

