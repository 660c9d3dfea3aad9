"""Shared fixtures: seeded data and the embedded broker."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from streamlearn.config import ModelSpec


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture
def fraud_spec() -> ModelSpec:
    return ModelSpec(
        name="fraud",
        topic="transactions",
        label="is_fraud",
        task="binary",
        numeric=("amount", "hour", "distance_km", "card_age_days", "tx_last_hour"),
        categorical=("merchant_category", "country", "channel"),
        hash_bits=12,
    )


@pytest.fixture(scope="session")
def broker() -> Iterator[str]:
    """A real Tansu broker on 127.0.0.1 for the whole session (Kafka protocol, no mock)."""
    from streamlearn.broker import EmbeddedBroker

    with EmbeddedBroker() as b:
        yield b.bootstrap
