"""Where documents come from: a registry of sources, each owning its settings, checks, cache
identity and loading, so no other module branches on `data.source`.

    @register
    class MySource(Source):
        name = "mine"                 # data.source=mine
        settings = ("name",)          # DataConfig fields only this source reads
        def validate(self, cfg): ...  # DataConfigError naming the field; reads no data
        def identity(self, cfg): ...  # what makes the corpus what it is (the token cache key)
        def load(self, cfg, cache_dir): ...   # a datasets.Dataset, one row per document
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.data.config import DataConfigError

if TYPE_CHECKING:
    import datasets

    from pipeline.data.config import DataConfig


class Source:
    name: ClassVar[str]
    settings: ClassVar[tuple[str, ...]] = ()  # DataConfig fields that only this source reads

    def validate(self, cfg: DataConfig) -> None:
        """Raise DataConfigError (field, value, fix) for a setting this source cannot use; reads no data."""

    def identity(self, cfg: DataConfig) -> dict[str, Any]:
        """What makes the corpus what it is, for the token cache key; cheap (reads no text)."""
        raise NotImplementedError

    def load(self, cfg: DataConfig, cache_dir: Path) -> datasets.Dataset:
        """The corpus as a `datasets.Dataset`, one row per document, text in `text_column(cfg)`."""
        raise NotImplementedError

    def text_column(self, cfg: DataConfig) -> str:
        return "text"


SOURCES: dict[str, Source] = {}


def register(cls: type[Source]) -> type[Source]:
    SOURCES[cls.name] = cls()
    return cls


def get_source(name: str) -> Source:
    if not isinstance(name, str) or name not in SOURCES:
        raise DataConfigError(f"data.source={name!r} is not a known source; valid: {', '.join(SOURCES)}")
    return SOURCES[name]


def _stat(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _looks_like_path(name: str) -> bool:
    # Hub ids look like "org/name"; local paths are written absolute, relative with ./ or ../, or with ~.
    return name.startswith(("/", "./", "../", "~")) or Path(name).exists()


@register
class Embedded(Source):
    """Prose that ships with CPython (pipeline.data.embedded): offline on every install."""

    name = "embedded"

    def identity(self, cfg: DataConfig) -> dict[str, Any]:
        from pipeline.data import embedded

        return {"source": self.name, **embedded.identity()}

    def load(self, cfg: DataConfig, cache_dir: Path) -> datasets.Dataset:
        from pipeline.data import embedded

        return embedded.embedded_dataset()


@register
class TextFiles(Source):
    """The user's text files through `datasets.load_dataset("text", ...)`."""

    name = "text_files"
    settings = ("files", "sample_by")
    SAMPLE_BY = ("document", "paragraph")  # one document per file, or per blank-line paragraph

    def validate(self, cfg: DataConfig) -> None:
        if not cfg.files:
            raise DataConfigError("data.files is empty; give data.files=[path,...] with data=text_files")
        for f in cfg.files:
            p = Path(f).expanduser()
            if not p.exists():
                raise DataConfigError(f"data.files: '{f}' does not exist")
            if not p.is_file():
                raise DataConfigError(f"data.files: '{f}' is not a file")
        if cfg.sample_by not in self.SAMPLE_BY:
            raise DataConfigError(f"data.sample_by='{cfg.sample_by}' is not valid; valid: {', '.join(self.SAMPLE_BY)}")

    def identity(self, cfg: DataConfig) -> dict[str, Any]:
        return {
            "source": self.name,
            "files": [_stat(Path(f).expanduser()) for f in cfg.files],
            "sample_by": cfg.sample_by,
        }

    def load(self, cfg: DataConfig, cache_dir: Path) -> datasets.Dataset:
        import datasets

        datasets.disable_progress_bars()  # a bar per load; the run logs what it read
        files = [str(Path(f).expanduser().resolve()) for f in cfg.files]
        try:
            return datasets.load_dataset(
                "text", data_files=files, sample_by=cfg.sample_by, split="train", cache_dir=str(cache_dir / "datasets")
            )
        except Exception as e:  # not UTF-8 text (a binary file), unreadable: name the cause
            cause = e.__cause__ or e
            raise DataConfigError(
                f"data.files {list(cfg.files)} could not be read as UTF-8 text: {type(cause).__name__}: "
                f"{str(cause).splitlines()[0] if str(cause) else ''}"
            ) from e


@register
class HF(Source):
    """`datasets.load_dataset(name, config, split=split)`: a hub id, or a local dataset directory
    (one written by `save_to_disk`, or a folder of data files, laid out as on the hub)."""

    name = "hf"
    settings = ("name", "config", "split", "text_field")

    def validate(self, cfg: DataConfig) -> None:
        if not cfg.name:
            raise DataConfigError("data.name is required with data=hf (a hub id or a local dataset directory)")
        if _looks_like_path(cfg.name) and not Path(cfg.name).expanduser().exists():
            raise DataConfigError(f"data.name: local dataset directory '{cfg.name}' does not exist")

    def identity(self, cfg: DataConfig) -> dict[str, Any]:
        ident: dict[str, Any] = {
            "source": self.name,
            "name": cfg.name,
            "config": cfg.config,
            "split": cfg.split,
            "text_field": cfg.text_field,
        }
        local = Path(cfg.name).expanduser()
        if local.exists():  # a local directory: its files, so edits invalidate the cache
            files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
            ident["files"] = [_stat(p) for p in files]
        return ident

    def text_column(self, cfg: DataConfig) -> str:
        return cfg.text_field

    def load(self, cfg: DataConfig, cache_dir: Path) -> datasets.Dataset:
        import datasets

        local = Path(cfg.name).expanduser()
        call = f"datasets.load_dataset({cfg.name!r}, {cfg.config!r}, split={cfg.split!r})"
        try:
            if local.is_dir() and ((local / "dataset_dict.json").exists() or (local / "state.json").exists()):
                call = f"datasets.load_from_disk({str(local)!r})"
                ds = datasets.load_from_disk(str(local))
                if isinstance(ds, datasets.DatasetDict):
                    if cfg.split not in ds:
                        raise DataConfigError(
                            f"data.split='{cfg.split}' is not in '{cfg.name}'; splits: {', '.join(ds)}"
                        )
                    ds = ds[cfg.split]
            elif local.exists():
                ds = datasets.load_dataset(
                    str(local), cfg.config, split=cfg.split, cache_dir=str(cache_dir / "datasets")
                )
            else:
                ds = datasets.load_dataset(cfg.name, cfg.config, split=cfg.split)
        except DataConfigError:
            raise
        except Exception as e:  # not found, offline, bad config or split: one line naming what failed
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            fix = (
                ""
                if local.exists()
                else "; without a network, save it once where there is one "
                "(`datasets.load_dataset(...).save_to_disk(DIR)`, or copy the hub repo's files) "
                "and set data.name=DIR"
            )
            raise DataConfigError(f"data.name='{cfg.name}': {call} failed ({reason}){fix}") from e
        if cfg.text_field not in ds.column_names:
            raise DataConfigError(
                f"data.text_field='{cfg.text_field}' is not a column of '{cfg.name}'; "
                f"columns: {', '.join(ds.column_names)}"
            )
        return ds
