"""Benchmark fleet: N real ctrl-exec agents on loopback, several per process.

Owns: a throwaway control host (CA, dispatcher certificate, ctrl-exec.conf,
registry) under one folder, the enrolment of N agents with ``pki.enroll``,
and the agent host processes that serve them.  Each agent keeps its own
certificate, allowlist, trust map, TLS context and listening socket on its own
127.B.x.y address; one host process drives many of those listeners from one
selector and hands every accepted connection to the real request path of
``ctrlexec_agent.AgentServer`` (admission, thread, mTLS handshake, request
limits, allowlist, ``execve`` of the script, answer).  A thousand processes
would not fit a 2-core machine; a thousand listeners in a few processes do.

Never does: bind a non-loopback address, touch /etc or /var, import tests/,
or change product modules.  Everything lives under the fleet's root folder.

Usage:
    python bench/fleet.py build --root DIR --hosts N
    python bench/fleet.py serve --root DIR --hosts N [--procs P]   (until Ctrl-C)
"""

from __future__ import annotations

__all__ = [
    "BenchFleet", "FleetError", "SCRIPT_NAME", "SCRIPT_BODY", "AGENTS_PER_PROCESS", "AGENT_PORTS",
    "START_TIMEOUT_S", "main",
]

import argparse
import json
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time

from common import STOP_TIMEOUT_S, raise_fd_limit  # puts the repository root on sys.path

import config  # noqa: E402
import ctrlexec_agent as wire  # noqa: E402
import pki  # noqa: E402
import store  # noqa: E402

#: The allowlisted script every bench agent runs: trivial on purpose, so the
#: figures measure ctrl-exec, not the script.
SCRIPT_NAME = "bench-ok"
SCRIPT_BODY = "#!/bin/sh\necho ok\n"
#: Listeners one agent host process drives (4 processes for 1,000 agents).
AGENTS_PER_PROCESS = 250
#: Agent host start-up (1,000 TLS contexts loaded); stops use common.STOP_TIMEOUT_S.
START_TIMEOUT_S = 120.0
#: Agent ports are spread over this range (below the ephemeral ports).
AGENT_PORTS = (20000, 30000)
#: Agents per /24 of the 127.B.x.y plan (addresses .2 to .251).
_PER_SUBNET = 250
_LAYOUT_FILE = "fleet.json"
_READY = "READY"


class FleetError(Exception):
    """The bench fleet could not be built, started or stopped."""


class BenchFleet:
    """A throwaway control host plus N enrolled agents under ``root``.

    ``build()`` enrolls what is missing (an existing root is reused, so a sweep
    builds the 1,000 certificates once); ``start(procs)`` launches the agent
    host processes; ``stop()`` ends them.  ``conf_path`` is the control host's
    ctrl-exec.conf, ``names`` the registry names in enrolment order.
    """

    def __init__(self, root: str, hosts: int) -> None:
        if hosts < 1:
            raise FleetError("hosts must be at least 1, got %d" % hosts)
        self.root = os.path.abspath(root)
        self.hosts = hosts
        self.ctrl_dir = os.path.join(self.root, "ctrl")
        self.conf_path = os.path.join(self.ctrl_dir, "ctrl-exec.conf")
        self.script_path = os.path.join(self.root, "scripts", SCRIPT_NAME)
        self.layout: dict = {}
        self.procs: list = []

    @property
    def names(self) -> list:
        return [agent["name"] for agent in self.layout["agents"][:self.hosts]]

    @property
    def cfg(self):
        return config.load(self.conf_path)

    def build(self) -> "BenchFleet":
        """Create the control host and enroll agents 0..hosts-1 (reusing what exists)."""
        os.makedirs(self.ctrl_dir, exist_ok=True)
        layout_path = os.path.join(self.root, _LAYOUT_FILE)
        if os.path.exists(layout_path):
            with open(layout_path) as handle:
                self.layout = json.load(handle)
        else:
            # A /16 of loopback (127.B.x.y) per fleet; B is random so two fleets
            # (or other tests on 127.0.x.y) rarely share an address.
            self.layout = {"net": random.randint(100, 250), "agents": []}
            self.write_conf()
            cfg = self.cfg
            pki.create_ca(cfg.ca_dir)
            pki.create_dispatcher_cert(cfg.ca_dir, cfg.cert, cfg.key)
            os.makedirs(os.path.dirname(self.script_path), exist_ok=True)
            wire.atomic_write(self.script_path, SCRIPT_BODY.encode(), 0o755)
        cfg = self.cfg
        registry = store.Registry(cfg.state_dir)
        agents = self.layout["agents"]
        if len(agents) >= self.hosts:
            return self
        # pki.enroll logs one line per agent; keep 1,000 of them off the terminal.
        saved, sys.stderr = sys.stderr, open(os.path.join(self.root, "build.log"), "a")
        try:
            self._enroll(cfg, registry, agents)
        finally:
            sys.stderr.close()
            sys.stderr = saved
        return self

    def write_conf(self, **keys) -> None:
        """(Re)write ctrl-exec.conf: bench defaults plus ``keys`` (api_port, max_parallel, ...)."""
        conf = {"ca_dir": "pki", "state_dir": "state", "dispatcher_id": "bench-dispatcher",
                "api_auth_default": "allow", "api_bind": "127.0.0.1", "read_timeout": "60",
                "max_hosts": str(max(500, self.hosts))}
        conf.update({key: str(value) for key, value in keys.items()})
        os.makedirs(self.ctrl_dir, exist_ok=True)
        wire.atomic_write(self.conf_path, "".join("%s = %s\n" % kv for kv in conf.items()).encode(),
                          0o644)

    def start(self, procs: int | None = None) -> None:
        """Start the agent host processes and wait until every listener is bound.

        Raises:
            FleetError: a host process exited or did not report ready in time.
        """
        count = self.hosts
        procs = procs or max(1, -(-count // AGENTS_PER_PROCESS))
        procs = min(procs, count)
        env = dict(os.environ, CTRL_EXEC_LOG="stderr")
        bounds = [(count * i // procs, count * (i + 1) // procs) for i in range(procs)]
        try:
            for number, (first, end) in enumerate(bounds):
                log = open(os.path.join(self.root, "agent-host-%d.log" % number), "ab")
                proc = subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), "host", "--root", self.root,
                     "--first", str(first), "--count", str(end - first)],
                    stdout=subprocess.PIPE, stderr=log, env=env, cwd=self.root)
                log.close()
                self.procs.append(proc)
            for proc in self.procs:
                self._wait_ready(proc)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM every host process; SIGKILL what is still there after STOP_TIMEOUT_S."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        end = time.monotonic() + STOP_TIMEOUT_S
        for proc in self.procs:
            try:
                proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            if proc.stdout is not None:
                proc.stdout.close()
        self.procs = []

    def host_pids(self) -> list:
        return [proc.pid for proc in self.procs]

    # --- private ---

    def _enroll(self, cfg, registry, agents: list) -> None:
        """Enroll agents len(agents)..hosts-1 and allowlist the bench script on each."""
        for index in range(len(agents), self.hosts):
            name = "bench-%04d" % index
            address = "127.%d.%d.%d" % (self.layout["net"], index // _PER_SUBNET,
                                        index % _PER_SUBNET + 2)
            folder = os.path.join(self.root, "agents", name)
            port = _pick_port(address, index + self.layout["net"])
            pki.enroll(cfg, registry, name, address=address, port=port, out_dir=folder)
            with open(os.path.join(folder, "scripts.conf"), "a") as handle:
                handle.write("%s = %s\n" % (SCRIPT_NAME, self.script_path))
            with open(os.path.join(folder, "agent.conf"), "r+") as handle:
                text = handle.read()
                # hostname: no getfqdn() per agent; the rest is the enrolment bundle as written.
                handle.seek(0)
                handle.write(text.replace("[tags]", "hostname = %s\n\n[tags]" % name, 1))
            agents.append({"name": name, "address": address, "port": port, "dir": folder})
            if len(agents) % 100 == 0 or len(agents) == self.hosts:
                self._save_layout()

    def _save_layout(self) -> None:
        wire.atomic_write(os.path.join(self.root, _LAYOUT_FILE),
                          json.dumps(self.layout, indent=1).encode(), 0o644)

    def _wait_ready(self, proc: subprocess.Popen) -> None:
        """Read the host's READY line (stdout) within START_TIMEOUT_S."""
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        end = time.monotonic() + START_TIMEOUT_S
        try:
            while time.monotonic() < end:
                if sel.select(max(0.0, end - time.monotonic())):
                    line = proc.stdout.readline().decode("utf-8", "replace")
                    if line.startswith(_READY):
                        return
                    if not line:
                        raise FleetError("agent host %d exited %s before it was ready; see %s"
                                         % (proc.pid, proc.wait(5), self.root))
        finally:
            sel.close()
        raise FleetError("agent host %d not ready after %ds" % (proc.pid, START_TIMEOUT_S))


# --- private ---


def _pick_port(address: str, seed: int) -> int:
    """A port in AGENT_PORTS that is free on ``address`` now (the agent binds it later).

    The range sits below Linux's ephemeral ports (32768+), so a fleet that is
    reused later does not find its ports taken by some outgoing connection.
    """
    low, high = AGENT_PORTS
    for step in range(high - low):
        port = low + (seed * 7919 + step) % (high - low)
        sock = socket.socket()
        try:
            sock.bind((address, port))
            return port
        except OSError:
            continue
        finally:
            sock.close()
    raise FleetError("no free port in %d-%d on %s" % (low, high, address))


def _host_main(root: str, first: int, count: int) -> int:
    """Agent host process: serve agents first..first+count-1 until SIGTERM."""
    raise_fd_limit()
    wire.setup_logging("ctrl-exec-agent")
    with open(os.path.join(root, _LAYOUT_FILE)) as handle:
        agents = json.load(handle)["agents"][first:first + count]
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    sel = selectors.DefaultSelector()
    servers = []
    for agent in agents:
        cfg = wire.load_agent_config(os.path.join(agent["dir"], "agent.conf"))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((cfg.bind, cfg.port))
        sock.listen(128)
        sock.setblocking(False)
        server = wire.AgentServer(cfg, listen_socket=sock)
        servers.append(server)
        sel.register(sock, selectors.EVENT_READ, server)
    wire.log_action("info", "bench-host-start", AGENTS=len(servers), FIRST=first)
    sys.stdout.write("%s %d\n" % (_READY, len(servers)))
    sys.stdout.flush()
    try:
        while not stopping.is_set():
            for key, _ in sel.select(0.2):
                _accept_all(key.fileobj, key.data)
    finally:
        sel.close()
        for server in servers:
            server.listener.close()
        end = time.monotonic() + STOP_TIMEOUT_S / 2
        for server in servers:
            server._drain(max(0.0, end - time.monotonic()))
        wire.log_action("info", "bench-host-stop", AGENTS=len(servers))
    return 0


def _accept_all(listener: socket.socket, server) -> None:
    """Accept every pending connection and hand each to the agent's real admission path.

    ``admit_connection`` is the same call ``AgentServer.serve_forever`` makes per
    connection (allowed_ips, rate limit, max_children, handler thread).
    """
    while True:
        try:
            conn, addr = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            wire.log_action("err", "accept-error", ERROR=exc.strerror)
            return
        server.admit_connection(conn, addr[0])


def main(argv: list | None = None) -> int:
    """``fleet.py build|serve|host`` (host is the agent host process itself)."""
    parser = argparse.ArgumentParser(prog="bench/fleet.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("build", "serve", "host"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--root", required=True, help="fleet folder (created or reused)")
        if name == "host":
            cmd.add_argument("--first", type=int, required=True)
            cmd.add_argument("--count", type=int, required=True)
        else:
            cmd.add_argument("--hosts", type=int, required=True)
        if name == "serve":
            cmd.add_argument("--procs", type=int, default=0)
    opts = parser.parse_args(argv)
    if opts.command == "host":
        return _host_main(opts.root, opts.first, opts.count)
    fleet = BenchFleet(opts.root, opts.hosts).build()
    print("fleet of %d agents in %s; control host config %s"
          % (opts.hosts, fleet.root, fleet.conf_path))
    if opts.command == "serve":
        raise_fd_limit()
        fleet.start(opts.procs or None)
        print("serving (pids %s); Ctrl-C stops" % fleet.host_pids(), flush=True)
        try:
            while all(proc.poll() is None for proc in fleet.procs):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            fleet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
