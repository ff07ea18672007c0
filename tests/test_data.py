"""Data layer: document splits, the token cache, every source through `datasets`, batches."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import DataConfig, DataConfigError, LMDataModule, load_token_splits, ngram, overlap, sources, splits
from pipeline.data.cache import cache_key, cached_meta
from pipeline.data.config import SPLITS
from pipeline.data.datamodule import RandomWindows
from pipeline.data.embedded import documents as embedded_documents
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
    corpus = [d["text"] for d in embedded_documents()]
    kept = docs["train"] + docs["val"] + docs["test"]
    assert set(kept) <= set(corpus) and len(kept) + splits.dropped == len(corpus)
    # What was dropped is a copy: at least 80% of its windows are in the documents that were kept.
    dropped = [t.encode() for t in set(corpus) - set(kept)]
    assert 0 < len(dropped) < 0.1 * len(corpus)
    assert overlap.contained_fraction(dropped, [t.encode() for t in kept]) >= 0.8
    assert splits.split_by == "document"
    assert {s: len(d) for s, d in docs.items()} == splits.documents


def test_embedded_held_out_text_is_not_in_train(embedded):
    """Issue 10: 43.7% of test's 64-byte windows were in train (a topic repeated inside a larger one)."""
    _, splits = embedded
    docs = {s: [d.encode() for d in documents_of(getattr(splits, s))] for s in SPLITS}
    for held_out in ("val", "test"):
        shared = overlap.contained_fraction(docs[held_out], docs["train"])
        assert shared < 0.01, f"{held_out}: {shared:.1%} of its 64-byte windows are in train"
        assert splits.overlap[f"{held_out}_train"] == pytest.approx(shared)


def test_embedded_train_split_is_big_enough_for_the_cpu_budget(embedded):
    """A CPU-budget trial (~600 steps x 16 x 64 tokens) must read at most half an epoch."""
    _, splits = embedded
    assert len(splits.train) >= 2 * 600 * 16 * 64
    assert splits.tokens == {s: len(getattr(splits, s)) for s in SPLITS}


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


def small_corpus(folder: Path, **settings) -> DataConfig:
    """Twelve text files: the cache tests need a corpus, not the embedded one's build time."""
    folder.mkdir()
    write_docs(folder, 12)
    files = sorted(str(p) for p in folder.glob("*.txt"))
    return DataConfig.from_dict({"source": "text_files", "files": files, **settings})


def test_cache_miss_then_hit_skips_tokenization(tmp_path, monkeypatch):
    calls = []
    encode = ByteTokenizer.encode
    monkeypatch.setattr(ByteTokenizer, "encode", lambda self, text: calls.append(1) or encode(self, text))
    cfg = small_corpus(tmp_path / "docs", cache_dir=str(tmp_path / "cache"))
    first = load_token_splits(cfg)
    n_calls = len(calls)
    assert not first.cache_hit and n_calls > 0
    assert first.cache_path.parent == tmp_path / "cache" and first.cache_path.exists()
    second = load_token_splits(cfg)
    assert second.cache_hit and len(calls) == n_calls  # the tokenizer was not called again
    assert second.cache_path == first.cache_path
    for s in SPLITS:
        np.testing.assert_array_equal(getattr(second, s), getattr(first, s))
    assert second.documents == first.documents and second.vocab_size == first.vocab_size
    assert second.floors == first.floors and second.overlap == first.overlap
    assert [p.name for p in (tmp_path / "cache").glob("*.*")] == [first.cache_path.name]  # no temp files left


def test_default_cache_dir_is_under_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    splits = load_token_splits(small_corpus(tmp_path / "docs"))
    assert splits.cache_path.parent == tmp_path / ".cache" / "tokens"


def test_failed_cache_write_leaves_no_file(tmp_path, monkeypatch):
    def broken_savez(f, **arrays):
        f.write(b"half a file")
        raise OSError("disk full")

    cfg = small_corpus(tmp_path / "docs")
    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        load_token_splits(cfg, tmp_path / "cache")
    assert list((tmp_path / "cache").glob("*.npz")) == [] and list((tmp_path / "cache").glob("*.tmp")) == []


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

    texts = [f"Article {i}: " + sentences(200 + i, 5 + i) for i in range(20)]
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
    texts = [f"Entry {i}. " + sentences(300 + i, 3 + i) for i in range(15)]
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = DataConfig.from_dict({"source": "hf", "name": str(tmp_path / "ds")})
    splits = load_token_splits(cfg, tmp_path / "cache")
    docs = [d for s in SPLITS for d in documents_of(getattr(splits, s))]
    assert sorted(docs) == sorted(texts)


# --------------------------------------------------------------------------- near-duplicates and overlap


def sentences(seed: int, n: int) -> str:
    """n distinct made-up sentences: no 64-byte window repeats across seeds."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "lambda", "zeta"]
    return " ".join(" ".join(rng.choice(words, 12)) + f" {seed}-{i}." for i in range(n))


def test_window_hashes_match_equal_windows_and_sampling_keeps_shared_ones():
    a = sentences(0, 20).encode()
    b = b"prefix that is new. " + a[100:400] + b" and a new ending."
    ha, _ = overlap.window_hashes([a])
    hb, _ = overlap.window_hashes([b])
    assert len(ha) == len(a) - overlap.WINDOW + 1  # every window, none across the text's end
    assert ha[100] == hb[len(b"prefix that is new. ")]  # the same 64 bytes, the same hash
    assert len(set(ha.tolist())) == len(ha)  # distinct windows of natural text do not collide
    shared = set(ha.tolist()) & set(hb.tolist())
    assert set(ha[100 : 400 - overlap.WINDOW + 1].tolist()) <= shared  # the copied 300 bytes' windows
    assert len(shared) <= 300 - overlap.WINDOW + 1 + 2  # (+ a window reaching a byte that matches by chance)
    sa, sb = overlap.window_hashes([a], every=8)[0], overlap.window_hashes([b], every=8)[0]
    assert set(sa.tolist()) & set(sb.tolist()) == {h for h in shared if h % 8 == 0}  # kept in both or neither
    _, owner = overlap.window_hashes([a[:10], a, a[:10]])  # short texts have no window; owners index texts
    assert set(owner.tolist()) == {1}


def test_near_duplicates_drop_copies_and_group_partial_overlaps():
    big, other, lone = sentences(1, 60), sentences(2, 40), sentences(3, 30)
    copy = big[200:1200]  # a topic repeated inside a larger page
    quotes = sentences(4, 30) + big[3000:3200]  # quotes a few lines of the big one
    texts = [t.encode() for t in (copy, big, quotes, other, lone)]
    keep, group = overlap.near_duplicates(texts)
    assert keep.tolist() == [False, True, True, True, True]
    assert group[2] == group[1] and len({group[1], group[3], group[4]}) == 3


def test_text_files_near_duplicates_stay_in_one_split(tmp_path):
    """Every source is de-duplicated: files quoting each other land in the same split."""
    files = []
    for i in range(12):
        text = sentences(10 + i, 25) + " " + sentences(30 + i // 2, 8)  # files 2k and 2k+1 share a passage
        files.append(tmp_path / f"f{i}.txt")
        files[-1].write_text(text)
    cfg = DataConfig.from_dict({"source": "text_files", "files": [str(f) for f in files]})
    splits = load_token_splits(cfg, tmp_path / "cache")
    assert splits.split_by == "document"
    where = {d: s for s in SPLITS for d in documents_of(getattr(splits, s))}
    texts = [f.read_text() for f in files]
    assert all(where[texts[2 * k]] == where[texts[2 * k + 1]] for k in range(6))
    assert splits.overlap == {"val_train": 0.0, "test_train": 0.0}


# --------------------------------------------------------------------------- n-gram floors


def second_order_chain(n_states: int, seed: int):
    """A random 2nd-order Markov chain: P[a, b, c] = P(x_t = c | x_t-2 = a, x_t-1 = b), and a sampler."""
    rng = np.random.default_rng(seed)
    P = rng.dirichlet(np.full(n_states, 0.5), size=(n_states, n_states))

    def sample(n: int) -> np.ndarray:
        cum, u, x = P.cumsum(-1), rng.random(n), [0, 1]
        for t in range(2, n):
            x.append(int(np.searchsorted(cum[x[-2], x[-1]], u[t])))
        return np.array(x, dtype=np.uint8)

    return P, sample


def test_kneser_ney_floors_reach_the_chains_conditional_entropies():
    """With ample counts, the n-gram loss is the entropy of a token given its n-1 predecessors:
    H(X) for n=1, H(X_t | X_t-1) for n=2, the chain's rate H(X_t | X_t-2, X_t-1) for n=3 and 4."""
    S = 4
    P, sample = second_order_chain(S, seed=0)
    pairs = np.zeros((S * S, S * S))  # the chain on pairs (a, b) -> (b, c); its stationary law
    for a, b, c in np.ndindex(S, S, S):
        pairs[a * S + b, b * S + c] = P[a, b, c]
    w, v = np.linalg.eig(pairs.T)
    pi = np.real(v[:, np.argmin(abs(w - 1))]).reshape(S, S)
    pi /= pi.sum()
    h3 = -(pi[:, :, None] * P * np.log(P)).sum()
    joint = np.einsum("ab,abc->bc", pi, P)  # P(x_t-1 = b, x_t = c)
    h2 = -(joint * np.log(joint / joint.sum(1, keepdims=True))).sum()
    h1 = -(pi.sum(0) * np.log(pi.sum(0))).sum()
    floors = ngram.kneser_ney_floors(sample(150_000), sample(40_000), vocab_size=256)
    assert floors[1] == pytest.approx(h1, abs=0.02)
    assert floors[2] == pytest.approx(h2, abs=0.02)
    assert floors[3] == pytest.approx(h3, abs=0.02) and floors[4] == pytest.approx(h3, abs=0.03)
    assert h1 > h2 + 0.05 > h3 + 0.1  # the chain was drawn so that every order matters


def test_kneser_ney_on_a_cycle_knows_the_next_byte_and_gives_unseen_bytes_a_finite_cost():
    """Ten bytes in a fixed cycle: the unigram loss is log(10); from one byte of context on the
    next byte is certain, up to the discounted mass. An unseen byte costs more than log(V)."""
    text = np.frombuffer(b"0123456789" * 300, np.uint8)
    floors = ngram.kneser_ney_floors(text, text[:400], vocab_size=256)
    assert floors[1] == pytest.approx(np.log(10), abs=0.01)
    assert all(floors[n] < 0.01 for n in (2, 3, 4))
    unseen = ngram.kneser_ney_floors(text, np.full(50, ord("Z"), np.uint8), vocab_size=256)
    assert all(np.log(256) < v < 30 for v in unseen.values())


def test_floors_and_overlap_are_cached_with_the_tokens(embedded, monkeypatch):
    cfg, first = embedded
    assert set(first.floors) == {"ngram1", "ngram2", "ngram3", "ngram4"}
    assert first.floors["ngram1"] > first.floors["ngram2"] > first.floors["ngram3"] > first.floors["ngram4"] > 1.0
    monkeypatch.setattr(ngram, "kneser_ney_floors", lambda *a, **k: pytest.fail("floors computed on a cache hit"))
    again = load_token_splits(cfg, first.cache_path.parent)
    assert again.cache_hit and again.floors == first.floors and again.overlap == first.overlap
    meta = cached_meta(cfg, first.cache_path.parent)
    assert meta["tokens"]["train"] == len(first.train) and meta["floors"] == first.floors
    assert cached_meta(DataConfig.from_dict({"split_seed": 99}), first.cache_path.parent) is None


# --------------------------------------------------------------------------- sources registry


def test_every_source_owns_its_settings_identity_and_loading():
    assert set(sources.SOURCES) >= {"embedded", "text_files", "hf"}
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    owned = [k for src in sources.SOURCES.values() for k in src.settings]
    assert set(owned) <= fields and len(owned) == len(set(owned))  # one owner per setting
    for name, src in sources.SOURCES.items():
        assert src.name == name
        assert type(src).load is not sources.Source.load and type(src).identity is not sources.Source.identity


def test_embedded_identity_is_cheap_and_stable():
    from pipeline.data import embedded

    assert embedded.identity() == embedded.identity()
    assert cache_key(DataConfig()) == cache_key(DataConfig())


def write_wikitext_like(folder: Path, n_rows: int = 400) -> list[str]:
    """A folder laid out like the hub's Salesforce/wikitext repo: README configs + parquet per split."""
    import datasets

    rows = [f" = Title {i // 20} = \n" if i % 20 == 0 else sentences(100 + i, 3) + " \n" for i in range(n_rows)]
    rows = [r if i % 7 else "" for i, r in enumerate(rows)]  # blank lines, as in WikiText
    (folder / "wikitext-103-raw-v1").mkdir(parents=True)
    for split, part in (("train", rows), ("validation", rows[:20]), ("test", rows[20:40])):
        datasets.Dataset.from_dict({"text": part}).to_parquet(
            str(folder / f"wikitext-103-raw-v1/{split}-00000-of-00001.parquet")
        )
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: wikitext-103-raw-v1\n  data_files:\n"
        + "".join(f"  - split: {s}\n    path: wikitext-103-raw-v1/{s}-*\n" for s in ("train", "validation", "test"))
        + "---\n"
    )
    return rows


def test_wikitext_config_reads_a_local_copy_through_load_dataset(tmp_path):
    """conf/data/wikitext103.yaml with data.name pointing at a copy of the hub repo's files."""
    from omegaconf import OmegaConf

    from pipeline import CONF_DIR

    conf = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "data" / "wikitext103.yaml"))
    assert (conf["name"], conf["config"]) == ("Salesforce/wikitext", "wikitext-103-raw-v1")
    rows = write_wikitext_like(tmp_path / "wikitext")
    for key in ("batch_size", "val_batches", "max_epochs"):  # read by the training code
        conf.pop(key)
    cfg = DataConfig.from_dict({**conf, "name": str(tmp_path / "wikitext")})
    splits = load_token_splits(cfg, tmp_path / "cache")
    docs = [d for s in SPLITS for d in documents_of(getattr(splits, s))]
    assert sorted(docs) == sorted(r for r in rows if r)  # the train split's rows, blank ones left out
    assert splits.overlap["test_train"] < 0.01


def test_unreachable_hub_names_what_was_tried_and_the_local_fix(tmp_path):
    cfg = DataConfig.from_dict({"source": "hf", "name": "Salesforce/wikitext", "config": "wikitext-103-raw-v1"})
    with pytest.raises(DataConfigError) as e:
        load_token_splits(cfg, tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert "load_dataset('Salesforce/wikitext', 'wikitext-103-raw-v1', split='train')" in msg
    assert "save_to_disk" in msg and "data.name=DIR" in msg
    assert list(tmp_path.glob("*.npz")) == []


# --------------------------------------------------------------------------- validation


def test_missing_file_is_named_before_any_work(tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("data was read before the config was validated")

    monkeypatch.setattr(sources.TextFiles, "load", no_work)
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
        ({"split": "validation"}, "data.split is only read with data.source=hf"),
        (
            {"source": "hf", "name": "org/x", "sample_by": "paragraph"},
            "data.sample_by is only read with data.source=text",
        ),
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
