"""The baseline of ``bench_serve.py``: a minimal FastAPI + pydantic prediction app.

What a small service written the usual way looks like: a pydantic request model with
``features`` or ``instances``, an ``async`` route, a dict answer rendered by FastAPI, served
by the same uvicorn (httptools, uvloop) as streamlearn's API.  Its "model" is a fixed
logistic function of the numeric fields, so its cost is the HTTP and validation stack.

    python load_tests/minimal_app.py --port 8100
"""

from __future__ import annotations

import argparse
import math

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

Value = float | str | None


class PredictRequest(BaseModel):
    features: dict[str, Value] | None = None
    instances: list[dict[str, Value]] | None = None


app = FastAPI()


def _score(event: dict[str, Value]) -> float:
    margin = sum(v for v in event.values() if isinstance(v, float)) * 1e-3
    return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, margin))))


@app.post("/models/{name}/predict")
async def predict(name: str, body: PredictRequest) -> dict[str, object]:
    events = [body.features] if body.features is not None else body.instances or []
    scores = [_score(e) for e in events]
    out: dict[str, object] = {"model": name, "version": 1, "predictions": scores}
    if body.features is not None:
        out["score"] = scores[0]
    return out


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
