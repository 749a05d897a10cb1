"""Fan-out from the control host to ctrl-exec agents over mutual TLS.

Owns: the per-host exchange with an agent (connect, TLS handshake with the one
client context, one HTTP/1.0 JSON request, the answer, timing), the bounded
greenlet fan-out of ping / run / capabilities / result fetch, the operator
wording of transport errors (one place: ``_transport_error``), live output
streaming. Pure fan-out: target rows in, result rows out.

Never does: gevent monkey-patching (the entry points and tests/conftest.py do
it; this module only uses gevent's pool and timeout), auth decisions, locks,
or reading and writing state (service.py resolves targets and stores what it returns;
engine.py does not import store.py).  It never dials a target the
registry did not resolve (``address`` None), so an unknown name is never sent
to DNS, and it never logs or returns the caller's token.
"""

from __future__ import annotations

__all__ = [
    "Engine", "EngineError", "RunControl", "row_state", "HOST_STATES", "CONNECT_TIMEOUT_S", "READ_TIMEOUT_S", "MAX_PARALLEL",
    "STREAM_GRACE_S", "MAX_RESPONSE_BYTES", "MAX_EVENT_LINE_BYTES", "SESSION_CACHE_MAX",
    "NDJSON_TYPE", "failure_row",
]

import collections
import errno
import os
import socket
import ssl
import time

import gevent
import gevent.pool
import ujson

import ctrlexec_agent as wire

#: Deadline for TCP connect + TLS handshake, per host.
CONNECT_TIMEOUT_S = 10.0
#: Default answer deadline per host (config key ``read_timeout``).
READ_TIMEOUT_S = 60.0
#: Default number of hosts talked to at once (config key ``max_parallel``).
MAX_PARALLEL = 64
#: Added to a caller's run ``timeout``: the agent kills the script at ``timeout``
#: and again with SIGKILL 5 s later, so its answer is due by ``timeout + 5``.
STREAM_GRACE_S = 10
#: Largest answer accepted from one agent (two streams of the agent's output cap,
#: with room for a raised ``max_output``); a hostile agent cannot exhaust memory.
MAX_RESPONSE_BYTES = 64 * wire.MAX_BODY_BYTES
#: Largest NDJSON event line: the agent sends chunks of at most 64 KiB, which JSON
#: escaping can grow six-fold.
MAX_EVENT_LINE_BYTES = wire.MAX_BODY_BYTES
#: TLS sessions kept for resumption, one per (address, port): enough for a fleet of
#: max_hosts-sized runs to resume (FIFO eviction over a cyclic fan-out would miss them all).
SESSION_CACHE_MAX = 16384

NDJSON_TYPE = "application/x-ndjson"

#: OpenSSL's X509_V_ERR_CERT_HAS_EXPIRED (ssl.SSLCertVerificationError.verify_code).
_CERT_HAS_EXPIRED = 10
#: How often a RunControl asks whether its run was cancelled by another process.
CANCEL_CHECK_S = 0.5
#: The honest per-host states of a finished run row (row_state).
HOST_STATES = ("ok", "failed", "timed_out", "unreachable", "no_reply", "cancelled", "skipped",
               "lost")
#: Transport wordings (_transport_error) that mean the agent was never reached.
_UNREACHED_PREFIXES = ("unknown agent", "host '", "TLS handshake with")
#: ... and that mean it was reached but did not answer in time.
_NO_REPLY_PREFIXES = ("read timeout after", "no response from agent")

#: Host status values of an async record that still wait for the agent.
#: Run fields copied from an agent's answer when present and true.
_RUN_FLAGS = ("truncated", "timed_out", "cancelled")
_UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTDOWN}
_CLOSED_DURING_HANDSHAKE = (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError,
                            ConnectionAbortedError)


class RunControl:
    """Rate control of one run's fan-out: concurrency, an error budget, batches, cancel.

    max_concurrency: hosts in flight at once (None: max_parallel); max_errors: errors
    allowed before no new host starts (None: no limit; an error is any row whose
    row_state is not "ok", a non-zero exit included); batch_wait: seconds between
    batches of max_concurrency hosts (0: a rolling window instead of batches).
    Hosts already running when the budget trips, or when cancel() is called, finish;
    the hosts not started yet get a "skipped" row with the reason.
    """

    def __init__(self, *, max_concurrency: int | None = None, max_errors: int | None = None,
                 batch_wait: float = 0.0, cancelled_elsewhere=None) -> None:
        self.max_concurrency = max_concurrency
        self.max_errors = max_errors
        self.batch_wait = float(batch_wait or 0.0)
        self.errors = 0
        self.cancelled = False
        #: callable() -> bool asked (at most every CANCEL_CHECK_S) whether another
        #: process cancelled the run, e.g. another API node through the shared state.
        self._cancelled_elsewhere = cancelled_elsewhere
        self._checked_at = 0.0

    def cancel(self) -> None:
        """Start no further host."""
        self.cancelled = True

    def refusal(self) -> str:
        """Why the next host must not start, or "" when it may."""
        if not self.cancelled and self._cancelled_elsewhere is not None \
                and time.monotonic() - self._checked_at >= CANCEL_CHECK_S:
            self._checked_at = time.monotonic()
            try:
                self.cancelled = bool(self._cancelled_elsewhere())
            except Exception as exc:  # noqa: BLE001 - an unreadable flag must not stop the run
                wire.log_action("warning", "engine-cancel-check-fail", ERROR=str(exc))
        if self.cancelled:
            return "skipped: the run was cancelled before this host started"
        if self.max_errors is not None and self.errors > self.max_errors:
            return ("skipped: the error budget was exceeded (%d errors, max_errors %d) before "
                    "this host started" % (self.errors, self.max_errors))
        return ""

    def count(self, row: dict) -> None:
        """Count a finished row against the error budget."""
        if row_state(row) not in ("ok", "skipped"):
            self.errors += 1


def row_state(row: dict) -> str:
    """The honest state of one result row (HOST_STATES), from the fields the engine wrote.

    ok: exit 0; failed: any other exit, a refusal or an agent error; timed_out: the run
    timeout killed it; unreachable: never connected (down, refused, TLS, unknown name);
    no_reply: connected but no answer in time; cancelled / skipped / lost: as marked.
    An async submit row counts as ok when accepted.
    """
    status = row.get("status")
    if status in ("cancelled", "skipped", "lost"):
        return status
    if row.get("cancelled"):
        return "cancelled"
    if row.get("timed_out"):
        return "timed_out"
    if status in ("accepted", "running"):
        return "ok"
    error = row.get("error") or ""
    if row.get("exit") == 0 and not error:
        return "ok"
    if error.startswith(_UNREACHED_PREFIXES):
        return "unreachable"
    if error.startswith(_NO_REPLY_PREFIXES):
        return "no_reply"
    return "failed"


class EngineError(Exception):
    """Base of the engine's own errors: bad set-up or a programmer error.

    Per-host failures are never raised; they are result rows.
    """


class Engine:
    """mTLS client for a fleet of agents; every ``*_all`` verb fans out in parallel.

    One engine is built at start-up and shared: the SSL context is built once,
    and TLS sessions are cached per agent so repeat exchanges resume instead of
    doing a full handshake.  Each ``*_all`` call gets its own
    ``gevent.pool.Pool(max_parallel)``: callers are already bounded (the API's
    ``api_max_children``), and a per-call pool keeps one 500-host run from
    starving a concurrent ping; the fd budget is ``api_max_children x max_parallel``.
    Results always come back in request order.
    """

    def __init__(self, *, cert: str, key: str, ca: str, read_timeout: float = READ_TIMEOUT_S,
                 max_parallel: int = MAX_PARALLEL, connect_timeout: float = CONNECT_TIMEOUT_S) -> None:
        """Build the client context from the dispatcher's cert, key and CA.

        Raises:
            EngineError: a timeout or pool size that is not positive, or TLS
                files that cannot be loaded (names the files and the reason).
        """
        for name, value in (("read_timeout", read_timeout), ("connect_timeout", connect_timeout),
                            ("max_parallel", max_parallel)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise EngineError("%s must be a positive number, got %r" % (name, value))
        self._tls_files = (cert, key, ca)
        self._ctx = self._load_context()
        self._tls_stamp = _files_stamp(cert, key)
        self._own_expiry = wire.cert_not_after(cert)
        self.read_timeout = float(read_timeout)
        self.connect_timeout = float(connect_timeout)
        self.max_parallel = int(max_parallel)
        #: (address, port) -> ssl.SSLSession of the last good exchange.
        self._sessions: dict = {}
        #: Counters: handshakes, resumed, session_retry (for bench and tests).
        self.stats = collections.Counter()

    @property
    def own_expiry(self) -> str:
        """The loaded dispatcher certificate's notAfter text ("Jun  7 16:28:00 2027 GMT" or
        "unknown"), read when the certificate is loaded, not on every refused handshake."""
        return self._own_expiry

    @classmethod
    def from_config(cls, cfg) -> "Engine":
        """Build an engine from a config.Config (cert, key, ca, read_timeout, max_parallel,
        connect_timeout)."""
        return cls(cert=cfg.cert, key=cfg.key, ca=cfg.ca, read_timeout=cfg.read_timeout,
                   max_parallel=cfg.max_parallel, connect_timeout=cfg.connect_timeout)

    def ping_all(self, targets: list, *, reqid: str) -> list:
        """POST /ping to every target.

        Returns:
            [{host, status:"ok", version, expiry, staged, reqid, rtt[, reported_hostname]}
             or {host, status:"error", error, rtt}] in request order.
        """
        request = wire.encode_request("POST", "/ping", {"reqid": reqid})
        return self._fan_out("ping", targets, lambda t: _ping_row(t, self._exchange(t, request), reqid),
                             reqid=reqid)

    def dispatch_all(self, targets: list, *, script: str, args: list, reqid: str, username: str = "",
                     token: str = "", timeout: int | None = None, async_: bool = False,
                     on_event=None, control: RunControl | None = None) -> list:
        """POST /run to every target: sync, async (detached) or streamed.

        Args:
            timeout: seconds; sent to the agent (it kills the run) and widens the
                answer deadline to max(read_timeout, timeout + 10).
            async_: submit detached runs (``on_event`` is then not used).
            on_event: callable(dict) => streaming; called from many greenlets with
                {"event":"stdout"|"stderr","host","data"} as output arrives and
                {"event":"exit","host","exit","rtt"[,"error"]} when a host is done.
            control: RunControl (concurrency, error budget, batches, cancel); hosts it
                does not start get {host, ..., status:"skipped", error} rows.
        Returns:
            sync/stream: [{host, script, exit, stdout, stderr, reqid, rtt[, truncated,
            timed_out, error, reported_hostname]} or {host, script, exit:-1, error, reqid, rtt}];
            async: [{host, script, status:"accepted"|"busy"|"error", reqid, rtt[, error]}].
        """
        body = {"script": script, "args": list(args or []), "reqid": reqid,
                "username": username or "", "token": token or ""}
        if async_:
            body["async"] = True
        elif on_event is not None:
            body["stream"] = True
        if timeout is not None:
            body["timeout"] = timeout
        # Encoded once for the whole fleet; the token lives only in these bytes.
        request = wire.encode_request("POST", "/run", body)
        limit_s = self.read_timeout if timeout is None else max(self.read_timeout,
                                                                timeout + STREAM_GRACE_S)
        if async_:
            return self._fan_out(
                "run-async", targets,
                lambda t: _submit_row(t, self._exchange(t, request, accept=(200, 202, 409)),
                                      script, reqid),
                reqid=reqid, script=script, control=control)
        if on_event is None:
            return self._fan_out(
                "run", targets,
                lambda t: _run_row(t, self._exchange(t, request, total_s=limit_s), script, reqid),
                reqid=reqid, script=script, control=control)
        # Streaming: without a run timeout the answer may take as long as the
        # script does, so read_timeout bounds the silence between events instead.
        total_s = None if timeout is None else limit_s
        return self._fan_out(
            "run", targets,
            lambda t: self._stream_one(t, request, script, reqid, on_event, limit_s, total_s),
            reqid=reqid, script=script, on_row=lambda t, row: on_event(_exit_event(t, row)),
            control=control)

    def capabilities_all(self, targets: list) -> list:
        """GET /capabilities from every target.

        Returns:
            [{host, status:"ok", version, tags:{}, scripts:[{name, path, executable}],
              rtt[, reported_hostname]} or {host, status:"error", error, rtt}].
        """
        request = wire.encode_request("GET", "/capabilities")
        return self._fan_out("capabilities", targets,
                             lambda t: _capabilities_row(t, self._exchange(t, request)))

    def fetch_results(self, targets: list, *, reqid: str) -> list:
        """GET /result/<reqid> from every target (detached runs).

        Returns:
            [{host, status:"running", reqid, rtt} / {host, status:"done", exit, stdout,
              stderr, reqid, rtt[, truncated, timed_out, error]} / {host, status:"unknown",
              reqid, rtt} (agent 404) / {host, status:"error", error, rtt}].
        Raises:
            EngineError: reqid does not match ^[A-Za-z0-9_-]{1,64}$.
        """
        if not isinstance(reqid, str) or not wire.RESULT_REQID_RE.match(reqid):
            raise EngineError("reqid %r is not valid; ^[A-Za-z0-9_-]{1,64}$ is accepted" % (reqid,))
        request = wire.encode_request("GET", "/result/" + reqid)
        return self._fan_out("result", targets,
                             lambda t: _result_row(t, self._exchange(t, request, accept=(200, 404)),
                                                   reqid),
                             reqid=reqid)

    def cancel_all(self, targets: list, *, reqid: str, grace: int = 5) -> list:
        """POST /cancel {reqid, grace} to every target: kill that run's process group.

        Returns:
            [{host, status:"cancelled", signal:"TERM"|"KILL", rtt} / {host,
              status:"not_running", rtt} / {host, status:"not_cancellable", error, rtt}
              (an agent without /cancel: HTTP 404) / {host, status:"error", error, rtt}].
        Raises:
            EngineError: reqid does not match ^[A-Za-z0-9_-]{1,64}$.
        """
        if not isinstance(reqid, str) or not wire.RESULT_REQID_RE.match(reqid):
            raise EngineError("reqid %r is not valid; ^[A-Za-z0-9_-]{1,64}$ is accepted" % (reqid,))
        request = wire.encode_request("POST", "/cancel", {"reqid": reqid, "grace": int(grace)})
        return self._fan_out("cancel", targets,
                             lambda t: _cancel_row(t, self._exchange(
                                 t, request, total_s=self.read_timeout + grace, accept=(200, 404))),
                             reqid=reqid)

    def renew_all(self, targets: list, *, sign, ca_pem: str = "") -> list:
        """Renew each target's certificate over its mTLS link (reference §4.5).

        POST /renew (a CSR from the agent's key), ``sign(target, csr_pem, peer_serial)``
        (returns the certificate PEM, or raises with the reason it is refused), then
        POST /renew-complete {cert, ca, reqid}; a fresh reqid per agent.
        Returns:
            [{host, status:"renewed", expiry, staged, reqid, rtt} or
             {host, status:"error", error, reqid, rtt}] in request order.
        """
        def one(target) -> dict:
            started = time.monotonic()
            reqid = wire.new_reqid()
            asked = self._exchange(target, wire.encode_request("POST", "/renew", {"reqid": reqid}),
                                   accept=(200, 404), want_peer=True)
            error = asked.error or _renew_refusal("/renew", asked, "csr")
            if not error:
                try:
                    cert_pem = sign(target, asked.body["csr"], asked.peer)
                except Exception as exc:  # the signer's refusal is the row's error; logged
                    error = "renewal refused: %s" % exc
            if not error:
                body = {"cert": cert_pem.decode("ascii") if isinstance(cert_pem, bytes) else cert_pem,
                        "ca": ca_pem, "reqid": reqid}
                done = self._exchange(target, wire.encode_request("POST", "/renew-complete", body),
                                      accept=(200, 404))
                error = done.error or _renew_refusal("/renew-complete", done, "")
            if error:
                return {"host": target.entry, "status": "error", "error": error, "reqid": reqid,
                        "rtt": _rtt(started)}
            return {"host": target.entry, "status": "renewed", "reqid": reqid,
                    "expiry": _text(done.body.get("expiry")), "staged": done.body.get("staged") is True,
                    "rtt": _rtt(started)}

        return self._fan_out("renew", targets, one)

    def identify_all(self, targets: list) -> list:
        """POST /ping to every target and note the serial of the certificate it presents.

        Returns: [{host, status:"ok", serial, expiry, rtt} or {host, status:"error", error, rtt}].
        """
        request = wire.encode_request("POST", "/ping", {"reqid": wire.new_reqid()})

        def one(target) -> dict:
            answer = self._exchange(target, request, want_peer=True)
            if answer.error:
                return {"host": target.entry, "status": "error", "error": answer.error,
                        "rtt": answer.rtt}
            return {"host": target.entry, "status": "ok", "serial": answer.peer,
                    "expiry": _text(answer.body.get("expiry")), "rtt": answer.rtt}

        return self._fan_out("identify", targets, one)

    def rotate_serial_all(self, targets: list, *, serial: str, action: str, token: str = "") -> list:
        """POST /rotate-serial {serial, action: add|remove, token} to every target.

        Returns:
            [{host, status:"ok", action, serial, rtt} or {host, status:"error", error, rtt}].
        """
        request = wire.encode_request("POST", "/rotate-serial",
                                      {"serial": serial, "action": action, "token": token or ""})

        def one(target) -> dict:
            answer = self._exchange(target, request, accept=(200, 404))
            error = answer.error or _renew_refusal("/rotate-serial", answer, "")
            if error:
                return {"host": target.entry, "status": "error", "error": error, "rtt": answer.rtt}
            return {"host": target.entry, "status": "ok", "action": action, "serial": serial,
                    "rtt": answer.rtt}

        return self._fan_out("rotate-serial", targets, one)

    # --- private ---

    def _fan_out(self, action: str, targets: list, one, *, reqid: str = "", script: str = "",
                 on_row=None, control: RunControl | None = None) -> list:
        """Run ``one(target)`` for every target in a bounded pool; rows in request order.

        With a RunControl: at most max_concurrency at once (in batches batch_wait apart
        when set), and a host is only started while the error budget holds.
        """
        def guarded(target) -> dict:
            refusal = control.refusal() if control is not None else ""
            if refusal:
                row = _skipped_row(action, target, refusal, reqid, script)
            elif target.address is None:
                # Never dialled, never resolved: an unknown name must not reach DNS.
                row = failure_row(action, target, "unknown agent '%s' (not paired)" % target.name,
                                   "0ms", reqid, script)
            else:
                try:
                    row = one(target)
                except Exception as exc:  # one host's bug must not abort the fleet; logged
                    wire.log_action("err", "engine-error", ACTION_NAME=action, TARGET=_where(target),
                                    REQID=reqid or "(none)", ERROR="%s: %s" % (type(exc).__name__, exc))
                    row = failure_row(action, target, "internal error talking to the agent",
                                       "0ms", reqid, script)
            if control is not None and not refusal:
                control.count(row)
            self._log_row(action, target, row, reqid, script)
            if on_row is not None:
                try:
                    on_row(target, row)
                except Exception as exc:  # a failing listener must not lose the other rows; logged
                    wire.log_action("err", "engine-event-error", TARGET=_where(target),
                                    REQID=reqid or "(none)", ERROR="%s: %s" % (type(exc).__name__, exc))
            return row

        if not targets:
            return []
        size = self.max_parallel
        if control is not None and control.max_concurrency:
            size = max(1, min(size, int(control.max_concurrency)))
        pool = gevent.pool.Pool(size)
        if control is None or not control.batch_wait:
            return pool.map(guarded, targets)
        rows = []
        for first in range(0, len(targets), size):
            if first:
                gevent.sleep(control.batch_wait)
            rows.extend(pool.map(guarded, targets[first:first + size]))
        return rows

    def _exchange(self, target, request: bytes, *, total_s: float | None = None,
                  idle_s: float | None = None, stream_cb=None, accept: tuple = (200,),
                  want_peer: bool = False):
        """One connection, one request, one answer; transport failures become ``error``.

        ``total_s`` bounds the whole answer (default read_timeout); ``idle_s`` bounds
        the silence between NDJSON events. With ``stream_cb``, an NDJSON answer's
        events go to it and the final exit event is returned as the body.
        Returns: _Answer(status, body, error, rtt, streamed, peer) - peer is the agent
        certificate's canonical serial when ``want_peer``, else "".
        """
        started = time.monotonic()
        stage = "connect"
        tls = None
        if total_s is None and idle_s is None:
            total_s = self.read_timeout
        limit_s = total_s if total_s is not None else idle_s
        peer = ""
        try:
            tls = self._open(target)
            if want_peer:
                peer = wire.peer_serial(tls)
            # TLS 1.3 completes our side of a full handshake before the agent has
            # checked our certificate; a refusal then shows up while we await the answer.
            stage = "answer-tls13" if tls.version() == "TLSv1.3" and not tls.session_reused else "answer"
            now = time.monotonic()
            end = now + total_s if total_s is not None else None
            tls.settimeout(limit_s)
            tls.sendall(request)
            reader = wire.SocketReader(tls, _sooner(end, now + idle_s if idle_s else None))
            status, headers = wire.read_response_head(reader)
            stage = "read"
            streamed = (stream_cb is not None and status == 200
                        and headers.get("content-type", "").split(";")[0].strip() == NDJSON_TYPE)
            if streamed:
                body = _read_events(reader, stream_cb, end, idle_s)
            else:
                body = _decode(_read_body(reader, headers))
            if status not in accept:
                raise _HttpStatus(status, body.get("error"))
            if not tls.session_reused:  # a resumed ticket stays valid; re-reading it costs ~0.3 ms
                self._keep_session(target, tls)
        except (OSError, wire.ProtocolError, _HttpStatus, _BadAnswer, _HandshakeFailed,
                _ConnectTimeout) as exc:
            return _Answer(None, None, self._transport_error(target, exc, stage, limit_s),
                           _rtt(started), False, peer)
        finally:
            if tls is not None:
                tls.close()
        return _Answer(status, body, "", _rtt(started), streamed, peer)

    def _open(self, target):
        """Connect and handshake within connect_timeout, resuming a cached session."""
        self._reload_if_changed()
        key = (target.address, target.port or wire.AGENT_PORT)
        session = self._sessions.get(key)
        with gevent.Timeout(self.connect_timeout, _ConnectTimeout):
            try:
                return self._connect(key, session)
            except _HandshakeFailed as exc:
                if session is None or isinstance(exc.cause, TimeoutError):
                    raise
                # Some servers refuse resumption (e.g. no session-id context with
                # client certs); forget the session and do one full handshake.
                self._sessions.pop(key, None)
                self.stats["session_retry"] += 1
                return self._connect(key, None)

    def _load_context(self) -> ssl.SSLContext:
        cert, key, ca = self._tls_files
        try:
            return wire.client_context(cert, key, ca)
        except (OSError, ssl.SSLError) as exc:
            raise EngineError("cannot load the dispatcher TLS files (cert %s, key %s, ca %s): %s - "
                              "check the cert, key and ca keys of ctrl-exec.conf"
                              % (cert, key, ca, getattr(exc, "strerror", None) or exc)) from exc

    def _reload_if_changed(self) -> None:
        """Pick up a rotated dispatcher certificate (rotate-dispatcher) without a restart.

        Looked at before every connection (two stat calls, a few microseconds), so no
        exchange starts with a pair that was already replaced; a pair that does not load
        (a half-finished swap) keeps the current context and is tried again next time.
        """
        stamp = _files_stamp(*self._tls_files[:2])
        if stamp == self._tls_stamp:
            return
        try:
            self._ctx = self._load_context()
        except EngineError as exc:
            wire.log_action("err", "dispatcher-cert-reload", RESULT="kept the loaded certificate",
                            ERROR=str(exc))
            return
        self._tls_stamp = stamp
        self._own_expiry = wire.cert_not_after(self._tls_files[0])
        self._sessions.clear()      # sessions belong to the old context
        wire.log_action("info", "dispatcher-cert-reload", CERT=self._tls_files[0],
                        EXPIRY=self.own_expiry)

    def _connect(self, key: tuple, session):
        """TCP connect + TLS handshake; handshake failures raise _HandshakeFailed."""
        sock = _dial(key, self.connect_timeout)
        done = False
        try:
            # Sessions only ever come from this context, so wrap_socket accepts them.
            sock = self._ctx.wrap_socket(sock, do_handshake_on_connect=False, session=session)
            try:
                sock.do_handshake()
            except OSError as exc:  # ssl.SSLError, timeouts and resets are all OSError
                raise _HandshakeFailed(exc) from exc
            self.stats["handshakes"] += 1
            if sock.session_reused:
                self.stats["resumed"] += 1
            done = True
            return sock
        finally:
            if not done:
                sock.close()

    def _keep_session(self, target, tls) -> None:
        """Remember the TLS session of a good exchange (a TLS 1.3 ticket arrives after the handshake)."""
        try:
            session = tls.session
        except (AttributeError, ValueError, ssl.SSLError):
            return
        if session is None or not (session.has_ticket or session.id):
            return
        key = (target.address, target.port or wire.AGENT_PORT)
        if key not in self._sessions and len(self._sessions) >= SESSION_CACHE_MAX:
            self._sessions.pop(next(iter(self._sessions)))  # oldest entry
        self._sessions[key] = session

    def _transport_error(self, target, exc: Exception, stage: str, limit_s: float) -> str:
        """Turn a failure of one exchange into the operator's wording (the one place)."""
        host = target.address
        if isinstance(exc, _HttpStatus):
            if exc.status == 403:
                return "forbidden: %s" % (exc.error or "forbidden")
            if exc.status == 413:
                return "request too large"
            return "agent answered HTTP %d: %s" % (exc.status, exc.error or "no error text")
        if isinstance(exc, _BadAnswer):
            return str(exc)
        if stage == "answer-tls13" and _closed_abruptly(exc):
            # An agent that refuses our certificate sends an alert and closes;
            # our request racing that close turns the alert into a reset or EOF.
            return self._trust_failure(target)
        if isinstance(exc, wire.ProtocolError):
            if exc.error == "no response":
                return "no response from agent - connection closed before an answer"
            return "invalid response from agent: %s" % exc.error
        if isinstance(exc, _ConnectTimeout):
            return "host '%s' did not respond - connection timed out" % host
        if isinstance(exc, _HandshakeFailed):
            cause = exc.cause
            if isinstance(cause, TimeoutError):
                return "host '%s' did not respond - connection timed out" % host
            if isinstance(cause, ssl.SSLCertVerificationError) \
                    and cause.verify_code == _CERT_HAS_EXPIRED:
                return ("TLS handshake with '%s' failed - agent '%s' certificate expired on %s; "
                        "it cannot be renewed over TLS any more: re-pair it "
                        "(ctrlexec_agent.py request-pairing on the agent)"
                        % (host, target.name, self._peer_not_after(target)))
            if isinstance(cause, _CLOSED_DURING_HANDSHAKE) and not self._own_cert_expired():
                return ("host '%s' closed the connection during the TLS handshake - agent overloaded, "
                        "rate-limited, or this address not in its allowed_ips" % host)
            return self._trust_failure(target)
        if isinstance(exc, socket.gaierror):
            return "host '%s' did not resolve - check the name or use an IP address" % host
        if isinstance(exc, ConnectionRefusedError):
            return ("host '%s' did not respond on port %s - connection refused "
                    "(agent not running, or wrong port?)" % (host, target.port or wire.AGENT_PORT))
        if isinstance(exc, TimeoutError):
            if stage == "connect":
                return "host '%s' did not respond - connection timed out" % host
            return "read timeout after %gs" % limit_s
        if isinstance(exc, ssl.SSLError) and _is_cert_alert(exc):
            # TLS 1.3: the agent checks our certificate after our side of the
            # handshake is done, so its refusal arrives as an alert on first read.
            return self._trust_failure(target)
        if isinstance(exc, OSError) and exc.errno in _UNREACHABLE:
            return "host '%s' is unreachable - no route to host or network down" % host
        if isinstance(exc, OSError) and exc.strerror:
            return exc.strerror
        return str(exc) or type(exc).__name__

    def _trust_failure(self, target) -> str:
        """A refused handshake: our expired certificate when it is, else a trust mismatch."""
        host = target.address
        if self._own_cert_expired():
            return ("TLS handshake with '%s' failed - agent '%s' refused this control host's "
                    "certificate, which expired on %s (%s); issue a new one (setup-dispatcher) "
                    "and re-pair the agents" % (host, target.name, self.own_expiry,
                                                self._tls_files[0]))
        return "TLS handshake with '%s' failed - certificate or trust mismatch" % host

    def _own_cert_expired(self) -> bool:
        try:
            return ssl.cert_time_to_seconds(self.own_expiry) < time.time()
        except ValueError:
            return False

    def _peer_not_after(self, target) -> str:
        """The notAfter of the certificate an agent presents, read over an unverified
        handshake (only to word an error: nothing is sent), or "an unknown date"."""
        cert, key, _ca = self._tls_files
        try:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.load_cert_chain(cert, key)
            with gevent.Timeout(self.connect_timeout, _ConnectTimeout):
                sock = _dial((target.address, target.port or wire.AGENT_PORT), self.connect_timeout)
                with ctx.wrap_socket(sock) as tls:
                    der = tls.getpeercert(binary_form=True)
            from cryptography import x509  # only on this error path
            return wire.openssl_date(x509.load_der_x509_certificate(der).not_valid_after_utc)
        except (OSError, ValueError, TypeError, _ConnectTimeout, ImportError):
            return "an unknown date"

    def _stream_one(self, target, request: bytes, script: str, reqid: str, on_event,
                    idle_s: float, total_s: float | None) -> dict:
        """One streamed run: forward output events, then build the sync-shaped row."""
        output = {"stdout": [], "stderr": []}
        size = [0]
        clipped = [False]

        def forward(event: dict) -> None:
            kind, data = event.get("event"), event.get("data")
            if kind not in output or not isinstance(data, str):
                return  # unknown event kinds: ignored for forward compatibility
            if size[0] + len(data) > MAX_RESPONSE_BYTES:
                clipped[0] = True  # a runaway agent: stop keeping (and sending) output
                return
            size[0] += len(data)
            output[kind].append(data)
            on_event({"event": kind, "host": target.entry, "data": data})

        answer = self._exchange(target, request, total_s=total_s, idle_s=idle_s, stream_cb=forward)
        if answer.error:
            row = _run_row(target, answer, script, reqid)
            for kind in ("stdout", "stderr"):
                if output[kind]:
                    row[kind] = "".join(output[kind])
            return row
        if not answer.streamed:
            # An agent without streaming (or a refusal) answers one JSON body.
            row = _run_row(target, answer, script, reqid)
            for kind in ("stdout", "stderr"):
                if row.get(kind):
                    on_event({"event": kind, "host": target.entry, "data": row[kind]})
            return row
        body = dict(answer.body, stdout="".join(output["stdout"]), stderr="".join(output["stderr"]))
        if clipped[0]:
            body["truncated"] = True
        return _run_row(target, answer._replace(body=body), script, reqid)

    def _log_row(self, action: str, target, row: dict, reqid: str, script: str) -> None:
        """One log line per host per operation; never the token."""
        fields = {"TARGET": _where(target), "RTT": row.get("rtt", "")}
        if reqid:
            fields["REQID"] = reqid
        if script:
            fields["SCRIPT"] = script
        if "exit" in row:
            fields["EXIT"] = row["exit"]
        elif action == "ping":
            fields["RESULT"] = row.get("status")
        else:
            fields["STATUS"] = row.get("status")
        if action == "capabilities" and row.get("status") == "ok":
            fields["SCRIPTS"] = len(row.get("scripts") or [])
        failed = row.get("exit") == -1 or row.get("status") == "error"
        if row.get("error"):
            fields["ERROR"] = row["error"]
        wire.log_action("err" if failed else "info", action, **fields)


_Answer = collections.namedtuple("_Answer", "status body error rtt streamed peer", defaults=(None,))


class _HttpStatus(Exception):
    """An agent answer with an HTTP status this operation does not expect."""

    def __init__(self, status: int, error) -> None:
        super().__init__(status)
        self.status = status
        self.error = error if isinstance(error, str) else ""


class _BadAnswer(Exception):
    """An agent answer that is not the JSON (or NDJSON) we asked for."""


class _HandshakeFailed(Exception):
    """The TLS handshake failed; ``cause`` is the socket/SSL error."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _ConnectTimeout(Exception):
    """connect_timeout passed during name lookup, connect or handshake (gevent.Timeout)."""


def _files_stamp(*paths: str) -> tuple:
    """(mtime_ns, size, inode) of each file, None for a missing one: changes on replace."""
    stamp = []
    for path in paths:
        try:
            info = os.stat(path)
            stamp.append((info.st_mtime_ns, info.st_size, info.st_ino))
        except OSError:
            stamp.append(None)
    return tuple(stamp)


def _renew_refusal(path: str, answer, field: str) -> str:
    """The error of a lifecycle answer (/renew, /renew-complete, /rotate-serial), or ""."""
    if answer.status == 404:
        return "this agent does not support %s (HTTP 404; upgrade the agent)" % path
    body = answer.body
    if body.get("status") != "ok":
        return "agent refused %s: %s" % (path, _text(body.get("error")) or "no reason given")
    if field and not isinstance(body.get(field), str):
        return "agent answer to %s has no %s" % (path, field)
    return ""


def _dial(key: tuple, timeout: float) -> socket.socket:
    """TCP connect; an IP literal skips the resolver (gevent sends getaddrinfo to a thread pool)."""
    address, port = key
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, address)
        except (OSError, ValueError):
            continue
        sock = socket.socket(family, socket.SOCK_STREAM)
        connected = False
        try:
            sock.settimeout(timeout)
            sock.connect((address, port))
            connected = True
            return sock
        finally:
            if not connected:
                sock.close()  # the error (or a gevent Timeout) propagates unchanged
    return socket.create_connection(key, timeout=timeout)


def _read_body(reader, headers: dict) -> bytes:
    """Body by Content-Length, or up to end of stream when absent."""
    if "content-length" not in headers:
        return reader.read_all(MAX_RESPONSE_BYTES)
    raw = headers["content-length"].strip()
    if not raw.isdigit() or int(raw) > MAX_RESPONSE_BYTES:
        raise _BadAnswer("invalid response from agent: Content-Length %r" % raw[:20])
    body = reader.read(int(raw))
    if len(body) != int(raw):
        raise _BadAnswer("invalid response from agent: answer cut short")
    return body


def _read_events(reader, stream_cb, end: float | None, idle_s: float | None) -> dict:
    """Feed NDJSON events to ``stream_cb`` until the exit event, which is returned."""
    while True:
        line = reader.readline(MAX_EVENT_LINE_BYTES)
        if not line:
            raise _BadAnswer("agent closed the stream before the exit event")
        if not line.strip():
            continue
        event = _decode(line)
        if event.get("event") == "exit":
            return event
        stream_cb(event)
        if idle_s:
            reader.deadline = _sooner(end, time.monotonic() + idle_s)


def _decode(raw: bytes) -> dict:
    """Parse one JSON object; anything else is an invalid answer."""
    try:
        value = ujson.loads(raw)
    except (ValueError, UnicodeDecodeError, OverflowError):
        raise _BadAnswer("invalid JSON response") from None
    if not isinstance(value, dict):
        raise _BadAnswer("invalid JSON response")
    return value


def _skipped_row(action: str, target, reason: str, reqid: str, script: str) -> dict:
    """The row of a host a RunControl did not start."""
    row = failure_row(action, target, reason, "0ms", reqid, script)
    row["status"] = "skipped"
    return row


def _cancel_row(target, answer) -> dict:
    """Cancel row from an agent answer (404 = an agent that does not know /cancel)."""
    if answer.error:
        return {"host": target.entry, "status": "error", "error": answer.error, "rtt": answer.rtt}
    if answer.status == 404:
        return {"host": target.entry, "status": "not_cancellable", "rtt": answer.rtt,
                "error": "this agent cannot cancel runs (no /cancel; upgrade the agent)"}
    status = answer.body.get("status")
    if status == "cancelled":
        return {"host": target.entry, "status": "cancelled", "rtt": answer.rtt,
                "signal": str(answer.body.get("signal") or "TERM")}
    if status == "not_running":
        return {"host": target.entry, "status": "not_running", "rtt": answer.rtt}
    return {"host": target.entry, "status": "error", "rtt": answer.rtt,
            "error": "invalid cancel answer from agent (status %r)" % (status,)}


def failure_row(action: str, target, error: str, rtt: str, reqid: str, script: str) -> dict:
    """The failed-host row in the shape of ``action``."""
    if action == "run":
        # stdout/stderr are always present (empty) so every run row has one shape (SPEC §6).
        return {"host": target.entry, "script": script, "exit": -1, "stdout": "", "stderr": "",
                "error": error, "reqid": reqid, "rtt": rtt}
    if action == "run-async":
        return {"host": target.entry, "script": script, "status": "error", "reqid": reqid,
                "rtt": rtt, "error": error}
    return {"host": target.entry, "status": "error", "error": error, "rtt": rtt}


def _run_row(target, answer, script: str, reqid: str) -> dict:
    """Sync run row from an agent answer; exit -1 (a refusal) becomes a failure row."""
    if answer.error:
        return failure_row("run", target, answer.error, answer.rtt, reqid, script)
    body = answer.body
    code = body.get("exit")
    if isinstance(code, bool) or not isinstance(code, int) or code == -1:
        error = body.get("error") if isinstance(body.get("error"), str) and body.get("error") else \
            "agent answer has no exit code"
        return failure_row("run", target, error, answer.rtt, reqid, script)
    row = {"host": target.entry, "script": script, "exit": code,
           "stdout": _text(body.get("stdout")), "stderr": _text(body.get("stderr")),
           "reqid": reqid, "rtt": answer.rtt}
    _copy_run_extras(row, body)
    _note_hostname(row, target, body)
    return row


def _submit_row(target, answer, script: str, reqid: str) -> dict:
    """Async submit row: 202 accepted, 409 busy, anything else an error."""
    if answer.error:
        return failure_row("run-async", target, answer.error, answer.rtt, reqid, script)
    row = {"host": target.entry, "script": script, "status": "accepted", "reqid": reqid,
           "rtt": answer.rtt}
    if answer.status == 409:
        row.update(status="busy", error=_text(answer.body.get("error")) or "script already running")
    elif answer.status != 202:
        row.update(status="error", error=_text(answer.body.get("error"))
                   or "agent did not accept the async run (HTTP %d)" % answer.status)
    return row


def _ping_row(target, answer, reqid: str) -> dict:
    """Ping row."""
    if not answer.error and answer.body.get("status") != "ok":
        answer = answer._replace(error=_text(answer.body.get("error")) or "unexpected ping answer")
    if answer.error:
        return failure_row("ping", target, answer.error, answer.rtt, reqid, "")
    body = answer.body
    row = {"host": target.entry, "status": "ok", "version": _text(body.get("version")),
           "expiry": _text(body.get("expiry")), "staged": body.get("staged") is True,
           "reqid": reqid, "rtt": answer.rtt}
    _note_hostname(row, target, body)
    return row


def _capabilities_row(target, answer) -> dict:
    """Capabilities row; ``tags`` is always an object, ``scripts`` always a list."""
    if not answer.error and answer.body.get("status") != "ok":
        answer = answer._replace(error=_text(answer.body.get("error"))
                                 or "unexpected capabilities answer")
    if answer.error:
        return failure_row("capabilities", target, answer.error, answer.rtt, "", "")
    body = answer.body
    tags = body.get("tags") if isinstance(body.get("tags"), dict) else {}
    scripts = body.get("scripts") if isinstance(body.get("scripts"), list) else []
    row = {"host": target.entry, "status": "ok", "version": _text(body.get("version")),
           "tags": tags, "scripts": scripts, "rtt": answer.rtt}
    _note_hostname(row, target, body)
    return row


def _result_row(target, answer, reqid: str) -> dict:
    """Result-fetch row: running, done (with run fields), unknown (404) or error."""
    if answer.error:
        return failure_row("result", target, answer.error, answer.rtt, reqid, "")
    body = answer.body
    if answer.status == 404:
        return {"host": target.entry, "status": "unknown", "reqid": reqid, "rtt": answer.rtt}
    status = body.get("status")
    if status == "running":
        return {"host": target.entry, "status": "running", "reqid": reqid, "rtt": answer.rtt}
    if status != "done":
        return failure_row("result", target, "unexpected result status %r" % (status,),
                            answer.rtt, reqid, "")
    code = body.get("exit")
    row = {"host": target.entry, "status": "done",
           "exit": code if isinstance(code, int) and not isinstance(code, bool) else -1,
           "stdout": _text(body.get("stdout")), "stderr": _text(body.get("stderr")),
           "reqid": reqid, "rtt": answer.rtt}
    _copy_run_extras(row, body)
    return row


def _exit_event(target, row: dict) -> dict:
    """The per-host ``exit`` stream event for a finished row."""
    event = {"event": "exit", "host": target.entry, "exit": row.get("exit", -1), "rtt": row.get("rtt")}
    if row.get("error"):
        event["error"] = row["error"]
    return event


def _copy_run_extras(row: dict, body: dict) -> None:
    """Copy truncated / timed_out (when true) and a non-empty error."""
    for flag in _RUN_FLAGS:
        if body.get(flag) is True:
            row[flag] = True
    if isinstance(body.get("error"), str) and body["error"]:
        row["error"] = body["error"]


def _note_hostname(row: dict, target, body: dict) -> None:
    """Keep the agent's own name when it differs from the registry name."""
    reported = body.get("host")
    if isinstance(reported, str) and reported and reported != target.name:
        row["reported_hostname"] = reported


def _closed_abruptly(exc: Exception) -> bool:
    """True when the peer went away before any answer: a certificate alert, reset or EOF."""
    if isinstance(exc, wire.ProtocolError):
        return exc.error == "no response"
    if isinstance(exc, ssl.SSLError) and _is_cert_alert(exc):
        return True
    return isinstance(exc, _CLOSED_DURING_HANDSHAKE)


def _is_cert_alert(exc: ssl.SSLError) -> bool:
    """True for TLS alerts about certificates (unknown CA, bad or missing certificate)."""
    reason = (getattr(exc, "reason", None) or str(exc)).upper()
    return "CERTIFICATE" in reason or "UNKNOWN_CA" in reason


def _where(target) -> str:
    """The TARGET log field: registry name and port (address too when it differs)."""
    if target.address is None:
        return target.name
    port = target.port or wire.AGENT_PORT
    if target.address == target.name:
        return "%s:%s" % (target.name, port)
    return "%s:%s(%s)" % (target.name, port, target.address)


def _sooner(a: float | None, b: float | None) -> float | None:
    """The earlier of two optional deadlines."""
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _rtt(started: float) -> str:
    """Elapsed time as the wire's "<n>ms" string."""
    return "%dms" % round((time.monotonic() - started) * 1000)


def _text(value) -> str:
    """A string field of an agent answer, "" when absent or not a string."""
    return value if isinstance(value, str) else ""
