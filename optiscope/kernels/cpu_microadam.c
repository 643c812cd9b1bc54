/* MicroAdam's step for float32 CPU tensors: one pass per top-k block, in cache.
 *
 * The torch backend's ops (optiscope/optimizers/microadam.py, _microadam_torch) read and write
 * each tensor some twenty times: dequantise, add, a top-k over a [blocks, B] int64 key matrix,
 * gathers, the quantiser's passes, two dense scatters of the window per row, the update. Here a
 * block of B entries (4096 by default, 16 KiB of float32) is loaded once, and everything the step
 * does to it happens while it is in L1/L2. Every operation is the torch backend's, in its order
 * and in float32 (double only where it takes double: the square root), compiled without
 * -ffast-math and with -ffp-contract=off, so the result is the same bits; the tests check it.
 *
 * Per block (docs/optimizers.md; a = accumulator, e = error feedback, window I, V of m rows):
 *   1. a = g + Q^-1(e)              4-bit codes, per bucket lo + code * (hi - lo) / 15
 *   2. the k largest |a| (ties: the lower index), by a radix select on the bits of |a|
 *   3. row `slot` of I, V = their block-relative indices (int16) and a's values (bf16)
 *   4. a[I] = 0; e = Q(a)           per bucket: bf16 min and max, codes clamped to 0..15
 *   5. S1 = sum_r w1[r] V[r], S2 = sum_r w2[r] V[r]^2 over the window's rows, in row order
 *   6. theta = theta (1 - lr wd) - lr u,  u = S1 == 0 ? 0 : c1 S1 / (sqrt(c2 S2) + eps)
 * Statistics per block (doubles, `STATS` below) when asked for; with them, if asked, the dynamic
 * range of g, theta+ - theta- and v_hat over every entry, counted per block while it is in cache
 * (cpu_kernels.c's range_count: kernels/ranges.py has the layout).
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define MA_STATS 12
#define MA_BINS 2048
#define MA_LANES 16

/* cpu_kernels.c's dynamic-range counting: a thread's workspace of RANGE_WS counters per
 * quantity (4 sub-histograms of 256 exponent fields, then the 9 thresholds' counts), and its
 * fold into a tensor's output; optiscope_range_cuts() there returns the 9 (kernels/cpu.py
 * checks it against kernels/ranges.py). */
#define RANGE_WS (4 * 256 + 9)
void range_count(const float *restrict x, int64_t n, const int32_t *restrict cuts,
                 uint64_t *restrict ws);
void range_fold(const uint64_t *ws, uint64_t *out);

static inline uint32_t f2u(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static inline float u2f(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

/* float -> bf16 bits, round to nearest even; NaN -> 0x7FC0 (c10::BFloat16's rule). */
static inline uint16_t to_bf16(float x) {
    const uint32_t u = f2u(x);
    if (x != x) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
static inline float from_bf16(uint16_t b) { return u2f((uint32_t)b << 16); }

/* The k largest keys of |a| (31-bit patterns, which order like the values, NaN above inf),
 * ties to the lower index: the threshold T and how many entries equal to T to take, by three
 * histogram passes over 11, 11 and 9 bits. `hist`: 2048 counters of scratch. */
static void radix_threshold(const uint32_t *restrict key, int64_t n, int64_t k,
                            uint32_t *threshold, int64_t *take_equal, uint32_t *restrict hist) {
    static const int shift[3] = {20, 9, 0};
    static const uint32_t width[3] = {2048, 2048, 512};
    uint32_t prefix = 0, mask = 0;
    int64_t need = k;
    for (int level = 0; level < 3; level++) {
        memset(hist, 0, width[level] * sizeof(uint32_t));
        for (int64_t j = 0; j < n; j++)
            if ((key[j] & mask) == prefix) hist[(key[j] >> shift[level]) & (width[level] - 1)]++;
        int64_t digit = (int64_t)width[level] - 1, above = 0;
        for (; digit > 0; digit--) {
            if (above + hist[digit] >= need) break;
            above += hist[digit];
        }
        need -= above;
        prefix |= (uint32_t)digit << shift[level];
        mask |= (width[level] - 1) << shift[level];
    }
    *threshold = prefix;
    *take_equal = need;
}

/* One top-k block of `n` entries starting at flat index `start`; `scratch` holds 3n floats,
 * n keys and MA_BINS counters. Statistics are summed in double. A sign of zero can differ from torch's in a bucket bound whose minimum is both
 * -0.0 and +0.0 (torch's amin returns either, by its vector order); the values are equal. */
static void microadam_block(
    float *restrict p, const float *restrict g, uint8_t *restrict error,
    uint16_t *restrict min_vals, uint16_t *restrict max_vals, int16_t *restrict indices,
    uint16_t *restrict values, int64_t start, int64_t n, int64_t k, int64_t col0, int64_t kcols,
    int64_t m, int64_t slot, int64_t qsize, const float *restrict w1, const float *restrict w2,
    float c1, float c2, float lr, float decay, int has_decay, float eps, float *restrict scratch,
    double *restrict stats, uint64_t *restrict ranges, const int32_t *restrict cuts) {
    float *restrict a = scratch, *restrict s1 = scratch + n, *restrict s2 = scratch + 2 * n;
    uint32_t *restrict key = (uint32_t *)(scratch + 3 * n), *restrict hist = key + n;
    const int64_t bucket0 = start / qsize;
    double st[MA_STATS] = {0};

    /* 1. a = g + Q^-1(e), a byte (two entries: the even one in the high nibble) at a time;
     * blocks and buckets have even sizes and start at even entries, so only a tensor's very last
     * entry can be alone in its byte */
    const uint8_t *restrict codes = error + start / 2;
    for (int64_t b = 0; b * qsize < n; b++) {
        const float lo = from_bf16(min_vals[bucket0 + b]), hi = from_bf16(max_vals[bucket0 + b]);
        const float scale = (hi - lo) / 15.0f;
        const int64_t first = b * qsize, end = (b + 1) * qsize < n ? (b + 1) * qsize : n;
        const int64_t pairs = (end - first) / 2;
        const float *restrict gb = g + start + first;
        float *restrict ab = a + first;
        const uint8_t *restrict cb = codes + first / 2;
        for (int64_t i = 0; i < pairs; i++) {
            ab[2 * i] = gb[2 * i] + ((float)(cb[i] >> 4) * scale + lo);
            ab[2 * i + 1] = gb[2 * i + 1] + ((float)(cb[i] & 15) * scale + lo);
        }
        if ((end - first) & 1)
            ab[2 * pairs] = gb[2 * pairs] + ((float)(cb[pairs] >> 4) * scale + lo);
    }
    if (stats) {
        double g_sq = 0.0, bad = 0.0, total = 0.0;
        float top = 0.0f;
        const float *restrict gb = g + start;
#pragma omp simd reduction(+:g_sq, bad, total) reduction(max:top)
        for (int64_t j = 0; j < n; j++) {
            const float gj = gb[j], x = fabsf(gj);
            const int finite = x <= 3.4028235e38f;
            g_sq += (double)gj * gj;
            top = finite && x > top ? x : top;
            bad += finite ? 0.0 : 1.0;
            total += (double)a[j] * a[j];
        }
        st[0] = g_sq; st[1] = top; st[2] = bad; st[11] = total;
        if (ranges) range_count(gb, n, cuts, ranges);
    }

    /* 2.-3. the top-k, in index order, into row `slot`; kept mass for the statistics */
    for (int64_t j = 0; j < n; j++) key[j] = f2u(a[j]) & 0x7FFFFFFFu;
    uint32_t threshold;
    int64_t equal;
    radix_threshold(key, n, k, &threshold, &equal, hist);
    int16_t *row_i = indices + slot * kcols + col0;
    uint16_t *row_v = values + slot * kcols + col0;
    double kept = 0.0;
    for (int64_t j = 0, c = 0; j < n && c < k; j++) {
        if (key[j] > threshold || (key[j] == threshold && equal > 0)) {
            if (key[j] == threshold) equal--;
            row_i[c] = (int16_t)j;
            row_v[c] = to_bf16(a[j]);
            kept += (double)a[j] * a[j];
            a[j] = 0.0f;
            c++;
        }
    }

    /* 4. e = Q(a - a[I]) per bucket; quantisation error and input for the statistics */
    double q_err = 0.0, q_in = 0.0;
    uint8_t *restrict out_codes = error + start / 2;
    for (int64_t b = 0; b * qsize < n; b++) {
        const int64_t first = b * qsize, end = (b + 1) * qsize < n ? (b + 1) * qsize : n;
        const float *restrict ab = a + first;
        const int64_t len = end - first;
        /* min and max in MA_LANES lanes (vectorised; a NaN is skipped here and propagated
         * below, as torch's amin and amax propagate it) */
        float mn_l[MA_LANES], mx_l[MA_LANES], nan_l[MA_LANES];
        for (int l = 0; l < MA_LANES; l++) { mn_l[l] = INFINITY; mx_l[l] = -INFINITY; nan_l[l] = 0; }
        int64_t j = 0;
        for (; j + MA_LANES <= len; j += MA_LANES)
            for (int l = 0; l < MA_LANES; l++) {
                const float x = ab[j + l];
                mn_l[l] = x < mn_l[l] ? x : mn_l[l];
                mx_l[l] = x > mx_l[l] ? x : mx_l[l];
                nan_l[l] += (float)(x != x);
            }
        float mn = INFINITY, mx = -INFINITY;
        int nan = 0;
        for (; j < len; j++) {
            const float x = ab[j];
            nan |= x != x;
            mn = x < mn ? x : mn;
            mx = x > mx ? x : mx;
        }
        for (int l = 0; l < MA_LANES; l++) {
            mn = mn_l[l] < mn ? mn_l[l] : mn;
            mx = mx_l[l] > mx ? mx_l[l] : mx;
            nan |= nan_l[l] != 0.0f;
        }
        if (nan) mn = mx = NAN;
        const uint16_t lo_b = to_bf16(mn), hi_b = to_bf16(mx);
        min_vals[bucket0 + b] = lo_b;
        max_vals[bucket0 + b] = hi_b;
        const float lo = from_bf16(lo_b), hi = from_bf16(hi_b);
        const float scale = (hi - lo) / 15.0f;
        const float divisor = scale == 0.0f ? 1.0f : scale;
        /* codes two at a time into whole bytes (a last lone entry pads its low nibble with 0) */
        for (int64_t i = 0; i < (len + 1) / 2; i++) {
            float q[2] = {0.0f, 0.0f};
            for (int h = 0; h < 2 && 2 * i + h < len; h++) {
                const float x = ab[2 * i + h];
                float c = floorf((x - lo) / divisor + 0.5f);
                if (scale == 0.0f || c != c) c = 0.0f;
                q[h] = c < 0.0f ? 0.0f : (c > 15.0f ? 15.0f : c);
                if (stats) {
                    const float r = x - (q[h] * scale + lo);
                    q_err += (double)r * r;
                    q_in += (double)x * x;
                }
            }
            out_codes[first / 2 + i] = (uint8_t)(((uint8_t)q[0] << 4) | (uint8_t)q[1]);
        }
    }

    /* 5. the window's sums, row by row as torch's index_add_ adds them */
    memset(s1, 0, n * sizeof(float));
    memset(s2, 0, n * sizeof(float));
    for (int64_t r = 0; r < m; r++) {
        const int16_t *ri = indices + r * kcols + col0;
        const uint16_t *rv = values + r * kcols + col0;
        const float wr1 = w1[r], wr2 = w2[r];
        for (int64_t c = 0; c < k; c++) {
            const float v = from_bf16(rv[c]);
            s1[ri[c]] += v * wr1;
            s2[ri[c]] += (v * v) * wr2;
        }
    }

    /* 6. the update */
    double p0_sq = 0.0, p1_sq = 0.0, d_sq = 0.0, m_sq = 0.0, v_sq = 0.0;
    float *restrict pb = p + start;
#pragma omp simd reduction(+:p0_sq, p1_sq, d_sq, m_sq, v_sq)
    for (int64_t j = 0; j < n; j++) {
        const float m_hat = c1 * s1[j], v_hat = c2 * s2[j];
        const float root = (float)sqrt((double)v_hat);
        const float u = s1[j] == 0.0f ? 0.0f : m_hat / (root + eps);
        const float t0 = pb[j];
        float t = t0;
        if (has_decay) t = t * decay;
        t = t - lr * u;
        pb[j] = t;
        if (stats) {
            const float d = t - t0;
            p0_sq += (double)t0 * t0; p1_sq += (double)t * t; d_sq += (double)d * d;
            m_sq += (double)m_hat * m_hat; v_sq += (double)v_hat * v_hat;
            s1[j] = d;  /* S1, S2 are read: their room takes the range counts' inputs */
            s2[j] = v_hat;
        }
    }
    if (ranges) {
        range_count(s1, n, cuts, ranges + RANGE_WS);
        range_count(s2, n, cuts, ranges + 2 * RANGE_WS);
    }
    if (stats) {
        st[3] = p0_sq; st[4] = p1_sq; st[5] = d_sq; st[6] = m_sq; st[7] = v_sq;
        st[8] = q_err; st[9] = q_in; st[10] = kept;
        for (int s = 0; s < MA_STATS; s++) stats[s] = st[s];
    }
}

/* One tensor of d entries: n_full blocks of `bsize` (even) keeping k_full, then a tail of `tail`
 * keeping k_tail; `qsize` divides `bsize`, so no byte of codes and no bucket spans two blocks.
 * `stats`: NULL or room for MA_STATS doubles per block, in the order
 *   sum g^2, max |g| (finite), non-finite count, theta_before^2, theta_after^2, update^2,
 *   m_hat^2, v_hat^2, quantisation error^2, quantiser input^2, top-k kept^2, a^2.
 * `ranges` (with `stats` only): NULL, or 3 * (256 + 9) zeroed counters the range counts of g,
 * theta+ - theta- and v_hat are added to (`cuts`: the 9 thresholds, ascending), as
 * optiscope_adam_f32's. Returns 0, or -1 when the scratch could not be allocated (nothing was
 * changed then). */
int optiscope_microadam_f32(
    float *p, const float *g, uint8_t *error, uint16_t *min_vals, uint16_t *max_vals,
    int16_t *indices, uint16_t *values, int64_t bsize, int64_t n_full, int64_t k_full,
    int64_t tail, int64_t k_tail, int64_t m, int64_t slot, int64_t qsize, const float *w1,
    const float *w2, float c1, float c2, float lr, float decay, int has_decay, float eps,
    double *stats, int nthreads, uint64_t *ranges, const int32_t *cuts) {
    const int64_t kcols = n_full * k_full + k_tail, nblocks = n_full + (tail > 0);
    const int64_t longest = n_full ? bsize : tail;
    if (nblocks > 2 && nthreads > 1) nthreads = nthreads < nblocks ? nthreads : (int)nblocks;
    else nthreads = 1;
    /* one scratch per thread, allocated up front: a block's 3 float arrays, keys, histogram */
    const size_t per_thread = (size_t)(4 * longest + MA_BINS);
    float *scratch = malloc(per_thread * sizeof(float) * (size_t)nthreads);
    if (!scratch) return -1;
    if (!stats) ranges = 0;
    /* each thread counts into its own workspace, added into `ranges` after the loop */
    uint64_t *ws = ranges ? calloc((size_t)nthreads * 3 * RANGE_WS, sizeof(uint64_t)) : 0;
    if (ranges && !ws) {
        free(scratch);
        return -1;
    }
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t b = 0; b < nblocks; b++) {
        const int full = b < n_full;
        microadam_block(p, g, error, min_vals, max_vals, indices, values, b * bsize,
                        full ? bsize : tail, full ? k_full : k_tail, b * k_full, kcols, m, slot,
                        qsize, w1, w2, c1, c2, lr, decay, has_decay, eps,
                        scratch + per_thread * (size_t)omp_get_thread_num(),
                        stats ? stats + b * MA_STATS : 0,
                        ws ? ws + (size_t)omp_get_thread_num() * 3 * RANGE_WS : 0, cuts);
    }
    free(scratch);
    if (ws) {
        for (int t = 0; t < nthreads; t++) range_fold(ws + (size_t)t * 3 * RANGE_WS, ranges);
        free(ws);
    }
    return 0;
}

/* v_hat = c2 * S2 at sorted flat coordinates `index[0..count)`, for the monitor's drift: per
 * block that holds one of them, S2 over the block as the step sums it (row by row, so the same
 * bits), then the coordinates gathered. The torch-ops form built two dense float32 tensors of
 * the whole parameter per call; this touches only the
 * window's entries of the sampled blocks. `index` is int64. Returns 0, or -1 when the scratch
 * could not be allocated. */
int optiscope_microadam_v_at(const int16_t *indices, const uint16_t *values, int64_t bsize,
                             int64_t n_full, int64_t k_full, int64_t tail, int64_t k_tail,
                             int64_t m, const float *w2, float c2, const int64_t *index,
                             int64_t count, float *out, int nthreads) {
    const int64_t kcols = n_full * k_full + k_tail, nblocks = n_full + (tail > 0);
    const int64_t longest = n_full ? bsize : tail;
    if (nthreads < 1 || count < 4096) nthreads = 1;
    float *scratch = malloc((size_t)longest * sizeof(float) * (size_t)nthreads);
    if (!scratch) return -1;
#pragma omp parallel num_threads(nthreads)
    {
        float *restrict s2 = scratch + (size_t)longest * (size_t)omp_get_thread_num();
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nblocks; b++) {
            const int64_t start = b * bsize, n = b < n_full ? bsize : tail;
            const int64_t k = b < n_full ? k_full : k_tail, col0 = b * k_full;
            /* the sampled coordinates in this block: a binary search for the first */
            int64_t lo = 0, hi = count;
            while (lo < hi) {
                const int64_t mid = lo + (hi - lo) / 2;
                if (index[mid] < start) lo = mid + 1; else hi = mid;
            }
            if (lo == count || index[lo] >= start + n) continue;
            memset(s2, 0, (size_t)n * sizeof(float));
            for (int64_t r = 0; r < m; r++) {
                const int16_t *ri = indices + r * kcols + col0;
                const uint16_t *rv = values + r * kcols + col0;
                const float wr2 = w2[r];
                for (int64_t c = 0; c < k; c++) {
                    const float v = from_bf16(rv[c]);
                    s2[ri[c]] += (v * v) * wr2;
                }
            }
            for (int64_t i = lo; i < count && index[i] < start + n; i++)
                out[i] = c2 * s2[index[i] - start];
        }
    }
    free(scratch);
    return 0;
}
