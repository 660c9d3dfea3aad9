"""Drift monitors on seeded streams: exact detection points, and wiring into the model."""

import dataclasses

import numpy as np
import pytest

from streamlearn.drift import ConceptDriftMonitor, DataDriftMonitor
from streamlearn.models import OnlineModel
from streamlearn.synthetic import FraudStream


def _losses(seed=0):
    rng = np.random.default_rng(seed)
    return np.r_[rng.normal(0.1, 0.02, 300), rng.normal(0.6, 0.02, 300)]


def test_adwin_detects_the_loss_jump_at_an_exact_point():
    m = ConceptDriftMonitor("adwin")
    hits = [i for i, x in enumerate(_losses()) if m.update(float(x), events_seen=i)]
    assert hits == [320]  # ADWIN checks every value (clock=1): batch losses are few
    assert m.report()["last_drift_at_event"] == 320


def test_page_hinkley_detects_the_same_jump_later_with_a_higher_threshold():
    def hits(**params):
        m = ConceptDriftMonitor("page_hinkley", **params)
        return [i for i, x in enumerate(_losses()) if m.update(float(x), events_seen=i)]

    assert hits() == [301]  # batch-loss units: threshold 1.0 by default
    assert hits(threshold=5.0) == [310]


def test_stationary_loss_raises_no_drift():
    m = ConceptDriftMonitor("adwin")
    rng = np.random.default_rng(3)
    assert not any(m.update(float(x), i) for i, x in enumerate(rng.normal(0.2, 0.02, 2000)))


def test_concept_state_keeps_counts():
    m = ConceptDriftMonitor("adwin")
    for i, x in enumerate(_losses()):
        m.update(float(x), i)
    r = ConceptDriftMonitor.from_state(m.to_state())
    assert (r.n_drifts, r.drift_points, r.directions) == (1, [320], ["up"])


def test_data_drift_flags_only_the_shifted_feature_and_round_trips():
    rng = np.random.default_rng(1)
    m = DataDriftMonitor(["a", "b", "c"], reference_size=1000, halflife=300)
    for _ in range(8):
        m.update(rng.normal([0, 10, -3], [1, 2, 0.5], size=(256, 3)))
    assert m.ready and m.report()["drifting"] == []
    for _ in range(8):
        m.update(rng.normal([0, 10, -2], [1, 2, 0.5], size=(256, 3)))
    assert m.report()["drifting"] == ["c"]
    r = DataDriftMonitor.from_state(m.to_state())
    np.testing.assert_array_equal(r.scores(), m.scores())


def test_data_drift_update_in_batches_equals_batch_by_batch():
    """One call over many batches (the fused model path) is the batch-by-batch fold,
    including the batch that completes the reference window and missing values."""
    rng = np.random.default_rng(2)
    X = rng.normal([0, 10], [1, 2], size=(3000, 2))
    X[rng.random(X.shape) < 0.05] = np.nan
    X[2000:, 1] += 3.0
    whole, stepwise = (DataDriftMonitor(["a", "b"], reference_size=700, halflife=300)
                       for _ in range(2))
    whole.update(X, 256)
    for lo in range(0, len(X), 256):
        stepwise.update(X[lo : lo + 256])
    assert whole.ready and whole.report()["drifting"] == ["b"]
    np.testing.assert_array_equal(whole.ref_num, stepwise.ref_num)
    np.testing.assert_array_equal(whole.recent_num, stepwise.recent_num)
    np.testing.assert_array_equal(whole.recent_mean, stepwise.recent_mean)


def _drifting_rows(n, seed=3):
    """Two numerics (one shifting half-way, 5% missing) and two categorical slot columns
    (one with slots the reference never saw)."""
    rng = np.random.default_rng(seed)
    X = rng.normal([0, 10], [1, 2], size=(n, 2))
    X[rng.random(X.shape) < 0.05] = np.nan
    X[n // 2 :, 1] += 2.0
    H = np.stack([rng.integers(0, 6, n), rng.integers(0, 40 + n // 50, n)], axis=1)
    return X, H.astype(np.int64)


def test_held_rows_fold_at_a_read_as_every_call_would_have():
    """The fold runs when the shares are read: a monitor read after every call (an
    eager fold) and one read once at the end agree bit for bit, and the held rows are
    copies, so a caller reusing its arrays changes nothing."""
    X, H = _drifting_rows(6000)
    eager, lazy = (DataDriftMonitor(["a", "b"], ["c", "d"], reference_size=1000,
                                    halflife=300) for _ in range(2))
    for lo in range(0, len(X), 500):
        x, h = X[lo : lo + 500].copy(), H[lo : lo + 500].copy()
        eager.update(x, 128, h)
        lazy.update(x, 128, h)
        eager.scores()  # a read folds what is held
        x[:] = 0.0  # the caller reuses its buffers
        h[:] = 0
    assert lazy._held_rows == 5000  # nothing folded yet past the reference
    np.testing.assert_array_equal(lazy.scores(), eager.scores())
    for name in ("recent_num", "recent_cat", "recent_mean"):
        np.testing.assert_array_equal(getattr(lazy, name), getattr(eager, name))
    assert lazy._held_rows == 0 and lazy.report()["drifting"] == ["b"]


def test_held_rows_are_bounded_and_the_oldest_barely_matter():
    """Unread, a monitor holds only the newest 8 half-lives of rows (at least HOLD_MIN);
    the rows it skips weigh at most 0.5 ** 8 of the shares, so a read differs from an
    eager fold by less than that (means: that many reference deviations)."""
    from streamlearn.drift.data import HOLD_HALFLIVES, HOLD_MIN

    X, H = _drifting_rows(40_000)
    eager, lazy = (DataDriftMonitor(["a", "b"], ["c", "d"], reference_size=1000)
                   for _ in range(2))  # the default half-life, 2,000 rows
    held = []
    for lo in range(0, len(X), 4096):
        eager.update(X[lo : lo + 4096], 256, H[lo : lo + 4096])
        lazy.update(X[lo : lo + 4096], 256, H[lo : lo + 4096])
        eager.scores()
        held.append(lazy._held_rows)
    window = max(HOLD_MIN, HOLD_HALFLIVES * lazy.halflife)
    assert max(held) < window + 4096
    weight = 0.5 ** (window / lazy.halflife)
    for name in ("recent_num", "recent_cat"):
        assert 0.0 < np.abs(getattr(lazy, name) - getattr(eager, name)).max() < weight, name
    shift = np.abs(lazy.recent_mean - eager.recent_mean) / lazy.ref_std
    assert shift.max() < weight
    assert lazy.level() == eager.level() == "drift"
    # One call longer than the window keeps its newest whole batches only.
    big = DataDriftMonitor(["a", "b"], ["c", "d"], reference_size=1000)
    big.update(X[:1000], 256, H[:1000])
    big.update(X[1000:], 256, H[1000:])
    assert window <= big._held_rows < window + 256


def test_numeric_shares_equal_a_per_value_binning():
    """The fold counts values at or above each edge; its shares must equal binning each
    value by ``searchsorted(edges, x, "right")`` (discrete values sit on the edges; NaN
    is the missing bin), and the reference's too. 7 rows per batch: a 4-row tail too."""
    rng = np.random.default_rng(5)
    X = rng.normal(0.0, 1.0, size=(1000, 5))
    X[:, 1] = np.round(X[:, 1] * 2)  # discrete: values on the bin edges
    X[:, 4] = rng.integers(0, 3, size=len(X))  # three values, repeated edges
    X[rng.random(X.shape) < 0.07] = np.nan
    m = DataDriftMonitor(list("abcde"), reference_size=700, halflife=50)

    def shares(rows, ref=False):
        out = np.zeros((5, m.bins + 1))
        for j in range(5):
            col = rows[:, j]
            obs = col[~np.isnan(col)]
            idx = np.searchsorted(m.edges[j], obs, side="right")
            out[j, : m.bins] = np.bincount(idx, minlength=m.bins) / len(col)
            # the reference and the fold round the missing share differently
            out[j, m.bins] = 1.0 - len(obs) / len(col) if ref else np.isnan(col).sum() / len(col)
        return out

    m.update(X[:700])
    assert (np.diff(m.edges, axis=1) >= 0).all()
    np.testing.assert_array_equal(m.ref_num, shares(X[:700], ref=True))
    recent = m.ref_num.copy()
    for lo in range(700, 1000, 7):
        rows = X[lo : lo + 7]
        m.update(rows)
        recent += (1.0 - 0.5 ** (len(rows) / m.halflife)) * (shares(rows) - recent)
    np.testing.assert_array_equal(m.recent_num, recent)


@pytest.mark.parametrize("bins", [2, 10, 11])
def test_sorted_quantiles_equal_numpys(bins):
    """The reference's bin edges: numpy's linear quantiles, read off sorted rows (equal
    values; a zero edge's sign is arbitrary in np.quantile too)."""
    from streamlearn.drift.data import sorted_quantiles

    rng = np.random.default_rng(bins)
    qs = np.arange(1, bins) / bins
    for n in [1, 2, 3, 7, 10, 255, 5120]:
        for x in (rng.normal(size=(3, n)) * 1e3, np.round(rng.normal(size=(3, n)))):
            got = sorted_quantiles(np.sort(x, axis=1), n, qs)
            np.testing.assert_array_equal(got, np.quantile(x, qs, axis=1).T)
            padded = np.concatenate([np.sort(x, axis=1), np.full((3, 4), np.nan)], axis=1)
            np.testing.assert_array_equal(sorted_quantiles(padded, n, qs), got)


def test_model_reports_drift_when_the_fraud_pattern_changes(fraud_spec):
    model = OnlineModel(fraud_spec, device="cpu")
    stream = FraudStream(seed=2)
    for _ in range(60):
        batch, _ = model.vectorizer.transform_many(stream.take(256))
        model.process(batch)
    assert model.drift_report()["data"]["drifting"] == []
    stream.card_spend *= 4.0  # every card suddenly spends four times more
    for _ in range(30):
        batch, _ = model.vectorizer.transform_many(stream.take(256))
        model.process(batch)
    report = model.drift_report()
    assert "amount" in report["data"]["drifting"]
    assert report["concept"]["detector"] == "page_hinkley"  # the spec default
    restored = OnlineModel.from_state(model.to_state())
    assert restored.drift_report()["data"] == report["data"]


def test_model_feeds_its_drift_monitor_every_raw_batch(fraud_spec):
    """process() must give the monitor each batch, missing values included, before scaling."""
    model = OnlineModel(fraud_spec, device="cpu")
    direct = DataDriftMonitor.for_spec(fraud_spec)
    stream = FraudStream(seed=6)
    for _ in range(40):  # past the 5,000-event reference window, with missing values
        batch, _ = model.vectorizer.transform_many(stream.take(256))
        model.process(batch)
        direct.update(batch.numeric, None, batch.hashed)
    assert direct.ready and model.data_drift.ready
    for name in ("ref_num", "ref_cat", "recent_num", "recent_cat", "recent_mean"):
        np.testing.assert_allclose(getattr(model.data_drift, name), getattr(direct, name),
                                   rtol=1e-9)


def test_a_high_cardinality_field_is_stable_bounded_and_round_trips():
    """An id-like field (thousands of slots, new ones all the time) is not drift by itself;
    the reference keeps at most MAX_SLOTS slots, so tables and snapshots stay bounded."""
    from streamlearn.drift.data import MAX_SLOTS

    rng = np.random.default_rng(4)
    m = DataDriftMonitor(["x"], ["user", "kind"], reference_size=6000, halflife=1000)

    def batch():
        users = rng.integers(10, 50_000, 256)  # mostly new ids
        kinds = rng.choice([3, 4, 5], 256, p=[0.5, 0.3, 0.2])
        return rng.normal(size=(256, 1)), None, np.c_[users, kinds]

    for _ in range(60):
        m.update(*batch())
    assert m.ready and m.level() == "none", m.ranked()
    assert int(np.diff(m.slot_ptr).max()) == MAX_SLOTS and m.keys.shape[1] <= 4 * MAX_SLOTS
    state = m.to_state()
    assert sum(np.asarray(v).size for v in state.values() if isinstance(v, np.ndarray)) < 10_000
    r = DataDriftMonitor.from_state(state)
    np.testing.assert_array_equal(r.scores(), m.scores())
    x, _, h = batch()
    r.update(x, None, h)
    m.update(x, None, h)
    np.testing.assert_array_equal(r.recent_cat, m.recent_cat)
    bad = dict(state, slot_bins=np.full_like(state["slot_bins"], 99))
    with pytest.raises(ValueError, match="malformed"):
        DataDriftMonitor.from_state(bad)


@pytest.mark.parametrize(("field", "value"), [
    ("halflife", 0.0), ("halflife", -5.0), ("halflife", float("inf")),
    ("halflife", float("nan")), ("halflife", 1e12), ("reference_size", 10**12),
    ("bins", 1), ("threshold", float("nan")),
])
def test_a_forged_data_drift_state_is_refused(field, value):
    """A snapshot sets the monitor's parameters: a half-life of 0 divided by zero in the
    fold, an infinite one crashed the hold and a huge one would hold rows without end,
    a huge reference would buffer them without end."""
    X, H = _drifting_rows(3000)
    m = DataDriftMonitor(["a", "b"], ["c", "d"], reference_size=1000)
    m.update(X, 256, H)
    state = m.to_state()
    assert DataDriftMonitor.from_state(dict(state)).scores().tolist() == m.scores().tolist()
    with pytest.raises(ValueError, match="data drift"):
        DataDriftMonitor.from_state(dict(state, **{field: value}))


def test_a_snapshot_monitoring_other_fields_is_refused(fraud_spec):
    """The fold reads the rows without bounds checks: a monitor of fewer features than
    the model's rows (a forged snapshot) read past its arrays and crashed the worker.
    Such a state is refused, and the monitor refuses rows of another width."""
    from streamlearn.models.online import StateError

    model = OnlineModel(dataclasses.replace(fraud_spec, drift_reference_size=300),
                        device="cpu")
    batch, _ = model.vectorizer.transform_many(FraudStream(seed=4).take(600))
    model.process_many(batch)
    state = model.to_state()
    data = dict(state["drift"]["data"], features=["amount"])
    for name in ("ref_mean", "ref_std", "edges", "ref_num", "recent_num", "recent_mean"):
        data[name] = np.asarray(data[name])[:1]
    DataDriftMonitor.from_state(data)  # consistent in itself
    with pytest.raises(StateError, match="other fields"):
        OnlineModel.from_state(dict(state, drift=dict(state["drift"], data=data)))
    with pytest.raises(ValueError, match="rows of shape"):
        DataDriftMonitor.from_state(data).update(batch.numeric, 256, batch.hashed)


def _concept_state(detector="page_hinkley", **params):
    m = ConceptDriftMonitor(detector, batch=4, **params)
    for i, x in enumerate(_losses()):
        m.update(float(x), (i + 1) * 4, 4)
    return m.to_state()


@pytest.mark.parametrize("detector", ["adwin", "page_hinkley", "kswin"])
def test_every_detectors_defaults_round_trip(detector):
    state = _concept_state(detector)
    assert ConceptDriftMonitor.from_state(state).to_state() == state


@pytest.mark.parametrize(("detector", "params", "match"), [
    ("page_hinkley", {"bogus": 1}, r"\['bogus'\] of drift detector 'page_hinkley'"),
    ("page_hinkley", {"threshold": float("nan")}, r"\['threshold'\]"),
    ("adwin", {"clock": 0}, r"\['clock'\] of drift detector 'adwin'"),
    ("adwin", {"max_buckets": 10**9}, r"\['max_buckets'\]"),
    ("kswin", {"window_size": 50, "stat_size": 30}, "stat_size"),
])
def test_detector_parameters_a_snapshot_sets_are_checked(detector, params, match):
    """river builds the detector on the first update, in the learning call: a forged
    parameter raised there (an unknown name: TypeError; KSWIN's sample of a window too
    short: ValueError), panicked in ADWIN's Rust core (clock 0) or aborted the process
    (max_buckets 10**9).  The snapshot is refused on load instead."""
    state = dict(_concept_state(detector), params=params)
    with pytest.raises(ValueError, match=match):
        ConceptDriftMonitor.from_state(state)


@pytest.mark.parametrize(("field", "value", "match"), [
    ("batch", -1, r"\['batch'\] must be >= 0"),  # update looped for ever, growing a list
    ("n_drifts", -3, r"\['n_drifts'\] must be >= 0"),
    ("last_loss", float("nan"), "'last_loss' holds NaN"),
    ("drift_times", [1.0, float("inf")], "'drift_times' holds NaN"),
    ("detector_state", {"x_mean": float("nan")}, "'detector_state' holds NaN"),
    ("directions", "updown", "'directions' is not a list"),
    ("directions", ["up", "sideways"], "'up' or 'down'"),
])
def test_a_forged_concept_drift_state_is_refused(field, value, match):
    state = _concept_state()
    with pytest.raises(ValueError, match=match):
        ConceptDriftMonitor.from_state(dict(state, **{field: value}))


def test_a_restored_concept_state_keeps_only_the_recent_drifts():
    """The monitor keeps 20 drift points; a snapshot holding more grew every later one."""
    state = dict(_concept_state(), drift_points=list(range(1000)),
                 drift_times=[float(t) for t in range(1000)], directions=["up"] * 1000)
    m = ConceptDriftMonitor.from_state(state)
    assert m.drift_points == list(range(980, 1000)) and len(m.to_state()["drift_times"]) == 20


@pytest.mark.parametrize(("field", "value", "match"), [
    ("counts", {"reset": -1}, ">= 0"),
    ("last_action_at", -5, ">= 0"),
    ("history", "abc", "not a list of entries"),
    ("history", [1, 2], "not a list of entries"),
])
def test_a_forged_drift_actions_state_is_refused(fraud_spec, field, value, match):
    model = OnlineModel(dataclasses.replace(fraud_spec, drift_action="reset"), device="cpu")
    model.n_seen = 5000
    model.drift_actions.after_step(model, drifted=True)
    state = model.drift_actions.to_state()
    restored = OnlineModel(fraud_spec, device="cpu").drift_actions
    restored.restore(state)
    assert restored.to_state()["history"] == state["history"] and restored.counts["reset"] == 1
    with pytest.raises(ValueError, match=match):
        restored.restore(dict(state, **{field: value}))


@pytest.mark.parametrize(("hash_bits", "expected"), [(10, [10_240, 20_480, 30_720, 40_960]),
                                                     (18, [10_240])])
def test_rollback_checkpoints_are_spaced_by_the_models_size(fraud_spec, hash_bits, expected):
    """A small model is copied every 10,000 events; a 2**18-slot one at most once per
    ~200,000, so the copies stay a small part of learning."""
    spec = dataclasses.replace(fraud_spec, hash_bits=hash_bits)
    model = OnlineModel(spec, device="cpu")
    stream = FraudStream(seed=3)
    for _ in range(180):  # 46,080 events
        batch, _ = model.vectorizer.transform_many(stream.take(256))
        model.process_many(batch)
    assert [c.at_event for c in model.drift_actions.checkpoints] == expected
