"""The synthetic demo dataset: deterministic, balanced, well-formed, and visibly class-dependent."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from patchsae.data.demo import CLASSES, COLOURS, SHAPES, TEXTURES, make_demo_data
from PIL import Image

N_IMAGES, SIZE, PER_SHARD = 96, 32, 20


def read_samples(out: Path) -> dict[str, dict[str, bytes]]:
    """All samples of all shards in ``out``: key -> {ext: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    return make_demo_data(
        out, n_images=N_IMAGES, image_size=SIZE, images_per_shard=PER_SHARD, seed=0
    )


def test_layout(demo: Path) -> None:
    names = sorted(p.name for p in demo.iterdir())
    n_shards = -(-N_IMAGES // PER_SHARD)
    assert names == ["classes.json"] + [f"shard-{i:06d}.tar" for i in range(n_shards)]
    samples = read_samples(demo)
    assert sorted(samples) == [f"{i:06d}" for i in range(N_IMAGES)]
    assert all(set(s) == {"png", "cls", "json", "txt", "mask.png"} for s in samples.values())


def test_same_seed_same_bytes_other_seed_differs(demo: Path, tmp_path: Path) -> None:
    again = make_demo_data(
        tmp_path / "a", n_images=N_IMAGES, image_size=SIZE, images_per_shard=PER_SHARD, seed=0
    )
    other = make_demo_data(
        tmp_path / "b", n_images=N_IMAGES, image_size=SIZE, images_per_shard=PER_SHARD, seed=1
    )
    for shard in sorted(demo.glob("shard-*.tar")):
        assert (again / shard.name).read_bytes() == shard.read_bytes()
        assert (other / shard.name).read_bytes() != shard.read_bytes()


def test_classes_and_labels_agree(demo: Path) -> None:
    classes = json.loads((demo / "classes.json").read_text())
    assert len(classes) >= 8
    assert len(set(classes)) == len(classes)
    for sample in read_samples(demo).values():
        label = int(sample["cls"])
        meta = json.loads(sample["json"])
        assert meta["label"] == label
        assert meta["class"] == classes[label]
        assert classes[label] == f"{meta['colour']} {meta['texture']} {meta['shape']}"


def test_classes_differ_in_at_least_two_attributes() -> None:
    for a, b in itertools.combinations(CLASSES, 2):
        same = (a.shape == b.shape) + (a.colour == b.colour) + (a.texture == b.texture)
        assert same <= 1, (a, b)


def test_images_decode_to_requested_size(demo: Path) -> None:
    for sample in read_samples(demo).values():
        image = Image.open(io.BytesIO(sample["png"]))
        assert image.format == "PNG"
        assert image.mode == "RGB"
        assert image.size == (SIZE, SIZE)


def test_classes_are_balanced(demo: Path) -> None:
    counts = Counter(int(s["cls"]) for s in read_samples(demo).values())
    assert set(counts) == set(range(len(CLASSES)))
    assert max(counts.values()) - min(counts.values()) <= 1


def test_classes_look_different(demo: Path) -> None:
    """The mean colour near the shape's centre separates every pair of classes."""
    patches: dict[int, list[np.ndarray]] = {}
    for sample in read_samples(demo).values():
        meta = json.loads(sample["json"])
        pixels = np.asarray(Image.open(io.BytesIO(sample["png"])), dtype=np.float64)
        cx, cy = (round(p * SIZE) for p in meta["position"])
        r = max(1, round(meta["scale"] * SIZE * 0.4))
        patch = pixels[max(cy - r, 0) : cy + r + 1, max(cx - r, 0) : cx + r + 1]
        patches.setdefault(meta["label"], []).append(patch.reshape(-1, 3).mean(axis=0))
    means = {label: np.mean(p, axis=0) for label, p in patches.items()}
    for a, b in itertools.combinations(sorted(means), 2):
        distance = np.linalg.norm(means[a] - means[b])
        assert distance > 40, (CLASSES[a].name, CLASSES[b].name, distance)


def test_rewrite_is_atomic_and_drops_stale_shards(tmp_path: Path) -> None:
    out = make_demo_data(tmp_path, n_images=30, image_size=16, images_per_shard=10)
    assert len(list(out.glob("shard-*.tar"))) == 3
    # A smaller dataset in the same place must not leave the third shard behind.
    make_demo_data(tmp_path, n_images=15, image_size=16, images_per_shard=10)
    assert sorted(p.name for p in out.iterdir()) == [
        "classes.json",
        "shard-000000.tar",
        "shard-000001.tar",
    ]
    assert sorted(read_samples(out)) == [f"{i:06d}" for i in range(15)]


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_images"):
        make_demo_data(tmp_path, n_images=0)


def test_captions_name_the_attributes_and_the_background(demo: Path) -> None:
    words = {"plain": "plain", "gradient": "gradient", "clouds": "cloudy"}
    for sample in read_samples(demo).values():
        meta = json.loads(sample["json"])
        want = f"a {meta['class']} on a {words[meta['background']]} background"
        assert sample["txt"].decode() == want


def test_masks_cover_the_object(demo: Path) -> None:
    """The mask is binary, as large as the drawn shape, centred on it, and the image differs
    from its background across the mask's edge."""
    for sample in read_samples(demo).values():
        meta = json.loads(sample["json"])
        mask = np.asarray(Image.open(io.BytesIO(sample["mask.png"])))
        assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) <= {0, 255}
        on = mask == 255
        radius = meta["scale"] * SIZE
        assert 0.2 * radius**2 < on.sum() < 4.0 * radius**2
        ys, xs = np.nonzero(on)
        centre = np.array([xs.mean(), ys.mean()]) / SIZE
        assert np.abs(centre - np.array(meta["position"])).max() < 0.12
        pixels = np.asarray(Image.open(io.BytesIO(sample["png"])), dtype=np.float64)
        inside, outside = pixels[on].mean(axis=0), pixels[~on].mean(axis=0)
        assert np.linalg.norm(inside - outside) > 10


def test_attribute_split_varies_attributes_independently(tmp_path: Path) -> None:
    out = make_demo_data(tmp_path / "a", n_images=400, image_size=16, seed=3, split="attributes")
    metas = [json.loads(s["json"]) for s in read_samples(out).values()]
    assert {m["shape"] for m in metas} == set(SHAPES)
    assert {m["colour"] for m in metas} == set(COLOURS)
    assert {m["texture"] for m in metas} == set(TEXTURES)
    triples = Counter((m["shape"], m["colour"], m["texture"]) for m in metas)
    assert len(triples) > 150  # of 256: far beyond the 8 class triples
    names = [c.name for c in CLASSES]
    for sample in read_samples(out).values():
        meta, label = json.loads(sample["json"]), int(sample["cls"])
        name = f"{meta['colour']} {meta['texture']} {meta['shape']}"
        assert label == (names.index(name) if name in names else -1) == meta["label"]
    again = make_demo_data(tmp_path / "b", n_images=400, image_size=16, seed=3, split="attributes")
    for shard in sorted(out.glob("shard-*.tar")):
        assert (again / shard.name).read_bytes() == shard.read_bytes()
    with pytest.raises(ValueError, match="unknown demo split 'shapes'"):
        make_demo_data(tmp_path / "c", n_images=8, split="shapes")


def test_sketch_style_keeps_shape_and_texture_and_drops_colour(tmp_path: Path) -> None:
    """Sketches: the same classes and masks, greyscale (no colour cue), a dark outline on the
    mask's edge and light paper around it; deterministic like the photos."""
    out = make_demo_data(tmp_path / "s", n_images=24, image_size=64, seed=7, style="sketch")
    samples = read_samples(out)
    assert len(samples) == 24
    for sample in samples.values():
        meta = json.loads(sample["json"])
        assert meta["style"] == "sketch" and meta["class"] == CLASSES[meta["label"]].name
        rgb = np.asarray(Image.open(io.BytesIO(sample["png"])), dtype=np.float64)
        on = np.asarray(Image.open(io.BytesIO(sample["mask.png"]))) == 255
        assert (rgb.max(axis=2) - rgb.min(axis=2)).max() <= 25  # grey, up to the noise
        grey = rgb.mean(axis=2)
        edge = on & ~np.pad(on, 1)[2:, 1:-1] | on & ~np.pad(on, 1)[:-2, 1:-1]
        assert grey[~on].mean() > 200 and grey[edge].mean() < 110
    again = make_demo_data(tmp_path / "t", n_images=24, image_size=64, seed=7, style="sketch")
    for shard in sorted(out.glob("shard-*.tar")):
        assert (again / shard.name).read_bytes() == shard.read_bytes()
    with pytest.raises(ValueError, match="unknown demo style 'ink'"):
        make_demo_data(tmp_path / "u", n_images=8, style="ink")
