#!/usr/bin/env python3
"""A one-node Slurm cluster in a directory, to try the sbatch script on one machine.

    python3 examples/slurm/local_cluster.py start DIR   # prints: export SLURM_CONF=DIR/slurm.conf
    python3 examples/slurm/local_cluster.py stop DIR    # stops the daemons it started, by pid

``start`` writes ``DIR/slurm.conf`` and a munge key, and starts ``munged``, ``slurmctld`` and
``slurmd`` (Debian's ``munge`` and ``slurm-wlm`` packages, run as root) with every file (sockets,
state, spool, pid files, logs) under ``DIR`` and free TCP ports, so it touches no system
configuration and can run next to another cluster. It returns once the node is idle. The node
advertises the machine's CPUs and ``--gpus N`` GPUs (default 8, a GRES count without devices) so
that the script's GPU request is accepted; the processes run on whatever device torch finds.
``stop`` ends the daemons by the pids in their pid files and waits until they are gone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("slurmd", "slurmctld", "munged")  # stop order
PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")


def missing_programs() -> list[str]:
    """The Slurm and munge programs not found on PATH (also ``/usr/sbin``)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
    return [p for p in PROGRAMS if shutil.which(p, path=path) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_conf(root: Path, cpus: int, gpus: int) -> str:
    """slurm.conf of one node named after this host, every path under ``root``."""
    host, user = socket.gethostname().split(".")[0], _user()
    mem_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    gres = f" Gres=gpu:{gpus}" if gpus else ""
    return f"""\
ClusterName=rspo-local
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
PlugStackConfig={root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
GresTypes=gpu
ReturnToService=2
SlurmdParameters=config_overrides
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mib}{gres} State=UNKNOWN
PartitionName=local Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _run(args: list[str], root: Path, env: dict) -> None:
    """Run a daemon's start command; its failure names the command and its log."""
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"local_cluster: {' '.join(args)} failed ({done.returncode}): "
                         f"{(done.stderr or done.stdout).strip()} (logs in {root})")


def _pid(root: Path, daemon: str) -> int | None:
    """The pid in ``daemon``'s pid file under ``root``, if that process is alive and is it."""
    path = root / ("munge/munged.pid" if daemon == "munged" else f"{daemon}.pid")
    try:
        pid = int(path.read_text().split()[0])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            name = os.path.basename(f.read().split(b"\0")[0].decode(errors="replace"))
    except (OSError, ValueError, IndexError):
        return None
    return pid if name == daemon and _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _wait_for(what: str, ready, root: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise SystemExit(f"local_cluster: {what} not ready after {timeout:.0f} s "
                             f"(logs in {root})")
        time.sleep(0.2)


def _node_idle(env: dict) -> bool:
    out = subprocess.run(["sinfo", "--noheader", "--format=%T"], env=env, capture_output=True,
                         text=True).stdout.split()
    return out == ["idle"]


def _write_config(root: Path, cpus: int, gpus: int) -> Path:
    """slurm.conf, an empty plugstack.conf, the GPU devices and gres.conf; slurm.conf's path."""
    for sub in ("munge", "state", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o700)
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, cpus, gpus))
    (root / "plugstack.conf").write_text("")
    if gpus:  # gres/gpu needs a character device per GPU: copies of /dev/null
        (root / "dev").mkdir(exist_ok=True)
        for i in range(gpus):
            if not (root / "dev" / f"gpu{i}").exists():
                os.mknod(root / "dev" / f"gpu{i}", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        (root / "gres.conf").write_text(f"Name=gpu File={root}/dev/gpu[0-{gpus - 1}]\n")
    return conf


def start(root: Path, cpus: int, gpus: int) -> dict:
    """Write the configuration and start the three daemons; the environment that uses them.
    A daemon that fails to start stops the ones already started."""
    root = root.resolve()
    conf = _write_config(root, cpus, gpus)
    env = dict(os.environ, SLURM_CONF=str(conf))
    munge = root / "munge"
    if not (munge / "munge.key").exists():
        _run(["mungekey", "--create", f"--keyfile={munge}/munge.key"], root, env)
    try:
        _run(["munged", f"--socket={munge}/munge.socket", f"--key-file={munge}/munge.key",
              f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
              f"--seed-file={munge}/munged.seed", "--force"], root, env)
        _wait_for("munged", lambda: (munge / "munge.socket").exists(), root)
        _run(["slurmctld", "-f", str(conf)], root, env)
        _run(["slurmd", "-f", str(conf)], root, env)
        _wait_for("the node", lambda: _node_idle(env), root)
    except BaseException:
        stop(root)
        raise
    return env


def _cancel_jobs(root: Path) -> None:
    """Cancel the cluster's jobs and wait (up to KillWait and a bit) until none is left."""
    env = dict(os.environ, SLURM_CONF=str(root / "slurm.conf"))

    def jobs() -> list[str]:
        return subprocess.run(["squeue", "--noheader", "--format=%i"], env=env,
                              capture_output=True, text=True, timeout=30).stdout.split()

    if jobs():
        subprocess.run(["scancel", *jobs()], env=env, capture_output=True, timeout=30)
        deadline = time.monotonic() + 40
        while jobs() and time.monotonic() < deadline:
            time.sleep(0.5)


def stop(root: Path, timeout: float = 30.0) -> list[str]:
    """Cancel the jobs, then SIGTERM each daemon by its pid file's pid (a process of that name
    only) and SIGKILL any left after ``timeout``; the daemons that had to be killed."""
    root, killed = root.resolve(), []
    if _pid(root, "slurmctld") is not None:
        _cancel_jobs(root)
    for daemon in DAEMONS:
        pid = _pid(root, daemon)
        if pid is None:
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
            killed.append(f"{daemon} (pid {pid})")
    return killed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="local_cluster.py", description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("start", "stop"))
    p.add_argument("dir", type=Path, help="directory for configuration, state and logs")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs the node advertises")
    p.add_argument("--gpus", type=int, default=8, help="GPUs the node advertises (no devices)")
    a = p.parse_args(argv)
    if a.action == "stop":
        killed = stop(a.dir)
        if killed:
            print(f"local_cluster: killed after SIGTERM: {', '.join(killed)}", file=sys.stderr)
        return 0
    missing = missing_programs()
    if missing:
        print(f"local_cluster: not installed: {' '.join(missing)} "
              "(Debian: apt-get install slurm-wlm munge)", file=sys.stderr)
        return 2
    env = start(a.dir, a.cpus, a.gpus)
    print(f"export SLURM_CONF={env['SLURM_CONF']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
