"""Adding a component takes one Python class and one YAML file (docs/components.md).

A toy positional encoding is registered here, inside the test only, and its YAML file is written
into a temporary Hydra search path. With no other file of the repository touched, it builds
(forward, backward, cached generation), validates (each bad value gives one clear error), counts
its cost (analytic parameters == numel, FLOPs == the flop counter) and sweeps (the Optuna
sweeper's grammar and the study's validate hook accept it).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Literal

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from hydra_plugins.pipeline_optuna_sweeper.search_space import parse
from pipeline import CONF_DIR
from pipeline.evaluate.cost import analytic_cost
from pipeline.model import ConfigError, DecoderLM, ModelConfig
from pipeline.model.components import POS_ENC, Cost, Dims
from pipeline.model.components.norm import NormConfig
from pipeline.model.components.pos_enc import Learned, LearnedConfig
from pipeline.run.spec import validate_config


# -- the component: one config dataclass and one module class ----------------------------------
# Learned positions with a per-token gate: the table, its max_len (fitted to the model's reach)
# and its checks are the learned encoding's, inherited; the toy adds the gate.
@dataclass
class GatedConfig(LearnedConfig):
    name: str = "toy"
    gate: Literal["sigmoid", "tanh"] = "sigmoid"

    def cost(self, dims: Dims, context_length: int) -> Cost:
        table = super().cost(dims, context_length)
        # plus a d -> 1 gate applied to every token (d MACs)
        return Cost(params=table.params + dims.d_model, macs=table.macs + dims.d_model)


class Gated(Learned):
    """x + gate(x w) * P[pos]: learned positions scaled per token by the token itself."""

    Config = GatedConfig

    def __init__(self, cfg: GatedConfig, dims: Dims, layer: int) -> None:
        super().__init__(cfg, dims, layer)
        self.w = nn.Linear(dims.d_model, 1, bias=False)
        self.gate = torch.sigmoid if cfg.gate == "sigmoid" else torch.tanh

    def embed(self, x: Tensor, offset: int) -> Tensor:
        return x + self.gate(self.w(x)) * self.rows(offset, x.shape[1])


SMALL = dict(d_model=32, n_layers=2, n_heads=4, context_length=16, vocab_size=50)


@pytest.fixture
def toy():
    """Register the toy for one test; the registry is as before afterwards."""
    before = POS_ENC.names()
    POS_ENC.register("toy")(Gated)
    yield
    POS_ENC.unregister("toy")
    assert POS_ENC.names() == before


@pytest.fixture
def toy_conf(tmp_path):
    """The toy's one YAML file, in a search path of its own: its dataclass defaults."""
    path = tmp_path / "model" / "pos_enc" / "toy.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(dataclasses.asdict(GatedConfig())))
    return tmp_path


# -- builds ------------------------------------------------------------------------------------
def test_toy_builds_trains_and_generates(toy):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("llama", pos_enc={"name": "toy", "gate": "tanh"}, **SMALL)
    assert isinstance(cfg.pos_enc, GatedConfig) and cfg.pos_enc.max_len == 8 * 16  # fitted to the reach
    model = DecoderLM(cfg)
    assert isinstance(model.pos, Gated) and model.pos.gate is torch.tanh
    x = torch.randint(0, 50, (2, 12))
    logits = model(x)
    assert logits.shape == (2, 12, 50)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.roll(-1, 1).flatten()).backward()
    grad = model.pos.table.weight.grad
    assert grad[:12].abs().sum() > 0 and model.pos.w.weight.grad.abs().sum() > 0
    assert (grad[12:] == 0).all()  # positions never seen get no gradient
    model.eval()
    out = model.generate(x[:, :4], max_new_tokens=6, temperature=0.0)
    full = model(out[:, :-1]).argmax(-1)[:, 3:]  # greedy decode with the cache == without it
    assert torch.equal(out[:, 4:], full)


# -- validates ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pos_enc, pattern",
    [
        ({"gate": "relu"}, r"model\.pos_enc\.gate='relu' is not valid; valid: sigmoid, tanh"),
        ({"max_len": 8}, r"model\.pos_enc\.max_len=8 < model\.context_length=16; the learned table needs"),
        ({"gait": "tanh"}, r"model\.pos_enc\.gait is not a setting of pos_enc 'toy'; .*did you mean gate\?"),
    ],
)
def test_toy_bad_values_give_one_clear_error(toy, pos_enc, pattern):
    with pytest.raises(ConfigError, match=pattern):
        ModelConfig.from_preset("gpt2", pos_enc={"name": "toy", **pos_enc}, **SMALL)


def test_toy_is_unknown_once_unregistered():
    valid = re.escape(", ".join(POS_ENC.names()))
    assert "toy" not in valid
    with pytest.raises(ConfigError, match=rf"model\.pos_enc\.name='toy' is not a known pos_enc; valid: {valid}$"):
        ModelConfig.from_preset("gpt2", pos_enc={"name": "toy"}, **SMALL)


# -- counts its cost ---------------------------------------------------------------------------
def test_toy_cost_is_counted(toy):
    # The math backend: its matmuls are what FlopCounterMode counts on a CPU (sdpa's CPU kernel is not).
    math = {"name": "mha", "backend": "math"}
    cfg = ModelConfig.from_preset("gpt2", pos_enc={"name": "toy", "max_len": 40}, attention=math, **SMALL)
    model = DecoderLM(cfg).eval()
    cost = analytic_cost(cfg)
    assert cost["params_total"] == sum(p.numel() for p in model.parameters())
    batch, T = 2, cfg.context_length
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, 50, (batch, T)))
    assert cost["flops_per_token"] == counter.get_total_flops() / (batch * T)
    nope = analytic_cost(ModelConfig.from_preset("gpt2", pos_enc={"name": "nope"}, attention=math, **SMALL))
    assert cost["flops_per_token"] - nope["flops_per_token"] == 2 * cfg.d_model  # its gate, 2 FLOPs per MAC


# -- sweeps ------------------------------------------------------------------------------------
def test_toy_sweeps_from_its_yaml_file(toy, toy_conf):
    """The sweeper's grammar takes it as a level, and each trial composes and validates."""
    space = parse(["model/pos_enc=choice(rope,toy)"], OverridesParser.create())
    assert space.grid() == {"model/pos_enc": ["rope", "toy"]}
    specs = {}
    for name in space.grid()["model/pos_enc"]:
        overrides = space.overrides({"model/pos_enc": name})
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(
                "train",
                [f"hydra.searchpath=[file://{toy_conf}]", "model=llama", "budget=cpu", "eval.factors=[1,2,4]"]
                + overrides,
            )
        specs[name] = validate_config(cfg)
    toy_cfg = specs["toy"].model.pos_enc
    assert isinstance(toy_cfg, GatedConfig) and toy_cfg.gate == "sigmoid"
    assert toy_cfg.max_len == 4 * specs["toy"].model.context_length  # max(eval.factors) x context
    # Swapping the positional encoding changes nothing else.
    rope = specs["rope"].model
    assert dataclasses.replace(specs["toy"].model, pos_enc=rope.pos_enc) == rope


def test_registry_refuses_a_class_whose_config_does_not_match():
    """The config alone finds its class: its family and default name must be the registry's."""

    class Misnamed(Gated):
        Config = GatedConfig  # default name 'toy'

    with pytest.raises(TypeError, match="default name is 'other'"):
        POS_ENC.register("other")(Misnamed)

    class WrongFamily(Gated):
        Config = NormConfig

    with pytest.raises(TypeError, match="must be a pos_enc config"):
        POS_ENC.register("layernorm")(WrongFamily)
    assert "other" not in POS_ENC and "layernorm" not in POS_ENC
