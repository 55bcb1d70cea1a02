"""The one entry point the trainer calls for the SAE forward pass and loss.

It picks an implementation: ``PATCHSAE_KERNELS=eager|triton|auto`` (default ``auto``).
Today only the eager reference exists; ``auto`` resolves to it on every device.
"""

from __future__ import annotations

import os

from torch import Tensor

from kernels.reference import SAEOutput
from kernels.reference import sae_loss as eager_sae_loss

KERNEL_CHOICES = ("auto", "eager", "triton")


def kernel_path() -> str:
    """The implementation ``sae_loss`` runs, as logged to MLflow (param ``kernels/path``)."""
    choice = os.environ.get("PATCHSAE_KERNELS", "auto").strip().lower() or "auto"
    if choice not in KERNEL_CHOICES:
        raise ValueError(
            f"PATCHSAE_KERNELS={choice!r} is not valid; use one of {list(KERNEL_CHOICES)}"
        )
    if choice == "triton":
        raise NotImplementedError(
            "PATCHSAE_KERNELS=triton: the Triton kernels are not part of this version yet; "
            "unset PATCHSAE_KERNELS or set it to 'eager'"
        )
    return "eager"


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
    """SAE forward pass and loss; same contract as ``kernels.reference.sae_loss``."""
    kernel_path()
    return eager_sae_loss(
        x_ND,
        W_enc_DF,
        b_enc_F,
        W_dec_FD,
        b_dec_D,
        l1_coeff=l1_coeff,
        mse_norm=mse_norm,
        l1_decoder_norm=l1_decoder_norm,
        ghost_mask_F=ghost_mask_F,
    )
