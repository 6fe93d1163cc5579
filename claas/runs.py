"""An eval run on disk: its `summary.json` and the lines of its `steps.jsonl`, as typed models.

`claas eval` writes a run directory (`<data_dir>/evals/<run_id>/`); the eval's own commands
(`compare`, `seeds`) and the dashboard read it back. This module is the one description of
that format, low enough for both to import (it needs only pydantic):

- `StepLine`: one line of `steps.jsonl`, one preference at one step of one stage (step 0 is
  the stage's baseline), with the metrics measured after it, the engine's training metrics,
  the rollouts trained on and the probes answered. The file is append-only.
- `RunSummary`: `summary.json`, rebuilt from the lines after every step (`claas.eval.report`).

Every run written so far reads back: fields added later (`stage`, `seconds`, `stages`,
`run_seconds`) are optional, and a field a newer claas adds is kept, not refused, so an older
reader still shows a newer run.

    summary = read_summary(run_dir)
    lines = read_steps(run_dir / "steps.jsonl")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

RunStatus = Literal["running", "done", "failed"]
# One cell of the summary table, or one of a step's training metrics.
Scalar = bool | int | float | str | None


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")


class Rollout(_Record):
    """One answer a step trained on, and the feedback (and example) it was given."""

    prompt: str
    response: str
    feedback: str
    example: str | None = None


class Probe(_Record):
    """One held-out probe's answer, and the preference's verifier score of it."""

    prompt: str
    response: str
    score: float
    finish_reason: str | None = None


class StepLine(_Record):
    """One line of `steps.jsonl`: `preference` at `step` of `stage` (0: its baseline)."""

    preference: str
    stage: int | None = None  # the entry of `preferences`; None in lines written before stages
    step: int
    global_step: int | None = None  # the step in the whole run; None in the oldest lines
    lora_id: str
    adapter_version: int | None  # the version measured
    timestamp: str
    elapsed_seconds: float  # since the session that wrote the line began
    seconds: float | None = None  # this step's wall time; None in lines written before it
    metrics: dict[str, float]  # flat: compliance, margin_per_token, capability_ratio, …
    training: dict[str, Scalar] | None  # the engine's metrics; None on a baseline
    rollouts: list[Rollout]
    probes: list[Probe]

    @property
    def run_step(self) -> int:
        """Where the line sits on a plot's step axis: a continual run numbers its steps across
        its stages."""
        return self.step if self.global_step is None else self.global_step

    def dump(self) -> str:
        """The line as written to `steps.jsonl` (without a newline): what was read, as read.
        A metric that is not a number (NaN) is refused rather than written as null."""
        return json.dumps(self.model_dump(mode="json", exclude_unset=True), allow_nan=False)


class Alert(_Record):
    """A trained step's metric past its threshold."""

    preference: str
    stage: int | None = None  # None in summaries written before stages
    step: int
    global_step: int | None = None  # None in the oldest summaries
    metric: str
    value: float
    threshold: float
    message: str

    @property
    def run_step(self) -> int:
        """The alerting line's step in the whole run (`StepLine.run_step`)."""
        return self.step if self.global_step is None else self.global_step


class RunSummary(_Record):
    """`summary.json`: the run's state and results, rebuilt after every step."""

    run_id: str
    status: RunStatus
    started_at: str  # ISO 8601
    updated_at: str
    divergence_mode: str
    url: str  # the server the run used ("in-process" for its own)
    lora_ids: list[str]
    # One flat row per preference (column → number or text), rendered as it is.
    table: list[dict[str, Scalar]]
    plots: list[str]  # PNG file names in the run directory
    continual: bool
    stages: list[str] | None = None  # each stage's preference; None before stages existed
    steps_recorded: int
    run_seconds: float | None = None  # the lines' `seconds` added up; None before they existed
    alerts: list[Alert]
    capability_min_ratio: float | None
    capability_target: float
    capability_target_met: bool | None
    error: str | None = None  # why a failed run stopped

    @property
    def stage_names(self) -> list[str]:
        """The preference of each stage; a summary written before stages has one per row."""
        if self.stages is not None:
            return self.stages
        return [str(row.get("preference")) for row in self.table]

    @property
    def label(self) -> str:
        """What the run taught and how, for a legend: `concise, no_emoji (topk_gjs)`."""
        taught = ", ".join(dict.fromkeys(self.stage_names))
        return f"{taught} ({self.divergence_mode})"


def read_summary(run_dir: Path) -> RunSummary:
    """The run's `summary.json`; OSError when it cannot be read, ValidationError when it is
    not a summary."""
    return RunSummary.model_validate_json((run_dir / "summary.json").read_bytes())


def read_steps(path: Path) -> list[StepLine]:
    """`steps.jsonl`'s lines up to a torn last one (a run killed mid-write), which is left out;
    ValueError for a bad line before the last, which no kill makes."""
    if not path.exists():
        return []
    raw_lines = [raw for raw in path.read_text(encoding="utf-8").splitlines() if raw.strip()]
    lines = []
    for number, raw in enumerate(raw_lines, start=1):
        try:
            lines.append(StepLine.model_validate_json(raw))
        except ValidationError as error:
            if number == len(raw_lines):
                break  # only the last line can be torn: the file is append-only
            raise ValueError(f"{path} line {number} is not a step line: {error}") from None
    return lines
