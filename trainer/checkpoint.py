"""Checkpoints and the exported SAE, written atomically.

Layout of a run directory::

    sae.safetensors, cfg.json        final export (W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D])
    checkpoints/step_00000100/       one resumable checkpoint
        sae.safetensors, cfg.json    the export at that step
        state.pt                     model, optimiser, schedule, step, latent counters, RNG
        stream_rank{r}.pt            each rank's data position and token-mixer buffer
    checkpoints/latest               name of the newest complete checkpoint

A checkpoint is assembled in ``step_X.tmp`` and renamed into place, so a crash leaves either the
old checkpoint or the new one, never a half-written one. Everything is loaded with
``weights_only=True`` or safetensors: no pickle.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


class CheckpointError(FileNotFoundError):
    """No usable checkpoint; the message says where it looked and what to do."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)``, fsync, then rename onto ``path``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_export(directory: Path, tensors: dict[str, Tensor], cfg_json: dict[str, Any]) -> None:
    """``sae.safetensors`` + ``cfg.json`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / "sae.safetensors", lambda p: save_file(tensors, str(p)))
    text = json.dumps(cfg_json, indent=2, sort_keys=True)
    atomic_write(directory / "cfg.json", lambda p: p.write_text(text))


def read_export(directory: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    return load_file(str(directory / "sae.safetensors")), json.loads(
        (directory / "cfg.json").read_text()
    )


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step_{step:08d}"


def begin(run_dir: Path, step: int) -> Path:
    """Rank 0: create an empty temp folder for the checkpoint of ``step``. Call a barrier
    before other ranks write into it."""
    tmp = step_dir(run_dir, step).with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def save_stream(tmp: Path, rank: int, stream_state: dict[str, Any]) -> None:
    atomic_write(tmp / f"stream_rank{rank}.pt", lambda p: torch.save(stream_state, p))


def commit(
    tmp: Path,
    *,
    tensors: dict[str, Tensor],
    cfg_json: dict[str, Any],
    state: dict[str, Any],
    world_size: int,
    keep: int,
) -> Path:
    """Rank 0, after every rank has saved its stream: write the model state, rename the folder
    into place, point ``latest`` at it and delete older checkpoints beyond ``keep``."""
    missing = [r for r in range(world_size) if not (tmp / f"stream_rank{r}.pt").exists()]
    if missing:
        raise RuntimeError(f"checkpoint {tmp}: ranks {missing} did not save their data position")
    write_export(tmp, tensors, cfg_json)
    atomic_write(tmp / "state.pt", lambda p: torch.save(state, p))
    final = tmp.with_suffix("")
    if final.exists():  # a re-run of the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    root = final.parent
    atomic_write(root / "latest", lambda p: p.write_text(final.name + "\n"))
    _fsync_dir(root)
    complete = sorted(p for p in root.glob("step_*") if p.is_dir() and p.suffix == "")
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint written: %s", final)
    return final


def newest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint ``folder`` is, or the newest one in its ``checkpoints/``; None if none."""
    if (folder / "state.pt").is_file():
        return folder
    root = folder / CHECKPOINTS
    latest = root / "latest"
    if latest.is_file():
        path = root / latest.read_text().strip()
        if (path / "state.pt").is_file():
            return path
    complete = sorted(p for p in root.glob("step_*") if (p / "state.pt").is_file())
    return complete[-1] if complete else None


def find_checkpoint(run_dir: Path, resume: str) -> Path:
    """``resume``: ``auto`` (the newest checkpoint of ``run_dir``), a checkpoint folder, or a run
    directory."""
    candidate = Path(resume) if resume != "auto" else run_dir
    found = newest_checkpoint(candidate)
    if found is None:
        raise CheckpointError(
            f"--resume {resume}: no checkpoint found in {candidate} (looked for state.pt and "
            f"{CHECKPOINTS}/latest); pass a run directory that has checkpoints, or start "
            "without --resume"
        )
    return found


def load_state(path: Path, rank: int, world_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, this rank's stream state)`` from a checkpoint folder."""
    streams = sorted(path.glob("stream_rank*.pt"))
    if len(streams) != world_size:
        raise CheckpointError(
            f"checkpoint {path} was written by {len(streams)} ranks but this job has "
            f"{world_size}; resume with the same number of ranks"
        )
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    stream = torch.load(path / f"stream_rank{rank}.pt", map_location="cpu", weights_only=True)
    return state, stream
