"""The web page in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

One scroll session over a small offline catalog served by uvicorn on a free port: drop an image,
scroll one column through every page lingering on a few images and skipping the rest, then check
what reached the server and what the page shows. Skipped (not failed) where the browser or
Playwright is missing; ``.ci/run`` installs both. Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import io
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from indexer.sample_dump import render_image
from recommender.api import FeedbackResult, StoredFeedback
from service.app import create_app
from service.settings import Settings
from tests.test_api import build_tiny_catalog

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
LINGER_S = 3.0  # above the dwell prior's median (2.5 s): a look that teaches the feed something
SKIP_S = 0.2

if not CHROMIUM.exists():
    pytest.skip(f"no browser at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is missing (pip install playwright)"
)

pytestmark = pytest.mark.timeout(180)


@dataclass(frozen=True)
class LiveServer:
    url: str
    app: Any
    # (session_id, result) of every feedback call the server answered, beacons included
    answers: list[tuple[str, FeedbackResult]] = field(default_factory=list)

    def feedback(self, session_id: str) -> list[tuple[str, float]]:
        """(image_id, dwell_ms) of the session's stored events, as the catalog holds them."""
        rows = self.app.state.engine.catalog.feedback_rows()
        return [(image, dwell) for session, _, image, dwell in rows if session == session_id]

    def record_answers(self) -> None:
        engine = self.app.state.engine
        steer_with = engine.steer_with  # feedback's last step, whichever way the route took

        def recorded(stored: StoredFeedback) -> FeedbackResult:
            result: FeedbackResult = steer_with(stored)
            self.answers.append((stored.session_id, result))
            return result

        engine.steer_with = recorded


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    import uvicorn

    tiny = build_tiny_catalog(tmp_path_factory.mktemp("web") / "data", count=60, seed=11)
    app = create_app(Settings(catalog=tiny.catalog))  # default limits: the page must live with them
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, held from here on: no race with other tests
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        _wait_ready(url, timeout_s=60)
        server_ = LiveServer(url, app)
        server_.record_answers()
        yield server_
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _wait_ready(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} was not ready within {timeout_s} s")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=BROWSER_ARGS
        )
        yield chromium
        chromium.close()


def query_image(path: Path) -> Path:
    """A picture of the user's own: drawn like the catalog's, but not in it."""
    attrs: dict[str, str | int] = {
        "shape": "star",
        "color": "blue",
        "texture": "plain",
        "background": "sunset",
        "style": "flat",
        "count": 2,
    }
    buffer = io.BytesIO()
    render_image(attrs, np.random.default_rng(3), size=(256, 288)).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue())
    return path


# Layout shift as Chromium measures it (Layout Instability API), input-driven shifts included.
LAYOUT_SHIFT_SCRIPT = """
window.layoutShift = 0;
new PerformanceObserver(list => {
  for (const entry of list.getEntries()) window.layoutShift += entry.value;
}).observe({type: "layout-shift", buffered: true});
"""


def _wait_for(condition: Any, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def watch_console(page: Any) -> list[str]:
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    return errors


def term_names(page: Any) -> list[str]:
    names: list[str] = page.eval_on_selector_all(
        "#terms .term-name", "els => els.map(e => e.textContent)"
    )
    return names


def tile_ids(page: Any) -> list[tuple[str, int]]:
    tiles: list[list[Any]] = page.eval_on_selector_all(
        ".tile", "els => els.map(e => [e.dataset.id, Number(e.dataset.page)])"
    )
    return [(str(i), int(p)) for i, p in tiles]


def dropped(live: LiveServer, browser: Any, tmp_path: Path) -> tuple[Any, Any, list[str]]:
    """A desktop browser page that dropped the user's image and shows its first page: the
    context, the page, and the console errors it logs."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    errors = watch_console(page)
    page.goto(live.url)
    page.set_input_files("#file-input", str(query_image(tmp_path / "mine.png")))
    page.wait_for_selector(".tile.loaded")
    return context, page, errors


def test_drop_scroll_linger_steers_the_feed(live: LiveServer, browser: Any, tmp_path: Path) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    # One column (a saved preference) from the first page on: one image in view at a time.
    context.add_init_script(
        "if (location.protocol === 'http:') localStorage.setItem('lookalike.layout', 'column')"
    )
    page = context.new_page()
    errors = watch_console(page)
    sent: list[str] = []  # every event id the page posted with fetch

    def on_request(request: Any) -> None:
        if request.url.endswith("/v1/feedback") and request.method == "POST":
            sent.extend(e["event_id"] for e in request.post_data_json["events"])

    page.on("request", on_request)
    page.goto(live.url)
    assert page.get_by_text("Drop an image here").is_visible()  # a newcomer sees what to do

    # Drop: the file input is what drag and drop, the picker and paste all end in.
    page.set_input_files("#file-input", str(query_image(tmp_path / "mine.png")))
    page.wait_for_selector(".tile.loaded")
    assert page.locator("#query-thumb-img").is_visible()  # the query stays in sight
    page.wait_for_function("document.querySelector('#stats').textContent.includes('shown')")
    terms_before = term_names(page)
    session = page.evaluate("window.lookalike.session")

    lingered: list[str] = []
    skipped: list[str] = []
    position = 0
    while True:
        tiles = page.locator(".tile")
        if position >= tiles.count():
            page.wait_for_function(
                f"document.querySelectorAll('.tile').length > {position}"
                " || document.querySelector('#status').dataset.kind === 'end'"
            )
            if position >= tiles.count():
                break
        tile = tiles.nth(position)
        tile.evaluate("el => el.scrollIntoView({block: 'center'})")
        tile.locator("img").evaluate("img => img.decode()")
        image_id = str(tile.get_attribute("data-id"))
        if position % 21 == 3:  # one on each page
            lingered.append(image_id)
            page.wait_for_timeout(LINGER_S * 1000)
        else:
            skipped.append(image_id)
            page.wait_for_timeout(SKIP_S * 1000)
        position += 1

    page.evaluate("scrollTo(0, 0)")  # back to the top: the last look ends here

    # Every page differs from the others, nothing repeats, and the catalog's end is said plainly.
    shown = tile_ids(page)
    ids = [image_id for image_id, _ in shown]
    assert len(ids) == len(set(ids)), "the feed repeated an image"
    pages = {p: {i for i, q in shown if q == p} for _, p in shown}
    assert len(pages) >= 3, f"only {len(pages)} pages were loaded"
    assert all(pages[1].isdisjoint(pages[p]) for p in pages if p != 1)
    assert page.locator("#status[data-kind=end]").is_visible()

    # The learned-terms panel changed after the lingering, and "less of this" removes a term.
    page.wait_for_function(
        "before => JSON.stringify([...document.querySelectorAll('#terms .term-name')]"
        ".map(e => e.textContent)) !== JSON.stringify(before)",
        arg=terms_before,
        timeout=10_000,
    )
    learned = term_names(page)
    assert learned and learned != terms_before
    page.get_by_role("button", name=f"Less of {learned[0]}", exact=True).click()
    page.wait_for_function(
        "t => ![...document.querySelectorAll('#terms .term-name')].some(e => e.textContent === t)",
        arg=learned[0],
    )

    # Keyboard: j moves focus onto a tile, Enter opens it large, Escape closes.
    page.keyboard.press("j")
    assert page.evaluate("document.activeElement.classList.contains('tile')")
    page.keyboard.press("k")
    page.keyboard.press("Enter")
    assert page.locator("#viewer").is_visible()
    page.screenshot(path=str(ARTIFACTS / "web-viewer.png"))
    page.keyboard.press("Escape")
    assert not page.locator("#viewer").is_visible()

    page.click("button[data-layout=grid]")
    assert page.evaluate("document.querySelectorAll('#feed .column').length") > 1
    page.locator(".tile").nth(5).hover()
    page.wait_for_timeout(300)  # the prompt fades in
    page.screenshot(path=str(ARTIFACTS / "web-feed.png"))

    # What the page sent while it lived reached the server once each (ids unique, all stored).
    page.wait_for_function("window.lookalike.pendingEvents === 0")
    sent_count = page.evaluate("window.lookalike.sentEvents")
    _wait_for(lambda: len(live.feedback(session)) >= sent_count)
    assert len(sent) == len(set(sent)) == sent_count > 0
    before_leaving = len(live.feedback(session))
    assert before_leaving == sent_count

    # Leaving the page ends the looks in progress and sends them with sendBeacon.
    page.goto("about:blank")

    def accepted() -> int:
        return sum(result.accepted for sid, result in live.answers if sid == session)

    # Rows are committed before the answer is recorded: wait until both agree.
    _wait_for(lambda: accepted() == len(live.feedback(session)) > before_leaving)
    stored = live.feedback(session)
    duplicates = sum(result.duplicates for sid, result in live.answers if sid == session)
    assert duplicates == 0, "an event was sent twice"

    # Dwell is plausible: each image's first look (made while scrolling) is long where the test
    # lingered and short where it skipped.
    dwell: dict[str, float] = {}
    for image_id, ms in stored:
        dwell.setdefault(image_id, ms)
    linger_ms = [dwell.get(i, 0.0) for i in lingered]
    skip_ms = [dwell[i] for i in skipped if i in dwell]
    assert min(linger_ms) >= 0.8 * LINGER_S * 1000, (lingered, linger_ms)
    assert max(linger_ms) <= 2 * LINGER_S * 1000, (lingered, linger_ms)
    assert len(skip_ms) >= len(skipped) // 2, "most skipped images sent no event"
    assert max(skip_ms) < min(linger_ms), (skip_ms, linger_ms)
    assert errors == [], errors
    context.close()


def test_phone_viewport_is_readable(live: LiveServer, browser: Any, tmp_path: Path) -> None:
    context = browser.new_context(
        viewport={"width": 390, "height": 844},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
    )
    page = context.new_page()
    errors = watch_console(page)
    page.add_init_script(LAYOUT_SHIFT_SCRIPT)
    page.goto(live.url)
    page.set_input_files("#file-input", str(query_image(tmp_path / "mine.png")))
    page.wait_for_selector(".tile.loaded")
    page.wait_for_function(  # every image on screen has loaded (and had its chance to shift)
        "[...document.querySelectorAll('.tile')].filter(t => t.getBoundingClientRect().top"
        " < innerHeight).every(t => t.classList.contains('loaded'))"
    )
    shift = page.evaluate("window.layoutShift")
    assert shift < 0.01, f"the page moved under the reader (layout shift {shift:.3f})"
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page is {width} px wide on a 390 px screen"
    page.screenshot(path=str(ARTIFACTS / "web-phone.png"))
    assert errors == [], errors
    context.close()


def test_dwell_pauses_after_30_s_without_input(
    live: LiveServer, browser: Any, tmp_path: Path
) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    errors = watch_console(page)
    page.clock.install()  # the page's timers and performance.now, moved on by the test
    page.goto(live.url)
    page.set_input_files("#file-input", str(query_image(tmp_path / "mine.png")))
    page.wait_for_selector(".tile.loaded")
    session = page.evaluate("window.lookalike.session")
    page.clock.run_for(90_000)  # a minute and a half in front of the screen, hands off
    page.goto("about:blank")  # the looks in progress end and leave with sendBeacon
    _wait_for(lambda: len(live.feedback(session)) > 0)
    dwell = [ms for _, ms in live.feedback(session)]
    assert max(dwell) <= 30_500, dwell  # counted up to the last input plus 30 s, no further
    assert max(dwell) >= 20_000, dwell
    assert errors == [], errors
    context.close()


def test_a_scroll_goes_on_when_the_server_forgot_its_session(
    live: LiveServer, browser: Any, tmp_path: Path
) -> None:
    """A restart (sessions live in memory) or an expired session: the page runs its search
    again and scrolls on in the new session, showing nothing twice, instead of offering a
    "Try again" that fails forever."""
    context, page, errors = dropped(live, browser, tmp_path)
    first = page.evaluate("window.lookalike.session")
    shown = len(tile_ids(page))
    live.app.state.engine.delete_session(first)  # what a restart does to every session
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    page.wait_for_function(f"window.lookalike.session && window.lookalike.session !== '{first}'")
    page.wait_for_function(f"document.querySelectorAll('.tile').length > {shown}")
    ids = [i for i, _ in tile_ids(page)]
    assert len(ids) == len(set(ids)), "the resumed scroll showed an image twice"
    assert page.locator("[data-retry]").count() == 0
    # the 404 that started it is the browser's own log line, not the page's
    assert [e for e in errors if "status of 404" not in e] == [], errors
    context.close()


def test_a_failed_search_leaves_the_scroll_on_screen(
    live: LiveServer, browser: Any, tmp_path: Path
) -> None:
    context, page, errors = dropped(live, browser, tmp_path)
    session, tiles = page.evaluate("window.lookalike.session"), tile_ids(page)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are my notes, not a picture")
    page.set_input_files("#file-input", str(not_an_image))
    page.wait_for_selector("#toast:not([hidden])")
    assert "did not work" in page.inner_text("#toast")
    assert page.evaluate("window.lookalike.session") == session  # the old scroll goes on
    assert tile_ids(page) == tiles
    assert page.locator(".feed.replacing").count() == 0
    assert [e for e in errors if "status of 415" not in e] == [], errors
    context.close()


def test_looks_the_forgotten_session_refused_reach_the_session_that_took_over(
    live: LiveServer, browser: Any, tmp_path: Path
) -> None:
    """The server forgot the session while the person only looked (no page to fetch): the
    feedback it refuses starts the resume, and those looks go to the new session."""
    context, page, errors = dropped(live, browser, tmp_path)
    for _ in range(40):  # to the end of the scroll: no page left to fetch
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        if page.evaluate("document.querySelector('#status').dataset.kind") == "end":
            break
        page.wait_for_timeout(250)
    assert page.evaluate("document.querySelector('#status').dataset.kind") == "end"
    page.evaluate("window.scrollTo(0, 0)")
    first = page.evaluate("window.lookalike.session")
    live.app.state.engine.delete_session(first)
    page.mouse.move(400, 300)  # someone is there
    page.wait_for_timeout(1500)  # looking at what is on screen...
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")  # ...until it scrolls away
    page.wait_for_function(f"window.lookalike.session !== '{first}'", timeout=20_000)
    taken_over = page.evaluate("window.lookalike.session")
    _wait_for(lambda: len(live.feedback(taken_over)) > 0, timeout_s=20)
    assert [e for e in errors if "status of 404" not in e] == [], errors
    context.close()


@pytest.mark.parametrize("network", ["refused", "dropped"])
def test_api_docs_without_the_cdn_show_a_plain_reference(
    live: LiveServer, browser: Any, network: str
) -> None:
    """/docs loads Swagger UI from a CDN; offline, the page lists the API from /openapi.json,
    whether the CDN is refused at once or its packets are dropped (a firewall: no answer)."""
    context = browser.new_context()
    page = context.new_page()
    blocked: list[str] = []

    def offline(route: Any) -> None:
        blocked.append(route.request.url)
        if network == "refused":
            route.abort()  # else never answered, as long as the test runs

    page.route("https://**/*", offline)
    try:
        page.goto(f"{live.url}/docs", wait_until="commit")
        page.wait_for_selector(".api-reference", timeout=20_000)
        headings = page.eval_on_selector_all(".operation h3", "els => els.map(e => e.textContent)")
        assert {"POST /v1/search", "GET /v1/feed", "POST /v1/feedback"} <= set(headings)
        assert "POST /knn-service" in headings
        link = page.get_attribute(".operation a[href^='#schema-']", "href")
        assert link and page.query_selector(link) is not None  # schema links land on a schema
        assert any("swagger-ui" in url for url in blocked)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"api-docs-{network}.png"))
    finally:
        context.close()


def test_api_docs_with_the_cdn_start_swagger_ui(live: LiveServer, browser: Any) -> None:
    context = browser.new_context()
    page = context.new_page()
    # A stand-in for the CDN's bundle, which records how the page started it.
    stub = (
        "window.SwaggerUIBundle = Object.assign((config) => { window.started = config; },"
        " {presets: {apis: 'apis'}, SwaggerUIStandalonePreset: 'standalone'});"
    )
    page.route(
        "https://**/*.js", lambda route: route.fulfill(body=stub, content_type="text/javascript")
    )
    page.route("https://**/*.css", lambda route: route.fulfill(body="", content_type="text/css"))
    try:
        page.goto(f"{live.url}/docs")
        page.wait_for_load_state("load")
        page.wait_for_function("window.started !== undefined")
        started = page.evaluate("window.started")
        assert started["url"] == "openapi.json" and started["dom_id"] == "#swagger-ui"
        assert started["presets"] == ["apis", "standalone"]
        page.wait_for_timeout(4500)  # past the wait for a CDN that does not answer
        assert page.query_selector("head style") is None  # the fallback adds one first thing
        assert page.query_selector(".api-reference") is None
    finally:
        context.close()
