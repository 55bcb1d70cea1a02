"""Token stream: image shards -> frozen CLIP activations -> mixed token batches.

The stream's position (epoch, per-worker batches consumed, the worker rotation, the mixer's
buffer and RNG) is a plain dict of tensors and ints, so a checkpoint resumes the exact token
sequence.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
from patchsae.data.activations import ActivationSource
from patchsae.data.mixer import TokenMixer
from patchsae.data.shards import ImageShards, OrderedBatches, ShardError
from torch import Tensor
from torch.utils.data import DataLoader


class TokenStream:
    def __init__(
        self,
        shards: ImageShards,
        source: ActivationSource,
        mixer: TokenMixer,
        *,
        num_workers: int,
    ) -> None:
        self.shards, self.source, self.mixer = shards, source, mixer
        self.num_workers = num_workers
        self.epoch = 0
        self.images_seen = 0
        self.skipped = 0
        self._resume: dict[str, Any] | None = None
        self._ordered: OrderedBatches | None = None
        self._batches: Iterator[dict] | None = None
        self.wait_s = 0.0
        """Seconds spent producing tokens (reading, decoding, CLIP forward); the trainer turns
        it into ``perf/data_wait_frac``."""

    def _epochs(self) -> Iterator[dict]:
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
        return self.source(batch["pixels"])

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
            position = self._resume
        return {
            "epoch": self.epoch,
            "position": position or {},
            "images_seen": self.images_seen,
            "skipped": self.skipped_total,
            "mixer": self.mixer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._batches is not None:
            raise RuntimeError("load_state_dict must be called before the first batch")
        self.epoch = state["epoch"]
        self.images_seen = state["images_seen"]
        self.skipped = state["skipped"]
        self._resume = dict(state["position"]) or None
        device = next(self.source.parameters()).device
        self.mixer.load_state_dict(state["mixer"], device=device)
