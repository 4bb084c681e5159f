// Decode attention over a paged KV pool on the CPU, fp32, GQA: one task per (sequence, KV head),
// all query heads of that KV head together, two passes over the sequence's blocks read in place
// through its block-table row (scores of every key, one softmax, then the values), as
// numba_kernel.py's loop; loaded by cpu_kernels.py through ctypes (attention.py's impl "cpp").
#include <stdlib.h>

#include "simd.h"

// The next block of a row lives on another page, where the hardware prefetcher does not follow.
static inline void prefetch_block(const float *p, long floats) {
    for (long i = 0; i < floats; i += 16) __builtin_prefetch(p + i);
}

// f(row, t) for the K (kv = 0) or V (kv = 1) row of each key t < n of one KV head, block by block
// through the block ids of the sequence's table row, prefetching each next block.
template <int D, class F>
static inline void walk(const float *pool, const int64_t *ids, int64_t n, int hkv, int kh, int bs, int kv, F f) {
    const int64_t nblk = (n + bs - 1) / bs;
    for (int64_t j = 0; j < nblk; j++) {
        const float *blk = pool + ((ids[j] * 2 + kv) * hkv + kh) * (long)bs * D;
        const int64_t base = j * bs, kn = n - base < bs ? n - base : bs;
        if (j + 1 < nblk) prefetch_block(pool + ((ids[j + 1] * 2 + kv) * hkv + kh) * (long)bs * D, (long)bs * D);
        for (int64_t t = 0; t < kn; t++) f(blk + t * D, base + t);
    }
}

enum { BAD_BLOCK = 1, NO_KEY = 2, OFF_TABLE = 3, NO_MEMORY = 4 };

template <int D, int G>
static void decode(const float *q, const float *pool, const int64_t *table, const int64_t *rows,
                   const int64_t *lens, float *out, uint8_t *bad, int nr, int hkv, long nb, int bs,
                   long tr, long tw, float scale, int threads) {
    enum { C = D / 16 };
    #pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int task = 0; task < nr * hkv; task++) {
        const int r = task / hkv, kh = task % hkv;
        const int64_t row = rows ? rows[r] : r, n = lens[r], nblk = (n + bs - 1) / bs;
        if (n < 1) { bad[task] = NO_KEY; continue; }
        if (row < 0 || row >= tr || nblk > tw) { bad[task] = OFF_TABLE; continue; }
        const int64_t *ids = table + row * tw;
        for (int64_t j = 0; j < nblk; j++)
            if (ids[j] < 0 || ids[j] >= nb) bad[task] = BAD_BLOCK;
        if (bad[task]) continue;
        float *s = (float *)malloc(sizeof(float) * G * (n + 16));  // the scores, then the weights
        if (!s) { bad[task] = NO_MEMORY; continue; }
        const long ld = n + 16;
        v16 qv[G][C];
        for (int g = 0; g < G; g++)
            for (int c = 0; c < C; c++) qv[g][c] = vload(q + ((long)r * hkv * G + kh * G + g) * D + c * 16) * scale;
        // pass 1: scores
        walk<D>(pool, ids, n, hkv, kh, bs, 0, [&](const float *kr, int64_t t) {
            v16 k[C];
            for (int c = 0; c < C; c++) k[c] = vload(kr + c * 16);
            for (int g = 0; g < G; g++) {
                v16 a = qv[g][0] * k[0];
                for (int c = 1; c < C; c++) a += qv[g][c] * k[c];
                s[g * ld + t] = hsum(a);
            }
        });
        // one softmax per query head over the whole row
        float inv[G];
        for (int g = 0; g < G; g++) {
            float *sg = s + g * ld;
            for (int64_t t = n; t < n + 16; t++) sg[t] = -1e30f;  // pad to whole vectors: weight 0
            v16 mv = (v16){} - 1e30f;
            for (int64_t t = 0; t < n; t += 16) { v16 x = vload(sg + t); mv = x > mv ? x : mv; }
            const float top = hmax(mv);
            v16 den = {};
            for (int64_t t = 0; t < n; t += 16) { v16 p = vexp(vload(sg + t) - top); den += p; vstore(sg + t, p); }
            inv[g] = 1.f / hsum(den);
        }
        // pass 2: the weighted sum of the values
        v16 o[G][C] = {};
        walk<D>(pool, ids, n, hkv, kh, bs, 1, [&](const float *vr, int64_t t) {
            v16 v[C];
            for (int c = 0; c < C; c++) v[c] = vload(vr + c * 16);
            for (int g = 0; g < G; g++) {
                const float p = s[g * ld + t];
                for (int c = 0; c < C; c++) o[g][c] += p * v[c];
            }
        });
        for (int g = 0; g < G; g++)
            for (int c = 0; c < C; c++) vstore(out + ((long)r * hkv * G + kh * G + g) * D + c * 16, o[g][c] * inv[g]);
        free(s);
    }
}

typedef void (*decode_fn)(const float *, const float *, const int64_t *, const int64_t *, const int64_t *,
                          float *, uint8_t *, int, int, long, int, long, long, float, int);

template <int D>
static decode_fn pick(int g) {
    switch (g) {
        case 1: return decode<D, 1>; case 2: return decode<D, 2>; case 3: return decode<D, 3>;
        case 4: return decode<D, 4>; case 5: return decode<D, 5>; case 6: return decode<D, 6>;
        case 7: return decode<D, 7>; case 8: return decode<D, 8>; default: return 0;
    }
}

extern "C" int orbitflow_vector_bits(void) { return native_vector_bits(); }

// q [R, H, D] contiguous; pool [nb, 2, Hkv, bs, D] contiguous (0 = K, 1 = V); table [tr, tw] int64
// contiguous; rows [R] int64 or NULL (row r); lens [R] int64; out [R, H, D]; bad [R * Hkv] zeroed:
// set per task as the codes above (that task reads nothing and writes no output). Returns 0, or 1
// for a shape the kernel was not built for.
extern "C" int paged_decode_f32(const float *q, const float *pool, const int64_t *table, const int64_t *rows,
                                const int64_t *lens, float *out, uint8_t *bad, int nr, int h, int hkv, int d,
                                long nb, int bs, long tr, long tw, float scale, int threads) {
    if (hkv <= 0 || h % hkv) return 1;
    decode_fn f = d == 64 ? pick<64>(h / hkv) : d == 128 ? pick<128>(h / hkv) : 0;
    if (!f) return 1;
    f(q, pool, table, rows, lens, out, bad, nr, hkv, nb, bs, tr, tw, scale, threads);
    return 0;
}
