"""How well single latents segment objects, on images that come with true object masks.

Shape legend: B images, P patches (h x w), F latents, R thresholds, C classes.

The mask of latent j on an image is the set of patches where its activation exceeds
``frac`` times its largest activation on that image (``frac = 0``: every patch where it fires; a
latent silent on the image has an empty mask), upsampled to pixels by nearest neighbour as
:func:`patchsae.analysis.masks.overlay` draws it. The true mask goes through the same resize and
crop as the image. Their IoU is counted in pixels: with ``cov_p`` the object's share of patch
``p``'s pixels and ``m_p`` the binary mask, ``IoU = sum(m cov) / (sum(m) + sum((1 - m) cov))``.
Images whose true mask is empty are left out.

:class:`SegmentationScores` holds, per class, the mean IoU of every latent at every threshold,
streamed over a dataset (it never holds the images: ``C x R x F`` float64 sums). The protocol
of :func:`object_latents` picks each class's best (latent, threshold) on one split; scoring the
same choice on another split (:meth:`SegmentationScores.iou_of`) gives an unbiased number.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from patchsae.analysis.masks import MaskMaker
from patchsae.analysis.model import AnalysisError
from torch import Tensor

FRACS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
"""Default thresholds, as fractions of the latent's largest activation on the image."""


@dataclass(frozen=True)
class ObjectLatent:
    """A class's best single-latent segmentation."""

    label: int
    latent: int
    frac: float
    iou: float
    """Mean IoU over the class's images of the split it was measured on."""


def patch_coverage(maker: MaskMaker, masks: list[PIL.Image.Image]) -> Tensor:
    """``[B, P]`` share of each patch's pixels that are on the object, in the image as the model
    sees it (mask resized and cropped like the image; > 50% grey after resizing is object)."""
    h, w = maker.grid
    out = []
    for mask in masks:
        view = np.asarray(maker.view(mask.convert("L").convert("RGB")))[..., 0] > 127
        H, W = view.shape
        if H % h or W % w:
            raise AnalysisError(f"the model's {H}x{W} input does not split into {h}x{w} patches")
        out.append(view.reshape(h, H // h, w, W // w).mean(axis=(1, 3)).reshape(-1))
    return torch.from_numpy(np.stack(out)).float()


def mask_iou(patches_BPF: Tensor, coverage_BP: Tensor, frac: float) -> Tensor:
    """``[B, F]`` pixel IoU of each latent's thresholded mask with the true mask."""
    top = patches_BPF.amax(dim=1, keepdim=True)
    on = ((patches_BPF > top * frac) & (patches_BPF > 0)).float()
    cov = coverage_BP[:, :, None]
    inter = (on * cov).sum(dim=1)
    union = on.sum(dim=1) + ((1 - on) * cov).sum(dim=1)
    return inter / union.clamp_min(1e-12)


class SegmentationScores:
    """Per class, the summed IoU of every latent at every threshold, and the image count."""

    def __init__(self, n_classes: int, n_latents: int, fracs: tuple[float, ...] = FRACS) -> None:
        if not fracs or any(not 0 <= f < 1 for f in fracs):
            raise AnalysisError(f"thresholds {fracs}: need at least one, each in [0, 1)")
        self.fracs = tuple(fracs)
        self.sums_CRF = torch.zeros(n_classes, len(fracs), n_latents, dtype=torch.float64)
        self.counts_C = torch.zeros(n_classes, dtype=torch.int64)

    def update(self, patches_BPF: Tensor, coverage_BP: Tensor, labels_B: Tensor) -> None:
        keep = coverage_BP.sum(dim=1) > 0
        patches_BPF, coverage_BP, labels_B = patches_BPF[keep], coverage_BP[keep], labels_B[keep]
        n_classes = len(self.counts_C)
        if len(labels_B) and (labels_B.min() < 0 or labels_B.max() >= n_classes):
            raise AnalysisError(
                f"labels must be in 0..{n_classes - 1}; got {labels_B.unique().tolist()}"
            )
        self.counts_C += torch.bincount(labels_B, minlength=n_classes)
        for r, frac in enumerate(self.fracs):
            iou_BF = mask_iou(patches_BPF, coverage_BP, frac).double()
            self.sums_CRF[:, r].index_add_(0, labels_B, iou_BF)

    def mean(self) -> Tensor:
        """``[C, R, F]`` mean IoU (NaN for classes without images)."""
        counts = self.counts_C.double()[:, None, None]
        return torch.where(counts > 0, self.sums_CRF / counts.clamp_min(1), torch.nan)

    def iou_of(self, chosen: list[ObjectLatent]) -> list[ObjectLatent]:
        """The same (class, latent, threshold) choices, scored on this split."""
        mean = self.mean()
        return [
            ObjectLatent(
                o.label, o.latent, o.frac, float(mean[o.label, self.fracs.index(o.frac), o.latent])
            )
            for o in chosen
        ]


def object_latents(scores: SegmentationScores) -> list[ObjectLatent]:
    """Each class's (latent, threshold) of highest mean IoU; classes without images are left
    out."""
    mean = scores.mean()
    out = []
    for label in range(len(mean)):
        if scores.counts_C[label] == 0:
            continue
        flat = int(torch.nan_to_num(mean[label], nan=-1.0).argmax())
        r, j = divmod(flat, mean.shape[2])
        out.append(ObjectLatent(label, j, scores.fracs[r], float(mean[label, r, j])))
    return out


def segmentation_samples(urls: str) -> Iterator[tuple[PIL.Image.Image, PIL.Image.Image, int]]:
    """``(image, true mask, label)`` of every sample of the shards ``urls`` that has a
    ``mask.png`` member (the demo's layout)."""
    from patchsae.data.shards import decode_image, expand_urls, iter_samples

    found = False
    for url in expand_urls(urls):
        for sample in iter_samples(url):
            if "mask.png" not in sample:
                continue
            found = True
            mask = PIL.Image.open(io.BytesIO(sample["mask.png"])).convert("L")
            yield decode_image(sample), mask, int(sample["cls"].decode().strip())
    if not found:
        raise AnalysisError(f"no sample in {urls} has a true object mask ({{key}}.mask.png)")


@torch.no_grad()
def score_segmentation(
    maker: MaskMaker,
    samples: Iterable[tuple[PIL.Image.Image, PIL.Image.Image, int]],
    n_classes: int,
    *,
    fracs: tuple[float, ...] = FRACS,
    batch_images: int = 64,
) -> SegmentationScores:
    """Stream ``samples`` through the CLIP and the SAE, ``batch_images`` at a time."""
    scores = SegmentationScores(n_classes, maker.sae.n_latents, fracs)

    def flush(batch: list[tuple[PIL.Image.Image, PIL.Image.Image, int]]) -> None:
        codes_BTF = maker.codes([image for image, _, _ in batch])
        coverage = patch_coverage(maker, [mask for _, mask, _ in batch])
        labels = torch.tensor([label for _, _, label in batch])
        scores.update(codes_BTF[:, 1:].cpu(), coverage, labels)

    batch = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_images:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    return scores
