"""Activation cache: CLIP activations written to disk once, read by any number of SAE runs.

A cache folder (written by ``patchsae cache``, :mod:`patchsae.data.cache_writer`)::

    cache.json               what the activations are (model, weights digest, layer, tokens,
                             dtype, width, tokens per image) and the list of its shards;
                             written last, so a folder without it is unfinished
    r000-000000.npy          [images * T, D] activations of whole images (T tokens each)
    r000-000000.json         those images' keys, source shards and labels, in the same order

Any ``[N, D]`` float array in a ``.npy`` or ``.safetensors`` file is a source as well (one
shard without metadata, read in blocks of :data:`ARRAY_BLOCK_ROWS` rows). Every shard is
memory-mapped; only the rows a batch takes are read.

:class:`CachedStream` serves a run's tokens from a cache with the interface of
``data.stream.TokenStream``. An epoch visits every unit (an image of a cache, a block of an
array) exactly once over all ranks: the shard order and the unit order within each shard are
shuffled per epoch (seeded), and the sequence is cut into one contiguous, equal share per
rank. Its position is (epoch, units served) plus the mixer's state, so resume is exact.

With ``read_ahead`` > 0 a background thread reads that many reads ahead of the mixer (into
pinned memory when the run is on a GPU), so a fast SAE step does not wait on the disk: the
stream's position still counts only the reads the mixer took, and what the thread had read
beyond it is dropped on resume. Rows travel to the device and into the mixer in the cache's
dtype; the mixer serves them as float32.

Shape legend: N tokens, D model width, T tokens per image.
"""

from __future__ import annotations

import hashlib
import json
import queue
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from patchsae.data.mixer import TokenMixer
from torch import Tensor

FORMAT = "patchsae-activation-cache"
VERSION = 1
META = "cache.json"
ARRAY_BLOCK_ROWS = 256
"""Rows per unit of a bare array: consecutive rows (often of one image) stay together and the
mixer mixes them with the rows of many other units."""
DTYPES: dict[str, tuple[Any, torch.dtype]] = {
    "float32": (np.float32, torch.float32),
    "float16": (np.float16, torch.float16),
    "bfloat16": (np.uint16, torch.bfloat16),  # numpy has no bf16: stored as its bits
}
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_SHARD_ORDER, _UNIT_ORDER = 11, 12


class CacheError(ValueError):
    """The cache cannot be used as asked; the message names the problem and the fix."""


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (the CLIP weights a cache was written with)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def identity(
    name: str, pretrained: str | None, layer: int, tokens: str, init_seed: int
) -> dict[str, Any]:
    """What the activations depend on: the model, its weights (a local file by content; the
    seed of random weights), the hooked block (non-negative index) and the token selection."""
    local = pretrained if pretrained is not None and Path(pretrained).is_file() else None
    return {
        "model": name,
        "pretrained": pretrained,
        "pretrained_sha256": file_digest(local) if local else None,
        "init_seed": init_seed if pretrained is None else None,
        "layer": layer,
        "tokens": tokens,
    }


def fingerprint(meta: dict[str, Any]) -> str:
    """A hash of everything that makes two caches interchangeable."""
    keys = ("identity", "dtype", "width", "tokens_per_image")
    return hashlib.sha256(
        json.dumps({k: meta[k] for k in keys}, sort_keys=True).encode()
    ).hexdigest()


def differences(cached: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Where a cache's identity and a run's disagree, one phrase each (empty: they match).
    Weights compare by content where both sides know it, by name otherwise."""
    out = []
    for key in ("model", "layer", "tokens", "init_seed"):
        if cached[key] != wanted[key]:
            out.append(f"model.{key}: the cache has {cached[key]!r}, the config {wanted[key]!r}")
    a, b = cached.get("pretrained_sha256"), wanted.get("pretrained_sha256")
    if (a != b) if (a and b) else cached["pretrained"] != wanted["pretrained"]:
        how = " (different file contents)" if a and b else ""
        out.append(
            f"model.pretrained: the cache has {cached['pretrained']!r}, the config "
            f"{wanted['pretrained']!r}{how}"
        )
    return out


@dataclass
class Shard:
    """One memory-mapped ``[rows, D]`` array; ``unit_rows`` consecutive rows form a unit."""

    path: Path
    rows_ND: np.ndarray
    unit_rows: int

    @property
    def units(self) -> int:
        return -(-len(self.rows_ND) // self.unit_rows)

    def read(self, units: np.ndarray) -> np.ndarray:
        """The rows of ``units``, in that order (a unit's rows in file order)."""
        rows = (units[:, None] * self.unit_rows + np.arange(self.unit_rows)).ravel()
        if len(self.rows_ND) % self.unit_rows:
            rows = rows[rows < len(self.rows_ND)]  # the last unit is short
        return self.rows_ND[rows]


class ActivationCache:
    """An opened cache folder or array file: its shards and, for a cache, its metadata."""

    def __init__(self, path: Path, shards: list[Shard], dtype: str, meta: dict | None) -> None:
        self.path, self.shards, self.dtype, self.meta = path, shards, dtype, meta
        self.width = int(shards[0].rows_ND.shape[1])
        self.tokens_per_image = int(meta["tokens_per_image"]) if meta else 1
        self.tokens = sum(len(s.rows_ND) for s in shards)

    @classmethod
    def open(cls, path: str | Path) -> ActivationCache:
        path = Path(path)
        if path.is_dir():
            return cls._open_folder(path)
        if path.suffix == ".npy" and path.is_file():
            rows = _load_npy(path)
            return cls(path, [Shard(path, rows, ARRAY_BLOCK_ROWS)], str(rows.dtype), None)
        if path.suffix == ".safetensors" and path.is_file():
            rows, dtype = _map_safetensors(path)
            return cls(path, [Shard(path, rows, ARRAY_BLOCK_ROWS)], dtype, None)
        raise CacheError(
            f"data.cache {str(path)!r} is neither a cache folder (`patchsae cache` writes one) "
            "nor an existing .npy or .safetensors file of [N, D] activations"
        )

    @classmethod
    def _open_folder(cls, path: Path) -> ActivationCache:
        meta_path = path / META
        if not meta_path.is_file():
            raise CacheError(
                f"data.cache {str(path)!r} has no {META}: the cache is unfinished (rerun the "
                f"same `patchsae cache --out {path}` to complete it; it resumes) or not a cache"
            )
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CacheError(f"{meta_path} is unreadable ({err}); write the cache again") from err
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise CacheError(
                f"{meta_path} is not a version-{VERSION} {FORMAT} (format "
                f"{meta.get('format')!r}, version {meta.get('version')!r}); write it again"
            )
        np_dtype = DTYPES[meta["dtype"]][0]
        shards = []
        for entry in meta["shards"]:
            file = path / entry["file"]
            rows = _load_npy(file)
            expected = (entry["images"] * meta["tokens_per_image"], meta["width"])
            if rows.shape != expected or rows.dtype != np_dtype:
                raise CacheError(
                    f"{file} holds {rows.dtype}{list(rows.shape)} but {META} says "
                    f"{np.dtype(np_dtype)}{list(expected)}; the cache is damaged, write it again"
                )
            shards.append(Shard(file, rows, meta["tokens_per_image"]))
        if not shards:
            raise CacheError(f"{meta_path} lists no shards: the cached data held no image")
        return cls(path, shards, meta["dtype"], meta)

    def check(self, wanted: dict[str, Any]) -> None:
        """Refuse a cache written from another model, weights, layer or token selection than
        ``wanted`` (an :func:`identity`). Bare arrays carry no identity: nothing to check."""
        if self.meta is None:
            return
        found = differences(self.meta["identity"], wanted)
        if found:
            raise CacheError(
                f"data.cache {str(self.path)!r} was written from other activations than this "
                f"run's: {'; '.join(found)}. Set the model section to match the cache, or write "
                "a cache for this model with `patchsae cache`"
            )

    def to_float(self, rows_ND: np.ndarray) -> Tensor:
        return self.as_tensor(rows_ND).float()

    def as_tensor(self, rows_ND: np.ndarray) -> Tensor:
        """The rows as the mixer holds them: float32, float16 and bfloat16 as stored, without a
        copy (numpy has no bfloat16: those rows are stored as their 16-bit patterns and viewed
        back); a bare array of another dtype as float32."""
        tensor = torch.from_numpy(np.ascontiguousarray(rows_ND))
        if self.dtype == "bfloat16":
            return tensor.view(torch.bfloat16)
        return tensor if self.dtype in DTYPES else tensor.float()


def _load_npy(path: Path) -> np.ndarray:
    try:
        rows = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise CacheError(f"{path} is not a readable .npy array ({err})") from err
    if rows.ndim != 2 or rows.dtype.kind not in "fu" or len(rows) == 0:
        raise CacheError(
            f"{path} holds {rows.dtype}{list(rows.shape)}; an activation array must be a "
            "non-empty 2-D [N, D] float array"
        )
    return rows


def _map_safetensors(path: Path) -> tuple[np.ndarray, str]:
    """Memory-map the one 2-D tensor of a safetensors file (header: 8-byte length, JSON)."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if len(tensors) != 1:
        raise CacheError(
            f"{path} holds {len(tensors)} tensors ({', '.join(sorted(tensors)[:5])}); an "
            "activation file must hold exactly one [N, D] tensor"
        )
    ((name, info),) = tensors.items()
    dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None or len(info["shape"]) != 2 or info["shape"][0] == 0:
        raise CacheError(
            f"{path}: tensor {name!r} is {info['dtype']}{info['shape']}; it must be a non-empty "
            "2-D [N, D] tensor of F32, F16 or BF16"
        )
    begin, _ = info["data_offsets"]
    rows = np.memmap(
        path,
        dtype=DTYPES[dtype][0],
        mode="r",
        offset=8 + length + begin,
        shape=tuple(info["shape"]),
    )
    return rows, dtype


def top_up_reads(mix_tokens: int, rows_per_read: int) -> int:
    """Reads that cover one top-up of a mixer of ``mix_tokens`` (half its capacity), and one
    more: the read-ahead depth at which a top-up finds every read it needs ready."""
    return -(-mix_tokens // 2 // rows_per_read) + 1


class CachedStream:
    """Token batches from an :class:`ActivationCache`, in the interface of ``TokenStream``.

    ``units_per_read`` units (images, or blocks of an array) are read at a time and handed to
    the mixer. ``shuffle_shards``/``shuffle_units``: shuffle the shard order / the units within
    each shard every epoch (seeded by ``seed`` and the epoch); with neither, units come in the
    order they were written, which reproduces the shard reader's token order. ``read_ahead``:
    reads a background thread keeps ready (0: read when the mixer asks)."""

    def __init__(
        self,
        cache: ActivationCache,
        mixer: TokenMixer,
        *,
        units_per_read: int,
        shuffle_shards: bool,
        shuffle_units: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        read_ahead: int = 0,
    ) -> None:
        self.cache, self.mixer = cache, mixer
        self.units_per_read = units_per_read
        self.shuffle_shards, self.shuffle_units, self.seed = shuffle_shards, shuffle_units, seed
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        if sum(s.units for s in cache.shards) < world_size:
            raise CacheError(
                f"data.cache {str(cache.path)!r} has fewer units than the {world_size} ranks"
            )
        self.epoch, self.offset = 0, 0
        self.images_seen = 0
        self.skipped_total = 0  # a cache holds only images that decoded
        self.wait_s = 0.0
        self.read_ahead = read_ahead
        self._reader: _Reader | None = None

    @property
    def width(self) -> int:
        return self.cache.width

    @property
    def tokens_per_image(self) -> int:
        return self.cache.tokens_per_image

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's (shard index, unit index) sequence for ``epoch``."""
        shards = np.arange(len(self.cache.shards))
        if self.shuffle_shards:
            shards = np.random.default_rng([self.seed, epoch, _SHARD_ORDER]).permutation(shards)
        shard_ids, unit_ids = [], []
        for s in shards:
            units = np.arange(self.cache.shards[s].units)
            if self.shuffle_units:
                rng = np.random.default_rng([self.seed, epoch, int(s), _UNIT_ORDER])
                units = rng.permutation(units)
            shard_ids.append(np.full(len(units), s))
            unit_ids.append(units)
        all_shards, all_units = np.concatenate(shard_ids), np.concatenate(unit_ids)
        n = len(all_units)
        share = slice(n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size)
        return all_shards[share], all_units[share]

    def read_rows(self, shard_ids: np.ndarray, unit_ids: np.ndarray) -> np.ndarray:
        """``[N, D]`` rows of the given units as stored, in order (one read per run of a
        shard)."""
        parts, start = [], 0
        while start < len(shard_ids):
            stop = start + 1
            while stop < len(shard_ids) and shard_ids[stop] == shard_ids[start]:
                stop += 1
            parts.append(self.cache.shards[shard_ids[start]].read(unit_ids[start:stop]))
            start = stop
        return np.concatenate(parts)

    def read_units(self, shard_ids: np.ndarray, unit_ids: np.ndarray) -> Tensor:
        """``[N, D]`` float32 rows of the given units, in order."""
        return self.cache.to_float(self.read_rows(shard_ids, unit_ids))

    def _produce(self) -> Tensor:
        if self._reader is None:
            self._reader = _Reader(self, self.epoch, self.offset)
        stored_ND, self.epoch, self.offset = self._reader.next()
        self.images_seen += len(stored_ND) // self.tokens_per_image
        return stored_ND.to(self.device, non_blocking=True)  # the mixer serves float32

    def next_batch(self, n: int) -> Tensor:
        """``[n, D]`` float32 tokens on ``device``."""
        start = time.perf_counter()
        tokens = self.mixer.next_batch(n, self._produce)
        self.wait_s += time.perf_counter() - start
        return tokens

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "images_seen": self.images_seen,
            "mixer": self.mixer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "offset" not in state:
            raise CacheError(
                "the checkpoint's data position is from the shard reader, not from a cache; "
                "resume with the data.source it was trained with"
            )
        self.epoch, self.offset = state["epoch"], state["offset"]
        self.images_seen = state["images_seen"]
        self.close()  # what was read ahead of the old position is dropped
        self.mixer.load_state_dict(state["mixer"], device=self.device)


class _Reader:
    """A stream's reads from a position on: each is (rows as stored, the position after it).
    With the stream's ``read_ahead`` > 0 a daemon thread reads them into a queue that deep,
    and an error in the thread is raised by the :meth:`next` that would have returned its
    read."""

    def __init__(self, stream: CachedStream, epoch: int, offset: int) -> None:
        self.stream, self.epoch, self.offset = stream, epoch, offset
        self._order = stream.epoch_order(epoch)
        self._pin = stream.device.type == "cuda"
        self._stop = threading.Event()
        self._queue: queue.Queue[tuple[Tensor, int, int] | BaseException] | None = None
        self._thread: threading.Thread | None = None
        if stream.read_ahead > 0:
            self._queue = queue.Queue(maxsize=stream.read_ahead)
            self._thread = threading.Thread(target=self._run, name="cache-reader", daemon=True)
            self._thread.start()

    def _read(self) -> tuple[Tensor, int, int]:
        shard_ids, unit_ids = self._order
        if self.offset >= len(unit_ids):
            self.epoch, self.offset = self.epoch + 1, 0
            self._order = shard_ids, unit_ids = self.stream.epoch_order(self.epoch)
        take = slice(self.offset, self.offset + self.stream.units_per_read)
        self.offset += len(unit_ids[take])
        stored_ND = self.stream.cache.as_tensor(
            self.stream.read_rows(shard_ids[take], unit_ids[take])
        )
        if self._pin:
            stored_ND = stored_ND.pin_memory()
        return stored_ND, self.epoch, self.offset

    def _run(self) -> None:
        assert self._queue is not None
        item: tuple[Tensor, int, int] | BaseException
        while not self._stop.is_set():
            try:
                item = self._read()
            except BaseException as err:  # handed to the consumer, which raises it
                item = err
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def next(self) -> tuple[Tensor, int, int]:
        if self._queue is None:
            return self._read()
        assert self._thread is not None
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise CacheError("the cache reader thread stopped without a result") from None
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
