"""Test support for the HTTP API tests: an in-process WSGI client and the spec checker.

`call()` drives make_app() through wsgiref.validate (STYLE §20) and checks every
response against the schema that openapi.json documents for that path + status.
"""

from __future__ import annotations

import io
import json
import os
import re
import wsgiref.util
import wsgiref.validate

import jsonschema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC_PATH = os.path.join(ROOT, "openapi.json")

with open(SPEC_PATH) as _fh:
    SPEC = json.load(_fh)

#: Responses every path may give (api gate, body limit, overload, server error).
GENERIC = {403: "AuthError", 404: "Error", 413: "Error", 500: "Error", 503: "Error"}


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
    """Assert resp matches openapi.json (JSON / NDJSON bodies; HTML only by type)."""
    ctype = resp.headers.get("content-type", "")
    if method == "HEAD":
        return
    if ctype.startswith("text/html"):
        schema_for(method, path, resp.status, ctype)
        return
    assert ctype.startswith(("application/json", "application/x-ndjson")), ctype
    schema = schema_for(method, path, resp.status, ctype)
    validator = jsonschema.Draft202012Validator(schema)
    items = resp.json if ctype.startswith("application/x-ndjson") else [resp.json]
    for item in items:
        errors = sorted(validator.iter_errors(item), key=lambda e: e.path)
        assert not errors, "%s %s %d does not match openapi.json: %s\n%r" % (
            method, path, resp.status, errors[0].message, item)
