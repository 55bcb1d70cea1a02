#!/usr/bin/env python3
"""A throwaway two-node Slurm cluster on this machine, to try ``slurm/train.sh`` for real.

    python slurm/local_cluster.py run -- sbatch --wait slurm/train.sh configs/demo.yaml
    python slurm/local_cluster.py start      # prints the cluster folder and SLURM_CONF
    python slurm/local_cluster.py stop DIR

Needs root and Debian's packages (``apt-get install -y --no-install-recommends slurmctld
slurmd slurm-client munge``); no systemd. Everything lives in one folder under ``--root``
(its own munged socket, state, spool, logs and free ports), so two clusters can run side by
side. The fake nodes ``n1`` and ``n2`` are both this machine (``n1``/``n2`` are added to
/etc/hosts); each has 2 CPUs whatever the hardware, so jobs can oversubscribe. ``start``
first stops clusters whose owner process has gone (e.g. a test session that was killed).
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NODES = ("n1", "n2")
DEFAULT_ROOT = Path(tempfile.gettempdir()) / "patchsae-slurm"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel")
INSTALL_HINT = (
    "apt-get update && apt-get install -y --no-install-recommends "
    "slurmctld slurmd slurm-client munge"
)


class ClusterError(RuntimeError):
    pass


def _sbin_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _which(name: str) -> str:
    path = shutil.which(name, path=_sbin_path())
    if path is None:
        raise ClusterError(f"{name} not found; install Slurm with: {INSTALL_HINT}")
    return path


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _start_time(pid: int) -> str | None:
    """The kernel's start tick of ``pid``: tells a live process from a recycled PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _ensure_hosts() -> None:
    """Job scripts address nodes by name (the rendezvous endpoint is the first node)."""
    unknown = []
    for name in NODES:
        try:
            socket.gethostbyname(name)
        except OSError:
            unknown.append(name)
    if unknown:
        with open("/etc/hosts", "a") as f:
            f.write(f"127.0.0.1 {' '.join(unknown)}  # patchsae local Slurm cluster\n")


class LocalCluster:
    """One cluster folder: ``slurm.conf``, ``cluster.json`` (PIDs, owner) and the daemons'
    state. ``env`` is what a client (sbatch, squeue, ...) needs to talk to it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.conf = self.path / "slurm.conf"
        self.record = self.path / "cluster.json"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- start -------------------------------------------------------------------------------

    @classmethod
    def start(
        cls, root: Path = DEFAULT_ROOT, owner: int | None = None, timeout: float = 60
    ) -> LocalCluster:
        """Start munged, slurmctld and one slurmd per node; return once both nodes are idle.
        The cluster counts as left behind once ``owner`` (default: the parent) has exited."""
        if os.geteuid() != 0:
            raise ClusterError("the local cluster needs root (slurmd runs jobs as their user)")
        for name in BINARIES:
            _which(name)
        root.mkdir(parents=True, exist_ok=True)
        reap_orphans(root)
        root.chmod(0o755)
        cluster = cls(Path(tempfile.mkdtemp(prefix="c-", dir=root)))
        owner = os.getppid() if owner is None else owner
        cluster._save({"owner": [owner, _start_time(owner)], "pids": []})
        try:
            _ensure_hosts()
            cluster._write_config()
            cluster._launch()
            cluster.wait_idle(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _write_config(self) -> None:
        p = self.path
        p.chmod(0o755)
        for sub in ("state", "log", "run", "spool/n1", "spool/n2"):
            (p / sub).mkdir(parents=True, exist_ok=True)
        munge_dir = p / "munge"
        munge_dir.mkdir(exist_ok=True)
        munge_dir.chmod(0o755)  # munged insists that everyone can reach its socket
        shutil.chown(munge_dir, "munge", "munge")
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        lines = [
            "ClusterName=patchsae-local",
            f"SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # A short credential life lets a requeued job start again in seconds.
            f"AuthInfo=socket={munge_dir}/munge.socket,cred_expire=10",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MailProg=/bin/true",
            # Finished jobs leave the controller quickly, so `sbatch --wait` returns quickly.
            "MinJobAge=4",
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            f"StateSaveLocation={p}/state",
            f"SlurmdSpoolDir={p}/spool/%n",
            f"SlurmctldPidFile={p}/run/slurmctld.pid",
            f"SlurmdPidFile={p}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={p}/log/slurmctld.log",
            f"SlurmdLogFile={p}/log/slurmd-%n.log",
        ]
        for name, port in zip(NODES, node_ports, strict=True):
            lines.append(
                f"NodeName={name} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 "
                f"Port={port} CPUs=2 RealMemory={mem_mb // 4} State=UNKNOWN"
            )
        lines.append(f"PartitionName=local Nodes={','.join(NODES)} Default=YES State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _launch(self) -> None:
        munge_dir = self.path / "munge"
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run(["runuser", "-u", "munge", "--", "mungekey", "--create"], check=True)
        munge = pwd.getpwnam("munge")
        self._spawn(
            [_which("munged"), "--foreground", f"--socket={munge_dir}/munge.socket",
             f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log",
             f"--seed-file={munge_dir}/munged.seed"],
            "munged", user=(munge.pw_uid, munge.pw_gid),
        )  # fmt: skip
        self._wait_for(lambda: (munge_dir / "munge.socket").exists(), 10, "munged socket")
        self._spawn([_which("slurmctld"), "-D", "-c", "-f", str(self.conf)], "slurmctld")
        for name in NODES:
            self._spawn([_which("slurmd"), "-D", "-f", str(self.conf), "-N", name], name)

    def _spawn(self, cmd: list[str], name: str, user: tuple[int, int] | None = None) -> None:
        log = open(self.path / "log" / f"{name}.stdout", "ab")
        kwargs = {} if user is None else {"user": user[0], "group": user[1], "extra_groups": []}
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
            **kwargs,
        )
        log.close()
        record = self._load()
        record["pids"].append([proc.pid, _start_time(proc.pid), name])
        self._save(record)

    def wait_idle(self, timeout: float = 60) -> None:
        def idle() -> bool:
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split()
            return out.count("idle") == len(NODES)

        self._wait_for(idle, timeout, "all nodes idle in sinfo")

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [name for pid, tick, name in self._load()["pids"] if _start_time(pid) != tick]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"no {what} after {timeout:.0f} s"
                raise ClusterError(f"local Slurm cluster failed: {why}\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, lines: int = 10) -> str:
        """The end of every daemon log, for error messages (stop() removes the folder)."""
        parts = []
        for log in sorted((self.path / "log").glob("*")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    # -- use ---------------------------------------------------------------------------------

    def run(self, cmd: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        return subprocess.run(cmd, env=self.env, text=True, check=check, **kwargs)

    def _client(self, cmd: list[str]) -> str | None:
        """A client command's output, or None when the controller does not answer."""
        try:
            return self.run(cmd, check=False, timeout=15).stdout
        except subprocess.TimeoutExpired:
            return None

    # -- stop --------------------------------------------------------------------------------

    def stop(self) -> None:
        """Cancel the jobs, stop the daemons, kill what the jobs left behind, remove the folder."""
        if not self.record.exists():  # not a cluster folder (or already stopped): touch nothing
            return
        running = {
            name: pid for pid, tick, name in self._load()["pids"] if _start_time(pid) == tick
        }
        if "slurmctld" in running and self._client(["scancel", "--partition=local"]) is not None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self._client(["squeue", "-h"]):
                time.sleep(0.5)
        daemons = list(running.values())
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            for pid in daemons:
                _kill(pid, sig)
            daemons = self._wait_gone(daemons, grace)
        # slurmstepd and job processes inherit SLURM_CONF: whatever is left of this cluster.
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            left = self._job_processes()
            for pid in left:
                _kill(pid, sig)
            self._wait_gone(left, grace)
        shutil.rmtree(self.path, ignore_errors=True)

    def _job_processes(self) -> list[int]:
        marker = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                environ = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in environ:
                pids.append(int(proc.name))
        return pids

    @staticmethod
    def _wait_gone(pids: list[int], timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = [pid for pid in pids if _alive(pid)]
        return pids

    def owner_alive(self) -> bool:
        pid, tick = self._load()["owner"]
        return _start_time(pid) == tick

    def _load(self) -> dict:
        try:
            return json.loads(self.record.read_text())
        except (OSError, ValueError):
            return {"owner": [0, None], "pids": []}

    def _save(self, record: dict) -> None:
        tmp = self.record.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(self.record)


def _alive(pid: int) -> bool:
    """Running (a zombie has finished: it only waits for its parent to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def reap_orphans(root: Path) -> None:
    """Stop clusters whose owner is gone (a killed test session leaves its daemons running)."""
    for path in root.glob("c-*"):
        cluster = LocalCluster(path)
        if not cluster.owner_alive():
            print(f"stopping leftover cluster {path}", file=sys.stderr)
            cluster.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="parent of cluster folders")
    sub = p.add_subparsers(dest="cmd", required=True)
    start = sub.add_parser("start", help="start a cluster, print its folder and SLURM_CONF")
    start.add_argument("--owner", type=int, help="PID whose exit makes the cluster a leftover")
    stop = sub.add_parser("stop", help="stop the cluster in DIR")
    stop.add_argument("dir", type=Path)
    run = sub.add_parser("run", help="start a cluster, run a command against it, stop it")
    run.add_argument("command", nargs=argparse.REMAINDER, help="default: $SHELL")
    args = p.parse_args(argv)

    try:
        if args.cmd == "stop":
            LocalCluster(args.dir).stop()
            return 0
        if args.cmd == "start":
            cluster = LocalCluster.start(args.root, args.owner)
            print(f"{cluster.path}\nexport SLURM_CONF={cluster.conf}")
            return 0
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        command = command or [os.environ.get("SHELL", "bash")]
        cluster = LocalCluster.start(args.root, owner=os.getpid())
        try:
            return subprocess.run(command, env=cluster.env).returncode
        finally:
            cluster.stop()
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
