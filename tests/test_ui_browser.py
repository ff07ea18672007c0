"""The MLflow UI in a real browser.

`make ui` serves a small logged study (with its report logged to the sweep's parent run);
headless Chromium from Debian's package, driven by Playwright, filters the runs by a tag,
opens the parent run's report artifact and saves screenshots. Nothing is downloaded: the
browser is /usr/bin/chromium (`apt-get install chromium`), never `playwright install`.
Set SAVE_UI_SCREENSHOTS=1 to refresh the README's pictures in docs/img/.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.analysis.report import build_report
from tests.helpers.mlflow_study import log_grid

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

pytestmark = [
    pytest.mark.slow,  # ~40 s on an idle 2-core machine (server start, page loads), 80 s loaded
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


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # create the store before the server opens it
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
        # Log the study and its report while the server boots.
        logged = log_grid(uri, str(root / "artifacts"), STUDY)
        build_report(STUDY, uri, root / "reports", optuna_storage=f"sqlite:///{root / 'no.db'}")
        base = f"http://127.0.0.1:{port}"
        wait_for(base + "/health", proc, log)
        yield base, logged, root
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # make, mlflow and uvicorn: the group we started
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_ui_filters_runs_by_tag_and_shows_the_report(ui):
    base, logged, root = ui
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = [client.get_run(rid) for rid in [*logged.runs, logged.failed_id, logged.pruned_id]]
    rope = {r.info.run_name for r in runs if r.data.tags["pos_enc"] == "rope"}
    learned = {r.info.run_name for r in runs} - rope
    assert rope and learned
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(60_000)
        # workflowType: MLflow 3 opens an experiment on its GenAI pages unless told otherwise
        page.goto(f"{base}/#/experiments/{logged.experiment_id}/runs?workflowType=machine_learning")
        page.get_by_text(f"sweep-{STUDY}", exact=True).wait_for()
        close = page.get_by_role("button", name="Close")  # the assistant side panel, if open
        if close.count():
            close.first.click()

        # Filter by tag, then unfold the sweep's parent run: only rope trials are listed.
        box = page.get_by_test_id("search-box").locator("input")
        box = box if box.count() else page.get_by_test_id("search-box")
        box.fill("tags.pos_enc = 'rope'")
        box.press("Enter")
        parent_cell = page.locator("[role=gridcell]", has_text=f"sweep-{STUDY}").first
        parent_cell.get_by_role("button").first.click()
        for name in rope:
            page.get_by_text(name, exact=True).first.wait_for()
        assert all(page.get_by_text(n, exact=True).count() == 0 for n in learned)
        page.screenshot(path=str(root / "mlflow_runs.png"))

        # The parent run's report artifact, rendered by the artifact viewer.
        page.get_by_role("link", name=f"sweep-{STUDY}").first.click()
        page.get_by_role("tab", name="Artifacts").wait_for()
        assert logged.parent_id in page.url
        # the run page forgets the workflow type; ask for it again to keep the training view
        page.goto(
            f"{base}/#/experiments/{logged.experiment_id}/runs/{logged.parent_id}"
            "/artifacts?workflowType=machine_learning"
        )
        page.get_by_text("report", exact=True).first.click()
        page.get_by_text("report.html", exact=True).click()
        deadline = time.monotonic() + 60
        frame = None
        while frame is None and time.monotonic() < deadline:
            frame = next(
                (f for f in page.frames if f != page.main_frame and "Failed and pruned trials" in (f.content() or "")),
                None,
            )
            page.wait_for_timeout(250)
        assert frame is not None, "report.html did not render in the artifact viewer"
        text = frame.inner_text("body")
        assert f"Study {STUDY}" in text and logged.parent_id in text
        assert logged.failed_id in text and all(rid in text for rid in logged.runs)
        # the figures are inlined and decode in the browser
        widths = frame.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
        assert len(widths) >= 5 and min(widths) > 0
        page.wait_for_timeout(500)
        page.screenshot(path=str(root / "mlflow_ui.png"))
        browser.close()

    for shot in ("mlflow_runs.png", "mlflow_ui.png"):
        assert (root / shot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("SAVE_UI_SCREENSHOTS") == "1":
            (REPO / "docs/img").mkdir(parents=True, exist_ok=True)
            shutil.copy(root / shot, REPO / "docs/img" / shot)
