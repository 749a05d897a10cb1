"""Tests for store.py: registry, run store, host+script locks, Store bundle."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

import config
import store

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


def wait_until(predicate, what, timeout_s=CHILD_TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for " + what)
        time.sleep(0.02)


def spawn_holder(children, state_dir, names, script):
    """A child process holding locks until killed; returns once the locks are held."""
    code = ("import sys, time; sys.path.insert(0, %r); import store; "
            "h = store.Locks(%r).hold(%r, %r); print('held', flush=True); time.sleep(120)"
            % (REPO, state_dir, list(names), script))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    children.append(proc)
    locks = store.Locks(state_dir)
    wait_until(lambda: {"host": names[0], "script": script} in locks.held() or proc.poll() is not None,
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
    monkeypatch.setattr(store, "REGISTRY_LOCK_TIMEOUT_S", 0.2)
    with reg._locked():
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
    assert sorted(os.listdir(os.path.join(state, "runs"))) == ["0123456789abcdef.json"]


def test_run_store_overwrite_is_atomic_replacement(state):
    runs = store.RunStore(state)
    runs.save({"reqid": "abc", "complete": False})
    runs.save({"reqid": "abc", "complete": True})
    assert runs.load("abc") == {"reqid": "abc", "complete": True}
    assert os.listdir(os.path.join(state, "runs")) == ["abc.json"]


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
    assert info.value.path == path
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
    assert sorted(os.listdir(rundir)) == ["README", "fresh.json"]
    assert runs.purge() == 0


def test_run_store_purge_without_dir(state):
    assert store.RunStore(state).purge() == 0


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
