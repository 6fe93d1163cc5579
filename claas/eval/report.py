"""The run directory's summary and plots, rebuilt from `steps.jsonl` alone.

Because everything here is a function of the step lines, a resumed run reports exactly what an
uninterrupted one would. Files are written atomically (a temporary file, then `os.replace`), so
the dashboard reading a run in progress never sees half a file.

The files' format, which the dashboard (`claas.api.dashboard`) reads too, is `claas.runs`:
`RunSummary` for `summary.json`, `StepLine` for a line of `steps.jsonl`. The summary's
`run_seconds` adds up the steps' wall time, so a resumed run counts every session.

A row's `final_compliance` is the preference's compliance on the last line that measured it
(in a continual run, the run's last line); `peak_compliance` the highest on any line;
`retention` final / peak. `steps` counts the preference's trained steps over all its stages,
and `steps_to_0.8`, `min_capability_ratio` and `repetition_max` are over those steps too.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from claas.eval.config import AlertThresholds
from claas.runs import Alert, RunStatus, RunSummary, Scalar, StepLine

COMPLIANCE_TARGET = 0.8
PLOTS = ("learning_curves.png", "capability.png", "collapse.png", "training.png")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def compliance_of(line: StepLine, preference: str) -> float | None:
    """`preference`'s compliance as measured on this line (its own or, continual, another's)."""
    metrics = line.metrics
    if line.preference == preference:
        return finite(metrics.get("compliance"))
    return finite(metrics.get(f"compliance.{preference}"))


# ---------------------------------------------------------------------------------------------
# Alerts and the summary table
# ---------------------------------------------------------------------------------------------


def alerts(
    lines: Sequence[StepLine], thresholds: AlertThresholds, changes_length: Collection[str] = ()
) -> list[Alert]:
    """Every (trained step, metric) past its threshold, in order.

    Length drift is no alert while a preference in `changes_length` is taught: shorter answers
    are what `concise` asks for, not a sign of collapse.
    """
    rules = [
        ("capability_ratio", "below", thresholds.min_capability_ratio),
        ("entropy_ratio", "below", thresholds.min_entropy_ratio),
        ("self_rouge_l", "above", thresholds.max_self_rouge_l),
        ("distinct_2", "below", thresholds.min_distinct_2),
        ("abs_length_drift", "above", thresholds.max_length_drift),
        ("repetition_mean", "above", thresholds.max_repetition),
    ]
    found = []
    for line in lines:
        if line.step == 0:
            continue  # a baseline past a threshold is the model's own, not training's doing
        metrics = dict(line.metrics)
        if "length_drift" in metrics:
            metrics["abs_length_drift"] = abs(metrics["length_drift"])
        for metric, side, limit in rules:
            if metric == "abs_length_drift" and line.preference in changes_length:
                continue
            value = finite(metrics.get(metric))
            if value is None or not (value < limit if side == "below" else value > limit):
                continue
            found.append(
                Alert(
                    preference=line.preference,
                    stage=line.stage,
                    step=line.step,
                    global_step=line.run_step,
                    metric=metric,
                    value=value,
                    threshold=limit,
                    message=f"{metric} {value:.3g} is {side} {limit:g}",
                )
            )
    return found


def table(
    lines: Sequence[StepLine], preferences: Sequence[str], found: Sequence[Alert]
) -> list[dict[str, Scalar]]:
    """One flat row per preference, over all its stages (the dashboard renders it as is)."""
    rows = []
    for name in preferences:
        own = [line for line in lines if line.preference == name]
        if not own:
            continue
        trained = [line for line in own if line.step > 0]
        values = [v for line in lines if (v := compliance_of(line, name)) is not None]
        first, last = own[0].metrics, own[-1].metrics
        # Counted in this preference's trained steps, so a stage that brings it back goes on.
        reached = [
            count
            for count, line in enumerate([own[0], *trained])
            if (c := compliance_of(line, name)) is not None and c >= COMPLIANCE_TARGET
        ]
        peak = max(values) if values else None
        final = values[-1] if values else None  # continual: at the end of the whole sequence
        capability = _values(own, "capability_ratio")
        trained_capability = _values(trained, "capability_ratio")
        repetition = _values(trained, "repetition_max")
        row: dict[str, Scalar] = {
            "preference": name,
            "lora_id": own[0].lora_id,
            "steps": len(trained),
            "baseline_compliance": finite(first.get("compliance")),
            "final_compliance": final,
            "peak_compliance": peak,
            "retention": final / peak if final is not None and peak else None,
            "steps_to_0.8": reached[0] if reached else None,
            "margin_per_token_baseline": finite(first.get("margin_per_token")),
            "margin_per_token_final": finite(last.get("margin_per_token")),
            "length_change_pct": _percent(last.get("mean_length"), first.get("mean_length")),
            "capability_ratio": capability[-1] if capability else None,
            "min_capability_ratio": min(trained_capability) if trained_capability else None,
            "repetition_max": max(repetition) if repetition else None,
            "alerts": "; ".join(
                dict.fromkeys(f"{a.metric}@{a.run_step}" for a in found if a.preference == name)
            ),
        }
        rows.append(row)
    return rows


def _values(lines: Iterable[StepLine], key: str) -> list[float]:
    return [v for line in lines if (v := finite(line.metrics.get(key))) is not None]


def _percent(now: Any, before: Any) -> float | None:
    a, b = finite(now), finite(before)
    return (a / b - 1) * 100 if a is not None and b else None


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def series(
    lines: Iterable[StepLine], key: str, preference: str | None = None
) -> tuple[list[int], list[float]]:
    """`key` (a metric, or `training.<name>`) against the run's step, on `preference`'s lines."""
    xs, ys = [], []
    for line in lines:
        if preference is not None and line.preference != preference:
            continue
        source: dict[str, Any] = (
            (line.training or {}) if key.startswith("training.") else dict(line.metrics)
        )
        value = finite(source.get(key.removeprefix("training.")))
        if value is not None:
            xs.append(line.run_step)
            ys.append(value)
    return xs, ys


def _panel(
    ax: Axes, lines: Sequence[StepLine], key: str, preferences: Sequence[str], title: str
) -> None:
    """One curve per preference against the run's step; a preference taught in several stages
    gets one segment per stage, in one colour, with no line across the stages between."""
    for name in preferences:
        color = None
        for stage in dict.fromkeys(line.stage for line in lines):
            xs, ys = series((line for line in lines if line.stage == stage), key, name)
            if xs:
                label = name if color is None else None
                (curve,) = ax.plot(xs, ys, marker="o", markersize=3, color=color, label=label)
                color = curve.get_color()
    _finish(ax, title)


def whole_steps(ax: Axes) -> None:
    """Label a step axis with whole steps only. `min_n_ticks=1`: with the default 2, a view
    that holds a single whole step (one point, ±5 %) falls back to ticks like 0.96, 0.98."""
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _finish(ax: Axes, title: str) -> None:
    ax.set_title(title)
    whole_steps(ax)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "not measured yet", ha="center", va="center", transform=ax.transAxes)


def _save(figure: Figure, path: Path) -> None:
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, format="png", dpi=90)
    os.replace(tmp, path)


def plot_run(run_dir: Path, lines: Sequence[StepLine], preferences: Sequence[str]) -> list[str]:
    """Write the four PNGs; return their names."""
    continual = any(k.startswith("compliance.") for line in lines for k in line.metrics)

    figure = Figure(figsize=(10, 4))
    compliance, margin = figure.subplots(1, 2)
    if continual:  # every taught preference, on every step of the sequence
        for name in preferences:
            points = [
                (line.run_step, c) for line in lines if (c := compliance_of(line, name)) is not None
            ]
            if points:
                compliance.plot(*zip(*points, strict=True), marker="o", markersize=3, label=name)
        _finish(compliance, "compliance on held-out probes (continual)")
    else:
        _panel(compliance, lines, "compliance", preferences, "compliance on held-out probes")
    compliance.axhline(COMPLIANCE_TARGET, color="grey", linestyle=":", linewidth=1)
    compliance.set_ylim(-0.05, 1.05)
    _panel(margin, lines, "margin_per_token", preferences, "log-prob margin per token")
    _save(figure, run_dir / "learning_curves.png")

    figure = Figure(figsize=(6, 4))
    ax = figure.subplots()
    _panel(ax, lines, "capability_ratio", preferences, "capability / baseline")
    ax.axhline(1.0, color="grey", linewidth=1)
    ax.axhline(0.9, color="red", linestyle=":", linewidth=1)
    _save(figure, run_dir / "capability.png")

    figure = Figure(figsize=(10, 7))
    axes = figure.subplots(2, 2).ravel()
    for ax, (key, title) in zip(
        axes,
        [
            ("entropy", "token entropy estimate (nats)"),
            ("self_rouge_l", "self-ROUGE-L across seeds"),
            ("distinct_2", "distinct-2 (dashed: distinct-1)"),
            ("length_drift", "length drift vs baseline"),
        ],
        strict=True,
    ):
        if key == "distinct_2":
            for name in preferences:
                xs, ys = series(lines, "distinct_1", name)
                if xs:
                    ax.plot(xs, ys, linestyle="--", color="grey", linewidth=1)
        _panel(ax, lines, key, preferences, title)
    _save(figure, run_dir / "collapse.png")

    figure = Figure(figsize=(10, 7))
    axes = figure.subplots(2, 2).ravel()
    for ax, (key, title) in zip(
        axes,
        [
            ("training.loss", "loss"),
            ("training.divergence_mean", "divergence (GJS or KL)"),
            ("training.mean_is_ratio", "importance-sampling ratio"),
            ("training.grad_norm", "grad norm"),
        ],
        strict=True,
    ):
        _panel(ax, lines, key, preferences, title)
    _save(figure, run_dir / "training.png")
    return list(PLOTS)


def summary(
    *,
    run_id: str,
    status: RunStatus,
    started_at: str,
    updated_at: str,
    divergence_mode: str,
    url: str,
    lora_ids: Sequence[str],
    lines: Sequence[StepLine],
    preferences: Sequence[str],
    thresholds: AlertThresholds,
    plots: Sequence[str],
    continual: bool,
    error: str | None = None,
    changes_length: Collection[str] = (),
    stages: Sequence[str] = (),
) -> RunSummary:
    found = alerts(lines, thresholds, changes_length)
    ratios = _values((line for line in lines if line.step > 0), "capability_ratio")
    return RunSummary(
        run_id=run_id,
        status=status,
        started_at=started_at,
        updated_at=updated_at,
        divergence_mode=divergence_mode,
        url=url,
        lora_ids=list(lora_ids),
        table=table(lines, preferences, found),
        plots=list(plots),
        continual=continual,
        stages=list(stages or preferences),
        steps_recorded=len(lines),
        run_seconds=run_seconds(lines),
        alerts=found,
        capability_min_ratio=min(ratios) if ratios else None,
        capability_target=thresholds.min_capability_ratio,
        capability_target_met=min(ratios) >= thresholds.min_capability_ratio if ratios else None,
        error=error,
    )


def run_seconds(lines: Iterable[StepLine]) -> float:
    """The steps' wall time added up (lines written before `seconds` existed count 0)."""
    return round(sum(line.seconds or 0.0 for line in lines), 3)


def format_seconds(seconds: float) -> str:
    """A run time for people: "41 min 12 s", "1 h 3 min", "12 s"."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def format_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """`rows` as a plain-text table of `columns` (floats to 3 decimals, missing as –)."""

    def cell(value: Any) -> str:
        if value is None or value == "":
            return "–"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    table = [list(columns)] + [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in table)


def write_summary(run_dir: Path, summary: RunSummary) -> None:
    body = summary.model_dump(mode="json", exclude={"error"} if summary.error is None else None)
    write_atomic(run_dir / "summary.json", json.dumps(body, indent=2, allow_nan=False) + "\n")
