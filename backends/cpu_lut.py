"""Generated CPU kernels for int3 and int2 group-wise weights through lookup tables (T-MAC's manner).

For calls of at most ``cpu_codegen.MAX_ROWS`` rows, ``lowbit::wo_linear`` over ``int3_g{G}_*`` and
``int2_g{G}_*`` (sym and asym, every supported group) runs a kernel that multiplies nothing per
weight (Wei et al., "T-MAC: CPU Renaissance via Table Lookup for Low-Bit LLM Deployment on Edge"):

* **Bit planes, re-laid-out once** (:func:`relayout`, cached per quantized tensor like the packed
  weights). A code ``q = sum_b 2^b q_b`` is split into its B bit planes; in each plane, 4 input
  channels form one 4-bit index (bit j = channel 4c + j). Output channels go in tiles of 32; for
  each tile, each pair of 4-channel chunks and each plane, 32 bytes hold the indices of the 32
  rows (low nibble: chunk 2p, high nibble: chunk 2p + 1). One 32-byte load thus gives 64 indices
  (2 chunks x 32 rows). Same bytes as the stored codes (B bits per weight); N is padded to 32.
* **Tables, per call** (in the kernel): for each row of ``x`` and each 4 activations, the 16 partial
  sums ``T[i] = sum_j bit_j(i) x_{4c+j}``, quantized to int8 with one scale per row and block of
  ``min(G, 128)`` channels (``ts = max_c sum_j |x_{4c+j}| / 127``, round half to even), plus the
  block's exact float sum of ``x`` for the zero point.
* **Lookups**: ``_mm256_shuffle_epi8`` looks up 32 rows' indices in a table broadcast to both
  128-bit lanes; the two chunks' results are interleaved byte-wise and
  ``_mm256_maddubs_epi16`` by ``2^b`` adds them into int16 per output row (exact: a block sums at
  most 32 chunks x (2^B - 1) x 127 = 28448 < 2^15). Per block ``y += s * ts * acc - s * z * sum x``
  in float32. With AVX-512BW the same loop runs on 64-byte loads (two chunk pairs at once, a table
  pair per 256-bit half). A portable loop computes the same integers under ``#else``.

Numerics: the only error besides float32 rounding is the tables' int8 rounding (each looked-up
partial sum is off by at most ``ts / 2``): 41-48 dB SQNR against the float64 reference for
Gaussian activations (measured over the test grid of ``tests/backends/test_cpu_lut.py``, floor
38 dB); the weights' own
int3 quantization error is about 20 dB, so the kernel adds ~1-2 % to the layer's error power.

Non-finite activations have no int8 table: :func:`linear` returns None (the caller runs the float
reference, which propagates them, and says so).
"""
from __future__ import annotations

import ctypes
import functools
import os

import torch

from lowbit_compiler.backends import cpu_codegen, cpu_quantize
from lowbit_compiler.formats import WeightFormat
from lowbit_compiler.identity_cache import IdentityCache

TILE = 32          # output rows per 32-byte index load
MAX_BLOCK = 128    # channels per int16 accumulation block (int3: 32 chunks x 7 x 127 < 2^15)
FALLBACK = "the float reference runs instead (logged)"

_KERNEL = r"""
#if defined(__AVX512BW__) && defined(__AVX512F__)
#define LOWBIT_AVX512 1
#endif

#define B_ {bits}
#define BLK {block}
#define PB (BLK / 8)   /* chunk pairs per block */

/* tables: per row m and 4-channel chunk c, 16 int8 partial sums of x; ts per (row, block) */
static int {name}_tables(const float* x, int8_t* tab, float* ts, float* xs, int64_t M, int64_t K, int threads)
{{
    const int64_t C = K / 4, nblk = K / BLK;
    int bad = 0;
    #pragma omp parallel for num_threads(threads) schedule(static) collapse(2) reduction(|:bad)
    for (int64_t m = 0; m < M; m++)
        for (int64_t bk = 0; bk < nblk; bk++) {{
            const float* xb = x + m * K + bk * BLK;
            float amax = 0.0f, sum = 0.0f;
            for (int64_t c = 0; c < BLK / 4; c++) {{
                const float a = fabsf(xb[4 * c]) + fabsf(xb[4 * c + 1]) + fabsf(xb[4 * c + 2]) + fabsf(xb[4 * c + 3]);
                amax = a > amax ? a : amax;
                sum += (xb[4 * c] + xb[4 * c + 1]) + (xb[4 * c + 2] + xb[4 * c + 3]);
            }}
            /* entries are centred (bits as +-1/2: |T| <= amax / 2), so the int8 step is amax / 254 */
            if (!isfinite(amax) || !isfinite(sum)) bad = 1;  /* an inf or NaN has no int8 table */
            const float scale = amax / 254.0f, inv = amax > 0.0f ? 254.0f / amax : 0.0f;
            ts[m * nblk + bk] = scale;
            xs[m * nblk + bk] = sum;
            int8_t* t = tab + (m * C + bk * (BLK / 4)) * 16;
            for (int64_t c = 0; c < BLK / 4; c++) {{
                const float x0 = xb[4 * c] * inv, x1 = xb[4 * c + 1] * inv, x2 = xb[4 * c + 2] * inv,
                            x3 = xb[4 * c + 3] * inv;
                const float h = 0.5f * ((x0 + x1) + (x2 + x3));
                float v[16];  /* T[i] = sum_j (bit_j(i) - 1/2) x_j */
                v[0] = -h; v[1] = x0 - h; v[2] = x1 - h; v[3] = (x0 + x1) - h;
                v[4] = x2 - h; v[5] = (x0 + x2) - h; v[6] = (x1 + x2) - h; v[7] = ((x0 + x1) + x2) - h;
                for (int i = 0; i < 8; i++) v[8 + i] = v[i] + x3;
                for (int i = 0; i < 16; i++) {{
                    float r = nearbyintf(v[i]);
                    r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
                    t[c * 16 + i] = (int8_t)r;
                }}
            }}
        }}
    return bad;
}}

/* one tile of 32 output channels for rows [m0, m0 + MT): out[r * 32 + i] */
static inline __attribute__((always_inline)) void {name}_tile(
    const uint8_t* idx, const float* sc, const float* zs, const int8_t* tab, const float* ts, const float* xs,
    float* out, int64_t m0, const int MT, int64_t C, int64_t nblk)
{{
#if defined(LOWBIT_AVX2)
    __m256 y[4][4];
    for (int r = 0; r < MT; r++)
        for (int k = 0; k < 4; k++) y[r][k] = _mm256_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(15);
    for (int64_t bk = 0; bk < nblk; bk++) {{
#if defined(LOWBIT_AVX512)
        __m512i alo[4], ahi[4];
        for (int r = 0; r < MT; r++) {{ alo[r] = _mm512_setzero_si512(); ahi[r] = _mm512_setzero_si512(); }}
        const __m512i low4w = _mm512_set1_epi8(15);
        for (int64_t p = 0; p < PB; p += 2) {{
            const int64_t c = bk * (BLK / 4) + 2 * p;   /* chunks c, c+1 (pair p) and c+2, c+3 (pair p+1) */
            const uint8_t* ip = idx + (bk * PB + p) * B_ * 32;
            lowbit_prefetch(ip, 2 * B_ * 32);
            __m512i t0[4], t1[4];
            for (int r = 0; r < MT; r++) {{
                const int8_t* tr = tab + ((m0 + r) * C + c) * 16;
                /* 256-bit halves: [T_c | T_c] [T_c+2 | T_c+2] and [T_c+1 ...] [T_c+3 ...] */
                t0[r] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_broadcastsi128_si256(
                            _mm_loadu_si128((const __m128i*)tr))),
                        _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(tr + 32))), 1);
                t1[r] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_broadcastsi128_si256(
                            _mm_loadu_si128((const __m128i*)(tr + 16)))),
                        _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(tr + 48))), 1);
            }}
            for (int b = 0; b < B_; b++) {{
                /* plane b of pair p (low 32 bytes) and of pair p+1 (high 32 bytes) */
                const __m512i v = _mm512_inserti64x4(
                    _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(ip + b * 32))),
                    _mm256_loadu_si256((const __m256i*)(ip + (B_ + b) * 32)), 1);
                const __m512i lo = _mm512_and_si512(v, low4w);
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4w);
                const __m512i w = _mm512_set1_epi8((char)(1 << b));
                for (int r = 0; r < MT; r++) {{
                    const __m512i l = _mm512_shuffle_epi8(t0[r], lo), h = _mm512_shuffle_epi8(t1[r], hi);
                    alo[r] = _mm512_add_epi16(alo[r], _mm512_maddubs_epi16(w, _mm512_unpacklo_epi8(l, h)));
                    ahi[r] = _mm512_add_epi16(ahi[r], _mm512_maddubs_epi16(w, _mm512_unpackhi_epi8(l, h)));
                }}
            }}
        }}
        __m256i alo2[4], ahi2[4];
        for (int r = 0; r < MT; r++) {{  /* the two pairs' sums for the same rows */
            alo2[r] = _mm256_add_epi16(_mm512_castsi512_si256(alo[r]), _mm512_extracti64x4_epi64(alo[r], 1));
            ahi2[r] = _mm256_add_epi16(_mm512_castsi512_si256(ahi[r]), _mm512_extracti64x4_epi64(ahi[r], 1));
        }}
#else
        __m256i alo2[4], ahi2[4];
        for (int r = 0; r < MT; r++) {{ alo2[r] = _mm256_setzero_si256(); ahi2[r] = _mm256_setzero_si256(); }}
        for (int64_t p = 0; p < PB; p++) {{
            const int64_t c = bk * (BLK / 4) + 2 * p;
            const uint8_t* ip = idx + (bk * PB + p) * B_ * 32;
            lowbit_prefetch(ip, B_ * 32);
            __m256i t0[4], t1[4];
            for (int r = 0; r < MT; r++) {{
                const int8_t* tr = tab + ((m0 + r) * C + c) * 16;
                t0[r] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)tr));
                t1[r] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(tr + 16)));
            }}
            for (int b = 0; b < B_; b++) {{
                const __m256i v = _mm256_loadu_si256((const __m256i*)(ip + b * 32));
                const __m256i lo = _mm256_and_si256(v, low4);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                const __m256i w = _mm256_set1_epi8((char)(1 << b));
                for (int r = 0; r < MT; r++) {{
                    const __m256i l = _mm256_shuffle_epi8(t0[r], lo), h = _mm256_shuffle_epi8(t1[r], hi);
                    alo2[r] = _mm256_add_epi16(alo2[r], _mm256_maddubs_epi16(w, _mm256_unpacklo_epi8(l, h)));
                    ahi2[r] = _mm256_add_epi16(ahi2[r], _mm256_maddubs_epi16(w, _mm256_unpackhi_epi8(l, h)));
                }}
            }}
        }}
#endif
        /* unpacklo holds rows 0-7 | 16-23, unpackhi rows 8-15 | 24-31 */
        const float* s = sc + bk * 32;
        const float* z = zs + bk * 32;
        for (int r = 0; r < MT; r++) {{
            const __m256 tv = _mm256_set1_ps(ts[(m0 + r) * nblk + bk]);
            const __m256 xv = _mm256_set1_ps(xs[(m0 + r) * nblk + bk]);
            const __m256i part[4] = {{
                _mm256_cvtepi16_epi32(_mm256_castsi256_si128(alo2[r])),
                _mm256_cvtepi16_epi32(_mm256_castsi256_si128(ahi2[r])),
                _mm256_cvtepi16_epi32(_mm256_extracti128_si256(alo2[r], 1)),
                _mm256_cvtepi16_epi32(_mm256_extracti128_si256(ahi2[r], 1))}};
            for (int k = 0; k < 4; k++) {{
                const __m256 sv = _mm256_loadu_ps(s + 8 * k);
                y[r][k] = _mm256_fmadd_ps(_mm256_mul_ps(sv, tv), _mm256_cvtepi32_ps(part[k]), y[r][k]);
                y[r][k] = _mm256_fnmadd_ps(_mm256_loadu_ps(z + 8 * k), xv, y[r][k]);
            }}
        }}
    }}
    for (int r = 0; r < MT; r++)
        for (int k = 0; k < 4; k++) _mm256_storeu_ps(out + r * 32 + 8 * k, y[r][k]);
#else
    for (int r = 0; r < MT; r++) {{
        float yr[32];
        for (int i = 0; i < 32; i++) yr[i] = 0.0f;
        const int8_t* tr = tab + (m0 + r) * C * 16;
        for (int64_t bk = 0; bk < nblk; bk++) {{
            int32_t acc[32];
            for (int i = 0; i < 32; i++) acc[i] = 0;
            for (int64_t p = 0; p < PB; p++) {{
                const int64_t c = bk * (BLK / 4) + 2 * p;
                const uint8_t* ip = idx + (bk * PB + p) * B_ * 32;
                for (int b = 0; b < B_; b++)
                    for (int i = 0; i < 32; i++) {{
                        const uint8_t v = ip[b * 32 + i];
                        acc[i] += (tr[c * 16 + (v & 15)] + tr[(c + 1) * 16 + (v >> 4)]) << b;
                    }}
            }}
            const float t = ts[(m0 + r) * nblk + bk], xsum = xs[(m0 + r) * nblk + bk];
            for (int i = 0; i < 32; i++)
                yr[i] += sc[bk * 32 + i] * t * (float)acc[i] - zs[bk * 32 + i] * xsum;
        }}
        for (int i = 0; i < 32; i++) out[r * 32 + i] = yr[i];
    }}
#endif
}}

/* returns 1 (and computes nothing) when x holds an inf or NaN, else 0 */
int {name}(const float* x, const uint8_t* idx, const float* sc, const float* zs, const float* bias, float* y,
           int8_t* tab, float* ts, float* xs, int64_t M, int64_t N, int64_t K, int threads)
{{
    const int64_t C = K / 4, nblk = K / BLK, tiles = (N + 31) / 32;
    if ({name}_tables(x, tab, ts, xs, M, K, threads)) return 1;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {{
        float out[4 * 32];
        const uint8_t* it = idx + t * (K / 8) * B_ * 32;
        const float* st = sc + t * nblk * 32;
        const float* zt = zs + t * nblk * 32;
        const int64_t n0 = t * 32, nn = N - n0 < 32 ? N - n0 : 32;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {{
            const int64_t mt = M - m0 < 4 ? M - m0 : 4;
            switch (mt) {{  /* constant row counts: the accumulators stay in registers */
                case 1: {name}_tile(it, st, zt, tab, ts, xs, out, m0, 1, C, nblk); break;
                case 2: {name}_tile(it, st, zt, tab, ts, xs, out, m0, 2, C, nblk); break;
                case 3: {name}_tile(it, st, zt, tab, ts, xs, out, m0, 3, C, nblk); break;
                default: {name}_tile(it, st, zt, tab, ts, xs, out, m0, 4, C, nblk); break;
            }}
            for (int64_t r = 0; r < mt; r++)
                for (int64_t i = 0; i < nn; i++)
                    y[(m0 + r) * N + n0 + i] = out[r * 32 + i] + (bias ? bias[n0 + i] : 0.0f);
        }}
    }}
    return 0;
}}
"""


def supported(fmt: str) -> str | None:
    """Why no lookup-table kernel exists for ``fmt`` (None: one does)."""
    try:
        f = WeightFormat.parse(fmt)
    except Exception as e:  # noqa: BLE001  (any unparsable key is simply not ours)
        return f"format {fmt}: {e}"
    if f.kind == "int" and f.bits in (2, 3) and f.group_size is not None and f.group_size % 8 == 0:
        return None
    return f"format {fmt}: lookup-table kernels exist for int3 and int2 group-wise weights"


def block(f: WeightFormat) -> int:
    """Channels per int16 accumulation block and per table scale: min(group, 128)."""
    return min(f.group_size, MAX_BLOCK)


def kernel_name(fmt: str) -> str:
    return "lowbit_cpu_lut_" + fmt


def source(fmt: str) -> str:
    """The C source of the lookup-table kernel for ``fmt`` (readable; dumped beside the others)."""
    f = WeightFormat.parse(fmt)
    body = _KERNEL.format(name=kernel_name(fmt), bits=f.bits, block=block(f))
    return (f"/* lowbit generated CPU kernel: {fmt} weights through int8 lookup tables of activation partial "
            f"sums (T-MAC), float32 rows (M <= {cpu_codegen.MAX_ROWS}) */\n" + cpu_codegen._PRELUDE + body)


# builds: the host's ISA (AVX-512BW, AVX2 or neither: the preprocessor picks the branch), and two the
# tests force: AVX2 + FMA without AVX-512, and the compiler's default target (the portable loops)
ISA_FLAGS = {"native": (False, ()), "avx2": (True, ("-mavx2", "-mfma")), "portable": (True, ())}


def kernel(fmt: str, isa: str = "native"):
    """The compiled kernel (ctypes function), or None (reason logged once): no compiler, compiling
    failed, or ``LOWBIT_CPU_CODEGEN=0``. ``isa``: one of ``ISA_FLAGS``."""
    if os.environ.get(cpu_codegen.ENV, "1") == "0":
        cpu_codegen._note(f"turned off by {cpu_codegen.ENV}=0; {FALLBACK}")
        return None
    if supported(fmt) is not None:
        return None
    return _build(fmt, isa)


def build_spec(fmt: str, isa: str) -> dict:
    """The source arguments of ``fmt``'s lookup-table kernel (``cpu_codegen.prebuild``)."""
    portable, extra = ISA_FLAGS[isa]
    return {"name": kernel_name(fmt), "text": source(fmt), "portable": portable, "extra_flags": extra}


@functools.lru_cache(maxsize=None)
def _build(fmt: str, isa: str):
    fn = cpu_codegen.build(argtypes=[ctypes.c_void_p] * 9 + [ctypes.c_int64] * 3 + [ctypes.c_int],
                           fallback=f"int3/int2 calls: {FALLBACK}", what=f"the {fmt} lookup-table kernel ({isa})",
                           **build_spec(fmt, isa))
    if fn is not None:
        fn.restype = ctypes.c_int  # 1: non-finite activations, nothing computed
    return fn


class LutWeight:
    """A quantized int3/int2 weight re-laid-out for the lookup-table kernel: bit-plane indices
    ``idx`` uint8 [tiles, K/8, B, 32] and per-(tile, block) float32 scales ``sc`` and ``s * z``
    (``zs``) [tiles, K/block, 32]."""

    def __init__(self, idx: torch.Tensor, sc: torch.Tensor, zs: torch.Tensor, fmt: str, n: int, kp: int):
        self.idx, self.sc, self.zs, self.fmt, self.n, self.kp = idx, sc, zs, fmt, n, kp

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.idx, self.sc, self.zs))


# quantized codes -> LutWeight (built once per weight, freed with it); .misses counts relayouts
CACHE = IdentityCache()
ROWS_PER_SLICE = 1024  # relayout this many output channels at a time (bounded temporaries)


def relayout(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: str) -> LutWeight:
    """The kernel's layout of a stored int3/int2 weight (cached by the identity of ``qweight``)."""
    return CACHE.get_or_create(qweight, ("lut", fmt), lambda: _relayout(qweight, scale, zero, fmt))


def _relayout(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: str) -> LutWeight:
    f = WeightFormat.parse(fmt)
    bits, g, blk = f.bits, f.group_size, block(f)
    n = scale.shape[0]
    kp = qweight.shape[1] * 8 // bits
    tiles = (n + TILE - 1) // TILE
    idx = torch.empty(tiles, kp // 8, bits, TILE, dtype=torch.uint8)
    weights = torch.tensor([1, 2, 4, 8], dtype=torch.uint8)
    for start in range(0, tiles * TILE, ROWS_PER_SLICE):
        stop = min(start + ROWS_PER_SLICE, tiles * TILE)
        q = cpu_quantize.unpack_codes(qweight[start:min(stop, n)], bits)  # [rows, Kp] uint8 (C, one pass)
        if q.shape[0] != stop - start:  # padded channels: code 0, scale 0 -> output 0 (sliced away)
            q = torch.nn.functional.pad(q, (0, 0, 0, stop - start - q.shape[0]))
        for b in range(bits):
            plane = ((q >> b) & 1).view(stop - start, kp // 4, 4)
            nib = (plane * weights).sum(-1, dtype=torch.uint8)  # [rows, Kp/4] 4-bit indices
            pair = nib[:, 0::2] | (nib[:, 1::2] << 4)            # [rows, Kp/8]
            idx[start // TILE: stop // TILE, :, b, :] = pair.view(-1, TILE, kp // 8).transpose(1, 2)
    s = scale.float()
    z = torch.full_like(s, 2 ** (bits - 1)) if zero is None else zero.float()
    reps = g // blk
    sc = torch.zeros(tiles * TILE, kp // blk)
    zs = torch.zeros(tiles * TILE, kp // blk)
    sc[:n] = s.repeat_interleave(reps, dim=1)
    # the tables hold sum_j (bit_j - 1/2) x_j, so sum_b 2^b T = sum q x - (2^B - 1)/2 sum x: the
    # kernel's zero-point term subtracts s * (z - (2^B - 1)/2) * sum x
    zs[:n] = (s * (z - (2 ** bits - 1) / 2)).repeat_interleave(reps, dim=1)
    sc = sc.view(tiles, TILE, -1).transpose(1, 2).contiguous()
    zs = zs.view(tiles, TILE, -1).transpose(1, 2).contiguous()
    return LutWeight(idx, sc, zs, fmt, n, kp)


def unsupported_reason(x: torch.Tensor, fmt: str, rows: int) -> str | None:
    """Why the lookup-table kernel cannot run this call (None: it can)."""
    if (why := supported(fmt)) is not None:
        return why
    if x.device.type != "cpu":
        return f"device {x.device} is not the CPU"
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"activation dtype {x.dtype}: the lookup-table kernel takes float32/bfloat16/float16"
    if rows > cpu_codegen.MAX_ROWS:
        return (f"{rows} rows: the {fmt} lookup-table kernel is for decode-sized calls (M <= "
                f"{cpu_codegen.MAX_ROWS}); torch has no int3/int2 kernel for more rows")
    return None


calls = cpu_codegen.calls  # one counter for every generated CPU kernel


def linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
           bias: torch.Tensor | None, fmt: str, in_features: int, isa: str = "native") -> torch.Tensor | None:
    """``x[M, K] @ dequantize(W).T + bias`` in float32 by the lookup-table kernel, or None when it
    does not apply (:func:`unsupported_reason`, no compiler, non-finite activations). ``isa``
    forces a build (``ISA_FLAGS``; tests)."""
    rows = x.shape[0]
    if unsupported_reason(x, fmt, rows) is not None or qweight.device.type != "cpu":
        return None
    fn = kernel(fmt, isa)
    if fn is None:
        return None
    w = relayout(qweight, scale, zero, fmt)
    x32 = x.to(torch.float32)
    if w.kp != in_features:  # padded columns: their codes meet zero activations
        x32 = torch.nn.functional.pad(x32, (0, w.kp - in_features))
    x32 = x32.contiguous()
    nblk = w.kp // block(WeightFormat.parse(fmt))
    b = None if bias is None else bias.to(torch.float32).contiguous()
    y = torch.empty(rows, w.n, dtype=torch.float32)
    # one scratch buffer: int8 tables [M, K/4, 16], then table scales and block sums [M, blocks] each
    scratch = torch.empty(rows * (w.kp * 4 + 8 * nblk), dtype=torch.uint8)
    base = scratch.data_ptr()
    ts = base + rows * w.kp * 4
    if fn(x32.data_ptr(), w.idx.data_ptr(), w.sc.data_ptr(), w.zs.data_ptr(), None if b is None else b.data_ptr(),
          y.data_ptr(), base, ts, ts + rows * nblk * 4, rows, w.n, w.kp, torch.get_num_threads()):
        return None  # an inf or NaN has no int8 table: the caller's reference propagates it
    calls[kernel_name(fmt)] += 1
    return y
