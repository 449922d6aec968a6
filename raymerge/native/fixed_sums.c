/* The float64 reductions of raymerge's SLERP family in slerp.py's fixed order, compiled.
 *
 * For each chunk of `chunk` consecutive elements (the last one may be shorter) and each pair
 * (i, j) of inputs, the sum of x_i[k] * x_j[k] in float64: the products of the chunk's first and
 * second halves added pairwise (an odd last element added to the first), then pairwise halving
 * (element k plus element k + n/2, an odd last element added to the first) until one is left.
 * That is slerp.py's order, step for step: every product and every addition is one IEEE 754
 * float64 operation (built with -ffp-contract=off: never a fused multiply-add), so these sums
 * are bit-identical to the torch code's on any machine, and independent of vector width.
 *
 * dtype: 0 float64, 1 float32, 2 bfloat16 (its 16 bits). Inputs are contiguous.
 * out: npairs x nchunks float64, pair-major. scratch: npairs * max(1, chunk / 2) float64.
 * widened: ninputs * chunk float64, used only by a chunk whose size is not a multiple of 8.
 */
#include <stdint.h>
#include <string.h>

static inline double load(const void *p, int dtype, int64_t k) {
    if (dtype == 0) return ((const double *)p)[k];
    if (dtype == 1) return (double)((const float *)p)[k];
    uint32_t bits = (uint32_t)((const uint16_t *)p)[k] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return (double)f;
}

/* Converts n elements starting at k0 into dst as float64 (exact for every supported dtype). */
static void widen(const void *p, int dtype, int64_t k0, int64_t n, double *dst) {
    if (dtype == 0) { memcpy(dst, (const double *)p + k0, (size_t)n * sizeof(double)); return; }
    if (dtype == 1) { const float *s = (const float *)p + k0; for (int64_t k = 0; k < n; k++) dst[k] = (double)s[k]; return; }
    for (int64_t k = 0; k < n; k++) dst[k] = load(p, dtype, k0 + k);
}

static double halve(double *s, int64_t n) {
    while (n > 1) {
        int64_t h = n / 2;
        for (int64_t k = 0; k < h; k++) s[k] = s[k] + s[k + h];
        if (n % 2) s[0] = s[0] + s[2 * h];
        n = h;
    }
    return s[0];
}

/* The first three levels at once, for a chunk of m elements with m % 8 == 0 (no odd element on
 * the way): s[k] = ((p[k] + p[k+h]) + (p[k+q] + p[k+q+h])) + ((p[k+r] + p[k+r+h]) + (p[k+r+q] + p[k+r+q+h]))
 * with h = m/2, q = h/2, r = q/2 and p the products: what the three separate levels compute. */
#define LEVELS3(NAME, T, LOAD)                                                                   \
static void NAME(const T *x, const T *y, int64_t m, double *s) {                                \
    int64_t h = m / 2, q = h / 2, r = q / 2;                                                    \
    for (int64_t k = 0; k < r; k++) {                                                           \
        double p0 = LOAD(x, k) * LOAD(y, k), p1 = LOAD(x, k + h) * LOAD(y, k + h);              \
        double p2 = LOAD(x, k + q) * LOAD(y, k + q), p3 = LOAD(x, k + q + h) * LOAD(y, k + q + h); \
        double p4 = LOAD(x, k + r) * LOAD(y, k + r), p5 = LOAD(x, k + r + h) * LOAD(y, k + r + h); \
        double p6 = LOAD(x, k + r + q) * LOAD(y, k + r + q);                                    \
        double p7 = LOAD(x, k + r + q + h) * LOAD(y, k + r + q + h);                            \
        s[k] = ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7));                              \
    }                                                                                           \
}

static inline double load_f64(const double *p, int64_t k) { return p[k]; }
static inline double load_f32(const float *p, int64_t k) { return (double)p[k]; }
static inline double load_bf16(const uint16_t *p, int64_t k) {
    uint32_t bits = (uint32_t)p[k] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return (double)f;
}
LEVELS3(levels3_f64, double, load_f64)
LEVELS3(levels3_f32, float, load_f32)
LEVELS3(levels3_bf16, uint16_t, load_bf16)

/* inputs: ninputs pointers of n elements; pairs: npairs (i, j) index pairs. */
int raymerge_pair_sums(const void *const *inputs, int ninputs, int dtype, int64_t n, int64_t chunk,
                       const int32_t *pairs, int npairs, double *out, double *scratch, double *widened) {
    if (n <= 0 || chunk <= 0 || dtype < 0 || dtype > 2 || ninputs < 1) return 1;
    int64_t nchunks = (n + chunk - 1) / chunk;
    int64_t hmax = chunk / 2 > 1 ? chunk / 2 : 1;
    for (int64_t c = 0; c < nchunks; c++) {
        int64_t k0 = c * chunk;
        int64_t m = n - k0 < chunk ? n - k0 : chunk;
        int64_t h = m / 2 > 1 ? m / 2 : 1;
        if (m % 8 == 0) {
            for (int p = 0; p < npairs; p++) {
                double *s = scratch + (int64_t)p * hmax;
                const void *x = inputs[pairs[2 * p]], *y = inputs[pairs[2 * p + 1]];
                if (dtype == 0) levels3_f64((const double *)x + k0, (const double *)y + k0, m, s);
                else if (dtype == 1) levels3_f32((const float *)x + k0, (const float *)y + k0, m, s);
                else levels3_bf16((const uint16_t *)x + k0, (const uint16_t *)y + k0, m, s);
                out[(int64_t)p * nchunks + c] = halve(s, m / 8);
            }
            continue;
        }
        /* widened: ninputs x chunk float64 of this chunk's elements */
        for (int i = 0; i < ninputs; i++) widen(inputs[i], dtype, k0, m, widened + (int64_t)i * chunk);
        for (int p = 0; p < npairs; p++) {
            const double *x = widened + (int64_t)pairs[2 * p] * chunk;
            const double *y = widened + (int64_t)pairs[2 * p + 1] * chunk;
            double *s = scratch + (int64_t)p * hmax;
            for (int64_t k = 0; k < h; k++) s[k] = x[k] * y[k];
            if (m > 1) for (int64_t k = 0; k < h; k++) s[k] = s[k] + x[h + k] * y[h + k];
            if (m > 2 && m % 2) s[0] = s[0] + x[2 * h] * y[2 * h];
            out[(int64_t)p * nchunks + c] = halve(s, h);
        }
    }
    return 0;
}
