"""The Triton path of ``topk`` and ``batchtopk``: a dense encoder GEMM, the selection, then the
exactly sparse decoder and backward on the gather kernels of ``kernels.triton_kernels``.

Shape legend: N tokens, D model width, F latents, K slots per token, M dead latents.

Forward::

    pre  = (x - b_dec) @ W_enc + b_enc                   dense GEMM (cuBLAS on a GPU)
    f    = activate(pre)                                 the reference's selection (ties too)
    code = f.topk(K): each token's selected entries, largest first; nnz = how many are > 0
    x_hat = code @ W_dec + b_dec, squared error, seed    gather decoder (K rows per token)

``K`` is ``k`` for ``topk``; for ``batchtopk`` it is the largest per-token count of the batch,
read back once (the step's one host sync; ``topk`` has none in the forward). The backward is
the ReLU path's sparse backward (``autograd.sae_backward``): the code's gradient at the K
slots, and both weight gradients through the latent-major transpose, whose size (the number
of active entries) is read back there. Nothing of size N x F is computed after the encoder but
the dense code the trainer reads.

AuxK runs eager on top, on the M dead latents only (their count is read back when a mask is
given): ``pre_NM`` is recomputed for those columns and ``reference.auxk_loss`` runs on it, the
same value and gradients as on all F columns.
"""

from __future__ import annotations

import torch
from patchsae.kernels import triton_kernels as tk
from patchsae.kernels.autograd import sae_backward
from patchsae.kernels.common import StepInfo, silent_term, token_weights
from patchsae.kernels.reference import SAEOutput, activate, check_mse_norm
from torch import Tensor

SPARSE_ARCHITECTURES = ("topk", "batchtopk")


class TopKLossFunction(torch.autograd.Function):
    """``(x, W_enc, b_enc, W_dec, b_dec) -> (mse, f_NF, x_hat_ND)`` for a selection
    architecture, with hand-written gradients for all three outputs."""

    @staticmethod
    def forward(
        ctx,
        x_ND: Tensor,
        W_enc_DF: Tensor,
        b_enc_F: Tensor,
        W_dec_FD: Tensor,
        b_dec_D: Tensor,
        architecture: str,
        k: int,
        mse_norm: str,
        info: StepInfo,
    ):
        N, D = x_ND.shape
        F = W_enc_DF.shape[1]
        w_N = token_weights(x_ND, mse_norm)
        xc_ND = x_ND - b_dec_D
        pre_NF = xc_ND @ W_enc_DF + b_enc_F
        f_NF = activate(pre_NF, architecture, k=k).contiguous()
        if architecture == "topk":
            K = min(k, F)
        else:  # batchtopk: tokens share the budget; the busiest one sizes the code
            K = max(1, int((f_NF > 0).sum(dim=1).max()))
        val_NK, idx_NK = f_NF.topk(K, dim=1)  # the selected (positive) entries come first
        val_NK, idx_NK = val_NK.contiguous(), idx_NK.to(torch.int32).contiguous()
        nnz_N = (val_NK > 0).sum(dim=1, dtype=torch.int32)
        dec = tk.decode_sparse(idx_NK, val_NK, nnz_N, W_dec_FD, b_dec_D, x_ND, w_N)
        mse = (dec.sq_N * w_N).sum() / (N * D)
        info.sparse = True

        ctx.set_materialize_grads(False)
        ctx.save_for_backward(
            x_ND, xc_ND, W_enc_DF, W_dec_FD, f_NF, dec.seed_ND, dec.sq_N, w_N,
            None, None, idx_NK, val_NK, nnz_N,
        )  # fmt: skip
        ctx.sparse, ctx.active = True, None  # the count is read in the backward
        ctx.l1_coeff, ctx.mse_norm = 0.0, mse_norm
        ctx.b_enc_dtype, ctx.b_dec_dtype = b_enc_F.dtype, b_dec_D.dtype
        return mse, f_NF, dec.x_hat_ND

    @staticmethod
    def backward(ctx, g_mse, g_f_NF, g_x_hat_ND):
        nnz_N = ctx.saved_tensors[-1]
        ctx.active = int(nnz_N.sum())  # sizes the latent-major transpose
        grads = sae_backward(ctx, g_mse, None, g_f_NF, g_x_hat_ND)
        return (*grads, None, None, None, None)


@torch.compiler.disable
def triton_topk_loss(
    x_ND: Tensor,
    W_enc_DF: Tensor,
    b_enc_F: Tensor,
    W_dec_FD: Tensor,
    b_dec_D: Tensor,
    *,
    architecture: str,
    k: int,
    mse_norm: str = "none",
    ghost_mask_F: Tensor | None = None,
    aux_k: int = 0,
    aux_coeff: float = 0.0,
) -> tuple[SAEOutput, StepInfo]:
    """``kernels.reference.sae_loss`` for ``topk``/``batchtopk`` on the sparse Triton kernels
    (``ghost_mask_F``: the dead latents AuxK trains)."""
    if architecture not in SPARSE_ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r}: use one of {SPARSE_ARCHITECTURES}")
    check_mse_norm(mse_norm)
    x_ND, W_enc_DF, b_enc_F, W_dec_FD, b_dec_D = (
        t.contiguous() for t in (x_ND, W_enc_DF, b_enc_F, W_dec_FD, b_dec_D)
    )
    info = StepInfo()
    mse, f_NF, x_hat_ND = TopKLossFunction.apply(
        x_ND, W_enc_DF, b_enc_F, W_dec_FD, b_dec_D, architecture, int(k), mse_norm, info
    )
    mse = mse.to(x_ND.dtype)
    zero = torch.zeros((), dtype=x_ND.dtype, device=x_ND.device)
    aux = zero
    if ghost_mask_F is not None:
        info.ghost_latents = int(ghost_mask_F.sum())
        aux = silent_term(architecture, x_ND, W_enc_DF, b_enc_F, W_dec_FD, b_dec_D, x_hat_ND,
                          ghost_mask_F, info.ghost_latents, aux_k=aux_k, aux_coeff=aux_coeff)  # fmt: skip
    return SAEOutput(mse + aux, mse, zero, aux, f_NF, x_hat_ND), info
