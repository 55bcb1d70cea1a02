"""``patchsae cache``: one pass of image shards through the hooked CLIP, written to a cache.

Each rank reads its share of the shards (``ImageShards`` splits them by rank and worker, in a
fixed order) and writes its own shards of the cache (``r{rank}-{n}.npy`` and ``.json``, about
``shard_images`` images each, whole images only). After every shard it records its progress
(the shards written, the reader's position) in ``.progress/rank{r}.json``, so an interrupted
pass, run again with the same command, continues after the last shard written. When every
rank has finished, rank 0 writes ``cache.json`` (see :mod:`patchsae.data.cache`) and removes
the progress folder: a cache is usable only once complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from patchsae.data.activations import ActivationSource, load_visual
from patchsae.data.cache import DTYPES, FORMAT, META, VERSION, CacheError, fingerprint, identity
from patchsae.data.shards import ImageShards, OrderedBatches, expand_urls
from patchsae.trainer.checkpoint import atomic_write
from patchsae.trainer.config import Config, DistributedConfig, check_model
from patchsae.trainer.distributed import Distributed
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)
PROGRESS = ".progress"


@dataclass(frozen=True)
class CacheOptions:
    out: str
    dtype: str = "float16"
    shard_images: int = 1024
    """Images per cache shard (a shard may hold one reader batch more)."""
    device: str = "auto"
    max_batches: int | None = None
    """Stop after this many batches per rank, progress saved (tests of resume)."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise CacheError(f"--dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.shard_images < 1:
            raise CacheError(f"--shard-images {self.shard_images}: must be >= 1")


class _RankPass:
    """One rank's share: read, run the CLIP, write shards, record progress."""

    def __init__(self, cfg: Config, options: CacheOptions, dist: Distributed, layer: int) -> None:
        self.options, self.dist = options, dist
        self.out = Path(options.out)
        self.urls = expand_urls(cfg.data.urls)
        visual, preprocess = load_visual(
            cfg.model.name,
            cfg.model.pretrained,
            cache_dir=cfg.model.cache_dir,
            init_seed=cfg.model.init_seed,
        )
        self.source = ActivationSource(visual.to(dist.device), layer, cfg.model.tokens)
        self.workers = cfg.data.num_workers
        self.shards = ImageShards(
            self.urls,
            preprocess,
            batch_size=cfg.data.images_per_batch,
            shuffle_shards=False,
            shuffle_buffer=0,
            seed=0,
            rank=dist.rank,
            world_size=dist.world_size,
        )
        self.meta: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "identity": identity(
                cfg.model.name, cfg.model.pretrained, layer, cfg.model.tokens, cfg.model.init_seed
            ),
            "dtype": options.dtype,
            "width": self.source.width,
            "tokens_per_image": self.source.tokens_per_image,
            "data": cfg.data.urls,
        }
        job = {
            "cache": fingerprint(self.meta),
            "urls": self.urls,
            "world_size": dist.world_size,
            "workers": self.workers,
            "images_per_batch": cfg.data.images_per_batch,
            "shard_images": options.shard_images,
        }
        self.job = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()
        self.progress_path = self.out / PROGRESS / f"rank{dist.rank}.json"
        self.written: list[dict[str, Any]] = []
        self.skipped = 0
        self.position: dict[str, Any] = {}
        self.done = False

    def restore(self) -> None:
        if not self.progress_path.is_file():
            return
        state = json.loads(self.progress_path.read_text())
        if state["job"] != self.job:
            raise CacheError(
                f"{self.out} holds an unfinished cache written with other settings (model, "
                "data, dtype, shard size, ranks or workers); rerun with those, or choose "
                "another --out (or delete the folder) to start afresh"
            )
        self.written, self.skipped = state["written"], state["skipped"]
        self.position, self.done = state["position"], state["done"]

    def _save_progress(self, skipped: int) -> None:
        state = {
            "job": self.job,
            "written": self.written,
            "skipped": skipped,
            "position": self.position,
            "done": self.done,
        }
        self.progress_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(
            self.progress_path, lambda p: p.write_text(json.dumps(state)), "the cache progress"
        )

    def run(self, progress: Any) -> bool:
        """Read and write this rank's share to the end; False if stopped by ``max_batches``."""
        if self.done:
            return True
        self.shards.set_position(
            0, skip=self.position.get("consumed"), finished=self.position.get("finished")
        )
        loader = DataLoader(self.shards, batch_size=None, num_workers=self.workers)
        workers = max(self.workers, 1)
        ordered = (
            OrderedBatches.from_position(loader, workers, self.position)
            if self.position
            else OrderedBatches(loader, workers)
        )
        rows: list[np.ndarray] = []
        index: dict[str, list] = {"keys": [], "urls": [], "labels": []}
        batches = 0
        try:
            for batch in ordered:
                if batch["keys"]:
                    rows.append(self._rows(batch["pixels"]))
                    index["keys"] += batch["keys"]
                    index["urls"] += batch["urls"]
                    index["labels"] += batch["labels"].tolist()
                    progress.update(len(batch["keys"]))
                batches += 1
                if len(index["keys"]) >= self.options.shard_images:
                    self._flush(rows, index, ordered)
                    rows, index = [], {"keys": [], "urls": [], "labels": []}
                if self.options.max_batches and batches >= self.options.max_batches:
                    return False
            self.done = True
            self._flush(rows, index, ordered)
        finally:
            ordered.close()
        self.skipped += ordered.skipped_total
        return True

    @torch.no_grad()
    def _rows(self, pixels: torch.Tensor) -> np.ndarray:
        tokens_ND = self.source(pixels).to(DTYPES[self.options.dtype][1]).cpu()
        if self.options.dtype == "bfloat16":
            tokens_ND = tokens_ND.view(torch.uint16)
        return tokens_ND.numpy()

    def _flush(self, rows: list[np.ndarray], index: dict, ordered: OrderedBatches) -> None:
        """Write one shard (if any image is buffered), then the progress that includes it."""
        if rows:
            name = f"r{self.dist.rank:03d}-{len(self.written):06d}"
            data = np.concatenate(rows)
            atomic_write(self.out / f"{name}.npy", lambda p: _save_npy(p, data), "a cache shard")
            atomic_write(
                self.out / f"{name}.json",
                lambda p: p.write_text(json.dumps(index)),
                "a cache shard's index",
            )
            self.written.append(
                {"file": f"{name}.npy", "index": f"{name}.json", "images": len(index["keys"])}
            )
        self.position = ordered.position()
        self._save_progress(self.skipped + ordered.skipped_total)


def _save_npy(path: Path, data: np.ndarray) -> None:
    with open(path, "wb") as fh:  # a file object: np.save would append .npy to a name
        np.save(fh, data)


def build_cache(cfg: Config, options: CacheOptions) -> Path | None:
    """Write (or finish) the cache of ``cfg``'s model and shards into ``options.out``; returns
    the folder on rank 0 once complete (None elsewhere, or when stopped by ``max_batches``)."""
    out = Path(options.out)
    layer = check_model(cfg.model)
    dist = Distributed.from_env(DistributedConfig(), options.device)
    if (out / META).is_file():
        raise CacheError(
            f"{out} already holds a complete cache; train from it with data.source=cache "
            f"data.cache={out}, or choose another --out to write a new one"
        )
    if out.is_dir() and any(out.iterdir()) and not (out / PROGRESS).is_dir():
        raise CacheError(
            f"--out {out} is a folder with other files and no unfinished cache; choose a new "
            "or empty folder"
        )
    dist.barrier()  # every rank has checked the folder before any writes into it
    (out / PROGRESS).mkdir(parents=True, exist_ok=True)  # marks the folder as unfinished
    share = _RankPass(cfg, options, dist, layer)
    share.restore()
    if share.written:
        log.info("resuming the cache in %s (%d shards written)", out, len(share.written))
    progress = dist.progress("cache", initial=sum(w["images"] for w in share.written))
    try:
        finished = share.run(progress)
    finally:
        progress.close()
    stopped = dist.all_reduce_sum(torch.tensor([0 if finished else 1]))
    if int(stopped):
        return None
    parts = dist.all_gather_object({"written": share.written, "skipped": share.skipped})
    if dist.is_main:
        _write_meta(out, share.meta, parts, dist.world_size)
    dist.barrier()
    return out if dist.is_main else None


def _write_meta(out: Path, meta: dict, parts: list[dict], world_size: int) -> None:
    shards = [entry for part in parts for entry in part["written"]]
    images = sum(entry["images"] for entry in shards)
    if images == 0:
        raise CacheError(f"no readable image in {meta['data']}; check data.urls")
    meta = meta | {
        "fingerprint": fingerprint(meta),
        "images": images,
        "token_count": images * meta["tokens_per_image"],
        "skipped": sum(part["skipped"] for part in parts),
        "world_size": world_size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "shards": shards,
    }
    atomic_write(out / META, lambda p: p.write_text(json.dumps(meta, indent=1)), "the cache")
    shutil.rmtree(out / PROGRESS, ignore_errors=True)
    log.info("cache of %d images (%d tokens) written to %s", images, meta["token_count"], out)
