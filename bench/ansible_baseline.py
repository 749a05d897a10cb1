"""Baseline: the same N-host job through Ansible ad-hoc over SSH, next to ctrl-exec.

Owns: a throwaway OpenSSH server on 127.0.0.1 (its own config, host key and
authorized key in a temp folder, ``sshd -f CONF -D`` as a subprocess, stopped
after), an inventory of N host aliases that all point at it, and timing
``ansible all -m command -a SCRIPT -f N`` (and ``-m raw``) against the same
bench script that ctrl-exec runs on its N agents, in the same run, with the
same parallelism (Ansible ``-f`` = ctrl-exec ``max_parallel``).

Fairness: every alias opens its own SSH connection (ControlMaster off, so no
alias shares another's multiplexed session) with pipelining on (one SSH
connection per host, Ansible's fastest mode for ``command``).  Ansible and its
SSH client run on the same 2 cores as sshd, as ctrl-exec runs beside its agents.

Never does: listen on anything but 127.0.0.1, touch the system's sshd config,
or change product modules.  Needs ``pip install ansible-core`` in a venv
(default /tmp/bench-ansible-venv) and Debian's openssh-server.

Usage:
    python bench/ansible_baseline.py --hosts 10,100 [--repeat 3] [--json]
"""

from __future__ import annotations

__all__ = ["SshServer", "run_ansible", "compare_point", "main", "DEFAULT_ANSIBLE",
           "SSHD", "ANSIBLE_TIMEOUT_S"]

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import common  # puts the repository root on sys.path
import fanout
import fleet as fleet_mod
from common import BenchError

DEFAULT_ANSIBLE = "/tmp/bench-ansible-venv/bin/ansible"
SSHD = "/usr/sbin/sshd"
#: One ansible ad-hoc run (100 hosts over SSH take tens of seconds here).
ANSIBLE_TIMEOUT_S = 600.0
SSHD_START_TIMEOUT_S = 15.0


class SshServer:
    """sshd on 127.0.0.1:<free port> with a throwaway host key and root's authorized key."""

    def __init__(self, folder: str) -> None:
        self.dir = folder
        self.port = common.free_port("127.0.0.1")
        self.client_key = os.path.join(folder, "client_key")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "SshServer":
        """Write keys and config, start ``sshd -D``, wait until it accepts.

        Raises:
            BenchError: sshd is missing, exits, or does not listen in time.
        """
        if not os.path.exists(SSHD):
            raise BenchError("%s not found (apt-get install openssh-server)" % SSHD)
        host_key = os.path.join(self.dir, "host_key")
        for key in (host_key, self.client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True,
                           timeout=30)
        authorized = os.path.join(self.dir, "authorized_keys")
        shutil.copyfile(self.client_key + ".pub", authorized)
        conf = os.path.join(self.dir, "sshd_config")
        with open(conf, "w") as handle:
            handle.write("\n".join([
                "Port %d" % self.port,
                "ListenAddress 127.0.0.1",          # loopback only, never 0.0.0.0
                "HostKey %s" % host_key,
                "PidFile %s" % os.path.join(self.dir, "sshd.pid"),
                "AuthorizedKeysFile %s" % authorized,
                "PermitRootLogin prohibit-password",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",                    # the key lives under /tmp
                "MaxStartups 1000",                  # -f 100 opens 100 at once
                "MaxSessions 100",
                "LogLevel ERROR",
                ""]))
        # Privilege separation needs this folder; Debian creates it at boot of the service only.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        log = open(os.path.join(self.dir, "sshd.log"), "ab")
        self.proc = subprocess.Popen([SSHD, "-f", conf, "-D", "-e"], stdout=log, stderr=log)
        log.close()
        try:
            common.wait_ready(self.proc, self._listening,
                              "sshd on 127.0.0.1:%d (log %s/sshd.log)" % (self.port, self.dir),
                              SSHD_START_TIMEOUT_S)
        except BenchError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        common.stop_process(self.proc, 10)
        self.proc = None

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False


def run_ansible(ansible: str, ssh: SshServer, script: str, hosts: int, forks: int,
                module: str = "command") -> dict:
    """Time ``ansible all -m MODULE -a SCRIPT -f forks`` over ``hosts`` aliases.

    Returns:
        {"path": "ansible-<module>", "hosts", "ok_hosts", "wall_s", "forks", "cpu_s"}
        (cpu_s: Ansible + ssh client + sshd side, from the children's rusage).
    """
    inventory = os.path.join(ssh.dir, "inventory-%d.ini" % hosts)
    with open(inventory, "w") as handle:
        handle.write("[bench]\n")
        handle.write("".join("h%04d ansible_host=127.0.0.1\n" % i for i in range(hosts)))
        handle.write("\n[bench:vars]\nansible_port=%d\nansible_user=root\n"
                     "ansible_ssh_private_key_file=%s\nansible_python_interpreter=/usr/bin/python3\n"
                     % (ssh.port, ssh.client_key))
    env = dict(os.environ,
               ANSIBLE_HOST_KEY_CHECKING="False", ANSIBLE_PIPELINING="True",
               ANSIBLE_SSH_ARGS="-o ControlMaster=no -o ControlPath=none "
                                "-o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no",
               ANSIBLE_LOCAL_TEMP=os.path.join(ssh.dir, "ansible-local"),
               ANSIBLE_REMOTE_TEMP=os.path.join(ssh.dir, "ansible-remote"),
               ANSIBLE_NOCOLOR="1", ANSIBLE_RETRY_FILES_ENABLED="False",
               ANSIBLE_DEPRECATION_WARNINGS="False", ANSIBLE_CONFIG=_empty_cfg(ssh.dir))
    before = os.times()
    started = time.perf_counter()
    out = subprocess.run([ansible, "all", "-i", inventory, "-m", module, "-a", script,
                          "-f", str(forks), "-o"], capture_output=True, text=True, env=env,
                         timeout=ANSIBLE_TIMEOUT_S)
    wall = time.perf_counter() - started
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system
                                                          - before.children_system)
    ok = sum(1 for line in out.stdout.splitlines()
             if ("CHANGED" in line or "SUCCESS" in line) and "rc=0" in line and "ok" in line)
    row = {"path": "ansible-%s" % module, "hosts": hosts, "ok_hosts": ok, "wall_s": round(wall, 3),
           "forks": forks, "cpu_s": round(cpu, 3)}
    if ok != hosts:
        row["errors"] = [line for line in (out.stdout + out.stderr).splitlines()
                         if "FAILED" in line or "UNREACHABLE" in line or "ERROR" in line][:3]
    return row


def compare_point(fleet, ssh: SshServer, ansible: str, hosts: int, repeat: int) -> dict:
    """ctrl-exec (API, sync /run) and Ansible on the same N, medians of ``repeat`` runs.

    Returns:
        {"hosts", "parallelism", "ctrlexec": {cold, warm}, "ansible_command": {...},
         "ansible_raw": {...}, "ratio_cold": ansible_command wall / ctrl-exec cold wall,
         "ratio_warm", "ratio_raw_cold"}
    """
    point = fanout.measure_point(fleet, hosts, repeat=repeat, max_parallel=hosts, engine=False)
    command = [run_ansible(ansible, ssh, fleet.script_path, hosts, hosts, "command")
               for _ in range(repeat)]
    raw = [run_ansible(ansible, ssh, fleet.script_path, hosts, hosts, "raw")
           for _ in range(repeat)]
    ansible_cmd, ansible_raw = _median(command), _median(raw)
    cold, warm = point["wall_s"], point["warm"]["wall_s"]
    return {"hosts": hosts, "parallelism": hosts,
            "ctrlexec": {"cold": {k: point[k] for k in ("ok_hosts", "wall_s", "per_host_cpu_ms")},
                         "warm": {k: point["warm"][k] for k in ("ok_hosts", "wall_s",
                                                                 "per_host_cpu_ms")}},
            "ansible_command": ansible_cmd, "ansible_raw": ansible_raw,
            "ratio_cold": round(ansible_cmd["wall_s"] / cold, 1) if cold else None,
            "ratio_warm": round(ansible_cmd["wall_s"] / warm, 1) if warm else None,
            "ratio_raw_cold": round(ansible_raw["wall_s"] / cold, 1) if cold else None,
            "runs": command + raw}


# --- private ---


def _empty_cfg(folder: str) -> str:
    """An empty ansible.cfg, so no user or system config changes the baseline."""
    path = os.path.join(folder, "ansible.cfg")
    open(path, "a").close()
    return path


def _median(rows: list) -> dict:
    """The first row (path, forks, errors) with the median wall_s / cpu_s and the least ok_hosts."""
    return dict(rows[0], **common.median_row(rows, ("wall_s", "cpu_s")))


def _print_point(point: dict) -> None:
    cold, warm = point["ctrlexec"]["cold"], point["ctrlexec"]["warm"]
    cmd, raw = point["ansible_command"], point["ansible_raw"]
    print("N=%-4d ctrl-exec %.3fs (warm %.3fs, ok %d)  ansible -m command %.3fs (ok %d)  "
          "-m raw %.3fs (ok %d)  ratio %.1fx (warm %.1fx, raw %.1fx)  load %s"
          % (point["hosts"], cold["wall_s"], warm["wall_s"], cold["ok_hosts"], cmd["wall_s"],
             cmd["ok_hosts"], raw["wall_s"], raw["ok_hosts"], point["ratio_cold"],
             point["ratio_warm"], point["ratio_raw_cold"], point["load_avg_before"]), flush=True)


def main(argv: list | None = None) -> int:
    """Start the fleet and sshd, compare each N, print (or --json one object per N)."""
    parser = argparse.ArgumentParser(prog="bench/ansible_baseline.py",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", default="10,100", help="comma list of N (default 10,100)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--ansible", default=DEFAULT_ANSIBLE,
                        help="ansible executable (default %(default)s)")
    parser.add_argument("--root", default="", help="fleet folder (default /tmp/ctrlexec-bench-<N>)")
    opts = parser.parse_args(argv)
    counts = common.host_counts(parser, opts.hosts)
    if not os.access(opts.ansible, os.X_OK):
        sys.stderr.write("blocked: %s not found; install it with: python -m venv "
                         "/tmp/bench-ansible-venv && /tmp/bench-ansible-venv/bin/pip install "
                         "ansible-core\n" % opts.ansible)
        return 2
    common.raise_fd_limit()
    fleet = fleet_mod.BenchFleet(opts.root or "/tmp/ctrlexec-bench-%d" % max(counts),
                                 max(counts)).build()
    fleet.write_conf()
    folder = tempfile.mkdtemp(prefix="ctrlexec-bench-ssh-")
    ssh = SshServer(folder)
    fleet.start()
    try:
        ssh.start()
        for hosts in counts:
            before = common.load_average()
            point = compare_point(fleet, ssh, opts.ansible, hosts, opts.repeat)
            point.update(load_avg_before=before, load_avg_after=common.load_average())
            common.report(point, as_json=opts.json, printer=_print_point)
    finally:
        ssh.stop()
        fleet.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
