"""ctrl-exec pairing: the interactive pairing service of reference §4.2 (port 7444).

Owns: the pairing listener (``PairingServer``, TLS server-auth only, one thread
per connection, bounded), the pairing queue under ``<state_dir>/pairing/``
(``<reqid>.json`` pending, ``.approved`` / ``.denied`` decisions), the operator
verbs on it (list, approve, deny, expiry) and the foreground session behind
``ctrlexec.py pairing-mode``.

Never does: make or sign certificates itself (``pki.py`` checks and signs the
CSR), write ``agents/`` directly (``store.Registry``), use an unvalidated
hostname or reqid as a file name, queue a CSR that failed ``pki.check_csr``,
or log a CSR, a nonce or key material.  Writes go through ``wire.atomic_write``
and the per-IP limit is the agent's ``wire.RateLimiter``: one of each.
"""
from __future__ import annotations

__all__ = [
    "PairingError",
    "PAIRING_STALE_S", "PAIRING_IO_TIMEOUT_S", "PAIRING_MAX_TIMEOUT_S",
    "pairing_code", "PairingServer", "list_requests", "approve", "deny",
    "expire_stale_requests", "run_pairing_mode",
]

import ipaddress
import json
import os
import re
import select
import signal
import socket
import ssl
import sys
import threading
import time

import audit
import ctrlexec_agent as wire
import lifecycle
import pki
import store

# --- constants ---------------------------------------------------------------

PAIRING_STALE_S = 600               #: a queued request older than this is expired
PAIRING_POLL_S = 0.5                #: how often a waiting connection looks for a decision
PAIRING_IO_TIMEOUT_S = 30.0         #: socket deadline while reading a pairing request
PAIRING_MAX_CONNECTIONS = 32        #: live pairing connections (queue cap is separate)
PAIRING_MAX_TIMEOUT_S = 600
QUEUE_MODE = 0o600
PAIRING_REQID_RE = re.compile(r"^[a-f0-9]{16}$")


class PairingError(Exception):
    """Any pairing failure, pki's errors while approving included; str() says what is accepted."""


# --- pairing service -------------------------------------------------------------

def pairing_code(csr_pem) -> str:
    """Return the 6-digit pairing code of a CSR PEM text (reference §4.2 step 5).

    Thin alias of ``wire.pairing_code`` (the agent computes the same code), so
    both screens always agree.
    """
    if isinstance(csr_pem, str):
        csr_pem = csr_pem.encode("utf-8")
    return wire.pairing_code(csr_pem)


class PairingServer:
    """The pairing listener (reference §4.2 steps 7-14): TLS server-auth on :7444.

    One thread per connection (bounded by PAIRING_MAX_CONNECTIONS); works in
    plain threads and under gevent monkey-patching alike. Each connection gets
    a first response ``{"status":"pending","reqid"}`` and then, on the same
    connection, the operator's decision (or an approval timeout).

    Methods for the caller: start(), stop(), ``port`` (bound port, after start).
    on_request(info) is called for each queued request with
    {reqid, hostname, ip, source_ip, code, received} (no CSR, no nonce).
    """

    def __init__(self, cfg, registry=None, *, bind: str = "0.0.0.0",
                 port: int = wire.PAIRING_PORT, timeout: float | None = None,
                 on_request=None) -> None:
        self.cfg = cfg
        self.registry = registry
        self.bind = bind
        self.port = port
        if timeout is None:
            timeout = getattr(cfg, "pairing_timeout", PAIRING_MAX_TIMEOUT_S)
        self.timeout = float(timeout)
        self.on_request = on_request
        self._queue_dir = _pairing_dir(cfg)
        self._max_queue = int(getattr(cfg, "pairing_max_queue", 10))
        volume = _rate_limit_tuple(getattr(cfg, "pairing_rate_limit_volume", (10, 60, 300)))
        disabled = bool(getattr(cfg, "pairing_rate_limit_disable", False)) or volume[0] <= 0
        # The agent's limiter (reference §3.7: same engine on the pairing port),
        # with the volume rule only; a probe limit of 0 is off.
        self._limiter = wire.RateLimiter(volume, (0, 0, 0), disabled)
        self._stopping = threading.Event()
        self._queue_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(PAIRING_MAX_CONNECTIONS)
        self._threads = set()
        self._threads_lock = threading.Lock()
        self._listener = None
        self._accept_thread = None
        self._ctx = None

    def start(self) -> "PairingServer":
        """Build the TLS context, bind and start accepting; returns self.

        Raises: PairingError if the dispatcher cert/key are unusable, the queue folder
        cannot be created or the port cannot be bound.
        """
        try:
            self._ctx = wire.tls_server_context(self.cfg.cert, self.cfg.key)
        except (OSError, ssl.SSLError) as exc:
            raise PairingError(f"cannot load dispatcher cert/key ({self.cfg.cert}, {self.cfg.key}): "
                               f"{_short(exc)}; run setup-dispatcher first")
        try:
            os.makedirs(self._queue_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise PairingError(f"cannot create {self._queue_dir} ({exc.strerror}); "
                               "a writable state_dir is needed")
        expire_stale_requests(self.cfg)
        family = socket.AF_INET6 if ":" in self.bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.bind, int(self.port)))
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise PairingError(f"cannot listen on {self.bind}:{self.port} ({exc.strerror}); "
                               "a free port (default 7444) is needed")
        sock.settimeout(PAIRING_POLL_S / 2)
        self._listener = sock
        self.port = sock.getsockname()[1]
        self._accept_thread = threading.Thread(target=self._accept_loop, name="pairing-accept",
                                               daemon=True)
        self._accept_thread.start()
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting; waiting connections are answered "pairing mode stopped"."""
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_thread.join(grace_s)
        if self._listener is not None:
            self._listener.close()
        deadline = time.monotonic() + grace_s
        with self._threads_lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> "PairingServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        """Accept until stopped; one bad client never stops the loop."""
        while not self._stopping.is_set():
            try:
                conn, addr = self._listener.accept()
            except socket.timeout:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    return
                wire.log_action("warning", "pair-reject", reason="accept-failed", error=_short(exc))
                time.sleep(0.1)
                continue
            source_ip = addr[0]
            # Every pairing client is a stranger, so each connection counts at accept.
            if not self._limiter.allow_connection(source_ip) \
                    or self._limiter.count_untrusted(source_ip):
                wire.log_action("warning", "pair-reject", reason="rate-limited", ip=source_ip)
                conn.close()
                continue
            if not self._slots.acquire(blocking=False):
                wire.log_action("warning", "pair-reject", reason="too-many-connections", ip=source_ip)
                conn.close()
                continue
            thread = threading.Thread(target=self._serve_one, args=(conn, source_ip),
                                      name="pairing-conn", daemon=True)
            with self._threads_lock:
                self._threads.add(thread)
            thread.start()

    def _serve_one(self, conn: socket.socket, source_ip: str) -> None:
        """Handle one pairing connection end to end, then release its slot."""
        tls = None
        try:
            conn.settimeout(PAIRING_IO_TIMEOUT_S)
            # Handshake here, in the connection's own thread, never in accept().
            try:
                tls = self._ctx.wrap_socket(conn, server_side=True)
            except (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError):
                # Agents TCP-probe the port before pairing (reference §4.2 step 3).
                wire.log_action("info", "pair-probe", ip=source_ip)
                return
            self._pair_one(tls, source_ip)
        except (OSError, ssl.SSLError, ValueError) as exc:
            wire.log_action("warning", "pair-reject", reason="connection-error", ip=source_ip,
                            error=_short(exc))
        except Exception as exc:  # noqa: BLE001 - one client must never stop the listener
            wire.log_action("err", "pair-reject", reason="internal-error", ip=source_ip,
                            error=_short(exc))
        finally:
            for sock in (tls, conn):
                if sock is not None:
                    try:
                        sock.close()
                    except OSError:
                        pass
            with self._threads_lock:
                self._threads.discard(threading.current_thread())
            self._slots.release()

    def _pair_one(self, tls, source_ip: str) -> None:
        """Steps 7-14 of reference §4.2 on an established TLS connection."""
        reader = wire.SocketReader(tls, time.monotonic() + PAIRING_IO_TIMEOUT_S)
        try:
            request = wire.read_request(reader, max_body=wire.MAX_PAIRING_BODY_BYTES)
        except wire.ProtocolError as exc:
            reason = "request too large" if exc.status == 413 else "invalid request"
            wire.log_action("warning", "pair-reject", reason=reason.replace(" ", "-"),
                            ip=source_ip, error=exc.error)
            # Part of the request is still unread: drain it so closing does not
            # reset the connection before the client reads the refusal.
            self._refuse(tls, reason, drain=True)
            return
        fields, reason = _parse_pair_request(request, source_ip)
        if reason:
            self._refuse(tls, reason)
            return
        with self._queue_lock:
            expire_stale_requests(self.cfg)
            if len(_pending_ids(self._queue_dir)) >= self._max_queue:
                wire.log_action("warning", "pair-reject", reason="queue-full", ip=source_ip,
                                hostname=fields["hostname"])
                self._refuse(tls, "pairing queue full")
                return
            reqid = wire.new_reqid()
            fields["id"] = reqid
            _write_queue_file(_queue_path(self._queue_dir, reqid, ".json"), fields)
        wire.log_action("info", "pair-request", reqid=reqid, hostname=fields["hostname"],
                        ip=fields["ip"], source_ip=source_ip, code=fields["code"], status="pending")
        _send(tls, wire.encode_response(200, {"status": "pending", "reqid": reqid}))
        if self.on_request is not None:
            info = {k: fields[k] for k in ("hostname", "ip", "source_ip", "code", "received")}
            info["reqid"] = reqid
            try:
                self.on_request(info)
            except Exception as exc:  # noqa: BLE001 - a display problem must not drop the agent
                wire.log_action("warning", "pair-announce-failed", reqid=reqid, error=_short(exc))
        self._await_decision(tls, reqid)

    def _await_decision(self, tls, reqid: str) -> None:
        """Poll for <reqid>.approved/.denied; send it as the second response."""
        deadline = time.monotonic() + self.timeout
        paths = {ext: _queue_path(self._queue_dir, reqid, ext)
                 for ext in (".json", ".approved", ".denied")}
        while True:
            for ext in (".approved", ".denied"):
                decision = _read_json(paths[ext])
                if decision is not None:
                    try:
                        _send(tls, wire.encode_response(200, decision))
                    finally:
                        _unlink(paths[ext], paths[".json"])
                    return
            if not os.path.exists(paths[".json"]) and not any(
                    os.path.exists(paths[ext]) for ext in (".approved", ".denied")):
                break       # expired as stale, or removed by hand: nothing will decide it
            if self._stopping.is_set() or time.monotonic() >= deadline:
                break
            self._stopping.wait(min(PAIRING_POLL_S, max(0.0, deadline - time.monotonic())))
        reason = "pairing mode stopped" if self._stopping.is_set() else "approval timeout"
        _unlink(paths[".json"])
        wire.log_action("info", "pair-reject", reqid=reqid, reason=reason.replace(" ", "-"))
        _send(tls, wire.encode_response(200, {"status": "denied", "reason": reason}))

    def _refuse(self, tls, reason: str, *, drain: bool = False) -> None:
        """Answer a refusal as HTTP 200 {"status":"error","reason"} (the original's shape)."""
        try:
            _send(tls, wire.encode_response(200, {"status": "error", "reason": reason}))
            if drain:
                _drain(tls)
        except (OSError, ssl.SSLError):
            pass  # the peer went away; nothing more to tell it


def list_requests(cfg) -> list:
    """Return pending pairing requests, oldest first, after expiring stale ones.

    Returns: [{"id", "reqid", "hostname", "ip", "source_ip", "lookup_by", "port",
    "received", "code", "reverse_dns", "reverse_confirmed"}] — no CSR, no nonce.
    """
    folder = _pairing_dir(cfg)
    expire_stale_requests(cfg)
    rows = []
    for reqid in _pending_ids(folder):
        record = _read_json(_queue_path(folder, reqid, ".json"))
        if not isinstance(record, dict):
            continue
        row = {k: record.get(k, "") for k in _LISTED_FIELDS}
        row["id"] = row["reqid"] = reqid
        rows.append(row)
    rows.sort(key=lambda r: (str(r.get("received", "")), r["id"]))
    return rows


def approve(cfg, registry, reqid: str, *, lookup_by: str | None = None,
            ip: str | None = None, agent_port: int | None = None) -> dict:
    """Approve a queued request: sign its CSR (825 days) and register the agent.

    Effective lookup_by = argument > agent suggestion > "hostname"; port =
    agent_port > reported port > 7443; ip = argument > queued ip. Re-pairing a
    registered name keeps its tags.
    Writes <reqid>.approved {"status":"approved","cert","ca","nonce",
    "dispatcher_serial","dispatcher_id"} for the waiting connection.
    Returns: the registry record {hostname, ip, port, lookup_by, paired, expiry,
    tags, dispatcher_serial, serial_status}.
    Raises: PairingError on an unknown/decided reqid, a bad argument, a refused CSR,
    a missing CA / dispatcher certificate, or a registry write failure.
    """
    folder = _pairing_dir(cfg)
    record = _load_pending(folder, reqid)
    name = str(record.get("hostname", ""))
    if not store.valid_agent_name(name):
        raise PairingError(f"pairing request {reqid} has an invalid hostname; deny it")
    if lookup_by is None:
        lookup_by = record.get("lookup_by") or "hostname"
    if lookup_by not in ("ip", "hostname"):
        raise PairingError(f"lookup_by {lookup_by!r} is not valid; 'ip' or 'hostname' is accepted")
    if ip is not None:
        try:
            ip = str(ipaddress.ip_address(str(ip).strip()))
        except ValueError:
            raise PairingError(f"ip {ip!r} is not valid; an IPv4 or IPv6 address is accepted")
    else:
        ip = str(record.get("ip") or record.get("source_ip") or "")
    if agent_port is None:
        agent_port = record.get("port") or wire.AGENT_PORT
    dispatcher_id = getattr(cfg, "dispatcher_id", "") or ""
    try:
        agent_port = pki.check_port(agent_port)
        dispatcher_serial = pki.dispatcher_serial(cfg)
        ca_pem = pki.read_ca_cert(cfg.ca_dir)
        csr_pem = str(record.get("csr", "")).encode("utf-8")
        public_key = pki.check_csr(csr_pem).public_key()
        lifecycle.check_not_revoked(cfg, public_key=public_key)
        cert_pem = pki.sign_csr(cfg.ca_dir, csr_pem, days=pki.LEAF_DAYS)
        serial, expiry = pki.cert_serial(cert_pem), pki.cert_expiry(cert_pem)
    except (pki.PKIError, lifecycle.LifecycleError) as exc:
        raise PairingError(str(exc)) from None
    entry = {
        "hostname": name, "ip": ip, "port": agent_port, "lookup_by": lookup_by,
        "paired": wire.utc_timestamp(), "expiry": expiry, "tags": _existing_tags(registry, name),
        "dispatcher_serial": dispatcher_serial, "serial_status": "current",
        "serial": serial, "spki_sha256": pki.spki_sha256(public_key),
    }
    try:
        registry.put(name, entry)
    except (store.StoreError, OSError, ValueError) as exc:
        raise PairingError(f"cannot register agent {name!r}: {exc}") from None
    answer = {
        "status": "approved", "cert": cert_pem.decode("ascii"), "ca": ca_pem.decode("ascii"),
        "nonce": str(record.get("nonce", "")), "dispatcher_serial": dispatcher_serial,
        "dispatcher_id": dispatcher_id,
    }
    _write_queue_file(_queue_path(folder, reqid, ".approved"), answer)
    wire.log_action("info", "pair-approve", reqid=reqid, hostname=name, ip=ip, port=agent_port,
                    lookup_by=lookup_by, serial=serial, expiry=expiry)
    audit.record(cfg, action="pair-approve", via="cli", user=os.environ.get("USER", ""),
                 source_ip=str(record.get("source_ip") or ip), hosts=[name], reqid=reqid,
                 outcome="approved", detail="serial %s, expires %s" % (serial, expiry))
    return entry


def deny(cfg, reqid: str) -> None:
    """Deny a queued request: the waiting agent is told "rejected by operator".

    Raises: PairingError on an unknown or already decided reqid.
    """
    folder = _pairing_dir(cfg)
    record = _load_pending(folder, reqid)
    answer = {"status": "denied", "reason": "rejected by operator"}
    _write_queue_file(_queue_path(folder, reqid, ".denied"), answer)
    _unlink(_queue_path(folder, reqid, ".json"))
    wire.log_action("info", "pair-deny", reqid=reqid, hostname=record.get("hostname", ""))
    audit.record(cfg, action="pair-deny", via="cli", user=os.environ.get("USER", ""),
                 source_ip=str(record.get("source_ip") or record.get("ip") or ""),
                 hosts=[str(record.get("hostname", ""))], reqid=reqid, outcome="denied")


def expire_stale_requests(cfg) -> int:
    """Delete queue files older than PAIRING_STALE_S; returns how many requests expired."""
    folder = _pairing_dir(cfg)
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    now = time.time()
    expired = 0
    for fname in names:
        reqid, _, ext = fname.partition(".")
        if not PAIRING_REQID_RE.match(reqid) or ext not in ("json", "approved", "denied"):
            continue
        path = os.path.join(folder, fname)
        try:
            age = now - os.stat(path).st_mtime
        except OSError:
            continue
        if age > PAIRING_STALE_S:
            _unlink(path)
            if ext == "json":
                expired += 1
                wire.log_action("info", "pair-expire", reqid=reqid)
    return expired


def run_pairing_mode(cfg, registry=None, *, port: int = wire.PAIRING_PORT,
                     timeout: float | None = None, bind: str = "0.0.0.0",
                     interactive: bool = False, out=None, stdin=None) -> int:
    """Run a pairing session in the foreground until timeout, SIGTERM/SIGINT or "quit".

    Prints "pairing mode on port N for T s" and one line per new request
    (reqid, hostname, ip, 6-digit code). interactive (stdin is a TTY) offers
    a/d/s, aN/dN, list/l, quit/q. timeout defaults to cfg.pairing_timeout;
    registry defaults to store.open_store(cfg).registry.
    Returns: 0. Raises: PairingError on a bad timeout or when the listener cannot start.
    """
    out = out if out is not None else sys.stdout
    stdin = stdin if stdin is not None else sys.stdin
    if timeout is None:
        timeout = getattr(cfg, "pairing_timeout", PAIRING_MAX_TIMEOUT_S)
    try:
        timeout = float(timeout)
    except (TypeError, ValueError):
        timeout = -1.0
    if not 1 <= timeout <= PAIRING_MAX_TIMEOUT_S:
        raise PairingError(f"pairing timeout {timeout!r} is not valid; 1-600 seconds are accepted")
    if registry is None:
        registry = store.open_store(cfg).registry
    session = _PairingSession(cfg, registry, out)
    server = PairingServer(cfg, registry, bind=bind, port=port, timeout=timeout,
                           on_request=session.announce)
    stop = _StopFlag()
    # Handlers go in before the listener starts, so a SIGTERM at any point
    # after the announcement still ends the session cleanly.
    restore = _install_stop_signals(stop)
    ended_by = "timeout"
    try:
        server.start()
        try:
            wire.log_action("info", "pairing-mode-start", port=server.port, timeout=int(timeout),
                            bind=bind)
            session.say(f"pairing mode on port {server.port} for {int(timeout)} s")
            ended_by = _pairing_loop(session, stop, stdin, timeout, interactive)
        finally:
            server.stop()
    finally:
        restore()
    if ended_by == "timeout":
        wire.log_action("info", "pairing-mode-timeout", port=server.port)
        session.say("pairing mode timed out")
    else:
        wire.log_action("info", "pairing-mode-stop", port=server.port, reason=ended_by)
        session.say("pairing mode stopped")
    return 0


# --- private ---------------------------------------------------------------------

_LISTED_FIELDS = ("reqid", "hostname", "ip", "source_ip", "lookup_by", "port", "received",
                  "code", "reverse_dns", "reverse_confirmed")
_NONCE_RE = re.compile(r"^[A-Za-z0-9+/=_-]{1,128}$")

class _PairingSession:
    """Operator-facing side of run_pairing_mode: announcements and a/d/list/quit."""

    def __init__(self, cfg, registry, out) -> None:
        self.cfg, self.registry, self.out = cfg, registry, out
        self._out_lock = threading.Lock()
        self._numbered = []

    def say(self, text: str) -> None:
        with self._out_lock:
            try:
                self.out.write(text + "\n")
                self.out.flush()
            except (OSError, ValueError):
                pass  # a closed terminal must not stop the listener

    def prompt(self) -> None:
        with self._out_lock:
            try:
                self.out.write("pairing> ")
                self.out.flush()
            except (OSError, ValueError):
                pass

    def announce(self, info: dict) -> None:
        self.say("request %s  hostname %s  ip %s  code %s" % (
            info["reqid"], info["hostname"], info["ip"], info["code"]))

    def command(self, text: str) -> str:
        """Run one interactive command; returns "quit" to end the session."""
        word = text.lower()
        if word in ("q", "quit", "exit"):
            return "quit"
        if word in ("", "s", "skip"):
            return ""
        if word in ("l", "list"):
            self._list()
            return ""
        match = re.match(r"^([ad])\s*(\d*)$", word)
        if not match:
            self.say("unknown command %r; use a, d, aN, dN, s, list or quit" % text[:40])
            return ""
        pending = list_requests(self.cfg)
        if match.group(2):
            index = int(match.group(2))
            numbered = self._numbered or [r["id"] for r in pending]
            if not 1 <= index <= len(numbered):
                self.say("no request number %d; run list to see the numbers" % index)
                return ""
            reqid = numbered[index - 1]
        elif len(pending) == 1:
            reqid = pending[0]["id"]
        else:
            self.say("%d requests pending; use aN/dN after list" % len(pending))
            return ""
        try:
            if match.group(1) == "a":
                entry = approve(self.cfg, self.registry, reqid)
                self.say("approved %s (%s, expires %s)" % (reqid, entry["hostname"], entry["expiry"]))
            else:
                deny(self.cfg, reqid)
                self.say("denied %s" % reqid)
        except PairingError as exc:
            self.say("error: %s" % exc)
        return ""

    def _list(self) -> None:
        pending = list_requests(self.cfg)
        self._numbered = [r["id"] for r in pending]
        if not pending:
            self.say("no pending requests")
        for number, row in enumerate(pending, 1):
            self.say("%2d. %s  hostname %s  ip %s  code %s  received %s" % (
                number, row["id"], row["hostname"], row["ip"], row["code"], row["received"]))


def _pairing_loop(session, stop: "_StopFlag", stdin, timeout: float, interactive: bool) -> str:
    """Wait for timeout / signal / quit; returns "timeout", "signal" or "quit"."""
    deadline = time.monotonic() + timeout
    if interactive:
        session.say("commands: a/d (the only request), aN/dN (numbered), s (skip), list, quit")
        session.prompt()
    while not stop.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return "timeout"
        if interactive:
            line = _read_line(stdin, min(left, PAIRING_POLL_S))
            if line is None:
                continue
            if session.command(line.strip()) == "quit":
                return "quit"
            session.prompt()
        else:
            time.sleep(min(left, PAIRING_POLL_S))
    return "signal"


def _pairing_dir(cfg) -> str:
    """<state_dir>/pairing."""
    return os.path.join(cfg.state_dir, "pairing")


def _queue_path(folder: str, reqid: str, ext: str) -> str:
    """Path of a queue file; the reqid is checked before it becomes a file name."""
    if not isinstance(reqid, str) or not PAIRING_REQID_RE.match(reqid):
        raise PairingError(f"pairing request id {reqid!r} is not valid; "
                           "16 lowercase hex characters are accepted")
    return os.path.join(folder, reqid + ext)


def _pending_ids(folder: str) -> list:
    """Reqids with a .json and no decision yet."""
    try:
        names = set(os.listdir(folder))
    except OSError:
        return []
    ids = []
    for fname in names:
        reqid, dot, ext = fname.partition(".")
        if ext == "json" and PAIRING_REQID_RE.match(reqid) \
                and reqid + ".approved" not in names and reqid + ".denied" not in names:
            ids.append(reqid)
    return sorted(ids)


def _load_pending(folder: str, reqid: str) -> dict:
    """Queue record of an undecided request, or PairingError naming list-requests."""
    path = _queue_path(folder, reqid, ".json")
    for ext in (".approved", ".denied"):
        if os.path.exists(_queue_path(folder, reqid, ext)):
            raise PairingError(f"pairing request {reqid} was already decided")
    record = _read_json(path)
    if not isinstance(record, dict):
        raise PairingError(f"no pending pairing request {reqid}; run list-requests to see pending ids")
    return record


def _read_json(path: str):
    """Parsed JSON of a small file, or None if absent/unreadable."""
    try:
        with open(path, "rb") as fh:
            return json.loads(fh.read(1 << 20))
    except (OSError, ValueError):
        return None


def _unlink(*paths: str) -> None:
    """Remove files, ignoring ones already gone."""
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            wire.log_action("warning", "pair-cleanup", path=path, error=exc.strerror)


def _write_queue_file(path: str, record: dict) -> None:
    """Write one queue file as JSON (0600, atomic, durable); OSError becomes PairingError."""
    try:
        wire.atomic_write(path, json.dumps(record).encode(), QUEUE_MODE, sync_dir=True)
    except OSError as exc:
        raise PairingError(f"cannot write {path} ({exc.strerror}); a writable state_dir is needed")


def _existing_tags(registry, name: str) -> dict:
    """Tags of an already registered name, so re-pairing keeps the operator's tags."""
    try:
        old = registry.get(name)
    except (store.StoreError, OSError, ValueError):
        return {}
    tags = old.get("tags") if isinstance(old, dict) else None
    return dict(tags) if isinstance(tags, dict) else {}


def _parse_pair_request(request, source_ip: str) -> tuple:
    """Validate a POST /pair request; returns (queue fields, "") or ({}, refusal reason)."""
    def reject(reason: str, why: str) -> tuple:
        wire.log_action("warning", "pair-reject", reason=reason.replace(" ", "-"),
                        ip=source_ip, error=why)
        return {}, reason

    if request.method != "POST" or request.path.split("?")[0] != "/pair":
        return reject("invalid request", "expected POST /pair")
    try:
        body = json.loads(request.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: deep nesting
        return reject("invalid request", "body is not JSON")
    if not isinstance(body, dict) or not isinstance(body.get("csr"), str) \
            or not isinstance(body.get("hostname"), str):
        return reject("invalid request", "csr and hostname strings are required")
    hostname = body["hostname"]
    # The hostname becomes the registry file name: allow-regex before anything else.
    if not store.valid_agent_name(hostname):
        return reject("invalid hostname", "hostname fails ^[A-Za-z0-9][A-Za-z0-9._-]*$")
    nonce = body.get("nonce", "")
    if not isinstance(nonce, str) or (nonce and not _NONCE_RE.match(nonce)):
        return reject("invalid request", "nonce must be up to 128 hex/base64 characters")
    lookup_by = body.get("lookup_by", "")
    if lookup_by not in ("", None, "ip", "hostname"):
        return reject("invalid request", "lookup_by must be ip or hostname")
    port = body.get("port", wire.AGENT_PORT)
    try:
        port = pki.check_port(port)
    except pki.PKIError:
        return reject("invalid request", "port must be 1-65535")
    try:
        pki.check_csr(body["csr"].encode("utf-8"))
    except pki.PKIError as exc:
        return reject("invalid request", "CSR refused: %s" % exc)
    ip = source_ip
    reported = body.get("ip")
    if isinstance(reported, str):
        try:
            ip = str(ipaddress.ip_address(reported.strip()))
        except ValueError:
            pass  # not an IP literal: record where the connection came from instead
    fields = {
        "id": "", "hostname": hostname, "ip": ip, "source_ip": source_ip,
        "csr": body["csr"], "nonce": nonce, "lookup_by": lookup_by or "", "port": port,
        "received": wire.utc_timestamp(), "code": pairing_code(body["csr"].encode("utf-8")),
        # Reverse DNS is deliberately skipped: an unbounded resolver call could
        # stall the listener, and the operator compares the code instead.
        "reverse_dns": "", "reverse_confirmed": 0,
    }
    return fields, ""


def _rate_limit_tuple(value) -> tuple:
    """(limit, window_s, block_s) from a tuple or "10/60/300" text."""
    if isinstance(value, str):
        value = value.split("/")
    try:
        limit, window, block = (int(v) for v in value)
    except (TypeError, ValueError):
        raise PairingError(f"pairing_rate_limit_volume {value!r} is not valid; limit/window/block "
                       "such as 10/60/300 is accepted")
    return limit, window, block


def _send(tls, data: bytes) -> None:
    """sendall under the connection's I/O deadline."""
    tls.settimeout(PAIRING_IO_TIMEOUT_S)
    tls.sendall(data)


def _drain(tls, limit: int = 4 * wire.MAX_PAIRING_BODY_BYTES, idle_s: float = 0.3,
           total_s: float = 3.0) -> None:
    """Read and discard what the client is still sending (bounded in bytes and time),
    so closing does not reset the connection before the client has read our refusal."""
    deadline = time.monotonic() + total_s
    seen = 0
    while seen < limit:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        tls.settimeout(min(idle_s, left))
        try:
            chunk = tls.recv(65536)
        except (OSError, ssl.SSLError):   # socket.timeout included: the client went quiet
            return
        if not chunk:
            return
        seen += len(chunk)


class _StopFlag:
    """A flag a signal handler may set: no locks, unlike threading.Event, whose
    set() could deadlock if the signal lands while the main thread holds its lock."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


def _install_stop_signals(stop: _StopFlag):
    """SIGTERM/SIGINT set `stop` (main thread only); returns a function restoring handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {}

    def handler(signum, frame):
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[signum] = signal.signal(signum, handler)
        except (ValueError, OSError):
            pass

    def restore() -> None:
        for signum, old in previous.items():
            try:
                signal.signal(signum, old)
            except (ValueError, OSError, TypeError):
                pass
    return restore


def _read_line(stream, wait_s: float):
    """One line from stream if it becomes readable within wait_s; "" at EOF is "quit"."""
    try:
        ready, _, _ = select.select([stream], [], [], wait_s)
    except (OSError, ValueError, TypeError):
        time.sleep(wait_s)
        return None
    if not ready:
        return None
    line = stream.readline()
    return line if line else "quit"


def _short(exc: BaseException) -> str:
    """First line of an error, at most 120 characters, for a message or a log field."""
    return (str(exc).splitlines() or [type(exc).__name__])[0][:120]
