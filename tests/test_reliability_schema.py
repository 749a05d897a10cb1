"""Property-based API testing: schemathesis drives every operation of openapi.json.

The target is a real `python ctrlexec_api.py --config …` process in front of a
real fleet of two agents (tests/fleet.py) with api_auth_default = allow. Two
runs are made: the repository's openapi.json with positive and negative data,
and the API's own GET /openapi-live.json with positive data, so generated hosts
and scripts come from the live enums and positive cases really run scripts on
the agents. Every response must pass schemathesis's response checks (no 5xx,
status code documented, content type documented, body matches the response
schema, documented headers, negative data rejected with a 4xx).

schemathesis is driven through its command line (`python -m schemathesis.cli
run`), not its pytest plugin: the plugin's fixture integration breaks with each
new pytest release, the CLI is its stable interface, and its NDJSON event report
says exactly how many cases ran and which failed. A CLI that cannot run (not
installed, crashed, schema not loaded) fails the tests with its own output,
never as a bare count.

Bounded for CI: MAX_EXAMPLES per operation, a fixed seed, no shrinking, no
example database, one worker; both runs together take seconds on 2 cores.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import subprocess
import sys

import pytest

from apitest_support import ApiServer
from fleet import Fleet
from reliability_support import ROOT

SPEC_PATH = os.path.join(ROOT, "openapi.json")

#: Generated examples per operation and generation phase (bounded for CI).
MAX_EXAMPLES = 30
#: Fewer generated cases than this means the tool did not really exercise the API.
MIN_CASES = 100
#: Upper bound of one schemathesis run (it normally takes seconds).
RUN_TIMEOUT_S = 600
#: The repository's schemathesis settings (the /ws/run handshake statuses 101 and 426).
CONFIG_FILE = os.path.join(ROOT, "schemathesis.toml")
#: Checks that contradict SPEC.md, with the reason (also in RELIABILITY.md).
EXCLUDED_CHECKS: dict = {}
#: Operations left out of the property run, with the reason (also in RELIABILITY.md).
EXCLUDED_PATHS: dict = {}
#: Scripts on both agents: output, arguments echoed back, a failure, stderr.
SCRIPTS = {
    "hello": "#!/bin/sh\necho hi\n",
    "echo-args": "#!/bin/sh\nprintf '%s\\n' \"$@\"\n",
    "fail": "#!/bin/sh\necho oops >&2\nexit 3\n",
}


class FuzzRun:
    """One finished schemathesis CLI run, read back from its NDJSON event report.

    Attributes: name, returncode, output (the CLI's stdout and stderr), cases
    (generated cases that were sent), failures (["METHOD /path: check …"]),
    problem (why the tool could not run, or None).
    """

    def __init__(self, name: str, proc: subprocess.CompletedProcess, report_dir: str) -> None:
        self.name = name
        self.returncode = proc.returncode
        self.output = (proc.stdout or "") + (proc.stderr or "")
        self.cases = 0
        self.failures: list = []
        self.problem = None
        events = self._read_events(report_dir)
        if self.problem is None:
            self._summarise(events)

    def _read_events(self, report_dir: str) -> list:
        reports = glob.glob(os.path.join(report_dir, "*.ndjson"))
        if self.returncode not in (0, 1):
            self.problem = "schemathesis exited %d (0 = passed, 1 = check failures)" % self.returncode
            return []
        if not reports:
            self.problem = "schemathesis wrote no NDJSON report in %s" % report_dir
            return []
        with open(reports[0], encoding="utf-8") as fh:
            events = [json.loads(line) for line in fh if line.strip()]
        finished = [e["EngineFinished"] for e in events if "EngineFinished" in e]
        if not finished or finished[0].get("stop_reason") != "completed":
            self.problem = "schemathesis did not complete its run (%s)" % (
                finished[0].get("stop_reason") if finished else "no EngineFinished event")
        errors = [e for e in events if "NonFatalError" in e or "FatalError" in e]
        if errors:
            self.problem = "schemathesis reported errors: %s" % json.dumps(errors)[:2000]
        return events

    def _summarise(self, events: list) -> None:
        for event in events:
            scenario = event.get("ScenarioFinished")
            if not scenario:
                continue
            recorder = scenario.get("recorder") or {}
            self.cases += len(recorder.get("interactions") or {})
            for check_list in (recorder.get("checks") or {}).values():
                for check in check_list:
                    if check.get("status") == "failure":
                        self.failures.append("%s: %s %s" % (recorder.get("label"), check.get("name"),
                                                            (check.get("failure_info") or {})))

    def explain(self) -> str:
        """The CLI's output tail, for an assertion message."""
        return "schemathesis %s run:\n%s" % (self.name, self.output[-6000:])


def _run_schemathesis(name: str, location: str, base: str, mode: str, report_dir: str) -> FuzzRun:
    """Run the schemathesis CLI once against the live API; never raises for a failed run."""
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", CONFIG_FILE, "run", location,
           "--checks", "all",
           "--url", base, "--mode", mode, "--max-examples", str(MAX_EXAMPLES),
           "--seed", "1", "--no-shrink", "--generation-database", "none", "--workers", "1",
           "--request-timeout", "60", "--wait-for-schema", "20",
           "--report", "ndjson", "--report-dir", report_dir]
    for check in EXCLUDED_CHECKS:
        cmd += ["--exclude-checks", check]
    for path in EXCLUDED_PATHS:
        cmd += ["--exclude-path", path]
    env = dict(os.environ, NO_COLOR="1", SCHEMATHESIS_TELEMETRY="false")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                              cwd=report_dir, env=env)
    except subprocess.TimeoutExpired as exc:
        proc = subprocess.CompletedProcess(cmd, -9, exc.stdout or "", "timed out after %ds" % RUN_TIMEOUT_S)
    return FuzzRun(name, proc, report_dir)


@pytest.fixture(scope="module")
def live_api(tmp_path_factory):
    """A real API process (allow-all) in front of two real agents; stopped after the module."""
    root = str(tmp_path_factory.mktemp("schema-fleet"))
    fleet = Fleet.with_agents(root, ["web-01", "web-02"], scripts=SCRIPTS, read_timeout="20")
    api = None
    try:
        api = ApiServer.for_fleet(fleet, os.path.join(root, "api.log")).start()
        yield api
    finally:
        if api is not None:
            code = api.stop()
            assert code == 0, "API exit %s:\n%s" % (code, api.log()[-3000:])
        fleet.stop_all()


@pytest.fixture(scope="module")
def fuzz_runs(live_api, tmp_path_factory) -> dict:
    """Both property runs, made once for the module: {"static": FuzzRun, "live": FuzzRun}.

    static: openapi.json with positive and negative data. live: GET /openapi-live.json
    with positive data only, because its enums are advisory (for /docs): SPEC §5 answers
    an unregistered host or an unlisted script inline with HTTP 200, so enum violations
    are not negative data for this API.
    """
    base = "http://127.0.0.1:%d" % live_api.port
    runs = {}
    for name, location, mode in (("static", SPEC_PATH, "all"),
                                 ("live", base + "/openapi-live.json", "positive")):
        report_dir = str(tmp_path_factory.mktemp("schemathesis-" + name))
        runs[name] = _run_schemathesis(name, location, base, mode, report_dir)
    return runs


@pytest.mark.parametrize("name", ["static", "live"])
def test_property_run_generated_enough_cases(fuzz_runs, name):
    run = fuzz_runs[name]
    if run.problem:
        pytest.fail("the property-based run could not run: %s\n%s" % (run.problem, run.explain()))
    assert run.cases >= MIN_CASES, ("schemathesis sent only %d generated cases (need >= %d): "
                                    "the API was not really exercised\n%s"
                                    % (run.cases, MIN_CASES, run.explain()))


def test_static_spec_positive_and_negative_examples(fuzz_runs, live_api):
    run = fuzz_runs["static"]
    if run.problem:
        pytest.fail("the property-based run could not run: %s" % run.problem)
    assert not run.failures and run.returncode == 0, "\n".join(run.failures[:20]) + "\n" + run.explain()
    assert live_api.alive(), "API died:\n" + live_api.log()[-3000:]


def test_live_spec_positive_examples_run_on_the_real_fleet(fuzz_runs, live_api):
    run = fuzz_runs["live"]
    if run.problem:
        pytest.fail("the property-based run could not run: %s" % run.problem)
    assert not run.failures and run.returncode == 0, "\n".join(run.failures[:20]) + "\n" + run.explain()
    assert live_api.alive(), "API died:\n" + live_api.log()[-3000:]


def test_api_survived_and_logged_no_server_error(fuzz_runs, live_api):
    """After the property runs: healthy, no 5xx or api-error logged, and real runs happened."""
    problems = ["%s: %s" % (name, run.problem) for name, run in fuzz_runs.items() if run.problem]
    if problems:
        pytest.fail("the property-based runs did not happen, nothing to check: " + "; ".join(problems))
    assert live_api.health_ok()
    log = live_api.log()
    assert "ACTION=api-error" not in log, log[log.find("ACTION=api-error") - 200:][:2000]
    assert "Traceback" not in log, log[-3000:]
    statuses = collections.Counter(re.findall(r"ACTION=api-request .*STATUS=(\d+)", log))
    assert not [code for code in statuses if code.startswith("5")], statuses
    # positive examples from the live enums reached the agents and ran scripts there
    ran = re.findall(r"ACTION=run-done .*OK=(\d+)", log)
    assert sum(int(n) for n in ran) > 0, "no script ran on an agent"
    print("schemathesis: %s cases, statuses %s, %d runs"
          % ({name: run.cases for name, run in fuzz_runs.items()},
             dict(sorted(statuses.items())), len(ran)))
