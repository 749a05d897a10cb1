"""Fault injection: each fault has a defined outcome, and nothing waits past its timeout.

Real pieces only: a real `python ctrlexec_api.py` process, real agents on
127.0.0.x (tests/fleet.py), real scripts and real auth-hook executables. Faults
are real too: SIGKILL / SIGSTOP / restarts of the processes, a read-only bind
mount (or chattr +i) on the run store, corrupt files in the registry, a DNS
name under .invalid, and a certificate from a second CA.

Every wait is bounded: HTTP calls carry socket timeouts, background calls are
joined with a timeout, polls use wait_for(); the bounds asserted are generous
upper limits that prove "bounded", never performance.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time

import pytest

import pki
import store
from apitest_support import ApiServer
from fleet import Fleet
from reliability_support import WAIT_S, Background, wait_for

#: Seconds the API waits for an agent's answer in the hang tests (read_timeout).
SHORT_READ_TIMEOUT_S = 3
#: The engine's TCP+TLS connect deadline: the default, and the short one set where a
#: test waits on it (connect_timeout in ctrl-exec.conf).
CONNECT_TIMEOUT_S = 10
SHORT_CONNECT_TIMEOUT_S = 3
#: Slack added to every "finished within its timeout" bound (2 shared cores).
SLACK_S = 8


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def marker_script(agent, name: str, body: str) -> str:
    """Allowlist a shell script that records its PID in <agent>/<name>.pid, then runs body."""
    pid_file = os.path.join(agent.dir, name + ".pid")
    agent.write_script(name, "#!/bin/sh\necho $$ > %s\n%s" % (pid_file, body))
    return pid_file


def add_agent(fleet, name: str, scripts: dict, **conf_extra):
    """Enroll name, write scripts (name -> body after the PID line), start it; return it."""
    agent = fleet.add_agent(name, conf_extra=conf_extra or None, start=False)
    agent.pid_files = {s: marker_script(agent, s, body) for s, body in scripts.items()}
    agent.start()
    return agent


def kill_recorded(agent) -> None:
    """Kill scripts orphaned by a killed agent (they run in their own process group)."""
    for path in getattr(agent, "pid_files", {}).values():
        try:
            with open(path) as fh:
                pid = int(fh.read().strip() or 0)
        except (OSError, ValueError):
            continue
        if pid > 1:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def api(fleet, tmp_path):
    """Factory: start the API for `fleet` with extra ctrl-exec.conf keys; stopped at teardown."""
    procs = []

    def start(**conf) -> ApiServer:
        proc = ApiServer.for_fleet(fleet, str(tmp_path / "api.log"), **conf).start()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()
    for agent in fleet.agents.values():
        kill_recorded(agent)


def run(api_proc, hosts, script, *, timeout=WAIT_S, **extra) -> tuple:
    body = dict({"hosts": hosts, "script": script}, **extra)
    return api_proc.call("POST", "/run", body, timeout=timeout)


def rows_by_host(body: dict) -> dict:
    return {row["host"]: row for row in body["results"]}


def status_of(api_proc, reqid: str) -> dict:
    status, _, body = api_proc.call("GET", "/status/" + reqid)
    assert status == 200, body
    return body


def completed(api_proc, reqid: str) -> dict | None:
    """The /status body once the run is complete, else None (for wait_for)."""
    body = status_of(api_proc, reqid)
    return body if body["complete"] else None


def stored_record(fleet, reqid: str) -> dict | None:
    return store.Store(fleet.cfg).runs.load(reqid)


@contextlib.contextmanager
def read_only(path: str):
    """Make a directory read-only for real, root included (ro bind mount / chattr +i / chmod)."""
    undo = None
    if os.geteuid() == 0:
        for setup, teardown in (
                (["mount", "--bind", "-o", "ro", path, path], ["umount", path]),
                (["chattr", "+i", path], ["chattr", "-i", path])):
            try:
                done = subprocess.run(setup, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if done.returncode == 0:
                undo = teardown
                break
    else:
        os.chmod(path, 0o555)
        undo = "chmod"
    probe = os.path.join(path, ".probe")
    try:
        with open(probe, "w"):
            pass
        os.unlink(probe)
        writable = True
    except OSError:
        writable = False
    try:
        if writable:
            pytest.skip("cannot make %s read-only here (no bind mount, chattr or chmod)" % path)
        yield
    finally:
        if undo == "chmod":
            os.chmod(path, 0o755)
        elif undo:
            subprocess.run(undo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)


# ---------------------------------------------------------------------------
# agent process faults
# ---------------------------------------------------------------------------


def test_agent_sigkilled_mid_run_is_an_inline_failure_and_frees_the_lock(fleet, api):
    victim = add_agent(fleet, "web-01", {"slow": "sleep 3\necho done\n"})
    add_agent(fleet, "web-02", {"slow": "sleep 1\necho done\n"})
    proc = api()
    call = Background(lambda: run(proc, ["web-01", "web-02"], "slow"))
    wait_for(lambda: os.path.exists(victim.pid_files["slow"]), "the script to start on web-01")
    victim.kill()                                             # SIGKILL mid-run
    status, _, body = call.join(WAIT_S)
    assert status == 200, body
    rows = rows_by_host(body)
    assert rows["web-01"]["exit"] == -1 and rows["web-01"]["error"], rows["web-01"]
    assert (rows["web-02"]["exit"], rows["web-02"]["stdout"]) == (0, "done\n")
    assert call.elapsed < WAIT_S
    # the record is stored, and the host+script lock was released with the response
    assert status_of(proc, body["reqid"])["results"] == body["results"]
    kill_recorded(victim)
    victim.start()
    status, _, again = run(proc, ["web-01"], "slow")
    assert status == 200 and again["results"][0]["exit"] == 0, again
    assert proc.alive()


def test_agent_sigstopped_is_bounded_by_read_and_connect_timeouts(fleet, api):
    hung = add_agent(fleet, "web-01", {"slow": "sleep 1\necho done\n"})
    proc = api(read_timeout=SHORT_READ_TIMEOUT_S, connect_timeout=SHORT_CONNECT_TIMEOUT_S)
    call = Background(lambda: run(proc, ["web-01"], "slow"))
    wait_for(lambda: os.path.exists(hung.pid_files["slow"]), "the script to start")
    hung.signal(signal.SIGSTOP)                               # hung mid-run
    try:
        # a new connection to the hung agent: TCP connects (kernel backlog), TLS never answers
        ping = Background(lambda: proc.call("POST", "/ping", {"hosts": ["web-01"]}))
        status, _, body = call.join(SHORT_READ_TIMEOUT_S + SLACK_S + 5)
        assert status == 200
        row = body["results"][0]
        assert row["exit"] == -1
        assert row["error"] == "read timeout after %gs" % SHORT_READ_TIMEOUT_S, row
        assert call.elapsed < SHORT_READ_TIMEOUT_S + SLACK_S
        status, _, pong = ping.join(SHORT_CONNECT_TIMEOUT_S + SLACK_S + 5)
        assert status == 200
        assert pong["results"][0]["status"] == "error"
        assert "did not respond" in pong["results"][0]["error"], pong
        assert ping.elapsed < SHORT_CONNECT_TIMEOUT_S + SLACK_S
        assert proc.health_ok()                               # the API itself never hung
    finally:
        hung.signal(signal.SIGCONT)
    status, _, pong = proc.call("POST", "/ping", {"hosts": ["web-01"]})
    assert pong["results"][0]["status"] == "ok", pong          # recovers once resumed


def test_agent_restarted_during_async_run_status_still_resolves(fleet, api):
    agent = add_agent(fleet, "web-01", {"job": "sleep 2\necho finished\n"})
    proc = api()
    status, _, sub = run(proc, ["web-01"], "job", **{"async": True})
    assert status == 202 and sub["results"][0]["status"] == "accepted", sub
    wait_for(lambda: os.path.exists(agent.pid_files["job"]), "the detached script to start")
    agent.stop()                                              # SIGTERM while the job runs
    down = status_of(proc, sub["reqid"])                      # agent down: pending + fetch_error
    assert down["complete"] is False and down["pending"] == ["web-01"]
    assert down["results"][0]["status"] in ("accepted", "running")
    assert down["results"][0].get("fetch_error"), down
    agent.start()
    done = wait_for(lambda: completed(proc, sub["reqid"]),
                    "the async run to complete after the agent restart", step_s=0.3)
    row = done["results"][0]
    assert (row["status"], row["exit"], row["stdout"]) == ("done", 0, "finished\n"), row
    assert done["pending"] == [] and isinstance(done["completed"], int)


def test_api_sigkilled_during_async_run_and_restarted_resolves_every_host(fleet, api, tmp_path):
    for name in ("web-01", "web-02", "web-03"):
        add_agent(fleet, name, {"job": "sleep 2\necho from-$$\n", "slow": "sleep 5\n"})
    proc = api()
    status, _, sub = run(proc, ["web-01", "web-02", "web-03", "ghost"], "job",
                         **{"async": True})
    assert status == 202, sub
    # a sync run is in flight (holding its locks) when the API dies
    inflight = Background(lambda: run(proc, ["web-01"], "slow", timeout=WAIT_S))
    wait_for(lambda: os.path.exists(fleet.agents["web-01"].pid_files["slow"]),
             "the in-flight sync run to start")
    proc.kill()                                               # SIGKILL: no graceful stop
    inflight.join(WAIT_S)
    assert inflight.error is not None                         # the client saw the connection die
    again = api(api_port=proc.port)                           # restart on the same port
    done = wait_for(lambda: completed(again, sub["reqid"]),
                    "the async run to complete after the API restart", step_s=0.3)
    rows = rows_by_host(done)
    for name in ("web-01", "web-02", "web-03"):
        assert (rows[name]["status"], rows[name]["exit"]) == ("done", 0), rows[name]
        assert rows[name]["stdout"].startswith("from-"), rows[name]
    assert rows["ghost"]["status"] == "error"
    # the dead process's flocks died with it: no stale 409 for the in-flight host+script
    status, _, body = run(again, ["web-01"], "slow", timeout=WAIT_S)
    assert status == 200 and body["results"][0]["exit"] == 0, body


# ---------------------------------------------------------------------------
# control-host state faults
# ---------------------------------------------------------------------------


def test_run_store_read_only_answers_results_and_logs_the_failed_write(fleet, api):
    add_agent(fleet, "web-01", {"hello": "echo hi\n"})
    proc = api()
    status, _, first = run(proc, ["web-01"], "hello")        # creates runs/
    assert status == 200
    runs_dir = store.Store(fleet.cfg).runs.backend.dir      # the file backend's runs/
    with read_only(runs_dir):
        status, _, body = run(proc, ["web-01"], "hello")
        assert status == 200, body                           # the scripts ran: results are answered
        assert body["results"][0]["stdout"] == "hi\n"
        status, _, sub = run(proc, ["web-01"], "hello", **{"async": True})
        assert status == 500, sub                            # untrackable: refused up front
        assert "nothing was dispatched" in sub["detail"]
        status, _, missing = proc.call("GET", "/status/" + body["reqid"])
        assert status == 404, missing                        # the sync record could not be stored
        assert status_of(proc, first["reqid"])["complete"] is True   # old records still readable
        assert proc.health_ok()
    log = proc.log()
    assert log.count("ACTION=run-store-fail") >= 2, log[-2000:]
    assert "ACTION=api-error" not in log
    status, _, after = run(proc, ["web-01"], "hello")        # writable again: stored again
    assert status == 200 and stored_record(fleet, after["reqid"]) is not None


CORRUPT_RECORDS = {
    "not-json": b"{not json",
    "empty": b"",
    "binary": b"\x00\xff\xfe garbage \x80",
    "array": b"[1, 2, 3]",
    "wrong-types": json.dumps({"hostname": 12, "ip": ["1"], "port": "x", "lookup_by": 7,
                               "tags": "nope"}).encode(),
}


def test_corrupt_registry_records_are_inline_errors_never_5xx(fleet, api):
    add_agent(fleet, "web-01", {"hello": "echo hi\n"})
    registry = store.Store(fleet.cfg).registry
    for name, data in CORRUPT_RECORDS.items():
        registry.backend.put(name, data)                # raw bytes, past the facade's encoding
    proc = api()
    names = ["web-01"] + sorted(CORRUPT_RECORDS)
    started = time.monotonic()
    status, _, body = run(proc, names, "hello")
    assert status == 200, body
    rows = rows_by_host(body)
    assert rows["web-01"]["exit"] == 0
    for name in CORRUPT_RECORDS:
        assert rows[name]["exit"] == -1 and rows[name]["error"], rows[name]
        if name != "wrong-types":      # unreadable records are never dialled
            assert rows[name]["error"] == "unknown agent '%s' (not paired)" % name
    status, _, pong = proc.call("POST", "/ping", {"hosts": names})
    assert status == 200 and len(pong["results"]) == len(names)
    status, _, disc = proc.call("GET", "/discovery")
    assert status == 200 and disc["hosts"]["web-01"]["status"] == "ok"
    assert all(disc["hosts"][n]["status"] == "error" for n in CORRUPT_RECORDS)
    status, _, spec = proc.call("GET", "/openapi-live.json")
    assert status == 200 and "web-01" in spec["components"]["schemas"]["RunRequest"][
        "properties"]["hosts"]["items"]["enum"]
    assert time.monotonic() - started < CONNECT_TIMEOUT_S + SLACK_S
    log = proc.log()
    assert "ACTION=registry-corrupt" in log and "ACTION=api-error" not in log
    assert proc.alive()


# ---------------------------------------------------------------------------
# auth hook faults (API side, and one on the agent)
# ---------------------------------------------------------------------------

#: Hook bodies swapped in atomically between requests (auth_hook_timeout = 1 s). Each
#: records its PID (and a background child's) in PIDS so the test can prove none is left.
HOOKS = {
    "crash": "kill -SEGV $$\n",
    "hang": "exec sleep 60\n",
    "hang-child": "sleep 60 &\necho $! >> PIDS\nsleep 60\n",
    "flood-then-allow": "head -c 20000000 /dev/zero\nhead -c 5000000 /dev/zero >&2\nexit 0\n",
    "flood-forever": "exec cat /dev/zero\n",
    "no-stdin-allow": "exec 0<&-\nexit 0\n",
    "no-stdin-hang": "exec 0<&-\nexec sleep 60\n",
    "exit-2-crash": "exit 2\n",
    "not-executable": None,
}
DENIED_TIMEOUT = (403, {"ok": False, "error": "denied", "code": 1,
                        "detail": "auth hook timed out after 1s"})


def install_hook(path: str, body: str | None, pids: str) -> None:
    """Atomically replace the hook; body None installs a non-executable file."""
    tmp = path + ".new"
    with open(tmp, "w") as fh:
        fh.write("#!/bin/sh\necho $$ >> %s\n" % pids)
        fh.write((body or "exit 0\n").replace("PIDS", pids))
    os.chmod(tmp, 0o755 if body is not None else 0o644)
    os.replace(tmp, path)


def pid_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture(scope="module")
def hook_env(tmp_path_factory):
    """One agent and one API process whose auth_hook file the tests swap; module-scoped."""
    root = tmp_path_factory.mktemp("hook-faults")
    fleet = Fleet(str(root))
    hook, pids = str(root / "hook"), str(root / "hook.pids")
    install_hook(hook, "exit 0\n", pids)
    proc = None
    try:
        add_agent(fleet, "web-01", {"hello": "echo hi\n"})
        proc = ApiServer.for_fleet(fleet, str(root / "api.log"), auth_hook=hook,
                                   auth_hook_timeout=1).start()
        yield proc, hook, pids
    finally:
        if proc is not None:
            proc.stop()
        fleet.stop_all()


@pytest.mark.parametrize("kind, expected", [
    ("crash", (403, {"ok": False, "error": "denied", "code": 1,
                     "detail": "auth hook killed by signal 11"})),
    ("hang", DENIED_TIMEOUT),
    ("hang-child", DENIED_TIMEOUT),
    ("flood-then-allow", (200, None)),
    ("flood-forever", DENIED_TIMEOUT),
    ("no-stdin-allow", (200, None)),
    ("no-stdin-hang", DENIED_TIMEOUT),
    # exit 2 is the contract's "bad credentials", whatever made the hook exit 2
    ("exit-2-crash", (403, {"ok": False, "error": "bad credentials", "code": 2})),
    ("not-executable", (403, {"ok": False, "error": "denied", "code": 1,
                              "detail": "auth hook is missing or not executable"})),
])
def test_api_auth_hook_faults_fail_closed_within_the_timeout(kind, expected, hook_env):
    proc, hook, pids = hook_env
    if os.path.exists(pids):
        os.unlink(pids)
    install_hook(hook, HOOKS[kind], pids)
    # 40 args x 2 KiB: an ~80 KiB hook context on stdin, above a 64 KiB pipe buffer, for
    # the hooks that never read it (and each ENVEXEC_ARGS* below execve's 128 KiB per string)
    body = {"hosts": ["web-01"], "script": "hello", "args": ["a" * 2048] * 40,
            "token": "SECRET-HOOK-TOKEN"}
    started = time.monotonic()
    status, _, answer = proc.call("POST", "/run", body)
    elapsed = time.monotonic() - started
    want_status, want_body = expected
    assert status == want_status, answer
    if want_body is not None:
        assert answer == want_body
    else:
        assert answer["results"][0]["exit"] == 0, answer
    assert elapsed < 2 * 1 + SLACK_S                          # at most two hook calls, 1 s each
    assert proc.alive()
    log = proc.log()
    assert "SECRET-HOOK-TOKEN" not in log and "ACTION=api-error" not in log
    # every hook process and its children are gone (the whole group is killed on timeout)
    if os.path.exists(pids):
        with open(pids) as fh:
            recorded = [int(line) for line in fh.read().split()]
        wait_for(lambda: not any(pid_alive(p) for p in recorded),
                 "hook processes %s to be gone" % recorded, timeout_s=10)


def test_args_too_large_for_the_hook_environment_are_denied_with_a_reason(hook_env):
    """~0.5 MB of args cannot go into ENVEXEC_ARGS (128 KiB kernel limit): fail closed, say why."""
    proc, hook, pids = hook_env
    install_hook(hook, "exit 0\n", pids)
    body = {"hosts": ["web-01"], "script": "hello", "args": ["a" * 2048] * 250}
    status, _, answer = proc.call("POST", "/run", body)
    assert status == 403, answer
    assert answer["error"] == "denied" and answer["code"] == 1
    assert "too large for the auth hook environment" in answer["detail"]


def test_large_args_within_the_hook_limit_reach_an_allowing_hook(hook_env):
    proc, hook, pids = hook_env
    install_hook(hook, "exit 0\n", pids)
    body = {"hosts": ["web-01"], "script": "hello", "args": ["a" * 2048] * 25}
    status, _, answer = proc.call("POST", "/run", body)
    assert status == 200, answer
    assert answer["results"][0]["exit"] == 0


def test_the_request_body_size_limit_applies_before_the_hook(hook_env):
    """The 1 MiB body limit comes first: a hanging hook is never even started for it."""
    proc, hook, pids = hook_env
    install_hook(hook, HOOKS["hang"], pids)
    started = time.monotonic()
    status, _, body = proc.call("POST", "/run", raw=b"{" + b" " * (2 << 20) + b"}")
    assert status == 413 and body["error"] == "payload too large"
    assert time.monotonic() - started < SLACK_S


def test_agent_auth_hook_hang_refuses_the_run_within_its_timeout(fleet, api, tmp_path):
    hook = str(tmp_path / "agent-hook")
    install_hook(hook, HOOKS["hang"], str(tmp_path / "agent-hook.pids"))
    agent = add_agent(fleet, "web-01", {"hello": "echo ran > %s\n" % (tmp_path / "ran")},
                      auth_hook=hook, auth_hook_timeout=1)
    proc = api()
    started = time.monotonic()
    status, _, body = run(proc, ["web-01"], "hello")
    assert status == 200
    row = body["results"][0]
    assert row["exit"] == -1 and row["error"] == "not authorised: denied", row
    assert time.monotonic() - started < 1 + SLACK_S
    assert not os.path.exists(str(tmp_path / "ran"))          # nothing executed
    assert agent.proc.poll() is None


# ---------------------------------------------------------------------------
# network identity faults
# ---------------------------------------------------------------------------


def test_unresolvable_dns_name_is_an_inline_error(fleet, api):
    add_agent(fleet, "web-01", {"hello": "echo hi\n"})
    fleet.registry.put("lost", {"hostname": "no-such-host.invalid", "ip": "", "port": 7443,
                                "lookup_by": "hostname", "tags": {}})
    proc = api()
    started = time.monotonic()
    status, _, body = run(proc, ["web-01", "lost"], "hello")
    assert status == 200
    rows = rows_by_host(body)
    assert rows["web-01"]["exit"] == 0
    assert rows["lost"]["exit"] == -1
    assert rows["lost"]["error"] == ("host 'no-such-host.invalid' did not resolve - check the "
                                     "name or use an IP address"), rows["lost"]
    status, _, pong = proc.call("POST", "/ping", {"hosts": ["lost"]})
    assert pong["results"][0]["error"].startswith("host 'no-such-host.invalid' did not resolve")
    assert time.monotonic() - started < CONNECT_TIMEOUT_S + SLACK_S


def test_agent_with_a_certificate_from_another_ca_is_refused(fleet, api, tmp_path):
    ran = tmp_path / "rogue-ran"
    rogue = add_agent(fleet, "rogue", {"hello": "echo ran > %s\n" % ran}, rate_limit_disable=1)
    other_ca = str(tmp_path / "other-ca")
    pki.create_ca(other_ca)
    cert_pem, key_pem = pki.issue_cert(other_ca, "rogue")
    rogue.stop()
    with open(os.path.join(rogue.dir, "agent.crt"), "wb") as fh:
        fh.write(cert_pem)
    with open(os.path.join(rogue.dir, "agent.key"), "wb") as fh:
        fh.write(key_pem)
    rogue.start()
    proc = api()
    for path, body in (("/run", {"hosts": ["rogue"], "script": "hello"}),
                       ("/ping", {"hosts": ["rogue"]})):
        status, _, answer = proc.call("POST", path, body)
        assert status == 200
        row = answer["results"][0]
        assert row.get("exit", -1) == -1 and row.get("status", "error") in ("error", "unreachable")
        assert row["error"] == ("TLS handshake with '%s' failed - certificate or trust mismatch"
                                % rogue.address), row
    status, _, disc = proc.call("GET", "/discovery")
    assert disc["hosts"]["rogue"]["status"] == "error"
    assert not ran.exists()                                   # nothing executed
