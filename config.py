"""ctrl-exec.conf: parsing, defaults and validation for the control host.

Owns the `key = value` file format (SPEC §5, reference §5.1), the defaults of
every control-host setting, relative-path resolution (relative to the config
file's folder) and the dispatcher_id sanitiser (reference §4.4).

Never does: I/O at import time, checks that certificate / key / hook files
exist (the API and CLI do that when they start, so `self-check`-style tools can
still load a config whose files are not there yet), or gevent patching.

Format (one setting per line):
    # comment                    lines whose first non-blank character is '#'
    key = value                  key is [A-Za-z0-9_]+; value is trimmed; an empty
                                 value means "use the default"
Blank lines are ignored. There are no sections and no inline comments (a '#'
after a value is part of the value, so `api_port = 7445 # x` is an error that
says so, rather than a silently surprising value). Unlike the Perl original,
indented lines are parsed, not silently skipped. Unknown keys are logged as
`ACTION=config-warn` and ignored; a malformed line or a bad value raises
ConfigError naming the file, the line, the key and what is accepted.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "CONFIG_ENV",
    "ConfigError",
    "Config",
    "load",
    "redact_url",
    "sanitise_dispatcher_id",
]

import ipaddress
import os
import re
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import ctrlexec_agent as wire

# --- constants -----------------------------------------------------------------

DEFAULT_CONFIG_PATH = "/etc/ctrl-exec/ctrl-exec.conf"
CONFIG_ENV = "CTRL_EXEC_CONF"
DEFAULT_CA_DIR = "/etc/ctrl-exec"
DEFAULT_STATE_DIR = "/var/lib/ctrl-exec"
#: A config file larger than this is refused (guards against pointing at a log or device).
MAX_CONFIG_BYTES = 1048576
#: Longest value quoted back in an error message.
MAX_QUOTED_VALUE_CHARS = 80

_KEY_RE = re.compile(r"[A-Za-z0-9_]+")
_INT_RE = re.compile(r"[0-9]+")
_FLOAT_RE = re.compile(r"[0-9]+(\.[0-9]+)?")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})")
#: The password of a URL's userinfo (between ':' and '@'), also in a malformed URL.
_URL_PASSWORD_RE = re.compile(r"(?<=:)[^:@/]*(?=@)")
_REDIS_URL_RE = re.compile(r"(?P<scheme>rediss?)://(?:(?P<userinfo>[^@/]*)@)?"
                           r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::(?P<port>[0-9]{1,5}))?"
                           r"(?:/(?P<db>[0-9]{1,2})?)?")
_TRUE_WORDS = ("1", "yes", "true", "on")
_FALSE_WORDS = ("0", "no", "false", "off")

#: Keys of the Perl ctrl-exec.conf that this implementation does not read; they
#: are accepted with a warning so an upstream config keeps loading.
_UPSTREAM_UNUSED_KEYS = frozenset((
    "port", "pairing_port", "cert_renewal_days",
    "cert_check_interval", "registry_dir", "rotation_file", "service_user",
))
#: Alternative spellings -> canonical key.
_ALIASES = {"timeout": "read_timeout"}


# --- exceptions ----------------------------------------------------------------

class ConfigError(Exception):
    """A config file that cannot be used; str() is one line for the operator.

    Attributes: path (str | None), line (int | None), key (str | None).
    """

    def __init__(self, message: str, *, path: str | None = None,
                 line: int | None = None, key: str | None = None) -> None:
        self.path = path
        self.line = line
        self.key = key
        where = path or "ctrl-exec.conf"
        if line is not None:
            where = "%s line %d" % (where, line)
        super().__init__("%s: %s" % (where, message))


# --- public API ------------------------------------------------------------------

@dataclass
class Config:
    """Every control-host setting, with its default (SPEC §5/§6, reference §5.1).

    Paths are absolute after load(). cert / key / ca default to files in
    ca_dir and dispatcher_id to the sanitised hostname when left as None.
    `warnings` lists the non-fatal problems found while loading (one line each).
    """

    path: str | None = None                 #: the file that was read (None: defaults only)
    base_dir: str = field(default_factory=os.getcwd)   #: folder relative paths resolve against
    ca_dir: str = DEFAULT_CA_DIR
    cert: str | None = None                 #: dispatcher client certificate
    key: str | None = None                  #: dispatcher private key
    ca: str | None = None                   #: CA certificate agents chain to
    state_dir: str = DEFAULT_STATE_DIR
    dispatcher_id: str | None = None
    auth_hook: str | None = None
    auth_hook_timeout: float = 10.0         #: seconds
    api_auth_default: str = "deny"          #: "deny" | "allow"
    auth_deny_generic: bool = False
    api_port: int = 7445
    api_bind: str = "127.0.0.1"
    api_cert: str | None = None
    api_key: str | None = None
    api_max_children: int = 64
    read_timeout: float = 60.0              #: seconds per agent exchange (alias key `timeout`)
    connect_timeout: float = 10.0           #: seconds for TCP connect + TLS handshake to an agent
    max_parallel: int = 64
    #: Processes a large run fan-out is split across (workers.py); 1: this process only.
    dispatch_workers: int = 1
    max_hosts: int = 500
    cert_days: int = 365
    agent_cert_days: int = 825
    #: `ctrlexec.py ping` renews agent certificates with fewer days left than this (0: never).
    agent_renew_days: int = 30
    #: Days the previous dispatcher certificate stays trusted during a rotation (rotation.json).
    cert_overlap_days: int = 30
    pairing_max_queue: int = 10
    pairing_timeout: int = 600              #: seconds, 1-600
    pairing_rate_limit_volume: tuple = (10, 60, 300)   #: (requests, window_s, block_s)
    pairing_rate_limit_disable: bool = False
    run_retention: int = 86400              #: seconds a run record is kept
    purge_interval: int = 600               #: seconds between background purges
    #: "files" (state under state_dir) or redis[s]://[[user]:password@]host[:port][/db]
    state_backend: str = "files"
    state_backend_ca: str | None = None     #: CA file for a rediss:// server (default: system)
    lock_lease: float = 30.0                #: seconds a Redis lock lives without renewal
    audit_log: str | None = None            #: hash-chained audit log (default <state_dir>/audit.log)
    audit_log_max_bytes: int = 67108864     #: rotate the audit log past this size (0: never)
    audit_log_keep: int = 10                #: rotated audit files kept
    warnings: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.cert is None:
            self.cert = os.path.join(self.ca_dir, "dispatcher.crt")
        if self.key is None:
            self.key = os.path.join(self.ca_dir, "dispatcher.key")
        if self.ca is None:
            self.ca = os.path.join(self.ca_dir, "ca.crt")
        if self.dispatcher_id is None:
            self.dispatcher_id = sanitise_dispatcher_id(socket.gethostname())
        if self.audit_log is None:
            self.audit_log = os.path.join(self.state_dir, "audit.log")


def load(path: str | None = None, *, env: Mapping | None = None) -> Config:
    """Read ctrl-exec.conf and return a validated Config.

    Args:
        path: the file; None -> $CTRL_EXEC_CONF -> /etc/ctrl-exec/ctrl-exec.conf.
        env: environment to read CTRL_EXEC_CONF from (default os.environ).
    Returns:
        Config with absolute paths (relative ones resolved against the file's folder).
    Raises:
        ConfigError: an explicitly named file (argument or env) is missing or
            unreadable, a line is malformed, or a value is out of range.
    """
    env = os.environ if env is None else env
    explicit = True
    if not path:
        path = env.get(CONFIG_ENV) or None
    if not path:
        path, explicit = DEFAULT_CONFIG_PATH, False
    path = str(path)
    text = _read_file(path, explicit=explicit)
    if text is None:
        return Config(base_dir=os.getcwd())
    base_dir = os.path.dirname(os.path.abspath(path))
    values, warnings = _parse(text, path)
    values = _resolve_paths(values, base_dir)
    return Config(path=os.path.abspath(path), base_dir=base_dir, warnings=warnings, **values)


def redact_url(url: str) -> str:
    """A state_backend URL fit for messages and logs: any password replaced by ***."""
    return _URL_PASSWORD_RE.sub("***", str(url))


def sanitise_dispatcher_id(text: str) -> str:
    """Turn a hostname into a dispatcher_id agents accept (reference §4.4).

    Characters outside [A-Za-z0-9._-] become '-', leading non-alphanumerics are
    stripped, the result is cut to 64 characters; empty -> "dispatcher".
    """
    if not isinstance(text, str):
        return "dispatcher"
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", text)
    cleaned = re.sub(r"^[^A-Za-z0-9]+", "", cleaned)[:64]
    return cleaned or "dispatcher"


# --- private -----------------------------------------------------------------------

class _Bad(Exception):
    """A value parser's refusal; the text says what is accepted."""


def _read_file(path: str, *, explicit: bool) -> str | None:
    """Return the file's text, None if the default file is absent; ConfigError otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        if not explicit:
            return None
        raise ConfigError("config file not found; pass an existing file with --config "
                          "or %s" % CONFIG_ENV, path=path) from None
    except OSError as exc:
        raise ConfigError("cannot open config file (%s); it must be a readable file"
                          % exc.strerror, path=path) from None
    try:
        # Only regular files: a FIFO or device would block or never end.
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError("config path is not a regular file; pass a ctrl-exec.conf file",
                              path=path)
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError("cannot read config file (%s)" % exc.strerror, path=path) from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError("config file is larger than %d bytes; it must be a small "
                          "key = value file" % MAX_CONFIG_BYTES, path=path)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ConfigError("line is not valid UTF-8; the file must be UTF-8 text",
                              path=path, line=number) from None
    return "\n".join(lines)


def _parse(text: str, path: str) -> tuple[dict, list]:
    """Parse lines into {field: value}; returns (values, warning lines)."""
    values: dict[str, Any] = {}
    seen: dict[str, int] = {}
    warnings: list[str] = []
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not _KEY_RE.fullmatch(name):
            raise ConfigError("malformed line %s; accepted: 'key = value' (key letters, digits "
                              "and '_'), '# comment' or a blank line"
                              % _quote(line), path=path, line=number)
        canonical = _ALIASES.get(name, name)
        if canonical not in _PARSERS:
            reason = ("key of the original ctrl-exec, not used here; ignored"
                      if name in _UPSTREAM_UNUSED_KEYS else "unknown key; ignored")
            _warn(warnings, path, number, name, reason)
            continue
        if canonical in seen:
            _warn(warnings, path, number, name,
                  "overrides the value set on line %d" % seen[canonical])
        seen[canonical] = number
        if value == "":
            values.pop(canonical, None)     # empty value -> the default
            continue
        try:
            values[canonical] = _PARSERS[canonical](value)
        except _Bad as exc:
            shown = redact_url(value) if name == "state_backend" else value
            raise ConfigError("%s must be %s, got %s" % (name, exc, _quote(shown)),
                              path=path, line=number, key=name) from None
    return values, warnings


def _resolve_paths(values: dict, base_dir: str) -> dict:
    """Make every path value absolute against base_dir; derive cert/key/ca from ca_dir."""
    out = dict(values)
    for name in _PATH_KEYS:
        if out.get(name) is not None:
            out[name] = os.path.normpath(os.path.join(base_dir, out[name]))
    ca_dir = out.get("ca_dir", DEFAULT_CA_DIR)
    out.setdefault("cert", os.path.join(ca_dir, "dispatcher.crt"))
    out.setdefault("key", os.path.join(ca_dir, "dispatcher.key"))
    out.setdefault("ca", os.path.join(ca_dir, "ca.crt"))
    return out


def _warn(warnings: list, path: str, line: int, key: str, reason: str) -> None:
    """Record and log a non-fatal config problem."""
    warnings.append("%s line %d: %s: %s" % (path, line, key, reason))
    # SETTING, not KEY: log_action drops any field named "key" (secret redaction).
    wire.log_action("warning", "config-warn", FILE=path, LINE=line, SETTING=key,
                    REASON=reason)


def _quote(value: str) -> str:
    """Quote a value for an error message, shortened and with control characters escaped."""
    if len(value) > MAX_QUOTED_VALUE_CHARS:
        value = value[:MAX_QUOTED_VALUE_CHARS] + "..."
    return repr(value)


def _int(low: int, high: int) -> Callable[[str], int]:
    """Parser for a decimal integer in [low, high]."""
    def parse(value: str) -> int:
        if not _INT_RE.fullmatch(value) or not low <= int(value) <= high:
            raise _Bad("an integer %d-%d" % (low, high))
        return int(value)
    return parse


def _seconds(high: float) -> Callable[[str], float]:
    """Parser for a positive number of seconds up to high."""
    def parse(value: str) -> float:
        if not _FLOAT_RE.fullmatch(value) or not 0 < float(value) <= high:
            raise _Bad("a number of seconds greater than 0 and at most %d" % high)
        return float(value)
    return parse


def _bool(value: str) -> bool:
    """Parser for a boolean word."""
    word = value.lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise _Bad("a boolean (%s)" % "/".join(_TRUE_WORDS + _FALSE_WORDS))


def _choice(*words: str) -> Callable[[str], str]:
    """Parser for one of a fixed set of lower-case words."""
    def parse(value: str) -> str:
        if value.lower() not in words:
            raise _Bad(" or ".join(words))
        return value.lower()
    return parse


def _path(value: str) -> str:
    """Parser for a file or directory path (resolved later against the file's folder)."""
    if "\x00" in value:
        raise _Bad("a file path")
    return value


def _rate_limit(value: str) -> tuple:
    """Parser for 'requests/window_s/block_s', three positive integers."""
    parts = value.split("/")
    if len(parts) != 3 or not all(_INT_RE.fullmatch(p.strip()) and int(p) > 0 for p in parts):
        raise _Bad("three positive integers 'requests/window_seconds/block_seconds' "
                   "(e.g. 10/60/300)")
    return tuple(int(p) for p in parts)


def _bind(value: str) -> str:
    """Parser for the API listen address: an IP address or a host name."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not _HOSTNAME_RE.fullmatch(value):
        raise _Bad("an IP address or a host name (e.g. 127.0.0.1)")
    return value


def _dispatcher_id(value: str) -> str:
    """Parser for an explicit dispatcher_id; refused rather than silently rewritten."""
    if not wire.DISPATCHER_ID_RE.fullmatch(value):
        raise _Bad("1-64 characters, a letter or digit first, then letters, digits, "
                   "'.', '_' or '-'")
    return value


def _state_backend(value: str) -> str:
    """Parser for state_backend: files, or a redis:// / rediss:// URL with a host."""
    if value.lower() == "files":
        return "files"
    match = _REDIS_URL_RE.fullmatch(value)
    if match is None or not match.group("host"):
        raise _Bad("files or redis://[:password@]host[:port][/db] (rediss:// for TLS)")
    port = match.group("port")
    if port is not None and not 1 <= int(port) <= 65535:
        raise _Bad("a Redis URL whose port is 1-65535")
    return value


_PATH_KEYS = ("ca_dir", "cert", "key", "ca", "state_dir", "auth_hook", "api_cert", "api_key",
              "state_backend_ca")

#: Canonical key -> value parser. The key set is the accepted vocabulary.
_PARSERS: dict[str, Callable[[str], Any]] = {
    "ca_dir": _path,
    "cert": _path,
    "key": _path,
    "ca": _path,
    "state_dir": _path,
    "dispatcher_id": _dispatcher_id,
    "auth_hook": _path,
    "auth_hook_timeout": _seconds(3600),
    "api_auth_default": _choice("deny", "allow"),
    "auth_deny_generic": _bool,
    "api_port": _int(1, 65535),
    "api_bind": _bind,
    "api_cert": _path,
    "api_key": _path,
    "api_max_children": _int(1, 100000),
    "read_timeout": _seconds(86400),
    "connect_timeout": _seconds(3600),
    "max_parallel": _int(1, 100000),
    "dispatch_workers": _int(1, 64),
    "max_hosts": _int(1, 100000),
    "cert_days": _int(1, 36500),
    "agent_cert_days": _int(1, 36500),
    "agent_renew_days": _int(0, 36500),
    "cert_overlap_days": _int(1, 36500),
    "pairing_max_queue": _int(1, 10000),
    "pairing_timeout": _int(1, 600),
    "pairing_rate_limit_volume": _rate_limit,
    "pairing_rate_limit_disable": _bool,
    "run_retention": _int(1, 10 * 365 * 86400),
    "purge_interval": _int(1, 86400),
    "state_backend": _state_backend,
    "state_backend_ca": _path,
    "audit_log": _path,
    "audit_log_max_bytes": _int(0, 1 << 40),
    "audit_log_keep": _int(1, 1000),
    "lock_lease": _seconds(3600),
}
