"""Continuous batching of chat decoding across adapters, on the model worker.

Every chat request of the local service (a `DecodeJob`) joins one running batch: at each step the
worker runs a single forward for all running samples, whatever adapter each is on. Steps run in
slices of up to `SLICE_SECONDS`, taking turns with the worker's other tasks (training, adapter
loads, scoring). Requests that arrive while others decode are prefilled together, then join at
the next step; each sample leaves when it ends (its own `max_tokens`, stop tokens and strings,
or its client going away).

- **KV cache.** One HF `DynamicCache` holds every row, left-padded to a common length; a 2-D
  attention mask hides each row's padding and `position_ids` give each row its own positions,
  so a row attends to exactly its own tokens. Rows join by padding (theirs or the batch's) and
  leave by selection; columns that became padding for every row are dropped.
- **Adapters, batched.** The forward runs the base model (PEFT's adapters disabled) and a hook on
  each LoRA layer adds every row's own LoRA term: the batch's adapters are stacked by rank, A as
  (n, in, r) and B as (n, r, out), and one `bmm` pair applies each adapter to its own rows
  (punica / S-LoRA's grouped matmul). When the rows are already in the stack's order (say one
  row per adapter) the inputs are used as they are; otherwise each adapter's rows are gathered
  into its slot, padded to the widest slot, and the results are added back to their rows. Each
  adapter's weights are read once per step, however many rows it has; rows on the base model
  are in no slot.
- **Packed weights.** On a CPU in float32 the batched forward runs the base linears by oneDNN on
  weights reordered once into its blocked layout (`PackedLinears`): at a few rows a linear only
  streams its weight, and that runs at about twice MKL's bandwidth on PyTorch's layout. The
  copies cost the linear weights' memory again (`Settings.packed_weights` turns them off; they
  are skipped when memory is short).
- **First tokens first.** A new request's prefill and first token are an urgent worker task
  (ahead of queued training tasks), and yield points between the decoder layers of a running
  training or scoring pass admit it there (`install_yield_points`).
- **Exactness.** Sampling is `decoding.SampleStream`, per request, with the request's own
  generator: the same request gives the same tokens and log-probs alone or batched, up to the
  float rounding of a batched matmul.

Requests that score their prompt, and samplers on a training client's live weights (`inflight`),
keep the one-request path in `sampling_client`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
from peft.tuners.lora import Linear as LoraLinear

from claas.errors import InvalidRequest
from claas.services.local.decoding import Generation, SampleStream

logger = logging.getLogger(__name__)

MAX_ROWS = 64  # running samples at most; later requests wait for a free row
# Decode steps run back to back for this long before other work queued on the worker gets its
# turn. Measured with `benchmarks/serve.py` (a 16-token chat while an 8-step feedback step
# trains, against idle): one step per turn 5.57x, 0.25 s 2.91x, 1 s 1.71x; before continuous
# batching a whole chat was one turn (1.75x). Chats are what users wait on; training runs behind.
SLICE_SECONDS = 1.0


@dataclass(eq=False)  # identity: a job is one request
class DecodeJob:
    """One chat request: its prompt, how to sample it, and whom to tell when it ends."""

    prompt: torch.Tensor  # (L,)
    stream: SampleStream
    adapter: str | None  # None: the base model
    activate: Callable[[], None]  # makes the adapter resident (worker thread)
    done: Callable[[list[Generation]], None]
    failed: Callable[[BaseException], None]
    lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)


@dataclass
class _Rows:
    """The running batch: per row its job, and the tensors that describe it to the model."""

    jobs: list[DecodeJob]  # one entry per row (a job with n samples has n rows, adjacent)
    cache: Any  # DynamicCache, batch = rows
    mask: torch.Tensor  # (rows, T) 1 = a real token, 0 = left padding
    positions: torch.Tensor  # (rows,) the position of each row's next token


class ContinuousDecoder:
    """The running batch of chat samples; `submit` from any thread, steps on the worker."""

    def __init__(self, host: Any, pack: bool = True) -> None:
        self.host = host
        self.pack = pack
        self._lock = threading.Lock()
        self._pending: list[DecodeJob] = []
        self._scheduled = False
        self._rows: _Rows | None = None
        self._hooked: dict[int, Any] = {}  # LoRA layer id -> its hook's handle
        self._lora_plan: _LoraPlan | None = None  # None: the rows changed since it was made
        self._laid_out: _LoraPlan | None = None  # the last plan, whose weights may serve again
        self._lora_layers: list[Any] = []
        self._layers_at = -1  # the host's `adapter_changes` when `_lora_layers` was found
        self._packed_linears: PackedLinears | None = None
        self._inside = False  # the decoder's own work is running (no yield points inside it)
        self._yield_hooks: list[Any] = []
        self.widest_batch = 0  # the most rows one step has run (for tests and benchmarks)
        self.rows_decoded = 0  # rows run by decode steps so far: one per sampled token

    @property
    def running_rows(self) -> int:
        """Samples decoding now (a request with n samples has n rows)."""
        rows = self._rows
        return len(rows.jobs) if rows is not None else 0

    def submit(self, job: DecodeJob) -> None:
        """Queue a request. Its prefill and first token run urgently, ahead of the training
        tasks queued on the worker; its later tokens take turns with them (`_step`)."""
        with self._lock:
            self._pending.append(job)
            first = not self._scheduled
            self._scheduled = True
        try:
            # the first request starts the slices; later ones join now, whatever is queued
            self.host.submit(self._step if first else self._admit, urgent=True)
        except InvalidRequest:  # the service is closing: the request was never queued
            with self._lock:
                if job in self._pending:
                    self._pending.remove(job)
                if first:
                    self._scheduled = False
            raise

    # -- the worker's side --------------------------------------------------------------------
    def _step(self) -> None:
        """Decode steps for every row (admitting waiting requests before each) for up to
        `SLICE_SECONDS`, then queue the next slice behind whatever the worker was given
        meanwhile: a training step's tasks and a chat's tokens take turns, neither waits for
        the other to finish."""
        deadline = time.perf_counter() + SLICE_SECONDS
        while True:
            self._admit()
            if self._rows is None:
                break
            with torch.inference_mode(), self._own_work():
                try:
                    self._decode()
                except Exception as error:  # a broken step fails its requests, not the server
                    jobs = list(dict.fromkeys(self._rows.jobs))
                    self._clear()
                    _fail_each(jobs, error)
            if time.perf_counter() > deadline:
                break
        with self._lock:
            if self._rows is None and not self._pending:
                self._scheduled = False
                return
        try:
            self.host.submit(self._step)
        except InvalidRequest as closed:  # the service is closing: end what is left
            self._fail_all(closed)

    def _clear(self) -> None:
        """No rows run: nothing is kept for them, neither cache nor adapter layout."""
        self._rows = self._lora_plan = self._laid_out = None

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            jobs, self._pending = list(self._pending), []
            self._scheduled = False
        if self._rows is not None:
            jobs += dict.fromkeys(self._rows.jobs)
        self._clear()
        _fail_each(jobs, error)

    def _admit(self, resident_only: bool = False) -> None:
        """Waiting requests, in order, while rows are free, prefilled together. With
        `resident_only` (inside another task) it stops at a request whose adapter is not loaded:
        loading one changes the PEFT model and torch's RNG, which the task may be using."""
        room = MAX_ROWS - (len(self._rows.jobs) if self._rows is not None else 0)
        with self._lock:
            admitted: list[DecodeJob] = []
            while self._pending and len(self._pending[0].stream.active) <= room:
                job = self._pending[0]
                resident = job.adapter is None or self.host.has_adapter(job.adapter)
                if resident_only and not resident:
                    break
                self._pending.pop(0)
                room -= len(job.stream.active)
                admitted.append(job)
        if not admitted:
            return
        with self._own_work():
            try:
                self._prefill(admitted)
            except Exception as error:  # no admitted request is left without an answer
                joined = set(self._rows.jobs) if self._rows is not None else set()
                _fail_each(
                    [j for j in admitted if j not in joined and not j.stream.finished], error
                )

    @contextmanager
    def _own_work(self) -> Iterator[None]:
        outer, self._inside = self._inside, True
        try:
            yield
        finally:
            self._inside = outer

    # -- yield points: chats admitted in the middle of a long task ------------------------------
    def install_yield_points(self, model: Any) -> None:
        """Let waiting chats get their first tokens in the middle of a long training or scoring
        task: a forward pre-hook on each decoder layer, and in a forward that builds a graph, a
        hook on the gradient of the layer's input, so also between the layers of a backward
        pass. A chat that arrives during a feedback step then waits for one layer, not for the
        task. The task's results do not change: the admission runs in inference mode, restores
        every flag it sets, and loads no adapter."""
        layers = getattr(getattr(model, "model", None), "layers", None)
        if layers is None or self._yield_hooks:
            return
        for layer in layers:
            self._yield_hooks.append(layer.register_forward_pre_hook(self._before_layer))

    def close(self) -> None:
        """Take every hook off the model (it may outlive this decoder) and drop what was kept
        for it: the packed weights and the adapters' layout."""
        for handle in [*self._yield_hooks, *self._hooked.values()]:
            handle.remove()
        self._yield_hooks, self._hooked = [], {}
        self._packed_linears = None
        self._clear()

    def _before_layer(self, module: Any, args: tuple[Any, ...]) -> None:
        if self._inside or not self.host.worker.on_worker_thread():
            return
        hidden = args[0] if args else None
        if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(self._during_backward)  # type: ignore[no-untyped-call]
        if self._pending:
            self._yield()

    def yield_point(self) -> None:
        """Admit waiting chats now, from a worker task between two stretches of its own work
        (a custom loss between its forward and backward). Elsewhere it does nothing."""
        if self._pending and not self._inside and self.host.worker.on_worker_thread():
            self._yield()

    def _during_backward(self, grad: torch.Tensor) -> None:
        self.yield_point()  # on a GPU autograd runs this on a thread of its own: no yield there

    def _yield(self) -> None:
        try:
            self._admit(resident_only=True)  # fails the requests it cannot admit
        except Exception:  # never into the task that yielded
            logger.exception("admitting chats at a yield point failed")

    def _prefill(self, jobs: list[DecodeJob]) -> None:
        """The joining prompts in one left-padded forward, each row on its own adapter by the
        batched LoRA term as in a decode step; their first tokens; then the samples that go on
        join the batch."""
        ready = []
        for job in jobs:
            try:
                job.activate()  # outside inference mode: a loaded adapter's weights stay trainable
                if job.adapter is not None:
                    job.lora = _adapter_weights(self.host.model, job.adapter)
            except Exception as error:
                _tell(job.failed, error)
            else:
                ready.append(job)
        if not ready:
            return
        device = ready[0].prompt.device
        lengths = [job.prompt.shape[0] for job in ready]
        width = max(lengths)
        input_ids = torch.zeros(len(ready), width, dtype=torch.long, device=device)
        mask = torch.zeros_like(input_ids)
        for row, job in enumerate(ready):
            input_ids[row, width - lengths[row] :] = job.prompt
            mask[row, width - lengths[row] :] = 1
        model = self.host.model
        everyone = (self._rows.jobs if self._rows is not None else []) + ready
        plan = _LoraPlan.of(ready, self._laid_out, laid_out_for=everyone)
        self._laid_out = plan  # its weights serve the decode steps; their routes are remade
        self._lora_layers = self._hook(model)
        self._layers_at = self.host.adapter_changes
        try:
            with torch.inference_mode(), self._base_only(), plan.active(), self._packed():
                self._lora_plan = plan
                out = model(
                    input_ids=input_ids,
                    attention_mask=mask,
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    use_cache=True,
                    logits_to_keep=1,
                )
        except Exception as error:
            _fail_each(ready, error)
            return
        finally:
            self._lora_plan = None  # decode steps mask their own rows
        rows: list[int] = []  # the prefill's row of each sample that goes on
        for row, job in enumerate(ready):
            samples = len(job.stream.active)
            try:
                going_on = job.stream.advance(out.logits[row, -1][None].expand(samples, -1))
            except Exception as error:
                _tell(job.failed, error)
                continue
            if job.stream.finished:
                _tell(job.done, job.stream.generations)
            else:
                rows += [row] * len(going_on)
        if rows:
            index = torch.tensor(rows, device=device)
            out.cache.batch_select_indices(index)
            joined = _Rows(
                [ready[row] for row in rows],
                out.cache,
                mask[index],
                torch.tensor([lengths[row] for row in rows], device=device),
            )
            self._join(_drop_padding(joined))

    def _join(self, new: _Rows) -> None:
        rows = self._rows
        if rows is None:
            self._rows = new
        else:
            width = max(rows.mask.shape[1], new.mask.shape[1])
            self._rows = _Rows(
                rows.jobs + new.jobs,
                _cat_caches(_pad_cache(rows.cache, width), _pad_cache(new.cache, width)),
                torch.cat([_pad_left(rows.mask, width), _pad_left(new.mask, width)]),
                torch.cat([rows.positions, new.positions]),
            )
        self._lora_plan = None  # the batch's adapters changed
        assert self._rows is not None
        self.widest_batch = max(self.widest_batch, len(self._rows.jobs))

    def _decode(self) -> None:
        rows = self._rows
        assert rows is not None
        tokens = torch.cat([job.stream.next_tokens for job in dict.fromkeys(rows.jobs)])
        mask = torch.cat([rows.mask, torch.ones_like(rows.mask[:, :1])], dim=1)
        model = self.host.model
        if self._lora_plan is None:  # the batch changed: lay out its adapters
            self._lora_plan = _LoraPlan.of(rows.jobs, self._laid_out)
            self._laid_out = self._lora_plan
        if self._layers_at != self.host.adapter_changes:  # LoRA layers may have come or gone
            self._lora_layers = self._hook(model)
            self._layers_at = self.host.adapter_changes
        with self._base_only(), self._lora_plan.active(), self._packed():
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
        if len(keep) < len(rows.jobs):
            self._select(keep, out.cache, mask, rows)
        else:
            self._rows = _Rows(rows.jobs, out.cache, mask, rows.positions + 1)
        for job in finished:
            _tell(job.done, job.stream.generations)

    def _select(self, keep: list[int], cache: Any, mask: torch.Tensor, rows: _Rows) -> None:
        if not keep:
            self._clear()
            return
        index = torch.tensor(keep, device=mask.device)
        cache.batch_select_indices(index)
        self._rows = _drop_padding(
            _Rows([rows.jobs[i] for i in keep], cache, mask[index], rows.positions[index] + 1)
        )
        self._lora_plan = None

    # -- adapters -------------------------------------------------------------------------------
    @contextmanager
    def _base_only(self) -> Iterator[None]:
        """PEFT's own LoRA off for the batched forward (the hooks add each row's instead), by
        the flag each LoRA layer reads: PEFT's `disable_adapter()` walks the whole model on
        entry and exit, which would cost more than the step. Each flag gets its value back
        (a yield point may be inside a base-model pass, which has them all set)."""
        layers = list(self._lora_layers)
        before = [layer._disable_adapters for layer in layers]
        for layer in layers:
            layer._disable_adapters = True
        try:
            yield
        finally:
            for layer, disabled in zip(layers, before, strict=True):
                layer._disable_adapters = disabled

    def _packing(self) -> bool:
        """Whether the batched forward runs its linears on packed weights (`PackedLinears`):
        asked for, float32 on a CPU with oneDNN, and the copy fits in memory."""
        if self._packed_linears is not None:
            return True
        base = self.host.loaded.model
        if not (
            self.pack
            and self.host.loaded.device.type == "cpu"
            and base.dtype == torch.float32
            and torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
        ):
            return False
        packed = PackedLinears(base)
        available = psutil.virtual_memory().available
        if packed.nbytes > available // 2:
            logger.warning(
                "not packing the linear weights for decoding: the copy would take %.1f GB of "
                "the %.1f GB available (set CLAAS_PACKED_WEIGHTS=false to silence this)",
                packed.nbytes / 1e9,
                available / 1e9,
            )
            self.pack = False
            return False
        self._packed_linears = packed
        return True

    @contextmanager
    def _packed(self) -> Iterator[None]:
        """The base linears run by oneDNN on packed weights for the batched forward."""
        if not self._packing():
            yield
            return
        assert self._packed_linears is not None
        with self._packed_linears.active():
            yield

    def _hook(self, model: Any) -> list[Any]:
        """The model's LoRA layers, each with the batched-LoRA hook (added once)."""
        layers = []
        for name, module in model.named_modules():
            if isinstance(module, LoraLinear):
                layers.append(module)
                if id(module) not in self._hooked:
                    hook = module.register_forward_hook(_LoraHook(self, _module_key(name)))
                    self._hooked[id(module)] = hook
        return layers


class _LoraPlan:
    """The batch's adapters laid out for the batched LoRA term, and how its rows reach them.

    Per LoRA layer, the adapters that have it, stacked by rank (`weights`): A as (n, in, r) and
    B as (n, r, out), so one `bmm` pair applies every adapter to its own rows (punica / S-LoRA's
    grouped matmul). A `_Route` gathers each adapter's rows into its slot of the stack and adds
    the results back to those rows. Rows that join or leave keep the weights while the batch's
    adapters stay the same; an adapter that comes or goes lays them out again (a slot with no
    rows would still be read at every step).
    """

    def __init__(
        self, weights: dict[str, list[_Stack]], adapters: list[str | None], laid_out: set[str]
    ) -> None:
        self.weights = weights
        self.adapters = adapters  # per row: its adapter, None on the base model
        self.laid_out = laid_out
        self.enabled = False
        self._routes: dict[tuple[tuple[str, ...], int], _Route | None] = {}

    @classmethod
    def of(
        cls,
        jobs: list[DecodeJob],
        previous: _LoraPlan | None,
        laid_out_for: list[DecodeJob] | None = None,
    ) -> _LoraPlan:
        """`jobs`' rows on the weights of `laid_out_for`'s adapters (default: `jobs`'), kept
        from `previous` when it laid out the same adapters."""
        everyone = jobs if laid_out_for is None else laid_out_for
        adapters = {job.adapter: job.lora for job in everyone if job.adapter is not None}
        if previous is not None and adapters.keys() == previous.laid_out:
            weights = previous.weights
        else:
            weights = _stack(adapters)  # in the rows' order: a row per adapter needs no gather
        return cls(weights, [job.adapter for job in jobs], set(adapters))

    def route(self, stack: _Stack, positions: int) -> _Route | None:
        """How `positions` inputs per row reach `stack`'s adapters; None: no row is on them."""
        key = (stack.adapters, positions)
        if key not in self._routes:
            self._routes[key] = _Route.of(stack, self.adapters, positions)
        return self._routes[key]

    @contextmanager
    def active(self) -> Iterator[None]:
        """The hooks add this plan's LoRA terms only inside this block (the batched forward)."""
        self.enabled = True
        try:
            yield
        finally:
            self.enabled = False


@dataclass(frozen=True)
class _Stack:
    """One LoRA layer's A and B for adapters of one rank, side by side for `bmm`."""

    adapters: tuple[str, ...]
    a: torch.Tensor  # (n, in, r)
    b: torch.Tensor  # (n, r, out)
    scaling: tuple[float, ...]
    each: tuple[tuple[torch.Tensor, torch.Tensor], ...] = field(init=False)  # per slot: A, B

    def __post_init__(self) -> None:
        object.__setattr__(self, "each", tuple(zip(self.a.unbind(), self.b.unbind(), strict=True)))

    def add_term(self, x: torch.Tensor, route: _Route, output: torch.Tensor) -> None:
        """output[row] += scaling (x[row] A) B, for each row on these adapters; x (inputs, in)
        and output (inputs, out), an input per row and position."""
        inputs = x if route.gather is None else x.index_select(0, route.gather)
        if route.last - route.first == 1:  # one adapter: 2-D matmuls, faster than a bmm of one
            a, b = self.each[route.first]
            low = torch.mm(inputs, a)
            if route.gather is None:
                output.addmm_(low, b, alpha=route.alpha)
            else:
                output.index_add_(0, route.targets, torch.mm(low, b), alpha=route.alpha)
            return
        a, b = self.a, self.b
        if route.first > 0 or route.last < a.shape[0]:  # a join's prefill: its own slots only
            a, b = a[route.first : route.last], b[route.first : route.last]
        slots, width = a.shape[0], route.width
        low = torch.bmm(inputs.view(slots, width, -1), a)
        if route.scale is not None:
            low.mul_(route.scale)
        if route.gather is None:  # the inputs are the slots' inputs, in order: add in place
            output.view(slots, width, -1).baddbmm_(low, b, alpha=route.alpha)
            return
        term = torch.bmm(low, b).view(slots * width, -1)
        if route.real is not None:  # padding: slots with fewer inputs than the widest
            term = term.index_select(0, route.real)
        output.index_add_(0, route.targets, term, alpha=route.alpha)


@dataclass(frozen=True)
class _Route:
    """Which inputs of a batched forward go to which adapter slots of a `_Stack`: slots
    `first` to `last`, `width` inputs each (a slot with fewer is padded, and its padding is
    dropped: `real`)."""

    first: int
    last: int
    width: int
    alpha: float  # the slots' scaling, when they share one
    scale: torch.Tensor | None  # (slots, 1, 1) each slot's scaling, when they differ
    gather: torch.Tensor | None  # (slots * width,) inputs; None: they are in order already
    targets: torch.Tensor  # the inputs the real entries go back to
    real: torch.Tensor | None  # the real entries among slots * width; None: all are

    @classmethod
    def of(cls, stack: _Stack, adapters: list[str | None], positions: int) -> _Route | None:
        rows: dict[str, list[int]] = {name: [] for name in stack.adapters}
        for row, adapter in enumerate(adapters):
            if adapter in rows:
                rows[adapter].append(row)
        used = [slot for slot, name in enumerate(stack.adapters) if rows[name]]
        if not used:
            return None
        first, last = used[0], used[-1] + 1
        names = stack.adapters[first:last]
        width = max(len(rows[name]) for name in names) * positions
        gather: list[int] = []
        real: list[int] = []
        scale: list[float] = []
        for name, scaling in zip(names, stack.scaling[first:last], strict=True):
            inputs = [row * positions + p for row in rows[name] for p in range(positions)]
            real += range(len(gather), len(gather) + len(inputs))
            gather += inputs + [0] * (width - len(inputs))  # padding reads any input
            scale.append(scaling)
        device = stack.a.device
        in_order = gather == list(range(len(adapters) * positions))
        shared = len(set(scale)) == 1
        return cls(
            first,
            last,
            width,
            scale[0] if shared else 1.0,
            None
            if shared
            else torch.tensor(scale, dtype=stack.a.dtype, device=device)[:, None, None],
            None if in_order else torch.tensor(gather, device=device),
            torch.tensor([gather[i] for i in real], device=device),
            None if len(real) == len(gather) else torch.tensor(real, device=device),
        )


class _LoraHook:
    """Adds the batch's per-row LoRA term to a LoRA layer's (base-only) output."""

    def __init__(self, decoder: ContinuousDecoder, key: str) -> None:
        self.decoder = decoder
        self.key = key

    def __call__(self, module: Any, args: tuple[Any, ...], output: torch.Tensor) -> Any:
        plan = self.decoder._lora_plan
        if plan is None or not plan.enabled or self.key not in plan.weights:
            return None
        x = args[0]
        x = x.reshape(-1, x.shape[-1])  # (rows x positions, in), row by row
        out = output.view(x.shape[0], -1)
        positions = x.shape[0] // len(plan.adapters)
        for stack in plan.weights[self.key]:
            route = plan.route(stack, positions)
            if route is not None:
                stack.add_term(x, route, out)  # in place on the base output
        return output


def _stack(
    adapters: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]],
) -> dict[str, list[_Stack]]:
    """Per LoRA layer, its adapters (in the order given) stacked by rank."""
    layers: dict[str, list[_Stack]] = {}
    for key in sorted({key for weights in adapters.values() for key in weights}):
        ranks: dict[int, list[str]] = {}
        for name, weights in adapters.items():
            if key in weights:
                ranks.setdefault(weights[key][0].shape[0], []).append(name)
        layers[key] = [
            _Stack(
                tuple(names),
                torch.stack([adapters[name][key][0].t() for name in names]),
                torch.stack([adapters[name][key][1].t() for name in names]),
                tuple(adapters[name][key][2] for name in names),
            )
            for names in ranks.values()
        ]
    return layers


def _fail_each(jobs: list[DecodeJob], error: BaseException) -> None:
    for job in jobs:
        _tell(job.failed, error)


def _tell(callback: Callable[[Any], None], value: Any) -> None:
    """A request's `done` or `failed`; its own failure (say its caller is gone) is logged and
    concerns no other request."""
    try:
        callback(value)
    except Exception:
        logger.exception("a chat request's callback failed")


def _module_key(name: str) -> str:
    """A LoRA layer's name without PEFT's wrapper prefix, the same for every adapter."""
    return name.removeprefix("base_model.model.")


def _adapter_weights(
    model: Any, adapter: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Per LoRA layer the adapter targets: its A (r, in), B (out, r) and scaling."""
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear) and adapter in module.lora_A:
            weights[_module_key(name)] = (
                module.lora_A[adapter].weight.detach(),
                module.lora_B[adapter].weight.detach(),
                float(module.scaling[adapter]),
            )
    return weights


class PackedLinears:
    """A model's base linear layers, run by oneDNN on weights packed once, while `active`.

    At the few rows of a decode step a linear layer only streams its weight from memory, and
    MKL's GEMM, on a weight in PyTorch's layout, reaches less than half the memory bandwidth
    there: cache-cold on 2 cores, a 1536x576 float32 layer takes 382 us at 1 row and 505 us at
    4, while oneDNN on the weight reordered into its blocked layout takes 177 and 178 us (20 GB/s,
    the streaming read measured was 27). The packed copies double the memory of the linear
    weights; the base weights are frozen, and a weight changed in place is packed again.
    Float32 on CPU only; LoRA's own A and B are left alone.
    """

    def __init__(self, model: Any) -> None:
        self.layers = [
            module
            for name, module in model.named_modules()
            if type(module) is torch.nn.Linear
            and module.weight.dtype == torch.float32
            and module.weight.device.type == "cpu"
            and ".lora_" not in f".{name}"
        ]
        self._packed: dict[int, tuple[int, int, torch.Tensor]] = {}
        self.nbytes = sum(layer.weight.nbytes for layer in self.layers)  # of the copies

    def _weight(self, layer: torch.nn.Linear) -> torch.Tensor:
        weight = layer.weight
        key = (weight.data_ptr(), weight._version)
        cached = self._packed.get(id(layer))
        if cached is None or cached[:2] != key:
            cached = (*key, _pack(weight.detach()))
            self._packed[id(layer)] = cached
        return cached[2]

    @contextmanager
    def active(self) -> Iterator[None]:
        patched = []
        try:
            for layer in self.layers:
                layer.forward = _packed_forward(self._weight(layer), layer.bias)  # type: ignore[method-assign,assignment]
                patched.append(layer)
            yield
        finally:
            for layer in patched:
                del layer.forward


PACK_ROWS_HINT = 8  # the batch size oneDNN picks a packed layout for (1 to 8 rows measured)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """A (out, in) float32 weight reordered into oneDNN's layout, for `_linear`."""
    packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS_HINT)
    return packed


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + bias, for W packed by `_pack`."""
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return out


def _packed_forward(
    weight: torch.Tensor, bias: torch.Tensor | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: _linear(x, weight, bias)


def _drop_padding(rows: _Rows) -> _Rows:
    """The rows without the columns that are padding in every row."""
    first = int(rows.mask.any(dim=0).nonzero()[0, 0])
    if first > 0:
        for layer in rows.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
        rows.mask = rows.mask[:, first:]
    return rows


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """(rows, T) padded with zeros on the left to (rows, width)."""
    missing = width - tensor.shape[1]
    if missing == 0:
        return tensor
    return torch.cat([tensor.new_zeros(tensor.shape[0], missing), tensor], dim=1)


def _pad_cache(cache: Any, width: int) -> Any:
    for layer in cache.layers:
        missing = width - layer.keys.shape[2]
        if missing:
            shape = (*layer.keys.shape[:2], missing, layer.keys.shape[3])
            layer.keys = torch.cat([layer.keys.new_zeros(shape), layer.keys], dim=2)
            layer.values = torch.cat([layer.values.new_zeros(shape), layer.values], dim=2)
    return cache


def _cat_caches(into: Any, other: Any) -> Any:
    """`other`'s rows appended to `into`'s (same length), in `into`."""
    for layer, more in zip(into.layers, other.layers, strict=True):
        layer.keys = torch.cat([layer.keys, more.keys])
        layer.values = torch.cat([layer.values, more.values])
    return into
