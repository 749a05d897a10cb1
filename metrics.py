"""Prometheus metrics of one API process, served at ``GET /metrics`` (prometheus_client).

Owns: this process's own ``CollectorRegistry`` (never the library's global one) and
the observations the service and the HTTP layer report to it: runs by script and
outcome, per-host states, per-host dispatch latency, auth hook latency and denials,
lock conflicts, active live streams, open connections, and, computed at scrape time,
the days left on the dispatcher certificate and on the soonest agent certificate.

Labels stay bounded: hosts are never labels; scripts are (allowlisted names), capped
at MAX_SCRIPT_LABELS distinct values, beyond which they count as "(other)". Under
the Redis backend each API node exposes its own process's figures.

Never does: import the API or the CLI, or see a token.
"""
from __future__ import annotations

__all__ = ["Metrics", "CONTENT_TYPE", "MAX_SCRIPT_LABELS"]

import threading
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

import ctrlexec_agent as wire
import engine as engine_mod
import lifecycle

CONTENT_TYPE = CONTENT_TYPE_LATEST
MAX_SCRIPT_LABELS = 200
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    """The metrics of one API process; every ``observe_*`` call is cheap and thread-safe.

    Args: cfg (config.Config: cert for the dispatcher's expiry); agent_expiries —
    callable returning the registry's recorded agent ``expiry`` strings (read at scrape).
    """

    def __init__(self, cfg: Any, agent_expiries: Callable[[], Iterable[str]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._scripts: set = set()
        self._lock = threading.Lock()
        r = self.registry
        self.runs = Counter("ctrlexec_runs_total", "Runs by script, mode and outcome "
                            "(ok, failed, denied, locked, error).", ("script", "mode", "outcome"),
                            registry=r)
        self.host_results = Counter("ctrlexec_host_results_total",
                                    "Per-host rows of finished runs by state.", ("state",), registry=r)
        self.dispatch_seconds = Histogram("ctrlexec_dispatch_seconds",
                                          "Per-host round trip of a run (connect to answer).",
                                          buckets=_LATENCY_BUCKETS, registry=r)
        self.hook_seconds = Histogram("ctrlexec_auth_hook_seconds", "Auth hook latency by action.",
                                      ("action",), buckets=_LATENCY_BUCKETS, registry=r)
        self.denials = Counter("ctrlexec_auth_denials_total", "Requests the auth decision denied, "
                               "by action.", ("action",), registry=r)
        self.lock_conflicts = Counter("ctrlexec_lock_conflicts_total",
                                      "Runs refused because a host+script lock was held.", registry=r)
        self.streams = Gauge("ctrlexec_active_streams", "Live output streams being served "
                             "(NDJSON /run, /ws/run, /runs/{reqid}/events).", registry=r)
        self.connections = Gauge("ctrlexec_open_connections", "Open HTTP connections.", registry=r)
        r.register(_ExpiryCollector(cfg, agent_expiries))
        for state in engine_mod.HOST_STATES:
            self.host_results.labels(state)

    def exposition(self) -> bytes:
        """The text exposition format of every metric."""
        return generate_latest(self.registry)

    def observe_auth(self, action: str, *, allowed: bool, seconds: float, hooked: bool) -> None:
        if hooked:
            self.hook_seconds.labels(action).observe(seconds)
        if not allowed:
            self.denials.labels(action).inc()

    def observe_refused(self, script: str, mode: str, outcome: str) -> None:
        """A run that never dispatched: "denied" or "locked"."""
        self.runs.labels(self._script(script), mode, outcome).inc()
        if outcome == "locked":
            self.lock_conflicts.inc()

    def observe_run(self, script: str, mode: str, rows: list) -> None:
        """A dispatched run: its outcome and every host row's state and round trip."""
        ok = True
        for row in rows:
            state = engine_mod.row_state(row)
            ok = ok and state == "ok"
            self.host_results.labels(state).inc()
            seconds = _rtt_seconds(row.get("rtt"))
            if seconds is not None:
                self.dispatch_seconds.observe(seconds)
        self.runs.labels(self._script(script), mode, "ok" if ok else "failed").inc()

    def stream_opened(self) -> None:
        self.streams.inc()

    def stream_closed(self) -> None:
        self.streams.dec()

    def connection_opened(self) -> None:
        self.connections.inc()

    def connection_closed(self) -> None:
        self.connections.dec()

    def _script(self, script: str) -> str:
        with self._lock:
            if script in self._scripts:
                return script
            if len(self._scripts) < MAX_SCRIPT_LABELS:
                self._scripts.add(script)
                return script
        return "(other)"


class _ExpiryCollector:
    """ctrlexec_cert_expiry_days{cert="dispatcher"|"agent_soonest"}, read at scrape time."""

    def __init__(self, cfg: Any, agent_expiries: Callable[[], Iterable[str]]) -> None:
        self.cfg = cfg
        self.agent_expiries = agent_expiries

    def describe(self) -> list:
        return [GaugeMetricFamily("ctrlexec_cert_expiry_days", "Days until a certificate "
                                  "expires (negative once expired).", labels=("cert",))]

    def collect(self) -> Iterable[Any]:
        family = GaugeMetricFamily("ctrlexec_cert_expiry_days", "Days until a certificate "
                                   "expires (negative once expired).", labels=("cert",))
        mine = lifecycle.days_left(wire.cert_not_after(self.cfg.cert))
        if mine is not None:
            family.add_metric(["dispatcher"], mine)
        try:
            agents = [d for d in (lifecycle.days_left(e) for e in self.agent_expiries())
                      if d is not None]
        except Exception:  # noqa: BLE001 - a scrape never fails on the registry; logged
            wire.log_action("warning", "metrics-registry-fail")
            agents = []
        if agents:
            family.add_metric(["agent_soonest"], min(agents))
        yield family


def _rtt_seconds(rtt: Any) -> float | None:
    """ "87ms" -> 0.087."""
    if isinstance(rtt, str) and rtt.endswith("ms") and rtt[:-2].isdigit():
        return int(rtt[:-2]) / 1000.0
    return None
