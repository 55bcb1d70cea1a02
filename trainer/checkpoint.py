"""Checkpoints and the exported SAE, written atomically.

Layout of a run directory::

    sae.safetensors, cfg.json        final export (W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D])
    sae_weights.safetensors          the same file (a hard link), under the name SAELens loads
    checkpoints/step_00000100/       one resumable checkpoint
        sae.safetensors, cfg.json    the export at that step
        state.pt                     model, optimiser, schedule, step, latent counters, RNG
        stream_rank{r}.pt            each rank's data position and token-mixer buffer
        zero/                        DeepSpeed's partitions (ZeRO runs), one file set per rank
        manifest.json                size and SHA-256 of every other file, written last
    checkpoints/latest               name of the newest complete checkpoint

A checkpoint is assembled in ``step_X.tmp`` and renamed into place, so a crash leaves either the
old checkpoint or the new one, never a half-written one. ``--resume`` checks every file against
the manifest first, so a checkpoint damaged later (a flipped byte, a truncated shard) is reported
and skipped instead of trained on. Everything is loaded with ``weights_only=True`` or
safetensors: no pickle.

A write that fails for lack of space raises ``DiskFullError`` naming what was being written and
where; the partial file is removed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from patchsae.trainer import saelens
from patchsae.trainer.config import ConfigError, DistributedConfig
from safetensors.torch import load_file, save_file
from torch import Tensor

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"


class CheckpointError(FileNotFoundError):
    """No usable checkpoint; the message says where it looked and what to do."""


class DiskFullError(OSError):
    """A write failed for lack of space; the message names what, where and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = errno.ENOSPC


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "database or disk is full")
"""How libraries that wrap the OS error say it: safetensors, torch, SQLite (MLflow's store)."""


def exception_chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and the errors it was raised from (``__cause__``, or ``__context__`` for a
    ``raise`` inside ``except``), each once."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def is_disk_full(err: BaseException, folder: Path | None = None) -> bool:
    """Whether ``err`` (or an error it was raised from) is "no space left" or "quota exceeded".

    safetensors turns the OS error into its own exception type with the OS message in the text,
    and torch's zip writer (which DeepSpeed's checkpoints use) into a bare "unexpected pos", so
    the errno, the text and, given ``folder``, a filesystem with less than 1 MiB free count."""
    if folder is not None:
        try:
            if shutil.disk_usage(folder).free < 2**20:
                return True
        except OSError:
            pass
    for e in exception_chain(err):
        if isinstance(e, DiskFullError) or (isinstance(e, OSError) and e.errno in _FULL_ERRNOS):
            return True
        if any(text in str(e) for text in _FULL_TEXTS):
            return True
    return False


def disk_full_error(what: str, path: Path) -> DiskFullError:
    try:
        free = (
            f"{shutil.disk_usage(path.parent if not path.is_dir() else path).free / 2**20:.1f} MiB"
        )
    except OSError:
        free = "unknown"
    return DiskFullError(
        f"no space left on device while writing {what} to {path} ({free} free there); free "
        "some space or point train.out_dir at a larger filesystem, then continue with --resume "
        "(the last complete checkpoint is intact)",
    )


def torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file, so that a full disk surfaces as ``OSError``."""
    with open(path, "wb") as fh:
        torch.save(obj, fh)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], Any], what: str | None = None) -> None:
    """Call ``write(tmp_path)``, fsync, then rename onto ``path``. A full disk raises
    ``DiskFullError`` naming ``what`` (default: the file name) and ``path``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except Exception as err:
        if is_disk_full(err) and not isinstance(err, DiskFullError):
            raise disk_full_error(what or path.name, path) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


class NonFiniteStateError(RuntimeError):
    """Weights or optimiser state that are not finite were about to be written."""


def _float_tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    if isinstance(tree, Tensor):
        if tree.is_floating_point():
            yield prefix, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _float_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _float_tensors(value, f"{prefix}[{i}]")


def check_finite(tree: Any, what: str) -> None:
    """Refuse to write non-finite weights or optimiser state (tensors anywhere in ``tree``): a
    NaN checkpoint or export is worse than none."""
    bad = [name for name, t in _float_tensors(tree) if not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteStateError(
            f"refusing to write {what}: {', '.join(bad[:8])} hold non-finite values; the "
            "last checkpoint written is the last good state (lower train.lr and --resume it)"
        )


def write_export(directory: Path, tensors: dict[str, Tensor], cfg_json: dict[str, Any]) -> None:
    """``sae.safetensors`` + ``cfg.json`` in ``directory`` (refused if a weight is not finite)."""
    check_finite(tensors, f"the SAE export in {directory}")
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / "sae.safetensors", lambda p: save_file(tensors, str(p)))
    cfg_json = saelens.add_saelens_files(directory, tensors, cfg_json)  # SAELens loads it too
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
    atomic_write(tmp / f"stream_rank{rank}.pt", lambda p: torch_save(stream_state, p))


def save_state(
    tmp: Path, *, tensors: dict[str, Tensor], cfg_json: dict[str, Any], state: dict[str, Any]
) -> None:
    """Rank 0: the export and ``state.pt`` of the checkpoint being assembled in ``tmp``."""
    check_finite(state, f"checkpoint {tmp.with_suffix('').name}")
    write_export(tmp, tensors, cfg_json)
    atomic_write(tmp / "state.pt", lambda p: torch_save(state, p))


# -- integrity ------------------------------------------------------------------------------


def _files(folder: Path) -> list[str]:
    """Every file of a checkpoint folder but the manifest, as sorted relative paths."""
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def digest_files(folder: Path, rank: int = 0, world_size: int = 1) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of this rank's share (every ``world_size``-th) of ``folder``'s files,
    so that the ranks of a large ZeRO checkpoint hash it together."""
    return {
        name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
        for name in _files(folder)[rank::world_size]
    }


def write_manifest(folder: Path, digests: dict[str, dict[str, Any]]) -> None:
    text = json.dumps({"files": dict(sorted(digests.items()))}, indent=1)
    atomic_write(folder / MANIFEST, lambda p: p.write_text(text), "the checkpoint manifest")


def verify(folder: Path, rank: int = 0, world_size: int = 1) -> list[str]:
    """Problems with this rank's share of the files the manifest of ``folder`` lists (missing,
    wrong size, wrong checksum); the whole list when the manifest itself is missing or broken.
    An empty list: that share is intact."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        reason = "missing" if isinstance(err, FileNotFoundError) else f"unreadable ({err})"
        return [f"{MANIFEST} is {reason}, so the checkpoint is incomplete"]
    problems = []
    for name in sorted(files)[rank::world_size]:
        want, path = files[name], folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != want["bytes"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, the manifest {want['bytes']}")
        elif _sha256(path) != want["sha256"]:
            problems.append(f"{name} does not match its checksum (the file is corrupt)")
    return problems


def commit(tmp: Path, *, keep: int | None) -> Path:
    """Rank 0, once every file and the manifest are in ``tmp``: rename the folder into place,
    point ``latest`` at it and delete older checkpoints beyond ``keep`` (None: keep all)."""
    final = tmp.with_suffix("")
    if final.exists():  # a re-run of the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    root = final.parent
    atomic_write(root / "latest", lambda p: p.write_text(final.name + "\n"), "checkpoints/latest")
    _fsync_dir(root)
    if keep is not None:
        prune(root.parent, keep)
    log.info("checkpoint written: %s", final)
    return final


def prune(run_dir: Path, keep: int) -> None:
    """Delete the complete checkpoints of ``run_dir`` but the newest ``keep``."""
    complete = sorted(
        p for p in (run_dir / CHECKPOINTS).glob("step_*") if p.is_dir() and p.suffix == ""
    )
    for old in complete[: max(len(complete) - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)


def candidates(folder: Path) -> list[Path]:
    """Checkpoints to try for ``--resume``, best first: ``folder`` itself when it is one (no
    fallback: the user named it), else its complete ``step_*`` folders, newest first."""
    if (folder / "state.pt").is_file() or (folder / MANIFEST).is_file():
        return [folder]
    root = folder / CHECKPOINTS
    return sorted((p for p in root.glob("step_*") if p.is_dir() and p.suffix == ""), reverse=True)


def pick_verified(resume: str, folder: Path, verify_fn: Callable[[Path], list[str]]) -> Path:
    """The first of ``candidates(folder)`` that ``verify_fn`` finds intact; a warning names each
    one skipped and why. None intact: ``CheckpointError`` listing what was found."""
    found = candidates(folder)
    if not found:
        raise CheckpointError(
            f"--resume {resume}: no checkpoint found in {folder} (looked for state.pt and "
            f"{CHECKPOINTS}/step_*); pass a run directory that has checkpoints, or start "
            "without --resume"
        )
    rejected: list[str] = []
    for path in found:
        problems = verify_fn(path)
        if not problems:
            if rejected:
                log.warning("resuming from %s, the newest intact checkpoint", path.name)
            return path
        rejected.append(f"{path}: {'; '.join(problems)}")
        log.warning("checkpoint %s is damaged, not resuming from it: %s", path, "; ".join(problems))
    raise CheckpointError(
        f"--resume {resume}: no intact checkpoint in {folder}. Found: "
        + " | ".join(rejected)
        + ". Restore the files from a copy, or start a new run (without --resume, or in "
        "another train.out_dir)"
    )


def state_layout(strategy: str, zero_stage: int) -> str:
    """How a checkpoint holds the optimiser state: ``whole`` (one process, DDP: in
    ``state.pt``) or ``zero<stage>`` (partitioned by DeepSpeed over the ranks)."""
    return f"zero{zero_stage}" if strategy == "deepspeed" else "whole"


def check_layout(
    path: Path, was: DistributedConfig, now: DistributedConfig, world_size: int
) -> None:
    """The one check that checkpoint ``path``, written under the distributed config ``was``,
    can be loaded by this job (config ``now``, ``world_size`` ranks): the same state layout
    and the same number of ranks (each rank resumes its own data stream)."""
    if state_layout(was.strategy, was.zero_stage) != state_layout(now.strategy, now.zero_stage):
        raise ConfigError(
            f"--resume {path}: the checkpoint was written with distributed.strategy="
            f"{was.strategy} (zero_stage {was.zero_stage}) and this run uses "
            f"{now.strategy} (zero_stage {now.zero_stage}); resume with the same strategy "
            "and stage (ZeRO partitions the optimiser state differently), or start a new run"
        )
    streams = sorted(path.glob("stream_rank*.pt"))
    if len(streams) != world_size:
        raise CheckpointError(
            f"checkpoint {path} was written by {len(streams)} ranks but this job has "
            f"{world_size}; resume with the same number of ranks"
        )


def load_state(path: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, this rank's stream state)`` from a checkpoint folder that passed
    :func:`check_layout`."""
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    stream = torch.load(path / f"stream_rank{rank}.pt", map_location="cpu", weights_only=True)
    return state, stream
