"""Training metrics that stay on the device between logs.

Shape legend: N tokens, D model width, F latents.

- ``LatentStats`` tracks, per latent, how long it has been silent (in steps for ghost grads, in
  tokens for ``sparsity/dead_frac``) and how often it fired in a tumbling window of
  ``window_tokens`` tokens (``sparsity/dense_frac`` and the density histogram).
- ``MetricSums`` accumulates loss terms and FVU sums over a log interval; ``compute()`` is the
  one host sync.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

DENSE_THRESHOLD = 0.1
"""A latent firing on more than this fraction of the window's tokens counts as dense."""


class LatentStats:
    def __init__(self, n_latents: int, window_tokens: int, device: torch.device | str) -> None:
        self.window_tokens = window_tokens
        zeros = lambda: torch.zeros(n_latents, dtype=torch.int64, device=device)
        self.steps_since_fired_F = zeros()
        self.tokens_since_fired_F = zeros()
        self.window_counts_F = zeros()
        self.window_seen = 0
        # The last complete window; until one completes, the current partial one is used.
        self.last_counts_F = zeros()
        self.last_seen = 0

    def update(self, fired_counts_F: Tensor, n_tokens: int, keep: Tensor | None = None) -> None:
        """``fired_counts_F``: how many of this step's ``n_tokens`` tokens each latent fired on
        (summed over ranks by the caller, so the statistics are global). ``keep`` false (a
        device bool; a skipped non-finite step): the step tells nothing, so the silence counters
        stay; its tokens still count in the window, which the host tracks without a sync."""
        if keep is not None:
            fired_counts_F = torch.where(keep, fired_counts_F, 0)
        fired_F = fired_counts_F > 0
        steps_F = torch.where(fired_F, 0, self.steps_since_fired_F + 1)
        tokens_F = torch.where(fired_F, 0, self.tokens_since_fired_F + n_tokens)
        if keep is not None:
            steps_F = torch.where(keep, steps_F, self.steps_since_fired_F)
            tokens_F = torch.where(keep, tokens_F, self.tokens_since_fired_F)
        self.steps_since_fired_F, self.tokens_since_fired_F = steps_F, tokens_F
        self.window_counts_F += fired_counts_F
        self.window_seen += n_tokens
        if self.window_seen >= self.window_tokens:
            self.last_counts_F.copy_(self.window_counts_F)
            self.last_seen = self.window_seen
            self.window_counts_F.zero_()
            self.window_seen = 0

    def ghost_mask(self, window_steps: int) -> Tensor:
        """Latents that have not fired for more than ``window_steps`` steps."""
        return self.steps_since_fired_F > window_steps

    def ghost_candidates(self, window_steps: int, horizon: int) -> Tensor:
        """The latents that ``ghost_mask(window_steps)`` can hold within the next ``horizon``
        steps (a silence counter grows by at most 1 a step), as indices; one host sync."""
        return torch.nonzero(self.steps_since_fired_F > window_steps - horizon).flatten()

    def dead_frac(self) -> Tensor:
        """Fraction of latents silent over the last ``window_tokens`` tokens (0 until that many
        tokens have been seen)."""
        return (self.tokens_since_fired_F >= self.window_tokens).float().mean()

    def density(self) -> Tensor:
        """Per-latent firing frequency over the last complete window (the current partial window
        before the first one completes)."""
        if self.last_seen:
            return self.last_counts_F.double() / self.last_seen
        return self.window_counts_F.double() / max(self.window_seen, 1)

    def dense_frac(self) -> Tensor:
        return (self.density() > DENSE_THRESHOLD).float().mean()

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps_since_fired": self.steps_since_fired_F.cpu(),
            "tokens_since_fired": self.tokens_since_fired_F.cpu(),
            "window_counts": self.window_counts_F.cpu(),
            "window_seen": self.window_seen,
            "last_counts": self.last_counts_F.cpu(),
            "last_seen": self.last_seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("steps_since_fired", "tokens_since_fired", "window_counts", "last_counts"):
            getattr(self, f"{name}_F").copy_(state[name])
        self.window_seen, self.last_seen = state["window_seen"], state["last_seen"]


class MetricSums:
    """Sums over a log interval, as one float64 device vector (one all-reduce, one sync).

    Skipped (non-finite) steps count in ``steps`` only: the means are over the steps that were
    applied, and NaN when there was none."""

    FIELDS = ("loss", "mse", "l1", "aux", "l0", "sq_err", "sq_norm", "tokens", "steps")
    NAMES = (
        "loss/total",
        "loss/mse",
        "loss/l1",
        "loss/aux",
        "quality/fvu",
        "quality/explained_variance",
        "sparsity/l0",
    )

    def __init__(self, d_in: int, device: torch.device | str) -> None:
        self.d_in, self.device = d_in, device
        self.reset()

    def reset(self) -> None:
        self.scalars = torch.zeros(len(self.FIELDS), dtype=torch.float64, device=self.device)
        self.sum_x_D = torch.zeros(self.d_in, dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def add(self, out: Any, x_ND: Tensor, keep: Tensor | None = None) -> None:
        """``out``: the kernels' ``SAEOutput``; ``x_ND``: the inputs the SAE saw; ``keep``: a
        device bool, false for a skipped step."""
        x = x_ND.double()
        n = x.shape[0]
        values = torch.stack(
            [
                out.loss.detach().double() * n,
                out.mse.detach().double() * n,
                out.l1.detach().double() * n,
                out.aux.detach().double() * n,
                torch.count_nonzero(out.f_NF).double(),  # codes are >= 0: the active count
                (x - out.x_hat_ND.detach().double()).pow(2).sum(),
                x.pow(2).sum(),
                torch.full((), float(n), dtype=torch.float64, device=x.device),  # no H2D sync
            ]
        )
        sum_x_D = x.sum(dim=0)
        if keep is not None:  # where, not a product: NaN * 0 is NaN
            values = torch.where(keep, values, 0.0)
            sum_x_D = torch.where(keep, sum_x_D, 0.0)
        self.scalars[:-1] += values
        self.scalars[-1] += 1  # steps
        self.sum_x_D += sum_x_D

    def packed(self) -> Tensor:
        """One vector to all-reduce across ranks."""
        return torch.cat([self.scalars, self.sum_x_D])

    def compute(self, packed: Tensor | None = None) -> dict[str, float]:
        """Means over the interval. FVU is centred: ``sum|x - x_hat|^2 / sum|x - mean x|^2``."""
        packed = self.packed() if packed is None else packed
        k = len(self.FIELDS)
        s = dict(zip(self.FIELDS, packed[:k].tolist(), strict=True))
        sum_x_D = packed[k:]
        if s["tokens"] == 0:  # every step of the interval was skipped
            return dict.fromkeys(self.NAMES, float("nan"))
        n = s["tokens"]
        centred = s["sq_norm"] - float(sum_x_D.pow(2).sum()) / n
        fvu = s["sq_err"] / max(centred, 1e-30)
        return {
            "loss/total": s["loss"] / n,
            "loss/mse": s["mse"] / n,
            "loss/l1": s["l1"] / n,
            "loss/aux": s["aux"] / n,
            "quality/fvu": fvu,
            "quality/explained_variance": 1.0 - fvu,
            "sparsity/l0": s["l0"] / n,
        }


def centred_fvu(x_ND: Tensor, x_hat_ND: Tensor) -> float:
    """Fraction of variance unexplained, centred on the batch mean (float64)."""
    x, x_hat = x_ND.double(), x_hat_ND.double()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum())
