"""Eager PyTorch reference of the SAE forward pass and loss: the specification.

Every fast path (Triton, sparse, distributed) is tested against these functions.

Shape legend: N tokens, D model width, F latents.

    pre_NF   = (x_ND - b_dec_D) @ W_enc_DF + b_enc_F
    f_NF     = relu(pre_NF)
    x_hat_ND = f_NF @ W_dec_FD + b_dec_D
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

MSE_NORMS = ("none", "token_norm")


class SAEOutput(NamedTuple):
    loss: Tensor
    """Scalar: ``mse + l1 + aux``; what the optimiser minimises."""
    mse: Tensor
    """Scalar reconstruction term (see ``mse_norm``)."""
    l1: Tensor
    """Scalar sparsity term, already multiplied by ``l1_coeff``."""
    aux: Tensor
    """Scalar ghost-gradient term (0 when no latent is silent)."""
    f_NF: Tensor
    """Latent code after ReLU."""
    x_hat_ND: Tensor
    """Reconstruction."""


def sae_forward(
    x_ND: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, W_dec_FD: Tensor, b_dec_D: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(pre_NF, f_NF, x_hat_ND)``."""
    pre_NF = (x_ND - b_dec_D) @ W_enc_DF + b_enc_F
    f_NF = torch.relu(pre_NF)
    x_hat_ND = f_NF @ W_dec_FD + b_dec_D
    return pre_NF, f_NF, x_hat_ND


def squared_error(x_ND: Tensor, target_ND: Tensor, mse_norm: str) -> Tensor:
    """Per-element squared error ``[N, D]``; ``token_norm`` divides each token's row by the
    target token's L2 norm (the PatchSAE code's normalisation)."""
    err_ND = (x_ND - target_ND).pow(2)
    if mse_norm == "token_norm":
        err_ND = err_ND / target_ND.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    elif mse_norm != "none":
        raise ValueError(f"unknown mse_norm {mse_norm!r}; use one of {list(MSE_NORMS)}")
    return err_ND


def sae_loss(
    x_ND: Tensor,
    W_enc_DF: Tensor,
    b_enc_F: Tensor,
    W_dec_FD: Tensor,
    b_dec_D: Tensor,
    *,
    l1_coeff: float,
    mse_norm: str = "none",
    l1_decoder_norm: bool = False,
    ghost_mask_F: Tensor | None = None,
) -> SAEOutput:
    """The SAE forward pass and its training loss.

    - ``mse``: mean over tokens and features of the squared error (``squared_error``).
    - ``l1``: ``l1_coeff`` times the mean over tokens of ``sum_F |f|`` (each latent weighted by
      its decoder-row norm when ``l1_decoder_norm``).
    - ``aux``: ghost gradients for the latents in ``ghost_mask_F`` (bool ``[F]``): their
      ``exp(pre)`` decodes the (detached) residual, scaled to half its norm, and the term is
      rescaled to the size of the MSE. Only masked latents receive gradient from it. The mask is
      applied by multiplication so that no host sync is needed; with no latent masked the term
      is exactly 0.
    """
    pre_NF, f_NF, x_hat_ND = sae_forward(x_ND, W_enc_DF, b_enc_F, W_dec_FD, b_dec_D)
    err_ND = squared_error(x_hat_ND, x_ND, mse_norm)
    mse = err_ND.mean()

    l1_NF = f_NF.abs()
    if l1_decoder_norm:
        l1_NF = l1_NF * W_dec_FD.norm(dim=-1)
    l1 = l1_coeff * l1_NF.sum(dim=-1).mean()

    if ghost_mask_F is None:
        aux = torch.zeros((), dtype=mse.dtype, device=mse.device)
    else:
        aux = ghost_loss(x_ND, x_hat_ND, pre_NF, W_dec_FD, ghost_mask_F, err_ND, mse_norm)
    return SAEOutput(mse + l1 + aux, mse, l1, aux, f_NF, x_hat_ND)


def ghost_loss(
    x_ND: Tensor,
    x_hat_ND: Tensor,
    pre_NF: Tensor,
    W_dec_FD: Tensor,
    ghost_mask_F: Tensor,
    err_ND: Tensor,
    mse_norm: str,
) -> Tensor:
    """Ghost-gradient term (Jermyn & Templeton, 2024), as in the PatchSAE training code."""
    residual_ND = (x_ND - x_hat_ND).detach()
    mask_F = ghost_mask_F.to(pre_NF.dtype)
    ghost_NF = torch.exp(pre_NF) * mask_F
    ghost_out_ND = ghost_NF @ W_dec_FD
    # Scale the ghost reconstruction to half the residual's norm, per token (no gradient).
    scale_N = residual_ND.norm(dim=-1) / (1e-6 + 2 * ghost_out_ND.norm(dim=-1))
    ghost_out_ND = ghost_out_ND * scale_N[:, None].detach()
    ghost_err_ND = squared_error(ghost_out_ND, residual_ND, mse_norm)
    rescale_ND = (err_ND / (ghost_err_ND + 1e-6)).detach()
    aux = (rescale_ND * ghost_err_ND).mean()
    # Exactly zero when no latent is masked (the scaled term would otherwise equal the MSE).
    return aux * ghost_mask_F.any().to(aux.dtype)
