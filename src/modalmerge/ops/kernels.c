/* modalmerge's fused CPU kernels: TIES and task arithmetic over raw (bfloat16, float16 or
 * float32) checkpoint values, and the histograms of TIES's exact per-tensor selection.
 *
 * Built with ckernels.c (the Python wrapper) into the extension module modalmerge.ops.ckernels
 * when the package is built or installed (setup.py); ops/fused.py calls it on pieces of a block,
 * which its threads take as each gets free.
 * Each kernel is element-wise (the histograms are integer counts), so results do not depend on
 * how a block is split. Per element, a kernel does torch's float32 operations in torch's order
 * (sums over the models in model order; built without -ffast-math and without fused
 * multiply-adds), so it gives the bits of the same operations written in torch; the eager
 * kernels, which sum the stack with torch's reductions, agree with it to float rounding.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"

#define TILE 1024

#if defined(__GNUC__) && !defined(__clang__)
/* gcc's -O3 unroll-and-jam merged two models' passes over the elements into one loop that it
 * then left scalar (seen with perf annotate: the bfloat16 disjoint mean ran 6x slower); loop
 * interchange, which would put the loop over the models innermost, is off for the same reason */
#pragma GCC optimize("no-loop-unroll-and-jam", "no-loop-interchange")
#endif
#define ALWAYS static inline __attribute__((always_inline))

/* Runtime CPU dispatch: the build flags are portable (the baseline instruction set), and gcc
 * builds each hot loop once more for x86-64-v3 (AVX2, F16C) and x86-64-v4 (AVX-512 F/BW/DQ/VL),
 * one of which glibc picks when the module loads (target_clones, an ifunc: gcc >= 12, x86-64,
 * glibc). Measured on an AVX-512 machine (scripts/time_kernels.py, [8, 4M] bfloat16): the v4
 * loops as fast as -march=native's and up to 3x faster than the baseline's; float16 5-15x
 * (F16C converts in hardware). Elsewhere, or built with -DMM_NO_DISPATCH, baseline code only. setup.py builds with -fno-trapping-math:
 * without AVX-512's masks gcc otherwise keeps a loop scalar where it would compute a float
 * operation that the source computes under a condition (the disjoint mean ran 35x slower);
 * the values are the same (no operation changes, only which are computed and then unused). */
#if !defined(MM_NO_DISPATCH) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 &&               \
    defined(__x86_64__) && defined(__GLIBC__)
#define MM_DISPATCH 1
#define HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HOT
#endif

enum { BF16 = MM_BF16, F16 = MM_F16, F32 = MM_F32 }; /* the codes ops/fused.py passes */
enum { MEAN = MM_MEAN, SUM = MM_SUM, MAX = MM_MAX };

ALWAYS float load(int dtype, const void *p, int64_t i) {
    if (dtype == BF16) {
        uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    if (dtype == F16)
        return (float)((const _Float16 *)p)[i];
    return ((const float *)p)[i];
}

ALWAYS uint32_t bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* TIES's trim: keep |d| >= threshold (torch.where(d.abs() >= thr, d, 0.0)) */
ALWAYS float trim(float d, float threshold) { return fabsf(d) >= threshold ? d : 0.0f; }

ALWAYS int64_t tile_len(int64_t s, int64_t n) { return n - s < TILE ? n - s : TILE; }


/* Models are folded GROUP at a time, each group's size a compile-time constant (one function
 * per size, picked from the tables below), so an element's values stay in registers across the
 * models and the loop over the elements vectorises: 2x faster than folding one model at a time
 * into L1 accumulators.
 * Merges of more than GROUP models carry the accumulators in `out` (and `count`) between
 * groups, in model order as before. */
#define GROUP MM_GROUP

/* out = sum_t w_t * trim(m_t - base, thr_t) */
ALWAYS void trimmed_total_group(int dtype, int G, const void *base, const void *const *models, const float *thr,
                                const float *w, int first, float *restrict out, int64_t n) {
    const void *p[GROUP];
    float th[GROUP], wt[GROUP];
    for (int t = 0; t < G; t++)
        p[t] = models[t], th[t] = thr[t], wt[t] = w[t];
    for (int64_t i = 0; i < n; i++) {
        float b = load(dtype, base, i);
        float v = trim(load(dtype, p[0], i) - b, th[0]) * wt[0];
        float acc = first ? v : out[i] + v;
#pragma GCC unroll 8
        for (int t = 1; t < G; t++)
            acc = acc + trim(load(dtype, p[t], i) - b, th[t]) * wt[t];
        out[i] = acc;
    }
}

/* gamma = sign(total) (0 -> tie), then the disjoint mean (weighted by w), sum or max of the
 * trimmed, weighted task vectors that agree with gamma, times gamma. Between groups `out`
 * carries the kept sum (or max) and `count` the weights counted. */
ALWAYS void disjoint_group(int dtype, int aggregate, int G, const void *base, const void *const *models,
                           const float *thr, const float *w, const float *total, float tie, int first, int last,
                           float *restrict count, float *restrict out, int64_t n) {
    const void *p[GROUP];
    float th[GROUP], wt[GROUP];
    for (int t = 0; t < G; t++)
        p[t] = models[t], th[t] = thr[t], wt[t] = w[t];
    for (int64_t i = 0; i < n; i++) {
        float b = load(dtype, base, i), x = total[i];
        float gamma = x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : tie);
        float kept = first ? 0.0f : out[i], counted = first ? 0.0f : count[i];
#pragma GCC unroll 8
        for (int t = 0; t < G; t++) {
            float a = trim(load(dtype, p[t], i) - b, th[t]) * wt[t] * gamma;
            a = a > 0.0f ? a : 0.0f;
            if (aggregate == MAX)
                kept = a > kept ? a : kept;
            else
                kept = kept + a;
            if (aggregate == MEAN)
                counted = counted + (a > 0.0f ? wt[t] : 0.0f);
        }
        if (!last) {
            out[i] = kept;
            if (aggregate == MEAN)
                count[i] = counted;
        } else if (aggregate == MEAN) {
            out[i] = gamma * kept / (counted == 0.0f ? 1.0f : counted);
        } else {
            out[i] = gamma * kept;
        }
    }
}

/* out = sum_t w_t (m_t - base), in model order */
ALWAYS void weighted_delta_sum_group(int dtype, int G, const void *base, const void *const *models, const float *w,
                                     int first, float *restrict out, int64_t n) {
    const void *p[GROUP];
    float wt[GROUP];
    for (int t = 0; t < G; t++)
        p[t] = models[t], wt[t] = w[t];
    for (int64_t i = 0; i < n; i++) {
        float b = load(dtype, base, i);
        float v = (load(dtype, p[0], i) - b) * wt[0];
        float acc = first ? v : out[i] + v;
#pragma GCC unroll 8
        for (int t = 1; t < G; t++)
            acc = acc + (load(dtype, p[t], i) - b) * wt[t];
        out[i] = acc;
    }
}

/* TIES's exact per-tensor selection works on flagged keys, which sort as the values do:
 * key = (top 15 bits of |m - base|'s float32 pattern) << 1 | (its low 16 bits are not all zero).
 * It finds the k-th largest key by counting keys at or above a few cuts at a time (a vectorised
 * compare-and-add) instead of a histogram: a scattered increment per element costs ~1 ns and
 * does not get faster on a second thread of this machine; a compare costs ~0.03 ns a cut. */

/* #{i < len : keys[i] >= cut} for len <= TILE, in 16-bit lanes (32 to a 512-bit vector).
 * Not inlined: inside the loop over the cuts, gcc vectorised across the (few) cuts instead. */
static HOT __attribute__((noinline)) uint32_t at_least(const uint16_t *keys, int64_t len, uint16_t cut) {
    uint16_t count = 0;
    for (int64_t i = 0; i < len; i++)
        count += keys[i] >= cut;
    return count;
}

/* counts[c] += #{i < len : keys[i] >= cuts[c]} for each of the m cuts (a cut may be 65536: none) */
ALWAYS void count_tile(const uint16_t *keys, int64_t len, const uint32_t *cuts, int m, int64_t *counts) {
    for (int c = 0; c < m; c++)
        counts[c] += cuts[c] > 0xFFFF ? 0 : at_least(keys, len, (uint16_t)cuts[c]);
}

/* keys[i] = the flagged key of |m - base|; and, while a tile of keys is in L1, the counts of
 * count_at_least for the m cuts */
ALWAYS void magnitude_keys_t(int dtype, const void *base, const void *model, int64_t n, uint16_t *restrict keys,
                             const uint32_t *cuts, int m, int64_t *counts) {
    for (int64_t s = 0; s < n; s += TILE) {
        int64_t len = tile_len(s, n);
        for (int64_t i = s; i < s + len; i++) {
            uint32_t u = bits(fabsf(load(dtype, model, i) - load(dtype, base, i)));
            keys[i] = (uint16_t)(((u >> 16) << 1) | ((u & 0xFFFFu) != 0));
        }
        count_tile(keys + s, len, cuts, m, counts);
    }
}

/* counts[c] += #{i : keys[i] >= cuts[c]}, a tile at a time (each read from memory once) */
HOT void mm_count_at_least(const uint16_t *keys, int64_t n, const uint32_t *cuts, int m, int64_t *counts) {
    for (int64_t s = 0; s < n; s += TILE)
        count_tile(keys + s, tile_len(s, n), cuts, m, counts);
}

/* counts[low 16 bits] += 1 for the elements whose |m - base| has top 15 bits == high: the
 * second level of the radix select, inside the boundary bin */
ALWAYS void boundary_low_counts_t(int dtype, const void *base, const void *model, int64_t n, uint32_t high,
                                  int64_t *counts) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = bits(fabsf(load(dtype, model, i) - load(dtype, base, i)));
        if ((u >> 16) == high)
            counts[u & 0xFFFFu]++;
    }
}

/* -- the exported entry points --------------------------------------------------------------
 * One small function per (dtype, aggregate, group size), each a specialised loop; the entry
 * points walk the groups and pick them from tables. (Inlined into one big function instead,
 * gcc left most of the loops scalar.) */

#define SIZES(X, D) X(D, 1) X(D, 2) X(D, 3) X(D, 4) X(D, 5) X(D, 6) X(D, 7) X(D, 8)
#define DTYPES(X) SIZES(X, BF16) SIZES(X, F16) SIZES(X, F32)

typedef void (*total_fn)(const void *, const void *const *, const float *, const float *, int, float *, int64_t);
typedef void (*disjoint_fn)(const void *, const void *const *, const float *, const float *, const float *, float,
                            float *, int64_t);
typedef void (*carried_fn)(const void *, const void *const *, const float *, const float *, const float *, float,
                           int, int, float *, float *, int64_t);
typedef void (*delta_sum_fn)(const void *, const void *const *, const float *, int, float *, int64_t);

#define DEFINE(D, K)                                                                                          \
    static HOT void total_##D##_##K(const void *base, const void *const *m, const float *thr, const float *w, \
                                    int first, float *out, int64_t n) {                                       \
        if (first)                                                                                            \
            trimmed_total_group(D, K, base, m, thr, w, 1, out, n);                                            \
        else                                                                                                  \
            trimmed_total_group(D, K, base, m, thr, w, 0, out, n);                                            \
    }                                                                                                         \
    static HOT void delta_sum_##D##_##K(const void *base, const void *const *m, const float *w, int first,    \
                                        float *out, int64_t n) {                                              \
        if (first)                                                                                            \
            weighted_delta_sum_group(D, K, base, m, w, 1, out, n);                                            \
        else                                                                                                  \
            weighted_delta_sum_group(D, K, base, m, w, 0, out, n);                                            \
    }                                                                                                         \
    DEFINE_DISJOINT(D, K, MEAN) DEFINE_DISJOINT(D, K, SUM) DEFINE_DISJOINT(D, K, MAX)
/* disjoint merges of up to GROUP models: one group, nothing carried */
#define DEFINE_DISJOINT(D, K, A)                                                                              \
    static HOT void disjoint_##A##_##D##_##K(const void *base, const void *const *m, const float *thr,        \
                                             const float *w, const float *total, float tie, float *out,       \
                                             int64_t n) {                                                     \
        disjoint_group(D, A, K, base, m, thr, w, total, tie, 1, 1, 0, out, n);                                \
    }
/* more models: full groups of GROUP, the last one padded with lanes that add exact zeros (the
 * base as model, threshold +inf, weight 0). first/last are compile-time constants in each
 * loop, here as for one group, which matters: gcc's AVX-512 code loads the carried `count`
 * under a mask even where no lane needs it (the bfloat16 mean of one group ran 1.7x slower
 * with run-time flags when `count` was a 0-element tensor's pointer), and without AVX-512's
 * masks a loop that may or may not load and add a carried value stayed scalar (the baseline
 * and AVX2 trimmed total 7-10x slower). The same goes for `first` in total_ and delta_sum_. */
#define DEFINE_CARRIED(D, A)                                                                                  \
    static HOT void carried_##A##_##D(const void *base, const void *const *m, const float *thr, const float *w, \
                                      const float *total, float tie, int first, int last, float *count,       \
                                      float *out, int64_t n) {                                                \
        if (first)                                                                                            \
            disjoint_group(D, A, GROUP, base, m, thr, w, total, tie, 1, 0, count, out, n);                    \
        else if (last)                                                                                        \
            disjoint_group(D, A, GROUP, base, m, thr, w, total, tie, 0, 1, count, out, n);                    \
        else                                                                                                  \
            disjoint_group(D, A, GROUP, base, m, thr, w, total, tie, 0, 0, count, out, n);                    \
    }
#define DEFINE_ALL_CARRIED(D) DEFINE_CARRIED(D, MEAN) DEFINE_CARRIED(D, SUM) DEFINE_CARRIED(D, MAX)
DEFINE_ALL_CARRIED(BF16) DEFINE_ALL_CARRIED(F16) DEFINE_ALL_CARRIED(F32)
DTYPES(DEFINE)

#define TOTAL_ENTRY(D, K) total_##D##_##K,
#define DELTA_SUM_ENTRY(D, K) delta_sum_##D##_##K,
#define MEAN_ENTRY(D, K) disjoint_MEAN_##D##_##K,
#define SUM_ENTRY(D, K) disjoint_SUM_##D##_##K,
#define MAX_ENTRY(D, K) disjoint_MAX_##D##_##K,
#define TABLE(E) {{SIZES(E, BF16)}, {SIZES(E, F16)}, {SIZES(E, F32)}}
static const total_fn TOTAL[3][GROUP] = TABLE(TOTAL_ENTRY);
static const delta_sum_fn DELTA_SUM[3][GROUP] = TABLE(DELTA_SUM_ENTRY);
static const disjoint_fn DISJOINT[3][3][GROUP] = {TABLE(MEAN_ENTRY), TABLE(SUM_ENTRY), TABLE(MAX_ENTRY)};
#define CARRIED_ROW(A) {carried_##A##_BF16, carried_##A##_F16, carried_##A##_F32}
static const carried_fn CARRIED[3][3] = {CARRIED_ROW(MEAN), CARRIED_ROW(SUM), CARRIED_ROW(MAX)};

ALWAYS int group_size(int T, int g0) { return T - g0 < GROUP ? T - g0 : GROUP; }

void mm_trimmed_total(int dtype, const void *base, const void *const *models, int T, const float *thr,
                      const float *w, float *out, int64_t n) {
    for (int g0 = 0; g0 < T; g0 += GROUP)
        TOTAL[dtype][group_size(T, g0) - 1](base, models + g0, thr + g0, w + g0, g0 == 0, out, n);
}

/* count: scratch of n floats, used when T > GROUP */
void mm_disjoint(int dtype, int aggregate, const void *base, const void *const *models, int T, const float *thr,
                 const float *w, const float *total, float tie, float *count, float *out, int64_t n) {
    if (T <= GROUP) {
        DISJOINT[aggregate][dtype][T - 1](base, models, thr, w, total, tie, out, n);
        return;
    }
    for (int g0 = 0; g0 < T; g0 += GROUP) {
        const void *m[GROUP];
        float th[GROUP], wt[GROUP];
        for (int t = 0; t < GROUP; t++) {
            int real = g0 + t < T;
            m[t] = real ? models[g0 + t] : base;
            th[t] = real ? thr[g0 + t] : INFINITY;
            wt[t] = real ? w[g0 + t] : 0.0f;
        }
        CARRIED[aggregate][dtype](base, m, th, wt, total, tie, g0 == 0, g0 + GROUP >= T, count, out, n);
    }
}

void mm_weighted_delta_sum(int dtype, const void *base, const void *const *models, int T, const float *w,
                           float *out, int64_t n) {
    for (int g0 = 0; g0 < T; g0 += GROUP)
        DELTA_SUM[dtype][group_size(T, g0) - 1](base, models + g0, w + g0, g0 == 0, out, n);
}

#define BY_DTYPE(dtype, call)                                                                                 \
    switch (dtype) {                                                                                          \
    case BF16: call(BF16); break;                                                                             \
    case F16: call(F16); break;                                                                               \
    default: call(F32); break;                                                                                \
    }

HOT void mm_magnitude_keys(int dtype, const void *base, const void *model, int64_t n, uint16_t *keys,
                       const uint32_t *cuts, int m, int64_t *counts) {
#define CALL(D) magnitude_keys_t(D, base, model, n, keys, cuts, m, counts)
    BY_DTYPE(dtype, CALL)
#undef CALL
}

HOT void mm_boundary_low_counts(int dtype, const void *base, const void *model, int64_t n, uint32_t high,
                            int64_t *counts) {
#define CALL(D) boundary_low_counts_t(D, base, model, n, high, counts)
    BY_DTYPE(dtype, CALL)
#undef CALL
}

const char *mm_instruction_set(void) {
#ifdef MM_DISPATCH
    /* target_clones' order of preference */
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4"))
        return "x86-64-v4";
    if (__builtin_cpu_supports("x86-64-v3"))
        return "x86-64-v3";
#endif
    return "baseline";
}
