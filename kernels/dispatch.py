"""The one entry point the trainer calls for the SAE forward pass and loss.

``PATCHSAE_KERNELS`` picks the implementation:

- ``auto`` (default): the Triton kernels for CUDA tensors, the CPU path (``kernels.cpu``) for
  CPU tensors;
- ``eager``: the reference (``kernels.reference``) everywhere;
- ``triton``: the Triton kernels; on a host without a GPU only under Triton's interpreter
  (``TRITON_INTERPRET=1`` set before Python starts; slow, for tests);
- ``cpu``: the CPU path (CPU tensors only).

Inputs a path does not take (the Triton kernels: float64, mixed dtypes or devices, bf16 in the
interpreter, empty batches; the CPU path: other than fp32/fp64; both: jumprelu thresholds that
are negative) run on the reference; ``stats.eager_fallbacks`` counts them.

Both fast paths take each batch sparse when its measured density (active entries / (tokens *
latents)) is at or below ``sparse_threshold(device)`` (``set_sparse_threshold`` or
``PATCHSAE_SPARSE_THRESHOLD`` for both; else each device's default; 0 turns the sparse path
off); see ``kernels.autograd`` for the one host sync per step this costs on a GPU and why.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from patchsae.kernels.reference import SAEOutput
from patchsae.kernels.reference import sae_loss as eager_sae_loss
from torch import Tensor

KERNEL_CHOICES = ("auto", "eager", "triton", "cpu")
DEFAULT_SPARSE_THRESHOLD = 0.003
"""Break-even density on an H100 (bf16): the sparse path saves about 8 N D F FLOPs of dense
GEMMs (about 1,000 TFLOP/s peak, ~600 reached) and spends about 8 N D L0 bytes of gathers
(3.35 TB/s peak, ~2 TB/s reached), so it wins while L0 / F < ~2e12 / 6e14, about 0.3%
(DESIGN.md). Re-measure with ``benchmarks/kernels.py`` on other cards."""
DEFAULT_CPU_SPARSE_THRESHOLD = 0.03
"""Density below which the CPU path (``kernels.cpu``) goes sparse: half its break-even against
its own dense step (about 6% at d = 256, 4,096 latents, 4,096 tokens on 2 cores, where the sparse
step at L0 12 is 3x faster than the dense one; ``benchmarks/kernels.py --device cpu``)."""

_threshold_override: float | None = None
_warned: set[str] = set()


@dataclass
class KernelStats:
    """Host-side counters of ``sae_loss`` calls (no device work); the trainer logs
    ``sparse_steps / steps`` as ``perf/sparse_step_frac``."""

    steps: int = 0
    sparse_steps: int = 0
    eager_fallbacks: int = 0

    @property
    def sparse_step_frac(self) -> float:
        return self.sparse_steps / self.steps if self.steps else 0.0

    def reset(self) -> None:
        self.steps = self.sparse_steps = self.eager_fallbacks = 0


stats = KernelStats()


def _choice() -> str:
    choice = os.environ.get("PATCHSAE_KERNELS", "auto").strip().lower() or "auto"
    if choice not in KERNEL_CHOICES:
        raise ValueError(
            f"PATCHSAE_KERNELS={choice!r} is not valid; use one of {list(KERNEL_CHOICES)}"
        )
    return choice


def kernel_path() -> str:
    """The implementation ``sae_loss`` runs, as logged to MLflow (param ``kernels/path``):
    ``"triton"``, ``"cpu"`` or ``"eager"``. ``auto`` reports ``"triton"`` when a GPU and Triton
    are there (CPU tensors still run the CPU path), else ``"cpu"``."""
    choice = _choice()
    if choice in ("eager", "cpu"):
        return choice
    if choice == "auto":
        return "triton" if torch.cuda.is_available() and _triton_importable() else "cpu"
    if not _triton_importable():
        raise RuntimeError("PATCHSAE_KERNELS=triton: triton is not installed; pip install triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(
            "PATCHSAE_KERNELS=triton needs a CUDA GPU; on a CPU host set TRITON_INTERPRET=1 "
            "before Python starts (Triton's interpreter: slow, for tests) or unset "
            "PATCHSAE_KERNELS"
        )
    return "triton"


def sparse_threshold(device: str = "cuda") -> float:
    """The density at or below which a batch takes the sparse path on ``device`` (a device type,
    ``"cuda"`` or ``"cpu"``; 0: never)."""
    if _threshold_override is not None:
        return _threshold_override
    raw = os.environ.get("PATCHSAE_SPARSE_THRESHOLD", "").strip()
    if not raw:
        return DEFAULT_CPU_SPARSE_THRESHOLD if device == "cpu" else DEFAULT_SPARSE_THRESHOLD
    try:
        return _valid_threshold(float(raw))
    except ValueError:
        raise ValueError(
            f"PATCHSAE_SPARSE_THRESHOLD={raw!r} is not valid; use a density in [0, 1] "
            f"(0 turns the sparse path off; default {DEFAULT_SPARSE_THRESHOLD} on a GPU, "
            f"{DEFAULT_CPU_SPARSE_THRESHOLD} on a CPU)"
        ) from None


def set_sparse_threshold(threshold: float | None) -> float | None:
    """Override the sparse threshold for this process (``None``: back to the environment /
    default). Returns the previous override."""
    global _threshold_override
    previous = _threshold_override
    _threshold_override = None if threshold is None else _valid_threshold(float(threshold))
    return previous


def _valid_threshold(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"sparse threshold {value} is not a density in [0, 1]")
    return value


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
    **options: Any,
) -> SAEOutput:
    """SAE forward pass and loss; same contract as ``kernels.reference.sae_loss`` (``options``:
    its architecture options, ``k`` to ``aux_coeff``)."""
    choice = _choice()
    tensors = (x_ND, W_enc_DF, b_enc_F, W_dec_FD, b_dec_D)
    stats.steps += 1
    ghost_index_G = options.pop("ghost_index_G", None)  # the Triton path takes the mask alone
    if choice == "triton" or (choice == "auto" and x_ND.is_cuda and _triton_importable()):
        kernel_path()  # a clear error when the Triton path cannot run here
        reason = _unsupported(tensors)
        threshold_F = options.get("threshold_F")
        if reason is None and architecture == "jumprelu":
            reason = _unsupported_threshold(threshold_F, x_ND)
        if reason is None and architecture in ("topk", "batchtopk", "jumprelu"):
            from patchsae.kernels.topk import triton_topk_loss

            out, info = triton_topk_loss(
                *tensors,
                architecture=architecture,
                k=options.get("k", 0),
                threshold_F=threshold_F,
                bandwidth=options.get("bandwidth", 1e-3),
                l1_coeff=l1_coeff,
                mse_norm=mse_norm,
                ghost_mask_F=ghost_mask_F,
                aux_k=options.get("aux_k", 0),
                aux_coeff=options.get("aux_coeff", 0.0),
            )
            stats.sparse_steps += info.sparse
            return out
        if reason is None and architecture != "relu":
            reason = f"architecture {architecture!r}"
        if reason is None:
            from patchsae.kernels.autograd import triton_sae_loss

            out, info = triton_sae_loss(
                *tensors,
                l1_coeff=l1_coeff,
                mse_norm=mse_norm,
                l1_decoder_norm=l1_decoder_norm,
                ghost_mask_F=ghost_mask_F,
                sparse_threshold=sparse_threshold(),
            )
            stats.sparse_steps += info.sparse
            return out
        _fall_back(f"Triton SAE kernels: {reason}")
    elif choice == "cpu" or (choice == "auto" and x_ND.device.type == "cpu"):
        from patchsae.kernels import cpu

        if cpu.supports(tensors, architecture, options.get("threshold_F")):
            out, info = cpu.cpu_sae_loss(
                *tensors,
                architecture=architecture,
                l1_coeff=l1_coeff,
                mse_norm=mse_norm,
                l1_decoder_norm=l1_decoder_norm,
                ghost_mask_F=ghost_mask_F,
                k=options.get("k", 0),
                threshold_F=options.get("threshold_F"),
                bandwidth=options.get("bandwidth", 1e-3),
                aux_k=options.get("aux_k", 0),
                aux_coeff=options.get("aux_coeff", 0.0),
                sparse_threshold=sparse_threshold("cpu"),
            )
            stats.sparse_steps += info.sparse
            return out
        if choice == "cpu":
            _fall_back(
                f"CPU SAE path: {architecture} on {x_ND.dtype} {x_ND.device.type} tensors "
                f"(it takes {list(cpu.CPU_ARCHITECTURES)} on fp32/fp64 CPU tensors, jumprelu "
                "with thresholds >= 0)"
            )
        else:
            stats.eager_fallbacks += 1
    return eager_sae_loss(
        *tensors,
        l1_coeff=l1_coeff,
        mse_norm=mse_norm,
        l1_decoder_norm=l1_decoder_norm,
        ghost_mask_F=ghost_mask_F,
        architecture=architecture,
        ghost_index_G=ghost_index_G,
        **options,
    )


def _fall_back(reason: str) -> None:
    stats.eager_fallbacks += 1
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"{reason}; running the eager reference", stacklevel=3)


def _unsupported(tensors: tuple[Tensor, ...]) -> str | None:
    """Why the Triton kernels cannot take these inputs, or None."""
    x = tensors[0]
    if any(t.dtype != x.dtype for t in tensors) or x.dtype not in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
    ):
        return f"dtypes {sorted({str(t.dtype) for t in tensors})} (need one of fp32/fp16/bf16)"
    if any(t.device != x.device for t in tensors):
        return "tensors on different devices"
    if x.device.type != "cuda":
        from patchsae.kernels import triton_kernels

        if not triton_kernels.INTERPRET:
            return "CPU tensors outside Triton's interpreter (TRITON_INTERPRET=1)"
        if x.dtype == torch.bfloat16:
            return "bf16 in Triton's CPU interpreter (no bf16 arithmetic there)"
    if x.dim() != 2 or 0 in (*x.shape, tensors[1].shape[1]):
        return f"input shape {tuple(x.shape)}"
    return None


def _unsupported_threshold(threshold_F: Tensor | None, x: Tensor) -> str | None:
    """Why the Triton path cannot take these jumprelu thresholds (it needs them >= 0, as the
    trainer's are), or None; reading the check back is one small host sync."""
    if threshold_F is None:
        return "jumprelu without threshold_F"
    if threshold_F.device != x.device:
        return "jumprelu thresholds on another device"
    if not bool((threshold_F >= 0).all()):
        return "negative jumprelu thresholds"
    return None


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
