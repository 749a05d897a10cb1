"""Fan-out across worker processes, so that one run can use more than one core.

Owns: ``SplitEngine`` (an ``engine.Engine`` whose ``dispatch_all`` hands contiguous
slices of a large fan-out to ``dispatch_workers`` child processes and merges their
rows in request order, streams interleaved live), the worker processes (each
``python workers.py --fd N``: its own gevent hub, its own ``Engine``, TLS context and
session cache), the frame protocol between them (a 4-byte length, then one ujson
object, over a private socketpair), and ``engine_from_config``.

Never does: auth, locks, records or registry reads. Those stay in the one process
that called ``dispatch_all`` (service.py), so they behave exactly as with one
process. The workers only dial the targets they are given.

A fan-out is split only when it is worth it and safe:
- it has at least ``SPLIT_MIN_HOSTS`` hosts;
- it has no failure budget, no concurrency limit and no batches, because those are
  one counter across the whole fleet.

Every other call (ping, capabilities, results, cancel, renew, …) runs in-process.
Cancel reaches the workers within ``engine.CANCEL_CHECK_S``. If a worker dies
mid-run, its hosts are reported ``lost`` (the agents may have run the script) and
a new worker is started for the next run.
"""

if __name__ == "__main__":           # a worker process is an entry point: patch first
    from gevent import monkey
    monkey.patch_all()

__all__ = ["SplitEngine", "engine_from_config", "SPLIT_MIN_HOSTS", "serve"]

import argparse
import collections
import itertools
import os
import signal
import socket
import struct
import subprocess
import sys
from typing import Any, Callable, Optional

import gevent
import gevent.lock
import gevent.queue
import gevent.socket
import ujson

import ctrlexec_agent as wire
import engine as engine_mod

#: Fewer hosts than this stay in the calling process (a worker round trip costs
#: about a millisecond; a slice of a few hosts gains nothing from another core).
SPLIT_MIN_HOSTS = 64
#: Largest frame either side accepts (a 1,000-host answer with full outputs fits).
MAX_FRAME_BYTES = 1 << 30
#: Seconds a new worker gets to import and build its engine.
START_TIMEOUT_S = 30.0
#: Seconds a worker gets to exit after its socket is closed, then SIGKILL.
STOP_GRACE_S = 5.0

_HERE = os.path.dirname(os.path.abspath(__file__))
_FRAME_HEAD = struct.Struct(">I")
_run_ids = itertools.count(1)
#: A target as the worker receives it (engine.py reads these four fields only).
_Target = collections.namedtuple("Target", "entry name address port")


class WorkerLost(Exception):
    """A worker process went away, or sent something that is not a frame."""


def _frame(message: dict) -> bytes:
    data = ujson.dumps(message, escape_forward_slashes=False).encode("utf-8")
    return _FRAME_HEAD.pack(len(data)) + data


def _read_exact(sock: socket.socket, size: int) -> Optional[bytes]:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_frame(sock: socket.socket) -> Optional[dict]:
    """The next message, or None at a clean end of stream (WorkerLost if cut or garbled)."""
    head = _read_exact(sock, _FRAME_HEAD.size)
    if head is None:
        return None
    (size,) = _FRAME_HEAD.unpack(head)
    if size > MAX_FRAME_BYTES:
        raise WorkerLost("frame of %d bytes is over the %d limit" % (size, MAX_FRAME_BYTES))
    data = _read_exact(sock, size)
    if data is None:
        raise WorkerLost("stream ended inside a frame")
    try:
        message = ujson.loads(data)
    except ValueError as exc:
        raise WorkerLost("frame is not JSON (%s)" % exc) from None
    if not isinstance(message, dict):
        raise WorkerLost("frame is not a JSON object")
    return message


###############################################################################
# The calling process #########################################################
###############################################################################

class _Worker:
    """One worker process and the greenlet that routes its frames to the runs waiting."""

    def __init__(self, index: int, engine_kwargs: dict) -> None:
        self.index = index
        parent_end, child_end = gevent.socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.join(_HERE, "workers.py"), "--fd", str(child_end.fileno()),
                 "--index", str(index)],
                pass_fds=(child_end.fileno(),), stdin=subprocess.DEVNULL, cwd=_HERE)
        finally:
            child_end.close()
        self.sock = parent_end
        self.alive = True
        self.stopping = False
        self._write_lock = gevent.lock.Semaphore()
        #: run id -> the queue of that run (shared by every worker of the run).
        self.waiting: dict = {}
        self.send({"op": "init", "engine": engine_kwargs})
        self._await_ready()
        self._reader = gevent.spawn(self._route)
        wire.log_action("info", "dispatch-worker-start", WORKER=index, PID=self.proc.pid)

    def _await_ready(self) -> None:
        """Wait for the worker's ready frame (its engine is built), or stop it and raise."""
        self.sock.settimeout(START_TIMEOUT_S)
        try:
            ready = _read_frame(self.sock)
        except (OSError, WorkerLost) as exc:
            ready = {"error": str(exc)}
        self.sock.settimeout(None)
        if ready is None or "ready" not in ready:
            self.stop()
            raise engine_mod.EngineError(
                "dispatch worker %d did not start (%s, exit %s); its error is in the log"
                % (self.index, (ready or {}).get("error", "no ready message"), self.proc.poll()))

    def send(self, message: dict) -> None:
        """One frame to the worker (WorkerLost when it is gone)."""
        try:
            with self._write_lock:
                self.sock.sendall(_frame(message))
        except OSError as exc:
            self.alive = False
            raise WorkerLost("dispatch worker %d is gone (%s)" % (self.index, exc)) from None

    def _route(self) -> None:
        reason = "exited"
        try:
            while True:
                message = _read_frame(self.sock)
                if message is None:
                    break
                queue = self.waiting.get(message.get("id"))
                if queue is not None:
                    queue.put((self.index, message))
        except (OSError, WorkerLost) as exc:
            reason = str(exc)
        self.alive = False
        if self.stopping:
            return
        code = self.proc.poll()
        wire.log_action("err", "dispatch-worker-lost", WORKER=self.index, PID=self.proc.pid,
                        EXIT=code if code is not None else "(running)", REASON=reason)
        for queue in list(self.waiting.values()):
            queue.put((self.index, {"lost": "dispatch worker %d %s" % (self.index, reason)}))

    def stop(self) -> None:
        """Close the socket (the worker exits at end of stream); SIGKILL after STOP_GRACE_S."""
        self.alive = False
        self.stopping = True
        self.sock.close()
        try:
            self.proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.kill(block=False)


class SplitEngine(engine_mod.Engine):
    """An Engine whose large run fan-outs are split across ``workers`` processes.

    The other verbs, and runs that are small or carry a budget, run in this process
    exactly as ``engine.Engine`` runs them. The pool of each worker is
    ``max_parallel / workers`` (at least 1), so the fleet sees the same number of
    connections at once as with one process.
    """

    def __init__(self, *, workers: int, **engine_kwargs: Any) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise engine_mod.EngineError("dispatch_workers must be a whole number >= 1, got %r"
                                         % (workers,))
        super().__init__(**engine_kwargs)
        self.workers = workers
        share = max(1, self.max_parallel // workers)
        self._worker_kwargs = dict(engine_kwargs, max_parallel=share)
        self._pool: list = [None] * workers
        self._spawn_lock = gevent.lock.Semaphore()

    def splits(self, targets: list, control: Optional[engine_mod.RunControl]) -> bool:
        """Whether dispatch_all of ``targets`` under ``control`` goes to the workers."""
        if self.workers < 2 or len(targets) < SPLIT_MIN_HOSTS:
            return False
        return control is None or (control.max_concurrency is None and control.max_errors is None
                                   and not control.batch_wait)

    def dispatch_all(self, targets: list, *, script: str, args: list, reqid: str,
                     username: str = "", token: str = "", timeout: Optional[int] = None,
                     async_: bool = False, on_event: Optional[Callable] = None,
                     control: Optional[engine_mod.RunControl] = None) -> list:
        """engine.Engine.dispatch_all, split across the workers when ``splits`` says so."""
        if not self.splits(targets, control):
            return super().dispatch_all(targets, script=script, args=args, reqid=reqid,
                                        username=username, token=token, timeout=timeout,
                                        async_=async_, on_event=on_event, control=control)
        streamed = on_event is not None and not async_
        request = {"script": script, "args": list(args or []), "reqid": reqid,
                   "username": username or "", "token": token or "", "timeout": timeout,
                   "async_": bool(async_), "stream": streamed}
        slices = _slices(targets, self.workers)
        run_id = next(_run_ids)
        wire.log_action("info", "dispatch-split", REQID=reqid or "(none)", HOSTS=len(targets),
                        WORKERS=len(slices))
        queue: gevent.queue.Queue = gevent.queue.Queue()
        rows: dict = {}
        sent: list = []
        try:
            for index, part in slices:
                try:
                    worker = self._worker(index)
                except engine_mod.EngineError as exc:
                    rows[index] = [engine_mod.failure_row("run-async" if async_ else "run", t,
                                                          "not dispatched: %s" % exc, "0ms",
                                                          reqid, script) for t in part]
                    continue
                worker.waiting[run_id] = queue
                sent.append(worker)
                try:
                    worker.send(dict(request, op="run", id=run_id,
                                     targets=[list(t) for t in part]))
                except WorkerLost as exc:
                    rows[index] = _lost_rows(part, async_, script, reqid, str(exc))
                    continue
                if not worker.alive:   # it died before this run was registered with its reader
                    rows[index] = _lost_rows(part, async_, script, reqid,
                                             "dispatch worker %d exited" % index)
            watcher = gevent.spawn(self._relay_cancel, control, sent, run_id) if control else None
            try:
                self._collect(queue, dict(slices), rows, on_event if streamed else None,
                              async_, script, reqid)
            finally:
                if watcher is not None:
                    watcher.kill(block=False)
        finally:
            for worker in sent:
                worker.waiting.pop(run_id, None)
        return [row for index, _ in slices for row in rows[index]]

    def _collect(self, queue, parts: dict, rows: dict, on_event, async_: bool, script: str,
                 reqid: str) -> None:
        """Until every slice has its rows: forward live events, keep rows, mark lost slices."""
        while len(rows) < len(parts):
            index, message = queue.get()
            if index in rows:
                continue
            if "event" in message:
                if on_event is not None:
                    try:
                        on_event(message["event"])
                    except Exception as exc:  # noqa: BLE001 - a listener must not lose rows; logged
                        wire.log_action("err", "engine-event-error", REQID=reqid or "(none)",
                                        ERROR="%s: %s" % (type(exc).__name__, exc))
            elif "rows" in message and len(message["rows"]) == len(parts[index]):
                rows[index] = message["rows"]
            else:
                reason = message.get("lost") or message.get("error") or "sent an unexpected answer"
                rows[index] = _lost_rows(parts[index], async_, script, reqid, reason)

    def _relay_cancel(self, control: engine_mod.RunControl, workers: list, run_id: int) -> None:
        """Tell the workers of a run to start no further host once ``control`` is cancelled."""
        while not control.cancelled:
            gevent.sleep(engine_mod.CANCEL_CHECK_S)
            control.refusal()        # also asks other nodes (cancelled_elsewhere)
        for worker in workers:
            try:
                worker.send({"op": "cancel", "id": run_id})
            except WorkerLost:
                pass

    def _worker(self, index: int) -> _Worker:
        """Worker ``index``, started (again) when it is not running."""
        with self._spawn_lock:
            worker = self._pool[index]
            if worker is None or not worker.alive or worker.proc.poll() is not None:
                if worker is not None:
                    worker.stop()
                worker = self._pool[index] = _Worker(index, self._worker_kwargs)
            return worker

    def start(self) -> None:
        """Start every worker now (the API does at start-up, so no run waits for one)."""
        for index in range(self.workers):
            self._worker(index)

    def close(self) -> None:
        """Stop every worker process (they also exit by themselves when this process ends)."""
        for index, worker in enumerate(self._pool):
            if worker is not None:
                worker.stop()
                self._pool[index] = None


def _slices(targets: list, count: int) -> list:
    """[(index, targets)] — ``count`` contiguous slices as even as possible, request order."""
    size, extra = divmod(len(targets), count)
    out, first = [], 0
    for index in range(count):
        last = first + size + (1 if index < extra else 0)
        if last > first:
            out.append((index, targets[first:last]))
        first = last
    return out


def _lost_rows(targets: list, async_: bool, script: str, reqid: str, reason: str) -> list:
    """Rows of hosts whose worker died: ``lost``, because their agents may have run it."""
    error = ("%s before this host's answer came back; the agent may have run the script "
             "(see GET /status/%s or the agent's log)" % (reason, reqid))
    rows = []
    for target in targets:
        row = engine_mod.failure_row("run-async" if async_ else "run", target, error, "0ms",
                                     reqid, script)
        row["status"] = "lost"
        rows.append(row)
    return rows


def engine_from_config(cfg: Any) -> engine_mod.Engine:
    """The engine an entry point uses: a SplitEngine when ``dispatch_workers`` > 1."""
    kwargs = {"cert": cfg.cert, "key": cfg.key, "ca": cfg.ca, "read_timeout": cfg.read_timeout,
              "max_parallel": cfg.max_parallel, "connect_timeout": cfg.connect_timeout}
    workers = int(getattr(cfg, "dispatch_workers", 1) or 1)
    if workers > 1:
        return SplitEngine(workers=workers, **kwargs)
    return engine_mod.Engine(**kwargs)


###############################################################################
# The worker process ##########################################################
###############################################################################

def serve(fd: int, index: int) -> int:
    """Serve runs from the socket ``fd`` until it closes; returns the exit status."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the CLI's Ctrl-C is the caller's to handle
    sock = socket.socket(fileno=fd)
    write_lock = gevent.lock.Semaphore()
    controls: dict = {}

    def send(message: dict) -> None:
        with write_lock:
            sock.sendall(_frame(message))

    try:
        init = _read_frame(sock)
        if init is None or init.get("op") != "init":
            return 2
        fanout = engine_mod.Engine(**init["engine"])
        send({"ready": os.getpid()})
    except (OSError, WorkerLost, engine_mod.EngineError, TypeError) as exc:
        wire.log_action("err", "dispatch-worker-init-fail", WORKER=index, ERROR=str(exc))
        return 2

    def run(message: dict) -> None:
        run_id = message["id"]
        control = controls[run_id] = engine_mod.RunControl()
        targets = [_Target(*fields) for fields in message["targets"]]
        on_event = (lambda event: send({"id": run_id, "event": event})) if message["stream"] else None
        try:
            rows = fanout.dispatch_all(
                targets, script=message["script"], args=message["args"], reqid=message["reqid"],
                username=message["username"], token=message["token"], timeout=message["timeout"],
                async_=message["async_"], on_event=on_event, control=control)
            send({"id": run_id, "rows": rows})
        except Exception as exc:  # noqa: BLE001 - reported to the caller as lost rows; logged
            wire.log_action("err", "dispatch-worker-error", WORKER=index, REQID=message["reqid"],
                            ERROR="%s: %s" % (type(exc).__name__, exc))
            try:
                send({"id": run_id, "error": "dispatch worker %d failed: %s" % (index, type(exc).__name__)})
            except OSError:
                pass
        finally:
            controls.pop(run_id, None)

    running = []
    try:
        while True:
            message = _read_frame(sock)
            if message is None:
                break
            if message.get("op") == "run":
                running.append(gevent.spawn(run, message))
                running = [g for g in running if not g.dead]
            elif message.get("op") == "cancel" and message.get("id") in controls:
                controls[message["id"]].cancel()
    except (OSError, WorkerLost) as exc:
        wire.log_action("err", "dispatch-worker-read-fail", WORKER=index, ERROR=str(exc))
    gevent.killall(running, block=True, timeout=STOP_GRACE_S)
    return 0


def main(argv: Optional[list] = None) -> int:
    """python workers.py --fd N --index I (started by SplitEngine, not by hand)."""
    parser = argparse.ArgumentParser(prog="workers.py", description=__doc__.split("\n")[0])
    parser.add_argument("--fd", type=int, required=True, help="the socket to the calling process")
    parser.add_argument("--index", type=int, default=0, help="this worker's number (for logs)")
    opts = parser.parse_args(argv)
    return serve(opts.fd, opts.index)


if __name__ == "__main__":
    sys.exit(main())
