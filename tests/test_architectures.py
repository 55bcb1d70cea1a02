"""The SAE architectures beside the paper's ReLU (``sae.architecture``): TopK, BatchTopK and
JumpReLU in the eager reference (the specification), the SAE module's options (a free decoder,
tied init, L1 warm-up), their export, and a training run of each through ``patchsae train``."""

from __future__ import annotations

import json

import pytest
import torch
from patchsae.analysis.model import load_trained
from patchsae.analysis.stats import encode
from patchsae.kernels.reference import activate, auxk_loss, sae_loss, top_mask
from patchsae.trainer.config import ConfigError, load_config
from patchsae.trainer.sae import SparseAutoencoder
from patchsae.trainer.tracking import read_metrics

from tests.helpers import run_cli, run_train, small_overrides, train_cmd


def test_top_mask_keeps_the_k_largest_and_breaks_ties_by_index() -> None:
    torch.manual_seed(0)
    values = torch.randn(7, 33)  # awkward sizes
    mask = top_mask(values, 5)
    assert mask.sum(dim=-1).tolist() == [5] * 7
    smallest_kept = torch.where(mask, values, torch.inf).min(dim=-1).values
    largest_dropped = torch.where(mask, -torch.inf, values).max(dim=-1).values
    assert (smallest_kept > largest_dropped).all()

    ties = torch.tensor([[1.0, 3.0, 2.0, 2.0, 2.0, 0.5], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
    assert top_mask(ties, 3).tolist() == [
        [False, True, True, True, False, False],  # 3, then the first two 2s
        [True, True, True, False, False, False],
    ]
    # Over the batch: 2 per row on average, the lowest flat indices among equal values.
    assert top_mask(ties, 2, over_batch=True).tolist() == [
        [False, True, True, True, True, False],  # the 3 and the row's three 2s come first
        [False] * 6,
    ]
    assert top_mask(values, 50).all()  # k beyond the width keeps everything


def test_activations_forward() -> None:
    torch.manual_seed(1)
    pre = torch.randn(6, 40)
    assert torch.equal(activate(pre, "relu"), pre.relu())
    topk = activate(pre, "topk", k=3)
    assert ((topk > 0).sum(dim=-1) <= 3).all()
    assert torch.equal(topk, pre.relu() * top_mask(pre, 3))
    batch = activate(pre, "batchtopk", k=3)
    assert int((batch > 0).sum()) == 18  # 3 per token on average, unevenly spread
    assert (batch > 0).sum(dim=-1).tolist() != [3] * 6
    threshold = torch.full((40,), 0.5)
    assert torch.equal(activate(pre, "jumprelu", threshold_F=threshold), pre * (pre > 0.5))
    with pytest.raises(ValueError, match="unknown architecture"):
        activate(pre, "sigmoid")


def test_topk_gradient_reaches_only_the_selected_latents() -> None:
    torch.manual_seed(2)
    pre = torch.randn(5, 30, requires_grad=True)
    activate(pre, "topk", k=4).sum().backward()
    assert torch.equal(pre.grad != 0, top_mask(pre.detach(), 4) & (pre.detach() > 0))


def test_jumprelu_straight_through_gradients() -> None:
    """The threshold's gradient is the rectangle-kernel estimate, from the reconstruction (through
    ``pre * H(pre - t)``) and from the L0 term; ``pre`` gets none from the L0 term."""
    torch.manual_seed(3)
    N, D, F, eps = 64, 8, 16, 0.5  # a wide window, so that many entries fall inside it
    x = torch.randn(N, D)
    W_enc, W_dec = torch.randn(D, F), torch.randn(F, D) * 0.1
    b_enc, b_dec = torch.zeros(F), torch.zeros(D)
    log_t = torch.full((F,), -1.0, requires_grad=True)
    out = sae_loss(
        x,
        W_enc,
        b_enc,
        W_dec,
        b_dec,
        l1_coeff=0.0,
        architecture="jumprelu",
        threshold_F=log_t.exp(),
        bandwidth=eps,
    )
    (l0_grad,) = torch.autograd.grad(
        sae_loss(
            x,
            W_enc,
            b_enc,
            W_dec,
            b_dec,
            l1_coeff=1.0,
            architecture="jumprelu",
            threshold_F=log_t.exp(),
            bandwidth=eps,
        ).l1,
        log_t,
    )
    t = log_t.detach().exp()
    pre = (x - b_dec) @ W_enc + b_enc
    window = ((pre - t) / eps).abs() < 0.5
    want_l0 = -(window.sum(dim=0) / N) / eps * t  # d/dlog t = t d/dt
    torch.testing.assert_close(l0_grad, want_l0)

    (mse_grad,) = torch.autograd.grad(out.mse, log_t)
    f = (pre * (pre > t)).requires_grad_()
    (g_f,) = torch.autograd.grad((f @ W_dec + b_dec - x).pow(2).mean(), f)
    want = -(t / eps) * (g_f * window).sum(dim=0) * t
    torch.testing.assert_close(mse_grad, want)


def test_auxk_uses_only_dead_latents_and_vanishes_without_them() -> None:
    torch.manual_seed(4)
    x = torch.randn(20, 6)
    W_dec = torch.randn(12, 6, requires_grad=True)
    pre = torch.randn(20, 12, requires_grad=True)
    none_dead = torch.zeros(12, dtype=torch.bool)
    assert auxk_loss(x, torch.zeros_like(x), pre, W_dec, none_dead, 3) == 0
    dead = torch.zeros(12, dtype=torch.bool)
    dead[[2, 5, 7, 11]] = True
    loss = auxk_loss(x, torch.zeros_like(x), pre, W_dec, dead, 3)
    loss.backward()
    assert loss > 0
    assert (pre.grad[:, ~dead] == 0).all() and (pre.grad[:, dead] != 0).any()
    assert (W_dec.grad[~dead] == 0).all()


def test_jumprelu_pulls_silent_latents_up_to_their_thresholds() -> None:
    """The jumprelu term on silent latents is the mean gap ``relu(threshold - pre)`` over tokens
    and silent latents; only their own encoder columns, biases and thresholds get gradient, and
    it is exactly 0 with none silent."""
    torch.manual_seed(8)
    x = torch.randn(30, 6)
    params = {
        "W_enc": torch.randn(6, 12),
        "b_enc": torch.randn(12) - 1,
        "W_dec": torch.randn(12, 6),
        "b_dec": torch.randn(6),
        "threshold": torch.rand(12) + 0.5,
    }
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    silent = torch.zeros(12, dtype=torch.bool)
    silent[[1, 4, 9]] = True

    def aux(mask):
        return sae_loss(
            x, *(leaves[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")), l1_coeff=0.0,
            architecture="jumprelu", threshold_F=leaves["threshold"], ghost_mask_F=mask,
            aux_coeff=0.5,
        ).aux  # fmt: skip

    assert aux(torch.zeros(12, dtype=torch.bool)).item() == 0
    term = aux(silent)
    pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    want = 0.5 * torch.relu(params["threshold"] - pre)[:, silent].mean()
    torch.testing.assert_close(term, want)
    found = torch.autograd.grad(term, list(leaves.values()), allow_unused=True)
    grads = dict(zip(leaves, found, strict=True))
    assert grads["W_dec"] is None and grads["b_dec"] is None  # not in the term's graph
    for name in ("b_enc", "threshold"):
        assert (grads[name][~silent] == 0).all() and (grads[name][silent] != 0).all()
    assert (grads["threshold"][silent] > 0).all()  # descent lowers them
    assert (grads["W_enc"][:, ~silent] == 0).all()


def test_sae_options_free_decoder_tied_init_and_export() -> None:
    torch.manual_seed(5)
    sae = SparseAutoencoder(10, 40, unit_norm_decoder=False, tied_init=True, decoder_init_norm=0.1)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.full((40,), 0.1))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    before = sae.W_dec.detach().clone()
    sae.normalize_decoder()  # a free decoder is left alone
    assert torch.equal(sae.W_dec, before)

    # Every architecture's export encodes raw inputs as its training forward does (scaled).
    x = torch.randn(50, 10)
    for arch in ("relu", "topk", "jumprelu"):
        sae = SparseAutoencoder(10, 40, architecture=arch, k=5, threshold=0.05)
        sae.input_scale.fill_(3.0)
        f = sae(x, l1_coeff=0.0).f_NF.detach()
        tensors = sae.export_tensors() | ({"k": torch.tensor(5)} if arch == "topk" else {})
        torch.testing.assert_close(encode(x, tensors), f / 3.0)
        again = SparseAutoencoder.from_exported(sae.export_tensors(), k=5 if arch == "topk" else 0)
        assert again.architecture == arch
        torch.testing.assert_close(again(x, l1_coeff=0.0).f_NF, f / 3.0)


def test_jumprelu_thresholds_start_from_the_sample(caplog) -> None:
    """``init_l0``: every latent starts firing on ``init_l0 / n_latents`` of the sample's
    tokens (so the code starts at that L0, none silent), whatever the block size; a sample too
    small for that rate is said so; the SAE uses each threshold's absolute value."""
    torch.manual_seed(7)
    x = torch.randn(2000, 16) * 3 + 1
    sae = SparseAutoencoder(16, 300, architecture="jumprelu", init_l0=6, threshold=0.5)
    sae.init_from_sample(x, "mean", True)
    f = sae(x, l1_coeff=0.0).f_NF
    assert ((f > 0).sum(dim=0) == 40).all()  # 2,000 * 6 / 300 tokens per latent
    assert (f > 0).sum(dim=1).float().mean().item() == pytest.approx(6.0)
    first = sae.threshold.detach().clone()
    assert (first > 0).all()
    sae.init_thresholds(x, 6, chunk_elements=2000 * 7)  # 7 latents at a time: the same
    torch.testing.assert_close(sae.threshold.detach(), first, rtol=1e-6, atol=0)

    with torch.no_grad():
        sae.threshold.copy_(first)
        sae.threshold[0] = -first[0]
    assert torch.equal(sae(x, l1_coeff=0.0).f_NF, f)
    assert torch.equal(sae.export_tensors()["threshold"], first / sae.input_scale)

    # At 10x the rate the parameter holds a tenth of each threshold: the same code.
    fast = SparseAutoencoder(16, 300, architecture="jumprelu", init_l0=6, threshold_lr=10.0)
    fast.load_state_dict(sae.state_dict() | {"threshold": sae.threshold.detach() / 10})
    torch.testing.assert_close(fast.thresholds(), sae.thresholds())
    assert torch.equal(fast(x, l1_coeff=0.0).f_NF > 0, f > 0)

    with caplog.at_level("WARNING"):
        sae.init_thresholds(x[:100], 1)  # 100 * 1 / 300 < 1 token per latent
    assert "cannot resolve a firing rate" in caplog.text
    assert ((sae(x[:100], l1_coeff=0.0).f_NF > 0).sum(dim=0) == 1).all()

    # A relu SAE ignores init_l0; a checkpoint with thresholds as logs is refused clearly.
    assert SparseAutoencoder(16, 300, init_l0=6).init_l0 is None
    state = sae.state_dict()
    state["log_threshold"] = state.pop("threshold").log()
    with pytest.raises(ValueError, match="log_threshold.*cannot resume"):
        sae.load_state_dict(state)


def test_batchtopk_threshold_follows_the_smallest_kept_activation() -> None:
    torch.manual_seed(6)
    sae = SparseAutoencoder(10, 40, architecture="batchtopk", k=4)
    x = torch.randn(64, 10)
    f = sae(x, l1_coeff=0.0).f_NF.detach()
    sae.update_threshold(f)
    smallest = f[f > 0].min()
    assert torch.equal(sae.threshold, smallest)  # the first estimate is the value itself
    sae.update_threshold(torch.full_like(f, 0) + (f > 0) * 2 * smallest, keep=torch.tensor(False))
    assert torch.equal(sae.threshold, smallest)  # a skipped step leaves it
    sae.update_threshold((f > 0) * 2 * smallest)
    torch.testing.assert_close(sae.threshold, smallest * 1.01)
    # At inference the threshold replaces the batch selection: pre * (pre > threshold).
    threshold = sae.export_tensors()["threshold"]
    assert threshold.shape == (40,) and torch.equal(threshold, sae.threshold.expand(40))


def test_config_checks_the_new_keys(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"sae.architecture.*unknown value 'gated'"):
        load_config(None, ["sae.architecture=gated"])
    with pytest.raises(ConfigError, match=r"sae.decoder_init_norm.*unit_norm_decoder"):
        load_config(None, ["sae.decoder_init_norm=0.1"])
    with pytest.raises(ConfigError, match=r"sae.k.*must be > 0"):
        load_config(None, ["sae.k=0"])
    zero = load_config(None, ["sae.architecture=topk", "distributed.strategy=deepspeed"])
    assert zero.sae.architecture == "topk"  # every architecture trains under ZeRO too
    cfg = load_config(
        None,
        [
            "sae.architecture=jumprelu",
            "sae.unit_norm_decoder=false",
            "sae.decoder_init_norm=0.1",
            "sae.l1_warmup_steps=10",
        ],
    )
    assert cfg.sae.architecture == "jumprelu" and cfg.sae.decoder_init_norm == 0.1
    with pytest.raises(ConfigError, match=r"sae.jumprelu_init_l0.*must be > 0"):
        load_config(None, ["sae.jumprelu_init_l0=0"])
    with pytest.raises(ConfigError, match=r"sae.jumprelu_init_l0.*more than sae.n_latents"):
        load_config(None, ["sae.n_latents=64", "sae.expansion=null", "sae.jumprelu_init_l0=65"])


@pytest.mark.parametrize(
    ("arch", "extra"),
    [
        ("topk", {"sae.k": 8}),
        ("batchtopk", {"sae.k": 8}),
        (
            "jumprelu",
            {
                "sae.l1_coeff": 1e-3,
                "sae.unit_norm_decoder": "false",
                "sae.tied_init": "true",
                "sae.decoder_init_norm": 0.1,
                "sae.l1_warmup_steps": 4,
                "sae.jumprelu_init_l0": 8,
            },
        ),
    ],
)
def test_each_architecture_trains_and_analyses(tmp_path, demo_shards, arch, extra) -> None:
    out = tmp_path / arch
    run_train(small_overrides(demo_shards, out, **{"sae.architecture": arch}, **extra))
    metrics = read_metrics(out)
    assert all(torch.isfinite(torch.tensor([v for _, v in metrics["loss/total"]])))
    l0 = [v for _, v in metrics["sparsity/l0"]]
    if arch == "topk":
        assert all(v <= 8 for v in l0) and l0[-1] > 4
    if arch == "batchtopk":
        assert all(v <= 8.0001 for v in l0)
    if arch == "jumprelu":  # the L0 penalty ramps in over 4 steps, from an L0 near 8
        l1 = [v for _, v in metrics["loss/l1"]]
        assert l1[0] < l1[3] / 2 and l0[0] < 4 * 8
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["config"]["sae"]["architecture"] == arch
    assert (
        cfg["architecture"]
        == {"topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}[arch]
    )
    sae = load_trained(out)
    x = torch.randn(30, sae.d_in)
    codes = encode(x, sae.tensors)
    if arch == "topk":
        assert cfg["k"] == 8 and ((codes > 0).sum(dim=-1) <= 8).all()
    else:
        assert sae.tensors["threshold"].shape == (sae.n_latents,)
        assert (sae.tensors["threshold"] > 0).all()


def test_k_not_below_the_width_is_refused(tmp_path, demo_shards) -> None:
    sets = small_overrides(
        demo_shards, tmp_path / "run", **{"sae.architecture": "topk", "sae.k": 4096}
    )
    proc = run_cli(train_cmd(sets), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "sae.k" in proc.stderr and "4096 active latents of 1024" in proc.stderr
