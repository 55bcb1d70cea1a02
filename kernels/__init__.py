"""SAE math: the eager reference (the specification), the Triton kernels, the CPU path and the
dispatching entry point."""

from patchsae.kernels.dispatch import (
    kernel_path,
    sae_loss,
    set_sparse_threshold,
    sparse_threshold,
    stats,
)
from patchsae.kernels.reference import SAEOutput

__all__ = [
    "SAEOutput",
    "kernel_path",
    "sae_loss",
    "set_sparse_threshold",
    "sparse_threshold",
    "stats",
]
