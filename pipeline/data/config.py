"""DataConfig: which corpus, how it is split and tokenized; validated before any data is read."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.checks import check_keys, check_types

SPLITS = ("train", "val", "test")


class DataConfigError(ValueError):
    """An invalid data configuration; the message names the field, the value and what is valid."""


@dataclass(frozen=True)
class DataConfig:
    source: str = "embedded"  # a name in pipeline.data.sources.SOURCES: embedded | text_files | hf
    files: tuple[str, ...] = ()  # text_files: paths, each file one document (see sample_by)
    sample_by: str = "document"  # text_files: document | paragraph
    name: str | None = None  # hf: hub id, or a local dataset directory
    config: str | None = None  # hf: dataset configuration name
    split: str = "train"  # hf: which split of the dataset to read (we re-split it by document)
    text_field: str = "text"  # hf: column holding the text
    val_fraction: float = 0.1  # share of tokens held out for validation
    test_fraction: float = 0.1  # share of tokens held out for test (extrapolation evals)
    split_seed: int = 0  # seed of the document shuffle; kept apart from the training seed
    tokenizer: str = "byte"  # byte, or a transformers tokenizer name / local directory
    cache_dir: str | None = None  # None: .cache/tokens under the current working directory

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
        """A validated DataConfig; raises DataConfigError before any data is read."""
        check_keys("data", d, cls, DataConfigError)
        values = {k: v for k, v in d.items()}
        check_types("data", {k: v for k, v in values.items() if k != "files"}, cls, DataConfigError)
        files = values.get("files") or ()
        if isinstance(files, (str, os.PathLike)):
            files = (files,)
        values["files"] = tuple(str(f) for f in files)
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        from pipeline.data.sources import SOURCES, get_source  # sources import this module

        source = get_source(self.source)
        # Settings of one source given to another are a typo or a forgotten `data=...`: say so.
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for other in SOURCES.values():
            for key in other.settings:
                if key not in source.settings and getattr(self, key) != defaults[key]:
                    raise DataConfigError(
                        f"data.{key} is only read with data.source={other.name} (source is '{self.source}'); "
                        f"select it with data={other.name}"
                    )
        source.validate(self)
        for key in ("val_fraction", "test_fraction"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                raise DataConfigError(f"data.{key}={v!r} must be a number in (0, 1)")
        if self.val_fraction + self.test_fraction >= 1:
            raise DataConfigError(
                f"data.val_fraction + data.test_fraction = {self.val_fraction + self.test_fraction:g} "
                "leaves no training text; keep the sum below 1"
            )
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int):
            raise DataConfigError(f"data.split_seed={self.split_seed!r} must be an integer")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise DataConfigError(f"data.tokenizer={self.tokenizer!r} must be 'byte' or a transformers tokenizer name")
        if self.tokenizer != "byte" and _looks_like_path(self.tokenizer):
            if not Path(self.tokenizer).expanduser().exists():
                raise DataConfigError(f"data.tokenizer: local tokenizer directory '{self.tokenizer}' does not exist")


def _looks_like_path(name: str) -> bool:
    # Hub ids look like "org/name"; local paths are written absolute, relative with ./ or ../, or with ~.
    return name.startswith(("/", "./", "../", "~")) or Path(name).exists()
