/* Vector helpers of the CPU decode kernel, included by cpu_decode_kernel.h once per instruction set (LANES,
 * TARGET, NAME and the optional CVT_HALF set as that file describes): the vector types, loads that widen
 * a narrow row to float32 in registers, exp, soft-cap and the lane reductions. */

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

/* 2 x LANES bfloat16 values from element `d` on as two float32 vectors: the even-numbered elements in
 * `even`, the odd ones in `odd`. A bfloat16 is the upper half of a float32 and each 32-bit word of the load
 * holds two of them (little-endian: the even one low), so one shift and one AND widen 2 x LANES values,
 * with no lane-crossing instruction (load_as_float's zero-extension is one, and on Intel cores those share
 * port 5 with half the FMAs). The caller keeps its query and accumulator in the same even/odd order. */
INLINE void NAME(load_bf16_pairs)(const void *row, int64_t d, VF *even, VF *odd) {
    VU w; memcpy(&w, (const uint16_t *)row + d, sizeof w);
    VU lo = w << 16, hi = w & 0xffff0000u;
    memcpy(even, &lo, sizeof lo);
    memcpy(odd, &hi, sizeof hi);
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

INLINE VF NAME(vmax)(VF x, VF y) { VI gt = x > y; return (VF)((gt & (VI)x) | (~gt & (VI)y)); }

/* The largest lane and the sum of the lanes of `x`, by halving shuffles (log2(LANES) steps, not a LANES-long
 * dependency chain of scalar operations: the softmax runs once per chunk and query head). */
INLINE float NAME(hmax)(VF x) {
#if LANES == 16
    x = NAME(vmax)(x, SHUFFLE(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
    x = NAME(vmax)(x, SHUFFLE(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
    x = NAME(vmax)(x, SHUFFLE(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
    x = NAME(vmax)(x, SHUFFLE(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
#else
    x = NAME(vmax)(x, SHUFFLE(x, x, 4, 5, 6, 7, 0, 1, 2, 3));
    x = NAME(vmax)(x, SHUFFLE(x, x, 2, 3, 0, 1, 6, 7, 4, 5));
    x = NAME(vmax)(x, SHUFFLE(x, x, 1, 0, 3, 2, 5, 4, 7, 6));
#endif
    return x[0];
}

INLINE float NAME(hsum)(VF x) {
#if LANES == 16
    x += SHUFFLE(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    x += SHUFFLE(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    x += SHUFFLE(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    x += SHUFFLE(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
#else
    x += SHUFFLE(x, x, 4, 5, 6, 7, 0, 1, 2, 3);
    x += SHUFFLE(x, x, 2, 3, 0, 1, 6, 7, 4, 5);
    x += SHUFFLE(x, x, 1, 0, 3, 2, 5, 4, 7, 6);
#endif
    return x[0];
}
