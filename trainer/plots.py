"""Plots logged as MLflow artifacts (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402


def density_histogram(density_F: Tensor, path: Path) -> Path:
    """Histogram of log10 firing frequency per latent; dead latents are counted apart."""
    density = density_F.double()
    alive = density[density > 0]
    dead = int((density == 0).sum())
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if len(alive):
        ax.hist(torch.log10(alive).numpy(), bins=50, color="tab:blue")
    ax.axvline(-1, color="tab:red", linestyle="--", label="dense (> 10% of tokens)")
    ax.set_xlabel("log10 firing frequency over the window")
    ax.set_ylabel("latents")
    ax.set_title(f"{len(density)} latents, {dead} never fired in the window")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
