"""The web console (/ui) in a real headless Chromium against the real demo fleet.

The demo fleet (two agents, auth default allow) and a real API process are started;
a streamed `sleep` run is started over HTTP, and Chromium opens `/ui#run=<reqid>`
while it runs. The dumped DOM must show the fleet (hosts, tags, reachability, cert
expiry), the recent runs, and the live run's output per host. Chromium is a Debian
package that `.ci/run` installs; without it these tests skip, except under CI=true.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess

import pytest

import demo
from apitest_support import ApiServer
from fleet import free_address, free_port

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_TIMEOUT_S = 90
RUN_SECONDS = 8


def _chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI") == "true":
        pytest.fail("chromium is not installed, and CI=true requires the console tests "
                    "(.ci/run installs the Debian package chromium)")
    pytest.skip("chromium is not installed (apt-get install chromium)")


def browse(tmp_path, url: str, *extra: str, budget_ms: int = 3000) -> subprocess.CompletedProcess:
    """Headless Chromium on ``url``: its own profile, no network beyond loopback, killed after."""
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-dev-shm-usage", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--disable-extensions",
               "--disable-default-apps", "--metrics-recording-only", "--mute-audio",
               "--user-data-dir=%s" % profile, "--virtual-time-budget=%d" % budget_ms,
               *extra, url]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True,
                            env=dict(os.environ, HOME=str(tmp_path)))
    try:
        out, err = proc.communicate(timeout=CHROMIUM_TIMEOUT_S)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return subprocess.CompletedProcess(command, proc.returncode, out.decode("utf-8", "replace"),
                                       err.decode("utf-8", "replace"))


@pytest.fixture
def console(tmp_path):
    """The demo fleet's agents and its API, started; yields (api, fleet); always stopped."""
    _chromium()
    fleet = demo.prepare_demo(str(tmp_path / "demo-state"), api_port=free_port(),
                              agent_addresses=[free_address(), free_address()])
    api = ApiServer(fleet.conf_path, str(tmp_path / "api.log"), fleet.api_port)
    try:
        fleet.start()
        api.start()
        yield api, fleet
    finally:
        api.stop()
        fleet.stop()


def _run_hello(port: int) -> dict:
    """A finished sync run of `hello` on both demo hosts; returns its answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/run", json.dumps({"hosts": ["demo-1", "demo-2"],
                                             "script": "hello", "args": ["console"]}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    answer = json.loads(response.read())
    conn.close()
    assert response.status == 200 and answer["ok"], answer
    return answer


def _start_streamed_sleep(port: int):
    """POST /run (stream) of `sleep RUN_SECONDS` on both demo hosts; returns (conn, reqid)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/run", json.dumps({"hosts": ["demo-1", "demo-2"], "script": "sleep",
                                             "args": [str(RUN_SECONDS)], "stream": True}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    first = json.loads(response.readline())
    assert first["event"] == "start"
    # Chromium opens the page once both hosts have printed their first line, so the
    # page's follow request replays it however slowly the browser starts.
    waiting = {"demo-1", "demo-2"}
    while waiting:
        event = json.loads(response.readline())
        if event["event"] == "stdout" and "1/%d seconds" % RUN_SECONDS in event["data"]:
            waiting.discard(event["host"])
        assert event["event"] not in ("exit", "done"), event
    return conn, response, first["reqid"]


def test_console_renders_the_demo_fleet_and_follows_a_live_run(console, tmp_path):
    api, fleet = console
    finished = _run_hello(api.port)["reqid"]
    conn, response, reqid = _start_streamed_sleep(api.port)
    try:
        page = browse(tmp_path, "http://127.0.0.1:%d/ui#run=%s" % (api.port, reqid),
                      "--dump-dom", budget_ms=4000)
        dom = page.stdout
        assert "<h1>ctrl-exec</h1>" in dom, page.stderr[-2000:]
        for host, tags in (("demo-1", "env=demo, role=web"), ("demo-2", "env=demo, role=db")):
            assert '<tr data-host="%s">' % host in dom, dom
            assert "<td>%s</td>" % tags in dom, dom
        assert dom.count('<td class="ok">yes</td>') == 2, dom
        assert "GMT" in dom and '<option value="sleep">sleep</option>' in dom, dom
        assert "run %s" % reqid in dom, dom
        for host in ("demo-1", "demo-2"):
            assert '<div class="host-output" data-host="%s">' % host in dom, dom
            assert "%s: 1/%d seconds" % (host, RUN_SECONDS) in dom, dom
        assert '<tr data-reqid="%s"><td>%s</td><td>hello</td>' % (finished, finished) in dom, dom
        assert 'id="message" role="alert"></p>' in dom, dom
    finally:
        response.read()
        conn.close()
    log = open(api.log_path, encoding="utf-8", errors="replace").read()
    assert "GET /runs/%s/events" % reqid in log or "PATH=/runs/%s/events" % reqid in log, log


def test_console_screenshot_shows_a_finished_run(console, tmp_path):
    api, _ = console
    answer = _run_hello(api.port)
    shot = tmp_path / "console.png"
    page = browse(tmp_path, "http://127.0.0.1:%d/ui#run=%s" % (api.port, answer["reqid"]),
                  "--screenshot=%s" % shot, "--window-size=1280,900", "--hide-scrollbars")
    target = os.environ.get("CTRL_EXEC_CONSOLE_SCREENSHOT")
    assert shot.exists(), page.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20000
    if target:
        shutil.copyfile(shot, target)


def test_ui_assets_carry_a_strict_content_security_policy(console):
    api, _ = console
    for path, kind in (("/ui", "text/html"), ("/ui/console.js", "javascript"),
                       ("/ui/console.css", "text/css")):
        conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=30)
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        conn.close()
        assert response.status == 200 and body, path
        assert kind in response.getheader("Content-Type"), path
        policy = response.getheader("Content-Security-Policy") or ""
        assert "default-src 'self'" in policy and "unsafe-inline" not in policy, policy
        assert response.getheader("X-Content-Type-Options") == "nosniff"
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=30)
    conn.request("GET", "/ui/../ctrl-exec.conf")
    response = conn.getresponse()
    response.read()
    conn.close()
    assert response.status == 404


def test_docs_render_offline_from_the_control_host(console, tmp_path):
    api, _ = console
    shot = tmp_path / "docs.png"
    page = browse(tmp_path, "http://127.0.0.1:%d/docs" % api.port,
                  "--screenshot=%s" % shot, "--window-size=1280,900", budget_ms=8000)
    assert shot.exists(), page.stderr[-2000:]
    log = open(api.log_path, encoding="utf-8", errors="replace").read()
    for path in ("/docs", "/docs/rapidoc-min.js", "/openapi-live.json"):
        assert "PATH=%s PEER=127.0.0.1 STATUS=200" % path in log, (path, log[-3000:])
    assert shot.stat().st_size > 30000, "the /docs page rendered blank"
    if os.environ.get("CTRL_EXEC_DOCS_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["CTRL_EXEC_DOCS_SCREENSHOT"])
