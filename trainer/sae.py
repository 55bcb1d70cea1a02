"""The PatchSAE sparse autoencoder: parameters, initialisation, decoder constraint, export.

Shape legend: N tokens, D model width, F latents.

    f_NF     = act((x_ND - b_dec_D) @ W_enc_DF + b_enc_F)
    x_hat_ND = f_NF @ W_dec_FD + b_dec_D

``act`` is the architecture's (``relu``, ``topk``, ``batchtopk``, ``jumprelu``; see
``kernels.reference``).

The math lives in ``kernels`` (one entry point that dispatches); this module holds no
parallelism.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from patchsae import kernels
from patchsae.kernels import SAEOutput
from torch import Tensor, nn

log = logging.getLogger(__name__)


def geometric_median(points_ND: Tensor, max_iter: int = 200, tol: float = 1e-7) -> Tensor:
    """The point minimising the sum of Euclidean distances to ``points_ND`` (Weiszfeld's
    algorithm, in float64). Robust to outliers, unlike the mean."""
    pts = points_ND.double()
    median = pts.mean(dim=0)
    for _ in range(max_iter):
        dist_N = (pts - median).norm(dim=-1).clamp_min(1e-12)
        weights_N = 1.0 / dist_N
        new = (weights_N[:, None] * pts).sum(dim=0) / weights_N.sum()
        shift = (new - median).norm()
        median = new
        if shift <= tol * (1.0 + median.norm()):
            break
    return median.to(points_ND.dtype)


class _TangentGrad(torch.autograd.Function):
    """Identity forward; backward removes from each row's gradient its component along that
    row, so that the update moves along the unit sphere of the decoder constraint."""

    @staticmethod
    def forward(ctx: Any, W_FD: Tensor) -> Tensor:
        ctx.save_for_backward(W_FD)
        return W_FD.view_as(W_FD)

    @staticmethod
    def backward(ctx: Any, grad_FD: Tensor) -> Tensor:
        (W_FD,) = ctx.saved_tensors
        unit_FD = W_FD / W_FD.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        return grad_FD - (grad_FD * unit_FD).sum(dim=-1, keepdim=True) * unit_FD


def tangent_grad(W_FD: Tensor) -> Tensor:
    """``W_FD`` with its gradient projected onto the tangent space of the unit-row constraint.

    The projection happens in the graph, on each rank's own gradient and before any reduction.
    It is linear in the gradient with the same rows on every rank, so the projected sum equals
    the sum of projections: data parallelism and ZeRO (whose gradients are partitioned flat,
    not by row) need no row-aligned step afterwards.
    """
    return _TangentGrad.apply(W_FD)


THRESHOLD_MOMENTUM = 0.01
"""batchtopk: weight of each step's smallest kept activation in the running inference threshold."""


class SparseAutoencoder(nn.Module):
    """The SAE: by default the paper's, ReLU with untied weights and unit-norm decoder rows.

    Args:
        architecture: ``relu``, ``topk``, ``batchtopk`` or ``jumprelu``.
        k: Active latents per token (topk), on average (batchtopk).
        unit_norm_decoder: Keep decoder rows at unit norm (projected gradients, renormalised
            after each step). False leaves the decoder free (then weight the L1 term by the row
            norms, the SAELens ``standard`` form).
        tied_init: Initialise ``W_enc`` as ``W_dec`` transposed.
        decoder_init_norm: Initial norm of the decoder rows (1 when they are kept at unit norm).
        threshold: jumprelu: the initial threshold of every latent. It is learned directly,
            as ``threshold_lr * |z|`` (the absolute value keeps it >= 0 with no projection
            step), so Adam moves it at ``threshold_lr`` times the rate it moves ``b_enc``,
            against which it is measured.
        threshold_lr: jumprelu: that multiple.
        init_l0: jumprelu: on ``init_from_sample``, start each latent's threshold where it
            fires on ``init_l0 / n_latents`` of the sample's tokens (None: keep ``threshold``).
    """

    input_scale: Tensor
    threshold: Tensor  # batchtopk: the inference threshold (a buffer); jumprelu: [F], learned

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        *,
        architecture: str = "relu",
        k: int = 0,
        unit_norm_decoder: bool = True,
        tied_init: bool = False,
        decoder_init_norm: float = 1.0,
        threshold: float = 1e-3,
        threshold_lr: float = 1.0,
        init_l0: float | None = None,
    ) -> None:
        super().__init__()
        self.d_in, self.n_latents = d_in, n_latents
        self.init_l0 = init_l0 if architecture == "jumprelu" else None
        self.architecture, self.k = architecture, k
        self.unit_norm_decoder, self.tied_init = unit_norm_decoder, tied_init
        self.decoder_init_norm = decoder_init_norm
        self.W_enc = nn.Parameter(torch.empty(d_in, n_latents))
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(torch.empty(n_latents, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.threshold_lr = float(threshold_lr)
        if architecture == "jumprelu":  # z; the SAE's thresholds are threshold_lr * |z|
            self.threshold = nn.Parameter(torch.full((n_latents,), threshold / threshold_lr))
        if architecture == "batchtopk":  # the inference threshold, estimated in training
            self.register_buffer("threshold", torch.zeros(()))
        # Multiplies inputs before the SAE sees them; folded into the weights on export.
        self.register_buffer("input_scale", torch.ones(()))
        self.reset_parameters()

    @classmethod
    def from_config(cls, d_in: int, n_latents: int, cfg: Any) -> SparseAutoencoder:
        """The SAE a ``SAEConfig`` describes."""
        return cls(
            d_in,
            n_latents,
            architecture=cfg.architecture,
            k=cfg.k,
            unit_norm_decoder=cfg.unit_norm_decoder,
            tied_init=cfg.tied_init,
            decoder_init_norm=cfg.decoder_init_norm or 1.0,
            threshold=cfg.jumprelu_threshold,
            threshold_lr=cfg.jumprelu_threshold_lr,
            init_l0=cfg.jumprelu_init_l0,
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Kaiming-uniform init (``W_enc = W_dec^T`` when tied), ``b_enc = 0``, decoder rows at
        ``decoder_init_norm``."""
        # kaiming_uniform_ takes fan_in from dim 1; W_enc is [D, F] so init its transpose.
        nn.init.kaiming_uniform_(self.W_enc.T, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.W_dec.T, a=math.sqrt(5))
        self.b_enc.zero_()
        self.b_dec.zero_()
        norm = self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        self.W_dec.div_(norm / self.decoder_init_norm)  # exactly unit rows for norm 1
        if self.tied_init:
            self.W_enc.copy_(self.W_dec.T)

    @torch.no_grad()
    def init_from_sample(self, x_ND: Tensor, b_dec: str, scale_inputs: bool) -> None:
        """Set the input scale (mean token norm -> sqrt(D)) and ``b_dec`` from a token sample,
        then (jumprelu with ``init_l0``) the thresholds (:meth:`init_thresholds`)."""
        self._init_scale_and_b_dec(x_ND, b_dec, scale_inputs)
        if self.init_l0 is not None:
            self.init_thresholds(x_ND, self.init_l0)

    @torch.no_grad()
    def init_thresholds(self, x_ND: Tensor, l0: float, chunk_elements: int = 2**26) -> None:
        """jumprelu: each latent's threshold where its pre-activation exceeds it on ``l0 /
        n_latents`` of the tokens of ``x_ND`` (raw inputs; at least one token; the threshold at
        least 0), so that the code starts at about ``l0`` per token and no latent is silent.
        The pre-activations are ranked a block of latents at a time (``chunk_elements`` at
        most)."""
        x_ND = x_ND.to(self.W_enc.device, torch.float32) * self.input_scale - self.b_dec
        n = x_ND.shape[0]
        fires = n * l0 / self.n_latents
        if fires < 1:
            log.warning(
                "sae.jumprelu_init_l0 %s: %d sample tokens cannot resolve a firing rate of "
                "%.2g per latent; each latent starts firing on its one largest pre-activation "
                "(raise sae.init_sample_tokens to start nearer that L0)",
                l0, n, l0 / self.n_latents,
            )  # fmt: skip
        m = max(1, round(fires))
        block = max(1, chunk_elements // n)
        for start in range(0, self.n_latents, block):
            cols = slice(start, start + block)
            pre_NB = x_ND @ self.W_enc[:, cols].float() + self.b_enc[cols].float()
            top_MB = pre_NB.topk(min(m + 1, n), dim=0).values
            # midway between the m-th and the (m+1)-th largest: no sample value sits on it
            cut_B = (top_MB[m - 1] + top_MB[m]) / 2 if m < n else top_MB[-1] - 1
            self.threshold[cols] = (cut_B.clamp_min(0) / self.threshold_lr).to(self.threshold.dtype)

    def _init_scale_and_b_dec(self, x_ND: Tensor, b_dec: str, scale_inputs: bool) -> None:
        x_ND = x_ND.to(self.W_enc.device, torch.float32)
        if scale_inputs:
            mean_norm = x_ND.norm(dim=-1).mean().clamp_min(1e-8)
            self.input_scale.fill_(math.sqrt(self.d_in) / mean_norm.item())
        x_ND = x_ND * self.input_scale
        if b_dec == "geometric_median":
            self.b_dec.copy_(geometric_median(x_ND))
        elif b_dec == "mean":
            self.b_dec.copy_(x_ND.mean(dim=0))
        elif b_dec == "zeros":
            self.b_dec.zero_()
        else:
            raise ValueError(f"unknown b_dec init {b_dec!r}; use geometric_median, mean or zeros")

    def forward(
        self,
        x_ND: Tensor,
        *,
        l1_coeff: float,
        mse_norm: str = "none",
        l1_decoder_norm: bool = False,
        ghost_mask_F: Tensor | None = None,
        **options: Any,
    ) -> SAEOutput:
        """The loss on ``x_ND`` (``kernels.sae_loss``); ``options``: ``aux_k``, ``aux_coeff``,
        ``bandwidth``."""
        x_ND = x_ND.to(self.W_enc.dtype) * self.input_scale
        if self.architecture == "jumprelu":
            options["threshold_F"] = self.thresholds()
        return kernels.sae_loss(
            x_ND,
            self.W_enc,
            self.b_enc,
            tangent_grad(self.W_dec) if self.unit_norm_decoder else self.W_dec,
            self.b_dec,
            l1_coeff=l1_coeff,
            mse_norm=mse_norm,
            l1_decoder_norm=l1_decoder_norm,
            ghost_mask_F=ghost_mask_F,
            architecture=self.architecture,
            k=self.k,
            **options,
        )

    def thresholds(self) -> Tensor:
        """jumprelu: the thresholds ``[F]`` the code uses (on the scaled inputs), with
        autograd."""
        return self.threshold.abs() * self.threshold_lr

    @torch.no_grad()
    def update_threshold(self, f_NF: Tensor, keep: Tensor | None = None) -> None:
        """batchtopk: move the inference threshold towards the smallest activation the batch
        kept (a running mean, on the device); ``keep`` false: leave it (a skipped step)."""
        if self.architecture != "batchtopk":
            return
        kept = torch.where(f_NF > 0, f_NF, torch.inf).min().to(self.threshold.dtype)
        fresh = torch.where(self.threshold > 0, self.threshold, kept)
        new = (1 - THRESHOLD_MOMENTUM) * fresh + THRESHOLD_MOMENTUM * kept
        ok = torch.isfinite(kept) if keep is None else torch.isfinite(kept) & keep
        self.threshold.copy_(torch.where(ok, new, self.threshold))

    @torch.no_grad()
    def normalize_decoder(self, keep: Tensor | None = None) -> None:
        """Rescale each decoder row to unit L2 norm (after every optimiser step; nothing when
        the decoder is unconstrained). ``keep``, a device bool, false: leave the rows exactly as
        they are (a skipped step), with no sync."""
        if not self.unit_norm_decoder:
            return
        norm = self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        if keep is not None:
            norm = torch.where(keep, norm, 1.0)
        self.W_dec.div_(norm)

    @torch.no_grad()
    def export_tensors(self) -> dict[str, Tensor]:
        """Weights that act on unscaled inputs, for ``sae.safetensors``.

        Training sees ``s * x``. Since every architecture is positively homogeneous (a threshold
        scales with the input, a top-k selection does not change), dividing the code by ``s``
        gives an SAE on raw ``x`` with the same decoder rows: ``W_enc, b_enc / s, W_dec,
        b_dec / s`` and ``threshold / s``; its latents are the trained ones divided by s.
        jumprelu and batchtopk export ``threshold [F]``: at inference both are
        ``pre * (pre > threshold)``. topk's ``k`` is in ``cfg.json``.
        """
        s = self.input_scale.float()
        out = {
            "W_enc": self.W_enc.detach().float().contiguous(),
            "b_enc": (self.b_enc / s).detach().float().contiguous(),
            "W_dec": self.W_dec.detach().float().contiguous(),
            "b_dec": (self.b_dec / s).detach().float().contiguous(),
        }
        if self.architecture == "jumprelu":
            out["threshold"] = (self.thresholds() / s).detach().float().contiguous()
        if self.architecture == "batchtopk":
            out["threshold"] = (self.threshold / s).float().expand(self.n_latents).contiguous()
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        if prefix + "log_threshold" in state_dict:
            raise ValueError(
                "this checkpoint holds jumprelu thresholds as logs (log_threshold), from before "
                "they were learned as is (threshold); it cannot resume here. Its export "
                "(sae.safetensors) still loads; train a new run to go on"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_exported(cls, tensors: dict[str, Tensor], k: int = 0) -> SparseAutoencoder:
        """Rebuild an SAE (input scale 1) from ``export_tensors`` output: with a ``threshold``
        a jumprelu SAE, else relu, or topk given ``k``."""
        d_in, n_latents = tensors["W_enc"].shape
        architecture = "jumprelu" if "threshold" in tensors else "topk" if k else "relu"
        sae = cls(d_in, n_latents, architecture=architecture, k=k, unit_norm_decoder=False)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(sae, name).copy_(tensors[name])
            if "threshold" in tensors:
                sae.threshold.copy_(tensors["threshold"] / sae.threshold_lr)
        return sae
