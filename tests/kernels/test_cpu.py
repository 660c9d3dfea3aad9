"""CPU (``@njit``) kernels against the NumPy oracle in ``reference.py``.

Tolerances: the oracle works in float64 throughout, the CPU kernels accumulate margins in
float64 but the CSR/FM scratch gradients in float32 (caller-owned buffers), and both round
parameters to float32 when stored. After a few steps parameters agree to ``RTOL = 2e-5``
relative plus ``ATOL = 1e-6`` times the array's scale; summed losses to ``LOSS_RTOL = 1e-6``.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from kernel_data import hyper, make_csr, make_dense, make_state
from numpy.testing import assert_allclose, assert_array_equal

from streamlearn.kernels import (
    LOSS_LOGISTIC,
    LOSS_SQUARED,
    OPT_ADAGRAD,
    OPT_FTRL,
    OPT_SGD,
    cpu,
    reference,
)

RTOL = 2e-5
ATOL = 1e-6
LOSS_RTOL = 1e-6

LOSSES = [LOSS_LOGISTIC, LOSS_SQUARED]
OPTS = [OPT_SGD, OPT_ADAGRAD, OPT_FTRL]
REGS = [(0.0, 0.0), (0.01, 0.0), (0.0, 0.05), (0.02, 0.05)]  # (l1, l2)
SIZES = [1, 7, 256]


def assert_params_close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    assert_allclose(actual, expected, rtol=RTOL, atol=ATOL * scale, err_msg=what)


def copies(*arrays: np.ndarray) -> list[np.ndarray]:
    return [a.copy() for a in arrays]


# --------------------------------------------------------------------------- predict


@pytest.mark.parametrize("n", SIZES)
def test_linear_predict_dense(rng: np.random.Generator, n: int) -> None:
    X, _ = make_dense(rng, n, 9)
    w = rng.normal(size=10).astype(np.float32)
    out, expected = np.empty(n, np.float32), np.empty(n, np.float32)
    cpu.linear_predict_dense(X, w, out)
    reference.linear_predict_dense(X, w, expected)
    assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", SIZES)
def test_linear_predict_csr(rng: np.random.Generator, n: int) -> None:
    b = make_csr(rng, n, 50)
    w = rng.normal(size=51).astype(np.float32)
    out, expected = np.empty(n, np.float32), np.empty(n, np.float32)
    cpu.linear_predict_csr(b.indptr, b.indices, b.values, w, out)
    reference.linear_predict_csr(b.indptr, b.indices, b.values, w, expected)
    assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    assert out[0] == w[-1]  # row 0 is empty: bias only


# --------------------------------------------------------------------------- linear learn

CASES = list(itertools.product(SIZES, LOSSES, OPTS, REGS))


def _case_id(case: tuple) -> str:
    n, loss, opt, (l1, l2) = case
    return f"n{n}-loss{loss}-opt{opt}-l1={l1}-l2={l2}"


@pytest.mark.parametrize("opt", OPTS)
def test_dense_kernels_read_the_bias_as_the_last_weight(rng: np.random.Generator,
                                                         opt: int) -> None:
    """A model's weights hold a missing block between the numeric block and the bias
    (``ModelSpec.first_slot``): the dense kernels learn ``w[:d]`` and ``w[-1]`` as the CSR
    kernels do on the same rows, and leave the block between as it is."""
    d, n = 6, 7
    h = hyper(lr=0.05, l1=0.01, l2=0.05, first_slot=2 * d)
    w, s1, s2 = make_state(rng, (2 * d + 1,), opt)
    state = {"cpu": copies(w, s1, s2), "reference": copies(w, s1, s2), "csr": copies(w, s1, s2)}
    X, y = make_dense(rng, n, d)
    indptr = np.arange(n + 1, dtype=np.int64) * d
    indices = np.tile(np.arange(d, dtype=np.int32), n)
    values = np.ascontiguousarray(X.ravel(), dtype=np.float32)
    margins = {k: np.empty(n) for k in state}
    for name, family in (("cpu", cpu), ("reference", reference)):
        family.linear_predict_dense(X, state[name][0], margins[name])
        family.linear_learn_dense(X, y, *state[name], LOSS_LOGISTIC, opt, h, 0)
    cpu.linear_predict_csr(indptr, indices, values, state["csr"][0], margins["csr"])
    cpu.linear_learn_csr(indptr, indices, values, y, *state["csr"], LOSS_LOGISTIC, opt, h, 0,
                         np.zeros(2 * d + 1, np.float32))
    for name in ("cpu", "reference"):
        assert_allclose(margins[name], margins["csr"], rtol=1e-6, atol=1e-6)
        for got, want, before in zip(state[name], state["csr"], (w, s1, s2), strict=True):
            assert_params_close(got, want, name)
            assert_array_equal(got[d : 2 * d], before[d : 2 * d])
    assert not np.array_equal(state["cpu"][0][-1], w[-1])  # the bias did learn


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_linear_learn_dense_matches_reference(rng: np.random.Generator, case: tuple) -> None:
    n, loss, opt, (l1, l2) = case
    d = 6
    h = hyper(lr=0.05, l1=l1, l2=l2)
    w, s1, s2 = make_state(rng, (d + 1,), opt)
    rw, rs1, rs2 = copies(w, s1, s2)
    for step in range(3):
        X, y = make_dense(rng, n, d, loss)
        X_before = X.copy()
        got = cpu.linear_learn_dense(X, y, w, s1, s2, loss, opt, h, step)
        want = reference.linear_learn_dense(X, y, rw, rs1, rs2, loss, opt, h, step)
        assert_allclose(got, want, rtol=LOSS_RTOL)
        assert_array_equal(X, X_before)
    assert_params_close(w, rw, "w")
    assert_params_close(s1, rs1, "s1")
    assert_params_close(s2, rs2, "s2")


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_linear_learn_csr_matches_reference(rng: np.random.Generator, case: tuple) -> None:
    n, loss, opt, (l1, l2) = case
    D = 40
    h = hyper(lr=0.05, l1=l1, l2=l2)
    w, s1, s2 = make_state(rng, (D + 1,), opt)
    rw, rs1, rs2 = copies(w, s1, s2)
    grad = np.zeros(D + 1, np.float32)
    touched = np.zeros(D + 1, bool)
    for step in range(3):
        b = make_csr(rng, n, D, loss=loss)
        touched[b.indices] = True
        before = copies(b.indptr, b.indices, b.values)
        got = cpu.linear_learn_csr(
            b.indptr, b.indices, b.values, b.y, w, s1, s2, loss, opt, h, step, grad
        )
        want = reference.linear_learn_csr(
            b.indptr, b.indices, b.values, b.y, rw, rs1, rs2, loss, opt, h, step, grad
        )
        assert_allclose(got, want, rtol=LOSS_RTOL)
        assert not grad.any(), "scratch gradient must be left all-zero"
        for a, a0 in zip((b.indptr, b.indices, b.values), before, strict=True):
            assert_array_equal(a, a0)
    assert_params_close(w, rw, "w")
    assert_params_close(s1, rs1, "s1")
    assert_params_close(s2, rs2, "s2")


def test_csr_lazy_regularization_leaves_untouched_coordinates(rng: np.random.Generator) -> None:
    D = 30
    b = make_csr(rng, 7, D)
    for opt in OPTS:
        w, s1, s2 = make_state(rng, (D + 1,), opt)
        s2[:] = rng.random(D + 1).astype(np.float32)
        w0, s10, s20 = copies(w, s1, s2)
        grad = np.zeros(D + 1, np.float32)
        h = hyper(l1=0.1, l2=0.1)
        cpu.linear_learn_csr(b.indptr, b.indices, b.values, b.y, w, s1, s2, 0, opt, h, 0, grad)
        untouched = np.ones(D + 1, bool)
        untouched[b.indices] = False
        untouched[D] = False  # the bias is always stepped
        assert untouched.any()
        assert_array_equal(w[untouched], w0[untouched])
        assert_array_equal(s1[untouched], s10[untouched])
        assert_array_equal(s2[untouched], s20[untouched])


@pytest.mark.parametrize("scale", [1e6, 1e-6])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("opt", OPTS)
def test_extreme_feature_scales(
    rng: np.random.Generator, scale: float, loss: int, opt: int
) -> None:
    # Squared loss on 1e6 features diverges after one step (by design of the data), so the
    # logistic loss gets a second step to exercise huge margins in the stable softplus.
    D = 20
    h = hyper(lr=0.05, l1=1e-3, l2=1e-3)
    w, s1, s2 = (np.zeros(D + 1, np.float32) for _ in range(3))
    rw, rs1, rs2 = copies(w, s1, s2)
    grad = np.zeros(D + 1, np.float32)
    steps = 2 if loss == LOSS_LOGISTIC else 1
    for step in range(steps):
        b = make_csr(rng, 7, D, loss=loss, scale=scale)
        got = cpu.linear_learn_csr(
            b.indptr, b.indices, b.values, b.y, w, s1, s2, loss, opt, h, step, grad
        )
        want = reference.linear_learn_csr(
            b.indptr, b.indices, b.values, b.y, rw, rs1, rs2, loss, opt, h, step, grad
        )
        assert np.isfinite(got)
        assert_allclose(got, want, rtol=LOSS_RTOL)
    assert np.all(np.isfinite(w))
    assert_params_close(w, rw, "w")
    assert_params_close(s1, rs1, "s1")
    assert_params_close(s2, rs2, "s2")

    X, y = make_dense(rng, 7, 5, loss, scale=scale)
    wd, a, c = (np.zeros(6, np.float32) for _ in range(3))
    rwd, ra, rc = copies(wd, a, c)
    got = cpu.linear_learn_dense(X, y, wd, a, c, loss, opt, h, 0)
    want = reference.linear_learn_dense(X, y, rwd, ra, rc, loss, opt, h, 0)
    assert_allclose(got, want, rtol=LOSS_RTOL)
    assert_params_close(wd, rwd, "dense w")


def test_logistic_loss_is_stable_for_huge_margins() -> None:
    X = np.array([[1.0], [1.0], [-1.0], [-1.0]], np.float32)
    y = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
    w = np.array([1e4, 0.0], np.float32)  # margins +-1e4: exp overflows without care
    total = cpu.linear_learn_dense(
        X,
        y,
        w,
        np.zeros(2, np.float32),
        np.zeros(2, np.float32),
        LOSS_LOGISTIC,
        OPT_SGD,
        hyper(lr=0.0),
        0,
    )
    assert total == pytest.approx(2e4)


def test_empty_batch_is_a_noop() -> None:
    w = np.ones(4, np.float32)
    s1, s2, grad = (np.zeros(4, np.float32) for _ in range(3))
    indptr = np.zeros(1, np.int64)
    idx, val, y = np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.float32)
    assert cpu.linear_learn_csr(indptr, idx, val, y, w, s1, s2, 0, 0, hyper(), 0, grad) == 0.0
    X = np.zeros((0, 3), np.float32)
    assert cpu.linear_learn_dense(X, y, w, s1, s2, 0, 0, hyper(), 0) == 0.0
    assert_array_equal(w, 1.0)


def test_unknown_codes_raise() -> None:
    X, y = np.zeros((1, 2), np.float32), np.zeros(1, np.float32)
    w, s1, s2 = (np.zeros(3, np.float32) for _ in range(3))
    with pytest.raises(ValueError):
        cpu.linear_learn_dense(X, y, w, s1, s2, 7, OPT_SGD, hyper(), 0)
    with pytest.raises(ValueError):
        cpu.linear_learn_dense(X, y, w, s1, s2, LOSS_LOGISTIC, 9, hyper(), 0)


def test_duplicates_accumulate_like_a_doubled_value() -> None:
    # One row holding index 3 twice with value 1 must equal one entry with value 2.
    D = 5
    dup = (np.array([0, 2], np.int64), np.array([3, 3], np.int32), np.ones(2, np.float32))
    one = (np.array([0, 1], np.int64), np.array([3], np.int32), np.full(1, 2.0, np.float32))
    y = np.ones(1, np.float32)
    results = []
    for indptr, idx, val in (dup, one):
        w, s1, s2, grad = (np.zeros(D + 1, np.float32) for _ in range(4))
        w[3] = 0.25
        loss = cpu.linear_learn_csr(indptr, idx, val, y, w, s1, s2, 1, 0, hyper(l2=0.1), 0, grad)
        results.append((loss, w))
    assert results[0][0] == results[1][0]
    assert_array_equal(results[0][1], results[1][1])


# --------------------------------------------------------------------------- sparsity


def test_ftrl_strong_l1_gives_exact_zeros(rng: np.random.Generator) -> None:
    D = 64
    w, s1, s2, grad = (np.zeros(D + 1, np.float32) for _ in range(4))
    h = hyper(lr=0.1, l1=5.0, l2=1.0)
    for step in range(20):
        b = make_csr(rng, 32, D)
        cpu.linear_learn_csr(
            b.indptr, b.indices, b.values, b.y, w, s1, s2, LOSS_LOGISTIC, OPT_FTRL, h, step, grad
        )
    assert np.count_nonzero(s1[:D]) > D // 2  # z moved ...
    assert np.all(w[:D] == 0.0)  # ... but |z| <= l1 keeps every weight exactly zero


def test_ftrl_moderate_l1_keeps_only_informative_features(rng: np.random.Generator) -> None:
    d = 12
    w, s1, s2 = (np.zeros(d + 1, np.float32) for _ in range(3))
    h = hyper(lr=0.2, l1=2.0, l2=0.1)
    for step in range(200):
        X = rng.normal(size=(32, d)).astype(np.float32)
        y = (X[:, 0] - X[:, 1] > 0).astype(np.float32)
        cpu.linear_learn_dense(X, y, w, s1, s2, LOSS_LOGISTIC, OPT_FTRL, h, step)
    assert w[0] > 0.5 and w[1] < -0.5
    assert np.all(w[2:d] == 0.0)


@pytest.mark.parametrize("opt", [OPT_SGD, OPT_ADAGRAD])
def test_soft_threshold_gives_exact_zeros(rng: np.random.Generator, opt: int) -> None:
    d = 8
    w, s1, s2 = (np.zeros(d + 1, np.float32) for _ in range(3))
    X, y = make_dense(rng, 64, d)
    cpu.linear_learn_dense(X, y, w, s1, s2, LOSS_LOGISTIC, opt, hyper(l1=100.0), 0)
    assert np.all(w[:d] == 0.0)


# --------------------------------------------------------------------------- convergence


@pytest.mark.parametrize("opt", OPTS)
def test_logistic_converges_on_separable_stream(rng: np.random.Generator, opt: int) -> None:
    d = 10
    w_true = rng.normal(size=d)
    lr = {OPT_SGD: 1.0, OPT_ADAGRAD: 0.5, OPT_FTRL: 0.5}[opt]
    h = hyper(lr=lr, l2=1e-5, power_t=0.25)
    w, s1, s2 = (np.zeros(d + 1, np.float32) for _ in range(3))
    for step in range(300):
        X = rng.normal(size=(64, d)).astype(np.float32)
        y = (X @ w_true + 0.3 > 0).astype(np.float32)
        cpu.linear_learn_dense(X, y, w, s1, s2, LOSS_LOGISTIC, opt, h, step)
    X = rng.normal(size=(2000, d)).astype(np.float32)
    y = X @ w_true + 0.3 > 0
    margins = np.empty(len(X), np.float32)
    cpu.linear_predict_dense(X, w, margins)
    assert np.mean((margins > 0) == y) > 0.95


def test_hashed_logistic_converges(rng: np.random.Generator) -> None:
    # Categorical stream: each row has 3 hashed tokens; the label depends on the tokens.
    D, vocab = 1 << 12, 200
    token_weight = rng.normal(size=vocab) * 2
    token_hash = rng.integers(0, D, size=vocab).astype(np.int32)
    w, s1, s2, grad = (np.zeros(D + 1, np.float32) for _ in range(4))
    h = hyper(lr=0.5)

    def batch(n: int) -> tuple[np.ndarray, ...]:
        tokens = rng.integers(0, vocab, size=(n, 3))
        y = (token_weight[tokens].sum(axis=1) > 0).astype(np.float32)
        indptr = np.arange(0, 3 * n + 1, 3, dtype=np.int64)
        return indptr, token_hash[tokens].ravel(), np.ones(3 * n, np.float32), y

    for step in range(300):
        indptr, idx, val, y = batch(64)
        cpu.linear_learn_csr(
            indptr, idx, val, y, w, s1, s2, LOSS_LOGISTIC, OPT_ADAGRAD, h, step, grad
        )
    indptr, idx, val, y = batch(2000)
    margins = np.empty(len(y), np.float32)
    cpu.linear_predict_csr(indptr, idx, val, w, margins)
    assert np.mean((margins > 0) == (y > 0)) > 0.9


def test_squared_loss_recovers_coefficients(rng: np.random.Generator) -> None:
    d = 5
    w_true = rng.normal(size=d)
    w, s1, s2 = (np.zeros(d + 1, np.float32) for _ in range(3))
    for step in range(400):
        X = rng.normal(size=(32, d)).astype(np.float32)
        y = (X @ w_true + 2.0 + 0.01 * rng.normal(size=32)).astype(np.float32)
        cpu.linear_learn_dense(
            X, y, w, s1, s2, LOSS_SQUARED, OPT_SGD, hyper(lr=0.1, power_t=0), step
        )
    assert_allclose(w[:d], w_true, atol=0.02)
    assert w[d] == pytest.approx(2.0, abs=0.02)


# --------------------------------------------------------------------------- FM

FM_CASES = list(itertools.product([1, 7, 64], LOSSES, OPTS, [(0.0, 0.0), (0.01, 0.05)]))


@pytest.mark.parametrize("n", [1, 7, 64])
def test_fm_predict_csr(rng: np.random.Generator, n: int) -> None:
    D, k = 20, 4
    b = make_csr(rng, n, D)
    w = rng.normal(size=D + 1).astype(np.float32)
    V = rng.normal(size=(D, k)).astype(np.float32)
    out, expected = np.empty(n, np.float32), np.empty(n, np.float32)
    cpu.fm_predict_csr(b.indptr, b.indices, b.values, w, V, out)
    reference.fm_predict_csr(b.indptr, b.indices, b.values, w, V, expected)
    assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_fm_with_zero_factors_is_linear(rng: np.random.Generator) -> None:
    b = make_csr(rng, 9, 20)
    w = rng.normal(size=21).astype(np.float32)
    fm_out, lin_out = np.empty(9, np.float32), np.empty(9, np.float32)
    cpu.fm_predict_csr(b.indptr, b.indices, b.values, w, np.zeros((20, 3), np.float32), fm_out)
    cpu.linear_predict_csr(b.indptr, b.indices, b.values, w, lin_out)
    assert_array_equal(fm_out, lin_out)


@pytest.mark.parametrize("case", FM_CASES, ids=[_case_id(c) for c in FM_CASES])
def test_fm_learn_csr_matches_reference(rng: np.random.Generator, case: tuple) -> None:
    n, loss, opt, (l1, l2) = case
    D, k = 24, 3
    h = hyper(lr=0.05, l1=l1, l2=l2)
    w, s1w, s2w = make_state(rng, (D + 1,), opt)
    V, s1v, s2v = make_state(rng, (D, k), opt)
    ref = copies(w, V, s1w, s2w, s1v, s2v)
    gw, gv = np.zeros(D + 1, np.float32), np.zeros((D, k), np.float32)
    for step in range(2):
        b = make_csr(rng, n, D, loss=loss)
        args = (b.indptr, b.indices, b.values, b.y)
        got = cpu.fm_learn_csr(*args, w, V, s1w, s2w, s1v, s2v, loss, opt, h, step, gw, gv)
        want = reference.fm_learn_csr(*args, *ref, loss, opt, h, step, gw, gv)
        assert_allclose(got, want, rtol=LOSS_RTOL)
        assert not gw.any() and not gv.any(), "scratch gradients must be left all-zero"
    names = ("w", "V", "s1w", "s2w", "s1v", "s2v")
    for name, a, r in zip(names, (w, V, s1w, s2w, s1v, s2v), ref, strict=True):
        assert_params_close(a, r, name)


def test_fm_learns_an_interaction_a_linear_model_cannot(rng: np.random.Generator) -> None:
    # y = 1 iff exactly one of two tokens (a in {0,1}, b in {2,3}) is "odd": an XOR over
    # the pair, which only the pairwise term can represent.
    D, k = 8, 4
    w, s1w, s2w = (np.zeros(D + 1, np.float32) for _ in range(3))
    V = (rng.normal(size=(D, k)) * 0.1).astype(np.float32)
    s1v, s2v = np.zeros((D, k), np.float32), np.zeros((D, k), np.float32)
    gw, gv = np.zeros(D + 1, np.float32), np.zeros((D, k), np.float32)

    def batch(n: int) -> tuple[np.ndarray, ...]:
        a = rng.integers(0, 2, size=n)
        c = rng.integers(0, 2, size=n)
        idx = np.stack([a, 2 + c], axis=1).astype(np.int32).ravel()
        indptr = np.arange(0, 2 * n + 1, 2, dtype=np.int64)
        return indptr, idx, np.ones(2 * n, np.float32), (a != c).astype(np.float32)

    for step in range(300):
        indptr, idx, val, y = batch(32)
        cpu.fm_learn_csr(
            indptr,
            idx,
            val,
            y,
            w,
            V,
            s1w,
            s2w,
            s1v,
            s2v,
            LOSS_LOGISTIC,
            OPT_ADAGRAD,
            hyper(lr=0.3),
            step,
            gw,
            gv,
        )
    indptr, idx, val, y = batch(500)
    out = np.empty(500, np.float32)
    cpu.fm_predict_csr(indptr, idx, val, w, V, out)
    assert np.mean((out > 0) == (y > 0)) == 1.0


# --------------------------------------------------------------------------- scaler


def test_average_update_moves_only_the_touched_coordinates(rng: np.random.Generator) -> None:
    w = rng.normal(size=9).astype(np.float32)
    avg = rng.normal(size=9)  # float64, as the model keeps it
    touched = np.array([0, 3, 8], dtype=np.int64)
    expected, got = avg.copy(), avg.copy()
    none = np.zeros(0, np.float32)  # no squared-gradient sums (SGD): the rate alone
    reference.average_update(touched, w, expected, 0.25, none)
    cpu.average_update(touched, w, got, 0.25, none)
    assert_array_equal(got, expected)
    untouched = np.setdiff1d(np.arange(9), touched)
    assert_array_equal(got[untouched], avg[untouched])
    a, t = avg[touched].astype(np.float64), w[touched].astype(np.float64)
    assert_allclose(got[touched], a + 0.25 * (t - a), rtol=1e-7)
    cpu.average_update(touched, w, got, 1.0, none)  # rate 1: the average is the weights
    assert_array_equal(got[touched], w[touched])
    # A step of 1 / horizon (2,000) towards a weight 1e-4 away: 5e-8, below float32's
    # half-ulp at 1.0, so it needs the float64 average to count.
    one, near = np.ones(1), np.array([1.0001], dtype=np.float32)
    cpu.average_update(np.zeros(1, dtype=np.int64), near, one, 1.0 / 2000, none)
    assert one[0] > 1.0 and np.float32(one[0]) == np.float32(1.0)


def test_average_update_follows_a_rarely_updated_weight(rng: np.random.Generator) -> None:
    """With squared-gradient sums, a weight updated rarely (small sum) moves its average by
    ``2 / (1 + 8 n)``, not the global rate (which would leave it near 0 after a long stream);
    a weight at the memory cap (``n = horizon / 4``) moves by about ``1 / horizon``."""
    w = rng.normal(size=5).astype(np.float32)
    avg = np.zeros(5)
    sums = np.array([0.0, 0.25, 1.0, 500.0, 0.1], dtype=np.float32)
    touched = np.array([0, 1, 2, 3], dtype=np.int64)
    expected, got = avg.copy(), avg.copy()
    reference.average_update(touched, w, expected, 1e-5, sums)
    cpu.average_update(touched, w, got, 1e-5, sums)
    assert_array_equal(got, expected)
    rates = np.array([1.0, 2 / 3, 2 / 9, 2 / 4001])
    assert_allclose(got[:4], rates * w[:4], rtol=1e-6)
    assert got[4] == 0.0  # not touched


def test_scaler_update_matches_reference_and_two_pass(rng: np.random.Generator) -> None:
    d = 6
    count, mean, m2 = (np.zeros(d) for _ in range(3))
    rc, rm, rm2 = copies(count, mean, m2)
    chunks = []
    for n in [1, 7, 256, 3]:
        X = rng.normal(loc=1e3, scale=5.0, size=(n, d))
        X[rng.random((n, d)) < 0.2] = np.nan
        X[:, 5] = np.nan  # a feature never observed
        chunks.append(X)
        cpu.scaler_update(X, count, mean, m2)
        reference.scaler_update(X, rc, rm, rm2)
    assert_allclose(count, rc, rtol=0)
    assert_allclose(mean, rm, rtol=1e-12)
    assert_allclose(m2, rm2, rtol=1e-9)
    full = np.vstack(chunks)
    assert_allclose(count, np.sum(~np.isnan(full), axis=0))
    assert_allclose(mean[:5], np.nanmean(full[:, :5], axis=0), rtol=1e-12)
    assert_allclose(m2[:5] / count[:5], np.nanvar(full[:, :5], axis=0), rtol=1e-9)
    assert count[5] == 0 and mean[5] == 0 and m2[5] == 0


def test_non_finite_input_still_resets_scratch(rng: np.random.Generator) -> None:
    # A NaN gradient collides with the kernel's NaN "claimed" marker; the fallback path must
    # still step every touched coordinate once and leave the scratch zeroed.
    D = 16
    b = make_csr(rng, 7, D)
    b.values[3] = np.nan
    w, s1, s2 = make_state(rng, (D + 1,), OPT_SGD)
    rw, rs1, rs2 = copies(w, s1, s2)
    grad = np.zeros(D + 1, np.float32)
    args = (b.indptr, b.indices, b.values, b.y)
    cpu.linear_learn_csr(*args, w, s1, s2, LOSS_SQUARED, OPT_SGD, hyper(l2=0.1), 0, grad)
    reference.linear_learn_csr(*args, rw, rs1, rs2, LOSS_SQUARED, OPT_SGD, hyper(l2=0.1), 0, grad)
    assert not grad.any()
    assert np.isnan(w).any()
    assert_allclose(w, rw, rtol=RTOL, atol=ATOL, equal_nan=True)


# --------------------------------------------------------------------------- memory cap

CAP_CASES = list(itertools.product(["dense", "csr"], LOSSES, [OPT_ADAGRAD, OPT_FTRL]))


@pytest.mark.parametrize("case", CAP_CASES, ids=[f"{k}-loss{lo}-opt{o}" for k, lo, o in CAP_CASES])
def test_capped_accumulators_match_reference_and_stop_at_the_cap(
    rng: np.random.Generator, case: tuple
) -> None:
    # ModelSpec.horizon: a squared-gradient sum grows to the cap, then stays; one that
    # starts above it (a merged or older state) neither grows nor shrinks.
    kind, loss, opt = case
    D, cap = 12, 0.05
    h = hyper(lr=0.05, cap=cap)
    w, s1, s2 = make_state(rng, (D + 1,), opt)
    s1 *= 0.1  # AdaGrad's sums start in [0, 0.1): about half above the cap
    acc0 = (s1 if opt == OPT_ADAGRAD else s2).copy()
    rw, rs1, rs2 = copies(w, s1, s2)
    grad = np.zeros(D + 1, np.float32)
    for step in range(6):
        if kind == "dense":
            X, y = make_dense(rng, 16, D, loss)
            got = cpu.linear_learn_dense(X, y, w, s1, s2, loss, opt, h, step)
            want = reference.linear_learn_dense(X, y, rw, rs1, rs2, loss, opt, h, step)
        else:
            b = make_csr(rng, 16, D, loss=loss)
            args = (b.indptr, b.indices, b.values, b.y)
            got = cpu.linear_learn_csr(*args, w, s1, s2, loss, opt, h, step, grad)
            want = reference.linear_learn_csr(*args, rw, rs1, rs2, loss, opt, h, step, grad)
        assert_allclose(got, want, rtol=LOSS_RTOL)
    assert_params_close(w, rw, "w")
    assert_params_close(s1, rs1, "s1")
    assert_params_close(s2, rs2, "s2")
    acc = s1 if opt == OPT_ADAGRAD else s2
    below = acc0 <= cap
    assert (acc[below] <= np.float32(cap)).all()
    assert (acc[below] == np.float32(cap)).any(), "no sum reached the cap: nothing tested"
    assert_array_equal(acc[~below], acc0[~below])

