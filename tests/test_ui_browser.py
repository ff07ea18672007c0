"""The MLflow UI in a real browser, on a real 2x2 study: what a user sees.

A study of pos_enc (learned, rope) x ffn (gelu, swiglu) is trained through the CLI (basic
sweeper, tiny model, one seed), its report built with `pipeline.report`, and `make ui` serves
the store. Headless Chromium from Debian's package, driven by Playwright, opens the runs-table
address `make ui` printed and checks, with no click in the table, that the factor and metric
column headers and the four trials are in view, best val loss first; then the view grouped by
pos_enc (listed under Views), the parallel-coordinates chart of the chart address `make ui`
printed, and the parent run's description, whose link opens report.html. Nothing is
downloaded: the browser is /usr/bin/chromium (`apt-get install chromium`), never
`playwright install`. SAVE_UI_SCREENSHOTS=1 refreshes the pictures in docs/img/.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.model.families import FAMILIES
from pipeline.tracking import views
from tests.helpers.cli import TINY, cli

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STUDY = "ui_demo"
WINDOW = {"width": 1920, "height": 1080}  # the views' column widths fit this width
SHOTS = ("mlflow_runs.png", "mlflow_grouped.png", "mlflow_parallel.png", "mlflow_parent.png", "mlflow_report.png")

pytestmark = [
    # a 4-trial sweep through the CLI, a report, a server start and page loads: ~2 min on an
    # idle 2-core machine, ~6 min on a loaded one
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium (apt-get install chromium)"
    ),
    pytest.mark.skipif(
        not (REPO / ".venv/bin/mlflow").exists(), reason="`make ui` serves from .venv; run `make install` first"
    ),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (test extra)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`make ui` exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"`make ui` did not answer {url} in {timeout} s:\n{log.read_text()[-3000:]}")


def train_study(root: Path) -> None:
    """The 2x2 study through the user's commands (training, then the report)."""
    args = ["-m", f"study={STUDY}", "model/pos_enc=learned,rope", "model/ffn=gelu,swiglu", *TINY]
    args += ["eval.factors=[1,4]", "eval.decode.repeats=1"]  # extrap/ppl_x1 and _x4, quickly
    r = cli("pipeline.train", args, root, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli("pipeline.report", ["--study", STUDY], root, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """(the printed runs-table and chart addresses, the store's client, a folder for pictures)."""
    root = tmp_path_factory.mktemp("ui")
    train_study(root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    port = free_port()
    # One worker and no job runner: a UI for one person starts in a fraction of the time.
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_WORKERS": "1",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    log = root / "ui.log"
    # -o: take the install stamp as up to date, so the test never reinstalls the venv.
    proc = subprocess.Popen(
        ["make", "-s", "-C", str(REPO), "-o", ".venv/.installed", "ui", f"PORT={port}"],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/health", proc, log)
        printed = log.read_text()
        runs = re.search(rf"^  {STUDY} +runs +(\S+)$", printed, re.M)
        charts = re.search(r"^ +charts +(\S+)$", printed, re.M)
        assert runs and charts, printed
        yield runs.group(1), charts.group(1), MlflowClient(uri), root
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # make, mlflow and uvicorn: the group we started
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def close_assistant(page) -> None:
    """MLflow opens its Assistant side panel by itself on a local server's first visit (once per
    browser, remembered in local storage); a user closes it once. It is no part of the table."""
    close = page.get_by_role("button", name="Close", exact=True)
    try:
        close.first.wait_for(timeout=15_000)
    except sync_api.TimeoutError:
        return  # it did not open
    close.first.click()
    close.first.wait_for(state="detached")


def in_view(page, box: dict | None) -> bool:
    size = page.viewport_size
    return bool(box) and box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= size["width"]


def header(page, col_id: str):
    return page.locator(f'.ag-header-cell[col-id="{col_id}"]')


def save(page, root: Path, name: str, height: int | None = None) -> None:
    clip = {"x": 0, "y": 0, "width": WINDOW["width"], "height": height} if height else None
    page.screenshot(path=str(root / name), clip=clip)


def test_the_printed_address_shows_the_ablation_and_its_report(ui):
    runs_url, charts_url, client, root = ui
    exp = client.get_experiment_by_name(STUDY)
    assert exp.tags[views.EXPERIMENT_KIND] == views.TRAINING_KIND
    (parent,) = client.search_runs([exp.experiment_id], "tags.sweep = 'true'")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4 and {(c.data.tags["pos_enc"], c.data.tags["ffn"]) for c in children} == {
        ("learned", "gelu"),
        ("learned", "swiglu"),
        ("rope", "gelu"),
        ("rope", "swiglu"),
    }
    best_first = [c.info.run_name for c in sorted(children, key=lambda c: c.data.metrics["val/loss"])]

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        page = browser.new_page(viewport=WINDOW)
        page.set_default_timeout(60_000)

        # 1. The runs table: the factor and metric columns and every trial, best first.
        page.goto(runs_url)
        page.get_by_role("link", name=best_first[0], exact=True).wait_for()
        close_assistant(page)
        expected = {f"tags.`{t}`": t for t in views.TAG_COLUMNS} | {f"metrics.`{m}`": m for m in views.METRIC_COLUMNS}
        assert len(expected) == 11
        for col_id, title in expected.items():
            cell = header(page, col_id)
            cell.wait_for()  # the grid draws the columns that fit once the panel is gone
            assert cell.inner_text().strip() == title, col_id
            assert in_view(page, cell.bounding_box()), f"{col_id} is out of sight"
        rows = [page.get_by_role("link", name=name, exact=True) for name in best_first]
        assert all(r.is_visible() and in_view(page, r.bounding_box()) for r in rows)
        ys = [r.bounding_box()["y"] for r in rows]
        assert ys == sorted(ys), "trials not in order of val/loss"
        assert page.get_by_role("link", name=f"sweep-{STUDY}", exact=True).is_visible()
        save(page, root, "mlflow_runs.png", 560)

        # 2. The parent run: its description summarises the study and links the report.
        page.get_by_role("link", name=f"sweep-{STUDY}", exact=True).click()
        page.get_by_text("Best configuration:", exact=False).wait_for()
        # the run page drops workflowType (GenAI pages unless "Model training" was once clicked)
        page.goto(f"{page.url.split('?')[0]}?{views.WORKFLOW}")
        page.get_by_text("Best configuration:", exact=False).wait_for()
        assert page.get_by_text("Significant factors", exact=False).is_visible()
        save(page, root, "mlflow_parent.png", 560)
        with page.context.expect_page() as opened:  # MLflow opens description links in a new tab
            page.get_by_role("link", name="Study report").click()
        report = opened.value
        report.set_viewport_size(WINDOW)
        deadline, frame = time.monotonic() + 60, None
        while frame is None and time.monotonic() < deadline:
            frames = [f for f in report.frames if f != report.main_frame]
            frame = next((f for f in frames if "Failed and pruned trials" in (f.content() or "")), None)
            report.wait_for_timeout(250)
        assert frame is not None, "report.html did not render in the artifact viewer"
        text = frame.inner_text("body")
        assert f"Study {STUDY}" in text and parent.info.run_id in text
        assert all(c.info.run_id in text for c in children)
        widths = frame.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
        assert len(widths) >= 4 and min(widths) > 0  # the figures are inlined and decode
        report.wait_for_timeout(500)
        save(report, root, "mlflow_report.png")

        # 3. Views > grouped by pos_enc: one row per level with the mean of its trials.
        page.goto(runs_url)
        page.get_by_test_id("saved-views-trigger").click()
        for view in views.views():
            assert view.name in page.get_by_test_id(f"saved-views-item-{view.key}").inner_text()
        page.keyboard.press("Escape")
        # by its address: a view picked from the menu opens without workflowType (GenAI pages
        # unless the user once clicked "Model training", which the browser then remembers)
        page.goto(runs_url.replace(f"={views.TABLE_VIEW}&", f"=by-{FAMILIES[0]}&"))
        page.get_by_text("Group: rope", exact=True).wait_for()
        assert page.get_by_text("Group: learned", exact=True).is_visible()
        means = {
            level: sum(c.data.metrics["val/loss"] for c in children if c.data.tags["pos_enc"] == level) / 2
            for level in ("learned", "rope")
        }
        for level, mean in means.items():
            index = page.locator(".ag-row", has_text=f"Group: {level}").first.get_attribute("row-index")
            shown = page.locator(f'.ag-row[row-index="{index}"] [col-id="metrics.`val/loss`"]').first.inner_text()
            assert abs(float(re.match(r"[0-9.]+\d", shown).group()) - mean) < 1e-3, (level, shown, mean)
        save(page, root, "mlflow_grouped.png", 560)

        # 4. The chart view: parallel coordinates over the four factors and val loss.
        page.goto(charts_url)
        page.get_by_text("Parallel Coordinates", exact=True).wait_for()
        axes = {f"model.{f}.name" for f in FAMILIES} | {"val/loss"}
        texts = page.locator(".parcoords text")  # plotly draws the axes as SVG text
        deadline = time.monotonic() + 60
        while not axes <= set(texts.all_text_contents()) and time.monotonic() < deadline:
            page.wait_for_timeout(250)
        assert axes <= set(texts.all_text_contents()), texts.all_text_contents()
        page.wait_for_timeout(500)
        save(page, root, "mlflow_parallel.png", 720)

        browser.close()

    for shot in SHOTS:
        assert (root / shot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("SAVE_UI_SCREENSHOTS") == "1":
            (REPO / "docs/img").mkdir(parents=True, exist_ok=True)
            shutil.copy(root / shot, REPO / "docs/img" / shot)
