/* PaDiM's Gaussian fit on the CPU, vectorised across feature positions.
 *
 * Every position has its own small d x d problem (a Gram matrix, a Cholesky factorisation, a
 * triangular inverse). BLAS and LAPACK take them one at a time, where call overhead and the
 * short inner loops dominate; here the 16 positions of a block are the 16 lanes of one vector,
 * so every scalar step of the textbook algorithms is one full-width vector operation.
 *
 * Layouts (float32 unless said otherwise; P positions in blocks of LANES, the last one padded):
 *   x       [P][B][d]        one batch of embeddings, positions first (what fit_padim hands
 *           over; read as 16 sequential runs per block), or [B][d][P] (positions contiguous)
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
#ifdef __linux__
#include <sys/mman.h>
#include <unistd.h>
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23   /* Linux 5.14 */
#endif
#endif

#define LANES 16
#define TILE 4
/* offset of entry (i, j), j <= i, of a lower triangle packed by rows, LANES per entry */
#define PACKED(i, j) ((((i) * ((i) + 1)) / 2 + (j)) * LANES)
#define PACKED_H(i, j) ((((i) * ((i) + 1)) / 2 + (j)) * HALF)

typedef float vf __attribute__((vector_size(LANES * sizeof(float)), aligned(4)));
typedef int32_t vi __attribute__((vector_size(LANES * sizeof(int32_t))));
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

/* Two-vector shuffles with constant indices: clang and GCC 12+ spell them
 * __builtin_shufflevector, older GCC only __builtin_shuffle (with a mask vector). */
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define PADIM_SHUFFLEVECTOR 1
#endif
#endif
#define INDICES(...) __VA_ARGS__
#ifdef PADIM_SHUFFLEVECTOR
#define SHUFFLE(a, b, indices) __builtin_shufflevector(a, b, INDICES indices)
#else
#define SHUFFLE(a, b, indices) __builtin_shuffle(a, b, (vi){INDICES indices})
#endif

/* A 16 x 16 transpose in registers: after it t[l][q] holds what t[q][l] held. Four rounds;
 * round b swaps bit b of the row and of the column index between each pair of rows b apart:
 * column j of the upper row keeps j where bit b is 0, else takes the lower row's j - b; the
 * lower row takes the upper row's j + b where bit b is 0, else keeps j. */
static inline void transpose16(vf t[LANES])
{
#define SWAP_BITS(b, upper, lower)                                                               \
    for (int i = 0; i < LANES; i++)                                                              \
        if (!(i & (b))) {                                                                        \
            const vf top = t[i], bottom = t[i + (b)];                                            \
            t[i] = SHUFFLE(top, bottom, upper);                                                  \
            t[i + (b)] = SHUFFLE(top, bottom, lower);                                            \
        }
    SWAP_BITS(1, (0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30),
                 (1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31))
    SWAP_BITS(2, (0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29),
                 (2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31))
    SWAP_BITS(4, (0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27),
                 (4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31))
    SWAP_BITS(8, (0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
                 (8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31))
#undef SWAP_BITS
}

/* 4x4 tile of Gram lanes: g[i0+r][j0+c] += sum_b xc[b][i0+r] * xc[b][j0+c] (packed lower
 * triangle). On a diagonal tile (i0 == j0) only c <= r exists. */
static void gram_tile(float *g, const float *xc, int64_t batch, int64_t d, int64_t i0, int64_t j0, int first)
{
    const int diagonal = i0 == j0;
    /* the Gram entries two tiles along: each row of a tile row is a contiguous stream, which the
     * hardware prefetchers left to stall on every tile's first loads */
    for (int r = 0; r < TILE; r++)
        for (int c = 0; c < TILE; c++)
            __builtin_prefetch(g + PACKED(i0 + r, j0 + 2 * TILE + c), 1, 3);
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

/* Map the pages of [start, start + bytes) before the first batch's stores, one system call per
 * thread and slice, in 2 MiB pages where the kernel allows: it then zeroes them in one go instead
 * of taking a fault per 4 KiB page. Pages already mapped (memory the heap recycled) stay as they
 * are. Both advices only change how pages are mapped, never their contents, so rounding the
 * range out to whole pages is harmless. Without them (older kernels, not Linux) the stores fault
 * the pages as before. */
static void populate(void *start, size_t bytes)
{
#ifdef __linux__
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    const uintptr_t lo = (uintptr_t)start & ~(page - 1), hi = ((uintptr_t)start + bytes + page - 1) & ~(page - 1);
    (void)madvise((void *)lo, hi - lo, MADV_HUGEPAGE);
    (void)madvise((void *)lo, hi - lo, MADV_POPULATE_WRITE);
#else
    (void)start;
    (void)bytes;
#endif
}

/* One block of positions of x [B][d][P] into lanes: xc[b][i][l] = x[b][i][p0 + l] - shift,
 * totals[i] = sum over b. Each (b, i) is one 64-byte piece of a row P floats long. */
static void lanes_from_features_first(const float *x, int64_t batch, int64_t d, int64_t positions, const float *shift,
                                      int64_t p0, int64_t lanes, float *xc, vf *totals)
{
    for (int64_t i = 0; i < d; i++) {
        const float *sh = shift + i * positions + p0;
        vf total = {0};
        for (int64_t b = 0; b < batch; b++) {
            const float *src = x + (b * d + i) * positions + p0;
            vf v;
            if (lanes == LANES) v = load_f(src) - load_f(sh);   /* a per-lane loop here cost more than the tiles */
            else for (int64_t l = 0; l < LANES; l++) v[l] = l < lanes ? src[l] - sh[l] : 0.0f;
            store_f(xc + (b * d + i) * LANES, v);
            total += v;
        }
        totals[i] = total;
    }
}

/* The same from x [P][B][d] (positions first, the layout a model's embedding produces for
 * scoring): the block's positions are 16 contiguous runs of B * d floats, read sixteen values
 * of each at a time and transposed in registers: sequential reads, where the layout above
 * reads B * d pieces scattered P floats apart. ``shift_block`` [d][LANES] is scratch. */
static void lanes_from_positions_first(const float *x, int64_t batch, int64_t d, int64_t positions, const float *shift,
                                       int64_t p0, int64_t lanes, float *xc, vf *totals, float *shift_block)
{
    const int64_t elements = batch * d;
    for (int64_t i = 0; i < d; i++) {
        for (int64_t l = 0; l < LANES; l++) shift_block[i * LANES + l] = l < lanes ? shift[i * positions + p0 + l] : 0.0f;
        totals[i] = (vf){0};
    }
    int64_t i = 0;                                  /* feature of element e0 (e = b * d + i) */
    for (int64_t e0 = 0; e0 < elements; e0 += LANES) {
        const int64_t count = elements - e0 < LANES ? elements - e0 : LANES;
        vf t[LANES];
        for (int64_t l = 0; l < LANES; l++) {
            const float *src = x + (p0 + l) * elements + e0;
            if (l >= lanes) t[l] = (vf){0};
            else if (count == LANES) {
                __builtin_prefetch(src + 256, 0, 3);   /* 1 KB ahead: sixteen streams outran the hardware prefetcher */
                t[l] = load_f(src);
            }
            else {
                t[l] = (vf){0};
                for (int64_t q = 0; q < count; q++) t[l][q] = src[q];
            }
        }
        transpose16(t);                             /* t[q][l] = x[p0 + l][e0 + q] */
        for (int64_t q = 0; q < count; q++) {
            const vf v = t[q] - load_f(shift_block + i * LANES);
            store_f(xc + (e0 + q) * LANES, v);
            totals[i] += v;
            if (++i == d) i = 0;
        }
    }
}

/* Add one batch to blocks [block0, block1): x [B][d][P], or [P][B][d] with ``positions_first``.
 * ``first``: the arrays hold no sums yet (they may be uninitialised memory: the first batch
 * writes instead of adding, so the fit never zeroes the Gram array first). Returns 0, or -1 if
 * the scratch could not be allocated. */
int padim_gram_update(const float *x, int64_t batch, int64_t d, int64_t positions, const float *shift,
                      float *gram, double *sums, int64_t block0, int64_t block1, int first, int positions_first)
{
    float *xc = aligned_alloc(64, (size_t)((batch * d * LANES + 2 * d * LANES) * sizeof(float) + 64));
    if (!xc) return -1;
    vf *totals = (vf *)(xc + batch * d * LANES);    /* 64-byte aligned: batch * d * LANES floats before it */
    float *shift_block = xc + batch * d * LANES + d * LANES;
    if (first) populate(gram + block0 * d * d * LANES, (size_t)((block1 - block0) * d * d * LANES) * sizeof(float));
    for (int64_t block = block0; block < block1; block++) {
        const int64_t p0 = block * LANES;
        const int64_t lanes = positions - p0 < LANES ? positions - p0 : LANES;
        if (positions_first) lanes_from_positions_first(x, batch, d, positions, shift, p0, lanes, xc, totals, shift_block);
        else lanes_from_features_first(x, batch, d, positions, shift, p0, lanes, xc, totals);
        for (int64_t i = 0; i < d; i++) {
            double *s = sums + (block * d + i) * LANES;
            for (int l = 0; l < LANES; l++) s[l] = (first ? 0.0 : s[l]) + (double)totals[i][l];
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

/* A pivot: its root and reciprocal, or the first lane (below ``lanes``) that is not positive
 * (or NaN); padding lanes get 1. */
static inline int take_pivot(vh value, int lanes, vh *root, vh *inverse)
{
    for (int l = 0; l < lanes; l++)
        if (!(value[l] > 0.0)) return l;
    for (int l = lanes; l < HALF; l++) value[l] = 1.0;
    for (int l = 0; l < HALF; l++) (*root)[l] = sqrt(value[l]);
    *inverse = 1.0 / *root;
    return -1;
}

/* Column j alone (the last d % 4 columns): pivot, then L[i][j] for every row below. */
static int cholesky_column(double *a, double *inv_diag, int64_t d, int64_t j, int lanes)
{
    const double *row_j = a + PACKED_H(j, 0);
    vh diag = load_h(a + PACKED_H(j, j));
    for (int64_t k = 0; k < j; k++) diag -= load_h(row_j + k * HALF) * load_h(row_j + k * HALF);
    vh root, inv;
    const int bad = take_pivot(diag, lanes, &root, &inv);
    if (bad >= 0) return bad;
    store_h(a + PACKED_H(j, j), root);
    store_h(inv_diag + j * HALF, inv);
    for (int64_t i = j + 1; i < d; i++) {
        const double *ri = a + PACKED_H(i, 0);
        vh t = load_h(ri + j * HALF);
        for (int64_t k = 0; k < j; k++) t -= load_h(ri + k * HALF) * load_h(row_j + k * HALF);
        store_h(a + PACKED_H(i, j), t * inv);
    }
    return -1;
}

/* In-place Cholesky (dot-product form) of the packed lower triangle ``a``, four columns at a
 * time: the 4 x 4 diagonal block first, then four rows at a time, sixteen sums per k from eight
 * loads (the panel's four rows stay in L1 while the rows below stream from L2). Returns the
 * first lane (below ``lanes``) whose matrix is not positive definite, else -1. */
static int cholesky_lanes(double *a, double *inv_diag, int64_t d, int lanes)
{
    int64_t j = 0;
    for (; j + 4 <= d; j += 4) {
        const double *u0 = a + PACKED_H(j, 0), *u1 = a + PACKED_H(j + 1, 0);
        const double *u2 = a + PACKED_H(j + 2, 0), *u3 = a + PACKED_H(j + 3, 0);
        vh t00 = load_h(u0 + j * HALF);
        vh t10 = load_h(u1 + j * HALF), t11 = load_h(u1 + (j + 1) * HALF);
        vh t20 = load_h(u2 + j * HALF), t21 = load_h(u2 + (j + 1) * HALF), t22 = load_h(u2 + (j + 2) * HALF);
        vh t30 = load_h(u3 + j * HALF), t31 = load_h(u3 + (j + 1) * HALF), t32 = load_h(u3 + (j + 2) * HALF);
        vh t33 = load_h(u3 + (j + 3) * HALF);
        for (int64_t k = 0; k < j; k++) {
            const vh v0 = load_h(u0 + k * HALF), v1 = load_h(u1 + k * HALF);
            const vh v2 = load_h(u2 + k * HALF), v3 = load_h(u3 + k * HALF);
            t00 -= v0 * v0;
            t10 -= v1 * v0; t11 -= v1 * v1;
            t20 -= v2 * v0; t21 -= v2 * v1; t22 -= v2 * v2;
            t30 -= v3 * v0; t31 -= v3 * v1; t32 -= v3 * v2; t33 -= v3 * v3;
        }
        vh l00, i0, l11, i1, l22, i2, l33, i3;
        int bad = take_pivot(t00, lanes, &l00, &i0);
        if (bad >= 0) return bad;
        const vh l10 = t10 * i0, l20 = t20 * i0, l30 = t30 * i0;
        if ((bad = take_pivot(t11 - l10 * l10, lanes, &l11, &i1)) >= 0) return bad;
        const vh l21 = (t21 - l20 * l10) * i1, l31 = (t31 - l30 * l10) * i1;
        if ((bad = take_pivot(t22 - l20 * l20 - l21 * l21, lanes, &l22, &i2)) >= 0) return bad;
        const vh l32 = (t32 - l30 * l20 - l31 * l21) * i2;
        if ((bad = take_pivot(t33 - l30 * l30 - l31 * l31 - l32 * l32, lanes, &l33, &i3)) >= 0) return bad;
        store_h(a + PACKED_H(j, j), l00);
        store_h(a + PACKED_H(j + 1, j), l10); store_h(a + PACKED_H(j + 1, j + 1), l11);
        store_h(a + PACKED_H(j + 2, j), l20); store_h(a + PACKED_H(j + 2, j + 1), l21);
        store_h(a + PACKED_H(j + 2, j + 2), l22);
        store_h(a + PACKED_H(j + 3, j), l30); store_h(a + PACKED_H(j + 3, j + 1), l31);
        store_h(a + PACKED_H(j + 3, j + 2), l32); store_h(a + PACKED_H(j + 3, j + 3), l33);
        store_h(inv_diag + j * HALF, i0); store_h(inv_diag + (j + 1) * HALF, i1);
        store_h(inv_diag + (j + 2) * HALF, i2); store_h(inv_diag + (j + 3) * HALF, i3);
        int64_t i = j + 4;
        for (; i < d; i++) {
            /* four rows at once where four remain; the sums of a row r use L[r][k] for k < j */
            if (i + 4 <= d) {
                const double *r0 = a + PACKED_H(i, 0), *r1 = a + PACKED_H(i + 1, 0);
                const double *r2 = a + PACKED_H(i + 2, 0), *r3 = a + PACKED_H(i + 3, 0);
                /* named accumulators, not arrays: GCC kept arrays of these on the stack */
                vh s00 = load_h(r0 + j * HALF), s01 = load_h(r0 + (j + 1) * HALF);
                vh s02 = load_h(r0 + (j + 2) * HALF), s03 = load_h(r0 + (j + 3) * HALF);
                vh s10 = load_h(r1 + j * HALF), s11 = load_h(r1 + (j + 1) * HALF);
                vh s12 = load_h(r1 + (j + 2) * HALF), s13 = load_h(r1 + (j + 3) * HALF);
                vh s20 = load_h(r2 + j * HALF), s21 = load_h(r2 + (j + 1) * HALF);
                vh s22 = load_h(r2 + (j + 2) * HALF), s23 = load_h(r2 + (j + 3) * HALF);
                vh s30 = load_h(r3 + j * HALF), s31 = load_h(r3 + (j + 1) * HALF);
                vh s32 = load_h(r3 + (j + 2) * HALF), s33 = load_h(r3 + (j + 3) * HALF);
                for (int64_t k = 0; k < j; k++) {
                    const vh p0 = load_h(u0 + k * HALF), p1 = load_h(u1 + k * HALF);
                    const vh p2 = load_h(u2 + k * HALF), p3 = load_h(u3 + k * HALF);
                    vh v = load_h(r0 + k * HALF);
                    s00 -= v * p0; s01 -= v * p1; s02 -= v * p2; s03 -= v * p3;
                    v = load_h(r1 + k * HALF);
                    s10 -= v * p0; s11 -= v * p1; s12 -= v * p2; s13 -= v * p3;
                    v = load_h(r2 + k * HALF);
                    s20 -= v * p0; s21 -= v * p1; s22 -= v * p2; s23 -= v * p3;
                    v = load_h(r3 + k * HALF);
                    s30 -= v * p0; s31 -= v * p1; s32 -= v * p2; s33 -= v * p3;
                }
#define PANEL_ROW(row, s0, s1, s2, s3)                                                           \
                {                                                                                \
                    const vh x0 = s0 * i0, x1 = (s1 - x0 * l10) * i1;                            \
                    const vh x2 = (s2 - x0 * l20 - x1 * l21) * i2;                               \
                    const vh x3 = (s3 - x0 * l30 - x1 * l31 - x2 * l32) * i3;                    \
                    store_h(a + PACKED_H(row, j), x0); store_h(a + PACKED_H(row, j + 1), x1);    \
                    store_h(a + PACKED_H(row, j + 2), x2); store_h(a + PACKED_H(row, j + 3), x3); \
                }
                PANEL_ROW(i, s00, s01, s02, s03)
                PANEL_ROW(i + 1, s10, s11, s12, s13)
                PANEL_ROW(i + 2, s20, s21, s22, s23)
                PANEL_ROW(i + 3, s30, s31, s32, s33)
                i += 3;
                continue;
            }
            const double *ri = a + PACKED_H(i, 0);
            vh s0 = load_h(ri + j * HALF), s1 = load_h(ri + (j + 1) * HALF);
            vh s2 = load_h(ri + (j + 2) * HALF), s3 = load_h(ri + (j + 3) * HALF);
            for (int64_t k = 0; k < j; k++) {
                const vh v = load_h(ri + k * HALF);
                s0 -= v * load_h(u0 + k * HALF); s1 -= v * load_h(u1 + k * HALF);
                s2 -= v * load_h(u2 + k * HALF); s3 -= v * load_h(u3 + k * HALF);
            }
            PANEL_ROW(i, s0, s1, s2, s3)
#undef PANEL_ROW
        }
    }
    for (; j < d; j++) {
        const int bad = cholesky_column(a, inv_diag, d, j, lanes);
        if (bad >= 0) return bad;
    }
    return -1;
}

/* X = L^-1 in place, row by row: X[i][j] = -X[i][i] sum_{k=j}^{i-1} L[i][k] X[k][j] (rows
 * k < i hold X already; row i is still L from column j on). Four rows and four columns at a
 * time, sixteen sums per k from eight loads; row i + r also needs k = i .. i + r - 1, the rows
 * of its own group, added once their X is known. Rows past the last group of four go one by one. */
static void invert_lanes(double *a, const double *inv_diag, int64_t d)
{
    int64_t i = 0;
    for (; i + 4 <= d; i += 4) {
        double *r0 = a + PACKED_H(i, 0), *r1 = a + PACKED_H(i + 1, 0);
        double *r2 = a + PACKED_H(i + 2, 0), *r3 = a + PACKED_H(i + 3, 0);
        const vh d0 = load_h(inv_diag + i * HALF), d1 = load_h(inv_diag + (i + 1) * HALF);
        const vh d2 = load_h(inv_diag + (i + 2) * HALF), d3 = load_h(inv_diag + (i + 3) * HALF);
        /* L's diagonal block of the group, still intact */
        const vh l10 = load_h(r1 + i * HALF);
        const vh l20 = load_h(r2 + i * HALF), l21 = load_h(r2 + (i + 1) * HALF);
        const vh l30 = load_h(r3 + i * HALF), l31 = load_h(r3 + (i + 1) * HALF), l32 = load_h(r3 + (i + 2) * HALF);
        for (int64_t j0 = 0; j0 < i; j0 += 4) {
            vh s00 = {0}, s01 = {0}, s02 = {0}, s03 = {0}, s10 = {0}, s11 = {0}, s12 = {0}, s13 = {0};
            vh s20 = {0}, s21 = {0}, s22 = {0}, s23 = {0}, s30 = {0}, s31 = {0}, s32 = {0}, s33 = {0};
            for (int64_t k = j0; k < j0 + 3; k++) {          /* X[k][j] = 0 for j > k: not stored */
                const double *rk = a + PACKED_H(k, 0);
                const vh v0 = load_h(r0 + k * HALF), v1 = load_h(r1 + k * HALF);
                const vh v2 = load_h(r2 + k * HALF), v3 = load_h(r3 + k * HALF);
                const vh x0 = load_h(rk + j0 * HALF);
                s00 += v0 * x0; s10 += v1 * x0; s20 += v2 * x0; s30 += v3 * x0;
                if (k >= j0 + 1) {
                    const vh x1 = load_h(rk + (j0 + 1) * HALF);
                    s01 += v0 * x1; s11 += v1 * x1; s21 += v2 * x1; s31 += v3 * x1;
                }
                if (k >= j0 + 2) {
                    const vh x2 = load_h(rk + (j0 + 2) * HALF);
                    s02 += v0 * x2; s12 += v1 * x2; s22 += v2 * x2; s32 += v3 * x2;
                }
            }
            for (int64_t k = j0 + 3; k < i; k++) {
                const double *rk = a + PACKED_H(k, j0);
                const vh x0 = load_h(rk), x1 = load_h(rk + HALF), x2 = load_h(rk + 2 * HALF), x3 = load_h(rk + 3 * HALF);
                vh v = load_h(r0 + k * HALF);
                s00 += v * x0; s01 += v * x1; s02 += v * x2; s03 += v * x3;
                v = load_h(r1 + k * HALF);
                s10 += v * x0; s11 += v * x1; s12 += v * x2; s13 += v * x3;
                v = load_h(r2 + k * HALF);
                s20 += v * x0; s21 += v * x1; s22 += v * x2; s23 += v * x3;
                v = load_h(r3 + k * HALF);
                s30 += v * x0; s31 += v * x1; s32 += v * x2; s33 += v * x3;
            }
#define GROUP_COLUMN(c, s0, s1, s2, s3)                                                          \
            {                                                                                    \
                const vh x0 = -s0 * d0, x1 = -(s1 + l10 * x0) * d1;                              \
                const vh x2 = -(s2 + l20 * x0 + l21 * x1) * d2;                                  \
                const vh x3 = -(s3 + l30 * x0 + l31 * x1 + l32 * x2) * d3;                       \
                store_h(r0 + (j0 + c) * HALF, x0); store_h(r1 + (j0 + c) * HALF, x1);            \
                store_h(r2 + (j0 + c) * HALF, x2); store_h(r3 + (j0 + c) * HALF, x3);            \
            }
            GROUP_COLUMN(0, s00, s10, s20, s30)
            GROUP_COLUMN(1, s01, s11, s21, s31)
            GROUP_COLUMN(2, s02, s12, s22, s32)
            GROUP_COLUMN(3, s03, s13, s23, s33)
#undef GROUP_COLUMN
        }
        /* the group's own diagonal block: X = L^-1 of a 4 x 4 lower triangle */
        const vh x10 = -(l10 * d0) * d1;
        const vh x21 = -(l21 * d1) * d2, x20 = -(l20 * d0 + l21 * x10) * d2;
        const vh x32 = -(l32 * d2) * d3, x31 = -(l31 * d1 + l32 * x21) * d3;
        const vh x30 = -(l30 * d0 + l31 * x10 + l32 * x20) * d3;
        store_h(r0 + i * HALF, d0);
        store_h(r1 + i * HALF, x10); store_h(r1 + (i + 1) * HALF, d1);
        store_h(r2 + i * HALF, x20); store_h(r2 + (i + 1) * HALF, x21); store_h(r2 + (i + 2) * HALF, d2);
        store_h(r3 + i * HALF, x30); store_h(r3 + (i + 1) * HALF, x31); store_h(r3 + (i + 2) * HALF, x32);
        store_h(r3 + (i + 3) * HALF, d3);
    }
    for (; i < d; i++) {                     /* the last d % 4 rows */
        double *ri = a + PACKED_H(i, 0);
        const vh dii = load_h(inv_diag + i * HALF);
        for (int64_t j = 0; j < i; j++) {
            vh t = {0};
            for (int64_t k = j; k < i; k++) t += load_h(ri + k * HALF) * load_h(a + PACKED_H(k, j));
            store_h(ri + j * HALF, -t * dii);
        }
        store_h(ri + i * HALF, dii);
    }
}

/* W = X^T as [LANES][d][d] float32 over the block's bytes: W_l[r][c] = X_l[c][r] for c >= r,
 * else 0. X's lanes are contiguous per entry, W's are d * d apart, so sixteen entries of a
 * column of X (all lanes) are transposed in registers into sixteen entries of a row of every W.
 * Rows are written in whole vectors (the last one overlapping the one before it when d is not a
 * multiple of 16): one entry at a time, or with memset/memcpy for the edges, this step cost as
 * much as the factorisation. */
static void write_whitening(float *g, double *const halves[2], int64_t d)
{
    if (d < LANES) {
        for (int64_t l = 0; l < LANES; l++)
            for (int64_t r = 0; r < d; r++)
                for (int64_t c = 0; c < d; c++)
                    g[(l * d + r) * d + c] = c < r ? 0.0f : (float)halves[l / HALF][PACKED_H(c, r) + l % HALF];
        return;
    }
    for (int64_t r = 0; r < d; r++)
        for (int64_t c0 = 0; c0 < d; c0 += LANES) {
            if (c0 + LANES > d) c0 = d - LANES;            /* the last vector overlaps: same values */
            if (c0 + LANES <= r) {
                for (int64_t l = 0; l < LANES; l++) store_f(g + (l * d + r) * d + c0, (vf){0});
                continue;
            }
            vf t[LANES];
            for (int64_t q = 0; q < LANES; q++) {
                if (c0 + q < r) { t[q] = (vf){0}; continue; }
                const vq low = __builtin_convertvector(load_h(halves[0] + PACKED_H(c0 + q, r)), vq);
                const vq high = __builtin_convertvector(load_h(halves[1] + PACKED_H(c0 + q, r)), vq);
                memcpy(&t[q], &low, sizeof low);
                memcpy((char *)&t[q] + sizeof low, &high, sizeof high);
            }
            transpose16(t);
            for (int64_t l = 0; l < LANES; l++) store_f(g + (l * d + r) * d + c0, t[l]);
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
        write_whitening(g, halves, d);
    }
    free(a);
    return bad;
}

/* For every row i of the whitening matrices w [P][d][d]: the first column holding a non-zero
 * (or NaN) entry at any of positions [p0, p1), lowered into first[i] (which starts at d, or at
 * an earlier chunk's result). A fit's L^-T is upper triangular: first[i] = i. */
static inline int all_lanes(vi mask)
{
    uint64_t words[LANES / 2], all = ~(uint64_t)0;
    memcpy(words, &mask, sizeof mask);
    for (int k = 0; k < LANES / 2; k++) all &= words[k];
    return all == ~(uint64_t)0;
}

void padim_row_support(const float *w, int64_t d, int64_t p0, int64_t p1, int32_t *first)
{
    for (int64_t p = p0; p < p1; p++)
        for (int64_t i = 0; i < d; i++) {
            const float *row = w + (p * d + i) * d;
            int64_t c = 0;
            /* whole vectors while all zero (NaN == 0 is false: NaN counts as non-zero) */
            for (; c + 4 * LANES <= first[i]; c += 4 * LANES)
                if (!all_lanes((load_f(row + c) == 0.0f) & (load_f(row + c + LANES) == 0.0f)
                               & (load_f(row + c + 2 * LANES) == 0.0f) & (load_f(row + c + 3 * LANES) == 0.0f)))
                    break;
            for (; c + LANES <= first[i]; c += LANES)
                if (!all_lanes(load_f(row + c) == 0.0f)) break;
            if (c < first[i] && c + LANES <= d) {          /* the rest in one vector, lanes past first[i] masked */
                const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
                const vi past = lane + (int32_t)(c - first[i]) >= 0;
                if (all_lanes((load_f(row + c) == 0.0f) | past)) continue;
            }
            for (; c < first[i]; c++)
                if (!(row[c] == 0.0f)) { first[i] = (int32_t)c; break; }
        }
}

/* Mahalanobis distances of positions [p0, p1): x [P][B][d] embeddings, mean [P][d], w [P][d][d]
 * whitening (row-major), out [B][P]: out[b][p] = || (x[p][b] - mean[p]) w[p] ||. ``order``
 * lists w's rows by ``first_column`` (ascending; see padim_row_support): row order[k] is zero
 * left of column first_column[k] at every position, so a block of 16 columns needs only the rows
 * whose first column lies left of its end: about 60% of the products for a fit's triangular
 * L^-T (order the identity), all of them for a dense w (first_column all 0). Per block of columns
 * eight images share each load of a row segment; the next position's w and x are prefetched a
 * share per step. Returns 0, or -1 if the scratch could not be allocated. */
int padim_mahalanobis(const float *x, const float *mean, const float *w, int64_t batch, int64_t d,
                      int64_t positions, int64_t p0, int64_t p1, const int32_t *order, const int32_t *first_column,
                      float *out)
{
    enum { ROWS = 8 };
    const int64_t col_blocks = (d + LANES - 1) / LANES, pairs = (col_blocks + 1) / 2;
    const int64_t width = col_blocks * LANES;
    const int64_t groups = (batch + ROWS - 1) / ROWS, padded_batch = groups * ROWS;
    /* d < LANES: rows copied into zero-padded scratch; else the last block of columns overlaps
     * the one before it and masks the columns that one counted */
    const int padded = d < LANES;
    const size_t floats = (size_t)(padded_batch * width + padded_batch * LANES + (padded ? d * LANES : 0));
    float *scratch = aligned_alloc(64, (floats * sizeof(float) + 2 * (size_t)col_blocks * sizeof(int64_t) + 127) / 64 * 64);
    if (!scratch) return -1;
    float *centred = scratch;                                  /* [padded_batch][width], padding rows 0 */
    float *squares = centred + padded_batch * width;           /* [padded_batch][LANES] */
    float *wpad = squares + padded_batch * LANES;              /* [d][LANES], rows in ``order`` */
    int64_t *start = (int64_t *)(scratch + floats), *limit = start + col_blocks;
    for (int64_t cb = 0; cb < col_blocks; cb++) {
        start[cb] = padded ? 0 : (cb * LANES + LANES <= d ? cb * LANES : d - LANES);
        int64_t k = 0;
        while (k < d && first_column[k] < start[cb] + LANES) k++;
        limit[cb] = k;
    }
    vf tail_mask;
    for (int l = 0; l < LANES; l++)
        tail_mask[l] = padded || start[col_blocks - 1] + l >= (col_blocks - 1) * LANES ? 1.0f : 0.0f;
    const int64_t w_lines = (d * d * (int64_t)sizeof(float) + 63) / 64;
    const int64_t x_lines = (batch * d * (int64_t)sizeof(float) + 63) / 64;
    memset(centred, 0, (size_t)(padded_batch * width) * sizeof(float));
    for (int64_t p = p0; p < p1; p++) {
        const float *wp = w + p * d * d;
        const float *mu = mean + p * d;
        if (padded)
            for (int64_t k = 0; k < d; k++) {
                memset(wpad + k * LANES, 0, LANES * sizeof(float));
                memcpy(wpad + k * LANES, wp + (int64_t)order[k] * d, (size_t)d * sizeof(float));
            }
        /* centred rows in their own order, read through ``order`` below: gathering them into w's
         * row order here, value by value, cost more than all the products */
        for (int64_t b = 0; b < batch; b++) {
            const float *xb = x + (p * batch + b) * d;
            float *cb_row = centred + b * width;
            for (int64_t k = 0; k < d; k++) cb_row[k] = xb[k] - mu[k];
        }
        memset(squares, 0, (size_t)(padded_batch * LANES) * sizeof(float));
        /* column blocks in pairs; with an odd count the first block goes alone: of a triangle's
         * blocks it needs the fewest rows (the last one needs them all) */
        for (int64_t unit = 0; unit < pairs; unit++) {
            const int alone = col_blocks % 2 && unit == 0;
            const int64_t cb = col_blocks % 2 ? (alone ? 0 : 2 * unit - 1) : 2 * unit;
            const int two = !alone;
            const int64_t lim0 = limit[cb], lim1 = two ? limit[cb + 1] : lim0;
            const int last0 = cb == col_blocks - 1, last1 = two && cb + 1 == col_blocks - 1;
            for (int64_t b0 = 0; b0 < padded_batch; b0 += ROWS) {
                if (p + 1 < p1) {
                    /* the hardware prefetchers do not follow rows of w read 64 bytes at a time */
                    const int64_t step = unit * groups + b0 / ROWS, steps = pairs * groups;
                    const char *w_next = (const char *)(wp + d * d), *x_next = (const char *)(x + (p + 1) * batch * d);
                    for (int64_t line = w_lines * step / steps; line < w_lines * (step + 1) / steps; line++)
                        __builtin_prefetch(w_next + line * 64, 0, 3);
                    for (int64_t line = x_lines * step / steps; line < x_lines * (step + 1) / steps; line++)
                        __builtin_prefetch(x_next + line * 64, 0, 3);
                }
                const float *c = centred + b0 * width;
                vf acc0[ROWS], acc1[ROWS];
                for (int r = 0; r < ROWS; r++) acc0[r] = acc1[r] = (vf){0};
                int64_t k = 0;
                if (padded) {
                    for (; k < lim0; k++) {
                        const int64_t row = order[k];
                        const vf w0 = load_f(wpad + k * LANES);
                        for (int r = 0; r < ROWS; r++) acc0[r] += c[r * width + row] * w0;
                    }
                } else if (two) {
                    for (; k < lim0; k++) {
                        const int64_t row = order[k];
                        const float *wr = wp + row * d;
                        const vf w0 = load_f(wr + start[cb]), w1 = load_f(wr + start[cb + 1]);
                        for (int r = 0; r < ROWS; r++) {
                            const float v = c[r * width + row];
                            acc0[r] += v * w0;
                            acc1[r] += v * w1;
                        }
                    }
                    for (; k < lim1; k++) {
                        const int64_t row = order[k];
                        const vf w1 = load_f(wp + row * d + start[cb + 1]);
                        for (int r = 0; r < ROWS; r++) acc1[r] += c[r * width + row] * w1;
                    }
                } else {
                    for (; k < lim0; k++) {
                        const int64_t row = order[k];
                        const vf w0 = load_f(wp + row * d + start[cb]);
                        for (int r = 0; r < ROWS; r++) acc0[r] += c[r * width + row] * w0;
                    }
                }
                for (int r = 0; r < ROWS; r++) {
                    const vf a0 = last0 ? acc0[r] * tail_mask : acc0[r];
                    const vf a1 = last1 ? acc1[r] * tail_mask : acc1[r];
                    vf total = load_f(squares + (b0 + r) * LANES) + a0 * a0;
                    if (two) total += a1 * a1;
                    store_f(squares + (b0 + r) * LANES, total);
                }
            }
        }
        for (int64_t b = 0; b < batch; b++) {
            double total = 0.0;
            for (int l = 0; l < LANES; l++) total += squares[b * LANES + l];
            out[b * positions + p] = (float)sqrt(total);
        }
    }
    free(scratch);
    return 0;
}
