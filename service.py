"""The run transaction that the HTTP API and the operator CLI share.

Owns, for both front ends, in this order: request validation (pure ``validate_*``
functions raising one ``BadRequest`` with one wording), the run plan (a frozen
``RunPlan``; its reqid is minted before the auth hook, so the hook sees it from
the API and the CLI alike), auth (``Denied``), host resolution, the host+script
locks (held in a ``with`` block by the code that dispatches, released before the
caller answers), dispatch, the run record, the live events of a run, the
aggregation of async runs (``refresh``) and the tag cache of discovery.

Never does: HTTP, argv, output formatting, HTTP statuses or exit codes (the front
ends map this module's outcomes to those), gevent patching, TLS (engine.py), state
file layout (store.py), or keep a token anywhere but in the plan it was given
(``RunPlan.token`` is left out of its repr, and records never carry it).
"""

from __future__ import annotations

__all__ = [
    "ServiceError",
    "BadRequest",
    "Denied",
    "NotFound",
    "RunNotTracked",
    "RunFinished",
    "RunPlan",
    "Service",
    "NO_BODY",
    "INVALID_JSON",
    "MAX_ARGS",
    "parse_body",
    "validate_run",
    "validate_ping",
    "validate_discovery",
    "validate_runs_query",
    "validate_cancel",
    "summary_of",
    "denial_body",
]

import contextlib
import dataclasses
import functools
import math
import re
import threading
import time
from typing import Any, Callable, Iterator, Optional

import ujson

import audit as audit_mod
import auth
import ctrlexec_agent as wire
import engine as engine_mod
import lifecycle
import store as store_mod

# --- constants -------------------------------------------------------------------

#: Most items accepted in a run's "args" array.
MAX_ARGS = 256
HOSTS_DETAIL = "hosts must be a non-empty array of host names"
SCRIPT_DETAIL = "script name required (letters, digits, '_' and '-' only)"
ARGS_DETAIL = "args must be an array of strings"
TARGETS_DETAIL = ('targets must be an object {"tags": {"<key>": "<value>" or ["<value>", ...]}} '
                  'with at least one tag')
CONCURRENCY_DETAIL = 'max_concurrency must be a positive integer or a percentage such as "10%"'
ERRORS_DETAIL = 'max_errors must be a non-negative integer or a percentage such as "5%"'
BATCH_WAIT_DETAIL = "batch_wait must be a number of seconds from 0 to 3600"
#: Percentages of max_concurrency / max_errors: "<1-3 digits>%".
_PERCENT_RE = re.compile(r"([0-9]{1,3})%")
#: GET /runs: default and largest page, and how many newest records are looked at.
RUNS_PAGE_DEFAULT = 50
RUNS_PAGE_MAX = 500
RUNS_SCAN_MAX = 5000
#: The states GET /runs filters on (a run is in a state when one of its hosts is).
RUN_STATES = engine_mod.HOST_STATES + ("pending",)
#: How a run was asked for (recorded in the dispatch log line).
RUN_MODES = ("sync", "async", "stream", "websocket", "follow")

#: A follower waits this long for new events before it looks at the run's record again.
FOLLOW_WAIT_S = 2.0
#: Added to a run's longest possible duration before a silent run is reported lost.
FOLLOW_GRACE_S = 60.0
#: Parsed-body sentinels: no body at all / a body that is not valid JSON.
NO_BODY = object()
INVALID_JSON = object()


# --- exceptions ------------------------------------------------------------------

class ServiceError(Exception):
    """Base class of the outcomes a front end maps to an HTTP status or an exit code."""


class BadRequest(ServiceError):
    """The request is malformed; .detail says what was wrong and what is accepted."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class Denied(ServiceError):
    """The auth hook (or api_auth_default) refused; .decision is the auth.AuthDecision."""

    def __init__(self, decision: Any, *, generic: bool = False) -> None:
        super().__init__(decision.error + (" (%s)" % decision.detail if decision.detail else ""))
        self.decision = decision
        self.generic = generic

    @property
    def body(self) -> dict:
        """{"ok": false, "error", "code"[, "detail"]}, or {"ok": false, "error": "forbidden"}."""
        return denial_body(self.decision, generic=self.generic)


class NotFound(ServiceError):
    """No stored run for a reqid (never existed, or purged); .detail is the seed's text."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class RunNotTracked(ServiceError):
    """An async run's record could not be stored, so nothing was dispatched."""


# --- request validation (pure; SPEC §6 order) ----------------------------------------

class RunFinished(ServiceError):
    """A cancel of a run that has already finished (the API answers 409)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def parse_body(raw: bytes) -> Any:
    """Decode a request body: NO_BODY when empty, INVALID_JSON when not JSON, else the value."""
    if not raw or not raw.strip():
        return NO_BODY
    try:
        return ujson.loads(raw)
    except (ValueError, OverflowError, RecursionError):
        return INVALID_JSON


def validate_run(body: Any, *, max_hosts: int) -> dict:
    """Validate a run request (a POST /run body, or the CLI's words put in that shape).

    Returns: {"hosts": [..deduplicated, in order..], "script", "args": [...], "username",
        "token", "async": bool, "stream": bool, "timeout": int | None, "targets":
        {"tags": {...}} | None, "max_concurrency" / "max_errors": int | "N%" | None,
        "batch_wait": float}. With targets, hosts may be left out (then []).
    Raises: BadRequest(detail) with the SPEC's exact detail text, checks in SPEC order.
    """
    obj = _require_object(body)
    targets = _validate_targets(obj)
    hosts = _validate_hosts(obj, max_hosts=max_hosts) if "hosts" in obj or targets is None else []
    script = obj.get("script")
    if not isinstance(script, str) or not wire.SCRIPT_NAME_RE.fullmatch(script):
        raise BadRequest(SCRIPT_DETAIL)
    args = obj.get("args")
    if args is None:
        args = []
    if (not isinstance(args, list) or len(args) > MAX_ARGS
            or not all(_is_text(a) and "\x00" not in a for a in args)):
        # NUL cannot cross execve; a lone surrogate (JSON "\ud800", or a non-UTF-8 byte
        # in the CLI's argv) cannot be UTF-8 encoded for the agent.
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
            "timeout": timeout, "targets": targets,
            "max_concurrency": _validate_amount(obj, "max_concurrency", CONCURRENCY_DETAIL, 1),
            "max_errors": _validate_amount(obj, "max_errors", ERRORS_DETAIL, 0),
            "batch_wait": _validate_batch_wait(obj)}


def validate_ping(body: Any, *, max_hosts: int) -> dict:
    """Validate a ping request.

    Returns: {"hosts": [...], "username": str, "token": str}.
    Raises: BadRequest(detail).
    """
    obj = _require_object(body)
    targets = _validate_targets(obj)
    hosts = _validate_hosts(obj, max_hosts=max_hosts) if "hosts" in obj or targets is None else []
    username, token = _validate_credentials(obj)
    return {"hosts": hosts, "username": username, "token": token, "targets": targets}


def validate_discovery(body: Any, *, max_hosts: int) -> dict:
    """Validate an optional discovery request (absent body or hosts = every agent).

    Returns: {"hosts": [...] | None, "username": str, "token": str}.
    Raises: BadRequest(detail): invalid JSON, not an object, hosts [] or not an array.
    """
    if body is NO_BODY:
        return {"hosts": None, "username": "", "token": "", "targets": None}
    obj = _require_object(body)
    targets = _validate_targets(obj)
    hosts = _validate_hosts(obj, max_hosts=max_hosts) if "hosts" in obj else None
    if targets is not None and hosts is None:
        hosts = []
    username, token = _validate_credentials(obj)
    return {"hosts": hosts, "username": username, "token": token, "targets": targets}


def validate_cancel(body: Any) -> dict:
    """Validate an optional cancel request body.

    Returns: {"grace": int (1-60, default 5), "username": str, "token": str}.
    Raises: BadRequest(detail).
    """
    if body is NO_BODY:
        return {"grace": 5, "username": "", "token": ""}
    obj = _require_object(body)
    grace = obj.get("grace", 5)
    if isinstance(grace, float) and grace.is_integer():
        grace = int(grace)
    if isinstance(grace, bool) or not isinstance(grace, int) or not 1 <= grace <= 60:
        raise BadRequest("grace must be an integer number of seconds from 1 to 60")
    username, token = _validate_credentials(obj)
    return {"grace": grace, "username": username, "token": token}


def validate_runs_query(query: dict) -> dict:
    """Validate GET /runs filters (all optional, strings as in a query string).

    Returns: {"script", "host", "user", "state": str | None, "since": float | None,
        "limit": int, "offset": int}.
    Raises: BadRequest(detail) naming the parameter and what it accepts.
    """
    out = {key: (query.get(key) or None) for key in ("script", "host", "user")}
    out["state"] = query.get("state")
    if out["state"] is not None and out["state"] not in RUN_STATES:
        raise BadRequest("state must be one of %s" % ", ".join(RUN_STATES))
    since = query.get("since")
    try:
        out["since"] = float(since) if since is not None else None
    except ValueError:
        raise BadRequest("since must be a Unix time in seconds (e.g. 1733450000)") from None
    if out["since"] is not None and not math.isfinite(out["since"]):
        raise BadRequest("since must be a Unix time in seconds (e.g. 1733450000)")
    for key, default, high in (("limit", RUNS_PAGE_DEFAULT, RUNS_PAGE_MAX),
                               ("offset", 0, RUNS_SCAN_MAX)):
        text = query.get(key)
        if text is None:
            out[key] = default
            continue
        if not str(text).isdigit() or not (key == "offset" or 1 <= int(text)) \
                or int(text) > high:
            raise BadRequest("%s must be an integer from %d to %d"
                             % (key, 1 if key == "limit" else 0, high))
        out[key] = int(text)
    return out


def denial_body(decision: Any, *, generic: bool = False) -> dict:
    """The 403 body of an auth denial: {ok:false, error, code[, detail]} or the generic form."""
    if generic:
        return {"ok": False, "error": "forbidden"}
    body = {"ok": False, "error": decision.error, "code": decision.code}
    if decision.detail:
        body["detail"] = decision.detail
    return body


# --- the run plan ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RunPlan:
    """One authorised run, fixed before anything is dialled.

    reqid is minted before the auth hook runs (the hook sees it as ENVEXEC_REQID);
    token travels to the agents only and is never part of repr() or a record.
    """

    reqid: str
    hosts: tuple
    script: str
    args: tuple
    username: str
    source_ip: str
    mode: str
    timeout: Optional[int] = None
    token: str = dataclasses.field(default="", repr=False)
    targets: Optional[dict] = None
    max_concurrency: Any = None
    max_errors: Any = None
    batch_wait: float = 0.0

    @property
    def submitter(self) -> dict:
        """Who asked, as stored with the run: {"username", "source_ip"} (never the token)."""
        return {"username": self.username, "source_ip": self.source_ip}


# --- the service ------------------------------------------------------------------------

class Service:
    """The run transaction over one store and one engine, for one front end.

    Args: cfg (config.Config); store (store.Store); engine (engine.Engine); caller
        "api" | "cli" (what the auth hook and api_auth_default see); write (callable
        running a blocking record write, e.g. in a thread pool; default: call it);
        warn (callable(str) told when a record could not be stored; default: log only);
        node (this API node's id: its async runs carry it as "owner", and reap() takes
        over the runs of nodes whose liveness lease lapsed).
    """

    def __init__(self, cfg: Any, store: Any, engine: Any, *, caller: str,
                 write: Optional[Callable] = None, warn: Optional[Callable] = None,
                 node: Optional[str] = None, metrics: Any = None, audit: bool = True) -> None:
        if caller not in auth.CALLERS:
            raise ValueError("caller must be one of %s, got %r" % (", ".join(auth.CALLERS), caller))
        self.cfg = cfg
        self.store = store
        self.engine = engine
        self.caller = caller
        self._write = write or (lambda func, *args: func(*args))
        self._warn = warn
        #: This API node's id while it renews its liveness lease (store.nodes), else None.
        self.node = node
        #: reqid -> engine.RunControl of the sync / stream runs dispatching in this process.
        self._active: dict = {}
        #: metrics.Metrics of the API process (None: the CLI keeps no metrics).
        self.metrics = metrics
        #: Whether acting requests go to the audit log (audit.py).
        self._audit = audit

    # --- auth ---

    def authorise(self, action: str, *, source_ip: str, username: str = "", token: str = "",
                  **context: Any) -> None:
        """auth.check for this front end; raise Denied unless the hook allowed it."""
        started = time.monotonic()
        decision = auth.check(self.cfg, action=action, source_ip=source_ip, caller=self.caller,
                              username=username, token=token, **context)
        if self.metrics is not None:
            self.metrics.observe_auth(action, allowed=decision.allowed,
                                      seconds=time.monotonic() - started,
                                      hooked=bool(self.cfg.auth_hook))
        if not decision.allowed:
            raise Denied(decision, generic=bool(getattr(self.cfg, "auth_deny_generic", False)))

    # --- runs ---

    def plan_run(self, req: dict, *, source_ip: str, mode: str) -> RunPlan:
        """Authorise a validated run request (action run) and fix its plan.

        Args: req as returned by validate_run; mode one of RUN_MODES.
        Returns: RunPlan with a fresh reqid (the hook saw it).
        Raises: Denied.
        """
        if mode not in RUN_MODES:
            raise ValueError("mode must be one of %s, got %r" % (", ".join(RUN_MODES), mode))
        reqid = wire.new_reqid()
        hosts = self.target_hosts(req)
        try:
            self.authorise("run", source_ip=source_ip, username=req["username"],
                           token=req["token"], script=req["script"], hosts=hosts,
                           args=req["args"], reqid=reqid)
        except Denied as exc:
            self._refused(reqid, req["script"], mode, hosts, req["args"], req["username"],
                          source_ip, "denied", exc.body.get("error", "denied"))
            raise
        return RunPlan(reqid=reqid, hosts=tuple(hosts), script=req["script"],
                       args=tuple(req["args"]), username=req["username"], source_ip=source_ip,
                       mode=mode, timeout=req.get("timeout"), token=req["token"],
                       targets=req.get("targets"), max_concurrency=req.get("max_concurrency"),
                       max_errors=req.get("max_errors"), batch_wait=req.get("batch_wait") or 0.0)

    def target_hosts(self, req: dict) -> list:
        """The hosts of a validated request: its hosts, then the agents its tags select.

        Tags match the registry's cached tags (kept current by discovery): every key
        must match, a list value means any of. Duplicates collapse; order is the hosts
        as given, then the matches by name.
        Raises: BadRequest when the tags match no agent, or too many hosts result.
        """
        hosts = list(req.get("hosts") or [])
        targets = req.get("targets")
        if not targets:
            return hosts
        matched = [record["name"] for record in self.store.registry.list(targets["tags"])]
        if not matched:
            raise BadRequest("no registered agent matches targets.tags %s; discovery shows "
                             "the fleet's tags" % ujson.dumps(targets["tags"], sort_keys=True))
        hosts = list(dict.fromkeys(hosts + matched))
        if len(hosts) > self.cfg.max_hosts:
            raise BadRequest("too many hosts (max %d)" % self.cfg.max_hosts)
        return hosts

    def run(self, plan: RunPlan, *, on_event: Optional[Callable] = None) -> list:
        """Run a plan to completion (sync, stream, follow): locks, dispatch, record, events.

        Events (with on_event): {"event":"start","reqid","script","hosts"} once the locks
        are held, the engine's stdout / stderr / exit events, then {"event":"done",
        "ok":true,"reqid","results"} after the locks are released and the record stored.
        Each event also goes to the run's event log (store.events), where it gets an id,
        so any node can follow the run (follow) and a follower can resume after an id.
        Returns: the per-host result rows in request order (engine.dispatch_all).
        Raises: store.LockConflict (nothing dispatched), store.StoreError (a lock).
        """
        targets = self.store.registry.resolve(list(plan.hosts))
        log = _EventLog(self.store.events, plan.reqid)
        with self._held_or_refused(plan, targets) as held:
            self._log_dispatch(plan)
            log.open(self._meta(plan, deadline=time.time() + self._longest_s(plan)))
            emit = log.forwarder(on_event)
            emit({"event": "start", "reqid": plan.reqid, "script": plan.script,
                  "hosts": list(plan.hosts)})
            control = self._control(plan)
            self._active[plan.reqid] = control
            try:
                results = self.engine.dispatch_all(targets, on_event=emit if on_event else None,
                                                   control=control, **self._dispatch(plan))
            finally:
                self._active.pop(plan.reqid, None)
            results = _with_states(results)
            if on_event is None:
                log.append(_result_events(results))
        record = store_mod.sync_record(reqid=plan.reqid, script=plan.script,
                                       hosts=list(plan.hosts), results=results,
                                       submitter=plan.submitter)
        self._annotate(record, plan, held)
        # The run record and the audit line are two fsyncs on two files: written side
        # by side, both durable before the answer goes out.
        audited = threading.Thread(target=self._acted, args=(plan, results), daemon=True)
        audited.start()
        self.save(record)
        audited.join()
        _log_run_done(plan.reqid, plan.script, results)
        emit({"event": "done", "ok": True, "reqid": plan.reqid, "results": results})
        return results

    def submit(self, plan: RunPlan) -> list:
        """Submit a plan as detached (async) runs; the record is stored before dispatch.

        Its results exist only on the agents until refresh fetches them, so a run
        store that cannot be written stops the run: nothing is dispatched.
        Returns: [{host, script, status:"accepted"|"busy"|"error", reqid, rtt[, error]}].
        Raises: store.LockConflict, RunNotTracked.
        """
        targets = self.store.registry.resolve(list(plan.hosts))
        with self._held_or_refused(plan, targets) as held:
            accepted = [{"host": host, "script": plan.script, "status": "accepted",
                         "reqid": plan.reqid} for host in plan.hosts]
            try:
                self._write(self.store.runs.save, self._async_record(plan, accepted))
            except store_mod.StoreError as exc:
                wire.log_action("err", "run-store-fail", reqid=plan.reqid, error=str(exc))
                raise RunNotTracked(
                    "the run store cannot be written, so this async run could not be tracked; "
                    "nothing was dispatched (check state_dir permissions)") from None
            self._log_dispatch(plan)
            log = _EventLog(self.store.events, plan.reqid)
            log.open(self._meta(plan, deadline=None))
            log.append([{"event": "start", "reqid": plan.reqid, "script": plan.script,
                         "hosts": list(plan.hosts), "async": True}])
            results = self.engine.dispatch_all(targets, async_=True, control=self._control(plan),
                                               **self._dispatch(plan))
        record = self._async_record(plan, results)
        self._annotate(record, plan, held)
        if self.save(record) and not record.get("complete"):
            self._track(plan.reqid, pending=True)
        log.append(_settled_events(plan.reqid, {}, record))
        self._acted(plan, results)
        return results

    # --- stored runs ---

    def status(self, reqid: str, *, source_ip: str, token: str = "", username: str = "") -> dict:
        """The stored record of reqid, aggregated from the agents while async and pending.

        Authorised (action status, with the record's submitter) before any agent is asked.
        Returns: the record, submitter included (store.status_view hides it from callers).
        Raises: NotFound, store.CorruptRecord, Denied.
        """
        self.purge_runs()
        try:
            record = self.store.runs.load(reqid)
        except store_mod.CorruptRecord as exc:
            wire.log_action("err", "run-store-fail", reqid=reqid, error=str(exc))
            raise store_mod.CorruptRecord(
                "the stored record for reqid %s is unreadable" % reqid) from None
        if record is None:
            raise NotFound("no result for reqid %s" % reqid)
        submitter = record.get("submitter") if isinstance(record.get("submitter"), dict) else None
        self.authorise("status", source_ip=source_ip, username=username, token=token,
                       reqid=reqid, submitter=submitter)
        if record.get("mode") == "async" and not record.get("complete"):
            record = self.refresh(record)
        return record

    def follow(self, reqid: str, *, after: Optional[str] = None, source_ip: str,
               token: str = "", username: str = "") -> Iterator[dict]:
        """The events of a run from any node, live until its "done": resumable by id.

        Authorised first (action status, with the run's submitter), so a refusal is raised
        here, before the caller starts answering. The events are those of the run's event
        log after ``after`` (each with its "id"); a run whose log has expired is replayed
        from its record (ids "1-0", "2-0", ...). An async run is refreshed from its agents
        while followed. A run whose node stopped reporting past its longest possible
        duration ends with {"event":"error","error":"lost",...}.
        Returns: an iterator of events (dicts with "id").
        Raises: NotFound, Denied, store.StoreError (bad after, unreadable state).
        """
        meta = self.store.events.meta(reqid)
        record = self.store.runs.load(reqid)
        if meta is None and record is None:
            raise NotFound("no run with reqid %s (unknown, or older than the retention)" % reqid)
        owner = meta if meta is not None else record
        submitter = owner.get("submitter") if isinstance(owner.get("submitter"), dict) else None
        self.authorise("status", source_ip=source_ip, username=username, token=token,
                       reqid=reqid, submitter=submitter)
        self.store.events.read(reqid, after)          # an invalid after is refused now
        if meta is None:
            return iter(_replayed(record, after))
        return self._follow(reqid, after, meta)

    def cancel(self, reqid: str, *, source_ip: str, token: str = "", username: str = "",
               grace: int = 5) -> dict:
        """Cancel a running run from any node: no new host starts, the agents kill it.

        Authorised with action cancel and the run's script and hosts (whoever may run that
        script on those hosts may cancel it), then: hosts not started yet are skipped
        (when this process dispatches the run), every host is asked to kill the run's
        process group (TERM, then KILL after ``grace`` seconds), and an async record is
        refreshed so its rows say "cancelled".
        Returns: {"ok": true, "reqid", "results": engine.cancel_all rows}.
        Raises: NotFound, RunFinished (nothing left to cancel), Denied.
        """
        meta = self.store.events.meta(reqid)
        record = self.store.runs.load(reqid)
        if meta is None and record is None:
            raise NotFound("no run with reqid %s (unknown, or older than the retention)" % reqid)
        if record is not None and record.get("complete"):
            raise RunFinished("run %s has already finished; there is nothing to cancel (its "
                              "results: GET /status/%s)" % (reqid, reqid))
        owner = record if record is not None else meta
        submitter = owner.get("submitter") if isinstance(owner.get("submitter"), dict) else None
        hosts = [h for h in owner.get("hosts") or [] if isinstance(h, str)]
        try:
            self.authorise("cancel", source_ip=source_ip, username=username, token=token,
                           reqid=reqid, script=owner.get("script") or "", hosts=hosts,
                           submitter=submitter)
        except Denied as exc:
            self.audit(action="cancel", user=username, source_ip=source_ip, reqid=reqid,
                       script=owner.get("script") or "", hosts=hosts, outcome="denied",
                       detail=exc.body.get("error", "denied"))
            raise
        control = self._active.get(reqid)
        if control is not None:
            control.cancel()
        if meta is not None:
            try:
                self.store.events.mark_cancelled(reqid)
            except store_mod.StoreError as exc:
                wire.log_action("warning", "cancel-mark-fail", reqid=reqid, error=str(exc))
        wire.log_action("info", "cancel", reqid=reqid, hosts=len(hosts),
                        user=username or "(none)", peer=source_ip)
        rows = self.engine.cancel_all(self.store.registry.resolve(hosts), reqid=reqid,
                                      grace=grace)
        if record is not None and record.get("mode") == "async":
            self.refresh(record)
        self.audit(action="cancel", user=username, source_ip=source_ip, reqid=reqid,
                   script=owner.get("script") or "", hosts=hosts, outcome="sent",
                   detail=", ".join("%s: %s" % (r.get("host"), r.get("status")) for r in rows))
        return {"ok": True, "reqid": reqid, "results": rows}

    def list_runs(self, query: dict, *, source_ip: str, token: str = "",
                  username: str = "") -> dict:
        """Recent runs, newest first, filtered and paginated (action status).

        Args: query as returned by validate_runs_query.
        Returns: {"ok": true, "runs": [{reqid, script, mode, hosts, user, complete,
            completed, summary}], "next_offset": int | None}.
        """
        self.authorise("status", source_ip=source_ip, username=username, token=token)
        matched = []
        for record in self.store.runs.recent(since=query["since"] or 0.0, limit=RUNS_SCAN_MAX):
            entry = _run_entry(record)
            if _run_matches(entry, record, query):
                matched.append(entry)
        first, limit = query["offset"], query["limit"]
        page = matched[first:first + limit]
        more = first + limit < len(matched)
        return {"ok": True, "runs": page, "next_offset": first + limit if more else None}

    def refresh(self, record: dict) -> dict:
        """Ask the hosts of an async record that are still pending for their results.

        Fetched in parallel, then merged into the record as it is stored *now*
        (store.runs.update), so two refreshes of one run never lose each other's rows:
        done -> the run fields; running -> "running"; agent 404 -> "expired"; a
        transport error leaves the row as it was, plus "fetch_error".
        Returns: the merged record (pending, complete, completed settled).
        """
        rows = [row for row in record.get("results") or [] if isinstance(row, dict)]
        waiting = [row["host"] for row in rows if row.get("status") in store_mod.PENDING_STATES]
        if not waiting:
            return store_mod.settle_async(record)
        targets = self.store.registry.resolve(waiting)
        fetched = dict(zip(waiting, self.engine.fetch_results(targets, reqid=record["reqid"])))

        def merge(current: dict) -> dict:
            merged = []
            for row in current.get("results") or []:
                got = fetched.get(row.get("host")) if isinstance(row, dict) else None
                if got is not None and row.get("status") in store_mod.PENDING_STATES:
                    row = _merged_row(row, got)
                merged.append(row)
            settled = store_mod.settle_async(dict(current, results=merged))
            settled["summary"] = summary_of(settled["results"])
            return settled

        seen = {}

        def merge_and_note(current: dict) -> dict:
            seen["before"] = current
            return merge(current)

        try:
            updated = self._write(self.store.runs.update, record["reqid"], merge_and_note)
        except store_mod.StoreError as exc:
            wire.log_action("err", "run-store-fail", reqid=record.get("reqid", ""), error=str(exc))
            updated = None
        if updated is None:
            return merge(record)
        # Only the refresh whose update moved a row on tells the followers, once.
        _EventLog(self.store.events, record["reqid"]).append(
            _settled_events(record["reqid"], seen.get("before") or {}, updated))
        if updated.get("complete") and not (seen.get("before") or {}).get("complete"):
            self._track(record["reqid"], pending=False)
        return updated

    def reap(self) -> int:
        """Refresh the pending async runs this node owns, and take over those of stopped nodes.

        A run whose owner's liveness lease lapsed (or that has no owner: submitted by the
        CLI) is taken over atomically (its "owner" becomes this node), then refreshed from
        its agents; a host whose agent cannot answer then is marked "lost" with the reason,
        so a run is never left "running" forever. Only for shared state (store.nodes).
        Returns: how many runs were refreshed.
        """
        if self.node is None or self.store.nodes is None:
            return 0
        refreshed = 0
        for reqid in self.store.runs.pending():
            record = self.store.runs.load(reqid)
            if record is None or record.get("mode") != "async" or record.get("complete"):
                self._track(reqid, pending=False)
                continue
            owner = record.get("owner")
            if owner != self.node:
                if owner and self.store.nodes.alive(owner):
                    continue
                record = self._take_over(reqid, owner)
                if record is None:
                    continue
                record = self._mark_lost(self.refresh(record))
            else:
                self.refresh(record)
            refreshed += 1
        return refreshed

    def save(self, record: dict) -> bool:
        """Store a run record; a failed write is logged (and warned), never fatal (ref §5.4)."""
        try:
            self._write(self.store.runs.save, record)
            return True
        except store_mod.StoreError as exc:
            wire.log_action("err", "run-store-fail", reqid=record.get("reqid", ""), error=str(exc))
            if self._warn is not None:
                self._warn("run %s was not stored: %s" % (record.get("reqid"), exc))
            return False

    def purge_runs(self) -> int:
        """Delete expired run records (lazily on status, and by the API's purger); logged."""
        try:
            return self.store.runs.purge()
        except store_mod.StoreError as exc:
            wire.log_action("err", "run-store-fail", error=str(exc))
            return 0

    # --- fleet queries ---

    def ping(self, req: dict, *, source_ip: str) -> tuple:
        """Ping validated hosts (action ping; reqid minted before the hook, as for runs).

        Returns: (reqid, [per-host ping rows in request order]).
        Raises: Denied.
        """
        reqid = wire.new_reqid()
        hosts = self.target_hosts(req)
        self.authorise("ping", source_ip=source_ip, username=req["username"], token=req["token"],
                       hosts=hosts, reqid=reqid)
        targets = self.store.registry.resolve(hosts)
        rows = self.engine.ping_all(targets, reqid=reqid)
        for row in rows:
            if row.get("status") == "ok":
                row["days_left"] = lifecycle.days_left(row.get("expiry"))
        return reqid, rows

    def discovery(self, req: dict, *, source_ip: str) -> dict:
        """Capabilities keyed by registry name (action ping); tags cached in the registry.

        Args: req as returned by validate_discovery (hosts None = every registered agent).
        Returns: {name: capabilities row, "tags" always an object}.
        Raises: Denied.
        """
        entries = req["hosts"]
        if req.get("targets"):
            entries = self.target_hosts(req)
        self.authorise("ping", source_ip=source_ip, username=req["username"], token=req["token"],
                       hosts=entries or ())
        if entries is None:
            entries = self.store.registry.names()
        if not entries:
            return {}
        targets = self.store.registry.resolve(entries)
        found = {}
        for target, row in zip(targets, self.engine.capabilities_all(targets)):
            if row.get("status") == "ok" and target.address is not None:
                self._cache_tags(target.name, row["tags"])
                self._add_expiry(target.name, row)
            found[target.name] = row
        return found

    def fleet_scripts(self) -> tuple:
        """(sorted registered names, sorted scripts of the agents that answered); no auth.

        For the live spec: the registry is read without a network call, then every agent
        is asked for its capabilities; agents that do not answer are left out.
        """
        names = sorted(self.store.registry.names())
        scripts = set()
        if names:
            for row in self.engine.capabilities_all(self.store.registry.resolve(names)):
                if row.get("status") != "ok":
                    continue
                for entry in row.get("scripts") or []:
                    name = entry.get("name") if isinstance(entry, dict) else None
                    if isinstance(name, str) and name:
                        scripts.add(name)
        return names, sorted(scripts)

    # --- audit and metrics ---

    def audit(self, **fields: Any) -> None:
        """One audit line (audit.py) for a request that acts, tagged with this front end."""
        if self._audit:
            self._write(functools.partial(audit_mod.record, self.cfg, via=self.caller, **fields))

    def _refused(self, reqid: str, script: str, mode: str, hosts: list, args: Any,
                 username: str, source_ip: str, outcome: str, detail: str) -> None:
        if self.metrics is not None:
            self.metrics.observe_refused(script, mode, outcome)
        self.audit(action="run", user=username, source_ip=source_ip, reqid=reqid, script=script,
                   args=list(args), hosts=list(hosts), mode=mode, outcome=outcome, detail=detail)

    def _acted(self, plan: RunPlan, results: list) -> None:
        if self.metrics is not None:
            self.metrics.observe_run(plan.script, plan.mode, results)
        counts = summary_of(results)
        outcome = "ok" if counts["ok"] == len(results) else "failed"
        if plan.mode == "async":
            outcome = "submitted" if counts["ok"] == len(results) else "failed"
        self.audit(action="run", user=plan.username, source_ip=plan.source_ip, reqid=plan.reqid,
                   script=plan.script, args=list(plan.args), hosts=list(plan.hosts),
                   mode=plan.mode, outcome=outcome,
                   detail=", ".join("%s=%d" % kv for kv in counts.items() if kv[1]))

    @contextlib.contextmanager
    def _held_or_refused(self, plan: RunPlan, targets: list) -> Iterator[Any]:
        """_hold, with a lock conflict counted and audited before it propagates."""
        with contextlib.ExitStack() as stack:
            try:
                held = stack.enter_context(self._hold(plan, targets))
            except store_mod.LockConflict as exc:
                self._refused(plan.reqid, plan.script, plan.mode, list(plan.hosts), plan.args,
                              plan.username, plan.source_ip, "locked", str(exc))
                raise
            yield held

    # --- private ---

    def _add_expiry(self, name: str, row: dict) -> None:
        """Discovery rows carry the registry's certificate expiry and the days left."""
        try:
            record = self.store.registry.get(name) or {}
        except store_mod.CorruptRecord:
            return
        if record.get("expiry"):
            row["expiry"] = str(record["expiry"])
            row["days_left"] = lifecycle.days_left(row["expiry"])

    def _hold(self, plan: RunPlan, targets: list) -> Any:
        """Take every host+script lock of the plan, all or nothing (store.LockConflict).

        Locks key on the registry name, so "web-01" and "web-01:7450" conflict;
        unregistered names are never dialled and need no lock.
        """
        names = list(dict.fromkeys(t.name for t in targets if t.address is not None))
        return self.store.locks.hold(names, plan.script)

    def _follow(self, reqid: str, after: Optional[str], meta: dict) -> Iterator[dict]:
        """follow()'s live part: read, wait, refresh async runs, stop at done or lost."""
        while True:
            batch = self.store.events.read(reqid, after, wait_s=FOLLOW_WAIT_S)
            for event_id, event in batch:
                after = event_id
                yield dict(event, id=event_id)
                if event.get("event") == "done":
                    return
            if batch:
                continue
            record = self.store.runs.load(reqid)
            if record is not None and record.get("mode") == "async" and not record.get("complete"):
                self.refresh(record)
                continue
            if record is not None and record.get("complete"):
                return                  # finished, and nothing is left after ``after``
            deadline = meta.get("deadline")
            if record is None and isinstance(deadline, (int, float)) and time.time() > deadline:
                yield {"event": "error", "ok": False, "error": "lost", "reqid": reqid,
                       "detail": "the node running reqid %s stopped reporting before the run "
                                 "finished" % reqid}
                return

    def _control(self, plan: RunPlan) -> engine_mod.RunControl:
        """The engine's rate control for a plan (percentages resolved against its hosts)."""
        hosts = len(plan.hosts)
        events = self.store.events

        def cancelled_elsewhere() -> bool:
            meta = events.meta(plan.reqid)
            return bool(meta and meta.get("cancelled"))

        return engine_mod.RunControl(
            max_concurrency=_amount(plan.max_concurrency, hosts, round_up=True),
            max_errors=_amount(plan.max_errors, hosts, round_up=False),
            batch_wait=plan.batch_wait, cancelled_elsewhere=cancelled_elsewhere)

    def _annotate(self, record: dict, plan: RunPlan, held: Any) -> None:
        """What a record keeps beside the seed's fields: summary, targets, rate control,
        the lock grant's fencing number."""
        record["summary"] = summary_of(record.get("results") or [])
        if plan.targets:
            record["targets"] = plan.targets
        for field in ("max_concurrency", "max_errors"):
            if getattr(plan, field) is not None:
                record[field] = getattr(plan, field)
        if plan.batch_wait:
            record["batch_wait"] = plan.batch_wait
        if held.fencing is not None:
            record["fencing"] = held.fencing

    def _take_over(self, reqid: str, owner: Optional[str]) -> Optional[dict]:
        """Make this node the owner of a run, unless another node was quicker."""
        def claim(current: dict) -> dict:
            if current.get("owner") != owner:
                return current
            return dict(current, owner=self.node)
        taken = self.store.runs.update(reqid, claim)
        if taken is None or taken.get("owner") != self.node:
            return None
        wire.log_action("warning", "run-takeover", reqid=reqid, owner=owner or "(none)",
                        node=self.node)
        return taken

    def _mark_lost(self, record: dict) -> dict:
        """Rows still pending whose agent could not answer become "lost" (final)."""
        def lose(current: dict) -> dict:
            rows = []
            for row in current.get("results") or []:
                if (isinstance(row, dict) and row.get("status") in store_mod.PENDING_STATES
                        and row.get("fetch_error")):
                    row = {"host": row["host"], "status": "lost",
                           "error": "the node that started this run stopped, and the agent "
                                    "could not be asked for its result: %s" % row["fetch_error"]}
                rows.append(row)
            return store_mod.settle_async(dict(current, results=rows))
        if not any(isinstance(row, dict) and row.get("fetch_error")
                   for row in record.get("results") or []):
            return record
        seen = {}

        def lose_and_note(current: dict) -> dict:
            seen["before"] = current
            return lose(current)

        updated = self.store.runs.update(record["reqid"], lose_and_note)
        if updated is None:
            return record
        _EventLog(self.store.events, record["reqid"]).append(
            _settled_events(record["reqid"], seen.get("before") or {}, updated))
        if updated.get("complete"):
            self._track(record["reqid"], pending=False)
        return updated

    def _meta(self, plan: RunPlan, *, deadline: Optional[float]) -> dict:
        """What a follower's authorisation and lost-run check need of a plan."""
        return {"reqid": plan.reqid, "script": plan.script, "hosts": list(plan.hosts),
                "mode": plan.mode, "submitter": plan.submitter, "started": time.time(),
                "deadline": deadline}

    def _longest_s(self, plan: RunPlan) -> float:
        """How long a run can take at most: batches of max_parallel, each under its limits."""
        per_host = float(self.cfg.connect_timeout) + max(
            float(self.cfg.read_timeout), float(plan.timeout or 0) + 10.0)
        batches = math.ceil(len(plan.hosts) / max(1, int(self.cfg.max_parallel)))
        return batches * per_host + FOLLOW_GRACE_S

    def _dispatch(self, plan: RunPlan) -> dict:
        """The keyword arguments of engine.dispatch_all for a plan."""
        return dict(script=plan.script, args=list(plan.args), reqid=plan.reqid,
                    username=plan.username, token=plan.token, timeout=plan.timeout)

    def _async_record(self, plan: RunPlan, results: list) -> dict:
        record = store_mod.async_record(reqid=plan.reqid, script=plan.script,
                                        hosts=list(plan.hosts), results=results,
                                        submitter=plan.submitter)
        if self.node is not None:
            record["owner"] = self.node
        return record

    def _track(self, reqid: str, *, pending: bool) -> None:
        """Keep the reapers' list of pending async runs in step (failures only logged)."""
        try:
            if pending:
                self.store.runs.track_pending(reqid)
            else:
                self.store.runs.untrack_pending(reqid)
        except store_mod.StoreError as exc:
            wire.log_action("warning", "run-track-fail", reqid=reqid, error=str(exc))

    def _log_dispatch(self, plan: RunPlan) -> None:
        wire.log_action("info", "dispatch", script=plan.script, hosts=len(plan.hosts),
                        reqid=plan.reqid, mode=plan.mode, user=plan.username or "(none)",
                        peer=plan.source_ip)

    def _cache_tags(self, name: str, tags: dict) -> None:
        """Keep the registry's cached tags in step with what the agent reported."""
        try:
            record = self.store.registry.get(name)
            if record is not None and record.get("tags") != tags:
                self.store.registry.update(name, tags=tags)
        except store_mod.StoreError as exc:
            wire.log_action("warning", "registry-tags-fail", agent=name, error=str(exc))


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


def _validate_targets(obj: dict) -> Optional[dict]:
    """targets {"tags": {key: value | [values]}} or None when absent / null."""
    if "targets" not in obj:
        return None
    targets = obj["targets"]
    tags = targets.get("tags") if isinstance(targets, dict) else None
    if not isinstance(tags, dict) or not tags or set(targets) - {"tags"}:
        raise BadRequest(TARGETS_DETAIL)
    out = {}
    for key, value in tags.items():
        values = value if isinstance(value, list) else [value]
        if not (isinstance(key, str) and key and values
                and all(isinstance(v, str) and v and _is_text(v) for v in values)):
            raise BadRequest(TARGETS_DETAIL)
        out[key] = list(values) if isinstance(value, list) else value
    return {"tags": out}


def _validate_amount(obj: dict, field: str, detail: str, low: int) -> Any:
    """A count (integer >= low) or a percentage "N%" (low..100), or None when absent."""
    value = obj.get(field)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= low:
        return value
    if isinstance(value, str):
        match = _PERCENT_RE.fullmatch(value.strip())
        if match and low <= int(match.group(1)) <= 100:
            return "%d%%" % int(match.group(1))
    raise BadRequest(detail)


def _validate_batch_wait(obj: dict) -> float:
    """Seconds between batches, 0-3600 (0 when absent)."""
    value = obj.get("batch_wait")
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 3600:
        raise BadRequest(BATCH_WAIT_DETAIL)
    return float(value)


def _amount(value: Any, hosts: int, *, round_up: bool) -> Optional[int]:
    """A count from an amount: an integer as it is, "N%" of hosts rounded up (concurrency,
    at least 1) or down (errors)."""
    if value is None:
        return None
    if isinstance(value, int):
        return value
    share = hosts * int(value[:-1]) / 100.0
    return max(1, math.ceil(share)) if round_up else math.floor(share)


def summary_of(rows: list) -> dict:
    """Counts of the honest host states (engine.HOST_STATES) plus "pending" (async rows
    not settled yet): the top-level summary of a run result and a record."""
    counts = dict.fromkeys(engine_mod.HOST_STATES + ("pending",), 0)
    for row in rows:
        if not isinstance(row, dict):
            continue
        if row.get("status") in store_mod.PENDING_STATES:
            counts["pending"] += 1
        else:
            counts[engine_mod.row_state(row)] += 1
    return counts


def _with_states(rows: list) -> list:
    """Sync / stream rows with their honest "status" (engine.row_state)."""
    return [dict(row, status=engine_mod.row_state(row)) for row in rows]


def _is_text(value: Any) -> bool:
    """A str that encodes as UTF-8 (JSON allows lone surrogates like "\\ud800"; the wire cannot)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _merged_row(row: dict, got: dict) -> dict:
    """Merge one fetched result into an async record row (reference §5.4)."""
    status = got.get("status")
    if status == "done":
        done = {key: value for key, value in got.items() if key != "reqid"}
        done["host"] = row["host"]
        if done.get("cancelled"):
            done["status"] = "cancelled"
        return done
    if status == "running":
        return {key: value for key, value in dict(row, status="running").items()
                if key != "fetch_error"}
    if status == "unknown":
        return {"host": row["host"], "status": "expired"}
    return dict(row, fetch_error=got.get("error") or "result fetch failed")


class _EventLog:
    """A run's event log as the service writes it: failures are logged, never fatal (the
    run and its record matter more than its followers)."""

    def __init__(self, events: Any, reqid: str) -> None:
        self.events = events
        self.reqid = reqid
        self._failed = False
        # Many greenlets emit at once: logging and handing on under one lock keeps the
        # log's order (its ids) the order the stream's client sees.
        self._order = threading.Lock()

    def open(self, meta: dict) -> None:
        try:
            self.events.open(self.reqid, meta)
        except store_mod.StoreError as exc:
            self._fail(exc)

    def append(self, events: list) -> list:
        if not events or self._failed:
            return []
        try:
            return self.events.append(self.reqid, events)
        except store_mod.StoreError as exc:
            self._fail(exc)
            return []

    def forwarder(self, on_event: Optional[Callable]) -> Callable:
        """An on_event that logs each event, then hands it on unchanged (the stream's
        shape is the seed's; the ids are the follow endpoint's)."""
        def emit(event: dict) -> None:
            with self._order:
                self.append([event])
                if on_event is not None:
                    on_event(event)
        return emit

    def _fail(self, exc: Exception) -> None:
        if not self._failed:
            self._failed = True
            wire.log_action("warning", "run-events-fail", reqid=self.reqid, error=str(exc))


def _result_events(results: list) -> list:
    """The stdout / stderr / exit events of finished result rows (a sync run's log)."""
    events = []
    for row in results:
        for kind in ("stdout", "stderr"):
            if row.get(kind):
                events.append({"event": kind, "host": row.get("host"), "data": row[kind]})
        exit_event = {"event": "exit", "host": row.get("host"), "exit": row.get("exit"),
                      "rtt": row.get("rtt")}
        if row.get("error"):
            exit_event["error"] = row["error"]
        events.append(exit_event)
    return events


def _settled_events(reqid: str, before: dict, after: dict) -> list:
    """Events for an async record's rows that left accepted/running, plus done once complete."""
    was = {row.get("host"): row.get("status") for row in before.get("results") or []
           if isinstance(row, dict)}
    settled = [row for row in after.get("results") or [] if isinstance(row, dict)
               and row.get("status") not in store_mod.PENDING_STATES
               and was.get(row.get("host"), "accepted") in store_mod.PENDING_STATES]
    events = _result_events([row for row in settled if "exit" in row])
    events += [{"event": "exit", "host": row.get("host"),
                "error": row.get("error") or row.get("status")}
               for row in settled if "exit" not in row]
    if after.get("complete") and not before.get("complete"):
        events.append({"event": "done", "ok": True, "reqid": reqid,
                       "results": after.get("results") or []})
    return events


def _replayed(record: dict, after: Optional[str]) -> list:
    """A finished run's events rebuilt from its record, ids "1-0", "2-0", ... after ``after``."""
    events = [{"event": "start", "reqid": record.get("reqid"), "script": record.get("script"),
               "hosts": list(record.get("hosts") or [])}]
    events += _result_events([row for row in record.get("results") or []
                              if isinstance(row, dict) and "exit" in row])
    if record.get("complete"):
        events.append({"event": "done", "ok": True, "reqid": record.get("reqid"),
                       "results": record.get("results") or []})
    start = 0 if after is None else int(after.split("-", 1)[0])
    return [dict(event, id="%d-0" % number) for number, event in enumerate(events, 1)
            if number > start]


def _run_entry(record: dict) -> dict:
    """One GET /runs entry of a stored record."""
    submitter = record.get("submitter") if isinstance(record.get("submitter"), dict) else {}
    rows = record.get("results") or []
    return {"reqid": record.get("reqid"), "script": record.get("script"),
            "mode": record.get("mode"), "hosts": list(record.get("hosts") or []),
            "user": submitter.get("username") or "", "complete": bool(record.get("complete")),
            "completed": record.get("completed"),
            "summary": record.get("summary") or summary_of(rows)}


def _run_matches(entry: dict, record: dict, query: dict) -> bool:
    """Does a run pass GET /runs' filters?"""
    if query["script"] and entry["script"] != query["script"]:
        return False
    if query["host"] and query["host"] not in entry["hosts"]:
        return False
    if query["user"] and entry["user"] != query["user"]:
        return False
    if query["state"] and not entry["summary"].get(query["state"]):
        return False
    written = record.get("completed") or record.get("submitted")
    if query["since"] is not None and isinstance(written, (int, float)) \
            and written < query["since"]:
        return False
    return True


def _log_run_done(reqid: str, script: str, results: list) -> None:
    """One line per finished run, counted from the rows (exit 0 = ok)."""
    ok = sum(1 for row in results if isinstance(row, dict) and row.get("exit") == 0)
    wire.log_action("info", "run-done", reqid=reqid, script=script, hosts=len(results),
                    ok=ok, failed=len(results) - ok)
