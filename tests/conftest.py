"""Shared test setup: offline, CPU, Triton in its interpreter, small generated data."""

from __future__ import annotations

import os

# Before anything imports triton, open_clip or mlflow.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "true"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory: pytest.TempPathFactory):
    """A small generated demo dataset (240 images of 64 px in 6 shards), shared by tests that
    only read it."""
    from patchsae.data.demo import make_demo_data

    out = tmp_path_factory.mktemp("demo-data")
    make_demo_data(out, n_images=240, image_size=64, images_per_shard=40, seed=1)
    return out


@pytest.fixture(scope="session")
def demo_clip(tmp_path_factory: pytest.TempPathFactory):
    """The demo CLIP trained as `make train` trains it (the Makefile's data sizes and seeds), once
    per session: ``(weights file, training record)``."""
    from patchsae.data.demo import make_demo_data
    from patchsae.data.demo_clip import WEIGHTS, train_demo_clip

    root = tmp_path_factory.mktemp("demo-clip")
    attributes = make_demo_data(root / "clip-data", n_images=4000, seed=1, split="attributes")
    heldout = make_demo_data(root / "heldout", n_images=400, seed=2)
    record = train_demo_clip(attributes, root / "clip", heldout=heldout)
    return root / "clip" / WEIGHTS, record
