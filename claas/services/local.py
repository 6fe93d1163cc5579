"""The local training service: Tinker's client API, in-process, on transformers + PEFT + torch.

claas's SDPO engine is written once against the Tinker SDK (`ServiceClient`, `TrainingClient`,
`SamplingClient`). This module implements the part of that surface the engine uses, so the same
engine code runs on a laptop CPU, one GPU and in every test:

- It takes and returns the real `tinker.types` objects (`Datum`, `ModelInput`, `SampleResponse`,
  `ForwardBackwardOutput`, ...), and every call returns Tinker's own `AwaitableConcurrentFuture`:
  `await` it or call `.result()`.
- Losses follow Tinker's documentation exactly, as plain sums over tokens and datums:
  `cross_entropy`: −Σ logp(target)·weight, targets and weights (N,) or (N, K);
  `importance_sampling`: −Σ exp(logp(target) − sampling_logprob)·advantage.
  Position i of a Datum's `model_input` predicts `target_tokens[i]`.
- The base model is loaded once per process and shared. Every training client and every sampler
  is a named LoRA adapter on one `PeftModel`, selected per call; the base is never reloaded.
  All model work runs on one worker thread, in submission order, which makes the service safe
  under concurrent async callers and lets callers pipeline `forward_backward` + `optim_step`.
- Checkpoints are PEFT directories under the storage dir, written atomically, addressed as
  `local://<run>/weights/<name>` (state + optimizer) or `local://<run>/sampler_weights/<name>`.

    service = LocalServiceClient(load_model("SmolLM2-135M-Instruct", cache), storage_dir)
    trainer = await service.create_lora_training_client(service.base_model, rank=16)
    fwd = trainer.forward_backward(datums, "cross_entropy")
    opt = trainer.optim_step(types.AdamParams(learning_rate=1e-4))
    await fwd, await opt
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from tinker import types
from tinker.lib.public_interfaces.api_future import APIFuture, AwaitableConcurrentFuture
from tinker.types.topk_logprobs import MASK_LOGPROB, TopkLogprobs

from claas.errors import ContextTooLong, InvalidRequest
from claas.models import LoadedModel, load_model
from claas.services.checkpoints import (
    CheckpointPath,
    LoadedCheckpoint,
    check_segment,
    delete_checkpoint_dir,
    lora_config_dict,
    new_run_id,
    read_checkpoint,
    require_checkpoint,
    write_checkpoint,
)
from claas.services.decoding import (
    PromptScores,
    SamplingRule,
    choose_next,
    generate,
    logprobs_at,
    prefill,
    score_prompt,
)

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741 - a batched item


@dataclass
class _Batch(Generic[I, T]):
    """Consecutive same-key work items the worker runs as one call."""

    key: str
    run: Callable[[list[I]], list[T]]
    entries: list[tuple[I, Future[T]]] = field(default_factory=list)


ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
UNEMBED_MODULES = ("lm_head",)
LOSS_INPUTS = {
    "cross_entropy": ("target_tokens", "weights"),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
}
DEFAULT_LORA_ALPHA = 32.0
TokenCallback = Callable[[int, int, float], None]


# ---------------------------------------------------------------------------------------------
# The shared base model and its adapters
# ---------------------------------------------------------------------------------------------


class SharedBase:
    """One base model, its named LoRA adapters, and the single worker thread that runs them."""

    IDLE_ADAPTER = "claas-idle"

    _registry: ClassVar[dict[int, tuple[SharedBase, int]]] = {}  # id(model) -> (host, users)
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def acquire(cls, loaded: LoadedModel, max_loaded_samplers: int = 16) -> SharedBase:
        """The one host of this model in the process: services on one model share its worker,
        so two of them can never run the PEFT model from two threads at once."""
        with cls._registry_lock:
            host, users = cls._registry.get(id(loaded.model), (None, 0))
            if host is None or host._closed:
                host, users = cls(loaded, max_loaded_samplers), 0
            cls._registry[id(loaded.model)] = (host, users + 1)
            return host

    def release(self) -> None:
        with self._registry_lock:
            host, users = self._registry.get(id(self.loaded.model), (self, 1))
            if users > 1:
                self._registry[id(self.loaded.model)] = (host, users - 1)
                return
            self._registry.pop(id(self.loaded.model), None)
        self.close()

    def __init__(self, loaded: LoadedModel, max_loaded_samplers: int = 16) -> None:
        self.loaded = loaded
        self.max_loaded_samplers = max_loaded_samplers
        self._peft: Any = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="claas-model")
        self._samplers: OrderedDict[str, None] = OrderedDict()  # LRU of loaded sampler adapters
        self._closed = False
        self._batch_lock = threading.Lock()
        self._open_batch: _Batch[Any, Any] | None = None

    # -- the worker ------------------------------------------------------------------------
    def submit(self, fn: Callable[[], T]) -> APIFuture[T]:
        if self._closed:
            raise InvalidRequest("the local service is closed; create a new one")
        with self._batch_lock:
            self._open_batch = None  # later batched work must not overtake this task
            future: Future[T] = self._executor.submit(fn)
        return AwaitableConcurrentFuture(future)

    def submit_batched(self, key: str, item: I, run: Callable[[list[I]], list[T]]) -> APIFuture[T]:
        """Queue `item` to run together with consecutive items of the same `key`.

        Items join the open batch only while nothing else was submitted after it, so the
        worker's submission order is kept exactly; the batch runs when the worker reaches it.
        """
        if self._closed:
            raise InvalidRequest("the local service is closed; create a new one")
        result: Future[T] = Future()
        with self._batch_lock:
            batch = self._open_batch
            if batch is None or batch.key != key:
                batch = _Batch(key, run)
                self._open_batch = batch
                self._executor.submit(self._run_batch, batch)
            batch.entries.append((item, result))
        return AwaitableConcurrentFuture(result)

    def _run_batch(self, batch: _Batch[Any, Any]) -> None:
        with self._batch_lock:
            if self._open_batch is batch:
                self._open_batch = None  # closed: later items start a new batch
            entries = list(batch.entries)
        try:
            outputs = batch.run([item for item, _ in entries])
        except BaseException as error:
            for _, future in entries:
                future.set_exception(error)
            return
        for (_, future), output in zip(entries, outputs, strict=True):
            future.set_result(output)

    def close(self) -> None:
        self._closed = True
        self._executor.shutdown(wait=True)

    @property
    def model(self) -> Any:
        """The module to call: the PeftModel once an adapter exists, else the plain base."""
        return self._peft if self._peft is not None else self.loaded.model

    # -- adapters (worker thread only) ----------------------------------------------------------
    def has_adapter(self, name: str) -> bool:
        return self._peft is not None and name in self._peft.peft_config

    def add_adapter(
        self, name: str, config: LoraConfig, weights: Mapping[str, torch.Tensor] | None, seed: int
    ) -> None:
        if self._peft is None:
            # A permanent rank-1 placeholder, never active, so deleting the last real adapter
            # never leaves PEFT without one.
            idle = LoraConfig(r=1, target_modules=["q_proj"], lora_dropout=0.0)
            self._peft = get_peft_model(self.loaded.model, idle, adapter_name=self.IDLE_ADAPTER)
            self._peft.train(False)
        torch.manual_seed(seed)  # LoRA A init draws from the global RNG
        self._peft.add_adapter(name, config)
        if weights is not None:
            result = set_peft_model_state_dict(self._peft, dict(weights), adapter_name=name)
            missing = [k for k in result.missing_keys if f".{name}." in k]
            if result.unexpected_keys or missing:
                self._peft.delete_adapter(name)
                raise InvalidRequest(
                    f"checkpoint weights do not match the adapter config (missing {missing[:3]},"
                    f" unexpected {list(result.unexpected_keys)[:3]}); was it saved for another"
                    " base model?"
                )
        for param in self.adapter_parameters(name).values():
            param.requires_grad_(False)

    def remove_adapter(self, name: str) -> None:
        if self.has_adapter(name):
            self._peft.set_adapter(self.IDLE_ADAPTER)
            self._peft.delete_adapter(name)
        self._samplers.pop(name, None)

    def adapter_parameters(self, name: str) -> dict[str, torch.nn.Parameter]:
        marker = f".{name}."
        return {
            key.replace(marker, "."): param
            for key, param in self._peft.named_parameters()
            if marker in key
        }

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's weights with PEFT's on-disk key names."""
        # Tied embeddings are frozen base weights: never copy them into a checkpoint.
        state: dict[str, torch.Tensor] = get_peft_model_state_dict(
            self._peft, adapter_name=name, save_embedding_layers=False
        )
        return state

    def ensure_sampler(self, name: str, load: Callable[[], LoadedCheckpoint]) -> None:
        """Make a sampler adapter resident, evicting the least recently used beyond the cap."""
        if self.has_adapter(name):
            self._samplers.move_to_end(name, last=True)
            return
        checkpoint = load()
        self.add_adapter(name, peft_lora_config(checkpoint.adapter_config), checkpoint.weights, 0)
        self._samplers[name] = None
        while len(self._samplers) > self.max_loaded_samplers:
            evicted, _ = self._samplers.popitem(last=False)
            self.remove_adapter(evicted)

    @contextmanager
    def using(self, adapter: str | None) -> Iterator[Any]:
        """Run the model with one adapter active, or with none (the base model)."""
        if adapter is None:
            if self._peft is None:
                yield self.loaded.model
            else:
                with self._peft.disable_adapter():
                    yield self._peft
        else:
            self._peft.set_adapter(adapter)
            yield self._peft


def peft_lora_config(adapter_config: Mapping[str, Any]) -> LoraConfig:
    return LoraConfig(
        r=int(adapter_config["r"]),
        lora_alpha=float(adapter_config["lora_alpha"]),
        target_modules=list(adapter_config["target_modules"]),
        lora_dropout=0.0,
        bias="none",
    )


@functools.cache
def shared_model(spec: str, cache_root: Path, device: str) -> LoadedModel:
    """The process-wide base model for a spec: loaded at most once per process."""
    return load_model(spec, cache_root, device)


# ---------------------------------------------------------------------------------------------
# Losses: Tinker's formulas, plain sums
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedDatum:
    input_ids: torch.Tensor  # (N,)
    inputs: dict[str, torch.Tensor]  # loss_fn_inputs as tensors, first dim N


def prepare_datums(
    data: Sequence[types.Datum], loss_fn: str, vocab_size: int, max_context: int
) -> list[PreparedDatum]:
    """Validate datums for `loss_fn` and turn them into tensors. Errors name the datum."""
    if loss_fn not in LOSS_INPUTS:
        raise InvalidRequest(
            f"loss_fn {loss_fn!r} is not supported by the local service; use one of "
            f"{sorted(LOSS_INPUTS)}"
        )
    if not data:
        raise InvalidRequest("no datums given; pass at least one types.Datum")
    prepared = []
    for index, datum in enumerate(data):
        where = f"datum {index}"
        try:
            tokens = datum.model_input.to_ints()
        except ValueError as error:
            raise InvalidRequest(f"{where}: model_input must be token chunks ({error})") from error
        n = len(tokens)
        if n == 0 or n > max_context:
            raise InvalidRequest(f"{where}: model_input has {n} tokens; need 1..{max_context}")
        _check_ids(np.asarray(tokens), vocab_size, f"{where} model_input")
        needed = LOSS_INPUTS[loss_fn]
        unknown = set(datum.loss_fn_inputs) - set(needed)
        missing = [key for key in needed if key not in datum.loss_fn_inputs]
        if missing or unknown:
            raise InvalidRequest(
                f"{where}: {loss_fn} needs loss_fn_inputs {list(needed)}; missing {missing}, "
                f"unexpected {sorted(unknown)}"
            )
        arrays = {key: datum.loss_fn_inputs[key].to_numpy() for key in needed}
        target_shape = arrays["target_tokens"].shape
        if target_shape[:1] != (n,) or len(target_shape) > 2:
            raise InvalidRequest(
                f"{where}: target_tokens has shape {target_shape}; it must be (N,) or (N, K) with "
                f"N = {n}, the model_input length (position i predicts target_tokens[i])"
            )
        if loss_fn == "importance_sampling" and len(target_shape) != 1:
            raise InvalidRequest(f"{where}: importance_sampling needs (N,) target_tokens")
        _check_ids(arrays["target_tokens"], vocab_size, f"{where} target_tokens")
        for key in needed[1:]:
            if arrays[key].shape != target_shape:
                raise InvalidRequest(
                    f"{where}: {key} has shape {arrays[key].shape} but target_tokens has "
                    f"{target_shape}; they must match"
                )
            if not np.all(np.isfinite(arrays[key])):
                raise InvalidRequest(f"{where}: {key} contains NaN or inf; refusing to train")
        prepared.append(
            PreparedDatum(
                input_ids=torch.tensor(tokens, dtype=torch.long),
                inputs={
                    key: torch.from_numpy(np.ascontiguousarray(value))
                    for key, value in arrays.items()
                },
            )
        )
    return prepared


def _check_ids(ids: np.ndarray, vocab_size: int, what: str) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise InvalidRequest(f"{what} has token ids outside [0, {vocab_size}); check the tokenizer")


def target_logprobs(model: Any, batch: Sequence[PreparedDatum], device: torch.device) -> list[Any]:
    """Per datum, log p(target_tokens[i] | model_input[:i+1]), shaped like target_tokens."""
    lengths = [len(d.input_ids) for d in batch]
    width = max(lengths)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    attention = torch.zeros(len(batch), width, dtype=torch.long)
    for row, datum in enumerate(batch):
        input_ids[row, : lengths[row]] = datum.input_ids
        attention[row, : lengths[row]] = 1
    logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
    results = []
    for row, datum in enumerate(batch):
        row_logits = logits[row, : lengths[row]].float()
        targets = datum.inputs["target_tokens"].to(device)
        flat = targets if targets.ndim == 2 else targets[:, None]
        picked = row_logits.gather(-1, flat) - torch.logsumexp(row_logits, dim=-1, keepdim=True)
        results.append(picked if targets.ndim == 2 else picked[:, 0])
    return results


def datum_loss(loss_fn: str, logprobs: torch.Tensor, datum: PreparedDatum) -> torch.Tensor:
    """Tinker's loss for one datum, a plain sum over its positions."""
    inputs = {k: v.to(logprobs.device) for k, v in datum.inputs.items()}
    if loss_fn == "cross_entropy":
        return -(logprobs * inputs["weights"]).sum()
    ratio = torch.exp(logprobs - inputs["logprobs"])
    return -(ratio * inputs["advantages"]).sum()


def _forward_output(
    logprobs: Sequence[torch.Tensor], losses: Sequence[torch.Tensor]
) -> types.ForwardBackwardOutput:
    return types.ForwardBackwardOutput(
        loss_fn_output_type="TensorData",
        loss_fn_outputs=[
            {
                "logprobs": types.TensorData.from_numpy(lp.detach().float().cpu().numpy()),
                "loss": types.TensorData.from_numpy(
                    np.array([float(loss.detach())], dtype=np.float32)
                ),
            }
            for lp, loss in zip(logprobs, losses, strict=True)
        ],
        metrics={"loss:sum": float(sum(float(loss.detach()) for loss in losses))},
    )


# ---------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------


class LocalServiceClient:
    """In-process stand-in for `tinker.ServiceClient` (the methods the engine uses)."""

    def __init__(
        self, model: LoadedModel, storage_dir: Path, max_loaded_samplers: int = 16
    ) -> None:
        self.storage_dir = Path(storage_dir)
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.host = SharedBase.acquire(model, max_loaded_samplers)

    @property
    def base_model(self) -> str:
        return self.host.loaded.name

    def get_tokenizer(self) -> Any:
        return self.host.loaded.tokenizer

    def close(self) -> None:
        self.host.release()

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
        lora_alpha: float = DEFAULT_LORA_ALPHA,
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
            modules += list(ATTN_MODULES) if train_attn else []
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


class LocalTrainingClient:
    """In-process stand-in for `tinker.TrainingClient`: one LoRA adapter and its AdamW state.

    Construct through `LocalServiceClient`; this runs on the worker thread.
    """

    def __init__(
        self,
        service: LocalServiceClient,
        adapter_config: dict[str, Any],
        weights: Mapping[str, torch.Tensor] | None,
        optimizer_state: dict[str, Any] | None,
        seed: int,
        user_metadata: dict[str, str] | None,
        steps: int = 0,
    ) -> None:
        self.service = service
        self.host = service.host
        self.run_id = new_run_id()
        self.adapter = f"train-{self.run_id}"
        self.adapter_config = dict(adapter_config)
        self.user_metadata = dict(user_metadata or {})
        self.optimizer_steps = steps
        self.host.add_adapter(self.adapter, peft_lora_config(adapter_config), weights, seed)
        self._params = self.host.adapter_parameters(self.adapter)
        for param in self._params.values():
            param.requires_grad_(True)
        ordered = [self._params[key] for key in sorted(self._params)]
        self._optimizer = torch.optim.AdamW(ordered, lr=0.0, weight_decay=0.0)
        if optimizer_state is not None:
            self._optimizer.load_state_dict(optimizer_state)
        weakref.finalize(self, _release_adapter, self.host, self.adapter)

    # -- Tinker surface ------------------------------------------------------------------------
    def get_tokenizer(self) -> Any:
        return self.host.loaded.tokenizer

    def forward(
        self,
        data: list[types.Datum],
        loss_fn: types.LossFnType,
        loss_fn_config: Mapping[str, float | str] | None = None,
    ) -> APIFuture[types.ForwardBackwardOutput]:
        batch = self._prepare(data, loss_fn, loss_fn_config)
        return self.host.submit(lambda: self._run(batch, loss_fn, backward=False))

    def forward_backward(
        self,
        data: list[types.Datum],
        loss_fn: types.LossFnType,
        loss_fn_config: Mapping[str, float | str] | None = None,
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """Accumulate gradients of the summed loss; `optim_step` applies and clears them."""
        batch = self._prepare(data, loss_fn, loss_fn_config)
        return self.host.submit(lambda: self._run(batch, loss_fn, backward=True))

    def optim_step(
        self,
        optim_params: types.AdamParams | None = None,
        *,
        adam_params: types.AdamParams | None = None,
    ) -> APIFuture[types.OptimStepResponse]:
        if optim_params is not None and adam_params is not None:
            raise InvalidRequest("pass optim_params or adam_params, not both")
        params = optim_params if optim_params is not None else adam_params
        if not isinstance(params, types.AdamParams):
            raise InvalidRequest("optim_step needs types.AdamParams (the local optimizer is AdamW)")
        values = params.model_dump()
        bad = [k for k, v in values.items() if not (isinstance(v, float) and math.isfinite(v))]
        if bad or params.learning_rate < 0:
            raise InvalidRequest(f"AdamParams must be finite with learning_rate >= 0; bad: {bad}")
        return self.host.submit(lambda: self._optim_step(params))

    def save_state(
        self,
        name: str,
        ttl_seconds: int | None = None,
        overwrite: bool = False,
        user_metadata: dict[str, str] | None = None,
    ) -> APIFuture[types.SaveWeightsResponse]:
        path = CheckpointPath(self.run_id, "weights", check_segment(name, "name"))
        return self.host.submit(
            lambda: types.SaveWeightsResponse(path=self._save(path, True, overwrite))
        )

    def save_weights_for_sampler(
        self,
        name: str,
        ttl_seconds: int | None = None,
        user_metadata: dict[str, str] | None = None,
    ) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        path = CheckpointPath(self.run_id, "sampler_weights", check_segment(name, "name"))
        return self.host.submit(
            lambda: types.SaveWeightsForSamplerResponse(path=self._save(path, False, False))
        )

    def save_weights_and_get_sampling_client(
        self,
        name: str | None = None,
        retry_config: Any = None,
        record_stability_info: bool = False,
        kind: types.SamplingClientKind = "snapshot",
    ) -> APIFuture[LocalSamplingClient]:
        """`inflight`: a sampler on this adapter's live weights (no copy, no disk).
        `snapshot`: a sampler on an in-memory copy of the current weights."""
        if kind == "inflight":
            return self.host.submit(lambda: LocalSamplingClient(self.service, self.adapter, None))
        return self.host.submit(self._snapshot_sampler)

    def create_sampling_client(
        self, model_path: str, retry_config: Any = None, record_stability_info: bool = False
    ) -> APIFuture[LocalSamplingClient]:
        return self.service.create_sampling_client(model_path=model_path)

    def load_state(self, path: str) -> APIFuture[types.LoadWeightsResponse]:
        return self._load(path, with_optimizer=False)

    def load_state_with_optimizer(self, path: str) -> APIFuture[types.LoadWeightsResponse]:
        return self._load(path, with_optimizer=True)

    # -- extensions used by tests and benchmarks ------------------------------------------------
    def lora_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The live LoRA parameters (PEFT names without the adapter name)."""
        return dict(self._params)

    # -- worker-thread bodies ----------------------------------------------------------------
    def _prepare(
        self, data: list[types.Datum], loss_fn: str, config: Mapping[str, Any] | None
    ) -> list[PreparedDatum]:
        if config:
            raise InvalidRequest("loss_fn_config is not supported by the local service")
        loaded = self.host.loaded
        return prepare_datums(data, loss_fn, len(loaded.tokenizer), loaded.max_context)

    def _run(
        self, batch: list[PreparedDatum], loss_fn: str, backward: bool
    ) -> types.ForwardBackwardOutput:
        with self.host.using(self.adapter) as model, torch.set_grad_enabled(backward):
            for param in self._params.values():
                param.requires_grad_(True)
            logprobs = target_logprobs(model, batch, self.host.loaded.device)
            losses = [
                datum_loss(loss_fn, lp, datum) for lp, datum in zip(logprobs, batch, strict=True)
            ]
            if backward:
                total = torch.stack(losses).sum()
                if not torch.isfinite(total):
                    raise InvalidRequest("the loss is NaN or inf; no gradient was accumulated")
                total.backward()  # type: ignore[no-untyped-call]
        return _forward_output(logprobs, losses)

    def _optim_step(self, params: types.AdamParams) -> types.OptimStepResponse:
        grads = [p.grad for p in self._params.values() if p.grad is not None]
        norm = (
            float(
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            )
            if grads
            else 0.0
        )
        if not math.isfinite(norm):
            self._optimizer.zero_grad(set_to_none=True)
            raise InvalidRequest("the gradient is NaN or inf; the step was skipped, weights kept")
        for group in self._optimizer.param_groups:
            group.update(
                lr=params.learning_rate,
                betas=(params.beta1, params.beta2),
                eps=params.eps,
                weight_decay=params.weight_decay,
            )
        if params.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(self._params.values()), params.grad_clip_norm)
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        return types.OptimStepResponse(
            metrics={"grad_norm": norm, "learning_rate": params.learning_rate}
        )

    def _save(self, path: CheckpointPath, with_optimizer: bool, overwrite: bool) -> str:
        write_checkpoint(
            self.service.storage_dir,
            path,
            self.adapter_config,
            self.host.adapter_state_dict(self.adapter),
            self._optimizer.state_dict() if with_optimizer else None,
            {
                "run_id": self.run_id,
                "optimizer_steps": self.optimizer_steps,
                "saved_at": time.time(),
                "user_metadata": self.user_metadata,
            },
            overwrite=overwrite,
        )
        return str(path)

    def _snapshot_sampler(self) -> LocalSamplingClient:
        weights = {
            k: v.detach().clone() for k, v in self.host.adapter_state_dict(self.adapter).items()
        }
        snapshot = LoadedCheckpoint(self.adapter_config, weights, None, {})
        return LocalSamplingClient(
            self.service, adapter=f"snapshot-{uuid.uuid4().hex[:16]}", loader=lambda: snapshot
        )

    def _load(self, path: str, with_optimizer: bool) -> APIFuture[types.LoadWeightsResponse]:
        checkpoint = read_checkpoint(
            self.service.storage_dir, CheckpointPath.parse(path), with_optimizer
        )
        if peft_lora_config(checkpoint.adapter_config) != peft_lora_config(self.adapter_config):
            raise InvalidRequest(f"{path} has a different LoRA config than this training client")

        def load() -> types.LoadWeightsResponse:
            set_peft_model_state_dict(self.host._peft, checkpoint.weights, self.adapter)
            if checkpoint.optimizer_state is not None:
                self._optimizer.load_state_dict(checkpoint.optimizer_state)
            return types.LoadWeightsResponse(path=path)

        return self.host.submit(load)


def _release_adapter(host: SharedBase, adapter: str) -> None:
    """Finalizer of a client: drop its adapter on the worker (nothing to do at shutdown)."""
    with contextlib.suppress(InvalidRequest, RuntimeError):  # closed, or interpreter exiting
        host.submit(lambda: host.remove_adapter(adapter))


class LocalSamplingClient:
    """In-process stand-in for `tinker.SamplingClient`, bound to one adapter or to the base."""

    def __init__(
        self,
        service: LocalServiceClient,
        adapter: str | None,
        loader: Callable[[], LoadedCheckpoint] | None,
        model_path: str | None = None,
    ) -> None:
        self.service = service
        self.host = service.host
        self.adapter = adapter
        self.model_path = model_path
        self._loader = loader
        if loader is not None and adapter is not None:
            weakref.finalize(self, _release_adapter, self.host, adapter)

    def get_tokenizer(self) -> Any:
        return self.host.loaded.tokenizer

    def get_base_model(self) -> str:
        return self.service.base_model

    def sample(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
        target_prompt_logprobs: types.TensorData | None = None,
        prompt_alt_tokens_k: int = 0,
        prompt_logprobs_last_n: int | None = None,
        *,
        on_token: TokenCallback | None = None,
    ) -> APIFuture[types.SampleResponse]:
        """Tinker's `sample`. Beyond it: `on_token(sample, token, logprob)` for streaming.

        `prompt_logprobs_last_n` scores only the last N prompt positions (prompt and top-K
        log-probs of earlier ones are None), and rows of `target_prompt_logprobs` before the
        first requested id are not computed, as on Tinker; both skip work here.
        """
        if topk_sample_logprobs or prompt_alt_tokens_k:
            raise InvalidRequest(
                "topk_sample_logprobs and prompt_alt_tokens_k are not supported by the local "
                "service"
            )
        if prompt_logprobs_last_n is not None and not include_prompt_logprobs:
            raise InvalidRequest("prompt_logprobs_last_n requires include_prompt_logprobs=True")
        request = self._validate(
            prompt, num_samples, sampling_params, topk_prompt_logprobs, target_prompt_logprobs
        )
        length = len(request.prompt)
        # Prompt and top-K log-probs: every position, or the last N. Target rows: from the
        # first row naming an id. The forward pass projects logits from the earliest of both.
        prompt_row = _last_n_row(length, prompt_logprobs_last_n)
        wants_prompt = include_prompt_logprobs or topk_prompt_logprobs > 0
        first_row = min(
            prompt_row if wants_prompt else length - 1, _first_target_row(length, request.targets)
        )
        scoring = include_prompt_logprobs or topk_prompt_logprobs > 0 or request.targets is not None
        single = num_samples == 1 and request.max_tokens == 1 and not request.stop_strings
        if scoring and single and on_token is None:
            # A scoring pass (the engine sends several at once): batch it with its neighbours.
            job = _ScoreJob(
                request, include_prompt_logprobs, topk_prompt_logprobs, first_row, prompt_row
            )
            key = f"score:{self.adapter}:{id(self._loader)}"
            return self.host.submit_batched(key, job, self._score_batch)
        return self.host.submit(
            lambda: self._sample(
                request,
                include_prompt_logprobs,
                topk_prompt_logprobs,
                on_token,
                first_row,
                prompt_row,
            )
        )

    def compute_logprobs(
        self, prompt: types.ModelInput, prompt_logprobs_last_n: int | None = None
    ) -> APIFuture[list[float | None]]:
        request = self._validate(prompt, 1, types.SamplingParams(max_tokens=1), 0, None)
        first_row = _last_n_row(len(request.prompt), prompt_logprobs_last_n)

        def score() -> list[float | None]:
            length = len(request.prompt)
            with self._active() as model, torch.inference_mode():
                logits, _ = prefill(model, request.prompt, keep=length - first_row)
                scores = score_prompt(logits, request.prompt, 0, None, first_row)
            values: list[float | None] = [None] * (first_row + 1)
            return values + scores.token_logprobs.tolist()

        return self.host.submit(score)

    # -- internals ----------------------------------------------------------------------------
    def _validate(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        params: types.SamplingParams,
        topk: int,
        targets: types.TensorData | None,
    ) -> _SampleRequest:
        loaded = self.host.loaded
        try:
            tokens = prompt.to_ints()
        except ValueError as error:
            raise InvalidRequest(f"prompt must be token chunks ({error})") from error
        if not tokens:
            raise InvalidRequest("the prompt is empty; give at least one token")
        _check_ids(np.asarray(tokens), len(loaded.tokenizer), "prompt")
        if not 1 <= num_samples <= 64:
            raise InvalidRequest(f"num_samples must be in 1..64, got {num_samples}")
        if not 0 <= topk <= 1000:
            raise InvalidRequest(f"topk_prompt_logprobs must be in 0..1000, got {topk}")
        room = loaded.max_context - len(tokens)
        max_tokens = params.max_tokens if params.max_tokens is not None else min(room, 4096)
        if max_tokens < 1 or max_tokens > room:
            raise ContextTooLong(
                f"prompt of {len(tokens)} tokens + max_tokens {max_tokens} exceeds the model's "
                f"context of {loaded.max_context}; shorten the prompt or lower max_tokens"
            )
        target_ids = None
        if targets is not None:
            target_ids = targets.to_torch(pad_value=-1).long()
            if target_ids.ndim != 2 or target_ids.shape[0] != len(tokens) - 1:
                raise InvalidRequest(
                    f"target_prompt_logprobs must have shape (len(prompt) - 1, K) = "
                    f"({len(tokens) - 1}, K); got {tuple(target_ids.shape)}"
                )
            if target_ids.numel() and (
                target_ids.min() < -1 or target_ids.max() >= len(loaded.tokenizer)
            ):
                raise InvalidRequest("target_prompt_logprobs ids must be -1 or valid token ids")
        if not (params.temperature >= 0 and 0 < params.top_p <= 1):
            raise InvalidRequest("temperature must be >= 0 and top_p in (0, 1]")
        return _SampleRequest(
            prompt=torch.tensor(tokens, dtype=torch.long, device=loaded.device),
            num_samples=num_samples,
            max_tokens=max_tokens,
            rule=SamplingRule(params.temperature, params.top_k, params.top_p),
            stop_ids=self._stop_ids(params.stop),
            stop_strings=[params.stop]
            if isinstance(params.stop, str)
            else [s for s in (params.stop or []) if isinstance(s, str)],
            seed=params.seed,
            targets=None if target_ids is None else target_ids.to(loaded.device),
        )

    def _stop_ids(self, stop: str | Sequence[str] | Sequence[int] | None) -> list[int]:
        defaults = self.host.loaded.stop_token_ids
        if stop is None or isinstance(stop, str):
            return defaults
        ids = [s for s in stop if isinstance(s, int)]
        return ids if ids or not stop else defaults

    @contextmanager
    def _active(self) -> Iterator[Any]:
        if self.adapter is not None and self._loader is not None:
            self.host.ensure_sampler(self.adapter, self._loader)
        with self.host.using(self.adapter) as model:
            yield model

    def _score_batch(self, jobs: list[_ScoreJob]) -> list[types.SampleResponse]:
        """Several one-token scoring passes as one right-padded forward (causal attention:
        padding after a prompt never reaches its positions), projecting only needed rows."""
        device = self.host.loaded.device
        lengths = [len(job.request.prompt) for job in jobs]
        input_ids = torch.zeros(len(jobs), max(lengths), dtype=torch.long, device=device)
        for row, job in enumerate(jobs):
            input_ids[row, : lengths[row]] = job.request.prompt
        responses = []
        with self._active() as model, torch.inference_mode():
            causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
            # No padding mask on purpose: with causal attention a row's real positions never
            # see the padding after them, and the unmasked causal kernel is the fast one.
            hidden = causal_lm.model(input_ids=input_ids)[0]
            for row, job in enumerate(jobs):
                request = job.request
                logits = causal_lm.lm_head(hidden[row, job.first_row : lengths[row]]).float()
                scores = score_prompt(
                    logits, request.prompt, job.topk, request.targets, job.first_row
                )
                generator = torch.Generator(device=device)
                seed = (
                    request.seed
                    if request.seed is not None
                    else int.from_bytes(os.urandom(8), "little")
                )
                generator.manual_seed(seed % 2**64)
                token = choose_next(logits[-1:], request.rule, generator)
                logprob = logprobs_at(logits[-1:], token[:, None])
                sequence = types.SampledSequence(
                    stop_reason="stop" if int(token) in request.stop_ids else "length",
                    sequence_id=f"seq-{uuid.uuid4().hex}",
                    tokens_np=token.cpu().numpy().astype(np.int32),
                    logprobs_np=logprob[:, 0].cpu().numpy().astype(np.float32),
                )
                responses.append(
                    _sample_response(
                        [sequence],
                        scores,
                        job.include_prompt_logprobs,
                        lengths[row],
                        job.prompt_row,
                    )
                )
        return responses

    def _sample(
        self,
        request: _SampleRequest,
        include_prompt_logprobs: bool,
        topk: int,
        on_token: TokenCallback | None,
        first_row: int,
        prompt_row: int,
    ) -> types.SampleResponse:
        tokenizer = self.host.loaded.tokenizer
        generator = torch.Generator(device=request.prompt.device)
        seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(8), "little")
        generator.manual_seed(seed % 2**64)  # any int seeds; torch takes 0 .. 2**64 - 1
        stop_check = None
        if request.stop_strings:
            window = max(len(s) for s in request.stop_strings) + 16

            def stop_check(tokens: list[int]) -> bool:
                tail = tokenizer.decode(tokens[-window:], skip_special_tokens=False)
                return any(s in tail for s in request.stop_strings)

        with self._active() as model, torch.inference_mode():
            scoring = include_prompt_logprobs or topk > 0 or request.targets is not None
            keep = len(request.prompt) - first_row if scoring else 1
            logits, cache = prefill(model, request.prompt, keep)
            scores = None
            if scoring:
                scores = score_prompt(logits, request.prompt, topk, request.targets, first_row)
            generations = generate(
                model,
                logits[-1],
                cache,
                request.num_samples,
                request.max_tokens,
                request.rule,
                request.stop_ids,
                stop_check,
                generator,
                on_token,
            )
        sequences = [
            types.SampledSequence(
                stop_reason="stop" if g.stopped else "length",
                sequence_id=f"seq-{uuid.uuid4().hex}",
                tokens_np=np.asarray(g.tokens, dtype=np.int32),
                logprobs_np=np.asarray(g.logprobs, dtype=np.float32),
            )
            for g in generations
        ]
        return _sample_response(
            sequences, scores, include_prompt_logprobs, len(request.prompt), prompt_row
        )


def _last_n_row(length: int, last_n: int | None) -> int:
    """The first logits row (row i predicts prompt[i+1]) that `prompt_logprobs_last_n` scores."""
    if last_n is None:
        return 0
    if not 1 <= last_n <= length - 1:
        raise InvalidRequest(
            f"prompt_logprobs_last_n must be in 1..len(prompt) - 1 = {length - 1}, got {last_n}"
        )
    return length - 1 - last_n


def _first_target_row(length: int, targets: torch.Tensor | None) -> int:
    """Rows of target_prompt_logprobs before the first one naming an id are not scored."""
    if targets is None:
        return length - 1
    named = torch.nonzero((targets >= 0).any(dim=-1))
    return int(named[0, 0]) if len(named) else length - 1


@dataclass(frozen=True)
class _ScoreJob:
    request: _SampleRequest
    include_prompt_logprobs: bool
    topk: int
    first_row: int
    prompt_row: int


@dataclass(frozen=True)
class _SampleRequest:
    prompt: torch.Tensor
    num_samples: int
    max_tokens: int
    rule: SamplingRule
    stop_ids: list[int]
    stop_strings: list[str]
    seed: int | None
    targets: torch.Tensor | None


def _sample_response(
    sequences: list[types.SampledSequence],
    scores: PromptScores | None,
    include_prompt_logprobs: bool,
    length: int,
    prompt_row: int,
) -> types.SampleResponse:
    """Tinker's layout: prompt position p is row p − 1 of the scores. Prompt and top-K
    log-probs start at `prompt_row` (earlier positions: NaN / sentinel rows), targets at the
    scores' first row (earlier: 0.0)."""
    prompt_logprobs = topk = target = None
    if scores is not None:
        skip = prompt_row - scores.first_row  # rows computed only for the targets
        start = prompt_row + 1  # the first prompt position with a prompt log-prob
        if include_prompt_logprobs:
            prompt_logprobs = np.full(length, np.nan, dtype=np.float32)
            prompt_logprobs[start:] = scores.token_logprobs[skip:].cpu().numpy()
        if scores.topk_ids is not None and scores.topk_logprobs is not None:
            k = scores.topk_ids.shape[1]
            ids = np.zeros((length, k), dtype=np.int32)
            logprobs = np.full((length, k), MASK_LOGPROB, dtype=np.float32)
            ids[start:] = scores.topk_ids[skip:].cpu().numpy()
            logprobs[start:] = scores.topk_logprobs[skip:].cpu().numpy()
            topk = TopkLogprobs(token_ids=ids, logprobs=logprobs)
        if scores.target_logprobs is not None:
            rows = scores.target_logprobs.cpu().numpy()
            full = np.zeros((length - 1, rows.shape[1]), dtype=np.float32)
            full[scores.first_row :] = rows
            target = types.TensorData.from_numpy(full)
    return types.SampleResponse(
        sequences=sequences,
        prompt_logprobs_np=prompt_logprobs,
        topk_prompt_logprobs_np=topk,
        target_prompt_logprobs=target,
    )
