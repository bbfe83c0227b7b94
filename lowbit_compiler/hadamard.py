"""Hadamard matrices and the fast transform behind ``lowbit::hadamard`` (online rotations).

A Hadamard matrix ``H`` of order n has entries +-1 and ``H H^T = n I``; ``H / sqrt(n)`` is an
orthogonal rotation that spreads every input channel over all outputs, which is what flattens
activation outliers before quantization (QuaRot). Orders supported: ``n = 2^k * m`` with ``m`` one
of :data:`KNOWN_ORDERS` -- 1 (Sylvester), an order built by Paley's constructions over a finite
field: 12, 20, 28, 36, 44, 52 (GF(25)), 60, 108, 140, or by the Goethals-Seidel array: 156, 172
(and so 40 = 2 * 20, 5632 = 44 * 128, 14336 = 28 * 512, 11008 = 172 * 64, 13824 = 108 * 128).
Other sizes are refused with the reason (:func:`unsupported_reason`).

The transform (:func:`transform`) is ``x @ H_n / sqrt(n)`` on the last dimension, computed as a
chain of small matmuls: ``H_n = H_m (x) H_f1 (x) H_f2 ...`` with Sylvester factors of at most 16,
so x is viewed as ``[..., m, f1, f2, ...]`` and each factor is one (batched) matmul along its own
axis -- no transposes, no copies between stages. 4096 = 16 * 16 * 16 is three matmuls of width 16
(on 2 CPU cores 4-8x the time of a copy of x at 64-1024 rows, against 7-33x for 64 * 64, radix-2
butterflies or 4-wide factors: ``benchmarks/hadamard_cpu.py``).
"""
from __future__ import annotations

import functools
import math

import torch

# m -> (construction, q): Paley I (q = 3 mod 4, order q + 1), Paley II (q = 1 mod 4, order 2(q + 1)),
# Goethals-Seidel (order 4q, from the sequences below)
KNOWN_ORDERS = {1: ("sylvester", 1), 12: ("paley1", 11), 20: ("paley1", 19), 28: ("paley2", 13),
                36: ("paley2", 17), 44: ("paley1", 43), 52: ("paley2", 25), 60: ("paley1", 59),
                108: ("paley1", 107), 140: ("paley1", 139), 156: ("goethals_seidel", 39),
                172: ("goethals_seidel", 43)}
_MAX_FACTOR = 16  # measured: 16x16x16 beats 64x64 and the radix-2 butterfly for 4096 on CPU


def split_order(n: int) -> tuple[int, int] | None:
    """``(m, 2^k)`` with ``n = m * 2^k`` and m a known order (the largest such m), or None."""
    for m in sorted(KNOWN_ORDERS, reverse=True):
        if n % m == 0 and (p := n // m) & (p - 1) == 0:
            return m, p
    return None


def unsupported_reason(n: int) -> str | None:
    if n < 1:
        return f"size {n}: a Hadamard transform needs a positive size"
    if split_order(n) is None:
        known = ", ".join(str(m) for m in sorted(KNOWN_ORDERS) if m > 1)
        return f"size {n} is not a power of two times a known Hadamard order ({known})"
    return None


def _legendre(a: int, q: int) -> int:
    a %= q
    if a == 0:
        return 0
    return 1 if pow(a, (q - 1) // 2, q) == 1 else -1


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = chi(x_j - x_i)`` over GF(q), chi the quadratic character: q prime, or q = p^2
    (GF(p)[t] / (t^2 - r), r a non-residue mod p; elements a + b t numbered a + p b)."""
    if all(q % d for d in range(2, int(q ** 0.5) + 1)):
        idx = torch.arange(q)
        table = torch.tensor([_legendre(a, q) for a in range(q)], dtype=torch.float64)
        return table[(idx[None, :] - idx[:, None]) % q]
    p = int(round(q ** 0.5))
    assert p * p == q, q
    r = next(r for r in range(2, p) if _legendre(r, p) == -1)
    squares = {((a * a + r * b * b) % p, (2 * a * b) % p) for a in range(p) for b in range(p) if a or b}
    elems = [(a, b) for b in range(p) for a in range(p)]
    chi = lambda e: 0 if e == (0, 0) else (1 if e in squares else -1)  # noqa: E731
    return torch.tensor([[chi(((xj[0] - xi[0]) % p, (xj[1] - xi[1]) % p)) for xj in elems] for xi in elems],
                        dtype=torch.float64)


# Goethals-Seidel: four +-1 sequences of length v whose periodic autocorrelations sum to zero give
# a Hadamard matrix of order 4v. Each sequence is -1 on a set D_i of a supplementary difference set
# 4-{v; k_1..k_4; sum k - v} built from unions of orbits of a multiplier group (found by a
# meet-in-the-middle search over those unions): v = 43 with the order-7 subgroup <41> of Z_43^*
# (k = 15, 21, 21, 21), v = 39 with <16> of Z_39^* (k = 14, 17, 18, 19). Verified H H^T = 4v I.
_GOETHALS_SEIDEL = {
    43: ("---+-+++-++-++++-++++--++++-++++-++-+++-+--", "+-+----+++---+++-++---+--++++++-+-+-+--+--+",
         "+-----++-++--+++-++----++++-++++--+-+-+-+--", "+-----++-++--+++-++----++++-++++--+-+-+-+--"),
    39: ("--++++++-++----+-+++-+-++++++--++++--++", "-++-++++--+-+--++++---++-++---+-+-+-+++",
         "+-------+--++++--+-+++-++-+-++++-+-++-+", "-------++--+++---+-+++-++-+-+-++-++-+++"),
}


def _goethals_seidel(v: int) -> torch.Tensor:
    def circulant(seq: str) -> torch.Tensor:
        row = torch.tensor([1.0 if c == "+" else -1.0 for c in seq], dtype=torch.float64)
        idx = torch.arange(v)
        return row[(idx[None, :] - idx[:, None]) % v]

    a, b, c, d = (circulant(s) for s in _GOETHALS_SEIDEL[v])
    r = torch.flip(torch.eye(v, dtype=torch.float64), [0])
    return torch.cat([torch.cat([a, b @ r, c @ r, d @ r], 1),
                      torch.cat([-b @ r, a, d.T @ r, -c.T @ r], 1),
                      torch.cat([-c @ r, -d.T @ r, a, b.T @ r], 1),
                      torch.cat([-d @ r, c.T @ r, -b.T @ r, a], 1)], 0)


@functools.lru_cache(maxsize=None)
def _base(m: int) -> torch.Tensor:
    kind, q = KNOWN_ORDERS[m]
    if kind == "sylvester":
        return torch.ones(1, 1, dtype=torch.float64)
    if kind == "goethals_seidel":
        return _goethals_seidel(q)
    Q = _jacobsthal(q)
    ones = torch.ones(q, dtype=torch.float64)
    if kind == "paley1":  # skew conference matrix C, H = I + C
        C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        C[0, 1:], C[1:, 0], C[1:, 1:] = ones, -ones, Q
        return torch.eye(q + 1, dtype=torch.float64) + C
    C = torch.zeros(q + 1, q + 1, dtype=torch.float64)  # paley2: symmetric conference matrix
    C[0, 1:], C[1:, 0], C[1:, 1:] = ones, ones, Q
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


@functools.lru_cache(maxsize=None)
def _sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def factors(n: int) -> list[torch.Tensor]:
    """The unnormalised +-1 matrices whose Kronecker product is H_n, largest axis first."""
    reason = unsupported_reason(n)
    if reason is not None:
        raise ValueError(reason)
    m, p = split_order(n)
    out = [_base(m)] if m > 1 else []
    bits = p.bit_length() - 1
    stages = -(-bits // (_MAX_FACTOR.bit_length() - 1))  # as few stages as factors <= _MAX_FACTOR allow
    for i in range(stages):  # bits spread evenly: 512 = 8 * 8 * 8, not 16 * 16 * 2 (a 2-wide stage is slow)
        out.append(_sylvester(2 ** (bits // stages + (i < bits % stages))))
    return out or [torch.ones(1, 1, dtype=torch.float64)]


def split_two(n: int) -> tuple[int, int]:
    """``(A, B)`` with ``H_n = H_A (x) H_B`` (``kron_factor``): ``A = m * 2^c`` carries the known
    order m, ``B = 2^j``, both as close to sqrt(n) as the split allows (the Triton kernel's two
    matmuls)."""
    reason = unsupported_reason(n)
    if reason is not None:
        raise ValueError(reason)
    m, p = split_order(n)
    best = None
    c = 1
    while c <= p:
        a, b = m * c, p // c
        if best is None or abs(math.log(a / b)) < abs(math.log(best[0] / best[1])):
            best = (a, b)
        c *= 2
    return best


def kron_factor(a: int) -> torch.Tensor:
    """The unnormalised H_a of :func:`split_two`: ``H_m (x) S_(2^c)`` (Sylvester) for ``a = m * 2^c``."""
    m, p = split_order(a)
    return torch.kron(_base(m), _sylvester(p)) if m > 1 else _sylvester(p)


def matrix(n: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
    """The orthogonal ``H_n / sqrt(n)`` (built in float64 on ``device``, then cast to ``dtype``;
    ``transform`` never builds it)."""
    h = torch.ones(1, 1, dtype=torch.float64, device=device)
    for f in factors(n):
        h = torch.kron(h, f.to(h.device))
    return (h / math.sqrt(n)).to(dtype)


@functools.lru_cache(maxsize=None)
def _factors_as(n: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    return tuple(f.to(dtype=dtype, device=device) for f in factors(n))


def transform(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``x @ H_n / sqrt(n)`` over the last dimension (computed in float32 at least);
    ``transpose``: ``x @ H_n^T / sqrt(n)``, the inverse (and the gradient)."""
    n = x.shape[-1]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    fs = _factors_as(n, compute, str(x.device))
    if transpose:
        fs = tuple(f.t() for f in fs)
    sizes = [f.shape[0] for f in fs]
    y = x.to(compute).reshape(-1, *sizes)
    rows = y.shape[0]
    for axis, f in enumerate(fs):
        before = rows * math.prod(sizes[:axis])
        after = math.prod(sizes[axis + 1:])
        if after == 1:
            y = y.reshape(before, sizes[axis]) @ f  # the last axis: one plain matmul
        else:  # an inner axis: H^T @ [before, f, after], batched over `before`
            y = torch.matmul(f.t(), y.reshape(before, sizes[axis], after))
    return (y.reshape(x.shape) / math.sqrt(n)).to(x.dtype)


def random_orthogonal_hadamard(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """QuaRot's randomised Hadamard: ``diag(+-1) @ H_n / sqrt(n)`` with random signs (orthogonal)."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    return (signs[:, None] * matrix(n)).to(dtype)
