"""Contract checks over every task, plus learning-quality checks on seeded streams."""

from unittest import mock

import numpy as np
import pytest

from streamlearn.backends import BackendUnavailable, get_backend
from streamlearn.config import ModelSpec
from streamlearn.models import OnlineModel, StateError, ftrl
from streamlearn.models.online import STATE_VERSION
from streamlearn.prequential import roc_auc
from streamlearn.reasons import reason_codes
from streamlearn.synthetic import FraudStream

SPECS = {
    "binary": ModelSpec(
        name="b",
        topic="t",
        numeric=("x1", "x2"),
        categorical=("c",),
        label="y",
        hash_bits=6,
    ),
    "regression": ModelSpec(
        name="r",
        topic="t",
        task="regression",
        numeric=("x1", "x2"),
        categorical=("c",),
        label="y",
        hash_bits=6,
    ),
    "ranking": ModelSpec(
        name="k",
        topic="t",
        task="ranking",
        numeric=("x1",),
        categorical=("user", "item"),
        label="y",
        hash_bits=10,
        fm_factors=4,
    ),
}
# Every learning hyperparameter above is the spec's default: the defaults must learn.


def _events(task, n, seed=0):
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=n), rng.normal(size=n) * 50 + 10
    c = rng.integers(0, 5, n)
    user, item = rng.integers(0, 20, n), rng.integers(0, 20, n)
    if task == "binary":
        y = (x1 + 0.02 * x2 + (c == 3) + rng.normal(0, 0.3, n) > 0.5).astype(int)
    elif task == "regression":
        y = 3 * x1 - 0.05 * x2 + 2.0 * (c == 1) + rng.normal(0, 0.1, n)
    else:  # clicks driven by a user x item affinity only an FM can express
        y = ((user % 2) == (item % 2)).astype(int) & (rng.random(n) < 0.9)
    return [
        {
            "event_id": i,
            "x1": float(x1[i]),
            "x2": float(x2[i]),
            "c": f"c{c[i]}",
            "user": f"u{user[i]}",
            "item": f"i{item[i]}",
            "y": y[i].item(),
        }
        for i in range(n)
    ]


def _run(model, events, batch=128):
    scores = []
    for i in range(0, len(events), batch):
        b, rejects = model.vectorizer.transform_many(events[i : i + batch])
        assert not rejects
        scores.append(model.process(b))
    return np.concatenate(scores)


@pytest.mark.parametrize("task", SPECS)
def test_state_round_trip_and_determinism(task):
    events = _events(task, 1000)
    a, b = OnlineModel(SPECS[task], device="cpu"), OnlineModel(SPECS[task], device="cpu")
    _run(a, events)
    _run(b, events)
    np.testing.assert_array_equal(a.w, b.w)
    restored = OnlineModel.from_state(a.to_state())
    probe = _events(task, 50, seed=7)
    np.testing.assert_array_equal(restored.predict_events(probe), a.predict_events(probe))


@pytest.mark.parametrize("task", SPECS)
def test_a_restored_ftrl_model_learns_on_as_if_never_stopped(task):
    """Under the same rates a restore changes no FTRL state: the restored model and the
    one that never stopped score the next events identically after learning them."""
    a = OnlineModel(SPECS[task], device="cpu")
    _run(a, _events(task, 1000))
    restored = OnlineModel.from_state(a.to_state())
    for name in a.weight_names:
        np.testing.assert_array_equal(getattr(restored, name), getattr(a, name))
    more, probe = _events(task, 500, seed=3), _events(task, 50, seed=7)
    _run(a, more)
    _run(restored, more)
    np.testing.assert_array_equal(restored.predict_events(probe), a.predict_events(probe))


def test_a_state_learned_under_other_rates_keeps_its_weights():
    """A state learned when the hashed slots took the numeric block's rate (before
    ``slot_step_norm``), restored under today's: FTRL's ``z`` is re-derived, so every weight
    is what the state stored, and no slot weight jumps by the ratio of the rates (2.3x
    here) at its next update."""
    spec = SPECS["binary"]
    with mock.patch.object(ModelSpec, "slot_step_norm", property(lambda s: s.step_norm)):
        old = OnlineModel(spec, device="cpu")
        _run(old, _events("binary", 2000))
        state = old.to_state()
    assert spec.step_norm / spec.slot_step_norm > 2
    restored = OnlineModel.from_state(state)
    np.testing.assert_array_equal(restored.w, old.w)
    derived = ftrl.weights_of(restored.s1.astype(np.float64), restored.s2.astype(np.float64),
                              ftrl.weight_rates(spec), spec.l1, spec.l2, spec.ftrl_beta, True)
    np.testing.assert_allclose(derived, restored.w, rtol=1e-4, atol=1e-6)
    slots = slice(spec.first_slot, spec.n_weights)
    assert not np.array_equal(restored.s1[slots], old.s1[slots])  # re-derived
    before = restored.w[slots].copy()
    _run(restored, _events("binary", 1, seed=5))
    moved = np.abs(restored.w[slots] - before)
    assert moved.max() < 0.5 * np.abs(before).max(), (moved.max(), np.abs(before).max())


@pytest.mark.parametrize("task", SPECS)
def test_input_batch_not_mutated(task):
    model = OnlineModel(SPECS[task], device="cpu")
    batch, _ = model.vectorizer.transform_many(_events(task, 64))
    before = (batch.numeric.copy(), batch.hashed.copy(), batch.labels.copy())
    model.process(batch)
    for old, new in zip(before, (batch.numeric, batch.hashed, batch.labels), strict=True):
        np.testing.assert_array_equal(old, new)


@pytest.mark.parametrize("task", SPECS)
def test_unlabelled_events_are_scored_not_learned(task):
    model = OnlineModel(SPECS[task], device="cpu")
    events = [{k: v for k, v in e.items() if k != "y"} for e in _events(task, 100)]
    scores = _run(model, events, batch=100)
    assert len(scores) == 100 and model.version == 0 and model.n_seen == 100
    assert not np.any(model.w)


def test_binary_learns_and_prequential_scores_come_before_learning():
    model = OnlineModel(SPECS["binary"], device="cpu")
    events = _events("binary", 20000)
    scores = _run(model, events)
    assert scores[0] == 0.5  # the first event is scored by the untrained model
    y = np.array([e["y"] for e in events])
    assert roc_auc(y[-5000:], scores[-5000:]) > 0.95


@pytest.mark.parametrize("task", SPECS)
@pytest.mark.parametrize("update_rows", [1, 16])
def test_no_score_depends_on_its_own_label_or_a_later_one(task, update_rows):
    """Prequential honesty with per-event steps: flipping event i's label changes no score
    up to its window's end, and does change later ones (it was learned)."""
    spec = ModelSpec.from_dict({**SPECS[task].to_dict(), "update_rows": update_rows})
    events = _events(task, 600, seed=5)
    i = 312  # in the second 200-row batch, the first row of a window for both update_rows
    flipped = [dict(e) for e in events]
    flipped[i]["y"] = (1 - events[i]["y"]) if task != "regression" else events[i]["y"] + 50
    a = _run(OnlineModel(spec, device="cpu"), events, batch=200)
    b = _run(OnlineModel(spec, device="cpu"), flipped, batch=200)
    end = i + update_rows
    np.testing.assert_array_equal(a[:end], b[:end])
    assert np.any(a[end:] != b[end:])


def test_regression_error_falls():
    model = OnlineModel(SPECS["regression"], device="cpu")
    events = _events("regression", 20000)
    scores = _run(model, events)
    y = np.array([e["y"] for e in events])
    early = np.abs(scores[:50] - y[:50]).mean()
    late = np.abs(scores[-2000:] - y[-2000:]).mean()
    assert late < 0.15 and late < early / 5


def _stream(rng, n, numeric=3):
    """Seeded rows: ``numeric`` raw features of mixed scales and one 10-value category."""
    x = rng.normal(size=(n, numeric)) * [1.0, 30.0, 0.01][:numeric] + [0.0, 200.0, 5.0][:numeric]
    c = rng.integers(0, 10, n)
    return x, c


def _feed(model, x, c, y, batch=256):
    events = [{"event_id": i, **{f"x{j}": float(v) for j, v in enumerate(row)},
               "c": f"c{c[i]}", "y": y[i].item()} for i, row in enumerate(x)]
    return _run(model, events, batch)


def test_rare_positive_stream_beats_the_base_rate_in_log_loss():
    """1% positives: the prequential log loss beats a constant predictor at the base rate
    (the default bias starts from, and follows, the running base rate)."""
    rng = np.random.default_rng(11)
    n = 30000
    x, c = _stream(rng, n)
    z = (x - x.mean(0)) / x.std(0)
    logit = -5.6 + 1.2 * z[:, 0] - 0.8 * z[:, 1] + 1.0 * (c == 3)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    assert 0.005 < y.mean() < 0.02
    spec = ModelSpec(name="rare", topic="t", numeric=("x0", "x1", "x2"), categorical=("c",),
                     label="y", hash_bits=8)
    p = np.clip(_feed(OnlineModel(spec, device="cpu"), x, c, y), 1e-7, 1 - 1e-7)
    ll = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    base = y.mean()
    constant = -(base * np.log(base) + (1 - base) * np.log(1 - base))
    assert ll < 0.9 * constant, (ll, constant)
    assert roc_auc(y, p) > 0.8


def test_regression_intercept_converges_to_a_target_mean_far_from_zero():
    """Targets around 5,000: the served intercept (bias in target units) reaches the mean
    of the targets, and the error falls to the noise level."""
    rng = np.random.default_rng(12)
    n = 20000
    x, c = _stream(rng, n)
    y = 5000.0 + 40.0 * (x[:, 0]) + 3.0 * (x[:, 1] - 200.0) + rng.normal(0, 10.0, n)
    spec = ModelSpec(name="reg", topic="t", task="regression", numeric=("x0", "x1", "x2"),
                     categorical=("c",), label="y", hash_bits=8)
    model = OnlineModel(spec, device="cpu")
    scores = _feed(model, x, c, y)
    intercept = model.explain_one({"x0": float(x[:, 0].mean()), "x1": float(x[:, 1].mean()),
                                   "x2": float(x[:, 2].mean()), "c": "c0"})["bias"]
    assert abs(intercept - y.mean()) < 0.02 * y.std(), (intercept, y.mean())
    rmse = np.sqrt(np.mean((scores[-2000:] - y[-2000:]) ** 2))
    assert rmse < 15.0, rmse  # noise sd is 10


def test_a_rare_category_that_tells_the_label_is_learned_among_many_numeric_fields():
    """400 days, each seen 6 times in random order, whose day alone tells the label, among
    20 noise fields: the day's slot takes its own step (``slot_step_norm``), not the step
    normalized by all 21 fields, and the repeat visits are ranked almost perfectly."""
    rng = np.random.default_rng(13)
    day = rng.permutation(np.repeat(np.arange(400), 6))
    y = (rng.random(400) < 0.5).astype(int)[day]
    x = rng.normal(size=(day.size, 20))
    names = tuple(f"x{j}" for j in range(20))
    events = [{**dict(zip(names, x[i].tolist(), strict=True)), "day": f"d{day[i]}",
               "y": int(y[i]), "event_id": i} for i in range(day.size)]
    spec = ModelSpec(name="days", topic="t", numeric=names, categorical=("day",), label="y",
                     hash_bits=12)
    repeat = np.ones(day.size, dtype=bool)
    repeat[np.unique(day, return_index=True)[1]] = False  # each day's first visit

    def auc_of_repeats(model: OnlineModel) -> float:
        return roc_auc(y[repeat], _run(model, events, batch=256)[repeat])

    assert spec.slot_step_norm == 1.0 and spec.step_norm > 9.0
    model = OnlineModel(spec, device="cpu")
    assert auc_of_repeats(model) > 0.97
    # Each day's slot was updated 6 times in 2,400 events: its running average follows its
    # own updates (the global rate, 1/2,000 per update by then, left it near 0).
    slots = np.flatnonzero(model.s2[spec.first_slot : spec.n_weights]) + spec.first_slot
    w, avg = model.w[slots].astype(np.float64), model.avg[slots]
    assert np.median(np.abs(avg) / np.abs(w)) > 0.5, np.median(np.abs(avg) / np.abs(w))
    # The step normalized by every field (the rule before) learns the days far less well.
    with mock.patch.object(ModelSpec, "slot_step_norm", property(lambda s: s.step_norm)):
        assert auc_of_repeats(OnlineModel(spec, device="cpu")) < 0.8


@pytest.mark.parametrize("categorical", [(), ("c",)])
def test_a_missing_value_that_tells_the_label_is_learned(categorical):
    """Whether ``income`` is given tells the label (90% positive where it is missing, 10%
    where it is not), and its value tells nothing. Imputed with the mean, a z-score of 0,
    the value's absence moved no margin (measured: AUC 0.50 before the missing block);
    its missing-value weight learns it (the best possible AUC here is 0.87), on the dense
    path and the CSR path alike, and the reason codes name the field."""
    rng = np.random.default_rng(21)
    n = 6000
    missing = rng.random(n) < 0.3
    y = (rng.random(n) < np.where(missing, 0.9, 0.1)).astype(int)
    x = rng.normal(size=(n, 5))
    names = tuple(f"x{j}" for j in range(5))
    events = [{**dict(zip(names, x[i].tolist(), strict=True)), "c": f"c{i % 3}",
               "y": int(y[i]), "event_id": i,
               **({} if missing[i] else {"income": float(rng.normal())})} for i in range(n)]
    spec = ModelSpec(name="miss", topic="t", numeric=(*names, "income"),
                     categorical=categorical, label="y", hash_bits=6)
    model = OnlineModel(spec, device="cpu")
    assert model.dense == (not categorical)
    scores = _run(model, events)
    assert roc_auc(y[1000:], scores[1000:]) > 0.82
    gone = events[int(np.flatnonzero(missing)[-1])]
    explained = model.explain_one(gone)
    assert explained["contributions"]["income"] > 1.0, explained
    assert reason_codes(model, model.vectorizer.transform_many([gone])[0], 1)[0][0] == {
        "feature": "income", "contribution": pytest.approx(explained["contributions"]["income"])}


@pytest.mark.parametrize("task", SPECS)
def test_a_state_from_before_the_missing_block_keeps_its_scores(task):
    """A version-2 state has no missing block: it is inserted at zero, the weights keep
    their places, and every score stays as it was (a missing value added 0 then, its zero
    weight adds 0 now)."""
    model = OnlineModel(SPECS[task], device="cpu")
    events = _events(task, 3000)
    _run(model, events)
    d = SPECS[task].n_numeric
    block = np.s_[d : 2 * d]
    state = model.to_state()
    old = dict(state, state_version=2, weights={
        k: np.delete(v, block, axis=0) for k, v in state["weights"].items()})
    restored = OnlineModel.from_state(old)
    for name in model.weight_names:
        got, was = getattr(restored, name), getattr(model, name)
        np.testing.assert_array_equal(np.delete(got, block, axis=0),
                                      np.delete(was, block, axis=0), err_msg=name)
        assert not got[block].any(), name
    probe = events[:200]
    for e in probe[::3]:
        del e["x1"]
    if task != "ranking":  # (the FM's block of factors starts random, a restored one's 0)
        np.testing.assert_array_equal(restored.predict_events(probe), model.predict_events(probe))
    plain = [e for e in probe if "x1" in e]
    np.testing.assert_array_equal(restored.predict_events(plain), model.predict_events(plain))


def test_a_state_from_a_newer_release_is_refused_with_its_version():
    state = OnlineModel(SPECS["binary"], device="cpu").to_state()
    newer = dict(state, state_version=STATE_VERSION + 1)
    with pytest.raises(StateError, match=f"version {STATE_VERSION + 1} is too new"):
        OnlineModel.from_state(newer)


@pytest.mark.parametrize(("average", "margin"), [(False, 0.005), (True, 0.0005)])
def test_the_default_horizon_keeps_up_with_a_concept_that_turns(average, margin):
    """The concept turns twice round the circle over 120,000 events: with the classic FTRL
    rule (``horizon=0``) every weight's step shrinks as ``1/sqrt(updates)`` and the model
    lags ever further; with the default horizon the squared-gradient sums stop at the cap
    and the step with them, and the model keeps up.  The learner alone (``average=False``)
    shows it most (measured: +0.0063 AUC); scored with its average, at the averaged
    model's larger step, the classic rule lags less over this stream (+0.0017)."""
    rng = np.random.default_rng(13)
    n = 120_000
    x, c = _stream(rng, n)
    z = (x - x.mean(0)) / x.std(0)
    theta = 4 * np.pi * np.arange(n) / n
    logit = 2.0 * (np.cos(theta) * z[:, 0] + np.sin(theta) * z[:, 1]) + 0.8 * (c == 3)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    default = ModelSpec(name="m", topic="t", numeric=("x",))
    auc, top = {}, {}
    for horizon in (default.horizon, 0):
        spec = ModelSpec(name="turn", topic="t", numeric=("x0", "x1", "x2"),
                         categorical=("c",), label="y", hash_bits=8, horizon=horizon,
                         average=average)
        model = OnlineModel(spec, device="cpu")
        p = _feed(model, x, c, y)
        auc[horizon], top[horizon] = roc_auc(y[-40000:], p[-40000:]), float(model.s2.max())
    assert top[default.horizon] == default.gradient_cap and top[0] > 10 * top[default.horizon]
    assert auc[default.horizon] > auc[0] + margin, auc


def test_a_state_from_before_the_horizon_is_restored_and_its_steps_stop_shrinking():
    # An upgrade keeps the model: the spec of a state written without ``horizon`` takes the
    # default (so the worker's configured spec still matches), the weights are kept, and
    # sums already past the cap neither grow nor shrink.
    old_spec = ModelSpec.from_dict({**SPECS["binary"].to_dict(), "horizon": 0})
    model = OnlineModel(old_spec, device="cpu")
    _run(model, _events("binary", 20000))
    state = model.to_state()
    state["spec"] = {k: v for k, v in state["spec"].items() if k != "horizon"}
    restored = OnlineModel.from_state(state)
    assert restored.spec == SPECS["binary"]
    np.testing.assert_array_equal(restored.w, model.w)
    cap = SPECS["binary"].gradient_cap
    before = restored.s2.copy()
    assert before.max() > cap  # learned uncapped past it
    _run(restored, _events("binary", 2000, seed=5))
    past = before > cap
    np.testing.assert_array_equal(restored.s2[past], before[past])


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "ftrl"])
@pytest.mark.parametrize("task", ["binary", "regression"])
def test_every_optimizer_learns_at_its_default_step(task, optimizer):
    spec = ModelSpec.from_dict({**SPECS[task].to_dict(), "optimizer": optimizer})
    assert spec.learning_rate is None  # the optimizer's own default step
    events = _events(task, 20000, seed=1)
    scores = _run(OnlineModel(spec, device="cpu"), events)
    y = np.array([e["y"] for e in events])
    if task == "binary":
        assert roc_auc(y[-5000:], scores[-5000:]) > 0.95
    else:
        rmse = np.sqrt(np.mean((scores[-5000:] - y[-5000:]) ** 2))
        assert rmse < 0.25 * y.std(), (rmse, y.std())


def test_factorization_machine_learns_an_interaction():
    model = OnlineModel(SPECS["ranking"], device="cpu")
    events = _events("ranking", 40000)
    scores = _run(model, events)
    y = np.array([e["y"] for e in events])
    assert roc_auc(y[-5000:], scores[-5000:]) > 0.8


def test_fraud_stream_is_learnable_to_auc_above_090_on_unseen_events(fraud_spec):
    model = OnlineModel(fraud_spec, device="cpu")
    _run(model, FraudStream(seed=3).take(60000), batch=256)
    holdout = FraudStream(seed=4).take(20000)
    y = np.array([e.get("is_fraud", 0) for e in holdout])
    assert roc_auc(y, model.predict_events(holdout)) > 0.9


def test_explain_contributions_add_up_to_the_margin(fraud_spec):
    model = OnlineModel(fraud_spec, device="cpu")
    _run(model, FraudStream(seed=3).take(3000), batch=256)
    event = FraudStream(seed=5).take(1)[0]
    ex = model.explain_one(event)
    assert ex["bias"] + sum(ex["contributions"].values()) == pytest.approx(ex["margin"], abs=1e-5)
    assert ex["score"] == pytest.approx(float(model.predict_events([event])[0]), abs=1e-6)
    assert f"country={event['country']}" in ex["contributions"]


def test_cuda_request_without_gpu_fails_at_start_with_a_clear_error():
    from numba import cuda

    if cuda.is_available():
        pytest.skip("a CUDA device (or the simulator) is present")
    with pytest.raises(BackendUnavailable, match="no CUDA GPU is visible|numba's CUDA support"):
        get_backend("cuda")
    with pytest.raises(BackendUnavailable):
        OnlineModel(SPECS["binary"], device="cuda")


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "ftrl"])
@pytest.mark.parametrize("task", ["binary", "regression"])
def test_dense_path_matches_the_csr_path(task, optimizer):
    """All-numeric specs skip CSR; the kernels' semantics make both paths agree."""
    spec = ModelSpec(name="d", topic="t", task=task, numeric=("x1", "x2"), label="y",
                     optimizer=optimizer, l1=1e-4, l2=1e-3, learning_rate=0.05)
    events = _events(task, 1024)
    for e in events[::7]:
        del e["x2"]  # imputation must agree too
    for e in events[1::5]:
        del e["y"]  # partly labelled batches
    dense, sparse = OnlineModel(spec, device="cpu"), OnlineModel(spec, device="cpu")
    sparse.dense = False
    assert dense.dense
    np.testing.assert_allclose(_run(dense, events), _run(sparse, events), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dense.w, sparse.w, rtol=1e-5, atol=1e-6)
    assert dense.n_imputed.tolist() == sparse.n_imputed.tolist() == [0, len(events[::7])]


def _state_arrays(model):
    s = model.to_state()
    return {
        **{f"w.{k}": v for k, v in s["weights"].items()},
        **{f"scaler.{k}": v for k, v in s["scaler"].items()},
        "n_imputed": s["n_imputed"],
        "target": s["target"],
        **({"mix": s["mix"]} if "mix" in s else {}),
        "metrics.y": s["metrics"]["y"],
        "metrics.p": s["metrics"]["p"],
        **{f"drift.{k}": s["drift"]["data"][k]
           for k in ("recent_num", "recent_cat", "recent_mean") if k in s["drift"]["data"]},
    }


@pytest.mark.parametrize(("optimizer", "update_rows"),
                         [("sgd", 1), ("adagrad", 1), ("ftrl", 1), ("ftrl", 7)])
@pytest.mark.parametrize("kind", ["dense", "binary", "collisions", "regression", "ranking"])
def test_process_many_equals_process_slice_by_slice(kind, optimizer, update_rows):
    """The fused CPU call is the composed step, bit for bit: scores, weights (the binary
    models' running average and mixture gap too), scaler, metrics, drift and counters;
    partly labelled and missing values included; per event and in windows of 7 rows.
    ``collisions``: three categorical fields in 4 hashed slots, so most rows hold a slot
    twice (its gradients summed, one update) and the rest take the per-event loop's
    path for rows without a repeat."""
    base = SPECS["binary" if kind in ("dense", "collisions") else kind]
    spec = ModelSpec.from_dict({**base.to_dict(), "optimizer": optimizer, "l1": 1e-4,
                                "l2": 1e-3, "batch_size": 100, "horizon": 400,
                                "update_rows": update_rows})
    if kind == "dense":
        spec = ModelSpec.from_dict({**spec.to_dict(), "categorical": []})
    if kind == "collisions":
        spec = ModelSpec.from_dict({**spec.to_dict(), "categorical": ["c", "user", "item"],
                                    "hash_bits": 2})
    events = _events(base.task, 6000, seed=3)
    for e in events[::7]:
        del e["x1"]
    for e in events[2::9]:
        del e["y"]
    fused, composed = OnlineModel(spec, device="cpu"), OnlineModel(spec, device="cpu")
    batch, _ = fused.vectorizer.transform_many(events)
    steps = fused.process_many(batch)
    scores = [composed.process(batch.take(np.arange(lo, min(lo + 100, len(batch)))))
              for lo in range(0, len(batch), 100)]
    assert fused.dense == (kind == "dense")
    np.testing.assert_array_equal(steps.scores, np.concatenate(scores))
    assert steps.versions.tolist() == list(range(60))
    assert steps.learned.sum() == composed.n_learned == fused.n_learned
    expected, got = _state_arrays(composed), _state_arrays(fused)
    assert ("w.avg" in got) == ("mix" in got) == (base.task == "binary")
    for name, arr in expected.items():
        np.testing.assert_array_equal(got[name], arr, err_msg=name)
    assert not np.isnan(got["drift.recent_mean"]).any()  # past the reference window
    if optimizer != "sgd" and update_rows == 1:  # the memory cap was reached, alike
        acc = got["w.s1" if optimizer == "adagrad" else "w.s2"]
        assert acc.max() == np.float32(spec.gradient_cap)
    for attr in ("version", "step", "n_seen", "n_learned"):
        assert getattr(fused, attr) == getattr(composed, attr), attr
    assert fused.drift_report() == composed.drift_report()


def test_process_many_versions_skip_unlabelled_slices():
    model = OnlineModel(SPECS["binary"], device="cpu")
    events = _events("binary", 500)
    for e in events[100:300]:
        del e["y"]
    batch, _ = model.vectorizer.transform_many(events)
    steps = model.process_many(batch, 100)
    assert steps.learned.tolist() == [100, 0, 0, 100, 100]
    assert steps.versions.tolist() == [0, 1, 1, 1, 2]
    assert model.version == 3 and model.n_learned == 300 and model.n_seen == 500
