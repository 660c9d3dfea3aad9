"""Operational endpoints: liveness, readiness, Prometheus metrics and the dashboard page."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from streamlearn.services.api.deps import FeedDep, RegistryDep, StoreDep
from streamlearn.services.api.schemas import Health, OrjsonResponse

router = APIRouter(tags=["ops"])


@router.get("/healthz", response_model=Health, summary="Liveness")
async def healthz() -> Response:
    """200 whenever the process answers."""
    return OrjsonResponse({"status": "ok"})


@router.get("/readyz", response_model=Health, summary="Readiness",
            responses={503: {"model": Health, "description":
                             "No model snapshot loaded yet, or the snapshot feed has stopped"}})
async def readyz(store: StoreDep, feed: FeedDep) -> Response:
    """Readiness of the model serving.

    - 200 ``ready``: a model is served and the snapshot feed (if any) is healthy;
    - 200 ``degraded`` (``degraded: true``, with a ``reason``): models are served but
      the broker does not answer, so they may be stale; the API keeps serving them;
    - 503 ``not ready``: no model is loaded yet, or the snapshot feed task has stopped
      (a restart is needed: the served model would never change again).
    """
    names = store.names()
    feed_status = feed.status() if feed is not None else None
    if feed is not None and not feed.alive:
        reason = f"snapshot feed stopped ({feed.died or 'unknown error'}); restart the API"
        return OrjsonResponse(
            {"status": "not ready", "models": names, "reason": reason, "feed": feed_status,
             "degraded": True},
            status_code=503,
        )
    if names:
        body: dict[str, object] = {"status": "ready", "models": names, "feed": feed_status}
        if feed is not None and feed.broker_up is False:
            body.update(
                status="degraded", degraded=True,
                reason=(f"broker {feed.bootstrap} unreachable for "
                        f"{feed.broker_down_for_s():.0f} s (last error: {feed.last_error}); "
                        "serving the models loaded before"),
            )
        return OrjsonResponse(body)
    if feed is None:
        reason = "no model snapshot loaded and no snapshot feed (kafka.bootstrap is empty)"
    else:
        reason = f"no model snapshot loaded yet; snapshot feed is {feed.state}"
        if feed.broker_up is False:
            reason += f", broker unreachable for {feed.broker_down_for_s():.0f} s"
        if feed.last_error:
            reason += f" (last error: {feed.last_error})"
    if store.stats.last_error:
        reason += f"; last rejected snapshot: {store.stats.last_error}"
    return OrjsonResponse(
        {"status": "not ready", "models": [], "reason": reason, "feed": feed_status},
        status_code=503,
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(registry: RegistryDep) -> Response:
    """Prometheus text exposition format."""
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@lru_cache(maxsize=1)
def dashboard_html() -> str:
    """The dashboard page (a single static file, read once)."""
    page = resources.files("streamlearn.services.api") / "static" / "dashboard.html"
    return page.read_text(encoding="utf-8")


@router.get("/dashboard", response_class=HTMLResponse, summary="Live dashboard")
async def dashboard() -> HTMLResponse:
    """Per model, live: events/s, rolling AUC or loss, data-drift scores per feature, drift
    events and actions on the timeline, version and snapshot age (polls every second)."""
    return HTMLResponse(dashboard_html())


#: The dashboard's vendored chart library (uPlot, MIT; its licence ships beside it).
_VENDOR = {"uPlot.iife.min.js": "text/javascript", "uPlot.min.css": "text/css",
           "uPlot.LICENSE": "text/plain"}


@lru_cache(maxsize=len(_VENDOR))
def _vendor_file(name: str) -> bytes:
    return (resources.files("streamlearn.services.api") / "static" / "vendor" / name).read_bytes()


@router.get("/dashboard/vendor/{name}", include_in_schema=False)
async def dashboard_vendor(name: str) -> Response:
    """The dashboard's own copy of its chart library: the page needs no internet."""
    if name not in _VENDOR:
        return Response(status_code=404)
    return Response(_vendor_file(name), media_type=_VENDOR[name],
                    headers={"Cache-Control": "public, max-age=86400"})
