// Vector helpers shared by the CPU attention kernels: GCC vector extensions of 16 fp32 lanes (one
// AVX-512 register, or two AVX2 halves; the compiler picks for -march=native).
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));


// 2^t for every lane, t <= 0: t = k + f with k the nearest integer and f in [-1/2, 1/2], 2^f =
// exp(f ln 2) a degree-7 Taylor polynomial (truncation under 1e-9 relative); lanes below -126
// (under 2^-126) give 0.
static inline v16 vexp2(v16 t) {
    vi16 under = t < -126.f;
    t = under ? (v16){} - 126.f : t;
    v16 th = t + 0.5f;
    vi16 ki = __builtin_convertvector(th, vi16);  // rounds toward zero
    vi16 up = __builtin_convertvector(ki, v16) > th;  // -1 where that rounded up (th < 0)
    ki += up;                                         // floor(t + 1/2)
    v16 k = __builtin_convertvector(ki, v16);
    v16 f = (t - k) * 0.6931471805599453f;
    v16 p = f * (1.f / 5040) + (1.f / 720);
    p = p * f + (1.f / 120); p = p * f + (1.f / 24); p = p * f + (1.f / 6);
    p = p * f + 0.5f; p = p * f + 1.f; p = p * f + 1.f;
    vi16 e = (ki + 127) << 23;
    v16 sc;
    memcpy(&sc, &e, sizeof sc);
    return under ? (v16){} : p * sc;
}

static const float LOG2E = 1.4426950408889634f;

// exp of every lane for x <= 0 (under 2^-126, x < -87.3: 0).
static inline v16 vexp(v16 x) { return vexp2(x * LOG2E); }

static inline float hmax(v16 x) {
    float m = x[0];
    for (int j = 1; j < 16; j++) m = m > x[j] ? m : x[j];
    return m;
}

typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

static inline float hsum(v16 x) {  // pairwise: halves, quarters, then the last four lanes
    v8 lo, hi;
    memcpy(&lo, &x, sizeof lo);
    memcpy(&hi, (const char *)&x + sizeof lo, sizeof hi);
    v8 a = lo + hi;
    v4 c, d;
    memcpy(&c, &a, sizeof c);
    memcpy(&d, (const char *)&a + sizeof c, sizeof d);
    v4 b = c + d;
    return (b[0] + b[2]) + (b[1] + b[3]);
}

// The vector width this file was compiled for: 512 with AVX-512, where a v16 is one register; 256
// with AVX2, where every v16 operation is two and the kernels' register blocks spill.
static inline int native_vector_bits() {
#if defined(__AVX512F__)
    return 512;
#elif defined(__AVX2__)
    return 256;
#else
    return 0;
#endif
}

static inline v16 vload(const float *p) { v16 x; memcpy(&x, p, sizeof x); return x; }
static inline void vstore(float *p, v16 x) { memcpy(p, &x, sizeof x); }
