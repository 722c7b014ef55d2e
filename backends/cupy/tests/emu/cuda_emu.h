// A CPU emulation of the CUDA execution model, just enough to run kernels.cu in tests.
//
// Each CUDA thread of a block is a coroutine (ucontext stacks, switched with
// _setjmp/_longjmp) scheduled round-robin; blocks run one after another, so
// `__shared__` can be a function-local static. __syncthreads and warp
// shuffles are real barriers: every lane must reach each one, exactly as the
// hardware requires with a full mask. The emulator reports, instead of
// hiding, what CUDA leaves undefined: a barrier or shuffle some threads of
// the block or warp have exited before, partial shuffle masks, and deadlock.
#pragma once

#include <math.h>
#include <setjmp.h>
#include <stdint.h>
#include <string.h>
#include <ucontext.h>

#include <cstdio>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };

namespace emu {

struct Dim3 { unsigned x = 1, y = 1, z = 1; };

enum class Run { Ready, Waiting, Done };

struct Thread {
    jmp_buf ctx;
    ucontext_t uc;
    Dim3 idx;
    int linear = 0;
    bool started = false;
    Run state = Run::Ready;
    unsigned shuffles = 0;
};

struct Barrier {
    int arrived = 0;
    unsigned generation = 0;
};

struct State {
    Dim3 grid, block, block_idx;
    std::vector<Thread> threads;
    std::vector<char> stacks;
    std::vector<Barrier> warp_bars;
    std::vector<int> warp_exited;
    std::vector<uint64_t> exchange;  // [warp][2][32]
    Barrier block_bar;
    int exited = 0;
    Thread* cur = nullptr;
    jmp_buf sched;
    const std::function<void()>* body = nullptr;
    unsigned long progress = 0;
    std::string error;
};

inline State g;
constexpr size_t STACK_BYTES = 256 * 1024;

inline void yield_to_scheduler() {
    if (!_setjmp(g.cur->ctx)) _longjmp(g.sched, 1);
}

[[noreturn]] inline void fail(const std::string& what) {
    char where[96];
    snprintf(where, sizeof where, " (block %u,%u,%u thread %d)", g.block_idx.x, g.block_idx.y, g.block_idx.z,
             g.cur ? g.cur->linear : -1);
    g.error = what + where;
    _longjmp(g.sched, 2);
}

inline void wait_on(Barrier& bar, int expected) {
    const unsigned gen = bar.generation;
    ++g.progress;
    if (++bar.arrived == expected) {
        bar.arrived = 0;
        ++bar.generation;
        return;
    }
    while (bar.generation == gen) {
        g.cur->state = Run::Waiting;
        yield_to_scheduler();
    }
    g.cur->state = Run::Ready;
}

inline int warp_of(const Thread& t) { return t.linear >> 5; }
inline int lanes_in_warp(int w) {
    const int n = (int)(g.block.x * g.block.y * g.block.z) - 32 * w;
    return n < 32 ? n : 32;
}

inline void warp_barrier() {
    const int w = warp_of(*g.cur);
    if (g.warp_exited[w]) fail("warp-level barrier or shuffle after lanes of the warp exited");
    wait_on(g.warp_bars[w], lanes_in_warp(w));
}

inline void block_barrier() {
    if (g.exited) fail("__syncthreads after some threads of the block exited");
    wait_on(g.block_bar, (int)g.threads.size());
}

template <typename T>
T exchange(unsigned mask, T value, int src_of_lane(int, int), int arg, int width) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a value wider than 64 bits");
    if (mask != 0xffffffffu) fail("shuffle with a partial mask");
    if (width <= 0 || width > 32 || (width & (width - 1))) fail("shuffle width must be a power of two <= 32");
    Thread& t = *g.cur;
    const int lane = t.linear & 31;
    const int w = warp_of(t);
    const int buf = (int)(t.shuffles++ & 1u);
    uint64_t* slots = &g.exchange[((size_t)w * 2 + buf) * 32];
    uint64_t raw = 0;
    memcpy(&raw, &value, sizeof(T));
    slots[lane] = raw;
    warp_barrier();  // double buffering makes one barrier per shuffle enough
    int src = src_of_lane(lane, arg);
    const int base = lane & ~(width - 1);
    src = (src < base || src >= base + width) ? lane : src;
    T out;
    memcpy(&out, &slots[src], sizeof(T));
    return out;
}

inline int xor_lane(int lane, int m) { return lane ^ m; }
inline int idx_lane(int lane, int s) { return (lane & ~31) | (s & 31); }

inline void trampoline() {
    (*g.body)();
    g.cur->state = Run::Done;
    ++g.exited;
    ++g.warp_exited[warp_of(*g.cur)];
    ++g.progress;
    _longjmp(g.sched, 1);
}

// Returns "" or the error that stopped the launch.
inline std::string launch(Dim3 grid, Dim3 block, const std::function<void()>& body) {
    const int n = (int)(block.x * block.y * block.z);
    if (n <= 0 || n > 1024 || n % 32) return "block size must be a positive multiple of 32, at most 1024";
    g.grid = grid;
    g.block = block;
    g.body = &body;
    g.threads.assign(n, Thread());
    if (g.stacks.size() < (size_t)n * STACK_BYTES) g.stacks.resize((size_t)n * STACK_BYTES);
    const int warps = n / 32;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                g.block_idx = Dim3{bx, by, bz};
                g.warp_bars.assign(warps, Barrier());
                g.warp_exited.assign(warps, 0);
                g.exchange.assign((size_t)warps * 64, 0);
                g.block_bar = Barrier();
                g.exited = 0;
                for (int i = 0; i < n; ++i) {
                    Thread& t = g.threads[i];
                    t = Thread();
                    t.linear = i;
                    t.idx = Dim3{(unsigned)(i % block.x), (unsigned)((i / block.x) % block.y),
                                 (unsigned)(i / (block.x * block.y))};
                    getcontext(&t.uc);
                    t.uc.uc_stack.ss_sp = &g.stacks[(size_t)i * STACK_BYTES];
                    t.uc.uc_stack.ss_size = STACK_BYTES;
                    t.uc.uc_link = nullptr;
                    makecontext(&t.uc, trampoline, 0);
                }
                int live = n;
                while (live > 0) {
                    const unsigned long before = g.progress;
                    for (int i = 0; i < n; ++i) {
                        Thread& t = g.threads[i];
                        if (t.state == Run::Done) continue;
                        g.cur = &t;
                        const int how = _setjmp(g.sched);
                        if (how == 0) {
                            if (!t.started) {
                                t.started = true;
                                setcontext(&t.uc);
                            }
                            _longjmp(t.ctx, 1);
                        }
                        if (how == 2) return g.error;
                        if (t.state == Run::Done) --live;
                    }
                    if (live > 0 && g.progress == before) {
                        char msg[96];
                        snprintf(msg, sizeof msg, "deadlock in block %u,%u,%u: threads wait at barriers", bx, by, bz);
                        return msg;
                    }
                }
            }
    return "";
}

using Entry = std::function<void(void**)>;
inline std::map<std::string, Entry>& registry() {
    static std::map<std::string, Entry> kernels;
    return kernels;
}

template <typename... A, size_t... I>
void call_with(void (*fn)(A...), void** args, std::index_sequence<I...>) {
    fn(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}

template <typename... A>
int register_kernel(const char* name, void (*fn)(A...)) {
    registry()[name] = [fn](void** args) { call_with(fn, args, std::index_sequence_for<A...>{}); };
    return 0;
}

}  // namespace emu

#define threadIdx (::emu::g.cur->idx)
#define blockIdx (::emu::g.block_idx)
#define blockDim (::emu::g.block)
#define gridDim (::emu::g.grid)

inline void __syncthreads() { emu::block_barrier(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_barrier(); }
template <typename T> T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32) {
    return emu::exchange(mask, v, emu::xor_lane, m, width);
}
template <typename T> T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return emu::exchange(mask, v, emu::idx_lane, src, width);
}
inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
inline float __uint_as_float(unsigned x) { float f; memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float f) { int x; memcpy(&x, &f, 4); return x; }
inline unsigned __float_as_uint(float f) { unsigned x; memcpy(&x, &f, 4); return x; }

// Entry point for ctypes: args follow CUDA's kernelParams convention (pointers to each argument).
extern "C" int pkv_emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                              unsigned bz, void** args, char* err, int err_len) {
    auto found = emu::registry().find(name);
    std::string error;
    if (found == emu::registry().end()) {
        error = std::string("kernel not compiled into the emulator: ") + name;
    } else {
        const emu::Entry& entry = found->second;
        const std::function<void()> body = [&entry, args]() { entry(args); };
        error = emu::launch(emu::Dim3{gx, gy, gz}, emu::Dim3{bx, by, bz}, body);
    }
    if (error.empty()) return 0;
    snprintf(err, (size_t)err_len, "%s", error.c_str());
    return 1;
}
