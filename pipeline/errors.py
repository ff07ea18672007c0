"""Bad input, said in one line: which exceptions are the user's input, and how they are printed.

Every command turns these into `error: <one line>` on stderr and exit code 2, before any
training and before any MLflow run exists; anything else is a bug or a failure of the run and
keeps its traceback. docs/errors.md lists each case with what it prints (tested row by row).
"""

from __future__ import annotations

import re

import yaml
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import OmegaConfBaseException

from hydra_plugins.pipeline_optuna_sweeper._errors import InvalidSweepError, LauncherSettingError, SearchSpaceError
from pipeline.run.spec import INVALID_CONFIG
from pipeline.tracking.uri import StoreError

# The user's input (config, overrides, study files, corpora, stores); SweepFailedError (trials
# failed after running) is a HydraException too, but a result: callers test for it first.
USAGE_ERRORS: tuple[type[BaseException], ...] = (
    *INVALID_CONFIG,
    StoreError,
    SearchSpaceError,
    LauncherSettingError,
    InvalidSweepError,
    HydraException,
    OmegaConfBaseException,
    yaml.YAMLError,  # a config or study file that is not (safe) YAML
)

_OURS = (*INVALID_CONFIG, StoreError, SearchSpaceError, LauncherSettingError, InvalidSweepError)

# Lines of Hydra's and OmegaConf's messages that point at internals, not at the user's input.
_NOISE = (
    "full_key:",
    "object_type=",
    "reference_type=",
    "Set the environment variable HYDRA_FULL_ERROR",
    "See https://hydra.cc",
)


def one_line(e: BaseException) -> str:
    """The message of `e` on one line: Hydra's multi-line messages (option lists, the config
    search path, pointers to its docs) become `...; valid: a, b, c`."""
    cause = e.__cause__ or e.__context__
    while cause is not None:  # our own error inside Hydra's wrapping (a resolver, a sweeper setting)
        if isinstance(cause, _OURS):
            return one_line(cause)
        cause = cause.__cause__ or cause.__context__
    if isinstance(e, MissingConfigException) and e.options and e.missing_cfg_file:
        group, _, name = e.missing_cfg_file.rpartition("/")  # model/pos_enc/fourier
        if group:
            return f"{group}={name} is not an option; valid: {', '.join(e.options)}"
    if isinstance(e, yaml.YAMLError):  # e.g. a Python tag: the safe loader has no constructor for it
        return "a config file is not valid safe YAML: " + re.sub(r"\s+", " ", str(e))
    if isinstance(e, OverrideParseException):
        return f"override '{e.override}' is not valid Hydra syntax ({str(e).splitlines()[0]}); see docs/sweeps.md"
    text = str(e)
    cause = e.__cause__
    if isinstance(cause, OmegaConfBaseException) and str(cause) not in text:
        text = f"{text}\n{cause}"
    typo = re.search(r"Could not override '([^']+)'.*Key '[^']+' is not in struct", text, re.S)
    if typo:
        key = typo.group(1)
        return f"{key} is not a config key; check the spelling (`--cfg job` lists the keys) or add one with +{key}=..."
    parts: list[str] = []
    options: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("Config search path"):
            break
        if not line or line.startswith(_NOISE):
            continue
        if raw.startswith("\t") and parts and parts[-1].startswith("Available options"):
            options.append(line)
            continue
        parts.append(line)
    if options:
        parts = [p for p in parts if not p.startswith("Available options")] + [f"valid: {', '.join(options)}"]
    joined = "; ".join(p.rstrip(".;") for p in parts) or type(e).__name__
    return re.sub(r"\s+", " ", joined)
