"""The composition root: one process's service, store, engine, chat and feedback queue.

Built once from `Settings` by `claas serve` (and by tests, with the tiny model). Everything that
holds state lives here, so the API layer stays a thin map from HTTP to these objects.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from transformers import PreTrainedTokenizerBase

from claas import __version__
from claas.adapters import Adapters
from claas.chat import ChatService
from claas.feedback import FeedbackQueue
from claas.models import LoadedModel
from claas.sdpo.engine import SDPOEngine
from claas.services.protocol import Closable, ServiceClient, capabilities_of, local_checkpoints
from claas.settings import Settings
from claas.store import Store

if TYPE_CHECKING:
    from claas.services.local import AdapterHost
    from claas.services.vllm import VLLMBackend

logger = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    service: ServiceClient
    store: Store
    base_model: str
    tokenizer: PreTrainedTokenizerBase
    max_context: int
    engine: SDPOEngine
    adapters: Adapters
    chat: ChatService
    queue: FeedbackQueue
    host: AdapterHost | None = None  # the local service's model and worker, owned here
    inference: VLLMBackend | None = None  # chat's sampler when it is not the training service

    @classmethod
    def build(cls, settings: Settings, loaded: LoadedModel | None = None) -> Runtime:
        """Load the model (or take `loaded`) and wire every part to it."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = Store(settings.database)
        host = None
        housekeeping = None
        service: ServiceClient  # local or hosted: mypy checks both against the seam
        if settings.service == "tinker":
            service, base_model, tokenizer, max_context = _tinker_parts(settings)
            hidden_size, model_type = _local_config_shape(base_model)
        else:
            from claas.services.local import AdapterHost, LocalServiceClient, shared_model
            from claas.services.local.checkpoints import sweep_unreferenced

            if loaded is None:
                loaded = shared_model(settings.model, settings.model_cache_dir, settings.device)
            checkpoints = settings.checkpoints
            # Other processes (workers, a serve) may share the checkpoint root, even on one
            # SQLite file: only what is old enough that no live worker can still be writing or
            # registering it is swept, at start-up and then now and then.
            grace = 2 * settings.lease_seconds
            swept = sweep_unreferenced(checkpoints, store.checkpoint_paths(), grace)
            if swept:
                logger.warning(
                    "removed %d checkpoint dirs that no adapter version references (left by a "
                    "crash): %s",
                    len(swept),
                    ", ".join(str(p.relative_to(checkpoints)) for p in swept),
                )

            def housekeeping() -> None:
                sweep_unreferenced(checkpoints, store.checkpoint_paths(), grace)

            host = AdapterHost(loaded, packed_weights=settings.packed_weights)
            service = LocalServiceClient(host, checkpoints)
            base_model, tokenizer, max_context = loaded.name, loaded.tokenizer, loaded.max_context
            hidden_size = int(loaded.model.config.hidden_size)
            model_type = str(loaded.model.config.model_type)
        # The default learning rate follows the base model's size (default_learning_rate).
        engine = SDPOEngine(service, base_model, max_context, hidden_size, model_type)
        inference = _inference_backend(settings, service, base_model, tokenizer)
        return cls(
            settings=settings,
            service=service,
            store=store,
            base_model=base_model,
            tokenizer=tokenizer,
            max_context=max_context,
            engine=engine,
            adapters=Adapters(
                service,
                store,
                base_model,
                settings.allowed_base_models or None,
                max_rank=settings.max_lora_rank,
                max_adapters_per_owner=settings.max_adapters_per_owner,
            ),
            chat=ChatService(
                inference or service,
                store,
                base_model,
                tokenizer,
                max_context,
                settings.rollout_ttl_seconds,
                max_generations_per_owner=settings.max_concurrent_generations_per_owner,
            ),
            queue=FeedbackQueue(
                store,
                engine,
                settings.max_coalesce,
                max_pending_per_owner=settings.max_pending_feedback_per_owner,
                on_version=inference.load_version if inference is not None else None,
                purge_interval=settings.purge_interval_seconds,
                memory_items=settings.memory_items,
                train=settings.train,
                lease_seconds=settings.lease_seconds,
                poll_seconds=settings.poll_seconds,
                max_batches=settings.max_training_batches,
                housekeeping=housekeeping,
            ),
            host=host,
            inference=inference,
        )

    def facts(self) -> dict[str, Any]:
        """What this process serves, for the start-up log line; no secrets (counts of keys)."""
        settings = self.settings
        return {
            "claas_version": __version__,
            "model": self.base_model,
            "service": settings.service,
            "inference": settings.inference,
            "device": str(self.host.loaded.device) if self.host is not None else None,
            "data_dir": str(settings.data_dir),
            "max_context": self.max_context,
            "owner_keys": len(settings.api_keys),
            "admin_key": settings.admin_key is not None,
            "rollout_ttl_seconds": settings.rollout_ttl_seconds,
            "purge_interval_seconds": settings.purge_interval_seconds,
            "max_coalesce": settings.max_coalesce,
            "log_level": settings.log_level,
        }

    def close(self) -> None:
        if capabilities_of(self.service).closable:
            cast(Closable, self.service).close()
        if self.host is not None:
            self.host.close()
        self.store.close()


def _tinker_parts(settings: Settings) -> tuple[ServiceClient, str, PreTrainedTokenizerBase, int]:
    from claas.errors import InvalidRequest
    from claas.services.tinker import base_model_tokenizer, build_service_client

    if not settings.tinker_base_model:
        raise InvalidRequest(
            "--service tinker needs CLAAS_TINKER_BASE_MODEL, the Tinker base model name "
            "(for example Qwen/Qwen3-8B)"
        )
    service = build_service_client()
    # Local (a directory or the HF cache) if it is here, else the Tinker SDK's get_tokenizer().
    tokenizer = base_model_tokenizer(service, settings.tinker_base_model, settings.model_cache_dir)
    max_context = int(getattr(tokenizer, "model_max_length", 32768) or 32768)
    return service, settings.tinker_base_model, tokenizer, min(max_context, 131072)


def _inference_backend(
    settings: Settings,
    service: ServiceClient,
    base_model: str,
    tokenizer: PreTrainedTokenizerBase,
) -> VLLMBackend | None:
    """The vLLM backend when chat is served by vLLM; None when the training service samples."""
    if settings.inference != "vllm":
        return None
    from claas.errors import InvalidRequest
    from claas.services.vllm import VLLMBackend

    if not settings.vllm_url:
        raise InvalidRequest("--inference vllm needs --vllm-url (CLAAS_VLLM_URL), the vLLM server")
    if not capabilities_of(service).local_checkpoints:
        raise InvalidRequest(
            "--inference vllm loads adapter versions from local checkpoint files; train with "
            "--service local (hosted Tinker keeps its weights remote)"
        )
    return VLLMBackend(
        settings.vllm_url,
        settings.vllm_model or base_model,
        tokenizer,
        local_checkpoints(service),
        api_key=settings.vllm_api_key,
        keep_loaded=settings.vllm_keep_loaded,
    )


def _local_config_shape(model: str) -> tuple[int | None, str | None]:
    """Hidden size and model type from a config in the local HF cache; (None, None) if absent,
    which makes the learning-rate rule assume a large model."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError):
        return None, None
    return getattr(config, "hidden_size", None), getattr(config, "model_type", None)
