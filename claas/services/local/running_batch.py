"""The running batch of chat samples, and the batched forwards that advance it.

A prefill runs the joining prompts in one left-padded forward and gives each its first token; a
decode step runs one forward for every running row and gives each its next token. In both, each
row is on its own adapter by the batched LoRA term (`lora_term`), the base linears run on packed
weights where they pay (`packed`), and the rows and their shared KV cache are kept by `kv_rows`.
Sampling is each request's own `decoding.SampleStream`, so a request gives the same tokens alone
or batched. When a request ends, its `done` or `failed` is told here.

Which requests join, and when the forwards run, is the scheduler's (`scheduler`). Everything
here runs on the model worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from claas.models import LoadedModel
from claas.services.local import kv_rows
from claas.services.local.decoding import Generation, SampleStream
from claas.services.local.kv_rows import Rows
from claas.services.local.lora_term import AdapterWeights, BatchedLora, adapter_weights
from claas.services.local.packed import PackedWeights

logger = logging.getLogger(__name__)


@dataclass(eq=False)  # identity: a job is one request
class DecodeJob:
    """One chat request: its prompt, how to sample it, and whom to tell when it ends."""

    prompt: torch.Tensor  # (L,)
    stream: SampleStream
    adapter: str | None  # None: the base model
    activate: Callable[[], None]  # makes the adapter resident (worker thread)
    done: Callable[[list[Generation]], None]
    failed: Callable[[BaseException], None]
    lora: AdapterWeights = field(default_factory=dict)


class BatchHost(Protocol):
    """What the batched forwards use of the host (`AdapterHost`)."""

    @property
    def model(self) -> Any:
        """The module to call (the PEFT model once an adapter exists)."""

    @property
    def loaded(self) -> LoadedModel:
        """The base model, whose linears are packed."""

    @property
    def adapter_changes(self) -> int:
        """Counts adapters added and removed: LoRA layers may have come or gone."""


class RunningBatch:
    """The running rows, each on its own adapter, and the forwards that advance them."""

    def __init__(self, host: BatchHost, pack: bool = True) -> None:
        self.host = host
        self.lora = BatchedLora()
        self.packed_weights = PackedWeights(pack)
        self.rows: Rows[DecodeJob] | None = None
        self.widest_batch = 0  # the most rows one step has run (for tests and benchmarks)
        self.rows_decoded = 0  # rows run by decode steps so far: one per sampled token

    @property
    def running_rows(self) -> int:
        """Samples decoding now (a request with n samples has n rows)."""
        rows = self.rows
        return len(rows.jobs) if rows is not None else 0

    def jobs(self) -> list[DecodeJob]:
        """The running requests, each once, in their rows' order."""
        return list(dict.fromkeys(self.rows.jobs)) if self.rows is not None else []

    def clear(self) -> None:
        """No rows run: nothing is kept for them, neither cache nor adapter layout."""
        self.rows = None
        self.lora.forget()

    def close(self) -> None:
        """Take the LoRA hooks off the model and drop the packed weights and the rows."""
        self.lora.close()
        self.packed_weights.close()
        self.clear()

    def prefill(self, jobs: list[DecodeJob]) -> None:
        """The joining prompts in one left-padded forward, each row on its own adapter by the
        batched LoRA term as in a decode step; their first tokens; then the samples that go on
        join the batch."""
        ready = []
        for job in jobs:
            try:
                job.activate()  # outside inference mode: a loaded adapter's weights stay trainable
                if job.adapter is not None:
                    job.lora = adapter_weights(self.host.model, job.adapter)
            except Exception as error:
                tell(job.failed, error)
            else:
                ready.append(job)
        if not ready:
            return
        input_ids, mask = kv_rows.left_padded([job.prompt for job in ready])
        model = self.host.model
        everyone = (self.rows.jobs if self.rows is not None else []) + ready
        plan = self.lora.prefill_plan([job.adapter for job in ready], _weights_of(everyone))
        self.lora.find_layers(model, self.host.adapter_changes)
        try:
            with (
                torch.inference_mode(),
                self.lora.applying(plan),
                self.packed_weights.active(self.host.loaded),
            ):
                out = model(
                    input_ids=input_ids,
                    attention_mask=mask,
                    position_ids=kv_rows.prefill_positions(mask),
                    use_cache=True,
                    logits_to_keep=1,
                )
        except Exception as error:
            fail_each(ready, error)
            return
        finally:
            self.lora.rows_changed()  # decode steps lay out their own rows
        keep: list[int] = []  # the prefill's row of each sample that goes on
        for row, job in enumerate(ready):
            samples = len(job.stream.active)
            try:
                going_on = job.stream.advance(out.logits[row, -1][None].expand(samples, -1))
            except Exception as error:
                tell(job.failed, error)
                continue
            if job.stream.finished:
                tell(job.done, job.stream.generations)
            else:
                keep += [row] * len(going_on)
        if keep:
            self.rows = kv_rows.joined(self.rows, kv_rows.prefilled(ready, out.cache, mask, keep))
            self.lora.rows_changed()  # the batch's adapters changed
            self.widest_batch = max(self.widest_batch, len(self.rows.jobs))

    def decode_step(self) -> None:
        """One decode step: every row's next token; rows whose samples end leave the batch
        (in inference mode, with rows running)."""
        rows = self.rows
        assert rows is not None
        tokens = torch.cat([job.stream.next_tokens for job in dict.fromkeys(rows.jobs)])
        mask = kv_rows.step_mask(rows)
        model = self.host.model
        plan = self.lora.rows_plan([job.adapter for job in rows.jobs], _weights_of(rows.jobs))
        if self.lora.found_at != self.host.adapter_changes:  # LoRA layers may have come or gone
            self.lora.find_layers(model, self.host.adapter_changes)
        with self.lora.applying(plan), self.packed_weights.active(self.host.loaded):
            out = model(
                input_ids=tokens[:, None],
                attention_mask=mask,
                position_ids=rows.positions[:, None],
                cache=rows.cache,
                use_cache=True,
            )
        self.rows_decoded += len(rows.jobs)
        logits = out.logits[:, -1]
        keep: list[int] = []
        finished: list[DecodeJob] = []
        start = 0
        for job in dict.fromkeys(rows.jobs):
            count = len(job.stream.active)
            going_on = job.stream.advance(logits[start : start + count])
            keep += [start + row for row in going_on]
            if job.stream.finished:
                finished.append(job)
            start += count
        self.rows = kv_rows.advanced(rows, out.cache, mask, keep)
        if self.rows is None:
            self.clear()
        elif len(keep) < len(rows.jobs):
            self.lora.rows_changed()
        for job in finished:
            tell(job.done, job.stream.generations)


def _weights_of(jobs: list[DecodeJob]) -> dict[str, AdapterWeights]:
    """The adapters of `jobs`' rows, in the order they first appear, and their weights."""
    return {job.adapter: job.lora for job in jobs if job.adapter is not None}


def fail_each(jobs: list[DecodeJob], error: BaseException) -> None:
    for job in jobs:
        tell(job.failed, error)


def tell(callback: Callable[[Any], None], value: Any) -> None:
    """A request's `done` or `failed`; its own failure (say its caller is gone) is logged and
    concerns no other request."""
    try:
        callback(value)
    except Exception:
        logger.exception("a chat request's callback failed")
