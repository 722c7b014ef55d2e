"""The manager state machine again, with a remote tier shared by a succession of instances.

Every rule of :mod:`test_state_machine` still runs, and its invariants still
hold: in particular every prefix position an admission reports as cached,
whether it came from the local cache or was loaded from the tier, must hold
exactly the bytes the shadow expects. Two rules are added: a new instance
(an empty manager on the same store, so later admissions are served by the
tier) and damage to a stored value (which must only ever cost hits).
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule
from test_state_machine import CONFIG, ManagerMachine

from pagedkv_core import PagedKvCacheManager
from pagedkv_core.remote import BlockTier, LayoutFingerprint, MemoryStore
from pagedkv_numpy.storage import NumpyStorage


class RemoteManagerMachine(ManagerMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = MemoryStore()
        self._attach()

    def _attach(self) -> None:
        tier = BlockTier(self.store, LayoutFingerprint.for_manager(self.m, "state-machine"))
        self.m.attach_remote(tier)

    def _write_new(self, rid: str, first: int) -> None:
        super()._write_new(rid, first)
        self.m.remote.commit()  # the K/V just written may now be shared
        assert self.m.remote.flush(10)  # deterministic: the next rule sees the writes

    def _blocks(self) -> list[bytes]:
        return sorted(k for k in self.store.raw() if not k.endswith(b":layout"))

    @rule()
    def new_instance(self):
        """Another process takes over: nothing local, the tier keeps what was shared."""
        self.m.remote.close()
        self.m = PagedKvCacheManager(NumpyStorage(CONFIG))
        self.events = []
        self.m.subscribe(self.events.append)
        self.history, self.expected = {}, {}
        self._attach()

    @precondition(lambda self: self._blocks())
    @rule(data=st.data(), how=st.sampled_from(["flip", "swap", "truncate"]))
    def damage(self, data, how):
        keys = self._blocks()
        key = data.draw(st.sampled_from(keys))
        value = bytearray(self.store.raw()[key])
        if len(value) < 2:  # already cut to nothing worth damaging
            return
        if how == "flip":
            value[data.draw(st.integers(0, len(value) - 1))] ^= data.draw(st.integers(1, 255))
        elif how == "swap":
            value = bytearray(self.store.raw()[data.draw(st.sampled_from(keys))])
        else:
            del value[data.draw(st.integers(1, len(value) - 1)):]
        self.store.put_many([(key, bytes(value))])

    def teardown(self):
        self.m.remote.close()


RemoteManagerMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestRemoteManagerMachine = RemoteManagerMachine.TestCase
