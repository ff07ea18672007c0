"""A toy Hydra app for the sweeper's own tests: a quadratic objective, no pipeline imports.

`fail=true` raises, `sleep` slows each step (to interrupt a sweep), and each step reports an
intermediate value to the active trial, so a pruner can stop it.
"""

import time

import hydra
import optuna
from omegaconf import DictConfig

from hydra_plugins.pipeline_optuna_sweeper import current_trial


def validate(cfg: DictConfig) -> None:
    if cfg.x < 0:
        raise ValueError(f"x={cfg.x}: must be >= 0")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    if cfg.fail:
        raise RuntimeError("asked to fail")
    trial = current_trial()
    loss = 0.0
    for step in range(cfg.steps):
        time.sleep(cfg.sleep)
        loss = (cfg.x - 2.0) ** 2 + cfg.opt.offset + 1.0 / (step + 1)
        if trial is not None:
            trial.report(loss, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"step {step}: {loss:.3f}")
    with open("results.txt", "a") as f:  # one line per finished job, in the launch directory
        f.write(f"{cfg.x} {cfg.opt.name}\n")
    return loss


if __name__ == "__main__":
    main()
