"""Data-parallel training: merge replica shards so that nothing is counted twice.

Pure: states in, states out (the dicts of :meth:`OnlineModel.to_state`), no I/O.

The rule
--------
The merged models form a chain ``M_0`` (the fresh model of the spec), ``M_1``, ... Each
replica remembers the merged model it last adopted, its *base* ``B = M_m``, and ships its
full state ``S`` tagged with the base's id (``state["merge"]``). Its *delta* is ``S - B``:
exactly what it learned since it adopted ``B``, from events no other replica saw.

``M_{m+1} = merge(M_m, shards)`` takes the shards whose base is ``M_m`` and

* **sums** the deltas of additive statistics: FTRL's ``z`` and ``n`` (``s1``, ``s2``),
  AdaGrad's squared-gradient sums, and (exactly, by Chan's formulas) the scaler's and
  the labels' count/mean/M2, and the counters;
* **averages** the deltas of SGD/AdaGrad weights, of FM factors, of the weights'
  running average and of the mixture gap (:mod:`streamlearn.models.average`),
  weighted by the labelled events each replica learned since its base (FedAvg);
* for FTRL **recomputes** ``w`` (and ``V``) from the merged ``z``, ``n``:
  ``w = -(z - sign(z) l1) / ((beta + sqrt(n)) / lr + l2)``, 0 when ``|z| <= l1``,
  no L1/L2 on the bias; coordinates nobody ever touched (``n = 0``) keep the base value
  (FM factors start random);
* brings the summed squared-gradient sums (FTRL's ``n``, AdaGrad's) back under the memory
  cap (``ModelSpec.gradient_cap``): each replica capped its own, their summed deltas can
  pass it; FTRL's ``z`` is re-derived there so that ``w`` stays as merged;
* shifts the logistic bias to the merged label prior: each shard's bias is first
  brought back to the base's prior offset (``target[3]``), then the merged bias is
  moved to the prior of the merged label statistics (:mod:`streamlearn.models.target`).

``merged["merge"]["included"]`` records, per replica, which shipped state (base id and
ship number) a merge in the chain last counted.  A replica that adopts ``M`` *rebases*
(:func:`rebase`): ``L' = M + (L - R)`` where ``R`` is the state it shipped that ``M``
counted (it keeps its last few shipped states), or its base when ``M`` counted nothing
of it since that base.  So its next delta holds exactly what no merge has counted yet.
A shard on an older base waits until its replica adopts (nothing lost: its delta then
moves onto the new base); a stale shard is left out of a merge, and only its part not
yet counted is missing from the served model until it comes back.

Known limits
------------
* FTRL and AdaGrad accumulators summed over replicas shrink every replica's steps as if
  one learner had seen all events; ``z`` sums the replicas' ``g - sigma w`` terms, each
  computed against its own ``w``, so a merged ``w`` differs from sequential FTRL's
  by the staleness of the replicas' weights (small within a short merge interval).
* FedAvg of SGD/AdaGrad weights and FM factors is an average of the replicas'
  moves, not their sum: with K replicas on one stream each move counts 1/K.
  FM factors are non-convex: averaging moves of different replicas can cancel.
* A replica whose counted shipped state it no longer holds (a restart, more ships
  than it keeps) rebases on the oldest it holds, or adopts ``M`` outright: it loses
  (never double-counts) what it learned in between.
* Two mergers racing (during a membership change) fork the chain for a moment: merged
  ids carry the merger; shards of the losing fork wait for their replica to adopt.
* Drift monitors and prequential windows are not additive: the merged model takes the
  drift state of the shard with the most events and pools the metric windows.

Replica-local state
-------------------
Entity aggregates and events waiting for labels are not merged: each belongs to the
partition its events came from, and lives with the replica that consumes it (the merged
model carries none).  When a partition moves, the replica that takes it over adopts that
partition's part of the previous owner's newest shard (:func:`partition_section`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamlearn.config import ModelSpec
from streamlearn.models import ftrl
from streamlearn.models.average import new_mix
from streamlearn.scaler import Stats, chan_merge

#: Key suffix of the merged model on the models topic: ``<model>/@merged``.
MERGED = "@merged"
#: Initial base id: the fresh model of the spec.
ROOT_ID = ""

_ADDITIVE = ("s1", "s2", "s1v", "s2v")
_AVERAGED = ("w", "avg", "V")  # avg: the weights' running average (models.average)
_COUNTERS = ("version", "step", "n_seen", "n_learned")


def meta(state: Mapping[str, Any]) -> dict[str, Any]:
    """The ``merge`` entry of a state (defaults for states written before replicas merged)."""
    m = state.get("merge")
    return dict(m) if isinstance(m, Mapping) else {}


def base_id(state: Mapping[str, Any]) -> str:
    """Id of the merged model a shard's delta is relative to (``""``: the fresh model)."""
    return str(meta(state).get("base_id", ROOT_ID))


def merged_id(state: Mapping[str, Any] | None) -> str:
    """Id of a merged state (``""`` for none: the fresh model)."""
    return ROOT_ID if state is None else str(meta(state).get("merged_id", ROOT_ID))


def merged_version(state: Mapping[str, Any] | None) -> int:
    """Position of a merged state in the chain (0: the fresh model)."""
    return 0 if state is None else int(meta(state).get("merged_version", 0))


def _spec(state: Mapping[str, Any]) -> dict[str, Any]:
    return dict(state["spec"])


def _has_prior_offset(spec: Mapping[str, Any]) -> bool:
    return spec.get("task") != "regression" and bool(spec.get("label_prior", True))


def subtract_stats(count: np.ndarray, mean: np.ndarray, m2: np.ndarray, count_b: np.ndarray,
                   mean_b: np.ndarray, m2_b: np.ndarray) -> tuple[np.ndarray, ...]:
    """Statistics of the values a running (count, mean, M2) gained since ``*_b`` (Chan, inverted).

    Examples
    --------
    >>> a, b = np.array([1.0, 2.0]), np.array([3.0, 5.0, 7.0])
    >>> both = np.concatenate([a, b])
    >>> st = lambda x: (np.array([len(x)], float), np.array([x.mean()]),
    ...                 np.array([((x - x.mean()) ** 2).sum()]))
    >>> n, m, q = subtract_stats(*st(both), *st(a))
    >>> float(n[0]), float(m[0]), round(float(q[0]), 9)
    (3.0, 5.0, 8.0)
    """
    count, mean, m2 = (np.asarray(x, dtype=np.float64) for x in (count, mean, m2))
    count_b, mean_b, m2_b = (np.asarray(x, dtype=np.float64) for x in (count_b, mean_b, m2_b))
    n_d = np.maximum(count - count_b, 0.0)
    safe_d = np.where(n_d > 0, n_d, 1.0)
    safe = np.where(count > 0, count, 1.0)
    mean_d = np.where(n_d > 0, (count * mean - count_b * mean_b) / safe_d, 0.0)
    delta = mean_d - mean_b
    m2_d = np.where(n_d > 0, m2 - m2_b - delta * delta * count_b * n_d / safe, 0.0)
    return n_d, mean_d, np.maximum(m2_d, 0.0)


def combine_stats(parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chan's merge of several (count, mean, M2) triples (exact, order-free)."""
    merged: Stats = tuple(np.array(x, dtype=np.float64) for x in parts[0])  # type: ignore[assignment]
    for part in parts[1:]:
        merged = chan_merge(merged, part)
    return merged


@dataclass
class Delta:
    """What one replica learned between a reference state and its current state."""

    arrays: dict[str, np.ndarray]  # float64 differences, bias brought to the ref's prior
    scaler: tuple[np.ndarray, np.ndarray, np.ndarray]
    target: tuple[np.ndarray, np.ndarray, np.ndarray]
    counters: dict[str, int]
    n_imputed: np.ndarray
    events: int  # labelled events learned since the reference
    mix: np.ndarray  # the averaged models' mixture gap (zero for the others)


def _bias_to_offset(state: Mapping[str, Any], arrays: dict[str, np.ndarray], offset: float,
                    lr: float) -> None:
    """Move ``arrays``' bias from the state's prior offset to ``offset`` (as shift_bias)."""
    spec = _spec(state)
    if not _has_prior_offset(spec):
        return
    d = offset - float(np.asarray(state["target"], dtype=np.float64)[3])
    if d == 0.0:
        return
    if spec.get("optimizer") == "ftrl":
        n = arrays["s2"][-1]
        arrays["s1"][-1] -= d * (float(spec.get("ftrl_beta", 1.0)) + math.sqrt(max(n, 0.0))) / lr
    arrays["w"][-1] += d
    if "avg" in arrays:  # the averaged bias follows the prior as the bias does
        arrays["avg"][-1] += d


def delta(state: Mapping[str, Any], ref: Mapping[str, Any]) -> Delta:
    """``state - ref``: weights, optimizer state, statistics and counters."""
    lr = ModelSpec.from_dict(_spec(state)).learning_rates[0]  # the bias's
    offset = float(np.asarray(ref["target"], dtype=np.float64)[3])
    mine = {k: np.asarray(v, dtype=np.float64).copy() for k, v in state["weights"].items()}
    _bias_to_offset(state, mine, offset, lr)
    arrays = {}
    for k, v in mine.items():
        # A reference written before averaged scoring has no ``avg``: its average is its
        # weights, as OnlineModel.from_state restores it.
        r = np.asarray(ref["weights"].get(k, ref["weights"]["w"]) if k == "avg"
                       else ref["weights"][k], dtype=np.float64)
        if r.shape != v.shape:
            raise ValueError(f"weights {k!r}: shapes {v.shape} and {r.shape} differ")
        arrays[k] = v - r
    sc, rs = state["scaler"], ref["scaler"]
    scaler = subtract_stats(sc["count"], sc["mean"], sc["m2"], rs["count"], rs["mean"],
                            rs["m2"])
    t, tr = (np.asarray(x["target"], dtype=np.float64) for x in (state, ref))
    target = subtract_stats(t[:1], t[1:2], t[2:3], tr[:1], tr[1:2], tr[2:3])
    counters = {k: int(state[k]) - int(ref[k]) for k in _COUNTERS}
    imputed = (np.asarray(state["n_imputed"], dtype=np.int64)
               - np.asarray(ref["n_imputed"], dtype=np.int64))
    mix = mix_of(state) - mix_of(ref)
    return Delta(arrays, scaler, target, counters, imputed, max(counters["n_learned"], 0), mix)


def mix_of(state: Mapping[str, Any]) -> np.ndarray:
    """A state's mixture gap (:mod:`streamlearn.models.average`); a state without one
    (not averaged, or written before averaged scoring) has the fresh gap."""
    return np.asarray(state.get("mix", new_mix()), dtype=np.float64)


def _ftrl_weights(z: np.ndarray, n: np.ndarray, lr: float | np.ndarray, l1: float, l2: float,
                  beta: float, base: np.ndarray, bias: bool) -> np.ndarray:
    """FTRL's weights of the summed ``(z, n)``; a weight never touched keeps the base's
    (FM factors start random)."""
    return np.where(n > 0, ftrl.weights_of(z, n, lr, l1, l2, beta, bias), base)


def apply(base: Mapping[str, Any], deltas: Sequence[Delta],
          alphas: Sequence[float] | None = None) -> dict[str, Any]:
    """``base`` plus ``deltas``: sums for additive statistics, ``alphas``-weighted sums
    (FedAvg; default: by events) for SGD/AdaGrad weights and FM factors, FTRL weights
    recomputed.  Returns a new state (drift, metrics and offsets as in ``base``)."""
    spec = _spec(base)
    if alphas is None:
        ev = np.array([float(d.events) for d in deltas])
        alphas = (ev / ev.sum()).tolist() if ev.sum() > 0 else [1.0 / max(len(deltas), 1)] * len(
            deltas)
    out = dict(base)
    base_weights = dict(base["weights"])
    if deltas and "avg" not in base_weights and all("avg" in d.arrays for d in deltas):
        # a base written before averaged scoring: its average is its weights (float64)
        base_weights["avg"] = np.asarray(base_weights["w"], dtype=np.float64)
    weights: dict[str, np.ndarray] = {}
    for k, b in base_weights.items():
        acc = np.array(b, dtype=np.float64, copy=True)
        if k in _AVERAGED:
            for a, d in zip(alphas, deltas, strict=True):
                acc += a * d.arrays[k]
        else:
            for d in deltas:
                acc += d.arrays[k]
        weights[k] = acc
    parsed = ModelSpec.from_dict(spec)  # once per merge: the step, its cap, FTRL's terms
    lr, cap = parsed.learning_rates[0], parsed.gradient_cap  # cap: the memory cap (inf: none)
    if parsed.optimizer == "ftrl":
        l1, l2, beta = float(parsed.l1), float(parsed.l2), float(parsed.ftrl_beta)
        rates = {"w": ftrl.weight_rates(parsed), "V": lr}
        for wk, zk, nk, bias in (("w", "s1", "s2", True), ("V", "s1v", "s2v", False)):
            if wk in weights:
                r = rates[wk]
                weights[wk] = _ftrl_weights(weights[zk], weights[nk], r, l1, l2, beta,
                                            np.asarray(base["weights"][wk], np.float64), bias)
                ftrl.cap_sums(weights[wk], weights[zk], weights[nk], cap, r, l1, l2, beta, bias)
    elif parsed.optimizer == "adagrad":
        for k in ("s1", "s1v"):
            if k in weights:
                np.minimum(weights[k], cap, out=weights[k])
    bs = base["scaler"]
    count, mean, m2 = combine_stats([(bs["count"], bs["mean"], bs["m2"])]
                                    + [d.scaler for d in deltas])
    tb = np.asarray(base["target"], dtype=np.float64)
    tc, tm, tq = combine_stats([(tb[:1], tb[1:2], tb[2:3])] + [d.target for d in deltas])
    target = np.array([tc[0], tm[0], tq[0], tb[3]])
    if _has_prior_offset(spec):  # follow the merged base rate, as the learner would
        p = (target[1] * target[0] + 0.5) / (target[0] + 1.0)
        _bias_to_offset({"spec": spec, "target": [0, 0, 0, tb[3]]}, weights,
                        math.log(p / (1.0 - p)), lr)
        target[3] = math.log(p / (1.0 - p))
    for k in _COUNTERS:
        out[k] = int(base[k]) + sum(d.counters[k] for d in deltas)
    out["n_imputed"] = np.asarray(base["n_imputed"], dtype=np.int64) + sum(
        (d.n_imputed for d in deltas), np.zeros_like(np.asarray(base["n_imputed"], np.int64)))
    out["weights"] = {k: v.astype(np.asarray(base_weights[k]).dtype)
                      for k, v in weights.items()}
    out["scaler"] = {"count": count, "mean": mean, "m2": m2}
    out["target"] = target
    if "avg" in weights:
        out["mix"] = mix_of(base) + sum(a * d.mix for a, d in zip(alphas, deltas, strict=True))
    return out


def pool_metrics(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool prequential windows: each shard keeps a share proportional to its size."""
    window = int(parts[0]["window"])
    sizes = np.array([len(p["y"]) for p in parts], dtype=np.float64)
    total = sizes.sum()
    keep = sizes if total <= window else np.floor(sizes * (window / total))
    def tail(name: str, dtype: Any) -> np.ndarray:
        return np.concatenate([np.asarray(p[name], dtype=dtype)[len(p[name]) - int(k):]
                               for p, k in zip(parts, keep, strict=True)])

    out = {"task": parts[0]["task"], "window": window, "n": sum(int(p["n"]) for p in parts),
           "y": tail("y", np.float32), "p": tail("p", np.float32)}
    if "top_k" in parts[0]:
        out["top_k"] = int(parts[0]["top_k"])
    if all(p.get("day") is not None and len(p["day"]) == len(p["y"]) for p in parts):
        out["day"] = tail("day", np.int32)  # so precision at top-k per day survives a merge
    return out


def moved(state: Mapping[str, Any], ref: Mapping[str, Any]) -> bool:
    """Whether ``state`` holds learning that ``ref`` lacks: events seen (the scaler moves
    on unlabelled ones too) or labels learned (delayed labels join without a new event)."""
    return any(int(state[k]) > int(ref[k]) for k in ("n_seen", "n_learned"))


def eligible(base: Mapping[str, Any], shards: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Replicas whose shard's delta is relative to ``base`` (sorted)."""
    bid = merged_id(base) if meta(base) else ROOT_ID
    return sorted(r for r, s in shards.items() if base_id(s) == bid)


def merge(base: Mapping[str, Any], shards: Mapping[str, Mapping[str, Any]], *,
          merged_by: str, now: float) -> dict[str, Any]:
    """The next merged model: ``base`` plus the deltas of the shards based on it.

    ``base`` is the newest merged state, or the fresh model's state (``merge`` entry
    absent) before the first merge; ``shards`` maps replica id to its latest (fresh)
    state. Shards on another base are left out (see the module docstring).
    """
    names = eligible(base, shards)
    deltas = [delta(shards[r], base) for r in names]
    out = apply(base, deltas)
    parts = [shards[r] for r in names]
    if parts:
        out["metrics"] = pool_metrics([dict(p["metrics"]) for p in parts])
        richest = max(parts, key=lambda p: int(p["n_learned"]))
        if "drift" in richest:
            out["drift"] = richest["drift"]
        offsets: dict[str, int] = {str(k): int(v) for k, v in base.get("offsets", {}).items()}
        for p in parts:
            for k, v in p.get("offsets", {}).items():
                offsets[k] = max(int(v), offsets.get(k, -1))
        out["offsets"] = offsets
        out["updated_at"] = max(float(p.get("updated_at", 0.0)) for p in parts)
    m = meta(base)
    version = int(m.get("merged_version", 0)) + 1
    included = {str(k): dict(v) for k, v in dict(m.get("included", {})).items()}
    bid = merged_id(base) if m else ROOT_ID
    for r in names:
        included[r] = {"base_id": bid, "ship": int(meta(shards[r]).get("ship", 0))}
    out["merge"] = {"merged_version": version, "merged_id": f"{version}@{merged_by}",
                    "merged_by": merged_by, "merged_at": now, "included": included,
                    "replicas": names}
    out["replica"] = MERGED
    # Replica-local: events waiting for labels and entity aggregates live with the
    # partitions they came from (streamlearn.labels, streamlearn.aggregates).
    for key in ("telemetry", "observed", "worker", "pending", "aggregates"):
        out.pop(key, None)
    return out


def rebase(local: Mapping[str, Any], merged: Mapping[str, Any], replica: str,
           shipped: Mapping[int, Mapping[str, Any]], base: Mapping[str, Any] | None
           ) -> tuple[dict[str, Any], str]:
    """A replica's state after adopting ``merged``: ``merged + (local - R)``.

    ``R`` is the shipped state ``merged`` counted (from ``shipped``: ship number ->
    state), else ``base`` (the replica's current base) when nothing since it was
    counted. Returns the new state (the replica's own drift, metrics, offsets and
    telemetry kept) and how it rebased: ``exact``, ``oldest`` or ``dropped`` (the
    un-counted delta could not be recovered; see the limits in the module docstring).
    """
    inc = dict(meta(merged).get("included", {})).get(replica)
    mine = base_id(local)
    ref: Mapping[str, Any] | None = None
    how = "exact"
    if inc is not None and str(inc.get("base_id")) == mine:
        ref = shipped.get(int(inc.get("ship", -1)))
        if ref is None and shipped:
            ref, how = shipped[min(shipped)], "oldest"
    else:
        ref = base
    if ref is None:
        ref, how = local, "dropped"
    new = apply(merged, [delta(local, ref)], [1.0])
    for k in ("metrics", "drift", "offsets", "updated_at", "telemetry", "replica"):
        if k in local:
            new[k] = local[k]
    m = meta(local)
    m.update(base_id=merged_id(merged), base_version=merged_version(merged),
             adopted_version=merged_version(merged))
    new["merge"] = m
    return new, how


def partition_section(spec: ModelSpec, state: Mapping[str, Any], topic: str,
                      partition: int) -> dict[str, Any] | None:
    """What ``state`` (a sibling's shard) holds for ``partition`` of ``topic``: the
    entities and waiting events a replica taking the partition over adopts, and the
    offset they are current to; None when it holds nothing of it.  ``ValueError`` for a
    shard that does not fit ``spec``."""
    from streamlearn.aggregates import EntityAggregates
    from streamlearn.labels import PendingLabels

    offset = int(dict(state.get("offsets", {})).get(f"{topic}:{partition}", -1))
    if offset < 0:
        return None
    out: dict[str, Any] = {"offset": offset, "pending": None, "aggregates": None}
    if state.get("pending") is not None:
        pending = PendingLabels(spec)
        pending.load(state["pending"])
        out["pending"] = pending.to_state({partition})
    if spec.aggregates and state.get("aggregates") is not None:
        entities = EntityAggregates(spec)
        entities.load(state["aggregates"])
        out["aggregates"] = entities.to_state({partition})
    return out
