/* The run log's numbers as text: the JSON that optiscope.monitor.runlog._values_json writes,
 * byte for byte, without the GIL (ctypes releases it during the call), so a writer thread can
 * format a sample while the training thread runs Python.
 *
 * A value is written as
 *   - NaN, Infinity, -Infinity (Python's json);
 *   - an integer when it is integral, non-negative and below 2^53 (counts and byte sizes);
 *   - else Python's repr: the shortest decimal that reads back as the same double (the closest
 *     to it among those), in repr's notation: exponent form ("1e-05", "1.5e+16", at least two
 *     exponent digits) below 1e-4 and from 1e16 on, else positional with at least one digit
 *     after the point ("100.0", "0.0001"); -0.0 is "-0.0".
 *
 * The shortest digits: for a normal double, any decimal of at most 15 significant digits reads
 * back as itself (DBL_DIG), so when some decimal of k <= 15 digits reads back as x, x rounded
 * to 15 digits is that decimal padded with zeros; otherwise it takes 16 or 17 digits, and x
 * rounded to that many is the closest. x to 17 digits comes from 128-bit integer arithmetic
 * for 1e-16 <= |x| < 1e17 (snprintf, 4x slower, elsewhere); the 15- and 16-digit roundings
 * are taken from them (exact unless the dropped digits are exactly "5" or "50", where snprintf
 * rounds again) and checked with strtod. Two cases need more: a power of
 * two, whose lower neighbour is twice as close as its upper one, so the rounding to 16 digits
 * can fall outside below while the decimal above reads back; and subnormals, with fewer
 * significant digits, tried from 1 digit up.
 */

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Longest text of one value: "-2.2250738585072014e-308" (24 bytes). */
#define MAX_VALUE 24

/* The digits of |x| correctly rounded to n significant digits (n <= 17), by snprintf; returns
 * the decimal exponent of the first digit. */
static int digits_of(double a, int n, char *digits) {
    char buf[40];
    snprintf(buf, sizeof buf, "%.*e", n - 1, a);
    const char *p = buf;
    int k = 0;
    for (; *p && *p != 'e'; p++)
        if (*p != '.') digits[k++] = *p;
    return atoi(p + 1);
}

#ifdef __SIZEOF_INT128__
__extension__ typedef unsigned __int128 u128;

/* 5^k for 0 <= k <= 32 (5^32 < 2^75). */
static u128 pow5(int k) {
    static const uint64_t small[28] = {
        1ull, 5ull, 25ull, 125ull, 625ull, 3125ull, 15625ull, 78125ull, 390625ull, 1953125ull,
        9765625ull, 48828125ull, 244140625ull, 1220703125ull, 6103515625ull, 30517578125ull,
        152587890625ull, 762939453125ull, 3814697265625ull, 19073486328125ull,
        95367431640625ull, 476837158203125ull, 2384185791015625ull, 11920928955078125ull,
        59604644775390625ull, 298023223876953125ull, 1490116119384765625ull,
        7450580596923828125ull};
    if (k <= 27) return small[k];
    return (u128)small[27] * small[k - 27];
}

/* x's 17 digits as digits_of gives them, exactly in integers, for 1e-16 <= a < 1e17 (the
 * values a monitor writes): a = m 2^e, and a 10^k = m 5^k / 2^s with m 5^k < 2^128. Returns 0
 * outside that range (snprintf then). */
static int digits17_fast(double a, char *digits, int *e_out) {
    if (!(a >= 1e-16 && a < 1e17)) return 0;
    int e2;
    double f = frexp(a, &e2);
    uint64_t m = (uint64_t)ldexp(f, 53);  /* a = m 2^(e2 - 53), exactly: a is normal here */
    int e = e2 - 53, exp10 = (int)floor(log10(a));
    for (int attempt = 0; attempt < 3; attempt++) {
        int k = 16 - exp10, s = -e - k;
        if (k < 0 || k > 32 || s < -8 || s >= 127) return 0;
        u128 n = (u128)m * pow5(k);
        uint64_t q;
        int up = 0;
        if (s <= 0) {
            q = (uint64_t)(n << -s);
        } else {
            q = (uint64_t)(n >> s);
            u128 rest = n & (((u128)1 << s) - 1);
            u128 half = (u128)1 << (s - 1);
            up = rest > half || (rest == half && (q & 1));  /* to nearest, ties to even */
        }
        if (q < 10000000000000000ull) {  /* log10 said one too many */
            exp10--;
            continue;
        }
        if (q >= 100000000000000000ull) {
            exp10++;
            continue;
        }
        q += up;
        if (q == 100000000000000000ull) {  /* 9.99..95 rounded up */
            q = 10000000000000000ull;
            exp10++;
        }
        for (int i = 16; i >= 0; i--) {
            digits[i] = (char)('0' + q % 10);
            q /= 10;
        }
        *e_out = exp10;
        return 1;
    }
    return 0;
}
#else  /* no 128-bit integers: snprintf for all */
static int digits17_fast(double a, char *digits, int *e_out) {
    (void)a, (void)digits, (void)e_out;
    return 0;
}
#endif

/* Rounds the 17 digits of d (exponent e) to n digits, half up on the dropped digits; returns 0
 * when the dropped digits are exactly half a unit ("5", "50"), which 17 digits cannot decide. */
static int round_digits(const char *d17, int e, int n, char *out, int *out_e) {
    int half = 1, above = 0;
    if (d17[n] != '5') half = 0;
    for (int i = n + 1; i < 17; i++)
        if (d17[i] != '0') half = 0;
    if (half) return 0;
    above = d17[n] >= '5';
    memcpy(out, d17, n);
    *out_e = e;
    if (above) {
        int i = n - 1;
        while (i >= 0 && out[i] == '9') out[i--] = '0';
        if (i >= 0) {
            out[i]++;
        } else {  /* 9.99... rounded up: 1.00...e(e+1) */
            out[0] = '1';
            *out_e = e + 1;
        }
    }
    return 1;
}

/* Whether the n digits (exponent e) read back as a. */
static int reads_back(const char *digits, int n, int e, double a) {
    char buf[32];
    memcpy(buf, digits, n);
    char *p = buf + n;
    int k = e - n + 1;
    *p++ = 'e';
    if (k < 0) {
        *p++ = '-';
        k = -k;
    }
    if (k >= 100) *p++ = (char)('0' + k / 100);
    if (k >= 10) *p++ = (char)('0' + k / 10 % 10);
    *p++ = (char)('0' + k % 10);
    *p = 0;
    return strtod(buf, NULL) == a;
}

/* Adds one unit in the last of n digits; returns the new exponent. */
static int step_up(char *digits, int n, int e) {
    int i = n - 1;
    while (i >= 0 && digits[i] == '9') digits[i--] = '0';
    if (i >= 0) {
        digits[i]++;
        return e;
    }
    digits[0] = '1';
    return e + 1;
}

/* The shortest digits of a > 0 that read back as a (the closest such); their count, and the
 * exponent in *e. */
static int shortest(double a, char *digits, int *e) {
    if (a < DBL_MIN) {  /* subnormal: fewer significant digits */
        for (int n = 1; n < 17; n++) {
            *e = digits_of(a, n, digits);
            if (reads_back(digits, n, *e, a)) return n;
        }
        *e = digits_of(a, 17, digits);
        return 17;
    }
    char d17[17];
    int e17, m;
    if (!digits17_fast(a, d17, &e17)) e17 = digits_of(a, 17, d17);
    if (frexp(a, &m) != 0.5) {
        /* The closest 16 digits read back whenever some 16 digits do; when they do, so may
         * 15 (padded with a zero, they are 16 digits that read back). */
        if (!round_digits(d17, e17, 16, digits, e)) *e = digits_of(a, 16, digits);
        if (!reads_back(digits, 16, *e, a)) {
            memcpy(digits, d17, 17);
            *e = e17;
            return 17;
        }
        char d15[16];
        int e15;
        if (!round_digits(d17, e17, 15, d15, &e15)) e15 = digits_of(a, 15, d15);
        if (!reads_back(d15, 15, e15, a)) return 16;
        memcpy(digits, d15, 15);
        *e = e15;
        return 15;
    }
    /* A power of two: its lower neighbour is twice as close as its upper one, so the closest
     * 16 digits can fall outside below while 15 digits, or the 16 digits above, read back. */
    for (int n = 15; n <= 16; n++) {
        if (!round_digits(d17, e17, n, digits, e)) *e = digits_of(a, n, digits);
        if (reads_back(digits, n, *e, a)) return n;
    }
    char up[17];
    memcpy(up, digits, 16);
    int e_up = step_up(up, 16, *e);
    if (reads_back(up, 16, e_up, a)) {
        memcpy(digits, up, 16);
        *e = e_up;
        return 16;
    }
    memcpy(digits, d17, 17);
    *e = e17;
    return 17;
}

/* Writes u in decimal; returns its length. */
static int write_uint(uint64_t u, char *out) {
    char tmp[24];
    int k = 0;
    do {
        tmp[k++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    for (int i = 0; i < k; i++) out[i] = tmp[k - 1 - i];
    return k;
}

/* Writes one value as _values_json does; returns its length (at most MAX_VALUE). */
static int format_one(double x, char *out) {
    if (isnan(x)) {
        memcpy(out, "NaN", 3);
        return 3;
    }
    if (isinf(x)) {
        if (x > 0) {
            memcpy(out, "Infinity", 8);
            return 8;
        }
        memcpy(out, "-Infinity", 9);
        return 9;
    }
    if (!signbit(x) && x < 9007199254740992.0 && x == trunc(x))
        return write_uint((uint64_t)x, out);
    char *p = out;
    if (signbit(x)) *p++ = '-';
    double a = fabs(x);
    if (a == 0.0) {
        memcpy(p, "0.0", 3);
        return (int)(p - out) + 3;
    }
    char d[17];
    int e = 0, n = shortest(a, d, &e);
    while (n > 1 && d[n - 1] == '0') n--;
    if (e < -4 || e >= 16) {  /* d.ddde-XX */
        *p++ = d[0];
        if (n > 1) {
            *p++ = '.';
            memcpy(p, d + 1, n - 1);
            p += n - 1;
        }
        *p++ = 'e';
        *p++ = e < 0 ? '-' : '+';
        int ae = e < 0 ? -e : e;
        if (ae < 10) *p++ = '0';
        p += write_uint((uint64_t)ae, p);
    } else if (e < 0) {  /* 0.000ddd */
        *p++ = '0';
        *p++ = '.';
        for (int i = -1; i > e; i--) *p++ = '0';
        memcpy(p, d, n);
        p += n;
    } else {  /* ddd.ddd, ddd00.0 */
        for (int i = 0; i <= e; i++) *p++ = i < n ? d[i] : '0';
        *p++ = '.';
        if (n > e + 1) {
            memcpy(p, d + e + 1, n - e - 1);
            p += n - e - 1;
        } else {
            *p++ = '0';
        }
    }
    return (int)(p - out);
}

/* The JSON array of n doubles, "[v,v,...]", into out (room for 2 + 25 n bytes); returns the
 * number of bytes written. */
int64_t optiscope_format_f64(const double *x, int64_t n, char *out) {
    char *p = out;
    *p++ = '[';
    for (int64_t i = 0; i < n; i++) {
        if (i) *p++ = ',';
        p += format_one(x[i], p);
    }
    *p++ = ']';
    return p - out;
}

/* Several arrays back to back: x holds `count` segments of sizes[i] values; each is written as
 * optiscope_format_f64 writes it, and ends[i] is the offset just past segment i's text. out
 * has room for 2 count + 25 (sum of sizes) bytes. */
void optiscope_format_f64_many(const double *x, const int64_t *sizes, int64_t count, char *out,
                               int64_t *ends) {
    int64_t end = 0;
    for (int64_t i = 0; i < count; i++) {
        end += optiscope_format_f64(x, sizes[i], out + end);
        x += sizes[i];
        ends[i] = end;
    }
}

/* A log2 histogram's rows, "[[first,c,...],[],...]": for each of `rows` rows of `bins` whole
 * counts (float64), the index of its first nonzero bin and the counts from there to its last
 * nonzero one, "[]" for a row of zeros. out has room for 2 + rows (3 + 21 bins) bytes. Returns
 * the number of bytes written. */
int64_t optiscope_format_histograms(const double *counts, int64_t rows, int64_t bins, char *out) {
    char *p = out;
    *p++ = '[';
    for (int64_t r = 0; r < rows; r++) {
        const double *row = counts + r * bins;
        if (r) *p++ = ',';
        int64_t first = 0, last = bins - 1;
        while (first < bins && row[first] == 0.0) first++;
        while (last > first && row[last] == 0.0) last--;
        *p++ = '[';
        if (first < bins) {
            p += write_uint((uint64_t)first, p);
            for (int64_t i = first; i <= last; i++) {
                *p++ = ',';
                double c = row[i];
                if (c < 0) {
                    *p++ = '-';
                    c = -c;
                }
                p += write_uint((uint64_t)c, p);
            }
        }
        *p++ = ']';
    }
    *p++ = ']';
    return p - out;
}
