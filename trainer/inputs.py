"""What a run trains on, built from its config: the token stream over this rank's share of the
image shards (through the hooked CLIP) or of an activation cache, and the token sample an SAE
initialises from. A sweep (``trainer.sweep``) builds them once for all its SAEs."""

from __future__ import annotations

import logging

import torch
from patchsae.data.activations import ActivationSource, load_visual
from patchsae.data.cache import ActivationCache, CachedStream, top_up_reads
from patchsae.data.cache import identity as cache_identity
from patchsae.data.mixer import TokenMixer
from patchsae.data.shards import ImageShards, expand_urls
from patchsae.data.stream import TokenStream
from patchsae.trainer.config import Config, ConfigError
from patchsae.trainer.distributed import Distributed
from torch import Tensor

log = logging.getLogger(__name__)


def needs_weights(cfg: Config) -> bool:
    """Whether the run loads the CLIP: from shards, or for the zero-shot evaluation."""
    return cfg.data.source == "shards" or cfg.eval.every > 0


def build_stream(cfg: Config, dist: Distributed, layer: int) -> TokenStream | CachedStream:
    """The token stream of ``cfg.data`` on this rank; ``layer`` is the hooked block's index."""
    mixer = TokenMixer(cfg.data.mix_buffer_tokens, seed=cfg.train.seed * 1009 + dist.rank)
    if cfg.data.source == "cache":
        return _cached_stream(cfg, dist, layer, mixer)
    urls = expand_urls(cfg.data.urls)  # fails fast, naming the URLs, when none is readable
    visual, preprocess = load_visual(
        cfg.model.name,
        cfg.model.pretrained,
        cache_dir=cfg.model.cache_dir,
        init_seed=cfg.model.init_seed,
    )
    source = ActivationSource(visual.to(dist.device), layer, cfg.model.tokens)
    shards = ImageShards(
        urls,
        preprocess,
        batch_size=cfg.data.images_per_batch,
        shuffle_shards=cfg.data.shuffle_shards,
        shuffle_buffer=cfg.data.shuffle_buffer,
        seed=cfg.train.seed,
        rank=dist.rank,
        world_size=dist.world_size,
    )
    return TokenStream(
        shards,
        source,
        mixer,
        num_workers=cfg.data.num_workers,
        max_bad_fraction=cfg.data.max_bad_fraction,
    )


def _cached_stream(cfg: Config, dist: Distributed, layer: int, mixer: TokenMixer) -> CachedStream:
    assert cfg.data.cache is not None  # DataConfig checks it
    cache = ActivationCache.open(cfg.data.cache)
    m = cfg.model
    cache.check(cache_identity(m.name, m.pretrained, layer, m.tokens, m.init_seed))
    if cache.meta is None:
        if not (cfg.train.batch_tokens and cfg.train.total_tokens):
            raise ConfigError(
                f"config error at 'train': data.cache {cfg.data.cache} is an array without "
                "images; set train.batch_tokens and train.total_tokens (not *_images)"
            )
        log.warning("data.cache %s is a bare array: model.* is not checked against it", cache.path)
    return CachedStream(
        cache,
        mixer,
        units_per_read=cfg.data.images_per_batch,
        shuffle_shards=cfg.data.shuffle_shards,
        shuffle_units=cfg.data.shuffle_buffer > 0,
        seed=cfg.train.seed,
        rank=dist.rank,
        world_size=dist.world_size,
        device=dist.device,
        read_ahead=cache_read_ahead(cfg, cache, dist.device),
    )


def cache_read_ahead(cfg: Config, cache: ActivationCache, device: torch.device) -> int:
    """``data.cache_read_ahead``, or its default: on a GPU one top-up of the mixer and one
    read more; on a CPU none (the reader thread would take cores from the step, and
    ``benchmarks/cache_reader.py`` measures no gain there)."""
    if cfg.data.cache_read_ahead is not None:
        return cfg.data.cache_read_ahead
    if device.type != "cuda":
        return 0
    rows_per_read = cfg.data.images_per_batch * cache.shards[0].unit_rows
    return top_up_reads(cfg.data.mix_buffer_tokens, rows_per_read)


def init_sample(stream: TokenStream | CachedStream, cfg: Config) -> Tensor:
    """``sae.init_sample_tokens`` tokens drawn through the mixer (for ``b_dec`` and the input
    scale), in chunks the mixer can serve."""
    want = cfg.sae.init_sample_tokens
    chunk = cfg.data.mix_buffer_tokens // 2
    return torch.cat([stream.next_batch(min(chunk, want - i)) for i in range(0, want, chunk)])
