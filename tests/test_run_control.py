"""Fleet-scale run control on a real fleet of 20 agents: tag targeting, error budgets,
batches, cancel, honest per-host states, summaries and GET /runs.

One fleet (20 real agents on 127.0.x addresses, tagged role=web|db and env=prod|dev)
and one real API process are shared by the module; every script writes what it did
into files under the fleet's folder, so the tests count real executions.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

import service
from apitest_support import API_WAIT_S, ApiServer
from fleet import Fleet, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(ROOT, "ctrlexec.py")
AGENTS = ["node-%02d" % n for n in range(1, 21)]


def _tags(number: int) -> dict:
    return {"role": "web" if number <= 10 else "db", "env": "prod" if number % 2 else "dev"}


@pytest.fixture(scope="module")
def plant(tmp_path_factory):
    """(fleet, api, marks folder): 20 agents and one API, for the whole module."""
    root = str(tmp_path_factory.mktemp("run-control"))
    marks = os.path.join(root, "marks")
    os.makedirs(marks)
    def scripts(name: str) -> dict:
        return {
            # Appends its host to the marks of its first argument, then fails.
            "fail": "#!/bin/sh\necho %s >> %s/\"$1\"\necho failing >&2\nexit 3\n" % (name, marks),
            "mark": "#!/bin/sh\necho \"%s $(date +%%s.%%N)\" >> %s/\"$1\"\n" % (name, marks),
            "nap": "#!/bin/sh\nsleep \"$1\"\necho done\n",
            # Children in the script's process group: a cancel must take them all.
            "family": "#!/bin/sh\nsleep \"$1\" &\nsleep \"$1\" &\nwait\n",
            "stubborn": "#!/bin/sh\ntrap '' TERM\nsleep \"$1\"\n",
        }
    fleet = Fleet(root)
    try:
        for number, name in enumerate(AGENTS, 1):
            agent = fleet.add_agent(name, scripts=scripts(name), tags=_tags(number), start=False)
            agent.start()
        api = ApiServer.for_fleet(fleet, os.path.join(root, "api.log"), max_parallel=64)
        api.start()
    except BaseException:
        fleet.stop_all()
        raise
    try:
        yield fleet, api, marks
    finally:
        api.stop()
        fleet.stop_all()


def _marks(marks: str, name: str) -> list:
    try:
        with open(os.path.join(marks, name)) as handle:
            return [line.split()[0] for line in handle if line.strip()]
    except FileNotFoundError:
        return []


def _cli(fleet, *words: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CTRL_EXEC_LOG="stderr")
    return subprocess.run([sys.executable, CLI, "--config", fleet.conf_path, *words],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)


# --- targeting by tags -----------------------------------------------------------------------

def test_tags_select_hosts_and_the_resolved_list_is_recorded(plant):
    fleet, api, _ = plant
    status, body = api.request("POST", "/run", {"targets": {"tags": {"role": "db"}},
                                                "script": "nap", "args": ["0"]})
    assert status == 200
    assert [row["host"] for row in body["results"]] == AGENTS[10:]
    assert body["summary"]["ok"] == 10 and body["summary"]["failed"] == 0
    status, record = api.request("GET", "/status/%s" % body["reqid"])
    assert record["hosts"] == AGENTS[10:]
    assert record["targets"] == {"tags": {"role": "db"}}
    # Every key must match; a list means any of; hosts given besides come first.
    status, body = api.request("POST", "/ping", {"hosts": ["node-02"],
                                                 "targets": {"tags": {"role": ["web", "db"],
                                                                      "env": "prod"}}})
    assert status == 200
    assert [row["host"] for row in body["results"]] == ["node-02"] + AGENTS[0::2]


def test_tags_that_match_nothing_are_a_400_that_says_so(plant):
    _, api, _ = plant
    status, body = api.request("POST", "/run", {"targets": {"tags": {"role": "mail"}},
                                                "script": "nap"})
    assert status == 400
    assert body["detail"] == ('no registered agent matches targets.tags {"role":"mail"}; '
                              "discovery shows the fleet's tags")
    status, body = api.request("POST", "/run", {"targets": {"tags": {}}, "script": "nap"})
    assert status == 400 and body["detail"] == service.TARGETS_DETAIL


def test_cli_tags_select_the_same_hosts(plant):
    fleet, _, _ = plant
    done = _cli(fleet, "--json", "run", "--tags", "role=web,env=dev", "nap", "--", "0")
    assert done.returncode == 0, done.stderr
    import json
    body = json.loads(done.stdout)
    assert [row["host"] for row in body["results"]] == AGENTS[1:10:2]
    assert all(row["status"] == "ok" for row in body["results"])


# --- error budget and batches ----------------------------------------------------------------

@pytest.mark.parametrize("max_errors", [2, "10%"])
def test_the_budget_trips_at_exactly_the_right_count_and_nothing_starts_after(plant, max_errors):
    _, api, marks = plant
    tag = "budget-%s" % str(max_errors).replace("%", "pct")
    status, body = api.request("POST", "/run", {"hosts": AGENTS, "script": "fail", "args": [tag],
                                                "max_concurrency": 1, "max_errors": max_errors})
    assert status == 200
    ran = _marks(marks, tag)
    assert ran == AGENTS[:3]                    # 3 errors > 2 allowed: the 4th never starts
    rows = body["results"]
    assert [row["status"] for row in rows] == ["failed"] * 3 + ["skipped"] * 17
    assert all(row["exit"] == 3 for row in rows[:3])
    assert rows[3]["error"] == ("skipped: the error budget was exceeded (3 errors, "
                                "max_errors 2) before this host started")
    assert body["summary"] == {"ok": 0, "failed": 3, "timed_out": 0, "unreachable": 0,
                               "no_reply": 0, "cancelled": 0, "skipped": 17, "lost": 0,
                               "pending": 0}


def test_hosts_already_running_when_the_budget_trips_finish(plant):
    _, api, marks = plant
    status, body = api.request("POST", "/run", {"hosts": AGENTS, "script": "fail",
                                                "args": ["rolling"], "max_concurrency": 5,
                                                "max_errors": 0})
    assert status == 200
    ran = _marks(marks, "rolling")
    states = [row["status"] for row in body["results"]]
    # The first wave of 5 was in flight when the first error came back: all of it ran.
    assert 5 <= len(ran) < 20 and states.count("failed") == len(ran)
    assert states.count("skipped") == 20 - len(ran)


def test_percentages_round_as_documented():
    assert service._amount("12%", 20, round_up=True) == 3      # concurrency: up
    assert service._amount("12%", 20, round_up=False) == 2     # errors: down
    assert service._amount("1%", 20, round_up=True) == 1       # at least one host at a time
    assert service._amount("4%", 20, round_up=False) == 0      # 0.8 errors allowed: none
    assert service._amount(7, 20, round_up=True) == 7
    for bad, field in ((0, "max_concurrency"), ("0%", "max_concurrency"), (-1, "max_errors"),
                       ("101%", "max_errors"), ("ten", "max_errors")):
        with pytest.raises(service.BadRequest):
            service.validate_run({"hosts": ["a"], "script": "s", field: bad}, max_hosts=10)


def test_batches_wait_between_them(plant):
    _, api, marks = plant
    status, body = api.request("POST", "/run", {"hosts": AGENTS[:6], "script": "mark",
                                                "args": ["batches"], "max_concurrency": 3,
                                                "batch_wait": 1.5})
    assert status == 200 and body["summary"]["ok"] == 6
    with open(os.path.join(marks, "batches")) as handle:
        started = {line.split()[0]: float(line.split()[1]) for line in handle}
    first = max(started[h] for h in AGENTS[:3])
    second = min(started[h] for h in AGENTS[3:6])
    assert second - first >= 1.4


def test_async_runs_honour_the_budget_too(plant):
    _, api, _ = plant
    status, body = api.request("POST", "/run", {"hosts": ["node-01", "ghost", "node-02"],
                                                "script": "nap", "args": ["0"], "async": True,
                                                "max_concurrency": 1, "max_errors": 0})
    assert status == 202
    assert [row["status"] for row in body["results"]] == ["accepted", "error", "skipped"]


# --- honest states ------------------------------------------------------------------------------

def test_states_timed_out_and_unreachable(plant):
    fleet, api, _ = plant
    status, body = api.request("POST", "/run", {"hosts": ["node-05", "ghost-99"],
                                                "script": "nap", "args": ["5"], "timeout": 1})
    assert status == 200
    assert [row["status"] for row in body["results"]] == ["timed_out", "unreachable"]
    assert body["results"][1]["error"] == "unknown agent 'ghost-99' (not paired)"


# --- cancel -----------------------------------------------------------------------------------------

def _script_processes(marker: str) -> list:
    """PIDs of "sleep <marker>" processes (the scripts' own children)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as handle:
                argv = handle.read().split(b"\0")
            # The script's sleeps (not the CLI or the shell that carry the marker too).
            if argv[:2] == [b"sleep", marker.encode()]:
                found.append(int(pid))
        except OSError:
            continue
    return found


def test_cancel_of_a_long_sleep_leaves_no_process_behind(plant):
    _, api, _ = plant
    hosts = AGENTS[:3]
    # "sleep <marker>": unique in the process table, and over by itself in 90 s if a
    # failing test leaves it behind.
    marker = "90.3141%d" % os.getpid()
    answers = {}
    runner = threading.Thread(target=lambda: answers.setdefault("run", api.call(
        "POST", "/run", {"hosts": hosts, "script": "family", "args": [marker]}, timeout=120)))
    runner.start()
    try:
        wait_for(lambda: len(_script_processes(marker)) >= 6, "the six sleeps to start", 20)
        reqid = _running_reqid(api)
        status, _, body = api.call("POST", "/runs/%s/cancel" % reqid, {"grace": 2})
        assert status == 200, body
        assert sorted(row["host"] for row in body["results"]) == hosts
        assert all(row["status"] == "cancelled" for row in body["results"]), body
    finally:
        runner.join(60)
    status, _, run = answers["run"]
    assert status == 200
    assert [row["status"] for row in run["results"]] == ["cancelled"] * 3
    assert run["summary"]["cancelled"] == 3
    wait_for(lambda: not _script_processes(marker), "every script process to be gone", 10)
    status, _, body = api.call("POST", "/runs/%s/cancel" % run["reqid"])
    assert status == 409 and body["error"] == "finished"
    assert body["detail"].startswith("run %s has already finished" % run["reqid"])


def _running_reqid(api: ApiServer) -> str:
    """The reqid of the one run in flight, from the API's dispatch log line."""
    def found():
        lines = [line for line in api.log().splitlines() if "ACTION=dispatch" in line]
        return lines and lines[-1].split("REQID=")[1].split()[0]
    return wait_for(found, "the dispatch line", API_WAIT_S)


def test_cancel_of_an_unknown_run_is_a_404(plant):
    _, api, _ = plant
    status, _, body = api.call("POST", "/runs/0123456789abcdef/cancel")
    assert status == 404 and body["error"] == "not found"


# --- GET /runs ----------------------------------------------------------------------------------

def test_runs_lists_newest_first_with_filters_and_pages(plant):
    fleet, api, _ = plant
    reqids = []
    for host in ("node-07", "node-08", "node-09"):
        status, body = api.request("POST", "/run", {"hosts": [host], "script": "nap",
                                                    "args": ["0"], "username": "carol"})
        reqids.append(body["reqid"])
    status, body = api.request("GET", "/runs?user=carol&limit=2")
    assert status == 200
    assert [run["reqid"] for run in body["runs"]] == reqids[::-1][:2]
    assert body["next_offset"] == 2
    status, body = api.request("GET", "/runs?user=carol&limit=2&offset=2")
    assert [run["reqid"] for run in body["runs"]] == [reqids[0]] and body["next_offset"] is None
    status, body = api.request("GET", "/runs?host=node-08&script=nap&user=carol")
    assert [run["reqid"] for run in body["runs"]] == [reqids[1]]
    assert body["runs"][0]["summary"]["ok"] == 1 and body["runs"][0]["hosts"] == ["node-08"]
    status, body = api.request("GET", "/runs?state=skipped")
    assert all(run["summary"]["skipped"] for run in body["runs"]) and body["runs"]
    status, body = api.request("GET", "/runs?state=bogus")
    assert status == 400 and body["detail"].startswith("state must be one of ok, failed")
    done = _cli(fleet, "runs", "--user", "carol", "--limit", "5")
    assert done.returncode == 0 and reqids[0] in done.stdout and "ok 1" in done.stdout
    time.sleep(0)


def test_cancel_of_an_async_run_kills_it_and_its_rows_say_cancelled(plant):
    _, api, _ = plant
    marker = "90.2718%d" % os.getpid()
    status, body = api.request("POST", "/run", {"hosts": AGENTS[3:5], "script": "nap",
                                                "args": [marker], "async": True})
    assert status == 202
    wait_for(lambda: len(_script_processes(marker)) >= 2, "the detached sleeps to start", 20)
    status, cancel = api.request("POST", "/runs/%s/cancel" % body["reqid"], {"grace": 1})
    assert status == 200
    assert [row["status"] for row in cancel["results"]] == ["cancelled", "cancelled"]
    wait_for(lambda: not _script_processes(marker), "the detached sleeps to be gone", 10)

    def settled():
        status, record = api.request("GET", "/status/%s" % body["reqid"])
        return record if record["complete"] else None
    record = wait_for(settled, "the async record to settle", 20, 0.5)
    assert [row["status"] for row in record["results"]] == ["cancelled", "cancelled"]
    assert record["summary"]["cancelled"] == 2


def test_a_script_that_ignores_term_is_killed_after_the_grace(plant):
    _, api, _ = plant
    marker = "90.1618%d" % os.getpid()
    reqid_box = {}
    runner = threading.Thread(target=lambda: reqid_box.setdefault("run", api.call(
        "POST", "/run", {"hosts": ["node-20"], "script": "stubborn", "args": [marker]},
        timeout=120)))
    runner.start()
    try:
        wait_for(lambda: _script_processes(marker), "the stubborn sleep to start", 20)
        reqid = _running_reqid(api)
        started = time.monotonic()
        status, _, body = api.call("POST", "/runs/%s/cancel" % reqid, {"grace": 1})
        assert status == 200 and body["results"][0]["signal"] == "KILL", body
        assert time.monotonic() - started < 10
    finally:
        runner.join(60)
    assert reqid_box["run"][2]["results"][0]["status"] == "cancelled"
    assert not _script_processes(marker)


def test_cancel_skips_the_hosts_not_started_yet(plant):
    _, api, marks = plant
    marker = "90.1414%d" % os.getpid()
    answers = {}
    runner = threading.Thread(target=lambda: answers.setdefault("run", api.call(
        "POST", "/run", {"hosts": AGENTS[10:15], "script": "nap", "args": [marker],
                         "max_concurrency": 1}, timeout=120)))
    runner.start()
    try:
        wait_for(lambda: _script_processes(marker), "the first host's sleep", 20)
        reqid = _running_reqid(api)
        status, _, body = api.call("POST", "/runs/%s/cancel" % reqid, {"grace": 1})
        assert status == 200
    finally:
        runner.join(60)
    rows = answers["run"][2]["results"]
    assert [row["status"] for row in rows] == ["cancelled"] + ["skipped"] * 4
    assert rows[1]["error"] == "skipped: the run was cancelled before this host started"


def test_cli_cancel_and_ctrl_c_with_cancel_on_interrupt(plant):
    fleet, api, _ = plant
    import signal as signals
    marker = "90.1732%d" % os.getpid()
    env = dict(os.environ, CTRL_EXEC_LOG="stderr")
    follow = subprocess.Popen([sys.executable, CLI, "--config", fleet.conf_path, "run",
                               "node-16", "nap", "--follow", "--cancel-on-interrupt", "--",
                               marker], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=ROOT)
    try:
        wait_for(lambda: _script_processes(marker), "the followed sleep", 20)
        follow.send_signal(signals.SIGINT)
        out, err = follow.communicate(timeout=60)
    finally:
        if follow.poll() is None:
            follow.kill()
    assert "cancelled " in err and "node-16 cancelled" in err, err
    wait_for(lambda: not _script_processes(marker), "the sleep to be gone", 10)
    # cancel REQID of a finished run: a clear error, exit 1.
    status, body = api.request("POST", "/run", {"hosts": ["node-17"], "script": "nap",
                                                "args": ["0"]})
    done = _cli(fleet, "cancel", body["reqid"])
    assert done.returncode == 1
    assert "has already finished; there is nothing to cancel" in done.stderr


def test_an_agent_without_cancel_is_reported_not_cancellable():
    import engine
    from collections import namedtuple
    target = namedtuple("Target", "entry name address port")("old-01", "old-01", "127.0.0.9", 1)
    answer = engine._Answer(404, {"error": "not found"}, "", "3ms", False)
    assert engine._cancel_row(target, answer) == {
        "host": "old-01", "status": "not_cancellable", "rtt": "3ms",
        "error": "this agent cannot cancel runs (no /cancel; upgrade the agent)"}


def test_streamed_runs_honour_the_budget_and_report_skipped_hosts(plant):
    _, api, marks = plant
    status, headers, events = api.call("POST", "/run", {
        "hosts": AGENTS[5:8], "script": "fail", "args": ["streamed"], "stream": True,
        "max_concurrency": 1, "max_errors": 0}, timeout=60)
    assert status == 200 and headers["content-type"].startswith("application/x-ndjson")
    done = events[-1]
    assert done["event"] == "done"
    assert [row["status"] for row in done["results"]] == ["failed", "skipped", "skipped"]
    assert sorted(e["host"] for e in events if e["event"] == "exit") == AGENTS[5:8]
    assert _marks(marks, "streamed") == AGENTS[5:6]
