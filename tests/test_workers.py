"""workers.py: one fan-out split across worker processes, against real agents.

Three real agents serve 72 targets (their names repeated), so a split really
happens (workers.SPLIT_MIN_HOSTS) without starting 72 agent processes. The rows of
a split run must equal the in-process rows, in request order. Streams are
interleaved live. A killed worker's hosts come back ``lost``, and the next run
starts a new worker. Cancel reaches the workers. Runs with a budget stay in-process.
Last, the API with ``dispatch_workers = 2``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

import engine
import workers
from apitest_support import ApiServer
from fleet import wait_for
from test_cli import cli
from test_engine import make_engine, start_agents, without_rtt

HELLO = "#!/bin/sh\necho \"hi $1\"\n"
NAP = "#!/bin/sh\nsleep \"${1:-2}\"\necho rested\n"
TICK = "#!/bin/sh\necho tick\nsleep 1\necho tock\n"
REQID = "00000000000000aa"
COPIES = 24


def split_engine(fleet, count: int = 2, **overrides) -> workers.SplitEngine:
    cfg = fleet.cfg
    opts = dict(read_timeout=cfg.read_timeout, max_parallel=cfg.max_parallel)
    opts.update(overrides)
    return workers.SplitEngine(workers=count, cert=cfg.cert, key=cfg.key, ca=cfg.ca, **opts)


@pytest.fixture
def trio(fleet):
    """Agents w-1..w-3 (scripts hello, nap) and 72 targets cycling over them, plus one unknown."""
    start_agents(fleet, ["w-1", "w-2", "w-3"], scripts={"hello": HELLO, "nap": NAP, "tick": TICK})
    names = ["w-1", "w-2", "w-3"] * COPIES
    names[40] = "ghost"
    return fleet, fleet.registry.resolve(names)


@pytest.fixture
def split(trio):
    fleet, _ = trio
    fanout = split_engine(fleet)
    try:
        yield fanout
    finally:
        fanout.close()


def test_slices_are_contiguous_and_even():
    assert workers._slices(list(range(7)), 3) == [(0, [0, 1, 2]), (1, [3, 4]), (2, [5, 6])]
    assert workers._slices([1], 4) == [(0, [1])]


def test_split_rows_equal_in_process_rows_in_request_order(trio, split):
    fleet, targets = trio
    assert split.splits(targets, engine.RunControl())
    local = make_engine(fleet).dispatch_all(targets, script="hello", args=["x"], reqid=REQID)
    rows = split.dispatch_all(targets, script="hello", args=["x"], reqid=REQID,
                              control=engine.RunControl())
    assert without_rtt(rows) == without_rtt(local)
    assert [row["host"] for row in rows] == [t.entry for t in targets]
    assert rows[40]["error"] == "unknown agent 'ghost' (not paired)"
    assert sum(row["exit"] == 0 for row in rows) == len(targets) - 1
    pids = {w.proc.pid for w in split._pool}
    assert len(pids) == 2 and os.getpid() not in pids
    assert split.stats["handshakes"] == 0          # this process dialled nobody


def test_split_streams_are_interleaved_live_and_complete(trio):
    fleet, targets = trio
    split = split_engine(fleet, max_parallel=200)       # every host in flight at once
    events = []
    rows = split.dispatch_all(targets, script="tick", args=[], reqid=REQID,
                              on_event=lambda event: events.append((time.monotonic(), event)))
    exits = [e for _, e in events if e["event"] == "exit"]
    assert len(exits) == len(targets) and len(rows) == len(targets)
    assert all(row["stdout"] == "tick\ntock\n" for row in rows if row["host"] != "ghost")
    first_exit = min(at for at, e in events if e["event"] == "exit" and e["exit"] == 0)
    ticks = [e for at, e in events if e["event"] == "stdout" and e["data"] == "tick\n"
             and at < first_exit]
    # Both workers' hosts stream their first line before any host has finished.
    assert len(ticks) == len(targets) - 1, len(ticks)
    split.close()


def test_async_submits_split_and_come_back_in_order(trio, split):
    _, targets = trio
    rows = split.dispatch_all(targets[:3] * 22, script="hello", args=[], reqid="00000000000000ab",
                              async_=True)
    assert len(rows) == 66
    # An agent runs one detached run per reqid at a time: the others are busy.
    assert [row["status"] for row in rows].count("accepted") >= 3
    assert {row["status"] for row in rows} <= {"accepted", "busy"}
    assert all(row["host"] == t.entry for row, t in zip(rows, targets[:3] * 22))


def test_a_killed_worker_leaves_lost_rows_and_is_replaced(trio, split):
    _, targets = trio
    import gevent
    victim = []

    def kill_soon():
        while split._pool[1] is None:
            gevent.sleep(0.05)
        gevent.sleep(0.5)
        victim.append(split._pool[1].proc.pid)
        os.kill(victim[0], signal.SIGKILL)

    killer = gevent.spawn(kill_soon)
    rows = split.dispatch_all(targets, script="nap", args=["2"], reqid=REQID)
    killer.join()
    assert {row.get("status") for row in rows[36:]} == {"lost"}
    assert "dispatch worker 1" in rows[50]["error"] and "may have run the script" in rows[50]["error"]
    assert all(row["exit"] == 0 for row in rows[:36] if row["host"] != "ghost")
    again = split.dispatch_all(targets, script="hello", args=[], reqid=REQID)
    assert sum(row["exit"] == 0 for row in again) == len(targets) - 1
    assert split._pool[1].proc.pid != victim[0]


def test_cancel_reaches_the_workers(trio):
    fleet, targets = trio
    split = split_engine(fleet, max_parallel=4)
    control = engine.RunControl()
    import gevent
    try:
        gevent.spawn_later(0.7, control.cancel)
        started = time.monotonic()
        rows = split.dispatch_all(targets, script="nap", args=["1"], reqid=REQID, control=control)
        took = time.monotonic() - started
    finally:
        split.close()
    skipped = [row for row in rows if row.get("status") == "skipped"]
    assert len(skipped) > 40 and len(rows) == len(targets)
    assert skipped[0]["error"] == "skipped: the run was cancelled before this host started"
    assert took < 15, took


def test_runs_with_a_budget_or_few_hosts_stay_in_process(trio, split):
    _, targets = trio
    assert not split.splits(targets, engine.RunControl(max_errors=3))
    assert not split.splits(targets, engine.RunControl(max_concurrency=5))
    assert not split.splits(targets, engine.RunControl(batch_wait=1))
    assert not split.splits(targets[:workers.SPLIT_MIN_HOSTS - 1], None)
    rows = split.dispatch_all(targets, script="hello", args=[], reqid=REQID,
                              control=engine.RunControl(max_errors=100))
    assert len(rows) == len(targets) and all(w is None for w in split._pool)


def test_dispatch_workers_must_be_a_positive_whole_number(fleet):
    with pytest.raises(engine.EngineError, match="dispatch_workers must be a whole number"):
        split_engine(fleet, count=0)


def _aliases(fleet, count: int = 70) -> list:
    """``count`` registry names a-00, a-01 … that point at the three agents in turn."""
    for index in range(count):
        record = dict(fleet.registry.get("w-%d" % (index % 3 + 1)))
        record["hostname"] = "a-%02d" % index
        fleet.registry.put("a-%02d" % index, record)
    return ["a-%02d" % index for index in range(count)]


def test_cli_with_two_dispatch_workers_runs_and_leaves_no_worker(trio):
    fleet, _ = trio
    hosts = _aliases(fleet)
    fleet.set_conf(dispatch_workers=2, max_hosts=500)
    done = cli(fleet.conf_path, "--json", "run", *hosts, "hello", "--", "cli")
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout)
    assert [row["host"] for row in answer["results"]] == hosts
    assert all(row["stdout"] == "hi cli\n" for row in answer["results"])
    assert "ACTION=dispatch-split HOSTS=70" in done.stderr

    def no_worker_left() -> bool:
        found = subprocess.run(["pgrep", "-f", "workers.py --fd"], capture_output=True, text=True)
        return found.stdout.strip() == ""

    wait_for(no_worker_left, "the CLI's dispatch workers to exit after it did", timeout_s=10)


def test_api_with_two_dispatch_workers_keeps_locks_and_records(trio, tmp_path):
    fleet, _ = trio
    hosts = _aliases(fleet)
    api = ApiServer.for_fleet(fleet, str(tmp_path / "api.log"), dispatch_workers=2,
                              max_hosts=500)
    api.start()
    try:
        status, _, answer = api.call("POST", "/run", {"hosts": hosts, "script": "hello",
                                                      "args": ["api"]}, timeout=60)
        assert status == 200, answer
        assert [row["host"] for row in answer["results"]] == hosts
        assert all(row["exit"] == 0 and row["stdout"] == "hi api\n" for row in answer["results"])
        status, _, stored = api.call("GET", "/status/%s" % answer["reqid"], timeout=30)
        assert status == 200 and len(stored["results"]) == 70
        status, _, locks = api.call("GET", "/runs?limit=1", timeout=30)
        assert status == 200 and locks["runs"][0]["reqid"] == answer["reqid"]
    finally:
        api.stop()
    log = open(api.log_path, encoding="utf-8", errors="replace").read()
    assert log.count("ACTION=dispatch-worker-start") == 2, log[-3000:]
    assert "ACTION=dispatch-split HOSTS=70 REQID=%s WORKERS=2" % answer["reqid"] in log
    assert "Traceback" not in log
