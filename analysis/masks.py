"""Segmentation masks: a latent's activation on each patch, on the image.

Shape legend: L latents, h x w patch grid, H x W pixels.

The mask of latent j on an image is its SAE activation on every patch token (CLS left out),
laid out on the ViT's patch grid (the paper's Figure 2c/4). :func:`overlay` upsamples it to the
image (nearest: one block per patch, as the paper's demo) and blends a colour map over the
image with opacity proportional to the activation; inactive patches are darkened.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from patchsae.analysis.model import AnalysisError, TrainedSAE, activation_source, load_trained
from patchsae.analysis.stats import encode
from patchsae.trainer.checkpoint import atomic_write
from torch import Tensor


@dataclass
class ImageMasks:
    """The top (or chosen) latents of one image."""

    image: PIL.Image.Image
    """The image as the model sees it (resized and cropped, before normalisation)."""
    latents: list[int]
    image_activation: list[float]
    """Mean activation over the image's tokens (CLS + patches), per latent."""
    grids_LHW: Tensor
    """Per-patch activation ``[L, h, w]``."""


class MaskMaker:
    """The SAE and its CLIP, loaded once, for masks of many images."""

    def __init__(
        self, sae: TrainedSAE, *, pretrained: str | None = None, device: str = "cpu"
    ) -> None:
        self.sae = sae
        self.device = torch.device(device)
        self.source, self.preprocess = activation_source(
            sae, pretrained=pretrained, device=self.device
        )
        self.tensors = sae.to(self.device).tensors
        self.grid = tuple(self.source.visual.grid_size)

    def view(self, image: PIL.Image.Image) -> PIL.Image.Image:
        """``image`` resized and cropped as the preprocessing does, without normalising."""
        from torchvision.transforms import Normalize

        x: Any = image.convert("RGB")  # a PIL image, then a tensor after ToTensor
        for transform in self.preprocess.transforms:
            if isinstance(transform, Normalize):
                break
            x = transform(x)
        array = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        return PIL.Image.fromarray(array)

    @torch.no_grad()
    def codes(self, images: list[PIL.Image.Image]) -> Tensor:
        """``[B, T, F]`` SAE codes of every token (CLS first) of each image."""
        pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images])
        acts_BTD = self.source.all_tokens(pixels)
        B, T, D = acts_BTD.shape
        return encode(acts_BTD.reshape(-1, D), self.tensors).reshape(B, T, -1)

    def patch_grids(self, codes_BTF: Tensor, latents: list[int]) -> Tensor:
        """``[B, L, h, w]`` per-patch activations of ``latents``."""
        self.sae.check_latents(latents)
        h, w = self.grid
        patches = codes_BTF[:, 1:, latents]  # [B, h*w, L]
        return patches.permute(0, 2, 1).reshape(len(codes_BTF), len(latents), h, w).cpu()

    def masks(
        self, image: PIL.Image.Image, latents: list[int] | None = None, top: int = 5
    ) -> ImageMasks:
        """Masks of ``latents`` on ``image``, or of its ``top`` latents by image-level
        activation (mean over all its tokens)."""
        codes_TF = self.codes([image])[0]
        mean_F = codes_TF.mean(dim=0)
        if latents is None:
            order = mean_F.argsort(descending=True)[:top]
            latents = [j for j in order.tolist() if mean_F[j] > 0]
        grids = self.patch_grids(codes_TF[None], latents)[0]
        return ImageMasks(self.view(image), latents, mean_F[latents].tolist(), grids)


def upsample(grid_hw: Tensor, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of a patch grid to ``size`` = (H, W)."""
    import torch.nn.functional as F

    up = F.interpolate(grid_hw[None, None].float(), size=size, mode="nearest")
    return up[0, 0].numpy()


def overlay(
    image: PIL.Image.Image, grid_hw: Tensor, vmax: float | None = None, scale: int = 1
) -> PIL.Image.Image:
    """``image`` with the mask blended over it: colour map ``inferno``, opacity proportional to
    activation / ``vmax`` (default: the grid's max), inactive patches at half brightness."""
    from matplotlib import colormaps

    if scale > 1:
        image = image.resize(
            (image.width * scale, image.height * scale), PIL.Image.Resampling.NEAREST
        )
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    act = upsample(grid_hw, (rgb.shape[0], rgb.shape[1]))
    top = float(vmax if vmax is not None else act.max())
    level = np.clip(act / top, 0, 1) if top > 0 else np.zeros_like(act)
    colour = colormaps["inferno"](level)[..., :3]
    alpha = (0.75 * level)[..., None]
    out = np.where(act[..., None] > 0, rgb * (1 - alpha) + colour * alpha, rgb * 0.5)
    return PIL.Image.fromarray((out * 255).round().astype(np.uint8))


def _save_png(picture: PIL.Image.Image, path: Path) -> None:
    picture.save(path, format="PNG")


def read_image(path: str | Path) -> PIL.Image.Image:
    """An RGB image from a file; :class:`AnalysisError` when it is not one."""
    path = Path(path)
    try:
        data = path.read_bytes()
        with PIL.Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except FileNotFoundError as err:
        raise AnalysisError(f"--image {path}: no such file") from err
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as err:
        raise AnalysisError(
            f"--image {path} is not an image PIL can read ({type(err).__name__}: {err}); "
            "pass a PNG, JPEG or WebP file"
        ) from err


def write_masks(
    run_dir: str | Path,
    image_path: str | Path,
    *,
    latents: list[int] | None = None,
    top: int = 5,
    out: str | Path | None = None,
    pretrained: str | None = None,
    device: str = "cpu",
) -> list[Path]:
    """``patchsae masks``: overlays of the image's top (or chosen) latents, one PNG per latent,
    and ``<image>.masks.json`` with the per-patch values. Everything is checked before the first
    file is written."""
    if top < 1:
        raise AnalysisError(f"--top {top}: must be >= 1")
    sae = load_trained(run_dir)
    if latents is not None:
        sae.check_latents(latents)
    image = read_image(image_path)
    maker = MaskMaker(sae, pretrained=pretrained, device=device)
    result = maker.masks(image, latents, top=top)
    out = Path(out) if out else Path(run_dir) / "masks"
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(image_path).stem
    scale = max(1, 224 // max(result.image.size))
    written = []
    for j, grid in zip(result.latents, result.grids_LHW, strict=True):
        path = out / f"{stem}.latent{j}.png"
        picture = overlay(result.image, grid, scale=scale)
        atomic_write(path, partial(_save_png, picture))
        written.append(path)
    record = {
        "image": str(image_path),
        "run_dir": str(run_dir),
        "grid": list(maker.grid),
        "latents": [
            {"latent": j, "image_activation": a, "patches": g.tolist()}
            for j, a, g in zip(
                result.latents, result.image_activation, result.grids_LHW, strict=True
            )
        ],
    }
    path = out / f"{stem}.masks.json"
    atomic_write(path, lambda p: p.write_text(json.dumps(record, indent=1)))
    return [*written, path]
