"""Plots logged as MLflow artifacts (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402
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


def pareto_plot(names: list[str], l0: list[float], fvu: list[float], path: Path) -> Path:
    """FVU against L0 of a sweep's SAEs, each labelled; the Pareto front (no other SAE is both
    sparser and better) joined by a line."""
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    ax.scatter(l0, fvu, color="tab:blue", zorder=3)
    for name, x, y in zip(names, l0, fvu, strict=True):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front, best = [], float("inf")
    for x, y in sorted(zip(l0, fvu, strict=True)):
        if y < best:
            front.append((x, y))
            best = y
    if front:
        ax.plot(*zip(*front, strict=True), color="tab:orange", label="Pareto front", zorder=2)
        ax.legend(loc="upper right")
    if min(l0) > 0:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("FVU (unexplained variance)")
    ax.set_title(f"{len(names)} SAEs trained on the same tokens")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
