"""Fixtures for the kernel tests."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh generator with a fixed seed per test."""
    return np.random.default_rng(20240521)
