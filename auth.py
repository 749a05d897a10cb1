"""Authorisation decisions for the control host: the auth hook and `api_auth_default`.

Owns: turning one request's context into an allow/deny decision, by running the
configured auth hook (reference §7: ENVEXEC_* environment + JSON on stdin, exit code
mapping) or, with no hook, applying the caller's default (CLI allowed, API
`api_auth_default`, "deny" unless configured otherwise). Logs one `ACTION=auth` line.

Never: builds HTTP responses, reads request bodies, touches the registry or run
store, or logs the token. It fails closed: only a hook that exited normally with
status 0 allows (the hook runner in `ctrlexec_agent` guarantees this).
"""

from __future__ import annotations

__all__ = [
    "ACTIONS",
    "AuthDecision",
    "AuthError",
    "CALLERS",
    "check",
]

import collections
import time
from typing import Any, Iterable, Mapping

import ctrlexec_agent as wire

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

#: Action values the control host passes to the hook (ENVEXEC_ACTION).
ACTIONS = ("api", "run", "ping", "status", "cancel", "metrics")
#: Who asks: the operator CLI (allowed without a hook) or the HTTP API.
CALLERS = ("api", "cli")

NO_HOOK_ERROR = "no auth hook configured"
DENIED_ERROR = "denied"
DENIED_CODE = 1

# ---------------------------------------------------------------------------
# Exceptions
# ---------------------------------------------------------------------------


class AuthError(Exception):
    """Programmer error in a call to this module (unknown action or caller)."""


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------

#: allowed (bool); error: "" or "denied" / "bad credentials" / "insufficient privilege" /
#: "no auth hook configured"; code: 0 when allowed else 1/2/3; detail: "" or a short
#: reason that never contains the hook's path or output.
AuthDecision = collections.namedtuple("AuthDecision", "allowed error code detail")


def check(
    cfg: Any,
    *,
    action: str,
    source_ip: str,
    caller: str = "api",
    script: str = "",
    hosts: Iterable[str] = (),
    args: Iterable[str] = (),
    username: str = "",
    token: str = "",
    reqid: str = "",
    submitter: Mapping[str, Any] | None = None,
) -> AuthDecision:
    """Decide whether one request may proceed.

    Args: cfg (Config: auth_hook, auth_hook_timeout, api_auth_default); action one of
        ACTIONS; caller "api" | "cli"; the rest is the request context passed to the
        hook ({action, script, hosts, args, username, token, source_ip, dispatcher,
        dispatcher_serial, reqid, submitter, timestamp}).
    Returns: AuthDecision(allowed, error, code, detail), e.g.
        (True, "", 0, "") or (False, "denied", 1, "auth hook timed out after 10s").
    Raises: AuthError for an unknown action or caller (a programming error).
    """
    if action not in ACTIONS:
        raise AuthError("unknown auth action %r (accepted: %s)" % (action, ", ".join(ACTIONS)))
    if caller not in CALLERS:
        raise AuthError("unknown auth caller %r (accepted: %s)" % (caller, ", ".join(CALLERS)))
    hosts = [str(h) for h in hosts]
    args = [str(a) for a in args]
    hook = getattr(cfg, "auth_hook", None)
    if not hook:
        decision = _decide_without_hook(cfg, caller)
    else:
        context = {
            "action": action,
            "script": script or "",
            "hosts": hosts,
            "args": args,
            "username": username or "",
            "token": token or "",
            "source_ip": source_ip or "",
            # The control host has no dispatcher identity of its own to report; these
            # two are filled only on the agent side (reference §7.3).
            "dispatcher": "",
            "dispatcher_serial": "",
            "reqid": reqid or "",
            "submitter": dict(submitter) if submitter is not None else None,
            "timestamp": wire.utc_timestamp(),
        }
        decision = _decide_with_hook(cfg, hook, action, context)
    _log_decision(decision, action=action, username=username, source_ip=source_ip,
                  reqid=reqid, hooked=bool(hook))
    return decision


# --- private ---

_ALLOW = AuthDecision(True, "", 0, "")


def _decide_without_hook(cfg: Any, caller: str) -> AuthDecision:
    """No hook configured: the CLI runs as the operator; the API follows api_auth_default."""
    if caller == "cli":
        return _ALLOW
    if str(getattr(cfg, "api_auth_default", "deny")).strip().lower() == "allow":
        return _ALLOW
    return AuthDecision(False, NO_HOOK_ERROR, DENIED_CODE, "")


def _decide_with_hook(cfg: Any, hook: str, action: str, context: dict) -> AuthDecision:
    """Run the hook; anything but a clean exit 0 is a denial (fail closed)."""
    timeout_s = float(getattr(cfg, "auth_hook_timeout", 10.0) or 10.0)
    started = time.monotonic()
    try:
        # run_auth_hook builds ENVEXEC_* (SUBMITTER/SUBMITTER_IP included) from context.
        result = wire.run_auth_hook(hook, timeout_s=timeout_s, action=action,
                                    context=context, extra_env={})
    except Exception as exc:  # noqa: BLE001 - any failure of the runner must deny
        wire.log_action("err", "auth-hook-fail", authaction=action,
                        error=type(exc).__name__)
        return AuthDecision(False, DENIED_ERROR, DENIED_CODE, "auth hook could not be run")
    if result.allowed and time.monotonic() - started > timeout_s:
        # Defence in depth: a verdict that arrives after the deadline is not a verdict
        # (gevent's Popen.communicate ignores its timeout when only stdin is a pipe).
        wire.log_action("warning", "auth-hook-timeout", authaction=action, timeout=timeout_s)
        return AuthDecision(False, DENIED_ERROR, DENIED_CODE,
                            "auth hook timed out after %gs" % timeout_s)
    if result.allowed:
        return _ALLOW
    error = result.error or DENIED_ERROR
    code = int(result.code) if result.code else DENIED_CODE
    return AuthDecision(False, error, code, result.detail or "")


def _log_decision(decision: AuthDecision, *, action: str, username: str, source_ip: str,
                  reqid: str, hooked: bool) -> None:
    """One ACTION=auth line; the token is never passed here."""
    fields = {"authaction": action, "user": username or "(none)", "ip": source_ip or ""}
    if reqid:
        fields["reqid"] = reqid
    if decision.allowed:
        wire.log_action("info", "auth", result="pass", **fields)
        return
    if not hooked:
        reason = "no-hook-deny"
        result = "deny"
    elif decision.detail:
        # The hook did not give a verdict (timeout, signal, missing, odd exit).
        reason = decision.detail
        result = "error"
    else:
        reason = decision.error
        result = "deny"
    wire.log_action("warning", "auth", result=result, reason=reason, code=decision.code,
                    **fields)
