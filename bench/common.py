"""Shared pieces of the bench scripts (bench/*.py); measures nothing itself.

Owns: putting the repository root on sys.path (the one place bench does it),
the real API process (``ctrlexec_api.py --config``) on a free loopback port,
free ports, bounded waits for and stops of child processes, running a child that
prints one JSON document, the process figures every script reports (CPU time and
peak RSS from /proc and getrusage, load averages, the machine), the median of
result rows, and the options that several scripts parse alike (--hosts lists,
--loadgen).

Never does: bind a non-loopback address, import tests/, patch gevent (a script
whose child runs gevent code patches there, before importing this), change
product modules, or assert anything.
"""

from __future__ import annotations

__all__ = [
    "ROOT", "BENCH_DIR", "API_START_TIMEOUT_S", "JOB_TIMEOUT_S", "STOP_TIMEOUT_S",
    "DEFAULT_MAX_PARALLEL", "API_MAX_CHILDREN",
    "BenchError", "ApiProcess", "free_port", "wait_ready", "stop_process", "run_json_child",
    "proc_cpu_s", "proc_peak_rss_mb", "rusage_self", "raise_fd_limit", "load_average",
    "machine_info", "median_row", "ok_count", "host_counts", "pick_loadgen", "report",
]

import http.client
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
# The product modules (config, pki, engine, ctrlexec_agent ...) live at the repo root.
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

#: API start-up (bind + first /health) and one whole job.
API_START_TIMEOUT_S = 30.0
JOB_TIMEOUT_S = 300.0
#: Graceful stop of a bench child (API, agent hosts) before SIGKILL.
STOP_TIMEOUT_S = 20.0
#: Hosts talked to at once (ctrl-exec.conf max_parallel) unless --max-parallel says otherwise.
DEFAULT_MAX_PARALLEL = 256
#: API concurrency slots for the bench (api.py drives 64 clients).
API_MAX_CHILDREN = 128
_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A bench step failed (a process did not start, a job did not answer)."""


class ApiProcess:
    """``python ctrlexec_api.py --config PATH`` as a subprocess on a free loopback port.

    ``fleet`` is a bench/fleet.py BenchFleet: its ctrl-exec.conf is rewritten with
    api_port, max_parallel, api_max_children and ``conf``; the log goes to
    ``<fleet root>/<log_name>``. With ``conf_name`` that conf is also copied to
    ``conf_name`` beside ctrl-exec.conf (relative paths resolve alike) and the process
    reads the copy, so several ApiProcess of one fleet (nodes) keep their own settings.
    """

    def __init__(self, fleet, *, max_parallel: int, log_name: str = "api.log",
                 conf_name: str = "", **conf) -> None:
        self.fleet = fleet
        self.port = free_port("127.0.0.1")
        fleet.write_conf(api_port=self.port, max_parallel=max_parallel,
                         api_max_children=API_MAX_CHILDREN, **conf)
        self.conf_path = fleet.conf_path
        if conf_name:
            self.conf_path = os.path.join(os.path.dirname(fleet.conf_path), conf_name)
            shutil.copyfile(fleet.conf_path, self.conf_path)
        self.log_path = os.path.join(fleet.root, log_name)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ApiProcess":
        """Start the API and wait until GET /health answers 200.

        Raises:
            BenchError: the process exited or /health did not answer in time.
        """
        env = dict(os.environ, CTRL_EXEC_LOG="stderr")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "ctrlexec_api.py"), "--config",
                 self.conf_path], stdout=log, stderr=log, env=env, cwd=self.fleet.root)
        try:
            wait_ready(self.proc, self._healthy, "ctrlexec_api.py (log %s)" % self.log_path,
                       API_START_TIMEOUT_S)
        except BenchError:
            self.stop()
            raise
        return self

    def request(self, method: str, path: str, body: dict | None = None, *,
                timeout: float = JOB_TIMEOUT_S) -> tuple:
        """One HTTP exchange; returns (status, parsed JSON body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
        finally:
            conn.close()

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def _healthy(self) -> bool:
        """True once GET /health answers 200 (a refused connection is "not yet")."""
        try:
            return self.request("GET", "/health", timeout=2.0)[0] == 200
        except OSError:
            return False


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``address`` right now."""
    sock = socket.socket()
    try:
        sock.bind((address, 0))
        return sock.getsockname()[1]
    finally:
        sock.close()


def wait_ready(proc: subprocess.Popen, probe, what: str, timeout_s: float) -> None:
    """Poll probe() until it is true.

    Raises:
        BenchError: ``proc`` exited first, or timeout_s passed (the caller stops it).
    """
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise BenchError("%s exited %s" % (what, proc.returncode))
        if probe():
            return
        time.sleep(0.05)
    raise BenchError("%s did not answer within %gs" % (what, timeout_s))


def stop_process(proc: subprocess.Popen | None, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM, wait up to timeout_s, then SIGKILL (nothing when proc is None or gone)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def run_json_child(argv: list, *, what: str, timeout_s: float, log_path: str = ""):
    """Run ``python argv...`` (CTRL_EXEC_LOG=stderr) and parse the JSON it prints.

    The child's stderr is appended to ``log_path`` when one is given.
    Raises:
        BenchError: the child exited non-zero (the tail of its stderr in the message).
    """
    out = subprocess.run([sys.executable] + argv, capture_output=True, timeout=timeout_s,
                         env=dict(os.environ, CTRL_EXEC_LOG="stderr"))
    if log_path:
        with open(log_path, "ab") as log:
            log.write(out.stderr)
    if out.returncode != 0:
        raise BenchError("%s exited %d: %s" % (what, out.returncode,
                                               out.stderr[-2000:].decode("utf-8", "replace")))
    return json.loads(out.stdout)


def proc_cpu_s(pid: int, *, children: bool = False) -> float:
    """utime+stime of ``pid`` in seconds (+ reaped children's with children=True)."""
    with open("/proc/%d/stat" % pid) as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICKS


def proc_peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of ``pid`` in MiB."""
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    return 0.0


def rusage_self() -> tuple:
    """(user+system CPU seconds, peak RSS in MiB) of this process, from getrusage."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, round(usage.ru_maxrss / 1024.0, 1)


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def load_average() -> list:
    """The 1, 5 and 15 minute load averages (printed with every figure)."""
    return [round(value, 2) for value in os.getloadavg()]


def machine_info() -> dict:
    """CPU model, cores, memory, kernel, Python and OpenSSL versions."""
    import ssl

    model = ""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(memory_gib, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "openssl": ssl.OPENSSL_VERSION}


def median_row(rows: list, keys) -> dict:
    """{"hosts", "ok_hosts": the minimum (so a failure shows), each of ``keys``: its median}.

    A key no row has is left out; medians are rounded to 3 places.
    """
    out = {"hosts": rows[0]["hosts"], "ok_hosts": min(row["ok_hosts"] for row in rows)}
    for key in keys:
        values = [row[key] for row in rows if row.get(key) is not None]
        if values:
            out[key] = round(statistics.median(values), 3)
    return out


def ok_count(results: list) -> int:
    """Result rows in which the bench script ran: exit 0 and stdout "ok\\n"."""
    return sum(1 for row in results if row.get("exit") == 0 and row.get("stdout") == "ok\n")


def report(result: dict, *, as_json: bool, printer) -> None:
    """One JSON line on stdout with --json, else ``printer(result)``'s lines; flushed either way."""
    if as_json:
        print(json.dumps(result), flush=True)
    else:
        printer(result)
        sys.stdout.flush()


def host_counts(parser, text: str) -> list:
    """``--hosts`` as N or a comma list (1,10,100); parser.error unless all are >= 1."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        parser.error("--hosts takes positive integers, e.g. 1000 or 1,10,100")
    return counts


def pick_loadgen(parser, choice: str) -> str:
    """``--loadgen auto|wrk|gevent`` -> "wrk" or "gevent" (auto: wrk when installed)."""
    if choice == "auto":
        return "wrk" if shutil.which("wrk") else "gevent"
    if choice == "wrk" and not shutil.which("wrk"):
        parser.error("wrk is not installed (apt-get install wrk), use --loadgen gevent")
    return choice
