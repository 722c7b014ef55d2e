"""The remote tier on a real redis-server over loopback: two processes, tenants, damage, a dying server."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from remote_helpers import ToyModel, config, manager, serve

from pagedkv_core import AllocationRequest
from pagedkv_core.errors import RemoteTierError
from pagedkv_core.remote import LayoutFingerprint

pytest.importorskip("redis", reason="redis-py is not installed: pip install 'pagedkv[redis]'")

from pagedkv_core.remote.redis_store import RedisStore  # noqa: E402

PROMPT = list(range(100, 130))
WORKER = Path(__file__).with_name("remote_worker.py")



def run_worker(url: str, request_id: str, tokens, salt: str = "") -> dict:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(WORKER), url, request_id, salt, *map(str, tokens)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_two_processes_share_a_prefix_and_compute_the_same_output(redis_server):
    first = run_worker(redis_server.url, "first", PROMPT, salt="tenant-a")
    assert first["cached"] == 0 and first["put_blocks"] == 7
    second = run_worker(redis_server.url, "second", PROMPT, salt="tenant-a")
    assert second["cached"] == 28 and second["hit_blocks"] == 7
    assert np.array_equal(np.array(second["output"]), np.array(first["output"]))
    stranger = run_worker(redis_server.url, "third", PROMPT, salt="tenant-b")
    assert stranger["cached"] == 0 and stranger["hit_blocks"] == 0
    keys = RedisStore(redis_server.url).client.keys(b"pkv1:*")
    assert not any(b"tenant" in k for k in keys)
    assert len([k for k in keys if not k.endswith(b":layout")]) == 14


def published(redis_server, cfg=None, tokens=PROMPT, **kw):
    cfg = cfg or config("float16")
    m = manager(cfg, RedisStore(redis_server.url), **kw)
    _, out = serve(m, ToyModel(cfg), "first", tokens)
    assert m.remote.flush(10)
    m.remote.close()
    return out


def chain_keys(m, tokens=PROMPT, salt=None):
    tier = m.remote.tier
    return tier.keys(tier.tagger.for_salt(salt), m.hasher.chain(tokens, m.hasher.root(salt)))


def test_deleted_and_corrupted_keys_shorten_the_hit(redis_server):
    expected = published(redis_server)
    cfg = config("float16")
    m = manager(cfg, RedisStore(redis_server.url))
    client = RedisStore(redis_server.url).client
    keys = chain_keys(m)
    client.delete(keys[5])
    value = bytearray(client.get(keys[2]))
    value[100] ^= 0x40
    client.set(keys[2], bytes(value))
    cached, out = serve(m, ToyModel(cfg), "a", PROMPT)
    assert cached == 8 and m.remote.stats().corrupt_values == 1
    assert np.array_equal(out, expected)


def test_another_fingerprint_is_a_miss_and_the_layout_is_described_on_the_server(redis_server):
    published(redis_server)
    cfg = config("float16")
    other = manager(cfg, RedisStore(redis_server.url), model_id="another-model")
    assert serve(other, ToyModel(cfg), "a", PROMPT)[0] == 0
    client = RedisStore(redis_server.url).client
    layout = LayoutFingerprint.for_manager(other, "toy")
    assert json.loads(client.get(b"pkv1:" + layout.hex.encode() + b":layout")) == json.loads(layout.describe())


def test_ttl_and_drop_tenant(redis_server):
    cfg = config("float16")
    m = manager(cfg, RedisStore(redis_server.url))
    m.remote.tier.ttl_seconds = 1.5
    serve(m, ToyModel(cfg), "short-lived", PROMPT, salt="t1")
    assert m.remote.flush(10)
    m.remote.tier.ttl_seconds = None
    serve(m, ToyModel(cfg), "kept", list(range(300, 330)), salt="t2")
    serve(m, ToyModel(cfg), "kept-too", list(range(600, 630)), salt="t2")
    assert m.remote.flush(10)
    client = RedisStore(redis_server.url).client
    assert 0 < client.pttl(chain_keys(m, salt="t1")[0]) <= 1500
    assert m.remote.tier.drop_tenant("t2") == 14
    time.sleep(1.6)
    assert [k for k in client.keys(b"pkv1:*") if not k.endswith(b":layout")] == []


def test_killing_the_server_mid_run_degrades_to_misses(redis_server):
    cfg = config("float16", num_blocks=128)
    store = RedisStore(redis_server.url, socket_timeout=2.0, connect_timeout=2.0)  # a dead server refuses at once
    m = manager(cfg, store, retry_interval=0.5)
    model = ToyModel(cfg)
    serve(m, model, "a", PROMPT)
    assert m.remote.flush(10) and m.remote.stats().put_blocks == 7
    redis_server.stop()
    rids = ["a"]
    for step in range(40):  # decode and admissions go on; each commit's writes fail or are skipped
        if step % 8 == 0:
            rid = f"new{step}"
            cached, _ = serve(m, model, rid, list(range(1000 + 40 * step, 1030 + 40 * step)))
            assert cached == 0
            rids.append(rid)
        m.append_slots(rids, [step % 1000] * len(rids))
        m.remote.commit()
    assert m.remote.flush(10)
    s = m.remote.stats()
    assert s.errors >= 1 and s.hit_blocks == 0 and s.dropped_blocks > 0
    with pytest.raises(RemoteTierError):
        store.ping()
    m.check_invariants()
    m.allocate(AllocationRequest("after", token_ids=tuple(PROMPT)))  # local prefix cache still serves
    assert m.get_handle("after").num_cached_tokens == 28


def test_redis_store_rejects_bad_construction():
    with pytest.raises(RemoteTierError):
        RedisStore()
    port_with_nothing = RedisStore("redis://127.0.0.1:1/0", connect_timeout=0.2)
    with pytest.raises(RemoteTierError):
        port_with_nothing.count_leading([b"k"])


def test_a_frozen_server_never_blocks_the_step(redis_server):
    """SIGSTOP leaves connections open but unanswered: reads time out into misses, writes wait in the writer."""
    import signal

    cfg = config("float16", num_blocks=128)
    m = manager(cfg, RedisStore(redis_server.url, socket_timeout=1.0, connect_timeout=1.0), retry_interval=0)
    model = ToyModel(cfg)
    serve(m, model, "warm", list(range(700, 710)))  # the connection exists before the freeze
    assert m.remote.flush(10)
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        serve(m, model, "a", PROMPT)  # the probe times out into a miss
        assert m.remote.stats().errors == 1
        m.append_slots(["a"], [1])
        m.append_slots(["a"], [2])
        assert m.remote.commit() == 1  # queued for the writer, which is stuck on the frozen server
        assert m.remote.stats().queued_blocks >= 1
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    assert m.remote.flush(10)
    assert m.remote.stats().hit_blocks == 0 and m.remote.stats().queued_blocks == 0


def test_the_probe_works_where_scripting_is_not_permitted(redis_server):
    published(redis_server)
    admin = RedisStore(redis_server.url).client
    admin.execute_command("ACL", "SETUSER", "noscripts", "on", "nopass", "~*", "+@all", "-@scripting")
    store = RedisStore(redis_server.url.replace("redis://", "redis://noscripts:any@"))
    cfg = config("float16")
    m = manager(cfg, store)
    keys = chain_keys(m)
    scripted = RedisStore(redis_server.url)
    assert scripted.count_leading(keys) == 7 and scripted._scripting  # one Lua round trip
    assert store.count_leading(keys) == 7 and not store._scripting  # fell back to pipelined EXISTS
    assert store.count_leading(keys[:3] + [b"missing"] + keys[3:]) == 3
    assert serve(m, ToyModel(cfg), "a", PROMPT)[0] == 28
