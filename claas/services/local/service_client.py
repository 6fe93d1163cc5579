"""`LocalServiceClient` and `LocalRestClient`: the local `tinker.ServiceClient` and `RestClient`.

The service runs on an `AdapterHost` (one base model and its worker). Give it a `LoadedModel`
and it creates its own host and closes it in `close()`; give it an existing host and it only
uses it, so several services can share one model and one worker while the host's owner (the
runtime) closes it. Checkpoints live under `storage_dir` (see `checkpoints`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from tinker import types
from tinker.lib.public_interfaces.api_future import APIFuture, AwaitableConcurrentFuture
from transformers import PreTrainedTokenizerBase

from claas.errors import InvalidRequest
from claas.models import LoadedModel
from claas.services.local.checkpoints import (
    CheckpointPath,
    delete_checkpoint_dir,
    lora_config_dict,
    read_checkpoint,
    require_checkpoint,
)
from claas.services.local.host import AdapterHost
from claas.services.local.sampling_client import LocalSamplingClient
from claas.services.local.training_client import LocalTrainingClient
from claas.services.protocol import (
    ATTENTION_MODULES,
    MLP_MODULES,
    TINKER_LORA_ALPHA,
    UNEMBED_MODULES,
    ServiceCapabilities,
)


class LocalServiceClient:
    """In-process stand-in for `tinker.ServiceClient` (the methods the engine uses)."""

    # Beyond Tinker's API (see claas.services.protocol): exact LoRA alpha and modules, token
    # streaming, checkpoint files on this machine, a model and threads to close, and OpenAI's
    # penalties and logit_bias.
    capabilities = ServiceCapabilities(
        exact_lora_config=True,
        token_streaming=True,
        local_checkpoints=True,
        closable=True,
        logit_rules=True,
    )

    def __init__(
        self, model: LoadedModel | AdapterHost, storage_dir: Path, max_loaded_samplers: int = 16
    ) -> None:
        """`model`: a `LoadedModel` to host here (a new `AdapterHost` keeping at most
        `max_loaded_samplers` samplers resident, closed by `close`), or an `AdapterHost` to
        share (its owner closes it; `max_loaded_samplers` is then the host's own)."""
        self.storage_dir = Path(storage_dir)
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self._owns_host = not isinstance(model, AdapterHost)
        self.host = (
            model if isinstance(model, AdapterHost) else AdapterHost(model, max_loaded_samplers)
        )

    @property
    def base_model(self) -> str:
        return self.host.loaded.name

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        return self.host.loaded.tokenizer

    def close(self) -> None:
        """Close the host if this service created it; a shared host is its owner's to close."""
        if self._owns_host:
            self.host.close()

    def _check_base_model(self, base_model: str | None) -> None:
        if base_model is not None and base_model != self.base_model:
            raise InvalidRequest(
                f"base model {base_model!r} is not served here; this service runs "
                f"{self.base_model!r}"
            )

    def create_rest_client(self) -> LocalRestClient:
        return LocalRestClient(self)

    def checkpoint_dir(self, path: str) -> Path:
        """The PEFT directory of a checkpoint (for export and vLLM), refusing escapes."""
        return require_checkpoint(self.storage_dir, CheckpointPath.parse(path), False)

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: dict[str, str] | None = None,
        optimizer: types.OptimizerConfig | None = None,
        *,
        lora_alpha: float = TINKER_LORA_ALPHA,
        target_modules: Sequence[str] | None = None,
    ) -> APIFuture[LocalTrainingClient]:
        """A new LoRA run. Beyond Tinker's arguments: `lora_alpha` and explicit `target_modules`."""
        self._check_base_model(base_model)
        if not 1 <= rank <= 1024:
            raise InvalidRequest(f"rank must be in 1..1024, got {rank}")
        if optimizer is not None and optimizer.type != "adamw":
            raise InvalidRequest("the local service supports the adamw optimizer only")
        modules = list(target_modules) if target_modules is not None else []
        if target_modules is None:
            modules += list(ATTENTION_MODULES) if train_attn else []
            modules += list(MLP_MODULES) if train_mlp else []
            modules += list(UNEMBED_MODULES) if train_unembed else []
        if not modules:
            raise InvalidRequest("no LoRA target modules selected; enable attn, mlp or unembed")
        config = lora_config_dict(self.base_model, rank, lora_alpha, modules)
        init_seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
        return self.host.submit(
            lambda: LocalTrainingClient(self, config, None, None, init_seed, user_metadata)
        )

    def create_training_client_from_state(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: dict[str, str] | None = None,
        weights_access_token: str | None = None,
        optimizer: types.OptimizerConfig | None = None,
    ) -> APIFuture[LocalTrainingClient]:
        return self._from_state(path, base_model, user_metadata, with_optimizer=False)

    def create_training_client_from_state_with_optimizer(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: dict[str, str] | None = None,
        weights_access_token: str | None = None,
    ) -> APIFuture[LocalTrainingClient]:
        return self._from_state(path, base_model, user_metadata, with_optimizer=True)

    def _from_state(
        self,
        path: str,
        base_model: str | None,
        user_metadata: dict[str, str] | None,
        with_optimizer: bool,
    ) -> APIFuture[LocalTrainingClient]:
        self._check_base_model(base_model)
        checkpoint_path = CheckpointPath.parse(path)
        require_checkpoint(self.storage_dir, checkpoint_path, with_optimizer)  # fail fast

        def load() -> LocalTrainingClient:  # on the worker: the caller's loop never blocks
            checkpoint = read_checkpoint(self.storage_dir, checkpoint_path, with_optimizer)
            self._check_base_model(checkpoint.adapter_config.get("base_model_name_or_path"))
            return LocalTrainingClient(
                self,
                checkpoint.adapter_config,
                checkpoint.weights,
                checkpoint.optimizer_state,
                0,
                user_metadata,
                steps=int(checkpoint.meta.get("optimizer_steps", 0)),
            )

        return self.host.submit(load)

    def create_sampling_client(
        self,
        model_path: str | None = None,
        base_model: str | None = None,
        retry_config: Any = None,
        record_stability_info: bool = False,
    ) -> APIFuture[LocalSamplingClient]:
        if model_path is None and base_model is None:
            raise InvalidRequest("create_sampling_client needs model_path or base_model")
        self._check_base_model(base_model)
        if model_path is None:
            client = LocalSamplingClient(self, adapter=None, loader=None)
        else:
            checkpoint_path = CheckpointPath.parse(model_path)
            # Fail now, not on first use, if the checkpoint is missing.
            require_checkpoint(self.storage_dir, checkpoint_path, with_optimizer=False)
            digest = hashlib.sha256(str(checkpoint_path).encode()).hexdigest()[:16]
            client = LocalSamplingClient(
                self,
                adapter=f"sampler-{digest}",
                loader=lambda: read_checkpoint(self.storage_dir, checkpoint_path, False),
                model_path=str(checkpoint_path),
            )
        done: Future[LocalSamplingClient] = Future()
        done.set_result(client)
        return AwaitableConcurrentFuture(done)


class LocalRestClient:
    """The checkpoint-management part of `tinker.RestClient`."""

    def __init__(self, service: LocalServiceClient) -> None:
        self.service = service

    def delete_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        checkpoint = CheckpointPath.parse(tinker_path)
        directory = checkpoint.directory(self.service.storage_dir)
        return self.service.host.submit(lambda: delete_checkpoint_dir(directory))
