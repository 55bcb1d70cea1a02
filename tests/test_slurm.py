"""``sbatch slurm/train.sh`` on a real (local, two-node) Slurm cluster: multi-node and
multi-process training, and a job preempted before its time limit that requeues itself and
resumes without losing or repeating a step.

Needs Debian's Slurm packages and root; skipped without them, except where
``PATCHSAE_REQUIRE_SLURM=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient
from patchsae.trainer.tracking import read_run_info

from tests.slurm_cluster import Cluster, why_unavailable

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    reason = why_unavailable()
    if reason and os.environ.get("PATCHSAE_REQUIRE_SLURM") == "1":
        pytest.fail(f"PATCHSAE_REQUIRE_SLURM=1 but {reason}")
    if reason:
        pytest.skip(reason)
    cluster = Cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(autouse=True)
def no_jobs_left(cluster):
    """A failed test must not leave its job holding the nodes for the next one."""
    yield
    cluster.run("scancel", "--partition=local")
    deadline = time.monotonic() + 60
    while cluster.run("squeue", "-h") and time.monotonic() < deadline:
        time.sleep(0.5)


def assert_trained_once(out, total: int) -> None:
    """The final export is there, both replicas agree, and every step from 1 to ``total`` was
    recorded exactly once, in metrics.jsonl and in MLflow (one writer, nothing lost or
    repeated across a requeue)."""
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["step"] == total
    assert (out / "sae.safetensors").stat().st_size > 0
    digests = json.loads((out / "replicas.json").read_text())
    assert len(digests) == 2 and digests[0] == digests[1]

    raw = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert raw == list(range(1, total + 1))
    info = read_run_info(out)
    client = MlflowClient(info["tracking_uri"])
    history = client.get_metric_history(info["run_id"], "loss/total")
    assert sorted(m.step for m in history) == list(range(1, total + 1))
    assert client.get_run(info["run_id"]).info.status == "FINISHED"


ZERO3 = {"distributed.strategy": "deepspeed", "distributed.zero_stage": 3}


@pytest.mark.parametrize(
    "nodes,nproc,overrides",
    [(1, 2, {}), (2, 1, {}), (2, 1, ZERO3)],
    ids=["1node-2proc", "2nodes-1proc", "2nodes-1proc-zero3"],
)
def test_sbatch_trains_one_sae(cluster, demo_shards, tmp_path, nodes, nproc, overrides):
    job = cluster.submit(tmp_path / "run", demo_shards, nodes=nodes, nproc=nproc, **overrides)
    log = job.finish()
    assert f"{nodes} node(s) x {nproc} process(es)" in log
    if overrides:
        assert "DeepSpeed ZeRO-3 on 2 ranks" in log
    assert "resumed from" not in log
    assert_trained_once(tmp_path / "run", total=8)


def assert_resumed_once(log: str, total: int) -> None:
    """One stop at a step strictly inside the run, one requeue, one resume from that step."""
    assert re.findall(r"^job \d+ restart (\d+):", log, re.M) == ["0", "1"], log[-4000:]
    resumed = re.findall(r"resumed from \S+step_(\d+) at step (\d+)", log)
    assert len(resumed) == 1, log[-4000:]
    assert int(resumed[0][0]) == int(resumed[0][1])
    assert 0 < int(resumed[0][1]) < total


def test_preempted_job_checkpoints_requeues_and_resumes(cluster, demo_shards, tmp_path):
    """The time-limit warning, sent by hand once the job is mid-run (what --signal=B:USR1@120
    does before the limit): every rank stops at the same step, the job requeues itself and the
    second run continues the same run to the end."""
    total = 24
    out = tmp_path / "run"
    job = cluster.submit(out, demo_shards, nodes=2, nproc=1, **{"train.total_tokens": total * 1024})
    job_id = job.id()
    job.wait_for(lambda: job.logged_steps() >= 3, 120, "3 logged steps")
    cluster.run("scancel", "--signal=USR1", "--batch", str(job_id))
    log = job.finish()
    assert_resumed_once(log, total)
    assert "received signal 10" in log
    assert_trained_once(out, total)


def test_time_limit_warning_requeues(cluster, demo_shards, tmp_path):
    """Slurm's own warning (--signal=B:USR1@90 with a 2-minute limit). The controller checks
    limits every 30 s, so USR1 comes at any time in the job's first 30 s, possibly before the
    trainers are up (train.sh then sends it again 30 s later). So that a short run is still
    training whenever the warning lands, the test freezes the trainers (SIGSTOP) after a few
    steps until train.sh forwards a USR1; a stopped process keeps the signal pending. Once the
    warning is forwarded, the test lifts the limit, or the second run would be warned as early."""
    total = 40
    out = tmp_path / "run"
    job = cluster.submit(
        out,
        demo_shards,
        nodes=1,
        nproc=2,
        sbatch_args=("--time=2", "--signal=B:USR1@90"),
        **{"train.total_tokens": total * 1024},
    )
    job_id = job.id()
    job.wait_for(lambda: job.logged_steps() >= 3, 120, "3 logged steps")
    forwarded = job.text().count(f"job {job_id}: USR1")
    trainers = job.trainers()
    assert len(trainers) == 2, f"trainer processes: {trainers}"
    for pid in trainers:
        os.kill(pid, signal.SIGSTOP)
    try:
        job.wait_for(
            lambda: (
                job.text().count(f"job {job_id}: USR1") > forwarded or "requeueing" in job.text()
            ),
            70,
            "train.sh to forward the time-limit warning",
        )
        # The warning has been delivered; lift the limit before the job can requeue, so the
        # second run is not warned as early (lifting it after the requeue races the restart).
        cluster.run("scontrol", "update", f"JobId={job_id}", "TimeLimit=10")
    finally:
        for pid in trainers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    job.wait_for(lambda: "requeueing" in job.text(), 60, "the job to requeue")
    log = job.finish()
    assert_resumed_once(log, total)
    assert_trained_once(out, total)


def test_start_stops_clusters_left_behind(cluster):
    """A killed test session leaves its daemons and jobs running; the next start stops them."""
    owner = subprocess.Popen(["sleep", "600"])
    left = Cluster(owner=owner.pid)
    try:
        job = left.run("sbatch", "--parsable", "--output=/dev/null", "--wrap=sleep 600").strip()
        deadline = time.monotonic() + 30
        while left.run("squeue", "-h", "-j", job, "-o", "%t").strip() != "R":
            assert time.monotonic() < deadline, "the leftover job did not start"
            time.sleep(0.5)
        sleeping = [pid for pid in left.processes() if _cmdline(pid) == "sleep 600"]
        assert len(sleeping) == 1
        owner.kill()
        owner.wait()

        other = Cluster()  # reaps the cluster left behind
        other.stop()
        assert not left.path.exists()
        assert [pid for pid in left.processes() if _running(pid)] == []
        assert not _running(sleeping[0])
    finally:
        owner.kill()
        left.stop()
    assert cluster.run("sinfo", "-h", "-o", "%D %t").split() == ["2", "idle"]


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def test_sbatch_analyzes_on_two_nodes_like_one_process(cluster, demo_shards, tmp_path):
    """``slurm/analyze.sh`` on 2 nodes: each rank reads its shards, the results equal one
    process's."""
    from tests.helpers import ROOT, free_port, python_cmd, run_cli, run_train, small_overrides
    from tests.test_analysis import _same_results

    run = tmp_path / "run"
    run_train(small_overrides(demo_shards, run, **{"tracking.enabled": "false"}))
    args = ["--data", str(demo_shards), "--batch-images", "20", "--workers", "1", "--no-mlflow"]
    local, slurm = tmp_path / "local", tmp_path / "slurm"
    proc = run_cli(
        [*python_cmd(1), "-m", "patchsae.launchers.cli", "analyze", str(run), *args,
         "--out", str(local)]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = tmp_path / "analyze.log"
    cmd = [
        "sbatch", "--wait", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=5",
        f"--output={log}", str(ROOT / "slurm" / "analyze.sh"), str(run), *args,
        "--out", str(slurm),
    ]  # fmt: skip
    env = cluster.env(PATCHSAE_PYTHON=sys.executable, NPROC="1", RDZV_PORT=str(free_port()))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, log.read_text()[-3000:] if log.exists() else proc.stderr
    assert "2 node(s) x 1 process(es)" in log.read_text()
    _same_results(local, slurm)
