/* Fused DASH-KV decode step for one layer on the CPU: code scan -> exact top-k -> sparse attention.
 *
 * Same contract as the numba kernel in cpu.py (which is its reference in the tests):
 *   positions < start[b] are left padding; sinks are start[b] .. start[b]+sink-1; the window is the
 *   last `window` positions; candidates are [start+sink, N-window); if sink+window+critical covers the
 *   row's valid tokens the row attends densely. The selection is exactly the top-`critical` candidates
 *   under a stable sort by descending score (equal scores: lower position first).
 *
 * Threads: one OpenMP team per call, from the libgomp that torch has already loaded (this library is
 * loaded after torch and asks for libgomp by its soname), so the decode step runs on torch's own
 * worker threads -- no second thread pool competing for the cores -- and concurrent calls from
 * several Python threads each get their own team. Work items are spread round-robin between barriers:
 * scan chunks, then one select per selecting head, then attention parts, then the merge.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int64_t B, Hq, Hkv, d, N, W;
    int64_t sink, window, critical;
    int64_t per_query, hamming, kv_kind, nthreads;
    double scaling;
    const float *q;         /* (B, Hq, d) */
    const float *qp;        /* (B, Hq, 64 W) */
    const void *k, *v;      /* element (b, h, j, i) at row b*ksb + h*ksh + j, column i */
    int64_t ksb, ksh, vsb, vsh;
    const uint64_t *codes;  /* word w of (b, h, j) at b*csb + h*csh + j*W + w */
    int64_t csb, csh;
    const int64_t *start;   /* (B) or NULL */
    float *out;             /* (B, Hq, d) */
    int64_t *counts;        /* (B * Hs): tokens read per selecting head */
    int32_t *indices;       /* (B * Hs * lmax) or NULL: positions read, in no particular order */
    int64_t lmax;
} dkv_args;

#define NB1 2048
#define MAX_D 512

static inline uint32_t order_key(float f) {
    f = f + 0.0f; /* -0 -> +0: equal scores must get equal keys */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

static inline void load_row(int64_t kind, const void *base, int64_t row, int64_t d, float *dst) {
    if (kind == 0) {
        memcpy(dst, (const float *)base + row * d, (size_t)d * 4);
    } else if (kind == 1) {
        const uint16_t *p = (const uint16_t *)base + row * d;
        for (int64_t i = 0; i < d; i++) {
            uint32_t u = (uint32_t)p[i] << 16;
            memcpy(dst + i, &u, 4);
        }
    } else {
        const _Float16 *p = (const _Float16 *)base + row * d;
        for (int64_t i = 0; i < d; i++) dst[i] = (float)p[i];
    }
}

static inline void prefetch_row(int64_t kind, const void *base, int64_t row, int64_t d) {
    int64_t es = kind == 0 ? 4 : 2;
    const char *p = (const char *)base + row * d * es;
    for (int64_t off = 0; off < d * es; off += 64) __builtin_prefetch(p + off, 0, 3);
}

/* The k largest of n keys (pos = lo + j for keys[j]), ties to the lower position, written to dst[0..k).
 * Radix select on the order-preserving key: 11 + 11 + 10 bits; only the bucket holding the k-th key
 * is narrowed further, so the work is two passes over n plus passes over that bucket. */
static void select_topk(const float *sc, int64_t n, int64_t k, int64_t lo, int32_t *dst, uint32_t *tk,
                        int32_t *tp, uint32_t *hist) {
    int64_t w = 0, m = 0;
    memset(hist, 0, NB1 * sizeof(uint32_t));
    for (int64_t j = 0; j < n; j++) hist[order_key(sc[j]) >> 21]++;
    int64_t above = 0, t = NB1 - 1;
    while (t > 0 && above + (int64_t)hist[t] < k) above += hist[t--];
    for (int64_t j = 0; j < n; j++) {
        uint32_t key = order_key(sc[j]);
        uint32_t kb = key >> 21;
        if (kb > (uint32_t)t) dst[w++] = (int32_t)(lo + j);
        else if (kb == (uint32_t)t) { tk[m] = key; tp[m] = (int32_t)(lo + j); m++; }
    }
    int64_t need = k - above;
    const int shifts[2] = {10, 0};
    const uint32_t masks[2] = {0x7FF, 0x3FF};
    for (int level = 0; level < 2 && need > 0; level++) {
        int sh = shifts[level];
        uint32_t mask = masks[level];
        memset(hist, 0, NB1 * sizeof(uint32_t));
        for (int64_t j = 0; j < m; j++) hist[(tk[j] >> sh) & mask]++;
        int64_t ab = 0, tt = (int64_t)mask;
        while (tt > 0 && ab + (int64_t)hist[tt] < need) ab += hist[tt--];
        int64_t m2 = 0;
        for (int64_t j = 0; j < m; j++) {
            uint32_t kb = (tk[j] >> sh) & mask;
            if (kb > (uint32_t)tt) dst[w++] = tp[j];
            else if (kb == (uint32_t)tt) { tk[m2] = tk[j]; tp[m2] = tp[j]; m2++; }
        }
        m = m2;
        need -= ab;
    }
    for (int64_t j = 0; j < m && need > 0; j++, need--) dst[w++] = tp[j]; /* equal keys: position order */
}

int dkv_decode(const dkv_args *a) {
    const int64_t B = a->B, Hq = a->Hq, Hkv = a->Hkv, d = a->d, N = a->N, W = a->W;
    const int64_t G = Hq / Hkv, NS = a->per_query ? G : 1, S = Hkv * NS, BS = B * S;
    const int64_t Gq = a->per_query ? 1 : G, P = 8 * W, bits = 64 * W;
    const int64_t sink = a->sink, window = a->window, critical = a->critical;
    const int64_t budget = sink + window + critical;
    if (d > MAX_D) return 2;

    int64_t *rs = malloc(sizeof(int64_t) * 5 * (size_t)B);
    int64_t *st = rs, *dense = rs + B, *clo = rs + 2 * B, *ncand = rs + 3 * B, *rowlen = rs + 4 * B;
    int64_t maxcand = 0, Lmax = 1;
    for (int64_t b = 0; b < B; b++) {
        int64_t s0 = a->start ? a->start[b] : 0;
        s0 = s0 < 0 ? 0 : (s0 > N ? N : s0);
        st[b] = s0;
        int64_t valid = N - s0;
        dense[b] = budget >= valid;
        clo[b] = s0 + sink;
        ncand[b] = (!dense[b] && critical > 0) ? N - window - clo[b] : 0;
        rowlen[b] = dense[b] ? valid : budget;
        if (ncand[b] > maxcand) maxcand = ncand[b];
        if (rowlen[b] > Lmax) Lmax = rowlen[b];
    }
    int nt = (int)(a->nthreads < 1 ? 1 : a->nthreads);
    /* scan chunks of >= 1024 positions, about 4 items per thread; attention parts of >= 64 rows */
    int64_t nch = maxcand / 1024;
    int64_t want = (4 * nt + BS - 1) / BS;
    nch = nch < 1 ? 1 : (nch > want ? want : nch);
    int64_t npart = Lmax / 64;
    npart = npart < 1 ? 1 : (npart > want ? want : npart);
    int64_t rpp = (Lmax + npart - 1) / npart;

    float *scores = malloc(sizeof(float) * (size_t)(BS * (maxcand > 0 ? maxcand : 1)));
    float *lut = a->hamming ? NULL : malloc(sizeof(float) * (size_t)(BS * P * 256));
    uint64_t *qw = a->hamming ? malloc(sizeof(uint64_t) * (size_t)(B * Hq * W)) : NULL;
    int32_t *idx = a->indices ? a->indices : malloc(sizeof(int32_t) * (size_t)(BS * Lmax));
    int64_t lstride = a->indices ? a->lmax : Lmax;
    float *qs = malloc(sizeof(float) * (size_t)(B * Hq * d));
    int64_t AU = BS * npart;
    float *pm = malloc(sizeof(float) * (size_t)(AU * Gq) * 2);
    float *pl = pm + AU * Gq;
    float *pacc = malloc(sizeof(float) * (size_t)(AU * Gq * d));
    if (!rs || !scores || (!a->hamming && !lut) || (a->hamming && !qw) || !idx || !qs || !pm || !pacc) {
        free(rs); free(scores); free(lut); free(qw); if (!a->indices) free(idx); free(qs); free(pm); free(pacc);
        return 1;
    }
    for (int64_t i = 0; i < B * Hq * d; i++) qs[i] = (float)(a->q[i] * a->scaling);

#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        uint32_t hist[NB1];
        float krow[MAX_D], vrow[MAX_D];

        /* phase 0: query sign words (Hamming) or byte tables summed over the unit's query heads */
        if (a->hamming) {
            for (int64_t bh = tid; bh < B * Hq; bh += nth) {
                const float *p = a->qp + bh * bits;
                for (int64_t w = 0; w < W; w++) {
                    uint64_t word = 0;
                    for (int t = 0; t < 64; t++)
                        if (p[64 * w + t] > 0) word |= (uint64_t)1 << t;
                    qw[bh * W + w] = word;
                }
            }
        } else {
            for (int64_t u = tid; u < BS; u += nth) {
                int64_t b = u / S, kvh = (u % S) / NS, ns = u % NS;
                if (ncand[b] == 0) continue;
                int64_t h0 = kvh * G + ns;
                for (int64_t p = 0; p < P; p++) {
                    float *tb = lut + (u * P + p) * 256;
                    float z = 0.0f;
                    float v2[8];
                    for (int t = 0; t < 8; t++) {
                        float v = 0.0f;
                        for (int64_t g = 0; g < Gq; g++) v += a->qp[(b * Hq + h0 + g) * bits + 8 * p + t];
                        z -= v;
                        v2[t] = v + v;
                    }
                    tb[0] = z; /* byte 0: every sign -1; entries with bit t set = entries without it + 2 q_t */
                    for (int t = 0; t < 8; t++) {
                        int step = 1 << t;
                        for (int x = 0; x < step; x++) tb[step + x] = tb[x] + v2[t];
                    }
                }
            }
        }
#pragma omp barrier
        /* phase 1: scores of every candidate, chunk by chunk */
        for (int64_t it = tid; it < BS * nch; it += nth) {
            int64_t u = it / nch, c = it % nch;
            int64_t b = u / S, kvh = (u % S) / NS, ns = u % NS;
            if (ncand[b] == 0) continue;
            int64_t cl = (ncand[b] + nch - 1) / nch;
            int64_t j0 = c * cl, j1 = j0 + cl > ncand[b] ? ncand[b] : j0 + cl;
            const uint64_t *cw = a->codes + b * a->csb + kvh * a->csh + clo[b] * W;
            float *out = scores + u * maxcand;
            if (a->hamming) {
                int64_t h0 = kvh * G + ns;
                const uint64_t *q0 = qw + (b * Hq + h0) * W;
                for (int64_t j = j0; j < j1; j++) {
                    int64_t pc = 0;
                    for (int64_t g = 0; g < Gq; g++)
                        for (int64_t w = 0; w < W; w++) pc += __builtin_popcountll(q0[g * W + w] ^ cw[j * W + w]);
                    out[j] = (float)(Gq * bits - 2 * pc);
                }
            } else {
                const float *lt = lut + u * P * 256;
                for (int64_t j = j0; j < j1; j++) {
                    float s = 0.0f;
                    for (int64_t w = 0; w < W; w++) {
                        uint64_t x = cw[j * W + w];
                        const float *l = lt + w * 2048;
                        float sw = l[x & 255];
                        for (int t = 1; t < 8; t++) sw += l[t * 256 + ((x >> (8 * t)) & 255)];
                        s = w == 0 ? sw : s + sw;
                    }
                    out[j] = s;
                }
            }
        }
#pragma omp barrier
        /* phase 2: each selecting head's row set = sinks | top-critical candidates | window */
        for (int64_t u = tid; u < BS; u += nth) {
            int64_t b = u / S;
            int32_t *ii = idx + u * lstride;
            if (dense[b]) {
                for (int64_t r = 0; r < rowlen[b]; r++) ii[r] = (int32_t)(st[b] + r);
                continue;
            }
            for (int64_t r = 0; r < sink; r++) ii[r] = (int32_t)(st[b] + r);
            for (int64_t r = 0; r < window; r++) ii[sink + critical + r] = (int32_t)(N - window + r);
            if (ncand[b] > 0) {
                uint32_t *tk = malloc(sizeof(uint32_t) * (size_t)ncand[b]);
                int32_t *tp = malloc(sizeof(int32_t) * (size_t)ncand[b]);
                select_topk(scores + u * maxcand, ncand[b], critical, clo[b], ii + sink, tk, tp, hist);
                free(tk);
                free(tp);
            }
        }
#pragma omp barrier
        /* phase 3: partial softmax attention of each part of each row set, for the unit's Gq heads */
        for (int64_t au = tid; au < AU; au += nth) {
            int64_t u = au / npart, part = au % npart;
            int64_t b = u / S, kvh = (u % S) / NS, ns = u % NS;
            int64_t r0 = part * rpp, r1 = r0 + rpp;
            if (r1 > rowlen[b]) r1 = rowlen[b];
            const float *qh = qs + (b * Hq + kvh * G + ns) * d;
            float *m_ = pm + au * Gq, *l_ = pl + au * Gq, *acc = pacc + au * Gq * d;
            for (int64_t g = 0; g < Gq; g++) { m_[g] = -INFINITY; l_[g] = 0.0f; }
            memset(acc, 0, sizeof(float) * (size_t)(Gq * d));
            if (r1 <= r0) continue;
            const int32_t *rows = idx + u * lstride;
            int64_t kbase = b * a->ksb + kvh * a->ksh, vbase = b * a->vsb + kvh * a->vsh;
            for (int64_t r = r0; r < r1; r++) {
                if (r + 8 < r1) {
                    prefetch_row(a->kv_kind, a->k, kbase + rows[r + 8], d);
                    prefetch_row(a->kv_kind, a->v, vbase + rows[r + 8], d);
                }
                load_row(a->kv_kind, a->k, kbase + rows[r], d, krow);
                load_row(a->kv_kind, a->v, vbase + rows[r], d, vrow);
                for (int64_t g = 0; g < Gq; g++) {
                    const float *qg = qh + g * d;
                    float s = 0.0f;
#pragma omp simd reduction(+ : s)
                    for (int64_t i = 0; i < d; i++) s += qg[i] * krow[i];
                    float *ag = acc + g * d;
                    if (s > m_[g]) { /* online softmax: rescale what was summed so far */
                        float c = m_[g] == -INFINITY ? 0.0f : expf(m_[g] - s);
                        l_[g] *= c;
#pragma omp simd
                        for (int64_t i = 0; i < d; i++) ag[i] *= c;
                        m_[g] = s;
                    }
                    float e = expf(s - m_[g]);
                    l_[g] += e;
#pragma omp simd
                    for (int64_t i = 0; i < d; i++) ag[i] += e * vrow[i];
                }
            }
        }
#pragma omp barrier
        /* phase 4: merge the parts of every query head */
        for (int64_t bh = tid; bh < B * Hq; bh += nth) {
            int64_t b = bh / Hq, h = bh % Hq;
            int64_t u = a->per_query ? bh : b * S + h / G, g = a->per_query ? 0 : h % G;
            float *o = a->out + bh * d;
            memset(o, 0, sizeof(float) * (size_t)d);
            float M = -INFINITY;
            for (int64_t p = 0; p < npart; p++) M = fmaxf(M, pm[(u * npart + p) * Gq + g]);
            if (M == -INFINITY) continue;
            double tot = 0.0;
            for (int64_t p = 0; p < npart; p++) {
                int64_t x = (u * npart + p) * Gq + g;
                if (pm[x] == -INFINITY) continue;
                float w = expf(pm[x] - M);
                tot += (double)w * pl[x];
                const float *ac = pacc + x * d;
                for (int64_t i = 0; i < d; i++) o[i] += w * ac[i];
            }
            float inv = (float)(1.0 / tot);
            for (int64_t i = 0; i < d; i++) o[i] *= inv;
        }
    }
    for (int64_t u = 0; u < BS; u++) a->counts[u] = rowlen[u / S];
    free(rs); free(scores); free(lut); free(qw); if (!a->indices) free(idx); free(qs); free(pm); free(pacc);
    return 0;
}
