/* The entry points of kernels.c, which ckernels.c wraps for Python (one header, so the compiler
 * checks both sides against the same signatures). Each works on elements [0, n) of its arrays;
 * the dtype and aggregate codes are ops/fused.py's. */
#ifndef MODALMERGE_KERNELS_H
#define MODALMERGE_KERNELS_H

#include <stdint.h>

enum { MM_BF16 = 0, MM_F16 = 1, MM_F32 = 2 };
enum { MM_MEAN = 0, MM_SUM = 1, MM_MAX = 2 };
#define MM_GROUP 8 /* models folded per pass; mm_disjoint's `count` is used above it */

void mm_trimmed_total(int dtype, const void *base, const void *const *models, int T, const float *thr,
                      const float *w, float *out, int64_t n);
void mm_disjoint(int dtype, int aggregate, const void *base, const void *const *models, int T, const float *thr,
                 const float *w, const float *total, float tie, float *count, float *out, int64_t n);
void mm_weighted_delta_sum(int dtype, const void *base, const void *const *models, int T, const float *w,
                           float *out, int64_t n);
void mm_magnitude_keys(int dtype, const void *base, const void *model, int64_t n, uint16_t *keys,
                       const uint32_t *cuts, int m, int64_t *counts);
void mm_count_at_least(const uint16_t *keys, int64_t n, const uint32_t *cuts, int m, int64_t *counts);
void mm_boundary_low_counts(int dtype, const void *base, const void *model, int64_t n, uint32_t high,
                            int64_t *counts);

/* the instruction set the kernels run with on this CPU: "x86-64-v4" (AVX-512), "x86-64-v3"
 * (AVX2) or "baseline" (always, where kernels.c was built without runtime dispatch) */
const char *mm_instruction_set(void);

#endif
