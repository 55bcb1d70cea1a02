"""Synthetic activations with a known dictionary, the same in any process that imports this file.

Only torch is imported, so that ``benchmarks/saelens_recipes.py`` can load it inside the SAELens
venv and train on exactly the tokens our recipes see (``batch_digest`` checks that).

A token is ``sum_i c_i a_i + offset + noise``: ``a_i`` the ``atoms`` unit rows of the true
dictionary, each firing independently with a power-law probability (the most common atom fires
most; the probabilities sum to the true L0), with a magnitude drawn uniformly in [0.5, 2]; a large
common offset; Gaussian noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Synthetic:
    d: int = 256
    atoms: int = 2048
    true_l0: float = 12.0
    alpha: float = 0.8  # power-law exponent of the firing probabilities
    offset_norm: float = 10.0
    noise: float = 0.05
    seed: int = 0

    def dictionary(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed)
        atoms = torch.randn(self.atoms, self.d, generator=g)
        return atoms / atoms.norm(dim=-1, keepdim=True)

    def offset(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed + 1)
        v = torch.randn(self.d, generator=g)
        return v * (self.offset_norm / v.norm())

    def probabilities(self) -> Tensor:
        p = torch.arange(1, self.atoms + 1, dtype=torch.float64) ** -self.alpha
        for _ in range(50):  # scale to the true L0, capping at 1
            p = (p * self.true_l0 / p.sum()).clamp_max(1.0)
        return p.float()

    def batch(self, index: int, n: int) -> Tensor:
        """Batch ``index`` of ``n`` tokens (independent of every other batch)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * index + 17)
        fires = torch.rand(n, self.atoms, generator=g) < self.probabilities()
        magnitude = torch.rand(n, self.atoms, generator=g) * 1.5 + 0.5
        noise = torch.randn(n, self.d, generator=g) * self.noise
        return (fires * magnitude) @ self._atoms + self._offset + noise

    def __post_init__(self) -> None:
        object.__setattr__(self, "_atoms", self.dictionary())
        object.__setattr__(self, "_offset", self.offset())


def batch_digest(x: Tensor) -> float:
    """A number that tells two processes' batches apart (sum of |x| weighted by position)."""
    w = torch.arange(1, x.numel() + 1, dtype=torch.float64).remainder(97)
    return float((x.double().flatten().abs() * w).sum())


def recovery(W_dec_FD: Tensor, atoms_AD: Tensor) -> tuple[float, float]:
    """For each true atom, the largest cosine with a decoder row: (mean, fraction above 0.9)."""
    dec = W_dec_FD / W_dec_FD.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    best_A = (atoms_AD @ dec.T).max(dim=-1).values
    return float(best_A.mean()), float((best_A > 0.9).float().mean())
