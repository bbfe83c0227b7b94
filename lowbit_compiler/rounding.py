"""Rounding algorithms: how a float weight becomes the codes of a :class:`WeightFormat`.

* ``rtn``: round to nearest (``formats.quantize``), data-free.
* ``mse``: round to nearest under a clipped range, data-free: per group, the range (absmax, or
  [min, max] for asymmetric formats) is shrunk by each ratio of a grid (1.0 down to 0.5) and the
  one with the least squared error is kept (QuaRot's ``w_clip``, llm-compressor's MSE observer).
  Int formats.
* ``hqq``: Half-Quadratic Quantization (Badri & Shaji, 2023), data-free: alternately fit a sparse
  (l_p, p < 1) error with a generalised soft-threshold and re-solve the group's zero point and
  scale in closed form; keeps the best l2 fit seen. Int formats.
* ``spqr``: SpQR-style outliers (Dettmers et al., 2023), data-free: the weights that stretch their
  group's range most are kept in fp16 beside the dense part (see :func:`spqr`).
* ``gptq``: GPTQ (Frantar et al., 2023): quantize one input column at a time and spread its error
  over the columns not yet quantized through the inverse Hessian ``H = 2/n X^T X`` of the layer's
  inputs; blocked (lazy batch updates), damped, optional act-order (columns by decreasing
  ``diag(H)``, with groups kept in storage order), inputs that never fire ("dead": ``H_ii = 0``)
  get zero weight. Int formats.

Every algorithm returns a ``QuantizedWeight`` in the format's own storage, so kernels, dumps and
byte counts do not know which algorithm ran.
"""
from __future__ import annotations

import dataclasses

import torch

from lowbit_compiler.formats import FormatError, QuantizedWeight, WeightFormat, _pack, quantize

ALGORITHMS = ("rtn", "mse", "hqq", "gptq", "awq", "spqr")
# data-driven: compress(..., calibration=...) computes these block by block (awq: scales searched
# and folded into the producers by lowbit_compiler.scale_folding, then round to nearest)
NEEDS_DATA = {"gptq", "awq"}


def _require_int(fmt: WeightFormat, algorithm: str) -> None:
    if fmt.kind != "int":
        raise FormatError(f"{algorithm} is implemented for int formats; {fmt.key} uses rtn")


def _grid(fmt: WeightFormat) -> tuple[int, int, int]:
    """(lowest code, highest code, implicit zero point of symmetric codes)."""
    if fmt.bits == 8:
        return -128, 127, 0
    return 0, 2 ** fmt.bits - 1, 2 ** (fmt.bits - 1)


def _params(w: torch.Tensor, fmt: WeightFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (the float32 value of the stored bf16) and zero point per row of one [N, G] group
    (the whole row for int8), by the format's own scale rule."""
    qw = quantize(w, fmt)
    scale = qw.scale.float().reshape(w.shape[0], -1)[:, 0]
    zero = qw.zero.float().reshape(w.shape[0], -1)[:, 0] if qw.zero is not None else torch.full_like(scale, _grid(fmt)[2])
    return scale, zero


def _fake(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    lo, hi, _ = _grid(fmt)
    return (torch.clamp(torch.round(w / scale) + zero, lo, hi) - zero) * scale


def _store(wq: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, fmt: WeightFormat, k: int) -> QuantizedWeight:
    """Codes of already fake-quantized weights ``wq`` [N, Kp] under per-group ``scales``/``zeros``."""
    n, kp = wq.shape
    lo, hi, _ = _grid(fmt)
    g = fmt.group_size or kp
    s = scales.repeat_interleave(g, dim=1)
    z = zeros.repeat_interleave(g, dim=1)
    codes = torch.clamp(torch.round(wq / s) + z, lo, hi)
    scale = scales.to(torch.bfloat16)
    if fmt.bits == 8:
        return QuantizedWeight(fmt, codes.to(torch.int8).contiguous(), scale[:, 0].contiguous(), None, k)
    zero = None if fmt.symmetric else zeros.to(torch.uint8).contiguous()
    return QuantizedWeight(fmt, _pack(codes.to(torch.uint8), fmt.bits), scale.contiguous(), zero, k)


def rtn(w: torch.Tensor, fmt: WeightFormat) -> QuantizedWeight:
    return quantize(w, fmt)


def mse(w: torch.Tensor, fmt: WeightFormat, ratios: int = 20, lowest: float = 0.5) -> QuantizedWeight:
    """Round to nearest with the per-group clipping ratio of least squared error (module docstring).
    Ratio 1.0 is on the grid, so no group is worse than ``rtn``'s."""
    _require_int(fmt, "mse")
    n, k = w.shape
    w = w.detach().float()
    kp = fmt.padded_k(k) if fmt.group_size else k
    if kp != k:
        w = torch.nn.functional.pad(w, (0, kp - k))
    g = fmt.group_size or kp
    wg = w.view(n, kp // g, g)
    lo_code, hi_code, half = _grid(fmt)
    best_err = torch.full(wg.shape[:2], float("inf"))
    best_scale, best_zero = torch.ones(wg.shape[:2]), torch.zeros(wg.shape[:2])
    for ratio in torch.linspace(1.0, lowest, ratios).tolist():
        if fmt.bits == 8:
            scale = (ratio * wg.abs().amax(-1) / 127.0).clamp(min=1e-12)
            zero = torch.zeros_like(scale)
        elif fmt.symmetric:
            scale = (ratio * wg.abs().amax(-1) / (half - 0.5)).clamp(min=1e-12)
            zero = torch.full_like(scale, half)
        else:
            lo, hi = ratio * wg.amin(-1).clamp(max=0), ratio * wg.amax(-1).clamp(min=0)
            scale = ((hi - lo) / hi_code).clamp(min=1e-12)
            zero = torch.round(-lo / scale.to(torch.bfloat16).float()).clamp(0, hi_code)
        scale = scale.to(torch.bfloat16).float()  # the stored value
        fq = (torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], lo_code, hi_code) - zero[..., None]) \
            * scale[..., None]
        err = (fq - wg).pow(2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    wq = _fake(wg, best_scale[..., None], best_zero[..., None], fmt).reshape(n, kp)
    return _store(wq, best_scale, best_zero, fmt, k)


def gptq(w: torch.Tensor, fmt: WeightFormat, hessian: torch.Tensor, block_size: int = 128, damp: float = 0.01,
         act_order: bool = False) -> QuantizedWeight:
    """GPTQ for a [N, K] weight with the [K, K] Hessian of its inputs (see the module docstring)."""
    _require_int(fmt, "gptq")
    n, k = w.shape
    kp = fmt.padded_k(k)
    W = torch.nn.functional.pad(w.detach().float(), (0, kp - k))
    H = torch.zeros(kp, kp, dtype=torch.float32)
    H[:k, :k] = hessian.float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    g = fmt.group_size or kp
    groups = kp // g
    scales, zeros = torch.empty(n, groups), torch.empty(n, groups)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(kp)
    if act_order:  # static groups: parameters from the weights before any update, in storage order
        for j in range(groups):
            scales[:, j], zeros[:, j] = _params(W[:, j * g:(j + 1) * g], fmt)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(kp)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, kp, block_size):
        i2 = min(i1 + block_size, kp)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            grp = col // g
            if not act_order and col % g == 0:  # a new group starts: fit it to the updated weights
                rest = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]
                scales[:, grp], zeros[:, grp] = _params(rest, fmt)
            q = _fake(W1[:, i], scales[:, grp], zeros[:, grp], fmt)
            Q[:, i1 + i] = q
            err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    Q = Q[:, torch.argsort(perm)]
    return _store(Q, scales, zeros, fmt, k)


def hqq(w: torch.Tensor, fmt: WeightFormat, iters: int = 20, p: float = 0.7, beta: float = 10.0,
        kappa: float = 1.01) -> QuantizedWeight:
    """HQQ for a [N, K] weight (see the module docstring); starts from RTN's parameters."""
    _require_int(fmt, "hqq")
    n, k = w.shape
    kp = fmt.padded_k(k)
    g = fmt.group_size or kp
    W = torch.nn.functional.pad(w.detach().float(), (0, kp - k)).view(n, kp // g, g)
    lo, hi, zsym = _grid(fmt)
    start = quantize(w, fmt)
    s = start.scale.float().reshape(n, -1)[..., None]
    z = (start.zero.float() if start.zero is not None else torch.full((n, kp // g), float(zsym))).reshape(n, -1)[..., None]
    best_err, best = ((_fake(W, s, z, fmt) - W) ** 2).sum(-1, keepdim=True), (s.clone(), z.clone())
    for _ in range(iters):
        q = torch.clamp(torch.round(W / s + z), lo, hi)
        e = W - (q - z) * s
        e = torch.sign(e) * torch.relu(e.abs() - (1.0 / beta) * e.abs().clamp(min=1e-12) ** (p - 1))  # l_p shrink
        target = W - e  # what the codes should reproduce
        if not fmt.symmetric:
            z = torch.clamp(torch.round((q - target / s).mean(-1, keepdim=True)), lo, hi)
        c = q - z
        s = ((target * c).sum(-1, keepdim=True) / (c * c).sum(-1, keepdim=True).clamp(min=1e-12)).clamp(min=1e-12)
        s = s.to(torch.bfloat16).float()  # the stored precision
        err = ((_fake(W, s, z, fmt) - W) ** 2).sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = (torch.where(better, s, best[0]), torch.where(better, z, best[1]))
        beta *= kappa
    s, z = best
    Wq = _fake(W, s, z, fmt).reshape(n, kp)
    return _store(Wq, s.reshape(n, -1), z.reshape(n, -1), fmt, k)


@dataclasses.dataclass
class Outliers:
    """Weights kept exactly (fp16) beside a quantized dense part: COO rows, columns, values."""

    rows: torch.Tensor    # int32 [nnz]
    cols: torch.Tensor    # int32 [nnz]
    values: torch.Tensor  # float16 [nnz]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rows, self.cols, self.values))


def spqr(w: torch.Tensor, fmt: WeightFormat, fraction: float = 0.01) -> tuple[QuantizedWeight, Outliers]:
    """SpQR-style outliers, data-free: the ``fraction`` of weights that stretch their group's range
    most (largest ``|w|`` relative to the group's median ``|w|``: the ones that make every other
    weight's grid coarse and carry the largest error there) are kept in fp16 and zeroed in the
    dense part, which is then quantized with its groups' ranges shrunk."""
    w = w.detach().float()
    n, k = w.shape
    g = fmt.group_size or k
    kp = fmt.padded_k(k)
    groups = torch.nn.functional.pad(w.abs(), (0, kp - k)).view(n, kp // g, g)
    score = (groups / groups.median(-1, keepdim=True).values.clamp(min=1e-12)).view(n, kp)[:, :k]
    count = max(1, int(fraction * w.numel()))
    flat = torch.topk(score.flatten(), count).indices
    rows, cols = flat // k, flat % k
    dense = w.clone()
    dense[rows, cols] = 0.0
    outliers = Outliers(rows.to(torch.int32), cols.to(torch.int32), w[rows, cols].to(torch.float16))
    return quantize(dense, fmt), outliers
