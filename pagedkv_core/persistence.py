"""Saving and loading paged state: a portable safetensors file, never pickle.

One file holds the K/V of the saved sequences' blocks for every layer
(``k``, ``v``: ``[num_layers, num_saved_blocks, block_size, num_kv_heads,
head_dim]``; int8 pools add ``k_scale``, ``v_scale``; bfloat16 is stored as
``U16`` bit patterns) and, in the safetensors metadata, a JSON record: format
version, cache config, hash scheme, each sequence's block list (indices into
the saved blocks, so ref counts follow), tokens and chain hashes, and each
saved block's registered hash. A SHA-256 over the record and every tensor
byte guards the whole file: a damaged, truncated or edited file is refused
with :class:`CorruptCacheFile` before anything changes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from .config import CacheConfig, PrefixCacheConfig
from .errors import CorruptCacheFile, IncompatibleCache, OutOfBlocks, PagedKvError, SequenceExists
from .hashing import BlockHasher
from .safetensors_io import read_safetensors, write_safetensors
from .sequence import Sequence
from .storage import NumpyHostBlocks

if TYPE_CHECKING:
    from .manager import PagedKvCacheManager

__all__ = ["FORMAT_VERSION", "SavedCache", "save_cache", "read_cache", "restore", "load_prompt_cache"]

FORMAT_VERSION = 1
_CONFIG_FIELDS = ("num_layers", "num_kv_heads", "head_dim", "num_blocks", "block_size", "dtype", "num_host_blocks",
                  "max_seq_len")


def _encode_hash(h) -> str | None:
    if h is None:
        return None
    return "h:" + h.hex() if isinstance(h, bytes) else f"i:{int(h)}"


def _decode_hash(s):
    if s is None:
        return None
    if not isinstance(s, str) or s[:2] not in ("h:", "i:"):
        raise CorruptCacheFile(f"malformed block hash {s!r}")
    try:
        return bytes.fromhex(s[2:]) if s[:2] == "h:" else int(s[2:])
    except ValueError:
        raise CorruptCacheFile(f"malformed block hash {s!r}") from None


def _checksum(record_json: str, tensors: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256(record_json.encode())
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _to_file_arrays(host: NumpyHostBlocks, dtype: str) -> dict[str, np.ndarray]:
    k, v = host.k, host.v
    if dtype == "bfloat16":  # float32 holding bfloat16 values exactly: keep the top 16 bits
        k, v = ((np.asarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16) for a in (k, v))
    elif dtype == "float8_e4m3fn":
        k, v = np.asarray(k, np.float32), np.asarray(v, np.float32)
    out = {"k": k, "v": v}
    if host.k_scale is not None:
        out["k_scale"], out["v_scale"] = np.asarray(host.k_scale, np.float32), np.asarray(host.v_scale, np.float32)
    return out


_FILE_DTYPE = {"float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": np.uint16,
               "int8": np.int8, "float8_e4m3fn": np.float32}


class SavedCache:
    """A validated saved cache: config, record and host blocks, ready to restore."""

    def __init__(self, config: CacheConfig, record: dict, host: NumpyHostBlocks) -> None:
        self.config, self.record, self.host = config, record, host
        self.hash_scheme = record["hash"]
        self.block_hashes = [_decode_hash(h) for h in record["block_hashes"]]

    @property
    def num_blocks(self) -> int:
        return len(self.block_hashes)


def save_cache(manager: PagedKvCacheManager, path: str | os.PathLike, sequences=None) -> int:
    """Write the given running sequences (all if None) to ``path``; return the number of blocks saved."""
    with manager._lock:
        rids = list(manager._seqs) if sequences is None else list(sequences)
        seqs = [manager._running(r) for r in rids]
        blocks: list[int] = []
        index: dict[int, int] = {}
        for seq in seqs:
            for b in seq.blocks:
                if b not in index:
                    index[b] = len(blocks)
                    blocks.append(b)
        c = manager.config
        if blocks:
            host = manager.storage.swap_out(blocks)
            host.wait()
            host = host.to_numpy()
        else:
            empty = np.zeros((c.num_layers, 0, c.block_size, c.num_kv_heads, c.head_dim), np.float32)
            scales = np.zeros((c.num_layers, 0, c.num_kv_heads), np.float32) if c.quantized else None
            host = NumpyHostBlocks(empty, empty.copy(), c.dtype, scales, None if scales is None else scales.copy())
        prefix = manager.prefix_config
        record = {
            "format_version": FORMAT_VERSION,
            "config": {f: getattr(c, f) for f in _CONFIG_FIELDS},
            "hash": None if prefix is None else {"algorithm": prefix.hash_algorithm, "seed": prefix.hash_seed},
            "block_hashes": [_encode_hash(manager.pool.block_hash[b]) for b in blocks],
            "sequences": [{
                "request_id": s.request_id, "num_tokens": s.num_tokens, "blocks": [index[b] for b in s.blocks],
                "priority": s.priority, "cached_tokens": s.cached_tokens, "dropped_tokens": s.dropped_tokens,
                "token_ids": s.token_ids, "root": _encode_hash(s.root), "hashes": [_encode_hash(h) for h in s.hashes],
            } for s in seqs],
        }
    tensors = _to_file_arrays(host, c.dtype)
    record_json = json.dumps(record, sort_keys=True, separators=(",", ":"))
    write_safetensors(path, tensors, {"pagedkv": record_json, "pagedkv_checksum": _checksum(record_json, tensors)})
    return len(blocks)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise CorruptCacheFile(message)


def read_cache(path: str | os.PathLike) -> SavedCache:
    """Read and validate everything in ``path``; raise ``CorruptCacheFile`` on any inconsistency."""
    tensors, metadata = read_safetensors(path)
    _require("pagedkv" in metadata and "pagedkv_checksum" in metadata, f"{path}: not a pagedkv cache file")
    record_json = metadata["pagedkv"]
    _require(_checksum(record_json, tensors) == metadata["pagedkv_checksum"], f"{path}: checksum mismatch")
    try:
        record = json.loads(record_json)
        _require(isinstance(record, dict), "record is not an object")
        version = record.get("format_version")
        _require(version == FORMAT_VERSION, f"{path}: format version {version!r}, this pagedkv reads {FORMAT_VERSION}")
        config = CacheConfig(**{f: record["config"][f] for f in _CONFIG_FIELDS})
        return _validated(path, config, record, tensors)
    except PagedKvError as exc:
        if isinstance(exc, CorruptCacheFile):
            raise
        raise CorruptCacheFile(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptCacheFile(f"{path}: malformed record ({type(exc).__name__}: {exc})") from None


def _validated(path, config: CacheConfig, record: dict, tensors: dict[str, np.ndarray]) -> SavedCache:
    c = config
    n = len(record["block_hashes"])
    shape = (c.num_layers, n, c.block_size, c.num_kv_heads, c.head_dim)
    expected = {"k", "v"} | ({"k_scale", "v_scale"} if c.quantized else set())
    _require(set(tensors) == expected, f"{path}: tensors {sorted(tensors)}, expected {sorted(expected)}")
    for name in ("k", "v"):
        _require(tensors[name].shape == shape, f"{path}: {name} has shape {tensors[name].shape}, expected {shape}")
        _require(tensors[name].dtype == _FILE_DTYPE[c.dtype], f"{path}: {name} is {tensors[name].dtype} for {c.dtype}")
    if c.quantized:
        for name in ("k_scale", "v_scale"):
            _require(tensors[name].shape == shape[:2] + (c.num_kv_heads,), f"{path}: {name} has a wrong shape")
    scheme = record["hash"]
    hasher = None
    if scheme is not None:
        PrefixCacheConfig(hash_algorithm=scheme["algorithm"], hash_seed=int(scheme["seed"]))  # validates
        hasher = BlockHasher(c.block_size, scheme["algorithm"], int(scheme["seed"]))
    block_hashes = [_decode_hash(h) for h in record["block_hashes"]]
    owners: Counter[int] = Counter()
    rids = set()
    for s in record["sequences"]:
        rid, tokens, blocks = s["request_id"], int(s["num_tokens"]), [int(b) for b in s["blocks"]]
        _require(isinstance(rid, str) and rid not in rids, f"{path}: bad or repeated request id {rid!r}")
        rids.add(rid)
        _require(tokens >= 0 and len(blocks) == math.ceil(tokens / c.block_size), f"{path}: {rid}: blocks vs tokens")
        _require(all(0 <= b < n for b in blocks) and len(set(blocks)) == len(blocks), f"{path}: {rid}: block ids")
        owners.update(blocks)
        hashes = [_decode_hash(h) for h in s["hashes"]]
        _require(len(hashes) <= tokens // c.block_size, f"{path}: {rid}: more hashes than full blocks")
        for i, h in enumerate(hashes):
            registered = block_hashes[blocks[i]]
            _require(registered is None or registered == h, f"{path}: {rid}: block {i} registered under another hash")
        token_ids, root = s["token_ids"], _decode_hash(s["root"])
        if token_ids is not None:
            _require(len(token_ids) == tokens and all(isinstance(t, int) for t in token_ids), f"{path}: {rid}: tokens")
        if hashes:
            _require(hasher is not None and root is not None and token_ids is not None,
                     f"{path}: {rid}: hashes without a hash scheme, root or tokens")
            chain = hasher.chain(token_ids, root)[:len(hashes)]
            _require(chain == hashes, f"{path}: {rid}: the hash chain does not match its tokens")
    _require(set(owners) == set(range(n)), f"{path}: saved blocks that no sequence owns")
    k, v = tensors["k"], tensors["v"]
    if c.dtype == "bfloat16":
        k, v = ((a.astype(np.uint32) << 16).view(np.float32) for a in (k, v))
    host = NumpyHostBlocks(k, v, c.dtype, tensors.get("k_scale"), tensors.get("v_scale"))
    return SavedCache(config, record, host)


def _check_scheme(saved: SavedCache, manager: PagedKvCacheManager) -> None:
    prefix = manager.prefix_config
    mine = None if prefix is None else {"algorithm": prefix.hash_algorithm, "seed": prefix.hash_seed}
    if saved.hash_scheme is not None and mine is not None and saved.hash_scheme != mine:
        raise IncompatibleCache(f"saved with hash scheme {saved.hash_scheme}, this manager uses {mine}")


def restore(manager: PagedKvCacheManager, saved: SavedCache) -> None:
    """Recreate the saved sequences (with their sharing and prefix hashes) in ``manager``."""
    with manager._mutating():
        for s in saved.record["sequences"]:
            if s["request_id"] in manager._seqs:
                raise SequenceExists(s["request_id"])
        _check_scheme(saved, manager)
        if saved.num_blocks > manager.pool.num_free:
            raise OutOfBlocks(saved.num_blocks, manager.pool.num_free)
        blocks = manager._blocks_from_host(saved.host)
        owners = Counter(b for s in saved.record["sequences"] for b in s["blocks"])
        for i, count in owners.items():
            for _ in range(count - 1):
                manager.pool.incref(blocks[i])
        bs = manager.config.block_size
        for s in saved.record["sequences"]:
            mine = [blocks[i] for i in s["blocks"]]
            hashes = [_decode_hash(h) for h in s["hashes"]]
            if manager.hasher is not None:
                manager.pool.register_chain(mine, hashes)
            row = manager.tables.acquire()
            manager.tables.set_row(row, mine, int(s["num_tokens"]))
            cacheable = manager.hasher is not None and s["token_ids"] is not None and s["root"] is not None
            manager._seqs[s["request_id"]] = Sequence(
                s["request_id"], row, mine, int(s["num_tokens"]), int(s["priority"]), next(manager._arrivals),
                manager.clock(), _decode_hash(s["root"]) if cacheable else None,
                token_ids=list(s["token_ids"]) if cacheable else None, hashes=hashes if cacheable else [],
                cached_tokens=min(int(s["cached_tokens"]), bs * len(hashes)) if cacheable else 0,
                dropped_tokens=int(s["dropped_tokens"]),
            )


def load_prompt_cache(manager: PagedKvCacheManager, path: str | os.PathLike) -> int:
    """Add the saved full, hashed blocks to ``manager``'s prefix cache (no sequences); return how many joined."""
    saved = read_cache(path)
    c, s = manager.config, saved.config
    for field in ("num_layers", "num_kv_heads", "head_dim", "block_size", "dtype"):
        if getattr(c, field) != getattr(s, field):
            raise IncompatibleCache(f"saved {field}={getattr(s, field)!r}, this manager has {getattr(c, field)!r}")
    if manager.prefix_config is None:
        raise IncompatibleCache("prefix caching is off in this manager")
    if saved.hash_scheme is None:
        raise IncompatibleCache("the file was saved without prefix hashes")
    with manager._mutating():
        _check_scheme(saved, manager)
        wanted = [i for i, h in enumerate(saved.block_hashes) if h is not None and h not in manager.pool.cached]
        if len(wanted) > manager.pool.num_free:
            raise OutOfBlocks(len(wanted), manager.pool.num_free)
        if not wanted:
            return 0
        h = saved.host
        subset = NumpyHostBlocks(h.k[:, wanted], h.v[:, wanted], h.dtype,
                                 None if h.k_scale is None else h.k_scale[:, wanted],
                                 None if h.v_scale is None else h.v_scale[:, wanted])
        blocks = manager._blocks_from_host(subset)
        parents = {}
        for s_rec in saved.record["sequences"]:
            hashes = [_decode_hash(x) for x in s_rec["hashes"]]
            for i, x in enumerate(hashes):
                parents[x] = hashes[i - 1] if i else None
        for block, i in zip(blocks, wanted):
            manager.pool.register(block, saved.block_hashes[i], parents.get(saved.block_hashes[i]))
        manager.pool.free(reversed(blocks))  # free but findable: they join the prefix cache
        return len(wanted)

