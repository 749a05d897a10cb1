"""ctrl-exec PKI: the CA, certificates, CSR checks, enrolment bundles and pairing.

Owns: ``<ca_dir>/ca.key`` + ``ca.crt``, the dispatcher certificate and key at
``cfg.cert`` / ``cfg.key``, enrolment bundles written by :func:`enroll`, and the
pairing queue under ``<state_dir>/pairing/`` (reference §4.1–§4.4).

Never does: shell out (all crypto is the ``cryptography`` library), print or log
private key material, overwrite an existing CA key, sign a CSR that failed
:func:`check_csr`, or use an unvalidated name or reqid as a file name. Registry
records are written through ``store.Registry``; this module never touches
``agents/`` directly.
"""
from __future__ import annotations

__all__ = [
    "PKIError",
    "CA_COMMON_NAME", "DISPATCHER_COMMON_NAME",
    "CA_DAYS", "LEAF_DAYS", "MAX_CSR_BYTES", "PAIRING_STALE_S",
    "create_ca", "create_dispatcher_cert", "issue_cert",
    "check_csr", "sign_csr", "cert_serial", "cert_expiry",
    "enroll", "pairing_code",
    "PairingServer", "list_requests", "approve", "deny", "expire_stale_requests",
    "run_pairing_mode",
]

import datetime
import ipaddress
import json
import os
import re
import secrets
import select
import signal
import socket
import ssl
import sys
import threading
import time

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import ctrlexec_agent as wire
import store

# --- constants ---------------------------------------------------------------

CA_COMMON_NAME = "ctrl-exec CA"
DISPATCHER_COMMON_NAME = "ctrl-exec-dispatcher"
CA_KEY_NAME = "ca.key"
CA_CERT_NAME = "ca.crt"
CA_DAYS = 3650                      #: CA validity, days
LEAF_DAYS = 825                     #: dispatcher / agent validity, days (signer default)
MAX_CSR_BYTES = 10240               #: reference §4.3
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 16384                #: bounds signature-check cost of hostile CSRs
ACCEPTED_CURVES = ("secp256r1", "secp384r1")
ACCEPTED_CSR_HASHES = ("sha224", "sha256", "sha384", "sha512")
CSR_PEM_HEADER = b"-----BEGIN CERTIFICATE REQUEST-----"
PAIRING_STALE_S = 600               #: a queued request older than this is expired
PAIRING_POLL_S = 0.5                #: how often a waiting connection looks for a decision
PAIRING_IO_TIMEOUT_S = 30.0         #: socket deadline while reading a pairing request
PAIRING_MAX_CONNECTIONS = 32        #: live pairing connections (queue cap is separate)
PAIRING_MAX_TIMEOUT_S = 600
KEY_MODE = 0o600
CERT_MODE = 0o644
QUEUE_MODE = 0o600
PAIRING_REQID_RE = re.compile(r"^[a-f0-9]{16}$")
TAG_KEY_RE = re.compile(r"^\w[\w-]*$")


class PKIError(Exception):
    """Any PKI or pairing failure; str() says what was wrong and what is accepted."""


# --- CA and certificates -------------------------------------------------------

def create_ca(ca_dir: str, *, days: int = CA_DAYS) -> None:
    """Create ``ca.key`` (ECDSA P-256, 0600) and self-signed ``ca.crt`` in ca_dir.

    Args: ca_dir (created 0755 if missing); days of validity.
    Raises: PKIError if ``ca.key`` already exists (never overwritten) or on I/O failure.
    """
    key_path = os.path.join(ca_dir, CA_KEY_NAME)
    cert_path = os.path.join(ca_dir, CA_CERT_NAME)
    if os.path.lexists(key_path):
        raise PKIError(f"CA already exists at {key_path}; refusing to overwrite")
    _makedirs(ca_dir, 0o755)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_new_serial())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True,
            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    # The key is linked into place without overwrite so two concurrent setups
    # cannot both believe they created the CA.
    _write_file(key_path, _key_pem(key), KEY_MODE, overwrite=False)
    _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), CERT_MODE)


def create_dispatcher_cert(ca_dir: str, cert_path: str, key_path: str, *,
                           days: int = LEAF_DAYS) -> str:
    """Issue the dispatcher certificate (CN ctrl-exec-dispatcher) and write cert + key.

    Args: ca_dir holding ca.key/ca.crt; cert_path (0644) and key_path (0600)
    are replaced atomically; days of validity.
    Returns: the canonical serial of the new certificate (hex text).
    Raises: PKIError if the CA is missing or unreadable, or on I/O failure.
    """
    cert_pem, key_pem = issue_cert(ca_dir, DISPATCHER_COMMON_NAME, days=days)
    for path in (cert_path, key_path):
        _makedirs(os.path.dirname(os.path.abspath(path)), 0o755)
    _write_file(key_path, key_pem, KEY_MODE)
    _write_file(cert_path, cert_pem, CERT_MODE)
    return cert_serial(cert_pem)


def issue_cert(ca_dir: str, common_name: str, *, days: int = LEAF_DAYS) -> tuple:
    """Issue a leaf certificate with a new ECDSA P-256 key, signed by the CA in ca_dir.

    Args: ca_dir; common_name (subject CN); days of validity.
    Returns: (cert_pem: bytes, key_pem: bytes) — the caller decides where the key goes.
    Raises: PKIError if the CA is missing/unreadable or the name is empty.
    """
    if not common_name or len(common_name) > 64:
        raise PKIError(f"common name {common_name!r} is not accepted; 1-64 characters are accepted")
    ca_key, ca_cert = _load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = _sign_leaf(ca_key, ca_cert, subject, key.public_key(), days)
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def check_csr(csr_pem) -> x509.CertificateSigningRequest:
    """Apply the CSR rules of reference §4.3 and return the parsed CSR.

    Args: csr_pem (bytes or str) — PEM text of a PKCS#10 request.
    Returns: the parsed ``x509.CertificateSigningRequest``.
    Raises: PKIError naming the failed rule and what is accepted (size <= 10240 bytes,
    PEM header, valid self-signature, RSA >= 2048 or EC P-256/P-384, SHA-2 signature).
    """
    if isinstance(csr_pem, str):
        csr_pem = csr_pem.encode("utf-8", "replace")
    if not isinstance(csr_pem, (bytes, bytearray)):
        raise PKIError("CSR must be PEM text; a '-----BEGIN CERTIFICATE REQUEST-----' block is accepted")
    csr_pem = bytes(csr_pem)
    if len(csr_pem) > MAX_CSR_BYTES:
        raise PKIError(f"CSR is {len(csr_pem)} bytes; at most {MAX_CSR_BYTES} bytes are accepted")
    if not csr_pem.lstrip().startswith(CSR_PEM_HEADER):
        raise PKIError("CSR is not PEM; text starting with "
                       "'-----BEGIN CERTIFICATE REQUEST-----' is accepted")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PKIError(f"CSR could not be parsed ({_short(exc)}); a PEM PKCS#10 request is accepted")
    _check_csr_key(csr)
    _check_csr_hash(csr)
    try:
        valid = csr.is_signature_valid
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PKIError(f"CSR self-signature could not be checked ({_short(exc)}); "
                       "a request signed by its own key is accepted")
    if not valid:
        raise PKIError("CSR self-signature does not verify; a request signed by its own key is accepted")
    if not _csr_common_name(csr):
        raise PKIError("CSR subject has no common name; a subject with CN=<hostname> is accepted")
    return csr


def sign_csr(ca_dir: str, csr_pem, *, days: int = LEAF_DAYS,
             expected_cn: str | None = None) -> bytes:
    """Check a CSR (:func:`check_csr`) and sign it with the CA; the subject is copied.

    Args: ca_dir; csr_pem; days of validity; expected_cn — when given, the CSR's
    CN must equal it exactly (renewal binds the CN to the registry name).
    Returns: the certificate PEM (bytes).
    Raises: PKIError on a refused CSR, a CN mismatch, or a missing CA.
    """
    csr = check_csr(csr_pem)
    if expected_cn is not None:
        cn = _csr_common_name(csr)
        if cn != expected_cn:
            raise PKIError(f"CSR common name {cn!r} does not match {expected_cn!r}; "
                           "only a CSR for the registered name is accepted")
    ca_key, ca_cert = _load_ca(ca_dir)
    cert = _sign_leaf(ca_key, ca_cert, csr.subject, csr.public_key(), days)
    return cert.public_bytes(serialization.Encoding.PEM)


def cert_serial(cert_pem) -> str:
    """Return the canonical serial (reference §4.7) of a PEM certificate.

    The serial is rendered as hex the way openssl prints it and then passed
    through ``wire.canonical_serial``, so it matches what agents compute from
    the live TLS session and what trusted-map files contain.
    Raises: PKIError if the PEM cannot be parsed.
    """
    cert = _load_cert(cert_pem)
    text = "%X" % cert.serial_number
    if len(text) % 2:
        text = "0" + text
    return wire.canonical_serial(text)


def cert_expiry(cert_pem) -> str:
    """Return the certificate's notAfter as openssl prints it ("Jun  7 16:28:00 2027 GMT").

    Raises: PKIError if the PEM cannot be parsed.
    """
    return wire.openssl_date(_load_cert(cert_pem).not_valid_after_utc)


# --- enrolment -------------------------------------------------------------------

def enroll(cfg, registry, name: str, *, address: str, port: int = wire.AGENT_PORT,
           tags: dict | None = None, out_dir: str) -> dict:
    """Issue an agent bundle without interactive pairing and register the agent.

    Writes ``out_dir/{agent.crt, agent.key (0600), ca.crt, ctrl-exec-dispatchers,
    agent.conf, scripts.conf}`` (paths in agent.conf are relative to out_dir).
    Args: cfg (config.Config: ca_dir, cert, dispatcher_id); registry (store.Registry);
    name (registry name, also the cert CN); address (agent bind + dial address);
    port; tags {str: str}; out_dir.
    Returns: the registry record {hostname, ip, port, lookup_by: "ip", paired, expiry,
    tags, dispatcher_serial, serial_status: "current"}.
    Raises: PKIError on a bad name/address/port/tag, a missing CA or dispatcher cert.
    """
    if not isinstance(name, str) or not store.valid_agent_name(name):
        raise PKIError(f"agent name {name!r} is not valid; names matching "
                       "^[A-Za-z0-9][A-Za-z0-9._-]*$ (at most 253 characters) are accepted")
    address = _check_address(address)
    port = _check_port(port)
    tags = _check_tags(tags)
    dispatcher_id = getattr(cfg, "dispatcher_id", "") or ""
    if not wire.DISPATCHER_ID_RE.match(dispatcher_id):
        raise PKIError(f"dispatcher_id {dispatcher_id!r} is not valid; "
                       "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$ is accepted")
    dispatcher_pem = _read_dispatcher_cert(cfg)
    dispatcher_serial = cert_serial(dispatcher_pem)
    ca_pem = _read_ca_cert(cfg.ca_dir)
    cert_pem, key_pem = issue_cert(cfg.ca_dir, name[:64])

    _makedirs(out_dir, 0o755)
    _write_file(os.path.join(out_dir, "agent.key"), key_pem, KEY_MODE)
    _write_file(os.path.join(out_dir, "agent.crt"), cert_pem, CERT_MODE)
    _write_file(os.path.join(out_dir, "ca.crt"), ca_pem, CERT_MODE)
    _write_file(os.path.join(out_dir, "ctrl-exec-dispatchers"),
                _trusted_map_text(dispatcher_serial, dispatcher_id), CERT_MODE)
    _write_file(os.path.join(out_dir, "agent.conf"),
                _agent_conf_text(name, address, port, tags), CERT_MODE)
    _write_file(os.path.join(out_dir, "scripts.conf"), _SCRIPTS_CONF_TEXT.encode(), CERT_MODE)
    _makedirs(os.path.join(out_dir, "state"), 0o750)

    record = {
        "hostname": name, "ip": address, "port": port, "lookup_by": "ip",
        "paired": wire.utc_timestamp(), "expiry": cert_expiry(cert_pem), "tags": tags,
        "dispatcher_serial": dispatcher_serial, "serial_status": "current",
    }
    _registry_put(registry, name, record)
    wire.log_action("info", "enroll", agent=name, ip=address, port=port,
                    serial=cert_serial(cert_pem), expiry=record["expiry"])
    return record


def pairing_code(csr_pem) -> str:
    """Return the 6-digit pairing code of a CSR PEM text (reference §4.2 step 5).

    Thin alias of ``wire.pairing_code`` (the agent computes the same code), so
    both screens always agree.
    """
    if isinstance(csr_pem, str):
        csr_pem = csr_pem.encode("utf-8")
    return wire.pairing_code(csr_pem)


# --- pairing -------------------------------------------------------------------------

class PairingServer:
    """The pairing listener (reference §4.2 steps 7-14): TLS server-auth on :7444.

    One thread per connection (bounded by PAIRING_MAX_CONNECTIONS); works in
    plain threads and under gevent monkey-patching alike. Each connection gets
    a first response ``{"status":"pending","reqid"}`` and then, on the same
    connection, the operator's decision (or an approval timeout).

    Methods for the caller: start(), stop(), ``port`` (bound port, after start).
    on_request(info) is called for each queued request with
    {reqid, hostname, ip, source_ip, code, received} (no CSR, no nonce).
    """

    def __init__(self, cfg, registry=None, *, bind: str = "0.0.0.0",
                 port: int = wire.PAIRING_PORT, timeout: float | None = None,
                 on_request=None) -> None:
        self.cfg = cfg
        self.registry = registry
        self.bind = bind
        self.port = port
        if timeout is None:
            timeout = getattr(cfg, "pairing_timeout", PAIRING_MAX_TIMEOUT_S)
        self.timeout = float(timeout)
        self.on_request = on_request
        self._queue_dir = _pairing_dir(cfg)
        self._max_queue = int(getattr(cfg, "pairing_max_queue", 10))
        limit = _rate_limit_tuple(getattr(cfg, "pairing_rate_limit_volume", (10, 60, 300)))
        disabled = bool(getattr(cfg, "pairing_rate_limit_disable", False))
        self._limiter = _VolumeLimiter(*limit, disabled=disabled)
        self._stopping = threading.Event()
        self._queue_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(PAIRING_MAX_CONNECTIONS)
        self._threads = set()
        self._threads_lock = threading.Lock()
        self._listener = None
        self._accept_thread = None
        self._ctx = None

    def start(self) -> "PairingServer":
        """Build the TLS context, bind and start accepting; returns self.

        Raises: PKIError if the dispatcher cert/key are unusable or the port cannot be bound.
        """
        try:
            self._ctx = wire.tls_server_context(self.cfg.cert, self.cfg.key)
        except (OSError, ssl.SSLError) as exc:
            raise PKIError(f"cannot load dispatcher cert/key ({self.cfg.cert}, {self.cfg.key}): "
                           f"{_short(exc)}; run setup-dispatcher first")
        _makedirs(self._queue_dir, 0o700)
        expire_stale_requests(self.cfg)
        family = socket.AF_INET6 if ":" in self.bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.bind, int(self.port)))
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise PKIError(f"cannot listen on {self.bind}:{self.port} ({exc.strerror}); "
                           "a free port (default 7444) is needed")
        sock.settimeout(PAIRING_POLL_S / 2)
        self._listener = sock
        self.port = sock.getsockname()[1]
        self._accept_thread = threading.Thread(target=self._accept_loop, name="pairing-accept",
                                               daemon=True)
        self._accept_thread.start()
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting; waiting connections are answered "pairing mode stopped"."""
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_thread.join(grace_s)
        if self._listener is not None:
            self._listener.close()
        deadline = time.monotonic() + grace_s
        with self._threads_lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> "PairingServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        """Accept until stopped; one bad client never stops the loop."""
        while not self._stopping.is_set():
            try:
                conn, addr = self._listener.accept()
            except socket.timeout:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    return
                wire.log_action("warning", "pair-reject", reason="accept-failed", error=_short(exc))
                time.sleep(0.1)
                continue
            source_ip = addr[0]
            if not self._limiter.allow(source_ip):
                wire.log_action("warning", "pair-reject", reason="rate-limited", ip=source_ip)
                conn.close()
                continue
            if not self._slots.acquire(blocking=False):
                wire.log_action("warning", "pair-reject", reason="too-many-connections", ip=source_ip)
                conn.close()
                continue
            thread = threading.Thread(target=self._serve_one, args=(conn, source_ip),
                                      name="pairing-conn", daemon=True)
            with self._threads_lock:
                self._threads.add(thread)
            thread.start()

    def _serve_one(self, conn: socket.socket, source_ip: str) -> None:
        """Handle one pairing connection end to end, then release its slot."""
        tls = None
        try:
            conn.settimeout(PAIRING_IO_TIMEOUT_S)
            # Handshake here, in the connection's own thread, never in accept().
            try:
                tls = self._ctx.wrap_socket(conn, server_side=True)
            except (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError):
                # Agents TCP-probe the port before pairing (reference §4.2 step 3).
                wire.log_action("info", "pair-probe", ip=source_ip)
                return
            self._pair_one(tls, source_ip)
        except (OSError, ssl.SSLError, ValueError) as exc:
            wire.log_action("warning", "pair-reject", reason="connection-error", ip=source_ip,
                            error=_short(exc))
        except Exception as exc:  # noqa: BLE001 - one client must never stop the listener
            wire.log_action("err", "pair-reject", reason="internal-error", ip=source_ip,
                            error=_short(exc))
        finally:
            for sock in (tls, conn):
                if sock is not None:
                    try:
                        sock.close()
                    except OSError:
                        pass
            with self._threads_lock:
                self._threads.discard(threading.current_thread())
            self._slots.release()

    def _pair_one(self, tls, source_ip: str) -> None:
        """Steps 7-14 of reference §4.2 on an established TLS connection."""
        reader = wire.SocketReader(tls, time.monotonic() + PAIRING_IO_TIMEOUT_S)
        try:
            request = wire.read_request(reader, max_body=wire.MAX_PAIRING_BODY_BYTES)
        except wire.ProtocolError as exc:
            reason = "request too large" if exc.status == 413 else "invalid request"
            wire.log_action("warning", "pair-reject", reason=reason.replace(" ", "-"),
                            ip=source_ip, error=exc.error)
            # Part of the request is still unread: drain it so closing does not
            # reset the connection before the client reads the refusal.
            self._refuse(tls, reason, drain=True)
            return
        fields, reason = _parse_pair_request(request, source_ip)
        if reason:
            self._refuse(tls, reason)
            return
        with self._queue_lock:
            expire_stale_requests(self.cfg)
            if len(_pending_ids(self._queue_dir)) >= self._max_queue:
                wire.log_action("warning", "pair-reject", reason="queue-full", ip=source_ip,
                                hostname=fields["hostname"])
                self._refuse(tls, "pairing queue full")
                return
            reqid = wire.new_reqid()
            fields["id"] = reqid
            _write_file(_queue_path(self._queue_dir, reqid, ".json"),
                        json.dumps(fields).encode(), QUEUE_MODE)
        wire.log_action("info", "pair-request", reqid=reqid, hostname=fields["hostname"],
                        ip=fields["ip"], source_ip=source_ip, code=fields["code"], status="pending")
        _send(tls, wire.encode_response(200, {"status": "pending", "reqid": reqid}))
        if self.on_request is not None:
            info = {k: fields[k] for k in ("hostname", "ip", "source_ip", "code", "received")}
            info["reqid"] = reqid
            try:
                self.on_request(info)
            except Exception as exc:  # noqa: BLE001 - a display problem must not drop the agent
                wire.log_action("warning", "pair-announce-failed", reqid=reqid, error=_short(exc))
        self._await_decision(tls, reqid)

    def _await_decision(self, tls, reqid: str) -> None:
        """Poll for <reqid>.approved/.denied; send it as the second response."""
        deadline = time.monotonic() + self.timeout
        paths = {ext: _queue_path(self._queue_dir, reqid, ext)
                 for ext in (".json", ".approved", ".denied")}
        while True:
            for ext in (".approved", ".denied"):
                decision = _read_json(paths[ext])
                if decision is not None:
                    try:
                        _send(tls, wire.encode_response(200, decision))
                    finally:
                        _unlink(paths[ext], paths[".json"])
                    return
            if not os.path.exists(paths[".json"]) and not any(
                    os.path.exists(paths[ext]) for ext in (".approved", ".denied")):
                break       # expired as stale, or removed by hand: nothing will decide it
            if self._stopping.is_set() or time.monotonic() >= deadline:
                break
            self._stopping.wait(min(PAIRING_POLL_S, max(0.0, deadline - time.monotonic())))
        reason = "pairing mode stopped" if self._stopping.is_set() else "approval timeout"
        _unlink(paths[".json"])
        wire.log_action("info", "pair-reject", reqid=reqid, reason=reason.replace(" ", "-"))
        _send(tls, wire.encode_response(200, {"status": "denied", "reason": reason}))

    def _refuse(self, tls, reason: str, *, drain: bool = False) -> None:
        """Answer a refusal as HTTP 200 {"status":"error","reason"} (the original's shape)."""
        try:
            _send(tls, wire.encode_response(200, {"status": "error", "reason": reason}))
            if drain:
                _drain(tls)
        except (OSError, ssl.SSLError):
            pass  # the peer went away; nothing more to tell it


def list_requests(cfg) -> list:
    """Return pending pairing requests, oldest first, after expiring stale ones.

    Returns: [{"id", "reqid", "hostname", "ip", "source_ip", "lookup_by", "port",
    "received", "code", "reverse_dns", "reverse_confirmed"}] — no CSR, no nonce.
    """
    folder = _pairing_dir(cfg)
    expire_stale_requests(cfg)
    rows = []
    for reqid in _pending_ids(folder):
        record = _read_json(_queue_path(folder, reqid, ".json"))
        if not isinstance(record, dict):
            continue
        row = {k: record.get(k, "") for k in _LISTED_FIELDS}
        row["id"] = row["reqid"] = reqid
        rows.append(row)
    rows.sort(key=lambda r: (str(r.get("received", "")), r["id"]))
    return rows


def approve(cfg, registry, reqid: str, *, lookup_by: str | None = None,
            ip: str | None = None, agent_port: int | None = None) -> dict:
    """Approve a queued request: sign its CSR (825 days) and register the agent.

    Effective lookup_by = argument > agent suggestion > "hostname"; port =
    agent_port > reported port > 7443; ip = argument > queued ip. Re-pairing a
    registered name keeps its tags.
    Writes <reqid>.approved {"status":"approved","cert","ca","nonce",
    "dispatcher_serial","dispatcher_id"} for the waiting connection.
    Returns: the registry record {hostname, ip, port, lookup_by, paired, expiry,
    tags, dispatcher_serial, serial_status}.
    Raises: PKIError on an unknown/decided reqid, a bad argument, a refused CSR,
    or a missing CA / dispatcher certificate.
    """
    folder = _pairing_dir(cfg)
    record = _load_pending(folder, reqid)
    name = str(record.get("hostname", ""))
    if not store.valid_agent_name(name):
        raise PKIError(f"pairing request {reqid} has an invalid hostname; deny it")
    if lookup_by is None:
        lookup_by = record.get("lookup_by") or "hostname"
    if lookup_by not in ("ip", "hostname"):
        raise PKIError(f"lookup_by {lookup_by!r} is not valid; 'ip' or 'hostname' is accepted")
    if ip is not None:
        try:
            ip = str(ipaddress.ip_address(str(ip).strip()))
        except ValueError:
            raise PKIError(f"ip {ip!r} is not valid; an IPv4 or IPv6 address is accepted")
    else:
        ip = str(record.get("ip") or record.get("source_ip") or "")
    if agent_port is None:
        agent_port = record.get("port") or wire.AGENT_PORT
    agent_port = _check_port(agent_port)
    dispatcher_id = getattr(cfg, "dispatcher_id", "") or ""
    dispatcher_serial = cert_serial(_read_dispatcher_cert(cfg))
    ca_pem = _read_ca_cert(cfg.ca_dir)
    cert_pem = sign_csr(cfg.ca_dir, str(record.get("csr", "")).encode("utf-8"), days=LEAF_DAYS)
    entry = {
        "hostname": name, "ip": ip, "port": agent_port, "lookup_by": lookup_by,
        "paired": wire.utc_timestamp(), "expiry": cert_expiry(cert_pem),
        "tags": _existing_tags(registry, name),
        "dispatcher_serial": dispatcher_serial, "serial_status": "current",
    }
    _registry_put(registry, name, entry)
    answer = {
        "status": "approved", "cert": cert_pem.decode("ascii"), "ca": ca_pem.decode("ascii"),
        "nonce": str(record.get("nonce", "")), "dispatcher_serial": dispatcher_serial,
        "dispatcher_id": dispatcher_id,
    }
    _write_file(_queue_path(folder, reqid, ".approved"), json.dumps(answer).encode(), QUEUE_MODE)
    wire.log_action("info", "pair-approve", reqid=reqid, hostname=name, ip=ip, port=agent_port,
                    lookup_by=lookup_by, serial=cert_serial(cert_pem), expiry=entry["expiry"])
    return entry


def deny(cfg, reqid: str) -> None:
    """Deny a queued request: the waiting agent is told "rejected by operator".

    Raises: PKIError on an unknown or already decided reqid.
    """
    folder = _pairing_dir(cfg)
    record = _load_pending(folder, reqid)
    answer = {"status": "denied", "reason": "rejected by operator"}
    _write_file(_queue_path(folder, reqid, ".denied"), json.dumps(answer).encode(), QUEUE_MODE)
    _unlink(_queue_path(folder, reqid, ".json"))
    wire.log_action("info", "pair-deny", reqid=reqid, hostname=record.get("hostname", ""))


def expire_stale_requests(cfg) -> int:
    """Delete queue files older than PAIRING_STALE_S; returns how many requests expired."""
    folder = _pairing_dir(cfg)
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    now = time.time()
    expired = 0
    for fname in names:
        reqid, _, ext = fname.partition(".")
        if not PAIRING_REQID_RE.match(reqid) or ext not in ("json", "approved", "denied"):
            continue
        path = os.path.join(folder, fname)
        try:
            age = now - os.stat(path).st_mtime
        except OSError:
            continue
        if age > PAIRING_STALE_S:
            _unlink(path)
            if ext == "json":
                expired += 1
                wire.log_action("info", "pair-expire", reqid=reqid)
    return expired


def run_pairing_mode(cfg, registry=None, *, port: int = wire.PAIRING_PORT,
                     timeout: float | None = None, bind: str = "0.0.0.0",
                     interactive: bool = False, out=None, stdin=None) -> int:
    """Run a pairing session in the foreground until timeout, SIGTERM/SIGINT or "quit".

    Prints "pairing mode on port N for T s" and one line per new request
    (reqid, hostname, ip, 6-digit code). interactive (stdin is a TTY) offers
    a/d/s, aN/dN, list/l, quit/q. timeout defaults to cfg.pairing_timeout;
    registry defaults to store.open_store(cfg).registry.
    Returns: 0. Raises: PKIError on a bad timeout or when the listener cannot start.
    """
    out = out if out is not None else sys.stdout
    stdin = stdin if stdin is not None else sys.stdin
    if timeout is None:
        timeout = getattr(cfg, "pairing_timeout", PAIRING_MAX_TIMEOUT_S)
    try:
        timeout = float(timeout)
    except (TypeError, ValueError):
        timeout = -1.0
    if not 1 <= timeout <= PAIRING_MAX_TIMEOUT_S:
        raise PKIError(f"pairing timeout {timeout!r} is not valid; 1-600 seconds are accepted")
    if registry is None:
        registry = store.open_store(cfg).registry
    session = _PairingSession(cfg, registry, out)
    server = PairingServer(cfg, registry, bind=bind, port=port, timeout=timeout,
                           on_request=session.announce)
    stop = _StopFlag()
    # Handlers go in before the listener starts, so a SIGTERM at any point
    # after the announcement still ends the session cleanly.
    restore = _install_stop_signals(stop)
    ended_by = "timeout"
    try:
        server.start()
        try:
            wire.log_action("info", "pairing-mode-start", port=server.port, timeout=int(timeout),
                            bind=bind)
            session.say(f"pairing mode on port {server.port} for {int(timeout)} s")
            ended_by = _pairing_loop(session, stop, stdin, timeout, interactive)
        finally:
            server.stop()
    finally:
        restore()
    if ended_by == "timeout":
        wire.log_action("info", "pairing-mode-timeout", port=server.port)
        session.say("pairing mode timed out")
    else:
        wire.log_action("info", "pairing-mode-stop", port=server.port, reason=ended_by)
        session.say("pairing mode stopped")
    return 0


# --- private ---------------------------------------------------------------------

def _pairing_loop(session, stop: "_StopFlag", stdin, timeout: float, interactive: bool) -> str:
    """Wait for timeout / signal / quit; returns "timeout", "signal" or "quit"."""
    deadline = time.monotonic() + timeout
    if interactive:
        session.say("commands: a/d (the only request), aN/dN (numbered), s (skip), list, quit")
        session.prompt()
    while not stop.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return "timeout"
        if interactive:
            line = _read_line(stdin, min(left, PAIRING_POLL_S))
            if line is None:
                continue
            if session.command(line.strip()) == "quit":
                return "quit"
            session.prompt()
        else:
            time.sleep(min(left, PAIRING_POLL_S))
    return "signal"


_SCRIPTS_CONF_TEXT = (
    "# ctrl-exec agent allowlist: one 'name = /absolute/path' per line.\n"
    "# Names are [A-Za-z0-9_-]+; only listed scripts can be run.\n"
)


def _now() -> datetime.datetime:
    """Current UTC time, second precision."""
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def _new_serial() -> int:
    """Random positive 63-bit serial whose hex form contains a letter.

    Top bit 62 set keeps the DER integer at 8 bytes with no sign padding. A
    serial whose hex text is all digits would be re-read as decimal by the
    reference canonicaliser (§4.7); avoiding those keeps every tool agreeing.
    """
    while True:
        serial = secrets.randbits(63) | (1 << 62)
        if re.search(r"[a-f]", "%x" % serial):
            return serial


def _sign_leaf(ca_key, ca_cert, subject: x509.Name, public_key, days: int) -> x509.Certificate:
    """Build and sign an end-entity cert usable as TLS server and client."""
    if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= 36500:
        raise PKIError(f"validity of {days!r} days is not accepted; 1-36500 days are accepted")
    now = _now()
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    is_rsa = isinstance(public_key, rsa.RSAPublicKey)
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(_new_serial())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=is_rsa,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(aki, critical=False)
    )
    return builder.sign(ca_key, hashes.SHA256())


def _key_pem(key) -> bytes:
    """Unencrypted PKCS#8 PEM of a private key (written only to 0600 files)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_ca(ca_dir: str):
    """Load (ca_key, ca_cert) from ca_dir, or raise PKIError saying to run setup-ca."""
    key_path = os.path.join(ca_dir, CA_KEY_NAME)
    cert_path = os.path.join(ca_dir, CA_CERT_NAME)
    try:
        with open(key_path, "rb") as fh:
            key_data = fh.read()
        with open(cert_path, "rb") as fh:
            cert_data = fh.read()
    except FileNotFoundError as exc:
        raise PKIError(f"CA file {exc.filename} not found; run setup-ca first "
                       f"(ca_dir = {ca_dir})")
    except OSError as exc:
        raise PKIError(f"CA file {exc.filename} is not readable ({exc.strerror}); "
                       "run as a user that can read ca_dir")
    try:
        ca_key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # Never echo the key text or the parser's detail about it.
        raise PKIError(f"CA key {key_path} is not an unencrypted PEM private key")
    ca_cert = _load_cert(cert_data, what=f"CA certificate {cert_path}")
    return ca_key, ca_cert


def _read_ca_cert(ca_dir: str) -> bytes:
    """PEM bytes of ca_dir/ca.crt (validated), or PKIError."""
    path = os.path.join(ca_dir, CA_CERT_NAME)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise PKIError(f"CA certificate {path} is not readable ({exc.strerror}); run setup-ca first")
    _load_cert(data, what=f"CA certificate {path}")
    return data


def _read_dispatcher_cert(cfg) -> bytes:
    """PEM bytes of the served dispatcher cert (cfg.cert), or PKIError naming setup-dispatcher."""
    path = cfg.cert
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise PKIError(f"dispatcher certificate {path} is not readable ({exc.strerror}); "
                       "run setup-dispatcher first")
    _load_cert(data, what=f"dispatcher certificate {path}")
    return data


def _load_cert(cert_pem, what: str = "certificate") -> x509.Certificate:
    """Parse a PEM certificate or raise PKIError."""
    if isinstance(cert_pem, str):
        cert_pem = cert_pem.encode("utf-8", "replace")
    try:
        return x509.load_pem_x509_certificate(bytes(cert_pem))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PKIError(f"{what} could not be parsed ({_short(exc)}); a PEM X.509 certificate is accepted")


def _check_csr_key(csr) -> None:
    """Refuse CSR keys other than RSA 2048-16384 bits or EC P-256/P-384."""
    accepted = f"RSA {MIN_RSA_BITS}-{MAX_RSA_BITS} bits or EC P-256/P-384 keys are accepted"
    try:
        key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PKIError(f"CSR public key is not usable ({_short(exc)}); {accepted}")
    if isinstance(key, rsa.RSAPublicKey):
        if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            raise PKIError(f"CSR has an RSA {key.key_size}-bit key; {accepted}")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ACCEPTED_CURVES:
            raise PKIError(f"CSR has an EC key on curve {key.curve.name}; {accepted}")
    else:
        raise PKIError(f"CSR has a {type(key).__name__.lstrip('_')} key; {accepted}")


def _check_csr_hash(csr) -> None:
    """Refuse CSR signatures made with MD2/MD4/MD5/SHA-1 (anything but SHA-2)."""
    accepted = "SHA-224/256/384/512 signatures are accepted"
    try:
        algorithm = csr.signature_hash_algorithm
    except UnsupportedAlgorithm:
        raise PKIError(f"CSR signature algorithm {csr.signature_algorithm_oid.dotted_string} "
                       f"is not accepted; {accepted}")
    name = getattr(algorithm, "name", None)
    if name not in ACCEPTED_CSR_HASHES:
        label = (name or "none").upper()
        raise PKIError(f"CSR is signed with {label}; {accepted}")


def _csr_common_name(csr) -> str:
    """First CN of the CSR subject, or ""."""
    values = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else ""


def _short(exc: BaseException) -> str:
    """One-line, bounded description of a parser error (never key material)."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:120]


def _makedirs(path: str, mode: int) -> None:
    """mkdir -p with an explicit mode for created folders."""
    if path:
        os.makedirs(path, mode=mode, exist_ok=True)


def _write_file(path: str, data: bytes, mode: int, *, overwrite: bool = True) -> None:
    """Atomically write data: temp file created with `mode` in the same folder, fsync, rename.

    The temp file is created with O_EXCL and the final mode from the first
    byte, so a private key is never readable by others even transiently.
    With overwrite=False the final name is linked (fails if it exists).
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, ".%s.%s.tmp" % (os.path.basename(path), secrets.token_hex(6)))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    except OSError as exc:
        raise PKIError(f"cannot write {path} ({exc.strerror}); a writable folder is needed")
    try:
        try:
            os.fchmod(fd, mode)         # umask may have narrowed the create mode
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise PKIError(f"{path} already exists; refusing to overwrite")
            os.unlink(tmp)
    except OSError as exc:
        raise PKIError(f"cannot write {path} ({exc.strerror}); a writable folder is needed")
    finally:
        if os.path.lexists(tmp):
            try:
                os.unlink(tmp)
            except OSError:
                pass
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    """Make a rename durable; failures here are not fatal (some filesystems refuse)."""
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


def _check_address(address) -> str:
    """Accept an IP literal or a DNS-style host name (it is written into agent.conf)."""
    text = str(address or "").strip()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if text and len(text) <= 253 and wire.AGENT_NAME_RE.match(text):
        return text
    raise PKIError(f"address {address!r} is not valid; an IP address or host name is accepted")


def _check_port(port) -> int:
    """Accept a TCP port 1-65535 (int or digit string)."""
    try:
        value = int(str(port).strip()) if not isinstance(port, bool) else -1
    except ValueError:
        value = -1
    if not 1 <= value <= 65535:
        raise PKIError(f"port {port!r} is not valid; 1-65535 is accepted")
    return value


def _check_tags(tags) -> dict:
    """Accept {key: value} with INI-safe keys (\\w[\\w-]*) and single-line string values."""
    if tags is None:
        return {}
    if not isinstance(tags, dict):
        raise PKIError("tags must be a mapping of key to value; {\"env\": \"prod\"} is accepted")
    clean = {}
    for key, value in tags.items():
        key, value = str(key), str(value)
        if not TAG_KEY_RE.match(key):
            raise PKIError(f"tag key {key!r} is not valid; keys matching \\w[\\w-]* are accepted")
        if "\n" in value or "\r" in value or value != value.strip():
            raise PKIError(f"tag value for {key!r} is not valid; single-line values "
                           "without leading/trailing spaces are accepted")
        clean[key] = value
    return clean


def _trusted_map_text(serial: str, dispatcher_id: str) -> bytes:
    """Trusted-dispatcher map (reference §4.7): two comment lines then '<serial> <id>'."""
    return ("# ctrl-exec trusted dispatchers: <canonical serial> <dispatcher_id>\n"
            "# Written by ctrl-exec; one dispatcher per line.\n"
            f"{serial} {dispatcher_id}\n").encode()


def _agent_conf_text(name: str, address: str, port: int, tags: dict) -> bytes:
    """agent.conf for an enrolment bundle; relative paths resolve against its folder."""
    lines = [
        f"# ctrl-exec agent configuration for {name} (written by ctrl-exec enroll)",
        "# Relative paths are relative to this file's folder.",
        f"port = {port}",
        f"bind = {address}",
        "cert = agent.crt",
        "key = agent.key",
        "ca = ca.crt",
        "trusted_dispatchers_path = ctrl-exec-dispatchers",
        "state_dir = state",
        "",
        "[tags]",
    ]
    lines.extend(f"{key} = {value}" for key, value in sorted(tags.items()))
    return ("\n".join(lines) + "\n").encode()


def _existing_tags(registry, name: str) -> dict:
    """Tags of an already registered name, so re-pairing keeps the operator's tags."""
    try:
        old = registry.get(name)
    except (store.StoreError, OSError, ValueError):
        return {}
    tags = old.get("tags") if isinstance(old, dict) else None
    return dict(tags) if isinstance(tags, dict) else {}


def _registry_put(registry, name: str, record: dict) -> None:
    """Write a registry record, turning store errors into PKIError."""
    try:
        registry.put(name, record)
    except (store.StoreError, OSError, ValueError) as exc:
        raise PKIError(f"cannot register agent {name!r}: {exc}")


# --- private: pairing ------------------------------------------------------------

_LISTED_FIELDS = ("reqid", "hostname", "ip", "source_ip", "lookup_by", "port", "received",
                  "code", "reverse_dns", "reverse_confirmed")
_NONCE_RE = re.compile(r"^[A-Za-z0-9+/=_-]{1,128}$")


class _VolumeLimiter:
    """Per-IP connection volume limit (reference §3.7): limit per window, then block."""

    MAX_ENTRIES = 1000

    def __init__(self, limit: int, window_s: int, block_s: int, *, disabled: bool = False) -> None:
        self.limit, self.window_s, self.block_s = limit, window_s, block_s
        self.disabled = disabled or limit <= 0
        self._lock = threading.Lock()
        self._seen = {}      # ip -> [timestamps]
        self._blocked = {}   # ip -> monotonic time the block ends

    def allow(self, ip: str) -> bool:
        """Record one connection from ip; False when ip is (or just became) blocked."""
        if self.disabled:
            return True
        now = time.monotonic()
        with self._lock:
            until = self._blocked.get(ip)
            if until is not None:
                if now < until:
                    return False
                del self._blocked[ip]
                self._seen.pop(ip, None)
            stamps = [t for t in self._seen.get(ip, ()) if now - t < self.window_s]
            if len(stamps) >= self.limit:
                self._blocked[ip] = now + self.block_s
                self._seen.pop(ip, None)
                wire.log_action("warning", "rate-block", ip=ip, block=self.block_s)
                return False
            stamps.append(now)
            self._seen[ip] = stamps
            if len(self._seen) + len(self._blocked) > self.MAX_ENTRIES:
                self._evict(now)
            return True

    def _evict(self, now: float) -> None:
        """Keep the table bounded: drop expired blocks, then the oldest entries."""
        for ip in [ip for ip, until in self._blocked.items() if until <= now]:
            del self._blocked[ip]
        while len(self._seen) + len(self._blocked) > self.MAX_ENTRIES and self._seen:
            oldest = min(self._seen, key=lambda k: self._seen[k][-1])
            del self._seen[oldest]
        wire.log_action("warning", "rate-evict", count=self.MAX_ENTRIES)


class _PairingSession:
    """Operator-facing side of run_pairing_mode: announcements and a/d/list/quit."""

    def __init__(self, cfg, registry, out) -> None:
        self.cfg, self.registry, self.out = cfg, registry, out
        self._out_lock = threading.Lock()
        self._numbered = []

    def say(self, text: str) -> None:
        with self._out_lock:
            try:
                self.out.write(text + "\n")
                self.out.flush()
            except (OSError, ValueError):
                pass  # a closed terminal must not stop the listener

    def prompt(self) -> None:
        with self._out_lock:
            try:
                self.out.write("pairing> ")
                self.out.flush()
            except (OSError, ValueError):
                pass

    def announce(self, info: dict) -> None:
        self.say("request %s  hostname %s  ip %s  code %s" % (
            info["reqid"], info["hostname"], info["ip"], info["code"]))

    def command(self, text: str) -> str:
        """Run one interactive command; returns "quit" to end the session."""
        word = text.lower()
        if word in ("q", "quit", "exit"):
            return "quit"
        if word in ("", "s", "skip"):
            return ""
        if word in ("l", "list"):
            self._list()
            return ""
        match = re.match(r"^([ad])\s*(\d*)$", word)
        if not match:
            self.say("unknown command %r; use a, d, aN, dN, s, list or quit" % text[:40])
            return ""
        pending = list_requests(self.cfg)
        if match.group(2):
            index = int(match.group(2))
            numbered = self._numbered or [r["id"] for r in pending]
            if not 1 <= index <= len(numbered):
                self.say("no request number %d; run list to see the numbers" % index)
                return ""
            reqid = numbered[index - 1]
        elif len(pending) == 1:
            reqid = pending[0]["id"]
        else:
            self.say("%d requests pending; use aN/dN after list" % len(pending))
            return ""
        try:
            if match.group(1) == "a":
                entry = approve(self.cfg, self.registry, reqid)
                self.say("approved %s (%s, expires %s)" % (reqid, entry["hostname"], entry["expiry"]))
            else:
                deny(self.cfg, reqid)
                self.say("denied %s" % reqid)
        except PKIError as exc:
            self.say("error: %s" % exc)
        return ""

    def _list(self) -> None:
        pending = list_requests(self.cfg)
        self._numbered = [r["id"] for r in pending]
        if not pending:
            self.say("no pending requests")
        for number, row in enumerate(pending, 1):
            self.say("%2d. %s  hostname %s  ip %s  code %s  received %s" % (
                number, row["id"], row["hostname"], row["ip"], row["code"], row["received"]))


def _pairing_dir(cfg) -> str:
    """<state_dir>/pairing."""
    return os.path.join(cfg.state_dir, "pairing")


def _queue_path(folder: str, reqid: str, ext: str) -> str:
    """Path of a queue file; the reqid is checked before it becomes a file name."""
    if not isinstance(reqid, str) or not PAIRING_REQID_RE.match(reqid):
        raise PKIError(f"pairing request id {reqid!r} is not valid; 16 lowercase hex characters are accepted")
    return os.path.join(folder, reqid + ext)


def _pending_ids(folder: str) -> list:
    """Reqids with a .json and no decision yet."""
    try:
        names = set(os.listdir(folder))
    except OSError:
        return []
    ids = []
    for fname in names:
        reqid, dot, ext = fname.partition(".")
        if ext == "json" and PAIRING_REQID_RE.match(reqid) \
                and reqid + ".approved" not in names and reqid + ".denied" not in names:
            ids.append(reqid)
    return sorted(ids)


def _load_pending(folder: str, reqid: str) -> dict:
    """Queue record of an undecided request, or PKIError naming list-requests."""
    path = _queue_path(folder, reqid, ".json")
    for ext in (".approved", ".denied"):
        if os.path.exists(_queue_path(folder, reqid, ext)):
            raise PKIError(f"pairing request {reqid} was already decided")
    record = _read_json(path)
    if not isinstance(record, dict):
        raise PKIError(f"no pending pairing request {reqid}; run list-requests to see pending ids")
    return record


def _read_json(path: str):
    """Parsed JSON of a small file, or None if absent/unreadable."""
    try:
        with open(path, "rb") as fh:
            return json.loads(fh.read(1 << 20))
    except (OSError, ValueError):
        return None


def _unlink(*paths: str) -> None:
    """Remove files, ignoring ones already gone."""
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            wire.log_action("warning", "pair-cleanup", path=path, error=exc.strerror)


def _parse_pair_request(request, source_ip: str) -> tuple:
    """Validate a POST /pair request; returns (queue fields, "") or ({}, refusal reason)."""
    def reject(reason: str, why: str) -> tuple:
        wire.log_action("warning", "pair-reject", reason=reason.replace(" ", "-"),
                        ip=source_ip, error=why)
        return {}, reason

    if request.method != "POST" or request.path.split("?")[0] != "/pair":
        return reject("invalid request", "expected POST /pair")
    try:
        body = json.loads(request.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: deep nesting
        return reject("invalid request", "body is not JSON")
    if not isinstance(body, dict) or not isinstance(body.get("csr"), str) \
            or not isinstance(body.get("hostname"), str):
        return reject("invalid request", "csr and hostname strings are required")
    hostname = body["hostname"]
    # The hostname becomes the registry file name: allow-regex before anything else.
    if not store.valid_agent_name(hostname):
        return reject("invalid hostname", "hostname fails ^[A-Za-z0-9][A-Za-z0-9._-]*$")
    nonce = body.get("nonce", "")
    if not isinstance(nonce, str) or (nonce and not _NONCE_RE.match(nonce)):
        return reject("invalid request", "nonce must be up to 128 hex/base64 characters")
    lookup_by = body.get("lookup_by", "")
    if lookup_by not in ("", None, "ip", "hostname"):
        return reject("invalid request", "lookup_by must be ip or hostname")
    port = body.get("port", wire.AGENT_PORT)
    try:
        port = _check_port(port)
    except PKIError:
        return reject("invalid request", "port must be 1-65535")
    try:
        check_csr(body["csr"].encode("utf-8"))
    except PKIError as exc:
        return reject("invalid request", "CSR refused: %s" % exc)
    ip = source_ip
    reported = body.get("ip")
    if isinstance(reported, str):
        try:
            ip = str(ipaddress.ip_address(reported.strip()))
        except ValueError:
            pass  # not an IP literal: record where the connection came from instead
    fields = {
        "id": "", "hostname": hostname, "ip": ip, "source_ip": source_ip,
        "csr": body["csr"], "nonce": nonce, "lookup_by": lookup_by or "", "port": port,
        "received": wire.utc_timestamp(), "code": pairing_code(body["csr"].encode("utf-8")),
        # Reverse DNS is deliberately skipped: an unbounded resolver call could
        # stall the listener, and the operator compares the code instead.
        "reverse_dns": "", "reverse_confirmed": 0,
    }
    return fields, ""


def _rate_limit_tuple(value) -> tuple:
    """(limit, window_s, block_s) from a tuple or "10/60/300" text."""
    if isinstance(value, str):
        value = value.split("/")
    try:
        limit, window, block = (int(v) for v in value)
    except (TypeError, ValueError):
        raise PKIError(f"pairing_rate_limit_volume {value!r} is not valid; limit/window/block "
                       "such as 10/60/300 is accepted")
    return limit, window, block


def _send(tls, data: bytes) -> None:
    """sendall under the connection's I/O deadline."""
    tls.settimeout(PAIRING_IO_TIMEOUT_S)
    tls.sendall(data)


def _drain(tls, limit: int = 4 * wire.MAX_PAIRING_BODY_BYTES, idle_s: float = 0.3,
           total_s: float = 3.0) -> None:
    """Read and discard what the client is still sending (bounded in bytes and time),
    so closing does not reset the connection before the client has read our refusal."""
    deadline = time.monotonic() + total_s
    seen = 0
    while seen < limit:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        tls.settimeout(min(idle_s, left))
        try:
            chunk = tls.recv(65536)
        except (OSError, ssl.SSLError):   # socket.timeout included: the client went quiet
            return
        if not chunk:
            return
        seen += len(chunk)


class _StopFlag:
    """A flag a signal handler may set: no locks, unlike threading.Event, whose
    set() could deadlock if the signal lands while the main thread holds its lock."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


def _install_stop_signals(stop: _StopFlag):
    """SIGTERM/SIGINT set `stop` (main thread only); returns a function restoring handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {}

    def handler(signum, frame):
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[signum] = signal.signal(signum, handler)
        except (ValueError, OSError):
            pass

    def restore() -> None:
        for signum, old in previous.items():
            try:
                signal.signal(signum, old)
            except (ValueError, OSError, TypeError):
                pass
    return restore


def _read_line(stream, wait_s: float):
    """One line from stream if it becomes readable within wait_s; "" at EOF is "quit"."""
    try:
        ready, _, _ = select.select([stream], [], [], wait_s)
    except (OSError, ValueError, TypeError):
        time.sleep(wait_s)
        return None
    if not ready:
        return None
    line = stream.readline()
    return line if line else "quit"
