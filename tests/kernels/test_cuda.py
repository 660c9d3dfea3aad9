"""CUDA twins against the CPU kernels.

Run on the simulator with ``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/kernels/test_cuda.py``
(set in the environment, never inside a test), and unchanged on a real GPU, where the
``gpu``-marked tests add sizes the simulator is too slow for. ``THREADS_PER_BLOCK`` is patched
to 4 and ``ROWS_PER_THREAD`` to 2, so that even tiny inputs span several blocks and row chunks.

Tolerance: both backends do float64 arithmetic and round parameters to float32, but the CUDA
CSR/FM paths accumulate the float32 scratch gradient with atomics in an arbitrary order (and
the GPU may contract to FMA), so parameters agree to ``RTOL = 2e-5`` relative plus
``ATOL = 1e-6`` times the array's scale, and summed losses to ``LOSS_RTOL = 1e-6``.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from kernel_data import hyper, make_csr, make_dense, make_state
from numba import config
from numba import cuda as nb_cuda
from numpy.testing import assert_allclose, assert_array_equal

from streamlearn.kernels import LOSS_LOGISTIC, LOSS_SQUARED, OPT_ADAGRAD, OPT_FTRL, OPT_SGD, cpu
from streamlearn.kernels import cuda as kcuda

pytestmark = [
    pytest.mark.cudasim,
    # Tiny test grids trip numba's low-occupancy advice on a real GPU; it is not a failure.
    pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning"),
    pytest.mark.skipif(not nb_cuda.is_available(), reason="no CUDA device and no simulator"),
]
real_gpu = pytest.mark.skipif(
    bool(config.ENABLE_CUDASIM), reason="too slow for the simulator; real GPU only"
)

RTOL = 2e-5
ATOL = 1e-6
LOSS_RTOL = 1e-6

LOSSES = [LOSS_LOGISTIC, LOSS_SQUARED]
OPTS = [OPT_SGD, OPT_ADAGRAD, OPT_FTRL]
REGS = [(0.0, 0.0), (0.02, 0.0), (0.0, 0.05), (0.02, 0.05)]  # (l1, l2)


@pytest.fixture(autouse=True)
def tiny_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kcuda, "THREADS_PER_BLOCK", 4)
    monkeypatch.setattr(kcuda, "ROWS_PER_THREAD", 2)  # several row chunks per coordinate


def assert_params_close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    assert_allclose(actual, expected, rtol=RTOL, atol=ATOL * scale, err_msg=what)


def copies(*arrays: np.ndarray) -> list[np.ndarray]:
    return [a.copy() for a in arrays]


def test_is_available_is_a_bool() -> None:
    assert kcuda.is_available() is True


# --------------------------------------------------------------------------- predict


def test_predict_dense_and_csr(rng: np.random.Generator) -> None:
    X, _ = make_dense(rng, 7, 5)
    w = rng.normal(size=6).astype(np.float32)
    got, want = np.empty(7, np.float32), np.empty(7, np.float32)
    kcuda.linear_predict_dense(X, w, got)
    cpu.linear_predict_dense(X, w, want)
    assert_allclose(got, want, rtol=1e-6, atol=1e-6)

    b = make_csr(rng, 9, 16)
    w = rng.normal(size=17).astype(np.float32)
    got, want = np.empty(9, np.float32), np.empty(9, np.float32)
    kcuda.linear_predict_csr(b.indptr, b.indices, b.values, w, got)
    cpu.linear_predict_csr(b.indptr, b.indices, b.values, w, want)
    assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- linear learn

CASES = list(itertools.product(LOSSES, OPTS, REGS))
IDS = [f"loss{lo}-opt{o}-l1={r[0]}-l2={r[1]}" for lo, o, r in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_linear_learn_dense_matches_cpu(rng: np.random.Generator, case: tuple) -> None:
    loss, opt, (l1, l2) = case
    d = 5
    h = hyper(lr=0.05, l1=l1, l2=l2)
    w, s1, s2 = make_state(rng, (d + 1,), opt)
    cw, cs1, cs2 = copies(w, s1, s2)
    for step, n in enumerate([1, 7]):
        X, y = make_dense(rng, n, d, loss)
        got = kcuda.linear_learn_dense(X, y, w, s1, s2, loss, opt, h, step)
        want = cpu.linear_learn_dense(X, y, cw, cs1, cs2, loss, opt, h, step)
        assert_allclose(got, want, rtol=LOSS_RTOL)
    assert_params_close(w, cw, "w")
    assert_params_close(s1, cs1, "s1")
    assert_params_close(s2, cs2, "s2")


def test_dense_kernels_read_the_bias_as_the_last_weight(rng: np.random.Generator) -> None:
    """As on the CPU: a missing block between the numeric block and the bias is left as
    it is, and the bias is ``w[-1]``."""
    d = 5
    h = hyper(lr=0.05, l1=0.01, l2=0.05, first_slot=2 * d)
    w, s1, s2 = make_state(rng, (2 * d + 1,), OPT_FTRL)
    cw, cs1, cs2 = copies(w, s1, s2)
    middle = w[d : 2 * d].copy()
    X, y = make_dense(rng, 7, d, LOSS_LOGISTIC)
    got, want = np.empty(7, np.float32), np.empty(7, np.float32)
    kcuda.linear_predict_dense(X, w, got)
    cpu.linear_predict_dense(X, cw, want)
    assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    kcuda.linear_learn_dense(X, y, w, s1, s2, LOSS_LOGISTIC, OPT_FTRL, h, 0)
    cpu.linear_learn_dense(X, y, cw, cs1, cs2, LOSS_LOGISTIC, OPT_FTRL, h, 0)
    for a, b, name in ((w, cw, "w"), (s1, cs1, "s1"), (s2, cs2, "s2")):
        assert_params_close(a, b, name)
    assert_array_equal(w[d : 2 * d], middle)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_linear_learn_csr_matches_cpu(rng: np.random.Generator, case: tuple) -> None:
    loss, opt, (l1, l2) = case
    D = 16
    h = hyper(lr=0.05, l1=l1, l2=l2)
    w, s1, s2 = make_state(rng, (D + 1,), opt)
    cw, cs1, cs2 = copies(w, s1, s2)
    grad, cgrad = np.zeros(D + 1, np.float32), np.zeros(D + 1, np.float32)
    for step, n in enumerate([1, 7]):
        b = make_csr(rng, n, D, loss=loss)
        args = (b.indptr, b.indices, b.values, b.y)
        got = kcuda.linear_learn_csr(*args, w, s1, s2, loss, opt, h, step, grad)
        want = cpu.linear_learn_csr(*args, cw, cs1, cs2, loss, opt, h, step, cgrad)
        assert_allclose(got, want, rtol=LOSS_RTOL)
        assert not grad.any(), "scratch gradient must be left all-zero"
    assert_params_close(w, cw, "w")
    assert_params_close(s1, cs1, "s1")
    assert_params_close(s2, cs2, "s2")


def test_race_many_rows_hit_one_hashed_weight(rng: np.random.Generator) -> None:
    # 48 rows over 12 blocks, each row adding to weight 3 several times: lost updates
    # without atomics would show up as a gradient far smaller than the CPU's.
    D, n = 8, 48
    indptr = np.arange(0, 3 * n + 1, 3, dtype=np.int64)
    indices = np.tile(np.array([3, 3, 5], np.int32), n)
    values = rng.random(3 * n).astype(np.float32) + 0.5
    y = np.ones(n, np.float32)
    h = hyper(lr=0.1, power_t=0.0)
    w, s1, s2, grad = (np.zeros(D + 1, np.float32) for _ in range(4))
    cw, cs1, cs2, cgrad = (np.zeros(D + 1, np.float32) for _ in range(4))
    args = (indptr, indices, values, y)
    kcuda.linear_learn_csr(*args, w, s1, s2, LOSS_SQUARED, OPT_SGD, h, 0, grad)
    cpu.linear_learn_csr(*args, cw, cs1, cs2, LOSS_SQUARED, OPT_SGD, h, 0, cgrad)
    assert_params_close(w, cw, "w")
    assert w[3] > 0.1  # sanity: the accumulated gradient is large
    assert not grad.any()


def test_device_resident_state_is_updated_in_place(rng: np.random.Generator) -> None:
    D = 16
    h = hyper(lr=0.05, l1=0.01, l2=0.01)
    w, s1, s2 = make_state(rng, (D + 1,), OPT_ADAGRAD)
    cw, cs1, cs2 = copies(w, s1, s2)
    w0 = w.copy()
    d_w, d_s1, d_s2 = (nb_cuda.to_device(a) for a in (w, s1, s2))
    d_grad = nb_cuda.to_device(np.zeros(D + 1, np.float32))
    cgrad = np.zeros(D + 1, np.float32)
    for step in range(2):
        b = make_csr(rng, 5, D)
        args = (b.indptr, b.indices, b.values, b.y)
        d_args = tuple(nb_cuda.to_device(a) for a in args)  # a device mini-batch works too
        batch = args if step == 0 else d_args
        got = kcuda.linear_learn_csr(
            *batch, d_w, d_s1, d_s2, LOSS_LOGISTIC, OPT_ADAGRAD, h, step, d_grad
        )
        want = cpu.linear_learn_csr(*args, cw, cs1, cs2, LOSS_LOGISTIC, OPT_ADAGRAD, h, step, cgrad)
        assert_allclose(got, want, rtol=LOSS_RTOL)
    assert_array_equal(w, w0)  # the host copy was not touched ...
    assert_params_close(d_w.copy_to_host(), cw, "w")  # ... the device one was
    assert_params_close(d_s1.copy_to_host(), cs1, "s1")
    assert not d_grad.copy_to_host().any()
    out = nb_cuda.device_array(3, dtype=np.float32)
    X, _ = make_dense(rng, 3, D)
    kcuda.linear_predict_dense(X, d_w, out)
    want_out = np.empty(3, np.float32)
    cpu.linear_predict_dense(X, cw, want_out)
    assert_allclose(out.copy_to_host(), want_out, rtol=1e-5, atol=1e-6)


def test_empty_batch_and_bad_codes() -> None:
    w, s1, s2, grad = (np.ones(4, np.float32) for _ in range(4))
    grad[:] = 0
    indptr = np.zeros(1, np.int64)
    idx, val, y = np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.float32)
    assert kcuda.linear_learn_csr(indptr, idx, val, y, w, s1, s2, 0, 0, hyper(), 0, grad) == 0.0
    assert_array_equal(w, 1.0)
    X = np.zeros((1, 3), np.float32)
    with pytest.raises(ValueError):
        kcuda.linear_learn_dense(X, np.zeros(1, np.float32), w, s1, s2, 5, 0, hyper(), 0)
    with pytest.raises(ValueError):
        kcuda.linear_learn_dense(X, np.zeros(1, np.float32), w, s1, s2, 0, 5, hyper(), 0)


# --------------------------------------------------------------------------- FM

FM_CASES = list(itertools.product(LOSSES, OPTS))


@pytest.mark.parametrize("case", FM_CASES, ids=[f"loss{lo}-opt{o}" for lo, o in FM_CASES])
def test_fm_matches_cpu(rng: np.random.Generator, case: tuple) -> None:
    loss, opt = case
    D, k = 12, 3
    h = hyper(lr=0.05, l1=0.01, l2=0.02)
    w, s1w, s2w = make_state(rng, (D + 1,), opt)
    V, s1v, s2v = make_state(rng, (D, k), opt)
    host = copies(w, V, s1w, s2w, s1v, s2v)
    gw, gv = np.zeros(D + 1, np.float32), np.zeros((D, k), np.float32)
    cgw, cgv = copies(gw, gv)
    for step, n in enumerate([1, 6]):
        b = make_csr(rng, n, D, loss=loss)
        args = (b.indptr, b.indices, b.values, b.y)
        got = kcuda.fm_learn_csr(*args, w, V, s1w, s2w, s1v, s2v, loss, opt, h, step, gw, gv)
        want = cpu.fm_learn_csr(*args, *host, loss, opt, h, step, cgw, cgv)
        assert_allclose(got, want, rtol=LOSS_RTOL)
        assert not gw.any() and not gv.any()
    for name, a, c in zip(
        ("w", "V", "s1w", "s2w", "s1v", "s2v"), (w, V, s1w, s2w, s1v, s2v), host, strict=True
    ):
        assert_params_close(a, c, name)
    out, want_out = np.empty(4, np.float32), np.empty(4, np.float32)
    b = make_csr(rng, 4, D)
    kcuda.fm_predict_csr(b.indptr, b.indices, b.values, w, V, out)
    cpu.fm_predict_csr(b.indptr, b.indices, b.values, w, V, want_out)
    assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)


CAP_CASES = list(itertools.product(["dense", "csr", "fm"], [OPT_ADAGRAD, OPT_FTRL]))


@pytest.mark.parametrize("case", CAP_CASES, ids=[f"{k}-opt{o}" for k, o in CAP_CASES])
def test_capped_accumulators_match_cpu(rng: np.random.Generator, case: tuple) -> None:
    # ModelSpec.horizon's cap on the squared-gradient sums, on every kernel family.
    kind, opt = case
    D, k, cap = 10, 2, 0.02
    h = hyper(lr=0.05, cap=cap)
    w, s1, s2 = make_state(rng, (D + 1,), opt)
    V, s1v, s2v = make_state(rng, (D, k), opt)
    s1 *= 0.05
    s1v *= 0.05
    host = copies(w, s1, s2, V, s1v, s2v)
    g, cg = np.zeros(D + 1, np.float32), np.zeros(D + 1, np.float32)
    gv, cgv = np.zeros((D, k), np.float32), np.zeros((D, k), np.float32)
    for step in range(4):
        if kind == "dense":
            X, y = make_dense(rng, 9, D, LOSS_SQUARED)
            got = kcuda.linear_learn_dense(X, y, w, s1, s2, LOSS_SQUARED, opt, h, step)
            want = cpu.linear_learn_dense(X, y, *host[:3], LOSS_SQUARED, opt, h, step)
        else:
            b = make_csr(rng, 9, D, loss=LOSS_SQUARED)
            args = (b.indptr, b.indices, b.values, b.y)
            if kind == "csr":
                got = kcuda.linear_learn_csr(*args, w, s1, s2, LOSS_SQUARED, opt, h, step, g)
                want = cpu.linear_learn_csr(*args, *host[:3], LOSS_SQUARED, opt, h, step, cg)
            else:
                got = kcuda.fm_learn_csr(*args, w, V, s1, s2, s1v, s2v, LOSS_SQUARED, opt, h,
                                         step, g, gv)
                cw, cs1, cs2, cV, cs1v, cs2v = host
                want = cpu.fm_learn_csr(*args, cw, cV, cs1, cs2, cs1v, cs2v, LOSS_SQUARED, opt,
                                        h, step, cg, cgv)
        assert_allclose(got, want, rtol=LOSS_RTOL)
    for name, a, c in zip(("w", "s1", "s2", "V", "s1v", "s2v"), (w, s1, s2, V, s1v, s2v), host,
                          strict=True):
        assert_params_close(a, c, name)
    acc = s1 if opt == OPT_ADAGRAD else s2
    assert (acc == np.float32(cap)).any(), "no sum reached the cap: nothing tested"


# --------------------------------------------------------------------------- scaler


def test_scaler_update_matches_cpu(rng: np.random.Generator) -> None:
    d = 5
    count, mean, m2 = (np.zeros(d) for _ in range(3))
    cc, cm, cm2 = copies(count, mean, m2)
    for n in [1, 6]:
        X = rng.normal(loc=50.0, size=(n, d))
        X[rng.random((n, d)) < 0.3] = np.nan
        X[:, 4] = np.nan
        kcuda.scaler_update(X, count, mean, m2)
        cpu.scaler_update(X, cc, cm, cm2)
    assert_array_equal(count, cc)
    assert_allclose(mean, cm, rtol=1e-12)
    assert_allclose(m2, cm2, rtol=1e-9, atol=1e-12)


def test_average_update_matches_cpu(rng: np.random.Generator) -> None:
    w = rng.normal(size=11).astype(np.float32)
    avg = rng.normal(size=11)  # float64, as the model keeps it
    touched = np.array([1, 2, 5, 10], dtype=np.int64)
    on_cpu, on_gpu = avg.copy(), avg.copy()
    sums = rng.random(11).astype(np.float32)  # each coordinate's rate from its own sum
    cpu.average_update(touched, w, on_cpu, 0.01, sums)
    kcuda.average_update(touched, w, on_gpu, 0.01, sums)  # host arrays: there and back
    assert_allclose(on_gpu, on_cpu, rtol=1e-7)
    d_avg = nb_cuda.to_device(avg.copy())  # device-resident: updated in place
    kcuda.average_update(nb_cuda.to_device(touched), nb_cuda.to_device(w), d_avg, 0.01,
                         nb_cuda.to_device(sums))
    assert_allclose(d_avg.copy_to_host(), on_cpu, rtol=1e-7)


# --------------------------------------------------------------------------- real GPU only


@pytest.mark.gpu
@real_gpu
@pytest.mark.parametrize("opt", OPTS)
def test_large_hashed_batches_match_cpu(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, opt: int
) -> None:
    monkeypatch.setattr(kcuda, "THREADS_PER_BLOCK", 128)
    D = 1 << 16
    h = hyper(lr=0.05, l1=1e-3, l2=1e-4)
    w, s1, s2 = make_state(rng, (D + 1,), opt)
    cw, cs1, cs2 = copies(w, s1, s2)
    d_w, d_s1, d_s2 = (nb_cuda.to_device(a) for a in (w, s1, s2))
    d_grad = nb_cuda.device_array_like(np.zeros(D + 1, np.float32))
    d_grad.copy_to_device(np.zeros(D + 1, np.float32))
    cgrad = np.zeros(D + 1, np.float32)
    for step in range(5):
        b = make_csr(rng, 1024, D, nnz_per_row=40)
        args = (b.indptr, b.indices, b.values, b.y)
        got = kcuda.linear_learn_csr(*args, d_w, d_s1, d_s2, 0, opt, h, step, d_grad)
        want = cpu.linear_learn_csr(*args, cw, cs1, cs2, 0, opt, h, step, cgrad)
        assert_allclose(got, want, rtol=LOSS_RTOL)
    assert_params_close(d_w.copy_to_host(), cw, "w")
    assert_params_close(d_s1.copy_to_host(), cs1, "s1")
    assert not d_grad.copy_to_host().any()


@pytest.mark.gpu
@real_gpu
def test_large_dense_and_fm_match_cpu(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kcuda, "THREADS_PER_BLOCK", 128)
    monkeypatch.setattr(kcuda, "ROWS_PER_THREAD", 64)
    X, y = make_dense(rng, 4096, 64)
    w, s1, s2 = make_state(rng, (65,), OPT_ADAGRAD)
    cw, cs1, cs2 = copies(w, s1, s2)
    got = kcuda.linear_learn_dense(X, y, w, s1, s2, 0, OPT_ADAGRAD, hyper(l2=1e-3), 0)
    want = cpu.linear_learn_dense(X, y, cw, cs1, cs2, 0, OPT_ADAGRAD, hyper(l2=1e-3), 0)
    assert_allclose(got, want, rtol=LOSS_RTOL)
    assert_params_close(w, cw, "dense w")

    D, k = 1 << 14, 8
    w, s1w, s2w = make_state(rng, (D + 1,), OPT_FTRL)
    V, s1v, s2v = make_state(rng, (D, k), OPT_FTRL)
    host = copies(w, V, s1w, s2w, s1v, s2v)
    gw, gv = np.zeros(D + 1, np.float32), np.zeros((D, k), np.float32)
    cgw, cgv = copies(gw, gv)
    b = make_csr(rng, 512, D, nnz_per_row=20)
    args = (b.indptr, b.indices, b.values, b.y)
    h = hyper(l1=1e-3, l2=1e-3)
    got = kcuda.fm_learn_csr(*args, w, V, s1w, s2w, s1v, s2v, 0, OPT_FTRL, h, 0, gw, gv)
    want = cpu.fm_learn_csr(*args, *host, 0, OPT_FTRL, h, 0, cgw, cgv)
    assert_allclose(got, want, rtol=LOSS_RTOL)
    assert_params_close(V, host[1], "V")
