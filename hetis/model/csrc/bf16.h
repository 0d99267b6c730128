// float <-> bfloat16 as PyTorch converts them (round to nearest even), shared by the CPU
// kernels in this folder.
#pragma once
#include <cstdint>
#include <cstring>

namespace hetis {

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const int8_t* p, int64_t i) { return static_cast<float>(p[i]); }   // int8 KV rows
inline float load(const uint16_t* p, int64_t i) {
    uint32_t u = static_cast<uint32_t>(p[i]) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline void store(float* p, int64_t i, float f) { p[i] = f; }
inline void store(uint16_t* p, int64_t i, float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays NaN
        p[i] = static_cast<uint16_t>((u >> 16) | 0x40u);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    p[i] = static_cast<uint16_t>(u >> 16);
}

// the value a tensor of this type holds for the float f (f itself for float32)
inline float round_to(const float*, float f) { return f; }
inline float round_to(const uint16_t*, float f) {
    uint16_t b;
    store(&b, 0, f);
    return load(&b, 0);
}

}  // namespace hetis
