"""Dependencies: what the routes need, taken from ``app.state`` (set by ``create_app``).

Settings are not built here.  ``create_app`` accepts any object shaped like
``streamlearn.settings.Settings`` (``.kafka.bootstrap``, ``.api.host``,
``.api.port``, ``.api.max_instances``); tests pass a small pydantic model or
use ``app.dependency_overrides``.  Optional, read with defaults when absent:
``.api.max_body_bytes``, ``.api.snapshot_dir``, ``.api.require_signed_snapshots``,
``.api.max_snapshot_bytes``, ``.kafka.models_topic``, ``.kafka.snapshot_key``,
``.kafka.client_kwargs()`` (TLS/SASL for the feed) and ``.specs`` (the configured
models a snapshot must match).
"""

from __future__ import annotations

from typing import Annotated, Protocol

from fastapi import Depends, Request
from prometheus_client import CollectorRegistry

from streamlearn.metrics import ApiMetrics
from streamlearn.services.api.feed import SnapshotFeed
from streamlearn.serving import ModelStore

DEFAULT_MAX_INSTANCES = 1000


class KafkaSettingsLike(Protocol):
    """The Kafka part the API reads."""

    @property
    def bootstrap(self) -> str: ...


class ApiSettingsLike(Protocol):
    """The HTTP part the API reads (``max_instances`` and ``snapshot_dir`` are optional)."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


class SettingsLike(Protocol):
    """Any settings object with ``kafka`` and ``api`` sections."""

    @property
    def kafka(self) -> KafkaSettingsLike: ...

    @property
    def api(self) -> ApiSettingsLike: ...


def max_instances(settings: SettingsLike) -> int:
    """``settings.api.max_instances``, or 1000 when the object has none."""
    return int(getattr(settings.api, "max_instances", DEFAULT_MAX_INSTANCES))


async def get_settings(request: Request) -> SettingsLike:
    """The settings ``create_app`` was given."""
    settings: SettingsLike = request.app.state.settings
    return settings


async def get_store(request: Request) -> ModelStore:
    """The model store."""
    store: ModelStore = request.app.state.store
    return store


async def get_metrics(request: Request) -> ApiMetrics:
    """The API's Prometheus instruments."""
    metrics: ApiMetrics = request.app.state.metrics
    return metrics


async def get_registry(request: Request) -> CollectorRegistry:
    """The registry /metrics renders."""
    registry: CollectorRegistry = request.app.state.registry
    return registry


async def get_feed(request: Request) -> SnapshotFeed | None:
    """The snapshot feed, or ``None`` when no bootstrap server is configured."""
    feed: SnapshotFeed | None = getattr(request.app.state, "feed", None)
    return feed


SettingsDep = Annotated[SettingsLike, Depends(get_settings)]
StoreDep = Annotated[ModelStore, Depends(get_store)]
MetricsDep = Annotated[ApiMetrics, Depends(get_metrics)]
RegistryDep = Annotated[CollectorRegistry, Depends(get_registry)]
FeedDep = Annotated[SnapshotFeed | None, Depends(get_feed)]
