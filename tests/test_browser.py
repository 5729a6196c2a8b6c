"""The reports and the explorer in a real browser, opened as a person would.

Debian's ``chromium`` (``make browser`` installs it; ``make test`` runs that
first) is driven by Playwright's Python package, pointed at the system browser
(Playwright cannot download its own here). The session's small Tux Paint
project with its notebooks run into HTML reports (``notebook_reports``); then the browser opens
``index.html`` and every report from disk, and the explorer notebook in a
JupyterLab this test starts on loopback. Every request that would leave the
machine is blocked and recorded. Screenshots go to ``reports/screenshots/``
of the project (look at them).
"""
from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import nbformat
import pytest

from vslib.paths import NOTEBOOKS_DIR, PROJ_ROOT

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (a dev dependency)")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("the browser tests need Debian's chromium: `make browser` (apt-get install -y chromium "
                "chromium-driver)", allow_module_level=True)

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-sync"]
SHOTS = PROJ_ROOT / "reports" / "screenshots"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
STDERR = '[data-mime-type="application/vnd.jupyter.stderr"]'


@pytest.fixture(scope="module")
def project(notebook_reports):
    """The session's small project with its notebooks run into reports (nothing listens on port 9: the explorer
    must say Elasticsearch is not offered, once)."""
    assert all(r["status"] == "ok" for r in notebook_reports.runs)
    return notebook_reports.cfg


@pytest.fixture(scope="module")
def browser():
    SHOTS.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


class Page:
    """A browser page that blocks and records every request leaving the machine, and JavaScript errors."""

    def __init__(self, browser, width: int = 1280, height: int = 900):
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.external: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def _route(self, route):
        url = route.request.url
        u = urlparse(url)
        if u.scheme in ("file", "data", "blob", "about") or (u.hostname or "") in LOCAL_HOSTS:
            route.continue_()
        else:
            self.external.append(url)
            route.abort()

    def broken_images(self) -> list[str]:
        return self.page.evaluate(
            "Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0)"
            ".map(i => (i.currentSrc || i.src).slice(0, 100))")

    def close(self):
        self.context.close()


def test_index_and_every_report_stand_alone_offline(project, browser):
    out = project.reports_dir
    pages = Page(browser)
    try:
        page = pages.page
        page.goto((out / "index.html").as_uri())
        page.wait_for_load_state("load")
        page.screenshot(path=str(SHOTS / "index.png"), full_page=True)
        links = page.eval_on_selector_all("table a", "as => as.map(a => [a.textContent, a.getAttribute('href')])")
        reports = [(text, href) for text, href in links if href.endswith(".html")]
        assert len(reports) == len(list(NOTEBOOKS_DIR.glob("*.ipynb"))), links
        for text, href in links:  # a link's text says what it opens
            assert Path(href).suffix in text or Path(href).stem == text, (text, href)
        assert pages.broken_images() == []
        for text, href in reports:
            page.goto((out / href).as_uri())
            page.wait_for_load_state("load")
            page.wait_for_timeout(200)
            page.screenshot(path=str(SHOTS / f"{Path(href).stem}.png"), full_page=True)
            assert pages.broken_images() == [], href
            assert page.locator(STDERR).count() == 0, f"{href} shows stderr output"
            assert page.locator(".jp-OutputArea-output pre:has-text('Traceback')").count() == 0, href
            assert page.locator("img").count() >= (1 if href.startswith(("01", "02", "04", "05")) else 0), href
        # the explorer's snapshot: the three modes side by side, enlarge works without a kernel
        page.goto((out / "05_query_explorer.html").as_uri())
        assert page.locator(".vs-snapshot .vs-col").count() == 3
        # the embedding map as a static SVG: the query and its hits ringed
        assert page.locator(".vs-snapshot .vs-map svg .vs-querypt").count() == 1
        assert page.locator(".vs-snapshot .vs-map svg .vs-hitpt").count() >= 1
        page.locator(".vs-snapshot .vs-map").screenshot(path=str(SHOTS / "05_query_explorer_map.png"))
        page.locator(".vs-snapshot .vs-zoom").first.click()
        big = page.locator(".vs-big:target img")
        big.wait_for(state="visible")
        assert big.evaluate("i => i.naturalWidth") > 72
        page.screenshot(path=str(SHOTS / "05_query_explorer_enlarged.png"))
        assert pages.external == [], f"requests left the machine: {pages.external}"
        assert pages.errors == [], pages.errors
    finally:
        pages.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(project, tmp_path_factory):
    """JupyterLab on loopback, serving a copy of the explorer notebook parametrised for the project."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    from vslib.report import notebook_parameters

    root = tmp_path_factory.mktemp("lab")
    nb = load_notebook_node(str(NOTEBOOKS_DIR / "05_query_explorer.ipynb"))
    nb = parameterize_notebook(nb, {**notebook_parameters(project), "start_k": 4})
    nbformat.write(nb, str(root / "05_query_explorer.ipynb"))
    port, token = _free_port(), "vs-browser-test"
    settings = root / ".settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')  # no news prompt
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(root / ".config"), "JUPYTER_RUNTIME_DIR": str(root / ".runtime"),
           "JUPYTERLAB_WORKSPACES_DIR": str(root / ".workspaces"), "JUPYTERLAB_SETTINGS_DIR": str(root / ".settings"),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    log = open(root / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--allow-root",
         "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=", "--ServerApp.open_browser=False"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("JupyterLab did not start: " + (root / "lab.log").read_text()[-2000:])
                time.sleep(1)
        yield base, token
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the kernels it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.slow
def test_the_explorer_in_jupyterlab_picks_a_query_and_searches_with_a_clicked_hit(lab, browser, project):
    base, token = lab
    pages = Page(browser, height=1100)
    page = pages.page
    try:
        page.goto(f"{base}/lab/tree/05_query_explorer.ipynb?token={token}")
        page.wait_for_function("window.jupyterapp && document.querySelector('.jp-Notebook')", timeout=120_000)
        page.wait_for_function(
            "() => { const w = window.jupyterapp.shell.currentWidget;"
            " return w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel"
            " && w.sessionContext.session.kernel.connectionStatus === 'connected'; }", timeout=120_000)
        page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        result = page.locator(".vs-x .vs-result")
        result.wait_for(state="visible", timeout=300_000)
        explorer = page.locator(".widget-vbox:has(.vs-x)").first
        explorer.scroll_into_view_if_needed()
        explorer.screenshot(path=str(SHOTS / "lab_explorer_start.png"))  # the controls, gallery and results

        def query() -> str:
            return result.get_attribute("data-query")

        def wait_query(value: str) -> None:
            page.wait_for_function(
                "v => { const r = document.querySelector('.vs-x .vs-result'); return r && r.dataset.query === v; }",
                arg=value, timeout=60_000)

        start = query()
        assert page.locator(".vs-x .vs-col").count() == 3  # compare: flat | hierarchical | adaptive
        assert pages.broken_images() == []
        # one short notice that elasticsearch is not offered, printed once
        assert page.get_by_text("Elasticsearch is not offered").count() == 1

        # pick another query from the gallery
        thumbs = page.locator(".vs-x .vs-gallery .vs-thumb")
        n_all = thumbs.count()
        assert n_all > 5
        target = thumbs.nth(4)
        picked = target.get_attribute("data-id")
        assert picked != start
        before = result.inner_html()
        target.click()
        wait_query(picked)
        assert result.inner_html() != before
        assert "vs-selected" in (target.get_attribute("class") or "")
        explorer.screenshot(path=str(SHOTS / "lab_explorer_picked.png"))

        # click a hit: it becomes the query and finds itself first
        hit = page.locator('.vs-x .vs-col[data-mode="flat"] .vs-hit').nth(2)
        hit_path = hit.get_attribute("data-id")
        hit.locator("img").click()
        wait_query(hit_path)
        assert page.locator('.vs-x .vs-col[data-mode="flat"] .vs-hit').first.get_attribute("data-id") == hit_path
        assert pages.broken_images() == []
        explorer.screenshot(path=str(SHOTS / "lab_explorer_hit_clicked.png"))

        # the embedding map: the query and its hits are ringed; hovering a point shows its thumbnail
        emap = page.locator(".vs-x .vs-map")
        assert emap.locator(".vs-querypt").get_attribute("data-id") == hit_path
        assert emap.locator(".vs-hitpt").count() == page.locator('.vs-x .vs-col[data-mode="adaptive"] .vs-hit').count()
        emap.scroll_into_view_if_needed()
        visible = emap.evaluate(  # the first indexed point not covered by another one
            "m => [...m.querySelectorAll('.vs-pts circle.vs-pt')].findIndex(c => { const r = c.getBoundingClientRect();"
            " return document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2) === c; })")
        assert visible >= 0
        point = emap.locator(".vs-pts circle.vs-pt").nth(visible)
        point_path, point_label = point.get_attribute("data-id"), point.get_attribute("data-label")
        point.hover()
        page.wait_for_function("() => { const i = document.querySelector('.vs-x .vs-tip:not([hidden]) img');"
                               " return i && i.complete && i.naturalWidth > 0; }", timeout=30_000)
        tip = page.locator(".vs-x .vs-tip")
        assert point_label in tip.inner_text() and Path(point_path).name in tip.inner_text()
        page.wait_for_timeout(300)  # let the decoded thumbnail paint before the screenshot
        page.screenshot(path=str(SHOTS / "lab_explorer_map_hover.png"), clip=emap.bounding_box())  # no scrolling
        # clicking a point makes it the query: the results change and the map rings it
        before = result.inner_html()
        point.click()
        wait_query(point_path)
        assert result.inner_html() != before
        page.wait_for_function("p => { const q = document.querySelector('.vs-x .vs-map .vs-querypt');"
                               " return q && q.dataset.id === p; }", arg=point_path, timeout=30_000)
        assert pages.broken_images() == []
        page.locator(".vs-x .vs-mapbox").screenshot(path=str(SHOTS / "lab_explorer_map_clicked.png"))

        # enlarge a hit
        page.locator(".vs-x .vs-zoom").first.click()
        box = page.locator(".vs-x .vs-lightbox-live img")
        box.wait_for(state="visible", timeout=30_000)
        page.wait_for_function("() => { const i = document.querySelector('.vs-x .vs-lightbox-live img');"
                               " return i && i.complete && i.naturalWidth > 72; }")
        page.screenshot(path=str(SHOTS / "lab_explorer_enlarged.png"))
        page.locator(".vs-x .vs-lightbox-live").click()

        # filter the gallery by text
        label = page.locator(".vs-x .vs-thumb").nth(0).get_attribute("title").split(":")[0]
        page.locator(".vs-x").locator("xpath=..").locator("input[placeholder='label or file name']").fill(label)
        page.wait_for_function("n => document.querySelectorAll('.vs-x .vs-thumb').length < n", arg=n_all,
                               timeout=30_000)

        # drop an image file on the drop zone
        src = Path(hit_path).read_bytes()
        dt = page.evaluate_handle(
            "b64 => { const dt = new DataTransfer(); const bin = Uint8Array.from(atob(b64), c => c.charCodeAt(0));"
            " dt.items.add(new File([bin], 'dropped.png', {type: 'image/png'})); return dt; }",
            base64.b64encode(src).decode("ascii"))
        page.dispatch_event(".vs-x .vs-drop", "drop", {"dataTransfer": dt})
        wait_query("dropped.png")
        assert page.locator('.vs-x .vs-col[data-mode="flat"] .vs-hit').first.get_attribute("data-id") == hit_path
        explorer.screenshot(path=str(SHOTS / "lab_explorer_dropped.png"))

        assert page.locator(STDERR).count() == 0, "the notebook shows stderr output"
        assert page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").count() == 0
        assert pages.external == [], f"requests left the machine: {pages.external}"
    finally:
        pages.close()
