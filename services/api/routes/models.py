"""``/models``: list and describe served models, score and explain events."""

from __future__ import annotations

import math
import re
import time
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Response
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool

from streamlearn.features import InvalidEvent
from streamlearn.reasons import MAX_REASONS, all_finite, annotate, reason_codes, serving_spec
from streamlearn.services.api.deps import FeedDep, MetricsDep, SettingsDep, StoreDep, max_instances
from streamlearn.services.api.schemas import (
    DriftResponse,
    ErrorDetail,
    ExplainRequest,
    ExplainResponse,
    ModelDetail,
    ModelSummary,
    OrjsonResponse,
    PredictRequest,
    PredictResponse,
    StrictJSONRoute,
)
from streamlearn.serving import ModelStore, Served

router = APIRouter(prefix="/models", tags=["models"], route_class=StrictJSONRoute)

#: Batches larger than this are scored in a worker thread, off the event loop.
THREAD_BATCH = 256
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorDetail, "description": "Unknown model"}
}
_INSTANCE = re.compile(r"^instance (\d+): ")


def served_or_404(store: ModelStore, name: str) -> Served:
    """The served model, or a 404 that lists the known names."""
    served = store.get(name)
    if served is None:
        raise HTTPException(404, detail=f"unknown model {name!r}; known: {store.names()}")
    return served


def summary(served: Served, now: float) -> dict[str, Any]:
    """``ModelSummary`` as a dict."""
    return {
        **served.info,
        "snapshot_age_s": round(served.age_s(now), 3),
        "n_replicas": len(served.replicas),
        "loaded_at": served.loaded_at,
    }


def _invalid(exc: InvalidEvent, single: bool) -> RequestValidationError:
    msg = str(exc)
    loc: tuple[str | int, ...] = ("body", "features")
    match = _INSTANCE.match(msg)
    if match:
        msg = msg[match.end():]
        if not single:
            loc = ("body", "instances", int(match.group(1)))
    return RequestValidationError([{"type": "invalid_event", "loc": loc, "msg": msg}])


def _not_finite(loc: tuple[str | int, ...], what: str) -> RequestValidationError:
    # A finite but extreme input (say 1e308) can overflow the standardized value;
    # the response schema promises numbers, so refuse rather than answer null.
    return RequestValidationError([{
        "type": "non_finite_result", "loc": loc,
        "msg": f"{what} is not a finite number for these inputs: a feature value is too "
               "extreme for this model",
    }])


@router.get("", response_model=list[ModelSummary], summary="List served models")
async def list_models(store: StoreDep) -> Response:
    """Every served model: version, events seen, prequential metrics, features."""
    store.refresh()
    now = time.time()
    return OrjsonResponse([summary(s, now) for s in store.all()])


@router.get("/{name}", response_model=ModelDetail, responses=_NOT_FOUND, summary="Describe a model")
async def get_model(name: str, store: StoreDep, feed: FeedDep) -> Response:
    """One model, with each replica's latest snapshot and summed worker telemetry.

    ``merged_version``: the newest merged model the served one builds on; per replica,
    ``in_merge`` says whether its shard is in the served merge (``stale``: not refreshed
    within ``worker.stale_after_s``, so left out).
    """
    store.refresh()  # a replica that went quiet leaves the merge even with no new record
    served = served_or_404(store, name)
    now = time.time()
    body = summary(served, now) | {
        "merged_version": served.merged_version,
        "stale_replicas": list(served.stale),
        "replicas": [r.to_dict(now) | {"in_merge": r.replica in served.in_merge,
                                       "stale": r.replica in served.stale}
                     for r in served.replicas.values()],
        "telemetry": served.telemetry,
        "feed": feed.status() if feed is not None else None,
    }
    return OrjsonResponse(body)


@router.post("/{name}/predict", response_model=PredictResponse, responses=_NOT_FOUND,
             summary="Score one event or a batch")
async def predict(
    name: str, body: PredictRequest, store: StoreDep, settings: SettingsDep, metrics: MetricsDep,
    reasons: int = Query(0, ge=0, le=MAX_REASONS, description=(
        "Reason codes per prediction: the top-K features by contribution to the margin "
        "(largest first), named by field; 0: none.")),
) -> Response:
    """Score ``features`` (one event) or ``instances`` (1..max_instances events).

    With ``reasons=K`` each prediction also gets its top-K reason codes (``reasons``, in
    request order); when the model has decision bands (``decision_block``,
    ``decision_review``), each gets a decision (``decisions``; ``decision`` for one event).
    """
    t0 = time.perf_counter()
    served = served_or_404(store, name)
    events = body.events()
    limit = max_instances(settings)
    if len(events) > limit:
        raise RequestValidationError([{
            "type": "too_long", "loc": ("body", "instances"),
            "msg": f"at most {limit} instances per request, got {len(events)}",
        }])
    model = served.model
    try:
        if len(events) > THREAD_BATCH:
            batch, scores = await run_in_threadpool(model.score_events, events)
        else:
            batch, scores = model.score_events(events)
    except InvalidEvent as exc:
        raise _invalid(exc, single=body.features is not None) from exc
    predictions = scores.tolist()
    bad = [i for i, p in enumerate(predictions) if not math.isfinite(p)]
    if bad:
        single = body.features is not None
        raise _not_finite(("body", "features") if single else ("body", "instances", bad[0]),
                          "the score" if single else f"the score of instance {bad[0]}")
    out: dict[str, Any] = {
        "model": name, "version": served.version, "merged_version": served.merged_version,
        "snapshot_age_s": round(served.age_s(), 3), "predictions": predictions,
    }
    single = body.features is not None
    if single:
        out["score"] = predictions[0]
    codes = None
    if reasons:
        codes = reason_codes(model, batch, reasons)
        if not all_finite(codes):
            raise _not_finite(("body", "features") if single else ("body", "instances"),
                              "a reason code's contribution")
    annotate(out, serving_spec(store, name, model.spec), predictions, single, codes)
    response = OrjsonResponse(out)
    metrics.prediction_latency.labels(name).observe(time.perf_counter() - t0)
    metrics.predictions.labels(name).inc(len(events))
    return response


@router.post("/{name}/explain", response_model=ExplainResponse, responses=_NOT_FOUND,
             summary="Explain one score")
async def explain(name: str, body: ExplainRequest, store: StoreDep) -> Response:
    """Per-feature additive contributions (``w_i * z_i``); they sum with the bias to the margin.

    Every number in the answer is finite: an input too extreme for that (a 422) is refused.
    """
    served = served_or_404(store, name)
    try:
        result = served.model.explain_one(body.features)
    except InvalidEvent as exc:
        raise _invalid(exc, single=True) from exc
    bad = [n for n, c in result["contributions"].items() if not math.isfinite(c)]
    if bad or not all(math.isfinite(result[k]) for k in ("bias", "margin", "score")):
        raise _not_finite(("body", "features"),
                          f"the contribution of {bad[:5]}" if bad else "the margin")
    return OrjsonResponse({
        "model": name, "version": served.version, "merged_version": served.merged_version,
        "snapshot_age_s": round(served.age_s(), 3), **result,
    })


@router.get("/{name}/drift", response_model=DriftResponse, responses=_NOT_FOUND,
            summary="Drift state and scores")
async def drift(name: str, store: StoreDep) -> Response:
    """The concept-drift detector on the batch loss (state, drift offsets and times), each
    feature's data-drift score (worst first) and the drift actions taken."""
    served = served_or_404(store, name)
    return OrjsonResponse({
        "model": name, "version": served.version, "merged_version": served.merged_version,
        "snapshot_age_s": round(served.age_s(), 3), **served.model.drift_report(),
    })
