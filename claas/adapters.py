"""Adapter lifecycle through the training service, backed by the store.

An adapter is a LoRA run per user, `owner/name`. `init` creates it on the service and saves its
untrained weights as version 1, so every adapter always has a version to serve and to train from.
Each feedback request adds a version (`claas.feedback` registers what `claas.sdpo.engine`
trains). `rollback` points the adapter back at an earlier version; the next training continues
from there and gets the next free number.

    adapters = Adapters(service, store, base_model="SmolLM2-135M-Instruct")
    await adapters.init("alice/assistant", rank=16)
"""

from __future__ import annotations

import asyncio
import io
import zipfile
from collections.abc import Awaitable, Sequence

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from claas.errors import AdapterNotFound, InvalidRequest, QuotaExceeded
from claas.ids import Int64, parse_lora_id
from claas.records import Adapter, AdapterVersion
from claas.services.protocol import (
    ATTENTION_MODULES,
    MLP_MODULES,
    TINKER_LORA_ALPHA,
    UNEMBED_MODULES,
    ServiceClient,
    TrainingClient,
    capabilities_of,
    delete_checkpoints,
    exact_lora,
    local_checkpoints,
)
from claas.store import Store

ATTN = frozenset(ATTENTION_MODULES)
MLP = frozenset(MLP_MODULES)
UNEMBED = frozenset(UNEMBED_MODULES)
DEFAULT_TARGETS = sorted(ATTN | MLP)
ALL_TARGETS = sorted(ATTN | MLP | UNEMBED)


class AdapterSpec(BaseModel):
    """What `init` accepts: rank, alpha and target modules of a new LoRA adapter."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(32, ge=1, le=256)
    lora_alpha: float = Field(TINKER_LORA_ALPHA, gt=0, le=4096)
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        min_length=1,
        json_schema_extra={"items": {"enum": list[JsonValue](ALL_TARGETS)}},
        description="Which layers get LoRA; hosted Tinker takes whole groups only (attention, "
        "MLP, lm_head).",
    )
    base_model: str | None = None
    seed: Int64 | None = Field(None, description="LoRA init seed (int64)")


class Adapters:
    """Create, list, version, roll back, delete and export adapters."""

    def __init__(
        self,
        service: ServiceClient,
        store: Store,
        base_model: str,
        allowed_base_models: Sequence[str] | None = None,
        max_rank: int = 256,
        max_adapters_per_owner: int | None = None,
    ) -> None:
        self.service = service
        self.store = store
        self.base_model = base_model
        self.allowed_base_models = list(allowed_base_models or [base_model])
        self.max_rank = max_rank
        self.max_adapters_per_owner = max_adapters_per_owner

    async def init(self, lora_id: str, spec: AdapterSpec) -> Adapter:
        owner, _ = parse_lora_id(lora_id)
        if spec.rank > self.max_rank:
            raise InvalidRequest(
                f"rank {spec.rank} is over this server's cap of {self.max_rank}; ask for a "
                "smaller rank (CLAAS_MAX_LORA_RANK)"
            )
        limit = self.max_adapters_per_owner
        if limit is not None and await self._owned(owner) >= limit:
            raise QuotaExceeded(
                f"{owner!r} already has {limit} adapters, the most this server allows "
                "(CLAAS_MAX_ADAPTERS_PER_OWNER); delete one (DELETE /v1/adapters/owner/name) "
                "and retry"
            )
        base_model = spec.base_model or self.base_model
        if base_model not in self.allowed_base_models:
            raise InvalidRequest(
                f"base model {base_model!r} is not allowed here; use one of "
                f"{self.allowed_base_models}"
            )
        unknown = set(spec.target_modules) - ATTN - MLP - UNEMBED
        if unknown or not spec.target_modules:
            raise InvalidRequest(
                f"target_modules must be a non-empty subset of {ALL_TARGETS}; "
                f"unknown: {sorted(unknown)}"
            )
        adapter = await asyncio.to_thread(
            self.store.create_adapter,
            lora_id,
            base_model,
            spec.rank,
            spec.lora_alpha,
            sorted(spec.target_modules),
        )
        saved: list[str] = []
        try:
            trainer = await self._create_training_client(base_model, spec)
            state = await trainer.save_state("init")
            saved.append(state.path)
            sampler = await trainer.save_weights_for_sampler("init")
            saved.append(sampler.path)
            await asyncio.to_thread(
                self.store.add_version, lora_id, state.path, sampler.path, None, {"init": 1}
            )
        except BaseException:
            await asyncio.to_thread(self.store.delete_adapter, lora_id)
            await delete_checkpoints(self.service, saved)
            raise
        return await asyncio.to_thread(self.store.get_adapter, adapter.lora_id)

    async def _owned(self, owner: str) -> int:
        return await asyncio.to_thread(self.store.count_adapters, owner)

    def _create_training_client(
        self, base_model: str, spec: AdapterSpec
    ) -> Awaitable[TrainingClient]:
        """Tinker's flags, plus exact alpha and modules where the service accepts them."""
        modules = set(spec.target_modules)
        attn, mlp, unembed = bool(modules & ATTN), bool(modules & MLP), bool(modules & UNEMBED)
        if capabilities_of(self.service).exact_lora_config:
            return exact_lora(self.service).create_lora_training_client(
                base_model,
                spec.rank,
                spec.seed,
                train_mlp=mlp,
                train_attn=attn,
                train_unembed=unembed,
                target_modules=sorted(modules),
                lora_alpha=spec.lora_alpha,
            )
        if spec.lora_alpha != TINKER_LORA_ALPHA or modules not in _whole_groups(modules):
            raise InvalidRequest(
                "this training service sets LoRA alpha and module groups itself; use "
                f"lora_alpha={TINKER_LORA_ALPHA} and whole groups (attention, MLP, lm_head)"
            )
        return self.service.create_lora_training_client(
            base_model, spec.rank, spec.seed, train_mlp=mlp, train_attn=attn, train_unembed=unembed
        )

    def list_adapters(self, prefix: str = "") -> list[Adapter]:
        return self.store.list_adapters(prefix)

    def get(self, lora_id: str) -> Adapter:
        return self.store.get_adapter(lora_id)

    def versions(self, lora_id: str) -> list[AdapterVersion]:
        return self.store.list_versions(lora_id)

    def rollback(self, lora_id: str, version: int) -> Adapter:
        return self.store.rollback(lora_id, version)

    async def delete(self, lora_id: str) -> list[AdapterVersion]:
        removed = await asyncio.to_thread(self.store.delete_adapter, lora_id)
        await delete_checkpoints(
            self.service, [p for v in removed for p in (v.state_path, v.sampler_path)]
        )
        return removed

    def export(self, lora_id: str, version: int | None = None) -> bytes:
        """A zip of the version's PEFT directory (adapter_config.json + safetensors)."""
        chosen = (
            self.store.get_version(lora_id, version)
            if version is not None
            else self.store.latest_version(lora_id)
        )
        if chosen is None:
            raise AdapterNotFound(f"adapter {lora_id} has no version to export")
        if not capabilities_of(self.service).local_checkpoints:
            raise InvalidRequest(
                "export needs local checkpoints; on hosted Tinker download the weights with "
                f"the Tinker CLI from {chosen.sampler_path}"
            )
        directory = local_checkpoints(self.service).checkpoint_dir(chosen.sampler_path)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for file in sorted(directory.iterdir()):
                if file.name in ("adapter_config.json", "adapter_model.safetensors"):
                    archive.write(file, arcname=file.name)
        return buffer.getvalue()


def _whole_groups(modules: set[str]) -> list[set[str]]:
    """Module sets Tinker's flags can express: unions of whole groups."""
    groups = [ATTN, MLP, UNEMBED]
    return [
        set().union(*(g for g, keep in zip(groups, mask, strict=True) if keep))
        for mask in ((a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1))
        if any(mask)
    ]
