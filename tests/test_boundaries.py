"""Import boundaries, checked in a fresh interpreter: the model is pure PyTorch, and the report
(analysis) runs without torch."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers.cli import REPO

ANALYSIS = [
    "pipeline.analysis",
    "pipeline.analysis.study",
    "pipeline.analysis.effects",
    "pipeline.analysis.powerlaw",
    "pipeline.analysis.document",
    "pipeline.analysis.figures",
    "pipeline.analysis.report",
    "pipeline.analysis.sections",
    "pipeline.analysis.compute",
    "pipeline.analysis.anova",
    "pipeline.report",
    "pipeline.tracking.schema",
]


def loaded_after(code: str, watch: list[str]) -> list[str]:
    """The top-level packages of `watch` that are in sys.modules after running `code`."""
    report = f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(watch)!r})))"
    probe = f"import sys, json\n{code}\n{report}"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_model_loads_no_training_or_tracking_stack() -> None:
    code = (
        "from pipeline.model import ModelConfig, DecoderLM\n"
        "import pipeline.model.components, pipeline.model.presets\n"
        "DecoderLM(ModelConfig.from_preset('mixtral', vocab_size=64))"
    )
    assert loaded_after(code, ["lightning", "mlflow", "hydra", "optuna", "omegaconf"]) == []


def test_the_report_loads_no_torch(tmp_path) -> None:
    """Importing the report stack, and building a report of a logged study, loads no torch
    (torch is installed here, so an import of it anywhere on this path shows up)."""
    assert loaded_after("\n".join(f"import {m}" for m in ANALYSIS), ["torch", "lightning"]) == []
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = (
        "from tests.helpers.mlflow_study import log_grid\n"
        "from pipeline.analysis.report import build_report\n"
        f"log_grid({uri!r}, {str(tmp_path / 'artifacts')!r}, 'grid')\n"
        f"build_report('grid', {uri!r}, {str(tmp_path / 'reports')!r}, optuna_storage='sqlite:///:memory:')"
    )
    assert loaded_after(code, ["torch", "lightning"]) == []
    assert (tmp_path / "reports" / "grid" / "report.md").exists()


def test_the_sweep_storage_and_the_config_checks_load_no_lightning(tmp_path) -> None:
    """Every sweep process and each of its workers opens the Optuna storage (which imports
    pipeline.errors, hence the run spec and the token cache) before any trial: Lightning's
    import, seconds of CPU, waits for the first run that trains."""
    url = f"sqlite:///{tmp_path / 'o.db'}"
    code = (
        "from hydra_plugins.pipeline_optuna_sweeper.storage import open_storage\n"
        "import pipeline.errors, pipeline.run.spec, pipeline.data\n"
        f"open_storage({url!r})"
    )
    assert loaded_after(code, ["lightning"]) == []
