"""A small synthetic image dataset, written as WebDataset shards, for offline demos and tests.

Each image shows one coloured, textured shape on a random background. A class is a fixed
(shape, colour, texture) triple, and any two classes differ in at least two of the three, so
a sparse autoencoder trained on CLIP activations of these images has some real structure to
find (shape features, colour features, texture features) without downloading anything.

Two splits (``split``):

- ``classes``: every image is one of the 8 classes, labels balanced (SAE training, the
  analyses, zero-shot evaluation; another seed gives a held-out set).
- ``attributes``: shape, colour and texture drawn independently (8 x 8 x 4 combinations), so
  that a CLIP trained on the captions learns attributes rather than 8 fixed triples. ``.cls`` is
  the class index where the triple is one of the classes, else -1.

Two styles (``style``), for comparing a base and an adapted model on a shifted domain:

- ``photo``: the shape in its colour and texture on a coloured background (everything above).
- ``sketch``: the same shapes, positions and textures as a greyscale pencil drawing: a dark
  outline, the texture in grey inside it, light paper around. Colour, one of the three cues of
  every class name, is gone; shape and texture remain, so a model can still learn to name the
  classes (the demo's adapted CLIP is fine-tuned on sketches).

Layout of ``out``::

    shard-000000.tar   samples (keys "000000", "000001", ...):
                         {key}.png       the RGB image
                         {key}.cls       the label (see above)
                         {key}.json      attributes, position, scale, rotation, background
                         {key}.txt       a caption, "a red striped circle on a cloudy background"
                         {key}.mask.png  the object's true segmentation mask (L, 0 or 255)
    shard-000001.tar
    ...
    classes.json       list of class names; index = label. Written last: its presence means
                       the dataset is complete.

Everything is drawn from one ``numpy.random.Generator(seed)``, PNG encoding is deterministic and
tar headers carry a fixed mtime, so the same arguments give byte-identical shards.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw


@dataclass(frozen=True)
class DemoClass:
    """One class of the demo dataset: a fixed (shape, colour, texture) triple."""

    shape: str
    colour: str
    texture: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.texture} {self.shape}"


# Each class has its own shape and its own colour, so any two classes differ in at least two of
# the three attributes; textures repeat (4 textures over 8 classes) but never with the same
# shape or colour.
CLASSES: tuple[DemoClass, ...] = (
    DemoClass("circle", "red", "striped"),
    DemoClass("square", "blue", "dotted"),
    DemoClass("triangle", "green", "solid"),
    DemoClass("star", "yellow", "checkered"),
    DemoClass("hexagon", "purple", "striped"),
    DemoClass("diamond", "orange", "dotted"),
    DemoClass("cross", "cyan", "solid"),
    DemoClass("pentagon", "pink", "checkered"),
)

SHAPES: tuple[str, ...] = tuple(c.shape for c in CLASSES)
TEXTURES: tuple[str, ...] = ("striped", "dotted", "solid", "checkered")
SPLITS = ("classes", "attributes")
STYLES = ("photo", "sketch")
BACKGROUND_WORDS = {"plain": "plain", "gradient": "gradient", "clouds": "cloudy"}
"""How a caption names each background kind."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "blue": (35, 75, 215),
    "green": (35, 165, 55),
    "yellow": (235, 210, 35),
    "purple": (130, 50, 185),
    "orange": (245, 135, 25),
    "cyan": (35, 200, 215),
    "pink": (245, 125, 185),
}

# A fixed tar header mtime: with the wall clock here, two runs would differ in their headers.
_TAR_MTIME = 1_700_000_000
_SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")


def _polygon(shape: str) -> np.ndarray:
    """Vertices of ``shape`` on the unit circle (roughly), as an array [n, 2] of (x, y)."""

    def regular(n: int, phase: float = -math.pi / 2) -> np.ndarray:
        t = phase + 2 * math.pi * np.arange(n) / n
        return np.stack([np.cos(t), np.sin(t)], axis=1)

    if shape == "circle":
        return regular(40)
    if shape == "square":
        return regular(4, phase=math.pi / 4)
    if shape == "triangle":
        return regular(3) * 1.1
    if shape == "pentagon":
        return regular(5)
    if shape == "hexagon":
        return regular(6, phase=0.0)
    if shape == "diamond":
        # A narrow rhombus, so that it stays distinguishable from a rotated square.
        return regular(4) * np.array([0.6, 1.0])
    if shape == "star":
        pts = regular(10)
        return pts * np.where(np.arange(10) % 2 == 0, 1.0, 0.45)[:, None]
    if shape == "cross":
        a, b = 0.32, 1.0
        return np.array(
            [
                (-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a),
                (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a),
            ]
        )  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator, size: int) -> tuple[str, np.ndarray]:
    """A random background (plain, gradient or clouds) as float array [size, size, 3] in 0..255."""
    kind = ("plain", "gradient", "clouds")[int(rng.integers(3))]

    # Pull background colours half-way to grey, so that the shape's colour stays the most
    # saturated thing in the picture without making backgrounds monotonous.
    def muted() -> np.ndarray:
        return 0.5 * rng.uniform(0, 255, 3) + 0.5 * 128

    if kind == "plain":
        return kind, np.broadcast_to(muted(), (size, size, 3)).copy()
    if kind == "gradient":
        c0, c1 = muted(), muted()
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
        t = (np.cos(angle) * xx + np.sin(angle) * yy) / (abs(np.cos(angle)) + abs(np.sin(angle)))
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
        return kind, c0 + (c1 - c0) * t[..., None]
    # Clouds: a muted base colour plus smooth low-frequency variation, like out-of-focus
    # natural backgrounds. (Per-pixel white noise would be incompressible variance that no
    # sparse code can explain, which real photographs do not have at that scale.)
    strength = rng.uniform(20, 50)
    coarse = rng.normal(0, strength, (4, 4, 3))
    channels = [
        np.asarray(
            Image.fromarray(coarse[..., c].astype(np.float32), mode="F").resize(
                (size, size), Image.Resampling.BICUBIC
            )
        )
        for c in range(3)
    ]
    return kind, np.clip(muted() + np.stack(channels, axis=-1), 0, 255)


def _texture(
    texture: str, colour: np.ndarray, u: np.ndarray, v: np.ndarray, period: float
) -> np.ndarray:
    """Paint ``texture`` in ``colour`` at shape-frame coordinates (u, v); float [H, W, 3]."""
    dark = colour * 0.35
    if texture == "solid":
        # Mild shading so that "solid" is not perfectly flat.
        shade = 1.0 + 0.08 * np.tanh(u / period)
        return np.clip(colour * shade[..., None], 0, 255)
    if texture == "striped":
        on = np.floor(u / (period / 2)) % 2 == 0
        return np.where(on[..., None], colour, dark)
    if texture == "checkered":
        on = (np.floor(u / (period / 2)) + np.floor(v / (period / 2))) % 2 == 0
        return np.where(on[..., None], colour, dark)
    if texture == "dotted":
        du = (u % period) - period / 2
        dv = (v % period) - period / 2
        dot = du * du + dv * dv < (0.28 * period) ** 2
        return np.where(dot[..., None], np.array([250.0, 250.0, 250.0]), colour)
    raise ValueError(f"unknown texture {texture!r}")


def caption(meta: dict) -> str:
    """The caption of a sample, from its metadata."""
    background = BACKGROUND_WORDS[meta["background"]]
    return f"a {meta['colour']} {meta['texture']} {meta['shape']} on a {background} background"


def _paper(rng: np.random.Generator, size: int) -> np.ndarray:
    """A sketch's background: light, slightly uneven grey paper, float [size, size, 3]."""
    tone = rng.uniform(225, 250)
    coarse = rng.normal(0, 6, (4, 4)).astype(np.float32)
    smooth = np.asarray(
        Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    )
    return np.broadcast_to((tone + smooth)[..., None], (size, size, 3)).copy()


def _draw_sample(
    rng: np.random.Generator, cls: DemoClass, label: int, size: int, style: str = "photo"
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Draw one image of ``cls``; returns (uint8 RGB [size, size, 3], uint8 mask [size, size]
    with 255 on the object, metadata)."""
    if style == "sketch":
        bg_kind, image = "plain", _paper(rng, size)
    else:
        bg_kind, image = _background(rng, size)

    # Shape radius as a fraction of the image side: objects span 5 to 7 patches of the demo ViT, so
    # most of an object's patches lie inside it rather than on its outline.
    scale = float(rng.uniform(0.30, 0.45))
    radius = scale * size
    margin = radius * 0.9
    cx = float(rng.uniform(margin, size - margin))
    cy = float(rng.uniform(margin, size - margin))
    angle = float(rng.uniform(-0.35, 0.35))  # radians: "rotation-ish" jitter, not full turns
    aspect = float(rng.uniform(0.85, 1.15))
    colour = np.clip(np.array(COLOURS[cls.colour], dtype=np.float64) + rng.normal(0, 10, 3), 0, 255)

    # Shape mask: rotate and stretch the unit polygon, rasterise it with PIL.
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    pts = (_polygon(cls.shape) * np.array([aspect, 1.0 / aspect])) @ rot.T * radius
    pts += np.array([cx, cy])
    mask_img = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask_img).polygon([(float(x), float(y)) for x, y in pts], fill=255)
    mask = np.asarray(mask_img, dtype=np.float64)[..., None] / 255.0

    # Texture coordinates live in the shape's own (rotated) frame, so the pattern turns with it.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dx, dy = xx - cx, yy - cy
    u = math.cos(angle) * dx + math.sin(angle) * dy
    v = -math.sin(angle) * dx + math.cos(angle) * dy
    # A texture period of 4 px at 64 px, half the 8 px patch: every patch of an object shows the
    # same texture statistics, so a patch's features name the object rather than the phase of a
    # stripe under it (coarser textures split each object into per-phase SAE latents).
    period = max(2.0, 4.0 * size / 64)
    if style == "sketch":  # the texture in grey, shaded like pencil, under a dark outline
        fg = _texture(cls.texture, np.full(3, rng.uniform(150, 175)), u, v, period)
    else:
        fg = _texture(cls.texture, colour, u, v, period)

    image = image * (1 - mask) + fg * mask
    if style == "sketch":
        outline = Image.new("L", (size, size), 0)
        width = max(1, round(size / 32))
        ImageDraw.Draw(outline).line(
            [(float(x), float(y)) for x, y in np.vstack([pts, pts[:1]])], fill=255, width=width
        )
        line = np.asarray(outline, dtype=np.float64)[..., None] / 255.0
        image = image * (1 - line) + rng.uniform(30, 60) * line
    # A little sensor-like noise everywhere, so no two images share exact pixel values.
    image = image + rng.normal(0, 3, image.shape)
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)

    meta = {
        "label": label,
        "class": cls.name if label >= 0 else None,
        "shape": cls.shape,
        "colour": cls.colour,
        "texture": cls.texture,
        "position": [round(cx / size, 4), round(cy / size, 4)],
        "scale": round(scale, 4),
        "rotation": round(angle, 4),
        "background": bg_kind,
        "style": style,
    }
    return pixels, np.asarray(mask_img, dtype=np.uint8), meta


def _png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB" if pixels.ndim == 3 else "L").save(buf, format="PNG")
    return buf.getvalue()


def _attributes(rng: np.random.Generator, split: str, label: int) -> tuple[DemoClass, int]:
    """The (shape, colour, texture) of the next image and its label."""
    if split == "classes":
        return CLASSES[label], label
    cls = DemoClass(
        SHAPES[int(rng.integers(len(SHAPES)))],
        tuple(COLOURS)[int(rng.integers(len(COLOURS)))],
        TEXTURES[int(rng.integers(len(TEXTURES)))],
    )
    return cls, CLASSES.index(cls) if cls in CLASSES else -1


def make_demo_data(
    out: str | Path,
    n_images: int = 2000,
    image_size: int = 64,
    images_per_shard: int = 250,
    seed: int = 0,
    split: str = "classes",
    style: str = "photo",
) -> Path:
    """Write the demo dataset to ``out`` and return ``out`` as a Path.

    ``split="classes"``: labels are balanced exactly (``n_images // len(CLASSES)`` per class,
    the remainder spread over the first classes) and shuffled. ``split="attributes"``: every
    attribute drawn independently and uniformly (see the module docstring). ``style``: ``photo``
    or ``sketch`` (see the module docstring). Shards are written to ``*.tar.tmp`` and renamed into
    place, ``classes.json`` is removed first and written last, and shards left over from an
    earlier, larger run (``shard-NNNNNN.tar`` beyond the new count) are deleted, so a reader
    never mixes two generations.
    """
    if n_images < 1 or image_size < 8 or images_per_shard < 1:
        raise ValueError(
            "make_demo_data needs n_images >= 1, image_size >= 8 and images_per_shard >= 1; got "
            f"n_images={n_images}, image_size={image_size}, images_per_shard={images_per_shard}"
        )
    if split not in SPLITS:
        raise ValueError(f"unknown demo split {split!r}; use one of {list(SPLITS)}")
    if style not in STYLES:
        raise ValueError(f"unknown demo style {style!r}; use one of {list(STYLES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes_path = out / "classes.json"
    # Removing the completion marker first means an interrupted run cannot look finished.
    classes_path.unlink(missing_ok=True)

    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n_images) % len(CLASSES))
    n_shards = math.ceil(n_images / images_per_shard)

    for shard in range(n_shards):
        final = out / f"shard-{shard:06d}.tar"
        tmp = final.with_name(final.name + ".tmp")
        with open(tmp, "wb") as f:
            writer = wds.TarWriter(f, encoder=False, mtime=_TAR_MTIME)
            start = shard * images_per_shard
            for index in range(start, min(start + images_per_shard, n_images)):
                cls, label = _attributes(rng, split, int(labels[index]))
                pixels, mask, meta = _draw_sample(rng, cls, label, image_size, style)
                writer.write(
                    {
                        "__key__": f"{index:06d}",
                        "png": _png_bytes(pixels),
                        "cls": str(label).encode(),
                        "json": json.dumps(meta, sort_keys=True).encode(),
                        "txt": caption(meta).encode(),
                        "mask.png": _png_bytes(mask),
                    }
                )
            writer.close()
        os.replace(tmp, final)

    for stale in out.iterdir():
        match = _SHARD_RE.match(stale.name)
        if match and int(match.group(1)) >= n_shards:
            stale.unlink()

    tmp = classes_path.with_name(classes_path.name + ".tmp")
    tmp.write_text(json.dumps([c.name for c in CLASSES], indent=1) + "\n")
    os.replace(tmp, classes_path)
    return out
