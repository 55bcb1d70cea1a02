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


def test_batches_are_cut_from_the_seeded_shuffle_of_the_topped_up_buffer():
    mixer, source = TokenMixer(100, seed=4), _Source()
    served = [mixer.next_batch(16, source) for _ in range(12)]  # 4 top-ups, each a new shuffle
    generator, reference, buffer = torch.Generator().manual_seed(4), _Source(), torch.empty(0, 3)
    for batch in served:
        if len(buffer) < 50:
            while len(buffer) < 100:
                buffer = torch.cat([buffer, reference()])
            buffer = buffer[torch.randperm(len(buffer), generator=generator)]
        assert torch.equal(batch, buffer[-16:])
        buffer = buffer[:-16]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tokens_are_held_as_they_come_and_served_as_float32(dtype):
    wide, half = TokenMixer(100, seed=4), TokenMixer(100, seed=4)
    wide_source, half_source = _Source(), _Source()
    for _ in range(12):
        expected = wide.next_batch(16, lambda: wide_source().to(dtype).float())
        batch = half.next_batch(16, lambda: half_source().to(dtype))
        assert batch.dtype == torch.float32 and torch.equal(batch, expected)
    assert half.buffer_ND is not None and half.buffer_ND.dtype == dtype
    # The state holds the tokens as held; a resumed mixer serves the same float32 batches.
    resumed, resumed_source = TokenMixer(100, seed=0), _Source(start=half_source.next_image)
    resumed.load_state_dict(half.state_dict())
    assert resumed.buffer_ND is not None and resumed.buffer_ND.dtype == dtype
    for _ in range(8):
        assert torch.equal(
            resumed.next_batch(16, lambda: resumed_source().to(dtype)),
            half.next_batch(16, lambda: half_source().to(dtype)),
        )
