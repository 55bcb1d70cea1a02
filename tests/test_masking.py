"""Class-level top-k masking: against brute force, disjoint splits, outputs, bad input."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from patchsae.analysis.masking import SELECTIONS, ranked_latents
from patchsae.analysis.model import load_trained
from patchsae.analysis.zeroshot import SplicedCLIP, labelled_batches, templates_for
from patchsae.trainer.tracking import read_run_info
from safetensors.torch import load_file

from tests.helpers import python_cmd, run_cli, run_train, small_overrides

SELECT = "shard-00000{0..2}.tar"
EVALUATE = "shard-00000{3..5}.tar"


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, demo_shards):
    """A briefly trained SAE (random CLIP weights) analysed on the first 3 shards."""
    run = tmp_path_factory.mktemp("masking") / "run"
    run_train(small_overrides(demo_shards, run))
    proc = run_cli(
        [*python_cmd(1), "-m", "patchsae.launchers.cli", "analyze", str(run), "--data",
         f"{demo_shards}/{SELECT}", "--no-mlflow"]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def _masking(run, data, out, *extra):
    return run_cli(
        [*python_cmd(1), "-m", "patchsae.launchers.cli", "eval-masking", str(run), "--data",
         str(data), "--out", str(out), "--templates", "demo", *extra]
    )  # fmt: skip


def test_sweep_matches_brute_force_and_is_logged(analysed, demo_shards, tmp_path):
    out = tmp_path / "eval"
    proc = _masking(analysed, f"{demo_shards}/{EVALUATE}", out, "--k", "3", "20", "all")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "masking.json").read_text())
    assert result["images"] == 120
    with open(out / "masking.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["selection"], r["mode"], r["k"]) for r in rows] == [
        (s, m, k) for s in SELECTIONS for m in ("on", "off") for k in ("3", "20", "1024")
    ]
    assert (out / "masking.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Brute force: the SAE spliced in by a forward hook, codes masked by each image's class.
    sae = load_trained(analysed)
    clip = SplicedCLIP.load(sae)
    text = clip.classifier(result["classes"], templates_for("demo", sae.model.name))
    stats = load_file(analysed / "analysis" / "latent_stats.safetensors")
    order = ranked_latents(stats["class_counts_CF"], stats["dataset_counts_F"], seed=0)
    t = clip.tensors
    block = clip.visual.transformer.resblocks[clip.source.layer]
    by_key = {(r["selection"], r["mode"], r["k"]): r["accuracy"] for r in result["rows"]}
    for row, line in zip(result["rows"], rows, strict=True):
        assert float(line["accuracy"]) == pytest.approx(row["accuracy"], abs=1e-6)
    for selection, mode, k in [("class", "on", 3), ("class", "off", 20), ("random", "on", 20),
                               ("dataset", "off", 3), ("class", "on", 1024)]:  # fmt: skip
        correct = 0
        for pixels, labels, _ in labelled_batches(f"{demo_shards}/{EVALUATE}", clip.preprocess, 40):
            keep = torch.zeros(len(labels), t["W_enc"].shape[1])
            for i, label in enumerate(labels.tolist()):
                keep[i, order[selection][label, :k]] = 1.0
            if mode == "off":
                keep = 1 - keep

            def hook(module, args, output, keep=keep):
                codes = ((output - t["b_dec"]) @ t["W_enc"] + t["b_enc"]).relu()
                return (codes * keep[:, None, :]) @ t["W_dec"] + t["b_dec"]

            handle = block.register_forward_hook(hook)
            try:
                with torch.no_grad():
                    logits = F.normalize(clip.model.encode_image(pixels), dim=-1) @ text.T
            finally:
                handle.remove()
            correct += int((logits.argmax(-1) == labels).sum())
        assert by_key[(selection, mode, k)] == pytest.approx(correct / 120), (selection, mode, k)
    # "on" with every latent is the plain splice.
    assert by_key[("class", "on", 1024)] == pytest.approx(result["spliced_accuracy"])

    info = read_run_info(analysed)
    history = MlflowClient(info["tracking_uri"]).get_metric_history(
        info["run_id"], "masking/class_off_acc"
    )
    assert sorted(m.step for m in history) == [3, 20, 1024]


def test_random_baseline_is_seeded_and_class_order_follows_counts():
    counts = torch.tensor([[5, 9, 9, 0], [1, 0, 2, 7]])
    order = ranked_latents(counts, counts.sum(0), seed=3)
    assert order["class"].tolist() == [[1, 2, 0, 3], [3, 2, 0, 1]]  # ties: smaller index first
    assert order["dataset"].tolist() == [[2, 1, 3, 0]] * 2  # sums 6, 9, 11, 7
    again = ranked_latents(counts, counts.sum(0), seed=3)["random"]
    assert torch.equal(order["random"], again)
    assert sorted(order["random"][0].tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("data", "extra", "match"),
    [
        (SELECT, [], "shares 3 shard(s) with the selection split"),
        ("shard-00000{2..4}.tar", [], "shares 1 shard(s) with the selection split"),
        (EVALUATE, ["--k", "5000"], "--k 5000 is out of range: the SAE has 1024 latents"),
        (EVALUATE, ["--k", "ten"], "give whole numbers or 'all'"),
        (EVALUATE, ["--analysis", "NOWHERE"], "holds no analysis"),
    ],
)
def test_bad_input_is_named_with_exit_2(analysed, demo_shards, tmp_path, data, extra, match):
    extra = [str(tmp_path / "nowhere") if a == "NOWHERE" else a for a in extra]
    out = tmp_path / "eval"
    proc = _masking(analysed, f"{demo_shards}/{data}", out, "--no-mlflow", *extra)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert match in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_images_the_analysis_read_are_refused_in_any_shard(analysed, demo_shards, tmp_path):
    """The analysis keeps a digest of every image it read; an evaluation split holding one of
    them, here in a renamed copy of a selection shard mixed with held-out ones, is refused
    (exit 2, nothing written) although it shares no shard path with the selection."""
    import shutil

    from patchsae.analysis.outputs import read_digests
    from patchsae.data.shards import expand_urls, image_digest, iter_samples

    digests = read_digests(analysed / "analysis")
    want = {image_digest(s) for url in expand_urls(f"{demo_shards}/{SELECT}")
            for s in iter_samples(url)}  # fmt: skip
    assert digests is not None and set(digests.tolist()) == want and len(want) == 120
    assert torch.equal(digests, torch.sort(digests).values)

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(demo_shards / "shard-000004.tar", mixed / "a-heldout.tar")
    shutil.copy(demo_shards / "shard-000001.tar", mixed / "b-copy.tar")
    out = tmp_path / "eval"
    proc = _masking(analysed, mixed, out, "--no-mlflow", "--k", "5")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "b-copy.tar is also an image of the analysis" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
