"""One serving instance in its own process: admit a prompt with a Redis tier attached, print what happened.

``python remote_worker.py URL REQUEST_ID SALT TOKENS... > result.json``; the
test compares the printed outputs of two processes.
"""

import json
import sys

from remote_helpers import ToyModel, config, manager, serve

from pagedkv_core.remote.redis_store import RedisStore


def main() -> None:
    url, request_id, salt, *tokens = sys.argv[1:]
    cfg = config("float16")
    m = manager(cfg, RedisStore(url))
    cached, out = serve(m, ToyModel(cfg), request_id, [int(t) for t in tokens], salt=salt or None)
    assert m.remote.flush(10)
    stats = m.remote.stats()
    m.remote.close()
    json.dump({"cached": cached, "output": out.tolist(), "put_blocks": stats.put_blocks,
               "hit_blocks": stats.hit_blocks}, sys.stdout)


if __name__ == "__main__":
    main()
