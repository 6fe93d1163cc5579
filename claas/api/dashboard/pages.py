"""The dashboard's pages: which template each one renders, with what, and how it is sent.

A page builder (`feedback_page`, `eval_runs_page`, `eval_run_page`, `login_page`) turns what the
viewer asked for into a `Page`: its template and context. `Pages.render` renders it with Jinja2
(autoescaped: prompts and responses are user text) and sends it with the dashboard's security
headers. Templates are in `claas/api/templates`; they use inline CSS and no script, so nothing is
built or fetched from anywhere, and a page refreshes itself with `<meta http-equiv=refresh>` only
while something on it is still queued, running or in progress.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from claas.api.auth import Principal
from claas.api.dashboard.eval_runs import (
    PLOT_NAME,
    columns,
    find_eval_run,
    list_eval_runs,
    plot_path,
    read_steps,
)
from claas.api.dashboard.feedback_log import Pagination, read_feedback_page
from claas.errors import InvalidLoraId
from claas.ids import validate_lora_id
from claas.runtime import Runtime

REFRESH_SECONDS = 5

# No script runs on these pages and nothing is loaded from elsewhere; say so to the browser, so
# that text a user typed can never become code even if escaping were ever missed.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "–"
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _iso(moment: str) -> str:
    """An ISO timestamp from an eval run, shown like the others (UTC); as written if unparsable."""
    try:
        parsed = dt.datetime.fromisoformat(moment)
    except ValueError:
        return moment
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return _when(parsed.timestamp())


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def _cell(value: Any) -> str:
    """One table cell: numbers to 4 significant digits, other scalars as text, the rest JSON."""
    if value is None:
        return "–"
    if isinstance(value, bool | str | int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value, ensure_ascii=False, default=str)


@functools.cache
def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(Path(__file__).parent.parent / "templates"),
        autoescape=True,  # every template is HTML; prompts and responses are user text
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=_when, iso=_iso, duration=_duration, cell=_cell)
    env.globals["quote"] = quote
    return env


@dataclass(frozen=True)
class Page:
    """A template to render, and what with."""

    template: str
    title: str
    context: dict[str, Any] = field(default_factory=dict)
    section: str = ""  # the header's tab: "feedback" or "evals"
    refresh: bool = False  # something on it is still queued, running or in progress
    status_code: int = 200


class Pages:
    """Renders a page into a response with the dashboard's security headers.

    `signed_in`: whether the server has API keys, so that a viewer has a key to sign out of
    (without keys, on loopback, everything is visible to a local user).
    """

    def __init__(self, signed_in: bool) -> None:
        self.signed_in = signed_in

    def render(self, page: Page, viewer: Principal | None) -> HTMLResponse:
        template = _environment().get_template(page.template)
        html = template.render(
            viewer=viewer,
            viewer_label=self._label(viewer),
            signed_in=self.signed_in,
            title=page.title,
            section=page.section,
            refresh=REFRESH_SECONDS if page.refresh else None,
            **page.context,
        )
        return HTMLResponse(html, page.status_code, headers=SECURITY_HEADERS)

    def _label(self, viewer: Principal | None) -> str:
        """What the page header says of the viewer."""
        if viewer is None:
            return ""
        if viewer.owner is not None:
            return viewer.owner
        return "admin" if self.signed_in else "local (no API keys)"


def login_page(target: str, error: str | None = None, status_code: int = 200) -> Page:
    """The sign-in form; `target` is where to go once signed in."""
    context = {"error": error, "next": target}
    return Page("login.html", "Sign in", context, status_code=status_code)


def not_found(what: str) -> Page:
    return Page("missing.html", "Not found", {"what": what}, status_code=404)


def feedback_page(
    runtime: Runtime,
    viewer: Principal,
    lora_id: str | None,
    limit: int,
    page: int | None,
    offset: int | None,
) -> Page:
    """The feedback log, newest first, of one adapter or all the viewer sees (blocking: it
    reads the store, so run it in a thread)."""
    lora_id = lora_id.strip() if lora_id else None
    note = None
    if lora_id:
        try:
            validate_lora_id(lora_id)
        except InvalidLoraId as error:
            note = str(error)
    start = offset if offset is not None else ((page or 1) - 1) * limit
    if note is None:
        total, pending, rows = read_feedback_page(runtime, viewer.owner, lora_id, limit, start)
    else:
        total, pending, rows = 0, 0, []
    context = {
        "rows": rows,
        "pagination": Pagination(start, limit, total, lora_id),
        "lora_id": lora_id or "",
        "pending": pending,
        "note": note,
    }
    return Page("feedback.html", "Feedback", context, section="feedback", refresh=pending > 0)


def eval_runs_page(evals_dir: Path, viewer: Principal) -> Page:
    """The eval runs the viewer may see, newest first; the admin also sees the unreadable ones
    and where the runs are."""
    runs, skipped = list_eval_runs(evals_dir, viewer)
    context = {
        "runs": runs,
        "skipped": skipped,
        "evals_dir": str(evals_dir) if viewer.owner is None else None,
    }
    refresh = any(run.summary.status == "running" for run in runs)
    return Page("evals.html", "Eval runs", context, section="evals", refresh=refresh)


def eval_run_page(evals_dir: Path, name: str, viewer: Principal) -> Page:
    """One eval run: its summary table, its steps and its plots, with a note for each part
    that cannot be shown (yet)."""
    run = find_eval_run(evals_dir, name, viewer)
    if run is None:
        return not_found(f"eval run {name!r}")
    steps, notes = read_steps(evals_dir / name)
    plots = []
    for plot in run.summary.plots:
        if plot_path(evals_dir / name, plot) is not None:
            plots.append(plot)
        elif PLOT_NAME.fullmatch(plot):
            notes.append(f"plot {plot!r} is not written yet")
        else:
            notes.append(f"plot {plot!r} not shown: not a plain .png file name")
    context = {
        "run": run,
        "table_columns": columns(run.summary.table),
        "steps": steps,
        "metric_columns": columns(step.metrics for step in steps),
        "plots": plots,
        "notes": notes,
    }
    title = f"Eval {run.summary.run_id}"
    return Page(
        "eval_run.html", title, context, section="evals", refresh=run.summary.status == "running"
    )
