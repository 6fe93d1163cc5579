"""The /dashboard routes: who is looking, signing in and out, and one route per page.

Auth uses the API's keys (`claas.api.auth`): an owner's key sees that owner's adapters and eval
runs, the admin key sees all, and with no keys configured (loopback dev mode) everything is
visible. A browser cannot easily send `Authorization: Bearer`, so the key may also come from an
HttpOnly, SameSite=Strict cookie set by the login form at `/dashboard/login`.

A page route declares `CurrentViewer`: a request without a known key raises `LoginRequired`,
which `add_login_redirect` answers with a 303 to the login page. The pages themselves are built
by `claas.api.dashboard.pages`; none of the routes is in the OpenAPI schema.

    app.include_router(routes.router)
    routes.add_login_redirect(app)
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from claas.api.auth import (
    DASHBOARD_COOKIE,
    Principal,
    bearer_key,
    keys_configured,
    principal_for_key,
)
from claas.api.dashboard.eval_runs import eval_plot_path
from claas.api.dashboard.feedback_log import MAX_PAGE_SIZE, PAGE_SIZE
from claas.api.dashboard.pages import (
    SECURITY_HEADERS,
    Pages,
    eval_run_page,
    eval_runs_page,
    feedback_page,
    login_page,
    not_found,
)
from claas.api.deps import RuntimeDep
from claas.api.schemas import MAX_OFFSET

router = APIRouter(prefix="/dashboard", include_in_schema=False)


class LoginRequired(Exception):
    """A dashboard page was asked for without a known key: answered by the login page.

    `problem`: what is wrong with a key the request did send in its `Authorization` header
    (answered 401 with the login form saying so). `stale_cookie`: the request's cookie holds a
    key no longer known (deleted with the redirect).
    """

    def __init__(self, problem: str | None = None, stale_cookie: bool = False) -> None:
        super().__init__(problem or "sign in to see the dashboard")
        self.problem = problem
        self.stale_cookie = stale_cookie


def current_viewer(request: Request, runtime: RuntimeDep) -> Principal:
    """Who is looking. A Bearer header is checked first (scripts, tests); a browser's cookie
    next. No key at all, or a cookie whose key is no longer known, raises LoginRequired."""
    settings = runtime.settings
    if not keys_configured(settings):
        return Principal(owner=None)
    bearer = bearer_key(request.headers.get("authorization", ""))
    if bearer is not None:
        principal = principal_for_key(settings, bearer)
        if principal is None:
            raise LoginRequired("Unknown API key in the Authorization header.")
        return principal
    cookie = request.cookies.get(DASHBOARD_COOKIE)
    principal = principal_for_key(settings, cookie) if cookie else None
    if principal is None:
        raise LoginRequired(stale_cookie=bool(cookie))
    return principal


def pagesfor(runtime: RuntimeDep) -> Pages:
    return Pages(signed_in=keys_configured(runtime.settings))


def evals_dir(runtime: RuntimeDep) -> Path:
    """Where `claas eval` writes its runs."""
    return runtime.settings.data_dir / "evals"


CurrentViewer = Annotated[Principal, Depends(current_viewer)]
PagesDep = Annotated[Pages, Depends(pagesfor)]
EvalsDir = Annotated[Path, Depends(evals_dir)]


def _safe_next(target: str | None) -> str:
    """Where to go after logging in: a dashboard path on this server, never another site."""
    if target and target.startswith("/dashboard") and "//" not in target and "\\" not in target:
        return target
    return "/dashboard"


async def _to_login(request: Request, error: LoginRequired) -> Response:
    if error.problem is not None:
        target = _safe_next(request.query_params.get("next"))
        return Pages(signed_in=True).render(login_page(target, error.problem, 401), None)
    asked = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    login = f"/dashboard/login?{urlencode({'next': asked})}"
    response = RedirectResponse(login, 303, headers=SECURITY_HEADERS)
    if error.stale_cookie:
        response.delete_cookie(DASHBOARD_COOKIE, path="/dashboard")
    return response


def add_login_redirect(app: FastAPI) -> None:
    """Answer LoginRequired, from any dashboard route, with the login page."""
    app.exception_handler(LoginRequired)(_to_login)


# ---------------------------------------------------------------------------------------------
# Signing in and out
# ---------------------------------------------------------------------------------------------


@router.get("/login")
async def login_form(request: Request, runtime: RuntimeDep, pages: PagesDep) -> Response:
    if not keys_configured(runtime.settings):
        return RedirectResponse("/dashboard", 303)
    target = _safe_next(request.query_params.get("next"))
    return pages.render(login_page(target), None)


@router.post("/login")
async def login(request: Request, runtime: RuntimeDep, pages: PagesDep) -> Response:
    # A urlencoded form, parsed here: one field does not need python-multipart.
    form = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=8)
    target = _safe_next(form.get("next", [""])[0])
    settings = runtime.settings
    if not keys_configured(settings):
        return RedirectResponse(target, 303)
    key = (form.get("key") or [""])[0].strip()
    if not key or principal_for_key(settings, key) is None:
        message = "Enter your API key." if not key else "That API key is not known here."
        error = f"{message} Check it, or ask the operator of this server for one."
        return pages.render(login_page(target, error, 401), None)
    response = RedirectResponse(target, 303, headers=SECURITY_HEADERS)
    response.set_cookie(
        DASHBOARD_COOKIE,
        key,
        path="/dashboard",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.api_route("/logout", methods=["GET", "POST"])
async def logout(runtime: RuntimeDep) -> Response:
    target = "/dashboard/login" if keys_configured(runtime.settings) else "/dashboard"
    response = RedirectResponse(target, 303, headers=SECURITY_HEADERS)
    response.delete_cookie(DASHBOARD_COOKIE, path="/dashboard")
    return response


# ---------------------------------------------------------------------------------------------
# Pages
# ---------------------------------------------------------------------------------------------


@router.get("")
async def feedback_log(
    runtime: RuntimeDep,
    viewer: CurrentViewer,
    pages: PagesDep,
    page: int | None = Query(None, ge=1, le=MAX_OFFSET),
    offset: int | None = Query(None, ge=0, le=MAX_OFFSET),
    limit: int = Query(PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE),
    lora_id: str | None = Query(None, max_length=200),
) -> HTMLResponse:
    shown = await asyncio.to_thread(feedback_page, runtime, viewer, lora_id, limit, page, offset)
    return pages.render(shown, viewer)


@router.get("/evals")
async def eval_runs(viewer: CurrentViewer, pages: PagesDep, runs: EvalsDir) -> HTMLResponse:
    return pages.render(eval_runs_page(runs, viewer), viewer)


@router.get("/evals/{name}")
async def eval_run(
    name: str, viewer: CurrentViewer, pages: PagesDep, runs: EvalsDir
) -> HTMLResponse:
    return pages.render(eval_run_page(runs, name, viewer), viewer)


@router.get("/evals/{name}/plots/{plot}")
async def eval_plot(
    name: str, plot: str, viewer: CurrentViewer, pages: PagesDep, runs: EvalsDir
) -> Response:
    path = eval_plot_path(runs, name, plot, viewer)
    if path is None:
        return pages.render(not_found(f"plot {plot!r}"), viewer)
    return FileResponse(path, media_type="image/png", headers=SECURITY_HEADERS)
