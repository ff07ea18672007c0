"""A sweep worker's per-trial overhead (issue 16): what a worker pays once stays paid once.

Each test runs what two trials of one worker process do and counts what the second repeats (a
walk of the stdlib, an experiment lookup, a store write, a full garbage collection), never the
time it takes: benchmarks/trial_overhead.py measures the times.
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import replace
from types import SimpleNamespace

import mlflow
from mlflow import MlflowClient
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

from hydra_plugins.pipeline_optuna_sweeper import workers as workers_lib
from pipeline.data import embedded, load_token_splits
from pipeline.data.cache import cache_key
from pipeline.run.runner import record_config, resolved_config
from pipeline.run.spec import validate_config
from pipeline.tracking import runs
from pipeline.tracking.schema import Param, Tag
from tests.helpers.cli import tiny
from tests.test_data import small_corpus


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from pipeline import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("train", ["budget=cpu", *overrides])


def _counting(calls: list, fn):
    def counted(*args, **kwargs):
        calls.append(args)
        return fn(*args, **kwargs)

    return counted


def test_two_trials_list_the_embedded_corpus_once(tmp_path, monkeypatch):
    """The corpus's identity (a walk of ~2k stdlib files) is asked three times a trial: the
    sweeper's check, the run's validation, the token cache's key. One walk per process."""
    monkeypatch.chdir(tmp_path)  # no token cache here: validation reads no tokens
    walks: list = []
    monkeypatch.setattr(embedded, "_module_files", _counting(walks, embedded._module_files))
    embedded._identity.cache_clear()
    cfg = _compose(tiny(20, 10))
    for _ in range(2):
        validate_config(cfg)  # the sweeper's check
        spec = validate_config(cfg)  # the run's own
        cache_key(spec.data)  # the data module's cache lookup
    assert len(walks) == 1
    first = embedded.identity()
    first["extra"] = 1  # a caller's copy: the cached identity stays as it was
    assert "extra" not in embedded.identity()


def test_runs_of_one_process_look_up_their_experiment_once_and_write_their_config_in_one_batch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(runs.ASYNC_BUFFER_ENV, raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lookups: list = []
    monkeypatch.setattr(runs, "ensure_experiment", _counting(lookups, runs.ensure_experiment))
    writes: list = []
    monkeypatch.setattr(SqlAlchemyStore, "log_batch", _counting(writes, SqlAlchemyStore.log_batch))

    cfg = _compose(tiny(20, 10))
    spec = validate_config(cfg)
    splits = load_token_splits(small_corpus(tmp_path / "docs", cache_dir=str(tmp_path / "cache")))
    model_cfg = replace(spec.model, vocab_size=splits.vocab_size)
    dm = SimpleNamespace(splits=splits)  # record_config reads the splits' cache flag, overlap, floors
    ids = []
    for trial in range(2):
        with runs.tracked_run(uri, "overhead", f"trial-{trial}", {Tag.SEED: "0"}, False) as active:
            before = len(writes)
            record_config(cfg, spec, model_cfg, ["model/pos_enc=rope"], dm)
            assert len(writes) == before + 1  # params, the cache tag and the floors: one write
            # Metrics through the Lightning logger go by MLflow's async queue, now buffered:
            # every point is in the store once the run has ended.
            logger = runs.lightning_logger(uri, active.info.run_id)
            for step in range(5):
                logger.log_metrics({"train/loss": 3.0 - step / 10}, step=step)
            logger.finalize("success")
            ids.append(active.info.run_id)
    assert len(lookups) == 1  # the experiment: once per process, not per run
    assert runs.os.environ[runs.ASYNC_BUFFER_ENV] == "1"

    client = MlflowClient(uri)
    expected = {k: str(v)[:6000] for k, v in runs.flatten(resolved_config(cfg, spec, model_cfg)).items()}
    for run_id in ids:
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        params = run.data.params
        assert {k: params[k] for k in expected} == expected
        assert Param.DATA_OVERLAP_VAL_TRAIN in params and Param.DATA_OVERLAP_TEST_TRAIN in params
        assert run.data.tags[Tag.CACHE_HIT] == "false"  # the corpus was tokenized just now
        assert {f"floor/{k}" for k in splits.floors} <= set(run.data.metrics)
        assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [0, 1, 2, 3, 4]
        assert {a.path for a in client.list_artifacts(run_id)} >= {"config.yaml", "overrides.txt"}
    assert mlflow.active_run() is None


def test_freeze_heap_collects_garbage_then_leaves_what_lives_out_of_later_collections():
    """A worker freezes its heap before its first trial (sweeper.py), so the full collection
    after each fit walks that trial's objects, not the process's ~600k."""

    class Node:
        pass

    alive = Node()
    alive.self = alive  # a cycle that stays referenced
    garbage = Node()
    garbage.self = garbage
    gone = weakref.ref(garbage)
    del garbage  # unreachable, freed only by the cyclic collector
    try:
        workers_lib.freeze_heap()
        assert gone() is None  # collected, not frozen for ever
        assert gc.get_freeze_count() > 0
        assert not any(o is alive for o in gc.get_objects())  # in no generation: no collection walks it
    finally:
        gc.unfreeze()
    assert any(o is alive for o in gc.get_objects())
