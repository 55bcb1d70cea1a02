"""Test side of ``slurm/local_cluster.py``: start a cluster, submit ``slurm/train.sh``, read
what the job left behind."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import DEMO, ROOT, cli_env, free_port, small_overrides

SCRIPT = ROOT / "slurm" / "local_cluster.py"
TRAIN_SH = ROOT / "slurm" / "train.sh"
INSTALL = (
    "apt-get update && apt-get install -y --no-install-recommends "
    "slurmctld slurmd slurm-client munge"
)
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")


def why_unavailable() -> str | None:
    """None when this machine can run the local cluster, else the reason."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = [b for b in BINARIES if shutil.which(b, path=path) is None]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing); install it with: {INSTALL}"
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (slurmd runs jobs as their user)"
    return None


class Cluster:
    """A running ``slurm/local_cluster.py`` cluster, owned by this test session unless
    ``owner`` names another process."""

    def __init__(self, owner: int | None = None) -> None:
        owner = os.getpid() if owner is None else owner
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), "start", "--owner", str(owner)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, f"local cluster did not start:\n{proc.stderr[-4000:]}"
        self.path = Path(proc.stdout.splitlines()[0])
        self.conf = self.path / "slurm.conf"

    def stop(self) -> None:
        subprocess.run([sys.executable, str(SCRIPT), "stop", str(self.path)], timeout=120)

    def env(self, **extra: str) -> dict[str, str]:
        # A session inside a Slurm allocation must not hand its own job's variables on.
        env = {k: v for k, v in cli_env(**extra).items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def processes(self) -> list[int]:
        """What runs with this cluster's configuration: daemons, job steps, jobs."""
        marker = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
        return pids

    def run(self, *cmd: str) -> str:
        proc = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed: {proc.stderr}"
        return proc.stdout

    def submit(
        self,
        out: Path,
        shards: Path,
        *,
        nodes: int,
        nproc: int,
        sbatch_args: tuple[str, ...] = (),
        **overrides: object,
    ) -> Job:
        """``sbatch --wait slurm/train.sh`` on the demo config, in the background; the job's
        output goes to ``out.log``."""
        log = out.with_suffix(".log")
        cmd = [
            "sbatch", "--wait", f"--nodes={nodes}", "--gpus-per-node=0", "--cpus-per-task=1",
            "--time=5", f"--output={log}", *sbatch_args, str(TRAIN_SH), str(DEMO),
        ]  # fmt: skip
        for item in small_overrides(shards, out, **overrides):
            cmd += ["--set", item]
        env = self.env(PATCHSAE_PYTHON=sys.executable, NPROC=str(nproc), RDZV_PORT=str(free_port()))
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        return Job(self, proc, out, log)


@dataclass
class Job:
    cluster: Cluster
    proc: subprocess.Popen
    out: Path
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def id(self) -> int:
        """From the first line that ``train.sh`` prints."""
        self.wait_for(lambda: re.search(r"^job (\d+) ", self.text(), re.M), 60, "the job to start")
        return int(re.search(r"^job (\d+) ", self.text(), re.M).group(1))

    def wait_for(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while not (found := predicate()):
            if self.proc.poll() is not None:
                raise AssertionError(f"job ended while waiting for {what}:\n{self.text()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {timeout} s:\n{self.text()[-4000:]}")
            time.sleep(0.2)
        return found

    def trainers(self) -> list[int]:
        """PIDs of this job's trainer processes (not torchrun's agent, which runs them)."""
        pids = []
        for pid in self.cluster.processes():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            except OSError:
                continue
            if "patchsae.launchers.train" in argv and "torch.distributed.run" not in argv:
                if f"train.out_dir={self.out}" in argv:
                    pids.append(pid)
        # Data-loader workers are forks with the same command line: keep their parents.
        return [pid for pid in pids if _parent(pid) not in pids]

    def logged_steps(self) -> int:
        path = self.out / "metrics.jsonl"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def finish(self, timeout: float = 300) -> str:
        """Wait for ``sbatch --wait``; assert that the job succeeded; return its output."""
        try:
            _, stderr = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(
                f"job still running after {timeout} s:\n{self.text()[-4000:]}"
            ) from None
        assert self.proc.returncode == 0, (
            f"sbatch --wait exited with {self.proc.returncode}: {stderr}\n{self.text()[-6000:]}"
        )
        return self.text()


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        return None
