"""Admin commands for drift actions, as they travel on ``kafka.commands_topic``.

The API publishes one JSON record per command (``POST /models/{name}/reset`` or
``/rollback``); every worker replica reads the topic from its end (no consumer group:
each replica must act on its own shard) and applies the action on the model's learner
thread (:meth:`streamlearn.drift.actions.DriftActions.apply`).  A command older than
``MAX_AGE_S`` when it arrives is ignored, so a worker that starts late never replays an
old reset.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, NamedTuple

import orjson

from streamlearn.drift.actions import ACTIONS

#: Commands older than this (by their ``issued_at``) are ignored on arrival.
MAX_AGE_S = 60.0
#: Largest command record read (anything bigger is not a command).
MAX_BYTES = 4096


class Command(NamedTuple):
    """One drift action requested by hand."""

    model: str
    action: str
    issued_at: float
    id: str

    def encode(self) -> bytes:
        """The record's value."""
        return orjson.dumps(self._asdict())


def new_command(model: str, action: str, now: float | None = None) -> Command:
    """A command with a fresh id.

    >>> c = new_command("fraud", "reset", now=100.0)
    >>> decode_command(c.encode(), now=110.0) == c
    True
    >>> decode_command(c.encode(), now=1000.0) is None  # too old: ignored
    True
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown drift action {action!r}; choose from {ACTIONS}")
    return Command(model, action, time.time() if now is None else now, uuid.uuid4().hex)


def decode_command(value: bytes | None, now: float | None = None) -> Command | None:
    """The command in a record, or None for anything malformed or too old."""
    if not value or len(value) > MAX_BYTES:
        return None
    try:
        d: Any = orjson.loads(value)
        cmd = Command(str(d["model"]), str(d["action"]), float(d["issued_at"]), str(d["id"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    now = time.time() if now is None else now
    if cmd.action not in ACTIONS or not now - MAX_AGE_S <= cmd.issued_at <= now + MAX_AGE_S:
        return None
    return cmd
