"""Rerun a logged run from its recorded config:  python -m pipeline.rerun RUN_ID [overrides]

The recorded `config.yaml` artifact is the resolved config of the original run; overrides
are dotted `key=value` pairs, plus `model/<family>=<name>` to swap a component. The new run
is tagged `rerun_of=RUN_ID`; on CPU with the same seed it reproduces the loss curve exactly.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.train import CONF_DIR, INVALID_CONFIG, _fail_fast, run, validate_config

COMPONENT_GROUPS = ("model/pos_enc", "model/norm", "model/attention", "model/ffn")


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override '{item}' is not key=value")
        if "/" in key:
            if key not in COMPONENT_GROUPS:
                raise ValueError(f"rerun can swap only component groups ({', '.join(COMPONENT_GROUPS)}); got '{key}'")
            path = Path(CONF_DIR) / key / f"{value}.yaml"
            if not path.exists():
                valid = sorted(p.stem for p in path.parent.glob("*.yaml"))
                raise ValueError(f"{key}={value} is not an option; valid: {', '.join(valid)}")
            OmegaConf.update(cfg, key.replace("/", "."), OmegaConf.load(path), merge=False)
        else:
            OmegaConf.update(cfg, key.lstrip("+"), OmegaConf.from_dotlist([f"x={value}"]).x, force_add=key.startswith("+"))
    return cfg


def main(argv: list[str]) -> float:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import tracking_uri

    if not argv or argv[0].startswith("-"):
        _fail_fast("usage: python -m pipeline.rerun RUN_ID [key=value ...]")
    run_id, overrides = argv[0], argv[1:]
    client = MlflowClient(tracking_uri())
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = OmegaConf.load(client.download_artifacts(run_id, "config.yaml", tmp))
    except MlflowException as e:
        _fail_fast(f"cannot read run {run_id} in {tracking_uri()}: {e.message.splitlines()[0]}")
    OmegaConf.set_struct(cfg, True)
    try:
        cfg = apply_overrides(cfg, overrides)
        spec = validate_config(cfg)
    except (*INVALID_CONFIG, ValueError, KeyError) as e:
        _fail_fast(str(e))
    out_dir = Path("outputs") / cfg.study / f"rerun-{run_id[:8]}-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    return run(cfg, spec, overrides, out_dir, extra_tags={"rerun_of": run_id})


if __name__ == "__main__":
    main(sys.argv[1:])
