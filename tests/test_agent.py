"""End-to-end tests of the agent (``ctrlexec_agent.py serve``), issue 2.

Owns: proof that the agent honours SPEC §2-§3 on the wire: the trust gate
(client certificate, serial map, revocation), the allowlist and its path
rules, execution (argv, environment, stdin, exit codes, output caps,
timeouts), async runs, streaming, request limits, rate limits, reloads and
the command line.  Never mocks TLS or the agent: every test talks to a real
agent process on a 127.0.0.x address with real ``pki.py`` certificates.

Agents that are safe to share live in module-scoped fixtures; tests that
restart, reload or trip a limiter get their own agent.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time

import gevent
import gevent.pool
import pytest
from cryptography import x509

import ctrlexec_agent as wire
import pki
from fleet import AGENT, Fleet, wait_for, write_executable

PY = sys.executable
RUNS_OWNER = "test-dispatcher"     #: dispatcher_id of the fleet's dispatcher cert
EX_CONFIG = 78
_COUNTER = itertools.count(1)


# --- fixtures -----------------------------------------------------------------

@pytest.fixture(scope="module")
def afleet(tmp_path_factory):
    """One control host (CA + dispatcher cert) shared by this module's agents."""
    built = Fleet(str(tmp_path_factory.mktemp("agentfleet")))
    try:
        yield built
    finally:
        built.stop_all()


@pytest.fixture(scope="module")
def main_agent(afleet):
    """The workhorse: default rate limits, script_dirs set, 6 MiB output cap."""
    agent = afleet.add_agent("main-01", tags={"env": "test", "role": "db"}, start=False,
                             conf_extra={"max_output": 6 * 1024 * 1024, "request_timeout": 2})
    agent.set_conf(script_dirs=agent.scripts_dir)
    _write_main_scripts(agent)
    agent.start()
    return agent


@pytest.fixture(scope="module")
def small_agent(afleet):
    """Tight limits: 2 KiB output cap, run_timeout 1 s, streaming off."""
    agent = afleet.add_agent("small-01", conf_extra={"max_output": 2048, "run_timeout": 1,
                                                     "streaming": 0})
    agent.write_script("big", BIG_OUTPUT)
    agent.write_script("sleeper", "#!/bin/sh\nsleep 10\necho never\n")
    agent.write_script("streamer", STREAMER)
    agent.sighup()
    _wait_log(agent, "ACTION=reload ", 1)
    return agent


@pytest.fixture(scope="module")
def gate_agent(afleet):
    """Rate limits off, so handshake failures can be provoked freely; 2 s request deadline."""
    agent = afleet.add_agent("gate-01", scripts={"hello": "#!/bin/sh\necho hi\n"},
                             conf_extra={"rate_limit_disable": 1, "request_timeout": 2})
    return agent


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    """A second, unrelated CA and a client cert it issued (files)."""
    folder = str(tmp_path_factory.mktemp("otherca"))
    pki.create_ca(os.path.join(folder, "ca"))
    cert, key = pki.issue_cert(os.path.join(folder, "ca"), "ctrl-exec-dispatcher")
    return _write_pair(folder, "foreign", cert, key)


@pytest.fixture(scope="module")
def stranger(afleet, tmp_path_factory):
    """A client cert signed by the fleet's own CA whose serial is in no trust map."""
    folder = str(tmp_path_factory.mktemp("stranger"))
    cert, key = pki.issue_cert(afleet.cfg.ca_dir, "ctrl-exec-dispatcher")
    return _write_pair(folder, "stranger", cert, key)


# --- scripts ----------------------------------------------------------------------

ARGV_PRINTER = "#!%s\nimport json, sys\nfor item in sys.argv[1:]:\n    print(json.dumps(item))\n" % PY

ENV_PRINTER = (
    "#!%s\nimport json, sys\n"
    "raw = open('/proc/self/environ', 'rb').read().split(b'\\0')\n"
    "env = dict(e.decode().split('=', 1) for e in raw if e)\n"
    "print(json.dumps({'env': env, 'stdin': sys.stdin.read(), 'argv0': sys.argv[0]}))\n" % PY)

BIG_OUTPUT = (
    "#!%s\nimport sys\nchunk = 65536\n"
    "for _ in range(80):\n    sys.stderr.buffer.write(b'e' * chunk)\n"
    "sys.stderr.flush()\n"
    "for _ in range(80):\n    sys.stdout.buffer.write(b'o' * chunk)\n" % PY)

STREAMER = "#!/bin/sh\necho out1\necho err1 >&2\nsleep 0.2\necho out2\nexit 5\n"

MIB = 1024 * 1024


def _write_main_scripts(agent) -> None:
    marker_dir = os.path.join(agent.dir, "markers")
    os.makedirs(marker_dir, exist_ok=True)
    agent.write_script("hello", "#!/bin/sh\necho hi\n")
    agent.write_script("argv", ARGV_PRINTER)
    agent.write_script("env", ENV_PRINTER)
    agent.write_script("exit3", "#!/bin/sh\necho partial\nexit 3\n")
    agent.write_script("selfkill", "#!/bin/sh\necho before\nkill -KILL $$\n")
    agent.write_script("badinterp", "#!/nonexistent/interpreter\n")
    agent.write_script("nonutf8", "#!/bin/sh\nprintf '\\377\\376abc\\n'\nprintf 'caf\\303\\251\\n' >&2\n")
    agent.write_script("big", BIG_OUTPUT)
    agent.write_script("streamer", STREAMER)
    agent.write_script("echo", "#!/bin/sh\nprintf '%s' \"$1\"\n")
    pidfile = os.path.join(agent.dir, "grandchild.pid")
    agent.write_script("spawner", "#!/bin/sh\nsleep 300 &\necho $! > %s\necho started\nwait\n" % pidfile)
    noexec = agent.write_script("noexec", "#!/bin/sh\necho should-not-run\n")
    os.chmod(noexec, 0o644)
    # Not allowlisted: would leave a marker if anything ever ran it.
    write_executable(os.path.join(agent.scripts_dir, "evil"),
                     "#!/bin/sh\ntouch %s\n" % os.path.join(marker_dir, "evil-ran"))
    # Symlink inside script_dirs pointing inside; swapped to the outside later.
    inside = agent.write_script("real-target", "#!/bin/sh\necho inside\n", allow=False)
    os.symlink(inside, os.path.join(agent.scripts_dir, "swap"))
    agent.allow("swap", os.path.join(agent.scripts_dir, "swap"))
    # A symlinked *directory* inside script_dirs (the "..": resolution case).
    os.makedirs(os.path.join(agent.scripts_dir, "real-sub"))
    write_executable(os.path.join(agent.scripts_dir, "real-sub", "tool"), "#!/bin/sh\necho tool\n")
    os.symlink(os.path.join(agent.scripts_dir, "real-sub"), os.path.join(agent.scripts_dir, "sub"))
    agent.allow("subtool", os.path.join(agent.scripts_dir, "sub", "tool"))
    outside = os.path.join(agent.dir, "outside")
    os.makedirs(outside)
    write_executable(os.path.join(outside, "tool"),
                     "#!/bin/sh\ntouch %s\n" % os.path.join(marker_dir, "outside-ran"))
    write_executable(os.path.join(outside, "target"),
                     "#!/bin/sh\ntouch %s\n" % os.path.join(marker_dir, "outside-ran"))


# --- helpers ----------------------------------------------------------------------

def _write_pair(folder: str, name: str, cert: bytes, key: bytes) -> dict:
    cert_path = os.path.join(folder, name + ".crt")
    key_path = os.path.join(folder, name + ".key")
    with open(cert_path, "wb") as handle:
        handle.write(cert)
    with open(key_path, "wb") as handle:
        handle.write(key)
    os.chmod(key_path, 0o600)
    return {"cert": cert_path, "key": key_path, "pem": cert}


def _ctx(afleet, pair: dict | None) -> ssl.SSLContext:
    """A client context that trusts the fleet CA, with ``pair`` as client cert (or none)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=afleet.cfg.ca)
    if pair:
        ctx.load_cert_chain(pair["cert"], pair["key"])
    return ctx


def _source(n: int) -> str:
    """A loopback source address of our own, so limiter state never leaks between tests."""
    return "127.0.%d.%d" % (200 + (os.getpid() % 40), n)


def _run(afleet, agent, script: str, args=None, **extra) -> dict:
    body = dict({"script": script, "args": args or [], "reqid": wire.new_reqid()}, **extra)
    status, _headers, data = afleet.request(agent, "POST", "/run", body)
    assert status == 200, data
    assert data.get("reqid", body["reqid"]) == body["reqid"]
    return data


def _refused(afleet, agent, ctx, *, source="127.0.0.1", path="/ping") -> str:
    """Try one exchange; return '' if it got an HTTP answer, else the failure text."""
    try:
        status, _headers, _data = afleet.request(agent, "POST", path, {"reqid": "x"}, ctx=ctx,
                                                 timeout=10, source=source)
    except (ssl.SSLError, OSError, wire.ProtocolError) as exc:
        return "%s: %s" % (type(exc).__name__, exc)
    return ""


def _exchange_raw(agent, payload: bytes, ctx, *, source="127.0.0.1", timeout=10.0,
                  parse=True):
    """Send raw bytes over an mTLS connection; return (status, body) of the answer."""
    raw = socket.create_connection((agent.address, agent.port), timeout=timeout,
                                   source_address=(source, 0))
    try:
        tls = ctx.wrap_socket(raw)
        tls.sendall(payload)
        status, _headers, body = wire.read_response(
            wire.SocketReader(tls, time.monotonic() + timeout))
    finally:
        raw.close()
    return status, (json.loads(body.decode("utf-8")) if parse and body else body)


def _wait_log(agent, needle: str, count: int, timeout: float = 10.0) -> None:
    """Wait until ``needle`` appears at least ``count`` times in the agent log."""
    wait_for(lambda: agent.log().count(needle) >= count, "%r logged %d times" % (needle, count),
             timeout, 0.02, detail=lambda: agent.log()[-3000:])


def _reload(agent) -> None:
    """SIGHUP and wait for the reload (or reload-fail) line."""
    log = agent.log()
    ok, fail = log.count("ACTION=reload "), log.count("ACTION=reload-fail ")
    agent.sighup()

    def reloaded() -> bool:
        log = agent.log()
        return log.count("ACTION=reload ") > ok or log.count("ACTION=reload-fail ") > fail

    wait_for(reloaded, "a reload line", 10, 0.02, detail=lambda: agent.log()[-2000:])


def _agent_cli(*args, timeout=30) -> subprocess.CompletedProcess:
    env = dict(os.environ, CTRL_EXEC_LOG="stderr")
    return subprocess.run([PY, AGENT] + list(args), capture_output=True, text=True,
                          timeout=timeout, env=env)


def _serial_int(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


def _dispatcher_pem(afleet) -> bytes:
    with open(afleet.cfg.cert, "rb") as handle:
        return handle.read()


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# --- 1. ping, run, capabilities ----------------------------------------------------------

def test_ping_answers_with_host_version_expiry_and_reqid(afleet, main_agent):
    reqid = wire.new_reqid()
    status, headers, data = afleet.request(main_agent, "POST", "/ping", {"reqid": reqid})
    assert status == 200
    assert headers["content-type"] == "application/json"
    with open(os.path.join(main_agent.dir, "agent.crt"), "rb") as handle:
        expiry = pki.cert_expiry(handle.read())
    assert data == {"status": "ok", "host": "main-01", "version": wire.VERSION,
                    "expiry": expiry, "staged": False, "reqid": reqid}
    assert "ACTION=ping " in main_agent.log() and "REQID=%s" % reqid in main_agent.log()


def test_run_passes_args_verbatim_as_separate_argv_items(afleet, main_agent):
    args = ["two words", "line1\nline2", "ünïcødé ☃ 日本", "", "  padded  ", "$(touch /tmp/x)",
            "*", "--flag=a b", "'quoted'\"", "\ttab"]
    reqid = wire.new_reqid()
    status, _h, data = afleet.request(main_agent, "POST", "/run",
                                      {"script": "argv", "args": args, "reqid": reqid})
    assert status == 200
    assert [json.loads(line) for line in data["stdout"].splitlines()] == args
    assert data == {"script": "argv", "exit": 0, "stdout": data["stdout"], "stderr": "",
                    "reqid": reqid}   # no host field, no flags


def test_run_without_args_and_hello(afleet, main_agent):
    data = _run(afleet, main_agent, "hello")
    assert (data["exit"], data["stdout"], data["stderr"]) == (0, "hi\n", "")
    status, _h, data = afleet.request(main_agent, "POST", "/run", {"script": "argv"})
    assert status == 200 and data["exit"] == 0 and data["stdout"] == "" and data["reqid"] == ""


def test_capabilities_lists_tags_and_sorted_scripts(afleet, main_agent):
    status, _h, data = afleet.request(main_agent, "GET", "/capabilities")
    assert status == 200
    assert set(data) == {"status", "host", "version", "tags", "scripts"}
    assert (data["status"], data["host"], data["version"]) == ("ok", "main-01", wire.VERSION)
    assert data["tags"] == {"env": "test", "role": "db"}
    names = [s["name"] for s in data["scripts"]]
    assert names == sorted(names) and "hello" in names and "evil" not in names
    by_name = {s["name"]: s for s in data["scripts"]}
    assert by_name["hello"] == {"name": "hello", "executable": True, "profile": "default",
                                "path": os.path.join(main_agent.scripts_dir, "hello")}
    assert by_name["noexec"]["executable"] is False


# --- 2. refusals ---------------------------------------------------------------------

def test_client_without_certificate_fails_handshake(afleet, gate_agent):
    before = gate_agent.log().count("ACTION=tls-failure")
    assert _refused(afleet, gate_agent, _ctx(afleet, None))
    _wait_log(gate_agent, "ACTION=tls-failure", before + 1)


def test_client_cert_from_another_ca_fails_handshake(afleet, gate_agent, other_ca):
    assert _refused(afleet, gate_agent, _ctx(afleet, other_ca))
    # The agent keeps serving the real dispatcher.
    status, _h, _d = afleet.request(gate_agent, "POST", "/ping", {"reqid": "after"})
    assert status == 200


def test_ca_signed_cert_with_untrusted_serial_gets_403(afleet, gate_agent, stranger):
    ctx = _ctx(afleet, stranger)
    for method, path in (("POST", "/run"), ("POST", "/ping"), ("GET", "/result/abcdef0123456789")):
        status, _h, data = afleet.request(gate_agent, method, path,
                                          {"script": "hello", "reqid": "r"}, ctx=ctx)
        assert (status, data) == (403, {"error": "serial mismatch", "status": "forbidden"}), path
    status, _h, data = afleet.request(gate_agent, "GET", "/capabilities", ctx=ctx)
    assert (status, data) == (403, {"error": "forbidden"})
    serial = pki.cert_serial(stranger["pem"])
    assert "ACTION=serial-reject" in gate_agent.log() and serial in gate_agent.log()


@pytest.mark.parametrize("form", ["colon", "0x", "decimal"])
def test_revoked_dispatcher_serial_is_refused_after_reload(afleet, form, tmp_path):
    agent = afleet.add_agent("revoke-%s" % form.replace("0x", "hex"),
                             scripts={"hello": "#!/bin/sh\necho hi\n"})
    number = _serial_int(_dispatcher_pem(afleet))
    text = "%x" % number
    text = "0" * (len(text) % 2) + text
    if form == "colon" and text.isdigit():
        pytest.skip("digits-only hex serial: colon form canonicalises differently (reference 4.7)")
    entry = {"colon": ":".join(text[i:i + 2] for i in range(0, len(text), 2)).upper(),
             "0x": "0x" + text, "decimal": str(number)}[form]
    with open(os.path.join(agent.dir, "revoked-serials"), "w") as handle:
        handle.write("# revoked dispatchers\n%s   # the test dispatcher\n" % entry)
    if form == "decimal":   # restart path
        agent.stop()
        agent.start()
    else:
        _reload(agent)
    for method, path in (("POST", "/run"), ("POST", "/ping"), ("GET", "/capabilities")):
        status, _h, data = afleet.request(agent, method, path, {"script": "hello"})
        assert (status, data) == (403, {"error": "certificate revoked"}), path
    assert "ACTION=revoked-cert" in agent.log()
    # Un-revoking on reload lets the dispatcher back in.
    os.unlink(os.path.join(agent.dir, "revoked-serials"))
    _reload(agent)
    assert _run(afleet, agent, "hello")["stdout"] == "hi\n"


BAD_NAMES = ["evil", "scripts/evil", "../scripts/evil", "./hello", "hello/", "hello.sh", ".",
             "..", "hello ", " hello", "hel lo", "hello\n", "hello\x00", "héllo", "hello☃",
             "HELLO", "", "a" * 129]


def test_script_names_outside_the_allowlist_or_rule_are_not_permitted(afleet, main_agent):
    marker_dir = os.path.join(main_agent.dir, "markers")
    evil_abs = os.path.join(main_agent.scripts_dir, "evil")
    for name in BAD_NAMES + [evil_abs]:
        reqid = wire.new_reqid()
        status, _h, data = afleet.request(main_agent, "POST", "/run",
                                          {"script": name, "args": [], "reqid": reqid})
        assert (status, data) == (200, {"script": name, "exit": -1,
                                        "error": "script not permitted", "reqid": reqid}), name
    for body in ({"script": 5}, {"script": ["hello"]}, {"args": []}):
        status, _h, data = afleet.request(main_agent, "POST", "/run", body)
        assert status == 200 and data["exit"] == -1 and data["error"] == "script not permitted"
    assert os.listdir(marker_dir) == []
    assert "ACTION=deny" in main_agent.log()


def test_symlink_swapped_after_load_is_refused_at_run_time(afleet, main_agent):
    marker_dir = os.path.join(main_agent.dir, "markers")
    assert _run(afleet, main_agent, "swap")["stdout"] == "inside\n"
    assert _run(afleet, main_agent, "subtool")["stdout"] == "tool\n"
    outside = os.path.join(main_agent.dir, "outside")
    link = os.path.join(main_agent.scripts_dir, "swap")
    sub = os.path.join(main_agent.scripts_dir, "sub")
    try:
        os.unlink(link)
        os.symlink(os.path.join(outside, "target"), link)
        os.unlink(sub)
        os.symlink(outside, sub)     # sub/tool now resolves to ../outside/tool
        for name in ("swap", "subtool"):
            data = _run(afleet, main_agent, name)
            assert (data["exit"], data["error"]) == (-1, "script not permitted"), name
            assert "stdout" not in data
        assert os.listdir(marker_dir) == []
    finally:
        os.unlink(link)
        os.symlink(os.path.join(main_agent.scripts_dir, "real-target"), link)
        os.unlink(sub)
        os.symlink(os.path.join(main_agent.scripts_dir, "real-sub"), sub)
    assert _run(afleet, main_agent, "swap")["stdout"] == "inside\n"


@pytest.mark.parametrize("kind", ["dotdot", "symlink"])
def test_allowlist_entry_escaping_script_dirs_is_rejected_at_load(afleet, kind):
    agent = afleet.add_agent("escape-%s" % kind, start=False)
    agent.set_conf(script_dirs=agent.scripts_dir)
    outside = write_executable(os.path.join(agent.dir, "outside.sh"), "#!/bin/sh\necho out\n")
    if kind == "dotdot":
        entry = os.path.join(agent.scripts_dir, "..", "outside.sh")   # textually inside
    else:
        entry = os.path.join(agent.scripts_dir, "link.sh")
        os.symlink(outside, entry)
    agent.write_script("hello", "#!/bin/sh\necho hi\n")
    agent.allow("escape", entry)
    # self-check and serve both refuse with EX_CONFIG, naming file and line.
    for command in ("self-check", "serve"):
        proc = _agent_cli(command, "--config", agent.conf_path)
        assert proc.returncode == EX_CONFIG, proc.stderr
        assert "%s line 4" % agent.allowlist_path in proc.stderr
        assert "outside script_dirs" in proc.stderr


def test_reload_keeps_previous_allowlist_when_new_one_escapes(afleet):
    agent = afleet.add_agent("reload-escape", scripts={"hello": "#!/bin/sh\necho hi\n"},
                             start=False)
    agent.set_conf(script_dirs=agent.scripts_dir)
    agent.start()
    marker = os.path.join(agent.dir, "outside-ran")
    write_executable(os.path.join(agent.dir, "outside.sh"), "#!/bin/sh\ntouch %s\n" % marker)
    agent.allow("escape", os.path.join(agent.scripts_dir, "..", "outside.sh"))
    _reload(agent)
    assert "ACTION=reload-fail" in agent.log()
    assert _run(afleet, agent, "hello")["stdout"] == "hi\n"
    data = _run(afleet, agent, "escape")
    assert data["error"] == "script not permitted"
    assert not os.path.exists(marker)


# --- 3. output volume --------------------------------------------------------------

def test_five_mib_on_both_streams_completes_without_deadlock(afleet, main_agent):
    data = _run(afleet, main_agent, "big")
    assert data["exit"] == 0
    assert data["stderr"] == "e" * (5 * MIB)
    assert data["stdout"] == "o" * (5 * MIB)
    assert "truncated" not in data


def test_output_beyond_max_output_is_cut_and_flagged(afleet, small_agent):
    data = _run(afleet, small_agent, "big")
    assert data == {"script": "big", "exit": 0, "stdout": "o" * 2048, "stderr": "e" * 2048,
                    "reqid": data["reqid"], "truncated": True}
    assert "TRUNCATED=1" in small_agent.log()


# --- 4. timeouts -------------------------------------------------------------------

def test_request_timeout_kills_script_and_its_children(afleet, main_agent):
    pidfile = os.path.join(main_agent.dir, "grandchild.pid")
    started = time.monotonic()
    data = _run(afleet, main_agent, "spawner", timeout=1)
    assert time.monotonic() - started < 8
    assert data == {"script": "spawner", "exit": 126, "stdout": "started\n", "stderr": "",
                    "reqid": data["reqid"], "timed_out": True, "error": "timed out after 1s"}
    with open(pidfile) as handle:
        pid = int(handle.read())
    end = time.monotonic() + 5
    while _pid_alive(pid) and time.monotonic() < end:
        time.sleep(0.05)
    assert not _pid_alive(pid), "grandchild sleep %d survived the timeout" % pid


def test_timeout_is_bounded_even_when_term_is_ignored_and_a_child_escapes(afleet, main_agent):
    """TERM ignored -> KILL after 5 s; a setsid'd child holding the pipes is abandoned."""
    pidfile = os.path.join(main_agent.dir, "escaped.pid")
    main_agent.write_script("stubborn", "#!/bin/sh\ntrap '' TERM\nsetsid sleep 60 &\n"
                            "echo $! > %s\necho stubborn\nsleep 60\n" % pidfile)
    _reload(main_agent)
    started = time.monotonic()
    try:
        data = _run(afleet, main_agent, "stubborn", timeout=1)
        elapsed = time.monotonic() - started
        assert (data["exit"], data["timed_out"], data["error"]) == (126, True, "timed out after 1s")
        assert data["stdout"] == "stubborn\n"
        assert 5 < elapsed < 25, elapsed
    finally:
        with open(pidfile) as handle:
            escaped = int(handle.read())
        try:
            os.kill(escaped, signal.SIGKILL)   # the one process that outlives the run by design
        except ProcessLookupError:
            pass


def test_run_timeout_from_agent_conf_caps_every_run(afleet, small_agent):
    for extra in ({}, {"timeout": 30}):
        data = _run(afleet, small_agent, "sleeper", **extra)
        assert (data["exit"], data["timed_out"], data["error"]) == (126, True, "timed out after 1s")
        assert data["stdout"] == ""


def test_bad_timeout_value_is_refused(afleet, main_agent):
    for value in (0, -1, "5", 1.5, True):
        data = _run(afleet, main_agent, "hello", timeout=value)
        assert (data["exit"], data["error"]) == (-1, "timeout must be a positive integer (seconds)")


# --- exit codes, output decoding, environment -----------------------------------------

def test_exit_codes_follow_the_script_signal_and_exec_failures(afleet, main_agent):
    data = _run(afleet, main_agent, "exit3")
    assert (data["exit"], data["stdout"]) == (3, "partial\n")
    data = _run(afleet, main_agent, "selfkill")
    assert (data["exit"], data["stdout"]) == (126, "before\n")
    data = _run(afleet, main_agent, "noexec")
    assert data["exit"] == 127 and data["stdout"] == ""
    assert "error" in data and "should-not-run" not in json.dumps(data)
    data = _run(afleet, main_agent, "badinterp")
    assert data["exit"] == 127


def test_non_utf8_output_is_decoded_with_replacement(afleet, main_agent):
    data = _run(afleet, main_agent, "nonutf8")
    assert data["exit"] == 0
    assert data["stdout"] == "\ufffd\ufffdabc\n"
    assert data["stderr"] == "café\n"


def test_script_environment_is_clean_and_stdin_is_the_context(afleet, monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/nonexistent/libevil.so")
    monkeypatch.setenv("ENVEXEC_TOKEN", "leaked-token")
    monkeypatch.setenv("SECRET_THING", "x")
    monkeypatch.setenv("LANG", "C.UTF-8")
    agent = afleet.add_agent("envcheck", scripts={"env": ENV_PRINTER})
    reqid = wire.new_reqid()
    status, _h, data = afleet.request(agent, "POST", "/run",
                                      {"script": "env", "args": ["a1"], "reqid": reqid,
                                       "username": "alice", "token": "tok-123"})
    assert status == 200 and data["exit"] == 0, data
    seen = json.loads(data["stdout"])
    env = seen["env"]
    assert env["PATH"] == wire.SAFE_PATH
    assert env["LANG"] == "C.UTF-8"
    assert set(env) <= {"PATH"} | set(wire.PASSED_ENV)
    assert not any(k.startswith(("ENVEXEC_", "LD_", "CTRL_EXEC", "PYTHON")) for k in env)
    assert seen["argv0"] == os.path.join(agent.scripts_dir, "env")
    context = json.loads(seen["stdin"])
    assert set(context) == {"script", "args", "reqid", "peer_ip", "username", "token",
                            "dispatcher", "timestamp"}
    assert context["script"] == "env" and context["args"] == ["a1"]
    assert context["reqid"] == reqid and context["peer_ip"] == "127.0.0.1"
    assert (context["username"], context["token"]) == ("alice", "tok-123")
    assert context["dispatcher"] == RUNS_OWNER
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", context["timestamp"])
    assert "tok-123" not in agent.log()


# --- 5. async runs -----------------------------------------------------------------

@pytest.fixture(scope="module")
def async_agent(afleet):
    agent = afleet.add_agent("async-01")
    agent.write_script("slow", "#!/bin/sh\nsleep \"$1\"\necho \"done $2\"\nexit 4\n")
    agent.write_script("quick", "#!/bin/sh\necho quick\n")
    _reload(agent)
    return agent


def _poll_result(afleet, agent, reqid: str, want: str = "done", timeout: float = 20.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status, _h, data = afleet.request(agent, "GET", "/result/" + reqid)
        if status == 200 and data["status"] == want:
            return data
        time.sleep(0.1)
    raise AssertionError("result %s never reached %s: %s" % (reqid, want, data))


def test_async_run_accepted_busy_running_then_done(afleet, async_agent):
    reqid, other = wire.new_reqid(), wire.new_reqid()
    status, _h, data = afleet.request(async_agent, "POST", "/run",
                                      {"script": "slow", "args": ["2", "A"], "reqid": reqid,
                                       "async": True, "token": "async-secret"})
    assert (status, data) == (202, {"script": "slow", "status": "accepted", "reqid": reqid})
    status, _h, data = afleet.request(async_agent, "POST", "/run",
                                      {"script": "slow", "args": ["0", "B"], "reqid": other,
                                       "async": True})
    assert (status, data) == (409, {"script": "slow", "status": "busy", "reqid": other,
                                    "error": "script already running"})
    status, _h, data = afleet.request(async_agent, "GET", "/result/" + reqid)
    assert status == 200
    assert set(data) == {"reqid", "status", "script", "owner", "started"}
    assert (data["status"], data["script"], data["owner"]) == ("running", "slow", RUNS_OWNER)
    done = _poll_result(afleet, async_agent, reqid)
    assert (done["exit"], done["stdout"], done["stderr"]) == (4, "done A\n", "")
    assert done["started"] == data["started"] and "finished" in done
    record = os.path.join(async_agent.dir, "state", "runs", RUNS_OWNER, reqid + ".json")
    assert oct(os.stat(record).st_mode & 0o777) == "0o640"
    with open(record) as handle:
        assert "async-secret" not in handle.read()
    # The lock is released with the run: the same script is accepted again.
    status, _h, data = afleet.request(async_agent, "POST", "/run",
                                      {"script": "slow", "args": ["0", "C"], "reqid": other,
                                       "async": True})
    assert status == 202
    assert _poll_result(afleet, async_agent, other)["stdout"] == "done C\n"


def test_async_refusals(afleet, async_agent):
    for reqid in ("", "../etc", "a" * 65):
        status, _h, data = afleet.request(async_agent, "POST", "/run",
                                          {"script": "quick", "reqid": reqid, "async": True})
        assert status == 200 and data["exit"] == -1
        assert data["error"] == "async run requires a valid reqid"
    status, _h, data = afleet.request(async_agent, "POST", "/run",
                                      {"script": "nope", "reqid": "abc", "async": True})
    assert data["error"] == "script not permitted"
    for reqid in ("0123456789abcdef", "..%2f..", "a" * 65):
        status, _h, data = afleet.request(async_agent, "GET", "/result/" + reqid)
        assert (status, data) == (404, {"status": "unknown", "reqid": reqid[:64]})


def test_async_result_survives_agent_restart(afleet, async_agent):
    reqid = wire.new_reqid()
    status, _h, _d = afleet.request(async_agent, "POST", "/run",
                                    {"script": "slow", "args": ["2", "R"], "reqid": reqid,
                                     "async": True})
    assert status == 202
    async_agent.stop()
    async_agent.start()
    done = _poll_result(afleet, async_agent, reqid)
    assert (done["exit"], done["stdout"]) == (4, "done R\n")


def test_async_result_is_private_to_its_dispatcher(afleet, async_agent, tmp_path):
    reqid = wire.new_reqid()
    status, _h, _d = afleet.request(async_agent, "POST", "/run",
                                    {"script": "quick", "reqid": reqid, "async": True})
    assert status == 202
    _poll_result(afleet, async_agent, reqid)
    cert, key = pki.issue_cert(afleet.cfg.ca_dir, "ctrl-exec-dispatcher")
    other = _write_pair(str(tmp_path), "other", cert, key)
    wire.add_trusted_dispatcher(os.path.join(async_agent.dir, "ctrl-exec-dispatchers"),
                                pki.cert_serial(cert), "other-dispatcher")
    _reload(async_agent)
    ctx = _ctx(afleet, other)
    status, _h, data = afleet.request(async_agent, "POST", "/ping", {"reqid": "o"}, ctx=ctx)
    assert status == 200    # trusted ...
    status, _h, data = afleet.request(async_agent, "GET", "/result/" + reqid, ctx=ctx)
    assert (status, data) == (404, {"status": "unknown", "reqid": reqid})   # ... but not the owner


def test_async_records_older_than_a_day_are_purged_on_submit(afleet, async_agent):
    reqid = wire.new_reqid()
    assert afleet.request(async_agent, "POST", "/run",
                          {"script": "quick", "reqid": reqid, "async": True})[0] == 202
    _poll_result(afleet, async_agent, reqid)
    path = os.path.join(async_agent.dir, "state", "runs", RUNS_OWNER, reqid + ".json")
    old = time.time() - 25 * 3600
    os.utime(path, (old, old))
    fresh = wire.new_reqid()
    assert afleet.request(async_agent, "POST", "/run",
                          {"script": "quick", "reqid": fresh, "async": True})[0] == 202
    assert not os.path.exists(path)
    status, _h, data = afleet.request(async_agent, "GET", "/result/" + reqid)
    assert (status, data) == (404, {"status": "unknown", "reqid": reqid})
    _poll_result(afleet, async_agent, fresh)


# --- 6. concurrency ------------------------------------------------------------------

def test_fifty_concurrent_runs_each_get_their_own_result(afleet, main_agent):
    def one(index: int) -> tuple:
        word = "req-%02d-%s" % (index, wire.new_reqid())
        reqid = wire.new_reqid()
        status, _h, data = afleet.request(main_agent, "POST", "/run",
                                          {"script": "echo", "args": [word], "reqid": reqid},
                                          timeout=60)
        return status, data, word, reqid

    results = gevent.pool.Pool(50).map(one, range(50))
    assert len(results) == 50
    for status, data, word, reqid in results:
        assert status == 200
        assert data == {"script": "echo", "exit": 0, "stdout": word, "stderr": "", "reqid": reqid}


def test_max_children_refuses_connections_beyond_the_cap(afleet, tmp_path):
    marker = str(tmp_path / "holding")
    agent = afleet.add_agent("capped", conf_extra={"max_children": 1},
                             scripts={"hold": "#!/bin/sh\ntouch %s\nsleep 1\necho held\n" % marker})
    first = gevent.spawn(afleet.request, agent, "POST", "/run", {"script": "hold", "reqid": "h"})
    try:
        end = time.monotonic() + 10
        while not os.path.exists(marker) and time.monotonic() < end:
            time.sleep(0.02)
        assert os.path.exists(marker)
        assert _refused(afleet, agent, afleet.client_context())
        _wait_log(agent, "ACTION=overload", 1)
        status, _h, data = first.get(timeout=20)
        assert (status, data["stdout"]) == (200, "held\n")
    finally:
        first.kill()
    status, _h, _d = afleet.request(agent, "POST", "/ping", {"reqid": "after"})
    assert status == 200


# --- 7. malformed requests ---------------------------------------------------------------

def test_malformed_requests_get_clear_errors_and_agent_keeps_serving(afleet, gate_agent):
    ctx = afleet.client_context()
    cases = [
        (b"\x00\xff\xfegarbage\r\n\r\n", 400, {"error": "malformed request line"}),
        (b"\r\n", 400, {"error": "empty request"}),
        (b"POST /run HTTP/1.0\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(40)) + b"\r\n",
         431, {"error": "more than 32 header lines"}),
        (b"POST /run HTTP/1.0\r\nContent-Length: 2097152\r\n\r\n", 413,
         {"error": "body exceeds 1048576 bytes"}),
        (b"POST /run HTTP/1.0\r\nContent-Length: abc\r\n\r\n", 400,
         {"error": "invalid Content-Length"}),
        (wire.encode_request("GET", "/nope"), 404, {"error": "not found"}),
        (wire.encode_request("DELETE", "/run"), 404, {"error": "not found"}),
        (wire.encode_request("GET", "/run"), 404, {"error": "not found"}),
    ]
    for payload, want_status, want_body in cases:
        assert _exchange_raw(gate_agent, payload, ctx) == (want_status, want_body), payload[:40]
    bad_json = b"POST /run HTTP/1.0\r\nContent-Length: 9\r\n\r\n{not json"
    assert _exchange_raw(gate_agent, bad_json, ctx) == (200, {"exit": -1, "error": "invalid JSON"})
    for body in (b"[1,2]", b"\xff\xfe", b""):
        payload = b"POST /run HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        assert _exchange_raw(gate_agent, payload, ctx) == (200, {"exit": -1, "error": "invalid JSON"})
    for args in ("a b", {"x": 1}, 5):
        status, _h, data = afleet.request(gate_agent, "POST", "/run",
                                          {"script": "hello", "args": args, "reqid": "r1"})
        assert (status, data) == (200, {"script": "hello", "exit": -1, "reqid": "r1",
                                        "error": "args must be an array"})
    status, _h, data = afleet.request(gate_agent, "POST", "/run",
                                      {"script": "hello", "args": ["ok", 5], "reqid": "r2"})
    assert data["error"] == "args must be an array of strings"
    status, _h, data = afleet.request(gate_agent, "POST", "/ping", {"reqid": "still"})
    assert (status, data["status"]) == (200, "ok")


def test_raw_garbage_and_silent_clients_are_cut_off(afleet, gate_agent):
    # Non-TLS garbage: the handshake fails, nothing is answered.
    sock = socket.create_connection((gate_agent.address, gate_agent.port), timeout=10)
    try:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert sock.recv(4096)[:1] in (b"", b"\x15")  # EOF or a TLS alert, never HTTP
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    # A TCP client that never starts TLS, and a TLS client that never sends a
    # request, are both closed by the 2 s request deadline.
    started = time.monotonic()
    sock = socket.create_connection((gate_agent.address, gate_agent.port), timeout=15)
    try:
        assert sock.recv(4096) == b""
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    assert 1.5 < time.monotonic() - started < 10
    started = time.monotonic()
    raw = socket.create_connection((gate_agent.address, gate_agent.port), timeout=15)
    try:
        tls = afleet.client_context().wrap_socket(raw)
        tls.sendall(b"POST /ping HTTP/1.0\r\n")
        # drip-feed header bytes: the deadline is for the whole request, not per read
        try:
            for _ in range(40):
                tls.sendall(b"X")
                time.sleep(0.1)
        except OSError:
            pass
        try:
            assert tls.recv(4096) == b""
        except (ssl.SSLError, ConnectionResetError):
            pass
    finally:
        raw.close()
    assert time.monotonic() - started < 10
    _wait_log(gate_agent, "ACTION=read-timeout", 1)
    status, _h, _d = afleet.request(gate_agent, "POST", "/ping", {"reqid": "alive"})
    assert status == 200


def test_drip_fed_tls_handshake_is_cut_at_the_request_deadline(afleet, gate_agent):
    """Slowloris on the handshake: one ClientHello byte every 0.2 s must not hold a slot."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    hello_obj = afleet.client_context().wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        hello_obj.do_handshake()
    hello = outgoing.read()
    assert len(hello) > 100
    sock = socket.create_connection((gate_agent.address, gate_agent.port), timeout=10)
    started = time.monotonic()
    closed_after = None
    try:
        for index in range(len(hello) - 1):       # never completes the ClientHello
            try:
                sock.sendall(hello[index:index + 1])
                if sock.recv(1, socket.MSG_DONTWAIT) == b"":
                    closed_after = time.monotonic() - started
                    break
            except BlockingIOError:
                pass
            except OSError:
                closed_after = time.monotonic() - started
                break
            if time.monotonic() - started > 8:
                break
            time.sleep(0.2)
    finally:
        sock.close()
    assert closed_after is not None, "agent still waiting after 8 s of a drip-fed handshake"
    assert 1.5 < closed_after < 6, closed_after   # the 2 s request_timeout, for the whole handshake


# --- streaming -------------------------------------------------------------------------

def test_stream_true_sends_ndjson_events_then_exit(afleet, main_agent):
    reqid = wire.new_reqid()
    status, headers, events = afleet.request(main_agent, "POST", "/run",
                                             {"script": "streamer", "reqid": reqid, "stream": True})
    assert status == 200
    assert headers["content-type"] == "application/x-ndjson"
    assert "content-length" not in headers
    assert events[-1] == {"event": "exit", "exit": 5, "script": "streamer", "reqid": reqid}
    body = events[:-1]
    assert {e["event"] for e in body} <= {"stdout", "stderr"}
    assert "".join(e["data"] for e in body if e["event"] == "stdout") == "out1\nout2\n"
    assert "".join(e["data"] for e in body if e["event"] == "stderr") == "err1\n"
    # A refusal in stream mode is a normal JSON body.
    status, headers, data = afleet.request(main_agent, "POST", "/run",
                                           {"script": "nope", "reqid": reqid, "stream": True})
    assert headers["content-type"] == "application/json"
    assert data["error"] == "script not permitted"


def test_stream_flags_timeout_and_truncation_in_exit_event(afleet, main_agent):
    status, _h, events = afleet.request(main_agent, "POST", "/run",
                                        {"script": "spawner", "reqid": "s1", "stream": True,
                                         "timeout": 1})
    assert events[-1] == {"event": "exit", "exit": 126, "script": "spawner", "reqid": "s1",
                          "timed_out": True, "error": "timed out after 1s"}


def test_streaming_disabled_gives_a_normal_json_body(afleet, small_agent):
    status, headers, data = afleet.request(small_agent, "POST", "/run",
                                           {"script": "streamer", "reqid": "r", "stream": True})
    assert headers["content-type"] == "application/json"
    assert data == {"script": "streamer", "exit": 5, "stdout": "out1\nout2\n",
                    "stderr": "err1\n", "reqid": "r"}


# --- auth hook, allowed_ips -----------------------------------------------------------

HOOK = (
    "#!%s\nimport json, os, sys\n"
    "ctx = json.load(sys.stdin)\n"
    "with open(os.path.join(%r, 'hook-%%s.json' %% ctx['action']), 'w') as f:\n"
    "    json.dump({'stdin': ctx, 'dispatcher': os.environ.get('ENVEXEC_DISPATCHER'),\n"
    "               'env_token': os.environ.get('ENVEXEC_TOKEN')}, f)\n"
    "sys.exit(0 if ctx.get('token') == 'good-token-123' else 2)\n")


def test_agent_auth_hook_allows_denies_and_never_logs_tokens(afleet, tmp_path):
    seen = str(tmp_path)
    hook = write_executable(str(tmp_path / "hook.py"), HOOK % (PY, seen))
    agent = afleet.add_agent("hooked", scripts={"hello": "#!/bin/sh\necho hi\n"},
                             conf_extra={"auth_hook": hook})
    data = _run(afleet, agent, "hello", username="alice", token="good-token-123")
    assert (data["exit"], data["stdout"]) == (0, "hi\n")
    with open(os.path.join(seen, "hook-run.json")) as handle:
        record = json.load(handle)
    assert record["dispatcher"] == RUNS_OWNER
    assert record["env_token"] == "good-token-123"
    stdin = record["stdin"]
    assert (stdin["action"], stdin["script"], stdin["username"], stdin["token"]) == \
        ("run", "hello", "alice", "good-token-123")
    assert stdin["source_ip"] == "127.0.0.1" and stdin["hosts"] == []
    assert stdin["dispatcher_serial"] == pki.cert_serial(_dispatcher_pem(afleet))
    data = _run(afleet, agent, "hello", username="alice", token="bad-token-456")
    assert data == {"script": "hello", "exit": -1, "reqid": data["reqid"],
                    "error": "not authorised: bad credentials"}
    # The hook is not consulted for unlisted scripts (allowlist first).
    os.unlink(os.path.join(seen, "hook-run.json"))
    assert _run(afleet, agent, "nope", token="good-token-123")["error"] == "script not permitted"
    assert not os.path.exists(os.path.join(seen, "hook-run.json"))
    # Capabilities go through the hook too (action discovery, empty token -> denied).
    status, _h, data = afleet.request(agent, "GET", "/capabilities")
    assert (status, data) == (403, {"error": "not authorised"})
    log = agent.log()
    assert "good-token-123" not in log and "bad-token-456" not in log
    assert "REASON=\"bad credentials\"" in log


def test_missing_auth_hook_is_a_config_error(afleet, tmp_path):
    agent = afleet.add_agent("hookless", start=False,
                             conf_extra={"auth_hook": str(tmp_path / "absent-hook")})
    proc = _agent_cli("serve", "--config", agent.conf_path)
    assert proc.returncode == EX_CONFIG
    assert "auth_hook" in proc.stderr and agent.conf_path in proc.stderr


def test_allowed_ips_closes_other_sources(afleet):
    src = _source(10)
    agent = afleet.add_agent("fenced", scripts={"hello": "#!/bin/sh\necho hi\n"},
                             conf_extra={"allowed_ips": "%s, 10.0.0.0/8" % src})
    assert _refused(afleet, agent, afleet.client_context(), source="127.0.0.1")
    _wait_log(agent, "ACTION=ip-block PEER=127.0.0.1", 1)
    status, _h, data = afleet.request(agent, "POST", "/ping", {"reqid": "in"}, source=src)
    assert (status, data["status"]) == (200, "ok")


# --- rate limits -------------------------------------------------------------------------

def test_probe_limiter_blocks_a_source_after_three_tls_failures(afleet):
    agent = afleet.add_agent("probed", scripts={"hello": "#!/bin/sh\necho hi\n"})
    bad_ip, good_ip = _source(20), _source(21)
    no_cert = _ctx(afleet, None)
    for _ in range(3):
        assert _refused(afleet, agent, no_cert, source=bad_ip)
    _wait_log(agent, "ACTION=rate-block", 1)
    assert "REASON=probe" in agent.log()
    # The right certificate from the blocked IP is refused too ...
    assert _refused(afleet, agent, afleet.client_context(), source=bad_ip)
    # ... while another source still gets through.
    status, _h, _d = afleet.request(agent, "POST", "/ping", {"reqid": "ok"}, source=good_ip)
    assert status == 200
    # SIGHUP clears the limiter state.
    _reload(agent)
    status, _h, _d = afleet.request(agent, "POST", "/ping", {"reqid": "ok"}, source=bad_ip)
    assert status == 200


def test_volume_limiter_blocks_floods_but_forgives_trusted_dispatchers(afleet):
    agent = afleet.add_agent("flooded", scripts={"hello": "#!/bin/sh\necho hi\n"},
                             conf_extra={"rate_limit_volume": "3/60/300",
                                         "rate_limit_probe": "0/600/3600"})
    flood_ip, dispatcher_ip = _source(30), _source(31)
    # A trusted dispatcher may make many more connections than the limit.
    for n in range(8):
        status, _h, _d = afleet.request(agent, "POST", "/ping", {"reqid": str(n)},
                                        source=dispatcher_ip)
        assert status == 200, n
    # Raw TCP connects that never handshake count against the limit: the 4th
    # inside the window blocks the source ...
    for _ in range(4):
        socket.create_connection((agent.address, agent.port), timeout=5,
                                 source_address=(flood_ip, 0)).close()
    _wait_log(agent, "REASON=volume", 1)
    assert "PEER=%s" % flood_ip in agent.log()
    # ... for everyone from it, even a client with the right certificate.
    assert _refused(afleet, agent, afleet.client_context(), source=flood_ip)
    status, _h, _d = afleet.request(agent, "POST", "/ping", {"reqid": "x"}, source=dispatcher_ip)
    assert status == 200


# --- reload, config errors, command line -------------------------------------------------

def test_sighup_picks_up_new_allowlist_and_keeps_old_one_on_a_broken_file(afleet):
    agent = afleet.add_agent("reloader", scripts={"hello": "#!/bin/sh\necho hi\n"})
    assert _run(afleet, agent, "later")["error"] == "script not permitted"
    agent.write_script("later", "#!/bin/sh\necho later\n")
    _reload(agent)
    assert _run(afleet, agent, "later")["stdout"] == "later\n"
    with open(agent.allowlist_path, "a") as handle:
        handle.write("this line is broken\n")
    _reload(agent)
    assert "ACTION=reload-fail" in agent.log()
    assert "%s line" % agent.allowlist_path in agent.log()
    assert _run(afleet, agent, "later")["stdout"] == "later\n"
    assert _run(afleet, agent, "hello")["stdout"] == "hi\n"
    proc = _agent_cli("self-check", "--config", agent.conf_path)
    assert proc.returncode == EX_CONFIG and "line 5" in proc.stderr, proc.stderr


@pytest.mark.parametrize("line, expect", [
    ("this is not a key value line", "line 11: malformed line"),
    ("port = 99999", "line 11: port must be a whole number from 1 to 65535"),
    ("port = 12ab", "line 11: port must be a whole number"),
    ("bind = not-an-ip", "line 11: bind must be an IP address"),
    ("rate_limit_volume = 10/60", "line 11: rate_limit_volume must be limit/window/block"),
    ("max_output = lots", "line 11: max_output must be a whole number"),
    ("request_timeout = 0", "line 11: request_timeout must be a whole number from 1"),
])
def test_config_errors_exit_78_naming_file_and_line(afleet, line, expect):
    agent = afleet.add_agent("badconf-%d" % next(_COUNTER), start=False)
    with open(agent.conf_path) as handle:
        lines = handle.read().splitlines()
    lines.insert(10, line)   # becomes line 11, in the main section
    with open(agent.conf_path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    with open(agent.conf_path) as handle:
        assert handle.read().splitlines()[10] == line
    for command in ("serve", "self-check"):
        proc = _agent_cli(command, "--config", agent.conf_path)
        assert proc.returncode == EX_CONFIG, (command, proc.stderr)
        assert "%s %s" % (agent.conf_path, expect) in proc.stderr, proc.stderr


def test_serve_refuses_to_start_without_usable_tls_files(afleet):
    agent = afleet.add_agent("unusable", start=False)
    os.rename(os.path.join(agent.dir, "agent.crt"), os.path.join(agent.dir, "agent.crt.bak"))
    proc = _agent_cli("serve", "--config", agent.conf_path)
    assert proc.returncode == EX_CONFIG
    assert "not paired yet" in proc.stderr and agent.conf_path in proc.stderr
    os.rename(os.path.join(agent.dir, "agent.crt.bak"), os.path.join(agent.dir, "agent.crt"))
    with open(os.path.join(agent.dir, "agent.key"), "w") as handle:
        handle.write("not a key\n")
    proc = _agent_cli("serve", "--config", agent.conf_path)
    assert proc.returncode == EX_CONFIG
    assert "cannot load cert/key/ca" in proc.stderr and agent.conf_path in proc.stderr


def test_self_check_prints_scripts_and_exits_zero(afleet):
    agent = afleet.add_agent("checked", scripts={"hello": "#!/bin/sh\necho hi\n",
                                                 "zeta": "#!/bin/sh\n"}, start=False)
    noexec = agent.write_script("alpha", "#!/bin/sh\n")
    os.chmod(noexec, 0o644)
    proc = _agent_cli("self-check", "--config", agent.conf_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "3 script(s)" in out and "1 dispatcher(s)" in out
    assert re.search(r"alpha\s+\S+/alpha\s+NOT EXECUTABLE", out)
    assert re.search(r"hello\s+\S+/hello\s+ok", out)
    assert out.index("alpha") < out.index("hello") < out.index("zeta")
    other = os.path.join(agent.dir, "other-scripts.conf")
    with open(other, "w") as handle:
        handle.write("only = %s\n" % os.path.join(agent.scripts_dir, "hello"))
    proc = _agent_cli("self-check", "--config", agent.conf_path, "--allowlist", other)
    assert proc.returncode == 0 and "1 script(s)" in proc.stdout and "only" in proc.stdout


def test_pairing_status_and_version(afleet, tmp_path):
    agent = afleet.add_agent("statused", start=False)
    proc = _agent_cli("pairing-status", "--config", agent.conf_path)
    assert proc.returncode == 0 and proc.stdout.startswith("Paired."), proc.stdout + proc.stderr
    conf = tmp_path / "agent.conf"
    conf.write_text("port = 7443\ncert = agent.crt\nkey = agent.key\nca = ca.crt\n")
    proc = _agent_cli("pairing-status", "--config", str(conf))
    assert proc.returncode == 1 and proc.stdout.startswith("Not paired."), proc.stdout
    proc = _agent_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == "ctrl-exec-agent %s" % wire.VERSION


def test_agent_imports_with_stdlib_only():
    root = os.path.dirname(AGENT)
    proc = subprocess.run(
        ["python3", "-I", "-S", "-c",
         "import sys; sys.path.insert(0, %r); import ctrlexec_agent; "
         "print(ctrlexec_agent.VERSION, 'gevent' in sys.modules)" % root],
        capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [wire.VERSION, "False"]


def test_sigterm_stops_the_agent_cleanly(afleet):
    agent = afleet.add_agent("stopper")
    proc = agent.proc
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert "ACTION=stop" in agent.log()
    agent.proc = None
