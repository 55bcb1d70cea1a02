"""The CPU path: the SAE loss as one ``torch.autograd.Function`` with hand-written gradients, in
plain PyTorch, dense or exactly sparse per batch.

Shape legend: N tokens, D model width, F latents, E active (token, latent) entries.

Autograd on the reference keeps five or six ``[N, F]`` tensors alive per step (the
pre-activations, the code, the L1 term's gradient, the ReLU mask, the code's gradient), and on a
CPU each fresh ``[N, F]`` buffer costs page faults on top of its pass over memory. This
Function allocates two: the code (written in place over the pre-activations; the trainer reads
it) and, on the dense path, the code's gradient.

Sparse or dense, per batch: after the activation the code is exactly sparse, and on a CPU a host
sync is free, so the forward counts the active entries and goes sparse when the density is at
or below ``sparse_threshold`` (``dispatch.sparse_threshold("cpu")``). The sparse path keeps the
code as CSR and everything after the encoder GEMM scales with E instead of N x F::

    x_hat   = code @ W_dec + b_dec                       CSR x dense
    g_pre   = (g @ W_dec.T)[active] + l1 term            sampled dense product (SDDMM)
    W_enc'  = (g_pre.T @ xc).T,  W_dec' = code.T @ g     CSR-transposed x dense
    b_enc'  = per-latent sums of g_pre,  b_dec' = g.sum(0) - W_enc @ b_enc'

The encoder GEMM ``(x - b_dec) @ W_enc + b_enc`` stays dense: it is what finds the active
entries. Every architecture runs here (the selection is the reference's, ties included).
``jumprelu``'s thresholds take their straight-through gradient from the entries in the window
around them (``|pre - threshold| < bandwidth / 2``): the forward lists those entries, and the
backward needs the code's gradient there only (a product sampled at them), so its cost scales
with their number. Silent-latent terms (ghost grads, AuxK, jumprelu's pull) run on the masked columns only
(``kernels.common.silent_term``), exactly, since the mask's count costs nothing to read.
"""

from __future__ import annotations

import warnings

import torch
from patchsae.kernels.common import (
    StepInfo,
    decoder_norm_l1_grad,
    silent_term,
    token_norm_x_grad,
    token_weights,
)
from patchsae.kernels.reference import SAEOutput, check_mse_norm, top_mask
from torch import Tensor

CPU_ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")
CPU_DTYPES = (torch.float32, torch.float64)


class CPULossFunction(torch.autograd.Function):
    """``(x, W_enc, b_enc, W_dec, b_dec, threshold) -> (mse, l1, f_NF, x_hat_ND)`` with
    hand-written gradients for all four outputs (``threshold``: jumprelu's, else None); the
    silent-latent term is added outside."""

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
        l1_decoder_norm: bool,
        sparse_threshold: float,
        info: StepInfo,
    ):
        N, D = x_ND.shape
        F = W_enc_DF.shape[1]
        xc_ND = x_ND - b_dec_D
        f_NF = torch.addmm(b_enc_F, xc_ND, W_enc_DF)  # the pre-activations, then the code
        window = l0 = None
        if architecture == "topk":
            keep_NF = top_mask(f_NF, k)
            f_NF.relu_().mul_(keep_NF)
            del keep_NF
        elif architecture == "jumprelu":
            assert threshold_F is not None  # cpu_sae_loss has checked
            theta_F = threshold_F.to(f_NF.dtype)
            window = _window(f_NF, theta_F, bandwidth)
            keep_NF = f_NF > theta_F
            l0 = keep_NF.sum(dtype=torch.int64)
            f_NF.mul_(keep_NF)  # as the reference: pre * (pre > threshold), NaN kept
            del keep_NF
        else:
            f_NF.relu_()
            if architecture == "batchtopk":
                _keep_batch_top_(f_NF, k)
        info.active = int(torch.count_nonzero(f_NF))
        info.sparse = sparse_threshold > 0 and info.active <= sparse_threshold * N * F
        code = _csr(f_NF) if info.sparse else None
        x_hat_ND = torch.addmm(b_dec_D, code if code is not None else f_NF, W_dec_FD)

        w_N = token_weights(x_ND, mse_norm)  # in x's dtype (fp32 or fp64)
        diff_ND = x_hat_ND - x_ND
        sq_N = diff_ND.pow(2).sum(dim=1)
        mse = (sq_N * w_N).sum() / (N * D)
        s_F = W_dec_FD.norm(dim=1) if l1_decoder_norm and architecture == "relu" else None
        colsum_F = None
        if architecture == "jumprelu":
            assert l0 is not None
            l1 = l0.to(x_ND.dtype)
        elif architecture != "relu":
            l1 = torch.zeros((), dtype=x_ND.dtype)
        elif code is not None:
            values_E, cols_E = code.values(), code.col_indices()
            l1 = (values_E * s_F[cols_E] if s_F is not None else values_E).sum()
            if s_F is not None:
                colsum_F = torch.zeros(F, dtype=x_ND.dtype).index_add_(0, cols_E, values_E)
        else:
            l1 = (f_NF @ s_F).sum() if s_F is not None else f_NF.sum()
            if s_F is not None:
                colsum_F = f_NF.sum(dim=0)
        l1 = l1 * (l1_coeff / N)

        seed_ND = diff_ND.mul_(w_N[:, None] * (2.0 / (N * D)))  # d mse / d x_hat
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(
            x_ND, xc_ND, W_enc_DF, W_dec_FD, f_NF, seed_ND, sq_N, s_F, colsum_F, threshold_F
        )  # fmt: skip
        ctx.code, ctx.window = code, window
        ctx.l1 = architecture == "relu"
        ctx.l1_coeff, ctx.mse_norm, ctx.bandwidth = l1_coeff, mse_norm, bandwidth
        return mse, l1, f_NF, x_hat_ND

    @staticmethod
    def backward(ctx, g_mse, g_l1, g_f_NF, g_x_hat_ND):
        (x_ND, xc_ND, W_enc_DF, W_dec_FD, f_NF, seed_ND, sq_N, s_F, colsum_F,
         threshold_F) = ctx.saved_tensors  # fmt: skip
        code = ctx.code  # CSR, or None on the dense path
        window = ctx.window  # jumprelu: its window (CSR), else None
        need_x, need_W_enc, need_b_enc, need_W_dec, need_b_dec = ctx.needs_input_grad[:5]
        need_threshold = window is not None and ctx.needs_input_grad[5]
        N, D = x_ND.shape
        F = W_enc_DF.shape[1]
        zero = torch.zeros((), dtype=x_ND.dtype)
        g_mse = zero if g_mse is None else g_mse
        g_ND = seed_ND * g_mse  # d loss / d x_hat
        if g_x_hat_ND is not None:
            g_ND = g_ND + g_x_hat_ND
        l1_scale = (zero if g_l1 is None else g_l1) * (ctx.l1_coeff / N) if ctx.l1 else None
        need_pre = need_x or need_W_enc or need_b_enc or need_b_dec

        grad_W_enc = grad_W_dec = g_b_enc_F = g_pre = g_window_W = None
        if code is not None:
            cols_E = code.col_indices()
            if need_pre:
                g_code_E = _code_grad_at(code, g_ND, W_dec_FD, g_f_NF)
                if l1_scale is not None:
                    g_code_E += l1_scale * s_F[cols_E] if s_F is not None else l1_scale
                g_pre = _csr_like(code, g_code_E)
                g_b_enc_F = torch.zeros(F, dtype=x_ND.dtype).index_add_(0, cols_E, g_code_E)
                if need_W_enc:
                    grad_W_enc = _t_matmul(g_pre, xc_ND).T
            if need_W_dec:
                grad_W_dec = _t_matmul(code, g_ND)
            if need_threshold:
                g_window_W = _code_grad_at(window, g_ND, W_dec_FD, g_f_NF)
        else:
            if need_pre or need_threshold:
                g_pre = g_ND @ W_dec_FD.T
                if l1_scale is not None:
                    g_pre += l1_scale * s_F if s_F is not None else l1_scale
                if g_f_NF is not None:
                    g_pre += g_f_NF
                if need_threshold:  # the code's gradient in the window, before the mask
                    g_window_W = g_pre[_rows(window), window.col_indices()]
                g_pre.masked_fill_(f_NF <= 0, 0.0)  # jumprelu too: its thresholds are > 0
                g_b_enc_F = g_pre.sum(dim=0)
                if need_W_enc:
                    grad_W_enc = xc_ND.T @ g_pre
            if need_W_dec:
                grad_W_dec = f_NF.T @ g_ND
        grad_threshold = None
        if need_threshold:
            l0_scale = (zero if g_l1 is None else g_l1) * (ctx.l1_coeff / N)
            grad_threshold = _threshold_grad(
                window, g_window_W, threshold_F, ctx.bandwidth, l0_scale
            )

        if need_W_dec and s_F is not None:
            assert l1_scale is not None and colsum_F is not None
            grad_W_dec = grad_W_dec + decoder_norm_l1_grad(l1_scale, colsum_F, s_F, W_dec_FD)
        grad_b_dec = grad_x = None
        if need_b_dec:
            grad_b_dec = g_ND.sum(dim=0) - W_enc_DF @ g_b_enc_F
        if need_x:
            grad_x = torch.mm(g_pre, W_enc_DF.T) - g_mse * seed_ND
            if ctx.mse_norm == "token_norm":
                grad_x = grad_x + g_mse * token_norm_x_grad(x_ND, sq_N, N * D)
        return (
            grad_x,
            grad_W_enc,
            g_b_enc_F if need_b_enc else None,
            grad_W_dec,
            grad_b_dec,
            grad_threshold,
            *([None] * 8),
        )


def _window(pre_NF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
    """The entries in jumprelu's straight-through window, ``|pre - threshold| / bandwidth <
    0.5`` (the reference's rectangle, the same arithmetic), as a CSR pattern of ones."""
    u_NF = pre_NF - theta_F
    inside_NF = u_NF.abs_().div_(bandwidth) < 0.5
    del u_NF
    rows_W, cols_W = inside_NF.nonzero().unbind(1)
    del inside_NF
    N = pre_NF.shape[0]
    crow = torch.zeros(N + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(rows_W, minlength=N).cumsum(0)
    ones_W = torch.ones(len(cols_W), dtype=pre_NF.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            crow, cols_W.contiguous(), ones_W, pre_NF.shape, check_invariants=False
        )


def _code_grad_at(pattern: Tensor, g_ND: Tensor, W_dec_FD: Tensor, g_f_NF: Tensor | None) -> Tensor:
    """The code's gradient, ``g @ W_dec.T`` plus what reaches the code itself, at the entries
    of a CSR pattern, in its order ([E]): a sampled product, no ``[N, F]`` buffer."""
    g_E = _sampled_matmul(pattern, g_ND, W_dec_FD.T)
    if g_f_NF is not None:
        g_E += g_f_NF[_rows(pattern), pattern.col_indices()]
    return g_E


def _threshold_grad(
    window: Tensor, g_window_W: Tensor, threshold_F: Tensor, bandwidth: float, l0_scale: Tensor
) -> Tensor:
    """jumprelu's straight-through gradient of the thresholds from the code's gradient at the
    window's entries: ``-(threshold / bandwidth) * sum g`` (the code) ``- l0_scale / bandwidth *
    count`` (the L0 term), per latent, in ``threshold_F``'s dtype."""
    cols_W = window.col_indices()
    F = threshold_F.shape[0]
    sums_F = torch.zeros(F, dtype=g_window_W.dtype).index_add_(0, cols_W, g_window_W)
    counts_F = torch.bincount(cols_W, minlength=F).to(g_window_W.dtype)
    theta_F = threshold_F.to(g_window_W.dtype)
    return (-(theta_F / bandwidth) * sums_F - (l0_scale / bandwidth) * counts_F).to(
        threshold_F.dtype
    )


def _keep_batch_top_(f_NF: Tensor, k: int) -> None:
    """In place: zero all but the ``k * N`` largest entries of a ReLU'd code (``top_mask``'s
    selection over the batch, its tie rule included). Only the positive entries are ranked:
    the rest are 0 whether selected or not."""
    keep = k * f_NF.shape[0]
    flat = f_NF.view(-1)
    positive = _candidates(flat, keep)
    if len(positive) <= keep:
        return
    kth = positive.topk(keep, sorted=False).values.min()
    above = int((positive > kth).sum())
    flat.masked_fill_(flat < kth, 0.0)
    if above + int((positive == kth).sum()) > keep:  # ties at the k-th value: lower index wins
        tied = (flat == kth).nonzero().flatten()
        flat[tied[keep - above :]] = 0.0


def _candidates(flat: Tensor, keep: int) -> Tensor:
    """The positive entries of ``flat``, or a subset of them sure to hold its ``keep`` largest:
    those above a cut taken from an evenly strided sample (no random state), kept only when at
    least ``keep`` entries pass it, so that ranking them finds the same k-th value."""
    stride = max(1, len(flat) // 65_536)
    if stride > 1 and 4 * keep < len(flat):
        sample = flat[::stride]
        cut = sample.kthvalue(max(1, len(sample) - 2 * keep // stride)).values
        if cut > 0:
            above = flat[flat > cut]
            if len(above) >= keep:
                return above
    return flat[flat > 0]


def _csr(f_NF: Tensor) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return f_NF.to_sparse_csr()


def _csr_like(code: Tensor, values_E: Tensor) -> Tensor:
    """A CSR tensor with ``code``'s pattern and these values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            code.crow_indices(), code.col_indices(), values_E, code.shape, check_invariants=False
        )


def _sampled_matmul(code: Tensor, a_ND: Tensor, b_DF: Tensor) -> Tensor:
    """``(a @ b)`` at ``code``'s stored entries, in its order ([E])."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse.sampled_addmm(code, a_ND, b_DF, beta=0.0).values()


def _rows(code: Tensor) -> Tensor:
    """The row of each stored entry of a CSR tensor."""
    crow = code.crow_indices()
    counts = crow[1:] - crow[:-1]
    return torch.repeat_interleave(torch.arange(code.shape[0], dtype=crow.dtype), counts)


def _t_matmul(code: Tensor, dense_ND: Tensor) -> Tensor:
    """``code.T @ dense`` ([F, D]) for a CSR ``code`` [N, F]."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse.mm(code.t(), dense_ND)


def supports(
    tensors: tuple[Tensor, ...], architecture: str, threshold_F: Tensor | None = None
) -> bool:
    """Whether the CPU path takes these inputs (else the reference runs); jumprelu needs
    thresholds >= 0 on the CPU (the trainer's are: ``threshold_lr * |z|``), so that an entry
    is active exactly where the code is positive."""
    x = tensors[0]
    return (
        architecture in CPU_ARCHITECTURES
        and x.dtype in CPU_DTYPES
        and all(t.dtype == x.dtype and t.device.type == "cpu" for t in tensors)
        and x.dim() == 2
        and 0 not in (*x.shape, tensors[1].shape[1])
        and (
            architecture != "jumprelu"
            or threshold_F is not None
            and threshold_F.device.type == "cpu"
            and bool((threshold_F >= 0).all())
        )
    )


@torch.compiler.disable  # reads counts back to the host: no graph to capture
def cpu_sae_loss(
    x_ND: Tensor,
    W_enc_DF: Tensor,
    b_enc_F: Tensor,
    W_dec_FD: Tensor,
    b_dec_D: Tensor,
    *,
    architecture: str = "relu",
    l1_coeff: float = 0.0,
    mse_norm: str = "none",
    l1_decoder_norm: bool = False,
    ghost_mask_F: Tensor | None = None,
    k: int = 0,
    threshold_F: Tensor | None = None,
    bandwidth: float = 1e-3,
    aux_k: int = 0,
    aux_coeff: float = 0.0,
    sparse_threshold: float = 0.0,
) -> tuple[SAEOutput, StepInfo]:
    """``kernels.reference.sae_loss`` on a CPU; also returns what the step chose.
    ``sparse_threshold``: the largest density run sparse. jumprelu: ``threshold_F`` must be
    >= 0 (``supports``)."""
    check_mse_norm(mse_norm)
    if architecture not in CPU_ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r}: use one of {CPU_ARCHITECTURES}")
    if architecture == "jumprelu":
        if threshold_F is None:
            raise ValueError("jumprelu needs threshold_F")
        if not bandwidth > 0:
            raise ValueError(f"jumprelu bandwidth {bandwidth} must be positive")
    x_ND, W_enc_DF, b_enc_F, W_dec_FD, b_dec_D = (
        t.contiguous() for t in (x_ND, W_enc_DF, b_enc_F, W_dec_FD, b_dec_D)
    )
    info = StepInfo()
    threshold_F = threshold_F if architecture == "jumprelu" else None
    mse, l1, f_NF, x_hat_ND = CPULossFunction.apply(
        x_ND, W_enc_DF, b_enc_F, W_dec_FD, b_dec_D, threshold_F, architecture, int(k),
        float(bandwidth), float(l1_coeff), mse_norm, bool(l1_decoder_norm),
        float(sparse_threshold), info,
    )  # fmt: skip
    aux = torch.zeros((), dtype=x_ND.dtype)
    if ghost_mask_F is not None:
        info.ghost_latents = int(ghost_mask_F.sum())
        aux = silent_term(architecture, x_ND, W_enc_DF, b_enc_F, W_dec_FD, b_dec_D, x_hat_ND,
                          ghost_mask_F, info.ghost_latents, mse_norm=mse_norm, aux_k=aux_k,
                          aux_coeff=aux_coeff, threshold_F=threshold_F)  # fmt: skip
    return SAEOutput(mse + l1 + aux, mse, l1, aux, f_NF, x_hat_ND), info
