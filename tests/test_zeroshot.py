"""Zero-shot classification with the SAE spliced in: exactness, brute force, MLflow, bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from patchsae.analysis.model import load_trained
from patchsae.analysis.zeroshot import SplicedCLIP, labelled_batches, templates_for
from patchsae.trainer.tracking import read_run_info

from tests.helpers import python_cmd, run_cli, run_train, small_overrides

NAMES = [f"class {i}" for i in range(8)]


@pytest.fixture(scope="module")
def run(tmp_path_factory, demo_shards):
    """A briefly trained SAE on the demo ViT (random weights) with an MLflow run."""
    out = tmp_path_factory.mktemp("zeroshot") / "run"
    run_train(small_overrides(demo_shards, out))
    return out


@pytest.fixture(scope="module")
def clip(run):
    return SplicedCLIP.load(load_trained(run))


@pytest.fixture(scope="module")
def batch(clip, demo_shards):
    pixels, labels, _ = next(labelled_batches(str(demo_shards), clip.preprocess, 24))
    return pixels, labels


def test_features_after_the_hook_equal_the_models_own_forward(clip, batch):
    pixels, _ = batch
    own = F.normalize(clip.model.encode_image(pixels), dim=-1)
    assert torch.allclose(clip.features(clip.hooked(pixels)), own, atol=1e-5)


@pytest.mark.parametrize("tokens", ["all", "cls", "patches"])
def test_splice_replaces_exactly_the_chosen_tokens_after_the_hooked_block(clip, batch, tokens):
    """A pre-hook on the next block records what it receives: the chosen tokens are the SAE's
    reconstruction of the hooked block's output, every other token that output unchanged; the
    blocks up to the hook do not run again. With the error added back, the logits are CLIP's."""
    pixels, _ = batch
    blocks = clip.visual.transformer.resblocks
    layer = clip.source.layer
    assert 0 <= layer < len(blocks) - 1
    x = clip.hooked(pixels)
    seen, reran = [], []
    hooks = [
        blocks[layer + 1].register_forward_pre_hook(lambda m, a: seen.append(a[0].clone())),
        blocks[layer].register_forward_hook(lambda m, a, o: reran.append(True)),
    ]
    try:
        clip.features(clip.splice(x, tokens))
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == 1 and not reran
    received = seen[0]
    t = clip.tensors
    recon = (((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]).relu() @ t["W_dec"]) + t["b_dec"]
    chosen = torch.zeros(x.shape[1], dtype=torch.bool)
    chosen[{"all": slice(None), "cls": slice(0, 1), "patches": slice(1, None)}[tokens]] = True
    assert torch.allclose(received[:, chosen], recon[:, chosen], atol=1e-5)
    assert torch.equal(received[:, ~chosen], x[:, ~chosen])
    assert not torch.allclose(received[:, chosen], x[:, chosen], atol=1e-3)

    text = clip.classifier(NAMES, templates_for("demo", "patchsae-demo-vit"))
    exact = clip.features(clip.splice(x, tokens, add_error=True)) @ text.T
    own = F.normalize(clip.model.encode_image(pixels), dim=-1) @ text.T
    assert (exact - own).abs().max() < 1e-5


def test_classifier_is_the_template_average(clip):
    templates = ["a photo of a {}.", "{} on a table"]
    got = clip.classifier(["cat", "dog"], templates)
    for row, name in zip(got, ["cat", "dog"], strict=True):
        feats = F.normalize(
            clip.model.encode_text(clip.tokenizer([t.format(name) for t in templates])), dim=-1
        )
        assert torch.allclose(row, F.normalize(feats.mean(0), dim=-1), atol=1e-6)
    assert len(templates_for("openai", "ViT-B-16")) == 80


def test_eval_zeroshot_matches_brute_force_and_logs_to_mlflow(run, clip, demo_shards, tmp_path):
    """Accuracies (overall and per class) against a forward with a hook that replaces the block
    output by the reconstruction, the way a user would splice by hand."""
    names = tmp_path / "names.txt"
    names.write_text("\n".join(NAMES) + "\n")
    out = tmp_path / "eval"
    proc = run_cli(
        [*python_cmd(1), "-m", "patchsae.launchers.cli", "eval-zeroshot", str(run), "--data",
         str(demo_shards), "--classnames", str(names), "--templates", "demo", "--out", str(out),
         "--batch-images", "50"]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "zeroshot.json").read_text())
    assert result["images"] == 240 and result["n_templates"] == 3

    text = clip.classifier(NAMES, templates_for("demo", "patchsae-demo-vit"))
    t = clip.tensors
    block = clip.visual.transformer.resblocks[clip.source.layer]

    def to_recon(module, args, output):
        return (((output - t["b_dec"]) @ t["W_enc"] + t["b_enc"]).relu() @ t["W_dec"]) + t["b_dec"]

    correct = {"clip": torch.zeros(8), "spliced": torch.zeros(8)}
    totals = torch.zeros(8)
    for pixels, labels, _ in labelled_batches(str(demo_shards), clip.preprocess, 40):
        with torch.no_grad():
            plain = F.normalize(clip.model.encode_image(pixels), dim=-1) @ text.T
            handle = block.register_forward_hook(to_recon)
            try:
                spliced = F.normalize(clip.model.encode_image(pixels), dim=-1) @ text.T
            finally:
                handle.remove()
        for key, logits in (("clip", plain), ("spliced", spliced)):
            correct[key].index_add_(0, labels, (logits.argmax(-1) == labels).float())
        totals.index_add_(0, labels, torch.ones(len(labels)))
    for key in ("clip", "spliced"):
        assert result["accuracy"][key] == pytest.approx(float(correct[key].sum() / 240))
        assert result["per_class"][key] == pytest.approx((correct[key] / totals).tolist())
    assert result["accuracy"]["spliced_error"] == result["accuracy"]["clip"]
    assert result["max_abs_logit_diff_spliced_error"] < 1e-5

    info = read_run_info(run)
    client = MlflowClient(info["tracking_uri"])
    metrics = client.get_run(info["run_id"]).data.metrics
    assert metrics["eval/zeroshot_acc"] == pytest.approx(result["accuracy"]["clip"])
    assert metrics["eval/zeroshot_acc_spliced"] == pytest.approx(result["accuracy"]["spliced"])
    assert "eval/zeroshot.json" in {a.path for a in client.list_artifacts(info["run_id"], "eval")}


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--classnames", "SHORT"], "has no class name: 3 names were given"),
        (["--templates", "TEMPLATES"], "must hold {} where the class name goes"),
        (["--tokens", "middle"], "use one of all, cls, patches"),
        (["--templates", "imagenet"], "use openai, demo, auto or a text file"),
    ],
)
def test_bad_input_is_named_with_exit_2(run, demo_shards, tmp_path, extra, match):
    (tmp_path / "short.json").write_text(json.dumps(["a", "b", "c"]))
    (tmp_path / "templates.txt").write_text("a photo of a {}\na photo\n")
    subs = {"SHORT": str(tmp_path / "short.json"), "TEMPLATES": str(tmp_path / "templates.txt")}
    out = tmp_path / "eval"
    proc = run_cli(
        [*python_cmd(1), "-m", "patchsae.launchers.cli", "eval-zeroshot", str(run), "--data",
         str(demo_shards), "--out", str(out), "--no-mlflow", *[subs.get(a, a) for a in extra]]
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert match in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_training_logs_zeroshot_accuracy_every_eval_steps(demo_shards, tmp_path):
    """``eval.every``: both accuracies in metrics.jsonl and MLflow at every 4th step and the
    last; the final spliced accuracy is the one eval-zeroshot gives for the exported SAE."""
    from patchsae.trainer.tracking import read_metrics

    shard = demo_shards / "shard-000000.tar"
    out = tmp_path / "run"
    run_train(
        small_overrides(
            demo_shards, out, **{"eval.every": 4, "eval.data": shard, "eval.templates": "demo",
                                 "eval.max_images": None, "train.total_tokens": 10 * 1024}
        )
    )  # fmt: skip
    metrics = read_metrics(out)
    logged = {
        step: {
            key: dict(metrics[key])[step]
            for key in ("eval/zeroshot_acc", "eval/zeroshot_acc_spliced")
        }
        for step, _ in metrics["eval/zeroshot_acc_spliced"]
    }
    assert sorted(logged) == [4, 8, 10]
    info = read_run_info(out)
    history = MlflowClient(info["tracking_uri"]).get_metric_history(
        info["run_id"], "eval/zeroshot_acc_spliced"
    )
    assert sorted(m.step for m in history) == [4, 8, 10]
    proc = run_cli(
        [*python_cmd(1), "-m", "patchsae.launchers.cli", "eval-zeroshot", str(out), "--data",
         str(shard), "--templates", "demo", "--no-mlflow"]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "eval" / "zeroshot.json").read_text())
    assert logged[10]["eval/zeroshot_acc_spliced"] == pytest.approx(result["accuracy"]["spliced"])
    assert logged[10]["eval/zeroshot_acc"] == pytest.approx(result["accuracy"]["clip"])


def test_eval_config_is_checked_before_training(tmp_path):
    from patchsae.trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"eval.data.*needed when eval.every > 0"):
        load_config(None, ["eval.every=10"])
    with pytest.raises(ConfigError, match=r"eval.tokens.*unknown value"):
        load_config(None, ["eval.tokens=middle"])
