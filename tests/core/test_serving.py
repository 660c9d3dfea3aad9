"""ModelStore and merge_states: validation, hot swap, replica merge."""

from __future__ import annotations

import dataclasses
import struct
import threading
import time
import zlib
from typing import Any

import numpy as np
import pytest

from streamlearn import snapshots
from streamlearn.config import ModelSpec
from streamlearn.metrics import LEARN_BUCKETS
from streamlearn.models import OnlineModel
from streamlearn.scaler import RunningStandardScaler
from streamlearn.serving import (
    ModelStore,
    SnapshotPolicy,
    clean_telemetry,
    merge_states,
    sum_telemetry,
)
from streamlearn.synthetic import FraudStream

SPEC = ModelSpec(
    name="fraud", topic="transactions", label="is_fraud",
    numeric=("amount", "hour", "distance_km"), categorical=("merchant_category", "country"),
    hash_bits=8, learning_rate=0.05,
)


def trained(spec: ModelSpec = SPEC, seed: int = 0, n: int = 2000) -> OnlineModel:
    model = OnlineModel(spec, device="cpu")
    events = FraudStream(seed=seed).take(n)
    for start in range(0, n, 250):
        batch, _ = model.vectorizer.transform_many(events[start : start + 250])
        model.process(batch)
    return model


def telemetry(consumed: int) -> dict[str, Any]:
    counts = [0] * len(LEARN_BUCKETS)
    counts[3:] = [2] * (len(LEARN_BUCKETS) - 3)
    return {"consumed": consumed, "scored": consumed, "learned": consumed, "deadlettered": 1,
            "learn_seconds": {"le": list(LEARN_BUCKETS), "counts": counts, "sum": 0.002,
                              "count": 2}}


def payload(model: OnlineModel, replica: str = "r1", consumed: int = 10, fmt: int = 2) -> bytes:
    state = model.to_state() | {"replica": replica, "telemetry": telemetry(consumed)}
    return snapshots.encode(state, fmt=fmt)


@pytest.fixture(scope="module")
def model_a() -> OnlineModel:
    return trained(seed=1)


@pytest.fixture(scope="module")
def model_b() -> OnlineModel:
    return trained(seed=2, n=1000)


# -- merge_states --------------------------------------------------------------


def assert_state_equal(a: Any, b: Any) -> None:
    if isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            assert_state_equal(a[k], b[k])
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


def test_merge_one_state_is_identity(model_a: OnlineModel) -> None:
    state = model_a.to_state()
    merged = merge_states([state])
    assert_state_equal(merged, state)
    merged["weights"]["w"][0] += 1.0  # a copy: the input is untouched
    assert state["weights"]["w"][0] != merged["weights"]["w"][0]


def test_merge_two_equal_weight_states_averages(model_a: OnlineModel,
                                                model_b: OnlineModel) -> None:
    a, b = model_a.to_state(), model_b.to_state()
    b["n_learned"] = a["n_learned"]  # equal weights
    a["offsets"], b["offsets"] = {"t:0": 5, "t:1": 9}, {"t:1": 3, "t:2": 4}
    m = merge_states([a, b])
    for name in ("w", "s1", "s2"):
        np.testing.assert_allclose(
            m["weights"][name], (a["weights"][name] + b["weights"][name]) / 2, rtol=1e-6
        )
        assert m["weights"][name].dtype == np.float32
    assert m["n_learned"] == 2 * a["n_learned"]
    assert m["n_seen"] == a["n_seen"] + b["n_seen"]
    assert m["version"] == max(a["version"], b["version"])
    assert m["offsets"] == {"t:0": 5, "t:1": 9, "t:2": 4}
    np.testing.assert_array_equal(m["n_imputed"], a["n_imputed"] + b["n_imputed"])
    # The scaler merge is exact: the same as one scaler over both streams.
    both = RunningStandardScaler.from_state(a["scaler"])
    both.merge(RunningStandardScaler.from_state(b["scaler"]))
    np.testing.assert_allclose(m["scaler"]["mean"], both.mean)
    np.testing.assert_allclose(m["scaler"]["count"], a["scaler"]["count"] + b["scaler"]["count"])
    # The merged state is a valid model state.
    assert OnlineModel.from_state(m).version == m["version"]


def test_merge_weights_by_events_learned(model_a: OnlineModel, model_b: OnlineModel) -> None:
    a, b = model_a.to_state(), model_b.to_state()
    a["n_learned"], b["n_learned"] = 300, 100
    m = merge_states([a, b])
    expected = 0.75 * a["weights"]["w"].astype(np.float64) + 0.25 * b["weights"]["w"]
    np.testing.assert_allclose(m["weights"]["w"], expected, rtol=1e-6, atol=1e-7)


def test_merge_factorization_machine_averages_factors() -> None:
    spec = ModelSpec(name="ctr", topic="clicks", label="is_fraud", task="ranking",
                     numeric=("amount",), categorical=("country",), hash_bits=6, fm_factors=4)
    a, b = trained(spec, seed=3, n=500).to_state(), trained(spec, seed=4, n=500).to_state()
    m = merge_states([a, b])
    for name in ("V", "s1v", "s2v"):
        np.testing.assert_allclose(m["weights"][name],
                                   (a["weights"][name] + b["weights"][name]) / 2, rtol=1e-5)
    assert OnlineModel.from_state(m).is_fm


def test_merge_refuses_different_specs(model_a: OnlineModel) -> None:
    other = OnlineModel(ModelSpec(name="fraud", topic="t", numeric=("amount",), hash_bits=4))
    with pytest.raises(ValueError, match="different model specs"):
        merge_states([model_a.to_state(), other.to_state()])
    with pytest.raises(ValueError, match="at least one"):
        merge_states([])


def test_telemetry_is_cleaned_and_summed() -> None:
    t = clean_telemetry(telemetry(5))
    s = sum_telemetry([t, clean_telemetry(telemetry(7))])
    assert s["consumed"] == 12 and s["deadlettered"] == 2
    assert s["learn_seconds"]["count"] == 4 and s["learn_seconds"]["counts"][-1] == 4
    assert clean_telemetry("nonsense")["consumed"] == 0
    bad = telemetry(1)
    bad["learn_seconds"]["counts"] = [3, 1] + [0] * (len(LEARN_BUCKETS) - 2)  # not cumulative
    assert clean_telemetry(bad)["learn_seconds"] is None


def test_learn_buckets_match_the_pipeline() -> None:
    from streamlearn import pipeline

    assert tuple(pipeline.LEARN_BUCKETS) == LEARN_BUCKETS


# -- ModelStore ----------------------------------------------------------------


def test_store_serves_a_snapshot(model_a: OnlineModel) -> None:
    store = ModelStore()
    assert store.get("fraud") is None and store.names() == [] and len(store) == 0
    assert store.offer("fraud/r1", payload(model_a))
    served = store.get("fraud")
    assert served is not None
    assert served.version == model_a.version
    assert served.updated_at == model_a.updated_at
    assert served.loaded_at > 0 and served.loaded_monotonic > 0
    assert served.telemetry["consumed"] == 10
    assert served.info["events_learned"] == model_a.n_learned
    assert list(served.replicas) == ["r1"]
    events = FraudStream(seed=9).take(20)
    np.testing.assert_array_equal(served.model.predict_events(events),
                                  model_a.predict_events(events))
    assert served.age_s(now=served.updated_at + 5) == pytest.approx(5.0)


@pytest.mark.parametrize("corrupt", [
    b"", b"garbage", b"SLSNAP\x01\x00\x00\x00\x00\x00", "truncated", "flipped", "foreign",
])
def test_store_rejects_corrupt_payloads(model_a: OnlineModel, corrupt: Any) -> None:
    good = payload(model_a)
    if corrupt == "truncated":
        corrupt = good[: len(good) // 2]
    elif corrupt == "flipped":
        corrupt = good[:-5] + bytes([good[-5] ^ 0xFF]) + good[-4:]
    elif corrupt == "foreign":
        corrupt = snapshots.encode({"kind": "something else", "w": np.zeros(3)})
    store = ModelStore()
    assert store.offer("fraud/r1", good)
    before = store.get("fraud")
    assert store.offer("fraud/r1", corrupt) is False
    assert store.stats.rejected == 1 and store.stats.accepted == 1
    assert sum(store.stats.rejected_by_reason.values()) == 1
    assert "fraud/r1" in store.stats.last_error
    assert store.get("fraud") is before  # still serving the last good model


def test_store_rejects_name_mismatch_and_skips_duplicates(model_a: OnlineModel) -> None:
    store = ModelStore()
    assert store.offer("other/r1", payload(model_a)) is False
    assert store.stats.rejected_by_reason == {"name_mismatch": 1}
    data = payload(model_a)
    assert store.offer("fraud/r1", data)
    served = store.get("fraud")
    assert store.offer("fraud/r1", data) is False
    assert store.stats.duplicate == 1 and store.get("fraud") is served


def test_hot_swap_publishes_a_new_object(model_a: OnlineModel) -> None:
    model = OnlineModel.from_state(model_a.to_state())
    store = ModelStore()
    store.offer("fraud/r1", payload(model))
    old = store.get("fraud")
    assert old is not None
    batch, _ = model.vectorizer.transform_many(FraudStream(seed=5).take(250))
    model.process(batch)
    assert store.offer("fraud/r1", payload(model))
    new = store.get("fraud")
    assert new is not None and new is not old
    assert new.version == old.version + 1
    assert old.model.version == old.version  # a reader's object never changes under it


def test_stale_snapshot_is_ignored(model_a: OnlineModel) -> None:
    old_state = model_a.to_state()
    model = OnlineModel.from_state(old_state)
    batch, _ = model.vectorizer.transform_many(FraudStream(seed=6).take(250))
    model.process(batch)
    store = ModelStore()
    assert store.offer("fraud/r1", payload(model))
    old_state["updated_at"] -= 10
    assert store.offer("fraud/r1", snapshots.encode(old_state)) is False
    assert store.stats.stale == 1
    assert store.get("fraud").version == model.version  # type: ignore[union-attr]


def test_replicas_are_merged(model_a: OnlineModel, model_b: OnlineModel) -> None:
    store = ModelStore()
    store.offer("fraud/r1", payload(model_a, "r1", consumed=10))
    store.offer("fraud/r2", payload(model_b, "r2", consumed=5))
    served = store.get("fraud")
    assert served is not None
    assert sorted(served.replicas) == ["r1", "r2"]
    assert served.version == max(model_a.version, model_b.version)
    assert served.info["events_learned"] == model_a.n_learned + model_b.n_learned
    assert served.telemetry["consumed"] == 15
    merged = merge_states([model_a.to_state(), model_b.to_state()])
    np.testing.assert_array_equal(served.model.w, merged["weights"]["w"])
    # A tombstone removes one replica; the other is served alone again.
    assert store.remove("fraud/r2")
    alone = store.get("fraud")
    assert alone is not None and list(alone.replicas) == ["r1"]
    assert alone.version == model_a.version
    assert store.remove("fraud/r1") and store.get("fraud") is None
    assert store.remove("fraud/r1") is False


def test_spec_change_drops_old_replicas(model_a: OnlineModel) -> None:
    store = ModelStore()
    store.offer("fraud/r1", payload(model_a, "r1"))
    respec = ModelSpec(name="fraud", topic="transactions", label="is_fraud",
                       numeric=("amount",), hash_bits=4)
    new = trained(respec, seed=7, n=500)
    assert store.offer("fraud/r2", payload(new, "r2"))
    served = store.get("fraud")
    assert served is not None and list(served.replicas) == ["r2"]
    assert served.model.spec == respec


def test_readers_see_consistent_models_during_swaps(model_a: OnlineModel,
                                                   model_b: OnlineModel) -> None:
    store = ModelStore()
    blobs = [payload(model_a, "r1", consumed=1), payload(model_b, "r1", consumed=2)]
    store.offer("fraud/r1", blobs[0])
    stop = threading.Event()
    errors: list[str] = []

    def read() -> None:
        while not stop.is_set():
            s = store.get("fraud")
            if s is None or s.model.version != s.version or s.info["version"] != s.version:
                errors.append("inconsistent")

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(20):
            # Alternate by bumping updated_at so neither counts as stale.
            state = snapshots.decode(blobs[i % 2])
            state["updated_at"] = float(1e9 + i)
            store.offer("fraud/r1", snapshots.encode(state))
    finally:
        stop.set()
        reader.join()
    assert not errors
    assert store.stats.accepted == 21


# -- snapshot policy: authentication, configured spec, bounds, tombstones -----------

KEY = "a-test-key-of-32-bytes-length!!!"


def signed(model: OnlineModel, key: str = "fraud/r1", secret: str = KEY,
           **changes: Any) -> bytes:
    state = model.to_state() | {"replica": key.partition("/")[2]} | changes
    return snapshots.sign(snapshots.encode(state), secret, context=key)


def strict_store() -> ModelStore:
    return ModelStore(policy=SnapshotPolicy(key=KEY, specs={"fraud": SPEC}))


def test_only_authentic_snapshots_of_the_configured_spec_are_served(model_a: OnlineModel) -> None:
    store = strict_store()
    assert store.submit("fraud/r1", signed(model_a)) == "accepted"
    served = store.get("fraud")
    other = dataclasses.replace(SPEC, hash_bits=4)
    forged = trained(other, n=500)
    attempts = {
        "unsigned": ("fraud/evil", snapshots.encode(model_a.to_state() | {"version": 10**12})),
        "bad_signature": ("fraud/evil", signed(model_a, secret="x" * 32, version=10**12)),
        "spec_mismatch": ("fraud/evil", signed(forged, key="fraud/evil", version=10**12)),
        "unknown_model": ("other/r1", signed(model_a, key="other/r1")),
        "tombstone": ("fraud/r1", None),
        "bad_key": ("fraud/r 1", signed(model_a, key="fraud/r 1")),
    }
    for reason, (key, value) in attempts.items():
        assert store.submit(key, value) == f"rejected:{reason}", reason
        assert store.get("fraud") is served  # the served model never changed
    # A valid snapshot replayed under another replica's key fails its signature too.
    assert store.submit("fraud/r2", signed(model_a)) == "rejected:bad_signature"
    assert store.stats.rejected_by_reason == {
        "unsigned": 1, "bad_signature": 2, "spec_mismatch": 1, "unknown_model": 1,
        "tombstone": 1, "bad_key": 1}
    assert store.stats.rejected == 7 and store.stats.accepted == 1


@pytest.mark.parametrize("mangle, reason", [
    (lambda s: s["weights"]["w"].__setitem__(0, np.inf), "invalid_state"),
    (lambda s: s["weights"]["s1"].__setitem__(1, np.nan), "invalid_state"),
    (lambda s: s["scaler"]["m2"].__setitem__(0, np.inf), "invalid_state"),
    (lambda s: s.__setitem__("version", -1), "invalid_state"),
    (lambda s: s.__setitem__("version", 2**60), "invalid_state"),
    (lambda s: s.__setitem__("updated_at", time.time() + 86_400), "invalid_state"),
    (lambda s: s.__setitem__("updated_at", float("nan")), "invalid_state"),
    (lambda s: s.__setitem__("spec", {"name": "fraud"}), "invalid_state"),
    (lambda s: s.__setitem__("spec", "x"), "invalid_state"),
    (lambda s: s.__setitem__("weights", {"w": s["weights"]["w"][:3]}), "invalid_state"),
    (lambda s: s.__setitem__("scaler", {"mean": [1, 2]}), "invalid_state"),
    (lambda s: s.__setitem__("metrics", {"window": "x"}), "invalid_state"),
    (lambda s: s.pop("n_seen"), "invalid_state"),
])
def test_states_that_no_real_model_has_are_refused(model_a: OnlineModel, mangle: Any,
                                                   reason: str) -> None:
    store = strict_store()
    assert store.offer("fraud/r1", signed(model_a))
    served = store.get("fraud")
    state = model_a.to_state() | {"replica": "r2"}
    mangle(state)
    value = snapshots.sign(snapshots.encode(state), KEY, context="fraud/r2")
    assert store.submit("fraud/r2", value) == f"rejected:{reason}"
    assert store.get("fraud") is served and store.stats.rejected == 1


def test_oversized_and_bomb_snapshots_are_refused_before_allocating(model_a: OnlineModel) -> None:
    store = ModelStore(policy=SnapshotPolicy(specs={"fraud": SPEC}))
    assert store.offer("fraud/r1", payload(model_a))
    # Arrays far larger than SPEC's 2**8 weights (the model's own spec is used for bounds).
    state = model_a.to_state() | {"replica": "r2"}
    state["weights"] = {k: np.ones(2**22, dtype=np.float32) for k in ("w", "s1", "s2")}
    assert store.submit("fraud/r2", snapshots.encode(state)) == "rejected:too_large"
    small = ModelStore(policy=SnapshotPolicy(limits=snapshots.Limits(max_payload_bytes=512)))
    assert small.submit("fraud/r1", payload(model_a)) == "rejected:too_large"
    # Without configured specs, a spec whose weights alone exceed the limit is refused.
    huge = dataclasses.replace(SPEC, hash_bits=26, task="ranking", fm_factors=256)
    meta = {"kind": "streamlearn.model", "spec": huge.to_dict()}
    loose = ModelStore()
    assert loose.submit("fraud/r1", snapshots.encode(meta)) == "rejected:too_large"


def test_too_many_replicas_are_refused(model_a: OnlineModel) -> None:
    store = ModelStore(policy=SnapshotPolicy(max_replicas=2))
    assert store.offer("fraud/r1", payload(model_a, "r1"))
    assert store.offer("fraud/r2", payload(model_a, "r2"))
    assert store.submit("fraud/r3", payload(model_a, "r3")) == "rejected:too_many_replicas"
    assert sorted(store.get("fraud").replicas) == ["r1", "r2"]  # type: ignore[union-attr]


def test_no_mutated_payload_escapes_the_store(model_a: OnlineModel) -> None:
    """Random truncations and byte flips (with the CRC fixed): counted, never raised.
    Format 1's flips go into the decompressed bytes, format 2's into its zstd frames."""
    good = payload(model_a, fmt=1)
    store = ModelStore(policy=SnapshotPolicy(specs={"fraud": SPEC}))
    assert store.offer("fraud/r1", good)
    served = store.get("fraud")
    rng = np.random.default_rng(7)
    header = struct.calcsize("<6sHI")
    raw = bytearray(zlib.decompress(good[header:]))
    outcomes = set()
    for i in range(150):
        mutated = bytearray(raw)
        for pos in rng.integers(0, len(mutated), 1 + i % 4):
            mutated[pos] = int(rng.integers(0, 256))
        body = zlib.compress(bytes(mutated))
        value = struct.pack("<6sHI", snapshots.MAGIC, 1, zlib.crc32(body)) + body
        outcomes.add(store.submit("fraud/r1", value[: len(value) - int(i % 3 == 2)]).split(":")[0])
    zbody = bytearray(payload(model_a, consumed=11)[header:])
    for i in range(150):
        mutated = bytearray(zbody)
        for pos in rng.integers(0, len(mutated), 1 + i % 4):
            mutated[pos] = int(rng.integers(0, 256))
        value = struct.pack("<6sHI", snapshots.MAGIC, 2, zlib.crc32(mutated)) + mutated
        outcomes.add(store.submit("fraud/r1", value[: len(value) - int(i % 3 == 2)]).split(":")[0])
    assert outcomes <= {"rejected", "accepted", "duplicate", "stale"}
    assert "rejected" in outcomes and store.stats.rejected >= 1
    current = store.get("fraud")
    assert current is not None and current.name == "fraud" and served is not None


def test_require_signature_without_a_key_refuses_everything(model_a: OnlineModel) -> None:
    store = ModelStore(policy=SnapshotPolicy(require_signature=True))
    assert store.submit("fraud/r1", payload(model_a)) == "rejected:unsigned"
    assert "key=None" in repr(store.policy) and KEY not in repr(strict_store().policy)


def test_learning_only_settings_may_differ_from_the_configured_spec(model_a: OnlineModel) -> None:
    configured = dataclasses.replace(SPEC, learning_rate=0.5, batch_size=64, device="cpu")
    store = ModelStore(policy=SnapshotPolicy(specs={"fraud": configured}))
    assert store.submit("fraud/r1", payload(model_a)) == "accepted"
    for change in ({"numeric": ("amount",)}, {"task": "regression"}, {"label": "y"}):
        other = ModelStore(policy=SnapshotPolicy(
            specs={"fraud": dataclasses.replace(SPEC, **change)}))
        assert other.submit("fraud/r1", payload(model_a)) == "rejected:spec_mismatch", change
