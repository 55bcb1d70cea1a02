"""Triton kernels for the SAE forward pass, loss and backward, with dense and sparse paths.

Shape legend: N tokens, D model width, F latents, K per-token capacity of the sparse code,
E entries of the sparse code in latent-major order (padding included).

Eager equivalents (``kernels.reference``)::

    pre_NF   = (x_ND - b_dec_D) @ W_enc_DF + b_enc_F
    f_NF     = relu(pre_NF)
    x_hat_ND = f_NF @ W_dec_FD + b_dec_D

Each ``launch`` function below checks shapes, allocates, and launches one kernel; the kernels
accumulate in fp32 whatever the input dtype (fp32, fp16 or bf16). The sparse code is "ELL":
``idx_NK`` / ``val_NK`` hold each token's active latents in its first ``nnz_N`` slots; slots
past ``nnz_N`` are never read. The autograd glue and the choice of path are in
``kernels.autograd``.

On a GPU the kernels autotune their block sizes. Without one (``TRITON_INTERPRET=1``, the
tests) they run with small fixed blocks: the autotuner benchmarks on a device.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Whether the kernels were defined for Triton's CPU interpreter (read once, at import)."""
_AUTOTUNE = torch.cuda.is_available() and not INTERPRET
_POISON = False


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Test hook: outputs that a kernel must write are allocated NaN-filled (index outputs
    zero-filled with NaN values beside them), so an element a kernel forgets reads as NaN."""
    global _POISON
    previous, _POISON = _POISON, True
    try:
        yield
    finally:
        _POISON = previous


def output_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An output buffer every element of which the kernel writes (poisoned under test)."""
    if not _POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else 0
    return torch.full(shape, fill, dtype=dtype, device=device)


def _tuned(configs: list[triton.Config], key: list[str], reset_to_zero: list[str] | None = None):
    """Autotune on a GPU; elsewhere the launch passes fixed blocks (``_CPU_*`` below)."""

    def wrap(fn):
        if not _AUTOTUNE:
            return fn
        return triton.autotune(configs=configs, key=key, reset_to_zero=reset_to_zero)(fn)

    return wrap


def _launch(kernel, grid, cpu_meta: dict, *args, **kwargs) -> None:
    if isinstance(kernel, triton.runtime.Autotuner):
        kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs, **cpu_meta)


def _gemm_configs() -> list[triton.Config]:
    shapes = [  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 5),
    ]
    return [
        triton.Config(
            {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s
        )
        for m, n, k, w, s in shapes
    ]


# The interpreter runs programs one after another; tl.dot needs blocks of at least 16.
_CPU_GEMM = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 4}
_CPU_GATHER = {"BLOCK_K": 32, "BLOCK_D": 64}
_CPU_TMATMUL = {"BLOCK_F": 32, "BLOCK_E": 64, "BLOCK_D": 64}


def _input_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow PyTorch's matmul setting (``allow_tf32``), so Triton and eager round
    alike; 16-bit operands take Triton's default."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """Operand dtype of the backward products: bf16 stays bf16 (fp32 range, tensor cores);
    fp16 goes to fp32 because gradient seeds of size ~1/(N*D) underflow in fp16."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped order of output tiles (Triton's matmul tutorial): neighbouring programs share
    B tiles in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


# -- forward: encoder ------------------------------------------------------------------------


@_tuned(
    _gemm_configs(),
    key=["N", "D", "F", "COMPACT"],
    reset_to_zero=["l1_ptr", "colsum_ptr", "nnz_ptr"],
)
@triton.jit
def _encode_kernel(
    xc_ptr, W_ptr, b_enc_ptr, s_ptr,  # inputs
    f_ptr, l1_ptr, colsum_ptr, nnz_ptr, idx_ptr, val_ptr,  # outputs
    N, D, F, K_CAP,
    L1_WEIGHTED: tl.constexpr, COLSUM: tl.constexpr, COMPACT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``f = relu(xc @ W_enc + b_enc)`` on one [BLOCK_M, BLOCK_N] tile, and in the
    epilogue: per-token L1 sums (``l1 += (f * s).sum(1)``), per-latent sums of f (``COLSUM``),
    per-token active counts and the compacted code (``COMPACT``)."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), N, F, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < N
    mask_n = offs_n < F
    rows = offs_m.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        mask_k = (k0 + offs_k) < D
        xc_ptrs = xc_ptr + rows[:, None] * D + (k0 + offs_k)[None, :]
        xc = tl.load(xc_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        W_ptrs = W_ptr + (k0 + offs_k).to(tl.int64)[:, None] * F + offs_n[None, :]
        W = tl.load(W_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(xc, W, acc, input_precision=INPUT_PRECISION)

    b_enc = tl.load(b_enc_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    valid = mask_m[:, None] & mask_n[None, :]
    f_out = tl.maximum(acc + b_enc[None, :], 0.0).to(f_ptr.dtype.element_ty)
    tl.store(f_ptr + rows[:, None] * F + offs_n[None, :], f_out, mask=valid)

    # Sums and the sparse code use the stored (rounded) values, so all outputs agree.
    f = tl.where(valid, f_out.to(tl.float32), 0.0)
    if L1_WEIGHTED:
        s = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
        tl.atomic_add(l1_ptr + offs_m, tl.sum(f * s[None, :], axis=1), mask=mask_m)
    else:
        tl.atomic_add(l1_ptr + offs_m, tl.sum(f, axis=1), mask=mask_m)
    if COLSUM:
        tl.atomic_add(colsum_ptr + offs_n, tl.sum(f, axis=0), mask=mask_n)
    if COMPACT:
        active = (f > 0.0).to(tl.int32)
        # The row counter returns this tile's first free slot; counts go on past K_CAP so the
        # caller sees the overflow.
        base = tl.atomic_add(nnz_ptr + offs_m, tl.sum(active, axis=1), mask=mask_m)
        slot = base[:, None] + tl.cumsum(active, axis=1) - 1
        keep = (active > 0) & (slot < K_CAP)
        code_offs = rows[:, None] * K_CAP + slot
        latent = tl.broadcast_to(offs_n[None, :], (BLOCK_M, BLOCK_N))
        tl.store(idx_ptr + code_offs, latent, mask=keep)
        tl.store(val_ptr + code_offs, f_out, mask=keep)


class Encoded(NamedTuple):
    f_NF: Tensor
    """Code after ReLU, in the input dtype."""
    l1_N: Tensor
    """fp32 per-token ``sum_F f * s`` (``s`` = decoder-row norms, or 1)."""
    colsum_F: Tensor | None
    """fp32 ``f.sum(0)`` (when asked for: the gradient of a decoder-norm-weighted L1)."""
    nnz_N: Tensor | None
    """int32 active latents per token, counted past the capacity (when compacting)."""
    idx_NK: Tensor | None
    """int32 active latents of each token, in its first ``min(nnz, K)`` slots, in the order
    the tiles finished."""
    val_NK: Tensor | None
    """Their values (input dtype)."""


def encode(
    xc_ND: Tensor,
    W_enc_DF: Tensor,
    b_enc_F: Tensor,
    *,
    s_F: Tensor | None = None,
    colsum: bool = False,
    capacity: int = 0,
) -> Encoded:
    """The encoder on centred inputs ``xc_ND = x_ND - b_dec_D`` (the caller's one small
    elementwise op keeps the main loop a plain GEMM) with its fused epilogue. ``s_F`` (fp32)
    weights the L1 sums; ``capacity`` > 0 also emits the sparse code with that many slots per
    token. Eager: ``f_NF = relu(xc_ND @ W_enc_DF + b_enc_F)``, ``l1_N = (f_NF * s_F).sum(1)``."""
    N, D = xc_ND.shape
    F = W_enc_DF.shape[1]
    _check(xc_ND, W_enc_DF, b_enc_F, shapes=[(N, D), (D, F), (F,)])
    dev = xc_ND.device
    f_NF = output_buffer((N, F), xc_ND.dtype, dev)
    l1_N = torch.zeros(N, dtype=torch.float32, device=dev)
    colsum_F = torch.zeros(F, dtype=torch.float32, device=dev) if colsum else None
    nnz_N: Tensor | None = None
    idx_NK: Tensor | None = None
    val_NK: Tensor | None = None
    if capacity > 0:
        assert N * capacity < 2**31, "sparse code too large for int32 offsets"
        nnz_N = torch.zeros(N, dtype=torch.int32, device=dev)
        idx_NK = output_buffer((N, capacity), torch.int32, dev)
        val_NK = output_buffer((N, capacity), xc_ND.dtype, dev)
    dummy = l1_N  # for pointers a variant does not touch
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]) * triton.cdiv(F, meta["BLOCK_N"]),)
    _launch(
        _encode_kernel,
        grid,
        _CPU_GEMM,
        xc_ND, W_enc_DF, b_enc_F, dummy if s_F is None else s_F,
        f_NF, l1_N, dummy if colsum_F is None else colsum_F,
        dummy if nnz_N is None else nnz_N,
        dummy if idx_NK is None else idx_NK,
        dummy if val_NK is None else val_NK,
        N, D, F, max(capacity, 1),
        L1_WEIGHTED=s_F is not None, COLSUM=colsum, COMPACT=capacity > 0,
        INPUT_PRECISION=_input_precision(xc_ND.dtype),
    )  # fmt: skip
    return Encoded(f_NF, l1_N, colsum_F, nnz_N, idx_NK, val_NK)


# -- forward: decoder + residual -------------------------------------------------------------


@triton.jit
def _decode_epilogue(
    acc, offs_m, offs_d, mask_m, mask_d,
    b_dec_ptr, x_ptr, w_ptr, x_hat_ptr, seed_ptr, sq_ptr, D, seed_scale,
):  # fmt: skip
    """``x_hat = acc + b_dec``; residual against x; gradient seed ``d mse / d x_hat`` =
    ``seed_scale * w * (x_hat - x)`` (``seed_scale`` = 2 / (N * D), ``w`` the per-token weight
    of the squared error); per-token squared error ``sq += sum_d (x_hat - x)^2``."""
    valid = mask_m[:, None] & mask_d[None, :]
    offs = offs_m.to(tl.int64)[:, None] * D + offs_d[None, :]
    b_dec = tl.load(b_dec_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    x_hat = acc + b_dec[None, :]
    tl.store(x_hat_ptr + offs, x_hat.to(x_hat_ptr.dtype.element_ty), mask=valid)
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    r = tl.where(valid, x_hat - x, 0.0)
    w = tl.load(w_ptr + offs_m, mask=mask_m, other=0.0)
    tl.store(seed_ptr + offs, (seed_scale * w)[:, None] * r, mask=valid)
    tl.atomic_add(sq_ptr + offs_m, tl.sum(r * r, axis=1), mask=mask_m)


@_tuned(_gemm_configs(), key=["N", "D", "F"], reset_to_zero=["sq_ptr"])
@triton.jit
def _decode_dense_kernel(
    f_ptr, W_ptr, b_dec_ptr, x_ptr, w_ptr,  # inputs
    x_hat_ptr, seed_ptr, sq_ptr,  # outputs
    N, D, F, seed_scale,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``x_hat = f @ W_dec + b_dec`` on one [BLOCK_M tokens, BLOCK_N features] tile (the
    reduction runs over latents), then ``_decode_epilogue``."""
    pid_m, pid_d = _tile_ids(tl.program_id(0), N, D, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < N
    mask_d = offs_d < D
    rows = offs_m.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        mask_k = (k0 + offs_k) < F
        f_ptrs = f_ptr + rows[:, None] * F + (k0 + offs_k)[None, :]
        f = tl.load(f_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        W_ptrs = W_ptr + (k0 + offs_k).to(tl.int64)[:, None] * D + offs_d[None, :]
        W = tl.load(W_ptrs, mask=mask_k[:, None] & mask_d[None, :], other=0.0)
        acc = tl.dot(f, W, acc, input_precision=INPUT_PRECISION)
    _decode_epilogue(
        acc, offs_m, offs_d, mask_m, mask_d,
        b_dec_ptr, x_ptr, w_ptr, x_hat_ptr, seed_ptr, sq_ptr, D, seed_scale,
    )  # fmt: skip


def _gather_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_K": k, "BLOCK_D": d}, num_warps=w)
        for k, d, w in [(16, 128, 4), (32, 128, 4), (16, 256, 4), (32, 256, 8), (64, 128, 8)]
    ]


@_tuned(_gather_configs(), key=["D", "K_CAP"], reset_to_zero=["sq_ptr"])
@triton.jit
def _decode_sparse_kernel(
    idx_ptr, val_ptr, nnz_ptr, W_ptr, b_dec_ptr, x_ptr, w_ptr,  # inputs
    x_hat_ptr, seed_ptr, sq_ptr,  # outputs
    D, K_CAP, seed_scale,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One token, BLOCK_D features: ``x_hat = sum_k val[k] * W_dec[idx[k]] + b_dec``, a gather
    of the token's active decoder rows, then ``_decode_epilogue``."""
    row = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    code = row.to(tl.int64) * K_CAP
    nnz = tl.load(nnz_ptr + row)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k0 in range(0, nnz, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < nnz
        idx = tl.load(idx_ptr + code + offs_k, mask=mask_k, other=0)
        val = tl.load(val_ptr + code + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        W_ptrs = W_ptr + idx.to(tl.int64)[:, None] * D + offs_d[None, :]
        W = tl.load(W_ptrs, mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(val[:, None] * W, axis=0)
    offs_m = row + tl.arange(0, 1)
    _decode_epilogue(
        acc[None, :], offs_m, offs_d, offs_m < row + 1, mask_d,
        b_dec_ptr, x_ptr, w_ptr, x_hat_ptr, seed_ptr, sq_ptr, D, seed_scale,
    )  # fmt: skip


class Decoded(NamedTuple):
    x_hat_ND: Tensor
    """Reconstruction, in the input dtype."""
    seed_ND: Tensor
    """fp32 ``d mse / d x_hat``."""
    sq_N: Tensor
    """fp32 per-token ``sum_D (x_hat - x)^2`` (unweighted)."""


def _decode_outputs(x_ND: Tensor) -> Decoded:
    N, D = x_ND.shape
    return Decoded(
        output_buffer((N, D), x_ND.dtype, x_ND.device),
        output_buffer((N, D), torch.float32, x_ND.device),
        torch.zeros(N, dtype=torch.float32, device=x_ND.device),
    )


def decode_dense(
    f_NF: Tensor, W_dec_FD: Tensor, b_dec_D: Tensor, x_ND: Tensor, w_N: Tensor
) -> Decoded:
    """Dense decoder + residual. ``w_N`` (fp32): per-token weight of the squared error."""
    N, F = f_NF.shape
    D = W_dec_FD.shape[1]
    _check(f_NF, W_dec_FD, b_dec_D, x_ND, w_N, shapes=[(N, F), (F, D), (D,), (N, D), (N,)])
    out = _decode_outputs(x_ND)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]) * triton.cdiv(D, meta["BLOCK_N"]),)
    _launch(
        _decode_dense_kernel,
        grid,
        _CPU_GEMM,
        f_NF, W_dec_FD, b_dec_D, x_ND, w_N, *out, N, D, F, 2.0 / (N * D),
        INPUT_PRECISION=_input_precision(f_NF.dtype),
    )  # fmt: skip
    return out


def decode_sparse(
    idx_NK: Tensor,
    val_NK: Tensor,
    nnz_N: Tensor,
    W_dec_FD: Tensor,
    b_dec_D: Tensor,
    x_ND: Tensor,
    w_N: Tensor,
) -> Decoded:
    """Sparse (gather) decoder + residual; every token's ``nnz`` must fit its ``K`` slots."""
    N, K = idx_NK.shape
    F, D = W_dec_FD.shape
    _check(idx_NK, val_NK, nnz_N, W_dec_FD, b_dec_D, x_ND, w_N,
           shapes=[(N, K), (N, K), (N,), (F, D), (D,), (N, D), (N,)])  # fmt: skip
    out = _decode_outputs(x_ND)
    grid = lambda meta: (N, triton.cdiv(D, meta["BLOCK_D"]))
    _launch(
        _decode_sparse_kernel,
        grid,
        _CPU_GATHER,
        idx_NK, val_NK, nnz_N, W_dec_FD, b_dec_D, x_ND, w_N, *out, D, K, 2.0 / (N * D),
    )  # fmt: skip
    return out


# -- backward: latent gradient ---------------------------------------------------------------


@_tuned(_gemm_configs(), key=["N", "D", "F", "HAS_GF"], reset_to_zero=["g_b_enc_ptr"])
@triton.jit
def _latent_grad_dense_kernel(
    g_ptr, W_ptr, f_ptr, s_ptr, l1_scale_ptr, g_f_ptr,  # inputs
    g_pre_ptr, g_b_enc_ptr,  # outputs
    N, D, F,
    L1_WEIGHTED: tl.constexpr, HAS_GF: tl.constexpr, BF16_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``g_pre = (g @ W_dec.T + l1_scale * s [+ g_f]) * (f > 0)`` on one [BLOCK_M, BLOCK_N]
    tile, and ``g_b_enc += g_pre.sum(0)``."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), N, F, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < N
    mask_n = offs_n < F
    rows = offs_m.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        mask_k = (k0 + offs_k) < D
        g_ptrs = g_ptr + rows[:, None] * D + (k0 + offs_k)[None, :]
        g = tl.load(g_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # B tile = W_dec.T[k, n] = W_dec[n, k]
        W_ptrs = W_ptr + offs_n.to(tl.int64)[None, :] * D + (k0 + offs_k)[:, None]
        W = tl.load(W_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if BF16_DOT:
            acc = tl.dot(g.to(tl.bfloat16), W.to(tl.bfloat16), acc)
        else:
            acc = tl.dot(g.to(tl.float32), W.to(tl.float32), acc, input_precision=INPUT_PRECISION)

    valid = mask_m[:, None] & mask_n[None, :]
    offs = rows[:, None] * F + offs_n[None, :]
    l1_scale = tl.load(l1_scale_ptr)
    if L1_WEIGHTED:
        s = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
        acc += l1_scale * s[None, :]
    else:
        acc += l1_scale
    if HAS_GF:
        acc += tl.load(g_f_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    f = tl.load(f_ptr + offs, mask=valid, other=0.0)
    g_pre = tl.where(valid & (f > 0), acc, 0.0).to(g_pre_ptr.dtype.element_ty)
    tl.store(g_pre_ptr + offs, g_pre, mask=valid)
    tl.atomic_add(g_b_enc_ptr + offs_n, tl.sum(g_pre.to(tl.float32), axis=0), mask=mask_n)


def latent_grad_dense(
    g_ND: Tensor,
    W_dec_FD: Tensor,
    f_NF: Tensor,
    s_F: Tensor | None,
    l1_scale: Tensor,
    g_f_NF: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Gradient at the pre-activations, dense: returns ``(g_pre_NF, g_b_enc_F)``.

    Eager: ``((g_ND @ W_dec_FD.T + l1_scale * s_F + g_f_NF) * (f_NF > 0), g_pre_NF.sum(0))``.
    ``g_ND`` is ``d loss / d x_hat`` in ``grad_dtype``; ``l1_scale`` a 0-d fp32 tensor (read on
    the device: no host sync).
    ``g_pre_NF`` comes in ``grad_dtype(f.dtype)``; ``g_b_enc_F`` in fp32.
    """
    N, F = f_NF.shape
    D = W_dec_FD.shape[1]
    _check(g_ND, W_dec_FD, f_NF, shapes=[(N, D), (F, D), (N, F)])
    g_pre_NF = output_buffer((N, F), grad_dtype(f_NF.dtype), f_NF.device)
    g_b_enc_F = torch.zeros(F, dtype=torch.float32, device=f_NF.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]) * triton.cdiv(F, meta["BLOCK_N"]),)
    _launch(
        _latent_grad_dense_kernel,
        grid,
        _CPU_GEMM,
        g_ND, W_dec_FD, f_NF, l1_scale if s_F is None else s_F, l1_scale,
        f_NF if g_f_NF is None else g_f_NF.contiguous(),
        g_pre_NF, g_b_enc_F, N, D, F,
        L1_WEIGHTED=s_F is not None, HAS_GF=g_f_NF is not None,
        BF16_DOT=f_NF.dtype == torch.bfloat16, INPUT_PRECISION=_input_precision(torch.float32),
    )  # fmt: skip
    return g_pre_NF, g_b_enc_F


@_tuned(_gather_configs(), key=["D", "K_CAP"])
@triton.jit
def _latent_grad_sparse_kernel(
    g_ptr, W_ptr, idx_ptr, nnz_ptr, s_ptr, l1_scale_ptr,  # inputs
    g_code_ptr,  # output
    D, K_CAP,
    L1_WEIGHTED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One token: ``g_code[k] = g . W_dec[idx[k]] + l1_scale * s[idx[k]]`` for its active
    latents (the ReLU passes gradient at every one of them)."""
    row = tl.program_id(0)
    code = row.to(tl.int64) * K_CAP
    nnz = tl.load(nnz_ptr + row)
    l1_scale = tl.load(l1_scale_ptr)
    for k0 in range(0, nnz, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < nnz
        idx = tl.load(idx_ptr + code + offs_k, mask=mask_k, other=0)
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            g = tl.load(g_ptr + row.to(tl.int64) * D + offs_d, mask=mask_d, other=0.0)
            W_ptrs = W_ptr + idx.to(tl.int64)[:, None] * D + offs_d[None, :]
            W = tl.load(W_ptrs, mask=mask_k[:, None] & mask_d[None, :], other=0.0)
            acc += tl.sum(W.to(tl.float32) * g[None, :], axis=1)
        if L1_WEIGHTED:
            acc += l1_scale * tl.load(s_ptr + idx, mask=mask_k, other=0.0)
        else:
            acc += l1_scale
        tl.store(g_code_ptr + code + offs_k, acc, mask=mask_k)


def latent_grad_sparse(
    g_ND: Tensor,
    W_dec_FD: Tensor,
    idx_NK: Tensor,
    nnz_N: Tensor,
    s_F: Tensor | None,
    l1_scale: Tensor,
) -> Tensor:
    """Gradient at the pre-activations of the active latents only, fp32 ``[N, K]`` aligned with
    ``idx_NK``. Eager: ``(g_ND @ W_dec_FD.T + l1_scale * s_F).gather(1, idx_NK)``."""
    N, K = idx_NK.shape
    F, D = W_dec_FD.shape
    _check(g_ND, W_dec_FD, idx_NK, nnz_N, shapes=[(N, D), (F, D), (N, K), (N,)])
    g_code_NK = output_buffer((N, K), torch.float32, g_ND.device)
    _launch(
        _latent_grad_sparse_kernel,
        (N,),
        _CPU_GATHER,
        g_ND, W_dec_FD, idx_NK, nnz_N, l1_scale if s_F is None else s_F, l1_scale,
        g_code_NK, D, K,
        L1_WEIGHTED=s_F is not None,
    )  # fmt: skip
    return g_code_NK


# -- backward: sparse-transposed times dense -------------------------------------------------


@_tuned(
    [
        triton.Config({"BLOCK_F": f, "BLOCK_E": e, "BLOCK_D": d}, num_warps=w)
        for f, e, d, w in [(32, 32, 64, 4), (32, 64, 128, 4), (64, 32, 128, 8), (16, 32, 256, 4)]
    ],
    key=["D", "F"],
)
@triton.jit
def _sparse_t_matmul_kernel(
    lat_ptr, tok_ptr, val_ptr, seg_ptr, dense_ptr,  # inputs
    out_ptr, sum_ptr,  # outputs
    D, F, stride_out_f, stride_out_d,
    WRITE_SUM: tl.constexpr, BF16_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``out[f] = sum over entries e of latent f: val[e] * dense[tok[e]]`` for
    BLOCK_F consecutive latents and BLOCK_D features. Entries are sorted by latent, so the
    block's entries are one run ``seg[f0] : seg[f0 + BLOCK_F]``; each chunk of them is
    scattered onto the block's latents by a one-hot [BLOCK_F, BLOCK_E] matrix on the tensor
    cores. ``WRITE_SUM``: also ``sum[f] = sum_e val[e]``."""
    f0 = tl.program_id(0) * BLOCK_F
    offs_f = f0 + tl.arange(0, BLOCK_F)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_f = offs_f < F
    mask_d = offs_d < D
    start = tl.load(seg_ptr + f0)
    end = tl.load(seg_ptr + tl.minimum(f0 + BLOCK_F, F))

    acc = tl.zeros((BLOCK_F, BLOCK_D), dtype=tl.float32)
    val_sum = tl.zeros((BLOCK_F,), dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask_e = offs_e < end
        lat = tl.load(lat_ptr + offs_e, mask=mask_e, other=-1)
        tok = tl.load(tok_ptr + offs_e, mask=mask_e, other=0)
        val = tl.load(val_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        onehot = tl.where(offs_f[:, None] == lat[None, :], val[None, :], 0.0)  # [BF, BE]
        dense_ptrs = dense_ptr + tok.to(tl.int64)[:, None] * D + offs_d[None, :]
        rows = tl.load(dense_ptrs, mask=mask_e[:, None] & mask_d[None, :], other=0.0)
        if BF16_DOT:
            acc = tl.dot(onehot.to(tl.bfloat16), rows.to(tl.bfloat16), acc)
        else:
            acc = tl.dot(onehot, rows.to(tl.float32), acc, input_precision=INPUT_PRECISION)
        if WRITE_SUM:
            val_sum += tl.sum(onehot, axis=1)

    out_ptrs = (
        out_ptr
        + offs_f.to(tl.int64)[:, None] * stride_out_f
        + offs_d.to(tl.int64)[None, :] * stride_out_d
    )
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_f[:, None] & mask_d[None, :])
    if WRITE_SUM:
        tl.store(sum_ptr + offs_f, val_sum, mask=mask_f & (tl.program_id(1) == 0))


def sparse_t_matmul(
    code: LatentMajor,
    val_E: Tensor,
    dense_ND: Tensor,
    out_FD: Tensor,
    *,
    with_sum: bool = False,
) -> Tensor | None:
    """``out_FD = S.T @ dense_ND`` for the sparse ``S_NF`` whose latent-major entries
    are ``code`` with values ``val_E``; every element of ``out_FD`` is written (a transposed
    view is fine: ``W_enc``'s gradient is written as ``grad_DF.T``). With ``with_sum`` it also
    returns ``S.sum(0)`` (fp32 ``[F]``)."""
    F, D = out_FD.shape
    _check(val_E, dense_ND, shapes=[code.lat_E.shape, (dense_ND.shape[0], D)])
    sum_F = output_buffer((F,), torch.float32, out_FD.device) if with_sum else None
    grid = lambda meta: (triton.cdiv(F, meta["BLOCK_F"]), triton.cdiv(D, meta["BLOCK_D"]))
    _launch(
        _sparse_t_matmul_kernel,
        grid,
        _CPU_TMATMUL,
        code.lat_E, code.tok_E, val_E, code.seg_F1, dense_ND,
        out_FD, out_FD if sum_F is None else sum_F,
        D, F, out_FD.stride(0), out_FD.stride(1),
        WRITE_SUM=with_sum,
        BF16_DOT=out_FD.dtype == torch.bfloat16 or dense_ND.dtype == torch.bfloat16,
        INPUT_PRECISION=_input_precision(torch.float32),
    )  # fmt: skip
    return sum_F


# -- sparse-code layout (PyTorch ops, no host sync) ------------------------------------------


class LatentMajor(NamedTuple):
    """The active entries of a sparse code sorted by latent (then token): its transpose."""

    lat_E: Tensor
    """int32 latent of each entry, ascending."""
    tok_E: Tensor
    """int32 token of each entry, ascending within a latent."""
    perm_E: Tensor
    """Position of each entry in the flattened ``[N, K]`` code: ``val_E = val_NK.view(-1)[perm_E]``."""
    seg_F1: Tensor
    """int32 ``[F + 1]``: latent f's entries are ``seg[f] : seg[f + 1]``."""


def latent_major(idx_NK: Tensor, nnz_N: Tensor, F: int, n_active: int) -> LatentMajor:
    """Transpose a code (``n_active`` = ``nnz_N.sum()``, known on the host after the forward's
    sync). Compacts the valid slots in token order with a prefix sum, then one stable sort of
    the ``n_active`` latent ids: the work scales with the active entries, and the order (hence
    the backward's sums) does not depend on the order the encoder filled the slots in."""
    N, K = idx_NK.shape
    dev = idx_NK.device
    valid = (torch.arange(K, device=dev) < nnz_N[:, None]).view(-1)
    dest = torch.where(valid, torch.cumsum(valid, 0) - 1, n_active)  # padding -> spare slot
    flat_E = torch.empty(n_active + 1, dtype=torch.int64, device=dev)
    flat_E = flat_E.scatter_(0, dest, torch.arange(N * K, device=dev))[:n_active]
    lat_E, order_E = torch.sort(idx_NK.view(-1)[flat_E], stable=True)
    perm_E = flat_E[order_E]
    tok_E = torch.div(perm_E, K, rounding_mode="floor").to(torch.int32)
    latents = torch.arange(F + 1, device=dev, dtype=lat_E.dtype)
    seg_F1 = torch.searchsorted(lat_E, latents, out_int32=True)
    return LatentMajor(lat_E, tok_E, perm_E, seg_F1)


def valid_slots(nnz_N: Tensor, K: int) -> Tensor:
    """bool ``[N, K]``: which slots of a code hold an entry (the rest are unwritten)."""
    return torch.arange(K, device=nnz_N.device) < nnz_N[:, None]


def _check(*tensors: Tensor, shapes: list[tuple[int, ...]]) -> None:
    device = tensors[0].device
    for i, (t, shape) in enumerate(zip(tensors, shapes, strict=True)):
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"argument {i}: shape {tuple(t.shape)}, expected {tuple(shape)}")
        if not t.is_contiguous():
            raise ValueError(f"argument {i}: expected a contiguous tensor")
        if t.device != device:
            raise ValueError(f"argument {i}: on {t.device}, expected {device}")
