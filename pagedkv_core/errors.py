"""Typed errors of pagedkv.

Every error is raised *before* any state changes, so a caller that catches
one can carry on with the cache exactly as it was. Errors carry the numbers a
caller needs to react (how many blocks were missing, which position was out of
range) as attributes, not only in the message.
"""

from __future__ import annotations

__all__ = [
    "PagedKvError",
    "OutOfBlocks",
    "OutOfHostBlocks",
    "InsufficientMemory",
    "UnknownSequence",
    "StaleHandle",
    "SequenceExists",
    "SequenceNotResident",
    "InvalidBlock",
    "OutOfBounds",
    "CorruptBlockTable",
    "InvariantViolation",
    "BackendUnavailable",
    "UnknownBackend",
    "UnsupportedOperation",
    "InvalidArgument",
    "NonFiniteValue",
    "ShapeMismatch",
    "DTypeMismatch",
    "DeviceMismatch",
    "CorruptCacheFile",
    "IncompatibleCache",
    "RanksDiverged",
    "CorruptRemoteBlock",
    "RemoteTierError",
    "UntrustedCacheFile",
]


class PagedKvError(Exception):
    """Base class of every error pagedkv raises on purpose."""


class InvalidArgument(PagedKvError, ValueError):
    """An argument is outside what the operation accepts."""


class NonFiniteValue(InvalidArgument):
    """A quantized pool was given inf or NaN; nothing was written.

    An int8 block shares one scale per KV head across its tokens: one
    infinite value would make that scale infinite and every earlier token of
    the block NaN. So every backend refuses the whole write instead.
    """

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        super().__init__(f"k or v holds inf or NaN, which a {dtype} pool cannot store (its per-block scale would "
                         "wipe the block's other tokens); nothing was written")


class OutOfBlocks(PagedKvError):
    """The device pool has fewer free blocks than an operation needs."""

    def __init__(self, needed: int, available: int, what: str = "device blocks") -> None:
        self.needed = needed
        self.available = available
        super().__init__(f"out of {what}: needed {needed}, available {available}")


class OutOfHostBlocks(OutOfBlocks):
    """The host (swap) tier has fewer free blocks than a swap-out needs."""

    def __init__(self, needed: int, available: int) -> None:
        super().__init__(needed, available, what="host blocks")


class InsufficientMemory(PagedKvError, MemoryError):
    """An allocation was refused before it was made: its bytes exceed what the device has (or the cap allows)."""

    def __init__(self, what: str, needed: int, available: int, device: str, why: str = "free") -> None:
        from .memory import format_bytes

        self.what = what
        self.needed = needed
        self.available = available
        self.device = device
        super().__init__(f"{what} need {format_bytes(needed)} ({needed:,} bytes) on {device}, but only "
                         f"{format_bytes(available)} ({available:,} bytes) is {why}; use fewer or smaller blocks")


class UnknownSequence(PagedKvError, KeyError):
    """No sequence is registered under this request id."""

    def __init__(self, request_id: object) -> None:
        self.request_id = request_id
        super().__init__(f"unknown sequence {request_id!r}")

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class StaleHandle(UnknownSequence):
    """A handle outlived its sequence: it was deallocated (and the id perhaps admitted again)."""

    def __init__(self, request_id: object) -> None:
        super().__init__(request_id)
        self.args = (f"stale handle: sequence {request_id!r} it was made for is gone (deallocated or replaced)",)


class SequenceExists(PagedKvError):
    """A sequence with this request id is already registered."""

    def __init__(self, request_id: object) -> None:
        self.request_id = request_id
        super().__init__(f"sequence {request_id!r} already exists")


class SequenceNotResident(PagedKvError):
    """The operation needs the sequence on the device, but it is swapped out (or the reverse)."""

    def __init__(self, request_id: object, state: str) -> None:
        self.request_id = request_id
        self.state = state
        super().__init__(f"sequence {request_id!r} is {state}")


class InvalidBlock(PagedKvError, IndexError):
    """A block id is outside the pool or not in the state the operation needs."""

    def __init__(self, block_id: int, num_blocks: int, detail: str = "") -> None:
        self.block_id = block_id
        self.num_blocks = num_blocks
        msg = f"invalid block id {block_id} for a pool of {num_blocks} blocks"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class OutOfBounds(PagedKvError, IndexError):
    """A token position is beyond what a sequence has allocated."""

    def __init__(self, position: int, allocated: int) -> None:
        self.position = position
        self.allocated = allocated
        super().__init__(f"position {position} out of bounds: {allocated} tokens allocated")


class CorruptBlockTable(PagedKvError):
    """A block table refers to blocks inconsistently (found by validation)."""


class InvariantViolation(PagedKvError):
    """``check_invariants`` found leaked, double-owned or miscounted blocks."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class BackendUnavailable(PagedKvError):
    """A backend or device cannot be used here; ``reason`` says why."""

    def __init__(self, backend: str, reason: str) -> None:
        self.backend = backend
        self.reason = reason
        super().__init__(f"backend {backend!r} unavailable: {reason}")


class UnknownBackend(PagedKvError, KeyError):
    """No backend is registered under this name.

    ``suggestion`` is the closest known name (a typo's likely meaning), and
    ``install_hint`` how to install the built-in backend meant, when it is
    not installed; neither is ever made up from the unknown name.
    """

    def __init__(self, name: str, known: list[str], *, suggestion: str | None = None,
                 install_hint: str = "") -> None:
        self.name = name
        self.known = known
        self.suggestion = suggestion
        self.install_hint = install_hint
        listing = ", ".join(sorted(known)) or "none installed"
        message = f"unknown backend {name!r}; known: {listing}"
        if suggestion is not None and suggestion != name:
            message += f"; did you mean {suggestion!r}?"
        if install_hint:
            message += f" ({suggestion or name!r} is not installed: {install_hint})"
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class UnsupportedOperation(PagedKvError):
    """The backend, device or configuration cannot do this operation."""


class ShapeMismatch(InvalidArgument):
    """An array's shape does not match what the operation documents."""


class DTypeMismatch(InvalidArgument, TypeError):
    """An array's dtype does not match what the operation documents."""


class DeviceMismatch(InvalidArgument):
    """An array lives on another device than the storage it is used with."""


class CorruptCacheFile(PagedKvError):
    """A saved cache is truncated, damaged or of an unknown format version; nothing was loaded."""


class IncompatibleCache(PagedKvError):
    """A saved cache does not fit this manager (shape, dtype, block size or hash scheme differ)."""


class RanksDiverged(PagedKvError):
    """Tensor-parallel ranks hold different cache bookkeeping; their block tables would address different data."""

    def __init__(self, digests: list[str]) -> None:
        self.digests = digests
        super().__init__(f"manager state differs across ranks: {', '.join(d[:12] for d in digests)}")


class CorruptRemoteBlock(PagedKvError):
    """A value read from the remote tier is not a valid block for this layout; it is treated as a miss."""


class RemoteTierError(PagedKvError):
    """The remote tier's server could not be reached or answered with an error; callers count it as a miss."""


class UntrustedCacheFile(CorruptCacheFile):
    """An ``hmac_key`` was given and the cache file is unsigned or signed with another key; nothing was loaded.

    The SHA-256 checksum only detects damage (anyone can recompute it); the
    HMAC is what tells a file this deployment wrote from a foreign one.
    """
