"""Tests for demo.py: a real demo fleet (certificates, registry, agent processes) in tmp_path.

Agents run on random free 127.0.x.y addresses (never the default 127.0.0.2/3:7443,
so concurrent test runs and a developer's own demo do not collide).
"""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

import config
import ctrlexec_agent as wire
import demo
import store
from fleet import free_address, free_port

EXCHANGE_TIMEOUT_S = 30.0


def _exchange(ctx, agent: demo.DemoAgent, method: str, path: str, body: dict | None = None):
    """One wire exchange with a demo agent as the dispatcher; returns (status, headers, json)."""
    raw = socket.create_connection((agent.address, agent.port), timeout=EXCHANGE_TIMEOUT_S)
    try:
        tls = ctx.wrap_socket(raw)
        tls.sendall(wire.encode_request(method, path, body))
        status, headers, data = wire.read_response(
            wire.SocketReader(tls, time.monotonic() + EXCHANGE_TIMEOUT_S))
    finally:
        raw.close()
    if headers.get("content-type", "").startswith("application/x-ndjson"):
        return status, headers, [json.loads(line) for line in data.splitlines() if line.strip()]
    return status, headers, json.loads(data.decode("utf-8"))


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def demo_fleet(tmp_path):
    """A prepared (not started) demo fleet on free loopback addresses; always stopped after."""
    fleet = demo.prepare_demo(str(tmp_path / "demo-state"), api_port=free_port(),
                              agent_addresses=[free_address(), free_address()])
    try:
        yield fleet
    finally:
        fleet.stop()


def test_prepare_writes_config_registry_and_allowlisted_scripts(demo_fleet):
    cfg = config.load(demo_fleet.conf_path)
    assert cfg.warnings == []
    assert cfg.dispatcher_id == "demo"
    assert cfg.api_auth_default == "allow"
    assert cfg.api_bind == "127.0.0.1"
    assert cfg.api_port == demo_fleet.api_port
    assert os.path.isfile(cfg.cert) and os.path.isfile(cfg.key) and os.path.isfile(cfg.ca)
    assert os.path.isfile(os.path.join(demo_fleet.root, demo.MARKER_NAME))

    registry = store.Registry(cfg.state_dir)
    assert registry.names() == ["demo-1", "demo-2"]
    assert [a.name for a in demo_fleet.agents.values()] == ["demo-1", "demo-2"]
    expected_tags = {"demo-1": {"env": "demo", "role": "web"},
                     "demo-2": {"env": "demo", "role": "db"}}
    for name, agent in demo_fleet.agents.items():
        record = registry.get(name)
        assert (record["ip"], record["port"], record["tags"]) == (agent.address, agent.port,
                                                                  expected_tags[name])
        agent_cfg = wire.load_agent_config(agent.conf_path)
        assert agent_cfg.tags == expected_tags[name]
        assert agent_cfg.hostname == name
        allowlist = wire.load_allowlist(agent.allowlist_path, agent_cfg.script_dirs)
        assert sorted(allowlist) == ["disk-usage", "fail", "hello", "sleep"]
        assert allowlist == agent.scripts
        for path in allowlist.values():
            assert os.access(path, os.X_OK)
    assert registry.list({"role": "db"})[0]["hostname"] == "demo-2"


def test_started_agents_answer_ping_and_run_hello_then_stop(demo_fleet):
    demo_fleet.start()
    pids = [agent.proc.pid for agent in demo_fleet.agents.values()]
    cfg = config.load(demo_fleet.conf_path)
    ctx = wire.client_context(cfg.cert, cfg.key, cfg.ca)
    for name, agent in demo_fleet.agents.items():
        assert agent.running
        status, _, body = _exchange(ctx, agent, "POST", "/ping", {"reqid": "00000000000000aa"})
        assert status == 200
        assert (body["status"], body["host"], body["reqid"]) == ("ok", name, "00000000000000aa")

        status, _, body = _exchange(ctx, agent, "POST", "/run", {
            "script": "hello", "args": ["world", "two words"], "reqid": "00000000000000bb"})
        assert status == 200
        assert body["exit"] == 0, body
        assert body["stdout"].startswith("hello from %s (host " % name)
        assert "args: world two words\n" in body["stdout"]
        assert body["reqid"] == "00000000000000bb"

    demo_2 = demo_fleet.agents["demo-2"]
    status, _, body = _exchange(ctx, demo_2, "POST", "/run",
                                {"script": "fail", "args": [], "reqid": "00000000000000cc"})
    assert (status, body["exit"]) == (200, 3)
    assert "something went wrong" in body["stderr"]

    status, _, events = _exchange(ctx, demo_2, "POST", "/run", {
        "script": "sleep", "args": ["1"], "reqid": "00000000000000dd", "stream": True})
    assert status == 200
    assert events[-1]["event"] == "exit" and events[-1]["exit"] == 0
    streamed = "".join(e["data"] for e in events if e["event"] == "stdout")
    assert "demo-2: 1/1 seconds\n" in streamed

    demo_fleet.stop()
    assert all(not agent.running and agent.proc is None for agent in demo_fleet.agents.values())
    assert all(_gone(pid) for pid in pids)
    log = open(demo_fleet.agents["demo-1"].log_path).read()
    assert "ACTION=start" in log and "ACTION=stop" in log
    demo_fleet.stop()  # idempotent


def test_context_manager_starts_and_stops(demo_fleet):
    with demo_fleet as fleet:
        pids = [agent.proc.pid for agent in fleet.agents.values()]
        assert all(agent.running for agent in fleet.agents.values())
    assert all(_gone(pid) for pid in pids)


def test_agent_that_cannot_start_is_reported_and_others_stopped(demo_fleet):
    broken = demo_fleet.agents["demo-2"]
    with open(broken.conf_path, "a") as handle:
        handle.write("this is not a config line\n")
    with pytest.raises(demo.DemoError) as info:
        demo_fleet.start()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("agent demo-2 exited with status 78 before starting:")
    assert broken.log_path in message
    assert not demo_fleet.agents["demo-1"].running


def test_curl_lines_cover_every_demo_endpoint(demo_fleet):
    lines = demo_fleet.curl_lines()
    url = "http://127.0.0.1:%d" % demo_fleet.api_port
    text = "\n".join(lines)
    for endpoint in ("/health", "/discovery", "/ping", "/run", "/status/$REQID",
                     "/openapi-live.json", "/docs"):
        assert url + endpoint in text, endpoint
    assert any(line.startswith("curl -N ") and '"stream":true' in line for line in lines)
    assert any('"async":true' in line for line in lines)
    assert '"hosts":["demo-1","demo-2"],"script":"hello"' in text
    for line in lines:
        if "-d '" in line:
            body = line.split("-d '", 1)[1].split("'", 1)[0]
            assert isinstance(json.loads(body), dict)
    assert url in demo_fleet.intro()


def test_prepare_again_wipes_and_recreates_a_demo_folder(tmp_path):
    root = str(tmp_path / "demo-state")
    addresses = [free_address(), free_address()]
    first = demo.prepare_demo(root, api_port=free_port(), agent_addresses=addresses)
    old_ca = open(os.path.join(root, "pki", "ca.crt")).read()
    stray = os.path.join(root, "agents", "demo-1", "leftover.txt")
    open(stray, "w").write("x")
    second = demo.prepare_demo(root, api_port=free_port(), agent_addresses=addresses)
    assert not os.path.exists(stray)
    assert open(os.path.join(root, "pki", "ca.crt")).read() != old_ca
    assert second.conf_path == first.conf_path


def test_refuses_to_wipe_a_folder_that_is_not_a_demo(tmp_path):
    root = tmp_path / "precious"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(demo.DemoError) as info:
        demo.prepare_demo(str(root), api_port=free_port(),
                          agent_addresses=[free_address(), free_address()])
    assert "refusing to wipe" in str(info.value)
    assert demo.MARKER_NAME in str(info.value)
    assert (root / "notes.txt").read_text() == "keep me"
    assert sorted(os.listdir(root)) == ["notes.txt"]


def test_empty_existing_folder_is_used(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    fleet = demo.prepare_demo(str(root), api_port=free_port(),
                              agent_addresses=[free_address(), free_address()])
    assert os.path.isfile(fleet.conf_path)


def test_port_in_use_is_a_clear_error(tmp_path):
    address, port = free_address()
    listener = socket.socket()
    try:
        listener.bind((address, port))
        listener.listen(1)
        with pytest.raises(demo.DemoError) as info:
            demo.prepare_demo(str(tmp_path / "d"), api_port=free_port(),
                              agent_addresses=[(address, port), free_address()])
    finally:
        listener.close()
    assert str(info.value) == ("port %d on %s is in use - stop the other demo or agent first"
                               % (port, address))
    assert not (tmp_path / "d").exists()


def test_api_port_in_use_is_a_clear_error(tmp_path):
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with pytest.raises(demo.DemoError) as info:
            demo.prepare_demo(str(tmp_path / "d"), api_port=port,
                              agent_addresses=[free_address(), free_address()])
    finally:
        listener.close()
    assert "port %d on 127.0.0.1 is in use" % port in str(info.value)


def test_missing_openssl_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(demo.DemoError) as info:
        demo.prepare_demo(str(tmp_path / "d"), api_port=free_port(),
                          agent_addresses=[free_address(), free_address()])
    assert "openssl" in str(info.value)
    assert not (tmp_path / "d").exists()


def test_unwritable_state_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(demo.DemoError) as info:
        demo.prepare_demo(str(blocker / "demo"), api_port=free_port(),
                          agent_addresses=[free_address(), free_address()])
    assert "is not writable" in str(info.value)


@pytest.mark.parametrize("addresses, fragment", [
    ([("10.1.2.3", 7443), ("127.0.0.3", 7443)], "only IPv4 loopback"),
    ([("::1", 7443), ("127.0.0.3", 7443)], "only IPv4 loopback"),
    ([("127.0.0.9", 7443), ("127.0.0.9", 7443)], "used twice"),
    ([("127.0.0.9", 0), ("127.0.0.10", 7443)], "a number 1-65535"),
    ([("127.0.0.9", 7443)], "must list 2"),
])
def test_bad_agent_addresses_are_refused(tmp_path, addresses, fragment):
    with pytest.raises(demo.DemoError) as info:
        demo.prepare_demo(str(tmp_path / "d"), api_port=free_port(),
                          agent_addresses=addresses)
    assert fragment in str(info.value)
    assert not (tmp_path / "d").exists()
