"""Config errors name the key and the fix, and the CLI stops before reading any data."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from patchsae.trainer.config import ConfigError, load_config

from tests.helpers import ROOT, run_cli, train_cmd


def test_recipes_load_and_resolve(tmp_path):
    # The demo recipe names the demo CLIP that `make train` trains; a missing file says how.
    raw = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    assert raw["model"]["pretrained"] == "runs/demo-clip/demo_clip.safetensors"
    missing = tmp_path / "demo_clip.safetensors"
    with pytest.raises(ConfigError, match=rf"{missing} does not exist.*patchsae make-demo-clip"):
        load_config(ROOT / "configs/demo.yaml", [f"model.pretrained={missing}"])
    demo = load_config(ROOT / "configs/demo.yaml", ["model.pretrained=null"])
    assert demo.model.name == "patchsae-demo-vit"
    paper = load_config(ROOT / "configs/vit_b16_imagenet.yaml")
    assert (paper.model.name, paper.model.pretrained, paper.model.layer) == (
        "ViT-B-16",
        "openai",
        -2,
    )
    assert paper.sae.n_latents == 49_152 and paper.sae.l1_coeff == 8e-5
    assert (paper.train.lr, paper.train.warmup_steps) == (4e-4, 500)
    assert (paper.train.batch_images, paper.train.total_images) == (128, 2_621_440)


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(
        ROOT / "configs/demo.yaml",
        ["train.lr=3e-3", "sae.ghost_grads=false", "model.pretrained=null"],
    )
    assert cfg.train.lr == 3e-3 and cfg.sae.ghost_grads is False


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lrr=1e-3", r"'train.lrr': unknown key; valid keys of 'train' are \[.*'lr'"),
        ("trian.lr=1e-3", r"'trian': unknown section; valid sections are"),
        (
            "model.layer=12",
            r"layer 12 is out of range for patchsae-demo-vit \(4 blocks\); use -4..3",
        ),
        ("train.lr=0", r"'train.lr': must be > 0"),
        ("sae.n_latents=0", r"exactly one of sae.n_latents and sae.expansion"),
        (
            "sae.mse_norm=l2",
            r"'sae.mse_norm': unknown value 'l2'; use one of \['none', 'token_norm'\]",
        ),
        ("train.lr=fast", r"'train.lr': expected float, got 'fast'; give a float"),
        ("data.cache_read_ahead=abc", r"expected int, got 'abc'; give an int"),
        ("model.name=ViT-B-61", r"not an open_clip model; did you mean"),
        ("model.pretrained=laion9b", r"neither a checkpoint file nor a pretrained tag"),
        ("lr=1", r"section.key=value"),
        (
            "distributed.zero_stage=4",
            r"'distributed.zero_stage': unknown value 4; use one of \[1, 2, 3\]",
        ),
        ("distributed.strategy=fsdp", r"'distributed.strategy': unknown value 'fsdp'"),
        (
            "distributed.deepspeed_config=ds.json",
            r"'distributed.deepspeed_config': is set but distributed.strategy is 'auto'",
        ),
        ("distributed.reduce_bucket_size=0", r"'distributed.reduce_bucket_size': must be > 0"),
        ("data.cache_read_ahead=-1", r"'data.cache_read_ahead': must be >= 0; use 0 to read"),
    ],
)
def test_bad_values_name_key_and_fix(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(ROOT / "configs/demo.yaml", [override])


def test_missing_deepspeed_override_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"file '.*nope.json' does not exist"):
        load_config(
            ROOT / "configs/demo.yaml",
            [
                "distributed.strategy=deepspeed",
                f"distributed.deepspeed_config={tmp_path}/nope.json",
            ],
        )


def test_zero_latents_via_n_latents():
    with pytest.raises(ConfigError, match=r"'sae.n_latents': must be > 0"):
        load_config(ROOT / "configs/demo.yaml", ["sae.expansion=null", "sae.n_latents=0"])


def _cli(*overrides: str, resume: bool = False) -> subprocess.CompletedProcess:
    """The training CLI on the demo recipe (random CLIP weights); these runs must stop before
    reading any data."""
    return run_cli(train_cmd(["model.pretrained=null", *overrides], resume=resume), timeout=120)


def test_cli_config_error_exits_before_reading_data(tmp_path):
    # The shard path does not exist: if data were read first, the error would be about shards.
    proc = _cli(f"data.urls={tmp_path}/missing", "train.warmup=5", f"train.out_dir={tmp_path}/run")
    assert proc.returncode == 2
    assert "'train.warmup': unknown key" in proc.stderr and "warmup_steps" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_cli_missing_shards_fail_fast_naming_urls(tmp_path):
    proc = _cli(f"data.urls={tmp_path}/nowhere", f"train.out_dir={tmp_path}/run")
    assert proc.returncode == 2
    assert f"{tmp_path}/nowhere" in proc.stderr and "make-demo-data" in proc.stderr


def test_cli_missing_checkpoint_is_a_clear_error(tmp_path, demo_shards):
    proc = _cli(f"data.urls={demo_shards}", f"train.out_dir={tmp_path}/run", resume=True)
    assert proc.returncode == 2
    assert "no checkpoint found" in proc.stderr and "without --resume" in proc.stderr


def test_cli_refuses_to_start_over_an_existing_run(tmp_path, demo_shards):
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    (ckpt / "state.pt").write_bytes(b"")
    proc = _cli(f"data.urls={demo_shards}", f"train.out_dir={tmp_path}/run")
    assert proc.returncode == 2
    assert "already holds a run (newest checkpoint step_00000004)" in proc.stderr
    assert "--resume" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints"]


def test_recipe_that_is_not_valid_yaml_names_file_line_and_column(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("train:\n  lr: 1e-3\n   warmup_steps: 10\n")
    with pytest.raises(
        ConfigError, match=r"broken.yaml, line 3, column 16: the recipe is not valid"
    ):
        load_config(recipe)
    proc = run_cli(train_cmd([], config=recipe), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "broken.yaml, line 3, column 16" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(ConfigError, match=r"'train.lr': the value '\[1' of --set is not valid"):
        load_config(None, ["train.lr=[1"])
