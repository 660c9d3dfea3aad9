"""Admin endpoints: trigger a drift action (reset, rollback) on a model by hand.

The action happens where the model learns: the API publishes a command on
``kafka.commands_topic`` and every worker replica applies it to its shard
(:mod:`streamlearn.services.worker.observe`); the next snapshot shows it in
``/models/{name}/drift`` (``actions.history``, trigger ``manual``).

Both endpoints need ``Authorization: Bearer <api.admin_token>``; without a configured
token they answer 401 to everyone.  The token is compared in constant time and never
logged or echoed.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from streamlearn.drift.commands import Command, new_command
from streamlearn.services.api.deps import SettingsDep, StoreDep
from streamlearn.services.api.schemas import OrjsonResponse

router = APIRouter(prefix="/models", tags=["admin"])
_bearer = HTTPBearer(auto_error=False, description="api.admin_token")
_UNAUTHORIZED = {401: {"description": "Missing or wrong bearer token"},
                 404: {"description": "Unknown model"},
                 503: {"description": "No broker to carry the command"}}

#: ``publish(topic, key, value)``: sends one record; tests replace it on ``app.state``.
Publisher = Callable[[str, bytes, bytes], Awaitable[None]]


def _authorize(settings: Any, credentials: HTTPAuthorizationCredentials | None) -> None:
    token = getattr(settings.api, "admin_token", None)
    expected = token.get_secret_value() if hasattr(token, "get_secret_value") else ""
    given = credentials.credentials if credentials is not None else ""
    if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(401, detail="a valid admin bearer token is required",
                            headers={"WWW-Authenticate": "Bearer"})


def _publisher(request: Request, settings: Any) -> Publisher:
    custom = getattr(request.app.state, "publish_command", None)
    if custom is not None:
        return custom  # type: ignore[no-any-return]
    bootstrap = settings.kafka.bootstrap
    if not bootstrap:
        raise HTTPException(503, detail="no broker configured (kafka.bootstrap is empty): "
                                        "commands cannot reach the workers")
    build = getattr(settings.kafka, "client_kwargs", None)
    options = build() if callable(build) else {}

    async def publish(topic: str, key: bytes, value: bytes) -> None:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **options)
        await producer.start()
        try:
            await producer.send_and_wait(topic, value, key=key)
        finally:
            await producer.stop()

    return publish


async def _command(name: str, action: str, request: Request, settings: Any, store: Any,
                   credentials: HTTPAuthorizationCredentials | None) -> Response:
    _authorize(settings, credentials)
    if store.get(name) is None:
        raise HTTPException(404, detail=f"unknown model {name!r}; known: {store.names()}")
    cmd: Command = new_command(name, action)
    topic = getattr(settings.kafka, "commands_topic", "streamlearn.commands")
    try:
        await _publisher(request, settings)(topic, name.encode(), cmd.encode())
    except HTTPException:
        raise
    except Exception as exc:  # noqa: BLE001 - the broker's error, without the request
        raise HTTPException(503, detail=f"could not publish the command: "
                                        f"{type(exc).__name__}") from None
    return OrjsonResponse({"model": name, "action": action, "command_id": cmd.id,
                           "topic": topic, "status": "published"}, status_code=202)


BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


@router.post("/{name}/reset", status_code=202, responses=_UNAUTHORIZED,
             summary="Reset the model's weights (admin)")
async def reset(name: str, request: Request, settings: SettingsDep, store: StoreDep,
                credentials: BearerDep) -> Response:
    """Fresh weights on every replica (the scaler is kept); needs the admin bearer token."""
    return await _command(name, "reset", request, settings, store, credentials)


@router.post("/{name}/rollback", status_code=202, responses=_UNAUTHORIZED,
             summary="Roll the model back to its last good checkpoint (admin)")
async def rollback(name: str, request: Request, settings: SettingsDep, store: StoreDep,
                   credentials: BearerDep) -> Response:
    """The newest in-memory checkpoint whose loss was good, on every replica."""
    return await _command(name, "rollback", request, settings, store, credentials)
