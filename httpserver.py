"""A hardened gevent WSGI server: deadlines, bounded keep-alive and drain, JSON errors.

Owns what any WSGI application behind it needs from the transport: a TLS handshake and
a request head each under one deadline (a per-read timeout alone lets a client dripping
one byte at a time hold a slot forever), a bounded body read, opt-in keep-alive that
never starves new callers, a bounded drain of unread input, TCP_NODELAY, a JSON body
for requests the WSGI layer never sees (400, 414), one log line instead of a hub
traceback, WebSocket upgrades only when the application asks, and a graceful stop on
SIGTERM/SIGINT.

Never does: route, authenticate, know what the application serves, or patch gevent
(the entry point does that before importing this module).
"""

__all__ = [
    "BindError",
    "ClientFault",
    "TooLarge",
    "CLIENT_IO_TIMEOUT_S",
    "REQUEST_HEAD_DEADLINE_S",
    "REQUEST_BODY_DEADLINE_S",
    "DRAIN_DEADLINE_S",
    "SHUTDOWN_GRACE_S",
    "KEEPALIVE_IDLE_S",
    "KEEPALIVE_MAX_REQUESTS",
    "KEEPALIVE_FREE_SHARE",
    "WS_UPGRADE_KEY",
    "Handler",
    "Server",
    "open_server",
    "serve_until_signalled",
    "read_body",
    "raw_error_response",
]

import http.client
import signal
import socket
import sys
import time
from typing import Any, Callable, Optional

import gevent
import gevent.event
import gevent.pool
from gevent import pywsgi
from geventwebsocket.handler import WebSocketHandler
import ujson

###############################################################################
# Constants ###################################################################
###############################################################################

#: Socket timeout for one client read or write (also bounds a stalled TLS handshake).
CLIENT_IO_TIMEOUT_S = 30.0
#: Deadline for the TLS handshake, and again for the request line plus headers.
REQUEST_HEAD_DEADLINE_S = 10.0
#: Deadline for reading a request body once the headers are in.
REQUEST_BODY_DEADLINE_S = 20.0
#: After the answer, unread body bytes are drained (so the close does not reset the
#: answer) for at most this long and this much; then the connection is closed regardless.
DRAIN_DEADLINE_S = 2.0
DRAIN_MAX_BYTES = 4 * 1024 * 1024
#: How long a graceful stop waits for in-flight requests before closing them.
SHUTDOWN_GRACE_S = 30.0
#: A client that asks for it with "Connection: keep-alive" may send further requests on
#: the same connection (one request per connection otherwise). A kept connection waits
#: this long for its next request line, and serves at most this many.
KEEPALIVE_IDLE_S = 5.0
KEEPALIVE_MAX_REQUESTS = 1000
#: Connections are kept only while at least this share of the connection pool is free,
#: so idle keep-alive clients never push new callers into a wait in accept().
KEEPALIVE_FREE_SHARE = 0.25
#: environ key of the callable that turns the current request into a WebSocket.
WS_UPGRADE_KEY = "httpserver.websocket_upgrade"
#: EADDRINUSE on Linux and the BSDs.
_ADDRESS_IN_USE = (98, 48)

###############################################################################
# Exceptions ##################################################################
###############################################################################


class BindError(Exception):
    """The listening socket cannot be opened; .in_use is True for EADDRINUSE."""

    def __init__(self, message: str, *, in_use: bool) -> None:
        super().__init__(message)
        self.in_use = in_use


class TooLarge(Exception):
    """The request body is over the application's limit."""


class ClientFault(ValueError):
    """A client's request cannot be read: too slow (TLS handshake, head or body past its
    deadline) or a head pywsgi cannot parse. A ValueError is pywsgi's "invalid client
    request": a 400 and one error-log line, never a traceback."""


###############################################################################
# Request input ###############################################################
###############################################################################


def read_body(environ: dict, max_bytes: int) -> bytes:
    """The request body, read under REQUEST_BODY_DEADLINE_S and never past max_bytes + 1.

    Raises: TooLarge (declared or sent over max_bytes); ValueError for a Content-Length
        that is not a number; ClientFault when the body is too slow.
    """
    length_text = (environ.get("CONTENT_LENGTH") or "").strip()
    stream = environ.get("wsgi.input")
    if stream is None:
        return b""
    if length_text:
        if not length_text.isdigit():
            raise ValueError("bad Content-Length")
        limit = int(length_text)
        if limit > max_bytes:
            raise TooLarge()
    elif "chunked" in (environ.get("HTTP_TRANSFER_ENCODING") or "").lower():
        limit = max_bytes + 1
    else:
        return b""
    chunks = []
    got = 0
    with gevent.Timeout(REQUEST_BODY_DEADLINE_S, ClientFault(
            "request body not received within %gs" % REQUEST_BODY_DEADLINE_S)):
        while got < limit:
            chunk = stream.read(min(65536, limit - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    if got > max_bytes:
        raise TooLarge()
    return b"".join(chunks)


def raw_error_response(status: int) -> bytes:
    """A whole HTTP response (head + JSON body) for a request that never reached the app."""
    if status == 414:
        body = {"ok": False, "error": "request line too long",
                "detail": "the request line exceeds %d bytes" % pywsgi.MAX_REQUEST_LINE}
    else:
        body = {"ok": False, "error": "bad request",
                "detail": "the request could not be parsed"}
    data = ujson.dumps(body, escape_forward_slashes=False).encode("utf-8")
    reason = http.client.responses.get(status, "")
    head = ("HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            "Connection: close\r\n\r\n" % (status, reason, len(data)))
    return head.encode("latin-1") + data


###############################################################################
# Connection handler ##########################################################
###############################################################################


class Handler(WebSocketHandler):
    """One request per connection unless the client asks for keep-alive (and may have it).

    A WebSocket handler that never upgrades on its own: gevent-websocket's would upgrade
    any request asking for it, before the application has looked at it. Here a request
    is plain WSGI, and only a route that calls environ[WS_UPGRADE_KEY]() upgrades.
    """

    #: Requests read on this connection so far (keep-alive bookkeeping).
    served = 0

    def run_application(self) -> Any:
        self.environ[WS_UPGRADE_KEY] = self._upgrade
        try:
            return pywsgi.WSGIHandler.run_application(self)
        finally:
            if not self._drain_input():
                self.close_connection = True

    def _drain_input(self) -> bool:
        """Read what is left of the request body, bounded in bytes and time.

        Closing with unread input resets the connection and can destroy the answer, so
        pywsgi drains the body first - at the client's pace and up to any declared length.
        A client sending one byte a second, or an endless body after a 413, would hold a
        pool slot that long; here the drain is capped instead. Returns True when the whole
        body was read, so the next request on a kept connection starts at its first byte.
        """
        stream = self.wsgi_input
        if stream is None:
            return True
        left = DRAIN_MAX_BYTES
        complete = False
        # As pywsgi's own discard: never invite a body (100 Continue) only to drop it.
        stream.send_100_continue_enabled = False
        try:
            with gevent.Timeout(DRAIN_DEADLINE_S, False):
                while left > 0:
                    chunk = stream.read(min(65536, left))
                    if not chunk:
                        complete = True
                        break
                    left -= len(chunk)
        except (OSError, ValueError):
            pass                # a broken or malformed body: closing is all that is left
        # pywsgi's own "skip the discard" flag: the body is read, or the connection closes.
        stream._chunked_input_error = True
        return complete

    def _upgrade(self) -> Any:
        """Send 101 (the route checked the handshake) and return the WebSocket."""
        self.upgrade_connection()
        self.write(b"")
        # A WebSocket may stay silent for hours: its owner puts deadlines on its I/O.
        self.socket.settimeout(None)
        return self.websocket

    def log_request(self) -> None:
        # gevent-websocket's override logs through the logging module; the application
        # writes its own request line.
        return None

    def handle_one_request(self) -> Any:
        result = super().handle_one_request()
        if isinstance(result, tuple):
            # pywsgi's own answer to an unparseable request (400, 414) is an empty text
            # body; give it a JSON one like every other answer.
            result = (result[0], raw_error_response(int(result[0])))
        return result

    def read_requestline(self) -> str:
        if self.served:
            return self._next_requestline()
        self._head_deadline = time.monotonic() + REQUEST_HEAD_DEADLINE_S
        try:
            with gevent.Timeout(REQUEST_HEAD_DEADLINE_S, ClientFault("request line")):
                return super().read_requestline()
        except ClientFault:
            self.server.log_event("warning", "slow-client",
                                  peer=_address_ip(self.client_address),
                                  stage="request-line", limit=REQUEST_HEAD_DEADLINE_S)
            return ""           # an empty request line: pywsgi closes the connection

    def read_request(self, raw_requestline: str) -> Any:
        left = max(0.01, getattr(self, "_head_deadline", 0.0) - time.monotonic())
        with gevent.Timeout(left, ClientFault(
                "request headers not received within %gs" % REQUEST_HEAD_DEADLINE_S)):
            try:
                result = super().read_request(raw_requestline)
            except http.client.HTTPException as exc:    # e.g. "got more than 100 headers"
                raise ClientFault(str(exc)) from None
        self.served += 1
        self.close_connection = not self._keep_alive_allowed()
        return result

    def start_response(self, status: str, headers: list, exc_info: Any = None) -> Any:
        # Only a sized, non-5xx answer to a request whose body is already read leaves a
        # kept connection in a known state.
        sized = any(name.lower() == "content-length" for name, _ in headers)
        if not sized or status.startswith("5") or not self._body_consumed():
            self.close_connection = True
        # Tell HTTP/1.1 clients too, so they never try to reuse a closed connection.
        if not any(name.lower() == "connection" for name, _ in headers):
            headers = list(headers) + [("Connection", "close" if self.close_connection
                                        else "keep-alive")]
        return super().start_response(status, headers, exc_info)

    def _body_consumed(self) -> bool:
        """The request body was read to its declared end (chunked bodies never count)."""
        stream = self.wsgi_input
        if stream is None:
            return True
        if stream.chunked_input:
            return False
        return (stream.content_length or 0) <= stream.position

    def _keep_alive_allowed(self) -> bool:
        """Keep the connection after this request? Only on the client's explicit ask.

        "Connection: keep-alive" (HTTP/1.0 or 1.1), no WebSocket upgrade, a body framed by
        one Content-Length (or none), the server not stopping, fewer than
        KEEPALIVE_MAX_REQUESTS served, and enough of the connection pool free that idle
        connections never make a new caller wait.
        """
        tokens = {token.strip().lower() for value in (self.headers.get_all("Connection") or [])
                  for token in value.split(",")}
        if "keep-alive" not in tokens or tokens & {"close", "upgrade"}:
            return False
        if self.headers.get("Upgrade") or self.request_version not in ("HTTP/1.0", "HTTP/1.1"):
            return False
        # Only plain Content-Length framing: where the next request starts must be certain.
        if self.headers.get("Transfer-Encoding") or len(self.headers.get_all("Content-Length")
                                                        or []) > 1:
            return False
        if self.server.stopping or self.served >= KEEPALIVE_MAX_REQUESTS:
            return False
        pool = self.server.pool
        return pool is None or pool.free_count() >= pool.size * KEEPALIVE_FREE_SHARE

    def _next_requestline(self) -> str:
        """The next request line on a kept connection, or "" (close) after KEEPALIVE_IDLE_S.

        The wait is registered with the server, so a graceful stop ends idle connections
        at once instead of waiting for them.
        """
        idle = self.server.idle_keepalive
        current = gevent.getcurrent()
        idle.add(current)
        try:
            with gevent.Timeout(KEEPALIVE_IDLE_S, False):
                if self.server.stopping:
                    return ""
                line = pywsgi.WSGIHandler.read_requestline(self)
                self._head_deadline = time.monotonic() + REQUEST_HEAD_DEADLINE_S
                return line
            return ""
        finally:
            idle.discard(current)


###############################################################################
# Server ######################################################################
###############################################################################


class Server(pywsgi.WSGIServer):
    """WSGIServer with deadlines from accept to the last byte, and a graceful stop.

    Client sockets get a timeout before the TLS handshake, which runs under
    REQUEST_HEAD_DEADLINE_S in the connection's own greenlet. Answers go out without
    Nagle's delay (TCP_NODELAY): a small answer on a kept connection would otherwise
    wait for the client's delayed ACK. Every log line goes through ``log_action(level,
    action, **fields)`` with ``log_prefix`` in front of the action name.
    """

    handler_class = Handler

    def __init__(self, *args: Any, log_action: Optional[Callable] = None,
                 log_prefix: str = "http-", **kwargs: Any) -> None:
        self._log_action = log_action or _log_to_stderr
        self._log_prefix = log_prefix
        kwargs.setdefault("log", None)
        kwargs.setdefault("error_log", _ErrorLog(self))
        super().__init__(*args, **kwargs)
        #: Set by a graceful stop: no new keep-alive, idle connections end.
        self.stopping = False
        #: Greenlets of kept connections waiting for their next request line.
        self.idle_keepalive: set = set()

    def open_connections(self) -> int:
        """Connections being served now (one handler greenlet each)."""
        return len(self.pool) if self.pool is not None else 0

    def log_event(self, level: str, action: str, **fields: Any) -> None:
        """One log line through the configured log_action."""
        self._log_action(level, self._log_prefix + action, **fields)

    def end_idle_keepalive(self) -> None:
        """Graceful stop: no more keep-alive; close connections waiting between requests."""
        self.stopping = True
        for greenlet in list(self.idle_keepalive):
            greenlet.kill(block=False)

    def wrap_socket_and_handle(self, client_socket: Any, address: Any) -> Any:
        client_socket.settimeout(CLIENT_IO_TIMEOUT_S)
        try:
            with gevent.Timeout(REQUEST_HEAD_DEADLINE_S, ClientFault("TLS handshake")):
                tls = self.wrap_socket(client_socket, **self.ssl_args)
        except (OSError, ValueError) as exc:    # ssl.SSLError is an OSError
            # One line instead of a hub traceback: old protocols, plain HTTP, scanners.
            self.log_event("warning", "tls-failure", peer=_address_ip(address),
                     reason=getattr(exc, "reason", None) or type(exc).__name__)
            client_socket.close()
            return None
        with tls:
            return self.handle(tls, address)

    def handle(self, sock: Any, address: Any) -> Any:
        sock.settimeout(CLIENT_IO_TIMEOUT_S)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass                # not TCP (a test's socketpair): nothing to tune
        return super().handle(sock, address)

    def graceful_stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Stop accepting, end idle keep-alive, let in-flight requests finish, then close."""
        self.close()
        self.end_idle_keepalive()
        pool = self.pool
        deadline = time.monotonic() + grace_s
        while pool is not None and pool.free_count() < pool.size \
                and time.monotonic() < deadline:
            gevent.sleep(0.05)
        self.stop(timeout=1)


def open_server(app: Callable, bind: str, port: int, *, pool_size: int,
                ssl_context: Any = None, log_action: Optional[Callable] = None,
                log_prefix: str = "http-") -> Server:
    """Bind a Server for ``app`` on bind:port with a pool of ``pool_size`` connections.

    Returns: the bound, not yet started Server.
    Raises: BindError naming the address and the reason.
    """
    kwargs = {"spawn": gevent.pool.Pool(max(1, int(pool_size))), "log_action": log_action,
              "log_prefix": log_prefix}
    if ssl_context is not None:
        kwargs["ssl_context"] = ssl_context
    server = Server((bind, port), app, **kwargs)
    try:
        server.init_socket()
    except OSError as exc:
        in_use = getattr(exc, "errno", None) in _ADDRESS_IN_USE
        raise BindError("cannot listen on %s port %d: %s"
                        % (bind, port, exc.strerror or exc), in_use=in_use) from None
    return server


def serve_until_signalled(server: Server, *, grace_s: float = SHUTDOWN_GRACE_S) -> None:
    """Start ``server`` and serve until SIGTERM or SIGINT; then stop gracefully.

    The first signal stops accepting and waits up to grace_s for requests in flight; a
    second one aborts at once. Signal handlers only spawn the work (never block the hub).
    """
    server.start()
    done = gevent.event.Event()
    state = {"stopping": False}

    def stop() -> None:
        if state["stopping"]:
            server.stop(timeout=0)
            done.set()
            return
        state["stopping"] = True
        server.graceful_stop(grace_s)
        done.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, gevent.spawn, stop)
    done.wait()


# --- private ---


class _ErrorLog:
    """gevent's error_log: its lines go through the server's log, never raw to stderr."""

    def __init__(self, server: Server) -> None:
        self._server = server

    def write(self, text: str) -> None:
        for line in str(text).splitlines():
            if line.strip():
                self._server.log_event("err", "server-error", message=line[:300])

    def flush(self) -> None:
        """Nothing buffered."""


def _address_ip(address: Any) -> str:
    """The IP of a (host, port) client address, for log lines."""
    return str(address[0]) if isinstance(address, tuple) and address else str(address)


def _log_to_stderr(level: str, action: str, **fields: Any) -> None:
    """Default log_action: one `LEVEL action key=value …` line on stderr."""
    parts = ["%s=%s" % (key, value) for key, value in sorted(fields.items())]
    sys.stderr.write("%s %s %s\n" % (level.upper(), action, " ".join(parts)))
    sys.stderr.flush()
