"""Data layer: document splits, the token cache, every source through `datasets`, batches."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import DataConfig, DataConfigError, LMDataModule, load_token_splits, splits
from pipeline.data.cache import cache_key
from pipeline.data.config import SPLITS
from pipeline.data.datamodule import RandomWindows
from pipeline.data.sources import embedded_documents
from pipeline.data.tokenizers import ByteTokenizer

CPU_CONTEXT = 64  # the CPU budget's training context; extrapolation evals go to 8x


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may reach the hub: both env and the flags `datasets` read at import time."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    cfg = DataConfig.from_dict({"source": "embedded"})
    return cfg, load_token_splits(cfg, tmp_path_factory.mktemp("tokens"))


def documents_of(tokens: np.ndarray) -> list[str]:
    """Split a byte-token array back into its documents (each ends with the NUL end-of-document id)."""
    text = ByteTokenizer().decode(tokens.tolist())
    assert text.endswith("\x00")
    return text[:-1].split("\x00")


# --------------------------------------------------------------------------- splits


def test_embedded_splits_are_disjoint_by_document_and_cover_the_corpus(embedded):
    _, splits = embedded
    docs = {s: documents_of(getattr(splits, s)) for s in SPLITS}
    sets = {s: set(d) for s, d in docs.items()}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    corpus = embedded_documents()["text"]
    assert sorted(docs["train"] + docs["val"] + docs["test"]) == sorted(corpus)
    assert splits.split_by == "document"
    assert {s: len(d) for s, d in docs.items()} == splits.documents


def test_embedded_splits_are_deterministic_and_seeded(embedded, tmp_path):
    cfg, splits = embedded
    again = load_token_splits(cfg, tmp_path / "a")  # fresh cache dir: tokenized again
    assert not again.cache_hit
    for s in SPLITS:
        np.testing.assert_array_equal(getattr(again, s), getattr(splits, s))
    other = load_token_splits(DataConfig.from_dict({"split_seed": 1}), tmp_path / "b")
    assert set(documents_of(other.test)) != set(documents_of(splits.test))


def test_embedded_held_out_splits_are_big_enough(embedded):
    cfg, splits = embedded
    assert splits.vocab_size == 256 and splits.train.dtype == np.uint8
    # Extrapolation at 8x the CPU context over at least 4 windows.
    assert len(splits.test) >= 8 * CPU_CONTEXT * 4
    total = sum(len(getattr(splits, s)) for s in SPLITS)
    assert len(splits.test) >= cfg.test_fraction * total and len(splits.val) >= cfg.val_fraction * total


# --------------------------------------------------------------------------- cache


def test_cache_miss_then_hit_skips_tokenization(tmp_path, monkeypatch):
    calls = []
    encode = ByteTokenizer.encode
    monkeypatch.setattr(ByteTokenizer, "encode", lambda self, text: calls.append(1) or encode(self, text))
    cfg = DataConfig.from_dict({"cache_dir": str(tmp_path)})
    first = load_token_splits(cfg)
    n_calls = len(calls)
    assert not first.cache_hit and n_calls > 0
    assert first.cache_path.parent == tmp_path and first.cache_path.exists()
    second = load_token_splits(cfg)
    assert second.cache_hit and len(calls) == n_calls  # the tokenizer was not called again
    assert second.cache_path == first.cache_path
    for s in SPLITS:
        np.testing.assert_array_equal(getattr(second, s), getattr(first, s))
    assert second.documents == first.documents and second.vocab_size == first.vocab_size
    assert [p.name for p in tmp_path.iterdir()] == [first.cache_path.name]  # no temp files left


def test_default_cache_dir_is_under_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    splits = load_token_splits(DataConfig())
    assert splits.cache_path.parent == tmp_path / ".cache" / "tokens"


def test_failed_cache_write_leaves_no_file(tmp_path, monkeypatch):
    def broken_savez(f, **arrays):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        load_token_splits(DataConfig(), tmp_path)
    assert list(tmp_path.glob("*.npz")) == [] and list(tmp_path.glob("*.tmp")) == []


@pytest.mark.parametrize(
    "change",
    [{"tokenizer": "gpt2"}, {"val_fraction": 0.2}, {"test_fraction": 0.05}, {"split_seed": 7}],
    ids=lambda c: next(iter(c)),
)
def test_cache_key_changes_with_tokenizer_split_and_seed(change):
    assert cache_key(DataConfig.from_dict(change)) != cache_key(DataConfig())


def test_cache_key_follows_file_contents(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one two three")
    cfg = DataConfig.from_dict({"source": "text_files", "files": [str(f)]})
    before = cache_key(cfg)
    assert cache_key(cfg) == before
    f.write_text("one two three four")
    assert cache_key(cfg) != before


# --------------------------------------------------------------------------- sources


def write_docs(folder: Path, n: int) -> list[str]:
    texts = [f"Document {i}. " + f"The quick brown fox {i} jumps over the lazy dog. " * (20 + 7 * i) for i in range(n)]
    for i, t in enumerate(texts):
        (folder / f"doc{i}.txt").write_text(t)
    return texts


def test_text_files_two_files(tmp_path, caplog):
    texts = write_docs(tmp_path, 2)
    cfg = DataConfig.from_dict(
        {"source": "text_files", "files": [str(tmp_path / "doc0.txt"), str(tmp_path / "doc1.txt")]}
    )
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        splits = load_token_splits(cfg, tmp_path / "cache")
    # Two documents cannot fill three splits: the stream is cut contiguously, and says so.
    assert splits.split_by == "contiguous" and "contiguously" in caplog.text
    stream = np.concatenate([splits.train, splits.val, splits.test])
    assert sorted(documents_of(stream)) == sorted(texts)
    assert len(splits.val) > 0 and len(splits.test) > 0


def test_text_files_split_by_document(tmp_path):
    texts = write_docs(tmp_path, 12)
    cfg = DataConfig.from_dict({"source": "text_files", "files": sorted(str(p) for p in tmp_path.glob("*.txt"))})
    splits = load_token_splits(cfg, tmp_path / "cache")
    assert splits.split_by == "document"
    docs = {s: documents_of(getattr(splits, s)) for s in SPLITS}
    assert sorted(docs["train"] + docs["val"] + docs["test"]) == sorted(texts)
    assert all(docs[s] for s in SPLITS)


def test_hf_local_save_to_disk_dir(tmp_path):
    import datasets

    texts = [f"Article {i}: " + "a sentence about nothing in particular. " * (10 + i) for i in range(20)]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": texts, "id": list(range(20))})}).save_to_disk(
        str(tmp_path / "ds")
    )
    cfg = DataConfig.from_dict({"source": "hf", "name": str(tmp_path / "ds"), "text_field": "body"})
    splits = load_token_splits(cfg, tmp_path / "cache")
    docs = [d for s in SPLITS for d in documents_of(getattr(splits, s))]
    assert splits.split_by == "document" and sorted(docs) == sorted(texts)

    bad = DataConfig.from_dict({"source": "hf", "name": str(tmp_path / "ds"), "text_field": "text"})
    with pytest.raises(DataConfigError, match="text_field='text'.*columns: body, id"):
        load_token_splits(bad, tmp_path / "cache")


def test_hf_local_data_files_dir_through_load_dataset(tmp_path):
    texts = [f"Entry {i}. " + "Some words to read. " * (5 + i) for i in range(15)]
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = DataConfig.from_dict({"source": "hf", "name": str(tmp_path / "ds")})
    splits = load_token_splits(cfg, tmp_path / "cache")
    docs = [d for s in SPLITS for d in documents_of(getattr(splits, s))]
    assert sorted(docs) == sorted(texts)


# --------------------------------------------------------------------------- validation


def test_missing_file_is_named_before_any_work(tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("data was read before the config was validated")

    monkeypatch.setattr(splits, "load_documents", no_work)
    monkeypatch.setattr(splits, "build_tokenizer", no_work)
    (tmp_path / "real.txt").write_text("text")
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(DataConfigError, match="nope.txt"):
        DataConfig.from_dict({"source": "text_files", "files": [str(tmp_path / "real.txt"), missing]})


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"source": "wiki"}, "data.source='wiki'.*valid: embedded, text_files, hf"),
        ({"sorce": "hf"}, "data.sorce is not a setting of data; valid: .*did you mean source"),
        ({"val_fraction": 1.5}, "data.val_fraction=1.5"),
        ({"test_fraction": 0}, "data.test_fraction=0"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "leaves no training text"),
        ({"source": "text_files"}, "data.files is empty"),
        ({"source": "hf"}, "data.name is required"),
        ({"source": "hf", "name": "./no/such/dir"}, "'./no/such/dir' does not exist"),
        ({"files": ["a.txt"]}, "data.files is only read with data.source=text_files"),
        ({"source": "text_files", "files": ["."], "sample_by": "line"}, "is not a file"),
        ({"split_seed": 1.5}, "data.split_seed=1.5"),
    ],
)
def test_bad_configs_are_rejected_with_the_field_named(bad, match):
    with pytest.raises(DataConfigError, match=match):
        DataConfig.from_dict(bad)


# --------------------------------------------------------------------------- batches


@pytest.fixture
def module_factory(embedded):
    cfg, splits = embedded
    cfg = DataConfig.from_dict({"cache_dir": str(splits.cache_path.parent)})

    def make(seed: int = 0, **kw) -> LMDataModule:
        dm = LMDataModule(cfg, context_length=CPU_CONTEXT, batch_size=8, seed=seed, **kw)
        dm.setup("fit")
        assert dm.splits.cache_hit and dm.vocab_size == 256
        return dm

    return make


def first_batches(dm: LMDataModule, n: int = 3) -> list[torch.Tensor]:
    it = iter(dm.train_dataloader())
    return [next(it)[0] for _ in range(n)]


def test_same_seed_same_batches_other_seed_other_batches(module_factory):
    a, b, c = first_batches(module_factory(0)), first_batches(module_factory(0)), first_batches(module_factory(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, y) for x, y in zip(a, c))
    dm = module_factory(0)  # a second dataloader of the same module restarts the same stream
    first_batches(dm)
    assert all(torch.equal(x, y) for x, y in zip(a, first_batches(dm)))


def test_train_batches_are_windows_with_targets_shifted_by_one():
    tokens = np.arange(10_000, dtype=np.uint16)  # token value = position, so windows are readable
    x, y = next(iter(RandomWindows(tokens, context_length=16, batch_size=4, seed=0)))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.long
    assert torch.equal(y, x + 1)  # y is x shifted by one token
    assert torch.equal(x - x[:, :1], torch.arange(16).expand(4, 16))  # contiguous windows of the split
    assert len(set(x[:, 0].tolist())) == 4


def test_val_batches_are_fixed_and_non_overlapping(module_factory):
    dm = module_factory(0, val_batches=3)
    first, second = list(dm.val_dataloader()), list(module_factory(5, val_batches=3).val_dataloader())
    assert len(first) == 3 and all(x.shape == (8, CPU_CONTEXT) for x, _ in first)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    x = torch.cat([b[0] for b in first])
    y = torch.cat([b[1] for b in first])
    assert torch.equal(x[:, 1:], y[:, :-1])
    # Each x window is a distinct, non-overlapping slice of the val split.
    val = dm.splits.val.tobytes()  # byte tokens: find each window with a substring search
    starts = [val.find(bytes(row.tolist())) for row in x]
    assert -1 not in starts
    starts.sort()
    assert all(b - a >= CPU_CONTEXT for a, b in zip(starts, starts[1:]))


def test_test_tokens_are_the_held_out_split(module_factory):
    dm = module_factory()
    t = dm.test_tokens()
    assert t.dtype == torch.long and t.ndim == 1
    assert torch.equal(t, torch.from_numpy(dm.splits.test.astype(np.int64)))


def test_transformers_tokenizer_from_a_local_directory(tmp_path):
    """data.tokenizer takes a transformers tokenizer; a local one tests the path offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "document the quick brown fox jumps over lazy dog".split()
    vocab = {"[UNK]": 0, "[EOS]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(
        str(tmp_path / "tok")
    )
    write_docs(tmp_path, 12)
    files = sorted(str(p) for p in tmp_path.glob("*.txt"))
    cfg = DataConfig.from_dict({"source": "text_files", "files": files, "tokenizer": str(tmp_path / "tok")})
    assert cache_key(cfg) != cache_key(DataConfig.from_dict({"source": "text_files", "files": files}))
    splits = load_token_splits(cfg, tmp_path / "cache")
    assert splits.vocab_size == len(vocab) and splits.eos_id == 1 and splits.train.dtype == np.uint16
    stream = np.concatenate([getattr(splits, s) for s in SPLITS])
    assert (stream == 1).sum() == len(files)  # one end-of-document id per file
    assert set(np.unique(stream)) <= set(range(len(vocab))) and 0 in stream  # digits and "." are unknown
