"""Tests for pairing.py: the pairing listener, queue and session (reference §4.2).

A small raw TLS client in this file speaks the agent's side of the wire
protocol (POST /pair, first response "pending", second response the decision),
so the listener is tested end to end on 127.0.0.x without mocks.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

import config
import ctrlexec_agent as wire
import lifecycle
import pairing
import pki
import store
from fleet import free_port, wait_for

IO_TIMEOUT_S = 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- helpers -----------------------------------------------------------------------------

def make_csr(cn="agent01.example.net", key=None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


class PairClient:
    """The agent side of one pairing connection (reference §4.2 step 6 and 15)."""

    def __init__(self, port: int, *, host: str = "127.0.0.1", source: str | None = None) -> None:
        raw = socket.create_connection((host, port), timeout=IO_TIMEOUT_S,
                                       source_address=(source, 0) if source else None)
        self.tls = wire.insecure_client_context().wrap_socket(raw)
        self.reader = wire.SocketReader(self.tls, time.monotonic() + 60)

    def send_raw(self, data: bytes) -> None:
        self.tls.sendall(data)

    def send(self, body: dict) -> None:
        self.send_raw(wire.encode_request("POST", "/pair", body))

    def response(self) -> dict:
        status, _headers, body = wire.read_response(self.reader, max_body=1 << 20)
        assert status == 200
        return json.loads(body)

    def close(self) -> None:
        self.tls.close()


def pair_body(hostname="agent01.example.net", csr=None, nonce=None, **extra) -> dict:
    body = {"hostname": hostname, "csr": csr or make_csr(hostname),
            "nonce": nonce or os.urandom(16).hex(), "port": 7443, "ip": "192.0.2.10"}
    body.update(extra)
    return body


@pytest.fixture
def env(tmp_path):
    """Real Config (config.load) + CA + dispatcher cert + registry; rate limit off."""
    conf = tmp_path / "ctrl-exec.conf"
    conf.write_text("ca_dir = ca\nstate_dir = state\ndispatcher_id = ctl-test\n"
                    "pairing_rate_limit_disable = 1\n")
    cfg = config.load(str(conf))
    pki.create_ca(cfg.ca_dir)
    pki.create_dispatcher_cert(cfg.ca_dir, cfg.cert, cfg.key)
    return cfg, store.Registry(cfg.state_dir)


@pytest.fixture
def start_server(env):
    """Factory: start a PairingServer on 127.0.0.1 (free port); stopped at teardown."""
    servers = []

    def start(cfg=None, **kwargs):
        kwargs.setdefault("timeout", 30)
        server = pairing.PairingServer(cfg or env[0], env[1], bind="127.0.0.1", port=0, **kwargs)
        servers.append(server.start())
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def clients():
    opened = []

    def connect(port, **kwargs):
        client = PairClient(port, **kwargs)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


def queue_request(server, clients, **body):
    """Send pair_body(**body) on a new connection; returns (client, reqid) once it is pending."""
    client = clients(server.port)
    client.send(pair_body(**body))
    return client, client.response()["reqid"]


def queue_dir(cfg) -> str:
    return os.path.join(cfg.state_dir, "pairing")


# --- the happy paths ---------------------------------------------------------------------

def test_approve_delivers_cert_ca_serial_and_echoed_nonce(env, start_server, clients):
    cfg, registry = env
    server = start_server()
    client = clients(server.port)
    body = pair_body(lookup_by="ip", port=7450)
    client.send(body)
    first = client.response()
    assert first["status"] == "pending" and re.fullmatch(r"[0-9a-f]{16}", first["reqid"])
    reqid = first["reqid"]
    queued = os.path.join(queue_dir(cfg), reqid + ".json")
    assert stat.S_IMODE(os.stat(queued).st_mode) == 0o600
    [row] = pairing.list_requests(cfg)
    assert row["id"] == reqid and row["hostname"] == "agent01.example.net"
    assert row["ip"] == "192.0.2.10" and row["source_ip"] == "127.0.0.1"
    assert row["code"] == wire.pairing_code(body["csr"].encode()) == pairing.pairing_code(body["csr"])
    assert "csr" not in row and "nonce" not in row

    entry = pairing.approve(cfg, registry, reqid)
    second = client.response()
    assert second["status"] == "approved"
    assert second["nonce"] == body["nonce"]
    assert second["dispatcher_id"] == "ctl-test"
    assert second["dispatcher_serial"] == pki.cert_serial(open(cfg.cert, "rb").read())
    assert second["ca"] == open(cfg.ca).read()
    cert = x509.load_pem_x509_certificate(second["cert"].encode())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(second["ca"].encode()))
    assert cert.subject.rfc4514_string() == "CN=agent01.example.net"
    assert entry == registry.get("agent01.example.net")
    assert entry["ip"] == "192.0.2.10" and entry["port"] == 7450 and entry["lookup_by"] == "ip"
    assert entry["serial_status"] == "current" and entry["expiry"] == pki.cert_expiry(second["cert"])
    wait_for(lambda: os.listdir(queue_dir(cfg)) == [], "the pairing queue to empty", IO_TIMEOUT_S)


def test_pairing_code_is_sha256_prefix_mod_a_million():
    pem = make_csr().encode()
    expected = "%06d" % (int.from_bytes(hashlib.sha256(pem).digest()[:4], "big") % 1000000)
    assert pairing.pairing_code(pem) == expected == wire.pairing_code(pem)
    assert pairing.pairing_code(pem.decode()) == expected


def test_approve_turns_pki_errors_into_pairing_errors(env, start_server, clients):
    # One exception class per module: a missing dispatcher cert (pki's PKIError)
    # reaches the caller as PairingError, and nothing is registered or decided.
    cfg, registry = env
    _, reqid = queue_request(start_server(), clients)
    os.unlink(cfg.cert)
    with pytest.raises(pairing.PairingError, match="run setup-dispatcher first"):
        pairing.approve(cfg, registry, reqid)
    assert registry.names() == []
    assert [row["id"] for row in pairing.list_requests(cfg)] == [reqid]


def test_approve_refuses_a_revoked_key_and_records_serial_and_key(env, start_server, clients):
    cfg, registry = env
    key = ec.generate_private_key(ec.SECP256R1())
    lifecycle.RevocationList(cfg.state_dir).add(
        {"name": "agent01.example.net", "serial": "ab12", "revoked_at": "2026-12-01T00:00:00Z",
         "spki_sha256": pki.spki_sha256(key.public_key())})
    _, reqid = queue_request(start_server(), clients, csr=make_csr(key=key))
    with pytest.raises(pairing.PairingError, match="revoked at 2026-12-01T00:00:00Z"):
        pairing.approve(cfg, registry, reqid)
    assert registry.names() == []
    fresh = ec.generate_private_key(ec.SECP256R1())
    client, reqid = queue_request(start_server(), clients, csr=make_csr(key=fresh))
    entry = pairing.approve(cfg, registry, reqid)
    assert entry["spki_sha256"] == pki.spki_sha256(fresh.public_key())
    assert entry["serial"] == pki.cert_serial(client.response()["cert"].encode())


def test_approve_overrides_and_default_lookup_by_hostname(env, start_server, clients):
    cfg, registry = env
    server = start_server()
    client = clients(server.port)
    client.send(pair_body(hostname="db-01", ip="not-an-ip"))
    reqid = client.response()["reqid"]
    assert pairing.list_requests(cfg)[0]["ip"] == "127.0.0.1"     # falls back to the source IP
    entry = pairing.approve(cfg, registry, reqid, ip="10.0.0.7", agent_port=7460)
    assert (entry["ip"], entry["port"], entry["lookup_by"]) == ("10.0.0.7", 7460, "hostname")
    assert client.response()["status"] == "approved"


def test_repairing_keeps_registry_tags(env, start_server, clients):
    cfg, registry = env
    registry.put("web-05", {"hostname": "web-05", "ip": "10.0.0.5", "port": 7443,
                            "lookup_by": "ip", "paired": "2020-01-01T00:00:00Z", "expiry": "",
                            "tags": {"role": "web"}, "dispatcher_serial": "", "serial_status": "stale"})
    server = start_server()
    client = clients(server.port)
    client.send(pair_body(hostname="web-05"))
    entry = pairing.approve(cfg, registry, client.response()["reqid"])
    assert entry["tags"] == {"role": "web"} and entry["serial_status"] == "current"
    assert client.response()["status"] == "approved"


def test_deny_is_reported_to_the_agent(env, start_server, clients):
    cfg, registry = env
    client, reqid = queue_request(start_server(), clients)
    pairing.deny(cfg, reqid)
    assert client.response() == {"status": "denied", "reason": "rejected by operator"}
    assert registry.names() == []
    wait_for(lambda: os.listdir(queue_dir(cfg)) == [], "the pairing queue to empty", IO_TIMEOUT_S)
    with pytest.raises(pairing.PairingError, match="no pending pairing request"):
        pairing.approve(cfg, registry, reqid)


def test_approval_timeout_is_reported(env, start_server, clients):
    cfg, _ = env
    server = start_server(timeout=1)
    client = clients(server.port)
    client.send(pair_body())
    client.response()
    assert client.response() == {"status": "denied", "reason": "approval timeout"}
    assert pairing.list_requests(cfg) == []


def test_each_connection_gets_its_own_nonce(env, start_server, clients):
    # The agent detects a tampered/replayed approval by comparing the nonce it
    # sent; the dispatcher must echo exactly the nonce of that connection.
    cfg, registry = env
    server = start_server()
    first, second = clients(server.port), clients(server.port)
    body1, body2 = pair_body("a-01"), pair_body("b-01")
    first.send(body1)
    second.send(body2)
    id1, id2 = first.response()["reqid"], second.response()["reqid"]
    pairing.approve(cfg, registry, id2)
    pairing.approve(cfg, registry, id1)
    answer1, answer2 = first.response(), second.response()
    assert answer1["nonce"] == body1["nonce"] != answer2["nonce"] == body2["nonce"]
    assert x509.load_pem_x509_certificate(answer1["cert"].encode()).subject.rfc4514_string() == "CN=a-01"


def test_rsa_4096_csr_from_original_agents_is_accepted(env, start_server, clients):
    cfg, registry = env
    server = start_server()
    client = clients(server.port)
    client.send(pair_body(csr=make_csr(key=rsa.generate_private_key(65537, 4096))))
    reqid = client.response()["reqid"]
    pairing.approve(cfg, registry, reqid)
    assert client.response()["status"] == "approved"


# --- refusals: each answered, listener keeps working --------------------------------------

def assert_listener_works(server, clients, cfg):
    client = clients(server.port)
    client.send(pair_body(hostname="still-ok"))
    reqid = client.response()["reqid"]
    pairing.deny(cfg, reqid)
    assert client.response()["status"] == "denied"


def test_garbage_bytes_without_tls_do_not_stop_the_listener(env, start_server, clients):
    server = start_server()
    with socket.create_connection(("127.0.0.1", server.port), timeout=IO_TIMEOUT_S) as raw:
        raw.sendall(b"\x00\xffGET / garbage\r\n\r\n" * 10)
        try:
            assert raw.recv(1024) in (b"",) or True
        except ConnectionResetError:
            pass
    assert_listener_works(server, clients, env[0])


@pytest.mark.parametrize("payload", [
    b"\x00\x01\x02garbage\r\n\r\n",
    b"GET /pair HTTP/1.0\r\n\r\n",
    b"POST /pair HTTP/1.0\r\nContent-Length: 8\r\n\r\nnot json",
    b"POST /pair HTTP/1.0\r\nContent-Length: 2\r\n\r\n[]",
    b"POST /other HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}",
], ids=["binary", "get", "not-json", "not-object", "wrong-path"])
def test_garbage_inside_tls_gets_invalid_request(env, start_server, clients, payload):
    server = start_server()
    client = clients(server.port)
    client.send_raw(payload)
    assert client.response() == {"status": "error", "reason": "invalid request"}
    assert_listener_works(server, clients, env[0])


def test_body_over_64_kib_gets_request_too_large(env, start_server, clients):
    server = start_server()
    client = clients(server.port)
    body = pair_body(padding="x" * (100 * 1024))
    client.send(body)
    assert client.response() == {"status": "error", "reason": "request too large"}
    assert_listener_works(server, clients, env[0])


@pytest.mark.parametrize("body", [
    {"hostname": "web-01"},
    {"csr": make_csr()},
    {"hostname": 5, "csr": make_csr()},
    {"hostname": "web-01", "csr": make_csr(), "port": 70000},
    {"hostname": "web-01", "csr": make_csr(), "nonce": "bad nonce!"},
], ids=["no-csr", "no-hostname", "hostname-not-string", "bad-port", "bad-nonce"])
def test_incomplete_requests_get_invalid_request(env, start_server, clients, body):
    server = start_server()
    client = clients(server.port)
    client.send(body)
    assert client.response() == {"status": "error", "reason": "invalid request"}
    assert pairing.list_requests(env[0]) == []


@pytest.mark.parametrize("hostname", ["../etc/passwd", "-web", "web 01", "", "a" * 254, "x/y"])
def test_invalid_hostname_is_refused(env, start_server, clients, hostname):
    server = start_server()
    client = clients(server.port)
    client.send(pair_body(hostname=hostname, csr=make_csr("web-01")))
    assert client.response() == {"status": "error", "reason": "invalid hostname"}
    assert os.listdir(queue_dir(env[0])) == []


def _openssl_csr(tmp_path, digest, bits=2048) -> str:
    key = tmp_path / "key.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(key), str(bits)], check=True,
                   capture_output=True, timeout=30)
    out = subprocess.run(["openssl", "req", "-new", "-key", str(key), "-subj", "/CN=web-01",
                          "-" + digest], check=True, capture_output=True, timeout=30)
    return out.stdout.decode()


def _tampered_csr() -> str:
    der = bytearray(x509.load_pem_x509_csr(make_csr().encode()).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x55
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize("kind", ["md5", "sha1", "rsa1024", "tampered", "oversized", "not-pem"])
def test_bad_csrs_are_refused_and_logged(env, start_server, clients, tmp_path, capfd, kind):
    if kind in ("md5", "sha1"):
        csr = _openssl_csr(tmp_path, kind)
    elif kind == "rsa1024":
        csr = make_csr(key=rsa.generate_private_key(65537, 1024))
    elif kind == "tampered":
        csr = _tampered_csr()
    elif kind == "oversized":
        csr = make_csr() + "\n" * 11000
    else:
        csr = "hello, not a CSR"
    server = start_server()
    client = clients(server.port)
    client.send(pair_body(csr=csr))
    assert client.response() == {"status": "error", "reason": "invalid request"}
    assert os.listdir(queue_dir(env[0])) == []
    assert "ACTION=pair-reject" in capfd.readouterr().err


def test_eleventh_queued_request_gets_queue_full(env, start_server, clients):
    cfg, _ = env
    server = start_server()
    waiting = []
    for index in range(10):
        client = clients(server.port)
        client.send(pair_body(hostname="host-%02d" % index))
        assert client.response()["status"] == "pending"
        waiting.append(client)
    eleventh = clients(server.port)
    eleventh.send(pair_body(hostname="host-10"))
    assert eleventh.response() == {"status": "error", "reason": "pairing queue full"}
    assert len(pairing.list_requests(cfg)) == 10
    # Deciding one frees a slot; the listener keeps working.
    pairing.deny(cfg, pairing.list_requests(cfg)[0]["id"])
    assert_listener_works(server, clients, cfg)


def test_per_ip_volume_rate_limit(tmp_path, env, start_server, clients):
    cfg, _ = env
    limited = config.load(str(_write_conf(tmp_path, "pairing_rate_limit_volume = 2/60/300\n")))
    server = start_server(limited)
    for _ in range(2):
        client = clients(server.port, source="127.0.0.1")
        client.send_raw(b"x\r\n\r\n")
        assert client.response()["reason"] == "invalid request"
    with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
        blocked = clients(server.port, source="127.0.0.1")
        blocked.send(pair_body())
        blocked.response()
    other = clients(server.port, source="127.0.0.2")          # other IPs are unaffected
    other.send_raw(b"x\r\n\r\n")
    assert other.response()["reason"] == "invalid request"


def _write_conf(tmp_path, extra: str):
    conf = tmp_path / "limited.conf"
    conf.write_text("ca_dir = ca\nstate_dir = state\ndispatcher_id = ctl-test\n" + extra)
    return conf


# --- queue management ---------------------------------------------------------------------

def test_approve_and_deny_validate_reqids(env):
    cfg, registry = env
    for bad in ("../../etc/passwd", "ABCDEF0123456789", "123", None):
        with pytest.raises(pairing.PairingError, match="16 lowercase hex characters are accepted"):
            pairing.approve(cfg, registry, bad)
        with pytest.raises(pairing.PairingError, match="16 lowercase hex characters are accepted"):
            pairing.deny(cfg, bad)
    with pytest.raises(pairing.PairingError, match="no pending pairing request 0123456789abcdef"):
        pairing.deny(cfg, "0123456789abcdef")


def test_stale_requests_are_expired(env, start_server, clients):
    cfg, _ = env
    server = start_server()
    client = clients(server.port)
    client.send(pair_body())
    reqid = client.response()["reqid"]
    path = os.path.join(queue_dir(cfg), reqid + ".json")
    old = time.time() - pairing.PAIRING_STALE_S - 5
    os.utime(path, (old, old))
    assert pairing.list_requests(cfg) == []
    assert not os.path.exists(path)
    assert client.response() == {"status": "denied", "reason": "approval timeout"}


def test_approve_refuses_when_already_decided(env, start_server, clients):
    cfg, registry = env
    server = start_server(timeout=30)
    client = clients(server.port)
    client.send(pair_body())
    reqid = client.response()["reqid"]
    pairing.approve(cfg, registry, reqid)
    # The waiting connection may already have consumed the decision.
    with pytest.raises(pairing.PairingError, match="already decided|no pending pairing request"):
        pairing.deny(cfg, reqid)
    assert client.response()["status"] == "approved"


def test_stop_answers_waiting_agents(env, start_server, clients):
    server = start_server()
    client = clients(server.port)
    client.send(pair_body())
    client.response()
    server.stop()
    assert client.response() == {"status": "denied", "reason": "pairing mode stopped"}


def test_no_key_material_or_csr_in_logs(env, start_server, clients, capfd):
    cfg, registry = env
    server = start_server()
    client = clients(server.port)
    body = pair_body()
    client.send(body)
    reqid = client.response()["reqid"]
    pairing.approve(cfg, registry, reqid)
    client.response()
    text = "".join(capfd.readouterr())
    assert "ACTION=pair-request" in text and "ACTION=pair-approve" in text
    assert "PRIVATE KEY" not in text and "CERTIFICATE REQUEST" not in text
    assert body["nonce"] not in text
    ca_key = "".join(open(os.path.join(cfg.ca_dir, "ca.key")).read().splitlines()[1:-1])
    assert ca_key[:40] not in text


# --- run_pairing_mode ----------------------------------------------------------------------

class LineOut(io.StringIO):
    """StringIO that tests can poll from another thread."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()

    def write(self, text):
        with self.lock:
            return super().write(text)

    def text(self):
        with self.lock:
            return self.getvalue()


def _start_mode(env, **kwargs):
    cfg, registry = env
    out = LineOut()
    result = {}
    thread = threading.Thread(target=lambda: result.update(rc=pairing.run_pairing_mode(
        cfg, registry, port=0, bind="127.0.0.1", out=out, **kwargs)), daemon=True)
    thread.start()
    wait_for(lambda: "pairing mode on port" in out.text(), "pairing mode to start", IO_TIMEOUT_S)
    port = int(re.search(r"pairing mode on port (\d+) for (\d+) s", out.text()).group(1))
    return thread, out, port, result


def test_run_pairing_mode_announces_requests_and_times_out(env, clients):
    cfg, registry = env
    thread, out, port, result = _start_mode(env, timeout=2)
    client = clients(port)
    body = pair_body()
    client.send(body)
    reqid = client.response()["reqid"]
    code = wire.pairing_code(body["csr"].encode())
    wait_for(lambda: reqid in out.text(), "the request to be listed", IO_TIMEOUT_S)
    line = [l for l in out.text().splitlines() if reqid in l][0]
    assert "agent01.example.net" in line and "192.0.2.10" in line and code in line
    pairing.approve(cfg, registry, reqid)
    assert client.response()["status"] == "approved"
    thread.join(IO_TIMEOUT_S)
    assert result == {"rc": 0}
    assert "pairing mode timed out" in out.text()


def test_run_pairing_mode_interactive_commands(env, clients):
    cfg, registry = env
    read_fd, write_fd = os.pipe()
    stdin = os.fdopen(read_fd, "r")
    writer = os.fdopen(write_fd, "w")
    try:
        thread, out, port, result = _start_mode(env, timeout=60, interactive=True, stdin=stdin)
        client = clients(port)
        client.send(pair_body(hostname="web-07"))
        reqid = client.response()["reqid"]
        wait_for(lambda: reqid in out.text(), "the request to be listed", IO_TIMEOUT_S)
        writer.write("list\n")
        writer.flush()
        wait_for(lambda: " 1. %s" % reqid in out.text(), "the numbered request", IO_TIMEOUT_S)
        writer.write("a1\n")
        writer.flush()
        assert client.response()["status"] == "approved"
        assert registry.get("web-07")["hostname"] == "web-07"
        writer.write("quit\n")
        writer.flush()
        thread.join(IO_TIMEOUT_S)
        assert result == {"rc": 0}
        assert "pairing mode stopped" in out.text()
    finally:
        writer.close()
        stdin.close()


def test_run_pairing_mode_refuses_bad_timeout(env):
    for bad in (0, 601, "x"):
        with pytest.raises(pairing.PairingError, match="1-600 seconds are accepted"):
            pairing.run_pairing_mode(env[0], env[1], timeout=bad, port=0, bind="127.0.0.1",
                                 out=io.StringIO())


def test_run_pairing_mode_stops_cleanly_on_sigterm(env, tmp_path):
    cfg, _ = env
    code = ("import sys, pairing, config, store\n"
            "cfg = config.load(sys.argv[1])\n"
            "sys.exit(pairing.run_pairing_mode(cfg, store.Registry(cfg.state_dir), port=0,"
            " bind='127.0.0.1', timeout=60))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, cfg.path], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert re.match(r"pairing mode on port \d+ for 60 s", first)
        proc.send_signal(15)
        out, err = proc.communicate(timeout=IO_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=IO_TIMEOUT_S)
    assert proc.returncode == 0
    assert "pairing mode stopped" in out
    assert "ACTION=pairing-mode-stop" in err and "ACTION=pairing-mode-start" in err


# --- end to end with the real agent command ------------------------------------------------

@pytest.fixture
def agent_dir(tmp_path):
    """An empty agent folder with an agent.conf pointing at files inside it."""
    folder = tmp_path / "agent"
    folder.mkdir()
    port = free_port()
    (folder / "agent.conf").write_text(
        "port = %d\nbind = 127.0.0.1\ncert = agent.crt\nkey = agent.key\nca = ca.crt\n"
        "trusted_dispatchers_path = ctrl-exec-dispatchers\nstate_dir = state\n" % port)
    (folder / "scripts.conf").write_text("# empty allowlist\n")
    return folder, port


def _request_pairing(agent_folder, port, name):
    return subprocess.Popen(
        [sys.executable, os.path.join(REPO, "ctrlexec_agent.py"), "request-pairing",
         "--config", str(agent_folder / "agent.conf"), "--dispatcher", "127.0.0.1",
         "--port", str(port), "--name", name, "--lookup-by", "ip", "--timeout", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, CTRL_EXEC_LOG="stderr"))


def _finish(proc):
    try:
        return proc.communicate(timeout=IO_TIMEOUT_S * 2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=IO_TIMEOUT_S)


def test_agent_request_pairing_end_to_end_then_mtls_ping(env, start_server, agent_dir):
    cfg, registry = env
    folder, agent_port = agent_dir
    server = start_server()
    proc = _request_pairing(folder, server.port, "web-09")
    try:
        code_line = proc.stdout.readline()
        code = re.search(r"Pairing code: (\d{6})", code_line).group(1)
        wait_for(lambda: len(pairing.list_requests(cfg)) == 1, "one queued request", IO_TIMEOUT_S)
        [row] = pairing.list_requests(cfg)
        assert (row["hostname"], row["code"], row["port"]) == ("web-09", code, agent_port)
        pairing.approve(cfg, registry, row["id"])
    finally:
        out, err = _finish(proc)
    assert proc.returncode == 0, err
    assert "Paired with dispatcher ctl-test" in out
    dispatcher_serial = pki.cert_serial(open(cfg.cert, "rb").read())
    assert "%s ctl-test" % dispatcher_serial in (folder / "ctrl-exec-dispatchers").read_text()
    assert stat.S_IMODE(os.stat(folder / "agent.key").st_mode) == 0o600
    assert "PRIVATE KEY" not in out + err
    entry = registry.get("web-09")
    assert (entry["ip"], entry["port"], entry["lookup_by"]) == ("127.0.0.1", agent_port, "ip")

    # The paired agent now serves mTLS and trusts this dispatcher's serial.
    serve = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "ctrlexec_agent.py"), "serve",
         "--config", str(folder / "agent.conf")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, CTRL_EXEC_LOG="stderr"))
    try:
        ctx = wire.client_context(cfg.cert, cfg.key, cfg.ca)

        def ping():
            try:
                with socket.create_connection(("127.0.0.1", agent_port), timeout=5) as raw:
                    with ctx.wrap_socket(raw) as tls:
                        tls.sendall(wire.encode_request("POST", "/ping", {"reqid": "0123456789abcdef"}))
                        status, _h, body = wire.read_response(wire.SocketReader(tls, time.monotonic() + 10))
                        return status, json.loads(body)
            except OSError:
                return None
        wait_for(lambda: ping() is not None, "the agent to answer", IO_TIMEOUT_S)
        status, body = ping()
        assert status == 200 and body["status"] == "ok" and body["reqid"] == "0123456789abcdef"
        assert body["expiry"] == entry["expiry"]
    finally:
        serve.terminate()
        try:
            serve.communicate(timeout=IO_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.communicate(timeout=IO_TIMEOUT_S)


def test_agent_request_pairing_denied_exits_3(env, start_server, agent_dir):
    cfg, registry = env
    folder, _ = agent_dir
    server = start_server()
    proc = _request_pairing(folder, server.port, "web-10")
    try:
        wait_for(lambda: len(pairing.list_requests(cfg)) == 1, "one queued request", IO_TIMEOUT_S)
        pairing.deny(cfg, pairing.list_requests(cfg)[0]["id"])
    finally:
        out, err = _finish(proc)
    assert proc.returncode == 3
    assert "pairing denied: rejected by operator" in err
    assert not (folder / "agent.crt").exists() and not (folder / "agent.key").exists()
    assert registry.names() == []
