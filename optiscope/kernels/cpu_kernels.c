/* Adam / AdamW step for float32 CPU tensors, with the monitor's statistics in the same pass.
 *
 * torch's fused CPU Adam reads and writes each tensor once; computing the statistics with
 * separate torch reductions read them up to nine more times, even chunked in cache. Here each
 * element is loaded once, updated, and added to per-block sums.
 *
 * Arithmetic per element is float32 in the order of torch.optim's single-tensor Adam:
 *   g <- -g if maximize;  theta <- theta (1 - lr wd) (AdamW)  or  g <- g + wd theta (Adam)
 *   m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  vmax <- max(vmax, v) if amsgrad
 *   theta <- theta - step_size m / (sqrt(v) / bc2_sqrt + eps)
 * Compiled with -ffp-contract=off and without -ffast-math, so the result of an element does not
 * depend on vectorisation, threads, or whether statistics are taken.
 *
 * Statistics (when `stats` is not NULL): per block of BLOCK elements, 8 doubles:
 *   sum g^2, max |g| over finite g, count of non-finite g, sum theta_before^2,
 *   sum theta_after^2, sum (theta_after - theta_before)^2, sum m^2, sum v^2
 * Blocks are independent, so the caller adds them in a fixed order: the same inputs give the
 * same statistics whatever the thread count.
 */

#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 4096
#define NSTATS 8

/* Sums of squares are taken in float lanes (twice the vector width of double) and added in
 * double. A square outside float's range breaks that: gradients of 1e30 summed to inf, of 1e-30
 * to 0. A lane sum below 1e-25 (each square that underflowed adds at most 1.2e-38, so 4096 of
 * them stay under 5e-10 of it) or above 3e38 (one may have overflowed) is taken again in
 * double: rare, and only for that block or piece. */
#define OUT_OF_FLOAT_RANGE(s) (!((s) >= 1e-25 && (s) <= 3.0e38))

static __attribute__((noinline)) double sq_wide(const float *restrict x, int64_t n) {
    double s = 0.0;
#pragma omp simd reduction(+:s)
    for (int64_t i = 0; i < n; i++) s += (double)x[i] * (double)x[i];
    return s;
}

/* One element: the update, shared by both block functions so their arithmetic is one text.
 * Op for op as torch.optim's single-tensor Adam: m.lerp_(g, 1 - b1) (torch's lerp: a + w (b - a)
 * for w < 0.5, else b - (b - a)(1 - w)), v.mul_(b2).addcmul_(g, g, value=1 - b2), and the
 * constants 1 - b1, 1 - b2, 1 - lr wd rounded once from double, as torch does. */
#define ADAM_ELEMENT(i, LERP_LOW)                                                                \
    float gi = g[i];                                                                             \
    const float p0 = p[i];                                                                       \
    if (maximize) gi = -gi;                                                                      \
    float pi = p0;                                                                               \
    if (wd != 0.0f) {                                                                            \
        if (decoupled) pi = pi * decay;                                                          \
        else gi = gi + wd * pi;                                                                  \
    }                                                                                            \
    const float mi = LERP_LOW ? m[i] + one_minus_b1 * (gi - m[i])                                \
                              : gi - (gi - m[i]) * lerp_rest;                                    \
    const float vi = v[i] * beta2 + (one_minus_b2 * gi) * gi;                                    \
    float vv = vi;                                                                               \
    if (amsgrad) {                                                                               \
        vv = vmax[i] > vi ? vmax[i] : vi;                                                        \
        vmax[i] = vv;                                                                            \
    }                                                                                            \
    const float denom = sqrtf(vv) / bc2_sqrt + eps;                                              \
    pi = pi + neg_step_size * (mi / denom);                                                      \
    p[i] = pi;                                                                                   \
    m[i] = mi;                                                                                   \
    v[i] = vi;

/* The hyperparameters of a step, as plain scalar parameters: passed as a struct, gcc 12 no
 * longer vectorised the loop. */
#define HYPER_PARAMS                                                                             \
    float decay, float one_minus_b1, float lerp_rest, float beta2, float one_minus_b2,           \
        float eps, float wd, float neg_step_size, float bc2_sqrt, int lerp_low
#define HYPER_ARGS                                                                               \
    decay, one_minus_b1, lerp_rest, beta2, one_minus_b2, eps, wd, neg_step_size, bc2_sqrt, lerp_low

/* The update of one block; the statistics variant below runs this same code. Not inlined:
 * inlined into OpenMP's outlined loop body, the pointers lose `restrict` and gcc 12 stopped
 * vectorising (the step ran at 1/5 of torch's fused kernel). */
static __attribute__((noinline)) void block_update_plain(
    float *restrict p, const float *restrict g, float *restrict m, float *restrict v,
    float *restrict vmax, int64_t n, HYPER_PARAMS, const int decoupled, const int amsgrad,
    const int maximize) {
    /* lerp's branch as a constant of each loop, not a ternary inside it */
    if (lerp_low) {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) {
            ADAM_ELEMENT(i, 1)
        }
    } else {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) {
            ADAM_ELEMENT(i, 0)
        }
    }
}

/* ---------------------------------------------------------------- dynamic range, in the pass
 * With `ranges`, the statistics variant also counts the dynamic range of g, θ⁺ − θ⁻ and v over
 * every element (kernels/ranges.py has the layout and the torch reference): per quantity, a
 * histogram of the biased float32 exponent of |x| (256 fields) and, for each of the NCUTS
 * thresholds `cuts` (bit patterns of |x|, from kernels/ranges.py), how many |x| lie above it.
 * Counted per PIECE right after its update, while it is in L1: the threshold counts in vector
 * lanes, the histogram as 4 interleaved sub-histograms (consecutive entries share a field, and
 * one counter per field made every increment wait for the previous one). */
#define NCUTS 9
#define RANGE_FIELDS 256
#define RANGE_OUT (RANGE_FIELDS + NCUTS)          /* per quantity, in the output */
#define RANGE_WS (4 * RANGE_FIELDS + NCUTS)       /* per quantity, in a thread's workspace */

static inline uint32_t abs_bits(float x) {
    uint32_t b;
    memcpy(&b, &x, sizeof b);
    return b & 0x7FFFFFFFu;
}

__attribute__((noinline)) void range_count(const float *restrict x, int64_t n,
                                            const int32_t *restrict cuts,
                                            uint64_t *restrict ws) {
    const uint32_t c0 = cuts[0], c1 = cuts[1], c2 = cuts[2], c3 = cuts[3], c4 = cuts[4],
                   c5 = cuts[5], c6 = cuts[6], c7 = cuts[7], c8 = cuts[8];
    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0, a8 = 0;
#pragma omp simd reduction(+:a0, a1, a2, a3, a4, a5, a6, a7, a8)
    for (int64_t i = 0; i < n; i++) {
        const uint32_t b = abs_bits(x[i]);
        a0 += b > c0; a1 += b > c1; a2 += b > c2; a3 += b > c3; a4 += b > c4;
        a5 += b > c5; a6 += b > c6; a7 += b > c7; a8 += b > c8;
    }
    uint64_t *gt = ws + 4 * RANGE_FIELDS;
    gt[0] += a0; gt[1] += a1; gt[2] += a2; gt[3] += a3; gt[4] += a4;
    gt[5] += a5; gt[6] += a6; gt[7] += a7; gt[8] += a8;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        ws[abs_bits(x[i]) >> 23]++;
        ws[RANGE_FIELDS + (abs_bits(x[i + 1]) >> 23)]++;
        ws[2 * RANGE_FIELDS + (abs_bits(x[i + 2]) >> 23)]++;
        ws[3 * RANGE_FIELDS + (abs_bits(x[i + 3]) >> 23)]++;
    }
    for (; i < n; i++) ws[abs_bits(x[i]) >> 23]++;
}

/* A thread's workspace (3 quantities) added into one tensor's output (integers: the order of
 * the threads does not change the result). Not static, as range_count: MicroAdam's step
 * (cpu_microadam.c) counts with them too. */
void range_fold(const uint64_t *ws, uint64_t *out) {
    for (int q = 0; q < 3; q++) {
        const uint64_t *w = ws + q * RANGE_WS;
        uint64_t *o = out + q * RANGE_OUT;
        for (int f = 0; f < RANGE_FIELDS; f++)
            o[f] += w[f] + w[RANGE_FIELDS + f] + w[2 * RANGE_FIELDS + f] + w[3 * RANGE_FIELDS + f];
        for (int j = 0; j < NCUTS; j++) o[RANGE_FIELDS + j] += w[4 * RANGE_FIELDS + j];
    }
}

int64_t optiscope_range_cuts(void) { return NCUTS; }

/* The counts of one whole float32 array, added into `out` (RANGE_OUT counters): the extra pass of
 * a step made of torch ops, which has no pass of its own to count in (kernels/whole_ranges.py).
 * Pieces of RANGE_PIECE entries per thread (range_count's lane counters are int32). */
#define RANGE_PIECE 16384
void optiscope_range_count_f32(const float *x, int64_t n, const int32_t *cuts, uint64_t *out,
                               int nthreads) {
    if (n < 4 * RANGE_PIECE || nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads)
    {
        uint64_t ws[RANGE_WS];
        memset(ws, 0, sizeof ws);
#pragma omp for schedule(static)
        for (int64_t s = 0; s < n; s += RANGE_PIECE)
            range_count(x + s, n - s < RANGE_PIECE ? n - s : RANGE_PIECE, cuts, ws);
#pragma omp critical
        {
            for (int f = 0; f < RANGE_FIELDS; f++)
                out[f] += ws[f] + ws[RANGE_FIELDS + f] + ws[2 * RANGE_FIELDS + f]
                          + ws[3 * RANGE_FIELDS + f];
            for (int j = 0; j < NCUTS; j++) out[RANGE_FIELDS + j] += ws[4 * RANGE_FIELDS + j];
        }
    }
}

/* The update with the statistics, in one loop: each element's sums are taken from the registers
 * the update already holds, into OpenMP SIMD reduction lanes, over pieces of PIECE elements
 * (32 per lane of an 8-wide vector: the float sums stay as accurate as the statistics' tests
 * ask, 1e-5 relative against float64), added in double: no second pass over the elements and no
 * copy of theta, which an earlier form (sums before and after the update) needed.
 * The gradient's sums are of g as given (before maximize and L2 decay); max |g| skips a NaN and
 * is inf after an inf, which the caller reports as inf whenever the non-finite count is not 0. */
#define PIECE 256
#define STATS_ELEMENT(i, LERP_LOW)                                                               \
    ADAM_ELEMENT(i, LERP_LOW)                                                                    \
    const float g_raw = g[i], a = fabsf(g_raw), d = pi - p0;                                     \
    g_sq += g_raw * g_raw;                                                                       \
    top = a > top ? a : top;                                                                     \
    bad += (float)!(a <= 3.4028235e38f);                                                         \
    p0_sq += p0 * p0;                                                                            \
    p1_sq += pi * pi;                                                                            \
    d_sq += d * d;                                                                               \
    m_sq += mi * mi;                                                                             \
    v_sq += vi * vi;                                                                             \
    dbuf[i - s] = d;
#define STATS_LOOP(LERP_LOW)                                                                     \
    _Pragma("omp simd reduction(+:g_sq, bad, p0_sq, p1_sq, d_sq, m_sq, v_sq) reduction(max:top)") \
    for (int64_t i = s; i < end; i++) {                                                          \
        STATS_ELEMENT(i, LERP_LOW)                                                               \
    }

static inline __attribute__((always_inline)) void stats_loop(
    float *restrict p, const float *restrict g, float *restrict m, float *restrict v,
    float *restrict vmax, int64_t n, HYPER_PARAMS, const int decoupled, const int amsgrad,
    const int maximize, double *restrict out, uint64_t *restrict ranges,
    const int32_t *restrict cuts) {
    float dbuf[PIECE];  /* θ⁺ − θ⁻ of the piece, for the range counts */
    for (int k = 0; k < NSTATS; k++) out[k] = 0.0;
    for (int64_t s = 0; s < n; s += PIECE) {
        const int64_t end = n - s < PIECE ? n : s + PIECE;
        float g_sq = 0.0f, top = 0.0f, bad = 0.0f, p0_sq = 0.0f, p1_sq = 0.0f, d_sq = 0.0f,
              m_sq = 0.0f, v_sq = 0.0f;
        if (lerp_low) {
            STATS_LOOP(1)
        } else {
            STATS_LOOP(0)
        }
        /* again in double where a square left float's range (g, and θ, m, v after the
         * update, are still in memory; θ before it is not) */
        const int64_t len = end - s;
        const int finite = bad == 0.0f;
        out[0] += finite && top > 0.0f && OUT_OF_FLOAT_RANGE(g_sq) ? sq_wide(g + s, len) : g_sq;
        out[1] = top > out[1] ? top : out[1]; out[2] += bad; out[3] += p0_sq;
        out[4] += finite && OUT_OF_FLOAT_RANGE(p1_sq) ? sq_wide(p + s, len) : p1_sq;
        out[5] += d_sq;
        out[6] += finite && OUT_OF_FLOAT_RANGE(m_sq) ? sq_wide(m + s, len) : m_sq;
        out[7] += finite && OUT_OF_FLOAT_RANGE(v_sq) ? sq_wide(v + s, len) : v_sq;
        if (ranges) {
            range_count(g + s, len, cuts, ranges);
            range_count(dbuf, len, cuts, ranges + RANGE_WS);
            range_count(v + s, len, cuts, ranges + 2 * RANGE_WS);
        }
    }
}

/* One copy of the statistics loop per flag combination, the flags as constants: with them as
 * arguments gcc 12 left the loop scalar. */
#define STATS_VARIANT(D, A, M)                                                                   \
    static __attribute__((noinline)) void block_update_##D##A##M(                                \
        float *restrict p, const float *restrict g, float *restrict m, float *restrict v,        \
        float *restrict vmax, int64_t n, HYPER_PARAMS, double *restrict out,                    \
        uint64_t *restrict ranges, const int32_t *restrict cuts) {                               \
        stats_loop(p, g, m, v, vmax, n, HYPER_ARGS, D, A, M, out, ranges, cuts);                 \
    }
STATS_VARIANT(0, 0, 0) STATS_VARIANT(0, 0, 1) STATS_VARIANT(0, 1, 0) STATS_VARIANT(0, 1, 1)
STATS_VARIANT(1, 0, 0) STATS_VARIANT(1, 0, 1) STATS_VARIANT(1, 1, 0) STATS_VARIANT(1, 1, 1)

static inline __attribute__((always_inline)) void block_update(
    float *p, const float *g, float *m, float *v, float *vmax, int64_t n, HYPER_PARAMS,
    const int decoupled, const int amsgrad, const int maximize, double *out, uint64_t *ranges,
    const int32_t *cuts) {
#define CALL(D, A, M) block_update_##D##A##M(p, g, m, v, vmax, n, HYPER_ARGS, out, ranges, cuts)
    if (decoupled) {
        if (amsgrad) { if (maximize) CALL(1, 1, 1); else CALL(1, 1, 0); }
        else { if (maximize) CALL(1, 0, 1); else CALL(1, 0, 0); }
    } else {
        if (amsgrad) { if (maximize) CALL(0, 1, 1); else CALL(0, 1, 0); }
        else { if (maximize) CALL(0, 0, 1); else CALL(0, 0, 0); }
    }
#undef CALL
}

int64_t optiscope_block_size(void) { return BLOCK; }

static inline __attribute__((always_inline)) void run(
    float *p, const float *g, float *m, float *v, float *vmax, int64_t n, HYPER_PARAMS,
    const int decoupled, const int amsgrad, const int maximize, double *stats, uint64_t *ranges,
    const int32_t *cuts, int nthreads) {
    const int64_t nblocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel num_threads(nthreads) if (nblocks > 4)
    {
        /* each thread counts into its own workspace, added into `ranges` at the end */
        uint64_t ws[ranges ? 3 * RANGE_WS : 1];
        if (ranges) memset(ws, 0, sizeof ws);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nblocks; b++) {
            const int64_t start = b * BLOCK;
            const int64_t len = n - start < BLOCK ? n - start : BLOCK;
            float *vm = amsgrad ? vmax + start : 0;
            if (stats)
                block_update(p + start, g + start, m + start, v + start, vm, len, HYPER_ARGS,
                             decoupled, amsgrad, maximize, stats + b * NSTATS,
                             ranges ? ws : 0, cuts);
            else
                block_update_plain(p + start, g + start, m + start, v + start, vm, len,
                                   HYPER_ARGS, decoupled, amsgrad, maximize);
        }
        if (ranges) {
#pragma omp critical
            range_fold(ws, ranges);
        }
    }
}

/* One tensor. `stats`: NULL, or room for ceil(n / BLOCK) * NSTATS doubles; `ranges` (with
 * `stats` only): NULL, or 3 * RANGE_OUT zeroed counters the range counts of g, θ⁺ − θ⁻ and v
 * are added to (`cuts`: NCUTS bit patterns, ascending). Constants as torch
 * rounds them: decay = 1 - lr wd, one_minus_b1/b2 = 1 - beta, lerp_rest = 1 - one_minus_b1
 * (in float), neg_step_size = -lr / (1 - b1^t), bc2_sqrt = sqrt(1 - b2^t).
 * The three flags select one of eight copies of the loop with the flags as constants. */
void optiscope_adam_f32(float *p, const float *g, float *m, float *v, float *vmax, int64_t n,
                        float decay, float one_minus_b1, float lerp_rest, float beta2,
                        float one_minus_b2, float eps, float wd, float neg_step_size,
                        float bc2_sqrt, int decoupled, int amsgrad, int maximize, double *stats,
                        uint64_t *ranges, const int32_t *cuts, int nthreads) {
    const int lerp_low = one_minus_b1 < 0.5f;
    if (!stats) ranges = 0;
#define RUN(D, A, M) run(p, g, m, v, vmax, n, HYPER_ARGS, D, A, M, stats, ranges, cuts, nthreads)
    if (decoupled) {
        if (amsgrad) { if (maximize) RUN(1, 1, 1); else RUN(1, 1, 0); }
        else { if (maximize) RUN(1, 0, 1); else RUN(1, 0, 0); }
    } else {
        if (amsgrad) { if (maximize) RUN(0, 1, 1); else RUN(0, 1, 0); }
        else { if (maximize) RUN(0, 0, 1); else RUN(0, 0, 0); }
    }
#undef RUN
}

/* Adds 1 to each of `count` float32 step counters (0-d tensors, as torch's float32 `+ 1`) and
 * writes the new counts into `out`: torch's _foreach_add_ over hundreds of CPU scalars cost
 * more than the step of their tensors. */
void optiscope_steps_add_one(const uint64_t *steps, int64_t count, double *out) {
    for (int64_t i = 0; i < count; i++) {
        float *s = (float *)(uintptr_t)steps[i];
        *s = *s + 1.0f;
        out[i] = *s;
    }
}

/* Many tensors' steps in one call: `optiscope_adam_f32` on each, so that the arithmetic, and
 * with it every result, is the one-tensor call's. A model of hundreds of small tensors paid a
 * validated ctypes call per tensor, more than their arithmetic. Tensor i: the addresses p[i],
 * g[i], m[i], v[i] (vmax[i] with amsgrad) of numels[i] floats each; its step's constants
 * neg_step_size[i] and bc2_sqrt[i]; with `stats`, its rows from stats_rows[i] (rows of NSTATS
 * doubles); with `ranges`, its counters at ranges + i * ranges_stride. */
void optiscope_adam_f32_many(const uint64_t *p, const uint64_t *g, const uint64_t *m,
                             const uint64_t *v, const uint64_t *vmax, const int64_t *numels,
                             int64_t count, float decay, float one_minus_b1, float lerp_rest,
                             float beta2, float one_minus_b2, float eps, float wd,
                             const float *neg_step_size, const float *bc2_sqrt, int decoupled,
                             int amsgrad, int maximize, double *stats, const int64_t *stats_rows,
                             uint64_t *ranges, int64_t ranges_stride, const int32_t *cuts,
                             int nthreads) {
    for (int64_t i = 0; i < count; i++)
        optiscope_adam_f32((float *)(uintptr_t)p[i], (const float *)(uintptr_t)g[i],
                           (float *)(uintptr_t)m[i], (float *)(uintptr_t)v[i],
                           amsgrad ? (float *)(uintptr_t)vmax[i] : 0, numels[i], decay,
                           one_minus_b1, lerp_rest, beta2, one_minus_b2, eps, wd,
                           neg_step_size[i], bc2_sqrt[i], decoupled, amsgrad, maximize,
                           stats ? stats + stats_rows[i] * NSTATS : 0,
                           ranges ? ranges + i * ranges_stride : 0, cuts, nthreads);
}

/* ---------------------------------------------------------------- the monitor's sums
 * For optimizers without statistics of their own, the monitor reads the tensors once more on a
 * sampled step. torch's CPU reductions take one pass per statistic (Σg², max|g|, the non-finite
 * count) and Σx² in float32 drifts; these take the gradient's three in one pass, and any
 * tensor's Σx² per BLOCK in float32 lanes, added in double in a fixed order. */

static __attribute__((noinline)) void sq_block(const float *restrict x, int64_t n,
                                                double *restrict out) {
    float s = 0.0f;
#pragma omp simd reduction(+:s)
    for (int64_t i = 0; i < n; i++) s += x[i] * x[i];
    out[0] = OUT_OF_FLOAT_RANGE(s) ? sq_wide(x, n) : s;
}

/* 32 independent accumulators per sum: an OpenMP SIMD reduction of the same
 * loop kept one vector accumulator for the max, whose NaN-aware compare-and-blend chain made the
 * loop latency-bound. With 16 lanes gcc 12 did not vectorise it, and blending the max with
 * "finite ? |g| : 0" in the loop was slower still. So the loop's max skips NaN but not inf, and
 * a block with a non-finite entry takes its finite maximum in a second, scalar pass. */
#define GRAD_LANES 32
static __attribute__((noinline)) void grad_block(const float *restrict g, int64_t n,
                                                  double *restrict out) {
    float g_sq[GRAD_LANES] = {0}, top[GRAD_LANES] = {0}, bad[GRAD_LANES] = {0};
    int64_t i = 0;
    for (; i + GRAD_LANES <= n; i += GRAD_LANES)
        for (int j = 0; j < GRAD_LANES; j++) {
            const float gi = g[i + j];
            const float a = fabsf(gi);
            g_sq[j] += gi * gi;
            top[j] = a > top[j] ? a : top[j];
            bad[j] += (float)!(a <= 3.4028235e38f);
        }
    double s0 = 0.0, s1 = 0.0, s2 = 0.0;
    for (; i < n; i++) {
        const float a = fabsf(g[i]);
        s0 += (double)g[i] * g[i];
        if (a <= 3.4028235e38f) s1 = a > s1 ? a : s1;
        else s2 += 1.0;
    }
    for (int j = 0; j < GRAD_LANES; j++) {
        s0 += g_sq[j];
        s1 = top[j] > s1 ? top[j] : s1;
        s2 += bad[j];
    }
    if (s2 == 0.0 && s1 > 0.0 && OUT_OF_FLOAT_RANGE(s0)) s0 = sq_wide(g, n);
    if (s2 > 0.0) { /* rare: the max above may be an inf; take the finite entries' max again */
        s1 = 0.0;
        for (i = 0; i < n; i++) {
            const float a = fabsf(g[i]);
            if (a <= 3.4028235e38f && a > s1) s1 = a;
        }
    }
    out[0] = s0; out[1] = s1; out[2] = s2;
}

/* `out`: room for ceil(n / BLOCK) * width doubles, the partial sums of each block. */
void optiscope_sq_sums_f32(const float *x, int64_t n, double *out, int nthreads) {
    const int64_t nblocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nblocks > 4)
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t start = b * BLOCK;
        sq_block(x + start, n - start < BLOCK ? n - start : BLOCK, out + b);
    }
}

void optiscope_grad_sums_f32(const float *g, int64_t n, double *out, int nthreads) {
    const int64_t nblocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nblocks > 4)
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t start = b * BLOCK;
        grad_block(g + start, n - start < BLOCK ? n - start : BLOCK, out + 3 * b);
    }
}

/* x[index[i]] for sorted int32 indices: the monitor's coordinate samples. Each entry is a cache
 * miss of its own (the samples are ~512 entries apart); this loop does no more than those misses,
 * where torch's index_select adds its own per-call work. */
void optiscope_gather_f32(const float *x, const int32_t *index, int64_t n, float *out,
                          int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (n > 4096)
    for (int64_t i = 0; i < n; i++) out[i] = x[index[i]];
}

/* Σx² of each of `count` arrays, as accurate as optiscope_sq_sums_f32 (float lanes per BLOCK,
 * added in double in order), in one call: for a few arrays in cache, where the per-call cost of
 * a torch reduction exceeds the work. A BLAS dot of 2^18 equal entries was off by 1.8e-5
 * relative, these by 2e-8. Split over the threads as torch splits an elementwise operation
 * (contiguous halves), so each core reads what it has just written and finds it in its cache.
 * `scratch`: room for the largest array's ceil(n / BLOCK) doubles. */
void optiscope_sq_sums_many(const float *const *xs, const int64_t *ns, int64_t count,
                            double *out, double *scratch, int nthreads) {
    for (int64_t k = 0; k < count; k++) {
        const int64_t n = ns[k], nblocks = (n + BLOCK - 1) / BLOCK;
        const float *x = xs[k];
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nblocks > 4)
        for (int64_t b = 0; b < nblocks; b++)
            sq_block(x + b * BLOCK, n - b * BLOCK < BLOCK ? n - b * BLOCK : BLOCK, scratch + b);
        double total = 0.0;
        for (int64_t b = 0; b < nblocks; b++) total += scratch[b];
        out[k] = total;
    }
}

/* ---------------------------------------------------------------- many small tensors at once
 * A model's small tensors (biases, norms, small matrices) cost the monitor per-tensor calls, not
 * bandwidth: torch's CPU reductions spend 80-150 us per call on 44,000 entries, and a
 * concatenation of 148 tensors 300 us, where the arithmetic takes a few. These take the tensors
 * where they lie (an array of pointers, one call per set of tensors): the caller has checked that
 * each is a plain contiguous float32 CPU tensor of the length it passes. One thread: a thread
 * team woken after the optimizer's step costs about what it would save on these sizes (tried on
 * the top-k probe: the call got faster, the sampled step not measurably). */

/* Σg², max |g| over the finite entries and the non-finite count of each of `count` arrays:
 * out[3k .. 3k+2] (grad_block's sums per BLOCK, added in double in order, max of the maxima). */
void optiscope_many_grad_sums(const float *const *xs, const int64_t *ns, int64_t count,
                              double *out) {
    for (int64_t k = 0; k < count; k++) {
        const int64_t n = ns[k];
        double s0 = 0.0, s1 = 0.0, s2 = 0.0, part[3];
        for (int64_t start = 0; start < n; start += BLOCK) {
            grad_block(xs[k] + start, n - start < BLOCK ? n - start : BLOCK, part);
            s0 += part[0];
            s1 = part[1] > s1 ? part[1] : s1;
            s2 += part[2];
        }
        out[3 * k] = s0; out[3 * k + 1] = s1; out[3 * k + 2] = s2;
    }
}

/* The sampled entries of each array, end to end: out gets xs[k][index[j]] for the counts[k]
 * local indices of array k (index: all arrays' local indices end to end). The caller has checked
 * that every index is below its array's length. */
void optiscope_many_take(const float *const *xs, const int32_t *index, const int64_t *counts,
                         int64_t count, float *out) {
    for (int64_t k = 0; k < count; k++) {
        const float *x = xs[k];
        const int64_t c = counts[k];
        for (int64_t j = 0; j < c; j++) out[j] = x[index[j]];
        index += c;
        out += c;
    }
}

/* Moves the k largest of a[0..n) to its front (quickselect, median of three; no NaN: the caller
 * sees to it). */
static void select_largest(double *a, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    while (hi > lo) {
        const int64_t mid = lo + (hi - lo) / 2;
        double x = a[lo], y = a[mid], z = a[hi];
        double pivot = x > y ? (y > z ? y : (x > z ? z : x)) : (x > z ? x : (y > z ? z : y));
        int64_t i = lo, j = hi;
        while (i <= j) {  /* Hoare: [lo, j] >= pivot >= [i, hi] */
            while (a[i] > pivot) i++;
            while (a[j] < pivot) j--;
            if (i <= j) {
                const double t = a[i]; a[i] = a[j]; a[j] = t;
                i++; j--;
            }
        }
        if (k - 1 <= j) hi = j;
        else if (k - 1 >= i) lo = i;
        else return;
    }
}

/* Restores the min-heap order of h[0..k) below position i. */
static inline void sift_down(double *h, int64_t k, int64_t i) {
    const double v = h[i];
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= k) break;
        if (c + 1 < k && h[c + 1] < h[c]) c++;
        if (h[c] >= v) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = v;
}

/* heap[0..k) <- the k largest squares of x[0], x[stride], ..., x[(m - 1) stride], as a min-heap
 * (heap[0] the least of them); k <= m. */
static void largest_squares(const float *x, int64_t m, int64_t stride, int64_t k, double *heap) {
    for (int64_t i = 0; i < k; i++) heap[i] = (double)x[stride * i] * (double)x[stride * i];
    for (int64_t i = k / 2 - 1; i >= 0; i--) sift_down(heap, k, i);
    for (int64_t i = k; i < m; i++) {
        const double s = (double)x[stride * i] * (double)x[stride * i];
        if (s > heap[0]) {
            heap[0] = s;
            sift_down(heap, k, 0);
        }
    }
}

/* The top-k probe's rows: row r is entries [starts[r], starts[r] + lengths[r]) of array
 * of[r]; kept[r] = the sum of its ks[r] largest squares, total[r] = the sum of all its squares,
 * both in double (squares of float32 values in double are exact). A row with a NaN gives NaN
 * for both (torch's topk ranks NaN highest). `scratch`: room for the longest row.
 * For k up to 1/8 of the row (the probe's 1%), a min-heap of the k largest seen: one compare per
 * entry, rarely taken, where quickselect's partitions mispredict half their branches (4096
 * entries: 7 ns an entry with quickselect). */
/* One row of the top-k probe: the sum of the k largest squares of x[0..n) and of all of them. */
static void topk_row(const float *x, int64_t n, int64_t k_wanted, double *scratch, double *kept,
                     double *total) {
    const int64_t k = k_wanted < n ? k_wanted : n;
    double sum = 0.0, top = 0.0;
#pragma omp simd reduction(+:sum)
    for (int64_t i = 0; i < n; i++) sum += (double)x[i] * (double)x[i];
    if (sum != sum) { *kept = *total = NAN; return; }  /* squares >= 0: only a NaN */
    if (k > 0 && k <= n / 8 && n >= 256) {
        /* A threshold from every 8th entry: the j-th largest of those, j about twice k/8,
         * has about 2k entries of the row at or above it. Those entries (kept without a
         * branch) hold the row's k largest whenever there are at least k of them (the k-th
         * largest is then at or above the threshold), and only they are selected among. */
        const int64_t m = (n + 7) / 8, j0 = 2 * ((k + 7) / 8) + 2, j = j0 < m ? j0 : m;
        largest_squares(x, m, 8, j, scratch);
        const double t = scratch[0];
        int64_t c = 0;
        for (int64_t i = 0; i < n; i++) {
            const double s = (double)x[i] * (double)x[i];
            scratch[c] = s;
            c += s >= t;
        }
        if (c >= k) {
            if (c > k) select_largest(scratch, c, k);
        } else {  /* rare: the threshold was too high; the heap over every entry */
            largest_squares(x, n, 1, k, scratch);
        }
    } else if (k < n) {
        for (int64_t i = 0; i < n; i++) scratch[i] = (double)x[i] * (double)x[i];
        select_largest(scratch, n, k);
    } else {
        for (int64_t i = 0; i < n; i++) scratch[i] = (double)x[i] * (double)x[i];
    }
    for (int64_t i = 0; i < k; i++) top += scratch[i];
    *total = sum;
    *kept = top;
}

void optiscope_many_topk(const float *const *xs, const int64_t *of, const int64_t *starts,
                         const int64_t *lengths, const int64_t *ks, int64_t rows, double *kept,
                         double *total, double *scratch) {
    for (int64_t r = 0; r < rows; r++)
        topk_row(xs[of[r]] + starts[r], lengths[r], ks[r], scratch, kept + r, total + r);
}

/* Σx² of each of `count` small arrays, as optiscope_sq_sums_many sums them (float lanes per
 * BLOCK, added in double in order), without its per-array OpenMP region: entering one, even for
 * a team of one thread, cost about a microsecond per array. */
void optiscope_many_sq_sums(const float *const *xs, const int64_t *ns, int64_t count,
                            double *out) {
    for (int64_t k = 0; k < count; k++) {
        const int64_t n = ns[k];
        double total = 0.0, part;
        for (int64_t start = 0; start < n; start += BLOCK) {
            sq_block(xs[k] + start, n - start < BLOCK ? n - start : BLOCK, &part);
            total += part;
        }
        out[k] = total;
    }
}

/* ---------------------------------------------------------------- into the monitor's rows
 * The flat path's sums on the CPU, written where the monitor reads them: tensor k's value of a
 * column `col` goes to rows[where[k] * stride + col] (a column < 0 is not written). A sampled
 * step meets cold caches and cold code after the optimizer's step, where each numpy call that
 * scattered, scaled or binned a result cost tens of microseconds: these leave nothing to do. */

/* The gradient's sums of each tensor (optiscope_many_grad_sums'), max |g| inf when a non-finite
 * entry was met, both divided by the loss scale (`inv`: 1 / scale, with `scaled`). */
void optiscope_rows_grad(const float *const *xs, const int64_t *ns, int64_t count, int scaled,
                         double inv, const int64_t *where, double *rows, int64_t stride,
                         int64_t col_sq, int64_t col_max, int64_t col_bad) {
    double s[3];
    for (int64_t k = 0; k < count; k++) {
        optiscope_many_grad_sums(xs + k, ns + k, 1, s);
        double sq = s[0], top = s[2] > 0 ? INFINITY : s[1];
        if (scaled) { sq = sq * inv * inv; top = top * inv; }
        double *row = rows + where[k] * stride;
        row[col_sq] = sq; row[col_max] = top; row[col_bad] = s[2];
    }
}

/* Σx² of each tensor (optiscope_many_sq_sums'). */
void optiscope_rows_sq(const float *const *xs, const int64_t *ns, int64_t count,
                       const int64_t *where, double *rows, int64_t stride, int64_t col) {
    double s;
    for (int64_t k = 0; k < count; k++) {
        optiscope_many_sq_sums(xs + k, ns + k, 1, &s);
        rows[where[k] * stride + col] = s;
    }
}

/* Over each tensor's counts[k] sample entries (a and b end to end, float32), in double and in
 * order: col_diff gets scales[k] Σ(a − b)² (Σa² without b), col_ref scales[k] Σb². */
void optiscope_rows_sample_sums(const float *a, const float *b, const int64_t *counts,
                                const double *scales, int64_t count, const int64_t *where,
                                double *rows, int64_t stride, int64_t col_diff, int64_t col_ref) {
    for (int64_t k = 0; k < count; k++) {
        const int64_t c = counts[k];
        double diff = 0.0, ref = 0.0;
        for (int64_t j = 0; j < c; j++) {
            const double x = a[j], y = b ? (double)b[j] : 0.0, d = x - y;
            diff += d * d;
            ref += y * y;
        }
        double *row = rows + where[k] * stride;
        if (col_diff >= 0) row[col_diff] = diff * scales[k];
        if (col_ref >= 0) row[col_ref] = ref * scales[k];
        a += c;
        if (b) b += c;
    }
}

/* One walk over a set of tensors for what the flat path reads of θ or v: Σx² of each into col_sq
 * (optiscope_rows_sq's, < 0: not summed), its sampled entries into `sample` (optiscope_many_take's)
 * and, against up to two earlier samples ref1, ref2 (NULL: none), the sums of
 * optiscope_rows_sample_sums into (col_d1, col_r1) and (col_d2, col_r2). A reference may be
 * `sample` itself (each tensor's entries are taken before they are compared): a difference of 0
 * and the sample's own Σx². Every value is the separate functions' to the bit. */
void optiscope_rows_sq_take(const float *const *xs, const int64_t *ns, int64_t count,
                            const int32_t *index, const int64_t *counts, const double *scales,
                            float *sample, const float *ref1, const float *ref2,
                            const int64_t *where, double *rows, int64_t stride,
                            const int64_t *cols) {
    const int64_t col_sq = cols[0];
    for (int64_t k = 0; k < count; k++) {
        if (col_sq >= 0) optiscope_rows_sq(xs + k, ns + k, 1, where + k, rows, stride, col_sq);
        const int64_t c = counts[k];
        optiscope_many_take(xs + k, index, counts + k, 1, sample);
        if (ref1) optiscope_rows_sample_sums(sample, ref1, counts + k, scales + k, 1, where + k,
                                             rows, stride, cols[1], cols[2]);
        if (ref2) optiscope_rows_sample_sums(sample, ref2, counts + k, scales + k, 1, where + k,
                                             rows, stride, cols[3], cols[4]);
        index += c;
        sample += c;
        if (ref1) ref1 += c;
        if (ref2) ref2 += c;
    }
}

/* optiscope_rows_grad and optiscope_rows_topk in one walk over the tensors: each tensor's
 * top-k rows read it right after its sums did, while it is in cache. */
void optiscope_rows_grad_topk(const float *const *xs, const int64_t *ns, int64_t count,
                              int scaled, double inv, const int64_t *of, const int64_t *starts,
                              const int64_t *lengths, const int64_t *ks, int64_t nrows,
                              double *scratch, const double *scales, const int64_t *where,
                              double *rows, int64_t stride, const int64_t *cols) {
    int64_t r = 0;
    for (int64_t k = 0; k < count; k++) {
        optiscope_rows_grad(xs + k, ns + k, 1, scaled, inv, where + k, rows, stride, cols[0],
                            cols[1], cols[2]);
        double kept = 0.0, total = 0.0, a, b;
        for (; r < nrows && of[r] == k; r++) {
            topk_row(xs[k] + starts[r], lengths[r], ks[r], scratch, &a, &b);
            kept += a;
            total += b;
        }
        double *row = rows + where[k] * stride;
        row[cols[3]] = kept * scales[k];
        row[cols[4]] = total * scales[k];
    }
}

/* The top-k probe (optiscope_many_topk's rows, `of` ascending): each tensor's kept and total
 * squared mass, its rows' sums added in order and scaled by scales[k]. */
void optiscope_rows_topk(const float *const *xs, const int64_t *of, const int64_t *starts,
                         const int64_t *lengths, const int64_t *ks, int64_t nrows,
                         double *scratch, const double *scales, int64_t count,
                         const int64_t *where, double *rows, int64_t stride, int64_t col_kept,
                         int64_t col_total) {
    int64_t r = 0;
    for (int64_t k = 0; k < count; k++) {
        double kept = 0.0, total = 0.0, a, b;
        for (; r < nrows && of[r] == k; r++) {
            topk_row(xs[k] + starts[r], lengths[r], ks[r], scratch, &a, &b);
            kept += a;
            total += b;
        }
        double *row = rows + where[k] * stride;
        row[col_kept] = kept * scales[k];
        row[col_total] = total * scales[k];
    }
}
