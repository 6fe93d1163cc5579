"""Mean and spread over seeds: is a difference between two settings more than seed noise?

One eval run is one draw: its adapter's initialisation, rollouts and probe answers all derive
from `seed`. Run the same config under a few seeds, then

    claas eval seeds RUN_A RUN_B RUN_C [--out seeds.json]

prints, per preference, the mean and the range (min–max) over the runs of the summary table's
key columns (`KEY_COLUMNS`), then per global step (after that many feedback requests) the mean
and range of each measured preference's compliance and of the capability ratio, plus each run's
seed and run time. `--out` writes the same as JSON (`SeedsReport`). Runs may still be running:
a number a run has not reached yet is left out, and `runs` says how many runs gave it.

The runs must teach the same stages in the same mode (continual or not); the summary table of
each is read as it is, the per-step values from its `steps.jsonl`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict

from claas.eval import report
from claas.eval.compare import load_run
from claas.eval.config import EvalConfigError
from claas.runs import RunSummary, Scalar, StepLine

# The margin moves before sampled answers do: on a small model often the first sign of learning.
KEY_COLUMNS = (
    "baseline_compliance",
    "final_compliance",
    "peak_compliance",
    "retention",
    "margin_per_token_final",
    "length_change_pct",
    "min_capability_ratio",
    "repetition_max",
)
Run = tuple[Path, RunSummary, list[StepLine]]  # run dir, summary, step lines
StepValues = dict[int, dict[str, float]]  # global step → key → value, of one run


class Spread(BaseModel):
    """One number over runs: its mean and range over the runs that have it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mean: float | None
    min: float | None
    max: float | None
    runs: int

    @classmethod
    def of(cls, values: Iterable[Any]) -> Spread:
        present = [v for value in values if (v := report.finite(value)) is not None]
        if not present:
            return cls(mean=None, min=None, max=None, runs=0)
        return cls(
            mean=float(np.mean(present)), min=min(present), max=max(present), runs=len(present)
        )

    def text(self) -> str:
        if self.mean is None or self.min is None or self.max is None:
            return "–"
        return f"{self.mean:.3f} ({self.min:.3f}–{self.max:.3f})"


class SeedRun(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_dir: str
    run_id: str
    seed: int | None
    status: str
    run_seconds: float


class PreferenceSpread(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preference: str
    columns: dict[str, Spread]  # KEY_COLUMNS
    compliance_by_step: dict[int, Spread]  # global step (≥ 1) → compliance after that request


class StepSpread(BaseModel):
    model_config = ConfigDict(extra="forbid")

    global_step: int
    # compliance.<preference>; capability_ratio (one adapter, continual) or
    # capability_ratio.<preference> (an adapter per preference)
    values: dict[str, Spread]


class SeedsReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stages: list[str]
    continual: bool
    runs: list[SeedRun]
    preferences: list[PreferenceSpread]
    steps: list[StepSpread]


def step_values(
    lines: Sequence[StepLine], preferences: Sequence[str], continual: bool
) -> StepValues:
    """Per global step, each measured preference's compliance and the capability ratio (of the
    one adapter, or continual=False of each preference's own), from the first line at that step
    that has them: a continual stage's baseline re-measures the previous stage's last step."""
    steps: StepValues = {}
    for line in lines:
        values = steps.setdefault(line.run_step, {})
        for name in preferences:
            compliance = report.compliance_of(line, name)
            if compliance is not None:
                values.setdefault(f"compliance.{name}", compliance)
        ratio = report.finite(line.metrics.get("capability_ratio"))
        if ratio is not None:
            key = "capability_ratio" if continual else f"capability_ratio.{line.preference}"
            values.setdefault(key, ratio)
    return steps


def _seed(run_dir: Path) -> int | None:
    try:
        seed = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))["seed"]
    except (OSError, yaml.YAMLError, TypeError, KeyError):
        return None
    return seed if isinstance(seed, int) else None


def seeds_report(run_dirs: Sequence[Path]) -> SeedsReport:
    """The mean and spread over `run_dirs`; EvalConfigError when they are not one config's
    runs under several seeds."""
    if len(run_dirs) < 2:
        raise EvalConfigError(
            "usage: claas eval seeds RUN_DIR RUN_DIR [...] [--out FILE.json]; give at least two "
            "runs of one config with different seeds"
        )
    runs: list[Run] = [(run_dir, *load_run(run_dir)) for run_dir in run_dirs]
    _check_alike(runs)
    stages, continual = runs[0][1].stage_names, runs[0][1].continual
    names = list(dict.fromkeys(stages))
    per_run = [step_values(lines, names, continual) for _, _, lines in runs]
    tables = [{row.get("preference"): row for row in s.table} for _, s, _ in runs]
    return SeedsReport(
        stages=stages,
        continual=continual,
        runs=[_seed_run(run) for run in runs],
        preferences=[_preference_spread(name, tables, per_run) for name in names],
        steps=_step_spreads(per_run),
    )


def _check_alike(runs: Sequence[Run]) -> None:
    first_dir, first, _ = runs[0]
    expected = (first.stage_names, first.continual)
    for run_dir, summary, _ in runs[1:]:
        found = (summary.stage_names, summary.continual)
        if found != expected:
            raise EvalConfigError(
                f"{run_dir} teaches {found[0]} (continual: {found[1]}), but {first_dir} teaches "
                f"{expected[0]} (continual: {expected[1]}); pass runs of one config that differ "
                "only in seed"
            )
    ids = [summary.run_id for _, summary, _ in runs]
    if len(set(ids)) != len(ids):
        raise EvalConfigError(f"runs {ids} include one run twice; pass each run directory once")


def _seed_run(run: Run) -> SeedRun:
    run_dir, summary, lines = run
    return SeedRun(
        run_dir=str(run_dir),
        run_id=summary.run_id,
        seed=_seed(run_dir),
        status=summary.status,
        run_seconds=summary.run_seconds or report.run_seconds(lines),
    )


def _preference_spread(
    name: str, tables: Sequence[dict[Any, dict[str, Scalar]]], per_run: Sequence[StepValues]
) -> PreferenceSpread:
    columns = {
        column: Spread.of(table.get(name, {}).get(column) for table in tables)
        for column in KEY_COLUMNS
    }
    key = f"compliance.{name}"
    measured = sorted({step for run in per_run for step, values in run.items() if key in values})
    by_step = {
        step: Spread.of(run.get(step, {}).get(key) for run in per_run)
        for step in measured
        if step > 0
    }
    return PreferenceSpread(preference=name, columns=columns, compliance_by_step=by_step)


def _step_spreads(per_run: Sequence[StepValues]) -> list[StepSpread]:
    spreads = []
    for step in sorted({step for run in per_run for step in run}):
        keys = dict.fromkeys(key for run in per_run for key in run.get(step, {}))
        values = {key: Spread.of(run.get(step, {}).get(key) for run in per_run) for key in keys}
        spreads.append(StepSpread(global_step=step, values=values))
    return spreads


def seeds_text(seeds: SeedsReport) -> str:
    """The report as three plain-text tables: runs, preferences, steps."""
    runs = [
        {
            "run": run.run_id,
            "seed": run.seed,
            "status": run.status,
            "run time": report.format_seconds(run.run_seconds),
        }
        for run in seeds.runs
    ]
    preferences = [
        {"preference": p.preference, **{k: s.text() for k, s in p.columns.items()}}
        for p in seeds.preferences
    ]
    keys = list(dict.fromkeys(k for step in seeds.steps for k in step.values))
    steps = [
        {"global_step": step.global_step, **{k: s.text() for k, s in step.values.items()}}
        for step in seeds.steps
    ]
    mode = "continual" if seeds.continual else "an adapter per preference"
    return "\n\n".join(
        [
            f"{len(seeds.runs)} runs of {' → '.join(seeds.stages)} ({mode}); "
            "mean (min–max) over runs",
            report.format_rows(runs, ("run", "seed", "status", "run time")),
            report.format_rows(preferences, ("preference", *KEY_COLUMNS)),
            report.format_rows(steps, ("global_step", *keys)),
        ]
    )
