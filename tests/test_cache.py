"""The activation cache: written by 1 or 2 ranks, read by 1 or 2, resumed, refused when it does
not match, and training from it equal to training from the shards it was written from."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from patchsae.data.cache import ActivationCache, CachedStream, CacheError, differences
from patchsae.data.mixer import TokenMixer
from patchsae.trainer.tracking import read_metrics
from safetensors.numpy import save_file

from tests.helpers import DEMO, python_cmd, run_cli, run_train, small_overrides

# The images of demo_shards (240 in 6 shards) in order: one reader batch never spans an epoch.
READ = {"data.urls": None, "data.num_workers": 1, "data.images_per_batch": 16}
ORDERED = {"data.shuffle_shards": "false", "data.shuffle_buffer": 0, "tracking.enabled": "false"}


def cache_cmd(shards: Path, out: Path, *extra: str, nproc: int = 1) -> list[str]:
    cmd = [*python_cmd(nproc), "-m", "patchsae.launchers.cli", "cache", "--config", str(DEMO)]
    for key, value in {**READ, "data.urls": shards, "model.pretrained": "null"}.items():
        cmd += ["--set", f"{key}={value}"]
    return [*cmd, "--out", str(out), *extra]


def write_cache(shards: Path, out: Path, *extra: str, nproc: int = 1) -> Path:
    proc = run_cli(cache_cmd(shards, out, *extra, nproc=nproc), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def row_counts(rows_ND: np.ndarray | torch.Tensor) -> Counter[bytes]:
    rows = np.asarray(rows_ND, dtype=np.float32)
    return Counter(row.tobytes() for row in rows)


def epoch_rows(cache: ActivationCache, world: int, epoch: int = 0, **shuffle: bool) -> list:
    """Each rank's tokens of one epoch, read as the trainer's stream reads them."""
    out = []
    for rank in range(world):
        stream = CachedStream(
            cache,
            TokenMixer(1024, seed=0),
            units_per_read=16,
            shuffle_shards=shuffle.get("shards", True),
            shuffle_units=shuffle.get("units", True),
            seed=3,
            rank=rank,
            world_size=world,
        )
        out.append(stream.read_units(*stream.epoch_order(epoch)))
    return out


@pytest.fixture(scope="module")
def one_rank_cache(tmp_path_factory, demo_shards) -> Path:
    out = tmp_path_factory.mktemp("cache") / "one"
    return write_cache(demo_shards, out, "--dtype", "float32", "--shard-images", "32")


def test_the_cache_holds_every_image_once_with_its_key(one_rank_cache, demo_shards):
    meta = json.loads((one_rank_cache / "cache.json").read_text())
    assert meta["images"] == 240 and meta["tokens_per_image"] == 65 and meta["width"] == 128
    assert meta["token_count"] == 240 * 65 and meta["skipped"] == 0
    assert meta["identity"]["layer"] == 2 and meta["identity"]["tokens"] == "all"
    assert not (one_rank_cache / ".progress").exists()
    keys = []
    for entry in meta["shards"]:
        rows = np.load(one_rank_cache / entry["file"], mmap_mode="r")
        index = json.loads((one_rank_cache / entry["index"]).read_text())
        assert rows.shape == (entry["images"] * 65, 128) and rows.dtype == np.float32
        assert len(index["keys"]) == len(index["labels"]) == entry["images"]
        keys += index["keys"]
    assert len(keys) == len(set(keys)) == 240
    # Cached values are the CLIP's: the first image's tokens, recomputed.
    from patchsae.data.activations import ActivationSource, load_visual
    from patchsae.data.shards import decode_image, iter_samples

    visual, preprocess = load_visual("patchsae-demo-vit", None, cache_dir=None, init_seed=0)
    first = json.loads((one_rank_cache / meta["shards"][0]["index"]).read_text())
    sample = next(s for url in first["urls"][:1] for s in iter_samples(url))
    assert sample["__key__"] == first["keys"][0]
    tokens = ActivationSource(visual, 2)(preprocess(decode_image(sample))[None])
    cached = np.load(one_rank_cache / meta["shards"][0]["file"])[:65]
    assert np.allclose(cached, tokens.numpy(), atol=1e-5)


def test_two_ranks_write_it_and_one_or_two_read_every_token_once_per_epoch(
    tmp_path, demo_shards, one_rank_cache
):
    two = write_cache(demo_shards, tmp_path / "two", "--dtype", "float32", nproc=2)
    meta = json.loads((two / "cache.json").read_text())
    assert meta["world_size"] == 2 and meta["images"] == 240
    assert {entry["file"][:4] for entry in meta["shards"]} == {"r000", "r001"}
    reference = ActivationCache.open(one_rank_cache)
    expected = row_counts(np.concatenate([s.rows_ND for s in reference.shards]))
    cache = ActivationCache.open(two)
    assert row_counts(np.concatenate([s.rows_ND for s in cache.shards])) == expected
    for world in (1, 2):
        parts = epoch_rows(cache, world)
        assert row_counts(torch.cat(parts)) == expected, f"{world} ranks"
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 65  # one image
    # Each epoch is another order of the same tokens.
    first, second = epoch_rows(cache, 1, 0)[0], epoch_rows(cache, 1, 1)[0]
    assert not torch.equal(first, second) and row_counts(second) == expected

    # Two ranks train from it.
    out = tmp_path / "run"
    extra = {"data.source": "cache", "data.cache": two, "train.total_tokens": 4 * 1024}
    run_train(small_overrides(demo_shards, out, **extra), nproc=2)
    assert [step for step, _ in read_metrics(out)["loss/total"]] == [1, 2, 3, 4]


def test_training_from_the_cache_equals_training_from_the_shards(
    tmp_path, demo_shards, one_rank_cache
):
    """Same tokens in the same order (no shuffle, fp32): the same losses, step by step; and a
    run resumed from a checkpoint continues exactly."""
    shards, cached, resumed = tmp_path / "shards", tmp_path / "cached", tmp_path / "resumed"
    run_train(small_overrides(demo_shards, shards, **ORDERED))
    from_cache = {**ORDERED, "data.source": "cache", "data.cache": one_rank_cache}
    run_train(small_overrides(demo_shards, cached, **from_cache))
    a, b = read_metrics(shards)["loss/total"], read_metrics(cached)["loss/total"]
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 9))
    for (step, x), (_, y) in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-6 * abs(x), (step, x, y)

    # Resume from the step-4 checkpoint of the cached run into a new folder: steps 5-8 again.
    step4 = cached / "checkpoints" / "step_00000004"
    run_train(small_overrides(demo_shards, resumed, **from_cache), resume=str(step4))
    c = dict(read_metrics(resumed)["loss/total"])
    assert sorted(c) == [5, 6, 7, 8]
    for step, y in b[4:]:
        assert abs(c[step] - y) <= 1e-6 * abs(y), (step, c[step], y)


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("model.layer", "1", "model.layer"),
        ("model.tokens", "patches", "model.tokens"),
        ("model.init_seed", "7", "model.init_seed"),
    ],
)
def test_a_cache_of_other_activations_is_refused_naming_the_difference(
    tmp_path, demo_shards, one_rank_cache, key, value, named
):
    extra = {"data.source": "cache", "data.cache": one_rank_cache, key: value}
    proc = run_cli(
        [*python_cmd(), "-m", "patchsae.launchers.train", "--config", str(DEMO)]
        + [
            a
            for item in small_overrides(demo_shards, tmp_path / "r", **extra)
            for a in ("--set", item)
        ]
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert named in proc.stderr and "written from other activations" in proc.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_weights_compare_by_content():
    base = {"model": "m", "layer": 1, "tokens": "all", "init_seed": None}
    a = base | {"pretrained": "/x/w.safetensors", "pretrained_sha256": "aa"}
    moved = base | {"pretrained": "/y/w.safetensors", "pretrained_sha256": "aa"}
    other = base | {"pretrained": "/x/w.safetensors", "pretrained_sha256": "bb"}
    assert differences(a, moved) == []  # the same file elsewhere
    assert "different file contents" in differences(a, other)[0]
    assert differences(a, base | {"pretrained": "openai", "pretrained_sha256": None})


def test_an_interrupted_cache_resumes_to_the_same_cache(tmp_path, demo_shards, one_rank_cache):
    out = tmp_path / "cut"
    args = ("--dtype", "float32", "--shard-images", "32")
    write_cache(demo_shards, out, *args, "--max-batches", "5")  # 2 shards written, 1 batch lost
    assert not (out / "cache.json").exists()
    with pytest.raises(CacheError, match="unfinished"):
        ActivationCache.open(out)
    progress = json.loads((out / ".progress" / "rank0.json").read_text())
    assert [w["images"] for w in progress["written"]] == [32, 32]
    # Other settings are refused rather than mixed into the unfinished cache.
    proc = run_cli(cache_cmd(demo_shards, out, "--dtype", "float16", "--shard-images", "32"))
    assert proc.returncode == 2 and "other settings" in proc.stderr
    write_cache(demo_shards, out, *args)
    whole, resumed = ActivationCache.open(one_rank_cache), ActivationCache.open(out)
    assert json.loads((out / "cache.json").read_text())["shards"] == whole.meta["shards"]
    for a, b in zip(whole.shards, resumed.shards, strict=True):
        assert np.array_equal(a.rows_ND, b.rows_ND)
    # A complete cache is not written over.
    proc = run_cli(cache_cmd(demo_shards, out, *args))
    assert proc.returncode == 2 and "already holds a complete cache" in proc.stderr


def test_bare_arrays_are_sources(tmp_path):
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((1000, 24)).astype(np.float32)  # 3 full blocks and a short one
    np.save(tmp_path / "acts.npy", rows)
    save_file({"acts": rows.astype(np.float16)}, str(tmp_path / "acts.safetensors"))
    bf16 = torch.from_numpy(rows).bfloat16()
    save_file({"a": bf16.view(torch.uint16).numpy()}, str(tmp_path / "raw.safetensors"))
    fix = tmp_path / "bf16.safetensors"
    from safetensors.torch import save_file as save_torch

    save_torch({"acts": bf16}, str(fix))
    np.save(tmp_path / "wide.npy", rows.astype(np.float64))
    for name, expected, held in [
        ("acts.npy", rows, torch.float32),
        ("acts.safetensors", rows.astype(np.float16).astype(np.float32), torch.float16),
        ("bf16.safetensors", bf16.float().numpy(), torch.bfloat16),
        ("wide.npy", rows, torch.float32),  # other dtypes are held as float32
    ]:
        cache = ActivationCache.open(tmp_path / name)
        assert (cache.width, cache.tokens, cache.tokens_per_image) == (24, 1000, 1)
        for world in (1, 2):
            parts = epoch_rows(cache, world)
            assert row_counts(torch.cat(parts)) == row_counts(expected), (name, world)
        stream = CachedStream(
            cache,
            TokenMixer(512, seed=0),
            units_per_read=1,
            shuffle_shards=True,
            shuffle_units=True,
            seed=0,
        )
        served = torch.cat([stream.next_batch(200) for _ in range(5)])
        assert served.dtype == torch.float32 and stream.mixer.buffer_ND.dtype == held, name
        assert set(row_counts(served)) <= set(row_counts(expected)), name
    np.save(tmp_path / "cube.npy", rows.reshape(10, 100, 24))
    for bad, message in [
        ("cube.npy", "2-D"),
        ("raw.safetensors", "F32, F16 or BF16"),
        ("missing.npy", "neither a cache folder"),
    ]:
        with pytest.raises(CacheError, match=message):
            ActivationCache.open(tmp_path / bad)


def test_a_bare_array_trains_and_needs_token_counts(tmp_path, demo_shards):
    acts = tmp_path / "acts.npy"
    np.save(acts, np.random.default_rng(1).standard_normal((6000, 128)).astype(np.float16))
    extra = {"data.source": "cache", "data.cache": acts, "model.pretrained": "missing.pt"}
    out = tmp_path / "run"
    run_train(small_overrides(demo_shards, out, **extra))  # no CLIP runs: the weights may be absent
    assert len(read_metrics(out)["loss/total"]) == 8
    with_images = extra | {"train.total_tokens": None, "train.total_images": 100}
    proc = run_cli(
        [*python_cmd(), "-m", "patchsae.launchers.train", "--config", str(DEMO)]
        + [
            a
            for i in small_overrides(demo_shards, tmp_path / "r2", **with_images)
            for a in ("--set", i)
        ]
    )
    assert proc.returncode == 2 and "train.total_tokens" in proc.stderr


@pytest.mark.parametrize("read_ahead", [0, 3])
def test_the_stream_resumes_exactly(one_rank_cache, read_ahead):
    cache = ActivationCache.open(one_rank_cache)

    def stream(ahead: int = read_ahead) -> CachedStream:
        return CachedStream(
            cache, TokenMixer(2048, seed=5), units_per_read=4, shuffle_shards=True,
            shuffle_units=True, seed=1, read_ahead=ahead,
        )  # fmt: skip

    whole = stream(ahead=0)
    reference = [whole.next_batch(512) for _ in range(80)]  # past the end of epoch 0
    assert whole.epoch >= 1
    first = stream()
    head = [first.next_batch(512) for _ in range(37)]
    state = first.state_dict()  # the reader thread has read past this position
    first.close()
    again = stream()
    again.load_state_dict(state)
    tail = [again.next_batch(512) for _ in range(43)]
    again.close()
    for i, (a, b) in enumerate(zip(reference, head + tail, strict=True)):
        assert torch.equal(a, b), i
    assert (again.epoch, again.offset, again.images_seen) == (
        whole.epoch,
        whole.offset,
        whole.images_seen,
    )


def test_a_read_error_in_the_reader_thread_reaches_the_training_thread(one_rank_cache, monkeypatch):
    cache = ActivationCache.open(one_rank_cache)
    stream = CachedStream(
        cache, TokenMixer(1024, seed=0), units_per_read=4, shuffle_shards=False,
        shuffle_units=False, seed=0, read_ahead=2,
    )  # fmt: skip
    stream.next_batch(256)
    shard = type(cache.shards[0])
    calls = {"n": 0}
    real_read = shard.read

    def failing_read(self, units):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(f"Input/output error reading {self.path}")
        return real_read(self, units)

    monkeypatch.setattr(shard, "read", failing_read)
    with pytest.raises(OSError, match="Input/output error reading .*r000-00000..npy"):
        for _ in range(20):
            stream.next_batch(256)
    assert stream._reader is not None
    thread = stream._reader._thread
    stream.close()
    assert thread is not None and not thread.is_alive()


def test_a_gpu_run_reads_the_cache_ahead_by_one_mixer_top_up(one_rank_cache, demo_shards, tmp_path):
    from patchsae.trainer.config import DistributedConfig, load_config
    from patchsae.trainer.distributed import Distributed
    from patchsae.trainer.inputs import build_stream, cache_read_ahead

    overrides = small_overrides(
        demo_shards, tmp_path, **{"data.source": "cache", "data.cache": one_rank_cache}
    )
    cfg, cache = load_config(DEMO, overrides), ActivationCache.open(one_rank_cache)
    # 2,048 tokens per top-up in reads of 16 images x 65 tokens: 2 reads, and one more.
    assert cache_read_ahead(cfg, cache, torch.device("cuda")) == 3
    assert cache_read_ahead(cfg, cache, torch.device("cpu")) == 0
    chosen = load_config(DEMO, [*overrides, "data.cache_read_ahead=5"])
    assert cache_read_ahead(chosen, cache, torch.device("cuda")) == 5
    stream = build_stream(chosen, Distributed.from_env(DistributedConfig(), "cpu"), layer=2)
    assert isinstance(stream, CachedStream) and stream.read_ahead == 5
