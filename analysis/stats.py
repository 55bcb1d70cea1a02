"""Per-latent statistics of a trained SAE over a dataset, accumulated in one streaming pass.

Shape legend: B images, T tokens per image, F latents, C classes, K reference images.

Everything is a sum, a count or a top-K, so shards can be processed in any order, by any number
of ranks, and merged exactly (:meth:`LatentStatistics.merge`):

* ``image_sum_F``: sum over images of the image-level activation (the mean of the latent over the
  image's tokens, the paper's definition; or the max, as saev ranks images);
* ``active_images_F``: images whose image-level activation is > 0;
* ``active_tokens_F``: tokens whose activation is > 0;
* ``class_counts_CF``: tokens of class c whose activation exceeds ``tau`` (the paper's class-level
  concept counts; the dataset-level counts are their column sums);
* ``top_values_KF``/``top_ids_KF``: the K images with the highest image-level activation, among
  the images where the latent is active only. Unused slots hold value -inf and id -1: a latent
  with fewer than K active images has fewer references, never padding.

Ties in the top-K are broken by the smaller image id, so the result does not depend on the
order images arrive in. An image id is ``shard index << 32 | position in the shard``
(:func:`image_id`), the same whichever rank reads the shard.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

AGGREGATES = ("mean", "max")
_ID_BITS = 32


def image_id(shard_index: int, position: int) -> int:
    """The image's id: its shard's index in the sorted shard list and its position there."""
    if position >= 1 << _ID_BITS:
        raise ValueError(f"a shard holds more than 2**{_ID_BITS} images")
    return (shard_index << _ID_BITS) | position


def encode(x_ND: Tensor, tensors: dict[str, Tensor]) -> Tensor:
    """The exported SAE's code of raw activations, ``act((x - b_dec) @ W_enc + b_enc)``: with a
    ``threshold`` (jumprelu, batchtopk) ``pre * (pre > threshold)``, with ``k`` (topk, see
    ``TrainedSAE``) the ``k`` largest per token, else ``relu``."""
    from patchsae.kernels.reference import top_mask

    W_enc = tensors["W_enc"]
    pre_NF = torch.addmm(tensors["b_enc"], x_ND.to(W_enc.dtype) - tensors["b_dec"], W_enc)
    if "threshold" in tensors:
        return pre_NF.mul_(pre_NF > tensors["threshold"])
    if "k" in tensors:
        return pre_NF.relu() * top_mask(pre_NF, int(tensors["k"]))
    return pre_NF.relu_()


def merge_top(
    values_KF: Tensor, ids_KF: Tensor, new_values_BF: Tensor, new_ids_BF: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """The K largest of both sets per column, by value then smaller id; -inf values stay last."""
    values = torch.cat([values_KF, new_values_BF])
    ids = torch.cat([ids_KF, new_ids_BF])
    # Sort by id, then stably by value (descending): equal values keep the id order. Unused
    # slots (id -1) sort first by id but have value -inf, so they end up last.
    by_id = ids.argsort(dim=0, stable=True)
    values, ids = values.gather(0, by_id), ids.gather(0, by_id)
    by_value = values.argsort(dim=0, descending=True, stable=True)[:k]
    return values.gather(0, by_value), ids.gather(0, by_value)


class LatentStatistics:
    """Accumulates the sums above over batches of SAE codes ``[B, T, F]``."""

    def __init__(
        self,
        n_latents: int,
        *,
        k: int = 10,
        tau: float = 0.2,
        aggregate: str = "mean",
        n_classes: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate {aggregate!r}: use one of {list(AGGREGATES)}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.n_latents, self.k, self.tau, self.aggregate = n_latents, k, tau, aggregate
        self.device = torch.device(device)
        F = n_latents
        self.images = 0
        self.tokens = 0
        self.image_sum_F = torch.zeros(F, dtype=torch.float64, device=self.device)
        self.active_images_F = torch.zeros(F, dtype=torch.long, device=self.device)
        self.active_tokens_F = torch.zeros(F, dtype=torch.long, device=self.device)
        self.class_counts_CF = torch.zeros(n_classes, F, dtype=torch.long, device=self.device)
        self.class_images_C = torch.zeros(n_classes, dtype=torch.long, device=self.device)
        self.top_values_KF = torch.full((k, F), -math.inf, device=self.device)
        self.top_ids_KF = torch.full((k, F), -1, dtype=torch.long, device=self.device)

    @property
    def n_classes(self) -> int:
        return self.class_counts_CF.shape[0]

    def grow_classes(self, n_classes: int) -> None:
        """Make room for labels below ``n_classes`` (labels are discovered as they come)."""
        extra = n_classes - self.n_classes
        if extra > 0:
            F = self.n_latents
            zeros = torch.zeros(extra, F, dtype=torch.long, device=self.device)
            self.class_counts_CF = torch.cat([self.class_counts_CF, zeros])
            self.class_images_C = torch.cat([self.class_images_C, zeros[:, 0]])

    def image_level(self, codes_BTF: Tensor) -> Tensor:
        """``[B, F]`` image-level activation: the mean (or max) over the image's tokens."""
        return codes_BTF.mean(dim=1) if self.aggregate == "mean" else codes_BTF.amax(dim=1)

    @torch.no_grad()
    def update(self, codes_BTF: Tensor, labels_B: Tensor, ids_B: Tensor) -> Tensor:
        """Add a batch of codes; returns the ``[B, F]`` image-level activations."""
        B, T, F = codes_BTF.shape
        if F != self.n_latents:
            raise ValueError(f"codes have {F} latents, the statistics {self.n_latents}")
        if len(labels_B) and int(labels_B.min()) < 0:
            raise ValueError(f"labels must be >= 0, got {int(labels_B.min())}")
        labels_B = labels_B.to(self.device)
        if len(labels_B):
            self.grow_classes(int(labels_B.max()) + 1)
        image_BF = self.image_level(codes_BTF)
        self.images += B
        self.tokens += B * T
        self.image_sum_F += image_BF.sum(dim=0, dtype=torch.float64)
        active_BF = image_BF > 0
        self.active_images_F += active_BF.sum(dim=0)
        self.active_tokens_F += (codes_BTF > 0).sum(dim=(0, 1))
        self.class_counts_CF.index_add_(0, labels_B, (codes_BTF > self.tau).sum(dim=1))
        self.class_images_C.index_add_(0, labels_B, torch.ones_like(labels_B))
        # Only active images compete for the top-K, and only in the columns where one reaches
        # the current K-th value (ties included: the id decides). Once the buffers are full
        # that is a few columns per batch.
        values_BF = torch.where(active_BF, image_BF.float(), -math.inf)
        reaches_F = (active_BF & (values_BF >= self.top_values_KF[-1])).any(dim=0)
        cols = reaches_F.nonzero().squeeze(1)
        if cols.numel():
            ids_BF = torch.where(active_BF[:, cols], ids_B.to(self.device)[:, None], -1)
            values, ids = merge_top(
                self.top_values_KF[:, cols], self.top_ids_KF[:, cols], values_BF[:, cols], ids_BF,
                self.k,
            )  # fmt: skip
            self.top_values_KF[:, cols], self.top_ids_KF[:, cols] = values, ids
        return image_BF

    def merge(self, other: LatentStatistics) -> None:
        """Add another accumulator's sums (another rank's, another part of the data)."""
        if (other.n_latents, other.k, other.tau, other.aggregate) != (
            self.n_latents,
            self.k,
            self.tau,
            self.aggregate,
        ):
            raise ValueError("cannot merge statistics of different latents, k, tau or aggregate")
        self.grow_classes(other.n_classes)
        other.grow_classes(self.n_classes)
        self.images += other.images
        self.tokens += other.tokens
        for name in ("image_sum_F", "active_images_F", "active_tokens_F", "class_counts_CF"):
            getattr(self, name).add_(getattr(other, name).to(self.device))
        self.class_images_C += other.class_images_C.to(self.device)
        self.top_values_KF, self.top_ids_KF = merge_top(
            self.top_values_KF,
            self.top_ids_KF,
            other.top_values_KF.to(self.device),
            other.top_ids_KF.to(self.device),
            self.k,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "n_latents": self.n_latents,
            "k": self.k,
            "tau": self.tau,
            "aggregate": self.aggregate,
            "images": self.images,
            "tokens": self.tokens,
            **{name: getattr(self, name).cpu() for name in _TENSORS},
        }

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Any], device: torch.device | str = "cpu"
    ) -> LatentStatistics:
        stats = cls(
            state["n_latents"], k=state["k"], tau=state["tau"], aggregate=state["aggregate"]
        )
        stats.device = torch.device(device)
        stats.images, stats.tokens = state["images"], state["tokens"]
        for name in _TENSORS:
            setattr(stats, name, state[name].to(stats.device))
        return stats

    def results(self, labels_of: dict[int, int]) -> dict[str, Tensor]:
        """The derived per-latent statistics (CPU tensors), given the label of each top image.

        * ``frequency_F``: fraction of images where the latent is active;
          ``token_frequency_F``: fraction of tokens;
        * ``mean_activation_F``: mean image-level activation over the images where it is
          active; 0 for a dead latent (never NaN), which ``dead_F`` marks;
        * ``entropy_F``: label entropy (natural log) of the reference images, with
          p(label) = summed activation of that label's references / summed activation of all;
          over the references there are, when a latent has fewer than K active images
          (``n_references_F`` says how many); NaN for a dead latent.
        """
        images = max(self.images, 1)
        active = self.active_images_F.cpu()
        top_values = self.top_values_KF.cpu()
        top_ids = self.top_ids_KF.cpu()
        used = top_ids >= 0
        n_refs = used.sum(dim=0)
        labels = torch.tensor(
            [[labels_of.get(int(i), -1) for i in row] for row in top_ids.tolist()],
            dtype=torch.long,
        ).reshape(top_ids.shape)
        weights = torch.where(used, top_values, 0.0).double()
        n_classes = max(self.n_classes, int(labels.max()) + 1, 1)
        mass_CF = torch.zeros(n_classes, self.n_latents, dtype=torch.float64)
        mass_CF.scatter_add_(0, labels.clamp_min(0), weights)
        p_CF = mass_CF / mass_CF.sum(dim=0).clamp_min(1e-300)
        entropy = -(p_CF * torch.where(p_CF > 0, p_CF.log(), 0.0)).sum(dim=0)
        dead = active == 0
        entropy = torch.where(dead, math.nan, entropy + 0.0)  # + 0.0: no -0.0
        return {
            "frequency_F": active.double() / images,
            "token_frequency_F": self.active_tokens_F.cpu().double() / max(self.tokens, 1),
            "mean_activation_F": self.image_sum_F.cpu() / active.clamp_min(1),
            "dead_F": dead,
            "entropy_F": entropy,
            "n_references_F": n_refs,
            "active_images_F": active,
            "active_tokens_F": self.active_tokens_F.cpu(),
            "image_sum_F": self.image_sum_F.cpu(),
            "top_values_KF": torch.where(used, top_values, math.nan),
            "top_ids_KF": top_ids,
            "top_labels_KF": labels,
            "class_counts_CF": self.class_counts_CF.cpu(),
            "dataset_counts_F": self.class_counts_CF.cpu().sum(dim=0),
            "class_images_C": self.class_images_C.cpu(),
        }


_TENSORS = (
    "image_sum_F",
    "active_images_F",
    "active_tokens_F",
    "class_counts_CF",
    "class_images_C",
    "top_values_KF",
    "top_ids_KF",
)
