/* One instantiation of the CPU paged decode kernel; cpu_decode.c includes this
 * file once per instruction set with these macros set:
 *   LANES   floats per vector (16 or 8); the score micro-tile is 4 query heads x
 *           LANES/4 tokens, so its LANES dot products reduce into one vector
 *   TARGET  a function attribute selecting the instruction set (may be empty)
 *   NAME(x) x with the variant's suffix
 *   CVT_HALF(p) optional: LANES float16 values at p as a float32 vector, in one
 *           instruction (else integer bit operations widen them)
 *
 * An item is a sequence and a slice of its KV heads. Its visible tokens are
 * walked in chunks of at most CHUNK tokens of one block, with an online softmax
 * per query head (running max, sum and rescaled accumulator, as flash-decoding
 * does): every K and V row is read from the pool once, widened to float32 in
 * registers (or, for head dims that are not a multiple of LANES, in an
 * L1-sized scratch), and used by all query heads of its group.
 *
 * The visible range [first, last] is fixed once per item: first is the later
 * of the window's start and the attention chunk's start (chunked-local
 * attention), so blocks before it are never touched. A learned sink is a key
 * with a logit and no value: it is the online softmax's initial state (max =
 * sink, sum = exp(sink - sink) = 1, accumulator 0), so it costs no pass.
 */

#include "cpu_decode_vec.h"

#define DV (LANES == 16 ? 4 : 2) /* head-dim vectors per accumulate register tile; even */

/* s[g * CHUNK + j] = q_g . k_j for g < groups, j < n; rows padded to `dim` (a multiple of LANES; of
 * DV x LANES for DT_BF16_PAIRS, whose q is in even/odd order). */
INLINE void NAME(scores)(const float *q, int64_t groups, const void *const *k, int dtype, int64_t n,
                         int64_t dim, float *restrict s) {
    for (int64_t g0 = 0; g0 < groups; g0 += 4) {
        const float *qr[4];
        for (int i = 0; i < 4; i++) qr[i] = q + (g0 + i < groups ? g0 + i : groups - 1) * dim;
        for (int64_t j0 = 0; j0 < n; j0 += JT) {
            const void *kr[JT];
            for (int i = 0; i < JT; i++) kr[i] = k[j0 + i < n ? j0 + i : n - 1];
            VF acc[LANES];
            for (int i = 0; i < LANES; i++) acc[i] = NAME(splat)(0.0f);
            if (dtype == DT_BF16_PAIRS) { /* q holds each 2 x LANES dims as LANES even, then LANES odd ones */
                for (int64_t d = 0; d < dim; d += 2 * LANES) {
                    VF qe[4], qo[4], ke[JT], ko[JT];
                    for (int i = 0; i < 4; i++) qe[i] = NAME(load)(qr[i] + d), qo[i] = NAME(load)(qr[i] + d + LANES);
                    for (int i = 0; i < JT; i++) NAME(load_bf16_pairs)(kr[i], d, &ke[i], &ko[i]);
                    for (int g = 0; g < 4; g++)
                        for (int j = 0; j < JT; j++) acc[g * JT + j] += qe[g] * ke[j] + qo[g] * ko[j];
                }
            } else {
                for (int64_t d = 0; d < dim; d += LANES) {
                    VF qv[4], kv[JT];
                    for (int i = 0; i < 4; i++) qv[i] = NAME(load)(qr[i] + d);
                    for (int i = 0; i < JT; i++) kv[i] = NAME(load_as_float)(kr[i], dtype, d);
                    for (int g = 0; g < 4; g++)
                        for (int j = 0; j < JT; j++) acc[g * JT + j] += qv[g] * kv[j];
                }
            }
            float sums[LANES];
            NAME(store)(sums, NAME(reduce)(acc));
            for (int g = 0; g < 4 && g0 + g < groups; g++)
                for (int j = 0; j < JT && j0 + j < n; j++) s[(g0 + g) * CHUNK + j0 + j] = sums[g * JT + j];
        }
    }
}

/* acc[g] += sum_j p[g * CHUNK + j] * v_j over a chunk. Register tile: four query heads x DV vectors of the
 * head dim (16 accumulators with AVX-512's 32 registers, 8 with 16), so each token's four weights are
 * broadcast once per DV vectors and each V vector is loaded once per four heads. */
INLINE void NAME(accumulate)(float *acc, int64_t groups, const float *p, const void *const *v, int dtype,
                             int64_t n, int64_t dim) {
    int64_t g0 = 0;
    for (; g0 + 4 <= groups; g0 += 4) {
        int64_t d = 0;
        for (; d + DV * LANES <= dim; d += DV * LANES) {
            VF a[4][DV];
            for (int g = 0; g < 4; g++)
                for (int i = 0; i < DV; i++) a[g][i] = NAME(load)(acc + (g0 + g) * dim + d + i * LANES);
            for (int64_t j = 0; j < n; j++) {
                VF x[DV];
                if (dtype == DT_BF16_PAIRS)
                    for (int i = 0; i < DV; i += 2) NAME(load_bf16_pairs)(v[j], d + i * LANES, &x[i], &x[i + 1]);
                else
                    for (int i = 0; i < DV; i++) x[i] = NAME(load_as_float)(v[j], dtype, d + i * LANES);
                for (int g = 0; g < 4; g++) {
                    const VF w = NAME(splat)(p[(g0 + g) * CHUNK + j]);
                    for (int i = 0; i < DV; i++) a[g][i] += w * x[i];
                }
            }
            for (int g = 0; g < 4; g++)
                for (int i = 0; i < DV; i++) NAME(store)(acc + (g0 + g) * dim + d + i * LANES, a[g][i]);
        }
        for (; d < dim; d += LANES) {
            VF a[4];
            for (int g = 0; g < 4; g++) a[g] = NAME(load)(acc + (g0 + g) * dim + d);
            for (int64_t j = 0; j < n; j++) {
                VF x = NAME(load_as_float)(v[j], dtype, d);
                for (int g = 0; g < 4; g++) a[g] += p[(g0 + g) * CHUNK + j] * x;
            }
            for (int g = 0; g < 4; g++) NAME(store)(acc + (g0 + g) * dim + d, a[g]);
        }
    }
    for (; g0 < groups; g0++) {
        if (dtype == DT_BF16_PAIRS) {
            for (int64_t d = 0; d < dim; d += 2 * LANES) {
                VF a0 = NAME(load)(acc + g0 * dim + d), a1 = NAME(load)(acc + g0 * dim + d + LANES), x0, x1;
                for (int64_t j = 0; j < n; j++) {
                    NAME(load_bf16_pairs)(v[j], d, &x0, &x1);
                    a0 += p[g0 * CHUNK + j] * x0;
                    a1 += p[g0 * CHUNK + j] * x1;
                }
                NAME(store)(acc + g0 * dim + d, a0);
                NAME(store)(acc + g0 * dim + d + LANES, a1);
            }
            continue;
        }
        for (int64_t d = 0; d < dim; d += LANES) {
            VF a = NAME(load)(acc + g0 * dim + d);
            for (int64_t j = 0; j < n; j++) a += p[g0 * CHUNK + j] * NAME(load_as_float)(v[j], dtype, d);
            NAME(store)(acc + g0 * dim + d, a);
        }
    }
}

/* Rows of a chunk, and the dtype to read them as: pointers straight into the pool when the head dim is a
 * multiple of LANES (`dt`, the pool's dtype, a constant in each specialisation of decode_body), else
 * float32 copies padded with zeros in `scratch`. */
INLINE int NAME(rows)(const DecodeArgs *a, const char *pool, int64_t first_row, int64_t n, int64_t dim,
                      float *scratch, const void **out, const int dt) {
    int64_t row_bytes = a->head_dim * a->elem_size, stride = a->num_kv_heads * row_bytes;
    const char *src = pool + first_row * row_bytes;
    if (dim == a->head_dim) {
        for (int64_t j = 0; j < n; j++) out[j] = src + j * stride;
        return dt;
    }
    for (int64_t j = 0; j < n; j++) {
        NAME(widen)(src + j * stride, a->dtype, a->head_dim, dim, scratch + j * dim);
        out[j] = scratch + j * dim;
    }
    return DT_F32;
}

/* Ask for one KV head's rows of a later block while this one computes: the blocks of a sequence lie
 * anywhere in the pool, so the hardware prefetchers cannot guess the next one, but the table knows it. */
INLINE void NAME(prefetch)(const DecodeArgs *a, const char *pool, int64_t block, int64_t h) {
    const int64_t row_bytes = a->head_dim * a->elem_size, kvh = a->num_kv_heads;
    for (int64_t t = 0; t < a->block_size; t++) {
        const char *p = pool + ((block * a->block_size + t) * kvh + h) * row_bytes;
        for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(p + off, 0, 2);
    }
}

/* Online-softmax update of one query head's state with a chunk's scores (scaled in place into weights; the
 * lanes from n on, past the chunk, get weight 0). Vector-wide: the lanes past n are masked to -inf by one
 * comparison with the lane index, the max and the sum are halving reductions. */
INLINE void NAME(softmax_step)(const DecodeArgs *a, float *sg, int64_t n, float ks, float vs, float *m, float *l,
                               float *acc, int64_t dim) {
#if LANES == 16
    const VI lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
#else
    const VI lane = {0, 1, 2, 3, 4, 5, 6, 7};
#endif
    const VI none = (VI)NAME(splat)(-INFINITY);
    VF x[CHUNK / LANES], top = NAME(splat)(-INFINITY), total = NAME(splat)(0.0f);
    for (int c = 0; c < CHUNK / LANES; c++) {
        VF y = NAME(load)(sg + c * LANES) * ks;
        if (a->soft_cap > 0.0f) y = NAME(soft_cap)(y, a->soft_cap);
        const VI live = lane + c * LANES < (int32_t)n;
        x[c] = (VF)((live & (VI)y) | (~live & none));
        top = NAME(vmax)(top, x[c]);
    }
    const float chunk_max = NAME(hmax)(top);
    const float new_max = chunk_max > *m ? chunk_max : *m;
    for (int c = 0; c < CHUNK / LANES; c++) {
        const VF e = NAME(exp)(x[c] - new_max);
        total += e;
        NAME(store)(sg + c * LANES, e * vs);
    }
    if (new_max > *m) {
        const float alpha = *m == -INFINITY ? 0.0f : NAME(exp)(NAME(splat)(*m - new_max))[0];
        *l *= alpha;
        for (int64_t d = 0; d < dim; d += LANES) NAME(store)(acc + d, NAME(load)(acc + d) * alpha);
        *m = new_max;
    }
    *l += NAME(hsum)(total);
}

/* The first position a decode query at position `last` sees: its window's start or its attention chunk's,
 * the later; blocks before it are never touched. */
INLINE int64_t NAME(first_visible)(const DecodeArgs *a, int64_t last) {
    int64_t pos = a->window > 0 && last - a->window + 1 > 0 ? last - a->window + 1 : 0;
    if (a->chunk > 0 && last / a->chunk * a->chunk > pos) pos = last / a->chunk * a->chunk;
    return pos;
}

/* A DT_BF16_PAIRS query or accumulator keeps each 2 x LANES dims as their LANES even ones, then their LANES
 * odd ones (the order load_bf16_pairs widens a row in): `to` gets `from` (in dim order) times `mul`, so
 * reordered, and from_order does the reverse divided by `div`. Both need n to be a multiple of 2 x LANES. */
INLINE void NAME(to_pairs)(float *restrict to, const float *restrict from, int64_t n, float mul) {
    for (int64_t d = 0; d < n; d += 2 * LANES)
        for (int64_t i = 0; i < LANES; i++) {
            to[d + i] = from[d + 2 * i] * mul;
            to[d + LANES + i] = from[d + 2 * i + 1] * mul;
        }
}

INLINE void NAME(from_pairs)(float *restrict to, const float *restrict from, int64_t n, float div) {
    for (int64_t d = 0; d < n; d += 2 * LANES)
        for (int64_t i = 0; i < LANES; i++) {
            to[d + 2 * i] = from[d + i] / div;
            to[d + 2 * i + 1] = from[d + LANES + i] / div;
        }
}

/* Items begin..end, item = sequence * slices + slice; a slice is `heads_per_item` consecutive KV heads,
 * walked together so each chunk of a block is read front to back once for all of them. The caller
 * (py_decode) ran check_items over the same items first, so every id and length read here is in range. */
INLINE void NAME(decode_body)(const DecodeArgs *a, int64_t begin, int64_t end, float *work, const int dt) {
    const int64_t groups = a->group, hd = a->head_dim, bs = a->block_size, kvh = a->num_kv_heads;
    const int64_t per = a->heads_per_item, slices = (kvh + per - 1) / per;
    const int64_t dim = (hd + LANES - 1) / LANES * LANES, state = groups * dim;
    float *q = work, *acc = q + per * state, *s = acc + per * state, *kbuf = s + groups * CHUNK;
    float *vbuf = kbuf + CHUNK * dim, *m = vbuf + CHUNK * dim, *l = m + per * groups;
    const void *krow[CHUNK], *vrow[CHUNK];
    for (int64_t item = begin; item < end; item++) {
        const int64_t b = item / slices, h0 = item % slices * per, h1 = h0 + per < kvh ? h0 + per : kvh;
        const int64_t last = a->seq_lens[b] - 1;
        int64_t pos = NAME(first_visible)(a, last);
        /* the next item's first block, prefetched during this item's last one (short sequences, such as a
         * cascade's own levels, would otherwise start every item with a miss); only when an item is a whole
         * sequence, since a slice's successor may read other heads */
        const int64_t following = slices == 1 && item + 1 < end
            ? a->block_tables[(b + 1) * a->table_stride + NAME(first_visible)(a, a->seq_lens[b + 1] - 1) / bs] : -1;
        for (int64_t h = 0; h < h1 - h0; h++) {
            const float *qsrc = a->q + ((b * kvh + h0 + h) * groups) * hd;
            for (int64_t g = 0; g < groups; g++) {
                float *qg = q + h * state + g * dim;
                if (dt == DT_BF16_PAIRS) /* dim == hd here */
                    NAME(to_pairs)(qg, qsrc + g * hd, hd, a->scale);
                else
                    for (int64_t d = 0; d < dim; d++) qg[d] = d < hd ? qsrc[g * hd + d] * a->scale : 0.0f;
                m[h * groups + g] = a->sinks ? a->sinks[(h0 + h) * groups + g] : -INFINITY;
                l[h * groups + g] = a->sinks ? 1.0f : 0.0f;
            }
        }
        memset(acc, 0, (size_t)((h1 - h0) * state) * sizeof(float));
        while (pos <= last) {
            const int64_t off = pos % bs, rest = last + 1 - pos;
            int64_t n = bs - off < rest ? bs - off : rest;
            n = n < CHUNK ? n : CHUNK;
            const int64_t *table = a->block_tables + b * a->table_stride;
            const int64_t block = table[pos / bs];
            const int64_t ahead = pos / bs + PREFETCH_BLOCKS;
            const int64_t next = off != 0 ? -1 : ahead <= last / bs ? table[ahead] : following;
            for (int64_t h = h0; h < h1; h++) {
                const int64_t row = (block * bs + off) * kvh + h, i = h - h0;
                const float ks = a->k_scale ? a->k_scale[block * kvh + h] : 1.0f;
                const float vs = a->v_scale ? a->v_scale[block * kvh + h] : 1.0f;
                if (next >= 0) {
                    NAME(prefetch)(a, a->k, next, h);
                    NAME(prefetch)(a, a->v, next, h);
                }
                int dtype = NAME(rows)(a, a->k, row, n, dim, kbuf, krow, dt);
                NAME(scores)(q + i * state, groups, krow, dtype, n, dim, s);
                for (int64_t g = 0; g < groups; g++)
                    NAME(softmax_step)(a, s + g * CHUNK, n, ks, vs, m + i * groups + g, l + i * groups + g,
                                       acc + i * state + g * dim, dim);
                dtype = NAME(rows)(a, a->v, row, n, dim, vbuf, vrow, dt);
                NAME(accumulate)(acc + i * state, groups, s, vrow, dtype, n, dim);
            }
            pos += n;
        }
        for (int64_t h = 0; h < h1 - h0; h++) {
            float *o = a->out + ((b * kvh + h0 + h) * groups) * hd;
            for (int64_t g = 0; g < groups; g++) {
                const float *ag = acc + h * state + g * dim, lg = l[h * groups + g];
                if (dt == DT_BF16_PAIRS)
                    NAME(from_pairs)(o + g * hd, ag, hd, lg);
                else
                    for (int64_t d = 0; d < hd; d++) o[g * hd + d] = ag[d] / lg;
            }
            if (a->lse)
                for (int64_t g = 0; g < groups; g++)
                    a->lse[(b * kvh + h0 + h) * groups + g] = m[h * groups + g] + logf(l[h * groups + g]);
        }
    }
}

/* decode_body specialised per pool dtype, so the dtype tests in the innermost loops (load_as_float) fold
 * away; bfloat16 rows whose head dim is a multiple of DV x LANES are widened in even/odd pairs
 * (load_bf16_pairs). Head dims that are not a multiple of LANES read float32 scratch rows whatever the
 * pool holds, so they need no specialisation. */
TARGET static void NAME(decode_items)(const DecodeArgs *a, int64_t begin, int64_t end, float *work) {
    if (a->head_dim % LANES != 0) {
        NAME(decode_body)(a, begin, end, work, DT_F32);
        return;
    }
    const uint16_t one = 1;
    uint8_t low;
    memcpy(&low, &one, 1); /* 1 on little-endian machines, where load_bf16_pairs' word layout holds */
    switch (a->dtype) {
    case DT_BF16:
        if (low == 1 && a->head_dim % (DV * LANES) == 0)
            NAME(decode_body)(a, begin, end, work, DT_BF16_PAIRS);
        else
            NAME(decode_body)(a, begin, end, work, DT_BF16);
        break;
    case DT_F16: NAME(decode_body)(a, begin, end, work, DT_F16); break;
    case DT_I8: NAME(decode_body)(a, begin, end, work, DT_I8); break;
    default: NAME(decode_body)(a, begin, end, work, DT_F32); break;
    }
}

#undef VF
#undef VI
#undef VU
#undef JT
#undef DV
#undef INLINE
