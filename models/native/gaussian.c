/* PaDiM's Gaussian fit on the CPU, vectorised across feature positions.
 *
 * Every position has its own small d x d problem (a Gram matrix, a Cholesky factorisation, a
 * triangular inverse). BLAS and LAPACK take them one at a time, where call overhead and the
 * short inner loops dominate; here the 16 positions of a block are the 16 lanes of one vector,
 * so every scalar step of the textbook algorithms is one full-width vector operation.
 *
 * Layouts (float32 unless said otherwise; P positions in blocks of LANES, the last one padded):
 *   x       [B][d][P]        one batch of embeddings, positions contiguous (the fit's layout)
 *   shift   [d][P]           subtracted from x before the products (keeps float32 accurate)
 *   gram    [blocks][d][d][LANES] bytes; while fitting, the first half of each block holds the
 *           lower triangle of sum over images of (x - shift)(x - shift)^T, packed by rows
 *           (PACKED): half the memory traffic of a square per batch
 *   sums    [blocks][d][LANES]      float64, sum over images of (x - shift)
 * padim_whitening then overwrites each gram block with its LANES whitening matrices as
 * [LANES][d][d] row-major (the same bytes), i.e. the array becomes [blocks * LANES][d][d].
 *
 * Compiled at first use by models/native.py (cc -O3 -march=native); a NumPy path does the same
 * work where no compiler is available. Built with -fno-math-errno, never -ffast-math: the NaN
 * checks below must survive.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16
#define TILE 4
/* offset of entry (i, j), j <= i, of a lower triangle packed by rows, LANES per entry */
#define PACKED(i, j) ((((i) * ((i) + 1)) / 2 + (j)) * LANES)
#define PACKED_H(i, j) ((((i) * ((i) + 1)) / 2 + (j)) * HALF)

typedef float vf __attribute__((vector_size(LANES * sizeof(float)), aligned(4)));
/* The factorisations work on 8 lanes at a time: 8 doubles fill one 512-bit register, while GCC
 * keeps a 16-double vector (no such machine mode) in memory. */
#define HALF 8
typedef double vh __attribute__((vector_size(HALF * sizeof(double)), aligned(8), may_alias));
typedef float vq __attribute__((vector_size(HALF * sizeof(float)), aligned(4)));

static inline vf load_f(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store_f(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vh load_h(const double *p) { return *(const vh *)p; }
static inline void store_h(double *p, vh v) { *(vh *)p = v; }
static inline vq load_q(const float *p) { vq v; memcpy(&v, p, sizeof v); return v; }

int padim_lanes(void) { return LANES; }

/* 4x4 tile of Gram lanes: g[i0+r][j0+c] += sum_b xc[b][i0+r] * xc[b][j0+c] (packed lower
 * triangle). On a diagonal tile (i0 == j0) only c <= r exists. */
static void gram_tile(float *g, const float *xc, int64_t batch, int64_t d, int64_t i0, int64_t j0, int first)
{
    const int diagonal = i0 == j0;
    vf acc[TILE][TILE];
    for (int r = 0; r < TILE; r++)
        for (int c = 0; c < TILE; c++)
            acc[r][c] = first || (diagonal && c > r) ? (vf){0} : load_f(g + PACKED(i0 + r, j0 + c));
    for (int64_t b = 0; b < batch; b++) {
        const float *row = xc + b * d * LANES;
        vf xi[TILE], xj[TILE];
        for (int r = 0; r < TILE; r++) xi[r] = load_f(row + (i0 + r) * LANES);
        for (int c = 0; c < TILE; c++) xj[c] = load_f(row + (j0 + c) * LANES);
        for (int r = 0; r < TILE; r++)
            for (int c = 0; c < TILE; c++)
                acc[r][c] += xi[r] * xj[c];
    }
    for (int r = 0; r < TILE; r++)
        for (int c = 0; c < TILE; c++)
            if (!(diagonal && c > r)) store_f(g + PACKED(i0 + r, j0 + c), acc[r][c]);
}

/* Edge tiles (d not a multiple of TILE): same sums, lower triangle only. */
static void gram_edge(float *g, const float *xc, int64_t batch, int64_t d, int64_t i0, int64_t j0, int first)
{
    for (int64_t i = i0; i < i0 + TILE && i < d; i++)
        for (int64_t j = j0; j < j0 + TILE && j <= i; j++) {
            vf acc = first ? (vf){0} : load_f(g + PACKED(i, j));
            for (int64_t b = 0; b < batch; b++)
                acc += load_f(xc + (b * d + i) * LANES) * load_f(xc + (b * d + j) * LANES);
            store_f(g + PACKED(i, j), acc);
        }
}

/* Add one batch to blocks [block0, block1); ``first``: the arrays hold no sums yet (they may be
 * uninitialised memory: the first batch writes instead of adding, so the fit never zeroes the
 * Gram array first). Returns 0, or -1 if the scratch could not be allocated. */
int padim_gram_update(const float *x, int64_t batch, int64_t d, int64_t positions, const float *shift,
                      float *gram, double *sums, int64_t block0, int64_t block1, int first)
{
    float *xc = aligned_alloc(64, (size_t)(batch * d * LANES * sizeof(float) + 64));
    if (!xc) return -1;
    for (int64_t block = block0; block < block1; block++) {
        const int64_t p0 = block * LANES;
        const int64_t lanes = positions - p0 < LANES ? positions - p0 : LANES;
        double *s = sums + block * d * LANES;
        for (int64_t i = 0; i < d; i++) {
            const float *sh = shift + i * positions + p0;
            vf total = {0};
            for (int64_t b = 0; b < batch; b++) {
                const float *src = x + (b * d + i) * positions + p0;
                /* the next block's 64 bytes of this row: fetched now, used after this block's tiles */
                if (block + 1 < block1) __builtin_prefetch(src + LANES);
                vf v;
                for (int64_t l = 0; l < LANES; l++) v[l] = l < lanes ? src[l] - sh[l] : 0.0f;
                store_f(xc + (b * d + i) * LANES, v);
                total += v;
            }
            for (int l = 0; l < LANES; l++) s[i * LANES + l] = (first ? 0.0 : s[i * LANES + l]) + (double)total[l];
        }
        float *g = gram + block * d * d * LANES;
        for (int64_t i0 = 0; i0 < d; i0 += TILE)
            for (int64_t j0 = 0; j0 <= i0; j0 += TILE) {
                if (i0 + TILE <= d && j0 + TILE <= d) gram_tile(g, xc, batch, d, i0, j0, first);
                else gram_edge(g, xc, batch, d, i0, j0, first);
            }
    }
    free(xc);
    return 0;
}

/* Column j of the Cholesky factor needs sum_k L[j][k]^2: its pivot. Returns the first lane
 * (below ``lanes``) that is not positive (or NaN), else -1; padding lanes get 1. */
static int pivot(double *a, double *inv_diag, int64_t j, int lanes)
{
    const double *row_j = a + PACKED_H(j, 0);
    vh diag = load_h(a + PACKED_H(j, j));
    for (int64_t k = 0; k < j; k++) {
        const vh ljk = load_h(row_j + k * HALF);
        diag -= ljk * ljk;
    }
    for (int l = 0; l < lanes; l++)
        if (!(diag[l] > 0.0)) return l;
    for (int l = lanes; l < HALF; l++) diag[l] = 1.0;
    vh root;
    for (int l = 0; l < HALF; l++) root[l] = sqrt(diag[l]);
    store_h(a + PACKED_H(j, j), root);
    store_h(inv_diag + j * HALF, 1.0 / root);
    return -1;
}

/* In-place Cholesky (dot-product form) of the packed lower triangle ``a``, two columns at a time:
 * four rows share each load of rows j and j + 1, eight sums per k from six loads. */
static int cholesky_lanes(double *a, double *inv_diag, int64_t d, int lanes)
{
    int64_t j = 0;
    for (; j + 2 <= d; j += 2) {
        int bad = pivot(a, inv_diag, j, lanes);
        if (bad >= 0) return bad;
        const vh inv0 = load_h(inv_diag + j * HALF);
        const double *row0 = a + PACKED_H(j, 0), *row1 = a + PACKED_H(j + 1, 0);
        {   /* L[j+1][j], then the pivot of column j + 1 */
            vh t = load_h(row1 + j * HALF);
            for (int64_t k = 0; k < j; k++) t -= load_h(row1 + k * HALF) * load_h(row0 + k * HALF);
            store_h(a + PACKED_H(j + 1, j), t * inv0);
        }
        bad = pivot(a, inv_diag, j + 1, lanes);
        if (bad >= 0) return bad;
        const vh inv1 = load_h(inv_diag + (j + 1) * HALF);
        const vh l10 = load_h(row1 + j * HALF);
        int64_t i = j + 2;
        for (; i + 4 <= d; i += 4) {
            /* named accumulators, not arrays: GCC kept arrays of these on the stack */
            const double *r0 = a + PACKED_H(i, 0), *r1 = a + PACKED_H(i + 1, 0);
            const double *r2 = a + PACKED_H(i + 2, 0), *r3 = a + PACKED_H(i + 3, 0);
            vh s00 = load_h(r0 + j * HALF), s01 = load_h(r0 + (j + 1) * HALF);
            vh s10 = load_h(r1 + j * HALF), s11 = load_h(r1 + (j + 1) * HALF);
            vh s20 = load_h(r2 + j * HALF), s21 = load_h(r2 + (j + 1) * HALF);
            vh s30 = load_h(r3 + j * HALF), s31 = load_h(r3 + (j + 1) * HALF);
            for (int64_t k = 0; k < j; k++) {
                const vh u0 = load_h(row0 + k * HALF), u1 = load_h(row1 + k * HALF);
                const vh v0 = load_h(r0 + k * HALF), v1 = load_h(r1 + k * HALF);
                const vh v2 = load_h(r2 + k * HALF), v3 = load_h(r3 + k * HALF);
                s00 -= v0 * u0; s01 -= v0 * u1;
                s10 -= v1 * u0; s11 -= v1 * u1;
                s20 -= v2 * u0; s21 -= v2 * u1;
                s30 -= v3 * u0; s31 -= v3 * u1;
            }
            const vh l0 = s00 * inv0, l1 = s10 * inv0, l2 = s20 * inv0, l3 = s30 * inv0;
            store_h(a + PACKED_H(i, j), l0);
            store_h(a + PACKED_H(i + 1, j), l1);
            store_h(a + PACKED_H(i + 2, j), l2);
            store_h(a + PACKED_H(i + 3, j), l3);
            store_h(a + PACKED_H(i, j + 1), (s01 - l0 * l10) * inv1);
            store_h(a + PACKED_H(i + 1, j + 1), (s11 - l1 * l10) * inv1);
            store_h(a + PACKED_H(i + 2, j + 1), (s21 - l2 * l10) * inv1);
            store_h(a + PACKED_H(i + 3, j + 1), (s31 - l3 * l10) * inv1);
        }
        for (; i < d; i++) {
            const double *ri = a + PACKED_H(i, 0);
            vh t0 = load_h(ri + j * HALF), t1 = load_h(ri + (j + 1) * HALF);
            for (int64_t k = 0; k < j; k++) {
                const vh v = load_h(ri + k * HALF);
                t0 -= v * load_h(row0 + k * HALF);
                t1 -= v * load_h(row1 + k * HALF);
            }
            const vh lij = t0 * inv0;
            store_h(a + PACKED_H(i, j), lij);
            store_h(a + PACKED_H(i, j + 1), (t1 - lij * l10) * inv1);
        }
    }
    if (j < d) return pivot(a, inv_diag, j, lanes);   /* odd d: the last column is its pivot alone */
    return -1;
}

/* X = L^-1 in place, row by row: X[i][j] = -X[i][i] sum_{k=j}^{i-1} L[i][k] X[k][j] (rows
 * k < i hold X already; row i is still L from column j on). Two rows and four columns at a time:
 * eight sums per k from six loads; row i + 1 also needs k = i, i.e. row i's new X[i][j]. */
static void invert_lanes(double *a, const double *inv_diag, int64_t d)
{
    int64_t i = 0;
    for (; i < d; i += 2) {
        const int two = i + 1 < d;
        double *r0 = a + PACKED_H(i, 0);
        double *r1 = two ? a + PACKED_H(i + 1, 0) : r0;
        const vh x00 = load_h(inv_diag + i * HALF);
        const vh x11 = two ? load_h(inv_diag + (i + 1) * HALF) : x00;
        const vh l10 = two ? load_h(r1 + i * HALF) : (vh){0};
        int64_t j0 = 0;
        for (; j0 + 4 <= i; j0 += 4) {
            /* named accumulators, not arrays: GCC kept arrays of these on the stack */
            vh s00 = {0}, s01 = {0}, s02 = {0}, s03 = {0}, s10 = {0}, s11 = {0}, s12 = {0}, s13 = {0};
            for (int64_t k = j0; k < j0 + 3; k++) {          /* X[k][j] = 0 for j > k */
                const double *rk = a + PACKED_H(k, 0);
                const vh v0 = load_h(r0 + k * HALF), v1 = load_h(r1 + k * HALF);
                const vh x0 = load_h(rk + j0 * HALF);
                s00 += v0 * x0; s10 += v1 * x0;
                if (k >= j0 + 1) { const vh x1 = load_h(rk + (j0 + 1) * HALF); s01 += v0 * x1; s11 += v1 * x1; }
                if (k >= j0 + 2) { const vh x2 = load_h(rk + (j0 + 2) * HALF); s02 += v0 * x2; s12 += v1 * x2; }
            }
            for (int64_t k = j0 + 3; k < i; k++) {
                const double *rk = a + PACKED_H(k, j0);
                const vh v0 = load_h(r0 + k * HALF), v1 = load_h(r1 + k * HALF);
                const vh x0 = load_h(rk), x1 = load_h(rk + HALF), x2 = load_h(rk + 2 * HALF), x3 = load_h(rk + 3 * HALF);
                s00 += v0 * x0; s01 += v0 * x1; s02 += v0 * x2; s03 += v0 * x3;
                s10 += v1 * x0; s11 += v1 * x1; s12 += v1 * x2; s13 += v1 * x3;
            }
            const vh x0 = -s00 * x00, x1 = -s01 * x00, x2 = -s02 * x00, x3 = -s03 * x00;
            store_h(r0 + j0 * HALF, x0);
            store_h(r0 + (j0 + 1) * HALF, x1);
            store_h(r0 + (j0 + 2) * HALF, x2);
            store_h(r0 + (j0 + 3) * HALF, x3);
            if (two) {
                store_h(r1 + j0 * HALF, -(s10 + l10 * x0) * x11);
                store_h(r1 + (j0 + 1) * HALF, -(s11 + l10 * x1) * x11);
                store_h(r1 + (j0 + 2) * HALF, -(s12 + l10 * x2) * x11);
                store_h(r1 + (j0 + 3) * HALF, -(s13 + l10 * x3) * x11);
            }
        }
        for (int64_t j = j0; j < i; j++) {
            vh t0 = {0}, t1 = {0};
            for (int64_t k = j; k < i; k++) {
                const vh xk = load_h(a + PACKED_H(k, j));
                t0 += load_h(r0 + k * HALF) * xk;
                t1 += load_h(r1 + k * HALF) * xk;
            }
            const vh xij = -t0 * x00;
            store_h(r0 + j * HALF, xij);
            if (two) store_h(r1 + j * HALF, -(t1 + l10 * xij) * x11);
        }
        store_h(r0 + i * HALF, x00);
        if (two) {
            store_h(r1 + i * HALF, -(l10 * x00) * x11);                /* X[i+1][i] */
            store_h(r1 + (i + 1) * HALF, x11);
        }
    }
}

/* Blocks [block0, block1): covariance (float64) = (G - n m m^T) / (n - 1) + eps I with
 * m = sums / n, its Cholesky factor L, X = L^-1 (both in place, lower triangle packed by rows,
 * in two halves of 8 lanes: 2 x 323 KB for d = 100, which stays in a core's L2 cache), and
 * W = X^T written over the block as [LANES][d][d] float32. Returns -1 when every position was
 * positive definite and finite, else the first offending position (-2: no scratch memory);
 * *nonfinite is set to 1 when that position's statistics are NaN or infinite. */
int64_t padim_whitening(float *gram, const double *sums, int64_t n, int64_t d, int64_t positions, double eps,
                        int64_t block0, int64_t block1, int32_t *nonfinite)
{
    const int64_t packed = d * (d + 1) / 2 * HALF;
    double *a = aligned_alloc(64, (size_t)((2 * packed + 2 * d * HALF) * sizeof(double) + 64));
    if (!a) return -2;
    double *halves[2] = {a, a + packed};
    double *inv_diag[2] = {a + 2 * packed, a + 2 * packed + d * HALF};
    int64_t bad = -1;
    *nonfinite = 0;
    for (int64_t block = block0; block < block1 && bad < 0; block++) {
        const int64_t p0 = block * LANES;
        const int64_t lanes = positions - p0 < LANES ? positions - p0 : LANES;
        float *g = gram + block * d * d * LANES;
        const double *s = sums + block * d * LANES;
        /* covariances of both halves first: the whitening is written over the same bytes */
        for (int h = 0; h < 2; h++) {
            double *ah = halves[h];
            for (int64_t i = 0; i < d; i++) {
                const vh mi = load_h(s + i * LANES + h * HALF) / (double)n;
                for (int64_t j = 0; j <= i; j++) {
                    const vh mj = load_h(s + j * LANES + h * HALF) / (double)n;
                    const vh gij = __builtin_convertvector(load_q(g + PACKED(i, j) + h * HALF), vh);
                    vh cov = (gij - (double)n * mi * mj) / (double)(n - 1);
                    if (i == j) cov += eps;
                    store_h(ah + PACKED_H(i, j), cov);
                }
            }
        }
        for (int h = 0; h < 2 && bad < 0; h++) {
            const int valid = lanes - h * HALF > HALF ? HALF : (int)(lanes - h * HALF > 0 ? lanes - h * HALF : 0);
            /* non-finite embeddings make their diagonal entry NaN or infinite */
            for (int64_t i = 0; i < d && bad < 0; i++) {
                const vh v = load_h(halves[h] + PACKED_H(i, i));
                for (int l = 0; l < valid; l++)
                    if (!isfinite(v[l])) { bad = p0 + h * HALF + l; *nonfinite = 1; break; }
            }
            if (bad >= 0) break;
            const int bad_lane = cholesky_lanes(halves[h], inv_diag[h], d, valid);
            if (bad_lane >= 0) { bad = p0 + h * HALF + bad_lane; break; }
            invert_lanes(halves[h], inv_diag[h], d);
        }
        if (bad >= 0) break;
        /* W = X^T: W[r][c] = X[c][r] for c >= r, else 0; written over this block's bytes */
        for (int64_t l = 0; l < LANES; l++) {
            const double *x = halves[l / HALF] + l % HALF;
            float *w = g + l * d * d;
            for (int64_t r = 0; r < d; r++) {
                for (int64_t c = 0; c < r; c++) w[r * d + c] = 0.0f;
                for (int64_t c = r; c < d; c++) w[r * d + c] = (float)x[PACKED_H(c, r)];
            }
        }
    }
    free(a);
    return bad;
}

/* Mahalanobis distances of positions [p0, p1): x [P][B][d] embeddings, mean [P][d], w [P][d][d]
 * whitening (row-major; a fit gives L^-T, a model permutes its rows into grouped channel order,
 * so no triangle is assumed), out [B][P]: out[b][p] = || (x[p][b] - mean[p]) w[p] ||. Four
 * images share each load of a row segment of w.
 * Returns 0, or -1 if the scratch could not be allocated. */
int padim_mahalanobis(const float *x, const float *mean, const float *w, int64_t batch, int64_t d,
                      int64_t positions, int64_t p0, int64_t p1, float *out)
{
    enum { ROWS = 8 };
    const int64_t col_blocks = (d + LANES - 1) / LANES;
    const int64_t width = col_blocks * LANES;
    float *wpad = aligned_alloc(64, (size_t)((d * width + ROWS * d) * sizeof(float) + 64));
    if (!wpad) return -1;
    float *centred = wpad + d * width;          /* [d][ROWS]: the images of a group side by side */
    for (int64_t p = p0; p < p1; p++) {
        const float *wp = w + p * d * d;
        const float *mu = mean + p * d;
        /* rows padded to whole vectors, so the last column block needs no masked loads */
        for (int64_t i = 0; i < d; i++) {
            memcpy(wpad + i * width, wp + i * d, (size_t)d * sizeof(float));
            memset(wpad + i * width + d, 0, (size_t)(width - d) * sizeof(float));
        }
        for (int64_t b0 = 0; b0 < batch; b0 += ROWS) {
            const int rows = batch - b0 < ROWS ? (int)(batch - b0) : ROWS;
            for (int r = 0; r < ROWS; r++)
                for (int64_t i = 0; i < d; i++)
                    centred[i * ROWS + r] = r < rows ? x[(p * batch + b0 + r) * d + i] - mu[i] : 0.0f;
            vf squares[ROWS];
            for (int r = 0; r < ROWS; r++) squares[r] = (vf){0};
            int64_t cb = 0;
            for (; cb + 2 <= col_blocks; cb += 2) {       /* two column blocks: 16 accumulators */
                vf acc0[ROWS], acc1[ROWS];
                for (int r = 0; r < ROWS; r++) acc0[r] = acc1[r] = (vf){0};
                for (int64_t i = 0; i < d; i++) {
                    const vf w0 = load_f(wpad + i * width + cb * LANES);
                    const vf w1 = load_f(wpad + i * width + (cb + 1) * LANES);
                    const float *c = centred + i * ROWS;
                    for (int r = 0; r < ROWS; r++) { acc0[r] += c[r] * w0; acc1[r] += c[r] * w1; }
                }
                for (int r = 0; r < ROWS; r++) squares[r] += acc0[r] * acc0[r] + acc1[r] * acc1[r];
            }
            for (; cb < col_blocks; cb++) {
                vf acc[ROWS];
                for (int r = 0; r < ROWS; r++) acc[r] = (vf){0};
                for (int64_t i = 0; i < d; i++) {
                    const vf w0 = load_f(wpad + i * width + cb * LANES);
                    const float *c = centred + i * ROWS;
                    for (int r = 0; r < ROWS; r++) acc[r] += c[r] * w0;
                }
                for (int r = 0; r < ROWS; r++) squares[r] += acc[r] * acc[r];
            }
            for (int r = 0; r < rows; r++) {
                double total = 0.0;
                for (int l = 0; l < LANES; l++) total += squares[r][l];
                out[(b0 + r) * positions + p] = (float)sqrt(total);
            }
        }
    }
    free(wpad);
    return 0;
}
