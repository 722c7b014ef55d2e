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

typedef float NAME(vf) __attribute__((vector_size(LANES * 4)));
typedef int32_t NAME(vi) __attribute__((vector_size(LANES * 4)));
typedef uint32_t NAME(vu) __attribute__((vector_size(LANES * 4)));
typedef uint16_t NAME(vh) __attribute__((vector_size(LANES * 2)));
typedef int8_t NAME(vb) __attribute__((vector_size(LANES)));

#define VF NAME(vf)
#define VI NAME(vi)
#define VU NAME(vu)
#define JT (LANES / 4)
#define INLINE static inline __attribute__((always_inline)) TARGET

INLINE VF NAME(load)(const float *p) { VF v; memcpy(&v, p, sizeof v); return v; }
INLINE void NAME(store)(float *p, VF v) { memcpy(p, &v, sizeof v); }
INLINE VF NAME(splat)(float x) { return (VF){0} + x; }

/* LANES elements of a `dtype` row from element `d` on, as float32 (widened in registers). */
INLINE VF NAME(load_as_float)(const void *row, int dtype, int64_t d) {
    if (dtype == DT_BF16) {
        NAME(vh) h; memcpy(&h, (const uint16_t *)row + d, sizeof h);
        VU u = __builtin_convertvector(h, VU) << 16;
        VF f; memcpy(&f, &u, sizeof f);
        return f;
    }
    if (dtype == DT_F16) {
#ifdef CVT_HALF
        return CVT_HALF((const uint16_t *)row + d); /* one vcvtph2ps */
#else
        NAME(vh) h; memcpy(&h, (const uint16_t *)row + d, sizeof h);
        VU x = __builtin_convertvector(h, VU);
        VU em = x & 0x7fffu, shifted = em << 13;
        VF mag; memcpy(&mag, &shifted, sizeof mag);
        mag *= 0x1p112f; /* normals and subnormals: the exponent bias moves from 15 to 127 */
        VU bits; memcpy(&bits, &mag, sizeof bits);
        VU special = (VU)(em >= 0x7c00u); /* infinity and NaN keep an all-ones exponent */
        bits = (special & (shifted | 0x7f800000u)) | (~special & bits);
        bits |= (x & 0x8000u) << 16;
        VF f; memcpy(&f, &bits, sizeof f);
        return f;
#endif
    }
    if (dtype == DT_I8) {
        NAME(vb) b; memcpy(&b, (const int8_t *)row + d, sizeof b);
        return __builtin_convertvector(b, VF);
    }
    return NAME(load)((const float *)row + d);
}

/* Row of `n` elements of `dtype` at `src` as float32 in `dst`, zero-padded to `padded` (for head dims
 * that are not a multiple of LANES, whose vector loads would otherwise run past the row). */
INLINE void NAME(widen)(const void *src, int dtype, int64_t n, int64_t padded, float *restrict dst) {
    int64_t d = 0;
    for (; d + LANES <= n; d += LANES) NAME(store)(dst + d, NAME(load_as_float)(src, dtype, d));
    for (; d < n; d++) {
        if (dtype == DT_BF16) {
            uint32_t u = (uint32_t)((const uint16_t *)src)[d] << 16;
            memcpy(dst + d, &u, 4);
        } else if (dtype == DT_F16) {
            dst[d] = half_to_float(((const uint16_t *)src)[d]);
        } else if (dtype == DT_I8) {
            dst[d] = (float)((const int8_t *)src)[d];
        } else {
            dst[d] = ((const float *)src)[d];
        }
    }
    for (; d < padded; d++) dst[d] = 0.0f;
}

/* exp(x) for x <= 0 (every caller subtracts a maximum first), relative error ~2e-7; 0 below -87.3,
 * including -inf. Cephes' expf polynomial after a round-to-nearest range reduction. */
INLINE VF NAME(exp)(VF x) {
    VI dead = x < -87.3f;
    x = (VF)((dead & (VI)NAME(splat)(-87.3f)) | (~dead & (VI)x));
    VF n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest */
    VF r = x - n * 0.693359375f + n * 2.12194440e-4f;
    VF p = NAME(splat)(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    VF y = p * r * r + r + 1.0f;
    VI pow2 = (__builtin_convertvector(n, VI) + 127) << 23;
    VF scale; memcpy(&scale, &pow2, sizeof scale);
    return (VF)(~dead & (VI)(y * scale));
}

/* cap * tanh(s / cap), through exp(-2|y|) so large |y| saturates without overflow. */
INLINE VF NAME(soft_cap)(VF s, float cap) {
    VF y = s / cap;
    VI sign = (VI)y & (VI)NAME(splat)(-0.0f);
    VF a = (VF)((VI)y & ~(VI)NAME(splat)(-0.0f));
    VF e = NAME(exp)(-2.0f * a);
    VF t = (1.0f - e) / (1.0f + e);
    return (VF)((VI)t | sign) * cap;
}

/* sum of each of the LANES vectors in `a`, in lane order (a transpose-and-add tree). */
INLINE VF NAME(reduce)(VF *a) {
#if LANES == 16
    VF c[8], e[4], f[2];
    for (int i = 0; i < 8; i++)
        c[i] = SHUFFLE(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
             + SHUFFLE(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; i++)
        e[i] = SHUFFLE(c[2 * i], c[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
             + SHUFFLE(c[2 * i], c[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++)
        f[i] = SHUFFLE(e[2 * i], e[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
             + SHUFFLE(e[2 * i], e[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return SHUFFLE(f[0], f[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
         + SHUFFLE(f[0], f[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#else
    VF c[4], e[2];
    for (int i = 0; i < 4; i++)
        c[i] = SHUFFLE(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11)
             + SHUFFLE(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
    for (int i = 0; i < 2; i++)
        e[i] = SHUFFLE(c[2 * i], c[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13)
             + SHUFFLE(c[2 * i], c[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15);
    return SHUFFLE(e[0], e[1], 0, 2, 4, 6, 8, 10, 12, 14)
         + SHUFFLE(e[0], e[1], 1, 3, 5, 7, 9, 11, 13, 15);
#endif
}

/* s[g * CHUNK + j] = q_g . k_j for g < groups, j < n; rows padded to `dim` (a multiple of LANES). */
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
            for (int64_t d = 0; d < dim; d += LANES) {
                VF qv[4], kv[JT];
                for (int i = 0; i < 4; i++) qv[i] = NAME(load)(qr[i] + d);
                for (int i = 0; i < JT; i++) kv[i] = NAME(load_as_float)(kr[i], dtype, d);
                for (int g = 0; g < 4; g++)
                    for (int j = 0; j < JT; j++) acc[g * JT + j] += qv[g] * kv[j];
            }
            float sums[LANES];
            NAME(store)(sums, NAME(reduce)(acc));
            for (int g = 0; g < 4 && g0 + g < groups; g++)
                for (int j = 0; j < JT && j0 + j < n; j++) s[(g0 + g) * CHUNK + j0 + j] = sums[g * JT + j];
        }
    }
}

/* acc[g] += sum_j p[g * CHUNK + j] * v_j over a chunk, four query heads' accumulators in registers. */
INLINE void NAME(accumulate)(float *acc, int64_t groups, const float *p, const void *const *v, int dtype,
                             int64_t n, int64_t dim) {
    int64_t g0 = 0;
    for (; g0 + 4 <= groups; g0 += 4)
        for (int64_t d = 0; d < dim; d += LANES) {
            VF a[4];
            for (int g = 0; g < 4; g++) a[g] = NAME(load)(acc + (g0 + g) * dim + d);
            for (int64_t j = 0; j < n; j++) {
                VF x = NAME(load_as_float)(v[j], dtype, d);
                for (int g = 0; g < 4; g++) a[g] += p[(g0 + g) * CHUNK + j] * x;
            }
            for (int g = 0; g < 4; g++) NAME(store)(acc + (g0 + g) * dim + d, a[g]);
        }
    for (; g0 < groups; g0++)
        for (int64_t d = 0; d < dim; d += LANES) {
            VF a = NAME(load)(acc + g0 * dim + d);
            for (int64_t j = 0; j < n; j++) a += p[g0 * CHUNK + j] * NAME(load_as_float)(v[j], dtype, d);
            NAME(store)(acc + g0 * dim + d, a);
        }
}

/* Rows of a chunk, and the dtype to read them as: pointers straight into the pool when the head dim is a
 * multiple of LANES, else float32 copies padded with zeros in `scratch`. */
INLINE int NAME(rows)(const DecodeArgs *a, const char *pool, int64_t first_row, int64_t n, int64_t dim,
                      float *scratch, const void **out) {
    int64_t row_bytes = a->head_dim * a->elem_size, stride = a->num_kv_heads * row_bytes;
    const char *src = pool + first_row * row_bytes;
    if (dim == a->head_dim) {
        for (int64_t j = 0; j < n; j++) out[j] = src + j * stride;
        return a->dtype;
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

/* Online-softmax update of one query head's state with a chunk's scores (scaled in place into weights). */
INLINE void NAME(softmax_step)(const DecodeArgs *a, float *sg, int64_t n, float ks, float vs, float *m, float *l,
                               float *acc, int64_t dim) {
    float top = -INFINITY, sum = 0.0f;
    for (int64_t j = 0; j < CHUNK; j += LANES) {
        VF x = NAME(load)(sg + j) * ks;
        if (a->soft_cap > 0.0f) x = NAME(soft_cap)(x, a->soft_cap);
        NAME(store)(sg + j, x);
    }
    for (int64_t j = 0; j < n; j++) top = sg[j] > top ? sg[j] : top;
    const float new_max = top > *m ? top : *m;
    for (int64_t j = 0; j < CHUNK; j += LANES) {
        VF x = NAME(load)(sg + j) - new_max;
        for (int i = 0; i < LANES; i++)
            if (j + i >= n) x[i] = -INFINITY;
        x = NAME(exp)(x);
        for (int i = 0; i < LANES; i++) sum += x[i];
        NAME(store)(sg + j, x * vs);
    }
    if (new_max > *m) {
        const float alpha = *m == -INFINITY ? 0.0f : NAME(exp)(NAME(splat)(*m - new_max))[0];
        *l *= alpha;
        for (int64_t d = 0; d < dim; d += LANES) NAME(store)(acc + d, NAME(load)(acc + d) * alpha);
        *m = new_max;
    }
    *l += sum;
}

/* Items begin..end, item = sequence * slices + slice; a slice is `heads_per_item` consecutive KV heads,
 * walked together so each chunk of a block is read front to back once for all of them. The caller
 * (py_decode) ran check_items over the same items first, so every id and length read here is in range. */
TARGET static void NAME(decode_items)(const DecodeArgs *a, int64_t begin, int64_t end, float *work) {
    const int64_t groups = a->group, hd = a->head_dim, bs = a->block_size, kvh = a->num_kv_heads;
    const int64_t per = a->heads_per_item, slices = (kvh + per - 1) / per;
    const int64_t dim = (hd + LANES - 1) / LANES * LANES, state = groups * dim;
    float *q = work, *acc = q + per * state, *s = acc + per * state, *kbuf = s + groups * CHUNK;
    float *vbuf = kbuf + CHUNK * dim, *m = vbuf + CHUNK * dim, *l = m + per * groups;
    const void *krow[CHUNK], *vrow[CHUNK];
    for (int64_t item = begin; item < end; item++) {
        const int64_t b = item / slices, h0 = item % slices * per, h1 = h0 + per < kvh ? h0 + per : kvh;
        const int64_t last = a->seq_lens[b] - 1;
        int64_t pos = a->window > 0 && last - a->window + 1 > 0 ? last - a->window + 1 : 0;
        if (a->chunk > 0 && last / a->chunk * a->chunk > pos) pos = last / a->chunk * a->chunk;
        for (int64_t h = 0; h < h1 - h0; h++) {
            const float *qsrc = a->q + ((b * kvh + h0 + h) * groups) * hd;
            for (int64_t g = 0; g < groups; g++) {
                float *qg = q + h * state + g * dim;
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
            const int64_t next = off == 0 && ahead <= last / bs ? table[ahead] : -1;
            for (int64_t h = h0; h < h1; h++) {
                const int64_t row = (block * bs + off) * kvh + h, i = h - h0;
                const float ks = a->k_scale ? a->k_scale[block * kvh + h] : 1.0f;
                const float vs = a->v_scale ? a->v_scale[block * kvh + h] : 1.0f;
                if (next >= 0) {
                    NAME(prefetch)(a, a->k, next, h);
                    NAME(prefetch)(a, a->v, next, h);
                }
                int dtype = NAME(rows)(a, a->k, row, n, dim, kbuf, krow);
                NAME(scores)(q + i * state, groups, krow, dtype, n, dim, s);
                for (int64_t g = 0; g < groups; g++)
                    NAME(softmax_step)(a, s + g * CHUNK, n, ks, vs, m + i * groups + g, l + i * groups + g,
                                       acc + i * state + g * dim, dim);
                dtype = NAME(rows)(a, a->v, row, n, dim, vbuf, vrow);
                NAME(accumulate)(acc + i * state, groups, s, vrow, dtype, n, dim);
            }
            pos += n;
        }
        for (int64_t h = 0; h < h1 - h0; h++) {
            float *o = a->out + ((b * kvh + h0 + h) * groups) * hd;
            for (int64_t g = 0; g < groups; g++)
                for (int64_t d = 0; d < hd; d++)
                    o[g * hd + d] = acc[h * state + g * dim + d] / l[h * groups + g];
        }
    }
}

#undef VF
#undef VI
#undef VU
#undef JT
#undef INLINE
