"""Weight formats: one description per format, used by the quantizer, the reference dequantiser,
the kernels and the dumps.

A format is a frozen :class:`WeightFormat`; its ``kind`` picks the row of ``KINDS`` that says what
the codes mean (the value grid), how scales are chosen and stored, and how codes are packed. Its
storage (what a quantized linear holds) is a :class:`QuantizedWeight`:

========== ======================= ============================== ==============================
key        codes (``qweight``)     ``scale``                      ``zero``
========== ======================= ============================== ==============================
int8       int8 [N, K]             bf16 [N], absmax / 127         --
intB_gG_*  B = 2/3/4: uint8 [N,     bf16 [N, Kp/G]                 asym: uint8 [N, Kp/G] integer
           Kp*B/8], packed          sym: absmax / (2^(B-1) - 1/2)  zero points; sym: none (codes
                                    asym: (max - min) / (2^B - 1)  stored offset by 2^(B-1))
nf4_gG     4-bit NF4 indices        bf16 [N, Kp/G], absmax         --
fp8_e4m3   float8_e4m3fn [N, K]    bf16 [N], absmax / 448         --
mxfp4      4-bit e2m1 codes         uint8 [N, Kp/32]: e8m0 shared  --
                                    exponent (2^(e-127))
nvfp4      4-bit e2m1 codes         float8_e4m3fn [N, Kp/16]       float32 [1]: the per-tensor
                                                                   second-level scale
========== ======================= ============================== ==============================

Codes narrower than a byte are packed little-endian per row: code ``i`` of a row occupies bits
``[B*i, B*(i+1))`` of the row's bit stream (int4: two per byte, low nibble = even k; int3: eight
codes in three bytes). e2m1 codes are sign-magnitude: bit 3 is the sign, bits 0-2 index
``E2M1_GRID`` = {0, 0.5, 1, 1.5, 2, 3, 4, 6} (the OCP MX v1.0 FP4 values).

Dequantisation (``dequantize_parts``): ``(q - z) * s`` for int formats (``z = 2^(B-1)`` when
symmetric, 0 for int8); ``NF4[q] * s``; ``fp8(q) * s``; ``e2m1(q) * 2^(e-127)`` (mxfp4);
``e2m1(q) * e4m3(s) * global`` (nvfp4). Codes are always computed against the *stored* (rounded)
scale, so the reference dequantiser reproduces exactly what the quantizer meant. Rounding is
round-half-to-even everywhere (on the integer grid, the NF4/e2m1 tables, and in fp8 casts).

``Kp`` is K padded up to a multiple of the group size (only with ``pad_to_group``); padded columns
are zero and the activation is padded to match.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re

import torch

SCALE_DTYPE = torch.bfloat16
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)
INT_GROUP_BITS = (2, 3, 4)

# NF4 (QLoRA, Dettmers et al. 2023, appendix E): quantiles of N(0, 1) normalised to [-1, 1]
NF4_GRID = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
# FP4 e2m1 magnitudes (OCP Microscaling Formats v1.0, section 5.3.3)
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX, E4M3_MAX = 6.0, 448.0
MX_EMAX_E2M1 = 2  # exponent of the largest e2m1 normal (6 = 1.5 * 2^2)


class FormatError(ValueError):
    """A weight format or its use on a layer is invalid; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class FormatKind:
    """One row of the format table: what a ``WeightFormat.kind`` means.

    Args:
        code_bits: bits per stored code.
        block: fixed block size sharing a scale (None: the format's group_size, or per channel).
        scale_dtype: how block/channel scales are stored.
        second_tensor: what the ``zero`` slot holds ("zero points", "global scale" or None).
    """

    code_bits: int | None  # None: the format's own ``bits``
    block: int | None
    scale_dtype: torch.dtype
    second_tensor: str | None = None


KINDS: dict[str, FormatKind] = {
    "int": FormatKind(None, None, SCALE_DTYPE),
    "nf4": FormatKind(4, None, SCALE_DTYPE),
    "fp8_e4m3": FormatKind(8, None, SCALE_DTYPE),
    "mxfp4": FormatKind(4, 32, torch.uint8),
    "nvfp4": FormatKind(4, 16, torch.float8_e4m3fn, "global scale"),
}


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """A weight-only quantization format.

    Args:
        bits: bits per weight code: 8 (int8 per-channel), 2/3/4 (group-wise int), 4 (nf4, mxfp4,
            nvfp4), 8 (fp8_e4m3).
        group_size: elements of K sharing one scale; None means one scale per output channel.
            Fixed by the kind for mxfp4 (32) and nvfp4 (16).
        symmetric: int formats only: symmetric codes (no zero point) or asymmetric (an integer
            zero point per group).
        kind: ``"int"`` (default), ``"nf4"``, ``"fp8_e4m3"``, ``"mxfp4"`` or ``"nvfp4"``.
    """

    bits: int
    group_size: int | None = None
    symmetric: bool = True
    kind: str = "int"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FormatError(f"unknown weight format kind {self.kind!r}; expected one of {sorted(KINDS)}")
        if self.kind == "int":
            if self.bits == 8:
                if self.group_size is not None or not self.symmetric:
                    raise FormatError(
                        f"int8 weights are per-channel symmetric; got group_size={self.group_size}, "
                        f"symmetric={self.symmetric}. Use bits=8 with group_size=None, symmetric=True, "
                        "or bits=2/3/4 for group-wise formats")
            elif self.bits in INT_GROUP_BITS:
                self._check_group()
            else:
                raise FormatError(f"bits={self.bits} is out of range: int weight formats support bits=8 "
                                  "(per-channel) and bits=2, 3, 4 (group-wise)")
            return
        kind = KINDS[self.kind]
        if not self.symmetric:  # a table format has no integer zero point to be asymmetric with
            raise FormatError(f"format {self.kind}: symmetric=False applies to int formats only ({self.kind} "
                              "codes index a fixed value table scaled per block); drop symmetric=false")
        if self.bits != kind.code_bits:
            raise FormatError(f"format {self.kind} has {kind.code_bits}-bit codes; got bits={self.bits}")
        if kind.block is not None and self.group_size != kind.block:
            raise FormatError(f"format {self.kind} uses blocks of {kind.block}; got group_size={self.group_size}")
        if self.kind == "nf4":
            self._check_group()
        if self.kind == "fp8_e4m3" and self.group_size is not None:
            raise FormatError("fp8_e4m3 weights have one scale per output channel; use group_size=None")

    def _check_group(self) -> None:
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise FormatError(f"{self.kind}{self.bits if self.kind == 'int' else ''} group_size={self.group_size} "
                              f"is not supported; use one of {SUPPORTED_GROUP_SIZES}")

    # -- naming ---------------------------------------------------------------------------
    @property
    def key(self) -> str:
        """Stable string used in op arguments, cache keys and dumps: ``int8``, ``int4_g128_asym``,
        ``int3_g64_sym``, ``nf4_g64``, ``fp8_e4m3``, ``mxfp4``, ``nvfp4``."""
        if self.kind == "int":
            if self.bits == 8:
                return "int8"
            return f"int{self.bits}_g{self.group_size}_{'sym' if self.symmetric else 'asym'}"
        if self.kind == "nf4":
            return f"nf4_g{self.group_size}"
        return self.kind

    @staticmethod
    @functools.lru_cache(maxsize=None)  # kernels parse the key on every call
    def parse(key: str) -> "WeightFormat":
        if key == "int8":
            return WeightFormat(8)
        if key == "fp8_e4m3":
            return WeightFormat(8, None, True, "fp8_e4m3")
        if key in ("mxfp4", "nvfp4"):
            return WeightFormat(4, KINDS[key].block, True, key)
        if m := re.fullmatch(r"int(\d)_g(\d+)_(sym|asym)", key):
            return WeightFormat(int(m.group(1)), int(m.group(2)), m.group(3) == "sym")
        if m := re.fullmatch(r"nf4_g(\d+)", key):
            return WeightFormat(4, int(m.group(1)), True, "nf4")
        if "+" in key:  # N:M sparse kept values in an int format: lowbit_compiler/sparse_formats.py
            from lowbit_compiler.sparse_formats import SparseFormat

            return SparseFormat.parse(key)
        raise FormatError(f"unknown weight format {key!r}; expected 'int8', 'int<2|3|4>_g<G>_<sym|asym>', "
                          "'nf4_g<G>', 'fp8_e4m3', 'mxfp4', 'nvfp4' or 's<N><M>+<int format>'")

    # -- the description ------------------------------------------------------------------
    @property
    def description(self) -> FormatKind:
        return KINDS[self.kind]

    @property
    def packed(self) -> bool:
        """Codes narrower than a byte, packed into a uint8 bit stream per row."""
        return self.bits < 8

    @property
    def has_zero_points(self) -> bool:
        return self.kind == "int" and self.bits < 8 and not self.symmetric

    @property
    def second_tensor(self) -> str | None:
        """What the op's ``zero`` argument carries: "zero points", "global scale" or None."""
        return "zero points" if self.has_zero_points else self.description.second_tensor

    def padded_k(self, k: int) -> int:
        g = self.group_size or 1
        return (k + g - 1) // g * g

    def layout(self, n: int, k: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]] | None]:
        """dtype and shape of each stored tensor for an [n, k] weight (None: absent)."""
        kp = self.padded_k(k)
        if self.packed:
            codes = (torch.uint8, (n, kp * self.bits // 8))
        else:
            codes = (torch.int8 if self.kind == "int" else torch.float8_e4m3fn, (n, kp))
        scales = (self.description.scale_dtype, (n,) if self.group_size is None else (n, kp // self.group_size))
        second = None
        if self.has_zero_points:
            second = (torch.uint8, scales[1])
        elif self.description.second_tensor == "global scale":
            second = (torch.float32, (1,))
        return {"qweight": codes, "scale": scales, "zero": second}

    def storage_bytes(self, n: int, k: int) -> int:
        total = 0
        for entry in self.layout(n, k).values():
            if entry is not None:
                dtype, shape = entry
                total += math.prod(shape) * (torch.finfo(dtype).bits if dtype.is_floating_point
                                             else torch.iinfo(dtype).bits) // 8
        return total

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
    if fmt.kind == "sparse":
        fmt.check(k, layer)
        return
    g = fmt.group_size
    if g is None or k % g == 0 or pad_to_group:
        return
    options = [s for s in SUPPORTED_GROUP_SIZES if k % s == 0] if fmt.kind in ("int", "nf4") else []
    hint = f"use group_size={options[-1]} or " if options else ""
    raise FormatError(f"layer {layer}: K={k} is not a multiple of group_size={g}; "
                      f"{hint}set pad_to_group = true in the recipe")


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------

def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, K] uint8 codes < 2^bits -> [N, K*bits/8] uint8, little-endian bit stream per row
    (K must be a multiple of 8)."""
    n, k = q.shape
    chunks = q.to(torch.int64).view(n, k // 8, 8)
    word = (chunks << (bits * torch.arange(8, device=q.device))).sum(-1)  # 8 codes -> one `bits`-byte word
    out = (word[..., None] >> (8 * torch.arange(bits, device=q.device))) & 0xFF
    return out.to(torch.uint8).reshape(n, k * bits // 8).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    n, nbytes = packed.shape
    words = packed.to(torch.int64).view(n, nbytes // bits, bits)
    word = (words << (8 * torch.arange(bits, device=packed.device))).sum(-1)
    codes = (word[..., None] >> (bits * torch.arange(8, device=packed.device))) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(n, nbytes * 8 // bits)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] uint8 codes in [0, 15] -> [N, K/2] uint8, low nibble = even k."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    n, half = packed.shape
    out = torch.empty(n, half * 2, dtype=torch.uint8, device=packed.device)
    out[:, 0::2] = packed & 0xF
    out[:, 1::2] = packed >> 4
    return out


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    return pack_int4(q) if bits == 4 else pack_codes(q, bits)  # the same layout; int4 is the fast path


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_int4(packed) if bits == 4 else unpack_codes(packed, bits)


# ---------------------------------------------------------------------------------------------
# Value grids
# ---------------------------------------------------------------------------------------------

def round_to_grid(values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Index of the nearest grid value (float64), ties to the even index (= even mantissa for
    e2m1, and the deterministic choice for NF4)."""
    d = (values.double()[..., None] - grid.to(device=values.device, dtype=torch.float64)).abs()
    nearest = d == d.min(-1, keepdim=True).values
    even = nearest & (torch.arange(len(grid), device=values.device) % 2 == 0)
    return torch.where(even.any(-1), even.int().argmax(-1), nearest.int().argmax(-1))


def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """Values already divided by their scale -> 4-bit sign-magnitude e2m1 codes (saturating at 6)."""
    mag = round_to_grid(v.abs().clamp(max=E2M1_MAX), torch.tensor(E2M1_GRID, dtype=torch.float64, device=v.device))
    return (mag | ((v < 0) & (mag > 0)).long() << 3).to(torch.uint8)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    mag = torch.tensor(E2M1_GRID, device=codes.device)[(codes & 7).long()]
    return torch.where(codes >= 8, -mag, mag)


def _e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round to float8 e4m3fn (RNE), saturating at 448 (the cast itself turns overflow into NaN)."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


# ---------------------------------------------------------------------------------------------
# Quantize / dequantize
# ---------------------------------------------------------------------------------------------

# Elements per slice of rows that quantize / sqnr_db / weight_sqnr_db work on at a time: their
# float32/float64 temporaries stay a few MB whatever the weight's size (a 32000 x 2048 head in one
# piece would need several full-size float64 copies: 2.6 GB). Rows are independent in every format
# (nvfp4's one per-tensor scale is computed over the whole weight first), so slicing changes no bit.
CHUNK_ELEMENTS = 1 << 19


def row_chunks(n: int, k: int, chunk_elements: int = CHUNK_ELEMENTS):
    """(start, stop) row ranges of about ``chunk_elements`` elements each."""
    rows = max(1, chunk_elements // max(k, 1))
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


def quantize(w: torch.Tensor, fmt: WeightFormat) -> QuantizedWeight:
    """Round-to-nearest quantization of a [N, K] weight (computed in float32; float64 for the
    table formats). Never produces NaN/Inf: all-zero groups get a tiny positive scale.

    Works on slices of rows (:data:`CHUNK_ELEMENTS`), so its temporaries stay small; the result is
    the same bits as quantizing the whole weight at once."""
    if fmt.kind == "sparse":
        return fmt.quantize(w)
    n, k = w.shape
    if n * k <= CHUNK_ELEMENTS or n == 1:
        return _quantize_rows(w, fmt)
    tensor_scale = None
    if fmt.kind == "nvfp4":
        tensor_scale = _nvfp4_tensor_scale(w.detach().abs().amax().float())
    parts = [_quantize_rows(w[a:b], fmt, tensor_scale) for a, b in row_chunks(n, k)]
    first = parts[0]
    zero = None if first.zero is None else (
        first.zero if fmt.kind == "nvfp4" else torch.cat([p.zero for p in parts]))
    return QuantizedWeight(fmt, torch.cat([p.qweight for p in parts]), torch.cat([p.scale for p in parts]), zero, k)


def _nvfp4_tensor_scale(amax: torch.Tensor) -> torch.Tensor:
    amax = amax.double()  # on w's device, no host round trip; float64 as a Python float was
    return torch.where(amax > 0, amax / (E2M1_MAX * E4M3_MAX), 1.0).float().reshape(1)


def _quantize_rows(w: torch.Tensor, fmt: WeightFormat, tensor_scale: torch.Tensor | None = None) -> QuantizedWeight:
    n, k = w.shape
    w = w.detach().float()
    if fmt.kind == "int" and fmt.bits == 8:
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(SCALE_DTYPE)
        q = torch.round(w / scale.float()[:, None]).clamp(-128, 127).to(torch.int8)
        return QuantizedWeight(fmt, q.contiguous(), scale, None, k)
    if fmt.kind == "fp8_e4m3":
        scale = (w.abs().amax(dim=1) / E4M3_MAX).clamp(min=1e-12).to(SCALE_DTYPE)
        return QuantizedWeight(fmt, _e4m3(w / scale.float()[:, None]).contiguous(), scale, None, k)

    kp, g = fmt.padded_k(k), fmt.group_size
    if kp != k:
        w = torch.nn.functional.pad(w, (0, kp - k))
    wg = w.view(n, kp // g, g)
    absmax = wg.abs().amax(-1)
    zero = None
    if fmt.kind == "int":
        half = 2 ** (fmt.bits - 1)
        top = 2 ** fmt.bits - 1
        if fmt.symmetric:
            scale = (absmax / (half - 0.5)).clamp(min=1e-12).to(SCALE_DTYPE)
            zero_f = torch.full_like(scale, half, dtype=torch.float32)
        else:
            lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
            scale = ((hi - lo) / top).clamp(min=1e-12).to(SCALE_DTYPE)
            zero_f = torch.round(-lo / scale.float()).clamp(0, top)
            zero = zero_f.to(torch.uint8)
        q = (torch.round(wg / scale.float()[..., None]) + zero_f[..., None]).clamp(0, top)
    elif fmt.kind == "nf4":
        scale = absmax.clamp(min=1e-12).to(SCALE_DTYPE)
        q = round_to_grid(wg / scale.float()[..., None], torch.tensor(NF4_GRID, dtype=torch.float64, device=w.device))
    elif fmt.kind == "mxfp4":
        # OCP MX: shared exponent floor(log2(amax)) - emax(e2m1); e8m0 stores it biased by 127
        exp = torch.floor(torch.log2(absmax.double().clamp(min=2.0 ** -126))) - MX_EMAX_E2M1
        exp = torch.where(absmax > 0, exp, torch.full_like(exp, -127.0)).clamp(-127, 127)
        scale = (exp + 127).to(torch.uint8)
        q = e2m1_encode(wg.double() / torch.exp2(exp)[..., None])
    else:  # nvfp4: e4m3 block scales under an fp32 per-tensor scale
        zero = tensor_scale if tensor_scale is not None else _nvfp4_tensor_scale(w.abs().amax())
        scale = _e4m3(absmax / E2M1_MAX / zero)
        block = scale.double() * zero.double()
        block = torch.where(block > 0, block, torch.ones_like(block))
        q = e2m1_encode(wg.double() / block[..., None])
    q = q.to(torch.uint8).view(n, kp)
    return QuantizedWeight(fmt, _pack(q, fmt.bits), scale, zero, k)


def dequantize_parts(fmt: WeightFormat, qweight: torch.Tensor, scale: torch.Tensor,
                     zero: torch.Tensor | None) -> torch.Tensor:
    """The reference dequantiser: float32 [N, Kp] (padded columns included)."""
    if fmt.kind == "sparse":
        return fmt.dequantize_parts(qweight, scale, zero)
    if fmt.kind == "int" and fmt.bits == 8:
        return qweight.float() * scale.float()[:, None]
    if fmt.kind == "fp8_e4m3":
        return qweight.float() * scale.float()[:, None]
    q = _unpack(qweight, fmt.bits)
    n, kp = q.shape
    g = fmt.group_size
    qg = q.view(n, kp // g, g)
    if fmt.kind == "int":
        z = torch.full_like(scale, 2 ** (fmt.bits - 1), dtype=torch.float32) if zero is None else zero.float()
        w = (qg.float() - z[..., None]) * scale.float()[..., None]
    elif fmt.kind == "nf4":
        w = torch.tensor(NF4_GRID, device=q.device)[qg.long()] * scale.float()[..., None]
    elif fmt.kind == "mxfp4":
        w = e2m1_decode(qg) * torch.exp2(scale.float() - 127)[..., None]
    else:  # e2m1 x e4m3 x fp32 needs up to 30 mantissa bits: multiply in float64, round once
        w = (e2m1_decode(qg).double() * (scale.double() * zero.double())[..., None]).float()
    return w.reshape(n, kp)


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """float32 [N, K] (padding removed)."""
    return dequantize_parts(qw.format, qw.qweight, qw.scale, qw.zero)[:, : qw.in_features]


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (float64), over slices of the leading dimension
    so that the float64 temporaries stay small (:data:`CHUNK_ELEMENTS`)."""
    ref2 = reference.reshape(reference.shape[0], -1) if reference.dim() > 1 else reference.reshape(-1, 1)
    app2 = approx.reshape(ref2.shape)
    signal = noise = 0.0
    for a, b in row_chunks(ref2.shape[0], ref2.shape[1]):
        s, e = _sums(ref2[a:b], app2[a:b])
        signal, noise = signal + s, noise + e
    return _db(signal, noise)


def weight_sqnr_db(w: torch.Tensor, qw: QuantizedWeight) -> float:
    """``sqnr_db(w, dequantize(qw))`` without a full-size dequantized copy: slice by slice of rows."""
    return weights_sqnr_db([(w, qw)])


def weights_sqnr_db(pairs: list[tuple[torch.Tensor, QuantizedWeight]]) -> float:
    """The SQNR of several [N, K] weights together (stacked experts), each against its quantized form."""
    signal = noise = 0.0
    for w, qw in pairs:
        n, k = w.shape
        for a, b in row_chunks(n, k):
            zero = None if qw.zero is None else (qw.zero if qw.format.kind == "nvfp4" else qw.zero[a:b])
            approx = dequantize_parts(qw.format, qw.qweight[a:b], qw.scale[a:b], zero)[:, :k]
            s, e = _sums(w[a:b], approx)
            signal, noise = signal + s, noise + e
    return _db(signal, noise)


def _sums(reference: torch.Tensor, approx: torch.Tensor) -> tuple[float, float]:
    """Signal and noise power of one slice, accumulated in float64 by ``vector_norm`` (no float64
    copies of the slice: a third of the backend's time went to them). The difference is formed in
    float32 (float64 when an input is), exact for float32 inputs within a factor of two of each other (Sterbenz) and within
    one float32 rounding (2^-24 relative) otherwise: far below the 0.01 dB the SQNR is read to."""
    dtype = torch.promote_types(torch.promote_types(reference.dtype, approx.dtype), torch.float32)
    ref = reference.to(dtype)  # float64 inputs stay float64
    return (torch.linalg.vector_norm(ref, dtype=torch.float64).item() ** 2,
            torch.linalg.vector_norm(approx.to(dtype) - ref, dtype=torch.float64).item() ** 2)


def _db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise)
