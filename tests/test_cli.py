"""The operator CLI (ctrlexec.py) end to end: real subprocesses, certificates and agents.

Every command runs as `python ctrlexec.py --config ... <command>` against a real
control host (tests/fleet.py) and real agent processes on 127.0.0.x; assertions
are on exit codes, stdout / stderr and the state files, never on internals.
"""

from __future__ import annotations

import glob
import json
import os
import re
import select
import signal
import stat
import subprocess
import sys
import time

import pytest

from fleet import ROOT, AgentHandle, free_address, wait_for, write_executable

import ctrlexec_agent as wire
import store

CLI = os.path.join(ROOT, "ctrlexec.py")
AGENT = os.path.join(ROOT, "ctrlexec_agent.py")
CLI_TIMEOUT_S = 90
#: Upper bound on how long a blocking test script waits for its release file.
HOLD_MAX_S = 30

OK_SCRIPT = '#!/bin/sh\necho "ok $*"\necho "note" >&2\n'
CHATTY_SCRIPT = '#!/bin/sh\necho one\necho warn >&2\nprintf "two\\nthree"\n'
FAIL_SCRIPT = '#!/bin/sh\necho "failing"\nexit 3\n'


# --- helpers ---------------------------------------------------------------------------------

def cli(conf_path: str, *argv: str, timeout: float = CLI_TIMEOUT_S, env: dict | None = None,
        **kwargs) -> subprocess.CompletedProcess:
    """Run `python ctrlexec.py --config conf_path argv...` to completion."""
    return subprocess.run([sys.executable, CLI, "--config", str(conf_path), *argv],
                          capture_output=True, text=True, timeout=timeout,
                          env=_env(env), stdin=kwargs.pop("stdin", subprocess.DEVNULL), **kwargs)


def cli_start(conf_path: str, *argv: str) -> subprocess.Popen:
    """Start the CLI in the background (the caller must stop it)."""
    return subprocess.Popen([sys.executable, CLI, "--config", str(conf_path), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env=_env(None))


def _env(extra: dict | None) -> dict:
    env = dict(os.environ, CTRL_EXEC_LOG="stderr", USER="tester")
    env.pop("ENVEXEC_TOKEN", None)
    env.pop("CTRL_EXEC_CONF", None)
    env.update(extra or {})
    return env


def stop_proc(proc: subprocess.Popen) -> None:
    """Kill a background process started by a test (by its own handle)."""
    if proc.poll() is None:
        proc.kill()
    try:
        proc.communicate(timeout=10)
    except (subprocess.TimeoutExpired, ValueError):
        pass


def as_json(result: subprocess.CompletedProcess):
    """Parse stdout as JSON (with the process output in the failure message)."""
    try:
        return json.loads(result.stdout)
    except ValueError:
        raise AssertionError("stdout is not JSON (rc %s):\n%s\nstderr:\n%s"
                             % (result.returncode, result.stdout, result.stderr[-3000:]))


def hold_script(shared: str, name: str) -> str:
    """A script that records each run (ran-<name>-<pid>) and, with arg "wait", blocks
    until <shared>/release exists (bounded), after touching started-<name>."""
    return ("#!/bin/sh\n"
            "touch '{d}/ran-{n}-'$$\n"
            "if [ \"$1\" = wait ]; then\n"
            "  touch '{d}/started-{n}'\n"
            "  i=0\n"
            "  while [ ! -e '{d}/release' ] && [ $i -lt {m} ]; do sleep 0.1; i=$((i+1)); done\n"
            "fi\n"
            "echo done-{n}\n").format(d=shared, n=name, m=HOLD_MAX_S * 10)


def runs_of(shared: str, name: str) -> int:
    return len(glob.glob(os.path.join(shared, "ran-%s-*" % name)))


@pytest.fixture
def shared(tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    os.chmod(folder, 0o777)
    return str(folder)


@pytest.fixture
def pair(fleet, shared):
    """Two agents, web-01 (role=web) and db-01 (role=db), each with ok / fail / hold."""
    for name, role in (("web-01", "web"), ("db-01", "db")):
        fleet.add_agent(name, tags={"role": role},
                        scripts={"okscript": OK_SCRIPT, "failscript": FAIL_SCRIPT,
                                 "chatty": CHATTY_SCRIPT, "hold": hold_script(shared, name)})
    return fleet


# --- issue 3: bootstrap a control host from an empty directory ---------------------------------

def test_bootstrap_from_empty_directory_setup_enroll_ping(tmp_path):
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    conf = ctl / "ctrl-exec.conf"
    conf.write_text("ca_dir = pki\nstate_dir = state\ndispatcher_id = cli-test\n"
                    "read_timeout = 20\n")

    first = cli(conf, "setup-ca")
    assert first.returncode == 0, first.stderr
    assert "CA created" in first.stdout
    again = cli(conf, "setup-ca")
    assert again.returncode == 2
    assert again.stdout == ""
    messages = [l for l in again.stderr.splitlines() if not l.startswith("ctrl-exec-dispatcher:")]
    assert len(messages) == 1 and "already exists" in messages[0]

    disp = cli(conf, "setup-dispatcher")
    assert disp.returncode == 0, disp.stderr
    for key in ("ca.key", "dispatcher.key"):
        assert stat.S_IMODE(os.stat(ctl / "pki" / key).st_mode) == 0o600
    assert (ctl / "pki" / "dispatcher.crt").exists() and (ctl / "pki" / "ca.crt").exists()

    agents = []
    try:
        for index in range(3):
            name = "node-%d" % index
            address, port = free_address()
            out = tmp_path / "agents" / name
            enrolled = cli(conf, "enroll", name, "--address", address, "--port", str(port),
                           "--tags", "role=web,idx=%d" % index, "--out", str(out))
            assert enrolled.returncode == 0, enrolled.stderr
            assert stat.S_IMODE(os.stat(out / "agent.key").st_mode) == 0o600
            for fname in ("agent.crt", "ca.crt", "ctrl-exec-dispatchers", "agent.conf",
                          "scripts.conf"):
                assert (out / fname).is_file()
            agent = AgentHandle(name, str(out), address, port)
            agents.append(agent)
            agent.start()

        names = [a.name for a in agents]
        human = cli(conf, "ping", *names)
        assert human.returncode == 0, human.stdout + human.stderr
        lines = human.stdout.splitlines()
        assert lines[0].split() == ["HOST", "STATUS", "RTT", "CERT", "EXPIRY", "VERSION", "DAYS",
                                    "LEFT"]
        for name, line in zip(names, lines[1:]):
            assert line.split()[:2] == [name, "ok"]

        data = as_json(cli(conf, "ping", *names, "--json"))
        assert data["ok"] is True and re.fullmatch(r"[0-9a-f]{16}", data["reqid"])
        assert [r["host"] for r in data["results"]] == names
        assert all(r["status"] == "ok" and r["version"] == wire.VERSION for r in data["results"])

        listed = as_json(cli(conf, "list-agents", "--json"))
        assert [r["name"] for r in listed] == names
        assert all(r["tags"]["role"] == "web" for r in listed)

        # A new dispatcher certificate changes the serial the agents trust: refused
        # without a TTY unless --yes is given.
        refused = cli(conf, "setup-dispatcher")
        assert refused.returncode == 2 and "--yes" in refused.stderr
        assert cli(conf, "setup-dispatcher", "--yes").returncode == 0
    finally:
        for agent in agents:
            agent.stop()


def test_setup_dispatcher_asks_on_a_tty_and_aborts_on_no(fleet):
    import pty
    fleet.add_agent("web-01", start=False)
    before = open(fleet.cfg.cert).read()
    master, slave = pty.openpty()
    try:
        os.write(master, b"n\n")
        result = cli(fleet.conf_path, "setup-dispatcher", stdin=slave)
    finally:
        os.close(slave)
        os.close(master)
    assert result.returncode == 1
    assert "[y/N]" in result.stderr and "Aborted" in result.stderr
    assert open(fleet.cfg.cert).read() == before


def test_enroll_rejects_bad_input_with_exit_2(fleet, tmp_path):
    bad_name = cli(fleet.conf_path, "enroll", "../evil", "--address", "127.0.0.9",
                   "--out", str(tmp_path / "x"))
    assert bad_name.returncode == 2 and "not valid" in bad_name.stderr
    bad_tags = cli(fleet.conf_path, "enroll", "ok-name", "--address", "127.0.0.9",
                   "--tags", "novalue", "--out", str(tmp_path / "y"))
    assert bad_tags.returncode == 2 and "key=value" in bad_tags.stderr
    missing_out = cli(fleet.conf_path, "enroll", "ok-name", "--address", "127.0.0.9")
    assert missing_out.returncode == 2 and "--out" in missing_out.stderr
    assert fleet.registry.names() == []


# --- issue 3: pairing through the CLI ----------------------------------------------------------

def _agent_folder(tmp_path, name):
    folder = tmp_path / name
    folder.mkdir()
    address, port = free_address()
    (folder / "agent.conf").write_text(
        "port = %d\nbind = %s\ncert = agent.crt\nkey = agent.key\nca = ca.crt\n"
        "trusted_dispatchers_path = ctrl-exec-dispatchers\nstate_dir = state\n"
        "hostname = %s\n" % (port, address, name))
    (folder / "scripts.conf").write_text("# empty\n")
    return folder, address, port


def _request_pairing(folder, address, port, name):
    return subprocess.Popen(
        [sys.executable, AGENT, "request-pairing", "--config", str(folder / "agent.conf"),
         "--dispatcher", address, "--port", str(port), "--name", name,
         "--lookup-by", "ip", "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL, env=_env(None))


def test_pairing_mode_list_requests_approve_deny_then_ping(fleet, tmp_path):
    conf = fleet.conf_path
    assert cli(conf, "list-requests").stdout.strip() == "no pending pairing requests"
    assert as_json(cli(conf, "list-requests", "--json")) == []
    assert cli(conf, "approve", "0123456789abcdef").returncode == 1
    assert cli(conf, "deny", "0123456789abcdef").returncode == 1

    bind, pair_port = free_address()
    pairing = cli_start(conf, "pairing-mode", "--bind", bind, "--port", str(pair_port),
                        "--timeout", "120")
    procs = [pairing]
    serve = None
    try:
        wait_for(lambda: _can_connect(bind, pair_port), "the pairing listener", timeout_s=20)
        good, good_addr, good_port = _agent_folder(tmp_path, "paired-01")
        bad, bad_addr, _ = _agent_folder(tmp_path, "refused-01")
        asking = _request_pairing(good, bind, pair_port, "paired-01")
        procs.append(asking)
        wait_for(lambda: len(as_json(cli(conf, "list-requests", "--json"))) == 1,
                 "one pending pairing request", timeout_s=30)
        [row] = as_json(cli(conf, "list-requests", "--json"))
        assert row["hostname"] == "paired-01" and re.fullmatch(r"\d{6}", row["code"])
        table = cli(conf, "list-requests").stdout.splitlines()
        assert table[0].split() == ["ID", "HOSTNAME", "SOURCE", "IP", "CODE", "RECEIVED"]
        assert row["id"] in table[1] and row["code"] in table[1]

        approved = cli(conf, "approve", row["id"], "--ip", good_addr, "--agent-port",
                       str(good_port), "--json")
        assert approved.returncode == 0, approved.stderr
        assert as_json(approved)["agent"]["lookup_by"] == "ip"
        out, err = asking.communicate(timeout=60)
        assert asking.returncode == 0, err

        refusing = _request_pairing(bad, bind, pair_port, "refused-01")
        procs.append(refusing)
        wait_for(lambda: len(as_json(cli(conf, "list-requests", "--json"))) == 1,
                 "one pending pairing request", timeout_s=30)
        [row] = as_json(cli(conf, "list-requests", "--json"))
        denied = cli(conf, "deny", row["id"])
        assert denied.returncode == 0 and "denied" in denied.stdout
        refusing.communicate(timeout=60)
        assert refusing.returncode == 3
        assert fleet.registry.names() == ["paired-01"]

        serve = subprocess.Popen([sys.executable, AGENT, "serve", "--config",
                                  str(good / "agent.conf")], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                 env=_env(None))
        procs.append(serve)
        wait_for(lambda: _can_connect(good_addr, good_port), "the paired agent", timeout_s=20)
        pinged = cli(conf, "ping", "paired-01", "--json")
        assert pinged.returncode == 0, pinged.stdout + pinged.stderr
        assert as_json(pinged)["results"][0]["status"] == "ok"

        pairing.send_signal(signal.SIGTERM)
        pairing.communicate(timeout=30)
        assert pairing.returncode == 0
    finally:
        for proc in procs:
            if proc is serve and proc.poll() is None:
                proc.terminate()
            stop_proc(proc)


def _can_connect(address: str, port: int) -> bool:
    import socket
    try:
        socket.create_connection((address, port), timeout=1).close()
        return True
    except OSError:
        return False


# --- issue 4 acceptance 1: failures are inline rows ---------------------------------------------

def test_run_reports_down_unregistered_and_slow_hosts_inline(fleet):
    fleet.set_conf(read_timeout=2)
    probe = '#!/bin/sh\necho "probe $1"\n'
    fleet.add_agent("good-01", scripts={"probe": probe})
    fleet.add_agent("good-02", scripts={"probe": probe})
    fleet.add_agent("down-01", scripts={"probe": probe}, start=False)
    fleet.add_agent("slow-01", scripts={"probe": "#!/bin/sh\nsleep 6\necho late\n"})
    hosts = ["good-01", "down-01", "ghost-01", "slow-01", "good-02"]

    started = time.monotonic()
    result = cli(fleet.conf_path, "run", *hosts, "probe", "--json", "--", "x")
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    data = as_json(result)
    assert data["ok"] is False
    rows = {r["host"]: r for r in data["results"]}
    assert [r["host"] for r in data["results"]] == hosts
    assert rows["good-01"]["exit"] == 0 and rows["good-01"]["stdout"] == "probe x\n"
    assert rows["good-02"]["exit"] == 0
    assert rows["down-01"]["exit"] == -1 and "connection refused" in rows["down-01"]["error"]
    assert rows["ghost-01"] == {"host": "ghost-01", "script": "probe", "exit": -1, "stdout": "", "stderr": "",
                                "error": "unknown agent 'ghost-01' (not paired)",
                                "reqid": data["reqid"], "rtt": "0ms", "status": "unreachable"}
    assert rows["slow-01"]["exit"] == -1 and rows["slow-01"]["error"] == "read timeout after 2s"
    assert [rows[h]["status"] for h in ("good-01", "down-01", "slow-01")] == \
        ["ok", "unreachable", "no_reply"]
    assert elapsed < 20  # in parallel: bounded by the one read timeout, not the sum

    human = cli(fleet.conf_path, "run", "good-01", "ghost-01", "probe", "--", "y")
    assert human.returncode == 1
    assert re.search(r"^==> good-01  OK  exit:0  \d+ms  req:[0-9a-f]{16}$", human.stdout, re.M)
    assert "probe y\n" in human.stdout
    assert re.search(r"^==> ghost-01  FAIL  exit:-1  0ms  req:[0-9a-f]{16}  UNREACHABLE$", human.stdout, re.M)
    assert "ERROR: unknown agent 'ghost-01' (not paired)" in human.stdout


def test_run_output_blocks_args_verbatim_and_exit_codes(pair):
    conf = pair.conf_path
    ok = cli(conf, "run", "web-01", "okscript", "--", "--json", "-x", "a b")
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    assert re.fullmatch(r"==> web-01  OK  exit:0  \d+ms  req:[0-9a-f]{16}", lines[0])
    assert lines[1:] == ["ok --json -x a b", "STDERR:", "note"]

    # Global options after the command; failure exit 1; JSON booleans.
    failed = cli(conf, "run", "web-01", "db-01", "failscript", "--json")
    assert failed.returncode == 1
    data = as_json(failed)
    assert data["ok"] is False and [r["exit"] for r in data["results"]] == [3, 3]
    both = as_json(cli(conf, "run", "--json", "web-01", "db-01", "okscript"))
    assert both["ok"] is True and both["results"][1]["stdout"] == "ok \n"

    refused = cli(conf, "run", "web-01", "not-allowed")
    assert refused.returncode == 1 and "script not permitted" in refused.stdout


def test_run_follow_prefixes_lines_as_they_arrive(pair):
    result = cli(pair.conf_path, "run", "web-01", "chatty", "--follow")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [l for l in lines if l.startswith("web-01 | ")] == [
        "web-01 | one", "web-01 | two", "web-01 | three"]
    assert "web-01 ! warn" in lines
    assert re.fullmatch(r"==> web-01  OK  exit:0  \d+ms  req:[0-9a-f]{16}", lines[-1])

    events = [json.loads(l) for l in cli(pair.conf_path, "run", "web-01", "chatty",
                                         "--follow", "--json").stdout.splitlines()]
    assert events[-1]["event"] == "done" and events[-1]["ok"] is True
    assert {"event": "stderr", "host": "web-01", "data": "warn\n"} in events
    assert any(e["event"] == "exit" and e["exit"] == 0 for e in events)


def test_progress_line_only_on_a_tty(pair):
    import pty
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, CLI, "--config", pair.conf_path, "run",
                             "web-01", "db-01", "okscript"], stdout=subprocess.PIPE,
                            stderr=slave, stdin=subprocess.DEVNULL, env=_env(None))
    os.close(slave)
    seen = b""
    try:
        end = time.monotonic() + CLI_TIMEOUT_S
        while time.monotonic() < end:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
        out = proc.stdout.read()
        proc.wait(timeout=30)
    finally:
        os.close(master)
        stop_proc(proc)
    assert proc.returncode == 0
    assert b"2/2 hosts done" in seen
    assert b"hosts done" not in out
    piped = cli(pair.conf_path, "run", "web-01", "db-01", "okscript")
    assert "hosts done" not in piped.stderr + piped.stdout


# --- issue 4 acceptance 3: locks --------------------------------------------------------------

def test_overlapping_run_is_locked_out_and_nothing_is_dispatched(pair, shared):
    conf = pair.conf_path
    first = cli_start(conf, "run", "web-01", "hold", "--", "wait")
    try:
        wait_for(lambda: os.path.exists(os.path.join(shared, "started-web-01")),
                 "the held run on web-01", timeout_s=30,
                 detail=lambda: first.stderr.read() if first.poll() is not None else "not started")
        assert as_json(cli(conf, "list-locks", "--json")) == [{"host": "web-01",
                                                               "script": "hold"}]
        assert cli(conf, "list-locks").stdout.split() == ["HOST", "SCRIPT", "web-01", "hold"]

        locked = cli(conf, "run", "db-01", "web-01", "hold")
        assert locked.returncode == 4
        assert "Locked: already running: web-01:hold" in locked.stderr
        assert locked.stdout == ""
        as_json_locked = cli(conf, "run", "db-01", "web-01", "hold", "--json")
        assert as_json_locked.returncode == 4
        assert as_json(as_json_locked) == {"ok": False, "error": "locked", "code": 4,
                                           "conflicts": ["web-01"]}
        # name:port names the same agent, so it holds the same lock.
        port = pair.agents["web-01"].port
        assert cli(conf, "run", "web-01:%d" % port, "hold").returncode == 4
        assert runs_of(shared, "db-01") == 0      # all or nothing: db-01 was not dialled
        assert runs_of(shared, "web-01") == 1

        # A different script on the same host, or the same script elsewhere, proceeds.
        assert cli(conf, "run", "web-01", "okscript").returncode == 0
        assert cli(conf, "run", "db-01", "hold").returncode == 0
        assert runs_of(shared, "db-01") == 1

        open(os.path.join(shared, "release"), "w").close()
        out, err = first.communicate(timeout=60)
        assert first.returncode == 0, err
        assert "done-web-01" in out
    finally:
        open(os.path.join(shared, "release"), "a").close()
        stop_proc(first)
    # Released after success and after failure.
    assert cli(conf, "list-locks").stdout.strip() == "no locks held"
    assert cli(conf, "run", "web-01", "hold").returncode == 0
    assert cli(conf, "run", "web-01", "failscript").returncode == 1
    assert cli(conf, "run", "web-01", "failscript").returncode == 1
    assert as_json(cli(conf, "list-locks", "--json")) == []


def test_locks_of_a_killed_cli_are_released(pair, shared):
    conf = pair.conf_path
    victim = cli_start(conf, "run", "web-01", "hold", "--", "wait")
    try:
        wait_for(lambda: os.path.exists(os.path.join(shared, "started-web-01")),
                 "the held run on web-01", timeout_s=30)
        assert cli(conf, "run", "web-01", "hold").returncode == 4
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        after = cli(conf, "run", "web-01", "hold")
        assert after.returncode == 0, after.stdout + after.stderr
        assert cli(conf, "list-locks").stdout.strip() == "no locks held"
    finally:
        open(os.path.join(shared, "release"), "a").close()
        stop_proc(victim)


# --- issue 4 acceptance 4: async runs, status and wait --------------------------------------

def _submit(conf, *argv) -> str:
    result = cli(conf, "run", "--async", "--json", *argv)
    data = as_json(result)
    assert data["async"] is True and re.fullmatch(r"[0-9a-f]{16}", data["reqid"])
    return data["reqid"]


def test_async_run_status_pending_then_complete_and_wait(pair, shared):
    conf = pair.conf_path
    started = time.monotonic()
    human = cli(conf, "run", "web-01", "db-01", "hold", "--async", "--", "wait")
    assert human.returncode == 0, human.stderr
    assert time.monotonic() - started < 20      # returns without waiting for the scripts
    match = re.search(r"^Submitted async run req:([0-9a-f]{16})$", human.stdout, re.M)
    assert match, human.stdout
    reqid = match.group(1)
    assert re.search(r"^  web-01  accepted$", human.stdout, re.M)
    assert re.search(r"^  db-01  accepted$", human.stdout, re.M)

    pending = cli(conf, "status", reqid)
    assert pending.returncode == 0
    assert pending.stdout.splitlines()[0] == "Request %s (script: hold) [PENDING]" % reqid
    view = as_json(cli(conf, "status", reqid, "--json"))
    assert view["complete"] is False and view["mode"] == "async"
    assert sorted(view["pending"]) == ["db-01", "web-01"]
    assert "submitter" not in view

    # Same script while it runs: the agents answer busy; no host accepted -> exit 1.
    busy = cli(conf, "run", "web-01", "hold", "--async")
    assert busy.returncode == 1 and re.search(r"^  web-01  BUSY", busy.stdout, re.M)

    assert cli(conf, "wait", reqid, "--timeout", "1").returncode == 2

    open(os.path.join(shared, "release"), "w").close()
    waited = cli(conf, "wait", reqid, "--timeout", "60")
    assert waited.returncode == 0, waited.stdout + waited.stderr
    done = cli(conf, "status", reqid)
    assert done.stdout.splitlines()[0] == "Request %s (script: hold) [COMPLETE]" % reqid
    assert "done-web-01" in done.stdout and "done-db-01" in done.stdout
    view = as_json(cli(conf, "status", reqid, "--json"))
    assert view["complete"] is True and view["pending"] == []
    assert [(r["host"], r["status"], r["exit"]) for r in view["results"]] == [
        ("web-01", "done", 0), ("db-01", "done", 0)]

    failing = _submit(conf, "web-01", "failscript")
    assert cli(conf, "wait", failing, "--timeout", "60").returncode == 1
    assert cli(conf, "wait", "0123456789abcdef").returncode == 1


def test_async_run_survives_an_agent_restart(pair, shared):
    conf = pair.conf_path
    reqid = _submit(conf, "web-01", "hold", "--", "wait")
    wait_for(lambda: os.path.exists(os.path.join(shared, "started-web-01")),
             "the held run on web-01", timeout_s=30)
    agent = pair.agents["web-01"]
    agent.stop()
    agent.start()
    open(os.path.join(shared, "release"), "w").close()
    waited = cli(conf, "wait", reqid, "--timeout", "60", "--json")
    assert waited.returncode == 0, waited.stdout + waited.stderr
    row = as_json(waited)["results"][0]
    assert (row["status"], row["exit"], row["stdout"]) == ("done", 0, "done-web-01\n")


# --- issue 4 acceptance 5: the run store ---------------------------------------------------

def test_run_records_status_from_new_process_purge_and_corruption(pair):
    conf = pair.conf_path
    secret = "tok-Very-Secret-123"
    run = cli(conf, "run", "web-01", "okscript", "--json", "--token", secret,
              "--username", "alice")
    reqid = as_json(run)["reqid"]
    # The record file's mode and bytes: test_store.py (file backend) checks those.
    runs = store.Store(pair.cfg).runs
    record = runs.load(reqid)
    assert secret not in json.dumps(record)
    assert record["mode"] == "sync" and record["complete"] is True
    assert record["hosts"] == ["web-01"] and record["script"] == "okscript"
    assert record["submitter"] == {"username": "alice", "source_ip": "127.0.0.1"}
    assert isinstance(record["completed"], int)

    status = cli(conf, "status", reqid)
    assert status.returncode == 0
    assert status.stdout.splitlines()[0] == "Request %s (script: okscript) [COMPLETE]" % reqid
    assert "ok \n" in status.stdout
    assert cli(conf, "wait", reqid).returncode == 0

    old = time.time() - 2 * 86400
    os.utime(runs.backend.where(reqid), (old, old))     # the file backend's age is the mtime
    purged = cli(conf, "purge")
    assert purged.returncode == 0 and purged.stdout.strip() == "purged 1 run record"
    assert as_json(cli(conf, "purge", "--json")) == {"ok": True, "purged": 0}
    gone = cli(conf, "status", reqid)
    assert gone.returncode == 1
    assert "no result for reqid %s" % reqid in gone.stderr

    runs.backend.put("00000000deadbeef", b"{not json", runs.retention_s)    # raw bytes, no facade
    corrupt = cli(conf, "status", "00000000deadbeef")
    assert corrupt.returncode == 1
    assert "unreadable" in corrupt.stderr and "Traceback" not in corrupt.stderr
    body = as_json(cli(conf, "status", "00000000deadbeef", "--json"))
    assert body["ok"] is False and body["error"] == "corrupt record"
    assert cli(conf, "status", "../../etc/passwd").returncode == 2


# --- issue 4 acceptance 6: discovery and tags ----------------------------------------------

def test_discovery_records_tags_and_list_agents_filters(pair):
    conf = pair.conf_path
    registry = pair.registry
    registry.update("web-01", tags={})
    registry.update("db-01", tags={})
    data = as_json(cli(conf, "discovery", "--json"))
    assert data["ok"] is True
    assert data["hosts"]["web-01"]["tags"] == {"role": "web"}
    assert data["hosts"]["db-01"]["tags"] == {"role": "db"}
    names = sorted(s["name"] for s in data["hosts"]["web-01"]["scripts"])
    assert names == ["chatty", "failscript", "hold", "okscript"]
    assert registry.get("web-01")["tags"] == {"role": "web"}
    assert registry.get("db-01")["tags"] == {"role": "db"}

    human = cli(conf, "discovery", "web-01", "ghost")
    assert human.returncode == 1
    assert "==> web-01  ok" in human.stdout and "role=web" in human.stdout
    assert "==> ghost  ERROR  unknown agent 'ghost' (not paired)" in human.stdout

    web = as_json(cli(conf, "list-agents", "--tags", "role=web", "--json"))
    assert [r["name"] for r in web] == ["web-01"]
    table = cli(conf, "list-agents", "--tags", "role=web").stdout.splitlines()
    assert table[0].split() == ["HOSTNAME", "IP", "PORT", "LOOKUP", "PAIRED", "CERT",
                                "EXPIRY", "DAYS", "LEFT", "TAGS"]
    assert len(table) == 2 and table[1].startswith("web-01 ") and table[1].endswith("role=web")
    assert as_json(cli(conf, "list-agents", "--tags", "role=web,env=prod", "--json")) == []
    assert cli(conf, "list-agents", "--tags", "role=web,role=db").returncode == 2
    assert cli(conf, "list-agents", "--tags", "role").returncode == 2


def test_unpair_removes_the_record_and_warns(pair):
    result = cli(pair.conf_path, "unpair", "db-01")
    assert result.returncode == 0
    assert "stays valid until" in result.stderr
    assert pair.registry.get("db-01") is None
    again = cli(pair.conf_path, "unpair", "db-01")
    assert again.returncode == 1 and "no agent named db-01" in again.stderr
    # An unpaired agent is never dialled again.
    ran = as_json(cli(pair.conf_path, "run", "db-01", "okscript", "--json"))
    assert ran["results"][0]["error"] == "unknown agent 'db-01' (not paired)"


# --- auth and usage errors -------------------------------------------------------------

def test_auth_hook_denial_exits_3_and_nothing_runs(pair, shared, tmp_path):
    conf = pair.conf_path
    seen = tmp_path / "hook-input.json"
    hook = write_executable(str(tmp_path / "hook.sh"),
                            "#!/bin/sh\ncat > '%s'\nexit ${HOOK_EXIT:-1}\n" % seen)
    pair.set_conf(auth_hook=hook)
    denied = cli(conf, "run", "web-01", "hold", "--token", "t0k", "--username", "bob")
    assert denied.returncode == 3
    assert denied.stderr.splitlines()[-1] == "Denied: denied"
    assert runs_of(shared, "web-01") == 0
    context = json.loads(seen.read_text())
    assert (context["action"], context["source_ip"], context["username"], context["token"],
            context["script"], context["hosts"]) == ("run", "127.0.0.1", "bob", "t0k", "hold",
                                                     ["web-01"])
    body = as_json(cli(conf, "ping", "web-01", "--json"))
    assert body == {"ok": False, "error": "denied", "code": 1}
    assert json.loads(seen.read_text())["action"] == "ping"

    privileged = cli(conf, "run", "web-01", "hold", env={"HOOK_EXIT": "3"})
    assert privileged.returncode == 3 and "insufficient privilege" in privileged.stderr
    allowed = cli(conf, "run", "web-01", "hold", env={"HOOK_EXIT": "0", "ENVEXEC_TOKEN": "e"})
    assert allowed.returncode == 0
    assert json.loads(seen.read_text())["token"] == "e"


@pytest.mark.parametrize("argv", [
    [],
    ["no-such-command"],
    ["run"],
    ["run", "web-01"],
    ["run", "web-01", "bad script!"],
    ["run", "web-01", "okscript", "--timeout", "0"],
    ["run", "web-01", "okscript", "--async", "--follow"],
    ["run", "web-01", "okscript", "--bogus"],
    ["ping"],
    ["wait", "abc", "--timeout", "-1"],
    ["pairing-mode", "--port", "70000"],
    ["approve", "abc", "--lookup-by", "dns"],
    ["list-agents", "--tags", "=x"],
    ["status"],
])
def test_usage_errors_exit_2(fleet, argv):
    result = cli(fleet.conf_path, *argv)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_config_errors_exit_2_with_one_line(tmp_path):
    missing = cli(str(tmp_path / "nope.conf"), "list-agents")
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "nope.conf" in missing.stderr
    bad = tmp_path / "bad.conf"
    bad.write_text("max_hosts = lots\n")
    broken = cli(str(bad), "list-agents", "--json")
    assert broken.returncode == 2
    assert as_json(broken)["error"] == "config error"


def test_max_hosts_and_duplicate_hosts(pair):
    pair.set_conf(max_hosts=2)
    too_many = cli(pair.conf_path, "run", "a", "b", "c", "okscript")
    assert too_many.returncode == 2 and "too many hosts (max 2)" in too_many.stderr
    # Duplicates collapse before counting and dispatching.
    data = as_json(cli(pair.conf_path, "run", "web-01", "web-01", "db-01", "okscript",
                       "--json"))
    assert [r["host"] for r in data["results"]] == ["web-01", "db-01"]
