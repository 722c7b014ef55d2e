"""The remote tier's keys and values: fingerprints, tenant tags, the block codec and its validation."""

import dataclasses
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from remote_helpers import config, manager

from pagedkv_core.blocks.hashing import BlockHasher
from pagedkv_core.contract.storage import NumpyHostBlocks
from pagedkv_core.errors import CorruptRemoteBlock, IncompatibleCache, InvalidArgument
from pagedkv_core.remote import LayoutFingerprint, TenantTagger, block_key, decode_block, decode_run, encode_blocks
from pagedkv_core.remote.codec import HEADER_SIZE

LAYOUT = dict(model_id="org/model", dtype="float16", num_layers=2, num_kv_heads=2, head_dim=8, block_size=4,
              hash_algorithm="sha256", hash_seed=0)


def layout(**overrides) -> LayoutFingerprint:
    return LayoutFingerprint(**{**LAYOUT, **overrides})


def host_blocks(lay: LayoutFingerprint, n: int, seed: int = 0) -> NumpyHostBlocks:
    """Random blocks holding values exactly representable in ``lay.dtype``, as the host form carries them."""
    rng = np.random.default_rng(seed)
    shape = (lay.num_layers, n, lay.block_size, lay.num_kv_heads, lay.head_dim)
    scales = None
    if lay.dtype == "int8":
        k, v = (rng.integers(-127, 128, shape).astype(np.int8) for _ in range(2))
        scales = [rng.random((lay.num_layers, n, lay.num_kv_heads)).astype(np.float32) for _ in range(2)]
    elif lay.dtype == "float8_e4m3fn":
        from pagedkv_core.remote.codec import _E4M3

        k, v = (rng.choice(_E4M3, shape) * rng.choice([-1, 1], shape).astype(np.float32) for _ in range(2))
        scales = [rng.random((lay.num_layers, n, lay.num_kv_heads)).astype(np.float32) for _ in range(2)]
    elif lay.dtype == "bfloat16":
        k, v = ((rng.standard_normal(shape).astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
                for _ in range(2))
    else:
        k, v = (rng.standard_normal(shape).astype(lay.dtype) for _ in range(2))
    return NumpyHostBlocks(k, v, lay.dtype, *(scales or [None, None]))


def test_every_layout_field_changes_the_fingerprint():
    base = layout()
    changes = dict(model_id="org/other", dtype="float32", num_layers=3, num_kv_heads=4, head_dim=16, block_size=8,
                   hash_algorithm="builtin", hash_seed=1, head_shard=(1, 2), payload_version=2)
    assert set(changes) == {f.name for f in dataclasses.fields(LayoutFingerprint)}
    digests = {base.digest} | {dataclasses.replace(base, **{k: v}).digest for k, v in changes.items()}
    assert len(digests) == len(changes) + 1
    assert layout().digest == base.digest  # stable: a pure function of the fields


@pytest.mark.parametrize("bad", [dict(model_id=""), dict(head_shard=(2, 2)), dict(head_shard=(0, 0))])
def test_bad_layouts_are_refused(bad):
    with pytest.raises(InvalidArgument):
        layout(**bad)


def test_layout_must_match_the_manager():
    m = manager(config("float16"))
    LayoutFingerprint.for_manager(m, "x").check_manager(m)
    with pytest.raises(IncompatibleCache, match="dtype"):
        layout(model_id="x", dtype="float32", num_layers=2, num_kv_heads=2, head_dim=8).check_manager(m)
    no_prefix = manager(dataclasses.replace(config(), prefix_cache=None))
    with pytest.raises(IncompatibleCache, match="prefix caching"):
        LayoutFingerprint.for_manager(no_prefix, "x")


def test_keys_hide_the_salt_and_separate_tenants():
    hasher = BlockHasher(4)
    salt = "tenant-secret-salt-1234"
    tagger = TenantTagger(hasher, b"deployment-secret")
    tag = tagger.for_salt(salt)
    assert tag == tagger.for_root(hasher.root(salt))
    assert len(tag) == 32 and salt.encode() not in tag
    assert tagger.for_salt("other") != tag
    assert TenantTagger(hasher, b"another-deployment").for_salt(salt) != tag
    block_hash = hasher.chain(list(range(4)), hasher.root(salt))[0]
    key = block_key(layout().digest, tag, block_hash)
    assert key == b"pkv1:" + layout().hex.encode() + b":" + tag + b":" + block_hash.hex().encode()
    assert salt.encode() not in key
    assert block_key(b"\0" * 16, b"t", -1).endswith(b":iffffffffffffffff")  # builtin 64-bit hashes
    with pytest.raises(InvalidArgument):
        TenantTagger(hasher, "not bytes")


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16", "int8", "float8_e4m3fn"])
def test_values_round_trip_bit_exact(dtype):
    lay = layout(dtype=dtype)
    host = host_blocks(lay, 3)
    values = encode_blocks(lay, [b"a", b"b", b"c"], host)
    itemsize = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}.get(dtype, 1)
    scales = 2 * 2 * 2 * 4 if dtype in ("int8", "float8_e4m3fn") else 0
    assert all(len(v) == HEADER_SIZE + 2 * 2 * 4 * 2 * 8 * itemsize + scales for v in values)
    back, corrupt = decode_run(lay, [b"a", b"b", b"c"], values)
    assert corrupt == 0 and back.num_blocks == 3
    for name in ("k", "v", "k_scale", "v_scale"):
        a, b = getattr(host, name), getattr(back, name)
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8)), name


def test_float8_values_it_cannot_represent_are_refused():
    lay = layout(dtype="float8_e4m3fn")
    host = host_blocks(lay, 1)
    host.k[0, 0, 0, 0, 0] = 0.3  # not a float8_e4m3fn value
    with pytest.raises(InvalidArgument, match="cannot represent"):
        encode_blocks(lay, [b"a"], host)


def _field_offsets():
    # magic 0, version 4, flags 6, dtype 8, reserved 9, fingerprint 10, hash 26, shape 42..57, length 58, checksum 66
    return {"magic": 0, "version": 4, "flags": 6, "dtype": 8, "fingerprint": 10, "hash": 26, "num_layers": 42,
            "block_size": 46, "num_kv_heads": 50, "head_dim": 54, "length": 58, "checksum": 66, "reserved": 9, "payload": 82}


@pytest.mark.parametrize("field", list(_field_offsets()))
def test_any_damaged_field_is_a_clean_miss(field):
    lay = layout()
    value = bytearray(encode_blocks(lay, [b"h"], host_blocks(lay, 1))[0])
    value[_field_offsets()[field]] ^= 0x01
    with pytest.raises(CorruptRemoteBlock):
        decode_block(lay, b"h", bytes(value))


def test_wrong_expectations_are_misses():
    lay = layout()
    value = encode_blocks(lay, [b"h"], host_blocks(lay, 1))[0]
    with pytest.raises(CorruptRemoteBlock, match="another block hash"):
        decode_block(lay, b"other", value)
    with pytest.raises(CorruptRemoteBlock, match="another layout"):
        decode_block(layout(model_id="org/other"), b"h", value)
    with pytest.raises(CorruptRemoteBlock, match="shorter"):
        decode_block(lay, b"h", value[:HEADER_SIZE - 1])
    with pytest.raises(CorruptRemoteBlock, match="length"):
        decode_block(lay, b"h", value[:-1])
    with pytest.raises(CorruptRemoteBlock, match="length"):
        decode_block(lay, b"h", value + b"\0")
    assert struct.unpack_from("<4s", value)[0] == b"PKVB"


def test_a_run_stops_at_the_first_missing_or_bad_value():
    lay = layout()
    hashes = [b"a", b"b", b"c", b"d"]
    host = host_blocks(lay, 4)
    values = encode_blocks(lay, hashes, host)
    run, corrupt = decode_run(lay, hashes, [values[0], values[1], None, values[3]])
    assert (run.num_blocks, corrupt) == (2, 0)
    assert np.array_equal(run.k, host.k[:, :2])
    run, corrupt = decode_run(lay, hashes, [values[0], values[2], values[2], values[3]])
    assert (run.num_blocks, corrupt) == (1, 1)
    with pytest.raises(InvalidArgument):
        encode_blocks(lay, hashes[:3], host)
    with pytest.raises(InvalidArgument):
        encode_blocks(layout(dtype="float32"), hashes, host)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1, max_size=4),
       st.integers(-3, 3))
def test_random_damage_never_yields_wrong_data(flips, resize):
    lay = layout()
    host = host_blocks(lay, 1, seed=7)
    value = bytearray(encode_blocks(lay, [b"h"], host)[0])
    for position, mask in flips:
        value[position % len(value)] ^= mask
    if resize > 0:
        value += bytes(resize)
    elif resize < 0:
        del value[resize:]
    try:
        k, v, _, _ = decode_block(lay, b"h", bytes(value))
    except CorruptRemoteBlock:
        return
    assert np.array_equal(k, host.k[:, 0]) and np.array_equal(v, host.v[:, 0])
