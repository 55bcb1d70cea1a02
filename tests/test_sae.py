"""SAE module: decoder constraint, gradient projection, geometric median, export folding."""

from __future__ import annotations

import torch
from patchsae import kernels
from patchsae.trainer.sae import SparseAutoencoder, geometric_median


def test_decoder_rows_unit_norm_after_init_and_step():
    torch.manual_seed(0)
    sae = SparseAutoencoder(13, 37)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(37), atol=1e-6)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(50, 13)
    for _ in range(3):
        out = sae(x, l1_coeff=1e-3)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sae.normalize_decoder()
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(37), atol=1e-6)


def test_parallel_gradient_component_removed():
    """The decoder's gradient arrives projected: it equals the unconstrained gradient minus its
    component along each row."""
    torch.manual_seed(1)
    sae = SparseAutoencoder(9, 21)
    x = torch.randn(40, 9)
    sae(x, l1_coeff=1e-2).loss.backward()
    g, w = sae.W_dec.grad, sae.W_dec.detach()
    # The same loss with the raw decoder (no projection in the graph).
    W_dec = sae.W_dec.detach().clone().requires_grad_()
    raw = kernels.sae_loss(
        x, sae.W_enc.detach(), sae.b_enc.detach(), W_dec, sae.b_dec.detach(), l1_coeff=1e-2
    )
    raw.loss.backward()
    before = W_dec.grad
    # No component along each row remains ...
    assert (g * w).sum(dim=1).abs().max() < 1e-6
    # ... and what was removed is exactly that component.
    parallel = (before * w).sum(dim=1, keepdim=True) * w
    assert torch.allclose(before - g, parallel, atol=1e-6)
    assert parallel.abs().max() > 1e-4  # the test is not vacuous


def test_projection_commutes_with_summing_rank_gradients():
    """Data parallelism projects each rank's gradient before the reduction; that equals
    projecting the summed gradient (what one process on the whole batch gets)."""
    torch.manual_seed(5)
    sae = SparseAutoencoder(11, 30)
    x = torch.randn(64, 11)
    grads = []
    for part in (x[:32], x[32:], x):
        sae.zero_grad()
        sae(part, l1_coeff=1e-2).loss.backward()
        grads.append(sae.W_dec.grad.clone())
    assert torch.allclose((grads[0] + grads[1]) / 2, grads[2], atol=1e-6)


def test_geometric_median_matches_brute_force_and_resists_outliers():
    torch.manual_seed(2)
    pts = torch.randn(200, 3) + torch.tensor([5.0, -2.0, 1.0])
    pts[:20] += 1000.0  # 10% gross outliers
    med = geometric_median(pts)

    def cost(c):
        return (pts - c).norm(dim=1).sum()

    # A local perturbation never lowers the objective (it is convex: local = global).
    for _ in range(50):
        assert cost(med) <= cost(med + 0.01 * torch.randn(3)) + 1e-3
    assert (med - torch.tensor([5.0, -2.0, 1.0])).norm() < 0.5  # the mean is ~100 away
    assert (pts.mean(0) - torch.tensor([5.0, -2.0, 1.0])).norm() > 50


def test_input_scaling_is_folded_into_export():
    torch.manual_seed(3)
    x = 7.0 * torch.randn(64, 10) + 3.0
    sae = SparseAutoencoder(10, 24)
    sae.init_from_sample(x, "geometric_median", scale_inputs=True)
    s = sae.input_scale.item()
    assert abs((x * s).norm(dim=1).mean().item() - 10**0.5) < 1e-4
    with torch.no_grad():
        sae.b_enc.normal_()  # make the test sensitive to the b_enc fold
        trained = sae(x, l1_coeff=0.0)
        exported = SparseAutoencoder.from_exported(sae.export_tensors())
        raw = exported(x, l1_coeff=0.0)
    assert exported.input_scale.item() == 1.0
    # Same reconstruction in raw units, latents divided by the scale, decoder still unit norm.
    assert torch.allclose(raw.x_hat_ND, trained.x_hat_ND / s, atol=1e-4)
    assert torch.allclose(raw.f_NF, trained.f_NF / s, atol=1e-5)
    assert torch.allclose(exported.W_dec.norm(dim=1), torch.ones(24), atol=1e-6)
