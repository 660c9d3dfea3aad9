"""Reason codes (top-K field contributions) and decision bands, in the core."""

from __future__ import annotations

import numpy as np
import pytest

from streamlearn.config import ModelSpec
from streamlearn.models import OnlineModel
from streamlearn.reasons import annotate, decide, reason_codes, serving_spec
from streamlearn.settings import SettingsError, load_settings
from streamlearn.synthetic import FraudStream

NUMERIC = ("hour", "distance_km", "card_age_days", "tx_last_hour")
CATEGORICAL = ("merchant_category", "country", "channel")


def trained(task: str) -> tuple[OnlineModel, list[dict]]:
    label = "amount" if task == "regression" else "is_fraud"
    numeric = NUMERIC if task == "regression" else ("amount", *NUMERIC)
    spec = ModelSpec(name="fraud", topic="t", label=label, task=task, numeric=numeric,
                     categorical=CATEGORICAL, hash_bits=10)
    model = OnlineModel(spec, device="cpu")
    events = FraudStream(seed=5).take(2000)
    for start in range(0, len(events), 256):
        batch, _ = model.vectorizer.transform_many(events[start:start + 256])
        model.process(batch)
    return model, events[:8]


@pytest.mark.parametrize("task", ["binary", "regression", "ranking"])
def test_reasons_are_explain_ones_contributions_by_field_largest_first(task: str) -> None:
    model, events = trained(task)
    batch, _ = model.vectorizer.transform_many(events)
    width = model.spec.n_numeric + len(model.spec.categorical)
    every = reason_codes(model, batch, 1000)  # clipped to the fields
    top3 = reason_codes(model, batch, 3)
    for event, full, short in zip(events, every, top3, strict=True):
        explained = model.explain_one(event)
        expected = {name.split("=")[0]: c for name, c in explained["contributions"].items()}
        got = {r["feature"]: r["contribution"] for r in full}
        assert len(full) == width and set(got) == set(expected)
        for name, c in expected.items():
            assert got[name] == pytest.approx(c, rel=1e-4, abs=1e-6)
        values = [r["contribution"] for r in full]
        assert values == sorted(values, reverse=True)
        assert short == full[:3]
        # Additive: the bias plus every field's contribution is the margin.
        assert explained["bias"] + sum(values) == pytest.approx(explained["margin"], abs=1e-4)


def test_no_reasons_for_k_zero_and_an_empty_batch() -> None:
    model, events = trained("binary")
    batch, _ = model.vectorizer.transform_many(events[:2])
    assert reason_codes(model, batch, 0) == [[], []]
    assert reason_codes(model, batch.take(np.zeros(0, dtype=np.int64)), 3) == []


def test_a_field_with_a_large_weight_comes_first() -> None:
    model, events = trained("binary")
    batch, _ = model.vectorizer.transform_many(events[:1])
    slot = int(batch.hashed[0, 1])  # the event's country slot
    model.w[slot] = 50.0
    assert reason_codes(model, batch, 1)[0][0]["feature"] == "country"


def test_decisions_follow_the_bands() -> None:
    assert decide([0.9, 0.89, 0.5, 0.49], 0.9, 0.5) == ["block", "review", "review", "allow"]
    assert decide([0.99], None, None) == ["allow"]
    spec = ModelSpec(name="m", topic="t", numeric=("x",), decision_block=0.8,
                     decision_review=0.3)
    out = annotate({}, spec, [0.1, 0.85], single=False, reasons=None)
    assert out == {"decisions": ["allow", "block"]}
    plain = ModelSpec(name="m", topic="t", numeric=("x",))
    assert annotate({}, plain, [0.9], single=True, reasons=[[]]) == {"reasons": [[]]}
    assert annotate({}, spec, [0.5], single=True, reasons=None)["decision"] == "review"


def test_bands_are_validated_in_spec_and_settings() -> None:
    with pytest.raises(ValueError, match="decision_block"):
        ModelSpec(name="m", topic="t", numeric=("x",), decision_block=0.2,
                  decision_review=0.5)
    with pytest.raises(ValueError, match="finite"):
        ModelSpec(name="m", topic="t", numeric=("x",), decision_block=float("nan"))
    with pytest.raises(SettingsError, match="decision_block"):
        load_settings(model=[{"name": "m", "topic": "t", "numeric": ["x"],
                              "decision_block": 0.2, "decision_review": 0.5}])
    spec = load_settings(model=[{"name": "m", "topic": "t", "numeric": ["x"],
                                 "decision_block": 0.9}]).specs[0]
    assert (spec.decision_block, spec.decision_review) == (0.9, None)
    assert ModelSpec.from_dict(spec.to_dict()) == spec


def test_the_configured_spec_sets_the_bands() -> None:
    class Policy:
        specs = {"m": "configured"}

    class Store:
        policy = Policy()

    assert serving_spec(Store(), "m", "snapshot") == "configured"
    assert serving_spec(Store(), "other", "snapshot") == "snapshot"
    assert serving_spec(object(), "m", "snapshot") == "snapshot"


def test_the_shipped_fraud_model_has_decision_bands() -> None:
    from pathlib import Path

    config = Path(__file__).resolve().parents[2] / "streamlearn.toml"
    fraud = next(s for s in load_settings(config).specs if s.name == "fraud")
    assert fraud.decision_block is not None and fraud.decision_review is not None
    assert 0.0 < fraud.decision_review < fraud.decision_block < 1.0


def test_prediction_records_carry_reasons_when_configured() -> None:
    import orjson

    from streamlearn.pipeline import ModelRunner, Record

    events = FraudStream(seed=6).take(300)
    values = [orjson.dumps(e) for e in events]
    records = [Record(v, "transactions", 0, i) for i, v in enumerate(values)]
    for k in (0, 2):
        spec = ModelSpec(name="fraud", topic="transactions", label="is_fraud",
                         numeric=("amount", *NUMERIC), categorical=CATEGORICAL, hash_bits=10,
                         reasons_in_records=k)
        runner = ModelRunner(OnlineModel(spec, device="cpu"))
        runner.handle(records[:200])
        before = OnlineModel.from_state(runner.model.to_state())  # as the next batch finds it
        out = runner.handle(records[200:])
        got = [orjson.loads(p) for p in out.predictions]
        assert len(got) == 100
        if k == 0:
            assert all("reasons" not in g for g in got)
            continue
        batch, _ = before.vectorizer.transform_many(events[200:])
        assert [g["reasons"] for g in got] == reason_codes(before, batch, 2)
        assert list(got[0]) == ["id", "model", "version", "score", "reasons"]
