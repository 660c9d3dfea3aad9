"""Entity aggregates (streamlearn.aggregates): window semantics against a brute-force
reference, training/serving consistency through a snapshot, memory caps, state."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import orjson
import pytest

from streamlearn import aggregates, snapshots
from streamlearn.aggregates import AggregateInputs, EntityAggregates
from streamlearn.config import AggregateSpec, ModelSpec
from streamlearn.keys import unpack_keys
from streamlearn.models import OnlineModel
from streamlearn.pipeline import Block, ModelRunner

AGG = (AggregateSpec("card", "amount", ("1h", "1d"), ("count", "sum", "mean")),
       AggregateSpec("card", "fee", ("10m",), ("count", "sum")),
       AggregateSpec("merchant", "amount", ("1h",), ("count", "mean")))
SPEC = ModelSpec(name="agg", topic="agg.t", numeric=("amount", "fee"),
                 categorical=("country",), label="y", hash_bits=8, aggregates=AGG)


def _reference(spec: ModelSpec, times, values, keys, tiles: int) -> np.ndarray:
    """Brute force over the raw events: per aggregate, window and entity, the events
    accepted in the entity's ring of ``tiles`` tiles (the newest tile ``h``), and for
    each event the count and sum of tiles ``(max(t, h) - tiles, min(t, h)]`` plus the
    event itself when its tile is still in the ring (then it joins the ring)."""
    names = spec.aggregate_names
    out = np.full((len(times), len(names)), np.nan)
    entity_col = {f: j for j, f in enumerate(dict.fromkeys(a.entity for a in spec.aggregates))}
    col = 0
    for i, a in enumerate(spec.aggregates):
        for length in a.seconds:
            width = length / tiles
            ring: dict = {}  # entity -> (head, [(tile, value)])
            stats = []
            for r, t in enumerate(times):
                key = keys[entity_col[a.entity]][r]
                v = values[r, i]
                tid = math.floor(t / width)
                head, held = ring.get(key, (-math.inf, [])) if key is not None else (
                    -math.inf, [])
                lo, hi = max(tid, head) - tiles, min(tid, head)
                c = sum(1 for j, _ in held if lo < j <= hi)
                s = sum(x for j, x in held if lo < j <= hi)
                if not math.isnan(v) and tid > head - tiles:
                    c, s = c + 1, s + v
                    if key is not None:
                        new_head = max(head, tid)
                        ring[key] = (new_head, [(j, x) for j, x in held
                                                if j > new_head - tiles] + [(tid, v)])
                stats.append((c, s))
            for stat in a.stats:
                for r, (c, s) in enumerate(stats):
                    out[r, col + a.stats.index(stat)] = (
                        c if stat == "count" else s if stat == "sum"
                        else (s / c if c else np.nan))
            col += len(a.stats)
    return out


def _stream(n: int, seed: int, *, disorder: float = 0.2, n_cards: int = 7):
    """Events with integer amounts (exact in float32 sums), some missing values and
    entities, mostly increasing times with some out of order."""
    rng = np.random.default_rng(seed)
    t = 1_700_000_000 + np.cumsum(rng.exponential(300.0, n))
    back = rng.random(n) < disorder
    t[back] -= rng.exponential(4000.0, back.sum())
    amount = rng.integers(1, 500, n).astype(float)
    amount[rng.random(n) < 0.1] = np.nan
    fee = rng.integers(0, 9, n).astype(float)
    cards = [f"c{k}" if k else None for k in rng.integers(0, n_cards, n)]
    merchants = [f"m{k}" for k in rng.integers(0, 3, n)]
    values = np.stack([amount, fee, amount], axis=1)
    return t, values, [cards, merchants]


@pytest.mark.parametrize("tiles", [1, 3, 8])
def test_features_match_brute_force_reference(tiles):
    spec = dataclasses.replace(SPEC, aggregate_tiles=tiles)
    times, values, keys = _stream(600, seed=tiles)
    agg = EntityAggregates(spec)
    got = np.concatenate([  # in batches: the state carries over
        agg.features(AggregateInputs(times[lo:hi], values[lo:hi],
                                     [k[lo:hi] for k in keys]), update=True)
        for lo, hi in ((0, 1), (1, 250), (250, 600))])
    want = _reference(spec, times, values, keys, tiles)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=1e-12, equal_nan=True)
    # Not vacuous: windows actually hold history, and some rows see an evicted tile.
    assert got[:, 0].max() > 3


def test_serving_reads_without_changing_the_state():
    times, values, keys = _stream(300, seed=2)
    agg = EntityAggregates(SPEC)
    agg.features(AggregateInputs(times, values, keys), update=True)
    before = snapshots.encode({"a": agg.to_state()})
    probe = AggregateInputs(times[-5:] + 10, values[-5:], [k[-5:] for k in keys])
    first = agg.features(probe, update=False)
    assert snapshots.encode({"a": agg.to_state()}) == before
    np.testing.assert_array_equal(agg.features(probe, update=False), first)


def _events(n: int, seed: int) -> list[dict]:
    times, values, keys = _stream(n, seed=seed, disorder=0.1)
    rng = np.random.default_rng(seed + 100)
    out = []
    for r in range(n):
        e = {"event_id": f"e{seed}-{r}", "ts": float(times[r]), "fee": float(values[r, 1]),
             "country": ["fr", "de", "us"][r % 3], "merchant": keys[1][r]}
        if not math.isnan(values[r, 0]):
            e["amount"] = float(values[r, 0])
        if keys[0][r] is not None:
            e["card"] = keys[0][r]
        if rng.random() < 0.7:
            e["y"] = int(rng.random() < 0.3)
        out.append(e)
    return out


def _serving_copy(model: OnlineModel) -> OnlineModel:
    """What the API holds: the worker's snapshot, encoded and decoded."""
    return OnlineModel.from_state(snapshots.decode(snapshots.encode(model.to_state())),
                                  device="cpu", serving=True)


def test_serving_from_a_snapshot_gets_the_features_the_worker_uses_next():
    """The issue's consistency rule: a /predict of the raw event, on the snapshot, sees
    exactly the aggregate values the worker computes when that event arrives next."""
    events = _events(400, seed=3)
    worker = OnlineModel(SPEC, device="cpu")
    runner = ModelRunner(worker, emit_predictions=False)
    checked = 0
    for lo in range(0, 300, 60):  # the worker learns, checkpoints, then the next event comes
        runner.handle_blocks([Block("agg.t", 0, list(range(lo, lo + 60)),
                                    [orjson.dumps(e) for e in events[lo : lo + 60]])])
        served = _serving_copy(worker)
        for nxt in events[lo + 60 : lo + 70]:  # each a candidate "next event"
            batch, rejects = served.vectorizer.transform_many([nxt])
            assert not rejects
            served.fill_aggregates(batch, update=False)
            twin = OnlineModel.from_state(worker.to_state(), device="cpu")  # the worker
            wbatch, _ = twin.vectorizer.transform_many([nxt])
            twin.fill_aggregates(wbatch, update=True)
            np.testing.assert_array_equal(batch.numeric, wbatch.numeric)
            checked += 1
            # And the served score uses those values (the scaler/weights do the rest).
            assert served.predict_events([nxt])[0] == twin.predict_many(wbatch)[0]
    assert checked == 50
    served = _serving_copy(worker)
    assert served.aggregates.n_entities == worker.aggregates.n_entities > 3
    assert served.info()["features"]["aggregates"]["entities"] == worker.aggregates.n_entities


def test_batch_features_do_not_depend_on_batch_boundaries():
    events = _events(300, seed=4)
    whole, split = OnlineModel(SPEC, device="cpu"), OnlineModel(SPEC, device="cpu")
    b, _ = whole.vectorizer.transform_many(events)
    whole.fill_aggregates(b, update=True)
    parts = []
    for lo in range(0, 300, 37):
        p, _ = split.vectorizer.transform_many(events[lo : lo + 37])
        split.fill_aggregates(p, update=True)
        parts.append(p.numeric)
    np.testing.assert_array_equal(b.numeric, np.concatenate(parts))
    names = list(SPEC.numeric_features)
    count = b.numeric[:, names.index("card.amount.1d.count")]
    assert np.isfinite(count).all() and count.max() > 5


def test_idle_entities_expire_when_the_table_is_full():
    spec = dataclasses.replace(SPEC, aggregates=(AGG[0],), max_entities=5)
    agg = EntityAggregates(spec)
    t0 = 1_700_000_000.0
    for k in range(5):
        agg.features(AggregateInputs(np.array([t0 + k]), np.array([[1.0]]), [[f"old{k}"]]),
                     update=True)
    assert agg.n_entities == 5 and agg.report()["expired"] == 0
    # Two days later (past the longest window, 1d): every old entity is idle.
    late = t0 + 2 * 86_400
    agg.features(AggregateInputs(np.array([late]), np.array([[2.0]]), [["new"]]), update=True)
    report = agg.report()
    assert (report["expired"], report["evicted"], report["entities"]) == (5, 0, 1)
    # An expired entity starts again from nothing.
    again = agg.features(AggregateInputs(np.array([late + 1]), np.array([[3.0]]), [["old0"]]),
                         update=True)
    assert again[0, :3].tolist() == [1.0, 3.0, 3.0]


def test_least_recent_entity_is_evicted_when_none_is_idle():
    spec = dataclasses.replace(SPEC, aggregates=(AGG[0],), max_entities=4)
    agg = EntityAggregates(spec)
    t0 = 1_700_000_000.0
    order = ["a", "b", "c", "d", "a", "c", "d"]  # b is the least recently seen
    for i, key in enumerate(order):
        agg.features(AggregateInputs(np.array([t0 + i]), np.array([[1.0]]), [[key]]),
                     update=True)
    agg.features(AggregateInputs(np.array([t0 + 10]), np.array([[1.0]]), [["e"]]), update=True)
    report = agg.report()
    assert (report["evicted"], report["expired"], report["entities"]) == (1, 0, 4)
    probe = AggregateInputs(np.full(5, t0 + 11), np.ones((5, 1)), [list("abcde")])
    counts = agg.features(probe, update=False)[:, 0].tolist()
    assert counts == [3.0, 1.0, 3.0, 3.0, 2.0]  # b forgotten; a, c, d, e kept


def test_a_full_table_never_gives_one_entity_the_slot_of_another_in_the_same_batch():
    """Room is made while a batch's keys are resolved: the entities this batch already
    took are not idle (they were just seen) and must keep their slots."""
    spec = dataclasses.replace(SPEC, aggregates=(AGG[0],), max_entities=4)
    agg = EntityAggregates(spec)
    keys = list("abcde")
    got = agg.features(AggregateInputs(np.full(5, 1e9), np.arange(1.0, 6.0)[:, None], [keys]),
                       update=True)
    assert got[:, 0].tolist() == [1.0] * 5  # each its own first event
    assert got[:, 1].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    report = agg.report()
    assert report["expired"] == 0 and report["entities"] <= 4
    probe = AggregateInputs(np.full(4, 1e9 + 1), np.zeros((4, 1)), [list("abcd")])
    assert agg.features(probe, update=False)[:, 1].tolist() == [1.0, 2.0, 3.0, 4.0]


def test_a_partition_handed_to_a_full_table_makes_room_and_keeps_its_entities():
    """``load(replace=False)`` (a partition taken over, a union) into a full table: room
    comes from the least recent entities here, never from those just taken over."""
    spec = dataclasses.replace(SPEC, aggregates=(AGG[0],), max_entities=4)
    here, there = EntityAggregates(spec), EntityAggregates(spec)
    for i, key in enumerate("abcd"):  # a full table, "a" the least recently seen
        here.features(AggregateInputs(np.array([1e9 + i]), np.array([[1.0]]), [[key]]),
                      update=True)
    there.features(AggregateInputs(np.full(3, 1e9 + 9), np.array([[2.0], [3.0], [4.0]]),
                                   [["x", "y", "x"]]), update=True)
    here.load(there.to_state(), replace=False)
    assert here.n_entities == 4 and here.report()["evicted"] >= 1
    probe = AggregateInputs(np.full(2, 1e9 + 10), np.zeros((2, 1)), [["x", "y"]])
    assert here.features(probe, update=False)[:, 0].tolist() == [3.0, 2.0]  # both kept


def test_entities_never_exceed_the_cap():
    spec = dataclasses.replace(SPEC, aggregates=(AGG[0],), max_entities=300)
    agg = EntityAggregates(spec)
    rng = np.random.default_rng(5)
    for step in range(20):
        keys = [f"k{k}" for k in rng.integers(0, 5000, 200)]
        agg.features(AggregateInputs(1e9 + step + np.arange(200) / 1000, np.ones((200, 1)),
                                     [keys]), update=True)
        assert agg.n_entities <= 300
    report = agg.report()
    # ~3,300 distinct keys through 300 slots within 20 s: no entity is idle (the
    # longest window is a day), so room comes from evicting the least recent 1%.
    assert report["expired"] == 0
    assert report["evicted"] >= 3_000
    state = agg.to_state()
    assert len(unpack_keys(state["groups"][0]["keys"])) == agg.n_entities


def test_misrouted_entities_are_counted():
    agg = EntityAggregates(dataclasses.replace(SPEC, aggregates=(AGG[0],)))
    for part in (0, 0, 1, 1, 0):
        agg.features(AggregateInputs(np.array([1e9]), np.array([[1.0]]), [["x"]],
                                     np.array([part])), update=True)
    agg.features(AggregateInputs(np.array([1e9]), np.array([[1.0]]), [["y"]],
                                 np.array([1])), update=True)
    assert agg.report()["misrouted"] == 2
    # Each entity is held for the partition it was last seen on (x: 0, y: 1).
    for part, key in ((0, "x"), (1, "y")):
        assert unpack_keys(agg.to_state({part})["groups"][0]["keys"]) == [key]


def test_state_round_trip_partitions_and_union():
    spec = dataclasses.replace(SPEC, aggregates=(AGG[0],))
    agg = EntityAggregates(spec)
    agg.features(AggregateInputs(np.array([1e9, 1e9 + 1, 1e9 + 2]), np.array([[5.0], [7.0], [1.0]]),
                                 [["a", "a", "b"]], np.array([0, 0, 1])), update=True)
    probe = AggregateInputs(np.array([1e9 + 3, 1e9 + 3]), np.array([[1.0], [1.0]]), [["a", "b"]])
    want = agg.features(probe, update=False)
    back = EntityAggregates(spec)
    back.load(snapshots.decode(snapshots.encode({"s": agg.to_state()}))["s"])
    np.testing.assert_array_equal(back.features(probe, update=False), want)
    # Each replica keeps its partitions; the union serves both.
    p0, p1 = agg.to_state({0}), agg.to_state({1})
    assert unpack_keys(p0["groups"][0]["keys"]) == ["a"]
    merged = EntityAggregates(spec)
    merged.load(aggregates.union([p0, p1, None], spec))
    np.testing.assert_array_equal(merged.features(probe, update=False), want)


@pytest.mark.parametrize("mangle", [
    lambda s: s["groups"].pop(),
    lambda s: s["groups"][0].__setitem__("field", "other"),
    lambda s: s["groups"][0].__setitem__("head", s["groups"][0]["head"][:, :1]),
    lambda s: s["groups"][0]["sums"].__setitem__((0, 0, 0, 0), np.inf),
])
def test_load_rejects_state_that_does_not_fit(mangle):
    agg = EntityAggregates(SPEC)
    times, values, keys = _stream(50, seed=6)
    agg.features(AggregateInputs(times, values, keys), update=True)
    state = agg.to_state()
    mangle(state)
    with pytest.raises(ValueError):
        EntityAggregates(SPEC).load(state)


def _set(part: str, name: str, value):
    def forge(state):
        target = state if part == "state" else state["groups"][0]
        old = target[name]
        target[name] = value(old) if callable(value) else value
    return forge


@pytest.mark.parametrize(("forge", "match"), [
    # window_stats subtracts the head from a tile number unchecked: one near -2**63 (a
    # NaN cast to int64) wrapped around, and the process crashed (segfault, seen).
    (_set("group", "head", lambda a: np.full_like(a, np.iinfo(np.int64).min)), r"2\*\*62"),
    pytest.param(_set("group", "head", lambda a: np.full(a.shape, np.nan)), r"2\*\*62",
                 marks=pytest.mark.filterwarnings("ignore:invalid value encountered in cast")),
    (_set("group", "counts", lambda a: -a), "negative counts"),
    (_set("group", "last_seen", lambda a: np.full_like(a, np.nan)), "last-seen time"),
    (_set("state", "max_time", math.inf), "max_time"),
    (_set("state", "expired", -1), "negative counters"),
], ids=["head_min", "head_nan", "negative_counts", "last_seen_nan", "max_time_inf",
        "negative_expired"])
def test_a_forged_aggregate_state_is_refused(forge, match):
    agg = EntityAggregates(SPEC)
    times, values, keys = _stream(50, seed=6)
    agg.features(AggregateInputs(times, values, keys), update=True)
    state = agg.to_state()
    forge(state)
    for replace in (True, False):  # a restore, and a partition handed over
        with pytest.raises(ValueError, match=match):
            EntityAggregates(SPEC).load(state, replace=replace)


def test_load_rejects_more_entities_than_the_cap():
    agg = EntityAggregates(SPEC)
    times, values, keys = _stream(100, seed=7)
    agg.features(AggregateInputs(times, values, keys), update=True)
    with pytest.raises(ValueError, match="max_entities"):
        EntityAggregates(dataclasses.replace(SPEC, max_entities=2)).load(agg.to_state())


def test_long_entity_keys_are_bounded_the_same_way_when_serving():
    spec = dataclasses.replace(SPEC, aggregates=(AGG[0],))
    agg = EntityAggregates(spec)
    key = "k" * 5000
    agg.features(AggregateInputs(np.array([1e9, 1e9 + 1]), np.array([[2.0], [3.0]]),
                                 [[key, key]]), update=True)
    served = EntityAggregates(spec)
    served.load(snapshots.decode(snapshots.encode({"s": agg.to_state()}))["s"])
    got = served.features(AggregateInputs(np.array([1e9 + 2]), np.array([[4.0]]), [[key]]),
                          update=False)
    assert got[0, :3].tolist() == [3.0, 9.0, 3.0]
    assert len(snapshots.encode({"s": agg.to_state()})) < 2000  # a digest, not 5000 chars


def test_events_need_the_time_field():
    model = OnlineModel(SPEC, device="cpu")
    batch, rejects = model.vectorizer.transform_many(
        [{"amount": 1.0, "card": "a"}, {"amount": 1.0, "card": "a", "ts": 1e9}])
    assert len(batch) == 1 and len(rejects) == 1 and "'ts'" in rejects[0][1]
