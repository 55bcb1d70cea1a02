"""DeepSpeed ZeRO 1/2/3 on 2 gloo ranks against one process and against DDP.

``tests/strategy_harness.py`` trains the same SAE on the same global batches under each
strategy (rank r takes the r-th half of every batch), with a quarter of the latents silent so
that ghost grads act from step 3 on.

Tolerances, and why:

- Per-step global loss within 1e-4 relative of one process. The strategies sum the same
  gradients in a different order (rounding, about 1e-7 relative per step); Adam then turns the
  rounding of near-zero gradients (silent latents under ghost grads) into steps of up to the
  learning rate, which is what keeps losses from agreeing more tightly. A decoder constraint
  that is skipped or applied per rank shows up at 5e-4 and above.
- Final weights within 1e-2 absolute of one process (they are of order 0.3).
- ZeRO-1 and ZeRO-2 reduce exactly like DDP here: their weights equal DDP's bit for bit.
- Firing statistics (ghost mask sizes, silent-latent counts) equal one process's at every step:
  they are summed over ranks before use.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from patchsae.trainer.config import ConfigError, DistributedConfig
from patchsae.trainer.distributed import deepspeed_config
from patchsae.trainer.tracking import read_metrics, read_run_info
from safetensors.torch import load_file

from tests.helpers import ROOT, python_cmd, run_cli, run_train, small_overrides, train_cmd

HARNESS = ROOT / "tests" / "strategy_harness.py"


def _harness(out: Path, *args: str, nproc: int = 1) -> dict:
    proc = run_cli([*python_cmd(nproc), str(HARNESS), *args, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((out / "record.json").read_text())
    record["tensors"] = load_file(out / "sae.safetensors")
    return record


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    return _harness(tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> dict:
    return _harness(tmp_path_factory.mktemp("ddp"), "--strategy", "ddp", nproc=2)


def _state_bytes(memory: dict) -> int:
    return memory["params"] + memory["master"] + memory["optimizer"]


@pytest.mark.parametrize(
    ("stage", "persist"),
    [(1, 0), (2, 0), (3, 0), (3, 100_000)],
    ids=["zero1", "zero2", "zero3", "zero3-persistent-small-params"],
)
def test_zero_reproduces_single_process(tmp_path, single, ddp, stage, persist):
    args = ["--strategy", "deepspeed", "--stage", str(stage), "--persist", str(persist)]
    zero = _harness(tmp_path, *args, nproc=2)
    assert zero["engine"] == f"zero{stage}" and zero["world_size"] == 2

    ref, got = torch.tensor(single["loss"]), torch.tensor(zero["loss"])
    assert ref[-1] < 0.6 * ref[0]  # it trains
    rel = ((got - ref).abs() / ref.abs()).max().item()
    assert rel < 1e-4, f"loss differs from one process by {rel:.2e} (relative)"
    assert max(single["aux"]) > 0.1  # ghost grads were active ...
    assert zero["ghost"] == single["ghost"] and max(zero["ghost"]) > 0  # ... on global statistics
    assert zero["dead"] == single["dead"]

    for name, want in single["tensors"].items():
        have = zero["tensors"][name]
        assert have.shape == want.shape
        assert torch.allclose(have, want, atol=1e-2), name
    rows = zero["tensors"]["W_dec"].norm(dim=1)
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)  # the constraint held
    if stage < 3:
        for name, want in ddp["tensors"].items():
            assert torch.equal(zero["tensors"][name], want), name

    # Memory: what each rank holds, from the partitioned sizes.
    whole = single["memory"][0]
    for rank_memory in zero["memory"]:
        assert rank_memory["optimizer"] <= whole["optimizer"] / 2 * 1.05  # moments split
        if stage == 3 and not persist:
            assert rank_memory["params"] <= whole["params"] / 2 * 1.05
            assert rank_memory["master"] == 0  # the partition is the fp32 master
            assert _state_bytes(rank_memory) <= _state_bytes(whole) / 2 * 1.05
        elif stage == 3:  # persistent parameters: whole on every rank, beside the partition
            assert rank_memory["params"] == whole["params"] * 3 // 2
        else:  # stages 1-2: parameters stay whole on every rank
            assert rank_memory["params"] == whole["params"]


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "jumprelu"])
def test_every_architecture_under_zero3_matches_ddp(tmp_path, architecture):
    """With a free decoder (the SAELens standard recipe's options): the loss, the weights and,
    for batchtopk, the inference threshold (a buffer, whole on every rank) as under DDP on the
    same 2 ranks; the rows keep their free norms (no unit-norm step is applied to them). DDP,
    not one process, is the reference: AuxK normalises by each rank's residual variance and
    batchtopk selects within each rank's tokens, as in SAELens."""
    args = ["--architecture", architecture, "--free-decoder", "--l1", "0.002"]
    ddp = _harness(tmp_path / "ddp", *args, "--strategy", "ddp", nproc=2)
    zero = _harness(tmp_path / "zero", *args, "--strategy", "deepspeed", "--stage", "3", nproc=2)
    ref, got = torch.tensor(ddp["loss"]), torch.tensor(zero["loss"])
    assert ref[-1] < 0.8 * ref[0]  # it trains
    assert ((got - ref).abs() / ref.abs()).max().item() < 1e-4
    for name, want in ddp["tensors"].items():
        assert torch.allclose(zero["tensors"][name], want, atol=1e-3), name
    rows = zero["tensors"]["W_dec"].norm(dim=1)
    assert not torch.allclose(rows, torch.ones_like(rows), atol=1e-2)  # not normalised
    if architecture == "batchtopk":
        assert zero["tensors"]["threshold"][0] > 0
    if architecture != "jumprelu":  # AuxK trained the latents that started silent
        assert max(ddp["aux"]) > 0 and max(zero["aux"]) > 0


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True], ids=["torch-adam", "deepspeed-cpu-adam"])
def test_zero_with_optimizer_offload_on_one_rank_matches_single_process(tmp_path, single, fused):
    """One process under DeepSpeed (it sets up its own process group) with the optimiser state
    in host memory, stepped by torch's Adam or by DeepSpeed's compiled CPUAdam (built on first
    use, about a minute): the same losses as plain single-process training."""
    args = ["--strategy", "deepspeed", "--stage", "2", "--offload", "--steps", "12"]
    zero = _harness(tmp_path, *args, *(["--fused"] if fused else []))
    assert zero["engine"] == "zero2" and zero["world_size"] == 1
    ref, got = torch.tensor(single["loss"][:12]), torch.tensor(zero["loss"])
    assert ((got - ref).abs() / ref.abs()).max().item() < 1e-4
    assert zero["ghost"] == single["ghost"][:12]


def test_zero3_keeps_the_paper_loss_options(tmp_path):
    """MSE divided by the token norm and L1 weighted by decoder-row norms (which reads whole
    rows of the partitioned decoder): ZeRO-3 on 2 ranks follows one process."""
    ref = _harness(tmp_path / "single", "--paper", "--steps", "15")
    zero = _harness(
        tmp_path / "zero3", "--paper", "--steps", "15", "--strategy", "deepspeed", "--stage", "3",
        nproc=2,
    )  # fmt: skip
    a, b = torch.tensor(ref["loss"]), torch.tensor(zero["loss"])
    assert a[-1] < 0.8 * a[0]
    assert ((a - b).abs() / a.abs()).max().item() < 1e-4
    assert zero["ghost"] == ref["ghost"]


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3"])
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path, strategy):
    """A NaN in rank 1's share of step 6: every rank skips that step (the loss check rides on
    the all-reduce of the firing counts), and training goes on as one process does with the
    same NaN batch."""
    args = ["--steps", "12", "--nan-step", "6"]
    ref = _harness(tmp_path / "single", *args)
    if strategy == "ddp":
        extra = ["--strategy", "ddp"]
    else:
        extra = ["--strategy", "deepspeed", "--stage", strategy[-1]]
    got = _harness(tmp_path / strategy, *args, *extra, nproc=2)
    want = [step == 6 for step in range(12)]
    assert ref["skipped"] == want and got["skipped"] == want
    a, b = torch.tensor(ref["loss"]), torch.tensor(got["loss"])
    finite = torch.isfinite(a)
    assert (
        finite.tolist() == [not s for s in want] and torch.isfinite(b).tolist() == finite.tolist()
    )
    assert ((a - b).abs() / a.abs())[finite].max().item() < 1e-4
    for name, tensor in got["tensors"].items():
        assert torch.isfinite(tensor).all(), name
        assert torch.allclose(tensor, ref["tensors"][name], atol=1e-2), name


def test_deepspeed_config_is_generated_from_ours_and_merged_with_the_override(tmp_path):
    override = tmp_path / "ds.yaml"
    override.write_text("zero_optimization:\n  overlap_comm: true\n  sub_group_size: 1000\n")
    cfg = DistributedConfig(
        strategy="deepspeed",
        zero_stage=3,
        offload_optimizer=True,
        reduce_bucket_size=123,
        prefetch_bucket_size=456,
        param_persistence_threshold=7,
        deepspeed_config=str(override),
    )
    ds = deepspeed_config(
        cfg, local_tokens=512, world_size=4, lr=1e-3, betas=(0.9, 0.99), cuda=False
    )
    assert ds["train_batch_size"] == 2048 and ds["train_micro_batch_size_per_gpu"] == 512
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["reduce_bucket_size"] == 123
    assert zero["stage3_prefetch_bucket_size"] == 456
    assert zero["stage3_param_persistence_threshold"] == 7
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["overlap_comm"] is True and zero["sub_group_size"] == 1000  # from the file
    assert "optimizer" not in ds  # torch.optim.Adam is the client optimiser by default
    fused = deepspeed_config(
        DistributedConfig(strategy="deepspeed", zero_stage=1, fused_optimizer=True),
        local_tokens=8,
        world_size=1,
        lr=1e-3,
        betas=(0.9, 0.99),
        cuda=True,
    )
    assert fused["optimizer"]["params"]["adam_w_mode"] is False

    broken = tmp_path / "broken.json"
    broken.write_text('{"zero_optimization": {"stage": 3,}')
    bad = DistributedConfig(strategy="deepspeed", deepspeed_config=str(broken))
    with pytest.raises(ConfigError, match=r"broken.json is not valid JSON or YAML"):
        deepspeed_config(bad, local_tokens=8, world_size=1, lr=1e-3, betas=(0.9, 0.99), cuda=False)
    broken.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"must hold a mapping of DeepSpeed settings"):
        deepspeed_config(bad, local_tokens=8, world_size=1, lr=1e-3, betas=(0.9, 0.99), cuda=False)
    assert fused["zero_optimization"]["allgather_bucket_size"] == 50_000_000


ZERO3 = {"distributed.strategy": "deepspeed", "distributed.zero_stage": 3}


@pytest.mark.slow
def test_zero3_resumes_exactly_and_exports_the_whole_sae(tmp_path, demo_shards):
    """Through the CLI on 2 ranks: a ZeRO-3 checkpoint resumes to the same run, and the export
    is gathered into the layout (and, within tolerance, the weights) of a DDP run on the same
    token stream."""
    full = tmp_path / "full"
    run_train(small_overrides(demo_shards, full, **ZERO3), nproc=2)
    ckpt = full / "checkpoints" / "step_00000004"
    shards = sorted(p.name for p in (ckpt / "zero").glob("*optim_states.pt"))
    assert len(shards) == 2, shards  # each rank wrote its own partition
    assert (
        json.loads((full / "replicas.json").read_text())[0]
        == json.loads((full / "replicas.json").read_text())[1]
    )

    # One MLflow writer: the run records the engine, and each step once, with finite norms.
    info = read_run_info(full)
    run = MlflowClient(info["tracking_uri"]).get_run(info["run_id"])
    assert run.data.params["distributed/engine"] == "zero3"
    assert run.data.params["distributed.zero_stage"] == "3"
    history = MlflowClient(info["tracking_uri"]).get_metric_history(info["run_id"], "opt/grad_norm")
    assert sorted(m.step for m in history) == list(range(1, 9))
    assert all(0 < m.value < float("inf") for m in history)

    resumed = tmp_path / "resumed"
    run_train(small_overrides(demo_shards, resumed, **ZERO3), nproc=2, resume=str(ckpt))
    a, b = read_metrics(full)["loss/total"], read_metrics(resumed)["loss/total"]
    assert [s for s, _ in a] == list(range(1, 9)) and [s for s, _ in b] == list(range(5, 9))
    for (step, want), (_, have) in zip(a[4:], b, strict=True):
        assert abs(have - want) <= 1e-6 * max(1.0, abs(want)), step
    wa, wb = load_file(full / "sae.safetensors"), load_file(resumed / "sae.safetensors")
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=0, atol=1e-6), name

    ddp = tmp_path / "ddp"
    run_train(small_overrides(demo_shards, ddp, **{"distributed.strategy": "ddp"}), nproc=2)
    wd = load_file(ddp / "sae.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in wa.items()} == {
        k: (v.shape, v.dtype) for k, v in wd.items()
    }
    assert wa["W_enc"].shape == (128, 1024) and wa["W_dec"].shape == (1024, 128)
    for name in wa:
        assert torch.allclose(wa[name], wd[name], atol=1e-3), name
    ca, cd = (json.loads((r / "cfg.json").read_text()) for r in (full, ddp))
    assert ca.keys() == cd.keys() and ca["d_in"] == 128 and ca["step"] == cd["step"] == 8
    assert ca["input_scale"] == cd["input_scale"]

    # A ZeRO checkpoint cannot continue under another strategy: a clear error, no damage.
    proc = run_cli(
        train_cmd(small_overrides(demo_shards, tmp_path / "x"), resume=str(ckpt)), timeout=300
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "distributed.strategy=deepspeed (zero_stage 3)" in proc.stderr
    assert "resume with the same strategy" in proc.stderr
    assert (ckpt / "state.pt").is_file()

    # One rank's truncated partition is caught (by the rank that checks it) before any load.
    damaged = tmp_path / "damaged"
    shutil.copytree(full, damaged)
    shutil.rmtree(damaged / "checkpoints" / "step_00000004")
    newest = damaged / "checkpoints" / "step_00000008"
    shard = sorted((newest / "zero").rglob("*optim_states.pt"))[-1]
    os.truncate(shard, shard.stat().st_size // 2)
    proc = run_cli(
        train_cmd(small_overrides(demo_shards, damaged, **ZERO3), resume=True, nproc=2),
        timeout=300,
    )
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "no intact checkpoint" in proc.stderr and shard.name in proc.stderr
    assert "has" in proc.stderr and "bytes, the manifest" in proc.stderr
