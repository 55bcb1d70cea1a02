"""SAE math: the eager reference (the specification) and the dispatching entry point."""

from kernels.dispatch import kernel_path, sae_loss
from kernels.reference import SAEOutput

__all__ = ["SAEOutput", "kernel_path", "sae_loss"]
