"""The Triton SAE kernels against the eager reference run in float64.

On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py and
the Makefile). With ``TRITON_INTERPRET=0`` on a GPU host the same tests run compiled on the GPU,
plus the ``gpu`` tests at realistic sizes (bf16 included):

    TRITON_INTERPRET=0 pytest -q tests/test_triton_kernels.py

The shapes are tiny but awkward: N = 37 tokens (two token tiles, the second nearly empty),
D = 71 (not a power of two: a full and a ragged block), F = 1,000 latents (ragged last tile;
200 at 50% density, where the sparse path is slow in the interpreter).
Every kernel output is allocated NaN-filled (``poisoned_outputs``), so an element a kernel
forgets to write fails the comparison.

Inputs sit on a grid of small binary fractions (x in 1/8 steps, W_enc in 1/256 steps, b_enc
in 1/2048 steps), so the pre-activations are exact in fp32 and fp16 accumulation alike: the
ReLU makes the same on/off decisions as the float64 reference, and a comparison never fails
because one entry sits within rounding of zero. The data are fresh each run; the seed is
printed (and shown by pytest) when a test fails.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from patchsae import kernels
from patchsae.kernels import dispatch
from patchsae.kernels import triton_kernels as tk
from patchsae.kernels.autograd import sparse_capacity, triton_sae_loss
from patchsae.kernels.reference import sae_loss as reference_sae_loss

from tests.helpers import jumprelu_thresholds, rel_err

N, D, F = 37, 71, 1000
DEVICE = "cpu" if tk.INTERPRET or not torch.cuda.is_available() else "cuda"
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
SAE_OUTPUTS = ("loss", "mse", "l1", "aux", "f_NF", "x_hat_ND")

# Tolerances on max|got - want| / max|want| per tensor, against float64:
# fp32: sums of at most ~1,000 fp32 products (eps 6e-8) stay within ~1e-6 of the exact value;
#   5e-5 leaves a wide margin yet fails any wrong term (those are O(1) off).
# fp16: outputs and gradients are rounded to fp16 (eps 4.9e-4) and the code f is rounded
#   before it is decoded, so a few roundings add up; 5e-3 is ten fp16 ulps.
TOL = {torch.float32: 5e-5, torch.float16: 5e-3}


@pytest.fixture(autouse=True)
def _poison_and_reset():
    dispatch.stats.reset()
    dispatch._warned.clear()
    previous = dispatch.set_sparse_threshold(None)
    with tk.poisoned_outputs():
        yield
    dispatch.set_sparse_threshold(previous)


def make_inputs(density: float, dtype=torch.float32, n=N, d=D, f=F) -> dict[str, torch.Tensor]:
    """Grid-valued inputs (see the module doc) whose code has about ``density`` active
    entries; b_enc sets the density."""
    x = torch.randint(-24, 25, (n, d)).double() / 8
    b_dec = torch.randint(-8, 9, (d,)).double() / 8
    scale = round(256 / (1.7 * math.sqrt(d)))  # pre-activations of about unit size
    W_enc = torch.randint(-scale, scale + 1, (d, f)).double() / 256
    pre = (x - b_dec) @ W_enc
    cut = torch.quantile(pre.flatten(), 1 - density).item()
    jitter = torch.rand(f, dtype=torch.float64) * 0.05  # latents differ a little
    b_enc = torch.round((jitter - cut) * 2048) / 2048
    W_dec = torch.randn(f, d, dtype=torch.float64)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True) * (1 + torch.rand(f, 1, dtype=torch.float64))
    tensors = {"x": x, "W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    return {k: v.to(DEVICE, dtype) for k, v in tensors.items()}


def run(fn, inputs, *, grad_x=False, extra_loss=None, **kw):
    """Run ``fn`` (the reference or the Triton path) on copies of ``inputs``; returns the
    output and the gradients of its loss with respect to x (if asked), the parameters and
    jumprelu's thresholds (``threshold``), in the inputs' dtype."""
    leaves = {k: v.clone().requires_grad_(k != "x" or grad_x) for k, v in inputs.items()}
    if kw.get("threshold_F") is not None:
        leaves["threshold"] = kw["threshold_F"].to(inputs["x"].dtype).clone().requires_grad_()
        kw = kw | {"threshold_F": leaves["threshold"]}
    out = fn(*(leaves[k] for k in ("x", *PARAMS)), **kw)
    loss = out.loss if extra_loss is None else out.loss + extra_loss(out)
    names = [k for k in leaves if leaves[k].requires_grad]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    return out, dict(zip(names, grads, strict=True))


def reference(inputs, **kw):
    return run(reference_sae_loss, {k: v.double() for k, v in inputs.items()}, **kw)


def triton(inputs, threshold: float, **kw):
    info = {}

    def fn(*args, **kwargs):
        out, info["step"] = triton_sae_loss(*args, sparse_threshold=threshold, **kwargs)
        return out

    out, grads = run(fn, inputs, **kw)
    return out, grads, info["step"]


def errors(got, want) -> dict[str, float]:
    """Relative error of every output and gradient; ``aux`` must be exactly 0 where the
    reference's is."""
    (out, grads), (ref_out, ref_grads) = got, want
    assert grads.keys() == ref_grads.keys()
    if ref_out.aux.item() == 0:
        assert out.aux.item() == 0, "aux must be exactly 0 without masked latents"
    errs = {n: rel_err(getattr(out, n), getattr(ref_out, n)) for n in SAE_OUTPUTS}
    errs.update({f"grad {n}": rel_err(grads[n], ref_grads[n]) for n in grads})
    return errs


def assert_close(got, want, tol: float) -> None:
    for name, err in errors(got, want).items():
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


# (dtype, density, sparse, mse_norm, l1_decoder_norm, grad of x): densities 0.1% to 50%, both
# paths, both dtypes; the loss options rotate so that each appears on each path.
CASES = [
    (torch.float32, 0.001, True, "none", False, False),
    (torch.float32, 0.001, False, "token_norm", True, True),
    (torch.float32, 0.02, True, "token_norm", True, True),
    (torch.float32, 0.02, False, "none", False, False),
    (torch.float32, 0.5, True, "none", True, False),
    (torch.float32, 0.5, False, "token_norm", False, True),
    (torch.float16, 0.001, False, "none", True, False),
    (torch.float16, 0.02, True, "none", False, True),
    (torch.float16, 0.5, True, "token_norm", True, False),
    (torch.float16, 0.5, False, "token_norm", False, True),
]


@pytest.mark.parametrize(
    "dtype,density,sparse,mse_norm,l1_decoder_norm,grad_x",
    CASES,
    ids=[f"{str(c[0])[6:]}-{c[1]}-{'sparse' if c[2] else 'dense'}-{c[3]}" for c in CASES],
)
def test_forward_and_gradients_match_float64_reference(
    seed, dtype, density, sparse, mse_norm, l1_decoder_norm, grad_x
):
    inputs = make_inputs(density, dtype, f=200 if density >= 0.5 else F)
    kw = dict(l1_coeff=0.37, mse_norm=mse_norm, l1_decoder_norm=l1_decoder_norm, grad_x=grad_x)
    *got, step = triton(inputs, threshold=1.0 if sparse else 0.0, **kw)
    assert step.sparse == sparse
    assert_close(got, reference(inputs, **kw), TOL[dtype])


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_no_active_latent(seed, sparse):
    """An all-zero code: the sparse path has no entries at all, and gradients that must be
    exactly zero are."""
    inputs = make_inputs(0.01, f=100)
    inputs["b_enc"] -= 100.0
    kw = dict(l1_coeff=0.3, mse_norm="token_norm", l1_decoder_norm=True)
    *got, step = triton(inputs, threshold=1.0 if sparse else 0.0, **kw)
    assert step.sparse == sparse and (step.active == 0 or not sparse)
    assert_close(got, reference(inputs, **kw), TOL[torch.float32])
    grads = got[1]
    assert not grads["W_enc"].any() and not grads["b_enc"].any() and not grads["W_dec"].any()


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_ghost_gradients_match_reference(seed, sparse):
    inputs = make_inputs(0.02)
    mask = torch.zeros(F, dtype=torch.bool, device=DEVICE)
    mask[torch.randperm(F)[:40]] = True
    kw = dict(l1_coeff=0.1, mse_norm="token_norm", ghost_mask_F=mask, grad_x=True)
    *got, step = triton(inputs, threshold=1.0 if sparse else 0.0, **kw)
    want = reference(inputs, **kw)
    assert step.ghost_latents == 40 and step.sparse == sparse
    assert want[0].aux.item() > 0
    # The ghost term is rescaled per element by err / (ghost_err + 1e-6), most sensitive to
    # rounding where ghost_err is near that 1e-6: the eager reference itself, run in fp32, is
    # up to ~1.5e-4 off its float64 result here.
    assert_close(got, want, 2e-3)


def test_empty_ghost_mask_gives_exactly_zero_aux(seed):
    inputs = make_inputs(0.02)
    kw = dict(l1_coeff=0.1, ghost_mask_F=torch.zeros(F, dtype=torch.bool, device=DEVICE))
    (out, grads), want = triton(inputs, threshold=0.0, **kw)[:2], reference(inputs, **kw)
    assert out.aux.item() == 0.0
    assert_close((out, grads), want, TOL[torch.float32])


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_gradients_through_code_and_reconstruction(seed, sparse):
    """Losses that use f_NF and x_hat_ND directly reach the parameters like the reference."""
    inputs = make_inputs(0.02)
    r_NF = torch.randn(N, F, dtype=torch.float64, device=DEVICE)
    r_ND = torch.randn(N, D, dtype=torch.float64, device=DEVICE)

    def extra(out):
        return (out.f_NF * r_NF.to(out.f_NF.dtype)).sum() + (
            out.x_hat_ND * r_ND.to(out.x_hat_ND.dtype)
        ).sum() * 1e-2

    kw = dict(l1_coeff=0.2, extra_loss=extra, grad_x=True)
    *got, step = triton(inputs, threshold=1.0 if sparse else 0.0, **kw)
    assert step.sparse == sparse
    assert_close(got, reference(inputs, **kw), TOL[torch.float32])


def test_sparse_and_dense_paths_agree(seed):
    inputs = make_inputs(0.01)
    kw = dict(l1_coeff=0.25, mse_norm="token_norm", l1_decoder_norm=True, grad_x=True)
    *dense, dense_step = triton(inputs, threshold=0.0, **kw)
    *sparse, sparse_step = triton(inputs, threshold=1.0, **kw)
    assert not dense_step.sparse and sparse_step.sparse
    # Both are fp32 with the same ReLU decisions; only summation order differs.
    assert_close(sparse, dense, 1e-5)


def test_encoder_outputs_and_sparse_code(seed):
    inputs = make_inputs(0.02)
    x, W_enc, b_enc, W_dec, b_dec = (inputs[k] for k in ("x", *PARAMS))
    s_F = W_dec.norm(dim=1)
    enc = tk.encode(x - b_dec, W_enc, b_enc, s_F=s_F, colsum=True, capacity=64)
    f_ref = torch.relu((x.double() - b_dec.double()) @ W_enc.double() + b_enc.double())
    assert rel_err(enc.f_NF, f_ref) <= TOL[torch.float32]
    assert rel_err(enc.l1_N, (f_ref * s_F.double()).sum(1)) <= TOL[torch.float32]
    assert rel_err(enc.colsum_F, f_ref.sum(0)) <= TOL[torch.float32]
    assert torch.equal(enc.nnz_N, (f_ref > 0).sum(1).int())
    for n in range(N):
        k = int(enc.nnz_N[n])
        idx = enc.idx_NK[n, :k].sort().values
        assert torch.equal(idx, (f_ref[n] > 0).nonzero().flatten().int())
        assert torch.equal(enc.val_NK[n, :k].sort().values, enc.f_NF[n, idx.long()].sort().values)
    # The transpose: every entry once, sorted by latent then token, with its segment.
    code = tk.latent_major(enc.idx_NK, enc.nnz_N, F, int(enc.nnz_N.sum()))
    tok, lat = (f_ref > 0).T.nonzero().T.int().flip(0)  # latent-major order of (token, latent)
    assert torch.equal(code.lat_E, lat) and torch.equal(code.tok_E, tok)
    assert torch.equal(enc.idx_NK.view(-1)[code.perm_E], lat)
    assert torch.equal(code.seg_F1.diff(), (f_ref > 0).sum(0).int())


def test_compact_code_overflow_is_counted_and_falls_back_to_dense(seed):
    inputs = make_inputs(0.005)
    threshold = 0.02
    capacity = sparse_capacity(threshold, F)
    # Token 3 scaled 4x about b_dec (still on the grid) fires on about a quarter of the
    # latents: more than its slots, while the batch stays under the threshold.
    x, b_dec = inputs["x"], inputs["b_dec"]
    x[3] = b_dec + 4 * (x[3] - b_dec)
    enc = tk.encode(x - b_dec, inputs["W_enc"], inputs["b_enc"], capacity=capacity)
    assert capacity < int(enc.nnz_N[3]) and int(enc.nnz_N.sum()) <= threshold * N * F
    kw = dict(l1_coeff=0.3)
    *got, step = triton(inputs, threshold=threshold, **kw)
    assert step.max_row_active == int(enc.nnz_N[3]) and not step.sparse
    assert_close(got, reference(inputs, **kw), TOL[torch.float32])


def test_dispatcher_picks_the_path_the_threshold_says(seed, monkeypatch):
    monkeypatch.setenv("PATCHSAE_KERNELS", "triton")
    assert kernels.kernel_path() == "triton"
    inputs = make_inputs(0.01, f=400)
    density = None
    # threshold above, at 0 (off) and below this batch's density
    for threshold, expect_sparse in [(0.05, True), (0.0, False), (0.002, False)]:
        monkeypatch.setenv("PATCHSAE_SPARSE_THRESHOLD", str(threshold))
        assert kernels.sparse_threshold() == threshold
        before = kernels.stats.sparse_steps
        out = kernels.sae_loss(*inputs.values(), l1_coeff=0.1)
        assert kernels.stats.sparse_steps - before == int(expect_sparse)
        density = (out.f_NF > 0).double().mean().item()
    assert 0.002 < density < 0.05  # make_inputs aims at 0.01
    kernels.set_sparse_threshold(0.05)  # the override wins over the environment
    monkeypatch.setenv("PATCHSAE_SPARSE_THRESHOLD", "0")
    assert kernels.sparse_threshold() == 0.05
    kernels.sae_loss(*inputs.values(), l1_coeff=0.1)
    assert kernels.stats.steps == 4 and kernels.stats.sparse_steps == 2
    assert kernels.stats.sparse_step_frac == 0.5
    kernels.stats.reset()
    assert kernels.stats.steps == kernels.stats.sparse_steps == 0


def test_dispatch_settings_errors_and_fallbacks(monkeypatch):
    monkeypatch.setenv("PATCHSAE_SPARSE_THRESHOLD", "lots")
    with pytest.raises(ValueError, match="PATCHSAE_SPARSE_THRESHOLD"):
        kernels.sparse_threshold()
    with pytest.raises(ValueError, match="density"):
        kernels.set_sparse_threshold(1.5)
    monkeypatch.setenv("PATCHSAE_KERNELS", "eager")
    assert kernels.kernel_path() == "eager"
    monkeypatch.setenv("PATCHSAE_KERNELS", "auto")
    assert kernels.kernel_path() == ("triton" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("PATCHSAE_KERNELS", "triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            kernels.kernel_path()
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    # float64 is not a kernel dtype: the reference runs, and the fallback is counted.
    inputs = make_inputs(0.05, torch.float64, n=5, d=6, f=7)
    with pytest.warns(UserWarning, match="eager reference"):
        out = kernels.sae_loss(*inputs.values(), l1_coeff=0.1)
    want = reference_sae_loss(*inputs.values(), l1_coeff=0.1)
    assert out.loss.item() == want.loss.item() and kernels.stats.eager_fallbacks == 1


# topk and batchtopk on the sparse Triton path (kernels.topk): (architecture, dtype, mse_norm,
# grad of x, tied latents). Half the pre-activations are positive, so the selection (not the
# ReLU) decides the code; with tied latents every other W_enc column and b_enc entry is a copy
# of its neighbour's, so exact ties at the k-th value are common and the reference's rule
# (the lower index wins) must be followed.
TOPK_CASES = [
    ("topk", torch.float32, "none", True, False),
    ("topk", torch.float32, "token_norm", False, True),
    ("topk", torch.float16, "none", False, True),
    ("batchtopk", torch.float32, "token_norm", True, False),
    ("batchtopk", torch.float32, "none", False, True),
    ("batchtopk", torch.float16, "token_norm", True, False),
]


def topk_inputs(dtype, tied: bool) -> dict[str, torch.Tensor]:
    inputs = make_inputs(0.5, dtype, f=230)
    if tied:
        inputs["W_enc"][:, 1::2] = inputs["W_enc"][:, ::2]
        inputs["b_enc"][1::2] = inputs["b_enc"][::2]
    return inputs


@pytest.mark.parametrize(
    "architecture,dtype,mse_norm,grad_x,tied",
    TOPK_CASES,
    ids=[f"{c[0]}-{str(c[1])[6:]}-{c[2]}{'-tied' if c[4] else ''}" for c in TOPK_CASES],
)
def test_topk_and_batchtopk_match_float64_reference(
    seed, architecture, dtype, mse_norm, grad_x, tied
):
    from patchsae.kernels.topk import triton_topk_loss

    inputs = topk_inputs(dtype, tied)
    dead = torch.zeros(230, dtype=torch.bool, device=DEVICE)
    dead[torch.randperm(230)[:31]] = True
    kw = dict(architecture=architecture, k=9, mse_norm=mse_norm, ghost_mask_F=dead, aux_k=6)
    kw |= dict(aux_coeff=0.25, grad_x=grad_x)
    info = {}

    def fn(*tensors, **options):
        out, info["step"] = triton_topk_loss(*tensors, **options)
        return out

    got = run(fn, inputs, **kw)
    if dtype == torch.float32:  # pre-activations exact: the same selection as in float64
        want = reference(inputs, l1_coeff=0.0, **kw)
    else:  # fp16 rounds pre, which moves the k-th value: select as the fp16 reference does
        want = run(reference_sae_loss, inputs, l1_coeff=0.0, **kw)
    assert info["step"].sparse and info["step"].ghost_latents == 31
    assert want[0].aux.item() > 0 and torch.equal(got[0].f_NF > 0, want[0].f_NF > 0)
    if architecture == "topk":
        assert ((got[0].f_NF > 0).sum(dim=1) <= 9).all()
    else:
        assert 0 < (got[0].f_NF > 0).sum().item() <= 9 * N
    assert_close(got, want, TOL[dtype])


# jumprelu on the sparse Triton path: (dtype, mse_norm, grad of x, gradient through the code)
JUMPRELU_CASES = [
    (torch.float32, "none", True, False),
    (torch.float32, "token_norm", False, True),
    (torch.float16, "token_norm", True, True),
]


@pytest.mark.parametrize(
    "dtype,mse_norm,grad_x,through_code",
    JUMPRELU_CASES,
    ids=[f"{str(c[0])[6:]}-{c[1]}{'-gx' if c[2] else ''}{'-gf' if c[3] else ''}"
         for c in JUMPRELU_CASES],
)  # fmt: skip
def test_jumprelu_matches_float64_reference(seed, dtype, mse_norm, grad_x, through_code):
    """The code, the L0 term and every gradient, the thresholds' straight-through one
    included (from the entries in each threshold's window, below it too), with dead latents
    masked (their pre-activation pull, on their columns only)."""
    from patchsae.kernels.topk import triton_topk_loss

    inputs = make_inputs(0.5, dtype, f=230)
    threshold_F = jumprelu_thresholds(inputs, 0.7)
    threshold_F[:7] = 1000.0  # nothing in these windows: a gradient of exactly 0
    threshold_F[7:12] = 0.0  # relu's code, a threshold the trainer's |z| can reach
    dead = torch.rand(230, device=DEVICE) < 0.2
    dead[:12] = False  # a pull on these would reach the thresholds above
    kw = dict(architecture="jumprelu", threshold_F=threshold_F, bandwidth=0.3, l1_coeff=0.2)
    kw |= dict(mse_norm=mse_norm, ghost_mask_F=dead, aux_coeff=0.5, grad_x=grad_x)
    if through_code:
        weights = torch.linspace(-1, 1, N * 230, device=DEVICE).reshape(N, 230)
        kw["extra_loss"] = lambda out: (out.f_NF * weights.to(out.f_NF.dtype)).sum() * 1e-2
    info = {}

    def fn(*tensors, **options):
        out, info["step"] = triton_topk_loss(*tensors, **options)
        return out

    got = run(fn, inputs, **kw)
    if dtype == torch.float32:  # pre-activations exact: the same code as in float64
        want = reference(inputs, **kw)
    else:  # fp16 rounds pre: compare with the reference in fp16, which decides alike
        want = run(reference_sae_loss, inputs, **kw)
    assert info["step"].sparse and info["step"].ghost_latents == int(dead.sum())
    assert torch.equal(got[0].f_NF != 0, want[0].f_NF != 0) and want[0].aux.item() > 0
    assert torch.all(got[1]["threshold"][:7] == 0) and got[1]["threshold"].abs().sum() > 0
    n_active = int((got[0].f_NF != 0).sum())
    assert got[0].l1.item() == pytest.approx(0.2 * n_active / N, rel=1e-3)
    assert_close(got, want, TOL[dtype])


def test_topk_through_the_dispatcher_takes_the_triton_path(seed, monkeypatch):
    monkeypatch.setenv("PATCHSAE_KERNELS", "triton")
    inputs = topk_inputs(torch.float32, tied=False)
    for architecture in ("topk", "batchtopk"):
        before = kernels.stats.sparse_steps
        out = kernels.sae_loss(*inputs.values(), l1_coeff=0.1, architecture=architecture, k=5)
        want = reference_sae_loss(*inputs.values(), l1_coeff=0.1, architecture=architecture, k=5)
        assert kernels.stats.sparse_steps == before + 1 and kernels.stats.eager_fallbacks == 0
        assert rel_err(out.loss, want.loss) < 1e-5 and out.l1.item() == 0.0
    kw = dict(l1_coeff=0.1, architecture="jumprelu", bandwidth=0.3)
    threshold = jumprelu_thresholds(inputs, 0.7)
    before = kernels.stats.sparse_steps
    out = kernels.sae_loss(*inputs.values(), threshold_F=threshold, **kw)
    want = reference_sae_loss(*inputs.values(), threshold_F=threshold, **kw)
    assert kernels.stats.sparse_steps == before + 1 and kernels.stats.eager_fallbacks == 0
    assert rel_err(out.loss, want.loss) < 1e-5 and out.l1.item() > 0
    # a negative threshold is not the Triton path's: the reference runs
    threshold[0] = -0.5
    with pytest.warns(UserWarning, match="negative jumprelu thresholds"):
        out = kernels.sae_loss(*inputs.values(), threshold_F=threshold, **kw)
    want = reference_sae_loss(*inputs.values(), threshold_F=threshold, **kw)
    assert out.loss.item() == want.loss.item() and kernels.stats.eager_fallbacks == 1


def _train(
    monkeypatch, path: str, threshold: float, steps: int = 5, architecture: str = "relu"
) -> list[float]:
    from patchsae.trainer.sae import SparseAutoencoder

    monkeypatch.setenv("PATCHSAE_KERNELS", path)
    kernels.set_sparse_threshold(threshold)
    gen = torch.Generator().manual_seed(1234)
    torch.manual_seed(4321)
    sae = SparseAutoencoder(48, 400, architecture=architecture, k=12, threshold=0.3).to(DEVICE)
    with torch.no_grad():
        sae.b_enc.fill_(-1.0)  # a sparse code (about 5%) from the start
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    fired_F = torch.zeros(400, dtype=torch.bool, device=DEVICE)
    losses = []
    for _ in range(steps):
        x = torch.randn(40, 48, generator=gen).to(DEVICE)
        ghost = ~fired_F  # ghost grads for latents silent at the previous step
        out = sae(
            x,
            l1_coeff=1e-3,
            mse_norm="token_norm",
            ghost_mask_F=ghost,
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


@pytest.mark.parametrize("threshold", [0.0, 1.0], ids=["dense", "sparse"])
def test_short_training_run_matches_eager(monkeypatch, threshold):
    eager = _train(monkeypatch, "eager", threshold)
    triton_losses = _train(monkeypatch, "triton", threshold)
    assert kernels.stats.sparse_steps == (5 if threshold else 0)
    # fp32 on both sides; Adam turns rounding-size gradient differences into updates of up
    # to lr, so allow 1e-4 relative on losses of order 1.
    assert triton_losses == pytest.approx(eager, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "jumprelu"])
def test_short_topk_training_run_matches_eager(monkeypatch, architecture):
    """Five Adam steps with AuxK on the latents silent at the previous step (jumprelu: the L0
    term, and thresholds that move with their straight-through gradient)."""
    eager = _train(monkeypatch, "eager", 0.0, architecture=architecture)
    triton_losses = _train(monkeypatch, "triton", 0.0, architecture=architecture)
    assert kernels.stats.sparse_steps == 5 and kernels.stats.eager_fallbacks == 0
    assert triton_losses == pytest.approx(eager, rel=1e-4, abs=1e-6)
    assert max(triton_losses[3::4]) > 0  # the AuxK (jumprelu: pull) term was on
    if architecture == "jumprelu":
        assert min(triton_losses[2::4]) > 0


def _compile_for_h100() -> list[str]:
    """Compile every kernel for an H100 (sm_90) ahead of time, bf16 and fp32: the interpreter
    never lowers to PTX, so this is what catches a kernel that cannot build on a GPU. Needs
    the kernels defined outside the interpreter (``TRITON_INTERPRET=0``); no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    built = []
    for dt in ("bf16", "fp32"):
        gd = dt  # grad_dtype: bf16 stays bf16, fp32 stays fp32
        gemm = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
        prec = "ieee" if dt == "fp32" else "tf32"
        variants = [
            (tk._encode_kernel, dict(L1_WEIGHTED=True, COLSUM=True, COMPACT=True, **gemm),
             f"*{dt} *{dt} *{dt} *fp32 *{dt} *fp32 *fp32 *i32 *i32 *{dt} i32 i32 i32 i32"),
            (tk._decode_dense_kernel, dict(**gemm),
             f"*{dt} *{dt} *{dt} *{dt} *fp32 *{dt} *fp32 *fp32 i32 i32 i32 fp32"),
            (tk._decode_sparse_kernel, dict(BLOCK_K=32, BLOCK_D=128),
             f"*i32 *{dt} *i32 *{dt} *{dt} *{dt} *fp32 *{dt} *fp32 *fp32 i32 i32 fp32"),
            (tk._latent_grad_dense_kernel,
             dict(L1_WEIGHTED=True, HAS_GF=True, BF16_DOT=dt == "bf16", **gemm),
             f"*{gd} *{dt} *{dt} *fp32 *fp32 *{dt} *{gd} *fp32 i32 i32 i32"),
            (tk._latent_grad_sparse_kernel, dict(L1_WEIGHTED=True, BLOCK_K=32, BLOCK_D=128),
             f"*{gd} *{dt} *i32 *i32 *fp32 *fp32 *fp32 i32 i32"),
            (tk._sparse_t_matmul_kernel,
             dict(WRITE_SUM=True, BF16_DOT=dt == "bf16", BLOCK_F=32, BLOCK_E=64, BLOCK_D=128),
             f"*i32 *i32 *fp32 *i32 *{gd} *{dt} *fp32 i32 i32 i32 i32"),
        ]  # fmt: skip
        for kernel, consts, types in variants:
            if "INPUT_PRECISION" in kernel.arg_names:
                consts["INPUT_PRECISION"] = prec
            runtime_args = [a for a in kernel.arg_names if a not in consts]
            signature = dict(zip(runtime_args, types.split(), strict=True))
            signature.update({name: "constexpr" for name in consts})
            triton.compile(
                ASTSource(kernel, signature, consts),
                target=GPUTarget("cuda", 90, 32),
                options={"num_warps": 8, "num_stages": 3},
            )
            built.append(f"{kernel.__name__}:{dt}")
    return built


def test_kernels_compile_for_h100():
    import subprocess
    import sys
    from pathlib import Path

    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this triton build has no bundled ptxas")
    code = "from tests.test_triton_kernels import _compile_for_h100; print(_compile_for_h100())"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count(":") == 12, proc.stdout


gpu = pytest.mark.skipif(
    DEVICE != "cuda", reason="needs a CUDA GPU and compiled kernels (TRITON_INTERPRET=0)"
)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_gpu_matches_float64_reference(seed, dtype, sparse):
    n, d, f = 1031, 768, 8192 + 77
    inputs = make_inputs(0.004, dtype, n=n, d=d, f=f)
    kw = dict(l1_coeff=0.1, mse_norm="token_norm", l1_decoder_norm=True, grad_x=True)
    *got, step = triton(inputs, threshold=0.05 if sparse else 0.0, **kw)
    assert step.sparse == sparse
    want = reference(inputs, **kw)
    if dtype == torch.float32:
        # fp32 dots follow torch's TF32 setting (off by default: ieee), sums of ~8,000 terms.
        assert_close(got, want, 1e-4)
        return
    # bf16 rounds the code, the reconstruction and every gradient operand (eps 3.9e-3): hold
    # the kernels to the eager reference run in bf16, or to 1e-2, whichever is looser.
    eager_errs = errors(run(reference_sae_loss, inputs, **kw), want)
    for name, err in errors(got, want).items():
        bound = max(1e-2, 2 * eager_errs[name])
        assert err <= bound, f"{name}: relative error {err:.2e} > {bound:.1e} (bf16)"


@pytest.mark.gpu
@gpu
def test_gpu_auto_dispatch_uses_triton(seed, monkeypatch):
    monkeypatch.setenv("PATCHSAE_KERNELS", "auto")
    inputs = make_inputs(0.5, torch.float32)
    assert kernels.kernel_path() == "triton"
    kernels.sae_loss(*inputs.values(), l1_coeff=0.1)
    assert kernels.stats.steps == 1 and kernels.stats.eager_fallbacks == 0
