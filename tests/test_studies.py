"""Every study file in pipeline/conf/ablation/ composes, on both budgets, and its search space parses."""

from __future__ import annotations

import math

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

from hydra_plugins.pipeline_optuna_sweeper import search_space
from hydra_plugins.pipeline_optuna_sweeper.sweeper import OptunaSweeper, calibration
from pipeline import CONF_DIR
from pipeline.evaluate.extrapolation import block_length
from pipeline.model import ModelConfig
from pipeline.run.spec import validate_config

STUDIES = sorted(p.stem for p in (CONF_DIR / "ablation").glob("*.yaml") if p.stem != "none")


def _compose(overrides: list[str], job: bool = True):
    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    if job:  # as inside a job, where ${hydra:runtime.choices.budget} resolves
        HydraConfig.instance().set_config(cfg)
    return cfg


def _sweep(study: str, budget: str):
    """The study's composed config and its search space, resolved as Hydra does when it
    instantiates the sweeper: before any job, with no HydraConfig set."""
    cfg = _compose([f"ablation={study}", f"budget={budget}"], job=False)
    sweeper = OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)
    params = [f"{k}={v}" for k, v in sweeper["params"].items()]
    return cfg, sweeper, search_space.parse(params, OverridesParser.create())


def test_every_study_is_tested():
    assert {"full_grid", "gpt_to_llama", "extrapolation", "moe_vs_dense", "tune_lr", "scaling"} <= set(STUDIES)


@pytest.mark.parametrize("budget", ["cpu", "gpu"])
@pytest.mark.parametrize("study", STUDIES)
def test_study_composes_and_parses(study, budget):
    cfg, sweeper, space = _sweep(study, budget)
    assert cfg.study == study
    assert sweeper["_target_"] == f"{OptunaSweeper.__module__}.OptunaSweeper"
    assert space.dimensions, "a study sweeps something"
    per = set(sweeper.get("per") or [])
    if study == "tune_lr":  # tuned per architecture at one seed, not per seed
        assert "seed" not in {d.name for d in space.dimensions} and per == {"model"}
    else:
        seeds = next(d for d in space.dimensions if d.name == "seed")
        assert len(seeds.grid) >= (1 if budget == "cpu" and study == "full_grid" else 2)
    assert per <= {d.name for d in space.dimensions}
    if sweeper["sampler"] == "grid":
        assert space.is_discrete


@pytest.mark.parametrize("study", STUDIES)
def test_every_grid_point_composes(study, tmp_path):
    """Each trial's overrides compose with the study, pass the run's validation (what the
    sweeper does before launching a trial) and build the run's Lightning trainer with the
    steps the study set, without training. Building it resolves the trainer node against the
    whole config: a study's ${levels...} in trainer keys once failed only there, in every trial."""
    from pipeline.run.runner import make_trainer

    cfg, sweeper, space = _sweep(study, "cpu")
    discrete = [d for d in space.dimensions if d.grid is not None]
    import itertools

    points = list(itertools.product(*(d.grid for d in discrete)))
    for values in (points[0], points[-1]):  # the first and last points: fast
        point = [f"{d.name}={v}" for d, v in zip(discrete, values)]
        trial = _compose([f"ablation={study}", "budget=cpu", *point])
        with open_dict(trial):
            del trial["hydra"]
        spec = validate_config(trial)
        trainer = make_trainer(trial, spec, logger=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
        assert trainer.max_steps == spec.max_steps == trial.trainer.max_steps
        assert trainer.val_check_interval == spec.val_check_interval


@pytest.mark.parametrize("study", STUDIES)
def test_calibrate_hook_sees_the_study_resolvable_as_in_a_trial(study):
    """`make ablate` (WORKERS=auto) runs the study's `calibrate` hook on the sweeper's config
    before any trial. Extrapolation's ${hydra:runtime.choices.budget} keys once made it fail
    there: "HydraConfig was not set". The hook here validates as pipeline.run.layout.cpu_layout
    does, then reports the steps instead of measuring."""
    steps = _compose([f"ablation={study}", "budget=cpu"]).trainer.max_steps  # as in a trial
    cfg, _, _ = _sweep(study, "cpu")  # as the sweeper holds it: no HydraConfig set
    seen = []
    measure = calibration(cfg, lambda task_cfg, cpus: seen.append(validate_config(task_cfg).max_steps) or (1, cpus), 2)
    assert measure() == (1, 2) and seen == [steps]
    assert HydraConfig.instance().cfg is None  # restored after the hook


def test_full_grid_has_90_points_on_cpu_and_180_on_gpu():
    assert _sweep("full_grid", "cpu")[2].grid_size() == 90
    assert _sweep("full_grid", "gpu")[2].grid_size() == 180


def test_gpt_to_llama_changes_one_thing_per_step():
    _, _, space = _sweep("gpt_to_llama", "cpu")
    steps = next(d for d in space.dimensions if d.name == "ablation/gpt_to_llama").grid
    models = []
    for step in steps:
        trial = _compose(["ablation=gpt_to_llama", "budget=cpu", f"ablation/gpt_to_llama={step}"])
        with open_dict(trial):
            del trial["hydra"]
        models.append(validate_config(trial).model.to_dict())
    names = [tuple(m[f]["name"] for f in ("pos_enc", "norm", "ffn", "attention")) for m in models]
    assert names[0] == ("learned", "layernorm", "gelu", "mha")
    assert names[-1] == ("rope", "rmsnorm", "swiglu", "gqa")
    changed = [{k for k in a if a[k] != b[k]} for a, b in zip(models, models[1:])]
    # One model setting per step (a component node counts as one); the last is the llama preset.
    assert changed == [{"pos_enc"}, {"norm"}, {"ffn"}, {"attention"}, {"bias"}, {"tie_embeddings"}]
    assert models[-1] == {**ModelConfig.from_preset("llama").to_dict(), "vocab_size": models[-1]["vocab_size"]}


def _ffn_cost(overrides: list[str]):
    trial = _compose(overrides)
    with open_dict(trial):
        del trial["hydra"]
    spec = validate_config(trial)
    return spec.model.ffn.cost(spec.model.dims, spec.model.context_length)


@pytest.mark.parametrize("budget", ["cpu", "gpu"])
def test_full_grid_ffn_arms_have_the_same_active_parameters(budget):
    """GELU, SwiGLU and MoE arms of the default grid: the FFN parameters a token uses agree
    within 1% (MoE: top_k experts of 1/top_k the width, plus the router)."""
    arms = {
        ffn: _ffn_cost(["ablation=full_grid", f"budget={budget}", f"model/ffn={ffn}"])
        for ffn in ("gelu", "swiglu", "moe")
    }
    gelu = arms["gelu"].active_params
    for ffn in ("swiglu", "moe"):
        assert abs(arms[ffn].active_params / gelu - 1) < 0.01, (ffn, arms[ffn].active_params, gelu)
    assert arms["moe"].params > 3 * gelu  # 8 experts of half the width: 4x in total


def test_moe_vs_dense_matches_active_and_total_ffn_width():
    def ffn(arm: str):
        m = _compose(["ablation=moe_vs_dense", f"ablation/moe_vs_dense={arm}"]).model.ffn
        return OmegaConf.to_container(m, resolve=True)

    dense, moe, total = ffn("dense"), ffn("moe"), ffn("dense_equal_total")
    assert moe["name"] == "moe" and dense["name"] == total["name"] == "swiglu"
    assert moe["top_k"] * moe["hidden"] == dense["hidden"]  # equal active
    assert moe["n_experts"] * moe["hidden"] == total["hidden"]  # equal total


def test_scaling_has_five_sizes_with_tokens_in_a_fixed_ratio_to_params():
    """At least five sizes, and tokens per non-embedding parameter equal across them (to the
    rounding of steps), on both budgets."""
    from pipeline.evaluate.cost import analytic_cost
    from pipeline.run.spec import model_from_config

    _, _, space = _sweep("scaling", "cpu")
    sizes = next(d for d in space.dimensions if d.name == "ablation/scaling").grid
    assert len(sizes) >= 5
    for budget in ("cpu", "gpu"):
        ratios, widths = [], []
        for s in sizes:
            cfg = _compose(["ablation=scaling", f"ablation/scaling={s}", f"budget={budget}", "model=gpt2"])
            with open_dict(cfg):
                del cfg["hydra"]
            c = OmegaConf.to_container(cfg, resolve=True)
            c["model"]["vocab_size"] = 256
            model, _ = model_from_config(c)
            cost = analytic_cost(model)
            embed = model.vocab_size * model.d_model + (model.pos_enc.max_len or 0) * model.d_model
            tokens = c["trainer"]["max_steps"] * c["data"]["batch_size"] * c["model"]["context_length"]
            ratios.append(tokens / (cost["params_total"] - embed))
            widths.append(model.d_model)
            assert c["trainer"]["val_check_interval"] * 4 == c["trainer"]["max_steps"]
        assert widths == sorted(widths) and len(set(widths)) == len(widths)
        assert max(ratios) / min(ratios) < 1.1, ratios
        assert math.prod(len(d.grid) for d in _sweep("scaling", budget)[2].dimensions) >= 5 * 3 * 2


def _points(study: str, budget: str, keep) -> list[list[str]]:
    """The overrides of every grid point over the dimensions `keep(name)` selects."""
    import itertools

    _, _, space = _sweep(study, budget)
    dims = [d for d in space.dimensions if d.grid is not None and keep(d.name)]
    return [[f"{d.name}={v}" for d, v in zip(dims, values)] for values in itertools.product(*(d.grid for d in dims))]


@pytest.mark.parametrize("budget", ["cpu", "gpu"])
@pytest.mark.parametrize("study", STUDIES)
def test_every_point_of_a_study_scores_the_same_extrapolation_targets(study, budget):
    """The scored blocks depend on the test split and the block length only, so one block
    length per study means the same targets in every run. Component groups (model/<family>)
    and seeds cannot change the context or the eval node, so only the other axes are walked."""
    blocks = set()
    for point in _points(study, budget, lambda name: name != "seed" and not name.startswith("model/")):
        trial = _compose([f"ablation={study}", f"budget={budget}", *point])
        with open_dict(trial):
            del trial["hydra"]
        spec = validate_config(trial)
        blocks.add(block_length(spec.model, spec.eval.factors, spec.eval.block_tokens))
    assert len(blocks) == 1, f"{study}: the runs score different text (blocks of {sorted(blocks)} tokens)"


@pytest.mark.parametrize("budget", ["cpu", "gpu"])
def test_extrapolation_trains_at_least_as_long_as_the_budget(budget):
    """A model scores flat beyond its context until it has learned to use positions, so the
    extrapolation study trains its levels' steps, never fewer than the budget's (and CLI
    overrides still win)."""
    plain = _compose([f"budget={budget}"])
    study = _compose(["ablation=extrapolation", f"budget={budget}"])
    assert study.trainer.max_steps == study.levels[budget].steps >= plain.trainer.max_steps
    if budget == "cpu":
        assert study.trainer.max_steps > plain.trainer.max_steps
    short = _compose(["ablation=extrapolation", f"budget={budget}", "trainer.max_steps=40"])
    assert short.trainer.max_steps == 40
