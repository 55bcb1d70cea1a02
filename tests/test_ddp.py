"""torchrun with 2 gloo processes on CPU trains one SAE, and both replicas stay identical."""

from __future__ import annotations

import json

from patchsae.trainer.tracking import read_metrics
from safetensors.torch import load_file

from tests.helpers import run_train, small_overrides


def test_torchrun_two_ranks_identical_weights(tmp_path, demo_shards):
    out = tmp_path / "run"
    overrides = small_overrides(demo_shards, out, **{"train.total_tokens": 6 * 1024})
    run_train(overrides, nproc=2)
    digests = json.loads((out / "replicas.json").read_text())
    assert len(digests) == 2 and digests[0] == digests[1]
    tensors = load_file(out / "sae.safetensors")
    assert tensors["W_enc"].shape == (128, 1024)
    # One writer: each step's metrics appear once, from rank 0, with global token counts.
    history = read_metrics(out)["loss/total"]
    assert [step for step, _ in history] == list(range(1, 7))
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["tokens_seen"] == 6 * 1024
    # Both ranks' data positions are in the checkpoint.
    last = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert sorted(p.name for p in last.glob("stream_rank*.pt")) == [
        "stream_rank0.pt",
        "stream_rank1.pt",
    ]


def test_both_engines_implement_the_engine_protocol():
    """LocalEngine and ZeroEngine have every member of the Engine protocol, with the same
    parameters, so the trainer can use either through it."""
    import inspect

    from patchsae.trainer.distributed import Engine, LocalEngine, ZeroEngine

    members = {
        name: value
        for name, value in vars(Engine).items()
        if not name.startswith("_") and (callable(value) or isinstance(value, property))
    }
    assert {"forward", "backward", "step", "load", "full_tensors", "kind"} <= set(members)
    for engine in (LocalEngine, ZeroEngine):
        for name, proto in members.items():
            mine = getattr(engine, name, None)
            assert mine is not None, f"{engine.__name__} lacks {name}"
            if isinstance(proto, property):
                assert isinstance(mine, property), f"{engine.__name__}.{name} is not a property"
                continue
            want = list(inspect.signature(proto).parameters)
            assert list(inspect.signature(mine).parameters) == want, (engine.__name__, name)
