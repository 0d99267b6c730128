// The small per-layer operations of the dense model, fused, on the CPU.
//
// A decode step of a few sequences spends as much time in the ~70 small PyTorch
// operations per layer (norms, RoPE, splits, SiLU, residual adds: a few microseconds of
// dispatch each) as in its matrix multiplications. These kernels do the same
// arithmetic in 4 calls. Each rounds where PyTorch's eager code rounds (every
// bfloat16 result of an elementwise operation), so RoPE and the residual add are
// bit-identical to it; the norm's mean of squares and SiLU's exp differ from it by
// float32 rounding (a different summation order; libmvec's expf).
//
// Built and loaded by hetis/model/cpu_kernels.py (-ffp-contract=off: no fused
// multiply-add where PyTorch rounds the product); called through ctypes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "bf16.h"

using hetis::load;
using hetis::round_to;
using hetis::store;

namespace {

// One row: out = w * round(x * rsqrt(mean(x^2) + eps)), as transformers' LlamaRMSNorm
// (statistics in float32, the normalised row rounded to the dtype, then the scale).
template <typename T>
inline void rms_row(const T* x, const T* w, T* out, int64_t d, float eps) {
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < d; ++j) {
        const float v = load(x, j);
        ss += v * v;
    }
    const float r = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
    for (int64_t j = 0; j < d; ++j) store(out, j, load(w, j) * round_to(x, load(x, j) * r));
}

template <typename T>
void rms_norm(const T* x, int64_t xs, const T* w, T* out, int64_t n, int64_t d, float eps,
              int threads) {
#pragma omp parallel for num_threads(threads) if (n * d >= 65536)
    for (int64_t i = 0; i < n; ++i) rms_row(x + i * xs, w, out + i * d, d, eps);
}

// h += a (in place, rounded), then out = rms_norm(h): the residual add and the next norm.
template <typename T>
void add_rms_norm(T* h, const T* a, int64_t as, const T* w, T* out, int64_t n, int64_t d,
                  float eps, int threads) {
#pragma omp parallel for num_threads(threads) if (n * d >= 65536)
    for (int64_t i = 0; i < n; ++i) {
        T* hr = h + i * d;
        const T* ar = a + i * as;
        for (int64_t j = 0; j < d; ++j) store(hr, j, load(hr, j) + load(ar, j));
        rms_row(hr, w, out + i * d, d, eps);
    }
}

// The fused projection's output [n, (hq + 2 hkv) * d] (row stride qs) into contiguous q
// [n, hq, d] and k, v [n, hkv, d], q and k rotated (rotate-half RoPE with cos/sin
// [n, d]): x * cos + rotate_half(x) * sin, each product and the sum rounded.
template <typename T>
void rope_split(const T* qkv, int64_t qs, const T* cos, const T* sin, T* q, T* k, T* v,
                int64_t n, int64_t hq, int64_t hkv, int64_t d, int threads) {
    const int64_t half = d / 2;
#pragma omp parallel for num_threads(threads) if (n * (hq + 2 * hkv) * d >= 65536)
    for (int64_t i = 0; i < n; ++i) {
        const T* row = qkv + i * qs;
        const T* c = cos + i * d;
        const T* s = sin + i * d;
        for (int64_t hd = 0; hd < hq + hkv; ++hd) {
            const T* x = row + hd * d;
            T* o = hd < hq ? q + (i * hq + hd) * d : k + (i * hkv + hd - hq) * d;
            for (int64_t j = 0; j < d; ++j) {
                const float rot = j < half ? -load(x, j + half) : load(x, j - half);
                const float a = round_to(x, load(x, j) * load(c, j));
                const float b = round_to(x, rot * load(s, j));
                store(o, j, a + b);
            }
        }
        const T* vr = row + (hq + hkv) * d;
        T* vo = v + i * hkv * d;
        for (int64_t j = 0; j < hkv * d; ++j) vo[j] = vr[j];
    }
}

// gate_up [n, 2 m] (row stride gs) -> out [n, m] = silu(gate) * up, silu rounded first.
template <typename T>
void silu_mul(const T* gu, int64_t gs, T* out, int64_t n, int64_t m, int threads) {
#pragma omp parallel for num_threads(threads) if (n * m >= 32768)
    for (int64_t i = 0; i < n; ++i) {
        const T* g = gu + i * gs;
        const T* u = g + m;
        T* o = out + i * m;
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) {
            const float x = load(g, j);
            const float sx = round_to(g, x / (1.f + std::exp(-x)));
            store(o, j, sx * load(u, j));
        }
    }
}

// out[m, n] = sum_b d[n, b] * sum_j q[n, 32 b + j] * x[m, 32 b + j] in float32: x [M, K]
// against a Q8_0 weight (int8 values, a float32 scale per row and block of 32) as the
// GGUF stores it, for the LM head of a few decode rows: 8.5 bits a weight read, not 16.
// Not a PyTorch operation's rounding to match: float32 throughout, the logits unrounded.
template <typename T>
void q8_linear(const T* x, const int8_t* q, const float* d, float* out, int64_t M, int64_t N,
               int64_t K, int threads) {
    const int64_t nb = K / 32;
    std::vector<float> xf(M * K);
    for (int64_t i = 0; i < M * K; ++i) xf[i] = load(x, i);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && N > 256)
    for (int64_t n = 0; n < N; ++n) {
        const int8_t* qr = q + n * K;
        const float* dr = d + n * nb;
#if defined(__AVX512F__)
        for (int64_t m0 = 0; m0 < M; m0 += 4) {   // up to 4 rows per pass: each block widened once
            const int64_t mm = std::min<int64_t>(4, M - m0);
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int64_t b = 0; b < nb; ++b) {
                const int8_t* qb = qr + b * 32;
                const __m512 sc = _mm512_set1_ps(dr[b]);
                const __m512 q0 = _mm512_mul_ps(sc, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)qb))));
                const __m512 q1 = _mm512_mul_ps(sc, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(qb + 16)))));
                for (int64_t m = 0; m < mm; ++m) {
                    const float* xb = xf.data() + (m0 + m) * K + b * 32;
                    acc[m] = _mm512_fmadd_ps(q0, _mm512_loadu_ps(xb), acc[m]);
                    acc[m] = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xb + 16), acc[m]);
                }
            }
            for (int64_t m = 0; m < mm; ++m) out[(m0 + m) * N + n] = _mm512_reduce_add_ps(acc[m]);
        }
#else
        for (int64_t m = 0; m < M; ++m) {
            const float* xr = xf.data() + m * K;
            float acc = 0.f;
            for (int64_t b = 0; b < nb; ++b) {
                float t = 0.f;
                for (int64_t j = 0; j < 32; ++j) t += static_cast<float>(qr[b * 32 + j]) * xr[b * 32 + j];
                acc += dr[b] * t;
            }
            out[m * N + n] = acc;
        }
#endif
    }
}

// New keys and values into an 8-bit KV cache: each row (one token of one head group)
// stored as int8 round(x * (127 / max|x|)) with s = max|x| * (1 / 127) kept beside it in
// float32, written at its flat slot (a product, not x / s: -ffast-math vectorises
// divisions by a reciprocal estimate, which is not correctly rounded). The same arithmetic as hetis/model/kv_store.py's ``quantize`` (float32
// division, round half to even), so the two agree bit for bit.
template <typename T>
inline void quantize_row(const T* x, int8_t* q, float* s, int64_t d) {
    float m = 0.f;
    for (int64_t j = 0; j < d; ++j) m = std::max(m, std::fabs(load(x, j)));
    const float sc = m * (1.f / 127.f);
    const float inv = m > 0.f ? 127.f / m : 0.f;   // one scalar division a row (exact)
    for (int64_t j = 0; j < d; ++j) {
        const float r = std::nearbyint(load(x, j) * inv);
        q[j] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, r)));
    }
    *s = sc;
}

// New keys and values (rows of stride ks, vs) copied to their flat slots of one layer's
// cache: the two index_copy_ calls of a layer in one (they cost about 25 us each at
// batch 32 x 3 groups, a row being 128 bytes). Slots outside [0, cap) are not written and
// counted: the caller raises (a bad block id from the wire must not write past the cache).
template <typename T>
int64_t kv_write(const T* k, int64_t ks, const T* v, int64_t vs, const int64_t* slots, T* kc, T* vc,
                 int64_t n, int64_t d, int64_t cap) {
    int64_t bad = 0;
    for (int64_t i = 0; i < n; ++i) {
        const int64_t s = slots[i];
        if (s < 0 || s >= cap) {
            ++bad;
            continue;
        }
        std::memcpy(kc + s * d, k + i * ks, d * sizeof(T));
        std::memcpy(vc + s * d, v + i * vs, d * sizeof(T));
    }
    return bad;
}

template <typename T>
int64_t kv_write_q8(const T* k, int64_t ks, const T* v, int64_t vs, const int64_t* slots, int8_t* kc,
                    int8_t* vc, float* kscale, float* vscale, int64_t n, int64_t d, int64_t cap,
                    int threads) {
    int64_t bad = 0;
#pragma omp parallel for num_threads(threads) reduction(+ : bad) if (n * d >= 65536)
    for (int64_t i = 0; i < n; ++i) {
        const int64_t s = slots[i];
        if (s < 0 || s >= cap) {   // as kv_write: not written, counted
            ++bad;
            continue;
        }
        quantize_row(k + i * ks, kc + s * d, kscale + s, d);
        quantize_row(v + i * vs, vc + s * d, vscale + s, d);
    }
    return bad;
}

}  // namespace

#define HETIS_FUSED(SUFFIX, T)                                                                   \
    void hetis_rms_norm_##SUFFIX(const T* x, int64_t xs, const T* w, T* out, int64_t n,         \
                                 int64_t d, float eps, int threads) {                            \
        rms_norm(x, xs, w, out, n, d, eps, threads);                                             \
    }                                                                                            \
    void hetis_add_rms_norm_##SUFFIX(T* h, const T* a, int64_t as, const T* w, T* out,          \
                                     int64_t n, int64_t d, float eps, int threads) {             \
        add_rms_norm(h, a, as, w, out, n, d, eps, threads);                                      \
    }                                                                                            \
    void hetis_rope_split_##SUFFIX(const T* qkv, int64_t qs, const T* cos, const T* sin, T* q,  \
                                   T* k, T* v, int64_t n, int64_t hq, int64_t hkv, int64_t d,    \
                                   int threads) {                                                \
        rope_split(qkv, qs, cos, sin, q, k, v, n, hq, hkv, d, threads);                          \
    }                                                                                            \
    void hetis_silu_mul_##SUFFIX(const T* gu, int64_t gs, T* out, int64_t n, int64_t m,         \
                                 int threads) {                                                  \
        silu_mul(gu, gs, out, n, m, threads);                                                    \
    }                                                                                            \
    void hetis_q8_linear_##SUFFIX(const T* x, const int8_t* q, const float* d, float* out,      \
                                  int64_t m, int64_t n, int64_t k, int threads) {               \
        q8_linear(x, q, d, out, m, n, k, threads);                                               \
    }                                                                                            \
    int64_t hetis_kv_write_##SUFFIX(const T* k, int64_t ks, const T* v, int64_t vs,             \
                                    const int64_t* slots, T* kc, T* vc, int64_t n, int64_t d,    \
                                    int64_t cap) {                                               \
        return kv_write(k, ks, v, vs, slots, kc, vc, n, d, cap);                                 \
    }                                                                                            \
    int64_t hetis_kv_write_q8_##SUFFIX(const T* k, int64_t ks, const T* v, int64_t vs,          \
                                       const int64_t* slots, int8_t* kc, int8_t* vc, float* ksc, \
                                       float* vsc, int64_t n, int64_t d, int64_t cap,            \
                                       int threads) {                                            \
        return kv_write_q8(k, ks, v, vs, slots, kc, vc, ksc, vsc, n, d, cap, threads);           \
    }

extern "C" {
HETIS_FUSED(f32, float)
HETIS_FUSED(bf16, uint16_t)
int hetis_fused_ops_abi() { return 4; }
}
