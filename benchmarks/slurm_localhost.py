"""A one-node SLURM cluster on this machine, to try launcher="slurm" without a cluster (and for tests/test_slurm.py).

    sudo python benchmarks/slurm_localhost.py start     # installs what is missing, starts, waits for the node
    export SLURM_CONF=/var/lib/slurm-localhost/slurm.conf
    python ResNet.py ... --launcher=slurm --slurm="{'cpus_per_task': 1, 'timeout_min': 60}"
    sudo python benchmarks/slurm_localhost.py status    # each daemon's process id, and sinfo
    sudo python benchmarks/slurm_localhost.py stop      # stops the daemons it started, by their process ids

`start` (as root, on Debian or Ubuntu):
  1. installs Debian's packages with apt-get when one of their programs is missing: slurm-wlm (slurmctld, slurmd,
     the client commands), munge, slurmdbd and mariadb-server. The last two are the accounting that `sacct`
     reads: submitit learns a job's state (CANCELLED, TIMEOUT, FAILED) only from sacct, and without it waits
     forever for a job that was cancelled or killed
  2. writes everything into one folder it creates (--base, default /var/lib/slurm-localhost): a munge key
     (mungekey, else 1 KiB from /dev/urandom), slurm.conf (AuthType=auth/munge, ProctrackType=proctrack/linuxproc,
     TaskPlugin=task/none, one node named after this machine with its CPUs and 90% of its memory, one partition
     "local" marked Default), slurmdbd.conf, the state and spool folders, the database, the logs (log/)
  3. starts munged, mariadbd, slurmdbd, slurmctld and slurmd as root, each in the foreground of its own session,
     and records their process ids in <base>/pids.json; a daemon recorded there and still running (same process
     id, same command line) is reused, not started twice
  4. waits until sinfo shows the node idle, and prints the line that points the SLURM commands at this cluster
`stop` cancels the jobs still in the queue and waits for them to end (so that no job's slurmstepd is left
waiting for slurmd), then sends SIGTERM to the process ids in pids.json (in the reverse order; SIGKILL after
20 s), never to a process found by name; the folder is kept (job ids and sacct's records go on at the next
start): remove it by hand to start from nothing. Ports: 6817-6819 (SLURM's own) and 6820 (the database), on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_BASE = Path("/var/lib/slurm-localhost")
PACKAGES = ["slurm-wlm", "slurmdbd", "munge", "mariadb-server"]
PROGRAMS = ["munged", "mungekey", "mariadbd", "mariadb-install-db", "mariadb", "slurmdbd", "slurmctld", "slurmd",
            "sinfo", "sbatch", "squeue", "scancel", "sacct"]
ORDER = ["munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd"]  # start in this order, stop in the reverse
PORTS = {"slurmctld": 6817, "slurmd": 6818, "slurmdbd": 6819, "mariadbd": 6820}
PARTITION = "local"
UP = ("idle", "mixed", "allocated", "completing")  # node states of a node that takes jobs (idle when it has none)


class SetupError(RuntimeError):
    """The cluster cannot be installed or started here; the message says why."""


def say(message: str) -> None:
    print(f"slurm_localhost: {message}", flush=True)


def paths(base: Path) -> dict:
    return {"conf": base / "slurm.conf", "dbd_conf": base / "slurmdbd.conf", "pids": base / "pids.json",
            "munge": base / "munge", "key": base / "munge" / "munge.key", "socket": base / "munge" / "munge.socket",
            "db": base / "db" / "data", "db_socket": base / "db" / "mariadb.sock",
            "db_password": base / "db" / "password",
            "state": base / "state", "spool": base / "spool", "log": base / "log"}


def hostname() -> str:
    return socket.gethostname().split(".")[0]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise SetupError("cannot read MemTotal in /proc/meminfo")


def slurm_conf(base: Path) -> str:
    p = paths(base)
    host = hostname()
    return "\n".join([
        f"# written by benchmarks/slurm_localhost.py: a one-node cluster on {host}; stop it with that script's 'stop'",
        "ClusterName=localhost",
        f"SlurmctldHost={host}(127.0.0.1)",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={p['socket']}",
        "SlurmUser=root", "SlurmdUser=root",
        f"SlurmctldPort={PORTS['slurmctld']}", f"SlurmdPort={PORTS['slurmd']}",
        f"StateSaveLocation={p['state']}", f"SlurmdSpoolDir={p['spool']}",
        f"SlurmctldPidFile={base / 'slurmctld.pid'}", f"SlurmdPidFile={base / 'slurmd.pid'}",
        f"SlurmctldLogFile={p['log'] / 'slurmctld.log'}", f"SlurmdLogFile={p['log'] / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none", "MailProg=/bin/true",
        "SchedulerType=sched/backfill", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "ReturnToService=2",
        "KillWait=5  # seconds from scancel's SIGTERM to SIGKILL: a submitit job ignores SIGTERM",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/slurmdbd", "AccountingStorageHost=localhost",
        f"AccountingStoragePort={PORTS['slurmdbd']}", f"AccountingStoragePass={p['socket']}",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={int(_memory_mb() * 0.9)} State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""])


def slurmdbd_conf(base: Path, password: str) -> str:
    p = paths(base)
    return "\n".join([
        "# written by benchmarks/slurm_localhost.py", "AuthType=auth/munge", f"AuthInfo=socket={p['socket']}",
        "DbdHost=localhost", f"DbdPort={PORTS['slurmdbd']}", "SlurmUser=root",
        f"LogFile={p['log'] / 'slurmdbd.log'}", f"PidFile={base / 'slurmdbd.pid'}",
        "StorageType=accounting_storage/mysql", "StorageHost=127.0.0.1", f"StoragePort={PORTS['mariadbd']}",
        "StorageUser=slurm", f"StoragePass={password}", "StorageLoc=slurm_acct_db", ""])


def commands(base: Path) -> dict:
    """The command line of each daemon, in the foreground (its process id is the one this script started)."""
    p = paths(base)
    return {
        "munged": ["munged", "--foreground", f"--key-file={p['key']}", f"--socket={p['socket']}",
                   f"--pid-file={p['munge'] / 'munged.pid'}", f"--log-file={p['log'] / 'munged.log'}",
                   f"--seed-file={p['munge'] / 'munged.seed'}"],
        "mariadbd": ["mariadbd", "--no-defaults", f"--datadir={p['db']}", f"--socket={p['db_socket']}",
                     f"--port={PORTS['mariadbd']}", "--bind-address=127.0.0.1", "--user=root",
                     f"--pid-file={base / 'db' / 'mariadbd.pid'}", f"--log-error={p['log'] / 'mariadb.log'}",
                     "--innodb-buffer-pool-size=64M", "--innodb-log-file-size=8M"],
        "slurmdbd": ["slurmdbd", "-D"],
        "slurmctld": ["slurmctld", "-D", "-i"],  # -i: go on past a state file it cannot read
        "slurmd": ["slurmd", "-D", "-N", hostname()],
    }


def env(base: Path) -> dict:
    return dict(os.environ, SLURM_CONF=str(paths(base)["conf"]))


# -- process ids ---------------------------------------------------------------------------------------------

def _recorded(base: Path) -> dict:
    try:
        return json.loads(paths(base)["pids"].read_text())
    except (OSError, ValueError):
        return {}


def _record(base: Path, pids: dict) -> None:
    path = paths(base)["pids"]
    path.write_text(json.dumps(pids, indent=1))
    path.chmod(0o600)


def alive(entry: dict | None) -> bool:
    """The recorded process still runs: same id, same command line, not a zombie."""
    if not entry:
        return False
    proc = Path(f"/proc/{int(entry['pid'])}")
    try:
        argv = proc.joinpath("cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
        state = proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X") and argv == entry["argv"]


def running(base: Path = DEFAULT_BASE) -> dict:
    """{daemon: process id} of the recorded daemons that still run."""
    return {name: e["pid"] for name, e in _recorded(base).items() if alive(e)}


# -- start ---------------------------------------------------------------------------------------------------

def _missing() -> list:
    return [p for p in PROGRAMS if shutil.which(p) is None]


def install() -> None:
    missing = _missing()
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise SetupError(f"{', '.join(missing)} missing and no apt-get to install {' '.join(PACKAGES)}")
    say(f"installing {' '.join(PACKAGES)} with apt-get ({', '.join(missing)} missing)")
    apt_env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    done = subprocess.run(cmd, env=apt_env, capture_output=True, text=True)
    if done.returncode != 0:  # the package lists may be missing or old: once more after an update
        subprocess.run(["apt-get", "update"], env=apt_env, capture_output=True, text=True)
        done = subprocess.run(cmd, env=apt_env, capture_output=True, text=True)
    if done.returncode != 0 or _missing():
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
        raise SetupError(f"apt-get install {' '.join(PACKAGES)} failed (exit {done.returncode}): " + " | ".join(tail))
    say("installed")


def _write_if_changed(path: Path, text: str, mode: int) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    path.chmod(mode)


def prepare(base: Path) -> None:
    """The folders, the munge key, the database and the configuration files (what exists is kept)."""
    p = paths(base)
    for d in (base, p["state"], p["spool"], p["log"], base / "db"):
        d.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    p["munge"].mkdir(mode=0o755, exist_ok=True)
    p["munge"].chmod(0o755)  # munged wants its socket's folder open to every user
    if not p["key"].exists():
        made = shutil.which("mungekey") and subprocess.run(
            ["mungekey", "--create", f"--keyfile={p['key']}"], capture_output=True).returncode == 0
        if not made:
            p["key"].write_bytes(os.urandom(1024))
        say(f"created the munge key {p['key']}" + ("" if made else " (from /dev/urandom)"))
    os.chown(p["key"], 0, 0)
    p["key"].chmod(0o400)
    if not p["db_password"].exists():
        p["db_password"].write_text(secrets.token_hex(16))
    p["db_password"].chmod(0o600)
    if not (p["db"] / "mysql").exists():
        shutil.rmtree(p["db"], ignore_errors=True)
        done = subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={p['db']}", "--user=root",
                               "--auth-root-authentication-method=socket", "--skip-test-db",
                               "--innodb-log-file-size=8M"], capture_output=True, text=True)
        if done.returncode != 0:
            raise SetupError(f"mariadb-install-db failed: {(done.stdout + done.stderr).strip()[-500:]}")
        say(f"created the accounting database in {p['db']}")
    _write_if_changed(p["conf"], slurm_conf(base), 0o644)
    _write_if_changed(p["dbd_conf"], slurmdbd_conf(base, p["db_password"].read_text().strip()), 0o600)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _wait(what: str, ready, timeout: float, base: Path, log: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ready():
            return
        time.sleep(0.5)
    tail = ""
    for name in (log, f"{log}.out"):
        f = paths(base)["log"] / name
        if f.exists():
            tail += " | ".join(f.read_text(errors="replace").strip().splitlines()[-6:])
    raise SetupError(f"{what} not ready after {timeout:.0f} s; log {paths(base)['log'] / log}: {tail}")


def _ok(cmd: list, base: Path) -> bool:
    return subprocess.run(cmd, env=env(base), capture_output=True).returncode == 0


def _ready(name: str, base: Path):
    p = paths(base)
    return {
        "munged": lambda: p["socket"].exists() and _ok(["munge", "-n", "-S", str(p["socket"])], base),
        "mariadbd": lambda: p["db_socket"].exists() and _ok(["mariadb", "-S", str(p["db_socket"]), "-u", "root",
                                                              "-e", "SELECT 1"], base),
        "slurmdbd": lambda: not _port_free(PORTS["slurmdbd"]),
        "slurmctld": lambda: _ok(["scontrol", "ping"], base),
        "slurmd": lambda: node_state(base) in UP,
    }[name]


def node_state(base: Path) -> str:
    done = subprocess.run(["sinfo", "-h", "-N", "-n", hostname(), "-o", "%T"], env=env(base), capture_output=True,
                          text=True)
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else ""


def _grant(base: Path) -> None:
    """The database user slurmdbd logs in as (its password in slurmdbd.conf), each start: idempotent."""
    p = paths(base)
    password = p["db_password"].read_text().strip()
    sql = " ".join(f"CREATE USER IF NOT EXISTS 'slurm'@'{h}' IDENTIFIED BY '{password}'; "
                   f"ALTER USER 'slurm'@'{h}' IDENTIFIED BY '{password}'; "
                   f"GRANT ALL ON slurm_acct_db.* TO 'slurm'@'{h}';" for h in ("127.0.0.1", "localhost"))
    done = subprocess.run(["mariadb", "-S", str(p["db_socket"]), "-u", "root", "-e", sql], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SetupError(f"cannot create the database user of slurmdbd: {done.stderr.strip()}")


def start(base: Path = DEFAULT_BASE, timeout: float = 90) -> dict:
    """Install when missing, start what does not run yet, wait until the node is idle. Returns
    {'started': [...], 'reused': [...], 'pids': {...}, 'conf': path}."""
    if os.geteuid() != 0:
        raise SetupError("needs root (it installs packages and runs slurmctld, slurmd and munged as root): "
                         "run it with sudo")
    if sys.platform != "linux":
        raise SetupError(f"needs Linux (proctrack/linuxproc), not {sys.platform}")
    install()
    base = Path(base)
    recorded = {name: e for name, e in _recorded(base).items() if alive(e)}
    busy = [f"{port} ({name})" for name, port in PORTS.items() if name not in recorded and not _port_free(port)]
    if busy:
        raise SetupError(f"port(s) {', '.join(busy)} on 127.0.0.1 already taken by a process this script did not "
                         f"start (another SLURM or database?); stop it, or stop the cluster it belongs to")
    prepare(base)
    p = paths(base)
    started, reused = [], []
    try:
        for name in ORDER:
            if name in recorded:
                reused.append(name)
                say(f"{name} already runs (pid {recorded[name]['pid']}): reused")
                continue
            argv = commands(base)[name]
            argv[0] = shutil.which(argv[0]) or argv[0]
            with open(p["log"] / f"{name}.out", "ab") as out:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        env=env(base), cwd=base, start_new_session=True)
            recorded[name] = {"pid": proc.pid, "argv": argv, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            _record(base, recorded)  # at once: a failure further on can still be stopped by its pid
            started.append(name)
            say(f"started {name} (pid {proc.pid}; log {p['log']})")
            if name != "slurmd":
                _wait(name, lambda: proc.poll() is None and _ready(name, base)() or proc.poll() is not None,
                      timeout, base, f"{name}.log" if name != "mariadbd" else "mariadb.log")
                if proc.poll() is not None:
                    raise SetupError(f"{name} exited at once (status {proc.returncode}); see {p['log']}/{name}.out")
            if name == "mariadbd":
                _grant(base)
        state = node_state(base)
        if state.startswith(("down", "drain")):
            subprocess.run(["scontrol", "update", f"nodename={hostname()}", "state=resume"], env=env(base),
                           capture_output=True)
        _wait(f"node {hostname()} (state '{node_state(base)}')", _ready("slurmd", base), timeout, base, "slurmd.log")
    except BaseException:
        if started:
            say(f"could not start; stopping what this call started: {', '.join(started)}")
            stop(base, only=started)
        raise
    sinfo = subprocess.run(["sinfo"], env=env(base), capture_output=True, text=True).stdout.strip()
    say("ready: " + (f"started {', '.join(started)}" if started else "nothing to start") +
        (f"; reused {', '.join(reused)}" if reused else "") + f"\n{sinfo}")
    say(f"point the SLURM commands (sbatch, squeue, sacct, submitit) at it with:\n"
        f"export SLURM_CONF={p['conf']}\nstop it with: python {Path(__file__).resolve()} stop --base={base}")
    return {"started": started, "reused": reused, "pids": {n: e["pid"] for n, e in recorded.items()},
            "conf": str(p["conf"])}


def _queue(base: Path) -> list:
    done = subprocess.run(["squeue", "-h", "-o", "%i %T"], env=env(base), capture_output=True, text=True, timeout=60)
    return [line.split() for line in done.stdout.strip().splitlines()] if done.returncode == 0 else []


def _drain(base: Path, grace: float) -> None:
    """Before slurmd goes: cancel the jobs still queued or running and wait until the queue is empty, so that
    no job's slurmstepd is left behind waiting for a slurmd that is gone (a job also lingers a moment, COMPLETING,
    after its result is written)."""
    jobs = _queue(base)
    running_jobs = [j for j, state in jobs if state != "COMPLETING"]
    if running_jobs:
        say(f"cancelling the job(s) still queued or running: {', '.join(running_jobs)}")
        subprocess.run(["scancel", *running_jobs], env=env(base), capture_output=True, timeout=60)
    end = time.monotonic() + grace + 10  # KillWait (5 s) from SIGTERM to SIGKILL, then the job's completion
    while jobs and time.monotonic() < end:
        time.sleep(0.5)
        jobs = _queue(base)
    if jobs:
        say(f"job(s) {', '.join(j for j, _ in jobs)} still in the queue after {grace + 10:.0f} s; stopping anyway")


def stop(base: Path = DEFAULT_BASE, only: list | None = None, grace: float = 20) -> list:
    """SIGTERM to each recorded daemon still running (reverse order), SIGKILL after `grace` seconds; returns
    the names stopped. Only process ids from pids.json, whose command line is the recorded one."""
    base = Path(base)
    recorded = _recorded(base)
    if all(alive(recorded.get(n)) for n in ("munged", "slurmctld", "slurmd")) and (only is None or "slurmd" in only):
        _drain(base, grace)
    stopped = []
    for name in reversed(ORDER):
        entry = recorded.get(name)
        if only is not None and name not in only or entry is None:
            continue
        if alive(entry):
            os.kill(entry["pid"], signal.SIGTERM)
            end = time.monotonic() + grace
            while alive(entry) and time.monotonic() < end:
                time.sleep(0.2)
            if alive(entry):
                os.kill(entry["pid"], signal.SIGKILL)
                say(f"{name} (pid {entry['pid']}) did not stop in {grace:.0f} s: killed")
            say(f"stopped {name} (pid {entry['pid']})")
            stopped.append(name)
        recorded.pop(name)
    if paths(base)["pids"].exists():
        _record(base, recorded)
    if not stopped:
        say(f"nothing to stop (no daemon recorded in {paths(base)['pids']} runs)")
    return stopped


def status(base: Path = DEFAULT_BASE) -> bool:
    recorded = _recorded(Path(base))
    for name in ORDER:
        entry = recorded.get(name)
        say(f"{name}: " + (f"runs (pid {entry['pid']})" if alive(entry) else
                           f"not running (recorded pid {entry['pid']})" if entry else "not running"))
    all_up = all(alive(recorded.get(n)) for n in ORDER)
    if all_up:
        say(f"node {hostname()}: {node_state(Path(base))}; SLURM_CONF={paths(Path(base))['conf']}")
    return all_up


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE, help=f"its folder (default {DEFAULT_BASE})")
    parser.add_argument("--timeout", type=float, default=90, help="seconds to wait for each daemon")
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            start(args.base, args.timeout)
        elif args.action == "stop":
            stop(args.base)
        else:
            return 0 if status(args.base) else 1
    except SetupError as e:
        print(f"slurm_localhost: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
