"""Worker sweep: one sync POST /run on N real agents with dispatch_workers = 1, 2, ….

Owns: starting the real API with each ``dispatch_workers`` value on one BenchFleet,
one cold and one warm run per API process, and the figures of the whole dispatcher:
the API process plus its worker processes. That means wall time, CPU per host
(utime+stime of all of them) and peak RSS (the sum of their VmHWM).
Never does: start agents itself (bench/fleet.py does), or time-assert anything.

Usage:
    python bench/sweep_workers.py --hosts 5000 --workers 1,2 [--repeat 3] [--json]
    python bench/sweep_workers.py --hosts 5000 --workers 1,2,4,8   # on a machine with more cores
"""

from __future__ import annotations

__all__ = ["measure", "main"]

import argparse
import os
import sys
import time

import common  # puts the repository root on sys.path
import fleet as fleet_mod
from common import DEFAULT_MAX_PARALLEL, ApiProcess


def _children(pid: int) -> list:
    """Direct child pids of ``pid`` (the dispatch workers of an API process)."""
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as handle:
            return [int(text) for text in handle.read().split()]
    except OSError:
        return []


def _dispatcher(pid: int) -> list:
    return [pid] + _children(pid)


def _cpu_s(pids: list) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += common.proc_cpu_s(pid)
        except OSError:
            pass
    return total


def _rss_mb(pids: list) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += common.proc_peak_rss_mb(pid)
        except OSError:
            pass
    return round(total, 1)


def _one_run(api: ApiProcess, names: list, agent_pids: list) -> dict:
    pids = _dispatcher(api.proc.pid)
    cpu0 = _cpu_s(pids)
    agents0 = sum(common.proc_cpu_s(pid, children=True) for pid in agent_pids)
    started = time.perf_counter()
    status, body = api.request("POST", "/run", {"hosts": names, "script": fleet_mod.SCRIPT_NAME})
    wall = time.perf_counter() - started
    pids = _dispatcher(api.proc.pid)              # workers start at the first split run
    cpu = _cpu_s(pids) - cpu0
    results = (body or {}).get("results") or []
    errors = sorted({row.get("error", "") for row in results if row.get("exit") != 0})[:3]
    return {"hosts": len(names), "status": status, "ok_hosts": common.ok_count(results),
            "wall_s": round(wall, 3),
            "dispatcher_cpu_s": round(cpu, 3),
            "per_host_cpu_ms": round(cpu * 1000.0 / len(names), 3),
            "dispatcher_peak_rss_mb": _rss_mb(pids), "processes": len(pids),
            "agent_cpu_s": round(sum(common.proc_cpu_s(pid, children=True)
                                     for pid in agent_pids) - agents0, 3),
            "errors": errors}


def measure(fleet, hosts: int, workers: int, *, repeat: int, max_parallel: int) -> dict:
    """Median cold and warm figures over ``repeat`` fresh API processes with ``workers``."""
    names = fleet.names[:hosts]
    agent_pids = fleet.host_pids()
    cold, warm = [], []
    for _ in range(repeat):
        api = ApiProcess(fleet, max_parallel=max_parallel, dispatch_workers=workers,
                         max_hosts=max(500, hosts)).start()
        try:
            cold.append(_one_run(api, names, agent_pids))
            warm.append(_one_run(api, names, agent_pids))
        finally:
            api.stop()
    keys = ("ok_hosts", "wall_s", "dispatcher_cpu_s", "per_host_cpu_ms", "dispatcher_peak_rss_mb",
            "agent_cpu_s")
    point = {"hosts": hosts, "workers": workers, "max_parallel": max_parallel, "repeat": repeat,
             "cold": common.median_row(cold, keys), "warm": common.median_row(warm, keys),
             "processes": cold[-1]["processes"],
             "errors": sorted({e for row in cold + warm for e in row["errors"]})[:3]}
    return point


def _print_point(point: dict) -> None:
    cold, warm = point["cold"], point["warm"]
    print("N=%-5d workers=%d  ok=%d/%d  wall %.3fs (warm %.3fs)  dispatcher CPU %.3f ms/host "
          "(warm %.3f)  RSS %.1f MB in %d process(es)  agents CPU %.2fs  load %s -> %s"
          % (point["hosts"], point["workers"], cold["ok_hosts"], point["hosts"], cold["wall_s"],
             warm["wall_s"], cold["per_host_cpu_ms"], warm["per_host_cpu_ms"],
             cold["dispatcher_peak_rss_mb"], point["processes"], cold["agent_cpu_s"],
             point["load_avg_before"], point["load_avg_after"]), flush=True)
    if point["errors"]:
        print("        errors: %s" % point["errors"], flush=True)


def main(argv: list | None = None) -> int:
    """Parse options, build and start the fleet, measure each worker count, print the figures."""
    parser = argparse.ArgumentParser(prog="bench/sweep_workers.py", description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", type=int, default=5000, help="N agents (default 5000)")
    parser.add_argument("--workers", default="1,2", help="comma list of dispatch_workers values")
    parser.add_argument("--repeat", type=int, default=3, help="API processes per point (medians)")
    parser.add_argument("--json", action="store_true", help="one JSON object per point")
    parser.add_argument("--root", default="", help="fleet folder (default /tmp/ctrlexec-bench-N)")
    parser.add_argument("--procs", type=int, default=0, help="agent host processes")
    parser.add_argument("--max-parallel", type=int, default=0,
                        help="max_parallel (default min(N, %d)), shared by the workers"
                        % DEFAULT_MAX_PARALLEL)
    opts = parser.parse_args(argv)
    try:
        counts = [int(text) for text in opts.workers.split(",") if text.strip()]
    except ValueError:
        parser.error("--workers takes whole numbers separated by commas, e.g. 1,2,4")
    if not counts or min(counts) < 1 or opts.hosts < 1:
        parser.error("--hosts and every --workers value must be >= 1")
    common.raise_fd_limit()
    root = opts.root or "/tmp/ctrlexec-bench-%d" % opts.hosts
    fleet = fleet_mod.BenchFleet(root, opts.hosts)
    if not opts.json:
        print("fleet of %d agents in %s (built unless already there) ..." % (opts.hosts, root),
              flush=True)
    fleet.build()
    fleet.write_conf()
    fleet.start(opts.procs or None)
    try:
        for workers in counts:
            before = common.load_average()
            point = measure(fleet, opts.hosts, workers, repeat=opts.repeat,
                            max_parallel=opts.max_parallel or min(opts.hosts, DEFAULT_MAX_PARALLEL))
            point.update(load_avg_before=before, load_avg_after=common.load_average(),
                         agent_procs=len(fleet.procs), machine=common.machine_info(),
                         cores=os.cpu_count())
            common.report(point, as_json=opts.json, printer=_print_point)
    finally:
        fleet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
