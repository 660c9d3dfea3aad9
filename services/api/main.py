"""FastAPI application factory and server entry point.

Nothing is built at import time: call :func:`create_app` with a settings object
(``streamlearn.settings.Settings`` or anything shaped like it, see
:mod:`streamlearn.services.api.deps`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import multiprocessing
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import (
    CollectorRegistry,
    Counter,
    gc_collector,
    platform_collector,
    process_collector,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streamlearn import __version__, snapshots
from streamlearn.metrics import DriftCollector, SnapshotTelemetryCollector, build_api_metrics
from streamlearn.services.api.deps import SettingsLike, max_instances
from streamlearn.services.api.fast import FastPathStats, FastPredictMiddleware
from streamlearn.services.api.feed import (
    MODELS_TOPIC,
    FeedCollector,
    SnapshotFeed,
    load_snapshot_dir,
)
from streamlearn.services.api.http import protocol_class
from streamlearn.services.api.routes import admin, health, models
from streamlearn.services.api.schemas import OrjsonResponse
from streamlearn.serving import ModelStore, SnapshotPolicy
from streamlearn.settings import SettingsError

log = logging.getLogger(__name__)

DESCRIPTION = """Predictions from online models learned on Kafka streams.

Models are hot-swapped from worker snapshots (topic `streamlearn.models`); replica
shards of one model are merged. Bodies must be strict JSON: `NaN`/`Infinity` are refused,
and bodies over `api.max_body_bytes` get 413. Every 4xx body has a `detail` message.
"""

DEFAULT_MAX_BODY_BYTES = 1024 * 1024


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a streamed body passes the limit (FastAPI renders 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, detail=f"request body is larger than the limit of {limit} bytes "
                                     "(api.max_body_bytes)")


class BodyLimitMiddleware:
    """Refuse request bodies over ``limit`` bytes with 413, without reading them whole.

    A declared ``Content-Length`` over the limit is refused before the app runs;
    a chunked (or lying) body is counted as it streams, and the read that passes
    the limit raises :class:`BodyTooLarge`.  Pure ASGI: nothing is buffered here.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.limit or declared < 0:
                    status = 413 if declared > self.limit else 400
                    detail = (BodyTooLarge(self.limit).detail if status == 413
                              else "invalid Content-Length header")
                    await _send_json(send, status, {"detail": detail})
                    return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:  # raised outside a route (no exception handler saw it)
            if started:
                raise
            await _send_json(send, 413, {"detail": exc.detail})


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    raw = orjson.dumps(body)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(raw)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": raw})



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


class StreamlearnAPI(FastAPI):
    """FastAPI, with the fast predict path (``fast.py``) in front of its whole stack."""

    fast: FastPredictMiddleware | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fast = self.fast
        if fast is None:
            await super().__call__(scope, receive, send)
        else:
            await fast(scope, receive, send)  # it hands what it declines to FastAPI


def snapshot_policy(settings: SettingsLike) -> SnapshotPolicy:
    """What snapshots this API accepts, from ``kafka.snapshot_key``,
    ``api.require_signed_snapshots``, ``api.max_snapshot_bytes`` and the configured models.

    Raises :class:`SettingsError` when signatures are required and no key is set.
    """
    key = getattr(settings.kafka, "snapshot_key", None)
    require = getattr(settings.api, "require_signed_snapshots", None)
    if require and snapshots.key_bytes(key) is None:
        raise SettingsError(
            "invalid configuration: api.require_signed_snapshots is true but "
            "kafka.snapshot_key (STREAMLEARN_KAFKA__SNAPSHOT_KEY) is not set")
    try:
        specs = list(getattr(settings, "specs", None) or [])
    except (TypeError, ValueError):
        specs = []
    max_bytes = getattr(settings.api, "max_snapshot_bytes", None)
    limits = snapshots.DEFAULT_LIMITS
    if max_bytes:
        limits = snapshots.tighten(limits, max_payload_bytes=int(max_bytes))
    return SnapshotPolicy(
        key=key, require_signature=require,
        specs={spec.name: spec for spec in specs} if specs else None, limits=limits,
        stale_after_s=getattr(getattr(settings, "worker", None), "stale_after_s", None),
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
        optional ``.api.snapshot_dir`` (snapshot files loaded at start-up),
        ``.api.max_body_bytes``, ``.kafka.models_topic`` and the snapshot policy
        (:func:`snapshot_policy`).
    store
        The model store to serve from (a fresh one by default).  A given store
        keeps its own policy unless it has the default one.
    registry
        Prometheus registry for /metrics.  By default a fresh one that also
        carries the process, platform and GC collectors.  One registry serves
        one app.
    """
    policy = snapshot_policy(settings)
    if store is None:
        store = ModelStore(policy=policy)
    elif store.policy == SnapshotPolicy():
        store.policy = policy
    if store.policy.key_bytes is not None and len(store.policy.key_bytes) < 16:
        log.warning("kafka.snapshot_key is shorter than 16 bytes: use 32 random bytes")
    if registry is None:
        registry = CollectorRegistry()
        process_collector.ProcessCollector(registry=registry)
        platform_collector.PlatformCollector(registry=registry)
        gc_collector.GCCollector(registry=registry)
    api_metrics = build_api_metrics(registry)
    registry.register(SnapshotTelemetryCollector(store))
    registry.register(DriftCollector(store))
    max_body = int(getattr(settings.api, "max_body_bytes", DEFAULT_MAX_BODY_BYTES))

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
            feed = SnapshotFeed(bootstrap, store, topic=topic,
                                consumer_options=_consumer_options(settings))
            feed.start()
        app.state.feed = feed
        # Start-up objects (numba, NumPy, FastAPI, the loaded models) live as long as the
        # process: freezing them keeps full collections, which would scan them all, from
        # stalling requests for tens of milliseconds.
        if getattr(app.state, "freeze_gc", False):  # set by serve(); not in tests
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            if feed is not None:
                await feed.stop()

    app = StreamlearnAPI(
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
    app.include_router(admin.router)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ValueError, _value_error)
    _document_limits(app, settings)
    app.add_middleware(BodyLimitMiddleware, limit=max_body)
    app.add_middleware(ErrorCountMiddleware, counter=api_metrics.request_errors)
    app.state.fast_predict = None
    if getattr(settings.api, "fast_predict", True):
        # Before FastAPI's own stack: a valid predict request is answered without it.
        app.state.fast_predict = FastPathStats()
        app.fast = FastPredictMiddleware(
            functools.partial(FastAPI.__call__, app), store=store, metrics=api_metrics,
            max_instances=max_instances(settings), max_body=max_body,
            stats=app.state.fast_predict, owner=app)
    registry.register(FeedCollector(store, lambda: app.state.feed))
    return app


def _document_limits(app: FastAPI, settings: SettingsLike) -> None:
    """Put the configured ``max_instances`` into the OpenAPI schema (``maxItems``)."""
    build = app.openapi
    limit = max_instances(settings)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            props = (schema.get("components", {}).get("schemas", {})
                     .get("PredictRequest", {}).get("properties", {}))
            if "instances" in props:
                props["instances"]["maxItems"] = limit
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _consumer_options(settings: SettingsLike) -> dict[str, Any]:
    """Kafka security options for the feed's consumer, when the settings provide them."""
    build = getattr(settings.kafka, "client_kwargs", None)
    if not callable(build):
        return {}
    try:
        options = build()
    except TypeError:
        return {}
    return dict(options) if isinstance(options, dict) else {}


def _uvicorn_config(settings: SettingsLike, store: ModelStore | None) -> uvicorn.Config:
    host = getattr(settings.api, "host", "") or "127.0.0.1"
    app = create_app(settings, store)
    app.state.freeze_gc = True
    return uvicorn.Config(app, **UVICORN_OPTIONS, host=host, port=int(settings.api.port),
                          http=protocol_class())


#: How the API runs under uvicorn (``load_tests/bench_predict.py`` uses the same).
UVICORN_OPTIONS: dict[str, Any] = {
    "access_log": False,
    "log_level": "info",
    "lifespan": "on",
    "server_header": False,   # one header less to build per response
    "proxy_headers": False,   # no X-Forwarded-* rewriting per request: nothing reads it
}


async def serve(settings: SettingsLike, store: ModelStore | None = None) -> None:
    """Run the API under uvicorn on ``settings.api.host:port`` until stopped.

    With ``api.workers`` > 1 (and no ``store`` given) this process binds the socket and
    supervises that many serving processes sharing it (:func:`serve_processes`); it blocks
    the calling loop, which has nothing else to do.
    """
    workers = int(getattr(settings.api, "workers", 1) or 1)
    if workers > 1 and store is None:
        serve_processes(settings, workers)
        return
    await uvicorn.Server(_uvicorn_config(settings, store)).serve()


def _serve_child(settings: SettingsLike, sock: socket.socket) -> None:
    """One serving process: its own app, store and snapshot feed, on the shared socket."""
    async def main() -> None:
        await uvicorn.Server(_uvicorn_config(settings, None)).serve(sockets=[sock])

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket for serving processes to share (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve_processes(settings: SettingsLike, workers: int, *,
                    sock: socket.socket | None = None,
                    stop: threading.Event | None = None) -> None:
    """Serve with ``workers`` processes accepting on one socket until SIGTERM/SIGINT/``stop``.

    Each process builds its own app and follows the snapshot feed itself (as separate API
    replicas do), so all of them serve the newest model; the kernel spreads connections
    over the processes blocked in ``accept``.  A process that dies is restarted (at most
    once a second).  Prometheus counters are per process: a scrape reaches one of them.
    """
    own_socket = sock is None
    if sock is None:
        host = getattr(settings.api, "host", "") or "127.0.0.1"
        sock = bind_socket(host, int(settings.api.port))
    ctx = multiprocessing.get_context("spawn")  # fork after numba/threads is unsafe
    stopping = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: stopping.set())

    def start(i: int) -> Any:
        proc = ctx.Process(target=_serve_child, args=(settings, sock),
                           name=f"streamlearn-api-{i}", daemon=True)
        proc.start()
        return proc

    procs = [start(i) for i in range(workers)]
    log.info("serving on %s with %d processes: %s", sock.getsockname(), workers,
             [p.pid for p in procs])
    last_restart = 0.0
    try:
        while not stopping.wait(0.2):
            for i, proc in enumerate(procs):
                if proc.exitcode is not None and time.monotonic() - last_restart >= 1.0:
                    log.warning("serving process %d (pid %s) exited with %s; restarting",
                                i, proc.pid, proc.exitcode)
                    last_restart = time.monotonic()
                    procs[i] = start(i)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()  # uvicorn shuts down gracefully on SIGTERM
        deadline = time.monotonic() + 15.0
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if own_socket:
            sock.close()
