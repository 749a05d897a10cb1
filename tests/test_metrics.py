"""GET /metrics on a real API process: the figures move as real runs happen.

Real agents (tests/fleet.py), a real auth hook executable that denies one script,
a real lock conflict, and the Prometheus text parsed with prometheus_client's own
parser.
"""

from __future__ import annotations

import os
import threading

from prometheus_client.parser import text_string_to_metric_families

from apitest_support import ApiServer, http_call
from fleet import Fleet, wait_for, write_executable

OK_SCRIPT = '#!/bin/sh\necho "ok $*"\n'
GATED_SCRIPT = ('#!/bin/sh\ntouch "$0.started"\n'
                'i=0; while [ -e "$0.gate" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done\n')
HOOK = ('#!/bin/sh\ncat >/dev/null\n'
        '[ "$ENVEXEC_ACTION" = run ] && [ "$ENVEXEC_SCRIPT" = forbidden ] && exit 1\n'
        '[ "$ENVEXEC_ACTION" = metrics ] && [ "$ENVEXEC_TOKEN" != scrape ] && exit 2\nexit 0\n')


def scrape(api: ApiServer) -> dict:
    """{(name, frozenset(labels.items())): value} of one /metrics answer."""
    status, headers, raw = http_call(api.port, "GET", "/metrics",
                                        headers={"Authorization": "Bearer scrape"})
    assert status == 200 and headers["content-type"].startswith("text/plain"), raw
    values = {}
    for family in text_string_to_metric_families(raw.decode()):
        for sample in family.samples:
            values[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return values


def value(values: dict, name: str, **labels) -> float:
    return values.get((name, frozenset(labels.items())), 0.0)


def test_metrics_follow_runs_denials_conflicts_and_streams(tmp_path):
    fleet = Fleet.with_agents(str(tmp_path), ["m-01", "m-02"],
                              scripts={"hello": OK_SCRIPT, "gated": GATED_SCRIPT,
                                       "forbidden": OK_SCRIPT})
    fleet.set_conf(auth_hook=write_executable(str(tmp_path / "hook"), HOOK))
    api = ApiServer.for_fleet(fleet, str(tmp_path / "api.log"))
    try:
        api.start()
        before = scrape(api)
        assert value(before, "ctrlexec_cert_expiry_days", cert="dispatcher") > 800
        assert value(before, "ctrlexec_cert_expiry_days", cert="agent_soonest") > 800
        assert value(before, "ctrlexec_open_connections") >= 1

        status, body = api.request("POST", "/run", {"hosts": ["m-01", "m-02"], "script": "hello"})
        assert status == 200
        status, body = api.request("POST", "/run", {"hosts": ["m-01"], "script": "forbidden"})
        assert status == 403

        gate = os.path.join(fleet.agents["m-01"].scripts_dir, "gated.gate")
        open(gate, "w").close()
        holder = threading.Thread(target=api.request, args=(
            "POST", "/run", {"hosts": ["m-01"], "script": "gated", "stream": True}))
        holder.start()
        try:
            wait_for(lambda: os.path.exists(gate[:-5] + ".started"), "the gated run to start")
            during = scrape(api)
            assert value(during, "ctrlexec_active_streams") == 1
            status, body = api.request("POST", "/run", {"hosts": ["m-01"], "script": "gated"})
            assert status == 409
        finally:
            os.unlink(gate)
            holder.join(60)

        after = scrape(api)
        assert value(after, "ctrlexec_runs_total", script="hello", mode="sync", outcome="ok") == 1
        assert value(after, "ctrlexec_runs_total", script="forbidden", mode="sync",
                     outcome="denied") == 1
        assert value(after, "ctrlexec_runs_total", script="gated", mode="sync", outcome="locked") == 1
        assert value(after, "ctrlexec_runs_total", script="gated", mode="stream", outcome="ok") == 1
        assert value(after, "ctrlexec_lock_conflicts_total") == 1
        assert value(after, "ctrlexec_auth_denials_total", action="run") == 1
        assert value(after, "ctrlexec_host_results_total", state="ok") == 3
        assert value(after, "ctrlexec_dispatch_seconds_count") == 3
        assert value(after, "ctrlexec_auth_hook_seconds_count", action="run") >= 4
        assert value(after, "ctrlexec_active_streams") == 0

        status, _, body = http_call(api.port, "GET", "/metrics",
                                       headers={"Authorization": "Bearer wrong"})
        assert status == 403 and body["error"] == "bad credentials"
    finally:
        api.stop()
        fleet.stop_all()
