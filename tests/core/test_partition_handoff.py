"""Entity aggregates and waiting events follow their partition to another replica."""

from __future__ import annotations

import numpy as np

from streamlearn import replicas, snapshots
from streamlearn.config import AggregateSpec, ModelSpec
from streamlearn.models import OnlineModel
from streamlearn.pipeline import ModelRunner, Record

SPEC = ModelSpec(name="hand", topic="tx", numeric=("amount",), label="y", hash_bits=4,
                 aggregates=(AggregateSpec("card", "amount", ("1h",), ("count", "sum")),))


def _event(i: int, card: str, label: int | None = None) -> bytes:
    body = f'"event_id": "e{i}", "card": "{card}", "amount": {i % 7 + 1}, "ts": {1000 + i}'
    return ("{" + body + ("" if label is None else f', "y": {label}') + "}").encode()


def test_a_partition_moves_with_its_entities_and_waiting_events() -> None:
    clock = [100.0]
    owner = ModelRunner(OnlineModel(SPEC, device="cpu"), clock=lambda: clock[0])
    # Partition 0 carries card a, partition 1 card b; the even events wait for labels.
    recs = [Record(_event(i, "ab"[i % 2], None if i % 4 < 2 else 1), "tx", i % 2, i // 2)
            for i in range(40)]
    owner.handle(recs)
    state = snapshots.decode(snapshots.encode(owner.snapshot_state("r1")))

    section = replicas.partition_section(SPEC, state, "tx", 1)
    assert section is not None and section["offset"] == 20
    heir = ModelRunner(OnlineModel(SPEC, device="cpu"), clock=lambda: clock[0])
    heir.model.take_partition(section)

    # The heir holds card b (partition 1) only, with the owner's exact windows...
    probes = [{"event_id": "p", "card": c, "amount": 1.0, "ts": 1040.0} for c in "ab"]
    got_heir = heir.model.aggregates.features(
        heir.model.vectorizer.transform_many(probes)[0].aux, update=False)
    got_owner = owner.model.aggregates.features(
        owner.model.vectorizer.transform_many(probes)[0].aux, update=False)
    assert got_heir[1].tolist() == got_owner[1].tolist()  # card b: same count and sum
    assert got_owner[0, 0] == 21.0 and got_heir[0, 0] == 1.0  # card a stayed behind
    # ... and the events of partition 1 still waiting: their labels join on the heir.
    waiting_b = [f"e{i}" for i in range(40) if i % 2 == 1 and i % 4 < 2]
    assert len(heir.model.pending) == len(waiting_b) == 10
    labels = [Record(f'{{"event_id": "{e}", "y": 0}}'.encode(), "hand.labels", 1, k)
              for k, e in enumerate(waiting_b + ["e0"])]
    learned = heir.model.n_learned
    out = heir.handle(labels)
    assert out.learned == 10 and heir.model.n_learned == learned + 10
    counts = heir.model.pending.counts
    assert counts["joined"] == 10 and counts["unknown"] == 1  # e0 waits on partition 0


def test_no_section_for_a_partition_the_shard_never_consumed() -> None:
    owner = ModelRunner(OnlineModel(SPEC, device="cpu"))
    owner.handle([Record(_event(1, "a"), "tx", 0, 0)])
    state = owner.snapshot_state("r1")
    assert replicas.partition_section(SPEC, state, "tx", 3) is None
    section = replicas.partition_section(SPEC, state, "tx", 0)
    assert section is not None
    assert np.asarray(section["pending"]["scores"]).shape == (1,)
