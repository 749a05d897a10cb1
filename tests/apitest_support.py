"""Test support for the HTTP API tests: the in-process WSGI client, the spec checker
and the real API process.

`call()` drives make_app() through wsgiref.validate (STYLE §20) and checks every
response against the schema that openapi.json documents for that path + status.
`ApiServer` is `python ctrlexec_api.py --config PATH` as a child process, the one
handle every over-the-wire test uses (the API tests, the stream tests and the
reliability suite); `http_call()` is its bounded plain-HTTP client.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import socket
import subprocess
import sys
import wsgiref.util
import wsgiref.validate

import jsonschema

from fleet import free_port, read_log, stop_process, wait_logged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC_PATH = os.path.join(ROOT, "openapi.json")
API = os.path.join(ROOT, "ctrlexec_api.py")
#: API start-up (bind + ACTION=api-start), a graceful stop, and one test request.
API_WAIT_S = 30.0

with open(SPEC_PATH) as _fh:
    SPEC = json.load(_fh)

#: Responses every path may give (api gate, unknown path or method, body limit, overload,
#: server error).
GENERIC = {403: "AuthError", 404: "Error", 405: "Error", 413: "Error", 500: "Error",
           503: "Error"}


class Response:
    """status (int), headers (dict, lower-case names), data (bytes), json (parsed or None)."""

    def __init__(self, status: int, headers: dict, data: bytes) -> None:
        self.status = status
        self.headers = headers
        self.data = data
        ctype = headers.get("content-type", "")
        self.json = None
        if ctype.startswith("application/json") and data:
            self.json = json.loads(data)
        elif ctype.startswith("application/x-ndjson"):
            self.json = [json.loads(line) for line in data.splitlines() if line.strip()]

    def __repr__(self) -> str:
        return "<Response %d %r>" % (self.status, self.data[:300])


def call(app, method: str, path: str, body=None, *, raw: bytes | None = None,
         headers: dict | None = None, remote: str = "127.0.0.1", check: bool = True) -> Response:
    """One in-process request through wsgiref.validate; body dict -> JSON."""
    if raw is None:
        raw = b"" if body is None else json.dumps(body).encode()
    path_info, _, query = path.partition("?")
    environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path_info,
        "SCRIPT_NAME": "",
        "QUERY_STRING": query,
        "REMOTE_ADDR": remote,
        "wsgi.input": io.BytesIO(raw),
        "wsgi.errors": io.StringIO(),
    }
    if raw:
        environ["CONTENT_LENGTH"] = str(len(raw))
        environ["CONTENT_TYPE"] = "application/json"
    for name, value in (headers or {}).items():
        key = name.upper().replace("-", "_")
        if key in ("CONTENT_LENGTH", "CONTENT_TYPE"):
            environ[key] = value
        else:
            environ["HTTP_" + key] = value
    wsgiref.util.setup_testing_defaults(environ)
    seen = {}

    def start_response(status, response_headers, exc_info=None):
        seen["status"] = int(status.split(" ", 1)[0])
        seen["headers"] = {k.lower(): v for k, v in response_headers}
        return lambda data: None

    result = wsgiref.validate.validator(app)(environ, start_response)
    try:
        data = b"".join(result)
    finally:
        result.close()
    resp = Response(seen["status"], seen["headers"], data)
    if check:
        check_response(method, path_info, resp)
    return resp


def template_of(path: str) -> str | None:
    """The openapi path template for a concrete path, or None for unknown routes."""
    if path in SPEC["paths"]:
        return path
    if re.fullmatch(r"/status/[^/]+", path):
        return "/status/{reqid}"
    match = re.fullmatch(r"/runs/[^/]+/(events|cancel)", path)
    if match:
        return "/runs/{reqid}/%s" % match.group(1)
    return None


def schema_for(method: str, path: str, status: int, content_type: str) -> dict:
    """The documented schema of a response, with the spec's components attached."""
    template = template_of(path)
    op = (SPEC["paths"].get(template) or {}).get(method.lower()) if template else None
    response = None
    if op is not None:
        response = op["responses"].get(str(status))
    if response is None:
        assert status in GENERIC, "undocumented status %d for %s %s" % (status, method, path)
        return {"$ref": "#/components/schemas/%s" % GENERIC[status],
                "components": SPEC["components"]}
    if "$ref" in response:
        response = SPEC["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    media = content_type.split(";", 1)[0].strip()
    assert media in response["content"], \
        "%s not documented for %s %s %d" % (media, method, path, status)
    return dict(response["content"][media]["schema"], components=SPEC["components"])


def check_response(method: str, path: str, resp: Response) -> None:
    """Assert resp matches openapi.json (JSON / NDJSON bodies; other media only by type)."""
    ctype = resp.headers.get("content-type", "")
    if method == "HEAD":
        return
    if not ctype.startswith(("application/json", "application/x-ndjson")):
        schema_for(method, path, resp.status, ctype)
        return
    schema = schema_for(method, path, resp.status, ctype)
    validator = jsonschema.Draft202012Validator(schema)
    items = resp.json if ctype.startswith("application/x-ndjson") else [resp.json]
    for item in items:
        errors = sorted(validator.iter_errors(item), key=lambda e: e.path)
        assert not errors, "%s %s %d does not match openapi.json: %s\n%r" % (
            method, path, resp.status, errors[0].message, item)


class ApiServer:
    """`python ctrlexec_api.py --config PATH` as a child process on 127.0.0.1:``port``.

    ``start()`` returns once the log shows ACTION=api-start (a restart on the same log
    only looks at what the new process wrote); ``stop()`` is SIGTERM with a bounded
    wait, then SIGKILL. The log goes to ``log_path`` with CTRL_EXEC_LOG=stderr.
    ``request()`` checks the answer against openapi.json; ``call()`` does not (hostile
    and fault tests send what the spec forbids).
    """

    def __init__(self, conf_path: str, log_path: str, port: int) -> None:
        self.conf_path = conf_path
        self.log_path = log_path
        self.port = port
        self.proc: subprocess.Popen | None = None

    @classmethod
    def for_fleet(cls, fleet, log_path: str, **conf) -> "ApiServer":
        """An API for ``fleet`` on ``api_port`` (a free port unless given), plus ``conf`` keys."""
        port = int(conf.pop("api_port", 0)) or free_port()
        fleet.set_conf(api_port=port, **conf)
        return cls(fleet.conf_path, log_path, port)

    def start(self, timeout_s: float = API_WAIT_S) -> "ApiServer":
        env = dict(os.environ, CTRL_EXEC_LOG="stderr")
        env.pop("CTRL_EXEC_CONF", None)
        with open(self.log_path, "ab") as log:
            offset = log.tell()
            self.proc = subprocess.Popen([sys.executable, API, "--config", self.conf_path],
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         env=env, cwd=ROOT)
        try:
            wait_logged(self.proc, self.log_path, b"ACTION=api-start", "API", offset=offset,
                        timeout_s=timeout_s)
        except AssertionError:
            self.kill()
            raise
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, bounded wait, then SIGKILL; returns the exit code."""
        return stop_process(self.proc, API_WAIT_S)

    def kill(self) -> None:
        """SIGKILL (a crash: no graceful stop, nothing flushed)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def log(self) -> str:
        return read_log(self.log_path)

    def rss_kb(self) -> int:
        """Resident set size of the API process (kB, from /proc)."""
        with open("/proc/%d/status" % self.proc.pid) as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS for pid %d" % self.proc.pid)

    def request(self, method: str, path: str, body=None, headers=None) -> tuple:
        """One plain request checked against openapi.json; returns (status, parsed JSON)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=API_WAIT_S)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers=dict(headers or {}))
            resp = conn.getresponse()
            raw = resp.read()
            parsed = Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, raw)
            check_response(method, path.split("?")[0], parsed)
            return resp.status, parsed.json
        finally:
            conn.close()

    def call(self, method: str, path: str, body=None, *, raw: bytes | None = None,
             headers: dict | None = None, timeout: float = API_WAIT_S) -> tuple:
        """One unchecked HTTP exchange; returns (status, headers, JSON, NDJSON list or bytes)."""
        return http_call(self.port, method, path, body, raw=raw, headers=headers, timeout=timeout)

    def health_ok(self) -> bool:
        """True when GET /health answers 200 {"ok": true} within 5 s."""
        try:
            status, _, body = self.call("GET", "/health", timeout=5)
        except (OSError, http.client.HTTPException):
            return False
        return status == 200 and isinstance(body, dict) and body.get("ok") is True


def http_call(port: int, method: str, path: str, body=None, *, raw: bytes | None = None,
              headers: dict | None = None, timeout: float = API_WAIT_S,
              address: str = "127.0.0.1") -> tuple:
    """One HTTP/1.1 exchange with a deadline on every socket operation (no spec check).

    Returns (status, headers with lower-case names, parsed JSON / NDJSON list, else bytes).
    """
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        hdrs = dict(headers or {})
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        payload = resp.read()
        got = {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()
    ctype = got.get("content-type", "")
    if ctype.startswith("application/json") and payload:
        return resp.status, got, json.loads(payload)
    if ctype.startswith("application/x-ndjson"):
        return resp.status, got, [json.loads(l) for l in payload.splitlines() if l.strip()]
    return resp.status, got, payload


def read_http_response(sock: socket.socket) -> tuple:
    """One response off a raw socket, framed by Content-Length: (status, headers, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before a full response head: %r" % data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        body += chunk
    assert len(body) == length, "more bytes than Content-Length: %r" % body[length:]
    return int(lines[0].split()[1]), headers, body
