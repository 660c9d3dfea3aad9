"""Process settings: ``streamlearn.toml`` (or ``$STREAMLEARN_CONFIG``) overridden by env.

Nested keys use ``__`` in environment variables, e.g. ``STREAMLEARN_KAFKA__BOOTSTRAP``.
Settings are built on demand (:func:`load_settings`), never at import time.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from streamlearn.config import ModelSpec

DEFAULT_CONFIG = "streamlearn.toml"


class SettingsError(ValueError):
    """Configuration that cannot be used; the message names the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaSettings(_Section):
    """Where the broker is.  An empty bootstrap starts the embedded Tansu broker."""

    bootstrap: str = ""
    embedded_port: int = Field(0, ge=0, le=65535, description="0 picks a free port")
    models_topic: str = "streamlearn.models"
    deadletter_topic: str = "streamlearn.deadletter"
    partitions: int = Field(4, ge=1, description="partitions for topics streamlearn creates")
    # Short consumer-group timeouts. None means: on for the embedded broker only.
    # Set true for a worker pointed at a Tansu started elsewhere (the demo does).
    fast_join: bool | None = None


class WorkerSettings(_Section):
    """Faust worker tuning."""

    app_id: str = "streamlearn-worker"
    replica_id: str = Field(default_factory=socket.gethostname)
    batch_within_s: float = Field(0.2, gt=0, description="max wait to fill a mini-batch")
    snapshot_interval_s: float = Field(0.5, gt=0)
    snapshot_dir: str = ".snapshots"
    # Fast group join on the embedded broker; a real Kafka wants Kafka's defaults.
    session_timeout_s: float | None = Field(None, gt=0)
    heartbeat_interval_s: float | None = Field(None, gt=0)
    emit_predictions: bool = True
    log_level: str = "WARNING"


class ApiSettings(_Section):
    """HTTP service."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_instances: int = Field(1000, ge=1)
    snapshot_dir: str = ""


class ModelSettings(_Section):
    """One ``[[model]]`` table; see :class:`streamlearn.config.ModelSpec`."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    topic: str
    id_field: str = "event_id"
    label: str = "label"
    task: Literal["binary", "regression", "ranking"] = "binary"
    numeric: list[str] = []
    categorical: list[str] = []
    hash_bits: int = Field(18, ge=1, le=26)
    optimizer: Literal["sgd", "adagrad", "ftrl"] = "adagrad"
    learning_rate: float = Field(0.05, gt=0)
    l1: float = Field(0.0, ge=0)
    l2: float = Field(1e-6, ge=0)
    power_t: float = Field(0.25, ge=0)
    ftrl_beta: float = Field(1.0, ge=0)
    batch_size: int = Field(256, ge=1, le=1_000_000)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    fm_factors: int = Field(8, ge=1, le=256)
    rolling_window: int = Field(10_000, ge=10)

    @field_validator("categorical")
    @classmethod
    def _disjoint(cls, v: list[str], info: Any) -> list[str]:
        overlap = set(v) & set(info.data.get("numeric", []))
        if overlap:
            raise ValueError(f"fields both numeric and categorical: {sorted(overlap)}")
        return v

    def to_spec(self) -> ModelSpec:
        """The frozen core spec."""
        return ModelSpec.from_dict(self.model_dump())


class Settings(BaseSettings):
    """All of streamlearn's settings for one process."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMLEARN_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    kafka: KafkaSettings = KafkaSettings()
    worker: WorkerSettings = WorkerSettings()
    api: ApiSettings = ApiSettings()
    model: list[ModelSettings] = []

    @field_validator("model")
    @classmethod
    def _unique_names(cls, v: list[ModelSettings]) -> list[ModelSettings]:
        names = [m.name for m in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate model names: {sorted(dup)}")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = os.environ.get("STREAMLEARN_CONFIG", DEFAULT_CONFIG)
        toml = TomlConfigSettingsSource(settings_cls, toml_file=path)
        return (init_settings, env_settings, toml)

    @property
    def specs(self) -> list[ModelSpec]:
        """The model specs as frozen core objects."""
        return [m.to_spec() for m in self.model]

    @property
    def fast_join(self) -> bool:
        """Whether to use the short group timeouts that suit Tansu."""
        return self.embedded if self.kafka.fast_join is None else self.kafka.fast_join

    @property
    def embedded(self) -> bool:
        """True when streamlearn must start its own broker."""
        return not self.kafka.bootstrap


def load_settings(config: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Build settings, turning validation errors into one message per offending key.

    Examples
    --------
    >>> s = load_settings(model=[{"name": "m", "topic": "t", "numeric": ["x"]}])
    >>> s.specs[0].name, s.embedded
    ('m', True)
    >>> load_settings(model=[{"name": "m", "topic": "t", "task": "nope"}])
    Traceback (most recent call last):
    ...
    streamlearn.settings.SettingsError: invalid configuration:
      model.0.task: Input should be 'binary', 'regression' or 'ranking' (got 'nope')
    """
    previous = os.environ.get("STREAMLEARN_CONFIG")
    if config is not None:
        if not Path(config).exists():
            raise SettingsError(f"config file {config} does not exist")
        os.environ["STREAMLEARN_CONFIG"] = str(config)
    try:
        settings = Settings(**overrides)
        settings.specs  # noqa: B018 - run the core spec checks now
        return settings
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            got = f" (got {err['input']!r})" if "input" in err and err["type"] != "missing" else ""
            lines.append(f"  {loc}: {err['msg']}{got}")
        raise SettingsError("invalid configuration:\n" + "\n".join(lines)) from None
    except ValueError as exc:
        raise SettingsError(f"invalid configuration: {exc}") from None
    finally:
        if config is not None:
            if previous is None:
                os.environ.pop("STREAMLEARN_CONFIG", None)
            else:
                os.environ["STREAMLEARN_CONFIG"] = previous
