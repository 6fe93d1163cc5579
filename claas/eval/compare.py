"""Compare two eval runs: which learnt faster, and at what cost?

Meant for two runs that differ in one setting on the same seed and prompts, typically
`training.use_topk_divergence=true` against `false`:

    claas eval compare ~/.local/share/claas/evals/eval-A ~/.local/share/claas/evals/eval-B

prints, per preference, the steps to reach compliance 0.8, the final compliance and the final
capability ratio of each run, and writes `compare.png` (compliance and capability per step, one
line style per run) into RUN_B's parent directory or `--out`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from claas.eval import report
from claas.eval.config import EvalConfigError
from claas.eval.runner import read_lines


def load_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A run directory's summary and step lines (a run in progress too); EvalConfigError when
    it holds no readable summary."""
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise EvalConfigError(
            f"{run_dir} is not a claas eval run ({path.name}: {error}); pass run directories"
        ) from None
    return summary, read_lines(run_dir / "steps.jsonl")


def _label(summary: dict[str, Any]) -> str:
    return f"{summary.get('run_id', '?')} ({summary.get('divergence_mode', '?')})"


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def compare_table(a: dict[str, Any], b: dict[str, Any]) -> str:
    rows_a = {row["preference"]: row for row in a.get("table", [])}
    rows_b = {row["preference"]: row for row in b.get("table", [])}
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


def compare_plot(runs: list[tuple[dict[str, Any], list[dict[str, Any]]]], out: Path) -> Path:
    figure = Figure(figsize=(10, 4))
    compliance, capability = figure.subplots(1, 2)
    for (summary, lines), style in zip(runs, ("-", "--"), strict=True):
        names = list(dict.fromkeys(line["preference"] for line in lines))
        for name in names:
            for ax, key in ((compliance, "compliance"), (capability, "capability_ratio")):
                xs, ys = report._series(lines, key, name)
                if xs:
                    ax.plot(
                        xs, ys, style, marker="o", markersize=3, label=f"{name} {_label(summary)}"
                    )
    compliance.set_title("compliance on held-out probes")
    compliance.axhline(report.COMPLIANCE_TARGET, color="grey", linestyle=":", linewidth=1)
    capability.set_title("capability / baseline")
    for ax in (compliance, capability):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(out, format="png", dpi=90)
    return out


def compare_runs(run_a: Path, run_b: Path, out: Path | None = None) -> tuple[str, Path]:
    """The comparison table as text, and the path of the plot written."""
    a, b = load_run(run_a), load_run(run_b)
    text = compare_table(a[0], b[0])
    plot = compare_plot([a, b], out or run_b.resolve().parent / "compare.png")
    return text, plot
