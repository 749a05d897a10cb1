"""Control-host state: agent registry, run store, per host+script locks, run events.

A facade over a storage backend (SPEC §5). The facade classes (Registry, RunStore,
Locks; bundled by Store / open_store) own every rule, once, for every backend:
    - an agent name (valid_agent_name) or reqid (RUN_REQID_RE) passes its allow-regex
      before a backend sees it, so caller text never becomes a file name or key unchecked;
    - resolve() gives an address only for a registered, readable record: an unknown,
      malformed or corrupt entry is never dialled and never sent to DNS;
    - SECRET_FIELDS are dropped from a run record, at any depth, before it is stored;
    - a run record older than run_retention is absent, even while a backend still holds it;
    - list(tags=...) filtering, JSON encoding / decoding (CorruptRecord), all-or-nothing locks.
The backends (RegistryBackend, RunBackend, LockBackend) only store: bytes under keys
that are already valid, atomic writes and read-modify-writes, locks, record ages.
They never validate, decode, scrub, filter or resolve, and never decide retention.

File backends, the embedded default (reference §5.2-§5.4), own everything under state_dir:
    agents/<name>.json              registry records, 0644, atomic writes
    agents/.registry.lock           flock serialising registry writes
    runs/<reqid>.json               run records, 0640, atomic, age = mtime
    runs/.update.lock               flock serialising run-record writes (save, update)
    locks/<host>--<script>.lock     fcntl.flock locks held for a sync run
Directories they create get: state_dir, agents/ and runs/ 0750 (the API user and its
group read them; records carry hostnames, IPs and script output), locks/ 0770 and
lock files 0660 (the operator CLI and the API service share them through their common
group). Existing directories are never re-moded, so packaging may choose e.g. setgid 2770.
Run events (RunEvents: the live events of a run, each with an id, for followers on any
node) are kept in this process's memory with the file backends.

Redis backends (state_backend = redis://... or rediss://..., several API nodes on one
server; the registry stays under state_dir):
    ctrlexec:run:<reqid>            hash {data, written}, TTL = run_retention
    ctrlexec:runs                   sorted set reqid -> written (the time index)
    ctrlexec:lock:<host>--<script>.lock   owner token, SET NX PX lock_lease, renewed
    ctrlexec:fence                  counter: the fencing number of every lock grant
    ctrlexec:events:<reqid>         stream of the run's events, TTL = run_retention
    ctrlexec:events-meta:<reqid>    hash {meta}: script, hosts, submitter, deadline
    ctrlexec:async-pending          sorted set of async runs not yet complete (reapers)
    ctrlexec:node:<node id>         an API node's liveness lease, renewed while it runs
An unreachable server is StoreUnavailable (the API answers 503); redis-py reconnects
by itself when the server is back. open_store() picks the backends (_select_backends)
from state_backend; callers do not change.

Never does: I/O at import time, gevent patching or importing gevent (only the Redis
backends and the in-memory event wait use it, imported on first use), DNS lookups.
Never stores tokens.
"""

from __future__ import annotations

__all__ = [
    "StoreError",
    "StoreUnavailable",
    "CorruptRecord",
    "LockConflict",
    "Target",
    "valid_agent_name",
    "Stored",
    "Lease",
    "RegistryBackend",
    "RunBackend",
    "LockBackend",
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
    "FileRegistryBackend",
    "FileRunBackend",
    "FileLockBackend",
    "RunEvents",
    "MemoryEventBackend",
    "RedisClient",
    "RedisRunBackend",
    "RedisLockBackend",
    "RedisEventBackend",
    "RedisNodeBackend",
    "EVENT_ID_RE",
]

import collections
import errno
import fcntl
import hashlib
import os
import re
import secrets
import stat
import time
from typing import Any, Callable, Protocol

import ujson

import config as config_mod
import ctrlexec_agent as wire

# --- constants -------------------------------------------------------------------

RUN_RETENTION_S = 86400
#: Per-host states of an async run that still wait for the agent.
PENDING_STATES = ("accepted", "running")
#: Longest agent name (a DNS name) accepted by the registry.
MAX_AGENT_NAME_CHARS = 253
#: Accepted run-store reqids (the API's 16-hex reqids and the agent's wider form).
RUN_REQID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: How long a record write waits for .registry.lock / .update.lock before giving up.
STATE_LOCK_TIMEOUT_S = 10.0
#: Poll step while waiting for those locks (non-blocking polls keep gevent responsive).
STATE_LOCK_POLL_S = 0.01
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
#: Every Redis key of ctrl-exec starts with this (several fleets may share one server
#: when each has its own database number).
REDIS_PREFIX = "ctrlexec:"
#: Read-modify-write attempts of one record before a busy key is reported.
REDIS_UPDATE_RETRIES = 50
#: Socket deadlines of a Redis command (a dead server must not hang a request).
REDIS_SOCKET_TIMEOUT_S = 5.0
REDIS_CONNECT_TIMEOUT_S = 3.0
#: Connections per process; a request waiting longer than this for one gets a 503.
REDIS_POOL_SIZE = 64
REDIS_POOL_WAIT_S = 5.0
#: How long the node's event reader blocks in one XREAD (new followers join within it).
EVENT_READ_BLOCK_MS = 250
#: At most this many events are kept per run (oldest dropped first).
EVENTS_PER_RUN_MAX = 100000
#: The in-memory event log (files backend) keeps the events of this many recent runs.
MEMORY_EVENT_RUNS = 256
#: An event id: "<milliseconds>-<sequence>" (Redis stream ids; the memory log mimics them).
EVENT_ID_RE = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
SECRET_FIELDS = frozenset(("token", "password", "secret", "authorization"))

_LOCK_UNSAFE_RE = re.compile(r"[^A-Za-z0-9_.-]")
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


# --- exceptions --------------------------------------------------------------------

class StoreError(Exception):
    """Base class: state could not be read or written, or a name / reqid was refused."""


class StoreUnavailable(StoreError):
    """The state backend cannot be reached now (Redis down): retry later; nothing was written."""


class CorruptRecord(StoreError):
    """A stored record is not a JSON object. Attribute: path (backend.where: file or key)."""

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


# --- public API: values and the backend interface ------------------------------------

#: entry = the caller's text ("web-01" or "web-01:7450"); name = registry name;
#: address / port = where to dial; address None => not registered, never dialled.
Target = collections.namedtuple("Target", "entry name address port")

#: A record as a backend holds it: data (bytes, JSON) and age_s (seconds since its last write).
Stored = collections.namedtuple("Stored", "data age_s")

#: One held host+script lock. key = the backend's key of the pair (file name, later a
#: Redis key); handle = the backend's own (an fd; later an owner token); fencing = the
#: lease's fencing number (None for flocks, which the kernel drops with the process).
Lease = collections.namedtuple("Lease", "key name script handle fencing")


def valid_agent_name(name: str) -> bool:
    """True when name may be a registry name (and therefore a file name).

    ^[A-Za-z0-9][A-Za-z0-9._-]*$, at most 253 characters. Public so pairing can
    reject hostile hostnames before they reach the registry.
    """
    return (isinstance(name, str) and 0 < len(name) <= MAX_AGENT_NAME_CHARS
            and name not in (".", "..") and wire.AGENT_NAME_RE.fullmatch(name) is not None)


class RegistryBackend(Protocol):
    """Where registry records live. Names are already valid; data is the facade's JSON."""

    def prepare(self) -> None:
        """Create or check what the backend needs (StoreError when unusable)."""

    def where(self, name: str) -> str:
        """Where the record of name is kept, for messages (a file path; later a key)."""

    def get(self, name: str) -> Stored | None:
        """The stored record, or None when absent."""

    def names(self) -> list:
        """Every stored name, unchecked, in any order."""

    def put(self, name: str, data: bytes) -> None:
        """Create or replace a record atomically."""

    def update(self, name: str, fn: Callable[[Stored | None], bytes | None]) -> None:
        """Write fn(current) unless it is None, atomically; fn may run again on a retry."""

    def delete(self, name: str) -> bool:
        """Remove a record; True if it existed."""


class RunBackend(Protocol):
    """Where run records live. Reqids are already valid; data is scrubbed JSON.

    ttl_s = how long the facade keeps the record after this write: a backend with
    expiring keys sets it; the file backend keeps the mtime and purge() deletes.
    """

    def prepare(self) -> None:
        """Create or check what the backend needs (StoreError when unusable)."""

    def where(self, reqid: str) -> str:
        """Where the record of reqid is kept, for messages (a file path; later a key)."""

    def get(self, reqid: str) -> Stored | None:
        """The stored record and its age, or None when absent (expired or not)."""

    def put(self, reqid: str, data: bytes, ttl_s: float) -> None:
        """Create or replace a record atomically."""

    def update(self, reqid: str, fn: Callable[[Stored | None], bytes | None],
               ttl_s: float) -> None:
        """Write fn(current) unless it is None, atomically; fn may run again on a retry."""

    def purge(self, max_age_s: float) -> int:
        """Delete records older than max_age_s (and dead writers' debris); return how many."""

    def recent(self, since: float, limit: int) -> list:
        """Reqids written since ``since`` (epoch), newest first, at most limit."""


class LockBackend(Protocol):
    """Where host+script locks live. Names and script are non-empty strings."""

    def prepare(self) -> None:
        """Create or check what the backend needs (StoreError when unusable)."""

    def key_of(self, name: str, script: str) -> str:
        """The key of a pair; pairs with one key are one lock."""

    def acquire(self, name: str, script: str) -> Lease | None:
        """Take the lock of a pair without waiting; None when someone holds it."""

    def release(self, lease: Lease) -> None:
        """Drop a lease (idempotent, never raises)."""

    def held(self) -> list:
        """[{"host", "script"}] of every lock currently held, by anyone, in any order."""


# --- public API: the facade ------------------------------------------------------------

class Registry:
    """Paired agents by registry name.

    Args: source: a state_dir (files: agents/<name>.json) or a RegistryBackend.
    Record: {"hostname", "ip", "port", "lookup_by": "ip"|"hostname", "paired",
    "expiry", "tags": {}, "dispatcher_serial", "serial_status", "serial" (the agent
    certificate's), "spki_sha256" (its public key's), "renewed"}.
    """

    def __init__(self, source: str | os.PathLike | RegistryBackend) -> None:
        self.backend = _backend_of(source, FileRegistryBackend)

    def get(self, name: str) -> dict | None:
        """Return the record of name, or None when it is not registered (or not a valid name).

        Raises:
            CorruptRecord: the stored record is not a JSON object.
        """
        if not valid_agent_name(name):
            return None
        stored = self.backend.get(name)
        return None if stored is None else self._decode(name, stored)

    def names(self) -> list:
        """Return every registered name, sorted (no record is parsed)."""
        return sorted(n for n in self.backend.names() if valid_agent_name(n))

    def list(self, tags: dict | None = None) -> list:
        """Return records (each with an added "name") whose tags match every given tag.

        Args:
            tags: {"role": "web"} -> only agents with tags.role == "web"; a list value
                means any of ({"role": ["web", "db"]}); None/{} -> all.
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
            if all(have.get(k) in v if isinstance(v, (list, tuple)) else have.get(k) == v
                   for k, v in (tags or {}).items()):
                out.append(dict(record, name=name))
        return out

    def put(self, name: str, record: dict) -> None:
        """Create or replace the record of name (atomic; files: 0644).

        Raises:
            StoreError: invalid name, record not a JSON-able dict, or the write failed.
        """
        self._check_name(name)
        if not isinstance(record, dict):
            raise StoreError("registry record for %r must be a dict, got %s"
                             % (name, type(record).__name__))
        self.backend.put(name, _encode(record, pretty=True, what=_registry_what(name)))

    def update(self, name: str, **fields: Any) -> dict:
        """Read-modify-write the record of name atomically; return the new record.

        Raises:
            StoreError: invalid or unregistered name, lock timeout, or the write failed.
            CorruptRecord: the stored record is unreadable.
        """
        self._check_name(name)
        result = [None]

        def apply(stored: Stored | None) -> bytes:
            if stored is None:
                # Never resurrect an agent unpaired meanwhile as a half-filled record.
                raise StoreError("agent %r is not registered; pair or enroll it first" % name)
            record = self._decode(name, stored)
            record.update(fields)
            result[0] = record
            return _encode(record, pretty=True, what=_registry_what(name))

        self.backend.update(name, apply)
        return result[0]

    def delete(self, name: str) -> bool:
        """Remove name from the registry; True if it was registered."""
        if not valid_agent_name(name):
            return False
        return self.backend.delete(name)

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

    def _resolve_one(self, entry: Any) -> Target:
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

    def _decode(self, name: str, stored: Stored) -> dict:
        """The record of a stored registry entry (CorruptRecord if unreadable)."""
        return _decode(stored.data, what=_registry_what(name), where=self.backend.where(name))

    def _check_name(self, name: str) -> None:
        """Raise StoreError unless name is a valid agent name."""
        if not valid_agent_name(name):
            raise StoreError("invalid agent name %r; accepted: a letter or digit first, then "
                             "letters, digits, '.', '_' or '-' (at most %d characters)"
                             % (name, MAX_AGENT_NAME_CHARS))


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
    """Run records by reqid, kept retention_s after their last write.

    Args: source: a state_dir (files: runs/<reqid>.json) or a RunBackend;
        retention_s: older records read as absent, and purge() deletes them.
    """

    def __init__(self, source: str | os.PathLike | RunBackend,
                 retention_s: int = RUN_RETENTION_S) -> None:
        self.backend = _backend_of(source, FileRunBackend)
        self.retention_s = retention_s

    def save(self, record: dict) -> None:
        """Store record under its "reqid" (atomic; files: 0640); secret fields are dropped.

        Raises:
            StoreError: reqid missing or not ^[A-Za-z0-9_-]{1,64}$, record not JSON-able,
                or the write failed.
        """
        if not isinstance(record, dict):
            raise StoreError("run record must be a dict, got %s" % type(record).__name__)
        reqid = self._check_reqid(record.get("reqid"))
        data = _encode(_scrub(record), pretty=False, what=_run_what(reqid))
        self.backend.put(reqid, data, self.retention_s)

    def load(self, reqid: str) -> dict | None:
        """Return the record of reqid, or None when absent or older than the retention.

        Raises:
            StoreError: reqid not ^[A-Za-z0-9_-]{1,64}$, or the record cannot be read.
            CorruptRecord: the stored record is not a JSON object.
        """
        reqid = self._check_reqid(reqid)
        return self._live(reqid, self.backend.get(reqid))

    def update(self, reqid: str, fn: Callable[[dict], dict]) -> dict | None:
        """Replace the record of reqid by fn(record), atomically against other writers.

        fn gets the stored record and returns the new one (same reqid); it may be called
        again when a backend retries after losing a race, so keep it free of side effects.
        Returns: the new record as stored (secrets dropped); None, fn not called, when
            the record is absent or older than the retention.
        Raises:
            StoreError: invalid reqid, fn returned a non-dict or another reqid, lock
                timeout, or the write failed (the record is then unchanged).
            CorruptRecord: the stored record is unreadable (fn not called).
        """
        reqid = self._check_reqid(reqid)
        result = [None]

        def apply(stored: Stored | None) -> bytes | None:
            result[0] = None
            record = self._live(reqid, stored)
            if record is None:
                return None
            new = fn(record)
            if not isinstance(new, dict):
                raise StoreError("update of run record %s returned %s, not a dict"
                                 % (reqid, type(new).__name__))
            if new.get("reqid") != reqid:
                raise StoreError("update of run record %s returned reqid %r; a run keeps its "
                                 "reqid" % (reqid, new.get("reqid")))
            result[0] = _scrub(new)
            return _encode(result[0], pretty=False, what=_run_what(reqid))

        self.backend.update(reqid, apply, self.retention_s)
        return result[0]

    def purge(self) -> int:
        """Delete records older than the retention; return how many records."""
        return self.backend.purge(self.retention_s)

    def recent(self, *, since: float = 0.0, limit: int = 1000) -> list:
        """The newest records (at most limit, written since ``since``), newest first;
        unreadable or expired ones are left out."""
        out = []
        for reqid in self.backend.recent(since, limit):
            if not RUN_REQID_RE.fullmatch(reqid):
                continue
            try:
                record = self.load(reqid)
            except CorruptRecord:
                continue
            if record is not None:
                out.append(record)
        return out

    def track_pending(self, reqid: str) -> None:
        """Note an async run as pending (shared backends: the reapers' work list)."""
        track = getattr(self.backend, "track", None)
        if track is not None:
            track(self._check_reqid(reqid))

    def untrack_pending(self, reqid: str) -> None:
        """The async run is complete: no reaper needs to look at it again."""
        untrack = getattr(self.backend, "untrack", None)
        if untrack is not None:
            untrack(self._check_reqid(reqid))

    def pending(self) -> list:
        """Reqids of async runs noted as pending, oldest first ([] for the file backend,
        whose single node refreshes its runs on /status)."""
        tracked = getattr(self.backend, "tracked", None)
        if tracked is None:
            return []
        return [r for r in tracked(self.retention_s) if RUN_REQID_RE.fullmatch(r)]

    # --- private ---

    def _check_reqid(self, reqid: Any) -> str:
        """reqid after the allow-regex (a reqid never becomes an arbitrary path or key)."""
        if not isinstance(reqid, str) or not RUN_REQID_RE.fullmatch(reqid):
            raise StoreError("invalid reqid %r; accepted: 1-64 letters, digits, '_' or '-'"
                             % (reqid if not isinstance(reqid, str) else reqid[:80],))
        return reqid

    def _live(self, reqid: str, stored: Stored | None) -> dict | None:
        """The record of a stored entry, None when absent or past the retention."""
        if stored is None or stored.age_s > self.retention_s:
            return None
        return _decode(stored.data, what=_run_what(reqid), where=self.backend.where(reqid))


class HeldLocks:
    """A set of host+script locks held together; a context manager releasing them on exit.

    Attributes: names, script, leases [Lease], fencing (the highest fencing number of
    the leases, for a lease backend's writers to refuse a stale holder; None for flocks).
    """

    def __init__(self, names: list, script: str, leases: list, backend: LockBackend) -> None:
        self.names = list(names)
        self.script = script
        self.leases = list(leases)
        numbers = [lease.fencing for lease in self.leases if lease.fencing is not None]
        self.fencing = max(numbers) if numbers else None
        self._backend = backend

    def release(self) -> None:
        """Release every lock (idempotent)."""
        leases, self.leases = self.leases, []
        _release_all(self._backend, leases)

    def __enter__(self) -> HeldLocks:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


class Locks:
    """Per host+script locks (files: flocks under locks/, instance-local, not for NFS).

    Args: source: a state_dir or a LockBackend.
    """

    def __init__(self, source: str | os.PathLike | LockBackend) -> None:
        self.backend = _backend_of(source, FileLockBackend)

    def hold(self, names: list, script: str) -> HeldLocks:
        """Take the locks of every (name, script) pair, all or nothing.

        Use as `with locks.hold(["web-01", "db-01"], "backup"): ...`. The locks stay
        held until the with block ends (success or exception); the kernel drops file
        locks if the process dies. Duplicate names (same key) are collapsed.
        Raises:
            LockConflict: .conflicts = the names already held (given order); nothing held.
            StoreError: a name or script is empty / not a string, or a lock cannot be taken.
        """
        if not isinstance(script, str) or not script:
            raise StoreError("lock script must be a non-empty string")
        if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
            raise StoreError("lock names must be a list of non-empty strings")
        wanted = {}
        for name in names:              # one key twice would conflict with itself
            wanted.setdefault(self.backend.key_of(name, script), name)
        leases, conflicts = [], []
        try:
            for name in wanted.values():
                lease = self.backend.acquire(name, script)
                if lease is None:
                    conflicts.append(name)
                else:
                    leases.append(lease)
        except BaseException:
            _release_all(self.backend, leases)      # never leave a partial set held
            raise
        if conflicts:
            _release_all(self.backend, leases)
            wire.log_action("info", "lock-conflict", SCRIPT=script, CONFLICTS=",".join(conflicts))
            raise LockConflict(conflicts, script)
        return HeldLocks(list(wanted.values()), script, leases, self.backend)

    def held(self) -> list:
        """Return [{"host", "script"}] for every lock currently held by anyone, sorted.

        File locks are probed with a brief shared flock, so a hold() racing with this
        call may see a spurious conflict; it is meant for operators (list-locks).
        """
        return sorted(self.backend.held(), key=lambda row: (row["host"], row["script"]))


class Store:
    """The state stores of one control host: .registry .runs .locks .events .nodes (no I/O).

    .backend names the state backend for messages ("files" or the Redis URL without
    its password); .blocking_writes tells whether writes block the thread (files).
    """

    def __init__(self, cfg: Any) -> None:
        registry, runs, locks, events, nodes = _select_backends(cfg)
        self.state_dir = cfg.state_dir
        self.backend = config_mod.redact_url(getattr(cfg, "state_backend", "files") or "files")
        #: Writes block the calling thread (files: fsync), so a gevent server should run
        #: them in its thread pool; Redis writes are cooperative and must stay on the hub.
        self.blocking_writes = self.backend == "files"
        self.registry = Registry(registry)
        self.runs = RunStore(runs, cfg.run_retention)
        self.locks = Locks(locks)
        self.events = RunEvents(events, cfg.run_retention)
        #: API node liveness (RedisNodeBackend), or None: one node, nothing to take over.
        self.nodes = nodes


def open_store(cfg: Any) -> Store:
    """Return the Store of cfg, its backends prepared (files: missing directories created;
    Redis: the server answers).

    Raises:
        StoreUnavailable: the Redis server cannot be reached.
        StoreError: the state cannot be used (e.g. state_dir not writable).
    """
    store = Store(cfg)
    try:
        for backend in (store.registry.backend, store.runs.backend, store.locks.backend,
                        store.events.backend):
            backend.prepare()
    except StoreUnavailable as exc:
        raise StoreUnavailable("state_backend %s: cannot connect (%s); start the server or "
                               "fix state_backend in ctrl-exec.conf" % (store.backend, exc)) from None
    except StoreError as exc:
        raise StoreError("state_dir %s is unusable: %s; set state_dir in ctrl-exec.conf to a "
                         "writable directory" % (cfg.state_dir, exc)) from None
    return store


# --- public API: file backends -----------------------------------------------------------

class _FileRecords:
    """Records as <state_dir>/<folder>/<key>.json: atomic replace, one flock for writers."""

    def __init__(self, state_dir: str | os.PathLike, folder: str, *, dir_mode: int,
                 file_mode: int, lock_name: str, label: str, what: Callable[[str], str]) -> None:
        self.state_dir = os.fspath(state_dir)
        self.dir = os.path.join(self.state_dir, folder)
        self._dir_mode = dir_mode
        self._file_mode = file_mode
        self._lock_name = lock_name
        self._label = label
        self._what = what

    def prepare(self) -> None:
        """Create state_dir and the folder if missing (modes: see the module docstring)."""
        _ensure_dir(self.state_dir, STATE_DIR_MODE)
        _ensure_dir(self.dir, self._dir_mode)

    def where(self, key: str) -> str:
        """The file of a (valid) key."""
        return os.path.join(self.dir, key + ".json")

    def get(self, key: str) -> Stored | None:
        """The file's bytes and age (from its mtime); None if absent; never follows a symlink."""
        try:
            fd = os.open(self.where(key), os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError("cannot read %s (%s)" % (self._what(key), exc.strerror)) from None
        try:
            with os.fdopen(fd, "rb") as fh:
                age_s = time.time() - os.fstat(fh.fileno()).st_mtime
                return Stored(fh.read(), age_s)
        except OSError as exc:
            raise StoreError("cannot read %s (%s)" % (self._what(key), exc.strerror)) from None

    def put(self, key: str, data: bytes, ttl_s: float | None = None) -> None:
        """Replace the file atomically, under the folder's flock (ttl_s: the mtime is the age)."""
        with self._locked():
            self._write(key, data)

    def update(self, key: str, fn: Callable[[Stored | None], bytes | None],
               ttl_s: float | None = None) -> None:
        """Under the folder's flock: write fn(current) unless it is None."""
        with self._locked():
            data = fn(self.get(key))
            if data is not None:
                self._write(key, data)

    # --- private ---

    def _listdir(self) -> list:
        """The folder's entries (os.scandir), [] when it does not exist yet."""
        try:
            with os.scandir(self.dir) as entries:
                return list(entries)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreError("cannot list %s %s (%s)"
                             % (self._label, self.dir, exc.strerror)) from None

    def _write(self, key: str, data: bytes) -> None:
        """Atomically write a record file."""
        try:
            wire.atomic_write(self.where(key), data, self._file_mode)
        except OSError as exc:
            raise StoreError("cannot write %s (%s)"
                             % (self._what(key), exc.strerror or exc)) from None

    def _locked(self) -> _FileLock:
        """Context manager holding the folder's lock file exclusively."""
        self.prepare()
        return _FileLock(os.path.join(self.dir, self._lock_name), STATE_LOCK_TIMEOUT_S,
                         self._label)


class FileRegistryBackend(_FileRecords):
    """RegistryBackend on files: agents/<name>.json 0644, writers serialised by .registry.lock."""

    #: Registry files read back from memory while their (inode, mtime, size) is unchanged.
    CACHE_MAX = 100000

    def __init__(self, state_dir: str | os.PathLike) -> None:
        super().__init__(state_dir, "agents", dir_mode=AGENTS_DIR_MODE,
                         file_mode=REGISTRY_FILE_MODE, lock_name=".registry.lock",
                         label="registry", what=_registry_what)
        self._cache: dict = {}

    def get(self, key: str) -> Stored | None:
        """As _FileRecords.get, but a file whose lstat is unchanged is not read again.

        Every writer replaces the file (new inode), so one lstat (a few microseconds)
        tells a fan-out over 1,000 names that nothing changed, instead of 1,000 reads.
        """
        try:
            st = os.lstat(self.where(key))
        except FileNotFoundError:
            self._cache.pop(key, None)
            return None
        except OSError as exc:
            raise StoreError("cannot read %s (%s)" % (self._what(key), exc.strerror)) from None
        signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._cache.get(key)
        if cached is not None and cached[0] == signature and stat.S_ISREG(st.st_mode):
            return Stored(cached[1], time.time() - st.st_mtime)
        stored = super().get(key)
        if stored is not None and stat.S_ISREG(st.st_mode):
            if len(self._cache) >= self.CACHE_MAX:
                self._cache.clear()
            self._cache[key] = (signature, stored.data)
        return stored

    def names(self) -> list:
        """Names of the *.json files (no parsing, no checking)."""
        return [e.name[:-5] for e in self._listdir() if e.name.endswith(".json")]

    def delete(self, name: str) -> bool:
        """Unlink the record under the registry lock; True if it existed."""
        with self._locked():
            try:
                os.unlink(self.where(name))
            except FileNotFoundError:
                return False
            except OSError as exc:
                raise StoreError("cannot delete %s (%s)"
                                 % (self._what(name), exc.strerror)) from None
        return True


class FileRunBackend(_FileRecords):
    """RunBackend on files: runs/<reqid>.json 0640, writers serialised by .update.lock."""

    def __init__(self, state_dir: str | os.PathLike) -> None:
        super().__init__(state_dir, "runs", dir_mode=RUNS_DIR_MODE, file_mode=RUN_FILE_MODE,
                         lock_name=".update.lock", label="run store", what=_run_what)

    def purge(self, max_age_s: float) -> int:
        """Unlink records (and dead writers' .tmp-* files) whose mtime is older; count records."""
        cutoff = time.time() - max_age_s
        count = 0
        for entry in self._listdir():
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

    def recent(self, since: float = 0.0, limit: int = 1000) -> list:
        """Reqids of records written since ``since`` (epoch), newest first (by mtime)."""
        found = []
        for entry in self._listdir():
            if not entry.name.endswith(".json"):
                continue
            try:
                written = entry.stat(follow_symlinks=False).st_mtime
            except OSError:
                continue
            if written >= since:
                found.append((written, entry.name[:-5]))
        found.sort(reverse=True)
        return [reqid for _, reqid in found[:limit]]


class FileLockBackend:
    """LockBackend on files: locks/<host>--<script>.lock 0660, one fcntl.flock per pair."""

    def __init__(self, state_dir: str | os.PathLike) -> None:
        self.state_dir = os.fspath(state_dir)
        self.dir = os.path.join(self.state_dir, "locks")

    def prepare(self) -> None:
        """Create state_dir and locks/ if missing."""
        _ensure_dir(self.state_dir, STATE_DIR_MODE)
        _ensure_dir(self.dir, LOCKS_DIR_MODE)

    def key_of(self, name: str, script: str) -> str:
        """The lock file name (_lock_key)."""
        return _lock_key(name, script)

    def acquire(self, name: str, script: str) -> Lease | None:
        """flock(LOCK_EX | LOCK_NB) the pair's file; None when another fd holds it."""
        self.prepare()
        key = self.key_of(name, script)
        fd = _open_lock_file(os.path.join(self.dir, key))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreError("cannot lock %s (%s)" % (key, exc.strerror)) from None
            return None
        return Lease(key, name, script, fd, None)

    def release(self, lease: Lease) -> None:
        """Close the fd, which releases the flock."""
        try:
            os.close(lease.handle)
        except OSError:
            pass                # already closed: the lock is gone either way

    def held(self) -> list:
        """[{"host", "script"}] (names as in the file names) of the files someone flocks."""
        try:
            entries = os.listdir(self.dir)
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


# --- public API: live events of runs -----------------------------------------------------

class RunEvents:
    """The live events of runs by reqid, each with an id that orders it (resume after an id).

    A run's events (start, stdout, stderr, exit, done) are appended by the node running it
    and read by any node: after=None reads from the first, after=<id> from the next one,
    so a follower that reconnects with the last id it saw gets no gap and no duplicate.
    The meta of a run (script, hosts, submitter, deadline) is kept beside its events so a
    follower can be authorised before the run has a record. Secrets are scrubbed here.

    Args: backend (MemoryEventBackend or RedisEventBackend); retention_s (events are kept
        as long as run records).
    """

    def __init__(self, backend: Any, retention_s: int = RUN_RETENTION_S) -> None:
        self.backend = backend
        self.retention_s = retention_s

    def open(self, reqid: str, meta: dict) -> None:
        """Start the event log of reqid with its meta (replacing nothing that exists)."""
        self.backend.open(_check_event_reqid(reqid), _scrub(dict(meta)), self.retention_s)

    def meta(self, reqid: str) -> dict | None:
        """The meta given to open() (plus "cancelled": true once mark_cancelled ran), or
        None when the run has no event log (or it expired)."""
        return self.backend.meta(_check_event_reqid(reqid))

    def mark_cancelled(self, reqid: str) -> None:
        """Note in the run's meta that it was cancelled (the dispatching node starts no
        further host, wherever the cancel came from)."""
        self.backend.mark_cancelled(_check_event_reqid(reqid))

    def append(self, reqid: str, events: list) -> list:
        """Append events (in order) to the log of reqid; return their ids."""
        if not events:
            return []
        return self.backend.append(_check_event_reqid(reqid), [_scrub(e) for e in events],
                                   self.retention_s)

    def read(self, reqid: str, after: str | None = None, *, wait_s: float = 0.0) -> list:
        """[(id, event)] after ``after`` (None: from the first), oldest first.

        With wait_s > 0 and nothing new, waits up to wait_s for the next events (the
        node's one reader does the waiting; a follower holds no connection meanwhile).
        Raises: StoreError for an after that is not an event id.
        """
        if after is not None and (not isinstance(after, str) or not EVENT_ID_RE.fullmatch(after)):
            raise StoreError("invalid event id %r; accepted: <milliseconds>-<sequence> as "
                             "given in an event's \"id\"" % (str(after)[:40],))
        reqid = _check_event_reqid(reqid)
        got = self.backend.read(reqid, after)
        if got or wait_s <= 0:
            return got
        self.backend.wait(reqid, after, wait_s)
        return self.backend.read(reqid, after)


class MemoryEventBackend:
    """Events in this process's memory (files backend: one node). The newest
    MEMORY_EVENT_RUNS runs are kept; ids are "<sequence>-0", increasing per run."""

    def __init__(self) -> None:
        self._runs: collections.OrderedDict = collections.OrderedDict()
        self._changed: dict = {}

    def prepare(self) -> None:
        """Nothing to prepare."""

    def open(self, reqid: str, meta: dict, ttl_s: float) -> None:
        if reqid not in self._runs:
            self._runs[reqid] = {"meta": meta, "events": [], "next": 1}
            while len(self._runs) > MEMORY_EVENT_RUNS:
                old, _ = self._runs.popitem(last=False)
                self._changed.pop(old, None)

    def meta(self, reqid: str) -> dict | None:
        run = self._runs.get(reqid)
        return None if run is None else dict(run["meta"])

    def mark_cancelled(self, reqid: str) -> None:
        run = self._runs.get(reqid)
        if run is not None:
            run["meta"]["cancelled"] = True

    def append(self, reqid: str, events: list, ttl_s: float) -> list:
        run = self._runs.get(reqid)
        if run is None:
            self.open(reqid, {}, ttl_s)
            run = self._runs[reqid]
        ids = []
        for event in events:
            event_id = "%d-0" % run["next"]
            run["next"] += 1
            run["events"].append((event_id, event))
            ids.append(event_id)
        del run["events"][:-EVENTS_PER_RUN_MAX]
        changed = self._changed.pop(reqid, None)
        if changed is not None:
            changed.set()
        return ids

    def read(self, reqid: str, after: str | None) -> list:
        run = self._runs.get(reqid)
        if run is None:
            return []
        start = 0 if after is None else int(after.split("-", 1)[0])
        return [(event_id, dict(event)) for event_id, event in run["events"]
                if int(event_id.split("-", 1)[0]) > start]

    def wait(self, reqid: str, after: str | None, wait_s: float) -> None:
        changed = self._changed.setdefault(reqid, _gevent().event.Event())
        changed.wait(wait_s)


# --- public API: Redis backends ------------------------------------------------------------

class RedisClient:
    """One Redis connection pool for a process, safe under gevent, with errors translated.

    redis-py's BlockingConnectionPool with a gevent queue: a greenlet waiting for a free
    connection yields instead of blocking the hub. Every command runs through call(),
    which turns an unreachable server into StoreUnavailable and any other Redis error into
    StoreError, naming the server without its password.

    Args: url (redis:// or rediss://, optionally with a password); ca (CA file for rediss).
    """

    def __init__(self, url: str, *, ca: str | None = None,
                 socket_timeout_s: float = REDIS_SOCKET_TIMEOUT_S) -> None:
        import redis                  # only a Redis-backed control host needs redis-py
        self._redis = redis
        self.shown = config_mod.redact_url(url)
        options = {"max_connections": REDIS_POOL_SIZE, "timeout": REDIS_POOL_WAIT_S,
                   "queue_class": _gevent().queue.LifoQueue, "socket_timeout": socket_timeout_s,
                   "socket_connect_timeout": REDIS_CONNECT_TIMEOUT_S,
                   "health_check_interval": 30}
        if url.lower().startswith("rediss://") and ca:
            options["ssl_ca_certs"] = ca
        self.pool = redis.BlockingConnectionPool.from_url(url, **options)
        self.redis = redis.Redis(connection_pool=self.pool)
        self.WatchError = redis.WatchError

    def call(self, func: Callable, *args: Any, **kwargs: Any) -> Any:
        """func(*args, **kwargs) with Redis errors turned into StoreUnavailable / StoreError."""
        try:
            return func(*args, **kwargs)
        except (self._redis.ConnectionError, self._redis.TimeoutError) as exc:
            raise StoreUnavailable("the state backend %s is unreachable (%s); requests that "
                                   "need state fail until it is back"
                                   % (self.shown, _one_line(exc))) from None
        except self._redis.WatchError:
            raise
        except self._redis.RedisError as exc:
            raise StoreError("the state backend %s refused a command (%s)"
                             % (self.shown, _one_line(exc))) from None

    def ping(self) -> None:
        """Check the server answers (StoreUnavailable / StoreError otherwise)."""
        self.call(self.redis.ping)

    def close(self) -> None:
        """Drop every pooled connection."""
        self.pool.disconnect()


class RedisRunBackend:
    """RunBackend on Redis: one hash per record (data, written) with a TTL, and a time
    index (sorted set reqid -> written) for purges and listings. Updates are optimistic
    transactions (WATCH / MULTI): a lost race is retried, never a lost update."""

    def __init__(self, client: RedisClient, prefix: str = REDIS_PREFIX) -> None:
        self.client = client
        self.prefix = prefix
        self.index = prefix + "runs"

    def prepare(self) -> None:
        self.client.ping()

    def where(self, reqid: str) -> str:
        return "%s key %srun:%s" % (self.client.shown, self.prefix, reqid)

    def get(self, reqid: str) -> Stored | None:
        data, written = self.client.call(self.client.redis.hmget, self._key(reqid),
                                         ["data", "written"])
        return None if data is None else Stored(data, _age(written))

    def put(self, reqid: str, data: bytes, ttl_s: float) -> None:
        pipe = self.client.redis.pipeline(transaction=True)
        self._write(pipe, reqid, data, ttl_s)
        self.client.call(pipe.execute)

    def update(self, reqid: str, fn: Callable[[Stored | None], bytes | None],
               ttl_s: float) -> None:
        key = self._key(reqid)
        for _attempt in range(REDIS_UPDATE_RETRIES):
            with self.client.redis.pipeline(transaction=True) as pipe:
                try:
                    self.client.call(pipe.watch, key)
                    data, written = self.client.call(pipe.hmget, key, ["data", "written"])
                    new = fn(None if data is None else Stored(data, _age(written)))
                    if new is None:
                        return
                    pipe.multi()
                    self._write(pipe, reqid, new, ttl_s)
                    self.client.call(pipe.execute)
                    return
                except self.client.WatchError:
                    _gevent().sleep(0.001 * (1 + _attempt % 10))
        raise StoreError("run record %s kept changing under %d concurrent updates; try again"
                         % (reqid, REDIS_UPDATE_RETRIES))

    def purge(self, max_age_s: float) -> int:
        """Drop index entries (and any record left) older than max_age_s; TTLs do the rest."""
        cutoff = time.time() - max_age_s
        old = self.client.call(self.client.redis.zrangebyscore, self.index, "-inf", cutoff)
        if not old:
            return 0
        reqids = [r.decode() if isinstance(r, bytes) else r for r in old]
        pipe = self.client.redis.pipeline(transaction=False)
        pipe.delete(*[self._key(r) for r in reqids])
        pipe.zrem(self.index, *reqids)
        self.client.call(pipe.execute)
        return len(reqids)

    def recent(self, since: float = 0.0, limit: int = 1000) -> list:
        """Reqids written since ``since`` (epoch), newest first (the time index)."""
        got = self.client.call(self.client.redis.zrevrangebyscore, self.index, "+inf", since,
                               start=0, num=limit)
        return [r.decode() if isinstance(r, bytes) else r for r in got]

    def track(self, reqid: str) -> None:
        self.client.call(self.client.redis.zadd, self.prefix + "async-pending",
                         {reqid: time.time()})

    def untrack(self, reqid: str) -> None:
        self.client.call(self.client.redis.zrem, self.prefix + "async-pending", reqid)

    def tracked(self, max_age_s: float) -> list:
        key = self.prefix + "async-pending"
        pipe = self.client.redis.pipeline(transaction=False)
        pipe.zremrangebyscore(key, "-inf", time.time() - max_age_s)
        pipe.zrange(key, 0, -1)
        return [_text(r) for r in self.client.call(pipe.execute)[1]]

    def _key(self, reqid: str) -> str:
        return "%srun:%s" % (self.prefix, reqid)

    def _write(self, pipe: Any, reqid: str, data: bytes, ttl_s: float) -> None:
        now = time.time()
        key = self._key(reqid)
        pipe.hset(key, mapping={"data": data, "written": repr(now)})
        pipe.pexpire(key, max(1, int(ttl_s * 1000)))
        pipe.zadd(self.index, {reqid: now})


#: KEYS[1] lock, KEYS[2] fencing counter; ARGV[1] owner token, ARGV[2] lease ms.
#: Returns the grant's fencing number, or 0 when the lock is held.
_LOCK_ACQUIRE = """
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('incr', KEYS[2])
end
return 0
"""
#: Renew (ARGV[2] = lease ms) or delete (no ARGV[2]) only while we still own the lock.
_LOCK_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_LOCK_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class RedisLockBackend:
    """LockBackend on Redis: leases. A lock is SET NX PX with an owner token; one greenlet
    per process renews every lease it holds each lease/3; release is compare-and-delete.
    A node that dies stops renewing, so its locks lapse within lease_s. Every grant takes
    the next number of one counter (the fencing number, recorded with the run)."""

    def __init__(self, client: RedisClient, lease_s: float = 30.0,
                 prefix: str = REDIS_PREFIX) -> None:
        self.client = client
        self.lease_ms = max(100, int(lease_s * 1000))
        self.prefix = prefix
        self.fence_key = prefix + "fence"
        self._owned: dict = {}
        self._renewer: Any = None
        self._acquire = client.redis.register_script(_LOCK_ACQUIRE)
        self._renew = client.redis.register_script(_LOCK_RENEW)
        self._release = client.redis.register_script(_LOCK_RELEASE)

    def prepare(self) -> None:
        self.client.ping()

    def key_of(self, name: str, script: str) -> str:
        return _lock_key(name, script)

    def acquire(self, name: str, script: str) -> Lease | None:
        key = self.key_of(name, script)
        token = secrets.token_hex(16)
        fencing = int(self.client.call(self._acquire, keys=[self._key(key), self.fence_key],
                                       args=[token, self.lease_ms]))
        if not fencing:
            return None
        self._owned[token] = key
        if self._renewer is None or self._renewer.dead:
            self._renewer = _gevent().spawn(self._renew_forever)
        return Lease(key, name, script, token, fencing)

    def release(self, lease: Lease) -> None:
        if self._owned.pop(lease.handle, None) is None:
            return
        try:
            self.client.call(self._release, keys=[self._key(lease.key)], args=[lease.handle])
        except StoreError as exc:
            # The lease lapses by itself within lease_ms; say so instead of raising.
            wire.log_action("warning", "lock-release-fail", LOCK=lease.key, ERROR=str(exc))

    def held(self) -> list:
        pattern = self._key("*")
        out = []
        for raw in self.client.call(lambda: list(self.client.redis.scan_iter(pattern, count=500))):
            fname = (raw.decode() if isinstance(raw, bytes) else raw)[len(self._key("")):]
            host, _, script = fname[:-5].rpartition("--")
            out.append({"host": host, "script": script})
        return out

    def _key(self, key: str) -> str:
        return "%slock:%s" % (self.prefix, key)

    def _renew_forever(self) -> None:
        """Renew every owned lease each lease/3 until none is left."""
        while self._owned:
            _gevent().sleep(self.lease_ms / 3000.0)
            for token, key in list(self._owned.items()):
                try:
                    kept = self.client.call(self._renew, keys=[self._key(key)],
                                            args=[token, self.lease_ms])
                except StoreError as exc:
                    wire.log_action("warning", "lock-renew-fail", LOCK=key, ERROR=str(exc))
                    continue
                if not kept and self._owned.pop(token, None) is not None:
                    wire.log_action("err", "lock-lost", LOCK=key,
                                    DETAIL="the lease lapsed before it was renewed")


class RedisNodeBackend:
    """Which API nodes are alive: each node renews ctrlexec:node:<id> (a lease) while it
    runs; a node whose key lapsed has stopped, and its async runs are taken over."""

    def __init__(self, client: RedisClient, lease_s: float = 30.0,
                 prefix: str = REDIS_PREFIX) -> None:
        self.client = client
        self.lease_ms = max(100, int(lease_s * 1000))
        self.prefix = prefix

    def beat(self, node: str) -> None:
        """Renew this node's lease."""
        self.client.call(self.client.redis.set, self._key(node), "1", px=self.lease_ms)

    def alive(self, node: str) -> bool:
        """True while node's lease has not lapsed."""
        return bool(self.client.call(self.client.redis.exists, self._key(node)))

    def forget(self, node: str) -> None:
        """A graceful stop: the others may take this node's runs over at once."""
        self.client.call(self.client.redis.delete, self._key(node))

    def _key(self, node: str) -> str:
        return "%snode:%s" % (self.prefix, node)


class RedisEventBackend:
    """Events in Redis Streams (one per run, ids from Redis), meta in a hash, both with
    the run TTL. One reader greenlet per process blocks in XREAD on the streams its local
    followers wait on and wakes them; a follower holds no Redis connection while waiting."""

    def __init__(self, client: RedisClient, reader: RedisClient,
                 prefix: str = REDIS_PREFIX) -> None:
        self.client = client
        self.reader = reader
        self.prefix = prefix
        self._waiting: dict = {}          # reqid -> {"after": id, "events": [Event]}
        self._reader_greenlet: Any = None

    def prepare(self) -> None:
        self.client.ping()

    def open(self, reqid: str, meta: dict, ttl_s: float) -> None:
        key = self._meta_key(reqid)
        pipe = self.client.redis.pipeline(transaction=True)
        pipe.hsetnx(key, "meta", ujson.dumps(meta))
        pipe.pexpire(key, max(1, int(ttl_s * 1000)))
        self.client.call(pipe.execute)

    def meta(self, reqid: str) -> dict | None:
        raw, cancelled = self.client.call(self.client.redis.hmget, self._meta_key(reqid),
                                          ["meta", "cancelled"])
        if raw is None:
            return None
        try:
            meta = ujson.loads(raw)
        except ValueError:
            return None
        if not isinstance(meta, dict):
            return None
        if cancelled:
            meta["cancelled"] = True
        return meta

    def mark_cancelled(self, reqid: str) -> None:
        self.client.call(self.client.redis.hset, self._meta_key(reqid), "cancelled", "1")

    def append(self, reqid: str, events: list, ttl_s: float) -> list:
        key = self._stream_key(reqid)
        pipe = self.client.redis.pipeline(transaction=True)
        for event in events:
            pipe.xadd(key, {"e": ujson.dumps(event, ensure_ascii=False)},
                      maxlen=EVENTS_PER_RUN_MAX, approximate=True)
        pipe.pexpire(key, max(1, int(ttl_s * 1000)))
        got = self.client.call(pipe.execute)
        return [_text(event_id) for event_id in got[:-1]]

    def read(self, reqid: str, after: str | None) -> list:
        low = "-" if after is None else "(" + after
        got = self.client.call(self.client.redis.xrange, self._stream_key(reqid), low, "+")
        return [(_text(event_id), _event_of(fields)) for event_id, fields in got]

    def wait(self, reqid: str, after: str | None, wait_s: float) -> None:
        entry = self._waiting.setdefault(reqid, {"after": after or "0-0", "events": []})
        if _id_key(after or "0-0") < _id_key(entry["after"]):
            entry["after"] = after or "0-0"
        woken = _gevent().event.Event()
        entry["events"].append(woken)
        if self._reader_greenlet is None or self._reader_greenlet.dead:
            self._reader_greenlet = _gevent().spawn(self._read_forever)
        try:
            woken.wait(wait_s)
        finally:
            waiting = self._waiting.get(reqid)
            if waiting is not None and woken in waiting["events"]:
                waiting["events"].remove(woken)
                if not waiting["events"]:
                    del self._waiting[reqid]

    def _read_forever(self) -> None:
        """The node's one reader: XREAD BLOCK over every stream a local follower waits on."""
        while self._waiting:
            streams = {self._stream_key(reqid): entry["after"]
                       for reqid, entry in self._waiting.items()}
            try:
                got = self.reader.call(self.reader.redis.xread, streams,
                                       block=EVENT_READ_BLOCK_MS, count=1)
            except StoreError:
                _gevent().sleep(EVENT_READ_BLOCK_MS / 1000.0)
                continue
            for stream, _entries in got or []:
                reqid = _text(stream)[len(self._stream_key("")):]
                entry = self._waiting.pop(reqid, None)
                for woken in (entry or {}).get("events", []):
                    woken.set()

    def _stream_key(self, reqid: str) -> str:
        return "%sevents:%s" % (self.prefix, reqid)

    def _meta_key(self, reqid: str) -> str:
        return "%sevents-meta:%s" % (self.prefix, reqid)


# --- private ---------------------------------------------------------------------------

def _select_backends(cfg: Any) -> tuple:
    """(registry, runs, locks, events, nodes) backends of cfg's state_backend; no I/O.

    "files" (the default): everything under state_dir, events in this process's memory.
    "redis://..." / "rediss://...": runs, locks and events in Redis; the registry stays
    under state_dir (written by pairing on the control host, read by every node).
    """
    backend = getattr(cfg, "state_backend", "files") or "files"
    registry = FileRegistryBackend(cfg.state_dir)
    if backend == "files":
        return (registry, FileRunBackend(cfg.state_dir), FileLockBackend(cfg.state_dir),
                MemoryEventBackend(), None)
    ca = getattr(cfg, "state_backend_ca", None)
    client = RedisClient(backend, ca=ca)
    # The event reader blocks in XREAD: its own connection with a longer deadline.
    reader = RedisClient(backend, ca=ca,
                         socket_timeout_s=REDIS_SOCKET_TIMEOUT_S + EVENT_READ_BLOCK_MS / 1000.0)
    lease_s = float(getattr(cfg, "lock_lease", 30.0))
    return (registry, RedisRunBackend(client), RedisLockBackend(client, lease_s),
            RedisEventBackend(client, reader), RedisNodeBackend(client, lease_s))


def _backend_of(source: Any, file_backend: type) -> Any:
    """A facade's backend: source itself, or the file backend of a state_dir path."""
    if isinstance(source, (str, os.PathLike)):
        return file_backend(source)
    return source


def _release_all(backend: LockBackend, leases: list) -> None:
    """Release leases, releasing them all even if one misbehaves."""
    while leases:
        backend.release(leases.pop())


class _FileLock:
    """Exclusive flock on a file, polled non-blocking so gevent hubs never stall."""

    def __init__(self, path: str, timeout_s: float, label: str) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.label = label
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
                    raise StoreError("%s is busy: %s still locked after %gs; retry"
                                     % (self.label, self.path, self.timeout_s)) from None
                time.sleep(STATE_LOCK_POLL_S)       # patched under gevent: yields

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


def _registry_what(name: str) -> str:
    """How messages name a registry record."""
    return "registry record for %r" % name


def _run_what(reqid: str) -> str:
    """How messages name a run record."""
    return "run record %s" % reqid


def _decode(data: bytes, *, what: str, where: str) -> dict:
    """Parse a stored record; CorruptRecord (path=where) unless it is a JSON object."""
    try:
        obj = ujson.loads(data)
    except (ValueError, OverflowError) as exc:
        raise CorruptRecord("%s is corrupt: not valid JSON (%s)" % (what, exc),
                            path=where) from None
    if not isinstance(obj, dict):
        raise CorruptRecord("%s is corrupt: expected a JSON object, got %s"
                            % (what, type(obj).__name__), path=where)
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


def _scrub(obj: Any) -> Any:
    """Copy obj without any dict key named like a secret (at any depth)."""
    if isinstance(obj, dict):
        return {k: _scrub(v) for k, v in obj.items()
                if not (isinstance(k, str) and k.lower() in SECRET_FIELDS)}
    if isinstance(obj, (list, tuple)):
        return [_scrub(v) for v in obj]
    return obj


def _valid_port(value: Any) -> int | None:
    """value as a port 1-65535, or None."""
    try:
        port = int(value)
    except (TypeError, ValueError):
        return None
    return port if 1 <= port <= 65535 else None


def _lock_key(name: str, script: str) -> str:
    """The key of a host+script pair: "<host>--<script>.lock", unsafe characters -> '_',
    long names hashed to fit NAME_MAX (a file name and a Redis key alike)."""
    host = _LOCK_UNSAFE_RE.sub("_", name)
    safe_script = _LOCK_UNSAFE_RE.sub("_", script)
    fname = "%s--%s.lock" % (host, safe_script)
    if len(fname.encode()) > MAX_FILENAME_BYTES:
        host = host[:80] + "~" + hashlib.sha256(name.encode()).hexdigest()[:16]
        safe_script = safe_script[:80] + "~" + hashlib.sha256(script.encode()).hexdigest()[:16]
        fname = "%s--%s.lock" % (host, safe_script)
    return fname


def _check_event_reqid(reqid: Any) -> str:
    """A reqid for the event log, after the run store's allow-regex."""
    if not isinstance(reqid, str) or not RUN_REQID_RE.fullmatch(reqid):
        raise StoreError("invalid reqid %r; accepted: 1-64 letters, digits, '_' or '-'"
                         % (reqid if not isinstance(reqid, str) else reqid[:80],))
    return reqid


def _age(written: Any) -> float:
    """Seconds since a Redis record's "written" epoch (0 when unreadable: kept, not lost)."""
    try:
        return max(0.0, time.time() - float(written))
    except (TypeError, ValueError):
        return 0.0


def _text(value: Any) -> str:
    """A Redis reply as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _event_of(fields: dict) -> dict:
    """The event stored in a stream entry."""
    raw = fields.get(b"e", fields.get("e"))
    try:
        event = ujson.loads(raw)
    except (TypeError, ValueError):
        return {"event": "error", "error": "unreadable event"}
    return event if isinstance(event, dict) else {"event": "error", "error": "unreadable event"}


def _id_key(event_id: str) -> tuple:
    """An event id as a sortable (milliseconds, sequence)."""
    ms, _, seq = event_id.partition("-")
    return int(ms or 0), int(seq or 0)


def _one_line(exc: BaseException) -> str:
    """An exception's text on one line, without a URL's password."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return re.sub(r"://([^:/@]*):[^@/]*@", r"://\1:***@", text)


def _gevent() -> Any:
    """gevent, imported on first use: the file backends (and pairing, demo) never need it."""
    import gevent
    import gevent.event
    import gevent.queue
    return gevent
