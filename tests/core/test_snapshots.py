import numpy as np
import pytest

from streamlearn import snapshots
from streamlearn.models import OnlineModel, StateError
from streamlearn.synthetic import FraudStream


def _trained(spec, n=3000):
    model = OnlineModel(spec, device="cpu")
    batch, _ = model.vectorizer.transform_many(FraudStream(seed=1).take(n))
    for i in range(0, n, 256):
        model.process(batch.take(np.arange(i, min(i + 256, n))))
    model.offsets = {"transactions:0": 1234, "transactions:3": 99}
    return model


def test_model_round_trips_exactly(fraud_spec):
    model = _trained(fraud_spec)
    state = snapshots.decode(snapshots.encode(model.to_state()))
    restored = OnlineModel.from_state(state)
    for name in ("w", "s1", "s2"):
        np.testing.assert_array_equal(getattr(restored, name), getattr(model, name))
    np.testing.assert_array_equal(restored.scaler.m2, model.scaler.m2)
    assert restored.offsets == model.offsets
    assert (restored.version, restored.step, restored.n_seen) == (
        model.version,
        model.step,
        model.n_seen,
    )
    assert restored.metrics.report() == model.metrics.report()
    events = FraudStream(seed=9).take(100)
    np.testing.assert_array_equal(restored.predict_events(events), model.predict_events(events))


def test_hashed_weights_are_stored_sparse(fraud_spec):
    model = _trained(fraud_spec)
    dense_bytes = 3 * model.w.nbytes
    assert len(snapshots.encode(model.to_state())) < dense_bytes / 4


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda b: b"XXXXXX" + b[6:], "bad magic"),
        (lambda b: b[:-10], "checksum mismatch"),
        (lambda b: b[:20] + bytes([b[20] ^ 0xFF]) + b[21:], "checksum mismatch"),
        (lambda b: b[:4], "too short"),
        (lambda b: b[:6] + (99).to_bytes(2, "little") + b[8:], "newer than supported"),
    ],
)
def test_corrupt_payloads_are_refused_clearly(fraud_spec, mangle, message):
    payload = snapshots.encode(_trained(fraud_spec, 300).to_state())
    with pytest.raises(snapshots.SnapshotError, match=message):
        snapshots.decode(mangle(payload))


def test_foreign_state_is_refused():
    with pytest.raises(StateError, match="not a streamlearn model state"):
        OnlineModel.from_state(snapshots.decode(snapshots.encode({"kind": "other"})))
    with pytest.raises(StateError, match="missing or has a bad field"):
        OnlineModel.from_state({"kind": "streamlearn.model", "state_version": 1})


def test_atomic_save_leaves_no_temp_files(tmp_path, fraud_spec):
    payload = snapshots.encode(_trained(fraud_spec, 300).to_state())
    path = tmp_path / "a" / "m.snap"
    snapshots.save(path, payload)
    snapshots.save(path, payload)
    assert [p.name for p in path.parent.iterdir()] == ["m.snap"]
    assert snapshots.load(path)["version"] == OnlineModel.from_state(snapshots.load(path)).version
