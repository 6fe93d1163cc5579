"""CLaaS compatibility: the routes and bodies of CLaaS, the system claas grew from, over claas.

CLaaS (github.com/kfallah/CLaaS, `claas/api.py` and `claas/core/types.py`) has an OpenClaw
feedback plugin and eval scripts that speak `/v1/lora/init`, `/v1/lora`, `/v1/lora/export` and
`POST /v1/feedback` with a `requests` body; these routes answer those calls as CLaaS did. They
are a thin map onto the same runtime as claas's own routes, under the same keys: a key reaches
only adapters named `owner/...`, and another owner's is refused (403) before anything is
looked up.

The names map onto claas's:

- a lora id is claas's `owner/name`; `owner/name-latest`, CLaaS's alias of an adapter's newest
  weights, names the adapter `owner/name` (its current version) unless an adapter has that
  literal id. `init` of `owner/name-latest` creates `owner/name`, as CLaaS's local engine does.
- `lora_r` is the rank; `lora_alpha`, `target_modules` and `base_model` keep their meaning, and
  omitted ones take claas's defaults (the served model, alpha 32, attention + MLP).
- `training` is claas's `TrainingConfig`: CLaaS's six fields have the same names and meaning
  (in CLaaS's Tinker engine `alpha` was the scalar loss's KL coefficient; here it is always
  the GJS weight, and `kl_coef` is the scalar one). Omitted fields take claas's defaults, except
  `steps_per_batch`, 1 here: one CLaaS call is one optimizer step, and CLaaS's eval loops calls;
  and `replay`, 0 here: a CLaaS call trains on the answers it sends.
- `orchestration` (vLLM sleep and wake around training) is accepted and not needed: claas samples
  from the adapter version it trains, and loads each new version for serving itself. The answer
  says so, and reports `vllm.slept` and `vllm.woke` as false.

A CLaaS feedback call is answered once trained, in CLaaS's shape: `distill_result.metadata`
carries CLaaS's metric names (its local engine's, and in the scalar mode its Tinker engine's),
taken from the call's first optimizer step. `POST /v1/feedback` itself is claas's route
(`routes/feedback.py`): `FeedbackBody` sends a body with `requests` here, any other to claas's
`items` handler. The bodies, in CLaaS's shapes, are `claas.api.claas_schemas`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from claas.adapters import AdapterSpec
from claas.api.auth import Principal
from claas.api.claas_schemas import (
    ClaasDistillResult,
    ClaasFeedbackBatch,
    ClaasFeedbackResponse,
    ClaasLoraDeleted,
    ClaasLoraInit,
    ClaasLoraInitResponse,
    ClaasLoraList,
    ClaasTimingMs,
    ClaasVllmState,
)
from claas.api.deps import Caller, RuntimeDep
from claas.api.errors import error_responses
from claas.errors import AdapterNotFound, Conflict, InvalidLoraId, TrainingFailed
from claas.feedback import FeedbackItem
from claas.ids import LORA_ID_PATTERN, validate_lora_id
from claas.records import Adapter, FeedbackRequest
from claas.runtime import Runtime
from claas.sdpo.config import TrainingConfig

router = APIRouter(prefix="/v1", tags=["CLaaS compatibility"])

LATEST = "-latest"
LoraIdQuery = Annotated[
    str,
    Query(
        max_length=200,
        description="owner/name, or owner/name-latest (its current version)",
        json_schema_extra={"pattern": LORA_ID_PATTERN},
    ),
]


# ---------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------


@router.post("/lora/init", responses=error_responses(400, 401, 403, 404, 409, 413, 422))
async def init_lora(
    body: ClaasLoraInit, runtime: RuntimeDep, caller: Caller
) -> ClaasLoraInitResponse:
    """Create the adapter, or start one that exists afresh (CLaaS's init overwrites).

    Starting afresh removes its versions, so it is done only with the spec the adapter has:
    the new one is then known to be valid before anything is removed.
    """
    lora_id = validate_lora_id(body.lora_id.removesuffix(LATEST))
    caller.check(lora_id)
    given = body.model_dump(exclude={"lora_id", "lora_r"}, exclude_none=True)
    spec = AdapterSpec.model_validate({"rank": body.lora_r, **given})
    removed = 0
    try:
        existing = await asyncio.to_thread(runtime.adapters.get, lora_id)
    except AdapterNotFound:
        existing = None
    if existing is not None:
        if not _same_spec(existing, spec, runtime.adapters.base_model):
            raise Conflict(
                f"{lora_id} exists with base model {existing.base_model}, rank {existing.rank}, "
                f"alpha {existing.lora_alpha} and modules {existing.target_modules}; init with "
                f"that spec to start it afresh, or DELETE /v1/lora?lora_id={lora_id} first"
            )
        removed = len(await runtime.adapters.delete(lora_id))
        await runtime.queue.notify()  # its queued requests are gone: release any waiters
    adapter = await runtime.adapters.init(lora_id, spec)
    return ClaasLoraInitResponse(lora_id=adapter.lora_id, versions_removed=removed)


@router.get("/lora", responses=error_responses(401, 422))
def list_loras(
    runtime: RuntimeDep,
    caller: Caller,
    prefix: str = Query("", max_length=200, description="Only ids that start with it."),
) -> ClaasLoraList:
    """Every adapter the key reaches, as CLaaS lists them: its id and its `-latest` alias."""
    own = "" if caller.owner is None else f"{caller.owner}/"
    wanted = prefix.strip("/")
    ids = [
        name
        for adapter in runtime.adapters.list_adapters(own)
        for name in (adapter.lora_id, adapter.lora_id + LATEST)
        if name.startswith(wanted)
    ]
    return ClaasLoraList(loras=sorted(ids))


@router.delete("/lora", responses=error_responses(401, 403, 422))
async def delete_lora(
    lora_id: LoraIdQuery, runtime: RuntimeDep, caller: Caller
) -> ClaasLoraDeleted:
    """Delete the adapter and its versions; `deleted: false` if there is none (as in CLaaS)."""
    validate_lora_id(lora_id)
    caller.check(lora_id)
    try:
        await runtime.adapters.delete(lora_id)
    except AdapterNotFound:
        base = lora_id.removesuffix(LATEST)
        if base != lora_id and _exists(runtime, base):
            raise InvalidLoraId(
                f"{lora_id} is CLaaS's alias of the adapter {base}, and claas keeps no alias "
                f"to remove; to delete the adapter, send lora_id={base}"
            ) from None
        return ClaasLoraDeleted(deleted=False)
    await runtime.queue.notify()  # its queued requests are gone: release any waiters
    return ClaasLoraDeleted(deleted=True)


@router.get(
    "/lora/export",
    response_class=Response,
    responses={
        200: {
            "description": "A zip of the current version's PEFT directory.",
            "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
        },
        **error_responses(401, 403, 404, 422),
    },
)
async def export_lora(lora_id: LoraIdQuery, runtime: RuntimeDep, caller: Caller) -> Response:
    adapter_id = resolve(runtime, caller, lora_id)
    archive = await asyncio.to_thread(runtime.adapters.export, adapter_id)
    filename = lora_id.replace("/", "__")  # CLaaS's name for it
    return Response(
        archive,
        media_type="application/zip",
        headers={"content-disposition": f'attachment; filename="{filename}.zip"'},
    )


async def submit_feedback(
    body: ClaasFeedbackBatch,
    runtime: Runtime,
    caller: Principal,
    response: Response,
    wait: bool,
    timeout: float,
) -> ClaasFeedbackResponse:
    """Queue the batch as one claas feedback request and answer once it is trained.

    200 in CLaaS's shape when done; a failed request is a 500 with claas's reason (CLaaS
    clients retry on an error, and a failed request trained nothing). Not trained within
    `timeout` (or `wait=false`), 202 with the queue status and no `distill_result`, so a client
    does not send the batch again while it is still to be trained.
    """
    started = time.perf_counter()
    items = [
        FeedbackItem(
            lora_id=resolve(runtime, caller, item.lora_id),
            prompt=item.prompt,
            response=item.response,
            feedback=item.feedback,
            training=item.training,
        )
        for item in body.requests
    ]
    request = await runtime.queue.admit(items, owner=caller.owner)
    if wait:
        try:
            request = await runtime.queue.wait(request.id, timeout)
        except TimeoutError:
            request = await asyncio.to_thread(runtime.store.get_feedback, request.id)
    if request.status == "failed":
        raise TrainingFailed(
            f"feedback request {request.id} failed: {request.error}. The adapter stays on its "
            f"last good version; GET /v1/feedback/{request.id} has the record"
        )
    done = request.status == "done"
    timing = ClaasTimingMs(total=_ms(time.perf_counter() - started))
    if done:
        response.status_code = 200
        seconds = request.metrics["timings"]
        timing.save = _ms(seconds.get("save", 0.0))
        timing.distill = _ms(sum(seconds.values())) - timing.save
    return ClaasFeedbackResponse(
        status="ok" if done else request.status,
        request_id=request.id,
        lora_id=request.lora_id,
        distill_result=_distill_result(request, body.requests[0].training) if done else None,
        vllm=ClaasVllmState(slept=False, woke=False),
        feedback_log_path=f"/v1/feedback/{request.id}",
        timing_ms=timing,
        batch_size=len(body.requests),
    )


# ---------------------------------------------------------------------------------------------
# Mapping
# ---------------------------------------------------------------------------------------------


def resolve(runtime: Runtime, caller: Principal, lora_id: str) -> str:
    """The claas adapter a CLaaS lora id names (403 for another owner's, before any lookup)."""
    validate_lora_id(lora_id)
    caller.check(lora_id)
    if _exists(runtime, lora_id):
        return lora_id
    base = lora_id.removesuffix(LATEST)
    if base != lora_id and _exists(runtime, base):
        return base
    raise AdapterNotFound(
        f"adapter {lora_id} does not exist; create it with POST /v1/lora/init, or list yours "
        "with GET /v1/lora"
    )


def _same_spec(adapter: Adapter, spec: AdapterSpec, served_model: str) -> bool:
    """Whether an init's spec is the one the adapter has (an omitted base model: the served)."""
    return (
        adapter.base_model == (spec.base_model or served_model)
        and adapter.rank == spec.rank
        and adapter.lora_alpha == spec.lora_alpha
        and adapter.target_modules == sorted(spec.target_modules)
    )


def _exists(runtime: Runtime, lora_id: str) -> bool:
    try:
        runtime.adapters.get(lora_id)
    except AdapterNotFound:
        return False
    return True


def _distill_result(request: FeedbackRequest, training: TrainingConfig) -> ClaasDistillResult:
    """CLaaS's distill metrics, from the first optimizer step (CLaaS makes one per call).

    Its local engine's names in both modes; in the scalar mode also its Tinker engine's
    (`adv_mean` there is what CLaaS's eval takes as the sign of that engine).
    """
    metrics, step = request.metrics, request.metrics["steps"][0]
    scalar = step["adv_gain"] is not None
    metadata: dict[str, Any] = {
        "total_loss": step["loss"],
        "distill_loss": step["distill_loss"],
        "kl_reg": step["kl_reg_mean"],
        "mean_is_ratio": step["mean_is_ratio"],
        "clip_fraction": step["clip_fraction"],
        "tokens_processed": metrics["tokens"],
        "batch_size": metrics["samples"],
        "lr": metrics["learning_rate"],
        # CLaaS's names for the two losses. claas applies scalar mode's importance-sampling
        # advantages as cross_entropy weights: the same gradient at the current student.
        "loss_fn": "importance_sampling" if scalar else "cross_entropy",
        "teacher_scored_texts": metrics["teacher_texts"],
        "version": request.version,
    }
    if step["grad_norm"] is not None:  # hosted Tinker may not report it
        metadata["grad_norm"] = step["grad_norm"]
    if scalar:
        metadata |= {
            "adv_mean": step["adv_mean"],
            "adv_abs_mean": step["adv_abs_mean"],
            "adv_abs_mean_raw": step["adv_abs_mean_raw"],
            "kl_mean": step["kl_mean"],
            "kl_gain": step["adv_gain"],
            "effective_kl_coef": training.kl_coef * step["adv_gain"],
            "completion_len": metrics["tokens"],
        }
    return ClaasDistillResult(lora_id=request.lora_id, metadata=metadata)


def _ms(seconds: float) -> int:
    return round(seconds * 1000)
