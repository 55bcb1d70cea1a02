"""Runs inside the SAELens venv (``tests/saelens_venv.py``), started by ``benchmarks/recipes.py``:
train SAELens's own SAEs with its ``SAETrainer`` on the synthetic tokens of
``benchmarks/synthetic.py`` and write what they learned.

    <saelens venv>/bin/python -I benchmarks/saelens_recipes.py JOB.json

``JOB.json``: ``{"synthetic": {...}, "steps", "batch", "lr", "n_latents", "out",
"recipes": [{"name", "architecture": "standard" | "topk", "l1" | "k"}]}``. ``out`` gets, per
recipe, ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` (safetensors, ``<name>.safetensors``) and the
seconds spent training outside data generation, plus the digest of the first batch
(``out/saelens.json``), so the caller can check both processes saw the same tokens.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def _synthetic_module():
    """``benchmarks/synthetic.py``, loaded by path: putting ``benchmarks/`` on ``sys.path`` would
    let its ``kernels.py`` shadow the ``kernels`` package that transformers imports."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "synthetic", Path(__file__).with_name("synthetic.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["synthetic"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


_synthetic = _synthetic_module()
Synthetic, batch_digest = _synthetic.Synthetic, _synthetic.batch_digest


class Batches:
    """The synthetic batches 0, 1, 2, ...; the time spent making them is kept apart."""

    def __init__(self, synthetic: Synthetic, n: int) -> None:
        self.synthetic, self.n, self.index, self.seconds = synthetic, n, 0, 0.0

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> torch.Tensor:
        start = time.perf_counter()
        x = self.synthetic.batch(self.index, self.n)
        self.index += 1
        self.seconds += time.perf_counter() - start
        return x


def main(job_file: str) -> None:
    from sae_lens import (
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    job = json.loads(Path(job_file).read_text())
    synthetic = Synthetic(**job["synthetic"])
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    report = {"digest": batch_digest(synthetic.batch(0, job["batch"])), "seconds": {}}
    d, f = synthetic.d, job["n_latents"]
    for recipe in job["recipes"]:
        torch.manual_seed(0)
        if recipe["architecture"] == "topk":
            cfg = TopKTrainingSAEConfig(d_in=d, d_sae=f, k=recipe["k"], device="cpu")
            sae = TopKTrainingSAE(cfg)
        else:
            cfg = StandardTrainingSAEConfig(
                d_in=d,
                d_sae=f,
                l1_coefficient=recipe["l1"],
                l1_warm_up_steps=job["steps"] // 20,
                device="cpu",
            )
            sae = StandardTrainingSAE(cfg)
        trainer_cfg = SAETrainerConfig(
            n_checkpoints=0,
            checkpoint_path=None,
            save_final_checkpoint=False,
            total_training_samples=job["steps"] * job["batch"],
            device="cpu",
            autocast=False,
            lr=job["lr"],
            lr_end=job["lr"],
            lr_scheduler_name="constant",
            lr_warm_up_steps=0,
            adam_beta1=0.9,
            adam_beta2=0.999,
            lr_decay_steps=0,
            n_restart_cycles=1,
            train_batch_size_samples=job["batch"],
            dead_feature_window=1000,
            feature_sampling_window=2000,
            logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1),
            n_batches_for_norm_estimate=10,
        )
        batches = Batches(synthetic, job["batch"])
        start = time.perf_counter()
        SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches).fit()
        report["seconds"][recipe["name"]] = time.perf_counter() - start - batches.seconds
        tensors = {
            k: getattr(sae, k).detach().float().contiguous()
            for k in ("W_enc", "b_enc", "W_dec", "b_dec")
        }
        save_file(tensors, out / f"{recipe['name']}.safetensors")
    (out / "saelens.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
