"""Support for the reliability suite (tests/test_reliability_*.py); holds no tests itself.

Owns: a real `python ctrlexec_api.py --config …` child process with bounded
waits, small HTTP/raw-socket clients that never block past a deadline, and the
fleet builders the reliability tests share. Everything is real: certificates
from pki.py, agents from tests/fleet.py on 127.0.0.x, scripts on disk.

Never does: mock TLS or an agent, bind a non-loopback address, wait without a
timeout, or leave a process running after its fixture ends.
"""

from __future__ import annotations

__all__ = [
    "ROOT",
    "WAIT_S",
    "ApiProc",
    "Background",
    "PairingProc",
    "RawResult",
    "build_fleet",
    "free_port",
    "http_call",
    "raw_exchange",
    "wait_for",
]

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

from apitest_support import ApiServer
from fleet import Fleet, free_port, wait_for  # noqa: F401 (re-exported to the reliability tests)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Upper bound of any single wait in the reliability tests (never a timing assertion).
WAIT_S = 30.0


class Background:
    """Run fn() in a thread (a greenlet under the tests' gevent patching); join with a bound.

    Attributes after join(): result, error (the exception fn raised, or None), elapsed (s).
    """

    def __init__(self, fn) -> None:
        self.result = None
        self.error = None
        self.started = time.monotonic()
        self.elapsed = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn) -> None:
        try:
            self.result = fn()
        except Exception as exc:  # handed to the test through .error / join(raise_error=True)
            self.error = exc
        finally:
            self.elapsed = time.monotonic() - self.started

    def join(self, timeout_s: float, *, raise_error: bool = False):
        """Wait at most timeout_s (AssertionError if fn is still running); return fn's result."""
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise AssertionError("background call still running after %.0fs" % timeout_s)
        if raise_error and self.error is not None:
            raise self.error
        return self.result


def build_fleet(root: str, names: list, scripts: dict, *, conf: dict | None = None,
                agent_conf: dict | None = None) -> Fleet:
    """A control host in root plus one started agent per name, each with the same scripts."""
    fleet = Fleet(root, **(conf or {}))
    try:
        for name in names:
            fleet.add_agent(name, scripts=scripts, conf_extra=agent_conf)
    except BaseException:
        fleet.stop_all()
        raise
    return fleet


class ApiProc(ApiServer):
    """The API for a reliability fleet: ApiProc.for_fleet(fleet, log_path, **conf).start()."""

    def call(self, method: str, path: str, body=None, *, raw: bytes | None = None,
             headers: dict | None = None, timeout: float = WAIT_S) -> tuple:
        """One HTTP exchange; returns (status, headers, parsed JSON or NDJSON list or bytes)."""
        return http_call(self.port, method, path, body, raw=raw, headers=headers, timeout=timeout)

    def health_ok(self) -> bool:
        try:
            status, _, body = self.call("GET", "/health", timeout=5)
        except (OSError, http.client.HTTPException):
            return False
        return status == 200 and isinstance(body, dict) and body.get("ok") is True


PAIRING_MAIN = """
from gevent import monkey; monkey.patch_all()
import sys
sys.path.insert(0, %(root)r)
import config, pki
if %(io)r:
    pki.PAIRING_IO_TIMEOUT_S = %(io)r
cfg = config.load(%(conf)r)
sys.exit(pki.run_pairing_mode(cfg, port=%(port)d, bind="127.0.0.1", timeout=600,
                              interactive=False))
"""


class PairingProc:
    """The pairing listener in its own gevent-patched process, as `ctrlexec.py pairing-mode`
    starts it (pki.run_pairing_mode), bound to 127.0.0.1:port. io_timeout_s, when given,
    lowers pki.PAIRING_IO_TIMEOUT_S in that process (so slow-client cases fit in CI)."""

    def __init__(self, fleet: Fleet, log_path: str, *, io_timeout_s: float | None = None) -> None:
        self.fleet = fleet
        self.log_path = log_path
        self.port = free_port()
        self.io_timeout_s = io_timeout_s
        self.proc: subprocess.Popen | None = None

    def start(self) -> "PairingProc":
        code = PAIRING_MAIN % {"root": ROOT, "io": self.io_timeout_s,
                               "conf": self.fleet.conf_path, "port": self.port}
        env = dict(os.environ, CTRL_EXEC_LOG="stderr")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
        wait_for(lambda: self.proc.poll() is not None or b"pairing-mode-start" in self._read(),
                 "the pairing listener to start")
        assert self.proc.poll() is None, self.log()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(WAIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log(self) -> str:
        return self._read().decode("utf-8", "replace")

    def _read(self) -> bytes:
        try:
            with open(self.log_path, "rb") as fh:
                return fh.read()
        except OSError:
            return b""


def http_call(port: int, method: str, path: str, body=None, *, raw: bytes | None = None,
              headers: dict | None = None, timeout: float = WAIT_S,
              address: str = "127.0.0.1") -> tuple:
    """One HTTP/1.1 exchange with a deadline on every socket operation."""
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        hdrs = dict(headers or {})
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        payload = resp.read()
        got = {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()
    ctype = got.get("content-type", "")
    if ctype.startswith("application/json") and payload:
        return resp.status, got, json.loads(payload)
    if ctype.startswith("application/x-ndjson"):
        return resp.status, got, [json.loads(l) for l in payload.splitlines() if l.strip()]
    return resp.status, got, payload


class RawResult:
    """What a raw exchange got back: data (bytes), closed (peer closed), status (int or None)."""

    def __init__(self, data: bytes, closed: bool, error: str = "") -> None:
        self.data = data
        self.closed = closed
        self.error = error
        self.status = None
        first = data.split(b"\r\n", 1)[0].split()
        if len(first) >= 2 and first[0].startswith(b"HTTP/") and first[1].isdigit():
            self.status = int(first[1])

    def json(self):
        head, sep, body = self.data.partition(b"\r\n\r\n")
        return json.loads(body) if sep and body.strip() else None

    def __repr__(self) -> str:
        return "<RawResult status=%s closed=%s error=%r data=%r>" % (
            self.status, self.closed, self.error, self.data[:200])


def raw_exchange(address: str, port: int, chunks, *, tls: ssl.SSLContext | None = None,
                 timeout: float = 10.0, gap_s: float = 0.0, source: str | None = None,
                 read_limit: int = 1 << 20) -> RawResult:
    """Send chunks (bytes or list of bytes) raw, optionally over TLS, then read until close.

    Every step is bounded by `timeout` overall. A handshake refusal, a reset or
    a closed connection is a result (closed=True, error=...), never an exception.
    """
    if isinstance(chunks, bytes):
        chunks = [chunks]
    end = time.monotonic() + timeout
    data = bytearray()
    closed = False
    error = ""
    sock = None
    try:
        sock = socket.create_connection((address, port), timeout=timeout,
                                        source_address=(source, 0) if source else None)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_side=False)
        for i, chunk in enumerate(chunks):
            if i and gap_s:
                time.sleep(gap_s)
            sock.settimeout(max(0.05, end - time.monotonic()))
            try:
                sock.sendall(chunk)
            except (ssl.SSLError, OSError) as exc:
                # the peer answered and closed while we were still sending: read its answer
                error = "send failed: %s: %s" % (type(exc).__name__, exc)
                break
        while len(data) < read_limit:
            left = end - time.monotonic()
            if left <= 0:
                error = "still open at the deadline"
                break
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                closed = True
                break
            data += chunk
            if _complete_response(bytes(data)):
                # A whole Content-Length answer: look briefly for the close, do not wait for it
                # (pywsgi keeps reading after a 4xx so that closing does not reset the answer).
                sock.settimeout(max(0.05, min(0.5, end - time.monotonic())))
                try:
                    closed = not sock.recv(1)
                except (socket.timeout, ssl.SSLError, OSError):
                    pass
                break
    except socket.timeout:
        error = "still open at the deadline"
    except (ssl.SSLError, OSError) as exc:
        closed = True
        error = "%s: %s" % (type(exc).__name__, exc)
    finally:
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
    return RawResult(bytes(data), closed, error)


def _complete_response(data: bytes) -> bool:
    """True when data holds a status line, headers and the whole Content-Length body."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/"):
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return len(body) >= int(value.strip())
    return False
