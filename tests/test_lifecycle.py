"""Certificate lifecycle end to end: renewal, dispatcher rotation, revocation, expiry.

Real pieces only: a CA and certificates from pki.py, real agent processes on
127.0.0.x (tests/fleet.py), the real CLI as a subprocess, the real API process
for the no-restart rotation check, and agents' own files for what they trust.
"""

from __future__ import annotations

import datetime
import json
import os
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from apitest_support import ApiServer
from fleet import Fleet, wait_for
from test_cli import cli, cli_start

import ctrlexec_agent as wire
import lifecycle
import pki

OK_SCRIPT = '#!/bin/sh\necho "ok $*"\n'
#: Runs until the test removes its gate file (or 30 s pass), then prints "finished".
GATED_SCRIPT = ('#!/bin/sh\necho started\ntouch "$0.started"\n'
                'i=0; while [ -e "$0.gate" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done\n'
                'echo finished\n')


def _json(result) -> dict:
    assert result.stdout.strip(), result.stderr
    return json.loads(result.stdout)


def _peer_serial(fleet: Fleet, agent, ctx: ssl.SSLContext | None = None) -> str:
    """The serial of the certificate the agent serves to a new connection."""
    import socket
    raw = socket.create_connection((agent.address, agent.port), timeout=10)
    try:
        tls = (ctx or fleet.client_context()).wrap_socket(raw)
        der = tls.getpeercert(binary_form=True)
    finally:
        raw.close()
    return pki.cert_serial(ssl.DER_cert_to_PEM_cert(der).encode())


def _write_cert(agent, cert_pem: bytes) -> None:
    with open(os.path.join(agent.dir, "agent.crt"), "wb") as handle:
        handle.write(cert_pem)


def _sign_with_dates(fleet: Fleet, agent, not_before: datetime.datetime,
                     not_after: datetime.datetime) -> bytes:
    """A certificate for the agent's own key, signed by the fleet's CA, with chosen dates."""
    cfg = fleet.cfg
    with open(os.path.join(cfg.ca_dir, "ca.key"), "rb") as handle:
        ca_key = serialization.load_pem_private_key(handle.read(), None)
    with open(os.path.join(cfg.ca_dir, "ca.crt"), "rb") as handle:
        ca_cert = x509.load_pem_x509_certificate(handle.read())
    with open(os.path.join(agent.dir, "agent.key"), "rb") as handle:
        key = serialization.load_pem_private_key(handle.read(), None)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, agent.name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def _trusted(agent) -> dict:
    return wire.load_trusted_map(os.path.join(agent.dir, "ctrl-exec-dispatchers"))


# --- renewal -------------------------------------------------------------------------------

def test_renew_while_a_run_is_in_flight_swaps_the_cert_without_a_restart(fleet):
    fleet.set_conf(cert_days=100)
    agent = fleet.add_agent("web-01", scripts={"gated": GATED_SCRIPT, "hello": OK_SCRIPT})
    gate = os.path.join(agent.scripts_dir, "gated.gate")
    open(gate, "w").close()
    old_serial = _peer_serial(fleet, agent)
    pid = agent.proc.pid
    run = cli_start(fleet.conf_path, "--json", "run", "web-01", "gated")
    try:
        wait_for(lambda: os.path.exists(gate[:-len(".gate")] + ".started"), "the run to start")
        renewed = cli(fleet.conf_path, "--json", "renew", "web-01")
        assert renewed.returncode == 0, renewed.stderr
        row = _json(renewed)["results"][0]
        assert row["status"] == "renewed" and row["serial"] != old_serial
        assert 98 <= row["days_left"] <= 100
        # New connections get the new certificate while the old run still goes on.
        assert _peer_serial(fleet, agent) == row["serial"]
        assert run.poll() is None
    finally:
        os.unlink(gate)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    result = json.loads(out)["results"][0]
    assert result["exit"] == 0 and "finished" in result["stdout"]
    assert agent.proc.pid == pid and agent.proc.poll() is None
    record = fleet.registry.get("web-01")
    assert record["serial"] == row["serial"] and record["expiry"] == row["expiry"]
    with open(os.path.join(agent.dir, "agent.crt"), "rb") as handle:
        assert pki.cert_serial(handle.read()) == row["serial"]      # survives a restart
    ping = _json(cli(fleet.conf_path, "--json", "ping", "web-01"))["results"][0]
    assert ping["expiry"] == row["expiry"] and 98 <= ping["days_left"] <= 100
    assert agent.proc.pid == pid


def test_ping_renews_under_agent_renew_days_and_warns_under_30_days(fleet):
    fleet.set_conf(cert_days=10, agent_renew_days=0)
    agent = fleet.add_agent("db-01", scripts={"hello": OK_SCRIPT})
    assert cli(fleet.conf_path, "renew", "db-01").returncode == 0
    warned = cli(fleet.conf_path, "ping", "db-01")
    assert warned.returncode == 0, warned.stderr
    assert "DAYS LEFT" in warned.stdout
    assert "warning: db-01 certificate expires in 9 days" in warned.stderr
    assert "ctrlexec.py renew db-01" in warned.stderr

    fleet.set_conf(cert_days=365, agent_renew_days=30)
    skipped = cli(fleet.conf_path, "--json", "ping", "--no-renew", "db-01")
    assert "renewal" not in _json(skipped)["results"][0]
    auto = cli(fleet.conf_path, "--json", "ping", "db-01")
    assert auto.returncode == 0, auto.stderr
    row = _json(auto)["results"][0]
    assert row["renewal"]["status"] == "renewed" and 363 <= row["days_left"] <= 365
    assert "renewed db-01" in auto.stderr and "warning" not in auto.stderr
    assert agent.proc.poll() is None


def test_renewal_of_an_unknown_or_unreachable_host_is_a_clear_row_error(fleet):
    agent = fleet.add_agent("app-01", scripts={"hello": OK_SCRIPT})
    agent.stop()
    result = cli(fleet.conf_path, "--json", "renew", "app-01", "ghost")
    assert result.returncode == 1
    rows = {row["host"]: row for row in _json(result)["results"]}
    assert "did not respond" in rows["app-01"]["error"]
    assert rows["ghost"]["error"] == "unknown agent 'ghost' (not paired)"
    assert cli(fleet.conf_path, "renew").returncode == 2


def test_agent_refuses_a_renewed_cert_for_another_key(fleet):
    agent = fleet.add_agent("web-02", scripts={"hello": OK_SCRIPT})
    other_pem, _key = pki.issue_cert(fleet.cfg.ca_dir, "web-02")
    status, _, body = fleet.request(agent, "POST", "/renew-complete",
                                    {"cert": other_pem.decode(), "ca": "", "reqid": "ab12"})
    assert status == 200 and body["status"] == "error"
    assert body["error"] == "certificate public key does not match the agent key"
    status, _, body = fleet.request(agent, "POST", "/renew", {"reqid": "ab12"})
    assert body["status"] == "ok" and body["csr"].startswith("-----BEGIN CERTIFICATE REQUEST-----")
    assert pki.check_csr(body["csr"].encode()).subject.get_attributes_for_oid(
        NameOID.COMMON_NAME)[0].value == "web-02"


# --- expiry ------------------------------------------------------------------------------------

def test_an_expired_agent_cert_is_named_with_its_host_and_expiry_date(fleet):
    agent = fleet.add_agent("old-01", scripts={"hello": OK_SCRIPT})
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    expired_at = now - datetime.timedelta(days=3)
    agent.stop()
    _write_cert(agent, _sign_with_dates(fleet, agent, now - datetime.timedelta(days=30), expired_at))
    agent.start()
    result = cli(fleet.conf_path, "--json", "ping", "old-01")
    assert result.returncode == 1
    error = _json(result)["results"][0]["error"]
    assert "agent 'old-01' certificate expired on %s" % wire.openssl_date(expired_at) in error
    assert "re-pair it" in error
    assert "ACTION=cert-expired" in agent.log()


def test_an_expired_dispatcher_cert_is_named_in_the_error(fleet):
    agent = fleet.add_agent("web-03", scripts={"hello": OK_SCRIPT})
    cfg = fleet.cfg
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    with open(os.path.join(cfg.ca_dir, "ca.key"), "rb") as handle:
        ca_key = serialization.load_pem_private_key(handle.read(), None)
    with open(os.path.join(cfg.ca_dir, "ca.crt"), "rb") as handle:
        ca_cert = x509.load_pem_x509_certificate(handle.read())
    with open(cfg.key, "rb") as handle:
        key = serialization.load_pem_private_key(handle.read(), None)
    with open(cfg.cert, "rb") as handle:
        serial = x509.load_pem_x509_certificate(handle.read()).serial_number
    expired = (x509.CertificateBuilder().subject_name(ca_cert.subject.__class__(
        [x509.NameAttribute(NameOID.COMMON_NAME, pki.DISPATCHER_COMMON_NAME)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(serial)
        .not_valid_before(now - datetime.timedelta(days=20))
        .not_valid_after(now - datetime.timedelta(days=2)).sign(ca_key, hashes.SHA256()))
    with open(cfg.cert, "wb") as handle:
        handle.write(expired.public_bytes(serialization.Encoding.PEM))
    result = cli(fleet.conf_path, "--json", "ping", "web-03")
    error = _json(result)["results"][0]["error"]
    assert "refused this control host's certificate, which expired on %s"                 \
        % wire.openssl_date(now - datetime.timedelta(days=2)) in error
    assert agent.proc.poll() is None


# --- dispatcher rotation -------------------------------------------------------------------

def test_rotation_across_ten_agents_with_one_offline(tmp_path):
    names = ["node-%02d" % i for i in range(10)]
    fleet = Fleet.with_agents(str(tmp_path), names, scripts={"hello": OK_SCRIPT})
    api = ApiServer.for_fleet(fleet, str(tmp_path / "api.log"))
    try:
        api.start()
        cfg = fleet.cfg
        old_ctx = fleet.client_context()
        with open(cfg.cert, "rb") as handle:
            old_serial = pki.cert_serial(handle.read())
        offline = fleet.agents["node-07"]
        offline.stop()

        first = cli(cfg.path, "--json", "rotate-dispatcher")
        assert first.returncode == 1, first.stderr
        report = _json(first)
        new_serial = report["new_serial"]
        assert report["old_serial"] == old_serial != new_serial
        assert sorted(report["updated"]) == sorted(n for n in names if n != "node-07")
        assert [row["host"] for row in report["pending"]] == ["node-07"]
        assert os.path.exists(cfg.cert + ".previous")
        for name in names:
            if name != "node-07":
                assert _trusted(fleet.agents[name]) == {new_serial: "test-dispatcher"}
        assert fleet.registry.get("node-07")["serial_status"] == "pending"
        assert fleet.registry.get("node-00")["dispatcher_serial"] == new_serial

        # The running API picked up the new certificate by itself.
        online = [n for n in names if n != "node-07"]
        status, body = api.request("POST", "/run", {"hosts": online, "script": "hello"})
        assert status == 200 and all(row["exit"] == 0 for row in body["results"]), body["results"]
        status, _, refused = fleet.request(fleet.agents["node-00"], "POST", "/ping", {}, ctx=old_ctx)
        assert status == 403 and refused["error"] == "serial mismatch"

        offline.start()
        late = cli(cfg.path, "run", "node-07", "hello")
        assert late.returncode == 1 and "forbidden: serial mismatch" in late.stdout
        second = cli(cfg.path, "--json", "rotate-dispatcher")
        assert second.returncode == 0, second.stderr
        assert _json(second)["updated"] == ["node-07"] and _json(second)["phase"] == "done"
        assert _trusted(offline) == {new_serial: "test-dispatcher"}
        assert not os.path.exists(cfg.cert + ".previous")
        assert not os.path.exists(cfg.key + ".previous")
        everyone = cli(cfg.path, "--json", "run", *names, "hello")
        assert everyone.returncode == 0, everyone.stdout
        assert json.loads(open(os.path.join(cfg.state_dir, "rotation.json")).read())["phase"] == "done"
    finally:
        api.stop()
        fleet.stop_all()


def test_rotation_finish_marks_unreached_agents_stale(fleet):
    fleet.add_agent("a-01", scripts={"hello": OK_SCRIPT})
    gone = fleet.add_agent("a-02", scripts={"hello": OK_SCRIPT})
    gone.stop()
    assert cli(fleet.conf_path, "rotate-dispatcher").returncode == 1
    assert cli(fleet.conf_path, "--json", "rotate-dispatcher", "--finish").returncode == 0
    assert fleet.registry.get("a-02")["serial_status"] == "stale"
    assert fleet.registry.get("a-01")["serial_status"] == "current"
    assert not os.path.exists(fleet.cfg.key + ".previous")
    assert "nothing to finish" in cli(fleet.conf_path, "rotate-dispatcher", "--finish").stderr


def test_rotation_past_its_overlap_stops_waiting_for_missing_agents(fleet):
    fleet.add_agent("o-01", scripts={"hello": OK_SCRIPT})
    fleet.add_agent("o-02", scripts={"hello": OK_SCRIPT}).stop()
    assert cli(fleet.conf_path, "rotate-dispatcher").returncode == 1
    path = os.path.join(fleet.cfg.state_dir, "rotation.json")
    with open(path) as handle:
        state = json.load(handle)
    state["overlap_expires"] = "2020-01-01T00:00:00Z"
    with open(path, "w") as handle:
        json.dump(state, handle)
    result = cli(fleet.conf_path, "--json", "rotate-dispatcher")
    assert result.returncode == 0, result.stderr
    report = _json(result)
    assert report["stale"] == ["o-02"] and report["overlap_expired"] == "2020-01-01T00:00:00Z"
    assert not os.path.exists(fleet.cfg.key + ".previous")


def test_rotate_serial_rules_on_the_agent(fleet):
    agent = fleet.add_agent("r-01", scripts={"hello": OK_SCRIPT})
    own = pki.dispatcher_serial(fleet.cfg)
    call = lambda body: fleet.request(agent, "POST", "/rotate-serial", body)[2]  # noqa: E731
    assert call({"action": "add"}) == {"status": "error", "error": "serial required"}
    assert call({"serial": "ab12", "action": "swap"})["error"].startswith("invalid action 'swap'")
    assert "lock this dispatcher out" in call({"serial": own, "action": "remove"})["error"]
    assert call({"serial": "0xAB12", "action": "add"})["status"] == "ok"
    assert _trusted(agent) == {own: "test-dispatcher", "ab12": "test-dispatcher"}
    assert call({"serial": "ab12", "action": "remove"})["dispatcher"] == "test-dispatcher"
    assert _trusted(agent) == {own: "test-dispatcher"}


# --- revocation ----------------------------------------------------------------------------

def test_revoke_removes_the_host_and_refuses_its_serial_and_key(fleet):
    agent = fleet.add_agent("bad-01", scripts={"hello": OK_SCRIPT})
    record = fleet.registry.get("bad-01")
    result = cli(fleet.conf_path, "--json", "revoke", "bad-01")
    assert result.returncode == 0, result.stderr
    entry = _json(result)
    assert entry["serial"] == record["serial"] and entry["spki_sha256"] == record["spki_sha256"]
    assert fleet.registry.get("bad-01") is None
    assert "unknown agent 'bad-01'" in _json(cli(fleet.conf_path, "--json", "renew",
                                                 "bad-01"))["results"][0]["error"]
    # Even registered again by hand, its certificate is never renewed.
    fleet.registry.put("bad-01", record)
    again = _json(cli(fleet.conf_path, "--json", "renew", "bad-01"))["results"][0]
    assert again["status"] == "error" and "was revoked" in again["error"]
    with pytest.raises(lifecycle.LifecycleError, match="was revoked"):
        with open(os.path.join(agent.dir, "agent.crt"), "rb") as handle:
            key = x509.load_pem_x509_certificate(handle.read()).public_key()
        lifecycle.check_not_revoked(fleet.cfg, public_key=key)
    assert cli(fleet.conf_path, "revoke", "bad-02").returncode == 1


# --- days to expiry in the API ------------------------------------------------------------------

def test_api_ping_and_discovery_show_days_to_expiry(tmp_path):
    fleet = Fleet.with_agents(str(tmp_path), ["d-01"], scripts={"hello": OK_SCRIPT})
    api = ApiServer.for_fleet(fleet, str(tmp_path / "api.log"))
    try:
        api.start()
        status, body = api.request("POST", "/ping", {"hosts": ["d-01"]})
        assert status == 200 and 820 <= body["results"][0]["days_left"] <= 825
        status, body = api.request("GET", "/discovery")
        host = body["hosts"]["d-01"]
        assert host["expiry"] == fleet.registry.get("d-01")["expiry"]
        assert 820 <= host["days_left"] <= 825
    finally:
        api.stop()
        fleet.stop_all()


def test_days_left_arithmetic():
    now = 1_800_000_000
    expiry = wire.openssl_date(datetime.datetime.fromtimestamp(now + 5 * 86400 + 10,
                                                               datetime.timezone.utc))
    assert lifecycle.days_left(expiry, now=now) == 5
    assert lifecycle.days_left("unknown") is None
    assert lifecycle.renewal_due({"status": "ok", "expiry": expiry}, 1000)
    assert not lifecycle.renewal_due({"status": "ok", "expiry": expiry, "staged": True}, 1000)
    assert not lifecycle.renewal_due({"status": "ok", "expiry": expiry}, 0)
