"""The token mixer draws each batch from many images and resumes exactly."""

from __future__ import annotations

import itertools

import pytest
import torch
from patchsae.data.mixer import TokenMixer


def _images(tokens_per_image=10, d=3):
    """Image i's tokens all carry i in column 0."""
    for i in itertools.count():
        t = torch.randn(tokens_per_image, d)
        t[:, 0] = i
        yield t


def test_batches_mix_many_images_and_lose_no_token():
    source = _images()
    mixer = TokenMixer(capacity=400, seed=0)
    batches = [mixer.next_batch(32, lambda: next(source)) for _ in range(30)]
    owners = [b[:, 0].long() for b in batches]
    # A batch straight from the stream would hold ~4 images; the mixer spreads it over many.
    assert min(len(o.unique()) for o in owners) >= 20
    # Every token is served at most once.
    seen = torch.cat(batches)
    assert len(torch.unique(seen, dim=0)) == len(seen)


class _Source:
    """Deterministic images: image i's tokens are rows (i, j, i * j)."""

    def __init__(self, start: int = 0) -> None:
        self.next_image = start

    def __call__(self) -> torch.Tensor:
        i, self.next_image = self.next_image, self.next_image + 1
        j = torch.arange(10.0)
        return torch.stack([torch.full_like(j, i), j, i * j], dim=1)


def test_state_round_trip_gives_same_sequence():
    src = _Source()
    a = TokenMixer(200, seed=3)
    for _ in range(7):
        a.next_batch(16, src)
    state, position = a.state_dict(), src.next_image
    rest_a = [a.next_batch(16, src) for _ in range(20)]
    b = TokenMixer(200, seed=99)  # the seed is overwritten by the state
    b.load_state_dict(state)
    src_b = _Source(start=position)
    rest_b = [b.next_batch(16, src_b) for _ in range(20)]
    assert all(torch.equal(x, y) for x, y in zip(rest_a, rest_b, strict=True))


def test_batch_larger_than_half_the_buffer_is_refused():
    mixer = TokenMixer(100, seed=0)
    with pytest.raises(ValueError, match="mix_buffer_tokens >= 120"):
        mixer.next_batch(60, lambda: torch.randn(10, 2))
