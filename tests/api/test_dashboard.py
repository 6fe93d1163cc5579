"""The /dashboard pages, in Debian's headless Chromium and over plain HTTP.

One real server on 127.0.0.1 with API keys for two owners and an admin, real feedback requests
trained on the tiny model, and eval run directories that this file writes in the format that
`claas eval` documents (a hand-made stand-in for its output). The browser is driven by the
`playwright` package with `/usr/bin/chromium` (`make test` installs it); screenshots of each
page are kept under `<repo>/.artifacts/`.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from matplotlib.figure import Figure
from playwright.sync_api import Browser, Page, expect, sync_playwright
from serving import LiveServer, bearer, chat, create, make_server, train_once

from claas.api.auth import DASHBOARD_COOKIE as COOKIE
from claas.runs import Probe, Rollout, RunSummary, StepLine
from claas.sdpo.prompts import INSTRUCTION_PREFIX

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / ".artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KEYS = {"sk-alice-dashboard": "alice", "sk-bob-dashboard": "bob"}
ALICE = bearer("sk-alice-dashboard")
BOB = bearer("sk-bob-dashboard")
ADMIN = bearer("sk-admin-dashboard")
XSS = "<script>window.xssRan = 1</script>"
DONE_RUN, RUNNING_RUN, BOB_RUN = "20261125-1000-alice", "20261125-1100-alice", "20261125-0900-bob"


class Site:
    """The keyed server and what the fixture put on it."""

    def __init__(self, live: LiveServer) -> None:
        self.live = live
        self.url = live.url
        self.alice: list[dict[str, Any]] = []  # newest last: {"id", "prompt", "response", ...}
        self.bob: list[dict[str, Any]] = []

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.live.client.get(path, follow_redirects=False, **kwargs)


def _feedback(
    live: LiveServer, headers: dict[str, str], lora_id: str, prompt: str, feedback: str
) -> dict[str, Any]:
    """Chat once and train on one piece of feedback (one quick step), waited for."""
    answer = chat(live, lora_id, messages=[{"role": "user", "content": prompt}], h=headers)
    assert answer.status_code == 200, answer.text
    completion = answer.json()
    done = train_once(live, completion["id"], feedback, headers)
    assert done["status"] == "done", done
    return {
        "id": done["feedback_id"],
        "prompt": prompt,
        "response": completion["choices"][0]["message"]["content"],
        "feedback": feedback,
    }


def _plot(path: Path) -> None:
    figure = Figure(figsize=(6, 3), dpi=80)
    axes = figure.subplots()
    axes.plot([0, 1, 2, 3], [0.9, 0.6, 0.45, 0.4], marker="o", label="concise")
    axes.set_xlabel("step")
    axes.set_ylabel("mean response length (rel.)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")


def _eval_run(
    evals: Path,
    name: str,
    status: str,
    lora_ids: list[str],
    steps: list[StepLine],
    tail: str = "",
) -> Path:
    """A run directory in the format `claas eval` writes (a hand-made stand-in for its output)."""
    run = evals / name
    run.mkdir(parents=True)
    _plot(run / "length.png")
    (run / "unlisted.png").write_bytes((run / "length.png").read_bytes())
    summary = RunSummary(
        run_id=name,
        status=status,
        started_at=f"2026-11-25T{name[9:11]}:00:00+00:00",
        updated_at=f"2026-11-25T{name[9:11]}:05:00+00:00",
        divergence_mode="topk_gjs",
        url="http://127.0.0.1:8000",
        lora_ids=lora_ids,
        table=[
            {"preference": "concise", "step": 0, "mean_len": 52.0, "score": 0.12},
            {"preference": "concise", "step": 3, "mean_len": 18.5, "score": 0.81, "note": "ok"},
        ],
        plots=["length.png", "../../claas.db", "unlisted-missing.png"],
        continual=False,
        steps_recorded=len(steps),
        alerts=[],
        capability_min_ratio=None,
        capability_target=0.9,
        capability_target_met=None,
    )
    (run / "summary.json").write_text(summary.model_dump_json())
    lines = [step.dump() for step in steps]
    (run / "steps.jsonl").write_text("\n".join(lines) + "\n" + tail)
    return run


def _step(step: int, marker: str) -> StepLine:
    return StepLine(
        preference="concise",
        step=step,
        lora_id="alice/bot",
        adapter_version=step + 1,
        timestamp="2026-11-25T10:01:00+00:00",
        elapsed_seconds=60.0 * step,
        metrics={"mean_len": 52.0 - 10 * step, "score": 0.1 + 0.2 * step},
        training=None if step == 0 else {"feedback_id": f"fb-{step}", "loss": 0.5 / step},
        rollouts=[
            Rollout(
                prompt=f"Why is the sky blue? ({marker} step {step})",
                response=f"Rayleigh scattering {XSS}",
                feedback="Shorter, please.",
            )
        ],
        probes=[Probe(prompt=f"Name a colour ({marker})", response="Blue.", score=0.9)],
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Site]:
    # A fresh tiny model, not the session's: the server's adapters change the model it serves.
    live = make_server(
        tmp_path_factory.mktemp("dashboard"),
        model_cache,
        api_keys=KEYS,
        admin_key="sk-admin-dashboard",
        max_tokens_cap=256,
    )
    try:
        site = Site(live)
        create(live, "alice/bot", ALICE)
        create(live, "bob/bot", BOB)
        site.alice.append(
            _feedback(live, ALICE, "alice/bot", f"Explain rainbows {XSS}", "No <b>markup</b>.")
        )
        for n in range(1, 4):
            site.alice.append(
                _feedback(live, ALICE, "alice/bot", f"Hello number {n}", f"ALICE-FEEDBACK-{n}")
            )
        site.bob.append(_feedback(live, BOB, "bob/bot", "Hi from bob", "BOB-SECRET-FEEDBACK"))

        evals = live.runtime.settings.data_dir / "evals"
        _eval_run(evals, DONE_RUN, "done", ["alice/bot"], [_step(0, "DONE"), _step(1, "DONE")])
        _eval_run(
            evals,
            RUNNING_RUN,
            "running",
            ["alice/bot"],
            [_step(0, "RUNNING")],
            tail='{"preference": "conc',  # a line still being written
        )
        _eval_run(evals, BOB_RUN, "done", ["bob/bot"], [_step(0, "BOB-SECRET-EVAL")])
        (evals / "broken").mkdir()
        (evals / "broken" / "summary.json").write_text("{not json")
        (evals / "wrong-shape").mkdir()
        (evals / "wrong-shape" / "summary.json").write_text('["a list"]')
        (evals / "just-started").mkdir()
        yield site
    finally:
        live.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM.exists(), "Debian's chromium is missing: `make test` installs it"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield launched
        launched.close()


def _screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=True)


def _text(value: str) -> str:
    """Text as a browser's DOM holds it: HTML parsing turns CR and CRLF into LF."""
    return value.replace("\r\n", "\n").replace("\r", "\n")


def _raw_get(url: str, path: str, headers: dict[str, str]) -> bytes:
    """A GET with the path exactly as given; the response's first bytes."""
    host, port = url.removeprefix("http://").split(":")
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return connection.recv(64)


def _login(page: Page, site: Site, key: str) -> None:
    page.goto(f"{site.url}/dashboard")
    expect(page).to_have_url(re.compile(r"/dashboard/login\?next="))
    page.fill("#key", key)
    page.click("button[type=submit]")


# ---------------------------------------------------------------------------------------------
# In the browser
# ---------------------------------------------------------------------------------------------


def test_feedback_log_in_the_browser(site: Site, browser: Browser) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    _login(page, site, "not-a-key")
    expect(page.get_by_role("alert")).to_contain_text("not known")
    _screenshot(page, "login")

    page.fill("#key", "sk-alice-dashboard")
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{site.url}/dashboard")
    cookie = next(c for c in context.cookies() if c["name"] == COOKIE)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    expect(page.locator("header")).to_contain_text("alice")
    rows = page.locator("details.request")
    expect(rows).to_have_count(len(site.alice))
    expect(page.locator("main")).not_to_contain_text("bob/bot")
    assert "BOB-SECRET" not in page.content()
    assert page.locator('meta[http-equiv="refresh"]').count() == 0  # nothing is pending

    # Newest first; expanding a row shows its prompt, response, feedback and teacher prompt.
    newest = site.alice[-1]
    row = page.locator(f'details[id="{newest["id"]}"]')
    expect(rows.first).to_have_attribute("id", newest["id"])
    expect(row.locator(":scope > summary")).to_contain_text("done")
    version = f"v{1 + len(site.alice)}"  # v1 at creation, then one per request
    expect(row.locator(":scope > summary")).to_contain_text(version)
    for part in ("pre.prompt", "pre.response", "pre.feedback", "pre.teacher"):
        expect(row.locator(part)).to_be_hidden()
    row.locator(":scope > summary").click()
    for part in ("pre.prompt", "pre.response", "pre.feedback", "pre.teacher"):
        expect(row.locator(part)).to_be_visible()
    assert row.locator("pre.prompt").text_content() == newest["prompt"]
    assert row.locator("pre.response").text_content() == _text(newest["response"])
    assert row.locator("pre.feedback").text_content() == newest["feedback"]
    teacher = row.locator("pre.teacher").text_content() or ""
    assert f"{INSTRUCTION_PREFIX}{newest['feedback']})" in teacher
    assert newest["prompt"] in teacher.split(INSTRUCTION_PREFIX)[0]
    _screenshot(page, "feedback")

    # User text is shown as text, never run.
    xss = page.locator(f'details[id="{site.alice[0]["id"]}"]')
    xss.locator(":scope > summary").click()
    expect(xss.locator("pre.prompt")).to_have_text(f"Explain rainbows {XSS}")
    assert page.evaluate("() => window.xssRan") is None

    # Pagination: two per page, newest first, every request exactly once.
    page.goto(f"{site.url}/dashboard?limit=2")
    seen: list[str] = []
    while True:
        ids = page.locator("details.request").evaluate_all("rows => rows.map(r => r.id)")
        assert 1 <= len(ids) <= 2
        seen += ids
        older = page.locator("a[rel=next]")
        if older.count() == 0:
            break
        href = older.get_attribute("href")
        assert href is not None
        older.click()
        # The click only starts the navigation: read the rows once the older page is loaded.
        page.wait_for_url(f"{site.url}{href}")
    assert seen == [r["id"] for r in reversed(site.alice)]
    expect(page.locator(".pager")).to_contain_text("page 2 of 2")

    page.goto(f"{site.url}/dashboard?lora_id=bob/bot")  # another owner's adapter: nothing
    expect(page.locator("details.request")).to_have_count(0)

    page.locator("header button", has_text="Sign out").click()
    expect(page).to_have_url(re.compile(r"/dashboard/login"))
    page.goto(f"{site.url}/dashboard")
    expect(page).to_have_url(re.compile(r"/dashboard/login\?next="))
    context.close()


def test_eval_pages_in_the_browser(site: Site, browser: Browser) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    _login(page, site, "sk-alice-dashboard")
    page.goto(f"{site.url}/dashboard/evals")
    # This page refreshes itself (a run is in progress): only assertions that retry.
    links = page.locator("table.runs a")
    # Newest first, the one in progress included; bob's run and unreadable dirs are not shown.
    expect(links).to_have_text([RUNNING_RUN, DONE_RUN])
    expect(page.locator("main")).to_contain_text("running")
    expect(page.locator("main")).not_to_contain_text("BOB-SECRET")
    expect(page.locator("main")).not_to_contain_text("broken")
    _screenshot(page, "evals")

    page.click(f"text={DONE_RUN}")
    expect(page).to_have_url(f"{site.url}/dashboard/evals/{DONE_RUN}")
    image = page.locator(".plots img")
    expect(image).to_have_count(1)
    expect(image).to_be_visible()
    assert image.evaluate("img => img.complete && img.naturalWidth") > 0
    summary = page.locator("table.summary")
    for column in ("preference", "step", "mean_len", "score", "note"):
        expect(summary.locator("th", has_text=column)).to_have_count(1)
    expect(page.locator("main")).to_contain_text("not a plain .png file name")
    expect(page.locator("main")).to_contain_text("'unlisted-missing.png' is not written yet")

    steps = page.locator("table.steps tr.step")
    expect(steps).to_have_count(2)
    expect(steps.first).to_contain_text("baseline")
    detail = page.locator("table.steps details.more").nth(1)
    expect(detail.get_by_text("DONE step 1")).to_be_hidden()
    detail.locator(":scope > summary").click()
    expect(detail.get_by_text("Why is the sky blue? (DONE step 1)")).to_be_visible()
    expect(detail.get_by_text(f"Rayleigh scattering {XSS}")).to_be_visible()
    expect(detail.get_by_text("Name a colour (DONE)")).to_be_visible()
    expect(detail).to_contain_text("0.9")
    assert page.evaluate("() => window.xssRan") is None
    _screenshot(page, "eval-run")
    context.close()

    # The admin sees every run, and a note for each directory that could not be read.
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    _login(page, site, "sk-admin-dashboard")
    page.goto(f"{site.url}/dashboard/evals")
    expect(page.locator("table.runs a")).to_have_count(3)
    for name in ("broken", "wrong-shape", "just-started"):
        expect(page.locator(".note", has_text=name)).to_have_count(1)
    page.goto(f"{site.url}/dashboard")
    expect(page.locator("details.request")).to_have_count(len(site.alice) + len(site.bob))
    _screenshot(page, "admin-feedback")
    context.close()


# ---------------------------------------------------------------------------------------------
# Over plain HTTP
# ---------------------------------------------------------------------------------------------


def test_unauthenticated_and_wrong_keys(site: Site) -> None:
    for path in ("/dashboard", "/dashboard/evals", f"/dashboard/evals/{DONE_RUN}"):
        response = site.get(path)
        assert response.status_code == 303
        assert response.headers["location"].startswith("/dashboard/login?next=%2Fdashboard")
    plot = site.get(f"/dashboard/evals/{DONE_RUN}/plots/length.png")
    assert plot.status_code == 303 and not plot.content.startswith(b"\x89PNG")

    wrong = site.get("/dashboard", headers=bearer("sk-nope"))
    assert wrong.status_code == 401 and "Unknown API key" in wrong.text
    assert 'name="key"' in wrong.text  # the login form again, not an error body

    browser = httpx.Client(base_url=site.url)  # its own cookie jar
    login = browser.post("/dashboard/login", data={"key": "sk-nope", "next": "/"})
    assert login.status_code == 401 and "not known" in login.text
    empty = browser.post("/dashboard/login", data={"key": ""})
    assert empty.status_code == 401 and "Enter your API key" in empty.text

    good = browser.post(
        "/dashboard/login", data={"key": "sk-bob-dashboard", "next": "https://elsewhere.test/"}
    )
    assert good.status_code == 303 and good.headers["location"] == "/dashboard"
    set_cookie = good.headers["set-cookie"]
    for attribute in ("HttpOnly", "SameSite=strict", "Path=/dashboard"):
        assert attribute.lower() in set_cookie.lower()
    assert "BOB-SECRET" in browser.get("/dashboard").text  # the cookie signs bob in
    stale = site.get("/dashboard", headers={"cookie": f"{COOKIE}=sk-rotated"})
    assert stale.status_code == 303 and f'{COOKIE}=""' in stale.headers["set-cookie"]
    for target in ("//elsewhere.test/x", "/dashboard\\..\\x", "/v1/adapters"):
        redirect = browser.post(
            "/dashboard/login", data={"key": "sk-bob-dashboard", "next": target}
        )
        assert redirect.headers["location"] == "/dashboard"
    assert browser.post("/dashboard/logout").headers["location"] == "/dashboard/login"
    assert browser.get("/dashboard").status_code == 303  # signed out: the cookie is gone
    browser.close()

    assert site.live.client.get("/v1/health").status_code == 200  # the API is unaffected
    paths = site.live.client.get("/openapi.json").json()["paths"]
    assert not [path for path in paths if path.startswith("/dashboard")]


def test_owners_see_only_their_own(site: Site) -> None:
    alice = site.get("/dashboard", headers=ALICE).text
    bob = site.get("/dashboard", headers=BOB).text
    admin = site.get("/dashboard", headers=ADMIN).text
    assert "ALICE-FEEDBACK-1" in alice and "BOB-SECRET" not in alice
    assert "BOB-SECRET" in bob and "ALICE-FEEDBACK" not in bob
    assert "BOB-SECRET" in admin and "ALICE-FEEDBACK-1" in admin
    for page in (1, 2):
        paged = site.get(f"/dashboard?page={page}&limit=3", headers=ALICE).text
        assert paged.count('class="request"') == (3 if page == 1 else 1)
    assert site.get("/dashboard?offset=3&limit=3", headers=ALICE).text.count('class="request"') == 1
    invalid = site.get("/dashboard?lora_id=../etc", headers=ALICE)
    assert invalid.status_code == 200 and "owner/name" in invalid.text

    assert site.get(f"/dashboard/evals/{BOB_RUN}", headers=ALICE).status_code == 404
    assert (
        site.get(f"/dashboard/evals/{BOB_RUN}/plots/length.png", headers=ALICE).status_code == 404
    )
    assert site.get(f"/dashboard/evals/{BOB_RUN}", headers=ADMIN).status_code == 200
    assert BOB_RUN not in site.get("/dashboard/evals", headers=ALICE).text
    assert "broken" not in site.get("/dashboard/evals", headers=ALICE).text


def test_user_text_is_escaped(site: Site) -> None:
    for path in ("/dashboard", f"/dashboard/evals/{DONE_RUN}"):
        response = site.get(path, headers=ALICE)
        assert response.status_code == 200
        assert XSS not in response.text
        assert "&lt;script&gt;window.xssRan = 1&lt;/script&gt;" in response.text
        assert "script-src" not in response.headers["content-security-policy"]  # none may run
    assert "<b>markup</b>" not in site.get("/dashboard", headers=ALICE).text


def test_plots_refuse_anything_but_listed_png_files(site: Site) -> None:
    ok = site.get(f"/dashboard/evals/{DONE_RUN}/plots/length.png", headers=ALICE)
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
    assert ok.content.startswith(b"\x89PNG")
    database = site.live.runtime.settings.data_dir / "claas.db"
    assert database.exists()
    for plot in (
        "unlisted.png",  # on disk, but not in the summary's list
        "unlisted-missing.png",  # listed, not on disk
        "..%2F..%2Fclaas.db",
        "%2E%2E%2F%2E%2E%2Fclaas.db",
        "length.PNG",
    ):
        response = site.get(f"/dashboard/evals/{DONE_RUN}/plots/{plot}", headers=ADMIN)
        assert response.status_code == 404, plot
        assert not response.content.startswith(b"SQLite") and b"\x89PNG" not in response.content
    for run in ("..%2F..", ".hidden", "%2E%2E"):
        response = site.get(f"/dashboard/evals/{run}/plots/length.png", headers=ADMIN)
        assert response.status_code == 404, run
    # Dot segments as sent on the wire: httpx would normalise them away, a raw request does not.
    for raw in (
        f"/dashboard/evals/{DONE_RUN}/plots/../../../claas.db",
        f"/dashboard/evals/{DONE_RUN}/plots/..",
        "/dashboard/evals/../plots/length.png",
    ):
        assert _raw_get(site.url, raw, ADMIN).startswith(b"HTTP/1.1 404"), raw


def test_half_written_runs_never_break_the_pages(site: Site) -> None:
    listing = site.get("/dashboard/evals", headers=ADMIN)
    assert listing.status_code == 200
    assert "no summary.json yet" in listing.text and "malformed" in listing.text
    assert '<meta http-equiv="refresh"' in listing.text  # a run is in progress
    running = site.get(f"/dashboard/evals/{RUNNING_RUN}", headers=ALICE)
    assert running.status_code == 200
    assert "steps.jsonl line 2 skipped" in running.text and "RUNNING step 0" in running.text
    assert '<meta http-equiv="refresh"' in running.text
    done = site.get(f"/dashboard/evals/{DONE_RUN}", headers=ALICE)
    assert '<meta http-equiv="refresh"' not in done.text
    for name in ("broken", "wrong-shape", "just-started", "nothing-here"):
        assert site.get(f"/dashboard/evals/{name}", headers=ADMIN).status_code == 404


def test_no_keys_shows_everything_and_refreshes_while_pending(server: LiveServer) -> None:
    """Loopback dev mode: no login; a request still running makes the page refresh itself."""
    client = server.client
    assert client.get("/dashboard/login", follow_redirects=False).headers["location"] == (
        "/dashboard"
    )
    page = client.get("/dashboard")
    assert page.status_code == 200 and "No feedback yet" in page.text
    assert '<meta http-equiv="refresh"' not in page.text
    assert client.get("/dashboard/evals").status_code == 200  # no evals dir at all

    # Written to the store directly, and claimed for an hour by a worker that is not there, so
    # it stays running.
    store = server.runtime.store
    store.create_adapter("dev/ghost", "tiny-llama", 4, 4.0, ["q_proj"])
    request = store.enqueue_feedback("dev/ghost", [{"rollout_id": "gone", "feedback": "hi"}], {})
    store.mark_running(request.id, worker="absent", lease_seconds=3600)
    page = client.get("/dashboard")
    assert '<meta http-equiv="refresh"' in page.text and "running" in page.text
    assert "the rollout has expired" in page.text
    store.mark_failed(request.id, "stopped by the test")
    page = client.get("/dashboard")
    assert '<meta http-equiv="refresh"' not in page.text and "stopped by the test" in page.text
