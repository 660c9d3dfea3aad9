"""The replica merge rule (streamlearn.replicas): nothing counted twice, exact statistics."""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import numpy as np
import pytest

from streamlearn import replicas
from streamlearn.config import ModelSpec
from streamlearn.models import OnlineModel
from streamlearn.models.online import upgraded
from streamlearn.prequential import roc_auc


def kernel_rates(s: ModelSpec) -> np.ndarray:
    """The learning rate of each linear weight as the kernels take it: the hashed slots
    their own (``ModelSpec.slot_step_norm``), the numeric block and the bias the other."""
    rates = np.full(s.n_weights + 1, s.step_size / s.step_norm)
    rates[s.first_slot : s.n_weights] = s.step_size / s.slot_step_norm
    return rates


def spec(optimizer: str = "ftrl", task: str = "binary", **kw: Any) -> ModelSpec:
    return ModelSpec(name="m", topic="t", numeric=("x", "u"), categorical=("c",), label="y",
                     task=task, optimizer=optimizer, hash_bits=6, **kw)


def events(seed: int, n: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    x, u = rng.normal(1.0, 2.0, n), rng.normal(-3.0, 0.5, n)
    c = rng.integers(0, 20, n)
    logit = 1.5 * x - 1.0 + (c % 3 == 0) * 1.0 - 2.0
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    return [{"x": float(a), "u": float(b), "c": f"k{k}", "y": int(t)}
            for a, b, k, t in zip(x, u, c, y, strict=True)]


def learn(model: OnlineModel, evs: list[dict[str, Any]]) -> None:
    for i in range(0, len(evs), 200):
        batch, _ = model.vectorizer.transform_many(evs[i:i + 200])
        model.process_many(batch)


def from_state(state: dict[str, Any]) -> OnlineModel:
    # from_state keeps float32 arrays as they are: learning must not write into ``state``.
    return OnlineModel.from_state(copy.deepcopy(state))


def fresh(s: ModelSpec) -> dict[str, Any]:
    return OnlineModel(s).to_state()


def test_stat_subtraction_inverts_chan() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(50, 3)), rng.normal(3, 2, size=(70, 3))

    def st(x: np.ndarray) -> tuple[np.ndarray, ...]:
        return (np.full(3, float(len(x))), x.mean(0), ((x - x.mean(0)) ** 2).sum(0))

    n, m, q = replicas.subtract_stats(*st(np.vstack([a, b])), *st(a))
    np.testing.assert_allclose(n, 70)
    np.testing.assert_allclose(m, b.mean(0))
    np.testing.assert_allclose(q, st(b)[2], rtol=1e-9)


@pytest.mark.parametrize("optimizer", ["ftrl", "adagrad", "sgd"])
def test_merge_sums_statistics_exactly_and_fedavgs_weights(optimizer: str) -> None:
    s = spec(optimizer)
    base = fresh(s)
    a, b = OnlineModel(s), OnlineModel(s)
    ea, eb = events(1, 1200), events(2, 600)
    learn(a, ea)
    learn(b, eb)
    sa, sb = a.to_state(), b.to_state()
    m = replicas.merge(base, {"ra": sa, "rb": sb}, merged_by="ra", now=0.0)
    # Scaler and label statistics: exactly those of all events.
    whole = OnlineModel(s)
    learn(whole, ea + eb)
    np.testing.assert_allclose(m["scaler"]["count"], whole.scaler.count)
    np.testing.assert_allclose(m["scaler"]["mean"], whole.scaler.mean, rtol=1e-9)
    np.testing.assert_allclose(m["scaler"]["m2"], whole.scaler.m2, rtol=1e-9)
    np.testing.assert_allclose(m["target"][:3], whole.target[:3], rtol=1e-9)
    assert m["n_learned"] == 1800 and m["n_seen"] == 1800
    assert replicas.merged_version(m) == 1 and replicas.merged_id(m) == "1@ra"
    wa, wb = (np.asarray(x["weights"]["w"], np.float64) for x in (sa, sb))
    if optimizer == "ftrl":
        # z and n add up (the bias brought to one prior first); w follows from them.
        np.testing.assert_allclose(m["weights"]["s2"], sa["weights"]["s2"] + sb["weights"]["s2"],
                                   rtol=1e-5)
        z, n = (np.asarray(m["weights"][k], np.float64) for k in ("s1", "s2"))
        lr = kernel_rates(s)
        touched = n[:-1] > 0
        denom = (s.ftrl_beta + np.sqrt(n[:-1])) / lr[:-1] + s.l2
        expect = -(z[:-1] - np.sign(z[:-1]) * s.l1) / denom
        expect[np.abs(z[:-1]) <= s.l1] = 0
        np.testing.assert_allclose(m["weights"]["w"][:-1][touched], expect[touched], rtol=1e-4,
                                   atol=1e-6)
        assert m["weights"]["w"][-1] == pytest.approx(
            -z[-1] * lr[-1] / (s.ftrl_beta + math.sqrt(n[-1])), rel=1e-4)
    else:
        if optimizer == "adagrad":
            np.testing.assert_allclose(m["weights"]["s1"],
                                       sa["weights"]["s1"] + sb["weights"]["s1"], rtol=1e-5)
        # FedAvg: base (0) + deltas weighted by events (2:1), bias aside (prior shifts).
        np.testing.assert_allclose(m["weights"]["w"][:-1], (2 * wa[:-1] + wb[:-1]) / 3,
                                   rtol=1e-4, atol=1e-6)
    # The bias carries the merged prior offset: the logit of the merged base rate.
    t = m["target"]
    p = (t[1] * t[0] + 0.5) / (t[0] + 1)
    assert t[3] == pytest.approx(math.log(p / (1 - p)))
    merged = from_state(m)  # a valid model state
    assert merged.n_learned == 1800


@pytest.mark.parametrize("optimizer", ["ftrl", "adagrad"])
def test_merged_sums_stay_under_the_cap_with_the_weights_as_merged(optimizer: str) -> None:
    # Each replica caps its own squared-gradient sums (ModelSpec.horizon); the sum of their
    # deltas can pass the cap, and the merge brings it back without moving the weights.
    s = spec(optimizer, horizon=40)
    cap = np.float32(s.gradient_cap)
    a, b = OnlineModel(s), OnlineModel(s)
    learn(a, events(1, 1200))
    learn(b, events(2, 600))
    sa, sb = a.to_state(), b.to_state()
    acc = "s2" if optimizer == "ftrl" else "s1"
    summed = np.asarray(sa["weights"][acc], np.float64) + sb["weights"][acc]
    assert sa["weights"][acc].max() == cap and (summed > cap).any()
    m = replicas.merge(fresh(s), {"ra": sa, "rb": sb}, merged_by="ra", now=0.0)
    assert m["weights"][acc].max() == cap
    if optimizer == "ftrl":  # w as from the uncapped sums (the bias aside: prior shifts)
        z = np.asarray(sa["weights"]["s1"], np.float64) + sb["weights"]["s1"]
        expect = -z / ((s.ftrl_beta + np.sqrt(summed)) / kernel_rates(s) + s.l2)
        over = (summed > cap)[:-1]
        np.testing.assert_allclose(m["weights"]["w"][:-1][over], expect[:-1][over], rtol=1e-4)
    merged = from_state(m)
    learn(merged, events(3, 600))
    assert getattr(merged, acc).max() == cap


def test_adoption_counts_nothing_twice() -> None:
    """Ship, merge, keep learning, adopt, ship again, merge: every event counted once."""
    s = spec("ftrl")
    base = fresh(s)
    ra, rb = OnlineModel(s), OnlineModel(s)
    chunks = [events(10 + i, 300) for i in range(6)]
    learn(ra, chunks[0])
    learn(rb, chunks[1])
    ship_a = ra.to_state() | {"merge": {"base_id": "", "ship": 1}}
    ship_b = rb.to_state() | {"merge": {"base_id": "", "ship": 1}}
    m1 = replicas.merge(base, {"a": ship_a, "b": ship_b}, merged_by="a", now=1.0)
    learn(ra, chunks[2])  # learned after the ship: not in m1
    local = ra.to_state() | {"merge": {"base_id": "", "ship": 1}}
    adopted, how = replicas.rebase(local, m1, "a", {1: ship_a}, base)
    assert how == "exact"
    assert adopted["n_learned"] == 900 and replicas.base_id(adopted) == "1@a"
    assert adopted["merge"]["adopted_version"] == 1
    # b adopts too, learns more; both ship on base m1; merge 2 counts each event once.
    b_local = rb.to_state() | {"merge": {"base_id": "", "ship": 1}}
    b_adopted, _ = replicas.rebase(b_local, m1, "b", {1: ship_b}, base)
    mb = from_state(b_adopted)
    learn(mb, chunks[3])
    ma = from_state(adopted)
    learn(ma, chunks[4])
    sa2 = ma.to_state() | {"merge": dict(adopted["merge"], ship=2)}
    sb2 = mb.to_state() | {"merge": dict(b_adopted["merge"], ship=2)}
    m2 = replicas.merge(m1, {"a": sa2, "b": sb2}, merged_by="a", now=2.0)
    assert m2["n_learned"] == 5 * 300
    whole = OnlineModel(s)
    learn(whole, [e for c in chunks[:5] for e in c])
    np.testing.assert_allclose(m2["scaler"]["count"], whole.scaler.count)
    np.testing.assert_allclose(m2["scaler"]["mean"], whole.scaler.mean, rtol=1e-9)
    np.testing.assert_allclose(m2["target"][:3], whole.target[:3], rtol=1e-9)
    # FTRL's n sums the squared gradients of every replica step exactly once.
    n_sum = (np.asarray(ship_a["weights"]["s2"], np.float64) + ship_b["weights"]["s2"]
             + (sa2["weights"]["s2"] - np.asarray(adopted["weights"]["s2"], np.float64))
             + (sb2["weights"]["s2"] - np.asarray(b_adopted["weights"]["s2"], np.float64))
             + (np.asarray(adopted["weights"]["s2"], np.float64) - m1["weights"]["s2"]))
    np.testing.assert_allclose(m2["weights"]["s2"], n_sum, rtol=1e-4, atol=1e-5)
    assert m2["merge"]["included"] == {"a": {"base_id": "1@a", "ship": 2},
                                       "b": {"base_id": "1@a", "ship": 2}}


def test_a_base_from_before_averaged_scoring_merges_with_averaged_shards() -> None:
    """A rolling upgrade: the merged model on the topic predates ``avg`` and ``mix``."""
    s = spec("ftrl")
    old_base = fresh(s)
    old_base["weights"].pop("avg")
    old_base.pop("mix")
    ra, rb = OnlineModel(s), OnlineModel(s)
    learn(ra, events(31, 600))
    learn(rb, events(32, 600))
    ships = {r: m.to_state() | {"merge": {"base_id": "", "ship": 1}}
             for r, m in (("a", ra), ("b", rb))}
    merged = replicas.merge(old_base, ships, merged_by="a", now=1.0)
    assert merged["weights"]["avg"].dtype == np.float64 and merged["mix"].shape == (1,)
    # the base's average was its weights (zero): the merged average is the FedAvg of theirs
    bias_free = np.mean([ships[r]["weights"]["avg"][:-1] for r in ships], axis=0)
    np.testing.assert_allclose(merged["weights"]["avg"][:-1], bias_free, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(merged["mix"], np.mean([ships[r]["mix"] for r in ships], axis=0))
    model = OnlineModel.from_state(merged)
    batch, _ = model.vectorizer.transform_many(events(33, 50))
    assert np.isfinite(model.predict_many(batch)).all()


def test_a_shard_from_before_the_missing_block_merges_once_upgraded() -> None:
    """A rolling upgrade: a replica still on the old code ships a state without the
    missing block. As it is, the merge refuses it (the shard feed logs and skips such a
    shard); upgraded, as the feed does, it merges exactly as its new-layout twin."""
    s = spec("ftrl")
    base = fresh(s)
    ra = OnlineModel(s)
    learn(ra, events(41, 600))
    ship = ra.to_state() | {"merge": {"base_id": "", "ship": 1}}
    block = np.s_[s.n_numeric : s.first_slot]
    old = ship | {"state_version": 2, "weights": {
        k: np.delete(v, block, axis=0) for k, v in ship["weights"].items()}}
    with pytest.raises(ValueError, match="shapes"):
        replicas.merge(base, {"a": old}, merged_by="a", now=1.0)
    got = replicas.merge(base, {"a": upgraded(old)}, merged_by="a", now=1.0)
    want = replicas.merge(base, {"a": ship}, merged_by="a", now=1.0)
    for k, v in want["weights"].items():
        np.testing.assert_array_equal(got["weights"][k], v, err_msg=k)


def test_shards_on_another_base_wait_and_unknown_ref_drops() -> None:
    s = spec("ftrl")
    base = fresh(s)
    a = OnlineModel(s)
    learn(a, events(3, 400))
    sa = a.to_state() | {"merge": {"base_id": "", "ship": 1}}
    m1 = replicas.merge(base, {"a": sa}, merged_by="a", now=0.0)
    old = a.to_state() | {"merge": {"base_id": "", "ship": 2}}
    m2 = replicas.merge(m1, {"a": old}, merged_by="a", now=1.0)  # a has not adopted m1
    assert m2["n_learned"] == m1["n_learned"] == 400
    assert replicas.eligible(m1, {"a": old}) == []
    # A replica whose counted ship is gone, with no base either, adopts outright.
    new, how = replicas.rebase(old, m2, "a", {}, None)
    assert how == "dropped" and new["n_learned"] == 400


def test_fm_factors_untouched_keep_their_initial_values() -> None:
    s = ModelSpec(name="fm", topic="t", numeric=("x", "u"), categorical=("c",), label="y",
                  task="ranking", hash_bits=8, fm_factors=4)
    base = fresh(s)
    a, b = OnlineModel(s), OnlineModel(s)
    learn(a, events(4, 400))
    learn(b, events(5, 400))
    m = replicas.merge(base, {"a": a.to_state(), "b": b.to_state()}, merged_by="a", now=0.0)
    untouched = np.asarray(m["weights"]["s2v"]).sum(axis=1) == 0
    assert untouched.any()
    np.testing.assert_array_equal(m["weights"]["V"][untouched],
                                  np.asarray(base["weights"]["V"])[untouched])
    assert np.isfinite(m["weights"]["V"]).all()


@pytest.mark.parametrize("optimizer", ["ftrl", "adagrad"])
def test_two_replicas_merging_match_one_learner(optimizer: str) -> None:
    """Round-based data parallelism over 4 'partitions' reaches one learner's AUC."""
    s = spec(optimizer)
    stream = events(7, 12_000)
    test = events(8, 4000)
    single = OnlineModel(s)
    learn(single, stream)
    merged = fresh(s)
    locs = {r: fresh(s) | {"merge": {"base_id": "", "ship": 0}} for r in ("a", "b")}
    parts = {"a": stream[0::2], "b": stream[1::2]}
    for lo in range(0, 6000, 500):
        ships = {}
        for r in ("a", "b"):
            model = from_state(locs[r])
            learn(model, parts[r][lo:lo + 500])
            ship = int(locs[r]["merge"]["ship"]) + 1
            ships[r] = model.to_state() | {"merge": dict(locs[r]["merge"], ship=ship)}
        prev = merged
        merged = replicas.merge(prev, ships, merged_by="a", now=float(lo))
        for r in ("a", "b"):
            locs[r], how = replicas.rebase(ships[r], merged, r,
                                           {int(ships[r]["merge"]["ship"]): ships[r]}, prev)
            assert how == "exact"
    assert merged["n_learned"] == 12_000
    served = from_state(merged)
    batch, _ = served.vectorizer.transform_many(test)
    y = batch.labels
    auc_merged = roc_auc(y, served.predict_many(batch))
    auc_single = roc_auc(y, single.predict_many(batch))
    assert auc_merged > auc_single - 0.005, (auc_merged, auc_single)


def test_store_serves_the_merge_and_drops_stale_shards() -> None:
    from streamlearn import snapshots
    from streamlearn.serving import ModelStore, SnapshotPolicy

    s = spec("ftrl")
    now = [time.time()]
    store = ModelStore(policy=SnapshotPolicy(stale_after_s=10.0), clock=lambda: now[0])
    base = fresh(s)
    shards = {}
    for r, seed in (("a", 1), ("b", 2)):
        model = OnlineModel(s)
        learn(model, events(seed, 600))
        shards[r] = model.to_state() | {"merge": {"base_id": "", "ship": 1, "partitions": [0, 1],
                                                  "published_at": now[0], "adopted_version": 0}}
        assert store.offer(f"m/{r}", snapshots.encode(shards[r]))
    served = store.get("m")
    assert served.in_merge == ("a", "b") and served.stale == () and served.model.n_learned == 1200
    assert served.replicas["a"].to_dict(now[0])["partitions"] == [0, 1]
    m1 = replicas.merge(base, shards, merged_by="a", now=now[0])
    assert store.offer("m/@merged", snapshots.encode(m1))
    served = store.get("m")
    # The shards are on the old base now: the merged model alone is served.
    assert served.merged_version == 1 and served.in_merge == ()
    assert served.model.n_learned == 1200
    # b refreshes on the new base with 300 more events; a goes quiet.
    now[0] += 8.0
    b = from_state(replicas.rebase(shards["b"], m1, "b", {1: shards["b"]}, base)[0])
    learn(b, events(3, 300))
    sb = b.to_state() | {"merge": {"base_id": "1@a", "ship": 2, "published_at": now[0],
                                   "adopted_version": 1, "partitions": [1]}}
    assert store.offer("m/b", snapshots.encode(sb))
    served = store.get("m")
    assert served.in_merge == ("b",) and served.model.n_learned == 1500
    now[0] += 5.0  # a's shard is 13 s old: stale
    assert store.refresh() == ["m"]
    served = store.get("m")
    assert served.stale == ("a",) and "a" in served.replicas
    assert served.replicas["a"].staleness_s(now[0]) == pytest.approx(13.0)
    assert served.model.n_learned == 1500  # what a learned was merged before: kept
    assert store.refresh() == []


def test_store_defers_costly_merges_and_refresh_catches_up(monkeypatch) -> None:
    from streamlearn import serving, snapshots
    from streamlearn.serving import ModelStore

    monkeypatch.setattr(serving, "MERGE_DEFER_S", 0.0)  # every build counts as costly
    mono = [100.0]
    store = ModelStore(monotonic=lambda: mono[0])
    s = spec("ftrl")
    states = []
    for r, seed in (("a", 1), ("b", 2)):
        model = OnlineModel(s)
        learn(model, events(seed, 300))
        states.append(model.to_state() | {"merge": {"base_id": "", "ship": 1}})
        store.offer(f"m/{r}", snapshots.encode(states[-1]))
    # The second offer came at the same instant as the first build: deferred.
    assert store.get("m").model.n_learned == 300 and list(store.get("m").replicas) == ["a"]
    assert store.refresh() == []  # still within the budget
    mono[0] += 60.0
    assert store.refresh() == ["m"]
    assert store.get("m").model.n_learned == 600 and sorted(store.get("m").replicas) == ["a", "b"]
