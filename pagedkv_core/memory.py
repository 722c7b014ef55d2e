"""How much memory an allocation may take, checked before it is made.

Array libraries answer an impossible pool with their own errors (NumPy's
``MemoryError``, torch's allocator message) or not at all: NumPy and the
kernel happily hand out untouched pages, and the process is killed later,
when the pages are written. So every pool is sized first, in bytes, and
compared with what its device has free: the host's available memory (the
smaller of ``MemAvailable`` and the cgroup's room, where Linux tells) or the
GPU's free memory, and with ``PAGEDKV_MEMORY_LIMIT`` when set (bytes, or a
number with ``K``/``M``/``G``/``T``, binary), a cap a deployment sets to keep
room for the model and activations.
"""

from __future__ import annotations

import os
import sys

from .config import CacheConfig
from .errors import InsufficientMemory, InvalidArgument

__all__ = ["MEMORY_LIMIT_ENV", "BOOKKEEPING_BYTES_PER_BLOCK", "host_memory_available", "memory_limit",
           "check_memory", "check_pools", "format_bytes"]

MEMORY_LIMIT_ENV = "PAGEDKV_MEMORY_LIMIT"
BOOKKEEPING_BYTES_PER_BLOCK = 128
"""Host bytes the manager keeps per pool block (free-queue links, ref count, hash slot), rounded up."""

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def format_bytes(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} bytes"


def memory_limit() -> int | None:
    """The cap from ``PAGEDKV_MEMORY_LIMIT``, in bytes; None when unset."""
    raw = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if not raw:
        return None
    text = raw.upper().removesuffix("IB").removesuffix("B")
    unit = text[-1] if text and text[-1] in _UNITS else ""
    number = text[:-1] if unit else text
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if not value > 0 or value != value or value == float("inf"):
        raise InvalidArgument(f"{MEMORY_LIMIT_ENV}={raw!r}: expected a positive size such as 8G or 1073741824")
    return int(value * _UNITS[unit])


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_room() -> int | None:
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and usage is not None and limit < 1 << 60:  # "max" or a huge v1 sentinel: no limit
            return max(0, limit - usage)
    return None


def host_memory_available() -> int | None:
    """Bytes the host can still give this process (None where the platform does not say)."""
    found: list[int] = []
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        found.append(int(line.split()[1]) * 1024)
                        break
        except (OSError, ValueError):
            pass
        room = _cgroup_room()
        if room is not None:
            found.append(room)
    if not found:
        try:  # elsewhere: physical memory, an upper bound that still catches the absurd
            found.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, OSError, ValueError):
            return None
    return min(found)


def check_memory(what: str, needed: int, available: int | None, device: str) -> None:
    """Raise :class:`InsufficientMemory` if ``needed`` bytes exceed ``available`` or the configured cap."""
    limit = memory_limit()
    budgets = [(b, why) for b, why in ((available, "free"), (limit, f"allowed by {MEMORY_LIMIT_ENV}"))
               if b is not None]
    for budget, why in sorted(budgets):
        if needed > budget:
            raise InsufficientMemory(what, needed, budget, device, why)


def check_pools(config: CacheConfig, device: str, device_free: int | None = None, *, unified: bool = True) -> None:
    """Refuse a storage whose pools (and host tier) would not fit, before a byte is allocated.

    ``unified``: the pools live in host memory (CPU devices, Apple's unified
    memory), so pools and host tier draw on the host together; otherwise the
    pools are checked against ``device_free`` and the host tier against the host.
    """
    c = config
    pools = (f"the K/V pools ({c.num_layers} layers x {c.num_blocks:,} blocks x {c.block_size} tokens x "
             f"{c.num_kv_heads} KV heads x {c.head_dim} dims, {c.dtype}, K and V)")
    tier = f"the host tier ({c.num_host_blocks:,} blocks)"
    if unified:
        what = pools if not c.num_host_blocks else f"{pools} and {tier}"
        check_memory(what, c.device_bytes + c.host_tier_bytes, host_memory_available(), device)
        return
    check_memory(pools, c.device_bytes, device_free, device)
    if c.num_host_blocks:
        check_memory(tier, c.host_tier_bytes, host_memory_available(), "host")
