"""`patchsae analyze` and masks: against brute force, across ranks, resumed, and on bad input."""

from __future__ import annotations

import io
import json
import math
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import PIL.Image
import pytest
import torch
from mlflow.tracking import MlflowClient
from patchsae.analysis.analyze import AnalyzeOptions, analyze
from patchsae.analysis.model import activation_source, load_trained
from patchsae.analysis.stats import LatentStatistics, image_id, merge_top
from patchsae.trainer.tracking import read_run_info
from safetensors.torch import load_file, save_file

from tests.helpers import python_cmd, run_cli, run_train, small_overrides

K = 10
TAU = 0.2
BATCH = 20  # divides the 40 images of a test shard: every shard is batched the same way


def read_shards(shards: Path) -> list[dict]:
    """Every sample of the folder's shards, in shard order then tar order, in memory."""
    samples = []
    for s, tar_path in enumerate(sorted(shards.glob("*.tar"))):
        grouped: dict[str, dict] = {}
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                grouped.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for pos, (key, sample) in enumerate(grouped.items()):
            samples.append({"key": key, "shard": str(tar_path), "id": image_id(s, pos), **sample})
    return samples


def brute_force_codes(run_dir: Path, samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, T, F]`` float64 codes of every token of every image, and the labels."""
    sae = load_trained(run_dir)
    source, preprocess = activation_source(sae, device=torch.device("cpu"))
    t = sae.tensors
    codes, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # as the analysis processes run (OMP_NUM_THREADS=1)
    try:
        for start in range(0, len(samples), BATCH):
            chunk = samples[start : start + BATCH]
            pixels = torch.stack(
                [preprocess(PIL.Image.open(io.BytesIO(s["png"])).convert("RGB")) for s in chunk]
            )
            acts = source.all_tokens(pixels).double()
            codes.append(((acts - t["b_dec"]) @ t["W_enc"] + t["b_enc"]).relu())
    finally:
        torch.set_num_threads(threads)
    labels = torch.tensor([int(s["cls"]) for s in samples])
    return torch.cat(codes), labels


def brute_force_stats(codes: torch.Tensor, labels: torch.Tensor, ids: list[int]) -> dict:
    N, T, F = codes.shape
    image = codes.mean(dim=1)  # [N, F]
    active = image > 0
    n_active = active.sum(0)
    out = {
        "frequency_F": n_active.double() / N,
        "token_frequency_F": (codes > 0).sum((0, 1)).double() / (N * T),
        "mean_activation_F": torch.where(
            n_active > 0, (image * active).sum(0) / n_active.clamp_min(1), 0.0
        ),
        "class_counts_CF": torch.stack(
            [(codes[labels == c] > TAU).sum((0, 1)) for c in range(int(labels.max()) + 1)]
        ),
        "top": [],
        "entropy_F": [],
    }
    value32 = image.float()
    for j in range(F):
        ranked = sorted(
            (i for i in range(N) if active[i, j]), key=lambda i: (-float(value32[i, j]), ids[i])
        )[:K]
        out["top"].append([(ids[i], float(value32[i, j])) for i in ranked])
        mass: dict[int, float] = {}
        for i in ranked:
            mass[int(labels[i])] = mass.get(int(labels[i]), 0.0) + float(value32[i, j])
        total = sum(mass.values())
        h = (
            -sum(m / total * math.log(m / total) for m in mass.values() if m > 0)
            if ranked
            else math.nan
        )
        out["entropy_F"].append(h)
    return out


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, demo_shards):
    """A briefly trained SAE (1,024 latents, random CLIP weights) with an MLflow run."""
    out = tmp_path_factory.mktemp("analysis") / "run"
    run_train(small_overrides(demo_shards, out))
    return out


@pytest.fixture(scope="module")
def crafted(tmp_path_factory, small_run, demo_shards):
    """``small_run``'s SAE in float64 with latent 0 dead and latent 1 active on 3 images only,
    with its brute-force codes."""
    run = tmp_path_factory.mktemp("crafted") / "run"
    run.mkdir()
    shutil.copy(small_run / "cfg.json", run / "cfg.json")
    tensors = {k: v.double() for k, v in load_file(small_run / "sae.safetensors").items()}
    tensors["b_enc"][0] = -1e6
    save_file(tensors, run / "sae.safetensors")
    samples = read_shards(demo_shards)
    codes, _ = brute_force_codes(run, samples)
    # Shift latent 1's bias so that only the 3 images with its largest token activation keep one.
    peak = codes[:, :, 1].amax(dim=1).sort(descending=True).values
    assert peak[3] > 0, "latent 1 must fire on at least 4 images to be made rare"
    tensors["b_enc"][1] -= float(peak[2] + peak[3]) / 2
    save_file(tensors, run / "sae.safetensors")
    codes, labels = brute_force_codes(run, samples)
    return run, samples, codes, labels


def test_statistics_match_brute_force(crafted, demo_shards, tmp_path):
    run, samples, codes, labels = crafted
    out = analyze(
        run,
        AnalyzeOptions(
            data=str(demo_shards), out=str(tmp_path / "a"), batch_images=BATCH, workers=0,
            mlflow=False, k=K, tau=TAU,
        ),
    )  # fmt: skip
    ids = [s["id"] for s in samples]
    want = brute_force_stats(codes, labels, ids)
    got = load_file(out / "latent_stats.safetensors")
    F = codes.shape[2]
    assert got["frequency_F"].shape == (F,)
    torch.testing.assert_close(got["frequency_F"], want["frequency_F"], rtol=0, atol=0)
    torch.testing.assert_close(got["token_frequency_F"], want["token_frequency_F"], rtol=0, atol=0)
    torch.testing.assert_close(
        got["mean_activation_F"], want["mean_activation_F"], rtol=1e-9, atol=0
    )
    assert torch.equal(got["class_counts_CF"], want["class_counts_CF"])
    assert torch.equal(got["dataset_counts_F"], want["class_counts_CF"].sum(0))
    assert torch.equal(got["class_images_C"], torch.bincount(labels))

    # The dead latent: marked, mean 0 (not NaN), no references; the rare one: 3, no padding.
    assert bool(got["dead_F"][0]) and got["mean_activation_F"][0] == 0
    assert got["n_references_F"][0] == 0 and math.isnan(float(got["entropy_F"][0]))
    assert want["frequency_F"][1] == 3 / len(samples) and got["n_references_F"][1] == 3
    assert not torch.isnan(got["mean_activation_F"]).any()

    refs = pd.read_parquet(out / "reference_images.parquet")
    by_key = {s["id"]: s for s in samples}
    for j in range(F):
        rows = refs[refs.latent == j].sort_values("rank")
        assert [(int(i), v) for i, v in zip(rows.image_id, rows.value, strict=True)] == [
            (i, pytest.approx(v, rel=1e-6)) for i, v in want["top"][j]
        ], j
        for row in rows.itertuples():
            assert (row.key, row.shard) == (
                by_key[row.image_id]["key"],
                by_key[row.image_id]["shard"],
            )
            assert row.label == int(by_key[row.image_id]["cls"])
    np.testing.assert_allclose(got["entropy_F"].numpy(), want["entropy_F"], rtol=1e-6, atol=1e-9)

    table = pd.read_parquet(out / "latents.parquet")
    assert len(table) == F and list(table.latent) == list(range(F))
    np.testing.assert_allclose(table.frequency, want["frequency_F"].numpy())
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["images"] == len(samples) and summary["tokens"] == codes.shape[0] * codes.shape[1]
    )
    assert summary["dead_latents"] == int((want["frequency_F"] == 0).sum())


def test_streaming_merge_is_order_independent():
    """Batches in any order, and split accumulators merged, give the same statistics."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(30, 5, 7, generator=g).relu()
    codes[:, :, 3] = 0  # dead
    codes[1:, :, 5] = 0  # one active image only
    codes[[9, 2, 7], :, 2] = 10.0  # a three-way tie at the top: smaller id first
    labels = torch.randint(0, 4, (30,), generator=g)
    ids = torch.arange(30) * 3
    one = LatentStatistics(7, k=4)
    one.update(codes, labels, ids)
    perm = torch.randperm(30, generator=g)
    a, b = LatentStatistics(7, k=4), LatentStatistics(7, k=4)
    for part in perm[:13].split(4):
        a.update(codes[part], labels[part], ids[part])
    for part in perm[13:].split(5):
        b.update(codes[part], labels[part], ids[part])
    a.merge(b)
    labels_of = {int(i): int(label) for i, label in zip(ids, labels, strict=True)}
    ra, r1 = a.results(labels_of), one.results(labels_of)
    for name, value in r1.items():
        if value.is_floating_point():
            torch.testing.assert_close(ra[name], value, equal_nan=True)
        else:
            assert torch.equal(ra[name], value), name
    assert r1["n_references_F"].tolist() == [4, 4, 4, 0, 4, 1, 4]
    assert r1["top_ids_KF"][:3, 2].tolist() == [6, 21, 27]


def test_merge_top_keeps_unused_slots_last():
    values = torch.full((3, 2), -math.inf)
    ids = torch.full((3, 2), -1)
    v, i = merge_top(values, ids, torch.tensor([[1.0, -math.inf]]), torch.tensor([[5, -1]]), 3)
    assert i[:, 0].tolist() == [5, -1, -1] and i[:, 1].tolist() == [-1, -1, -1]


def _analyze_cmd(run: Path, data: Path, out: Path, *extra: str, nproc: int = 1) -> list[str]:
    return [
        *python_cmd(nproc), "-m", "patchsae.launchers.cli", "analyze", str(run),
        "--data", str(data), "--out", str(out), "--batch-images", str(BATCH),
        "--workers", "1", *extra,
    ]  # fmt: skip


def _same_results(a: Path, b: Path) -> None:
    x, y = load_file(a / "latent_stats.safetensors"), load_file(b / "latent_stats.safetensors")
    assert x.keys() == y.keys()
    for name in x:
        if x[name].is_floating_point():
            torch.testing.assert_close(x[name], y[name], rtol=1e-12, atol=0, equal_nan=True)
        else:
            assert torch.equal(x[name], y[name]), name
    pd.testing.assert_frame_equal(
        pd.read_parquet(a / "reference_images.parquet"),
        pd.read_parquet(b / "reference_images.parquet"),
    )
    # Every analysed image's digest, once, whatever the ranks or interruptions.
    digests = load_file(a / "image_digests.safetensors")["digests"]
    assert torch.equal(digests, load_file(b / "image_digests.safetensors")["digests"])
    assert len(digests) == json.loads((a / "summary.json").read_text())["images"]


@pytest.mark.slow
def test_two_ranks_match_one_and_log_to_mlflow(small_run, demo_shards, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    proc = run_cli(_analyze_cmd(small_run, demo_shards, one))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(_analyze_cmd(small_run, demo_shards, two, "--no-mlflow", nproc=2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_results(one, two)
    assert json.loads((two / "summary.json").read_text())["images"] == 240

    # The 1-process run logged its folder to the SAE's own MLflow run.
    info = read_run_info(small_run)
    client = MlflowClient(info["tracking_uri"])
    logged = {a.path for a in client.list_artifacts(info["run_id"], "analysis/one")}
    assert {
        "analysis/one/latent_stats.safetensors",
        "analysis/one/latents.parquet",
        "analysis/one/reference_images.parquet",
        "analysis/one/summary.json",
    } <= logged


def test_an_interrupted_analysis_resumes(small_run, demo_shards, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    proc = run_cli(_analyze_cmd(small_run, demo_shards, full, "--no-mlflow"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    stop = _analyze_cmd(small_run, demo_shards, resumed, "--no-mlflow", "--max-batches", "5")
    proc = run_cli(stop)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not resumed.exists()  # no results before the pass is complete
    assert (tmp_path / ".resumed.partial" / "rank0.pt").is_file()
    proc = run_cli(_analyze_cmd(small_run, demo_shards, resumed, "--no-mlflow"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming the analysis" in proc.stderr
    _same_results(full, resumed)
    assert not (tmp_path / ".resumed.partial").exists()


def _fails_cleanly(cmd: list[str], match: str, out: Path) -> None:
    proc = run_cli(cmd)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert match in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists(), list(out.iterdir())


def test_bad_input_is_named_with_exit_2(small_run, demo_shards, tmp_path):
    cli = [*python_cmd(1), "-m", "patchsae.launchers.cli"]
    # A run folder without an export (a run that has not finished).
    unfinished = tmp_path / "unfinished"
    shutil.copytree(small_run / "checkpoints", unfinished / "checkpoints")
    out = tmp_path / "out"
    _fails_cleanly(_analyze_cmd(unfinished, demo_shards, out), "has no exported SAE", out)
    # An SAE that reads another width than its CLIP has.
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(small_run / "cfg.json", other / "cfg.json")
    tensors = load_file(small_run / "sae.safetensors")
    save_file(
        {"W_enc": torch.zeros(64, 8), "b_enc": torch.zeros(8), "W_dec": torch.zeros(8, 64),
         "b_dec": torch.zeros(64)},
        other / "sae.safetensors",
    )  # fmt: skip
    assert tensors["W_enc"].shape[0] == 128
    _fails_cleanly(_analyze_cmd(other, demo_shards, out), "reads 64-wide activations", out)
    # Masks: a latent out of range, a file that is not an image.
    image = tmp_path / "img.png"
    sample = read_shards(demo_shards)[0]
    image.write_bytes(sample["png"])
    masks = tmp_path / "masks"
    _fails_cleanly(
        [*cli, "masks", str(small_run), "--image", str(image), "--latents", "3", "1024",
         "--out", str(masks)],
        "latent 1024 is out of range", masks,
    )  # fmt: skip
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    _fails_cleanly(
        [*cli, "masks", str(small_run), "--image", str(not_image), "--out", str(masks)],
        "is not an image PIL can read",
        masks,
    )
    # Settings out of range.
    _fails_cleanly(_analyze_cmd(small_run, demo_shards, out, "--k", "0"), "--k 0: must be", out)
    # Shards with no readable image.
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails_cleanly(_analyze_cmd(small_run, empty, out), "--data", out)


def test_masks_command_writes_overlays_of_the_top_latents(small_run, demo_shards, tmp_path):
    image = tmp_path / "cat.png"
    image.write_bytes(read_shards(demo_shards)[5]["png"])
    out = tmp_path / "masks"
    proc = run_cli(
        [*python_cmd(1), "-m", "patchsae.launchers.cli", "masks", str(small_run), "--image",
         str(image), "--top", "3", "--out", str(out)]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "cat.masks.json").read_text())
    latents = [entry["latent"] for entry in record["latents"]]
    assert len(latents) == 3 and record["grid"] == [8, 8]
    acts = [entry["image_activation"] for entry in record["latents"]]
    assert acts == sorted(acts, reverse=True) and acts[-1] > 0
    for entry in record["latents"]:
        patches = np.array(entry["patches"])
        assert patches.shape == (8, 8) and patches.min() >= 0
        # Image-level activation = mean over CLS + the 64 patches.
        assert patches.sum() / 65 <= entry["image_activation"] + 1e-6
        overlay = np.asarray(PIL.Image.open(out / f"cat.latent{entry['latent']}.png"))
        assert overlay.shape == (192, 192, 3)
        # Inactive patches are darkened: their pixels are at most half the image's.
        view = np.asarray(PIL.Image.open(io.BytesIO(read_shards(demo_shards)[5]["png"])))
        up = np.kron(patches == 0, np.ones((24, 24), dtype=bool))
        big = np.kron(view, np.ones((3, 3, 1), dtype=view.dtype))
        if up.any():
            assert np.all(overlay[up] <= big[up] // 2 + 1)


def test_report_selection_and_missing_analysis(small_run, tmp_path):
    from patchsae.analysis.report import select_latents

    table = pd.DataFrame(
        {
            "latent": range(8),
            "frequency": [0.9, 0.5, 0.1, 0.01, 0.001, 0.3, 0.0, 0.05],
            "dead": [False] * 6 + [True, False],
        }
    )
    chosen = select_latents(table, frequent=2, bands=2, per_band=1, named=[6, 0])
    assert chosen[:2] == [0, 1] and chosen[-1] == 6 and len(chosen) == len(set(chosen))
    assert 6 not in select_latents(table, frequent=8, bands=2, per_band=8)  # dead: only if named
    proc = run_cli(
        [*python_cmd(1), "-m", "patchsae.launchers.cli", "report", str(small_run), "--analysis",
         str(tmp_path / "nothing")]
    )  # fmt: skip
    assert proc.returncode == 2 and "run `patchsae analyze" in proc.stderr, proc.stderr
    assert not (tmp_path / "nothing").exists()


def test_segmentation_iou_matches_pixels_and_selects_on_one_split(small_run, demo_shards):
    """Each latent's mask IoU against the true mask, counted in pixels of the nearest-upsampled
    patch mask, per threshold; the best (latent, threshold) of each class scored again on
    another split gives the same number as brute force there."""
    from patchsae.analysis.masks import MaskMaker, upsample
    from patchsae.analysis.segmentation import (
        object_latents,
        score_segmentation,
        segmentation_samples,
    )

    maker = MaskMaker(load_trained(small_run))
    samples = list(segmentation_samples(str(demo_shards)))
    select, held = samples[:120], samples[120:]
    fracs = (0.0, 0.3)
    scores = score_segmentation(maker, select, 8, fracs=fracs, batch_images=32)
    chosen = object_latents(scores)
    assert [o.label for o in chosen] == list(range(8))
    held_scores = score_segmentation(maker, held, 8, fracs=fracs, batch_images=50)
    assert int(held_scores.counts_C.sum()) == len(held)

    def brute(split, label, latent, frac) -> float:
        ious = []
        for image, mask, lab in split:
            if lab != label:
                continue
            truth = np.asarray(mask) > 127
            grid = maker.patch_grids(maker.codes([image]), [latent])[0, 0]
            up = upsample(grid, truth.shape)
            pred = (up > frac * up.max()) & (up > 0)
            ious.append((pred & truth).sum() / max((pred | truth).sum(), 1))
        return float(np.mean(ious))

    for o in chosen[:3]:
        assert o.iou == pytest.approx(brute(select, o.label, o.latent, o.frac), abs=1e-6)
        # The chosen pair is the best of all on the selection split.
        assert o.iou == pytest.approx(float(scores.mean()[o.label].max()))
    for o in held_scores.iou_of(chosen)[:3]:
        assert o.iou == pytest.approx(brute(held, o.label, o.latent, o.frac), abs=1e-6)
