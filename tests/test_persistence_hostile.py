"""Hostile cache files: every edited header or record (checksum recomputed) raises a typed error, changing nothing.

Also the HMAC option, atomic saves that clean up after killed ones, swapped-out
sequences and forks' cached-token counts across a save and load.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvhelpers import fill, kv_of, make_config, request, snapshot
from pagedkv_core import PagedKvCacheManager, PrefixCacheConfig
from pagedkv_core.errors import (
    CorruptCacheFile,
    IncompatibleCache,
    InvalidArgument,
    PagedKvError,
    UntrustedCacheFile,
)
from pagedkv_core.manager.persistence import _checksum
from pagedkv_core.manager.safetensors_io import read_safetensors, write_safetensors
from pagedkv_core.policy.eviction import SlidingWindowPolicy
from pagedkv_numpy.storage import NumpyStorage

KEY = b"a deployment's secret key"
INF, NAN = float("inf"), float("nan")


def source(**overrides) -> PagedKvCacheManager:
    """Two sequences sharing a prompt prefix and a fork ("a", "b", "a-beam"; 4 blocks), K/V written."""
    m = PagedKvCacheManager(NumpyStorage(make_config(**overrides)))
    m.allocate(request("a", tokens=range(10)))
    m.allocate(request("b", tokens=tuple(range(8)) + (50, 51, 52)))
    m.fork("a", "a-beam")
    fill(m, ["a", "b"], [10, 3])
    return m


def target() -> PagedKvCacheManager:
    """A running manager for prompt caches, busy with a sequence of its own."""
    m = PagedKvCacheManager(NumpyStorage(make_config()))
    m.allocate(request("busy", tokens=range(100, 105)))
    fill(m, ["busy"], [5], seed=3)
    return m


@functools.cache
def saved_bytes() -> bytes:
    """The file ``source()`` saves, made once (hypothesis examples copy it)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache.safetensors"
        source().save(path)
        return path.read_bytes()


@pytest.fixture
def template() -> bytes:
    return saved_bytes()


@pytest.fixture
def path(tmp_path, template) -> Path:
    p = tmp_path / "cache.safetensors"
    p.write_bytes(template)
    return p


# -- editing files -------------------------------------------------------------------------


def rewrite(path: Path, edit=None, text=None) -> None:
    """Change the record (as an object with ``edit`` or as JSON text with ``text``) and recompute its checksum."""
    tensors, metadata = read_safetensors(path)
    record_json = metadata["pagedkv"]
    if edit is not None:
        record = json.loads(record_json)
        replaced = edit(record)
        record_json = json.dumps(record if replaced is None else replaced, sort_keys=True, separators=(",", ":"))
    if text is not None:
        record_json = text(record_json)
    metadata.update(pagedkv=record_json, pagedkv_checksum=_checksum(record_json, tensors))
    write_safetensors(path, tensors, metadata)


def rewrite_header(path: Path, edit) -> None:
    """Change the safetensors header (``edit`` mutates it or returns its new text); the data stays."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    new = edit(header)
    encoded = (json.dumps(header) if new is None else new).encode("utf-8", "surrogatepass")
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + n:])


def put(*keys_and_value):
    *keys, value = keys_and_value

    def edit(node):
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return edit


def drop(*keys):
    def edit(node):
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]
    return edit


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def deep(h: dict) -> str:
    h["k"]["shape"] = "@@"
    return json.dumps(h).replace('"@@"', nested(5000))


# -- the header matrix -------------------------------------------------------------------------

HEADER_EDITS = {
    "shape-inf": put("k", "shape", [INF, 4, 4, 2, 8]),
    "shape-minus-inf": put("k", "shape", [-INF, 4, 4, 2, 8]),
    "shape-nan": put("k", "shape", [NAN, 4, 4, 2, 8]),
    "shape-2**64": put("k", "shape", [2**64, 4, 4, 2, 8]),
    "shape-2**62x4": put("k", "shape", [2**62, 4]),
    "shape-product-overflows-int64": put("k", "shape", [2**32, 2**32, 2**32]),
    "shape-negative": put("k", "shape", [-2, 4, 4, 2, 8]),
    "shape-bool": put("k", "shape", [True, 4, 4, 2, 8]),
    "shape-float": put("k", "shape", [2.0, 4, 4, 2, 8]),
    "shape-string": put("k", "shape", ["2", 4, 4, 2, 8]),
    "shape-nested-list": put("k", "shape", [[2], 4, 4, 2, 8]),
    "shape-not-a-list": put("k", "shape", 2),
    "shape-rank-100": put("k", "shape", [1] * 100),
    "shape-5000-nested": deep,
    "shape-5000-digit-int": lambda h: json.dumps(h).replace('"shape": [2,', '"shape": [' + "9" * 5000 + ","),
    "shape-1e400": lambda h: json.dumps(h).replace('"shape": [2,', '"shape": [1e400,'),
    "offsets-inf": put("k", "data_offsets", [0, INF]),
    "offsets-2**64": put("k", "data_offsets", [0, 2**64]),
    "offsets-negative": put("k", "data_offsets", [-2048, 0]),
    "offsets-reversed": put("k", "data_offsets", [2048, 0]),
    "offsets-three": put("k", "data_offsets", [0, 1024, 2048]),
    "offsets-overlap": put("v", "data_offsets", [0, 2048]),
    "offsets-leave-bytes": lambda h: h["v"].update(shape=[2, 4, 4, 2, 4], data_offsets=[2048, 3072]),
    "dtype-unknown": put("k", "dtype", "F8"),
    "dtype-not-a-string": put("k", "dtype", ["F32"]),
    "entry-not-an-object": put("k", 5),
    "entry-extra-key": put("k", "extra", 1),
    "entry-missing-key": drop("k", "dtype"),
    "header-a-list": lambda h: "[1, 2]",
    "header-duplicate-tensor": lambda h: json.dumps(h).replace('"v":', '"k": {}, "v":', 1),
    "header-nan-literal": lambda h: json.dumps(h).replace('"data_offsets": [0,', '"data_offsets": [NaN,', 1),
    "metadata-not-strings": put("__metadata__", "pagedkv", 5),
    "metadata-missing": drop("__metadata__"),
    "metadata-not-an-object": put("__metadata__", ["pagedkv"]),
    "checksum-not-ascii": put("__metadata__", "pagedkv_checksum", "\u00e9" * 64),
    "checksum-lone-surrogate": lambda h: json.dumps(h).replace('"pagedkv_checksum": "', '"pagedkv_checksum": "\\ud800'),
}

RAW_EDITS = {
    "length-2**64-1": lambda d: struct.pack("<Q", 2**64 - 1) + d[8:],
    "length-zero": lambda d: struct.pack("<Q", 0) + d[8:],
    "seven-bytes": lambda d: d[:7],
    "header-not-utf8": lambda d: d[:9] + b"\xff" + d[10:],
    "truncated-data": lambda d: d[:-1],
    "extra-data": lambda d: d + b"\0" * 8,
}


def assert_refused(path: Path, expected=CorruptCacheFile, prompt_expected=None, **kw) -> None:
    """``load`` and ``load_prompt_cache`` both raise their typed error; the prompt target is left as it was."""
    if expected is False:  # a sound file for a manager of its own
        PagedKvCacheManager.load(path, **kw).check_invariants()
    else:
        with pytest.raises(PagedKvError) as info:
            PagedKvCacheManager.load(path, **kw)
        assert isinstance(info.value, expected), repr(info.value)
    m = target()
    before, stats = snapshot(m), m.stats()
    prompt_expected = expected if prompt_expected is None else prompt_expected
    if prompt_expected is False:  # the edit does not concern a prompt cache: it loads
        m.load_prompt_cache(path, **kw)
    else:
        with pytest.raises(PagedKvError) as info:
            m.load_prompt_cache(path, **kw)
        assert isinstance(info.value, prompt_expected), repr(info.value)
        assert snapshot(m) == before and m.stats() == stats
    m.check_invariants()


@pytest.mark.parametrize("edit", list(HEADER_EDITS.values()), ids=list(HEADER_EDITS))
def test_edited_headers_are_refused(path, edit):
    rewrite_header(path, edit)
    assert_refused(path)


@pytest.mark.parametrize("edit", list(RAW_EDITS.values()), ids=list(RAW_EDITS))
def test_damaged_bytes_are_refused(path, edit):
    path.write_bytes(edit(path.read_bytes()))
    assert_refused(path)


# -- the record matrix (checksum recomputed) ----------------------------------------------------

S0 = ("sequences", 0)  # "a": 10 tokens, blocks [0, 1, 2]
S1 = ("sequences", 1)  # "b": 11 tokens, blocks [0, 1, 3]
C = "config"
RECORD_EDITS = [
    ("tokens-inf", put(*S0, "num_tokens", INF)),
    ("tokens-2**70", put(*S0, "num_tokens", 2**70)),
    ("tokens-negative", put(*S0, "num_tokens", -1)),
    ("tokens-bool", put(*S0, "num_tokens", True)),
    ("tokens-float", put(*S0, "num_tokens", 10.0)),
    ("tokens-string", put(*S0, "num_tokens", "10")),
    ("tokens-null", put(*S0, "num_tokens", None)),
    ("tokens-list", put(*S0, "num_tokens", [10])),
    ("blocks-inf", put(*S0, "blocks", [INF, 1, 2])),
    ("blocks-2**70", put(*S0, "blocks", [2**70, 1, 2])),
    ("blocks-negative", put(*S0, "blocks", [-1, 1, 2])),
    ("blocks-bool", put(*S0, "blocks", [0, True, 2])),
    ("blocks-string", put(*S0, "blocks", ["0", 1, 2])),
    ("blocks-nested", put(*S0, "blocks", [[0], 1, 2])),
    ("blocks-not-a-list", put(*S0, "blocks", 5)),
    ("blocks-repeated", put(*S0, "blocks", [0, 0, 2])),
    ("blocks-too-many", put(*S0, "blocks", [0, 1, 2, 3])),
    ("blocks-unowned", put(*S1, "blocks", [0, 1, 2])),
    ("seed-inf", put("hash", "seed", INF)),
    ("seed-10**40", put("hash", "seed", 10**40)),
    ("seed-string", put("hash", "seed", "0")),
    ("seed-bool", put("hash", "seed", False)),
    ("algorithm-unknown", put("hash", "algorithm", "md5")),
    ("algorithm-switched", put("hash", "algorithm", "builtin")),
    ("hash-not-an-object", put("hash", 5)),
    ("hash-extra-key", put("hash", "salt", "x")),
    ("token-2**70", put(*S0, "token_ids", 0, 2**70)),
    ("token-minus-2**64", put(*S0, "token_ids", 0, -2**64)),
    ("token-inf", put(*S0, "token_ids", 0, INF)),
    ("token-bool", put(*S0, "token_ids", 0, False)),
    ("token-string", put(*S0, "token_ids", 0, "0")),
    ("token-ids-too-few", put(*S0, "token_ids", list(range(9)))),
    ("token-ids-not-a-list", put(*S0, "token_ids", 10)),
    ("priority-string", put(*S0, "priority", "high")),
    ("priority-float", put(*S0, "priority", 1.5)),
    ("priority-null", put(*S0, "priority", None)),
    ("priority-bool", put(*S0, "priority", True)),
    ("priority-2**70", put(*S0, "priority", 2**70)),
    ("cached-string", put(*S0, "cached_tokens", "8")),
    ("cached-negative", put(*S0, "cached_tokens", -1)),
    ("cached-above-all-tokens", put(*S0, "cached_tokens", 11)),
    ("cached-bool", put(*S0, "cached_tokens", True)),
    ("dropped-negative", put(*S0, "dropped_tokens", -1)),
    ("dropped-inf", put(*S0, "dropped_tokens", INF)),
    ("state-unknown", put(*S0, "state", "paused")),
    ("state-swapped-but-shared", put(*S1, "state", "swapped")),
    ("request-id-int", put(*S0, "request_id", 5)),
    ("request-id-repeated", put(*S1, "request_id", "a")),
    ("root-malformed", put(*S0, "root", "h:zz")),
    ("root-int", put(*S0, "root", 5)),
    ("hash-short", put(*S0, "hashes", 0, "h:abcd")),
    ("hash-int", put(*S0, "hashes", 0, 7)),
    ("hashes-not-a-list", put(*S0, "hashes", "h:")),
    ("hashes-too-many", lambda r: r["sequences"][0]["hashes"].append(r["sequences"][0]["hashes"][0])),
    ("sequence-missing-key", drop(*S0, "priority")),
    ("sequence-extra-key", put(*S0, "owner", "x")),
    ("sequence-not-an-object", put(*S0, [])),
    ("sequences-not-a-list", put("sequences", {})),
    ("block-hashes-not-a-list", put("block_hashes", "h:")),
    ("block-hash-int", put("block_hashes", 0, 5)),
    ("block-hashes-repeated", lambda r: r["block_hashes"].__setitem__(1, r["block_hashes"][0])),
    ("block-hashes-one-more", lambda r: r["block_hashes"].append(None)),
    ("block-hashes-one-less", lambda r: r["block_hashes"].pop()),
    ("max-seq-len-1", put(C, "max_seq_len", 1)),
    ("max-seq-len-0", put(C, "max_seq_len", 0)),
    ("max-seq-len-string", put(C, "max_seq_len", "64")),
    ("num-blocks-10**12", put(C, "num_blocks", 10**12)),
    ("num-blocks-1", put(C, "num_blocks", 1)),
    ("num-blocks-0", put(C, "num_blocks", 0)),
    ("num-blocks-bool", put(C, "num_blocks", True)),
    ("num-host-blocks-negative", put(C, "num_host_blocks", -1)),
    ("num-host-blocks-10**12", put(C, "num_host_blocks", 10**12)),
    ("num-layers-0", put(C, "num_layers", 0)),
    ("num-layers-2**70", put(C, "num_layers", 2**70)),
    ("num-layers-string", put(C, "num_layers", "2")),
    ("block-size-inf", put(C, "block_size", INF)),
    ("dtype-int", put(C, "dtype", 5)),
    ("config-extra-key", put(C, "rope", 1)),
    ("config-missing-key", drop(C, "dtype")),
    ("config-not-an-object", put(C, [])),
    ("version-float", put("format_version", 2.0)),
    ("version-bool", put("format_version", True)),
    ("version-string", put("format_version", "2")),
    ("version-1-with-states", put("format_version", 1)),
    ("record-a-list", lambda r: [r]),
    ("record-missing-key", drop("hash")),
    ("record-extra-key", put("signature", "x")),
]
RECORD_TEXT_EDITS = {
    "text-nan": lambda t: t.replace('"priority":0', '"priority":NaN', 1),
    "text-infinity": lambda t: t.replace('"num_tokens":10', '"num_tokens":Infinity', 1),
    "text-minus-infinity": lambda t: t.replace('"priority":0', '"priority":-Infinity', 1),
    "text-1e400": lambda t: t.replace('"num_tokens":10', '"num_tokens":1e400', 1),
    "text-5000-digits": lambda t: t.replace('"priority":0', '"priority":' + "9" * 5000, 1),
    "text-5000-nested": lambda t: t.replace('"priority":0', '"priority":' + nested(5000), 1),
    "text-duplicate-key": lambda t: t.replace('"priority":0', '"priority":0,"priority":1', 1),
    "text-not-json": lambda t: t[:-1],
    "text-empty": lambda t: "",
}
# well-formed files that do not fit: (load's error, load_prompt_cache's error; False: it loads, and costs
# only what it holds)
MISFITS = [
    ("head-dim-16", put(C, "head_dim", 16), CorruptCacheFile, IncompatibleCache),
    ("num-blocks-2**30", put(C, "num_blocks", 2**30), IncompatibleCache, False),
    ("num-host-blocks-2**30", put(C, "num_host_blocks", 2**30), IncompatibleCache, False),
    ("max-seq-len-2**62", put(C, "max_seq_len", 2**62), False, False),  # a bound only: tables grow with use
    ("seed-2**70", put("hash", "seed", 2**70), False, IncompatibleCache),
]


@pytest.mark.parametrize("edit", [e for _, e in RECORD_EDITS], ids=[i for i, _ in RECORD_EDITS])
def test_edited_records_are_refused(path, edit):
    rewrite(path, edit)
    assert_refused(path)


@pytest.mark.parametrize("text", list(RECORD_TEXT_EDITS.values()), ids=list(RECORD_TEXT_EDITS))
def test_edited_record_text_is_refused(path, text):
    rewrite(path, text=text)
    assert_refused(path)


@pytest.mark.parametrize("edit, load_error, prompt_error", [m[1:] for m in MISFITS], ids=[m[0] for m in MISFITS])
def test_files_that_do_not_fit_are_refused(path, edit, load_error, prompt_error):
    rewrite(path, edit)
    assert_refused(path, load_error, prompt_error)


FIELDS = [("format_version",), ("hash",), ("hash", "seed"), ("block_hashes",), ("block_hashes", 2), ("sequences",),
          *[("config", f) for f in ("num_layers", "num_blocks", "block_size", "num_host_blocks", "max_seq_len")],
          *[(*S0, f) for f in ("request_id", "num_tokens", "blocks", "priority", "cached_tokens", "dropped_tokens",
                               "token_ids", "root", "hashes", "state")],
          (*S0, "blocks", 1), (*S0, "token_ids", 3), (*S0, "hashes", 1), (*S1, "blocks", 2)]
JSON = st.recursive(
    st.none() | st.booleans() | st.text(max_size=4) | st.floats()
    | st.integers(-2**70, 2**70) | st.sampled_from([0, 1, 2, 3, 4, 8, 2**31, 2**63, 2**64, "h:", "i:1"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8)


@settings(max_examples=150, deadline=None)
@given(field=st.sampled_from(FIELDS), value=JSON)
def test_any_value_in_any_field_loads_cleanly_or_raises_a_typed_error(field, value):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.safetensors"
        path.write_bytes(saved_bytes())
        rewrite(path, put(*field, value))
        for attempt in (lambda: PagedKvCacheManager.load(path), lambda: target().load_prompt_cache(path)):
            try:
                result = attempt()
            except PagedKvError:
                continue
            if isinstance(result, PagedKvCacheManager):
                result.check_invariants()


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(["k", "v", "__metadata__"]), key=st.sampled_from(["dtype", "shape", "data_offsets"]),
       value=JSON.filter(lambda v: not isinstance(v, str)))  # a string is valid metadata
def test_any_value_in_the_header_is_refused_cleanly(name, key, value):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.safetensors"
        path.write_bytes(saved_bytes())
        rewrite_header(path, put(name, key, value))
        with pytest.raises(PagedKvError):
            PagedKvCacheManager.load(path)


def test_a_prompt_cache_larger_than_the_target_is_refused_before_its_tensors_are_read(path, monkeypatch):
    import pagedkv_core.manager.persistence as persistence

    def unexpected(*args):
        raise AssertionError("tensors read before the fit was checked")

    monkeypatch.setattr(persistence, "read_tensors", unexpected)
    small = PagedKvCacheManager(NumpyStorage(make_config(num_blocks=2, num_host_blocks=1)))
    with pytest.raises(IncompatibleCache, match="4 blocks"):
        small.load_prompt_cache(path)
    small.check_invariants()


def test_load_caps_memory_by_max_bytes(path):
    with pytest.raises(IncompatibleCache, match="max_bytes"):
        PagedKvCacheManager.load(path, max_bytes=10_000)
    assert PagedKvCacheManager.load(path, max_bytes=10**6).stats().used_blocks == 4


def test_version_1_files_still_load(path):
    def to_v1(record):
        record["format_version"] = 1
        for s in record["sequences"]:
            del s["state"]
    rewrite(path, to_v1)
    assert sorted(PagedKvCacheManager.load(path).request_ids()) == ["a", "a-beam", "b"]


# -- HMAC ----------------------------------------------------------------------------------------


def test_a_signed_file_loads_with_its_key_and_without_one(tmp_path):
    m = source()
    path = tmp_path / "signed.safetensors"
    m.save(path, hmac_key=KEY)
    for loaded in (PagedKvCacheManager.load(path, hmac_key=KEY), PagedKvCacheManager.load(path)):
        for rid in m.request_ids():
            for x, y in zip(kv_of(m, rid), kv_of(loaded, rid)):
                np.testing.assert_array_equal(x, y)
    assert target().load_prompt_cache(path, hmac_key=bytearray(KEY)) == 2


@pytest.mark.parametrize("how", ["unsigned", "other-key", "edited-after-signing", "signature-not-ascii",
                                 "signature-removed"])
def test_a_file_not_signed_with_the_key_is_refused(tmp_path, how):
    path = tmp_path / "c.safetensors"
    source().save(path, hmac_key=None if how == "unsigned" else b"someone else's key" if how == "other-key" else KEY)
    if how == "edited-after-signing":  # the attacker recomputes the checksum but cannot sign
        rewrite(path, put(*S0, "priority", 99))
    elif how == "signature-not-ascii":
        rewrite_header(path, put("__metadata__", "pagedkv_hmac", "\u00e9" * 64))
    elif how == "signature-removed":
        rewrite_header(path, drop("__metadata__", "pagedkv_hmac"))
    assert_refused(path, UntrustedCacheFile, hmac_key=KEY)


@pytest.mark.parametrize("key", ["text", b"", 5], ids=["str", "empty", "int"])
def test_bad_keys_are_refused_before_anything_happens(tmp_path, template, key):
    m = source()
    with pytest.raises(InvalidArgument):
        m.save(tmp_path / "new.safetensors", hmac_key=key)
    assert not list(tmp_path.iterdir())
    path = tmp_path / "c.safetensors"
    path.write_bytes(template)
    with pytest.raises(InvalidArgument):
        PagedKvCacheManager.load(path, hmac_key=key)
    with pytest.raises(InvalidArgument):
        target().load_prompt_cache(path, hmac_key=key)


# -- atomic saves --------------------------------------------------------------------------------


def test_the_next_save_removes_what_a_killed_save_left(tmp_path):
    leftovers = [tmp_path / ".cache.safetensors.0123456789abcdef.tmp", tmp_path / "cache.safetensors.tmp"]
    for p in leftovers:
        p.write_bytes(b"half a file")
    unrelated = tmp_path / ".other.safetensors.0123456789abcdef.tmp"
    unrelated.write_bytes(b"not ours")
    source().save(tmp_path / "cache.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == [unrelated.name, "cache.safetensors"]
    PagedKvCacheManager.load(tmp_path / "cache.safetensors").check_invariants()


def test_a_save_in_progress_keeps_its_temporary_file(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    live = tmp_path / ".cache.safetensors.fedcba9876543210.tmp"
    with open(live, "wb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # as a concurrent save holds it
        source().save(tmp_path / "cache.safetensors")
        assert live.exists()


def test_a_failed_save_leaves_no_temporary_and_keeps_the_old_file(tmp_path, template, monkeypatch):
    path = tmp_path / "cache.safetensors"
    path.write_bytes(template)

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        source().save(path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["cache.safetensors"] and path.read_bytes() == template


# -- what a round trip keeps ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_swapped_out_sequences_round_trip_bit_exact(tmp_path, dtype):
    m = source(dtype=dtype)
    m.swap_out("b")
    path = tmp_path / "c.safetensors"
    m.save(path)
    loaded = PagedKvCacheManager.load(path)
    loaded.check_invariants()
    assert loaded.get_handle("b").state.value == "swapped" and loaded.stats().host_blocks_used == 3
    mine, theirs = m.sequences.find("b").host.to_numpy(), loaded.sequences.find("b").host.to_numpy()
    for x, y in ((mine.k, theirs.k), (mine.v, theirs.v), (mine.k_scale, theirs.k_scale)):
        np.testing.assert_array_equal(x, y)
    for manager in (m, loaded):
        manager.swap_in("b")
    for rid in m.request_ids():
        for x, y in zip(kv_of(m, rid), kv_of(loaded, rid)):
            np.testing.assert_array_equal(x, y, err_msg=rid)
    assert loaded.sequences.find("b").hashes == m.sequences.find("b").hashes and len(m.sequences.find("b").hashes) == 2


def test_compressed_sequences_round_trip_as_stored(tmp_path):
    m = source()
    m.compress_cache("b")
    m.save(tmp_path / "c.safetensors")
    loaded = PagedKvCacheManager.load(tmp_path / "c.safetensors")
    loaded.check_invariants()
    assert loaded.compression_stats().compressed_caches == 1
    mine, theirs = m.sequences.find("b").host, loaded.sequences.find("b").host
    assert theirs.k.dtype == np.int8
    for x, y in ((mine.k, theirs.k), (mine.v, theirs.v), (mine.k_scale, theirs.k_scale)):
        np.testing.assert_array_equal(x, y)
    for manager in (m, loaded):
        manager.swap_in("b")
    for x, y in zip(kv_of(m, "b"), kv_of(loaded, "b")):
        np.testing.assert_array_equal(x, y)
    assert target().load_prompt_cache(tmp_path / "c.safetensors") == 2  # only running blocks join


@pytest.mark.parametrize("prefix", [True, False], ids=["prefix-caching", "no-prefix-caching"])
def test_a_forks_cached_token_count_survives(tmp_path, prefix):
    m = source(prefix_cache=PrefixCacheConfig() if prefix else None)
    assert m.get_handle("a-beam").num_cached_tokens == 10
    m.save(tmp_path / "c.safetensors")
    loaded = PagedKvCacheManager.load(tmp_path / "c.safetensors")
    assert {r: loaded.get_handle(r).num_cached_tokens for r in loaded.request_ids()} == \
        {r: m.get_handle(r).num_cached_tokens for r in m.request_ids()}


def test_a_trimmed_sequence_keeps_its_counts(tmp_path):
    m = PagedKvCacheManager(NumpyStorage(make_config()))
    m.allocate(request("long", tokens=range(20)))
    m.allocate(request("hit", tokens=tuple(range(16)) + (99,)))  # 16 tokens from the cache
    fill(m, ["long", "hit"], [20, 1])
    m.trim_window("hit", SlidingWindowPolicy(4, window_tokens=4))  # 12 tokens cut: cached 16 > 5 left
    m.save(tmp_path / "c.safetensors")
    loaded = PagedKvCacheManager.load(tmp_path / "c.safetensors")
    for rid in ("long", "hit"):
        a, b = m.get_handle(rid), loaded.get_handle(rid)
        assert (a.num_tokens, a.num_cached_tokens, a.position_offset) == (b.num_tokens, b.num_cached_tokens,
                                                                         b.position_offset)
        for x, y in zip(kv_of(m, rid), kv_of(loaded, rid)):
            np.testing.assert_array_equal(x, y)


def test_a_save_after_prefix_caching_was_switched_off_loads(tmp_path):
    m = source()
    m.enable_prefix_caching(PrefixCacheConfig(enabled=False))
    m.save(tmp_path / "c.safetensors")
    loaded = PagedKvCacheManager.load(tmp_path / "c.safetensors")
    assert loaded.prefix_config is None and len(loaded) == 3


def test_an_empty_float16_manager_round_trips(tmp_path):
    m = PagedKvCacheManager(NumpyStorage(make_config(dtype="float16")))
    assert m.save(tmp_path / "c.safetensors") == 0
    assert len(PagedKvCacheManager.load(tmp_path / "c.safetensors")) == 0


def test_a_request_id_named_twice_is_refused(tmp_path):
    with pytest.raises(InvalidArgument):
        source().save(tmp_path / "c.safetensors", sequences=["a", "a"])
    assert not list(tmp_path.iterdir())
