"""Delayed labels (streamlearn.labels) and their join in the pipeline: outcomes, TTL,
the cap, state round trips, and what the model learns from a joined label."""

from __future__ import annotations

import dataclasses

import numpy as np
import orjson
import pytest

from streamlearn import labels as labels_module
from streamlearn import snapshots
from streamlearn.config import AggregateSpec, ModelSpec
from streamlearn.features import FeatureBatch
from streamlearn.labels import PendingLabels, sum_reports
from streamlearn.models import OnlineModel
from streamlearn.pipeline import Block, ModelRunner, decode_labels

SPEC = ModelSpec(name="lab", topic="lab.t", numeric=("x", "z"), categorical=("c",),
                 label="y", hash_bits=6, label_ttl_s=60.0, max_pending=1000)


def _rows(ids, start=0.0):
    n = len(ids)
    numeric = np.arange(start, start + 2 * n, dtype=np.float64).reshape(n, 2)
    hashed = np.arange(n, dtype=np.int64).reshape(n, 1) + int(start)
    scores = np.linspace(0.1, 0.9, n, dtype=np.float32)
    return list(ids), numeric, hashed, scores


def test_each_label_ends_in_exactly_one_outcome():
    pending = PendingLabels(SPEC)
    ids, numeric, hashed, scores = _rows(["a", "b", "c"])
    pending.add(ids, numeric, hashed, scores, now=0.0)
    joined = pending.join(["c", "a", "c", "nope"], np.array([1.0, 0.0, 1.0, 1.0]), now=5.0)
    assert joined.ids == ["c", "a"]
    assert joined.labels.tolist() == [1.0, 0.0]
    np.testing.assert_array_equal(joined.numeric, numeric[[2, 0]])
    np.testing.assert_array_equal(joined.hashed, hashed[[2, 0]])
    np.testing.assert_array_equal(joined.scores, scores[[2, 0]])  # scores on arrival
    report = pending.report()
    assert {k: report[k] for k in ("joined", "late", "duplicate", "unknown", "pending")} == {
        "joined": 2, "late": 0, "duplicate": 1, "unknown": 1, "pending": 1}
    # Past the TTL, the last waiting row is late; a second label for it too.
    assert len(pending.join(["b"], np.array([1.0]), now=61.0)) == 0
    assert len(pending.join(["b"], np.array([1.0]), now=62.0)) == 0
    report = pending.report()
    assert (report["late"], report["expired"], report["pending"]) == (2, 1, 0)


def test_rows_wait_exactly_the_ttl():
    pending = PendingLabels(SPEC)
    pending.add(*_rows(["a"]), now=100.0)
    pending.add(*_rows(["b"], start=10), now=130.0)
    pending.expire(now=160.0)  # a waited exactly 60 s: still there
    assert len(pending) == 2
    pending.expire(now=160.5)
    assert len(pending) == 1 and pending.counts["expired"] == 1
    assert pending.join(["b", "a"], np.array([1.0, 1.0]), now=160.5).ids == ["b"]
    assert pending.counts["late"] == 1


def test_a_repeated_event_id_replaces_its_older_row():
    pending = PendingLabels(SPEC)
    pending.add(*_rows(["a", "b"]), now=0.0)
    ids, numeric, hashed, scores = _rows(["a"], start=50)
    pending.add(ids, numeric, hashed, scores, now=30.0)
    assert len(pending) == 2
    pending.expire(now=61.0)  # the first block expires, but "a" was replaced by then
    joined = pending.join(["a", "b"], np.array([1.0, 0.0]), now=61.0)
    assert joined.ids == ["a"]
    np.testing.assert_array_equal(joined.numeric, numeric)
    assert pending.counts["expired"] == 1 and pending.counts["late"] == 1


def test_cap_evicts_the_oldest_first_and_counts_it():
    pending = PendingLabels(dataclasses.replace(SPEC, max_pending=4))
    pending.add(*_rows(["a", "b", "c"]), now=0.0)
    pending.add(*_rows(["d", "e", "f"], start=10), now=1.0)
    assert len(pending) == 4
    report = pending.report()
    assert (report["evicted"], report["pending"], report["max_pending"]) == (2, 4, 4)
    joined = pending.join(list("abcdef"), np.ones(6), now=2.0)
    assert joined.ids == ["c", "d", "e", "f"]
    assert (pending.counts["late"], pending.counts["joined"]) == (2, 4)


def test_cap_holds_over_a_long_stream():
    pending = PendingLabels(dataclasses.replace(SPEC, max_pending=100, label_ttl_s=1e9))
    for step in range(50):
        pending.add(*_rows([f"{step}-{i}" for i in range(37)]), now=float(step))
        assert len(pending) <= 100
    assert pending.counts["evicted"] == 50 * 37 - 100
    assert len(pending.blocks) <= 5  # emptied blocks are dropped
    # The newest 100 are the ones kept.
    newest = [f"{s}-{i}" for s in range(50) for i in range(37)][-100:]
    assert len(pending.join(newest, np.ones(100), now=51.0)) == 100


def test_disabled_keeps_nothing():
    for spec in (dataclasses.replace(SPEC, label_ttl_s=0),
                 dataclasses.replace(SPEC, max_pending=0)):
        pending = PendingLabels(spec)
        pending.add(*_rows(["a"]), now=0.0)
        assert len(pending) == 0
        assert len(pending.join(["a"], np.ones(1), now=0.0)) == 0
        assert pending.counts["unknown"] == 1


def test_recent_ids_are_bounded(monkeypatch):
    monkeypatch.setattr(labels_module, "RECENT", 10)
    pending = PendingLabels(SPEC)
    ids = [f"e{i}" for i in range(30)]
    pending.add(*_rows(ids), now=0.0)
    pending.join(ids, np.ones(30), now=1.0)
    assert len(pending.done) == 10
    pending.join(ids, np.ones(30), now=2.0)  # the 10 newest are duplicates, the rest unknown
    assert (pending.counts["duplicate"], pending.counts["unknown"]) == (10, 20)


def test_state_round_trips_through_a_snapshot():
    pending = PendingLabels(SPEC)
    pending.add(*_rows(["gone"], start=20), now=0.0)
    pending.add(*_rows(["a", 7, 2.5]), now=10.0)
    pending.add(*_rows(["d", "e"], start=10), now=20.0)
    pending.join(["a", "zz"], np.array([1.0, 0.0]), now=21.0)
    pending.expire(now=71.0)  # "gone" (0 s), then 7 and 2.5 (10 s) expire
    assert pending.counts["expired"] == 3
    state = snapshots.decode(snapshots.encode({"p": pending.to_state()}))["p"]
    back = PendingLabels(SPEC)
    back.load(state)
    assert back.report() == pending.report()
    assert len(back) == 2
    for p in (pending, back):
        joined = p.join(["e", "d", "a", "gone", 7, "new"], np.ones(6), now=72.0)
        assert joined.ids == ["e", "d"]
        np.testing.assert_array_equal(joined.numeric, _rows(["d", "e"], start=10)[1][::-1])
    assert back.counts == pending.counts
    assert (back.counts["duplicate"], back.counts["late"], back.counts["unknown"]) == (1, 2, 2)
    # Expiry still runs on the arrival times carried over.
    again = PendingLabels(SPEC)
    again.load(state)
    again.expire(now=80.0)
    assert len(again) == 2
    again.expire(now=80.5)
    assert len(again) == 0 and again.counts["expired"] == 5


def test_load_for_reports_only_counts():
    pending = PendingLabels(SPEC)
    pending.add(*_rows(["a", "b"]), now=0.0)
    pending.join(["a"], np.ones(1), now=1.0)
    served = PendingLabels(SPEC)
    served.load(pending.to_state(), rows=False)
    assert served.report() == pending.report()
    served.add(*_rows(["x"]), now=2.0)  # a served model keeps nothing
    assert len(served) == 1 and served.where == {}


@pytest.mark.parametrize("mangle", [
    lambda s: s.__setitem__("numeric", s["numeric"][:, :1]),
    lambda s: s.__setitem__("scores", s["scores"][:1]),
    lambda s: s.__setitem__("arrived", np.array([np.nan, 0.0])),
    lambda s: s.__setitem__("ids", {"text": s["ids"]["text"], "ends": s["ids"]["ends"] + 1}),
])
def test_load_rejects_state_that_does_not_fit(mangle):
    pending = PendingLabels(SPEC)
    pending.add(*_rows(["a", "b"]), now=0.0)
    state = pending.to_state()
    mangle(state)
    with pytest.raises(ValueError):
        PendingLabels(SPEC).load(state)


@pytest.mark.parametrize(("name", "value", "match"), [
    ("hashed", np.array([[10**9], [3]]), f"hashed slots outside 0..{SPEC.n_weights - 1}"),
    ("hashed", np.array([[-1], [3]]), "hashed slots outside"),
    ("scores", np.array([np.nan, 0.5], dtype=np.float32), "NaN or infinite scores"),
    ("numeric", np.array([[1.0, np.inf], [2.0, 3.0]]), "infinite features"),
    ("counts", {"joined": -5}, "negative counters"),
])
def test_a_forged_pending_state_is_refused(name, value, match):
    """A joined row is learned by the compiled step, which indexes the weights with its
    hashed slots unchecked: a forged slot crashed the process (segfault, seen); a NaN
    arrival score is NaN in every metrics report."""
    pending = PendingLabels(SPEC)
    pending.add(*_rows(["a", "b"]), now=0.0)
    state = pending.to_state()
    PendingLabels(SPEC).load(dict(state, numeric=np.array([[np.nan, 1.0], [2.0, 3.0]])))
    with pytest.raises(ValueError, match=match):
        PendingLabels(SPEC).load(dict(state, **{name: value}))


def test_a_model_snapshot_with_forged_pending_slots_is_refused():
    from streamlearn.models import StateError

    clock = [0.0]
    runner = _runner(SPEC, clock)
    runner.handle_blocks([Block("lab.t", 0, list(range(10)), [_event(i) for i in range(10)])])
    state = runner.model.to_state()
    hashed = np.full_like(state["pending"]["hashed"], 2**40)
    with pytest.raises(StateError, match="hashed slots"):
        OnlineModel.from_state(dict(state, pending=dict(state["pending"], hashed=hashed)))


def test_load_rejects_more_rows_than_the_cap():
    pending = PendingLabels(SPEC)
    pending.add(*_rows(["a", "b", "c"]), now=0.0)
    with pytest.raises(ValueError):
        PendingLabels(dataclasses.replace(SPEC, max_pending=2)).load(pending.to_state())


def test_reports_of_replicas_add_up():
    a, b = PendingLabels(SPEC), PendingLabels(SPEC)
    a.add(*_rows(["x", "y"]), now=0.0)
    b.add(*_rows(["z"]), now=0.0)
    a.join(["x", "q"], np.ones(2), now=1.0)
    b.join(["z", "z"], np.ones(2), now=1.0)
    total = sum_reports([a.report(), b.report()])
    assert {k: total[k] for k in ("joined", "duplicate", "unknown", "pending")} == {
        "joined": 2, "duplicate": 1, "unknown": 1, "pending": 1}


# -- the join in the pipeline ---------------------------------------------------------------


def test_decode_labels_keeps_valid_messages_and_says_why_for_others():
    values = [orjson.dumps({"event_id": "a", "y": 1}), None, b"", b"{oops",
              orjson.dumps([1]), orjson.dumps({"y": 1}), orjson.dumps({"event_id": "b"}),
              orjson.dumps({"event_id": "c", "y": 3}), orjson.dumps({"event_id": {"n": 1}, "y": 0}),
              orjson.dumps({"event_id": 5, "y": 0.0})]
    ids, y, rejects = decode_labels(SPEC, values)
    assert ids == ["a", 5] and y.tolist() == [1.0, 0.0]
    reasons = dict(rejects)
    assert sorted(reasons) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert "tombstone" in reasons[1] and "not valid JSON" in reasons[3]
    assert "JSON object" in reasons[4] and "'event_id'" in reasons[5]
    assert "label is missing" in reasons[6] and "0 or 1" in reasons[7]


def _event(i: int, **extra) -> bytes:
    return orjson.dumps({"event_id": f"e{i}", "x": float(i % 5), "z": 1.0 - (i % 3),
                         "c": "ab"[i % 2], **extra})


def _runner(spec: ModelSpec, clock: list[float]) -> ModelRunner:
    return ModelRunner(OnlineModel(spec, device="cpu"), clock=lambda: clock[0])


def test_runner_joins_delayed_labels_and_learns_them_once():
    clock = [1000.0]
    runner = _runner(SPEC, clock)
    model = runner.model
    out = runner.handle_blocks([Block("lab.t", 0, list(range(40)),
                                      [_event(i) for i in range(40)])])
    assert (out.scored, out.learned, model.n_learned, len(model.pending)) == (40, 0, 0, 40)
    scores = {orjson.loads(p)["id"]: orjson.loads(p)["score"] for p in out.predictions}
    labels = [orjson.dumps({"event_id": f"e{i}", "y": i % 2}) for i in range(30)]
    labels += [labels[0], orjson.dumps({"event_id": "never", "y": 1}), b"junk"]
    out = runner.handle_blocks([Block("lab.labels", 0, list(range(33)), labels)])
    assert out.learned == 30 and out.scored == 0
    assert [d.reason.startswith("not valid JSON") for d in out.dead] == [True]
    assert (model.n_learned, model.n_seen, model.version > 0) == (30, 40, True)
    report = model.info()["labels"]
    assert {k: report[k] for k in ("joined", "duplicate", "unknown", "late", "pending")} == {
        "joined": 30, "duplicate": 1, "unknown": 1, "late": 0, "pending": 10}
    assert runner.telemetry.labels == 33
    # The prequential metrics took the scores the events got on arrival (their records).
    y = np.array([i % 2 for i in range(30)], dtype=np.float64)
    given = np.array([scores[f"e{i}"] for i in range(30)], dtype=np.float64)
    got = model.metrics.report()
    assert got["n"] == 30
    want = -np.mean(y * np.log(given) + (1 - y) * np.log(1 - given))
    assert got["log_loss"] == pytest.approx(want, rel=1e-5)
    # Late: past the TTL, the rest of the waiting events are forgotten.
    clock[0] += 61.0
    runner.handle_blocks([Block("lab.labels", 0, [33], [orjson.dumps({"event_id": "e35",
                                                                       "y": 1})])])
    assert model.info()["labels"]["late"] == 1 and model.n_learned == 30


def test_joined_label_learns_the_features_the_event_had_on_arrival():
    """A delayed label teaches the same step as the label carried on the event, when
    nothing came in between (same features, same weights)."""
    clock = [0.0]
    spec = dataclasses.replace(SPEC, batch_size=1, update_rows=1)
    inline, delayed = _runner(spec, clock), _runner(spec, clock)
    events = [{"event_id": f"e{i}", "x": float(i % 5), "z": 0.5 * i, "c": "ab"[i % 2]}
              for i in range(20)]
    for i, e in enumerate(events):
        y = i % 2
        delayed.handle_blocks([Block("lab.t", 0, [i], [orjson.dumps(e)])])
        delayed.handle_blocks([Block("lab.labels", 0, [i], [orjson.dumps(
            {"event_id": e["event_id"], "y": y})])])
        inline.handle_blocks([Block("lab.t", 0, [i], [orjson.dumps({**e, "y": y})])])
    assert delayed.model.n_learned == inline.model.n_learned == 20
    np.testing.assert_allclose(delayed.model.w, inline.model.w, rtol=1e-5, atol=1e-7)
    assert delayed.model.n_seen == inline.model.n_seen == 20


def test_events_without_an_id_do_not_wait():
    clock = [0.0]
    runner = _runner(SPEC, clock)
    runner.handle_blocks([Block("lab.t", 0, [0, 1, 2], [
        orjson.dumps({"x": 1.0, "c": "a"}), orjson.dumps({"x": 2.0, "c": "b"}), _event(3)])])
    assert len(runner.model.pending) == 1


def test_labelled_events_do_not_wait():
    runner = _runner(SPEC, [0.0])
    runner.handle_blocks([Block("lab.t", 0, [0, 1], [_event(0, y=1), _event(1)])])
    assert len(runner.model.pending) == 1 and runner.model.n_learned == 1


def test_pending_rows_and_aggregates_survive_a_model_snapshot():
    spec = dataclasses.replace(SPEC, aggregates=(AggregateSpec("c", "x", ("1h",), ("count",)),))
    clock = [0.0]
    runner = _runner(spec, clock)
    runner.handle_blocks([Block("lab.t", 0, list(range(10)),
                                [_event(i, ts=1e9 + i) for i in range(10)])])
    state = snapshots.decode(snapshots.encode(runner.snapshot_state("r0")))
    restarted = ModelRunner(OnlineModel.from_state(state, device="cpu"), clock=lambda: clock[0])
    for r in (runner, restarted):
        r.handle_blocks([Block("lab.labels", 0, [0, 1], [
            orjson.dumps({"event_id": "e4", "y": 1}), orjson.dumps({"event_id": "e4", "y": 1})])])
        assert r.model.info()["labels"]["joined"] == 1
        assert r.model.info()["labels"]["duplicate"] == 1
    np.testing.assert_array_equal(restarted.model.w, runner.model.w)
    served = OnlineModel.from_state(state, device="cpu", serving=True)
    assert served.info()["labels"]["pending"] == 10
    assert served.info()["features"]["aggregates"]["entities"] == 2


def test_joined_rows_learn_alike_in_the_fused_call_and_the_composed_path():
    """The worker's compiled call learns joined rows as process() does: same weights, the
    scaler and the seen-event count untouched, metrics from the arrival scores."""
    clock = [0.0]
    runner = _runner(SPEC, clock)
    events = [{"event_id": f"e{i}", "x": float(i % 7), "z": 0.3 * i, "c": "abc"[i % 3]}
              for i in range(600)]
    runner.handle_blocks([Block("lab.t", 0, list(range(600)),
                                [orjson.dumps(e) for e in events])])
    model = runner.model
    ids = [e["event_id"] for e in events[:500]]
    joined = model.pending.join(ids, np.array([i % 2 for i in range(500)], dtype=np.float32),
                                now=1.0)
    state = model.to_state()
    fused = OnlineModel.from_state(state, device="cpu")
    composed = OnlineModel.from_state(state, device="cpu")
    fused.learn_joined(joined)
    batch = FeatureBatch(joined.numeric, joined.hashed, joined.labels, joined.ids)
    composed._process_chunks(batch, SPEC.batch_size, joined.scores)  # CUDA's process() loop
    np.testing.assert_allclose(fused.w, composed.w, rtol=1e-5, atol=1e-7)
    for m in (fused, composed):
        assert m.n_seen == model.n_seen and m.n_learned == 500
        np.testing.assert_array_equal(m.scaler.count, model.scaler.count)
    assert fused.metrics.report() == composed.metrics.report()

