/* One-pass fake quantization on the CPU: the loops behind edgequant/quantization/fused_cpu.py.
 *
 * Each loop computes what the eager passes of edgequant/quantization/affine.py compute, value for value: a true
 * IEEE division by the scale (no reciprocal), round half to even (nearbyintf in the default rounding mode), and
 * clamps that let a NaN through as torch.clamp does. It is compiled without fast-math and without contraction
 * into fused multiply-adds, so the compiler keeps each operation as written while it vectorises the loops; with
 * -fno-trapping-math, so that it may evaluate both sides of a select (values are unchanged: no code here reads
 * the floating-point exception flags). Comparisons combine with & rather than &&, which would be a branch.
 * Loops run on `threads` OpenMP threads (torch's own pool, found by soname when loaded after torch) where the
 * tensor is long enough to pay for waking them.
 */
#include <math.h>
#include <stdint.h>

#define PARALLEL_FROM 65536 /* two of ATen's grains: below this one thread is faster */

static inline float clamp_keeping_nan(float v, float low, float high) {
    v = low > v ? low : v; /* a NaN fails both comparisons and passes through */
    return high < v ? high : v;
}

static inline int team(int64_t n, int threads) { return n < PARALLEL_FROM ? 1 : threads; }

/* out = clamp(round(clamp(x, floor_, ceiling) / scale), low, high) * scale; out may be x. Where in_range is not
 * NULL (training without range learning) it also gets the straight-through mask: 1 where the rounded value lies on
 * [low, high], 0 where it was clipped or is NaN (a bool tensor's bytes), as the eager forward keeps it. */
void quantize_dequantize(const float *x, float *out, int64_t n, float scale, float low, float high, float floor_,
                         float ceiling, int threads, unsigned char *in_range) {
#pragma omp parallel for num_threads(team(n, threads)) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float rounded = nearbyintf(clamp_keeping_nan(x[i], floor_, ceiling) / scale);
        if (in_range) /* loop-invariant: the compiler makes a loop with the store and one without */
            in_range[i] = (rounded >= low) & (rounded <= high);
        out[i] = clamp_keeping_nan(rounded, low, high) * scale;
    }
}

/* The straight-through input gradient from the forward's mask: grad where in_range, else 0. A select, where
 * torch.where branches on each byte: 19 ms against 8 ms here for 12.8 M values with 80 % in range, 2 threads. */
void straight_through_grad(const unsigned char *in_range, const float *grad, float *grad_in, int64_t n,
                           int threads) {
#pragma omp parallel for num_threads(team(n, threads)) schedule(static)
    for (int64_t i = 0; i < n; i++)
        grad_in[i] = in_range[i] ? grad[i] : 0.0f;
}

/* The straight-through input gradient (grad where round(x / scale) lies on [low, high], else 0) and (LSQ,
 * Esser et al. 2020) sums[0] = sum(grad * d out / d scale), where d out / d scale is round(x / s) - x / s in range
 * and the grid's end where clipped, and sums[1] = the sum of the gradient over clipped values (they move with the
 * offset). Sums accumulate in double, in SIMD lanes (`omp simd` lets the compiler split the reduction). */
void range_learning_grads(const float *x, const float *grad, float *grad_in, int64_t n, float scale, float low,
                          float high, int threads, double *sums) {
    double scale_sum = 0.0, clipped_sum = 0.0;
#pragma omp parallel for simd num_threads(team(n, threads)) schedule(static) reduction(+ : scale_sum, clipped_sum)
    for (int64_t i = 0; i < n; i++) {
        float scaled = x[i] / scale;
        float rounded = nearbyintf(scaled);
        int in_range = (rounded >= low) & (rounded <= high);
        float derivative = in_range ? rounded - scaled : clamp_keeping_nan(rounded, low, high);
        grad_in[i] = in_range ? grad[i] : 0.0f;
        scale_sum += (double)grad[i] * (double)derivative;
        clipped_sum += in_range ? 0.0 : (double)grad[i];
    }
    sums[0] = scale_sum;
    sums[1] = clipped_sum;
}
