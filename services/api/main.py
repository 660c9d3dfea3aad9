"""FastAPI application factory and server entry point.

Nothing is built at import time: call :func:`create_app` with a settings object
(``streamlearn.settings.Settings`` or anything shaped like it, see
:mod:`streamlearn.services.api.deps`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import (
    CollectorRegistry,
    Counter,
    gc_collector,
    platform_collector,
    process_collector,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streamlearn import __version__
from streamlearn.metrics import SnapshotTelemetryCollector, build_api_metrics
from streamlearn.services.api.deps import SettingsLike
from streamlearn.services.api.feed import MODELS_TOPIC, SnapshotFeed, load_snapshot_dir
from streamlearn.services.api.routes import health, models
from streamlearn.services.api.schemas import OrjsonResponse
from streamlearn.serving import ModelStore

log = logging.getLogger(__name__)

DESCRIPTION = """Predictions from online models learned on Kafka streams.

Models are hot-swapped from worker snapshots (topic `streamlearn.models`); replica
shards of one model are merged. Bodies must be strict JSON: `NaN`/`Infinity` are refused.
"""


class ErrorCountMiddleware:
    """Count responses with status >= 400 by status code (pure ASGI, no body buffering)."""

    def __init__(self, app: ASGIApp, counter: Counter) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.counter.labels(str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            self.counter.labels("500").inc()
            raise


def _clean_errors(errors: Any) -> list[dict[str, Any]]:
    """Validation errors as plain JSON: type, loc, msg, small inputs, stringified ctx."""
    out = []
    for err in errors:
        item: dict[str, Any] = {"type": err.get("type"), "loc": list(err.get("loc", ())),
                                "msg": err.get("msg")}
        value = err.get("input")
        if isinstance(value, str | int | float | bool) and len(str(value)) <= 200:
            item["input"] = value
        if err.get("ctx"):
            item["ctx"] = {k: v if isinstance(v, str | int | float) else str(v)
                           for k, v in err["ctx"].items()}
        out.append(item)
    return out


async def _validation_error(request: Request, exc: Exception) -> OrjsonResponse:
    assert isinstance(exc, RequestValidationError)
    return OrjsonResponse({"detail": _clean_errors(exc.errors())}, status_code=422)


async def _value_error(request: Request, exc: Exception) -> OrjsonResponse:
    # A model-side ValueError (InvalidEvent is one) is the caller's bad input, never a 5xx.
    log.info("422 for %s %s: %s", request.method, request.url.path, exc)
    return OrjsonResponse(
        {"detail": [{"type": "value_error", "loc": ["body"], "msg": str(exc)}]}, status_code=422
    )


def create_app(
    settings: SettingsLike,
    store: ModelStore | None = None,
    registry: CollectorRegistry | None = None,
) -> FastAPI:
    """Build the API.

    Parameters
    ----------
    settings
        ``.kafka.bootstrap`` (empty: no snapshot feed), ``.api.max_instances``,
        optional ``.api.snapshot_dir`` (snapshot files loaded at start-up) and
        ``.kafka.models_topic``.
    store
        The model store to serve from (a fresh one by default).
    registry
        Prometheus registry for /metrics.  By default a fresh one that also
        carries the process, platform and GC collectors.  One registry serves
        one app.
    """
    store = store if store is not None else ModelStore()
    if registry is None:
        registry = CollectorRegistry()
        process_collector.ProcessCollector(registry=registry)
        platform_collector.PlatformCollector(registry=registry)
        gc_collector.GCCollector(registry=registry)
    api_metrics = build_api_metrics(registry)
    registry.register(SnapshotTelemetryCollector(store))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        snapshot_dir = getattr(settings.api, "snapshot_dir", "") or ""
        if snapshot_dir:
            loaded = await asyncio.to_thread(load_snapshot_dir, snapshot_dir, store)
            log.info("loaded %d snapshot(s) from %s", loaded, snapshot_dir)
        feed: SnapshotFeed | None = None
        bootstrap = settings.kafka.bootstrap
        if bootstrap:
            topic = getattr(settings.kafka, "models_topic", MODELS_TOPIC) or MODELS_TOPIC
            feed = SnapshotFeed(bootstrap, store, topic=topic)
            feed.start()
        app.state.feed = feed
        try:
            yield
        finally:
            if feed is not None:
                await feed.stop()

    app = FastAPI(
        title="streamlearn",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        default_response_class=OrjsonResponse,
    )
    app.state.settings = settings
    app.state.store = store
    app.state.registry = registry
    app.state.metrics = api_metrics
    app.state.feed = None
    app.include_router(models.router)
    app.include_router(health.router)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ValueError, _value_error)
    app.add_middleware(ErrorCountMiddleware, counter=api_metrics.request_errors)
    return app


async def serve(settings: SettingsLike, store: ModelStore | None = None) -> None:
    """Run the API under uvicorn on ``settings.api.host:port`` until stopped."""
    host = getattr(settings.api, "host", "") or "127.0.0.1"
    config = uvicorn.Config(
        create_app(settings, store),
        host=host,
        port=int(settings.api.port),
        access_log=False,
        log_level="info",
        lifespan="on",
    )
    await uvicorn.Server(config).serve()
