"""The demo CLIP: trained on captioned demo images, loaded by open_clip's own loader, and able to
name the demo classes zero-shot."""

from __future__ import annotations

import json
import sys

import open_clip
import pytest
import torch
from patchsae.data.activations import DEMO_MODEL, load_visual, register_models
from patchsae.data.demo import make_demo_data
from patchsae.data.demo_clip import RECORD, WEIGHTS, DemoClipConfig, train_demo_clip
from safetensors.torch import load_file

from tests.helpers import run_cli

TINY = DemoClipConfig(steps=6, batch_size=16, warmup_steps=2)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-clip-data")
    attributes = make_demo_data(
        root / "attr", n_images=64, images_per_shard=32, seed=5, split="attributes"
    )
    heldout = make_demo_data(root / "held", n_images=32, images_per_shard=32, seed=6)
    return attributes, heldout


def test_the_checkpoint_loads_through_open_clip_and_the_trainer(tmp_path, splits):
    attributes, heldout = splits
    record = train_demo_clip(attributes, tmp_path / "a", heldout=heldout, cfg=TINY)
    path = tmp_path / "a" / WEIGHTS
    assert json.loads((tmp_path / "a" / RECORD).read_text()) == record
    assert record["images"] == 64 and 0.0 <= record["zeroshot_accuracy"] <= 1.0

    register_models()
    model, _, _ = open_clip.create_model_and_transforms(DEMO_MODEL, pretrained=str(path))
    saved = load_file(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name  # strict load: every tensor, unchanged
    random_init = open_clip.create_model(DEMO_MODEL)
    assert not torch.equal(random_init.visual.conv1.weight, model.visual.conv1.weight)
    visual, _ = load_visual(DEMO_MODEL, str(path), cache_dir=None, init_seed=0)
    assert torch.equal(visual.conv1.weight, saved["visual.conv1.weight"])

    again = train_demo_clip(attributes, tmp_path / "b", heldout=heldout, cfg=TINY)
    assert (tmp_path / "b" / WEIGHTS).read_bytes() == path.read_bytes()  # deterministic
    assert again["final_loss"] == record["final_loss"]


def test_make_demo_clip_command(tmp_path, splits):
    attributes, heldout = splits
    proc = run_cli(
        [sys.executable, "-m", "patchsae.launchers.cli", "make-demo-clip", "--data", str(attributes), "--heldout", str(heldout),
         "--out", str(tmp_path / "clip"), "--steps", "3"],
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "zero-shot accuracy" in proc.stdout and (tmp_path / "clip" / WEIGHTS).is_file()
    assert json.loads((tmp_path / "clip" / RECORD).read_text())["config"]["steps"] == 3


@pytest.mark.slow
def test_the_demo_clip_names_the_heldout_classes(demo_clip):
    """The default recipe on the demo's sizes: at least 90% zero-shot accuracy over the 8 classes
    on held-out images (class-name prompts through the text tower)."""
    _, record = demo_clip
    assert record["images"] == 4000 and record["zeroshot_accuracy"] >= 0.9, record


def test_fine_tuning_starts_from_the_given_weights(tmp_path, splits):
    """--init: the fine-tune starts from those weights (zero steps change nothing), records
    the accuracy before and after, and refuses weights of another architecture."""
    from tests.helpers import save_other_architecture_clip

    attributes, heldout = splits
    base = train_demo_clip(attributes, tmp_path / "base", heldout=heldout, cfg=TINY)
    init = tmp_path / "base" / WEIGHTS
    still = DemoClipConfig(steps=1, batch_size=16, warmup_steps=1, lr=0.0)
    record = train_demo_clip(heldout, tmp_path / "same", heldout=heldout, cfg=still, init=init)
    assert record["init"] == str(init)
    assert record["init_zeroshot_accuracy"] == record["zeroshot_accuracy"]
    assert record["init_zeroshot_accuracy"] == base["zeroshot_accuracy"]
    before, after = load_file(init), load_file(tmp_path / "same" / WEIGHTS)
    assert all(torch.equal(before[k], after[k]) for k in before)

    proc = run_cli(
        [sys.executable, "-m", "patchsae.launchers.cli", "make-demo-clip", "--init", str(init),
         "--data", str(heldout), "--heldout", str(heldout), "--out", str(tmp_path / "tuned"),
         "--steps", "3"], timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(before fine-tuning: " in proc.stdout
    tuned = json.loads((tmp_path / "tuned" / RECORD).read_text())
    assert tuned["config"]["lr"] == 5e-4 and tuned["config"]["steps"] == 3  # the fine-tune's
    assert not torch.equal(load_file(tmp_path / "tuned" / WEIGHTS)["visual.conv1.weight"],
                           before["visual.conv1.weight"])  # fmt: skip

    other = tmp_path / "other.safetensors"
    save_other_architecture_clip(other)
    proc = run_cli(
        [sys.executable, "-m", "patchsae.launchers.cli", "make-demo-clip", "--init", str(other),
         "--data", str(heldout), "--out", str(tmp_path / "bad"), "--steps", "1"], timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "is not a checkpoint of patchsae-demo-vit" in proc.stderr
    assert not (tmp_path / "bad").exists()
