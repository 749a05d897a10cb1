"""ctrl-exec HTTP API: routes, request validation, response shapes, server start.

Owns the JSON API of SPEC §6 (seed `ctrl-exec-api.md`): the `api` gate on every
request, per-endpoint validation in the SPEC's order, the auth actions run / ping /
status, lock holding around sync runs, run records, the NDJSON stream and its
WebSocket twin (GET /ws/run), the live OpenAPI spec, and the gevent WSGIServer
(optional TLS, bounded pool, WebSocket-capable handler, graceful stop).

Never does: talk to agents itself (engine.py), decide auth (auth.py), touch state
files directly (store.py), use bottle's request.json, answer with HTML (except
/docs), or put tokens, tracebacks or hook details into a response or a log line.

Run: python ctrlexec_api.py [--config PATH] | python ctrlexec_api.py --demo
"""

# gevent must patch before anything else is imported (bottle keeps a threading.local
# created at import time; unpatched, concurrent greenlets would share one request).
from gevent import monkey; monkey.patch_all()  # noqa: E402,E702

__all__ = [
    "ApiError",
    "BadRequest",
    "StartError",
    "MAX_BODY_BYTES",
    "make_app",
    "parse_body",
    "validate_run",
    "validate_ping",
    "validate_discovery",
    "serve",
    "main",
]

import argparse
import base64
import binascii
import http.client
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any, Callable, Iterable, Optional

import bottle
import gevent
import gevent.event
import gevent.local
import gevent.lock
import gevent.pool
import gevent.queue
from gevent import pywsgi
from geventwebsocket.handler import WebSocketHandler
import ujson

import auth
import config as config_mod
import ctrlexec_agent as wire
import demo
import store as store_mod
from engine import Engine

###############################################################################
# Constants ###################################################################
###############################################################################

MAX_BODY_BYTES = wire.MAX_BODY_BYTES
#: Most items accepted in a run's "args" array.
MAX_ARGS = 256
#: Accepted /status path parameter (the run store's 16-hex reqids and older 8-hex ones).
STATUS_REQID_RE = re.compile(r"[a-f0-9]{8,64}")
#: Socket timeout for one client read or write (slowloris guard; also bounds TLS handshakes).
CLIENT_IO_TIMEOUT_S = 30.0
#: Deadline for the TLS handshake, and again for the request line plus headers (slowloris:
#: a per-read timeout alone lets a client sending one byte at a time hold a slot forever).
REQUEST_HEAD_DEADLINE_S = 10.0
#: Deadline for reading a request body (at most MAX_BODY_BYTES) once the headers are in.
REQUEST_BODY_DEADLINE_S = 20.0
#: After the answer, unread body bytes are drained (so the close does not reset the answer)
#: for at most this long and this much; then the connection is closed regardless.
DRAIN_DEADLINE_S = 2.0
DRAIN_MAX_BYTES = 4 * MAX_BODY_BYTES
#: Extra pool slots above api_max_children so overload gets a 503 instead of waiting in accept().
POOL_MARGIN = 8
#: How long a graceful stop waits for in-flight requests before closing them.
SHUTDOWN_GRACE_S = 30.0
#: A client that asks for it with "Connection: keep-alive" may send further requests on
#: the same connection (one request per connection otherwise, as the original). A kept
#: connection waits this long for its next request line, and serves at most this many.
KEEPALIVE_IDLE_S = 5.0
KEEPALIVE_MAX_REQUESTS = 1000
#: Connections are kept only while at least this share of the connection pool is free, so
#: idle keep-alive clients never push new callers into a wait in accept().
KEEPALIVE_FREE_SHARE = 0.25
#: Oldest gevent we start with (as requirements.txt).
MIN_GEVENT_VERSION = (24, 2)
OPENAPI_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openapi.json")
LOG_IDENT = "ctrl-exec-api"
JSON_TYPE = "application/json"
NDJSON_TYPE = "application/x-ndjson"
#: environ key of the callable that turns the current request into a WebSocket (see _Handler).
WS_UPGRADE_KEY = "ctrlexec.ws_upgrade"
#: How long a closing WebSocket waits for the client's close frame: closing with unread
#: input makes the kernel send a reset, which can destroy messages the client has not read.
WS_CLOSE_WAIT_S = 2.0
#: WebSocket close status "normal closure" (RFC 6455 §7.4.1).
WS_CLOSE_NORMAL = 1000

HOSTS_DETAIL = "hosts must be a non-empty array of host names"
SCRIPT_DETAIL = "script name required (letters, digits, '_' and '-' only)"
ARGS_DETAIL = "args must be an array of strings"

#: GET / lists these, in this order (seed "GET /").
ENDPOINTS = (
    ("GET", "/health"),
    ("POST", "/ping"),
    ("POST", "/run"),
    ("GET", "/ws/run"),
    ("GET", "/discovery"),
    ("POST", "/discovery"),
    ("GET", "/status/{reqid}"),
    ("GET", "/openapi.json"),
    ("GET", "/openapi-live.json"),
    ("GET", "/docs"),
)

#: Schemas of the live spec that get the registered host names as hosts.items.enum.
LIVE_HOST_SCHEMAS = ("PingRequest", "RunRequest", "DiscoveryRequest")

DOCS_HTML = b"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>ctrl-exec API</title>
<script type="module" src="https://unpkg.com/rapidoc/dist/rapidoc-min.js"></script>
</head>
<body>
<rapi-doc spec-url="/openapi-live.json" render-style="read" show-header="false"></rapi-doc>
</body>
</html>
"""

###############################################################################
# Exceptions ##################################################################
###############################################################################


class ApiError(Exception):
    """An error answered to the client: .status (int) and .body (the JSON dict)."""

    def __init__(self, status: int, body: dict) -> None:
        super().__init__(body.get("detail") or body.get("error") or str(status))
        self.status = status
        self.body = body


class BadRequest(ApiError):
    """400 {"ok":false,"error":"bad request","detail":<what was wrong, what is accepted>}."""

    def __init__(self, detail: str) -> None:
        super().__init__(400, {"ok": False, "error": "bad request", "detail": detail})
        self.detail = detail


class StartError(Exception):
    """The server cannot start; str() is the one line printed before exit 2."""


###############################################################################
# Application #################################################################
###############################################################################


def make_app(cfg: Any, *, store: Any = None, engine: Any = None) -> bottle.Bottle:
    """Build a fresh WSGI application with every route of SPEC §6.

    Args: cfg (config.Config); store (store.Store, default open_store(cfg)); engine
        (engine.Engine, default Engine.from_config(cfg)).
    Returns: a bottle.Bottle (WSGI callable) with JSON error handlers; no routes are
        registered on bottle's default app.
    Raises: store.StoreError when the state directories cannot be created; the engine's
        errors when the dispatcher certificate cannot be loaded.
    """
    if store is None:
        store = store_mod.open_store(cfg)
    if engine is None:
        engine = Engine.from_config(cfg)
    app = _ApiApp(cfg)
    api = _Handlers(cfg, store, engine)
    app.route("/", "GET", _endpoint(api.index))
    app.route("/health", "GET", _endpoint(api.health))
    app.route("/ping", "POST", _endpoint(api.ping))
    app.route("/run", "POST", _endpoint(api.run))
    app.route("/ws/run", "GET", _endpoint(api.ws_run))
    app.route("/discovery", "GET", _endpoint(api.discovery))
    app.route("/discovery", "POST", _endpoint(api.discovery))
    # A reqid outside STATUS_REQID_RE matches no route: 404 before it can become a path.
    app.route("/status/<reqid:re:%s>" % STATUS_REQID_RE.pattern, "GET", _endpoint(api.status))
    app.route("/openapi.json", "GET", _endpoint(api.openapi))
    app.route("/openapi-live.json", "GET", _endpoint(api.openapi_live))
    app.route("/docs", "GET", _endpoint(api.docs))
    for code in (400, 404, 405, 413, 500):
        app.error(code)(_bottle_error)
    app.handlers = api
    return app


###############################################################################
# Request validation (pure; SPEC §6 order) ####################################
###############################################################################

#: Parsed-body sentinels: no body at all / a body that is not valid JSON.
NO_BODY = object()
INVALID_JSON = object()


def parse_body(raw: bytes) -> Any:
    """Decode a request body: NO_BODY when empty, INVALID_JSON when not JSON, else the value."""
    if not raw or not raw.strip():
        return NO_BODY
    try:
        return ujson.loads(raw)
    except (ValueError, OverflowError, RecursionError):
        return INVALID_JSON


def validate_run(body: Any, *, max_hosts: int) -> dict:
    """Validate a POST /run body.

    Returns: {"hosts": [..deduplicated, in order..], "script", "args": [...], "username",
        "token", "async": bool, "stream": bool, "timeout": int | None}.
    Raises: BadRequest(detail) with the SPEC's exact detail text, checks in SPEC order.
    """
    obj = _require_object(body)
    hosts = _validate_hosts(obj, max_hosts=max_hosts)
    script = obj.get("script")
    if not isinstance(script, str) or not wire.SCRIPT_NAME_RE.fullmatch(script):
        raise BadRequest(SCRIPT_DETAIL)
    args = obj.get("args")
    if args is None:
        args = []
    if (not isinstance(args, list) or len(args) > MAX_ARGS
            or not all(_is_text(a) and "\x00" not in a for a in args)):
        # NUL cannot cross execve; a lone surrogate (JSON "\ud800") cannot be UTF-8 encoded.
        raise BadRequest(ARGS_DETAIL)
    username, token = _validate_credentials(obj)
    flags = {}
    for field in ("async", "stream"):
        value = obj.get(field, False)
        if field in obj and not isinstance(value, bool):
            raise BadRequest("%s must be a boolean" % field)
        flags[field] = value
    timeout = obj.get("timeout")
    if isinstance(timeout, float) and timeout.is_integer():
        # JSON Schema's "integer" includes 30.0; the agents get the int.
        timeout = int(timeout)
    if "timeout" in obj and (isinstance(timeout, bool) or not isinstance(timeout, int)
                             or timeout <= 0):
        raise BadRequest("timeout must be a positive integer")
    if flags["async"] and flags["stream"]:
        raise BadRequest("async and stream cannot be combined (use one of them)")
    return {"hosts": hosts, "script": script, "args": list(args), "username": username,
            "token": token, "async": flags["async"], "stream": flags["stream"],
            "timeout": timeout}


def validate_ping(body: Any, *, max_hosts: int) -> dict:
    """Validate a POST /ping body.

    Returns: {"hosts": [...], "username": str, "token": str}.
    Raises: BadRequest(detail).
    """
    obj = _require_object(body)
    hosts = _validate_hosts(obj, max_hosts=max_hosts)
    username, token = _validate_credentials(obj)
    return {"hosts": hosts, "username": username, "token": token}


def validate_discovery(body: Any, *, max_hosts: int) -> dict:
    """Validate an optional POST /discovery body (absent body or hosts = every agent).

    Returns: {"hosts": [...] | None, "username": str, "token": str}.
    Raises: BadRequest(detail): invalid JSON, not an object, hosts [] or not an array.
    """
    if body is NO_BODY:
        return {"hosts": None, "username": "", "token": ""}
    obj = _require_object(body)
    hosts = _validate_hosts(obj, max_hosts=max_hosts) if "hosts" in obj else None
    username, token = _validate_credentials(obj)
    return {"hosts": hosts, "username": username, "token": token}


# --- private ---


def _require_object(body: Any) -> dict:
    """The body must be present and a JSON object."""
    if body is NO_BODY:
        raise BadRequest("request body required")
    if body is INVALID_JSON or not isinstance(body, dict):
        raise BadRequest("invalid JSON body")
    return body


def _validate_hosts(obj: dict, *, max_hosts: int) -> list:
    """Non-empty array of non-empty strings; duplicates collapsed (order kept) before counting."""
    hosts = obj.get("hosts")
    if (not isinstance(hosts, list) or not hosts
            or not all(isinstance(h, str) and h for h in hosts)):
        raise BadRequest(HOSTS_DETAIL)
    hosts = list(dict.fromkeys(hosts))
    if len(hosts) > max_hosts:
        raise BadRequest("too many hosts (max %d)" % max_hosts)
    return hosts


def _validate_credentials(obj: dict) -> tuple:
    """username / token: strings when present."""
    values = []
    for field in ("username", "token"):
        value = obj.get(field, "")
        if field in obj and not _is_text(value):
            raise BadRequest("%s must be a string" % field)
        values.append(value)
    return tuple(values)


def _is_text(value: Any) -> bool:
    """A str that encodes as UTF-8 (JSON allows lone surrogates like "\ud800"; the wire cannot)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


###############################################################################
# Routes ######################################################################
###############################################################################


class _Handlers:
    """The endpoint callbacks; each returns a bottle.HTTPResponse or raises ApiError."""

    def __init__(self, cfg: Any, store: Any, engine: Any) -> None:
        self.cfg = cfg
        self.store = store
        self.engine = engine

    # --- informational ---

    def index(self) -> bottle.HTTPResponse:
        """GET /: {name, version, spec, live_spec, endpoints:[{method, path}]}."""
        return _json(200, {
            "name": "ctrl-exec-api",
            "version": wire.VERSION,
            "spec": "/openapi.json",
            "live_spec": "/openapi-live.json",
            "endpoints": [{"method": m, "path": p} for m, p in ENDPOINTS],
        })

    def health(self) -> bottle.HTTPResponse:
        """GET /health: {"ok": true, "version"}."""
        return _json(200, {"ok": True, "version": wire.VERSION})

    def docs(self) -> bottle.HTTPResponse:
        """GET /docs: the static RapiDoc page pointing at the live spec."""
        return bottle.HTTPResponse(DOCS_HTML, 200, {"Content-Type": "text/html; charset=utf-8"})

    def openapi(self) -> bottle.HTTPResponse:
        """GET /openapi.json: the static spec file, verbatim."""
        return bottle.HTTPResponse(_read_spec_bytes(), 200, {"Content-Type": JSON_TYPE})

    def openapi_live(self) -> bottle.HTTPResponse:
        """GET /openapi-live.json: the seed's seven steps, in memory only."""
        try:
            spec = ujson.loads(_read_spec_bytes())                  # 1. base spec from disk
        except ValueError:
            raise ApiError(500, _error_body("internal error",
                                            "openapi.json beside ctrlexec_api.py is not valid JSON"))
        names = sorted(self.store.registry.names())                # 2. registry, no network
        scripts = set()
        if names:                                                   # 3. live capabilities
            targets = self.store.registry.resolve(names)
            for row in self.engine.capabilities_all(targets):
                if row.get("status") != "ok":
                    continue                                        # unreachable: omitted
                for entry in row.get("scripts") or []:
                    name = entry.get("name") if isinstance(entry, dict) else None
                    if isinstance(name, str) and name:
                        scripts.add(name)
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        for schema_name in LIVE_HOST_SCHEMAS:                       # 4. host enums
            hosts = (schemas.get(schema_name) or {}).get("properties", {}).get("hosts")
            if isinstance(hosts, dict):
                items = hosts.setdefault("items", {"type": "string"})
                items["enum"] = list(names)
        script_prop = (schemas.get("RunRequest") or {}).get("properties", {}).get("script")
        if isinstance(script_prop, dict):                           # 5. script enum
            script_prop["enum"] = sorted(scripts)
        info = spec.setdefault("info", {})                          # 6. version stamp
        base_version = str(info.get("version") or wire.VERSION).split("+", 1)[0]
        info["version"] = "%s+%d" % (base_version, int(time.time()))
        return _json(200, spec)                                     # 7. served from memory

    # --- operations ---

    def ping(self) -> bottle.HTTPResponse:
        """POST /ping: 200 {"ok": true, "reqid", "results": [per-host ping rows]}."""
        req = validate_ping(_body(), max_hosts=self.cfg.max_hosts)
        token = req["token"] or _bearer_token()
        self._authorise("ping", hosts=req["hosts"], username=req["username"], token=token)
        reqid = wire.new_reqid()
        targets = self.store.registry.resolve(req["hosts"])
        results = self.engine.ping_all(targets, reqid=reqid)
        return _json(200, {"ok": True, "reqid": reqid, "results": results})

    def discovery(self) -> bottle.HTTPResponse:
        """GET/POST /discovery: 200 {"ok": true, "hosts": {name: capabilities row}}."""
        if bottle.request.method == "POST":
            req = validate_discovery(_body(), max_hosts=self.cfg.max_hosts)
        else:
            req = {"hosts": None, "username": "", "token": ""}
        token = req["token"] or _bearer_token()
        entries = req["hosts"]
        self._authorise("ping", hosts=entries or (), username=req["username"], token=token)
        if entries is None:
            entries = self.store.registry.names()
        if not entries:
            return _json(200, {"ok": True, "hosts": {}})
        targets = self.store.registry.resolve(entries)
        return _json(200, {"ok": True,
                           "hosts": self.engine.discovery_all(targets, self.store.registry)})

    def run(self) -> bottle.HTTPResponse:
        """POST /run: sync 200, async 202, stream 200 NDJSON; 409 on a lock conflict."""
        req, targets, held, dispatch, submitter = self._begin_run(_body())
        reqid = dispatch["reqid"]
        if req["stream"]:
            return self._run_stream(req, targets, held, dispatch, submitter)
        if req["async"]:
            self._track_async(req, reqid, held, submitter)
        try:
            results = self.engine.dispatch_all(targets, async_=req["async"], **dispatch)
        finally:
            # Released before the response is built: back-to-back runs never see a 409.
            held.release()
        if req["async"]:
            self._save(store_mod.async_record(reqid=reqid, script=req["script"],
                                              hosts=req["hosts"], results=results,
                                              submitter=submitter))
            return _json(202, {"ok": True, "async": True, "reqid": reqid, "results": results})
        self._save(_sync_record(reqid, req, results, submitter))
        _log_run_done(reqid, req["script"], results)
        return _json(200, {"ok": True, "reqid": reqid, "results": results})

    def ws_run(self) -> bottle.HTTPResponse:
        """GET /ws/run: WebSocket; the first message is a run request, then the stream's events.

        The 503 slot and the `api` gate (token from the Authorization header) have run
        before the upgrade, as for every request. After the 101, every answer is a
        message: the events of the NDJSON stream one per message, or one error message
        (the usual error body plus "event":"error" and "status": <HTTP code>); then close.
        Raises: ApiError 426 when the request is not a valid WebSocket handshake.
        """
        upgrade = bottle.request.environ.get(WS_UPGRADE_KEY)
        problem = _ws_handshake_problem(bottle.request.environ)
        if upgrade is None or problem:
            raise ApiError(426, _error_body(
                "upgrade required", "GET /ws/run is a WebSocket endpoint: %s (send an HTTP/1.1 "
                "handshake with Upgrade: websocket, Connection: Upgrade, "
                "Sec-WebSocket-Version: 13 and a Sec-WebSocket-Key of 16 base64 bytes)"
                % (problem or "this server cannot upgrade the connection")))
        try:
            session = _WsSession(upgrade())
        except OSError:
            return bottle.HTTPResponse(b"", 101)   # the client left during the handshake
        try:
            body = session.receive_request()
            if body is not _WsSession.GONE:
                self._ws_stream(session, body)
        except ApiError as exc:
            session.send(dict(exc.body, event="error", status=exc.status))
        except Exception as exc:  # noqa: BLE001 - after the 101 an error is a message, logged
            wire.log_action("err", "api-error", path=bottle.request.path,
                            error="%s: %s" % (type(exc).__name__, exc))
            session.send(dict(_error_body("internal error",
                                          "unexpected server error; see the server log"),
                              event="error", status=500))
        finally:
            session.close()
        # Never sent: the connection is the WebSocket's now (_ApiApp drops this answer).
        return bottle.HTTPResponse(b"", 101)

    def status(self, reqid: str) -> bottle.HTTPResponse:
        """GET /status/<reqid>: the stored record (aggregated for async runs), no submitter."""
        self.purge_runs()
        try:
            record = self.store.runs.load(reqid)
        except store_mod.CorruptRecord as exc:
            wire.log_action("err", "run-store-fail", reqid=reqid, error=str(exc))
            raise ApiError(500, _error_body(
                "internal error", "the stored record for reqid %s is unreadable" % reqid))
        if record is None:
            raise ApiError(404, _error_body("not found", "no result for reqid %s" % reqid))
        submitter = record.get("submitter") if isinstance(record.get("submitter"), dict) else None
        # Authorise before any agent is contacted for aggregation.
        self._authorise("status", reqid=reqid, submitter=submitter, token=_bearer_token())
        if record.get("mode") == "async" and not record.get("complete"):
            record = self.engine.refresh_async(record, self.store.registry)
            self._save(record)
        return _json(200, store_mod.status_view(record))

    # --- private ---

    def _authorise(self, action: str, **context: Any) -> None:
        """Run auth.check for the current request; raise the 403 ApiError on denial."""
        decision = auth.check(self.cfg, action=action, source_ip=_peer(), caller="api",
                              **context)
        if not decision.allowed:
            raise ApiError(403, _denial_body(self.cfg, decision))

    def _begin_run(self, body: Any, *, websocket: bool = False) -> tuple:
        """Validate a run request, authorise it (action run), take its locks, log it.

        Returns: (req as validate_run, targets, the held locks, dispatch = the keyword
            arguments of engine.dispatch_all, submitter {"username", "source_ip"}).
        Raises: BadRequest (400), ApiError 403 (denied) or 409 (locked; nothing held).
        """
        req = validate_run(body, max_hosts=self.cfg.max_hosts)
        if websocket:
            if req["async"]:
                raise BadRequest("async is not available on /ws/run (the socket streams the "
                                 "run; use POST /run with \"async\": true instead)")
            req["stream"] = True
        token = req["token"] or _bearer_token()
        source_ip = _peer()
        self._authorise("run", script=req["script"], hosts=req["hosts"], args=req["args"],
                        username=req["username"], token=token)
        targets = self.store.registry.resolve(req["hosts"])
        # Locks key on the registry name, so "web-01" and "web-01:7450" conflict;
        # unregistered names are never dialled and need no lock.
        names = list(dict.fromkeys(t.name for t in targets if t.address is not None))
        try:
            held = self.store.locks.hold(names, req["script"])
        except store_mod.LockConflict as exc:
            raise ApiError(409, {"ok": False, "error": "locked", "code": 4,
                                 "conflicts": list(exc.conflicts)})
        reqid = wire.new_reqid()
        submitter = {"username": req["username"], "source_ip": source_ip}
        mode = "async" if req["async"] else "sync"
        if req["stream"]:
            mode = "websocket" if websocket else "stream"
        wire.log_action("info", "dispatch", script=req["script"], hosts=len(req["hosts"]),
                        reqid=reqid, mode=mode, user=req["username"] or "(none)",
                        peer=source_ip)
        dispatch = dict(script=req["script"], args=req["args"], reqid=reqid,
                        username=req["username"], token=token, timeout=req["timeout"])
        return req, targets, held, dispatch, submitter

    def _run_stream(self, req: dict, targets: list, held: Any, dispatch: dict,
                    submitter: dict) -> bottle.HTTPResponse:
        """NDJSON: start, engine events (stdout/stderr/exit per host), then done."""
        feed = self._start_streamed(req, targets, held, dispatch, submitter)

        def lines() -> Iterable[bytes]:
            try:
                for event in feed:
                    yield _json_line(event)
            finally:
                # Also reached when the client hung up (the server closes this generator).
                feed.detach()

        return bottle.HTTPResponse(lines(), 200, {"Content-Type": NDJSON_TYPE,
                                                  "Cache-Control": "no-cache"})

    def _ws_stream(self, session: "_WsSession", body: Any) -> None:
        """/ws/run after the first message: the same events as _run_stream, one per message."""
        req, targets, held, dispatch, submitter = self._begin_run(body, websocket=True)
        feed = self._start_streamed(req, targets, held, dispatch, submitter)
        try:
            for event in feed:
                if not session.send(event):
                    break                   # the client left; the run goes on
        finally:
            feed.detach()

    def _start_streamed(self, req: dict, targets: list, held: Any, dispatch: dict,
                        submitter: dict) -> "_RunFeed":
        """Start a streamed run in its own greenlet; its events come out of the feed.

        Events: {"event":"start","reqid","script","hosts"}, then the engine's
        stdout / stderr / exit events, then {"event":"done","ok":true,"reqid","results"}
        (the sync body, flat) or {"event":"error","ok":false,"reqid","error","detail"}.
        """
        reqid = dispatch["reqid"]
        feed = _RunFeed()
        feed.put({"event": "start", "reqid": reqid, "script": req["script"],
                  "hosts": req["hosts"]})

        def work() -> None:
            # Owns the locks and the record, so a client that hangs up mid-stream still
            # gets its run stored and its locks released (both before "done" is sent).
            try:
                try:
                    results = self.engine.dispatch_all(targets, on_event=feed.put, **dispatch)
                finally:
                    held.release()
                self._save(_sync_record(reqid, req, results, submitter))
                _log_run_done(reqid, req["script"], results)
                feed.put({"event": "done", "ok": True, "reqid": reqid, "results": results})
            except Exception as exc:  # noqa: BLE001 - reported as an event, logged
                wire.log_action("err", "run-stream-fail", reqid=reqid,
                                error=type(exc).__name__)
                feed.put({"event": "error", "ok": False, "reqid": reqid,
                          "error": "internal error",
                          "detail": "the run failed on the server; see the server log"})
            finally:
                feed.end()

        feed.worker = gevent.spawn(work)
        return feed

    def _track_async(self, req: dict, reqid: str, held: Any, submitter: dict) -> None:
        """Store an async run's record before anything is dispatched.

        Its results exist only on the agents until /status fetches them, so a run
        store that cannot be written must stop the run here: 500, nothing dispatched.
        Hosts start as "accepted"; one never reached reads "expired" on /status.
        """
        rows = [{"host": host, "script": req["script"], "status": "accepted", "reqid": reqid}
                for host in req["hosts"]]
        try:
            _off_hub(self.store.runs.save, store_mod.async_record(
                reqid=reqid, script=req["script"], hosts=req["hosts"], results=rows,
                submitter=submitter))
        except store_mod.StoreError as exc:
            held.release()
            wire.log_action("err", "run-store-fail", reqid=reqid, error=str(exc))
            raise ApiError(500, _error_body(
                "internal error", "the run store cannot be written, so this async run could "
                "not be tracked; nothing was dispatched (check state_dir permissions)"))

    def _save(self, record: dict) -> None:
        """Store a run record; a failed write is logged, never fatal (reference §5.4)."""
        try:
            _off_hub(self.store.runs.save, record)
        except store_mod.StoreError as exc:
            wire.log_action("err", "run-store-fail", reqid=record.get("reqid", ""),
                            error=str(exc))

    def purge_runs(self) -> None:
        """Delete expired run records (lazily on /status, and by the server's purger)."""
        try:
            self.store.runs.purge()
        except store_mod.StoreError as exc:
            wire.log_action("err", "run-store-fail", error=str(exc))



# --- private ---


class _RunFeed:
    """The events of one streamed run, handed from its worker greenlet to the client's.

    Once the client has gone (detach), events are dropped instead of queued, and the
    client's greenlet waits for the run to end: the request keeps its api_max_children
    slot, so hanging up cannot be used to start more runs than the server allows.
    """

    _END = object()

    def __init__(self) -> None:
        self._queue: gevent.queue.Queue = gevent.queue.Queue()
        self._listening = True
        #: The greenlet running the dispatch (set by the starter).
        self.worker: Optional[gevent.Greenlet] = None

    def put(self, event: dict) -> None:
        """Queue one event for the client (dropped once it has gone)."""
        if self._listening:
            self._queue.put(event)

    def end(self) -> None:
        """No more events."""
        self._queue.put(self._END)

    def __iter__(self):
        while True:
            event = self._queue.get()
            if event is self._END:
                return
            yield event

    def detach(self) -> None:
        """The client is done with the feed: drop later events, wait for the run to finish."""
        self._listening = False
        if self.worker is not None:
            self.worker.join()


class _WsSession:
    """One /ws/run connection: a bounded first message, deadlined writes, a lingering close.

    gevent-websocket bounds neither a message's size nor any I/O in time. The handler
    lifts the socket timeout after the 101 (a run may print nothing for hours), so every
    read and write here has its own gevent deadline, and the first message is cut off at
    MAX_BODY_BYTES. After it, a reader greenlet answers pings and notices the client
    leaving; later messages are read and ignored (the total stays within MAX_BODY_BYTES).
    """

    #: receive_request(): the client left (or stayed silent) before sending its request.
    GONE = object()

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.gone = False
        self._budget = MAX_BODY_BYTES
        self._over = False
        self._reader: Optional[gevent.Greenlet] = None
        self._write_lock = gevent.lock.Semaphore()
        read, write = ws.raw_read, ws.raw_write
        ws.raw_read = lambda size: self._bounded_read(read, size)
        ws.raw_write = lambda data: self._serialised_write(write, data)

    def receive_request(self) -> Any:
        """The client's first message, parsed as parse_body does; GONE if none came.

        Raises: ApiError 413 (over MAX_BODY_BYTES); BadRequest for a text message that
            is not UTF-8 ("invalid JSON body").
        """
        state = {"message": None, "done": False, "bad_text": False}
        with gevent.Timeout(CLIENT_IO_TIMEOUT_S, False):
            try:
                state["message"] = self.ws.read_message()
            except UnicodeError:
                state["bad_text"] = True
            except OSError:                 # WebSocketError, ProtocolError, reset
                pass
            state["done"] = True
        if self._over:
            raise ApiError(413, _error_body("payload too large",
                                            "body exceeds %d bytes" % MAX_BODY_BYTES))
        if state["bad_text"]:
            raise BadRequest("invalid JSON body")
        if not state["done"]:
            return self.GONE                # silent too long: close() says goodbye
        message = state["message"]
        if message is None or self.ws.closed:
            self.gone = True                # closed, reset or broken framing
            return self.GONE
        self._reader = gevent.spawn(self._read_rest)
        raw = message.encode("utf-8") if isinstance(message, str) else bytes(message)
        return parse_body(raw)

    def send(self, message: dict) -> bool:
        """Send one JSON text message; False (and stop sending) once the client has gone."""
        if self.gone or self.ws.closed:
            self.gone = True
            return False
        sent = False
        with gevent.Timeout(CLIENT_IO_TIMEOUT_S, False):
            try:
                self.ws.send(_json_bytes(message).decode("utf-8"))
                sent = True
            except OSError:                 # WebSocketError: the socket is dead
                pass
        if not sent:
            self.gone = True
        return sent

    def close(self) -> None:
        """Close frame, then read (bounded) until the client closes, so no reset follows."""
        if not self.ws.closed and not self.gone:   # gone: a write failed or timed out
            with gevent.Timeout(CLIENT_IO_TIMEOUT_S, False):
                try:
                    # gevent-websocket's close() leaves out the status code; send 1000.
                    self.ws.send_frame(struct.pack("!H", WS_CLOSE_NORMAL), self.ws.OPCODE_CLOSE)
                except OSError:
                    pass
        self.ws.closed = True
        with gevent.Timeout(WS_CLOSE_WAIT_S, False):
            if self._reader is not None:
                self._reader.join()
            sock = getattr(self.ws.handler, "socket", None)
            try:
                while sock is not None and sock.recv(65536):
                    pass                    # e.g. the rest of a message refused with 413
            except OSError:
                pass
        if self._reader is not None:
            self._reader.kill(block=True, timeout=1.0)

    def _read_rest(self) -> None:
        """Reader greenlet: pings get pongs (inside read_message), a close or EOF ends it."""
        while not self.ws.closed:
            try:
                if self.ws.read_message() is None:
                    break
            except (OSError, UnicodeError):
                break
        if not self._over:
            self.gone = True

    def _bounded_read(self, read: Callable, size: int) -> bytes:
        # gevent-websocket reads a frame's payload in one call of the announced size.
        if size > self._budget:
            self._over = True
            raise OSError("WebSocket input over %d bytes" % MAX_BODY_BYTES)
        self._budget -= size
        return read(size)

    def _serialised_write(self, write: Callable, data: bytes) -> Any:
        # The reader's pongs and the events share the socket: one frame at a time.
        with self._write_lock:
            return write(data)


def _ws_handshake_problem(environ: dict) -> str:
    """What makes this request no valid WebSocket handshake, or "" when it is one."""
    if environ.get("REQUEST_METHOD") != "GET" or environ.get("SERVER_PROTOCOL") != "HTTP/1.1":
        return "the handshake must be an HTTP/1.1 GET request"
    if (environ.get("HTTP_UPGRADE") or "").strip().lower() != "websocket":
        return "the Upgrade: websocket header is missing"
    if "upgrade" not in (environ.get("HTTP_CONNECTION") or "").lower():
        return "the Connection: Upgrade header is missing"
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION") not in WebSocketHandler.SUPPORTED_VERSIONS:
        return "Sec-WebSocket-Version is missing or unsupported"
    try:
        key = base64.b64decode((environ.get("HTTP_SEC_WEBSOCKET_KEY") or "").strip(),
                               validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 16:
        return "Sec-WebSocket-Key is missing or not 16 base64-encoded bytes"
    return ""


def _off_hub(func: Callable, *args: Any) -> Any:
    """Run blocking file I/O (a durable write: fsync) in gevent's thread pool.

    File I/O is not cooperative; done on the hub, each fsync would stall every
    request in flight for its duration.
    """
    return gevent.get_hub().threadpool.apply(func, args)


def _sync_record(reqid: str, req: dict, results: list, submitter: dict) -> dict:
    """The stored shape of a finished sync (or streamed) run (store.sync_record)."""
    return store_mod.sync_record(reqid=reqid, script=req["script"], hosts=req["hosts"],
                                 results=results, submitter=submitter)


def _log_run_done(reqid: str, script: str, results: list) -> None:
    """One line per finished run, counted from the rows (exit 0 = ok)."""
    ok = sum(1 for row in results if isinstance(row, dict) and row.get("exit") == 0)
    wire.log_action("info", "run-done", reqid=reqid, script=script, hosts=len(results),
                    ok=ok, failed=len(results) - ok)


def _denial_body(cfg: Any, decision: Any) -> dict:
    """403 body: {ok:false, error, code[, detail]} or the generic form."""
    if getattr(cfg, "auth_deny_generic", False):
        return {"ok": False, "error": "forbidden"}
    body = {"ok": False, "error": decision.error, "code": decision.code}
    if decision.detail:
        body["detail"] = decision.detail
    return body


def _error_body(error: str, detail: str) -> dict:
    """{"ok": false, "error", "detail"}."""
    return {"ok": False, "error": error, "detail": detail}


def _read_spec_bytes() -> bytes:
    """The static openapi.json beside this module."""
    try:
        with open(OPENAPI_PATH, "rb") as fh:
            return fh.read()
    except OSError:
        raise ApiError(404, _error_body(
            "not found", "openapi.json is not installed beside ctrlexec_api.py"))


def _body() -> Any:
    """The parsed body of the current request (read once by _ApiApp under the size limit)."""
    return bottle.request.environ.get("ctrlexec.body", NO_BODY)


def _peer() -> str:
    """The client's IP address."""
    return bottle.request.environ.get("REMOTE_ADDR") or ""


def _bearer_token(environ: Optional[dict] = None) -> str:
    """Token from `Authorization: Bearer <token>`, else ""."""
    env = environ if environ is not None else bottle.request.environ
    value = env.get("HTTP_AUTHORIZATION") or ""
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return ""
    return token.strip()


def _json_bytes(obj: Any) -> bytes:
    """Compact JSON; lone surrogates (from \\ud800 escapes in input) are kept as escapes."""
    try:
        return ujson.dumps(obj, ensure_ascii=False, escape_forward_slashes=False).encode("utf-8")
    except UnicodeEncodeError:
        return ujson.dumps(obj, ensure_ascii=True, escape_forward_slashes=False).encode("ascii")


def _json_line(obj: Any) -> bytes:
    """One NDJSON line."""
    return _json_bytes(obj) + b"\n"


def _json(status: int, body: Any) -> bottle.HTTPResponse:
    """A JSON HTTPResponse."""
    return bottle.HTTPResponse(_json_bytes(body), status, {"Content-Type": JSON_TYPE})


def _endpoint(func: Callable) -> Callable:
    """Route wrapper: ApiError -> its JSON body; any other Exception -> logged 500."""

    def wrapper(*args: Any, **kwargs: Any) -> bottle.HTTPResponse:
        try:
            return func(*args, **kwargs)
        except ApiError as exc:
            return _json(exc.status, exc.body)
        except bottle.HTTPResponse:
            raise
        except Exception as exc:  # noqa: BLE001 - the one boundary: log, answer 500
            wire.log_action("err", "api-error", path=bottle.request.path,
                            error="%s: %s" % (type(exc).__name__, exc))
            return _json(500, _error_body("internal error",
                                          "unexpected server error; see the server log"))

    wrapper.__name__ = getattr(func, "__name__", "endpoint")
    return wrapper


def _bottle_error(err: bottle.HTTPError) -> bytes:
    """JSON for bottle's own errors; 404 and 405 both answer 404 'no route for …'."""
    environ = bottle.request.environ
    response = bottle.response
    response.content_type = JSON_TYPE
    if err.status_code in (404, 405):
        response.status = 404
        if "Allow" in response:
            del response["Allow"]
        detail = "no route for %s %s" % (environ.get("REQUEST_METHOD", ""),
                                         environ.get("PATH_INFO", ""))
        return _json_bytes(_error_body("not found", detail))
    if err.status_code == 413:
        return _json_bytes(_error_body("payload too large",
                                       "body exceeds %d bytes" % MAX_BODY_BYTES))
    if err.status_code == 400:
        return _json_bytes(_error_body("bad request", "the request could not be parsed"))
    if err.exception is not None:
        wire.log_action("err", "api-error", path=environ.get("PATH_INFO", ""),
                        error="%s: %s" % (type(err.exception).__name__, err.exception))
    response.status = 500
    return _json_bytes(_error_body("internal error",
                                   "unexpected server error; see the server log"))


class _ApiApp(bottle.Bottle):
    """bottle.Bottle plus the steps every request takes before routing.

    Order: concurrency slot (503) -> body read under 1 MiB (413) -> the `api` auth
    gate (403) -> bottle routing. Logs one api-request line when the response ends.
    """

    def __init__(self, cfg: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cfg = cfg
        self.slots = gevent.lock.BoundedSemaphore(max(1, int(cfg.api_max_children)))

    def wsgi(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        started = time.monotonic()
        seen = {"status": 0}

        def start(status: str, headers: list, exc_info: Any = None) -> Any:
            if environ.get("wsgi.websocket") is not None:
                # /ws/run answered 101 itself; the connection belongs to the WebSocket.
                seen["status"] = 101
                return lambda data: None
            seen["status"] = int(status.split(" ", 1)[0])
            return start_response(status, headers, exc_info)

        def finish() -> None:
            wire.log_action("info", "api-request", method=environ.get("REQUEST_METHOD", ""),
                            path=environ.get("PATH_INFO", ""),
                            peer=environ.get("REMOTE_ADDR", ""), status=seen["status"],
                            ms=int((time.monotonic() - started) * 1000))

        if not self.slots.acquire(blocking=False):
            wire.log_action("warning", "api-overload", peer=environ.get("REMOTE_ADDR", ""),
                            limit=self.cfg.api_max_children)
            out = _plain_response(start, 503, _error_body(
                "service unavailable", "too many concurrent requests"))
            finish()
            return out
        try:
            try:
                out = self._gate(environ, start)
            except Exception as exc:  # noqa: BLE001 - answer JSON, never a bare 500 page
                wire.log_action("err", "api-error", path=environ.get("PATH_INFO", ""),
                                error="%s: %s" % (type(exc).__name__, exc))
                out = _plain_response(start, 500, _error_body(
                    "internal error", "unexpected server error; see the server log"))
            if out is None:
                out = super().wsgi(environ, start)
        except BaseException:
            self.slots.release()
            finish()
            raise
        return _Closing(out, [self.slots.release, finish])

    def _gate(self, environ: dict, start: Callable) -> Optional[list]:
        """Read the body and pass the `api` gate; a list is an early answer."""
        try:
            raw = _read_body(environ)
        except _TooLarge:
            return _plain_response(start, 413, _error_body(
                "payload too large", "body exceeds %d bytes" % MAX_BODY_BYTES))
        except (OSError, ValueError) as exc:
            wire.log_action("warning", "api-read-fail", peer=environ.get("REMOTE_ADDR", ""),
                            error=type(exc).__name__)
            return _plain_response(start, 400, _error_body(
                "bad request", "the request body could not be read"))
        body = parse_body(raw)
        environ["ctrlexec.body"] = body
        token = ""
        username = ""
        if isinstance(body, dict):
            token = body.get("token") if isinstance(body.get("token"), str) else ""
            username = body.get("username") if isinstance(body.get("username"), str) else ""
        token = token or _bearer_token(environ)
        decision = auth.check(self.cfg, action="api", source_ip=environ.get("REMOTE_ADDR", ""),
                              caller="api", username=username, token=token)
        if not decision.allowed:
            return _plain_response(start, 403, _denial_body(self.cfg, decision))
        return None


class _TooLarge(Exception):
    """The request body is over MAX_BODY_BYTES."""


class _ClientFault(ValueError):
    """A client's request cannot be read: too slow (TLS handshake, head or body past its
    deadline) or a head pywsgi cannot parse. A ValueError is pywsgi's "invalid client
    request": a 400 and one _ErrorLog line, never a traceback."""


def _address_ip(address: Any) -> str:
    """The IP of a (host, port) client address, for log lines."""
    return str(address[0]) if isinstance(address, tuple) and address else str(address)


def _read_body(environ: dict) -> bytes:
    """Read the request body ourselves, never more than MAX_BODY_BYTES + 1 bytes."""
    length_text = (environ.get("CONTENT_LENGTH") or "").strip()
    stream = environ.get("wsgi.input")
    if stream is None:
        return b""
    if length_text:
        if not length_text.isdigit():
            raise ValueError("bad Content-Length")
        length = int(length_text)
        if length > MAX_BODY_BYTES:
            raise _TooLarge()
        limit = length
    elif "chunked" in (environ.get("HTTP_TRANSFER_ENCODING") or "").lower():
        limit = MAX_BODY_BYTES + 1
    else:
        return b""
    chunks = []
    got = 0
    with gevent.Timeout(REQUEST_BODY_DEADLINE_S, _ClientFault(
            "request body not received within %gs" % REQUEST_BODY_DEADLINE_S)):
        while got < limit:
            chunk = stream.read(min(65536, limit - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    if got > MAX_BODY_BYTES:
        raise _TooLarge()
    return b"".join(chunks)


def _raw_error_response(status: int) -> bytes:
    """A whole HTTP response (head + JSON body) for a request that never reached the app."""
    if status == 414:
        body = _error_body("request line too long",
                           "the request line exceeds %d bytes" % pywsgi.MAX_REQUEST_LINE)
    else:
        body = _error_body("bad request", "the request could not be parsed")
    data = _json_bytes(body)
    head = ("HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            "Connection: close\r\n\r\n" % (status, bottle.HTTP_CODES.get(status, ""),
                                            JSON_TYPE, len(data)))
    return head.encode("latin-1") + data


def _plain_response(start: Callable, status: int, body: dict) -> list:
    """Answer outside bottle (503 / 413 / 403 / 400 before routing)."""
    data = _json_bytes(body)
    start("%d %s" % (status, bottle.HTTP_CODES.get(status, "")),
          [("Content-Type", JSON_TYPE), ("Content-Length", str(len(data)))])
    return [data]


class _Closing:
    """Iterable wrapper running callbacks once when the server closes the response."""

    def __init__(self, inner: Iterable[bytes], callbacks: list) -> None:
        self._inner = inner
        self._callbacks = callbacks

    def __iter__(self):
        return iter(self._inner)

    def close(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        try:
            close = getattr(self._inner, "close", None)
            if close is not None:
                close()
        finally:
            for callback in callbacks:
                callback()


###############################################################################
# Server ######################################################################
###############################################################################


class _Handler(WebSocketHandler):
    """One request per connection (like the HTTP/1.0 original): frees pool slots.

    A WebSocket handler that never upgrades on its own: gevent-websocket's would upgrade
    any request asking for it, before the 503 slot and the `api` gate. Here a request is
    plain WSGI, and only the /ws/run route upgrades, through environ[WS_UPGRADE_KEY].
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
        # A run may stay silent for hours: _WsSession puts a deadline on each read and write.
        self.socket.settimeout(None)
        return self.websocket

    def log_request(self) -> None:
        # gevent-websocket's override logs through the logging module; ACTION=api-request
        # (written by _ApiApp) is the one request log line.
        return None

    def handle_one_request(self) -> Any:
        result = super().handle_one_request()
        if isinstance(result, tuple):
            # pywsgi's own answer to an unparseable request (400, 414) is an empty text
            # body; SPEC §6 wants JSON for every response.
            result = (result[0], _raw_error_response(int(result[0])))
        return result

    def read_requestline(self) -> str:
        if self.served:
            return self._next_requestline()
        self._head_deadline = time.monotonic() + REQUEST_HEAD_DEADLINE_S
        try:
            with gevent.Timeout(REQUEST_HEAD_DEADLINE_S, _ClientFault("request line")):
                return super().read_requestline()
        except _ClientFault:
            wire.log_action("warning", "api-slow-client", peer=_address_ip(self.client_address),
                            stage="request-line", limit=REQUEST_HEAD_DEADLINE_S)
            return ""           # an empty request line: pywsgi closes the connection

    def read_request(self, raw_requestline: str) -> Any:
        left = max(0.01, getattr(self, "_head_deadline", 0.0) - time.monotonic())
        # A ValueError is pywsgi's "invalid client request": 400, logged via _ErrorLog.
        with gevent.Timeout(left, _ClientFault(
                "request headers not received within %gs" % REQUEST_HEAD_DEADLINE_S)):
            try:
                result = super().read_request(raw_requestline)
            except http.client.HTTPException as exc:    # e.g. "got more than 100 headers"
                raise _ClientFault(str(exc)) from None
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


class _ErrorLog:
    """gevent's error_log: its lines go through log_action, never raw to stderr."""

    def write(self, text: str) -> None:
        for line in str(text).splitlines():
            if line.strip():
                wire.log_action("err", "api-server-error", message=line[:300])

    def flush(self) -> None:
        """Nothing buffered."""


class _Server(pywsgi.WSGIServer):
    """WSGIServer whose client sockets get a timeout before the TLS handshake.

    Answers go out without Nagle's delay (TCP_NODELAY): a small answer on a kept
    connection would otherwise wait for the client's delayed ACK.
    """

    handler_class = _Handler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Set by a graceful stop: no new keep-alive, idle connections end.
        self.stopping = False
        #: Greenlets of kept connections waiting for their next request line.
        self.idle_keepalive: set = set()

    def end_idle_keepalive(self) -> None:
        """Graceful stop: no more keep-alive; close connections waiting between requests."""
        self.stopping = True
        for greenlet in list(self.idle_keepalive):
            greenlet.kill(block=False)

    def wrap_socket_and_handle(self, client_socket: Any, address: Any) -> Any:
        client_socket.settimeout(CLIENT_IO_TIMEOUT_S)
        try:
            with gevent.Timeout(REQUEST_HEAD_DEADLINE_S, _ClientFault("TLS handshake")):
                tls = self.wrap_socket(client_socket, **self.ssl_args)
        except (OSError, ValueError) as exc:    # ssl.SSLError is an OSError
            # One line instead of a hub traceback: old protocols, plain HTTP, scanners.
            wire.log_action("warning", "api-tls-failure", peer=_address_ip(address),
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


def serve(cfg: Any, app: Any, *, ssl_context: Any = None) -> int:
    """Bind, serve until SIGTERM/SIGINT, stop gracefully; return the exit code.

    Raises: StartError when the address cannot be bound.
    """
    size = max(1, int(cfg.api_max_children)) + POOL_MARGIN
    pool = gevent.pool.Pool(size)
    kwargs = {"spawn": pool, "log": None, "error_log": _ErrorLog()}
    if ssl_context is not None:
        kwargs["ssl_context"] = ssl_context
    server = _Server((cfg.api_bind, cfg.api_port), app, **kwargs)
    try:
        server.init_socket()
    except OSError as exc:
        if getattr(exc, "errno", None) in (98, 48):     # EADDRINUSE (Linux, BSD)
            raise StartError("api_port %d on %s is already in use (another ctrl-exec-api? "
                             "choose a free api_port)" % (cfg.api_port, cfg.api_bind))
        raise StartError("cannot listen on api_bind %s api_port %d: %s"
                         % (cfg.api_bind, cfg.api_port, exc.strerror or exc))
    server.start()
    port = server.server_port
    wire.log_action("info", "api-start", bind=cfg.api_bind, port=port,
                    tls="yes" if ssl_context is not None else "no")
    done = gevent.event.Event()
    state = {"stopping": False}

    def stop() -> None:
        if state["stopping"]:                       # second signal: abort now
            server.stop(timeout=0)
            done.set()
            return
        state["stopping"] = True
        server.close()                              # stop accepting; in-flight go on
        server.end_idle_keepalive()
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        while pool.free_count() < pool.size and time.monotonic() < deadline:
            gevent.sleep(0.05)
        server.stop(timeout=1)
        done.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, gevent.spawn, stop)
    purger = gevent.spawn(_purge_forever, app, float(cfg.purge_interval))
    done.wait()
    purger.kill(block=False)
    wire.log_action("info", "api-stop", port=port)
    return 0


def main(argv: Optional[list] = None) -> int:
    """Entry point: python ctrlexec_api.py [--config PATH] [--demo]; returns the exit code."""
    parser = argparse.ArgumentParser(prog="ctrlexec_api.py",
                                     description="ctrl-exec HTTP JSON API server")
    parser.add_argument("--config", metavar="PATH", default=None,
                        help="ctrl-exec.conf (default: $CTRL_EXEC_CONF, then "
                             "/etc/ctrl-exec/ctrl-exec.conf)")
    parser.add_argument("--demo", action="store_true",
                        help="build a throwaway control host with two local agents in "
                             "./demo-state and serve the API for it (no auth; laptop only)")
    args = parser.parse_args(argv)
    wire.setup_logging(LOG_IDENT)
    if args.demo:
        return _run_demo()
    try:
        _check_runtime()
        cfg = config_mod.load(args.config)
        ssl_context = _api_tls_context(cfg)
        _check_readable(cfg)
        try:
            app = make_app(cfg)
        except store_mod.StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - one line instead of a traceback
            raise StartError("cannot load the dispatcher identity (cert %s, key %s, ca %s): %s"
                             % (cfg.cert, cfg.key, cfg.ca, exc))
        return serve(cfg, app, ssl_context=ssl_context)
    except config_mod.ConfigError as exc:
        return _refuse(str(exc))
    except StartError as exc:
        return _refuse(str(exc))
    except store_mod.StoreError as exc:
        return _refuse("state_dir %s: %s" % (getattr(cfg, "state_dir", "?"), exc))


# --- private ---


def _run_demo() -> int:
    """--demo: prepare and start demo.py's fleet, serve the API on it, stop the agents."""
    try:
        _check_runtime()
        fleet = demo.prepare_demo()
    except (demo.DemoError, StartError) as exc:
        return _refuse(str(exc))
    try:
        fleet.start()
        cfg = config_mod.load(fleet.conf_path)
        app = make_app(cfg)
        sys.stdout.write(fleet.intro() + "\n")
        sys.stdout.flush()
        return serve(cfg, app)
    except (demo.DemoError, config_mod.ConfigError, StartError, store_mod.StoreError) as exc:
        return _refuse(str(exc))
    finally:
        fleet.stop()


def _refuse(message: str) -> int:
    """Print one line and return 2 (refuse to start)."""
    sys.stderr.write("%s: %s\n" % (LOG_IDENT, message))
    sys.stderr.flush()
    return 2


def _check_runtime() -> None:
    """gevent must be recent and must have patched threading before bottle was imported."""
    # gevent.__version__, not version_info: some builds report a placeholder there.
    found = tuple(int(part) for part in re.findall(r"\d+", gevent.__version__)[:2])
    if found < MIN_GEVENT_VERSION:
        raise StartError("gevent %s is too old; ctrl-exec-api needs gevent >= %d.%d"
                         % ((gevent.__version__,) + MIN_GEVENT_VERSION))
    if threading.local is not gevent.local.local:
        raise StartError("gevent monkey-patching is not in effect; start the server with "
                         "`python ctrlexec_api.py`, not from a process that imported "
                         "threading-based modules first")


def _api_tls_context(cfg: Any) -> Any:
    """TLS context when api_cert and api_key are set; refuse on any problem (no fallback)."""
    cert, key = cfg.api_cert, cfg.api_key
    if not cert and not key:
        return None
    if not cert or not key:
        missing = "api_key" if cert else "api_cert"
        raise StartError("%s is not set but %s is; set both for TLS or neither for plain HTTP"
                         % (missing, "api_cert" if cert else "api_key"))
    for name, path in (("api_cert", cert), ("api_key", key)):
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise StartError("%s %s is missing or unreadable; fix the file or the setting "
                             "(the API never falls back to plain HTTP)" % (name, path))
    try:
        return wire.tls_server_context(cert, key)
    except (OSError, ValueError) as exc:
        raise StartError("api_cert %s / api_key %s cannot be loaded as a certificate and "
                         "matching private key (%s)" % (cert, key, exc))


def _check_readable(cfg: Any) -> None:
    """The dispatcher's cert, key and CA must be readable files."""
    for name in ("cert", "key", "ca"):
        path = getattr(cfg, name)
        if not path or not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise StartError("%s %s is missing or unreadable (run `ctrlexec.py setup-ca` and "
                             "`setup-dispatcher`, or set %s in ctrl-exec.conf)"
                             % (name, path, name))


def _purge_forever(app: Any, interval_s: float) -> None:
    """Background purge of expired run records every purge_interval seconds."""
    while True:
        gevent.sleep(max(1.0, interval_s))
        app.handlers.purge_runs()


if __name__ == "__main__":
    sys.exit(main())
