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
