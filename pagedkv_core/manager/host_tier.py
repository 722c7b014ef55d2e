"""The host tier: swap out / in, int8 compression, and moving sequences between managers.

Part of :class:`~pagedkv_core.manager.facade.PagedKvCacheManager`, split out to keep
modules small; it relies on the manager's lock, pool and tables."""

from __future__ import annotations

import time

from ..dtypes import itemsize
from ..errors import (
    InvalidArgument,
    OutOfBlocks,
    OutOfHostBlocks,
    SequenceExists,
    SequenceNotResident,
    UnsupportedOperation,
)
from ..stats import CompressionStats
from .records import PagedKvCacheHandle, SeqState, Sequence

RUNNING, SWAPPED = SeqState.RUNNING, SeqState.SWAPPED


class HostTierMixin:
    """Copies sequences' blocks to host memory and back, exactly or compressed."""

    def swap_out(self, request_id: str, *, quantize: str | None = None) -> None:
        """Copy a sequence's blocks to the host tier and free them on the device (preemption)."""
        with self._mutating():
            seq = self._running(request_id)
            count = len(seq.blocks)
            if count > self.host_capacity - self.host_used:
                raise OutOfHostBlocks(count, self.host_capacity - self.host_used)
            host = self.storage.swap_out(seq.blocks, quantize=quantize)
            self.pool.free(reversed(seq.blocks))
            seq.blocks = []
            self.tables.set_row(seq.row, [], seq.num_tokens)
            seq.state, seq.host, seq.host_blocks = SWAPPED, host, count
            seq.host_lossy = quantize is not None and not self.config.quantized
            self.host_used += count
            self.counters["swap_out_count"] += 1

    def swap_in(self, request_id: str) -> None:
        """Bring a swapped sequence back into fresh device blocks."""
        with self._mutating():
            seq = self._sequence(request_id)
            if seq.state is not SWAPPED:
                raise SequenceNotResident(request_id, seq.state.value)
            if seq.host_blocks > self.pool.num_free:
                raise OutOfBlocks(seq.host_blocks, self.pool.num_free)
            blocks = self._blocks_from_host(seq.host)
            seq.blocks = blocks
            if seq.host_lossy:  # dequantized values differ from what the hashes describe
                seq.root, seq.token_ids, seq.hashes = None, None, []
            self.pool.register_chain(blocks, seq.hashes)
            self.tables.set_row(seq.row, blocks, seq.num_tokens)
            self.host_used -= seq.host_blocks
            seq.state, seq.host, seq.host_blocks, seq.host_lossy = RUNNING, None, 0, False
            self.counters["swap_in_count"] += 1

    def _blocks_from_host(self, host) -> list[int]:
        """Fresh device blocks filled from ``host`` (the caller checked there is room); none taken on failure.

        Host blocks of another backend travel in their portable NumPy form.
        """
        if type(host).__module__.split(".")[0] != type(self.storage).__module__.split(".")[0]:
            host = host.to_numpy()
        blocks = self.pool.allocate(host.num_blocks)
        try:
            host.wait()
            if blocks:
                self.storage.swap_in(host, blocks)
        except BaseException:
            self.pool.free(reversed(blocks))
            raise
        return blocks

    def export_sequence(self, request_id: str) -> tuple[Sequence, object]:
        """Copy a running sequence's blocks to host memory and remove it from this manager.

        Returns its record and host blocks for :meth:`import_sequence` of
        another manager (``MultiDeviceManager.move_cache``).
        """
        with self._mutating():
            seq = self._running(request_id)
            host = self.storage.swap_out(seq.blocks)
            self._release(seq)
            return seq, host

    def can_import(self, num_blocks: int) -> bool:
        return num_blocks <= self.pool.num_free

    def import_sequence(self, record: Sequence, host) -> PagedKvCacheHandle:
        """Admit a sequence exported by another manager, with its data and prefix hashes."""
        with self._mutating():
            if record.request_id in self._seqs:
                raise SequenceExists(record.request_id)
            if host.num_blocks > self.pool.num_free:
                raise OutOfBlocks(host.num_blocks, self.pool.num_free)
            blocks = self._blocks_from_host(host)
            self.pool.register_chain(blocks, record.hashes)
            row = self.tables.acquire()
            self.tables.set_row(row, blocks, record.num_tokens)
            self._seqs[record.request_id] = Sequence(
                record.request_id, row, blocks, record.num_tokens, record.priority, next(self._arrivals),
                self.clock(), record.root, token_ids=record.token_ids, hashes=list(record.hashes),
                cached_tokens=record.cached_tokens, dropped_tokens=record.dropped_tokens,
            )
            return PagedKvCacheHandle(self, record.request_id)

    def compress_cache(self, request_id: str, compression_ratio: float | None = None) -> None:
        """Move a sequence to the host tier as int8 with per-(block, head) scales; ``swap_in`` restores it.

        ``compression_ratio`` (host bytes / device bytes) is the most the caller
        accepts; ``UnsupportedOperation`` if int8 cannot reach it.
        """
        with self._mutating():
            if self.config.quantized:
                raise UnsupportedOperation(f"the pool already stores {self.config.dtype}")
            seq = self._running(request_id)
            c = self.config
            per_block = c.block_size * c.num_kv_heads * c.head_dim
            ratio = (per_block + c.num_kv_heads * 4) / (per_block * itemsize(c.dtype))
            if compression_ratio is not None and not 0 < compression_ratio <= 1:
                raise InvalidArgument(f"compression_ratio must be in (0, 1], got {compression_ratio}")
            if compression_ratio is not None and ratio > compression_ratio:
                raise UnsupportedOperation(f"int8 reaches a ratio of {ratio:.3f}, above the {compression_ratio} asked")
            device_bytes = len(seq.blocks) * c.bytes_per_block
            start = time.perf_counter()
            self.swap_out(request_id, quantize="int8")
            self._compressions.append((device_bytes, seq.host.nbytes, time.perf_counter() - start))

    def compression_stats(self) -> CompressionStats:
        with self._lock:
            done = self._compressions
            current = sum(1 for s in self._seqs.values() if s.host_lossy)
            if not done:
                return CompressionStats(current, 0, 1.0, 0.0)
            return CompressionStats(
                current,
                sum(d - h for d, h, _ in done),
                sum(h / d for d, h, _ in done) / len(done),
                1000 * sum(t for _, _, t in done) / len(done),
            )

