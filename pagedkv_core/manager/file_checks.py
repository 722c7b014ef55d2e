"""Validation of a saved cache's record: every field's type and range, before anything is allocated.

A cache file may have been edited by someone who recomputed its checksum, so
nothing in it is trusted: an integer must be a JSON integer (not a bool, a
float, ``Infinity`` or a string) inside the range its use allows (token ids
and priorities in int64, block ids in int32 tables), every object has exactly
its keys, every block is owned as a live manager would own it, and hash
chains match their tokens. The sizes a file asks for are capped by the
target (a prompt cache cannot hold more blocks than the target's pool and
host tier) or, for :meth:`~pagedkv_core.manager.facade.PagedKvCacheManager.load`,
by the memory the file's configuration would take. Problems with the file
itself raise :class:`CorruptCacheFile`; a sound file that does not fit the
target raises :class:`IncompatibleCache`.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, SupportsInt, TypedDict

import numpy as np

from ..blocks.hashing import BlockHasher
from ..config import CacheConfig, HashAlgorithm
from ..dtypes import FLOAT_DTYPES, QUANTIZED_DTYPES
from ..errors import CorruptCacheFile, IncompatibleCache, InvalidArgument
from ..memory import BOOKKEEPING_BYTES_PER_BLOCK
from .safetensors_io import TensorSpec

__all__ = ["HashScheme", "SavedSequence", "CheckedRecord", "COMPAT_FIELDS", "check_record", "check_fit",
           "check_footprint", "check_tensors", "default_max_bytes", "encode_hash", "FILE_DTYPE", "READABLE_VERSIONS",
           "CONFIG_FIELDS", "STATES"]

READABLE_VERSIONS = (1, 2)  # 2 added swapped sequences ("state") and the int8 tensors of compressed ones
CONFIG_FIELDS = ("num_layers", "num_kv_heads", "head_dim", "num_blocks", "block_size", "dtype", "num_host_blocks",
                 "max_seq_len")
COMPAT_FIELDS = ("num_layers", "num_kv_heads", "head_dim", "block_size", "dtype")
STATES = ("running", "swapped", "compressed")  # compressed: swapped out as int8 from a float pool
_SEQUENCE_FIELDS = {"request_id", "num_tokens", "blocks", "priority", "cached_tokens", "dropped_tokens",
                    "token_ids", "root", "hashes"}
_INT64 = 2**63
_MAX_ID = 2**31 - 1  # block ids travel in int32 tables
_MAX_DIM = 2**31 - 1
_MAX_TOKENS = 2**62
FILE_DTYPE = {"float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": np.uint16,
              "int8": np.int8, "float8_e4m3fn": np.float32}
_SHA256_HASH = re.compile(r"h:[0-9a-f]{64}")
_BUILTIN_HASH = re.compile(r"i:-?[0-9]{1,19}")


class HashScheme(TypedDict):
    """The record's ``hash`` object: the prefix-hash algorithm and seed the saved hashes were made with."""

    algorithm: HashAlgorithm
    seed: int


def _fail(path: object, message: str) -> CorruptCacheFile:
    return CorruptCacheFile(f"{path}: {message}")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _int(path: object, value: object, what: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:  # bool is an int subclass: refused here
        raise _fail(path, f"{what} must be an integer in [{lo}, {hi}], got {_show(value)}")
    return value


def _object(path: object, value: object, what: str, keys: set[str]) -> dict[str, Any]:
    """``value`` as a JSON object with exactly ``keys``; its values are still unchecked (hence ``Any``)."""
    if not isinstance(value, dict):
        raise _fail(path, f"{what} must be an object, got {type(value).__name__}")
    if set(value) != keys:
        missing, extra = sorted(keys - set(value)), sorted(set(value) - keys)
        raise _fail(path, f"{what}: missing keys {missing}, unknown keys {[k[:40] for k in extra[:5]]}")
    return value


def _list(path: object, value: object, what: str) -> list[Any]:
    """``value`` as a JSON list; its items are still unchecked (hence ``Any``)."""
    if not isinstance(value, list):
        raise _fail(path, f"{what} must be a list, got {type(value).__name__}")
    return value


def encode_hash(h: Hashable | None) -> str | None:
    """A block hash as it is stored: ``h:<hex>`` for sha256 digests, ``i:<int>`` for builtin hashes."""
    if h is None:
        return None
    if isinstance(h, bytes):
        return "h:" + h.hex()
    if not isinstance(h, (int, SupportsInt)):  # int first: the common case skips the protocol check
        raise InvalidArgument(f"a block hash is bytes (sha256) or an integer (builtin), got {type(h).__name__}")
    return f"i:{int(h)}"


def _decode_hash(path: object, value: object, what: str, algorithm: str | None) -> Hashable:
    if algorithm is None:
        raise _fail(path, f"{what}: a block hash in a file saved without a hash scheme")
    pattern = _SHA256_HASH if algorithm == "sha256" else _BUILTIN_HASH
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise _fail(path, f"{what}: malformed {algorithm} block hash {_show(value)}")
    h = bytes.fromhex(value[2:]) if algorithm == "sha256" else int(value[2:])
    if isinstance(h, int) and not -_INT64 <= h < _INT64:
        raise _fail(path, f"{what}: builtin block hash {_show(value)} outside int64")
    return h


@dataclass(frozen=True, slots=True)
class SavedSequence:
    """One validated sequence of a file; ``blocks`` index the int8 tensors when ``state == "compressed"``."""

    request_id: str
    state: str
    num_tokens: int
    blocks: tuple[int, ...]
    priority: int
    cached_tokens: int
    dropped_tokens: int
    token_ids: tuple[int, ...] | None
    root: Hashable | None
    hashes: tuple[Hashable, ...]


@dataclass(frozen=True, slots=True)
class CheckedRecord:
    """A record whose every field was validated, decoded for restoring."""

    config: CacheConfig
    hash_scheme: HashScheme | None
    block_hashes: list[Hashable | None]
    sequences: list[SavedSequence]
    num_int8_blocks: int

    @property
    def num_blocks(self) -> int:
        """Blocks in the ``k``/``v`` tensors (running sequences' and exactly swapped ones')."""
        return len(self.block_hashes)


def check_config(path: object, raw: object) -> CacheConfig:
    c = _object(path, raw, "config", set(CONFIG_FIELDS))
    for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
        _int(path, c[name], f"config.{name}", 1, _MAX_DIM)
    _int(path, c["num_blocks"], "config.num_blocks", 1, _MAX_ID)
    _int(path, c["num_host_blocks"], "config.num_host_blocks", 0, _MAX_ID)
    if c["max_seq_len"] is not None:
        _int(path, c["max_seq_len"], "config.max_seq_len", 1, _MAX_TOKENS)
    known = FLOAT_DTYPES + QUANTIZED_DTYPES
    if not isinstance(c["dtype"], str) or c["dtype"] not in known:
        raise _fail(path, f"config.dtype must be one of {', '.join(known)}, got {_show(c['dtype'])}")
    try:
        return CacheConfig(**{f: c[f] for f in CONFIG_FIELDS})
    except InvalidArgument as exc:
        raise _fail(path, f"config: {exc}") from None


def _check_scheme(path: object, raw: object) -> HashScheme | None:
    if raw is None:
        return None
    scheme = _object(path, raw, "hash", {"algorithm", "seed"})
    algorithm = scheme["algorithm"]
    if algorithm not in ("sha256", "builtin"):
        raise _fail(path, f"hash.algorithm must be 'sha256' or 'builtin', got {_show(algorithm)}")
    seed = _int(path, scheme["seed"], "hash.seed", 1 - 10**40, 10**40 - 1)  # any seed JSON integers of 40 digits hold
    return HashScheme(algorithm=algorithm, seed=seed)


def _check_tokens(path: object, raw: object, what: str, num_tokens: int) -> tuple[int, ...] | None:
    if raw is None:
        return None
    ids = _list(path, raw, what)
    if len(ids) != num_tokens or not all(type(t) is int and -_INT64 <= t < _INT64 for t in ids):
        raise _fail(path, f"{what}: tokens must be {num_tokens} integers in int64")
    return tuple(ids)


def _check_sequence(path: object, raw: object, version: int, c: CacheConfig, algorithm: str | None,
                    hasher: BlockHasher | None) -> SavedSequence:
    s = _object(path, raw, "sequence", _SEQUENCE_FIELDS | ({"state"} if version >= 2 else set()))
    rid = s["request_id"]
    if not isinstance(rid, str):
        raise _fail(path, f"request_id must be a string, got {_show(rid)}")
    state = s.get("state", "running")
    if state not in STATES:
        raise _fail(path, f"{rid}: state must be one of {', '.join(STATES)}, got {_show(state)}")
    tokens = _int(path, s["num_tokens"], f"{rid}: num_tokens", 0, _MAX_TOKENS)
    blocks = _list(path, s["blocks"], f"{rid}: blocks")
    if len(blocks) > c.max_blocks_per_seq or len(blocks) != -(-tokens // c.block_size):
        raise _fail(path, f"{rid}: {len(blocks)} blocks vs tokens ({tokens} tokens, at most "
                          f"{c.max_blocks_per_seq} blocks a sequence)")
    if not all(type(b) is int and 0 <= b <= _MAX_ID for b in blocks) or len(set(blocks)) != len(blocks):
        raise _fail(path, f"{rid}: block ids must be distinct integers in [0, {_MAX_ID}]")
    priority = _int(path, s["priority"], f"{rid}: priority", -_INT64, _INT64 - 1)
    dropped = _int(path, s["dropped_tokens"], f"{rid}: dropped_tokens", 0, _MAX_TOKENS)
    # window eviction drops tokens but leaves the count of those served from the cache at admission
    cached = _int(path, s["cached_tokens"], f"{rid}: cached_tokens", 0, tokens + dropped)
    token_ids = _check_tokens(path, s["token_ids"], f"{rid}: token_ids", tokens)
    root = None if s["root"] is None else _decode_hash(path, s["root"], f"{rid}: root", algorithm)
    hashes = tuple(_decode_hash(path, h, f"{rid}: hashes", algorithm) for h in _list(path, s["hashes"], "hashes"))
    if len(hashes) > tokens // c.block_size:
        raise _fail(path, f"{rid}: more hashes than full blocks")
    if hashes:
        if hasher is None or root is None or token_ids is None:
            raise _fail(path, f"{rid}: hashes without a hash scheme, root or tokens")
        if hasher.chain(token_ids[:len(hashes) * c.block_size], root) != list(hashes):
            raise _fail(path, f"{rid}: the hash chain does not match its tokens")
    return SavedSequence(rid, state, tokens, tuple(blocks), priority, cached, dropped, token_ids, root, hashes)


def _check_registered(path: object, block_hashes: list[Hashable | None], seqs: list[SavedSequence]) -> None:
    """A running sequence's full blocks are registered under its own chain's hashes, or not at all."""
    for s in seqs:
        for i, h in enumerate(s.hashes if s.state == "running" else ()):
            if block_hashes[s.blocks[i]] not in (None, h):
                raise _fail(path, f"{s.request_id}: block {i} registered under another hash")


def _check_ownership(path: object, c: CacheConfig, block_hashes: list[Hashable | None],
                     seqs: list[SavedSequence]) -> int:
    """Check that blocks are owned as a live manager owns them; return the number of int8 blocks."""
    n = len(block_hashes)
    shared: Counter[int] = Counter()  # main blocks of running sequences (shared between forks)
    exclusive: Counter[int] = Counter()  # main blocks of exactly swapped sequences (their own host copies)
    int8: Counter[int] = Counter()
    for s in seqs:
        {"running": shared, "swapped": exclusive, "compressed": int8}[s.state].update(s.blocks)
    n8 = sum(int8.values())
    if any(b >= n for b in shared) or any(b >= n for b in exclusive) or any(b >= n8 for b in int8):
        raise _fail(path, "block ids out of range of the saved blocks")
    if max(exclusive.values(), default=1) > 1 or max(int8.values(), default=1) > 1 or set(exclusive) & set(shared):
        raise _fail(path, "a swapped sequence's block ids are shared with another sequence")
    if set(shared) | set(exclusive) != set(range(n)):
        raise _fail(path, "saved blocks that no sequence owns")
    if any(block_hashes[b] is not None for b in exclusive):
        raise _fail(path, "a swapped-out block is registered in the prefix cache")
    _check_registered(path, block_hashes, seqs)
    if len(shared) > c.num_blocks or len(exclusive) + n8 > c.num_host_blocks:
        raise _fail(path, f"{len(shared)} device and {len(exclusive) + n8} host blocks in use, more than its "
                          f"config holds ({c.num_blocks} and {c.num_host_blocks})")
    return n8


def check_record(path: object, record: object) -> CheckedRecord:
    """Validate a parsed record completely (types, ranges, ownership, hash chains); raise ``CorruptCacheFile``."""
    r = _object(path, record, "record", {"format_version", "config", "hash", "block_hashes", "sequences"})
    version = r["format_version"]
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise _fail(path, f"format version {_show(version)}, this pagedkv reads "
                          f"{' and '.join(map(str, READABLE_VERSIONS))}")
    c = check_config(path, r["config"])
    scheme = _check_scheme(path, r["hash"])
    algorithm = None if scheme is None else scheme["algorithm"]
    hasher = None if scheme is None else BlockHasher(c.block_size, scheme["algorithm"], scheme["seed"])
    raw_hashes = _list(path, r["block_hashes"], "block_hashes")
    if len(raw_hashes) > c.num_blocks + c.num_host_blocks:
        raise _fail(path, f"{len(raw_hashes)} saved blocks, more than its config holds")
    block_hashes = [None if h is None else _decode_hash(path, h, "block_hashes", algorithm) for h in raw_hashes]
    registered = [h for h in block_hashes if h is not None]
    if len(set(registered)) != len(registered):
        raise _fail(path, "two saved blocks are registered under the same hash")
    seqs = [_check_sequence(path, s, version, c, algorithm, hasher)
            for s in _list(path, r["sequences"], "sequences")]
    ids = [s.request_id for s in seqs]
    if len(set(ids)) != len(ids):
        raise _fail(path, "a request id is repeated")
    n8 = _check_ownership(path, c, block_hashes, seqs)
    return CheckedRecord(c, scheme, block_hashes, seqs, n8)


def check_fit(saved: CheckedRecord, target: CacheConfig) -> None:
    """``IncompatibleCache`` unless the saved blocks have ``target``'s layout and fit its pool plus host tier."""
    for field in COMPAT_FIELDS:
        mine, theirs = getattr(target, field), getattr(saved.config, field)
        if mine != theirs:
            raise IncompatibleCache(f"saved {field}={theirs!r}, this manager has {mine!r}")
    total = saved.num_blocks + saved.num_int8_blocks
    if total > target.num_blocks + target.num_host_blocks:
        raise IncompatibleCache(f"the file holds {total} blocks, more than this manager's pool and host tier "
                                f"({target.num_blocks} + {target.num_host_blocks})")


def default_max_bytes() -> int:
    """This machine's physical memory: the most a file may make :meth:`load` allocate by default."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - platforms without sysconf
        return 2**40


def footprint(c: CacheConfig) -> int:
    """Bytes a manager of config ``c`` allocates: pools, host tier, block tables and pool bookkeeping."""
    tables = 64 * 4 * min(c.max_blocks_per_seq, 32)  # the initial int32 rows; they grow with the sequences
    return c.num_blocks * (c.bytes_per_block + BOOKKEEPING_BYTES_PER_BLOCK) + c.host_tier_bytes + tables


def check_footprint(c: CacheConfig, max_bytes: int | None) -> None:
    """``IncompatibleCache`` when a manager built from the file's config would need more than ``max_bytes``."""
    limit = default_max_bytes() if max_bytes is None else max_bytes
    need = footprint(c)
    if need > limit:
        raise IncompatibleCache(f"the file's config needs {need} bytes ({c.num_blocks} blocks, "
                                f"{c.num_host_blocks} host blocks), more than max_bytes={limit}")


def expected_tensors(saved: CheckedRecord) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    c = saved.config
    blocks = (c.num_layers, saved.num_blocks, c.block_size, c.num_kv_heads, c.head_dim)
    out: dict[str, tuple[np.dtype, tuple[int, ...]]] = {
        "k": (np.dtype(FILE_DTYPE[c.dtype]), blocks), "v": (np.dtype(FILE_DTYPE[c.dtype]), blocks)}
    if c.quantized:
        out["k_scale"] = out["v_scale"] = (np.dtype(np.float32), blocks[:2] + (c.num_kv_heads,))
    if saved.num_int8_blocks:
        int8 = (c.num_layers, saved.num_int8_blocks, c.block_size, c.num_kv_heads, c.head_dim)
        out["k_int8"] = out["v_int8"] = (np.dtype(np.int8), int8)
        out["k_int8_scale"] = out["v_int8_scale"] = (np.dtype(np.float32), int8[:2] + (c.num_kv_heads,))
    return out


def check_tensors(path: object, saved: CheckedRecord, specs: dict[str, TensorSpec]) -> None:
    """The header's tensors must be exactly those the record implies, so reading them allocates a known size."""
    expected = expected_tensors(saved)
    if set(specs) != set(expected):
        raise _fail(path, f"tensors {sorted(k[:40] for k in specs)[:8]}, expected {sorted(expected)}")
    for name, (dtype, shape) in expected.items():
        spec = specs[name]
        if spec.shape != shape:
            raise _fail(path, f"{name} has shape {spec.shape}, expected {shape}")
        if spec.dtype != dtype:
            raise _fail(path, f"{name} is {spec.dtype} for {saved.config.dtype}")

