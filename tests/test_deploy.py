"""Tests for deploy/: example configs load cleanly, the auth hook example behaves, units verify.

The example files are loaded by the real parsers (config.load,
ctrlexec_agent.load_agent_config / load_allowlist), the hook runs through the real
hook runner, and the units go through `systemd-analyze verify` when it is installed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys

import pytest

import config
import ctrlexec_agent as wire

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
CTRL_CONF = os.path.join(DEPLOY, "ctrl-exec.conf")
AGENT_CONF = os.path.join(DEPLOY, "agent.conf")
SCRIPTS_CONF = os.path.join(DEPLOY, "scripts.conf")
HOOK = os.path.join(DEPLOY, "auth-hook.example")
UNITS = ("ctrl-exec-agent.service", "ctrl-exec-api.service")
SUBPROCESS_TIMEOUT_S = 60

#: Config fields that are not keys of the file.
_NOT_KEYS = {"path", "base_dir", "warnings"}
_COMMENTED_KEY_RE = re.compile(r"^#\s?([a-z_]+) = (.*)$")


def _config_keys() -> set:
    return {f.name for f in dataclasses.fields(config.Config)} - _NOT_KEYS


def _agent_keys() -> set:
    # Every AgentConfig attribute except the bookkeeping ones is an agent.conf key.
    return set(vars(wire.AgentConfig("/etc/ctrl-exec-agent/agent.conf"))) - {"path", "base_dir", "tags"}


def _uncomment(path: str, keys: set, out_path: str, replace: dict | None = None) -> None:
    """Write a copy of ``path`` with every '# key = value' line for a known key uncommented."""
    lines = []
    with open(path) as handle:
        for line in handle.read().splitlines():
            match = _COMMENTED_KEY_RE.match(line)
            if match and match.group(1) in keys:
                value = (replace or {}).get(match.group(1), match.group(2))
                line = "%s = %s" % (match.group(1), value)
            lines.append(line)
    with open(out_path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def _listed_keys(path: str) -> set:
    """Keys written as 'key = ' or '# key = ' lines above any [section]."""
    keys = set()
    with open(path) as handle:
        for line in handle:
            if line.startswith("["):
                break
            match = re.match(r"^(?:#\s?)?([a-z_]+) = ", line)
            if match:
                keys.add(match.group(1))
    return keys


@pytest.fixture
def agent_warnings(monkeypatch):
    """Record every agent log_action call (works whether logs go to syslog or stderr)."""
    calls = []
    monkeypatch.setattr(wire, "log_action", lambda level, action, **fields: calls.append((action, fields)))
    return calls


# --- ctrl-exec.conf ---------------------------------------------------------------

def test_example_ctrl_exec_conf_loads_without_warnings_and_means_the_defaults():
    cfg = config.load(CTRL_CONF)
    assert cfg.warnings == []
    defaults = config.Config()
    for name in _config_keys():
        assert getattr(cfg, name) == getattr(defaults, name), name


def test_example_ctrl_exec_conf_lists_every_key():
    assert _listed_keys(CTRL_CONF) == _config_keys()


def test_example_ctrl_exec_conf_with_everything_uncommented_still_loads(tmp_path):
    copy = str(tmp_path / "ctrl-exec.conf")
    _uncomment(CTRL_CONF, _config_keys(), copy)
    cfg = config.load(copy)
    assert cfg.warnings == []
    assert cfg.auth_hook == "/etc/ctrl-exec/auth-hook"
    assert cfg.dispatcher_id == "ctrl-01"
    assert (cfg.api_cert, cfg.api_key) == ("/etc/ctrl-exec/api.crt", "/etc/ctrl-exec/api.key")
    assert cfg.pairing_rate_limit_volume == (10, 60, 300)


# --- agent.conf and scripts.conf --------------------------------------------------

def test_example_agent_conf_loads_without_config_warnings(agent_warnings):
    cfg = wire.load_agent_config(AGENT_CONF, require_files=False)
    assert agent_warnings == []
    assert cfg.tags == {"env": "prod", "role": "web"}
    assert cfg.script_dirs == ["/opt/ctrl-exec-scripts"]
    # Installed as /etc/ctrl-exec-agent/agent.conf, the file means the defaults (plus
    # script_dirs); file-relative defaults resolve beside it, here in deploy/.
    defaults = wire.AgentConfig(AGENT_CONF)
    defaults.trusted_dispatchers_path = os.path.join(defaults.state_dir, "ctrl-exec-dispatchers")
    defaults.cert_staging_path = os.path.join(defaults.state_dir, "agent.crt.staged")

    def installed(value):
        if isinstance(value, str) and value.startswith(DEPLOY + os.sep):
            return "/etc/ctrl-exec-agent" + value[len(DEPLOY):]
        return value

    for name in _agent_keys() - {"script_dirs"}:
        assert installed(getattr(cfg, name)) == installed(getattr(defaults, name)), name


def test_example_agent_conf_lists_every_agent_key():
    assert _listed_keys(AGENT_CONF) == _agent_keys()


def test_example_agent_conf_with_everything_uncommented_still_loads(tmp_path, agent_warnings):
    hook = tmp_path / "hook"
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o755)
    copy = str(tmp_path / "agent.conf")
    # auth_hook must name an executable file, so point it at one.
    _uncomment(AGENT_CONF, _agent_keys(), copy, replace={"auth_hook": str(hook)})
    cfg = wire.load_agent_config(copy, require_files=False)
    assert agent_warnings == []
    assert cfg.hostname == "web-01.example.net"
    assert cfg.streaming is True
    assert [str(n) for n in cfg.allowed_ips] == ["10.0.0.5/32", "10.1.0.0/16"]


def test_example_scripts_conf_loads_inside_script_dirs():
    cfg = wire.load_agent_config(AGENT_CONF, require_files=False)
    allowlist = wire.load_allowlist(SCRIPTS_CONF, cfg.script_dirs)
    assert sorted(allowlist) == ["backup-db", "check-service", "disk-usage"]
    assert all(path.startswith("/opt/ctrl-exec-scripts/") for path in allowlist.values())


def test_agent_self_check_on_examples_prints_no_config_warning():
    env = dict(os.environ, CTRL_EXEC_LOG="stderr")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "ctrlexec_agent.py"), "self-check",
         "--config", AGENT_CONF, "--allowlist", SCRIPTS_CONF],
        capture_output=True, text=True, env=env, timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    assert "config-warn" not in proc.stderr
    assert "3 script(s)" in proc.stdout


# --- auth hook example ------------------------------------------------------------

@pytest.fixture
def hook(tmp_path):
    """The example hook with its token file moved into tmp_path; tokens for alice and carol."""
    if shutil.which("sha256sum") is None:
        pytest.skip("sha256sum is not installed")
    tokens = tmp_path / "api-tokens"
    lines = ["# sha256 user"]
    for token, user in (("alice-secret", "alice"), ("carol-secret", "carol")):
        digest = subprocess.run(["sha256sum"], input=token.encode(), capture_output=True,
                                check=True, timeout=SUBPROCESS_TIMEOUT_S).stdout.split()[0]
        lines.append("%s %s" % (digest.decode(), user))
    tokens.write_text("\n".join(lines) + "\n")
    text = open(HOOK).read()
    assert "TOKENS=/etc/ctrl-exec/api-tokens\n" in text
    path = tmp_path / "auth-hook"
    path.write_text(text.replace("TOKENS=/etc/ctrl-exec/api-tokens\n", "TOKENS=%s\n" % tokens))
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("action, token, username, expected", [
    ("api", "alice-secret", "", (True, 0)),
    ("ping", "carol-secret", "carol", (True, 0)),
    ("status", "carol-secret", "", (True, 0)),
    ("run", "alice-secret", "alice", (True, 0)),
    ("run", "carol-secret", "", (False, 3)),          # valid token, not a run user
    ("run", "alice-secret", "carol", (False, 2)),     # username must match the token's owner
    ("api", "", "", (False, 2)),
    ("api", "guessed", "alice", (False, 2)),
    ("rotate", "alice-secret", "", (False, 1)),       # unknown action
])
def test_auth_hook_example_decisions(hook, action, token, username, expected):
    result = wire.run_auth_hook(hook, timeout_s=10, action=action, context={
        "script": "disk-usage", "hosts": ["web-01"], "args": [], "username": username,
        "token": token, "source_ip": "127.0.0.1"})
    assert (result.allowed, result.code) == expected


def test_auth_hook_example_denies_when_token_file_is_missing(hook, tmp_path):
    os.unlink(tmp_path / "api-tokens")
    result = wire.run_auth_hook(hook, timeout_s=10, action="api",
                                context={"token": "alice-secret"})
    assert (result.allowed, result.code) == (False, 1)


def test_auth_hook_example_is_posix_shell():
    for shell in ("sh", "dash"):
        if shutil.which(shell):
            subprocess.run([shell, "-n", HOOK], check=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert open(HOOK).readline() == "#!/bin/sh\n"


# --- systemd units ---------------------------------------------------------------------

def _unit(name: str) -> dict:
    """Parse a unit into {key: [values]} (sections merged; enough for these checks)."""
    values: dict = {}
    with open(os.path.join(DEPLOY, name)) as handle:
        for line in handle:
            line = line.strip()
            if not line or line.startswith(("#", "[")):
                continue
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_agent_unit_is_hardened_as_documented():
    unit = _unit("ctrl-exec-agent.service")
    expected = {
        "User": ["ctrl-exec-agent"], "NoNewPrivileges": ["yes"], "ProtectSystem": ["strict"],
        "ProtectHome": ["yes"], "PrivateTmp": ["yes"], "PrivateDevices": ["yes"],
        "CapabilityBoundingSet": [""], "AmbientCapabilities": [""],
        "RestrictAddressFamilies": ["AF_UNIX AF_INET AF_INET6"], "RestrictNamespaces": ["yes"],
        "LockPersonality": ["yes"], "MemoryDenyWriteExecute": ["yes"],
        "ReadOnlyPaths": ["/etc/ctrl-exec-agent /opt/ctrl-exec-scripts"],
        "StateDirectory": ["ctrl-exec-agent"], "KillMode": ["process"],
        "Restart": ["on-failure"], "RestartPreventExitStatus": ["78"],
        "ExecReload": ["/bin/kill -HUP $MAINPID"],
        "ExecStart": ["/usr/bin/python3 /usr/local/lib/ctrl-exec/ctrlexec_agent.py serve "
                      "--config /etc/ctrl-exec-agent/agent.conf"],
    }
    for key, value in expected.items():
        assert unit.get(key) == value, key
    assert unit["SystemCallFilter"][0] == "@system-service"


def test_api_unit_is_hardened_as_documented():
    unit = _unit("ctrl-exec-api.service")
    expected = {
        "User": ["ctrl-exec"], "NoNewPrivileges": ["yes"], "ProtectSystem": ["strict"],
        "ProtectHome": ["yes"], "PrivateTmp": ["yes"], "CapabilityBoundingSet": [""],
        "ReadWritePaths": ["/var/lib/ctrl-exec"], "KillSignal": ["SIGTERM"],
        "ExecStart": ["/usr/bin/python3 /usr/local/lib/ctrl-exec/ctrlexec_api.py "
                      "--config /etc/ctrl-exec/ctrl-exec.conf"],
    }
    for key, value in expected.items():
        assert unit.get(key) == value, key
    assert "TimeoutStopSec" in unit


def test_units_pass_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    # verify insists that ExecStart/ExecReload binaries exist; the scripts they run
    # are arguments and are not checked. Point a missing interpreter at ours.
    copies = []
    for name in UNITS:
        text = open(os.path.join(DEPLOY, name)).read()
        if not os.access("/usr/bin/python3", os.X_OK):
            text = text.replace("/usr/bin/python3", sys.executable)
        if not os.access("/bin/kill", os.X_OK) and shutil.which("kill"):
            text = text.replace("/bin/kill", shutil.which("kill"))
        path = tmp_path / name
        path.write_text(text)
        copies.append(str(path))
    proc = subprocess.run([analyze, "verify", *copies], capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 and "Failed to" in output and not any(n in output for n in UNITS):
        pytest.skip("systemd-analyze cannot run here: %s" % output.strip().splitlines()[-1])
    ours = [line for line in output.splitlines() if any(name in line for name in UNITS)]
    assert proc.returncode == 0, output
    assert ours == [], "\n".join(ours)
