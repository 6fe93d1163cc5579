"""Durable feedback: submit it (optionally waiting until trained), read one request, list a log.

A request is queued in SQLite and trained by the runtime's queue, in arrival order per adapter.
A request the caller may not see is answered exactly as if it did not exist. A body in CLaaS's
shape (`requests`, not `items`) is CLaaS's feedback call, answered by `claas_compat`.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Response

from claas.api.claas_schemas import ClaasFeedbackBatch, ClaasFeedbackResponse, FeedbackBody
from claas.api.deps import Caller, RuntimeDep
from claas.api.errors import ErrorEnvelope, error_responses
from claas.api.routes import claas_compat
from claas.api.schemas import (
    MAX_OFFSET,
    FeedbackAccepted,
    FeedbackLog,
    FeedbackView,
)
from claas.ids import LORA_ID_PATTERN, feedback_missing
from claas.records import FeedbackStatus

router = APIRouter(prefix="/v1")


@router.post(
    "/feedback",
    status_code=202,
    response_description="Queued; with wait=true, not trained before the timeout.",
    response_model=FeedbackAccepted | FeedbackView | ClaasFeedbackResponse,
    responses={
        200: {
            "model": FeedbackView | ClaasFeedbackResponse,
            "description": "Trained (with wait=true, or a CLaaS body): the finished request.",
        },
        **error_responses(400, 401, 403, 404, 409, 413, 422, 429, 503),
        500: {"model": ErrorEnvelope, "description": "A CLaaS body's request failed to train."},
    },
)
async def submit_feedback(
    body: FeedbackBody,
    runtime: RuntimeDep,
    caller: Caller,
    response: Response,
    wait: bool | None = Query(
        None, description="Block until trained; return the result (default: CLaaS bodies only)."
    ),
    timeout: float = Query(600.0, gt=0, le=3600, description="Longest wait, seconds."),
) -> FeedbackAccepted | FeedbackView | ClaasFeedbackResponse:
    """202 with the queued request; with `wait`, 200 once trained (202 if the wait timed out).

    A CLaaS body (`requests`) waits unless `wait=false`, and is answered in CLaaS's shape.
    """
    if isinstance(body, ClaasFeedbackBatch):
        waits = wait is not False
        return await claas_compat.submit_feedback(body, runtime, caller, response, waits, timeout)
    request = await runtime.queue.admit(body.items, owner=caller.owner)
    if not wait:
        return FeedbackAccepted(
            feedback_id=request.id, status=request.status, lora_id=request.lora_id
        )
    try:
        done = await runtime.queue.wait(request.id, timeout)
    except TimeoutError:
        return FeedbackView.of(await asyncio.to_thread(runtime.store.get_feedback, request.id))
    response.status_code = 200
    return FeedbackView.of(done)


@router.get("/feedback/{feedback_id}", responses=error_responses(401, 404, 422))
def feedback_status(feedback_id: str, runtime: RuntimeDep, caller: Caller) -> FeedbackView:
    request = runtime.store.get_feedback(feedback_id)
    if not caller.sees(request.lora_id):
        raise feedback_missing(feedback_id)  # exactly as if it did not exist
    return FeedbackView.of(request)


@router.get("/feedback", responses=error_responses(401, 403, 404, 422))
def feedback_log(
    runtime: RuntimeDep,
    caller: Caller,
    lora_id: str = Query(..., max_length=200, json_schema_extra={"pattern": LORA_ID_PATTERN}),
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
    status: Annotated[
        list[FeedbackStatus] | None,
        Query(
            max_length=4,
            description="Only requests in these statuses (repeat the parameter for several); "
            "all by default.",
        ),
    ] = None,
) -> FeedbackLog:
    caller.check(lora_id)
    runtime.store.get_adapter(lora_id)
    requests = runtime.store.list_feedback(
        lora_id=lora_id, statuses=status or (), limit=limit, offset=offset
    )
    return FeedbackLog(
        lora_id=lora_id, data=[FeedbackView.of(r) for r in requests], limit=limit, offset=offset
    )
