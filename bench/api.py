"""API benchmark: requests/s and latency of GET /health and a 1-host POST /run.

Owns: a small bench fleet (one agent per concurrent client, so no two
in-flight runs contend for the same host+script lock), one real API process,
and the load: ``wrk`` (Debian's package) when it is installed, else a gevent
load generator in a child process.  Figures:

* GET /health with 64 concurrent clients: requests/s, p50, p99;
* POST /run on 1 host with 64 concurrent clients (each client its own host);
* POST /run on 1 host, one client at a time: p50 latency, minus the script's
  own p50 run time (fork+exec+exit, timed here directly) = the ctrl-exec
  overhead of a run.

Each is taken twice: one request per connection (what a client gets unless it
asks otherwise, as with the original API) and with ``Connection: keep-alive``
(the API then serves further requests on the connection).

The load generator shares the machine's cores with the API and the agents,
so the figures are conservative.  Never does: bind a non-loopback address,
change product modules, or assert anything.

Usage:
    python bench/api.py [--duration 10] [--clients 64] [--json] [--loadgen gevent]
"""

from __future__ import annotations

# The gevent load generator child patches before anything else is imported,
# like every ctrl-exec entry point; the parent process stays unpatched.
import sys

if __name__ == "__main__" and "--loadgen-child" in sys.argv:
    from gevent import monkey

    monkey.patch_all()

__all__ = ["run_wrk", "run_gevent_load", "script_run_time_ms", "measure_api", "main",
           "WRK_LUA", "DEFAULT_DURATION_S", "DEFAULT_CLIENTS"]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import common  # noqa: E402  (puts the repository root on sys.path)
import fleet as fleet_mod  # noqa: E402

DEFAULT_DURATION_S = 10.0
DEFAULT_CLIENTS = 64
#: Direct runs of the script timed for its own p50.
SCRIPT_SAMPLES = 200

#: wrk script: each thread has one connection and (for /run) its own host;
#: done() prints one JSON line with exact percentiles (microseconds).
WRK_LUA = r"""
local hosts = {%(hosts)s}
local counter = 0
local method, path, body = "%(method)s", "%(path)s", nil
local keepalive = %(keepalive)s
function setup(thread)
  counter = counter + 1
  thread:set("host", hosts[((counter - 1) %% #hosts) + 1])
end
function init(args)
  local headers = {}
  if keepalive then
    headers["Connection"] = "keep-alive"
  end
  if method == "POST" then
    headers["Content-Type"] = "application/json"
    body = '{"hosts":["' .. host .. '"],"script":"%(script)s"}'
    req = wrk.format("POST", path, headers, body)
  else
    req = wrk.format("GET", path, headers)
  end
end
function request()
  return req
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,' ..
    '"max_us":%%d,"mean_us":%%.1f,"connect_errors":%%d,"read_errors":%%d,"write_errors":%%d,' ..
    '"status_errors":%%d,"timeouts":%%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean, e.connect, e.read, e.write, e.status,
    e.timeout))
end
"""


def run_wrk(port: int, *, method: str, path: str, hosts: list, clients: int, duration_s: float,
            keepalive: bool = False, script: str = fleet_mod.SCRIPT_NAME) -> dict:
    """Drive the API with wrk (one thread per client so each keeps its own host).

    Without ``keepalive`` the API closes after each answer and wrk reconnects.

    Returns:
        {"tool": "wrk", "clients", "requests", "rps", "p50_ms", "p90_ms", "p99_ms", "max_ms",
         "errors": {"connect","read","write","status","timeout"}}
    """
    lua = WRK_LUA % {"hosts": ", ".join('"%s"' % h for h in hosts) or '""', "method": method,
                     "path": path, "script": script, "keepalive": "true" if keepalive else "false"}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(lua)
    try:
        threads = clients if method == "POST" else min(clients, 2)
        out = subprocess.run(
            ["wrk", "-t%d" % threads, "-c%d" % clients, "-d%ds" % max(1, round(duration_s)),
             "--timeout", "30s", "-s", handle.name, "http://127.0.0.1:%d%s" % (port, path)],
            capture_output=True, text=True, timeout=duration_s + 60)
    finally:
        os.unlink(handle.name)
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            raw = json.loads(line[len("WRKJSON "):])
            return _load_row("wrk", clients, keepalive, raw["requests"], raw["duration_us"] / 1e6,
                             [raw["p50_us"], raw["p90_us"], raw["p99_us"], raw["max_us"]],
                             {"connect": raw["connect_errors"], "read": raw["read_errors"],
                              "write": raw["write_errors"], "status": raw["status_errors"],
                              "timeout": raw["timeouts"]})
    raise common.BenchError("wrk printed no summary (exit %d): %s" % (out.returncode,
                                                                      out.stderr[-500:]))


def run_gevent_load(port: int, *, method: str, path: str, hosts: list, clients: int,
                    duration_s: float, keepalive: bool = False) -> dict:
    """The same load from a gevent child process (when wrk is not installed)."""
    return common.run_json_child(
        [os.path.abspath(__file__), "--loadgen-child", "--port", str(port), "--method", method,
         "--path", path, "--hosts-list", ",".join(hosts), "--clients", str(clients),
         "--duration", str(duration_s)] + (["--keepalive"] if keepalive else []),
        what="load generator", timeout_s=duration_s + 60)


def script_run_time_ms(path: str, samples: int = SCRIPT_SAMPLES) -> float:
    """p50 wall time of running the script directly (fork+exec+wait, output captured)."""
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        subprocess.run([path], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, check=True)
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000.0, 3)


def measure_api(fleet, *, clients: int, duration_s: float, tool: str) -> dict:
    """Start an API on ``fleet`` and take the three measurements.

    Returns:
        {"health": load row, "run_1host": load row, "run_1host_serial": load row,
         "script_p50_ms", "run_overhead_p50_ms", "api_peak_rss_mb", "api_max_children",
         "keepalive": {the same three rows and run_overhead_p50_ms, with Connection: keep-alive}}
    """
    load = run_wrk if tool == "wrk" else run_gevent_load
    api = common.ApiProcess(fleet, max_parallel=common.DEFAULT_MAX_PARALLEL,
                            log_name="api-bench.log").start()
    try:
        names = fleet.names
        # One short warm-up per host: TLS sessions cached, agents' code paths hot.
        api.request("POST", "/run", {"hosts": names, "script": fleet_mod.SCRIPT_NAME})
        rows = {}
        for keepalive in (False, True):
            rows[keepalive] = {
                "health": load(api.port, method="GET", path="/health", hosts=[],
                               clients=clients, duration_s=duration_s, keepalive=keepalive),
                "run_1host": load(api.port, method="POST", path="/run", hosts=names[:clients],
                                  clients=clients, duration_s=duration_s, keepalive=keepalive),
                # A host the concurrent phase never used: its last runs may still hold locks.
                "run_1host_serial": load(api.port, method="POST", path="/run",
                                         hosts=names[-1:], clients=1, duration_s=duration_s,
                                         keepalive=keepalive)}
        rss = common.proc_peak_rss_mb(api.proc.pid)
    finally:
        api.stop()
    script_ms = script_run_time_ms(fleet.script_path)
    for row in rows.values():
        row["run_overhead_p50_ms"] = round(row["run_1host_serial"]["p50_ms"] - script_ms, 3)
    result = dict(rows[False])
    result.update(script_p50_ms=script_ms, api_peak_rss_mb=rss,
                  api_max_children=common.API_MAX_CHILDREN, keepalive=rows[True])
    return result


# --- private ---


def _load_row(tool: str, clients: int, keepalive: bool, requests: int, duration_s: float,
              latencies_us: list, errors: dict) -> dict:
    p50, p90, p99, top = (round(value / 1000.0, 3) for value in latencies_us)
    return {"tool": tool, "clients": clients, "keepalive": keepalive, "requests": requests,
            "rps": round(requests / duration_s, 1) if duration_s else 0.0,
            "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "max_ms": top, "errors": errors}


def _gevent_load(port: int, method: str, path: str, hosts: list, clients: int,
                 duration_s: float, keepalive: bool = False) -> dict:
    """--loadgen-child: ``clients`` greenlets, each a loop of requests.

    One connection per request, or with ``keepalive`` one connection reused for as long
    as the API answers ``Connection: keep-alive``.
    """
    import socket

    import gevent

    latencies, errors = [], {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
    end = time.monotonic() + duration_s
    connection = "keep-alive" if keepalive else "close"

    def request_bytes(host: str) -> bytes:
        if method == "GET":
            return ("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: %s\r\n\r\n"
                    % (path, connection)).encode()
        body = json.dumps({"hosts": [host], "script": fleet_mod.SCRIPT_NAME}).encode()
        head = ("POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                "Content-Length: %d\r\nConnection: %s\r\n\r\n"
                % (path, len(body), connection)).encode()
        return head + body

    def read_answer(sock) -> tuple:
        """(status line, keep the connection?) of one Content-Length framed answer."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("closed before the answer")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        fields = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip().lower()
        length = int(fields.get(b"content-length", b"0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("closed inside the answer")
            body += chunk
        return head.split(b"\r\n", 1)[0], fields.get(b"connection") == b"keep-alive"

    def client(number: int) -> None:
        data = request_bytes(hosts[number % len(hosts)] if hosts else "")
        sock = None
        while time.monotonic() < end:
            started = time.perf_counter()
            if sock is None:
                try:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                except OSError:
                    errors["connect"] += 1
                    continue
            try:
                sock.sendall(data)
                status, kept = read_answer(sock)
            except socket.timeout:
                errors["timeout"] += 1
                kept = False
                status = None
            except OSError:
                errors["read"] += 1
                kept = False
                status = None
            if not (keepalive and kept):
                sock.close()
                sock = None
            if status is None:
                continue
            latencies.append(time.perf_counter() - started)
            if not status.startswith(b"HTTP/1.1 2"):
                errors["status"] += 1
        if sock is not None:
            sock.close()

    started = time.monotonic()
    gevent.joinall([gevent.spawn(client, i) for i in range(clients)], timeout=duration_s + 40)
    elapsed = time.monotonic() - started
    latencies.sort()
    pick = (lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e6) \
        if latencies else (lambda q: 0.0)
    return _load_row("gevent", clients, keepalive, len(latencies), elapsed,
                     [pick(0.50), pick(0.90), pick(0.99), pick(1.0)], errors)


def _print_result(result: dict) -> None:
    for rows, mode in ((result, "new connection per request"),
                       (result["keepalive"], "Connection: keep-alive")):
        print("-- %s" % mode)
        for label, key in (("GET /health", "health"), ("POST /run 1 host", "run_1host"),
                           ("POST /run 1 host, serial", "run_1host_serial")):
            row = rows[key]
            print("%-26s %2d clients (%s): %8.1f req/s  p50 %7.3f ms  p99 %7.3f ms  errors %s"
                  % (label, row["clients"], row["tool"], row["rps"], row["p50_ms"],
                     row["p99_ms"], {k: v for k, v in row["errors"].items() if v} or "none"))
        print("/run overhead at p50 %.3f ms" % rows["run_overhead_p50_ms"])
    print("script's own p50 run time %.3f ms; API peak RSS %.1f MB; load %s"
          % (result["script_p50_ms"], result["api_peak_rss_mb"], result["load_avg_before"]))


def main(argv: list | None = None) -> int:
    """Build a fleet of --clients agents, start it, measure, print."""
    parser = argparse.ArgumentParser(prog="bench/api.py", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION_S, help="seconds per test")
    parser.add_argument("--clients", type=int, default=DEFAULT_CLIENTS, help="concurrent clients")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--root", default="", help="fleet folder (default /tmp/ctrlexec-bench-api)")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "gevent"), default="auto")
    parser.add_argument("--loadgen-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--method", default="GET", help=argparse.SUPPRESS)
    parser.add_argument("--path", default="/health", help=argparse.SUPPRESS)
    parser.add_argument("--hosts-list", default="", help=argparse.SUPPRESS)
    parser.add_argument("--keepalive", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.loadgen_child:
        hosts = [h for h in opts.hosts_list.split(",") if h]
        print(json.dumps(_gevent_load(opts.port, opts.method, opts.path, hosts, opts.clients,
                                      opts.duration, opts.keepalive)))
        return 0
    tool = common.pick_loadgen(parser, opts.loadgen)
    common.raise_fd_limit()
    fleet = fleet_mod.BenchFleet(opts.root or "/tmp/ctrlexec-bench-api", opts.clients + 1).build()
    fleet.start()
    try:
        before = common.load_average()
        result = measure_api(fleet, clients=opts.clients, duration_s=opts.duration, tool=tool)
        result.update(load_avg_before=before, load_avg_after=common.load_average(),
                      machine=common.machine_info())
    finally:
        fleet.stop()
    common.report(result, as_json=opts.json, printer=_print_result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
