/* Our CPU kernels for decoding (llama/kernels/native.py compiles this file for the CPU
 * it runs on, -march=native, and calls it through ctypes):
 *
 * - y = x @ W^T for a few rows of x. Decoding reads every weight once per
 *   token, so its speed is the memory bandwidth a kernel reaches. PyTorch has
 *   no kernel that reads bf16 or group-wise int8 weights with fp32
 *   arithmetic at that speed on CPUs without native bf16 (README, Speed):
 *   these do what llama.cpp does, widening each weight to fp32 in registers;
 *   int8 and int4 weights meet activations quantized to int8 (Q8_0) in int8
 *   dot products where the CPU has them (tile_q8, tile_q4).
 * - The rest of a decoding step fused (RMSNorm, silu * up, attention for one
 *   token a row, all transformer blocks), so that Python makes one call
 *   where PyTorch's operators took ten or more per block.
 *
 * Layouts (row-major, contiguous):
 *   x: (M, K) fp32 or bf16 (x_bf16), y: (M, N) in the same dtype
 *   bf16 weights: w (N, K) as uint16
 *   int8 weights: w (N, K) int8 and scales (N, K / 32) fp32, W[n, k] = w[n, k] * scales[n, k / 32]
 *   int4 weights: w (N, K / 2) uint8 and scales (N, K / 32, 2) fp16 (scale, min) per group of 32, with
 *     W[n, 32 g + j] = q * scale + min, q = the low nibble of w[n, 16 g + j] for j < 16, else the high
 *     nibble of w[n, 16 g + j - 16] (llama.cpp's Q4_1 layout)
 *   K-quant weights (Q4K, Q5K, Q6K): w (N, K / 256 * 144, 176 or 210) uint8, llama.cpp's
 *     super-blocks as GGUF files hold them, no scales (see the K-quant section below)
 * K must be a multiple of 32 (256 for the K-quants). Sums are in fp32 (int8 dot products:
 * exact in int32 per group).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

#if defined(__AVX512F__)
#define W 16 /* floats per vector */
#define R 4  /* weight rows per tile */
typedef __m512 vf;
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vset1(float a) { return _mm512_set1_ps(a); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf ld_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline vf ld_i8(const int8_t *p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline vf ld_bf16(const uint16_t *p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline vf ld_nib(const uint8_t *p, int hi) { /* 16 nibbles, low or high, of 16 bytes */
  __m128i b = _mm_loadu_si128((const __m128i *)p);
  b = _mm_and_si128(hi ? _mm_srli_epi16(b, 4) : b, _mm_set1_epi8(0x0f));
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
}
static inline float hsum(vf v) { return _mm512_reduce_add_ps(v); }
/* One group of 32 values of x as int8 (llama.cpp's Q8_0): xq = round(x / sx) into q,
 * sx = max|x| / 127 returned, sum(xq) into sum. Used by the int8 dot products of
 * tile_q8 / tile_q4 (VNNI) and of tile_k (any AVX-512 with BW). */
INLINE float q_group(const float *x, int8_t *q, int *sum) {
  __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16), sign = _mm512_set1_ps(-0.0f);
  float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, a), _mm512_andnot_ps(sign, b)));
  __m512 inv = _mm512_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
  __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
  _mm_storeu_si128((__m128i *)q, _mm512_cvtsepi32_epi8(qa));
  _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtsepi32_epi8(qb));
  *sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
  int nan = _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q);
  return nan ? NAN : amax / 127.0f; /* a NaN in x stays NaN in y */
}
#if defined(__AVX512VNNI__)
/* int8 dot products (see tile_q8): 64 bytes, two groups of 32, a vector; vpdpbusd
 * multiplies unsigned by signed bytes, so each weight is read as w + 128 (w ^ 0x80)
 * and each group's sum starts at -128 sum(xq), in its first lane (c). */
#define QB 64
typedef __m512i vi;
INLINE vi q_ld_w(const int8_t *w, int whole) {
  __m512i v = whole ? _mm512_loadu_si512(w) : _mm512_maskz_loadu_epi8(0xffffffffULL, w);
  return _mm512_xor_si512(v, _mm512_set1_epi8((char)0x80));
}
INLINE vi q_dot(vi w, const int8_t *q, const int32_t *c) {
  return _mm512_dpbusd_epi32(_mm512_load_si512(c), w, _mm512_load_si512(q));
}
INLINE vf q_w_scales(const float *s, int whole) { /* each group's scale over its 8 lanes */
  return whole ? _mm512_insertf32x8(_mm512_set1_ps(s[0]), _mm256_set1_ps(s[1]), 1)
               : _mm512_maskz_mov_ps(0x00ff, _mm512_set1_ps(s[0]));
}
INLINE vf q_cvt(vi v) { return _mm512_cvtepi32_ps(v); }
/* int4 (see tile_q4): a chunk of W / 4 = 4 groups, 64 packed bytes (`groups`
 * < 4 in a last chunk), as low and high nibbles; each group's dot product in
 * 4 lanes: low nibbles by xq's first halves, high ones by its second halves
 * (q4_x's layout). The nibbles are unsigned, as vpdpbusd takes them. */
INLINE void q4_unpack(const uint8_t *w, int groups, vi *lo, vi *hi) {
  __m512i v = groups == 4 ? _mm512_loadu_si512(w) : _mm512_maskz_loadu_epi8((1ULL << (16 * groups)) - 1, w);
  __m512i nib = _mm512_set1_epi8(0x0f);
  *lo = _mm512_and_si512(v, nib);
  *hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
}
INLINE vi q4_dot(vi lo, vi hi, const int8_t *q) {
  return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_load_si512(q)), hi,
                             _mm512_load_si512(q + 64));
}
INLINE void q4_scales(const uint16_t *sm, int groups, vf *scale, vf *min) { /* fp16 pairs, over 4 lanes each */
  __m128i h = groups == 4 ? _mm_loadu_si128((const __m128i *)sm) : _mm_maskz_loadu_epi16((1 << (2 * groups)) - 1, sm);
  __m512 v = _mm512_castps256_ps512(_mm256_cvtph_ps(h));
  *scale = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6), v);
  *min = _mm512_permutexvar_ps(_mm512_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 7), v);
}
#endif
#elif defined(__AVX2__) && defined(__FMA__)
#define W 8
#define R 2 /* 16 vector registers: fewer accumulators */
typedef __m256 vf;
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vset1(float a) { return _mm256_set1_ps(a); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf ld_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline vf ld_i8(const int8_t *p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline vf ld_bf16(const uint16_t *p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline vf ld_nib(const uint8_t *p, int hi) { /* 8 nibbles, low or high, of 8 bytes */
  __m128i b = _mm_loadl_epi64((const __m128i *)p);
  b = _mm_and_si128(hi ? _mm_srli_epi16(b, 4) : b, _mm_set1_epi8(0x0f));
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
}
static inline float hsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
/* int8 dot products (see tile_q8): 32 bytes, one group, a vector; vpmaddubsw
 * multiplies unsigned by signed bytes into saturating int16 pairs, so it takes
 * |xq| and w with xq's sign (llama.cpp's trick: no pair passes 2 * 127 * 127). */
#define QB 32
typedef __m256i vi;
INLINE vi q_ld_w(const int8_t *w, int whole) {
  (void)whole;
  return _mm256_loadu_si256((const __m256i *)w);
}
INLINE vi q_dot(vi w, const int8_t *q, const int32_t *c) {
  (void)c;
  __m256i xq = _mm256_load_si256((const __m256i *)q);
  __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(xq), _mm256_sign_epi8(w, xq));
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}
INLINE vf q_w_scales(const float *s, int whole) {
  (void)whole;
  return _mm256_set1_ps(s[0]);
}
INLINE vf q_cvt(vi v) { return _mm256_cvtepi32_ps(v); }
/* int4 (see tile_q4): a chunk of W / 4 = 2 groups, 32 packed bytes, each
 * group's dot product in 4 lanes; no int16 sum passes 2 * 2 * 15 * 127. */
INLINE void q4_unpack(const uint8_t *w, int groups, vi *lo, vi *hi) {
  __m256i v = groups == 2 ? _mm256_loadu_si256((const __m256i *)w)
                          : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)w));
  __m256i nib = _mm256_set1_epi8(0x0f);
  *lo = _mm256_and_si256(v, nib);
  *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
}
INLINE vi q4_dot(vi lo, vi hi, const int8_t *q) {
  __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_load_si256((const __m256i *)q)),
                                   _mm256_maddubs_epi16(hi, _mm256_load_si256((const __m256i *)(q + 32))));
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}
INLINE void q4_scales(const uint16_t *sm, int groups, vf *scale, vf *min) {
  int32_t pair;
  memcpy(&pair, sm, 4);
  __m128i h = groups == 2 ? _mm_loadl_epi64((const __m128i *)sm) : _mm_cvtsi32_si128(pair);
  __m256 w = _mm256_castps128_ps256(_mm_cvtph_ps(h));
  *scale = _mm256_permutevar8x32_ps(w, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2));
  *min = _mm256_permutevar8x32_ps(w, _mm256_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3));
}
INLINE float q_group(const float *x, int8_t *q, int *sum) {
  float amax = 0;
  int nan = 0;
  for (int i = 0; i < 32; i++) {
    amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    nan |= x[i] != x[i];
  }
  float inv = amax > 0 && !nan ? 127.0f / amax : 0.0f;
  *sum = 0;
  for (int i = 0; i < 32; i++) *sum += q[i] = (int8_t)lrintf(x[i] * inv);
  return nan ? NAN : amax / 127.0f; /* a NaN in x stays NaN in y */
}
#else
#error "llama/kernels.c needs AVX2 with FMA, or AVX-512"
#endif

#define V (32 / W) /* vectors per group of 32 weights */
/* Read ahead by 4 R K bytes (2 R K for int8): the streams of R rows defeat the
 * hardware's prefetcher. For fp32, one tile ahead and both cache lines of each
 * 32 floats read SmolLM2's weights 7-9% faster than two tiles ahead and one
 * line (2 threads, AVX-512 Xeon); bf16 and int8 were level either way. */
#define PREFETCH_ROWS(kind) ((kind) == F32 ? R : 2 * R)
#define MB 4       /* rows of x per pass over a tile of weights */

/* Version of this interface; native.py refuses a library of another. */
int llama_kernels_version(void) { return 7; }
int llama_kernels_vector_width(void) { return W; }
int llama_kernels_int8_dot(void) { /* 1: int8 weights by int8 dot products (tile_q8), 0: widened to fp32 */
#ifdef QB
  return 1;
#else
  return 0;
#endif
}

static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does; NaN stays NaN */
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* x as fp32: itself, or a converted copy the caller frees. */
static const float *x_as_f32(const void *x, int x_bf16, long count, float **owned) {
  *owned = NULL;
  if (!x_bf16) return (const float *)x;
  float *buf = malloc(sizeof(float) * count);
  if (!buf) return NULL;
  for (long i = 0; i < count; i++) buf[i] = bf16_to_f32(((const uint16_t *)x)[i]);
  *owned = buf;
  return buf;
}

static inline void store(void *y, int y_bf16, long i, float v) {
  if (y_bf16) ((uint16_t *)y)[i] = f32_to_bf16(v);
  else ((float *)y)[i] = v;
}

enum kind { F32, BF16, Q8, Q4, Q4K, Q5K, Q6K }; /* the weight's format (native.KINDS) */
#define IS_K(kind) ((kind) >= Q4K) /* llama.cpp's K-quants: super-blocks of 256 weights, scales inside */

INLINE vf ld_w(enum kind kind, const void *w, long i) { /* weights i .. i + W - 1 of a row-major (N, K) W */
  if (kind == F32) return ld_f32((const float *)w + i);
  if (kind == BF16) return ld_bf16((const uint16_t *)w + i);
  if (kind == Q8) return ld_i8((const int8_t *)w + i);
  long j = i % 32; /* within its group of 32: 16 bytes, weight j in byte j % 16, high nibble from 16 on */
  return ld_nib((const uint8_t *)w + i / 32 * 16 + j % 16, j >= 16);
}

INLINE long row_bytes(enum kind kind, long K) { /* of K weights */
  return kind == F32 ? 4 * K : kind == BF16 ? 2 * K : kind == Q8 ? K : K / 2;
}

/* One tile: rows n0..n0+rr-1 of W against rows m0..m0+mb-1 of x. Each group of
 * 32 weights is widened once and used for every row of x. */
INLINE void tile(enum kind kind, int mb, int rr, long m0, long n0, const float *x, const void *w, const float *s,
                 void *y, int y_bf16, long N, long K) {
  long G = K / 32;
  vf acc[MB][R];
  for (int m = 0; m < mb; m++)
    for (int r = 0; r < rr; r++) acc[m][r] = vzero();
  for (long g = 0; g < G; g++) {
    for (int r = 0; r < rr; r++) {
      long at = (n0 + r) * K + g * 32;
      const char *ahead = (const char *)w + (n0 + r + PREFETCH_ROWS(kind)) * row_bytes(kind, K)
                          + row_bytes(kind, g * 32);
      _mm_prefetch(ahead, _MM_HINT_T0);
      if (kind == F32) _mm_prefetch(ahead + 64, _MM_HINT_T0); /* 32 floats: two cache lines */
      vf wv[V];
      for (int v = 0; v < V; v++) wv[v] = ld_w(kind, w, at + v * W);
      for (int m = 0; m < mb; m++) {
        const float *xm = x + (m0 + m) * K + g * 32;
        if (kind == Q8) { /* the group's sum, then times its scale */
          vf t = vmul(ld_f32(xm), wv[0]);
          for (int v = 1; v < V; v++) t = vfma(ld_f32(xm + v * W), wv[v], t);
          acc[m][r] = vfma(t, vset1(s[(n0 + r) * G + g]), acc[m][r]);
        } else if (kind == Q4) { /* (sum of x q) * scale + (sum of x) * min */
          vf t = vmul(ld_f32(xm), wv[0]), xs = ld_f32(xm);
          for (int v = 1; v < V; v++) {
            t = vfma(ld_f32(xm + v * W), wv[v], t);
            xs = vadd(xs, ld_f32(xm + v * W));
          }
          const uint16_t *sm = (const uint16_t *)s + 2 * ((n0 + r) * G + g); /* fp16 scale, min */
          acc[m][r] = vfma(xs, vset1(_cvtsh_ss(sm[1])), vfma(t, vset1(_cvtsh_ss(sm[0])), acc[m][r]));
        } else {
          for (int v = 0; v < V; v++) acc[m][r] = vfma(ld_f32(xm + v * W), wv[v], acc[m][r]);
        }
      }
    }
  }
  for (int m = 0; m < mb; m++)
    for (int r = 0; r < rr; r++) store(y, y_bf16, (m0 + m) * N + n0 + r, hsum(acc[m][r]));
}

/* int8 weights by int8 dot products, where the CPU has them (QB: AVX-512 VNNI,
 * or AVX2). Widening each weight to fp32 took four instructions per 16 weights
 * and made int8 decoding compute-bound; a dot product instruction takes 32 or
 * 64 bytes. x is quantized as llama.cpp's Q8_0 does for the same products: per
 * row and group of 32, sx = max|x| / 127 and xq = round(x / sx); then
 * y[n] = sum over groups of sx * scale[n] * (xq . w[n]), the dot exact in int32.
 * Laid out per row and vector of QB bytes (QB / 32 groups, an odd last group
 * paired with zeros): q the xq; c -128 sum(xq) of each group in its first
 * int32 lane (for vpdpbusd, see q_dot); s each group's sx over its lanes.
 * For int4 weights (q4_x) t is sx sum(xq) of each group in its first lane. */
struct qx {
  int8_t *q;
  int32_t *c;
  float *s, *t;
  long vecs; /* per row */
};

#ifdef QB
#define QG (QB / 32) /* groups per vector */
static int quantize_x(const float *x, long M, long K, struct qx *qx) {
  long G = K / 32, vecs = (G + QG - 1) / QG, n = M * vecs;
  long size = (n * (QB + 8 * W) + 63) / 64 * 64;
  char *buf = aligned_alloc(64, size);
  if (!buf) return -1;
  memset(buf, 0, size);
  *qx = (struct qx){(int8_t *)buf, (int32_t *)(buf + n * QB), (float *)(buf + n * (QB + 4 * W)), NULL, vecs};
  for (long m = 0; m < M; m++)
    for (long g = 0; g < G; g++) {
      long v = m * vecs + g / QG, lane = v * W + (g % QG) * (W / QG);
      int sum;
      float sx = q_group(x + m * K + g * 32, qx->q + v * QB + (g % QG) * 32, &sum);
      qx->c[lane] = -128 * sum;
      for (int l = 0; l < W / QG; l++) qx->s[lane + l] = sx;
    }
  return 0;
}

/* x quantized as quantize_x does, laid out for int4 weights (tile_q4): per
 * row and chunk of W / 4 groups, two vectors of bytes, the first halves of
 * the chunk's groups (xq[0..15] of each) and then their second halves, which
 * meet the packed weights' low and high nibbles; s each group's sx over its 4
 * lanes, t sx sum(xq) in its first lane. A last chunk padded with zeros. */
#define QC (W / 4) /* groups per chunk */
static int q4_x(const float *x, long M, long K, struct qx *qx) {
  long G = K / 32, vecs = (G + QC - 1) / QC, n = M * vecs;
  char *buf = aligned_alloc(64, (n * (8 * W + 8 * W) + 63) / 64 * 64);
  if (!buf) return -1;
  memset(buf, 0, n * 16 * W);
  *qx = (struct qx){(int8_t *)buf, NULL, (float *)(buf + n * 8 * W), (float *)(buf + n * 12 * W), vecs};
  for (long m = 0; m < M; m++)
    for (long g = 0; g < G; g++) {
      long v = m * vecs + g / QC, j = g % QC;
      int8_t tmp[32];
      int sum;
      float sx = q_group(x + m * K + g * 32, tmp, &sum);
      memcpy(qx->q + v * 8 * W + j * 16, tmp, 16);
      memcpy(qx->q + v * 8 * W + 4 * W + j * 16, tmp + 16, 16);
      for (int l = 0; l < 4; l++) qx->s[v * W + 4 * j + l] = sx;
      qx->t[v * W + 4 * j] = sx * (float)sum;
    }
  return 0;
}

/* tile() for int8 weights by int8 dot products, a vector of QB weights at a time. */
INLINE void tile_q8(int mb, int rr, long m0, long n0, const struct qx *qx, const int8_t *w, const float *s, void *y,
                    int y_bf16, long N, long K) {
  long G = K / 32;
  vf acc[MB][R];
  for (int m = 0; m < mb; m++)
    for (int r = 0; r < rr; r++) acc[m][r] = vzero();
  for (long p = 0; p < qx->vecs; p++) {
    int whole = (p + 1) * QG <= G;
    for (int r = 0; r < rr; r++) {
      long at = (n0 + r) * K + p * QB;
      _mm_prefetch((const char *)(w + at + PREFETCH_ROWS(Q8) * K), _MM_HINT_T0);
      vi wv = q_ld_w(w + at, whole);
      vf sw = q_w_scales(s + (n0 + r) * G + p * QG, whole);
      for (int m = 0; m < mb; m++) {
        long v = (m0 + m) * qx->vecs + p;
        vf d = q_cvt(q_dot(wv, qx->q + v * QB, qx->c + v * W));
        acc[m][r] = vfma(d, vmul(sw, ld_f32(qx->s + v * W)), acc[m][r]);
      }
    }
  }
  for (int m = 0; m < mb; m++)
    for (int r = 0; r < rr; r++) store(y, y_bf16, (m0 + m) * N + n0 + r, hsum(acc[m][r]));
}

/* tile_q8 for int4 weights (a scale and a min per group), a chunk of W / 4
 * groups at a time: the group's dot q . xq is exact in int32 (q unsigned,
 * as the dot product instructions take their first operand), and
 * y[n] = sum over groups of sx * (scale * (q . xq) + min * sum(xq)). */
INLINE void tile_q4(int mb, int rr, long m0, long n0, const struct qx *qx, const uint8_t *w, const float *s, void *y,
                    int y_bf16, long N, long K) {
  long G = K / 32;
  vf acc[MB][R];
  for (int m = 0; m < mb; m++)
    for (int r = 0; r < rr; r++) acc[m][r] = vzero();
  for (long p = 0; p < qx->vecs; p++) {
    int groups = G - p * QC < QC ? (int)(G - p * QC) : QC;
    for (int r = 0; r < rr; r++) {
      long at = (n0 + r) * (K / 2) + p * QC * 16;
      _mm_prefetch((const char *)(w + at + PREFETCH_ROWS(Q4) * (K / 2)), _MM_HINT_T0);
      const uint16_t *sm = (const uint16_t *)s + 2 * ((n0 + r) * G + p * QC);
      _mm_prefetch((const char *)(sm + 2 * PREFETCH_ROWS(Q4) * G), _MM_HINT_T0);
      vf sw, mw;
      vi lo, hi;
      q4_scales(sm, groups, &sw, &mw);
      q4_unpack(w + at, groups, &lo, &hi);
      for (int m = 0; m < mb; m++) {
        long v = (m0 + m) * qx->vecs + p;
        vf d = q_cvt(q4_dot(lo, hi, qx->q + v * 8 * W));
        acc[m][r] = vfma(mw, ld_f32(qx->t + v * W), vfma(d, vmul(sw, ld_f32(qx->s + v * W)), acc[m][r]));
      }
    }
  }
  for (int m = 0; m < mb; m++)
    for (int r = 0; r < rr; r++) store(y, y_bf16, (m0 + m) * N + n0 + r, hsum(acc[m][r]));
}
#endif

/* ---- llama.cpp's K-quants, read as GGUF files hold them (llama/weights/quantized.py):
 * each row of W is K / 256 super-blocks of 256 weights, BLOCK_BYTES(kind) bytes each,
 * with their scales inside, so there is no scales array.
 *   Q4K (144 bytes): fp16 d, fp16 dmin, 12 bytes of 6-bit scales sc[8] and mins m[8]
 *     (k_scales6), 128 bytes of nibbles: byte 32 p + i holds weight i of sub-block 2 p
 *     (low nibble) and of 2 p + 1 (high); W = d sc[j] q - dmin m[j] in sub-block j of 32.
 *   Q5K (176 bytes): as Q4K with 32 bytes between the scales and the nibbles whose
 *     bit j of byte i is bit 4 of weight i of sub-block j.
 *   Q6K (210 bytes): 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales (one
 *     per 16 weights), fp16 d; sub-block r of 32 takes the low (r / 2 even) or high
 *     nibbles of bytes 64 (r / 4) + 32 (r % 2) + i and bits 2 (r % 4) of byte 32 (r / 4)
 *     + i of the highs; W = d sc (q - 32).
 * x is quantized per group of 32 as for int8 weights (q_group: sx, xq), and
 *   y[n] = sum over groups of sx * (d sc (q . xq) - dmin m sum(xq))      (Q4K, Q5K)
 *   y[n] = sum over halves of 16 of sx * d sc (q' . xq - 32 sum(xq))      (Q6K, q' = q + 32)
 * with every q . xq exact in int32: the weights are unsigned (0..63), as the dot
 * product instructions take their first operand. On AVX-512 without BW (no byte
 * arithmetic) each block is widened to fp32 and meets x unquantized. */
static const int BLOCK_BYTES[] = {0, 0, 0, 0, 144, 176, 210};
#define QK 256

/* Q4K / Q5K's 12 bytes into 8 scales (sc) and 8 mins (m), a byte each: bytes 0-3
 * hold sc[0..3] in their low 6 bits and the top 2 bits of sc[4..7]; bytes 4-7 the
 * same for the mins; bytes 8-11 the low 4 bits of sc[4..7] (low nibble) and of
 * m[4..7] (high). Four at a time in 32-bit words. */
INLINE void k_scales6(const uint8_t *p, uint8_t sc[8], uint8_t m[8]) {
  uint32_t a, b, c, out[4];
  memcpy(&a, p, 4);
  memcpy(&b, p + 4, 4);
  memcpy(&c, p + 8, 4);
  out[0] = a & 0x3f3f3f3fu;
  out[1] = (c & 0x0f0f0f0fu) | ((a >> 2) & 0x30303030u);
  out[2] = b & 0x3f3f3f3fu;
  out[3] = ((c >> 4) & 0x0f0f0f0fu) | ((b >> 2) & 0x30303030u);
  memcpy(sc, out, 8);
  memcpy(m, out + 2, 8);
}

/* One super-block of weights in fp32, as gguf.quants' dequantizers compute them
 * (the same operations in fp32, in the same order: -ffp-contract=off). */
static void k_block_f32(enum kind kind, const uint8_t *blk, float *out) {
  if (kind == Q6K) {
    const uint8_t *ql = blk, *qh = blk + 128;
    const int8_t *sc = (const int8_t *)(blk + 192);
    uint16_t h;
    memcpy(&h, blk + 208, 2);
    float d = _cvtsh_ss(h);
    for (int r = 0; r < 8; r++)
      for (int i = 0; i < 32; i++) {
        int lo = (ql[64 * (r / 4) + 32 * (r % 2) + i] >> (4 * ((r / 2) % 2))) & 15;
        int hi = (qh[32 * (r / 4) + i] >> (2 * (r % 4))) & 3;
        float s = d * (float)sc[(32 * r + i) / 16];
        out[32 * r + i] = s * (float)((lo | hi << 4) - 32);
      }
    return;
  }
  uint16_t h[2];
  memcpy(h, blk, 4);
  float d = _cvtsh_ss(h[0]), dmin = _cvtsh_ss(h[1]);
  uint8_t sc[8], m[8];
  k_scales6(blk + 4, sc, m);
  const uint8_t *qh = blk + 16, *qs = blk + (kind == Q5K ? 48 : 16);
  for (int j = 0; j < 8; j++) {
    float a = d * (float)sc[j], b = dmin * (float)m[j];
    for (int i = 0; i < 32; i++) {
      int q = (qs[32 * (j / 2) + i] >> (4 * (j % 2))) & 15;
      if (kind == Q5K) q |= ((qh[i] >> j) & 1) << 4;
      out[32 * j + i] = a * (float)q - b;
    }
  }
}

/* Unsigned-by-signed byte dot products for the K-quants: KB bytes a vector, each
 * int32 lane the sum of 4 products plus the lane of acc. VNNI: vpdpbusd; else
 * vpmaddubsw into int16 pairs (at most 2 * 63 * 127: no saturation) and vpmaddwd. */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define KB 64
typedef __m512i ki;
INLINE ki k_zero(void) { return _mm512_setzero_si512(); }
INLINE ki k_ld(const void *p) { return _mm512_load_si512(p); }
INLINE ki k_dot(ki acc, ki u, const int8_t *q) {
#if defined(__AVX512VNNI__)
  return _mm512_dpbusd_epi32(acc, u, _mm512_load_si512(q));
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, _mm512_load_si512(q)), _mm512_set1_epi16(1)));
#endif
}
INLINE vf k_cvt(ki v) { return _mm512_cvtepi32_ps(v); }
#elif !defined(__AVX512F__)
#define KB 32
typedef __m256i ki;
INLINE ki k_zero(void) { return _mm256_setzero_si256(); }
INLINE ki k_ld(const void *p) { return _mm256_load_si256((const __m256i *)p); }
INLINE ki k_dot(ki acc, ki u, const int8_t *q) {
  __m256i pairs = _mm256_maddubs_epi16(u, _mm256_load_si256((const __m256i *)q));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
INLINE vf k_cvt(ki v) { return _mm256_cvtepi32_ps(v); }
#endif

#ifdef KB
#define KV (QK / KB) /* vectors per super-block */
/* Weights of vector v of a super-block (groups of 32 in order, KB / 32 of them) as
 * unsigned bytes: q (Q4K, Q5K) or q + 32 (Q6K). */
INLINE ki k_weights(enum kind kind, const uint8_t *blk, int v) {
#if KB == 64 /* groups 2 v and 2 v + 1 */
  __m512i nib = _mm512_set1_epi8(0x0f);
  if (kind == Q6K) {
    __m512i lo = _mm512_loadu_si512(blk + 64 * (v / 2)); /* sub-blocks 2 v, 2 v + 1: one nibble of 64 bytes */
    lo = _mm512_and_si512(v % 2 ? _mm512_srli_epi16(lo, 4) : lo, nib);
    __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * (v / 2))));
    __m512i shift = _mm512_inserti64x4(_mm512_set1_epi16((short)(4 * (v % 2))),
                                       _mm256_set1_epi16((short)(4 * (v % 2) + 2)), 1);
    __m512i hi = _mm512_and_si512(_mm512_srlv_epi16(qh, shift), _mm512_set1_epi8(3));
    return _mm512_or_si512(lo, _mm512_slli_epi16(hi, 4));
  }
  const uint8_t *qs = blk + (kind == Q5K ? 48 : 16) + 32 * v; /* low nibbles: group 2 v, high: 2 v + 1 */
  __m512i b = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)qs));
  __m512i u = _mm512_and_si512(_mm512_mask_srli_epi16(b, 0xffff0000u, b, 4), nib);
  if (kind == Q5K) {
    __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk + 16)));
    __m512i bit = _mm512_inserti64x4(_mm512_set1_epi8((char)(1 << (2 * v))), _mm256_set1_epi8((char)(1 << (2 * v + 1))), 1);
    u = _mm512_mask_add_epi8(u, _mm512_test_epi8_mask(qh, bit), u, _mm512_set1_epi8(16));
  }
  return u;
#else /* group v */
  __m256i nib = _mm256_set1_epi8(0x0f);
  if (kind == Q6K) {
    __m256i lo = _mm256_loadu_si256((const __m256i *)(blk + 64 * (v / 4) + 32 * (v % 2)));
    lo = _mm256_and_si256((v / 2) % 2 ? _mm256_srli_epi16(lo, 4) : lo, nib);
    __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * (v / 4)));
    __m256i hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * (v % 4))), _mm256_set1_epi8(3));
    return _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
  }
  __m256i b = _mm256_loadu_si256((const __m256i *)(blk + (kind == Q5K ? 48 : 16) + 32 * (v / 2)));
  __m256i u = _mm256_and_si256(v % 2 ? _mm256_srli_epi16(b, 4) : b, nib);
  if (kind == Q5K) {
    __m256i bit = _mm256_set1_epi8((char)(1 << v)), qh = _mm256_loadu_si256((const __m256i *)(blk + 16));
    u = _mm256_or_si256(u, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit), _mm256_set1_epi8(16)));
  }
  return u;
#endif
}

/* A super-block's scales in fp32: Q4K, Q5K: a = d sc[0..7] and b = -dmin m[0..7]
 * (lanes 0-7, zeros above); Q6K: d sc[0..15], in a (and b above 8 lanes). */
INLINE void k_block_scales(enum kind kind, const uint8_t *blk, vf *a, vf *b) {
  if (kind == Q6K) {
    uint16_t h;
    memcpy(&h, blk + 208, 2);
    __m128i sc = _mm_loadu_si128((const __m128i *)(blk + 192));
#if KB == 64
    *a = _mm512_mul_ps(_mm512_set1_ps(_cvtsh_ss(h)), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc)));
    *b = *a;
#else
    __m256 d = _mm256_set1_ps(_cvtsh_ss(h));
    *a = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)));
    *b = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8))));
#endif
    return;
  }
  uint16_t h[2];
  memcpy(h, blk, 4);
  uint8_t sc[8], m[8];
  k_scales6(blk + 4, sc, m);
  uint64_t scw, mw;
  memcpy(&scw, sc, 8);
  memcpy(&mw, m, 8);
  __m256 dsc = _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(h[0])), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)scw))));
  __m256 mn = _mm256_mul_ps(_mm256_set1_ps(-_cvtsh_ss(h[1])), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)mw))));
#if KB == 64
  *a = _mm512_zextps256_ps512(dsc);
  *b = _mm512_zextps256_ps512(mn);
#else
  *a = dsc;
  *b = mn;
#endif
}

/* The weights' scale of each lane of vector v's dot products (4 lanes per 16 weights). */
INLINE vf k_lane_scales(enum kind kind, vf a, vf b, int v) {
#if KB == 64
  if (kind == Q6K) /* sixteens 4 v .. 4 v + 3 */
    return _mm512_permutexvar_ps(_mm512_add_epi32(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                                  _mm512_set1_epi32(4 * v)), a);
  (void)b;
  return _mm512_permutexvar_ps(_mm512_add_epi32(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                                _mm512_set1_epi32(2 * v)), a);
#else
  if (kind == Q6K) /* sixteens 2 v, 2 v + 1 */
    return _mm256_permutevar8x32_ps(v < 4 ? a : b, _mm256_add_epi32(_mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1),
                                                                    _mm256_set1_epi32(2 * (v % 4))));
  (void)b;
  return _mm256_permutevar8x32_ps(a, _mm256_set1_epi32(v));
#endif
}
#endif

/* x quantized for tile_k, per row of K: q the xq in order (K bytes); per group g
 * of 32, over its 8 lanes s[8 g ..] = sx, and c[8 g] = -32 sum(xq[0..15]),
 * c[8 g + 4] = -32 sum(xq[16..31]) (Q6K's offset, the start of the dot
 * products), other lanes 0; per super-block, t[W b + j] = sx sum(xq) of its
 * group j, lanes 8 and up 0 (Q4K, Q5K's mins). */
struct kx {
  int8_t *q;
  float *s, *t;
  int32_t *c;
};

#ifdef KB
static int quantize_kx(const float *x, long M, long K, struct kx *kx) {
  long n = M * K, tn = M * (K / QK) * W;
  long size = (n + 4 * (n / 4) + 4 * (n / 4) + 4 * tn + 63) / 64 * 64;
  char *buf = aligned_alloc(64, size);
  if (!buf) return -1;
  memset(buf, 0, size);
  *kx = (struct kx){(int8_t *)buf, (float *)(buf + n), (float *)(buf + 3 * n), (int32_t *)(buf + 2 * n)};
  for (long m = 0; m < M; m++)
    for (long g = 0; g < K / 32; g++) {
      int8_t *q = kx->q + m * K + g * 32;
      int sum, half = 0;
      float sx = q_group(x + m * K + g * 32, q, &sum);
      for (int i = 0; i < 16; i++) half += q[i];
      long lane = m * (K / 4) + g * 8;
      for (int l = 0; l < 8; l++) kx->s[lane + l] = sx;
      kx->c[lane] = -32 * half;
      kx->c[lane + 4] = -32 * (sum - half);
      kx->t[m * (K / QK) * W + (g / 8) * W + g % 8] = sx * (float)sum;
    }
  return 0;
}
#endif

/* tile() for K-quant weights: per super-block and weight row, its scales once,
 * then each vector of KB weights against every row of x (see the section's
 * comment). Without KB, each super-block widened to fp32 (k_block_f32). */
INLINE void tile_k(enum kind kind, int mb, int rr, long m0, long n0, const float *x, const struct kx *kx,
                   const uint8_t *w, void *y, int y_bf16, long N, long K) {
  long blocks = K / QK, size = BLOCK_BYTES[kind], row = blocks * size;
  vf acc[MB][R];
  for (int m = 0; m < mb; m++)
    for (int r = 0; r < rr; r++) acc[m][r] = vzero();
  for (long b = 0; b < blocks; b++) {
    for (int r = 0; r < rr; r++) {
      const uint8_t *blk = w + (n0 + r) * row + b * size;
      for (long at = 0; at < size + 63; at += 64) /* the block's lines, PREFETCH_ROWS rows ahead */
        _mm_prefetch((const char *)(blk + PREFETCH_ROWS(kind) * row + (at < size ? at : size - 1)), _MM_HINT_T0);
#ifdef KB
      (void)x;
      vf sa, sb;
      k_block_scales(kind, blk, &sa, &sb);
      for (int v = 0; v < KV; v++) {
        ki u = k_weights(kind, blk, v);
        vf ws = k_lane_scales(kind, sa, sb, v);
        for (int m = 0; m < mb; m++) {
          long lane = (m0 + m) * (K / 4) + b * (QK / 4) + v * W;
          const int8_t *q = kx->q + (m0 + m) * K + b * QK + v * KB;
          vf d = k_cvt(k_dot(kind == Q6K ? k_ld(kx->c + lane) : k_zero(), u, q));
          acc[m][r] = vfma(d, vmul(ws, ld_f32(kx->s + lane)), acc[m][r]);
        }
      }
      if (kind != Q6K)
        for (int m = 0; m < mb; m++) acc[m][r] = vfma(sb, ld_f32(kx->t + ((m0 + m) * blocks + b) * W), acc[m][r]);
#else
      (void)kx;
      float wf[QK];
      k_block_f32(kind, blk, wf);
      for (int m = 0; m < mb; m++)
        for (int i = 0; i < QK; i += W)
          acc[m][r] = vfma(ld_f32(x + (m0 + m) * K + b * QK + i), ld_f32(wf + i), acc[m][r]);
#endif
    }
  }
  for (int m = 0; m < mb; m++)
    for (int r = 0; r < rr; r++) store(y, y_bf16, (m0 + m) * N + n0 + r, hsum(acc[m][r]));
}

INLINE void run_tile(enum kind kind, int mb, int rr, long m0, long n0, const float *x, const struct qx *qx,
                     const struct kx *kx, const void *w, const float *s, void *y, int y_bf16, long N, long K) {
  if (IS_K(kind)) {
    tile_k(kind, mb, rr, m0, n0, x, kx, w, y, y_bf16, N, K);
    return;
  }
  (void)kx;
#ifdef QB
  if (kind == Q8) {
    tile_q8(mb, rr, m0, n0, qx, w, s, y, y_bf16, N, K);
    return;
  }
  if (kind == Q4) {
    tile_q4(mb, rr, m0, n0, qx, w, s, y, y_bf16, N, K);
    return;
  }
#endif
  (void)qx;
  tile(kind, mb, rr, m0, n0, x, w, s, y, y_bf16, N, K);
}

/* y = x @ W^T over tiles of R weight rows split among threads, MB rows of x at a
 * time. Full tiles run at constant sizes, so that the accumulators live in
 * registers; the last, partial tile one row at a time. Returns 0, or -1 if
 * there was no memory to widen a bf16 x. */
INLINE int linear(enum kind kind, const void *x, int x_bf16, const void *w, const float *s, void *y, long M, long N,
                  long K, int threads) {
  float *owned;
  const float *xf = x_as_f32(x, x_bf16, M * K, &owned);
  if (!xf) return -1;
  struct qx qx = {0};
  struct kx kx = {0};
#ifdef KB
  if (IS_K(kind) && quantize_kx(xf, M, K, &kx)) {
    free(owned);
    return -1;
  }
#endif
#ifdef QB
  if ((kind == Q8 && quantize_x(xf, M, K, &qx)) || (kind == Q4 && q4_x(xf, M, K, &qx))) {
    free(owned);
    return -1;
  }
#endif
  long tiles = (N + R - 1) / R;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long t = 0; t < tiles; t++) {
    long n0 = t * R;
    for (long m0 = 0; m0 < M; m0 += MB) {
      int mb = M - m0 < MB ? (int)(M - m0) : MB;
      if (N - n0 < R) {
        for (long r = 0; r < N - n0; r++)
          for (long m = 0; m < mb; m++) run_tile(kind, 1, 1, m0 + m, n0 + r, xf, &qx, &kx, w, s, y, x_bf16, N, K);
      } else if (mb == 1) {
        run_tile(kind, 1, R, m0, n0, xf, &qx, &kx, w, s, y, x_bf16, N, K);
      } else if (mb == 2) {
        run_tile(kind, 2, R, m0, n0, xf, &qx, &kx, w, s, y, x_bf16, N, K);
      } else if (mb == 3) {
        run_tile(kind, 3, R, m0, n0, xf, &qx, &kx, w, s, y, x_bf16, N, K);
      } else {
        run_tile(kind, MB, R, m0, n0, xf, &qx, &kx, w, s, y, x_bf16, N, K);
      }
    }
  }
  free(owned);
  free(qx.q);
  free(kx.q);
  return 0;
}

int f32_linear(const void *x, int x_bf16, const float *w, void *y, long M, long N, long K, int threads) {
  return linear(F32, x, x_bf16, w, NULL, y, M, N, K, threads);
}

int bf16_linear(const void *x, int x_bf16, const uint16_t *w, void *y, long M, long N, long K, int threads) {
  return linear(BF16, x, x_bf16, w, NULL, y, M, N, K, threads);
}

int q8_linear(const void *x, int x_bf16, const int8_t *w, const float *scales, void *y, long M, long N, long K,
              int threads) {
  return linear(Q8, x, x_bf16, w, scales, y, M, N, K, threads);
}

int q4_linear(const void *x, int x_bf16, const uint8_t *w, const float *scales, void *y, long M, long N, long K,
              int threads) {
  return linear(Q4, x, x_bf16, w, scales, y, M, N, K, threads);
}

/* y = x @ W^T for K-quant weights (kind Q4K, Q5K or Q6K: the section above), K a multiple of 256. */
int k_linear(int kind, const void *x, int x_bf16, const uint8_t *w, void *y, long M, long N, long K, int threads) {
  if (kind == Q4K) return linear(Q4K, x, x_bf16, w, NULL, y, M, N, K, threads);
  if (kind == Q5K) return linear(Q5K, x, x_bf16, w, NULL, y, M, N, K, threads);
  return linear(Q6K, x, x_bf16, w, NULL, y, M, N, K, threads);
}

int llama_kernels_kquant_int8_dot(void) { /* 1: K-quant weights meet int8 x (tile_k), 0: widened to fp32 */
#ifdef KB
  return 1;
#else
  return 0;
#endif
}

/* W of int8, int4 or K-quant weights (kind Q8, Q4, Q4K, Q5K or Q6K, layouts above) into out (N, K),
 * fp32 or bf16 (out_bf16: each value computed in fp32, then rounded), for
 * PyTorch's GEMM in prefill: one pass, where PyTorch's operators took five. */
void dequantize(int kind, const void *w, const void *scales, void *out, long N, long K, int out_bf16, int threads) {
  long G = K / 32;
  if (IS_K(kind)) { /* scales NULL: inside the blocks */
    long blocks = K / QK, size = BLOCK_BYTES[kind];
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long n = 0; n < N; n++)
      for (long b = 0; b < blocks; b++) {
        float f[QK];
        k_block_f32((enum kind)kind, (const uint8_t *)w + (n * blocks + b) * size, f);
        for (int i = 0; i < QK; i++) store(out, out_bf16, n * K + b * QK + i, f[i]);
      }
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long n = 0; n < N; n++)
    for (long g = 0; g < G; g++) {
      long at = n * K + g * 32;
      if (kind == Q8) {
        float s = ((const float *)scales)[n * G + g];
        const int8_t *q = (const int8_t *)w + at;
        for (int j = 0; j < 32; j++) store(out, out_bf16, at + j, (float)q[j] * s);
      } else {
        const uint16_t *sm = (const uint16_t *)scales + 2 * (n * G + g);
        float s = _cvtsh_ss(sm[0]), m = _cvtsh_ss(sm[1]);
        const uint8_t *b = (const uint8_t *)w + at / 2;
        for (int j = 0; j < 16; j++) {
          store(out, out_bf16, at + j, (float)(b[j] & 15) * s + m);
          store(out, out_bf16, at + 16 + j, (float)(b[j] >> 4) * s + m);
        }
      }
    }
}

/* ---- The rest of a decoding step: fused so that each is one call, not ten.
 * Each rounds where PyTorch's eager code rounds (to bf16 after each operation
 * a bf16 model does in bf16), so results match it to fp32 summation order. */

#define MAX_HEAD_DIM 256 /* native.MAX_HEAD_DIM */

static inline float rnd(int bf16, float v) { return bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }
static inline float ld1(int bf16, const void *p, long i) {
  return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* RMSNorm (model.RMSNorm): y = dtype(x * rsqrt(mean(x^2) + eps)) * w, per row of dim values. */
void rms_norm(const void *x, const void *w, void *y, long rows, long dim, float eps, int bf16, int threads) {
#pragma omp parallel for num_threads(rows > 1 ? threads : 1) schedule(static)
  for (long r = 0; r < rows; r++) {
    float ss = 0;
    for (long i = 0; i < dim; i++) {
      float v = ld1(bf16, x, r * dim + i);
      ss += v * v;
    }
    float inv = 1.0f / sqrtf(ss / dim + eps);
    for (long i = 0; i < dim; i++)
      store(y, bf16, r * dim + i, rnd(bf16, ld1(bf16, x, r * dim + i) * inv) * ld1(bf16, w, i));
  }
}

/* FeedForward's silu(gate) * up, for rows of (gate | up), each `hidden` wide. */
void silu_mul(const void *gu, void *y, long rows, long hidden, int bf16, int threads) {
#pragma omp parallel for num_threads(rows * hidden > 65536 ? threads : 1) schedule(static)
  for (long r = 0; r < rows; r++)
    for (long i = 0; i < hidden; i++) {
      float g = ld1(bf16, gu, r * 2 * hidden + i);
      store(y, bf16, r * hidden + i, rnd(bf16, g / (1.0f + expf(-g))) * ld1(bf16, gu, r * 2 * hidden + hidden + i));
    }
}

/* Attention for one new token per row (model.Attention, decoding): rotates q
 * and k (RoPE, Meta's interleaved pairs), writes k and v to the cache at the
 * row's position, and attends to cache positions 0..pos[b] of row b.
 *   qkv:  (bsz, n_q + 2 n_kv, hd)  q heads, then k, then v
 *   cache_k, cache_v: (cache_rows, n_kv, max_seq, hd)
 *   cos, sin: (1 or bsz, hd) the rope table's (cos, cos) and (-sin, sin) at the row's position
 *   out: (bsz, n_q, hd); hd a multiple of 16 (of W), at most MAX_HEAD_DIM
 * Returns 0, or -1 without memory for the scores. */
int decode_attention(const void *qkv, void *cache_k, void *cache_v, const float *cos, const float *sin, int per_row,
                     const int64_t *pos, void *out, long bsz, long n_q, long n_kv, long hd, long max_seq, int bf16,
                     int threads) {
  long heads = n_q + 2 * n_kv, rep = n_q / n_kv;
  float scale = (float)(1.0 / sqrt((double)hd)); /* as Python's hd**-0.5 times a tensor */
  /* k and v into the cache first: every query head of a KV group reads them. */
  for (long b = 0; b < bsz; b++) {
    const float *c = cos + (per_row ? b * hd : 0), *s = sin + (per_row ? b * hd : 0);
    for (long g = 0; g < n_kv; g++) {
      long src = (b * heads + n_q + g) * hd, vsrc = (b * heads + n_q + n_kv + g) * hd;
      long dst = ((b * n_kv + g) * max_seq + pos[b]) * hd;
      for (long i = 0; i < hd; i += 2) {
        float x0 = ld1(bf16, qkv, src + i), x1 = ld1(bf16, qkv, src + i + 1);
        store(cache_k, bf16, dst + i, x0 * c[i] + x1 * s[i]);
        store(cache_k, bf16, dst + i + 1, x1 * c[i + 1] + x0 * s[i + 1]);
      }
      if (bf16) memcpy((uint16_t *)cache_v + dst, (const uint16_t *)qkv + vsrc, hd * 2);
      else memcpy((float *)cache_v + dst, (const float *)qkv + vsrc, hd * 4);
    }
  }
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
    long most = 0;
    for (long b = 0; b < bsz; b++) most = pos[b] + 1 > most ? pos[b] + 1 : most;
    float *scores = malloc(sizeof(float) * (most + hd) + 64), *q = scores + most;
    if (!scores) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (long t = 0; t < bsz * n_q; t++) {
      if (!scores) continue;
      long b = t / n_q, h = t % n_q, g = h / rep, len = pos[b] + 1;
      const float *c = cos + (per_row ? b * hd : 0), *s = sin + (per_row ? b * hd : 0);
      long src = (b * heads + h) * hd;
      for (long i = 0; i < hd; i += 2) {
        float x0 = ld1(bf16, qkv, src + i), x1 = ld1(bf16, qkv, src + i + 1);
        q[i] = rnd(bf16, x0 * c[i] + x1 * s[i]);
        q[i + 1] = rnd(bf16, x1 * c[i + 1] + x0 * s[i + 1]);
      }
      long base = (b * n_kv + g) * max_seq * hd;
      float top = -INFINITY;
      for (long j = 0; j < len; j++) {
        vf acc = vzero();
        for (long i = 0; i < hd; i += W)
          acc = vfma(ld_f32(q + i), bf16 ? ld_bf16((const uint16_t *)cache_k + base + j * hd + i)
                                        : ld_f32((const float *)cache_k + base + j * hd + i), acc);
        float v = rnd(bf16, rnd(bf16, hsum(acc)) * scale);
        scores[j] = v;
        top = v > top ? v : top;
      }
      float total = 0;
      for (long j = 0; j < len; j++) total += scores[j] = expf(scores[j] - top);
      for (long j = 0; j < len; j++) scores[j] = rnd(bf16, scores[j] / total);
      vf o[MAX_HEAD_DIM / W];
      for (long i = 0; i < hd / W; i++) o[i] = vzero();
      for (long j = 0; j < len; j++) {
        vf p = vset1(scores[j]);
        for (long i = 0; i < hd / W; i++)
          o[i] = vfma(p, bf16 ? ld_bf16((const uint16_t *)cache_v + base + j * hd + i * W)
                              : ld_f32((const float *)cache_v + base + j * hd + i * W), o[i]);
      }
      float tmp[W];
      for (long i = 0; i < hd / W; i++) {
        memcpy(tmp, &o[i], sizeof tmp);
        for (int l = 0; l < W; l++) store(out, bf16, (b * n_q + h) * hd + i * W + l, tmp[l]);
      }
    }
    free(scores);
  }
  return failed ? -1 : 0;
}

/* Part of a linear layer's weight: `rows` consecutive output rows of one kind: F32, BF16, Q8 or Q4
 * (then with scales), or a K-quant (Q4K, Q5K, Q6K: scales NULL). */
struct part {
  int kind;
  const void *w;
  const float *scales;
  long rows;
};

/* A linear layer's weight as decode_layers takes it: one part (part[1].rows 0; part[0].rows may be
 * 0 too, for all N), or up to MAX_PARTS parts whose rows make N, in order (a GGUF Q4_K_M file's
 * wq | wk in Q4_K with wv in Q6_K, fused into one wqkv). */
#define MAX_PARTS 3 /* native.MAX_PARTS */
struct weight {
  struct part part[MAX_PARTS];
};

/* y = x @ W^T by the matmuls above, for a part whose kind is known at run time. */
static int part_linear(const struct part *wt, const void *x, int x_bf16, void *y, long M, long N, long K,
                       int threads) {
  if (wt->kind == F32) return linear(F32, x, x_bf16, wt->w, NULL, y, M, N, K, threads);
  if (wt->kind == BF16) return linear(BF16, x, x_bf16, wt->w, NULL, y, M, N, K, threads);
  if (wt->kind == Q8) return linear(Q8, x, x_bf16, wt->w, wt->scales, y, M, N, K, threads);
  if (wt->kind == Q4) return linear(Q4, x, x_bf16, wt->w, wt->scales, y, M, N, K, threads);
  return k_linear(wt->kind, x, x_bf16, wt->w, y, M, N, K, threads);
}

/* y (M, N) = x @ W^T for a weight of one or more parts: each part's columns of y in turn,
 * through a buffer of its own (M is a few rows: the copies cost little). Returns 0, or -1
 * without memory or if the parts' rows do not make N. */
int weight_linear(const struct weight *wt, const void *x, int x_bf16, void *y, long M, long N, long K, int threads) {
  if (wt->part[1].rows == 0) return part_linear(&wt->part[0], x, x_bf16, y, M, N, K, threads);
  long esize = x_bf16 ? 2 : 4, at = 0;
  char *tmp = malloc(esize * M * N);
  int err = !tmp;
  for (int i = 0; i < MAX_PARTS && wt->part[i].rows && !err; i++) {
    long rows = wt->part[i].rows;
    if (at + rows > N) {
      err = 1;
      break;
    }
    err |= part_linear(&wt->part[i], x, x_bf16, tmp, M, rows, K, threads);
    for (long m = 0; m < M && !err; m++) memcpy((char *)y + esize * (m * N + at), tmp + esize * m * rows, esize * rows);
    at += rows;
  }
  free(tmp);
  return err || at != N ? -1 : 0;
}

static void add_into(void *h, const void *d, long n, int bf16) { /* h += d, rounded as PyTorch's add */
  for (long i = 0; i < n; i++) store(h, bf16, i, ld1(bf16, h, i) + ld1(bf16, d, i));
}

/* A transformer block's weights and KV cache, as decode_layers takes them. */
struct block {
  const void *attention_norm, *ffn_norm;
  struct weight wqkv, wo, w13, w2;
  void *cache_k, *cache_v;
};

/* The shapes of a decoding step, shared by every block of one call. */
struct step {
  float eps;
  const float *cos, *sin;
  int per_row;
  const int64_t *pos;
  long M, dim, n_q, n_kv, hd, hidden, max_seq;
  int bf16, threads;
};

/* Scratch for one block's decoding step: normed, qkv, att, gate_up, act. */
static char *scratch(const struct step *st) {
  long n_qkv = (st->n_q + 2 * st->n_kv) * st->hd;
  return malloc((st->bf16 ? 2 : 4) * st->M * (st->dim + n_qkv + st->n_q * st->hd + 3 * st->hidden));
}

/* Half of block b's decoding step, from h into delta (M, dim), whose sum
 * over the model-parallel ranks (delta itself in one process) is added to h:
 *   half 0: delta = wo(attention(rope(wqkv(norm(h)))))
 *   half 1: delta = w2(silu(w13(norm(h)))) */
static int block_half(const void *h, const struct block *b, int half, void *delta, char *buf, const struct step *st) {
  long esize = st->bf16 ? 2 : 4, M = st->M, n_qkv = (st->n_q + 2 * st->n_kv) * st->hd;
  char *normed = buf, *qkv = normed + esize * M * st->dim, *att = qkv + esize * M * n_qkv;
  char *gate_up = att + esize * M * st->n_q * st->hd, *act = gate_up + esize * M * 2 * st->hidden;
  int err = 0;
  if (half == 0) {
    rms_norm(h, b->attention_norm, normed, M, st->dim, st->eps, st->bf16, st->threads);
    err |= weight_linear(&b->wqkv, normed, st->bf16, qkv, M, n_qkv, st->dim, st->threads);
    err |= decode_attention(qkv, b->cache_k, b->cache_v, st->cos, st->sin, st->per_row, st->pos, att, M, st->n_q,
                            st->n_kv, st->hd, st->max_seq, st->bf16, st->threads);
    err |= weight_linear(&b->wo, att, st->bf16, delta, M, st->dim, st->n_q * st->hd, st->threads);
  } else {
    rms_norm(h, b->ffn_norm, normed, M, st->dim, st->eps, st->bf16, st->threads);
    err |= weight_linear(&b->w13, normed, st->bf16, gate_up, M, 2 * st->hidden, st->dim, st->threads);
    silu_mul(gate_up, act, M, st->hidden, st->bf16, st->threads);
    err |= weight_linear(&b->w2, act, st->bf16, delta, M, st->dim, st->hidden, st->threads);
  }
  return err;
}

/* Transformer blocks' decoding steps (model.TransformerBlock, one token a row,
 * one process: no collective between the matmuls), in place on h (M, dim),
 * each block:
 *   h += wo(attention(rope(wqkv(norm(h)))));  h += w2(silu(w13(norm(h))))
 * with the kernels above, so that Python makes one call per token, not
 * fifteen per block. Returns 0, or -1 without memory. */
int decode_layers(void *h, const struct block *blocks, long n_layers, float eps, const float *cos, const float *sin,
                  int per_row, const int64_t *pos, long M, long dim, long n_q, long n_kv, long hd, long hidden,
                  long max_seq, int bf16, int threads) {
  struct step st = {eps, cos, sin, per_row, pos, M, dim, n_q, n_kv, hd, hidden, max_seq, bf16, threads};
  char *buf = scratch(&st), *delta = malloc((bf16 ? 2 : 4) * M * dim);
  int err = !buf || !delta;
  for (long l = 0; l < n_layers && !err; l++)
    for (int half = 0; half < 2 && !err; half++) {
      err |= block_half(h, blocks + l, half, delta, buf, &st);
      add_into(h, delta, M * dim, bf16);
    }
  free(buf);
  free(delta);
  return err ? -1 : 0;
}

/* decode_layers' step under tensor parallelism, half a block a call: the
 * caller sums each delta over the ranks in between. First h += sum (the
 * previous half's sum, unless sum is NULL), then half `half` of block b (if
 * b is not NULL) into delta, this rank's part. Returns 0, or -1 without memory. */
int decode_half(void *h, const void *sum, const struct block *b, int half, void *delta, float eps, const float *cos,
                const float *sin, int per_row, const int64_t *pos, long M, long dim, long n_q, long n_kv, long hd,
                long hidden, long max_seq, int bf16, int threads) {
  struct step st = {eps, cos, sin, per_row, pos, M, dim, n_q, n_kv, hd, hidden, max_seq, bf16, threads};
  if (sum) add_into(h, sum, M * dim, bf16);
  if (!b) return 0;
  char *buf = scratch(&st);
  int err = !buf || block_half(h, b, half, delta, buf, &st);
  free(buf);
  return err ? -1 : 0;
}
