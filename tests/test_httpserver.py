"""Tests for httpserver.py: the hardened gevent server, in front of a WSGI app that is not ctrl-exec.

The server is a real child process (`python -c` with gevent patched first, as the entry
points do) serving a tiny WSGI application on a free loopback port, with short deadlines
so slow clients can be shown without long waits. Every exchange is over a real socket.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from apitest_support import http_call, read_http_response
from fleet import free_port, read_log, stop_process, wait_logged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SERVER_CODE = r"""
from gevent import monkey; monkey.patch_all()
import sys, time
sys.path.insert(0, sys.argv[1])
import gevent
import httpserver

httpserver.REQUEST_HEAD_DEADLINE_S = 1.0
httpserver.REQUEST_BODY_DEADLINE_S = 1.0
httpserver.DRAIN_DEADLINE_S = 0.5
httpserver.KEEPALIVE_IDLE_S = 1.0

def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/body":
        try:
            data = httpserver.read_body(environ, 1000)
        except httpserver.TooLarge:
            start_response("413 Payload Too Large", [("Content-Length", "3")])
            return [b"big"]
        body = str(len(data)).encode()
    elif path == "/slow":
        gevent.sleep(1.5)
        body = b"slow done"
    else:
        body = b"hello"
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]

def log(level, action, **fields):
    sys.stderr.write("ACTION=%s %s\n" % (action, " ".join("%s=%s" % kv for kv in fields.items())))
    sys.stderr.flush()

server = httpserver.open_server(app, "127.0.0.1", int(sys.argv[2]), pool_size=16,
                                log_action=log, log_prefix="test-")
log("info", "ready")
httpserver.serve_until_signalled(server, grace_s=5.0)
log("info", "stopped")
"""


@pytest.fixture
def server(tmp_path):
    """(port, proc, log path) of a running httpserver child; stopped afterwards."""
    port = free_port()
    log_path = str(tmp_path / "server.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", SERVER_CODE, ROOT, str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_logged(proc, log_path, b"ACTION=ready", "httpserver child")
        yield port, proc, log_path
    finally:
        stop_process(proc, 10)


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_unparseable_request_gets_a_json_400_and_a_close(server):
    port, _, _ = server
    with _connect(port) as sock:
        sock.sendall(b"NOT A REQUEST\r\n\r\n")
        data = _read_until_closed(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"Content-Type: application/json" in head and b"Connection: close" in head
    assert json.loads(body) == {"ok": False, "error": "bad request",
                                "detail": "the request could not be parsed"}


def test_keep_alive_only_when_the_client_asks(server):
    port, _, _ = server
    status, headers, _ = http_call(port, "GET", "/")
    assert status == 200 and headers["connection"] == "close"
    with _connect(port) as sock:
        for _ in range(3):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
            status, headers, body = read_http_response(sock)
            assert (status, body, headers["connection"]) == (200, b"hello", "keep-alive")
        # An idle kept connection is closed after KEEPALIVE_IDLE_S.
        started = time.monotonic()
        assert _read_until_closed(sock) == b""
        assert time.monotonic() - started < 5


def test_a_head_sent_too_slowly_is_cut_off_and_logged(server):
    port, _, log_path = server
    with _connect(port) as sock:
        sock.sendall(b"GET / HT")
        started = time.monotonic()
        assert _read_until_closed(sock) == b""
        assert time.monotonic() - started < 5
    assert "ACTION=test-slow-client" in read_log(log_path)
    status, _, body = http_call(port, "GET", "/")
    assert (status, body) == (200, b"hello")


def test_a_body_over_the_limit_is_refused_and_the_drain_is_bounded(server):
    port, _, _ = server
    with _connect(port) as sock:
        # Declares 10 MB and sends only a little: the 413 comes at once, the
        # connection is closed after the bounded drain instead of waiting for the rest.
        sock.sendall(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n"
                     + b"x" * 5000)
        started = time.monotonic()
        status, headers, body = read_http_response(sock)
        assert (status, body, headers["connection"]) == (413, b"big", "close")
        assert _read_until_closed(sock) == b""
        assert time.monotonic() - started < 5
    status, _, body = http_call(port, "POST", "/body", raw=b"y" * 10)
    assert (status, body) == (200, b"10")


def test_websocket_upgrade_headers_alone_do_not_upgrade(server):
    port, _, _ = server
    status, headers, body = http_call(port, "GET", "/", headers={
        "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert (status, body) == (200, b"hello")


def test_graceful_stop_finishes_requests_in_flight(server):
    port, proc, log_path = server
    with _connect(port) as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        status, _, body = read_http_response(sock)
    assert (status, body) == (200, b"slow done")
    assert proc.wait(10) == 0
    assert "ACTION=stopped" in read_log(log_path)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
