"""The configuration tree: frozen dataclasses, loaded from a YAML recipe plus overrides.

Every field has a docstring-style comment; every check raises ``ConfigError`` naming the key
and the fix. Validation happens in ``__post_init__`` and in ``load_config`` (which also checks
things that need the model's shape, such as the hook layer), before any data is read.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from patchsae.data.activations import TokenSelection

# The allowed values of every choice in the config, defined once: the field annotations use
# them, the loader and __post_init__ check them (:func:`_check_choices`), other modules import
# them (``typing.get_args(Strategy)``).
MseNorm = Literal["none", "token_norm"]
Architecture = Literal["relu", "topk", "batchtopk", "jumprelu"]
BDecInit = Literal["geometric_median", "mean", "zeros"]
Schedule = Literal["constant", "cosine"]
Device = Literal["auto", "cpu", "cuda"]
Strategy = Literal["auto", "single", "ddp", "deepspeed"]
Backend = Literal["auto", "nccl", "gloo"]
ZeroStage = Literal[1, 2, 3]
DataSource = Literal["shards", "cache"]


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the fix."""


def _fail(key: str, problem: str, fix: str) -> typing.NoReturn:
    raise ConfigError(f"config error at '{key}': {problem}; {fix}")


def _positive(section: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value <= 0:
            _fail(f"{section}.{name}", f"must be > 0, got {value!r}", "set a positive value")


def _check_choices(section: str, obj: Any) -> None:
    """Every ``Literal`` field of the dataclass ``obj`` holds one of its values."""
    for name, annotation in typing.get_type_hints(type(obj)).items():
        if typing.get_origin(annotation) is Literal:
            value, choices = getattr(obj, name), typing.get_args(annotation)
            if value not in choices or isinstance(value, bool):
                _fail(
                    f"{section}.{name}", f"unknown value {value!r}", f"use one of {list(choices)}"
                )


@dataclass(frozen=True)
class ModelConfig:
    name: str = "patchsae-demo-vit"
    """open_clip model name (``open_clip.list_models()``), e.g. ``ViT-B-16``."""
    pretrained: str | None = None
    """open_clip pretrained tag (``openai``), a local checkpoint file, or null for random init."""
    layer: int = -2
    """Hook the residual stream output of this block; negative counts from the end."""
    tokens: TokenSelection = "all"
    """Which tokens train the SAE: ``all`` (CLS + patches), ``cls`` or ``patches``."""
    cache_dir: str | None = None
    """Where open_clip looks for pretrained weights (its hub cache when null)."""
    init_seed: int = 0
    """Seed for the model's random init when ``pretrained`` is null (keeps runs comparable)."""

    def __post_init__(self) -> None:
        _check_choices("model", self)


@dataclass(frozen=True)
class DataConfig:
    urls: str = "runs/demo-data"
    """Shards: a directory of ``*.tar``, a brace pattern (``shard-{000000..000099}.tar``), or
    several of either separated by ``::``."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 reads in the main process)."""
    shuffle_shards: bool = True
    """Shuffle the shard order each epoch (seeded by ``train.seed`` and the epoch)."""
    shuffle_buffer: int = 1000
    """Sample-level shuffle buffer per worker, in images; 0 disables."""
    images_per_batch: int = 32
    """Images per CLIP forward pass, per rank."""
    mix_buffer_tokens: int = 65536
    """Tokens held by the mixer; batches are drawn at random from it so that one SAE batch
    mixes tokens from many images. Should be much larger than ``train.batch_tokens``."""
    max_bad_fraction: float = 0.5
    """Stop with an error when more than this fraction of the samples a rank has read (from its
    200th on) could not be used: undecodable, incomplete, or lost in a broken shard."""
    source: DataSource = "shards"
    """Where the tokens come from: ``shards`` (the images in ``urls`` through the CLIP) or
    ``cache`` (the activations in ``cache``; no CLIP runs)."""
    cache: str | None = None
    """With ``source: cache``: a folder written by ``patchsae cache`` (checked against the
    model section), or an ``[N, D]`` float array in a ``.npy`` or ``.safetensors`` file (read
    in blocks of 256 rows; nothing to check it against). ``shuffle_shards`` shuffles its
    shards and ``shuffle_buffer`` > 0 the images within each shard, every epoch."""
    cache_read_ahead: int | None = None
    """With ``source: cache``: reads of ``images_per_batch`` images (256-row blocks of an
    array) that a background thread keeps ready, so the step does not wait on the disk. The
    default, on a GPU, covers one top-up of the mixer (half of ``mix_buffer_tokens``) and one
    read more; on a CPU it is 0: reads in the training thread when the mixer asks."""

    def __post_init__(self) -> None:
        if not self.urls:
            _fail("data.urls", "is empty", "set a shard directory or a brace pattern")
        if self.num_workers < 0:
            _fail("data.num_workers", f"must be >= 0, got {self.num_workers}", "use 0 or more")
        if self.shuffle_buffer < 0:
            _fail("data.shuffle_buffer", "must be >= 0", "use 0 to disable shuffling")
        _positive("data", self, "images_per_batch", "mix_buffer_tokens")
        if not 0 < self.max_bad_fraction <= 1:
            _fail("data.max_bad_fraction", "must be in (0, 1]", "e.g. 0.5")
        if self.cache_read_ahead is not None and self.cache_read_ahead < 0:
            _fail("data.cache_read_ahead", "must be >= 0", "use 0 to read in the training thread")
        if self.source == "cache" and not self.cache:
            _fail("data.cache", "is not set but data.source is cache", "set the cache folder")


@dataclass(frozen=True)
class SAEConfig:
    n_latents: int | None = None
    """Dictionary width. Exactly one of ``n_latents`` and ``expansion`` is set."""
    expansion: int | None = 8
    """Width as a multiple of the model width (64 gives 49,152 latents for ViT-B-16)."""
    architecture: Architecture = "relu"
    """``relu`` (the paper's: L1 penalty, ghost gradients), ``topk`` (the ``k`` largest per
    token), ``batchtopk`` (``k`` per token on average over the batch; a threshold at inference)
    or ``jumprelu`` (a learned threshold per latent, L0 penalty); trained silent latents come
    back through ghost gradients (relu), AuxK (topk, batchtopk) or a pull of their
    pre-activations up to their thresholds (jumprelu)."""
    k: int = 32
    """topk, batchtopk: active latents per token."""
    aux_k: int | None = None
    """topk, batchtopk: how many silent latents AuxK lets reconstruct the residual (null: half
    the model width)."""
    aux_coeff: float = 0.03125
    """Weight of the term on silent latents: AuxK (topk, batchtopk), the pull of their
    pre-activations up to their thresholds (jumprelu); 1/32."""
    jumprelu_threshold: float = 0.001
    """jumprelu: initial threshold of every latent (on the scaled inputs), unless
    ``jumprelu_init_l0`` is set."""
    jumprelu_init_l0: float | None = None
    """jumprelu: start each latent's threshold where it fires on this many tokens in
    ``n_latents`` of the initial token sample, so that the code starts at about this L0 with no
    latent silent (null: every threshold starts at ``jumprelu_threshold``)."""
    jumprelu_threshold_lr: float = 1.0
    """jumprelu: the thresholds' learning rate as a multiple of ``train.lr`` (they are learned
    as ``jumprelu_threshold_lr * z``: Adam moves ``z`` at the rate, so the thresholds move at
    this multiple of it). Short runs need them to move faster than the encoder's bias."""
    jumprelu_bandwidth: float = 0.001
    """jumprelu: width of the straight-through estimator's window around the threshold."""
    l1_coeff: float = 8e-5
    """Weight of the sparsity penalty: L1 on the code (relu), L0 (jumprelu); unused by topk and
    batchtopk."""
    l1_warmup_steps: int = 0
    """Ramp the sparsity penalty linearly from 0 to ``l1_coeff`` over this many steps."""
    l1_decoder_norm: bool = False
    """Weight each latent's L1 term by the norm of its decoder row."""
    unit_norm_decoder: bool = True
    """Keep decoder rows at unit norm (the paper's). False leaves the decoder free; pair it with
    ``l1_decoder_norm: true`` and ``tied_init: true`` (the SAELens ``standard`` recipe)."""
    tied_init: bool = False
    """Initialise the encoder as the decoder's transpose."""
    decoder_init_norm: float | None = None
    """Initial norm of each decoder row (null: 1); e.g. 0.1 with a free decoder."""
    mse_norm: MseNorm = "none"
    """``none``: mean squared error; ``token_norm``: squared error divided by each token's L2
    norm (the PatchSAE code's loss)."""
    ghost_grads: bool = True
    """The term on latents silent over ``ghost_window_steps``: ghost gradients (relu), AuxK
    (topk, batchtopk), the pre-activation pull (jumprelu)."""
    ghost_window_steps: int = 64
    """A latent that has not fired for this many steps gets ghost gradients."""
    init_b_dec: BDecInit = "geometric_median"
    """``geometric_median``, ``mean`` or ``zeros`` of an initial token sample."""
    init_sample_tokens: int = 4096
    """Tokens in the sample used for ``b_dec`` and input scaling."""
    scale_inputs: bool = False
    """Scale inputs so the mean token norm is sqrt(d); folded back into the exported weights."""

    def __post_init__(self) -> None:
        if (self.n_latents is None) == (self.expansion is None):
            _fail(
                "sae.n_latents",
                "exactly one of sae.n_latents and sae.expansion must be set",
                "set the other one to null",
            )
        _positive("sae", self, "n_latents", "expansion", "ghost_window_steps", "init_sample_tokens")
        _positive("sae", self, "k", "aux_k", "decoder_init_norm")
        _positive("sae", self, "jumprelu_threshold", "jumprelu_bandwidth", "jumprelu_init_l0")
        _positive("sae", self, "jumprelu_threshold_lr")
        if self.n_latents and self.jumprelu_init_l0 and self.jumprelu_init_l0 > self.n_latents:
            _fail(
                "sae.jumprelu_init_l0",
                f"is {self.jumprelu_init_l0}, more than sae.n_latents ({self.n_latents})",
                "set an L0 below the width, e.g. 32",
            )
        for name in ("l1_coeff", "aux_coeff", "l1_warmup_steps"):
            if getattr(self, name) < 0:
                _fail(f"sae.{name}", f"must be >= 0, got {getattr(self, name)}", "e.g. 0")
        if self.unit_norm_decoder and self.decoder_init_norm not in (None, 1, 1.0):
            _fail(
                "sae.decoder_init_norm",
                f"is {self.decoder_init_norm} but sae.unit_norm_decoder keeps rows at norm 1",
                "set sae.unit_norm_decoder: false, or decoder_init_norm: null",
            )
        _check_choices("sae", self)


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 4e-4
    """Adam learning rate after warm-up."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    schedule: Schedule = "constant"
    """After warm-up: ``constant`` or ``cosine`` (down to ``min_lr_frac * lr``)."""
    warmup_steps: int = 500
    """Linear warm-up from 0 to ``lr``."""
    min_lr_frac: float = 0.0
    """Final learning rate of the cosine schedule, as a fraction of ``lr``."""
    batch_tokens: int | None = None
    """Tokens per optimiser step, over all ranks. Exactly one of this and ``batch_images``."""
    batch_images: int | None = 128
    """Images per optimiser step (times the tokens each image contributes)."""
    total_tokens: int | None = None
    """Training length in tokens. Exactly one of this and ``total_images``."""
    total_images: int | None = 2_621_440
    """Training length in images."""
    log_every: int = 10
    """Steps between metric logs (the only host syncs of the loop)."""
    checkpoint_every: int = 0
    """Steps between checkpoints; 0 writes one at the end only."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep (older ones are deleted)."""
    dead_window_tokens: int = 10_000_000
    """A latent silent over this many tokens counts as dead; dense/density use this window."""
    device: Device = "auto"
    """``auto`` (CUDA when present), ``cpu`` or ``cuda``."""
    seed: int = 0
    """Seeds the SAE init, data order and token mixing."""
    out_dir: str = "runs/demo"
    """Run directory: checkpoints, exported SAE, local metrics, the default MLflow store."""
    threads: int = 0
    """torch CPU threads (0 keeps torch's default)."""
    max_skipped_steps: int = 10
    """A step whose loss or gradient norm is not finite is skipped (weights and Adam state
    untouched); after this many in a row, training stops with a checkpoint of the last good
    state."""

    def __post_init__(self) -> None:
        _positive("train", self, "lr", "log_every", "keep_checkpoints", "dead_window_tokens")
        _positive("train", self, "max_skipped_steps")
        _positive("train", self, "batch_tokens", "batch_images", "total_tokens", "total_images")
        if self.warmup_steps < 0 or self.checkpoint_every < 0:
            _fail("train.warmup_steps", "steps must be >= 0", "use 0 to disable")
        if (self.batch_tokens is None) == (self.batch_images is None):
            _fail(
                "train.batch_tokens",
                "exactly one of train.batch_tokens and train.batch_images must be set",
                "set the other one to null",
            )
        if (self.total_tokens is None) == (self.total_images is None):
            _fail(
                "train.total_tokens",
                "exactly one of train.total_tokens and train.total_images must be set",
                "set the other one to null",
            )
        _check_choices("train", self)
        if not 0 <= self.min_lr_frac <= 1:
            _fail("train.min_lr_frac", "must be in [0, 1]", "e.g. 0.1")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            _fail("train.betas", f"got {self.betas!r}", "use two numbers in [0, 1)")


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    """Log to MLflow (metrics are always written to ``metrics.jsonl`` in the run directory)."""
    tracking_uri: str | None = None
    """MLflow tracking URI. Null: ``$MLFLOW_TRACKING_URI`` if set, else
    ``sqlite:///<out_dir>/mlflow.db``."""
    experiment: str = "patchsae"
    """MLflow experiment name."""
    run_name: str | None = None
    """MLflow run name (defaults to the run directory's name)."""
    flush_timeout_s: float = 120.0
    """At the end, how long to wait for an unreachable server before leaving the unsent
    records on disk (``patchsae sync-mlflow`` sends them later)."""
    system_metrics_every_s: float = 10.0
    """Seconds between samples of MLflow's system metrics (``system/*``: CPU, memory, disk,
    network, and GPU utilisation and memory where there is one); 0: off."""

    def __post_init__(self) -> None:
        if not self.experiment:
            _fail("tracking.experiment", "is empty", "name the MLflow experiment")
        if self.flush_timeout_s < 0:
            _fail("tracking.flush_timeout_s", "must be >= 0", "e.g. 120")
        if self.system_metrics_every_s < 0:
            _fail("tracking.system_metrics_every_s", "must be >= 0", "e.g. 10, or 0 for off")


@dataclass(frozen=True)
class EvalConfig:
    """Zero-shot evaluation while training: what the SAE costs the CLIP, as it trains."""

    every: int = 0
    """Steps between evaluations (and one at the end); 0: off."""
    data: str | None = None
    """Labelled held-out shards (brace or glob pattern), read in order each time."""
    classnames: str | None = None
    """Class names, a JSON list or one per line (null: ``classes.json`` beside the shards)."""
    templates: str = "auto"
    """``openai`` (the 80 ImageNet templates), ``demo``, ``auto`` or a file of templates."""
    tokens: TokenSelection = "all"
    """Tokens replaced by the SAE's reconstruction: ``all``, ``cls`` or ``patches``."""
    max_images: int | None = 1000
    """The first this many images of ``data`` (null: all)."""
    batch_images: int = 64

    def __post_init__(self) -> None:
        _positive("eval", self, "max_images", "batch_images")
        if self.every < 0:
            _fail("eval.every", "must be >= 0", "use 0 to turn the evaluation off")
        if self.every and not self.data:
            _fail("eval.data", "is needed when eval.every > 0", "give labelled held-out shards")
        _check_choices("eval", self)


@dataclass(frozen=True)
class DistributedConfig:
    strategy: Strategy = "auto"
    """``auto`` (DDP when launched with several ranks), ``single``, ``ddp`` or ``deepspeed``
    (ZeRO: partitions optimiser state, gradients and, at stage 3, the parameters)."""
    backend: Backend = "auto"
    """Process-group backend: ``auto`` (nccl on CUDA, gloo on CPU), ``nccl`` or ``gloo``."""
    zero_stage: ZeroStage = 2
    """DeepSpeed only: 1 partitions the optimiser state, 2 also the gradients, 3 also the
    parameters (see the README for which width wants which stage)."""
    offload_optimizer: bool = False
    """DeepSpeed only: keep the optimiser state (and fp32 master weights) in host memory and
    step there; frees accelerator memory at the price of PCIe traffic each step."""
    reduce_bucket_size: int = 50_000_000
    """DeepSpeed only: elements per gradient reduce(-scatter) bucket."""
    allgather_bucket_size: int = 50_000_000
    """DeepSpeed stages 1-2: elements per parameter all-gather bucket after the step."""
    prefetch_bucket_size: int = 50_000_000
    """DeepSpeed stage 3: elements of parameters fetched ahead of use."""
    param_persistence_threshold: int = 100_000
    """DeepSpeed stage 3: parameters smaller than this many elements (the biases) stay whole
    on every rank instead of being gathered for each use."""
    fused_optimizer: bool = False
    """DeepSpeed only: let DeepSpeed build its own Adam (FusedAdam on GPU, CPUAdam with
    offload; JIT-compiled on first use, about a minute) instead of ``torch.optim.Adam``.
    Faster at scale; ``torch.optim.Adam`` keeps runs bit-comparable with DDP."""
    deepspeed_config: str | None = None
    """DeepSpeed only: a JSON or YAML file merged over the generated DeepSpeed config
    (nested keys replace ours), for settings this section does not expose."""

    def __post_init__(self) -> None:
        _check_choices("distributed", self)
        _positive(
            "distributed",
            self,
            "reduce_bucket_size",
            "allgather_bucket_size",
            "prefetch_bucket_size",
        )
        if self.param_persistence_threshold < 0:
            _fail("distributed.param_persistence_threshold", "must be >= 0", "e.g. 100000")
        if self.deepspeed_config is not None:
            if self.strategy != "deepspeed":
                _fail(
                    "distributed.deepspeed_config",
                    f"is set but distributed.strategy is {self.strategy!r}",
                    "set distributed.strategy=deepspeed or remove the file",
                )
            if not Path(self.deepspeed_config).is_file():
                _fail(
                    "distributed.deepspeed_config",
                    f"file {self.deepspeed_config!r} does not exist",
                    "give the path of a JSON or YAML DeepSpeed config, or null",
                )


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    sweep: tuple[dict[str, Any], ...] = ()
    """SAEs trained together on the same tokens (``trainer.sweep``): each a mapping of
    ``section.key`` overrides of :data:`SWEEP_KEYS`, and an optional ``name``."""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["train"]["betas"] = list(self.train.betas)
        out["sweep"] = [dict(entry) for entry in self.sweep]
        return out

    def flat(self) -> dict[str, Any]:
        """``{"section.key": value}``, as logged to MLflow params (the sweep's members are
        logged by the sweep)."""
        sections = {s: sec for s, sec in self.to_dict().items() if s != "sweep"}
        return {f"{s}.{k}": v for s, sec in sections.items() for k, v in sec.items()}


SWEEP_KEYS = (
    {f"sae.{name}" for name in ("l1_coeff", "n_latents", "expansion", "architecture", "k")}
    | {"sae.aux_k", "sae.aux_coeff", "sae.jumprelu_threshold", "sae.jumprelu_bandwidth"}
    | {"sae.jumprelu_init_l0", "sae.jumprelu_threshold_lr"}
    | {"sae.l1_warmup_steps", "sae.l1_decoder_norm", "sae.unit_norm_decoder", "sae.tied_init"}
    | {"sae.decoder_init_norm", "sae.mse_norm", "sae.ghost_grads", "sae.ghost_window_steps"}
    | {"sae.init_b_dec", "sae.scale_inputs"}
    | {f"train.{name}" for name in ("lr", "betas", "warmup_steps", "schedule", "min_lr_frac")}
)
"""What a sweep's members may set: the SAE and its optimiser. Everything else (the data, the
batch, the steps, the token sample the SAEs initialise from) is one for all of them."""


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "sae": SAEConfig,
    "train": TrainConfig,
    "tracking": TrackingConfig,
    "eval": EvalConfig,
    "distributed": DistributedConfig,
}


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field annotation, converting the harmless cases (int -> float,
    list -> tuple). Anything else names the key and the expected type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:  # checked against its values by the dataclass (_check_choices)
        if isinstance(value, float) and value.is_integer() and all(type(a) is int for a in args):
            return int(value)
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            _fail(
                key, f"expected a list of {len(args)} numbers, got {value!r}", "e.g. [0.9, 0.999]"
            )
        return tuple(_coerce(key, v, a) for v, a in zip(value, args, strict=True))
    expected = {"str": str, "int": int, "float": float, "bool": bool}.get(
        getattr(annotation, "__name__", str(annotation)), annotation
    )
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if expected is float and isinstance(value, str):
        try:  # YAML 1.1 reads "8e-5" as a string
            return float(value)
        except ValueError:
            pass
    if expected is int and isinstance(value, str) and value.replace("_", "").isdigit():
        return int(value.replace("_", ""))
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        name = expected.__name__
        article = "an" if name[0] in "aeiou" else "a"
        _fail(key, f"expected {name}, got {value!r}", f"give {article} {name}")
    return value


def _build(raw: dict[str, Any]) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"config error: the recipe must be a mapping of sections, got {raw!r}")
    sections: dict[str, Any] = {}
    for name, values in raw.items():
        if name == "sweep":
            sections["sweep"] = _sweep_entries(values)
            continue
        if name not in SECTIONS:
            _fail(name, "unknown section", f"valid sections are {sorted(SECTIONS)} and sweep")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            _fail(name, f"expected a mapping, got {values!r}", "write `key: value` lines under it")
        cls = SECTIONS[name]
        hints = typing.get_type_hints(cls)
        valid = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, value in values.items():
            if key not in hints:
                _fail(f"{name}.{key}", "unknown key", f"valid keys of '{name}' are {valid}")
            kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
        sections[name] = cls(**kwargs)
    return Config(**sections)


def _sweep_entries(values: Any) -> tuple[dict[str, Any], ...]:
    """The ``sweep`` list, its keys checked (their values are checked by ``member_configs``)."""
    if values is None:
        return ()
    if not isinstance(values, list) or not all(isinstance(v, dict) for v in values):
        _fail("sweep", f"expected a list of mappings, got {values!r}", SWEEP_EXAMPLE)
    for i, entry in enumerate(values):
        for key in entry:
            section, _, name = str(key).partition(".")
            if key != "name" and name not in getattr(
                SECTIONS.get(section), "__dataclass_fields__", {}
            ):
                _fail(f"sweep[{i}].{key}", "unknown key", f"use section.key names, {SWEEP_EXAMPLE}")
            if key != "name" and key not in SWEEP_KEYS:
                _fail(
                    f"sweep[{i}].{key}",
                    "cannot differ between the SAEs of a sweep",
                    f"set only name and these keys: {sorted(SWEEP_KEYS)}",
                )
    return tuple(dict(entry) for entry in values)


SWEEP_EXAMPLE = (
    "e.g. sweep: [{sae.l1_coeff: 4.0e-5}, {name: topk32, sae.architecture: topk, sae.k: 32}]"
)


def member_configs(cfg: Config) -> list[tuple[str, Config]]:
    """Each sweep member's name and complete config: the recipe with its overrides, training
    into ``train.out_dir/<name>`` as an MLflow run of that name. Values are validated here."""
    base = cfg.to_dict()
    base["sweep"] = []
    out: list[tuple[str, Config]] = []
    for i, entry in enumerate(cfg.sweep):
        overrides = {k: v for k, v in entry.items() if k != "name"}
        name = str(entry.get("name") or member_name(overrides) or f"member{i}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            _fail(
                f"sweep[{i}].name", f"{name!r} is not a folder name", "use letters, digits, . _ -"
            )
        if name in {n for n, _ in out}:
            _fail(
                f"sweep[{i}].name", f"{name!r} names two members", "give each member its own name"
            )
        raw = copy.deepcopy(base)
        for key, value in overrides.items():
            section, field_name = key.split(".", 1)
            raw[section][field_name] = value
        raw["train"]["out_dir"] = str(Path(cfg.train.out_dir) / name)
        raw["tracking"]["run_name"] = name
        try:
            out.append((name, _build(raw)))
        except ConfigError as err:
            raise ConfigError(f"config error in sweep[{i}] ({name}): {err}") from err
    return out


def member_name(overrides: dict[str, Any]) -> str:
    """``{"sae.l1_coeff": 4e-05, "sae.k": 32}`` -> ``l1_coeff-4e-05_k-32``."""
    parts = [f"{key.split('.', 1)[1]}-{value}" for key, value in overrides.items()]
    return re.sub(r"[^A-Za-z0-9._-]", "-", "_".join(parts))


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"train.lr=1e-3"`` -> ``("train", "lr", 0.001)``; values are parsed as YAML."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(
            f"config error: override {text!r} is not of the form section.key=value; "
            "e.g. --set train.lr=1e-3"
        )
    path, value = text.split("=", 1)
    section, key = path.split(".", 1)
    try:
        return section, key, yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError as err:
        raise ConfigError(
            f"config error at '{path}': the value {value!r} of --set is not valid YAML "
            f"({getattr(err, 'problem', None) or err}); quote it, e.g. --set '{path}=\"...\"'"
        ) from err


def _read_yaml(path: Path) -> Any:
    """The recipe's contents; a syntax error names the file, line and column."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = " ".join(x for x in (err.context, err.problem) if x)
        raise ConfigError(
            f"config error: {where}: the recipe is not valid YAML ({problem}); fix that line "
            "(indentation and `key: value` pairs under each section)"
        ) from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config error: {path} is not valid YAML ({err}); fix the file") from err


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML recipe, apply ``section.key=value`` overrides and validate everything that
    can be checked without reading data (the hook layer against the model's depth included)."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"config error: recipe {str(path)!r} does not exist; pass a YAML file"
            )
        raw = _read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config error: {path} must hold a mapping of sections")
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})
        if raw[section] is None:
            raw[section] = {}
        raw[section][key] = value
    cfg = _build(raw)
    # Training from a cache runs no CLIP (unless the zero-shot evaluation needs one).
    check_model(cfg.model, weights=cfg.data.source == "shards" or cfg.eval.every > 0)
    member_configs(cfg)  # a sweep's values, checked before any data is read
    return cfg


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Rebuild a config from ``Config.to_dict()`` output (checkpoints, ``cfg.json``)."""
    return _build(raw)


def check_model(model: ModelConfig, weights: bool = True) -> int:
    """Validate the model name and hook layer against open_clip's registry (and, with
    ``weights``, that ``model.pretrained`` exists); returns the non-negative block index."""
    # open_clip is heavy: imported here, not when the config module loads.
    from patchsae.data.activations import ModelError, check_weights, model_depth

    try:
        depth = model_depth(model.name)
    except ModelError as err:
        raise ConfigError(f"config error at 'model': {err}") from err
    # The architecture alone decides the range: checked before any weights file exists.
    if not -depth <= model.layer < depth:
        _fail(
            "model.layer",
            f"layer {model.layer} is out of range for {model.name} ({depth} blocks)",
            f"use {-depth}..{depth - 1}",
        )
    try:
        if weights:
            check_weights(model.name, model.pretrained)
    except ModelError as err:
        raise ConfigError(f"config error at 'model': {err}") from err
    return model.layer % depth
