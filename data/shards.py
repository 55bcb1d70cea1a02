"""Read WebDataset-style tar shards of labelled images, deterministically and resumably.

Pieces:

* :func:`expand_urls` turns the ``data.urls`` string (directory, brace pattern, file, or several
  of these joined with ``::``) into a list of shard URLs, dropping local shards that cannot be
  opened and failing with a helpful :class:`ShardError` when nothing readable is left.
* :class:`ImageShards` is an ``IterableDataset`` that yields ready-made batches. Every shard is
  read by exactly one (rank, DataLoader worker) per epoch, the shard order and the sample
  shuffle depend only on (seed, epoch, rank, worker), and broken data (corrupt images,
  truncated tars, samples without image or label) is skipped and counted, never fatal.
* :class:`OrderedBatches` re-emits the DataLoader's batches in a fixed rotation over worker ids
  and reports a position from which a new dataset + loader reproduce the rest of the epoch.

Use with ``DataLoader(dataset, batch_size=None, num_workers=k)`` (the dataset batches itself)
and without ``persistent_workers``: workers take their copy of the dataset, including the
position set by :meth:`ImageShards.set_position`, when the loader iterator is created.

Resuming mid-epoch::

    pos = ordered.position()                          # saved with the checkpoint
    dataset.set_position(epoch, skip=pos["consumed"], finished=pos["finished"])
    ordered = OrderedBatches.from_position(DataLoader(dataset, ...), num_workers, pos)

This reproduces the uninterrupted sequence of batches as long as urls, seed, batch_size,
shuffle settings, world_size and num_workers are unchanged.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
import tarfile
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import braceexpand
import PIL.Image
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset import filters as wds_filters
from webdataset.gopen import gopen
from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys, tar_file_expander

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
"""Member extensions accepted as the sample's image, in order of preference."""

# Errors that mean "this shard's byte stream is broken or unreadable": tarfile's own errors,
# a stream that ends early, I/O failures (including gzip's BadGzipFile), broken compression, and
# webdataset's ValueError for a member name that occurs twice in one sample.
_SHARD_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, ValueError)
# Errors PIL raises for undecodable image bytes (some plugins raise SyntaxError for bad headers,
# DecompressionBombError derives directly from Exception), plus a label that is not an integer.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError)
# Per worker and epoch, how many undecodable samples get their own warning before we summarise.
_MAX_LOGGED_FAILURES = 10


class ShardError(RuntimeError):
    """No readable shard could be found for the configured URLs."""


def _is_local(url: str) -> bool:
    """Whether ``url`` names a local file (a plain path or a ``file:`` URL), as gopen sees it."""
    return urlparse(url).scheme in ("", "file")


def _local_path(url: str) -> Path:
    """The filesystem path of a local ``url``."""
    return Path(urlparse(url).path if url.startswith("file:") else url).expanduser()


def _readable(path: Path) -> bool:
    try:
        with open(path, "rb"):
            return True
    except OSError:
        return False


def expand_urls(urls: str) -> list[str]:
    """Expand a ``data.urls`` string into the list of shard URLs to read.

    ``urls`` is one or more specs joined with ``::``; each spec is a directory (all ``*.tar``
    inside, sorted by name), a brace pattern (``/x/shard-{000000..000009}.tar``), a single file,
    or a non-local URL (``pipe:``, ``http://``, ``s3://``, ...). Brace patterns are expanded
    for every kind. Local paths that do not exist or cannot be opened are dropped with a warning;
    non-local URLs are kept unchecked (they are opened with ``webdataset.gopen.gopen``).
    Duplicates are dropped (first occurrence wins), since a shard listed twice would be read
    twice per epoch.

    Raises:
        ShardError: no readable shard remains; the message names ``urls`` and the fix.
    """
    found: list[str] = []
    dropped: list[str] = []
    for spec in (s.strip() for s in urls.split("::")):
        if not spec:
            continue
        if _is_local(spec) and _local_path(spec).is_dir():
            tars = sorted(_local_path(spec).glob("*.tar"))
            if not tars:
                dropped.append(f"{spec} (a directory without *.tar files)")
            candidates = [str(path) for path in tars]
        else:
            candidates = list(braceexpand.braceexpand(spec))
        for url in candidates:
            path = _local_path(url)
            if not _is_local(url):
                found.append(url)
            elif path.is_file() and _readable(path):
                # Plain paths come back with ``~`` expanded, since gopen would not expand it.
                found.append(url if url.startswith("file:") else str(path))
            else:
                dropped.append(url)

    unique = list(dict.fromkeys(found))
    if dropped:
        shown = ", ".join(dropped[:5]) + (
            f" and {len(dropped) - 5} more" if len(dropped) > 5 else ""
        )
        log.warning("skipping %d missing or unreadable shard path(s): %s", len(dropped), shown)
    if not unique:
        raise ShardError(
            f"no readable shards found for data.urls={urls!r}. Point data.urls at a directory "
            "of *.tar shards, a brace pattern like /data/shard-{000000..000099}.tar, or several "
            "of these joined with '::'; for a quick offline demo run "
            "`patchsae make-demo-data --out DIR` and set data.urls=DIR."
        )
    return unique


def derive_seed(*values: int) -> int:
    """Combine integers into one 64-bit seed, identically in every process.

    Python's ``hash()`` is salted per process for strings and ``random.Random`` rejects tuples,
    so the parts are folded in with SplitMix64 steps instead (all arithmetic, no salting).
    """
    mask = (1 << 64) - 1
    state = 0x243F6A8885A308D3  # arbitrary non-zero start
    for value in values:
        state = ((state ^ (value & mask)) + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        state = z ^ (z >> 31)
    return state


# Tags that keep the random streams for the shard order and the sample shuffle apart.
_SHARD_ORDER, _SAMPLE_SHUFFLE = 1, 2


class _Counter:
    """Skipped samples not yet reported, per shard; shared by the stages of one worker's
    pipeline."""

    def __init__(self) -> None:
        self.by_shard: Counter[str] = Counter()

    def add(self, url: str) -> None:
        self.by_shard[url] += 1

    def take(self) -> dict[str, int]:
        value, self.by_shard = dict(self.by_shard), Counter()
        return value


class ImageShards(IterableDataset):
    """Batches of (preprocessed image, label) from tar shards; see the module docstring.

    Each yielded item is a dict ``{"pixels": FloatTensor[b, 3, H, W], "labels": LongTensor[b],
    "keys": list[str], "urls": list[str] (each sample's shard), "digests": list[int] (each
    image's :func:`image_digest`), "worker": int, "index": int,
    "skipped": int, "skipped_shards": dict[str, int], "done": False}`` where ``index`` is the
    worker's batch number in this epoch (skipped-for-resume batches included), ``skipped``
    counts samples lost since the worker's previous item and ``skipped_shards`` the same per
    shard. After its last batch
    each worker yields one sentinel with ``done=True``, ``index`` = its number of batches,
    ``pixels``/``labels`` = None, ``keys`` = ``urls`` = [] and the remaining ``skipped`` count.

    Ranks and workers may end an epoch with different numbers of batches when shards differ in
    size or do not divide evenly; the consumer has to cope with that (e.g. stop all ranks when
    the first one runs out).
    """

    def __init__(
        self,
        urls: list[str],
        preprocess: Callable[[PIL.Image.Image], torch.Tensor],
        *,
        batch_size: int,
        shuffle_shards: bool,
        shuffle_buffer: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not urls:
            raise ShardError("ImageShards needs at least one shard URL (see expand_urls)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        self.urls = list(urls)
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.shuffle_shards = shuffle_shards
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip: dict[int, int] = {}
        self.finished: frozenset[int] = frozenset()

    def set_position(
        self,
        epoch: int,
        skip: dict[int, int] | None = None,
        finished: Iterable[int] | None = None,
    ) -> None:
        """Choose the epoch to read next and where each worker starts in it.

        ``skip[w]`` raw batches of worker ``w`` are read but not decoded (cheap resume);
        workers in ``finished`` yield nothing at all (they already sent their sentinel, so
        there is no point re-reading their shards). Call this before every epoch, and before
        creating the DataLoader iterator: workers copy the dataset at that moment. Keys may be
        ints or strings (positions that went through JSON have string keys).
        """
        self.epoch = epoch
        self.skip = {int(w): int(n) for w, n in (skip or {}).items()}
        self.finished = frozenset(int(w) for w in (finished or ()))

    def shard_order(self, epoch: int) -> list[str]:
        """All shard URLs in the order used for ``epoch`` (the same on every rank)."""
        order = list(self.urls)
        if self.shuffle_shards:
            random.Random(derive_seed(self.seed, epoch, _SHARD_ORDER)).shuffle(order)
        return order

    def worker_shards(self, epoch: int, worker: int, num_workers: int) -> list[str]:
        """The shards that (this rank, ``worker``) reads in ``epoch``."""
        return self.shard_order(epoch)[self.rank :: self.world_size][worker::num_workers]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        if worker in self.finished:
            return
        epoch = self.epoch
        shards = self.worker_shards(epoch, worker, num_workers)
        if not shards:
            log.warning(
                "rank %d worker %d has no shards in epoch %d (%d shards for %d ranks x %d "
                "workers); it yields no batches",
                self.rank,
                worker,
                epoch,
                len(self.urls),
                self.world_size,
                num_workers,
            )

        counter = _Counter()
        samples = self._read_samples(shards, counter)
        if self.shuffle_buffer > 0:  # the first sample comes out once the buffer is full
            rng = random.Random(derive_seed(self.seed, epoch, self.rank, worker, _SAMPLE_SHUFFLE))
            samples = wds_filters.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(
                samples
            )

        skip = self.skip.get(worker, 0)
        failures = 0  # undecodable samples this epoch, for log throttling
        # An empty pixel batch of the right shape and dtype, once one sample has decoded.
        empty: torch.Tensor | None = None
        n_batches = 0
        batches = wds_filters.batched(self.batch_size, collation_fn=None)(samples)
        for index, raw in enumerate(batches):
            n_batches = index + 1
            if index < skip:
                if index == skip - 1:
                    # Whatever was lost up to here was reported before the interruption.
                    counter.take()
                continue
            pixels, labels, keys, urls, digests = [], [], [], [], []
            for sample in raw:
                try:
                    image, label = _decode(sample)
                except _DECODE_ERRORS as e:
                    counter.add(sample["__url__"])
                    failures += 1
                    if failures <= _MAX_LOGGED_FAILURES:
                        log.warning(
                            "skipping undecodable sample %s in %s: %s: %s",
                            sample["__key__"],
                            sample["__url__"],
                            type(e).__name__,
                            e,
                        )
                    if failures == _MAX_LOGGED_FAILURES:
                        log.warning(
                            "rank %d worker %d: further undecodable samples this epoch are "
                            "counted but not logged individually",
                            self.rank,
                            worker,
                        )
                    continue
                # Outside the try: a failing preprocess is a bug to surface, not bad data.
                pixels.append(self.preprocess(image))
                labels.append(label)
                keys.append(sample["__key__"])
                urls.append(sample["__url__"])
                digests.append(image_digest(sample))
            if pixels:
                batch = torch.stack(pixels)
                empty = batch.new_empty((0, *batch.shape[1:]))
            elif empty is not None:
                batch = empty
            else:
                # Nothing decoded yet, so the pixel shape is unknown: drop the batch and let
                # the next item carry its skipped count.
                continue
            lost = counter.take()
            yield {
                "pixels": batch,
                "labels": torch.tensor(labels, dtype=torch.long),
                "keys": keys,
                "urls": urls,
                "digests": digests,
                "worker": worker,
                "index": index,
                "skipped": sum(lost.values()),
                "skipped_shards": lost,
                "done": False,
            }
        if failures > _MAX_LOGGED_FAILURES:
            log.warning(
                "rank %d worker %d: %d undecodable samples in epoch %d",
                self.rank,
                worker,
                failures,
                epoch,
            )
        lost = counter.take()
        yield {
            "pixels": None,
            "labels": None,
            "keys": [],
            "urls": [],
            "digests": [],
            "worker": worker,
            "index": n_batches,
            "skipped": sum(lost.values()),
            "skipped_shards": lost,
            "done": True,
        }

    def _read_samples(self, shards: list[str], counter: _Counter) -> Iterator[dict[str, Any]]:
        """Raw samples ``{"__key__", "__url__", ext: bytes}`` from ``shards``, in order."""
        for url in shards:
            try:
                yield from _tar_samples(url, counter)
            except _SHARD_ERRORS as e:
                # How many samples the rest of a broken shard held is unknown; count the
                # sample being read when it broke. (webdataset appends the stream and the URL
                # to the error's arguments; the first one is the message.)
                counter.add(url)
                log.warning(
                    "shard %s is truncated or unreadable (%s: %s); skipping the rest of it",
                    url,
                    type(e).__name__,
                    e.args[0] if e.args else e,
                )


def _complete(sample: dict[str, Any]) -> bool:
    return "cls" in sample and any(ext in sample for ext in IMAGE_EXTS)


def _tar_samples(url: str, counter: _Counter) -> Iterator[dict[str, Any]]:
    """The samples of the tar stream at ``url``: members grouped by key (the name up to its first
    dot) by webdataset's stages. Samples without an image or a ``.cls`` member are counted in
    ``counter`` and dropped. Errors from a broken stream propagate (webdataset's handler
    re-raises them), and the partial sample being built is lost with them."""
    stream = gopen(url, "rb")
    try:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=reraise_exception)
        for sample in group_by_keys(files, handler=reraise_exception):
            if _complete(sample):
                yield sample
            else:
                counter.add(url)
    finally:
        stream.close()


def iter_samples(url: str) -> Iterator[dict[str, Any]]:
    """The raw samples (every member, by extension) of the shard at ``url``, in order; those
    without an image or a label are dropped."""
    return _tar_samples(url, _Counter())


def fetch_samples(url: str, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The raw samples of ``keys`` in the shard at ``url`` (one sequential read, stopping once
    all are found); keys absent from the shard are absent from the result."""
    wanted, found = set(keys), {}
    for sample in _tar_samples(url, _Counter()):
        if sample["__key__"] in wanted:
            found[sample["__key__"]] = sample
            if len(found) == len(wanted):
                break
    return found


def decode_image(sample: dict[str, Any]) -> PIL.Image.Image:
    """A raw sample's RGB image."""
    return _decode(sample)[0]


def image_digest(sample: dict[str, Any]) -> int:
    """A 64-bit digest (BLAKE2b, as a signed int) of the sample's image bytes: the same image
    has the same digest in any shard, under any key."""
    data = next(sample[ext] for ext in IMAGE_EXTS if ext in sample)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def _decode(sample: dict[str, Any]) -> tuple[PIL.Image.Image, int]:
    """The sample's RGB image and integer label; raises one of ``_DECODE_ERRORS`` if broken."""
    data = next(sample[ext] for ext in IMAGE_EXTS if ext in sample)
    with PIL.Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB")  # convert() loads, so truncated data fails here
    label = int(sample["cls"].decode("utf-8").strip())
    return rgb, label


class OrderedBatches:
    """Re-emit ``ImageShards`` batches in a fixed rotation over DataLoader worker ids.

    torch's DataLoader interleaves workers in the order it sent them requests, which restarts
    at worker 0 for every new iterator; after a mid-epoch resume that would change the batch
    sequence. Here batch number i always comes from the next unfinished worker in the rotation
    0, 1, ..., W-1, 0, ... (starting from ``start``); batches that arrive early wait in a stash.

    Sentinels are consumed here, not yielded: they mark their worker finished and their
    ``skipped`` count is added to :attr:`skipped_total`, the running count of skipped samples
    over all batches and sentinels seen (the yielded batches still carry their own ``skipped``),
    and their ``skipped_shards`` to :attr:`skipped_by_shard`.
    Iteration ends once every worker has finished. One instance reads one loader iterator, once.

    Args:
        loader_iterable: the DataLoader (or any iterable of ``ImageShards`` items).
        num_workers: the loader's ``num_workers`` (0 is treated as 1: the main process).
        start: the worker whose batch comes first.
        finished: workers that already finished this epoch (their items are ignored).
        consumed: batches already consumed per worker, so that :meth:`position` stays absolute
            after a resume; ``from_position`` fills this in.
    """

    def __init__(
        self,
        loader_iterable: Iterable[dict[str, Any]],
        num_workers: int,
        start: int = 0,
        finished: Iterable[int] | None = None,
        consumed: dict[int, int] | None = None,
    ) -> None:
        self.num_workers = max(1, num_workers)
        if not 0 <= start < self.num_workers:
            raise ValueError(f"start must be a worker id below {self.num_workers}, got {start}")
        self._loader = loader_iterable
        self._iterator: Iterator[dict[str, Any]] | None = None
        self._stash: dict[int, deque[dict[str, Any]]] = {
            w: deque() for w in range(self.num_workers)
        }
        self.finished: set[int] = {int(w) for w in (finished or ())}
        self.consumed: dict[int, int] = {int(w): int(n) for w, n in (consumed or {}).items()}
        self.next_worker = start
        self.skipped_total = 0
        self.skipped_by_shard: Counter[str] = Counter()
        if len(self.finished) < self.num_workers and self.next_worker in self.finished:
            self._advance()

    @classmethod
    def from_position(
        cls, loader_iterable: Iterable[dict[str, Any]], num_workers: int, position: dict[str, Any]
    ) -> OrderedBatches:
        """Continue from a :meth:`position` dict (also after a JSON round trip)."""
        return cls(
            loader_iterable,
            num_workers,
            start=int(position["next_worker"]),
            finished=position["finished"],
            consumed=position["consumed"],
        )

    def position(self) -> dict[str, Any]:
        """Where the rotation stands: ``{"next_worker", "finished", "consumed"}`` (see class)."""
        return {
            "next_worker": self.next_worker,
            "finished": sorted(self.finished),
            "consumed": dict(sorted(self.consumed.items())),
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        while len(self.finished) < self.num_workers:
            worker = self.next_worker
            item = self._take(worker)
            self.skipped_total += int(item["skipped"])
            self.skipped_by_shard.update(item.get("skipped_shards", {}))
            if item["done"]:
                self.finished.add(worker)
                self.consumed[worker] = int(item["index"])
            else:
                self.consumed[worker] = int(item["index"]) + 1
            if len(self.finished) < self.num_workers:
                self._advance()
            if not item["done"]:
                return item
        raise StopIteration

    def close(self) -> None:
        """Drop the loader's iterator now: its finaliser stops and joins the workers."""
        self._iterator = None

    def _advance(self) -> None:
        """Move ``next_worker`` to the next unfinished worker after it (there must be one)."""
        w = self.next_worker
        for _ in range(self.num_workers):
            w = (w + 1) % self.num_workers
            if w not in self.finished:
                self.next_worker = w
                return

    def _take(self, worker: int) -> dict[str, Any]:
        """The next item of ``worker``: from the stash, or by reading the loader until it comes."""
        if self._iterator is None:
            self._iterator = iter(self._loader)
        stash = self._stash[worker]
        while not stash:
            try:
                item = next(self._iterator)
            except StopIteration:
                raise RuntimeError(
                    f"the loader ended before worker {worker} finished its epoch; does "
                    f"num_workers={self.num_workers} match the DataLoader's?"
                ) from None
            w = int(item["worker"])
            if not 0 <= w < self.num_workers:
                raise RuntimeError(
                    f"got a batch from worker {w} but num_workers={self.num_workers}; pass the "
                    "DataLoader's num_workers"
                )
            if w not in self.finished:
                self._stash[w].append(item)
        return stash.popleft()
