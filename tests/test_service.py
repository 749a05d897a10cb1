"""The run service (service.py): one run transaction behind both front ends.

The API (a real `ctrlexec_api.py` process) and the CLI (a real `ctrlexec.py`
process) are driven with the same inputs against the same real agents and a
real auth hook; they must reject the same bad inputs with the same words, give
the hook the same context (the reqid included), and take no lock for a request
that fails validation. Async refresh is exercised on Service directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from apitest_support import ApiServer
from fleet import ROOT, write_executable

import ctrlexec_agent as wire
import service
import store
from engine import Engine

CLI = os.path.join(ROOT, "ctrlexec.py")
CLI_TIMEOUT_S = 60
POLL_LIMIT_S = 20.0
HELLO = '#!/bin/sh\necho "hello $*"\n'
#: The CLI gives its source address to the hook as the API's loopback callers do.
CLI_SOURCE_IP = "127.0.0.1"


def cli(fleet, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CTRL_EXEC_LOG="stderr", USER="tester")
    env.pop("ENVEXEC_TOKEN", None)
    env.pop("CTRL_EXEC_CONF", None)
    return subprocess.run([sys.executable, CLI, "--config", fleet.conf_path, *argv],
                          capture_output=True, timeout=CLI_TIMEOUT_S, env=env,
                          stdin=subprocess.DEVNULL)


def agent_runs(agent) -> int:
    """How many runs the agent logged (ACTION=run lines)."""
    return agent.log().count("ACTION=run ")


@pytest.fixture
def web(fleet, tmp_path):
    """web-01 with hello, an allow-all hook that records its env, and a running API."""
    agent = fleet.add_agent("web-01", scripts={"hello": HELLO})
    seen = tmp_path / "hook-env"
    hook = write_executable(str(tmp_path / "hook.sh"),
                            "#!/bin/sh\nctx=$(cat)\n"
                            "if [ \"$ENVEXEC_ACTION\" = run ]; then\n"
                            "  env | grep '^ENVEXEC_' | sort > '{0}'\n"
                            "  printf '%s' \"$ctx\" > '{0}.json'\n"
                            "fi\nexit 0\n".format(seen))
    api = ApiServer.for_fleet(fleet, str(tmp_path / "api.log"), auth_hook=hook,
                              max_hosts=2).start()
    try:
        yield fleet, agent, api, seen
    finally:
        api.stop()


def hook_seen(path) -> tuple:
    """(ENVEXEC_* variables, the JSON context on stdin) of the last run the hook saw."""
    env = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    with open(str(path) + ".json") as fh:
        return env, json.load(fh)


# --- acceptance: same hook context, reqid included ---------------------------------------

def test_api_and_cli_give_the_hook_the_same_context_with_the_reqid(web):
    fleet, agent, api, seen = web
    status, _, body = api.call("POST", "/run", {"hosts": ["web-01"], "script": "hello",
                                                "args": ["a"], "username": "alice"})
    assert status == 200, body
    api_env, api_ctx = hook_seen(seen)
    ran = cli(fleet, "run", "web-01", "hello", "--username", "alice", "--json", "--", "a")
    assert ran.returncode == 0, ran.stderr
    cli_env, cli_ctx = hook_seen(seen)

    assert api_env["ENVEXEC_REQID"] == api_ctx["reqid"] == body["reqid"]
    assert cli_env["ENVEXEC_REQID"] == cli_ctx["reqid"] == json.loads(ran.stdout)["reqid"]
    for env in (api_env, cli_env):
        assert store.RUN_REQID_RE.fullmatch(env["ENVEXEC_REQID"])
    differs = {"ENVEXEC_REQID", "ENVEXEC_TIMESTAMP", "reqid", "timestamp"}
    assert set(api_env) == set(cli_env) and set(api_ctx) == set(cli_ctx)
    for api_side, cli_side in ((api_env, cli_env), (api_ctx, cli_ctx)):
        assert {k: v for k, v in api_side.items() if k not in differs} == \
            {k: v for k, v in cli_side.items() if k not in differs}
    assert (api_env["ENVEXEC_ACTION"], api_env["ENVEXEC_SCRIPT"]) == ("run", "hello")
    assert api_env["ENVEXEC_USERNAME"] == "alice" and api_ctx["args"] == ["a"]


# --- acceptance: the same bad input gets the same words from both front ends -------------

#: (CLI words, script args after "--", the raw POST /run body saying the same, the detail).
BAD_RUNS = [
    (["web-01", "bad script!"], [], b'{"hosts": ["web-01"], "script": "bad script!"}',
     service.SCRIPT_DETAIL),
    (["web-01", "hello"], [b"\xff"],
     b'{"hosts": ["web-01"], "script": "hello", "args": ["\\udcff"]}', service.ARGS_DETAIL),
    (["web-01", "", "hello"], [], b'{"hosts": ["web-01", ""], "script": "hello"}',
     service.HOSTS_DETAIL),
    (["a", "b", "c", "hello"], [], b'{"hosts": ["a", "b", "c"], "script": "hello"}',
     "too many hosts (max 2)"),
    (["web-01", "hello", "--timeout", "0"], [],
     b'{"hosts": ["web-01"], "script": "hello", "timeout": 0}',
     "timeout must be a positive integer"),
    (["web-01", "hello"], ["x"] * (service.MAX_ARGS + 1),
     json.dumps({"hosts": ["web-01"], "script": "hello",
                 "args": ["x"] * (service.MAX_ARGS + 1)}).encode(), service.ARGS_DETAIL),
]


@pytest.mark.parametrize("words, script_args, raw, detail", BAD_RUNS,
                         ids=["script", "non-utf8-arg", "empty-host", "too-many-hosts",
                              "timeout", "too-many-args"])
def test_api_and_cli_reject_the_same_bad_run_with_the_same_message(web, words, script_args,
                                                                    raw, detail):
    fleet, agent, api, seen = web
    status, _, body = api.call("POST", "/run", raw=raw)
    assert (status, body) == (400, {"ok": False, "error": "bad request", "detail": detail})
    tail = ["--", *script_args] if script_args else []
    ran = cli(fleet, "run", *words, "--json", *tail)
    assert ran.returncode == 2, ran.stderr
    assert json.loads(ran.stdout) == {"ok": False, "error": "bad request", "detail": detail}
    plain = cli(fleet, "run", *words, *tail)
    assert plain.returncode == 2
    assert detail in plain.stderr.decode() and b"Traceback" not in plain.stderr
    assert not seen.exists(), "the run hook ran for a request that failed validation"


def test_a_non_utf8_cli_argument_exits_2_without_hook_lock_or_dispatch(web):
    fleet, agent, api, seen = web
    before = agent_runs(agent)
    ran = cli(fleet, "run", "web-01", "hello", "--", b"\xff")
    assert ran.returncode == 2
    assert ran.stderr.decode().splitlines()[-1] == "error: " + service.ARGS_DETAIL
    assert b"Traceback" not in ran.stderr
    assert not seen.exists(), "the run hook ran for a request that failed validation"
    assert b"ACTION=dispatch" not in ran.stderr and b"lock" not in ran.stderr.lower()
    assert store.open_store(fleet.cfg).locks.held() == []
    assert agent_runs(agent) == before


# --- Service directly: plan, locks, async refresh ------------------------------------------

def make_service(fleet) -> service.Service:
    cfg = fleet.cfg
    eng = Engine(cert=cfg.cert, key=cfg.key, ca=cfg.ca, read_timeout=cfg.read_timeout,
                 max_parallel=cfg.max_parallel)
    return service.Service(cfg, store.open_store(cfg), eng, caller="cli")


def plan(runs: service.Service, hosts: list, script: str, **fields):
    req = service.validate_run(dict(fields, hosts=hosts, script=script),
                               max_hosts=runs.cfg.max_hosts)
    return runs.plan_run(req, source_ip=CLI_SOURCE_IP,
                         mode="async" if fields.get("async") else "sync")


def test_plan_is_frozen_and_keeps_the_token_out_of_its_repr(fleet):
    fleet.add_agent("web-01", scripts={"hello": HELLO})
    runs = make_service(fleet)
    p = plan(runs, ["web-01"], "hello", token="s3cret", username="alice")
    assert "s3cret" not in repr(p) and p.token == "s3cret"
    assert p.submitter == {"username": "alice", "source_ip": CLI_SOURCE_IP}
    with pytest.raises(AttributeError):
        p.script = "other"


def test_run_holds_the_locks_while_dispatching_and_records_the_result(fleet):
    fleet.add_agent("web-01", scripts={"hello": HELLO})
    runs = make_service(fleet)
    p = plan(runs, ["web-01"], "hello", args=["x"])
    held_during = []

    def on_event(event: dict) -> None:
        if event.get("event") == "start":
            held_during.append(runs.store.locks.held())

    rows = runs.run(p, on_event=on_event)
    assert [(r["host"], r["exit"], r["stdout"]) for r in rows] == [("web-01", 0, "hello x\n")]
    assert held_during and held_during[0] != []
    assert runs.store.locks.held() == []
    record = runs.store.runs.load(p.reqid)
    assert record["script"] == "hello" and record["results"][0]["exit"] == 0
    assert "token" not in json.dumps(record)


def test_a_locked_host_is_a_conflict_naming_it_and_nothing_is_dispatched(fleet):
    agent = fleet.add_agent("web-01", scripts={"hello": HELLO})
    runs = make_service(fleet)
    before = agent_runs(agent)
    with runs.store.locks.hold(["web-01"], "hello"):
        with pytest.raises(store.LockConflict) as info:
            runs.run(plan(runs, ["web-01"], "hello"))
    assert info.value.conflicts == ["web-01"]
    assert agent_runs(agent) == before


def test_submit_then_refresh_to_completion_merges_into_the_stored_record(fleet):
    for name in ("job-1", "job-2"):
        fleet.add_agent(name, scripts={"job": "#!/bin/sh\nsleep 1\necho done\n"})
    runs = make_service(fleet)
    p = plan(runs, ["job-1", "ghost", "job-2"], "job", username="alice", **{"async": True})
    rows = runs.submit(p)
    assert [r["status"] for r in rows] == ["accepted", "error", "accepted"]
    seen = set()
    end = time.monotonic() + POLL_LIMIT_S
    record = runs.status(p.reqid, source_ip=CLI_SOURCE_IP, username="alice")
    while not record["complete"] and time.monotonic() < end:
        seen.update(row["status"] for row in record["results"])
        time.sleep(0.2)
        record = runs.status(p.reqid, source_ip=CLI_SOURCE_IP, username="alice")
    assert record["complete"] is True and record["pending"] == []
    assert isinstance(record["completed"], int)
    assert record["submitter"] == {"username": "alice", "source_ip": CLI_SOURCE_IP}
    done = [{k: v for k, v in row.items() if k != "rtt"} for row in record["results"]]
    assert done[0] == {"host": "job-1", "status": "done", "exit": 0, "stdout": "done\n",
                       "stderr": ""}
    assert done[1]["status"] == "error" and "not paired" in done[1]["error"]
    assert done[2]["host"] == "job-2" and done[2]["status"] == "done"
    assert seen <= {"accepted", "running", "done", "error"}
    assert runs.store.runs.load(p.reqid) == record
    # Once complete, another status asks no agent and changes nothing.
    assert runs.status(p.reqid, source_ip=CLI_SOURCE_IP)["completed"] == record["completed"]


def test_refresh_marks_unknown_reqids_expired_and_keeps_fetch_errors(fleet):
    fleet.add_agent("keeper", scripts={"job": HELLO})
    down = fleet.add_agent("gone", start=False)
    runs = make_service(fleet)
    reqid = wire.new_reqid()
    record = store.async_record(reqid=reqid, script="job", hosts=["keeper", "gone"],
                                results=[{"host": "keeper", "script": "job", "status": "accepted"},
                                         {"host": "gone", "script": "job", "status": "accepted"}],
                                submitter={"username": "", "source_ip": CLI_SOURCE_IP})
    runs.store.runs.save(record)
    record = runs.refresh(record)
    assert record["results"][0] == {"host": "keeper", "status": "expired"}
    assert record["results"][1]["status"] == "accepted"
    assert "connection refused" in record["results"][1]["fetch_error"]
    assert str(down.port) in record["results"][1]["fetch_error"]
    assert record["pending"] == ["gone"] and record["complete"] is False
    assert runs.store.runs.load(reqid) == record


def test_two_refreshes_of_one_record_do_not_lose_each_others_rows(fleet):
    fleet.add_agent("a-1", scripts={"job": HELLO})
    fleet.add_agent("a-2", scripts={"job": HELLO})
    runs = make_service(fleet)
    p = plan(runs, ["a-1", "a-2"], "job", **{"async": True})
    runs.submit(p)
    stale = runs.store.runs.load(p.reqid)
    end = time.monotonic() + POLL_LIMIT_S
    first = runs.refresh(stale)
    while not first["complete"] and time.monotonic() < end:
        time.sleep(0.2)
        first = runs.refresh(runs.store.runs.load(p.reqid))
    # A refresh that started from the stale copy merges into what is stored now.
    second = runs.refresh(stale)
    assert second["complete"] is True
    assert [row["status"] for row in second["results"]] == ["done", "done"]


def test_a_corrupt_record_is_reported_as_unreadable_without_its_contents(fleet):
    runs = make_service(fleet)
    runs.store.runs.backend.put("00000000deadbeef", b"{not json", runs.store.runs.retention_s)
    with pytest.raises(store.CorruptRecord) as info:
        runs.status("00000000deadbeef", source_ip=CLI_SOURCE_IP)
    assert str(info.value) == "the stored record for reqid 00000000deadbeef is unreadable"
