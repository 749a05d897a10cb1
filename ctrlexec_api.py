"""ctrl-exec HTTP API: routes, request validation, response shapes, server start.

Owns the JSON API of SPEC §6 (seed `ctrl-exec-api.md`): the `api` gate on every
request, per-endpoint validation in the SPEC's order, the auth actions run / ping /
status, lock holding around sync runs, run records, the NDJSON stream and its
WebSocket twin (GET /ws/run), the live OpenAPI spec, and starting the server
(httpserver.py: deadlines, keep-alive, drain, graceful stop) with optional TLS.
The run transaction itself (auth, locks, dispatch, records) is service.py's.

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
    "StartError",
    "MAX_BODY_BYTES",
    "ERRORS",
    "make_app",
    "serve",
    "main",
]

import argparse
import base64
import binascii
import importlib.util
import os
import re
import secrets
import socket
import struct
import sys
import threading
import time
from typing import Any, Callable, Iterable, Optional

import bottle
import gevent
import gevent.local
import gevent.lock
import gevent.queue
from geventwebsocket.handler import WebSocketHandler
import ujson

import config as config_mod
import ctrlexec_agent as wire
import httpserver
import metrics as metrics_mod
import service as service_mod
import store as store_mod
import workers as workers_mod
from engine import EngineError

###############################################################################
# Constants ###################################################################
###############################################################################

MAX_BODY_BYTES = wire.MAX_BODY_BYTES
#: Accepted /status path parameter (the run store's 16-hex reqids and older 8-hex ones).
STATUS_REQID_RE = re.compile(r"[a-f0-9]{8,64}")
#: Extra pool slots above api_max_children so overload gets a 503 instead of waiting in accept().
POOL_MARGIN = 8
#: Oldest gevent we start with (as requirements.txt).
MIN_GEVENT_VERSION = (24, 2)
HERE = os.path.dirname(os.path.abspath(__file__))
OPENAPI_PATH = os.path.join(HERE, "openapi.json")
LOG_IDENT = "ctrl-exec-api"
JSON_TYPE = "application/json"
NDJSON_TYPE = "application/x-ndjson"
#: How long a closing WebSocket waits for the client's close frame: closing with unread
#: input makes the kernel send a reset, which can destroy messages the client has not read.
WS_CLOSE_WAIT_S = 2.0
#: WebSocket close status "normal closure" (RFC 6455 §7.4.1).
WS_CLOSE_NORMAL = 1000


#: GET / lists these, in this order (seed "GET /").
ENDPOINTS = (
    ("GET", "/health"),
    ("POST", "/ping"),
    ("POST", "/run"),
    ("GET", "/ws/run"),
    ("GET", "/discovery"),
    ("POST", "/discovery"),
    ("GET", "/status/{reqid}"),
    ("GET", "/runs"),
    ("GET", "/runs/{reqid}/events"),
    ("POST", "/runs/{reqid}/cancel"),
    ("GET", "/openapi.json"),
    ("GET", "/openapi-live.json"),
    ("GET", "/docs"),
    ("GET", "/metrics"),
    ("GET", "/ui"),
)

#: Schemas of the live spec that get the registered host names as hosts.items.enum.
LIVE_HOST_SCHEMAS = ("PingRequest", "RunRequest", "DiscoveryRequest")

#: RapiDoc's own build, from the PyPI wheel flask-openapi3-rapidoc (requirements-docs.txt,
#: installed without its Flask dependencies); served by the API, never from a CDN.
RAPIDOC_PACKAGE = "flask_openapi3_rapidoc"
RAPIDOC_FILE = os.path.join("templates", "rapidoc", "js", "rapidoc-min.js")
RAPIDOC_INSTALL = "pip install --no-deps --require-hashes -r requirements-docs.txt"

DOCS_HTML = b"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>ctrl-exec API</title>
<script type="module" src="/docs/rapidoc-min.js"></script>
</head>
<body>
<noscript>The API reference needs JavaScript; the spec itself is <a href="/openapi.json">/openapi.json</a>.</noscript>
%s
<rapi-doc spec-url="/openapi-live.json" render-style="read" show-header="false"></rapi-doc>
</body>
</html>
"""
DOCS_MISSING = (b'<p>The API reference viewer (RapiDoc) is not installed on this control host: '
                b'run <code>' + RAPIDOC_INSTALL.encode() + b'</code> in the ctrl-exec folder. '
                b'The spec itself is <a href="/openapi.json">/openapi.json</a>.</p>')
#: The web console: flat static files beside this module, served at /ui and /ui/<name>.
CONSOLE_FILES = {"": ("console.html", "text/html; charset=utf-8"),
                 "console.js": ("console.js", "application/javascript; charset=utf-8"),
                 "console.css": ("console.css", "text/css; charset=utf-8")}
STATIC_HEADERS = {"Content-Security-Policy": "default-src 'self'; connect-src 'self'; "
                                             "img-src 'self' data:; frame-ancestors 'none'",
                  "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                  "Cache-Control": "no-cache"}
#: Static files with no fleet data: served before the `api` gate, because a browser
#: cannot send the operator's token when it loads them (every API call the page makes
#: passes the gate and its own action like any other client).
UNGATED_PATHS = frozenset(("/ui", "/ui/", "/ui/console.js", "/ui/console.css",
                           "/docs/rapidoc-min.js"))

###############################################################################
# Exceptions ##################################################################
###############################################################################


class ApiError(Exception):
    """An error answered to the client: .status (int) and .body (the JSON dict)."""

    def __init__(self, status: int, body: dict) -> None:
        super().__init__(body.get("detail") or body.get("error") or str(status))
        self.status = status
        self.body = body


class StartError(Exception):
    """The server cannot start; str() is the one line printed before exit 2."""


###############################################################################
# Application #################################################################
###############################################################################


def make_app(cfg: Any, *, store: Any = None, engine: Any = None) -> bottle.Bottle:
    """Build a fresh WSGI application with every route of SPEC §6.

    Args: cfg (config.Config); store (store.Store, default open_store(cfg)); engine
        (engine.Engine, default workers.engine_from_config(cfg)).
    Returns: a bottle.Bottle (WSGI callable) with JSON error handlers; no routes are
        registered on bottle's default app.
    Raises: store.StoreError when the state directories cannot be created; the engine's
        errors when the dispatcher certificate cannot be loaded.
    """
    if store is None:
        store = store_mod.open_store(cfg)
    if engine is None:
        engine = workers_mod.engine_from_config(cfg)
        if isinstance(engine, workers_mod.SplitEngine):
            engine.start()
    node = None
    if getattr(store, "nodes", None) is not None:
        node = "%s-%d-%s" % (config_mod.sanitise_dispatcher_id(socket.gethostname()), os.getpid(),
                             secrets.token_hex(3))
    observed = metrics_mod.Metrics(cfg, lambda: [r.get("expiry") for r in store.registry.list()])
    runs = service_mod.Service(cfg, store, engine, caller="api", node=node,
                               write=_off_hub if getattr(store, "blocking_writes", True) else None,
                               metrics=observed)
    app = _ApiApp(cfg, runs)
    api = _Handlers(cfg, runs)
    app.route("/", "GET", _endpoint(api.index))
    app.route("/health", "GET", _endpoint(api.health))
    app.route("/ping", "POST", _endpoint(api.ping))
    app.route("/run", "POST", _endpoint(api.run))
    app.route("/ws/run", "GET", _endpoint(api.ws_run))
    app.route("/discovery", "GET", _endpoint(api.discovery))
    app.route("/discovery", "POST", _endpoint(api.discovery))
    # A reqid outside STATUS_REQID_RE matches no route: 404 before it can become a path.
    app.route("/status/<reqid:re:%s>" % STATUS_REQID_RE.pattern, "GET", _endpoint(api.status))
    app.route("/runs", "GET", _endpoint(api.runs_list))
    app.route("/runs/<reqid:re:%s>/events" % STATUS_REQID_RE.pattern, "GET",
              _endpoint(api.run_events))
    app.route("/runs/<reqid:re:%s>/cancel" % STATUS_REQID_RE.pattern, "POST",
              _endpoint(api.cancel))
    app.route("/openapi.json", "GET", _endpoint(api.openapi))
    app.route("/openapi-live.json", "GET", _endpoint(api.openapi_live))
    app.route("/docs", "GET", _endpoint(api.docs))
    app.route("/docs/rapidoc-min.js", "GET", _endpoint(api.docs_viewer))
    app.route("/metrics", "GET", _endpoint(api.metrics))
    app.route("/ui", "GET", _endpoint(api.console))
    app.route("/ui/<name:re:(?:console\\.(?:js|css))?>", "GET", _endpoint(api.console))
    for code in (400, 404, 405, 413, 500):
        app.error(code)(_bottle_error)
    app.handlers = api
    return app


class _ApiApp(bottle.Bottle):
    """bottle.Bottle plus the steps every request takes before routing.

    Order: concurrency slot (503) -> body read under 1 MiB (413) -> the `api` auth
    gate (403) -> bottle routing. Logs one api-request line when the response ends.
    """

    def __init__(self, cfg: Any, runs: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cfg = cfg
        self.runs = runs
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
            except Exception as exc:  # noqa: BLE001 - the table answers (logged if unexpected)
                out = _plain_response(start, *_answer(exc, environ.get("PATH_INFO", "")))
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
            raw = httpserver.read_body(environ, MAX_BODY_BYTES)
        except httpserver.TooLarge:
            return _plain_response(start, 413, _error_body(
                "payload too large", "body exceeds %d bytes" % MAX_BODY_BYTES))
        except (OSError, ValueError) as exc:
            wire.log_action("warning", "api-read-fail", peer=environ.get("REMOTE_ADDR", ""),
                            error=type(exc).__name__)
            return _plain_response(start, 400, _error_body(
                "bad request", "the request body could not be read"))
        body = service_mod.parse_body(raw)
        environ["ctrlexec.body"] = body
        if environ.get("REQUEST_METHOD") == "GET" and environ.get("PATH_INFO") in UNGATED_PATHS:
            return None
        token = ""
        username = ""
        if isinstance(body, dict):
            token = body.get("token") if isinstance(body.get("token"), str) else ""
            username = body.get("username") if isinstance(body.get("username"), str) else ""
        self.runs.authorise("api", source_ip=environ.get("REMOTE_ADDR", ""), username=username,
                            token=token or _bearer_token(environ))
        return None


###############################################################################
# Routes (in the order a request meets them) ##################################
###############################################################################


class _Handlers:
    """The endpoint callbacks; each returns a bottle.HTTPResponse or raises (see ERRORS)."""

    def __init__(self, cfg: Any, runs: Any) -> None:
        self.cfg = cfg
        self.runs = runs

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
        """GET /docs: the static RapiDoc page pointing at the live spec (no CDN)."""
        page = DOCS_HTML % (b"" if _rapidoc_path() else DOCS_MISSING)
        return bottle.HTTPResponse(page, 200, {"Content-Type": "text/html; charset=utf-8"})

    def docs_viewer(self) -> bottle.HTTPResponse:
        """GET /docs/rapidoc-min.js: RapiDoc's script from the installed package."""
        path = _rapidoc_path()
        if not path:
            raise ApiError(404, _error_body("not found", "the RapiDoc viewer is not installed; "
                                            "run: " + RAPIDOC_INSTALL))
        with open(path, "rb") as handle:
            data = handle.read()
        return bottle.HTTPResponse(data, 200, {"Content-Type": "application/javascript; charset=utf-8",
                                               "Cache-Control": "public, max-age=86400",
                                               "X-Content-Type-Options": "nosniff"})

    def console(self, name: str = "") -> bottle.HTTPResponse:
        """GET /ui, /ui/console.js, /ui/console.css: the web console's static files."""
        filename, content_type = CONSOLE_FILES[name or ""]
        with open(os.path.join(HERE, filename), "rb") as handle:
            data = handle.read()
        return bottle.HTTPResponse(data, 200, dict(STATIC_HEADERS, **{"Content-Type": content_type}))

    def metrics(self) -> bottle.HTTPResponse:
        """GET /metrics: Prometheus text format (auth action metrics)."""
        self.runs.authorise("metrics", source_ip=_peer(), token=_bearer_token())
        return bottle.HTTPResponse(self.runs.metrics.exposition(), 200,
                                   {"Content-Type": metrics_mod.CONTENT_TYPE})

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
        names, scripts = self.runs.fleet_scripts()                 # 2.-3. registry, capabilities
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        for schema_name in LIVE_HOST_SCHEMAS:                       # 4. host enums
            hosts = (schemas.get(schema_name) or {}).get("properties", {}).get("hosts")
            if isinstance(hosts, dict):
                items = hosts.setdefault("items", {"type": "string"})
                items["enum"] = list(names)
        script_prop = (schemas.get("RunRequest") or {}).get("properties", {}).get("script")
        if isinstance(script_prop, dict):                           # 5. script enum
            script_prop["enum"] = list(scripts)
        info = spec.setdefault("info", {})                          # 6. version stamp
        base_version = str(info.get("version") or wire.VERSION).split("+", 1)[0]
        info["version"] = "%s+%d" % (base_version, int(time.time()))
        return _json(200, spec)                                     # 7. served from memory

    # --- operations ---

    def ping(self) -> bottle.HTTPResponse:
        """POST /ping: 200 {"ok": true, "reqid", "results": [per-host ping rows]}."""
        req = _with_bearer(service_mod.validate_ping(_body(), max_hosts=self.cfg.max_hosts))
        reqid, results = self.runs.ping(req, source_ip=_peer())
        return _json(200, {"ok": True, "reqid": reqid, "results": results})

    def discovery(self) -> bottle.HTTPResponse:
        """GET/POST /discovery: 200 {"ok": true, "hosts": {name: capabilities row}}."""
        if bottle.request.method == "POST":
            req = service_mod.validate_discovery(_body(), max_hosts=self.cfg.max_hosts)
        else:
            req = {"hosts": None, "username": "", "token": ""}
        found = self.runs.discovery(_with_bearer(req), source_ip=_peer())
        return _json(200, {"ok": True, "hosts": found})

    def run(self) -> bottle.HTTPResponse:
        """POST /run: sync 200, async 202, stream 200 NDJSON; 409 on a lock conflict."""
        req = _with_bearer(service_mod.validate_run(_body(), max_hosts=self.cfg.max_hosts))
        mode = "stream" if req["stream"] else "async" if req["async"] else "sync"
        plan = self.runs.plan_run(req, source_ip=_peer(), mode=mode)
        if req["stream"]:
            feed = self._start_streamed(plan)

            def lines() -> Iterable[bytes]:
                self.runs.metrics.stream_opened()
                try:
                    for event in feed:
                        yield _json_line(event)
                finally:
                    # Also reached when the client hung up (the server closes this generator).
                    self.runs.metrics.stream_closed()
                    feed.detach()

            return bottle.HTTPResponse(lines(), 200, {"Content-Type": NDJSON_TYPE,
                                                      "Cache-Control": "no-cache"})
        if req["async"]:
            results = self.runs.submit(plan)
            return _json(202, {"ok": True, "async": True, "reqid": plan.reqid, "results": results,
                               "summary": service_mod.summary_of(results)})
        results = self.runs.run(plan)
        return _json(200, {"ok": True, "reqid": plan.reqid, "results": results,
                           "summary": service_mod.summary_of(results)})

    def ws_run(self) -> bottle.HTTPResponse:
        """GET /ws/run: WebSocket; the first message is a run request, then the stream's events.

        The 503 slot and the `api` gate (token from the Authorization header) have run
        before the upgrade, as for every request. After the 101, every answer is a
        message: the events of the NDJSON stream one per message, or one error message
        (the usual error body plus "event":"error" and "status": <HTTP code>); then close.
        Raises: ApiError 426 when the request is not a valid WebSocket handshake.
        """
        upgrade = bottle.request.environ.get(httpserver.WS_UPGRADE_KEY)
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
        self.runs.metrics.stream_opened()
        try:
            body = session.receive_request()
            if body is not _WsSession.GONE:
                self._ws_stream(session, body)
        except Exception as exc:  # noqa: BLE001 - after the 101 an error is a message (the table)
            status, error = _answer(exc, bottle.request.path)
            session.send(dict(error, event="error", status=status))
        finally:
            self.runs.metrics.stream_closed()
            session.close()
        # Never sent: the connection is the WebSocket's now (_ApiApp drops this answer).
        return bottle.HTTPResponse(b"", 101)

    def status(self, reqid: str) -> bottle.HTTPResponse:
        """GET /status/<reqid>: the stored record (aggregated for async runs), no submitter."""
        record = self.runs.status(reqid, source_ip=_peer(), token=_bearer_token())
        return _json(200, store_mod.status_view(record))

    def run_events(self, reqid: str) -> bottle.HTTPResponse:
        """GET /runs/<reqid>/events[?after=<id>]: NDJSON, the run's events from any node.

        Live until the run's "done" event; each line carries its "id", and a client that
        reconnects with ?after=<last id> gets the rest with no gap and no duplicate.
        """
        after = bottle.request.query.get("after") or None
        if after is not None and not store_mod.EVENT_ID_RE.fullmatch(after):
            raise service_mod.BadRequest(
                "after must be an event id (<milliseconds>-<sequence>, the \"id\" of an event)")
        events = self.runs.follow(reqid, after=after, source_ip=_peer(), token=_bearer_token())

        def lines() -> Iterable[bytes]:
            self.runs.metrics.stream_opened()
            try:
                for event in events:
                    yield _json_line(event)
            except Exception as exc:  # noqa: BLE001 - mid-stream, an error is the last line
                status, body = _answer(exc, bottle.request.path)
                yield _json_line(dict(body, event="error", reqid=reqid, status=status))
            finally:
                self.runs.metrics.stream_closed()

        return bottle.HTTPResponse(lines(), 200, {"Content-Type": NDJSON_TYPE,
                                                  "Cache-Control": "no-cache"})

    def runs_list(self) -> bottle.HTTPResponse:
        """GET /runs[?script&host&user&state&since&limit&offset]: recent runs, newest first."""
        query = service_mod.validate_runs_query(dict(bottle.request.query.items()))
        return _json(200, self.runs.list_runs(query, source_ip=_peer(), token=_bearer_token()))

    def cancel(self, reqid: str) -> bottle.HTTPResponse:
        """POST /runs/<reqid>/cancel [{grace, username, token}]: 200 with per-host rows."""
        req = service_mod.validate_cancel(_body())
        result = self.runs.cancel(reqid, source_ip=_peer(), username=req["username"],
                                  token=req["token"] or _bearer_token(), grace=req["grace"])
        return _json(200, result)

    def purge_runs(self) -> None:
        """Delete expired run records (the server's purger; /status purges lazily too)."""
        self.runs.purge_runs()

    # --- private ---

    def _ws_stream(self, session: "_WsSession", body: Any) -> None:
        """/ws/run after the first message: the NDJSON stream's events, one per message."""
        req = _with_bearer(service_mod.validate_run(body, max_hosts=self.cfg.max_hosts))
        if req["async"]:
            raise service_mod.BadRequest(
                "async is not available on /ws/run (the socket streams the run; use "
                "POST /run with \"async\": true instead)")
        plan = self.runs.plan_run(req, source_ip=_peer(), mode="websocket")
        feed = self._start_streamed(plan)
        try:
            for event in feed:
                if not session.send(event):
                    break                   # the client left; the run goes on
        finally:
            feed.detach()

    def _start_streamed(self, plan: Any) -> "_RunFeed":
        """Run a plan in its own greenlet; return its feed once the locks are held.

        The worker owns the locks and the record, so a client that hangs up mid-stream
        still gets its run stored and its locks released. A failure before the "start"
        event (a lock conflict) is raised here, so the route answers 409 instead of 200.
        """
        feed = _RunFeed(plan.reqid)

        def work() -> None:
            try:
                self.runs.run(plan, on_event=feed.put)
            except Exception as exc:  # noqa: BLE001 - handed to the client greenlet, answered there
                feed.fail(exc)
            finally:
                feed.end()

        feed.worker = gevent.spawn(work)
        feed.wait_started()
        return feed


class _RunFeed:
    """The events of one streamed run, handed from its worker greenlet to the client's.

    Once the client has gone (detach), events are dropped instead of queued, and the
    client's greenlet waits for the run to end: the request keeps its api_max_children
    slot, so hanging up cannot be used to start more runs than the server allows.
    """

    _END = object()

    def __init__(self, reqid: str) -> None:
        self.reqid = reqid
        self._queue: gevent.queue.Queue = gevent.queue.Queue()
        self._listening = True
        self._first: Any = None
        #: The greenlet running the dispatch (set by the starter).
        self.worker: Optional[gevent.Greenlet] = None

    def put(self, event: dict) -> None:
        """Queue one event for the client (dropped once it has gone)."""
        if self._listening:
            self._queue.put(event)

    def fail(self, exc: Exception) -> None:
        """The run raised: before "start" the starter re-raises it, after it is an event."""
        self._queue.put(_Failed(exc))

    def end(self) -> None:
        """No more events."""
        self._queue.put(self._END)

    def wait_started(self) -> None:
        """Block until the first event; raise the run's exception if it failed first."""
        self._first = self._queue.get()
        if isinstance(self._first, _Failed):
            self.worker.join()
            raise self._first.exc

    def __iter__(self):
        item = self._first if self._first is not None else self._queue.get()
        self._first = None
        while item is not self._END:
            if isinstance(item, _Failed):
                status, body = _answer(item.exc, "stream")
                yield dict(body, event="error", reqid=self.reqid)
            else:
                yield item
            item = self._queue.get()

    def detach(self) -> None:
        """The client is done with the feed: drop later events, wait for the run to finish."""
        self._listening = False
        if self.worker is not None:
            self.worker.join()


class _Failed:
    """A run's exception travelling through a _RunFeed."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc


###############################################################################
# Errors: the one table from exceptions to answers ############################
###############################################################################


def _locked_body(exc: Any) -> dict:
    return {"ok": False, "error": "locked", "code": 4, "conflicts": list(exc.conflicts)}


#: (exception class, HTTP status, body builder), first match wins; anything else is a
#: logged 500. Details never carry a path, a token or a traceback.
ERRORS = (
    (ApiError, None, lambda exc: exc.body),
    (service_mod.BadRequest, 400, lambda exc: _error_body("bad request", exc.detail)),
    (service_mod.Denied, 403, lambda exc: exc.body),
    (service_mod.NotFound, 404, lambda exc: _error_body("not found", exc.detail)),
    (store_mod.LockConflict, 409, _locked_body),
    (service_mod.RunFinished, 409, lambda exc: _error_body("finished", exc.detail)),
    (store_mod.StoreUnavailable, 503, lambda exc: _error_body(
        "service unavailable", "the state backend is unreachable; nothing was changed, retry "
                               "when it is back")),
    (service_mod.RunNotTracked, 500, lambda exc: _error_body("internal error", str(exc))),
    (store_mod.CorruptRecord, 500, lambda exc: _error_body("internal error", str(exc))),
    (store_mod.StoreError, 500, lambda exc: _error_body(
        "internal error", "the control host's state could not be read or written; see the "
                          "server log")),
    (EngineError, 500, lambda exc: _error_body(
        "internal error", "the dispatcher could not talk to the agents; see the server log")),
)


def _answer(exc: BaseException, where: str) -> tuple:
    """(status, body) for an exception raised while answering; unexpected ones are logged."""
    for cls, status, build in ERRORS:
        if isinstance(exc, cls):
            if status is None or status >= 500:
                if status is not None:
                    wire.log_action("err", "api-fail", path=where, error=type(exc).__name__,
                                    detail=str(exc)[:300])
                return (exc.status if status is None else status), build(exc)
            return status, build(exc)
    wire.log_action("err", "api-error", path=where, error="%s: %s" % (type(exc).__name__, exc))
    return 500, _error_body("internal error", "unexpected server error; see the server log")


def _endpoint(func: Callable) -> Callable:
    """Route wrapper: the one boundary of a route (bottle's _handle is the model)."""

    def wrapper(*args: Any, **kwargs: Any) -> bottle.HTTPResponse:
        try:
            return func(*args, **kwargs)
        except bottle.HTTPResponse:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped by ERRORS; unexpected ones logged
            return _json(*_answer(exc, bottle.request.path))

    wrapper.__name__ = getattr(func, "__name__", "endpoint")
    return wrapper


# --- private ---


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
        with gevent.Timeout(httpserver.CLIENT_IO_TIMEOUT_S, False):
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
            raise service_mod.BadRequest("invalid JSON body")
        if not state["done"]:
            return self.GONE                # silent too long: close() says goodbye
        message = state["message"]
        if message is None or self.ws.closed:
            self.gone = True                # closed, reset or broken framing
            return self.GONE
        self._reader = gevent.spawn(self._read_rest)
        raw = message.encode("utf-8") if isinstance(message, str) else bytes(message)
        return service_mod.parse_body(raw)

    def send(self, message: dict) -> bool:
        """Send one JSON text message; False (and stop sending) once the client has gone."""
        if self.gone or self.ws.closed:
            self.gone = True
            return False
        sent = False
        with gevent.Timeout(httpserver.CLIENT_IO_TIMEOUT_S, False):
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
            with gevent.Timeout(httpserver.CLIENT_IO_TIMEOUT_S, False):
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


def _error_body(error: str, detail: str) -> dict:
    """{"ok": false, "error", "detail"}."""
    return {"ok": False, "error": error, "detail": detail}


def _rapidoc_path() -> str:
    """Where the installed RapiDoc script is, or "" (the package is looked up, never imported:
    importing it would import Flask)."""
    spec = importlib.util.find_spec(RAPIDOC_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(folder, RAPIDOC_FILE)
        if os.path.isfile(path):
            return path
    return ""


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
    return bottle.request.environ.get("ctrlexec.body", service_mod.NO_BODY)


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


def _with_bearer(req: dict) -> dict:
    """A validated request whose token is the body's, else the Authorization header's."""
    return dict(req, token=req.get("token") or _bearer_token())


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


def _bottle_error(err: bottle.HTTPError) -> bytes:
    """JSON for bottle's own errors: 404 for an unknown path, 405 (with Allow) for a known
    path asked with a method it does not serve; both say 'no route for <METHOD> <path>'."""
    environ = bottle.request.environ
    response = bottle.response
    response.content_type = JSON_TYPE
    detail = "no route for %s %s" % (environ.get("REQUEST_METHOD", ""),
                                     environ.get("PATH_INFO", ""))
    if err.status_code == 405:
        allowed = ", ".join(method.strip() for method in response.get_header("Allow", "").split(",")
                            if method.strip())
        response.status = 405
        response["Allow"] = allowed
        return _json_bytes(_error_body("method not allowed", "%s (%s accepts %s)"
                                       % (detail, environ.get("PATH_INFO", ""), allowed)))
    if err.status_code == 404:
        response.status = 404
        return _json_bytes(_error_body("not found", detail))
    if err.status_code == 413:
        return _json_bytes(_error_body("payload too large",
                                       "body exceeds %d bytes" % MAX_BODY_BYTES))
    if err.status_code == 400:
        return _json_bytes(_error_body("bad request", "the request could not be parsed"))
    status, body = _answer(err.exception or err, environ.get("PATH_INFO", ""))
    response.status = status
    return _json_bytes(body)


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
# Application control #########################################################
###############################################################################


def _run_demo() -> int:
    """--demo: become `python demo.py` (its own entry: fleet, this API as a child, cleanup)."""
    demo_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, [sys.executable, demo_py])
    except OSError as exc:
        return _refuse("cannot start %s: %s" % (demo_py, exc.strerror or exc))


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


def _reap_forever(app: Any, lease_s: float) -> None:
    """Shared state: renew this node's liveness lease every lease/3 and, every lease,
    refresh its pending async runs and take over those of nodes that stopped."""
    runs = app.handlers.runs
    next_reap = time.monotonic() + lease_s
    while True:
        try:
            runs.store.nodes.beat(runs.node)
            if time.monotonic() >= next_reap:
                next_reap = time.monotonic() + lease_s
                runs.reap()
        except store_mod.StoreError as exc:
            wire.log_action("warning", "api-reap-fail", error=str(exc))
        gevent.sleep(max(0.1, lease_s / 3.0))


def _purge_forever(app: Any, interval_s: float) -> None:
    """Background purge of expired run records every purge_interval seconds."""
    while True:
        gevent.sleep(max(1.0, interval_s))
        app.handlers.purge_runs()


def serve(cfg: Any, app: Any, *, ssl_context: Any = None) -> int:
    """Bind, serve until SIGTERM/SIGINT, stop gracefully; return the exit code.

    Raises: StartError when the address cannot be bound.
    """
    try:
        server = httpserver.open_server(app, cfg.api_bind, cfg.api_port,
                                        pool_size=max(1, int(cfg.api_max_children)) + POOL_MARGIN,
                                        ssl_context=ssl_context, log_action=wire.log_action,
                                        log_prefix="api-")
    except httpserver.BindError as exc:
        if exc.in_use:
            raise StartError("api_port %d on %s is already in use (another ctrl-exec-api? "
                             "choose a free api_port)" % (cfg.api_port, cfg.api_bind))
        raise StartError("%s (check api_bind and api_port)" % exc)
    app.handlers.runs.metrics.connections.set_function(server.open_connections)
    wire.log_action("info", "api-start", bind=cfg.api_bind, port=server.server_port,
                    tls="yes" if ssl_context is not None else "no")
    background = [gevent.spawn(_purge_forever, app, float(cfg.purge_interval))]
    runs = app.handlers.runs
    if runs.node is not None:
        background.append(gevent.spawn(_reap_forever, app, float(cfg.lock_lease)))
    try:
        httpserver.serve_until_signalled(server)
    finally:
        for greenlet in background:
            greenlet.kill(block=False)
        if runs.node is not None:
            try:
                runs.store.nodes.forget(runs.node)     # the others take over at once
            except store_mod.StoreError:
                pass
    wire.log_action("info", "api-stop", port=server.server_port)
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
    except store_mod.StoreUnavailable as exc:
        return _refuse(str(exc))
    except store_mod.StoreError as exc:
        return _refuse("state_dir %s: %s" % (getattr(cfg, "state_dir", "?"), exc))


if __name__ == "__main__":
    sys.exit(main())
