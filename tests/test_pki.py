"""Tests for pki.py: CA, dispatcher and leaf certificates, CSR rules, enrolment bundles.

Real certificates only; TLS checks run real handshakes on 127.0.0.1 with the
contexts from ctrlexec_agent (the wire module).
"""
from __future__ import annotations

import datetime
import os
import re
import socket
import ssl
import stat
import subprocess
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import config
import ctrlexec_agent as wire
import pki
import store

OPENSSL_TIMEOUT_S = 30


# --- helpers -------------------------------------------------------------------------

def make_csr(key=None, cn="web-01", algorithm=None) -> bytes:
    """PEM CSR for key (new P-256 key by default), signed with algorithm (SHA-256)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]) if cn else x509.Name([]))
    return builder.sign(key, algorithm or hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def openssl_csr(tmp_path, digest: str, bits: int = 2048) -> bytes:
    """CSR made by the openssl binary (cryptography refuses to sign with MD5/SHA-1)."""
    key = tmp_path / ("k%d.pem" % bits)
    out = tmp_path / ("%s.csr" % digest)
    subprocess.run(["openssl", "genrsa", "-out", str(key), str(bits)], check=True,
                   capture_output=True, timeout=OPENSSL_TIMEOUT_S)
    subprocess.run(["openssl", "req", "-new", "-key", str(key), "-subj", "/CN=web-01",
                    "-" + digest, "-out", str(out)], check=True, capture_output=True,
                   timeout=OPENSSL_TIMEOUT_S)
    return out.read_bytes()


def openssl_text(args, data: bytes | None = None) -> str:
    """stdout of an openssl command."""
    return subprocess.run(["openssl", *args], input=data, check=True, capture_output=True,
                          timeout=OPENSSL_TIMEOUT_S).stdout.decode()


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def handshake(server_ctx, client_ctx):
    """One TLS handshake on 127.0.0.1; returns (server-side peer serial, client-side peer serial)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(10)
    seen = {}

    def serve():
        conn, _ = listener.accept()
        conn.settimeout(10)
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                seen["server"] = wire.peer_serial(tls)
                tls.recv(1)
        except (OSError, ssl.SSLError) as exc:
            seen["error"] = exc

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as raw:
            with client_ctx.wrap_socket(raw) as tls:
                seen["client"] = wire.peer_serial(tls)
    finally:
        thread.join(10)
        listener.close()
    assert "error" not in seen, seen.get("error")
    return seen["server"], seen["client"]


@pytest.fixture
def ca_dir(tmp_path):
    path = tmp_path / "ca"
    pki.create_ca(str(path))
    return path


@pytest.fixture
def cfg(tmp_path, ca_dir):
    """A real config.load() Config with a dispatcher cert in place."""
    conf = tmp_path / "ctrl-exec.conf"
    conf.write_text("ca_dir = ca\nstate_dir = state\ndispatcher_id = ctl-test\n")
    loaded = config.load(str(conf))
    pki.create_dispatcher_cert(loaded.ca_dir, loaded.cert, loaded.key)
    return loaded


# --- CA ------------------------------------------------------------------------------

def test_create_ca_writes_p256_key_0600_and_ca_cert(ca_dir):
    assert mode_of(ca_dir / "ca.key") == 0o600
    assert mode_of(ca_dir / "ca.crt") == 0o644
    key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=ctrl-exec CA"
    assert cert.issuer == cert.subject
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 3649 <= days <= 3651
    assert not [n for n in os.listdir(ca_dir) if n.startswith(".tmp")]


def test_create_ca_refuses_to_overwrite_existing_key(ca_dir):
    before = (ca_dir / "ca.key").read_bytes()
    with pytest.raises(pki.PKIError, match="CA already exists at .*ca.key; refusing to overwrite"):
        pki.create_ca(str(ca_dir))
    assert (ca_dir / "ca.key").read_bytes() == before


def test_issue_cert_requires_a_ca(tmp_path):
    with pytest.raises(pki.PKIError, match="run setup-ca first"):
        pki.issue_cert(str(tmp_path / "nothing"), "web-01")


def test_ca_key_is_written_by_atomic_write_that_never_replaces(tmp_path):
    # pki writes through the agent's one atomic_write; overwrite=False must never
    # replace an existing file (two concurrent setup-ca runs cannot both win).
    target = tmp_path / "ca.key"
    target.write_bytes(b"first")
    with pytest.raises(FileExistsError):
        wire.atomic_write(str(target), b"second", 0o600, overwrite=False, sync_dir=True)
    assert target.read_bytes() == b"first"
    wire.atomic_write(str(tmp_path / "new.key"), b"key", 0o600, overwrite=False, sync_dir=True)
    assert mode_of(tmp_path / "new.key") == 0o600
    assert sorted(os.listdir(tmp_path)) == ["ca.key", "new.key"]      # no temp file left


def test_read_ca_cert_and_dispatcher_serial(cfg):
    assert pki.read_ca_cert(cfg.ca_dir) == open(cfg.ca, "rb").read()
    assert pki.dispatcher_serial(cfg) == pki.cert_serial(open(cfg.cert, "rb").read())
    os.unlink(cfg.cert)
    with pytest.raises(pki.PKIError, match="dispatcher certificate .* run setup-dispatcher first"):
        pki.dispatcher_serial(cfg)


# --- leaf certificates -------------------------------------------------------------------

def test_dispatcher_cert_is_ca_signed_leaf_with_0600_key(tmp_path, ca_dir):
    cert_path, key_path = tmp_path / "d" / "dispatcher.crt", tmp_path / "d" / "dispatcher.key"
    serial = pki.create_dispatcher_cert(str(ca_dir), str(cert_path), str(key_path))
    assert mode_of(key_path) == 0o600 and mode_of(cert_path) == 0o644
    pem = cert_path.read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    assert cert.subject.rfc4514_string() == "CN=ctrl-exec-dispatcher"
    assert serial == pki.cert_serial(pem)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.signature_hash_algorithm.name == "sha256"
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 824 <= days <= 826
    out = openssl_text(["verify", "-x509_strict", "-CAfile", str(ca_dir / "ca.crt"), str(cert_path)])
    assert out.strip().endswith("OK")


def test_issue_cert_serials_are_random_positive_64_bit(ca_dir):
    serials = set()
    for _ in range(5):
        cert_pem, key_pem = pki.issue_cert(str(ca_dir), "web-01")
        number = x509.load_pem_x509_certificate(cert_pem).serial_number
        assert (1 << 62) <= number < (1 << 63)
        serials.add(number)
        assert b"PRIVATE KEY" in key_pem
    assert len(serials) == 5


def test_cert_serial_and_expiry_match_openssl(ca_dir):
    cert_pem, _ = pki.issue_cert(str(ca_dir), "web-01")
    serial_line = openssl_text(["x509", "-noout", "-serial"], cert_pem).strip()
    assert pki.cert_serial(cert_pem) == wire.canonical_serial(serial_line)
    assert re.fullmatch(r"[0-9a-f]+", pki.cert_serial(cert_pem))
    end_line = openssl_text(["x509", "-noout", "-enddate"], cert_pem).strip()
    assert pki.cert_expiry(cert_pem) == end_line.split("=", 1)[1]
    assert re.fullmatch(r"[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4} GMT", pki.cert_expiry(cert_pem))


def test_cert_serial_of_digit_only_hex_serial_matches_live_peer_serial(tmp_path, ca_dir):
    # Hex "1234" is re-read as decimal by the reference canonicaliser; the file
    # form and the live TLS form must still agree.
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(0x1234)
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    assert pki.cert_serial(pem) == wire.canonical_serial("1234") == "4d2"
    (tmp_path / "odd.crt").write_bytes(pem)
    (tmp_path / "odd.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    agent_cert, agent_key = pki.issue_cert(str(ca_dir), "agent")
    (tmp_path / "a.crt").write_bytes(agent_cert)
    (tmp_path / "a.key").write_bytes(agent_key)
    server_ctx = wire.server_context(str(tmp_path / "a.crt"), str(tmp_path / "a.key"), str(ca_dir / "ca.crt"))
    client_ctx = wire.client_context(str(tmp_path / "odd.crt"), str(tmp_path / "odd.key"), str(ca_dir / "ca.crt"))
    server_seen, _ = handshake(server_ctx, client_ctx)
    assert server_seen == pki.cert_serial(pem)


def test_agent_and_dispatcher_certs_work_both_ways_under_strict_verification(tmp_path, ca_dir):
    files = {}
    for name in ("web-01", "ctrl-exec-dispatcher"):
        cert_pem, key_pem = pki.issue_cert(str(ca_dir), name)
        (tmp_path / (name + ".crt")).write_bytes(cert_pem)
        (tmp_path / (name + ".key")).write_bytes(key_pem)
        files[name] = (str(tmp_path / (name + ".crt")), str(tmp_path / (name + ".key")), cert_pem)
    ca = str(ca_dir / "ca.crt")
    for server, client in (("web-01", "ctrl-exec-dispatcher"), ("ctrl-exec-dispatcher", "web-01")):
        server_ctx = wire.server_context(files[server][0], files[server][1], ca)
        client_ctx = wire.client_context(files[client][0], files[client][1], ca)
        for ctx in (server_ctx, client_ctx):
            ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        server_seen, client_seen = handshake(server_ctx, client_ctx)
        assert server_seen == pki.cert_serial(files[client][2])
        assert client_seen == pki.cert_serial(files[server][2])


# --- CSR rules -------------------------------------------------------------------------

@pytest.mark.parametrize("key_factory", [
    lambda: ec.generate_private_key(ec.SECP256R1()),
    lambda: ec.generate_private_key(ec.SECP384R1()),
    lambda: rsa.generate_private_key(65537, 2048),
], ids=["p256", "p384", "rsa2048"])
def test_check_csr_accepts_rsa2048_and_p256_p384(key_factory):
    csr = pki.check_csr(make_csr(key_factory()))
    assert csr.subject.rfc4514_string() == "CN=web-01"


def test_check_csr_accepts_str_input():
    assert pki.check_csr(make_csr().decode())


@pytest.mark.parametrize("digest,label", [("md5", "MD5"), ("sha1", "SHA1")])
def test_check_csr_refuses_md5_and_sha1_signatures(tmp_path, digest, label):
    pem = openssl_csr(tmp_path, digest)
    with pytest.raises(pki.PKIError, match="signed with %s; SHA-224/256/384/512 signatures are accepted" % label):
        pki.check_csr(pem)


def test_check_csr_refuses_rsa_1024():
    pem = make_csr(rsa.generate_private_key(65537, 1024))
    with pytest.raises(pki.PKIError, match="RSA 1024-bit key; RSA 2048-16384 bits or EC P-256/P-384"):
        pki.check_csr(pem)


@pytest.mark.parametrize("key_factory,text", [
    (lambda: ec.generate_private_key(ec.SECP521R1()), "curve secp521r1"),
    (lambda: ec.generate_private_key(ec.SECP256K1()), "curve secp256k1"),
    (lambda: ed25519.Ed25519PrivateKey.generate(), "Ed25519"),
], ids=["p521", "secp256k1", "ed25519"])
def test_check_csr_refuses_other_key_types(key_factory, text):
    key = key_factory()
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web-01")]))
    pem = builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(pki.PKIError, match=text + ".*EC P-256/P-384 keys are accepted"):
        pki.check_csr(pem)


def test_check_csr_refuses_bad_self_signature():
    csr = x509.load_pem_x509_csr(make_csr())
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x55          # inside the signature value; the structure still parses
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(pki.PKIError, match="self-signature does not verify"):
        pki.check_csr(tampered)


def test_check_csr_refuses_swapped_subject():
    # A CSR whose subject was changed after signing: the signature no longer covers it.
    good = x509.load_pem_x509_csr(make_csr(cn="web-01"))
    der = bytes(good.public_bytes(serialization.Encoding.DER))
    assert der.count(b"web-01") == 1
    tampered = x509.load_der_x509_csr(der.replace(b"web-01", b"evil-1")).public_bytes(
        serialization.Encoding.PEM)
    with pytest.raises(pki.PKIError, match="self-signature does not verify"):
        pki.check_csr(tampered)


def test_check_csr_refuses_oversized_pem():
    pem = make_csr() + b"\n" * (pki.MAX_CSR_BYTES)
    with pytest.raises(pki.PKIError, match=r"CSR is \d+ bytes; at most 10240 bytes are accepted"):
        pki.check_csr(pem)


@pytest.mark.parametrize("pem", [b"", b"hello", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"])
def test_check_csr_refuses_non_pem(pem):
    with pytest.raises(pki.PKIError, match="BEGIN CERTIFICATE REQUEST-----' is accepted"):
        pki.check_csr(pem)


def test_check_csr_refuses_unparseable_pem():
    pem = b"-----BEGIN CERTIFICATE REQUEST-----\nbm90IGEgY3Ny\n-----END CERTIFICATE REQUEST-----\n"
    with pytest.raises(pki.PKIError, match="could not be parsed.*PKCS#10 request is accepted"):
        pki.check_csr(pem)


def test_check_csr_refuses_missing_common_name():
    with pytest.raises(pki.PKIError, match="no common name"):
        pki.check_csr(make_csr(cn=None))


def test_sign_csr_copies_subject_and_signs_825_days(ca_dir):
    key = rsa.generate_private_key(65537, 2048)
    cert = x509.load_pem_x509_certificate(pki.sign_csr(str(ca_dir), make_csr(key, cn="agent01.example.net")))
    assert cert.subject.rfc4514_string() == "CN=agent01.example.net"
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca_cert)
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 824 <= days <= 826


def test_sign_csr_binds_expected_cn(ca_dir):
    pem = make_csr(cn="web-01")
    assert pki.sign_csr(str(ca_dir), pem, expected_cn="web-01", days=365)
    with pytest.raises(pki.PKIError, match="'web-01' does not match 'web-02'"):
        pki.sign_csr(str(ca_dir), pem, expected_cn="web-02")


def test_sign_csr_refuses_a_bad_csr(ca_dir):
    with pytest.raises(pki.PKIError, match="RSA 1024-bit"):
        pki.sign_csr(str(ca_dir), make_csr(rsa.generate_private_key(65537, 1024)))


# --- enrolment -----------------------------------------------------------------------------

def test_enroll_writes_bundle_and_registers(tmp_path, cfg):
    registry = store.Registry(cfg.state_dir)
    out = tmp_path / "bundle"
    record = pki.enroll(cfg, registry, "web-01", address="127.0.0.2", port=7450,
                        tags={"role": "web", "env": "prod"}, out_dir=str(out))
    dispatcher_serial = pki.cert_serial(open(cfg.cert, "rb").read())
    agent_pem = (out / "agent.crt").read_bytes()
    assert record == {
        "hostname": "web-01", "ip": "127.0.0.2", "port": 7450, "lookup_by": "ip",
        "paired": record["paired"], "expiry": pki.cert_expiry(agent_pem),
        "tags": {"role": "web", "env": "prod"}, "dispatcher_serial": dispatcher_serial,
        "serial_status": "current", "serial": pki.cert_serial(agent_pem),
        "spki_sha256": pki.spki_sha256(x509.load_pem_x509_certificate(agent_pem).public_key()),
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record["paired"])
    assert registry.get("web-01") == record
    assert mode_of(out / "agent.key") == 0o600
    assert x509.load_pem_x509_certificate(agent_pem).subject.rfc4514_string() == "CN=web-01"
    assert (out / "ca.crt").read_bytes() == (open(cfg.ca, "rb").read())
    lines = (out / "ctrl-exec-dispatchers").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("#") and lines[1].startswith("#")
    assert lines[2] == "%s ctl-test" % dispatcher_serial
    conf = (out / "agent.conf").read_text()
    for line in ("port = 7450", "bind = 127.0.0.2", "cert = agent.crt", "key = agent.key",
                 "ca = ca.crt", "trusted_dispatchers_path = ctrl-exec-dispatchers",
                 "state_dir = state", "[tags]", "env = prod", "role = web"):
        assert line in conf.splitlines()
    assert conf.index("[tags]") > conf.index("state_dir")
    scripts = (out / "scripts.conf").read_text().splitlines()
    assert scripts and all(line.startswith("#") for line in scripts)
    out_text = openssl_text(["verify", "-x509_strict", "-CAfile", str(out / "ca.crt"), str(out / "agent.crt")])
    assert out_text.strip().endswith("OK")
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]


def test_enroll_refuses_without_dispatcher_cert(tmp_path, ca_dir):
    cfg = config.Config(ca_dir=str(ca_dir), state_dir=str(tmp_path / "state"), dispatcher_id="ctl")
    with pytest.raises(pki.PKIError, match="run setup-dispatcher"):
        pki.enroll(cfg, store.Registry(cfg.state_dir), "web-01", address="127.0.0.2",
                   out_dir=str(tmp_path / "b"))
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("kwargs,text", [
    ({"name": "../etc"}, "agent name"),
    ({"name": "-web"}, "agent name"),
    ({"address": "not an address!"}, "address"),
    ({"port": 0}, "port"),
    ({"port": "x"}, "port"),
    ({"tags": {"bad key": "v"}}, "tag key"),
    ({"tags": {"k": "two\nlines"}}, "tag value"),
])
def test_enroll_refuses_bad_arguments(tmp_path, cfg, kwargs, text):
    args = {"name": "web-01", "address": "127.0.0.2", "port": 7443, "tags": None}
    args.update(kwargs)
    name = args.pop("name")
    with pytest.raises(pki.PKIError, match=text):
        pki.enroll(cfg, store.Registry(cfg.state_dir), name, out_dir=str(tmp_path / "b"), **args)
    assert store.Registry(cfg.state_dir).names() == []


def test_no_key_material_in_logs_or_output(tmp_path, cfg, capfd):
    registry = store.Registry(cfg.state_dir)
    pki.enroll(cfg, registry, "web-01", address="127.0.0.2", out_dir=str(tmp_path / "b"))
    pki.issue_cert(cfg.ca_dir, "other")
    captured = capfd.readouterr()
    text = captured.out + captured.err
    assert "PRIVATE KEY" not in text
    key_body = "".join((tmp_path / "b" / "agent.key").read_text().splitlines()[1:-1])
    assert key_body[:40] not in text
    ca_body = "".join(open(os.path.join(cfg.ca_dir, "ca.key")).read().splitlines()[1:-1])
    assert ca_body[:40] not in text
