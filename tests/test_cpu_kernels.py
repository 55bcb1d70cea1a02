"""The CPU path (``kernels.cpu``) against the float64 reference: forward, loss and every gradient
on the dense and the sparse code, for every architecture, and through the dispatcher."""

from __future__ import annotations

import warnings

import pytest
import torch
from patchsae import kernels
from patchsae.kernels import dispatch
from patchsae.kernels.cpu import cpu_sae_loss
from patchsae.kernels.reference import sae_loss as reference_sae_loss

from tests.helpers import jumprelu_thresholds, rel_err

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
OUTPUTS = ("loss", "mse", "l1", "aux", "f_NF", "x_hat_ND")
# fp32 against float64: sums of a few hundred products stay within ~1e-6 relative, but the
# gradient of x subtracts terms of similar size (a seed once gave 9e-5 against the reference's
# own 5e-6); a wrong term is O(1) off, so 2e-4 still catches one. The ghost term (an exp,
# rescaled by a ratio of errors) amplifies rounding, so the bound is also at least 4x what the
# reference itself loses in the same dtype. fp64 against float64: only the order of sums differs.
TOL = {torch.float32: 2e-4, torch.float64: 1e-10}


@pytest.fixture(autouse=True)
def _reset():
    dispatch.stats.reset()
    dispatch._warned.clear()
    previous = dispatch.set_sparse_threshold(None)
    yield
    dispatch.set_sparse_threshold(previous)


def make_inputs(density: float, dtype=torch.float32, n=53, d=19, f=71, tied=False):
    """Inputs whose relu code has about ``density`` active entries (``b_enc`` sets it). The
    encoder's inputs are on grids (x, b_dec in 1/8, W_enc in 1/256, b_enc in 1/2048) so that the
    pre-activations are exact in fp32: the selection is the same in every dtype. With ``tied``,
    every other latent copies its neighbour, so that the selection meets exact ties."""
    x = torch.randint(-24, 25, (n, d)).double() / 8
    b_dec = torch.randint(-4, 5, (d,)).double() / 8
    W_enc = torch.randint(-60, 61, (d, f)).double() / 256
    pre = (x - b_dec) @ W_enc
    cut = torch.quantile(pre.flatten(), 1 - density).item()
    b_enc = torch.round((0.05 * torch.rand(f, dtype=torch.float64) - cut) * 2048) / 2048
    W_dec = torch.randn(f, d, dtype=torch.float64)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True) * (1 + torch.rand(f, 1, dtype=torch.float64))
    if tied:
        W_enc[:, 1::2] = W_enc[:, 0:-1:2]
        b_enc[1::2] = b_enc[0:-1:2]
    tensors = {"x": x, "W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    return {k: v.to(dtype) for k, v in tensors.items()}


def run(fn, inputs, *, grad_x: bool, **kw):
    """``fn``'s output and the gradients of a loss that uses every output (the code and the
    reconstruction too, as the trainer's callers may) with respect to the parameters (and x,
    and jumprelu's thresholds, named ``threshold``)."""
    leaves = {k: v.clone().requires_grad_(k != "x" or grad_x) for k, v in inputs.items()}
    if kw.get("threshold_F") is not None:
        leaves["threshold"] = kw["threshold_F"].to(inputs["x"].dtype).clone().requires_grad_()
        kw = kw | {"threshold_F": leaves["threshold"]}
    out = fn(*(leaves[k] for k in ("x", *PARAMS)), **kw)
    n, f = out.f_NF.shape
    weights_NF = torch.linspace(-1, 1, n * f, dtype=out.f_NF.dtype).reshape(n, f)
    loss = out.loss + (out.f_NF * weights_NF).sum() * 1e-2 + out.x_hat_ND.sum() * 1e-2
    names = [k for k in leaves if leaves[k].requires_grad]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    return out, dict(zip(names, grads, strict=True))


def assert_matches_reference(inputs, dtype, *, threshold, grad_x, **kw):
    info = {}

    def cpu(*args, **kwargs):
        out, info["step"] = cpu_sae_loss(*args, sparse_threshold=threshold, **kwargs)
        return out

    out, grads = run(cpu, inputs, grad_x=grad_x, **kw)
    ref_out, ref_grads = run(
        reference_sae_loss, {k: v.double() for k, v in inputs.items()}, grad_x=grad_x, **kw
    )
    same_out, same_grads = run(reference_sae_loss, inputs, grad_x=grad_x, **kw)  # in ``dtype``
    assert out.f_NF.dtype == dtype and grads.keys() == ref_grads.keys()
    if ref_out.aux.item() == 0:
        assert out.aux.item() == 0, "aux must be exactly 0 without silent latents"
    assert torch.equal(out.f_NF > 0, ref_out.f_NF > 0), "the code selects other latents"
    pairs = [(n, getattr(out, n), getattr(ref_out, n), getattr(same_out, n)) for n in OUTPUTS]
    pairs += [(f"grad {n}", g, ref_grads[n], same_grads[n]) for n, g in grads.items()]
    for name, got, want, same in pairs:
        err, bound = rel_err(got, want), max(TOL[dtype], 4 * rel_err(same, want))
        assert err <= bound, f"{name}: relative error {err:.2e} > {bound:.1e}"
    return info["step"]


# (architecture, dtype, density, sparse, mse_norm, l1_decoder_norm, grad of x, tied latents)
CASES = [
    ("relu", torch.float32, 0.01, True, "none", False, False, False),
    ("relu", torch.float32, 0.01, False, "token_norm", True, True, False),
    ("relu", torch.float32, 0.3, True, "token_norm", True, True, False),
    ("relu", torch.float32, 0.3, False, "none", False, False, False),
    ("relu", torch.float64, 0.05, True, "none", True, True, False),
    ("relu", torch.float64, 0.05, False, "token_norm", False, False, False),
    ("topk", torch.float32, 0.5, True, "none", False, True, True),
    ("topk", torch.float32, 0.5, False, "token_norm", False, False, False),
    ("topk", torch.float64, 0.5, True, "token_norm", False, False, True),
    ("batchtopk", torch.float32, 0.5, True, "token_norm", False, True, True),
    ("batchtopk", torch.float32, 0.5, False, "none", False, False, False),
    ("batchtopk", torch.float64, 0.5, True, "none", False, True, False),
    ("jumprelu", torch.float32, 0.5, True, "none", False, True, False),
    ("jumprelu", torch.float32, 0.5, False, "token_norm", False, False, True),
    ("jumprelu", torch.float64, 0.5, True, "token_norm", False, False, False),
    ("jumprelu", torch.float64, 0.5, False, "none", False, True, False),
]


@pytest.mark.parametrize(
    "architecture,dtype,density,sparse,mse_norm,l1_decoder_norm,grad_x,tied",
    CASES,
    ids=[
        f"{c[0]}-{str(c[1])[6:]}-{c[2]}-{'sparse' if c[3] else 'dense'}-{c[4]}"
        f"{'-dnorm' if c[5] else ''}{'-gx' if c[6] else ''}{'-tied' if c[7] else ''}"
        for c in CASES
    ],
)
def test_cpu_path_matches_float64_reference(
    seed, architecture, dtype, density, sparse, mse_norm, l1_decoder_norm, grad_x, tied
):
    inputs = make_inputs(density, dtype, tied=tied)
    silent_F = torch.rand(inputs["W_enc"].shape[1]) < 0.2  # ghost grads / AuxK on these
    jumprelu = architecture == "jumprelu"
    threshold_F = jumprelu_thresholds(inputs, 0.8) if jumprelu else None
    step = assert_matches_reference(
        inputs,
        dtype,
        threshold=1.0 if sparse else 0.0,
        grad_x=grad_x,
        architecture=architecture,
        l1_coeff=0.05,
        mse_norm=mse_norm,
        l1_decoder_norm=l1_decoder_norm,
        ghost_mask_F=silent_F,
        k=6,
        threshold_F=threshold_F,
        bandwidth=0.3,
        aux_k=5,
        aux_coeff=0.5,
    )
    assert step.sparse == sparse and step.ghost_latents == int(silent_F.sum())


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_jumprelu_window_and_l0_term(seed, sparse):
    """The thresholds' gradient comes from the entries in their windows only: a threshold with
    none gets exactly 0, the others (at 0 too) the reference's value; the L0 term is
    ``l1_coeff`` times the active entries per token."""
    inputs = make_inputs(0.5)
    threshold_F = jumprelu_thresholds(inputs, 0.7)
    threshold_F[:10] = 1000.0  # no pre-activation near these
    threshold_F[10:15] = 0.0  # relu's code, a threshold the trainer's |z| can reach
    kw = dict(architecture="jumprelu", threshold_F=threshold_F, bandwidth=0.3, l1_coeff=0.2)

    def cpu(*tensors, **options):
        return cpu_sae_loss(*tensors, sparse_threshold=1.0 if sparse else 0.0, **options)[0]

    out, grads = run(cpu, inputs, grad_x=False, **kw)
    ref, ref_grads = run(reference_sae_loss, inputs, grad_x=False, **kw)
    assert torch.all(grads["threshold"][:10] == 0) and grads["threshold"][10:].abs().sum() > 0
    assert rel_err(grads["threshold"], ref_grads["threshold"]) < TOL[torch.float32]
    n_active = int((out.f_NF != 0).sum())
    assert 0 < n_active < out.f_NF.numel() and torch.equal(out.f_NF, ref.f_NF)
    assert out.l1.item() == pytest.approx(0.2 * n_active / out.f_NF.shape[0], rel=1e-6)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_no_active_latent_and_no_silent_latent(seed, sparse):
    inputs = make_inputs(0.1)
    inputs["b_enc"] = inputs["b_enc"] - 100.0  # nothing fires
    step = assert_matches_reference(
        inputs,
        torch.float32,
        threshold=1.0 if sparse else 0.0,
        grad_x=True,
        l1_coeff=0.1,
        ghost_mask_F=torch.zeros(inputs["W_enc"].shape[1], dtype=torch.bool),
    )
    assert step.sparse == sparse and step.active == 0


def test_threshold_decides_per_batch_from_the_measured_density(seed):
    inputs = make_inputs(0.1)
    for threshold, sparse in ((0.0, False), (0.05, False), (0.2, True), (1.0, True)):
        out, step = cpu_sae_loss(*inputs.values(), l1_coeff=0.1, sparse_threshold=threshold)
        density = step.active / out.f_NF.numel()
        assert step.active == int((out.f_NF > 0).sum()) and 0.05 < density < 0.2
        assert step.sparse == sparse, threshold


def test_auto_takes_the_cpu_path_and_counts_sparse_steps(seed, monkeypatch):
    monkeypatch.setenv("PATCHSAE_KERNELS", "auto")
    monkeypatch.delenv("PATCHSAE_SPARSE_THRESHOLD", raising=False)
    assert kernels.kernel_path() == ("triton" if torch.cuda.is_available() else "cpu")
    assert kernels.sparse_threshold("cpu") == dispatch.DEFAULT_CPU_SPARSE_THRESHOLD
    assert kernels.sparse_threshold("cuda") == dispatch.DEFAULT_SPARSE_THRESHOLD
    dense, sparse = make_inputs(0.3), make_inputs(0.005)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning under auto
        want = reference_sae_loss(*sparse.values(), l1_coeff=0.1)
        got = kernels.sae_loss(*sparse.values(), l1_coeff=0.1)
        kernels.sae_loss(*dense.values(), l1_coeff=0.1)
        kw = dict(l1_coeff=0.1, architecture="jumprelu", bandwidth=0.3)
        threshold_F = jumprelu_thresholds(dense, 0.8)
        kernels.sae_loss(*dense.values(), threshold_F=threshold_F, **kw)
        # a negative threshold is not one the CPU path takes: the reference, silently under auto
        threshold_F[3] = -0.1
        kernels.sae_loss(*dense.values(), threshold_F=threshold_F, **kw)
    torch.testing.assert_close(got.loss, want.loss)
    assert kernels.stats.steps == 4 and kernels.stats.sparse_steps == 1
    assert kernels.stats.eager_fallbacks == 1


def test_cpu_choice_warns_on_what_it_does_not_take(monkeypatch):
    monkeypatch.setenv("PATCHSAE_KERNELS", "cpu")
    assert kernels.kernel_path() == "cpu"
    inputs = {k: v.to(torch.bfloat16) for k, v in make_inputs(0.1).items()}
    with pytest.warns(UserWarning, match="CPU SAE path: relu on torch.bfloat16"):
        out = kernels.sae_loss(*inputs.values(), l1_coeff=0.1)
    want = reference_sae_loss(*inputs.values(), l1_coeff=0.1)
    assert out.loss.item() == want.loss.item() and kernels.stats.eager_fallbacks == 1


def _train(monkeypatch, path: str, architecture: str, steps: int = 6) -> list[float]:
    """A few Adam steps of a small SAE through the dispatcher, ghost grads / AuxK on the latents
    silent at the previous step."""
    from patchsae.trainer.sae import SparseAutoencoder

    monkeypatch.setenv("PATCHSAE_KERNELS", path)
    gen = torch.Generator().manual_seed(1234)
    torch.manual_seed(4321)
    sae = SparseAutoencoder(48, 400, architecture=architecture, k=12, threshold=0.3)
    with torch.no_grad():
        sae.b_enc.fill_(-0.5)  # a sparse code from the start
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    fired_F = torch.zeros(400, dtype=torch.bool)
    losses = []
    for _ in range(steps):
        x = torch.randn(40, 48, generator=gen)
        out = sae(
            x,
            l1_coeff=1e-2,
            mse_norm="token_norm",
            ghost_mask_F=~fired_F,
            aux_k=24,
            aux_coeff=0.5,
            bandwidth=0.1,
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sae.normalize_decoder()
        fired_F = (out.f_NF > 0).any(0)
        losses += [out.loss.item(), out.mse.item(), out.l1.item(), out.aux.item()]
    return losses


@pytest.mark.parametrize(
    "architecture,threshold",
    [("relu", 0.0), ("relu", 1.0), ("topk", 1.0), ("batchtopk", 0.0), ("jumprelu", 1.0)],
    ids=["relu-dense", "relu-sparse", "topk-sparse", "batchtopk-dense", "jumprelu-sparse"],
)
def test_short_training_run_matches_eager(monkeypatch, architecture, threshold):
    dispatch.set_sparse_threshold(threshold)
    eager = _train(monkeypatch, "eager", architecture)
    cpu = _train(monkeypatch, "cpu", architecture)
    assert kernels.stats.eager_fallbacks == 0 and kernels.stats.steps == 12
    assert kernels.stats.sparse_steps == (6 if threshold else 0)
    assert cpu == pytest.approx(eager, rel=1e-5, abs=1e-7)
    assert max(cpu[3::4]) > 0  # the ghost / AuxK / pull term was on
    if architecture == "jumprelu":  # the L0 term, and the thresholds moved the same way
        assert min(cpu[2::4]) > 0


@pytest.mark.parametrize("n,f", [(37, 101), (700, 300)], ids=["small", "sampled-cut"])
@pytest.mark.parametrize("levels", [3, 1000], ids=["many-ties", "few-ties"])
def test_cpu_selections_follow_the_tie_rule(seed, levels, n, f):
    """On a CPU ``top_mask`` keeps ``topk``'s choice where no left-out entry ties the k-th value
    and the batch selection ranks only the entries above a cut from a strided sample (at 700 x
    300; all positive ones at the small size); both must equal the rule (the lower row-major
    index wins among equal values) with ties common and rare."""
    from patchsae.kernels.cpu import _keep_batch_top_
    from patchsae.kernels.reference import _top_mask_rule, top_mask

    values_NF = torch.randint(-levels, levels, (n, f)).float()
    values_NF += torch.rand(n, f) * (levels > 3)  # few ties: mostly distinct values
    assert torch.equal(top_mask(values_NF, 7), _top_mask_rule(values_NF, 7))
    code_NF = values_NF.relu()
    kept_NF = code_NF.clone()
    _keep_batch_top_(kept_NF, 7)
    want_NF = code_NF * _top_mask_rule(code_NF.reshape(1, -1), 7 * n).reshape(n, f)
    assert torch.equal(kept_NF, want_NF)
    assert int((kept_NF > 0).sum()) == min(7 * n, int((code_NF > 0).sum()))
