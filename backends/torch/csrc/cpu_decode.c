/* pagedkv_torch._cpu_decode: paged decode attention over CPU pools, compiled.
 *
 * Why native code: decode reads every K/V byte once, so its speed is memory
 * bandwidth, but torch and NumPy can only multiply float32 (or return rounded
 * half-precision scores), so a bfloat16 pool had to be widened into a float32
 * copy first, and writing that copy cost what the halved read saved. Here a
 * row is widened in registers (or an L1-sized scratch) right before its dot
 * products, so narrow pools read fewer bytes and nothing else grows.
 *
 * The module is plain C over raw pointers (no torch headers): the Python side
 * (pagedkv_torch.native_decode) hands over the addresses of contiguous CPU
 * tensors whose shapes it checked (the query through the plan's check, the
 * int64 block tables and lengths through check_index_shapes). The ids and
 * lengths themselves are checked here, because a plan may be built from a
 * hand-made BatchIndex (plan_index): before any K/V byte is read, every
 * sequence of the call's items must have 1 <= seq_len <= table_stride *
 * block_size and every block id its seq_len reaches in [0, num_blocks);
 * otherwise `decode` reads nothing and returns (kind, row, col, value),
 * which the Python side raises as InvalidBlock / OutOfBounds /
 * InvalidArgument. The check walks each table row once per call, outside
 * the kernel's loops. The GIL is released while the kernel runs, so Python
 * threads can decode disjoint item ranges at once. With `lse`, each query
 * head's log-sum-exp is written beside its output, so a cascade can merge
 * this level with a shared prefix's (pagedkv_torch.cascade).
 *
 * Variants: AVX-512 (16 lanes) and AVX2+FMA (8 lanes) on x86-64, chosen at
 * import from CPUID, and a portable 8-lane build (NEON on arm64, SSE2
 * elsewhere), all written with GCC/Clang vector extensions. (setup.py passes
 * -Wno-psabi: the helpers taking vectors are always inlined, so the generic
 * variant's 32-byte vectors never cross a call ABI.)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2, DT_I8 = 3 };
enum { DT_BF16_PAIRS = 4 }; /* internal: bfloat16 rows widened in even/odd pairs (cpu_decode_vec.h) */
#define CHUNK 16 /* tokens scored per step; a multiple of every variant's LANES */
#define PREFETCH_BLOCKS 1 /* how far ahead the next block's rows are requested: 1, 2 and 4 measured alike on
                           * AMD Zen 4; on an Intel Xeon (Sapphire Rapids class) 1 was 4-8 % faster than 2 and
                           * 4 slower (docs/benchmarks-torch.md) */

typedef struct {
    const float *q;           /* [batch, num_kv_heads * group, head_dim] float32 */
    float *out;               /* same shape, float32 */
    const char *k, *v;        /* one layer's pools [num_blocks, block_size, num_kv_heads, head_dim] */
    const float *k_scale;     /* [num_blocks, num_kv_heads] for int8 pools, else NULL */
    const float *v_scale;
    const int64_t *block_tables; /* [batch, table_stride], ids in [0, num_blocks) where seq_len reaches */
    const int64_t *seq_lens;  /* [batch], each in [1, table_stride * block_size] */
    const float *sinks;       /* [num_kv_heads * group] finite sink logits, or NULL: none */
    float *lse;               /* [batch, num_kv_heads * group]: each query head's log-sum-exp of its scaled
                               * scores (sink included), or NULL: not wanted (a cascade merges levels by it) */
    int64_t num_blocks;       /* of the pools: checked against every block id before it is read */
    int64_t table_stride, num_kv_heads, group, head_dim, block_size, window, chunk, elem_size;
    int64_t heads_per_item;    /* KV heads walked together by one item */
    int dtype;
    float scale, soft_cap;    /* soft_cap <= 0: none; window <= 0: none; chunk <= 0: none */
} DecodeArgs;

static float half_to_float(uint16_t h) {
    uint32_t em = h & 0x7fffu, bits;
    if (em >= 0x7c00u) {
        bits = (em << 13) | 0x7f800000u;
    } else {
        uint32_t shifted = em << 13;
        float mag;
        memcpy(&mag, &shifted, 4);
        mag *= 0x1p112f;
        memcpy(&bits, &mag, 4);
    }
    bits |= (uint32_t)(h & 0x8000u) << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Two-vector lane shuffles: Clang and GCC 12+ spell them __builtin_shufflevector, older GCC
 * __builtin_shuffle with an index vector (PKV_GCC_SHUFFLE forces that form, to test it). */
#if defined(PKV_GCC_SHUFFLE) || (defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 12)
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (VI){__VA_ARGS__})
#else
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#endif

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)

#define LANES 8
#define TARGET
#define NAME(x) CAT(x, _generic)
#include "cpu_decode_kernel.h"
#undef LANES
#undef TARGET
#undef NAME

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_X86_VARIANTS 1
#define LANES 8
#define TARGET __attribute__((target("avx2,fma,f16c")))
#define NAME(x) CAT(x, _avx2)
#define CVT_HALF(p) ((vf_avx2)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p))))
#include "cpu_decode_kernel.h"
#undef LANES
#undef TARGET
#undef NAME
#undef CVT_HALF

#define LANES 16
#define TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))
#define NAME(x) CAT(x, _avx512)
#define CVT_HALF(p) ((vf_avx512)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p))))
#include "cpu_decode_kernel.h"
#undef LANES
#undef TARGET
#undef NAME
#undef CVT_HALF
#endif

typedef void (*DecodeFn)(const DecodeArgs *, int64_t, int64_t, float *);

/* Why a batch cannot be decoded; `decode` returns (kind, row, col, value) for the first one it finds. */
enum { BOUNDS_BAD_BLOCK = 1, BOUNDS_PAST_TABLE = 2, BOUNDS_EMPTY = 3 };
typedef struct {
    int kind;
    int64_t row, col, value; /* row: the sequence; col: the table column (-1 for a length); value: the bad number */
} BoundsError;

/* 1 when every sequence that items begin..end touch can be decoded without reading outside the pools, else 0
 * with the first problem in `err` (sequences in order; per sequence its length, then its ids in table order).
 * Every id a seq_len reaches is checked, the ones before a sliding window too, as check_index_bounds does. */
static int check_items(const DecodeArgs *a, int64_t begin, int64_t end, BoundsError *err) {
    if (end <= begin) return 1;
    const int64_t slices = (a->num_kv_heads + a->heads_per_item - 1) / a->heads_per_item;
    const int64_t bs = a->block_size, capacity = a->table_stride * bs;
    for (int64_t b = begin / slices; b <= (end - 1) / slices; b++) {
        const int64_t len = a->seq_lens[b];
        if (len < 1 || len > capacity) {
            *err = (BoundsError){len < 1 ? BOUNDS_EMPTY : BOUNDS_PAST_TABLE, b, -1, len};
            return 0;
        }
        const int64_t *table = a->block_tables + b * a->table_stride;
        for (int64_t i = 0, blocks = (len + bs - 1) / bs; i < blocks; i++) {
            if (table[i] < 0 || table[i] >= a->num_blocks) {
                *err = (BoundsError){BOUNDS_BAD_BLOCK, b, i, table[i]};
                return 0;
            }
        }
    }
    return 1;
}

enum { LEVEL_GENERIC = 0, LEVEL_AVX2 = 1, LEVEL_AVX512 = 2 };

#ifdef HAVE_X86_VARIANTS
#include <cpuid.h>

/* Whether the OS saves the register state `mask` of XCR0 on context switches (else AVX is unusable). */
static int os_saves(uint64_t mask) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((((uint64_t)hi << 32) | lo) & mask) == mask;
}

/* The best variant this CPU and OS run, from CPUID itself (compiler runtimes differ in
 * whether __builtin_cpu_supports is initialised inside a shared library). */
static int cpu_level(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return LEVEL_GENERIC;
    const int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1;
    if (!(fma && osxsave && avx && f16c) || !os_saves(0x6)) return LEVEL_GENERIC;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((b >> 5) & 1)) return LEVEL_GENERIC;
    const int avx512 = ((b >> 16) & 1) && ((b >> 17) & 1) && ((b >> 30) & 1) && ((b >> 31) & 1); /* F DQ BW VL */
    return avx512 && os_saves(0xe6) ? LEVEL_AVX512 : LEVEL_AVX2;
}
#else
static int cpu_level(void) { return LEVEL_GENERIC; }
#endif

static const char *const LEVEL_NAMES[] = {"generic", "avx2", "avx512"};
static int level;

/* The kernel of variant `requested` (NULL or "auto": the best this CPU runs), or NULL if it cannot run. */
static DecodeFn variant(const char *requested) {
    int want = level;
    if (requested != NULL && strcmp(requested, "auto") != 0) {
        for (want = LEVEL_AVX512; want >= 0 && strcmp(requested, LEVEL_NAMES[want]) != 0; want--) {
        }
        if (want < 0 || want > level) return NULL;
    }
#ifdef HAVE_X86_VARIANTS
    if (want == LEVEL_AVX512) return decode_items_avx512;
    if (want == LEVEL_AVX2) return decode_items_avx2;
#endif
    return decode_items_generic;
}

static PyObject *py_decode(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    /* 23 positional-only arguments, `variant`, then the keyword-only chunked-local and sink arguments */
    static char *keywords[] = {"", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "", "",
                               "", "", "variant", "chunk", "sinks", "lse", NULL};
    unsigned long long q, out, k, v, k_scale, v_scale, tables, lens, sinks = 0, lse = 0;
    long long batch, stride, num_blocks, kvh, group, hd, bs, window, elem, per, begin, end, chunk = 0;
    int dtype;
    float scale, cap;
    const char *requested = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "KKKKKKKKLLLLLLLLLLiffLL|z$LKK", keywords, &q, &out, &k, &v,
                                     &k_scale, &v_scale, &tables, &lens, &batch, &stride, &num_blocks, &kvh, &group,
                                     &hd, &bs, &window, &elem, &per, &dtype, &scale, &cap, &begin, &end, &requested,
                                     &chunk, &sinks, &lse))
        return NULL;
    if (dtype < DT_F32 || dtype > DT_I8 || batch < 0 || stride < 0 || num_blocks < 0 || kvh < 1 || group < 1 ||
        hd < 1 || bs < 1 || per < 1 || begin < 0 || end < begin || chunk < 0) {
        PyErr_SetString(PyExc_ValueError, "invalid decode arguments");
        return NULL;
    }
    if (per > kvh) per = kvh;
    if (end > batch * ((kvh + per - 1) / per)) {
        PyErr_SetString(PyExc_ValueError, "decode items past the batch");
        return NULL;
    }
    DecodeFn fn = variant(requested);
    if (fn == NULL) {
        PyErr_Format(PyExc_ValueError, "kernel variant %s is not available on this CPU", requested);
        return NULL;
    }
    DecodeArgs a = {
        .q = (const float *)(uintptr_t)q, .out = (float *)(uintptr_t)out,
        .k = (const char *)(uintptr_t)k, .v = (const char *)(uintptr_t)v,
        .k_scale = (const float *)(uintptr_t)k_scale, .v_scale = (const float *)(uintptr_t)v_scale,
        .block_tables = (const int64_t *)(uintptr_t)tables, .seq_lens = (const int64_t *)(uintptr_t)lens,
        .sinks = (const float *)(uintptr_t)sinks, .lse = (float *)(uintptr_t)lse, .num_blocks = num_blocks,
        .table_stride = stride,
        .num_kv_heads = kvh, .group = group, .head_dim = hd, .block_size = bs, .window = window, .chunk = chunk,
        .elem_size = elem, .heads_per_item = per, .dtype = dtype, .scale = scale, .soft_cap = cap,
    };
    int64_t dim = (hd + 15) / 16 * 16;
    size_t floats = (size_t)(2 * per * group * dim + group * CHUNK + 2 * CHUNK * dim + 2 * per * group);
    float *work = calloc(floats, sizeof(float));
    if (work == NULL) return PyErr_NoMemory();
    BoundsError err = {0, 0, 0, 0};
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = check_items(&a, begin, end, &err);
    if (ok) fn(&a, begin, end, work);
    Py_END_ALLOW_THREADS
    free(work);
    if (!ok) return Py_BuildValue("(iLLL)", err.kind, (long long)err.row, (long long)err.col, (long long)err.value);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode", (PyCFunction)(void (*)(void))py_decode, METH_VARARGS | METH_KEYWORDS,
     "decode(q, out, k, v, k_scale, v_scale, block_tables, seq_lens, batch, table_stride, num_blocks, num_kv_heads, "
     "group, head_dim, block_size, window, elem_size, heads_per_item, dtype, scale, soft_cap, begin, end, "
     "variant=None, *, chunk=0, sinks=0, lse=0): items begin..end (sequence * slices + slice of heads_per_item KV heads) "
     "of a paged decode; addresses of contiguous CPU buffers (block_tables and seq_lens int64; sinks, when not 0, "
     "float32 [num_kv_heads * group], finite; lse, when not 0, float32 [batch, num_kv_heads * group], "
     "receiving each query head's log-sum-exp of its scaled scores). chunk > 0: chunked-local attention (the query sees its own chunk "
     "of chunk tokens only). Returns None, or, reading nothing, "
     "(kind, row, col, value) when a sequence's length or a block id it reaches is out of range (kind: "
     "BOUNDS_BAD_BLOCK, BOUNDS_PAST_TABLE or BOUNDS_EMPTY)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_cpu_decode", .m_size = -1, .m_methods = methods,
};

PyMODINIT_FUNC PyInit__cpu_decode(void) {
    level = cpu_level();
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddStringConstant(m, "VARIANT", LEVEL_NAMES[level]) < 0 ||
        PyModule_AddIntConstant(m, "CHUNK", CHUNK) < 0 ||
        PyModule_AddIntConstant(m, "BOUNDS_BAD_BLOCK", BOUNDS_BAD_BLOCK) < 0 ||
        PyModule_AddIntConstant(m, "BOUNDS_PAST_TABLE", BOUNDS_PAST_TABLE) < 0 ||
        PyModule_AddIntConstant(m, "BOUNDS_EMPTY", BOUNDS_EMPTY) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
