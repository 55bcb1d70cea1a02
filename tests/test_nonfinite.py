"""Non-finite steps: skipped on the device, counted, and a run of them stops training with a
finite checkpoint; nothing non-finite is ever written."""

from __future__ import annotations

import math

import torch
from mlflow.tracking import MlflowClient
from patchsae.trainer import checkpoint
from patchsae.trainer.config import SAEConfig, load_config
from patchsae.trainer.distributed import AdamSchedule, Distributed, LocalEngine
from patchsae.trainer.loop import Trainer, train_step
from patchsae.trainer.metrics import LatentStats
from patchsae.trainer.sae import SparseAutoencoder
from patchsae.trainer.tracking import read_metrics, read_run_info
from safetensors.torch import load_file

from tests.helpers import DEMO, run_cli, small_overrides, train_cmd


def _engine(d: int = 24, f: int = 70) -> tuple[LocalEngine, LatentStats]:
    torch.manual_seed(0)
    sae = SparseAutoencoder(d, f)
    engine = LocalEngine(Distributed(), sae, AdamSchedule(1e-3, (0.9, 0.999), lambda s: 1.0))
    return engine, LatentStats(f, window_tokens=10_000, device="cpu")


def _snapshot(engine: LocalEngine) -> dict[str, torch.Tensor]:
    out = {f"p.{k}": v.detach().clone() for k, v in engine.sae.state_dict().items()}
    for i, state in enumerate(engine.optimizer.state.values()):
        out.update({f"opt{i}.{k}": v.clone() for k, v in state.items()})
    return out


def test_a_non_finite_step_leaves_weights_adam_state_and_counters_untouched():
    engine, stats = _engine()
    cfg = SAEConfig(l1_coeff=1e-3, ghost_grads=True, ghost_window_steps=1)
    for _ in range(3):
        out, skipped = train_step(engine, stats, Distributed(), cfg, 37, torch.randn(37, 24))
        assert not bool(skipped) and math.isfinite(out.loss.item())
    before, silent = _snapshot(engine), stats.steps_since_fired_F.clone()
    x = torch.randn(37, 24)
    x[5, 3] = float("nan")
    out, skipped = train_step(engine, stats, Distributed(), cfg, 37, x)
    assert bool(skipped) and not math.isfinite(out.loss.item())
    after = _snapshot(engine)
    assert before.keys() == after.keys()
    for name, want in before.items():
        assert torch.equal(after[name], want), name  # bit for bit, the Adam step count too
    assert torch.equal(stats.steps_since_fired_F, silent)
    # The next finite step is applied again.
    out, skipped = train_step(engine, stats, Distributed(), cfg, 37, torch.randn(37, 24))
    assert not bool(skipped)
    assert not torch.equal(engine.sae.W_enc, before["p.W_enc"])
    assert int(next(iter(engine.optimizer.state.values()))["step"]) == 4


def test_a_nan_batch_is_skipped_counted_and_training_goes_on(tmp_path, demo_shards):
    out = tmp_path / "run"
    cfg = load_config(DEMO, small_overrides(demo_shards, out))
    trainer = Trainer(cfg)
    real_next, calls = trainer.stream.next_batch, []

    def next_batch(n: int) -> torch.Tensor:
        batch = real_next(n)
        calls.append(n)
        if len(calls) == 3:  # the third training batch
            batch = batch.clone()
            batch[17] = float("nan")
        return batch

    trainer.stream.next_batch = next_batch
    summary = trainer.run()
    assert summary["step"] == 8 and not summary["interrupted"]

    metrics = read_metrics(out)
    loss = dict(metrics["loss/total"])
    assert math.isnan(loss[3])  # log_every=1: step 3's interval had no applied step
    assert all(math.isfinite(v) for s, v in loss.items() if s != 3)
    assert loss[8] < loss[1]
    assert dict(metrics["train/skipped_steps"]) == {s: float(s >= 3) for s in range(1, 9)}
    info = read_run_info(out)
    history = MlflowClient(info["tracking_uri"]).get_metric_history(
        info["run_id"], "train/skipped_steps"
    )
    assert max(m.value for m in history) == 1 and len(history) == 8
    for name, tensor in load_file(out / "sae.safetensors").items():
        assert torch.isfinite(tensor).all(), name


def _nonfinite_files(run_dir) -> list[str]:
    bad = []
    for path in run_dir.rglob("*"):
        if path.suffix == ".safetensors":
            tensors = load_file(path)
        elif path.suffix == ".pt":
            tensors = dict(checkpoint._float_tensors(torch.load(path, weights_only=True)))
        else:
            continue
        bad += [f"{path}:{k}" for k, v in tensors.items() if not torch.isfinite(v).all()]
    return bad


def test_a_run_of_non_finite_steps_stops_with_a_finite_resumable_checkpoint(tmp_path, demo_shards):
    out = tmp_path / "run"
    # Diverges within its first steps, before the first periodic checkpoint (step 8).
    changes = {"train.lr": 1e4, "train.max_skipped_steps": 3, "train.checkpoint_every": 8}
    sets = small_overrides(demo_shards, out, **changes) + ["train.total_tokens=20480"]
    proc = run_cli(train_cmd(sets), timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("patchsae: error: training stopped at step")
    assert "train.lr=10000" in error and "learning rate is the likely cause" in error
    assert "no checkpoint precedes step" in error  # diverged before the first checkpoint
    assert "Traceback" not in proc.stderr
    assert not (out / "sae.safetensors").exists()  # no export of a diverged run

    (ckpt,) = checkpoint.candidates(out)
    assert str(ckpt) in error and checkpoint.verify(ckpt) == []
    assert _nonfinite_files(out) == []
    skipped = dict(read_metrics(out)["train/skipped_steps"])
    assert skipped[max(skipped)] >= 3

    # Resumable, and the resumed run takes the new learning rate (warm-up is over).
    step = int(ckpt.name.split("_")[-1])
    resumed = run_cli(train_cmd([*sets, "train.lr=1e-4"], resume=str(ckpt)), timeout=300)
    assert f"resumed from {ckpt} at step {step}" in resumed.stderr, resumed.stderr[-3000:]
    lr = dict(read_metrics(out)["opt/lr"])
    assert lr[step + 1] == 1e-4
    assert _nonfinite_files(out) == []
