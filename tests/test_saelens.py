"""SAELens loads our export: ``SAE.load_from_disk`` on an export folder gives the latents and
reconstructions of the trained SAE (input scale folded in), and names the model and the hook.

SAELens runs in its own venv (``tests/saelens_venv.py``, built on first use); the loader there
is ``tests/saelens_loader.py``. Without that venv the test is skipped, except where
``PATCHSAE_REQUIRE_SAELENS=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from patchsae.analysis.stats import encode
from patchsae.data.activations import ActivationSource, load_visual
from patchsae.data.shards import ImageShards, expand_urls
from patchsae.kernels.reference import sae_forward
from patchsae.trainer import saelens
from patchsae.trainer.checkpoint import write_export
from patchsae.trainer.config import Config, ModelConfig, SAEConfig, check_model
from patchsae.trainer.loop import Trainer
from patchsae.trainer.sae import SparseAutoencoder
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests import saelens_venv

LOADER = Path(__file__).with_name("saelens_loader.py")
MODEL = "patchsae-demo-vit"  # 4 blocks, width 128, 64 px: 65 tokens an image


@pytest.fixture(scope="module")
def saelens_python() -> Path:
    venv = saelens_venv.venv_dir()
    try:
        saelens_venv.build(venv)
    except RuntimeError as err:
        reason = f"the SAELens venv {venv} is missing and could not be built: {err}"
        if os.environ.get("PATCHSAE_REQUIRE_SAELENS") == "1":
            pytest.fail(f"PATCHSAE_REQUIRE_SAELENS=1 but {reason}")
        pytest.skip(reason)
    return saelens_venv.python_of(venv)


def clip_tokens(shards: Path, layer: int) -> torch.Tensor:
    """Real residual-stream tokens: one batch of the demo images through the demo ViT."""
    visual, preprocess = load_visual(MODEL, None, cache_dir=None, init_seed=0)
    images = ImageShards(
        expand_urls(str(shards)),
        preprocess,
        batch_size=5,
        shuffle_shards=False,
        shuffle_buffer=0,
        seed=0,
    )
    pixels = next(iter(images))["pixels"]
    return ActivationSource(visual, layer, "all")(pixels)  # [5 * 65, 128]


def trained_sae(x_ND: torch.Tensor, n_latents: int) -> SparseAutoencoder:
    """An SAE as training leaves it: an input scale far from 1, ``b_dec`` at the scaled tokens'
    median, and (instead of training) a random encoder bias so that some latents are silent."""
    sae = SparseAutoencoder(x_ND.shape[1], n_latents)
    sae.init_from_sample(x_ND, "geometric_median", scale_inputs=True)
    with torch.no_grad():
        sae.b_enc.normal_(-0.05, 0.2)
    return sae


def cfg_json_of(
    sae: SparseAutoencoder, model: ModelConfig, step: int, sae_cfg: SAEConfig | None = None
) -> dict:
    """``Trainer.cfg_json`` itself, on the attributes it reads, so the fields stay the real ones."""
    cfg = Config(model=model, sae=sae_cfg or SAEConfig())
    trainer = SimpleNamespace(
        cfg=cfg,
        sae=sae,
        layer=check_model(model),
        step=step,
        plan=SimpleNamespace(batch_tokens=1024),
        run_id="0123abcd",
    )
    return Trainer.cfg_json(trainer)


def reference(sae: SparseAutoencoder, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents and reconstruction on raw ``x``, from the trained (scaled) SAE, in float64: the
    trained ones divided by the input scale."""
    s = sae.input_scale.double()
    params = [p.detach().double() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]
    _, f_NF, x_hat_ND = sae_forward(x_ND.double() * s, *params)
    return f_NF / s, x_hat_ND / s


def assert_float32_close(got: torch.Tensor, want: torch.Tensor, what: object) -> None:
    """Within 1e-6 of the largest value. The export is float32 (``b / s`` rounded) and SAELens
    computes in float32 with another torch build: a few float32 ulps of the largest value, far
    below what a wrong bias or input scale would give (~1e-2 and more)."""
    err = (got.double() - want).abs().max().item()
    assert err <= 1e-6 * max(1.0, want.abs().max().item()), (what, err)


def run_loader(python: Path, jobs: list[dict], tmp_path: Path) -> None:
    job_file = tmp_path / "jobs.json"
    job_file.write_text(json.dumps(jobs))
    # -I and a cwd outside the repository: its top-level kernels/ would shadow HF's `kernels`.
    proc = subprocess.run(
        [str(python), "-I", str(LOADER), str(job_file)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"the SAELens loader failed:\n{proc.stderr[-4000:]}"


def test_saelens_loads_the_export_and_matches_ours(saelens_python, demo_shards, tmp_path):
    torch.manual_seed(1234)
    model = ModelConfig(name=MODEL, layer=-2)
    # Real CLIP tokens (D = 128), and random ones of an awkward width (D = 40).
    cases = {"clip": (clip_tokens(demo_shards, model.layer), 300)}
    cases["odd"] = (3.0 * torch.randn(211, 40) + torch.randn(40), 333)
    expected = {}
    for name, (x_ND, n_latents) in cases.items():
        sae = trained_sae(x_ND, n_latents)
        assert abs(float(sae.input_scale) - 1.0) > 0.1, "the input scale would hide a folding bug"
        folder = tmp_path / name
        cfg_json = cfg_json_of(sae, model, step=7)
        write_export(folder, sae.export_tensors(), cfg_json)
        f_NF, x_hat_ND = reference(sae, x_ND)
        # Our own loader gives the same SAE.
        ours = SparseAutoencoder.from_exported(load_file(folder / "sae.safetensors"))
        params = (ours.W_enc, ours.b_enc, ours.W_dec, ours.b_dec)
        _, f_ours, x_hat_ours = sae_forward(x_ND.double(), *(p.detach().double() for p in params))
        assert_float32_close(f_ours, f_NF, (name, "f, ours"))
        assert_float32_close(x_hat_ours, x_hat_ND, (name, "x_hat, ours"))
        assert 0.05 < (f_NF > 0).double().mean() < 0.95  # neither all silent nor all firing

        save_file({"x": x_ND.contiguous(), "f": f_NF.float()}, tmp_path / f"{name}_in.safetensors")
        job = {
            "folder": str(folder),
            "inputs": str(tmp_path / f"{name}_in.safetensors"),
            "out": str(tmp_path / f"{name}_out.safetensors"),
        }
        expected[name] = (job, cfg_json, f_NF, x_hat_ND)

    run_loader(saelens_python, [job for job, *_ in expected.values()], tmp_path)

    for name, (job, cfg_json, f_NF, x_hat_ND) in expected.items():
        folder = Path(job["folder"])
        written = json.loads((folder / "cfg.json").read_text())
        assert {k: written[k] for k in cfg_json} == cfg_json  # our fields are all still there
        assert os.path.samefile(folder / "sae.safetensors", folder / saelens.WEIGHTS)

        out = load_file(job["out"])
        with safe_open(job["out"], "pt") as fh:
            info = json.loads(fh.metadata()["info"])
        d_in, d_sae = x_hat_ND.shape[1], f_NF.shape[1]
        assert info["class"] == "StandardSAE" and info["sae_lens_version"] == "6.54.12"
        cfg = info["cfg"]
        assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"]) == ("standard", d_in, d_sae)
        assert (cfg["dtype"], cfg["normalize_activations"]) == ("float32", "none")
        assert cfg["metadata"]["model_name"] == MODEL
        assert cfg["metadata"]["hook_name"] == "visual.transformer.resblocks.2"  # layer -2 of 4

        assert_float32_close(out["f"], f_NF, (name, "f, SAELens"))
        assert_float32_close(out["x_hat"], x_hat_ND, (name, "x_hat, SAELens"))


def test_reexport_replaces_the_saelens_weights(tmp_path):
    """The link must follow ``sae.safetensors``, which every export replaces by a rename."""
    model = ModelConfig(name=MODEL, layer=1)
    for seed in (0, 1):
        torch.manual_seed(seed)
        sae = SparseAutoencoder(40, 300)
        write_export(tmp_path, sae.export_tensors(), cfg_json_of(sae, model, step=seed))
        weights = load_file(tmp_path / saelens.WEIGHTS)
        assert torch.equal(weights["W_enc"], sae.W_enc.detach())
    assert os.path.samefile(tmp_path / "sae.safetensors", tmp_path / saelens.WEIGHTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cfg.json",
        "sae.safetensors",
        "sae_weights.safetensors",
    ]


def test_weights_are_copied_where_hard_links_fail(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(saelens.os, "link", no_links)
    sae = SparseAutoencoder(40, 300)
    write_export(tmp_path, sae.export_tensors(), cfg_json_of(sae, ModelConfig(name=MODEL), 0))
    assert not os.path.samefile(tmp_path / "sae.safetensors", tmp_path / saelens.WEIGHTS)
    assert (tmp_path / "sae.safetensors").read_bytes() == (tmp_path / saelens.WEIGHTS).read_bytes()


def test_a_field_that_means_something_else_to_saelens_is_refused():
    sae = SparseAutoencoder(40, 300)
    cfg_json = cfg_json_of(sae, ModelConfig(name=MODEL), 0)
    assert saelens.with_saelens_fields(cfg_json)["d_sae"] == 300
    with pytest.raises(ValueError, match=r"\['dtype'\] mean something else to SAELens"):
        saelens.with_saelens_fields({**cfg_json, "dtype": "bfloat16"})


@pytest.mark.parametrize(
    ("arch", "saelens_class"),
    [("topk", "TopKSAE"), ("jumprelu", "JumpReLUSAE"), ("batchtopk", "JumpReLUSAE")],
)
def test_saelens_loads_the_other_architectures(saelens_python, tmp_path, arch, saelens_class):
    """topk loads as SAELens's TopK SAE with our k, jumprelu (and batchtopk, in its inference
    form) as its JumpReLU SAE with our thresholds; both encode and decode as we do."""
    torch.manual_seed(99)
    x_ND = 3.0 * torch.randn(211, 40) + torch.randn(40)
    sae = SparseAutoencoder(40, 333, architecture=arch, k=7, threshold=0.5)
    sae.init_from_sample(x_ND, "geometric_median", scale_inputs=True)
    with torch.no_grad():
        sae.b_enc.normal_(-0.05, 0.2)
        if arch == "batchtopk":
            sae.threshold.fill_(0.5)
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(333).mul(0.8).add(0.1))
    model = ModelConfig(name=MODEL, layer=-2)
    cfg_json = cfg_json_of(sae, model, step=3, sae_cfg=SAEConfig(architecture=arch, k=7))
    folder = tmp_path / arch
    write_export(folder, sae.export_tensors(), cfg_json)
    tensors = load_file(folder / "sae.safetensors")
    if arch == "topk":
        tensors["k"] = torch.tensor(7)
    f_NF = encode(x_ND, tensors)
    x_hat_ND = f_NF @ tensors["W_dec"] + tensors["b_dec"]
    if arch != "batchtopk":  # the export computes what training computed, on raw inputs
        trained = sae(x_ND, l1_coeff=0.0).f_NF.detach().double() / sae.input_scale.double()
        assert_float32_close(f_NF, trained, arch)
    assert 0 < (f_NF > 0).double().mean() < 0.5
    save_file({"x": x_ND.contiguous(), "f": f_NF.contiguous()}, tmp_path / "in.safetensors")
    job = {
        "folder": str(folder),
        "inputs": str(tmp_path / "in.safetensors"),
        "out": str(tmp_path / "out.safetensors"),
    }
    run_loader(saelens_python, [job], tmp_path)

    out = load_file(job["out"])
    with safe_open(job["out"], "pt") as fh:
        info = json.loads(fh.metadata()["info"])
    assert info["class"] == saelens_class, info
    if arch == "topk":
        assert info["cfg"]["k"] == 7
    assert_float32_close(out["f"], f_NF.double(), (arch, "f, SAELens"))
    assert_float32_close(out["x_hat"], x_hat_ND.double(), (arch, "x_hat, SAELens"))
