"""FVU is centred; dead, dense and ghost windows count what they claim."""

from __future__ import annotations

import torch
from patchsae.kernels import sae_loss
from patchsae.trainer.metrics import LatentStats, MetricSums, centred_fvu


def test_fvu_is_centred_offset_invariant():
    torch.manual_seed(0)
    # float64 data: a float32 x + 1000 would itself round away ~1e-4 of each value.
    x = torch.randn(300, 8, dtype=torch.float64)
    x_hat = x + 0.3 * torch.randn(300, 8, dtype=torch.float64)
    offset = torch.full((8,), 1000.0, dtype=torch.float64)
    assert abs(centred_fvu(x, x_hat) - centred_fvu(x + offset, x_hat + offset)) < 1e-9
    # Predicting the mean explains nothing: FVU 1 (the uncentred ratio would be far below 1).
    mean = (x + offset).mean(0).expand_as(x)
    assert abs(centred_fvu(x + offset, mean) - 1.0) < 1e-9


def test_metric_sums_fvu_over_several_steps_equals_pooled_fvu():
    torch.manual_seed(1)
    d, f = 6, 10
    params = [torch.randn(d, f), torch.randn(f), torch.randn(f, d), torch.randn(d)]
    sums = MetricSums(d, "cpu")
    xs, outs = [], []
    for _ in range(3):
        x = torch.randn(40, d) + 50.0
        out = sae_loss(x, *params, l1_coeff=0.01)
        sums.add(out, x)
        xs.append(x)
        outs.append(out)
    m = sums.compute()
    x_all = torch.cat(xs)
    x_hat_all = torch.cat([o.x_hat_ND for o in outs])
    # float64 sums: agreement to ~1e-12 relative.
    assert abs(m["quality/fvu"] / centred_fvu(x_all, x_hat_all) - 1) < 1e-9
    l0 = torch.cat([(o.f_NF > 0).sum(1).double() for o in outs]).mean().item()
    assert abs(m["sparsity/l0"] - l0) < 1e-9
    assert abs(m["loss/mse"] - sum(o.mse.item() for o in outs) / 3) < 1e-6


def test_dead_dense_and_ghost_windows():
    stats = LatentStats(4, window_tokens=100, device="cpu")
    # Latent 0 fires on every token, 1 on 5% of tokens, 2 once at the start, 3 never.
    first = torch.tensor([50, 3, 1, 0])
    later = torch.tensor([50, 2, 0, 0])
    stats.update(first, 50)
    assert stats.dead_frac().item() == 0.0  # nothing is dead before a window has passed
    stats.update(later, 50)
    # 100 tokens seen: latent 3 silent for 100 tokens -> dead; latent 2 silent for 50 -> alive.
    assert stats.dead_frac().item() == 0.25
    assert torch.allclose(
        stats.density(), torch.tensor([1.0, 0.05, 0.01, 0.0], dtype=torch.float64)
    )
    assert stats.dense_frac().item() == 0.25  # only latent 0 fires on > 10% of tokens
    stats.update(later, 50)
    assert stats.dead_frac().item() == 0.5  # latent 2 now silent for 100 tokens too
    assert stats.ghost_mask(window_steps=1).tolist() == [False, False, True, True]
    assert stats.ghost_mask(window_steps=2).tolist() == [False, False, False, True]
    # A latent that fires again is alive again.
    stats.update(torch.tensor([1, 1, 1, 0]), 50)
    assert stats.dead_frac().item() == 0.25
    restored = LatentStats(4, window_tokens=100, device="cpu")
    restored.load_state_dict(stats.state_dict())
    assert torch.equal(restored.density(), stats.density())
    assert torch.equal(restored.tokens_since_fired_F, stats.tokens_since_fired_F)


def test_ghost_candidates_hold_every_latent_the_mask_takes_until_the_next_refresh():
    """Refreshed every ``horizon`` steps, the candidates include each latent that the ghost mask
    holds at any step of the interval, whatever fires meanwhile."""
    torch.manual_seed(3)
    stats, window, horizon = LatentStats(200, 10_000, "cpu"), 6, 4
    candidates = torch.empty(0, dtype=torch.long)
    for step in range(60):
        if step % horizon == 0:
            candidates = stats.ghost_candidates(window, horizon)
        masked = torch.nonzero(stats.ghost_mask(window)).flatten()
        assert set(masked.tolist()) <= set(candidates.tolist()), step
        fired = (torch.rand(200) < 0.05).long() * 3
        stats.update(fired, 64)
    assert 0 < len(candidates) < 200
