"""Reading an activation cache while an SAE trains: does the step wait for data?

Writes a synthetic cache folder shaped like ViT-B-16's (197 tokens x 768 dims per image, fp16,
in the format ``patchsae cache`` writes), then serves it through the trainer's reader
(``CachedStream``: shards and images shuffled, a ``TokenMixer`` of ``--mix`` tokens) with a
simulated SAE step between batches: ``time.sleep(ms)`` stands in for a GPU step, which leaves
the host thread free while the device computes. For each step time it compares reading in the
training thread (``read_ahead`` 0, the trainer's default on a CPU) with the background reader
at the depth a GPU run defaults to (one mixer top-up and one read more):

- tok/s: tokens served per second of wall time, steps included;
- wait: the fraction of wall time spent in ``next_batch`` (the trainer's ``perf/data_wait_frac``);
- read: of that, the part spent waiting for reads (in the training thread, or for the
  background reader); the rest is the mixer (its shuffle and the batch copy).

The cache is read warm (the pages it just wrote are in the page cache); a cold read is bounded
by the disk instead. Numbers vary with machine load; compare ratios from one run.

    python benchmarks/cache_reader.py [--device cpu|cuda] [--images 2048] [--batch 4096]
                                      [--mix 65536] [--steps-ms 0,2,8] [--batches 200]
                                      [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from patchsae.data.cache import (
    FORMAT,
    META,
    VERSION,
    ActivationCache,
    CachedStream,
    top_up_reads,
)
from patchsae.data.mixer import TokenMixer


def write_cache(out: Path, images: int, tokens: int, width: int, shard_images: int) -> None:
    """A cache folder of ``images`` images of random fp16 activations."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shards = []
    for index, start in enumerate(range(0, images, shard_images)):
        count = min(shard_images, images - start)
        rows = rng.standard_normal((count * tokens, width), dtype=np.float32).astype(np.float16)
        name = f"shard-{index:05d}.npy"
        np.save(out / name, rows)
        shards.append({"file": name, "images": count})
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "identity": {"model": "synthetic"},
        "dtype": "float16",
        "width": width,
        "tokens_per_image": tokens,
        "images": images,
        "token_count": images * tokens,
        "shards": shards,
    }
    (out / META).write_text(json.dumps(meta))


def measure(
    cache: ActivationCache,
    *,
    read_ahead: int,
    step_s: float,
    batch: int,
    mix: int,
    images_per_read: int,
    batches: int,
    device: torch.device,
) -> dict[str, float]:
    stream = CachedStream(
        cache,
        TokenMixer(mix, seed=0),
        units_per_read=images_per_read,
        shuffle_shards=True,
        shuffle_units=True,
        seed=0,
        read_ahead=read_ahead,
        device=device,
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    produce = stream._produce
    read_s = 0.0

    def timed_produce() -> torch.Tensor:
        nonlocal read_s
        start = time.perf_counter()
        out = produce()
        sync()
        read_s += time.perf_counter() - start
        return out

    stream._produce = timed_produce  # type: ignore[method-assign]
    for _ in range(mix // batch + 1):  # fill the mixer and start the reader: not timed
        stream.next_batch(batch)
    if read_ahead:
        time.sleep(1.0)  # the reader fills its queue, as it would during the first steps
    read_s, wait_s = 0.0, 0.0
    start = time.perf_counter()
    for _ in range(batches):
        before = time.perf_counter()
        stream.next_batch(batch)
        sync()
        wait_s += time.perf_counter() - before
        if step_s:
            time.sleep(step_s)
    wall = time.perf_counter() - start
    stream.close()
    return {"tok_s": batches * batch / wall, "wait": wait_s / wall, "read": read_s / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--shard-images", type=int, default=512)
    parser.add_argument("--images-per-read", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--mix", type=int, default=65536)
    parser.add_argument("--steps-ms", default="0,2,8")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--cache", type=Path, help="reuse (or write once into) this folder")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.cache or Path(tmp) / "cache"
        if not (folder / META).is_file():
            start = time.perf_counter()
            write_cache(folder, args.images, args.tokens, args.width, args.shard_images)
            print(f"wrote {folder} in {time.perf_counter() - start:.0f} s")
        cache = ActivationCache.open(folder)
        default_ahead = top_up_reads(args.mix, args.images_per_read * cache.tokens_per_image)
        size = sum(s.rows_ND.nbytes for s in cache.shards) / 2**30
        print(
            f"{cache.tokens:,} tokens of {cache.width} ({cache.dtype}, {size:.2f} GiB), "
            f"{torch.get_num_threads()} threads, batches of {args.batch:,}, mixer "
            f"{args.mix:,}, reads of {args.images_per_read} images\n"
        )
        print("| step ms | read_ahead | tok/s | wait | read | mixer |")
        print("|---:|---:|---:|---:|---:|---:|")
        for step_ms in [float(s) for s in args.steps_ms.split(",")]:
            for read_ahead in (0, default_ahead):
                row = measure(
                    cache,
                    read_ahead=read_ahead,
                    step_s=step_ms / 1000,
                    batch=args.batch,
                    mix=args.mix,
                    images_per_read=args.images_per_read,
                    batches=args.batches,
                    device=torch.device(args.device),
                )
                print(
                    f"| {step_ms:g} | {read_ahead} | {row['tok_s']:,.0f} | {row['wait']:.1%} "
                    f"| {row['read']:.1%} | {row['wait'] - row['read']:.1%} |"
                )


if __name__ == "__main__":
    main()
