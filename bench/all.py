"""Every figure of BENCHMARKS.md from one command, with the load average beside each.

Owns: running the benchmark scripts of this folder one after the other as child
processes with ``--json``, and printing one Markdown table (part, figure, value,
load average before -> after that part). It also prints a header with the date, the
commit and the machine. ``--out`` keeps the raw JSON of every part.
Never does: measure anything itself, or hide a part that failed: a failed or skipped
part is a row saying why, and the exit status is 1 when one failed.

Usage:
    python bench/all.py                        # everything (about 15 minutes on 2 cores)
    python bench/all.py --only fanout,api      # some parts
    python bench/all.py --quick                # small sizes: checks the harness, not speed
    python bench/all.py --out /tmp/bench.json  # the raw figures too
"""

from __future__ import annotations

__all__ = ["PARTS", "run_part", "figures", "main"]

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time

import common  # puts the repository root on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))
#: Seconds a part may take before it is stopped and reported as failed.
PART_TIMEOUT_S = 3600
#: Keys of a part's JSON that are conditions or raw data, not figures.
_NOT_FIGURES = {"machine", "runs", "errors", "load_avg_before", "load_avg_after", "repeat",
                "tool", "cores", "agent_procs", "max_parallel", "api_max_children", "status",
                "hosts", "workers", "clients", "keepalive", "requests", "processes", "session",
                "handshakes", "resumed", "path"}


def _argv(part: str, opts) -> tuple:
    """(script, arguments, what it needs on PATH) of one part."""
    hosts, repeat = (20, 1) if opts.quick else (opts.hosts, opts.repeat)
    if part == "fanout":
        return "fanout.py", ["--hosts", str(hosts), "--repeat", str(repeat)], ()
    if part == "api":
        return "api.py", ["--duration", "2" if opts.quick else "10"], ()
    if part == "floor":
        return "floor.py", ["--hosts", str(hosts), "--repeat", str(repeat)] + \
            (["--requests", "30", "--duration", "2"] if opts.quick else []), ()
    if part == "state":
        return "state.py", ["--hosts", str(hosts), "--repeat", str(repeat)] + \
            (["--loop-runs", "10", "--cluster-runs", "10"] if opts.quick else []), ("redis-server",)
    if part == "workers":
        big = 20 if opts.quick else opts.worker_hosts
        return "sweep_workers.py", ["--hosts", str(big), "--workers", opts.workers,
                                    "--repeat", str(repeat)], ()
    if part == "ansible":
        return "ansible_baseline.py", ["--hosts", "10" if opts.quick else "100",
                                       "--repeat", str(repeat)], ("ansible", "sshd")
    raise ValueError(part)


#: In the order they run (the heavy fleets last, so the API figures see a quiet machine).
PARTS = ("api", "floor", "fanout", "workers", "state", "ansible")


def run_part(part: str, opts) -> dict:
    """Run one part; {"part", "load_before", "load_after", "seconds", "results": [...]} or
    the same with "failed" / "skipped" and the reason."""
    script, args, needs = _argv(part, opts)
    out = {"part": part, "command": "python bench/%s %s --json" % (script, " ".join(args))}
    missing = [tool for tool in needs if not shutil.which(tool)
               and not os.path.exists(os.path.join("/usr/sbin", tool))]
    if missing:
        out["skipped"] = "%s not installed" % ", ".join(missing)
        return out
    out["load_before"] = common.load_average()
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, os.path.join(HERE, script), *args, "--json"],
                              capture_output=True, text=True, timeout=PART_TIMEOUT_S, cwd=HERE)
    except subprocess.TimeoutExpired:
        out["failed"] = "did not finish within %d s" % PART_TIMEOUT_S
        return out
    out["seconds"] = round(time.monotonic() - started, 1)
    out["load_after"] = common.load_average()
    results = []
    for line in done.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                results.append(json.loads(line))
            except ValueError:
                pass
    out["results"] = results
    if done.returncode != 0 or not results:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        out["failed"] = "exit %d: %s" % (done.returncode, " | ".join(tail) or "no output")
    return out


def figures(value, prefix: str = "") -> list:
    """[(name, number)] of every numeric leaf of a part's JSON, conditions left out."""
    rows = []
    if isinstance(value, dict):
        label = ""
        for key in ("hosts", "workers"):
            if key in value and isinstance(value[key], int) and not prefix.endswith(key):
                label += "%s=%d " % ("N" if key == "hosts" else key, value[key])
        for key, item in value.items():
            if key in _NOT_FIGURES and not isinstance(item, dict):
                continue
            if key in ("machine", "runs", "errors"):
                continue
            rows += figures(item, (prefix + " " + label + key).strip())
    elif isinstance(value, list):
        for item in value:
            rows += figures(item, prefix)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        rows.append((" ".join(dict.fromkeys(prefix.split())), value))
    return rows


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=HERE, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _load(text) -> str:
    return "%.2f" % text[0] if text else "-"


def _print_table(report: dict) -> None:
    """The Markdown table of a finished report (the --out JSON)."""
    print("# ctrl-exec benchmarks, %s, commit %s" % (report["date"], report["commit"]))
    print("# machine: %s\n" % json.dumps(report["machine"]))
    print("| part | figure | value | load avg (1 min) before -> after |")
    print("| --- | --- | --- | --- |")
    for result in report["parts"]:
        load = "%s -> %s" % (_load(result.get("load_before")), _load(result.get("load_after")))
        if "skipped" in result or "failed" in result:
            print("| %s | %s | - | %s |" % (result["part"], ("skipped: " + result["skipped"])
                                             if "skipped" in result
                                             else ("failed: " + result["failed"]), load))
        for name, value in figures(result.get("results", [])):
            print("| %s | %s | %s | %s |" % (result["part"], name, value, load))


def main(argv: list | None = None) -> int:
    """Run the parts asked for, print the table; exit 1 when a part failed."""
    parser = argparse.ArgumentParser(prog="bench/all.py", description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", type=int, default=1000, help="fan-out size (default 1000)")
    parser.add_argument("--worker-hosts", type=int, default=5000,
                        help="fleet of the dispatch_workers sweep (default 5000)")
    parser.add_argument("--workers", default="1,2", help="dispatch_workers values (default 1,2)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per point (medians)")
    parser.add_argument("--only", default="", help="comma list of: " + ",".join(PARTS))
    parser.add_argument("--quick", action="store_true", help="small sizes (a harness check)")
    parser.add_argument("--json", action="store_true", help="print the raw JSON, not the table")
    parser.add_argument("--out", default="", help="also write the raw JSON to this file")
    parser.add_argument("--table-from", default="", metavar="FILE",
                        help="print the table of an earlier --out file; run nothing")
    opts = parser.parse_args(argv)
    if opts.table_from:
        with open(opts.table_from) as handle:
            _print_table(json.load(handle))
        return 0
    chosen = [p.strip() for p in opts.only.split(",") if p.strip()] or list(PARTS)
    unknown = [p for p in chosen if p not in PARTS]
    if unknown:
        parser.error("unknown part(s) %s; choose from %s" % (", ".join(unknown), ", ".join(PARTS)))
    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "commit": _commit(), "machine": common.machine_info(), "parts": []}
    if not opts.json:
        print("# ctrl-exec benchmarks, %s, commit %s" % (report["date"], report["commit"]))
        print("# machine: %s\n" % json.dumps(report["machine"]), flush=True)
        print("| part | figure | value | load avg (1 min) before -> after |")
        print("| --- | --- | --- | --- |", flush=True)
    failed = False
    for part in [p for p in PARTS if p in chosen]:
        result = run_part(part, opts)
        report["parts"].append(result)
        load = "%s -> %s" % (_load(result.get("load_before")), _load(result.get("load_after")))
        if opts.json:
            continue
        if "skipped" in result or "failed" in result:
            failed = failed or "failed" in result
            print("| %s | %s | - | %s |" % (part, ("skipped: " + result["skipped"]) if "skipped"
                                             in result else ("failed: " + result["failed"]), load))
        for name, value in figures(result.get("results", [])):
            print("| %s | %s | %s | %s |" % (part, name, value, load), flush=True)
    if opts.json:
        print(json.dumps(report))
    if opts.out:
        with open(opts.out, "w") as handle:
            json.dump(report, handle, indent=1)
    failed = failed or any("failed" in part for part in report["parts"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
