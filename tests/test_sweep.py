"""Many SAEs in one pass: a sweep of 4 equals 4 separate runs on the same batches, resumes from
the newest step every member reached, and is one MLflow parent run with 4 children."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from patchsae.trainer.config import ConfigError, load_config
from patchsae.trainer.tracking import read_metrics
from safetensors.torch import load_file

from tests.helpers import DEMO, python_cmd, run_cli, run_train, small_overrides

SWEEP = [
    {"sae.l1_coeff": 0.01},
    {"name": "narrow", "sae.expansion": 4},
    {"name": "topk16", "sae.architecture": "topk", "sae.k": 16, "train.lr": 1.0e-3},
    {"name": "slow-lr", "train.lr": 3.0e-4, "sae.l1_coeff": 0.05},
]
NAMES = ["l1_coeff-0.01", "narrow", "topk16", "slow-lr"]
OFF = {"tracking.enabled": "false"}  # the copy of a sweep must not log into the original's store


def sweep_recipe(tmp_path: Path, sweep: list[dict]) -> Path:
    recipe = yaml.safe_load(DEMO.read_text()) | {"sweep": sweep}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def assert_same_losses(a: Path, b: Path) -> None:
    la, lb = dict(read_metrics(a)["loss/total"]), dict(read_metrics(b)["loss/total"])
    assert sorted(la) == sorted(lb) == list(range(1, 9)), (a, b)
    for step, value in la.items():
        assert abs(lb[step] - value) <= 1e-6 * max(1.0, abs(value)), (a.name, step)
    wa, wb = load_file(a / "sae.safetensors"), load_file(b / "sae.safetensors")
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=0, atol=1e-6), (a.name, name)


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory, demo_shards) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("sweep")
    recipe, out = sweep_recipe(tmp, SWEEP), tmp / "sweep"
    run_train(small_overrides(demo_shards, out), config=recipe)
    return recipe, out


def test_four_saes_in_one_pass_equal_four_separate_runs(sweep_run, demo_shards, tmp_path):
    _, out = sweep_run
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and p.name in NAMES) == sorted(NAMES)
    for name, entry in zip(NAMES, SWEEP, strict=True):
        overrides = {k: v for k, v in entry.items() if k != "name"}
        alone = tmp_path / name
        run_train(small_overrides(demo_shards, alone, **overrides))
        assert_same_losses(alone, out / name)
    assert (out / "narrow" / "sae.safetensors").is_file()
    assert load_file(out / "narrow" / "sae.safetensors")["W_enc"].shape == (128, 512)
    table = (out / "sweep.csv").read_text().splitlines()
    assert table[0].startswith("name,status,architecture") and len(table) == 5
    assert (out / "pareto.png").stat().st_size > 10_000


def test_one_mlflow_parent_with_four_children(sweep_run):
    _, out = sweep_run
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "patchsae-demo"]
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_name == "sweep"
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(NAMES)
    for child in children:
        assert child.info.status == "FINISHED"
        assert len(client.get_metric_history(child.info.run_id, "loss/total")) == 8
    assert parent.data.params["sweep/members"] == ",".join(NAMES)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert artifacts == {"sweep/sweep.csv", "sweep/sweep.md", "sweep/pareto.png"}


def test_a_sweep_stopped_mid_save_resumes_from_the_step_all_members_reached(
    sweep_run, demo_shards, tmp_path
):
    """As if killed after step 8 while saving: the first member wrote its step-8 checkpoint,
    the others had only step 4. Every member resumes from step 4 and ends as the uninterrupted
    sweep did."""
    recipe, whole = sweep_run
    cut = tmp_path / "sweep"
    shutil.copytree(whole, cut)
    for name in NAMES:
        for done in ("sae.safetensors", "cfg.json"):
            (cut / name / done).unlink()
        if name != NAMES[0]:
            shutil.rmtree(cut / name / "checkpoints" / "step_00000008")
            (cut / name / "checkpoints" / "latest").write_text("step_00000004\n")
    # A fresh start over it is refused; a resume continues it.
    proc = run_cli(
        [*python_cmd(), "-m", "patchsae.launchers.train", "--config", str(recipe)]
        + [a for item in small_overrides(demo_shards, cut, **OFF) for a in ("--set", item)]
    )
    assert proc.returncode == 2 and "already holds a sweep" in proc.stderr
    log = run_train(small_overrides(demo_shards, cut, **OFF), config=recipe, resume=True)
    assert log.stderr.count("resumed from") == 4 and "step_00000004" in log.stderr
    for name in NAMES:
        assert_same_losses(whole / name, cut / name)


@pytest.mark.parametrize(
    "sweep, expected",
    [
        ([{"train.batch_tokens": 2048}], r"sweep\[0\].train.batch_tokens': cannot differ"),
        ([{"sae.init_sample_tokens": 512}], r"cannot differ"),
        ([{"sae.l1_cof": 1e-3}], r"sweep\[0\].sae.l1_cof': unknown key"),
        (
            [{"sae.k": 0, "sae.architecture": "topk"}],
            r"sweep\[0\] \(architecture-topk_k-0\).*'sae.k': must be > 0",
        ),
        ([{"name": "a"}, {"name": "a", "sae.k": 8}], r"'a' names two members"),
        ([{"name": "a/b"}], r"is not a folder name"),
        ({"sae.k": 8}, r"'sweep': expected a list of mappings"),
    ],
)
def test_bad_sweeps_are_refused_before_any_data_is_read(tmp_path, sweep, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(sweep_recipe(tmp_path, sweep), ["model.pretrained=null"])


@pytest.mark.slow
def test_a_sweep_under_zero3_equals_separate_zero3_runs(tmp_path, demo_shards):
    """On 2 ranks under DeepSpeed ZeRO-3 each member is its own engine, with its own
    partitions and checkpoint shards; each equals a ZeRO-3 run of its own config on the same
    batches, and a sweep stopped after step 4 resumes to the same end."""
    zero3 = {"distributed.strategy": "deepspeed", "distributed.zero_stage": 3}
    sweep = [SWEEP[0], SWEEP[2]]
    out = tmp_path / "sweep"
    run_train(
        small_overrides(demo_shards, out, **zero3), config=sweep_recipe(tmp_path, sweep), nproc=2
    )
    for name, entry in zip((NAMES[0], NAMES[2]), sweep, strict=True):
        shards = sorted((out / name / "checkpoints" / "step_00000004" / "zero").glob("*optim*"))
        assert len(shards) == 2, (name, shards)  # each rank wrote its partition of this member
        overrides = {k: v for k, v in entry.items() if k != "name"}
        alone = tmp_path / name
        run_train(small_overrides(demo_shards, alone, **zero3, **overrides), nproc=2)
        assert_same_losses(alone, out / name)
    # Stopped after step 4: every member reloads its own ZeRO shards and ends the same.
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    for name in (NAMES[0], NAMES[2]):
        for done in ("sae.safetensors", "cfg.json"):
            (cut / name / done).unlink()
        shutil.rmtree(cut / name / "checkpoints" / "step_00000008")
        (cut / name / "checkpoints" / "latest").write_text("step_00000004\n")
    overrides = small_overrides(demo_shards, cut, **zero3, **OFF)
    log = run_train(overrides, config=sweep_recipe(tmp_path, sweep), nproc=2, resume=True)
    assert log.stderr.count("resumed from") == 2 and "step_00000004" in log.stderr
    for name in (NAMES[0], NAMES[2]):
        assert_same_losses(out / name, cut / name)
