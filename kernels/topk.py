"""The Triton path of the selection architectures (``topk``, ``batchtopk``, ``jumprelu``): a
dense encoder GEMM, the selection, then the exactly sparse decoder and backward on the gather
kernels of ``kernels.triton_kernels``.

Shape legend: N tokens, D model width, F latents, K slots per token, M dead latents, W slots
per token of jumprelu's window.

Forward::

    pre  = (x - b_dec) @ W_enc + b_enc                   dense GEMM (cuBLAS on a GPU)
    f    = activate(pre)                                 the reference's selection (ties too)
    code = f.topk(K): each token's selected entries, largest first; nnz = how many are > 0
    x_hat = code @ W_dec + b_dec, squared error, seed    gather decoder (K rows per token)

``K`` is ``k`` for ``topk``; for ``batchtopk`` and ``jumprelu`` it is the largest per-token
count of the batch, read back once (the step's one host sync; ``topk`` has none in the
forward). The backward is the ReLU path's sparse backward (``autograd.sae_backward``): the
code's gradient at the K slots, and both weight gradients through the latent-major transpose,
whose size (the number of active entries) is read back there. Nothing of size N x F is computed
after the encoder but the dense code the trainer reads.

``jumprelu`` (thresholds >= 0, as the trainer's are) also lists, in the same sync, each
token's entries in the straight-through window around the thresholds (``|pre - threshold| /
bandwidth < 0.5``) as W slots; the backward's latent-gradient kernel runs on those slots too,
and the thresholds' gradient is their per-latent sum (with the L0 term's count), as the
reference's estimator gives it. Its L0 term has no gradient but the thresholds'.

AuxK (jumprelu: the pre-activation pull) runs eager on top, on the M dead latents only (their
count is read back when a mask is given): ``pre_NM`` is recomputed for those columns and the
reference's term runs on it, the same value and gradients as on all F columns.
"""

from __future__ import annotations

import torch
from patchsae.kernels import triton_kernels as tk
from patchsae.kernels.autograd import output_grad, sae_backward, scatter_sum
from patchsae.kernels.common import StepInfo, silent_term, token_weights
from patchsae.kernels.reference import SAEOutput, activate, check_mse_norm
from torch import Tensor

SPARSE_ARCHITECTURES = ("topk", "batchtopk", "jumprelu")


class TopKLossFunction(torch.autograd.Function):
    """``(x, W_enc, b_enc, W_dec, b_dec, threshold) -> (mse, l0, f_NF, x_hat_ND)`` for a
    selection architecture (``threshold``: jumprelu's, else None; ``l0``: jumprelu's L0 term,
    else 0), with hand-written gradients for all four outputs."""

    @staticmethod
    def forward(
        ctx,
        x_ND: Tensor,
        W_enc_DF: Tensor,
        b_enc_F: Tensor,
        W_dec_FD: Tensor,
        b_dec_D: Tensor,
        threshold_F: Tensor | None,
        architecture: str,
        k: int,
        bandwidth: float,
        l1_coeff: float,
        mse_norm: str,
        info: StepInfo,
    ):
        N, D = x_ND.shape
        F = W_enc_DF.shape[1]
        w_N = token_weights(x_ND, mse_norm)
        xc_ND = x_ND - b_dec_D
        pre_NF = xc_ND @ W_enc_DF + b_enc_F
        if architecture == "topk":
            f_NF = activate(pre_NF, architecture, k=k).contiguous()
            K, window = min(k, F), None
        else:  # tokens differ in count: the busiest one sizes the code (one host sync)
            theta_F = None if threshold_F is None else threshold_F.to(pre_NF.dtype)
            f_NF = activate(pre_NF, architecture, k=k, threshold_F=theta_F).contiguous()
            probes = [(f_NF > 0).sum(dim=1).max()]
            inside_NF = None
            if architecture == "jumprelu":
                assert theta_F is not None  # triton_topk_loss has checked
                inside_NF = ((pre_NF - theta_F) / bandwidth).abs() < 0.5  # reference's rectangle
                probes.append(inside_NF.sum(dim=1).max())
            counts = torch.stack(probes).tolist()
            K = max(1, counts[0])
            window = None if inside_NF is None else _slots(inside_NF, counts[1])
        del pre_NF
        val_NK, idx_NK = f_NF.topk(K, dim=1)  # the selected (positive) entries come first
        val_NK, idx_NK = val_NK.contiguous(), idx_NK.to(torch.int32).contiguous()
        nnz_N = (val_NK > 0).sum(dim=1, dtype=torch.int32)
        dec = tk.decode_sparse(idx_NK, val_NK, nnz_N, W_dec_FD, b_dec_D, x_ND, w_N)
        mse = (dec.sq_N * w_N).sum() / (N * D)
        l0 = nnz_N.sum() * (l1_coeff / N) if architecture == "jumprelu" else torch.zeros_like(mse)
        info.sparse = True

        ctx.set_materialize_grads(False)
        ctx.save_for_backward(
            x_ND, xc_ND, W_enc_DF, W_dec_FD, f_NF, dec.seed_ND, dec.sq_N, w_N,
            None, None, idx_NK, val_NK, nnz_N, threshold_F,
            *(window if window is not None else (None, None)),
        )  # fmt: skip
        ctx.sparse, ctx.active = True, None  # the count is read in the backward
        ctx.l1_coeff, ctx.mse_norm = 0.0, mse_norm  # no L1 term reaches the pre-activations
        ctx.l0_coeff, ctx.bandwidth = l1_coeff, bandwidth
        ctx.b_enc_dtype, ctx.b_dec_dtype = b_enc_F.dtype, b_dec_D.dtype
        return mse, l0, f_NF, dec.x_hat_ND

    @staticmethod
    def backward(ctx, g_mse, g_l0, g_f_NF, g_x_hat_ND):
        saved = ctx.saved_tensors
        nnz_N, threshold_F, idx_NW, nnz_W_N = saved[12:16]
        ctx.active = int(nnz_N.sum())  # sizes the latent-major transpose
        grads = sae_backward(ctx, g_mse, None, g_f_NF, g_x_hat_ND)
        grad_threshold = None
        if threshold_F is not None and ctx.needs_input_grad[5]:
            x_ND, seed_ND = saved[0], saved[5]
            zero = torch.zeros((), dtype=torch.float32, device=x_ND.device)
            g_ND = output_grad(seed_ND, zero if g_mse is None else g_mse.float(), g_x_hat_ND)
            l0_scale = (zero if g_l0 is None else g_l0.float()) * (ctx.l0_coeff / x_ND.shape[0])
            grad_threshold = _threshold_grad(
                g_ND, saved[3], g_f_NF, idx_NW, nnz_W_N, threshold_F, ctx.bandwidth, l0_scale
            )
        return (*grads, grad_threshold, None, None, None, None, None, None)


def _slots(inside_NF: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Each token's entries of a bool ``[N, F]`` mask as ``width`` slots (int32 indices, then
    how many are used), as the gather kernels take a code."""
    N = inside_NF.shape[0]
    width = max(1, width)
    idx_NW = inside_NF.to(torch.uint8).topk(width, dim=1).indices  # sorted: the ones first
    nnz_N = inside_NF.sum(dim=1, dtype=torch.int32)
    return idx_NW.to(torch.int32).contiguous(), nnz_N.reshape(N)


def _threshold_grad(
    g_ND: Tensor,
    W_dec_FD: Tensor,
    g_f_NF: Tensor | None,
    idx_NW: Tensor,
    nnz_N: Tensor,
    threshold_F: Tensor,
    bandwidth: float,
    l0_scale: Tensor,
) -> Tensor:
    """jumprelu's straight-through gradient of the thresholds: the code's gradient at each
    token's window slots (the latent-gradient kernel, with no L1 term), summed per latent,
    times ``-threshold / bandwidth``, and ``-l0_scale / bandwidth`` per window entry."""
    F = W_dec_FD.shape[0]
    g_op_ND = g_ND.to(tk.grad_dtype(W_dec_FD.dtype))
    zero = torch.zeros((), dtype=torch.float32, device=g_ND.device)
    g_NW = tk.latent_grad_sparse(g_op_ND, W_dec_FD, idx_NW, nnz_N, None, zero)
    valid_NW = tk.valid_slots(nnz_N, idx_NW.shape[1])
    key_NW = torch.where(valid_NW, idx_NW, F).long()
    if g_f_NF is not None:
        g_NW = g_NW + g_f_NF.float().gather(1, key_NW.clamp(max=F - 1))
    sums_F = scatter_sum(g_NW, key_NW, F)
    counts_F = scatter_sum(torch.ones_like(g_NW), key_NW, F)
    theta_F = threshold_F.float()
    grad_F = -(theta_F / bandwidth) * sums_F - (l0_scale / bandwidth) * counts_F
    return grad_F.to(threshold_F.dtype)


@torch.compiler.disable
def triton_topk_loss(
    x_ND: Tensor,
    W_enc_DF: Tensor,
    b_enc_F: Tensor,
    W_dec_FD: Tensor,
    b_dec_D: Tensor,
    *,
    architecture: str,
    k: int = 0,
    threshold_F: Tensor | None = None,
    bandwidth: float = 1e-3,
    l1_coeff: float = 0.0,
    mse_norm: str = "none",
    ghost_mask_F: Tensor | None = None,
    aux_k: int = 0,
    aux_coeff: float = 0.0,
) -> tuple[SAEOutput, StepInfo]:
    """``kernels.reference.sae_loss`` for a selection architecture on the sparse Triton kernels
    (``ghost_mask_F``: the dead latents AuxK trains; jumprelu: ``threshold_F``, >= 0, and
    ``l1_coeff``, the weight of its L0 term)."""
    if architecture not in SPARSE_ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r}: use one of {SPARSE_ARCHITECTURES}")
    check_mse_norm(mse_norm)
    if architecture == "jumprelu":
        if threshold_F is None:
            raise ValueError("jumprelu needs threshold_F")
        if not bandwidth > 0:
            raise ValueError(f"jumprelu bandwidth {bandwidth} must be positive")
    else:
        threshold_F = None
    x_ND, W_enc_DF, b_enc_F, W_dec_FD, b_dec_D = (
        t.contiguous() for t in (x_ND, W_enc_DF, b_enc_F, W_dec_FD, b_dec_D)
    )
    info = StepInfo()
    mse, l0, f_NF, x_hat_ND = TopKLossFunction.apply(
        x_ND, W_enc_DF, b_enc_F, W_dec_FD, b_dec_D, threshold_F, architecture, int(k),
        float(bandwidth), float(l1_coeff), mse_norm, info,
    )  # fmt: skip
    mse, l0 = mse.to(x_ND.dtype), l0.to(x_ND.dtype)
    aux = torch.zeros((), dtype=x_ND.dtype, device=x_ND.device)
    if ghost_mask_F is not None:
        info.ghost_latents = int(ghost_mask_F.sum())
        aux = silent_term(architecture, x_ND, W_enc_DF, b_enc_F, W_dec_FD, b_dec_D, x_hat_ND,
                          ghost_mask_F, info.ghost_latents, aux_k=aux_k, aux_coeff=aux_coeff,
                          threshold_F=threshold_F)  # fmt: skip
    return SAEOutput(mse + l0 + aux, mse, l0, aux, f_NF, x_hat_ND), info
