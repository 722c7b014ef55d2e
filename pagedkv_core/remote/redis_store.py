"""Redis and Valkey as a :class:`~pagedkv_core.remote.tier.KeyValueStore`, through redis-py.

Install with ``pip install "pagedkv[redis]"``. redis-py is imported when a
store is built, so the core imports without it.

Every operation is one round trip: a probe is one small Lua script that
walks the chain's keys with ``EXISTS`` on the server and stops at the first
missing one (a non-transactional pipeline of ``EXISTS`` where scripting is
disabled), reads are one ``MGET``, writes a pipeline of ``SET ... PX``. Timeouts are short and redis-py's own retries are off: a slow or
dead server must turn into a quick miss, not a stalled admission.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..errors import RemoteTierError

__all__ = ["RedisStore"]

_T = TypeVar("_T")


_COUNT_LEADING = """
for i, key in ipairs(KEYS) do
    if redis.call('EXISTS', key) == 0 then return i - 1 end
end
return #KEYS
"""


class RedisStore:
    """A key-value store on a Redis or Valkey server.

    ``url`` is a redis-py URL (``redis://host:port/db``, ``unix:///path``);
    ``client`` may be given instead (an existing ``redis.Redis``).
    """

    def __init__(self, url: str | None = None, *, client: Any = None, socket_timeout: float = 0.5,
                 connect_timeout: float = 0.5, delete_batch: int = 1000) -> None:
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as exc:
            raise RemoteTierError(f"redis-py is not installed ({exc}); pip install 'pagedkv[redis]'") from None
        if (url is None) == (client is None):
            raise RemoteTierError("give exactly one of url and client")
        self._errors = (redis.exceptions.RedisError, OSError)
        if url is not None:  # exactly one of url and client was given
            try:
                client = redis.Redis.from_url(
                    url, socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout,
                    retry=Retry(NoBackoff(), 0), retry_on_timeout=False, health_check_interval=0)
            except (ValueError, TypeError) as exc:  # redis-py's parse of a malformed URL
                raise RemoteTierError(f"bad Redis/Valkey URL {url!r}: {exc} "
                                      "(expected redis://host:port/db, rediss://... or unix:///path)") from None
        self.client = client
        self.delete_batch = delete_batch
        self._script = self.client.register_script(_COUNT_LEADING)
        self._scripting = True  # until the server refuses scripts (disabled, or no permission)
        self._script_errors = (redis.exceptions.ResponseError, redis.exceptions.NoPermissionError)

    def _call(self, operation: Callable[..., _T], *args: Any) -> _T:
        """``operation(*args)``, with any client or socket error turned into :class:`RemoteTierError`."""
        try:
            return operation(*args)
        except self._errors as exc:
            raise RemoteTierError(f"{type(exc).__name__}: {exc}") from None

    def ping(self) -> bool:
        return bool(self._call(self.client.ping))

    def count_leading(self, keys: Sequence[bytes]) -> int:
        if not keys:
            return 0
        if self._scripting:
            try:
                return int(self._script(keys=list(keys)))
            except self._script_errors:  # scripting disabled or not permitted: pipeline from now on
                self._scripting = False
            except self._errors as exc:
                raise RemoteTierError(f"{type(exc).__name__}: {exc}") from None
        found = self.exists_many(keys)
        return next((i for i, present in enumerate(found) if not present), len(found))

    def exists_many(self, keys: Sequence[bytes]) -> list[bool]:
        """One pipelined ``EXISTS`` per key (the probe where scripting is off)."""
        def run() -> list[bool]:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(key)
            return [bool(n) for n in pipe.execute()]

        return self._call(run) if keys else []

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return list(self._call(self.client.mget, list(keys))) if keys else []

    def put_many(self, items: Sequence[tuple[bytes, bytes]], ttl_seconds: float | None = None) -> None:
        px = None if ttl_seconds is None else max(1, int(ttl_seconds * 1000))

        def run() -> None:
            pipe = self.client.pipeline(transaction=False)
            for key, value in items:
                pipe.set(key, value, px=px)
            pipe.execute()

        if items:
            self._call(run)

    def put_if_absent(self, key: bytes, value: bytes) -> None:
        self._call(lambda: self.client.set(key, value, nx=True))

    def delete_matching(self, pattern: bytes) -> int:
        def run() -> int:
            deleted, batch = 0, []
            for key in self.client.scan_iter(match=pattern, count=self.delete_batch):
                batch.append(key)
                if len(batch) >= self.delete_batch:
                    deleted += self.client.unlink(*batch)
                    batch = []
            if batch:
                deleted += self.client.unlink(*batch)
            return deleted

        return self._call(run)

    def close(self) -> None:
        self._call(self.client.close)
