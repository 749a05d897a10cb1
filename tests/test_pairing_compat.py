"""Our agent pairs with an original-style (Perl ctrl-exec 0.12) signer: RSA keys only.

The signer here is a real TLS server on loopback speaking the pairing wire protocol
(one POST /pair, then a "pending" and a final answer on the same connection, as the
reference describes) that, like the original, refuses CSR keys under 2048 RSA bits:
"CSR public key too small (need >= 2048 bits)". The agent is the real
`ctrlexec_agent.py request-pairing` command; the paired agent then serves mTLS with
its RSA key to our dispatcher.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives import serialization

import ctrlexec_agent as wire
import pki
from fleet import free_port, wait_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOO_SMALL = "CSR public key too small (need >= 2048 bits)"


class RsaOnlySigner:
    """A pairing port that signs RSA >= 2048-bit CSRs at once and refuses anything else."""

    def __init__(self, ca_dir: str, dispatcher_cert: str) -> None:
        self.ca_dir = ca_dir
        self.serial = pki.cert_serial(open(dispatcher_cert, "rb").read())
        cert_pem, key_pem = pki.issue_cert(ca_dir, "perl-dispatcher")
        folder = os.path.join(ca_dir, "signer")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "s.crt"), "wb") as handle:
            handle.write(cert_pem)
        with open(os.path.join(folder, "s.key"), "wb") as handle:
            handle.write(key_pem)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(os.path.join(folder, "s.crt"), os.path.join(folder, "s.key"))
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.port = self.listener.getsockname()[1]
        self.seen: list = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            try:
                self._one(conn)
            except (OSError, ValueError, wire.ProtocolError):
                pass
            finally:
                conn.close()

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            tls = self.ctx.wrap_socket(conn, server_side=True)
        except (OSError, ssl.SSLError):
            return                  # the agent's reachability probe: a bare TCP connect
        request = wire.read_request(wire.SocketReader(tls, time.monotonic() + 10))
        body = json.loads(request.body)
        csr = x509.load_pem_x509_csr(body["csr"].encode())
        key = csr.public_key()
        self.seen.append("rsa-%d" % key.key_size if isinstance(key, rsa.RSAPublicKey) else "other")
        if not isinstance(key, rsa.RSAPublicKey) or key.key_size < 2048:
            tls.sendall(wire.encode_response(200, {"status": "error", "reason": TOO_SMALL}))
            return
        tls.sendall(wire.encode_response(200, {"status": "pending", "reqid": "perl-1"}))
        cert = pki.sign_csr(self.ca_dir, body["csr"].encode())
        tls.sendall(wire.encode_response(200, {
            "status": "approved", "cert": cert.decode(), "ca": pki.read_ca_cert(self.ca_dir).decode(),
            "nonce": body["nonce"], "dispatcher_serial": self.serial,
            "dispatcher_id": "perl-dispatcher"}))

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def signer(tmp_path):
    ca_dir = str(tmp_path / "pki")
    pki.create_ca(ca_dir)
    cert, key = os.path.join(ca_dir, "dispatcher.crt"), os.path.join(ca_dir, "dispatcher.key")
    pki.create_dispatcher_cert(ca_dir, cert, key)
    server = RsaOnlySigner(ca_dir, cert)
    try:
        yield server, ca_dir, cert, key
    finally:
        server.close()


@pytest.fixture
def agent_folder(tmp_path):
    folder = tmp_path / "agent"
    folder.mkdir()
    port = free_port()
    (folder / "agent.conf").write_text(
        "port = %d\nbind = 127.0.0.1\ncert = agent.crt\nkey = agent.key\nca = ca.crt\n"
        "trusted_dispatchers_path = ctrl-exec-dispatchers\nstate_dir = state\n" % port)
    (folder / "scripts.conf").write_text("hello = %s\n" % (folder / "hello.sh"))
    (folder / "hello.sh").write_text("#!/bin/sh\necho hello rsa\n")
    os.chmod(folder / "hello.sh", 0o755)
    return folder, port


def _pair(folder, port: int, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "ctrlexec_agent.py"), "request-pairing",
         "--config", str(folder / "agent.conf"), "--dispatcher", "127.0.0.1", "--port",
         str(port), "--name", "web-rsa", "--timeout", "30", *extra],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, CTRL_EXEC_LOG="stderr"))


def test_auto_key_type_pairs_with_an_rsa_only_signer_and_then_serves_mtls(signer, agent_folder):
    server, ca_dir, cert, key = signer
    folder, agent_port = agent_folder
    done = _pair(folder, server.port)
    assert done.returncode == 0, done.stdout + done.stderr
    assert server.seen == ["other", "rsa-3072"]
    assert "asking again with RSA-3072" in done.stdout
    assert len(re.findall(r"Pairing code: \d{6}", done.stdout)) == 2
    agent_key = serialization.load_pem_private_key((folder / "agent.key").read_bytes(), None)
    assert isinstance(agent_key, rsa.RSAPrivateKey) and agent_key.key_size == 3072
    assert "perl-dispatcher" in (folder / "ctrl-exec-dispatchers").read_text()

    serve = subprocess.Popen([sys.executable, os.path.join(REPO, "ctrlexec_agent.py"), "serve",
                              "--config", str(folder / "agent.conf")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, CTRL_EXEC_LOG="stderr"))
    try:
        ctx = wire.client_context(cert, key, os.path.join(ca_dir, "ca.crt"))

        def run_hello():
            try:
                raw = socket.create_connection(("127.0.0.1", agent_port), timeout=5)
            except OSError:
                return None
            try:
                tls = ctx.wrap_socket(raw)
                tls.sendall(wire.encode_request("POST", "/run", {"script": "hello", "reqid": "r1"}))
                status, _, data = wire.read_response(wire.SocketReader(tls, time.monotonic() + 10))
                return json.loads(data)
            finally:
                raw.close()
        answer = wait_for(run_hello, "the RSA-keyed agent to answer over mTLS", 20)
        assert answer["exit"] == 0 and answer["stdout"] == "hello rsa\n"
    finally:
        serve.terminate()
        serve.wait(10)


def test_an_explicit_ec_key_type_is_refused_with_a_hint(signer, agent_folder):
    server, *_ = signer
    folder, _ = agent_folder
    done = _pair(folder, server.port, "--key-type", "ec-p256")
    assert done.returncode == 1
    assert "pairing refused: %s (try --key-type rsa-3072)" % TOO_SMALL in done.stderr
    assert not (folder / "agent.key").exists()


def test_rsa_key_type_from_agent_conf_asks_once(signer, agent_folder):
    server, *_ = signer
    folder, _ = agent_folder
    with open(folder / "agent.conf", "a") as handle:
        handle.write("key_type = rsa-3072\n")
    done = _pair(folder, server.port)
    assert done.returncode == 0, done.stderr
    assert server.seen == ["rsa-3072"]


def test_reported_hostname_is_never_localhost(monkeypatch):
    monkeypatch.setattr(socket, "getfqdn", lambda: "localhost")
    monkeypatch.setattr(socket, "gethostname", lambda: "build-07")
    assert wire.reported_hostname() == "build-07"
    monkeypatch.setattr(socket, "getfqdn", lambda: "build-07.example.net")
    assert wire.reported_hostname() == "build-07.example.net"


def test_a_bad_key_type_in_agent_conf_is_a_config_error(tmp_path):
    conf = tmp_path / "agent.conf"
    conf.write_text("key_type = dsa\n")
    with pytest.raises(wire.ConfigError) as caught:
        wire.load_agent_config(str(conf), require_files=False)
    assert "key_type must be one of auto, ec-p256, rsa-3072" in str(caught.value)
