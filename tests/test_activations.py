"""The open_clip hook: right tensor, right tokens, and the forward really stops."""

from __future__ import annotations

import pytest
import torch
from patchsae.data.activations import ActivationSource, load_visual


@pytest.fixture(scope="module")
def visual():
    visual, preprocess = load_visual("patchsae-demo-vit", None, cache_dir=None, init_seed=0)
    return visual


def _full_forward_blocks(visual, pixels):
    """Every block's output from one uninterrupted forward pass (plain hooks, no stopping)."""
    outputs = {}
    handles = [
        block.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o.clone()))
        for i, block in enumerate(visual.transformer.resblocks)
    ]
    with torch.no_grad():
        visual(pixels)
    for h in handles:
        h.remove()
    return outputs


@pytest.mark.parametrize("layer", [-2, 0, 3, -4])
def test_hook_equals_full_forward_block_output(visual, layer):
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 64, 64)
    source = ActivationSource(visual, layer, "all")
    acts = source.block_output(pixels)
    full = _full_forward_blocks(visual, pixels)
    assert acts.shape == (3, 65, 128)
    assert torch.equal(acts, full[layer % 4])


def test_forward_stops_after_hooked_block(visual):
    calls = []
    handles = [
        block.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
        for i, block in enumerate(visual.transformer.resblocks)
    ]
    post = visual.ln_post.register_forward_pre_hook(lambda m, a: calls.append("ln_post"))
    try:
        ActivationSource(visual, 1, "all")(torch.randn(2, 3, 64, 64))
    finally:
        for h in [*handles, post]:
            h.remove()
    assert calls == [0, 1]


def test_token_selection_takes_each_images_own_tokens(visual):
    torch.manual_seed(1)
    pixels = torch.randn(4, 3, 64, 64)
    full = ActivationSource(visual, -2, "all").block_output(pixels)  # [4, 65, 128]
    cls = ActivationSource(visual, -2, "cls")(pixels)
    patches = ActivationSource(visual, -2, "patches")(pixels)
    everything = ActivationSource(visual, -2, "all")(pixels)
    assert cls.shape == (4, 128) and torch.equal(cls, full[:, 0])  # image i's CLS, not image 0's
    assert patches.shape == (4 * 64, 128) and torch.equal(patches, full[:, 1:].reshape(-1, 128))
    assert torch.equal(everything, full.reshape(-1, 128))
    assert ActivationSource(visual, -2, "patches").tokens_per_image == 64


def test_local_checkpoint_file_loads_through_open_clip(tmp_path):
    import open_clip

    model = open_clip.create_model("patchsae-demo-vit", pretrained=None)
    with torch.no_grad():
        model.visual.conv1.weight.fill_(0.125)
    path = tmp_path / "demo.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    visual, _ = load_visual("patchsae-demo-vit", str(path), cache_dir=None, init_seed=123)
    assert torch.all(visual.conv1.weight == 0.125)
    assert not any(p.requires_grad for p in visual.parameters()) and not visual.training
