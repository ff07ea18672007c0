"""A claiming worker for tests/test_workers.py, in its own light module: a `spawn` process
imports the module of its target, and the test module's imports (torch, the pipeline) cost
seconds of CPU per process where this one needs only Optuna and the sweeper's storage."""

from __future__ import annotations

import multiprocessing as mp

import optuna

from hydra_plugins.pipeline_optuna_sweeper import study as study_lib
from hydra_plugins.pipeline_optuna_sweeper.storage import open_storage


def claim_all(url: str, study_name: str, out: mp.Queue) -> None:
    """Claim and complete trials of the study until none is left; put the numbers claimed."""
    study = optuna.load_study(study_name=study_name, storage=open_storage(url))
    mine = []
    while (trial := study_lib.claim(study)) is not None:
        mine.append(trial.number)
        study.tell(trial, 0.0)
    out.put(mine)
