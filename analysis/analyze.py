"""``patchsae analyze``: one streaming pass of image shards through the CLIP and the SAE.

Each rank reads its share of the shards (``ImageShards`` splits them by rank and worker), keeps
only sums, counts and top-K buffers (``stats.LatentStatistics``), and saves them with its read
position every ``save_every`` batches, so an interrupted pass resumes where it stopped. At the
end the ranks' statistics are reduced (sums added, top-K merged) and rank 0 writes the results
into ``out`` in one rename: a folder is either complete or absent.

The files it writes are described, written and read back in :mod:`patchsae.analysis.outputs`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from patchsae.analysis.model import (
    AnalysisError,
    TrainedSAE,
    activation_source,
    load_trained,
    read_class_names,
    select_tokens,
)
from patchsae.analysis.outputs import log_to_mlflow, write_results
from patchsae.analysis.stats import LatentStatistics, encode, image_id, merge_top
from patchsae.data.shards import ImageShards, OrderedBatches, expand_urls
from patchsae.trainer.checkpoint import atomic_write, torch_save
from patchsae.trainer.config import DistributedConfig
from patchsae.trainer.distributed import Distributed
from torch import Tensor
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)

PARTIAL = ".partial"
"""Per-rank resumable state of an unfinished pass, inside ``out``'s parent."""


@dataclass(frozen=True)
class AnalyzeOptions:
    data: str
    out: str | None = None
    k: int = 10
    tau: float = 0.2
    aggregate: str = "mean"
    image_tokens: str | None = None
    """Tokens that make the image-level activation and the counts; None: the SAE's own
    ``model.tokens`` (``all`` = CLS + patches, the paper's choice)."""
    pretrained: str | None = None
    batch_images: int = 64
    workers: int = 2
    save_every: int = 200
    """Batches between saves of the resumable state (each rank)."""
    device: str = "auto"
    classes: str | None = None
    """A ``classes.json`` (list of names, index = label); default: the one beside the shards."""
    mlflow: bool = True
    max_batches: int | None = None
    """Stop after this many batches per rank without writing results (tests of resume)."""


def _fingerprint(options: AnalyzeOptions, sae: TrainedSAE, urls: list[str], world: int) -> str:
    """What must match for saved partial state to be resumed."""
    keys = ("k", "tau", "aggregate", "image_tokens", "pretrained", "batch_images", "workers")
    identity = {key: getattr(options, key) for key in keys}
    identity |= {"urls": urls, "world_size": world, "sae_step": sae.cfg_json.get("step")}
    identity["sae_digest"] = hashlib.sha256(
        sae.tensors["W_enc"].cpu().numpy().tobytes()[: 1 << 20]
    ).hexdigest()
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _class_names(options: AnalyzeOptions, urls: list[str]) -> list[str] | None:
    return read_class_names(options.classes, urls)


class _Pass:
    """One rank's share of the pass: the reader, the accumulator and the resumable state."""

    def __init__(
        self,
        options: AnalyzeOptions,
        sae: TrainedSAE,
        urls: list[str],
        dist: Distributed,
        partial: Path,
    ) -> None:
        self.options, self.sae, self.urls, self.dist = options, sae, urls, dist
        self.url_index = {url: i for i, url in enumerate(urls)}
        self.device = dist.device
        self.source, preprocess = activation_source(
            sae, pretrained=options.pretrained, device=self.device
        )
        self.tensors = sae.to(self.device).tensors
        self.tokens = options.image_tokens or sae.model.tokens
        self.shards = ImageShards(
            urls,
            preprocess,
            batch_size=options.batch_images,
            shuffle_shards=False,
            shuffle_buffer=0,
            seed=0,
            rank=dist.rank,
            world_size=dist.world_size,
        )
        self.stats = LatentStatistics(
            sae.n_latents,
            k=options.k,
            tau=options.tau,
            aggregate=options.aggregate,
            device=self.device,
        )
        self.positions = [0] * len(urls)  # images decoded so far per shard: the next image id
        self.refs: dict[int, tuple[str, int, int]] = {}  # image id -> (key, shard index, label)
        self.skipped = 0
        self.batches = 0
        self.digests: list[int] = []  # image_digest of every image read, for disjoint checks
        self.position: dict[str, Any] | None = None
        self.partial = partial
        self.state_path = partial / f"rank{dist.rank}.pt"
        self.fingerprint = _fingerprint(options, sae, urls, dist.world_size)

    # -- resumable state ---------------------------------------------------------------------
    def restore(self) -> bool:
        if not self.state_path.is_file():
            return False
        try:
            state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        except Exception as err:  # a torn or corrupt file: start over, say so
            log.warning("ignoring unreadable partial state %s (%s)", self.state_path, err)
            return False
        if state.get("fingerprint") != self.fingerprint:
            log.warning(
                "partial state in %s is from another SAE, dataset or settings; starting over",
                self.partial,
            )
            return False
        self.stats = LatentStatistics.from_state_dict(state["stats"], device=self.device)
        self.positions = list(state["positions"])
        self.refs = {int(i): (k, int(s), int(label)) for i, (k, s, label) in state["refs"].items()}
        self.skipped, self.batches = state["skipped"], state["batches"]
        self.digests = state["digests"].tolist()
        self.position = state["position"]
        return True

    def save(self, ordered: OrderedBatches) -> None:
        self._prune_refs()
        state = {
            "fingerprint": self.fingerprint,
            "stats": self.stats.state_dict(),
            "positions": self.positions,
            "refs": {int(i): list(v) for i, v in self.refs.items()},
            "skipped": self.skipped + ordered.skipped_total,
            "batches": self.batches,
            "digests": torch.tensor(self.digests, dtype=torch.int64),
            "position": ordered.position(),
        }
        self.partial.mkdir(parents=True, exist_ok=True)
        atomic_write(self.state_path, lambda p: torch_save(state, p), "the analysis state")

    def _prune_refs(self) -> None:
        keep = set(self.stats.top_ids_KF.unique().tolist())
        self.refs = {i: v for i, v in self.refs.items() if i in keep}

    # -- the pass ------------------------------------------------------------------------------
    def run(self, progress: Any) -> bool:
        """Read this rank's shards to the end; False if stopped early by ``max_batches``."""
        position = self.position or {}
        self.shards.set_position(
            0, skip=position.get("consumed"), finished=position.get("finished")
        )
        loader = DataLoader(
            self.shards, batch_size=None, num_workers=self.options.workers, pin_memory=False
        )
        workers = max(self.options.workers, 1)
        ordered = (
            OrderedBatches.from_position(loader, workers, position)
            if position
            else OrderedBatches(loader, workers)
        )
        try:
            for batch in ordered:
                self._add(batch)
                self.batches += 1
                progress.update(len(batch["keys"]))
                if self.batches % self.options.save_every == 0:
                    self.save(ordered)
                if self.options.max_batches and self.batches >= self.options.max_batches:
                    self.save(ordered)
                    return False
        finally:
            ordered.close()
        self.skipped += ordered.skipped_total
        return True

    @torch.no_grad()
    def _add(self, batch: dict[str, Any]) -> None:
        if not batch["keys"]:
            return
        self.digests += batch["digests"]
        ids = []
        for url in batch["urls"]:
            s = self.url_index[url]
            ids.append(image_id(s, self.positions[s]))
            self.positions[s] += 1
        ids_B = torch.tensor(ids, dtype=torch.long)
        labels_B = batch["labels"]
        acts_BTD = select_tokens(self.source.all_tokens(batch["pixels"]), self.tokens)
        B, T, D = acts_BTD.shape
        # Encode in chunks of images so the [b, T, F] code stays within ~256 MiB.
        chunk = max(1, (256 << 20) // (T * self.sae.n_latents * 4))
        top_before = self.stats.top_ids_KF.clone()
        for start in range(0, B, chunk):
            part = slice(start, start + chunk)
            x_ND = acts_BTD[part].reshape(-1, D)
            codes_BTF = encode(x_ND, self.tensors).reshape(-1, T, self.sae.n_latents)
            self.stats.update(codes_BTF, labels_B[part], ids_B[part])
        # Remember key, shard and label of the images that entered a top-K.
        new = set(self.stats.top_ids_KF[self.stats.top_ids_KF != top_before].tolist())
        for i, key, url, label in zip(
            ids, batch["keys"], batch["urls"], labels_B.tolist(), strict=True
        ):
            if i in new:
                self.refs[i] = (key, self.url_index[url], int(label))
        if len(self.refs) > 4 * self.options.k * self.sae.n_latents:
            self._prune_refs()


def _gather_digests(passes: _Pass, dist: Distributed) -> Tensor:
    """Every rank's image digests, sorted and unique (on the main rank; empty elsewhere)."""
    mine = torch.tensor(passes.digests, dtype=torch.int64)
    parts = dist.all_gather_object(mine) if dist.active else [mine]
    return torch.unique(torch.cat(parts)) if dist.is_main else mine[:0]


def _reduce(passes: _Pass, dist: Distributed) -> tuple[LatentStatistics, dict, int]:
    """Every rank gets the sum of all ranks' statistics, the key, shard and label of the merged
    references, and the total of skipped samples. Counts and sums are all-reduced where they
    live (on the GPU under NCCL); only the ``[K, F]`` top-K buffers are gathered, merged in rank
    order with the id tie rule, and only the references of the merged top-K travel as objects."""
    import torch.distributed as tdist

    stats = passes.stats
    if not dist.active:
        passes._prune_refs()
        return stats, passes.refs, passes.skipped
    device = stats.device
    n_classes = torch.tensor([stats.n_classes], device=device)
    stats.grow_classes(int(dist.all_reduce_max(n_classes)))
    scalars = torch.tensor(
        [stats.images, stats.tokens, passes.skipped], dtype=torch.long, device=device
    )
    dist.all_reduce_sum(scalars)
    for name in _SUMMED:
        dist.all_reduce_sum(getattr(stats, name))
    values = [torch.empty_like(stats.top_values_KF) for _ in range(dist.world_size)]
    ids = [torch.empty_like(stats.top_ids_KF) for _ in range(dist.world_size)]
    tdist.all_gather(values, stats.top_values_KF)
    tdist.all_gather(ids, stats.top_ids_KF)
    top_values, top_ids = values[0], ids[0]
    for v, i in zip(values[1:], ids[1:], strict=True):
        top_values, top_ids = merge_top(top_values, top_ids, v, i, stats.k)
    stats.top_values_KF, stats.top_ids_KF = top_values, top_ids
    stats.images, stats.tokens, skipped = scalars.tolist()
    keep = set(top_ids.unique().tolist())
    refs: dict[int, tuple[str, int, int]] = {}
    for part in dist.all_gather_object({i: v for i, v in passes.refs.items() if i in keep}):
        refs.update(part)
    return stats, refs, skipped


_SUMMED = ("image_sum_F", "active_images_F", "active_tokens_F", "class_counts_CF", "class_images_C")


def analyze(run_dir: str | Path, options: AnalyzeOptions) -> Path | None:
    """Run the pass; returns the results folder on rank 0 (None elsewhere, or when stopped
    early by ``max_batches``)."""
    for name, least in (("k", 1), ("batch_images", 1), ("save_every", 1), ("workers", 0)):
        if getattr(options, name) < least:
            flag = "--" + name.replace("_", "-")
            raise AnalysisError(f"{flag} {getattr(options, name)}: must be >= {least}")
    if not options.tau >= 0:
        raise AnalysisError(f"--tau {options.tau}: must be >= 0 (activations are >= 0)")
    sae = load_trained(run_dir)
    out = Path(options.out) if options.out else Path(run_dir) / "analysis"
    try:
        urls = expand_urls(options.data)
    except Exception as err:
        raise AnalysisError(f"--data {options.data!r}: {err}") from err
    names = _class_names(options, urls)
    dist = Distributed.from_env(DistributedConfig(), options.device)
    partial = out.parent / f".{out.name}{PARTIAL}"
    passes = _Pass(options, sae, urls, dist, partial)
    if passes.restore():
        log.info("resuming the analysis from %s (%d batches done)", partial, passes.batches)
    progress = dist.progress("analyze", initial=passes.stats.images)
    try:
        finished = passes.run(progress)
    finally:
        progress.close()
    stopped = torch.tensor([0 if finished else 1])
    dist.all_reduce_sum(stopped)
    if int(stopped):
        return None
    stats, refs, skipped = _reduce(passes, dist)
    digests = _gather_digests(passes, dist)
    if stats.images == 0:  # the reduced count: every rank stops alike
        raise AnalysisError(
            f"no readable image in {options.data} ({skipped} samples skipped); check --data"
        )
    result = None
    if dist.is_main:
        result = write_results(
            out, sae, stats, refs, urls, names, options, skipped, passes.tokens, digests
        )
    dist.barrier()
    if dist.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        if options.mlflow and result is not None:
            log_to_mlflow(sae, result)
    return result
