"""The Hydra configs and the Python presets/registries describe the same models."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline import CONF_DIR
from pipeline.model import ModelConfig
from pipeline.model.components import REGISTRIES
from pipeline.model.presets import PRESETS
from pipeline.run.spec import validate_config

SIZE_KEYS = ("d_model", "n_layers", "n_heads", "context_length")


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


ENTRIES = [(family, name) for family, reg in REGISTRIES.items() for name in reg.names()]


@pytest.mark.parametrize("family,name", ENTRIES, ids=[f"{f}-{n}" for f, n in ENTRIES])
def test_component_yaml_matches_dataclass_defaults(family: str, name: str) -> None:
    path = CONF_DIR / "model" / family / f"{name}.yaml"
    assert path.exists(), f"every registry entry has a Hydra option: {path}"
    defaults = {**dataclasses.asdict(REGISTRIES[family].get(name).Config()), "name": name}
    assert yaml.safe_load(path.read_text()) == defaults


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_hydra_preset_equals_python_preset(preset: str) -> None:
    """`model=<preset>` composes to ModelConfig.from_preset(<preset>) (budget sizes aside)."""
    cfg = compose_train([f"model={preset}", "budget=cpu"])
    spec = validate_config(cfg)
    sizes = {k: getattr(spec.model, k) for k in SIZE_KEYS}
    python = ModelConfig.from_preset(
        preset,
        **sizes,
        pos_enc={**dataclasses.asdict(spec.model.pos_enc)} if spec.model.pos_enc.name == "learned" else {},
    )
    assert spec.preset == preset
    assert spec.model == python


def test_budget_sizes_override_preset_and_cli_overrides_win() -> None:
    budget = OmegaConf.load(CONF_DIR / "budget" / "cpu.yaml")
    cfg = compose_train(["model=gpt3", "budget=cpu", "model.n_layers=3"])
    assert cfg.model.d_model == budget.model.d_model
    assert cfg.model.n_layers == 3


def test_size_group_sets_shape_with_one_key() -> None:
    cfg = compose_train(["model=llama", "budget=cpu", "size=large"])
    large = OmegaConf.load(CONF_DIR / "size" / "large.yaml")
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads) == (
        large.model.d_model,
        large.model.n_layers,
        large.model.n_heads,
    )


def test_component_swap_keeps_preset_placement() -> None:
    """GPT-1 with RMSNorm stays post-norm: placement belongs to the preset, not the norm."""
    spec = validate_config(compose_train(["model=gpt1", "budget=cpu", "model/norm=rmsnorm"]))
    assert (spec.model.norm.name, spec.model.placement) == ("rmsnorm", "post")


def test_learned_table_covers_largest_eval_factor() -> None:
    spec = validate_config(compose_train(["model=gpt2", "budget=cpu", "eval.factors=[1,2,16]"]))
    assert spec.model.pos_enc.max_len == 16 * spec.model.context_length


@pytest.mark.parametrize(
    "override,needle",
    [
        ("eval.max_windows=0", "eval.max_windows=0"),
        ("eval.rope_scaling=[yarn]", "'yarn'"),
        ("eval.decode.repeats=0", "eval.decode.repeats=0"),
        ("eval.factors=[0,2]", "eval.factors"),
    ],
)
def test_evaluation_settings_are_checked_before_training(override: str, needle: str) -> None:
    """Evaluation runs after training: a bad setting must stop the run (or skip the sweep
    point) before any compute, not fail it at the end."""
    from pipeline.run.spec import RunConfigError

    with pytest.raises(RunConfigError, match=re.escape(needle)):
        validate_config(compose_train(["budget=cpu", override]))
