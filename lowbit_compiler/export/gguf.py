"""Export a compressed Llama-family model to GGUF, the file format of llama.cpp.

``export_gguf(model, "model.gguf", weight_type="auto")`` writes the tensors and metadata as
llama.cpp's ``convert_hf_to_gguf.py`` writes them for its ``llama`` architecture (Llama, Mistral)
and ``qwen2`` architecture (Qwen2: q/k/v biases, no permutation): names from the ``gguf``
package's ``TensorNameMap``; for ``llama``, Q and K rows permuted as its ``LlamaModel.permute`` does;
and returns a report: per tensor its GGUF type, whether its values are *exactly* ours, and what
was left out and why. See ``docs/export.md`` ("GGUF (llama.cpp)").

Exact where the GGUF type can hold our codes and scales (every exact tensor is decoded back with
``gguf.quants.dequantize`` during the export and compared bit for bit with
``formats.dequantize_parts``; a mismatch raises):

========================= ============ ==========================================================
our format                GGUF type    how
========================= ============ ==========================================================
int8 (per channel)        Q8_0         d = the row scale (fp16) in every block of 32, same codes
intB_gG_sym, B = 2, 3, 4  Q4_0         d = the group scale, code + 8 - 2^(B-1) (Q4_0: (q - 8) d)
intB_gG_asym              Q4_1         d = s, m = -z s: exact only when every m is an fp16 number
intB_gG_asym (else)       Q5_1         d = s, m = -16 s, codes q - z + 16 in [1, 31]: always exact
any intB                  Q8_0         codes q - z, d = s (when asked for q8_0)
mxfp4                     MXFP4        the same e8m0 exponent byte and e2m1 codes
========================= ============ ==========================================================

(any group size that is a multiple of 32: a group spans whole GGUF blocks, which repeat its scale;
a bf16 scale must also be an fp16 number, true unless it is below 2^-14 with low bits set.)
Everything else (nf4, fp8_e4m3, nvfp4, or a type asked for that cannot hold the codes) is
re-quantized from our dequantized weight, reported as lossy with its SQNR against our weight, and
refused under ``strict=True``. Float tensors: norms F32 (as convert_hf_to_gguf), embeddings and
unquantized linears F32 (``float_type="f16"`` halves them, reported exact or not).

Refused, naming the layer (llama.cpp has no op for them): online input Hadamards / sign vectors
(R4), FlatQuant's Kronecker transforms, R3 on queries and keys, SpQR's sparse outliers. Activation
quantization (W8A8, W4A4, static scales) is not carried by GGUF: the weights export and the report
lists every layer whose activation scheme was dropped (``strict=True`` refuses instead).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from lowbit_compiler import formats
from lowbit_compiler.formats import WeightFormat
from lowbit_compiler.pass_base import LowbitError

QK = 32  # elements per block of Q8_0 / Q4_0 / Q4_1 / MXFP4
WEIGHT_TYPES = ("auto", "q8_0", "q4_0", "q4_1", "q5_1", "mxfp4", "q6_k", "f16", "f32")
FLOAT_TYPES = ("f32", "f16")

# model_type -> llama.cpp architecture (convert_hf_to_gguf registers MistralForCausalLM as LlamaModel);
# only 'llama' permutes Q/K rows: llama.cpp runs qwen2 with NeoX-style RoPE, Hugging Face's own pairing
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_NOT_SUPPORTED = {
    "qwen3": "llama.cpp's 'qwen3' architecture (per-head q/k norms) is not implemented by this exporter",
    "mixtral": "mixture-of-experts tensors (merged expert stacks) are not implemented by this exporter",
    "gemma": "Gemma's norm offset (1 + w) and embedding scaling map to llama.cpp's 'gemma' architecture, not "
             "implemented by this exporter",
    "phi3": "Phi-3's fused qkv / gate_up projections map to llama.cpp's 'phi3' architecture, not implemented here",
}


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - the export extra is installed by `make test`
        raise LowbitError("GGUF export needs the `gguf` package: pip install 'lowbit-compiler[export]' "
                          "(gguf==0.19.0)") from e
    return gguf


# ---------------------------------------------------------------------------------------------
# Block encoders (numpy, little-endian: GGUF's default byte order)
# ---------------------------------------------------------------------------------------------

def _fp16_exact(x: torch.Tensor) -> bool:
    """Every value of ``x`` is an fp16 number (finite, no bits lost)."""
    x32 = x.float()
    return bool(torch.equal(x32.half().float(), x32))


def _f16_bytes(x: torch.Tensor) -> np.ndarray:
    """[N, B] values -> [N, B, 2] little-endian fp16 bytes."""
    n, b = x.shape
    return x.float().half().numpy().astype("<f2").view(np.uint8).reshape(n, b, 2)


def _nibbles(q: torch.Tensor) -> np.ndarray:
    """[N, K] codes in [0, 15] -> [N, K/32, 16] bytes: byte j = code j | code j+16 << 4 (ggml's
    block layout; ours packs even/odd k instead)."""
    n, k = q.shape
    qb = q.to(torch.uint8).numpy().reshape(n, k // QK, QK)
    return qb[..., :QK // 2] | (qb[..., QK // 2:] << np.uint8(4))


def encode_q8_0(codes: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """codes int [N, K] in [-128, 127], d [N, K/32] (fp16 numbers) -> Q8_0 bytes [N, K/32*34]."""
    n, k = codes.shape
    out = np.empty((n, k // QK, 34), np.uint8)
    out[..., :2] = _f16_bytes(d)
    out[..., 2:] = codes.to(torch.int8).numpy().view(np.uint8).reshape(n, k // QK, QK)
    return out.reshape(n, -1)


def encode_q4_0(q: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """codes [N, K] in [0, 15] (value (q - 8) d), d [N, K/32] -> Q4_0 bytes [N, K/32*18]."""
    n, k = q.shape
    out = np.empty((n, k // QK, 18), np.uint8)
    out[..., :2] = _f16_bytes(d)
    out[..., 2:] = _nibbles(q)
    return out.reshape(n, -1)


def encode_q4_1(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> np.ndarray:
    """codes [N, K] in [0, 15] (value q d + m), d and m [N, K/32] -> Q4_1 bytes [N, K/32*20]."""
    n, k = q.shape
    out = np.empty((n, k // QK, 20), np.uint8)
    out[..., :2] = _f16_bytes(d)
    out[..., 2:4] = _f16_bytes(m)
    out[..., 4:] = _nibbles(q)
    return out.reshape(n, -1)


def encode_q5_1(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> np.ndarray:
    """codes [N, K] in [0, 31] (value q d + m), d and m [N, K/32] -> Q5_1 bytes [N, K/32*24]: d, m,
    qh (bit j = the fifth bit of code j, little-endian uint32), then the low nibbles as Q4_1."""
    n, k = q.shape
    out = np.empty((n, k // QK, 24), np.uint8)
    out[..., :2] = _f16_bytes(d)
    out[..., 2:4] = _f16_bytes(m)
    qb = q.to(torch.uint8).numpy().reshape(n, k // QK, QK)
    out[..., 4:8] = np.packbits(qb >> np.uint8(4), axis=-1, bitorder="little")
    out[..., 8:] = _nibbles(torch.from_numpy(qb.reshape(n, k) & np.uint8(15)))
    return out.reshape(n, -1)


def encode_mxfp4(q: torch.Tensor, e: torch.Tensor) -> np.ndarray:
    """e2m1 codes [N, K] (sign bit 3), e8m0 exponents uint8 [N, K/32] -> MXFP4 bytes [N, K/32*17]."""
    n, k = q.shape
    out = np.empty((n, k // QK, 17), np.uint8)
    out[..., 0] = e.to(torch.uint8).numpy()
    out[..., 1:] = _nibbles(q)
    return out.reshape(n, -1)


# ---------------------------------------------------------------------------------------------
# Q6_K: gguf 0.19 ships no K-quant quantizer (only their dequantizers), so this is ours
# ---------------------------------------------------------------------------------------------

QK_K = 256


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """Round-to-nearest Q6_K of a float32 [N, K] array (K a multiple of 256) -> bytes [N, K/256*210].

    Q6_K (ggml's ``block_q6_K``): per 256 weights an fp16 super-scale ``d``, 16 int8 sub-scales (one
    per 16 weights) and 6-bit codes ``q`` with value ``d * sc * (q - 32)``; bytes ``ql[128]`` (low 4
    bits), ``qh[64]`` (high 2 bits), ``scales[16]``, ``d``. Our scale choice: each sub-block's
    signed extreme / -32 (ggml's choice: the largest weight is code -32; wider when the other
    side would pass +31.5), sub-scales rounded away from zero to int8 against d = max / 127, so
    no code is clipped: every weight is within half a step.
    Not ggml's search-based ``quantize_row_q6_K`` (so not bit-identical to llama-quantize's
    output), but exactly what ``gguf.quants.dequantize`` (and llama.cpp) decode.
    """
    n, k = w.shape
    nb = n * (k // QK_K)
    x = w.astype(np.float32).reshape(nb, 16, 16)
    # signed sub-block scales, as ggml's make_qx_quants: the largest-magnitude weight maps to -32; widened
    # where the other side would round past +31 (it only reaches +31.5 before clipping)
    imax = np.abs(x).argmax(-1)[..., None]
    xmax = np.take_along_axis(x, imax, -1)  # [nb, 16, 1]
    opposite = np.where(np.sign(x) == -np.sign(xmax), np.abs(x), 0).max(-1)
    sub = -np.sign(xmax[..., 0]) * np.maximum(np.abs(xmax[..., 0]) / 32.0, opposite / 31.5)  # [nb, 16]
    dmax = np.abs(sub).max(-1, keepdims=True)
    d = (dmax / 127.0).astype(np.float16)
    d = np.where(d.astype(np.float32) * 127.0 < dmax, np.nextafter(d, np.float16(np.inf)), d)  # no sub-scale > 127
    d32 = d.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        # sub-scales rounded away from zero: |d sc| >= |sub|, so no code is clipped
        sc = np.where(d32 > 0, np.sign(sub) * np.ceil(np.abs(sub) / d32), 0).clip(-127, 127).astype(np.int8)
        eff = d32 * sc.astype(np.float32)  # the scale the decoder uses, per sub-block
        q = np.where(eff[..., None] != 0, np.rint(x / eff[..., None]), 0)
    q = (q.clip(-32, 31) + 32).astype(np.uint8).reshape(nb, QK_K)
    # layout (dequantize_row_q6_K): two halves of 128; in each, l in [0, 32):
    #   q[l]      = ql[l] & 15      | (qh[l] & 3) << 4
    #   q[l + 32] = ql[l + 32] & 15 | (qh[l] >> 2 & 3) << 4
    #   q[l + 64] = ql[l] >> 4      | (qh[l] >> 4 & 3) << 4
    #   q[l + 96] = ql[l + 32] >> 4 | (qh[l] >> 6 & 3) << 4
    h = q.reshape(nb, 2, 4, 32)
    lo, hi = h & 15, h >> 4
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=-1)  # [nb,2,64]
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # [nb, 2, 32]
    out = np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8).reshape(nb, 16),
                          d.astype("<f2").view(np.uint8).reshape(nb, 2)], axis=-1)
    return out.reshape(n, -1)


# ---------------------------------------------------------------------------------------------
# One quantized linear -> one GGUF tensor
# ---------------------------------------------------------------------------------------------

def _permute_rows(t: torch.Tensor | None, n_head: int) -> torch.Tensor | None:
    """convert_hf_to_gguf's ``LlamaModel.permute``: within each head, rows (2, d/2) -> (d/2, 2),
    so llama.cpp's interleaved RoPE sees HF's rotate-half pairs. A row permutation: codes, scales
    and zero points of a row move together."""
    if t is None:
        return None
    rows = t.shape[0]
    return t.reshape(n_head, 2, rows // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape).contiguous()


def _block_values(x: torch.Tensor, fmt: WeightFormat, k: int) -> torch.Tensor:
    """A per-row [N] or per-group [N, Kp/G] tensor -> its value for every block of 32: [N, K/32]."""
    if x.dim() == 1:
        return x[:, None].expand(-1, k // QK)
    return x.repeat_interleave(fmt.group_size // QK, dim=1)[:, :k // QK]


def _exact_encoding(fmt: WeightFormat, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                    k: int, target: str, gguf) -> tuple[Any, np.ndarray, str] | str:
    """(GGML type, bytes, note) holding our codes and scales as they are, or the reason there is none."""
    T = gguf.GGMLQuantizationType
    if k % QK:
        return f"K={k} is not a multiple of {QK}"
    if fmt.group_size is not None and fmt.group_size % QK:
        return f"group size {fmt.group_size} does not span whole blocks of {QK}"
    if fmt.kind == "mxfp4":
        if target not in ("auto", "mxfp4"):
            return f"{fmt.key} codes are e2m1: only GGUF's MXFP4 holds them exactly"
        codes = formats.unpack_int4(qweight)[:, :k]
        return T.MXFP4, encode_mxfp4(codes, scale[:, :k // QK]), "same codes and exponents"
    if fmt.kind != "int":
        return f"GGUF has no type with {fmt.key}'s value grid"
    if fmt.bits == 8 and target not in ("auto", "q8_0"):
        return f"int8 codes need 8 bits: only Q8_0 holds them exactly (asked for {target})"
    s = _block_values(scale, fmt, k)
    if fmt.bits == 8:
        signed = qweight[:, :k].to(torch.int16)
    else:
        q = (formats.unpack_int4(qweight) if fmt.bits == 4 else formats.unpack_codes(qweight, fmt.bits))[:, :k]
        half = 2 ** (fmt.bits - 1)
        z = torch.full_like(s, half, dtype=torch.float32) if zero is None else _block_values(zero, fmt, k).float()
        signed = q.to(torch.int16) - z.repeat_interleave(QK, dim=1).to(torch.int16)  # q - z in [-15, 15]
    # a block whose codes are all zero decodes to 0 whatever its scale (an all-zero group gets the
    # quantizer's 1e-12, no fp16 number): write d = 0 there
    empty = (signed.view(signed.shape[0], -1, QK) == 0).all(-1)
    s = torch.where(empty, torch.zeros((), dtype=s.dtype), s)
    if not _fp16_exact(s):
        bad = int((s.float().half().float() != s.float()).sum())
        return f"{bad} {fmt.key} block scales are not fp16 numbers (GGUF block scales are fp16)"
    if fmt.bits == 8:
        return T.Q8_0, encode_q8_0(signed, s), "same codes, d = the row scale"
    if target == "q8_0":
        return T.Q8_0, encode_q8_0(signed, s), f"codes q - z, d = the group scale ({fmt.bits}-bit codes in 8 bits)"
    if fmt.symmetric:
        if target not in ("auto", "q4_0"):
            return f"{fmt.key} is symmetric: Q4_0 or Q8_0 hold it exactly (asked for {target})"
        return T.Q4_0, encode_q4_0((signed + 8).to(torch.uint8), s), "d = the group scale, codes (q - z) + 8"
    if target not in ("auto", "q4_1", "q5_1"):
        return f"{fmt.key} is asymmetric: Q4_1 (when -z*s is an fp16 number), Q5_1 or Q8_0 hold it exactly " \
               f"(asked for {target})"
    m = -(z * s.float())  # exact in float32: a 4-bit integer times an 8-bit bf16 significand
    if target != "q5_1" and _fp16_exact(m):
        return T.Q4_1, encode_q4_1(q, s, m), "d = s, m = -z s, same codes"
    bad = int((m.half().float() != m).sum())
    if target == "q4_1":
        return f"{bad} of {m.numel()} blocks have an offset -z*s that is not an fp16 number"
    # Q5_1 with codes q - z + 16 in [1, 31] and m = -16 s (an fp16 number whenever s is): always exact
    why = "asked for q5_1" if target == "q5_1" else \
        f"{bad} of {m.numel()} blocks' Q4_1 offset -z*s is not an fp16 number"
    return (T.Q5_1, encode_q5_1((signed + 16).to(torch.uint8), s, -16 * s.float()),
            f"Q5_1: codes q - z + 16, m = -16 s ({why})")


def _requantize(w: np.ndarray, target: str, gguf) -> tuple[Any, np.ndarray]:
    T = gguf.GGMLQuantizationType
    qtype = {"auto": T.Q8_0, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1, "q5_1": T.Q5_1, "mxfp4": T.MXFP4,
             "q6_k": T.Q6_K, "f16": T.F16, "f32": T.F32}[target]
    if qtype == T.Q6_K:
        return qtype, quantize_q6_k(w)
    return qtype, gguf.quants.quantize(w, qtype)


def _encode_linear(fmt: WeightFormat, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   ref: np.ndarray, target: str, gguf) -> tuple[Any, np.ndarray, dict[str, Any]]:
    """(GGML type, bytes, report entry) for one quantized weight whose dequantized value is ``ref``."""
    T = gguf.GGMLQuantizationType
    k = ref.shape[1]
    why = f"asked for {target}"
    if target not in ("f16", "f32", "q6_k"):
        exact = _exact_encoding(fmt, qweight, scale, zero, k, target, gguf)
        if isinstance(exact, tuple):
            return exact[0], exact[1], {"how": "exact", "note": exact[2]}
        why = exact
    if target == "f32":
        return T.F32, ref.astype(np.float32), {"how": "float", "note": "our dequantized weight in float32"}
    block = gguf.GGML_QUANT_SIZES[{"auto": T.Q8_0, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1,
                                   "q5_1": T.Q5_1, "mxfp4": T.MXFP4, "q6_k": T.Q6_K, "f16": T.F16}[target]][0]
    if k % block:
        if k % QK == 0:  # Q6_K on a K that is not a multiple of 256: what convert_hf_to_gguf does, Q8_0
            qtype, data, entry = _encode_linear(fmt, qweight, scale, zero, ref, "auto", gguf)
            entry["note"] = f"K={k} is not a multiple of {target}'s block of {block}; " + entry["note"]
            return qtype, data, entry
        return T.F32, ref.astype(np.float32), {"how": "float", "note": f"K={k} is not a multiple of {QK}: float32"}
    qtype, data = _requantize(ref, target, gguf)
    return qtype, data, {"how": "requantized", "note": f"re-quantized from our dequantized weight ({why})"}


def _sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    err = float(np.sum((ref.astype(np.float64) - got.astype(np.float64)) ** 2))
    sig = float(np.sum(ref.astype(np.float64) ** 2))
    return float("inf") if err == 0 else 10.0 * np.log10(sig / err) if sig > 0 else float("-inf")


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

def _hparams(config) -> dict[str, Any]:
    model_type = getattr(config, "model_type", None)
    n_head = config.num_attention_heads
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // n_head
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise LowbitError(f"GGUF export: RoPE scaling {rope_type!r} is not exported (llama3/yarn/longrope need "
                          "llama.cpp's rope factors); supported: default and linear")
    if float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise LowbitError("GGUF export: partial rotary embeddings are not exported for the llama architecture")
    if model_type == "mistral" and getattr(config, "sliding_window", None) is not None \
            and config.sliding_window < config.max_position_embeddings:
        raise LowbitError(f"GGUF export: this Mistral attends through a sliding window of {config.sliding_window} "
                          f"< max_position_embeddings={config.max_position_embeddings}; llama.cpp's llama "
                          "architecture attends to the whole context. Set config.sliding_window = None if the "
                          "model never runs past the window")
    if model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        raise LowbitError("GGUF export: this Qwen2 uses sliding-window attention (use_sliding_window=True); "
                          "llama.cpp's qwen2 architecture attends to the whole context")
    return {"n_layer": config.num_hidden_layers, "n_ctx": config.max_position_embeddings, "n_embd": hidden,
            "n_ff": config.intermediate_size, "n_head": n_head,
            "n_head_kv": getattr(config, "num_key_value_heads", None) or n_head, "rope_theta": float(theta),
            "rms_eps": float(config.rms_norm_eps), "n_vocab": config.vocab_size, "head_dim": head_dim,
            "rope_linear": float(rope["factor"]) if rope_type == "linear" else None}


def _refusals(name: str, module: torch.nn.Module) -> list[str]:
    from lowbit_compiler.offline import LowbitLinear, RSparseLinear, input_transforms_of

    why = []
    if isinstance(module, LowbitLinear):
        if module.input_hadamard:
            why.append("an online Hadamard on its input (R4): llama.cpp has no such op")
        if module.input_signs is not None:
            why.append("an online sign vector on its input (R4)")
        if module.transform_left is not None:
            why.append("FlatQuant's online Kronecker transform on its input")
        if module.outlier_values is not None:
            why.append(f"{module.outlier_values.numel()} SpQR fp16 outliers beside the dense weight (GGUF has no "
                       "sparse add)")
        if module.input_threshold is not None:
            why.append("an activation-sparsity threshold on its input (TEAL/WINA): llama.cpp has no such op")
        if module.lowrank_left is not None:
            why.append("R-Sparse's low-rank part beside the matmul: llama.cpp has no such op")
    elif isinstance(module, RSparseLinear):
        why.append("R-Sparse (a threshold on its input and a low-rank part beside the float matmul): llama.cpp has "
                   "no such op")
    elif (t := input_transforms_of(module)) is not None and (t["input_hadamard"] or t["input_signs"] is not None
                                                             or t["input_transform"] is not None
                                                             or t["input_threshold"] is not None):
        why.append("online input transforms (Hadamard / signs / Kronecker / activation threshold) in a forward "
                   "pre-hook")
    elif hasattr(module, "lowbit_output_threshold"):
        why.append("CATS's threshold on this activation's output (a forward hook): llama.cpp has no such op")
    return [f"{name}: {w}" for w in why]


def export_gguf(model: torch.nn.Module, out_path: str | os.PathLike, weight_type: str = "auto", strict: bool = False,
                float_type: str = "f32", vocab: str | None = None) -> dict[str, Any]:
    """Write ``model`` (a Llama-family ``*ForCausalLM``, compressed or not) to a GGUF file for llama.cpp.

    Args:
        weight_type: GGUF type of the quantized linears: ``"auto"`` (per layer the type that holds
            its codes exactly, Q8_0 re-quantization where none does), or one of ``q8_0``, ``q4_0``,
            ``q4_1``, ``mxfp4``, ``q6_k``, ``f16``, ``f32`` (exact where that type holds our codes,
            else re-quantized from our dequantized weight and reported).
        strict: refuse (LowbitError) instead of re-quantizing or dropping activation quantization.
        float_type: ``"f32"`` (exact) or ``"f16"`` for the embeddings and unquantized linears; norms
            are always F32.
        vocab: None (no ``tokenizer.ggml.*`` metadata: GGUFReader does not need it, llama.cpp
            does) or ``"bytes"``: the byte-level vocabulary of this project's byte models (vocab
            256, token id = byte value), written as a SentencePiece-style vocabulary of the 256
            byte tokens ``<0x00>``..``<0xFF>``, which llama.cpp tokenizes text into byte by byte.

    Returns the report: ``tensors`` (GGUF name -> source, our format, GGUF type, ``exact``,
    ``how``, ``sqnr_db`` for lossy ones, ``note``), ``dropped`` (what the GGUF does not carry),
    ``hparams`` (what the metadata was written from), ``file_bytes``, ``tokenizer``. Raises
    LowbitError naming every refused layer.
    """
    from lowbit_compiler.offline import FoldedRMSNorm, GraphRMSNorm, LowbitLinear

    gguf = _gguf()
    if weight_type not in WEIGHT_TYPES:
        raise LowbitError(f"GGUF export: weight_type={weight_type!r}; expected one of {WEIGHT_TYPES}")
    if vocab not in (None, "bytes"):
        raise LowbitError(f"GGUF export: vocab={vocab!r}; expected None or 'bytes'")
    if float_type not in FLOAT_TYPES:
        raise LowbitError(f"GGUF export: float_type={float_type!r}; expected one of {FLOAT_TYPES}")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        reason = _NOT_SUPPORTED.get(model_type, "its tensors and metadata map to another llama.cpp architecture (or "
                                                "none), which this exporter does not implement")
        raise LowbitError(f"GGUF export supports Llama-family models (model_type {sorted(ARCHITECTURES)}, written as "
                          f"llama.cpp's 'llama' / 'qwen2' architectures); {type(model).__name__} (model_type "
                          f"{model_type!r}): {reason}")
    arch = ARCHITECTURES[model_type]
    hp = _hparams(config)
    T = gguf.GGMLQuantizationType
    if vocab == "bytes" and hp["n_vocab"] != 256:
        raise LowbitError(f"GGUF export: vocab='bytes' is for byte-level models (vocab_size 256); this model has "
                          f"vocab_size={hp['n_vocab']}: export without vocab and add its tokenizer with llama.cpp's "
                          "tools")

    refused = [r for name, module in model.named_modules() for r in _refusals(name, module)]
    if str(getattr(config, "_attn_implementation", "")).startswith("lowbit_r3_"):
        refused.append("attention: R3 Hadamards on queries and keys (online, inside attention): llama.cpp has no "
                       "such op")
    if refused:
        raise LowbitError("GGUF export refused: llama.cpp cannot compute\n  " + "\n  ".join(refused)
                          + "\nCompress without online transforms (e.g. w4a16, w8a16, or rotate without r3/r4) to "
                            "export to GGUF")

    tmap = gguf.get_tensor_name_map({"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[arch],
                                    hp["n_layer"])
    state_keys = set(model.state_dict())
    consumed: set[str] = set()
    tensors: dict[str, dict[str, Any]] = {}
    payload: list[tuple[str, np.ndarray, Any]] = []
    dropped: list[dict[str, str]] = []

    def gguf_name(fqn: str, suffix: str) -> str:
        name = tmap.get_name(f"{fqn}.{suffix}", try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LowbitError(f"GGUF export: {fqn}.{suffix} has no llama.cpp {arch!r} tensor name (TensorNameMap); "
                              "the model has a module this exporter does not know")
        return name

    def n_head_of(fqn: str) -> int | None:
        """Heads whose rows convert_hf_to_gguf permutes (llama only), None: rows as they are."""
        if arch != "llama":
            return None
        if fqn.endswith("q_proj"):
            return hp["n_head"]
        if fqn.endswith("k_proj"):
            return hp["n_head_kv"]
        return None

    def add(name: str, data: np.ndarray, qtype, entry: dict[str, Any], ref: np.ndarray) -> None:
        """Decode what we write with gguf's own dequantizer and compare it with our values."""
        got = gguf.quants.dequantize(data, qtype).reshape(ref.shape)
        exact = bool(np.array_equal(got, ref))
        if not exact and (entry["how"] == "exact" or qtype == T.F32):
            raise LowbitError(f"GGUF export: {name} ({entry['source']}) should decode exactly to our weights as "
                              f"{qtype.name} but does not (bug in the exporter)")
        entry.update(gguf_type=qtype.name, exact=exact, shape=list(ref.shape),
                     sqnr_db=None if exact else round(_sqnr_db(ref, got), 2))
        if strict and not exact:
            raise LowbitError(f"GGUF export (strict): {name} ({entry['source']}, {entry['format']}) would be stored "
                              f"as {qtype.name}, not exactly our weights ({entry['note']}; SQNR "
                              f"{entry['sqnr_db']} dB); pass strict=False to accept it, or "
                              + ("float_type='f32'" if entry["how"] == "float" else "weight_type='auto'"))
        tensors[name] = entry
        payload.append((name, data, qtype))

    def add_float(name: str, source: str, t: torch.Tensor, one_d: bool, fmt: str = "float") -> None:
        ref = t.detach().float().cpu().numpy()
        qtype = T.F32 if one_d or float_type == "f32" else T.F16
        data = ref.astype(np.float32 if qtype == T.F32 else np.float16)
        add(name, data, qtype, {"source": source, "format": fmt, "how": "float", "note": "float tensor"}, ref)

    for fqn, module in model.named_modules():
        if isinstance(module, LowbitLinear):
            name = gguf_name(fqn, "weight")
            fmt = WeightFormat.parse(module.fmt)
            k = module.in_features
            nh = n_head_of(fqn)
            qweight, scale, zero = module.qweight, module.scale, module.zero
            ref_t = formats.dequantize_parts(fmt, qweight, scale, zero)[:, :k].cpu()
            if nh is not None:
                qweight, scale, zero, ref_t = (_permute_rows(t, nh) for t in (qweight, scale, zero, ref_t))
            ref = ref_t.contiguous().numpy()
            qtype, data, entry = _encode_linear(fmt, qweight.cpu(), scale.cpu(), None if zero is None else zero.cpu(),
                                                ref, weight_type, gguf)
            entry = {"source": fqn, "format": fmt.key, **entry}
            add(name, data, qtype, entry, ref)
            for key in ("qweight", "scale", "zero", "x_scale"):
                consumed.add(f"{fqn}.{key}")
            if module.act:
                scheme = module.act + (" (static scale)" if module.x_scale is not None else " (dynamic)")
                dropped.append({"layer": fqn, "what": f"{scheme} activation quantization",
                                "why": "GGUF stores weights only; llama.cpp picks its own activation precision"})
            if module.bias is not None:
                bias = module.bias if nh is None else _permute_rows(module.bias, nh)
                add_float(gguf_name(fqn, "bias"), f"{fqn}.bias", bias, True)
                consumed.add(f"{fqn}.bias")
        elif isinstance(module, torch.nn.Linear):
            nh = n_head_of(fqn)
            w = module.weight if nh is None else _permute_rows(module.weight, nh)
            add_float(gguf_name(fqn, "weight"), f"{fqn}.weight", w, False)
            consumed.add(f"{fqn}.weight")
            if module.bias is not None:
                b = module.bias if nh is None else _permute_rows(module.bias, nh)
                add_float(gguf_name(fqn, "bias"), f"{fqn}.bias", b, True)
                consumed.add(f"{fqn}.bias")
        elif isinstance(module, torch.nn.Embedding):
            add_float(gguf_name(fqn, "weight"), f"{fqn}.weight", module.weight, False)
            consumed.add(f"{fqn}.weight")
        elif isinstance(module, FoldedRMSNorm):
            add_float(gguf_name(fqn, "weight"), f"{fqn} (folded: all ones)", torch.ones(hp["n_embd"]), True,
                      "folded norm")
        elif isinstance(module, GraphRMSNorm):
            add_float(gguf_name(fqn, "weight"), f"{fqn}.weight + {module.offset}", module.weight + module.offset, True)
            consumed.add(f"{fqn}.weight")
        elif type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor):
            add_float(gguf_name(fqn, "weight"), f"{fqn}.weight", module.weight, True)
            consumed.add(f"{fqn}.weight")

    left = sorted(k for k in state_keys - consumed if not k.endswith("inv_freq"))
    if left:
        raise LowbitError(f"GGUF export: {len(left)} tensors of the model have no place in the GGUF: {left[:8]}"
                          f"{' ...' if len(left) > 8 else ''}")
    if strict and dropped:
        raise LowbitError("GGUF export (strict): activation quantization is not carried by GGUF: "
                          + "; ".join(f"{d['layer']} ({d['what']})" for d in dropped)
                          + "; pass strict=False to export the weights alone")

    counts: dict[str, int] = {}
    for fqn, entry in tensors.items():
        if entry["how"] != "float":
            counts[entry["gguf_type"]] = counts.get(entry["gguf_type"], 0) + 1
    main = max(counts, key=counts.get) if counts else "F32"
    file_type = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                 "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                 "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
                 "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1, "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K,
                 "MXFP4": gguf.LlamaFileType.MOSTLY_MXFP4_MOE}[main]

    out_path = os.fspath(out_path)
    writer = gguf.GGUFWriter(out_path, arch)
    # general.name: the checkpoint directory's name (as convert_hf_to_gguf), never a local path
    writer.add_name(os.path.basename(str(getattr(config, "_name_or_path", "")).rstrip("/\\")) or type(model).__name__)
    writer.add_block_count(hp["n_layer"])
    writer.add_context_length(hp["n_ctx"])
    writer.add_embedding_length(hp["n_embd"])
    writer.add_feed_forward_length(hp["n_ff"])
    writer.add_head_count(hp["n_head"])
    writer.add_head_count_kv(hp["n_head_kv"])
    writer.add_rope_freq_base(hp["rope_theta"])
    writer.add_layer_norm_rms_eps(hp["rms_eps"])
    writer.add_vocab_size(hp["n_vocab"])
    writer.add_rope_dimension_count(hp["head_dim"])
    writer.add_key_length(hp["head_dim"])
    writer.add_value_length(hp["head_dim"])
    if hp["rope_linear"] is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(hp["rope_linear"])
    if vocab == "bytes":  # token id = byte value; llama.cpp's SPM tokenizer falls back to byte tokens
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list([f"<0x{b:02X}>" for b in range(256)])
        writer.add_token_scores([0.0] * 256)
        writer.add_token_types([gguf.TokenType.BYTE] * 256)
        for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id)):
            if isinstance(getattr(config, key, None), int):
                add(getattr(config, key))
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)
        writer.add_add_space_prefix(False)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, data, qtype in payload:
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    return {"path": out_path, "architecture": arch, "weight_type": weight_type, "file_type": file_type.name,
            "file_bytes": os.path.getsize(out_path), "tensors": tensors, "dropped": dropped,
            "hparams": hp,  # what the llama.* / qwen2.* metadata keys were written from
            "tokenizer": "byte-level: 256 byte tokens <0x00>..<0xFF>, token id = byte value" if vocab == "bytes" else
                         "none written: llama.cpp needs tokenizer.ggml.* metadata to run the file (GGUFReader does "
                         "not); pass vocab='bytes' for a byte-level model, or add the tokenizer with llama.cpp's "
                         "tools"}
