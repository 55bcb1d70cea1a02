"""The Triton SAE loss as one ``torch.autograd.Function``, and the choice of sparse or dense.

Shape legend: N tokens, D model width, F latents, K per-token capacity of the sparse code,
M latents in the ghost mask.

Forward (``kernels.triton_kernels``)::

    encode:  f = relu(xc @ W_enc + b_enc), L1 sums, [sparse code]   xc = x - b_dec; dense
    decode:  x_hat = f @ W_dec + b_dec, squared error, seed d mse / d x_hat  dense or gather

Backward, with ``g = d loss / d x_hat``::

    g_pre   = (g @ W_dec.T + l1 term) * (f > 0)    dense GEMM, or only at active entries
    W_enc'  = xc.T @ g_pre                         cuBLAS, or sparse-transposed x dense
    W_dec'  = f.T @ g [+ decoder-norm L1 term]     cuBLAS, or sparse-transposed x dense
    b_enc'  = g_pre.sum(0);  b_dec' = g.sum(0) - W_enc @ b_enc';  x' = g_pre @ W_enc.T - mse'

Plain GEMMs with nothing to fuse (the two weight gradients on the dense path) go to cuBLAS.

Sparse or dense, per batch: after ReLU the code is exactly sparse, and below a density
threshold the gathers beat the dense GEMMs (about 10 N D F FLOPs dense against 2 N D F plus
gathers of about 8 N L0 D bytes; on an H100 that is about 0.3% density). The encoder always
writes the dense code (the trainer reads it) and, when a threshold is set, also a compact code
of K slots per token (``sparse_capacity``). Right after the encoder the step reads back three
integers: the number of active entries, the largest per-token count, and the number of
ghost-masked latents. That is the one host sync of a step, and it is what makes the sparse path
exact: a batch goes sparse only if its density is at or below the threshold and no token
overflowed its K slots; otherwise it runs dense. Deciding from the previous step's density
would avoid the sync but not the overflow check, which needs this batch's counts. With the
threshold at 0 and no ghost mask there is no sync at all.

On the sparse path the decoder and the latent gradient read each token's slots; the two weight
gradients need the transpose, built in the backward by ``triton_kernels.latent_major`` (a
prefix sum and one sort of the active entries, sized by the count the sync returned).

Determinism: the per-token sums (L1, squared error, active counts) use atomics across tiles,
and the encoder fills a token's slots in the order its tiles finish, so the sparse decoder sums
in that order; results agree run to run to fp32 rounding, not bit for bit. The transposed
products sum in (latent, token) order and are deterministic.

Ghost gradients are eager PyTorch on top of the kernels: with the masked latents' indices (their
count comes from the same sync), ``pre_NM = (x - b_dec) @ W_enc[:, M] + b_enc[M]`` is
recomputed for those M latents only and ``kernels.reference.ghost_loss`` runs on it, so autograd
sends its gradients to W_enc, b_enc, W_dec, b_dec and x and they add to the Function's.
"""

from __future__ import annotations

import math

import torch
from patchsae.kernels import triton_kernels as tk
from patchsae.kernels.common import (
    StepInfo,
    decoder_norm_l1_grad,
    silent_term,
    token_norm_x_grad,
    token_weights,
)
from patchsae.kernels.reference import SAEOutput, check_mse_norm
from torch import Tensor

ROW_CAPACITY = 8
"""The sparse code holds this many times a token's share at the threshold density (at least
64 slots): a batch at the threshold overflows only where a token has 8x the mean count."""


def sparse_capacity(threshold: float, n_latents: int) -> int:
    """Slots per token of the compact code for a density threshold (0: no compact code)."""
    if threshold <= 0:
        return 0
    slots = max(64, math.ceil(ROW_CAPACITY * threshold * n_latents))
    return min(n_latents, -(-slots // 16) * 16)


class SAELossFunction(torch.autograd.Function):
    """``(x, W_enc, b_enc, W_dec, b_dec) -> (mse, l1, f_NF, x_hat_ND)`` with hand-written
    gradients for all four outputs; the ghost term is added outside (see the module doc)."""

    @staticmethod
    def forward(
        ctx,
        x_ND: Tensor,
        W_enc_DF: Tensor,
        b_enc_F: Tensor,
        W_dec_FD: Tensor,
        b_dec_D: Tensor,
        ghost_mask_F: Tensor | None,
        l1_coeff: float,
        mse_norm: str,
        l1_decoder_norm: bool,
        sparse_threshold: float,
        info: StepInfo,
    ):
        N, D = x_ND.shape
        F = W_enc_DF.shape[1]
        w_N = token_weights(x_ND, mse_norm)
        s_F = W_dec_FD.float().norm(dim=1) if l1_decoder_norm else None
        capacity = sparse_capacity(sparse_threshold, F)
        xc_ND = x_ND - b_dec_D  # rounds like the reference; the GEMMs take it as it is
        enc = tk.encode(
            xc_ND, W_enc_DF, b_enc_F, s_F=s_F, colsum=l1_decoder_norm, capacity=capacity
        )

        probes = []
        if capacity:
            assert enc.nnz_N is not None  # the encode kept a sparse code
            probes += [enc.nnz_N.sum(dtype=torch.int64), enc.nnz_N.max().to(torch.int64)]
        if ghost_mask_F is not None:
            probes.append(ghost_mask_F.sum(dtype=torch.int64))
        counts = torch.stack(probes).tolist() if probes else []  # the step's one host sync
        if capacity:
            info.active, info.max_row_active = counts[0], counts[1]
            fits = info.max_row_active <= capacity  # else a token lost entries: go dense
            info.sparse = fits and info.active <= sparse_threshold * N * F
        info.ghost_latents = counts[-1] if ghost_mask_F is not None else 0

        idx_NK = val_NK = None
        if info.sparse:
            assert enc.idx_NK is not None and enc.val_NK is not None and enc.nnz_N is not None
            idx_NK, val_NK = enc.idx_NK, enc.val_NK
            dec = tk.decode_sparse(idx_NK, val_NK, enc.nnz_N, W_dec_FD, b_dec_D, x_ND, w_N)
        else:
            dec = tk.decode_dense(enc.f_NF, W_dec_FD, b_dec_D, x_ND, w_N)
        mse = (dec.sq_N * w_N).sum() / (N * D)
        l1 = enc.l1_N.sum() * (l1_coeff / N)

        ctx.set_materialize_grads(False)
        ctx.save_for_backward(
            x_ND, xc_ND, W_enc_DF, W_dec_FD, enc.f_NF, dec.seed_ND, dec.sq_N, w_N,
            s_F, enc.colsum_F, idx_NK, val_NK, enc.nnz_N,
        )  # fmt: skip
        ctx.sparse, ctx.active = info.sparse, info.active
        ctx.l1_coeff, ctx.mse_norm = l1_coeff, mse_norm
        ctx.b_enc_dtype, ctx.b_dec_dtype = b_enc_F.dtype, b_dec_D.dtype
        return mse, l1, enc.f_NF, dec.x_hat_ND

    @staticmethod
    def backward(ctx, g_mse, g_l1, g_f_NF, g_x_hat_ND):
        return (*sae_backward(ctx, g_mse, g_l1, g_f_NF, g_x_hat_ND), *([None] * 6))


def output_grad(seed_ND: Tensor, g_mse: Tensor, g_x_hat_ND: Tensor | None) -> Tensor:
    """``d loss / d x_hat`` in fp32: the MSE's seed times its incoming gradient, plus any
    gradient sent to the reconstruction itself."""
    g_ND = seed_ND * g_mse
    return g_ND if g_x_hat_ND is None else g_ND + g_x_hat_ND.float()


def sae_backward(ctx, g_mse, g_l1, g_f_NF, g_x_hat_ND) -> tuple[Tensor | None, ...]:
    """The gradients of ``(x, W_enc, b_enc, W_dec, b_dec)`` from what a forward saved (see
    :class:`SAELossFunction`; ``kernels.topk`` saves the same for its sparse code, then its
    own)."""
    (x_ND, xc_ND, W_enc_DF, W_dec_FD, f_NF, seed_ND, sq_N, w_N,
     s_F, colsum_F, idx_NK, val_NK, nnz_N) = ctx.saved_tensors[:13]  # fmt: skip
    need_x, need_W_enc, need_b_enc, need_W_dec, need_b_dec = ctx.needs_input_grad[:5]
    N, D = x_ND.shape
    F = W_enc_DF.shape[1]
    zero = torch.zeros((), dtype=torch.float32, device=x_ND.device)
    g_mse = zero if g_mse is None else g_mse.float()
    g_l1 = zero if g_l1 is None else g_l1.float()
    g_ND = output_grad(seed_ND, g_mse, g_x_hat_ND)
    l1_scale = g_l1 * (ctx.l1_coeff / N)
    gd = tk.grad_dtype(x_ND.dtype)
    g_op_ND = g_ND.to(gd)  # the GEMM operand (bf16 for bf16 parameters)

    grad_W_enc = grad_W_dec = g_b_enc_F = g_pre_NF = None
    if ctx.sparse:
        g_code_NK = tk.latent_grad_sparse(g_op_ND, W_dec_FD, idx_NK, nnz_N, s_F, l1_scale)
        # Slots past a token's count hold garbage: clamp for gathers, mask for scatters.
        valid_NK = tk.valid_slots(nnz_N, idx_NK.shape[1])
        key_NK = torch.where(valid_NK, idx_NK, F).long()
        if g_f_NF is not None:
            g_code_NK += g_f_NF.float().gather(1, key_NK.clamp(max=F - 1))
        code = tk.latent_major(idx_NK, nnz_N, F, ctx.active)
        if need_W_enc:
            grad_W_enc = tk.output_buffer((D, F), W_enc_DF.dtype, x_ND.device)
            g_code_E = g_code_NK.view(-1)[code.perm_E]
            g_b_enc_F = tk.sparse_t_matmul(code, g_code_E, xc_ND, grad_W_enc.T, with_sum=True)
        elif need_b_enc or need_b_dec or need_x:
            g_b_enc_F = scatter_sum(g_code_NK, key_NK, F)
        if need_W_dec:
            dtype = torch.float32 if s_F is not None else gd
            grad_W_dec = tk.output_buffer((F, D), dtype, x_ND.device)
            tk.sparse_t_matmul(code, val_NK.view(-1)[code.perm_E], g_op_ND, grad_W_dec)
        if need_x:  # rare (inputs are data): densify and use cuBLAS
            g_pre_NF = torch.zeros((N, F + 1), dtype=gd, device=x_ND.device)
            g_code_NK = torch.where(valid_NK, g_code_NK, 0.0)
            g_pre_NF = g_pre_NF.scatter_(1, key_NK, g_code_NK.to(gd))[:, :F]
    else:
        if need_x or need_W_enc or need_b_enc or need_b_dec:
            g_pre_NF, g_b_enc_F = tk.latent_grad_dense(
                g_op_ND, W_dec_FD, f_NF, s_F, l1_scale, g_f_NF
            )
        if need_W_enc:
            grad_W_enc = xc_ND.to(gd).T @ g_pre_NF
        if need_W_dec:
            grad_W_dec = f_NF.to(gd).T @ g_op_ND

    if need_W_dec and s_F is not None:
        assert grad_W_dec is not None  # both paths computed it (need_W_dec)
        grad_W_dec = grad_W_dec.float() + decoder_norm_l1_grad(l1_scale, colsum_F, s_F, W_dec_FD)
    grad_b_dec = grad_x = None
    if need_b_dec:
        assert g_b_enc_F is not None  # both paths compute it when b_dec needs a gradient
        grad_b_dec = g_ND.sum(0) - (W_enc_DF.to(gd) @ g_b_enc_F.to(gd)).float()
    if need_x:
        grad_x = (g_pre_NF @ W_enc_DF.to(gd).T).float() - g_mse * seed_ND
        if ctx.mse_norm == "token_norm":
            grad_x = grad_x + g_mse * token_norm_x_grad(x_ND, sq_N, N * D)
    return (
        _cast(grad_x, x_ND.dtype),
        _cast(grad_W_enc, W_enc_DF.dtype),
        _cast(g_b_enc_F if need_b_enc else None, ctx.b_enc_dtype),
        _cast(grad_W_dec, W_dec_FD.dtype),
        _cast(grad_b_dec, ctx.b_dec_dtype),
    )


@torch.compiler.disable
def triton_sae_loss(
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
    sparse_threshold: float = 0.0,
) -> tuple[SAEOutput, StepInfo]:
    """``kernels.reference.sae_loss`` on the Triton kernels; also returns what the step chose.

    ``sparse_threshold``: the largest density (active entries / (N * F)) run on the sparse path;
    0 never goes sparse (and, without a ghost mask, never syncs). Kept out of ``torch.compile``
    regions: Triton launches inside them fail under the interpreter.
    """
    check_mse_norm(mse_norm)
    x_ND, W_enc_DF, b_enc_F, W_dec_FD, b_dec_D = (
        t.contiguous() for t in (x_ND, W_enc_DF, b_enc_F, W_dec_FD, b_dec_D)
    )
    info = StepInfo()
    mse, l1, f_NF, x_hat_ND = SAELossFunction.apply(
        x_ND, W_enc_DF, b_enc_F, W_dec_FD, b_dec_D, ghost_mask_F,
        float(l1_coeff), mse_norm, bool(l1_decoder_norm), float(sparse_threshold), info,
    )  # fmt: skip
    mse, l1 = mse.to(x_ND.dtype), l1.to(x_ND.dtype)
    if ghost_mask_F is None:
        aux = torch.zeros((), dtype=x_ND.dtype, device=x_ND.device)
    else:
        aux = silent_term("relu", x_ND, W_enc_DF, b_enc_F, W_dec_FD, b_dec_D, x_hat_ND,
                          ghost_mask_F, info.ghost_latents, mse_norm=mse_norm)  # fmt: skip
    return SAEOutput(mse + l1 + aux, mse, l1, aux, f_NF, x_hat_ND), info


def scatter_sum(g_code_NK: Tensor, key_NK: Tensor, F: int) -> Tensor:
    """Per-latent sums of a code's values; ``key_NK`` sends unused slots to latent ``F``."""
    out = torch.zeros(F + 1, dtype=torch.float32, device=g_code_NK.device)
    values = torch.where(key_NK < F, g_code_NK, 0.0)  # unused slots may hold NaN
    return out.scatter_add_(0, key_NK.reshape(-1), values.reshape(-1))[:F]


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)
