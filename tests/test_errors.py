"""Every row of docs/errors.md: bad input exits 2 with one line, before compute, recording nothing.

The commands run in-process (`main(argv)`, the console scripts' entry point) in a scratch
folder, so the table's 35 cases take seconds, not minutes; tests/test_train.py runs some of
them through a real subprocess too.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline import report, rerun, train
from tests.helpers.cli import TINY

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"
OPTUNA = ["-m", "hydra/sweeper=optuna"]


def _write(name: str, data: bytes | str) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())

    return setup


def _store_with_an_experiment(d: Path) -> None:
    from mlflow import MlflowClient

    MlflowClient(f"sqlite:///{d / 'mlflow.db'}").create_experiment("other")


GARBLED = b"SQLite format 3\x00" + bytes(range(256)) * 64  # the magic, then no valid page

# case -> (command, argv ({d} is the scratch folder), setup, text the line must contain)
CASES: dict[str, tuple[Callable, list[str], Callable[[Path], None] | None, str]] = {
    "unknown_option": (train.main, ["model/pos_enc=fourier"], None, "model/pos_enc=fourier is not an option; valid:"),
    "unknown_group": (train.main, ["model/posenc=rope"], None, "model/posenc is not a config key"),
    "unknown_key": (train.main, ["modle=llama"], None, "modle is not a config key"),
    "unknown_study": (train.main, ["-m", "ablation=nosuch"], None, "ablation=nosuch is not an option; valid:"),
    "malformed_study": (
        train.main,
        ["-m", "--config-dir", "{d}/conf", "ablation=broken"],
        _write("conf/ablation/broken.yaml", "# @package _global_\nstudy: [unclosed\n"),
        "broken",
    ),
    "unsafe_yaml": (
        train.main,
        ["-m", "--config-dir", "{d}/conf", "ablation=evil"],
        _write(
            "conf/ablation/evil.yaml", "# @package _global_\nstudy: !!python/object/apply:os.system ['touch pwned']\n"
        ),
        "python/object/apply:os.system",
    ),
    "wrong_type": (train.main, ["model.d_model=abc"], None, "model.d_model='abc' must be a positive integer"),
    "wrong_type_steps": (train.main, ["trainer.max_steps=1.5"], None, "trainer.max_steps=1.5 is not valid"),
    "impossible_heads": (train.main, ["model.n_heads=3"], None, "is not divisible by model.n_heads=3"),
    "impossible_kv_heads": (train.main, ["model=llama", "model.attention.n_kv_heads=3"], None, "n_kv_heads=3"),
    "bad_sweep_syntax": (train.main, ["-m", "model/pos_enc=choice(rope"], None, "is not valid Hydra syntax"),
    "bad_sweeper_setting": (
        train.main,
        [*OPTUNA, "hydra.sweeper.sampler=nosuch", "seed=0,1"],
        None,
        "hydra.sweeper.sampler='nosuch' is not known",
    ),
    "bad_heartbeat": (
        train.main,
        [*OPTUNA, "hydra.sweeper.grace_period=5", "seed=0,1"],
        None,
        "hydra.sweeper.grace_period=5 is not valid; use a number of seconds above heartbeat_interval (10)",
    ),
    "bad_launcher_setting": (
        train.main,
        [*OPTUNA, "hydra/launcher=submitit_local", "hydra.launcher.jobs=0", "seed=0,1"],
        None,
        "hydra.launcher.jobs=0 is not valid; use an integer >= 1",
    ),
    "launcher_needs_optuna": (
        train.main,
        ["-m", "hydra/launcher=submitit_local", "seed=0,1"],
        None,
        "hydra/launcher=submitit_local submits workers of an Optuna study; add hydra/sweeper=optuna",
    ),
    "all_points_invalid": (
        train.main,
        [*OPTUNA, "model.n_heads=3,5"],
        None,
        "all 2 points were skipped as invalid, nothing was launched",
    ),
    "basic_sweep_bad_point": (train.main, ["-m", "model.n_heads=2,3"], None, "is invalid, nothing was launched"),
    "devices_without_ddp": (train.main, ["trainer.devices=2"], None, "trainer.devices=2 needs trainer=ddp"),
    "ddp_uneven_batch": (
        train.main,
        ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=9"],
        None,
        "data.batch_size=9 is not divisible by trainer.devices=2: it is the global batch",
    ),
    "ddp_more_gpus_than_visible": (
        train.main,
        ["trainer=ddp", "trainer.accelerator=gpu", "trainer.devices=4096"],
        None,
        "trainer.devices=4096 is more than the",
    ),
    "ddp_more_processes_than_cores": (
        train.main,
        ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=4096"],
        None,
        "usable CPU core(s) (one gloo process per device); use trainer.devices from 1 to",
    ),
    "study_name_climbs": (train.main, ["study=../../escape"], None, "study='../../escape' is not a valid name"),
    "missing_corpus": (
        train.main,
        ["data=text_files", "data.files=[/nonexistent.txt]"],
        None,
        "'/nonexistent.txt' does not exist",
    ),
    "corpus_is_folder": (train.main, ["data=text_files", "data.files=[{d}]"], None, "is not a file"),
    "empty_corpus": (
        train.main,
        ["data=text_files", "data.files=[{d}/empty.txt]"],
        _write("empty.txt", ""),
        "the text_files corpus has no text",
    ),
    "unreadable_corpus": (
        train.main,
        ["data=text_files", "data.files=[{d}/binary.txt]"],
        _write("binary.txt", b"\xff\xfe\x00\x80 not text"),
        "could not be read as UTF-8 text",
    ),
    "short_corpus": (
        train.main,
        ["data=text_files", "data.files=[{d}/short.txt]"],
        _write("short.txt", "short text"),
        "fewer than one window",
    ),
    "unreachable_dataset": (
        train.main,
        ["data=hf", "data.name=nosuch/dataset"],
        None,
        "data.name='nosuch/dataset': datasets.load_dataset('nosuch/dataset', None, split='train') failed",
    ),
    "rerun_no_store": (rerun.main, ["0123abcd"], None, "no MLflow store at"),
    "rerun_unknown_run": (rerun.main, ["0123abcd"], _store_with_an_experiment, "cannot read run 0123abcd"),
    "store_under_file": (
        train.main,
        ["tracking.uri=sqlite:///{d}/afile/mlflow.db"],
        _write("afile", "a regular file"),
        "afile' is a file, not a folder",
    ),
    "corrupt_mlflow_db": (train.main, [], _write("mlflow.db", b"garbage " * 512), "is not a SQLite database"),
    "garbled_mlflow_db": (train.main, [], _write("mlflow.db", GARBLED), "is corrupt"),
    "empty_mlflow_db": (train.main, [], _write("mlflow.db", b""), "is empty (0 bytes)"),
    "corrupt_optuna_db": (
        train.main,
        [*OPTUNA, "seed=0,1"],
        _write("optuna.db", b"garbage " * 512),
        "Optuna storage",
    ),
    "optuna_store_under_file": (
        train.main,
        [*OPTUNA, "seed=0,1", "hydra.sweeper.storage=sqlite:///{d}/afile/optuna.db"],
        _write("afile", "a regular file"),
        "is a file, not a folder",
    ),
    "report_study_climbs": (report.main, ["--study", "../x"], None, "--study='../x' is not a valid name"),
}


def test_every_documented_case_is_tested():
    documented = re.findall(r"^\| (\w+) \|", DOC.read_text(), flags=re.M)
    assert documented[0] == "case"
    assert sorted(documented[1:]) == sorted(set(CASES) - {"garbled_mlflow_db"})


def _runs_and_trials(d: Path) -> tuple[int, int]:
    """MLflow runs and Optuna trials in the folder's stores (0 when a store is absent or is not one)."""

    def count(db: Path, table: str) -> int:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
                return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        except sqlite3.Error:
            return 0

    return count(d / "mlflow.db", "runs"), count(d / "optuna.db", "trials")


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_one_line_and_records_nothing(case, tmp_path, monkeypatch, capfd):
    command, argv, setup, needle = CASES[case]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if setup is not None:
        setup(tmp_path)
    capfd.readouterr()  # what the setup printed
    before = {p: p.read_bytes() for p in tmp_path.glob("*.db")}
    args = [a.replace("{d}", str(tmp_path)) for a in argv]
    if command is train.main:  # the case's overrides after TINY's, so they win
        n = 0
        while n < len(args) and args[n].startswith("-"):
            n += 2 if args[n] == "--config-dir" else 1
        args = [*args[:n], *TINY, "budget=cpu", *args[n:]]
    rc = command(args)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert needle in lines[0], lines[0]
    assert _runs_and_trials(tmp_path) == (0, 0)
    assert {p: p.read_bytes() for p in tmp_path.glob("*.db")} == before  # a bad store is left as it was
    assert not (tmp_path / "pwned").exists()
