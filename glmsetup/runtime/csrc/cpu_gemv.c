/* Matrix-vector kernels for decoding on x86-64 CPUs with AVX2, FMA and F16C (glmsetup/runtime/native_cpu.py).

   y[m, n] = sum_k W[n, k] * x[m, k] for a few rows m (a decoding step), with W in one of:
     - bfloat16 or float16 [N, K] (a 16-bit nn.Linear weight), x float32; float32 for batches;
     - int8 [N, K] and a float32 scale per row (the official int8 scheme);
     - the official int4 packing [N, K/2]: byte j of a row holds column 2j in its high nibble and column
       2j+1 in its low nibble, two's complement, and a float32 scale per row.
   For the integer weights (up to INT_ROWS rows of x), x is first quantized to int16 in blocks of qb
   columns (128 or 32; one float scale per block, from the block's largest magnitude): the products are
   exact integers summed in int32, and the only rounding left is x's, at most 1/65534 of its block's
   largest value (bfloat16 activations, which torch's int8/int4 kernels take, round each value to 1/512
   of itself). Batches and prompts go through float32 tiles (an outer product, below).

   Every weight is read once per call for up to 32 rows of x (once per 32 rows past that); rows of W
   are split between the threads (OpenMP; torch's own OpenMP runtime when it is loaded, so the two share one pool).
   K must be a multiple of 32 (and of qb). The Python side checks shapes, types and contiguity before calling. */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GLM_ABI 7
/* Weight bytes ahead of the current ones that are asked for early: the hardware prefetcher stops at
   page boundaries, and asking 1-2 KB ahead brought a 2-core AVX2 EPYC from 77% to 88-100% of its
   memory read bandwidth. A prefetch never faults, so reading past the end is harmless. */
#define AHEAD 1024
#define PREFETCH(p) _mm_prefetch((const char *)(p) + AHEAD, _MM_HINT_T0)

int glm_abi(void) { return GLM_ABI; }

static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

static inline __m256 load8(const uint16_t *p, int fp16) {
    __m128i raw = _mm_loadu_si128((const __m128i *)p);
    if (fp16) return _mm256_cvtph_ps(raw);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

static inline int threads_for(long n, long k, int nt) {
    return (n * k < (1L << 16) || nt < 1) ? 1 : nt; /* small layers: a parallel region costs more than it saves */
}

/* 16-bit weights: fp16 = 0 for bfloat16, 1 for float16; four independent sums per row (two rows at a
   time, eight sums, measured 7% slower). */
static inline float dot16(const uint16_t *r, const float *xm, long K, int fp16, int prefetch) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (long k = 0; k < K; k += 32) {
        if (prefetch) PREFETCH(r + k);
        a0 = _mm256_fmadd_ps(load8(r + k, fp16), _mm256_loadu_ps(xm + k), a0);
        a1 = _mm256_fmadd_ps(load8(r + k + 8, fp16), _mm256_loadu_ps(xm + k + 8), a1);
        a2 = _mm256_fmadd_ps(load8(r + k + 16, fp16), _mm256_loadu_ps(xm + k + 16), a2);
        a3 = _mm256_fmadd_ps(load8(r + k + 24, fp16), _mm256_loadu_ps(xm + k + 24), a3);
    }
    return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

/* dtype codes of x, bias and y */
enum { F32 = 0, BF16 = 1, F16 = 2 };

static inline void put(void *y, long i, float v, int dtype) {
    if (dtype == F32) {
        ((float *)y)[i] = v;
    } else if (dtype == F16) {
        ((uint16_t *)y)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
    } else { /* bfloat16, rounded to nearest even as torch rounds; NaN stays NaN */
        uint32_t u;
        memcpy(&u, &v, 4);
        ((uint16_t *)y)[i] = (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((u >> 16) | 0x40)
                                                               : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
}

static void to_f32(const void *src, int dtype, float *dst, long n) {
    long i = 0;
    if (dtype == F32) {
        memcpy(dst, src, n * sizeof(float));
        return;
    }
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8((const uint16_t *)src + i, dtype == F16));
    for (; i < n; i++) {
        uint16_t h = ((const uint16_t *)src)[i];
        if (dtype == F16) {
            dst[i] = _cvtsh_ss(h);
        } else {
            uint32_t u = (uint32_t)h << 16;
            memcpy(dst + i, &u, 4);
        }
    }
}

/* Two weight rows against R (1 to 4) rows of x: 2R sums, each weight vector converted once for the R
   rows. R is a constant at every call, so the sums stay in registers. */
static inline __attribute__((always_inline)) void dot16_2xr(const uint16_t *r0, const uint16_t *r1, const float *x,
                                                            long K, int fp16, int prefetch, float *out0,
                                                            float *out1, int R) {
    __m256 a[4], b[4];
    for (int i = 0; i < R; i++) a[i] = b[i] = _mm256_setzero_ps();
    for (long k = 0; k < K; k += 8) {
        if (prefetch && !(k & 31)) {
            PREFETCH(r0 + k);
            PREFETCH(r1 + k);
        }
        __m256 w0 = load8(r0 + k, fp16), w1 = load8(r1 + k, fp16);
        for (int i = 0; i < R; i++) {
            __m256 xv = _mm256_loadu_ps(x + i * K + k);
            a[i] = _mm256_fmadd_ps(w0, xv, a[i]);
            b[i] = _mm256_fmadd_ps(w1, xv, b[i]);
        }
    }
    for (int i = 0; i < R; i++) {
        out0[i] = hsum(a[i]);
        out1[i] = hsum(b[i]);
    }
}

static void dot16_2x(const uint16_t *r0, const uint16_t *r1, const float *x, long K, int fp16, int prefetch,
                     float *out0, float *out1, int R) {
    switch (R) {
    case 4: dot16_2xr(r0, r1, x, K, fp16, prefetch, out0, out1, 4); break;
    case 3: dot16_2xr(r0, r1, x, K, fp16, prefetch, out0, out1, 3); break;
    case 2: dot16_2xr(r0, r1, x, K, fp16, prefetch, out0, out1, 2); break;
    default: dot16_2xr(r0, r1, x, K, fp16, prefetch, out0, out1, 1); break;
    }
}

/* Fewer than GEMM_ROWS rows of x: one row with dot16 (bound by memory); more in pairs of weight rows
   against up to 4 rows of x. */
static void gemv_w16(const uint16_t *w, int fp16, const float *x, const float *bias, void *y, int yd, long M, long N,
                     long K, int nt) {
    if (M == 1) {
#pragma omp parallel for schedule(static) num_threads(threads_for(N, K, nt))
        for (long n = 0; n < N; n++) put(y, n, dot16(w + n * K, x, K, fp16, 1) + (bias ? bias[n] : 0.f), yd);
        return;
    }
#pragma omp parallel for schedule(static) num_threads(threads_for(N, K, nt))
    for (long p = 0; p < (N + 1) / 2; p++) {
        long n = 2 * p, pair = n + 1 < N;
        const uint16_t *row = w + n * K;
        float b0 = bias ? bias[n] : 0.f, b1 = bias && pair ? bias[n + 1] : 0.f, d0[4], d1[4];
        for (long m = 0; m < M; m += 4) {
            int R = M - m < 4 ? (int)(M - m) : 4;
            dot16_2x(row, pair ? row + K : row, x + m * K, K, fp16, m == 0, d0, d1, R);
            for (int i = 0; i < R; i++) {
                put(y, (m + i) * N + n, d0[i] + b0, yd);
                if (pair) put(y, (m + i) * N + n + 1, d1[i] + b1, yd);
            }
        }
    }
}

/* float32 weights, fewer than F32_TILE_ROWS rows of x: each weight row against every row of x, with four
   sums (the row stays in L1 for the rows after the first). With no prefetch this reads a 27392 x 4096
   weight at 32 GB/s on a 2-core AVX2 EPYC (the machine's read speed: 33), where MKL's sgemv reached
   23 and a prefetch 512 or 1024 floats ahead 27-28. */
static inline float dot_f32(const float *r, const float *xm, long K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (long k = 0; k < K; k += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(r + k), _mm256_loadu_ps(xm + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(r + k + 8), _mm256_loadu_ps(xm + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(r + k + 16), _mm256_loadu_ps(xm + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(r + k + 24), _mm256_loadu_ps(xm + k + 24), a3);
    }
    return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

static void gemv_w32(const float *w, const float *x, const float *bias, void *y, int yd, long M, long N, long K,
                     int nt) {
#pragma omp parallel for schedule(static) num_threads(threads_for(N, K, nt))
    for (long n = 0; n < N; n++)
        for (long m = 0; m < M; m++) put(y, m * N + n, dot_f32(w + n * K, x + m * K, K) + (bias ? bias[n] : 0.f), yd);
}

/* Batches (GEMM_ROWS rows of x and more on 16-bit weights, F32_TILE_ROWS on float32 ones; prompts,
   past INT_ROWS, on integer ones): at 16 rows a layer is bound by multiply-adds, not memory, and dot
   products (a sum per pair of rows, reduced at the end) run out of registers before they keep both FMA
   units busy. Here the product is an outer one, as BLAS libraries compute it: x is transposed once per
   call (xt [K][MP], each column k holding the rows of x, padded to MP, a multiple of 8), so that 8 rows
   of x are one vector; one weight times such a vector adds to 8 outputs at once. The micro-kernels hold
   6 weight rows x 16 rows of x (12 sums, two x vectors and a broadcast weight: the 16 AVX2 registers),
   or x 8 (two sums per row, for the 12 chains), for KC columns at a time; weights go in tiles of
   TILE_N rows, and the block of xt (at most GEMM_BLOCK_M rows, 16 KB) stays in L1 for every weight of
   the tile.
   A whole tile of floating-point weights is read in place (kernel_6x): float32 ones broadcast from the
   weight itself, 6 rows at a time (12 rows 16 KB apart share one L1 set and were slower); 16-bit ones
   converted 16 columns of 6 rows at a time into a 384-byte buffer just before the 16 steps that read
   it. Converting a whole 12 x KC tile first (6 KB, as integer weights and a short last tile still do)
   left the FMA units idle while it ran and the weight streamed in: 16 rows of 27392 x 4096 took 33 ms
   in float32 and 28 in bfloat16, 22 and 23 now (160 and 155 GFLOP/s, 80% of the two cores' multiply-
   add peak on an AVX2 EPYC); converting inside the register tile instead cost a register and a shift
   per weight and spilled sums. From F32_TILE_ROWS rows on the float32 tiles beat the dot products below
   (3 / 4 / 6 rows: 18 against 21 / 23 / 29 ms: the weight is read once, at memory speed). Integer
   weights are multiplied by their scales as they are converted, once per tile and pass of up to
   GEMM_BLOCK_M rows (a prompt's), for the register tiles of every 16 rows in it. bfloat16 and int4 weights are converted 16 at a time into their even and odd
   columns (one shift, one mask), so xt lists each 16 columns in that order too (a sum does not mind
   the order). Rows of x past GEMM_BLOCK_M (a prompt) go in further passes over the weights: passes of
   64 or 256 rows, with xt in L2, were 5-10% slower at 64 and 300 rows. */
#define KC 128
#define TILE_N 12
#define GEMM_ROWS 8      /* from this many rows of x on (16-bit weights) */
#define F32_TILE_ROWS 3  /* float32 weights: from this many rows of x on */
#define GEMM_BLOCK_M 32  /* rows of x per pass over the weights */
#define INT_ROWS 48      /* integer weights: their own kernels up to this many rows (as fast), the tiles past */

static inline float get(const void *x, long i, int dtype) {
    if (dtype == F32) return ((const float *)x)[i];
    uint16_t h = ((const uint16_t *)x)[i];
    if (dtype == F16) return _cvtsh_ss(h);
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Whether the weights of `kind` come out of weights16 in even/odd order (each 16 columns: the 8 even,
   then the 8 odd): bfloat16 (split by one shift and one mask) and int4 (high nibbles are the even
   columns). */
static inline int even_odd(int kind) { return kind == 0 || kind == 4; }

/* Weights of a row from column k (a multiple of 16), 16 of them as float32 in the order of `kind`:
   0 bfloat16, 1 float16, 2 float32, 8 int8 x scale, 4 the official int4 packing x scale. */
static inline void weights16(int kind, const void *row, long k, float scale, float *o) {
    if (kind == 0) {
        __m256i raw = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + k));
        _mm256_store_ps(o, _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16)));
        _mm256_store_ps(o + 8, _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32((int)0xFFFF0000u))));
    } else if (kind == 1) {
        const uint16_t *p = (const uint16_t *)row + k;
        _mm256_store_ps(o, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)));
        _mm256_store_ps(o + 8, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8))));
    } else if (kind == 2) {
        const float *p = (const float *)row + k;
        _mm256_store_ps(o, _mm256_loadu_ps(p));
        _mm256_store_ps(o + 8, _mm256_loadu_ps(p + 8));
    } else if (kind == 8) {
        __m128i raw = _mm_loadu_si128((const __m128i *)((const int8_t *)row + k));
        __m256 s = _mm256_set1_ps(scale);
        _mm256_store_ps(o, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)), s));
        _mm256_store_ps(o + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(raw, 8))), s));
    } else { /* each byte sign-extended: >> 4 gives the high nibble, << 28 >> 28 the low one, both signed */
        __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const uint8_t *)row + k / 2)));
        __m256 s = _mm256_set1_ps(scale);
        _mm256_store_ps(o, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(v, 4)), s));
        _mm256_store_ps(o + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 28), 28)), s));
    }
}

/* Bytes of a weight row of K columns of `kind`. */
static inline long row_bytes(int kind, long K) { return kind == 2 ? 4 * K : kind == 8 ? K : kind == 4 ? K / 2 : 2 * K; }

/* xt [K][MP] <- x [M, K] (dtype xd) as float32 in the column order weights16 gives the weights of
   `kind` in, rows M..MP-1 zero. */
static void transpose_x(const void *x, int xd, float *xt, long M, long MP, long K, int kind) {
    int eo = even_odd(kind);
    memset(xt, 0, (size_t)K * MP * sizeof(float));
    for (long m = 0; m < M; m++)
        for (long k = 0; k < K; k += 16)
            for (int j = 0; j < 8; j++) {
                xt[(k + j) * MP + m] = get(x, m * K + k + (eo ? 2 * j : j), xd);
                xt[(k + 8 + j) * MP + m] = get(x, m * K + k + (eo ? 2 * j + 1 : 8 + j), xd);
            }
}

/* wt [TILE_N][KC] <- columns [k0, k0 + kc) of rows [n0, n0 + nr) of w as float32 (rows past nr: 0). */
static void tile_f32(int kind, const void *w, const float *scale, long n0, long nr, long K, long k0, long kc,
                     float *wt) {
    for (long r = 0; r < TILE_N; r++) {
        float *o = wt + r * KC;
        if (r >= nr) {
            memset(o, 0, kc * sizeof(float));
            continue;
        }
        const unsigned char *row = (const unsigned char *)w + (n0 + r) * row_bytes(kind, K);
        float s = scale ? scale[n0 + r] : 1.f;
        for (long k = k0; k < k0 + kc; k += 16) {
            PREFETCH(row + row_bytes(kind, k));
            weights16(kind, row, k, s, o + k - k0);
        }
    }
}

/* c[n * MP + m] += sum over k < kc of wt[n][k] * xt[k][m], for 6 weight rows x 16 rows of x (each block
   summed on its own, then added: a chain of KC terms rather than K keeps the rounding near the dot
   kernels'). */
static void kernel_6x16(const float *wt, const float *xt, long MP, long kc, float *c) {
    __m256 a[6][2];
    for (int n = 0; n < 6; n++) a[n][0] = a[n][1] = _mm256_setzero_ps();
    for (long k = 0; k < kc; k++) {
        __m256 x0 = _mm256_loadu_ps(xt + k * MP), x1 = _mm256_loadu_ps(xt + k * MP + 8);
        for (int n = 0; n < 6; n++) {
            __m256 b = _mm256_broadcast_ss(wt + n * KC + k);
            a[n][0] = _mm256_fmadd_ps(b, x0, a[n][0]);
            a[n][1] = _mm256_fmadd_ps(b, x1, a[n][1]);
        }
    }
    for (int n = 0; n < 6; n++) {
        _mm256_storeu_ps(c + n * MP, _mm256_add_ps(_mm256_loadu_ps(c + n * MP), a[n][0]));
        _mm256_storeu_ps(c + n * MP + 8, _mm256_add_ps(_mm256_loadu_ps(c + n * MP + 8), a[n][1]));
    }
}

/* The same for 12 weight rows x 8 rows of x. */
static void kernel_12x8(const float *wt, const float *xt, long MP, long kc, float *c) {
    __m256 a[12];
    for (int n = 0; n < 12; n++) a[n] = _mm256_setzero_ps();
    for (long k = 0; k < kc; k++) {
        __m256 x0 = _mm256_loadu_ps(xt + k * MP);
        for (int n = 0; n < 12; n++) a[n] = _mm256_fmadd_ps(_mm256_broadcast_ss(wt + n * KC + k), x0, a[n]);
    }
    for (int n = 0; n < 12; n++) _mm256_storeu_ps(c + n * MP, _mm256_add_ps(_mm256_loadu_ps(c + n * MP), a[n]));
}

/* 6 weight rows of `kind` in place (row r at w + r * rb bytes) x 16 rows of x (nx = 2 vectors) or 8
   (nx = 1: even and odd columns in two sums per row, so that 12 chains keep both FMA units busy),
   columns [k0, k0 + kc). float32 weights are broadcast from the weight itself; 16-bit ones 16 columns
   of the 6 rows at a time are converted into a 384-byte buffer (in weights16's order, which xt
   follows) that the next 16 steps read. */
static inline __attribute__((always_inline)) void kernel_6xc(const int kind, const int nx, const unsigned char *w,
                                                             long rb, long k0, const float *xt, long MP, long kc,
                                                             float *c) {
    __m256 a[6][2];
    float buf[6 * 16] __attribute__((aligned(32)));
    for (int n = 0; n < 6; n++) a[n][0] = a[n][1] = _mm256_setzero_ps();
    for (long k = 0; k < kc; k += 16) {
        const float *wk = buf;
        long ls = 16;
        if (kind == 2) {
            wk = (const float *)w + k0 + k;
            ls = rb / 4;
        } else {
            for (int n = 0; n < 6; n++) weights16(kind, w + n * rb, k0 + k, 1.f, buf + n * 16);
        }
        const float *x = xt + k * MP;
        for (int j = 0; j < 16; j += 3 - nx) {
            if (nx == 2) {
                __m256 x0 = _mm256_loadu_ps(x + j * MP), x1 = _mm256_loadu_ps(x + j * MP + 8);
                for (int n = 0; n < 6; n++) {
                    __m256 b = _mm256_broadcast_ss(wk + n * ls + j);
                    a[n][0] = _mm256_fmadd_ps(b, x0, a[n][0]);
                    a[n][1] = _mm256_fmadd_ps(b, x1, a[n][1]);
                }
            } else {
                __m256 x0 = _mm256_loadu_ps(x + j * MP), x1 = _mm256_loadu_ps(x + (j + 1) * MP);
                for (int n = 0; n < 6; n++) {
                    a[n][0] = _mm256_fmadd_ps(_mm256_broadcast_ss(wk + n * ls + j), x0, a[n][0]);
                    a[n][1] = _mm256_fmadd_ps(_mm256_broadcast_ss(wk + n * ls + j + 1), x1, a[n][1]);
                }
            }
        }
    }
    for (int n = 0; n < 6; n++) {
        float *cn = c + n * MP;
        if (nx == 2) {
            _mm256_storeu_ps(cn, _mm256_add_ps(_mm256_loadu_ps(cn), a[n][0]));
            _mm256_storeu_ps(cn + 8, _mm256_add_ps(_mm256_loadu_ps(cn + 8), a[n][1]));
        } else {
            _mm256_storeu_ps(cn, _mm256_add_ps(_mm256_loadu_ps(cn), _mm256_add_ps(a[n][0], a[n][1])));
        }
    }
}

/* kernel_6xc compiled for each of bfloat16 (0), float16 (1), float32 (2) and 16 or 8 rows of x. */
static void kernel_6x(int kind, int nx, const unsigned char *w, long rb, long k0, const float *xt, long MP, long kc,
                      float *c) {
#define KERNEL_6X(K) (nx == 2 ? kernel_6xc(K, 2, w, rb, k0, xt, MP, kc, c) : kernel_6xc(K, 1, w, rb, k0, xt, MP, kc, c))
    if (kind == 0) KERNEL_6X(0);
    else if (kind == 1) KERNEL_6X(1);
    else KERNEL_6X(2);
#undef KERNEL_6X
}

/* y rows [m0, m0 + M) from xt [K][MP] (transpose_x of those rows); scale: the integer kinds' per row. */
static void gemm_tiles(int kind, const void *w, const float *scale, const float *xt, long MP, const float *bias,
                       void *y, int yd, long m0, long M, long N, long K, int nt) {
    long tiles = (N + TILE_N - 1) / TILE_N;
#pragma omp parallel for schedule(static) num_threads(threads_for(N, K, nt))
    for (long t = 0; t < tiles; t++) {
        long n0 = t * TILE_N, nr = N - n0 < TILE_N ? N - n0 : TILE_N;
        float c[TILE_N * GEMM_BLOCK_M] __attribute__((aligned(32)));
        float wt[TILE_N * KC] __attribute__((aligned(32)));
        memset(c, 0, sizeof(float) * TILE_N * MP);
        for (long k0 = 0; k0 < K; k0 += KC) {
            long kc = K - k0 < KC ? K - k0 : KC;
            long m = 0;
            if (kind < 4 && nr == TILE_N) { /* floating-point weights, a whole tile: read in place */
                long rb = row_bytes(kind, K);
                for (int r = 0; r < TILE_N; r += 6)
                    for (m = 0; m < MP; m += 16)
                        kernel_6x(kind, MP - m >= 16 ? 2 : 1, (const unsigned char *)w + (n0 + r) * rb, rb, k0,
                                  xt + k0 * MP + m, MP, kc, c + r * MP + m);
                continue;
            }
            tile_f32(kind, w, scale, n0, nr, K, k0, kc, wt);
            for (; m + 16 <= MP; m += 16)
                for (int r = 0; r < TILE_N; r += 6) kernel_6x16(wt + r * KC, xt + k0 * MP + m, MP, kc, c + r * MP + m);
            if (m < MP) kernel_12x8(wt, xt + k0 * MP + m, MP, kc, c + m);
        }
        for (long r = 0; r < nr; r++) {
            float b = bias ? bias[n0 + r] : 0.f;
            for (long i = 0; i < M; i++) put(y, (m0 + i) * N + n0 + r, c[r * MP + i] + b, yd);
        }
    }
}

/* x float32 [M, K] -> xq int16 [M, K], dx [M, K/qb] block scales, xs[m] = sum over blocks of dx times
   the block's sum of xq (the int4 kernel's offset). A block is qb columns (a multiple of 32 dividing K).
   int4 = 1 orders each 32 columns as the int4 kernel reads them: the 16 odd ones, then the 16 even ones.
   Vectorized: this runs once per row and layer, and a scalar loop here cost as much as a small layer's
   product. */
static void quantize_x(const float *x, int16_t *xq, float *dx, float *xs, long M, long K, int int4, long qb) {
    const __m256 sign = _mm256_set1_ps(-0.0f), big = _mm256_set1_ps(3.4028235e38f);
    for (long m = 0; m < M; m++) {
        const float *xm = x + m * K;
        int16_t *qm = xq + m * K;
        float *dm = dx + m * (K / qb), total = 0.f;
        for (long b = 0; b < K / qb; b++) {
            const float *xb = xm + b * qb;
            __m256 amax = _mm256_setzero_ps();
            int bad = 0;
            for (long i = 0; i < qb; i += 8) {
                __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + i));
                bad |= _mm256_movemask_ps(_mm256_cmp_ps(a, big, _CMP_NLE_UQ)); /* NaN or inf */
                amax = _mm256_max_ps(amax, a);
            }
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
            /* a block whose largest value is below FLT_MIN * 32767 (about 4e-34) counts as zero: 1 / d
               would overflow */
            float d = bad ? 0.f : _mm_cvtss_f32(h) / 32767.f, inv = d >= FLT_MIN ? 1.f / d : 0.f;
            __m256 vinv = _mm256_set1_ps(inv);
            __m256i sum = _mm256_setzero_si256();
            for (long c = 0; c < qb; c += 32) {
                __m256i q[4];
                for (int i = 0; i < 4; i++) { /* rounds to nearest even, as lrintf */
                    q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + c + 8 * i), vinv));
                    sum = _mm256_add_epi32(sum, q[i]);
                }
                int16_t *out = qm + b * qb + c;
                /* packs works within 128-bit lanes; permute4x64 puts the four quarters back in order */
                __m256i lo = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8);
                __m256i hi = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8);
                if (int4) {
                    int16_t tmp[32];
                    _mm256_storeu_si256((__m256i *)tmp, lo);
                    _mm256_storeu_si256((__m256i *)(tmp + 16), hi);
                    for (int i = 0; i < 16; i++) {
                        out[i] = tmp[2 * i + 1];
                        out[16 + i] = tmp[2 * i];
                    }
                } else {
                    _mm256_storeu_si256((__m256i *)out, lo);
                    _mm256_storeu_si256((__m256i *)(out + 16), hi);
                }
            }
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
            dm[b] = bad ? NAN : d; /* a NaN or inf input makes the outputs NaN, as a float product would */
            total += dm[b] * (float)_mm_cvtsi128_si32(s4);
        }
        xs[m] = total;
    }
}

/* 32 weights as two vectors of 16 int16 (w[0], w[1]). */
static inline void weights_q8(const int8_t *wb, __m256i *w) {
    w[0] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)wb));
    w[1] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wb + 16)));
}

/* Nibbles are read as unsigned (q + 8, after flipping each nibble's top bit); the 8 * sum(x) that adds
   is taken off once per output (xs). wb: 16 bytes; w[0] the 32 columns' odd ones, w[1] the even ones
   (quantize_x orders int4 activations the same way). */
static inline void weights_q4(const uint8_t *wb, __m256i *w) {
    __m256i v = _mm256_xor_si256(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)wb)), _mm256_set1_epi16(0x88));
    w[0] = _mm256_and_si256(v, _mm256_set1_epi16(0x0F));
    w[1] = _mm256_srli_epi16(v, 4);
}

/* The exact products of 32 weights with 32 int16 activations, summed in 8 int32 lanes. Over a block of
   up to 128 columns a lane stays below 2**27 (int8: 8 products of at most 127 * 32767). */
static inline __m256i dot32(const __m256i *w, const int16_t *xb) {
    return _mm256_add_epi32(_mm256_madd_epi16(w[0], _mm256_loadu_si256((const __m256i *)xb)),
                            _mm256_madd_epi16(w[1], _mm256_loadu_si256((const __m256i *)(xb + 16))));
}

/* One block (qb columns) of a weight row against one row of x, as 8 float lanes. STEP: weight bytes per
   32 columns (32 for int8, 16 for int4). */
#define BLOCK(WEIGHTS, ROW, STEP, b, XROW)                                                     \
    ({                                                                                         \
        __m256i s_ = _mm256_setzero_si256(), w_[2];                                            \
        for (long c_ = 0; c_ < qb; c_ += 32) {                                                 \
            WEIGHTS((ROW) + ((b) * qb + c_) / 32 * (STEP), w_);                                \
            s_ = _mm256_add_epi32(s_, dot32(w_, (XROW) + (b) * qb + c_));                      \
        }                                                                                      \
        _mm256_cvtepi32_ps(s_);                                                                \
    })

/* sum over blocks of BLOCK * dm[b] for one row of x, with four independent sums (one would wait on the
   previous block's multiply-add every time: measured 2.5x slower); the weights are prefetched AHEAD. */
#define ROW_DOT(WEIGHTS, ROW, STEP)                                                            \
    do {                                                                                       \
        long nb = K / qb, b = 0;                                                               \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                            \
        for (; b + 4 <= nb; b += 4) {                                                          \
            if (m == 0)                                                                        \
                for (long p_ = 0; p_ < 4 * qb / 32 * (STEP); p_ += 64) PREFETCH((ROW) + b * qb / 32 * (STEP) + p_); \
            a0 = _mm256_fmadd_ps(BLOCK(WEIGHTS, ROW, STEP, b, xm), _mm256_set1_ps(dm[b]), a0);         \
            a1 = _mm256_fmadd_ps(BLOCK(WEIGHTS, ROW, STEP, b + 1, xm), _mm256_set1_ps(dm[b + 1]), a1); \
            a2 = _mm256_fmadd_ps(BLOCK(WEIGHTS, ROW, STEP, b + 2, xm), _mm256_set1_ps(dm[b + 2]), a2); \
            a3 = _mm256_fmadd_ps(BLOCK(WEIGHTS, ROW, STEP, b + 3, xm), _mm256_set1_ps(dm[b + 3]), a3); \
        }                                                                                      \
        for (; b < nb; b++) {                                                                  \
            if (m == 0)                                                                        \
                for (long p_ = 0; p_ < qb / 32 * (STEP); p_ += 64) PREFETCH((ROW) + b * qb / 32 * (STEP) + p_); \
            a0 = _mm256_fmadd_ps(BLOCK(WEIGHTS, ROW, STEP, b, xm), _mm256_set1_ps(dm[b]), a0); \
        }                                                                                      \
        dot = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));               \
    } while (0)

/* Four rows of x (m .. m+3) against one weight row: the weights of each 32 columns are widened once for
   the four. */
#define ROW_DOT_X4(WEIGHTS, ROW, STEP)                                                         \
    do {                                                                                       \
        long nb = K / qb;                                                                      \
        __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()}; \
        for (long b = 0; b < nb; b++) {                                                        \
            __m256i s[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), \
                            _mm256_setzero_si256()};                                           \
            for (long c = 0; c < qb; c += 32) {                                                \
                __m256i wv[2];                                                                 \
                if (m == 0 && !(c & 63)) PREFETCH((ROW) + (b * qb + c) / 32 * (STEP));         \
                WEIGHTS((ROW) + (b * qb + c) / 32 * (STEP), wv);                               \
                for (int i = 0; i < 4; i++)                                                    \
                    s[i] = _mm256_add_epi32(s[i], dot32(wv, xq + (m + i) * K + b * qb + c));   \
            }                                                                                  \
            for (int i = 0; i < 4; i++)                                                        \
                a[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[i]), _mm256_set1_ps(dx[(m + i) * nb + b]), a[i]); \
        }                                                                                      \
        for (int i = 0; i < 4; i++) dots[i] = hsum(a[i]);                                      \
    } while (0)

#define INT_KERNEL_BODY(WEIGHTS, ROW_BYTES, STEP, OUT)                                         \
    for (long n = 0; n < N; n++) {                                                             \
        const __typeof__(w) row = w + n * (ROW_BYTES);                                         \
        float b = bias ? bias[n] : 0.f;                                                        \
        long m = 0;                                                                            \
        for (; m + 4 <= M; m += 4) {                                                           \
            float dots[4];                                                                     \
            ROW_DOT_X4(WEIGHTS, row, STEP);                                                    \
            for (int i = 0; i < 4; i++) put(y, (m + i) * N + n, OUT(dots[i], m + i) + b, yd);  \
        }                                                                                      \
        for (; m < M; m++) {                                                                   \
            const int16_t *xm = xq + m * K;                                                    \
            const float *dm = dx + m * (K / qb);                                               \
            float dot;                                                                         \
            ROW_DOT(WEIGHTS, row, STEP);                                                       \
            put(y, m * N + n, OUT(dot, m) + b, yd);                                            \
        }                                                                                      \
    }

#define OUT_Q8(dot, mi) ((dot) * scale[n])
#define OUT_Q4(dot, mi) (((dot) - 8.f * xs[mi]) * scale[n])

static void gemv_q8(const int8_t *w, const float *scale, const int16_t *xq, const float *dx, const float *bias,
                    void *y, int yd, long M, long N, long K, long qb, int nt) {
#pragma omp parallel for schedule(static) num_threads(threads_for(N, K, nt))
    INT_KERNEL_BODY(weights_q8, K, 32, OUT_Q8)
}

static void gemv_q4(const uint8_t *w, const float *scale, const int16_t *xq, const float *dx, const float *xs,
                    const float *bias, void *y, int yd, long M, long N, long K, long qb, int nt) {
#pragma omp parallel for schedule(static) num_threads(threads_for(N, K / 2, nt))
    INT_KERNEL_BODY(weights_q4, K / 2, 16, OUT_Q4)
}

/* A scratch buffer per calling thread, grown as needed and kept (one allocation per thread and size),
   freed when the thread ends (a thread-specific key's destructor: a plain __thread pointer was lost
   with its thread, and a chat answering each turn on a new thread grew by up to 4 MB a turn). */
struct scratch {
    unsigned char *p;
    size_t size;
};
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_keyed;

static void scratch_free(void *s) {
    free(((struct scratch *)s)->p);
    free(s);
}

static void scratch_init(void) { scratch_keyed = pthread_key_create(&scratch_key, scratch_free) == 0; }

static unsigned char *scratch_of(size_t need) {
    pthread_once(&scratch_once, scratch_init);
    if (!scratch_keyed) return NULL;
    struct scratch *s = pthread_getspecific(scratch_key);
    if (!s) {
        s = calloc(1, sizeof *s);
        if (!s || pthread_setspecific(scratch_key, s)) {
            free(s);
            return NULL;
        }
    }
    if (need > s->size) {
        free(s->p);
        s->p = malloc(need);
        s->size = s->p ? need : 0;
    }
    return s->p;
}

#define ALIGN64(n) (((size_t)(n) + 63) / 64 * 64)

/* y [M, N] (dtype yd) = x [M, K] (dtype xd) @ W.T (* scale) (+ bias [N], dtype bd; NULL: none).
   kind: 0 bfloat16 weights, 1 float16, 2 float32, 8 int8 rows with float32 scales, 4 the official int4 packing
   with float32 scales; qb: the activation block of the integer kernels. Returns 0, or -1 when the
   scratch memory could not be allocated (nothing written to y). */
int glm_linear(int kind, const void *w, const float *scale, const void *bias, int bd, const void *x, int xd, void *y,
               int yd, long M, long N, long K, long qb, int nt) {
    int tiled = kind == 2 ? M >= F32_TILE_ROWS : kind < 4 ? M >= GEMM_ROWS : M > INT_ROWS;
    long mp = ((M < GEMM_BLOCK_M ? M : GEMM_BLOCK_M) + 7) / 8 * 8; /* padded rows of x in one pass */
    /* scratch: x as float32 (the tiles read x through xt, one pass of rows at a time, instead), bias */
    size_t x_bytes = tiled ? ALIGN64(K * mp * sizeof(float)) : ALIGN64(M * K * sizeof(float));
    size_t b_bytes = bias ? ALIGN64(N * sizeof(float)) : 0;
    size_t q_bytes = kind < 4 || tiled ? 0 : ALIGN64(M * K * sizeof(int16_t)) +
                                             ALIGN64(M * (K / qb) * sizeof(float)) + ALIGN64(M * sizeof(float));
    unsigned char *buf = scratch_of(x_bytes + b_bytes + q_bytes);
    if (!buf) return -1;
    float *x32 = (float *)buf, *b32 = bias ? (float *)(buf + x_bytes) : NULL;
    if (bias) to_f32(bias, bd, b32, N);
    if (tiled) {
        size_t row = K * (xd == F32 ? sizeof(float) : sizeof(uint16_t));
        for (long m0 = 0; m0 < M; m0 += GEMM_BLOCK_M) {
            long rows = M - m0 < GEMM_BLOCK_M ? M - m0 : GEMM_BLOCK_M, MP = (rows + 7) / 8 * 8;
            transpose_x((const unsigned char *)x + m0 * row, xd, x32, rows, MP, K, kind);
            gemm_tiles(kind, w, kind >= 4 ? scale : NULL, x32, MP, b32, y, yd, m0, rows, N, K, nt);
        }
        return 0;
    }
    to_f32(x, xd, x32, M * K);
    if (kind == 2) {
        gemv_w32((const float *)w, x32, b32, y, yd, M, N, K, nt);
        return 0;
    }
    if (kind < 4) {
        gemv_w16((const uint16_t *)w, kind == 1, x32, b32, y, yd, M, N, K, nt);
        return 0;
    }
    int16_t *xq = (int16_t *)(buf + x_bytes + b_bytes);
    float *dx = (float *)((unsigned char *)xq + ALIGN64(M * K * sizeof(int16_t)));
    float *xs = (float *)((unsigned char *)dx + ALIGN64(M * (K / qb) * sizeof(float)));
    quantize_x(x32, xq, dx, xs, M, K, kind == 4, qb);
    if (kind == 8)
        gemv_q8((const int8_t *)w, scale, xq, dx, b32, y, yd, M, N, K, qb, nt);
    else
        gemv_q4((const uint8_t *)w, scale, xq, dx, xs, b32, y, yd, M, N, K, qb, nt);
    return 0;
}
