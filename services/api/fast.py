"""The fast path of ``POST /models/{name}/predict``: the common, valid request in C.

Through the FastAPI route a valid single-event request costs ~175 µs of Python
(dependency injection, a pydantic model of the body, a per-value validator, the route's
exception wrapping, the vectorizer turning dicts back into typed rows); this pure ASGI
middleware, which ``StreamlearnAPI`` runs in front of FastAPI's whole stack, answers the
same request in ~21 µs (``load_tests/profile_predict.py --compare``):

- the body is decoded once by a msgspec decoder built per model spec, straight into the
  vectorizer's row structs (``{"features": Row}`` or ``{"instances": [Row, ...]}``; any
  other top-level key fails the decode), so JSON syntax, types and the exactly-one rule
  are checked in C;
- the rows go through :meth:`Vectorizer.assemble` (one event: :func:`_one_row`, the same
  arrays without NumPy's per-call overhead) and :meth:`OnlineModel.predict_many`, the calls
  the slow path ends in, so scores are the same numbers;
- the answer is encoded by orjson into the same bytes ``OrjsonResponse`` renders, and
  the Prometheus children are looked up once per model, not per request.

Everything it is not sure of goes to the full FastAPI route, untouched, with the body
replayed: a body that fails to decode, that could hold a value the slow path refuses but
the struct decoder would skip (a nested object or array in a field the model does not
read, any ``\\u`` escape, non-ASCII bytes that are not UTF-8, a number past double
range), a row the vectorizer's vectorized checks flag, a non-finite score, a content type
other than ``application/json``, an unknown model, or any exception.  So every 4xx, with
its message, still comes from the route, and the OpenAPI schema is the route's.
``tests/services/test_api_fast.py`` checks that both paths give the same status, content
type and JSON (keys in the same order) for hand-picked and generated bodies.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np
import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streamlearn import features as features_module
from streamlearn.features import MAX_ABS_VALUE, FeatureBatch
from streamlearn.metrics import ApiMetrics
from streamlearn.reasons import all_finite, annotate, reason_codes, serving_spec
from streamlearn.serving import ModelStore

log = logging.getLogger(__name__)

_PREFIX = "/models/"
_SUFFIX = "/predict"
_JSON = b"application/json"
# A number the struct decoder might skip but orjson refuses (past double range) has an
# exponent of three digits or more, or 309+ digits.  Small bodies are searched with
# regular expressions; large ones with NumPy, which costs ~70 us per 235 KB where the
# expressions cost ~3 ms.  A false hit only costs the slow path.
_EXPONENT = re.compile(rb"[0-9][eE][+-]?[0-9]{3}")
_DIGITS = re.compile(rb"[0-9]{309}")
_REGEX_BELOW = 512
_BLOCK = 154  # a run of 2 * _BLOCK - 1 digits always covers one aligned block
_HEADERS_JSON = (b"content-type", _JSON)
# The one query this path answers (``?reasons=K``); any other goes to the route.
_REASONS = re.compile(rb"reasons=([0-9]{1,3})")


#: Scope key set when the fast path declined a request (the ASGI path then skips it).
DECLINED = "streamlearn.fast_declined"


class _Unsure(Exception):
    """The fast path declines: the full route decides."""


def _row_type(spec: Any) -> Any | None:
    """The vectorizer's JSON row struct for ``spec`` (its msgspec types for JSON numbers
    and ids), or None when this version of the vectorizer has none."""
    build = getattr(features_module, "_row_type", None)
    number = getattr(features_module, "_JsonNumber", None)
    ident = getattr(features_module, "_JsonId", None)
    if build is None or number is None or ident is None:
        return None
    try:
        return build(spec, number, ident)
    except Exception:  # noqa: BLE001 - a spec the struct cannot describe: slow path only
        return None


class _ModelPath:
    """What one model's fast path needs, built once per spec."""

    __slots__ = ("spec", "decode", "latency", "count", "one_row")

    def __init__(self, spec: Any, row: Any, metrics: ApiMetrics, name: str) -> None:
        self.spec = spec
        body = msgspec.defstruct(
            "PredictBody",
            [("features", row | msgspec.UnsetType, msgspec.UNSET),
             ("instances", list[row] | msgspec.UnsetType, msgspec.UNSET)],  # type: ignore[valid-type]
            forbid_unknown_fields=True, gc=False,
        )
        self.decode: Callable[[bytes], Any] = msgspec.json.Decoder(body).decode
        self.latency = metrics.prediction_latency.labels(name)
        # _one_row leans on the vectorizer's slot cache; without it, assemble does all.
        # (Aggregates add inputs to the row: those go through assemble too.)
        self.one_row = callable(getattr(features_module, "Vectorizer", None)) and hasattr(
            features_module.Vectorizer, "_hash") and not getattr(spec, "aggregates", ())
        self.count = metrics.predictions.labels(name)


class FastPathStats:
    """How many predict requests the fast path answered and declined (app.state.fast_predict)."""

    __slots__ = ("answered", "declined")

    def __init__(self) -> None:
        self.answered = 0
        self.declined = 0


class FastPredictMiddleware:
    """Answer valid ``POST /models/{name}/predict`` requests without FastAPI (see module doc).

    Parameters
    ----------
    app
        The rest of the stack (it gets every request this one declines).
    store, metrics
        The app's model store and Prometheus instruments.
    max_instances, max_body
        ``api.max_instances`` and ``api.max_body_bytes``: past either, the route answers.
    stats
        Where to count answered and declined requests.
    owner
        The FastAPI app whose ``dependency_overrides`` (tests) send every request to the
        route; by default ``scope["app"]``.
    """

    def __init__(self, app: ASGIApp, store: ModelStore, metrics: ApiMetrics,
                 max_instances: int, max_body: int, stats: FastPathStats | None = None,
                 owner: Any = None) -> None:
        self.app = app
        self.store = store
        self.metrics = metrics
        self.max_instances = max_instances
        self.max_body = max_body
        self._paths: dict[str, _ModelPath | None] = {}
        self.stats = stats if stats is not None else FastPathStats()
        self.owner = owner

    def eligible(self, scope: Scope) -> tuple[str, Any, _ModelPath, int] | None:
        """``(name, served, model path, declared length)`` when this path may answer."""
        app = self.owner if self.owner is not None else scope.get("app")
        if (scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path")
                or getattr(app, "dependency_overrides", None)  # overrides: the route obeys
                or scope.get(DECLINED)):
            return None
        path: str = scope["path"]
        if not (path.startswith(_PREFIX) and path.endswith(_SUFFIX)):
            return None
        name = path[len(_PREFIX):-len(_SUFFIX)]
        served = self.store.get(name) if name and "/" not in name else None
        model_path = self._model_path(name, served) if served is not None else None
        declared = _content(scope["headers"])
        if model_path is None or declared is None or declared > self.max_body:
            return None
        return name, served, model_path, declared

    def answer_now(self, scope: Scope, body: bytes) -> bytes | None:
        """The whole answer's body for a complete request, or None (then ``scope`` is
        marked so that the ASGI path does not try again: the route answers)."""
        t0 = time.perf_counter()
        found = self.eligible(scope)
        if found is None:
            return None
        name, served, model_path, _ = found
        answer = self._try(name, served, model_path, body, scope)
        if answer is None:
            scope[DECLINED] = True
            return None
        self._answered(model_path, t0, answer[1])
        return answer[0]

    def _try(self, name: str, served: Any, model_path: _ModelPath, body: bytes,
             scope: Scope) -> tuple[bytes, int] | None:
        """:meth:`_answer`, or None (counted as declined) when the route must decide."""
        try:
            return self._answer(name, served, model_path, body, scope.get("query_string", b""))
        except Exception as exc:  # noqa: BLE001 - _Unsure or anything odd: the route decides
            if not isinstance(exc, _Unsure):
                log.debug("fast predict path declined: %r", exc)
            self.stats.declined += 1
            return None

    def _answered(self, model_path: _ModelPath, t0: float, n: int) -> None:
        model_path.latency.observe(time.perf_counter() - t0)
        model_path.count.inc(n)
        self.stats.answered += 1

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self.eligible(scope)
        if found is None:
            await self.app(scope, receive, send)
            return
        name, served, model_path, _ = found
        t0 = time.perf_counter()
        chunks: list[bytes] = []
        message = await receive()
        while True:
            if message["type"] != "http.request":  # a disconnect: let the route see it
                await self.app(scope, _replay(b"".join(chunks), True, message, receive), send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
            if sum(map(len, chunks)) > self.max_body:
                await self.app(scope, _replay(b"".join(chunks), True, None, receive), send)
                return
            message = await receive()
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        answer = self._try(name, served, model_path, body, scope)
        if answer is None:
            await self.app(scope, _replay(body, False, None, receive), send)
            return
        raw, n = answer
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(raw)).encode()), _HEADERS_JSON]})
        await send({"type": "http.response.body", "body": raw})
        self._answered(model_path, t0, n)

    def _model_path(self, name: str, served: Any) -> _ModelPath | None:
        spec = served.model.spec
        cached = self._paths.get(name, False)
        if cached is not False and (cached is None or cached.spec is spec or cached.spec == spec):
            return cached  # type: ignore[return-value]
        row = _row_type(spec)
        built = None if row is None else _ModelPath(spec, row, self.metrics, name)
        self._paths[name] = built
        return built

    def _answer(self, name: str, served: Any, model_path: _ModelPath,
                body: bytes, query: bytes = b"") -> tuple[bytes, int]:
        k = 0
        if query:
            found = _REASONS.fullmatch(query)
            if found is None:
                raise _Unsure
            k = int(found.group(1))
        # Values the struct decoder skips (fields the model does not read) must still be
        # JSON scalars the route accepts: no nesting beyond the envelope, no escapes that
        # could hide a lone surrogate, valid UTF-8, numbers within double range.
        if b"\\u" in body or _may_overflow(body):
            raise _Unsure
        if not body.isascii():
            body.decode()  # UnicodeDecodeError: the route says why
        decoded = model_path.decode(body)
        features, instances = decoded.features, decoded.instances
        if features is not msgspec.UNSET:
            if instances is not msgspec.UNSET or body.count(b"{") != 2 or b"[" in body:
                raise _Unsure
            rows = [features]
        else:
            if instances is msgspec.UNSET:
                raise _Unsure
            n = len(instances)
            if (not 0 < n <= self.max_instances or body.count(b"{") != n + 1
                    or body.count(b"[") != 1):
                raise _Unsure
            rows = instances
        model = served.model
        vectorizer = model.vectorizer
        if vectorizer.spec is not model_path.spec and vectorizer.spec != model_path.spec:
            raise _Unsure
        if len(rows) == 1 and model_path.one_row:
            batch = _one_row(vectorizer, model_path.spec, msgspec.structs.astuple(rows[0]))
        else:
            batch, bad = vectorizer.assemble(list(map(msgspec.structs.astuple, rows)))
            if bad is not None:
                raise _Unsure
        predictions = model.predict_many(batch).tolist()
        if not all(map(math.isfinite, predictions)):
            raise _Unsure
        out: dict[str, Any] = {"model": name, "version": served.version,
               "merged_version": served.merged_version,
                               "snapshot_age_s": round(served.age_s(), 3),
                               "predictions": predictions}
        single = features is not msgspec.UNSET
        if single:
            out["score"] = predictions[0]
        codes = reason_codes(model, batch, k) if k else None
        if codes is not None and not all_finite(codes):
            raise _Unsure
        annotate(out, serving_spec(self.store, name, model.spec), predictions, single, codes)
        return orjson.dumps(out), len(rows)


def _one_row(vectorizer: Any, spec: Any, row: tuple[Any, ...]) -> Any:
    """:meth:`Vectorizer.assemble` for one row without its NumPy passes (~14 us -> ~4 us).

    Same layout, same checks (a magnitude past ``MAX_ABS_VALUE``, a binary label neither
    0 nor 1: then :class:`_Unsure`), same per-field slot caches; tested equal to it.
    """
    d = spec.n_numeric
    nums = [math.nan if v is None else v for v in row[:d]]
    label = row[d]
    if label is None:
        label = math.nan
    limit = MAX_ABS_VALUE
    for x in nums:
        if abs(x) > limit:  # NaN compares False, as in assemble
            raise _Unsure
    if abs(label) > limit or (spec.task != "regression" and label == label
                              and label != 0.0 and label != 1.0):
        raise _Unsure
    hash_one = vectorizer._hash
    slots = [hash_one(name, [row[d + 1 + j]])[0] for j, name in enumerate(spec.categorical)]
    return FeatureBatch(np.array([nums], dtype=np.float64),
                        np.array([slots], dtype=np.int64).reshape(1, len(slots)),
                        np.array([label], dtype=np.float32), [row[-1]])


def _may_overflow(body: bytes) -> bool:
    """Whether ``body`` may hold a JSON number past double range (false hits allowed)."""
    if len(body) < _REGEX_BELOW:
        return _EXPONENT.search(body) is not None or _DIGITS.search(body) is not None
    a = np.frombuffer(body, dtype=np.uint8)
    digit = (a - 48) < 10  # uint8 wraps below "0"
    if (digit[:-1] & ((a[1:] | 32) == 101)).any() and _EXPONENT.search(body) is not None:
        return True  # an exponent ("e" or "E" after a digit) with three digits
    n = len(digit) // _BLOCK * _BLOCK
    return bool(n and digit[:n].reshape(-1, _BLOCK).all(axis=1).any())


def _content(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The declared body length (-1: none) when the content type is JSON; else None."""
    json_type = False
    length = -1
    for key, value in headers:
        if key == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            json_type = media == _JSON
        elif key == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return None
            if length < 0:
                return None
        elif key == b"transfer-encoding" or key == b"expect":
            return None  # rare: the route handles chunked uploads and 100-continue
    return length if json_type else None


def _replay(body: bytes, more_body: bool, pending: Message | None, receive: Receive) -> Receive:
    """A ``receive`` that hands out the bytes already read (``more_body`` as it was when
    reading stopped), then ``pending`` (a message read but not used), then the stream."""
    queue: list[Message] = [{"type": "http.request", "body": body, "more_body": more_body}]
    if pending is not None:
        queue.append(pending)

    async def replayed() -> Message:
        if queue:
            return queue.pop(0)
        return await receive()

    return replayed
