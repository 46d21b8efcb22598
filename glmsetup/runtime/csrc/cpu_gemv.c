/* Matrix-vector kernels for decoding on x86-64 CPUs with AVX2, FMA and F16C (glmsetup/runtime/native_cpu.py).

   y[m, n] = sum_k W[n, k] * x[m, k] for a few rows m (a decoding step), with W in one of:
     - bfloat16 or float16 [N, K] (a 16-bit nn.Linear weight), x float32;
     - int8 [N, K] and a float32 scale per row (the official int8 scheme);
     - the official int4 packing [N, K/2]: byte j of a row holds column 2j in its high nibble and column
       2j+1 in its low nibble, two's complement, and a float32 scale per row.
   For the integer weights, x is first quantized to int16 in blocks of 32 columns (one float scale per
   block, from the block's largest magnitude): the products are exact integers summed in int32, and the
   only rounding left is x's, at most 1/65534 of its block's largest value (bfloat16 activations, which
   torch's int8/int4 kernels take, round each value to 1/512 of itself).

   Every weight is read once per call whatever the number of rows; rows of W are split between the
   threads (OpenMP; torch's own OpenMP runtime when it is loaded, so the two share one pool).
   K must be a multiple of 32. The Python side checks shapes, types and contiguity before calling. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define GLM_ABI 1
#define QB 32 /* columns per activation block */
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

void glm_gemv_w16(const uint16_t *w, int fp16, const float *x, float *y, long M, long N, long K, int nt) {
#pragma omp parallel for schedule(static) num_threads(threads_for(N, K, nt))
    for (long n = 0; n < N; n++) {
        const uint16_t *row = w + n * K;
        for (long m = 0; m < M; m++) y[m * N + n] = dot16(row, x + m * K, K, fp16, m == 0);
    }
}

/* x float32 [M, K] -> xq int16 [M, K], dx [M, K/32] block scales, xs[m] = sum over blocks of dx times
   the block's sum of xq (the int4 kernel's offset). int4 = 1 orders each block as the int4 kernel reads
   it: its 16 odd columns, then its 16 even columns. Vectorized: this runs once per row and layer, and a
   scalar loop here cost as much as a small layer's product. */
void glm_quantize_x(const float *x, int16_t *xq, float *dx, float *xs, long M, long K, int int4) {
    const __m256 sign = _mm256_set1_ps(-0.0f), big = _mm256_set1_ps(3.4028235e38f);
    for (long m = 0; m < M; m++) {
        const float *xm = x + m * K;
        int16_t *qm = xq + m * K;
        float *dm = dx + m * (K / QB), total = 0.f;
        for (long b = 0; b < K / QB; b++) {
            const float *xb = xm + b * QB;
            __m256 v[4], amax = _mm256_setzero_ps();
            int bad = 0;
            for (int i = 0; i < 4; i++) {
                v[i] = _mm256_loadu_ps(xb + 8 * i);
                __m256 a = _mm256_andnot_ps(sign, v[i]);
                bad |= _mm256_movemask_ps(_mm256_cmp_ps(a, big, _CMP_NLE_UQ)); /* NaN or inf */
                amax = _mm256_max_ps(amax, a);
            }
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
            float d = bad ? 0.f : _mm_cvtss_f32(h) / 32767.f, inv = d > 0.f ? 1.f / d : 0.f;
            __m256 vinv = _mm256_set1_ps(inv);
            __m256i q[4], sum = _mm256_setzero_si256();
            for (int i = 0; i < 4; i++) { /* rounds to nearest even, as lrintf */
                q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], vinv));
                sum = _mm256_add_epi32(sum, q[i]);
            }
            int16_t *out = qm + b * QB;
            /* packs works within 128-bit lanes; permute4x64 puts the four quarters back in order */
            __m256i lo = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8);
            __m256i hi = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8);
            if (int4) {
                int16_t tmp[QB];
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
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
            dm[b] = bad ? NAN : d; /* a NaN or inf input makes the outputs NaN, as a float product would */
            total += dm[b] * (float)_mm_cvtsi128_si32(s4);
        }
        xs[m] = total;
    }
}

/* One block of 32 columns: the exact int32 products summed in 8 lanes, as floats. */
static inline __m256 block_q8(const int8_t *wb, const int16_t *xb) {
    __m256i s0 = _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)wb)),
                                   _mm256_loadu_si256((const __m256i *)xb));
    __m256i s1 = _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wb + 16))),
                                   _mm256_loadu_si256((const __m256i *)(xb + 16)));
    return _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1));
}

/* Nibbles are read as unsigned (q + 8, after flipping each nibble's top bit); the 8 * sum(x) that adds
   is taken off once per output (xs). wb: 16 bytes, xb: the block's odd columns, then its even ones. */
static inline __m256 block_q4(const uint8_t *wb, const int16_t *xb) {
    const __m256i low = _mm256_set1_epi16(0x0F), flip = _mm256_set1_epi16(0x88);
    __m256i v = _mm256_xor_si256(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)wb)), flip);
    __m256i s0 = _mm256_madd_epi16(_mm256_and_si256(v, low), _mm256_loadu_si256((const __m256i *)xb));
    __m256i s1 = _mm256_madd_epi16(_mm256_srli_epi16(v, 4), _mm256_loadu_si256((const __m256i *)(xb + 16)));
    return _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1));
}

/* sum over blocks of block(row, b) * dm[b], with four independent sums (one would wait on the previous
   block's multiply-add every time: measured 2.5x slower) */
#define ROW_DOT(BLOCK, ROW, ROW_STEP)                                                          \
    do {                                                                                       \
        long nb = K / QB, b = 0;                                                               \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                            \
        for (; b + 4 <= nb; b += 4) {                                                          \
            if (m == 0) { /* 4 blocks: one 64-byte line of int4, two of int8 */                \
                PREFETCH((ROW) + b * (ROW_STEP));                                              \
                if ((ROW_STEP) * 4 > 64) PREFETCH((ROW) + b * (ROW_STEP) + 64);                \
            }                                                                                  \
            a0 = _mm256_fmadd_ps(BLOCK((ROW) + b * (ROW_STEP), xm + b * QB), _mm256_set1_ps(dm[b]), a0);             \
            a1 = _mm256_fmadd_ps(BLOCK((ROW) + (b + 1) * (ROW_STEP), xm + (b + 1) * QB), _mm256_set1_ps(dm[b + 1]), a1); \
            a2 = _mm256_fmadd_ps(BLOCK((ROW) + (b + 2) * (ROW_STEP), xm + (b + 2) * QB), _mm256_set1_ps(dm[b + 2]), a2); \
            a3 = _mm256_fmadd_ps(BLOCK((ROW) + (b + 3) * (ROW_STEP), xm + (b + 3) * QB), _mm256_set1_ps(dm[b + 3]), a3); \
        }                                                                                      \
        for (; b < nb; b++)                                                                    \
            a0 = _mm256_fmadd_ps(BLOCK((ROW) + b * (ROW_STEP), xm + b * QB), _mm256_set1_ps(dm[b]), a0);             \
        dot = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));               \
    } while (0)

void glm_gemv_q8(const int8_t *w, const float *scale, const int16_t *xq, const float *dx, float *y,
                 long M, long N, long K, int nt) {
#pragma omp parallel for schedule(static) num_threads(threads_for(N, K, nt))
    for (long n = 0; n < N; n++) {
        const int8_t *row = w + n * K;
        for (long m = 0; m < M; m++) {
            const int16_t *xm = xq + m * K;
            const float *dm = dx + m * (K / QB);
            float dot;
            ROW_DOT(block_q8, row, QB);
            y[m * N + n] = dot * scale[n];
        }
    }
}

void glm_gemv_q4(const uint8_t *w, const float *scale, const int16_t *xq, const float *dx, const float *xs,
                 float *y, long M, long N, long K, int nt) {
#pragma omp parallel for schedule(static) num_threads(threads_for(N, K / 2, nt))
    for (long n = 0; n < N; n++) {
        const uint8_t *row = w + n * (K / 2);
        for (long m = 0; m < M; m++) {
            const int16_t *xm = xq + m * K;
            const float *dm = dx + m * (K / QB);
            float dot;
            ROW_DOT(block_q4, row, QB / 2);
            y[m * N + n] = (dot - 8.f * xs[m]) * scale[n];
        }
    }
}
