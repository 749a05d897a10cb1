"""Tests for live output: POST /run with "stream": true (NDJSON) and GET /ws/run (WebSocket).

Everything is real and over the wire: a `python ctrlexec_api.py --config …` process on
127.0.0.1 with a free api_port, real agents (`fleet` fixture) on 127.0.0.x, real scripts.
The WebSocket client is a small stdlib one (WsClient below), so nothing but the server
under test speaks gevent-websocket. Timing checks are generous lower bounds only (a
line printed 2 s before the end must reach the client at least 1.5 s before the end).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import socket
import ssl
import struct
import time

import jsonschema
import pytest

import ctrlexec_agent as wire
import pki
import store
from apitest_support import SPEC, ApiServer, read_http_response
from fleet import wait_for

#: Upper bound for any wait in these tests (never a timing assertion).
WAIT_S = 30.0
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

#: Prints a line, sleeps 2 s, prints again.
TICK = "#!/bin/sh\necho first\nsleep 2\necho second\n"
#: Three lines 0.4 s apart on each host, stderr in between.
LINES = "#!/bin/sh\nfor i in 1 2 3; do echo \"line $i\"; echo \"err $i\" >&2; sleep 0.4; done\n"
#: Prints, sleeps, then writes the marker file named by its first argument.
MARKED = "#!/bin/sh\necho started\nsleep 2\necho finished\n: > \"$1\"\n"
#: Invalid UTF-8, then a 1 MiB line without a newline, then more.
HOSTILE = ("#!/bin/sh\nprintf 'ok\\377\\376bad\\n'\n"
           "head -c 1048576 /dev/zero | tr '\\000' 'x'\n"
           "echo tail\necho warn >&2\n")
#: api gate: token "letmein"; run: "letmein" or "run-token", and never script "forbidden".
HOOK = """#!/bin/sh
case "$ENVEXEC_ACTION" in
  api) [ "$ENVEXEC_TOKEN" = "letmein" ] || exit 2 ;;
  run) [ "$ENVEXEC_SCRIPT" = "forbidden" ] && exit 3
       [ "$ENVEXEC_TOKEN" = "letmein" ] || [ "$ENVEXEC_TOKEN" = "run-token" ] || exit 2 ;;
esac
exit 0
"""

STREAM_EVENT = dict(SPEC["components"]["schemas"]["StreamEvent"], components=SPEC["components"])


# ---------------------------------------------------------------------------
# helpers: the API process, an NDJSON reader, a stdlib WebSocket client
# ---------------------------------------------------------------------------


@pytest.fixture
def api(fleet, tmp_path):
    """Start the API for the fleet: api(**ctrl-exec.conf keys) -> ApiServer."""
    started = []

    def start(**conf) -> ApiServer:
        proc = ApiServer.for_fleet(fleet, str(tmp_path / ("api-%d.log" % len(started))), **conf)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


class NdjsonStream:
    """POST /run with "stream": true over HTTP/1.1 (chunked), read line by line with arrival times."""

    def __init__(self, port: int, body: dict, headers=None) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
        body = dict(body, stream=True)
        self.conn.request("POST", "/run", body=json.dumps(body).encode(),
                          headers=dict({"Content-Type": "application/json"}, **(headers or {})))
        self.sock = self.conn.sock              # http.client lets go of it on Connection: close
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.content_type = self.resp.getheader("Content-Type", "")

    def next(self):
        """(arrival time, event) or None at the end of the stream."""
        line = self.resp.readline()
        if not line:
            return None
        return time.monotonic(), json.loads(line)

    def all(self) -> list:
        out = []
        while True:
            item = self.next()
            if item is None:
                return out
            out.append(item)

    def abort(self) -> None:
        """Hang up mid-stream: reset the connection without reading further."""
        sock = self.sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.resp.close()
        self.conn.close()
        sock.close()

    def close(self) -> None:
        self.conn.close()


class WsClient:
    """A minimal RFC 6455 client on the standard library: handshake, text frames, close."""

    def __init__(self, port: int, *, headers=None, path: str = "/ws/run",
                 version: str = "13", ctx: ssl.SSLContext | None = None,
                 kept_alive: bool = False) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        if ctx is not None:
            self.sock = ctx.wrap_socket(self.sock)
        if kept_alive:
            self._health_first()
        key = base64.b64encode(os.urandom(16)).decode()
        lines = ["GET %s HTTP/1.1" % path, "Host: 127.0.0.1:%d" % port, "Upgrade: websocket",
                 "Connection: Upgrade", "Sec-WebSocket-Key: " + key,
                 "Sec-WebSocket-Version: " + version]
        lines += ["%s: %s" % item for item in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.rfile = self.sock.makefile("rb")
        self.status = int(self.rfile.readline().split()[1])
        self.headers = {}
        while True:
            line = self.rfile.readline().decode("latin-1").strip()
            if not line:
                break
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.body = None
        if self.status == 101:
            accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
            assert self.headers["sec-websocket-accept"] == accept
        else:
            self.body = json.loads(self.rfile.read(int(self.headers["content-length"])))

    def _health_first(self) -> None:
        """GET /health with Connection: keep-alive on this connection; the answer must keep it."""
        self.sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Connection: keep-alive\r\n\r\n")
        status, headers, _ = read_http_response(self.sock)
        assert (status, headers["connection"]) == (200, "keep-alive"), headers

    def send(self, message, opcode: int = 0x1) -> None:
        """Send a dict as JSON (or bytes as they are) in one masked frame."""
        payload = message if isinstance(message, bytes) else json.dumps(message).encode()
        mask, size = os.urandom(4), len(payload)
        head = bytes([0x80 | opcode])
        if size < 126:
            head += bytes([0x80 | size])
        elif size < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", size)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", size)
        keystream = (mask * (size // 4 + 1))[:size]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(keystream, "big")).to_bytes(size, "big")
        self.sock.sendall(head + mask + masked)

    def recv(self):
        """(arrival time, next message as JSON) or None after the server's close frame."""
        data = b""
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                raise EOFError("connection closed without a close frame")
            size = head[1] & 0x7F
            if size == 126:
                size = struct.unpack("!H", self.rfile.read(2))[0]
            elif size == 127:
                size = struct.unpack("!Q", self.rfile.read(8))[0]
            payload = self.rfile.read(size)
            opcode = head[0] & 0x0F
            if opcode == 0x8:                       # close: answer it, then hang up
                self.close_code = struct.unpack("!H", payload[:2])[0] if payload else None
                self.send(payload[:2], opcode=0x8)
                self.sock.close()
                return None
            if opcode == 0x9:                       # ping
                self.send(payload, opcode=0xA)
                continue
            data += payload
            if head[0] & 0x80:
                return time.monotonic(), json.loads(data.decode("utf-8"))

    def all(self) -> list:
        out = []
        while True:
            item = self.recv()
            if item is None:
                return out
            out.append(item)

    def abort(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


def ws_run(port: int, body, headers=None) -> list:
    """Open /ws/run, send one run request, return every (time, message) until the close."""
    client = WsClient(port, headers=headers)
    try:
        assert client.status == 101, (client.status, client.body)
        client.send(body)
        return client.all()
    finally:
        client.close()


def ndjson_run(port: int, body, headers=None) -> list:
    stream = NdjsonStream(port, body, headers)
    try:
        assert stream.status == 200
        assert stream.content_type.startswith("application/x-ndjson")
        return stream.all()
    finally:
        stream.close()


TRANSPORTS = {"ndjson": ndjson_run, "websocket": ws_run}


def events_of(timed: list) -> list:
    """The events without their arrival times, each checked against openapi StreamEvent."""
    validator = jsonschema.Draft202012Validator(STREAM_EVENT)
    out = [event for _, event in timed]
    for event in out:
        errors = list(validator.iter_errors(event))
        assert not errors, (errors[0].message, event)
    return out


def comparable(results: list) -> list:
    """Result rows without what differs between two runs (rtt, reqid)."""
    return [{k: v for k, v in row.items() if k not in ("rtt", "reqid")} for row in results]


def output_of(events: list, host: str, kind: str = "stdout") -> str:
    return "".join(e["data"] for e in events if e["event"] == kind and e.get("host") == host)


def check_stream_shape(events: list, hosts: list) -> dict:
    """start first, done last (ok, reqid, results in request order), one exit per host."""
    assert events[0]["event"] == "start"
    assert events[0]["hosts"] == hosts
    reqid = events[0]["reqid"]
    done = events[-1]
    assert done["event"] == "done" and done["ok"] is True and done["reqid"] == reqid
    assert set(done) == {"event", "ok", "reqid", "results"}
    assert [row["host"] for row in done["results"]] == hosts
    exits = [e for e in events if e["event"] == "exit"]
    assert sorted(e["host"] for e in exits) == sorted(hosts)
    for e in exits:
        row = done["results"][hosts.index(e["host"])]
        assert e["exit"] == row["exit"] and e["rtt"] == row["rtt"]
    return done


# ---------------------------------------------------------------------------
# 1. output reaches the client while the script still runs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_first_line_arrives_long_before_the_exit(fleet, api, transport):
    hosts = ["web-01", "web-02", "web-03"]
    for name in hosts:
        fleet.add_agent(name, scripts={"tick": TICK})
    server = api()
    timed = TRANSPORTS[transport](server.port, {"hosts": hosts, "script": "tick"})
    events = events_of(timed)
    done = check_stream_shape(events, hosts)
    for host in hosts:
        first = min(t for t, e in timed if e["event"] == "stdout" and e.get("host") == host)
        exit_at = [t for t, e in timed if e["event"] == "exit" and e["host"] == host][0]
        assert exit_at - first >= 1.5, (host, exit_at - first)
        assert output_of(events, host) == "first\nsecond\n"
    assert [row["exit"] for row in done["results"]] == [0, 0, 0]


# ---------------------------------------------------------------------------
# 2. interleaving, per-host order, done == sync body, stored record
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_interleaved_in_order_and_done_equals_sync_run(fleet, api, transport):
    hosts = ["web-01", "web-02", "web-03", "ghost"]
    for name in hosts[:3]:
        fleet.add_agent(name, scripts={"lines": LINES})
    server = api()
    body = {"hosts": hosts, "script": "lines", "args": ["a b"], "username": "alice",
            "token": "SECRET-TOKEN-XYZ"}
    events = events_of(TRANSPORTS[transport](server.port, body))
    done = check_stream_shape(events, hosts)
    # Per host, lines come in the order printed, and the exit after the host's output.
    for host in hosts[:3]:
        kinds = [(e["event"], e.get("data")) for e in events if e.get("host") == host]
        assert output_of(events, host) == "line 1\nline 2\nline 3\n"
        assert output_of(events, host, "stderr") == "err 1\nerr 2\nerr 3\n"
        assert kinds[-1][0] == "exit"
    # Across hosts, output interleaves as it happens: every host's first line is
    # out before any host's last line.
    position = {id(e): i for i, e in enumerate(events)}
    firsts = [min(position[id(e)] for e in events
                  if e["event"] == "stdout" and e["host"] == h and "line 1" in e["data"])
              for h in hosts[:3]]
    lasts = [max(position[id(e)] for e in events
                 if e["event"] == "stdout" and e["host"] == h and "line 3" in e["data"])
             for h in hosts[:3]]
    assert max(firsts) < min(lasts)
    ghost = done["results"][3]
    assert ghost["exit"] == -1 and ghost["error"] == "unknown agent 'ghost' (not paired)"
    # The done body is what a sync run of the same request returns.
    status, sync = server.request("POST", "/run", dict(body))
    assert status == 200
    assert comparable(done["results"]) == comparable(sync["results"])
    # Stored like a sync run, served by /status, without the token.
    status, record = server.request("GET", "/status/" + done["reqid"])
    assert status == 200
    assert record["results"] == done["results"]
    assert record["complete"] is True and record["mode"] == "sync"
    assert record["hosts"] == hosts and record["script"] == "lines"
    stored = store.Store(fleet.cfg).runs.load(done["reqid"])      # the file: test_store.py
    assert stored is not None and "SECRET-TOKEN-XYZ" not in json.dumps(stored)
    assert "SECRET-TOKEN-XYZ" not in server.log()
    mode = "websocket" if transport == "websocket" else "stream"
    assert "MODE=%s" % mode in server.log()


# ---------------------------------------------------------------------------
# 3. a client that hangs up does not stop the run
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_client_disconnect_mid_stream_run_completes(fleet, api, tmp_path, transport):
    fleet.add_agent("web-01", scripts={"marked": MARKED})
    server = api()
    marker = str(tmp_path / "marker")
    body = {"hosts": ["web-01"], "script": "marked", "args": [marker]}
    if transport == "ndjson":
        client = NdjsonStream(server.port, body)
        receive = client.next
    else:
        client = WsClient(server.port)
        client.send(body)
        receive = client.recv
    _, start = receive()
    assert start["event"] == "start"
    _, first = receive()
    assert first["event"] == "stdout" and first["data"] == "started\n"
    assert not os.path.exists(marker)
    client.abort()
    wait_for(lambda: os.path.exists(marker), "the script to finish after the hang-up")
    reqid = start["reqid"]
    record = wait_for(lambda: server.request("GET", "/status/" + reqid)[0] == 200 and
                      server.request("GET", "/status/" + reqid)[1], "the run record")
    assert record["results"][0]["exit"] == 0
    assert record["results"][0]["stdout"] == "started\nfinished\n"
    # Locks were released: the same script on the same host runs again (no 409).
    os.unlink(marker)
    status, again = server.request("POST", "/run", body)
    assert status == 200 and again["results"][0]["exit"] == 0
    assert os.path.exists(marker)


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_hung_up_stream_keeps_its_slot_until_the_run_ends(fleet, api, tmp_path, transport):
    chatty = ("#!/bin/sh\ni=0\nwhile [ $i -lt 30 ]; do echo \"tick $i\"; sleep 0.1; "
              "i=$((i+1)); done\n: > \"$1\"\n")
    fleet.add_agent("web-01", scripts={"chatty": chatty})
    server = api(api_max_children=1)
    marker = str(tmp_path / "marker")
    body = {"hosts": ["web-01"], "script": "chatty", "args": [marker]}
    if transport == "ndjson":
        client = NdjsonStream(server.port, body)
        receive = client.next
    else:
        client = WsClient(server.port)
        client.send(body)
        receive = client.recv
    assert receive()[1]["event"] == "start"
    assert receive()[1]["event"] == "stdout"
    client.abort()
    time.sleep(0.5)                 # the server notices on its next write (every 0.1 s)
    # The run (3 s) is still going and still holds the only request slot, so hanging
    # up cannot start more runs than api_max_children.
    status, body_503 = server.request("GET", "/health")
    assert not os.path.exists(marker)
    assert status == 503 and body_503["detail"] == "too many concurrent requests"
    wait_for(lambda: os.path.exists(marker), "the run to finish")
    wait_for(lambda: server.request("GET", "/health")[0] == 200, "the slot to be free")


# ---------------------------------------------------------------------------
# 4. hostile output: invalid UTF-8, a 1 MiB line, output over max_output
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_invalid_utf8_huge_line_and_max_output_are_truncated(fleet, api, transport):
    fleet.add_agent("big", scripts={"hostile": HOSTILE})
    fleet.add_agent("small", scripts={"hostile": HOSTILE}, conf_extra={"max_output": 65536})
    server = api()
    hosts = ["big", "small"]
    events = events_of(TRANSPORTS[transport](server.port, {"hosts": hosts, "script": "hostile"}))
    done = check_stream_shape(events, hosts)
    big, small = done["results"]
    for row, limit in ((big, 1048576), (small, 65536)):
        assert row["exit"] == 0 and row.get("truncated") is True, {k: row[k] for k in row
                                                                   if k not in ("stdout",)}
        assert row["stdout"].startswith("ok\ufffd\ufffdbad\nxxxx")
        # One replacement character per invalid byte: the kept text is max_output long.
        assert len(row["stdout"]) == limit
        assert row["stdout"] == output_of(events, row["host"])
        assert row["stderr"] == output_of(events, row["host"], "stderr") == "warn\n"
        assert "tail" not in row["stdout"]


# ---------------------------------------------------------------------------
# 5. an agent that does not stream (streaming = 0): the engine's fallback
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_agent_without_streaming_still_gives_events_and_done(fleet, api, transport):
    script = "#!/bin/sh\necho out 1\necho err 1 >&2\necho out 2\nexit 3\n"
    fleet.add_agent("old-01", scripts={"talk": script}, conf_extra={"streaming": 0})
    fleet.add_agent("new-01", scripts={"talk": script})
    server = api()
    hosts = ["old-01", "new-01"]
    events = events_of(TRANSPORTS[transport](server.port, {"hosts": hosts, "script": "talk"}))
    done = check_stream_shape(events, hosts)
    for host in hosts:
        assert output_of(events, host) == "out 1\nout 2\n"
        assert output_of(events, host, "stderr") == "err 1\n"
    status, sync = server.request("POST", "/run", {"hosts": hosts, "script": "talk"})
    assert status == 200
    assert comparable(done["results"]) == comparable(sync["results"])
    assert [row["exit"] for row in done["results"]] == [3, 3]


# ---------------------------------------------------------------------------
# WebSocket specifics: handshake, gate, errors as messages
# ---------------------------------------------------------------------------


def test_ws_errors_are_one_message_with_status_then_close(fleet, api, tmp_path):
    fleet.add_agent("web-01", scripts={"marked": MARKED, "forbidden": TICK})
    hook = tmp_path / "hook.sh"
    hook.write_text(HOOK)
    os.chmod(str(hook), 0o755)
    server = api(auth_hook=str(hook), api_auth_default="deny")
    auth = {"Authorization": "Bearer letmein"}
    # The api gate runs at upgrade time with the Authorization header: no 101 without it.
    client = WsClient(server.port)
    assert client.status == 403
    assert client.body == {"ok": False, "error": "bad credentials", "code": 2}
    client.close()
    cases = [
        (b"{not json", 400, {"error": "bad request", "detail": "invalid JSON body"}),
        ({"hosts": [], "script": "marked"}, 400,
         {"error": "bad request", "detail": "hosts must be a non-empty array of host names"}),
        ({"hosts": ["web-01"], "script": "marked", "async": True}, 400, {"error": "bad request"}),
        ({"hosts": ["web-01"], "script": "forbidden"}, 403,
         {"error": "insufficient privilege", "code": 3}),
        # The run action takes the message's token over the header's.
        ({"hosts": ["web-01"], "script": "marked", "token": "wrong"}, 403,
         {"error": "bad credentials", "code": 2}),
        (b"x" * (wire.MAX_BODY_BYTES + 1), 413,
         {"error": "payload too large", "detail": "body exceeds 1048576 bytes"}),
    ]
    for message, status, expected in cases:
        client = WsClient(server.port, headers=auth)
        assert client.status == 101
        client.send(message)
        got = client.all()
        client.close()
        assert len(got) == 1, got
        body = got[0][1]
        assert body["ok"] is False and body["status"] == status and body["event"] == "error"
        assert {k: body[k] for k in expected} == expected, body
        assert client.close_code == 1000
        jsonschema.validate(body, STREAM_EVENT)
    # 409 while the same host+script is running (locks key on the registry name).
    marker = str(tmp_path / "m")
    running = NdjsonStream(server.port, {"hosts": ["web-01"], "script": "marked",
                                         "args": [marker]}, headers=auth)
    assert running.next()[1]["event"] == "start"
    got = ws_run(server.port, {"hosts": ["web-01:%d" % fleet.agents["web-01"].port],
                               "script": "marked", "args": [marker]}, headers=auth)
    assert [m for _, m in got] == [{"ok": False, "error": "locked", "code": 4,
                                    "conflicts": ["web-01"], "event": "error", "status": 409}]
    events = [e for _, e in running.all()]
    running.close()
    assert events[-1]["event"] == "done"
    # With the header for the gate, the run is authorised by the message's token, else
    # by the header's.
    for token in ("run-token", None):
        body = {"hosts": ["web-01"], "script": "marked", "args": [marker]}
        if token:
            body["token"] = token
        got = [m for _, m in ws_run(server.port, body, headers=auth)]
        assert got[0]["event"] == "start" and got[-1]["event"] == "done"
        assert got[-1]["results"][0]["exit"] == 0


def test_ws_handshake_required_and_index_lists_the_endpoint(fleet, api):
    server = api()
    status, body = server.request("GET", "/ws/run")
    assert status == 426
    assert body["ok"] is False and body["error"] == "upgrade required"
    assert "Upgrade: websocket" in body["detail"]
    client = WsClient(server.port, version="99")
    assert client.status == 426 and "Sec-WebSocket-Version" in client.body["detail"]
    client.close()
    # An upgrade request to any other path is an ordinary request.
    client = WsClient(server.port, path="/health")
    assert client.status == 200 and client.body == {"ok": True, "version": wire.VERSION}
    client.close()
    status, index = server.request("GET", "/")
    assert {"method": "GET", "path": "/ws/run"} in index["endpoints"]
    assert "get" in SPEC["paths"]["/ws/run"]
    assert "101" in SPEC["paths"]["/ws/run"]["get"]["responses"]


def test_ws_run_on_a_connection_kept_alive_after_a_request(fleet, api):
    fleet.add_agent("web-01", scripts={"tick": TICK})
    server = api()
    client = WsClient(server.port, kept_alive=True)
    try:
        assert client.status == 101, (client.status, client.body)
        client.send({"hosts": ["web-01"], "script": "tick"})
        events = events_of(client.all())
    finally:
        client.close()
    done = check_stream_shape(events, ["web-01"])
    assert output_of(events, "web-01") == "first\nsecond\n"
    assert done["results"][0]["exit"] == 0
    assert client.close_code == 1000


def test_ws_answers_pings_during_a_run_and_logs_101(fleet, api):
    fleet.add_agent("web-01", scripts={"tick": TICK})
    server = api()
    client = WsClient(server.port)
    client.send({"hosts": ["web-01"], "script": "tick"})
    assert client.recv()[1]["event"] == "start"
    # The server answers pings while the run streams (a reader runs beside the sender).
    client.send(b"hi", opcode=0x9)
    head = client.rfile.read(2)
    while head[0] & 0x0F != 0xA:               # skip events until the pong
        client.rfile.read(head[1] & 0x7F if head[1] & 0x7F < 126 else
                          struct.unpack("!H", client.rfile.read(2))[0])
        head = client.rfile.read(2)
    assert client.rfile.read(head[1] & 0x7F) == b"hi"
    rest = [m for _, m in client.all()]
    client.close()
    assert rest[-1]["event"] == "done" and rest[-1]["results"][0]["stdout"] == "first\nsecond\n"
    line = wait_for(lambda: re.search(r"ACTION=api-request METHOD=GET .*PATH=/ws/run .*", server.log()),
                    "the request log line")
    assert "STATUS=101" in line.group(0)


def test_ws_and_ndjson_over_tls(fleet, api, tmp_path):
    fleet.add_agent("web-01", scripts={"tick": TICK})
    cfg = fleet.cfg
    cert_pem, key_pem = pki.issue_cert(cfg.ca_dir, "127.0.0.1")
    (tmp_path / "api.crt").write_bytes(cert_pem)
    (tmp_path / "api.key").write_bytes(key_pem)
    os.chmod(str(tmp_path / "api.key"), 0o600)
    server = api(api_cert=str(tmp_path / "api.crt"), api_key=str(tmp_path / "api.key"))
    ctx = ssl.create_default_context(cafile=cfg.ca)
    ctx.check_hostname = False
    client = WsClient(server.port, ctx=ctx)
    assert client.status == 101
    client.send({"hosts": ["web-01"], "script": "tick"})
    timed = client.all()
    client.close()
    events = events_of(timed)
    check_stream_shape(events, ["web-01"])
    first = min(t for t, e in timed if e["event"] == "stdout")
    exit_at = [t for t, e in timed if e["event"] == "exit"][0]
    assert exit_at - first >= 1.5
    assert output_of(events, "web-01") == "first\nsecond\n"
    # NDJSON over TLS too (http.client, chunked).
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=ctx, timeout=WAIT_S)
    try:
        conn.request("POST", "/run", body=json.dumps({"hosts": ["web-01"], "script": "tick",
                                                      "stream": True}).encode())
        resp = conn.getresponse()
        assert resp.status == 200
        lines = [json.loads(line) for line in resp.read().splitlines() if line.strip()]
    finally:
        conn.close()
    assert lines[-1]["event"] == "done" and lines[-1]["results"][0]["stdout"] == "first\nsecond\n"


# ---------------------------------------------------------------------------
# 8. following a run: GET /runs/{reqid}/events (files backend, one node)
# ---------------------------------------------------------------------------


def test_follow_endpoint_replays_a_streamed_run_and_resumes_after_an_id(fleet, api):
    hosts = ["web-01", "web-02"]
    for name in hosts:
        fleet.add_agent(name, scripts={"tick": TICK})
    server = api()
    streamed = events_of(ndjson_run(server.port, {"hosts": hosts, "script": "tick"}))
    reqid = streamed[0]["reqid"]
    status, headers, followed = server.call("GET", "/runs/%s/events" % reqid)
    assert status == 200 and headers["content-type"].startswith("application/x-ndjson")
    validator = jsonschema.Draft202012Validator(dict(SPEC["components"]["schemas"]["RunEvent"],
                                                     components=SPEC["components"]))
    for event in followed:
        assert not list(validator.iter_errors(event)), event
    assert [{k: v for k, v in e.items() if k != "id"} for e in followed] == streamed
    ids = [e["id"] for e in followed]
    status, _, rest = server.call("GET", "/runs/%s/events?after=%s" % (reqid, ids[1]))
    assert status == 200 and rest == followed[2:]
    status, _, body = server.call("GET", "/runs/%s/events?after=nope" % reqid)
    assert status == 400 and body["detail"].startswith("after must be an event id")
    status, _, body = server.call("GET", "/runs/0123456789abcdef/events")
    assert status == 404 and body["error"] == "not found"
