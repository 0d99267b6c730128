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
#include <cstring>
#include <vector>

#include "bf16.h"

using hetis::load;
using hetis::store;

namespace {

// D: the head dimension when known at compile time (64, 128), else 0 (runtime ``d``).
template <typename T, int D>
void decode(const T* kc, const T* vc, const T* q, const int64_t* tables, int64_t table_stride,
            const int64_t* ctx, T* out, int64_t n, int64_t h, int64_t d_rt, int64_t bs, float scale,
            int threads) {
    const int64_t d = D ? D : d_rt;
#pragma omp parallel num_threads(threads) if (n > 1 && threads > 1)
    {
        std::vector<float> qf(h * d), acc(h * d), sum(h), row(d), s;
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n; ++i) {
            const int64_t len = ctx[i];
            const int64_t* table = tables + i * table_stride;
            s.resize(h * len);
            for (int64_t j = 0; j < h * d; ++j) qf[j] = load(q + i * h * d, j) * scale;
            float* kf = row.data();
            // scores: every key row read and widened once, for all h query rows
            for (int64_t t = 0; t < len; ++t) {
                const T* kr = kc + (table[t / bs] * bs + t % bs) * d;
#pragma omp simd
                for (int64_t j = 0; j < d; ++j) kf[j] = load(kr, j);
                for (int64_t r = 0; r < h; ++r) {
                    const float* qr = qf.data() + r * d;
                    float a = 0.f;
#pragma omp simd reduction(+ : a)
                    for (int64_t j = 0; j < d; ++j) a += qr[j] * kf[j];
                    s[r * len + t] = a;
                }
            }
            // softmax, float32
            std::fill(acc.begin(), acc.end(), 0.f);
            for (int64_t r = 0; r < h; ++r) {
                float* sr = s.data() + r * len;
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
            // weighted values: every value row read and widened once, for all h rows
            for (int64_t t = 0; t < len; ++t) {
                const T* vr = vc + (table[t / bs] * bs + t % bs) * d;
#pragma omp simd
                for (int64_t j = 0; j < d; ++j) kf[j] = load(vr, j);
                for (int64_t r = 0; r < h; ++r) {
                    const float p = s[r * len + t];
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

template <typename T>
void decode_any(const T* kc, const T* vc, const T* q, const int64_t* tables, int64_t ts,
                const int64_t* ctx, T* out, int64_t n, int64_t h, int64_t d, int64_t bs, float scale,
                int threads) {
    if (d == 64)
        decode<T, 64>(kc, vc, q, tables, ts, ctx, out, n, h, d, bs, scale, threads);
    else if (d == 128)
        decode<T, 128>(kc, vc, q, tables, ts, ctx, out, n, h, d, bs, scale, threads);
    else
        decode<T, 0>(kc, vc, q, tables, ts, ctx, out, n, h, d, bs, scale, threads);
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
    decode_any(kc, vc, q, tables, table_stride, ctx, out, n, h, d, bs, scale, threads);
}

int hetis_paged_decode_abi() { return 1; }
}
