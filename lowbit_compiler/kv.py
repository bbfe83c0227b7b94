"""KV-cache compression: formats, packing, the compressed cache and the attention that reads it.

A :class:`KVFormat` says how one layer's keys and values are stored:

* ``int`` (uniform, asymmetric, ``bits`` in 2..8) and ``fp8`` (e4m3 with one scale per group):
  per-token groups of ``group`` channels for keys and values alike;
* ``kivi`` (KIVI): keys per channel with groups of ``group`` *tokens*, values per token, and the
  ``window`` most recent tokens in full precision (tokens reach the packed store ``group`` at a time);
* ``kvquant`` (KVQuant): keys before RoPE, per channel (a centre and half-range per channel and KV
  head, calibrated), values per token; both as indices into a per-layer non-uniform codebook of
  ``2**bits`` levels fitted by Lloyd on calibration activations (:func:`fit_kvquant`); the
  ``outliers`` fraction of each token row kept exactly (fp16 value + uint8 index);
* ``gear`` (GEAR): uniform per-token codes of each row (its outliers, the same fraction, kept
  sparse and replaced by the row mean first), plus a rank-``rank`` approximation of what the codes
  miss, one per ``chunk`` tokens of a KV head (an SVD of the chunk's residual: fp16 factors, one
  ``rank``-vector per token and one ``rank x head_dim`` matrix per chunk); tokens wait in float
  until a chunk fills;
* ``sinks``: the first tokens of the sequence stay in the model's float dtype (attention sinks, as
  KVQuant keeps them).

Keys before RoPE (``key_rope="pre"``): transformers hands ``cache.update`` the keys after RoPE and
the ``position_ids`` (no cos/sin), so the layer undoes the rotation with the model's own rotary
embedding at those positions (:func:`rope_function`; exact for full-width rotate_half RoPE, the
models in :data:`ROTATE_HALF_MODELS`), packs the pre-RoPE keys with their positions (int32), and
rotates each dequantized block again at read time.

:class:`CompressedKVCache` (a transformers ``Cache`` of :class:`CompressedKVLayer`) stores only the
packed codes (``bits`` bits per element, packed 8 values into ``bits`` bytes), their fp16 scales and
zero points, the sink tokens and the float window. Its ``update`` returns a :class:`PackedKV` handle,
not tensors: the attention registered as ``"lowbit_kv"`` in transformers' ``AttentionInterface``
(:func:`packed_attention`) walks the packed store block by block (``BLOCK_TOKENS`` tokens),
dequantizes one block at a time and folds it into an online softmax, so no dequantized copy of the
whole cache exists at any step. :func:`install` puts both on a model (``compress(model, "kv4")``
calls it from the decisions the ``mark_kv_cache`` pass recorded).

Sliding-window layers get a full compressed layer; the mask applies the window. Decode on CUDA reads the packed cache in the generated Triton kernel
(``backends/kv_triton.py``), on CPU in the generated C kernel (``backends/kv_cpu.py``); both take
every scheme and Gemma-2's logit soft-capping. Under ``torch.compile(model, backend="lowbit")`` with a KV recipe the backend
installs all this on the compiled module from the first graph and has Dynamo trace that call again
(:func:`install_for_compiled_graph`; docs/kv_cache.md).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

import torch

from lowbit_compiler.pass_base import LowbitError

log = logging.getLogger("lowbit_compiler")

BLOCK_TOKENS = 256      # tokens dequantized at once by the attention (the unit of its online softmax)
ATTENTION_NAME = "lowbit_kv"  # the name registered in transformers' AttentionInterface
SCHEMES = ("int", "fp8", "kivi", "kvquant", "gear")
FP8_MAX = 448.0


@dataclasses.dataclass(frozen=True)
class KVFormat:
    """How one attention layer's cache is stored.

    Args:
        scheme: ``"int"`` (uniform per-token groups), ``"fp8"`` (e4m3, per-token group scales),
            ``"kivi"`` (keys per channel with groups along tokens, values per token), ``"kvquant"``
            (KVQuant: per-layer non-uniform codebooks, keys per channel with calibrated centres and
            scales, values per token, sparse outliers; needs :attr:`params`) or ``"gear"`` (GEAR:
            uniform per-token codes + a low-rank approximation of the residual per ``chunk`` tokens
            + sparse outliers).
        bits: code width (2..8 for int/kivi/kvquant/gear; 8 for fp8).
        group: channels per scale for per-token groups (capped at the head size); tokens per scale
            for KIVI's per-channel keys.
        window: recent tokens kept in float (KIVI's residual).
        sinks: first tokens kept in float (attention sinks).
        outliers: fraction of each token row (per KV head) kept exactly as fp16 value + uint8 index
            (dense-and-sparse; at least one per row when > 0). kvquant and gear only.
        rank: GEAR's rank of the residual's approximation per chunk.
        chunk: GEAR's tokens per low-rank chunk (tokens wait in float until a chunk fills).
        key_rope: ``"post"``: keys stored as the cache receives them (after RoPE, or models without
            it); ``"pre"``: keys stored before RoPE (the cache undoes the rotation with the model's
            rotary embedding and redoes it on the dequantized keys at read time; kvquant only).
        params: a :class:`KVQuantParams` (calibrated codebooks and key channel scales), per layer.
    """

    scheme: str = "int"
    bits: int = 4
    group: int = 64
    window: int = 0
    sinks: int = 0
    outliers: float = 0.0
    rank: int = 0
    chunk: int = 64
    key_rope: str = "post"
    params: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise LowbitError(f"KV format: scheme {self.scheme!r}; expected one of {SCHEMES}")
        if self.scheme == "fp8" and self.bits != 8:
            raise LowbitError(f"KV format: fp8 stores 8 bits per element, got bits={self.bits}")
        if not 2 <= self.bits <= 8:
            raise LowbitError(f"KV format: bits={self.bits}; KV codes take 2..8 bits")
        if self.group < 1 or self.window < 0 or self.sinks < 0:
            raise LowbitError(f"KV format: group={self.group}, window={self.window}, sinks={self.sinks} must be >= 0 "
                              "(group >= 1)")
        if not 0.0 <= self.outliers < 0.5 or (self.outliers and self.scheme not in ("kvquant", "gear")):
            raise LowbitError(f"KV format: outliers={self.outliers}; a fraction in [0, 0.5), for kvquant and gear only")
        if self.rank < 0 or (self.rank and self.scheme != "gear") or self.chunk < 1:
            raise LowbitError(f"KV format: rank={self.rank}, chunk={self.chunk}; rank is GEAR's (>= 0), chunk >= 1")
        if self.key_rope not in ("post", "pre") or (self.key_rope == "pre" and self.scheme != "kvquant"):
            raise LowbitError(f"KV format: key_rope={self.key_rope!r}; 'post', or 'pre' for kvquant")

    @property
    def keys(self) -> str:
        """Where key scales run: ``"per_token"`` groups of channels, or ``"per_channel"`` (KIVI: groups
        of tokens; KVQuant: one calibrated centre and scale per channel)."""
        return "per_channel" if self.scheme in ("kivi", "kvquant") else "per_token"

    @property
    def token_block(self) -> int:
        """Tokens that enter the packed store together (KIVI's key groups, GEAR's chunks; 1 otherwise)."""
        return self.group if self.scheme == "kivi" else (self.chunk if self.scheme == "gear" else 1)

    def channel_group(self, head_dim: int) -> int:
        """Channels per per-token scale: ``group``, capped at the head size (which it must divide)."""
        g = min(self.group, head_dim)
        if head_dim % g:
            raise LowbitError(f"KV format {self.key}: head size {head_dim} is not a multiple of group={g}; "
                              f"use a group that divides {head_dim}")
        return g

    def n_outliers(self, head_dim: int) -> int:
        """Sparse outliers per token row of one KV head."""
        return max(1, round(self.outliers * head_dim)) if self.outliers else 0

    @property
    def key(self) -> str:
        parts = [f"{self.scheme}{self.bits}" if self.scheme != "fp8" else "fp8_e4m3", f"g{self.group}"]
        parts += [f"w{self.window}"] * bool(self.window) + [f"s{self.sinks}"] * bool(self.sinks)
        parts += [f"o{self.outliers * 100:g}%"] * bool(self.outliers) + [f"r{self.rank}c{self.chunk}"] * bool(self.rank)
        parts += ["prerope"] * (self.key_rope == "pre")
        return "-".join(parts)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "params"}
        return {**out, "keys": self.keys, "values": "per_token"}

    def bytes_per_token(self, heads: int, head_dim: int) -> float:
        """Packed bytes per token per layer for keys + values: codes, per-token scales and zeros,
        sparse outliers (fp16 value + index), GEAR's low-rank factors (its per-chunk factor spread
        over the chunk's tokens) and, for pre-RoPE keys, the token's position (int32, shared by the
        heads). Window, sinks and per-layer constants (:meth:`constant_bytes`) are not included."""
        code = head_dim * self.bits / 8
        g = self.channel_group(head_dim)
        sparse = self.n_outliers(head_dim) * (2 + (1 if head_dim <= 256 else 2))
        if self.scheme == "kvquant":  # keys: codes + outliers; values: + one scale and centre per group
            return heads * (2 * code + 2 * sparse + (head_dim // g) * 4) + 4 * (self.key_rope == "pre")
        if self.scheme == "gear":
            low_rank = self.rank * 2 + head_dim * self.rank * 2 / self.chunk
            return heads * 2 * (code + (head_dim // g) * 4 + sparse + low_rank)
        per_token_scales = (head_dim // g) * (2 if self.scheme != "fp8" else 1) * 2  # fp16 scale (+ zero)
        key_scales = head_dim * 2 * 2 / self.group if self.keys == "per_channel" else per_token_scales
        return heads * (2 * code + key_scales + per_token_scales)

    def constant_bytes(self, heads: int, head_dim: int) -> int:
        """Bytes per layer that do not grow with the tokens: KVQuant's codebooks (float32) and key
        channel centres and scales (fp16)."""
        if self.scheme != "kvquant":
            return 0
        return 2 * (1 << self.bits) * 4 + 2 * heads * head_dim * 2


# named formats; recipes pick one by name (``mark_kv_cache``'s ``scheme`` option)
KV_FORMATS: dict[str, KVFormat] = {
    "int8": KVFormat("int", 8, 64),
    "int4": KVFormat("int", 4, 64),
    "int3": KVFormat("int", 3, 64),
    "int2": KVFormat("int", 2, 64),
    "fp8": KVFormat("fp8", 8, 64),
    # KIVI: per-channel keys in groups of 64 tokens, per-token values, 64 recent tokens in float
    "kivi2": KVFormat("kivi", 2, 64, window=64),
    "kivi3": KVFormat("kivi", 3, 64, window=64),
    "kivi4": KVFormat("kivi", 4, 64, window=64),
    # KVQuant: pre-RoPE per-channel keys, per-layer codebooks (calibrated), per-token values (one
    # scale per head row), 1 % outliers per row, 4 attention-sink tokens in float
    "kvquant2": KVFormat("kvquant", 2, 128, sinks=4, outliers=0.01, key_rope="pre"),
    "kvquant3": KVFormat("kvquant", 3, 128, sinks=4, outliers=0.01, key_rope="pre"),
    "kvquant4": KVFormat("kvquant", 4, 128, sinks=4, outliers=0.01, key_rope="pre"),
    # GEAR: uniform int4 per token (one scale per head row) + rank-2 residual per 64 tokens + 1 % outliers
    "gear4": KVFormat("gear", 4, 128, outliers=0.01, rank=2, chunk=64),
}


def get_format(name: "str | KVFormat") -> KVFormat:
    if isinstance(name, KVFormat):
        return name
    if name not in KV_FORMATS:
        raise LowbitError(f"unknown KV format {name!r}; known: {sorted(KV_FORMATS)}")
    return KV_FORMATS[name]


# --------------------------------------------------------------------------------------------
# Packing: codes of `bits` bits, 8 values -> `bits` bytes along the last dimension
# --------------------------------------------------------------------------------------------

def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., D) integer codes in [0, 2**bits) -> (..., D * bits / 8) uint8 (D a multiple of 8)."""
    if bits == 8:
        return codes.to(torch.uint8)
    *lead, d = codes.shape
    c = codes.to(torch.int64).reshape(*lead, d // 8, 8)
    word = (c << (torch.arange(8, device=c.device) * bits)).sum(-1)
    out = (word.unsqueeze(-1) >> (torch.arange(bits, device=c.device) * 8)) & 0xFF
    return out.to(torch.uint8).reshape(*lead, d * bits // 8)


def unpack(packed: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    """Inverse of :func:`pack`: (..., D * bits / 8) uint8 -> (..., D) int64 codes."""
    if bits == 8:
        return packed.to(torch.int64)
    *lead, _ = packed.shape
    b = packed.to(torch.int64).reshape(*lead, d // 8, bits)
    word = (b << (torch.arange(bits, device=b.device) * 8)).sum(-1)
    codes = (word.unsqueeze(-1) >> (torch.arange(8, device=b.device) * bits)) & ((1 << bits) - 1)
    return codes.reshape(*lead, d)


# --------------------------------------------------------------------------------------------
# Quantize / dequantize one tensor of shape (B, H, T, D)
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Packed:
    """Packed codes (B, H, T, D*bits/8) uint8 with fp16 ``scale`` and ``zero`` (None for fp8):
    (B, H, T, D/g) per token, or (B, H, T/G, D) per channel."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero) if t is not None)


def quantize(x: torch.Tensor, fmt: KVFormat, axis: str) -> Packed:
    """Quantize ``x`` (B, H, T, D): ``axis="per_token"`` groups channels of each token,
    ``"per_channel"`` groups ``fmt.group`` tokens of each channel (T a multiple of it)."""
    b, h, t, d = x.shape
    xf = x.float()
    if axis == "per_token":
        g = fmt.channel_group(d)
        xg = xf.reshape(b, h, t, d // g, g)
        reduce = -1
    else:
        g = fmt.group
        xg = xf.reshape(b, h, t // g, g, d)
        reduce = -2
    if fmt.scheme == "fp8":
        amax = xg.abs().amax(reduce, keepdim=True).clamp_min(1e-8)
        scale = (amax / FP8_MAX).to(torch.float16).clamp_min(torch.finfo(torch.float16).tiny)
        q = (xg / scale.float()).to(torch.float8_e4m3fn).view(torch.uint8)
        return Packed(q.reshape(b, h, t, d), scale.squeeze(reduce), None)
    levels = (1 << fmt.bits) - 1
    lo, hi = xg.amin(reduce, keepdim=True), xg.amax(reduce, keepdim=True)
    scale = ((hi - lo) / levels).clamp_min(1e-8).to(torch.float16)
    zero = lo.to(torch.float16)
    q = torch.round((xg - zero.float()) / scale.float()).clamp_(0, levels)
    return Packed(pack(q.reshape(b, h, t, d), fmt.bits), scale.squeeze(reduce), zero.squeeze(reduce))


def dequantize(p: Packed, fmt: KVFormat, axis: str, d: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, H, T, D) floats from :func:`quantize`'s output (or a token slice of it)."""
    b, h, t, _ = p.codes.shape
    if fmt.scheme == "fp8":
        q = p.codes.view(torch.float8_e4m3fn).float()
    else:
        q = unpack(p.codes, fmt.bits, d).float()
    if axis == "per_token":
        g = d // p.scale.shape[-1]
        q = q.reshape(b, h, t, d // g, g)
        scale, zero = p.scale.float().unsqueeze(-1), None if p.zero is None else p.zero.float().unsqueeze(-1)
    else:
        g = t // p.scale.shape[-2]
        q = q.reshape(b, h, t // g, g, d)
        scale, zero = p.scale.float().unsqueeze(-2), None if p.zero is None else p.zero.float().unsqueeze(-2)
    x = q * scale if zero is None else q * scale + zero
    return x.reshape(b, h, t, d).to(dtype)


def roundtrip(x: torch.Tensor, fmt: KVFormat, axis: str) -> torch.Tensor:
    """Quantize then dequantize (the reference the tests' SQNR floors are measured on)."""
    return dequantize(quantize(x, fmt, axis), fmt, axis, x.shape[-1], x.dtype)


# --------------------------------------------------------------------------------------------
# Growable packed storage
# --------------------------------------------------------------------------------------------

class _Store:
    """Packed tokens of one tensor (keys or values) of one layer, grown by doubling capacity (no
    per-step copy of the whole cache). ``length`` tokens are valid."""

    def __init__(self, fmt: KVFormat, axis: str, head_dim: int):
        self.fmt, self.axis, self.head_dim = fmt, axis, head_dim
        self.tokens_per_scale = fmt.group if axis == "per_channel" else 1
        self.codes = self.scale = self.zero = None
        self.length = 0

    def append(self, x: torch.Tensor) -> None:
        p = quantize(x, self.fmt, self.axis)
        n = x.shape[2]
        if self.codes is None:
            self.codes, self.scale, self.zero = p.codes, p.scale, p.zero
            self.length = n
            return
        need = self.length + n
        if need > self.codes.shape[2]:
            cap = max(need, 2 * self.codes.shape[2])
            self.codes = _grow(self.codes, cap)
            self.scale = _grow(self.scale, cap // self.tokens_per_scale)
            self.zero = None if self.zero is None else _grow(self.zero, cap // self.tokens_per_scale)
        s0, s1 = self.length // self.tokens_per_scale, need // self.tokens_per_scale
        self.codes[:, :, self.length:need] = p.codes
        self.scale[:, :, s0:s1] = p.scale
        if self.zero is not None:
            self.zero[:, :, s0:s1] = p.zero
        self.length = need

    def block(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized tokens [start, stop) (start, stop multiples of the scale's token group)."""
        g = self.tokens_per_scale
        p = Packed(self.codes[:, :, start:stop], self.scale[:, :, start // g:stop // g],
                   None if self.zero is None else self.zero[:, :, start // g:stop // g])
        return dequantize(p, self.fmt, self.axis, self.head_dim, dtype)

    def nbytes(self, allocated: bool = False) -> int:
        if self.codes is None:
            return 0
        if allocated:
            return Packed(self.codes, self.scale, self.zero).nbytes()
        g = self.tokens_per_scale
        per_token = self.codes[:, :, :1].numel() * self.codes.element_size()
        per_scale = sum(t[:, :, :1].numel() * t.element_size() for t in (self.scale, self.zero) if t is not None)
        return self.length * per_token + (self.length // g) * per_scale

    def select_batch(self, index: torch.Tensor) -> None:
        for name in ("codes", "scale", "zero"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index.to(t.device)))


def _grow(t: torch.Tensor, tokens: int) -> torch.Tensor:
    out = torch.empty(*t.shape[:2], tokens, *t.shape[3:], dtype=t.dtype, device=t.device)
    out[:, :, :t.shape[2]] = t
    return out


# --------------------------------------------------------------------------------------------
# KVQuant and GEAR: non-uniform codebooks, dense-and-sparse outliers, low-rank residual
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class KVQuantParams:
    """One layer's calibrated KVQuant constants (:func:`fit_kvquant`): the non-uniform levels of the
    keys and of the values (sorted, in [-1, 1]: codes index them), and the per-channel centre and
    half-range that map pre-RoPE keys onto [-1, 1] (the dense part; what falls outside is clamped
    unless it is among its row's outliers)."""

    key_codebook: torch.Tensor    # (2**bits,) float32
    value_codebook: torch.Tensor  # (2**bits,) float32
    key_center: torch.Tensor      # (KV heads, head_dim) fp16
    key_scale: torch.Tensor       # (KV heads, head_dim) fp16
    tokens: int = 0               # calibration tokens (per head) they were fitted on

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.key_codebook, self.value_codebook, self.key_center, self.key_scale))


def lloyd_codebook(x: torch.Tensor, levels: int, iters: int = 100, max_samples: int = 1 << 18) -> torch.Tensor:
    """``levels`` sorted scalar levels minimising the squared error of rounding ``x`` to the nearest
    (Lloyd's 1-D k-means from the quantiles; at most ``max_samples`` values, a fixed random subset).
    On sorted values each iteration is ``levels`` binary searches and prefix-sum differences."""
    x = x.reshape(-1).float()
    x = x[torch.isfinite(x)]
    if x.numel() == 0:
        raise LowbitError("KVQuant codebook: no calibration values to fit it on")
    if x.numel() > max_samples:
        x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:max_samples].to(x.device)]
    xs = x.sort().values
    prefix = torch.cat([xs.new_zeros(1, dtype=torch.float64), xs.double().cumsum(0)])
    n = xs.numel()
    c = xs[((torch.arange(levels, device=x.device) + 0.5) / levels * n).long().clamp_max(n - 1)]
    for _ in range(iters):
        bounds = torch.cat([torch.zeros(1, dtype=torch.long, device=x.device),
                            torch.searchsorted(xs, (c[1:] + c[:-1]) / 2),
                            torch.full((1,), n, dtype=torch.long, device=x.device)])
        count = (bounds[1:] - bounds[:-1]).double()
        total = prefix[bounds[1:]] - prefix[bounds[:-1]]
        new = torch.where(count > 0, total / count.clamp_min(1), c.double()).float().sort().values
        done = torch.allclose(new, c, atol=1e-6, rtol=0)
        c = new
        if done:
            break
    return c


def _nearest(u: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of a sorted codebook."""
    return torch.bucketize(u.contiguous(), ((codebook[1:] + codebook[:-1]) / 2).contiguous())


def _outliers(x: torch.Tensor, k: int, centre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, fp16 values) of the ``k`` entries of each row of ``x`` farthest from ``centre``."""
    idx = (x - centre).abs().topk(k, -1).indices
    return idx, x.gather(-1, idx).to(torch.float16)


def _value_rows(x: torch.Tensor, fmt: KVFormat) -> dict[str, torch.Tensor]:
    """KVQuant values, per token: the outliers of each row (farthest from the row mean), then each
    channel group's centre and half-range over the rest (fp16), and the rest normalised to
    [-1, 1] (``u``, outliers set to 0; NaN there when ``mark`` for fitting)."""
    d = x.shape[-1]
    g = fmt.channel_group(d)
    xf = x.float()
    k = fmt.n_outliers(d)
    out: dict[str, torch.Tensor] = {}
    keep = torch.ones_like(xf, dtype=torch.bool)
    if k:
        out["oidx"], out["oval"] = _outliers(xf, k, xf.mean(-1, keepdim=True))
        keep.scatter_(-1, out["oidx"], False)
    xg, kg = xf.reshape(*xf.shape[:-1], d // g, g), keep.reshape(*xf.shape[:-1], d // g, g)
    hi = xg.masked_fill(~kg, -math.inf).amax(-1)
    lo = xg.masked_fill(~kg, math.inf).amin(-1)
    mid = ((hi + lo) / 2).to(torch.float16)
    half = ((hi - lo) / 2).clamp_min(1e-6).to(torch.float16)
    u = ((xg - mid.float().unsqueeze(-1)) / half.float().unsqueeze(-1)).clamp(-1, 1).reshape(xf.shape)
    out.update(mid=mid, half=half, u=u, keep=keep)
    return out


def _key_rows(x: torch.Tensor, fmt: KVFormat, center: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """KVQuant keys (pre-RoPE), per channel: normalised by the calibrated centre and half-range
    (``u``, clamped to [-1, 1]); the outliers of each row are the entries farthest outside."""
    xf = x.float()
    u = (xf - center.float()[None, :, None]) / scale.float()[None, :, None]
    k = fmt.n_outliers(x.shape[-1])
    out: dict[str, torch.Tensor] = {}
    keep = torch.ones_like(xf, dtype=torch.bool)
    if k:
        out["oidx"] = u.abs().topk(k, -1).indices
        out["oval"] = xf.gather(-1, out["oidx"]).to(torch.float16)
        keep.scatter_(-1, out["oidx"], False)
    out.update(u=u.clamp(-1, 1), keep=keep)
    return out


def fit_kvquant(keys: torch.Tensor, values: torch.Tensor, fmt: KVFormat, max_tokens: int = 8192) -> KVQuantParams:
    """Fit one layer's :class:`KVQuantParams` on calibration keys (before RoPE) and values, both
    (B, KV heads, T, head_dim): per channel, the centre and half-range of the keys between the
    ``outliers / 2`` and ``1 - outliers / 2`` quantiles (min and max without outliers); then the
    keys' and the values' codebooks by Lloyd on the normalised values, outliers excluded
    (unweighted: KVQuant's Fisher-information weighting needs gradients, which the calibration
    engine does not compute). ``mark_kv_cache`` calls this with the calibration engine's
    activations."""
    h, d = keys.shape[1], keys.shape[-1]
    levels = 1 << fmt.bits
    kf = keys.float().transpose(0, 1).reshape(h, -1, d)
    if kf.shape[1] > max_tokens:
        kf = kf[:, torch.linspace(0, kf.shape[1] - 1, max_tokens).long()]
    cut = int(fmt.outliers / 2 * kf.shape[1])  # tokens beyond each end of a channel's range
    lo, hi = kf.kthvalue(cut + 1, dim=1).values, kf.kthvalue(kf.shape[1] - cut, dim=1).values
    center = ((hi + lo) / 2).to(torch.float16)
    scale = ((hi - lo) / 2).clamp_min(1e-4).to(torch.float16)
    rows = _key_rows(kf[None], fmt, center, scale)
    key_codebook = lloyd_codebook(rows["u"][rows["keep"]], levels)
    vf = values.float().transpose(0, 1).reshape(h, -1, d)
    if vf.shape[1] > max_tokens:
        vf = vf[:, torch.linspace(0, vf.shape[1] - 1, max_tokens).long()]
    rows = _value_rows(vf[None], fmt)
    value_codebook = lloyd_codebook(rows["u"][rows["keep"]], levels)
    return KVQuantParams(key_codebook, value_codebook, center, scale, tokens=kf.shape[1])


class _FieldStore:
    """Token-indexed tensors (B, H, T / per, ...) of one layer's keys or values, grown by doubling
    capacity; ``per[name]`` tokens share one entry (GEAR's per-chunk factor). Subclasses encode
    (:meth:`_encode`) and decode (:meth:`_decode`)."""

    axis = "per_token"

    def __init__(self, fmt: KVFormat, head_dim: int):
        self.fmt, self.head_dim = fmt, head_dim
        self.tokens_per_scale = fmt.token_block
        self.fields: dict[str, torch.Tensor] = {}
        self.per: dict[str, int] = {}
        self.length = 0

    @property
    def codes(self) -> torch.Tensor | None:
        return self.fields.get("codes")

    def append(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        n = x.shape[2]
        parts = self._encode(x)
        if positions is not None:  # (B, n): the tokens' positions, for RoPE at read time
            parts["pos"] = positions.to(torch.int32)[:, None, :]
        need = self.length + n
        for name, value in parts.items():
            per = self.per.setdefault(name, n // value.shape[2])
            t = self.fields.get(name)
            if t is None:
                self.fields[name] = value
                continue
            if need // per > t.shape[2]:
                t = self.fields[name] = _grow(t, max(need // per, 2 * t.shape[2]))
            t[:, :, self.length // per:need // per] = value
        self.length = need

    def slices(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        return {k: t[:, :, start // self.per[k]:stop // self.per[k]] for k, t in self.fields.items()}

    def block(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized tokens [start, stop) (multiples of ``tokens_per_scale``)."""
        return self._decode(self.slices(start, stop)).to(dtype)

    def positions(self, start: int, stop: int) -> torch.Tensor:
        return self.fields["pos"][:, 0, start:stop].long()

    def nbytes(self, allocated: bool = False) -> int:
        if allocated:
            return sum(t.numel() * t.element_size() for t in self.fields.values())
        return sum(t[:, :, :1].numel() * t.element_size() * (self.length // self.per[k])
                   for k, t in self.fields.items())

    def select_batch(self, index: torch.Tensor) -> None:
        self.fields = {k: t.index_select(0, index.to(t.device)) for k, t in self.fields.items()}

    @staticmethod
    def _scatter_outliers(x: torch.Tensor, f: dict[str, torch.Tensor]) -> torch.Tensor:
        if "oidx" in f:
            x = x.scatter(-1, f["oidx"].long(), f["oval"].float())
        return x


class _KVQuantStore(_FieldStore):
    """KVQuant codes of one layer's keys (``role="keys"``: per-channel calibrated normalisation,
    given pre-RoPE) or values (per-token groups): codebook indices packed at ``bits`` bits, the
    outliers as fp16 value + uint8 index, the values' fp16 group centre and half-range."""

    def __init__(self, fmt: KVFormat, head_dim: int, role: str, params: KVQuantParams):
        super().__init__(fmt, head_dim)
        self.role, self.params = role, params
        self.axis = "per_channel" if role == "keys" else "per_token"
        self.codebook = params.key_codebook if role == "keys" else params.value_codebook

    def _encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        p = self.params
        rows = (_key_rows(x, self.fmt, p.key_center.to(x.device), p.key_scale.to(x.device)) if self.role == "keys"
                else _value_rows(x, self.fmt))
        codebook = self.codebook.to(x.device)
        out = {"codes": pack(_nearest(rows["u"], codebook), self.fmt.bits)}
        if self.role == "values":
            out.update(mid=rows["mid"], half=rows["half"])
        if "oidx" in rows:
            out.update(oidx=rows["oidx"].to(torch.uint8 if self.head_dim <= 256 else torch.int16), oval=rows["oval"])
        return out

    def _decode(self, f: dict[str, torch.Tensor]) -> torch.Tensor:
        d = self.head_dim
        u = self.codebook.to(f["codes"].device)[unpack(f["codes"], self.fmt.bits, d)]
        if self.role == "keys":
            p = self.params
            x = u * p.key_scale.float().to(u.device)[None, :, None] + p.key_center.float().to(u.device)[None, :, None]
        else:
            g = d // f["mid"].shape[-1]
            ug = u.reshape(*u.shape[:-1], d // g, g)
            x = (ug * f["half"].float().unsqueeze(-1) + f["mid"].float().unsqueeze(-1)).reshape(u.shape)
        return self._scatter_outliers(x, f)


class _GearStore(_FieldStore):
    """GEAR: per ``chunk`` tokens of one KV head, the sparse outliers of each row (fp16 value +
    uint8 index, farthest from the row mean), uniform per-token codes of the rest (as ``int``),
    and a rank-``rank`` approximation ``A B`` of what the codes miss (A: fp16 per token, B: fp16
    per chunk; from an SVD of the chunk's residual)."""

    def _encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        fmt = self.fmt
        b, h, n, d = x.shape
        xf = x.float()
        out: dict[str, torch.Tensor] = {}
        dense = xf
        k = fmt.n_outliers(d)
        if k:
            centre = xf.mean(-1, keepdim=True)
            out["oidx"], out["oval"] = _outliers(xf, k, centre)
            # the outliers' places take the row mean, so they do not stretch the row's range
            dense = xf.scatter(-1, out["oidx"], centre.expand(*centre.shape[:-1], k))
            out["oidx"] = out["oidx"].to(torch.uint8 if d <= 256 else torch.int16)
        uniform = KVFormat("int", fmt.bits, fmt.group)
        packed = quantize(dense, uniform, "per_token")
        out.update(codes=packed.codes, scale=packed.scale, zero=packed.zero)
        if fmt.rank:
            residual = dense - dequantize(packed, uniform, "per_token", d)
            r = residual.reshape(b, h, n // fmt.chunk, fmt.chunk, d)
            u, s, vh = torch.linalg.svd(r, full_matrices=False)
            rank = min(fmt.rank, s.shape[-1])
            a = (u[..., :rank] * s[..., None, :rank]).to(torch.float16)  # (b, h, chunks, chunk, rank)
            out["lr_a"] = a.reshape(b, h, n, rank)
            out["lr_b"] = vh[..., :rank, :].to(torch.float16).reshape(b, h, n // fmt.chunk, rank * d)
        return out

    def _decode(self, f: dict[str, torch.Tensor]) -> torch.Tensor:
        fmt, d = self.fmt, self.head_dim
        x = dequantize(Packed(f["codes"], f["scale"], f["zero"]), KVFormat("int", fmt.bits, fmt.group),
                       "per_token", d)
        if "lr_a" in f:
            b, h, n, rank = f["lr_a"].shape
            a = f["lr_a"].float().reshape(b, h, n // fmt.chunk, fmt.chunk, rank)
            bm = f["lr_b"].float().reshape(b, h, n // fmt.chunk, rank, d)
            x = x + (a @ bm).reshape(b, h, n, d)
        return self._scatter_outliers(x, f)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


# models whose attention applies full-width rotate_half RoPE from the base model's rotary_emb
# (cos, sin of shape (B, T, head_dim)): the ones the cache can undo and redo
ROTATE_HALF_MODELS = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "granite", "olmo", "gemma")


def rope_function(model: torch.nn.Module) -> tuple[Any, str | None]:
    """(positions (B, T) -> (cos, sin) float32 (B, T, head_dim), None), or (None, why not): the
    model's own rotary embedding, for caches that store keys before RoPE."""
    config = model.config.get_text_config(decoder=True)
    kind = getattr(config, "model_type", None)
    if kind not in ROTATE_HALF_MODELS or getattr(config, "partial_rotary_factor", 1.0) not in (None, 1.0):
        return None, (f"keys before RoPE: the cache re-applies full-width rotate_half RoPE, as {ROTATE_HALF_MODELS} "
                      f"use; {kind!r} is not one of them (or rotates part of the head); use kv3 or kv3-kivi")
    rotary = next((m for name, m in model.named_modules() if name.split(".")[-1] == "rotary_emb"), None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        return None, f"keys before RoPE: {type(model).__name__} has no rotary_emb module with inv_freq"

    def rope(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rotary(torch.empty(0, device=positions.device, dtype=torch.float32), positions)
        return cos.float(), sin.float()

    rope.rotary = rotary  # the Triton kernel recomputes cos/sin from its inv_freq and attention_scaling
    return rope, None


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------

def _cache_classes():
    from transformers.cache_utils import Cache, DynamicLayer

    return Cache, DynamicLayer


class PackedKV:
    """What :meth:`CompressedKVLayer.update` returns for keys and for values: a handle on the
    layer, read by :func:`packed_attention`. Any other use raises, naming the fix."""

    def __init__(self, layer: "CompressedKVLayer", which: str):
        self.layer, self.which = layer, which

    @property
    def shape(self) -> torch.Size:
        b, h, _, d = self.layer._float_k.shape
        return torch.Size((b, h, self.layer.get_seq_length(), d))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        which = next((a.which for a in args if isinstance(a, PackedKV)), "keys/values")
        raise LowbitError(f"the compressed KV cache's {which} were used by {getattr(func, '__name__', func)} "
                          f"outside the '{ATTENTION_NAME}' attention (config._attn_implementation was changed, or the "
                          "model's attention edits keys after the cache); use the model's own cache for it "
                          "(lowbit_compiler.kv.uninstall(model))")


def _make_layer_class():
    Cache, DynamicLayer = _cache_classes()

    class CompressedKVLayer(DynamicLayer):
        """One layer's compressed cache: sinks and a window in float, the rest packed (module docstring)."""

        is_croppable = False

        def __init__(self, fmt: KVFormat, rope: Any = None):
            super().__init__()
            self.fmt = fmt
            self.rope = rope  # positions -> (cos, sin): for keys stored before RoPE (rope_function)
            self.sinks: torch.Tensor | None = None
            self._k = self._v = None   # _Store (or _KVQuantStore, _GearStore)
            self._float_k = self._float_v = None  # float tokens after the packed ones (window + pending)
            self._float_pos = None  # their positions (keys stored before RoPE)
            self._sink_k = self._sink_v = None

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.device, self.dtype = key_states.device, key_states.dtype
            d = key_states.shape[-1]
            self.fmt.channel_group(d)  # refuse a group that does not divide the head size, now
            if self.fmt.bits not in (8,) and d % 8:
                raise LowbitError(f"KV format {self.fmt.key}: head size {d} is not a multiple of 8 (packing)")
            b, h = key_states.shape[:2]
            if self.fmt.scheme == "kvquant":
                params = self.fmt.params
                if params is None or tuple(params.key_center.shape) != (h, d):
                    raise LowbitError(
                        f"KV format {self.fmt.key}: KVQuant needs calibrated codebooks and key channel scales for "
                        f"{h} KV heads x {d} (got {None if params is None else tuple(params.key_center.shape)}); "
                        "use compress(model, 'kv3-kvquant', calibration=batches), or KVFormat(params="
                        "lowbit_compiler.kv.fit_kvquant(keys, values, fmt))")
                if self.fmt.key_rope == "pre" and self.rope is None:
                    raise LowbitError(f"KV format {self.fmt.key}: keys stored before RoPE need the model's rotary "
                                      "embedding; build the cache with lowbit_compiler.kv.new_cache(model)")
                self._k = _KVQuantStore(self.fmt, d, "keys", params)
                self._v = _KVQuantStore(self.fmt, d, "values", params)
            elif self.fmt.scheme == "gear":
                self._k, self._v = _GearStore(self.fmt, d), _GearStore(self.fmt, d)
            else:
                self._k = _Store(self.fmt, self.fmt.keys, d)
                self._v = _Store(self.fmt, "per_token", d)
            # new empty tensors, not slices: a slice would keep the caller's whole float tensor alive
            self._float_pos = torch.zeros(b, 0, dtype=torch.long, device=key_states.device)
            self._float_k = self._sink_k = key_states.new_empty(b, h, 0, d)
            self._float_v = self._sink_v = value_states.new_empty(b, h, 0, value_states.shape[-1])
            self.is_initialized = True

        @torch.compiler.disable  # opaque to Dynamo: see _attend_packed
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            pre_rope = self.fmt.key_rope == "pre"
            if pre_rope:
                positions = _positions(kwargs, key_states, self.get_seq_length())
            sinks = self.fmt.sinks - self._sink_k.shape[2]
            if sinks > 0:
                self._sink_k = torch.cat([self._sink_k, key_states[:, :, :sinks]], 2)
                self._sink_v = torch.cat([self._sink_v, value_states[:, :, :sinks]], 2)
                key_states, value_states = key_states[:, :, sinks:], value_states[:, :, sinks:]
                if pre_rope:
                    positions = positions[:, sinks:]
            self._float_k = torch.cat([self._float_k, key_states], 2)
            self._float_v = torch.cat([self._float_v, value_states], 2)
            if pre_rope:
                self._float_pos = torch.cat([self._float_pos, positions], 1)
            over = self._float_k.shape[2] - self.fmt.window
            flush = over - over % self.fmt.token_block if over > 0 else 0
            if flush:
                if pre_rope:  # the packed keys are the keys before RoPE: undo the model's rotation
                    pos = self._float_pos[:, :flush]
                    cos, sin = self.rope(pos)
                    self._check_rope(cos)
                    k = self._float_k[:, :, :flush].float()
                    cos, sin = cos[:, None], sin[:, None]
                    self._k.append((k * cos - rotate_half(k) * sin) / (cos * cos + sin * sin), positions=pos)
                    self._float_pos = self._float_pos[:, flush:].clone()
                else:
                    self._k.append(self._float_k[:, :, :flush])
                self._v.append(self._float_v[:, :, :flush])
                self._float_k = self._float_k[:, :, flush:].clone()
                self._float_v = self._float_v[:, :, flush:].clone()
            return PackedKV(self, "keys"), PackedKV(self, "values")

        def _check_rope(self, cos: torch.Tensor) -> None:
            if cos.shape[-1] != self._float_k.shape[-1]:
                raise LowbitError(f"KV format {self.fmt.key}: the model's rotary embedding covers {cos.shape[-1]} of "
                                  f"{self._float_k.shape[-1]} channels; keys before RoPE need full-width RoPE "
                                  "(use kv3 or kv3-kivi)")

        def get_seq_length(self) -> int:
            if not self.is_initialized:
                return 0
            return self._sink_k.shape[2] + self._k.length + self._float_k.shape[2]

        def nbytes(self, allocated: bool = False) -> dict[str, int]:
            """Bytes this layer holds: packed codes + scales, and float tokens (sinks + window)."""
            if not self.is_initialized:
                return {"packed": 0, "float": 0, "constant": 0}
            floats = sum(t.numel() * t.element_size() for t in (self._sink_k, self._sink_v, self._float_k, self._float_v))
            floats += self._float_pos.numel() * self._float_pos.element_size()
            params = self.fmt.params
            return {"packed": self._k.nbytes(allocated) + self._v.nbytes(allocated), "float": floats,
                    "constant": params.nbytes() if self.fmt.scheme == "kvquant" else 0}

        def blocks(self, dtype: torch.dtype):
            """(start token, keys, values) in sequence order: sinks, packed blocks, float tail."""
            if self._sink_k.shape[2]:
                yield 0, self._sink_k.to(dtype), self._sink_v.to(dtype)
            base = self._sink_k.shape[2]
            n = self._k.length
            step = max(BLOCK_TOKENS - BLOCK_TOKENS % self.fmt.token_block, self.fmt.token_block)
            for start in range(0, n, step):
                stop = min(n, start + step)
                k = self._k.block(start, stop, dtype)
                if self.fmt.key_rope == "pre":  # RoPE on the dequantized keys, from their positions
                    cos, sin = self.rope(self._k.positions(start, stop))
                    cos, sin = cos[:, None], sin[:, None]
                    k = (k.float() * cos + rotate_half(k.float()) * sin).to(dtype)
                yield base + start, k, self._v.block(start, stop, dtype)
            if self._float_k.shape[2]:
                yield base + n, self._float_k.to(dtype), self._float_v.to(dtype)

        def reset(self) -> None:
            self.is_initialized = False
            self._k = self._v = self._float_k = self._float_v = self._sink_k = self._sink_v = self._float_pos = None

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            if not self.is_initialized:
                return
            self._k.select_batch(beam_idx)
            self._v.select_batch(beam_idx)
            for name in ("_float_k", "_float_v", "_sink_k", "_sink_v", "_float_pos"):
                setattr(self, name, getattr(self, name).index_select(0, beam_idx.to(self.device)))

        def crop(self, tokens_to_remove: int) -> None:
            raise LowbitError("the compressed KV cache cannot be cropped (packed tokens are not re-quantized); "
                              "assisted/speculative decoding needs the model's own cache")

    class CompressedKVCache(Cache):
        """A transformers ``Cache`` whose layers store packed K/V (module docstring)."""

        def __init__(self, formats: "list[KVFormat | None]", rope: Any = None):
            layers = [CompressedKVLayer(f, rope) if f is not None else DynamicLayer() for f in formats]
            super().__init__(layers=layers)
            self.formats = list(formats)

        @torch.compiler.disable
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            # opaque as a whole, not only the layer's update: traced, transformers' Cache.update
            # indexes self.layers[layer_idx], so Dynamo compiled it once per layer index (a frame of
            # its own after the layer's graph break: 3 entries per layer on one code object, past
            # Dynamo's recompile limit from the 3rd layer of a model)
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

        def nbytes(self, allocated: bool = False) -> dict[str, int]:
            total = {"packed": 0, "float": 0, "constant": 0}
            for layer in self.layers:
                if isinstance(layer, CompressedKVLayer):
                    for k, v in layer.nbytes(allocated).items():
                        total[k] += v
                elif layer.is_initialized and layer.keys is not None:
                    total["float"] += layer.keys.nbytes + layer.values.nbytes
            return total

    return CompressedKVLayer, CompressedKVCache


_CLASSES: tuple[type, type] | None = None


def classes() -> tuple[type, type]:
    """(CompressedKVLayer, CompressedKVCache); built on first use so importing the compiler does
    not import transformers."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _make_layer_class()
    return _CLASSES


def CompressedKVCache(formats: "list[KVFormat | None]", rope: Any = None):  # noqa: N802 (a class, built lazily)
    return classes()[1](formats, rope)


def new_cache(model: torch.nn.Module):
    """A fresh :class:`CompressedKVCache` for a model :func:`install` was run on (what its forward
    creates when given none)."""
    return CompressedKVCache(model._lowbit_kv_formats, getattr(model, "_lowbit_kv_rope", None))


def _positions(kwargs: dict[str, Any], key_states: torch.Tensor, seen: int) -> torch.Tensor:
    """(B, n) positions of the new keys: the ``position_ids`` the attention received (transformers
    passes them to ``cache.update`` in ``kwargs``), else the next ``n`` after the ``seen`` tokens."""
    b, _, n, _ = key_states.shape
    inner = kwargs.get("kwargs") if isinstance(kwargs.get("kwargs"), dict) else kwargs
    pos = inner.get("position_ids") if isinstance(inner, dict) else None
    if not isinstance(pos, torch.Tensor) or pos.shape[-1] != n:
        pos = torch.arange(seen, seen + n, device=key_states.device)
    return pos.reshape(-1, n).expand(b, n).to(key_states.device, torch.long)


# --------------------------------------------------------------------------------------------
# Attention over the packed cache
# --------------------------------------------------------------------------------------------

def packed_attention_reference(query: torch.Tensor, layer: Any, mask: torch.Tensor | None, scaling: float,
                               softcap: float | None = None) -> torch.Tensor:
    """Attention of ``query`` (B, Hq, Q, D) over the layer's cache, one block at a time (online
    softmax in float32); GQA by grouping the query heads of each KV head. ``mask``: (B, 1|Hq, Q, T)
    bool (True attends) or additive float, or None (causal, the queries the last Q positions).
    Returns (B, Q, Hq, D), the layout transformers' attention functions return."""
    b, hq, q, d = query.shape
    total = layer.get_seq_length()
    hkv = layer._float_k.shape[1]
    g = hq // hkv
    qf = query.float().reshape(b, hkv, g, q, d) * scaling
    m = torch.full((b, hkv, g, q, 1), -math.inf, device=query.device)
    s = torch.zeros((b, hkv, g, q, 1), device=query.device)
    acc = torch.zeros((b, hkv, g, q, d), device=query.device)
    if mask is None and q > 1:
        pos_q = torch.arange(total - q, total, device=query.device)
        mask = (torch.arange(total, device=query.device)[None, :] <= pos_q[:, None])[None, None]
    for start, k, v in layer.blocks(torch.float32):
        t = k.shape[2]
        scores = torch.einsum("bhgqd,bhtd->bhgqt", qf, k)
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        if mask is not None:
            mb = mask[..., start:start + t]
            mb = mb.reshape(mb.shape[0], -1, 1, q, t) if mb.shape[1] == 1 else mb.reshape(b, hkv, g, q, t)
            scores = scores.masked_fill(~mb, -math.inf) if mb.dtype == torch.bool else scores + mb.float()
        m_new = torch.maximum(m, scores.amax(-1, keepdim=True))
        safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(scores - safe)
        correction = torch.exp(m - safe)
        s = s * correction + p.sum(-1, keepdim=True)
        acc = acc * correction + torch.einsum("bhgqt,bhtd->bhgqd", p, v)
        m = m_new
    out = acc / s.clamp_min(1e-30)
    return out.reshape(b, hq, q, d).transpose(1, 2).to(query.dtype)


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: Any, value: Any,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The ``"lowbit_kv"`` attention: reads the packed cache when keys are a :class:`PackedKV`;
    otherwise (no cache: ``use_cache=False``, or a layer the cache keeps float) transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not isinstance(key, PackedKV):
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
            kwargs["is_causal"] = False
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("sliding_window") and attention_mask is None:
        # the cache keeps every token; the window is applied by the mask, which must be there
        raise LowbitError(f"compressed KV cache: layer {getattr(module, 'layer_idx', '?')} uses sliding-window "
                          "attention and got no mask to apply the window with; use the model's own cache")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    return _attend_packed(query, key.layer, attention_mask, scaling, kwargs.get("softcap")), None


@torch.compiler.disable
def _attend_packed(query: torch.Tensor, layer: Any, mask: torch.Tensor | None, scaling: float,
                   softcap: float | None) -> torch.Tensor:
    """The packed cache's attention, opaque to Dynamo (as the cache's ``update``): under
    ``torch.compile`` of a compressed model the graph breaks here and this runs eagerly. Traced, the
    kernels' ``data_ptr()`` calls would be baked into the compiled code as constants (a crash, seen
    before this was added) and the cache's growing Python state would be guarded on at every step."""
    from lowbit_compiler.backends import kv_cpu

    out = None
    if query.shape[2] == 1 and _use_triton(query):  # decode on CUDA (or LOWBIT_KV_KERNEL=triton, interpreted)
        from lowbit_compiler.backends import kv_triton

        out = kv_triton.decode_attention(query, layer, mask, scaling, softcap)
    elif os.environ.get("LOWBIT_KV_KERNEL", "auto") != "torch":
        out = kv_cpu.decode_attention(query, layer, mask, scaling, softcap)
    if out is None:
        out = packed_attention_reference(query, layer, mask, scaling, softcap)
    return out


def _use_triton(query: torch.Tensor) -> bool:
    """CUDA tensors take the Triton kernel (``LOWBIT_KV_KERNEL``: ``auto``/``triton``; ``torch`` or
    ``c`` keep it off); CPU tensors only with ``LOWBIT_KV_KERNEL=triton`` under TRITON_INTERPRET=1."""
    mode = os.environ.get("LOWBIT_KV_KERNEL", "auto")
    if mode in ("torch", "c") or not (query.is_cuda or mode == "triton"):
        return False
    from lowbit_compiler.backends import kv_triton

    return kv_triton.wanted(query)


def _mask_function():
    from transformers.masking_utils import sdpa_mask

    def lowbit_kv_mask(*args: Any, **kwargs: Any):
        kwargs["allow_is_causal_skip"] = False  # the packed attention wants the mask itself
        return sdpa_mask(*args, **kwargs)

    return lowbit_kv_mask


def register_attention() -> str:
    """Register :func:`packed_attention` (and its mask: SDPA's boolean mask) in transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if ATTENTION_NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, packed_attention)
        AttentionMaskInterface.register(ATTENTION_NAME, _mask_function())
    return ATTENTION_NAME


# --------------------------------------------------------------------------------------------
# Installing on a model
# --------------------------------------------------------------------------------------------

def install(model: torch.nn.Module, formats: "dict[int, KVFormat]", strict: bool = False) -> dict[str, Any]:
    """Make ``model`` (a transformers decoder) use a :class:`CompressedKVCache` with ``formats``
    (layer index -> format): its attention becomes ``"lowbit_kv"``, and a forward with
    ``use_cache=True`` and no cache (or the empty ``DynamicCache`` ``generate()`` creates) gets a
    compressed one. Returns what was done, or the reason it was not (raised in strict mode)."""
    from lowbit_compiler.capture import remember_names

    remember_names(model)  # the cache's graph breaks: later graphs are traced from layers (their names)
    config = getattr(model, "config", None)
    reason = None
    if config is None or not hasattr(config, "_attn_implementation"):
        reason = f"{type(model).__name__} is not a transformers model (no config._attn_implementation)"
    else:
        text = config.get_text_config(decoder=True)
        layer_types = set(getattr(text, "layer_types", None) or ["full_attention"])
        if getattr(config, "is_encoder_decoder", False):
            reason = "encoder-decoder models keep an EncoderDecoderCache (not handled)"
        elif layer_types - {"full_attention", "sliding_attention"}:
            reason = (f"layer types {sorted(layer_types - {'full_attention', 'sliding_attention'})}: only full and "
                      "sliding-window attention layers are handled")
        elif config._attn_implementation not in ("sdpa", "eager", ATTENTION_NAME):
            reason = f"attention implementation {config._attn_implementation!r}; load the model with sdpa or eager"
    rope = None
    if reason is None and any(f.key_rope == "pre" for f in formats.values() if f is not None):
        rope, reason = rope_function(model)
    if reason is not None:
        message = f"KV cache compression: {reason}; the model keeps its own float cache"
        if strict:
            raise LowbitError(f"[strict] {message}")
        log.warning("lowbit fallback: %s", message)
        return {"applied": False, "reason": reason}
    register_attention()
    n_layers = text.num_hidden_layers
    per_layer = [formats.get(i) for i in range(n_layers)]
    config._attn_implementation = ATTENTION_NAME
    # the hook sits on the model given (its forward passes `cache` down; OPT's head calls its
    # decoder directly, past the base model)
    base = model
    if not hasattr(base, "_lowbit_kv_hook"):
        def pre_hook(module, args, kwargs):
            give_compressed_cache(base, kwargs)
            return args, kwargs

        base._lowbit_kv_hook = base.register_forward_pre_hook(pre_hook, with_kwargs=True)
    base._lowbit_kv_formats = per_layer
    base._lowbit_kv_rope = rope
    return {"applied": True, "attention": ATTENTION_NAME,
            "layers": {i: f.key for i, f in enumerate(per_layer) if f is not None}}


def give_compressed_cache(model: torch.nn.Module, kwargs: dict[str, Any]) -> bool:
    """What the forward pre-hook :func:`install` registers does to a call's keyword arguments: with
    ``use_cache`` on and no cache (or the empty ``DynamicCache`` ``generate()`` creates), a new
    :class:`CompressedKVCache` as ``cache``. Returns whether it gave one."""
    from transformers.cache_utils import DynamicCache

    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    use_cache = kwargs.get("use_cache")
    use_cache = getattr(model.config, "use_cache", True) if use_cache is None else use_cache
    fresh = cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0)
    if not (use_cache and fresh):
        return False
    kwargs.pop("past_key_values", None)
    kwargs["cache"] = new_cache(model)
    return True


# --------------------------------------------------------------------------------------------
# The compiled flow: torch.compile(model, backend="lowbit", options={"recipe": "kv4"})
# --------------------------------------------------------------------------------------------

# Dynamo's recompile limit for a compiled model with the compressed cache (see
# install_for_compiled_graph): the cache's graph breaks make the frames around them (the attention's
# forward, the decoder layer's, transformers' forward decorators) frames Dynamo compiles on their own,
# and some code objects are shared: the attention's forward by every layer (its layer_idx is a static
# int: one entry per layer), transformers' deprecate_kwarg wrapper by up to 8 functions (5 on Llama:
# the causal LM's, the model's, the decoder layer's and the attention's forward, create_causal_mask).
# Each such function takes an entry per call signature: the prefill, the prefill again with a dynamic
# length (another prompt length), the decode step, the decode step with a dynamic length (measured on
# the zoo Llama: 16 entries on the wrapper after two generate() calls, 2-3 per layer on the attention;
# the decode steps add none after the first two: the same count after 150 of them). docs/kv_cache.md
RECOMPILE_SIGNATURES = 4
RECOMPILE_SHARED_FUNCTIONS = 8


def recompile_limit_for(n_layers: int) -> int:
    """The recompile limit a compiled model with the compressed cache needs (comment above)."""
    return RECOMPILE_SIGNATURES * max(n_layers, RECOMPILE_SHARED_FUNCTIONS)


INSTALLED = "installed"  # install_for_compiled_graph: the module already has the compressed cache


def install_for_compiled_graph(gm: Any, example_inputs: Any, recipe: Any, strict: bool = False,
                               calibration: Any = None) -> str | None:
    """Under ``torch.compile(model, backend="lowbit")`` with a recipe that marks the KV cache: put
    the compressed cache on the module being compiled, from the first graph that holds attentions,
    and make Dynamo trace that first call again so it already runs with the compressed cache.

    The backend is handed Dynamo's graph, not the model. The module is the frame local the graph's
    parameters were read from (``L['self']`` or, through Hugging Face's forward decorators,
    ``L['args'][0]``); the decisions come from ``canonicalize`` + ``mark_kv_cache`` run on a capture
    of the graph (the recipe's options, its calibration for KVQuant); :func:`install` puts the cache
    and its attention on the module; the call's own cache argument (the frame's ``kwargs``: None or
    ``generate()``'s empty ``DynamicCache``) is replaced as the pre-hook replaces it on later calls;
    then Dynamo restarts its analysis of the frame (:func:`_dynamo_adapter.restart_analysis`), so the
    graphs it compiles are those of the compressed cache (cache update and attention run eagerly,
    opaque to Dynamo, as under compress-then-compile). The recipe may compose the cache with weight
    passes (``w4a16+kv4``): the graphs quantize the weights; the call's recompile limit is raised
    (:func:`recompile_limit_for`, logged) so that no frame around the cache's graph breaks falls back
    to running eagerly, on the float weights.

    Returns None when there is nothing to install from this graph (the recipe marks no KV cache,
    the graph holds no attention), :data:`INSTALLED` when the module already has the compressed
    cache (a later graph), or the reason the model keeps its float cache (the caller reports it).
    Raises the restart exception when it installed the cache."""
    from lowbit_compiler import _dynamo_adapter, ir
    from lowbit_compiler.capture import capture
    from lowbit_compiler.pass_base import PassContext
    from lowbit_compiler.pipeline import run_pipeline

    if "mark_kv_cache" not in recipe.passes:
        return None
    model, why = _compiled_module(gm)
    if model is None:
        return why
    if getattr(model, "_lowbit_kv_hook", None) is not None:
        # the model compiled again (another torch.compile call, or after torch.compiler.reset()):
        # that call's limit too (a no-op for the call that installed it)
        _raise_recompile_limit(model, len(model._lowbit_kv_formats))
        return INSTALLED
    probe = recipe.replace(passes=tuple(p for p in recipe.passes if p in ("canonicalize", "mark_kv_cache")))
    captured = capture(gm, example_inputs)
    if calibration is not None:
        from lowbit_compiler.calibration import for_graph

        calibration = for_graph(captured.gm, calibration, False, captured.call_args(example_inputs))
    run_pipeline(captured.gm, probe, ctx=PassContext(recipe=probe, strict=strict, calibration=calibration))
    if not any(ir.get(n, ir.KV_CACHE) is not None for n in captured.gm.graph.nodes):
        return None
    kwargs = _dynamo_adapter.compiled_frame_locals().get("kwargs")
    if not isinstance(kwargs, dict):
        return (f"the compiled function reaches the {type(model).__name__} but has no **kwargs through which its "
                "first call could be given the compressed cache; compile the model itself: model.compile(backend="
                "'lowbit', ...) or torch.compile(model, ...)")
    from lowbit_compiler.offline import _install_kv_cache

    info = _install_kv_cache(model, [captured.gm], probe, strict)
    if not info or not info.get("applied"):
        return (info or {}).get("reason", "no KV decision could be installed")
    give_compressed_cache(model, kwargs)
    _raise_recompile_limit(model, len(model._lowbit_kv_formats))
    log.info("lowbit: KV cache: installed the compressed cache on the compiled %s (layers %s); Dynamo traces "
             "the call again with it", type(model).__name__, info["layers"])
    raise _dynamo_adapter.restart_analysis("lowbit: compressed KV cache installed on the compiled module")


def _raise_recompile_limit(model: torch.nn.Module, n_layers: int) -> None:
    """Raise the recompile limit of the ``torch.compile`` call that compiles ``model`` to
    :func:`recompile_limit_for` its layers, saying so. Past the limit Dynamo runs a frame eagerly,
    and a frame run eagerly computes with the float weights (the quantized ones live in the compiled
    graphs): with Dynamo's default (8), ``w4a16+kv4`` ran its attention's projections in float from the
    second decode step (19 dB from ``compress``'s logits, then 3 dB). The backend still reports a hit
    of the raised limit (strict mode raises)."""
    from lowbit_compiler import _dynamo_adapter
    from torch._dynamo import config

    limit = recompile_limit_for(n_layers)
    changed = _dynamo_adapter.raise_region_recompile_limit(limit)
    if changed is None:
        log.warning("lowbit: KV cache: could not raise Dynamo's recompile limit for this torch.compile call (no "
                    "Dynamo compile found on the stack: torch's internals moved?); frames past the limit run eagerly "
                    "on the float weights (reported); pass torch.compile(..., recompile_limit=%d)", limit)
        return
    if changed[0] == changed[1]:
        return
    model._lowbit_kv_recompile_limit = changed  # (old, new) of the last raise
    cap = config.accumulated_recompile_limit
    log.warning("lowbit: KV cache: Dynamo's recompile limit for this torch.compile call raised from %d to %d: the "
                "compressed cache's graph breaks make the attention's forward (once per layer: %d) and transformers' "
                "shared forward wrappers compile once per function and call signature; past the limit they would "
                "run eagerly on the float weights%s", changed[0], changed[1], n_layers,
                f" (Dynamo's accumulated_recompile_limit, {cap}, still caps each function; for more layers set "
                "torch._dynamo.config.allow_unspec_int_on_nn_module = True: the layer index then compiles once)"
                if changed[1] > cap else "")


def _compiled_module(gm: Any) -> tuple[torch.nn.Module | None, str]:
    """The module whose forward Dynamo is compiling (the frame local its parameters come from)."""
    from lowbit_compiler import _dynamo_adapter

    f_locals = _dynamo_adapter.compiled_frame_locals()
    if f_locals is None:
        return None, "the backend was not called from a Dynamo trace, so the compiled module is not known"
    roots = {_dynamo_adapter.root_local(n) for n in gm.graph.nodes
             if n.op == "placeholder" and _dynamo_adapter.module_state_of(n) is not None}
    roots.discard(None)
    if not roots:
        return None, ("the graph's parameters are not read from an argument of the compiled function (a closure or "
                      "a global?), so the module is not known; compile the model itself: model.compile(backend="
                      "'lowbit', ...) or torch.compile(model, ...)")
    if len(roots) != 1:
        return None, f"the graph's parameters come from {len(roots)} arguments ({sorted(map(str, roots))}), not one module"
    name, index = roots.pop()
    value = f_locals.get(name)
    if index is not None:
        value = value[index] if isinstance(value, (tuple, list)) and index < len(value) else None
    if not isinstance(value, torch.nn.Module) or not hasattr(getattr(value, "config", None), "_attn_implementation"):
        return None, f"the graph's parameters come from {name}, a {type(value).__name__}, not a transformers model"
    return value, ""


# --------------------------------------------------------------------------------------------
# Saving and loading the KV setup (the checkpoint manifest's "kv_cache" entry)
# --------------------------------------------------------------------------------------------

_FORMAT_FIELDS = ("scheme", "bits", "group", "window", "sinks", "outliers", "rank", "chunk", "key_rope")
_TENSOR_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def _tensor_entry(t: torch.Tensor) -> dict[str, Any]:
    import base64

    t = t.detach().cpu().contiguous()
    name = next(k for k, v in _TENSOR_DTYPES.items() if v == t.dtype)
    return {"dtype": name, "shape": list(t.shape), "data": base64.b64encode(t.numpy().tobytes()).decode()}


def _tensor_from(entry: Any, what: str) -> torch.Tensor:
    import base64

    import numpy as np

    try:
        dtype = _TENSOR_DTYPES[entry["dtype"]]
        raw = base64.b64decode(entry["data"], validate=True)
        shape = [int(s) for s in entry["shape"]]
        array = np.frombuffer(raw, dtype={torch.float32: np.float32, torch.float16: np.float16}[dtype])
        return torch.from_numpy(array.copy()).reshape(shape)
    except (KeyError, TypeError, ValueError) as e:
        raise LowbitError(f"checkpoint: kv_cache {what}: bad tensor entry ({type(e).__name__}: {e}); the manifest "
                          "was edited or truncated: save the model again") from None


def manifest_entry(model: torch.nn.Module) -> dict[str, Any] | None:
    """The KV setup :func:`install` put on ``model``, as JSON: per layer index its format fields and,
    for KVQuant, its calibrated codebooks and key channel scales (base64 of the raw float32/fp16
    bytes); None when the model has no compressed cache installed."""
    formats = getattr(model, "_lowbit_kv_formats", None)
    if formats is None or getattr(model, "_lowbit_kv_hook", None) is None:
        return None
    layers: dict[str, Any] = {}
    for i, fmt in enumerate(formats):
        if fmt is None:
            continue
        entry: dict[str, Any] = {k: getattr(fmt, k) for k in _FORMAT_FIELDS}
        p = fmt.params
        if p is not None:
            entry["params"] = {"tokens": p.tokens, **{k: _tensor_entry(getattr(p, k)) for k in
                                                      ("key_codebook", "value_codebook", "key_center", "key_scale")}}
        layers[str(i)] = entry
    return {"attention": ATTENTION_NAME, "layers": layers}


def formats_from_manifest(entry: dict[str, Any]) -> dict[int, KVFormat]:
    """Inverse of :func:`manifest_entry`: layer index -> :class:`KVFormat` (checked)."""
    layers = entry.get("layers") if isinstance(entry, dict) else None
    if not isinstance(layers, dict):
        raise LowbitError(f"checkpoint: kv_cache entry {str(entry)[:80]} has no 'layers' table")
    out: dict[int, KVFormat] = {}
    for index, spec in layers.items():
        if not isinstance(spec, dict) or set(_FORMAT_FIELDS) - set(spec):
            raise LowbitError(f"checkpoint: kv_cache layer {index}: expected the fields {_FORMAT_FIELDS}, got {spec}")
        params = None
        if spec.get("params") is not None:
            p = spec["params"]
            params = KVQuantParams(*(_tensor_from(p.get(k), f"layer {index} {k}") for k in
                                     ("key_codebook", "value_codebook", "key_center", "key_scale")),
                                   tokens=int(p.get("tokens", 0)))
        fmt = KVFormat(**{k: spec[k] for k in _FORMAT_FIELDS}, params=params)  # __post_init__ checks the fields
        if fmt.scheme == "kvquant" and params is None:
            raise LowbitError(f"checkpoint: kv_cache layer {index} is {fmt.key} but has no calibrated params")
        out[int(index)] = fmt
    return out


def install_from_manifest(model: torch.nn.Module, meta: dict[str, Any], strict: bool = False) -> dict[str, Any] | None:
    """Install the KV setup a checkpoint's manifest records (``kv_cache``), or nothing when it has none."""
    entry = meta.get("kv_cache")
    if not entry:
        return None
    return install(model, formats_from_manifest(entry), strict)


def uninstall(model: torch.nn.Module, attention: str = "sdpa") -> None:
    """Back to the model's own float cache and ``attention``."""
    base = model
    hook = getattr(base, "_lowbit_kv_hook", None)
    if hook is not None:
        hook.remove()
        del base._lowbit_kv_hook
    model.config._attn_implementation = attention
