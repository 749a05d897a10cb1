"""Tests for ctrlexec_api.py: the HTTP API of SPEC §6 / seed ctrl-exec-api.md.

Three layers:
- route shapes and validation in-process (make_app through wsgiref.validate); a tiny
  fake engine is used only where no agent is involved in what is being checked;
- end to end in-process against real agents (the `fleet` fixture: real pki.py
  certificates, real `ctrlexec_agent.py serve` processes on 127.0.0.x);
- over the wire: a real `python ctrlexec_api.py --config …` process, plain and TLS.
Every response is checked against openapi.json (apitest_support.check_response).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import warnings

import gevent
import gevent.event
import jsonschema
import pytest
from openapi_spec_validator import validate as validate_spec

import config
import ctrlexec_agent as wire
import ctrlexec_api
import httpserver
import pki
import service
import store
from apitest_support import (SPEC, SPEC_PATH, ApiServer, call, check_response,
                             read_http_response)
from fleet import free_port, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API = os.path.join(ROOT, "ctrlexec_api.py")
#: Upper bound for any wait in these tests (never a timing assertion).
WAIT_S = 30.0
HELLO = "#!/bin/sh\necho hi\n"


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


class FakeEngine:
    """Stand-in for engine.Engine in route-shape tests that involve no agent."""

    def __init__(self) -> None:
        self.calls = []
        self.gate = None            # a gevent Event: ping_all waits on it when set

    def ping_all(self, targets, *, reqid):
        self.calls.append(("ping_all", [t.entry for t in targets]))
        if self.gate is not None:
            self.gate.wait(WAIT_S)
        return [{"host": t.entry, "status": "error", "error": "fake", "rtt": "0ms"}
                for t in targets]

    def capabilities_all(self, targets):
        self.calls.append(("capabilities_all", [t.entry for t in targets]))
        return [{"host": t.entry, "status": "error", "error": "fake", "rtt": "0ms"}
                for t in targets]

    def dispatch_all(self, targets, **kwargs):
        self.calls.append(("dispatch_all", [t.entry for t in targets]))
        return [{"host": t.entry, "script": kwargs["script"], "exit": -1, "error": "fake",
                 "rtt": "0ms", "reqid": kwargs["reqid"]} for t in targets]

    def refresh_async(self, record, registry):
        return record


def unit_cfg(tmp_path, **over) -> config.Config:
    values = {"state_dir": str(tmp_path / "state"), "ca_dir": str(tmp_path / "pki"),
              "api_auth_default": "allow", "auth_hook_timeout": 0.5}
    values.update(over)
    return config.Config(**values)


@pytest.fixture
def unit_app(tmp_path):
    engine = FakeEngine()
    app = ctrlexec_api.make_app(unit_cfg(tmp_path), engine=engine)
    app.fake_engine = engine
    return app


def bad(detail: str) -> dict:
    return {"ok": False, "error": "bad request", "detail": detail}


def write_exe(path, body: str) -> str:
    with open(str(path), "w") as fh:
        fh.write(body)
    os.chmod(str(path), 0o755)
    return str(path)


def rules_hook(folder) -> tuple:
    """A real hook: exit code per action from rules.json (default 0); records what it saw."""
    rules = os.path.join(str(folder), "rules.json")
    seen = os.path.join(str(folder), "seen.jsonl")
    with open(rules, "w") as fh:
        json.dump({}, fh)
    hook = write_exe(os.path.join(str(folder), "hook.py"), """#!/usr/bin/env python3
import json, os, sys
data = json.loads(sys.stdin.read())
env = {k: v for k, v in os.environ.items() if k.startswith("ENVEXEC_")}
with open(%r, "a") as fh:
    fh.write(json.dumps({"stdin": data, "env": env}) + "\\n")
with open(%r) as fh:
    rules = json.load(fh)
sys.exit(int(rules.get(data["action"], 0)))
""" % (seen, rules))

    def set_rules(**codes):
        with open(rules, "w") as fh:
            json.dump(codes, fh)

    def read_seen():
        if not os.path.exists(seen):
            return []
        with open(seen) as fh:
            out = [json.loads(line) for line in fh if line.strip()]
        os.unlink(seen)
        return out

    return hook, set_rules, read_seen


def tree_snapshot(*folders) -> dict:
    """{path: (size, mtime_ns)} of every file under folders."""
    out = {}
    for folder in folders:
        for dirpath, _, files in os.walk(folder):
            for name in files:
                path = os.path.join(dirpath, name)
                st = os.stat(path)
                out[path] = (st.st_size, st.st_mtime_ns)
    return out


# ---------------------------------------------------------------------------
# openapi.json itself
# ---------------------------------------------------------------------------


def test_openapi_json_is_valid_openapi_3_1():
    with open(SPEC_PATH) as fh:
        spec = json.load(fh)
    validate_spec(spec)
    assert spec["openapi"].startswith("3.1")
    assert spec["info"]["version"] == wire.VERSION
    for path in ("/", "/health", "/ping", "/run", "/discovery", "/status/{reqid}",
                 "/openapi.json", "/openapi-live.json", "/docs"):
        assert path in spec["paths"], path
    schemas = spec["components"]["schemas"]
    for name in ("PingRequest", "RunRequest", "DiscoveryRequest", "Error", "AuthError",
                 "LockConflict", "RunResponse", "AsyncRunResponse", "StatusResponse",
                 "PingResponse", "DiscoveryResponse", "Health", "Index"):
        assert name in schemas, name
    for name in ("PingRequest", "RunRequest", "DiscoveryRequest"):
        assert schemas[name]["properties"]["hosts"]["items"]["type"] == "string"
    assert schemas["RunRequest"]["properties"]["script"]["pattern"] == "^[A-Za-z0-9_-]{1,128}$"


def test_request_schemas_agree_with_the_validator():
    """The documented request schemas accept what the API accepts (and vice versa)."""
    run_schema = dict(SPEC["components"]["schemas"]["RunRequest"], components=SPEC["components"])
    validator = jsonschema.Draft202012Validator(run_schema)
    good = {"hosts": ["a", "b:7450"], "script": "x_y-1", "args": ["1"], "async": True,
            "timeout": 5, "username": "u", "token": "t"}
    assert not list(validator.iter_errors(good))
    service.validate_run(good, max_hosts=500)
    for body in ({"hosts": [], "script": "x"}, {"hosts": ["a"], "script": "a b"},
                 {"hosts": ["a"], "script": "x", "args": [1]},
                 {"hosts": ["a"], "script": "x", "timeout": 0}):
        assert list(validator.iter_errors(body)), body
        with pytest.raises(service.BadRequest):
            service.validate_run(body, max_hosts=500)


# ---------------------------------------------------------------------------
# route shapes (no agent involved)
# ---------------------------------------------------------------------------


def test_health_and_index(unit_app):
    resp = call(unit_app, "GET", "/health")
    assert resp.status == 200
    assert resp.headers["content-type"] == "application/json"
    assert resp.json == {"ok": True, "version": wire.VERSION}
    resp = call(unit_app, "GET", "/")
    assert resp.status == 200
    assert resp.json["name"] == "ctrl-exec-api"
    assert resp.json["spec"] == "/openapi.json"
    assert resp.json["live_spec"] == "/openapi-live.json"
    listed = [(e["method"], e["path"]) for e in resp.json["endpoints"]]
    for entry in [("GET", "/health"), ("POST", "/ping"), ("POST", "/run"), ("GET", "/discovery"),
                  ("POST", "/discovery"), ("GET", "/status/{reqid}"), ("GET", "/openapi.json"),
                  ("GET", "/openapi-live.json")]:
        assert entry in listed


def test_unknown_route_is_a_json_404(unit_app):
    for method, path in [("GET", "/nope"), ("POST", "/nope"), ("GET", "/health/"),
                         ("GET", "/status/NOT-HEX")]:
        resp = call(unit_app, method, path)
        assert resp.status == 404, (method, path)
        assert resp.headers["content-type"] == "application/json"
        assert resp.json == {"ok": False, "error": "not found",
                             "detail": "no route for %s %s" % (method, path)}


def test_known_path_with_an_undeclared_method_is_a_json_405_with_allow(unit_app):
    for method, path, allowed in [("POST", "/health", "GET"), ("GET", "/run", "POST"),
                                  ("DELETE", "/discovery", "GET, POST"), ("PUT", "/ping", "POST"),
                                  ("PATCH", "/status/0123456789abcdef", "GET")]:
        resp = call(unit_app, method, path)
        assert resp.status == 405, (method, path)
        assert resp.headers["content-type"] == "application/json"
        assert sorted(m.strip() for m in resp.headers["allow"].split(",")) == \
            sorted(m.strip() for m in allowed.split(","))
        assert resp.json == {"ok": False, "error": "method not allowed",
                             "detail": "no route for %s %s (%s accepts %s)"
                                       % (method, path, path, resp.headers["allow"])}
        check_response(method, path, resp)


def test_query_string_is_ignored_for_routing(unit_app):
    resp = call(unit_app, "GET", "/health?verbose=1")
    assert resp.status == 200 and resp.json["ok"] is True


def test_static_spec_and_docs(unit_app):
    resp = call(unit_app, "GET", "/openapi.json")
    assert resp.status == 200
    with open(SPEC_PATH, "rb") as fh:
        assert resp.data == fh.read()
    resp = call(unit_app, "GET", "/docs")
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("text/html")
    assert b'<rapi-doc spec-url="/openapi-live.json"' in resp.data
    assert b"cdn" not in resp.data.lower() and b"https://" not in resp.data
    assert b'<script type="module" src="/docs/rapidoc-min.js">' in resp.data
    assert b"is not installed" not in resp.data


def test_docs_viewer_is_served_from_the_installed_package(unit_app):
    path = ctrlexec_api._rapidoc_path()
    assert path.endswith(os.path.join("flask_openapi3_rapidoc", ctrlexec_api.RAPIDOC_FILE))
    resp = call(unit_app, "GET", "/docs/rapidoc-min.js")
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("application/javascript")
    with open(path, "rb") as handle:
        assert resp.data == handle.read()


def test_docs_without_the_viewer_say_how_to_install_it(unit_app, monkeypatch):
    monkeypatch.setattr(ctrlexec_api, "RAPIDOC_PACKAGE", "no_such_rapidoc_package")
    resp = call(unit_app, "GET", "/docs")
    assert resp.status == 200
    assert b"is not installed on this control host" in resp.data
    assert ctrlexec_api.RAPIDOC_INSTALL.encode() in resp.data
    resp = call(unit_app, "GET", "/docs/rapidoc-min.js")
    assert resp.status == 404
    assert "requirements-docs.txt" in resp.json["detail"]


@pytest.mark.parametrize("path", ["/run", "/ping"])
@pytest.mark.parametrize("raw,detail", [
    (b"", "request body required"),
    (b"{not json", "invalid JSON body"),
    (b"[1, 2]", "invalid JSON body"),
    (b'"hosts"', "invalid JSON body"),
    (b"\xff\xfe{}", "invalid JSON body"),
    (b"{}", "hosts must be a non-empty array of host names"),
    (b'{"hosts": []}', "hosts must be a non-empty array of host names"),
    (b'{"hosts": "web-01"}', "hosts must be a non-empty array of host names"),
    (b'{"hosts": ["a", 1]}', "hosts must be a non-empty array of host names"),
    (b'{"hosts": ["a", ""]}', "hosts must be a non-empty array of host names"),
    (b'{"hosts": ["a"], "username": 5}', "username must be a string"),
])
def test_bad_request_common_to_run_and_ping(unit_app, path, raw, detail):
    if "username" in raw.decode("latin1") and path == "/run":
        raw = raw[:-1] + b', "script": "x"}'
    resp = call(unit_app, "POST", path, raw=raw)
    assert resp.status == 400
    assert resp.json == bad(detail)
    assert unit_app.fake_engine.calls == []


@pytest.mark.parametrize("body,detail", [
    ({"hosts": ["a"]}, "script name required (letters, digits, '_' and '-' only)"),
    ({"hosts": ["a"], "script": ""}, "script name required (letters, digits, '_' and '-' only)"),
    ({"hosts": ["a"], "script": "../x"}, "script name required (letters, digits, '_' and '-' only)"),
    ({"hosts": ["a"], "script": "a b"}, "script name required (letters, digits, '_' and '-' only)"),
    ({"hosts": ["a"], "script": "x\n"}, "script name required (letters, digits, '_' and '-' only)"),
    ({"hosts": ["a"], "script": "d\u00e9ploy"}, "script name required (letters, digits, '_' and '-' only)"),
    ({"hosts": ["a"], "script": "x" * 129}, "script name required (letters, digits, '_' and '-' only)"),
    ({"hosts": ["a"], "script": 7}, "script name required (letters, digits, '_' and '-' only)"),
    ({"hosts": ["a"], "script": "x", "args": ["ok", 1]}, "args must be an array of strings"),
    ({"hosts": ["a"], "script": "x", "args": "--all"}, "args must be an array of strings"),
    ({"hosts": ["a"], "script": "x", "args": [None]}, "args must be an array of strings"),
    ({"hosts": ["a"], "script": "x", "args": ["a"] * 257}, "args must be an array of strings"),
    ({"hosts": ["a"], "script": "x", "token": ["t"]}, "token must be a string"),
    ({"hosts": ["a"], "script": "x", "async": "yes"}, "async must be a boolean"),
    ({"hosts": ["a"], "script": "x", "stream": 1}, "stream must be a boolean"),
    ({"hosts": ["a"], "script": "x", "timeout": 0}, "timeout must be a positive integer"),
    ({"hosts": ["a"], "script": "x", "timeout": -5}, "timeout must be a positive integer"),
    ({"hosts": ["a"], "script": "x", "timeout": 1.5}, "timeout must be a positive integer"),
    ({"hosts": ["a"], "script": "x", "timeout": "10"}, "timeout must be a positive integer"),
    ({"hosts": ["a"], "script": "x", "timeout": True}, "timeout must be a positive integer"),
    # validation order: hosts before script before args
    ({"hosts": [], "script": "../x", "args": [1]}, "hosts must be a non-empty array of host names"),
    ({"hosts": ["a"], "script": "../x", "args": [1]},
     "script name required (letters, digits, '_' and '-' only)"),
])
def test_bad_run_requests_exact_bodies(unit_app, body, detail):
    resp = call(unit_app, "POST", "/run", body)
    assert resp.status == 400
    assert resp.json == bad(detail)
    assert unit_app.fake_engine.calls == []


def test_too_many_hosts_counts_after_collapsing_duplicates(unit_app):
    resp = call(unit_app, "POST", "/run", {"hosts": ["h%d" % i for i in range(501)],
                                           "script": "x"})
    assert resp.status == 400
    assert resp.json == bad("too many hosts (max 500)")
    # 1000 entries but only 500 distinct names: accepted (all unknown -> inline rows)
    hosts = ["h%d" % (i % 500) for i in range(1000)]
    resp = call(unit_app, "POST", "/ping", {"hosts": hosts})
    assert resp.status == 200
    assert [r["host"] for r in resp.json["results"]] == ["h%d" % i for i in range(500)]


def test_max_hosts_comes_from_config(tmp_path):
    app = ctrlexec_api.make_app(unit_cfg(tmp_path, max_hosts=3), engine=FakeEngine())
    resp = call(app, "POST", "/ping", {"hosts": ["a", "b", "c", "d"]})
    assert resp.json == bad("too many hosts (max 3)")


def test_two_mib_body_is_413(unit_app):
    raw = b'{"hosts": ["a"], "script": "x", "args": ["' + b"a" * (2 * 1048576) + b'"]}'
    resp = call(unit_app, "POST", "/run", raw=raw)
    assert resp.status == 413
    assert resp.json == {"ok": False, "error": "payload too large",
                         "detail": "body exceeds 1048576 bytes"}
    assert unit_app.fake_engine.calls == []


def test_discovery_post_validation(unit_app):
    for raw, detail in [(b'{"hosts": []}', "hosts must be a non-empty array of host names"),
                        (b'{"hosts": "a"}', "hosts must be a non-empty array of host names"),
                        (b'{"hosts": null}', "hosts must be a non-empty array of host names"),
                        (b"[]", "invalid JSON body"), (b"{", "invalid JSON body")]:
        resp = call(unit_app, "POST", "/discovery", raw=raw)
        assert resp.status == 400, raw
        assert resp.json == bad(detail)
    # no body or no hosts: every registered agent (none here)
    for raw in (b"", b"{}"):
        resp = call(unit_app, "POST", "/discovery", raw=raw)
        assert resp.status == 200
        assert resp.json == {"ok": True, "hosts": {}}


def test_status_unknown_and_malformed_reqids(unit_app):
    resp = call(unit_app, "GET", "/status/0123456789abcdef")
    assert resp.status == 404
    assert resp.json == {"ok": False, "error": "not found",
                         "detail": "no result for reqid 0123456789abcdef"}
    for reqid in ("XYZ", "0123456789ABCDEF", "abc", "a" * 65, "..%2f..", "0123456789abcdeg"):
        resp = call(unit_app, "GET", "/status/" + reqid)
        assert resp.status == 404, reqid
        assert resp.json["ok"] is False and resp.json["error"] == "not found"
    resp = call(unit_app, "GET", "/status/")
    assert resp.status == 404


def test_default_deny_without_hook_refuses_everything(tmp_path):
    app = ctrlexec_api.make_app(unit_cfg(tmp_path, api_auth_default="deny"), engine=FakeEngine())
    denied = {"ok": False, "error": "no auth hook configured", "code": 1}
    for method, path, body in [("GET", "/health", None), ("GET", "/", None),
                               ("POST", "/run", {"hosts": ["a"], "script": "x"}),
                               ("GET", "/status/0123456789abcdef", None)]:
        resp = call(app, method, path, body)
        assert resp.status == 403, path
        assert resp.json == denied


def test_auth_deny_generic_hides_the_reason(tmp_path):
    app = ctrlexec_api.make_app(unit_cfg(tmp_path, api_auth_default="deny",
                                         auth_deny_generic=True), engine=FakeEngine())
    resp = call(app, "GET", "/health")
    assert resp.status == 403
    assert resp.json == {"ok": False, "error": "forbidden"}


def test_overload_answers_503(tmp_path):
    engine = FakeEngine()
    engine.gate = gevent.event.Event()
    app = ctrlexec_api.make_app(unit_cfg(tmp_path, api_max_children=1), engine=engine)
    first = gevent.spawn(call, app, "POST", "/ping", {"hosts": ["a"]})
    wait_for(lambda: engine.calls, "the first request to reach the engine")
    resp = call(app, "GET", "/health")
    assert resp.status == 503
    assert resp.json == {"ok": False, "error": "service unavailable",
                         "detail": "too many concurrent requests"}
    engine.gate.set()
    assert first.get(timeout=WAIT_S).status == 200
    assert call(app, "GET", "/health").status == 200        # the slot came back


def test_request_log_line(unit_app, capfd, monkeypatch):
    monkeypatch.setenv("CTRL_EXEC_LOG", "stderr")
    wire.setup_logging("ctrl-exec-api")
    call(unit_app, "GET", "/health?token=SECRET", remote="127.0.0.9")
    err = capfd.readouterr().err
    line = [l for l in err.splitlines() if "ACTION=api-request" in l][-1]
    assert re.search(r"ACTION=api-request METHOD=GET MS=\d+ PATH=/health PEER=127.0.0.9 "
                     r"STATUS=200$", line), line
    assert "SECRET" not in err


# ---------------------------------------------------------------------------
# auth hook through the API (real hook executables)
# ---------------------------------------------------------------------------


@pytest.fixture
def hooked(tmp_path):
    hook, set_rules, read_seen = rules_hook(tmp_path)
    cfg = unit_cfg(tmp_path, auth_hook=hook, api_auth_default="deny")
    app = ctrlexec_api.make_app(cfg, engine=FakeEngine())
    return app, set_rules, read_seen, cfg


def test_hook_sees_api_then_run_with_body_token(hooked):
    app, set_rules, read_seen, _ = hooked
    resp = call(app, "POST", "/run", {"hosts": ["web-01", "web-01"], "script": "deploy",
                                      "args": ["--fast", "a b"], "username": "alice",
                                      "token": "body-token"},
                headers={"Authorization": "Bearer header-token"}, remote="127.0.0.7")
    assert resp.status == 200
    seen = read_seen()
    assert [s["stdin"]["action"] for s in seen] == ["api", "run"]
    api_seen, run_seen = seen
    assert api_seen["stdin"]["token"] == "body-token"
    assert api_seen["stdin"]["source_ip"] == "127.0.0.7"
    assert run_seen["stdin"]["script"] == "deploy"
    assert run_seen["stdin"]["hosts"] == ["web-01"]
    assert run_seen["stdin"]["args"] == ["--fast", "a b"]
    assert run_seen["stdin"]["username"] == "alice"
    assert run_seen["stdin"]["token"] == "body-token"
    assert run_seen["env"]["ENVEXEC_ACTION"] == "run"
    assert run_seen["env"]["ENVEXEC_HOSTS"] == "web-01"
    assert json.loads(run_seen["env"]["ENVEXEC_ARGS_JSON"]) == ["--fast", "a b"]
    assert run_seen["env"]["ENVEXEC_TOKEN"] == "body-token"
    assert run_seen["env"]["ENVEXEC_SOURCE_IP"] == "127.0.0.7"


def test_hook_gets_bearer_token_when_body_has_none(hooked):
    app, set_rules, read_seen, _ = hooked
    resp = call(app, "GET", "/health", headers={"Authorization": "Bearer header-token"})
    assert resp.status == 200
    (seen,) = read_seen()
    assert seen["stdin"]["action"] == "api"
    assert seen["stdin"]["token"] == "header-token"
    resp = call(app, "POST", "/ping", {"hosts": ["a"]},
                headers={"Authorization": "Bearer header-token"})
    assert resp.status == 200
    assert [(s["stdin"]["action"], s["stdin"]["token"]) for s in read_seen()] == \
        [("api", "header-token"), ("ping", "header-token")]


@pytest.mark.parametrize("code,body", [
    (1, {"ok": False, "error": "denied", "code": 1}),
    (2, {"ok": False, "error": "bad credentials", "code": 2}),
    (3, {"ok": False, "error": "insufficient privilege", "code": 3}),
    (7, {"ok": False, "error": "denied", "code": 1, "detail": "auth hook exited 7"}),
])
def test_hook_exit_codes_answer_403(hooked, code, body):
    app, set_rules, read_seen, _ = hooked
    set_rules(run=code)
    resp = call(app, "POST", "/run", {"hosts": ["a"], "script": "x"})
    assert resp.status == 403
    assert resp.json == body
    assert app.handlers.runs.engine.calls == []
    set_rules(api=code)
    resp = call(app, "GET", "/health")
    assert resp.status == 403
    assert resp.json == body


def test_discovery_uses_ping_action_and_status_uses_status_action(hooked):
    app, set_rules, read_seen, cfg = hooked
    set_rules(ping=2)
    resp = call(app, "GET", "/discovery")
    assert resp.status == 403 and resp.json["error"] == "bad credentials"
    assert [s["stdin"]["action"] for s in read_seen()] == ["api", "ping"]
    # a stored run, then /status with the status action, reqid and submitter
    st = store.open_store(cfg)
    st.runs.save({"reqid": "00112233aabbccdd", "script": "x", "mode": "sync", "hosts": ["a"],
                  "results": [], "completed": 1, "complete": True,
                  "submitter": {"username": "bob", "source_ip": "10.1.1.1"}})
    set_rules(status=3)
    resp = call(app, "GET", "/status/00112233aabbccdd",
                headers={"Authorization": "Bearer st-token"})
    assert resp.status == 403
    assert resp.json == {"ok": False, "error": "insufficient privilege", "code": 3}
    api_seen, status_seen = read_seen()
    assert status_seen["stdin"]["action"] == "status"
    assert status_seen["stdin"]["reqid"] == "00112233aabbccdd"
    assert status_seen["stdin"]["token"] == "st-token"
    assert status_seen["stdin"]["submitter"] == {"username": "bob", "source_ip": "10.1.1.1"}
    assert status_seen["env"]["ENVEXEC_SUBMITTER"] == "bob"
    assert status_seen["env"]["ENVEXEC_SUBMITTER_IP"] == "10.1.1.1"
    set_rules()
    resp = call(app, "GET", "/status/00112233aabbccdd")
    assert resp.status == 200
    assert "submitter" not in resp.json


def test_hook_timeout_signal_and_missing_deny(tmp_path):
    cases = [
        ("#!/bin/sh\nsleep 2\nexit 0\n", "auth hook timed out after 0.5s"),
        ("#!/bin/sh\nkill -9 $$\n", "auth hook killed by signal 9"),
        (None, "auth hook is missing or not executable"),
    ]
    for i, (body, detail) in enumerate(cases):
        hook = str(tmp_path / ("hook%d" % i))
        if body is not None:
            write_exe(hook, body)
        app = ctrlexec_api.make_app(unit_cfg(tmp_path, auth_hook=hook, auth_hook_timeout=0.5),
                                    engine=FakeEngine())
        resp = call(app, "GET", "/health")
        assert resp.status == 403, detail
        assert resp.json == {"ok": False, "error": "denied", "code": 1, "detail": detail}
        assert hook not in resp.data.decode()


# ---------------------------------------------------------------------------
# end to end against real agents (in-process API, real agents on 127.0.0.x)
# ---------------------------------------------------------------------------


@pytest.fixture
def live(fleet):
    """The fleet plus an app factory over its real config, store and engine."""

    def make(**conf):
        if conf:
            fleet.set_conf(**conf)
        return ctrlexec_api.make_app(fleet.cfg)

    fleet.make_app = make
    return fleet


def test_run_sync_three_hosts_one_failing_inline_and_status(live):
    live.add_agent("web-01", scripts={"hello": HELLO})
    live.add_agent("web-02", scripts={"hello": "#!/bin/sh\necho \"args:$*\"\necho oops >&2\nexit 3\n"})
    live.add_agent("web-03", scripts={"hello": HELLO}).stop()       # registered, down
    app = live.make_app()
    resp = call(app, "POST", "/run", {"hosts": ["web-01", "web-02", "web-03", "ghost"],
                                      "script": "hello", "args": ["x", "y z"],
                                      "username": "alice", "token": "tok-1"})
    assert resp.status == 200, resp
    body = resp.json
    assert body["ok"] is True and re.fullmatch(r"[a-f0-9]{16}", body["reqid"])
    rows = body["results"]
    assert [r["host"] for r in rows] == ["web-01", "web-02", "web-03", "ghost"]
    assert rows[0]["exit"] == 0 and rows[0]["stdout"] == "hi\n" and rows[0]["script"] == "hello"
    assert rows[1]["exit"] == 3 and rows[1]["stdout"] == "args:x y z\n"
    assert rows[1]["stderr"] == "oops\n"
    assert rows[2]["exit"] == -1 and rows[2]["error"]
    assert rows[3]["exit"] == -1
    assert rows[3]["error"] == "unknown agent 'ghost' (not paired)"
    for row in rows:
        assert row["reqid"] == body["reqid"]
        assert re.fullmatch(r"\d+ms", row["rtt"])
    # the record was stored before the response, without the token (the file itself:
    # test_store.py test_stored_run_file_is_0640_plain_json_without_secrets)
    stored = store.Store(live.cfg).runs.load(body["reqid"])
    assert "tok-1" not in json.dumps(stored)
    assert stored["mode"] == "sync" and stored["complete"] is True
    assert stored["submitter"] == {"username": "alice", "source_ip": "127.0.0.1"}
    # /status of the finished run
    resp = call(app, "GET", "/status/" + body["reqid"])
    assert resp.status == 200
    st = resp.json
    assert st["ok"] is True and st["reqid"] == body["reqid"] and st["script"] == "hello"
    assert st["mode"] == "sync" and st["complete"] is True
    assert st["hosts"] == ["web-01", "web-02", "web-03", "ghost"]
    assert isinstance(st["completed"], int)
    assert st["results"] == rows
    assert "submitter" not in st


def test_ping_has_top_level_reqid(live):
    live.add_agent("db-01", scripts={"hello": HELLO})
    app = live.make_app()
    resp = call(app, "POST", "/ping", {"hosts": ["db-01", "nobody"]})
    assert resp.status == 200
    body = resp.json
    assert re.fullmatch(r"[a-f0-9]{16}", body["reqid"])
    ok, unknown = body["results"]
    assert ok["host"] == "db-01" and ok["status"] == "ok" and ok["reqid"] == body["reqid"]
    assert ok["version"] and ok["expiry"]
    assert unknown["host"] == "nobody" and unknown["status"] == "error"
    assert unknown["error"] == "unknown agent 'nobody' (not paired)"


def test_discovery_get_and_post_filter_and_tag_cache(live):
    live.add_agent("web-01", scripts={"hello": HELLO, "deploy": HELLO},
                   tags={"env": "prod", "role": "web"})
    live.add_agent("db-01", scripts={"hello": HELLO})
    down = live.add_agent("old-01", scripts={"hello": HELLO}, start=False)
    assert down.proc is None
    # the registry has no tags for web-01 until discovery caches them
    live.registry.update("web-01", tags={})
    app = live.make_app()
    resp = call(app, "GET", "/discovery")
    assert resp.status == 200
    hosts = resp.json["hosts"]
    assert sorted(hosts) == ["db-01", "old-01", "web-01"]
    assert hosts["web-01"]["status"] == "ok"
    assert hosts["web-01"]["tags"] == {"env": "prod", "role": "web"}
    assert sorted(s["name"] for s in hosts["web-01"]["scripts"]) == ["deploy", "hello"]
    assert hosts["db-01"]["tags"] == {}
    err = hosts["old-01"]
    assert err["status"] == "error" and set(err) == {"host", "status", "error", "rtt"}
    assert live.registry.get("web-01")["tags"] == {"env": "prod", "role": "web"}
    resp = call(app, "POST", "/discovery", {"hosts": ["db-01"]})
    assert resp.status == 200
    assert list(resp.json["hosts"]) == ["db-01"]
    assert resp.json["hosts"]["db-01"]["status"] == "ok"


def test_async_run_then_status_until_complete(live):
    live.add_agent("app-01", scripts={"slow": "#!/bin/sh\nsleep 1\necho done-1\n"})
    live.add_agent("app-02", scripts={"slow": "#!/bin/sh\necho done-2\nexit 4\n"})
    app = live.make_app()
    resp = call(app, "POST", "/run", {"hosts": ["app-01", "app-02", "ghost"], "script": "slow",
                                      "async": True})
    assert resp.status == 202, resp
    body = resp.json
    assert body["ok"] is True and body["async"] is True
    reqid = body["reqid"]
    statuses = {r["host"]: r["status"] for r in body["results"]}
    assert statuses["app-01"] == "accepted" and statuses["app-02"] == "accepted"
    assert statuses["ghost"] == "error"

    def poll():
        got = call(app, "GET", "/status/" + reqid)
        assert got.status == 200
        return got.json if got.json["complete"] else None

    first = call(app, "GET", "/status/" + reqid).json
    assert first["mode"] == "async" and first["reqid"] == reqid and first["script"] == "slow"
    if not first["complete"]:
        assert "completed" not in first and first["pending"]
    final = wait_for(poll, "the async run to complete")
    assert final["pending"] == [] and isinstance(final["completed"], int)
    assert final["hosts"] == ["app-01", "app-02", "ghost"]
    rows = {r["host"]: r for r in final["results"]}
    assert [r["host"] for r in final["results"]] == ["app-01", "app-02", "ghost"]
    assert rows["app-01"]["status"] == "done" and rows["app-01"]["exit"] == 0
    assert rows["app-01"]["stdout"] == "done-1\n"
    assert rows["app-02"]["status"] == "done" and rows["app-02"]["exit"] == 4
    assert rows["ghost"]["status"] == "error"


def test_concurrent_runs_same_host_and_script_one_409(live, tmp_path):
    marker = tmp_path / "ran.txt"
    live.add_agent("db-01", scripts={"backup": "#!/bin/sh\necho run >> %s\nsleep 1\n" % marker})
    app = live.make_app()
    body = {"hosts": ["db-01"], "script": "backup"}
    first = gevent.spawn(call, app, "POST", "/run", body)
    second = gevent.spawn(call, app, "POST", "/run", dict(body, hosts=["db-01:%d" % live.agents["db-01"].port]))
    responses = [first.get(timeout=WAIT_S), second.get(timeout=WAIT_S)]
    codes = sorted(r.status for r in responses)
    assert codes == [200, 409], responses
    conflict = [r for r in responses if r.status == 409][0]
    assert conflict.json == {"ok": False, "error": "locked", "code": 4, "conflicts": ["db-01"]}
    done = [r for r in responses if r.status == 200][0]
    assert done.json["results"][0]["exit"] == 0
    assert marker.read_text() == "run\n"
    assert live.registry is not None and store.Locks(live.cfg.state_dir).held() == []


def test_locks_released_before_response(live):
    live.add_agent("db-01", scripts={"hello": HELLO})
    app = live.make_app()
    for _ in range(3):
        resp = call(app, "POST", "/run", {"hosts": ["db-01"], "script": "hello"})
        assert resp.status == 200, resp
        assert store.Locks(live.cfg.state_dir).held() == []


def test_live_spec_enums_version_and_no_disk_writes(live):
    live.add_agent("web-01", scripts={"hello": HELLO, "deploy": HELLO})
    live.add_agent("db-01", scripts={"hello": HELLO, "backup": HELLO})
    live.add_agent("old-01", scripts={"only-old": HELLO}, start=False)
    app = live.make_app()
    with open(SPEC_PATH, "rb") as fh:
        spec_bytes = fh.read()
    spec_mtime = os.stat(SPEC_PATH).st_mtime_ns
    state_before = tree_snapshot(live.cfg.state_dir)
    resp = call(app, "GET", "/openapi-live.json")
    assert resp.status == 200
    spec = resp.json
    validate_spec(spec)
    schemas = spec["components"]["schemas"]
    for name in ("PingRequest", "RunRequest", "DiscoveryRequest"):
        assert schemas[name]["properties"]["hosts"]["items"]["enum"] == \
            ["db-01", "old-01", "web-01"], name
    assert schemas["RunRequest"]["properties"]["script"]["enum"] == ["backup", "deploy", "hello"]
    assert re.fullmatch(re.escape(wire.VERSION) + r"\+\d+", spec["info"]["version"])
    again = call(app, "GET", "/openapi-live.json").json
    assert re.fullmatch(re.escape(wire.VERSION) + r"\+\d+", again["info"]["version"])
    with open(SPEC_PATH, "rb") as fh:
        assert fh.read() == spec_bytes
    assert os.stat(SPEC_PATH).st_mtime_ns == spec_mtime
    assert tree_snapshot(live.cfg.state_dir) == state_before


def test_live_spec_strips_an_existing_version_suffix(live, tmp_path, monkeypatch):
    with open(SPEC_PATH) as fh:
        spec = json.load(fh)
    spec["info"]["version"] = "9.9.9+1234"
    stamped = tmp_path / "openapi.json"
    stamped.write_text(json.dumps(spec))
    monkeypatch.setattr(ctrlexec_api, "OPENAPI_PATH", str(stamped))
    app = live.make_app()
    version = call(app, "GET", "/openapi-live.json").json["info"]["version"]
    assert re.fullmatch(r"9\.9\.9\+\d+", version) and version != "9.9.9+1234"


def test_stream_ndjson_events_and_stored_like_sync(live):
    live.add_agent("web-01", scripts={"talk": "#!/bin/sh\necho one\necho two >&2\necho three\n"})
    app = live.make_app()
    resp = call(app, "POST", "/run", {"hosts": ["web-01", "ghost"], "script": "talk",
                                      "stream": True})
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("application/x-ndjson")
    events = resp.json
    assert events[0]["event"] == "start"
    done = events[-1]
    assert done["event"] == "done" and done["ok"] is True
    reqid = done["reqid"]
    out = "".join(e["data"] for e in events if e["event"] == "stdout" and e.get("host") == "web-01")
    assert out == "one\nthree\n"
    exits = {e["host"]: e for e in events if e["event"] == "exit"}
    assert exits["web-01"]["exit"] == 0
    rows = {r["host"]: r for r in done["results"]}
    assert rows["web-01"]["exit"] == 0 and rows["web-01"]["stdout"] == "one\nthree\n"
    assert rows["ghost"]["error"] == "unknown agent 'ghost' (not paired)"
    st = call(app, "GET", "/status/" + reqid).json
    assert st["complete"] is True and st["results"] == done["results"]


# ---------------------------------------------------------------------------
# over the wire: a real `python ctrlexec_api.py` process
# ---------------------------------------------------------------------------


@pytest.fixture
def api_procs():
    procs = []
    yield procs
    for proc in procs:
        proc.stop()


def run_api_once(conf_path: str, tmp_path, timeout_s: float = WAIT_S) -> tuple:
    """Run the API expecting it to refuse to start; return (exit code, output)."""
    env = dict(os.environ, CTRL_EXEC_LOG="stderr")
    env.pop("CTRL_EXEC_CONF", None)
    done = subprocess.run([sys.executable, API, "--config", conf_path], env=env, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout_s)
    return done.returncode, (done.stdout + done.stderr).decode("utf-8", "replace")


def https_request(port: int, ctx, method: str, path: str, body=None, headers=None) -> tuple:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=WAIT_S)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers=dict(headers or {}))
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, raw
    finally:
        conn.close()


def http_request(port: int, method: str, path: str, body=None) -> tuple:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def checked(method: str, path: str, result: tuple) -> tuple:
    """Validate an over-the-wire response against openapi.json; return (status, json)."""
    from apitest_support import Response
    status, headers, raw = result
    resp = Response(status, headers, raw)
    check_response(method, path.split("?")[0], resp)
    return status, resp.json


def test_https_api_process_end_to_end_and_old_tls_refused(fleet, api_procs, tmp_path):
    fleet.add_agent("web-01", scripts={"hello": HELLO})
    cfg = fleet.cfg
    cert_pem, key_pem = pki.issue_cert(cfg.ca_dir, "127.0.0.1")
    api_dir = tmp_path / "api-tls"
    api_dir.mkdir()
    (api_dir / "api.crt").write_bytes(cert_pem)
    (api_dir / "api.key").write_bytes(key_pem)
    os.chmod(str(api_dir / "api.key"), 0o600)
    proc = ApiServer.for_fleet(fleet, str(tmp_path / "api.log"), api_cert=str(api_dir / "api.crt"),
                               api_key=str(api_dir / "api.key"))
    port = proc.port
    api_procs.append(proc)
    proc.start()
    ctx = ssl.create_default_context(cafile=cfg.ca)
    ctx.check_hostname = False
    status, body = checked("GET", "/health", https_request(port, ctx, "GET", "/health"))
    assert (status, body) == (200, {"ok": True, "version": wire.VERSION})
    status, body = checked("POST", "/run", https_request(
        port, ctx, "POST", "/run", {"hosts": ["web-01", "ghost"], "script": "hello",
                                    "token": "SECRET-TOKEN-XYZ"}))
    assert status == 200
    assert body["results"][0]["stdout"] == "hi\n"
    assert body["results"][1]["error"] == "unknown agent 'ghost' (not paired)"
    status, st = checked("GET", "/status/x", https_request(port, ctx, "GET",
                                                           "/status/" + body["reqid"]))
    assert status == 200 and st["results"] == body["results"]
    status, pong = checked("POST", "/ping", https_request(port, ctx, "POST", "/ping",
                                                          {"hosts": ["web-01"]}))
    assert status == 200 and pong["results"][0]["status"] == "ok"
    status, _ = checked("GET", "/nope", https_request(port, ctx, "GET", "/nope?x=1"))
    assert status == 404
    # plain HTTP to the TLS port gets no HTTP answer
    with pytest.raises((http.client.HTTPException, OSError)):
        http_request(port, "GET", "/health")
    # TLS 1.0 / 1.1 are refused
    for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname = False
        old.verify_mode = ssl.CERT_NONE
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                old.minimum_version = version
                old.maximum_version = version
        except (ValueError, ssl.SSLError):
            continue                    # this OpenSSL cannot even offer it
        with pytest.raises((ssl.SSLError, OSError)):
            https_request(port, old, "GET", "/health")
    assert proc.stop() == 0
    log = proc.log()
    assert "ACTION=api-start" in log and "TLS=yes" in log and "ACTION=api-stop" in log
    assert "ACTION=api-request METHOD=POST" in log
    assert "SECRET-TOKEN-XYZ" not in log
    stored = store.Store(cfg).runs.load(body["reqid"])
    assert stored is not None and "SECRET-TOKEN-XYZ" not in json.dumps(stored)


def test_plain_api_process_graceful_stop_finishes_in_flight(fleet, api_procs, tmp_path):
    fleet.add_agent("web-01", scripts={"slow": "#!/bin/sh\nsleep 1\necho finished\n"})
    proc = ApiServer.for_fleet(fleet, str(tmp_path / "api.log"))
    port = proc.port
    api_procs.append(proc)
    proc.start()
    result = {}

    def client():
        result["resp"] = http_request(port, "POST", "/run", {"hosts": ["web-01"], "script": "slow"})

    import threading
    thread = threading.Thread(target=client)
    thread.start()
    wait_for(lambda: "ACTION=dispatch" in proc.log(), "the run to be dispatched")
    proc.proc.send_signal(signal.SIGTERM)
    thread.join(WAIT_S)
    status, body = checked("POST", "/run", result["resp"])
    assert status == 200 and body["results"][0]["stdout"] == "finished\n"
    assert result["resp"][1]["connection"] == "close"       # one request per connection
    assert proc.proc.wait(WAIT_S) == 0


def closed_by_server(sock: socket.socket) -> bool:
    """True when the server closed the connection (EOF or reset) within WAIT_S."""
    sock.settimeout(WAIT_S)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_keep_alive_only_on_request_and_every_answer_framed(fleet, api_procs, tmp_path):
    proc = ApiServer.for_fleet(fleet, str(tmp_path / "api.log"))
    port = proc.port
    api_procs.append(proc)
    proc.start()

    # Default: one request per connection, as the original API.
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = read_http_response(sock)
        assert status == 200 and headers["connection"] == "close"
        assert closed_by_server(sock)

    # "Connection: keep-alive": several requests, each answer framed, the body consumed.
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        status, headers, body = read_http_response(sock)
        assert (status, headers["connection"]) == (200, "keep-alive")
        assert json.loads(body)["ok"] is True
        bad = b'{"hosts": ['
        sock.sendall(b"POST /ping HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(bad), bad))
        status, headers, body = read_http_response(sock)
        assert (status, headers["connection"]) == (400, "keep-alive")
        assert json.loads(body)["detail"] == "invalid JSON body"
        sock.sendall(b"GET /nowhere HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, body = read_http_response(sock)
        assert (status, headers["connection"]) == (404, "keep-alive")
        # An answer given without reading the whole body ends the connection.
        sock.sendall(b"POST /run HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n"
                     b"Content-Length: %d\r\n\r\n" % (8 * wire.MAX_BODY_BYTES))
        status, headers, body = read_http_response(sock)
        assert (status, headers["connection"]) == (413, "close")
        assert closed_by_server(sock)

    # Asking to close wins over keep-alive; so does a body not framed by one Content-Length.
    for extra in (b"Connection: keep-alive, close\r\n",
                  b"Connection: keep-alive\r\nContent-Length: 2\r\nContent-Length: 2\r\n",
                  b"Connection: keep-alive\r\nTransfer-Encoding: chunked\r\n"):
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
            body = b"0\r\n\r\n" if b"chunked" in extra else b"{}" if b"Length" in extra else b""
            sock.sendall(b"POST /nowhere HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n" + body)
            status, headers, _ = read_http_response(sock)
            assert headers["connection"] == "close", (extra, status)
            assert closed_by_server(sock)
    log = proc.log()
    assert log.count("ACTION=api-request") >= 6, log


def test_idle_keep_alive_connection_is_closed_and_does_not_hold_a_stop(fleet, api_procs,
                                                                       tmp_path):
    proc = ApiServer.for_fleet(fleet, str(tmp_path / "api.log"))
    port = proc.port
    api_procs.append(proc)
    proc.start()
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n"

    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(request)
        assert read_http_response(sock)[0] == 200
        started = time.monotonic()
        assert closed_by_server(sock)        # idle past KEEPALIVE_IDLE_S
        assert time.monotonic() - started >= httpserver.KEEPALIVE_IDLE_S - 1

    idle = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    try:
        idle.sendall(request)
        assert read_http_response(idle)[0] == 200
        proc.proc.send_signal(signal.SIGTERM)
        assert closed_by_server(idle)
        # The stop ends the idle connection instead of waiting for it.
        assert proc.proc.wait(WAIT_S) == 0
    finally:
        idle.close()
    assert "ACTION=api-stop" in proc.log()


def test_refuses_to_start_with_exit_2(fleet, tmp_path):
    port = free_port()
    fleet.set_conf(api_port=port, api_cert=str(tmp_path / "missing.crt"),
                   api_key=str(tmp_path / "missing.key"))
    code, out = run_api_once(fleet.conf_path, tmp_path)
    assert code == 2
    lines = out.strip().splitlines()
    assert len(lines) == 1 and "api_cert" in lines[0] and "missing.crt" in lines[0]
    # only one of the pair
    fleet.set_conf(api_key=None)
    code, out = run_api_once(fleet.conf_path, tmp_path)
    assert code == 2 and "api_key" in out
    # port in use
    fleet.set_conf(api_cert=None)
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    try:
        fleet.set_conf(api_port=holder.getsockname()[1])
        code, out = run_api_once(fleet.conf_path, tmp_path)
        assert code == 2 and "already in use" in out and len(out.strip().splitlines()) == 1
    finally:
        holder.close()
    # a bad config value
    fleet.set_conf(api_port="not-a-port")
    code, out = run_api_once(fleet.conf_path, tmp_path)
    assert code == 2 and "api_port" in out
    # a missing config file
    code, out = run_api_once(str(tmp_path / "nope.conf"), tmp_path)
    assert code == 2 and "nope.conf" in out


def test_config_from_environment(tmp_path):
    env = dict(os.environ, CTRL_EXEC_LOG="stderr")
    env["CTRL_EXEC_CONF"] = str(tmp_path / "from-env.conf")
    done = subprocess.run([sys.executable, API], env=env, cwd=ROOT, timeout=WAIT_S,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert done.returncode == 2
    assert b"from-env.conf" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_live_spec_without_agents_is_still_valid(unit_app):
    resp = call(unit_app, "GET", "/openapi-live.json")
    assert resp.status == 200
    validate_spec(resp.json)
    schemas = resp.json["components"]["schemas"]
    assert schemas["RunRequest"]["properties"]["hosts"]["items"]["enum"] == []
    assert schemas["RunRequest"]["properties"]["script"]["enum"] == []
    assert unit_app.fake_engine.calls == []           # no registered agent: no network
