"""Rounding algorithms: how a float weight becomes the codes of a :class:`WeightFormat`.

* ``rtn``: round to nearest (``formats.quantize``), data-free.
* ``mse``: round to nearest under a clipped range, data-free: per group, the range (absmax, or
  [min, max] for asymmetric formats) is shrunk by each ratio of a grid (1.0 down to 0.5) and the
  one with the least squared error is kept (QuaRot's ``w_clip``, llm-compressor's MSE observer).
  Int formats.
* ``hqq``: Half-Quadratic Quantization (Badri & Shaji, 2023), data-free: alternately fit a sparse
  (l_p, p < 1) error with a generalised soft-threshold and re-solve the group's zero point and
  scale in closed form; keeps the best l2 fit seen. Int formats.
* ``gptq``: GPTQ (Frantar et al., 2023): quantize one input column at a time and spread its error
  over the columns not yet quantized through the inverse Hessian ``H = 2/n X^T X`` of the layer's
  inputs; blocked (lazy batch updates), damped, act-order by default (columns by decreasing
  ``diag(H)``, with groups kept in storage order), inputs that never fire ("dead": ``H_ii = 0``)
  get zero weight. Int formats.

Every algorithm returns a ``QuantizedWeight`` in the format's own storage, so kernels, dumps and
byte counts do not know which algorithm ran.
"""
from __future__ import annotations


import torch

from lowbit_compiler.formats import FormatError, QuantizedWeight, WeightFormat, _pack, quantize


def _require_int(fmt: WeightFormat, algorithm: str) -> None:
    if fmt.kind != "int":
        raise FormatError(f"{algorithm} is implemented for int formats; {fmt.key} uses rtn")


def _grid(fmt: WeightFormat) -> tuple[int, int, int]:
    """(lowest code, highest code, implicit zero point of symmetric codes)."""
    if fmt.bits == 8:
        return -128, 127, 0
    return 0, 2 ** fmt.bits - 1, 2 ** (fmt.bits - 1)


def _params(w: torch.Tensor, fmt: WeightFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales (the float32 values of the stored bf16) and zero points [N, groups] of a [N, Kp]
    weight by the format's own scale rule (min-max; one group per row for int8): what ``quantize``
    stores for it."""
    qw = quantize(w, fmt)
    scale = qw.scale.float().reshape(w.shape[0], -1)
    zero = qw.zero.float().reshape(scale.shape) if qw.zero is not None else torch.full_like(scale, _grid(fmt)[2])
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
         act_order: bool = True) -> QuantizedWeight:
    """GPTQ for a [N, K] weight with the [K, K] Hessian of its inputs (see the module docstring).

    The same algorithm as llm-compressor's ``GPTQModifier`` (0.14) with its defaults:

    * static groups: every group's scale and zero point is fixed once, from the weight before any
      update (dead inputs zeroed), by the format's own min-max rule, in storage order. Refitting a
      group to the error-updated weights when the loop reaches it stretches its range by the
      compensation already pushed into it, and loses at 3 bits;
    * ``act_order`` (default on, llm-compressor's ``actorder="static"``): columns are quantized by
      decreasing ``diag(H)`` while groups stay in storage order, so the stored format is unchanged.
      In storage order the inputs that carry the most energy are often rounded late, when the
      columns that could have absorbed their error are already fixed.

    Never worse than round to nearest in ``tr(dW H dW^T)`` on the given Hessian: where GPTQ's
    result is worse (heavy damping, an ill-conditioned Hessian), round to nearest's is returned.
    Scales are the stored bf16 values throughout: the error compensated is the error kernels see."""
    _require_int(fmt, "gptq")
    n, k = w.shape
    kp = fmt.padded_k(k)
    g = fmt.group_size or kp
    W0 = torch.nn.functional.pad(w.detach().float(), (0, kp - k))
    H = torch.zeros(kp, kp, dtype=torch.float32, device=W0.device)
    H[:k, :k] = hessian.to(W0.device, torch.float32)
    expand = lambda p: p.repeat_interleave(g, dim=1)  # noqa: E731  per group -> per column
    rtn_scales, rtn_zeros = _params(W0, fmt)
    D = _fake(W0, expand(rtn_scales), expand(rtn_zeros), fmt) - W0
    rtn_err = float(((D @ H) * D).sum(dtype=torch.float64))  # tr(dW H dW^T) of round to nearest
    del D
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W = W0.masked_fill(dead, 0.0)
    scales, zeros = _params(W, fmt) if dead.any() else (rtn_scales, rtn_zeros)  # static: before any update
    order = torch.argsort(torch.diag(H), descending=True, stable=True)  # act order: most energy first
    perm = order if act_order else torch.arange(kp, device=H.device)
    S, Z = expand(scales)[:, perm], expand(zeros)[:, perm]  # per column, in quantization order
    W, H = W[:, perm], H[perm][:, perm]
    lam = damp * torch.mean(torch.diag(H))
    H += lam * torch.eye(kp, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    del H
    Q = torch.zeros_like(W)
    loss = 0.0
    for i1 in range(0, kp, block_size):
        i2 = min(i1 + block_size, kp)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            q = _fake(W1[:, i], S[:, i1 + i], Z[:, i1 + i], fmt)
            Q[:, i1 + i] = q
            err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        loss += float(Err1.pow(2).sum(dtype=torch.float64))
    Q = Q[:, torch.argsort(perm)]
    # tr(dW H dW^T) of the result is ||Err||^2 under the damped Hessian (H^-1 = U^T U, dW = Err U),
    # less the damping's share; dead inputs carry no error (weight and code both 0 there)
    gptq_err = loss - float(lam) * float((Q - W0.masked_fill(dead, 0.0)).pow(2).sum(dtype=torch.float64))
    if rtn_err < gptq_err:  # round to nearest is better on this Hessian: keep it
        return quantize(w, fmt)
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
