"""A minimal safetensors reader and writer in NumPy (the format, not the library).

The format is an 8-byte little-endian header length, a JSON header mapping
tensor names to ``{"dtype", "shape", "data_offsets"}`` (plus an optional
``"__metadata__"`` of strings), then the raw little-endian data. Files
written here load with the ``safetensors`` library and the other way round;
the core keeps no dependency for it. Nothing is ever unpickled.

Every structural check raises :class:`CorruptCacheFile` before anything is
returned: a length that runs past the file, a header that is not JSON, an
unknown dtype, a shape that does not match its byte range, ranges that
overlap or leave gaps.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from .errors import CorruptCacheFile

__all__ = ["write_safetensors", "read_safetensors", "SAFETENSORS_DTYPES"]

SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                      "I8": np.int8, "U8": np.uint8, "U16": np.uint16}
_NAMES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write atomically: a temporary file beside ``path``, renamed over it once complete.

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
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for array in arrays:
            f.write(array.tobytes())
    os.replace(tmp, target)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, fully validated."""
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise CorruptCacheFile(f"{path}: {len(data)} bytes, too short for a safetensors header")
    (length,) = struct.unpack("<Q", data[:8])
    if length > min(_MAX_HEADER, len(data) - 8):
        raise CorruptCacheFile(f"{path}: header length {length} runs past the end of the file ({len(data)} bytes)")
    try:
        header = json.loads(data[8:8 + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCacheFile(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CorruptCacheFile(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise CorruptCacheFile(f"{path}: __metadata__ must map strings to strings")
    body = memoryview(data)[8 + length:]
    tensors, spans = {}, []
    for name, info in header.items():
        try:
            dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
            shape = tuple(int(n) for n in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CorruptCacheFile(f"{path}: tensor {name!r} has a malformed entry {info!r}") from None
        if any(n < 0 for n in shape) or not 0 <= start <= end <= len(body):
            raise CorruptCacheFile(f"{path}: tensor {name!r} has shape {shape} / range {start}..{end} outside the data")
        if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != end - start:
            raise CorruptCacheFile(f"{path}: tensor {name!r} of shape {shape} does not fill bytes {start}..{end}")
        spans.append((start, end))
        tensors[name] = np.frombuffer(body[start:end], dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    spans.sort()
    position = 0
    for start, end in spans:
        if start != position:
            raise CorruptCacheFile(f"{path}: tensor data overlaps or leaves a gap at byte {position}")
        position = end
    if position != len(body):
        raise CorruptCacheFile(f"{path}: {len(body) - position} bytes after the last tensor")
    return tensors, metadata
