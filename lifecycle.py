"""Certificate lifecycle on the control host: agent renewal, dispatcher rotation, revocation.

Owns:
- renewal of agent certificates over their existing mTLS link (reference §4.5):
  ``engine.renew_all`` asks each agent for a CSR from its own key, this module
  signs it (CN bound to the registry name, refused for a revoked serial or key)
  and records the new expiry and serial in the registry;
- rotation of the dispatcher certificate with overlap (reference §4.6), state in
  ``<state_dir>/rotation.json``: the next certificate is issued beside the live
  one, its serial is pushed to every agent's trust map with the *old* certificate
  (the only one agents trust yet), the files are switched (running API nodes pick
  the new pair up by themselves), then the old serial is retired with the *new*
  certificate. Agents not reached stay ``pending`` and are brought over by the next
  ``rotate-dispatcher``, which keeps the previous key only until none is left;
- the revocation list ``<state_dir>/revoked.json``: agent serials and public keys
  that renewal and pairing refuse;
- days-to-expiry arithmetic for ping, discovery and the CLI's warning.

Never does: dial agents itself (engine.py), touch ``agents/`` files (store.Registry),
log or return key material, or keep the previous dispatcher key once no agent needs it.
"""
from __future__ import annotations

__all__ = [
    "LifecycleError", "RevocationList", "WARN_DAYS", "days_left", "renewal_due",
    "check_not_revoked", "renew", "rotate_dispatcher",
    "rotation_state", "revoke",
]

import calendar
import contextlib
import fcntl
import os
import shutil
import time
from typing import Any, Callable, Iterator, Optional

import ujson

import ctrlexec_agent as wire
import pki
import store

#: The CLI warns about certificates that expire within this many days.
WARN_DAYS = 30
ROTATION_FILE = "rotation.json"
REVOKED_FILE = "revoked.json"
#: Suffixes of the dispatcher files during a rotation (beside cfg.cert / cfg.key).
NEXT_SUFFIX = ".next"
PREVIOUS_SUFFIX = ".previous"
#: Seconds between switching the dispatcher files and retiring the old serial.
SWITCH_GRACE_S = 1.0


class LifecycleError(Exception):
    """A lifecycle step cannot be done; str() says what was wrong and what to do."""


# --- expiry arithmetic -------------------------------------------------------------

def days_left(expiry: Any, *, now: Optional[float] = None) -> Optional[int]:
    """Whole days from now until an openssl notAfter ("Jun  7 16:28:00 2027 GMT");
    negative once expired; None when the text is not such a date."""
    try:
        when = calendar.timegm(time.strptime(" ".join(str(expiry).split()), "%b %d %H:%M:%S %Y GMT"))
    except (ValueError, TypeError):
        return None
    return int((when - (time.time() if now is None else now)) // 86400)


def renewal_due(row: dict, threshold_days: int) -> bool:
    """True for a ping row of an agent whose certificate has fewer than threshold_days left
    (and no renewed certificate waiting to be adopted)."""
    left = days_left(row.get("expiry"))
    return (threshold_days > 0 and row.get("status") == "ok" and not row.get("staged")
            and left is not None and left < threshold_days)


# --- revocation ----------------------------------------------------------------------

class RevocationList:
    """Revoked agents: ``<state_dir>/revoked.json``, a list of
    {name, serial, spki_sha256, expiry, revoked_at}; written atomically under a lock."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, REVOKED_FILE)

    def entries(self) -> list:
        """Every revocation entry (an unreadable file is an error: revocation fails closed)."""
        try:
            with open(self.path, "rb") as handle:
                data = ujson.loads(handle.read() or b"[]")
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise LifecycleError("revocation list %s is unreadable (%s); fix or restore it - "
                                 "renewal and pairing are refused until then" % (self.path, exc))
        if not isinstance(data, list):
            raise LifecycleError("revocation list %s is not a JSON array; fix or restore it"
                                 % self.path)
        return [entry for entry in data if isinstance(entry, dict)]

    def match(self, *, serial: str = "", spki: str = "") -> Optional[dict]:
        """The entry revoking this serial or public key, or None."""
        serial = wire.canonical_serial(serial) if serial else ""
        for entry in self.entries():
            if (serial and entry.get("serial") == serial) or (spki and entry.get("spki_sha256") == spki):
                return entry
        return None

    def add(self, entry: dict) -> None:
        """Append one entry (atomic replace of the whole file, 0644)."""
        with _locked(self.path):
            entries = self.entries()
            entries.append(entry)
            wire.atomic_write(self.path, ujson.dumps(entries, indent=2).encode() + b"\n", 0o644,
                              sync_dir=True)


def revoke(cfg: Any, registry: Any, name: str, *, peer_serial: str = "") -> dict:
    """Revoke agent ``name``: record its serial and key as revoked, remove it from the registry.

    Args: peer_serial — the serial the agent presents now (from a ping), used when the
    registry record predates serial tracking.
    Returns: the revocation entry {name, serial, spki_sha256, expiry, revoked_at}.
    Raises: LifecycleError when name is not registered.
    """
    try:
        record = registry.get(name)
    except store.CorruptRecord:
        record = {}
    if record is None:
        raise LifecycleError("no agent named %s (see `ctrlexec.py list-agents`)" % name)
    entry = {"name": name, "serial": wire.canonical_serial(record.get("serial") or peer_serial or ""),
             "spki_sha256": str(record.get("spki_sha256") or ""),
             "expiry": str(record.get("expiry") or ""), "revoked_at": wire.utc_timestamp()}
    RevocationList(cfg.state_dir).add(entry)
    registry.delete(name)
    wire.log_action("info", "revoke", agent=name, serial=entry["serial"] or "(unknown)",
                    expiry=entry["expiry"] or "(unknown)")
    return entry


def check_not_revoked(cfg: Any, *, serial: str = "", public_key: Any = None) -> None:
    """Raise LifecycleError when the serial or public key is on the revocation list."""
    spki = pki.spki_sha256(public_key) if public_key is not None else ""
    entry = RevocationList(cfg.state_dir).match(serial=serial, spki=spki)
    if entry is not None:
        raise LifecycleError("certificate of %s (serial %s) was revoked at %s; a revoked key is "
                             "never signed again - the agent must pair with a new key"
                             % (entry.get("name") or "?", entry.get("serial") or "?",
                                entry.get("revoked_at") or "?"))


# --- renewal ---------------------------------------------------------------------------

def renew(cfg: Any, registry: Any, engine: Any, names: list) -> list:
    """Renew the certificates of registered agents over mTLS; records the new expiry/serial.

    Returns: engine.renew_all rows in request order ({host, status:"renewed", expiry,
    serial, reqid, rtt} or {host, status:"error", error, ...}); unknown names get an
    error row and are never dialled.
    Raises: LifecycleError when the CA cannot be read.
    """
    try:
        ca_pem = pki.read_ca_cert(cfg.ca_dir).decode("ascii")
    except pki.PKIError as exc:
        raise LifecycleError(str(exc)) from None
    issued: dict = {}

    def sign(target: Any, csr_pem: str, agent_serial: str) -> bytes:
        csr = pki.check_csr(csr_pem)
        check_not_revoked(cfg, serial=agent_serial, public_key=csr.public_key())
        cert_pem = pki.sign_csr(cfg.ca_dir, csr_pem, days=cfg.cert_days,
                                expected_cn=target.name[:64])
        issued[target.name] = (cert_pem, pki.spki_sha256(csr.public_key()))
        return cert_pem

    targets = registry.resolve(names)
    rows = engine.renew_all(targets, sign=sign, ca_pem=ca_pem)
    for target, row in zip(targets, rows):
        if row.get("status") != "renewed" or target.name not in issued:
            continue
        cert_pem, spki = issued[target.name]
        row["serial"] = pki.cert_serial(cert_pem)
        row["expiry"] = row.get("expiry") or pki.cert_expiry(cert_pem)
        row["days_left"] = days_left(row["expiry"])
        try:
            registry.update(target.name, expiry=pki.cert_expiry(cert_pem), serial=row["serial"],
                            spki_sha256=spki, renewed=wire.utc_timestamp())
        except store.StoreError as exc:
            row["warning"] = "renewed, but the registry was not updated: %s" % exc
        wire.log_action("info", "renew-complete", agent=target.name, serial=row["serial"],
                        expiry=row["expiry"], reqid=row.get("reqid", ""))
    return rows


# --- dispatcher rotation ----------------------------------------------------------------

def rotation_state(cfg: Any) -> dict:
    """The stored rotation state ({} when no rotation ever ran)."""
    path = os.path.join(cfg.state_dir, ROTATION_FILE)
    try:
        with open(path, "rb") as handle:
            state = ujson.loads(handle.read())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise LifecycleError("rotation state %s is unreadable (%s); restore it, or remove it "
                             "only if no rotation is in progress" % (path, exc))
    return state if isinstance(state, dict) else {}


def rotate_dispatcher(cfg: Any, registry: Any, make_engine: Callable, *,
                      finish: bool = False) -> dict:
    """Rotate the dispatcher certificate, or continue a rotation that left agents behind.

    Args: make_engine(cert, key) -> engine.Engine presenting that certificate;
    finish: give up on agents still pending (marked "stale": they need re-pairing)
    and delete the previous key; implied once cert_overlap_days have passed.
    Returns: {"phase": "done"|"pending", "old_serial", "new_serial", "updated": [names],
    "pending": [{"host", "error"}], "stale": [names], "started": bool}.
    Raises: LifecycleError (no CA, no dispatcher certificate, unreadable state).
    """
    with _locked(os.path.join(cfg.state_dir, ROTATION_FILE)):
        state = rotation_state(cfg)
        started = state.get("phase") not in ("broadcast", "retire")
        if started:
            if finish:
                raise LifecycleError("no dispatcher rotation is in progress; nothing to finish")
            state = _start_rotation(cfg, registry)
        report = {"started": started, "old_serial": state["old_serial"],
                  "new_serial": state["new_serial"], "updated": [], "pending": [], "stale": []}
        if _overlap_over(state):
            finish = True       # past cert_overlap_days the previous key is not kept any longer
            report["overlap_expired"] = state["overlap_expires"]
        if state["phase"] == "broadcast":
            _broadcast(cfg, registry, make_engine, state, report)
            _switch(cfg, state)
        if not finish:
            _retire(cfg, registry, make_engine, state, report)
        pending = [name for name in registry.names()
                   if (registry.get(name) or {}).get("serial_status") == "pending"]
        if finish or not pending:
            for name in pending:
                _set_status(registry, name, serial_status="stale")
                report["stale"].append(name)
            _drop_previous(cfg)
            state.update(phase="done", previous_retired=wire.utc_timestamp())
            report["pending"] = []
        _save_state(cfg, state)
        report["phase"] = state["phase"] if state["phase"] == "done" else "pending"
        wire.log_action("info", "cert-rotation", PHASE=report["phase"], OLD_SERIAL=state["old_serial"],
                        NEW_SERIAL=state["new_serial"], UPDATED=len(report["updated"]),
                        PENDING=len(report["pending"]), STALE=len(report["stale"]))
        return report


def _start_rotation(cfg: Any, registry: Any) -> dict:
    """Issue the next certificate beside the live one; mark every agent pending."""
    try:
        old_serial = pki.dispatcher_serial(cfg)
        cert_pem, key_pem = pki.issue_cert(cfg.ca_dir, pki.DISPATCHER_COMMON_NAME, days=cfg.cert_days)
    except pki.PKIError as exc:
        raise LifecycleError(str(exc)) from None
    wire.atomic_write(cfg.key + NEXT_SUFFIX, key_pem, 0o600)
    wire.atomic_write(cfg.cert + NEXT_SUFFIX, cert_pem, 0o644, sync_dir=True)
    now = time.time()
    state = {"phase": "broadcast", "old_serial": old_serial, "new_serial": pki.cert_serial(cert_pem),
             "started_at": wire.utc_timestamp(now), "overlap_days": cfg.cert_overlap_days,
             "overlap_expires": wire.utc_timestamp(now + cfg.cert_overlap_days * 86400),
             "added": []}
    _save_state(cfg, state)
    for name in registry.names():
        _set_status(registry, name, serial_status="pending")
    wire.log_action("info", "cert-rotation", PHASE="started", OLD_SERIAL=old_serial,
                    NEW_SERIAL=state["new_serial"], AGENTS=len(registry.names()))
    return state


def _broadcast(cfg: Any, registry: Any, make_engine: Callable, state: dict, report: dict) -> None:
    """Add the new serial to every pending agent's trust map, presenting the old cert."""
    names = [n for n in registry.names() if n not in state["added"]]
    targets = registry.resolve(names)
    rows = make_engine(cfg.cert, cfg.key).rotate_serial_all(targets, serial=state["new_serial"],
                                                            action="add")
    for target, row in zip(targets, rows):
        if row.get("status") == "ok":
            state["added"].append(target.name)
        else:
            report["pending"].append({"host": target.name, "error": row.get("error", "")})
    _save_state(cfg, state)


def _switch(cfg: Any, state: dict) -> None:
    """Keep the old pair as .previous, move the next pair into place (API nodes reload it)."""
    for path in (cfg.key, cfg.cert):
        shutil.copy2(path, path + PREVIOUS_SUFFIX)
        os.chmod(path + PREVIOUS_SUFFIX, 0o600 if path == cfg.key else 0o644)
    os.replace(cfg.key + NEXT_SUFFIX, cfg.key)
    os.replace(cfg.cert + NEXT_SUFFIX, cfg.cert)
    state.update(phase="retire", rotated_at=wire.utc_timestamp())
    _save_state(cfg, state)
    # Exchanges that API nodes began with the old pair just before the switch finish first.
    time.sleep(SWITCH_GRACE_S)
    wire.log_action("info", "cert-rotated", OLD_SERIAL=state["old_serial"],
                    NEW_SERIAL=state["new_serial"], OVERLAP_EXPIRES=state["overlap_expires"])


def _retire(cfg: Any, registry: Any, make_engine: Callable, state: dict, report: dict) -> None:
    """Bring late agents over with the previous cert, then remove the old serial everywhere
    with the new cert; an agent is "current" once both are done."""
    pending = [n for n in registry.names() if (registry.get(n) or {}).get("serial_status") == "pending"]
    late = [n for n in pending if n not in state["added"]]
    report["pending"] = []
    if late and os.path.exists(cfg.cert + PREVIOUS_SUFFIX):
        targets = registry.resolve(late)
        rows = make_engine(cfg.cert + PREVIOUS_SUFFIX, cfg.key + PREVIOUS_SUFFIX).rotate_serial_all(
            targets, serial=state["new_serial"], action="add")
        for target, row in zip(targets, rows):
            if row.get("status") == "ok":
                state["added"].append(target.name)
            else:
                report["pending"].append({"host": target.name, "error": row.get("error", "")})
    ready = [n for n in pending if n in state["added"]]
    targets = registry.resolve(ready)
    rows = make_engine(cfg.cert, cfg.key).rotate_serial_all(targets, serial=state["old_serial"],
                                                            action="remove")
    for target, row in zip(targets, rows):
        if row.get("status") == "ok":
            _set_status(registry, target.name, serial_status="current",
                        dispatcher_serial=state["new_serial"], serial_confirmed=wire.utc_timestamp())
            report["updated"].append(target.name)
        else:
            report["pending"].append({"host": target.name, "error": row.get("error", "")})
    _save_state(cfg, state)


def _overlap_over(state: dict) -> bool:
    try:
        ends = calendar.timegm(time.strptime(str(state.get("overlap_expires")), "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return False
    return state.get("phase") == "retire" and time.time() > ends


def _drop_previous(cfg: Any) -> None:
    for path in (cfg.key + PREVIOUS_SUFFIX, cfg.cert + PREVIOUS_SUFFIX):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _set_status(registry: Any, name: str, **fields: Any) -> None:
    try:
        registry.update(name, **fields)
    except store.StoreError as exc:     # unpaired meanwhile: nothing to track
        wire.log_action("warning", "cert-rotation", AGENT=name, ERROR=str(exc))


def _save_state(cfg: Any, state: dict) -> None:
    wire.atomic_write(os.path.join(cfg.state_dir, ROTATION_FILE),
                      ujson.dumps(state, indent=2).encode() + b"\n", 0o644, sync_dir=True)


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive flock on ``<path>.lock``: one rotation / revocation writer at a time."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)

