"""The worker's merge lineage (issue 10): restore, tagging, adoption after a restart."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from streamlearn import replicas
from streamlearn.config import ModelSpec
from streamlearn.models import OnlineModel
from streamlearn.services.worker.merging import SHIPS_KEPT, Lineage, MergeLoop
from streamlearn.synthetic import FraudStream

SPEC = ModelSpec(name="m", topic="t", label="is_fraud", numeric=("amount", "hour"),
                 categorical=("country",), hash_bits=8)


def learn(model: OnlineModel, seed: int, n: int = 500) -> None:
    batch, _ = model.vectorizer.transform_many(FraudStream(seed=seed).take(n))
    model.process_many(batch)


def snapshot(model: OnlineModel, lineage: Lineage, replica: str) -> dict[str, Any]:
    state = model.to_state() | {"replica": replica}
    lineage.tag(state, [0, 1])
    return copy.deepcopy(state)


def test_restored_lineages() -> None:
    fresh = OnlineModel(SPEC).to_state()
    assert Lineage.restored(fresh, "a", fresh).base is fresh  # no merge entry: the fresh base
    own = fresh | {"replica": "a", "merge": {"base_id": "3@b", "base_version": 3, "ship": 7}}
    lin = Lineage.restored(own, "a", fresh)
    assert (lin.base_id, lin.base_version, lin.ship, list(lin.shipped)) == ("3@b", 3, 7, [7])
    assert lin.base is None  # unknown after a restart: found on the topic when needed
    sibling = own | {"replica": "b"}
    assert Lineage.restored(sibling, "a", fresh).base_id == "foreign:b"
    merged = fresh | {"replica": replicas.MERGED,
                      "merge": {"merged_id": "4@b", "merged_version": 4}}
    lin = Lineage.restored(merged, "a", fresh)
    assert (lin.base_id, lin.base_version, lin.base) == ("4@b", 4, merged)


def test_tag_numbers_ships_and_keeps_the_last_few() -> None:
    lin = Lineage(base=OnlineModel(SPEC).to_state())
    model = OnlineModel(SPEC)
    for _ in range(SHIPS_KEPT + 2):
        state = snapshot(model, lin, "a")
    assert replicas.meta(state)["ship"] == SHIPS_KEPT + 2
    assert replicas.meta(state)["partitions"] == [0, 1]
    assert list(lin.shipped) == list(range(3, SHIPS_KEPT + 3))


def test_a_restarted_replica_rebases_exactly_with_the_ship_found_on_the_topic() -> None:
    fresh = OnlineModel(SPEC).to_state()
    a, lin = OnlineModel(SPEC), Lineage(base=fresh)
    learn(a, 1)
    ship1 = snapshot(a, lin, "a")  # the merge will count this one
    learn(a, 2)
    ship2 = snapshot(a, lin, "a")  # the checkpoint at the crash
    b = OnlineModel(SPEC)
    learn(b, 3)
    ship_b = b.to_state() | {"merge": {"base_id": "", "ship": 1}}
    merged = replicas.merge(fresh, {"a": ship1, "b": ship_b}, merged_by="b", now=0.0)
    assert merged["n_learned"] == 1000

    def restarted() -> tuple[OnlineModel, Lineage]:
        state = copy.deepcopy(ship2)
        return OnlineModel.from_state(state), Lineage.restored(state, "a", fresh)

    model, lin2 = restarted()
    assert lin2.adopt(model, "a", merged, found=copy.deepcopy(ship1)) == "exact"
    assert model.n_learned == 1500  # a's second 500 kept, nothing counted twice
    assert lin2.base_id == replicas.merged_id(merged) and lin2.shipped == {}
    np.testing.assert_allclose(model.scaler.count, 1500)
    model, lin2 = restarted()
    assert lin2.adopt(model, "a", merged) == "oldest"  # ship 1 not found: the loss is bounded
    assert model.n_learned == 1000


def test_a_retiring_replica_is_done_once_nothing_it_learned_is_uncounted() -> None:
    """MergeLoop.retire waits for this: a merge counted the last ship, or the replica
    learned nothing since the merge it adopted (a later ship on it holds no news)."""
    done = MergeLoop._handed_over
    fresh = OnlineModel(SPEC).to_state()
    a, lin = OnlineModel(SPEC), Lineage(base=fresh)
    learn(a, 1)
    ship1 = snapshot(a, lin, "a")
    assert not done(None, lin, ship1, "a")  # learned, nothing merged yet
    m1 = replicas.merge(fresh, {"a": ship1}, merged_by="a", now=0.0)
    assert done(m1, lin, ship1, "a")
    lin.adopt(a, "a", m1)
    idle = snapshot(a, lin, "a")  # shipped on m1 (the heartbeat) with nothing new
    assert replicas.meta(m1)["included"]["a"]["ship"] < lin.ship
    assert done(m1, lin, idle, "a")
    unlabelled = FraudStream(seed=4).take(100)
    for e in unlabelled:
        e.pop("is_fraud")
    a.process_many(a.vectorizer.transform_many(unlabelled)[0])
    news = snapshot(a, lin, "a")  # no label learned, but the scaler moved: it waits
    assert news["n_learned"] == m1["n_learned"] and not done(m1, lin, news, "a")
    m2 = replicas.merge(m1, {"a": news}, merged_by="a", now=1.0)  # the merger takes it
    assert m2["n_seen"] == 600 and done(m2, lin, news, "a")


async def test_a_shard_the_model_cannot_use_is_ignored() -> None:
    """Shards and merged models come from the models topic: one whose weights are not
    finite (or whose statistics have another shape) is ignored like an undecodable one,
    before a merge or an adoption could spread it into the live model."""
    import time
    import zlib
    from types import SimpleNamespace

    from streamlearn import snapshots
    from streamlearn.services.worker.merging import Seen, ShardFeed
    from streamlearn.settings import load_settings

    settings = load_settings(model=[{"name": SPEC.name, "topic": SPEC.topic, "label": SPEC.label,
                                     "numeric": list(SPEC.numeric), "hash_bits": SPEC.hash_bits,
                                     "categorical": list(SPEC.categorical)}])
    feed = ShardFeed(SimpleNamespace(settings=settings))  # type: ignore[arg-type]
    model = OnlineModel(SPEC, device="cpu")
    learn(model, seed=1)
    good = model.to_state()
    w = np.array(good["weights"]["w"], copy=True)
    w[0] = np.nan
    bad = dict(good, weights=dict(good["weights"], w=w))
    for replica, state in (("r1", good), ("r2", bad)):
        payload = snapshots.encode(state)
        feed.records[SPEC.name][replica] = Seen(payload, time.time(), zlib.crc32(payload))
    assert (await feed.decoded(SPEC.name, "r1") or {}).get("version") == model.version
    assert await feed.decoded(SPEC.name, "r2") is None
