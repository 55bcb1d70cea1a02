"""Make an export folder loadable by SAELens (``sae_lens.SAE.load_from_disk``, tested with 6.54).

SAELens reads ``cfg.json`` and ``sae_weights.safetensors``. Its ``standard`` architecture is our
SAE: ``f = relu((x - b_dec) @ W_enc + b_enc)``, ``x_hat = f @ W_dec + b_dec``, with the same tensor
names and shapes (``W_enc [D, F]``, ``b_enc [F]``, ``W_dec [F, D]``, ``b_dec [D]``). So the
weights file is a hard link to ``sae.safetensors``, and SAELens's fields sit beside ours in the
one ``cfg.json``: it keeps only the dataclass fields it knows and ignores the rest. The other
architectures map to SAELens's ``topk`` (with ``k``) and ``jumprelu`` (``threshold [F]``;
batchtopk is exported in that inference form).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from torch import Tensor, float32

WEIGHTS = "sae_weights.safetensors"
# The cfg.json format these fields follow. SAELens takes a config without a version (or older
# than 6.0) through a legacy path that ignores the nested ``metadata``.
FORMAT_VERSION = "6.54.12"
SAELENS_ARCHITECTURES = {
    "relu": "standard",
    "topk": "topk",
    "batchtopk": "jumprelu",
    "jumprelu": "jumprelu",
}


def saelens_fields(cfg_json: dict[str, Any]) -> dict[str, Any]:
    """The ``cfg.json`` fields SAELens reads, from our own (``Trainer.cfg_json``)."""
    sae = cfg_json.get("config", {}).get("sae", {})
    ours = sae.get("architecture", "relu")
    extra = {"k": sae["k"]} if ours == "topk" else {}
    return {
        "architecture": SAELENS_ARCHITECTURES[ours],
        **extra,
        "d_in": cfg_json["d_in"],
        "d_sae": cfg_json["n_latents"],
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        # The input scale used in training is folded into the exported weights.
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": cfg_json["model"],
            "hook_name": f"visual.transformer.resblocks.{cfg_json['layer']}",
            "sae_lens_version": FORMAT_VERSION,
            "sae_lens_training_version": None,  # trained by patchsae, not SAELens
        },
    }


def with_saelens_fields(cfg_json: dict[str, Any]) -> dict[str, Any]:
    """``cfg_json`` plus SAELens's fields. A key both define must agree: ``ValueError`` if not."""
    fields = saelens_fields(cfg_json)
    clash = [k for k in fields if k in cfg_json and cfg_json[k] != fields[k]]
    if clash:
        theirs = {k: fields[k] for k in clash}
        raise ValueError(
            f"cfg.json fields {clash} mean something else to SAELens, which needs {theirs}; "
            "rename them in Trainer.cfg_json"
        )
    return {**cfg_json, **fields}


def _check_tensors(tensors: dict[str, Tensor], d_in: int, d_sae: int, architecture: str) -> None:
    want = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if architecture == "jumprelu":
        want["threshold"] = (d_sae,)
    got = {k: tuple(t.shape) for k, t in tensors.items()}
    if got != want or any(t.dtype != float32 for t in tensors.values()):
        dtypes = sorted({str(t.dtype) for t in tensors.values()})
        raise ValueError(
            f"SAELens's {architecture} SAE needs float32 tensors {want}; the export has {got} "
            f"({', '.join(dtypes)}); export with SparseAutoencoder.export_tensors()"
        )


def link_weights(directory: Path) -> None:
    """``sae_weights.safetensors`` as a hard link to ``sae.safetensors`` (a copy where the
    filesystem has no hard links), put in place by rename so a reader never sees half a file."""
    src, dst = directory / "sae.safetensors", directory / WEIGHTS
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def add_saelens_files(
    directory: Path, tensors: dict[str, Tensor], cfg_json: dict[str, Any]
) -> dict[str, Any]:
    """After ``sae.safetensors`` is written in ``directory``: put SAELens's weights file beside it
    and return ``cfg_json`` with SAELens's fields, for the caller to write as ``cfg.json`` (last,
    so a folder whose cfg.json names SAELens already has its weights)."""
    merged = with_saelens_fields(cfg_json)
    _check_tensors(tensors, merged["d_in"], merged["d_sae"], merged["architecture"])
    link_weights(directory)
    return merged
