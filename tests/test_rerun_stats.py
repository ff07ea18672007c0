"""A rerun changes no interval: a 2 x 2-seed sweep through the real CLI and MLflow, then
`python -m pipeline.rerun` of one run, then the report again."""

from __future__ import annotations

from mlflow import MlflowClient

from pipeline.analysis.report import build_report
from tests.helpers.cli import cli


def effects(rep) -> list[tuple]:
    return [(e.factor, e.level, e.estimate, e.ci_low, e.ci_high, e.p_holm) for e in rep.at_steps.mains]


def test_a_rerun_changes_no_interval(tmp_path, tiny):
    no_eval = ["eval.enabled=false"]
    sweep = ["-m", "study=rr", "model/pos_enc=learned,rope", "seed=0,1"]
    proc = cli("pipeline.train", [*sweep, *tiny, *no_eval], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    kw = {"out": tmp_path / "reports", "optuna_storage": f"sqlite:///{tmp_path / 'optuna.db'}", "log_artifacts": False}
    before = build_report("rr", uri, **kw)
    assert len(before.selection.used) == 4 and before.at_steps.mains[0].method == "seeds"

    original = before.configurations[0].trials[0]
    proc = cli("pipeline.rerun", [original.run_id], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = build_report("rr", uri, **kw)

    (rerun,) = after.selection.reruns
    assert rerun.tags["rerun_of"] == original.run_id
    # on CPU the rerun reproduces its original exactly; counted as a replicate, it would have
    # added a zero-variance pair to that cell
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("rr").experiment_id])
    assert len([r for r in runs if r.data.tags.get("sweep") != "true"]) == 5
    assert rerun.metrics["val/loss"] == original.metrics["val/loss"]
    assert effects(after) == effects(before)
    assert {t.run_id for t in after.selection.used} == {t.run_id for t in before.selection.used}
    section = after.markdown.read_text().split("## Reruns and duplicates")[1]
    assert rerun.run_id in section and original.run_id in section
