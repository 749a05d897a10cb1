"""TLS policy on the three TLS ports: agent (7443 protocol), pairing (7444), API over HTTPS.

Policy (SPEC §2, ctrlexec_agent._apply_tls_policy): TLS 1.2 minimum; TLS 1.2 suites
ECDHE + AES-GCM only; TLS 1.3 AEAD suites. Every server here has an ECDSA P-256 key
(pki.py), so the refused suites are the ECDSA-authenticated ones the server could
otherwise pick: CBC with SHA-1 / SHA-256 / SHA-384 MACs, NULL encryption, and
ChaCha20 (AEAD, but outside the ECDHE+AES-GCM list). RSA-key-exchange suites cannot
be negotiated with an ECDSA certificate whatever the policy, so they prove nothing here.

Each hostile client is first shown to work against a permissive control server
(in this process, TLS 1.0+, SECLEVEL=0, same kind of certificate): a refusal by
our ports is then the policy, not a client that never offered the protocol.
The agent under test has rate_limit_disable = 1, because every refused handshake
counts as a TLS failure for its source IP.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import warnings

import pytest

import pki
from apitest_support import ApiServer
from fleet import Fleet
from reliability_support import PairingProc

HANDSHAKE_TIMEOUT_S = 10.0
#: TLS 1.2 suites outside the policy that an ECDSA server could otherwise negotiate.
REFUSED_TLS12_SUITES = [
    "ECDHE-ECDSA-AES128-SHA",          # CBC, SHA-1 MAC
    "ECDHE-ECDSA-AES256-SHA",          # CBC, SHA-1 MAC
    "ECDHE-ECDSA-AES128-SHA256",       # CBC, SHA-256 MAC
    "ECDHE-ECDSA-AES256-SHA384",       # CBC, SHA-384 MAC
    "ECDHE-ECDSA-NULL-SHA",            # no encryption at all
    "ECDHE-ECDSA-CHACHA20-POLY1305",   # AEAD but not ECDHE+AES-GCM
]
OLD_VERSIONS = {"TLSv1": ssl.TLSVersion.TLSv1, "TLSv1.1": ssl.TLSVersion.TLSv1_1}


def client(*, version: ssl.TLSVersion | None = None, suite: str | None = None,
           cert: tuple | None = None) -> ssl.SSLContext:
    """A client context that offers exactly one old protocol or one TLS 1.2 suite."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if version is not None:
            ctx.minimum_version = version
            ctx.maximum_version = version
            ctx.set_ciphers("ALL:@SECLEVEL=0")
        if suite is not None:
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_ciphers(suite + ":@SECLEVEL=0")
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return ctx


def handshake(address: str, port: int, ctx: ssl.SSLContext) -> tuple | None:
    """Complete a handshake: (version, cipher) on success, None when refused or closed."""
    raw = socket.create_connection((address, port), timeout=HANDSHAKE_TIMEOUT_S)
    try:
        tls = ctx.wrap_socket(raw)
    except (ssl.SSLError, OSError):
        return None
    finally:
        raw.close()
    try:
        return tls.version(), tls.cipher()[0]
    finally:
        tls.close()


class ControlServer:
    """Permissive TLS server (TLS 1.0+, every suite, SECLEVEL=0) with a P-256 certificate."""

    def __init__(self, cert: str, key: str) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.ctx.minimum_version = ssl.TLSVersion.TLSv1
        self.ctx.set_ciphers("ALL:eNULL:@SECLEVEL=0")
        self.ctx.load_cert_chain(cert, key)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            try:
                self.ctx.wrap_socket(conn, server_side=True).close()
            except (ssl.SSLError, OSError):
                conn.close()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture(scope="module")
def ports(tmp_path_factory):
    """{name: (address, port, client cert or None)} for the agent, pairing and API ports."""
    root = tmp_path_factory.mktemp("tls")
    fleet = Fleet(str(root))
    api = pairing = control = None
    try:
        agent = fleet.add_agent("web-01", conf_extra={"rate_limit_disable": 1})
        cfg = fleet.cfg
        cert_pem, key_pem = pki.issue_cert(cfg.ca_dir, "127.0.0.1")
        (root / "api.crt").write_bytes(cert_pem)
        (root / "api.key").write_bytes(key_pem)
        os.chmod(str(root / "api.key"), 0o600)
        api = ApiServer.for_fleet(fleet, str(root / "api.log"), api_cert=str(root / "api.crt"),
                                  api_key=str(root / "api.key")).start()
        pairing = PairingProc(fleet, str(root / "pairing.log")).start()
        control = ControlServer(str(root / "api.crt"), str(root / "api.key"))
        yield {
            "agent": (agent.address, agent.port, (cfg.cert, cfg.key)),
            "pairing": ("127.0.0.1", pairing.port, None),
            "api": ("127.0.0.1", api.port, None),
            "_control": ("127.0.0.1", control.port, None),
            "_procs": {"agent": agent, "pairing": pairing, "api": api},
        }
    finally:
        if control is not None:
            control.stop()
        if api is not None:
            api.stop()
        if pairing is not None:
            pairing.stop()
        fleet.stop_all()


PORTS = ["agent", "pairing", "api"]


@pytest.mark.parametrize("name", PORTS)
def test_tls12_gcm_and_tls13_are_accepted(ports, name):
    address, port, cert = ports[name]
    got = handshake(address, port, client(suite="ECDHE-ECDSA-AES128-GCM-SHA256", cert=cert))
    assert got == ("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert:
        ctx.load_cert_chain(*cert)
    got = handshake(address, port, ctx)
    assert got is not None and got[0] == "TLSv1.3", got


@pytest.mark.parametrize("version", sorted(OLD_VERSIONS))
@pytest.mark.parametrize("name", PORTS)
def test_tls10_and_tls11_are_refused(ports, name, version):
    ctx = client(version=OLD_VERSIONS[version])
    control = handshake(*ports["_control"][:2], ctx)
    if control is None:
        pytest.skip("this OpenSSL build cannot offer %s at all" % version)
    assert control[0] == version                      # the client really offers it
    address, port, cert = ports[name]
    assert handshake(address, port, client(version=OLD_VERSIONS[version], cert=cert)) is None
    assert ports["_procs"][name].alive() if name != "agent" else \
        ports["_procs"][name].proc.poll() is None


@pytest.mark.parametrize("suite", REFUSED_TLS12_SUITES)
@pytest.mark.parametrize("name", PORTS)
def test_tls12_suites_outside_ecdhe_aes_gcm_are_refused(ports, name, suite):
    try:
        ctx = client(suite=suite)
    except ssl.SSLError:
        pytest.skip("this OpenSSL build has no %s" % suite)
    control = handshake(*ports["_control"][:2], ctx)
    if control is None:
        pytest.skip("this OpenSSL build cannot negotiate %s" % suite)
    assert control == ("TLSv1.2", suite)              # the client really offers it
    address, port, cert = ports[name]
    assert handshake(address, port, client(suite=suite, cert=cert)) is None


def test_refused_handshakes_leave_every_server_up_and_quiet(ports):
    procs = ports["_procs"]
    assert procs["agent"].proc.poll() is None
    assert procs["pairing"].alive() and procs["api"].alive()
    api_log = procs["api"].log()
    assert "Traceback" not in api_log, api_log[-3000:]
    assert "ACTION=api-tls-failure" in api_log
    assert "Traceback" not in procs["pairing"].log()
    assert "Traceback" not in procs["agent"].log()
    # still serving a policy-conforming client after all the refusals
    address, port, _ = ports["api"]
    got = handshake(address, port, client(suite="ECDHE-ECDSA-AES256-GCM-SHA384"))
    assert got == ("TLSv1.2", "ECDHE-ECDSA-AES256-GCM-SHA384")
