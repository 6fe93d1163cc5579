"""Compare two eval runs: which learnt faster, and at what cost?

Meant for two runs that differ in one setting on the same seed and prompts, typically
`training.use_topk_divergence=true` against `false`:

    claas eval compare ~/.local/share/claas/evals/eval-A ~/.local/share/claas/evals/eval-B

prints, per preference, the steps to reach compliance 0.8, the final compliance and the final
capability ratio of each run, and writes `compare.png` (compliance and capability per step, one
line style per run, each curve named by its preference, divergence mode and run, A or B) into
RUN_B's parent directory or `--out`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from claas.eval import report
from claas.eval.config import EvalConfigError
from claas.runs import RunSummary, StepLine, read_steps, read_summary

Run = tuple[RunSummary, list[StepLine]]


def load_run(run_dir: Path) -> Run:
    """A run directory's summary and step lines (a run in progress too); EvalConfigError when
    it holds no readable summary."""
    try:
        return read_summary(run_dir), read_steps(run_dir / "steps.jsonl")
    except (OSError, ValueError) as error:  # pydantic's ValidationError is a ValueError
        raise EvalConfigError(
            f"{run_dir} is not a claas eval run ({error}); pass run directories"
        ) from None


def _label(summary: RunSummary) -> str:
    return f"{summary.run_id} ({summary.divergence_mode})"


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def compare_table(a: RunSummary, b: RunSummary) -> str:
    rows_a = {str(row["preference"]): row for row in a.table}
    rows_b = {str(row["preference"]): row for row in b.table}
    names = list(dict.fromkeys([*rows_a, *rows_b]))
    columns = [
        ("steps to 0.8", "steps_to_0.8"),
        ("final compliance", "final_compliance"),
        ("final capability", "capability_ratio"),
    ]
    header = ["preference"] + [f"{title} {side}" for title, _ in columns for side in ("A", "B")]
    body = [
        [name]
        + [_fmt(rows.get(name, {}).get(key)) for _, key in columns for rows in (rows_a, rows_b)]
        for name in names
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = [f"A: {_label(a)}", f"B: {_label(b)}", ""]
    for row in [header, ["-" * w for w in widths], *body]:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    return "\n".join(lines)


def compare_plot(runs: list[Run], out: Path) -> Path:
    """Write `compare_figure` of the two runs to `out` as PNG."""
    figure = compare_figure(runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(out, format="png", dpi=90)
    return out


def compare_figure(runs: list[Run]) -> Figure:
    """Compliance and capability per step of runs A and B (solid and dashed)."""
    figure = Figure(figsize=(10, 4))
    compliance, capability = figure.subplots(1, 2)
    for (summary, lines), style, side in zip(runs, ("-", "--"), "AB", strict=True):
        names = list(dict.fromkeys(line.preference for line in lines))
        for name in names:
            label = f"{name}, {summary.divergence_mode} ({side})"
            for ax, key in ((compliance, "compliance"), (capability, "capability_ratio")):
                xs, ys = report.series(lines, key, name)
                if xs:
                    ax.plot(xs, ys, style, marker="o", markersize=3, label=label)
    compliance.set_title("compliance on held-out probes")
    compliance.axhline(report.COMPLIANCE_TARGET, color="grey", linestyle=":", linewidth=1)
    capability.set_title("capability / baseline")
    for ax in (compliance, capability):
        report.whole_steps(ax)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6)
    return figure


def compare_runs(run_a: Path, run_b: Path, out: Path | None = None) -> tuple[str, Path]:
    """The comparison table as text, and the path of the plot written."""
    a, b = load_run(run_a), load_run(run_b)
    text = compare_table(a[0], b[0])
    plot = compare_plot([a, b], out or run_b.resolve().parent / "compare.png")
    return text, plot
