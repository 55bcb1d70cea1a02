"""A trained SAE run, loaded for analysis: the export, its config and the CLIP it was trained on."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from patchsae.data.activations import ActivationSource, ModelError, load_clip
from patchsae.trainer.config import ModelConfig, config_from_dict
from torch import Tensor


class AnalysisError(ValueError):
    """Bad input to an analysis; the message names the problem and the fix."""


@dataclass
class TrainedSAE:
    run_dir: Path
    tensors: dict[str, Tensor]
    cfg_json: dict[str, Any]
    model: ModelConfig

    def __post_init__(self) -> None:
        # A topk SAE's k is in cfg.json, not in the weights; analysis.stats.encode reads it here.
        sae = self.cfg_json.get("config", {}).get("sae", {})
        if sae.get("architecture") == "topk" and "k" not in self.tensors:
            self.tensors = {**self.tensors, "k": torch.tensor(int(sae["k"]))}

    @property
    def n_latents(self) -> int:
        return self.tensors["W_enc"].shape[1]

    @property
    def d_in(self) -> int:
        return self.tensors["W_enc"].shape[0]

    @property
    def mlflow_run_id(self) -> str | None:
        return self.cfg_json.get("mlflow_run_id")

    def to(self, device: torch.device) -> TrainedSAE:
        tensors = {k: v.to(device) for k, v in self.tensors.items()}
        return replace(self, tensors=tensors)

    def check_latents(self, latents: list[int]) -> None:
        bad = [j for j in latents if not 0 <= j < self.n_latents]
        if bad:
            raise AnalysisError(
                f"latent {bad[0]} is out of range: the SAE in {self.run_dir} has "
                f"{self.n_latents} latents; use 0..{self.n_latents - 1}"
            )


def load_trained(run_dir: str | Path) -> TrainedSAE:
    """The exported SAE of a run folder (or of one of its checkpoint folders)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    weights, cfg_path = run_dir / "sae.safetensors", run_dir / "cfg.json"
    if not run_dir.is_dir():
        raise AnalysisError(f"{run_dir} is not a folder; pass a run folder (train.out_dir)")
    if not weights.is_file() or not cfg_path.is_file():
        newest = sorted((run_dir / "checkpoints").glob("step_*[0-9]"))
        hint = (
            f"analyze a checkpoint instead ({newest[-1]}), or let the training finish"
            if newest
            else "train it to the end first (`patchsae train`), or pass the run folder that "
            "holds them"
        )
        raise AnalysisError(
            f"{run_dir} has no exported SAE (sae.safetensors + cfg.json, written when a run "
            f"ends); {hint}"
        )
    try:
        tensors = load_file(str(weights))
        cfg_json = json.loads(cfg_path.read_text())
        model = config_from_dict(cfg_json["config"]).model
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise AnalysisError(
            f"the export in {run_dir} is unreadable ({type(err).__name__}: {err}); re-export it "
            "from a verified checkpoint (`patchsae train --resume ...`)"
        ) from err
    missing = {"W_enc", "b_enc", "W_dec", "b_dec"} - set(tensors)
    if missing:
        raise AnalysisError(f"{weights} lacks {sorted(missing)}; it is not a patchsae export")
    return TrainedSAE(run_dir, tensors, cfg_json, model)


def load_sae_clip(sae: TrainedSAE, pretrained: str | None = None) -> tuple[Any, Any]:
    """The SAE's whole open_clip model (or the same architecture with ``pretrained`` weights)
    and its preprocessing."""
    model = sae.model
    weights = pretrained if pretrained is not None else model.pretrained
    try:
        return load_clip(model.name, weights, cache_dir=model.cache_dir, init_seed=model.init_seed)
    except ModelError as err:
        raise AnalysisError(f"cannot load the SAE's CLIP: {err}") from err


def activation_source(
    sae: TrainedSAE,
    *,
    pretrained: str | None = None,
    device: torch.device,
    clip: tuple[Any, Any] | None = None,
) -> tuple[ActivationSource, Any]:
    """The SAE's CLIP (or the same architecture with ``pretrained`` weights, or the already
    loaded ``clip = (model, preprocess)``), hooked at the SAE's layer with every token
    selected; returns ``(source, preprocess)``."""
    model = sae.model
    weights = pretrained if pretrained is not None else model.pretrained
    clip_model, preprocess = clip if clip is not None else load_sae_clip(sae, pretrained)
    source = ActivationSource(clip_model.visual, model.layer, tokens="all").to(device)
    if source.width != sae.d_in:
        raise AnalysisError(
            f"the SAE in {sae.run_dir} reads {sae.d_in}-wide activations but {model.name} with "
            f"weights {weights!r} has width {source.width} at layer {model.layer}; analyze with "
            "the model the SAE was trained on"
        )
    return source, preprocess


def select_tokens(acts_BTD: Tensor, tokens: str) -> Tensor:
    """``all`` (CLS + patches), ``patches`` or ``cls`` of a ``[B, T, D]`` block output."""
    if tokens == "patches":
        return acts_BTD[:, 1:]
    if tokens == "cls":
        return acts_BTD[:, :1]
    return acts_BTD


def read_class_names(path: str | Path | None, urls: list[str]) -> list[str] | None:
    """Class names (index = label) from ``path``, a JSON list or a text file of one name per
    line; by default the ``classes.json`` beside the first local shard, else None."""
    if path is None and urls and "://" not in urls[0]:
        candidate = Path(urls[0]).parent / "classes.json"
        path = candidate if candidate.is_file() else None
    if path is None:
        return None
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise AnalysisError(f"{path}: cannot read the class names ({err})") from err
    if path.suffix != ".json":
        names = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        try:
            names = json.loads(text)
        except ValueError as err:
            raise AnalysisError(f"{path}: not a JSON list of class names ({err})") from err
    if not isinstance(names, list) or not names:
        raise AnalysisError(f"{path}: expected a non-empty list of class names (index = label)")
    return [str(n) for n in names]
