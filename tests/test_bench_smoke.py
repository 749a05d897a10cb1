"""Smoke test of the bench harness (bench/): it must keep working, not be fast.

Runs ``bench/fanout.py``, ``bench/api.py`` and ``bench/floor.py`` on a 2-3 host
fleet in tmp_path,
each as a subprocess in its own session (killed as a group on timeout, so no
agent host outlives the test), and checks the shape of the JSON and that
every host answered.  No timing is asserted: the figures on a shared CI
machine mean nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
RUN_TIMEOUT_S = 240

FANOUT_KEYS = {"hosts", "ok_hosts", "wall_s", "dispatcher_cpu_s", "per_host_cpu_ms",
               "api_peak_rss_mb"}


def _run(args: list, tmp_path) -> str:
    """Run a bench script; on timeout kill its whole process group (agents included)."""
    proc = subprocess.Popen([sys.executable] + args, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=str(tmp_path), start_new_session=True,
                            env=dict(os.environ, CTRL_EXEC_LOG="stderr"))
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
        pytest.fail("%s did not finish within %ds" % (args[0], RUN_TIMEOUT_S))
    assert proc.returncode == 0, err.decode("utf-8", "replace")[-3000:]
    return out.decode("utf-8")


def test_fanout_runs_three_hosts_through_api_and_engine(tmp_path):
    out = _run([os.path.join(BENCH, "fanout.py"), "--hosts", "3", "--repeat", "1", "--json",
                "--root", str(tmp_path / "fleet")], tmp_path)
    point = json.loads(out.strip().splitlines()[-1])
    assert FANOUT_KEYS <= set(point)
    assert point["hosts"] == 3
    assert point["ok_hosts"] == 3
    assert point["warm"]["ok_hosts"] == 3
    assert point["engine"]["cold"]["ok_hosts"] == 3
    assert point["engine"]["warm"]["ok_hosts"] == 3
    assert point["api_peak_rss_mb"] > 0


def test_fanout_leaves_no_agent_host_running(tmp_path):
    _run([os.path.join(BENCH, "fanout.py"), "--hosts", "2", "--repeat", "1", "--json",
          "--no-engine", "--root", str(tmp_path / "fleet")], tmp_path)
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path / "fleet")], capture_output=True,
                               text=True).stdout.split()
    assert leftovers == []


def test_api_bench_with_gevent_load_generator(tmp_path):
    out = _run([os.path.join(BENCH, "api.py"), "--clients", "2", "--duration", "1", "--json",
                "--loadgen", "gevent", "--root", str(tmp_path / "fleet")], tmp_path)
    result = json.loads(out.strip().splitlines()[-1])
    for rows, keepalive in ((result, False), (result["keepalive"], True)):
        for key in ("health", "run_1host", "run_1host_serial"):
            row = rows[key]
            assert row["requests"] > 0 and row["keepalive"] is keepalive
            assert row["errors"] == {"connect": 0, "read": 0, "write": 0, "status": 0,
                                     "timeout": 0}
            assert {"rps", "p50_ms", "p99_ms"} <= set(row)
        assert "run_overhead_p50_ms" in rows


def test_floor_bench_measures_every_floor_next_to_the_product(tmp_path):
    out = _run([os.path.join(BENCH, "floor.py"), "--hosts", "2", "--repeat", "1", "--requests",
                "5", "--duration", "1", "--loadgen", "gevent", "--json",
                "--root", str(tmp_path / "fleet")], tmp_path)
    result = json.loads(out.strip().splitlines()[-1])
    tls = result["tls"]
    assert tls["resumed_ok"] == tls["handshakes"]
    assert tls["full"]["client_ms"] > 0 and tls["resumed"]["session_copy_ms"] > 0
    for path in ("floor", "engine"):
        for kind in ("cold", "warm"):
            assert result["dispatcher"][path][kind]["ok_hosts"] == 2
    for path in ("floor", "agent"):
        assert result["agent"][path]["p50_ms"] > 0
    for mode in ("close", "keepalive"):
        row = result["http"][mode]
        assert row["requests"] > 0 and row["errors"]["status"] == 0
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path / "fleet")], capture_output=True,
                               text=True).stdout.split()
    assert leftovers == []


def test_worker_sweep_reports_both_worker_counts(tmp_path):
    out = _run([os.path.join(BENCH, "sweep_workers.py"), "--hosts", "3", "--workers", "1,2",
                "--repeat", "1", "--json", "--root", str(tmp_path / "fleet")], tmp_path)
    points = [json.loads(line) for line in out.strip().splitlines()]
    assert [p["workers"] for p in points] == [1, 2]
    for point in points:
        assert point["cold"]["ok_hosts"] == 3 and point["warm"]["ok_hosts"] == 3
        assert point["cold"]["dispatcher_peak_rss_mb"] > 0
    assert points[1]["processes"] == 3            # the API and its two workers


def test_all_prints_one_table_with_the_load_beside_each_figure(tmp_path):
    report = tmp_path / "bench.json"
    out = _run([os.path.join(BENCH, "all.py"), "--quick", "--only", "fanout",
                "--out", str(report)], tmp_path)
    rows = [line for line in out.splitlines() if line.startswith("| fanout |")]
    assert any("per_host_cpu_ms" in row for row in rows), out
    assert all(" -> " in row.rsplit("|", 2)[1] for row in rows), out
    again = _run([os.path.join(BENCH, "all.py"), "--table-from", str(report)], tmp_path)
    assert [l for l in again.splitlines() if l.startswith("| fanout |")] == rows
