"""Saving and loading paged state: a portable safetensors file, never pickle.

One file holds the K/V of the saved sequences' blocks for every layer
(``k``, ``v``: ``[num_layers, num_saved_blocks, block_size, num_kv_heads,
head_dim]``; int8 pools add ``k_scale``, ``v_scale``; bfloat16 is stored as
``U16`` bit patterns; sequences swapped out compressed add ``k_int8``,
``v_int8`` and their scales) and, in the safetensors metadata, a JSON record:
format version, cache config, hash scheme, each sequence's state and block
list (indices into the saved blocks, so ref counts follow), tokens and chain
hashes, and each saved block's registered hash.

A SHA-256 over the record and every tensor byte detects damage: a truncated
or flipped file is refused. It does not stop an attacker, who can edit the
file and recompute it; so every field is validated against the target before
anything is allocated (:mod:`.persistence_checks`), and a deployment that
must refuse files it did not write passes an ``hmac_key``: the file then
carries an HMAC-SHA256 over the same bytes, and loading with the key refuses
an unsigned or foreign file with :class:`UntrustedCacheFile`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections import Counter
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from ..config import CacheConfig
from ..contract.storage import NumpyHostBlocks
from ..errors import (
    CorruptCacheFile,
    IncompatibleCache,
    InvalidArgument,
    OutOfBlocks,
    OutOfHostBlocks,
    SequenceExists,
    UnsupportedOperation,
    UntrustedCacheFile,
)
from .file_checks import (
    COMPAT_FIELDS,
    CONFIG_FIELDS,
    FILE_DTYPE,
    CheckedRecord,
    HashScheme,
    SavedSequence,
    check_fit,
    check_footprint,
    check_record,
    check_tensors,
    encode_hash,
)
from .records import SeqState, Sequence
from .safetensors_io import load_json_strict, read_header, read_tensors, write_safetensors

if TYPE_CHECKING:
    from .facade import PagedKvCacheManager

__all__ = ["FORMAT_VERSION", "SavedCache", "save_cache", "read_cache", "restore", "load_prompt_cache"]

FORMAT_VERSION = 2
_PORTABLE = {"bfloat16": np.float32, "float8_e4m3fn": np.float32}  # how NumpyHostBlocks carries these dtypes


class _Digest(Protocol):
    """What :func:`_feed` writes into: a ``hashlib`` hash or an ``hmac.HMAC``."""

    def update(self, data: bytes | memoryview, /) -> None: ...


def _feed(digest: _Digest, record_json: str, tensors: dict[str, np.ndarray]) -> None:
    digest.update(record_json.encode("utf-8", "surrogatepass"))
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.reshape(-1).view(np.uint8).data)  # the bytes, without a copy


def _checksum(record_json: str, tensors: dict[str, np.ndarray]) -> str:
    """SHA-256 over the record and every tensor: detects damage (anyone can recompute it)."""
    digest = hashlib.sha256()
    _feed(digest, record_json, tensors)
    return digest.hexdigest()


def _signature(key: bytes, record_json: str, tensors: dict[str, np.ndarray]) -> str:
    """HMAC-SHA256 over what the checksum covers: only a holder of ``key`` can produce it."""
    digest = hmac.new(key, digestmod=hashlib.sha256)
    _feed(digest, record_json, tensors)
    return digest.hexdigest()


def _check_key(key: object) -> bytes | None:
    if key is None:
        return None
    if not isinstance(key, (bytes, bytearray, memoryview)) or not len(key):
        raise InvalidArgument("hmac_key must be non-empty bytes (encode a text key first)")
    return bytes(key)


def _to_file_arrays(host: NumpyHostBlocks, dtype: str, prefix: str = "") -> dict[str, np.ndarray]:
    k, v = host.k, host.v
    if dtype == "bfloat16":  # float32 holding bfloat16 values exactly: keep the top 16 bits
        k, v = ((np.asarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16) for a in (k, v))
    elif dtype == "float8_e4m3fn":
        k, v = np.asarray(k, np.float32), np.asarray(v, np.float32)
    out = {f"k{prefix}": k, f"v{prefix}": v}
    if host.k_scale is not None:
        out[f"k{prefix}_scale"] = np.asarray(host.k_scale, np.float32)
        out[f"v{prefix}_scale"] = np.asarray(host.v_scale, np.float32)
    return out


def _concat(parts: list[NumpyHostBlocks], empty: NumpyHostBlocks) -> NumpyHostBlocks:
    if not parts:
        return empty
    if len(parts) == 1:
        return parts[0]
    scales = parts[0].k_scale is not None
    return NumpyHostBlocks(np.concatenate([p.k for p in parts], axis=1), np.concatenate([p.v for p in parts], axis=1),
                           parts[0].dtype,
                           np.concatenate([p.k_scale for p in parts], axis=1) if scales else None,
                           np.concatenate([p.v_scale for p in parts], axis=1) if scales else None)


def _empty(c: CacheConfig, dtype: npt.DTypeLike, scales: bool) -> NumpyHostBlocks:
    k = np.zeros((c.num_layers, 0, c.block_size, c.num_kv_heads, c.head_dim), dtype)
    s = np.zeros((c.num_layers, 0, c.num_kv_heads), np.float32) if scales else None
    return NumpyHostBlocks(k, k.copy(), c.dtype, s, None if s is None else s.copy())


def _host_copy(seq: Sequence, like: NumpyHostBlocks) -> NumpyHostBlocks:
    """A swapped sequence's host blocks in portable form, checked to concatenate with ``like`` bit-exactly."""
    seq.host.wait()
    host: NumpyHostBlocks = seq.host.to_numpy()
    ok = host.k.dtype == like.k.dtype and (host.k_scale is None) == (like.k_scale is None)
    if not ok or host.num_blocks != seq.host_blocks:
        raise UnsupportedOperation(f"cannot save {seq.request_id!r}: its host copy is {host.k.dtype} "
                                   f"({host.num_blocks} blocks), expected {like.k.dtype}")
    return host


def _hashes_of(seq: Sequence, algorithm: str | None) -> tuple[str | None, list[str | None]]:
    """The root and chain to save: none when they were made under another hash algorithm than today's."""
    if algorithm is None or seq.root is None or isinstance(seq.root, bytes) != (algorithm == "sha256"):
        return None, []
    return encode_hash(seq.root), [encode_hash(h) for h in seq.hashes]


def _snapshot(manager: PagedKvCacheManager,
              seqs: list[Sequence]) -> tuple[list[dict[str, object]], list[int], dict[str, np.ndarray]]:
    """The record's sequences, the device blocks saved, and the file's tensors (under the manager's lock)."""
    c = manager.config
    algorithm = None if manager.prefix_config is None else manager.prefix_config.hash_algorithm
    blocks: list[int] = []
    index: dict[int, int] = {}
    for seq in seqs:
        for b in seq.blocks if seq.state is SeqState.RUNNING else ():
            if b not in index:
                index[b] = len(blocks)
                blocks.append(b)
    main_like = _empty(c, _PORTABLE.get(c.dtype, FILE_DTYPE[c.dtype]), c.quantized)
    main: list[NumpyHostBlocks] = []
    if blocks:
        device = manager.storage.swap_out(blocks)
        device.wait()
        main_like = device.to_numpy()
        main.append(main_like)
    int8_like, int8 = _empty(c, np.int8, True), []
    rows: list[dict[str, object]] = []
    n_main, n_int8 = len(blocks), 0
    for seq in seqs:
        root, hashes = _hashes_of(seq, algorithm)
        row: dict[str, object] = {
            "request_id": seq.request_id, "num_tokens": seq.num_tokens, "priority": seq.priority,
            "cached_tokens": seq.cached_tokens, "dropped_tokens": seq.dropped_tokens, "token_ids": seq.token_ids,
            "root": root, "hashes": hashes}
        if seq.state is SeqState.RUNNING:
            row.update(state="running", blocks=[index[b] for b in seq.blocks])
        elif seq.host_lossy:  # compressed from a float pool: int8 values and scales, kept as they are
            int8.append(_host_copy(seq, int8_like))
            row.update(state="compressed", blocks=list(range(n_int8, n_int8 + seq.host_blocks)))
            n_int8 += seq.host_blocks
        else:
            main.append(_host_copy(seq, main_like))
            row.update(state="swapped", blocks=list(range(n_main, n_main + seq.host_blocks)))
            n_main += seq.host_blocks
        rows.append(row)
    tensors = _to_file_arrays(_concat(main, main_like), c.dtype)
    if int8:
        tensors.update(_to_file_arrays(_concat(int8, int8_like), "int8", "_int8"))
    return rows, blocks, tensors


def _block_hash(manager: PagedKvCacheManager, block: int) -> str | None:
    h, prefix = manager.pool.block_hash[block], manager.prefix_config
    if h is None or prefix is None or isinstance(h, bytes) != (prefix.hash_algorithm == "sha256"):
        return None
    return encode_hash(h)


def save_cache(manager: PagedKvCacheManager, path: str | os.PathLike[str], sequences: Seq[str] | None = None, *,
               hmac_key: bytes | None = None) -> int:
    """Write the given sequences (all if None), running or swapped out, to ``path``; return the blocks saved.

    Swapped-out sequences are saved from the host tier exactly as they are
    there (int8 and scales for compressed ones) and come back swapped out.
    With ``hmac_key`` the file is signed (see :func:`read_cache`).
    """
    key = _check_key(hmac_key)
    with manager.lock:
        rids = manager.sequences.ids() if sequences is None else list(sequences)
        if len(set(rids)) != len(rids):
            raise InvalidArgument("a request id appears twice in sequences")
        seqs = [manager.sequences.find(r) for r in rids]
        rows, blocks, tensors = _snapshot(manager, seqs)
        c, prefix = manager.config, manager.prefix_config
        record = {
            "format_version": FORMAT_VERSION,
            "config": {f: getattr(c, f) for f in CONFIG_FIELDS},
            "hash": None if prefix is None else {"algorithm": prefix.hash_algorithm, "seed": prefix.hash_seed},
            "block_hashes": [_block_hash(manager, b) for b in blocks]
            + [None] * (tensors["k"].shape[1] - len(blocks)),
            "sequences": rows,
        }
    record_json = json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False)
    metadata = {"pagedkv": record_json, "pagedkv_checksum": _checksum(record_json, tensors)}
    if key is not None:
        metadata["pagedkv_hmac"] = _signature(key, record_json, tensors)
    write_safetensors(path, tensors, metadata)
    return int(tensors["k"].shape[1]) + sum(s.host_blocks for s in seqs if s.host_lossy)


class SavedCache:
    """A validated saved cache: config, decoded sequences and host blocks, ready to restore."""

    def __init__(self, checked: CheckedRecord, record: object, host: NumpyHostBlocks,
                 int8: NumpyHostBlocks | None = None) -> None:
        self.config: CacheConfig = checked.config
        self.record = record  # the parsed JSON, as read (``checked`` holds its validated, decoded form)
        self.host, self.int8 = host, int8
        self.hash_scheme: HashScheme | None = checked.hash_scheme
        self.block_hashes = checked.block_hashes
        self.sequences: list[SavedSequence] = checked.sequences

    @property
    def num_blocks(self) -> int:
        """Blocks in the file's ``k``/``v`` tensors."""
        return len(self.block_hashes)

    def host_of(self, s: SavedSequence) -> NumpyHostBlocks:
        """The tensors ``s.blocks`` index: the int8 ones for a compressed sequence, else ``k``/``v``."""
        if s.state != "compressed":
            return self.host
        if self.int8 is None:  # read_cache reads the int8 tensors whenever the record has compressed sequences
            raise CorruptCacheFile(f"{s.request_id}: compressed, but the file holds no int8 blocks")
        return self.int8


def _host_blocks(config: CacheConfig, tensors: dict[str, np.ndarray], prefix: str = "") -> NumpyHostBlocks:
    k, v = tensors[f"k{prefix}"], tensors[f"v{prefix}"]
    dtype = "int8" if prefix else config.dtype
    if dtype == "bfloat16":
        k, v = ((a.astype(np.uint32) << 16).view(np.float32) for a in (k, v))
    return NumpyHostBlocks(k, v, dtype, tensors.get(f"k{prefix}_scale"), tensors.get(f"v{prefix}_scale"))


def read_cache(path: str | os.PathLike[str], *, target: CacheConfig | None = None, hmac_key: bytes | None = None,
               max_bytes: int | None = None) -> SavedCache:
    """Read and validate everything in ``path`` before allocating for its tensors.

    ``target``: the config of the manager the blocks go to; the file must
    match its layout and hold no more blocks than its pool and host tier
    (``IncompatibleCache``). Without it, the file's own config is the target,
    and the memory it asks for is capped by ``max_bytes`` (default: physical
    memory). ``hmac_key``: refuse a file that is not signed with this key
    (:class:`UntrustedCacheFile`). Anything malformed: ``CorruptCacheFile``.
    """
    key = _check_key(hmac_key)
    with open(path, "rb") as file:
        header = read_header(file, path)
        metadata = header.metadata
        if "pagedkv" not in metadata or "pagedkv_checksum" not in metadata:
            raise CorruptCacheFile(f"{path}: not a pagedkv cache file")
        if key is not None and "pagedkv_hmac" not in metadata:
            raise UntrustedCacheFile(f"{path}: the file is not signed, and an hmac_key was given")
        record_json = metadata["pagedkv"]
        record = load_json_strict(record_json, f"{path}: record", max_depth=4)
        checked = check_record(path, record)
        if target is not None:
            check_fit(checked, target)
        else:
            check_footprint(checked.config, max_bytes)
        check_tensors(path, checked, header.tensors)
        tensors = read_tensors(file, header, path)
    if not hmac.compare_digest(_checksum(record_json, tensors).encode(), metadata["pagedkv_checksum"].encode(
            "utf-8", "surrogatepass")):
        raise CorruptCacheFile(f"{path}: checksum mismatch")
    if key is not None and not hmac.compare_digest(_signature(key, record_json, tensors).encode(),
                                                   metadata["pagedkv_hmac"].encode("utf-8", "surrogatepass")):
        raise UntrustedCacheFile(f"{path}: the signature does not match the hmac_key")
    int8 = _host_blocks(checked.config, tensors, "_int8") if checked.num_int8_blocks else None
    return SavedCache(checked, record, _host_blocks(checked.config, tensors), int8)


def _subset(host: NumpyHostBlocks, index: list[int]) -> NumpyHostBlocks:
    if index == list(range(host.num_blocks)):
        return host
    return NumpyHostBlocks(host.k[:, index], host.v[:, index], host.dtype,
                           None if host.k_scale is None else host.k_scale[:, index],
                           None if host.v_scale is None else host.v_scale[:, index])


def _check_scheme(saved: SavedCache, manager: PagedKvCacheManager) -> None:
    prefix = manager.prefix_config
    mine = None if prefix is None else {"algorithm": prefix.hash_algorithm, "seed": prefix.hash_seed}
    if saved.hash_scheme is not None and mine is not None and saved.hash_scheme != mine:
        raise IncompatibleCache(f"saved with hash scheme {saved.hash_scheme}, this manager uses {mine}")


def _check_restorable(saved: SavedCache, manager: PagedKvCacheManager, running: list[int]) -> None:
    """Every reason ``restore`` could fail, checked before anything changes."""
    for s in saved.sequences:
        if s.request_id in manager.sequences:
            raise SequenceExists(s.request_id)
    _check_scheme(saved, manager)
    for field in COMPAT_FIELDS:
        mine, theirs = getattr(manager.config, field), getattr(saved.config, field)
        if mine != theirs:
            raise IncompatibleCache(f"saved {field}={theirs!r}, this manager has {mine!r}")
    widest = max((len(s.blocks) for s in saved.sequences), default=0)
    if widest > manager.sequences.max_width:
        raise IncompatibleCache(f"a saved sequence has {widest} blocks, "
                                f"this manager's tables hold {manager.sequences.max_width}")
    if len(running) > manager.pool.num_free:
        raise OutOfBlocks(len(running), manager.pool.num_free)
    host = sum(len(s.blocks) for s in saved.sequences if s.state != "running")
    if host > manager.host_tier.room:
        raise OutOfHostBlocks(host, manager.host_tier.room)


def restore(manager: PagedKvCacheManager, saved: SavedCache) -> None:
    """Recreate the saved sequences (sharing, prefix hashes, swapped ones on the host tier) in ``manager``."""
    with manager.mutating():
        running = sorted({b for s in saved.sequences if s.state == "running" for b in s.blocks})
        _check_restorable(saved, manager, running)
        device = dict(zip(running, manager.host_tier.blocks_from_host(_subset(saved.host, running))))
        owners = Counter(b for s in saved.sequences if s.state == "running" for b in s.blocks)
        for i, count in owners.items():
            for _ in range(count - 1):
                manager.pool.incref(device[i])
        for s in saved.sequences:
            _restore_sequence(manager, saved, s, device)


def _restore_sequence(manager: PagedKvCacheManager, saved: SavedCache, s: SavedSequence,
                      device: dict[int, int]) -> None:
    # prefix-cacheable only with a hash scheme here and a root and tokens in the file
    token_ids = s.token_ids if manager.prefix.hasher is not None and s.root is not None else None
    cacheable = token_ids is not None
    hashes = list(s.hashes) if cacheable else []
    now = manager.clock()
    blocks: list[int] = []
    swapped: dict[str, Any] = {}  # the host-tier fields of a sequence restored swapped out
    if s.state == "running":
        blocks = [device[i] for i in s.blocks]
        if cacheable:
            manager.pool.register_chain(blocks, hashes)
    else:
        swapped = dict(state=SeqState.SWAPPED, host=_subset(saved.host_of(s), list(s.blocks)),
                       host_blocks=len(s.blocks), host_lossy=s.state == "compressed")
        manager.host_tier.hold(len(s.blocks))
    manager.sequences.add(s.request_id, blocks, s.num_tokens, priority=s.priority, now=now,
                          root=s.root if cacheable else None, token_ids=None if token_ids is None else list(token_ids),
                          hashes=hashes, cached_tokens=s.cached_tokens, dropped_tokens=s.dropped_tokens, **swapped)


def load_prompt_cache(manager: PagedKvCacheManager, path: str | os.PathLike[str], *,
                      hmac_key: bytes | None = None) -> int:
    """Add the saved full, hashed blocks to ``manager``'s prefix cache (no sequences); return how many joined."""
    if manager.prefix_config is None:
        raise IncompatibleCache("prefix caching is off in this manager")
    saved = read_cache(path, target=manager.config, hmac_key=hmac_key)
    if saved.hash_scheme is None:
        raise IncompatibleCache("the file was saved without prefix hashes")
    with manager.mutating():
        _check_scheme(saved, manager)
        wanted = [i for i, h in enumerate(saved.block_hashes) if h is not None and h not in manager.pool.cached]
        if len(wanted) > manager.pool.num_free:
            raise OutOfBlocks(len(wanted), manager.pool.num_free)
        if not wanted:
            return 0
        blocks = manager.host_tier.blocks_from_host(_subset(saved.host, wanted))
        parents = {}
        for s in saved.sequences:
            for i, x in enumerate(s.hashes):
                parents[x] = s.hashes[i - 1] if i else None
        for block, i in zip(blocks, wanted):
            manager.pool.register(block, saved.block_hashes[i], parents.get(saved.block_hashes[i]))
        manager.pool.free(reversed(blocks))  # free but findable: they join the prefix cache
        return len(wanted)
