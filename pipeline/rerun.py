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

from pipeline import CONF_DIR
from pipeline.model.config import small_init_std
from pipeline.model.families import FAMILIES
from pipeline.run.spec import INVALID_CONFIG, validate_config

COMPONENT_GROUPS = tuple(f"model/{family}" for family in FAMILIES)


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The recorded config with `overrides` applied. A new model.d_model re-derives the init the
    run took by default (sqrt(2 / (5 d_model)), recorded as a number) unless model.init_std is
    given too: the width changed, and so does the default that followed it."""
    width = OmegaConf.select(cfg, "model.d_model")
    given = set()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override '{item}' is not key=value")
        given.add(key.lstrip("+"))
        if "/" in key:
            if key not in COMPONENT_GROUPS:
                raise ValueError(f"rerun can swap only component groups ({', '.join(COMPONENT_GROUPS)}); got '{key}'")
            path = CONF_DIR / key / f"{value}.yaml"
            if not path.exists():
                valid = sorted(p.stem for p in path.parent.glob("*.yaml"))
                raise ValueError(f"{key}={value} is not an option; valid: {', '.join(valid)}")
            OmegaConf.update(cfg, key.replace("/", "."), OmegaConf.load(path), merge=False)
        else:
            OmegaConf.update(
                cfg, key.lstrip("+"), OmegaConf.from_dotlist([f"x={value}"]).x, force_add=key.startswith("+")
            )
    resized = OmegaConf.select(cfg, "model.d_model") != width and isinstance(width, int) and width > 0
    if resized and "model.init_std" not in given and cfg.model.get("init_std") == small_init_std(width):
        cfg.model.init_std = None  # resolved again for the new width
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Rerun RUN_ID from its recorded config; returns the process exit code."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipeline.run.runner import run
    from pipeline.tracking import resolve_tracking_uri
    from pipeline.tracking.schema import Artifact, Tag
    from pipeline.tracking.uri import StoreError, check_store, redact, sqlite_path

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        print("usage: python -m pipeline.rerun RUN_ID [key=value ...]", file=sys.stderr)
        return 2
    run_id, overrides = argv[0], argv[1:]
    # The store holding the run: a `tracking.uri=` override, else MLFLOW_TRACKING_URI, else
    # ./mlflow.db. The rerun is logged to that same store, beside its original.
    given = [o.partition("=")[2] for o in overrides if o.startswith("tracking.uri=")]
    uri = resolve_tracking_uri(given[-1] if given else None)
    path = sqlite_path(uri)
    try:
        check_store(uri, "MLflow store")
        if path is not None and not path.exists():  # reading must not create an empty store
            raise StoreError(f"no MLflow store at {path}; run from the folder holding mlflow.db, or set tracking.uri")
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        client = MlflowClient(uri)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = OmegaConf.load(client.download_artifacts(run_id, Artifact.CONFIG, tmp))
    except MlflowException as e:
        print(f"error: cannot read run {run_id} in {redact(uri)}: {e.message.splitlines()[0]}", file=sys.stderr)
        return 2
    OmegaConf.set_struct(cfg, True)
    try:
        cfg = apply_overrides(cfg, overrides)
        spec = validate_config(cfg)
    except (*INVALID_CONFIG, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_dir = Path("outputs") / cfg.study / f"rerun-{run_id[:8]}-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    run(cfg, spec, overrides, out_dir, extra_tags={Tag.RERUN_OF: run_id}, tracking_uri=uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
