"""Base vs adapted: per-class latent sets from two analyses, cross-model masking, bad input."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from mlflow.tracking import MlflowClient
from patchsae.analysis.adaptation import class_sets, top_latents
from patchsae.analysis.model import load_sae_clip, load_trained
from patchsae.analysis.zeroshot import SplicedCLIP, labelled_batches, templates_for
from patchsae.trainer.tracking import read_run_info
from safetensors.torch import load_file, save_file

from tests.helpers import (
    python_cmd,
    run_cli,
    run_train,
    save_other_architecture_clip,
    small_overrides,
)

SELECT = "shard-00000{0..2}.tar"
EVALUATE = "shard-00000{3..5}.tar"


def _cli(*args):
    return run_cli([*python_cmd(1), "-m", "patchsae.launchers.cli", *map(str, args)])


def _save_perturbed_clip(sae, path, seed: int, scale: float = 0.05) -> None:
    """The SAE's CLIP with every tensor moved a little: an 'adapted' copy of the same model."""
    model, _ = load_sae_clip(sae)
    gen = torch.Generator().manual_seed(seed)
    state = {
        k: (v + scale * v.std().nan_to_num() * torch.randn(v.shape, generator=gen)).contiguous()
        if v.is_floating_point() and v.numel() > 1 else v.contiguous()
        for k, v in model.state_dict().items()
    }  # fmt: skip
    save_file(state, str(path))


@pytest.fixture(scope="module")
def analyses(tmp_path_factory, demo_shards):
    """A briefly trained SAE (random CLIP weights) analysed on 3 shards under its own CLIP and
    under a perturbed copy of it; returns (run, base analysis, adapted analysis, weights)."""
    root = tmp_path_factory.mktemp("adaptation")
    run = root / "run"
    run_train(small_overrides(demo_shards, run))
    adapted = root / "adapted.safetensors"
    _save_perturbed_clip(load_trained(run), adapted, seed=3)
    base_dir, adapted_dir = root / "analysis-base", root / "analysis-adapted"
    for out, extra in ((base_dir, []), (adapted_dir, ["--pretrained", adapted])):
        proc = _cli("analyze", run, "--data", f"{demo_shards}/{SELECT}", "--out", out,
                    "--no-mlflow", *extra)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    return run, base_dir, adapted_dir, adapted


def test_class_sets_split_each_class_top_latents():
    base = torch.tensor([[5, 4, 3, 0, 0], [0, 0, 1, 2, 3]])
    adapted = torch.tensor([[5, 0, 3, 4, 0], [0, 0, 0, 0, 7]])
    assert top_latents(base, 3) == [[0, 1, 2], [4, 3, 2]]
    assert top_latents(adapted, 3) == [[0, 3, 2], [4]]  # latents never above tau are not top
    assert class_sets(base, adapted, 3) == [
        {"shared": [0, 2], "gained": [3], "lost": [1]},
        {"shared": [4], "gained": [], "lost": [2, 3]},
    ]


def test_compare_writes_sets_accuracies_and_cross_model_masking(analyses, demo_shards, tmp_path):
    run, base_dir, adapted_dir, adapted = analyses
    out = tmp_path / "compare"
    proc = _cli("compare", run, "--base", base_dir, "--adapted", adapted_dir, "--top", "12",
                "--data", f"{demo_shards}/{EVALUATE}", "--k", "4", "all", "--templates", "demo",
                "--out", out)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "compare.json").read_text())
    assert result["adapted"]["weights"] == str(adapted) and result["base"]["weights"] is None

    # The sets, recomputed from the two analyses' class counts.
    counts = {m: load_file(d / "latent_stats.safetensors")["class_counts_CF"]
              for m, d in (("base", base_dir), ("adapted", adapted_dir))}  # fmt: skip
    with open(out / "classes.csv") as f:
        rows = list(csv.DictReader(f))
    names = result["classes"]
    assert len(names) == 8 and len(result["per_class"]) == 8
    for c, name in enumerate(names):
        top_b = set(top_latents(counts["base"], 12)[c])
        top_a = set(top_latents(counts["adapted"], 12)[c])
        mine = {s: {int(r["latent"]) for r in rows if r["class"] == name and r["status"] == s}
                for s in ("shared", "gained", "lost")}  # fmt: skip
        assert mine == {"shared": top_b & top_a, "gained": top_a - top_b, "lost": top_b - top_a}
        assert set(result["per_class"][c]["shared"]) == top_b & top_a
        for r in (r for r in rows if r["class"] == name):
            j = int(r["latent"])
            assert int(r["base_count"]) == int(counts["base"][c, j])
            assert int(r["adapted_count"]) == int(counts["adapted"][c, j])
    assert result["totals"]["shared"] + result["totals"]["lost"] == sum(
        len(t) for t in top_latents(counts["base"], 12)
    )

    # Each model's zero-shot accuracy, against a direct computation with its own weights.
    sae = load_trained(run)
    for model, weights in (("base", None), ("adapted", str(adapted))):
        clip = SplicedCLIP.load(sae, pretrained=weights)
        text = clip.classifier(names, templates_for("demo", sae.model.name))
        correct = total = 0
        for pixels, labels, _ in labelled_batches(f"{demo_shards}/{EVALUATE}", clip.preprocess, 50):
            with torch.no_grad():
                image = torch.nn.functional.normalize(clip.model.encode_image(pixels), dim=-1)
            logits = image @ text.T
            correct += int((logits.argmax(-1) == labels).sum())
            total += len(labels)
        assert result["accuracy"][model]["clip"] == pytest.approx(correct / total)

    # Cross-model masking: each model with each model's class latents and a random baseline;
    # keeping all latents is that model's plain splice.
    with open(out / "masking.csv") as f:
        masking = list(csv.DictReader(f))
    assert {(r["model"], r["selection"], r["mode"], r["k"]) for r in masking} == {
        (m, s, mode, k) for m in ("base", "adapted") for s in ("base-class", "adapted-class",
        "random") for mode in ("on", "off") for k in ("4", "1024")
    }  # fmt: skip
    for r in masking:
        if r["mode"] == "on" and r["k"] == "1024":
            spliced = result["accuracy"][r["model"]]["spliced"]
            assert float(r["accuracy"]) == pytest.approx(spliced, abs=1e-6)  # CSV: 6 decimals
    assert (out / "masking.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Logged to the SAE's MLflow run, beside its other evaluations.
    info = read_run_info(run)
    client = MlflowClient(info["tracking_uri"])
    metrics = client.get_run(info["run_id"]).data.metrics
    assert metrics["compare/mean_overlap"] == pytest.approx(result["mean_overlap"])
    assert metrics["compare/adapted_zeroshot_acc"] == pytest.approx(
        result["accuracy"]["adapted"]["clip"]
    )
    history = client.get_metric_history(info["run_id"], "compare/adapted_base-class_off_acc")
    assert sorted(m.step for m in history) == [4, 1024]
    logged = {a.path for a in client.list_artifacts(info["run_id"], "compare")}
    assert {f"compare/{n}" for n in ("classes.csv", "compare.json", "masking.csv")} <= logged


def test_analyze_refuses_weights_of_another_architecture(analyses, demo_shards, tmp_path):
    """A checkpoint of another open_clip architecture for the adapted model: exit 2, named."""
    from patchsae.data.activations import DEMO_MODEL

    run = analyses[0]
    other = tmp_path / "other.safetensors"
    save_other_architecture_clip(other)
    out = tmp_path / "analysis"
    proc = _cli("analyze", run, "--data", f"{demo_shards}/{SELECT}", "--pretrained", other,
                "--out", out, "--no-mlflow")  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{other} is not a checkpoint of {DEMO_MODEL}" in proc.stderr
    assert "'visual.class_embedding' is [64] there but [128]" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.parametrize(
    ("which", "extra", "match"),
    [
        ("same", [], "both analyses used the same CLIP weights"),
        ("missing", [], "holds no analysis"),
        ("other-data", [], "the two analyses read different images"),
        ("ok", ["--top", "0"], "--top 0: must be >= 1"),
        ("ok", ["--top", "5000"], "--top 5000 is larger than the SAE's 1024 latents"),
        ("ok", ["--data", "SELECT"], "shares 3 shard(s) with the selection split"),
        ("ok", ["--data", "EVALUATE", "--k", "2000"], "--k 2000 is out of range"),
    ],
)
def test_compare_bad_input_is_named_with_exit_2(
    analyses, demo_shards, tmp_path, which, extra, match
):
    run, base_dir, adapted_dir, adapted = analyses
    adapted_arg = {"same": base_dir, "missing": tmp_path / "nowhere"}.get(which, adapted_dir)
    if which == "other-data":
        adapted_arg = tmp_path / "analysis-evaluate"
        proc = _cli("analyze", run, "--data", f"{demo_shards}/{EVALUATE}", "--pretrained", adapted,
                    "--out", adapted_arg, "--no-mlflow")  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
    splits = {"SELECT": SELECT, "EVALUATE": EVALUATE}
    extra = [f"{demo_shards}/{splits[a]}" if a in splits else a for a in extra]
    out = tmp_path / "compare"
    proc = _cli("compare", run, "--base", base_dir, "--adapted", adapted_arg, "--out", out,
                "--no-mlflow", *extra)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert match in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
