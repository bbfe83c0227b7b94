"""Weight formats: one description per format, used by the quantizer, the reference dequantiser,
the kernels and the dumps.

A format is a frozen :class:`WeightFormat`. Its storage (what a quantized linear holds) is a
:class:`QuantizedWeight`:

* ``qweight``: the integer codes, packed. int8: ``int8 [N, K]``. int4: ``uint8 [N, Kp/2]`` with
  two unsigned codes per byte (low nibble = even k), codes in [0, 15].
* ``scale``: per output channel ``[N]`` (int8) or per group ``[N, Kp/g]`` (int4), stored in
  ``SCALE_DTYPE``. The codes are computed against the *stored* (rounded) scale, so the reference
  dequantiser reproduces exactly what the quantizer meant.
* ``zero``: asymmetric int4 only, integer zero points ``uint8 [N, Kp/g]`` in [0, 15].
  Symmetric int4 stores codes offset by 8 (``q + 8``) and no zero tensor.

Dequantisation: ``w = (q - z) * s`` with ``z = 8`` for symmetric int4 and ``z = 0`` for int8.
``Kp`` is K padded up to a multiple of the group size (only with ``pad_to_group``); padded
columns are zero and the activation is padded to match.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re

import torch

SCALE_DTYPE = torch.bfloat16
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)


class FormatError(ValueError):
    """A weight format or its use on a layer is invalid; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """A weight-only quantization format.

    Args:
        bits: 8 (per-channel, symmetric) or 4 (group-wise).
        group_size: elements of K sharing one scale; None means one scale per output channel.
        symmetric: symmetric codes (no zero point) or asymmetric (integer zero point per group).
    """

    bits: int
    group_size: int | None = None
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits == 8:
            if self.group_size is not None or not self.symmetric:
                raise FormatError(
                    f"int8 weights are per-channel symmetric; got group_size={self.group_size}, "
                    f"symmetric={self.symmetric}. Use bits=8 with group_size=None, symmetric=True, "
                    "or bits=4 for group-wise formats")
        elif self.bits == 4:
            if self.group_size not in SUPPORTED_GROUP_SIZES:
                raise FormatError(
                    f"int4 group_size={self.group_size} is not supported; use one of "
                    f"{SUPPORTED_GROUP_SIZES}")
        else:
            raise FormatError(f"bits={self.bits} is out of range: weight-only formats support "
                              "bits=8 (per-channel) and bits=4 (group-wise)")

    # -- naming ---------------------------------------------------------------------------
    @property
    def key(self) -> str:
        """Stable string used in op arguments, cache keys and dumps: ``int8``, ``int4_g128_asym``."""
        if self.bits == 8:
            return "int8"
        return f"int4_g{self.group_size}_{'sym' if self.symmetric else 'asym'}"

    @staticmethod
    @functools.lru_cache(maxsize=None)  # kernels parse the key on every call
    def parse(key: str) -> "WeightFormat":
        if key == "int8":
            return WeightFormat(8)
        m = re.fullmatch(r"int4_g(\d+)_(sym|asym)", key)
        if not m:
            raise FormatError(f"unknown weight format {key!r}; expected 'int8' or 'int4_g<G>_<sym|asym>'")
        return WeightFormat(4, int(m.group(1)), m.group(2) == "sym")

    # -- sizes ----------------------------------------------------------------------------
    @property
    def qmin(self) -> int:
        return -128 if self.bits == 8 else 0

    @property
    def qmax(self) -> int:
        return 127 if self.bits == 8 else 15

    def padded_k(self, k: int) -> int:
        g = self.group_size or 1
        return (k + g - 1) // g * g

    def storage_bytes(self, n: int, k: int) -> int:
        kp = self.padded_k(k)
        scale_bytes = torch.finfo(SCALE_DTYPE).bits // 8
        if self.bits == 8:
            return n * kp + n * scale_bytes
        groups = n * (kp // self.group_size)
        return n * kp // 2 + groups * scale_bytes + (0 if self.symmetric else groups)

    def bits_per_weight(self, n: int, k: int) -> float:
        return self.storage_bytes(n, k) * 8 / (n * k)


@dataclasses.dataclass
class QuantizedWeight:
    """The stored form of one quantized [N, K] weight (see the module docstring)."""

    format: WeightFormat
    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    in_features: int

    @property
    def out_features(self) -> int:
        return self.scale.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.zero) if t is not None)


def check_layer(fmt: WeightFormat, k: int, layer: str, pad_to_group: bool) -> None:
    """Raise a FormatError naming the layer and the fix when K does not fit the format."""
    g = fmt.group_size
    if g is None or k % g == 0 or pad_to_group:
        return
    options = [s for s in SUPPORTED_GROUP_SIZES if k % s == 0]
    hint = f"use group_size={options[-1]} or " if options else ""
    raise FormatError(f"layer {layer}: K={k} is not a multiple of group_size={g}; "
                      f"{hint}set pad_to_group = true in the recipe")


def quantize(w: torch.Tensor, fmt: WeightFormat) -> QuantizedWeight:
    """Round-to-nearest quantization of a [N, K] weight (computed in float32)."""
    n, k = w.shape
    w = w.detach().float()
    if fmt.bits == 8:
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(SCALE_DTYPE)
        q = torch.round(w / scale.float()[:, None]).clamp(-128, 127).to(torch.int8)
        return QuantizedWeight(fmt, q.contiguous(), scale, None, k)

    kp, g = fmt.padded_k(k), fmt.group_size
    if kp != k:
        w = torch.nn.functional.pad(w, (0, kp - k))
    wg = w.view(n, kp // g, g)
    if fmt.symmetric:
        scale = (wg.abs().amax(-1) / 7.5).clamp(min=1e-12).to(SCALE_DTYPE)
        zero_f = torch.full_like(scale, 8, dtype=torch.float32)
        zero = None
    else:
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        scale = ((hi - lo) / 15.0).clamp(min=1e-12).to(SCALE_DTYPE)
        zero_f = torch.round(-lo / scale.float()).clamp(0, 15)
        zero = zero_f.to(torch.uint8)
    q = torch.round(wg / scale.float()[..., None]) + zero_f[..., None]
    q = q.clamp(0, 15).to(torch.uint8).view(n, kp)
    return QuantizedWeight(fmt, pack_int4(q), scale, zero, k)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] uint8 codes in [0, 15] -> [N, K/2] uint8, low nibble = even k."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    n, half = packed.shape
    out = torch.empty(n, half * 2, dtype=torch.uint8, device=packed.device)
    out[:, 0::2] = packed & 0xF
    out[:, 1::2] = packed >> 4
    return out


def dequantize_parts(fmt: WeightFormat, qweight: torch.Tensor, scale: torch.Tensor,
                     zero: torch.Tensor | None) -> torch.Tensor:
    """The reference dequantiser: float32 [N, Kp] (padded columns included)."""
    if fmt.bits == 8:
        return qweight.float() * scale.float()[:, None]
    q = unpack_int4(qweight).float()
    n, kp = q.shape
    g = fmt.group_size
    z = torch.full_like(scale, 8, dtype=torch.float32) if zero is None else zero.float()
    return ((q.view(n, kp // g, g) - z[..., None]) * scale.float()[..., None]).view(n, kp)


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """float32 [N, K] (padding removed)."""
    return dequantize_parts(qw.format, qw.qweight, qw.scale, qw.zero)[:, : qw.in_features]


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (float64)."""
    ref, err = reference.double(), (approx.double() - reference.double())
    noise = err.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(ref.pow(2).sum().item() / noise)
