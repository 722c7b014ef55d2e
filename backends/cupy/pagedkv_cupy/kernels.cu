// pagedkv CUDA kernels: paged K/V writes and paged attention (decode, prefill).
//
// Compiled at run time by NVRTC through cupy.RawModule; template instances are
// chosen with name expressions (see kernels.py). The source needs no header:
// half and bfloat16 are carried as 16-bit payload structs and converted with
// PTX (device) or exact integer code (host), so the same file also compiles
// with nvcc and, under a small host shim, with a C++ compiler for the CPU
// emulation the tests use.
//
// Layouts (one layer): pools [num_blocks, block_size, num_kv_heads, head_dim],
// scales [num_blocks, num_kv_heads] (int8 pools), block tables int32
// [batch, max_blocks], seq_lens int32 [batch], queries [num_queries,
// num_q_heads, head_dim]. Every block id read from a table is bounds-checked:
// a bad id masks its tokens, it never reads outside the pool.
//
// Attention conventions: scores = scale * q.k (int8 keys times their scale),
// soft_cap c > 0: c * tanh(score / c) before masking; window w > 0: a query at
// position t sees keys p with t - w < p <= t; chunk c > 0 (chunked-local
// attention): only keys of its own chunk, p / c == t / c; GQA: query head h
// reads KV head h / (num_q_heads / num_kv_heads); softmax in float32. Sinks
// (has_sinks != 0): sinks[h] is head h's learned logit, a key with no value:
// it joins the softmax's denominator as exp(sinks[h]) once per query.

struct pkv_f16 { unsigned short bits; };   // IEEE binary16 payload
struct pkv_bf16 { unsigned short bits; };  // bfloat16 payload

namespace pkv {

constexpr unsigned FULL_MASK = 0xffffffffu;
constexpr int NUM_THREADS = 128;
constexpr int NUM_WARPS = NUM_THREADS / 32;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

// ---------------------------------------------------------------------------
// Scalar conversions
// ---------------------------------------------------------------------------

__device__ __forceinline__ float half_bits_to_float(unsigned short h) {
#if defined(__CUDA_ARCH__)
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    const unsigned sign = (unsigned)(h & 0x8000u) << 16;
    const unsigned exp = (h >> 10) & 0x1fu;
    unsigned man = h & 0x3ffu;
    unsigned bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {  // subnormal: normalise
        int e = -1;
        do { man <<= 1; ++e; } while ((man & 0x400u) == 0);
        bits = sign | ((unsigned)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    return __uint_as_float(bits);
#endif
}

__device__ __forceinline__ unsigned short float_to_half_bits(float f) {
#if defined(__CUDA_ARCH__)
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    const unsigned x = __float_as_uint(f);
    const unsigned short sign = (unsigned short)((x >> 16) & 0x8000u);
    const unsigned ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (unsigned short)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
    if (ax >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // rounds to >= 65520: inf
    if (ax < 0x33000001u) return sign;                                // <= 2^-25: rounds to zero
    const int e = (int)(ax >> 23);
    unsigned man = (ax & 0x7fffffu) | 0x800000u;
    int shift;
    unsigned base;
    if (e < 113) {  // subnormal half
        shift = 126 - e;
        base = 0;
    } else {
        shift = 13;
        base = (unsigned)(e - 112) << 10;
        man &= 0x7fffffu;
    }
    const unsigned halfway = 1u << (shift - 1);
    const unsigned rest = man & ((1u << shift) - 1u);
    unsigned out = base + (man >> shift);
    if (rest > halfway || (rest == halfway && (out & 1u))) ++out;
    return (unsigned short)(sign | out);
#endif
}

__device__ __forceinline__ float bf16_bits_to_float(unsigned short b) {
    return __uint_as_float((unsigned)b << 16);
}

__device__ __forceinline__ unsigned short float_to_bf16_bits(float f) {
    const unsigned x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((x >> 16) | 0x40u);  // quiet NaN
    return (unsigned short)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);                 // round to nearest even
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(pkv_f16 x) { return half_bits_to_float(x.bits); }
__device__ __forceinline__ float to_float(pkv_bf16 x) { return bf16_bits_to_float(x.bits); }
__device__ __forceinline__ float to_float(signed char x) { return (float)x; }

template <typename T> struct Convert;
template <> struct Convert<float> {
    static __device__ __forceinline__ float from(float x) { return x; }
};
template <> struct Convert<pkv_f16> {
    static __device__ __forceinline__ pkv_f16 from(float x) { pkv_f16 r; r.bits = float_to_half_bits(x); return r; }
};
template <> struct Convert<pkv_bf16> {
    static __device__ __forceinline__ pkv_bf16 from(float x) { pkv_bf16 r; r.bits = float_to_bf16_bits(x); return r; }
};

template <typename T> struct IsInt8 { static constexpr bool value = false; };
template <> struct IsInt8<signed char> { static constexpr bool value = true; };

// ---------------------------------------------------------------------------
// Vector loads: VEC elements of T read as 32-bit words, decoded one by one
// ---------------------------------------------------------------------------

template <int BYTES> struct Words { static constexpr int N = BYTES < 4 ? 1 : BYTES / 4; };

template <int BYTES>
__device__ __forceinline__ void load_words(const void* p, unsigned* w) {
    if constexpr (BYTES == 16) {
        const uint4 r = *reinterpret_cast<const uint4*>(p);
        w[0] = r.x; w[1] = r.y; w[2] = r.z; w[3] = r.w;
    } else if constexpr (BYTES == 8) {
        const uint2 r = *reinterpret_cast<const uint2*>(p);
        w[0] = r.x; w[1] = r.y;
    } else if constexpr (BYTES == 4) {
        w[0] = *reinterpret_cast<const unsigned*>(p);
    } else if constexpr (BYTES == 2) {
        w[0] = *reinterpret_cast<const unsigned short*>(p);
    } else {
        w[0] = *reinterpret_cast<const unsigned char*>(p);
    }
}

template <typename T> struct Elem;
template <> struct Elem<float> {
    static __device__ __forceinline__ float get(const unsigned* w, int e) { return __uint_as_float(w[e]); }
};
template <> struct Elem<pkv_f16> {
    static __device__ __forceinline__ float get(const unsigned* w, int e) {
        return half_bits_to_float((unsigned short)((w[e >> 1] >> ((e & 1) * 16)) & 0xffffu));
    }
};
template <> struct Elem<pkv_bf16> {
    static __device__ __forceinline__ float get(const unsigned* w, int e) {
        return __uint_as_float(((w[e >> 1] >> ((e & 1) * 16)) & 0xffffu) << 16);
    }
};
template <> struct Elem<signed char> {
    static __device__ __forceinline__ float get(const unsigned* w, int e) {
        return (float)(signed char)((w[e >> 2] >> ((e & 3) * 8)) & 0xffu);
    }
};

__host__ __device__ constexpr int pow2_ceil(int x) { return x <= 1 ? 1 : 2 * pow2_ceil((x + 1) / 2); }

// Largest power of two <= 16 / sizeof(T) that divides D: every row start is then VEC-aligned.
__host__ __device__ constexpr int vec_width(int max_vec, int d) {
    return (max_vec > 1 && d % max_vec != 0) ? vec_width(max_vec / 2, d) : max_vec;
}

// How a warp covers rows of one head: TPR lanes per row, CPT chunks of VEC elements per lane.
// At most 16 bytes and 8 elements per load: int8 rows take 8-byte loads, which keeps the
// per-lane query and accumulator arrays (VEC floats per head) as small as for 16-bit pools.
template <typename KVT, int HEAD_DIM>
struct RowLayout {
    static constexpr int VEC = vec_width(16 / (int)sizeof(KVT) < 8 ? 16 / (int)sizeof(KVT) : 8, HEAD_DIM);
    static constexpr int NVEC = HEAD_DIM / VEC;
    static constexpr int TPR = pow2_ceil(NVEC) < 32 ? pow2_ceil(NVEC) : 32;
    static constexpr int CPT = (NVEC + TPR - 1) / TPR;
    static constexpr int RPW = 32 / TPR;
    static constexpr int BYTES = VEC * (int)sizeof(KVT);
    static constexpr int WORDS = Words<BYTES>::N;
};

// ---------------------------------------------------------------------------
// Visible range of a decode query (position seq_len - 1) and its splits
// ---------------------------------------------------------------------------

// [lo, hi): the window's start or the chunk's, whichever is later, to the query itself.
__device__ __forceinline__ void decode_range(int seq_len, int window, int chunk, int& lo, int& hi) {
    hi = seq_len;
    lo = window > 0 ? imax(0, seq_len - window) : 0;
    if (chunk > 0 && seq_len > 0) lo = imax(lo, (seq_len - 1) / chunk * chunk);
    if (lo > hi) lo = hi;
}

__device__ __forceinline__ int num_splits_for(int visible, int split_len) {
    return visible <= 0 ? 0 : (visible + split_len - 1) / split_len;
}

__device__ __forceinline__ float cap_score(float x, float soft_cap) {
    return soft_cap > 0.0f ? soft_cap * tanhf(x / soft_cap) : x;
}

}  // namespace pkv

// ===========================================================================
// Writes
// ===========================================================================

// Scatter num_tokens rows of row_elems raw elements into the pools; a slot of
// -1 (or outside the pool) is skipped. T is the raw carrier type of the pool
// dtype (unsigned short for 16-bit floats, unsigned int for float32).
// grid (num_tokens), block (128).
template <typename T>
__global__ void __launch_bounds__(128) pagedkv_write(
    T* __restrict__ k_pool, T* __restrict__ v_pool,
    const T* __restrict__ k, const T* __restrict__ v,
    const long long* __restrict__ slots, long long num_slots, int row_elems)
{
    const long long slot = slots[blockIdx.x];
    if (slot < 0 || slot >= num_slots) return;
    const long long dst = slot * row_elems;
    const long long src = (long long)blockIdx.x * row_elems;
    for (int i = threadIdx.x; i < row_elems; i += blockDim.x) {
        k_pool[dst + i] = k[src + i];
        v_pool[dst + i] = v[src + i];
    }
}

// Quantized write into int8 pools with one float32 scale per (block, head).
// One thread block per (destination block u, head h, K or V): the absmax of
// the new tokens grows the scale (absmax / 127) and, when it grows a nonzero
// scale, the block's existing values are requantized to it first; then the
// new tokens are quantized (round half to even, clipped to [-127, 127]).
// tok_idx lists, grouped by destination block, the indices of the tokens
// written (tok_ptr[u] .. tok_ptr[u + 1]); x rows are float32 [n, heads, dim].
// grid (num_unique_blocks, num_heads, 2), block (128).
__global__ void __launch_bounds__(128) pagedkv_write_int8(
    signed char* __restrict__ k_pool, signed char* __restrict__ v_pool,
    float* __restrict__ k_scale, float* __restrict__ v_scale,
    const float* __restrict__ k, const float* __restrict__ v,
    const long long* __restrict__ slots, const long long* __restrict__ blocks,
    const int* __restrict__ tok_ptr, const int* __restrict__ tok_idx,
    int num_blocks, int block_size, int num_heads, int head_dim)
{
    __shared__ float warp_max[pkv::NUM_WARPS];
    __shared__ float sh_new;
    __shared__ float sh_ratio;
    __shared__ int sh_grown;

    const int u = blockIdx.x;
    const int h = blockIdx.y;
    signed char* pool = blockIdx.z ? v_pool : k_pool;
    float* scales = blockIdx.z ? v_scale : k_scale;
    const float* x = blockIdx.z ? v : k;
    const long long blk = blocks[u];
    if (blk < 0 || blk >= num_blocks) return;
    const int t0 = tok_ptr[u];
    const int count = (tok_ptr[u + 1] - t0) * head_dim;
    const int tid = threadIdx.x;

    float amax = 0.0f;
    for (int i = tid; i < count; i += pkv::NUM_THREADS) {
        const long long tok = tok_idx[t0 + i / head_dim];
        amax = fmaxf(amax, fabsf(x[(tok * num_heads + h) * head_dim + i % head_dim]));
    }
    for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(pkv::FULL_MASK, amax, off));
    if ((tid & 31) == 0) warp_max[tid >> 5] = amax;
    __syncthreads();
    if (tid == 0) {
        float m = warp_max[0];
        for (int w = 1; w < pkv::NUM_WARPS; ++w) m = fmaxf(m, warp_max[w]);
        const float old = scales[blk * num_heads + h];
        const float grown = fmaxf(old, m / 127.0f);
        sh_grown = (grown > old && old > 0.0f) ? 1 : 0;
        sh_ratio = sh_grown ? old / grown : 1.0f;
        sh_new = grown;
    }
    __syncthreads();

    const long long block_base = blk * block_size;
    if (sh_grown) {
        const float ratio = sh_ratio;
        for (int i = tid; i < block_size * head_dim; i += pkv::NUM_THREADS) {
            const long long idx = ((block_base + i / head_dim) * num_heads + h) * head_dim + i % head_dim;
            const float r = rintf((float)pool[idx] * ratio);
            pool[idx] = (signed char)fminf(fmaxf(r, -127.0f), 127.0f);
        }
    }
    __syncthreads();

    const float safe = sh_new > 0.0f ? sh_new : 1.0f;
    for (int i = tid; i < count; i += pkv::NUM_THREADS) {
        const long long tok = tok_idx[t0 + i / head_dim];
        const long long off = slots[tok] - block_base;
        if (off < 0 || off >= block_size) continue;
        const int d = i % head_dim;
        const float r = rintf(x[(tok * num_heads + h) * head_dim + d] / safe);
        pool[((block_base + off) * num_heads + h) * head_dim + d] = (signed char)fminf(fmaxf(r, -127.0f), 127.0f);
    }
    if (tid == 0) scales[blk * num_heads + h] = sh_new;
}

// ===========================================================================
// Paged decode (flash-decoding)
// ===========================================================================

// One query per sequence (position seq_len - 1). One thread block per
// (split of the visible context, KV head x chunk of GT query heads, sequence):
// it reads each K/V row of its split once for all its query heads. Lanes are
// grouped TPR to a row; each group walks U tokens at a time with its own
// online-softmax state (max m, sum l, output acc), merged across the warp by
// shuffles and across warps in shared memory. A sequence whose visible range
// fits one split writes its output directly (a sink joins its denominator
// there); otherwise each split writes its normalised partial output and
// (m, l), merged by pagedkv_decode_reduce (where the sink joins, once).
// grid (batch * max_splits, num_kv_heads * ceil(group / GT)), block (128).
template <typename QT, typename KVT, int HEAD_DIM, int GT>
__global__ void __launch_bounds__(128) pagedkv_decode(
    QT* __restrict__ out, float* __restrict__ part_o, float* __restrict__ part_ml,
    const QT* __restrict__ q, const KVT* __restrict__ k_pool, const KVT* __restrict__ v_pool,
    const float* __restrict__ k_scale, const float* __restrict__ v_scale,
    const int* __restrict__ block_tables, const int* __restrict__ seq_lens,
    int max_blocks, int num_blocks, int block_size, int num_kv_heads, int num_q_heads,
    int split_len, int max_splits, float scale, int window, float soft_cap, int chunk,
    const float* __restrict__ sinks, int has_sinks)
{
    using L = pkv::RowLayout<KVT, HEAD_DIM>;
    constexpr int U = GT >= 8 ? 2 : 4;  // tokens in flight per lane group; fewer when 8 heads need registers
    constexpr bool INT8 = pkv::IsInt8<KVT>::value;
    __shared__ float sm_m[pkv::NUM_WARPS][GT];
    __shared__ float sm_l[pkv::NUM_WARPS][GT];
    __shared__ float sm_acc[GT][HEAD_DIM];
    __shared__ float sm_total[GT];
    __shared__ float sm_max[GT];
    __shared__ float sm_denom[GT];  // sm_total, plus the sink's exp(sink - max) on the direct path

    const int b = blockIdx.x / max_splits;
    const int split = blockIdx.x - b * max_splits;
    const int group = num_q_heads / num_kv_heads;
    const int chunks = (group + GT - 1) / GT;
    const int kvh = blockIdx.y / chunks;
    const int g0 = (blockIdx.y % chunks) * GT;
    const int seq_len = seq_lens[b];
    int lo, hi;
    pkv::decode_range(seq_len, window, chunk, lo, hi);
    const int n_splits = pkv::num_splits_for(hi - lo, split_len);
    if (split >= pkv::imax(n_splits, 1)) return;  // uniform over the block
    const bool direct = n_splits <= 1;
    const int start = lo + split * split_len;
    const int end = pkv::imin(hi, start + split_len);

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int row = lane / L::TPR;
    const int col = lane % L::TPR;

    float qv[GT][L::CPT][L::VEC];
#pragma unroll
    for (int g = 0; g < GT; ++g) {
        const bool active = g0 + g < group;
        const long long qbase = ((long long)b * num_q_heads + kvh * group + g0 + g) * HEAD_DIM;
#pragma unroll
        for (int c = 0; c < L::CPT; ++c) {
            const int ci = col + c * L::TPR;
#pragma unroll
            for (int e = 0; e < L::VEC; ++e) {
                qv[g][c][e] = (active && ci < L::NVEC) ? pkv::to_float(q[qbase + ci * L::VEC + e]) * scale : 0.0f;
            }
        }
    }

    float m[GT], l[GT], acc[GT][L::CPT][L::VEC];
#pragma unroll
    for (int g = 0; g < GT; ++g) {
        m[g] = pkv::neg_inf();
        l[g] = 0.0f;
#pragma unroll
        for (int c = 0; c < L::CPT; ++c)
#pragma unroll
            for (int e = 0; e < L::VEC; ++e) acc[g][c][e] = 0.0f;
    }

    const long long row_stride = (long long)num_kv_heads * HEAD_DIM;
    const KVT* k_head = k_pool + (long long)kvh * HEAD_DIM;
    const KVT* v_head = v_pool + (long long)kvh * HEAD_DIM;
    const int* table = block_tables + (long long)b * max_blocks;

    // The loop bound is uniform over the warp, so every lane reaches every shuffle.
    for (int base = start + warp * L::RPW * U; base < end; base += pkv::NUM_WARPS * L::RPW * U) {
        unsigned kw[U][L::CPT][L::WORDS];
        unsigned vw[U][L::CPT][L::WORDS];
        float k_sc[U], v_sc[U];
        bool valid[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int p = base + row * U + u;
            int phys = -1;
            int off = 0;
            if (p < end) {
                const int blk = p / block_size;
                off = p - blk * block_size;
                phys = blk < max_blocks ? table[blk] : -1;
            }
            valid[u] = phys >= 0 && phys < num_blocks;
            const long long row_off = ((long long)(valid[u] ? phys : 0) * block_size + off) * row_stride;
#pragma unroll
            for (int c = 0; c < L::CPT; ++c) {
                const int ci = col + c * L::TPR;
                if (valid[u] && ci < L::NVEC) {
                    pkv::load_words<L::BYTES>(k_head + row_off + ci * L::VEC, kw[u][c]);
                    pkv::load_words<L::BYTES>(v_head + row_off + ci * L::VEC, vw[u][c]);
                } else {
#pragma unroll
                    for (int w = 0; w < L::WORDS; ++w) { kw[u][c][w] = 0u; vw[u][c][w] = 0u; }
                }
            }
            if constexpr (INT8) {
                k_sc[u] = valid[u] ? k_scale[(long long)phys * num_kv_heads + kvh] : 0.0f;
                v_sc[u] = valid[u] ? v_scale[(long long)phys * num_kv_heads + kvh] : 0.0f;
            } else {
                k_sc[u] = 1.0f;
                v_sc[u] = 1.0f;
            }
        }

        float s[U][GT];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            float kf[L::CPT][L::VEC];  // converted once, used by every query head
#pragma unroll
            for (int c = 0; c < L::CPT; ++c)
#pragma unroll
                for (int e = 0; e < L::VEC; ++e) kf[c][e] = pkv::Elem<KVT>::get(kw[u][c], e);
#pragma unroll
            for (int g = 0; g < GT; ++g) {
                float dot = 0.0f;
#pragma unroll
                for (int c = 0; c < L::CPT; ++c)
#pragma unroll
                    for (int e = 0; e < L::VEC; ++e) dot += qv[g][c][e] * kf[c][e];
                s[u][g] = dot;
            }
        }
#pragma unroll
        for (int off = L::TPR / 2; off > 0; off >>= 1)
#pragma unroll
            for (int u = 0; u < U; ++u)
#pragma unroll
                for (int g = 0; g < GT; ++g) s[u][g] += __shfl_xor_sync(pkv::FULL_MASK, s[u][g], off);
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int g = 0; g < GT; ++g)
                s[u][g] = valid[u] ? pkv::cap_score(s[u][g] * k_sc[u], soft_cap) : pkv::neg_inf();

        // Online softmax: rescale each head's state, then add the U tokens' values; each V element is
        // converted once and used by every head (one converted value live at a time).
        float pv[GT][U];
#pragma unroll
        for (int g = 0; g < GT; ++g) {
            float top = s[0][g];
#pragma unroll
            for (int u = 1; u < U; ++u) top = fmaxf(top, s[u][g]);
            const float m_new = fmaxf(m[g], top);
            const bool any = m_new != pkv::neg_inf();  // false: nothing visible yet, state unchanged
            const float alpha = any ? expf(m[g] - m_new) : 1.0f;
            float psum = 0.0f;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const float p = any ? expf(s[u][g] - m_new) : 0.0f;
                psum += p;
                pv[g][u] = p * v_sc[u];
            }
            l[g] = l[g] * alpha + psum;
            m[g] = m_new;
#pragma unroll
            for (int c = 0; c < L::CPT; ++c)
#pragma unroll
                for (int e = 0; e < L::VEC; ++e) acc[g][c][e] *= alpha;
        }
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int c = 0; c < L::CPT; ++c)
#pragma unroll
                for (int e = 0; e < L::VEC; ++e) {
                    const float value = pkv::Elem<KVT>::get(vw[u][c], e);
#pragma unroll
                    for (int g = 0; g < GT; ++g) acc[g][c][e] += pv[g][u] * value;
                }
    }

    // Merge the row groups of a warp (butterfly: every lane ends with the merged state).
#pragma unroll
    for (int off = L::TPR; off < 32; off <<= 1) {
#pragma unroll
        for (int g = 0; g < GT; ++g) {
            const float m_o = __shfl_xor_sync(pkv::FULL_MASK, m[g], off);
            const float l_o = __shfl_xor_sync(pkv::FULL_MASK, l[g], off);
            const float m_new = fmaxf(m[g], m_o);
            const bool any = m_new != pkv::neg_inf();
            const float a = any ? expf(m[g] - m_new) : 0.0f;
            const float bo = any ? expf(m_o - m_new) : 0.0f;
            l[g] = l[g] * a + l_o * bo;
            m[g] = m_new;
#pragma unroll
            for (int c = 0; c < L::CPT; ++c)
#pragma unroll
                for (int e = 0; e < L::VEC; ++e) {
                    const float acc_o = __shfl_xor_sync(pkv::FULL_MASK, acc[g][c][e], off);
                    acc[g][c][e] = acc[g][c][e] * a + acc_o * bo;
                }
        }
    }

    // Merge the warps in shared memory, one warp after the other (deterministic).
    if (lane == 0) {
#pragma unroll
        for (int g = 0; g < GT; ++g) { sm_m[warp][g] = m[g]; sm_l[warp][g] = l[g]; }
    }
    __syncthreads();
    float factor[GT];
#pragma unroll
    for (int g = 0; g < GT; ++g) {
        float top = sm_m[0][g];
        for (int w = 1; w < pkv::NUM_WARPS; ++w) top = fmaxf(top, sm_m[w][g]);
        const bool any = top != pkv::neg_inf();
        factor[g] = any ? expf(m[g] - top) : 0.0f;
        if (tid == 0) {
            float total = 0.0f;
            for (int w = 0; w < pkv::NUM_WARPS; ++w) total += any ? sm_l[w][g] * expf(sm_m[w][g] - top) : 0.0f;
            sm_total[g] = total;
            sm_max[g] = top;
            // a sink adds exp(sink - top) to the denominator (inf when it dwarfs every score: the output is then 0)
            const bool sink = direct && has_sinks != 0 && any && g0 + g < group;
            sm_denom[g] = sink ? total + expf(sinks[kvh * group + g0 + g] - top) : total;
        }
    }
    for (int w = 0; w < pkv::NUM_WARPS; ++w) {
        if (warp == w && row == 0) {
#pragma unroll
            for (int g = 0; g < GT; ++g)
#pragma unroll
                for (int c = 0; c < L::CPT; ++c) {
                    const int ci = col + c * L::TPR;
                    if (ci < L::NVEC) {
#pragma unroll
                        for (int e = 0; e < L::VEC; ++e) {
                            const float val = acc[g][c][e] * factor[g];
                            float& slot = sm_acc[g][ci * L::VEC + e];
                            slot = (w == 0) ? val : slot + val;
                        }
                    }
                }
        }
        __syncthreads();
    }

    for (int i = tid; i < GT * HEAD_DIM; i += pkv::NUM_THREADS) {
        const int g = i / HEAD_DIM;
        const int d = i - g * HEAD_DIM;
        if (g0 + g >= group) continue;
        const long long qrow = (long long)b * num_q_heads + kvh * group + g0 + g;
        const float total = sm_total[g];
        if (direct) {
            const float denom = sm_denom[g];
            out[qrow * HEAD_DIM + d] = pkv::Convert<QT>::from(denom > 0.0f ? sm_acc[g][d] / denom : 0.0f);
        } else {
            const float o = total > 0.0f ? sm_acc[g][d] / total : 0.0f;
            const long long pidx = qrow * max_splits + split;
            part_o[pidx * HEAD_DIM + d] = o;
            if (d == 0) {
                part_ml[pidx * 2] = sm_max[g];
                part_ml[pidx * 2 + 1] = total;
            }
        }
    }
}

// Merge the splits of each (sequence, query head) whose context needed more
// than one: out = sum_s w_s o_s / (sum_s w_s + exp(sink - M)) with w_s =
// l_s exp(m_s - M), M the largest m_s (and the sink, if any): the sink joins
// here, once, never per split.
// grid (batch, num_q_heads), block (128).
template <typename QT, int HEAD_DIM>
__global__ void __launch_bounds__(128) pagedkv_decode_reduce(
    QT* __restrict__ out, const float* __restrict__ part_o, const float* __restrict__ part_ml,
    const int* __restrict__ seq_lens, int num_q_heads, int split_len, int max_splits, int window, int chunk,
    const float* __restrict__ sinks, int has_sinks)
{
    const int b = blockIdx.x;
    const int qh = blockIdx.y;
    int lo, hi;
    pkv::decode_range(seq_lens[b], window, chunk, lo, hi);
    const int n = pkv::imin(pkv::num_splits_for(hi - lo, split_len), max_splits);
    if (n <= 1) return;  // written directly by pagedkv_decode
    const long long qrow = (long long)b * num_q_heads + qh;
    const long long base = qrow * max_splits;
    float top = has_sinks != 0 ? sinks[qh] : pkv::neg_inf();
    for (int s = 0; s < n; ++s)
        if (part_ml[(base + s) * 2 + 1] > 0.0f) top = fmaxf(top, part_ml[(base + s) * 2]);
    float total = has_sinks != 0 ? expf(sinks[qh] - top) : 0.0f;
    for (int s = 0; s < n; ++s) {
        const float l = part_ml[(base + s) * 2 + 1];
        if (l > 0.0f) total += l * expf(part_ml[(base + s) * 2] - top);
    }
    for (int d = threadIdx.x; d < HEAD_DIM; d += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < n; ++s) {
            const float l = part_ml[(base + s) * 2 + 1];
            if (l > 0.0f) acc += l * expf(part_ml[(base + s) * 2] - top) * part_o[(base + s) * HEAD_DIM + d];
        }
        out[qrow * HEAD_DIM + d] = pkv::Convert<QT>::from(total > 0.0f ? acc / total : 0.0f);
    }
}

// ===========================================================================
// Paged prefill (causal, chunked over a cached prefix)
// ===========================================================================

// Query i of a sequence with n queries and seq_len cached tokens sits at
// position seq_len - n + i. One thread block per (query tile, KV head x chunk
// of heads_per_block query heads); its 32 rows are (token, head) pairs, four
// lanes to a row, each lane owning head dims sub, sub + 4, ... . K/V tiles of
// BK keys are staged in shared memory as float32 (int8 already scaled) and
// shared by every row; each row keeps its own online softmax, started from
// its head's sink (max = sink, sum = 1) when there are sinks. The tile reads
// keys from its first row's window/chunk start to its last row's end; each
// row masks the rest to its own range (a tile may straddle a chunk boundary).
// tile_seq / tile_q0 [num_tiles] give each tile's sequence and first query.
// grid (num_tiles, num_kv_heads * ceil(group / heads_per_block)), block (128).
template <typename QT, typename KVT, int HEAD_DIM>
__global__ void __launch_bounds__(128) pagedkv_prefill(
    QT* __restrict__ out, const QT* __restrict__ q,
    const KVT* __restrict__ k_pool, const KVT* __restrict__ v_pool,
    const float* __restrict__ k_scale, const float* __restrict__ v_scale,
    const int* __restrict__ block_tables, const int* __restrict__ seq_lens,
    const int* __restrict__ query_start_loc, const int* __restrict__ tile_seq, const int* __restrict__ tile_q0,
    int max_blocks, int num_blocks, int block_size, int num_kv_heads, int num_q_heads,
    int heads_per_block, int tokens_per_tile, float scale, int causal, int window, float soft_cap, int chunk,
    const float* __restrict__ sinks, int has_sinks)
{
    constexpr int LANES = 4;
    constexpr int DPT = (HEAD_DIM + LANES - 1) / LANES;
    constexpr int BK_RAW = 4096 / HEAD_DIM;
    constexpr int BK = BK_RAW < 16 ? 16 : (BK_RAW > 64 ? 64 : BK_RAW);
    constexpr bool INT8 = pkv::IsInt8<KVT>::value;
    __shared__ float ks[BK][HEAD_DIM];
    __shared__ float vs[BK][HEAD_DIM];
    __shared__ int kvalid[BK];

    const int tile = blockIdx.x;
    const int b = tile_seq[tile];
    const int q0 = tile_q0[tile];
    const int group = num_q_heads / num_kv_heads;
    const int chunks = (group + heads_per_block - 1) / heads_per_block;
    const int kvh = blockIdx.y / chunks;
    const int g0 = (blockIdx.y % chunks) * heads_per_block;
    const int seq_len = seq_lens[b];
    const int qstart = query_start_loc[b];
    const int n_q = query_start_loc[b + 1] - qstart;
    const bool bounded = causal != 0 || window > 0;

    const int tid = threadIdx.x;
    const int r = tid / LANES;
    const int sub = tid % LANES;
    const int tok = r / heads_per_block;
    const int g = r % heads_per_block;
    const int qi = q0 + tok;
    const bool active = tok < tokens_per_tile && qi < n_q && g0 + g < group;
    const int t = seq_len - n_q + qi;  // this row's position
    int row_lo = window > 0 ? pkv::imax(0, t - window + 1) : 0;
    int row_hi = bounded ? t + 1 : seq_len;
    if (chunk > 0 && t >= 0) {
        row_lo = pkv::imax(row_lo, t / chunk * chunk);
        row_hi = pkv::imin(row_hi, (t / chunk + 1) * chunk);
    }

    const int q_last = pkv::imin(q0 + tokens_per_tile, n_q) - 1;
    const int t_first = seq_len - n_q + q0;
    const int t_last = seq_len - n_q + q_last;
    int blk_lo = window > 0 ? pkv::imax(0, t_first - window + 1) : 0;
    int blk_hi = bounded ? pkv::imin(t_last + 1, seq_len) : seq_len;
    if (chunk > 0 && t_first >= 0) {
        blk_lo = pkv::imax(blk_lo, t_first / chunk * chunk);
        blk_hi = pkv::imin(blk_hi, (t_last / chunk + 1) * chunk);
    }

    const long long qrow = (long long)(qstart + qi) * num_q_heads + kvh * group + g0 + g;
    float qv[DPT], acc[DPT];
#pragma unroll
    for (int i = 0; i < DPT; ++i) {
        const int d = sub + LANES * i;
        qv[i] = (active && d < HEAD_DIM) ? pkv::to_float(q[qrow * HEAD_DIM + d]) * scale : 0.0f;
        acc[i] = 0.0f;
    }
    const bool sink = active && has_sinks != 0;
    float m = sink ? sinks[kvh * group + g0 + g] : pkv::neg_inf();
    float l = sink ? 1.0f : 0.0f;

    const long long row_stride = (long long)num_kv_heads * HEAD_DIM;
    const int* table = block_tables + (long long)b * max_blocks;
    for (int kt = blk_lo; kt < blk_hi; kt += BK) {
        for (int i = tid; i < BK * HEAD_DIM; i += pkv::NUM_THREADS) {
            const int j = i / HEAD_DIM;
            const int d = i - j * HEAD_DIM;
            const int p = kt + j;
            int phys = -1;
            int off = 0;
            if (p < blk_hi) {
                const int blk = p / block_size;
                off = p - blk * block_size;
                phys = blk < max_blocks ? table[blk] : -1;
            }
            const bool ok = phys >= 0 && phys < num_blocks;
            float kf = 0.0f, vf = 0.0f;
            if (ok) {
                const long long idx = ((long long)phys * block_size + off) * row_stride + (long long)kvh * HEAD_DIM + d;
                kf = pkv::to_float(k_pool[idx]);
                vf = pkv::to_float(v_pool[idx]);
                if constexpr (INT8) {
                    kf *= k_scale[(long long)phys * num_kv_heads + kvh];
                    vf *= v_scale[(long long)phys * num_kv_heads + kvh];
                }
            }
            ks[j][d] = kf;
            vs[j][d] = vf;
            if (d == 0) kvalid[j] = ok ? 1 : 0;
        }
        __syncthreads();

        float s[BK];
        float top = pkv::neg_inf();
#pragma unroll
        for (int j = 0; j < BK; ++j) {
            float dot = 0.0f;
#pragma unroll
            for (int i = 0; i < DPT; ++i) {
                const int d = sub + LANES * i;
                if (d < HEAD_DIM) dot += qv[i] * ks[j][d];
            }
            dot += __shfl_xor_sync(pkv::FULL_MASK, dot, 1);
            dot += __shfl_xor_sync(pkv::FULL_MASK, dot, 2);
            const int p = kt + j;
            const bool visible = active && kvalid[j] && p >= row_lo && p < row_hi;
            s[j] = visible ? pkv::cap_score(dot, soft_cap) : pkv::neg_inf();
            top = fmaxf(top, s[j]);
        }
        const float m_new = fmaxf(m, top);
        if (m_new != pkv::neg_inf()) {
            const float alpha = expf(m - m_new);
            l *= alpha;
#pragma unroll
            for (int i = 0; i < DPT; ++i) acc[i] *= alpha;
#pragma unroll
            for (int j = 0; j < BK; ++j) {
                const float p = expf(s[j] - m_new);
                l += p;
#pragma unroll
                for (int i = 0; i < DPT; ++i) {
                    const int d = sub + LANES * i;
                    if (d < HEAD_DIM) acc[i] += p * vs[j][d];
                }
            }
            m = m_new;
        }
        __syncthreads();
    }

    if (active) {
#pragma unroll
        for (int i = 0; i < DPT; ++i) {
            const int d = sub + LANES * i;
            if (d < HEAD_DIM) out[qrow * HEAD_DIM + d] = pkv::Convert<QT>::from(l > 0.0f ? acc[i] / l : 0.0f);
        }
    }
}
