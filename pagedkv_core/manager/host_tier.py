"""The host tier: swap out / in, int8 compression, and moving sequences between managers.

It owns the tier's accounting (capacity, blocks held, compression history);
the blocks themselves are the storage's ``HostBlocks``, kept on the record.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from ..blocks.pool import BlockPool
from ..config import CacheConfig
from ..contract.storage import BlockStorage, HostBlocks
from ..dtypes import itemsize
from ..errors import InvalidArgument, OutOfBlocks, OutOfHostBlocks, SequenceNotResident, UnsupportedOperation
from ..stats import CompressionStats
from .records import SeqState, Sequence
from .sequences import SequenceTable

__all__ = ["HostTier"]

RUNNING, SWAPPED = SeqState.RUNNING, SeqState.SWAPPED


class HostTier:
    """Copies sequences' blocks to host memory and back, exactly or compressed."""

    def __init__(self, config: CacheConfig, storage: BlockStorage, pool: BlockPool, sequences: SequenceTable,
                 counters: Counter[str], clock: Callable[[], float]) -> None:
        self.config = config
        self.storage = storage
        self.pool = pool
        self.sequences = sequences
        self.counters = counters
        self.clock = clock
        self.capacity = config.num_host_blocks
        self.used = 0
        self._compressions: list[tuple[int, int, float]] = []  # (device bytes, host bytes, seconds)

    @property
    def room(self) -> int:
        return self.capacity - self.used

    def swap_out(self, seq: Sequence, *, quantize: str | None = None) -> None:
        """Copy a running sequence's blocks to the host tier and free them on the device (preemption)."""
        count = len(seq.blocks)
        if count > self.room:
            raise OutOfHostBlocks(count, self.room)
        host = self.storage.swap_out(seq.blocks, quantize=quantize)
        self.pool.free(reversed(seq.blocks))
        self.sequences.set_blocks(seq, [])
        seq.state, seq.host, seq.host_blocks = SWAPPED, host, count
        seq.host_lossy = quantize is not None and not self.config.quantized
        self.used += count
        self.counters["swap_out_count"] += 1

    def swap_in(self, seq: Sequence) -> None:
        """Bring a swapped sequence back into fresh device blocks."""
        if seq.state is not SWAPPED:
            raise SequenceNotResident(seq.request_id, seq.state.value)
        if seq.host_blocks > self.pool.num_free:
            raise OutOfBlocks(seq.host_blocks, self.pool.num_free)
        blocks = self.blocks_from_host(seq.host)
        if seq.host_lossy:  # dequantized values differ from what the hashes describe
            seq.root, seq.token_ids, seq.hashes = None, None, []
        self.pool.register_chain(blocks, seq.hashes)
        self.sequences.set_blocks(seq, blocks)
        self.used -= seq.host_blocks
        seq.state, seq.host, seq.host_blocks, seq.host_lossy = RUNNING, None, 0, False
        self.counters["swap_in_count"] += 1

    def hold(self, blocks: int) -> None:
        """Account for ``blocks`` host blocks a restored sequence brings (the caller checked :attr:`room`)."""
        if blocks > self.room:
            raise OutOfHostBlocks(blocks, self.room)
        self.used += blocks

    def release(self, seq: Sequence) -> None:
        """A swapped sequence is being forgotten: its host blocks go back to the tier."""
        if seq.state is SWAPPED:
            self.used -= seq.host_blocks

    def blocks_from_host(self, host: Any) -> list[int]:
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

    def export(self, seq: Sequence) -> HostBlocks:
        """A host copy of a running sequence's blocks (the caller then forgets the sequence)."""
        return self.storage.swap_out(seq.blocks)

    def compress(self, seq: Sequence, compression_ratio: float | None = None) -> None:
        """Move a sequence to the host tier as int8 with per-(block, head) scales; ``swap_in`` restores it.

        ``compression_ratio`` (host bytes / device bytes) is the most the caller
        accepts; ``UnsupportedOperation`` if int8 cannot reach it.
        """
        c = self.config
        if c.quantized:
            raise UnsupportedOperation(f"the pool already stores {c.dtype}")
        per_block = c.block_size * c.num_kv_heads * c.head_dim
        ratio = (per_block + c.num_kv_heads * 4) / (per_block * itemsize(c.dtype))
        if compression_ratio is not None and not 0 < compression_ratio <= 1:
            raise InvalidArgument(f"compression_ratio must be in (0, 1], got {compression_ratio}")
        if compression_ratio is not None and ratio > compression_ratio:
            raise UnsupportedOperation(f"int8 reaches a ratio of {ratio:.3f}, above the {compression_ratio} asked")
        device_bytes = len(seq.blocks) * c.bytes_per_block
        start = time.perf_counter()
        self.swap_out(seq, quantize="int8")
        self._compressions.append((device_bytes, seq.host.nbytes, time.perf_counter() - start))

    def compression_stats(self) -> CompressionStats:
        done = self._compressions
        current = sum(1 for s in self.sequences if s.host_lossy)
        if not done:
            return CompressionStats(current, 0, 1.0, 0.0)
        return CompressionStats(
            current,
            sum(d - h for d, h, _ in done),
            sum(h / d for d, h, _ in done) / len(done),
            1000 * sum(t for _, _, t in done) / len(done),
        )
