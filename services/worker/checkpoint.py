"""The worker's at-least-once guarantee, in one place: :meth:`Checkpoint.commit`.

A consumed event is committed to Kafka only once a saved snapshot includes it and its
outputs (prediction records, dead letters) are acknowledged by the broker. One
``commit()`` runs the steps in this order, for one model:

1. **capture** the state on the model's learner thread (the only thread that touches
   model state), tagged with its merge lineage, with the number of learned jobs it covers;
2. **encode** it off the event loop;
3. **fsync** it to the local checkpoint (what a restart restores: it comes first);
4. **publish** it, signed, to the models topic (the API, the merger, a lost disk);
5. **ack** the covered jobs in order, each once its outputs are delivered (predictions
   acknowledged before offsets), and
6. **commit** their offsets (Faust 0.15 needs one commit per bundle:
   :func:`streamlearn.services.worker.faust_compat.commit_bundles`).

A failure at 3 or 4 stops there: nothing is acked, Kafka redelivers after a crash.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from aiokafka.errors import KafkaError

from streamlearn import snapshots
from streamlearn.logs import RateLimitedLog
from streamlearn.services.worker import observe

if TYPE_CHECKING:
    from streamlearn.services.worker.app import WorkerRuntime

log = logging.getLogger("streamlearn.worker")
#: A large state (many entities, many waiting events) is snapshot less often than
#: ``worker.snapshot_interval_s``: so that capturing and encoding take at most this share
#: of the time (publishing it and the broker's work cost more again: with 25k entities in
#: 2.3 MB snapshots, load_tests/bench_worker.py --aggregates measured the worker at 0.36x
#: of its rate without aggregates at a 0.25 share, 0.52x and 0.59x at 0.05, 1M events per
#: run), but at least every ``SNAPSHOT_MAX_SPACING_S``, so that a new aggregate still
#: reaches /predict within a second: in the demo (worker, broker, API and producer on two
#: cores) 0.71-1.07 s at 0.4 s, 0.47-0.99 s at 0.3 s (8 and 24 probes), while
#: bench_worker --aggregates --pairs 4 gave 0.75x and 0.78x.
SNAPSHOT_CPU_SHARE = 0.05
SNAPSHOT_MAX_SPACING_S = 0.3
limited = RateLimitedLog(log, interval_s=10.0)


def snapshot_path(snapshot_dir: str, model: str, replica: str) -> Path:
    """Local checkpoint file of one model shard (survives a full broker restart)."""
    return Path(snapshot_dir) / f"{model}--{replica}.snap"


class Checkpoint:
    """Owner of one model's checkpoint protocol (see the module docstring)."""

    def __init__(self, runtime: WorkerRuntime, name: str) -> None:
        self.runtime = runtime
        self.name = name

    def due(self, force: bool) -> bool:
        """Whether the model moved since the last commit, or its heartbeat is due (a shard
        not refreshed within ``worker.stale_after_s`` leaves the merge)."""
        rt = self.runtime
        runner = rt.runners[self.name]
        mark = (runner.model.version, runner.telemetry.messages)
        beat = rt.settings.worker.stale_after_s / 3
        since = time.monotonic() - rt._published_at.get(self.name, 0.0)
        # A large state is snapshot less often (SNAPSHOT_CPU_SHARE, SNAPSHOT_MAX_SPACING_S).
        spacing = min(rt.snapshot_cost_s.get(self.name, 0.0) / SNAPSHOT_CPU_SHARE,
                      SNAPSHOT_MAX_SPACING_S)
        return force or since >= beat or (rt._published.get(self.name) != mark
                                           and since >= spacing)

    async def commit(self) -> bool:
        """Capture, encode, fsync, publish, ack, commit; True once all steps ran."""
        rt, name = self.runtime, self.name
        feeder = rt.feeders[name]
        # 1. capture, on the learner thread
        state, covered = await feeder.state(rt.replica, rt.lineages.get(name),
                                            rt.partitions(feeder.spec.topic))
        state["worker"] = rt.health()
        state["observed"] = observe.observed(rt, feeder, state, rt.rates)
        rt.loop_lag_max = 0.0
        # 2. encode
        t0 = time.perf_counter()
        payload = await asyncio.to_thread(snapshots.encode, state)
        rt.snapshot_cost_s[name] = feeder.capture_s + time.perf_counter() - t0
        # 3. fsync the local checkpoint
        path = snapshot_path(rt.settings.worker.snapshot_dir, name, rt.replica)
        try:
            await asyncio.to_thread(snapshots.save, path, payload)
        except OSError as exc:
            rt.checkpoint_failed(name, exc)
            return False
        if rt.checkpoint_failing_since is not None:
            log.warning("checkpoint of %s to %s works again", name, path)
            rt.checkpoint_failing_since = None
            limited.reset(("checkpoint", name))
        # 4. publish (a broker outage must not stop local checkpoints)
        key = f"{name}/{rt.replica}".encode()
        try:
            signed = snapshots.sign(payload, rt.settings.kafka.snapshot_key, context=key)
            await rt.outputs.send(rt.settings.kafka.models_topic, key, signed)
        except KafkaError as exc:
            rt.output_failed(exc)
            return False
        # 5-6. ack the covered jobs once their outputs are delivered, then commit offsets
        await feeder.release(covered)
        rt._published[name] = (int(state["version"]), state["telemetry"]["messages"])
        rt._published_at[name] = time.monotonic()
        return True
