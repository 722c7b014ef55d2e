"""The block pool: ids, ref counts, an O(1) free queue and the prefix-hash index.

Free queue order (the eviction order of cached blocks): blocks are handed out
from the *head*; a block whose ref count drops to zero is appended at the
*tail*. A freed block that still holds a cached prefix stays findable through
the hash index until it reaches the head and is handed out again (lazy
eviction, as in vLLM's free block queue), so the least recently freed cached
block is the first to lose its contents. A cache hit on a free block takes it
out of the middle of the queue in O(1): the queue is an intrusive doubly
linked list over two int lists, with a sentinel at index ``num_blocks``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence

from ..errors import InvalidBlock, OutOfBlocks
from ..events import AllCleared, BlockRemoved, BlockStored, CacheEvent

__all__ = ["BlockPool"]


class BlockPool:
    """Physical block bookkeeping; never touches K/V bytes."""

    def __init__(self, num_blocks: int, block_size: int, *, max_cached: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_cached = max_cached
        self.clock = clock
        self.ref = [0] * num_blocks
        self.block_hash: list[Hashable | None] = [None] * num_blocks
        self.cached: dict[Hashable, int] = {}
        # free blocks that still hold a cached prefix, least recently freed first
        self.free_cached: dict[int, float] = {}
        sentinel = num_blocks
        self._next = list(range(1, num_blocks + 1)) + [0]
        self._prev = [sentinel] + list(range(num_blocks))
        self._next[sentinel] = 0 if num_blocks else sentinel
        self._prev[sentinel] = num_blocks - 1 if num_blocks else sentinel
        self.num_free = num_blocks
        self.evicted_cached = 0  # cached blocks whose contents were reused for new data
        self.block_ops = 0  # blocks allocated, referenced again, or released: the pool's work
        self.on_event: Callable[[CacheEvent], None] | None = None  # told of every change to the hash index

    # -- the free queue --------------------------------------------------------

    def _unlink(self, block: int) -> None:
        prev, nxt = self._prev[block], self._next[block]
        self._next[prev] = nxt
        self._prev[nxt] = prev
        self._prev[block] = self._next[block] = -1
        self.num_free -= 1

    def _append(self, block: int) -> None:
        sentinel = self.num_blocks
        tail = self._prev[sentinel]
        self._next[tail] = block
        self._prev[block] = tail
        self._next[block] = sentinel
        self._prev[sentinel] = block
        self.num_free += 1

    def free_queue(self) -> Iterator[int]:
        """Free block ids in the order they will be handed out."""
        sentinel = self.num_blocks
        block = self._next[sentinel]
        while block != sentinel:
            yield block
            block = self._next[block]

    def rebuild_free_queue(self, order: Iterable[int]) -> None:
        """Replace the queue with ``order`` (used by defragmentation)."""
        sentinel = self.num_blocks
        self._next[sentinel] = self._prev[sentinel] = sentinel
        self._next[:sentinel] = [-1] * sentinel
        self._prev[:sentinel] = [-1] * sentinel
        self.num_free = 0
        for block in order:
            self._append(block)

    # -- allocation --------------------------------------------------------------

    def allocate(self, count: int) -> list[int]:
        """Take ``count`` blocks from the head of the queue, each with ref count 1."""
        if count > self.num_free:
            raise OutOfBlocks(count, self.num_free)
        self.block_ops += count
        out = []
        sentinel = self.num_blocks
        nxt, ref = self._next, self.ref
        for _ in range(count):
            block = nxt[sentinel]
            self._unlink(block)
            if self.block_hash[block] is not None:
                self._forget_hash(block)
                self.evicted_cached += 1
            ref[block] = 1
            out.append(block)
        return out

    def allocate_one(self) -> int:
        """``allocate(1)[0]`` without the list: the decode step's common case."""
        if not self.num_free:
            raise OutOfBlocks(1, 0)
        self.block_ops += 1
        block = self._next[self.num_blocks]
        self._unlink(block)
        if self.block_hash[block] is not None:
            self._forget_hash(block)
            self.evicted_cached += 1
        self.ref[block] = 1
        return block

    def incref(self, block: int) -> None:
        """Take one more reference; a free block (a cache hit) leaves the queue."""
        if self.ref[block] == 0:
            self._unlink(block)
            self.free_cached.pop(block, None)
        self.ref[block] += 1
        self.block_ops += 1

    def free(self, blocks: Iterable[int]) -> int:
        """Drop one reference of each block, in order; return how many became free."""
        freed = 0
        ref = self.ref
        now = None
        for block in blocks:
            ref[block] -= 1
            self.block_ops += 1
            if ref[block] == 0:
                self._append(block)
                freed += 1
                if self.block_hash[block] is not None:
                    now = self.clock() if now is None else now
                    self.free_cached[block] = now
        if self.max_cached is not None:
            self.trim_cached(self.max_cached)
        return freed

    def must_copy(self, block: int) -> bool:
        """Whether an owner must copy ``block`` before writing into it: others share it, or a prefix hash names
        its contents (a full block a trim cut short, whose other owners have since left)."""
        return self.ref[block] > 1 or self.block_hash[block] is not None

    def release_copied(self, block: int) -> None:
        """Give up the reference of an owner that copied ``block`` to write into the copy (copy-on-write).

        Shared, the others keep it; sole but cached, it returns to the free
        queue still cached, so later prompts with that prefix still hit it.
        """
        if self.ref[block] > 1:
            self.drop_reference(block)
        else:
            self.free((block,))

    def drop_reference(self, block: int) -> None:
        """Give up one of several references (copy-on-write moved an owner away); the block stays in use."""
        if self.ref[block] < 2:
            raise InvalidBlock(block, self.num_blocks, f"has {self.ref[block]} references, not a shared block")
        self.ref[block] -= 1
        self.block_ops += 1

    def relabel(self, mapping: dict[int, int]) -> None:
        """Defragmentation moved each block ``src`` to the free block ``dst``: move its count and hash too.

        The caller copied the data and rebuilds the free queue after
        (:meth:`rebuild_free_queue`); every ``dst`` must be free and unhashed.
        """
        for src, dst in mapping.items():
            if self.ref[dst] or self.block_hash[dst] is not None:
                raise InvalidBlock(dst, self.num_blocks, "a relabel target must be free and unhashed")
            self.ref[dst], self.ref[src] = self.ref[src], 0
            block_hash = self.block_hash[src]
            self.block_hash[dst], self.block_hash[src] = block_hash, None
            if block_hash is not None:
                self.cached[block_hash] = dst
        self.free_cached = {mapping.get(b, b): t for b, t in self.free_cached.items()}

    def check_invariants(self) -> list[str]:
        """What is wrong with the free queue, the counts and the hash index (empty when all is well).

        Ownership (ref counts against the owners) is the manager's check;
        this one covers what only the pool can see.
        """
        problems: list[str] = []
        sentinel = self.num_blocks
        queue: list[int] = []
        seen: set[int] = set()
        block = self._next[sentinel]
        while block != sentinel and len(queue) <= self.num_blocks:
            if block in seen or not 0 <= block < self.num_blocks:
                problems.append(f"free queue is corrupt at block {block}")
                break
            seen.add(block)
            queue.append(block)
            block = self._next[block]
        expected_free = {b for b in range(self.num_blocks) if self.ref[b] == 0}
        if seen != expected_free:
            leaked = sorted(expected_free - seen)[:5]
            double = sorted(seen - expected_free)[:5]
            problems.append(f"free queue mismatch: leaked {leaked}, in use but queued {double}")
        if len(queue) != self.num_free:
            problems.append(f"free count {self.num_free} but {len(queue)} blocks queued")
        for block_hash, block in self.cached.items():
            if self.block_hash[block] != block_hash:
                problems.append(f"hash index points to block {block} which holds another hash")
        hashed = sum(h is not None for h in self.block_hash)
        if hashed != len(self.cached):
            problems.append(f"{hashed} hashed blocks but {len(self.cached)} index entries")
        free_cached = {b for b in expected_free if self.block_hash[b] is not None}
        if set(self.free_cached) != free_cached:
            problems.append("free cached-block list does not match the free hashed blocks")
        return problems

    def check_id(self, block: int) -> None:
        if not 0 <= block < self.num_blocks:
            raise InvalidBlock(block, self.num_blocks)

    # -- the prefix-hash index -----------------------------------------------------

    def lookup(self, block_hash: Hashable) -> int | None:
        return self.cached.get(block_hash)

    def register(self, block: int, block_hash: Hashable, parent_hash: Hashable | None = None) -> bool:
        """Make ``block`` findable by ``block_hash``; False if the hash is already known or the cache is full."""
        if block_hash in self.cached or self.block_hash[block] is not None:
            return False
        if self.max_cached is not None and len(self.cached) >= self.max_cached:
            self.trim_cached(self.max_cached - 1)
            if len(self.cached) >= self.max_cached:
                return False
        self.cached[block_hash] = block
        self.block_hash[block] = block_hash
        if self.on_event is not None:
            self.on_event(BlockStored(block_hash, parent_hash, self.block_size))
        return True

    def register_chain(self, blocks: Sequence[int], hashes: Sequence[Hashable], start: int = 0) -> None:
        """Register ``blocks[i]`` under ``hashes[i]`` for ``i >= start``, each naming its predecessor as parent."""
        for i in range(start, min(len(blocks), len(hashes))):
            self.register(blocks[i], hashes[i], hashes[i - 1] if i else None)

    def unregister(self, block: int) -> None:
        if self.block_hash[block] is not None:
            self._forget_hash(block)

    def _forget_hash(self, block: int) -> None:
        block_hash = self.block_hash[block]
        del self.cached[block_hash]
        self.block_hash[block] = None
        self.free_cached.pop(block, None)
        if self.on_event is not None:
            self.on_event(BlockRemoved(block_hash))

    def clear_cache(self) -> int:
        """Forget every hash, in use or free (the blocks stay with their owners); one ``AllCleared`` event."""
        count = len(self.cached)
        for block in self.cached.values():
            self.block_hash[block] = None
        self.cached.clear()
        self.free_cached.clear()
        if self.on_event is not None:
            self.on_event(AllCleared())
        return count

    def trim_cached(self, limit: int) -> int:
        """Forget free cached blocks, least recently freed first, until at most ``limit`` hashes remain."""
        dropped = 0
        while len(self.cached) > limit and self.free_cached:
            block = next(iter(self.free_cached))
            self._forget_hash(block)
            dropped += 1
        return dropped

    def expire_cached(self, ttl: float) -> int:
        """Forget free cached blocks freed more than ``ttl`` seconds ago."""
        deadline = self.clock() - ttl
        dropped = 0
        while self.free_cached:
            block, freed_at = next(iter(self.free_cached.items()))
            if freed_at > deadline:
                break
            self._forget_hash(block)
            dropped += 1
        return dropped

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def utilization(self) -> float:
        return self.num_used / self.num_blocks
