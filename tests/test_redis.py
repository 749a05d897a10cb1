"""The Redis state backend: several real API nodes share runs, locks and live events.

Everything is real: a `redis-server` on a free loopback port (tests/redis_support.py),
two or three `python ctrlexec_api.py` processes on their own ports with one
ctrl-exec.conf each (state_backend = that server), real agents and scripts. The
backend classes are also driven directly (store.RedisRunBackend & co.) where a race
is easier to provoke in-process.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import threading
import time

import pytest

import config
import store
from apitest_support import ApiServer
from fleet import Fleet, free_port, wait_for
from redis_support import RedisServer

#: A lock lease short enough that a killed node's locks lapse quickly in tests.
LEASE_S = 2.0

SCRIPTS = {
    "hello": "#!/bin/sh\necho hello from $(hostname)\n",
    # Three lines a second apart: long enough to follow it from another node.
    "ticks": "#!/bin/sh\nfor i in 1 2 3; do echo tick $i; sleep 1; done\n",
    "sleep": "#!/bin/sh\nsleep \"${1:-5}\"\necho slept\n",
}


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(str(tmp_path / "redis")).start()
    try:
        yield server
    finally:
        server.kill()


class Nodes:
    """API nodes of one fleet sharing one Redis: node-N.conf beside ctrl-exec.conf."""

    def __init__(self, fleet: Fleet, tmp_path, redis_url: str) -> None:
        self.fleet = fleet
        self.tmp_path = tmp_path
        fleet.set_conf(state_backend=redis_url, lock_lease=LEASE_S)
        self.nodes: list = []

    def start(self, count: int) -> list:
        for _ in range(count):
            self.nodes.append(self.add().start())
        return self.nodes

    def add(self, **conf) -> ApiServer:
        number = len(self.nodes) + 1
        port = free_port()
        path = os.path.join(self.fleet.ctrl_dir, "node-%d.conf" % number)
        keys = dict(self.fleet.conf, api_port=str(port), **{k: str(v) for k, v in conf.items()})
        with open(path, "w") as handle:
            handle.write("".join("%s = %s\n" % item for item in keys.items()))
        return ApiServer(path, str(self.tmp_path / ("node-%d.log" % number)), port)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture
def cluster(tmp_path, redis_server):
    fleet = Fleet.with_agents(str(tmp_path), ["web-01", "web-02"], scripts=SCRIPTS)
    nodes = Nodes(fleet, tmp_path, redis_server.url)
    try:
        yield nodes
    finally:
        nodes.stop()
        fleet.stop_all()


def _follow(node: ApiServer, reqid: str, after: str | None = None, timeout: float = 60.0) -> list:
    path = "/runs/%s/events" % reqid + ("?after=%s" % after if after else "")
    status, headers, events = node.call("GET", path, timeout=timeout)
    assert status == 200, events
    assert headers["content-type"].startswith("application/x-ndjson")
    return events


# --- several nodes -----------------------------------------------------------------------

def test_a_run_on_node_a_is_stored_followed_and_resumed_on_node_b(cluster):
    node_a, node_b = cluster.start(2)
    started = {}

    def stream_on_a() -> None:
        started["answer"] = node_a.call("POST", "/run", {"hosts": ["web-01", "web-02"],
                                                        "script": "ticks", "stream": True},
                                        timeout=60)

    runner = threading.Thread(target=stream_on_a)
    runner.start()
    runner.join(60)
    status, _, streamed = started["answer"]
    assert status == 200
    reqid = streamed[0]["reqid"]

    followed = _follow(node_b, reqid)
    assert [e["event"] for e in followed][0] == "start" and followed[-1]["event"] == "done"
    # The same events, in the same order, as A streamed them (plus their ids).
    assert [{k: v for k, v in e.items() if k != "id"} for e in followed] == streamed
    ids = [e["id"] for e in followed]
    assert len(set(ids)) == len(ids)
    # Resumed after the third event: exactly the rest, no gap and no duplicate.
    assert _follow(node_b, reqid, after=ids[2]) == followed[3:]
    assert _follow(node_a, reqid, after=ids[-1]) == []      # nothing after done: ends at once

    status, record = node_b.request("GET", "/status/%s" % reqid)
    assert status == 200 and record["complete"] is True and record["mode"] == "sync"
    assert [row["host"] for row in record["results"]] == ["web-01", "web-02"]
    assert isinstance(record.get("fencing"), int) and record["fencing"] > 0


def test_a_live_run_is_followed_from_another_node_while_it_runs(cluster):
    node_a, node_b = cluster.start(2)
    answers = {}
    runner = threading.Thread(target=lambda: answers.setdefault("a", node_a.call(
        "POST", "/run", {"hosts": ["web-01"], "script": "ticks"}, timeout=60)))
    runner.start()
    try:
        reqid = wait_for(lambda: _live_reqid(cluster), "the run's event log", 20)
        began = time.monotonic()
        events = _follow(node_b, reqid)
        assert time.monotonic() - began > 0.5     # it waited for the live tail
    finally:
        runner.join(60)
    status, _, body = answers["a"]
    assert status == 200 and body["reqid"] == reqid
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    assert "tick 3" in "".join(e.get("data", "") for e in events)
    assert events[-1]["results"] == body["results"]


def _live_reqid(cluster) -> str | None:
    """The reqid of the (one) run whose event log exists in Redis."""
    got = cluster_redis_keys(cluster, "ctrlexec:events-meta:*")
    return got[0].split(":")[-1] if got else None


def cluster_redis_keys(cluster, pattern: str) -> list:
    url = cluster.fleet.conf["state_backend"]
    port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
    server = RedisServer.__new__(RedisServer)
    server.port, server.password = port, None
    reply = server.command("KEYS", pattern).decode()
    return [line for line in reply.split("\r\n") if line.startswith("ctrlexec:")]


def test_a_lock_held_on_one_node_is_a_409_on_another_naming_the_hosts(cluster):
    node_a, node_b = cluster.start(2)
    answers = {}
    runner = threading.Thread(target=lambda: answers.setdefault("a", node_a.call(
        "POST", "/run", {"hosts": ["web-01", "web-02"], "script": "sleep", "args": ["3"]},
        timeout=60)))
    runner.start()
    try:
        wait_for(lambda: cluster_redis_keys(cluster, "ctrlexec:lock:*"), "A's locks", 20)
        status, body = node_b.request("POST", "/run", {"hosts": ["web-02"], "script": "sleep",
                                                       "args": ["1"]})
        assert status == 409
        assert body == {"ok": False, "error": "locked", "code": 4, "conflicts": ["web-02"]}
        status, body = node_b.request("POST", "/run", {"hosts": ["web-02"], "script": "hello"})
        assert status == 200                           # another script: another lock
    finally:
        runner.join(60)
    assert answers["a"][0] == 200
    status, _ = node_b.request("POST", "/run", {"hosts": ["web-02"], "script": "sleep",
                                                "args": ["0"]})
    assert status == 200                               # released when A's run ended


def test_a_killed_node_releases_its_locks_within_the_lease(cluster):
    node_a, node_b = cluster.start(2)
    runner = threading.Thread(target=lambda: _quietly(node_a.call, "POST", "/run", {
        "hosts": ["web-01"], "script": "sleep", "args": ["30"]}, timeout=60))
    runner.start()
    wait_for(lambda: cluster_redis_keys(cluster, "ctrlexec:lock:*"), "A's lock", 20)
    status, _ = node_b.request("POST", "/run", {"hosts": ["web-01"], "script": "sleep",
                                                "args": ["0"]})
    assert status == 409
    time.sleep(LEASE_S * 2)                            # renewed while A lives
    assert node_b.request("POST", "/run", {"hosts": ["web-01"], "script": "sleep",
                                           "args": ["0"]})[0] == 409
    node_a.kill()
    killed = time.monotonic()
    wait_for(lambda: node_b.request("POST", "/run", {"hosts": ["web-01"], "script": "sleep",
                                                     "args": ["0"]})[0] == 200,
             "the lease of the killed node to lapse", LEASE_S + 10)
    assert time.monotonic() - killed <= LEASE_S + 2
    runner.join(60)


def _completed(node: ApiServer, reqid: str) -> dict | None:
    """The run's record from node once it is complete, else None."""
    status, record = node.request("GET", "/status/%s" % reqid)
    return record if status == 200 and record["complete"] else None


def _quietly(func, *args, **kwargs):
    try:
        return func(*args, **kwargs)
    except OSError:
        return None


def test_an_async_run_survives_the_node_that_started_it(cluster):
    node_a, node_b = cluster.start(2)
    status, body = node_a.request("POST", "/run", {"hosts": ["web-01", "web-02"],
                                                   "script": "sleep", "args": ["2"],
                                                   "async": True})
    assert status == 202
    reqid = body["reqid"]
    node_a.kill()
    record = wait_for(lambda: _completed(node_b, reqid), "the async run to complete, seen from B",
                      30, 0.5)
    assert [row["status"] for row in record["results"]] == ["done", "done"]
    assert all(row["stdout"] == "slept\n" for row in record["results"])
    events = _follow(node_b, reqid)
    assert events[0]["event"] == "start" and events[0]["async"] is True
    assert events[-1]["event"] == "done"
    assert sorted(e["host"] for e in events if e["event"] == "exit") == ["web-01", "web-02"]


def test_a_stopped_nodes_async_run_is_taken_over_and_unanswerable_hosts_are_lost(cluster):
    node_a, node_b = cluster.start(2)
    status, body = node_a.request("POST", "/run", {"hosts": ["web-01", "web-02"],
                                                   "script": "sleep", "args": ["1"],
                                                   "async": True})
    assert status == 202
    reqid = body["reqid"]
    node_a.kill()                                   # no graceful stop: its lease must lapse
    cluster.fleet.agents["web-02"].stop()           # and one agent can no longer answer

    record = wait_for(lambda: _completed(node_b, reqid), "B's reaper to settle the run",
                      LEASE_S * 6 + 20, 0.5)
    by_host = {row["host"]: row for row in record["results"]}
    assert by_host["web-01"]["status"] == "done" and by_host["web-01"]["stdout"] == "slept\n"
    assert by_host["web-02"]["status"] == "lost"
    assert by_host["web-02"]["error"].startswith(
        "the node that started this run stopped, and the agent could not be asked")
    assert record["owner"] != body.get("owner") and record["owner"]
    assert "ACTION=run-takeover" in node_b.log()
    events = _follow(node_b, reqid)
    assert events[-1]["event"] == "done"


def test_a_cancel_on_another_node_kills_the_run_and_skips_hosts_not_started(cluster):
    node_a, node_b = cluster.start(2)
    answers = {}
    runner = threading.Thread(target=lambda: answers.setdefault("a", node_a.call(
        "POST", "/run", {"hosts": ["web-01", "web-02"], "script": "sleep", "args": ["30"],
                         "max_concurrency": 1}, timeout=90)))
    runner.start()
    try:
        reqid = wait_for(lambda: _live_reqid(cluster), "the run's event log", 20)
        time.sleep(0.5)                                 # web-01's script is running
        status, body = node_b.request("POST", "/runs/%s/cancel" % reqid, {"grace": 1})
        assert status == 200, body
    finally:
        runner.join(90)
    status, _, run = answers["a"]
    assert status == 200
    assert [row["status"] for row in run["results"]] == ["cancelled", "skipped"]
    assert run["results"][1]["error"] == "skipped: the run was cancelled before this host started"


def test_many_clients_on_three_nodes_never_run_one_host_script_twice(tmp_path, redis_server):
    marker = str(tmp_path / "runs.log")
    guard = str(tmp_path / "running")
    script = ("#!/bin/sh\n"
              "if ! mkdir %s 2>/dev/null; then echo OVERLAP >> %s; exit 9; fi\n"
              "echo run >> %s\nsleep 0.05\nrmdir %s\n" % (guard, marker, marker, guard))
    fleet = Fleet.with_agents(str(tmp_path), ["web-01"], scripts={"count": script})
    nodes = Nodes(fleet, tmp_path, redis_server.url)
    try:
        api = nodes.start(3)

        def client(number: int) -> list:
            node = api[number % 3]
            out = []
            for _ in range(10):
                status, _, body = node.call("POST", "/run", {"hosts": ["web-01"],
                                                             "script": "count"}, timeout=60)
                out.append((status, body.get("reqid") if isinstance(body, dict) else None))
            return out

        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            answers = [row for rows in pool.map(client, range(20)) for row in rows]
        statuses = [status for status, _ in answers]
        assert set(statuses) <= {200, 409}, statuses
        with open(marker) as handle:
            lines = handle.read().split()
        assert "OVERLAP" not in lines                   # zero double runs
        ran = [reqid for status, reqid in answers if status == 200]
        assert len(lines) == len(ran) > 0
        for number, reqid in enumerate(ran):            # zero lost records, from any node
            status, record = api[number % 3].request("GET", "/status/%s" % reqid)
            assert status == 200 and record["results"][0]["exit"] == 0
    finally:
        nodes.stop()
        fleet.stop_all()


# --- Redis unavailable -------------------------------------------------------------------------

def test_redis_down_answers_503_and_the_node_recovers_by_itself(cluster, redis_server):
    (node,) = cluster.start(1)
    assert node.request("POST", "/run", {"hosts": ["web-01"], "script": "hello"})[0] == 200
    redis_server.kill()
    status, body = node.request("POST", "/run", {"hosts": ["web-01"], "script": "hello"})
    assert status == 503
    assert body == {"ok": False, "error": "service unavailable",
                    "detail": "the state backend is unreachable; nothing was changed, retry "
                              "when it is back"}
    assert node.request("GET", "/status/0123456789abcdef")[0] == 503
    assert node.health_ok()                            # the node itself is alive
    log = node.log()
    assert "Traceback" not in log and "api-fail" in log
    redis_server.start()                               # same port
    wait_for(lambda: node.request("POST", "/run", {"hosts": ["web-01"],
                                                   "script": "hello"})[0] == 200,
             "the node to use Redis again", 20, 0.5)


def test_startup_with_an_unreachable_redis_fails_loudly(tmp_path):
    fleet = Fleet(str(tmp_path))
    port = free_port()
    node = ApiServer.for_fleet(fleet, str(tmp_path / "api.log"),
                               state_backend="redis://:hunter2@127.0.0.1:%d/0" % port)
    started = time.monotonic()
    with pytest.raises(AssertionError):
        node.start(timeout_s=30)
    assert node.proc.returncode == 2
    assert time.monotonic() - started < 25
    log = node.log()
    assert "state_backend redis://:***@127.0.0.1:%d/0: cannot connect" % port in log
    assert "hunter2" not in log and "Traceback" not in log


def test_state_backend_is_validated_in_the_config(tmp_path):
    path = tmp_path / "ctrl-exec.conf"
    for value, ok in [("files", True), ("redis://127.0.0.1:6379/0", True),
                      ("rediss://:pw@redis.example.net:6380/2", True), ("redis://", False),
                      ("http://127.0.0.1:6379", False), ("redis://h:99999/0", False)]:
        path.write_text("state_backend = %s\n" % value)
        if ok:
            assert config.load(str(path)).state_backend == value
        else:
            with pytest.raises(config.ConfigError) as caught:
                config.load(str(path))
            assert "state_backend must be files or redis://" in str(caught.value) \
                or "port is 1-65535" in str(caught.value)
    path.write_text("state_backend = redis:/:secret@h\n")
    with pytest.raises(config.ConfigError) as caught:
        config.load(str(path))
    assert "secret" not in str(caught.value)


# --- the backends themselves -----------------------------------------------------------------

def _redis_store(tmp_path, url: str) -> store.Store:
    cfg = config.Config(state_dir=str(tmp_path / "state"), state_backend=url, lock_lease=LEASE_S)
    return store.open_store(cfg)


def test_record_update_and_ttl_in_redis(tmp_path, redis_server):
    states = _redis_store(tmp_path, redis_server.url)
    record = store.async_record(reqid="abcdef0123456789", script="s", hosts=["a", "b"],
                                results=[{"host": "a", "status": "accepted"},
                                         {"host": "b", "status": "accepted"}],
                                submitter={"username": "u", "source_ip": "127.0.0.1"})
    record["token"] = "SECRET"
    states.runs.save(record)
    assert "SECRET" not in redis_server.command("HGET", "ctrlexec:run:abcdef0123456789",
                                                "data").decode()
    ttl = int(redis_server.command("TTL", "ctrlexec:run:abcdef0123456789").decode()[1:].split()[0])
    assert 86000 < ttl <= 86400
    def mark(host):
        def apply(current):
            rows = [dict(row, status="done", exit=0) if row["host"] == host else row
                    for row in current["results"]]
            return store.settle_async(dict(current, results=rows))
        return apply

    calls = []

    def mark_a_while_b_lands(current):
        calls.append(1)
        if len(calls) == 1:         # another node's update lands between our read and write
            states.runs.update("abcdef0123456789", mark("b"))
        return mark("a")(current)

    states.runs.update("abcdef0123456789", mark_a_while_b_lands)
    assert len(calls) == 2          # the lost race was retried on the new record
    loaded = states.runs.load("abcdef0123456789")
    assert [row["status"] for row in loaded["results"]] == ["done", "done"]
    assert loaded["complete"] is True
    assert states.runs.update("0000000000000000", lambda r: r) is None


def test_leases_carry_increasing_fencing_numbers_and_release_compare_and_delete(tmp_path,
                                                                                redis_server):
    states = _redis_store(tmp_path, redis_server.url)
    first = states.locks.hold(["web-01", "web-02"], "deploy")
    assert first.fencing is not None
    with pytest.raises(store.LockConflict) as caught:
        states.locks.hold(["web-02", "web-03"], "deploy")
    assert caught.value.conflicts == ["web-02"]
    assert states.locks.held() == [{"host": "web-01", "script": "deploy"},
                                   {"host": "web-02", "script": "deploy"}]
    # Someone else's lease on the same key is never deleted by our release.
    key = "ctrlexec:lock:web-01--deploy.lock"
    redis_server.command("SET", key, "someone-else")
    first.release()
    assert redis_server.command("GET", key).startswith(b"$12")
    redis_server.command("DEL", key)
    second = states.locks.hold(["web-01"], "deploy")
    assert second.fencing > first.fencing
    second.release()
    assert states.locks.held() == []


def test_events_resume_after_an_id_in_redis(tmp_path, redis_server):
    states = _redis_store(tmp_path, redis_server.url)
    states.events.open("feedfeedfeedfeed", {"script": "s", "token": "SECRET"})
    assert "token" not in states.events.meta("feedfeedfeedfeed")
    ids = states.events.append("feedfeedfeedfeed", [{"event": "start"}, {"event": "stdout",
                                                                         "data": "x"},
                                                    {"event": "done"}])
    got = states.events.read("feedfeedfeedfeed")
    assert [event_id for event_id, _ in got] == ids
    assert states.events.read("feedfeedfeedfeed", ids[0]) == got[1:]
    with pytest.raises(store.StoreError):
        states.events.read("feedfeedfeedfeed", "not-an-id")
    assert json.dumps(got[1][1]) == '{"event": "stdout", "data": "x"}'
