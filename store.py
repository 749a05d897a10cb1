"""Control-host state: agent registry, run store and per host+script locks.

Owns everything under state_dir (SPEC §5, reference §5.2-§5.4):
    agents/<name>.json              registry records, 0644, atomic writes
    agents/.registry.lock           flock serialising read-modify-write updates
    runs/<reqid>.json               run records, 0640, atomic, kept run_retention s
    locks/<host>--<script>.lock     fcntl.flock locks held for a sync run
Directories this module creates get: state_dir, agents/ and runs/ 0750 (the API
user and its group read them; records carry hostnames, IPs and script output),
locks/ 0770 and lock files 0660 (the operator CLI and the API service share the
locks through their common group). Existing directories are never re-moded, so
packaging may choose e.g. setgid 2770.

The interface is deliberately small (Registry, RunStore, Locks, Store) so that a
Redis backend can replace the files without touching callers.

Never does: I/O at import time, gevent patching, DNS lookups, or turn a name or
reqid into a path before it has passed an allow-regex. Never stores tokens.
"""

from __future__ import annotations

__all__ = [
    "StoreError",
    "CorruptRecord",
    "LockConflict",
    "Target",
    "valid_agent_name",
    "Registry",
    "RunStore",
    "sync_record",
    "async_record",
    "settle_async",
    "status_view",
    "Locks",
    "HeldLocks",
    "Store",
    "open_store",
]

import collections
import errno
import fcntl
import hashlib
import os
import re
import time

import ujson

import ctrlexec_agent as wire

# --- constants -------------------------------------------------------------------

RUN_RETENTION_S = 86400
#: Per-host states of an async run that still wait for the agent.
PENDING_STATES = ("accepted", "running")
#: Longest agent name (a DNS name) accepted by the registry.
MAX_AGENT_NAME_CHARS = 253
#: Accepted run-store reqids (the API's 16-hex reqids and the agent's wider form).
RUN_REQID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: How long a registry write waits for .registry.lock before giving up.
REGISTRY_LOCK_TIMEOUT_S = 10.0
#: Poll step while waiting for .registry.lock (non-blocking polls keep gevent responsive).
REGISTRY_LOCK_POLL_S = 0.01
#: Longest file name most filesystems accept (NAME_MAX).
MAX_FILENAME_BYTES = 255
STATE_DIR_MODE = 0o750
AGENTS_DIR_MODE = 0o750
RUNS_DIR_MODE = 0o750
LOCKS_DIR_MODE = 0o770
REGISTRY_FILE_MODE = 0o644
RUN_FILE_MODE = 0o640
LOCK_FILE_MODE = 0o660
#: Dict keys never written to a run record (defence in depth: secrets stay off disk).
SECRET_FIELDS = frozenset(("token", "password", "secret", "authorization"))

_LOCK_UNSAFE_RE = re.compile(r"[^A-Za-z0-9_.-]")
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


# --- exceptions --------------------------------------------------------------------

class StoreError(Exception):
    """Base class: state could not be read or written, or a name / reqid was refused."""


class CorruptRecord(StoreError):
    """A stored record is not a JSON object. Attribute: path."""

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class LockConflict(StoreError):
    """Some host+script locks are already held. Attribute: conflicts (names, in request order)."""

    def __init__(self, conflicts: list, script: str = "") -> None:
        self.conflicts = list(conflicts)
        self.script = script
        super().__init__("already running: %s (script %s); retry when the running job "
                         "finishes" % (", ".join(self.conflicts), script))


# --- public API ----------------------------------------------------------------------

#: entry = the caller's text ("web-01" or "web-01:7450"); name = registry name;
#: address / port = where to dial; address None => not registered, never dialled.
Target = collections.namedtuple("Target", "entry name address port")


def valid_agent_name(name: str) -> bool:
    """True when name may be a registry name (and therefore a file name).

    ^[A-Za-z0-9][A-Za-z0-9._-]*$, at most 253 characters. Public so pairing can
    reject hostile hostnames before they reach the registry.
    """
    return (isinstance(name, str) and 0 < len(name) <= MAX_AGENT_NAME_CHARS
            and name not in (".", "..") and wire.AGENT_NAME_RE.fullmatch(name) is not None)


class Registry:
    """Paired agents, one JSON file per agent under <state_dir>/agents/.

    Record: {"hostname", "ip", "port", "lookup_by": "ip"|"hostname", "paired",
    "expiry", "tags": {}, "dispatcher_serial", "serial_status"}.
    """

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.dir = os.path.join(state_dir, "agents")

    def get(self, name: str) -> dict | None:
        """Return the record of name, or None when it is not registered (or not a valid name).

        Raises:
            CorruptRecord: the file exists but is not a JSON object.
        """
        if not valid_agent_name(name):
            return None
        return _read_json(self._path(name), what="registry record for %r" % name)

    def names(self) -> list:
        """Return every registered name, sorted (from the file names; no JSON parsing)."""
        try:
            entries = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreError("cannot list registry %s (%s)" % (self.dir, exc.strerror)) from None
        names = (e[:-5] for e in entries if e.endswith(".json"))
        return sorted(n for n in names if valid_agent_name(n))

    def list(self, tags: dict | None = None) -> list:
        """Return records (each with an added "name") whose tags match every given tag exactly.

        Args:
            tags: {"role": "web"} -> only agents with tags.role == "web"; None/{} -> all.
        Returns:
            [{"name", "hostname", "ip", "port", "lookup_by", "tags", ...}] sorted by name.
            Corrupt records are skipped and logged (ACTION=registry-corrupt).
        """
        out = []
        for name in self.names():
            try:
                record = self.get(name)
            except CorruptRecord as exc:
                wire.log_action("err", "registry-corrupt", AGENT=name, ERROR=str(exc))
                continue
            if record is None:          # unpaired since names() ran
                continue
            have = record.get("tags") if isinstance(record.get("tags"), dict) else {}
            if all(have.get(k) == v for k, v in (tags or {}).items()):
                out.append(dict(record, name=name))
        return out

    def put(self, name: str, record: dict) -> None:
        """Create or replace the record of name (atomic, 0644).

        Raises:
            StoreError: invalid name, record not a JSON-able dict, or the write failed.
        """
        self._check_name(name)
        if not isinstance(record, dict):
            raise StoreError("registry record for %r must be a dict, got %s"
                             % (name, type(record).__name__))
        data = _encode(record, pretty=True, what="registry record for %r" % name)
        with self._locked():
            self._write(name, data)

    def update(self, name: str, **fields) -> dict:
        """Read-modify-write the record of name under the registry lock; return the new record.

        Raises:
            StoreError: invalid or unregistered name, lock timeout, or the write failed.
            CorruptRecord: the stored record is unreadable.
        """
        self._check_name(name)
        with self._locked():
            record = self.get(name)
            if record is None:
                # Never resurrect an agent unpaired meanwhile as a half-filled record.
                raise StoreError("agent %r is not registered; pair or enroll it first" % name)
            record.update(fields)
            self._write(name, _encode(record, pretty=True,
                                      what="registry record for %r" % name))
        return record

    def delete(self, name: str) -> bool:
        """Remove name from the registry; True if it was registered."""
        if not valid_agent_name(name):
            return False
        with self._locked():
            try:
                os.unlink(self._path(name))
            except FileNotFoundError:
                return False
            except OSError as exc:
                raise StoreError("cannot delete registry record for %r (%s)"
                                 % (name, exc.strerror)) from None
        return True

    def resolve(self, entries: list) -> list:
        """Map caller host entries to dial targets, in the given order.

        Args:
            entries: ["web-01", "db-01:7450"]; the ":port" suffix (1-65535) overrides the
                stored port; anything else after ':' makes the entry unknown.
        Returns:
            [Target(entry, name, address, port)]; address None (never dialled, never sent
            to DNS) for unregistered names, malformed entries and corrupt records.
            address = ip when lookup_by == "ip" and ip is set, else hostname.
        """
        return [self._resolve_one(entry) for entry in entries]

    # --- private ---

    def _resolve_one(self, entry) -> Target:
        """Resolve one entry (see resolve)."""
        if not isinstance(entry, str):
            return Target(entry, str(entry), None, None)
        name, sep, port_text = entry.partition(":")
        port = None
        if sep:
            if not (port_text.isascii() and port_text.isdigit()
                    and 1 <= int(port_text) <= 65535):
                return Target(entry, entry, None, None)
            port = int(port_text)
        try:
            record = self.get(name)
        except CorruptRecord as exc:
            wire.log_action("err", "registry-corrupt", AGENT=name, ERROR=str(exc))
            record = None
        if record is None:
            return Target(entry, name, None, None)
        ip = record.get("ip") or ""
        if record.get("lookup_by") == "ip" and ip:
            address = str(ip)
        else:
            address = str(record.get("hostname") or name)
        if port is None:
            port = _valid_port(record.get("port")) or wire.AGENT_PORT
        return Target(entry, name, address, port)

    def _path(self, name: str) -> str:
        """File of a (validated) name."""
        return os.path.join(self.dir, name + ".json")

    def _check_name(self, name: str) -> None:
        """Raise StoreError unless name is a valid agent name."""
        if not valid_agent_name(name):
            raise StoreError("invalid agent name %r; accepted: a letter or digit first, then "
                             "letters, digits, '.', '_' or '-' (at most %d characters)"
                             % (name, MAX_AGENT_NAME_CHARS))

    def _write(self, name: str, data: bytes) -> None:
        """Atomically write a record file."""
        try:
            wire.atomic_write(self._path(name), data, REGISTRY_FILE_MODE)
        except OSError as exc:
            raise StoreError("cannot write registry record for %r (%s)"
                             % (name, exc.strerror or exc)) from None

    def _locked(self):
        """Context manager holding agents/.registry.lock exclusively."""
        _ensure_dir(self.state_dir, STATE_DIR_MODE)
        _ensure_dir(self.dir, AGENTS_DIR_MODE)
        return _FileLock(os.path.join(self.dir, ".registry.lock"), REGISTRY_LOCK_TIMEOUT_S)


def sync_record(*, reqid: str, script: str, hosts: list, results: list, submitter: dict) -> dict:
    """The stored shape of a finished sync (or streamed) run; no token, no args.

    Returns: {reqid, script, mode:"sync", hosts, results, completed, complete:true, submitter}.
    """
    return {"reqid": reqid, "script": script, "mode": "sync", "hosts": list(hosts),
            "results": results, "completed": int(time.time()), "complete": True,
            "submitter": submitter}


def async_record(*, reqid: str, script: str, hosts: list, results: list, submitter: dict) -> dict:
    """The stored shape of a submitted async run, with pending/complete settled.

    Returns: {reqid, script, mode:"async", created, hosts, results, pending, complete
    [, completed], submitter}.
    """
    return settle_async({"reqid": reqid, "script": script, "mode": "async",
                         "created": int(time.time()), "hosts": list(hosts),
                         "results": results, "submitter": submitter})


def settle_async(record: dict) -> dict:
    """Recompute ``pending`` (request order), ``complete`` and ``completed`` (set once).

    Returns a new dict; the input is not modified.
    """
    record = dict(record)
    rows = [row for row in record.get("results") or [] if isinstance(row, dict)]
    record["results"] = rows
    record["pending"] = [row.get("host") for row in rows if row.get("status") in PENDING_STATES]
    record["complete"] = not record["pending"]
    if record["complete"]:
        record.setdefault("completed", int(time.time()))
    else:
        record.pop("completed", None)
    return record


def status_view(record: dict) -> dict:
    """A record as callers see it (/status, CLI status): ``ok`` added, submitter removed."""
    view = {key: value for key, value in record.items() if key != "submitter"}
    if view.get("mode") == "async":
        view.setdefault("pending", [])
    view["ok"] = True
    return view


class RunStore:
    """Run records under <state_dir>/runs/<reqid>.json, kept retention_s after the last write."""

    def __init__(self, state_dir: str, retention_s: int = RUN_RETENTION_S) -> None:
        self.state_dir = state_dir
        self.dir = os.path.join(state_dir, "runs")
        self.retention_s = retention_s

    def save(self, record: dict) -> None:
        """Write record atomically (0640) under its "reqid"; secret fields are dropped.

        Raises:
            StoreError: reqid missing or not ^[A-Za-z0-9_-]{1,64}$, record not JSON-able,
                or the write failed.
        """
        if not isinstance(record, dict):
            raise StoreError("run record must be a dict, got %s" % type(record).__name__)
        path = self._path(record.get("reqid"))
        data = _encode(_scrub(record), pretty=False, what="run record %s" % record["reqid"])
        _ensure_dir(self.state_dir, STATE_DIR_MODE)
        _ensure_dir(self.dir, RUNS_DIR_MODE)
        try:
            wire.atomic_write(path, data, RUN_FILE_MODE)
        except OSError as exc:
            raise StoreError("cannot write run record %s (%s)"
                             % (record["reqid"], exc.strerror or exc)) from None

    def load(self, reqid: str) -> dict | None:
        """Return the record of reqid, or None when absent or older than the retention.

        Raises:
            StoreError: reqid not ^[A-Za-z0-9_-]{1,64}$.
            CorruptRecord: the file is not a JSON object.
        """
        path = self._path(reqid)
        try:
            age = time.time() - os.stat(path, follow_symlinks=False).st_mtime
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError("cannot read run record %s (%s)" % (reqid, exc.strerror)) from None
        if age > self.retention_s:
            return None
        return _read_json(path, what="run record %s" % reqid)

    def purge(self) -> int:
        """Delete records whose mtime is older than the retention; return how many records."""
        cutoff = time.time() - self.retention_s
        count = 0
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise StoreError("cannot list run store %s (%s)" % (self.dir, exc.strerror)) from None
        for entry in entries:
            is_record = entry.name.endswith(".json")
            # ".tmp-*": temp files of writers that died mid-write (wire.atomic_write).
            if not (is_record or entry.name.startswith(".tmp-")):
                continue
            try:
                if (not entry.is_file(follow_symlinks=False)
                        or entry.stat(follow_symlinks=False).st_mtime >= cutoff):
                    continue
                os.unlink(entry.path)
                count += is_record
            except FileNotFoundError:
                continue            # purged concurrently by another process
            except OSError as exc:
                wire.log_action("err", "run-store-fail", FILE=entry.name, ERROR=exc.strerror)
        return count

    # --- private ---

    def _path(self, reqid) -> str:
        """File of a reqid, after the allow-regex (a reqid never becomes an arbitrary path)."""
        if not isinstance(reqid, str) or not RUN_REQID_RE.fullmatch(reqid):
            raise StoreError("invalid reqid %r; accepted: 1-64 letters, digits, '_' or '-'"
                             % (reqid if not isinstance(reqid, str) else reqid[:80],))
        return os.path.join(self.dir, reqid + ".json")


class HeldLocks:
    """A set of host+script flocks held together; a context manager releasing them on exit."""

    def __init__(self, names: list, script: str, fds: list) -> None:
        self.names = list(names)
        self.script = script
        self._fds = list(fds)

    def release(self) -> None:
        """Release every lock (idempotent). Closing the fd releases the flock."""
        fds, self._fds = self._fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass                # already closed: the lock is gone either way

    def __enter__(self) -> HeldLocks:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


class Locks:
    """Per host+script flocks under <state_dir>/locks/ (instance-local, not for NFS)."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.dir = os.path.join(state_dir, "locks")

    def hold(self, names: list, script: str) -> HeldLocks:
        """Take the locks of every (name, script) pair, all or nothing.

        Use as `with locks.hold(["web-01", "db-01"], "backup"): ...`. The locks stay
        held until the with block ends (success or exception); the kernel drops them
        if the process dies. Duplicate names are collapsed.
        Raises:
            LockConflict: .conflicts = the names already held (given order); nothing held.
            StoreError: a name or script is empty / not a string, or a lock file cannot be opened.
        """
        if not isinstance(script, str) or not script:
            raise StoreError("lock script must be a non-empty string")
        if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
            raise StoreError("lock names must be a list of non-empty strings")
        _ensure_dir(self.state_dir, STATE_DIR_MODE)
        _ensure_dir(self.dir, LOCKS_DIR_MODE)
        wanted = []
        seen = set()
        for name in names:
            fname = _lock_filename(name, script)
            if fname not in seen:       # same file twice would conflict with itself
                seen.add(fname)
                wanted.append((name, fname))
        fds, conflicts = [], []
        try:
            for name, fname in wanted:
                fd = _open_lock_file(os.path.join(self.dir, fname))
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    os.close(fd)
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise StoreError("cannot lock %s (%s)" % (fname, exc.strerror)) from None
                    conflicts.append(name)
                    continue
                fds.append(fd)
        except BaseException:
            _close_all(fds)         # never leave a partial set held
            raise
        if conflicts:
            _close_all(fds)
            wire.log_action("info", "lock-conflict", SCRIPT=script, CONFLICTS=",".join(conflicts))
            raise LockConflict(conflicts, script)
        return HeldLocks([n for n, _ in wanted], script, fds)

    def held(self) -> list:
        """Return [{"host", "script"}] for every lock file currently held by anyone, sorted.

        Probing briefly takes a shared flock on each file, so a hold() racing with this
        call may see a spurious conflict; it is meant for operators (list-locks).
        """
        try:
            entries = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreError("cannot list locks %s (%s)" % (self.dir, exc.strerror)) from None
        out = []
        for fname in entries:
            if not fname.endswith(".lock") or "--" not in fname[:-5]:
                continue
            try:
                fd = os.open(os.path.join(self.dir, fname), os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
            except OSError:
                continue
            try:
                # LOCK_SH probe: conflicts with a holder's LOCK_EX, not with other probes.
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                host, _, script = fname[:-5].rpartition("--")
                out.append({"host": host, "script": script})
            finally:
                os.close(fd)
        return out


class Store:
    """The three state stores of one control host: .registry .runs .locks."""

    def __init__(self, cfg) -> None:
        self.state_dir = cfg.state_dir
        self.registry = Registry(cfg.state_dir)
        self.runs = RunStore(cfg.state_dir, cfg.run_retention)
        self.locks = Locks(cfg.state_dir)


def open_store(cfg) -> Store:
    """Return the Store of cfg, creating missing state directories (see module docstring).

    Raises:
        StoreError: a directory cannot be created (e.g. state_dir not writable).
    """
    store = Store(cfg)
    try:
        _ensure_dir(cfg.state_dir, STATE_DIR_MODE)
        _ensure_dir(store.registry.dir, AGENTS_DIR_MODE)
        _ensure_dir(store.runs.dir, RUNS_DIR_MODE)
        _ensure_dir(store.locks.dir, LOCKS_DIR_MODE)
    except StoreError as exc:
        raise StoreError("state_dir %s is unusable: %s; set state_dir in ctrl-exec.conf to a "
                         "writable directory" % (cfg.state_dir, exc)) from None
    return store


# --- private ---------------------------------------------------------------------------

class _FileLock:
    """Exclusive flock on a file, polled non-blocking so gevent hubs never stall."""

    def __init__(self, path: str, timeout_s: float) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.fd = -1

    def __enter__(self) -> _FileLock:
        self.fd = _open_lock_file(self.path)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    raise StoreError("registry is busy: %s still locked after %gs; retry"
                                     % (self.path, self.timeout_s)) from None
                time.sleep(REGISTRY_LOCK_POLL_S)    # patched under gevent: yields

    def __exit__(self, exc_type, exc, tb) -> None:
        os.close(self.fd)


def _ensure_dir(path: str, mode: int) -> None:
    """Create path (and parents) if missing, chmod-ing only what this call created."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(os.path.abspath(path))
    if parent and parent != path:
        _ensure_dir(parent, mode)
    try:
        os.mkdir(path, mode)
        os.chmod(path, mode)        # mkdir's mode is filtered by the umask
    except FileExistsError:
        if not os.path.isdir(path):
            raise StoreError("%s exists and is not a directory" % path) from None
    except OSError as exc:
        raise StoreError("cannot create directory %s (%s)" % (path, exc.strerror)) from None


def _open_lock_file(path: str) -> int:
    """Open (creating 0660) a lock file; never follows a symlink planted in its place."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | _O_NOFOLLOW | _O_CLOEXEC,
                     LOCK_FILE_MODE)
    except OSError as exc:
        raise StoreError("cannot open lock file %s (%s)" % (path, exc.strerror)) from None
    try:
        os.fchmod(fd, LOCK_FILE_MODE)   # undo the umask so the group can share it
    except OSError:
        pass                            # someone else's file: its mode is theirs to keep
    return fd


def _lock_filename(name: str, script: str) -> str:
    """locks/ file name of a pair: unsafe characters -> '_', long names hashed to fit NAME_MAX."""
    host = _LOCK_UNSAFE_RE.sub("_", name)
    safe_script = _LOCK_UNSAFE_RE.sub("_", script)
    fname = "%s--%s.lock" % (host, safe_script)
    if len(fname.encode()) > MAX_FILENAME_BYTES:
        host = host[:80] + "~" + hashlib.sha256(name.encode()).hexdigest()[:16]
        safe_script = safe_script[:80] + "~" + hashlib.sha256(script.encode()).hexdigest()[:16]
        fname = "%s--%s.lock" % (host, safe_script)
    return fname


def _close_all(fds: list) -> None:
    """Close fds, releasing their flocks."""
    while fds:
        try:
            os.close(fds.pop())
        except OSError:
            pass


def _read_json(path: str, *, what: str) -> dict | None:
    """Parse a JSON object file; None if absent; CorruptRecord if not a JSON object."""
    try:
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError("cannot read %s (%s)" % (what, exc.strerror)) from None
    try:
        with os.fdopen(fd, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise StoreError("cannot read %s (%s)" % (what, exc.strerror)) from None
    try:
        obj = ujson.loads(data)
    except (ValueError, OverflowError) as exc:
        raise CorruptRecord("%s is corrupt: not valid JSON (%s)" % (what, exc),
                            path=path) from None
    if not isinstance(obj, dict):
        raise CorruptRecord("%s is corrupt: expected a JSON object, got %s"
                            % (what, type(obj).__name__), path=path)
    return obj


def _encode(obj: dict, *, pretty: bool, what: str) -> bytes:
    """JSON-encode a record (ujson); StoreError if it holds non-JSON values."""
    try:
        if pretty:
            text = ujson.dumps(obj, indent=2, sort_keys=True, escape_forward_slashes=False)
            return (text + "\n").encode()
        return ujson.dumps(obj, escape_forward_slashes=False).encode()
    except (TypeError, ValueError, OverflowError) as exc:
        raise StoreError("%s cannot be stored: not JSON-serialisable (%s)" % (what, exc)) from None


def _scrub(obj):
    """Copy obj without any dict key named like a secret (at any depth)."""
    if isinstance(obj, dict):
        return {k: _scrub(v) for k, v in obj.items()
                if not (isinstance(k, str) and k.lower() in SECRET_FIELDS)}
    if isinstance(obj, (list, tuple)):
        return [_scrub(v) for v in obj]
    return obj


def _valid_port(value) -> int | None:
    """value as a port 1-65535, or None."""
    try:
        port = int(value)
    except (TypeError, ValueError):
        return None
    return port if 1 <= port <= 65535 else None
