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

typedef float vf __attribute__((vector_size(LANES * sizeof(float)), aligned(4)));
typedef double vd __attribute__((vector_size(LANES * sizeof(double)), aligned(8)));

static inline vf load_f(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store_f(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vd load_d(const double *p) { vd v; memcpy(&v, p, sizeof v); return v; }
static inline void store_d(double *p, vd v) { memcpy(p, &v, sizeof v); }

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
            const vd previous = first ? (vd){0} : load_d(s + i * LANES);
            store_d(s + i * LANES, previous + __builtin_convertvector(total, vd));
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
    const double *row_j = a + PACKED(j, 0);
    vd diag = load_d(a + PACKED(j, j));
    for (int64_t k = 0; k < j; k++) {
        const vd ljk = load_d(row_j + k * LANES);
        diag -= ljk * ljk;
    }
    for (int l = 0; l < lanes; l++)
        if (!(diag[l] > 0.0)) return l;
    for (int l = lanes; l < LANES; l++) diag[l] = 1.0;
    vd root;
    for (int l = 0; l < LANES; l++) root[l] = sqrt(diag[l]);
    store_d(a + PACKED(j, j), root);
    store_d(inv_diag + j * LANES, 1.0 / root);
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
        const vd inv0 = load_d(inv_diag + j * LANES);
        const double *row0 = a + PACKED(j, 0), *row1 = a + PACKED(j + 1, 0);
        {   /* L[j+1][j], then the pivot of column j + 1 */
            vd t = load_d(row1 + j * LANES);
            for (int64_t k = 0; k < j; k++) t -= load_d(row1 + k * LANES) * load_d(row0 + k * LANES);
            store_d(a + PACKED(j + 1, j), t * inv0);
        }
        bad = pivot(a, inv_diag, j + 1, lanes);
        if (bad >= 0) return bad;
        const vd inv1 = load_d(inv_diag + (j + 1) * LANES);
        const vd l10 = load_d(row1 + j * LANES);
        int64_t i = j + 2;
        for (; i + 4 <= d; i += 4) {
            const double *r[4] = {a + PACKED(i, 0), a + PACKED(i + 1, 0), a + PACKED(i + 2, 0), a + PACKED(i + 3, 0)};
            vd t0[4], t1[4];
            for (int q = 0; q < 4; q++) { t0[q] = load_d(r[q] + j * LANES); t1[q] = load_d(r[q] + (j + 1) * LANES); }
            for (int64_t k = 0; k < j; k++) {
                const vd u0 = load_d(row0 + k * LANES), u1 = load_d(row1 + k * LANES);
                for (int q = 0; q < 4; q++) {
                    const vd v = load_d(r[q] + k * LANES);
                    t0[q] -= v * u0;
                    t1[q] -= v * u1;
                }
            }
            for (int q = 0; q < 4; q++) {
                const vd lij = t0[q] * inv0;
                store_d(a + PACKED(i + q, j), lij);
                store_d(a + PACKED(i + q, j + 1), (t1[q] - lij * l10) * inv1);
            }
        }
        for (; i < d; i++) {
            const double *ri = a + PACKED(i, 0);
            vd t0 = load_d(ri + j * LANES), t1 = load_d(ri + (j + 1) * LANES);
            for (int64_t k = 0; k < j; k++) {
                const vd v = load_d(ri + k * LANES);
                t0 -= v * load_d(row0 + k * LANES);
                t1 -= v * load_d(row1 + k * LANES);
            }
            const vd lij = t0 * inv0;
            store_d(a + PACKED(i, j), lij);
            store_d(a + PACKED(i, j + 1), (t1 - lij * l10) * inv1);
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
        double *r0 = a + PACKED(i, 0);
        double *r1 = two ? a + PACKED(i + 1, 0) : r0;
        const vd x00 = load_d(inv_diag + i * LANES);
        const vd x11 = two ? load_d(inv_diag + (i + 1) * LANES) : x00;
        const vd l10 = two ? load_d(r1 + i * LANES) : (vd){0};
        int64_t j0 = 0;
        for (; j0 + 4 <= i; j0 += 4) {
            vd t0[4] = {{0}, {0}, {0}, {0}}, t1[4] = {{0}, {0}, {0}, {0}};
            for (int64_t k = j0; k < i; k++) {
                const double *rk = a + PACKED(k, 0);
                const vd v0 = load_d(r0 + k * LANES), v1 = load_d(r1 + k * LANES);
                for (int c = 0; c < 4; c++) {
                    if (j0 + c > k) continue;                     /* X[k][j] = 0 for j > k */
                    const vd xk = load_d(rk + (j0 + c) * LANES);
                    t0[c] += v0 * xk;
                    t1[c] += v1 * xk;
                }
            }
            for (int c = 0; c < 4; c++) {
                const vd xij = -t0[c] * x00;
                store_d(r0 + (j0 + c) * LANES, xij);
                if (two) store_d(r1 + (j0 + c) * LANES, -(t1[c] + l10 * xij) * x11);
            }
        }
        for (int64_t j = j0; j < i; j++) {
            vd t0 = {0}, t1 = {0};
            for (int64_t k = j; k < i; k++) {
                const vd xk = load_d(a + PACKED(k, j));
                t0 += load_d(r0 + k * LANES) * xk;
                t1 += load_d(r1 + k * LANES) * xk;
            }
            const vd xij = -t0 * x00;
            store_d(r0 + j * LANES, xij);
            if (two) store_d(r1 + j * LANES, -(t1 + l10 * xij) * x11);
        }
        store_d(r0 + i * LANES, x00);
        if (two) {
            store_d(r1 + i * LANES, -(l10 * x00) * x11);                /* X[i+1][i] */
            store_d(r1 + (i + 1) * LANES, x11);
        }
    }
}

/* Blocks [block0, block1): covariance (float64) = (G - n m m^T) / (n - 1) + eps I with
 * m = sums / n, its Cholesky factor L, X = L^-1 (both in place, lower triangle packed by rows:
 * 16 lanes of a 100 x 100 problem then take 646 KB, which stays in a core's L2 cache), and
 * W = X^T written over the block as [LANES][d][d] float32. Returns -1 when every position was
 * positive definite and finite, else the first offending position (-2: no scratch memory);
 * *nonfinite is set to 1 when that position's statistics are NaN or infinite. */
int64_t padim_whitening(float *gram, const double *sums, int64_t n, int64_t d, int64_t positions, double eps,
                        int64_t block0, int64_t block1, int32_t *nonfinite)
{
    double *a = aligned_alloc(64, (size_t)((d * (d + 1) / 2) * LANES * sizeof(double) + 64));
    double *inv_diag = aligned_alloc(64, (size_t)(d * LANES * sizeof(double) + 64));
    if (!a || !inv_diag) { free(a); free(inv_diag); return -2; }
    int64_t bad = -1;
    *nonfinite = 0;
    for (int64_t block = block0; block < block1 && bad < 0; block++) {
        const int64_t p0 = block * LANES;
        const int64_t lanes = positions - p0 < LANES ? positions - p0 : LANES;
        float *g = gram + block * d * d * LANES;
        const double *s = sums + block * d * LANES;
        /* covariance, lower triangle */
        for (int64_t i = 0; i < d; i++) {
            vd mi = load_d(s + i * LANES) / (double)n;
            for (int64_t j = 0; j <= i; j++) {
                vd mj = load_d(s + j * LANES) / (double)n;
                vd gij = __builtin_convertvector(load_f(g + PACKED(i, j)), vd);
                vd cov = (gij - (double)n * mi * mj) / (double)(n - 1);
                if (i == j) cov += eps;
                store_d(a + PACKED(i, j), cov);
            }
        }
        /* non-finite embeddings make their diagonal entry NaN or infinite */
        for (int64_t i = 0; i < d && bad < 0; i++) {
            vd v = load_d(a + PACKED(i, i));
            for (int l = 0; l < lanes; l++)
                if (!isfinite(v[l])) { bad = p0 + l; *nonfinite = 1; break; }
        }
        if (bad >= 0) break;
        const int bad_lane = cholesky_lanes(a, inv_diag, d, (int)lanes);
        if (bad_lane >= 0) { bad = p0 + bad_lane; break; }
        invert_lanes(a, inv_diag, d);
        /* W = X^T: W[r][c] = X[c][r] for c >= r, else 0; written over this block's bytes */
        for (int64_t l = 0; l < LANES; l++) {
            float *w = g + l * d * d;
            for (int64_t r = 0; r < d; r++) {
                for (int64_t c = 0; c < r; c++) w[r * d + c] = 0.0f;
                for (int64_t c = r; c < d; c++) w[r * d + c] = (float)a[PACKED(c, r) + l];
            }
        }
    }
    free(a);
    free(inv_diag);
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
