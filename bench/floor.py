"""Floor benchmark: what the same work costs with no ctrl-exec code in the way.

Owns four measurements that bound what ctrl-exec can reach on this machine,
each taken next to the product's own figure in the same run:

* ``tls``: mutual-TLS handshakes between the fleet's own contexts
  (``ctrlexec_agent.client_context`` / ``server_context``) over memory BIOs, no
  sockets: client and server CPU per handshake, full and resumed, and the
  cost of CPython's copy of a cached session (``wrap_bio(session=...)``).
* ``dispatcher``: a minimal gevent fan-out over the bench fleet (connect, wrap
  with the cached session, send the bench ``/run`` request, read to the end,
  close: nothing else) with the same pool size, next to
  ``engine.Engine.dispatch_all`` in the same child process; CPU ms per host
  and wall time, cold (full handshakes) and warm (resumed).
* ``agent``: a minimal threaded stdlib mTLS server (handshake, read the
  request, ``subprocess.run`` of the same script, answer) next to the real
  agent, each alone in its process as on a real host: CPU ms per request and
  p50 latency over serial requests.
* ``http``: a bare gevent ``pywsgi`` app answering ``/health`` under the same
  load as ``bench/api.py`` uses, one request per connection and keep-alive.

Never does: bind a non-loopback address, change product modules, or assert
anything; it measures and prints.

Usage:
    python bench/floor.py [--hosts 1000] [--repeat 3] [--json] [--only tls,dispatcher,agent,http]
"""

from __future__ import annotations

# The dispatcher and http children run gevent code; like every ctrl-exec entry
# point they patch before anything else is imported.  The parent and the agent
# floor server stay unpatched (plain threads, as the agent).
import sys

if __name__ == "__main__" and ("dispatcher" in sys.argv or "http" in sys.argv) \
        and "--child" in sys.argv:
    from gevent import monkey

    monkey.patch_all()

__all__ = ["measure_tls", "measure_dispatcher", "measure_agent", "measure_http", "main"]

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import common  # noqa: E402  (puts the repository root on sys.path)
import ctrlexec_agent as wire  # noqa: E402
import fleet as fleet_mod  # noqa: E402
from common import BenchError  # noqa: E402

#: In-memory handshakes per kind (full / resumed).
TLS_HANDSHAKES = 300
#: Serial requests per agent server.
AGENT_REQUESTS = 300
#: Seconds of load per http mode.
HTTP_DURATION_S = 8.0
HTTP_CLIENTS = 64
#: Address of the agent floor server (the bench fleet uses 127.B.x.y with B >= 100).
FLOOR_AGENT_ADDRESS = "127.0.0.9"
CHILD_TIMEOUT_S = 600.0
_HEALTH_BODY = b'{"ok":true}'


def measure_tls(fleet, handshakes: int = TLS_HANDSHAKES) -> dict:
    """CPU ms per mutual-TLS handshake between the fleet's contexts, over memory BIOs.

    Returns:
        {"full": {"client_ms", "server_ms"}, "resumed": {"client_ms", "server_ms",
         "session_copy_ms"}, "session_get_ms", "resumed_ok", "protocol"}
    """
    client_ctx, server_ctx = _fleet_contexts(fleet)
    full = collections.Counter()
    last = None
    for _ in range(handshakes):
        last = _memory_handshake(client_ctx, server_ctx, None, full)
    started = time.thread_time()
    for _ in range(handshakes):
        session = last.session
    getter_ms = (time.thread_time() - started) * 1000.0 / handshakes
    resumed = collections.Counter()
    reused = 0
    for _ in range(handshakes):
        reused += bool(_memory_handshake(client_ctx, server_ctx, session, resumed).session_reused)
    per = lambda counter, key: round(counter[key] * 1000.0 / handshakes, 3)  # noqa: E731
    return {
        "full": {"client_ms": per(full, "client"), "server_ms": per(full, "server")},
        "resumed": {"client_ms": per(resumed, "client"), "server_ms": per(resumed, "server"),
                    "session_copy_ms": per(resumed, "wrap")},
        "session_get_ms": round(getter_ms, 3), "resumed_ok": reused,
        "handshakes": handshakes, "protocol": last.version(),
    }


def measure_dispatcher(fleet, hosts: int, *, max_parallel: int, repeat: int) -> dict:
    """Minimal gevent fan-out vs Engine.dispatch_all, in one fresh gevent child.

    Returns:
        {"floor": {"cold": row, "warm": row}, "engine": {"cold": row, "warm": row}} where
        row = {"hosts", "ok_hosts", "wall_s", "cpu_s", "per_host_cpu_ms"} (medians)
    """
    return common.run_json_child(
        [os.path.abspath(__file__), "--child", "dispatcher", "--root", fleet.root,
         "--hosts", str(hosts), "--max-parallel", str(max_parallel), "--repeat", str(repeat)],
        what="dispatcher child", timeout_s=CHILD_TIMEOUT_S,
        log_path=os.path.join(fleet.root, "floor-dispatcher.log"))


def measure_agent(fleet, requests: int = AGENT_REQUESTS) -> dict:
    """Serial /run requests to a minimal stdlib mTLS server and to the real agent 0.

    ``fleet`` must not be serving: agent 0 is started alone in one host process (a
    process serving many bench agents pays for their descriptors at every spawn).

    Returns:
        {"floor": {"cpu_ms_per_request", "p50_ms"}, "agent": {...}, "requests"}
    """
    client_ctx = wire.client_context(*_dispatcher_files(fleet))
    request = _bench_request()
    port = common.free_port(FLOOR_AGENT_ADDRESS)
    with _ready_child(["agent", "--root", fleet.root, "--port", str(port)],
                      "agent floor server") as server:
        floor = _serial_requests(client_ctx, (FLOOR_AGENT_ADDRESS, port), request, requests,
                                 server.pid)
    target = fleet.layout["agents"][0]
    agent_cfg = wire.load_agent_config(os.path.join(target["dir"], "agent.conf"))
    single = fleet_mod.BenchFleet(fleet.root, 1).build()
    single.start(1)
    try:
        agent = _serial_requests(client_ctx, (agent_cfg.bind, agent_cfg.port), request,
                                 requests, single.host_pids()[0])
    finally:
        single.stop()
    return {"floor": floor, "agent": agent, "requests": requests}


def measure_http(*, clients: int = HTTP_CLIENTS, duration_s: float = HTTP_DURATION_S,
                 tool: str = "wrk") -> dict:
    """A bare pywsgi /health app under bench/api.py's load, both connection modes.

    Returns: {"close": load row, "keepalive": load row} (rows as bench/api.py's)
    """
    import api as api_bench

    load = api_bench.run_wrk if tool == "wrk" else api_bench.run_gevent_load
    port = common.free_port("127.0.0.1")
    with _ready_child(["http", "--port", str(port)], "bare pywsgi server"):
        return {mode: load(port, method="GET", path="/health", hosts=[], clients=clients,
                           duration_s=duration_s, keepalive=mode == "keepalive")
                for mode in ("close", "keepalive")}


# --- private ---


@contextlib.contextmanager
def _ready_child(args: list, what: str):
    """``floor.py --child ARGS`` that prints READY once it listens; stopped on exit."""
    server = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child"] + args,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        if server.stdout.readline().strip() != b"READY":
            raise BenchError("%s did not start" % what)
        yield server
    finally:
        common.stop_process(server, 10)
        server.stdout.close()


def _bench_request() -> bytes:
    """The wire request of one bench script run (a fresh reqid)."""
    return wire.encode_request("POST", "/run", {"script": fleet_mod.SCRIPT_NAME, "args": [],
                                                "reqid": wire.new_reqid()})


def _fleet_contexts(fleet) -> tuple:
    target = fleet.layout["agents"][0]
    agent_cfg = wire.load_agent_config(os.path.join(target["dir"], "agent.conf"))
    return (wire.client_context(*_dispatcher_files(fleet)),
            wire.server_context(agent_cfg.cert, agent_cfg.key, agent_cfg.ca))


def _dispatcher_files(fleet) -> tuple:
    cfg = fleet.cfg
    return cfg.cert, cfg.key, cfg.ca


def _memory_handshake(client_ctx, server_ctx, session, spent: collections.Counter):
    """One handshake plus a small exchange over memory BIOs; CPU time into ``spent``."""
    clock = time.thread_time
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    started = clock()
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False, session=session)
    spent["wrap"] += clock() - started
    spent["client"] += clock() - started
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client_done = server_done = False
    while not (client_done and server_done):
        client_done = client_done or _handshake_step(client, "client", spent)
        s_in.write(c_out.read())
        server_done = server_done or _handshake_step(server, "server", spent)
        c_in.write(s_out.read())
    started = clock()
    client.write(b"x" * 200)
    spent["client"] += clock() - started
    s_in.write(c_out.read())
    started = clock()
    server.read(65536)
    server.write(b"y" * 300)
    spent["server"] += clock() - started
    c_in.write(s_out.read())
    started = clock()
    client.read(65536)          # also takes in the agent's session ticket
    spent["client"] += clock() - started
    return client


def _handshake_step(tls, side: str, spent: collections.Counter) -> bool:
    """One ``do_handshake()`` call, its CPU time into ``spent[side]``; True once done."""
    started = time.thread_time()
    try:
        tls.do_handshake()
        return True
    except ssl.SSLWantReadError:
        return False
    finally:
        spent[side] += time.thread_time() - started


def _send_and_read(tls, request: bytes) -> bytes:
    """Send one request and read the answer to the end (the agent closes after it)."""
    tls.sendall(request)
    answer = b""
    while True:
        chunk = tls.recv(65536)
        if not chunk:
            return answer
        answer += chunk


def _serial_requests(client_ctx, address: tuple, request: bytes, count: int, pid: int) -> dict:
    """``count`` requests one after the other, resuming; the server process's CPU per request."""
    session = None
    latencies = []
    cpu0 = common.proc_cpu_s(pid, children=True)
    for _ in range(count):
        started = time.perf_counter()
        with socket.create_connection(address, timeout=30) as sock:
            with client_ctx.wrap_socket(sock, session=session) as tls:
                answer = _send_and_read(tls, request)
                if not tls.session_reused:
                    session = tls.session
        latencies.append(time.perf_counter() - started)
        if not answer.startswith(b"HTTP/1.0 200") or b'"ok\\n"' not in answer:
            raise BenchError("unexpected answer from %s:%d: %r" % (address + (answer[:200],)))
    cpu = common.proc_cpu_s(pid, children=True) - cpu0
    return {"cpu_ms_per_request": round(cpu * 1000.0 / count, 3),
            "p50_ms": round(statistics.median(latencies) * 1000.0, 3)}


def _dispatcher_child(root: str, hosts: int, max_parallel: int, repeat: int) -> int:
    """--child dispatcher: the minimal fan-out and the engine, cold then warm, ``repeat`` times."""
    import gevent.pool

    import config
    import engine
    import store

    wire.setup_logging("ctrl-exec-bench")
    fleet = fleet_mod.BenchFleet(root, hosts).build()
    cfg = config.load(fleet.conf_path)
    cfg.max_parallel = max_parallel
    targets = store.Registry(cfg.state_dir).resolve(fleet.names[:hosts])
    request = _bench_request()
    rows = {"floor": {"cold": [], "warm": []}, "engine": {"cold": [], "warm": []}}
    for _ in range(repeat):
        ctx = wire.client_context(cfg.cert, cfg.key, cfg.ca)
        sessions: dict = {}

        def exchange(target) -> bool:
            key = (target.address, target.port)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.connect(key)
            tls = ctx.wrap_socket(sock, session=sessions.get(key))
            try:
                answer = _send_and_read(tls, request)
                if not tls.session_reused:
                    sessions[key] = tls.session
            finally:
                tls.close()
            return answer.startswith(b"HTTP/1.0 200") and b'"exit":0' in answer.replace(b" ", b"")

        for kind in ("cold", "warm"):
            rows["floor"][kind].append(_timed(lambda: sum(
                gevent.pool.Pool(max_parallel).map(exchange, targets)), hosts))
        eng = engine.Engine.from_config(cfg)
        for kind in ("cold", "warm"):
            rows["engine"][kind].append(_timed(lambda: common.ok_count(eng.dispatch_all(
                targets, script=fleet_mod.SCRIPT_NAME, args=[], reqid=wire.new_reqid())), hosts))
    print(json.dumps({path: {kind: common.median_row(found, ("wall_s", "cpu_s", "per_host_cpu_ms"))
                             for kind, found in kinds.items()}
                      for path, kinds in rows.items()}))
    return 0


def _timed(job, hosts: int) -> dict:
    """Run job() (it returns the ok host count); its wall and CPU time in this process."""
    cpu0, _ = common.rusage_self()
    started = time.perf_counter()
    ok = job()
    wall = time.perf_counter() - started
    cpu = common.rusage_self()[0] - cpu0
    return {"hosts": hosts, "ok_hosts": ok, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "per_host_cpu_ms": round(cpu * 1000.0 / hosts, 3)}


def _agent_child(root: str, port: int) -> int:
    """--child agent: the minimal threaded mTLS server, one thread per connection."""
    fleet = fleet_mod.BenchFleet(root, 1).build()
    _, server_ctx = _fleet_contexts(fleet)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((FLOOR_AGENT_ADDRESS, port))
    listener.listen(128)

    def handle(conn: socket.socket) -> None:
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                reader = wire.SocketReader(tls, time.monotonic() + 30)
                request = wire.read_request(reader)
                done = subprocess.run([fleet.script_path], input=request.body, capture_output=True,
                                      close_fds=True, start_new_session=True)
                tls.sendall(wire.encode_response(200, {
                    "exit": done.returncode, "stdout": done.stdout.decode("utf-8", "replace"),
                    "stderr": done.stderr.decode("utf-8", "replace")}))
        except (OSError, wire.ProtocolError):
            pass

    print("READY", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def _http_child(port: int) -> int:
    """--child http: gevent pywsgi with a /health app and nothing else."""
    from gevent import pywsgi

    def app(environ, start_response):
        headers = [("Content-Type", "application/json"),
                   ("Content-Length", str(len(_HEALTH_BODY)))]
        keep = "keep-alive" in environ.get("HTTP_CONNECTION", "").lower()
        headers.append(("Connection", "keep-alive" if keep else "close"))
        start_response("200 OK", headers)
        return [_HEALTH_BODY]

    class Server(pywsgi.WSGIServer):
        def handle(self, sock, address):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return super().handle(sock, address)

    server = Server(("127.0.0.1", port), app, log=None)
    server.start()
    print("READY", flush=True)
    server.serve_forever()
    return 0


def _print(result: dict) -> None:
    tls = result.get("tls")
    if tls:
        print("TLS (%s, memory BIOs, %d each): full client %.3f / server %.3f ms; resumed client "
              "%.3f (of which session copy %.3f) / server %.3f ms; session get %.3f ms"
              % (tls["protocol"], tls["handshakes"], tls["full"]["client_ms"],
                 tls["full"]["server_ms"], tls["resumed"]["client_ms"],
                 tls["resumed"]["session_copy_ms"], tls["resumed"]["server_ms"],
                 tls["session_get_ms"]))
    disp = result.get("dispatcher")
    if disp:
        for path in ("floor", "engine"):
            for kind in ("cold", "warm"):
                row = disp[path][kind]
                print("dispatcher %-6s %-4s: %4d/%d ok, wall %.3f s, CPU %.3f ms/host"
                      % (path, kind, row["ok_hosts"], row["hosts"], row["wall_s"],
                         row["per_host_cpu_ms"]))
    agent = result.get("agent")
    if agent:
        for path in ("floor", "agent"):
            row = agent[path]
            print("agent %-6s: %.3f ms CPU per request (script included), p50 %.3f ms"
                  % (path, row["cpu_ms_per_request"], row["p50_ms"]))
    http = result.get("http")
    if http:
        for mode in ("close", "keepalive"):
            row = http[mode]
            print("bare pywsgi /health, %-9s: %8.1f req/s  p50 %.3f ms" % (mode, row["rps"],
                                                                        row["p50_ms"]))
    print("load %s -> %s" % (result["load_avg_before"], result["load_avg_after"]))


def main(argv: list | None = None) -> int:
    """Parse options, start the fleet when needed, take the measurements, print."""
    parser = argparse.ArgumentParser(prog="bench/floor.py", description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", type=int, default=1000, help="fleet size for 'dispatcher'")
    parser.add_argument("--repeat", type=int, default=3, help="dispatcher runs; medians reported")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--root", default="", help="fleet folder (default /tmp/ctrlexec-bench-N)")
    parser.add_argument("--only", default="tls,dispatcher,agent,http",
                        help="comma list of tls, dispatcher, agent, http")
    parser.add_argument("--max-parallel", type=int, default=0,
                        help="pool size (default: min(N, %d))" % common.DEFAULT_MAX_PARALLEL)
    parser.add_argument("--requests", type=int, default=AGENT_REQUESTS, help="agent: serial requests")
    parser.add_argument("--duration", type=float, default=HTTP_DURATION_S, help="http: seconds per mode")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "gevent"), default="auto")
    parser.add_argument("--child", choices=("dispatcher", "agent", "http"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    root = opts.root or "/tmp/ctrlexec-bench-%d" % opts.hosts
    max_parallel = opts.max_parallel or min(opts.hosts, common.DEFAULT_MAX_PARALLEL)
    if opts.child == "dispatcher":
        return _dispatcher_child(root, opts.hosts, max_parallel, opts.repeat)
    if opts.child == "agent":
        return _agent_child(root, opts.port)
    if opts.child == "http":
        return _http_child(opts.port)
    wanted = {part.strip() for part in opts.only.split(",") if part.strip()}
    unknown = wanted - {"tls", "dispatcher", "agent", "http"}
    if unknown:
        parser.error("--only takes tls, dispatcher, agent, http; got %s" % ", ".join(sorted(unknown)))
    tool = common.pick_loadgen(parser, opts.loadgen) if "http" in wanted else ""
    common.raise_fd_limit()
    result = {"load_avg_before": common.load_average(), "machine": common.machine_info()}
    fleet = fleet_mod.BenchFleet(root, opts.hosts).build()
    if "tls" in wanted:
        result["tls"] = measure_tls(fleet)
    if "dispatcher" in wanted:
        fleet.write_conf()
        fleet.start()
        try:
            result["dispatcher"] = measure_dispatcher(fleet, opts.hosts, max_parallel=max_parallel,
                                                      repeat=opts.repeat)
        finally:
            fleet.stop()
    if "agent" in wanted:
        result["agent"] = measure_agent(fleet, opts.requests)
    if "http" in wanted:
        result["http"] = measure_http(duration_s=opts.duration, tool=tool)
    result["load_avg_after"] = common.load_average()
    common.report(result, as_json=opts.json, printer=_print)
    return 0


if __name__ == "__main__":
    sys.exit(main())
