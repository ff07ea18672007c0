"""One training run, or a Hydra multirun of them:  python -m pipeline.train [overrides]

    python -m pipeline.train                                  # default model, budget=auto
    python -m pipeline.train model=llama model/pos_enc=alibi model.attention.n_kv_heads=1
    python -m pipeline.train -m model/pos_enc=rope,alibi      # Hydra multirun

The config is validated into a typed spec (`pipeline.run.spec.validate_config`) before any
data is read or any MLflow run exists; a bad override exits 2 with one line naming the problem.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

from pipeline import CONF_DIR
from pipeline.run.spec import INVALID_CONFIG, resolve_budget, validate_config


def main(argv: list[str] | None = None) -> int:
    """Run Hydra on `argv` (default: the command line); returns the process exit code."""
    from hydra._internal.utils import _run_hydra, get_args_parser
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    argv = list(sys.argv[1:] if argv is None else argv)
    errors: list[str] = []

    def task(cfg: DictConfig) -> float | None:
        from pipeline.run.runner import run

        hc = HydraConfig.get()
        try:
            spec = validate_config(cfg)
            return run(cfg, spec, list(hc.overrides.task), Path(hc.runtime.output_dir))
        except INVALID_CONFIG as e:  # found before training: no MLflow run was created
            if hc.mode != RunMode.RUN:
                raise  # in a sweep: the sweeper records the trial as failed and goes on
            errors.append(str(e))
            return None

    # Hydra's own entry point reads sys.argv; this one takes argv, with budget=auto resolved
    # (Hydra's defaults list cannot branch on the machine).
    parser = get_args_parser()
    args = parser.parse_args(resolve_budget(argv))
    _run_hydra(args=args, args_parser=parser, task_function=task, config_path=str(CONF_DIR), config_name="train")
    if errors:
        print(f"error: {errors[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
