"""End to end through the real CLI: the demo, exact resume, a tracking-server outage."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import tarfile
import time

import pytest
import torch
from mlflow.tracking import MlflowClient
from patchsae.data.demo import make_demo_data
from patchsae.trainer.tracking import read_metrics, read_run_info
from safetensors.torch import load_file

from tests.helpers import run_train, small_overrides, start_train
from tests.mlflow_server import MlflowServer

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


@pytest.mark.slow
def test_demo_recipe_trains_to_target_and_logs_everything(tmp_path, demo_clip, demo_adapted_clip):
    """The README's demo, as `make train` runs it: 2,000 generated images, the demo CLIP, the
    full recipe."""
    shards = make_demo_data(tmp_path / "demo-data")
    out = tmp_path / "demo"
    start = time.monotonic()
    # A hard ceiling, not a benchmark: the demo SAE must fit in 5 minutes on 2 cores.
    clip, record = demo_clip
    run_train(
        [f"data.urls={shards}", f"train.out_dir={out}", f"model.pretrained={clip}",
         f"eval.data={record['heldout']}"], timeout=300,
    )  # fmt: skip
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
    assert run.data.params["kernels/path"] == "cpu"

    # The demo's operating point (README): sparse and few dense latents, at the FVU that
    # sparsity allows on this model.
    final = run.data.metrics
    assert final["sparsity/l0"] <= 0.05 * 2048, final
    assert final["sparsity/dense_frac"] <= 0.05, final
    assert final["quality/fvu"] < 0.35, final
    assert 0 <= final["sparsity/dead_frac"] < 0.1

    # What the SAE costs the CLIP, measured while it trains (eval.every = 100).
    for key in ("eval/zeroshot_acc", "eval/zeroshot_acc_spliced"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [100, 200, 300, steps], key
    assert final["eval/zeroshot_acc"] == pytest.approx(record["zeroshot_accuracy"])
    assert final["eval/zeroshot_acc_spliced"] >= final["eval/zeroshot_acc"] - 0.05, final
    # MLflow's own system metrics (the UI's System metrics tab), sampled every 10 s.
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert len(cpu) >= 3 and "system/system_memory_usage_megabytes" in final

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
        "W_enc": (128, 2048),
        "b_enc": (2048,),
        "W_dec": (2048, 128),
        "b_dec": (128,),
    }
    cfg = json.loads((out / "cfg.json").read_text())
    assert (cfg["model"], cfg["layer"], cfg["tokens"]) == ("patchsae-demo-vit", 2, "all")
    assert cfg["step"] == steps
    print(
        f"demo: {elapsed:.0f} s, final FVU {final['quality/fvu']:.4f}, L0 {final['sparsity/l0']:.1f}"
    )
    _demo_latents_are_concepts(out, shards)
    _demo_latents_segment_objects(out, shards, demo_clip[1]["heldout"])
    _demo_class_latents_carry_their_class(out, shards, demo_clip[1]["heldout"])
    _demo_adapted_model_remaps_class_latents(out, demo_adapted_clip)


def _demo_adapted_model_remaps_class_latents(run_dir, adapted_clip) -> None:
    """The base and the adapted demo CLIP under the demo SAE, on sketches, as `make train` runs
    it: the adapted model names held-out sketches far better; every class's shared, gained and
    lost latents are written; zeroing the base model's class latents in the adapted model costs
    it far more than zeroing random ones (its classes still run on the base's concepts)."""
    import csv

    from tests.helpers import python_cmd, run_cli

    weights, record, sketch, heldout = adapted_clip
    cli = [*python_cmd(1), "-m", "patchsae.launchers.cli"]
    for out, extra in (
        ("analysis-sketch", []),
        ("analysis-sketch-adapted", ["--pretrained", str(weights)]),
    ):
        proc = run_cli([*cli, "analyze", str(run_dir), "--data", str(sketch), "--out",
                        str(run_dir / out), *extra], timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(
        [*cli, "compare", str(run_dir), "--base", str(run_dir / "analysis-sketch"), "--adapted",
         str(run_dir / "analysis-sketch-adapted"), "--data", str(heldout), "--k", "10", "50",
         "all"], timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run_dir / "compare" / "compare.json").read_text())
    acc = result["accuracy"]
    print(
        f"demo adaptation: sketches zero-shot base {acc['base']['clip']:.3f} -> adapted "
        f"{acc['adapted']['clip']:.3f} (fine-tuning record {record['init_zeroshot_accuracy']:.3f} "
        f"-> {record['zeroshot_accuracy']:.3f}); top-10 per class {result['totals']}, mean "
        f"overlap {result['mean_overlap']:.2f}"
    )
    assert acc["adapted"]["clip"] >= acc["base"]["clip"] + 0.3, acc
    assert acc["adapted"]["clip"] == pytest.approx(record["zeroshot_accuracy"])
    with open(run_dir / "compare" / "classes.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["class"] for r in rows} == set(result["classes"]) and len(result["classes"]) == 8
    for group in result["per_class"]:
        assert len(group["shared"]) + len(group["lost"]) == 10  # every class has 10 active
        assert len(group["shared"]) + len(group["gained"]) == 10
    off = {(r["model"], r["selection"], r["k"]): r["accuracy"] for r in result["masking"]
           if r["mode"] == "off"}  # fmt: skip
    drop = off[("adapted", "random", 50)] - off[("adapted", "base-class", 50)]
    print(f"demo adaptation: adapted model, top-50 off: base-class latents cost {drop:.3f} more "
          "than random ones")  # fmt: skip
    assert drop >= 0.3, off


def _demo_class_latents_carry_their_class(run_dir, shards, heldout) -> None:
    """Class-level masking on the held-out images, latents chosen on the SAE's training images
    (no image in both, by shard and key): zeroing a class's own top-50 latents costs that class
    far more accuracy than zeroing 50 random or 50 dataset-level latents; keeping all latents is
    the plain splice."""
    from patchsae.data.shards import expand_urls, iter_samples

    from tests.helpers import python_cmd, run_cli

    def keys(urls):
        return {(url, s["__key__"]) for url in expand_urls(str(urls)) for s in iter_samples(url)}

    assert not keys(shards) & keys(heldout)
    out = run_dir / "masking"
    proc = run_cli(
        [*python_cmd(1), "-m", "patchsae.launchers.cli", "eval-masking", str(run_dir), "--data",
         str(heldout), "--k", "10", "50", "all", "--out", str(out)], timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "masking.json").read_text())
    rows = {(r["selection"], r["mode"], r["k"]): r for r in result["rows"]}
    off = {
        s: torch.tensor(rows[(s, "off", 50)]["per_class"]) for s in ("class", "random", "dataset")
    }
    gap_random = float((off["random"] - off["class"]).mean())
    gap_dataset = float((off["dataset"] - off["class"]).mean())
    print(
        f"demo masking, top-50 off: class {off['class'].mean():.3f}, random "
        f"{off['random'].mean():.3f}, dataset {off['dataset'].mean():.3f} (spliced "
        f"{result['spliced_accuracy']:.3f})"
    )
    assert gap_random >= 0.4 and gap_dataset >= 0.4, (gap_random, gap_dataset)
    assert rows[("class", "on", 2048)]["accuracy"] == result["spliced_accuracy"]


def _demo_latents_segment_objects(run_dir, shards, heldout) -> None:
    """Each class's best object latent, chosen (latent and threshold) on the SAE's training
    images, draws a mask that overlaps the true object masks of held-out images with a pixel
    IoU of at least 0.5 averaged over the classes."""
    from patchsae.analysis.masks import MaskMaker
    from patchsae.analysis.model import load_trained
    from patchsae.analysis.segmentation import (
        object_latents,
        score_segmentation,
        segmentation_samples,
    )

    maker = MaskMaker(load_trained(run_dir))
    chosen = object_latents(score_segmentation(maker, segmentation_samples(str(shards)), 8))
    held = score_segmentation(maker, segmentation_samples(str(heldout)), 8).iou_of(chosen)
    assert [o.label for o in held] == list(range(8))
    mean_iou = sum(o.iou for o in held) / len(held)
    print(
        "demo masks: held-out IoU per class "
        + " ".join(f"{o.iou:.2f}" for o in held)
        + f", mean {mean_iou:.3f}"
    )
    assert mean_iou >= 0.5, held


def _demo_latents_are_concepts(run_dir, shards) -> None:
    """`patchsae analyze` on the demo SAE finds the generator's ground truth: for every class a
    latent whose 10 reference images are all of that class, and latents that live on the
    background (by the true object masks) and are not tied to one class."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from tests.helpers import python_cmd, run_cli

    analysis = run_dir / "analysis"
    proc = run_cli(
        [*python_cmd(1), "-m", "patchsae.launchers.cli", "analyze", str(run_dir), "--data",
         str(shards)], timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    refs = pd.read_parquet(analysis / "reference_images.parquet")
    table = pd.read_parquet(analysis / "latents.parquet")
    per_latent = refs.groupby("latent").agg(n=("label", "size"), classes=("label", "nunique"))
    pure = per_latent[(per_latent.n == 10) & (per_latent.classes == 1)].index
    pure_class = refs[refs.latent.isin(pure)].groupby("latent").label.first()
    # Every class has a latent whose 10 reference images are (nearly) all of it. The demo CLIP
    # is retrained per machine and varies a little between trainings: in most runs each class
    # has a latent with all 10, in some one class's best has 9 of 10.
    majority = refs.groupby("latent").label.agg(lambda labels: labels.value_counts().iloc[0])
    top_class = refs.groupby("latent").label.agg(lambda labels: labels.value_counts().index[0])
    best = majority[per_latent.n == 10].groupby(top_class).max()
    assert sorted(best.index) == list(range(8)) and (best >= 9).all(), best
    assert len(pure) >= 32 and pure_class.nunique() >= 6, pure_class.value_counts()
    assert (table.loc[pure, "entropy"] == 0).all()

    # Share of each latent's patch activation that falls on background patches.
    from patchsae.analysis.masks import MaskMaker
    from patchsae.analysis.model import load_trained

    maker = MaskMaker(load_trained(run_dir))
    background = torch.zeros(len(table), dtype=torch.float64)
    total = torch.zeros(len(table), dtype=torch.float64)
    for tar_path in sorted(shards.glob("*.tar")):
        grouped: dict[str, dict] = {}
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                grouped.setdefault(key, {})[ext] = tar.extractfile(member).read()
        samples = list(grouped.values())
        codes = maker.codes([Image.open(io.BytesIO(s["png"])) for s in samples])[:, 1:]
        h, w = maker.grid
        masks = []
        for s in samples:
            mask = np.asarray(Image.open(io.BytesIO(s["mask.png"]))) > 127
            ph, pw = mask.shape[0] // h, mask.shape[1] // w
            masks.append(mask.reshape(h, ph, w, pw).mean(axis=(1, 3)).reshape(-1) < 0.5)
        off_object = torch.tensor(np.stack(masks))[:, :, None]
        background += (codes * off_object).sum((0, 1)).double()
        total += codes.sum((0, 1)).double()
    table["background_share"] = (background / total.clamp_min(1e-12)).numpy()
    on_background = table[(table.background_share >= 0.9) & (table.frequency >= 0.1)]
    mixed = on_background[on_background.entropy >= 1.0]  # ln 8 = 2.08 is uniform over classes
    assert len(mixed) >= 3, on_background[["frequency", "entropy", "background_share"]]
    print(
        f"demo analysis: {len(pure)} single-class latents covering {pure_class.nunique()} of "
        f"the 8 classes (each class's best: {best.tolist()} of 10); "
        f"{len(on_background)} background latents, {len(mixed)} of them with label entropy >= 1"
    )


def _losses(run_dir):
    return {key: dict(read_metrics(run_dir)[key]) for key in ("loss/total", "quality/fvu")}


RESUME_STEPS = 40
RESUME_EXTRA = {"train.total_tokens": RESUME_STEPS * 1024, "tracking.enabled": "false"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, demo_shards):
    """The reference: the resume tests' run, start to end without a break."""
    full = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_train(small_overrides(demo_shards, full, **RESUME_EXTRA))
    return full


def _assert_same_run(full, resumed) -> None:
    a, b = _losses(full), _losses(resumed)
    for key in a:
        assert sorted(b[key]) == list(range(1, RESUME_STEPS + 1))
        for step, value in a[key].items():
            assert abs(b[key][step] - value) <= 1e-6 * max(1.0, abs(value)), (key, step)
    wa, wb = load_file(full / "sae.safetensors"), load_file(resumed / "sae.safetensors")
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=0, atol=1e-6), name


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, demo_shards, uninterrupted):
    steps, extra = RESUME_STEPS, RESUME_EXTRA
    cut = tmp_path / "cut"
    proc = start_train(small_overrides(demo_shards, cut, **extra), start_new_session=True)
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
    _assert_same_run(uninterrupted, cut)
    print(f"killed after step {killed_at}, resumed from {latest}")


def test_stop_signal_checkpoints_and_resume_repeats_no_step(tmp_path, demo_shards, uninterrupted):
    """SIGUSR1 (Slurm's warning before the time limit): checkpoint at the next log step, exit 0;
    the resumed run neither loses nor repeats a step."""
    out = tmp_path / "run"
    proc = start_train(small_overrides(demo_shards, out, **RESUME_EXTRA))
    try:
        wait_for(lambda: len(read_metrics(out).get("loss/total", [])) >= 2, 300, "two steps")
        proc.send_signal(signal.SIGUSR1)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    stopped_at = max(step for step, _ in read_metrics(out)["loss/total"])
    assert stopped_at < RESUME_STEPS
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{stopped_at:08d}"
    assert not (out / "sae.safetensors").exists()  # not finished: no final export yet

    # A requeued job resumes through if-present.
    run_train(small_overrides(demo_shards, out, **RESUME_EXTRA), resume="if-present")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines] == list(range(1, RESUME_STEPS + 1))
    _assert_same_run(uninterrupted, out)


def test_corrupt_samples_are_skipped_and_reported(tmp_path, demo_shards):
    shards = tmp_path / "shards"
    shutil.copytree(demo_shards, shards)
    first = sorted(shards.glob("*.tar"))[0]
    data = first.read_bytes()
    (shards / "zz-truncated.tar").write_bytes(data[: len(data) // 2])
    with tarfile.open(shards / "zz-corrupt.tar", "w") as tar:
        for name, payload in [("bad0.png", b"not a png at all"), ("bad0.cls", b"3")]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    out = tmp_path / "run"
    # ~1.5 epochs over the 240 + 20 readable images: every shard is read at least once.
    run_train(small_overrides(shards, out, **{"train.total_tokens": 20 * 1024}))
    skipped = read_metrics(out)["data/skipped"]
    # Epoch 1: the corrupt image, and the truncated shard's cut-off sample.
    assert skipped[-1][1] >= 2
    info = read_run_info(out)
    history = MlflowClient(info["tracking_uri"]).get_metric_history(info["run_id"], "data/skipped")
    assert max(m.value for m in history) == skipped[-1][1]


def test_too_many_bad_samples_stop_the_run_naming_the_shards(tmp_path, demo_shards):
    """data.max_bad_fraction: with 4 of 6 shards undecodable (160 of 240 samples), the run
    stops with exit 2, a message naming the worst shards and the setting, and no export; with
    the setting raised above that share it trains through them."""
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, shard in enumerate(sorted(demo_shards.glob("*.tar"))):
        if i < 2:
            shutil.copy(shard, shards / shard.name)
            continue
        with tarfile.open(shards / shard.name, "w") as tar:
            for k in range(40):
                for ext, payload in (("png", b"not a png"), ("cls", b"1")):
                    info = tarfile.TarInfo(f"bad{k:03d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    out = tmp_path / "run"
    from tests.helpers import run_cli, train_cmd

    proc = run_cli(train_cmd(small_overrides(shards, out, **{"data.shuffle_buffer": 0})))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "more than data.max_bad_fraction = 0.5" in proc.stderr
    assert "shard-00000" in proc.stderr.split("most failures in")[1]
    assert "Traceback" not in proc.stderr and not (out / "sae.safetensors").exists()

    run_train(small_overrides(shards, tmp_path / "run2", **{"data.max_bad_fraction": 0.9}))
    assert (tmp_path / "run2" / "sae.safetensors").is_file()


def test_tracking_server_outage_loses_no_metric(tmp_path, demo_shards):
    steps = 120
    server = MlflowServer(tmp_path / "server").start()
    out = tmp_path / "run"
    overrides = small_overrides(
        demo_shards, out, **{"train.total_tokens": steps * 1024, "train.checkpoint_every": 0}
    )
    proc = start_train(overrides, env={"MLFLOW_TRACKING_URI": server.uri})
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
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert "MLflow" in stderr  # the outage was reported, once, as a warning
        # The params and the artifacts reached the run as well (the export after the outage).
        assert run.data.params["train.total_tokens"] == str(steps * 1024)
        assert run.data.params["kernels/path"] == "cpu"
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        artifacts |= {a.path for a in client.list_artifacts(run_id, "sae")}
        assert {"config.yaml", "sae/sae.safetensors", "sae/cfg.json"} <= artifacts
    finally:
        server.stop()


def test_checkpoint_files_are_complete_and_atomic(tmp_path, demo_shards):
    out = tmp_path / "run"
    # if-present on an empty run directory starts a new run (what a first Slurm job does).
    proc = run_train(
        small_overrides(demo_shards, out, **{"tracking.enabled": "false"}), resume="if-present"
    )
    assert "starting a new run" in proc.stderr
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    # keep_checkpoints=2: steps 4 and 8 remain; no temp folder or file is left behind.
    assert ckpts == ["latest", "step_00000004", "step_00000008"]
    final = out / "checkpoints" / "step_00000008"
    assert sorted(p.name for p in final.iterdir()) == [
        "cfg.json",
        "manifest.json",
        "sae.safetensors",
        "sae_weights.safetensors",  # the same file, under the name SAELens loads
        "state.pt",
        "stream_rank0.pt",
    ]
    exported = load_file(out / "sae.safetensors")
    in_ckpt = load_file(final / "sae.safetensors")
    assert all(torch.equal(exported[k], in_ckpt[k]) for k in ("W_enc", "b_enc", "W_dec", "b_dec"))


def test_triton_path_is_recorded_in_mlflow(tmp_path, demo_shards):
    """PATCHSAE_KERNELS=triton (Triton's interpreter on CPU: tiny sizes) runs the fused kernels
    and MLflow records the path and the share of sparse steps."""
    out = tmp_path / "run"
    small = {
        "sae.n_latents": 64,
        "sae.expansion": None,
        "train.batch_tokens": 128,
        "train.total_tokens": 2 * 128,
        "data.mix_buffer_tokens": 1024,
        "sae.init_sample_tokens": 256,
        "train.checkpoint_every": 0,
    }
    env = {"PATCHSAE_KERNELS": "triton", "TRITON_INTERPRET": "1", "PATCHSAE_SPARSE_THRESHOLD": "1"}
    run_train(small_overrides(demo_shards, out, **small), env=env)
    info = read_run_info(out)
    run = MlflowClient(info["tracking_uri"]).get_run(info["run_id"])
    assert run.data.params["kernels/path"] == "triton"
    # Threshold 1: every batch is sparse enough for the sparse path.
    assert [v for _, v in read_metrics(out)["perf/sparse_step_frac"]] == [1.0, 1.0]
    assert run.data.metrics["perf/sparse_step_frac"] == 1.0
