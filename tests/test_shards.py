"""Shard reading: exactly-once coverage, deterministic shuffles, broken data, exact resume."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import webdataset as wds
from patchsae.data.demo import make_demo_data
from patchsae.data.shards import ImageShards, OrderedBatches, ShardError, expand_urls
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

N_IMAGES, PER_SHARD, SIZE, BATCH = 100, 20, 32, 8
ALL_KEYS = [f"{i:06d}" for i in range(N_IMAGES)]
# Shrinks the images further so that decoding and stacking stay cheap.
PREPROCESS = transforms.Compose([transforms.Resize((16, 16)), transforms.ToTensor()])


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 5 shards of 20: with 2 workers one worker reads 3 shards and the other 2, so the second
    # finishes early and the resume test can stop after a worker has finished.
    out = tmp_path_factory.mktemp("shards")
    return make_demo_data(out, n_images=N_IMAGES, image_size=SIZE, images_per_shard=PER_SHARD)


def make_dataset(urls: str | Path, **overrides: Any) -> ImageShards:
    kwargs: dict[str, Any] = dict(
        batch_size=BATCH, shuffle_shards=True, shuffle_buffer=16, seed=7, rank=0, world_size=1
    )
    kwargs.update(overrides)
    return ImageShards(expand_urls(str(urls)), PREPROCESS, **kwargs)


def read_epoch(dataset: ImageShards, num_workers: int, epoch: int = 0) -> OrderedBatches:
    """An OrderedBatches over a fresh DataLoader for ``epoch``; iterate it to read."""
    dataset.set_position(epoch)
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    return OrderedBatches(loader, num_workers)


def keys_of(batches: list[dict[str, Any]]) -> list[str]:
    return [key for batch in batches for key in batch["keys"]]


def write_tar(path: Path, samples: list[dict[str, Any]]) -> None:
    with open(path, "wb") as f, wds.TarWriter(f, encoder=False) as writer:
        for sample in samples:
            writer.write(sample)


def png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), colour).save(buf, format="PNG")
    return buf.getvalue()


# --- expand_urls ----------------------------------------------------------------------------


def test_expand_directory_brace_file_and_join(demo_dir: Path) -> None:
    shards = [str(demo_dir / f"shard-{i:06d}.tar") for i in range(5)]
    assert expand_urls(str(demo_dir)) == shards
    assert expand_urls(f"{demo_dir}/shard-{{000001..000003}}.tar") == shards[1:4]
    assert expand_urls(shards[4]) == [shards[4]]
    joined = f"{shards[4]}::{demo_dir}/shard-{{000000..000001}}.tar"
    assert expand_urls(joined) == [shards[4], shards[0], shards[1]]
    # The same shard named twice is read once.
    assert expand_urls(f"{demo_dir}::{shards[0]}") == shards


def test_expand_drops_missing_paths(demo_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    missing = demo_dir / "shard-000099.tar"
    with caplog.at_level(logging.WARNING, logger="patchsae.data.shards"):
        urls = expand_urls(f"{demo_dir}/shard-{{000003..000005}}.tar::{missing}")
    assert urls == [str(demo_dir / "shard-000003.tar"), str(demo_dir / "shard-000004.tar")]
    assert "shard-000005.tar" in caplog.text and "shard-000099.tar" in caplog.text


def test_expand_keeps_remote_urls(demo_dir: Path) -> None:
    urls = expand_urls(f"pipe:cat {demo_dir}/shard-000000.tar::s3://bucket/x-{{0..1}}.tar")
    assert urls == [
        f"pipe:cat {demo_dir}/shard-000000.tar",
        "s3://bucket/x-0.tar",
        "s3://bucket/x-1.tar",
    ]


def test_expand_without_readable_shard_raises(tmp_path: Path) -> None:
    spec = f"{tmp_path}/nothing-{{0..3}}.tar::{tmp_path}"
    with pytest.raises(ShardError) as info:
        expand_urls(spec)
    assert spec in str(info.value)
    assert "make-demo-data" in str(info.value)


def test_pipe_urls_are_read(demo_dir: Path) -> None:
    dataset = make_dataset(f"pipe:cat {demo_dir}/shard-000000.tar", shuffle_buffer=0)
    batches = list(read_epoch(dataset, num_workers=0))
    assert sorted(keys_of(batches)) == ALL_KEYS[:PER_SHARD]


# --- coverage and order ---------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_every_sample_once_per_epoch(demo_dir: Path, num_workers: int) -> None:
    ordered = read_epoch(make_dataset(demo_dir), num_workers)
    batches = list(ordered)
    assert Counter(keys_of(batches)) == Counter(ALL_KEYS)
    assert ordered.skipped_total == 0
    assert ordered.position()["finished"] == list(range(max(num_workers, 1)))
    for batch in batches:
        b = len(batch["keys"])
        assert 1 <= b <= BATCH
        assert batch["pixels"].shape == (b, 3, 16, 16)
        assert batch["pixels"].dtype == torch.float32
        assert batch["labels"].dtype == torch.long and batch["labels"].shape == (b,)
        assert batch["done"] is False and batch["skipped"] == 0


def test_labels_match_cls(demo_dir: Path) -> None:
    expected = {}
    for shard in demo_dir.glob("*.tar"):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".cls"):
                    expected[member.name[:-4]] = int(tar.extractfile(member).read())
    for batch in read_epoch(make_dataset(demo_dir), num_workers=0):
        assert batch["labels"].tolist() == [expected[k] for k in batch["keys"]]


def test_ranks_split_the_shards(demo_dir: Path) -> None:
    per_rank = []
    for rank in range(2):
        dataset = make_dataset(demo_dir, rank=rank, world_size=2)
        per_rank.append(keys_of(list(read_epoch(dataset, num_workers=2))))
    assert not set(per_rank[0]) & set(per_rank[1])
    assert Counter(per_rank[0] + per_rank[1]) == Counter(ALL_KEYS)
    # Both ranks agree on the epoch's shard order, which is what makes the split a partition.
    ranks = [make_dataset(demo_dir, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].shard_order(3) == ranks[1].shard_order(3)


@pytest.mark.parametrize(("shuffle_buffer", "num_workers"), [(0, 0), (16, 2)])
def test_order_depends_on_epoch_and_seed_only(
    demo_dir: Path, shuffle_buffer: int, num_workers: int
) -> None:
    def order(epoch: int, seed: int = 7) -> list[str]:
        dataset = make_dataset(demo_dir, shuffle_buffer=shuffle_buffer, seed=seed)
        return keys_of(list(read_epoch(dataset, num_workers=num_workers, epoch=epoch)))

    first = order(0)
    assert order(0) == first
    assert order(1) != first
    assert order(0, seed=8) != first
    assert sorted(order(1)) == sorted(first) == ALL_KEYS


def test_no_shuffle_reads_in_shard_order(demo_dir: Path) -> None:
    dataset = make_dataset(demo_dir, shuffle_shards=False, shuffle_buffer=0)
    assert keys_of(list(read_epoch(dataset, num_workers=0))) == ALL_KEYS


# --- broken data ----------------------------------------------------------------------------


def test_corrupt_image_and_missing_label_are_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    samples = [{"__key__": f"good{i}", "png": png((i * 20, 0, 0)), "cls": b"1"} for i in range(6)]
    samples.insert(2, {"__key__": "garbage", "png": b"not a png at all", "cls": b"0"})
    samples.insert(4, {"__key__": "nolabel", "png": png((0, 0, 0))})
    samples.insert(5, {"__key__": "badlabel", "png": png((0, 0, 0)), "cls": b"cat"})
    write_tar(tmp_path / "a.tar", samples)
    dataset = make_dataset(tmp_path, shuffle_buffer=0, batch_size=4)
    with caplog.at_level(logging.WARNING, logger="patchsae.data.shards"):
        ordered = read_epoch(dataset, num_workers=0)
        batches = list(ordered)
    assert keys_of(batches) == [f"good{i}" for i in range(6)]
    assert ordered.skipped_total == 3
    assert sum(b["skipped"] for b in batches) == 3
    assert "garbage" in caplog.text and "badlabel" in caplog.text


def test_skipped_samples_are_counted_per_shard(tmp_path: Path) -> None:
    """Every skipped sample is attributed to its shard, on the batches and in the running
    per-shard total (what names the worst shards when data.max_bad_fraction stops a run)."""
    good = [{"__key__": f"g{i}", "png": png((0, 0, i)), "cls": b"1"} for i in range(4)]
    bad = [{"__key__": f"b{i}", "png": b"junk", "cls": b"0"} for i in range(3)]
    write_tar(tmp_path / "a.tar", good[:2] + bad[:1])
    write_tar(tmp_path / "b.tar", bad[1:] + good[2:])
    dataset = make_dataset(tmp_path, shuffle_shards=False, shuffle_buffer=0, batch_size=2)
    ordered = read_epoch(dataset, num_workers=0)
    batches = list(ordered)
    a, b = (str(tmp_path / name) for name in ("a.tar", "b.tar"))
    assert all(sum(x["skipped_shards"].values()) == x["skipped"] for x in batches)
    assert dict(ordered.skipped_by_shard) == {a: 1, b: 2}


def test_batch_without_any_good_sample(tmp_path: Path) -> None:
    bad = [{"__key__": f"bad{i}", "png": b"junk", "cls": b"0"} for i in range(3)]
    good = [{"__key__": f"good{i}", "png": png((0, 99, 0)), "cls": b"2"} for i in range(3)]
    write_tar(tmp_path / "a.tar", bad[:2] + good[:2] + bad[2:] + good[2:])
    dataset = make_dataset(tmp_path, shuffle_buffer=0, batch_size=2)
    batches = list(read_epoch(dataset, num_workers=0))
    # Batch 0 fails entirely before any pixel shape is known: it is dropped and its count
    # rides on batch 1. Batch 2 holds one bad and one good sample.
    assert [b["index"] for b in batches] == [1, 2]
    assert [b["skipped"] for b in batches] == [2, 1]
    assert [b["keys"] for b in batches] == [["good0", "good1"], ["good2"]]


def truncate_inside_member(shard: Path, name: str) -> None:
    """Cut ``shard`` in the middle of the data of its member ``name``."""
    with tarfile.open(shard) as tar:
        member = tar.getmember(name)
    with open(shard, "r+b") as f:
        f.truncate(member.offset_data + member.size // 2)


@pytest.fixture
def damaged_dir(demo_dir: Path, tmp_path: Path) -> Path:
    """The demo shards with shard 2 cut inside the png of its 8th sample."""
    out = tmp_path / "damaged"
    shutil.copytree(demo_dir, out)
    truncate_inside_member(out / "shard-000002.tar", "000047.png")
    return out


def test_truncated_tar_is_skipped_and_counted(
    damaged_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="patchsae.data.shards"):
        ordered = read_epoch(make_dataset(damaged_dir), num_workers=0)
        keys = keys_of(list(ordered))
    lost = {f"{i:06d}" for i in range(40 + 7, 60)}
    assert Counter(keys) == Counter(k for k in ALL_KEYS if k not in lost)
    assert ordered.skipped_total == 1
    assert "shard-000002.tar" in caplog.text


def test_broken_shards_never_fatal_with_workers(demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "broken"
    shutil.copytree(demo_dir, out)
    with open(out / "shard-000001.tar", "r+b") as f:  # cut anywhere: header or data
        f.truncate((out / "shard-000001.tar").stat().st_size // 2 + 123)
    (out / "shard-000003.tar").write_bytes(b"this is not a tar file" * 40)
    ordered = read_epoch(make_dataset(out), num_workers=2)
    keys = keys_of(list(ordered))
    intact = [k for k in ALL_KEYS if not ("000020" <= k < "000040" or "000060" <= k < "000080")]
    assert set(intact) <= set(keys)
    assert len(keys) == len(set(keys))
    assert ordered.skipped_total >= 1


# --- resume ---------------------------------------------------------------------------------


def read_with_positions(urls: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """An uninterrupted epoch: the batches, position() after each and at the end (one more
    than batches), and the skipped total."""
    ordered = read_epoch(make_dataset(urls), num_workers=2)
    batches, positions = [], []
    for batch in ordered:
        batches.append(batch)
        positions.append(ordered.position())
    positions.append(ordered.position())
    return batches, positions, ordered.skipped_total


def interrupted_read(urls: Path, k: int) -> tuple[list[dict[str, Any]], dict[str, Any], int]:
    """Read ``k`` batches, then resume from a JSON round trip of the position and read the rest."""
    first = read_epoch(make_dataset(urls), num_workers=2)
    head = [next(first) for _ in range(k)]
    position = json.loads(json.dumps(first.position()))  # as a checkpoint would store it

    dataset = make_dataset(urls)
    dataset.set_position(0, skip=position["consumed"], finished=position["finished"])
    loader = DataLoader(dataset, batch_size=None, num_workers=2)
    second = OrderedBatches.from_position(loader, 2, position)
    tail = list(second)
    return head + tail, second.position(), first.skipped_total + second.skipped_total


def assert_same_batches(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert [b["keys"] for b in got] == [b["keys"] for b in want]
    assert [(b["worker"], b["index"], b["skipped"]) for b in got] == [
        (b["worker"], b["index"], b["skipped"]) for b in want
    ]
    assert torch.equal(
        torch.cat([b["pixels"] for b in got]), torch.cat([b["pixels"] for b in want])
    )
    assert torch.equal(
        torch.cat([b["labels"] for b in got]), torch.cat([b["labels"] for b in want])
    )


@pytest.mark.parametrize("stop", ["odd", "next_finished", "after_finish"])
def test_resume_reproduces_the_epoch(demo_dir: Path, stop: str) -> None:
    full, positions, skipped = read_with_positions(demo_dir)
    assert len(full) == 13  # 60 images / 8 -> 8 batches, 40 images -> 5 batches
    if stop == "odd":
        k = 3
    elif stop == "next_finished":
        # The worker next in line has sent everything but its sentinel is not yet seen.
        k = next(i + 1 for i, p in enumerate(positions) if p["consumed"].get(p["next_worker"]) == 5)
        assert not positions[k - 1]["finished"]
    else:
        k = next(i + 1 for i, p in enumerate(positions) if p["finished"])
        assert k < len(full)
    got, final_position, got_skipped = interrupted_read(demo_dir, k)
    assert_same_batches(got, full)
    assert got_skipped == skipped
    assert json.loads(json.dumps(final_position)) == json.loads(json.dumps(positions[-1]))


def test_resume_keeps_skipped_counts(damaged_dir: Path) -> None:
    full, _, skipped = read_with_positions(damaged_dir)
    assert skipped == 1
    got, _, got_skipped = interrupted_read(damaged_dir, 5)
    assert_same_batches(got, full)
    assert got_skipped == skipped


def test_ordered_batches_rotation_from_any_start() -> None:
    """Early batches are stashed until their worker's turn; finished workers drop out."""

    def item(worker: int, index: int, done: bool = False) -> dict[str, Any]:
        return {"worker": worker, "index": index, "done": done, "skipped": 1, "keys": []}

    arrivals = [item(0, 0), item(0, 1), item(1, 0), item(2, 0), item(1, 1, done=True)]
    arrivals += [item(2, 1), item(0, 2, done=True), item(2, 2, done=True)]
    ordered = OrderedBatches(arrivals, num_workers=3, start=1)
    got = [(b["worker"], b["index"]) for b in ordered]
    assert got == [(1, 0), (2, 0), (0, 0), (2, 1), (0, 1)]
    assert ordered.skipped_total == len(arrivals)
    assert ordered.position() == {
        "next_worker": 0,
        "finished": [0, 1, 2],
        "consumed": {0: 2, 1: 1, 2: 2},
    }


def test_ordered_batches_detects_missing_worker() -> None:
    items = [{"worker": 0, "index": 0, "done": True, "skipped": 0}]
    with pytest.raises(RuntimeError, match="num_workers"):
        list(OrderedBatches(items, num_workers=2))
