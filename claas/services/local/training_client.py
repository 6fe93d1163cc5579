"""`LocalTrainingClient`: the local `tinker.TrainingClient`, one LoRA adapter and its AdamW state.

Forward, backward and optimizer steps run on the host's worker in submission order, so a caller
can pipeline `forward_backward` + `optim_step`. Checkpoints are PEFT directories written through
`checkpoints`, addressed as `local://<run>/weights/<name>` (state + optimizer) or
`local://<run>/sampler_weights/<name>`.
"""

from __future__ import annotations

import copy
import math
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np
import torch
from peft import set_peft_model_state_dict
from tinker import types
from tinker.lib.public_interfaces.api_future import APIFuture
from tinker.lib.public_interfaces.custom_loss import LossHandle
from transformers import PreTrainedTokenizerBase

from claas.errors import InvalidRequest
from claas.services.local.checkpoints import (
    CheckpointPath,
    LoadedCheckpoint,
    check_segment,
    new_run_id,
    read_checkpoint,
    write_checkpoint,
)
from claas.services.local.host import peft_lora_config
from claas.services.local.losses import (
    PreparedDatum,
    _forward_output,
    datum_loss,
    prepare_datums,
    target_logprobs,
)
from claas.services.local.sampling_client import LocalSamplingClient
from claas.services.protocol import CustomLoss

if TYPE_CHECKING:
    from claas.services.local.service_client import LocalServiceClient

R = TypeVar("R")


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
        self.adapter_config = dict(adapter_config)
        self.user_metadata = dict(user_metadata or {})
        self.optimizer_steps = steps
        self.adapter = self.host.add_training_adapter(
            peft_lora_config(adapter_config), weights, seed
        )
        self._params = self.host.adapter_parameters(self.adapter)
        for param in self._params.values():
            param.requires_grad_(True)
        ordered = [self._params[key] for key in sorted(self._params)]
        self._optimizer = torch.optim.AdamW(ordered, lr=0.0, weight_decay=0.0)
        if optimizer_state is not None:
            self._optimizer.load_state_dict(optimizer_state)
        weakref.finalize(self, self.host.release_training_adapter, self.adapter)

    # -- Tinker surface ------------------------------------------------------------------------
    def get_tokenizer(self) -> PreTrainedTokenizerBase:
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

    def forward_backward_custom(
        self,
        data: list[types.Datum],
        loss_fn: CustomLoss,
        *,
        loss_type_input: Literal["logprobs"] | None = None,
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """Accumulate the gradient of `loss_fn(data, logprobs)`, in one forward and one backward.

        Tinker's semantics: `loss_fn` receives every datum as given and, per datum, its
        log-probs at `target_tokens` as a detached float32 leaf tensor that requires grad. It
        returns (scalar loss, metrics). Its gradient with respect to those log-probs is carried
        into the model, as hosted Tinker does with a `cross_entropy` backward at
        weights = −∂loss/∂logprobs; here the forward that made the log-probs is kept, so the
        backward needs no second forward. `loss:sum` is the custom loss, `surrogate_loss:sum`
        that linear loss, and the outputs are the log-probs and each datum's linear loss.

        A loss that fails (an exception, or a refused result: not a scalar, NaN, not depending
        on every datum) fails this call and adds no gradient; the client stays usable. (The
        SDK instead rejects that client's later requests too: a client-side constraint of its
        request ids, not a rule of the loss.) A backward that fails partway clears the
        gradients, so a pipelined `optim_step` never applies a part of one.
        """
        if isinstance(loss_fn, LossHandle) or not callable(loss_fn):
            raise InvalidRequest(
                "the local service runs a custom loss given as a callable "
                "loss_fn(data, logprobs) -> (loss, metrics); a LossHandle is not supported"
            )
        batch = self._prepare([_scoring_datum(d) for d in data], "cross_entropy", None)
        return self.host.submit(lambda: self._run_custom(data, batch, loss_fn))

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
        return self.host.submit_write(
            lambda: self._writer(path, True, overwrite, types.SaveWeightsResponse)
        )

    def save_weights_for_sampler(
        self,
        name: str,
        ttl_seconds: int | None = None,
        user_metadata: dict[str, str] | None = None,
    ) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        path = CheckpointPath(self.run_id, "sampler_weights", check_segment(name, "name"))
        return self.host.submit_write(
            lambda: self._writer(path, False, False, types.SaveWeightsForSamplerResponse)
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
            return self.host.submit(
                lambda: LocalSamplingClient(self.service, self.adapter, None, owner=self)
            )
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
                self._backward([total])
        return _forward_output(logprobs, losses)

    def _run_custom(
        self, data: list[types.Datum], batch: list[PreparedDatum], loss_fn: CustomLoss
    ) -> types.ForwardBackwardOutput:
        with self.host.using(self.adapter) as model, torch.enable_grad():
            for param in self._params.values():
                param.requires_grad_(True)
            live = target_logprobs(model, batch, self.host.loaded.device)
            # What the SDK hands a loss: float32 CPU leaves, cut off from the model.
            leaves = [lp.detach().float().cpu().requires_grad_(True) for lp in live]
            self.host.decoder.yield_point()  # the loss takes a while: chats need not wait
            loss, metrics = loss_fn(data, leaves)
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0 or not loss.requires_grad:
                raise InvalidRequest(
                    "the custom loss must return a scalar tensor computed from the log-probs"
                )
            custom = float(loss.detach())
            loss.backward()  # type: ignore[no-untyped-call]
            grads = [leaf.grad for leaf in leaves if leaf.grad is not None]
            if len(grads) < len(leaves):
                raise InvalidRequest("the custom loss does not depend on every datum's log-probs")
            if not math.isfinite(custom) or not all(bool(torch.isfinite(g).all()) for g in grads):
                raise InvalidRequest("the custom loss or its gradient is NaN or inf; no gradient")
            self.host.decoder.yield_point()
            self._backward(live, [g.to(lp) for g, lp in zip(grads, live, strict=True)])
        # The linear loss hosted Tinker backpropagates: −Σ logp·weights, weights = −grad.
        losses = [(lp.detach().cpu() * g).sum() for lp, g in zip(live, grads, strict=True)]
        output = _forward_output(live, losses)
        output.metrics["surrogate_loss:sum"] = output.metrics.pop("loss:sum")
        output.metrics.update(metrics)
        output.metrics["loss:sum"] = custom
        return output

    def _backward(
        self, outputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor] | None = None
    ) -> None:
        """Accumulate the gradient of `outputs` (weighted by `grads`) into the adapter. A backward
        that fails partway clears the gradients, so a pipelined `optim_step` never applies a
        part of one."""
        try:
            torch.autograd.backward(outputs, grads)
        except BaseException:
            for param in self._params.values():
                param.grad = None
            raise

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

    def _writer(
        self, path: CheckpointPath, with_optimizer: bool, overwrite: bool, answer: Callable[..., R]
    ) -> Callable[[], R]:
        """On the worker: a copy of the weights (and the optimizer's state) as they are now; the
        writing of the checkpoint from that copy, for the writer thread."""
        weights = self._weights_now()
        optimizer = copy.deepcopy(self._optimizer.state_dict()) if with_optimizer else None
        meta = {
            "run_id": self.run_id,
            "optimizer_steps": self.optimizer_steps,
            "saved_at": time.time(),
            "user_metadata": self.user_metadata,
        }
        root, config = self.service.storage_dir, self.adapter_config

        def write() -> R:
            write_checkpoint(root, path, config, weights, optimizer, meta, overwrite=overwrite)
            return answer(path=str(path))

        return write

    def _weights_now(self) -> dict[str, torch.Tensor]:
        """A copy of the adapter's weights as they are now (PEFT's on-disk key names)."""
        return {
            k: v.detach().clone() for k, v in self.host.adapter_state_dict(self.adapter).items()
        }

    def _snapshot_sampler(self) -> LocalSamplingClient:
        snapshot = LoadedCheckpoint(self.adapter_config, self._weights_now(), None, {})
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


def _scoring_datum(datum: types.Datum) -> types.Datum:
    """What hosted Tinker's forward sees of a custom-loss datum: its target_tokens, and its
    weights or zeros (every other loss_fn_inputs field stays on the client)."""
    targets = datum.loss_fn_inputs.get("target_tokens")
    if targets is None:
        raise InvalidRequest("a custom-loss datum needs loss_fn_inputs['target_tokens']")
    weights = datum.loss_fn_inputs.get("weights")
    if weights is None:
        weights = types.TensorData.from_numpy(np.zeros(targets.to_numpy().shape, np.float32))
    return types.Datum(
        model_input=datum.model_input,
        loss_fn_inputs={"target_tokens": targets, "weights": weights},
    )
