"""The audit log: real lines written by real runs, and what `audit verify` catches.

The chain is checked on logs the product wrote itself (CLI and API runs on real
agents), then after an edit, a deleted line, two lines swapped, a line cut off the
end, and across rotation.
"""

from __future__ import annotations

import json
import os

import pytest

from apitest_support import ApiServer
from fleet import Fleet, write_executable
from test_cli import cli

import audit

OK_SCRIPT = '#!/bin/sh\necho "ok $*"\n'
ALLOW_HOOK = "#!/bin/sh\ncat >/dev/null\nexit 0\n"
SECRET = "s3cr3t-token-value-XYZ"


def _lines(path: str) -> list:
    with open(path, "rb") as handle:
        return handle.read().splitlines(keepends=True)


def _write(path: str, lines: list) -> None:
    with open(path, "wb") as handle:
        handle.write(b"".join(lines))


@pytest.fixture
def written(tmp_path):
    """A fleet with an auth hook, a CLI run, a denied CLI run and an API run with a token."""
    fleet = Fleet.with_agents(str(tmp_path), ["au-01", "au-02"], scripts={"hello": OK_SCRIPT})
    hook = write_executable(str(tmp_path / "hook"),
                            '#!/bin/sh\ncat >/dev/null\n[ "$ENVEXEC_SCRIPT" = nope ] && exit 1\nexit 0\n')
    fleet.set_conf(auth_hook=hook)
    api = ApiServer.for_fleet(fleet, str(tmp_path / "api.log"))
    try:
        api.start()
        ran = cli(fleet.conf_path, "run", "au-01", "au-02", "hello", "--", "one",
                  env={"ENVEXEC_TOKEN": SECRET})
        assert ran.returncode == 0, ran.stderr
        assert cli(fleet.conf_path, "run", "au-01", "nope").returncode == 3
        status, body = api.request("POST", "/run", {"hosts": ["au-02"], "script": "hello"},
                                   headers={"Authorization": "Bearer " + SECRET,
                                            "Content-Type": "application/json"})
        assert status == 200, body
        yield fleet
    finally:
        api.stop()
        fleet.stop_all()


def test_runs_are_audited_with_who_what_where_and_no_token(written):
    path = audit.log_path(written.cfg)
    raw = open(path, "rb").read()
    assert SECRET.encode() not in raw
    entries = [json.loads(line) for line in raw.splitlines()]
    assert [(e["action"], e["via"], e["outcome"]) for e in entries] == [
        ("run", "cli", "ok"), ("run", "cli", "denied"), ("run", "api", "ok")]
    first = entries[0]
    assert first["user"] == "tester" and first["source_ip"] == "127.0.0.1"
    assert first["script"] == "hello" and first["args"] == ["one"]
    assert first["hosts"] == ["au-01", "au-02"] and len(first["reqid"]) == 16
    assert [e["n"] for e in entries] == [1, 2, 3]
    result = cli(written.conf_path, "audit", "verify")
    assert result.returncode == 0, result.stderr
    assert "audit log ok: 3 line(s)" in result.stdout


@pytest.mark.parametrize("tamper", ["edit", "delete", "reorder", "truncate", "garbage"])
def test_audit_verify_fails_after_tampering(written, tamper):
    path = audit.log_path(written.cfg)
    lines = _lines(path)
    if tamper == "edit":
        lines[0] = lines[0].replace(b'"user":"tester"', b'"user":"nobody"')
    elif tamper == "delete":
        del lines[1]
    elif tamper == "reorder":
        lines[1], lines[2] = lines[2], lines[1]
    elif tamper == "truncate":
        lines = lines[:-1]
    else:
        lines[1] = b"not json\n"
    _write(path, lines)
    result = cli(written.conf_path, "--json", "audit", "verify")
    assert result.returncode == 1
    detail = json.loads(result.stdout)["detail"]
    expected = {"edit": "line 2: its prev hash does not match",
                "delete": "line 2: line number 3 follows 1",
                "reorder": "line 2: line number 3 follows 1",
                "truncate": "lines were cut off the end",
                "garbage": "line 2 is not JSON"}[tamper]
    assert expected in detail, detail


def test_rotation_keeps_the_chain(tmp_path):
    path = str(tmp_path / "audit.log")
    log = audit.AuditLog(path, max_bytes=600, keep=50)
    for index in range(20):
        log.record(action="run", user="u%d" % index, outcome="ok", hosts=["h"], token="never")
    files = log.files()
    assert len(files) > 3 and files[-1] == path
    result = audit.verify(path)
    assert result["lines"] == 20 and result["first"] == 1 and result["last"] == 20
    assert all(b"never" not in open(name, "rb").read() for name in files)
    first_of_new = json.loads(_lines(path)[0])
    assert first_of_new["prev"] == audit._sha(_lines(files[-2])[-1].rstrip(b"\n"))
    os.unlink(files[1])                 # a rotated file in the middle goes missing
    with pytest.raises(audit.AuditError, match="removed from the middle of the log"):
        audit.verify(path)


def test_verify_names_a_missing_log(tmp_path):
    with pytest.raises(audit.AuditError, match="no audit log at"):
        audit.verify(str(tmp_path / "none.log"))


def test_hostile_names_are_written_escaped_and_verify(tmp_path):
    path = str(tmp_path / "audit.log")
    log = audit.AuditLog(path, max_bytes=0, keep=1)
    hostile = ["\ud800", "\u202eweb-01", "web-01\nX-Injected: 1", "web-01\x00"]
    log.record(action="run", user="op", outcome="denied", hosts=hostile)
    raw = open(path, "rb").read()
    assert raw.count(b"\n") == 1 and raw.isascii()
    assert json.loads(raw)["hosts"] == hostile
    assert audit.verify(path)["lines"] == 1
