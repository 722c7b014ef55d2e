"""Paged decode through the compiled CPU kernel (``pagedkv_torch._cpu_decode``, built from ``csrc/``).

Why a compiled kernel: decode is bound by reading K/V once, and a bfloat16
pool reads half the bytes of a float32 one, but torch and NumPy on the CPU
can only multiply after widening the blocks into a float32 copy, and writing
that copy costs what the halved read saves (measured in
docs/benchmarks-torch.md). The C kernel widens each row in registers right
before it is used, streams every K/V row once for all query heads of its
group, and keeps an online softmax per query head (flash-decoding style), so
narrow pools decode faster than wide ones. Chunked-local attention and a
sliding window only move where a sequence's walk starts (blocks before it
are never read); sinks start each head's online softmax from its sink.

The extension is optional (a source install without a C compiler skips it);
``native_unavailable_reason()`` says why it is missing, and the ``auto``
kernel then falls back to the torch-op decode.

Bounds: a plan may come from a hand-made ``BatchIndex`` (``plan_index``), so
the C kernel checks, before reading any K/V, that every sequence's length is
in ``[1, max_blocks * block_size]`` and every block id its length reaches is
in ``[0, num_blocks)``; on a bad one it reads nothing and reports it, and
``run`` raises ``InvalidBlock`` (with the id and its table position),
``OutOfBounds`` or ``InvalidArgument``. Python checks only what the C side
cannot: the shapes of the buffers whose addresses it hands over (the index
through ``check_index_shapes``, the query through ``TorchPlanBase.check``).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from pagedkv_core.contract.attention import AttentionParams, BatchIndex
from pagedkv_core.errors import InvalidArgument, InvalidBlock, OutOfBounds, PagedKvError

from .plan_base import TorchPlanBase
from .storage import TorchStorage

try:
    from . import _cpu_decode
except ImportError as exc:  # built without a C compiler, or from a tree that was never built
    _cpu_decode = None
    _MISSING = (f"the compiled CPU decode kernel is missing ({exc}); reinstall pagedkv-torch from source "
                "with a C compiler (GCC or Clang) present")
else:
    _MISSING = None

__all__ = ["NativeDecodePlan", "native_unavailable_reason", "native_variant", "NATIVE_DTYPES"]

NATIVE_DTYPES: dict[torch.dtype, int] = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3}
"""Pool dtypes the kernel reads, and their codes in ``cpu_decode.c``."""
ITEMS_PER_TASK = 4
"""(sequence, KV head) items per thread task when decoding on several threads."""


def native_unavailable_reason(storage: TorchStorage | None = None) -> str | None:
    """``None`` when the native kernel can decode over ``storage`` (or is built at all), else why not."""
    if _MISSING is not None:
        return _MISSING
    if storage is None:
        return None
    if storage.torch_device.type != "cpu":
        return f"the native kernel runs on CPU pools, not {storage.torch_device}"
    if storage.dtype not in NATIVE_DTYPES:
        return f"the native kernel reads float32, bfloat16, float16 and int8 pools, not {storage.config.dtype}"
    return None


def native_variant() -> str | None:
    """The instruction-set variant the kernel runs (``avx512``, ``avx2`` or ``generic``), ``None`` if not built."""
    return None if _cpu_decode is None else _cpu_decode.VARIANT


class NativeDecodePlan(TorchPlanBase):
    """One decode step over a CPU pool: the block tables are laid out for C once; ``run`` per layer.

    ``index`` may be hand-made: its ids and lengths are checked by the C
    kernel on every ``run`` (before it reads anything), its shapes here.
    ``variant`` forces an instruction-set variant (tests compare them);
    ``"auto"`` takes the best the CPU supports. ``run`` gives the output;
    ``state`` gives it in float32 with each query head's log-sum-exp (what a
    cascade merges levels by).
    """

    KERNEL_CHECKS_BOUNDS = True

    def __init__(self, storage: TorchStorage, index: BatchIndex, params: AttentionParams,
                 variant: str = "auto") -> None:
        super().__init__(storage, index, params)
        if (self.index.query_lens != 1).any():
            raise InvalidArgument("the native kernel decodes: one query per sequence "
                                  "(query_start_loc = arange(batch + 1))")
        # the checked index holds read-only, C-contiguous int64 copies that the plan owns: C reads them in place
        self.tables, self.seq_lens = self.index.block_tables, self.index.seq_lens
        self.variant = variant

    @torch.no_grad()
    def run(self, q, layer: int, *, sinks: Any = None) -> torch.Tensor:
        """``q [batch, num_q_heads, head_dim]`` -> attention output of the same shape and dtype.

        ``sinks``: optional ``[num_q_heads]`` float sink logits of this layer
        (host NumPy or a CPU tensor), checked here: C trusts their length.
        """
        out, _, dtype = self._decode(q, layer, sinks, want_lse=False)
        return out if dtype == torch.float32 else out.to(dtype)

    @torch.no_grad()
    def state(self, q, layer: int, *, sinks: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out, lse)``: the float32 output ``[batch, num_q_heads, head_dim]`` (not rounded to q's dtype)
        and each query head's log-sum-exp of its scaled (and soft-capped) scores ``[batch, num_q_heads]``.

        Why: a cascade decodes a shared prefix and each member's own blocks
        separately and merges the two normalised outputs by their
        log-sum-exps (``o = (e^(lse_a) o_a + e^(lse_b) o_b) / (e^(lse_a) +
        e^(lse_b))``), so its own level runs here instead of on torch ops.
        A sink, when given, is part of ``lse``.
        """
        out, lse, _ = self._decode(q, layer, sinks, want_lse=True)
        return out, lse

    def _decode(self, q, layer: int, sinks: Any, want_lse: bool) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
        """The checked call into C: float32 output, the log-sum-exps (empty unless wanted), q's dtype."""
        q, layer, num_q_heads = self.check(q, layer)
        sink = self.sinks(sinks, num_q_heads)  # float32, contiguous, [num_kv_heads * group]: what C reads
        qf = q.float().contiguous()
        out = torch.empty(qf.shape, dtype=torch.float32)
        lse = torch.empty(qf.shape[:2] if want_lse else (0,), dtype=torch.float32)
        k, v = self.storage.pools(layer)
        scales = self.storage.scales(layer)
        ks, vs = (0, 0) if scales is None else (scales[0].data_ptr(), scales[1].data_ptr())
        p = self.params
        num_blocks = self.storage.config.num_blocks
        args = (qf.data_ptr(), out.data_ptr(), k.data_ptr(), v.data_ptr(), ks, vs, self.tables.ctypes.data,
                self.seq_lens.ctypes.data, self.index.batch, self.tables.shape[1], num_blocks, self.num_kv_heads,
                num_q_heads // self.num_kv_heads, self.head_dim, self.block_size, p.sliding_window or 0,
                k.element_size())
        extra = {"chunk": p.chunk_size or 0, "sinks": 0 if sink is None else sink.data_ptr()}
        if want_lse:
            extra["lse"] = lse.data_ptr()
        found = _run(args, (NATIVE_DTYPES[k.dtype], p.scale, p.soft_cap or 0.0), self.index.batch,
                     self.num_kv_heads, self.variant, extra)
        if found is not None:
            raise _bounds_error(found, num_blocks, self.tables.shape[1] * self.block_size)
        return out, lse, q.dtype


def _bounds_error(found: tuple[int, int, int, int], num_blocks: int, capacity: int) -> PagedKvError:
    """The typed error for what the C kernel reported: ``(kind, row, col, value)``."""
    kind, row, col, value = found
    if kind == _cpu_decode.BOUNDS_BAD_BLOCK:
        return InvalidBlock(value, num_blocks, f"block_tables[{row}, {col}]")
    if kind == _cpu_decode.BOUNDS_PAST_TABLE:
        return OutOfBounds(value - 1, capacity)
    return InvalidArgument(f"decode needs seq_lens >= 1 (the current token is in the cache), "
                           f"got seq_lens[{row}] = {value}")


_pool: ThreadPoolExecutor | None = None
_pool_threads = 0
_pool_lock = threading.Lock()


def _run(args: tuple, numbers: tuple, batch: int, kv_heads: int, variant: str,
         extra: dict) -> tuple[int, int, int, int] | None:
    """Decode the batch on ``torch.get_num_threads()`` threads (the kernel releases the GIL).

    ``extra``: the kernel's keyword arguments (``chunk``, ``sinks``).

    An item walks one sequence's blocks once for a slice of its KV heads, so
    each block is read front to back; on one thread a slice is every head. With
    more threads and few sequences the heads are split until there are about
    two items per thread. Returns ``None``, or the kernel's report of the first
    (lowest sequence) out-of-range length or block id; every task is waited
    for before anything is returned or raised, since they all write ``out``.
    """
    if batch == 0:
        return None
    threads = torch.get_num_threads()
    slices = 1 if threads <= 1 else min(kv_heads, -(-2 * threads // batch))
    per = -(-kv_heads // slices)
    items = batch * -(-kv_heads // per)
    if threads <= 1 or items == 1:
        return _cpu_decode.decode(*args, per, *numbers, 0, items, variant, **extra)
    step = max(1, min(ITEMS_PER_TASK, items // threads))
    pool = _executor(threads)
    tasks = [pool.submit(_cpu_decode.decode, *args, per, *numbers, i, min(i + step, items), variant, **extra)
             for i in range(0, items, step)]
    errors = [task.exception() for task in tasks]  # wait for every task: they all write into `out`
    for error in errors:
        if error is not None:
            raise error
    found = [report for report in (task.result() for task in tasks) if report is not None]
    return min(found, key=lambda report: (report[1], report[2])) if found else None


def _executor(threads: int) -> ThreadPoolExecutor:
    """One pool for the process, rebuilt when ``torch.set_num_threads`` changed the count."""
    global _pool, _pool_threads
    with _pool_lock:
        if _pool is None or _pool_threads != threads:
            if _pool is not None:
                _pool.shutdown(wait=False)  # tasks already queued on it still run
            _pool, _pool_threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pagedkv-decode"), threads
        return _pool
