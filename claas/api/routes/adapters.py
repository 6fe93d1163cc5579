"""Adapters: create, list, read (with versions), roll back, delete, export as a PEFT zip.

An adapter is named `owner/name`; the path takes the two parts separately, and the caller's key
must reach the owner (else 403) before anything is looked up.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from claas.adapters import AdapterSpec
from claas.api.deps import Caller, RuntimeDep
from claas.api.errors import error_responses
from claas.api.schemas import (
    MAX_OFFSET,
    AdapterCreate,
    AdapterDeleted,
    AdapterList,
    AdapterView,
    MemoryForgotten,
    MemoryPage,
    MemoryView,
    RollbackBody,
)
from claas.ids import LORA_ID_PART, MEMORY_ID_PATTERN
from claas.records import Adapter
from claas.runtime import Runtime

router = APIRouter(prefix="/v1")

_PART = f"^{LORA_ID_PART.pattern}$"
OwnerPart = Annotated[
    str, Path(description="owner of owner/name", json_schema_extra={"pattern": _PART})
]
NamePart = Annotated[
    str, Path(description="name of owner/name", json_schema_extra={"pattern": _PART})
]
_ADAPTER_RESPONSES = error_responses(401, 403, 404, 422)


@router.post("/adapters", status_code=201, responses=error_responses(400, 401, 403, 409, 413, 422))
async def create_adapter(body: AdapterCreate, runtime: RuntimeDep, caller: Caller) -> AdapterView:
    caller.check(body.lora_id)
    spec = AdapterSpec.model_validate(body.model_dump(exclude={"lora_id"}))
    adapter = await runtime.adapters.init(body.lora_id, spec)
    return _view(runtime, adapter)


@router.get("/adapters", responses=error_responses(401, 422))
def list_adapters(
    runtime: RuntimeDep, caller: Caller, prefix: str = Query("", max_length=200)
) -> AdapterList:
    if caller.owner is not None and not prefix.startswith(f"{caller.owner}/"):
        if not f"{caller.owner}/".startswith(prefix):
            return AdapterList(data=[])
        prefix = f"{caller.owner}/"
    return AdapterList(data=runtime.adapters.list_adapters(prefix))


@router.get("/adapters/{owner}/{name}", responses=_ADAPTER_RESPONSES)
def get_adapter(
    owner: OwnerPart, name: NamePart, runtime: RuntimeDep, caller: Caller
) -> AdapterView:
    lora_id = _lora(owner, name)
    caller.check(lora_id)
    return _view(runtime, runtime.adapters.get(lora_id))


@router.post(
    "/adapters/{owner}/{name}/rollback", responses=error_responses(400, 401, 403, 404, 413, 422)
)
def rollback(
    owner: OwnerPart, name: NamePart, body: RollbackBody, runtime: RuntimeDep, caller: Caller
) -> AdapterView:
    lora_id = _lora(owner, name)
    caller.check(lora_id)
    return _view(runtime, runtime.adapters.rollback(lora_id, body.version))


@router.delete("/adapters/{owner}/{name}", responses=_ADAPTER_RESPONSES)
async def delete(
    owner: OwnerPart, name: NamePart, runtime: RuntimeDep, caller: Caller
) -> AdapterDeleted:
    lora_id = _lora(owner, name)
    caller.check(lora_id)
    removed = await runtime.adapters.delete(lora_id)
    await runtime.queue.notify()  # its queued requests are gone: release any waiters
    return AdapterDeleted(lora_id=lora_id, versions_removed=len(removed))


@router.get(
    "/adapters/{owner}/{name}/export",
    response_class=Response,
    responses={
        200: {
            "description": "A zip of the version's PEFT directory.",
            "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
        },
        **_ADAPTER_RESPONSES,
    },
)
async def export(
    owner: OwnerPart,
    name: NamePart,
    runtime: RuntimeDep,
    caller: Caller,
    version: int | None = Query(None, ge=1, le=2**31),
) -> Response:
    lora_id = _lora(owner, name)
    caller.check(lora_id)
    archive = await asyncio.to_thread(runtime.adapters.export, lora_id, version)
    filename = f"{owner}-{name}.zip"
    return Response(
        archive,
        media_type="application/zip",
        headers={"content-disposition": f'attachment; filename="{filename}"'},
    )


@router.get("/adapters/{owner}/{name}/memory", responses=_ADAPTER_RESPONSES)
def memory(
    owner: OwnerPart,
    name: NamePart,
    runtime: RuntimeDep,
    caller: Caller,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
) -> MemoryPage:
    """What the adapter remembers of its feedback, newest first: each lesson's conversation up
    to the answer, the feedback and the example. Feedback requests replay it."""
    lora_id = _lora(owner, name)
    caller.check(lora_id)
    runtime.store.get_adapter(lora_id)
    items = runtime.store.memory(lora_id, limit=limit, offset=offset)
    return MemoryPage(
        lora_id=lora_id,
        data=[MemoryView.of(item) for item in items],
        total=runtime.store.count_memory(lora_id),
        limit=limit,
        offset=offset,
    )


@router.delete("/adapters/{owner}/{name}/memory", responses=_ADAPTER_RESPONSES)
def forget_all(
    owner: OwnerPart, name: NamePart, runtime: RuntimeDep, caller: Caller
) -> MemoryForgotten:
    """Forget everything the adapter remembers; what it learned stays in its weights (roll
    back or delete the adapter to undo that)."""
    lora_id = _lora(owner, name)
    caller.check(lora_id)
    runtime.store.get_adapter(lora_id)
    return MemoryForgotten(lora_id=lora_id, forgotten=runtime.store.forget(lora_id))


@router.delete("/adapters/{owner}/{name}/memory/{memory_id}", responses=_ADAPTER_RESPONSES)
def forget(
    owner: OwnerPart,
    name: NamePart,
    runtime: RuntimeDep,
    caller: Caller,
    memory_id: str = Path(description="the `id` of a memory item", pattern=MEMORY_ID_PATTERN),
) -> MemoryForgotten:
    """Forget one lesson: no later request replays it."""
    lora_id = _lora(owner, name)
    caller.check(lora_id)
    runtime.store.get_adapter(lora_id)
    return MemoryForgotten(lora_id=lora_id, forgotten=runtime.store.forget(lora_id, memory_id))


def _lora(owner: str, name: str) -> str:
    return f"{owner}/{name}"


def _view(runtime: Runtime, adapter: Adapter) -> AdapterView:
    """The adapter with its versions, as create, get and rollback answer."""
    versions = runtime.adapters.versions(adapter.lora_id)
    return AdapterView(**adapter.model_dump(), versions=versions)
