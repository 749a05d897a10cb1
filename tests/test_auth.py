"""Tests for auth.py: the auth hook contract (reference §7, SPEC §6) and api_auth_default.

Every hook here is a real executable written into tmp_path; it records what it saw
(JSON stdin + ENVEXEC_* environment) into a file so the tests can check the contract.
"""

from __future__ import annotations

import json
import os

import pytest

import auth
import config

HOOK_TIMEOUT_S = 0.5


def write_hook(folder, body: str, name: str = "hook") -> str:
    path = os.path.join(str(folder), name)
    with open(path, "w") as fh:
        fh.write(body)
    os.chmod(path, 0o755)
    return path


def recording_hook(folder, exit_code: int = 0) -> tuple:
    """A hook that appends {"stdin": <json>, "env": {ENVEXEC_*}} to a file, then exits."""
    seen = os.path.join(str(folder), "seen.jsonl")
    body = """#!/usr/bin/env python3
import json, os, sys
data = sys.stdin.read()
env = {k: v for k, v in os.environ.items() if k.startswith("ENVEXEC_")}
with open(%r, "a") as fh:
    fh.write(json.dumps({"stdin": json.loads(data), "env": env}) + "\\n")
sys.exit(%d)
""" % (seen, exit_code)
    return write_hook(folder, body), seen


def read_seen(path: str) -> list:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def make_cfg(tmp_path, **over) -> config.Config:
    values = {"state_dir": str(tmp_path / "state"), "ca_dir": str(tmp_path / "pki"),
              "auth_hook_timeout": HOOK_TIMEOUT_S}
    values.update(over)
    return config.Config(**values)


def test_hook_receives_json_stdin_and_envexec_env(tmp_path):
    hook, seen = recording_hook(tmp_path, 0)
    cfg = make_cfg(tmp_path, auth_hook=hook)
    decision = auth.check(cfg, action="run", source_ip="10.0.0.5", script="backup-db",
                          hosts=["db-01", "db-02:7450"], args=["--full", "a b", "x\ny"],
                          username="alice", token="tok-secret")
    assert decision == auth.AuthDecision(True, "", 0, "")
    (entry,) = read_seen(seen)
    stdin = entry["stdin"]
    assert set(stdin) == {"action", "script", "hosts", "args", "username", "token", "source_ip",
                          "dispatcher", "dispatcher_serial", "reqid", "submitter", "timestamp"}
    assert stdin["action"] == "run"
    assert stdin["script"] == "backup-db"
    assert stdin["hosts"] == ["db-01", "db-02:7450"]
    assert stdin["args"] == ["--full", "a b", "x\ny"]
    assert stdin["username"] == "alice"
    assert stdin["token"] == "tok-secret"
    assert stdin["source_ip"] == "10.0.0.5"
    assert stdin["dispatcher"] == "" and stdin["dispatcher_serial"] == ""
    assert stdin["reqid"] == "" and stdin["submitter"] is None
    assert len(stdin["timestamp"]) == 20 and stdin["timestamp"].endswith("Z")
    env = entry["env"]
    assert env["ENVEXEC_ACTION"] == "run"
    assert env["ENVEXEC_SCRIPT"] == "backup-db"
    assert env["ENVEXEC_HOSTS"] == "db-01,db-02:7450"
    assert json.loads(env["ENVEXEC_ARGS_JSON"]) == ["--full", "a b", "x\ny"]
    assert env["ENVEXEC_ARGS"] == "--full a b x\ny"
    assert env["ENVEXEC_USERNAME"] == "alice"
    assert env["ENVEXEC_TOKEN"] == "tok-secret"
    assert env["ENVEXEC_SOURCE_IP"] == "10.0.0.5"
    assert env["ENVEXEC_TIMESTAMP"] == stdin["timestamp"]


def test_status_check_passes_reqid_and_submitter(tmp_path):
    hook, seen = recording_hook(tmp_path, 0)
    cfg = make_cfg(tmp_path, auth_hook=hook)
    decision = auth.check(cfg, action="status", source_ip="127.0.0.1", reqid="0123456789abcdef",
                          submitter={"username": "bob", "source_ip": "10.1.1.1"})
    assert decision.allowed
    (entry,) = read_seen(seen)
    assert entry["stdin"]["reqid"] == "0123456789abcdef"
    assert entry["stdin"]["submitter"] == {"username": "bob", "source_ip": "10.1.1.1"}
    assert entry["env"]["ENVEXEC_REQID"] == "0123456789abcdef"
    assert entry["env"]["ENVEXEC_SUBMITTER"] == "bob"
    assert entry["env"]["ENVEXEC_SUBMITTER_IP"] == "10.1.1.1"


@pytest.mark.parametrize("code,error", [
    (1, "denied"),
    (2, "bad credentials"),
    (3, "insufficient privilege"),
])
def test_hook_exit_codes_map_to_reasons(tmp_path, code, error):
    hook, _ = recording_hook(tmp_path, code)
    cfg = make_cfg(tmp_path, auth_hook=hook)
    decision = auth.check(cfg, action="ping", source_ip="127.0.0.1", hosts=["a"])
    assert decision == auth.AuthDecision(False, error, code, "")


def test_other_exit_is_denied_code_1_with_detail(tmp_path):
    hook, _ = recording_hook(tmp_path, 7)
    cfg = make_cfg(tmp_path, auth_hook=hook)
    decision = auth.check(cfg, action="api", source_ip="127.0.0.1")
    assert decision == auth.AuthDecision(False, "denied", 1, "auth hook exited 7")


def test_hook_past_timeout_is_denied(tmp_path):
    marker = tmp_path / "finished"
    hook = write_hook(tmp_path, "#!/bin/sh\nsleep 2\ntouch %s\nexit 0\n" % marker)
    cfg = make_cfg(tmp_path, auth_hook=hook)
    decision = auth.check(cfg, action="run", source_ip="127.0.0.1", script="x", hosts=["a"])
    assert decision == auth.AuthDecision(False, "denied", 1,
                                         "auth hook timed out after %gs" % HOOK_TIMEOUT_S)
    # The hook must have been killed at the deadline, not left to finish (and allow) later.
    assert not marker.exists(), (
        "hook ran past auth_hook_timeout: wire.run_auth_hook did not kill it (under gevent, "
        "Popen.communicate(timeout=) ignores the timeout when only stdin is a pipe)")


def test_hook_killed_by_signal_is_denied(tmp_path):
    hook = write_hook(tmp_path, "#!/bin/sh\nkill -9 $$\nexit 0\n")
    cfg = make_cfg(tmp_path, auth_hook=hook)
    decision = auth.check(cfg, action="run", source_ip="127.0.0.1", script="x", hosts=["a"])
    assert decision == auth.AuthDecision(False, "denied", 1, "auth hook killed by signal 9")


def test_missing_or_not_executable_hook_is_denied(tmp_path):
    cfg = make_cfg(tmp_path, auth_hook=str(tmp_path / "no-such-hook"))
    decision = auth.check(cfg, action="api", source_ip="127.0.0.1", caller="cli")
    assert decision == auth.AuthDecision(False, "denied", 1,
                                         "auth hook is missing or not executable")
    plain = tmp_path / "plain"
    plain.write_text("#!/bin/sh\nexit 0\n")
    os.chmod(plain, 0o644)
    cfg = make_cfg(tmp_path, auth_hook=str(plain))
    decision = auth.check(cfg, action="api", source_ip="127.0.0.1")
    assert decision == auth.AuthDecision(False, "denied", 1,
                                         "auth hook is missing or not executable")


def test_no_hook_api_default_deny_and_allow(tmp_path):
    cfg = make_cfg(tmp_path)
    assert cfg.api_auth_default == "deny"
    assert auth.check(cfg, action="api", source_ip="127.0.0.1") == \
        auth.AuthDecision(False, "no auth hook configured", 1, "")
    cfg = make_cfg(tmp_path, api_auth_default="allow")
    assert auth.check(cfg, action="run", source_ip="127.0.0.1").allowed


def test_no_hook_cli_is_allowed_even_with_default_deny(tmp_path):
    cfg = make_cfg(tmp_path, api_auth_default="deny")
    assert auth.check(cfg, action="run", source_ip="127.0.0.1", caller="cli").allowed


def test_hook_applies_to_cli_too(tmp_path):
    hook, _ = recording_hook(tmp_path, 3)
    cfg = make_cfg(tmp_path, auth_hook=hook)
    decision = auth.check(cfg, action="run", source_ip="127.0.0.1", caller="cli", script="x")
    assert decision == auth.AuthDecision(False, "insufficient privilege", 3, "")


def test_unknown_action_or_caller_is_a_programming_error(tmp_path):
    cfg = make_cfg(tmp_path)
    with pytest.raises(auth.AuthError):
        auth.check(cfg, action="delete", source_ip="127.0.0.1")
    with pytest.raises(auth.AuthError):
        auth.check(cfg, action="api", source_ip="127.0.0.1", caller="web")


def test_auth_log_line_never_contains_the_token(tmp_path, capfd):
    os.environ["CTRL_EXEC_LOG"] = "stderr"
    try:
        import ctrlexec_agent as wire
        wire.setup_logging("test-auth")
        hook, _ = recording_hook(tmp_path, 2)
        cfg = make_cfg(tmp_path, auth_hook=hook)
        auth.check(cfg, action="run", source_ip="10.9.8.7", script="x", username="carol",
                   token="SUPERSECRET-123")
        cfg = make_cfg(tmp_path, auth_hook=None)
        auth.check(cfg, action="api", source_ip="10.9.8.7", token="SUPERSECRET-123")
    finally:
        os.environ.pop("CTRL_EXEC_LOG", None)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "ACTION=auth " in line]
    assert len(lines) == 2
    assert "RESULT=deny" in lines[0] and "AUTHACTION=run" in lines[0]
    assert "USER=carol" in lines[0] and "IP=10.9.8.7" in lines[0]
    assert "REASON=no-hook-deny" in lines[1] and "USER=(none)" in lines[1]
    assert "SUPERSECRET" not in err
