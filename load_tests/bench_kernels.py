"""Throughput of the streamlearn kernels, in rows per second.

Default (CPU) mode measures, in one run, the production kernels against a plain,
straightforward ``@njit`` mini-batch loop (per-row Welford scaling for dense input, an O(D)
dense gradient and full-vector update for hashed CSR input) and prints the ratio. It also
checks whether a ``prange`` predict would pay at the service's batch sizes.

``--cuda`` compares the CUDA launchers (weights, optimizer state and scratch resident on the
device, mini-batch shipped from the host each call, as the worker does) with the CPU kernels
at several batch sizes and widths; it exits with a message where no GPU is present.

Usage::

    python load_tests/bench_kernels.py              # CPU, < 60 s
    python load_tests/bench_kernels.py --seconds 1  # longer, steadier timings
    python load_tests/bench_kernels.py --cuda       # CUDA vs CPU (needs a GPU)
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Callable

import numba
import numpy as np
from numba import njit, prange

from streamlearn.kernels import (
    LOSS_LOGISTIC,
    OPT_ADAGRAD,
    OPT_FTRL,
    OPT_SGD,
    cpu,
)

BATCH = 256
POOL = 8  # distinct pre-generated batches, cycled, so caches see fresh rows


# --------------------------------------------------------------------------- baselines


@njit
def baseline_dense_step(X, y, w, count, mean, m2, lr, l2):
    """Naive: per-row Welford, z-score, logistic gradient, then one SGD step."""
    n, d = X.shape
    grad = np.zeros(d + 1)
    for r in range(n):
        for j in range(d):
            x = X[r, j]
            count[j] += 1.0
            delta = x - mean[j]
            mean[j] += delta / count[j]
            m2[j] += delta * (x - mean[j])
        m = w[d]
        for j in range(d):
            m += (X[r, j] - mean[j]) / math.sqrt(m2[j] / count[j] + 1e-12) * w[j]
        g = 1.0 / (1.0 + math.exp(-m)) - y[r]
        for j in range(d):
            grad[j] += g * (X[r, j] - mean[j]) / math.sqrt(m2[j] / count[j] + 1e-12)
        grad[d] += g
    for j in range(d):
        w[j] -= lr * (grad[j] / n + l2 * w[j])
    w[d] -= lr * grad[d] / n


@njit
def baseline_csr_step(indptr, indices, values, y, w, lr, l2):
    """Naive: a fresh dense O(D) gradient per batch and an O(D) update of every weight."""
    n = indptr.shape[0] - 1
    D = w.shape[0] - 1
    grad = np.zeros(D + 1)
    for r in range(n):
        m = w[D]
        for e in range(indptr[r], indptr[r + 1]):
            m += values[e] * w[indices[e]]
        g = 1.0 / (1.0 + math.exp(-m)) - y[r]
        for e in range(indptr[r], indptr[r + 1]):
            grad[indices[e]] += g * values[e]
        grad[D] += g
    for i in range(D):
        w[i] -= lr * (grad[i] / n + l2 * w[i])
    w[D] -= lr * grad[D] / n


@njit(parallel=True)
def prange_predict_csr(indptr, indices, values, w, out):
    """``cpu.linear_predict_csr`` with ``prange`` over rows (candidate, not shipped)."""
    n = indptr.shape[0] - 1
    D = w.shape[0] - 1
    for r in prange(n):
        m = np.float64(w[D])
        for e in range(indptr[r], indptr[r + 1]):
            m += np.float64(values[e]) * w[indices[e]]
        out[r] = m


# --------------------------------------------------------------------------- data + timing


def dense_pool(rng: np.random.Generator, n: int, d: int) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for _ in range(POOL):
        X = rng.normal(loc=3.0, scale=2.0, size=(n, d))
        y = (X[:, 0] + X[:, 1] > 6.0).astype(np.float32)
        out.append((X, y))
    return out


def csr_pool(
    rng: np.random.Generator, n: int, D: int, nnz_per_row: int
) -> list[tuple[np.ndarray, ...]]:
    out = []
    for _ in range(POOL):
        indptr = np.arange(0, n * nnz_per_row + 1, nnz_per_row, dtype=np.int64)
        indices = rng.integers(0, D, size=n * nnz_per_row).astype(np.int32)
        values = np.ones(n * nnz_per_row, np.float32)
        y = (rng.random(n) < 0.3).astype(np.float32)
        out.append((indptr, indices, values, y))
    return out


def rows_per_s(step: Callable[[int], None], rows: int, seconds: float, repeats: int = 3) -> float:
    """Best rows/s over ``repeats`` windows of ``seconds`` each, calling ``step(i)``.

    Best-of-N because the machine is shared: the slowest windows measure the neighbours.
    """
    step(0)
    step(1)
    best = 0.0
    calls = 0
    for _ in range(repeats):
        done = 0
        t0 = time.perf_counter()
        while True:
            step(calls)
            calls += 1
            done += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                break
        best = max(best, done * rows / elapsed)
    return best


def hyper(lr: float = 0.05, l1: float = 0.0, l2: float = 1e-6) -> np.ndarray:
    # kernels.codes.H_*: power_t 0.5, FTRL beta 1, no memory cap, the slots at the same rate
    return np.array([lr, l1, l2, 0.5, 1.0, np.inf, lr, 0.0])


def fmt(x: float) -> str:
    return f"{x / 1e6:8.2f} M" if x >= 1e6 else f"{x / 1e3:8.1f} k"


# --------------------------------------------------------------------------- CPU suite


def bench_dense(rng: np.random.Generator, seconds: float) -> None:
    d = 32
    pool = dense_pool(rng, BATCH, d)
    pool32 = [(np.ascontiguousarray(X, dtype=np.float32), y) for X, y in pool]
    h = hyper()

    w, s1, s2 = (np.zeros(d + 1, np.float32) for _ in range(3))
    count, mean, m2 = (np.zeros(d) for _ in range(3))

    def ours(i: int) -> None:
        X, y = pool[i % POOL]
        cpu.scaler_update(X, count, mean, m2)
        Z = ((X - mean) / np.sqrt(m2 / count + 1e-12)).astype(np.float32)
        cpu.linear_learn_dense(Z, y, w, s1, s2, LOSS_LOGISTIC, OPT_SGD, h, i)

    def kernel_only(i: int) -> None:
        X, y = pool32[i % POOL]
        cpu.linear_learn_dense(X, y, w, s1, s2, LOSS_LOGISTIC, OPT_SGD, h, i)

    bw = np.zeros(d + 1)
    bc, bm, bm2 = (np.zeros(d) for _ in range(3))

    def baseline(i: int) -> None:
        X, y = pool[i % POOL]
        baseline_dense_step(X, y, bw, bc, bm, bm2, 0.05, 1e-6)

    r_ours = rows_per_s(ours, BATCH, seconds)
    r_kernel = rows_per_s(kernel_only, BATCH, seconds)
    r_base = rows_per_s(baseline, BATCH, seconds)
    print(f"\ndense logistic SGD, batch {BATCH}, d={d}")
    print(f"  baseline njit loop (per-row Welford + SGD) {fmt(r_base)} rows/s")
    print(
        f"  scaler_update + z-score + linear_learn_dense {fmt(r_ours)} rows/s"
        f"  ratio {r_ours / r_base:5.2f}x"
    )
    print(f"  linear_learn_dense alone                   {fmt(r_kernel)} rows/s")


def bench_csr(rng: np.random.Generator, seconds: float, bits: list[int], nnz: int) -> None:
    print(f"\nhashed CSR logistic, batch {BATCH}, {nnz} nnz/row (rows/s; ratio vs baseline)")
    print(f"  {'D':>8} {'baseline':>11} {'SGD':>11} {'ratio':>7} {'AdaGrad':>11} {'FTRL':>11}")
    for b in bits:
        D = 1 << b
        pool = csr_pool(rng, BATCH, D, nnz)
        bw = np.zeros(D + 1)

        def baseline(i: int, pool: list = pool, bw: np.ndarray = bw) -> None:
            indptr, idx, val, y = pool[i % POOL]
            baseline_csr_step(indptr, idx, val, y, bw, 0.05, 1e-6)

        results = {}
        for name, opt in (("sgd", OPT_SGD), ("adagrad", OPT_ADAGRAD), ("ftrl", OPT_FTRL)):
            w, s1, s2, grad = (np.zeros(D + 1, np.float32) for _ in range(4))
            h = hyper(l1=1e-4 if opt == OPT_FTRL else 0.0)

            def ours(i: int, w=w, s1=s1, s2=s2, grad=grad, h=h, opt=opt, pool=pool) -> None:
                indptr, idx, val, y = pool[i % POOL]
                cpu.linear_learn_csr(indptr, idx, val, y, w, s1, s2, LOSS_LOGISTIC, opt, h, i, grad)

            results[name] = rows_per_s(ours, BATCH, seconds)
        r_base = rows_per_s(baseline, BATCH, seconds)
        print(
            f"  2^{b:<6} {fmt(r_base)} {fmt(results['sgd'])} {results['sgd'] / r_base:6.1f}x"
            f" {fmt(results['adagrad'])} {fmt(results['ftrl'])}"
        )


def bench_fm(rng: np.random.Generator, seconds: float) -> None:
    D, k, nnz = 1 << 18, 8, 20
    pool = csr_pool(rng, BATCH, D, nnz)
    w, s1w, s2w, gw = (np.zeros(D + 1, np.float32) for _ in range(4))
    V = (rng.normal(size=(D, k)) * 0.01).astype(np.float32)
    s1v, s2v, gv = (np.zeros((D, k), np.float32) for _ in range(3))
    h = hyper()

    def ours(i: int) -> None:
        indptr, idx, val, y = pool[i % POOL]
        cpu.fm_learn_csr(
            indptr, idx, val, y, w, V, s1w, s2w, s1v, s2v, LOSS_LOGISTIC, OPT_ADAGRAD, h, i, gw, gv
        )

    r = rows_per_s(ours, BATCH, seconds)
    print(f"\nFM AdaGrad, batch {BATCH}, D=2^18, k={k}, {nnz} nnz/row: {fmt(r)} rows/s")


def bench_prange(rng: np.random.Generator, seconds: float) -> None:
    D, nnz = 1 << 20, 20
    print(f"\npredict_csr serial vs prange ({numba.get_num_threads()} threads), D=2^20")
    for n in (BATCH, 65536):
        indptr, idx, val, _ = csr_pool(rng, n, D, nnz)[0]
        w = rng.normal(size=D + 1).astype(np.float32)
        out = np.empty(n, np.float32)
        args = (indptr, idx, val, w, out)
        serial = rows_per_s(lambda i, args=args: cpu.linear_predict_csr(*args), n, seconds)
        par = rows_per_s(lambda i, args=args: prange_predict_csr(*args), n, seconds)
        print(f"  batch {n:>6}: serial {fmt(serial)}  prange {fmt(par)}  {par / serial:5.2f}x")


# --------------------------------------------------------------------------- CUDA suite


def bench_cuda(
    rng: np.random.Generator, seconds: float, batches: list[int], hashed_bits: int = 20
) -> int:
    from streamlearn.kernels import cuda as kcuda

    if not kcuda.is_available():
        print("bench_kernels --cuda: no CUDA GPU available here; nothing to compare.")
        return 2
    from numba import config
    from numba import cuda as nb_cuda

    if config.ENABLE_CUDASIM:
        print("bench_kernels --cuda: NUMBA_ENABLE_CUDASIM=1 is set; timings would be meaningless.")
        return 2
    get_device = getattr(nb_cuda, "get_current_device", None)  # absent on the simulator
    print(f"device: {get_device().name if get_device else 'simulator'}")
    h = hyper()

    print("\ndense logistic AdaGrad (rows/s): CPU vs CUDA, device-resident weights")
    print(f"  {'batch':>7} {'d':>5} {'CPU':>11} {'CUDA':>11} {'CUDA/CPU':>9}")
    for d in (32, 256):
        for n in batches:
            (X, y), *_ = dense_pool(rng, n, d)[:1]
            X = np.ascontiguousarray(X, dtype=np.float32)
            w, s1, s2 = (np.zeros(d + 1, np.float32) for _ in range(3))
            d_w, d_s1, d_s2 = (nb_cuda.to_device(a) for a in (w, s1, s2))

            def run_cpu(i: int, X=X, y=y, w=w, s1=s1, s2=s2) -> None:
                cpu.linear_learn_dense(X, y, w, s1, s2, LOSS_LOGISTIC, OPT_ADAGRAD, h, i)

            def run_gpu(i: int, X=X, y=y, d_w=d_w, d_s1=d_s1, d_s2=d_s2) -> None:
                kcuda.linear_learn_dense(X, y, d_w, d_s1, d_s2, LOSS_LOGISTIC, OPT_ADAGRAD, h, i)

            c = rows_per_s(run_cpu, n, seconds)
            g = rows_per_s(run_gpu, n, seconds)
            print(f"  {n:>7} {d:>5} {fmt(c)} {fmt(g)} {g / c:8.2f}x")

    print(f"\nhashed CSR logistic AdaGrad, D=2^{hashed_bits} (rows/s): CPU vs CUDA")
    print(f"  {'batch':>7} {'nnz':>5} {'CPU':>11} {'CUDA':>11} {'CUDA/CPU':>9}")
    D = 1 << hashed_bits
    for nnz in (20, 100):
        for n in batches:
            indptr, idx, val, y = csr_pool(rng, n, D, nnz)[0]
            w, s1, s2, grad = (np.zeros(D + 1, np.float32) for _ in range(4))
            d_w, d_s1, d_s2, d_g = (nb_cuda.to_device(a) for a in (w, s1, s2, grad))
            args = (indptr, idx, val, y)

            def run_cpu(i: int, args=args, w=w, s1=s1, s2=s2, grad=grad) -> None:
                cpu.linear_learn_csr(*args, w, s1, s2, LOSS_LOGISTIC, OPT_ADAGRAD, h, i, grad)

            def run_gpu(i: int, args=args, d_w=d_w, d_s1=d_s1, d_s2=d_s2, d_g=d_g) -> None:
                kcuda.linear_learn_csr(
                    *args, d_w, d_s1, d_s2, LOSS_LOGISTIC, OPT_ADAGRAD, h, i, d_g
                )

            c = rows_per_s(run_cpu, n, seconds)
            g = rows_per_s(run_gpu, n, seconds)
            print(f"  {n:>7} {nnz:>5} {fmt(c)} {fmt(g)} {g / c:8.2f}x")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda", action="store_true", help="compare CUDA with CPU (needs a GPU)")
    parser.add_argument(
        "--seconds", type=float, default=0.1, help="seconds per timing window, best of 3 (0.1)"
    )
    parser.add_argument(
        "--max-bits", type=int, default=22, help="largest hashed width 2^bits for CSR (22)"
    )
    parser.add_argument(
        "--cuda-batches", default="256,4096,65536", help="batch sizes for --cuda (256,4096,65536)"
    )
    args = parser.parse_args(argv)
    rng = np.random.default_rng(7)
    print(
        f"streamlearn kernel bench: numba {numba.__version__}, numpy {np.__version__}, "
        f"python {platform.python_version()}, {os.cpu_count()} CPUs"
    )
    t0 = time.perf_counter()
    if args.cuda:
        rc = bench_cuda(rng, args.seconds, [int(b) for b in args.cuda_batches.split(",")])
        if rc:
            return rc
    else:
        bench_dense(rng, args.seconds)
        bench_csr(rng, args.seconds, list(range(18, args.max_bits + 1)), nnz=20)
        bench_fm(rng, args.seconds)
        bench_prange(rng, args.seconds)
        rc = 0
    print(f"\n(total {time.perf_counter() - t0:.1f} s including JIT compilation)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
