"""Tests for store.py: the facade's rules (on files and on an in-memory backend), the
file backends' layout and modes, registry, run store, host+script locks, Store bundle.

The only tests that read agents/, runs/ or locks/ by path (every other test file goes
through the facade).
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time

import pytest

import config
import store
from fleet import wait_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Upper bound for any wait on a child process in these tests.
CHILD_TIMEOUT_S = 30


def record(**over):
    rec = {"hostname": "web-01.example.net", "ip": "127.0.0.2", "port": 7443,
           "lookup_by": "hostname", "paired": "2026-03-05T14:30:00Z",
           "expiry": "Jun  7 16:28:00 2028 GMT", "tags": {}, "dispatcher_serial": "2",
           "serial_status": "current"}
    rec.update(over)
    return rec


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def state(tmp_path):
    return str(tmp_path / "state")


@pytest.fixture
def children():
    """Child processes started by a test; killed and reaped at teardown."""
    procs = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=CHILD_TIMEOUT_S)


def spawn_holder(children, state_dir, names, script):
    """A child process holding locks until killed; returns once the locks are held."""
    code = ("import sys, time; sys.path.insert(0, %r); import store; "
            "h = store.Locks(%r).hold(%r, %r); print('held', flush=True); time.sleep(120)"
            % (REPO, state_dir, list(names), script))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    children.append(proc)
    locks = store.Locks(state_dir)
    wait_for(lambda: {"host": names[0], "script": script} in locks.held() or proc.poll() is not None,
             "child to take its locks")
    assert proc.poll() is None, "lock holder exited early"
    return proc


# --- names ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["web-01", "web-01.example.net", "a", "A_b.c-d", "1" * 253])
def test_valid_agent_names(name):
    assert store.valid_agent_name(name)


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "-x", "a/b", "../etc/passwd",
                                  "a b", "web:7443", "a\n", "1" * 254, "caf\u00e9", None, 5])
def test_invalid_agent_names(name):
    assert not store.valid_agent_name(name)


# --- registry ---------------------------------------------------------------------------------

def test_registry_put_get_roundtrip_and_file_layout(state):
    reg = store.Registry(state)
    reg.put("web-01", record(tags={"role": "web"}))
    assert reg.get("web-01") == record(tags={"role": "web"})
    path = os.path.join(state, "agents", "web-01.json")
    assert mode_of(path) == 0o644
    assert mode_of(os.path.join(state, "agents")) == 0o750
    assert sorted(os.listdir(os.path.join(state, "agents"))) == [".registry.lock", "web-01.json"]
    # Human-readable JSON that the stdlib parser (and the Perl tools) can read.
    import json
    with open(path) as fh:
        assert json.load(fh)["expiry"] == "Jun  7 16:28:00 2028 GMT"


def test_registry_reads_are_cached_but_see_every_change(state):
    reader, writer = store.Registry(state), store.Registry(state)
    writer.put("web-01", record(tags={"role": "web"}))
    assert reader.get("web-01")["tags"] == {"role": "web"}
    writer.put("web-01", record(tags={"role": "db"}))       # another process replaces it
    assert reader.get("web-01")["tags"] == {"role": "db"}
    path = os.path.join(state, "agents", "web-01.json")
    with open(path, "a") as fh:                              # an edit in place, by hand
        fh.write("\n")
    os.utime(path, ns=(1, 2))
    assert reader.get("web-01")["tags"] == {"role": "db"}
    writer.delete("web-01")
    assert reader.get("web-01") is None
    os.symlink("/etc/hostname", path)
    with pytest.raises(store.StoreError):
        reader.get("web-01")


def test_registry_get_absent_and_invalid_names(state):
    reg = store.Registry(state)
    assert reg.get("nope") is None
    assert reg.get("../../etc/passwd") is None
    assert reg.names() == [] and reg.list() == []


def test_registry_put_refuses_path_names(state, tmp_path):
    reg = store.Registry(state)
    for bad in ("../evil", ".", "..", "a/b", ""):
        with pytest.raises(store.StoreError, match="invalid agent name"):
            reg.put(bad, record())
    assert not (tmp_path / "evil.json").exists()


def test_registry_put_refuses_non_dict_and_non_json(state):
    reg = store.Registry(state)
    with pytest.raises(store.StoreError, match="must be a dict"):
        reg.put("web-01", ["x"])
    with pytest.raises(store.StoreError, match="not JSON-serialisable"):
        reg.put("web-01", {"x": object()})
    assert reg.get("web-01") is None


def test_registry_corrupt_record(state):
    reg = store.Registry(state)
    reg.put("web-01", record())
    reg.put("db-01", record(hostname="db-01"))
    with open(os.path.join(state, "agents", "web-01.json"), "w") as fh:
        fh.write("{not json")
    with pytest.raises(store.CorruptRecord, match="web-01"):
        reg.get("web-01")
    # list() skips and logs it; names() still sees the file.
    assert [r["name"] for r in reg.list()] == ["db-01"]
    assert reg.names() == ["db-01", "web-01"]
    with open(os.path.join(state, "agents", "web-01.json"), "w") as fh:
        fh.write("[1, 2]")
    with pytest.raises(store.CorruptRecord, match="expected a JSON object"):
        reg.get("web-01")


def test_registry_names_sorted_and_ignore_other_files(state):
    reg = store.Registry(state)
    for name in ("web-02", "db-01", "web-01"):
        reg.put(name, record(hostname=name))
    agents = os.path.join(state, "agents")
    for junk in (".tmp-abc", ".hidden.json", "notes.txt", "bad name.json"):
        open(os.path.join(agents, junk), "w").close()
    assert reg.names() == ["db-01", "web-01", "web-02"]


def test_registry_list_filters_on_all_tags(state):
    reg = store.Registry(state)
    reg.put("web-01", record(tags={"role": "web", "env": "prod"}))
    reg.put("web-02", record(tags={"role": "web", "env": "dev"}))
    reg.put("db-01", record(tags={"role": "db", "env": "prod"}))
    reg.put("bare", record(tags=None))
    names = lambda rows: [r["name"] for r in rows]  # noqa: E731
    assert names(reg.list()) == ["bare", "db-01", "web-01", "web-02"]
    assert names(reg.list({"role": "web"})) == ["web-01", "web-02"]
    assert names(reg.list({"role": "web", "env": "prod"})) == ["web-01"]
    assert names(reg.list({"role": "none"})) == []
    assert reg.list({"env": "prod"})[0]["tags"] == {"role": "db", "env": "prod"}


def test_registry_update_and_delete(state):
    reg = store.Registry(state)
    reg.put("web-01", record())
    new = reg.update("web-01", tags={"role": "web"}, serial_status="stale")
    assert new["tags"] == {"role": "web"} and new["hostname"] == "web-01.example.net"
    assert reg.get("web-01") == new
    assert reg.delete("web-01") is True
    assert reg.delete("web-01") is False
    assert reg.delete("../x") is False
    with pytest.raises(store.StoreError, match="not registered"):
        reg.update("web-01", tags={})
    assert reg.get("web-01") is None


def test_registry_updates_from_several_processes_are_never_lost(state, children):
    # Each writer sets its own field 30 times; without the registry flock a
    # read-modify-write race would drop other writers' fields.
    reg = store.Registry(state)
    reg.put("web-01", record())
    code = ("import sys; sys.path.insert(0, %r); import store\n"
            "reg = store.Registry(%r)\n"
            "for i in range(30):\n"
            "    reg.update('web-01', **{sys.argv[1]: i})\n" % (REPO, state))
    for k in range(3):
        children.append(subprocess.Popen([sys.executable, "-c", code, "f%d" % k]))
    for i in range(30):
        reg.update("web-01", main=i)
    for proc in children:
        assert proc.wait(timeout=CHILD_TIMEOUT_S) == 0
    final = reg.get("web-01")
    assert (final["f0"], final["f1"], final["f2"], final["main"]) == (29, 29, 29, 29)
    assert final["hostname"] == "web-01.example.net"


def test_registry_lock_times_out_instead_of_hanging(state, monkeypatch):
    reg = store.Registry(state)
    reg.put("web-01", record())
    monkeypatch.setattr(store, "STATE_LOCK_TIMEOUT_S", 0.2)
    with reg.backend._locked():
        with pytest.raises(store.StoreError, match="registry is busy"):
            reg.update("web-01", tags={})


# --- resolve ---------------------------------------------------------------------------------

def test_resolve_registered_unknown_and_port_override(state):
    reg = store.Registry(state)
    reg.put("web-01", record(hostname="web-01.example.net", ip="127.0.0.2", port=7450))
    reg.put("nat-01", record(hostname="nat-01.example.net", ip="127.0.0.3",
                             lookup_by="ip", port=7443))
    reg.put("ipless", record(hostname="ipless.example.net", ip="", lookup_by="ip"))
    reg.put("badport", record(hostname="bp", port=70000))
    got = reg.resolve(["web-01", "web-01:7460", "nat-01", "ghost", "ghost:7443",
                       "ipless", "badport", "web-01:0", "web-01:abc", "web-01:", "a:b:c",
                       "../etc:7443"])
    T = store.Target
    assert got == [
        T("web-01", "web-01", "web-01.example.net", 7450),
        T("web-01:7460", "web-01", "web-01.example.net", 7460),
        T("nat-01", "nat-01", "127.0.0.3", 7443),
        T("ghost", "ghost", None, None),
        T("ghost:7443", "ghost", None, None),
        T("ipless", "ipless", "ipless.example.net", 7443),
        T("badport", "badport", "bp", 7443),
        T("web-01:0", "web-01:0", None, None),
        T("web-01:abc", "web-01:abc", None, None),
        T("web-01:", "web-01:", None, None),
        T("a:b:c", "a:b:c", None, None),
        T("../etc:7443", "../etc", None, None),
    ]


def test_resolve_corrupt_record_is_never_dialled(state):
    reg = store.Registry(state)
    reg.put("web-01", record())
    with open(os.path.join(state, "agents", "web-01.json"), "w") as fh:
        fh.write("garbage")
    assert reg.resolve(["web-01"]) == [store.Target("web-01", "web-01", None, None)]


def test_resolve_falls_back_to_name_without_hostname(state):
    reg = store.Registry(state)
    reg.put("web-01", {"port": 7443})
    assert reg.resolve(["web-01"]) == [store.Target("web-01", "web-01", "web-01", 7443)]


# --- run store -------------------------------------------------------------------------------

def test_run_store_roundtrip_modes_and_restart(state):
    runs = store.RunStore(state)
    rec = {"reqid": "0123456789abcdef", "script": "backup", "mode": "sync",
           "hosts": ["web-01"], "results": [{"host": "web-01", "exit": 0, "stdout": "caf\u00e9/ok"}],
           "completed": 1737123456, "complete": True}
    runs.save(rec)
    path = os.path.join(state, "runs", "0123456789abcdef.json")
    assert mode_of(path) == 0o640
    assert mode_of(os.path.join(state, "runs")) == 0o750
    assert runs.load("0123456789abcdef") == rec
    # A new process (fresh objects, fresh interpreter) reads the same record.
    code = ("import sys; sys.path.insert(0, %r); import store; "
            "print(store.RunStore(%r).load('0123456789abcdef')['results'][0]['stdout'])"
            % (REPO, state))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=CHILD_TIMEOUT_S)
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().strip() == "caf\u00e9/ok"
    assert sorted(os.listdir(os.path.join(state, "runs"))) == [".update.lock",
                                                               "0123456789abcdef.json"]
    assert mode_of(os.path.join(state, "runs", ".update.lock")) == 0o660


def test_run_store_overwrite_is_atomic_replacement(state):
    runs = store.RunStore(state)
    runs.save({"reqid": "abc", "complete": False})
    runs.save({"reqid": "abc", "complete": True})
    assert runs.load("abc") == {"reqid": "abc", "complete": True}
    assert sorted(os.listdir(os.path.join(state, "runs"))) == [".update.lock", "abc.json"]


@pytest.mark.parametrize("reqid", ["../x", "a/b", "", "a" * 65, "a.b", "x\n", None, 12, "caf\u00e9"])
def test_run_store_refuses_bad_reqids(state, reqid):
    runs = store.RunStore(state)
    with pytest.raises(store.StoreError, match="invalid reqid"):
        runs.save({"reqid": reqid})
    with pytest.raises(store.StoreError, match="invalid reqid"):
        runs.load(reqid)


def test_run_store_missing_reqid_and_non_dict(state):
    runs = store.RunStore(state)
    with pytest.raises(store.StoreError, match="invalid reqid"):
        runs.save({"script": "x"})
    with pytest.raises(store.StoreError, match="must be a dict"):
        runs.save("nope")


def test_run_store_absent_is_none(state):
    assert store.RunStore(state).load("feedfacefeedface") is None


def test_run_store_never_writes_secrets(state):
    runs = store.RunStore(state)
    runs.save({"reqid": "r1", "token": "s3cret", "submitter": {"username": "alice",
               "Token": "s3cret", "authorization": "Bearer s3cret"},
               "results": [{"host": "a", "password": "s3cret", "stdout": "fine"}]})
    with open(os.path.join(state, "runs", "r1.json"), "rb") as fh:
        assert b"s3cret" not in fh.read()
    assert runs.load("r1") == {"reqid": "r1", "submitter": {"username": "alice"},
                               "results": [{"host": "a", "stdout": "fine"}]}


def test_run_store_corrupt_record(state):
    runs = store.RunStore(state)
    runs.save({"reqid": "r1"})
    path = os.path.join(state, "runs", "r1.json")
    with open(path, "w") as fh:
        fh.write('{"reqid": "r1", "trunc')
    with pytest.raises(store.CorruptRecord) as info:
        runs.load("r1")
    assert info.value.path == path == runs.backend.where("r1")
    with open(path, "w") as fh:
        fh.write('"a string"')
    with pytest.raises(store.CorruptRecord, match="expected a JSON object"):
        runs.load("r1")


def test_run_store_symlink_is_not_followed(state, tmp_path):
    runs = store.RunStore(state)
    runs.save({"reqid": "r1"})
    secret = tmp_path / "secret.json"
    secret.write_text('{"stolen": true}')
    link = os.path.join(state, "runs", "r2.json")
    os.symlink(str(secret), link)
    with pytest.raises(store.StoreError):
        runs.load("r2")


def test_run_store_expiry_and_purge(state):
    runs = store.RunStore(state, retention_s=3600)
    for reqid in ("old1", "old2", "fresh"):
        runs.save({"reqid": reqid})
    rundir = os.path.join(state, "runs")
    past = time.time() - 7200
    for name in ("old1.json", "old2.json"):
        os.utime(os.path.join(rundir, name), (past, past))
    stale_tmp = os.path.join(rundir, ".tmp-dead")
    open(stale_tmp, "w").close()
    os.utime(stale_tmp, (past, past))
    open(os.path.join(rundir, "README"), "w").close()
    os.utime(os.path.join(rundir, "README"), (past, past))
    assert runs.load("old1") is None            # expired reads as absent
    assert runs.load("fresh") == {"reqid": "fresh"}
    assert runs.purge() == 2
    assert sorted(os.listdir(rundir)) == [".update.lock", "README", "fresh.json"]
    assert runs.purge() == 0


def test_run_store_purge_without_dir(state):
    assert store.RunStore(state).purge() == 0


def test_stored_run_file_is_0640_plain_json_without_secrets(state):
    # The file-level half of the API / CLI / stream checks "stored without the token".
    runs = store.RunStore(state)
    rec = store.sync_record(reqid="feedfacefeedface", script="hello", hosts=["web-01"],
                            results=[{"host": "web-01", "exit": 0, "stdout": "hi\n"}],
                            submitter={"username": "alice", "source_ip": "127.0.0.1",
                                       "token": "tok-1"})
    runs.save(rec)
    path = runs.backend.where("feedfacefeedface")
    assert path == os.path.join(state, "runs", "feedfacefeedface.json")
    assert mode_of(path) == 0o640
    with open(path, "rb") as fh:
        raw = fh.read()
    assert b"tok-1" not in raw
    import json
    assert json.loads(raw) == runs.load("feedfacefeedface")
    assert runs.load("feedfacefeedface")["submitter"] == {"username": "alice",
                                                          "source_ip": "127.0.0.1"}


# --- run store: update ------------------------------------------------------------------------

def test_run_update_replaces_the_record_and_returns_it(state):
    runs = store.RunStore(state)
    runs.save({"reqid": "r1", "n": 1, "results": []})
    new = runs.update("r1", lambda rec: dict(rec, n=rec["n"] + 1, token="s3cret",
                                             results=[{"host": "a", "password": "x"}]))
    assert new == {"reqid": "r1", "n": 2, "results": [{"host": "a"}]}
    assert runs.load("r1") == new
    path = runs.backend.where("r1")
    assert mode_of(path) == 0o640
    with open(path, "rb") as fh:
        assert b"s3cret" not in fh.read()


def test_run_update_of_absent_or_expired_record_is_none_and_fn_not_called(state):
    runs = store.RunStore(state, retention_s=3600)
    called = []
    fn = lambda rec: called.append(rec) or rec  # noqa: E731
    assert runs.update("nope", fn) is None
    runs.save({"reqid": "old"})
    past = time.time() - 7200
    os.utime(runs.backend.where("old"), (past, past))
    assert runs.update("old", fn) is None
    assert called == []
    # Not resurrected: still expired (mtime untouched), and purged as such.
    assert os.stat(runs.backend.where("old")).st_mtime == pytest.approx(past)
    assert runs.load("old") is None and runs.purge() == 1


@pytest.mark.parametrize("result, match", [(None, "returned NoneType, not a dict"),
                                           (["x"], "returned list"),
                                           ({"reqid": "r2"}, "returned reqid 'r2'"),
                                           ({"x": 1}, "returned reqid None"),
                                           ({"reqid": "r1", "x": object()}, "not JSON")])
def test_run_update_refuses_bad_results_and_keeps_the_record(state, result, match):
    runs = store.RunStore(state)
    runs.save({"reqid": "r1", "n": 1})
    with pytest.raises(store.StoreError, match=match):
        runs.update("r1", lambda rec: result)
    assert runs.load("r1") == {"reqid": "r1", "n": 1}
    assert runs.load("r2") is None


def test_run_update_of_corrupt_record_raises_and_fn_not_called(state):
    runs = store.RunStore(state)
    runs.save({"reqid": "r1"})
    with open(runs.backend.where("r1"), "w") as fh:
        fh.write("{trunc")
    called = []
    with pytest.raises(store.CorruptRecord):
        runs.update("r1", lambda rec: called.append(rec) or rec)
    assert called == []


@pytest.mark.parametrize("reqid", ["../x", "", None, "a" * 65])
def test_run_update_refuses_bad_reqids(state, reqid):
    with pytest.raises(store.StoreError, match="invalid reqid"):
        store.RunStore(state).update(reqid, lambda rec: rec)
    assert not os.path.exists(os.path.join(state, "runs"))


def test_run_updates_from_several_processes_are_never_lost(state, children):
    runs = store.RunStore(state)
    runs.save({"reqid": "r1", "seen": []})
    code = ("import sys; sys.path.insert(0, %r); import store\n"
            "runs = store.RunStore(%r)\n"
            "for i in range(30):\n"
            "    runs.update('r1', lambda r: dict(r, seen=r['seen'] + [sys.argv[1]]))\n"
            % (REPO, state))
    for k in range(3):
        children.append(subprocess.Popen([sys.executable, "-c", code, "p%d" % k]))
    for _ in range(30):
        runs.update("r1", lambda r: dict(r, seen=r["seen"] + ["main"]))
    for proc in children:
        assert proc.wait(timeout=CHILD_TIMEOUT_S) == 0
    seen = runs.load("r1")["seen"]
    assert sorted(set(seen)) == ["main", "p0", "p1", "p2"]
    assert all(seen.count(tag) == 30 for tag in ("main", "p0", "p1", "p2"))


def test_run_updates_from_greenlets_are_never_lost(state):
    import gevent
    runs = store.RunStore(state)
    runs.save({"reqid": "r1", "n": 0})

    def bump(rec):
        gevent.sleep(0.001)         # yield mid-update: another greenlet runs meanwhile
        return dict(rec, n=rec["n"] + 1)

    jobs = [gevent.spawn(runs.update, "r1", bump) for _ in range(20)]
    gevent.joinall(jobs, timeout=CHILD_TIMEOUT_S, raise_error=True)
    assert runs.load("r1")["n"] == 20


def test_run_update_waiting_for_the_lock_keeps_the_hub_running(state, monkeypatch):
    import gevent
    runs = store.RunStore(state)
    runs.save({"reqid": "r1", "n": 0})
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(1000)])
    try:
        with runs.backend._locked():
            waiter = gevent.spawn(runs.update, "r1", lambda rec: dict(rec, n=1))
            gevent.sleep(0.3)
            assert not waiter.ready()
            assert len(ticks) >= 10         # the hub kept running while update waited
        assert waiter.get(timeout=CHILD_TIMEOUT_S) == {"reqid": "r1", "n": 1}
        monkeypatch.setattr(store, "STATE_LOCK_TIMEOUT_S", 0.2)
        with runs.backend._locked():
            with pytest.raises(store.StoreError, match="run store is busy"):
                runs.update("r1", lambda rec: rec)
            with pytest.raises(store.StoreError, match="run store is busy"):
                runs.save({"reqid": "r1"})
    finally:
        ticker.kill()
    assert runs.load("r1") == {"reqid": "r1", "n": 1}


# --- locks -----------------------------------------------------------------------------------

def test_lock_files_and_modes(state):
    locks = store.Locks(state)
    with locks.hold(["web-01", "db:7450", "../x"], "backup") as held:
        assert held.names == ["web-01", "db:7450", "../x"]
        files = sorted(os.listdir(os.path.join(state, "locks")))
        assert files == [".._x--backup.lock", "db_7450--backup.lock", "web-01--backup.lock"]
        for fname in files:
            assert mode_of(os.path.join(state, "locks", fname)) == 0o660
        assert mode_of(os.path.join(state, "locks")) == 0o770
        assert locks.held() == [{"host": ".._x", "script": "backup"},
                                {"host": "db_7450", "script": "backup"},
                                {"host": "web-01", "script": "backup"}]
    assert locks.held() == []


def test_overlapping_holds_in_one_process_conflict(state):
    locks = store.Locks(state)
    with locks.hold(["web-01", "db-01"], "backup"):
        with pytest.raises(store.LockConflict) as info:
            locks.hold(["app-01", "db-01", "web-01", "cache-01"], "backup")
        assert info.value.conflicts == ["db-01", "web-01"]
        assert "db-01, web-01" in str(info.value)
        # All or nothing: the free ones were not kept.
        assert {"host": "app-01", "script": "backup"} not in locks.held()
        assert {"host": "cache-01", "script": "backup"} not in locks.held()
        with locks.hold(["app-01", "cache-01"], "backup"):
            pass
    with locks.hold(["app-01", "db-01", "web-01", "cache-01"], "backup"):
        pass


def test_disjoint_hosts_and_other_scripts_proceed(state):
    locks = store.Locks(state)
    with locks.hold(["web-01"], "backup"):
        with locks.hold(["web-02"], "backup"), locks.hold(["web-01"], "restart"):
            assert len(locks.held()) == 3


def test_released_on_exception(state):
    locks = store.Locks(state)
    with pytest.raises(RuntimeError):
        with locks.hold(["web-01"], "backup"):
            raise RuntimeError("boom")
    assert locks.held() == []
    with locks.hold(["web-01"], "backup"):
        pass


def test_duplicate_names_do_not_conflict_with_themselves(state):
    locks = store.Locks(state)
    with locks.hold(["web-01", "web-01", "db-01"], "backup") as held:
        assert held.names == ["web-01", "db-01"]


def test_release_is_idempotent(state):
    locks = store.Locks(state)
    held = locks.hold(["web-01"], "backup")
    held.release()
    held.release()
    with locks.hold(["web-01"], "backup"):
        pass


def test_bad_lock_arguments(state):
    locks = store.Locks(state)
    for names, script in ((["web-01"], ""), ("web-01", "backup"), ([""], "backup"),
                          ([None], "backup")):
        with pytest.raises(store.StoreError):
            locks.hold(names, script)


def test_long_names_fit_the_filesystem(state):
    locks = store.Locks(state)
    long_name = "h" * 253
    with locks.hold([long_name, "h" * 252 + "i"], "s" * 128):
        assert len(locks.held()) == 2
        with pytest.raises(store.LockConflict):
            locks.hold([long_name], "s" * 128)


def test_lock_held_by_other_process_conflicts_and_dies_with_it(state, children):
    proc = spawn_holder(children, state, ["web-01", "db-01"], "backup")
    locks = store.Locks(state)
    with pytest.raises(store.LockConflict) as info:
        locks.hold(["db-01", "app-01", "web-01"], "backup")
    assert info.value.conflicts == ["db-01", "web-01"]
    with locks.hold(["app-01"], "backup"), locks.hold(["web-01"], "deploy"):
        pass
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=CHILD_TIMEOUT_S)
    # The kernel released the flocks; no stale lock files need cleaning.
    assert locks.held() == []
    with locks.hold(["db-01", "app-01", "web-01"], "backup"):
        pass


def test_children_spawned_while_holding_do_not_keep_locks(state, children):
    locks = store.Locks(state)
    held = locks.hold(["web-01"], "backup")
    children.append(subprocess.Popen(["sleep", "60"], close_fds=False))
    held.release()
    with locks.hold(["web-01"], "backup"):
        pass


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "..", ".", "web-01/../x",
                                  "web-01\x00", "web-01:../../x", "a" * 300, "\u202eweb-01",
                                  "web 01", "web-01\nX-Injected: 1", "%2e%2e%2f"])
def test_hostile_lock_names_stay_inside_locks_dir(state, tmp_path, name):
    # The file-level half of the hostile-hosts API test: whatever name reaches the lock
    # layer, its file is one plain, safely named entry of locks/ and nothing else is made.
    locks = store.Locks(state)
    with locks.hold([name], "canary"):
        files = os.listdir(os.path.join(state, "locks"))
        assert len(files) == 1 and "--canary" in files[0], files
        assert re.fullmatch(r"[A-Za-z0-9_.~-]+\.lock", files[0]), files
        assert len(files[0].encode()) <= store.MAX_FILENAME_BYTES
    assert sorted(os.listdir(state)) == ["locks"]
    assert sorted(os.listdir(tmp_path)) == ["state"]


# --- Store bundle ----------------------------------------------------------------------------

def test_open_store_creates_directories(tmp_path):
    cfg = config.Config(state_dir=str(tmp_path / "var" / "ctrl-exec"), run_retention=123,
                        dispatcher_id="d1")
    st = store.open_store(cfg)
    assert isinstance(st, store.Store)
    assert st.runs.retention_s == 123
    base = cfg.state_dir
    assert mode_of(base) == 0o750
    assert mode_of(os.path.join(base, "agents")) == 0o750
    assert mode_of(os.path.join(base, "runs")) == 0o750
    assert mode_of(os.path.join(base, "locks")) == 0o770
    st.registry.put("web-01", record())
    st.runs.save({"reqid": "r1"})
    with st.locks.hold(["web-01"], "backup"):
        assert st.locks.held() == [{"host": "web-01", "script": "backup"}]
    assert st.registry.names() == ["web-01"] and st.runs.load("r1") == {"reqid": "r1"}


def test_open_store_keeps_existing_directory_modes(tmp_path):
    base = tmp_path / "state"
    (base / "runs").mkdir(parents=True)
    os.chmod(base / "runs", 0o2770)
    store.open_store(config.Config(state_dir=str(base), dispatcher_id="d1"))
    assert mode_of(base / "runs") == 0o2770


def test_open_store_refuses_a_file_as_state_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(store.StoreError, match="state_dir .* is unusable: .* exists and is not a "
                                               "directory; set state_dir"):
        store.open_store(config.Config(state_dir=str(blocker / "state"), dispatcher_id="d1"))


def test_store_constructor_does_no_io(tmp_path):
    cfg = config.Config(state_dir=str(tmp_path / "nothing"), dispatcher_id="d1")
    st = store.Store(cfg)
    assert not os.path.exists(cfg.state_dir)
    assert st.registry.names() == [] and st.runs.load("r1") is None and st.locks.held() == []
    assert st.registry.resolve(["web-01"]) == [store.Target("web-01", "web-01", None, None)]


def test_holding_no_names_is_a_no_op(state):
    # The API holds only registered names; a request of unknown hosts holds nothing.
    with store.Locks(state).hold([], "backup") as held:
        assert held.names == []


def test_open_store_selects_the_file_backends(tmp_path):
    cfg = config.Config(state_dir=str(tmp_path / "state"), dispatcher_id="d1")
    st = store.open_store(cfg)
    assert isinstance(st.registry.backend, store.FileRegistryBackend)
    assert isinstance(st.runs.backend, store.FileRunBackend)
    assert isinstance(st.locks.backend, store.FileLockBackend)
    with st.locks.hold(["web-01"], "backup") as held:
        assert held.fencing is None and [lease.fencing for lease in held.leases] == [None]


# --- the facade's rules on another backend ----------------------------------------------------

class MemoryRecords:
    """RegistryBackend and RunBackend in a dict; records calls, no rules of its own."""

    def __init__(self):
        self.data = {}          # key -> Stored
        self.calls = []

    def prepare(self):
        self.calls.append(("prepare",))

    def where(self, key):
        return "mem:" + key

    def get(self, key):
        self.calls.append(("get", key))
        return self.data.get(key)

    def names(self):
        return list(self.data)

    def put(self, key, data, ttl_s=None):
        self.calls.append(("put", key, data, ttl_s))
        self.data[key] = store.Stored(data, 0.0)

    def update(self, key, fn, ttl_s=None):
        self.calls.append(("update", key, ttl_s))
        data = fn(self.data.get(key))
        if data is not None:
            self.data[key] = store.Stored(data, 0.0)

    def delete(self, key):
        return self.data.pop(key, None) is not None

    def purge(self, max_age_s):
        old = [k for k, v in self.data.items() if v.age_s > max_age_s]
        for key in old:
            del self.data[key]
        return len(old)


class MemoryLocks:
    """LockBackend in a dict, issuing fencing numbers like a lease backend would."""

    def __init__(self):
        self.holders = {}
        self.counter = 0
        self.released = []

    def prepare(self):
        pass

    def key_of(self, name, script):
        return "%s|%s" % (name.lower(), script)

    def acquire(self, name, script):
        key = self.key_of(name, script)
        if key in self.holders:
            return None
        self.counter += 1
        self.holders[key] = (name, script)
        return store.Lease(key, name, script, "owner-%d" % self.counter, self.counter)

    def release(self, lease):
        if self.holders.pop(lease.key, None) is not None:
            self.released.append(lease.key)

    def held(self):
        return [{"host": n, "script": s} for n, s in self.holders.values()]


def test_facade_run_rules_hold_on_any_backend():
    mem = MemoryRecords()
    runs = store.RunStore(mem, retention_s=60)
    runs.save({"reqid": "r1", "token": "s3cret", "results": [{"Password": "s3cret", "x": 1}]})
    _, key, data, ttl_s = mem.calls[-1]
    assert (key, ttl_s) == ("r1", 60) and b"s3cret" not in data      # scrubbed before storing
    assert runs.load("r1") == {"reqid": "r1", "results": [{"x": 1}]}
    for bad in ("../x", "", None):
        with pytest.raises(store.StoreError, match="invalid reqid"):
            runs.load(bad)
        with pytest.raises(store.StoreError, match="invalid reqid"):
            runs.update(bad, lambda rec: rec)
    assert [c[1] for c in mem.calls if c[0] in ("get", "update")] == ["r1"]   # never reached
    # Retention is the facade's: a record the backend still holds is absent once too old.
    mem.data["r1"] = mem.data["r1"]._replace(age_s=61)
    assert runs.load("r1") is None
    assert runs.update("r1", lambda rec: pytest.fail("fn called on an expired record")) is None
    mem.data["r2"] = store.Stored(b"[1]", 0.0)
    with pytest.raises(store.CorruptRecord) as info:
        runs.load("r2")
    assert info.value.path == "mem:r2"
    assert runs.purge() == 1 and list(mem.data) == ["r2"]


def test_facade_registry_rules_hold_on_any_backend():
    mem = MemoryRecords()
    reg = store.Registry(mem)
    reg.put("web-01", record(tags={"role": "web"}))
    reg.put("db-01", record(hostname="db-01", tags={"role": "db"}))
    mem.data["../evil"] = mem.data["web-01"]               # a backend holding a bad name
    mem.data["broken"] = store.Stored(b"garbage", 0.0)
    assert reg.names() == ["broken", "db-01", "web-01"]
    assert reg.get("../evil") is None
    assert [r["name"] for r in reg.list({"role": "web"})] == ["web-01"]
    assert reg.resolve(["web-01", "broken", "../evil", "ghost"]) == [
        store.Target("web-01", "web-01", "web-01.example.net", 7443),
        store.Target("broken", "broken", None, None),
        store.Target("../evil", "../evil", None, None),
        store.Target("ghost", "ghost", None, None)]
    assert reg.update("web-01", serial_status="stale")["serial_status"] == "stale"
    with pytest.raises(store.StoreError, match="not registered"):
        reg.update("ghost", tags={})
    with pytest.raises(store.StoreError, match="invalid agent name"):
        reg.put("../evil", record())
    assert "ghost" not in mem.data and reg.delete("../evil") is False


def test_facade_locks_are_all_or_nothing_on_any_backend():
    mem = MemoryLocks()
    locks = store.Locks(mem)
    with locks.hold(["web-01", "WEB-01", "db-01"], "backup") as held:
        assert held.names == ["web-01", "db-01"]             # one key, one lock
        assert held.fencing == 2 and [lease.fencing for lease in held.leases] == [1, 2]
        with pytest.raises(store.LockConflict) as info:
            locks.hold(["app-01", "db-01"], "backup")
        assert info.value.conflicts == ["db-01"]
        assert {"host": "app-01", "script": "backup"} not in locks.held()
        assert locks.held() == [{"host": "db-01", "script": "backup"},
                                {"host": "web-01", "script": "backup"}]
    assert locks.held() == []
    assert mem.released == ["app-01|backup", "db-01|backup", "web-01|backup"]
