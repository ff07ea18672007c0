"""Helpers for tests that drive the real command line in a scratch working directory."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def tiny(max_steps: int, val_check_interval: int, batch_size: int = 4, val_batches: int = 1) -> list[str]:
    """Overrides for a run of seconds on the CPU: a 1-layer model of width 32 over 32 tokens,
    `max_steps` steps, no progress bar, no system metrics. Sweep tests add `budget=cpu` (a test
    of the GPU budget sets its own) and their evaluation settings."""
    return [
        "model.d_model=32",
        "model.n_layers=1",
        "model.n_heads=2",
        "model.context_length=32",
        f"trainer.max_steps={max_steps}",
        f"trainer.val_check_interval={val_check_interval}",
        f"data.batch_size={batch_size}",
        f"data.val_batches={val_batches}",
        "trainer.enable_progress_bar=false",
        "tracking.system_metrics=false",
    ]


# A run that takes seconds: tiny model, few steps, evaluation kept small.
TINY = [*tiny(20, 10, batch_size=8, val_batches=2), "trainer.log_every_n_steps=2"]


# Where the embedded corpus's token cache is built once per test process (tests/conftest.py
# sets it to a folder under pytest's temporary directory).
TOKEN_SEED: Path | None = None


def seed_tokens(folder: Path) -> None:
    """Put the default corpus's token cache where a command run in `folder` looks for it
    (`.cache/tokens`, pipeline.data.cache), as if an earlier run there had tokenized it. Building
    it takes 3-5 s of CPU; without this every test that trains in a fresh folder pays that. It is
    built once per test process by the real `load_token_splits` and copied (never linked: a test
    may damage its own copy). Tests of the uncached path (a cache miss, the runner's own checks
    before the cache exists) do not call this."""
    from pipeline.data import DataConfig, load_token_splits
    from pipeline.data.cache import cache_key

    assert TOKEN_SEED is not None, "tests/conftest.py sets TOKEN_SEED for the session"
    cfg = DataConfig()  # what conf/data's default resolves to: the embedded corpus, bytes
    built = TOKEN_SEED / f"{cache_key(cfg)}.npz"
    if not built.exists():
        load_token_splits(cfg, TOKEN_SEED)
    target = folder / ".cache" / "tokens" / built.name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, target)


def cli(
    module: str,
    args: list[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: int = 300,
    seed_cache: bool = True,
) -> subprocess.CompletedProcess:
    """`python -m module args` in `cwd`, offline, without this environment's MLflow URI; the
    token cache seeded there first (seed_tokens) unless `seed_cache=False`."""
    if seed_cache:
        seed_tokens(cwd)
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env.update({"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def sweep_env(folder: Path) -> dict[str, str]:
    """This environment without PIPELINE_* / MLFLOW_* settings, the MLflow store in `folder`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "MLFLOW_"))}
    return {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}


def count(db: Path, sql: str, *params: object) -> int:
    """`SELECT count(*) ...` on a SQLite store a running sweep writes; 0 while it does not exist.
    Read-only: a plain connect would create an empty file, which the sweep then refuses."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute(sql, params).fetchone()[0]
    except sqlite3.Error:  # not created yet
        return 0
