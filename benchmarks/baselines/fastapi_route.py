"""A bare FastAPI GET route at the gateway's REST path, returning the same JSON as the
gateway's KeyValue Get: what a hand-written FastAPI endpoint costs (routing, path parameter
validation, ``jsonable_encoder``, ``JSONResponse``), with no gateway work at all."""

from __future__ import annotations

import json

from fastapi import FastAPI

from benchmarks.baselines.body import load

RESPONSE = json.loads(load())

app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


@app.get("/v1/kv/{key}")
async def get(key: str) -> dict[str, str]:
    return RESPONSE
