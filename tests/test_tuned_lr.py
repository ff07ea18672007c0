"""optimizer.lr_from: a grid arm takes the lr and warmup of its architecture's best run in a
tune study (selected on val), read from a real MLflow store; a missing arm is one clear error."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from pipeline.run.spec import RunConfigError
from pipeline.tracking.tuned import architecture, find_tuned

GPT2 = {"model.pos_enc.name": "learned", "model.ffn.name": "gelu", "model.d_model": "64", "model.vocab_size": "256"}
LLAMA = {"model.pos_enc.name": "rope", "model.ffn.name": "swiglu", "model.d_model": "64", "model.vocab_size": "256"}


def log_tune_study(uri: str, root) -> dict[str, str]:
    """Three lr trials per architecture; the best gpt2 trial has lr 2e-3, the best llama 5e-3."""
    client = MlflowClient(uri)
    exp = client.create_experiment("tune", artifact_location=str(root / "art"))
    parent = client.create_run(exp, tags={"sweep": "true"}).info.run_id
    client.log_metric(parent, "val/loss", 0.1)  # a sweep parent never counts
    best = {}
    for arch, trials in (("gpt2", [(1e-3, 2.5), (2e-3, 2.2), (9e-3, 2.9)]), ("llama", [(5e-3, 2.0), (1e-3, 2.4)])):
        for lr, loss in trials:
            r = client.create_run(exp, tags={"mlflow.parentRunId": parent})
            params = {**(GPT2 if arch == "gpt2" else LLAMA), "optimizer.lr": lr, "optimizer.warmup_steps": 17}
            client.log_batch(
                r.info.run_id,
                metrics=[Metric("val/loss", loss, 0, 200)],
                params=[Param(k, str(v)) for k, v in params.items()],
            )
            client.set_terminated(r.info.run_id)
            if (arch, lr) in (("gpt2", 2e-3), ("llama", 5e-3)):
                best[arch] = r.info.run_id
    # a failed run with a better loss is not a tuned result
    r = client.create_run(exp)
    client.log_batch(r.info.run_id, [Metric("val/loss", 0.5, 0, 10)], [Param(k, v) for k, v in GPT2.items()])
    client.set_terminated(r.info.run_id, "FAILED")
    return best


def test_best_run_of_the_same_architecture_is_used(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    best = log_tune_study(uri, tmp_path)
    # the vocabulary size is the tokenizer's business, not the architecture's
    t = find_tuned(uri, "tune", architecture({**GPT2, "model.vocab_size": "50257", "model.preset": "gpt2"}))
    assert (t.lr, t.warmup_steps, t.run_id, t.n_matching) == (2e-3, 17, best["gpt2"], 3)
    assert find_tuned(uri, "tune", architecture(LLAMA)).lr == 5e-3


def test_an_untuned_architecture_or_study_is_one_clear_error(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_tune_study(uri, tmp_path)
    mixtral = {**LLAMA, "model.ffn.name": "moe"}
    with pytest.raises(RunConfigError, match=r"optimizer.lr_from=tune: none of its 5 finished runs .*rope/\?/\?/moe"):
        find_tuned(uri, "tune", architecture(mixtral))
    with pytest.raises(RunConfigError, match="no MLflow experiment 'nope'.*make ablate STUDY=nope"):
        find_tuned(uri, "nope", architecture(GPT2))


@pytest.mark.slow
def test_lr_from_through_the_cli(tmp_path, tiny):
    """A two-point lr sweep, then a run with optimizer.lr_from: it trains at the better lr and
    records it in its params (so a rerun needs no lookup), with tags naming the source."""
    from tests.helpers.cli import cli

    no_eval = ["eval.enabled=false"]
    proc = cli("pipeline.train", ["-m", "study=tune", "optimizer.lr=1e-4,3e-3", *tiny, *no_eval], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = cli("pipeline.train", ["study=grid", "optimizer.lr_from=tune", *tiny, *no_eval], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tune = client.search_runs([client.get_experiment_by_name("tune").experiment_id], "tags.sweep != 'true'")
    best = min((r for r in tune if "val/loss" in r.data.metrics), key=lambda r: r.data.metrics["val/loss"])
    (run,) = client.search_runs([client.get_experiment_by_name("grid").experiment_id])
    assert run.data.params["optimizer.lr"] == best.data.params["optimizer.lr"]
    assert run.data.params["optimizer.lr_from"] == "None"
    assert run.data.tags["lr_from"] == "tune" and run.data.tags["lr_from_run"] == best.info.run_id
    proc = cli("pipeline.train", ["study=grid", "model=llama", "optimizer.lr_from=tune", *tiny, *no_eval], tmp_path)
    assert proc.returncode == 2 and "optimizer.lr_from=tune: none of its" in proc.stderr
