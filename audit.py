"""The audit log: one append-only, hash-chained JSON line per request that acts.

Owns: ``audit_log`` (default ``<state_dir>/audit.log``), its rotated files
(``audit.log.1`` ... ``.N``, oldest last) and ``audit.log.head`` (the last line's
number and hash). Each line is a JSON object with ``n`` (1, 2, 3 ... across
rotations), ``ts``, who (``user``, ``source_ip``, ``via``), what (``action``,
``script``, ``args``), where (``hosts``), ``outcome``, ``reqid``, ``detail``, and
``prev``: the SHA-256 of the previous line's exact bytes (the first line ever chains
to the SHA-256 of ``GENESIS``; the first line of a new file after a rotation chains
to the last line of the rotated one). ``verify`` walks every file oldest first and
names the first line that was edited, removed, reordered or is not JSON; the head
file also catches lines cut off the end.

Durability as run records: every line is one ``write()`` on an O_APPEND file,
fsynced, under an exclusive ``flock`` so API processes and the CLI on one host
append in order. The head file is renamed into place but not fsynced (it would
double the cost of a line): after a power cut it may lag the last lines, which
``verify`` accepts, and it never claims a line that was not written. With the Redis backend each node keeps its own local log.

Never does: write a token, a key or a password (callers pass no such field and
``record`` refuses names that look like one), rewrite or delete a line.
"""
from __future__ import annotations

__all__ = ["AuditError", "AuditLog", "GENESIS", "record", "verify", "log_path"]

import contextlib
import fcntl
import hashlib
import os
from typing import Any, Iterator, Optional

import ujson

import ctrlexec_agent as wire

GENESIS = b"ctrl-exec audit log v1"
HEAD_SUFFIX = ".head"
#: Field names that never enter the log, whoever passes them.
_SECRET_FIELDS = frozenset(("token", "password", "key", "private_key", "secret"))
_TAIL_BYTES = 65536
#: path -> ((inode, size) after this process's last append, n, sha256 of that line).
_LAST: dict = {}


class AuditError(Exception):
    """The audit log cannot be written or does not verify; str() says where and why."""


def log_path(cfg: Any) -> str:
    """The audit log of a config: ``audit_log``, else ``<state_dir>/audit.log``."""
    return getattr(cfg, "audit_log", None) or os.path.join(cfg.state_dir, "audit.log")


class AuditLog:
    """Appends chained lines to one audit log (see the module docstring).

    Args: path; max_bytes — rotate before a line would take the file past it (0: never);
    keep — rotated files kept (the oldest beyond that are deleted, and ``verify``
    then starts from the oldest one left).
    """

    def __init__(self, path: str, *, max_bytes: int = 0, keep: int = 10) -> None:
        self.path = path
        self.max_bytes = int(max_bytes)
        self.keep = max(1, int(keep))

    def record(self, **fields: Any) -> dict:
        """Append one line built from fields (None values left out); returns the entry.

        Raises: AuditError when the line cannot be written durably.
        """
        entry = {k: v for k, v in fields.items() if v is not None and k not in _SECRET_FIELDS}
        try:
            with self._locked():
                number, prev = self._last()
                entry = dict({"n": number + 1, "ts": wire.utc_timestamp()}, **entry)
                entry["prev"] = prev
                line = ujson.dumps(entry, escape_forward_slashes=False)
                data = line.encode("utf-8") + b"\n"
                self._rotate_if_full(len(data))
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    if os.write(fd, data) != len(data):
                        raise OSError("short write")
                    os.fsync(fd)
                    written = os.fstat(fd)
                finally:
                    os.close(fd)
                digest = _sha(data[:-1])
                _LAST[self.path] = ((written.st_ino, written.st_size), entry["n"], digest)
                self._write_head(entry["n"], digest)
        except OSError as exc:
            raise AuditError("cannot append to the audit log %s: %s (check audit_log and its "
                             "folder's permissions)" % (self.path, exc.strerror or exc)) from None
        return entry

    def files(self) -> list:
        """Every file of the log, oldest first."""
        return [name for _, name in reversed(self._rotated())] + \
            ([self.path] if os.path.exists(self.path) else [])

    def missing(self) -> list:
        """Rotated files absent between audit.log.1 and the oldest one kept (never pruned)."""
        have = {index for index, _ in self._rotated()}
        return ["%s.%d" % (self.path, i) for i in range(1, max(have, default=0)) if i not in have]

    def _rotated(self) -> list:
        """[(index, name)] of the rotated files, by index."""
        folder, base = os.path.split(os.path.abspath(self.path))
        found = []
        try:
            names = os.listdir(folder or ".")
        except FileNotFoundError:
            return []
        for name in names:
            suffix = name[len(base) + 1:] if name.startswith(base + ".") else ""
            if suffix.isdigit():
                found.append((int(suffix), os.path.join(folder, name)))
        return sorted(found)

    # --- private ---

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, mode=0o750, exist_ok=True)
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write_head(self, number: int, digest: str) -> None:
        """Replace the head file (renamed into place, not fsynced: after a crash it may lag
        the fsynced lines by the last few, which ``verify`` accepts; it never runs ahead)."""
        tmp = "%s%s.tmp-%d" % (self.path, HEAD_SUFFIX, os.getpid())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, ujson.dumps({"n": number, "sha256": digest}).encode() + b"\n")
        finally:
            os.close(fd)
        os.replace(tmp, self.path + HEAD_SUFFIX)

    def _last(self) -> tuple:
        """(number, sha256) of the last line written, from the newest non-empty file.

        Remembered per path while the file's (inode, size) is what this process left,
        so a busy API does not re-read the tail for every line; any other writer (the
        CLI, a rotation) changes the size or the inode and the tail is read again.
        """
        try:
            st = os.stat(self.path)
            cached = _LAST.get(self.path)
            if cached is not None and cached[0] == (st.st_ino, st.st_size):
                return cached[1], cached[2]
        except FileNotFoundError:
            pass
        for name in reversed(self.files()):
            line = _last_line(name)
            if line:
                try:
                    number = int(ujson.loads(line).get("n", 0))
                except (ValueError, AttributeError, TypeError):
                    number = 0
                return number, _sha(line)
        return 0, _sha(GENESIS)

    def _rotate_if_full(self, size: int) -> None:
        try:
            current = os.path.getsize(self.path)
        except FileNotFoundError:
            return
        if not self.max_bytes or current == 0 or current + size <= self.max_bytes:
            return
        oldest = "%s.%d" % (self.path, self.keep)
        if os.path.exists(oldest):
            os.unlink(oldest)
        for index in range(self.keep - 1, 0, -1):
            name = "%s.%d" % (self.path, index)
            if os.path.exists(name):
                os.replace(name, "%s.%d" % (self.path, index + 1))
        os.replace(self.path, self.path + ".1")
        wire.log_action("info", "audit-rotate", FILE=self.path)


def record(cfg: Any, **fields: Any) -> Optional[dict]:
    """Append one line to cfg's audit log; a failure is logged and returned as None,
    never raised into the request (the run has happened; its record says so too)."""
    log = AuditLog(log_path(cfg), max_bytes=getattr(cfg, "audit_log_max_bytes", 0) or 0,
                   keep=getattr(cfg, "audit_log_keep", 10) or 10)
    try:
        return log.record(**fields)
    except AuditError as exc:
        wire.log_action("err", "audit-fail", ACTION_NAME=fields.get("action", ""), ERROR=str(exc))
        return None


def verify(path: str) -> dict:
    """Check the whole chain of the log at path (rotated files included, oldest first).

    Returns: {"files": [...], "lines": N, "first": n of the first line, "last": n}.
    Raises: AuditError naming the file, the line and what is wrong.
    """
    log = AuditLog(path)
    files = log.files()
    gaps = log.missing()
    if gaps:
        raise AuditError("%s is missing: a rotated file was removed from the middle of the "
                         "log" % gaps[0])
    if not files:
        raise AuditError("no audit log at %s (set audit_log in ctrl-exec.conf, or pass --file)"
                         % path)
    head = _read_head(path)
    head_sha: Optional[str] = None
    prev: Optional[str] = None
    number: Optional[int] = None
    first = None
    count = 0
    for name in files:
        with open(name, "rb") as handle:
            lines = handle.read().split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        else:
            raise AuditError("%s does not end with a newline: its last line was cut or "
                             "edited" % name)
        for index, raw in enumerate(lines, 1):
            where = "%s line %d" % (name, index)
            try:
                entry = ujson.loads(raw)
            except ValueError:
                raise AuditError("%s is not JSON: the line was edited or corrupted" % where) from None
            if not isinstance(entry, dict) or not isinstance(entry.get("n"), int):
                raise AuditError("%s is not an audit entry (no line number n)" % where)
            if prev is None:
                first = entry["n"]
                if entry["n"] == 1 and entry.get("prev") != _sha(GENESIS):
                    raise AuditError("%s: the first line does not start the chain" % where)
            else:
                if entry["n"] != number + 1:
                    raise AuditError("%s: line number %d follows %d: a line was removed or "
                                     "reordered" % (where, entry["n"], number))
                if entry.get("prev") != prev:
                    raise AuditError("%s: its prev hash does not match the line before it: "
                                     "that line was edited, removed or reordered" % where)
            prev, number = _sha(raw), entry["n"]
            if head is not None and number == head.get("n"):
                head_sha = prev
            count += 1
    if head is not None:
        # The head may lag the last lines after a crash (it is not fsynced), never lead.
        recorded = head.get("n")
        if not isinstance(recorded, int) or recorded > number:
            raise AuditError("the log ends at line number %s but %s%s records %s: lines were "
                             "cut off the end" % (number, path, HEAD_SUFFIX, recorded))
        if head_sha is not None and head_sha != head.get("sha256"):
            raise AuditError("line number %s does not match the hash %s%s recorded for it: "
                             "the end of the log was rewritten" % (recorded, path, HEAD_SUFFIX))
    return {"files": files, "lines": count, "first": first, "last": number}


def _read_head(path: str) -> Optional[dict]:
    try:
        with open(path + HEAD_SUFFIX, "rb") as handle:
            head = ujson.loads(handle.read())
    except (OSError, ValueError):
        return None
    return head if isinstance(head, dict) else None


def _last_line(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - _TAIL_BYTES))
            tail = handle.read()
    except FileNotFoundError:
        return b""
    lines = [line for line in tail.split(b"\n") if line]
    return lines[-1] if lines else b""


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
