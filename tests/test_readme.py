"""The README's commands work as written: the curl tour against ``--demo``.

The demo uses its documented fixed addresses (API 127.0.0.1:7445, agents on
127.0.0.2/127.0.0.3:7443), so the test runs it from a temporary folder and
skips, with a reason, only if those ports are taken by something else.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def _block(marker: str) -> str:
    text = open(README, encoding="utf-8").read()
    match = re.search(r"<!-- %s:start -->\s*```sh\n(.*?)```\s*<!-- %s:end -->" % (marker, marker),
                      text, re.S)
    assert match, "README.md has no %s block" % marker
    return match.group(1)


def _port_busy(address: str, port: int) -> bool:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
    try:
        sock.bind((address, port))
        return False
    except OSError:
        return True
    finally:
        sock.close()


@pytest.fixture
def demo(tmp_path):
    busy = [a for a, p in (("127.0.0.1", 7445), ("127.0.0.2", 7443), ("127.0.0.3", 7443))
            if _port_busy(a, p)]
    if busy:
        pytest.skip("demo ports in use on %s" % ", ".join(busy))
    # README commands run from the repository root: mirror it (symlinks) in tmp_path.
    for name in os.listdir(ROOT):
        if name.endswith(".py") or name in ("openapi.json", "examples"):
            os.symlink(os.path.join(ROOT, name), str(tmp_path / name))
    log = open(tmp_path / "demo.log", "wb")
    proc = subprocess.Popen([sys.executable, "ctrlexec_api.py", "--demo"],
                            cwd=str(tmp_path), stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, CTRL_EXEC_LOG="stderr"))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen("http://127.0.0.1:7445/health", timeout=2) as answer:
                    assert json.load(answer)["ok"] is True
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("demo did not start:\n" + (tmp_path / "demo.log").read_text())
                time.sleep(0.2)
        yield tmp_path
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
    assert proc.returncode == 0, (tmp_path / "demo.log").read_text()
    intro = (tmp_path / "demo.log").read_text()
    assert "NO AUTHENTICATION" in intro
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout
    assert leftover.strip() == "", "demo agents still running: " + leftover


def test_readme_curl_tour_works_against_the_demo(demo):
    script = "set -euo pipefail\n" + _block("tour")
    done = subprocess.run(["bash", "-c", script], cwd=str(demo), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert '"ok":true,"version"' in out
    assert '"demo-1":{' in out and '"role":"web"' in out
    assert "hello from demo-1" in out and "hello from demo-2" in out and "args: world" in out
    assert '"exit":3' in out
    assert '"event":"start"' in out and '"event":"done"' in out
    assert out.count('"complete":true') >= 2  # the stored sync run, and the async one after polling
    assert '"mode":"async"' in out
    assert "['disk-usage', 'fail', 'hello', 'sleep']" in out
    assert "<rapi-doc" in out
    assert "demo-1: demo-1: 1/1 seconds" in out  # the WebSocket client's live lines


def test_readme_cli_tour_works_against_the_demo(demo):
    script = "set -euo pipefail\n" + _block("cli")
    done = subprocess.run(["bash", "-c", script], cwd=str(demo), capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PATH=os.environ["PATH"]))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "demo-1" in done.stdout and "demo-2" in done.stdout


def test_ci_runs_the_readme_setup_line_and_test_command_in_a_fresh_venv():
    """.ci/run does what a newcomer does: the README's venv set-up line, then its test command."""
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    setup = _block("setup").strip()
    assert setup.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install")
    ci_lines = [line.strip() for line in ci.splitlines() if line.strip() and not line.startswith("#")]
    setup_in_ci = [line for line in ci_lines if "-m venv" in line]
    assert setup_in_ci, ".ci/run builds no virtualenv"
    # the same line, with only pip's quiet flag and venv's --clear (a fresh venv every run) added
    assert setup_in_ci[0].replace(" --clear", "").replace(" -q", "") == setup
    test_command = [line.split("#")[0].strip() for line in _block("commands").splitlines()
                    if "pytest" in line][0]
    assert ci_lines[-1] == test_command
