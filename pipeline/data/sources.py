"""Where documents come from: the embedded corpus, the user's text files, or `datasets`."""

from __future__ import annotations

from pathlib import Path

from pipeline.data.config import DataConfig, DataConfigError


def embedded_documents() -> dict[str, list[str]]:
    """The embedded corpus: the language-reference topics that ship with CPython (`pydoc_data.topics`).

    Real English technical prose, present offline on every Python install. One document per
    topic, sorted by title; exact duplicates dropped so one text cannot land in two splits.
    """
    from pydoc_data.topics import topics

    titles, texts, seen = [], [], set()
    for title in sorted(topics):
        if topics[title] not in seen:
            seen.add(topics[title])
            titles.append(title)
            texts.append(topics[title])
    return {"title": titles, "text": texts}


def load_documents(cfg: DataConfig, cache_dir: Path):
    """The corpus as a `datasets.Dataset`, one row per document, text in column `text_column(cfg)`."""
    import datasets

    if cfg.source == "embedded":
        return datasets.Dataset.from_dict(embedded_documents())
    datasets.disable_progress_bars()  # a bar per load; the run logs what it read
    if cfg.source == "text_files":
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
    # hf: a directory written by `save_to_disk`, a directory of data files, or a hub id.
    local = Path(cfg.name).expanduser()
    try:
        if local.is_dir() and ((local / "dataset_dict.json").exists() or (local / "state.json").exists()):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if cfg.split not in ds:
                    raise DataConfigError(f"data.split='{cfg.split}' is not in '{cfg.name}'; splits: {', '.join(ds)}")
                ds = ds[cfg.split]
        elif local.exists():
            ds = datasets.load_dataset(str(local), cfg.config, split=cfg.split, cache_dir=str(cache_dir / "datasets"))
        else:
            ds = datasets.load_dataset(cfg.name, cfg.config, split=cfg.split)
    except DataConfigError:
        raise
    except Exception as e:  # not found, offline, bad config or split: one line naming what failed
        raise DataConfigError(
            f"data.name='{cfg.name}' (config={cfg.config}, split={cfg.split}) could not be loaded: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    if cfg.text_field not in ds.column_names:
        raise DataConfigError(
            f"data.text_field='{cfg.text_field}' is not a column of '{cfg.name}'; columns: {', '.join(ds.column_names)}"
        )
    return ds


def text_column(cfg: DataConfig) -> str:
    return cfg.text_field if cfg.source == "hf" else "text"
