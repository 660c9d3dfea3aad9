"""Process settings: ``streamlearn.toml`` (or ``$STREAMLEARN_CONFIG``) overridden by env.

Nested keys use ``__`` in environment variables, e.g. ``STREAMLEARN_KAFKA__BOOTSTRAP``.
Settings are built on demand (:func:`load_settings`), never at import time.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
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
    # Admin commands (drift reset/rollback) from the API to every worker replica.
    commands_topic: str = "streamlearn.commands"
    partitions: int = Field(4, ge=1, description="partitions for topics streamlearn creates")
    # Short consumer-group timeouts. None means: on for the embedded broker only.
    # Set true for a worker pointed at a Tansu started elsewhere (the demo does).
    fast_join: bool | None = None
    # Security: one set of settings for every Kafka client (worker, producer, API feed).
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_username: str = ""
    sasl_password: SecretStr = SecretStr("")
    ssl_cafile: str = Field("", description="CA bundle (PEM); empty: the system's CAs")
    ssl_certfile: str = Field("", description="client certificate (PEM), for mutual TLS")
    ssl_keyfile: str = ""
    ssl_key_password: SecretStr = SecretStr("")
    ssl_check_hostname: bool = True
    # HMAC-SHA256 key the workers sign snapshots with and the API verifies (never logged).
    snapshot_key: SecretStr = SecretStr("")

    @model_validator(mode="after")
    def _security_complete(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL") and not self.sasl_username:
            raise ValueError(f"security_protocol {self.security_protocol} needs sasl_username "
                             "and sasl_password")
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ValueError("ssl_keyfile needs ssl_certfile")
        return self

    @property
    def uses_ssl(self) -> bool:
        """Whether connections are TLS."""
        return self.security_protocol in ("SSL", "SASL_SSL")

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for the configured files (None without TLS).

        Examples
        --------
        >>> KafkaSettings().ssl_context() is None
        True
        >>> ctx = KafkaSettings(security_protocol="SSL", ssl_check_hostname=False).ssl_context()
        >>> ctx.verify_mode, ctx.check_hostname
        (<VerifyMode.CERT_REQUIRED: 2>, False)
        """
        if not self.uses_ssl:
            return None
        context = ssl.create_default_context(cafile=self.ssl_cafile or None)
        context.check_hostname = self.ssl_check_hostname
        if self.ssl_certfile:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile or None,
                                    self.ssl_key_password.get_secret_value() or None)
        return context

    def client_kwargs(self) -> dict[str, Any]:
        """Security keyword arguments for any aiokafka client (consumer, producer, admin).

        Examples
        --------
        >>> KafkaSettings().client_kwargs()
        {'security_protocol': 'PLAINTEXT'}
        >>> kw = KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-256",
        ...                    sasl_username="u", sasl_password="p").client_kwargs()
        >>> kw["sasl_mechanism"], kw["sasl_plain_username"], kw["sasl_plain_password"]
        ('SCRAM-SHA-256', 'u', 'p')
        """
        kwargs: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.uses_ssl:
            kwargs["ssl_context"] = self.ssl_context()
        if self.security_protocol.startswith("SASL"):
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password.get_secret_value()
        return kwargs


class WorkerSettings(_Section):
    """Faust worker tuning."""

    app_id: str = "streamlearn-worker"
    # Names this replica's shard; empty: a persistent id kept in ``snapshot_dir/replica-id``
    # (stable across restarts, whatever the hostname).
    replica_id: str = ""
    # Replicas adopt the merged model at least this often (data-parallel training).
    merge_interval_s: float = Field(2.0, gt=0)
    # A shard not refreshed for this long leaves the merge (and the served model).
    stale_after_s: float = Field(15.0, gt=0)
    batch_within_s: float = Field(0.2, gt=0, description="max wait to fill a mini-batch")
    snapshot_interval_s: float = Field(0.25, gt=0)
    snapshot_dir: str = ".snapshots"
    # Fast group join on the embedded broker; a real Kafka wants Kafka's defaults.
    session_timeout_s: float | None = Field(None, gt=0)
    heartbeat_interval_s: float | None = Field(None, gt=0)
    emit_predictions: bool = True
    log_level: str = "WARNING"
    # A local checkpoint failing this long stops the worker (nothing is committed meanwhile).
    checkpoint_failure_exit_s: float = Field(60.0, gt=0)
    # Input held until its checkpoint; past this, the worker stops consuming (back-pressure).
    max_unacked_mb: float = Field(256.0, gt=0)
    # At start, read the models topic for a snapshot newer than the local checkpoint.
    restore_from_topic: bool = True


class ApiSettings(_Section):
    """HTTP service."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_instances: int = Field(1000, ge=1)
    snapshot_dir: str = ""
    # Larger request bodies get 413 before they are read whole.
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    # None: signatures required exactly when kafka.snapshot_key is set; true: a missing
    # key is a start-up error (production); false: unsigned snapshots are accepted too.
    require_signed_snapshots: bool | None = None
    # Largest snapshot record accepted from the models topic (compressed, as received).
    max_snapshot_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    # Bearer token of the admin endpoints (POST /models/{name}/reset|rollback); empty:
    # they answer 401 to everyone.  Never logged.
    admin_token: SecretStr = SecretStr("")
    # Serving processes sharing host:port (one socket); each follows the snapshot feed.
    workers: int = Field(1, ge=1, le=256)
    # Valid predict requests answered before FastAPI (same answers; services/api/fast.py).
    fast_predict: bool = True


class AggregateSettings(_Section):
    """One ``[[model.aggregate]]`` table; see :class:`streamlearn.config.AggregateSpec`."""

    entity: str = Field(min_length=1)
    field: str = Field(min_length=1)
    windows: list[str] = ["1h", "24h", "7d"]
    stats: list[Literal["count", "sum", "mean"]] = ["count", "sum", "mean"]


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
    optimizer: Literal["sgd", "adagrad", "ftrl"] = "ftrl"
    learning_rate: float | None = Field(None, gt=0)
    l1: float = Field(0.0, ge=0)
    l2: float = Field(1e-6, ge=0)
    power_t: float = Field(0.0, ge=0)
    ftrl_beta: float = Field(1.0, ge=0)
    horizon: int = Field(2_000, ge=0, le=10**12)  # 0, or >= 2 (ModelSpec says why)
    batch_size: int = Field(256, ge=1, le=1_000_000)
    update_rows: int = Field(1, ge=1)
    label_prior: bool = True
    average: bool = True  # binary: score with the weights' running average too
    normalized: bool = True
    norm_power: float = Field(0.75, ge=0, le=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    fm_factors: int = Field(8, ge=1, le=256)
    fm_init_std: float = Field(0.1, ge=0)
    rolling_window: int = Field(10_000, ge=10)
    top_k_per_day: int = Field(100, ge=1)
    drift_detector: Literal["adwin", "page_hinkley", "kswin"] = "page_hinkley"
    drift_params: dict[str, float | int | str | bool] = {}
    drift_action: Literal["alert", "reset", "rollback"] = "alert"
    drift_cooldown: int = Field(50_000, ge=0)
    drift_reference_size: int = Field(5_000, ge=1)
    drift_threshold: float = Field(0.25, gt=0)
    # Decision bands on the score: block >= decision_block, review >= decision_review.
    decision_block: float | None = Field(None, allow_inf_nan=False)
    decision_review: float | None = Field(None, allow_inf_nan=False)
    # Reason codes (top-K fields) in each JSON prediction record; 0: none.
    reasons_in_records: int = Field(0, ge=0, le=1000)
    # In-stream entity features, ``[[model.aggregate]]`` tables (README "Entity aggregates").
    aggregate: list[AggregateSettings] = []
    time_field: str = "ts"
    aggregate_tiles: int = Field(8, ge=1, le=64)
    max_entities: int = Field(100_000, ge=1, le=10_000_000)
    # Delayed labels on ``<name>.labels`` (README "Delayed labels"); 0 s: none kept.
    label_ttl_s: float = Field(86_400.0, ge=0, allow_inf_nan=False)
    max_pending: int = Field(100_000, ge=0, le=10_000_000)

    @model_validator(mode="after")
    def _bands_ordered(self) -> ModelSettings:
        if (self.decision_block is not None and self.decision_review is not None
                and self.decision_block < self.decision_review):
            raise ValueError("decision_block must be >= decision_review")
        return self

    @field_validator("categorical")
    @classmethod
    def _disjoint(cls, v: list[str], info: Any) -> list[str]:
        overlap = set(v) & set(info.data.get("numeric", []))
        if overlap:
            raise ValueError(f"fields both numeric and categorical: {sorted(overlap)}")
        return v

    def to_spec(self) -> ModelSpec:
        """The frozen core spec."""
        d = self.model_dump()
        d["aggregates"] = d.pop("aggregate")
        return ModelSpec.from_dict(d)


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


#: Key names whose values are never printed (passwords, keys, tokens, credentials).
_SECRET_WORDS = ("password", "secret", "token", "credential", "key")


def _secret_key(name: object) -> bool:
    return any(word in str(name).lower() for word in _SECRET_WORDS)


def _shown(loc: tuple[Any, ...], value: Any) -> str:
    """``repr`` of an offending input, with secret values masked wherever they sit.

    Examples
    --------
    >>> _shown(("kafka", "sasl_password"), "hunter2")
    "'***'"
    >>> _shown(("kafka",), {"bootstrap": "b:9092", "sasl_password": "hunter2"})
    "{'bootstrap': 'b:9092', 'sasl_password': '***'}"
    """
    if loc and _secret_key(loc[-1]):
        return "'***'"
    return repr(_masked(value))


def _masked(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: "***" if _secret_key(k) else _masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_masked(v) for v in value)
    if isinstance(value, SecretStr):
        return "***"
    return value


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
            # An unknown key may be a misspelled secret: its value is never shown.
            got = (f" (got {_shown(err['loc'], err['input'])})" if "input" in err
                   and err["type"] not in ("missing", "extra_forbidden") else "")
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
