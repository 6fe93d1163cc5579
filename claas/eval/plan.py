"""A run's plan: its stages (the preferences in `preferences`, in order), and the step lines
to produce, one `Task` each.

Without `continual` each stage trains an adapter of its own; with it, one adapter is taught the
stages one after another, a preference may come back, and a later stage of a preference goes
on through its training prompts where the earlier one stopped. Which preferences a step
measures, and the step's number in the whole run (`global_step`), follow from the plan too.

    stages = load_stages(config)
    tasks = plan(config, stages)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from claas.eval.config import EvalConfig, EvalConfigError
from claas.eval.preferences import Preference, load_preference


@dataclass(frozen=True)
class Task:
    """One line of steps.jsonl to produce: `preference` at `step` (0 = baseline) of `stage`."""

    preference: Preference
    stage: int  # its entry's index in `preferences`
    step: int
    global_step: int
    lora_id: str
    measured: tuple[Preference, ...]  # whose compliance this step measures
    taught_before: int  # steps of this preference in earlier stages: where its prompts go on

    @property
    def position(self) -> int:
        """This step's number among all steps of its preference (the first stage's: `step`)."""
        return self.taught_before + self.step


def plan(config: EvalConfig, stages: Sequence[Preference]) -> list[Task]:
    """The run's lines in order, one stage (an entry of `preferences`) after another."""
    run_id = config.run_id or ""
    tasks = []
    taught: dict[str, int] = {}  # preference name → its steps in the stages so far
    for index, preference in enumerate(stages):
        if config.continual:
            lora_id = f"{config.owner}/{run_id}-continual"
            measured = tuple(distinct(stages[: index + 1]))
            offset = index * config.num_steps
        else:
            lora_id, measured, offset = (
                f"{config.owner}/{run_id}-{preference.name}",
                (preference,),
                0,
            )
        before = taught.get(preference.name, 0)
        for step in range(config.num_steps + 1):
            tasks.append(Task(preference, index, step, offset + step, lora_id, measured, before))
        taught[preference.name] = before + config.num_steps
    return tasks


def distinct(stages: Sequence[Preference]) -> list[Preference]:
    """Each preference once, in the order it is first taught."""
    first: dict[str, Preference] = {}
    for preference in stages:
        first.setdefault(preference.name, preference)
    return list(first.values())


def check_stages(config: EvalConfig, stages: Sequence[Preference]) -> None:
    """A preference may come back only in a continual run, and one name means one preference."""
    first: dict[str, Preference] = {}
    for entry, preference in zip(config.preferences, stages, strict=True):
        seen = first.setdefault(preference.name, preference)
        if seen != preference:
            raise EvalConfigError(
                f"preferences holds two different preferences named {preference.name!r} (the "
                f"second is {entry!r}); give one of them another `name`"
            )
    repeated = sorted({p.name for p in stages if sum(q.name == p.name for q in stages) > 1})
    if repeated and not config.continual:
        raise EvalConfigError(
            f"preferences name {', '.join(repeated)} more than once; without continual each "
            "preference trains its own adapter once. To teach it again after others on one "
            "adapter, set continual=true, or drop the repeat"
        )


def with_examples(stages: Sequence[Preference], examples: dict[str, str]) -> list[Preference]:
    """The stages with `examples` (name → example) replacing each named preference's own."""
    names = [p.name for p in distinct(stages)]
    unknown = sorted(set(examples) - set(names))
    if unknown:
        raise EvalConfigError(
            f"examples name {', '.join(map(repr, unknown))}, which this run does not teach "
            f"({', '.join(names)}); key examples by a preference's name"
        )
    return [
        p.model_copy(update={"example": examples[p.name]}) if p.name in examples else p
        for p in stages
    ]


def load_stages(config: EvalConfig) -> list[Preference]:
    """The run's stages: each entry of `preferences` loaded, checked, with `examples` applied."""
    stages = [load_or_explain(name) for name in config.preferences]
    check_stages(config, stages)
    return with_examples(stages, config.examples)


def load_or_explain(name: str) -> Preference:
    try:
        return load_preference(name)
    except ValueError as error:
        raise EvalConfigError(str(error)) from None
