"""Hostile input corpus against the API, an agent and the pairing port.

Targets are real processes: `python ctrlexec_api.py` (plain HTTP), one
`ctrlexec_agent.py serve` on 127.0.0.x (rate_limit_disable = 1 so the corpus's
TLS failures do not block 127.0.0.1; request_timeout = 3 s), and a pairing
listener started the way `ctrlexec.py pairing-mode` starts it (pairing.run_pairing_mode
in its own gevent-patched process; its per-request deadline lowered to 3 s so
the slowloris case fits in CI).

Outcomes checked for every case: the documented 4xx (or a closed connection on
the raw TLS ports, or the SPEC's inline refusal where SPEC defines one), the
process stays up, and nothing is executed (a canary script records every run).

The slow-client cases (slowloris on the head and on the body) are started when
the module's fixture starts and checked by the last tests, so their deadlines
(10 s head, 20 s body) overlap the rest of the corpus instead of adding to it.
"""

from __future__ import annotations

import json
import os
import time

import pytest

import ctrlexec_agent as wire
import httpserver
import pairing
import service
import store
from apitest_support import ApiServer
from fleet import Fleet
from reliability_support import Background, PairingProc, raw_exchange

#: The agent's whole-request deadline in this module (agent.conf request_timeout).
AGENT_REQUEST_TIMEOUT_S = 3
#: The pairing listener's per-request deadline in this module (pairing.PAIRING_IO_TIMEOUT_S).
PAIRING_IO_TIMEOUT_S = 3
SLACK_S = 8
CANARY = "#!/bin/sh\necho ran >> %s\n"

class Target:
    """The processes under attack and their canary."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.canary = os.path.join(root, "canary-ran")
        self.fleet = Fleet(root, pairing_rate_limit_disable="1")
        self.agent = None
        self.api = None
        self.pairing = None
        self.pairing_port = None
        self.pairing_log = os.path.join(root, "pairing.log")
        self.slow = {}

    def start(self) -> "Target":
        self.agent = self.fleet.add_agent(
            "web-01", scripts={"canary": CANARY % self.canary, "hello": "#!/bin/sh\necho hi\n"},
            conf_extra={"rate_limit_disable": 1, "request_timeout": AGENT_REQUEST_TIMEOUT_S})
        self.api = ApiServer.for_fleet(self.fleet, os.path.join(self.root, "api.log")).start()
        self.pairing = PairingProc(self.fleet, self.pairing_log,
                                   io_timeout_s=float(PAIRING_IO_TIMEOUT_S)).start()
        self.pairing_port = self.pairing.port
        return self

    def stop(self) -> None:
        if self.pairing is not None:
            self.pairing.stop()
        if self.api is not None:
            self.api.stop()
        self.fleet.stop_all()

    # --- shortcuts ---

    def api_raw(self, data, **kw):
        return raw_exchange("127.0.0.1", self.api.port, data, timeout=kw.pop("timeout", 15), **kw)

    def agent_raw(self, data, *, tls=True, **kw):
        ctx = self.fleet.client_context() if tls else None
        return raw_exchange(self.agent.address, self.agent.port, data, tls=ctx,
                            timeout=kw.pop("timeout", 10), **kw)

    def pairing_raw(self, data, *, tls=True, **kw):
        ctx = wire.insecure_client_context() if tls else None
        return raw_exchange("127.0.0.1", self.pairing_port, data, tls=ctx,
                            timeout=kw.pop("timeout", 10), **kw)

    def canary_ran(self) -> bool:
        return os.path.exists(self.canary)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    tgt = Target(str(tmp_path_factory.mktemp("hostile")))
    try:
        tgt.start()
        # Slow clients start now and are checked by the last tests (their deadlines overlap).
        api_port = tgt.api.port
        head = b"POST /run HTTP/1.1\r\nHost: x\r\n"
        tgt.slow = {
            # one header byte per second: closed at the 10 s head deadline
            "api-head-drip": Background(lambda: raw_exchange(
                "127.0.0.1", api_port, [head] + [b"X"] * 40, gap_s=1.0, timeout=40)),
            # connects and sends nothing
            "api-idle": Background(lambda: raw_exchange("127.0.0.1", api_port, [b""], timeout=40)),
            # a TLS ClientHello fragment on the plain-HTTP port (no newline ever comes)
            "api-tls-on-plain": Background(lambda: raw_exchange(
                "127.0.0.1", api_port, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
                timeout=40)),
            # complete headers, then one body byte per second: closed at the 20 s body deadline
            "api-body-drip": Background(lambda: raw_exchange(
                "127.0.0.1", api_port,
                [head + b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"]
                + [b" "] * 60, gap_s=1.0, timeout=60)),
        }
        yield tgt
    finally:
        tgt.stop()


def assert_refused(result, allowed=range(400, 500)) -> None:
    """A 4xx answer, or a connection closed without any HTTP status (never 2xx/5xx)."""
    assert result.status in allowed or (result.status is None and result.closed), result


# ---------------------------------------------------------------------------
# API: raw HTTP
# ---------------------------------------------------------------------------

API_RAW = {
    "garbage-line": b"GARBAGE\r\n\r\n",
    "method-only": b"GET\r\n\r\n",
    "bad-version": b"GET / HTTP/9.9\r\n\r\n",
    "four-words": b"GET / HTTP/1.1 extra\r\n\r\n",
    "binary-line": b"\x00\x01\x02\x03\xff\r\n\r\n",
    "nul-in-path": b"GET /status/\x00 HTTP/1.1\r\n\r\n",
    "unknown-method": b"FOO / HTTP/1.1\r\n\r\n",
    "negative-length": b"POST /run HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
    "text-length": b"POST /run HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
    "huge-length": b"POST /run HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
    "bad-chunk": b"POST /run HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
    "header-no-colon": b"POST /run HTTP/1.1\r\nBadHeaderNoColon\r\nContent-Length: 2\r\n\r\n{}",
    "latin1-header": b"POST /run HTTP/1.1\r\nX-A: \xff\xfe\r\nContent-Length: 2\r\n\r\n{}",
    "request-line-70k": b"GET /" + b"A" * 70000 + b" HTTP/1.1\r\n\r\n",
    "header-flood-200": b"GET /health HTTP/1.1\r\n" + b"".join(
        b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n",
    "header-100k": b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 100000 + b"\r\n\r\n",
    "traversal-status": b"GET /status/../../etc/passwd HTTP/1.1\r\n\r\n",
    "traversal-encoded": b"GET /status/..%2f..%2fetc%2fpasswd HTTP/1.1\r\n\r\n",
    "traversal-root": b"GET /../../../etc/passwd HTTP/1.1\r\n\r\n",
    "traversal-spec": b"GET /openapi.json/../ctrlexec_api.py HTTP/1.1\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(API_RAW))
def test_api_raw_malformed_request_is_4xx_or_closed(target, name):
    result = target.api_raw(API_RAW[name])
    assert_refused(result)
    if result.status is not None:           # SPEC §6: every answer is JSON, these too
        assert b"Content-Type: application/json" in result.data, result
        assert result.json()["ok"] is False, result
    assert target.api.alive()


# ---------------------------------------------------------------------------
# API: JSON bodies
# ---------------------------------------------------------------------------


def bad(detail: str) -> dict:
    return {"ok": False, "error": "bad request", "detail": detail}


HOSTS = service.HOSTS_DETAIL
SCRIPT = service.SCRIPT_DETAIL
ARGS = service.ARGS_DETAIL
INVALID = "invalid JSON body"

#: (path, raw body, expected 400 detail)
API_BODIES = {
    "invalid-utf8": ("/run", b'{"hosts":["\xff\xfe"],"script":"canary"}', INVALID),
    "nested-10000": ("/run", b"[" * 10000 + b"]" * 10000, INVALID),
    "nested-10000-object": ("/ping", b'{"hosts":' + b'{"a":' * 10000 + b"1" + b"}" * 10001,
                            INVALID),
    "nul-bytes-raw": ("/run", b'{"hosts":["web-01"],\x00"script":"canary"}', INVALID),
    "truncated": ("/run", b'{"hosts":["web-01"],"script":"can', INVALID),
    "trailing-garbage": ("/run", b'{"hosts":["web-01"],"script":"canary"} x', INVALID),
    "not-object": ("/run", b'["web-01","canary"]', INVALID),
    "json-string": ("/ping", b'"hosts"', INVALID),
    # ujson reads NaN (not JSON); the field check still refuses it
    "nan": ("/run", b'{"hosts":["web-01"],"script":"canary","timeout":NaN}',
            "timeout must be a positive integer"),
    "huge-float": ("/run", b'{"hosts":["web-01"],"script":"canary","timeout":1e999}',
                   "timeout must be a positive integer"),
    "negative-huge": ("/run", b'{"hosts":["web-01"],"script":"canary","timeout":-1e999}',
                      "timeout must be a positive integer"),
    "huge-int-negative": ("/run", b'{"hosts":["web-01"],"script":"canary","timeout":-'
                          + b"9" * 400 + b"}", None),
    "fractional-timeout": ("/run", b'{"hosts":["web-01"],"script":"canary","timeout":1.5}',
                           "timeout must be a positive integer"),
    "nul-in-script": ("/run", b'{"hosts":["web-01"],"script":"canary\\u0000"}', SCRIPT),
    "nul-in-args": ("/run", b'{"hosts":["web-01"],"script":"canary","args":["a\\u0000b"]}', ARGS),
    "surrogate-args": ("/run", b'{"hosts":["web-01"],"script":"canary","args":["\\ud800"]}', ARGS),
    "surrogate-user": ("/run", b'{"hosts":["web-01"],"script":"canary","username":"\\udc80"}',
                       "username must be a string"),
    "surrogate-token": ("/ping", b'{"hosts":["web-01"],"token":"\\ud800x"}',
                        "token must be a string"),
    "dup-hosts-last-bad": ("/run", b'{"hosts":["web-01"],"hosts":"web-01","script":"canary"}',
                           HOSTS),
    "dup-script-last-bad": ("/run", b'{"hosts":["web-01"],"script":"canary","script":"../x"}',
                            SCRIPT),
    "traversal-script": ("/run", b'{"hosts":["web-01"],"script":"../../../bin/sh"}', SCRIPT),
    "absolute-script": ("/run", b'{"hosts":["web-01"],"script":"/bin/sh"}', SCRIPT),
    "too-many-args": ("/run", json.dumps({"hosts": ["web-01"], "script": "canary",
                                          "args": ["x"] * 257}).encode(), ARGS),
    "too-many-hosts": ("/ping", json.dumps({"hosts": ["h%d" % i for i in range(501)]}).encode(),
                       "too many hosts (max 500)"),
    "empty-hosts-discovery": ("/discovery", b'{"hosts":[]}', HOSTS),
    "async-and-stream": ("/run", b'{"hosts":["web-01"],"script":"canary","async":true,'
                                 b'"stream":true}',
                         "async and stream cannot be combined (use one of them)"),
}


@pytest.mark.parametrize("name", sorted(API_BODIES))
def test_api_hostile_json_body_is_400(target, name):
    path, raw, detail = API_BODIES[name]
    status, _, body = target.api.call("POST", path, raw=raw, timeout=15)
    assert status == 400, body
    if detail is not None:
        assert body == bad(detail)
    assert not target.canary_ran()


#: Wrong JSON types for every request field (None only where null is not accepted).
WRONG = {
    "hosts": [None, "web-01", 1, 1.5, True, {}, {"web-01": 1}, [1], [""], [None], [["web-01"]],
              [{"h": 1}], []],
    "script": [None, 1, True, [], {}, "", "a" * 129, "can ary", "canary!", "canary\n"],
    "args": ["x", 1, True, {}, [1], [None], [[]], [{}], [True]],
    "username": [1, True, [], {}, None],
    "token": [1, False, [], {}, None],
    "async": ["true", 1, 0, [], {}, None],
    "stream": ["yes", 1, [], {}, None],
    "timeout": ["10", 0, -1, 1.5, True, [], {}, None, float("inf")],
}
FIELD_DETAIL = {"hosts": HOSTS, "script": SCRIPT, "args": ARGS,
                "username": "username must be a string", "token": "token must be a string",
                "async": "async must be a boolean", "stream": "stream must be a boolean",
                "timeout": "timeout must be a positive integer"}


def test_api_wrong_types_in_every_field_are_400(target):
    cases = 0
    for field, values in WRONG.items():
        for value in values:
            body = {"hosts": ["web-01"], "script": "canary", field: value}
            raw = json.dumps(body).replace("Infinity", "1e999").encode()
            status, _, answer = target.api.call("POST", "/run", raw=raw, timeout=15)
            assert (status, answer) == (400, bad(FIELD_DETAIL[field])), (field, value)
            if field in ("hosts", "username", "token"):
                status, _, answer = target.api.call("POST", "/ping", raw=raw, timeout=15)
                assert (status, answer) == (400, bad(FIELD_DETAIL[field])), (field, value)
            cases += 1
    assert cases >= 60
    assert not target.canary_ran()


#: Host entries that must never be dialled nor become a path: SPEC §5 answers them inline.
HOSTILE_HOSTS = ["../../etc/passwd", "/etc/passwd", "..", ".", "web-01/../web-01",
                 "web-01\x00", "web-01:../../x", "web-01:0", "web-01:99999", "web-01:-1",
                 "web-01:" + "9" * 400, "a" * 300, "\u202eweb-01", "\ud800", "web 01",
                 "web-01\nX-Injected: 1", "%2e%2e%2f"]


def test_api_hostile_host_names_are_inline_errors_never_dialled(target):
    body = {"hosts": HOSTILE_HOSTS, "script": "canary"}
    status, _, answer = target.api.call("POST", "/run", body, timeout=15)
    assert status == 200
    assert [row["host"] for row in answer["results"]] == HOSTILE_HOSTS
    for row in answer["results"]:
        assert row["exit"] == -1 and row["rtt"] == "0ms", row
        assert row["error"].startswith("unknown agent "), row
    status, _, pong = target.api.call("POST", "/ping", {"hosts": HOSTILE_HOSTS}, timeout=15)
    assert status == 200 and all(r["status"] == "error" for r in pong["results"])
    status, _, disc = target.api.call("POST", "/discovery", {"hosts": HOSTILE_HOSTS}, timeout=15)
    assert status == 200 and all(r["status"] == "error" for r in disc["hosts"].values())
    assert not target.canary_ran()
    # nothing was registered, and no lock is held for a hostile name (that no hostile name
    # ever becomes a file outside locks/: test_store.py test_hostile_lock_names_*)
    state = store.Store(target.fleet.cfg)
    assert state.registry.names() == ["web-01"]
    assert all(state.registry.get(host) is None for host in HOSTILE_HOSTS)
    assert all(row["host"] == "web-01" for row in state.locks.held()), state.locks.held()


def test_api_duplicate_keys_last_value_is_the_one_executed(target):
    """ujson keeps the last duplicate, and the agent gets the re-encoded body: no smuggling."""
    raw = b'{"hosts":["web-01"],"script":"canary","script":"nope"}'
    status, _, answer = target.api.call("POST", "/run", raw=raw, timeout=15)
    assert status == 200
    row = answer["results"][0]
    assert (row["script"], row["exit"], row["error"]) == ("nope", -1, "script not permitted")
    assert not target.canary_ran()


def test_api_huge_timeout_integer_is_clamped_by_the_agent(target):
    raw = b'{"hosts":["web-01"],"script":"hello","timeout":' + b"9" * 30 + b"}"
    status, _, answer = target.api.call("POST", "/run", raw=raw, timeout=15)
    assert status == 200
    assert (answer["results"][0]["exit"], answer["results"][0]["stdout"]) == (0, "hi\n"), answer


def test_api_status_reqid_traversal_is_404(target):
    for path in ("/status/..", "/status/../runs", "/status/%2e%2e", "/status/" + "a" * 65,
                 "/status/ABCDEF12", "/status/abc", "/status/abcdef12/../../x",
                 "/status/abcdef1%00"):
        status, _, body = target.api.call("GET", path, timeout=15)
        assert status == 404 and body["ok"] is False, (path, body)


# ---------------------------------------------------------------------------
# agent (port 7443 protocol): raw, over TLS as the trusted dispatcher
# ---------------------------------------------------------------------------

AGENT_RAW = {
    "garbage-line": (b"GARBAGE\r\n\r\n", 400, "malformed request line"),
    "empty": (b"\r\n", 400, "empty request"),
    "no-newline-10k": (b"A" * 10000 + b"\r\n\r\n", 400, "malformed request line"),
    "header-flood-33": (b"GET /capabilities HTTP/1.0\r\n" + b"X: y\r\n" * 33 + b"\r\n",
                        431, "more than 32 header lines"),
    "header-flood-1000": (b"GET /capabilities HTTP/1.0\r\n" + b"X: y\r\n" * 1000 + b"\r\n",
                          431, "more than 32 header lines"),
    "header-no-colon": (b"GET /capabilities HTTP/1.0\r\nNoColon\r\n\r\n", 400,
                        "malformed header line"),
    "text-length": (b"POST /run HTTP/1.0\r\nContent-Length: abc\r\n\r\n", 400,
                    "invalid Content-Length"),
    "negative-length": (b"POST /run HTTP/1.0\r\nContent-Length: -1\r\n\r\n", 400,
                        "invalid Content-Length"),
    "huge-length": (b"POST /run HTTP/1.0\r\nContent-Length: 99999999999999999999\r\n\r\n", 400,
                    "invalid Content-Length"),
    "body-2mib": (b"POST /run HTTP/1.0\r\nContent-Length: 2000000\r\n\r\n", 413,
                  "body exceeds 1048576 bytes"),
    "unknown-path": (b"GET /etc/passwd HTTP/1.0\r\n\r\n", 404, "not found"),
    "unknown-method": (b"DELETE /run HTTP/1.0\r\n\r\n", 404, "not found"),
}


@pytest.mark.parametrize("name", sorted(AGENT_RAW))
def test_agent_raw_malformed_request_gets_its_4xx(target, name):
    data, status, error = AGENT_RAW[name]
    result = target.agent_raw(data)
    assert result.status == status and result.json() == {"error": error}, result
    assert target.agent.proc.poll() is None


def agent_run(target, body: bytes) -> dict:
    head = b"POST /run HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % len(body)
    result = target.agent_raw(head + body)
    assert result.status == 200, result
    return result.json()


#: /run bodies the agent must refuse (SPEC §2: HTTP 200, exit -1, error) without running anything.
AGENT_RUN = {
    "invalid-utf8": (b'{"script":"canary","reqid":"\xff"}', "invalid JSON"),
    "nested-10000": (b"[" * 10000 + b"]" * 10000, "invalid JSON"),
    "nested-object": (b'{"script":' + b'{"a":' * 10000 + b"1" + b"}" * 10001, "invalid JSON"),
    "not-object": (b'["canary"]', "invalid JSON"),
    "nul-in-script": (b'{"script":"canary\\u0000","reqid":"r1"}', "script not permitted"),
    "traversal-script": (b'{"script":"../../../../bin/sh","reqid":"r1"}', "script not permitted"),
    "absolute-script": (b'{"script":"/bin/sh","reqid":"r1"}', "script not permitted"),
    "script-not-string": (b'{"script":["canary"],"reqid":"r1"}', "script not permitted"),
    "dup-script": (b'{"script":"canary","script":"nope","reqid":"r1"}', "script not permitted"),
    "args-string": (b'{"script":"canary","args":"x","reqid":"r1"}', "args must be an array"),
    "args-object": (b'{"script":"canary","args":{"a":1},"reqid":"r1"}', "args must be an array"),
    "args-numbers": (b'{"script":"canary","args":[1,2],"reqid":"r1"}',
                     "args must be an array of strings"),
    "args-nested": (b'{"script":"canary","args":[["x"]],"reqid":"r1"}',
                    "args must be an array of strings"),
    "timeout-string": (b'{"script":"canary","timeout":"5","reqid":"r1"}',
                       "timeout must be a positive integer (seconds)"),
    "timeout-zero": (b'{"script":"canary","timeout":0,"reqid":"r1"}',
                     "timeout must be a positive integer (seconds)"),
    "timeout-inf": (b'{"script":"canary","timeout":1e999,"reqid":"r1"}',
                    "timeout must be a positive integer (seconds)"),
    "timeout-negative-huge": (b'{"script":"canary","timeout":-' + b"9" * 400 + b',"reqid":"r1"}',
                              "timeout must be a positive integer (seconds)"),
    "timeout-bool": (b'{"script":"canary","timeout":true,"reqid":"r1"}',
                     "timeout must be a positive integer (seconds)"),
    "async-bad-reqid": (b'{"script":"hello","async":true,"reqid":"../../etc/x"}',
                        "async run requires a valid reqid"),
}


@pytest.mark.parametrize("name", sorted(AGENT_RUN))
def test_agent_hostile_run_body_is_refused_without_running(target, name):
    raw, error = AGENT_RUN[name]
    answer = agent_run(target, raw)
    assert answer["exit"] == -1 and answer["error"] == error, answer
    assert not target.canary_ran()
    assert target.agent.proc.poll() is None


def test_agent_arg_with_nul_byte_gets_an_answer(target):
    answer = agent_run(target, b'{"script":"hello","args":["a\\u0000b"],"reqid":"r1"}')
    assert answer["exit"] == -1 and "NUL" in answer["error"], answer


def test_agent_result_reqid_traversal_is_404_unknown(target):
    for reqid in ("../../../etc/passwd", "..%2f..%2fx", "a" * 65, "x\x00y", "%00", "."):
        result = target.agent_raw(b"GET /result/" + reqid.encode() + b" HTTP/1.0\r\n\r\n")
        assert result.status == 404 and result.json()["status"] == "unknown", (reqid, result)


def test_agent_huge_timeout_integer_is_clamped(target):
    answer = agent_run(target, b'{"script":"hello","timeout":' + b"9" * 400 + b',"reqid":"r2"}')
    assert (answer["exit"], answer["stdout"]) == (0, "hi\n"), answer


AGENT_PRE_TLS = {
    "plain-http": b"GET /capabilities HTTP/1.0\r\n\r\n",
    "garbage": b"\x00\xff" * 100,
    "sslv2-hello": b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10" + b"\x00" * 40,
    "tls-record-huge": b"\x16\x03\x01\xff\xff" + b"\x01" * 200,
}


@pytest.mark.parametrize("name", sorted(AGENT_PRE_TLS))
def test_agent_non_tls_bytes_close_the_connection(target, name):
    result = target.agent_raw(AGENT_PRE_TLS[name], tls=False,
                              timeout=AGENT_REQUEST_TIMEOUT_S + SLACK_S)
    assert result.closed and result.status is None, result
    assert target.agent.proc.poll() is None


def test_agent_slowloris_is_closed_at_the_request_deadline(target):
    started = time.monotonic()
    drip = Background(lambda: target.agent_raw([b"POST /run HTTP/1.0\r\n"] + [b"X"] * 60,
                                               gap_s=0.5, timeout=40))
    idle = Background(lambda: raw_exchange(target.agent.address, target.agent.port, [b""],
                                           timeout=40))
    for call in (drip, idle):
        result = call.join(AGENT_REQUEST_TIMEOUT_S + SLACK_S + 5, raise_error=True)
        assert result.closed and result.status is None, result
        assert call.elapsed < AGENT_REQUEST_TIMEOUT_S + SLACK_S
    assert time.monotonic() - started < AGENT_REQUEST_TIMEOUT_S + SLACK_S + 5
    # still serving its dispatcher
    result = target.agent_raw(wire.encode_request("POST", "/ping", {"reqid": "after"}))
    assert result.status == 200 and result.json()["status"] == "ok"


# ---------------------------------------------------------------------------
# pairing port (7444 protocol)
# ---------------------------------------------------------------------------


def pair_request(body: bytes, *, path: bytes = b"/pair") -> bytes:
    return (b"POST " + path + b" HTTP/1.0\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)) + body


#: (request bytes, refusal reason); the pairing port answers refusals as HTTP 200
#: {"status":"error","reason"} like the original dispatcher (reference §4.2), then closes.
PAIRING_CASES = {
    "garbage-line": (b"GARBAGE\r\n\r\n", "invalid request"),
    "get": (b"GET /pair HTTP/1.0\r\n\r\n", "invalid request"),
    "header-flood": (b"POST /pair HTTP/1.0\r\n" + b"X: y\r\n" * 100 + b"\r\n", "invalid request"),
    "body-70k": (b"POST /pair HTTP/1.0\r\nContent-Length: 70000\r\n\r\n", "request too large"),
    "huge-length": (b"POST /pair HTTP/1.0\r\nContent-Length: 99999999999999999999\r\n\r\n",
                    "invalid request"),
    "invalid-utf8": (pair_request(b'{"csr":"\xff","hostname":"x"}'), "invalid request"),
    "nested-10000": (pair_request(b"[" * 10000 + b"]" * 10000), "invalid request"),
    "not-object": (pair_request(b'["csr"]'), "invalid request"),
    "csr-not-string": (pair_request(b'{"csr":5,"hostname":"web-09"}'), "invalid request"),
    "traversal-hostname": (pair_request(b'{"csr":"x","hostname":"../../etc/passwd"}'),
                           "invalid hostname"),
    "nul-hostname": (pair_request(b'{"csr":"x","hostname":"web\\u0000"}'), "invalid hostname"),
    "long-hostname": (pair_request(json.dumps({"csr": "x", "hostname": "a" * 300}).encode()),
                      "invalid hostname"),
    "dup-hostname": (pair_request(b'{"csr":"x","hostname":"web-09","hostname":"../x"}'),
                     "invalid hostname"),
    "huge-port": (pair_request(b'{"csr":"x","hostname":"web-09","port":1e999}'),
                  "invalid request"),
    "huge-int-port": (pair_request(b'{"csr":"x","hostname":"web-09","port":' + b"9" * 400 + b"}"),
                      "invalid request"),
    "bad-csr": (pair_request(b'{"csr":"-----BEGIN CERTIFICATE REQUEST-----\\nAAAA\\n",'
                             b'"hostname":"web-09"}'), "invalid request"),
    "wrong-path": (pair_request(b'{"csr":"x","hostname":"web-09"}', path=b"/../pair"),
                   "invalid request"),
}


@pytest.mark.parametrize("name", sorted(PAIRING_CASES))
def test_pairing_port_refuses_hostile_requests(target, name):
    data, reason = PAIRING_CASES[name]
    result = target.pairing_raw(data)
    if result.status is None:
        assert result.closed, result                        # a closed connection is a refusal too
    else:
        assert result.status == 200 and result.json() == {"status": "error", "reason": reason}, \
            result
    assert target.pairing.alive()


@pytest.mark.parametrize("data", [b"GET / HTTP/1.0\r\n\r\n", b"\x00\xff" * 64],
                         ids=["plain-http", "garbage"])
def test_pairing_port_non_tls_bytes_close_the_connection(target, data):
    result = target.pairing_raw(data, tls=False)
    assert result.closed and result.status is None, result
    assert target.pairing.alive()


def test_pairing_slowloris_is_closed_at_its_deadline(target):
    drip = Background(lambda: target.pairing_raw([b"POST /pair HTTP/1.0\r\n"] + [b"X"] * 60,
                                                 gap_s=0.5, timeout=40))
    idle = Background(lambda: raw_exchange("127.0.0.1", target.pairing_port, [b""], timeout=40))
    for call in (drip, idle):
        result = call.join(PAIRING_IO_TIMEOUT_S + SLACK_S + 5, raise_error=True)
        assert result.closed, result
        assert result.status in (None, 200), result
        assert call.elapsed < PAIRING_IO_TIMEOUT_S + SLACK_S


# ---------------------------------------------------------------------------
# slow clients started by the fixture, and the final state
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, deadline_s", [
    ("api-head-drip", httpserver.REQUEST_HEAD_DEADLINE_S),
    ("api-idle", httpserver.REQUEST_HEAD_DEADLINE_S),
    ("api-tls-on-plain", httpserver.REQUEST_HEAD_DEADLINE_S),
    ("api-body-drip", httpserver.REQUEST_HEAD_DEADLINE_S + httpserver.REQUEST_BODY_DEADLINE_S),
])
def test_api_slow_clients_are_cut_at_the_deadline(target, name, deadline_s):
    call = target.slow[name]
    result = call.join(deadline_s + SLACK_S + 10, raise_error=True)
    assert_refused(result)
    assert call.elapsed < deadline_s + SLACK_S, (name, call.elapsed)
    if name == "api-body-drip":
        assert result.status == 400 and result.json() == bad("the request body could not be read")


def test_everything_survived_and_nothing_ran(target):
    assert target.api.health_ok()
    assert target.agent.proc.poll() is None
    assert target.pairing.alive()
    assert not target.canary_ran()
    assert pairing.list_requests(target.fleet.cfg) == []            # nothing queued for approval
    log = target.api.log()
    assert "Traceback" not in log, log[-3000:]
    assert "ACTION=api-error" not in log, log[-3000:]
    assert not [line for line in log.splitlines()
                if "ACTION=api-request" in line and " STATUS=5" in line]
    assert "Traceback" not in target.agent.log()
    assert "Traceback" not in target.pairing.log(), target.pairing.log()[-3000:]
    # the ports still do their job for the real dispatcher
    status, _, answer = target.api.call("POST", "/run", {"hosts": ["web-01"], "script": "hello"})
    assert status == 200 and answer["results"][0]["stdout"] == "hi\n", answer
