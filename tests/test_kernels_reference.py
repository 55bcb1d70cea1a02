"""The eager reference against hand-computed values and autograd identities."""

from __future__ import annotations

import pytest
import torch
from patchsae.kernels import kernel_path
from patchsae.kernels.reference import sae_forward, sae_loss


def _tiny():
    # D = 2, F = 3, N = 2: small enough to compute by hand.
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    W_enc = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]])
    b_enc = torch.tensor([0.0, -1.0, 0.5])
    W_dec = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    b_dec = torch.tensor([0.5, 0.5])
    return x, W_enc, b_enc, W_dec, b_dec


def test_forward_and_loss_match_hand_computation():
    x, W_enc, b_enc, W_dec, b_dec = _tiny()
    pre, f, x_hat = sae_forward(x, W_enc, b_enc, W_dec, b_dec)
    # x - b_dec = [[0.5, 1.5], [2.5, -1.5]]
    # pre = [[0.5, 1.5 - 1, -0.5 + 1.5 + 0.5], [2.5, -1.5 - 1, -2.5 - 1.5 + 0.5]]
    assert torch.allclose(pre, torch.tensor([[0.5, 0.5, 1.5], [2.5, -2.5, -3.5]]))
    assert torch.allclose(f, torch.tensor([[0.5, 0.5, 1.5], [2.5, 0.0, 0.0]]))
    # x_hat row 0 = 0.5*[1,0] + 0.5*[0,1] + 1.5*[0.6,0.8] + b_dec = [1.9, 2.2]
    assert torch.allclose(x_hat, torch.tensor([[1.9, 2.2], [3.0, 0.5]]))
    out = sae_loss(x, W_enc, b_enc, W_dec, b_dec, l1_coeff=0.1)
    # squared errors: [[0.81, 0.04], [0, 2.25]] -> mean 0.775
    assert out.mse.item() == pytest.approx(0.775)
    # |f| summed per token: [2.5, 2.5] -> mean 2.5 -> * 0.1
    assert out.l1.item() == pytest.approx(0.25)
    assert out.aux.item() == 0.0
    assert out.loss.item() == pytest.approx(1.025)


def test_token_norm_mse_and_decoder_weighted_l1():
    x, W_enc, b_enc, W_dec, b_dec = _tiny()
    W_dec = W_dec * torch.tensor([[2.0], [1.0], [1.0]])  # row 0 has norm 2
    out = sae_loss(
        x, W_enc, b_enc, W_dec, b_dec, l1_coeff=1.0, mse_norm="token_norm", l1_decoder_norm=True
    )
    _, f, x_hat = sae_forward(x, W_enc, b_enc, W_dec, b_dec)
    err = (x_hat - x).pow(2) / x.norm(dim=1, keepdim=True)
    assert out.mse.item() == pytest.approx(err.mean().item())
    # token 0: 2*0.5 + 0.5 + 1.5 = 3.0; token 1: 2*2.5 = 5.0
    assert out.l1.item() == pytest.approx(4.0)


def test_ghost_grads_reach_only_silent_latents():
    torch.manual_seed(0)
    n, d, f = 37, 11, 29
    x = torch.randn(n, d)
    params = [
        torch.randn(d, f, requires_grad=True),
        torch.randn(f, requires_grad=True),
        torch.randn(f, d, requires_grad=True),
        torch.randn(d, requires_grad=True),
    ]
    mask = torch.zeros(f, dtype=torch.bool)
    mask[[2, 5, 17]] = True
    out = sae_loss(x, *params, l1_coeff=0.0, ghost_mask_F=mask)
    assert out.aux.item() > 0
    grads = torch.autograd.grad(out.aux, params, allow_unused=True)
    # b_dec is not checked: it reaches the silent latents' pre-activations through the encoder.
    g_W_enc, g_b_enc, g_W_dec, _ = grads
    assert g_W_enc[:, ~mask].abs().max() == 0 and g_W_enc[:, mask].abs().max() > 0
    assert g_b_enc[~mask].abs().max() == 0 and g_b_enc[mask].abs().max() > 0
    assert g_W_dec[~mask].abs().max() == 0 and g_W_dec[mask].abs().max() > 0
    # The ghost term is rescaled to the size of the MSE.
    assert out.aux.item() == pytest.approx(out.mse.item(), rel=0.05)


def test_ghost_term_is_zero_without_silent_latents():
    torch.manual_seed(1)
    x, W_enc, b_enc, W_dec, b_dec = (
        torch.randn(5, 3),
        torch.randn(3, 4),
        torch.randn(4),
        torch.randn(4, 3),
        torch.randn(3),
    )
    mask = torch.zeros(4, dtype=torch.bool)
    out = sae_loss(x, W_enc, b_enc, W_dec, b_dec, l1_coeff=0.0, ghost_mask_F=mask)
    assert out.aux.item() == 0.0
    assert out.loss.item() == pytest.approx(out.mse.item())


def test_ghost_term_on_candidate_columns_equals_the_full_term():
    """The trainer passes the latents that can be silent in a log interval; the ghost term on
    those columns has the value and the gradients of the term over all latents."""
    torch.manual_seed(2)
    n, d, f = 41, 13, 57
    x = torch.randn(n, d)
    params = [torch.randn(d, f), torch.randn(f), torch.randn(f, d), torch.randn(d)]
    params = [p.requires_grad_() for p in params]
    mask = torch.zeros(f, dtype=torch.bool)
    mask[[3, 8, 40]] = True
    candidates = torch.tensor([1, 3, 8, 22, 40, 56])  # a superset of the mask
    full = sae_loss(x, *params, l1_coeff=1e-3, ghost_mask_F=mask)
    part = sae_loss(x, *params, l1_coeff=1e-3, ghost_mask_F=mask, ghost_index_G=candidates)
    torch.testing.assert_close(part.aux, full.aux)
    torch.testing.assert_close(part.loss, full.loss)
    for g_full, g_part in zip(
        torch.autograd.grad(full.loss, params), torch.autograd.grad(part.loss, params), strict=True
    ):
        torch.testing.assert_close(g_part, g_full)


def test_dispatch_names_the_path_and_refuses_unknown_kernels(monkeypatch):
    monkeypatch.setenv("PATCHSAE_KERNELS", "eager")
    assert kernel_path() == "eager"
    monkeypatch.setenv("PATCHSAE_KERNELS", "cuda-magic")
    with pytest.raises(ValueError, match="PATCHSAE_KERNELS"):
        kernel_path()
    monkeypatch.setenv("PATCHSAE_KERNELS", "triton")
    assert kernel_path() == "triton"  # CPU: Triton's interpreter (conftest sets TRITON_INTERPRET=1)
