"""State backend benchmark: the same runs with state_backend = files and = redis://.

Owns: a redis-server of its own (127.0.0.1, a free port, no persistence, its files in
a temp folder; stopped and the folder removed when the bench ends, also on an error,
Ctrl-C or SIGTERM, and it gets SIGTERM should this process die first), and three
measurements on one bench fleet (bench/fleet.py) through real API processes
(``common.ApiProcess``, one ctrl-exec.conf each):

* fan-out: a sync ``POST /run`` on N hosts (``fanout.run_api_job``), the cold and the
  warm run of a fresh API process per backend; both processes are up at once and
  taken in turn (the order flips every repetition), so both see the same load;
* loop: sequential 1-host ``POST /run``, alternating between a files API and a Redis
  API on the same host: the per-run state overhead as a paired difference;
* cluster: C client threads send R single-host runs (each thread its own hosts, so no
  two runs in flight share a host+script lock) to 1 node on files, 1 node on Redis and
  3 nodes on one Redis (each thread turns through the nodes); throughput, latency, and
  every returned reqid read back with ``GET /status/<reqid>`` from another node
  (``lost`` = answered runs whose record is not there, or not the run's).

State overhead = the Redis figure minus the files figure of the same repetition
(median over repetitions), per run and per host. redis-server's own CPU (utime+stime
from /proc) is reported beside the API's, since the state work is split between them.

Never does: bind a non-loopback address, change product modules, persist Redis data,
or assert anything; it measures and prints.

Usage:
    python bench/state.py [--hosts 1000] [--repeat 3] [--loop-runs 200]
                          [--cluster-runs 300] [--clients 6] [--json] [--root DIR]
"""

from __future__ import annotations

__all__ = ["RedisServer", "measure_fanout", "measure_loop", "measure_cluster", "main",
           "BACKENDS", "CLUSTER_SETUPS", "REDIS_START_TIMEOUT_S"]

import argparse
import concurrent.futures
import ctypes
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import common  # puts the repository root on sys.path
import fanout
import fleet as fleet_mod
from common import DEFAULT_MAX_PARALLEL, ApiProcess, BenchError

FILES, REDIS = "files", "redis"
BACKENDS = (FILES, REDIS)
#: (label, backend, API nodes) of the cluster measurement.
CLUSTER_SETUPS = (("1 node, files", FILES, 1), ("1 node, redis", REDIS, 1),
                  ("3 nodes, redis", REDIS, 3))
#: redis-server start-up until it answers PING.
REDIS_START_TIMEOUT_S = 20.0
#: Untimed runs per API process before the loop (full handshakes, first record writes).
LOOP_WARMUP = 5
#: The figures of a fan-out row reported as medians over the repetitions.
_FIGURES = ("wall_s", "dispatcher_cpu_s", "per_host_cpu_ms", "api_peak_rss_mb",
            "agent_cpu_s", "redis_cpu_s")
_PR_SET_PDEATHSIG = 1


class RedisServer:
    """redis-server on 127.0.0.1:<free port>, no persistence, its files in a temp folder.

    ``with RedisServer() as redis:`` starts it; leaving the block stops it and removes
    the folder, whatever happened.
    """

    def __init__(self, binary: str = "") -> None:
        self.binary = binary or shutil.which("redis-server") or shutil.which("valkey-server") or ""
        self.folder = ""
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return "redis://127.0.0.1:%d/0" % self.port

    def start(self) -> "RedisServer":
        """Start the server and wait for PING.

        Raises:
            BenchError: not installed, exited, or no answer in time (with its log's tail).
        """
        if not self.binary:
            raise BenchError("redis-server is not installed (apt-get install redis-server)")
        self.folder = tempfile.mkdtemp(prefix="ctrlexec-bench-redis-")
        self.port = common.free_port("127.0.0.1")
        log_path = os.path.join(self.folder, "redis.log")
        try:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", self.folder, "--logfile", log_path,
                 "--protected-mode", "yes", "--daemonize", "no"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                cwd=self.folder, preexec_fn=_die_with_parent)
            common.wait_ready(self.proc, self._answers, "redis-server on port %d" % self.port,
                              REDIS_START_TIMEOUT_S)
        except BenchError as exc:
            tail = _tail(log_path)
            self.stop()
            raise BenchError("%s; log: %s" % (exc, tail)) from None
        except BaseException:
            self.stop()
            raise
        return self

    def cpu_s(self) -> float:
        """utime+stime of the server so far."""
        return common.proc_cpu_s(self.proc.pid)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove its folder."""
        common.stop_process(self.proc, 10.0)
        self.proc = None
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = ""

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


def measure_fanout(fleet, redis: RedisServer, hosts: int, *, repeat: int,
                   max_parallel: int) -> dict:
    """Sync POST /run on ``hosts`` hosts, cold + warm, files and Redis, ``repeat`` times.

    Returns:
        {"test": "fanout", "hosts", "max_parallel", "repeat",
         "files"/"redis": {"cold": median row, "warm": median row},
         "overhead": {"cold": {...}, "warm": {...}}, "runs": [every row]}
    """
    names = fleet.names[:hosts]
    pids = fleet.host_pids()
    rows = {(backend, session): [] for backend in BACKENDS for session in ("cold", "warm")}
    for number in range(repeat):
        order = BACKENDS if number % 2 == 0 else BACKENDS[::-1]
        apis = {}
        try:
            for backend in order:
                apis[backend] = _start_api(fleet, backend, redis, "fanout",
                                           max_parallel=max_parallel)
            for session in ("cold", "warm"):
                for backend in order:
                    before = redis.cpu_s()
                    row = fanout.run_api_job(apis[backend], names, pids)
                    row.update(backend=backend, session=session, repetition=number,
                               redis_cpu_s=round(redis.cpu_s() - before, 3))
                    rows[(backend, session)].append(row)
        finally:
            for api in apis.values():
                api.stop()
    point = {"test": "fanout", "hosts": hosts, "max_parallel": max_parallel, "repeat": repeat}
    for backend in BACKENDS:
        point[backend] = {session: _median_row(rows[(backend, session)])
                          for session in ("cold", "warm")}
    point["overhead"] = {session: _fanout_overhead(rows[(FILES, session)],
                                                   rows[(REDIS, session)], hosts)
                         for session in ("cold", "warm")}
    point["runs"] = [row for key in sorted(rows) for row in rows[key]]
    return point


def measure_loop(fleet, redis: RedisServer, runs: int) -> dict:
    """``runs`` sequential 1-host POST /run on each backend, alternating request by request.

    Returns:
        {"test": "loop", "host", "runs", "files"/"redis": {"ok", "p50_ms", "p90_ms",
         "api_cpu_ms_per_run", "redis_cpu_ms_per_run"},
         "overhead": {"p50_ms": median of the paired differences, "state_cpu_ms_per_run"}}
    """
    host = fleet.names[0]
    body = {"hosts": [host], "script": fleet_mod.SCRIPT_NAME}
    apis = {}
    try:
        for backend in BACKENDS:
            apis[backend] = _start_api(fleet, backend, redis, "loop", max_parallel=1)
        for _ in range(LOOP_WARMUP):
            for backend in BACKENDS:
                apis[backend].request("POST", "/run", body)
        times = {backend: [] for backend in BACKENDS}
        ok = {backend: 0 for backend in BACKENDS}
        cpu0 = {backend: common.proc_cpu_s(apis[backend].proc.pid) for backend in BACKENDS}
        redis0 = redis.cpu_s()
        for number in range(runs):
            for backend in (BACKENDS if number % 2 == 0 else BACKENDS[::-1]):
                started = time.perf_counter()
                status, answer = apis[backend].request("POST", "/run", body)
                times[backend].append(time.perf_counter() - started)
                ok[backend] += status == 200 and _run_ok(answer, host)
        redis_cpu = redis.cpu_s() - redis0
        cpu = {backend: common.proc_cpu_s(apis[backend].proc.pid) - cpu0[backend]
               for backend in BACKENDS}
    finally:
        for api in apis.values():
            api.stop()
    point = {"test": "loop", "host": host, "runs": runs, "warmup": LOOP_WARMUP}
    for backend in BACKENDS:
        point[backend] = {
            "ok": ok[backend], "p50_ms": _ms(statistics.median(times[backend])),
            "p90_ms": _ms(_p90(times[backend])),
            "api_cpu_ms_per_run": _ms(cpu[backend] / runs),
            "redis_cpu_ms_per_run": _ms(redis_cpu / runs) if backend == REDIS else 0.0}
    diffs = [r - f for f, r in zip(times[FILES], times[REDIS])]
    point["overhead"] = {
        "p50_ms": _ms(statistics.median(diffs)),
        "api_cpu_ms_per_run": _ms((cpu[REDIS] - cpu[FILES]) / runs),
        "state_cpu_ms_per_run": _ms((cpu[REDIS] - cpu[FILES] + redis_cpu) / runs)}
    return point


def measure_cluster(fleet, redis: RedisServer, *, label: str, backend: str, nodes: int,
                    runs: int, clients: int) -> dict:
    """``runs`` single-host POST /run from ``clients`` threads over ``nodes`` API nodes.

    Thread t owns hosts t, t+clients, ... of the first min(N, runs) hosts and sends its
    k-th run to node (t + k) % nodes. Afterwards every answered reqid is read with
    GET /status/<reqid> from the next node (the same one when there is one node).
    Returns:
        {"test": "cluster", "setup", "backend", "nodes", "clients", "runs", "hosts_used",
         "ok_runs", "failed_runs", "runs_per_s", "p50_ms", "p90_ms", "api_cpu_ms_per_run",
         "redis_cpu_ms_per_run", "checked", "checked_from", "lost", "errors"}
    """
    pool = fleet.names[:min(len(fleet.names), runs)]
    clients = max(1, min(clients, len(pool)))
    apis = []
    try:
        for number in range(nodes):
            apis.append(_start_api(fleet, backend, redis, "node-%d" % (number + 1),
                                   max_parallel=1))

        def client(thread: int) -> list:
            own = pool[thread::clients]
            out = []
            for count in range(len(range(thread, runs, clients))):
                node, host = (thread + count) % nodes, own[count % len(own)]
                started = time.perf_counter()
                try:
                    status, answer = apis[node].request(
                        "POST", "/run", {"hosts": [host], "script": fleet_mod.SCRIPT_NAME})
                except OSError as exc:
                    status, answer = 0, {"error": str(exc)}
                out.append({"node": node, "host": host, "status": status,
                            "latency_s": time.perf_counter() - started,
                            "reqid": (answer or {}).get("reqid") if status == 200 else None,
                            "ok": status == 200 and _run_ok(answer, host),
                            "error": "" if status == 200 else "%s %s" % (status, answer)})
            return out

        cpu0 = sum(common.proc_cpu_s(api.proc.pid) for api in apis)
        redis0 = redis.cpu_s()
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as threads:
            answers = [row for rows in threads.map(client, range(clients)) for row in rows]
        wall = time.perf_counter() - started
        cpu = sum(common.proc_cpu_s(api.proc.pid) for api in apis) - cpu0
        redis_cpu = redis.cpu_s() - redis0
        lost, checked = 0, 0
        for row in answers:
            if row["reqid"] is None:
                continue
            checked += 1
            status, record = apis[(row["node"] + 1) % nodes].request(
                "GET", "/status/%s" % row["reqid"])
            if status != 200 or (record or {}).get("reqid") != row["reqid"] \
                    or not _run_ok(record, row["host"]):
                lost += 1
    finally:
        for api in apis:
            api.stop()
    latencies = [row["latency_s"] for row in answers]
    errors = []
    for row in answers:
        if row["error"] and row["error"] not in errors and len(errors) < 3:
            errors.append(row["error"][:300])
    return {"test": "cluster", "setup": label, "backend": backend, "nodes": nodes,
            "clients": clients, "runs": len(answers), "hosts_used": len(pool),
            "ok_runs": sum(row["ok"] for row in answers),
            "failed_runs": sum(not row["ok"] for row in answers),
            "wall_s": round(wall, 3), "runs_per_s": round(len(answers) / wall, 1),
            "p50_ms": _ms(statistics.median(latencies)), "p90_ms": _ms(_p90(latencies)),
            "api_cpu_ms_per_run": _ms(cpu / len(answers)),
            "redis_cpu_ms_per_run": _ms(redis_cpu / len(answers)) if backend == REDIS else 0.0,
            "checked": checked, "checked_from": "another node" if nodes > 1 else "same node",
            "lost": lost, "errors": errors}


# --- private ---


def _start_api(fleet, backend: str, redis: RedisServer, tag: str, *,
               max_parallel: int) -> ApiProcess:
    """A fresh API process on ``backend`` with its own conf (state-<backend>-<tag>.conf)."""
    name = "state-%s-%s" % (backend, tag)
    return ApiProcess(fleet, max_parallel=max_parallel, log_name=name + ".log",
                      conf_name=name + ".conf",
                      state_backend=redis.url if backend == REDIS else FILES).start()


def _median_row(rows: list) -> dict:
    out = common.median_row(rows, _FIGURES)
    out["redis_cpu_ms_per_host"] = round(out["redis_cpu_s"] * 1000.0 / out["hosts"], 3)
    errors = [e for row in rows for e in row.get("errors") or []]
    if errors:
        out["errors"] = errors[:5]
    return out


def _fanout_overhead(files: list, redis: list, hosts: int) -> dict:
    """Median over repetitions of (Redis row - files row of the same repetition)."""
    def paired(key: str) -> float:
        return statistics.median(r[key] - f[key] for f, r in zip(files, redis))

    wall, api_cpu = paired("wall_s"), paired("dispatcher_cpu_s")
    redis_cpu = statistics.median(r["redis_cpu_s"] for r in redis)
    state_cpu = statistics.median(r["dispatcher_cpu_s"] - f["dispatcher_cpu_s"] + r["redis_cpu_s"]
                                  for f, r in zip(files, redis))
    return {"wall_s": round(wall, 3), "wall_ms_per_host": round(wall * 1000.0 / hosts, 3),
            "api_cpu_s": round(api_cpu, 3),
            "api_cpu_ms_per_host": round(api_cpu * 1000.0 / hosts, 3),
            "redis_cpu_ms_per_host": round(redis_cpu * 1000.0 / hosts, 3),
            "state_cpu_ms_per_host": round(state_cpu * 1000.0 / hosts, 3)}


def _run_ok(answer, host: str) -> bool:
    """The /run answer or /status record holds one ok row for ``host``."""
    rows = (answer or {}).get("results") or []
    return len(rows) == 1 and rows[0].get("host") == host and common.ok_count(rows) == 1


def _p90(values: list) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) > 1 else values[0]


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _tail(path: str, chars: int = 600) -> str:
    try:
        with open(path, "rb") as handle:
            return handle.read()[-chars:].decode("utf-8", "replace").strip() or "(empty)"
    except OSError:
        return "(none)"


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the bench process dies (Linux prctl)."""
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    except (OSError, AttributeError):
        pass


def _terminate(signum, frame) -> None:
    """SIGTERM: unwind like Ctrl-C, so every finally block stops what it started."""
    raise SystemExit(128 + signum)


def _say(opts, text: str) -> None:
    if not opts.json:
        print(text, flush=True)
    else:
        sys.stderr.write(text + "\n")


def _load(point: dict) -> str:
    return "%s → %s" % (point["load_avg_before"][0], point["load_avg_after"][0])


def _print_point(point: dict) -> None:
    """The point as a markdown table, the 1-minute load average before → after beside it."""
    if point["test"] == "fanout":
        n = point["hosts"]
        print("\nfan-out, sync POST /run on %d hosts, median of %d (cold / warm), "
              "max_parallel %d:" % (n, point["repeat"], point["max_parallel"]))
        print("| backend | ok cold / warm | wall cold / warm | API CPU ms/host cold / warm "
              "| redis-server CPU ms/host cold / warm | API peak RSS | load before → after |")
        print("|---|---|---|---|---|---|---|")
        for backend in BACKENDS:
            cold, warm = point[backend]["cold"], point[backend]["warm"]
            print("| %s | %d / %d | %.3f / %.3f s | %.3f / %.3f | %.3f / %.3f | %.1f MB | %s |"
                  % (backend, cold["ok_hosts"], warm["ok_hosts"], cold["wall_s"], warm["wall_s"],
                     cold["per_host_cpu_ms"], warm["per_host_cpu_ms"],
                     cold["redis_cpu_ms_per_host"], warm["redis_cpu_ms_per_host"],
                     cold["api_peak_rss_mb"], _load(point)))
        cold, warm = point["overhead"]["cold"], point["overhead"]["warm"]
        print("| **redis − files** | | %+.3f / %+.3f s per run (%+.3f / %+.3f ms per host) "
              "| %+.3f / %+.3f | state CPU (API + redis-server) %+.3f / %+.3f ms/host | | |"
              % (cold["wall_s"], warm["wall_s"], cold["wall_ms_per_host"],
                 warm["wall_ms_per_host"], cold["api_cpu_ms_per_host"],
                 warm["api_cpu_ms_per_host"], cold["state_cpu_ms_per_host"],
                 warm["state_cpu_ms_per_host"]))
        for backend in BACKENDS:
            for session in ("cold", "warm"):
                if point[backend][session].get("errors"):
                    print("errors (%s, %s): %s" % (backend, session,
                                                   point[backend][session]["errors"]))
    elif point["test"] == "loop":
        print("\n1-host POST /run, %d sequential runs per backend (alternating), on %s:"
              % (point["runs"], point["host"]))
        print("| backend | ok | p50 | p90 | API CPU ms/run | redis-server CPU ms/run "
              "| load before → after |")
        print("|---|---|---|---|---|---|---|")
        for backend in BACKENDS:
            row = point[backend]
            print("| %s | %d / %d | %.2f ms | %.2f ms | %.2f | %.2f | %s |"
                  % (backend, row["ok"], point["runs"], row["p50_ms"], row["p90_ms"],
                     row["api_cpu_ms_per_run"], row["redis_cpu_ms_per_run"], _load(point)))
        over = point["overhead"]
        print("| **redis − files** | | %+.2f ms (median of pairs) | | %+.2f | state CPU "
              "%+.2f ms/run | |" % (over["p50_ms"], over["api_cpu_ms_per_run"],
                                   over["state_cpu_ms_per_run"]))
    else:
        print("\n%s: %d single-host runs from %d client threads over %d hosts:"
              % (point["setup"], point["runs"], point["clients"], point["hosts_used"]))
        print("| setup | ok runs | runs/s | p50 | p90 | API CPU ms/run (all nodes) "
              "| redis-server CPU ms/run | records checked (from) | lost | load before → after |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        print("| %s | %d / %d | %.1f | %.1f ms | %.1f ms | %.2f | %.2f | %d (%s) | %d | %s |"
              % (point["setup"], point["ok_runs"], point["runs"], point["runs_per_s"],
                 point["p50_ms"], point["p90_ms"], point["api_cpu_ms_per_run"],
                 point["redis_cpu_ms_per_run"], point["checked"], point["checked_from"],
                 point["lost"], _load(point)))
        if point["errors"]:
            print("errors: %s" % point["errors"])


def main(argv: list | None = None) -> int:
    """Parse options, start Redis and the fleet, measure fan-out, loop and cluster, print."""
    parser = argparse.ArgumentParser(prog="bench/state.py", description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", default="1000",
                        help="fan-out N, or a comma list (e.g. 100,1000); default 1000")
    parser.add_argument("--repeat", type=int, default=3,
                        help="fan-out repetitions per backend; medians are reported")
    parser.add_argument("--loop-runs", type=int, default=200,
                        help="sequential 1-host runs per backend (0: skip)")
    parser.add_argument("--cluster-runs", type=int, default=300,
                        help="single-host runs per cluster setup (0: skip)")
    parser.add_argument("--clients", type=int, default=6, help="client threads of the cluster test")
    parser.add_argument("--json", action="store_true", help="one JSON object per point on stdout")
    parser.add_argument("--root", default="", help="fleet folder to build or reuse "
                        "(default: /tmp/ctrlexec-bench-<largest N>)")
    parser.add_argument("--procs", type=int, default=0, help="agent host processes "
                        "(default: one per %d agents)" % fleet_mod.AGENTS_PER_PROCESS)
    parser.add_argument("--max-parallel", type=int, default=0,
                        help="fan-out max_parallel (default: min(N, %d))" % DEFAULT_MAX_PARALLEL)
    opts = parser.parse_args(argv)
    counts = common.host_counts(parser, opts.hosts)
    if opts.repeat < 1 or opts.loop_runs < 0 or opts.cluster_runs < 0 or opts.clients < 1:
        parser.error("--repeat and --clients take >= 1, --loop-runs and --cluster-runs >= 0")
    signal.signal(signal.SIGTERM, _terminate)
    common.raise_fd_limit()
    root = opts.root or "/tmp/ctrlexec-bench-%d" % max(counts)
    fleet = fleet_mod.BenchFleet(root, max(counts))
    _say(opts, "fleet of %d agents in %s (built unless already there) ..." % (max(counts), root))
    fleet.build()
    fleet.write_conf()
    with RedisServer() as redis:
        _say(opts, "redis-server %s (pid %d, folder %s)" % (redis.url, redis.proc.pid,
                                                            redis.folder))
        fleet.start(opts.procs or None)
        try:
            _say(opts, "agents up in %d host processes; machine %s"
                 % (len(fleet.procs), common.machine_info()))
            jobs = [("fanout %d hosts" % n,
                     lambda n=n: measure_fanout(
                         fleet, redis, n, repeat=opts.repeat,
                         max_parallel=opts.max_parallel or min(n, DEFAULT_MAX_PARALLEL)))
                    for n in counts]
            if opts.loop_runs:
                jobs.append(("loop", lambda: measure_loop(fleet, redis, opts.loop_runs)))
            if opts.cluster_runs:
                jobs += [(label, lambda label=label, backend=backend, nodes=nodes: measure_cluster(
                    fleet, redis, label=label, backend=backend, nodes=nodes,
                    runs=opts.cluster_runs, clients=opts.clients))
                    for label, backend, nodes in CLUSTER_SETUPS]
            for what, job in jobs:
                _say(opts, "measuring: %s ..." % what)
                before = common.load_average()
                point = job()
                point.update(agent_procs=len(fleet.procs), redis_url=redis.url,
                             load_avg_before=before, load_avg_after=common.load_average(),
                             machine=common.machine_info())
                common.report(point, as_json=opts.json, printer=_print_point)
        finally:
            fleet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
