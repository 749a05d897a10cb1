"""Tests for config.py: ctrl-exec.conf parsing, defaults, validation, path resolution."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

import config
import ctrlexec_agent as wire

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def warnings_logged(monkeypatch):
    """Capture wire.log_action calls made by config (list of (level, action, fields))."""
    calls = []
    monkeypatch.setattr(wire, "log_action",
                        lambda level, action, **fields: calls.append((level, action, fields)))
    return calls


def write_conf(tmp_path, text, name="ctrl-exec.conf"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def load_error(path) -> config.ConfigError:
    with pytest.raises(config.ConfigError) as info:
        config.load(path, env={})
    return info.value


# --- defaults and file selection -------------------------------------------------------

def test_defaults_when_default_file_absent(monkeypatch):
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", "/nonexistent/ctrl-exec.conf")
    cfg = config.load(env={})
    assert cfg.path is None
    assert cfg.ca_dir == "/etc/ctrl-exec"
    assert cfg.cert == "/etc/ctrl-exec/dispatcher.crt"
    assert cfg.key == "/etc/ctrl-exec/dispatcher.key"
    assert cfg.ca == "/etc/ctrl-exec/ca.crt"
    assert cfg.state_dir == "/var/lib/ctrl-exec"
    assert cfg.auth_hook is None and cfg.auth_hook_timeout == 10.0
    assert cfg.api_auth_default == "deny" and cfg.auth_deny_generic is False
    assert (cfg.api_port, cfg.api_bind, cfg.api_cert, cfg.api_key) == (7445, "127.0.0.1", None, None)
    assert (cfg.api_max_children, cfg.read_timeout, cfg.max_parallel, cfg.max_hosts) == (64, 60.0, 64, 500)
    assert (cfg.cert_days, cfg.agent_cert_days) == (365, 825)
    assert (cfg.pairing_max_queue, cfg.pairing_timeout) == (10, 600)
    assert cfg.pairing_rate_limit_volume == (10, 60, 300)
    assert cfg.pairing_rate_limit_disable is False
    assert (cfg.run_retention, cfg.purge_interval) == (86400, 600)
    assert wire.DISPATCHER_ID_RE.match(cfg.dispatcher_id)


def test_config_constructed_directly_derives_paths_from_ca_dir():
    cfg = config.Config(ca_dir="/srv/ca", dispatcher_id="d1")
    assert (cfg.cert, cfg.key, cfg.ca) == ("/srv/ca/dispatcher.crt", "/srv/ca/dispatcher.key",
                                          "/srv/ca/ca.crt")


def test_env_names_the_file_when_no_path(tmp_path):
    path = write_conf(tmp_path, "api_port = 8001\n")
    cfg = config.load(env={"CTRL_EXEC_CONF": path})
    assert cfg.api_port == 8001 and cfg.path == path


def test_explicit_path_wins_over_env(tmp_path):
    a = write_conf(tmp_path, "api_port = 8001\n", "a.conf")
    b = write_conf(tmp_path, "api_port = 8002\n", "b.conf")
    assert config.load(a, env={"CTRL_EXEC_CONF": b}).api_port == 8001


def test_explicit_missing_file_is_an_error(tmp_path):
    missing = str(tmp_path / "nope.conf")
    err = load_error(missing)
    assert missing in str(err) and "not found" in str(err)


def test_env_named_missing_file_is_an_error(tmp_path):
    missing = str(tmp_path / "nope.conf")
    with pytest.raises(config.ConfigError, match="nope.conf: config file not found"):
        config.load(env={"CTRL_EXEC_CONF": missing})


def test_directory_is_refused(tmp_path):
    err = load_error(str(tmp_path))
    assert str(tmp_path) in str(err)


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = str(tmp_path / "fifo.conf")
    os.mkfifo(fifo)
    with pytest.raises(config.ConfigError, match="not a regular file"):
        config.load(fifo, env={})


# --- syntax --------------------------------------------------------------------------------

def test_comments_blank_lines_spacing_and_indentation(tmp_path):
    path = write_conf(tmp_path, "\n".join([
        "# a comment",
        "",
        "   # indented comment",
        "api_port=8100",
        "  api_bind   =   127.0.0.5   ",
        "\tmax_parallel = 8",
        "dispatcher_id = ced-prod.example",
        "",
    ]))
    cfg = config.load(path, env={})
    assert (cfg.api_port, cfg.api_bind, cfg.max_parallel) == (8100, "127.0.0.5", 8)
    assert cfg.dispatcher_id == "ced-prod.example"


def test_every_key_parses(tmp_path):
    path = write_conf(tmp_path, "\n".join([
        "ca_dir = /srv/ca", "cert = /srv/d.crt", "key = /srv/d.key", "ca = /srv/ca.crt",
        "state_dir = /srv/state", "dispatcher_id = d1", "auth_hook = /srv/hook",
        "auth_hook_timeout = 2.5", "api_auth_default = ALLOW", "auth_deny_generic = yes",
        "api_port = 1", "api_bind = ::1", "api_cert = /srv/api.crt", "api_key = /srv/api.key",
        "api_max_children = 3", "read_timeout = 7", "max_parallel = 5", "max_hosts = 20",
        "cert_days = 30", "agent_cert_days = 40", "pairing_max_queue = 2",
        "pairing_timeout = 60", "pairing_rate_limit_volume = 5/30/120",
        "pairing_rate_limit_disable = on", "run_retention = 3600", "purge_interval = 60",
    ]) + "\n")
    cfg = config.load(path, env={})
    assert cfg.warnings == []
    assert (cfg.ca_dir, cfg.cert, cfg.key, cfg.ca, cfg.state_dir) == (
        "/srv/ca", "/srv/d.crt", "/srv/d.key", "/srv/ca.crt", "/srv/state")
    assert (cfg.dispatcher_id, cfg.auth_hook, cfg.auth_hook_timeout) == ("d1", "/srv/hook", 2.5)
    assert (cfg.api_auth_default, cfg.auth_deny_generic) == ("allow", True)
    assert (cfg.api_port, cfg.api_bind, cfg.api_cert, cfg.api_key) == (
        1, "::1", "/srv/api.crt", "/srv/api.key")
    assert (cfg.api_max_children, cfg.read_timeout, cfg.max_parallel, cfg.max_hosts) == (3, 7.0, 5, 20)
    assert (cfg.cert_days, cfg.agent_cert_days, cfg.pairing_max_queue, cfg.pairing_timeout) == (
        30, 40, 2, 60)
    assert cfg.pairing_rate_limit_volume == (5, 30, 120)
    assert cfg.pairing_rate_limit_disable is True
    assert (cfg.run_retention, cfg.purge_interval) == (3600, 60)


def test_parsers_cover_exactly_the_config_fields():
    fields = {f.name for f in dataclasses.fields(config.Config)} - {"path", "base_dir", "warnings"}
    assert set(config._PARSERS) == fields


def test_timeout_is_an_alias_of_read_timeout(tmp_path):
    assert config.load(write_conf(tmp_path, "timeout = 15\n"), env={}).read_timeout == 15.0


@pytest.mark.parametrize("word,value", [
    ("1", True), ("yes", True), ("TRUE", True), ("on", True),
    ("0", False), ("no", False), ("false", False), ("Off", False),
])
def test_boolean_words(tmp_path, word, value):
    cfg = config.load(write_conf(tmp_path, "auth_deny_generic = %s\n" % word), env={})
    assert cfg.auth_deny_generic is value


def test_empty_value_means_default(tmp_path):
    cfg = config.load(write_conf(tmp_path, "api_port = 9000\napi_port =\nauth_hook =\n"), env={})
    assert cfg.api_port == 7445 and cfg.auth_hook is None


def test_later_duplicate_wins_with_a_warning(tmp_path, warnings_logged):
    cfg = config.load(write_conf(tmp_path, "api_port = 9000\napi_port = 9001\n"), env={})
    assert cfg.api_port == 9001
    assert len(cfg.warnings) == 1 and "line 2" in cfg.warnings[0]
    assert "overrides the value set on line 1" in cfg.warnings[0]


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.conf"
    path.write_bytes(b"\xef\xbb\xbfapi_port = 8123\n")
    assert config.load(str(path), env={}).api_port == 8123


def test_crlf_line_endings(tmp_path):
    path = tmp_path / "crlf.conf"
    path.write_bytes(b"api_port = 8124\r\nmax_hosts = 9\r\n")
    cfg = config.load(str(path), env={})
    assert (cfg.api_port, cfg.max_hosts) == (8124, 9)


# --- errors --------------------------------------------------------------------------------

def test_bad_integer_names_file_line_key_and_accepted_range(tmp_path):
    path = write_conf(tmp_path, "# header\n\nmax_hosts = 10\napi_port = abc\n")
    err = load_error(path)
    assert str(err) == "%s line 4: api_port must be an integer 1-65535, got 'abc'" % path
    assert (err.path, err.line, err.key) == (path, 4, "api_port")


@pytest.mark.parametrize("line,expected", [
    ("api_port = 0", "api_port must be an integer 1-65535, got '0'"),
    ("api_port = 65536", "api_port must be an integer 1-65535, got '65536'"),
    ("api_port = -1", "api_port must be an integer 1-65535, got '-1'"),
    ("api_port = 1_000", "api_port must be an integer 1-65535, got '1_000'"),
    ("api_port = 7445 # API", "api_port must be an integer 1-65535, got '7445 # API'"),
    ("pairing_timeout = 601", "pairing_timeout must be an integer 1-600, got '601'"),
    ("api_max_children = 0", "api_max_children must be an integer 1-100000, got '0'"),
    ("auth_hook_timeout = 0", "auth_hook_timeout must be a number of seconds greater than 0"),
    ("timeout = soon", "timeout must be a number of seconds greater than 0"),
    ("api_auth_default = maybe", "api_auth_default must be deny or allow, got 'maybe'"),
    ("auth_deny_generic = sure",
     "auth_deny_generic must be a boolean (1/yes/true/on/0/no/false/off), got 'sure'"),
    ("pairing_rate_limit_volume = 10/60",
     "pairing_rate_limit_volume must be three positive integers"),
    ("pairing_rate_limit_volume = 10/0/300",
     "pairing_rate_limit_volume must be three positive integers"),
    ("api_bind = not an address", "api_bind must be an IP address or a host name"),
    ("dispatcher_id = -bad", "dispatcher_id must be 1-64 characters"),
    ("dispatcher_id = " + "a" * 65, "dispatcher_id must be 1-64 characters"),
])
def test_bad_values_are_refused_with_what_is_accepted(tmp_path, line, expected):
    path = write_conf(tmp_path, line + "\n")
    err = load_error(path)
    assert str(err).startswith("%s line 1: %s" % (path, expected))
    assert "\n" not in str(err)


@pytest.mark.parametrize("line", ["just some words", "[tags]", "bad key = 1", "= value", "api-port = 1"])
def test_malformed_lines_are_refused(tmp_path, line):
    path = write_conf(tmp_path, "api_port = 7445\n" + line + "\n")
    err = load_error(path)
    assert str(err).startswith("%s line 2: malformed line %r; accepted: 'key = value'" % (path, line))
    assert err.line == 2


def test_long_bad_value_is_shortened_in_the_message(tmp_path):
    err = load_error(write_conf(tmp_path, "api_port = %s\n" % ("9" * 500)))
    assert len(str(err)) < 300 and "..." in str(err)


def test_control_characters_are_escaped_in_messages(tmp_path):
    path = tmp_path / "ctl.conf"
    path.write_bytes(b"api_bind = a\x1bb\n")
    err = load_error(str(path))
    assert "\x1b" not in str(err) and "\\x1b" in str(err)


def test_non_utf8_line_is_refused(tmp_path):
    path = tmp_path / "latin1.conf"
    path.write_bytes(b"api_port = 7445\nstate_dir = /srv/caf\xe9\n")
    with pytest.raises(config.ConfigError, match=r"line 2: line is not valid UTF-8"):
        config.load(str(path), env={})


# --- unknown keys ------------------------------------------------------------------------

def test_unknown_keys_warn_and_are_not_fatal(tmp_path, warnings_logged):
    path = write_conf(tmp_path, "api_port = 7000\nfrobnicate = 1\nport = 7443\n")
    cfg = config.load(path, env={})
    assert cfg.api_port == 7000
    assert [(lvl, act, f["LINE"], f["SETTING"], f["FILE"]) for lvl, act, f in warnings_logged] == [
        ("warning", "config-warn", 2, "frobnicate", path),
        ("warning", "config-warn", 3, "port", path),
    ]
    assert "unknown key; ignored" in cfg.warnings[0]
    assert "not used here; ignored" in cfg.warnings[1]


def test_warning_line_names_the_setting_in_the_real_log(tmp_path, capsys):
    config.load(write_conf(tmp_path, "frobnicate = 1\n"), env={})
    err = capsys.readouterr().err
    if "ACTION=config-warn" in err:     # stderr logging (not syslog) in this process
        assert "LINE=1" in err and "SETTING=frobnicate" in err


# --- paths -----------------------------------------------------------------------------------

def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    confdir = tmp_path / "etc"
    confdir.mkdir()
    monkeypatch.chdir(tmp_path)         # cwd differs from the config's folder
    path = write_conf(confdir, "\n".join([
        "ca_dir = pki", "state_dir = ./state", "auth_hook = hooks/auth",
        "api_cert = ../tls/api.crt", "api_key = /abs/api.key", "",
    ]))
    cfg = config.load("etc/ctrl-exec.conf", env={})
    base = str(confdir)
    assert cfg.base_dir == base
    assert cfg.path == path
    assert cfg.ca_dir == os.path.join(base, "pki")
    assert cfg.cert == os.path.join(base, "pki", "dispatcher.crt")
    assert cfg.key == os.path.join(base, "pki", "dispatcher.key")
    assert cfg.ca == os.path.join(base, "pki", "ca.crt")
    assert cfg.state_dir == os.path.join(base, "state")
    assert cfg.auth_hook == os.path.join(base, "hooks", "auth")
    assert cfg.api_cert == str(tmp_path / "tls" / "api.crt")
    assert cfg.api_key == "/abs/api.key"


def test_explicit_cert_overrides_ca_dir_default(tmp_path):
    cfg = config.load(write_conf(tmp_path, "ca_dir = ca\ncert = mine.crt\n"), env={})
    assert cfg.cert == str(tmp_path / "mine.crt")
    assert cfg.key == str(tmp_path / "ca" / "dispatcher.key")


def test_tls_files_are_not_checked_at_load(tmp_path):
    cfg = config.load(write_conf(tmp_path, "api_cert = missing.crt\napi_key = missing.key\n"),
                      env={})
    assert cfg.api_cert == str(tmp_path / "missing.crt")
    assert not os.path.exists(cfg.api_cert)


# --- dispatcher_id -------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("ced-prod", "ced-prod"),
    ("host.example.net", "host.example.net"),
    ("my host!", "my-host-"),
    ("--.weird", "weird"),
    ("_x", "x"),
    ("", "dispatcher"),
    ("---", "dispatcher"),
    ("h\u00e9llo", "h-llo"),
    ("a" * 100, "a" * 64),
    (None, "dispatcher"),
])
def test_sanitise_dispatcher_id(text, expected):
    got = config.sanitise_dispatcher_id(text)
    assert got == expected
    assert wire.DISPATCHER_ID_RE.match(got)


def test_default_dispatcher_id_is_the_sanitised_hostname(monkeypatch):
    monkeypatch.setattr(config.socket, "gethostname", lambda: "ctl host_01")
    assert config.Config().dispatcher_id == "ctl-host_01"


# --- module hygiene --------------------------------------------------------------------------

def test_import_does_not_pull_gevent_or_touch_disk():
    code = ("import sys, config, store; "
            "assert 'gevent' not in sys.modules, 'gevent imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
