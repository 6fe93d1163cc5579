"""Operations: /v1/health (readiness, for load balancers) and /metrics (Prometheus)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from claas.api.deps import MetricsDep, RuntimeDep
from claas.api.schemas import Health

router = APIRouter()


@router.get(
    "/v1/health",
    responses={
        503: {"model": Health, "description": "Not ready: the same report, status unavailable."}
    },
)
async def health(request: Request, response: Response, runtime: RuntimeDep) -> Health:
    database_ok = await asyncio.to_thread(runtime.store.ping)
    model_loaded = runtime.tokenizer is not None
    ready = bool(request.app.state.ready)
    inference = await runtime.inference.health() if runtime.inference is not None else None
    serving = inference is None or inference["status"] == "ok"
    ok = ready and database_ok and model_loaded and serving
    if not ok:
        response.status_code = 503
    return Health(
        status="ok" if ok else "unavailable",
        model=runtime.base_model,
        model_loaded=model_loaded,
        ready=ready,
        database_ok=database_ok,
        queue_depth=await asyncio.to_thread(runtime.queue.depth) if database_ok else None,
        inference=inference,
    )


@router.get("/metrics", include_in_schema=False)
async def prometheus(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
