"""A minimal safetensors reader and writer in NumPy (the format, not the library).

The format is an 8-byte little-endian header length, a JSON header mapping
tensor names to ``{"dtype", "shape", "data_offsets"}`` (plus an optional
``"__metadata__"`` of strings), then the raw little-endian data. Files
written here load with the ``safetensors`` library and the other way round;
the core keeps no dependency for it. Nothing is ever unpickled.

A file may be hostile, so reading is split in two: :func:`read_header` reads
and validates the header alone (a length that runs past the file, JSON that
is not strict — ``NaN``, ``Infinity``, floats, huge integers, duplicate keys,
nesting deeper than the format has —, an unknown dtype, shapes or offsets
that are not non-negative integers, a shape that does not fill its byte
range, ranges that overlap or leave gaps), so a caller can check every shape
against what it expects *before* :func:`read_tensors` allocates a byte.
Every problem raises :class:`CorruptCacheFile`.

Writing is atomic: a uniquely named temporary file beside the target,
fsynced, then renamed over it. A writer holds an advisory lock on its
temporary file; each save first removes the unlocked temporaries a killed
save left behind, so they never accumulate.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import secrets
import stat
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CorruptCacheFile

try:  # advisory locks tell a live temporary file from a killed save's leftover
    import fcntl
except ImportError:  # pragma: no cover - Windows: leftovers are recognised by age instead
    fcntl = None  # type: ignore[assignment]

__all__ = ["write_safetensors", "read_safetensors", "read_header", "read_tensors", "load_json_strict",
           "SafetensorsHeader", "TensorSpec", "SAFETENSORS_DTYPES"]

SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                      "I8": np.int8, "U8": np.uint8, "U16": np.uint16}
_NAMES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
_MAX_RANK = 32  # NumPy allows 64 dimensions; no tensor of ours has more than 5
_MAX_INT_DIGITS = 40  # no integer of the format needs more; longer ones cost quadratic time to parse
_STALE_AGE_S = 600.0  # without advisory locks, a temporary file this old is a leftover
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _reject_float(text: str) -> None:
    raise ValueError(f"the number {text[:40]} is not an integer")


def _strict_int(text: str) -> int:
    if len(text) > _MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key[:60]!r}")
            seen.add(key)
    return out


def _json_depth(data: bytes) -> int:
    """Deepest bracket nesting outside strings, found without recursion (so without RecursionError)."""
    codes = np.frombuffer(_STRING.sub(b'""', data), np.uint8)
    if not codes.size:
        return 0
    step = (codes == 0x5B).astype(np.int64) + (codes == 0x7B) - (codes == 0x5D) - (codes == 0x7D)
    return int(np.cumsum(step).max(initial=0))


def load_json_strict(data: bytes | str, what: str, max_depth: int) -> object:
    """Parse JSON that a hostile file may have written, or raise :class:`CorruptCacheFile`.

    Python's ``json`` accepts ``NaN``/``Infinity``, keeps the last of duplicate
    keys, turns ``1e400`` into infinity and recurses once per bracket; none of
    that may reach a caller. Our formats hold no floats, so any float is refused.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    depth = _json_depth(raw)
    if depth > max_depth:
        raise CorruptCacheFile(f"{what}: JSON nested {depth} deep, the format has at most {max_depth}")
    try:
        return json.loads(raw.decode("utf-8") if isinstance(data, bytes) else data, parse_constant=_reject_constant,
                          parse_float=_reject_float, parse_int=_strict_int, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CorruptCacheFile(f"{what}: not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor's entry in a validated header; ``start``/``end`` are byte offsets into the data."""

    dtype: np.dtype  # native byte order
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class SafetensorsHeader:
    """A validated header: the tensors' specs and the metadata; no tensor byte has been read yet."""

    tensors: dict[str, TensorSpec]
    metadata: dict[str, str]
    data_start: int
    data_size: int


def _is_count(x: object) -> bool:
    return type(x) is int and x >= 0


def _spec(path: object, name: str, info: object, data_size: int) -> TensorSpec:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise CorruptCacheFile(f"{path}: tensor {name[:60]!r} has a malformed entry")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CorruptCacheFile(f"{path}: tensor {name[:60]!r} has an unknown dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or len(shape) > _MAX_RANK or not all(_is_count(n) for n in shape):
        raise CorruptCacheFile(f"{path}: tensor {name[:60]!r} has a malformed shape")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(n) for n in offsets):
        raise CorruptCacheFile(f"{path}: tensor {name[:60]!r} has malformed data offsets")
    start, end = offsets
    if not start <= end <= data_size:
        raise CorruptCacheFile(f"{path}: tensor {name[:60]!r} has range {start}..{end} outside the data")
    native = np.dtype(SAFETENSORS_DTYPES[dtype])
    if math.prod(shape) * native.itemsize != end - start:  # exact: Python integers never overflow
        raise CorruptCacheFile(f"{path}: tensor {name[:60]!r} of shape {tuple(shape)} does not fill bytes "
                               f"{start}..{end}")
    return TensorSpec(native, tuple(shape), start, end)


def read_header(file: io.BufferedIOBase, path: object = "<file>") -> SafetensorsHeader:
    """Read and validate the header of the open file ``file``; the tensor data stays unread."""
    size = os.fstat(file.fileno()).st_size
    prefix = file.read(8)
    if len(prefix) < 8:
        raise CorruptCacheFile(f"{path}: {len(prefix)} bytes, too short for a safetensors header")
    (length,) = struct.unpack("<Q", prefix)
    if length > min(_MAX_HEADER, size - 8):
        raise CorruptCacheFile(f"{path}: header length {length} runs past the end of the file ({size} bytes)")
    header = load_json_strict(file.read(length), f"{path}: header", max_depth=3)
    if not isinstance(header, dict):
        raise CorruptCacheFile(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptCacheFile(f"{path}: __metadata__ must map strings to strings")
    data_size = size - 8 - length
    tensors = {name: _spec(path, name, info, data_size) for name, info in header.items()}
    position = 0
    for spec in sorted(tensors.values(), key=lambda s: (s.start, s.end)):
        if spec.start != position:
            raise CorruptCacheFile(f"{path}: tensor data overlaps or leaves a gap at byte {position}")
        position = spec.end
    if position != data_size:
        raise CorruptCacheFile(f"{path}: {data_size - position} bytes after the last tensor")
    return SafetensorsHeader(tensors, metadata, 8 + length, data_size)


def read_tensors(file: io.BufferedIOBase, header: SafetensorsHeader, path: object = "<file>") -> dict[str, np.ndarray]:
    """The tensors of a validated header, read in one pass (writable arrays sharing one buffer)."""
    buffer = bytearray(header.data_size)
    file.seek(header.data_start)
    if file.readinto(buffer) != header.data_size:
        raise CorruptCacheFile(f"{path}: the file changed while it was read")
    out = {}
    for name, spec in header.tensors.items():
        little = spec.dtype.newbyteorder("<")
        array = np.frombuffer(buffer, little, count=math.prod(spec.shape), offset=spec.start).reshape(spec.shape)
        out[name] = array.astype(spec.dtype, copy=False)
    return out


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, fully validated."""
    with open(path, "rb") as file:
        header = read_header(file, path)
        return read_tensors(file, header, path), header.metadata


# -- writing ----------------------------------------------------------------------------


def _temporaries(target: Path) -> Iterator[Path]:
    """Temporary files a save to ``target`` may have left: ours, and the fixed name older versions used."""
    yield target.with_name(target.name + ".tmp")
    ours = re.compile(re.escape(f".{target.name}.") + r"[0-9a-f]{16}\.tmp")
    with contextlib.suppress(OSError), os.scandir(target.parent) as entries:
        yield from (Path(e.path) for e in entries if ours.fullmatch(e.name))


def _remove_leftovers(target: Path) -> None:
    """Delete the temporary files of saves that were killed; a save in progress holds its lock and is kept."""
    for tmp in _temporaries(target):
        try:
            fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # never wait on a FIFO
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            if fcntl is None:
                if time.time() - os.fstat(fd).st_mtime < _STALE_AGE_S:
                    continue
            else:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # a live save is writing it
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        finally:
            os.close(fd)


def _create_locked(target: Path) -> tuple[int, Path]:
    """A new, locked temporary file beside ``target`` (file mode as ``open`` would give it)."""
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        if fcntl is None:
            return fd, tmp
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # another save may have judged it a leftover between creation and lock: start again
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return fd, tmp
        except FileNotFoundError:
            pass
        os.close(fd)
    raise OSError(f"could not create a temporary file beside {target}")


def write_safetensors(path: str | os.PathLike[str], tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write atomically: ``path`` holds either its old content or the complete new file, never a part.

    bfloat16 has no NumPy dtype: callers store it as ``U16`` bit patterns and
    say so in their metadata.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    arrays = []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        dtype = _NAMES.get(array.dtype)
        if dtype is None:
            raise TypeError(f"cannot store dtype {array.dtype} in safetensors here")
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + little.nbytes]}
        offset += little.nbytes
        arrays.append(little)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # align the data as the reference writer does
    target = Path(path)
    _remove_leftovers(target)
    fd, tmp = _create_locked(target)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)))
            f.write(encoded)
            for array in arrays:
                f.write(array.reshape(-1).view(np.uint8).data)  # a memoryview of the bytes: no copy
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, target)  # still locked: no other save can take it for a leftover
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
