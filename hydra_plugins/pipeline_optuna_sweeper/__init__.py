"""A Hydra sweeper on current Optuna (`hydra/sweeper=optuna`): grid, TPE or any Optuna sampler
over Hydra's override grammar, a persistent study that resumes, pruning, and failed or invalid
trials that do not stop the sweep. See docs/sweeps.md."""

from . import checked_basic, config  # noqa: F401  (register hydra/sweeper=checked_basic and =optuna)
from ._errors import SweepFailedError
from .sweeper import current_trial, last_summary
from .workers import is_worker

__all__ = ["SweepFailedError", "current_trial", "is_worker", "last_summary"]
