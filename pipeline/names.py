"""Names that become folders: `study` is outputs/<study>/, multirun/<study>/, reports/<study>/.

Torch-free (the report imports it). One plain path component, so a name cannot climb out of
its folder with ../ or name an absolute path.
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf import OmegaConf

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=,+-]*")


class BadName(ValueError):
    """A name that would not stay inside its folder."""


def check_name(key: str, value: Any) -> str:
    name = str(value)
    if not _NAME.fullmatch(name) or ".." in name:
        raise BadName(
            f"{key}={name!r} is not a valid name: it names folders (outputs/, reports/), so use letters, "
            "digits and _.=,+- (no '/', no '..')"
        )
    return name


# Hydra's output folders are `outputs/${pipeline.folder:${study}}/...` (conf/train.yaml): the
# name is checked when Hydra first resolves them, before it creates any folder.
OmegaConf.register_new_resolver("pipeline.folder", lambda v: check_name("study", v), replace=True)
