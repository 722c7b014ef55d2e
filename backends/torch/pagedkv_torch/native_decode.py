"""Paged decode through the compiled CPU kernel (``pagedkv_torch._cpu_decode``, built from ``csrc/``).

Why a compiled kernel: decode is bound by reading K/V once, and a bfloat16
pool reads half the bytes of a float32 one, but torch and NumPy on the CPU
can only multiply after widening the blocks into a float32 copy, and writing
that copy costs what the halved read saves (measured in
docs/benchmarks-torch.md). The C kernel widens each row in registers right
before it is used, streams every K/V row once for all query heads of its
group, and keeps an online softmax per query head (flash-decoding style), so
narrow pools decode faster than wide ones.

The extension is optional (a source install without a C compiler skips it);
``native_unavailable_reason()`` says why it is missing, and the ``auto``
kernel then falls back to the torch-op decode. This module validates nothing
itself: plans are built from a batch ``check_batch`` validated, and ``run``
checks the query through ``TorchPlanBase.check`` before any address is handed
to C.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from pagedkv_core.attention import AttentionParams, BatchIndex

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

    ``variant`` forces an instruction-set variant (tests compare them); ``"auto"``
    takes the best the CPU supports.
    """

    def __init__(self, storage: TorchStorage, index: BatchIndex, params: AttentionParams,
                 variant: str = "auto") -> None:
        super().__init__(storage, index, params)
        self.tables = torch.from_numpy(np.ascontiguousarray(index.block_tables, dtype=np.int32))
        self.seq_lens = torch.from_numpy(np.ascontiguousarray(index.seq_lens, dtype=np.int32))
        self.variant = variant

    @torch.no_grad()
    def run(self, q, layer: int) -> torch.Tensor:
        """``q [batch, num_q_heads, head_dim]`` -> attention output of the same shape and dtype."""
        q, layer, num_q_heads = self.check(q, layer)
        qf = q.float().contiguous()
        out = torch.empty(qf.shape, dtype=torch.float32)
        k, v = self.storage.pools(layer)
        scales = self.storage.scales(layer)
        ks, vs = (0, 0) if scales is None else (scales[0].data_ptr(), scales[1].data_ptr())
        p = self.params
        args = (qf.data_ptr(), out.data_ptr(), k.data_ptr(), v.data_ptr(), ks, vs, self.tables.data_ptr(),
                self.seq_lens.data_ptr(), self.tables.shape[1], self.num_kv_heads, num_q_heads // self.num_kv_heads,
                self.head_dim, self.block_size, p.sliding_window or 0, k.element_size())
        _run(args, (NATIVE_DTYPES[k.dtype], p.scale, p.soft_cap or 0.0), self.index.batch, self.num_kv_heads,
             self.variant)
        return out if q.dtype == torch.float32 else out.to(q.dtype)


_pool: ThreadPoolExecutor | None = None
_pool_threads = 0
_pool_lock = threading.Lock()


def _run(args: tuple, numbers: tuple, batch: int, kv_heads: int, variant: str) -> None:
    """Decode the batch on ``torch.get_num_threads()`` threads (the kernel releases the GIL).

    An item walks one sequence's blocks once for a slice of its KV heads, so
    each block is read front to back; on one thread a slice is every head. With
    more threads and few sequences the heads are split until there are about
    two items per thread.
    """
    threads = torch.get_num_threads()
    slices = 1 if threads <= 1 else min(kv_heads, -(-2 * threads // batch))
    per = -(-kv_heads // slices)
    items = batch * -(-kv_heads // per)
    if threads <= 1 or items == 1:
        _cpu_decode.decode(*args, per, *numbers, 0, items, variant)
        return
    step = max(1, min(ITEMS_PER_TASK, items // threads))
    pool = _executor(threads)
    tasks = [pool.submit(_cpu_decode.decode, *args, per, *numbers, i, min(i + step, items), variant)
             for i in range(0, items, step)]
    errors = [task.exception() for task in tasks]  # wait for every task: they all write into `out`
    for error in errors:
        if error is not None:
            raise error


def _executor(threads: int) -> ThreadPoolExecutor:
    """One pool for the process, rebuilt when ``torch.set_num_threads`` changed the count."""
    global _pool, _pool_threads
    with _pool_lock:
        if _pool is None or _pool_threads != threads:
            if _pool is not None:
                _pool.shutdown(wait=False)  # tasks already queued on it still run
            _pool, _pool_threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pagedkv-decode"), threads
        return _pool
