"""A non-editable install works from any directory: the Hydra configs, the studies and the
Optuna sweeper plugin ship inside the installed packages, not beside a checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.cli import REPO


def sh(args: list, cwd: Path) -> str:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(map(str, args))}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_non_editable_install_finds_its_configs(tmp_path: Path) -> None:
    # The package is built from a copy, so no build/ folder lands in the checkout; dependencies
    # come from the project's environment through a .pth line (its editable finder, a .pth of
    # its own, is not run from there, so `pipeline` can only come from this install).
    src = tmp_path / "src"
    for name in ("pipeline", "hydra_plugins"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    venv = tmp_path / "venv"
    sh([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path)
    python = venv / "bin" / "python"
    site = Path(sh([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path).strip())
    deps = Path(sh([sys.executable, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path).strip())
    (site / "project_deps.pth").write_text(f"{deps}\n")
    pip = [sys.executable, "-m", "pip", "--python", python]
    sh([*pip, "install", "-q", "--no-deps", "--no-build-isolation", src], src)
    shutil.rmtree(src)  # nothing may read the source tree from here on

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = sh([python, "-c", "import pipeline; print(pipeline.CONF_DIR)"], elsewhere).strip()
    assert Path(where).is_relative_to(site)
    job = sh([python, "-m", "pipeline.train", "--cfg", "job", "model=llama", "ablation=full_grid"], elsewhere)
    assert "study: full_grid" in job and "preset: llama" in job
    hydra = sh([python, "-m", "pipeline.train", "--cfg", "hydra", "hydra/sweeper=optuna"], elsewhere)
    assert "hydra_plugins.pipeline_optuna_sweeper.sweeper.OptunaSweeper" in hydra
    cost = sh([venv / "bin" / "pipeline-cost", "model=llama"], elsewhere)
    assert cost.startswith("llama: rope / rmsnorm (pre) / gqa")
    assert sorted(p.name for p in elsewhere.iterdir()) == []  # --cfg and cost write nothing
