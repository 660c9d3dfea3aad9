"""``streamlearn evaluate --topic``: read a topic once, from the beginning (or given offsets)
up to its end offsets at start, into a :class:`streamlearn.evaluate.Replay`.

Only the reading lives here. The consumer joins no group and commits nothing, so a replay
never moves a worker's offsets; message values go to the replay as they come, and the
core decodes them with the worker's own decoders (:class:`streamlearn.evaluate.MessageDecoder`).
Partitions are read interleaved, in each partition's order, as the worker reads them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from streamlearn.evaluate import EvaluateError, Replay

FETCH_BYTES = 32 * 1024 * 1024  # batch records of many thousands of rows fit one fetch
_IDLE_S = 15.0  # no record for this long while short of the end offsets: give up


def parse_offsets(text: str) -> dict[int, int]:
    """``"0:100,1:0"`` to ``{0: 100, 1: 0}``.

    Examples
    --------
    >>> parse_offsets("0:100, 1:0")
    {0: 100, 1: 0}
    >>> parse_offsets("0=1")
    Traceback (most recent call last):
    ...
    streamlearn.evaluate.EvaluateError: --offsets '0=1': expected partition:offset,...
    """
    out: dict[int, int] = {}
    for piece in filter(None, (p.strip() for p in text.split(","))):
        p, sep, o = piece.partition(":")
        try:
            if not sep:
                raise ValueError
            out[int(p)] = int(o)
        except ValueError:
            raise EvaluateError(f"--offsets {text!r}: expected partition:offset,...") from None
    return out


async def replay_topic(
    bootstrap: str,
    topic: str,
    replay: Replay,
    *,
    offsets: Mapping[int, int] | None = None,
    progress: Callable[[int, int, int], None] | None = None,
    max_records: int = 50_000,
) -> dict[str, Any]:
    """Feed ``topic`` to ``replay`` from the start offsets to the end offsets taken at start.

    ``offsets`` gives the start of some partitions; the others start at their beginning.
    ``progress(messages_done, messages_total, rows)`` is called after each fetch.
    Returns ``{"partitions": {p: [start, end]}, "messages": n}``.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
        auto_offset_reset="earliest", max_partition_fetch_bytes=FETCH_BYTES,
        fetch_max_bytes=2 * FETCH_BYTES, request_timeout_ms=30_000,
    )
    try:
        await consumer.start()
    except Exception as exc:  # noqa: BLE001 - aiokafka's connection errors vary
        raise EvaluateError(f"cannot reach the broker at {bootstrap}: {exc}") from None
    try:
        if topic not in await consumer.topics():
            raise EvaluateError(f"topic {topic!r} does not exist on {bootstrap}")
        parts = sorted(consumer.partitions_for_topic(topic) or ())
        unknown = sorted(set(offsets or {}) - set(parts))
        if unknown:
            raise EvaluateError(f"--offsets: topic {topic!r} has no partition {unknown[0]} "
                                f"(it has {parts})")
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        first = await consumer.beginning_offsets(tps)
        end = await consumer.end_offsets(tps)
        start: dict[TopicPartition, int] = {}
        for tp in tps:
            wanted = (offsets or {}).get(tp.partition)
            start[tp] = first[tp] if wanted is None else min(max(wanted, first[tp]), end[tp])
            consumer.seek(tp, start[tp])
        total = sum(end[tp] - start[tp] for tp in tps)
        left = {tp for tp in tps if start[tp] < end[tp]}
        done = rows = 0
        last = time.monotonic()
        while left and not replay.done:
            got = await consumer.getmany(*left, timeout_ms=500, max_records=max_records)
            values: list[bytes | None] = []
            for tp, msgs in got.items():
                msgs = [m for m in msgs if m.offset < end[tp]]
                values.extend(m.value for m in msgs)
                if msgs and msgs[-1].offset + 1 >= end[tp]:
                    left.discard(tp)
                    consumer.pause(tp)
            for tp in list(left):  # past the end already (transaction markers, compaction)
                if await consumer.position(tp) >= end[tp]:
                    left.discard(tp)
            if values:
                rows += replay.feed(values)
                done += len(values)
                last = time.monotonic()
                if progress:
                    progress(done, total, rows)
            elif time.monotonic() - last > _IDLE_S:
                raise EvaluateError(
                    f"topic {topic!r}: no message for {_IDLE_S:.0f} s with "
                    f"{total - done:,} still before the end offsets taken at start")
        return {"partitions": {tp.partition: [start[tp], end[tp]] for tp in tps},
                "messages": done}
    finally:
        await consumer.stop()
