"""Activation source: a frozen open_clip ViT whose forward pass stops after the hook block.

Shape legend: B images, T tokens per image (CLS + patches), D model width.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

DEMO_MODEL = "patchsae-demo-vit"
TokenSelection = Literal["all", "cls", "patches"]
"""Which tokens of a block output: CLS and every patch, the CLS token, or the patches."""
TOKEN_SELECTIONS: tuple[str, ...] = get_args(TokenSelection)
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".npz")
_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


class ModelError(ValueError):
    """The model cannot be built or loaded; the message names the fix."""


def register_models() -> None:
    """Register the project's own open_clip configs (the tiny demo ViT). Idempotent."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True


def vision_config(name: str) -> dict[str, Any]:
    """The ``vision_cfg`` of an open_clip model, from its registry (no weights, no network)."""
    import open_clip

    register_models()
    if name.startswith(("hf-hub:", "local-dir:")):
        raise ModelError(
            f"model.name {name!r}: hub and local-dir schemas are not supported; use a registered "
            "open_clip name (open_clip.list_models()) and pass weights as model.pretrained"
        )
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=5)
        hint = f"did you mean one of {close}?" if close else "see open_clip.list_models()"
        raise ModelError(f"model.name {name!r} is not an open_clip model; {hint}")
    vision = cfg.get("vision_cfg", {})
    if not isinstance(vision.get("layers"), int) or "timm_model_name" in vision:
        raise ModelError(
            f"model.name {name!r} is not an open_clip ViT (no transformer blocks to hook); "
            "use a ViT such as ViT-B-16"
        )
    return vision


def model_depth(name: str) -> int:
    """Number of residual blocks in the model's vision transformer."""
    return vision_config(name)["layers"]


def check_weights(name: str, pretrained: str | None) -> None:
    """``pretrained`` must be None, an existing checkpoint file or an open_clip tag of ``name``."""
    import open_clip

    vision_config(name)
    if pretrained is None or Path(pretrained).is_file():
        return
    if "/" in pretrained or pretrained.endswith(WEIGHT_SUFFIXES):
        demo = " (the demo CLIP: `make train` or `patchsae make-demo-clip` trains it)"
        raise ModelError(
            f"model.pretrained {pretrained!r}: the checkpoint file {pretrained} does not exist"
            + (demo if name == DEMO_MODEL else "")
            + "; fix the path, or use null for random weights"
        )
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise ModelError(
            f"model.pretrained {pretrained!r} is neither a checkpoint file nor a pretrained tag of "
            f"{name} (tags: {tags}); fix the path, pick a tag, or use null for random weights"
        )


def load_visual(
    name: str, pretrained: str | None, *, cache_dir: str | None, init_seed: int
) -> tuple[nn.Module, Any]:
    """Build an open_clip model with its real factory and return ``(visual tower, preprocess)``.

    ``pretrained`` is an open_clip tag (``openai``), a local checkpoint file, or None for a
    seeded random init. The text tower is dropped: only the image side is needed.
    """
    model, preprocess = load_clip(name, pretrained, cache_dir=cache_dir, init_seed=init_seed)
    visual: Any = model.visual
    return visual, preprocess


def load_clip(
    name: str, pretrained: str | None, *, cache_dir: str | None, init_seed: int
) -> tuple[nn.Module, Any]:
    """The whole open_clip model (image and text towers), frozen, and its preprocessing."""
    import open_clip

    register_models()
    check_weights(name, pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, cache_dir=cache_dir
            )
        except (RuntimeError, OSError, ValueError) as err:
            mismatch = _architecture_mismatch(name, pretrained)
            if mismatch:
                raise ModelError(
                    f"{pretrained} is not a checkpoint of {name}: {mismatch}; pass weights of "
                    f"the same architecture ({name}), e.g. a fine-tuned copy of its CLIP"
                ) from err
            raise ModelError(
                f"could not load weights {pretrained!r} for {name}: {err}. Without network "
                "access, put the weights in the hub cache (model.cache_dir) once, or pass a "
                "local checkpoint file as model.pretrained"
            ) from err
    model.requires_grad_(False).eval()
    return model, preprocess


def _architecture_mismatch(name: str, pretrained: str | None) -> str | None:
    """Where the local checkpoint ``pretrained`` disagrees with the tensors of ``name``: a
    missing or unexpected key, or a shape; None when it matches or cannot be read."""
    import open_clip
    from open_clip.factory import load_state_dict

    if pretrained is None or not Path(pretrained).is_file():
        return None
    try:
        state = load_state_dict(pretrained)
    except Exception:  # unreadable: the caller's message says so
        return None
    expected = {k: tuple(v.shape) for k, v in open_clip.create_model(name).state_dict().items()}
    for key, shape in expected.items():
        if key not in state:
            return f"it has no tensor {key!r}"
        if tuple(state[key].shape) != shape:
            return f"{key!r} is {list(state[key].shape)} there but {list(shape)} in {name}"
    extra = sorted(set(state) - set(expected))
    return f"it has tensors {name} lacks, e.g. {extra[0]!r}" if extra else None


class _StopForward(Exception):
    """Raised by the hook to end the forward pass once the hooked block has run."""

    def __init__(self, output: Tensor) -> None:
        super().__init__()
        self.output = output


class ActivationSource(nn.Module):
    """Residual-stream activations of block ``layer`` of a frozen open_clip ViT.

    A forward hook on the block raises as soon as the block has run, so the blocks after it (and
    the head) never execute. ``tokens`` picks ``all`` (CLS + patches), ``cls`` (each image's own
    CLS token) or ``patches``.
    """

    visual: Any  # open_clip's VisionTransformer: its attributes are not typed
    block: nn.Module
    width: int
    n_patches: int

    def __init__(self, visual: nn.Module, layer: int, tokens: str = "all") -> None:
        super().__init__()
        self.visual = visual
        blocks: Any = self.visual.transformer.resblocks
        depth = len(blocks)
        if not -depth <= layer < depth:
            raise ModelError(
                f"layer {layer} is out of range ({depth} blocks); use {-depth}..{depth - 1}"
            )
        if tokens not in TOKEN_SELECTIONS:
            raise ModelError(f"tokens {tokens!r}: use one of {', '.join(TOKEN_SELECTIONS)}")
        self.layer, self.tokens = layer % depth, tokens
        self.block = blocks[self.layer]
        grid = self.visual.grid_size
        self.n_patches = int(grid[0] * grid[1])
        self.width = int(self.visual.transformer.width)
        self.image_size = self.visual.image_size

    @property
    def tokens_per_image(self) -> int:
        return {"all": self.n_patches + 1, "cls": 1, "patches": self.n_patches}[self.tokens]

    def _raise_output(self, module: nn.Module, args: Any, output: Tensor) -> None:
        raise _StopForward(output)

    @torch.no_grad()
    def block_output(self, pixels_B3HW: Tensor) -> Tensor:
        """``[B, T, D]`` residual stream after the hooked block, all tokens."""
        handle = self.block.register_forward_hook(self._raise_output)
        try:
            self.visual(pixels_B3HW)
        except _StopForward as stop:
            out = stop.output
        else:  # pragma: no cover - the hook always fires
            raise RuntimeError("the hooked block did not run")
        finally:
            handle.remove()
        if out.shape[0] != pixels_B3HW.shape[0]:  # sequence-first transformers
            out = out.transpose(0, 1)
        return out

    @torch.no_grad()
    def all_tokens(self, pixels_B3HW: Tensor) -> Tensor:
        """``[B, T, D]`` float32 block output, every token, on the model's device (bf16
        autocast on CUDA)."""
        device = next(self.visual.parameters()).device
        pixels_B3HW = pixels_B3HW.to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return self.block_output(pixels_B3HW).float()

    @torch.no_grad()
    def forward(self, pixels_B3HW: Tensor) -> Tensor:
        """Selected tokens, flattened to ``[B * T_sel, D]`` in float32."""
        acts_BTD = self.all_tokens(pixels_B3HW)
        if self.tokens == "cls":
            acts_BTD = acts_BTD[:, :1]
        elif self.tokens == "patches":
            acts_BTD = acts_BTD[:, 1:]
        return acts_BTD.reshape(-1, acts_BTD.shape[-1])
