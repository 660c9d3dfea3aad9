"""What a model does when its concept drifts: alert, reset, or roll back.

The policy is the spec's ``drift_action``:

- ``alert``: nothing changes in the model; the drift is counted, logged and recorded.
- ``reset``: fresh weights, optimizer state and label statistics (what a new model of the
  same spec starts from); the scaler is kept, since the feature statistics are still
  right and re-learning them would add a transient of its own.
- ``rollback``: the newest in-memory checkpoint whose loss was good replaces the weights,
  optimizer state and label statistics (the scaler is kept, as for ``reset``).  A
  checkpoint is taken every ``checkpoint_every`` events, or every ``weights /
  COPY_PER_EVENT`` events when the model is larger (a copy of a 2**18-slot model took
  0.45 ms, as long as learning ~2,500 events: at one per 10,000 the copies took 18% of
  learning on a 7-field stream), with the mean batch loss of the period before it; the last
  ``keep`` are held (3 x 4 bytes x weights each).  "Good" is
  within ``tolerance`` of the lowest loss among them, preferring checkpoints whose period
  had no drift detection; checkpoints newer than the one restored are dropped.  They are
  the model's own copies (the worker never reads its own output topics back), so they
  cost no I/O and survive no restart.

Every action, including ``alert``, waits ``cooldown`` events after the previous one: one
burst of drifts cannot trigger a storm of resets (the detections it suppresses are
counted).  After ``reset`` or ``rollback`` the concept detector starts afresh (after a
warm-up), so the relearning transient is not read as a new drift, and the data-drift
reference is collected again one cool-down later.  An action requested by hand
(:meth:`DriftActions.apply`, from the admin endpoint through the worker) ignores the
cool-down and starts a new one.

Each action is logged, counted by kind and recorded in :attr:`DriftActions.history` with
the event count and the Kafka offsets (``topic:partition`` -> next offset) at which it
happened; the history travels in snapshots.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from streamlearn.models.online import OnlineModel

log = logging.getLogger("streamlearn.drift")

ACTIONS: tuple[str, ...] = ("alert", "reset", "rollback")
#: Events between two in-memory checkpoints (the rollback targets).
CHECKPOINT_EVERY = 10_000
#: Model values (weights and optimizer state) copied per learned event, at most: larger
#: models space their checkpoints further apart, so copies stay ~1% of learning time.
COPY_PER_EVENT = 4
#: Checkpoints held.
CHECKPOINT_KEEP = 4
#: Events the concept detector waits after a rollback (a reset waits its full warm-up).
ROLLBACK_WARMUP = 2_560
#: History entries kept (in memory and in snapshots).
HISTORY_KEEP = 50


class Checkpoint:
    """Weights, optimizer state, label statistics and mixture gap at ``at_event``."""

    __slots__ = ("arrays", "at_event", "clean", "loss", "step", "version")

    def __init__(self, arrays: dict[str, np.ndarray], at_event: int, version: int,
                 step: int, loss: float, clean: bool) -> None:
        self.arrays = arrays
        self.at_event = at_event
        self.version = version
        self.step = step
        self.loss = loss
        self.clean = clean


# Host arrays restored with the weights: the label statistics and the mixture gap.
_HOST = ("target", "mix")


class DriftActions:
    """The drift policy of one model, its cool-down, checkpoints and history.

    Examples
    --------
    >>> from streamlearn.config import ModelSpec
    >>> from streamlearn.models import OnlineModel
    >>> spec = ModelSpec(name="m", topic="t", numeric=("x",), hash_bits=2,
    ...                  drift_action="reset", drift_cooldown=1000)
    >>> model = OnlineModel(spec, device="cpu")
    >>> model.w[:] = 1.0
    >>> model.n_seen = 5000
    >>> model.drift_actions.after_step(model, drifted=True)
    'reset'
    >>> float(model.w.sum()), model.drift_actions.counts["reset"]
    (0.0, 1)
    >>> model.n_seen = 5500  # inside the cool-down: counted, not acted on
    >>> model.drift_actions.after_step(model, drifted=True) is None
    True
    >>> model.drift_actions.counts["suppressed"], model.drift_actions.history[0]["at_event"]
    (1, 5000)
    """

    def __init__(self, policy: str = "alert", cooldown: int = 50_000,
                 checkpoint_every: int = CHECKPOINT_EVERY, keep: int = CHECKPOINT_KEEP,
                 tolerance: float = 0.1) -> None:
        if policy not in ACTIONS:
            raise ValueError(f"unknown drift action {policy!r}; choose from {ACTIONS}")
        self.policy = policy
        self.cooldown = int(cooldown)
        self.checkpoint_every = int(checkpoint_every)
        self.keep = int(keep)
        self.tolerance = float(tolerance)
        self.counts: dict[str, int] = {a: 0 for a in (*ACTIONS, "suppressed", "loss_fell")}
        self.history: list[dict[str, Any]] = []
        self.last_action_at: int | None = None  # events seen at the last action
        self.checkpoints: collections.deque[Checkpoint] = collections.deque(maxlen=self.keep)
        self._period_from = (0.0, 0)  # the loss monitor's totals at the period's start
        self._period_drift = False
        self._next_checkpoint = self.checkpoint_every

    @classmethod
    def for_spec(cls, spec: Any) -> DriftActions:
        """The policy a :class:`~streamlearn.config.ModelSpec` names."""
        return cls(spec.drift_action, spec.drift_cooldown)

    # -- the learner's hook ---------------------------------------------------------
    def after_step(self, model: OnlineModel, drifted: bool) -> str | None:
        """Called by the model after each learning call: act on a drift, take checkpoints.

        Returns the action taken, if any.
        """
        taken = None
        if drifted:
            self._period_drift = True
            if model.concept_drift.last_direction == "down":
                self.counts["loss_fell"] += 1  # a falling loss is recorded, never acted on
            elif (self.last_action_at is not None
                    and model.n_seen - self.last_action_at < self.cooldown):
                self.counts["suppressed"] += 1
            else:
                taken = self.apply(model, self.policy, trigger="concept_drift")
        if model.n_seen >= self._next_checkpoint:
            self._checkpoint(model)
        return taken

    def catch_up(self, model: OnlineModel) -> str | None:
        """Replay the losses queued while river loaded, and act on a drift among them
        (the worker calls it on the learner thread when its stream has paused)."""
        if not model.concept_drift.pending:
            return None
        drifted = model.concept_drift.replay()
        return self.after_step(model, drifted) if drifted else None

    def apply(self, model: OnlineModel, action: str, trigger: str = "manual") -> str:
        """Take ``action`` now (on the thread that owns the model) and record it."""
        if action not in ACTIONS:
            raise ValueError(f"unknown drift action {action!r}; choose from {ACTIONS}")
        entry: dict[str, Any] = {
            "action": action, "trigger": trigger, "at_event": int(model.n_seen),
            "offsets": dict(model.offsets), "time": time.time(),
            "version": int(model.version), "loss": model.concept_drift.last_loss,
        }
        if action == "reset":
            self._reset(model)
        elif action == "rollback":
            restored = self._rollback(model)
            if restored is None:
                entry["result"] = "no checkpoint to roll back to: weights kept"
            else:
                entry.update(restored_event=restored.at_event, restored_version=restored.version,
                             restored_loss=restored.loss)
        if action != "alert":
            # A rollback's transient is the burst the restored weights now face: shorter.
            model.concept_drift.restart(None if action == "reset" else ROLLBACK_WARMUP)
            model.data_drift.rebase_in(self.cooldown)  # the shift stays visible meanwhile
        self.counts[action] += 1
        self.last_action_at = int(model.n_seen)
        self.history = [*self.history[-(HISTORY_KEEP - 1):], entry]
        log.warning("drift action %s on model %s (%s) at event %d, offsets %s", action,
                    model.spec.name, trigger, model.n_seen, entry["offsets"],
                    extra={"model": model.spec.name, "action": action, "trigger": trigger,
                           "at_event": model.n_seen})
        return action

    # -- actions ---------------------------------------------------------------------
    def _reset(self, model: OnlineModel) -> None:
        fresh = type(model)(model.spec, device=model.backend.name)
        for name in (*model.weight_names, *_HOST):
            setattr(model, name, getattr(fresh, name))
        model.step = 0
        self.checkpoints.clear()  # they belong to the old concept: never return there
        self._restart_period(model)

    def _rollback(self, model: OnlineModel) -> Checkpoint | None:
        if not self.checkpoints:
            return None
        best = min(c.loss for c in self.checkpoints)
        good = [c for c in self.checkpoints if c.loss <= best * (1.0 + self.tolerance)]
        clean = [c for c in good if c.clean]
        chosen = (clean or good)[-1]
        bk = model.backend
        for name, arr in chosen.arrays.items():
            value = arr.copy()
            setattr(model, name, value if name in _HOST else bk.asarray(value))
        model.step = chosen.step
        while self.checkpoints and self.checkpoints[-1] is not chosen:
            self.checkpoints.pop()
        self._restart_period(model)
        return chosen

    def _checkpoint(self, model: OnlineModel) -> None:
        h = model.backend.to_host
        arrays = {name: np.array(h(getattr(model, name)), copy=True)
                  for name in model.weight_names}
        arrays |= {name: np.array(getattr(model, name), copy=True) for name in _HOST}
        total, count = model.concept_drift.loss_total, model.concept_drift.loss_count
        n = count - self._period_from[1]
        loss = (total - self._period_from[0]) / n if n > 0 else float("inf")
        self.checkpoints.append(Checkpoint(arrays, int(model.n_seen), int(model.version),
                                           int(model.step), loss, not self._period_drift))
        self._restart_period(model)

    def _restart_period(self, model: OnlineModel) -> None:
        cd = model.concept_drift
        self._period_from, self._period_drift = (cd.loss_total, cd.loss_count), False
        copied = sum(getattr(model, name).size for name in model.weight_names)
        every = max(self.checkpoint_every, copied // COPY_PER_EVENT)
        self._next_checkpoint = int(model.n_seen) + every

    # -- reporting and state -------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """JSON-ready policy, counts, history (newest last) and checkpoints held."""
        return {
            "policy": self.policy, "cooldown_events": self.cooldown,
            "counts": dict(self.counts), "last_action_at_event": self.last_action_at,
            "history": list(self.history),
            "checkpoints": [{"at_event": c.at_event, "version": c.version,
                             "loss": None if c.loss == float("inf") else c.loss,
                             "clean": c.clean} for c in self.checkpoints],
        }

    def to_state(self) -> dict[str, Any]:
        """Counts and history for snapshots (checkpoints stay in memory)."""
        return {"policy": self.policy, "cooldown": self.cooldown, "counts": dict(self.counts),
                "history": list(self.history), "last_action_at": self.last_action_at}

    def restore(self, state: dict[str, Any]) -> None:
        """Take the counts and history of :meth:`to_state` (the policy stays the spec's);
        ``ValueError`` for negative counts or a history that is not a list of entries."""
        counts = {k: int(v) for k, v in dict(state.get("counts", {})).items()
                  if k in self.counts}
        last = state.get("last_action_at")
        last = None if last is None else int(last)
        history = state.get("history", [])
        if any(v < 0 for v in counts.values()) or (last is not None and last < 0):
            raise ValueError("drift actions state: counts and last_action_at must be >= 0")
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise ValueError("drift actions state: history is not a list of entries")
        self.counts.update(counts)
        self.history = history[-HISTORY_KEEP:]
        self.last_action_at = last
