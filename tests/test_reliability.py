"""Reliability: corrupt token caches are rebuilt, safe loading, passwords never leak, paths
never climb out, the UI binds localhost. (Bad input: test_errors.py; signals: test_signals.py.)"""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.cache import load_token_splits
from pipeline.data.config import SPLITS, DataConfig
from pipeline.tracking.uri import redact

ROOT = Path(__file__).resolve().parents[1]


# -- the token cache: a checksum per split ---------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(64)  # zeros in the middle of the train array
    path.write_bytes(bytes(data))


def _swap_tokens(path: Path) -> None:
    """A well-formed file whose train tokens are not the ones its checksum was written for
    (e.g. a copy of another corpus's cache, or a bit flip the zip format did not see)."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["train"] = arrays["train"][::-1].copy()
    np.savez(path, **arrays)


@pytest.mark.parametrize("damage", [_truncate, _garble, _swap_tokens], ids=["truncated", "garbled", "swapped"])
def test_a_damaged_token_cache_is_detected_and_rebuilt(tmp_path, damage):
    cfg = DataConfig.from_dict({"cache_dir": str(tmp_path)})
    first = load_token_splits(cfg)
    damage(first.cache_path)
    again = load_token_splits(cfg)
    assert not again.cache_hit  # rebuilt, not trained on
    for s in SPLITS:
        np.testing.assert_array_equal(getattr(again, s), getattr(first, s))
    assert load_token_splits(cfg).cache_hit  # the rebuilt file is good again


def test_cache_records_a_checksum_per_split_and_holds_no_pickles(tmp_path):
    splits = load_token_splits(DataConfig.from_dict({"cache_dir": str(tmp_path)}))
    with np.load(splits.cache_path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        assert set(meta["sha256"]) == set(SPLITS)
        assert all(z[k].dtype != object for k in z.files)
    assert all(n.endswith(".npy") for n in zipfile.ZipFile(splits.cache_path).namelist())


def test_no_unsafe_loader_in_the_code():
    """torch.load without weights_only, np.load with pickles, yaml.load/unsafe_load, eval/exec."""
    bad = []
    for path in [*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("hydra_plugins/**/*.py"), *ROOT.glob("benchmarks/*.py")]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if ("torch.load(" in code and "weights_only=True" not in code) or (
                "np.load(" in code and "allow_pickle=False" not in code
            ):
                bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
            if any(s in code for s in ("yaml.load(", "yaml.unsafe_load", "allow_pickle=True", " eval(", " exec(")):
                bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert bad == []


# -- servers bind 127.0.0.1 -------------------------------------------------------------------


def test_make_ui_binds_localhost_unless_told():
    def ui(*args: str) -> str:
        return subprocess.run(["make", "-n", "ui", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout

    assert "--host 127.0.0.1 " in ui()
    assert "--host 0.0.0.0 " in ui("HOST=0.0.0.0")


# -- passwords ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url,shown",
    [
        ("postgresql://bob:s3cr3t@db.example:5432/mlflow", "postgresql://bob:***@db.example:5432/mlflow"),
        ("mysql+pymysql://u:p%40ss@h/db", "mysql+pymysql://u:***@h/db"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        ("http://host:5000", "http://host:5000"),
    ],
)
def test_redact_hides_only_the_password(url, shown):
    assert redact(url) == shown
