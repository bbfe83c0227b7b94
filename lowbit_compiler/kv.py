"""KV-cache compression: formats, packing, the compressed cache and the attention that reads it.

A :class:`KVFormat` says how one layer's keys and values are stored:

* ``int`` (uniform, asymmetric, ``bits`` in 2..8) and ``fp8`` (e4m3 with one scale per group):
  per-token groups of ``group`` channels for keys and values alike;
* ``kivi`` (KIVI): keys per channel with groups of ``group`` *tokens*, values per token, and the
  ``window`` most recent tokens in full precision (tokens reach the packed store ``group`` at a time);
* ``sinks``: the first tokens of the sequence stay in the model's float dtype (attention sinks, as
  KVQuant keeps them).

:class:`CompressedKVCache` (a transformers ``Cache`` of :class:`CompressedKVLayer`) stores only the
packed codes (``bits`` bits per element, packed 8 values into ``bits`` bytes), their fp16 scales and
zero points, the sink tokens and the float window. Its ``update`` returns a :class:`PackedKV` handle,
not tensors: the attention registered as ``"lowbit_kv"`` in transformers' ``AttentionInterface``
(:func:`packed_attention`) walks the packed store block by block (``BLOCK_TOKENS`` tokens),
dequantizes one block at a time and folds it into an online softmax, so no dequantized copy of the
whole cache exists at any step. :func:`install` puts both on a model (``compress(model, "kv4")``
calls it from the decisions the ``mark_kv_cache`` pass recorded).

Sliding-window layers get a full compressed layer; the mask applies the window. What is not here
(see docs/kv_cache.md): pre-RoPE keys (transformers 5 hands the cache post-RoPE keys and no
cos/sin), KVQuant's non-uniform codebooks and sparse outliers, GEAR's low-rank residual, and the
compiled flow (``torch.compile(backend="lowbit")`` records the decisions but keeps the model's
own cache).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch

from lowbit_compiler.pass_base import LowbitError

log = logging.getLogger("lowbit_compiler")

BLOCK_TOKENS = 256      # tokens dequantized at once by the attention (the unit of its online softmax)
ATTENTION_NAME = "lowbit_kv"  # the name registered in transformers' AttentionInterface
SCHEMES = ("int", "fp8", "kivi")
FP8_MAX = 448.0


@dataclasses.dataclass(frozen=True)
class KVFormat:
    """How one attention layer's cache is stored.

    Args:
        scheme: ``"int"`` (uniform per-token groups), ``"fp8"`` (e4m3, per-token group scales) or
            ``"kivi"`` (keys per channel with groups along tokens, values per token).
        bits: code width (2..8 for int/kivi; 8 for fp8).
        group: channels per scale for per-token groups (capped at the head size); tokens per scale
            for KIVI's per-channel keys.
        window: recent tokens kept in float (KIVI's residual).
        sinks: first tokens kept in float (attention sinks).
    """

    scheme: str = "int"
    bits: int = 4
    group: int = 64
    window: int = 0
    sinks: int = 0

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

    @property
    def keys(self) -> str:
        """Where key scales run: ``"per_token"`` groups of channels, or ``"per_channel"`` groups of tokens."""
        return "per_channel" if self.scheme == "kivi" else "per_token"

    @property
    def token_block(self) -> int:
        """Tokens that enter the packed store together (KIVI's key groups; 1 otherwise)."""
        return self.group if self.scheme == "kivi" else 1

    def channel_group(self, head_dim: int) -> int:
        """Channels per per-token scale: ``group``, capped at the head size (which it must divide)."""
        g = min(self.group, head_dim)
        if head_dim % g:
            raise LowbitError(f"KV format {self.key}: head size {head_dim} is not a multiple of group={g}; "
                              f"use a group that divides {head_dim}")
        return g

    @property
    def key(self) -> str:
        parts = [f"{self.scheme}{self.bits}" if self.scheme != "fp8" else "fp8_e4m3", f"g{self.group}"]
        parts += [f"w{self.window}"] * bool(self.window) + [f"s{self.sinks}"] * bool(self.sinks)
        return "-".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "keys": self.keys, "values": "per_token", "key_rope": "post"}

    def bytes_per_token(self, heads: int, head_dim: int) -> float:
        """Packed bytes per token per layer for keys + values, scales included (window and sinks,
        a constant per sequence, not included)."""
        code = head_dim * self.bits / 8
        g = self.channel_group(head_dim)
        per_token_scales = (head_dim // g) * (2 if self.scheme != "fp8" else 1) * 2  # fp16 scale (+ zero)
        key_scales = head_dim * 2 * 2 / self.group if self.keys == "per_channel" else per_token_scales
        return heads * (2 * code + key_scales + per_token_scales)


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

        def __init__(self, fmt: KVFormat):
            super().__init__()
            self.fmt = fmt
            self.sinks: torch.Tensor | None = None
            self._k = self._v = None   # _Store
            self._float_k = self._float_v = None  # float tokens after the packed ones (window + pending)
            self._sink_k = self._sink_v = None

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.device, self.dtype = key_states.device, key_states.dtype
            d = key_states.shape[-1]
            self.fmt.channel_group(d)  # refuse a group that does not divide the head size, now
            if self.fmt.bits not in (8,) and d % 8:
                raise LowbitError(f"KV format {self.fmt.key}: head size {d} is not a multiple of 8 (packing)")
            self._k = _Store(self.fmt, self.fmt.keys, d)
            self._v = _Store(self.fmt, "per_token", d)
            # new empty tensors, not slices: a slice would keep the caller's whole float tensor alive
            b, h = key_states.shape[:2]
            self._float_k = self._sink_k = key_states.new_empty(b, h, 0, d)
            self._float_v = self._sink_v = value_states.new_empty(b, h, 0, value_states.shape[-1])
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            sinks = self.fmt.sinks - self._sink_k.shape[2]
            if sinks > 0:
                self._sink_k = torch.cat([self._sink_k, key_states[:, :, :sinks]], 2)
                self._sink_v = torch.cat([self._sink_v, value_states[:, :, :sinks]], 2)
                key_states, value_states = key_states[:, :, sinks:], value_states[:, :, sinks:]
            self._float_k = torch.cat([self._float_k, key_states], 2)
            self._float_v = torch.cat([self._float_v, value_states], 2)
            over = self._float_k.shape[2] - self.fmt.window
            flush = over - over % self.fmt.token_block if over > 0 else 0
            if flush:
                self._k.append(self._float_k[:, :, :flush])
                self._v.append(self._float_v[:, :, :flush])
                self._float_k = self._float_k[:, :, flush:].clone()
                self._float_v = self._float_v[:, :, flush:].clone()
            return PackedKV(self, "keys"), PackedKV(self, "values")

        def get_seq_length(self) -> int:
            if not self.is_initialized:
                return 0
            return self._sink_k.shape[2] + self._k.length + self._float_k.shape[2]

        def nbytes(self, allocated: bool = False) -> dict[str, int]:
            """Bytes this layer holds: packed codes + scales, and float tokens (sinks + window)."""
            if not self.is_initialized:
                return {"packed": 0, "float": 0}
            floats = sum(t.numel() * t.element_size() for t in (self._sink_k, self._sink_v, self._float_k, self._float_v))
            return {"packed": self._k.nbytes(allocated) + self._v.nbytes(allocated), "float": floats}

        def blocks(self, dtype: torch.dtype):
            """(start token, keys, values) in sequence order: sinks, packed blocks, float tail."""
            if self._sink_k.shape[2]:
                yield 0, self._sink_k.to(dtype), self._sink_v.to(dtype)
            base = self._sink_k.shape[2]
            n = self._k.length
            step = max(BLOCK_TOKENS - BLOCK_TOKENS % self.fmt.token_block, self.fmt.token_block)
            for start in range(0, n, step):
                stop = min(n, start + step)
                yield base + start, self._k.block(start, stop, dtype), self._v.block(start, stop, dtype)
            if self._float_k.shape[2]:
                yield base + n, self._float_k.to(dtype), self._float_v.to(dtype)

        def reset(self) -> None:
            self.is_initialized = False
            self._k = self._v = self._float_k = self._float_v = self._sink_k = self._sink_v = None

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            if not self.is_initialized:
                return
            self._k.select_batch(beam_idx)
            self._v.select_batch(beam_idx)
            for name in ("_float_k", "_float_v", "_sink_k", "_sink_v"):
                setattr(self, name, getattr(self, name).index_select(0, beam_idx.to(self.device)))

        def crop(self, tokens_to_remove: int) -> None:
            raise LowbitError("the compressed KV cache cannot be cropped (packed tokens are not re-quantized); "
                              "assisted/speculative decoding needs the model's own cache")

    class CompressedKVCache(Cache):
        """A transformers ``Cache`` whose layers store packed K/V (module docstring)."""

        def __init__(self, formats: "list[KVFormat | None]"):
            layers = [CompressedKVLayer(f) if f is not None else DynamicLayer() for f in formats]
            super().__init__(layers=layers)
            self.formats = list(formats)

        def nbytes(self, allocated: bool = False) -> dict[str, int]:
            total = {"packed": 0, "float": 0}
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


def CompressedKVCache(formats: "list[KVFormat | None]"):  # noqa: N802 (a class, built lazily)
    return classes()[1](formats)


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
    from lowbit_compiler.backends import kv_cpu

    out = kv_cpu.decode_attention(query, key.layer, attention_mask, scaling, kwargs.get("softcap"))
    if out is None:
        out = packed_attention_reference(query, key.layer, attention_mask, scaling, kwargs.get("softcap"))
    return out, None


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
    from transformers.cache_utils import DynamicCache

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
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            use_cache = kwargs.get("use_cache")
            use_cache = getattr(config, "use_cache", True) if use_cache is None else use_cache
            fresh = cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0)
            if use_cache and fresh:
                kwargs.pop("past_key_values", None)
                kwargs["cache"] = CompressedKVCache(base._lowbit_kv_formats)
            return args, kwargs

        base._lowbit_kv_hook = base.register_forward_pre_hook(pre_hook, with_kwargs=True)
    base._lowbit_kv_formats = per_layer
    return {"applied": True, "attention": ATTENTION_NAME,
            "layers": {i: f.key for i, f in enumerate(per_layer) if f is not None}}


def uninstall(model: torch.nn.Module, attention: str = "sdpa") -> None:
    """Back to the model's own float cache and ``attention``."""
    base = model
    hook = getattr(base, "_lowbit_kv_hook", None)
    if hook is not None:
        hook.remove()
        del base._lowbit_kv_hook
    model.config._attn_implementation = attention
