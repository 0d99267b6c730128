// Decode attention straight over the paged KV cache, on the CPU.
//
// One query token per item (a sequence's head group): its q_per_group query rows
// attend to the item's cached keys/values, read in place through its block table.
// No gather, no padding, no mask: each item stops at its own context length, and
// every K and V row is read once from memory for all of the group's query rows.
//
// Built and loaded by hetis/model/cpu_kernels.py (g++ -O3 -march=native -fopenmp,
// cached per source, flags and CPU); called through ctypes with raw pointers of
// contiguous tensors. float32 accumulation throughout, as PyTorch's CPU
// scaled_dot_product_attention does for bfloat16.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "bf16.h"

using hetis::load;
using hetis::store;

namespace {

// item i's n output values set to zero
template <typename T>
inline void zero_rows(T* out, int64_t i, int64_t n) {
    std::memset(out + i * n, 0, n * sizeof(T));
}

// Each of ``rows`` score rows (``stride`` apart) turned into exp(s - max) over its first
// ``len`` entries, float32; their sums to ``sum``.
inline void softmax_rows(float* s, int64_t rows, int64_t stride, int64_t len, float* sum) {
    for (int64_t r = 0; r < rows; ++r) {
        float* sr = s + r * stride;
        float m = sr[0];
        for (int64_t t = 1; t < len; ++t) m = std::max(m, sr[t]);
        float z = 0.f;
#pragma omp simd reduction(+ : z)
        for (int64_t t = 0; t < len; ++t) {
            sr[t] = std::exp(sr[t] - m);
            z += sr[t];
        }
        sum[r] = z;
    }
}

// The generic loop. C: the cache's element type (float, bf16 as uint16_t, or int8_t with
// per-row float32 scales ks, vs); T: q's and the output's. D: the head dimension when known
// at compile time (64, 128), else 0 (runtime ``d``). Without scales (ks == nullptr) the
// scale multiplies q first; with them, each score (scale * ks[t]) and each value row's
// weight (vs[t]), so a row is widened once and its scale applied once.
template <typename C, typename T, int D>
void decode(const C* kc, const C* vc, const float* ks, const float* vs, const T* q,
            const int64_t* tables, int64_t table_stride, const int64_t* ctx, T* out, int64_t n,
            int64_t h, int64_t d_rt, int64_t bs, float scale, int threads) {
    const int64_t d = D ? D : d_rt;
    const float qscale = ks ? 1.f : scale;
#pragma omp parallel num_threads(threads) if (n > 1 && threads > 1)
    {
        std::vector<float> qf(h * d), acc(h * d), sum(h), row(d), s;
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n; ++i) {
            const int64_t len = ctx[i];
            if (len <= 0) {   // nothing to attend: zeros, not NaNs (the engine never sends it)
                zero_rows(out, i, h * d);
                continue;
            }
            const int64_t* table = tables + i * table_stride;
            s.resize(h * len);
            for (int64_t j = 0; j < h * d; ++j) qf[j] = load(q + i * h * d, j) * qscale;
            float* kf = row.data();
            // scores: every key row read and widened once, for all h query rows
            for (int64_t t = 0; t < len; ++t) {
                const int64_t slot = table[t / bs] * bs + t % bs;
                const C* kr = kc + slot * d;
#pragma omp simd
                for (int64_t j = 0; j < d; ++j) kf[j] = load(kr, j);
                for (int64_t r = 0; r < h; ++r) {
                    const float* qr = qf.data() + r * d;
                    float a = 0.f;
#pragma omp simd reduction(+ : a)
                    for (int64_t j = 0; j < d; ++j) a += qr[j] * kf[j];
                    s[r * len + t] = ks ? a * (scale * ks[slot]) : a;
                }
            }
            softmax_rows(s.data(), h, len, len, sum.data());
            std::fill(acc.begin(), acc.end(), 0.f);
            // weighted values: every value row read and widened once, for all h rows
            for (int64_t t = 0; t < len; ++t) {
                const int64_t slot = table[t / bs] * bs + t % bs;
                const C* vr = vc + slot * d;
#pragma omp simd
                for (int64_t j = 0; j < d; ++j) kf[j] = load(vr, j);
                for (int64_t r = 0; r < h; ++r) {
                    const float p = vs ? s[r * len + t] * vs[slot] : s[r * len + t];
                    float* ar = acc.data() + r * d;
#pragma omp simd
                    for (int64_t j = 0; j < d; ++j) ar[j] += p * kf[j];
                }
            }
            for (int64_t r = 0; r < h; ++r) {
                const float inv = 1.f / sum[r];
                for (int64_t j = 0; j < d; ++j) store(out + i * h * d, r * d + j, acc[r * d + j] * inv);
            }
        }
    }
}

#if defined(__AVX512F__)
// lane t of the result: the sum of a[t]'s 16 lanes
inline __m512 sum16(__m512* a) {
    __m512 b[8], c[4], d[2];
    for (int t = 0; t < 8; ++t)   // lanes 0-7: a[2t]'s halves added, 8-15: a[2t+1]'s
        b[t] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * t], a[2 * t + 1], 0x44),
                             _mm512_shuffle_f32x4(a[2 * t], a[2 * t + 1], 0xEE));
    for (int t = 0; t < 4; ++t)   // 128-bit lane l: one key's 4 partial sums
        c[t] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * t], b[2 * t + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(b[2 * t], b[2 * t + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int t = 0; t < 2; ++t)   // two partial sums each
        d[t] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * t], c[2 * t + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(c[2 * t], c[2 * t + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
    // e's lane l holds key (l % 4) * 4 + l / 4 (a 4 x 4 transpose, its own inverse)
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), e);
}

// The weighted values of one item for H query rows, accumulated in registers for all of
// them and written to dst ([H, D], T) divided by each row's sum: values(t, vf) widens value
// row t into vf (D / 16 float32 vectors, prefetching ahead as it likes) and returns the
// row's weight (1, or an int8 row's scale). Shared by the bf16 and the int8 loops.
template <int D, int H, typename T, typename Values>
inline void weigh_values(const float* s, int64_t stride, int64_t len, const float* sum, Values values,
                         T* dst) {
    constexpr int NF = D / 16;
    __m512 acc[H][NF];
    for (int r = 0; r < H; ++r)
        for (int f = 0; f < NF; ++f) acc[r][f] = _mm512_setzero_ps();
    for (int64_t t = 0; t < len; ++t) {
        __m512 vf[NF];
        const float w = values(t, vf);
        for (int r = 0; r < H; ++r) {
            const __m512 p = _mm512_set1_ps(s[r * stride + t] * w);
            for (int f = 0; f < NF; ++f) acc[r][f] = _mm512_fmadd_ps(p, vf[f], acc[r][f]);
        }
    }
    for (int r = 0; r < H; ++r) {
        const float inv = 1.f / sum[r];
        alignas(64) float o[D];
        for (int f = 0; f < NF; ++f) _mm512_store_ps(o + f * 16, acc[r][f]);
        for (int j = 0; j < D; ++j) store(dst + r * D, j, o[j] * inv);
    }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BF16__)
// bfloat16 on AVX-512 BF16 (D = 64, 128; H query rows per group): the scores by
// vdpbf16ps straight from the cached bf16 keys (products exact in float32, float32
// sums; no widening of K), 16 keys at a time with their 16 horizontal sums done as one
// transpose-add tree; the value rows widened once and accumulated in registers for all
// H rows. The scale multiplies the scores (the generic loop scales q first: the same to
// float32 rounding).

// rows prefetched this many tokens ahead (the scores of 16 keys take less than one DRAM
// miss; 32 measured 20-25 % faster than 16 on a 30-layer cache that does not fit in L3)
constexpr int PF16 = 32;
template <int D>
inline void prefetch_row(const uint16_t* row) {
    for (int b = 0; b < D * 2; b += 64) _mm_prefetch(reinterpret_cast<const char*>(row) + b, _MM_HINT_T0);
}

template <int D, int H>
void decode_bf16(const uint16_t* kc, const uint16_t* vc, const uint16_t* q, const int64_t* tables,
                 int64_t table_stride, const int64_t* ctx, uint16_t* out, int64_t n, int64_t bs,
                 float scale, int threads) {
    constexpr int NB = D / 32;   // bf16 vectors of a row
    constexpr int NF = D / 16;   // float32 vectors of a row
#pragma omp parallel num_threads(threads) if (n > 1 && threads > 1)
    {
        std::vector<float> s;
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n; ++i) {
            const int64_t len = ctx[i];
            if (len <= 0) {   // nothing to attend: zeros, not NaNs (the engine never sends it)
                zero_rows(out, i, H * D);
                continue;
            }
            const int64_t* table = tables + i * table_stride;
            const int64_t stride = (len + 15) & ~int64_t{15};
            s.resize(H * stride);
            __m512bh qv[H][NB];
            for (int r = 0; r < H; ++r)
                for (int b = 0; b < NB; ++b)
                    qv[r][b] = (__m512bh)_mm512_loadu_si512(q + (i * H + r) * D + b * 32);
            const __m512 sc = _mm512_set1_ps(scale);
            for (int64_t t0 = 0; t0 < len; t0 += 16) {
                const uint16_t* rows[16];
                const int64_t m = std::min<int64_t>(16, len - t0);
                for (int64_t t = 0; t < 16; ++t) {
                    const int64_t tt = t0 + std::min(t, m - 1);   // past the end: a row again, unused
                    rows[t] = kc + (table[tt / bs] * bs + tt % bs) * D;
                }
                // the next 16 keys' rows (another block, somewhere else) and this chunk's values
                for (int64_t t = t0 + PF16; t < std::min(t0 + PF16 + 16, 2 * len); ++t) {
                    const int64_t u = t < len ? t : t - len;
                    prefetch_row<D>((t < len ? kc : vc) + (table[u / bs] * bs + u % bs) * D);
                }
                for (int r = 0; r < H; ++r) {
                    __m512 a[16];
                    for (int t = 0; t < 16; ++t) {
                        __m512 acc = _mm512_setzero_ps();
                        for (int b = 0; b < NB; ++b)
                            acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(rows[t] + b * 32), qv[r][b]);
                        a[t] = acc;
                    }
                    _mm512_storeu_ps(s.data() + r * stride + t0, _mm512_mul_ps(sum16(a), sc));
                }
            }
            float sum[H];
            softmax_rows(s.data(), H, stride, len, sum);
            weigh_values<D, H>(s.data(), stride, len, sum, [&](int64_t t, __m512* vf) {
                const uint16_t* vr = vc + (table[t / bs] * bs + t % bs) * D;
                if (t + PF16 < len) prefetch_row<D>(vc + (table[(t + PF16) / bs] * bs + (t + PF16) % bs) * D);
                for (int f = 0; f < NF; ++f)
                    vf[f] = _mm512_castsi512_ps(_mm512_slli_epi32(
                        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(vr + f * 16))), 16));
                return 1.f;
            }, out + i * H * D);
        }
    }
}

template <int D>
bool decode_bf16_h(const uint16_t* kc, const uint16_t* vc, const uint16_t* q, const int64_t* tables,
                   int64_t ts, const int64_t* ctx, uint16_t* out, int64_t n, int64_t h, int64_t bs,
                   float scale, int threads) {
    switch (h) {
        case 1: decode_bf16<D, 1>(kc, vc, q, tables, ts, ctx, out, n, bs, scale, threads); return true;
        case 2: decode_bf16<D, 2>(kc, vc, q, tables, ts, ctx, out, n, bs, scale, threads); return true;
        case 3: decode_bf16<D, 3>(kc, vc, q, tables, ts, ctx, out, n, bs, scale, threads); return true;
        case 4: decode_bf16<D, 4>(kc, vc, q, tables, ts, ctx, out, n, bs, scale, threads); return true;
        case 8: decode_bf16<D, 8>(kc, vc, q, tables, ts, ctx, out, n, bs, scale, threads); return true;
        default: return false;
    }
}

bool decode_fast(const uint16_t* kc, const uint16_t* vc, const uint16_t* q, const int64_t* tables,
                 int64_t ts, const int64_t* ctx, uint16_t* out, int64_t n, int64_t h, int64_t d,
                 int64_t bs, float scale, int threads) {
    if (d == 64) return decode_bf16_h<64>(kc, vc, q, tables, ts, ctx, out, n, h, bs, scale, threads);
    if (d == 128) return decode_bf16_h<128>(kc, vc, q, tables, ts, ctx, out, n, h, bs, scale, threads);
    return false;
}
#else
bool decode_fast(const uint16_t*, const uint16_t*, const uint16_t*, const int64_t*, int64_t,
                 const int64_t*, uint16_t*, int64_t, int64_t, int64_t, int64_t, float, int) {
    return false;
}
#endif

template <typename T>
void decode_any(const T* kc, const T* vc, const T* q, const int64_t* tables, int64_t ts,
                const int64_t* ctx, T* out, int64_t n, int64_t h, int64_t d, int64_t bs, float scale,
                int threads) {
    if (d == 64)
        decode<T, T, 64>(kc, vc, nullptr, nullptr, q, tables, ts, ctx, out, n, h, d, bs, scale, threads);
    else if (d == 128)
        decode<T, T, 128>(kc, vc, nullptr, nullptr, q, tables, ts, ctx, out, n, h, d, bs, scale, threads);
    else
        decode<T, T, 0>(kc, vc, nullptr, nullptr, q, tables, ts, ctx, out, n, h, d, bs, scale, threads);
}

// 8-bit cache (kv_store.py's int8 layout): key and value rows int8, each with its float32
// scale (ks, vs: [blocks * bs]); the generic loop is `decode` above with C = int8_t.

#if defined(__AVX512F__)
// the same on AVX-512 (D = 64, 128; H query rows): 16 keys at a time widened into a
// float32 tile in L1, their H x 16 dot products by FMAs with one transpose-add tree per
// query row (sum16); the value rows widened in registers and
// accumulated for all H rows.
// a row and its scale, PF tokens ahead: at DRAM latency (about 100 ns) the 16 keys
// being scored take less time than one miss, so the rows wanted next must be on their way
// (64 measured best of 16-128: 1.6x faster than 16)
constexpr int PF = 64;
template <int D>
inline void prefetch_q8(const int8_t* base, const float* scales, int64_t slot) {
    for (int b = 0; b < D; b += 64) _mm_prefetch(reinterpret_cast<const char*>(base + slot * D) + b, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(scales + slot), _MM_HINT_T0);
}

inline __m512 widen16(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

template <typename T, int D, int H>
void decode_q8_avx512(const int8_t* kc, const int8_t* vc, const float* ks, const float* vs, const T* q,
                      const int64_t* tables, int64_t table_stride, const int64_t* ctx, T* out, int64_t n,
                      int64_t bs, float scale, int threads) {
    constexpr int NF = D / 16;
#pragma omp parallel num_threads(threads) if (n > 1 && threads > 1)
    {
        std::vector<float> s;
        alignas(64) float tile[16 * D];
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n; ++i) {
            const int64_t len = ctx[i];
            if (len <= 0) {   // nothing to attend: zeros, not NaNs (the engine never sends it)
                zero_rows(out, i, H * D);
                continue;
            }
            const int64_t* table = tables + i * table_stride;
            const int64_t stride = (len + 15) & ~int64_t{15};
            s.resize(H * stride);
            __m512 qv[H][NF];
            for (int r = 0; r < H; ++r) {
                alignas(64) float qr[D];
                for (int j = 0; j < D; ++j) qr[j] = load(q + (i * H + r) * D, j);
                for (int f = 0; f < NF; ++f) qv[r][f] = _mm512_load_ps(qr + f * 16);
            }
            for (int64_t t0 = 0; t0 < len; t0 += 16) {
                const int64_t m = std::min<int64_t>(16, len - t0);
                alignas(64) float c[16];
                for (int64_t t = 0; t < 16; ++t) {
                    const int64_t tt = t0 + std::min(t, m - 1);   // past the end: a row again, unused
                    const int64_t slot = table[tt / bs] * bs + tt % bs;
                    const int8_t* kr = kc + slot * D;
                    for (int f = 0; f < NF; ++f) _mm512_store_ps(tile + t * D + f * 16, widen16(kr + f * 16));
                    c[t] = scale * ks[slot];
                }
                for (int64_t t = t0 + PF; t < std::min(t0 + PF + 16, 2 * len); ++t) {  // then V's first rows
                    const int64_t u = t < len ? t : t - len;
                    prefetch_q8<D>(t < len ? kc : vc, t < len ? ks : vs, table[u / bs] * bs + u % bs);
                }
                const __m512 cv = _mm512_load_ps(c);
                for (int r = 0; r < H; ++r) {
                    __m512 a[16];
                    for (int t = 0; t < 16; ++t) {
                        __m512 acc = _mm512_mul_ps(_mm512_load_ps(tile + t * D), qv[r][0]);
                        for (int f = 1; f < NF; ++f)
                            acc = _mm512_fmadd_ps(_mm512_load_ps(tile + t * D + f * 16), qv[r][f], acc);
                        a[t] = acc;
                    }
                    _mm512_storeu_ps(s.data() + r * stride + t0, _mm512_mul_ps(sum16(a), cv));
                }
            }
            float sum[H];
            softmax_rows(s.data(), H, stride, len, sum);
            weigh_values<D, H>(s.data(), stride, len, sum, [&](int64_t t, __m512* vf) {
                const int64_t slot = table[t / bs] * bs + t % bs;
                if (t + PF < len) prefetch_q8<D>(vc, vs, table[(t + PF) / bs] * bs + (t + PF) % bs);
                for (int f = 0; f < NF; ++f) vf[f] = widen16(vc + slot * D + f * 16);
                return vs[slot];
            }, out + i * H * D);
        }
    }
}

template <typename T, int D>
bool decode_q8_h(const int8_t* kc, const int8_t* vc, const float* ks, const float* vs, const T* q,
                 const int64_t* tb, int64_t ts, const int64_t* ctx, T* out, int64_t n, int64_t h,
                 int64_t bs, float scale, int threads) {
#define HETIS_Q8_H(HH) \
    case HH: decode_q8_avx512<T, D, HH>(kc, vc, ks, vs, q, tb, ts, ctx, out, n, bs, scale, threads); return true;
    switch (h) {
        HETIS_Q8_H(1) HETIS_Q8_H(2) HETIS_Q8_H(3) HETIS_Q8_H(4) HETIS_Q8_H(8)
        default: return false;
    }
#undef HETIS_Q8_H
}
#endif

template <typename T>
void decode_q8_any(const int8_t* kc, const int8_t* vc, const float* ks, const float* vs, const T* q,
                   const int64_t* tb, int64_t ts, const int64_t* ctx, T* out, int64_t n, int64_t h,
                   int64_t d, int64_t bs, float scale, int threads) {
#if defined(__AVX512F__)
    static const bool generic = std::getenv("HETIS_PAGED_GENERIC") != nullptr;
    if (!generic && d == 64 && decode_q8_h<T, 64>(kc, vc, ks, vs, q, tb, ts, ctx, out, n, h, bs, scale, threads))
        return;
    if (!generic && d == 128 && decode_q8_h<T, 128>(kc, vc, ks, vs, q, tb, ts, ctx, out, n, h, bs, scale, threads))
        return;
#endif
    if (d == 64)
        decode<int8_t, T, 64>(kc, vc, ks, vs, q, tb, ts, ctx, out, n, h, d, bs, scale, threads);
    else if (d == 128)
        decode<int8_t, T, 128>(kc, vc, ks, vs, q, tb, ts, ctx, out, n, h, d, bs, scale, threads);
    else
        decode<int8_t, T, 0>(kc, vc, ks, vs, q, tb, ts, ctx, out, n, h, d, bs, scale, threads);
}

}  // namespace

extern "C" {

// kc, vc: one layer's cache, [blocks * bs, d]; q, out: [n, h, d]; tables: [n, table_stride]
// block ids; ctx: [n] tokens to attend (the new token's own key included).
void hetis_paged_decode_f32(const float* kc, const float* vc, const float* q, const int64_t* tables,
                            int64_t table_stride, const int64_t* ctx, float* out, int64_t n,
                            int64_t h, int64_t d, int64_t bs, float scale, int threads) {
    decode_any(kc, vc, q, tables, table_stride, ctx, out, n, h, d, bs, scale, threads);
}

void hetis_paged_decode_bf16(const uint16_t* kc, const uint16_t* vc, const uint16_t* q,
                             const int64_t* tables, int64_t table_stride, const int64_t* ctx,
                             uint16_t* out, int64_t n, int64_t h, int64_t d, int64_t bs, float scale,
                             int threads) {
    // HETIS_PAGED_GENERIC=1: the generic loop only (to compare the two; docs/cpu.md)
    static const bool generic = std::getenv("HETIS_PAGED_GENERIC") != nullptr;
    if (!generic && decode_fast(kc, vc, q, tables, table_stride, ctx, out, n, h, d, bs, scale, threads))
        return;
    decode_any(kc, vc, q, tables, table_stride, ctx, out, n, h, d, bs, scale, threads);
}

// the same over an 8-bit cache: kc, vc int8 [blocks * bs, d], ks, vs float32 [blocks * bs]
#define HETIS_PAGED_Q8(SUFFIX, T)                                                                  \
    void hetis_paged_decode_q8_##SUFFIX(const int8_t* kc, const int8_t* vc, const float* ks,      \
                                        const float* vs, const T* q, const int64_t* tables,       \
                                        int64_t table_stride, const int64_t* ctx, T* out,         \
                                        int64_t n, int64_t h, int64_t d, int64_t bs, float scale, \
                                        int threads) {                                             \
        decode_q8_any(kc, vc, ks, vs, q, tables, table_stride, ctx, out, n, h, d, bs, scale,     \
                      threads);                                                                    \
    }
HETIS_PAGED_Q8(f32, float)
HETIS_PAGED_Q8(bf16, uint16_t)

// whether a vector loop (not the generic one) serves head dim d with h query rows a group
// for this dtype (T: 1 bf16, 0 f32) and cache (quantized: 1 int8): the engine sends prefill
// chunks through the kernel only where one does (the generic loop is slower than SDPA)
int hetis_paged_decode_fast(int64_t d, int64_t h, int bf16, int quantized) {
    static const bool generic = std::getenv("HETIS_PAGED_GENERIC") != nullptr;
    const bool shape = (d == 64 || d == 128) && (h == 1 || h == 2 || h == 3 || h == 4 || h == 8);
    if (generic || !shape) return 0;
#if defined(__AVX512F__)
    if (quantized) return 1;
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    if (bf16) return 1;
#endif
    (void)bf16;
    (void)quantized;
    return 0;
}

int hetis_paged_decode_abi() { return 3; }
}
