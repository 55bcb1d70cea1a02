"""End to end through the real CLI: the demo, exact resume, a tracking-server outage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from data.demo import make_demo_data
from tests.helpers import ROOT, cli_env, run_train, small_overrides, train_cmd
from tests.mlflow_server import MlflowServer
from trainer.tracking import read_metrics, read_run_info

DEMO_METRICS = [
    "loss/total",
    "loss/mse",
    "loss/l1",
    "quality/fvu",
    "sparsity/l0",
    "sparsity/dead_frac",
    "perf/tokens_per_s",
]


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def test_demo_recipe_trains_to_target_and_logs_everything(tmp_path):
    """The README's demo, as `make train` runs it: 2,000 generated images, the full recipe."""
    shards = make_demo_data(tmp_path / "demo-data")
    out = tmp_path / "demo"
    start = time.monotonic()
    # A hard ceiling, not a benchmark: the demo must fit in 5 minutes on 2 cores.
    run_train([f"data.urls={shards}", f"train.out_dir={out}"], timeout=300)
    elapsed = time.monotonic() - start

    info = read_run_info(out)
    client = MlflowClient(tracking_uri=info["tracking_uri"])
    assert info["tracking_uri"] == f"sqlite:///{out.resolve()}/mlflow.db"
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "demo"
    assert client.get_experiment(run.info.experiment_id).name == "patchsae-demo"
    steps = 318
    for key in DEMO_METRICS:
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [*range(10, steps, 10), steps], key
    assert run.data.params["train.lr"] == "0.003"
    assert run.data.params["model.name"] == "patchsae-demo-vit"
    assert run.data.params["kernels/path"] == "eager"

    final = run.data.metrics
    assert final["quality/fvu"] < 0.1, final
    assert final["sparsity/l0"] < 1024 / 4, final
    assert 0 <= final["sparsity/dead_frac"] < 0.5

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    artifacts |= {
        a.path for d in ("sae", "plots") for a in client.list_artifacts(run.info.run_id, d)
    }
    assert {
        "config.yaml",
        "sae/sae.safetensors",
        "sae/cfg.json",
        "plots/density_hist.png",
    } <= artifacts

    tensors = load_file(out / "sae.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "W_enc": (128, 1024),
        "b_enc": (1024,),
        "W_dec": (1024, 128),
        "b_dec": (128,),
    }
    cfg = json.loads((out / "cfg.json").read_text())
    assert (cfg["model"], cfg["layer"], cfg["tokens"]) == ("patchsae-demo-vit", 2, "all")
    assert cfg["step"] == steps
    print(
        f"demo: {elapsed:.0f} s, final FVU {final['quality/fvu']:.4f}, L0 {final['sparsity/l0']:.1f}"
    )


def _losses(run_dir):
    return {key: dict(read_metrics(run_dir)[key]) for key in ("loss/total", "quality/fvu")}


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, demo_shards):
    steps = 40
    extra = {"train.total_tokens": steps * 1024, "tracking.enabled": "false"}
    full = tmp_path / "full"
    run_train(small_overrides(demo_shards, full, **extra))

    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        train_cmd(small_overrides(demo_shards, cut, **extra)),
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        wait_for(lambda: (cut / "checkpoints" / "latest").exists(), 300, "the first checkpoint")
        os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up: a real crash
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killed_at = max(step for step, _ in read_metrics(cut)["loss/total"])
    assert killed_at < steps, "the run finished before it was killed; make it longer"
    latest = (cut / "checkpoints" / "latest").read_text().strip()

    run_train(small_overrides(demo_shards, cut, **extra), resume=True)
    a, b = _losses(full), _losses(cut)
    for key in a:
        assert sorted(b[key]) == list(range(1, steps + 1))
        for step, value in a[key].items():
            assert abs(b[key][step] - value) <= 1e-6 * max(1.0, abs(value)), (key, step)
    wa, wb = load_file(full / "sae.safetensors"), load_file(cut / "sae.safetensors")
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=0, atol=1e-6), name
    print(f"killed after step {killed_at}, resumed from {latest}")


def test_tracking_server_outage_loses_no_metric(tmp_path, demo_shards):
    steps = 120
    server = MlflowServer(tmp_path / "server").start()
    out = tmp_path / "run"
    overrides = small_overrides(
        demo_shards, out, **{"train.total_tokens": steps * 1024, "train.checkpoint_every": 0}
    )
    proc = subprocess.Popen(
        train_cmd(overrides),
        cwd=ROOT,
        env=cli_env(MLFLOW_TRACKING_URI=server.uri),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        logged = lambda: len(read_metrics(out).get("loss/total", []))
        wait_for(lambda: logged() >= 3 and read_run_info(out) is not None, 300, "first metrics")
        server.stop()
        down_at = logged()
        wait_for(lambda: logged() >= down_at + 10 or proc.poll() is not None, 300, "progress")
        assert logged() > down_at, "no step ran while the server was down"
        server.start()
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    server.start()
    try:
        client = MlflowClient(tracking_uri=server.uri)
        run_id = read_run_info(out)["run_id"]
        for key in ("loss/total", "quality/fvu", "sparsity/l0"):
            history = client.get_metric_history(run_id, key)
            assert sorted(m.step for m in history) == list(range(1, steps + 1)), key
        assert client.get_run(run_id).info.status == "FINISHED"
        assert "MLflow" in stderr  # the outage was reported, once, as a warning
    finally:
        server.stop()


def test_checkpoint_files_are_complete_and_atomic(tmp_path, demo_shards):
    out = tmp_path / "run"
    run_train(small_overrides(demo_shards, out, **{"tracking.enabled": "false"}))
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    # keep_checkpoints=2: steps 4 and 8 remain; no temp folder or file is left behind.
    assert ckpts == ["latest", "step_00000004", "step_00000008"]
    final = out / "checkpoints" / "step_00000008"
    assert sorted(p.name for p in final.iterdir()) == [
        "cfg.json",
        "sae.safetensors",
        "state.pt",
        "stream_rank0.pt",
    ]
    exported = load_file(out / "sae.safetensors")
    in_ckpt = load_file(final / "sae.safetensors")
    assert all(torch.equal(exported[k], in_ckpt[k]) for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
