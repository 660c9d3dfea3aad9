"""Online models."""

from streamlearn.models.online import OnlineModel, StateError

__all__ = ["OnlineModel", "StateError"]
