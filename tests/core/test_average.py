"""Averaged scoring (:mod:`streamlearn.models.average`): the mixture of the weights and
their running average leans on whichever expert has predicted better lately."""

import numpy as np
import pytest

from streamlearn.config import ModelSpec
from streamlearn.models import OnlineModel
from streamlearn.models.average import share_of
from streamlearn.prequential import roc_auc

FIELDS = tuple(f"x{j}" for j in range(8))


def _spec(**kw):
    return ModelSpec(name="m", topic="t", numeric=FIELDS, label="y", **kw)


def _stream(n, seed, *, coef, flip_at=None):
    """Two of eight fields carry the signal (``coef``); it changes sign at ``flip_at``."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, len(FIELDS)))
    sign = np.ones(n)
    if flip_at is not None:
        sign[flip_at:] = -1.0
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-coef * sign * (X[:, 0] + X[:, 1])))).astype(int)
    events = [{"event_id": i, **dict(zip(FIELDS, X[i].tolist(), strict=True)), "y": int(y[i])}
              for i in range(n)]
    return events, y


def _learn(model, events, chunk=250):
    batch, rejects = model.vectorizer.transform_many(events)
    assert not rejects
    shares, scores = [], []
    for lo in range(0, len(batch), chunk):
        scores.append(model.process_many(batch.take(np.arange(lo, min(lo + chunk, len(batch)))))
                      .scores)
        shares.append(float(share_of(model.mix)) if model.averaged else None)
    return np.concatenate(scores), shares


def test_only_binary_models_average():
    assert OnlineModel(_spec(), device="cpu").weight_names == ("w", "s1", "s2", "avg")
    assert not OnlineModel(_spec(average=False), device="cpu").averaged
    reg = OnlineModel(_spec(task="regression"), device="cpu")
    assert not reg.averaged and "mix" not in reg.to_state()
    assert reg.info()["average_share"] is None


def test_a_weak_signal_leans_on_the_average_and_scores_better():
    events, y = _stream(20_000, 1, coef=0.5)
    avg_scores, shares = _learn(OnlineModel(_spec(), device="cpu"), events)
    plain_scores, _ = _learn(OnlineModel(_spec(average=False), device="cpu"), events)
    assert shares[-1] < 0.2  # the noisy current weights lost to their average
    assert roc_auc(y, avg_scores) > roc_auc(y, plain_scores) + 0.002


def test_after_the_concept_turns_the_current_weights_take_over():
    events, _ = _stream(20_000, 2, coef=2.0, flip_at=10_000)
    _, shares = _learn(OnlineModel(_spec(), device="cpu"), events)
    assert shares[39] < 0.5  # before the turn (events up to 10,000): the average leads
    assert shares[41] > 0.9  # 500 events after it: the average still holds the old concept


def test_a_state_from_before_averaging_starts_its_average_at_the_weights():
    model = OnlineModel(_spec(), device="cpu")
    events, _ = _stream(3_000, 3, coef=1.0)
    _learn(model, events)
    state = model.to_state()
    state["weights"].pop("avg")
    state.pop("mix")
    restored = OnlineModel.from_state(state)
    np.testing.assert_array_equal(restored.avg, restored.w)
    assert restored.mix.tolist() == [0.0]
    plain = OnlineModel.from_state({**state, "spec": {**state["spec"], "average": False}})
    probe = events[:50]
    np.testing.assert_array_equal(restored.predict_events(probe), plain.predict_events(probe))


def test_served_weights_give_the_served_scores_and_explanations():
    model = OnlineModel(_spec(), device="cpu")
    events, _ = _stream(5_000, 4, coef=1.0)
    _learn(model, events)
    assert 0.0 < float(share_of(model.mix)) < 1.0
    assert model.info()["average_share"] == pytest.approx(float(share_of(model.mix)))
    assert not np.array_equal(model.avg, model.w)
    batch, _ = model.vectorizer.transform_many(events[:20])
    z = model.scaler.transform_many(batch.numeric).astype(np.float64)
    w = model.served_weights().astype(np.float64)
    d = z.shape[1]  # a dense spec: the numeric block, its missing block, then the bias
    expected = 1.0 / (1.0 + np.exp(-(z @ w[:d] + w[-1])))
    np.testing.assert_allclose(model.predict_many(batch), expected, rtol=1e-5)
    explained = model.explain_one(events[0])
    assert explained["score"] == pytest.approx(expected[0], rel=1e-5)
    assert explained["bias"] + sum(explained["contributions"].values()) == pytest.approx(
        explained["margin"], rel=1e-6)
    before = model.served_weights().copy()
    assert model.served_weights() is model.served_weights()  # cached while nothing learns
    _learn(model, events[:500])
    assert not np.array_equal(model.served_weights(), before)  # and rebuilt after learning
