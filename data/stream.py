"""Token stream: image shards -> frozen CLIP activations -> mixed token batches.

The stream's position (epoch, per-worker batches consumed, the worker rotation, the mixer's
buffer and RNG) is a plain dict of tensors and ints, so a checkpoint resumes the exact token
sequence.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Generator
from typing import Any

import torch
from patchsae.data.activations import ActivationSource
from patchsae.data.mixer import TokenMixer
from patchsae.data.shards import ImageShards, OrderedBatches, ShardError
from torch import Tensor
from torch.utils.data import DataLoader

BAD_CHECK_MIN_SAMPLES = 200
"""Samples a rank reads before its share of bad ones is held against ``max_bad_fraction``."""


class TokenStream:
    """``max_bad_fraction``: once this rank has read ``min_samples`` samples, more than this
    fraction of them skipped (undecodable, incomplete, in a broken shard) stops the stream with
    a :class:`ShardError` naming the shards with the most failures."""

    def __init__(
        self,
        shards: ImageShards,
        source: ActivationSource,
        mixer: TokenMixer,
        *,
        num_workers: int,
        max_bad_fraction: float = 1.0,
        min_samples: int = BAD_CHECK_MIN_SAMPLES,
    ) -> None:
        self.shards, self.source, self.mixer = shards, source, mixer
        self.num_workers = num_workers
        self.max_bad_fraction, self.min_samples = max_bad_fraction, min_samples
        self.epoch = 0
        self.images_seen = 0
        self.skipped = 0
        self.skipped_by_shard: Counter[str] = Counter()
        """Skipped samples per shard in finished epochs (the current one is in ``_ordered``)."""
        self._resume: dict[str, Any] | None = None
        self._ordered: OrderedBatches | None = None
        self._batches: Generator[dict, None, None] | None = None
        self.wait_s = 0.0
        """Seconds spent producing tokens (reading, decoding, CLIP forward); the trainer turns
        it into ``perf/data_wait_frac``."""

    @property
    def width(self) -> int:
        return self.source.width

    @property
    def tokens_per_image(self) -> int:
        return self.source.tokens_per_image

    def _epochs(self) -> Generator[dict, None, None]:
        while True:
            position = self._resume or {}
            self._resume = None
            self.shards.set_position(
                self.epoch, skip=position.get("consumed"), finished=position.get("finished")
            )
            loader = DataLoader(
                self.shards,
                batch_size=None,
                num_workers=self.num_workers,
                pin_memory=torch.cuda.is_available(),
            )
            workers = max(self.num_workers, 1)
            if position:
                self._ordered = OrderedBatches.from_position(loader, workers, position)
            else:
                self._ordered = OrderedBatches(loader, workers)
            images_before = self.images_seen
            yield from self._ordered
            self.skipped += self._ordered.skipped_total
            self.skipped_by_shard.update(self._ordered.skipped_by_shard)
            self._ordered = None
            if self.images_seen == images_before and not position:
                raise ShardError(
                    f"epoch {self.epoch} produced no readable image on this rank "
                    f"({self.skipped} samples skipped); check data.urls and the shards"
                )
            self.epoch += 1

    def _produce(self) -> Tensor:
        if self._batches is None:
            self._batches = self._epochs()
        while True:
            batch = next(self._batches)
            if batch["pixels"] is not None and len(batch["pixels"]):
                break
        self.images_seen += len(batch["pixels"])
        self._check_bad_fraction()
        return self.source(batch["pixels"])

    def _check_bad_fraction(self) -> None:
        bad = self.skipped_total
        read = self.images_seen + bad
        if read < self.min_samples or bad <= self.max_bad_fraction * read:
            return
        by_shard = self.skipped_by_shard + (
            self._ordered.skipped_by_shard if self._ordered is not None else Counter()
        )
        worst = ", ".join(f"{url} ({n})" for url, n in by_shard.most_common(3))
        raise ShardError(
            f"{bad} of the {read} samples read so far on this rank ({bad / read:.0%}) could not "
            f"be used, more than data.max_bad_fraction = {self.max_bad_fraction}; most failures "
            f"in {worst}. Check or rewrite those shards (the log names each bad sample), or "
            "raise data.max_bad_fraction to accept them"
        )

    def close(self) -> None:
        """Stop the DataLoader workers now (not whenever the iterator is collected): a process
        that leaves with ``os._exit`` must not leave them behind."""
        if self._batches is not None:
            self._batches.close()  # GeneratorExit through the loader's iterator: workers joined
        self._batches = self._ordered = None

    def next_batch(self, n: int) -> Tensor:
        """``[n, D]`` float32 tokens on the activation source's device."""
        start = time.perf_counter()
        tokens = self.mixer.next_batch(n, self._produce)
        self.wait_s += time.perf_counter() - start
        return tokens

    @property
    def skipped_total(self) -> int:
        """Samples skipped so far (undecodable images, truncated shards)."""
        current = self._ordered.skipped_total if self._ordered is not None else 0
        return self.skipped + current

    def state_dict(self) -> dict[str, Any]:
        if self._ordered is not None:
            position = self._ordered.position()
        else:  # between epochs, or restored and not started: the saved position stands
            position = self._resume or {}
        return {
            "epoch": self.epoch,
            "position": position or {},
            "images_seen": self.images_seen,
            "skipped": self.skipped_total,
            "skipped_by_shard": dict(
                self.skipped_by_shard
                + (self._ordered.skipped_by_shard if self._ordered is not None else Counter())
            ),
            "mixer": self.mixer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._batches is not None:
            raise RuntimeError("load_state_dict must be called before the first batch")
        self.epoch = state["epoch"]
        self.images_seen = state["images_seen"]
        self.skipped = state["skipped"]
        self.skipped_by_shard = Counter(state.get("skipped_by_shard", {}))  # absent before 0.1.1
        self._resume = dict(state["position"]) or None
        device = next(self.source.parameters()).device
        self.mixer.load_state_dict(state["mixer"], device=device)
