"""One training run, or a Hydra multirun of them:  python -m pipeline.train [overrides]

    python -m pipeline.train                                  # default model, budget=auto
    python -m pipeline.train model=llama model/pos_enc=alibi model.attention.n_kv_heads=1
    python -m pipeline.train -m model/pos_enc=rope,alibi      # Hydra multirun

Bad input (an unknown option, a wrong type, an impossible shape, bad sweep syntax, a corpus or
store that cannot be used) exits 2 with one line before any training and before any MLflow run
exists (docs/errors.md). SIGINT or SIGTERM ends the run KILLED (a sweep: its trial is retried
on the next start) and exits 130 or 143.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import DictConfig

from hydra_plugins.pipeline_optuna_sweeper._errors import SweepFailedError
from hydra_plugins.pipeline_optuna_sweeper._interrupt import Interrupted, interruptible
from pipeline import CONF_DIR
from pipeline.errors import USAGE_ERRORS, one_line
from pipeline.run.spec import check_overrides, resolve_budget, validate_config

FULL_ERROR = "HYDRA_FULL_ERROR"


def main(argv: list[str] | None = None) -> int:
    """Run Hydra on `argv` (default: the command line); returns the process exit code."""
    from hydra._internal.utils import _run_hydra, get_args_parser
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    argv = list(sys.argv[1:] if argv is None else argv)
    errors: list[BaseException] = []

    def task(cfg: DictConfig) -> float | None:
        from pipeline.run.runner import run

        hc = HydraConfig.get()
        try:
            spec = validate_config(cfg)
            return run(cfg, spec, list(hc.overrides.task), Path(hc.runtime.output_dir))
        except USAGE_ERRORS as e:  # found before training: no MLflow run was created
            if hc.mode != RunMode.RUN:
                raise  # in a sweep: the sweeper records the trial as skipped or failed and goes on
            errors.append(e)  # raised from here, Hydra would add a line of its own
            return None

    # Hydra's own entry point reads sys.argv; this one takes argv, with budget=auto resolved
    # (Hydra's defaults list cannot branch on the machine).
    parser = get_args_parser()
    args = parser.parse_args(argv)
    args.overrides = resolve_budget(args.overrides)  # after parsing: `--cfg job` may follow them
    # Hydra prints its errors over several lines and exits 1; with HYDRA_FULL_ERROR it raises
    # them instead, and we print one line. A user who set it keeps the traceback.
    user_wants_traceback = os.environ.get(FULL_ERROR) == "1"
    os.environ[FULL_ERROR] = "1"
    try:
        check_overrides(args.overrides)
        with interruptible():
            _run_hydra(
                args=args, args_parser=parser, task_function=task, config_path=str(CONF_DIR), config_name="train"
            )
    except Interrupted as e:
        print(f"interrupted by {e}: the run in progress ended KILLED", file=sys.stderr)
        return e.exit_code
    except SweepFailedError as e:  # trials ran and some failed: a result, reported above
        print(f"error: {e}", file=sys.stderr)
        return 1
    except USAGE_ERRORS as e:
        if user_wants_traceback:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    finally:
        if not user_wants_traceback:
            os.environ.pop(FULL_ERROR, None)
    if errors:
        print(f"error: {one_line(errors[0])}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
