"""Fan-out benchmark: one trivial allowlisted script on N real agents.

Owns: starting the bench fleet (bench/fleet.py) and a real API process
(``common.ApiProcess``), timing a sync ``POST /run`` on N hosts through
that API, and the same job through ``engine.Engine.dispatch_all`` directly in
a separate gevent process.  For each path it reports wall time, the
dispatcher's CPU time (utime+stime from /proc/<pid>/stat around the job) and
its peak RSS (VmHWM).  "cold" is the first run of a fresh dispatcher (a full
TLS handshake per host); "warm" is the next run of the same dispatcher (the
engine's per-host TLS session cache lets it resume).

Never does: bind a non-loopback address, change product modules, or assert
anything; it measures and prints.

Usage:
    python bench/fanout.py --hosts 1000 [--repeat 3] [--json] [--root DIR]
    python bench/fanout.py --hosts 1,10,100,500,1000 --repeat 3 --json   (one JSON line per N)
"""

from __future__ import annotations

# The engine child process runs gevent code (engine.Engine); like every
# ctrl-exec entry point it patches before anything else is imported (the
# __future__ line is a compiler directive, not an import).  The parent
# process stays unpatched (plain subprocesses and http.client).
import sys

if __name__ == "__main__" and "--engine-child" in sys.argv:
    from gevent import monkey

    monkey.patch_all()

__all__ = ["run_api_job", "run_engine_job", "measure_point", "main"]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import common  # noqa: E402  (puts the repository root on sys.path)
import fleet as fleet_mod  # noqa: E402
from common import DEFAULT_MAX_PARALLEL, JOB_TIMEOUT_S, ApiProcess  # noqa: E402

#: The figures of a row that are reported as medians over the repetitions.
_FIGURES = ("wall_s", "dispatcher_cpu_s", "per_host_cpu_ms", "api_peak_rss_mb", "agent_cpu_s")


def run_api_job(api: ApiProcess, names: list, agent_pids: list) -> dict:
    """POST /run (sync) of the bench script on ``names``; measure the API process.

    Returns:
        {"path": "api", "hosts", "ok_hosts", "wall_s", "dispatcher_cpu_s", "per_host_cpu_ms",
         "agent_cpu_s", "api_peak_rss_mb", "status"}
    """
    pid = api.proc.pid
    cpu0, agents0 = common.proc_cpu_s(pid), _agents_cpu_s(agent_pids)
    started = time.perf_counter()
    status, body = api.request("POST", "/run", {"hosts": names, "script": fleet_mod.SCRIPT_NAME})
    wall = time.perf_counter() - started
    cpu = common.proc_cpu_s(pid) - cpu0
    agents = _agents_cpu_s(agent_pids) - agents0
    results = (body or {}).get("results") or []
    return _row("api", len(names), common.ok_count(results), wall, cpu, agents,
                common.proc_peak_rss_mb(pid), status=status, errors=_errors(results))


def run_engine_job(root: str, hosts: int, max_parallel: int, runs: int = 2) -> list:
    """Run the job ``runs`` times through engine.Engine in a fresh gevent child process.

    Returns: one row per run (the first is cold, later ones warm), shaped like run_api_job's.
    """
    return common.run_json_child(
        [os.path.abspath(__file__), "--engine-child", "--root", root, "--hosts", str(hosts),
         "--max-parallel", str(max_parallel), "--repeat", str(runs)],
        what="engine child", timeout_s=JOB_TIMEOUT_S * runs,
        log_path=os.path.join(root, "engine.log"))


def measure_point(fleet, hosts: int, *, repeat: int, max_parallel: int,
                  engine: bool = True, profile_dir: str = "") -> dict:
    """Median figures for N=hosts over ``repeat`` fresh API processes (cold + warm run each).

    With ``profile_dir``, the first repetition's two runs are sampled by py-spy
    (API process and the first agent host) into ``<dir>/<who>-<N>-<cold|warm>.txt``
    (collapsed stacks; the figures of that repetition carry the sampling cost).
    Returns:
        {"hosts", "ok_hosts", "wall_s", "dispatcher_cpu_s", "per_host_cpu_ms", "api_peak_rss_mb",
         "agent_cpu_s", "handshakes": "full", "warm": {...}, "engine": {"cold": {...}, "warm": {...}},
         "max_parallel", "repeat", "runs": [...]}
    """
    names = fleet.names[:hosts]
    pids = fleet.host_pids()
    cold, warm, runs = [], [], []
    for number in range(repeat):
        api = ApiProcess(fleet, max_parallel=max_parallel).start()
        try:
            sampled = {"api": api.proc.pid, "agents": pids[0]} if profile_dir and not number else {}
            with _Sampler(sampled, profile_dir, "%d-cold" % hosts):
                first = dict(run_api_job(api, names, pids), session="cold")
            with _Sampler(sampled, profile_dir, "%d-warm" % hosts):
                second = dict(run_api_job(api, names, pids), session="warm")
        finally:
            api.stop()
        cold.append(first)
        warm.append(second)
        runs += [first, second]
    point = _median_row(cold)
    point.update(handshakes="full", warm=_median_row(warm), max_parallel=max_parallel,
                 repeat=repeat, runs=runs)
    if engine:
        engine_cold, engine_warm = [], []
        for _ in range(repeat):
            rows = run_engine_job(fleet.root, hosts, max_parallel)
            engine_cold.append(rows[0])
            engine_warm.append(rows[1])
        point["engine"] = {"cold": _median_row(engine_cold), "warm": _median_row(engine_warm)}
    return point


# --- private ---


def _engine_child(root: str, hosts: int, max_parallel: int, runs: int) -> int:
    """--engine-child: resolve + Engine.dispatch_all ``runs`` times; print JSON rows."""
    import config
    import ctrlexec_agent as wire
    import engine
    import store

    wire.setup_logging("ctrl-exec-bench")
    fleet = fleet_mod.BenchFleet(root, hosts).build()
    cfg = config.load(fleet.conf_path)
    cfg.max_parallel = max_parallel or min(hosts, DEFAULT_MAX_PARALLEL)
    names = fleet.names[:hosts]
    eng = engine.Engine.from_config(cfg)
    registry = store.Registry(cfg.state_dir)
    rows = []
    for _ in range(runs):
        cpu0, _ = common.rusage_self()
        started = time.perf_counter()
        targets = registry.resolve(names)
        results = eng.dispatch_all(targets, script=fleet_mod.SCRIPT_NAME, args=[],
                                   reqid=wire.new_reqid())
        wall = time.perf_counter() - started
        cpu, rss = common.rusage_self()
        rows.append(_row("engine", hosts, common.ok_count(results), wall, cpu - cpu0, None, rss,
                         errors=_errors(results), handshakes=eng.stats["handshakes"],
                         resumed=eng.stats["resumed"]))
    print(json.dumps(rows))
    return 0


class _Sampler:
    """py-spy record on some pids for the duration of a with block (nothing when empty)."""

    def __init__(self, pids: dict, folder: str, tag: str) -> None:
        self.pids, self.folder, self.tag = pids, folder, tag
        self.procs: list = []

    def __enter__(self) -> "_Sampler":
        if self.pids:
            os.makedirs(self.folder, exist_ok=True)
        for who, pid in self.pids.items():
            out = os.path.join(self.folder, "%s-%s.txt" % (who, self.tag))
            self.procs.append(subprocess.Popen(
                ["py-spy", "record", "--pid", str(pid), "--rate", "500", "--format", "raw",
                 "--nonblocking", "--threads", "-o", out],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if self.procs:
            time.sleep(1.0)   # py-spy attaches before the run starts
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _row(path: str, hosts: int, ok: int, wall: float, cpu: float, agent_cpu, rss: float,
         **extra) -> dict:
    row = {"path": path, "hosts": hosts, "ok_hosts": ok, "wall_s": round(wall, 3),
           "dispatcher_cpu_s": round(cpu, 3), "per_host_cpu_ms": round(cpu * 1000.0 / hosts, 3),
           "api_peak_rss_mb": rss}
    if agent_cpu is not None:
        row["agent_cpu_s"] = round(agent_cpu, 3)
    row.update(extra)
    return row


def _median_row(rows: list) -> dict:
    """common.median_row of the figures, plus the first few errors of any row."""
    out = common.median_row(rows, _FIGURES)
    errors = [e for r in rows for e in r.get("errors") or []]
    if errors:
        out["errors"] = errors[:5]
    return out


def _agents_cpu_s(pids: list) -> float:
    """CPU of the agent host processes, the scripts they reaped included."""
    return sum(common.proc_cpu_s(pid, children=True) for pid in pids)


def _errors(results: list) -> list:
    """A few distinct failure texts, for the report."""
    seen = []
    for row in results:
        if row.get("exit") != 0 and row.get("error") and row["error"] not in seen:
            seen.append(row["error"])
            if len(seen) == 3:
                break
    return seen


def _say(opts, text: str) -> None:
    if not opts.json:
        print(text, flush=True)
    else:
        sys.stderr.write(text + "\n")


def _print_point(point: dict) -> None:
    warm = point["warm"]
    print("N=%-5d ok=%d/%d  wall %.3fs (warm %.3fs)  dispatcher CPU %.3fs = %.3f ms/host "
          "(warm %.3f)  API peak RSS %.1f MB  agents CPU %.2fs  max_parallel=%d  load %s"
          % (point["hosts"], point["ok_hosts"], point["hosts"], point["wall_s"], warm["wall_s"],
             point["dispatcher_cpu_s"], point["per_host_cpu_ms"], warm["per_host_cpu_ms"],
             point["api_peak_rss_mb"], point.get("agent_cpu_s", 0), point["max_parallel"],
             point["load_avg_before"]), flush=True)
    if "engine" in point:
        cold, warm = point["engine"]["cold"], point["engine"]["warm"]
        print("        engine: ok=%d wall %.3fs (warm %.3fs) CPU %.3f ms/host (warm %.3f)"
              % (cold["ok_hosts"], cold["wall_s"], warm["wall_s"], cold["per_host_cpu_ms"],
                 warm["per_host_cpu_ms"]), flush=True)
    for key in ("errors",):
        if point.get(key):
            print("        errors: %s" % point[key], flush=True)


def main(argv: list | None = None) -> int:
    """Parse options, build and start the fleet, measure each N, print the figures."""
    parser = argparse.ArgumentParser(prog="bench/fanout.py", description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", required=True,
                        help="N, or a comma list for a sweep (e.g. 1,10,100,500,1000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per point; medians are reported")
    parser.add_argument("--json", action="store_true", help="one JSON object per N on stdout")
    parser.add_argument("--root", default="", help="fleet folder to build or reuse "
                        "(default: /tmp/ctrlexec-bench-<largest N>)")
    parser.add_argument("--procs", type=int, default=0, help="agent host processes "
                        "(default: one per %d agents)" % fleet_mod.AGENTS_PER_PROCESS)
    parser.add_argument("--max-parallel", type=int, default=0,
                        help="ctrl-exec.conf max_parallel (default: min(N, %d))" % DEFAULT_MAX_PARALLEL)
    parser.add_argument("--no-engine", action="store_true", help="skip the engine-direct path")
    parser.add_argument("--profile", default="", metavar="DIR",
                        help="py-spy the API and one agent host during the first repetition")
    parser.add_argument("--engine-child", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    counts = common.host_counts(parser, opts.hosts)
    if opts.profile and not shutil.which("py-spy"):
        parser.error("--profile needs py-spy (pip install py-spy)")
    if opts.engine_child:
        return _engine_child(opts.root, counts[0], opts.max_parallel, opts.repeat)
    common.raise_fd_limit()
    root = opts.root or "/tmp/ctrlexec-bench-%d" % max(counts)
    fleet = fleet_mod.BenchFleet(root, max(counts))
    _say(opts, "fleet of %d agents in %s (built unless already there) ..." % (max(counts), root))
    fleet.build()
    fleet.write_conf()
    fleet.start(opts.procs or None)
    try:
        _say(opts, "agents up in %d host processes" % len(fleet.procs))
        for hosts in counts:
            max_parallel = opts.max_parallel or min(hosts, DEFAULT_MAX_PARALLEL)
            before = common.load_average()
            point = measure_point(fleet, hosts, repeat=opts.repeat, max_parallel=max_parallel,
                                  engine=not opts.no_engine, profile_dir=opts.profile)
            point.update(agent_procs=len(fleet.procs), load_avg_before=before,
                         load_avg_after=common.load_average(), machine=common.machine_info())
            common.report(point, as_json=opts.json, printer=_print_point)
    finally:
        fleet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
