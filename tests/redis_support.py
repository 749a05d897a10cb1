"""A real redis-server on a free loopback port, for the Redis state backend's tests.

`RedisServer(folder)` starts `redis-server` (the Debian package) with no persistence,
bound to 127.0.0.1 only; `stop()` / `kill()` / `start()` again on the same port let a
test take the backend away and bring it back. Outside CI a missing redis-server skips
the test with the reason; under CI=true it fails (CI installs it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest

from fleet import free_port, stop_process, wait_for

#: How long redis-server gets to answer PING after it was started.
REDIS_START_S = 20.0


def redis_server_binary() -> str:
    """The redis-server (or valkey-server) path; skip (fail under CI) when there is none."""
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("redis-server is not installed, but CI must run the Redis tests "
                    "(.ci/run installs the redis-server package)")
    pytest.skip("redis-server is not installed (Debian package redis-server)")
    return ""


class RedisServer:
    """redis-server on 127.0.0.1:<free port>, state in ``folder``; url = redis://.../0."""

    def __init__(self, folder: str, *, password: str | None = None) -> None:
        self.binary = redis_server_binary()
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(folder, "redis.log")

    @property
    def url(self) -> str:
        auth = ":%s@" % self.password if self.password else ""
        return "redis://%s127.0.0.1:%d/0" % (auth, self.port)

    def start(self) -> "RedisServer":
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", self.folder, "--protected-mode", "yes",
               "--logfile", self.log_path, "--daemonize", "no"]
        if self.password:
            cmd += ["--requirepass", self.password]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.answers, "redis-server on port %d" % self.port, REDIS_START_S)
        return self

    def answers(self) -> bool:
        """True when the server answers PING (with the password, if any)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                if self.password:
                    sock.sendall(b"AUTH %s\r\n" % self.password.encode())
                    if not sock.recv(64).startswith(b"+OK"):
                        return False
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """One raw command (RESP inline); the first reply line, for checks in tests."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            if self.password:
                sock.sendall(b"AUTH %s\r\n" % self.password.encode())
                sock.recv(64)
            parts = [arg.encode() for arg in args]
            sock.sendall(b"*%d\r\n" % len(parts)
                         + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
            return sock.recv(65536)

    def stop(self) -> None:
        stop_process(self.proc, 10)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None
