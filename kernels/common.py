"""What the fast paths (``kernels.autograd``, ``kernels.topk``, ``kernels.cpu``) share: the step
record, the per-token weights of the squared error and the terms on silent latents, computed
on those latents' columns only.

Shape legend: N tokens, D model width, F latents, M latents in the silent mask.

The terms on silent latents (relu's ghost gradients, AuxK, jumprelu's pull) are eager PyTorch on top of a fast
path's Function: ``pre_NM = (x - b_dec) @ W_enc[:, M] + b_enc[M]`` is recomputed for the M
masked latents and the reference's term runs on it, so autograd sends its gradients to
``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` and ``x``, where they add to the Function's. With M
at a fraction of F this costs that fraction of the full term, with the same value and gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from patchsae.kernels.reference import auxk_loss, ghost_loss, preact_loss, squared_error
from torch import Tensor


@dataclass
class StepInfo:
    """What a fast path's forward measured and chose."""

    sparse: bool = False
    active: int | None = None
    """Active (token, latent) entries of the batch (None when not measured)."""
    max_row_active: int | None = None
    ghost_latents: int = 0


def token_weights(x_ND: Tensor, mse_norm: str) -> Tensor:
    """fp32 (fp64 for fp64 inputs) per-token weight of the squared error (``squared_error``'s
    normalisation)."""
    dtype = torch.float64 if x_ND.dtype == torch.float64 else torch.float32
    if mse_norm == "token_norm":
        return 1.0 / x_ND.to(dtype).norm(dim=1).clamp_min(1e-8)
    return torch.ones(x_ND.shape[0], dtype=dtype, device=x_ND.device)


def decoder_norm_l1_grad(
    l1_scale: Tensor, colsum_F: Tensor, s_F: Tensor, W_dec_FD: Tensor
) -> Tensor:
    """The decoder-norm L1 term's gradient of ``W_dec``: ``d l1 / d W_dec[f] = l1_scale *
    sum_n f[n, f] * W_dec[f] / |W_dec[f]|`` (``colsum_F``: the code's column sums; ``s_F``: the
    row norms), in ``s_F``'s dtype."""
    coef_F = l1_scale * torch.where(s_F > 0, colsum_F / s_F, 0.0)
    return coef_F[:, None] * W_dec_FD.to(s_F.dtype)


def token_norm_x_grad(x_ND: Tensor, sq_N: Tensor, n_elements: int) -> Tensor:
    """``token_norm``'s own part of the MSE's gradient of ``x`` (through the target's norm):
    ``-sq_N / |x_n|^3 * x_n / n_elements``, with ``sq_N`` each token's unweighted squared
    error; in ``sq_N``'s dtype."""
    x = x_ND.to(sq_N.dtype)
    norm_N = x.norm(dim=1)
    coef_N = torch.where(norm_N > 1e-8, sq_N / norm_N.pow(3), 0.0) / n_elements
    return -coef_N[:, None] * x


def masked_pre(
    x_ND: Tensor,
    W_enc_DF: Tensor,
    b_enc_F: Tensor,
    b_dec_D: Tensor,
    mask_F: Tensor,
    n_masked: int,
) -> tuple[Tensor, Tensor]:
    """The ``n_masked`` latents of ``mask_F`` in index order (a stable sort puts them first:
    no other sync) and their pre-activations ``[N, M]``, with autograd, for the eager terms on
    silent latents (ghost grads, AuxK)."""
    latents_M = torch.sort(mask_F.logical_not().to(torch.uint8), stable=True).indices[:n_masked]
    return latents_M, (x_ND - b_dec_D) @ W_enc_DF[:, latents_M] + b_enc_F[latents_M]


def silent_term(
    architecture: str,
    x_ND: Tensor,
    W_enc_DF: Tensor,
    b_enc_F: Tensor,
    W_dec_FD: Tensor,
    b_dec_D: Tensor,
    x_hat_ND: Tensor,
    mask_F: Tensor,
    n_masked: int,
    *,
    mse_norm: str = "none",
    aux_k: int = 0,
    aux_coeff: float = 0.0,
    threshold_F: Tensor | None = None,
) -> Tensor:
    """The reference's term on the ``n_masked`` latents of ``mask_F`` (``mask_F.sum()``, which
    the caller has read): ghost gradients for ``relu``, ``aux_coeff`` times AuxK for ``topk``
    and ``batchtopk``, ``aux_coeff`` times the pre-activation pull for ``jumprelu`` (with its
    ``threshold_F``); exactly 0 when ``n_masked`` is 0."""
    if n_masked == 0:
        return torch.zeros((), dtype=x_ND.dtype, device=x_ND.device)
    every_M = torch.ones(n_masked, dtype=torch.bool, device=x_ND.device)
    if architecture == "jumprelu":
        assert threshold_F is not None
        x_fixed_ND, b_fixed_D = x_ND.detach(), b_dec_D.detach()  # the reference's: no pull on them
        latents_M, pre_NM = masked_pre(x_fixed_ND, W_enc_DF, b_enc_F, b_fixed_D, mask_F, n_masked)
        theta_M = threshold_F[latents_M].to(pre_NM.dtype)
        return aux_coeff * preact_loss(pre_NM, theta_M, every_M)
    latents_M, pre_NM = masked_pre(x_ND, W_enc_DF, b_enc_F, b_dec_D, mask_F, n_masked)
    if architecture == "relu":
        x_hat_ND = x_hat_ND.detach()
        err_ND = squared_error(x_hat_ND, x_ND.detach(), mse_norm)
        return ghost_loss(x_ND, x_hat_ND, pre_NM, W_dec_FD[latents_M], every_M, err_ND, mse_norm)
    # latents_M is in index order, as the reference's tie rule needs
    return aux_coeff * auxk_loss(x_ND, x_hat_ND, pre_NM, W_dec_FD[latents_M], every_M, aux_k)
