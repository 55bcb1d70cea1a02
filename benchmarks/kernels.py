"""SAE kernel benchmark: one training step (forward + backward of the loss; the optimiser step
is not included) per implementation, printed as a table.

Columns: the eager reference, ``torch.compile`` of it, the Triton kernels forced dense
(threshold 0) and forced sparse (threshold a few times the batch's density). Rows per
(latents n, L0): ms per step, TFLOP/s-equivalent (the dense step's 10 * N * d * n FLOPs over
the time, whatever the path really does), that rate as a fraction of the cuBLAS GEMM rate
measured on the same card, and the peak memory above the inputs and parameters. A second table
gives the dense encoder kernel alone against cuBLAS for the same GEMM.

    python benchmarks/kernels.py                  # GPU: d 768; n 49,152, 2^18, 2^20;
                                                  # 4,096 tokens; bf16; L0 32, 150, 1,000
    python benchmarks/kernels.py --device cpu     # CPU: eager, compile and the CPU path
                                                  # (kernels.cpu) dense and sparse; d 256,
                                                  # n 4,096 and 16,384; 4,096 tokens; fp32
    TRITON_INTERPRET=1 python benchmarks/kernels.py --device cpu --interpret
                                                  # CPU smoke run of the Triton columns

L0 is set through b_enc: with unit-variance pre-activations, b_enc = -Phi^-1(1 - L0 / n)
gives L0 active latents per token on average. A third table times the ``topk`` architecture
(k = 32, 64, 128 at n = 49,152 and 2^18) and ``jumprelu`` at about the same L0: the eager
reference, compiled, and the Triton path (dense encoder GEMM, the selection, the sparse decoder
and backward, and jumprelu's threshold gradient from its window; ``kernels.topk``), or on a
CPU the CPU path.
Targets on an H100 (see issue #3): Triton step
at least 3x faster than torch.compile at n = 49,152, L0 = 150; dense encoder at least 75% of
the cuBLAS rate; peak memory not above eager's.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch  # noqa: E402
from patchsae.kernels.reference import sae_loss as eager_sae_loss  # noqa: E402

COLUMNS = ("eager", "compile", "triton dense", "triton sparse")
CPU_COLUMNS = ("eager", "compile", "cpu dense", "cpu sparse")
GPU_SIZES = {"d": 768, "tokens": 4096, "n": [49_152, 2**18, 2**20], "l0": [32, 150, 1000]}
CPU_SIZES = {"d": 256, "tokens": 4096, "n": [4096, 16_384], "l0": [12, 64, 256]}
TOPK_GPU = {"n": [49_152, 2**18], "k": [32, 64, 128]}
TOPK_CPU = {"n": [4096, 16_384], "k": [12, 32]}
TOPK_COLUMNS = ("eager", "compile", "triton")
TOPK_CPU_COLUMNS = ("eager", "compile", "cpu")
JUMPRELU_THRESHOLD = 0.05
"""jumprelu rows: every threshold, over inputs whose ReLU code has L0 k."""


def make_inputs(tokens: int, d: int, n: int, l0: int, dtype: torch.dtype, device: str):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, d, device=device, generator=gen)
    W_enc = torch.randn(d, n, device=device, generator=gen) / d**0.5
    W_dec = torch.randn(n, d, device=device, generator=gen)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    cut = torch.special.ndtri(torch.tensor(1 - l0 / n, dtype=torch.float64)).item()
    b_enc = torch.full((n,), -cut, device=device)
    b_dec = torch.zeros(d, device=device)
    params = [t.to(dtype).requires_grad_() for t in (W_enc, b_enc, W_dec, b_dec)]
    return x.to(dtype), params


def cpu_implementations() -> dict[str, Callable]:
    """The CPU path (``kernels.cpu``) forced dense and forced sparse."""
    from patchsae.kernels.cpu import cpu_sae_loss

    def cpu_at(threshold: float):
        return lambda *args, **kw: cpu_sae_loss(*args, sparse_threshold=threshold, **kw)[0]

    return {"cpu dense": cpu_at(0.0), "cpu sparse": cpu_at(1.0)}


def implementations(l0: int, n: int) -> dict[str, Callable]:
    from patchsae.kernels.autograd import triton_sae_loss

    def triton_at(threshold: float):
        def fn(*args, **kw):
            out, info = triton_sae_loss(*args, sparse_threshold=threshold, **kw)
            fn.sparse_steps += info.sparse
            return out

        fn.sparse_steps = 0
        return fn

    return {
        "triton dense": triton_at(0.0),
        # capacity is 8x the threshold's share per token: 32x L0 slots, no overflow.
        "triton sparse": triton_at(min(1.0, 4 * l0 / n)),
    }


class Timer:
    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def __call__(self, fn: Callable[[], None], warmup: int, iters: int) -> float:
        """Median milliseconds per call."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]


def gemm_rate(timer: Timer, tokens: int, d: int, n: int, dtype, device) -> float:
    """TFLOP/s of torch.matmul (cuBLAS on a GPU) for the encoder's GEMM shape."""
    a = torch.randn(tokens, d, device=device, dtype=dtype)
    b = torch.randn(d, n, device=device, dtype=dtype)
    ms = timer(lambda: a @ b, warmup=3, iters=10)
    return 2 * tokens * d * n / (ms * 1e-3) / 1e12


def step_stats(fn, x, params, timer: Timer, device: str, warmup: int, iters: int) -> dict:
    def step():
        for p in params:
            p.grad = None
        out = fn(x, *params, l1_coeff=1e-3)
        out.loss.backward()

    try:
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            step()  # compile / autotune outside the memory window
            for p in params:
                p.grad = None
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        ms = timer(step, warmup, iters)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device == "cuda" else None
        return {"ms": ms, "peak": peak}
    except torch.cuda.OutOfMemoryError:
        return {"ms": None, "peak": None, "note": "OOM"}
    finally:
        for p in params:
            p.grad = None


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--interpret", action="store_true",
                    help="CPU only: run the Triton columns in Triton's interpreter (smoke test)")  # fmt: skip
    ap.add_argument("--iters", type=int, default=None)
    args = ap.parse_args()
    device = args.device
    gpu = device == "cuda"
    if args.interpret and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--interpret needs TRITON_INTERPRET=1 in the environment")
    sizes = GPU_SIZES if gpu else CPU_SIZES
    if args.interpret:
        sizes = {"d": 48, "tokens": 64, "n": [512], "l0": [8]}
    # bf16 on the GPU (the setting); the CPU run uses fp32, which CPUs and the
    # interpreter handle well.
    dtype = torch.bfloat16 if gpu else torch.float32
    iters = args.iters or (20 if gpu else 3)
    warmup = 3 if gpu else 1
    columns = COLUMNS if (gpu or args.interpret) else CPU_COLUMNS
    timer = Timer(device)
    card = torch.cuda.get_device_name() if gpu else "CPU"
    torch.set_float32_matmul_precision("high" if gpu else "highest")

    print(f"# SAE step (forward + backward, no optimiser) on {card}, {str(dtype)[6:]}, "
          f"d = {sizes['d']}, {sizes['tokens']} tokens\n")  # fmt: skip
    print("| n | L0 | metric | " + " | ".join(columns) + " |")
    print("|---|---|---|" + "---|" * len(columns))
    encoder_rows = []
    compiled = torch.compile(eager_sae_loss, dynamic=False)
    for n in sizes["n"]:
        rate = gemm_rate(timer, sizes["tokens"], sizes["d"], n, dtype, device)
        for l0 in sizes["l0"]:
            x, params = make_inputs(sizes["tokens"], sizes["d"], n, l0, dtype, device)
            fns = {"eager": eager_sae_loss, "compile": compiled}
            fns.update(implementations(l0, n) if columns == COLUMNS else cpu_implementations())
            with torch.no_grad():
                measured_l0 = (eager_sae_loss(x, *params, l1_coeff=0).f_NF > 0).sum(1).float()
            res = {c: step_stats(fns[c], x, params, timer, device, warmup, iters) for c in columns}
            if "triton sparse" in fns and fns["triton sparse"].sparse_steps == 0:
                res["triton sparse"]["note"] = "went dense"
            flops = 10 * sizes["tokens"] * sizes["d"] * n
            label = f"| {n:,} | {l0} (measured {measured_l0.mean().item():.0f}) |"
            rows = {
                "ms / step": [fmt(r["ms"], ".2f") for r in res.values()],
                "TFLOP/s-eq": [
                    fmt(r["ms"] and flops / (r["ms"] * 1e-3) / 1e12, ".3g") for r in res.values()
                ],
                f"frac of GEMM ({rate:.3g} TFLOP/s)": [
                    fmt(r["ms"] and flops / (r["ms"] * 1e-3) / 1e12 / rate, ".2f")
                    for r in res.values()
                ],
                "peak GiB": [fmt(r["peak"], ".2f") for r in res.values()],
            }
            notes = [r.get("note") for r in res.values()]
            if any(notes):
                rows["note"] = [note or "" for note in notes]
            for metric, cells in rows.items():
                print(f"{label} {metric} | " + " | ".join(cells) + " |")
            del x, params
        if columns == COLUMNS:
            encoder_rows.append(encoder_rate(timer, sizes, n, dtype, device, rate))

    if encoder_rows:
        print("\n| n | dense encoder kernel TFLOP/s | cuBLAS GEMM TFLOP/s | fraction |")
        print("|---|---|---|---|")
        for n, enc, gemm in encoder_rows:
            print(f"| {n:,} | {enc:.3g} | {gemm:.3g} | {enc / gemm:.2f} |")

    topk = TOPK_GPU if gpu else TOPK_CPU
    if args.interpret:
        topk = {"n": [512], "k": [8]}
    topk_table(
        timer,
        sizes,
        topk,
        dtype,
        device,
        TOPK_COLUMNS if columns == COLUMNS else TOPK_CPU_COLUMNS,
        warmup,
        iters,
    )


def topk_table(timer, sizes, topk, dtype, device, columns, warmup, iters) -> None:
    """ms per step and peak memory of the selection architectures, per (n, k): ``topk`` with
    that k, and ``jumprelu`` with every threshold at ``JUMPRELU_THRESHOLD`` over the same
    inputs, which gives an L0 near k (the measured one is printed)."""
    from patchsae.kernels.cpu import cpu_sae_loss

    print(f"\n# topk and jumprelu steps on the same card, {str(dtype)[6:]}\n")
    print("| architecture | n | k (L0) | metric | " + " | ".join(columns) + " |")
    print("|---|---|---|---|" + "---|" * len(columns))
    compiled = torch.compile(eager_sae_loss, dynamic=False)
    for architecture in ("topk", "jumprelu"):
        for n in topk["n"]:
            for k in topk["k"]:
                x, params = make_inputs(sizes["tokens"], sizes["d"], n, k, dtype, device)
                options = {"architecture": architecture, "k": k}
                if architecture == "jumprelu":
                    threshold = torch.full((n,), JUMPRELU_THRESHOLD, device=device, dtype=dtype)
                    options |= {"threshold_F": threshold.requires_grad_(), "bandwidth": 0.05}
                fns = {
                    "eager": lambda *a, o=options, **kw: eager_sae_loss(*a, **kw, **o),
                    "compile": lambda *a, o=options, **kw: compiled(*a, **kw, **o),
                    "triton": lambda *a, o=options, **kw: _triton_topk(*a, **kw, **o)[0],
                    "cpu": lambda *a, o=options, **kw: cpu_sae_loss(
                        *a, **kw, **o, sparse_threshold=1.0
                    )[0],
                }
                with torch.no_grad():
                    f_NF = eager_sae_loss(x, *params, l1_coeff=0.0, **options).f_NF
                    l0 = (f_NF > 0).sum(1).float().mean().item()
                del f_NF
                res = {
                    c: step_stats(fns[c], x, params, timer, device, warmup, iters) for c in columns
                }
                label = f"| {architecture} | {n:,} | {k} ({l0:.0f}) |"
                print(
                    f"{label} ms / step | "
                    + " | ".join(fmt(r["ms"], ".2f") for r in res.values())
                    + " |"
                )
                print(
                    f"{label} peak GiB | "
                    + " | ".join(fmt(r["peak"], ".2f") for r in res.values())
                    + " |"
                )
                del x, params


def _triton_topk(*args, **kw):
    from patchsae.kernels.topk import triton_topk_loss

    return triton_topk_loss(*args, **kw)


def encoder_rate(timer: Timer, sizes: dict, n: int, dtype, device: str, rate: float):
    """The dense encoder kernel (GEMM + bias + ReLU + L1 epilogue, no sparse code) alone."""
    from patchsae.kernels import triton_kernels as tk

    x, (W_enc, b_enc, _, b_dec) = make_inputs(sizes["tokens"], sizes["d"], n, 150, dtype, device)
    with torch.no_grad():
        xc = x - b_dec
        ms = timer(lambda: tk.encode(xc, W_enc, b_enc), warmup=3, iters=10)
    return n, 2 * sizes["tokens"] * sizes["d"] * n / (ms * 1e-3) / 1e12, rate


if __name__ == "__main__":
    main()
