"""A throwaway demo fleet for newcomers: one control host and two local agents.

Owns: building a self-contained control host in one folder (ctrl-exec.conf, CA,
dispatcher certificate, registry), enrolling two agents on loopback addresses
(127.0.0.2 and 127.0.0.3 by default) with tags and four example scripts, starting
and stopping those agent processes, and the curl commands to try against the
API. ``python demo.py`` (also reached as ``python ctrlexec_api.py --demo``)
prepares the fleet, starts its agents, runs ``ctrlexec_api.py --config
DemoFleet.conf_path`` as a child process until SIGINT/SIGTERM, then stops them all.

Never does: bind a non-loopback address, wipe a folder that it did not create
(the ``.ctrl-exec-demo`` marker must be there), start the API, or gevent
patching. Auth in the demo is ``api_auth_default = allow``: it is for a laptop,
never for a real fleet.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_AGENTS",
    "DEFAULT_STATE_ROOT",
    "DemoAgent",
    "DemoError",
    "DemoFleet",
    "MARKER_NAME",
    "prepare_demo",
    "main",
]

import atexit
import errno
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Optional, Sequence

import config
import ctrlexec_agent as wire
import pki
import store

# --- constants -----------------------------------------------------------------

DEFAULT_STATE_ROOT = "./demo-state"
#: A folder is only ever wiped when this file is in it (we wrote it ourselves).
MARKER_NAME = ".ctrl-exec-demo"
DISPATCHER_ID = "demo"
#: (name, address, port, tags) of the demo agents, in order.
DEFAULT_AGENTS = (
    ("demo-1", "127.0.0.2", wire.AGENT_PORT, {"env": "demo", "role": "web"}),
    ("demo-2", "127.0.0.3", wire.AGENT_PORT, {"env": "demo", "role": "db"}),
)
AGENT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ctrlexec_agent.py")
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
API_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ctrlexec_api.py")
#: How long the API child gets to stop gracefully after the signal is passed on to it.
API_STOP_TIMEOUT_S = 40.0
KILL_WAIT_S = 5.0
POLL_INTERVAL_S = 0.05
#: The agent's log line that says it is listening (wire.log_action("info", "start", ...)).
START_LINE = b"ACTION=start "

_MARKER_TEXT = ("This folder is a ctrl-exec demo fleet made by demo.prepare_demo().\n"
                "It is wiped and recreated on every 'python ctrlexec_api.py --demo'.\n")

# --- exceptions ----------------------------------------------------------------


class DemoError(Exception):
    """The demo cannot be prepared, started or stopped; str() is one line for the user."""


# --- public API ------------------------------------------------------------------


class DemoAgent:
    """One demo agent: its folder, config, tags, scripts, log file and process.

    Attributes: name, address, port, tags {str: str}, dir, conf_path,
    allowlist_path, scripts_dir, log_path, scripts {name: path}, proc (Popen | None).
    """

    def __init__(self, name: str, address: str, port: int, tags: dict, folder: str,
                 log_path: str) -> None:
        self.name = name
        self.address = address
        self.port = port
        self.tags = dict(tags)
        self.dir = folder
        self.conf_path = os.path.join(folder, "agent.conf")
        self.allowlist_path = os.path.join(folder, "scripts.conf")
        self.scripts_dir = os.path.join(folder, "scripts")
        self.log_path = log_path
        self.scripts: dict = {}
        self.proc: Optional[subprocess.Popen] = None

    @property
    def running(self) -> bool:
        """True while the agent process is alive."""
        return self.proc is not None and self.proc.poll() is None


class DemoFleet:
    """A prepared demo control host plus its two agents.

    Methods for the caller: start(), stop(), curl_lines(), intro(); also a
    context manager (start on enter, stop on exit).
    Attributes: root, conf_path, api_port, api_url, agents {name: DemoAgent}.
    """

    def __init__(self, root: str, conf_path: str, api_port: int, agents: dict) -> None:
        self.root = root
        self.conf_path = conf_path
        self.api_port = api_port
        self.api_url = "http://127.0.0.1:%d" % api_port
        self.agents = agents
        self._atexit_registered = False

    def __enter__(self) -> "DemoFleet":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self, *, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start every agent (``ctrlexec_agent.py serve``) and wait for its start line.

        Each agent logs to stderr (CTRL_EXEC_LOG=stderr), redirected with its
        stdout to ``agent.log_path``. If one agent fails, the ones already
        started are stopped again.
        Raises: DemoError naming the agent, its exit status or the timeout, and its log file.
        """
        if not self._atexit_registered:
            # Safety net: agents must not outlive the process that started them.
            atexit.register(self.stop)
            self._atexit_registered = True
        try:
            for agent in self.agents.values():
                if not agent.running:
                    _start_agent(agent, timeout_s)
        except DemoError:
            self.stop()
            raise

    def stop(self, *, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop every agent: SIGTERM, wait up to ``timeout_s``, then SIGKILL. Idempotent."""
        for agent in self.agents.values():
            _stop_agent(agent, timeout_s)

    def curl_lines(self) -> list:
        """Return the curl commands to try against the demo API, one shell command each.

        Covers /health, /discovery, /ping, /run (hello on both agents, a failing
        script, a streamed run with curl -N), an async run plus /status, the live
        OpenAPI spec and /docs.
        """
        url = self.api_url
        hosts = list(self.agents)
        both = '"hosts":[%s]' % ",".join('"%s"' % name for name in hosts)
        post = "curl -s -X POST %s/%%s -H 'Content-Type: application/json' -d '%%s'" % url
        reqid_of = ("python3 -c 'import json,sys; print(json.load(sys.stdin)[\"reqid\"])'")
        return [
            "curl -s %s/health" % url,
            "curl -s %s/discovery" % url,
            post % ("ping", "{%s}" % both),
            post % ("run", '{%s,"script":"hello","args":["world"]}' % both),
            post % ("run", '{%s,"script":"fail"}' % both),
            "curl -N -s -X POST %s/run -H 'Content-Type: application/json' -d '{%s,"
            '"script":"sleep","args":["3"],"stream":true}\'' % (url, both),
            "REQID=$(%s | %s) && curl -s %s/status/$REQID && sleep 6 && curl -s %s/status/$REQID"
            % (post % ("run", '{%s,"script":"sleep","args":["4"],"async":true}' % both),
               reqid_of, url, url),
            "curl -s %s/openapi-live.json" % url,
            "curl -s %s/docs   # or open it in a browser" % url,
        ]

    def intro(self) -> str:
        """Return a short multi-line text for the terminal: agents, files and curl commands."""
        lines = ["ctrl-exec demo fleet in %s (config %s)" % (self.root, self.conf_path)]
        for agent in self.agents.values():
            tags = ",".join("%s=%s" % item for item in sorted(agent.tags.items()))
            lines.append("  agent %-8s %s:%d  tags %s  scripts %s  log %s"
                         % (agent.name, agent.address, agent.port, tags,
                            ",".join(sorted(agent.scripts)), agent.log_path))
        lines.append("WARNING: the demo API has NO AUTHENTICATION (api_auth_default = allow); "
                     "it listens on 127.0.0.1 only. Never use this configuration on a network.")
        lines.append("API %s. Try:" % self.api_url)
        lines.extend("  " + line for line in self.curl_lines())
        lines.append("Stop with Ctrl-C; the next --demo wipes and recreates %s." % self.root)
        return "\n".join(lines)


def prepare_demo(state_root: str = DEFAULT_STATE_ROOT, *, api_port: int = wire.API_PORT,
                 agent_addresses: Optional[Sequence] = None) -> DemoFleet:
    """(Re)create a throwaway control host with two enrolled agents in ``state_root``.

    Writes ``ctrl-exec.conf`` (ca_dir pki, state_dir state, dispatcher_id demo,
    api_auth_default allow, api_bind 127.0.0.1, api_port), the CA and dispatcher
    certificate, and one folder per agent under ``agents/`` with its bundle, tags
    and the scripts hello, disk-usage, sleep and fail (allowlisted). Nothing is started.
    Args: state_root (created, or wiped only if it holds the MARKER_NAME file);
    api_port; agent_addresses [(address, port), (address, port)] for demo-1 and
    demo-2 (loopback only; default 127.0.0.2:7443 and 127.0.0.3:7443).
    Returns: DemoFleet (call .start()).
    Raises: DemoError (one line) when openssl is missing, an address is not
    loopback or a port is in use, or the folder is not writable or not a demo folder.
    """
    _check_openssl()
    plan = _agent_plan(agent_addresses)
    _check_api_port(api_port)
    for name, address, port, _tags in plan:
        _check_port_free(address, port, what="agent")
    _check_port_free("127.0.0.1", api_port, what="API")
    root = os.path.abspath(state_root)
    _reset_root(root)
    try:
        return _build(root, api_port, plan)
    except (pki.PKIError, config.ConfigError, store.StoreError, OSError) as exc:
        raise DemoError("cannot prepare the demo in %s: %s" % (root, _one_line(exc))) from None


def main(argv: Optional[Sequence] = None) -> int:
    """Entry point: ``python demo.py``; returns the exit code (the API's, or 2).

    Prepares ./demo-state, starts the agents, prints the intro, then runs the API as a
    child process. SIGINT and SIGTERM are passed on to the API once (the API child has
    its own process group, so a terminal's Ctrl-C reaches it only through here), and the
    agents are stopped however the API ends.
    """
    if argv:
        sys.stderr.write("demo.py takes no arguments (got %s); it always uses %s\n"
                         % (" ".join(argv), DEFAULT_STATE_ROOT))
        return 2
    try:
        fleet = prepare_demo()
    except DemoError as exc:
        return _refuse(str(exc))
    try:
        fleet.start()
        sys.stdout.write(fleet.intro() + "\n")
        sys.stdout.flush()
        return _serve_api(fleet)
    except DemoError as exc:
        return _refuse(str(exc))
    finally:
        fleet.stop()


# --- private ---------------------------------------------------------------------

#: Example scripts: (allowlist name, file name, body); "{name}" becomes the agent's name.
_SCRIPTS = (
    ("hello", "hello.sh", """#!/bin/sh
# Demo: greet, then show the arguments exactly as received (argv, never a shell string).
echo "hello from {name} (host $(uname -n))"
if [ "$#" -gt 0 ]; then
    echo "args: $*"
fi
exit 0
"""),
    ("disk-usage", "disk-usage.sh", """#!/bin/sh
# Demo: disk usage of the root file system.
exec df -h /
"""),
    ("sleep", "sleep.sh", """#!/bin/sh
# Demo: sleep $1 seconds (default 2), one progress line per second: try it with "stream": true.
n="${{1:-2}}"
case "$n" in
    ''|*[!0-9]*) echo "usage: sleep [SECONDS] (a whole number)" >&2; exit 2 ;;
esac
if [ "$n" -gt 600 ]; then
    echo "sleep: at most 600 seconds in the demo" >&2
    exit 2
fi
i=1
while [ "$i" -le "$n" ]; do
    sleep 1
    echo "{name}: $i/$n seconds"
    i=$((i + 1))
done
echo "{name}: done after $n seconds"
"""),
    ("fail", "fail.sh", """#!/bin/sh
# Demo: a script that fails - output on stderr, exit status 3.
echo "{name}: about to fail"
echo "{name}: something went wrong (this script always fails)" >&2
exit 3
"""),
)

_CONF_TEXT = """# ctrl-exec demo control host - written by demo.prepare_demo(); wiped on the next --demo.
# Relative paths are relative to this file's folder.
ca_dir = pki
state_dir = state
dispatcher_id = {dispatcher_id}
# Demo only: with no auth hook every API request is allowed. Never use this on a real fleet.
api_auth_default = allow
api_bind = 127.0.0.1
api_port = {api_port}
read_timeout = 30
"""


def _agent_plan(agent_addresses: Optional[Sequence]) -> list:
    """Return [(name, address, port, tags)] after checking addresses are distinct loopback ones."""
    if agent_addresses is None:
        return [tuple(item) for item in DEFAULT_AGENTS]
    pairs = list(agent_addresses)
    if len(pairs) != len(DEFAULT_AGENTS):
        raise DemoError("agent_addresses must list %d (address, port) pairs, got %d"
                        % (len(DEFAULT_AGENTS), len(pairs)))
    plan = []
    for (name, _address, _port, tags), pair in zip(DEFAULT_AGENTS, pairs):
        try:
            address, port = pair
        except (TypeError, ValueError):
            raise DemoError("agent_addresses entries must be (address, port) pairs, got %r"
                            % (pair,)) from None
        plan.append((name, str(address), port, tags))
    seen = set()
    for name, address, port, _tags in plan:
        try:
            loopback = ipaddress.ip_address(address).is_loopback
        except ValueError:
            loopback = False
        # The demo has no auth: agents must never be reachable from another machine.
        if not loopback or ":" in address:
            raise DemoError("demo agent %s address %r is not accepted; only IPv4 loopback "
                            "addresses (127.x.y.z) are" % (name, address))
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise DemoError("demo agent %s port %r is not accepted; a number 1-65535 is"
                            % (name, port))
        if (address, port) in seen:
            raise DemoError("demo agents need distinct address:port pairs; %s:%d is used twice"
                            % (address, port))
        seen.add((address, port))
    return plan


def _check_openssl() -> None:
    """Agents need the openssl binary for pairing; say so up front (the demo enrols without it)."""
    if shutil.which("openssl") is None:
        raise DemoError("the openssl command was not found on PATH; install it "
                        "(e.g. apt-get install openssl) - agents need it for pairing")


def _check_api_port(api_port) -> None:
    """The API port must be a plain integer in range."""
    if not isinstance(api_port, int) or isinstance(api_port, bool) or not 1 <= api_port <= 65535:
        raise DemoError("api_port %r is not accepted; a number 1-65535 is" % (api_port,))


def _check_port_free(address: str, port: int, *, what: str) -> None:
    """Bind (SO_REUSEADDR, as the agent does) and release, so a live listener gives a clear error."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise DemoError("port %d on %s is in use - stop the other demo or %s first"
                            % (port, address, what)) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise DemoError("address %s is not available on this host; the demo needs the "
                            "loopback range 127.0.0.0/8 (on macOS: sudo ifconfig lo0 alias %s)"
                            % (address, address)) from None
        raise DemoError("cannot use %s:%d for the demo %s: %s"
                        % (address, port, what, exc.strerror or exc)) from None
    finally:
        sock.close()


def _reset_root(root: str) -> None:
    """Create ``root``, or empty it when it is one of ours (marker file); refuse anything else."""
    if os.path.lexists(root) and not os.path.isdir(root):
        raise DemoError("%s exists and is not a folder; pass a folder for the demo state" % root)
    if os.path.isdir(root):
        entries = os.listdir(root)
        if entries and MARKER_NAME not in entries:
            raise DemoError("%s is not empty and has no %s marker, so it is not a demo folder; "
                            "refusing to wipe it - pass a new or empty folder" % (root, MARKER_NAME))
        try:
            # Marker last: a wipe cut short can still be retried.
            for name in sorted(entries, key=lambda n: n == MARKER_NAME):
                path = os.path.join(root, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
        except OSError as exc:
            raise DemoError("cannot wipe the old demo in %s: %s; remove it by hand or pass "
                            "another folder" % (root, _one_line(exc))) from None
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
        with open(os.path.join(root, MARKER_NAME), "w") as handle:
            handle.write(_MARKER_TEXT)
    except OSError as exc:
        raise DemoError("demo state folder %s is not writable: %s; pass a writable folder"
                        % (root, exc.strerror or exc)) from None


def _build(root: str, api_port: int, plan: list) -> DemoFleet:
    """Write config, PKI, registry and agent folders; return the (stopped) fleet."""
    conf_path = os.path.join(root, "ctrl-exec.conf")
    wire.atomic_write(conf_path, _CONF_TEXT.format(dispatcher_id=DISPATCHER_ID,
                                                   api_port=api_port).encode(), 0o644)
    cfg = config.load(conf_path)
    pki.create_ca(cfg.ca_dir)
    pki.create_dispatcher_cert(cfg.ca_dir, cfg.cert, cfg.key)
    registry = store.Registry(cfg.state_dir)
    logs_dir = os.path.join(root, "logs")
    os.makedirs(logs_dir, mode=0o755, exist_ok=True)
    agents = {}
    for name, address, port, tags in plan:
        folder = os.path.join(root, "agents", name)
        pki.enroll(cfg, registry, name, address=address, port=port, tags=tags, out_dir=folder)
        agent = DemoAgent(name, address, port, tags, folder, os.path.join(logs_dir, name + ".log"))
        os.makedirs(agent.scripts_dir, mode=0o755, exist_ok=True)
        # The allowlist may only point inside scripts/ (checked again with realpath at run time).
        _set_agent_keys(agent.conf_path, {"hostname": name,
                                          "script_dirs": os.path.realpath(agent.scripts_dir)})
        _write_scripts(agent)
        agents[name] = agent
    return DemoFleet(root, conf_path, api_port, agents)


def _set_agent_keys(conf_path: str, keys: dict) -> None:
    """Add top-level keys to an enrolment agent.conf, above its first [section]."""
    with open(conf_path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    split = next((i for i, line in enumerate(lines) if line.strip().startswith("[")), len(lines))
    head = [line for line in lines[:split]
            if line.split("=", 1)[0].strip() not in keys]
    while head and not head[-1].strip():
        head.pop()
    head += ["%s = %s" % item for item in keys.items()]
    if split < len(lines):
        head.append("")
    text = "\n".join(head + lines[split:]) + "\n"
    wire.atomic_write(conf_path, text.encode("utf-8"), 0o644)


def _write_scripts(agent: DemoAgent) -> None:
    """Write the example scripts (0755) and their allowlist entries."""
    entries = []
    for allow_name, file_name, body in _SCRIPTS:
        path = os.path.join(os.path.realpath(agent.scripts_dir), file_name)
        wire.atomic_write(path, body.format(name=agent.name).encode("utf-8"), 0o755)
        agent.scripts[allow_name] = path
        entries.append("%s = %s" % (allow_name, path))
    text = ("# ctrl-exec demo allowlist for %s: name = /absolute/path\n" % agent.name
            + "\n".join(entries) + "\n")
    wire.atomic_write(agent.allowlist_path, text.encode("utf-8"), 0o644)


def _start_agent(agent: DemoAgent, timeout_s: float) -> None:
    """Start one agent process and wait until its log shows the start line."""
    env = dict(os.environ, CTRL_EXEC_LOG="stderr")
    try:
        log = open(agent.log_path, "ab")
    except OSError as exc:
        raise DemoError("cannot open the log file %s of agent %s: %s"
                        % (agent.log_path, agent.name, exc.strerror)) from None
    with log:
        offset = log.tell()
        try:
            agent.proc = subprocess.Popen(
                [sys.executable, AGENT_SCRIPT, "serve", "--config", agent.conf_path],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=agent.dir)
        except OSError as exc:
            raise DemoError("cannot start agent %s (%s %s): %s"
                            % (agent.name, sys.executable, AGENT_SCRIPT, exc.strerror)) from None
    deadline = time.monotonic() + timeout_s
    while True:
        if START_LINE in _read_from(agent.log_path, offset):
            return
        status = agent.proc.poll()
        if status is not None:
            agent.proc = None
            raise DemoError("agent %s exited with status %s before starting: %s (log %s)"
                            % (agent.name, status, _last_line(agent.log_path, offset),
                               agent.log_path))
        if time.monotonic() >= deadline:
            _stop_agent(agent, STOP_TIMEOUT_S)
            raise DemoError("agent %s did not start within %.0f s (log %s)"
                            % (agent.name, timeout_s, agent.log_path))
        time.sleep(POLL_INTERVAL_S)


def _stop_agent(agent: DemoAgent, timeout_s: float) -> None:
    """SIGTERM, wait, then SIGKILL; always reaps the process."""
    proc = agent.proc
    if proc is None:
        return
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            try:
                proc.wait(KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                raise DemoError("agent %s (pid %d) did not exit after SIGKILL"
                                % (agent.name, proc.pid)) from None
    agent.proc = None


def _read_from(path: str, offset: int) -> bytes:
    """The log file's bytes after ``offset`` (empty if unreadable)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read()
    except OSError:
        return b""


def _last_line(path: str, offset: int) -> str:
    """The last non-blank line written since ``offset``, for a one-line error."""
    lines = [line for line in _read_from(path, offset).decode("utf-8", "replace").splitlines()
             if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def _one_line(exc: BaseException) -> str:
    """An exception's text on one line."""
    return " ".join(str(exc).split()) or exc.__class__.__name__


def _serve_api(fleet: DemoFleet) -> int:
    """Run ``ctrlexec_api.py --config`` for the fleet until it exits; pass signals on."""
    try:
        api = subprocess.Popen([sys.executable, API_SCRIPT, "--config", fleet.conf_path],
                               process_group=0)
    except OSError as exc:
        raise DemoError("cannot start %s: %s" % (API_SCRIPT, _one_line(exc))) from None
    passed_on = []

    def pass_on(signum: int, _frame) -> None:
        if not passed_on:
            passed_on.append(signum)
            api.send_signal(signum)

    previous = {signum: signal.signal(signum, pass_on)
                for signum in (signal.SIGINT, signal.SIGTERM)}
    deadline = None
    try:
        while True:
            try:
                return api.wait(POLL_INTERVAL_S * 20)
            except subprocess.TimeoutExpired:
                if passed_on and deadline is None:
                    deadline = time.monotonic() + API_STOP_TIMEOUT_S
                if deadline is not None and time.monotonic() > deadline:
                    api.kill()
                    api.wait()
                    return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if api.poll() is None:
            api.kill()
            api.wait()


def _refuse(message: str) -> int:
    """Print one line and return 2 (the demo cannot start)."""
    sys.stderr.write("ctrl-exec demo: %s\n" % message)
    sys.stderr.flush()
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
