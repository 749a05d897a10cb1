"""ctrl-exec PKI: the CA, certificates, CSR checks and enrolment bundles.

Owns: ``<ca_dir>/ca.key`` + ``ca.crt``, the dispatcher certificate and key at
``cfg.cert`` / ``cfg.key``, and enrolment bundles written by :func:`enroll`
(reference §4.1, §4.3, §4.4). The pairing service (port 7444 and its queue) is
``pairing.py``, which calls :func:`check_csr` / :func:`sign_csr` from here.

Never does: shell out (all crypto is the ``cryptography`` library), print or log
private key material, overwrite an existing CA key, sign a CSR that failed
:func:`check_csr`, use an unvalidated name as a file name, or import
``pairing``. Registry records are written through ``store.Registry``; this
module never touches ``agents/`` directly. Files are written with
``wire.atomic_write``.
"""
from __future__ import annotations

__all__ = [
    "PKIError",
    "CA_COMMON_NAME", "DISPATCHER_COMMON_NAME",
    "CA_DAYS", "LEAF_DAYS", "MAX_CSR_BYTES",
    "create_ca", "create_dispatcher_cert", "issue_cert",
    "check_csr", "sign_csr", "cert_serial", "cert_expiry", "spki_sha256",
    "read_ca_cert", "dispatcher_serial", "enroll", "check_port",
]

import datetime
import hashlib
import ipaddress
import os
import re
import secrets

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
KEY_MODE = 0o600
CERT_MODE = 0o644
TAG_KEY_RE = re.compile(r"^\w[\w-]*$")


class PKIError(Exception):
    """Any PKI failure; str() says what was wrong and what is accepted."""


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


def spki_sha256(public_key) -> str:
    """SHA-256 hex of a public key's DER SubjectPublicKeyInfo (what revocation matches on)."""
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def cert_expiry(cert_pem) -> str:
    """Return the certificate's notAfter as openssl prints it ("Jun  7 16:28:00 2027 GMT").

    Raises: PKIError if the PEM cannot be parsed.
    """
    return wire.openssl_date(_load_cert(cert_pem).not_valid_after_utc)


def read_ca_cert(ca_dir: str) -> bytes:
    """Return the PEM bytes of ``ca_dir/ca.crt`` (parsed once to be sure it is a certificate).

    Raises: PKIError naming setup-ca if the file is missing, unreadable or not a certificate.
    """
    return _read_cert_file(os.path.join(ca_dir, CA_CERT_NAME), "CA certificate", "setup-ca")


def dispatcher_serial(cfg) -> str:
    """Return the canonical serial of the dispatcher certificate this host serves (cfg.cert).

    Agents trust exactly this serial (reference §4.7), so an unreadable cert is an
    error, never an empty serial.
    Raises: PKIError naming setup-dispatcher if cfg.cert is missing or not a certificate.
    """
    return cert_serial(_read_cert_file(cfg.cert, "dispatcher certificate", "setup-dispatcher"))


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
    port = check_port(port)
    tags = _check_tags(tags)
    dispatcher_id = getattr(cfg, "dispatcher_id", "") or ""
    if not wire.DISPATCHER_ID_RE.match(dispatcher_id):
        raise PKIError(f"dispatcher_id {dispatcher_id!r} is not valid; "
                       "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$ is accepted")
    serial = dispatcher_serial(cfg)
    ca_pem = read_ca_cert(cfg.ca_dir)
    cert_pem, key_pem = issue_cert(cfg.ca_dir, name[:64])

    _makedirs(out_dir, 0o755)
    _write_file(os.path.join(out_dir, "agent.key"), key_pem, KEY_MODE)
    _write_file(os.path.join(out_dir, "agent.crt"), cert_pem, CERT_MODE)
    _write_file(os.path.join(out_dir, "ca.crt"), ca_pem, CERT_MODE)
    _write_file(os.path.join(out_dir, "ctrl-exec-dispatchers"),
                _trusted_map_text(serial, dispatcher_id), CERT_MODE)
    _write_file(os.path.join(out_dir, "agent.conf"),
                _agent_conf_text(name, address, port, tags), CERT_MODE)
    _write_file(os.path.join(out_dir, "scripts.conf"), _SCRIPTS_CONF_TEXT.encode(), CERT_MODE)
    _makedirs(os.path.join(out_dir, "state"), 0o750)

    record = {
        "hostname": name, "ip": address, "port": port, "lookup_by": "ip",
        "paired": wire.utc_timestamp(), "expiry": cert_expiry(cert_pem), "tags": tags,
        "dispatcher_serial": serial, "serial_status": "current",
        "serial": cert_serial(cert_pem),
        "spki_sha256": spki_sha256(_load_cert(cert_pem).public_key()),
    }
    _registry_put(registry, name, record)
    wire.log_action("info", "enroll", agent=name, ip=address, port=port,
                    serial=cert_serial(cert_pem), expiry=record["expiry"])
    return record


def check_port(port) -> int:
    """Return a TCP port 1-65535 given as an int or a digit string (enrolment and pairing).

    Raises: PKIError saying 1-65535 is accepted.
    """
    try:
        value = int(str(port).strip()) if not isinstance(port, bool) else -1
    except ValueError:
        value = -1
    if not 1 <= value <= 65535:
        raise PKIError(f"port {port!r} is not valid; 1-65535 is accepted")
    return value


# --- private ---------------------------------------------------------------------

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


def _read_cert_file(path: str, what: str, setup: str) -> bytes:
    """PEM bytes of a certificate file (validated), or PKIError saying to run `setup`."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise PKIError(f"{what} {path} is not readable ({exc.strerror}); run {setup} first")
    _load_cert(data, what=f"{what} {path}")
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
    """wire.atomic_write (durable: the folder is fsynced too); OSError becomes PKIError.

    With overwrite=False an existing file is never replaced (the CA key).
    """
    try:
        wire.atomic_write(path, data, mode, overwrite=overwrite, sync_dir=True)
    except FileExistsError:
        raise PKIError(f"{path} already exists; refusing to overwrite")
    except OSError as exc:
        raise PKIError(f"cannot write {path} ({exc.strerror}); a writable folder is needed")


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


def _registry_put(registry, name: str, record: dict) -> None:
    """Write a registry record, turning store errors into PKIError."""
    try:
        registry.put(name, record)
    except (store.StoreError, OSError, ValueError) as exc:
        raise PKIError(f"cannot register agent {name!r}: {exc}")
