"""The study report, built from studies logged into a real SQLite MLflow store."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline.analysis.document import fmt_stat
from pipeline.analysis.report import build_report, optuna_importances, optuna_studies, report_run
from pipeline.analysis.study import load_study
from pipeline.report import main
from tests.helpers.mlflow_study import FACTORS, FAILURE, final_loss, log_grid, log_run

GRID_PNGS = {
    "val_loss_step.png",
    "val_loss_tokens.png",
    "val_loss_compute.png",
    "val_loss_compute_levels.png",
    "effects_compute.png",
    "extrapolation.png",
    "pareto.png",
    "effects.png",
    "moe_load.png",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts"), root


@pytest.fixture(scope="module")
def grid(store):
    """2 (pos_enc) x 2 (ffn) x 2 seeds, a failed and a pruned trial, and its report."""
    uri, artifacts, root = store
    logged = log_grid(uri, artifacts, "grid")
    rep = build_report("grid", uri, root / "reports", optuna_storage=f"sqlite:///{root / 'none.db'}")
    return logged, rep, rep.markdown.read_text()


def row_of(md: str, config_id: str) -> str:
    table = md.split("## Configurations")[1].split("\n## ")[0]
    (line,) = [ln for ln in table.splitlines() if ln.startswith(f"| {config_id} |")]
    return line


def test_files_written_and_logged_to_the_parent_run(grid, store):
    logged, rep, _ = grid
    assert {p.name for p in rep.dir.glob("*.png")} == GRID_PNGS
    assert "## Scaling" not in rep.markdown.read_text()  # no size factor varies
    assert rep.html.read_text().count("<img") == len(GRID_PNGS)
    assert rep.artifact_run_id == logged.parent_id
    names = {Path(a.path).name for a in MlflowClient(store[0]).list_artifacts(logged.parent_id, "report")}
    assert names == GRID_PNGS | {"report.md", "report.html"}


def test_one_configuration_per_grid_cell_with_logged_values(grid):
    logged, rep, md = grid
    assert len(rep.configurations) == 4
    for c in rep.configurations:
        assert len(c.trials) == 2
        ids = {t.run_id for t in c.trials}
        # the trials pooled are exactly the logged runs of that cell
        assert ids == {
            rid
            for rid, (lv, *_) in logged.runs.items()
            if (lv["pos_enc"], lv["ffn"]) == (c.levels["pos_enc"], c.levels["ffn"])
        }
        for key in (
            "val/loss",
            "val/ppl",
            "cost/kv_bytes_per_token",
            "cost/decode_tokens_per_s",
            *[f"extrap/ppl_x{f}" for f in FACTORS],
        ):
            vals = np.array([logged.runs[r][2][key] for r in ids])
            mean, std, n = c.stat(key)
            assert n == 2 and mean == pytest.approx(vals.mean()) and std == pytest.approx(vals.std(ddof=1))
        walls = np.array([logged.runs[r][3] for r in ids])
        assert c.wall()[0] == pytest.approx(walls.mean(), abs=1e-3)
        # the table row shows those numbers and names every run averaged
        row = row_of(md, c.id)
        assert all(t.run_id[:8] in row for t in c.trials)
        assert fmt_stat(*c.stat("val/loss")[:2]) in row
        assert fmt_stat(*c.stat("cost/decode_tokens_per_s")[:2], 1) in row
    # best first
    losses = [c.stat("val/loss")[0] for c in rep.configurations]
    assert losses == sorted(losses)
    # the per-run table names every run in full
    assert all(rid in md for rid in logged.runs)


def test_factor_effects_recover_the_construction(grid):
    _, rep, md = grid

    def cell(p, f, seed=0):  # seed noise is +-0.01, so the seed mean is the noiseless value
        lv = {"pos_enc": p, "norm": "layernorm", "attention": "mha", "ffn": f}
        return (final_loss(lv, 0) + final_loss(lv, 1)) / 2

    rope = np.mean([cell("rope", f) - cell("learned", f) for f in ("gelu", "moe")])
    moe = np.mean([cell(p, "moe") - cell(p, "gelu") for p in ("learned", "rope")])
    inter = (cell("rope", "moe") - cell("learned", "moe")) - (cell("rope", "gelu") - cell("learned", "gelu"))
    section = md.split("## Factor effects at equal steps")[1].split("\n## ")[0]
    assert re.search(rf"\| pos_enc \| rope \| learned \| {rope:+.4f} \[", section)
    assert re.search(rf"\| ffn \| moe \| gelu \| {moe:+.4f} \[", section)
    (it,) = rep.at_steps.inters
    assert it.estimate == pytest.approx(inter) and it.n_seeds == 2 and it.method == "seeds"
    # the effect on test log perplexity at x8: the rope runs' ppl grows 1.14x from x1 to x8, learned's 4.5x
    extrap = md.split("### Effects on test log perplexity at ×8")[1].split("\n## ")[0]
    rope_x8 = rope + np.log(1.14) - np.log(4.5)
    assert re.search(rf"\| pos_enc \| rope \| learned \| {rope_x8:+.4f} \[", extrap)
    # bits per byte beside nats (byte tokenizer): delta / ln 2
    assert f"| {rope / np.log(2):+.4f} |" in section


def test_summary_comes_first_and_names_what_stands_out(grid):
    _, rep, md = grid
    assert md.split("\n## ")[1].startswith("Summary")
    summary = md.split("## Summary")[1].split("\n## ")[0]
    eff = rep.at_steps
    assert eff.family == 3  # two main effects and one interaction: the Holm family
    assert f"{eff.family} contrasts, Holm at 0.05" in summary
    sig = eff.significant()
    assert sig, "rope's -0.2 against 0.004 noise stands out"
    for e in sig:
        assert e.p_holm <= 0.05 and f"Holm p = {e.p_holm:.3g}" in summary
    assert "**At equal compute**" in summary
    assert "N-gram floors (`floor/ngram1`..`floor/ngram4`) were not logged" in summary
    # the synthetic curves fall 0.5 * 10/40 over the last quarter: every configuration still falls
    assert "Still falling fast" in summary and "4 of 4 configurations" in summary


def test_effects_at_matched_compute(grid):
    """MoE runs cost half the FLOPs per token, so the matched compute is MoE's final compute,
    where the GELU runs stood at step 20 with 0.25 more loss: the ffn effect gains 0.25."""
    _, rep, md = grid
    from tests.helpers.mlflow_study import BATCH, CONTEXT, STEPS

    moe_active = min(t.metrics["cost/params_active"] for c in rep.configurations for t in c.trials)
    assert rep.matched_compute == pytest.approx(3 * 6.0 * moe_active * STEPS[-1] * BATCH * CONTEXT)
    steps_eff = {(e.factor, e.level): e.estimate for e in rep.at_steps.mains}
    comp_eff = {(e.factor, e.level): e.estimate for e in rep.at_compute.mains}
    assert comp_eff[("ffn", "moe")] == pytest.approx(steps_eff[("ffn", "moe")] - 0.25, abs=1e-4)
    assert comp_eff[("pos_enc", "rope")] == pytest.approx(steps_eff[("pos_enc", "rope")], abs=0.05)
    assert "## Equal compute" in md and "Effects at matched compute" in md


def test_failed_and_pruned_trials_have_their_own_section(grid):
    logged, rep, md = grid
    section = md.split("## Failed and pruned trials")[1].split("\n## ")[0]
    (failed,) = [ln for ln in section.splitlines() if logged.failed_id in ln]
    assert "failed" in failed and FAILURE in failed
    (pruned,) = [ln for ln in section.splitlines() if logged.pruned_id in ln]
    assert "pruned" in pruned and "| 20 |" in pruned  # last validation step before pruning
    assert all(t.status == "FINISHED" for c in rep.configurations for t in c.trials)


def test_moe_section_reads_expert_loads(grid):
    _, _, md = grid
    section = md.split("## Mixture-of-experts load")[1].split("\n## ")[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| C")]
    assert len(rows) == 2  # the two moe configurations
    # layer 0 loads 0.4/0.3/0.2/0.1 -> imbalance 0.4 * 4 = 1.6; layer 1 is even -> 1.0
    assert all("| 1.60 1.00 |" in r for r in rows)


def test_without_a_parent_run_the_report_gets_its_own_run(store):
    uri, artifacts, root = store
    logged = log_grid(uri, artifacts, "loose", ffn=("gelu",), failures=False, parent=False)
    rep = build_report("loose", uri, root / "reports", optuna_storage="sqlite:///" + str(root / "x.db"))
    client = MlflowClient(uri)
    run = client.get_run(rep.artifact_run_id)
    assert run.data.tags["report"] == "true" and run.info.run_name == "report"
    assert rep.artifact_run_id in rep.markdown.read_text()
    assert {Path(a.path).name for a in client.list_artifacts(rep.artifact_run_id, "report")} >= {"report.md"}
    # a rebuild reuses that run, and never counts it as a trial
    study = load_study(client, "loose", uri)
    assert report_run(client, study)[0] == rep.artifact_run_id
    assert {t.run_id for t in study.trials} == set(logged.runs)
    assert "None: every trial finished." in rep.markdown.read_text()


def test_scaling_section_recovers_a_known_compute_multiplier(store):
    uri, artifacts, root = store
    k = 2.0  # rope reaches learned's loss with half the compute

    def loss(levels, compute):
        c = compute * (k if levels["pos_enc"] == "rope" else 1.0)
        return 2.0 * (c / 1e9) ** -0.3 + 1.0

    log_grid(
        uri,
        artifacts,
        "scaling",
        ffn=("gelu",),
        seeds=(0,),
        sizes=(64, 128, 192, 256, 320),  # five sizes: the offset is identifiable
        failures=False,
        loss_of_compute=loss,
    )
    rep = build_report(
        "scaling", uri, root / "reports", log_artifacts=False, optuna_storage="sqlite:///" + str(root / "x.db")
    )
    md = rep.markdown.read_text()
    section = md.split("## Scaling")[1].split("\n## ")[0]
    (rope,) = [ln for ln in section.splitlines() if ln.startswith("| rope")]
    assert f"| {k:.2f}× [" in rope  # recovered, with its bootstrap interval
    assert (rep.dir / "scaling.png").exists()
    # model.d_model is a factor of its own: a column in the table and an effect
    header = next(ln for ln in md.split("## Configurations")[1].splitlines() if ln.startswith("| id"))
    assert "| model.d_model |" in header
    assert re.search(r"\| model\.d_model \| 128 \| 64 \| [+-]", md)


def test_reruns_duplicates_commits_and_floors(store):
    """A rerun is a check, not a replicate; a newer run of a (configuration, seed) replaces the
    older; mixed code versions are counted; the bigram floor flags configurations."""
    uri, artifacts, root = store
    logged = log_grid(uri, artifacts, "dups", failures=False)
    kw = {"optuna_storage": "sqlite:///" + str(root / "x.db"), "log_artifacts": False}
    before = build_report("dups", uri, root / "reports", **kw)
    client = MlflowClient(uri)
    (first, (levels, seed, _, _)) = next(iter(logged.runs.items()))
    # a rerun that disagrees by 0.3 (it would shift an effect by 0.15 if it counted)
    log_run(client, logged.experiment_id, None, "dups", levels, seed, shift=0.3, extra_tags={"rerun_of": first})
    after = build_report("dups", uri, root / "reports", **kw)
    for a, b in zip(before.at_steps.mains + before.at_steps.inters, after.at_steps.mains + after.at_steps.inters):
        assert (a.estimate, a.ci_low, a.ci_high) == (b.estimate, b.ci_low, b.ci_high)
    md = after.markdown.read_text()
    section = md.split("## Reruns and duplicates")[1].split("\n## ")[0]
    assert first in section and "| 0.3000 |" in section
    # a newer run of the same (configuration, seed), from another commit, with floors logged
    floors = {"floor/ngram1": 3.0, "floor/ngram2": 1.95}
    newer, _, _ = log_run(
        client,
        logged.experiment_id,
        None,
        "dups",
        levels,
        seed,
        shift=0.1,
        extra_tags={"git_commit": "def456"},
        extra_metrics=floors,
    )
    rep = build_report("dups", uri, root / "reports", **kw)
    assert newer in {t.run_id for t in rep.selection.used} and first in {t.run_id for t in rep.selection.superseded}
    assert len(rep.selection.used) == len(logged.runs)
    md = rep.markdown.read_text()
    summary = md.split("## Summary")[1].split("\n## ")[0]
    assert "the runs come from 2 code versions" in summary and "`abc123` 7 runs" in summary
    # learned+gelu (2.0 +- 0.01) does not beat a bigram floor of 1.95; the rope configurations do
    (worst,) = [c for c in rep.configurations if (c.levels["pos_enc"], c.levels["ffn"]) == ("learned", "gelu")]
    assert f"1 configurations do not beat it: {worst.id}" in summary
    assert "Dashed: the n-gram floors (`floor/ngram1` 3.000, `floor/ngram2` 1.950)" in md


def test_cli_names_the_experiments_when_the_study_is_missing(store, grid, monkeypatch, tmp_path, capsys):
    uri, _, _ = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    assert main(["--study", "nope"]) == 2
    assert re.search("no MLflow experiment named 'nope'.*grid", capsys.readouterr().err)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert main(["--study", "grid"]) == 2
    assert re.search("no MLflow store at sqlite:///.*mlflow.db", capsys.readouterr().err)
    assert not (tmp_path / "mlflow.db").exists()  # a missing store is not created


@pytest.mark.slow
def test_report_from_a_real_sweep(tmp_path):
    """2 x 2 x 2 seeds through `python -m pipeline.train -m`, then `python -m pipeline.report`:
    every configuration row holds its runs' ids and their mean ± std as MLflow has them."""
    from tests.helpers.cli import TINY, cli

    fast_eval = [
        "eval.max_windows=1",
        "eval.factors=[1,2]",
        "eval.decode.repeats=1",
        "eval.decode.warmup=0",
        "eval.decode.batch_sizes=[1]",
        "eval.decode.new_tokens=4",
    ]
    sweep = ["-m", "study=real", "model/pos_enc=learned,rope", "model/ffn=gelu,moe", "seed=0,1"]
    proc = cli("pipeline.train", [*sweep, *TINY, *fast_eval], tmp_path, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = cli("pipeline.report", ["--study", "real"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("real")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "true"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 8 and all(r.info.status == "FINISHED" for r in trials)
    md = (tmp_path / "reports/real/report.md").read_text()
    table = md.split("## Configurations")[1].split("\n## ")[0]
    cells: dict[tuple, list] = {}
    for r in trials:
        cells.setdefault((r.data.tags["pos_enc"], r.data.tags["ffn"]), []).append(r)
    for (pos_enc, ffn), group in cells.items():
        (row,) = [ln for ln in table.splitlines() if all(r.info.run_id[:8] in ln for r in group)]
        assert f"| {pos_enc} |" in row and f"| {ffn} |" in row
        for key in ("val/loss", "cost/params_total", "extrap/ppl_x2"):
            v = np.array([r.data.metrics[key] for r in group])
            assert fmt_stat(v.mean(), v.std(ddof=1), 4 if key == "val/loss" else 1 if "cost" in key else 2) in row
    assert all(r.info.run_id in md for r in trials)
    names = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report.md", "report.html", "moe_load.png", "effects.png"} <= names


def test_optuna_importances_when_the_study_exists(tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage)
    space = {
        "pos_enc": optuna.distributions.CategoricalDistribution(["rope", "learned"]),
        "ffn": optuna.distributions.CategoricalDistribution(["gelu", "moe"]),
    }
    for pos_enc, ffn in [(p, f) for p in ("rope", "learned") for f in ("gelu", "moe")] * 2:
        value = 2.0 - 0.5 * (pos_enc == "rope") - 0.01 * (ffn == "moe")
        study.add_trial(
            optuna.trial.create_trial(params={"pos_enc": pos_enc, "ffn": ffn}, distributions=space, value=value)
        )
    imp, _ = optuna_importances(storage, "s")
    assert set(imp) == {"pos_enc", "ffn"} and imp["pos_enc"] > imp["ffn"]
    missing = tmp_path / "none.db"
    imp, why = optuna_importances(f"sqlite:///{missing}", "s")
    assert imp is None and "no Optuna storage" in why and not missing.exists()
    imp, why = optuna_importances(storage, "other")
    assert imp is None and "other" in why


def test_per_point_optuna_studies_are_found(tmp_path):
    """A sweep with `per` (tune_lr) keeps one Optuna study per point, named `<study>/<point>`."""
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    for name in ("tune/model=llama", "tune/model=gpt2", "tuned"):
        optuna.create_study(study_name=name, storage=storage)
    assert optuna_studies(storage, "tune") == ["tune/model=gpt2", "tune/model=llama"]
    assert optuna_studies(storage, "tuned") == ["tuned"]
    missing = tmp_path / "none.db"
    assert optuna_studies(f"sqlite:///{missing}", "tune") == ["tune"] and not missing.exists()
