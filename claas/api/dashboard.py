"""HTML dashboards under /dashboard: the feedback log and the eval runs, for a person to read.

The API answers programs; these pages answer "what did my feedback do?". `/dashboard` lists
feedback requests newest first (status, adapter, the version each produced, timings, metrics),
and each row opens to its samples: the conversation, the response, the feedback, and the
teacher's hindsight prompt exactly as the engine tokenised it. `/dashboard/evals` lists the runs
that `claas eval` writes under `<data_dir>/evals/<run_id>/` (`summary.json`, `steps.jsonl`,
PNG plots), including runs still in progress; a half-written or malformed run is skipped with a
note, never a 500.

Pages are server-rendered Jinja2 (autoescaped: prompts and responses are user text) with inline
CSS and no script, so nothing is built or fetched from anywhere; a page refreshes itself with
`<meta http-equiv=refresh>` only while something on it is still queued, running or in progress.

Auth uses the API's keys (`Settings.api_keys`, `admin_key`): an owner's key sees that owner's
adapters and eval runs, the admin key sees all, and with no keys configured (loopback dev mode)
everything is visible. A browser cannot easily send `Authorization: Bearer`, so the key may also
come from an HttpOnly, SameSite=Strict cookie set by the login form at `/dashboard/login`.

    app.include_router(dashboard_router(runtime))
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from claas.api.auth import keys_configured, principal_for_key
from claas.api.schemas import MAX_OFFSET
from claas.errors import InvalidLoraId
from claas.ids import validate_lora_id, visible_to
from claas.records import PENDING, FeedbackRequest, Rollout
from claas.runtime import Runtime
from claas.sdpo.prompts import HindsightStyle, message_text, rollout_teacher_prompt_tokens
from claas.settings import Settings

COOKIE = "claas_dashboard_key"
PAGE_SIZE = 25
MAX_PAGE_SIZE = 100  # each row renders its teacher prompts
REFRESH_SECONDS = 5
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
PLOT_NAME = re.compile(r"[A-Za-z0-9_.-]+\.png")

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


# ---------------------------------------------------------------------------------------------
# Who is looking
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Viewer:
    owner: str | None  # None: every owner's records (the admin, or no keys configured)
    label: str  # what the page header says: "alice", "admin", "local (no API keys)"
    signed_in: bool = True  # False in loopback dev mode, where there is no key to sign out of

    def sees(self, lora_id: str) -> bool:
        return visible_to(self.owner, lora_id)


def viewer_for_key(settings: Settings, key: str) -> Viewer | None:
    """The viewer a key stands for (the API's own key resolution), or None for an unknown key."""
    principal = principal_for_key(settings, key)
    if principal is None:
        return None
    return Viewer(owner=principal.owner, label=principal.owner or "admin")


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    return header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else None


def _safe_next(target: str | None) -> str:
    """Where to go after logging in: a dashboard path on this server, never another site."""
    if target and target.startswith("/dashboard") and "//" not in target and "\\" not in target:
        return target
    return "/dashboard"


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


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


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True,  # every template is HTML; prompts and responses are user text
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=_when, iso=_iso, duration=_duration, cell=_cell)
    env.globals["quote"] = quote
    return env


class Pages:
    """Renders a template into a response with the dashboard's security headers."""

    def __init__(self) -> None:
        self.env = _environment()

    def render(
        self,
        name: str,
        viewer: Viewer | None,
        status_code: int = 200,
        refresh: bool = False,
        section: str = "",
        **context: Any,
    ) -> HTMLResponse:
        html = self.env.get_template(name).render(
            viewer=viewer,
            refresh=REFRESH_SECONDS if refresh else None,
            section=section,
            **context,
        )
        return HTMLResponse(html, status_code, headers=SECURITY_HEADERS)

    def not_found(self, viewer: Viewer, what: str) -> HTMLResponse:
        return self.render("missing.html", viewer, 404, title="Not found", what=what)


# ---------------------------------------------------------------------------------------------
# The feedback log
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleView:
    """One item of a feedback request, with what the teacher was shown for it."""

    rollout_id: str
    feedback: str
    messages: list[tuple[str, str]]  # (role, text); empty when the rollout is gone
    response: str | None
    teacher_prompt: str | None
    note: str | None  # why a part is missing


@dataclass(frozen=True)
class FeedbackRow:
    request: FeedbackRequest
    samples: list[SampleView]
    scalars: dict[str, Any]  # the request's scalar metrics
    timings: dict[str, float]
    steps: list[dict[str, Any]]

    @property
    def waited(self) -> float | None:
        started = self.request.started_at
        return None if started is None else started - self.request.created_at

    @property
    def trained(self) -> float | None:
        request = self.request
        if request.started_at is None or request.finished_at is None:
            return None
        return request.finished_at - request.started_at


def teacher_prompt_text(
    tokenizer: Any,
    rollout: Rollout,
    feedback: str,
    repetitions: int,
    style: HindsightStyle,
    example: str | None = None,
) -> str:
    """The teacher's prompt for one sample, as text: the engine's own tokens, decoded.

    The tokens come from the functions in `claas.sdpo.prompts` that the engine trains with, so the
    page shows exactly what the teacher was conditioned on (the special tokens of the
    chat template included).
    """
    tokens = rollout_teacher_prompt_tokens(
        tokenizer, rollout.messages, rollout.prompt_format, feedback, repetitions, style, example
    )
    return str(tokenizer.decode(tokens))


def _sample_view(
    tokenizer: Any,
    item: Mapping[str, Any],
    rollout: Rollout | None,
    repetitions: int,
    style: HindsightStyle,
) -> SampleView:
    rollout_id, feedback = str(item.get("rollout_id", "")), str(item.get("feedback", ""))
    if rollout is None:
        return SampleView(
            rollout_id, feedback, [], None, None, "the rollout has expired and was purged"
        )
    messages = [
        (str(m.get("role", "?")), message_text(m.get("content", ""))) for m in rollout.messages
    ]
    teacher, note = None, None
    if tokenizer is None:
        note = "no tokenizer loaded: the teacher prompt cannot be rendered"
    else:
        try:
            example = item.get("example")
            teacher = teacher_prompt_text(
                tokenizer, rollout, feedback, repetitions, style, str(example) if example else None
            )
        except (ValueError, KeyError, TypeError) as error:
            note = f"the teacher prompt cannot be rendered: {error}"
    return SampleView(rollout_id, feedback, messages, rollout.response_text, teacher, note)


def _feedback_page(
    runtime: Runtime, owner: str | None, lora_id: str | None, limit: int, start: int
) -> tuple[int, int, list[FeedbackRow]]:
    """One page of the feedback log, its totals and its rows (blocking: run in a thread)."""
    store = runtime.store
    requests = store.list_feedback(owner=owner, lora_id=lora_id, limit=limit, offset=start)
    total = store.count_feedback(owner=owner, lora_id=lora_id)
    pending = store.count_feedback(owner=owner, lora_id=lora_id, statuses=PENDING)
    return total, pending, feedback_rows(runtime, requests)


def feedback_rows(runtime: Runtime, requests: Sequence[FeedbackRequest]) -> list[FeedbackRow]:
    ids = [str(item.get("rollout_id", "")) for r in requests for item in r.items]
    rollouts = runtime.store.rollouts_by_id(ids)
    rows = []
    for request in requests:
        repetitions = int(request.training.get("feedback_repetitions", 1) or 1)
        # Requests from before the hindsight setting existed were trained with the context block.
        hindsight = request.training.get("hindsight", "context")
        style: HindsightStyle = "context" if hindsight == "context" else "instruction"
        samples = [
            _sample_view(
                runtime.tokenizer,
                item,
                rollouts.get(str(item.get("rollout_id"))),
                repetitions,
                style,
            )
            for item in request.items
        ]
        metrics = request.metrics
        timings = metrics.get("timings")
        steps = metrics.get("steps")
        rows.append(
            FeedbackRow(
                request=request,
                samples=samples,
                scalars={
                    k: v
                    for k, v in metrics.items()
                    if isinstance(v, str | int | float | bool) and k != "coalesced"
                },
                timings=(
                    {str(k): float(v) for k, v in timings.items() if isinstance(v, int | float)}
                    if isinstance(timings, dict)
                    else {}
                ),
                steps=[s for s in steps if isinstance(s, dict)] if isinstance(steps, list) else [],
            )
        )
    return rows


@dataclass(frozen=True)
class Pagination:
    offset: int
    limit: int
    total: int
    lora_id: str | None

    @property
    def page(self) -> int:
        return self.offset // self.limit + 1

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / self.limit))

    def _link(self, offset: int) -> str:
        query: dict[str, str | int] = {"offset": max(0, offset)}
        if self.limit != PAGE_SIZE:
            query["limit"] = self.limit
        if self.lora_id:
            query["lora_id"] = self.lora_id
        return f"/dashboard?{urlencode(query)}"

    @property
    def previous(self) -> str | None:
        return self._link(self.offset - self.limit) if self.offset > 0 else None

    @property
    def next(self) -> str | None:
        return (
            self._link(self.offset + self.limit) if self.offset + self.limit < self.total else None
        )


# ---------------------------------------------------------------------------------------------
# Eval runs: the directory `claas eval` writes
# ---------------------------------------------------------------------------------------------


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class EvalSummary(_Lenient):
    """`summary.json` of one run; unknown fields are kept and ignored."""

    run_id: str
    status: str
    started_at: str
    updated_at: str
    divergence_mode: str = ""
    url: str = ""
    lora_ids: list[str]
    table: list[dict[str, Any]] = Field(default_factory=list)
    plots: list[str] = Field(default_factory=list)


class EvalRollout(_Lenient):
    prompt: str = ""
    response: str = ""
    feedback: str = ""


class EvalProbe(_Lenient):
    prompt: str = ""
    response: str = ""
    score: Any = None


class EvalStep(_Lenient):
    """One line of `steps.jsonl`: one preference at one step (0 is the baseline)."""

    preference: str
    step: int
    metrics: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] | None = None
    rollouts: list[EvalRollout] = Field(default_factory=list)
    probes: list[EvalProbe] = Field(default_factory=list)


@dataclass(frozen=True)
class EvalRunView:
    name: str  # the directory's name: the run's address in URLs
    summary: EvalSummary


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


def read_summary(run_dir: Path) -> EvalSummary:
    """The run's summary, or MalformedRun saying what is wrong with it."""
    path = run_dir / "summary.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MalformedRun("no summary.json yet") from None
    except (OSError, UnicodeDecodeError) as error:
        raise MalformedRun(f"summary.json is unreadable ({error})") from None
    try:
        return EvalSummary.model_validate_json(text)
    except ValidationError as error:
        raise MalformedRun(f"summary.json is malformed ({_problem(error)})") from None


def read_steps(run_dir: Path) -> tuple[list[EvalStep], list[str]]:
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
            steps.append(EvalStep.model_validate_json(line))
        except ValidationError as error:
            notes.append(f"steps.jsonl line {number} skipped: {_problem(error)}")
    return steps, notes


def _run_visible(viewer: Viewer, summary: EvalSummary) -> bool:
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


def list_eval_runs(evals_dir: Path, viewer: Viewer) -> tuple[list[EvalRunView], list[SkippedRun]]:
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


def find_eval_run(evals_dir: Path, name: str, viewer: Viewer) -> EvalRunView | None:
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


def columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """The union of the rows' keys, in the order they first appear."""
    return list(dict.fromkeys(key for row in rows for key in row))


# ---------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------


def dashboard_router(runtime: Runtime) -> APIRouter:
    """The /dashboard pages; none of them is in the OpenAPI schema."""
    router = APIRouter(prefix="/dashboard", include_in_schema=False)
    settings = runtime.settings
    pages = Pages()
    evals_dir = settings.data_dir / "evals"

    def login_page(
        request: Request, error: str | None = None, status_code: int = 200
    ) -> HTMLResponse:
        return pages.render(
            "login.html",
            None,
            status_code,
            title="Sign in",
            error=error,
            next=_safe_next(request.query_params.get("next")),
        )

    def gate(request: Request) -> Viewer | Response:
        """Who is asking, or the response that asks them to sign in.

        A Bearer header is checked first (scripts, tests); a browser's cookie next. No key at
        all, or a cookie whose key is no longer known, leads to the login page.
        """
        if not keys_configured(settings):
            return Viewer(owner=None, label="local (no API keys)", signed_in=False)
        bearer = _bearer(request)
        if bearer is not None:
            viewer = viewer_for_key(settings, bearer)
            if viewer is None:
                return login_page(request, "Unknown API key in the Authorization header.", 401)
            return viewer
        cookie = request.cookies.get(COOKIE)
        viewer = viewer_for_key(settings, cookie) if cookie else None
        if viewer is not None:
            return viewer
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        login = f"/dashboard/login?{urlencode({'next': target})}"
        response = RedirectResponse(login, 303, headers=SECURITY_HEADERS)
        if cookie:
            response.delete_cookie(COOKIE, path="/dashboard")
        return response

    @router.get("/login")
    async def login_form(request: Request) -> Response:
        if not keys_configured(settings):
            return RedirectResponse("/dashboard", 303)
        return login_page(request)

    @router.post("/login")
    async def login(request: Request) -> Response:
        # A urlencoded form, parsed here: one field does not need python-multipart.
        form = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=8)
        target = _safe_next(form.get("next", [""])[0])
        if not keys_configured(settings):
            return RedirectResponse(target, 303)
        key = (form.get("key") or [""])[0].strip()
        if not key or viewer_for_key(settings, key) is None:
            message = "Enter your API key." if not key else "That API key is not known here."
            return pages.render(
                "login.html",
                None,
                401,
                title="Sign in",
                error=f"{message} Check it, or ask the operator of this server for one.",
                next=target,
            )
        response = RedirectResponse(target, 303, headers=SECURITY_HEADERS)
        response.set_cookie(
            COOKIE,
            key,
            path="/dashboard",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    @router.api_route("/logout", methods=["GET", "POST"])
    async def logout() -> Response:
        target = "/dashboard/login" if keys_configured(settings) else "/dashboard"
        response = RedirectResponse(target, 303, headers=SECURITY_HEADERS)
        response.delete_cookie(COOKIE, path="/dashboard")
        return response

    @router.get("")
    async def feedback_log(
        request: Request,
        page: int | None = Query(None, ge=1, le=MAX_OFFSET),
        offset: int | None = Query(None, ge=0, le=MAX_OFFSET),
        limit: int = Query(PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE),
        lora_id: str | None = Query(None, max_length=200),
    ) -> Response:
        viewer = gate(request)
        if isinstance(viewer, Response):
            return viewer
        lora_id = lora_id.strip() if lora_id else None
        note = None
        if lora_id:
            try:
                validate_lora_id(lora_id)
            except InvalidLoraId as error:
                note = str(error)
        start = offset if offset is not None else ((page or 1) - 1) * limit
        if note is None:
            total, pending, rows = await asyncio.to_thread(
                _feedback_page, runtime, viewer.owner, lora_id, limit, start
            )
        else:
            total, pending, rows = 0, 0, []
        return pages.render(
            "feedback.html",
            viewer,
            refresh=pending > 0,
            section="feedback",
            title="Feedback",
            rows=rows,
            pagination=Pagination(start, limit, total, lora_id),
            lora_id=lora_id or "",
            pending=pending,
            note=note,
        )

    @router.get("/evals")
    async def eval_runs(request: Request) -> Response:
        viewer = gate(request)
        if isinstance(viewer, Response):
            return viewer
        runs, skipped = list_eval_runs(evals_dir, viewer)
        return pages.render(
            "evals.html",
            viewer,
            refresh=any(run.summary.status == "running" for run in runs),
            section="evals",
            title="Eval runs",
            runs=runs,
            skipped=skipped,
            evals_dir=str(evals_dir) if viewer.owner is None else None,
        )

    @router.get("/evals/{name}")
    async def eval_run(request: Request, name: str) -> Response:
        viewer = gate(request)
        if isinstance(viewer, Response):
            return viewer
        run = find_eval_run(evals_dir, name, viewer)
        if run is None:
            return pages.not_found(viewer, f"eval run {name!r}")
        steps, notes = read_steps(evals_dir / name)
        plots = []
        for plot in run.summary.plots:
            if plot_path(evals_dir / name, plot) is not None:
                plots.append(plot)
            elif PLOT_NAME.fullmatch(plot):
                notes.append(f"plot {plot!r} is not written yet")
            else:
                notes.append(f"plot {plot!r} not shown: not a plain .png file name")
        return pages.render(
            "eval_run.html",
            viewer,
            refresh=run.summary.status == "running",
            section="evals",
            title=f"Eval {run.summary.run_id}",
            run=run,
            table_columns=columns(run.summary.table),
            steps=steps,
            metric_columns=columns(step.metrics for step in steps),
            plots=plots,
            notes=notes,
        )

    @router.get("/evals/{name}/plots/{plot}")
    async def eval_plot(request: Request, name: str, plot: str) -> Response:
        viewer = gate(request)
        if isinstance(viewer, Response):
            return viewer
        run = find_eval_run(evals_dir, name, viewer)
        path = None
        if run is not None and plot in run.summary.plots:  # only what the summary lists
            path = plot_path(evals_dir / name, plot)
        if path is None:
            return pages.not_found(viewer, f"plot {plot!r}")
        return FileResponse(path, media_type="image/png", headers=SECURITY_HEADERS)

    return router
