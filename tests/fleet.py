"""Test support: a throwaway control host and real agent processes.

Everything here uses the real pieces: certificates from ``pki.py``, the
registry of ``store.py``, and ``ctrlexec_agent.py serve`` as a subprocess on
a 127.0.0.x loopback address.  Nothing binds a non-loopback address.

This is the one home of the suite's shared helpers: ``Fleet`` (the only fleet
builder), ``free_address`` / ``free_port``, ``wait_for`` (the only poll loop),
and the child-process pieces ``stop_process`` / ``read_log`` / ``wait_logged``
that ``AgentHandle``, ``apitest_support.ApiServer`` and
``reliability_support.PairingProc`` share.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import config  # noqa: E402
import ctrlexec_agent as wire  # noqa: E402
import pki  # noqa: E402
import store  # noqa: E402

AGENT = os.path.join(ROOT, "ctrlexec_agent.py")
START_TIMEOUT_S = 20.0


def free_address() -> tuple:
    """Pick a random 127.0.0.x address and a port that is free on it."""
    for _ in range(50):
        address = "127.0.%d.%d" % (random.randint(0, 254), random.randint(2, 254))
        sock = socket.socket()
        try:
            sock.bind((address, 0))
            return address, sock.getsockname()[1]
        except OSError:
            continue
        finally:
            sock.close()
    raise RuntimeError("no free loopback address found")


def free_port(address: str = "127.0.0.1") -> int:
    """A port that is free on ``address`` right now."""
    sock = socket.socket()
    try:
        sock.bind((address, 0))
        return sock.getsockname()[1]
    finally:
        sock.close()


def wait_for(predicate, what: str, timeout_s: float = 30.0, step_s: float = 0.05, *,
             detail=None):
    """Poll predicate() until it returns a true value (returned) or fail after timeout_s.

    Raises AssertionError naming ``what``; ``detail()``, when given, is called only then
    and its text (a log tail, a process's stderr) is appended to the message.
    """
    end = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= end:
            message = "timed out after %.0fs waiting for %s" % (timeout_s, what)
            if detail is not None:
                message += ":\n%s" % (detail(),)
            raise AssertionError(message)
        time.sleep(step_s)


def read_log(path: str) -> str:
    """The text of a child's log file ("" until it exists)."""
    try:
        with open(path, "rb") as handle:
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


def wait_logged(proc: subprocess.Popen, log_path: str, marker: bytes, what: str, *,
                offset: int = 0, timeout_s: float = START_TIMEOUT_S, step_s: float = 0.05) -> None:
    """Wait until ``marker`` is in log_path past ``offset`` (what this process wrote).

    Raises AssertionError with the log if ``proc`` exits first or timeout_s passes.
    """
    def logged() -> bool:
        if proc.poll() is not None:
            raise AssertionError("%s exited %s:\n%s" % (what, proc.returncode, read_log(log_path)))
        with open(log_path, "rb") as handle:
            handle.seek(offset)
            return marker in handle.read()

    wait_for(logged, "%s to start" % what, timeout_s, step_s, detail=lambda: read_log(log_path))


def stop_process(proc: subprocess.Popen | None, timeout_s: float) -> int | None:
    """SIGTERM, wait up to timeout_s, then SIGKILL; returns the exit code (None: no process)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def write_executable(path: str, body: str) -> str:
    with open(path, "w") as handle:
        handle.write(body)
    os.chmod(path, 0o755)
    return path


class AgentHandle:
    """One enrolled agent: its folder, config, scripts and process."""

    def __init__(self, name: str, folder: str, address: str, port: int) -> None:
        self.name = name
        self.dir = folder
        self.address = address
        self.port = port
        self.conf_path = os.path.join(folder, "agent.conf")
        self.allowlist_path = os.path.join(folder, "scripts.conf")
        self.scripts_dir = os.path.join(folder, "scripts")
        self.log_path = os.path.join(folder, "agent.log")
        self.proc: subprocess.Popen | None = None
        os.makedirs(self.scripts_dir, exist_ok=True)

    def write_script(self, name: str, body: str, *, allow: bool = True) -> str:
        """Write an executable script and (by default) allowlist it under ``name``."""
        path = write_executable(os.path.join(self.scripts_dir, name), body)
        if allow:
            self.allow(name, path)
        return path

    def allow(self, name: str, path: str) -> None:
        with open(self.allowlist_path, "a") as handle:
            handle.write("%s = %s\n" % (name, path))

    def set_conf(self, **keys) -> None:
        """Add/replace top-level agent.conf keys (kept above the [tags] section)."""
        with open(self.conf_path) as handle:
            lines = handle.read().splitlines()
        split = lines.index("[tags]") if "[tags]" in lines else len(lines)
        head = [l for l in lines[:split] if l.split("=")[0].strip() not in keys]
        head += ["%s = %s" % (k, v) for k, v in keys.items()]
        with open(self.conf_path, "w") as handle:
            handle.write("\n".join(head + lines[split:]) + "\n")

    def start(self, wait: bool = True) -> None:
        env = dict(os.environ, CTRL_EXEC_LOG="stderr")
        log = open(self.log_path, "ab")
        self._log_offset = os.path.getsize(self.log_path)
        self.proc = subprocess.Popen([sys.executable, AGENT, "serve", "--config", self.conf_path],
                                     stdout=log, stderr=log, env=env, cwd=self.dir)
        log.close()
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Wait for the agent's start line (no probe connection: that would count as a TLS failure)."""
        wait_logged(self.proc, self.log_path, b"ACTION=start ", "agent %s" % self.name,
                    offset=self._log_offset, step_s=0.02)

    def log(self) -> str:
        return read_log(self.log_path)

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def sighup(self) -> None:
        self.signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)      # a SIGSTOPped agent cannot act on SIGTERM
        stop_process(self.proc, 15)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


class Fleet:
    """A control host in ``root/ctrl`` plus agents under ``root/agents``."""

    def __init__(self, root: str, **conf) -> None:
        self.root = root
        self.ctrl_dir = os.path.join(root, "ctrl")
        os.makedirs(self.ctrl_dir, exist_ok=True)
        self.conf_path = os.path.join(self.ctrl_dir, "ctrl-exec.conf")
        self.conf = {"ca_dir": "pki", "state_dir": "state", "dispatcher_id": "test-dispatcher",
                     "api_auth_default": "allow", "read_timeout": "30"}
        self.conf.update(conf)
        self._write_conf()
        cfg = self.cfg
        pki.create_ca(cfg.ca_dir)
        pki.create_dispatcher_cert(cfg.ca_dir, cfg.cert, cfg.key)
        self.agents: dict = {}

    @classmethod
    def with_agents(cls, root: str, names: list, *, scripts: dict | None = None,
                    agent_conf: dict | None = None, **conf) -> "Fleet":
        """A fleet plus one started agent per name, each with the same scripts.

        If one agent fails to start, those already running are stopped before the error.
        """
        fleet = cls(root, **conf)
        try:
            for name in names:
                fleet.add_agent(name, scripts=scripts, conf_extra=agent_conf)
        except BaseException:
            fleet.stop_all()
            raise
        return fleet

    @property
    def cfg(self):
        return config.load(self.conf_path)

    @property
    def registry(self):
        return store.Registry(self.cfg.state_dir)

    def set_conf(self, **keys) -> None:
        """Change ctrl-exec.conf keys (value None removes a key)."""
        for key, value in keys.items():
            if value is None:
                self.conf.pop(key, None)
            else:
                self.conf[key] = str(value)
        self._write_conf()

    def _write_conf(self) -> None:
        with open(self.conf_path, "w") as handle:
            handle.write("".join("%s = %s\n" % item for item in self.conf.items()))

    def add_agent(self, name: str, *, scripts: dict | None = None, tags: dict | None = None,
                  conf_extra: dict | None = None, start: bool = True) -> AgentHandle:
        """Enroll ``name`` with pki.enroll, write its scripts and start it."""
        address, port = free_address()
        folder = os.path.join(self.root, "agents", name)
        pki.enroll(self.cfg, self.registry, name, address=address, port=port, tags=tags or {},
                   out_dir=folder)
        agent = AgentHandle(name, folder, address, port)
        agent.set_conf(**dict({"hostname": name}, **(conf_extra or {})))
        for script, body in (scripts or {}).items():
            agent.write_script(script, body)
        self.agents[name] = agent
        if start:
            agent.start()
        return agent

    def stop_all(self) -> None:
        for agent in self.agents.values():
            try:
                agent.stop()
            except Exception as exc:  # keep stopping the others
                print("stopping %s failed: %s" % (agent.name, exc))

    def client_context(self) -> ssl.SSLContext:
        cfg = self.cfg
        return wire.client_context(cfg.cert, cfg.key, cfg.ca)

    def request(self, agent: AgentHandle, method: str, path: str, body: dict | None = None, *,
                ctx: ssl.SSLContext | None = None, timeout: float = 30.0,
                source: str = "127.0.0.1") -> tuple:
        """One wire exchange with ``agent`` as the dispatcher; returns (status, headers, json)."""
        raw = socket.create_connection((agent.address, agent.port), timeout=timeout,
                                       source_address=(source, 0))
        try:
            tls = (ctx or self.client_context()).wrap_socket(raw)
            tls.sendall(wire.encode_request(method, path, body))
            status, headers, data = wire.read_response(wire.SocketReader(tls, time.monotonic() + timeout))
        finally:
            raw.close()
        if headers.get("content-type", "").startswith("application/x-ndjson"):
            return status, headers, [json.loads(line) for line in data.splitlines() if line.strip()]
        return status, headers, json.loads(data.decode("utf-8")) if data else None
