"""engine.py against real agents on loopback (issue 4, SPEC §2 and §5).

Every agent here is a real ``ctrlexec_agent.py serve`` process with
certificates from pki.py (the ``fleet`` fixture of conftest.py).  The only
stand-in is ``_BrokenPeer``: a real TLS server with a CA-signed certificate
that answers garbage, used to prove the wording of broken answers.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import ssl
import threading
import time

import pytest

import ctrlexec_agent as wire
import engine
import pki
from engine import Engine, EngineError

HELLO = "#!/bin/sh\necho hi\n"
TALK = "#!/bin/sh\necho one\nsleep 0.5\necho two\necho warn >&2\n"
REQID = "0123456789abcdef"
POLL_LIMIT_S = 20.0


def make_engine(fleet, **overrides) -> Engine:
    """An engine on the fleet's dispatcher certificate, with optional timeouts."""
    cfg = fleet.cfg
    opts = dict(read_timeout=cfg.read_timeout, max_parallel=cfg.max_parallel)
    opts.update(overrides)
    return Engine(cert=cfg.cert, key=cfg.key, ca=cfg.ca, **opts)


def without_rtt(rows: list) -> list:
    """Rows minus the timing field, after checking that it is "<n>ms"."""
    out = []
    for row in rows:
        assert row["rtt"].endswith("ms") and row["rtt"][:-2].isdigit(), row
        out.append({k: v for k, v in row.items() if k != "rtt"})
    return out


def start_agents(fleet, names: list, **kwargs) -> list:
    """Enroll several agents, start them together, then wait for all of them."""
    agents = [fleet.add_agent(name, start=False, **kwargs) for name in names]
    for agent in agents:
        agent.start(wait=False)
    for agent in agents:
        agent.wait_ready()
    return agents


def refused(agent) -> str:
    return ("host '%s' did not respond on port %d - connection refused "
            "(agent not running, or wrong port?)" % (agent.address, agent.port))


# --- fan-out: acceptance 1 and 2 ------------------------------------------------------

def test_each_host_failure_is_inline_and_request_order_is_kept(fleet):
    ok1 = fleet.add_agent("ok-1", scripts={"hello": HELLO})
    down = fleet.add_agent("down-1", scripts={"hello": HELLO}, start=False)
    slow = fleet.add_agent("slow-1", scripts={"hello": "#!/bin/sh\nsleep 5\necho late\n"})
    ok2 = fleet.add_agent("ok-2", scripts={"hello": HELLO})
    eng = make_engine(fleet, read_timeout=2)
    entries = ["ok-2", "down-1", "ghost", "slow-1", "ok-1"]
    rows = eng.dispatch_all(fleet.registry.resolve(entries), script="hello", args=[], reqid=REQID)
    assert without_rtt(rows) == [
        {"host": "ok-2", "script": "hello", "exit": 0, "stdout": "hi\n", "stderr": "", "reqid": REQID},
        {"host": "down-1", "script": "hello", "exit": -1, "stdout": "", "stderr": "", "error": refused(down), "reqid": REQID},
        {"host": "ghost", "script": "hello", "exit": -1, "stdout": "", "stderr": "", "error": "unknown agent 'ghost' (not paired)",
         "reqid": REQID},
        {"host": "slow-1", "script": "hello", "exit": -1, "stdout": "", "stderr": "", "error": "read timeout after 2s",
         "reqid": REQID},
        {"host": "ok-1", "script": "hello", "exit": 0, "stdout": "hi\n", "stderr": "", "reqid": REQID},
    ]
    assert rows[2]["rtt"] == "0ms"  # never dialled
    assert ok1 and ok2 and slow


def test_twenty_agents_running_a_one_second_script_finish_in_parallel(fleet):
    names = ["par-%02d" % i for i in range(20)]
    start_agents(fleet, names, scripts={"nap": "#!/bin/sh\nsleep 1\necho rested\n"})
    eng = make_engine(fleet)
    started = time.monotonic()
    rows = eng.dispatch_all(fleet.registry.resolve(names), script="nap", args=[], reqid=REQID)
    wall = time.monotonic() - started
    print("20 agents x 1 s script: wall time %.2fs" % wall)
    assert [row["host"] for row in rows] == names
    assert all(row["exit"] == 0 and row["stdout"] == "rested\n" for row in rows), rows
    assert wall < 10.0  # sequential would take >= 20 s


def test_max_parallel_one_still_returns_every_host_in_order(fleet):
    start_agents(fleet, ["seq-a", "seq-b", "seq-c"], scripts={"hello": HELLO})
    eng = make_engine(fleet, max_parallel=1)
    rows = eng.ping_all(fleet.registry.resolve(["seq-c", "seq-a", "seq-b"]), reqid=REQID)
    assert [(row["host"], row["status"]) for row in rows] == [("seq-c", "ok"), ("seq-a", "ok"),
                                                              ("seq-b", "ok")]


# --- transport and agent errors ----------------------------------------------------------

def test_agent_certificate_from_another_ca_is_a_tls_failure(fleet, tmp_path):
    other = str(tmp_path / "other-ca")
    pki.create_ca(other)
    agent = fleet.add_agent("rogue", start=False)
    cert_pem, key_pem = pki.issue_cert(other, "rogue")
    with open(os.path.join(agent.dir, "agent.crt"), "wb") as handle:
        handle.write(cert_pem)
    with open(os.path.join(agent.dir, "agent.key"), "wb") as handle:
        handle.write(key_pem)
    agent.start()
    rows = make_engine(fleet).ping_all(fleet.registry.resolve(["rogue"]), reqid=REQID)
    assert without_rtt(rows) == [{"host": "rogue", "status": "error", "error":
                                  "TLS handshake with '%s' failed - certificate or trust mismatch"
                                  % agent.address}]


def test_agent_that_does_not_trust_our_ca_is_a_tls_failure(fleet, tmp_path):
    other = str(tmp_path / "other-ca")
    pki.create_ca(other)
    agent = fleet.add_agent("stranger", start=False)
    shutil.copy(os.path.join(other, "ca.crt"), os.path.join(agent.dir, "ca.crt"))
    agent.start()
    rows = make_engine(fleet).dispatch_all(fleet.registry.resolve(["stranger"]), script="x",
                                           args=[], reqid=REQID)
    assert rows[0]["exit"] == -1
    assert rows[0]["error"] == ("TLS handshake with '%s' failed - certificate or trust mismatch"
                                % agent.address)


def test_agent_that_does_not_know_our_serial_answers_forbidden(fleet):
    agent = fleet.add_agent("other-owner", start=False)
    with open(os.path.join(agent.dir, "ctrl-exec-dispatchers"), "w") as handle:
        handle.write("abcdef01 someone-else\n")
    agent.start()
    eng = make_engine(fleet)
    targets = fleet.registry.resolve(["other-owner"])
    assert eng.ping_all(targets, reqid=REQID)[0]["error"] == "forbidden: serial mismatch"
    assert eng.capabilities_all(targets)[0]["error"] == "forbidden: forbidden"


def test_name_that_does_not_resolve_gets_the_operator_wording(fleet):
    fleet.add_agent("by-name", start=False)
    fleet.registry.update("by-name", lookup_by="hostname", hostname="no-such-host.invalid")
    rows = make_engine(fleet, connect_timeout=5).ping_all(fleet.registry.resolve(["by-name"]),
                                                          reqid=REQID)
    assert rows[0]["error"] == ("host 'no-such-host.invalid' did not resolve - "
                                "check the name or use an IP address")


def test_agent_refusal_is_a_failed_row_with_the_agents_error(fleet):
    fleet.add_agent("strict", scripts={"hello": HELLO})
    rows = make_engine(fleet).dispatch_all(fleet.registry.resolve(["strict"]), script="nope",
                                           args=["a"], reqid=REQID)
    assert without_rtt(rows) == [{"host": "strict", "script": "nope", "exit": -1, "stdout": "", "stderr": "",
                                  "error": "script not permitted", "reqid": REQID}]


def test_run_timeout_is_sent_and_the_killed_run_is_reported(fleet):
    fleet.add_agent("sleepy", scripts={"long": "#!/bin/sh\necho start\nexec sleep 30\n"})
    rows = make_engine(fleet, read_timeout=2).dispatch_all(
        fleet.registry.resolve(["sleepy"]), script="long", args=[], reqid=REQID, timeout=1)
    # The answer deadline widened to timeout + 10 s, so the agent's answer arrives.
    assert without_rtt(rows) == [{"host": "sleepy", "script": "long", "exit": 126, "stdout": "start\n",
                                  "stderr": "", "reqid": REQID, "timed_out": True,
                                  "error": "timed out after 1s"}]


class _BrokenPeer:
    """A real TLS 1.2 listener (CA-signed cert) that answers each connection with ``answer``."""

    def __init__(self, fleet, name: str, answer: bytes | None) -> None:
        cfg = fleet.cfg
        folder = os.path.join(fleet.root, "broken-" + name)
        os.makedirs(folder)
        cert_pem, key_pem = pki.issue_cert(cfg.ca_dir, name)
        cert, key = os.path.join(folder, "peer.crt"), os.path.join(folder, "peer.key")
        with open(cert, "wb") as handle:
            handle.write(cert_pem)
        with open(key, "wb") as handle:
            handle.write(key_pem)
        self.ctx = wire.server_context(cert, key, cfg.ca)
        # TLS 1.2: the handshake ends with the server's Finished, so a close
        # without an answer cannot be mistaken for a refused client certificate.
        self.ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        self.answer = answer
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.closed = threading.Event()
        fleet.registry.put(name, {"hostname": name, "ip": "127.0.0.1", "port": self.port,
                                  "lookup_by": "ip", "tags": {}})
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            try:
                conn.settimeout(5)
                tls = self.ctx.wrap_socket(conn, server_side=True)
                wire.read_request(wire.SocketReader(tls, time.monotonic() + 5))
                if self.answer is None:
                    time.sleep(3)  # silent: the client's read deadline must fire
                else:
                    tls.sendall(self.answer)
                tls.close()
            except OSError:
                pass
            finally:
                conn.close()

    def close(self) -> None:
        self.closed.set()
        self.listener.close()


@pytest.fixture
def broken(fleet):
    peers = []

    def make(name: str, answer: bytes | None) -> _BrokenPeer:
        peers.append(_BrokenPeer(fleet, name, answer))
        return peers[-1]

    yield make
    for peer in peers:
        peer.close()


def test_broken_answers_get_clear_errors(fleet, broken):
    broken("garbled", b"HTTP/1.0 200 OK\r\nContent-Length: 9\r\n\r\nnot json!")
    broken("array", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n[]")
    broken("hangup", b"")
    broken("too-big", wire.encode_response(413, {"error": "body exceeds 1048576 bytes"}))
    broken("silent", None)
    eng = make_engine(fleet, read_timeout=1)
    rows = eng.ping_all(fleet.registry.resolve(["garbled", "array", "hangup", "too-big", "silent"]),
                        reqid=REQID)
    assert [row["error"] for row in rows] == [
        "invalid JSON response", "invalid JSON response",
        "no response from agent - connection closed before an answer",
        "request too large", "read timeout after 1s"]


# --- ping, capabilities, sessions ----------------------------------------------------------

def test_ping_and_capabilities_rows(fleet):
    fleet.add_agent("cap-1", scripts={"hello": HELLO}, tags={"env": "test", "role": "web"})
    fleet.add_agent("cap-2", conf_extra={"hostname": "cap-2.example.net"})
    eng = make_engine(fleet)
    targets = fleet.registry.resolve(["cap-1", "cap-2", "ghost"])
    pings = without_rtt(eng.ping_all(targets, reqid=REQID))
    expiry = fleet.registry.get("cap-1")["expiry"]
    assert pings[0] == {"host": "cap-1", "status": "ok", "version": wire.VERSION, "expiry": expiry,
                        "staged": False, "reqid": REQID}
    assert pings[1]["reported_hostname"] == "cap-2.example.net"
    assert pings[2] == {"host": "ghost", "status": "error",
                        "error": "unknown agent 'ghost' (not paired)"}
    caps = without_rtt(eng.capabilities_all(targets))
    assert caps[0]["tags"] == {"env": "test", "role": "web"}
    assert [s["name"] for s in caps[0]["scripts"]] == ["hello"]
    assert caps[1]["tags"] == {} and caps[1]["scripts"] == []
    assert caps[1]["reported_hostname"] == "cap-2.example.net"
    assert caps[2]["status"] == "error"


def test_tls_sessions_are_resumed_and_survive_an_agent_restart(fleet):
    agent = fleet.add_agent("resume", scripts={"hello": HELLO})
    eng = make_engine(fleet)
    targets = fleet.registry.resolve(["resume"])
    for _ in range(3):
        assert eng.ping_all(targets, reqid=REQID)[0]["status"] == "ok"
    print("sessions: %s" % dict(eng.stats))
    assert eng.stats["resumed"] >= 1
    agent.stop()
    agent.start()  # new process, new ticket keys: the cached session is useless now
    rows = eng.dispatch_all(targets, script="hello", args=[], reqid=REQID)
    assert rows[0]["exit"] == 0, rows


def test_token_is_sent_but_never_logged_or_returned(fleet, monkeypatch):
    hook = fleet.add_agent("tok", scripts={"ctx": "#!/bin/sh\ncat\n"})
    assert hook
    logged = []
    real = wire.log_action
    monkeypatch.setattr(engine.wire, "log_action",
                        lambda level, action, **fields: (logged.append((action, fields)),
                                                         real(level, action, **fields)))
    secret = "s3cret-T0ken"
    rows = make_engine(fleet).dispatch_all(fleet.registry.resolve(["tok", "ghost"]), script="ctx",
                                           args=["x"], reqid=REQID, username="alice", token=secret)
    assert '"token":"%s"' % secret in rows[0]["stdout"]  # the script got it on stdin
    rows[0].pop("stdout")
    assert secret not in repr(rows)
    assert len(logged) == 2 and secret not in repr(logged)


def test_bad_setup_and_programmer_errors_raise_engine_error(fleet, tmp_path):
    cfg = fleet.cfg
    with pytest.raises(EngineError, match="cannot load the dispatcher TLS files"):
        Engine(cert=str(tmp_path / "missing.crt"), key=cfg.key, ca=cfg.ca)
    with pytest.raises(EngineError, match="max_parallel must be a positive number"):
        Engine(cert=cfg.cert, key=cfg.key, ca=cfg.ca, max_parallel=0)
    with pytest.raises(EngineError, match="reqid"):
        make_engine(fleet).fetch_results([], reqid="../etc/passwd")
    assert make_engine(fleet).ping_all([], reqid=REQID) == []


# --- async runs --------------------------------------------------------------------------

def test_async_submit_is_accepted_once_and_busy_while_running(fleet):
    start_agents(fleet, ["job-1", "job-2"], scripts={"job": "#!/bin/sh\nsleep 1\necho done\n"})
    eng = make_engine(fleet)
    reqid = wire.new_reqid()
    targets = fleet.registry.resolve(["job-1", "ghost", "job-2"])
    rows = eng.dispatch_all(targets, script="job", args=[], reqid=reqid, async_=True)
    assert without_rtt(rows) == [
        {"host": "job-1", "script": "job", "status": "accepted", "reqid": reqid},
        {"host": "ghost", "script": "job", "status": "error", "reqid": reqid,
         "error": "unknown agent 'ghost' (not paired)"},
        {"host": "job-2", "script": "job", "status": "accepted", "reqid": reqid},
    ]
    again = eng.dispatch_all(targets[:1], script="job", args=[], reqid=wire.new_reqid(), async_=True)
    assert again[0]["status"] == "busy" and again[0]["error"] == "script already running"
    end = time.monotonic() + POLL_LIMIT_S
    while time.monotonic() < end:
        fetched = eng.fetch_results(targets[:1], reqid=reqid)[0]
        if fetched["status"] == "done":
            break
        time.sleep(0.2)
    assert (fetched["status"], fetched["exit"], fetched["stdout"]) == ("done", 0, "done\n")


def test_fetch_results_reports_unknown_for_a_reqid_the_agent_never_saw(fleet):
    fleet.add_agent("fetcher", scripts={"job": HELLO})
    rows = make_engine(fleet).fetch_results(fleet.registry.resolve(["fetcher", "ghost"]), reqid=REQID)
    assert without_rtt(rows) == [
        {"host": "fetcher", "status": "unknown", "reqid": REQID},
        {"host": "ghost", "status": "error", "error": "unknown agent 'ghost' (not paired)"},
    ]


# --- streaming ---------------------------------------------------------------------------

def _per_host(events: list, host: str) -> list:
    return [e for e in events if e["host"] == host]


def test_streamed_events_arrive_in_order_per_host_with_fallback_for_plain_agents(fleet):
    start_agents(fleet, ["live-1", "live-2"], scripts={"talk": TALK})
    fleet.add_agent("plain", scripts={"talk": TALK}, conf_extra={"streaming": "0"})
    events = []
    rows = make_engine(fleet).dispatch_all(
        fleet.registry.resolve(["live-1", "plain", "ghost", "live-2"]), script="talk", args=[],
        reqid=REQID, on_event=events.append)
    expected = {"script": "talk", "exit": 0, "stdout": "one\ntwo\n", "stderr": "warn\n", "reqid": REQID}
    assert without_rtt(rows) == [
        dict(expected, host="live-1"), dict(expected, host="plain"),
        {"host": "ghost", "script": "talk", "exit": -1, "stdout": "", "stderr": "", "error": "unknown agent 'ghost' (not paired)",
         "reqid": REQID},
        dict(expected, host="live-2"),
    ]
    for host in ("live-1", "live-2"):
        mine = _per_host(events, host)
        # Streamed: "one" and "two" arrive as separate events, as the script wrote them.
        assert [e["data"] for e in mine if e["event"] == "stdout"] == ["one\n", "two\n"]
        assert [e["data"] for e in mine if e["event"] == "stderr"] == ["warn\n"]
        assert mine[-1]["event"] == "exit" and mine[-1]["exit"] == 0
        assert sum(e["event"] == "exit" for e in mine) == 1
    plain = _per_host(events, "plain")
    assert [(e["event"], e.get("data")) for e in plain[:-1]] == [("stdout", "one\ntwo\n"),
                                                                 ("stderr", "warn\n")]
    assert plain[-1] == {"event": "exit", "host": "plain", "exit": 0, "rtt": rows[1]["rtt"]}
    assert _per_host(events, "ghost") == [{"event": "exit", "host": "ghost", "exit": -1, "rtt": "0ms",
                                           "error": "unknown agent 'ghost' (not paired)"}]


def test_streamed_refusal_and_dead_agent_end_with_an_exit_event(fleet):
    fleet.add_agent("picky", scripts={"talk": TALK})
    dead = fleet.add_agent("dead", start=False)
    events = []
    rows = make_engine(fleet).dispatch_all(fleet.registry.resolve(["picky", "dead"]), script="other",
                                           args=[], reqid=REQID, on_event=events.append)
    assert [row["error"] for row in rows] == ["script not permitted", refused(dead)]
    ends = sorted(events, key=lambda e: e["host"])
    assert [(e["host"], e["event"], e["exit"], e["error"]) for e in ends] == [
        ("dead", "exit", -1, refused(dead)), ("picky", "exit", -1, "script not permitted")]


def test_streaming_with_a_timeout_outlasts_read_timeout(fleet):
    fleet.add_agent("quiet", scripts={"hush": "#!/bin/sh\nsleep 2\necho finally\n"})
    events = []
    # read_timeout 1 s alone would cut this silent run; timeout=3 widens the deadline to 13 s.
    rows = make_engine(fleet, read_timeout=1).dispatch_all(
        fleet.registry.resolve(["quiet"]), script="hush", args=[], reqid=REQID, timeout=3,
        on_event=events.append)
    assert rows[0]["exit"] == 0 and rows[0]["stdout"] == "finally\n"
    short = make_engine(fleet, read_timeout=1).dispatch_all(
        fleet.registry.resolve(["quiet"]), script="hush", args=[], reqid=REQID, on_event=events.append)
    assert short[0]["error"] == "read timeout after 1s"


def test_peer_that_accepts_tcp_but_never_speaks_tls_times_out_at_connect_timeout(fleet):
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(8)  # the kernel completes TCP; nobody ever answers the ClientHello
    try:
        fleet.registry.put("mute", {"hostname": "mute", "ip": "127.0.0.1",
                                    "port": mute.getsockname()[1], "lookup_by": "ip", "tags": {}})
        rows = make_engine(fleet, connect_timeout=1).ping_all(fleet.registry.resolve(["mute"]),
                                                              reqid=REQID)
    finally:
        mute.close()
    assert rows[0]["error"] == "host '127.0.0.1' did not respond - connection timed out"


def test_unreachable_network_errors_get_the_operator_wording(fleet):
    eng = make_engine(fleet)
    target = fleet.registry.resolve(["x"])[0]._replace(address="10.255.255.1", port=7443)
    for code in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        assert eng._transport_error(target, OSError(code, os.strerror(code)), "connect", 60.0) == \
            "host '10.255.255.1' is unreachable - no route to host or network down"
    assert eng._transport_error(target, OSError(errno.EPIPE, "Broken pipe"), "read", 60.0) == \
        "Broken pipe"  # anything else is passed through
