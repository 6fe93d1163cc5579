"""The batched LoRA term: every row of a batched forward on its own adapter.

The batched forward runs the base model (PEFT's own LoRA switched off) and a hook on each LoRA
layer adds every row's own LoRA term. The batch's adapters are stacked by rank, A as
(n, in, r) and B as (n, r, out), and one `bmm` pair applies each adapter to its own rows
(punica / S-LoRA's grouped matmul). When the rows are already in the stack's order (say one
row per adapter) the inputs are used as they are; otherwise each adapter's rows are gathered
into its slot, padded to the widest slot, and the results are added back to their rows. Each
adapter's weights are read once per step, however many rows it has; rows on the base model
are in no slot.

- `LoraPlan`: the batch's adapters laid out (`RankStack` per layer and rank) and how its rows
  reach them (`Route`).
- `BatchedLora`: the model's LoRA layers with their hooks, which plan is in force, and the
  plans kept between steps. A hook is given the plan in force by a callable, and adds nothing
  outside `BatchedLora.applying`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners.lora import Linear as LoraLinear

# Per LoRA layer an adapter targets: its A (r, in), B (out, r) and scaling.
AdapterWeights = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


class LoraPlan:
    """The batch's adapters laid out for the batched LoRA term, and how its rows reach them.

    Per LoRA layer, the adapters that have it, stacked by rank (`weights`). A `Route` gathers
    each adapter's rows into its slot of the stack and adds the results back to those rows.
    Rows that join or leave keep the weights while the batch's adapters stay the same; an
    adapter that comes or goes lays them out again (a slot with no rows would still be read at
    every step).
    """

    def __init__(
        self, weights: dict[str, list[RankStack]], adapters: list[str | None], laid_out: set[str]
    ) -> None:
        self.weights = weights
        self.adapters = adapters  # per row: its adapter, None on the base model
        self.laid_out = laid_out
        self._routes: dict[tuple[tuple[str, ...], int], Route | None] = {}

    @classmethod
    def of(
        cls,
        rows: list[str | None],
        adapters: Mapping[str, AdapterWeights],
        previous: LoraPlan | None,
    ) -> LoraPlan:
        """`rows` (each row's adapter) on the weights of `adapters`, kept from `previous` when
        it laid out the same adapters."""
        if previous is not None and adapters.keys() == previous.laid_out:
            weights = previous.weights
        else:
            weights = stack_by_rank(adapters)  # in the rows' order: a row per adapter, no gather
        return cls(weights, rows, set(adapters))

    def route(self, stack: RankStack, positions: int) -> Route | None:
        """How `positions` inputs per row reach `stack`'s adapters; None: no row is on them."""
        key = (stack.adapters, positions)
        if key not in self._routes:
            self._routes[key] = Route.of(stack, self.adapters, positions)
        return self._routes[key]


@dataclass(frozen=True)
class RankStack:
    """One LoRA layer's A and B for adapters of one rank, side by side for `bmm`."""

    adapters: tuple[str, ...]
    a: torch.Tensor  # (n, in, r)
    b: torch.Tensor  # (n, r, out)
    scaling: tuple[float, ...]
    each: tuple[tuple[torch.Tensor, torch.Tensor], ...] = field(init=False)  # per slot: A, B

    def __post_init__(self) -> None:
        object.__setattr__(self, "each", tuple(zip(self.a.unbind(), self.b.unbind(), strict=True)))

    def add_term(self, x: torch.Tensor, route: Route, output: torch.Tensor) -> None:
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
class Route:
    """Which inputs of a batched forward go to which adapter slots of a `RankStack`: slots
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
    def of(cls, stack: RankStack, adapters: list[str | None], positions: int) -> Route | None:
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


def stack_by_rank(adapters: Mapping[str, AdapterWeights]) -> dict[str, list[RankStack]]:
    """Per LoRA layer, its adapters (in the order given) stacked by rank."""
    layers: dict[str, list[RankStack]] = {}
    for key in sorted({key for weights in adapters.values() for key in weights}):
        ranks: dict[int, list[str]] = {}
        for name, weights in adapters.items():
            if key in weights:
                ranks.setdefault(weights[key][0].shape[0], []).append(name)
        layers[key] = [
            RankStack(
                tuple(names),
                torch.stack([adapters[name][key][0].t() for name in names]),
                torch.stack([adapters[name][key][1].t() for name in names]),
                tuple(adapters[name][key][2] for name in names),
            )
            for names in ranks.values()
        ]
    return layers


class LoraHook:
    """Adds the plan in force's per-row LoRA term to a LoRA layer's (base-only) output."""

    def __init__(self, key: str, plan_in_force: Callable[[], LoraPlan | None]) -> None:
        self.key = key
        self.plan_in_force = plan_in_force

    def __call__(self, module: Any, args: tuple[Any, ...], output: torch.Tensor) -> Any:
        plan = self.plan_in_force()
        if plan is None or self.key not in plan.weights:
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


class BatchedLora:
    """The model's LoRA layers, each hooked to add the plan in force's LoRA term, and the plans.

    The running rows' plan is kept until the rows change (`rows_changed`); the last plan laid
    out is kept while its adapters serve, so its stacked weights serve the next plan too.
    """

    def __init__(self) -> None:
        self._hooks: dict[int, Any] = {}  # LoRA layer id -> its hook's handle
        self._layers: list[Any] = []
        self.found_at = -1  # the host's `adapter_changes` when `_layers` were found
        self._in_force: LoraPlan | None = None  # inside `applying` only
        self._rows_plan: LoraPlan | None = None  # None: the rows changed since it was made
        self._laid_out: LoraPlan | None = None  # the last plan, whose weights may serve again

    def find_layers(self, model: Any, adapter_changes: int) -> None:
        """The model's LoRA layers, each with its hook (added once); `adapter_changes` is the
        host's count when they were found."""
        layers = []
        for name, module in model.named_modules():
            if isinstance(module, LoraLinear):
                layers.append(module)
                if id(module) not in self._hooks:
                    hook = module.register_forward_hook(LoraHook(module_key(name), self.in_force))
                    self._hooks[id(module)] = hook
        self._layers = layers
        self.found_at = adapter_changes

    def in_force(self) -> LoraPlan | None:
        """The plan whose terms the hooks add now; None outside a batched forward."""
        return self._in_force

    def prefill_plan(
        self, rows: list[str | None], adapters: Mapping[str, AdapterWeights]
    ) -> LoraPlan:
        """The plan of a prefill's `rows`, laid out for `adapters` (the running rows' and the
        joining ones'), so its weights serve the decode steps after it."""
        plan = LoraPlan.of(rows, adapters, self._laid_out)
        self._laid_out = plan  # its weights serve the decode steps; their routes are remade
        return plan

    def rows_plan(self, rows: list[str | None], adapters: Mapping[str, AdapterWeights]) -> LoraPlan:
        """The plan of the running rows, made again only when they changed."""
        if self._rows_plan is None:
            self._rows_plan = LoraPlan.of(rows, adapters, self._laid_out)
            self._laid_out = self._rows_plan
        return self._rows_plan

    def rows_changed(self) -> None:
        self._rows_plan = None

    def forget(self) -> None:
        """No rows run: no plan is kept for them."""
        self._rows_plan = self._laid_out = None

    @contextmanager
    def applying(self, plan: LoraPlan) -> Iterator[None]:
        """Inside this block (the batched forward) the model runs on the base weights and the
        hooks add `plan`'s terms instead. PEFT's own LoRA is switched off by the flag each LoRA
        layer reads: PEFT's `disable_adapter()` walks the whole model on entry and exit, which
        would cost more than the step. Each flag gets its value back (a yield point may be
        inside a base-model pass, which has them all set)."""
        layers = list(self._layers)
        before = [layer._disable_adapters for layer in layers]
        for layer in layers:
            layer._disable_adapters = True
        try:
            self._in_force = plan
            yield
        finally:
            self._in_force = None
            for layer, disabled in zip(layers, before, strict=True):
                layer._disable_adapters = disabled

    def close(self) -> None:
        """Take the hooks off the model (it may outlive the decoder) and drop the plans."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks = {}
        self.forget()


def module_key(name: str) -> str:
    """A LoRA layer's name without PEFT's wrapper prefix, the same for every adapter."""
    return name.removeprefix("base_model.model.")


def adapter_weights(model: Any, adapter: str) -> AdapterWeights:
    """Per LoRA layer the adapter targets: its A (r, in), B (out, r) and scaling."""
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear) and adapter in module.lora_A:
            weights[module_key(name)] = (
                module.lora_A[adapter].weight.detach(),
                module.lora_B[adapter].weight.detach(),
                float(module.scaling[adapter]),
            )
    return weights
