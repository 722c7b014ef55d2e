"""A real redis-server (or valkey-server) on a free loopback port, for the remote-tier tests.

CI installs Debian's ``redis-server``; elsewhere the tests skip, naming the
missing binary. Each server keeps nothing on disk and dies with its test.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest


def server_binary() -> str | None:
    return shutil.which("redis-server") or shutil.which("valkey-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One server process; ``url`` for clients, ``stop()`` to kill it mid-run."""

    def __init__(self, workdir) -> None:
        binary = server_binary()
        if binary is None:
            if os.environ.get("CI"):
                pytest.fail("redis-server is not installed; .ci/run installs Debian's redis-server package")
            pytest.skip("neither redis-server nor valkey-server is installed (Debian: apt-get install redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir), "--protected-mode", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                err = self.process.stderr.read().decode() if self.process.poll() is not None else "timed out"
                self.stop()
                raise RuntimeError(f"redis-server did not start: {err}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
