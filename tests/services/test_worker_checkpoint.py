"""Checkpoint protocol edge (issue 10): a job without outputs is still released."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import orjson

from streamlearn.config import ModelSpec
from streamlearn.models import OnlineModel
from streamlearn.pipeline import ModelRunner
from streamlearn.services.worker.app import Bundle, Feeder
from streamlearn.settings import load_settings
from streamlearn.synthetic import FraudStream


class _Runtime:
    """Outputs off (``worker.emit_predictions = false``): no delivery futures at all."""

    def __init__(self) -> None:
        self.commits: list[tuple[str, int]] = []
        self.settings = load_settings(model=[])

    async def send_outcome(self, spec: ModelSpec, out: Any) -> list[asyncio.Future[Any]]:
        return []

    async def commit(self, topic: str, bundles: int) -> None:
        self.commits.append((topic, bundles))

    async def take_over(self, feeder: Any, partition: int) -> None:
        pass  # a single replica: no sibling holds the partition's entities


async def test_a_job_without_outputs_is_acked_and_committed(fraud_spec: ModelSpec) -> None:
    runner = ModelRunner(OnlineModel(fraud_spec, device="cpu"), emit_predictions=False)
    values = [orjson.dumps(e) for e in FraudStream(seed=3).take(200)]
    acked: list[int] = []
    offsets = list(range(200))
    event = SimpleNamespace(message=SimpleNamespace(topic=fraud_spec.topic, partition=0,
                                                    offset=199),
                            value=Bundle(offsets, values, sum(map(len, values))))
    event.ack = lambda: acked.append(199)
    runtime = _Runtime()
    feeder = Feeder(runtime, fraud_spec, runner)  # type: ignore[arg-type]
    task = asyncio.create_task(feeder.run())
    try:
        await feeder.add(event)  # type: ignore[arg-type]
        await feeder.flush()
        await asyncio.wait_for(feeder.idle.wait(), 10)
        _, covered = await feeder.state("r0")
        await asyncio.wait_for(feeder.release(covered), 5)
    finally:
        task.cancel()
    assert acked == [199] and runtime.commits == [(fraud_spec.topic, 1)]
