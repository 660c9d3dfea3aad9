"""Drift monitors: concept drift on the loss stream, data drift per feature."""

from streamlearn.drift.actions import DriftActions
from streamlearn.drift.concept import ConceptDriftMonitor
from streamlearn.drift.data import DataDriftMonitor

__all__ = ["ConceptDriftMonitor", "DataDriftMonitor", "DriftActions"]
