"""Eager PyTorch reference of the SAE forward pass and loss: the specification.

Every fast path (Triton, sparse, distributed) is tested against these functions.

Shape legend: N tokens, D model width, F latents.

    pre_NF   = (x_ND - b_dec_D) @ W_enc_DF + b_enc_F
    f_NF     = act(pre_NF)
    x_hat_ND = f_NF @ W_dec_FD + b_dec_D

with ``act`` one of the architectures (:func:`activate`):

- ``relu``: ``relu(pre)``, trained with an L1 penalty (and ghost gradients for silent latents);
- ``topk``: each token keeps its ``k`` largest pre-activations (then ReLU), trained with AuxK
  (the ``aux_k`` largest pre-activations of dead latents reconstruct the residual);
- ``batchtopk``: the batch keeps its ``k * N`` largest ReLU'd pre-activations, so tokens share a
  budget of ``k`` on average; at inference a threshold estimated in training replaces the
  selection (``pre > threshold``, JumpReLU-style); trained with AuxK;
- ``jumprelu``: ``pre * (pre > threshold_F)`` with a learned threshold per latent, trained with
  an L0 penalty; the threshold's gradient comes from a straight-through estimator with a
  rectangle kernel of width ``bandwidth`` (Rajamanoharan et al., 2024); silent latents are
  pulled up to their thresholds (:func:`preact_loss`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

MSE_NORMS = ("none", "token_norm")
ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")


class SAEOutput(NamedTuple):
    loss: Tensor
    """Scalar: ``mse + l1 + aux``; what the optimiser minimises."""
    mse: Tensor
    """Scalar reconstruction term (see ``mse_norm``)."""
    l1: Tensor
    """Scalar sparsity term, already multiplied by ``l1_coeff``: L1 (relu), L0 (jumprelu), 0
    (topk, batchtopk)."""
    aux: Tensor
    """Scalar auxiliary term for silent latents: ghost gradients (relu), AuxK (topk,
    batchtopk), the pre-activation pull (jumprelu); 0 when no latent is silent."""
    f_NF: Tensor
    """Latent code after ReLU."""
    x_hat_ND: Tensor
    """Reconstruction."""


def top_mask(values_NF: Tensor, k: int, *, over_batch: bool = False) -> Tensor:
    """Bool mask of the ``k`` largest entries of each row (of the whole tensor, ``k`` per row on
    average, when ``over_batch``). Among equal values the lower index (row-major) wins, so the
    selection does not depend on how ``topk`` orders ties."""
    v = values_NF.reshape(1, -1) if over_batch else values_NF
    keep = min(k * values_NF.shape[0] if over_batch else k, v.shape[1])
    if keep <= 0:
        return torch.zeros_like(values_NF, dtype=torch.bool)
    if v.device.type == "cpu" and not over_batch:
        return _top_mask_cpu(v, keep).reshape(values_NF.shape)
    return _top_mask_rule(v, keep).reshape(values_NF.shape)


def _top_mask_rule(v: Tensor, keep: int) -> Tensor:
    """The rule of :func:`top_mask` on each row, with no host sync: everything above the k-th
    value, then the tied entries at it in index order (a cumulative count over every entry)."""
    kth = v.topk(keep, dim=-1).values[:, -1:]
    above, tie = v > kth, v == kth
    room = keep - above.sum(dim=-1, keepdim=True)
    return above | (tie & (tie.cumsum(dim=-1) <= room))


def _top_mask_cpu(v: Tensor, keep: int) -> Tensor:
    """:func:`top_mask` where a host sync is free: ``topk``'s own choice, then the rule on the
    rows (rare) where an entry left out ties the k-th value, so ``topk``'s order among ties
    does not matter. A third of the rule's cost on every row."""
    values, index = v.topk(keep, dim=-1, sorted=False)
    kth = values.min(dim=-1, keepdim=True).values
    mask = torch.zeros_like(v, dtype=torch.bool).scatter_(1, index, True)
    tied_rows = ((v >= kth).sum(dim=-1) > keep).nonzero().flatten()
    if len(tied_rows):
        mask[tied_rows] = _top_mask_rule(v[tied_rows], keep)
    return mask


def _rectangle(u: Tensor) -> Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """``pre * (pre > threshold)``; the threshold's pseudo-derivative is
    ``-(threshold / bandwidth) * rect((pre - threshold) / bandwidth)``."""

    @staticmethod
    def forward(ctx: Any, pre_NF: Tensor, threshold_F: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre_NF, threshold_F)
        ctx.bandwidth = bandwidth
        return pre_NF * (pre_NF > threshold_F)

    @staticmethod
    def backward(ctx: Any, grad_NF: Tensor) -> tuple[Tensor, Tensor, None]:
        pre_NF, threshold_F = ctx.saved_tensors
        window_NF = _rectangle((pre_NF - threshold_F) / ctx.bandwidth)
        grad_threshold_F = -(threshold_F / ctx.bandwidth) * (grad_NF * window_NF).sum(dim=0)
        return grad_NF * (pre_NF > threshold_F), grad_threshold_F, None


class _Step(torch.autograd.Function):
    """``(pre > threshold)`` as a number; the threshold's pseudo-derivative is
    ``-(1 / bandwidth) * rect((pre - threshold) / bandwidth)``, none for ``pre``."""

    @staticmethod
    def forward(ctx: Any, pre_NF: Tensor, threshold_F: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre_NF, threshold_F)
        ctx.bandwidth = bandwidth
        return (pre_NF > threshold_F).to(pre_NF.dtype)

    @staticmethod
    def backward(ctx: Any, grad_NF: Tensor) -> tuple[None, Tensor, None]:
        pre_NF, threshold_F = ctx.saved_tensors
        window_NF = _rectangle((pre_NF - threshold_F) / ctx.bandwidth)
        return None, -(grad_NF * window_NF).sum(dim=0) / ctx.bandwidth, None


def activate(
    pre_NF: Tensor,
    architecture: str = "relu",
    *,
    k: int = 0,
    threshold_F: Tensor | None = None,
    bandwidth: float = 1e-3,
) -> Tensor:
    """The latent code of ``pre_NF`` under ``architecture`` (see the module docstring). Gradients
    flow to the selected entries only; ``threshold_F`` (jumprelu) gets the straight-through
    estimate."""
    if architecture == "relu":
        return torch.relu(pre_NF)
    if architecture == "topk":
        return torch.relu(pre_NF) * top_mask(pre_NF.detach(), k)
    if architecture == "batchtopk":
        relu_NF = torch.relu(pre_NF)
        return relu_NF * top_mask(relu_NF.detach(), k, over_batch=True)
    if architecture == "jumprelu":
        if threshold_F is None:
            raise ValueError("jumprelu needs threshold_F")
        return _JumpReLU.apply(pre_NF, threshold_F.to(pre_NF.dtype), bandwidth)
    raise ValueError(f"unknown architecture {architecture!r}; use one of {list(ARCHITECTURES)}")


def sae_forward(
    x_ND: Tensor,
    W_enc_DF: Tensor,
    b_enc_F: Tensor,
    W_dec_FD: Tensor,
    b_dec_D: Tensor,
    architecture: str = "relu",
    **activation: Any,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(pre_NF, f_NF, x_hat_ND)``; ``activation``: the options of :func:`activate`."""
    pre_NF = (x_ND - b_dec_D) @ W_enc_DF + b_enc_F
    f_NF = activate(pre_NF, architecture, **activation)
    x_hat_ND = f_NF @ W_dec_FD + b_dec_D
    return pre_NF, f_NF, x_hat_ND


def check_mse_norm(mse_norm: str) -> None:
    """Refuse an ``mse_norm`` that is not one of ``MSE_NORMS``."""
    if mse_norm not in MSE_NORMS:
        raise ValueError(f"unknown mse_norm {mse_norm!r}; use one of {list(MSE_NORMS)}")


def squared_error(x_ND: Tensor, target_ND: Tensor, mse_norm: str) -> Tensor:
    """Per-element squared error ``[N, D]``; ``token_norm`` divides each token's row by the
    target token's L2 norm (the PatchSAE code's normalisation)."""
    check_mse_norm(mse_norm)
    err_ND = (x_ND - target_ND).pow(2)
    if mse_norm == "token_norm":
        err_ND = err_ND / target_ND.norm(dim=-1, keepdim=True).clamp_min(1e-8)
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
    architecture: str = "relu",
    k: int = 0,
    threshold_F: Tensor | None = None,
    bandwidth: float = 1e-3,
    aux_k: int = 0,
    aux_coeff: float = 0.0,
    ghost_index_G: Tensor | None = None,
) -> SAEOutput:
    """The SAE forward pass and its training loss.

    - ``mse``: mean over tokens and features of the squared error (``squared_error``).
    - ``l1``: relu: ``l1_coeff`` times the mean over tokens of ``sum_F |f|`` (each latent
      weighted by its decoder-row norm when ``l1_decoder_norm``); jumprelu: ``l1_coeff`` times
      the mean L0 (straight-through to the threshold); topk, batchtopk: 0.
    - ``aux``, for the latents in ``ghost_mask_F`` (bool ``[F]``, the silent ones); the mask is
      applied by multiplication so that no host sync is needed, and with no latent masked the
      term is exactly 0. relu: ghost gradients: their ``exp(pre)`` decodes the (detached)
      residual, scaled to half its norm, and the term is rescaled to the size of the MSE.
      topk, batchtopk: ``aux_coeff`` times AuxK (:func:`auxk_loss`). jumprelu: ``aux_coeff``
      times :func:`preact_loss`.
    - ``ghost_index_G``: relu: latents known to include every masked one (the trainer's
      candidates for a log interval); the ghost term is computed on those columns only, which
      gives the same value and gradients at a fraction of the cost.
    """
    pre_NF, f_NF, x_hat_ND = sae_forward(
        x_ND,
        W_enc_DF,
        b_enc_F,
        W_dec_FD,
        b_dec_D,
        architecture,
        k=k,
        threshold_F=threshold_F,
        bandwidth=bandwidth,
    )
    err_ND = squared_error(x_hat_ND, x_ND, mse_norm)
    mse = err_ND.mean()
    zero = torch.zeros((), dtype=mse.dtype, device=mse.device)

    if architecture == "relu":
        l1_NF = f_NF.abs()
        if l1_decoder_norm:
            l1_NF = l1_NF * W_dec_FD.norm(dim=-1)
        l1 = l1_coeff * l1_NF.sum(dim=-1).mean()
    elif architecture == "jumprelu":
        assert threshold_F is not None  # activate() has checked
        l0_NF = _Step.apply(pre_NF, threshold_F.to(pre_NF.dtype), bandwidth)
        l1 = l1_coeff * l0_NF.sum(dim=-1).mean()
    else:
        l1 = zero

    if ghost_mask_F is None:
        aux = zero
    elif architecture == "jumprelu":
        assert threshold_F is not None
        pre_fixed_NF = (x_ND - b_dec_D).detach() @ W_enc_DF + b_enc_F  # no pull on x, b_dec
        theta_F = threshold_F.to(pre_NF.dtype)
        aux = aux_coeff * preact_loss(pre_fixed_NF, theta_F, ghost_mask_F)
    elif architecture == "relu":
        if ghost_index_G is not None:  # the columns that can be masked: the same term
            pre_NF, W_dec_FD = pre_NF[:, ghost_index_G], W_dec_FD[ghost_index_G]
            ghost_mask_F = ghost_mask_F[ghost_index_G]
        aux = ghost_loss(x_ND, x_hat_ND, pre_NF, W_dec_FD, ghost_mask_F, err_ND, mse_norm)
    else:
        aux = aux_coeff * auxk_loss(x_ND, x_hat_ND, pre_NF, W_dec_FD, ghost_mask_F, aux_k)
    return SAEOutput(mse + l1 + aux, mse, l1, aux, f_NF, x_hat_ND)


def auxk_loss(
    x_ND: Tensor, x_hat_ND: Tensor, pre_NF: Tensor, W_dec_FD: Tensor, dead_F: Tensor, aux_k: int
) -> Tensor:
    """AuxK (Gao et al., 2024): the ``aux_k`` largest pre-activations among the dead latents
    decode the (detached) residual, as a squared error normalised by the residual's variance
    over the batch. Only dead latents receive gradient; 0 when none is dead."""
    residual_ND = (x_ND - x_hat_ND).detach()
    dead_pre_NF = torch.where(dead_F, pre_NF, torch.finfo(pre_NF.dtype).min)
    chosen_NF = top_mask(dead_pre_NF.detach(), aux_k) & dead_F
    aux_out_ND = (torch.relu(pre_NF) * chosen_NF) @ W_dec_FD
    scale = (residual_ND - residual_ND.mean(dim=0)).pow(2).sum(dim=-1).mean().clamp_min(1e-12)
    aux = (aux_out_ND - residual_ND).pow(2).sum(dim=-1).mean() / scale
    return aux * dead_F.any().to(aux.dtype)


def preact_loss(pre_NF: Tensor, threshold_F: Tensor, silent_F: Tensor) -> Tensor:
    """jumprelu's term on silent latents, after Anthropic's pre-activation loss (2025): the
    mean over tokens and silent latents of ``relu(threshold - pre)``. A silent latent gets no
    other gradient (nothing of it is in the code), so this pulls its pre-activations up and its
    threshold down until it fires again. Only the silent latents' own encoder column, bias and
    threshold receive gradient (the caller computes ``pre_NF`` from detached inputs); 0 when
    none is silent."""
    gap_NF = torch.relu(threshold_F - pre_NF) * silent_F.to(pre_NF.dtype)
    count = silent_F.sum().clamp_min(1) * pre_NF.shape[0]
    return gap_NF.sum() / count


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
