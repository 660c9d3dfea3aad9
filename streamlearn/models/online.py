"""Online models: logistic and linear regression, and a factorization machine.

One class serves every task; the task picks the loss and whether pairwise
factors exist.  All arithmetic runs in the kernels of the chosen backend.
"""

from __future__ import annotations

import time
import zlib
from typing import Any, NamedTuple

import numpy as np

from streamlearn.aggregates import EntityAggregates
from streamlearn.backends import Backend, get_backend
from streamlearn.config import ModelSpec
from streamlearn.drift import ConceptDriftMonitor, DataDriftMonitor, DriftActions
from streamlearn.features import FeatureBatch, InvalidEvent, Vectorizer, csr_rows
from streamlearn.kernels import codes
from streamlearn.labels import Joined, PendingLabels
from streamlearn.models import ftrl, fused
from streamlearn.models.average import (
    avg_rate,
    mix_learn,
    mix_margins,
    new_mix,
    served_weights,
    share_of,
)
from streamlearn.models.target import (
    T_COUNT,
    T_M2,
    new_target,
    prior_delta,
    shift_bias,
    shift_bias_to_prior,
    standardize,
    target_scale,
    target_update,
)
from streamlearn.prequential import PrequentialMetrics
from streamlearn.scaler import RunningStandardScaler

STATE_KIND = "streamlearn.model"
STATE_VERSION = 3
"""2: label statistics (``target``) and per-window steps. A version-1 state keeps its
rule (``label_prior = False``): its weights were learned without the prior.
3: the missing block (:attr:`ModelSpec.first_slot`); an older state gets it at zero, so
its scores are unchanged (:func:`upgraded`)."""

_LOSS = {
    "binary": codes.LOSS_LOGISTIC,
    "ranking": codes.LOSS_LOGISTIC,
    "regression": codes.LOSS_SQUARED,
}
_OPT = {"sgd": codes.OPT_SGD, "adagrad": codes.OPT_ADAGRAD, "ftrl": codes.OPT_FTRL}
#: Where each optimizer keeps its squared-gradient sums (weights, then FM factors); SGD: none.
_SQUARED_SUMS = {"adagrad": ("s1", "s1v"), "ftrl": ("s2", "s2v")}
_NO_FACTORS = np.zeros((0, 0), dtype=np.float32)  # the FM arguments of a linear model
_NO_AVERAGE = np.zeros(0)  # the running average of a model without one
_KERNEL = ("C", "W")  # np.require: the arrays the compiled step takes


class StateError(ValueError):
    """A state dict that does not describe a streamlearn model."""


def upgraded(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` in this version's weight layout: a state written before the missing block
    (version 2 or older) gets it, ``d`` zero rows after the numeric block, where the hashed
    slots move up from. A missing value scored 0 before, and its zero weight scores 0 now,
    with no learning yet (FTRL: ``z = n = 0``). The replica merge takes shards through
    this too, so replicas mid-upgrade still merge. Other fields are left to
    :meth:`OnlineModel.from_state`; a payload that is not a state is returned as it is."""
    if (not isinstance(state, dict) or int(state.get("state_version", 0)) >= 3
            or not isinstance(state.get("weights"), dict)
            or not isinstance(state.get("spec"), dict)):
        return state
    d = ModelSpec.from_dict(state["spec"]).n_numeric
    weights = {}
    for name, arr in state["weights"].items():
        a = np.asarray(arr)
        weights[name] = _with_missing_block(a, d, 0.0) if a.ndim and a.shape[0] > d else a
    return {**state, "weights": weights, "state_version": 3}


def _with_missing_block(a: np.ndarray, d: int, block: Any) -> np.ndarray:
    """``a`` (rows: the numeric block, then the rest) with the ``d`` rows ``block`` (a
    value or an array) inserted after its first ``d``: the layout of ModelSpec.first_slot."""
    return np.insert(a, [d] * d, block, axis=0)


def _sigmoid(m: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-clip(m, -50, 50)))``, evaluated in float64, returned in ``m``'s dtype.

    Compiled: a batch of 256 costs ~3 us against ~15 us for the five NumPy ufunc calls.
    """
    out = np.empty_like(m)
    fused.sigmoid_into(m, out)  # 1-D margins
    return out


class Steps(NamedTuple):
    """What :meth:`OnlineModel.process_many` did, chunk by chunk."""

    scores: np.ndarray  # one per row, before learning from it
    versions: np.ndarray  # the model version that scored each chunk
    learned: np.ndarray  # labelled rows learned from, per chunk


class OnlineModel:
    """Prequential online model over one :class:`ModelSpec`.

    :meth:`process` is the worker's step: update the scaler, score every event
    with the current weights, then learn from the labelled ones.

    Examples
    --------
    >>> spec = ModelSpec(name="m", topic="t", numeric=("x",), categorical=("c",),
    ...                  label="y", hash_bits=4)
    >>> model = OnlineModel(spec, device="cpu")
    >>> rng = np.random.default_rng(0)
    >>> xs = rng.normal(size=2000)
    >>> events = [{"event_id": i, "x": float(x), "c": "a", "y": int(x > 0)}
    ...           for i, x in enumerate(xs)]
    >>> for start in range(0, 2000, 100):
    ...     batch, _ = model.vectorizer.transform_many(events[start:start + 100])
    ...     _ = model.process(batch)
    >>> model.version, model.n_learned
    (20, 2000)
    >>> model.metrics.report()["auc"] > 0.95
    True
    >>> restored = OnlineModel.from_state(model.to_state())
    >>> batch, _ = model.vectorizer.transform_many(events[:5])
    >>> bool(np.array_equal(restored.predict_many(batch), model.predict_many(batch)))
    True
    """

    def __init__(self, spec: ModelSpec, *, device: str | None = None) -> None:
        self.spec = spec
        self.backend: Backend = get_backend(device or spec.device, spec.n_weights)
        self.vectorizer = Vectorizer(spec)
        self.scaler = RunningStandardScaler(spec.n_numeric)
        self.metrics = PrequentialMetrics(spec.task, spec.rolling_window, spec.top_k_per_day)
        self.concept_drift = ConceptDriftMonitor.for_spec(spec)
        self.data_drift = DataDriftMonitor.for_spec(spec)
        self.drift_actions = DriftActions.for_spec(spec)
        # Entity aggregates (features computed in the stream) and events waiting for labels.
        self.aggregates = EntityAggregates(spec) if spec.aggregates else None
        self.pending = PendingLabels(spec)
        self._loss = _LOSS[spec.task]
        self._opt = _OPT[spec.optimizer]
        lr, slot_lr = spec.learning_rates
        self._hyper = np.array(  # kernels.codes.H_*
            [lr, spec.l1, spec.l2, spec.power_t, spec.ftrl_beta, spec.gradient_cap, slot_lr,
             spec.first_slot],
            dtype=np.float64,
        )
        self.target = new_target()  # label statistics: see streamlearn.models.target
        d = spec.n_weights + 1
        bk = self.backend
        self.w, self.s1, self.s2 = bk.zeros(d), bk.zeros(d), bk.zeros(d)
        self._grad = bk.zeros(d)
        # The weights' running average and the experts' log-loss gap (.average).
        self.averaged = spec.averaged
        # float64: an update of rate 1/horizon would round away in float32 (and the
        # compiled loop skips the conversions).
        self.avg: Any = bk.zeros(d, np.float64) if self.averaged else _NO_AVERAGE
        self.mix = new_mix()
        self._inv_horizon = 1.0 / spec.horizon if spec.horizon else 0.0
        self._served: tuple[tuple[float, ...], np.ndarray] | None = None
        # What a dense step touches: the numeric block and the bias (not the missing block).
        dense_coords = np.append(np.arange(spec.n_numeric), d - 1) if self.averaged else []
        self._all_coords = bk.asarray(np.asarray(dense_coords, dtype=np.int64))
        self.is_fm = spec.task == "ranking"
        # Without categorical fields every row touches every numeric weight: the dense
        # kernels have the CSR kernels' semantics then (lazy regularization visits all
        # coordinates anyway) and need no index arrays. A row that misses a value takes
        # CSR rows still, whose entries hold its missing-value indicators. The FM keeps CSR.
        self.dense = not spec.categorical and not self.is_fm
        if self.is_fm:
            # Seeded by name, so every replica starts from the same factors.
            rng = np.random.default_rng(zlib.crc32(spec.name.encode()))
            k = spec.fm_factors
            # The missing block's factors are drawn after the others, so that every other
            # weight starts from the factors it had before the block existed.
            d = spec.n_numeric
            v0 = rng.normal(0.0, spec.fm_init_std, size=(spec.n_weights - d, k))
            v0 = _with_missing_block(v0, d, rng.normal(0.0, spec.fm_init_std, size=(d, k)))
            v0 = v0.astype(np.float32)
            self.V = bk.asarray(v0)
            self.s1v, self.s2v = bk.zeros(v0.shape), bk.zeros(v0.shape)
            self._gv = bk.zeros(v0.shape)
        self.step = 0
        self.version = 0
        self.n_seen = 0
        self.n_learned = 0
        self.n_imputed = np.zeros(spec.n_numeric, dtype=np.int64)
        self.offsets: dict[str, int] = {}
        self.updated_at = time.time()

    @property
    def weight_names(self) -> tuple[str, ...]:
        """The model's weight-shaped arrays (attributes; keys of the state's ``weights``)."""
        return (("w", "s1", "s2") + (("avg",) if self.averaged else ())
                + (("V", "s1v", "s2v") if self.is_fm else ()))

    # -- scoring ---------------------------------------------------------------
    def _margins(self, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray,
                 w: Any = None, dtype: Any = np.float32) -> np.ndarray:
        """Raw margins of CSR rows with the weights ``w`` (default: the model's)."""
        out = np.empty(len(indptr) - 1, dtype=dtype)
        k = self.backend.kernels
        if self.is_fm:
            k.fm_predict_csr(indptr, indices, values, self.w, self.V, out)
        else:
            k.linear_predict_csr(indptr, indices, values, self.w if w is None else w, out)
        return out

    def _margins_dense(self, z: Any, w: Any = None, dtype: Any = np.float32) -> np.ndarray:
        out = np.empty(z.shape[0], dtype=dtype)
        self.backend.kernels.linear_predict_dense(z, self.w if w is None else w, out)
        return out

    def _expert_margins(self, rows: Any, dense: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Margins of dense or CSR ``rows`` with the weights, and for an averaged model
        with their average too, both float64 (its mixture weighs their log losses)."""
        if not self.averaged:
            return (self._margins_dense(rows) if dense else self._margins(*rows)), None
        if dense:
            return (self._margins_dense(rows, dtype=np.float64),
                    self._margins_dense(rows, self.avg, dtype=np.float64))
        return (self._margins(*rows, dtype=np.float64),
                self._margins(*rows, w=self.avg, dtype=np.float64))

    def _scores(self, margins: np.ndarray, margins_avg: np.ndarray | None,
                share: float | None = None) -> np.ndarray:
        """Scores from the weights' margins, mixed with the average's when it has some
        (``share``: the weights' part; default: the current mixture's)."""
        if margins_avg is None:
            return self._link(margins)
        mixed = np.empty(margins.shape[0], dtype=np.float32)
        mix_margins(margins, margins_avg, share_of(self.mix) if share is None else share,
                    mixed)
        return self._link(mixed)

    def served_weights(self) -> np.ndarray:
        """The one linear model that scores, on the host, read only: ``w``, or for an
        averaged model ``share * w + (1 - share) * avg`` (:mod:`.average`); for reason
        codes and explanations. Cached until the model learns (a serving model never
        does), so a request does not pay a pass over every weight."""
        host = self.backend.to_host
        if not self.averaged:
            return self.w if isinstance(self.w, np.ndarray) else host(self.w)
        key = (self.step, self.version, self.n_learned, *self.mix.tolist())
        if self._served is None or self._served[0] != key:
            self._served = (key, served_weights(host(self.w), host(self.avg), self.mix))
        return self._served[1]

    def _link(self, margins: np.ndarray) -> np.ndarray:
        if self.spec.task != "regression":
            return _sigmoid(margins)
        if not self.spec.label_prior:
            return margins
        mean, std = target_scale(self.target)  # the kernels learn standardized targets
        return (mean + std * margins.astype(np.float64)).astype(np.float32)

    def fill_aggregates(self, batch: FeatureBatch, *, update: bool) -> None:
        """Compute the batch's aggregate columns in place (:mod:`streamlearn.aggregates`).

        ``update``: the worker's step (the events join their entities' windows); else
        serving, from the same state, unchanged.  A batch is filled once (``aux`` is then
        None), so the reason codes read the values that were scored.
        """
        if batch.aux is None or self.aggregates is None:
            return
        batch.numeric[:, len(self.spec.numeric):] = self.aggregates.features(batch.aux,
                                                                            update=update)
        batch.aux = None

    def _raw(self, X: np.ndarray) -> np.ndarray:
        """The numeric fields' columns of ``X`` (its aggregate columns left out)."""
        return X if self.aggregates is None else np.ascontiguousarray(
            X[:, : len(self.spec.numeric)])

    def predict_many(self, batch: FeatureBatch) -> np.ndarray:
        """Scores for a batch without learning: probabilities, or values for regression."""
        if len(batch) == 0:
            return np.empty(0, dtype=np.float32)
        self.fill_aggregates(batch, update=False)
        z = self.scaler.transform_many(batch.numeric)
        if not self.dense:
            return self._scores(*self._expert_margins(csr_rows(z, batch.hashed), False))
        m, m_avg = self._expert_margins(self.backend.asarray(z), True)
        missing = np.flatnonzero(np.isnan(z).any(axis=1))
        if len(missing):  # those rows' CSR margins, as process scores them
            rows_m, rows_avg = self._expert_margins(
                csr_rows(z[missing], batch.hashed[missing]), False)
            m[missing] = rows_m
            if m_avg is not None:
                m_avg[missing] = rows_avg
        return self._scores(m, m_avg)

    def predict_events(self, events: list[dict[str, Any]]) -> np.ndarray:
        """Score event dicts; raise ``InvalidEvent`` naming the first bad field."""
        return self.score_events(events)[1]

    def score_events(self, events: list[dict[str, Any]]) -> tuple[FeatureBatch, np.ndarray]:
        """:meth:`predict_events`, also returning the vectorized batch (for reason codes)."""
        batch, rejects = self.vectorizer.transform_many(events)
        if rejects:
            index, reason = rejects[0]
            raise InvalidEvent(f"instance {index}: {reason}")
        return batch, self.predict_many(batch)

    # -- learning --------------------------------------------------------------
    def process(self, batch: FeatureBatch, *,
                arrival_scores: np.ndarray | None = None) -> np.ndarray:
        """Prequential step over one mini-batch: score each window of ``update_rows`` rows,
        then learn one optimizer step from its labelled rows (the composed reference path).
        ``arrival_scores``: see :meth:`process_many`."""
        n = len(batch)
        if n == 0:
            return np.empty(0, dtype=np.float32)
        self.fill_aggregates(batch, update=True)
        X = batch.numeric
        scaler = self.scaler
        joined = arrival_scores is not None
        if not joined:
            count0 = scaler.count.copy()
            scaler.learn_many(X)
            # Rows the scaler did not count were missing (their missing-value weights score them).
            np.add(self.n_imputed, n - (scaler.count - count0), out=self.n_imputed,
                   casting="unsafe")
            self.data_drift.update(self._raw(X), None, batch.hashed)
        z = scaler.transform_many(X)
        # A dense model's window with a missing value takes CSR rows (its indicators).
        missing = np.isnan(z).any(axis=1) if self.dense else None
        if self.dense:
            rows: Any = self.backend.asarray(z)  # one host->device copy on CUDA
        if missing is None or missing.any():
            indptr, indices, values = csr_rows(z, batch.hashed)
        scores = np.empty(n, dtype=np.float32)
        labels = batch.labels
        logistic = self._loss == codes.LOSS_LOGISTIC
        prior = self.spec.label_prior
        total, n_labelled = 0.0, 0
        share = float(share_of(self.mix))  # the mixture is fixed for the mini-batch
        names = _SQUARED_SUMS.get(self.spec.optimizer)
        sums = getattr(self, names[0]) if names else self.s1[:0]  # SGD keeps none
        for a in range(0, n, self.spec.update_rows):
            b = min(a + self.spec.update_rows, n)
            if prior and logistic:
                self._shift_bias_to_prior()
            dense = missing is not None and not missing[a:b].any()
            if dense:
                window: Any = rows[a:b]
            else:
                lo, hi = indptr[a], indptr[b]
                window = (indptr[a : b + 1] - lo, indices[lo:hi], values[lo:hi])
            m, m_avg = self._expert_margins(window, dense)
            scores[a:b] = self._scores(m, m_avg, share)
            keep = np.flatnonzero(~np.isnan(labels[a:b]))
            if len(keep) == 0:
                continue
            y = np.ascontiguousarray(labels[a:b][keep])
            if m_avg is not None:
                mix_learn(self.mix, m[keep], m_avg[keep], y)
            if prior:
                target_update(self.target, y)
                if not logistic:
                    y = standardize(y, *target_scale(self.target))
            if len(keep) < b - a:  # rare: a partly labelled window
                window = (
                    self.backend.asarray(z[a:b][keep]) if dense
                    else csr_rows(z[a:b][keep], batch.hashed[a:b][keep])
                )
            rate = avg_rate(self.step, self._inv_horizon) if self.averaged else 0.0
            total += self._learn_dense(window, y) if dense else self._learn_csr(window, y)
            if self.averaged:  # the coordinates this step touched, and the bias
                touched = (self._all_coords if dense else
                           np.append(np.unique(window[1]), self.w.shape[0] - 1))
                self.backend.kernels.average_update(touched, self.w, self.avg, rate, sums)
            n_labelled += len(y)
        if not joined:
            self.n_seen += n
        if n_labelled:
            self.version += 1
            self.n_learned += n_labelled
            self.updated_at = time.time()
            given = scores if arrival_scores is None else arrival_scores
            self.metrics.update(labels[~np.isnan(labels)], given[~np.isnan(labels)])
            drifted = self.concept_drift.update(total / n_labelled, self.n_seen, n_labelled)
            self.drift_actions.after_step(self, drifted)
        return scores

    def _shift_bias_to_prior(self) -> None:
        if self.backend.name == "cpu":
            shift_bias_to_prior(self.target, self.w, self.s1, self.s2, self.avg, self._opt,
                                self._hyper)
            return
        delta = prior_delta(self.target)
        if delta:  # 1-element copies: the bias, its optimizer state (and its average)
            tail = [a[-1:] for a in (self.w, self.s1, self.s2)]
            if self.averaged:
                tail.append(self.avg[-1:])
            host = [self.backend.to_host(t) for t in tail]
            shift_bias(*host[:3], host[3] if self.averaged else _NO_AVERAGE, delta, self._opt,
                       self._hyper)
            for t, h in zip(tail, host, strict=True):
                t.copy_to_device(h)

    def process_many(self, batch: FeatureBatch, batch_size: int | None = None, *,
                     arrival_scores: np.ndarray | None = None) -> Steps:
        """:meth:`process` on each ``batch_size``-row slice of ``batch`` in turn.

        On the CPU the slices run in one compiled, GIL-free call (:mod:`.fused`); the
        result is the same as calling :meth:`process` slice by slice (tested).

        ``arrival_scores``: the rows are events seen before, whose labels came later
        (:meth:`learn_joined`); they are learned, the scaler and the seen-event counters
        stay as they are (the events were counted on arrival), and the prequential
        metrics take these scores, the ones the events got when they arrived.
        """
        size = batch_size or self.spec.batch_size
        n = len(batch)
        n_chunks = -(-n // size)
        self.fill_aggregates(batch, update=True)
        if self.backend.name != "cpu":
            return self._process_chunks(batch, size, arrival_scores)
        joined = arrival_scores is not None  # the scaler counted these rows on arrival
        scores = np.empty(n, dtype=np.float32)
        chunk_loss = np.zeros(n_chunks)
        learned = np.zeros(n_chunks, dtype=np.int64)
        if n == 0:
            return Steps(scores, np.zeros(0, dtype=np.int64), learned)
        # C-contiguous and writable (copied only if not): numba builds a read-only array
        # apart, and the vectorizer's columns and a batch record's labels are views of
        # bytes, so each path had its own build of the per-event loop (~6 s each on an
        # empty kernel cache, mid-stream), not the one the worker's warm-up loaded.
        X = np.require(batch.numeric, np.float64, _KERNEL)
        labels = np.require(batch.labels, np.float32, _KERNEL)
        scaler = self.scaler
        count0 = scaler.count.copy()
        kind = fused.KIND_FM if self.is_fm else fused.KIND_DENSE if self.dense else fused.KIND_CSR
        fm = (self.V, self.s1v, self.s2v, self._gv) if self.is_fm else (_NO_FACTORS,) * 4
        step = fused.prequential_chunks(
            X, np.require(batch.hashed, np.int64, _KERNEL), labels, size,
            self.spec.update_rows, kind, self.spec.task != "regression", self.spec.label_prior,
            not joined, scaler.count, scaler.mean, scaler.m2, self.target,
            self.w, self.s1, self.s2, self._grad, *fm, self.avg, self.mix, self._inv_horizon,
            self._loss, self._opt, self._hyper, self.step,
            scores, chunk_loss, learned,
        )
        if not joined:
            scaler.count_changed()
            np.add(self.n_imputed, n - (scaler.count - count0), out=self.n_imputed,
                   casting="unsafe")
            self.data_drift.update(self._raw(X), size, batch.hashed)
        # Small arrays (one entry per chunk) and few numpy calls: this tail runs per
        # record, and on a narrow stream its calls cost as much as a tenth of learning.
        stepped = learned > 0
        versions = self.version + np.cumsum(stepped) - stepped
        counts = learned.tolist()
        n_labelled = sum(counts)
        n_steps = n_chunks - counts.count(0)
        self.step = step
        self.version += n_steps
        self.n_learned += n_labelled
        shown = arrival_scores if joined else scores
        if n_labelled == n:  # every row labelled (NaN labels are the unlabelled ones)
            self.metrics.update(labels, shown)
        else:
            mask = ~np.isnan(labels)
            self.metrics.update(labels[mask], shown[mask])
        losses = chunk_loss.tolist()
        done = [c for c in range(n_chunks) if counts[c]]
        drifted = self.concept_drift.update_many(
            [losses[c] / counts[c] for c in done],
            [self.n_seen + min((c + 1) * size, n) for c in done], [counts[c] for c in done])
        if not joined:
            self.n_seen += n
        if n_steps:
            self.updated_at = time.time()
            self.drift_actions.after_step(self, drifted)
        return Steps(scores, versions, learned)

    def learn_joined(self, joined: Joined) -> Steps:
        """Learn the rows whose labels arrived after them (:mod:`streamlearn.labels`)."""
        batch = FeatureBatch(joined.numeric, joined.hashed, joined.labels, joined.ids)
        return self.process_many(batch, arrival_scores=joined.scores)

    def _process_chunks(self, batch: FeatureBatch, size: int,
                        arrival_scores: np.ndarray | None = None) -> Steps:
        """:meth:`process_many` as a loop (the CUDA backend launches kernels per chunk)."""
        n = len(batch)
        scores = np.empty(n, dtype=np.float32)
        versions = []
        learned = []
        for lo in range(0, n, size):
            chunk = batch.take(np.arange(lo, min(lo + size, n)))
            versions.append(self.version)
            given = None if arrival_scores is None else arrival_scores[lo : lo + len(chunk)]
            scores[lo : lo + len(chunk)] = self.process(chunk, arrival_scores=given)
            learned.append(int(chunk.has_label.sum()))
        return Steps(scores, np.array(versions, dtype=np.int64), np.array(learned, dtype=np.int64))

    def _learn_dense(self, z: Any, y: np.ndarray) -> float:
        loss = self.backend.kernels.linear_learn_dense(
            z, y, self.w, self.s1, self.s2, self._loss, self._opt, self._hyper, self.step
        )
        return self._learned(len(y), loss)

    def _learn_csr(self, csr: tuple[np.ndarray, np.ndarray, np.ndarray], y: np.ndarray) -> float:
        k = self.backend.kernels
        if self.is_fm:
            loss = k.fm_learn_csr(
                *csr,
                y,
                self.w,
                self.V,
                self.s1,
                self.s2,
                self.s1v,
                self.s2v,
                self._loss,
                self._opt,
                self._hyper,
                self.step,
                self._grad,
                self._gv,
            )
        else:
            loss = k.linear_learn_csr(
                *csr,
                y,
                self.w,
                self.s1,
                self.s2,
                self._loss,
                self._opt,
                self._hyper,
                self.step,
                self._grad,
            )
        return self._learned(len(y), loss)

    def _learned(self, n: int, loss: float) -> float:
        self.step += 1  # an optimizer step; the version counts learning mini-batches
        return float(loss)

    # -- explanation -----------------------------------------------------------
    def explain_one(self, event: dict[str, Any]) -> dict[str, Any]:
        """Additive contributions that sum with the bias to the margin."""
        batch, rejects = self.vectorizer.transform_many([event])
        if rejects:
            raise InvalidEvent(rejects[0][1])
        self.fill_aggregates(batch, update=False)
        z = self.scaler.transform_many(batch.numeric)
        _, indices, values = csr_rows(z, batch.hashed)
        w = self.served_weights()
        contrib = w[indices] * values
        if self.is_fm:
            v = self.backend.to_host(self.V)[indices] * values[:, None]
            total = v.sum(axis=0)
            contrib = contrib + 0.5 * ((v * (total - v)).sum(axis=1))
        names = self.vectorizer.feature_names(event)
        bias = float(w[-1])
        margin = bias + float(contrib.sum())
        score = float(self._link(np.array([margin], dtype=np.float32))[0])
        if self.spec.task == "regression" and self.spec.label_prior:
            # Report in target units: the kernels learn standardized targets.
            mean, std = target_scale(self.target)
            contrib = contrib * std
            bias = mean + std * bias
            margin = mean + std * margin
        return {
            "bias": bias,
            "contributions": {n: float(c) for n, c in zip(names, contrib, strict=True)},
            "margin": margin,
            "score": score,
        }

    def take_partition(self, section: dict[str, Any]) -> None:
        """Adopt a partition's entities and waiting events from its previous owner
        (:func:`streamlearn.replicas.partition_section`); they join those held here."""
        if section.get("pending") is not None:
            self.pending.load(section["pending"], replace=False)
        if self.aggregates is not None and section.get("aggregates") is not None:
            self.aggregates.load(section["aggregates"], replace=False)

    # -- state -----------------------------------------------------------------
    def drift_report(self) -> dict[str, Any]:
        """Concept drift on the loss stream, data drift per feature, and drift actions."""
        return {"concept": self.concept_drift.report(), "data": self.data_drift.report(),
                "actions": self.drift_actions.report()}

    def info(self) -> dict[str, Any]:
        """Summary for the API and logs."""
        return {
            "name": self.spec.name,
            "task": self.spec.task,
            "version": self.version,
            "events_seen": self.n_seen,
            "events_learned": self.n_learned,
            "device": self.backend.name,
            "features": {
                "numeric": list(self.spec.numeric),
                "categorical": list(self.spec.categorical),
                "hash_bits": self.spec.hash_bits,
                "aggregates": None if self.aggregates is None else self.aggregates.report(),
            },
            "labels": self.pending.report(),
            "imputed": dict(zip(self.spec.numeric_features, self.n_imputed.tolist(),
                                strict=True)),
            "average_share": float(share_of(self.mix)) if self.averaged else None,
            "metrics": self.metrics.report(),
            "updated_at": self.updated_at,
        }

    def to_state(self) -> dict[str, Any]:
        """Everything needed to resume: weights, optimizer state, scaler, counters, offsets."""
        h = self.backend.to_host
        weights = {name: h(getattr(self, name)) for name in self.weight_names}
        return {
            "kind": STATE_KIND,
            "state_version": STATE_VERSION,
            "spec": self.spec.to_dict(),
            "version": self.version,
            "step": self.step,
            "n_seen": self.n_seen,
            "n_learned": self.n_learned,
            "n_imputed": self.n_imputed.copy(),
            "target": self.target.copy(),
            **({"mix": self.mix.copy()} if self.averaged else {}),
            "offsets": dict(self.offsets),
            "updated_at": self.updated_at,
            "weights": weights,
            "scaler": self.scaler.to_state(),
            "metrics": self.metrics.to_state(),
            "drift": {"concept": self.concept_drift.to_state(), "data": self.data_drift.to_state(),
                      "actions": self.drift_actions.to_state()},
            "pending": self.pending.to_state(),
            **({} if self.aggregates is None else {"aggregates": self.aggregates.to_state()}),
        }

    def _keep_ftrl_weights(self) -> None:
        """Keep restored FTRL weights under this code's learning rates.

        FTRL stores ``z`` and derives each weight through the rate, so a state learned
        under other rates (an upgrade that changed a default step) would see its weights
        jump by the ratio of the rates at their next update; ``z`` is re-derived instead
        (:func:`.ftrl.keep_weights`). A state learned under these rates is left as it is.
        """
        bk, spec = self.backend, self.spec
        blocks = [("w", "s1", "s2", ftrl.weight_rates(spec), True)]
        if self.is_fm:  # the factors take the step of the numeric block
            blocks.append(("V", "s1v", "s2v", spec.learning_rates[0], False))
        for wk, zk, nk, rates, bias in blocks:
            z = bk.to_host(getattr(self, zk)).astype(np.float64)
            n = bk.to_host(getattr(self, nk)).astype(np.float64)
            if ftrl.keep_weights(bk.to_host(getattr(self, wk)), z, n, rates, spec.l1,
                                 spec.l2, spec.ftrl_beta, bias):
                setattr(self, zk, bk.asarray(z.astype(np.float32)))

    @classmethod
    def from_state(cls, state: dict[str, Any], *, device: str | None = None,
                   serving: bool = False) -> OnlineModel:
        """Rebuild a model; raise :class:`StateError` for a foreign or newer payload.

        ``serving``: for the API, which scores and reports; the events waiting for labels
        are counted, not loaded."""
        if not isinstance(state, dict) or state.get("kind") != STATE_KIND:
            raise StateError("payload is not a streamlearn model state")
        if int(state.get("state_version", 0)) > STATE_VERSION:
            raise StateError(f"model state version {state['state_version']} is too new")
        try:
            version = int(state.get("state_version", 0))
            state = upgraded(state)
            spec_dict = state["spec"]
            if version < 2:  # keep the rule its weights learned by
                spec_dict = dict(spec_dict, label_prior=False,
                                 update_rows=spec_dict.get("batch_size", 256))
            # A state written before the memory cap takes the default ``horizon`` (the
            # spec fills it in), so an upgrade keeps its model: sums already past the cap
            # stop growing, so its steps stop shrinking where they stand.
            spec = ModelSpec.from_dict(spec_dict)
            model = cls(spec, device=device or "cpu")
            bk = model.backend
            weights = state["weights"]
            if model.averaged and "avg" not in weights:  # written before averaging
                weights = dict(weights, avg=weights["w"])
            # Sums of squared gradients: AdaGrad's in s1, FTRL's n in s2 (never negative).
            squares = _SQUARED_SUMS.get(spec.optimizer, ())
            for name in model.weight_names:
                arr = np.asarray(weights[name], dtype=np.float64 if name == "avg" else np.float32)
                if arr.shape != bk.to_host(getattr(model, name)).shape:
                    raise StateError(f"weights {name!r} have shape {arr.shape}, spec disagrees")
                if not np.isfinite(arr).all() or (name in squares and (arr < 0).any()):
                    raise StateError(f"weights {name!r} hold NaN, infinite or negative values")
                setattr(model, name, bk.asarray(arr))
            if spec.optimizer == "ftrl" and not serving:  # serving never learns
                model._keep_ftrl_weights()
            scaler = RunningStandardScaler.from_state(state["scaler"])
            width = model.scaler.mean.shape  # the compiled step reads these unchecked
            if scaler.mean.shape != width:  # (count and m2: the scaler checks they match)
                raise StateError(f"scaler statistics do not have the spec's shape {width}")
            model.scaler = scaler
            model.metrics = PrequentialMetrics.from_state(state["metrics"])
            drift = state.get("drift")  # absent in states written before drift monitors
            if drift:
                model.concept_drift = ConceptDriftMonitor.from_state(drift["concept"])
                data = DataDriftMonitor.from_state(drift["data"])
                if (data.features, data.categorical) != (list(spec.numeric),
                                                         list(spec.categorical)):
                    raise StateError("data drift state monitors other fields than the spec")
                model.data_drift = data
                model.drift_actions.restore(drift.get("actions", {}))
            model.version = int(state["version"])
            model.step = int(state["step"])
            model.n_seen = int(state["n_seen"])
            model.n_learned = int(state["n_learned"])
            model.n_imputed = np.asarray(state["n_imputed"], dtype=np.int64).copy()
            if "target" in state:
                target = np.asarray(state["target"], dtype=np.float64)
                if target.shape != model.target.shape:
                    raise StateError(f"target statistics have shape {target.shape}")
                if (not np.isfinite(target).all() or target[T_COUNT] < 0
                        or target[T_M2] < 0):
                    raise StateError("target statistics are not finite counts and moments")
                model.target = target.copy()
            if model.averaged and "mix" in state:
                mix = np.asarray(state["mix"], dtype=np.float64)
                if mix.shape != model.mix.shape or not np.isfinite(mix).all():
                    raise StateError(f"mixture gap is not {model.mix.shape[0]} finite value")
                model.mix = mix.copy()
            model.offsets = {str(k): int(v) for k, v in state.get("offsets", {}).items()}
            if state.get("pending") is not None:  # serving needs its counters only
                model.pending.load(state["pending"], rows=not serving)
            if model.aggregates is not None and state.get("aggregates") is not None:
                model.aggregates.load(state["aggregates"])
            model.updated_at = float(state.get("updated_at", time.time()))
        except StateError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"model state is missing or has a bad field: {exc}") from exc
        return model
