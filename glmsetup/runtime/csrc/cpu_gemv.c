/* Matrix-vector kernels for decoding on x86-64 CPUs with AVX2, FMA and F16C (glmsetup/runtime/native_cpu.py).

   y[m, n] = sum_k W[n, k] * x[m, k] for a few rows m (a decoding step), with W in one of:
     - bfloat16 or float16 [N, K] (a 16-bit nn.Linear weight), x float32;
     - int8 [N, K] and a float32 scale per row (the official int8 scheme);
     - the official int4 packing [N, K/2]: byte j of a row holds column 2j in its high nibble and column
       2j+1 in its low nibble, two's complement, and a float32 scale per row.
   For the integer weights, x is first quantized to int16 in blocks of qb columns (128 or 32; one float
   scale per block, from the block's largest magnitude): the products are exact integers summed in int32,
   and the only rounding left is x's, at most 1/65534 of its block's largest value (bfloat16 activations,
   which torch's int8/int4 kernels take, round each value to 1/512 of itself).

   Every weight is read once per call whatever the number of rows; rows of W are split between the
   threads (OpenMP; torch's own OpenMP runtime when it is loaded, so the two share one pool).
   K must be a multiple of 32 (and of qb). The Python side checks shapes, types and contiguity before calling. */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GLM_ABI 4
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

/* Four rows of x against one weight row (a batch): each weight vector is converted once for the four,
   two sums per row of x. */
static inline void dot16_x4(const uint16_t *r, const float *x, long K, int fp16, int prefetch, float *out) {
    __m256 a[4][2];
    for (int i = 0; i < 4; i++) a[i][0] = a[i][1] = _mm256_setzero_ps();
    for (long k = 0; k < K; k += 16) {
        if (prefetch && !(k & 31)) PREFETCH(r + k);
        __m256 w0 = load8(r + k, fp16), w1 = load8(r + k + 8, fp16);
        for (int i = 0; i < 4; i++) {
            a[i][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + i * K + k), a[i][0]);
            a[i][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + i * K + k + 8), a[i][1]);
        }
    }
    for (int i = 0; i < 4; i++) out[i] = hsum(_mm256_add_ps(a[i][0], a[i][1]));
}

/* Two weight rows against four rows of x: eight sums, each weight and x vector loaded once for two or
   four products (batched decoding is bound by these multiply-adds, not by memory). */
static inline void dot16_2x4(const uint16_t *r0, const uint16_t *r1, const float *x, long K, int fp16, int prefetch,
                             float *out0, float *out1) {
    __m256 a[4], b[4];
    for (int i = 0; i < 4; i++) a[i] = b[i] = _mm256_setzero_ps();
    for (long k = 0; k < K; k += 8) {
        if (prefetch && !(k & 31)) {
            PREFETCH(r0 + k);
            PREFETCH(r1 + k);
        }
        __m256 w0 = load8(r0 + k, fp16), w1 = load8(r1 + k, fp16);
        for (int i = 0; i < 4; i++) {
            __m256 xv = _mm256_loadu_ps(x + i * K + k);
            a[i] = _mm256_fmadd_ps(w0, xv, a[i]);
            b[i] = _mm256_fmadd_ps(w1, xv, b[i]);
        }
    }
    for (int i = 0; i < 4; i++) {
        out0[i] = hsum(a[i]);
        out1[i] = hsum(b[i]);
    }
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

static void gemv_w16(const uint16_t *w, int fp16, const float *x, const float *bias, void *y, int yd, long M, long N,
                     long K, int nt) {
    if (M >= 4 && N % 2 == 0) { /* a batch: pairs of weight rows */
#pragma omp parallel for schedule(static) num_threads(threads_for(N, K, nt))
        for (long p = 0; p < N / 2; p++) {
            long n = 2 * p;
            const uint16_t *row = w + n * K;
            float b0 = bias ? bias[n] : 0.f, b1 = bias ? bias[n + 1] : 0.f, d0[4], d1[4];
            long m = 0;
            for (; m + 4 <= M; m += 4) {
                dot16_2x4(row, row + K, x + m * K, K, fp16, m == 0, d0, d1);
                for (int i = 0; i < 4; i++) {
                    put(y, (m + i) * N + n, d0[i] + b0, yd);
                    put(y, (m + i) * N + n + 1, d1[i] + b1, yd);
                }
            }
            for (; m < M; m++) {
                put(y, m * N + n, dot16(row, x + m * K, K, fp16, 0) + b0, yd);
                put(y, m * N + n + 1, dot16(row + K, x + m * K, K, fp16, 0) + b1, yd);
            }
        }
        return;
    }
#pragma omp parallel for schedule(static) num_threads(threads_for(N, K, nt))
    for (long n = 0; n < N; n++) {
        const uint16_t *row = w + n * K;
        float b = bias ? bias[n] : 0.f, dots[4];
        long m = 0;
        for (; m + 4 <= M; m += 4) {
            dot16_x4(row, x + m * K, K, fp16, m == 0, dots);
            for (int i = 0; i < 4; i++) put(y, (m + i) * N + n, dots[i] + b, yd);
        }
        for (; m < M; m++) put(y, m * N + n, dot16(row, x + m * K, K, fp16, m == 0) + b, yd);
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

/* out [rows, K] float32 = q * scale, row by row: kind 8 int8 rows, kind 4 the official int4 packing (a
   prompt's rows are multiplied with these blocks as a matrix product). */
void glm_dequant(int kind, const void *w, const float *scale, float *out, long rows, long K, int nt) {
#pragma omp parallel for schedule(static) num_threads(threads_for(rows, K, nt))
    for (long r = 0; r < rows; r++) {
        float s = scale[r], *o = out + r * K;
        if (kind == 8) {
            const int8_t *q = (const int8_t *)w + r * K;
            for (long k = 0; k < K; k++) o[k] = (float)q[k] * s;
        } else {
            const int8_t *q = (const int8_t *)w + r * (K / 2);
            for (long j = 0; j < K / 2; j++) {
                o[2 * j] = (float)(q[j] >> 4) * s;                    /* high nibble: column 2j */
                o[2 * j + 1] = (float)((int8_t)(q[j] << 4) >> 4) * s; /* low nibble: column 2j + 1 */
            }
        }
    }
}

/* A scratch buffer per calling thread, grown as needed and kept (one allocation per thread and size). */
static __thread unsigned char *scratch;
static __thread size_t scratch_size;

static unsigned char *scratch_of(size_t need) {
    if (need > scratch_size) {
        free(scratch);
        scratch = malloc(need);
        scratch_size = scratch ? need : 0;
    }
    return scratch;
}

#define ALIGN64(n) (((size_t)(n) + 63) / 64 * 64)

/* y [M, N] (dtype yd) = x [M, K] (dtype xd) @ W.T (* scale) (+ bias [N], dtype bd; NULL: none).
   kind: 0 bfloat16 weights, 1 float16, 8 int8 rows with float32 scales, 4 the official int4 packing
   with float32 scales; qb: the activation block of the integer kernels. Returns 0, or -1 when the
   scratch memory could not be allocated (nothing written to y). */
int glm_linear(int kind, const void *w, const float *scale, const void *bias, int bd, const void *x, int xd, void *y,
               int yd, long M, long N, long K, long qb, int nt) {
    size_t x_bytes = ALIGN64(M * K * sizeof(float)), b_bytes = bias ? ALIGN64(N * sizeof(float)) : 0;
    size_t q_bytes = kind >= 4 ? ALIGN64(M * K * sizeof(int16_t)) + ALIGN64(M * (K / qb) * sizeof(float)) +
                                 ALIGN64(M * sizeof(float)) : 0;
    unsigned char *buf = scratch_of(x_bytes + b_bytes + q_bytes);
    if (!buf) return -1;
    float *x32 = (float *)buf, *b32 = bias ? (float *)(buf + x_bytes) : NULL;
    to_f32(x, xd, x32, M * K);
    if (bias) to_f32(bias, bd, b32, N);
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
