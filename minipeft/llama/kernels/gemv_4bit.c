/* out = x @ W.T for a 4-bit W, read as it is stored: two codes a byte (the high half first), one fp32 absmax
 * a block of 64 weights. Each weight is decoded in a register, exactly as quant.dequantize_4bit decodes it
 * (a block's 16 possible weights are made first; each code then picks one),
 *
 *     w[n, k] = absmax[n, k / 64] * codebook[code[n, k]]        rounded to bf16 under bf16 compute
 *
 * and multiplied at once: the weight never goes to memory decoded, so a token reads 0.5 byte a weight
 * instead of 4 (fp32) or 2 (bf16). Sums are in fp32. Rows must be whole blocks (K % 64 == 0). Rows of W are
 * shared among the threads; reading them ahead (PREFETCH) made a token of the default model 1.15x faster.
 * Built and loaded by minipeft/llama/fast_gemv.py. */
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#define BLOCK 64
#define PREFETCH 4096  /* bytes of codes ahead */

typedef union { float f; uint32_t u; } bits32;

static float round_to_bf16(float value)  /* to nearest, ties to even, as torch rounds */
{
    if (value != value) return value;  /* NaN stays NaN */
    bits32 bits = { value };
    bits.u = (bits.u + 0x7FFF + ((bits.u >> 16) & 1)) & 0xFFFF0000u;
    return bits.f;
}

/* x (M, K), fp32 or bf16, as fp32 and reordered: each block's 32 even columns then its 32 odd ones, so that
 * the high half-bytes (even columns) and the low ones each meet a contiguous run of x. */
static float *reordered(const void *x, int64_t M, int64_t K, int bf16)
{
    float *xs = malloc(sizeof(float) * M * K);
    if (xs == NULL) return NULL;
    for (int64_t i = 0; i < M * K; i++) {
        int64_t block = i / BLOCK, j = i % BLOCK;
        bits32 value = { .u = bf16 ? (uint32_t)((const uint16_t *)x)[i] << 16 : 0 };
        xs[block * BLOCK + (j % 2) * 32 + j / 2] = bf16 ? value.f : ((const float *)x)[i];
    }
    return xs;
}

#ifdef __AVX512F__
/* The block's 16 possible weights, codebook * absmax, rounded to bf16 when asked: a code then picks its weight. */
static inline __m512 block_table(__m512 codebook, float absmax, int round_bf16)
{
    __m512 w = _mm512_mul_ps(codebook, _mm512_set1_ps(absmax));
    if (!round_bf16) return w;
    __m512i u = _mm512_castps_si512(w);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000u)));
}
#elif defined(__AVX2__) && defined(__FMA__)
static inline __m256 block_table(__m256 codebook, float absmax, int round_bf16)  /* 8 of the 16 */
{
    __m256 w = _mm256_mul_ps(codebook, _mm256_set1_ps(absmax));
    if (!round_bf16) return w;
    __m256i u = _mm256_castps_si256(w);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
    return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xFFFF0000u)));
}

static inline __m256 pick8(__m256i codes, __m256 first, __m256 second)
{
    /* a 16-entry lookup from two 8-entry ones, chosen by the code's bit 3 */
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(first, codes), _mm256_permutevar8x32_ps(second, codes),
                            _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));
}
#endif

/* R outputs (R = 1 to 4, a constant once inlined): row n of W (its codes and block scales) times R reordered
 * rows of x, each weight decoded once for all R. Each output keeps four sums side by side, so that a
 * multiply-add need not wait for the one before. */
static inline __attribute__((always_inline)) void dot(int R, const uint8_t *codes, const float *scale,
                                                      const float *xs, int64_t K, const float *codebook,
                                                      int round_bf16, float *out)
{
    const int64_t blocks = K / BLOCK;
#ifdef __AVX512F__
    const __m512 book = _mm512_loadu_ps(codebook);
    __m512 sum[4][4];
    for (int r = 0; r < R; r++)
        for (int q = 0; q < 4; q++) sum[r][q] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++, codes += 32) {
        __builtin_prefetch(codes + PREFETCH);  /* memory, not arithmetic, is the limit */
        const __m512 table = block_table(book, scale[b], round_bf16);
        for (int h = 0; h < 2; h++) {  /* 16 bytes: 16 even columns (high half-bytes) and 16 odd ones */
            __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + 16 * h)));
            __m512 even = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), table);
            __m512 odd = _mm512_permutexvar_ps(_mm512_and_si512(c, _mm512_set1_epi32(15)), table);
            for (int r = 0; r < R; r++) {
                const float *x = xs + r * K + b * BLOCK;
                sum[r][h] = _mm512_fmadd_ps(even, _mm512_loadu_ps(x + 16 * h), sum[r][h]);
                sum[r][2 + h] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(x + 32 + 16 * h), sum[r][2 + h]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        out[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(sum[r][0], sum[r][1]),
                                                    _mm512_add_ps(sum[r][2], sum[r][3])));
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256 book_first = _mm256_loadu_ps(codebook), book_second = _mm256_loadu_ps(codebook + 8);
    __m256 sum[4][2];
    for (int r = 0; r < R; r++) sum[r][0] = sum[r][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++, codes += 32) {
        __builtin_prefetch(codes + PREFETCH);
        const __m256 first = block_table(book_first, scale[b], round_bf16);
        const __m256 second = block_table(book_second, scale[b], round_bf16);
        for (int h = 0; h < 4; h++) {  /* 8 bytes: 8 even columns (high half-bytes) and 8 odd ones */
            __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + 8 * h)));
            __m256 even = pick8(_mm256_srli_epi32(c, 4), first, second);
            __m256 odd = pick8(_mm256_and_si256(c, _mm256_set1_epi32(15)), first, second);
            for (int r = 0; r < R; r++) {
                const float *x = xs + r * K + b * BLOCK;
                sum[r][0] = _mm256_fmadd_ps(even, _mm256_loadu_ps(x + 8 * h), sum[r][0]);
                sum[r][1] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(x + 32 + 8 * h), sum[r][1]);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        float lanes[8];
        _mm256_storeu_ps(lanes, _mm256_add_ps(sum[r][0], sum[r][1]));
        out[r] = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    }
#else
    for (int r = 0; r < R; r++) {
        float total = 0.0f;
        for (int64_t b = 0; b < blocks; b++)
            for (int j = 0; j < 32; j++) {
                float even = scale[b] * codebook[codes[b * 32 + j] >> 4];
                float odd = scale[b] * codebook[codes[b * 32 + j] & 15];
                if (round_bf16) even = round_to_bf16(even), odd = round_to_bf16(odd);
                total += even * xs[r * K + b * BLOCK + j] + odd * xs[r * K + b * BLOCK + 32 + j];
            }
        out[r] = total;
    }
#endif
}

/* x: (M, K) row-major; out: (M, N), rows out_stride apart; both fp32, or both bf16 when bf16 (which also
 * rounds each weight to bf16, as the weight decoded in bf16 is). The caller (fast_gemv.Reader) has checked
 * every size; this checks again what it relies on. Returns 0, or -1 (bad sizes) or -2 (out of memory). */
int gemv_4bit(int64_t M, int64_t N, int64_t K, const void *x, const uint8_t *packed, const float *absmax,
              const float *codebook, void *out, int64_t out_stride, int64_t bf16)
{
    if (M < 1 || N < 1 || K < BLOCK || K % BLOCK != 0 || out_stride < N) return -1;
    const int64_t blocks = K / BLOCK;
    float *xs = reordered(x, M, K, (int)bf16);
    if (xs == NULL) return -2;
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *codes = packed + n * (K / 2);
        const float *scale = absmax + n * blocks;
        for (int64_t m = 0; m < M;) {
            float results[4];
            int rows = M - m >= 4 ? 4 : 1;  /* four rows of x at a time, then one */
            if (rows == 4)
                dot(4, codes, scale, xs + m * K, K, codebook, (int)bf16, results);
            else
                dot(1, codes, scale, xs + m * K, K, codebook, (int)bf16, results);
            for (int r = 0; r < rows; r++, m++) {
                if (bf16) {
                    bits32 value = { round_to_bf16(results[r]) };
                    ((uint16_t *)out)[m * out_stride + n] = (uint16_t)(value.u >> 16);
                } else {
                    ((float *)out)[m * out_stride + n] = results[r];
                }
            }
        }
    }
    free(xs);
    return 0;
}
