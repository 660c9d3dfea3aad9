"""What the worker adds to each snapshot for observability, and its admin commands.

The worker's own metrics reach Prometheus through the API: every snapshot carries the
worker's telemetry, and :func:`observed` adds the consumer lag per input partition and
the events/s since the previous snapshot (``state["observed"]``), which the API exports
(``streamlearn.metrics.DriftCollector``).  One scrape target (the API) then covers
every replica, and a worker needs no HTTP server.

:func:`watch_commands` reads ``kafka.commands_topic`` from its end, without a consumer
group (every replica acts on its own shard), and applies drift actions requested by
hand on the model's learner thread, then publishes a snapshot so that the API shows it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from streamlearn.drift.commands import decode_command
from streamlearn.drift.concept import detectors_ready
from streamlearn.logs import RateLimitedLog

if TYPE_CHECKING:
    from streamlearn.services.worker.app import Feeder, WorkerRuntime

log = logging.getLogger("streamlearn.worker")
limited = RateLimitedLog(log, interval_s=30.0)

#: Pause before the command consumer retries after a broker error.
RETRY_S = 2.0


class RateMeter:
    """Events/s between two snapshots of one model (from the consumed counter)."""

    def __init__(self) -> None:
        self.last: dict[str, tuple[float, int]] = {}

    def rate(self, name: str, consumed: int, now: float | None = None) -> float:
        """Events/s since the previous call for ``name`` (0.0 on the first).

        >>> m = RateMeter()
        >>> m.rate("m", 100, now=10.0), m.rate("m", 1100, now=12.0)
        (0.0, 500.0)
        """
        now = time.monotonic() if now is None else now
        prev = self.last.get(name)
        self.last[name] = (now, consumed)
        if prev is None or now <= prev[0]:
            return 0.0
        return max(0, consumed - prev[1]) / (now - prev[0])


def consumer_lag(runtime: WorkerRuntime, feeder: Feeder) -> dict[str, int]:
    """``topic:partition`` -> records behind the partition's end, for the model's input.

    The position is the offset after the last record handed to the model's feeder; the
    end is the consumer's high watermark.  Partitions never read yet count from 0.
    """
    topic = feeder.spec.topic
    lag: dict[str, int] = {}
    try:
        consumer = runtime.app.consumer
        assigned = [tp for tp in consumer.assignment() if tp.topic == topic]
        for tp in assigned:
            high = consumer.highwater(tp)
            if high is None:
                continue
            position = feeder.next_offset.get((tp.topic, tp.partition), 0)
            lag[f"{tp.topic}:{tp.partition}"] = max(0, int(high) - int(position))
    except Exception as exc:  # noqa: BLE001 - observability must never stop a snapshot
        limited.warning("lag", "consumer lag unavailable (%s: %s)", type(exc).__name__, exc)
    return lag


def observed(runtime: WorkerRuntime, feeder: Feeder, state: dict[str, Any],
             meter: RateMeter) -> dict[str, Any]:
    """The snapshot's ``observed`` entry: consumer lag per partition and events/s."""
    consumed = int(state.get("telemetry", {}).get("consumed", 0))
    return {"lag": consumer_lag(runtime, feeder),
            "events_per_s": round(meter.rate(feeder.spec.name, consumed), 3),
            "at": time.time()}


async def watch_commands(runtime: WorkerRuntime) -> None:
    """Apply admin drift commands from ``kafka.commands_topic`` (runs as a worker task)."""
    await runtime.ready.wait()
    k = runtime.settings.kafka
    while True:
        consumer = AIOKafkaConsumer(k.commands_topic, bootstrap_servers=runtime.bootstrap,
                                    group_id=None, auto_offset_reset="latest",
                                    **k.client_kwargs())
        try:
            await consumer.start()
            while True:
                batches = await consumer.getmany(timeout_ms=1000)
                for records in batches.values():
                    for rec in records:
                        await apply_command(runtime, rec.value)
                await replay_pending(runtime)
        except asyncio.CancelledError:
            raise
        except (KafkaError, OSError) as exc:
            limited.warning("commands", "commands topic %s unavailable (%s: %s); retrying",
                            k.commands_topic, type(exc).__name__, exc)
        finally:
            await consumer.stop()
        await asyncio.sleep(RETRY_S)


async def replay_pending(runtime: WorkerRuntime) -> int:
    """Once river's detectors are in, replay the losses a model queued meanwhile (on its
    learner thread) and act on a drift among them, then publish: a stream that paused
    before the import ended would otherwise wait for its next event.  Models replayed."""
    if not detectors_ready():
        return 0
    loop = asyncio.get_running_loop()
    done = 0
    for feeder in list(runtime.feeders.values()):
        model = feeder.runner.model
        if model.concept_drift.pending:
            await loop.run_in_executor(feeder.executor, model.drift_actions.catch_up, model)
            done += 1
    if done:
        await runtime.publish_snapshots(force=True)
    return done


async def apply_command(runtime: WorkerRuntime, value: bytes | None) -> str | None:
    """Apply one command record if it is valid, recent and for a model of this worker."""
    cmd = decode_command(value)
    if cmd is None or cmd.model not in runtime.feeders:
        return None
    feeder = runtime.feeders[cmd.model]
    model = feeder.runner.model
    loop = asyncio.get_running_loop()
    done = await loop.run_in_executor(
        feeder.executor, lambda: model.drift_actions.apply(model, cmd.action, "manual"))
    log.warning("applied admin command %s (%s) to model %s", cmd.action, cmd.id, cmd.model)
    await runtime.publish_snapshots(force=True)
    return done
