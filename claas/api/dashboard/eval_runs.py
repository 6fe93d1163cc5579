"""The eval runs `claas eval` writes, as the dashboard reads them: `<data_dir>/evals/<run_id>/`.

A run is a directory with `summary.json`, `steps.jsonl` (one line per preference and step) and
PNG plots, in the format `claas.runs` describes (`RunSummary`, `StepLine`: the models the eval
writes them with). A run may be read while `claas eval` is still writing it, so a half-written
or malformed run is skipped with a note saying what is wrong, never an error; a field this
reader does not know is kept and ignored.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from claas.api.auth import Principal
from claas.runs import RunSummary, StepLine

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
PLOT_NAME = re.compile(r"[A-Za-z0-9_.-]+\.png")


@dataclass(frozen=True)
class EvalRunView:
    name: str  # the directory's name: the run's address in URLs
    summary: RunSummary


@dataclass(frozen=True)
class SkippedRun:
    name: str
    reason: str


class MalformedRun(Exception):
    pass


def _problem(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "the file"
    return f"{where}: {first.get('msg')}"


def read_summary(run_dir: Path) -> RunSummary:
    """The run's summary, or MalformedRun saying what is wrong with it."""
    path = run_dir / "summary.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MalformedRun("no summary.json yet") from None
    except (OSError, UnicodeDecodeError) as error:
        raise MalformedRun(f"summary.json is unreadable ({error})") from None
    try:
        return RunSummary.model_validate_json(text)
    except ValidationError as error:
        raise MalformedRun(f"summary.json is malformed ({_problem(error)})") from None


def read_steps(run_dir: Path) -> tuple[list[StepLine], list[str]]:
    """The run's steps, and a note for each line skipped (a run in progress may be mid-line)."""
    path = run_dir / "steps.jsonl"
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return [], []
    except OSError as error:
        return [], [f"steps.jsonl is unreadable ({error})"]
    steps, notes = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            steps.append(StepLine.model_validate_json(line))
        except ValidationError as error:
            notes.append(f"steps.jsonl line {number} skipped: {_problem(error)}")
    return steps, notes


def _run_visible(viewer: Principal, summary: RunSummary) -> bool:
    """An owner sees a run only if every adapter it evaluated is theirs."""
    if viewer.owner is None:
        return True
    return bool(summary.lora_ids) and all(viewer.sees(lora_id) for lora_id in summary.lora_ids)


def _started(run: EvalRunView) -> float:
    try:
        moment = dt.datetime.fromisoformat(run.summary.started_at)
    except ValueError:
        return -math.inf
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def list_eval_runs(
    evals_dir: Path, viewer: Principal
) -> tuple[list[EvalRunView], list[SkippedRun]]:
    """The runs this viewer may see, newest first, and the run dirs that could not be read.

    Skipped runs are reported only to viewers who see every run: their owner is unknown.
    """
    runs, skipped = [], []
    try:
        children = sorted(evals_dir.iterdir()) if evals_dir.is_dir() else []
    except OSError:
        children = []
    for child in children:
        if not child.is_dir() or not RUN_NAME.fullmatch(child.name):
            continue
        try:
            summary = read_summary(child)
        except MalformedRun as error:
            skipped.append(SkippedRun(child.name, str(error)))
            continue
        if _run_visible(viewer, summary):
            runs.append(EvalRunView(child.name, summary))
    runs.sort(key=_started, reverse=True)
    return runs, skipped if viewer.owner is None else []


def find_eval_run(evals_dir: Path, name: str, viewer: Principal) -> EvalRunView | None:
    """The run in directory `name`, if it is readable and this viewer may see it."""
    if not RUN_NAME.fullmatch(name):
        return None
    run_dir = evals_dir / name
    if not run_dir.is_dir():
        return None
    try:
        summary = read_summary(run_dir)
    except MalformedRun:
        return None
    return EvalRunView(name, summary) if _run_visible(viewer, summary) else None


def plot_path(run_dir: Path, name: str) -> Path | None:
    """The plot file `name` of a run: a plain `.png` file name, a file directly inside the run
    dir (a symlink out of it does not count). None for anything else."""
    if not PLOT_NAME.fullmatch(name):
        return None
    root = run_dir.resolve()
    path = (root / name).resolve()
    return path if path.parent == root and path.is_file() else None


def eval_plot_path(evals_dir: Path, name: str, plot: str, viewer: Principal) -> Path | None:
    """The file of plot `plot` of run `name`: only if the viewer may see the run and its summary
    lists the plot. None for anything else."""
    run = find_eval_run(evals_dir, name, viewer)
    if run is None or plot not in run.summary.plots:
        return None
    return plot_path(evals_dir / name, plot)


def columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """The union of the rows' keys, in the order they first appear."""
    return list(dict.fromkeys(key for row in rows for key in row))
