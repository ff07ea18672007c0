"""Swapping one component keeps every other factor (norm placement included), for every
family, in all three entry points: Hydra, the Python API, and `pipeline.rerun` of a real run.

Before placement moved to the model, `model/norm=rmsnorm` on gpt1 kept post-norm in Hydra but
became pre-norm through the Python API and through rerun: one swap changed two factors.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient
from omegaconf import OmegaConf

from pipeline import CONF_DIR
from pipeline.model import ModelConfig
from pipeline.model.components import REGISTRIES
from pipeline.model.families import FAMILIES
from pipeline.model.presets import PRESETS
from pipeline.rerun import apply_overrides
from pipeline.run.spec import validate_config
from pipeline.tracking.schema import Tag
from tests.helpers.cli import TINY, cli


def other_name(family: str, current: str) -> str:
    return next(n for n in REGISTRIES[family].names() if n != current)


def others(cfg: ModelConfig, family: str) -> dict:
    """Everything of the model but the swapped family: the other components, placement, sizes."""
    return {k: v for k, v in cfg.to_dict().items() if k != family}


CASES = [(p, f) for p in sorted(PRESETS) for f in FAMILIES]
IDS = [f"{p}-{f}" for p, f in CASES]


@pytest.mark.parametrize("preset,family", CASES, ids=IDS)
def test_python_api_swap_keeps_other_factors(preset: str, family: str) -> None:
    base = ModelConfig.from_preset(preset)
    name = other_name(family, getattr(base, family).name)
    swapped = ModelConfig.from_preset(preset, **{family: {"name": name}})
    assert getattr(swapped, family).name == name
    assert others(swapped, family) == others(base, family)


def compose_model(overrides: list[str]) -> ModelConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return validate_config(compose(config_name="train", overrides=["budget=cpu", *overrides])).model


@pytest.mark.parametrize("preset,family", CASES, ids=IDS)
def test_hydra_swap_keeps_other_factors(preset: str, family: str) -> None:
    base = compose_model([f"model={preset}"])
    name = other_name(family, getattr(base, family).name)
    swapped = compose_model([f"model={preset}", f"model/{family}={name}"])
    assert getattr(swapped, family).name == name
    assert others(swapped, family) == others(base, family)


# -- rerun: a real gpt1 run, then one rerun per family ---------------------------------------------


@pytest.fixture(scope="module")
def gpt1_run(tmp_path_factory) -> tuple[Path, str, str]:
    """A tiny gpt1 run (post-norm) in an explicit store: (working dir, store URI, run id)."""
    cwd = tmp_path_factory.mktemp("swap")
    uri = f"sqlite:///{cwd / 'runs.db'}"
    fast = ["trainer.max_steps=4", "trainer.val_check_interval=4", "eval.enabled=false"]
    proc = cli("pipeline.train", [*TINY, *fast, "model=gpt1", f"tracking.uri={uri}"], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("default").experiment_id])
    assert run.data.tags[Tag.PLACEMENT] == "post"
    return cwd, uri, run.info.run_id


def model_params(run) -> dict[str, str]:
    return {k: v for k, v in run.data.params.items() if k.startswith("model.")}


# norm (the family of the old bug) in the default tier; the other three reruns, a minute of
# training and start-up together, in the slow tier.
@pytest.mark.parametrize("family", [f if f == "norm" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def test_rerun_swap_keeps_other_factors(gpt1_run, family: str) -> None:
    cwd, uri, original_id = gpt1_run
    client = MlflowClient(uri)
    original = client.get_run(original_id)
    name = other_name(family, original.data.tags[family])
    proc = cli("pipeline.rerun", [original_id, f"model/{family}={name}"], cwd, env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (rerun,) = client.search_runs(
        [original.info.experiment_id], f"tags.{Tag.RERUN_OF} = '{original_id}' and tags.{family} = '{name}'"
    )
    for tag in (*FAMILIES, Tag.PLACEMENT):
        assert rerun.data.tags[tag] == (name if tag == family else original.data.tags[tag]), tag
    mine = f"model.{family}."
    before, after = model_params(original), model_params(rerun)
    assert {k: v for k, v in after.items() if not k.startswith(mine)} == {
        k: v for k, v in before.items() if not k.startswith(mine)
    }


@pytest.mark.parametrize(
    "recorded, overrides, expected",
    [
        (math.sqrt(2 / 320), ["model.d_model=128"], math.sqrt(2 / 640)),  # the default follows the width
        (math.sqrt(2 / 320), ["model.d_model=128", "model.init_std=0.05"], 0.05),  # unless given
        (0.02, ["model.d_model=128"], 0.02),  # a chosen init stays
        (math.sqrt(2 / 320), ["seed=1"], math.sqrt(2 / 320)),  # same width: the run's own number
    ],
)
def test_rerun_at_another_width_rederives_the_default_init(recorded, overrides, expected) -> None:
    """config.yaml records the init a run used as a number; a rerun that changes d_model gets
    the width's default again, as a fresh run would, unless the init was set or given."""
    recorded_cfg = OmegaConf.create({"seed": 0, "model": {"d_model": 64, "n_heads": 4, "init_std": recorded}})
    cfg = apply_overrides(recorded_cfg, overrides)
    model = ModelConfig.from_dict(OmegaConf.to_container(cfg.model))
    assert model.init_std == pytest.approx(expected)
