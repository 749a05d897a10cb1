"""Support for the reliability suite (tests/test_reliability_*.py); holds no tests itself.

Owns: the pairing listener as a child process, a bounded background call, and
a raw-socket client that never blocks past a deadline. The API process is
apitest_support.ApiServer and the fleet is tests/fleet.py's Fleet, as in every
other suite. Everything is real: certificates from pki.py, agents on
127.0.0.x, scripts on disk.

Never does: mock TLS or an agent, bind a non-loopback address, wait without a
timeout, or leave a process running after its fixture ends.
"""

from __future__ import annotations

__all__ = [
    "ROOT",
    "WAIT_S",
    "Background",
    "PairingProc",
    "RawResult",
    "free_port",
    "raw_exchange",
    "wait_for",
]

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time

from fleet import Fleet, free_port, read_log, stop_process, wait_logged
from fleet import wait_for  # noqa: F401 (re-exported to the reliability tests, as free_port)

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


PAIRING_MAIN = """
from gevent import monkey; monkey.patch_all()
import sys
sys.path.insert(0, %(root)r)
import config, pairing
if %(io)r:
    pairing.PAIRING_IO_TIMEOUT_S = %(io)r
cfg = config.load(%(conf)r)
sys.exit(pairing.run_pairing_mode(cfg, port=%(port)d, bind="127.0.0.1", timeout=600,
                                  interactive=False))
"""


class PairingProc:
    """The pairing listener in its own gevent-patched process, as `ctrlexec.py pairing-mode`
    starts it (pairing.run_pairing_mode), bound to 127.0.0.1:port. io_timeout_s, when given,
    lowers pairing.PAIRING_IO_TIMEOUT_S in that process (so slow-client cases fit in CI)."""

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
            offset = log.tell()
            self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
        wait_logged(self.proc, self.log_path, b"pairing-mode-start", "the pairing listener",
                    offset=offset, timeout_s=WAIT_S)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        stop_process(self.proc, WAIT_S)

    def log(self) -> str:
        return read_log(self.log_path)


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
