"""The adapter host: one base model, its named LoRA adapters, and the worker that runs them.

Every training client and every sampler of the local service is a named LoRA adapter on one
`PeftModel`, selected per call (`using`); the base model is never reloaded or copied. Sampler
adapters are loaded on first use and kept in an LRU of at most `max_loaded_samplers`. A training
client's adapter, once released, is kept as a spare slot (at most `SPARE_TRAINING_SLOTS`): the
next training client of the same LoRA config copies its weights into it, where PEFT's
`add_adapter` would build every LoRA layer again (0.4 s of a feedback request on SmolLM2-135M,
with no chat served meanwhile).

An `AdapterHost` is created once by its owner (the runtime, or a `LocalServiceClient` given a
bare `LoadedModel`) and closed by it. Services handed the same host share its worker, so two of
them never run the PEFT model from two threads at once. Adapter methods run on the worker only.
"""

from __future__ import annotations

import contextlib
import functools
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from tinker.lib.public_interfaces.api_future import APIFuture, AwaitableConcurrentFuture

from claas.errors import InvalidRequest, ServiceClosed
from claas.models import LoadedModel, load_model
from claas.services.local.checkpoints import LoadedCheckpoint
from claas.services.local.scheduler import ContinuousDecoder
from claas.services.local.worker import ModelWorker, run_into

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741 - a batched item


class AdapterHost:
    """One base model, its named LoRA adapters, and the single worker thread that runs them."""

    IDLE_ADAPTER = "claas-idle"
    SPARE_TRAINING_SLOTS = 2

    def __init__(
        self, loaded: LoadedModel, max_loaded_samplers: int = 16, packed_weights: bool = True
    ) -> None:
        self.loaded = loaded
        self.max_loaded_samplers = max_loaded_samplers
        self.worker = ModelWorker()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="claas-checkpoints")
        # chats, batched between the worker's tasks
        self.decoder = ContinuousDecoder(self, pack=packed_weights)
        self.decoder.install_yield_points(loaded.model)
        self._peft: Any = None
        self._samplers: OrderedDict[str, None] = OrderedDict()  # LRU of loaded sampler adapters
        self.adapter_changes = 0  # counts adapters added and removed (new LoRA layers may come)
        self._training: set[str] = set()  # the training clients' adapters
        self._spares: list[str] = []  # released training adapters, kept for the next client

    # -- the worker ------------------------------------------------------------------------
    def submit(self, fn: Callable[[], T], urgent: bool = False) -> APIFuture[T]:
        return self.worker.submit(fn, urgent)

    def submit_batched(self, key: str, item: I, run: Callable[[list[I]], list[T]]) -> APIFuture[T]:
        return self.worker.submit_batched(key, item, run)

    def submit_write(self, prepare: Callable[[], Callable[[], T]]) -> APIFuture[T]:
        """`prepare` on the worker (a copy of what to write), then what it returns on the
        checkpoint writer thread: files are written and fsynced while the worker goes on with
        chats and the next task. Writes run one at a time, in the order submitted; the future
        resolves once the files are durable."""
        result: Future[T] = Future()

        def on_worker() -> None:
            try:
                write = prepare()
                self._writer.submit(run_into, write, result)
            except BaseException as error:
                result.set_exception(error)

        self.submit(on_worker)
        return AwaitableConcurrentFuture(result)

    def on_worker_thread(self) -> bool:
        return self.worker.on_worker_thread()

    @property
    def closed(self) -> bool:
        return self.worker.closed

    def close(self) -> None:
        self.worker.close()
        self._writer.shutdown(wait=True)  # the writes the worker's last tasks handed over
        self.decoder.close()

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
        self.adapter_changes += 1
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
        self.adapter_changes += 1
        if self.has_adapter(name):
            self._peft.set_adapter(self.IDLE_ADAPTER)
            self._peft.delete_adapter(name)
        self._samplers.pop(name, None)
        self._training.discard(name)
        if name in self._spares:
            self._spares.remove(name)

    def add_training_adapter(
        self, config: LoraConfig, weights: Mapping[str, torch.Tensor] | None, seed: int
    ) -> str:
        """A new adapter for a training client, with `weights` (None: a fresh init from `seed`);
        its name. Given weights, a spare slot of the same LoRA config that no chat is using
        takes them in place."""
        key = _config_key(config)
        if weights is not None:
            for slot in self._spares:
                same = _config_key(self._peft.peft_config[slot]) == key
                usable = same and not self.decoder.serves(slot)
                if usable and self._copy_weights(slot, weights):
                    self._spares.remove(slot)
                    return slot
        name = f"train-{uuid.uuid4().hex[:16]}"
        self.add_adapter(name, config, weights, seed)
        self._training.add(name)
        return name

    def release_training_adapter(self, name: str) -> None:
        """From any thread (a training client's finalizer): keep the adapter as a spare slot,
        or drop it once there are enough."""

        def release() -> None:
            if name not in self._training or name in self._spares:
                return
            if len(self._spares) >= self.SPARE_TRAINING_SLOTS:
                self.remove_adapter(name)
                return
            for param in self.adapter_parameters(name).values():
                param.requires_grad_(False)
                param.grad = None
            self._spares.append(name)

        with contextlib.suppress(ServiceClosed, RuntimeError):  # closed, or interpreter exiting
            self.submit(release)

    def _copy_weights(self, slot: str, weights: Mapping[str, torch.Tensor]) -> bool:
        """`weights` (PEFT's on-disk key names) copied into `slot`'s parameters; False, with
        nothing copied, when their names or shapes are not the slot's."""
        params = self.adapter_parameters(slot)
        if params.keys() != weights.keys() or any(
            params[k].shape != weights[k].shape for k in params
        ):
            return False
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(weights[key])
                param.grad = None
        return True

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

    def release_adapter(self, name: str) -> None:
        """From any thread (a client's finalizer): drop the adapter on the worker; nothing to
        do once the host is closed."""
        with contextlib.suppress(ServiceClosed, RuntimeError):  # closed, or interpreter exiting
            self.submit(lambda: self.remove_adapter(name))

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


def _config_key(config: LoraConfig) -> tuple[Any, ...]:
    """What makes two adapters' LoRA layers interchangeable."""
    return (config.r, config.lora_alpha, tuple(sorted(config.target_modules or ())))


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
