"""N:M sparse weight formats: the kept values of every group of M consecutive input columns (at
most N of them), their positions, and the int8 / int4 codes and scales of those values.

A :class:`SparseFormat` is ``s<N><M>+<inner key>`` (``s24+int4_g128_asym``, ``s24+int8``,
``s48+int4_g128_sym``; ``s<N>_<M>+...`` when M > 9). It behaves as a
:class:`~lowbit_compiler.formats.WeightFormat` everywhere a format is read (``WeightFormat.parse``
returns it for such keys; ``formats.quantize`` / ``dequantize_parts`` dispatch on
``kind == "sparse"``), so ``lowbit::wo_linear``, the offline modules, checkpoints and dumps carry
it without knowing it is sparse. Its storage for an [N_out, K] weight, with ``Kc = K * N / M``
kept values per row:

=========== ====================================================================================
``qweight`` uint8 [N_out, Bc + Bm]: per row, the inner format's codes of the ``Kc`` kept values
            (``Bc`` bytes: int8 codes as bytes, or the packed 4-bit stream) followed by their
            metadata (``Bm = Kc * ceil(log2 M) / 8`` bytes): the index of each kept value inside
            its group of M, a ``ceil(log2 M)``-bit little-endian bit stream (``formats.pack_codes``;
            2:4: 2 bits per kept value, the layout of sparse tensor cores' metadata)
``scale``   the inner format's scales over the compressed [N_out, Kc] matrix (its groups are
            groups of *kept* values: ``int4_g128`` under 2:4 spans 256 input columns)
``zero``    the inner format's zero points, when it has them
=========== ====================================================================================

Kept values are stored in column order inside their group; a group with fewer than N nonzeros
keeps zeros (their code dequantizes to exactly 0: zero points are integers, symmetric int grids
hold 0). 2:4 + int4 g128 asym is 2 + 1 + 24/256 = 3.09 bits per weight.

Which values are kept is the pruning pass's decision (``passes/sparsify``); :func:`nm_mask` is the
selection every score shares (the N largest scores of each group of M), and ``quantize`` on a
sparse format keeps the N largest magnitudes (magnitude pruning, then round to nearest).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re

import torch

from lowbit_compiler import formats
from lowbit_compiler.formats import FormatError, QuantizedWeight, WeightFormat

_KEY = re.compile(r"s(?:(\d)(\d)|(\d+)_(\d+))\+(.+)")


def meta_bits(m: int) -> int:
    """Bits of one kept value's index inside its group of ``m``."""
    return max(1, math.ceil(math.log2(m)))


@dataclasses.dataclass(frozen=True)
class SparseFormat:
    """N:M structured sparsity over the input dimension, kept values in an int format.

    Args:
        n: values kept per group (at most).
        m: group size along K (consecutive input columns).
        inner: the format of the kept values (int8 per channel, or int2/3/4 group-wise over the
            compressed K).
    """

    n: int
    m: int
    inner: WeightFormat

    kind = "sparse"

    def __post_init__(self) -> None:
        if not (0 < self.n < self.m <= 64):
            raise FormatError(f"N:M sparsity needs 0 < N < M <= 64; got {self.n}:{self.m}")
        if self.inner.kind != "int" or isinstance(self.inner, SparseFormat):
            raise FormatError(f"sparse format {self.n}:{self.m}: kept values are stored in int formats (int8, "
                              f"int<2|3|4>_g<G>_<sym|asym>); got {self.inner.key}")

    # -- naming ---------------------------------------------------------------------------
    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def key(self) -> str:
        nm = f"{self.n}{self.m}" if self.m < 10 else f"{self.n}_{self.m}"
        return f"s{nm}+{self.inner.key}"

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def parse(key: str) -> "SparseFormat":
        match = _KEY.fullmatch(key)
        if match is None:
            raise FormatError(f"unknown sparse weight format {key!r}; expected 's<N><M>+<int format>' such as "
                              "'s24+int4_g128_asym' or 's24+int8'")
        n, m = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
        return SparseFormat(int(n), int(m), WeightFormat.parse(match.group(5)))

    # -- what the rest of the compiler reads of a format ---------------------------------------
    bits = property(lambda self: self.inner.bits)
    symmetric = property(lambda self: self.inner.symmetric)
    group_size = None  # groups are over the compressed K (``inner.group_size``); K itself is never padded
    packed = True
    has_zero_points = property(lambda self: self.inner.has_zero_points)
    second_tensor = property(lambda self: self.inner.second_tensor)
    description = property(lambda self: self.inner.description)

    def padded_k(self, k: int) -> int:
        return k

    def kept(self, k: int) -> int:
        return k * self.n // self.m

    def check(self, k: int, layer: str) -> None:
        """Raise a FormatError naming the layer and the fix when K does not fit."""
        kc = self.kept(k) if k % self.m == 0 else 0
        g = self.inner.group_size or 8
        if k % self.m or kc % 8 or kc % g:
            raise FormatError(f"layer {layer}: K={k} does not fit sparse format {self.key}: K must be a multiple of "
                              f"M={self.m} and its K*N/M={k * self.n / self.m:g} kept values a multiple of 8 and of "
                              f"the group size {g}; exclude the layer or use a smaller group_size")

    def _code_bytes(self, kc: int) -> int:
        return kc if self.inner.bits == 8 else kc * self.inner.bits // 8

    def layout(self, n: int, k: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]] | None]:
        kc = self.kept(k)
        inner = self.inner.layout(n, kc)
        return {"qweight": (torch.uint8, (n, self._code_bytes(kc) + kc * meta_bits(self.m) // 8)),
                "scale": inner["scale"], "zero": inner["zero"]}

    def storage_bytes(self, n: int, k: int) -> int:
        kc = self.kept(k)
        return self.inner.storage_bytes(n, kc) - self._code_bytes(kc) * n + self.layout(n, k)["qweight"][1][1] * n

    def bits_per_weight(self, n: int, k: int) -> float:
        return self.storage_bytes(n, k) * 8 / (n * k)

    # -- storage --------------------------------------------------------------------------
    def compress(self, w: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([N_out, Kc] kept values, [N_out, Kc] uint8 indices inside their group) of ``w`` under a
        mask with exactly N True per group of M (:func:`nm_mask`)."""
        rows, k = w.shape
        groups = mask.view(rows, k // self.m, self.m)
        if not bool((groups.sum(-1) == self.n).all()):
            raise FormatError(f"sparse format {self.key}: the mask must keep exactly {self.n} of every {self.m} "
                              "columns (use sparse_formats.nm_mask)")
        # positions of the kept columns in column order: the stable sort puts True first, in order
        idx = torch.sort((~groups).to(torch.uint8), dim=-1, stable=True).indices[..., : self.n]
        values = torch.gather(w.view(rows, k // self.m, self.m), -1, idx)
        return values.reshape(rows, -1), idx.reshape(rows, -1).to(torch.uint8)

    def expand(self, values: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
        """Inverse of :meth:`compress`: the dense [N_out, K] matrix, zeros where nothing is kept."""
        rows = values.shape[0]
        out = torch.zeros(rows, k // self.m, self.m, dtype=values.dtype, device=values.device)
        out.scatter_(-1, index.long().view(rows, k // self.m, self.n), values.view(rows, k // self.m, self.n))
        return out.view(rows, k)

    def pack(self, inner: QuantizedWeight, index: torch.Tensor) -> QuantizedWeight:
        """The sparse storage from the inner format's quantized kept values and their indices."""
        codes = inner.qweight.view(torch.uint8) if inner.qweight.dtype == torch.int8 else inner.qweight
        qweight = torch.cat([codes, formats.pack_codes(index, meta_bits(self.m))], dim=1).contiguous()
        return QuantizedWeight(self, qweight, inner.scale, inner.zero, index.shape[1] * self.m // self.n)

    def unpack(self, qweight: torch.Tensor, scale: torch.Tensor,
               zero: torch.Tensor | None) -> tuple[QuantizedWeight, torch.Tensor]:
        """(the inner format's quantized kept values, their uint8 indices) of a stored weight."""
        rows, nbytes = qweight.shape
        kc = nbytes * 8 // (self.inner.bits + meta_bits(self.m))
        cb = self._code_bytes(kc)
        codes = qweight[:, :cb]
        if self.inner.bits == 8:
            codes = codes.contiguous().view(torch.int8)
        index = formats.unpack_codes(qweight[:, cb:].contiguous(), meta_bits(self.m))
        return QuantizedWeight(self.inner, codes.contiguous(), scale, zero, kc), index

    def dequantize_parts(self, qweight: torch.Tensor, scale: torch.Tensor,
                         zero: torch.Tensor | None) -> torch.Tensor:
        inner, index = self.unpack(qweight, scale, zero)
        values = formats.dequantize(inner)
        return self.expand(values, index, inner.in_features * self.m // self.n)

    @property
    def dense_format(self) -> WeightFormat:
        """The dense int format that stores the same weight with zeros (exports: vLLM takes 2:4
        models as dense weights with zeros): the inner format with groups of ``G * M / N`` input
        columns, which hold exactly the ``G`` kept values of one compressed group."""
        g = self.inner.group_size
        return WeightFormat(self.inner.bits, None if g is None else g * self.m // self.n, self.inner.symmetric)

    def to_dense(self, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> QuantizedWeight:
        """The stored weight as :attr:`dense_format` codes (pruned positions hold the code of 0),
        the same scales and zero points: dequantizes to exactly the same matrix."""
        inner, index = self.unpack(qweight, scale, zero)
        rows, kc = index.shape
        k = kc * self.m // self.n
        if self.inner.bits == 8:
            codes = inner.qweight.to(torch.int16)
            zero_code = torch.zeros(rows, k, dtype=torch.int16)
        else:
            codes = formats._unpack(inner.qweight, self.inner.bits).to(torch.int16)
            g = self.inner.group_size
            z = (zero.to(torch.int16) if zero is not None
                 else torch.full(scale.shape, 2 ** (self.inner.bits - 1), dtype=torch.int16))
            zero_code = z.repeat_interleave(g * self.m // self.n, dim=1)
        dense = zero_code.clone()
        # each kept code to its column, as expand() does (a stream out of column order included)
        dense.view(rows, k // self.m, self.m).scatter_(-1, index.long().view(rows, k // self.m, self.n),
                                                       codes.reshape(rows, k // self.m, self.n))
        fmt = self.dense_format
        if self.inner.bits == 8:
            return QuantizedWeight(fmt, dense.to(torch.int8).contiguous(), scale, None, k)
        return QuantizedWeight(fmt, formats._pack(dense.to(torch.uint8), self.inner.bits), scale, zero, k)

    def quantize(self, w: torch.Tensor) -> QuantizedWeight:
        """Magnitude N:M pruning, then round to nearest of the kept values. A weight already N:M
        sparse (a pruning pass ran) keeps exactly its nonzeros."""
        self.check(w.shape[1], "<weight>")
        mask = nm_mask(w.detach().float().abs(), self.n, self.m)
        values, index = self.compress(w.detach().float(), mask)
        return self.pack(formats.quantize(values, self.inner), index)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool [rows, K] keeping the ``n`` highest scores of every ``m`` consecutive columns (ties:
    the lower column)."""
    rows, k = score.shape
    if k % m:
        raise FormatError(f"N:M sparsity: K={k} is not a multiple of M={m}")
    groups = score.reshape(rows, k // m, m)
    top = torch.topk(groups, n, dim=-1, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return mask.view(rows, k)


def unstructured_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask keeping the highest scores of each row, pruning ``round(sparsity * K)`` per row
    (Wanda's per-output comparison group; magnitude pruning uses the same)."""
    rows, k = score.shape
    drop = int(round(sparsity * k))
    mask = torch.ones_like(score, dtype=torch.bool)
    if drop:
        low = torch.topk(score, drop, dim=-1, largest=False).indices
        mask.scatter_(-1, low, False)
    return mask
