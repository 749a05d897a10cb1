"""ctrl-exec agent: one self-contained file deployed to every managed host.

It owns two things:

* the **wire protocol** shared by every ctrl-exec component (ports, limits,
  HTTP/1.0 framing, serial canonicalisation, the TLS policy, the auth-hook
  contract and the log line format).  The control host imports these from
  here (``import ctrlexec_agent as wire``) instead of keeping a copy;
* the **agent daemon**: an mTLS server that runs allowlisted scripts for
  trusted dispatchers, with ``execve`` and never a shell.

Design: the standard library only (Python >= 3.9), so the file can be copied
to a host with no pip packages.  One thread per connection, bounded by
``max_children``; the TLS handshake runs in that thread, never in the accept
loop, so one silent client cannot stall the others.  Every connection gets a
single request and a single response, then the server closes it.

Security path of a request, top to bottom: ``allowed_ips`` -> rate limits ->
``max_children`` -> TLS handshake (client certificate required, chained to
``ca``) -> revoked serial -> trusted-dispatcher serial -> request limits ->
JSON validation -> allowlist (name rule, realpath inside ``script_dirs``) ->
agent auth hook -> ``execve`` with a clean environment.

Endpoints: ``/run``, ``/ping``, ``/capabilities``, ``/result/<reqid>``, ``/cancel``, and
the certificate lifecycle of the original (reference §2.3): ``/renew`` (a CSR from the
agent's own key), ``/renew-complete`` (the renewed certificate, checked, then served by
a new TLS context swapped in one assignment) and ``/rotate-serial`` (the caller edits
its own entries of the trusted map). All of them require a trusted serial: stricter
than the original, which exempts ``/renew*`` from the serial gate.
"""

from __future__ import annotations

__all__ = [
    "VERSION", "AGENT_PORT", "PAIRING_PORT", "API_PORT", "MAX_BODY_BYTES",
    "MAX_HEADER_LINES", "MAX_PAIRING_BODY_BYTES", "SCRIPT_NAME_RE",
    "AGENT_NAME_RE", "DISPATCHER_ID_RE", "RESULT_REQID_RE", "TLS12_CIPHERS",
    "ProtocolError", "Request", "HookResult", "SocketReader",
    "new_reqid", "canonical_serial", "peer_serial", "pairing_code",
    "server_context", "client_context", "tls_server_context",
    "insecure_client_context", "json_bytes", "read_request", "encode_request",
    "encode_response", "read_response_head", "read_response", "utc_timestamp",
    "openssl_date", "atomic_write", "setup_logging", "log_action",
    "run_auth_hook", "RateLimiter", "cert_not_after", "write_trusted_map", "main",
]

import argparse
import codecs
import collections
import datetime
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

try:  # syslog is POSIX-only; the agent falls back to stderr without it
    import syslog
except ImportError:  # pragma: no cover
    syslog = None


###############################################################################
# Wire protocol ###############################################################
###############################################################################

VERSION = "0.1.0"

AGENT_PORT = 7443
PAIRING_PORT = 7444
API_PORT = 7445

#: Request limits shared by the agent and the control host.
MAX_BODY_BYTES = 1048576
MAX_HEADER_LINES = 32
MAX_LINE_BYTES = 8192
MAX_PAIRING_BODY_BYTES = 65536

SCRIPT_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
AGENT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DISPATCHER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: reqids the agent accepts as file names (async store, /result/<reqid>).
RESULT_REQID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

#: TLS 1.2 suites: ECDHE key exchange with AES-GCM only.  TLS 1.3 suites are
#: all AEAD and are left at OpenSSL's defaults.
TLS12_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
])

HTTP_PHRASES = {
    200: "OK", 202: "Accepted", 400: "Bad Request", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
    413: "Content Too Large", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 503: "Service Unavailable",
}

#: Log fields that carry secrets.  ``log_action`` drops them itself so that no
#: caller can forget.
SECRET_FIELDS = frozenset({"token", "key", "password", "secret", "authorization", "csr_key"})

_HEX_RE = re.compile(r"^[0-9a-f]+$")
_DEC_RE = re.compile(r"^[0-9]+$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class ProtocolError(Exception):
    """A request or response that breaks the framing rules.

    ``status`` is the HTTP status the agent answers with; ``error`` the
    message for the JSON body.
    """

    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


Request = collections.namedtuple("Request", "method path headers body")
HookResult = collections.namedtuple("HookResult", "allowed code error detail")


class SocketReader:
    """Buffered reader over a socket with one overall deadline.

    A plain ``makefile()`` only bounds each ``recv``; a client that sends one
    byte every few seconds would hold a handler forever.  Here every read
    re-arms the socket timeout with the time left before ``deadline``.
    """

    def __init__(self, sock: socket.socket, deadline: float | None = None) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buf = bytearray()
        self.eof = False

    def _fill(self) -> bool:
        if self.eof:
            return False
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("read deadline passed")
            self.sock.settimeout(left)
        chunk = self.sock.recv(65536)
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def readline(self, limit: int = MAX_LINE_BYTES) -> bytes:
        """Return one line including its newline, at most ``limit`` bytes."""
        while True:
            pos = self.buf.find(b"\n", 0, limit)
            if pos >= 0:
                return self._take(pos + 1)
            if len(self.buf) >= limit or not self._fill():
                return self._take(min(limit, len(self.buf)))

    def read(self, size: int) -> bytes:
        """Return exactly ``size`` bytes, fewer only at end of stream."""
        while len(self.buf) < size and self._fill():
            pass
        return self._take(min(size, len(self.buf)))

    def read_all(self, limit: int) -> bytes:
        """Return everything up to end of stream, at most ``limit`` bytes."""
        while len(self.buf) <= limit and self._fill():
            pass
        if len(self.buf) > limit:
            raise ProtocolError(413, "response exceeds %d bytes" % limit)
        return self._take(len(self.buf))

    def _take(self, n: int) -> bytes:
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data


def new_reqid() -> str:
    """Return a request id: 16 lowercase hex characters from ``os.urandom``.

    The reqid is the capability for async results, so it must be
    unguessable; there is deliberately no non-crypto fallback.
    """
    raw = os.urandom(8)
    if len(raw) != 8:
        raise OSError("os.urandom returned a short read")
    return raw.hex()


def canonical_serial(text: str) -> str:
    """Canonicalise a certificate serial, bit-compatible with the original.

    Accepts plain hex, colon-separated hex, ``0x…``, ``serial=…`` and
    decimal.  Digits-only text is read as **decimal** (so the hex ``12``
    becomes ``c``); the same rule applies to stored and live serials, which
    is what keeps map files written by the original tools matching.

    Returns the lowercase hex without leading zeros, or ``""`` when the text
    is not a serial.
    """
    value = (text or "").strip()
    lowered = value.lower()
    if lowered.startswith("0x"):
        value = value[2:]
    elif lowered.startswith("serial="):
        value = value[7:]
    value = value.strip().lower()
    if not value:
        return ""
    if ":" in value:
        digits = value.replace(":", "")
        if not _HEX_RE.match(digits):
            return ""
        return digits.lstrip("0") or "0"
    if _DEC_RE.match(value):
        return format(int(value, 10), "x")
    if _HEX_RE.match(value):
        return value.lstrip("0") or "0"
    return ""


def peer_serial(ssl_sock: ssl.SSLSocket) -> str:
    """Return the canonical serial of the verified peer certificate, or ``""``."""
    cert = ssl_sock.getpeercert() or {}
    return canonical_serial(cert.get("serialNumber", ""))


def pairing_code(csr_pem: bytes) -> str:
    """Return the 6-digit pairing code both sides show for a CSR.

    SHA-256 of the exact PEM bytes; the first four bytes as a big-endian
    unsigned integer, modulo 1,000,000, zero-padded.
    """
    digest = hashlib.sha256(csr_pem).digest()
    return "%06d" % (int.from_bytes(digest[:4], "big") % 1000000)


def server_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """Build the mTLS server context: client certificate required, chained to ``ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _apply_tls_policy(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=ca)
    ctx.load_cert_chain(cert, key)
    ctx.num_tickets = 1  # a dispatcher resumes with one ticket; OpenSSL's second costs ~0.35 ms
    return ctx


def client_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """Build the mTLS client context: the peer must chain to ``ca``.

    Hostnames are not checked: agents are addressed by registry name or IP,
    and identity is the CA chain plus (on the agent) the serial map.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _apply_tls_policy(ctx)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=ca)
    ctx.load_cert_chain(cert, key)
    return ctx


def tls_server_context(cert: str, key: str) -> ssl.SSLContext:
    """Build a server-auth-only context (pairing port, API over HTTPS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _apply_tls_policy(ctx)
    ctx.load_cert_chain(cert, key)
    return ctx


def insecure_client_context() -> ssl.SSLContext:
    """Build the unverified client context used only by ``request-pairing``.

    Before pairing the agent has no CA to verify against; the operator's
    comparison of the 6-digit code and the nonce protect that exchange.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _apply_tls_policy(ctx)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def json_bytes(obj: object) -> bytes:
    """Encode ``obj`` as compact UTF-8 JSON."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def read_request(rfile, *, max_body: int = MAX_BODY_BYTES) -> Request:
    """Read one HTTP/1.x request: line, at most 32 headers, Content-Length body.

    Raises:
        ProtocolError: 400 empty/malformed request, 431 too many header
            lines, 413 declared body over ``max_body`` (before reading it).
    """
    line = rfile.readline(MAX_LINE_BYTES)
    if not line.strip():
        raise ProtocolError(400, "empty request")
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ProtocolError(400, "malformed request line")
    method, path = parts[0].upper(), parts[1]
    headers = _read_headers(rfile)
    length = _content_length(headers)
    if length > max_body:
        raise ProtocolError(413, "body exceeds %d bytes" % max_body)
    body = rfile.read(length) if length else b""
    if len(body) != length:
        raise ProtocolError(400, "incomplete body")
    return Request(method, path, headers, body)


def encode_request(method: str, path: str, body: dict | None = None, *, host: str = "") -> bytes:
    """Encode an HTTP/1.0 request with a JSON body framed by Content-Length."""
    payload = json_bytes(body) if body is not None else b""
    head = ["%s %s HTTP/1.0" % (method, path)]
    if host:
        head.append("Host: %s" % host)
    head.append("User-Agent: ctrl-exec/%s" % VERSION)
    if body is not None:
        head.append("Content-Type: application/json")
    head.append("Content-Length: %d" % len(payload))
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload


def encode_response(status: int, body: dict | None = None, *,
                    content_type: str = "application/json") -> bytes:
    """Encode an HTTP/1.0 response; ``body`` None means headers only, no length."""
    head = "HTTP/1.0 %d %s\r\nContent-Type: %s\r\n" % (
        status, HTTP_PHRASES.get(status, "Unknown"), content_type)
    if body is None:
        return (head + "\r\n").encode("latin-1")
    payload = json_bytes(body)
    head += "Content-Length: %d\r\nConnection: close\r\n\r\n" % len(payload)
    return head.encode("latin-1") + payload


def read_response_head(rfile) -> tuple:
    """Read a status line and headers; return ``(status, headers)``.

    Raises:
        ProtocolError: the peer did not answer with HTTP.
    """
    line = rfile.readline(MAX_LINE_BYTES)
    if not line:
        raise ProtocolError(502, "no response")
    parts = line.decode("latin-1").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ProtocolError(502, "malformed response")
    return int(parts[1]), _read_headers(rfile, limit=64)


def read_response(rfile, *, max_body: int = 64 * MAX_BODY_BYTES) -> tuple:
    """Read a whole response; return ``(status, headers, body)``.

    The body is ``Content-Length`` bytes, or everything up to end of stream
    when the header is absent (streamed answers).
    """
    status, headers = read_response_head(rfile)
    if "content-length" in headers:
        length = _content_length(headers)
        if length > max_body:
            raise ProtocolError(413, "response exceeds %d bytes" % max_body)
        body = rfile.read(length)
        if len(body) != length:
            raise ProtocolError(502, "truncated response")
    else:
        body = rfile.read_all(max_body)
    return status, headers, body


def utc_timestamp(epoch: float | None = None) -> str:
    """Return ISO-8601 UTC ``YYYY-MM-DDTHH:MM:SSZ``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if epoch is None else epoch))


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def openssl_date(moment: datetime.datetime) -> str:
    """Return openssl's ``notAfter`` text, e.g. ``Jun  7 16:28:00 2027 GMT``."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return "%s %2d %02d:%02d:%02d %d GMT" % (
        _MONTHS[moment.month - 1], moment.day, moment.hour, moment.minute, moment.second, moment.year)


def atomic_write(path: str, data: bytes, mode: int, *, overwrite: bool = True,
                 sync_dir: bool = False) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync, then rename.

    The temp file is created private (0600, ``O_EXCL``) and set to ``mode``
    before any byte is written, so a private key is never readable by others,
    not even for an instant.  ``overwrite=False`` links the file into place
    instead of replacing, so of two concurrent writers only one can win.
    ``sync_dir`` also fsyncs the folder, so the rename itself survives a crash.
    Raises: OSError (``FileExistsError`` when overwrite=False and path exists).
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        # Clean-up only (the temp name is left over after a link or an error);
        # an error propagates unchanged.
        if os.path.lexists(tmp):
            os.unlink(tmp)
    if sync_dir:
        _fsync_dir(folder)


_log_state = {"ident": "ctrl-exec", "syslog": False, "stderr_min": 6}
_SYSLOG_LEVELS = {"info": 6, "warning": 4, "err": 3}


def setup_logging(ident: str, *, stderr_level: str = "info") -> None:
    """Log to syslog (facility daemon) when ``/dev/log`` exists, else stderr.

    ``CTRL_EXEC_LOG=stderr`` forces stderr (tests, foreground debugging);
    ``stderr_level`` drops less important lines on stderr (an interactive CLI
    shows warnings only, so its output stays readable).
    """
    _log_state["ident"] = ident
    forced = os.environ.get("CTRL_EXEC_LOG") == "stderr"
    use_syslog = syslog is not None and os.path.exists("/dev/log") and not forced
    if use_syslog:
        syslog.openlog(ident, syslog.LOG_PID | syslog.LOG_NDELAY, syslog.LOG_DAEMON)
    _log_state["syslog"] = use_syslog
    _log_state["stderr_min"] = 6 if forced else _SYSLOG_LEVELS.get(stderr_level, 6)


def log_action(level: str, action: str, **fields) -> None:
    """Log one ``ACTION=x KEY=value …`` line, keys ASCII-sorted after ACTION.

    Secret fields (token, key, …) are dropped here; control characters in
    values are escaped so a value can never forge a second log line.
    """
    priority = _SYSLOG_LEVELS.get(level, 6)
    if not _log_state["syslog"] and priority > _log_state["stderr_min"]:
        return
    parts = ["ACTION=%s" % _log_value(action)]
    for name in sorted(fields, key=str.upper):
        if name.lower() in SECRET_FIELDS:
            continue
        parts.append("%s=%s" % (name.upper(), _log_value(fields[name])))
    line = " ".join(parts)
    if _log_state["syslog"]:
        syslog.syslog(priority, line)
        return
    try:
        sys.stderr.write("%s: %s\n" % (_log_state["ident"], line))
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # a closed stderr must never break request handling


def run_auth_hook(path: str | None, *, timeout_s: float, action: str, context: dict,
                  extra_env: dict | None = None) -> HookResult:
    """Run an auth hook: JSON context on stdin, ``ENVEXEC_*`` variables in env.

    Fails closed: only a hook that exited normally with status 0 allows.
    A timeout, a signal death, an exec failure or any exit other than 0
    denies.  The hook's own output is discarded.

    Returns:
        HookResult(allowed, code, error, detail): exit 1/2/3 map to
        ``denied``/``bad credentials``/``insufficient privilege`` with codes
        1/2/3; everything else is ``denied``, code 1, with a ``detail``.
    """
    payload = dict(context)
    payload["action"] = action
    payload.setdefault("timestamp", utc_timestamp())
    env = dict(os.environ)
    env.update(_hook_env(payload))
    env.update(extra_env or {})
    if not path or not os.path.isfile(path) or not os.access(path, os.X_OK):
        return HookResult(False, 1, "denied", "auth hook is missing or not executable")
    oversized = [name for name, value in env.items()
                 if len(name) + len(value.encode("utf-8", "surrogateescape")) + 2 > HOOK_ENV_STRING_MAX]
    if oversized:
        # The kernel refuses an environment string over 128 KiB.  Leaving the
        # variable out would let a hook that reads it see no arguments and
        # allow, so this fails closed and says why.
        return HookResult(False, 1, "denied", "request too large for the auth hook environment "
                          "(%s over 128 KiB); send smaller arguments" % ", ".join(sorted(oversized)))
    try:
        proc = subprocess.Popen([path], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env, close_fds=True,
                                start_new_session=True, cwd="/")
    except ValueError:
        return HookResult(False, 1, "denied", "request fields contain NUL bytes, which the auth "
                          "hook environment cannot carry")
    except OSError:
        return HookResult(False, 1, "denied", "auth hook is missing or not executable")
    # stdin is fed from a helper thread and the deadline is applied with
    # wait(): a hook that never reads stdin, or never exits, cannot hold us
    # past timeout_s (communicate() ignores its timeout under gevent).
    feeder = threading.Thread(target=_feed_stdin, args=(proc.stdin, json_bytes(payload)), daemon=True)
    feeder.start()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc, signal.SIGKILL)
        proc.wait()
        return HookResult(False, 1, "denied", "auth hook timed out after %gs" % timeout_s)
    finally:
        feeder.join(1.0)
    code = proc.returncode
    if code == 0:
        return HookResult(True, 0, "", "")
    if code < 0:
        return HookResult(False, 1, "denied", "auth hook killed by signal %d" % -code)
    if code in _HOOK_REASONS:
        return HookResult(False, code, _HOOK_REASONS[code], "")
    return HookResult(False, 1, "denied", "auth hook exited %d" % code)


_HOOK_REASONS = {1: "denied", 2: "bad credentials", 3: "insufficient privilege"}
#: Longest ``NAME=value`` environment string the kernel accepts (MAX_ARG_STRLEN).
HOOK_ENV_STRING_MAX = 131072


def _feed_stdin(pipe, data: bytes) -> None:
    try:
        pipe.write(data)
    except (BrokenPipeError, OSError, ValueError):
        pass  # the hook closed stdin or was killed; its exit status decides
    finally:
        try:
            pipe.close()
        except (BrokenPipeError, OSError):
            pass


def _hook_env(payload: dict) -> dict:
    args = [str(arg) for arg in payload.get("args") or []]
    submitter = payload.get("submitter") or {}
    return {
        "ENVEXEC_ACTION": str(payload.get("action", "")),
        "ENVEXEC_SCRIPT": str(payload.get("script", "") or ""),
        "ENVEXEC_HOSTS": ",".join(str(h) for h in payload.get("hosts") or []),
        "ENVEXEC_ARGS": " ".join(args),
        "ENVEXEC_ARGS_JSON": json.dumps(args, separators=(",", ":")),
        "ENVEXEC_USERNAME": str(payload.get("username", "") or ""),
        "ENVEXEC_TOKEN": str(payload.get("token", "") or ""),
        "ENVEXEC_SOURCE_IP": str(payload.get("source_ip", "") or ""),
        "ENVEXEC_TIMESTAMP": str(payload.get("timestamp", "")),
        "ENVEXEC_DISPATCHER": str(payload.get("dispatcher", "") or ""),
        "ENVEXEC_DISPATCHER_SERIAL": str(payload.get("dispatcher_serial", "") or ""),
        "ENVEXEC_REQID": str(payload.get("reqid", "") or ""),
        "ENVEXEC_SUBMITTER": str(submitter.get("username", "") or "") if isinstance(submitter, dict) else "",
        "ENVEXEC_SUBMITTER_IP": str(submitter.get("source_ip", "") or "") if isinstance(submitter, dict) else "",
    }


def _fsync_dir(folder: str) -> None:
    """Make a rename durable; a failure is not fatal (some filesystems refuse)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _apply_tls_policy(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION


def _read_headers(rfile, limit: int = MAX_HEADER_LINES) -> dict:
    headers = {}
    count = 0
    while True:
        line = rfile.readline(MAX_LINE_BYTES)
        if not line or line in (b"\r\n", b"\n"):
            return headers
        count += 1
        if count > limit:
            raise ProtocolError(431, "more than %d header lines" % limit)
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise ProtocolError(400, "malformed header line")
        headers[name.strip().lower()] = value.strip()


def _content_length(headers: dict) -> int:
    raw = headers.get("content-length", "0").strip() or "0"
    if not raw.isdigit() or len(raw) > 12:
        raise ProtocolError(400, "invalid Content-Length")
    return int(raw)


def _log_value(value: object) -> str:
    text = "" if value is None else str(value)
    text = _CONTROL_RE.sub(lambda m: "\\x%02x" % ord(m.group()), text)
    if any(ch.isspace() for ch in text):
        return '"%s"' % text
    return text


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def _group_alive(pgid: int) -> bool:
    """True while any process of the group pgid exists (zombies of others' children aside)."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _process_start(pid: int) -> str:
    """The start time of pid (field 22 of /proc/<pid>/stat), "" when it does not exist: a
    recorded pid is only signalled while it is still the same process."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            raw = handle.read().decode("ascii", "replace")
    except OSError:
        return ""
    return raw.rsplit(")", 1)[-1].split()[19] if ")" in raw else ""


def kill_run_group(pgid: int, grace_s: float) -> str:
    """SIGTERM the group, SIGKILL it after grace_s if anything is left, wait until it is
    empty (bounded). Returns the signal that ended it: "TERM" or "KILL"."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return "TERM"
    deadline = time.monotonic() + grace_s
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not _group_alive(pgid):
        return "TERM"
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + KILL_GRACE_S
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return "KILL"


class RunningScripts:
    """The script process groups this agent process runs, by (dispatcher, reqid), so a
    cancel from that dispatcher can find and kill them, and their answers can say so."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict = {}

    def started(self, owner: str, reqid: str, pgid: int) -> None:
        with self._lock:
            self._runs.setdefault((owner, reqid), {"pgids": [], "cancelled": False})["pgids"].append(pgid)

    def finished(self, owner: str, reqid: str) -> bool:
        """Forget the run; True when it was cancelled."""
        with self._lock:
            entry = self._runs.pop((owner, reqid), None)
        return bool(entry and entry["cancelled"])

    def take(self, owner: str, reqid: str) -> list:
        """Mark the run cancelled; its process groups (empty when it does not run here)."""
        with self._lock:
            entry = self._runs.get((owner, reqid))
            if entry is None:
                return []
            entry["cancelled"] = True
            return list(entry["pgids"])


###############################################################################
# Agent configuration #########################################################
###############################################################################

EX_CONFIG = 78
#: Pairing key types (agent.conf key_type, request-pairing --key-type).
KEY_TYPES = ("auto", "ec-p256", "rsa-3072")
DEFAULT_CONFIG = "/etc/ctrl-exec-agent/agent.conf"
DEFAULT_STATE_DIR = "/var/lib/ctrl-exec-agent"
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Variables copied from the agent's own environment into a script's.
PASSED_ENV = ("HOME", "LANG", "LC_ALL", "TZ", "TERM", "USER", "LOGNAME")
REQUEST_DEADLINE_S = 30.0
WRITE_TIMEOUT_S = 60.0
KILL_GRACE_S = 5.0
#: How long a cancel waits for a just-started detached runner to record its script's group.
DETACHED_START_WAIT_S = 3.0
ASYNC_RETENTION_S = 86400
RATE_TABLE_MAX = 1000

_KEY_LINE_RE = re.compile(r"^([A-Za-z_][\w-]*)\s*=\s*(.*)$")
_SECTION_RE = re.compile(r"^\[\s*([\w.-]+(?:\s+[\w.-]+)?)\s*\]$")
_TRUE = {"1", "y", "yes", "true", "on"}
_FALSE = {"0", "n", "no", "false", "off", ""}


class ConfigError(Exception):
    """A configuration problem: names the file, the line and what is expected."""


class AgentConfig:
    """Parsed ``agent.conf``.  Relative paths resolve against the file's folder."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.base_dir = os.path.dirname(self.path)
        self.port = AGENT_PORT
        self.bind = "0.0.0.0"
        self.cert = self._abs("agent.crt")
        self.key = self._abs("agent.key")
        self.ca = self._abs("ca.crt")
        self.state_dir = DEFAULT_STATE_DIR
        self.trusted_dispatchers_path = ""
        self.revoked_serials = self._abs("revoked-serials")
        self.allowlist = self._abs("scripts.conf")
        self.script_dirs: list = []
        self.auth_hook = ""
        self.auth_hook_timeout = 10.0
        self.allowed_ips: list = []
        self.rate_limit_volume = (10, 60, 300)
        self.rate_limit_probe = (3, 600, 3600)
        self.rate_limit_disable = False
        self.max_children = 256
        self.run_timeout = 3600
        self.max_output = 1048576
        self.stdin_timeout = 10.0
        #: Deadline for the TLS handshake plus the whole request (slowloris bound).
        self.request_timeout = REQUEST_DEADLINE_S
        self.streaming = True
        self.hostname = ""
        #: Key of a pairing CSR: "auto" (P-256, then RSA-3072 if the dispatcher wants RSA),
        #: "ec-p256" or "rsa-3072".
        self.key_type = "auto"
        #: Where a renewed certificate goes when ``cert`` is not writable by the agent.
        self.cert_staging_path = ""
        self.tags: dict = {}

    def _abs(self, value: str) -> str:
        return os.path.normpath(os.path.join(self.base_dir, value))


def load_agent_config(path: str, *, require_files: bool = True) -> AgentConfig:
    """Parse ``agent.conf``.

    Raises:
        ConfigError: one line naming the file, the line and the fix.
    """
    cfg = AgentConfig(path)
    try:
        with open(cfg.path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise ConfigError("%s: cannot read config: %s (pass --config PATH to an agent.conf)"
                          % (path, exc.strerror))
    section = ""
    explicit_trusted = False
    for number, line, key, value in _config_lines(cfg.path, raw):
        if key is None:
            section = line
            continue
        where = "%s line %d" % (cfg.path, number)
        if section == "tags":
            cfg.tags[key] = value
            continue
        if section:
            continue  # [profile …] and unknown sections: parsed elsewhere or ignored
        explicit_trusted |= key == "trusted_dispatchers_path"
        _apply_agent_key(cfg, key, value, where)
    if not explicit_trusted:
        cfg.trusted_dispatchers_path = os.path.join(cfg.state_dir, "ctrl-exec-dispatchers")
    if not cfg.cert_staging_path:
        cfg.cert_staging_path = os.path.join(cfg.state_dir, "agent.crt.staged")
    if cfg.auth_hook and not (os.path.isfile(cfg.auth_hook) and os.access(cfg.auth_hook, os.X_OK)):
        raise ConfigError("%s: auth_hook %s does not exist or is not executable "
                          "(set it to an executable file, or remove the key)" % (cfg.path, cfg.auth_hook))
    if require_files:
        for name in ("cert", "key", "ca"):
            if not os.path.isfile(getattr(cfg, name)):
                raise ConfigError("%s: %s file %s does not exist - this agent is not paired yet "
                                  "(run: ctrlexec_agent.py request-pairing --dispatcher HOST, or "
                                  "copy an enrolment bundle from 'ctrlexec.py enroll')"
                                  % (cfg.path, name, getattr(cfg, name)))
    return cfg


def _config_lines(path: str, raw: bytes):
    """Yield ``(number, text, key, value)``; sections come as ``(number, name, None, None)``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("%s: not valid UTF-8 text (save the file as UTF-8)" % path)
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        section = _SECTION_RE.match(stripped)
        if section:
            yield number, " ".join(section.group(1).split()).lower(), None, None
            continue
        match = _KEY_LINE_RE.match(stripped)
        if not match:
            raise ConfigError("%s line %d: malformed line %r (expected 'key = value', "
                              "'[section]' or a '#' comment)" % (path, number, stripped[:60]))
        yield number, stripped, match.group(1), match.group(2).strip()


def _apply_agent_key(cfg: AgentConfig, key: str, value: str, where: str) -> None:
    if key in ("cert", "key", "ca", "revoked_serials", "trusted_dispatchers_path",
               "allowlist", "state_dir", "auth_hook", "cert_staging_path"):
        setattr(cfg, key, cfg._abs(value) if value else "")
    elif key == "port":
        cfg.port = _int_value(value, where, key, 1, 65535)
    elif key == "bind":
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ConfigError("%s: bind must be an IP address such as 0.0.0.0 or 127.0.0.1, got %r"
                              % (where, value))
        cfg.bind = value
    elif key == "script_dirs":
        dirs = [d for d in value.split(":") if d]
        for folder in dirs:
            if not os.path.isabs(folder):
                raise ConfigError("%s: script_dirs entries must be absolute folders separated by "
                                  "':', got %r" % (where, folder))
        cfg.script_dirs = [os.path.realpath(d) for d in dirs]
    elif key == "auth_hook_timeout":
        cfg.auth_hook_timeout = float(_int_value(value, where, key, 1, 3600))
    elif key == "stdin_timeout":
        cfg.stdin_timeout = float(_int_value(value, where, key, 1, 3600))
    elif key == "request_timeout":
        cfg.request_timeout = float(_int_value(value, where, key, 1, 3600))
    elif key == "allowed_ips":
        cfg.allowed_ips = _parse_networks(value, where)
    elif key in ("rate_limit_volume", "rate_limit_probe"):
        setattr(cfg, key, _parse_rate(value, where, key))
    elif key in ("rate_limit_disable", "streaming"):
        setattr(cfg, key, _bool_value(value, where, key))
    elif key == "max_children":
        cfg.max_children = _int_value(value, where, key, 1, 100000)
    elif key == "run_timeout":
        cfg.run_timeout = _int_value(value, where, key, 0, 10 ** 7)
    elif key == "max_output":
        cfg.max_output = _int_value(value, where, key, 1024, 1 << 30)
    elif key == "hostname":
        cfg.hostname = value
    elif key == "key_type":
        if value not in KEY_TYPES:
            raise ConfigError("%s: key_type must be one of %s, got %r"
                              % (where, ", ".join(KEY_TYPES), value))
        cfg.key_type = value
    elif key in ("executor_socket", "async_runs_dir", "pairing_port",
                 "dispatcher_serial_path"):
        log_action("warning", "config-warn", FILE=cfg.path, KEY=key,
                   REASON="not used by this agent")
    else:
        log_action("warning", "config-warn", FILE=cfg.path, KEY=key, REASON="unknown key ignored")


def _int_value(value: str, where: str, key: str, low: int, high: int) -> int:
    if not re.match(r"^[0-9]{1,12}$", value) or not low <= int(value) <= high:
        raise ConfigError("%s: %s must be a whole number from %d to %d, got %r"
                          % (where, key, low, high, value))
    return int(value)


def _bool_value(value: str, where: str, key: str) -> bool:
    lowered = value.lower()
    if lowered in _TRUE or lowered.startswith("y"):
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError("%s: %s must be 1/0, yes/no, true/false or on/off, got %r" % (where, key, value))


def _parse_rate(value: str, where: str, key: str) -> tuple:
    parts = value.split("/")
    if len(parts) != 3 or not all(re.match(r"^[0-9]{1,9}$", p) for p in parts):
        raise ConfigError("%s: %s must be limit/window/block in whole seconds, e.g. 10/60/300, "
                          "got %r" % (where, key, value))
    return tuple(int(p) for p in parts)


def _parse_networks(value: str, where: str) -> list:
    networks = []
    for item in (p.strip() for p in value.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError("%s: allowed_ips entries must be IP addresses or CIDR prefixes "
                              "separated by commas (e.g. 10.0.0.5, 10.1.0.0/16), got %r"
                              % (where, item))
    return networks


###############################################################################
# Allowlist, trust map and revocation list ####################################
###############################################################################

class AllowlistError(ConfigError):
    """``scripts.conf`` could not be loaded; the previous allowlist stays in force."""


def load_allowlist(path: str, script_dirs: list | None = None) -> dict:
    """Parse ``scripts.conf`` into ``{name: absolute_path}``.

    A name must match ``[A-Za-z0-9_-]+``; a path must be absolute and, when
    ``script_dirs`` is set, resolve (realpath) inside one of them.  Any bad
    line rejects the whole file, so a typo can never half-load an allowlist.
    """
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise AllowlistError("%s: cannot read allowlist: %s" % (path, exc.strerror))
    entries = {}
    for number, line, key, value in _config_lines(path, raw):
        where = "%s line %d" % (path, number)
        if key is None:
            raise AllowlistError("%s: sections are not allowed in scripts.conf "
                                 "(expected 'name = /absolute/path')" % where)
        if not SCRIPT_NAME_RE.match(key):
            raise AllowlistError("%s: script name %r may only use letters, digits, '_' and '-'"
                                 % (where, key))
        tokens = value.split()
        bare = [t for t in tokens if not re.match(r"^[a-z_]+=", t)]
        if len(bare) != 1:
            raise AllowlistError("%s: expected exactly one absolute path after '%s =', got %r"
                                 % (where, key, value))
        script_path = bare[0]
        if not os.path.isabs(script_path):
            raise AllowlistError("%s: script path %r must be absolute (start with '/')"
                                 % (where, script_path))
        if script_dirs and not _inside_dirs(script_path, script_dirs):
            raise AllowlistError("%s: %s resolves outside script_dirs (%s)"
                                 % (where, script_path, ":".join(script_dirs)))
        entries[key] = script_path
    return entries


def load_trusted_map(path: str) -> dict:
    """Parse the trusted-dispatcher map: ``<serial> <dispatcher_id>`` per line."""
    trusted = {}
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as handle:
            lines = handle.readlines()
    except OSError:
        return trusted
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        serial = canonical_serial(fields[0])
        if serial and DISPATCHER_ID_RE.match(fields[1]):
            trusted[serial] = fields[1]
    return trusted


def load_revoked(path: str) -> frozenset:
    """Parse the revocation list: one serial per line in any accepted form."""
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as handle:
            lines = handle.readlines()
    except FileNotFoundError:
        return frozenset()
    except OSError as exc:
        log_action("err", "revoked-serials-unreadable", FILE=path, ERROR=exc.strerror)
        raise ConfigError("%s: revocation list is unreadable: %s" % (path, exc.strerror))
    serials = set()
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if fields:
            serial = canonical_serial(fields[0])
            if serial:
                serials.add(serial)
    return frozenset(serials)


def _inside_dirs(path: str, script_dirs: list) -> bool:
    """True when ``path`` resolves (symlinks, ``..``) inside one of ``script_dirs``."""
    real = os.path.realpath(path)
    return any(real.startswith(folder.rstrip("/") + "/") for folder in script_dirs)


###############################################################################
# Runner ######################################################################
###############################################################################

RunResult = collections.namedtuple("RunResult", "exit stdout stderr truncated timed_out error")


def script_env() -> dict:
    """Return the clean environment for scripts: a fixed PATH plus locale basics.

    Nothing from the request reaches the environment; the context travels on
    stdin.  ``LD_*`` and friends from the agent's own environment are dropped.
    """
    env = {"PATH": SAFE_PATH}
    for name in PASSED_ENV:
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def run_script(path: str, args: list, context: dict, *, timeout_s: float = 0,
               max_output: int = 1048576, stdin_timeout: float = 10.0,
               on_output=None, on_start=None) -> RunResult:
    """Run ``path`` with ``execve(path, [path, *args])`` and capture its output.

    The script gets a clean environment, its own process group and the JSON
    ``context`` on stdin.  stdout and stderr are drained together (no pipe
    deadlock), each capped at ``max_output`` bytes (``truncated``).  Past
    ``timeout_s`` (0 = none) the whole group gets SIGTERM, then SIGKILL after
    5 s; the result is then exit 126 with ``timed_out``.

    Args:
        on_output: optional ``callback(stream_name, text)`` called with each
            decoded chunk as it arrives (live streaming), within the cap.
        on_start: optional ``callback(pid)`` called once the script runs; pid is also
            its process group id (a cancel kills that group).

    Returns:
        RunResult(exit, stdout, stderr, truncated, timed_out, error): exit is
        the script's code, 126 for a signal death, 127 when exec failed.
    """
    try:
        proc = subprocess.Popen([path] + list(args), executable=path, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=script_env(), close_fds=True, start_new_session=True,
                                cwd="/")
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        return RunResult(127, "", "", False, False, "cannot execute script: %s" % reason)
    if on_start is not None:
        on_start(proc.pid)
    capture = _Capture(proc, max_output, on_output)
    capture.pump(json_bytes(context) + b"\n", timeout_s, stdin_timeout)
    code = proc.returncode
    if capture.timed_out:
        error = "timed out after %ds" % timeout_s
        return RunResult(126, capture.text("stdout"), capture.text("stderr"),
                         capture.truncated, True, error)
    exit_code = 126 if code is None or code < 0 else code
    return RunResult(exit_code, capture.text("stdout"), capture.text("stderr"),
                     capture.truncated, False, "")


class _Capture:
    """Drive one child's pipes with a selector: stdin out, stdout/stderr in."""

    def __init__(self, proc: subprocess.Popen, max_output: int, on_output) -> None:
        self.proc = proc
        self.max_output = max_output
        self.on_output = on_output
        self.data = {"stdout": bytearray(), "stderr": bytearray()}
        self.decoders = {name: codecs.getincrementaldecoder("utf-8")("replace") for name in self.data}
        self.truncated = False
        self.timed_out = False

    def text(self, name: str) -> str:
        return bytes(self.data[name]).decode("utf-8", "replace")

    def pump(self, stdin_data: bytes, timeout_s: float, stdin_timeout: float) -> None:
        proc = self.proc
        start = time.monotonic()
        deadline = start + timeout_s if timeout_s else None
        stdin_deadline = start + stdin_timeout
        kill_at = abandon_at = None
        sel = selectors.DefaultSelector()
        streams = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
        for fd in streams:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        stdin_fd = proc.stdin.fileno()
        os.set_blocking(stdin_fd, False)
        sel.register(stdin_fd, selectors.EVENT_WRITE)
        pending = memoryview(stdin_data)
        try:
            while streams or stdin_fd is not None:
                now = time.monotonic()
                if deadline is not None and now >= deadline and not self.timed_out:
                    self.timed_out = True
                    _kill_group(proc, signal.SIGTERM)
                    kill_at = now + KILL_GRACE_S
                if kill_at is not None and now >= kill_at:
                    _kill_group(proc, signal.SIGKILL)
                    kill_at = None
                    abandon_at = now + KILL_GRACE_S
                if abandon_at is not None and now >= abandon_at:
                    break  # a process that left the group still holds the pipes
                if stdin_fd is not None and now >= stdin_deadline:
                    log_action("warning", "stdin-timeout", BYTES=len(pending))
                    sel.unregister(stdin_fd)
                    proc.stdin.close()
                    stdin_fd = None
                    continue
                waits = [t for t in (deadline if not self.timed_out else None, kill_at, abandon_at,
                                     stdin_deadline if stdin_fd is not None else None) if t]
                wait = max(0.0, min(waits) - now) if waits else None
                if not streams and stdin_fd is not None and wait is None:
                    wait = 1.0
                for key, _ in sel.select(wait):
                    fd = key.fd
                    if fd == stdin_fd:
                        try:
                            written = os.write(fd, pending[:65536])
                            pending = pending[written:]
                        except BlockingIOError:
                            continue
                        except (BrokenPipeError, OSError):
                            pending = pending[:0]
                        if not pending:
                            sel.unregister(fd)
                            proc.stdin.close()
                            stdin_fd = None
                        continue
                    try:
                        chunk = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        sel.unregister(fd)
                        self._finish(streams.pop(fd))
                        continue
                    self._append(streams[fd], chunk)
        finally:
            sel.close()
            for handle in (proc.stdin, proc.stdout, proc.stderr):
                try:
                    handle.close()
                except OSError:
                    pass
        self._reap(deadline, kill_at)

    def _append(self, name: str, chunk: bytes) -> None:
        buf = self.data[name]
        room = self.max_output - len(buf)
        if room <= 0:
            self.truncated = True
            return
        if len(chunk) > room:
            chunk = chunk[:room]
            self.truncated = True
        buf += chunk
        if self.on_output is not None:
            text = self.decoders[name].decode(chunk)
            if text:
                self.on_output(name, text)

    def _finish(self, name: str) -> None:
        if self.on_output is not None:
            tail = self.decoders[name].decode(b"", final=True)
            if tail:
                self.on_output(name, tail)

    def _reap(self, deadline, kill_at) -> None:
        """Wait for the child after its pipes closed, still honouring the timeout."""
        proc = self.proc
        while True:
            now = time.monotonic()
            limits = [t for t in (deadline if not self.timed_out else None, kill_at) if t]
            try:
                proc.wait(timeout=max(0.0, min(limits) - now) if limits else None)
                return
            except subprocess.TimeoutExpired:
                if not self.timed_out:
                    self.timed_out = True
                    _kill_group(proc, signal.SIGTERM)
                    kill_at = time.monotonic() + KILL_GRACE_S
                else:
                    _kill_group(proc, signal.SIGKILL)
                    kill_at = None


###############################################################################
# Detached (async) runs #######################################################
###############################################################################

class AsyncStore:
    """Records of detached runs under ``<state_dir>/runs/<owner>/<reqid>.json``.

    The owner is the caller's ``dispatcher_id``, so one dispatcher can never
    read another's results.  Per-script ``flock`` files in ``runs/.locks``
    make a second detached run of a running script answer 409 busy.
    """

    def __init__(self, state_dir: str) -> None:
        self.root = os.path.join(state_dir, "runs")

    def record_path(self, owner: str, reqid: str) -> str:
        folder = os.path.join(self.root, owner) if DISPATCHER_ID_RE.match(owner or "") else self.root
        return os.path.join(folder, reqid + ".json")

    def read(self, owner: str, reqid: str) -> dict | None:
        if not RESULT_REQID_RE.match(reqid):
            return None
        try:
            with open(self.record_path(owner, reqid), "rb") as handle:
                record = json.loads(handle.read().decode("utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("owner", "") != (owner or ""):
            return None
        return record

    def write(self, record: dict) -> None:
        path = self.record_path(record.get("owner", ""), record["reqid"])
        os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
        atomic_write(path, json_bytes(record), 0o640)

    def mark_cancelled(self, owner: str, reqid: str) -> None:
        """Leave the marker the detached runner reads to record its run as cancelled."""
        atomic_write(self.record_path(owner, reqid)[:-5] + ".cancelled", b"1\n", 0o640)

    def take_cancel_mark(self, owner: str, reqid: str) -> bool:
        """True (and the marker gone) when a cancel marked this run."""
        try:
            os.unlink(self.record_path(owner, reqid)[:-5] + ".cancelled")
            return True
        except OSError:
            return False

    def try_lock(self, script: str):
        """Return an fd holding the script's lock, or None when it is busy."""
        folder = os.path.join(self.root, ".locks")
        os.makedirs(folder, mode=0o750, exist_ok=True)
        fd = os.open(os.path.join(folder, script + ".lock"), os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return fd

    def purge(self, max_age_s: int = ASYNC_RETENTION_S) -> int:
        """Delete records older than ``max_age_s`` (by mtime); return how many."""
        cutoff = time.time() - max_age_s
        removed = 0
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = [d for d in dirs if d != ".locks"]
            for name in files:
                path = os.path.join(folder, name)
                try:
                    if name.endswith(".json") and os.stat(path).st_mtime < cutoff:
                        os.unlink(path)
                        removed += 1
                except OSError:
                    continue
        return removed


def start_detached(job: dict, lock_fd: int) -> None:
    """Start ``run-detached`` in its own session, handing it the script lock.

    The child outlives this agent process (restart, crash), holds the
    per-script lock for its lifetime and writes the final record itself.
    """
    argv = [sys.executable, "-I", os.path.abspath(__file__), "run-detached"]
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=devnull, stderr=devnull,
                                close_fds=True, pass_fds=(lock_fd,), start_new_session=True,
                                cwd="/", env=script_env())
    finally:
        os.close(devnull)
    proc.stdin.write(json_bytes(dict(job, lock_fd=lock_fd)))
    proc.stdin.close()
    threading.Thread(target=proc.wait, daemon=True).start()  # reap, never block


def run_detached_main() -> int:
    """Entry point of the detached runner: job JSON on stdin, record on disk."""
    job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    setup_logging("ctrl-exec-agent")
    store = AsyncStore(job["state_dir"])
    record = {"reqid": job["reqid"], "status": "running", "script": job["script"],
              "owner": job["owner"], "started": job["started"]}
    def note_group(pgid: int) -> None:
        record.update(pgid=pgid, pgid_start=_process_start(pgid))
        store.write(record)
        if os.path.exists(store.record_path(job["owner"], job["reqid"])[:-5] + ".cancelled"):
            # A cancel came before the group was on record: it cannot have killed it.
            kill_run_group(pgid, KILL_GRACE_S)

    try:
        result = run_script(job["path"], job["args"], job["context"], timeout_s=job["timeout"],
                            max_output=job["max_output"], stdin_timeout=job["stdin_timeout"],
                            on_start=note_group)
        record.pop("pgid", None)
        record.pop("pgid_start", None)
        record.update(status="done", finished=utc_timestamp(), exit=result.exit,
                      stdout=result.stdout, stderr=result.stderr)
        for flag in ("truncated", "timed_out"):
            if getattr(result, flag):
                record[flag] = True
        if store.take_cancel_mark(job["owner"], job["reqid"]):
            record["cancelled"] = True
        if result.error:
            record["error"] = result.error
        log_action("info", "run", SCRIPT=job["script"], EXIT=result.exit, PEER=job["peer"],
                   DISPATCHER=job["owner"], REQID=job["reqid"], MODE="async")
    finally:
        if record["status"] != "done":
            record.update(status="done", finished=utc_timestamp(), exit=-1, stdout="", stderr="",
                          error="detached runner failed")
        try:
            store.write(record)
        except OSError as exc:
            log_action("err", "async-store-fail", REQID=job["reqid"], ERROR=exc.strerror)
        os.close(job["lock_fd"])
    return 0


###############################################################################
# Rate limiting ###############################################################
###############################################################################

class RateLimiter:
    """Per-IP sliding-window limits: connection volume and TLS failures.

    ``limit`` events inside ``window`` seconds block the IP for ``block``
    seconds; a limit of 0 disables that check.  The table is capped at 1,000
    IPs so a spoofed-source flood cannot grow memory without bound.
    """

    def __init__(self, volume: tuple, probe: tuple, disabled: bool = False) -> None:
        self.volume = volume
        self.probe = probe
        self.disabled = disabled
        self.lock = threading.Lock()
        self.table: dict = {}

    def allow_connection(self, ip: str) -> bool:
        """False while ``ip`` is blocked.  Nothing is counted here (see ``count_untrusted``)."""
        if self.disabled:
            return True
        now = time.monotonic()
        with self.lock:
            entry = self.table.get(ip)
            return entry is None or entry["blocked_until"] <= now

    def count_untrusted(self, ip: str) -> bool:
        """Count a connection that did not authenticate as a trusted dispatcher.

        Counted after the handshake, not at accept: the volume limit is there
        for floods and strangers, and a burst of parallel runs from the
        control host (more in flight than ``limit``) must never lock it out.
        The pairing port, where every client is a stranger, counts at accept.
        Returns: True when this connection tripped the limit (``ip`` is now blocked).
        """
        if self.disabled:
            return False
        now = time.monotonic()
        with self.lock:
            return self._hit(ip, self._entry(ip, now), "conns", self.volume, now, "volume")

    def record_failure(self, ip: str) -> None:
        """Count a failed TLS handshake: a probe, and an untrusted connection."""
        if self.disabled:
            return
        now = time.monotonic()
        with self.lock:
            entry = self._entry(ip, now)
            if not self._hit(ip, entry, "fails", self.probe, now, "probe"):
                self._hit(ip, entry, "conns", self.volume, now, "volume")

    def clear(self) -> None:
        with self.lock:
            self.table.clear()

    def _entry(self, ip: str, now: float) -> dict:
        entry = self.table.get(ip)
        if entry is not None and entry["blocked_until"] and entry["blocked_until"] <= now:
            del self.table[ip]
            entry = None
        if entry is None:
            if len(self.table) >= RATE_TABLE_MAX:
                self._evict(now)
            entry = self.table[ip] = {"conns": collections.deque(), "fails": collections.deque(),
                                      "blocked_until": 0.0}
        return entry

    def _hit(self, ip: str, entry: dict, kind: str, rule: tuple, now: float, reason: str) -> bool:
        limit, window, block = rule
        if not limit:
            return False
        events = entry[kind]
        events.append(now)
        while events and events[0] <= now - window:
            events.popleft()
        if len(events) > limit or (kind == "fails" and len(events) >= limit):
            entry["blocked_until"] = now + block
            log_action("warning", "rate-block", PEER=ip, REASON=reason, SECONDS=block)
            return True
        return False

    def _evict(self, now: float) -> None:
        expired = [ip for ip, e in self.table.items() if e["blocked_until"] and e["blocked_until"] <= now]
        for ip in expired:
            del self.table[ip]
        if not expired and self.table:
            victim = min(self.table, key=lambda ip: self.table[ip]["blocked_until"])
            del self.table[victim]
        log_action("warning", "rate-evict", COUNT=RATE_TABLE_MAX)


###############################################################################
# Agent server ################################################################
###############################################################################

AgentState = collections.namedtuple("AgentState", "allowlist trusted revoked")


class AgentServer:
    """The mTLS request server.

    Methods for the caller: ``serve_forever()``, ``reload()``, ``stop()``.
    Per connection: ``admit_connection`` (IP allowlist, rate limit, ``max_children``)
    runs in the accept loop without touching TLS; ``_handle`` does the
    handshake and the request in the connection's own thread.
    """

    def __init__(self, cfg: AgentConfig, *, listen_socket: socket.socket | None = None) -> None:
        self.cfg = cfg
        self.state = self._load_state()
        #: The certificate being served: ``cert``, or a renewed one staged beside it.
        self.cert_path = _adopt_staged_cert(cfg)
        self.ctx = server_context(self.cert_path, cfg.key, cfg.ca)
        #: Serialises certificate swaps (/renew-complete) and trust-map edits (/rotate-serial).
        self.change_lock = threading.Lock()
        self.limiter = RateLimiter(cfg.rate_limit_volume, cfg.rate_limit_probe, cfg.rate_limit_disable)
        self.slots = threading.BoundedSemaphore(cfg.max_children)
        self.hostname = cfg.hostname or reported_hostname()
        self.expiry = cert_not_after(self.cert_path)
        if _expired(self.expiry):
            log_action("err", "cert-expired", FILE=self.cert_path, EXPIRY=self.expiry,
                       RESULT="dispatchers will refuse this agent; re-pair it (request-pairing)")
        self.async_store = AsyncStore(cfg.state_dir)
        self.running = RunningScripts()
        self.listener = listen_socket
        self.active = 0
        self.active_lock = threading.Lock()
        self.stopping = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    # -- lifecycle -----------------------------------------------------------

    def bind(self) -> None:
        family = socket.AF_INET6 if ":" in self.cfg.bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.cfg.bind, self.cfg.port))
        sock.listen(128)
        self.listener = sock

    def serve_forever(self) -> None:
        """Accept until ``stop()``; then wait (bounded) for live handlers."""
        if self.listener is None:
            self.bind()
        log_action("info", "start", PORT=self.cfg.port, BIND=self.cfg.bind, VERSION=VERSION,
                   SCRIPTS=len(self.state.allowlist), DISPATCHERS=len(self.state.trusted))
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self.stopping.is_set():
                for key, _ in sel.select(5.0):
                    if key.fd == self._wake_r:
                        os.read(self._wake_r, 512)
                        continue
                    try:
                        conn, addr = self.listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:
                        log_action("err", "accept-error", ERROR=exc.strerror)
                        time.sleep(0.05)  # e.g. EMFILE: do not spin
                        continue
                    self.admit_connection(conn, addr[0])
        finally:
            sel.close()
            self.listener.close()
        self._drain(10.0)
        log_action("info", "stop", PORT=self.cfg.port)

    def stop(self) -> None:
        """Stop accepting; safe to call from a signal handler."""
        self.stopping.set()
        self._wake()

    def reload(self) -> None:
        """Re-read the allowlist, trust map and revocation list (SIGHUP).

        A broken new allowlist is refused and the previous one stays in
        force, so a bad edit never silently empties a production agent.
        """
        try:
            self.state = self._load_state()
        except ConfigError as exc:
            log_action("err", "reload-fail", ERROR=str(exc), RESULT="kept previous allowlist")
            return
        self.limiter.clear()
        log_action("info", "reload", SCRIPTS=len(self.state.allowlist),
                   DISPATCHERS=len(self.state.trusted), REVOKED=len(self.state.revoked))

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _load_state(self) -> AgentState:
        allowlist = load_allowlist(self.cfg.allowlist, self.cfg.script_dirs)
        trusted = load_trusted_map(self.cfg.trusted_dispatchers_path)
        if not trusted:
            log_action("warning", "trust-map-empty", FILE=self.cfg.trusted_dispatchers_path)
        return AgentState(allowlist, trusted, load_revoked(self.cfg.revoked_serials))

    def _drain(self, limit_s: float) -> None:
        end = time.monotonic() + limit_s
        while time.monotonic() < end:
            with self.active_lock:
                if not self.active:
                    return
            time.sleep(0.05)

    # -- per connection ------------------------------------------------------

    def admit_connection(self, conn: socket.socket, ip: str) -> None:
        """Take one accepted connection: IP allowlist, rate limit, ``max_children``, then a
        handler thread.  Public so that one process can drive many listeners (bench/fleet.py)."""
        if self.cfg.allowed_ips and not _ip_allowed(ip, self.cfg.allowed_ips):
            log_action("warning", "ip-block", PEER=ip)
            conn.close()
            return
        if not self.limiter.allow_connection(ip):
            conn.close()
            return
        if not self.slots.acquire(blocking=False):
            log_action("warning", "overload", PEER=ip, MAX_CHILDREN=self.cfg.max_children)
            conn.close()
            return
        with self.active_lock:
            self.active += 1
        try:
            threading.Thread(target=self._run_handler, args=(conn, ip), daemon=True).start()
        except RuntimeError:
            self._release_slot()
            conn.close()

    def _release_slot(self) -> None:
        with self.active_lock:
            self.active -= 1
        self.slots.release()

    def _run_handler(self, conn: socket.socket, ip: str) -> None:
        try:
            self._handle(conn, ip)
        except Exception as exc:  # one bad connection never stops the server
            log_action("err", "handler-error", PEER=ip, ERROR="%s: %s" % (type(exc).__name__, exc))
        finally:
            try:
                conn.close()
            except OSError:
                pass
            self._release_slot()

    def _handle(self, conn: socket.socket, ip: str) -> None:
        deadline = time.monotonic() + self.cfg.request_timeout
        conn.settimeout(self.cfg.request_timeout)
        try:
            tls = self.ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.limiter.record_failure(ip)
            log_action("warning", "tls-failure", PEER=ip, REASON=_tls_reason(exc))
            return
        try:
            state = self.state
            serial = peer_serial(tls)
            if serial in state.revoked or serial not in state.trusted:
                self.limiter.count_untrusted(ip)
            if serial in state.revoked:
                log_action("warning", "revoked-cert", PEER=ip, SERIAL=serial)
                # Answered before the request is read: drain it, or closing
                # with unread data resets the connection and eats the 403.
                self._send(tls, 403, {"error": "certificate revoked"}, drain=True)
                return
            try:
                request = read_request(SocketReader(tls, deadline))
            except ProtocolError as exc:
                log_action("warning", "bad-request", PEER=ip, STATUS=exc.status, ERROR=exc.error)
                self._send(tls, exc.status, {"error": exc.error}, drain=True)
                return
            except (socket.timeout, ssl.SSLError, OSError) as exc:
                log_action("warning", "read-timeout" if isinstance(exc, socket.timeout) else "read-error",
                           PEER=ip)
                return
            dispatcher = state.trusted.get(serial)
            if dispatcher is None:
                log_action("warning", "serial-reject", PEER=ip, PEER_SERIAL=serial or "(none)",
                           PATH=request.path)
                body = {"error": "forbidden"} if request.path == "/capabilities" else \
                    {"error": "serial mismatch", "status": "forbidden"}
                self._send(tls, 403, body)
                return
            peer = _Peer(ip, serial, dispatcher)
            self._route(tls, request, state, peer)
        finally:
            try:
                tls.close()
            except OSError:
                pass

    def _route(self, tls: ssl.SSLSocket, request: Request, state: AgentState, peer) -> None:
        method, path = request.method, request.path
        if method == "POST" and path == "/run":
            self._handle_run(tls, request, state, peer)
        elif method == "POST" and path == "/ping":
            body = _json_object(request.body) or {}
            reqid = body.get("reqid") if isinstance(body.get("reqid"), str) else ""
            log_action("info", "ping", PEER=peer.ip, DISPATCHER=peer.dispatcher, REQID=reqid or "(none)")
            self._send(tls, 200, {"status": "ok", "host": self.hostname, "version": VERSION,
                                  "expiry": self.expiry, "staged": False, "reqid": reqid})
        elif method == "GET" and path == "/capabilities":
            self._handle_capabilities(tls, state, peer)
        elif method == "GET" and path.startswith("/result/"):
            self._handle_result(tls, path[len("/result/"):], peer)
        elif method == "POST" and path == "/cancel":
            self._handle_cancel(tls, request, peer)
        elif method == "POST" and path == "/renew":
            self._handle_renew(tls, request, peer)
        elif method == "POST" and path == "/renew-complete":
            self._handle_renew_complete(tls, request, peer)
        elif method == "POST" and path == "/rotate-serial":
            self._handle_rotate_serial(tls, request, peer)
        else:
            self._send(tls, 404, {"error": "not found"})

    def _handle_capabilities(self, tls, state: AgentState, peer) -> None:
        if self.cfg.auth_hook:
            verdict = self._hook("discovery", peer, script="", args=[], username="", token="", reqid="")
            if not verdict.allowed:
                log_action("warning", "capabilities-deny", PEER=peer.ip, DISPATCHER=peer.dispatcher,
                           REASON=verdict.error)
                self._send(tls, 403, {"error": "not authorised"})
                return
        scripts = [{"name": name, "path": path, "profile": "default",
                    "executable": os.path.isfile(path) and os.access(path, os.X_OK)}
                   for name, path in sorted(state.allowlist.items())]
        log_action("info", "capabilities", PEER=peer.ip, DISPATCHER=peer.dispatcher, SCRIPTS=len(scripts))
        self._send(tls, 200, {"status": "ok", "host": self.hostname, "version": VERSION,
                              "tags": dict(self.cfg.tags), "scripts": scripts})

    def _handle_result(self, tls, reqid: str, peer) -> None:
        record = self.async_store.read(peer.dispatcher, reqid) if RESULT_REQID_RE.match(reqid) else None
        if record is None:
            log_action("info", "result-miss", PEER=peer.ip, DISPATCHER=peer.dispatcher, REQID=reqid[:64])
            self._send(tls, 404, {"status": "unknown", "reqid": reqid[:64]})
            return
        log_action("info", "result", PEER=peer.ip, DISPATCHER=peer.dispatcher, REQID=reqid,
                   STATUS=record.get("status"))
        self._send(tls, 200, record)

    def _handle_cancel(self, tls, request: Request, peer) -> None:
        """POST /cancel {reqid, grace}: kill that run's process groups (this dispatcher's)."""
        body = _json_object(request.body)
        reqid = body.get("reqid") if isinstance(body, dict) else None
        grace = body.get("grace", int(KILL_GRACE_S)) if isinstance(body, dict) else None
        if not isinstance(reqid, str) or not RESULT_REQID_RE.match(reqid) \
                or type(grace) is not int or not 1 <= grace <= 60:
            self._send(tls, 400, {"error": "invalid cancel request; accepted: {\"reqid\": "
                                           "\"<1-64 letters, digits, _ or ->\", \"grace\": <1-60>}"})
            return
        if self.cfg.auth_hook:
            verdict = self._hook("cancel", peer, script="", args=[], username="", token="",
                                 reqid=reqid)
            if not verdict.allowed:
                log_action("warning", "cancel-deny", PEER=peer.ip, DISPATCHER=peer.dispatcher,
                           REQID=reqid, REASON=verdict.error)
                self._send(tls, 403, {"error": "not authorised: %s" % verdict.error})
                return
        groups = self.running.take(peer.dispatcher, reqid)
        record = self.async_store.read(peer.dispatcher, reqid)
        detached = record is not None and record.get("status") == "running"
        if detached:
            # Marked first: a runner that records its group after this read kills it itself.
            self.async_store.mark_cancelled(peer.dispatcher, reqid)
            record = self._recorded_group(peer.dispatcher, reqid, record)
            if record is not None and isinstance(record.get("pgid"), int) \
                    and record.get("pgid_start") \
                    and _process_start(record["pgid"]) == record["pgid_start"]:
                groups.append(record["pgid"])
        if not groups and detached:
            log_action("info", "cancel", PEER=peer.ip, DISPATCHER=peer.dispatcher, REQID=reqid,
                       RESULT="cancelled", SIGNAL="TERM")
            self._send(tls, 200, {"status": "cancelled", "reqid": reqid, "signal": "TERM"})
            return
        if not groups:
            log_action("info", "cancel", PEER=peer.ip, DISPATCHER=peer.dispatcher, REQID=reqid,
                       RESULT="not_running")
            self._send(tls, 200, {"status": "not_running", "reqid": reqid})
            return
        signals = [kill_run_group(pgid, grace) for pgid in groups]
        ended = "KILL" if "KILL" in signals else "TERM"
        log_action("info", "cancel", PEER=peer.ip, DISPATCHER=peer.dispatcher, REQID=reqid,
                   RESULT="cancelled", SIGNAL=ended)
        self._send(tls, 200, {"status": "cancelled", "reqid": reqid, "signal": ended})

    def _recorded_group(self, owner: str, reqid: str, record: dict) -> dict | None:
        """A running detached record with its script's group, waiting briefly for a runner
        that has not written it yet; None when the run ended meanwhile."""
        deadline = time.monotonic() + DETACHED_START_WAIT_S
        while record is not None and record.get("status") == "running" and "pgid" not in record \
                and time.monotonic() < deadline:
            time.sleep(0.05)
            record = self.async_store.read(owner, reqid)
        if record is None or record.get("status") != "running":
            return None
        return record

    # -- certificate lifecycle: /renew, /renew-complete, /rotate-serial -------

    def _handle_renew(self, tls, request: Request, peer) -> None:
        """POST /renew {reqid}: a CSR from the agent's existing key (the key never changes)."""
        reqid = _body_reqid(request)
        name = _cert_common_name(self.cert_path) or self.hostname
        try:
            csr = _openssl_csr(self.cfg.key, name)
        except PairingError as exc:
            log_action("err", "renew", PEER=peer.ip, DISPATCHER=peer.dispatcher, REQID=reqid or "(none)",
                       ERROR=str(exc))
            self._send(tls, 200, {"status": "error", "error": str(exc), "reqid": reqid})
            return
        log_action("info", "renew", STATUS="csr", PEER=peer.ip, DISPATCHER=peer.dispatcher,
                   REQID=reqid or "(none)", CN=name)
        self._send(tls, 200, {"status": "ok", "csr": csr.decode("ascii"), "reqid": reqid})

    def _handle_renew_complete(self, tls, request: Request, peer) -> None:
        """POST /renew-complete {cert, ca, reqid}: check the new certificate, then serve it.

        It must chain to this agent's ca.crt, be valid now and carry this agent's public
        key. The new TLS context is swapped in with one assignment: connections already
        open finish on the old certificate, new ones get the new one, nothing restarts.
        """
        body = _json_object(request.body) or {}
        reqid = _body_reqid(request)
        cert_pem = body.get("cert")
        if not isinstance(cert_pem, str) or "-----BEGIN CERTIFICATE-----" not in cert_pem \
                or len(cert_pem) > MAX_PAIRING_BODY_BYTES:
            self._send(tls, 200, {"status": "error", "reqid": reqid,
                                  "error": "cert must be one PEM certificate (at most %d bytes)"
                                           % MAX_PAIRING_BODY_BYTES})
            return
        try:
            with self.change_lock:
                staged = self._adopt_cert(cert_pem.encode("ascii", "replace"))
        except PairingError as exc:
            log_action("err", "renew-complete", PEER=peer.ip, DISPATCHER=peer.dispatcher,
                       REQID=reqid or "(none)", ERROR=str(exc))
            self._send(tls, 200, {"status": "error", "error": str(exc), "reqid": reqid})
            return
        log_action("info", "renew-complete", PEER=peer.ip, DISPATCHER=peer.dispatcher,
                   REQID=reqid or "(none)", EXPIRY=self.expiry, FILE=self.cert_path)
        self._send(tls, 200, {"status": "ok", "reqid": reqid, "staged": staged,
                              "adopted": True, "expiry": self.expiry})

    def _adopt_cert(self, cert_pem: bytes) -> bool:
        """Check and install a renewed certificate; True when it went to the staging path
        (``cert`` not writable). Raises PairingError saying what is wrong with it."""
        folder = self.cfg.state_dir if os.path.isdir(self.cfg.state_dir) else None
        with tempfile.TemporaryDirectory(prefix="ctrl-exec-renew-", dir=folder) as tmp:
            candidate = os.path.join(tmp, "agent.crt")
            atomic_write(candidate, cert_pem, 0o600)
            _check_renewed_cert(candidate, self.cfg)
            try:
                ctx = server_context(candidate, self.cfg.key, self.cfg.ca)
            except (OSError, ssl.SSLError) as exc:
                raise PairingError("the certificate cannot be served with the agent key: %s" % exc)
        staged = False
        try:
            atomic_write(self.cfg.cert, cert_pem, _file_mode(self.cfg.cert, 0o640))
            path = self.cfg.cert
        except OSError:
            try:
                atomic_write(self.cfg.cert_staging_path, cert_pem, 0o640)
            except OSError as exc:
                raise PairingError("cannot write the renewed certificate to %s or %s: %s"
                                   % (self.cfg.cert, self.cfg.cert_staging_path, exc.strerror))
            path, staged = self.cfg.cert_staging_path, True
        if not staged and os.path.exists(self.cfg.cert_staging_path):
            try:
                os.unlink(self.cfg.cert_staging_path)
            except OSError:
                pass
        self.ctx = ctx
        self.cert_path = path
        self.expiry = cert_not_after(path)
        return staged

    def _handle_rotate_serial(self, tls, request: Request, peer) -> None:
        """POST /rotate-serial {serial, action: add|remove, token}: edit the trusted map
        for the caller's own dispatcher id (taken from its serial, never from the body)."""
        body = _json_object(request.body) or {}
        serial = canonical_serial(body["serial"]) if isinstance(body.get("serial"), str) else ""
        action = body.get("action")
        if not serial:
            self._send(tls, 200, {"status": "error", "error": "serial required"})
            return
        if action not in ("add", "remove"):
            self._send(tls, 200, {"status": "error",
                                  "error": "invalid action '%s' (accepted: add, remove)" % (action,)})
            return
        if action == "remove" and serial == peer.serial:
            self._send(tls, 200, {"status": "error",
                                  "error": "refusing to remove the serial of the calling certificate "
                                           "(it would lock this dispatcher out); remove it with the "
                                           "new certificate"})
            return
        if self.cfg.auth_hook:
            token = body.get("token") if isinstance(body.get("token"), str) else ""
            verdict = self._hook("rotate", peer, script="", args=[action, serial], username="",
                                 token=token, reqid="")
            if not verdict.allowed:
                log_action("warning", "rotate-deny", PEER=peer.ip, DISPATCHER=peer.dispatcher,
                           REASON=verdict.error)
                self._send(tls, 403, {"error": "not authorised: %s" % verdict.error})
                return
        with self.change_lock:
            trusted = load_trusted_map(self.cfg.trusted_dispatchers_path)
            owner = trusted.get(serial)
            if action == "remove" and owner is not None and owner != peer.dispatcher:
                self._send(tls, 200, {"status": "error", "error": "serial not owned by '%s'"
                                                                  % peer.dispatcher})
                return
            if action == "add":
                trusted[serial] = peer.dispatcher
            else:
                trusted.pop(serial, None)
            try:
                write_trusted_map(self.cfg.trusted_dispatchers_path, trusted)
            except OSError as exc:
                log_action("err", "rotate-serial", ERROR=exc.strerror, FILE=self.cfg.trusted_dispatchers_path)
                self._send(tls, 200, {"status": "error", "error": "cannot write the trusted map: %s"
                                                                  % exc.strerror})
                return
        log_action("info", "rotate-serial", ACTION_NAME=action, SERIAL=serial, PEER=peer.ip,
                   DISPATCHER=peer.dispatcher)
        self.reload()
        self._send(tls, 200, {"status": "ok", "action": action, "serial": serial,
                              "dispatcher": peer.dispatcher})

    def _handle_run(self, tls, request: Request, state: AgentState, peer) -> None:
        body = _json_object(request.body)
        if body is None:
            self._send(tls, 200, {"exit": -1, "error": "invalid JSON"})
            return
        reqid = body.get("reqid") if isinstance(body.get("reqid"), str) else ""
        script = body.get("script") if isinstance(body.get("script"), str) else ""
        args = body.get("args")
        args = [] if args is None else args
        refuse = {"script": script, "exit": -1, "reqid": reqid}
        if not isinstance(args, list):
            self._send(tls, 200, dict(refuse, error="args must be an array"))
            return
        if not all(isinstance(arg, str) for arg in args):
            self._send(tls, 200, dict(refuse, error="args must be an array of strings"))
            return
        if any("\x00" in arg for arg in args):
            self._send(tls, 200, dict(refuse, error="args must not contain NUL characters "
                                                    "(execve cannot pass them)"))
            return
        path = state.allowlist.get(script) if SCRIPT_NAME_RE.match(script) else None
        if path is None or (self.cfg.script_dirs and not _inside_dirs(path, self.cfg.script_dirs)):
            log_action("warning", "deny", SCRIPT=script[:128], PEER=peer.ip, DISPATCHER=peer.dispatcher,
                       REQID=reqid or "(none)")
            self._send(tls, 200, dict(refuse, error="script not permitted"))
            return
        timeout = body.get("timeout")
        if timeout is not None and (type(timeout) is not int or timeout <= 0):
            self._send(tls, 200, dict(refuse, error="timeout must be a positive integer (seconds)"))
            return
        limit = self.cfg.run_timeout
        timeout_s = min(timeout, limit) if timeout and limit else (timeout or limit)
        username = body.get("username") if isinstance(body.get("username"), str) else ""
        token = body.get("token") if isinstance(body.get("token"), str) else ""
        if self.cfg.auth_hook:
            verdict = self._hook("run", peer, script=script, args=args, username=username,
                                 token=token, reqid=reqid)
            if not verdict.allowed:
                log_action("warning", "deny", SCRIPT=script, PEER=peer.ip, DISPATCHER=peer.dispatcher,
                           REQID=reqid or "(none)", REASON=verdict.error)
                self._send(tls, 200, dict(refuse, error="not authorised: %s" % verdict.error))
                return
        context = {"script": script, "args": args, "reqid": reqid, "peer_ip": peer.ip,
                   "username": username, "token": token, "dispatcher": peer.dispatcher,
                   "timestamp": utc_timestamp()}
        if body.get("async") is True:
            self._start_async(tls, script, path, args, context, timeout_s, peer)
        elif body.get("stream") is True and self.cfg.streaming:
            self._run_streamed(tls, script, path, args, context, timeout_s, peer)
        else:
            try:
                result = run_script(path, args, context, timeout_s=timeout_s,
                                    max_output=self.cfg.max_output,
                                    stdin_timeout=self.cfg.stdin_timeout,
                                    on_start=self._tracker(peer, reqid))
            finally:
                cancelled = self.running.finished(peer.dispatcher, reqid)
            self._log_run(script, result, peer, reqid)
            answer = {"script": script, "exit": result.exit, "stdout": result.stdout,
                      "stderr": result.stderr, "reqid": reqid}
            if cancelled:
                answer["cancelled"] = True
            self._send(tls, 200, _with_flags(answer, result))

    def _start_async(self, tls, script, path, args, context, timeout_s, peer) -> None:
        reqid = context["reqid"]
        if not RESULT_REQID_RE.match(reqid):
            self._send(tls, 200, {"script": script, "exit": -1, "reqid": reqid,
                                  "error": "async run requires a valid reqid"})
            return
        self.async_store.purge()
        lock_fd = self.async_store.try_lock(script)
        if lock_fd is None:
            log_action("info", "run-async-busy", SCRIPT=script, PEER=peer.ip, REQID=reqid)
            self._send(tls, 409, {"script": script, "status": "busy", "reqid": reqid,
                                  "error": "script already running"})
            return
        try:
            started = utc_timestamp()
            self.async_store.write({"reqid": reqid, "status": "running", "script": script,
                                    "owner": peer.dispatcher, "started": started})
            start_detached({"reqid": reqid, "script": script, "path": path, "args": args,
                            "context": context, "owner": peer.dispatcher, "started": started,
                            "peer": peer.ip, "timeout": timeout_s, "max_output": self.cfg.max_output,
                            "stdin_timeout": self.cfg.stdin_timeout, "state_dir": self.cfg.state_dir},
                           lock_fd)
        except OSError as exc:
            log_action("err", "async-start-fail", SCRIPT=script, REQID=reqid, ERROR=exc.strerror)
            self._send(tls, 200, {"script": script, "exit": -1, "reqid": reqid,
                                  "error": "could not start async job"})
            return
        finally:
            os.close(lock_fd)
        log_action("info", "run-async", SCRIPT=script, PEER=peer.ip, DISPATCHER=peer.dispatcher,
                   REQID=reqid, STATUS="accepted")
        self._send(tls, 202, {"script": script, "status": "accepted", "reqid": reqid})

    def _run_streamed(self, tls, script, path, args, context, timeout_s, peer) -> None:
        sink = _EventSink(tls)
        sink.write_raw(encode_response(200, None, content_type="application/x-ndjson"))
        reqid = context["reqid"]
        try:
            result = run_script(path, args, context, timeout_s=timeout_s,
                                max_output=self.cfg.max_output,
                                stdin_timeout=self.cfg.stdin_timeout,
                                on_output=lambda name, text: sink.event({"event": name, "data": text}),
                                on_start=self._tracker(peer, reqid))
        finally:
            cancelled = self.running.finished(peer.dispatcher, reqid)
        self._log_run(script, result, peer, reqid)
        event = {"event": "exit", "exit": result.exit, "script": script, "reqid": reqid}
        if cancelled:
            event["cancelled"] = True
        sink.event(_with_flags(event, result))

    def _tracker(self, peer, reqid: str):
        """on_start for run_script: note the script's group for a later cancel (by reqid)."""
        if not reqid:
            return None
        return lambda pgid: self.running.started(peer.dispatcher, reqid, pgid)

    def _hook(self, action: str, peer, **fields) -> HookResult:
        context = dict(fields, hosts=[], source_ip=peer.ip, dispatcher=peer.dispatcher,
                       dispatcher_serial=peer.serial, submitter=None)
        return run_auth_hook(self.cfg.auth_hook, timeout_s=self.cfg.auth_hook_timeout,
                             action=action, context=context)

    def _log_run(self, script: str, result: RunResult, peer, reqid: str) -> None:
        fields = {"SCRIPT": script, "EXIT": result.exit, "PEER": peer.ip,
                  "DISPATCHER": peer.dispatcher, "REQID": reqid or "(none)"}
        if result.timed_out:
            fields["TIMED_OUT"] = 1
        if result.truncated:
            fields["TRUNCATED"] = 1
        log_action("info", "run", **fields)

    def _send(self, tls: ssl.SSLSocket, status: int, body: dict, drain: bool = False) -> None:
        try:
            tls.settimeout(WRITE_TIMEOUT_S)
            tls.sendall(encode_response(status, body))
            if drain:
                _discard_input(tls)
        except (OSError, ssl.SSLError):
            pass  # the peer went away; nothing more to tell it


_Peer = collections.namedtuple("_Peer", "ip serial dispatcher")


class _EventSink:
    """Writes NDJSON events to a streaming client; stops quietly if it leaves.

    A dispatcher that disconnects must not kill the script: the run goes on
    and is logged, only the remaining events are dropped.
    """

    def __init__(self, tls: ssl.SSLSocket) -> None:
        self.tls = tls
        self.open = True
        tls.settimeout(WRITE_TIMEOUT_S)

    def write_raw(self, data: bytes) -> None:
        if not self.open:
            return
        try:
            self.tls.sendall(data)
        except (OSError, ssl.SSLError):
            self.open = False

    def event(self, event: dict) -> None:
        self.write_raw(json_bytes(event) + b"\n")


def _with_flags(answer: dict, result: RunResult) -> dict:
    if result.truncated:
        answer["truncated"] = True
    if result.timed_out:
        answer["timed_out"] = True
    if result.error:
        answer["error"] = result.error
    return answer


def _json_object(raw: bytes) -> dict | None:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _ip_allowed(ip: str, networks: list) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if getattr(address, "ipv4_mapped", None):
        address = address.ipv4_mapped
    return any(address.version == net.version and address in net for net in networks)


def _tls_reason(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or type(exc).__name__


def _discard_input(tls: ssl.SSLSocket, limit_s: float = 1.0) -> None:
    """Read and drop what the client still sends, so closing does not RST our answer."""
    end = time.monotonic() + limit_s
    try:
        while time.monotonic() < end:
            tls.settimeout(max(0.01, end - time.monotonic()))
            if not tls.recv(65536):
                return
    except (OSError, ssl.SSLError):
        return


def cert_not_after(path: str) -> str:
    """Return the certificate's openssl ``notAfter`` text, or ``unknown``."""
    try:
        return ssl._ssl._test_decode_cert(path)["notAfter"]
    except (AttributeError, KeyError, OSError, ssl.SSLError, ValueError):
        return "unknown"


def _body_reqid(request: Request) -> str:
    """The reqid of a JSON request body when it is a valid one, else ""."""
    body = _json_object(request.body) or {}
    reqid = body.get("reqid")
    return reqid if isinstance(reqid, str) and RESULT_REQID_RE.match(reqid) else ""


def _file_mode(path: str, default: int) -> int:
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        return default


def _cert_fields(path: str) -> dict:
    try:
        return ssl._ssl._test_decode_cert(path)
    except (AttributeError, OSError, ssl.SSLError, ValueError):
        return {}


def _cert_common_name(path: str) -> str:
    """The subject CN of a PEM certificate file, or ""."""
    for rdn in _cert_fields(path).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return ""


def _expired(not_after: str) -> bool:
    """True when an openssl notAfter text lies in the past (unknown: False)."""
    try:
        return ssl.cert_time_to_seconds(not_after) < time.time()
    except (ValueError, TypeError):
        return False


def _check_renewed_cert(path: str, cfg: AgentConfig) -> None:
    """A renewed certificate must chain to our CA, be valid now and carry our key."""
    try:
        verdict = subprocess.run(["openssl", "verify", "-CAfile", cfg.ca, path],
                                 capture_output=True, timeout=30)
        cert_key = subprocess.run(["openssl", "x509", "-noout", "-pubkey", "-in", path],
                                  capture_output=True, timeout=30)
        our_key = subprocess.run(["openssl", "pkey", "-pubout", "-in", cfg.key],
                                 capture_output=True, timeout=30)
    except FileNotFoundError:
        raise PairingError("the openssl binary is required to check a renewed certificate")
    except subprocess.TimeoutExpired:
        raise PairingError("openssl timed out checking the renewed certificate")
    if verdict.returncode != 0:
        detail = (verdict.stdout + verdict.stderr).decode("utf-8", "replace").strip().splitlines()
        raise PairingError("certificate does not verify against %s: %s"
                           % (cfg.ca, detail[-1] if detail else "openssl verify failed"))
    if our_key.returncode != 0:
        raise PairingError("agent key not available")
    if cert_key.returncode != 0 or cert_key.stdout.strip() != our_key.stdout.strip():
        raise PairingError("certificate public key does not match the agent key")


def _adopt_staged_cert(cfg: AgentConfig) -> str:
    """At start: a staged renewed certificate that is valid for our key and expires later
    than ``cert`` replaces it (or is served from the staging path when ``cert`` is not
    writable); an invalid staged file is removed and logged. Returns the path to serve."""
    staged = cfg.cert_staging_path
    if not staged or not os.path.isfile(staged):
        return cfg.cert
    try:
        _check_renewed_cert(staged, cfg)
    except PairingError as exc:
        log_action("warning", "promote-cert", FILE=staged, RESULT="removed", ERROR=str(exc))
        try:
            os.unlink(staged)
        except OSError:
            pass
        return cfg.cert
    try:
        newer = (ssl.cert_time_to_seconds(cert_not_after(staged))
                 > ssl.cert_time_to_seconds(cert_not_after(cfg.cert)))
    except ValueError:
        newer = True
    if not newer:
        return cfg.cert
    try:
        with open(staged, "rb") as handle:
            atomic_write(cfg.cert, handle.read(), _file_mode(cfg.cert, 0o640))
        os.unlink(staged)
    except OSError:
        log_action("info", "promote-cert", FILE=staged, RESULT="served from the staging path "
                   "(cert is not writable by the agent)")
        return staged
    log_action("info", "promote-cert", FILE=cfg.cert, RESULT="installed the staged certificate")
    return cfg.cert


###############################################################################
# Pairing (agent side) ########################################################
###############################################################################

PAIRING_SOCKET_TIMEOUT_S = 660


class PairingError(Exception):
    """Pairing failed; ``exit_code`` is 1 (error), 2 (timed out) or 3 (denied)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def reported_hostname() -> str:
    """This host's name as the original agent reports it: the FQDN, else the short
    hostname - never "localhost" (what getfqdn() says on hosts without a domain)."""
    fqdn = socket.getfqdn()
    if fqdn and fqdn != "localhost" and not fqdn.startswith("localhost."):
        return fqdn
    return socket.gethostname() or fqdn


def request_pairing(cfg: AgentConfig, *, dispatcher: str, port: int = PAIRING_PORT,
                    name: str = "", lookup_by: str = "", timeout_s: int = PAIRING_SOCKET_TIMEOUT_S,
                    out=sys.stdout, key_type: str = "") -> dict:
    """Ask a dispatcher's pairing port for a certificate and install it.

    Generates a key and CSR with the ``openssl`` binary (key_type, default agent.conf's:
    "auto" makes a P-256 key and, when the dispatcher refuses it as too small - the
    original ctrl-exec signs only RSA keys of 2048 bits or more - asks again with an
    RSA-3072 key and a new code), shows the 6-digit code the operator compares, waits
    for approval, checks the echoed nonce, then writes ``cert``/``key``/``ca`` and adds
    the dispatcher to the trusted map.

    Returns:
        ``{"dispatcher_id", "dispatcher_serial", "cert"}`` paths/ids on success.

    Raises:
        PairingError: with exit code 1, 2 (timeout) or 3 (denied).
    """
    name = name or reported_hostname()
    key_type = key_type or cfg.key_type
    if key_type not in KEY_TYPES:
        raise PairingError("key type %r is not valid; accepted: %s" % (key_type, ", ".join(KEY_TYPES)))
    if not AGENT_NAME_RE.match(name) or len(name) > 253:
        raise PairingError("agent name %r is not valid (letters, digits, '.', '_', '-'; "
                           "pass --name NAME)" % name)
    for folder in {os.path.dirname(cfg.cert), os.path.dirname(cfg.key), os.path.dirname(cfg.ca)}:
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise PairingError("%s must exist and be writable (re-run as root or with sudo)" % folder)
    try:
        socket.create_connection((dispatcher, port), timeout=5).close()
    except OSError as exc:
        raise PairingError("cannot reach the pairing port %s:%d (%s) - is 'ctrlexec.py pairing-mode' "
                           "running there?" % (dispatcher, port, exc.strerror or exc))
    first_type = "rsa-3072" if key_type == "rsa-3072" else "ec-p256"
    try:
        final, key_pem = _pair_once(cfg, dispatcher, port, name, lookup_by, timeout_s, out,
                                    first_type)
    except _KeyRefused as exc:
        if key_type != "auto":
            raise PairingError("pairing refused: %s (try --key-type rsa-3072)" % exc) from None
        out.write("The dispatcher wants an RSA key (%s); asking again with RSA-3072.\n" % exc)
        out.flush()
        final, key_pem = _pair_once(cfg, dispatcher, port, name, lookup_by, timeout_s, out,
                                    "rsa-3072")
    return _install_pairing(cfg, dispatcher, final, key_pem)


class _KeyRefused(Exception):
    """The dispatcher refused the CSR's key (type or size); str() is its reason."""


def _pair_once(cfg: AgentConfig, dispatcher: str, port: int, name: str, lookup_by: str,
               timeout_s: int, out, key_type: str) -> tuple:
    """One pairing exchange with a fresh key: (the final answer, the key PEM)."""
    key_pem, csr_pem = _openssl_key_and_csr(name, key_type)
    nonce = os.urandom(16).hex()
    code = pairing_code(csr_pem)
    out.write("Pairing code: %s\nCompare it with the code shown on the dispatcher, then approve there.\n"
              % code)
    out.flush()
    raw = socket.create_connection((dispatcher, port), timeout=timeout_s)
    try:
        tls = insecure_client_context().wrap_socket(raw)
        request = {"hostname": name, "csr": csr_pem.decode("ascii"), "nonce": nonce,
                   "port": cfg.port, "ip": tls.getsockname()[0]}
        if lookup_by:
            request["lookup_by"] = lookup_by
        tls.sendall(encode_request("POST", "/pair", request, host=dispatcher))
        reader = SocketReader(tls, time.monotonic() + timeout_s)
        first = _pairing_answer(reader)
        if first.get("status") != "pending":
            reason = str(first.get("reason", first.get("status", "unknown")))
            if key_type == "ec-p256" and ("too small" in reason or "2048" in reason
                                          or "RSA" in reason):
                raise _KeyRefused(reason)
            raise PairingError("pairing refused: %s" % reason)
        out.write("Request %s is waiting for approval...\n" % first.get("reqid", "?"))
        out.flush()
        final = _pairing_answer(reader)
    except socket.timeout:
        raise PairingError("no answer from the dispatcher within %ds" % timeout_s, 2)
    except (OSError, ssl.SSLError, ProtocolError) as exc:
        raise PairingError("pairing connection failed: %s" % exc)
    finally:
        raw.close()
    return dict(final, nonce_ok=final.get("nonce") == nonce), key_pem


def _install_pairing(cfg: AgentConfig, dispatcher: str, final: dict, key_pem: bytes) -> dict:
    """Check the final pairing answer and install key, cert, CA and the trust entry."""
    if final.get("status") != "approved":
        reason = final.get("reason", "unknown")
        log_action("warning", "pair-denied", DISPATCHER_HOST=dispatcher, REASON=reason)
        raise PairingError("pairing denied: %s" % reason, 2 if "timeout" in reason else 3)
    if not final.get("nonce_ok"):
        raise PairingError("nonce mismatch in pairing result - not installing anything")
    dispatcher_serial = canonical_serial(str(final.get("dispatcher_serial", "")))
    dispatcher_id = str(final.get("dispatcher_id") or dispatcher_serial)
    if not dispatcher_serial or not DISPATCHER_ID_RE.match(dispatcher_id):
        raise PairingError("pairing result has no usable dispatcher serial/id - not installing anything")
    atomic_write(cfg.key, key_pem, 0o600)
    atomic_write(cfg.cert, str(final.get("cert", "")).encode("ascii"), 0o640)
    atomic_write(cfg.ca, str(final.get("ca", "")).encode("ascii"), 0o644)
    add_trusted_dispatcher(cfg.trusted_dispatchers_path, dispatcher_serial, dispatcher_id)
    log_action("info", "pair-complete", STATUS="approved", DISPATCHER=dispatcher_id,
               DISPATCHER_HOST=dispatcher)
    return {"dispatcher_id": dispatcher_id, "dispatcher_serial": dispatcher_serial, "cert": cfg.cert}


def add_trusted_dispatcher(path: str, serial: str, dispatcher_id: str) -> None:
    """Add or replace ``<serial> <dispatcher_id>`` in the trusted map (atomic, 0644)."""
    trusted = load_trusted_map(path)
    trusted[canonical_serial(serial)] = dispatcher_id
    write_trusted_map(path, trusted)


def write_trusted_map(path: str, trusted: dict) -> None:
    """Write the trusted map ``{serial: dispatcher_id}`` (atomic, 0644)."""
    lines = ["# ctrl-exec trusted dispatchers: <serial> <dispatcher_id>",
             "# written by ctrlexec_agent.py; reload the agent (SIGHUP) after editing"]
    lines += ["%s %s" % (s, trusted[s]) for s in sorted(trusted)]
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o750, exist_ok=True)
    atomic_write(path, ("\n".join(lines) + "\n").encode("utf-8"), 0o644)


def _pairing_answer(reader: SocketReader) -> dict:
    status, _headers, body = read_response(reader, max_body=MAX_PAIRING_BODY_BYTES)
    try:
        answer = json.loads(body.decode("utf-8"))
    except ValueError:
        raise PairingError("the pairing port answered HTTP %d with invalid JSON" % status)
    if not isinstance(answer, dict):
        raise PairingError("the pairing port answered with a non-object JSON body")
    return answer


def _openssl_csr(key_path: str, name: str) -> bytes:
    """A CSR for ``CN=name`` from an existing key (renewal keeps the agent's key)."""
    if not os.access(key_path, os.R_OK):
        raise PairingError("agent key not available")
    try:
        return subprocess.run(["openssl", "req", "-new", "-sha256", "-key", key_path,
                               "-subj", "/CN=%s" % name],
                              check=True, capture_output=True, timeout=30).stdout
    except FileNotFoundError:
        raise PairingError("could not generate CSR (the openssl binary is required)")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        raise PairingError("could not generate CSR")


def _openssl_key_and_csr(name: str, key_type: str = "ec-p256") -> tuple:
    """Make a key ("ec-p256" or "rsa-3072") and a CSR for ``CN=name`` with the openssl binary."""
    algorithm = (["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072"]
                 if key_type == "rsa-3072" else
                 ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"])
    with tempfile.TemporaryDirectory(prefix="ctrl-exec-pair-") as tmp:
        key_path = os.path.join(tmp, "agent.key")
        try:
            subprocess.run(["openssl", "genpkey"] + algorithm + ["-out", key_path],
                           check=True, capture_output=True, timeout=60)
            csr = subprocess.run(["openssl", "req", "-new", "-sha256", "-key", key_path,
                                  "-subj", "/CN=%s" % name],
                                 check=True, capture_output=True, timeout=30).stdout
        except FileNotFoundError:
            raise PairingError("the openssl binary is required for pairing (install openssl)")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            raise PairingError("openssl failed to create the key/CSR: %s"
                               % (getattr(exc, "stderr", b"") or b"").decode("utf-8", "replace").strip())
        with open(key_path, "rb") as handle:
            return handle.read(), csr


###############################################################################
# Command line ################################################################
###############################################################################

def main(argv: list | None = None) -> int:
    """``ctrlexec_agent.py serve|self-check|pairing-status|request-pairing``."""
    parser = argparse.ArgumentParser(prog="ctrlexec_agent.py",
                                     description="ctrl-exec agent: runs allowlisted scripts over mTLS")
    parser.add_argument("--version", action="version", version="ctrl-exec-agent %s" % VERSION)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="agent.conf (default %(default)s)")
    parser.add_argument("--allowlist", help="scripts.conf (default: 'allowlist' key, else beside agent.conf)")
    sub = parser.add_subparsers(dest="command")
    for name in ("serve", "self-check", "pairing-status", "request-pairing"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--config", dest="sub_config", default=None)
        cmd.add_argument("--allowlist", dest="sub_allowlist", default=None)
        if name == "request-pairing":
            cmd.add_argument("--dispatcher", required=True, help="control host name or IP")
            cmd.add_argument("--port", type=int, default=PAIRING_PORT)
            cmd.add_argument("--name", default="", help="agent name (default: this host's FQDN)")
            cmd.add_argument("--lookup-by", choices=("ip", "hostname"), default="")
            cmd.add_argument("--timeout", type=int, default=PAIRING_SOCKET_TIMEOUT_S)
            cmd.add_argument("--key-type", choices=KEY_TYPES, default="",
                             help="pairing key: auto (P-256, RSA-3072 when the dispatcher "
                                  "asks for RSA; default: agent.conf key_type, else auto)")
    sub.add_parser("run-detached")
    opts = parser.parse_args(argv)
    if opts.command == "run-detached":
        return run_detached_main()
    if not opts.command:
        parser.print_help()
        return 0
    setup_logging("ctrl-exec-agent")
    config_path = getattr(opts, "sub_config", None) or opts.config
    allowlist = getattr(opts, "sub_allowlist", None) or opts.allowlist
    if opts.command == "request-pairing":
        return _cmd_request_pairing(opts, config_path)
    try:
        cfg = load_agent_config(config_path, require_files=opts.command == "serve")
        if allowlist:
            cfg.allowlist = os.path.abspath(allowlist)
        if opts.command == "serve":
            return _cmd_serve(cfg)
        if opts.command == "self-check":
            return _cmd_self_check(cfg)
        return _cmd_pairing_status(cfg)
    except ConfigError as exc:
        sys.stderr.write("ctrl-exec-agent: config error: %s\n" % exc)
        return EX_CONFIG


def _cmd_serve(cfg: AgentConfig) -> int:
    try:
        server = AgentServer(cfg)
        server.bind()
    except ssl.SSLError as exc:
        raise ConfigError("%s: cannot load cert/key/ca (%s, %s, %s): %s"
                          % (cfg.path, cfg.cert, cfg.key, cfg.ca, exc))
    except OSError as exc:
        sys.stderr.write("ctrl-exec-agent: cannot listen on %s:%d: %s\n"
                         % (cfg.bind, cfg.port, exc.strerror or exc))
        return 1
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=server.reload, daemon=True).start())
    server.serve_forever()
    return 0


def _cmd_self_check(cfg: AgentConfig) -> int:
    allowlist = load_allowlist(cfg.allowlist, cfg.script_dirs)
    trusted = load_trusted_map(cfg.trusted_dispatchers_path)
    print("config      %s: ok" % cfg.path)
    print("allowlist   %s: %d script(s)" % (cfg.allowlist, len(allowlist)))
    for name, path in sorted(allowlist.items()):
        state = "ok" if os.path.isfile(path) and os.access(path, os.X_OK) else "NOT EXECUTABLE"
        print("  %-24s %s  %s" % (name, path, state))
    print("trusted     %s: %d dispatcher(s)" % (cfg.trusted_dispatchers_path, len(trusted)))
    paired = all(os.path.isfile(p) for p in (cfg.cert, cfg.key, cfg.ca))
    print("certificate %s" % ("expires %s" % cert_not_after(cfg.cert) if paired else "not paired yet"))
    return 0


def _cmd_pairing_status(cfg: AgentConfig) -> int:
    missing = [p for p in (cfg.cert, cfg.key, cfg.ca) if not os.path.isfile(p)]
    if missing:
        print("Not paired. Reason: missing %s" % ", ".join(missing))
        return 1
    expiry = cert_not_after(cfg.cert)
    if expiry == "unknown":
        print("Not paired. Reason: %s is not a readable certificate" % cfg.cert)
        return 1
    print("Paired. Certificate expires: %s" % expiry)
    return 0


def _cmd_request_pairing(opts, config_path: str) -> int:
    try:
        if os.path.exists(config_path):
            cfg = load_agent_config(config_path, require_files=False)
        else:
            cfg = AgentConfig(config_path)
            cfg.trusted_dispatchers_path = os.path.join(cfg.state_dir, "ctrl-exec-dispatchers")
        result = request_pairing(cfg, dispatcher=opts.dispatcher, port=opts.port, name=opts.name,
                                 lookup_by=opts.lookup_by, timeout_s=opts.timeout,
                                 key_type=opts.key_type)
    except ConfigError as exc:
        sys.stderr.write("ctrl-exec-agent: config error: %s\n" % exc)
        return EX_CONFIG
    except PairingError as exc:
        sys.stderr.write("ctrl-exec-agent: %s\n" % exc)
        return exc.exit_code
    print("Paired with dispatcher %s (serial %s). Certificate: %s"
          % (result["dispatcher_id"], result["dispatcher_serial"], result["cert"]))
    print("Start the agent: ctrlexec_agent.py serve --config %s  (or reload a running one: kill -HUP)"
          % cfg.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
