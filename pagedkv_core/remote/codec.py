"""The bytes of one remote block: a fixed header, then a canonical payload.

Header (little-endian, 82 bytes)::

    magic "PKVB" | version u16 | flags u16 (bit 0: scales follow) | dtype code u8 | reserved u8
    | layout fingerprint 16B | block-hash digest 16B
    | num_layers u32 | block_size u32 | num_kv_heads u32 | head_dim u32
    | payload length u64 | payload checksum 16B (SHA-256, truncated)

Payload: K as ``[num_layers, block_size, num_kv_heads, head_dim]``, then V,
then (quantized dtypes) the float32 K and V scales ``[num_layers,
num_kv_heads]``. Elements are little-endian in the stored dtype: bfloat16 and
float8_e4m3fn as their bit patterns (``u16``, ``u8``), so a block costs the
same bytes remotely as on the device and comes back bit-exact.

A value is accepted only if every header field matches what the reader
expects (its own fingerprint and the hash it asked for) and the checksum
holds; anything else is a miss, never wrong data.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Hashable, Sequence

import numpy as np

from ..contract.storage import NumpyHostBlocks
from ..dtypes import is_quantized
from ..errors import CorruptRemoteBlock, InvalidArgument
from .layout import LayoutFingerprint, encode_block_hash

__all__ = ["HEADER_SIZE", "MAGIC", "VALUE_VERSION", "encode_blocks", "decode_block", "decode_run"]

MAGIC = b"PKVB"
VALUE_VERSION = 1
_HEADER = struct.Struct("<4sHHBB16s16sIIIIQ16s")
HEADER_SIZE = _HEADER.size
_HAS_SCALES = 1
_DTYPE_CODES = {"float64": 1, "float32": 2, "float16": 3, "bfloat16": 4, "int8": 5, "float8_e4m3fn": 6}
_WIRE = {"float64": "<f8", "float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "int8": "i1",
         "float8_e4m3fn": "u1"}


def _e4m3_table() -> np.ndarray:
    codes = np.arange(0x7F)  # non-negative finite codes; 0x7F is NaN
    exponent, mantissa = codes >> 3, (codes & 7).astype(np.float64)
    values = np.where(exponent == 0, mantissa / 8 * 2.0 ** -6, (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    return values.astype(np.float32)


_E4M3 = _e4m3_table()
_E4M3_DECODE = np.concatenate([_E4M3, [np.nan], -_E4M3, [np.nan]]).astype(np.float32)  # code -> value
_HOST_DTYPE = {"bfloat16": np.dtype(np.float32), "float8_e4m3fn": np.dtype(np.float32)}  # else the wire's


def _to_wire(values: np.ndarray, dtype: str) -> np.ndarray:
    """Host values (bfloat16 / float8 held in float32) as their canonical stored elements."""
    if dtype == "bfloat16":
        return (np.asarray(values, np.float32).view(np.uint32) >> 16).astype(np.uint16)
    if dtype == "float8_e4m3fn":
        values = np.asarray(values, np.float32)
        magnitude = np.abs(values)
        codes = np.searchsorted(_E4M3, magnitude).clip(0, _E4M3.size - 1)
        nan = np.isnan(values)
        if not (nan | (_E4M3[codes] == magnitude)).all():
            raise InvalidArgument("float8_e4m3fn host blocks hold values that float8_e4m3fn cannot represent")
        signed: np.ndarray = np.where(nan, 0x7F, codes) | (np.signbit(values) << 7)
        return signed.astype(np.uint8)
    return np.asarray(values, _WIRE[dtype])


def _from_wire(elements: np.ndarray, dtype: str) -> np.ndarray:
    """Canonical elements back to the host form ``NumpyHostBlocks`` uses."""
    if dtype == "bfloat16":
        widened: np.ndarray = elements.astype(np.uint32) << 16
        return widened.view(np.float32)
    if dtype == "float8_e4m3fn":
        decoded: np.ndarray = _E4M3_DECODE[elements]  # a table lookup per code
        return decoded
    return elements.astype(elements.dtype.newbyteorder("="), copy=False)


def _hash_digest(block_hash: Hashable) -> bytes:
    return hashlib.sha256(encode_block_hash(block_hash)).digest()[:16]


def encode_blocks(layout: LayoutFingerprint, hashes: Sequence[Hashable], host: NumpyHostBlocks) -> list[bytes]:
    """One value per block of ``host`` (``[num_layers, n, ...]``), block ``i`` stored under ``hashes[i]``.

    Each value is built in one buffer: the block's strided slices are copied
    straight into place, then checksummed there.
    """
    n = host.num_blocks
    if len(hashes) != n:
        raise InvalidArgument(f"{len(hashes)} hashes for {n} blocks")
    if host.dtype != layout.dtype:
        raise InvalidArgument(f"host blocks are {host.dtype}, the layout says {layout.dtype}")
    expected = (layout.num_layers, n, layout.block_size, layout.num_kv_heads, layout.head_dim)
    if tuple(host.k.shape) != expected:
        raise InvalidArgument(f"host blocks have shape {tuple(host.k.shape)}, the layout needs {expected}")
    shape, wire, payload_size, has_scales = _payload_layout(layout)
    sources = [_to_wire(host.k, layout.dtype), _to_wire(host.v, layout.dtype)]
    if has_scales:
        sources += [np.asarray(host.k_scale, "<f4"), np.asarray(host.v_scale, "<f4")]
    values = []
    for i, block_hash in enumerate(hashes):
        buffer = bytearray(HEADER_SIZE + payload_size)
        offset = HEADER_SIZE
        for source in sources:
            part = source[:, i]
            np.frombuffer(buffer, part.dtype, part.size, offset).reshape(part.shape)[...] = part
            offset += part.nbytes
        checksum = hashlib.sha256(memoryview(buffer)[HEADER_SIZE:]).digest()[:16]
        _HEADER.pack_into(
            buffer, 0, MAGIC, VALUE_VERSION, _HAS_SCALES if has_scales else 0, _DTYPE_CODES[layout.dtype], 0,
            layout.digest, _hash_digest(block_hash), *shape, payload_size, checksum,
        )
        values.append(bytes(buffer))
    return values


def _payload_layout(layout: LayoutFingerprint) -> tuple[tuple[int, ...], np.dtype, int, bool]:
    shape = (layout.num_layers, layout.block_size, layout.num_kv_heads, layout.head_dim)
    wire = np.dtype(_WIRE[layout.dtype])
    has_scales = is_quantized(layout.dtype)
    values = int(np.prod(shape)) * wire.itemsize
    scales = layout.num_layers * layout.num_kv_heads * 4 if has_scales else 0
    return shape, wire, 2 * (values + scales), has_scales


# (k, v, k_scale, v_scale) of one block in wire elements; the scales only for quantized dtypes
DecodedBlock = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]


def decode_block(layout: LayoutFingerprint, block_hash: Hashable, value: bytes) -> DecodedBlock:
    """``(k, v, k_scale, v_scale)`` of one stored block, or ``CorruptRemoteBlock`` saying what is wrong."""
    shape, wire, payload_size, has_scales = _payload_layout(layout)
    if len(value) < HEADER_SIZE:
        raise CorruptRemoteBlock(f"value of {len(value)} bytes is shorter than the header")
    (magic, version, flags, dtype_code, reserved, fingerprint, hash_digest, layers, block_size, heads, head_dim,
     payload_len, checksum) = _HEADER.unpack_from(value)
    checks = (
        (magic == MAGIC, "bad magic"),
        (version == VALUE_VERSION and reserved == 0 and flags & ~_HAS_SCALES == 0, f"value version {version}"),
        (fingerprint == layout.digest, "written under another layout"),
        (hash_digest == _hash_digest(block_hash), "stored for another block hash"),
        (dtype_code == _DTYPE_CODES[layout.dtype] and bool(flags & _HAS_SCALES) == has_scales, "dtype differs"),
        ((layers, block_size, heads, head_dim) == (shape[0], shape[1], shape[2], shape[3]), "shape differs"),
        (payload_len == payload_size == len(value) - HEADER_SIZE, "payload length differs"),
    )
    for ok, problem in checks:
        if not ok:
            raise CorruptRemoteBlock(problem)
    payload = memoryview(value)[HEADER_SIZE:]
    if hashlib.sha256(payload).digest()[:16] != checksum:
        raise CorruptRemoteBlock("checksum mismatch")
    count = int(np.prod(shape))
    k = np.frombuffer(payload, wire, count).reshape(shape)
    v = np.frombuffer(payload, wire, count, count * wire.itemsize).reshape(shape)
    if not has_scales:
        return k, v, None, None
    offset, scale_shape = 2 * count * wire.itemsize, (layout.num_layers, layout.num_kv_heads)
    n = scale_shape[0] * scale_shape[1]
    k_scale = np.frombuffer(payload, "<f4", n, offset).reshape(scale_shape)
    v_scale = np.frombuffer(payload, "<f4", n, offset + 4 * n).reshape(scale_shape)
    return k, v, k_scale, v_scale


def decode_run(layout: LayoutFingerprint, hashes: Sequence[Hashable],
               values: Sequence[bytes | None]) -> tuple[NumpyHostBlocks, int]:
    """The leading run of valid blocks as host blocks, and how many values were present but invalid (0 or 1).

    The run stops at the first missing or invalid value: a later block is
    useless without every block before it.
    """
    decoded: list[DecodedBlock] = []
    corrupt = 0
    for block_hash, value in zip(hashes, values):
        if value is None:
            break
        try:
            decoded.append(decode_block(layout, block_hash, value))
        except CorruptRemoteBlock:
            corrupt = 1
            break
    shape, wire, _, has_scales = _payload_layout(layout)
    n = len(decoded)
    host_dtype = _HOST_DTYPE.get(layout.dtype, wire.newbyteorder("="))
    k = np.empty((shape[0], n) + shape[1:], host_dtype)
    v = np.empty_like(k)
    k_scale = np.empty((shape[0], n, shape[2]), np.float32) if has_scales else None
    v_scale = None if k_scale is None else np.empty_like(k_scale)
    for i, (bk, bv, ks, vs) in enumerate(decoded):
        k[:, i], v[:, i] = _from_wire(bk, layout.dtype), _from_wire(bv, layout.dtype)
        if k_scale is not None and v_scale is not None:
            k_scale[:, i], v_scale[:, i] = ks, vs
    return NumpyHostBlocks(k, v, layout.dtype, k_scale, v_scale), corrupt
