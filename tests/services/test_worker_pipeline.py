"""The worker's hot path without Kafka: pipeline, bundling, commit arithmetic, feeder acks."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
import pytest
from aiokafka.structs import ConsumerRecord
from faust.transport.consumer import Consumer
from faust.types import TP
from intervaltree import IntervalTree

from streamlearn.batch_format import decode_batch, encode_batch
from streamlearn.config import ModelSpec
from streamlearn.models import OnlineModel
from streamlearn.pipeline import Block, JsonDecoder, ModelRunner
from streamlearn.services.worker.app import Bundle, Feeder, as_block, bundling_scheduler
from streamlearn.settings import load_settings
from streamlearn.synthetic import FraudStream


@pytest.fixture
def runner(fraud_spec: ModelSpec) -> ModelRunner:
    return ModelRunner(OnlineModel(fraud_spec, device="cpu"))


def _json(events: list[dict]) -> list[bytes]:
    return [orjson.dumps(e) for e in events]


# -- pipeline -------------------------------------------------------------------------------


def test_bad_batch_is_dead_lettered_whole_and_the_next_goes_on(runner, fraud_spec):
    events = FraudStream(seed=2).take(300)
    good = encode_batch(events[:100], fraud_spec)
    truncated = encode_batch(events[100:200], fraud_spec)[:-40]
    foreign = encode_batch(events[100:200],
                           ModelSpec(name="x", topic="t", numeric=("amount",), label="is_fraud"))
    blocks = [
        Block("t", 0, [0, 1, 2], [good, truncated, foreign]),
        Block("t", 1, [7, 8], _json(events[200:202])),
        Block("t", 0, [3], [encode_batch(events[202:300], fraud_spec)]),
    ]
    out = runner.handle_blocks(blocks)
    reasons = [(d.record.partition, d.record.offset, d.reason) for d in out.dead]
    assert [r[:2] for r in reasons] == [(0, 1), (0, 2)]
    assert "bad batch record: truncated" in reasons[0][2]
    assert "schema mismatch: missing feature columns" in reasons[1][2]
    assert out.scored == 100 + 2 + 98
    assert runner.model.offsets == {"t:0": 4, "t:1": 9}
    t = runner.telemetry
    assert (t.messages, t.consumed, t.deadlettered) == (6, 202, 2)
    # 2 batch prediction records plus 2 JSON prediction records, in input order
    assert len(out.predictions) == 4
    first = decode_batch(out.predictions[0])
    assert first.meta["model"] == fraud_spec.name
    assert first.columns["id"].values == [e["event_id"] for e in events[:100]]
    assert orjson.loads(out.predictions[1])["id"] == events[200]["event_id"]


def test_json_fast_path_matches_the_vectorizer(fraud_spec):
    events = FraudStream(seed=3, label_fraction=0.5, missing_rate=0.2).take(1500)
    events[10]["country"] = None
    events[11]["channel"] = 4
    del events[12]["hour"]
    dec = JsonDecoder(fraud_spec, OnlineModel(fraud_spec, device="cpu").vectorizer)
    got, rejects = dec.decode(_json(events))
    want, _ = OnlineModel(fraud_spec, device="cpu").vectorizer.transform_many(events)
    assert rejects == []
    for name in ("numeric", "hashed", "labels"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    assert got.ids == want.ids


def test_json_bad_events_keep_the_vectorizers_reasons(fraud_spec):
    events = FraudStream(seed=4).take(20)
    values = _json(events)
    values[2] = b'{"amount": "lots"}'
    values[5] = b"{not json"
    values[7] = orjson.dumps({**events[7], "is_fraud": 3})
    values[9] = b""
    dec = JsonDecoder(fraud_spec, OnlineModel(fraud_spec, device="cpu").vectorizer)
    batch, rejects = dec.decode(values)
    assert len(batch) == 16
    by_index = dict(rejects)
    assert by_index[2] == "field 'amount': expected a number, got str"
    assert by_index[5].startswith("not valid JSON")
    assert by_index[7] == "field 'is_fraud': label must be 0 or 1, got 3.0"
    assert by_index[9] == "empty message"


def test_json_and_batch_records_learn_the_same_model(fraud_spec):
    events = FraudStream(seed=6).take(1000)
    a = ModelRunner(OnlineModel(fraud_spec, device="cpu"))
    b = ModelRunner(OnlineModel(fraud_spec, device="cpu"))
    a.handle_blocks([Block("t", 0, list(range(1000)), _json(events))])
    b.handle_blocks([Block("t", 0, [0, 1], [encode_batch(events[:512], fraud_spec),
                                            encode_batch(events[512:], fraud_spec)])])
    assert a.model.version == b.model.version == 4  # 256-row steps, the tail learned alone
    np.testing.assert_allclose(a.model.w, b.model.w, rtol=1e-6)


@pytest.mark.parametrize("update_rows", [1, 8])
def test_the_warm_up_builds_what_the_json_and_batch_paths_call(fraud_spec, monkeypatch,
                                                                update_rows):
    """Numba builds a kernel per argument types, and a read-only array is a type of its
    own (the vectorizer's columns and a batch record's labels are views of bytes). The
    warm-up must call each compiled function with the types the JSON and batch paths
    then use, or an empty kernel cache compiles them in the middle of the stream (~6 s
    per build, measured): the learning step, and the data-drift monitor's freeze and
    fold (a snapshot reads it), and the JSON scanner."""
    import dataclasses

    import numba

    from streamlearn import json_columns
    from streamlearn.drift import data
    from streamlearn.models import fused
    from streamlearn.services.worker.app import warm_up

    seen: dict[str, set[tuple[Any, ...]]] = defaultdict(set)
    phase = ["warm-up"]

    def spy(module: Any, name: str) -> None:
        compiled = getattr(module, name)

        def call(*args: Any) -> Any:
            seen[phase[0]].add((name, tuple(numba.typeof(a) for a in args)))
            return compiled(*args)

        monkeypatch.setattr(module, name, call)

    spy(fused, "prequential_chunks")
    spy(json_columns, "_scan")
    for name in ("_fold", "_rank_counts", "_fill_tables"):
        spy(data, name)
    spec = dataclasses.replace(fraud_spec, update_rows=update_rows, drift_reference_size=600)
    runner = ModelRunner(OnlineModel(spec, device="cpu"))
    warm_up(runner)
    phase[0] = "stream"
    events = FraudStream(seed=7).take(1024)
    runner.handle_blocks([Block("t", 0, list(range(512)), _json(events[:512]))])
    runner.handle_blocks([Block("t", 0, [600], [encode_batch(events[512:], spec)])])
    runner.snapshot_state("r1")
    assert runner.model.data_drift.ready and runner.model.version > 0
    assert {name for name, _ in seen["stream"]} == {"prequential_chunks", "_fold",
                                                     "_rank_counts", "_fill_tables", "_scan"}
    assert seen["stream"] <= seen["warm-up"]


# -- bundling scheduler ---------------------------------------------------------------------


def _records(topic: str, partition: int, offsets: range, size: int = 10) -> list[ConsumerRecord]:
    return [ConsumerRecord(topic, partition, o, 0, 0, None, b"x" * size, None, 0, size, ())
            for o in offsets]


def test_scheduler_bundles_runs_and_passes_other_topics():
    sched = bundling_scheduler(frozenset({"in"}), max_records=4, max_bytes=1000)()
    tp0, tp1, other = TP("in", 0), TP("in", 1), TP("other", 0)
    out = list(sched.iterate({tp0: _records("in", 0, range(5, 15)),
                              other: _records("other", 0, range(3)),
                              tp1: _records("in", 1, range(2, 4))}))
    bundles = [(tp.partition, r.offset, r.value.offsets) for tp, r in out if tp.topic == "in"]
    assert bundles == [(0, 8, [5, 6, 7, 8]), (0, 12, [9, 10, 11, 12]), (0, 14, [13, 14]),
                       (1, 3, [2, 3])]
    assert [r.offset for tp, r in out if tp == other] == [0, 1, 2]
    assert out[0][1].value.nbytes == 40


def test_scheduler_splits_on_bytes_and_after_offset_zero():
    sched = bundling_scheduler(frozenset({"in"}), max_records=100, max_bytes=25)()
    tp = TP("in", 0)
    first = [r.value.offsets for _, r in sched.iterate({tp: _records("in", 0, range(1))})]
    later = [r.value.offsets for _, r in sched.iterate({tp: _records("in", 0, range(1, 8))})]
    assert first == [[0]]
    assert later == [[1], [2, 3, 4], [5, 6, 7]]


# -- Faust's commit arithmetic, replayed with its own methods ------------------------------


class _Offsets:
    """The parts of a Faust consumer that gap/ack/commit bookkeeping touches."""

    def __init__(self, committed: int | None) -> None:
        self._gap: defaultdict[TP, IntervalTree] = defaultdict(IntervalTree)
        self._acked: defaultdict[TP, list[int]] = defaultdict(list)
        self._acked_index: defaultdict[TP, set[int]] = defaultdict(set)
        self._committed_offset: defaultdict[TP, int | None] = defaultdict(lambda: committed)
        self._read_offset: defaultdict[TP, int | None] = defaultdict(lambda: committed)
        self.log = logging.getLogger("test")

    async def deliver(self, tp: TP, offset: int) -> None:
        """``Consumer._drain_messages`` for one message, without the callback."""
        r_offset = self._read_offset[tp]
        if r_offset is None or offset >= r_offset:
            gap = offset - (r_offset or 0)
            if gap > 1 and r_offset:
                await Consumer._add_gap(self, tp, r_offset + 1, offset)  # type: ignore[arg-type]
            self._read_offset[tp] = offset

    def ack(self, tp: TP, offset: int) -> None:
        """``Consumer.ack``'s bookkeeping for an acking topic."""
        committed = self._committed_offset[tp]
        if (committed is None or offset >= committed) and offset not in self._acked_index[tp]:
            self._acked_index[tp].add(offset)
            self._acked[tp].append(offset)

    def commit(self, tp: TP) -> int | None:
        offset = Consumer._new_offset(self, tp)  # type: ignore[arg-type]
        if offset is not None and Consumer._should_commit(self, tp, offset):  # type: ignore[arg-type]
            self._committed_offset[tp] = offset
        return self._committed_offset[tp]


@pytest.mark.parametrize("committed", [None, 1000])
async def test_commits_never_pass_an_unacked_bundle_and_catch_up(committed):
    tp = TP("in", 0)
    start = committed or 0
    sched = bundling_scheduler(frozenset({"in"}), max_records=50, max_bytes=10**9)()
    consumer = _Offsets(committed)
    bundles = [r.offset for _, r in sched.iterate({tp: _records("in", 0, range(start, start + 1))})]
    bundles += [r.offset for _, r in
                sched.iterate({tp: _records("in", 0, range(start + 1, start + 400))})]
    for offset in bundles:
        await consumer.deliver(tp, offset)
    acked_end = None
    for i, offset in enumerate(bundles):
        consumer.ack(tp, offset)
        acked_end = offset + 1
        for _ in range(3 if i % 2 else 0):  # commits interleave with acks
            got = consumer.commit(tp)
            assert got is None or got <= acked_end
    for _ in range(len(bundles)):  # one commit per bundle at worst (Faust 0.15 quirk)
        consumer.commit(tp)
    assert consumer._committed_offset[tp] == start + 400


# -- feeder: acks only once a saved snapshot covers the events, in order --------------------


class _Runtime:
    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.commits: list[tuple[str, int]] = []
        self.settings = load_settings(model=[])

    async def send_outcome(self, spec: ModelSpec, out: Any) -> list[asyncio.Future[Any]]:
        self.sent.append(out)
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return [done]

    async def commit(self, topic: str, bundles: int) -> None:
        self.commits.append((topic, bundles))


async def test_feeder_acks_only_checkpointed_jobs_in_order(runner, fraud_spec):
    events = FraudStream(seed=8).take(600)
    acked: list[tuple[int, int]] = []  # (offset, messages learned when it was acked)

    def event(offsets: list[int]) -> SimpleNamespace:
        values = _json(events[offsets[0] : offsets[-1] + 1])
        ev = SimpleNamespace(message=SimpleNamespace(topic="t", partition=0, offset=offsets[-1]),
                             value=Bundle(offsets, values, sum(map(len, values))))
        ev.ack = lambda: acked.append((ev.message.offset, runner.telemetry.messages))
        return ev

    runtime = _Runtime()
    feeder = Feeder(runtime, fraud_spec, runner)  # type: ignore[arg-type]
    task = asyncio.create_task(feeder.run())
    try:
        for chunk in (list(range(0, 100)), list(range(100, 400)), list(range(400, 600))):
            await feeder.add(event(chunk))  # type: ignore[arg-type]
        await feeder.flush()
        await asyncio.wait_for(feeder.idle.wait(), 10)
        assert acked == [] and runtime.commits == []  # learned, but in no snapshot yet
        state, covered = await feeder.state("r0")
        assert state["n_seen"] == 600
        await feeder.release(covered)
    finally:
        task.cancel()
    assert [offset for offset, _ in acked] == [99, 399, 599]
    assert all(learned >= offset + 1 for offset, learned in acked)
    assert sum(n for _, n in runtime.commits) == 3  # one commit per acked bundle
    assert runner.telemetry.messages == 600 and runner.model.offsets == {"t:0": 600}
    block = as_block(event([0, 1]))  # type: ignore[arg-type]
    assert block.offsets == [0, 1] and block.partition == 0


def test_faust_settings_bundle_the_model_topics():
    from streamlearn.services.worker.app import PromptTableManager, faust_settings
    from streamlearn.settings import load_settings

    settings = load_settings(kafka={"fast_join": True},
                             model=[{"name": "m", "topic": "in", "numeric": ["x"]}])
    opts = faust_settings(settings, "127.0.0.1:9092")
    sched = opts["ConsumerScheduler"]()
    tp = TP("in", 0)
    assert [r.value.offsets for _, r in sched.iterate({tp: _records("in", 0, range(3, 6))})] \
        == [[3, 4, 5]]
    assert opts["TableManager"] is PromptTableManager
    assert opts["broker_session_timeout"] == 2.0  # Tansu: fast group join
