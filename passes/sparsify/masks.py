"""Which weights to zero, and what the kept ones become: the math of the sparsify passes.

* :func:`score_prune`: magnitude (``|W|``) or Wanda (``|W| * ||x||_2`` per input channel, Sun et
  al. 2023) scores; N:M keeps the N highest of every M consecutive input columns, unstructured
  drops the lowest ``sparsity`` of every row (Wanda's per-output comparison group). Kept weights
  are unchanged.
* :func:`sparsegpt`: SparseGPT (Frantar & Alistarh, 2023): columns are visited left to right in
  blocks; at the start of each group of M columns (or of each block, unstructured) the mask is
  chosen by the OBS saliency ``w^2 / [H^-1]_cc^2`` on the *current* (already error-updated)
  weights, each column is pruned (and, given a format, rounded) and its error is spread over the
  columns to its right through the Cholesky factor of ``H^-1`` (the same lazy batch updates and
  damping as GPTQ, ``lowbit_compiler/rounding.py``). With a :class:`SparseFormat` the kept values
  are rounded in the same sweep (the paper's joint sparsify + quantize): every group of the
  inner format (``G`` kept values = ``G * M / N`` input columns) gets its scale and zero point
  when the sweep reaches it, by the format's min-max rule over the values that would be kept at
  that point (the N largest of each M); the error compensated is the error of the stored value.

Every function returns the pruned dense float32 weight and its keep mask; ``output_error`` is the
error a layer's outputs see on calibration data, ``tr(dW H dW^T) / tr(W H W^T)``.
"""
from __future__ import annotations

import torch

from lowbit_compiler import rounding
from lowbit_compiler.formats import QuantizedWeight
from lowbit_compiler.sparse_formats import SparseFormat, nm_mask, unstructured_mask

SCORES = ("magnitude", "wanda", "sparsegpt")


def score_prune(w: torch.Tensor, pattern: tuple[int, int] | None, sparsity: float,
                channel_norm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned float32 [N, K], keep mask) by magnitude, or by Wanda's score given the input
    channels' L2 norms ``channel_norm`` [K]."""
    w = w.detach().float()
    score = w.abs() if channel_norm is None else w.abs() * channel_norm.float()[None, :]
    mask = nm_mask(score, *pattern) if pattern else unstructured_mask(score, sparsity)
    return w * mask, mask


def sparsegpt(w: torch.Tensor, hessian: torch.Tensor, pattern: tuple[int, int] | None, sparsity: float = 0.5,
              fmt: SparseFormat | None = None, block_size: int = 128, damp: float = 0.01
              ) -> tuple[torch.Tensor, torch.Tensor, QuantizedWeight | None]:
    """SparseGPT for a [N, K] weight with the [K, K] Hessian ``2/n X^T X`` of its inputs (module
    docstring). Returns (pruned float32 [N, K] weight, keep mask, the stored weight in ``fmt`` or
    None). ``fmt`` (joint quantization) needs an N:M ``pattern`` equal to its own."""
    rows, k = w.shape
    W = w.detach().float().clone()
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    n, m = pattern if pattern else (0, 0)
    keep = torch.zeros(rows, k, dtype=torch.bool)
    Q = torch.zeros_like(W)
    if fmt is not None:
        inner = fmt.inner
        span = (inner.group_size or fmt.kept(k)) * fmt.m // fmt.n  # input columns per scale group
        scales = torch.ones(rows, k // span)
        zeros = torch.zeros(rows, k // span)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        Err1 = torch.zeros_like(W1)
        keep1 = torch.ones_like(W1, dtype=torch.bool)
        if not pattern:
            keep1 = unstructured_mask(W1 ** 2 / d[None, :] ** 2, sparsity)
        for i in range(i2 - i1):
            c = i1 + i
            if pattern and i % m == 0:
                keep1[:, i:i + m] = nm_mask(W1[:, i:i + m] ** 2 / d[None, i:i + m] ** 2, n, m)
            if fmt is not None and c % span == 0:
                current = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :span]
                values, _ = fmt.compress(current, nm_mask(current.abs(), fmt.n, fmt.m))
                s, z = rounding._params(values, inner)
                scales[:, c // span], zeros[:, c // span] = s[:, 0], z[:, 0]
            q = W1[:, i] * keep1[:, i]
            if fmt is not None:
                q = rounding._fake(q, scales[:, c // span], zeros[:, c // span], inner)
            Q[:, c] = q
            err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        keep[:, i1:i2] = keep1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    stored = None
    if fmt is not None:
        values, index = fmt.compress(Q, keep)
        stored = fmt.pack(rounding._store(values, scales, zeros, fmt.inner, values.shape[1]), index)
    return Q, keep, stored


def output_error(w: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative output error on the calibration inputs: ``tr(dW H dW^T) / tr(W H W^T)``."""
    w, d, h = w.double(), approx.double() - w.double(), hessian.double()
    total = float(((w @ h) * w).sum())
    return float(((d @ h) * d).sum()) / total if total > 0 else 0.0
