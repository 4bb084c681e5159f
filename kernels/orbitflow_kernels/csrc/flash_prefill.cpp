// Causal prefill attention on the CPU, fp32, GQA: a flash-attention loop (Dao et al. 2022) over
// key blocks of 64, register-blocked for 512-bit vector units (AVX-512; built for AVX2 it spills).
// Loaded by cpu_prefill.py through ctypes; see its docstring for shapes and the algorithm.
#include <stdlib.h>

#include "simd.h"

// KB keys a block, QT query positions a tile, RB query rows a register block (6 x 4 accumulators
// + 4 key vectors of 32 registers; 4, 5, 7 and 8 rows measured slower), MAXG query heads per KV head.
enum { KB = 64, NC = KB / 16, QT = 16, MAXG = 8, RB = 6, MAXR = MAXG * QT + RB };
static const v16 LANE = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

// Keys of every KV head, cut into blocks of KB and transposed once: kt[kh][b][d][KB], zero-padded.
template <int D>
static void transpose_keys(const float *k, float *kt, int hkv, int s, long ksh, long kst, int threads) {
    int nb = (s + KB - 1) / KB;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < hkv * nb; t++) {
        int kh = t / nb, b = t % nb, kb = s - b * KB < KB ? s - b * KB : KB;
        float *dst = kt + (size_t)t * D * KB;
        for (int j = 0; j < KB; j++) {
            const float *src = k + kh * ksh + (long)(b * KB + j) * kst;
            for (int d = 0; d < D; d++) dst[d * KB + j] = j < kb ? src[d] : 0.f;
        }
    }
}

template <int D>
static void attend(const float *q, const float *kt, const float *v, float *out, int h, int hkv,
                   int n, int s, long qst, long vsh, long vst, long ost, float scale, int threads) {
    const int g = h / hkv, ctx = s - n, nb = (s + KB - 1) / KB, tiles = (n + QT - 1) / QT, m_rows = g * QT;
    const int m_pad = (m_rows + RB - 1) / RB * RB;  // rows past m_rows repeat the last one
    const float scale2 = scale * LOG2E;  // scores in log2 units: weights are 2^(score - max)
    // Longest tiles first (the last queries see the most keys), KV heads interleaved.
    #pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int z = 0; z < hkv * tiles; z++) {
        const int kh = z % hkv, tile = tiles - 1 - z / hkv, q0 = tile * QT;
        const int qn = n - q0 < QT ? n - q0 : QT;
        alignas(64) float Q[MAXR][D];
        alignas(64) float O[MAXR][D];
        alignas(64) float P[RB][KB];
        float m[MAXR], l[MAXR];
        int pos[MAXR];
        for (int r = 0; r < m_pad; r++) {  // row r: query head kh*g + r/QT at position q0 + r%QT
            const int rq = r < m_rows ? r : m_rows - 1;
            int i = rq % QT < qn ? rq % QT : qn - 1;  // pad rows repeat the tile's last query
            const float *src = q + (long)(q0 + i) * qst + (long)(kh * g + rq / QT) * D;
            for (int d = 0; d < D; d++) { Q[r][d] = src[d] * scale2; O[r][d] = 0.f; }
            pos[r] = ctx + q0 + i; m[r] = -1e30f; l[r] = 0.f;
        }
        const int kend = ctx + q0 + qn;  // keys any row of the tile sees
        for (int b = 0; b * KB < kend; b++) {
            const int kb0 = b * KB, kb = s - kb0 < KB ? s - kb0 : KB;
            const float *K = kt + ((size_t)kh * nb + b) * D * KB;
            const float *V = v + kh * vsh + (long)kb0 * vst;
            for (int r0 = 0; r0 < m_pad; r0 += RB) {  // RB rows
                int last = pos[r0];
                for (int rr = 1; rr < RB; rr++) last = pos[r0 + rr] > last ? pos[r0 + rr] : last;
                if (last < kb0) continue;  // the block is past every row's causal limit
                v16 a[RB][NC] = {};
                for (int d = 0; d < D; d++) {
                    float q_[RB];
                    for (int rr = 0; rr < RB; rr++) q_[rr] = Q[r0 + rr][d];
                    for (int c = 0; c < NC; c++) {
                        v16 kv = vload(K + d * KB + c * 16);
                        for (int rr = 0; rr < RB; rr++) a[rr][c] += q_[rr] * kv;
                    }
                }
                float corr[RB];
                int jmax = 0;
                for (int rr = 0; rr < RB; rr++) {
                    const int r = r0 + rr;
                    int lim = pos[r] + 1 - kb0;
                    lim = lim < kb ? lim : kb;
                    if (lim <= 0) { corr[rr] = 1.f; memset(P[rr], 0, sizeof P[rr]); continue; }
                    jmax = lim > jmax ? lim : jmax;
                    v16 mxv = (v16){} - 1e30f;
                    for (int c = 0; c < NC; c++) {  // keys at or past lim (causal, or past s) weigh 0
                        if (lim < KB) a[rr][c] = LANE + (float)(c * 16) < (float)lim ? a[rr][c] : (v16){} - 1e30f;
                        mxv = a[rr][c] > mxv ? a[rr][c] : mxv;
                    }
                    float mx = hmax(mxv);
                    mx = mx > m[r] ? mx : m[r];
                    corr[rr] = exp2f(m[r] - mx);  // 0 at the first block a row sees (m = -1e30)
                    v16 sum = {};
                    for (int c = 0; c < NC; c++) {
                        v16 p = vexp2(a[rr][c] - mx);
                        sum += p;
                        vstore(P[rr] + c * 16, p);
                    }
                    l[r] = l[r] * corr[rr] + hsum(sum);
                    m[r] = mx;
                }
                for (int d0 = 0; d0 < D; d0 += 64) {  // P x V for the RB rows, 64 output lanes at a time
                    v16 o[RB][4];
                    for (int rr = 0; rr < RB; rr++)
                        for (int c = 0; c < 4; c++) o[rr][c] = vload(&O[r0 + rr][d0 + c * 16]) * corr[rr];
                    for (int j = 0; j < jmax; j++) {
                        const float *vr = V + (long)j * vst + d0;
                        v16 v0 = vload(vr), v1 = vload(vr + 16), v2 = vload(vr + 32), v3 = vload(vr + 48);
                        for (int rr = 0; rr < RB; rr++) {
                            float p = P[rr][j];
                            o[rr][0] += p * v0; o[rr][1] += p * v1; o[rr][2] += p * v2; o[rr][3] += p * v3;
                        }
                    }
                    for (int rr = 0; rr < RB; rr++)
                        for (int c = 0; c < 4; c++) vstore(&O[r0 + rr][d0 + c * 16], o[rr][c]);
                }
            }
        }
        for (int r = 0; r < m_rows; r++) {
            if (r % QT >= qn) continue;
            float inv = 1.f / l[r];
            float *dst = out + (long)(q0 + r % QT) * ost + (long)(kh * g + r / QT) * D;
            for (int d = 0; d < D; d++) dst[d] = O[r][d] * inv;
        }
    }
}

// q [n, H, D] (token stride qst, heads packed); k, v [Hkv, s, D] (head stride ksh/vsh, token stride
// kst/vst), query i at position s - n + i; out [n, H, D] (token stride ost). Returns 0, or
// 1 for an unsupported shape, 2 when the scratch could not be allocated.
extern "C" int flash_prefill_f32(const float *q, const float *k, const float *v, float *out, int h, int hkv,
                                 int d, int n, int s, long qst, long ksh, long kst, long vsh, long vst,
                                 long ost, float scale, int threads) {
    if (hkv <= 0 || h % hkv || h / hkv > MAXG || n <= 0 || s < n || (d != 64 && d != 128)) return 1;
    size_t bytes = (size_t)hkv * ((s + KB - 1) / KB) * d * KB * sizeof(float);
    float *kt = (float *)aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!kt) return 2;
    if (d == 64) {
        transpose_keys<64>(k, kt, hkv, s, ksh, kst, threads);
        attend<64>(q, kt, v, out, h, hkv, n, s, qst, vsh, vst, ost, scale, threads);
    } else {
        transpose_keys<128>(k, kt, hkv, s, ksh, kst, threads);
        attend<128>(q, kt, v, out, h, hkv, n, s, qst, vsh, vst, ost, scale, threads);
    }
    free(kt);
    return 0;
}
