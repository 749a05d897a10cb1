"""Load and concurrency, bounded in time: real API process, ten real agents.

1. CLIENTS concurrent clients x RUNS_PER_CLIENT sync runs each, every run on 2 random
   hosts of 10 with one of 3 scripts, so runs overlap on host+script all the time; a
   run refused with the 409 lock conflict is retried until it runs. Every answer must
   be 200 or 409 (never 5xx), every 200's reqid must have a stored record, and each
   script proves the locks: it takes an exclusive marker (mkdir is atomic) for its
   host+script and records a violation if the marker is already there, i.e. if the
   same script ever ran twice on one host at once.
2. Memory: the API's RSS after 2,000 mixed requests stays within 20 MB of its RSS after
   the first 200.

Scale: the full 50 x 20 (1,000 runs, 3,000 script executions) is the default; set
CTRL_EXEC_LOAD_SCALE=0.2 (for example) to shrink the client count on a slow machine.
"""

from __future__ import annotations

import collections
import os
import random
import threading
import time

import pytest

import store
from apitest_support import ApiServer
from fleet import Fleet

SCALE = float(os.environ.get("CTRL_EXEC_LOAD_SCALE", "1"))
CLIENTS = max(2, int(50 * SCALE))
RUNS_PER_CLIENT = 20
AGENTS = ["node-%02d" % i for i in range(1, 11)]
SCRIPTS = ["job-a", "job-b", "job-c"]
HOSTS_PER_RUN = 2
#: A run refused with 409 is retried (after a short random pause) up to this many times.
MAX_ATTEMPTS = 500
#: Upper bound for the whole concurrent phase (a hang guard, not a performance assertion).
LOAD_DEADLINE_S = 240.0
MEMORY_WARMUP = 200
MEMORY_TOTAL = 2000
MEMORY_GROWTH_LIMIT_KB = 20 * 1024
EXCLUSIVE = """#!/bin/sh
# Exclusive marker: mkdir is atomic, so a second concurrent run of this script on this
# host fails here and records the overlap the host+script locks must prevent.
marker=%(dir)s/running-%(script)s
if ! mkdir "$marker" 2>/dev/null; then
    echo "%(script)s overlapped" >> %(dir)s/violations
    exit 9
fi
sleep 0.02
rmdir "$marker"
echo ok
"""


class Worker:
    """One client: RUNS_PER_CLIENT runs, each retried after a 409 until it ran (bounded)."""

    def __init__(self, api: ApiServer, seed: int) -> None:
        self.api = api
        self.rng = random.Random(seed)
        self.answers = []
        self.errors = []
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        for _ in range(RUNS_PER_CLIENT):
            body = {"hosts": self.rng.sample(AGENTS, HOSTS_PER_RUN),
                    "script": self.rng.choice(SCRIPTS)}
            for _attempt in range(MAX_ATTEMPTS):
                try:
                    status, _, answer = self.api.call("POST", "/run", body, timeout=60)
                except Exception as exc:  # reported by the test: a transport failure fails it
                    self.errors.append("%s: %s" % (type(exc).__name__, exc))
                    break
                self.answers.append((status, answer))
                if status != 409:
                    break
                time.sleep(self.rng.uniform(0.05, 0.25))     # someone holds a lock: retry


@pytest.fixture(scope="module")
def load_fleet(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("load"))
    fleet = Fleet(root)
    try:
        for name in AGENTS:
            agent = fleet.add_agent(name, start=False)
            for script in SCRIPTS:
                agent.write_script(script, EXCLUSIVE % {"dir": agent.dir, "script": script})
            agent.write_script("quick", "#!/bin/sh\necho ok\n")
            agent.start()
        yield fleet
    finally:
        fleet.stop_all()


def test_concurrent_clients_overlapping_runs_no_5xx_records_stored_locks_hold(load_fleet,
                                                                              tmp_path):
    api = ApiServer.for_fleet(load_fleet, str(tmp_path / "api.log")).start()
    try:
        workers = [Worker(api, seed) for seed in range(CLIENTS)]
        started = time.monotonic()
        for worker in workers:
            worker.thread.start()
        for worker in workers:
            worker.thread.join(max(1.0, LOAD_DEADLINE_S - (time.monotonic() - started)))
        elapsed = time.monotonic() - started
        assert not any(w.thread.is_alive() for w in workers), "clients still running"
        assert api.alive(), api.log()[-3000:]
        errors = [e for w in workers for e in w.errors]
        assert not errors, errors[:5]
        answers = [a for w in workers for a in w.answers]
        statuses = collections.Counter(status for status, _ in answers)
        assert set(statuses) <= {200, 409}, statuses            # no 5xx, nothing unexpected
        assert statuses[200] == CLIENTS * RUNS_PER_CLIENT, statuses   # every run ran once
        runs = store.Store(load_fleet.cfg).runs
        exits = collections.Counter()
        for status, body in answers:
            if status == 409:
                assert body["error"] == "locked" and body["conflicts"], body
                continue
            assert runs.load(body["reqid"]) is not None, body["reqid"]
            exits.update(row["exit"] for row in body["results"])
        assert set(exits) == {0}, exits                            # 9 would be an overlap
        violations = [a.name for a in load_fleet.agents.values()
                      if os.path.exists(os.path.join(a.dir, "violations"))]
        assert not violations, violations
        sample = [body["reqid"] for status, body in answers if status == 200][:20]
        for reqid in sample:
            status, _, record = api.call("GET", "/status/" + reqid)
            assert status == 200 and record["complete"] is True
        log = api.log()
        assert "ACTION=api-error" not in log and "Traceback" not in log
        print("load: %d clients x %d runs in %.1fs: %d requests %s, %d script runs"
              % (CLIENTS, RUNS_PER_CLIENT, elapsed, len(answers), dict(statuses),
                 sum(exits.values())))
    finally:
        api.stop()


def _mixed_request(api: ApiServer, i: int) -> int:
    """One request of a fixed mix (health, ping, run, status, 400, 404, discovery)."""
    kind = i % 8
    host = AGENTS[i % len(AGENTS)]
    if kind == 0:
        return api.call("GET", "/health")[0]
    if kind == 1:
        return api.call("POST", "/ping", {"hosts": [host]})[0]
    if kind in (2, 3):
        hosts = [host] if kind == 2 else [host, AGENTS[(i + 1) % len(AGENTS)]]
        status, _, body = api.call("POST", "/run", {"hosts": hosts, "script": "quick"})
        if status == 200:
            api.call("GET", "/status/" + body["reqid"])
        return status
    if kind == 4:
        return api.call("POST", "/run", raw=b'{"hosts": 5}')[0]
    if kind == 5:
        return api.call("GET", "/status/%016x" % i)[0]
    if kind == 6:
        return api.call("POST", "/discovery", {"hosts": [host]})[0]
    return api.call("GET", "/openapi.json")[0]


def _drive(api: ApiServer, start: int, stop: int, clients: int = 8) -> collections.Counter:
    """Send requests start..stop-1 from `clients` concurrent clients; count the statuses."""
    seen = collections.Counter()
    lock = threading.Lock()
    counter = iter(range(start, stop))

    def loop() -> None:
        for i in counter:
            status = _mixed_request(api, i)
            with lock:
                seen[status] += 1

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LOAD_DEADLINE_S)
    assert not any(t.is_alive() for t in threads), "clients still running"
    return seen


def test_api_memory_after_2000_requests_within_20mb_of_after_200(load_fleet, tmp_path):
    api = ApiServer.for_fleet(load_fleet, str(tmp_path / "api.log")).start()
    try:
        first = _drive(api, 0, MEMORY_WARMUP)
        after_warmup = api.rss_kb()
        rest = _drive(api, MEMORY_WARMUP, MEMORY_TOTAL)
        after_all = api.rss_kb()
        statuses = first + rest
        assert sum(statuses.values()) >= MEMORY_TOTAL
        assert not [s for s in statuses if s >= 500], statuses
        growth = after_all - after_warmup
        print("memory: RSS %d kB after %d requests, %d kB after %d (%+d kB)"
              % (after_warmup, MEMORY_WARMUP, after_all, MEMORY_TOTAL, growth))
        assert growth < MEMORY_GROWTH_LIMIT_KB, (after_warmup, after_all)
    finally:
        api.stop()
