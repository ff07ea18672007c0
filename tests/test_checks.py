"""The shared config checks: one wording for unknown keys and Literal choices, at every call site."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
from hydra import compose, initialize_config_dir

from pipeline import CONF_DIR
from pipeline.checks import check_choices, check_keys, literal_fields
from pipeline.data.config import DataConfig, DataConfigError
from pipeline.evaluate import EvalConfig
from pipeline.model import ConfigError, ModelConfig
from pipeline.run.spec import RunConfigError, validate_config


@dataclass
class Node:
    size: int = 1
    mode: Literal["a", "b"] = "a"
    maybe: Literal["x"] | None = None
    free: str = "anything"


def test_unknown_key_names_key_owner_valid_keys_and_closest():
    with pytest.raises(KeyError) as err:
        check_keys("thing", {"size": 2, "mdoe": "a"}, Node, KeyError, owner="the thing")
    assert err.value.args[0] == (
        "thing.mdoe is not a setting of the thing; valid: free, maybe, mode, size; did you mean mode?"
    )
    with pytest.raises(ValueError, match=r"thing\.zzz is not a setting of thing; valid: free, maybe, mode, size$"):
        check_keys("thing", ["zzz"], Node)  # nothing close: no hint
    check_keys("thing", ["size", "mode"], Node)  # known keys pass


def test_literal_fields_are_checked_and_others_are_not():
    assert literal_fields(Node) == {"mode": ("a", "b"), "maybe": ("x", None)}
    check_choices("thing", Node(maybe=None, free="whatever"))
    with pytest.raises(ValueError, match=r"^thing\.mode='c' is not valid; valid: a, b$"):
        check_choices("thing", Node(mode="c"))
    with pytest.raises(ValueError, match=r"^thing\.maybe='y' is not valid; valid: x, null$"):
        check_choices("thing", Node(maybe="y"))


def _train_config(override: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", ["budget=cpu", override])


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda: ModelConfig.from_dict({"d_modl": 8}), ConfigError, "model.d_modl is not a setting of model"),
        (
            lambda: ModelConfig(ffn={"name": "gelu", "hiden": 8}),
            ConfigError,
            "model.ffn.hiden is not a setting of ffn 'gelu'",
        ),
        (lambda: DataConfig.from_dict({"tokenizr": "byte"}), DataConfigError, "data.tokenizr is not a setting of data"),
        (lambda: EvalConfig.from_dict({"factor": [1]}), ValueError, "eval.factor is not a setting of eval"),
        (
            lambda: EvalConfig.from_dict({"decode": {"repeat": 1}}),
            ValueError,
            "eval.decode.repeat is not a setting of eval.decode",
        ),
        (
            lambda: validate_config(_train_config("+optimizer.weight_decy=0.1")),
            RunConfigError,
            "optimizer.weight_decy is not a setting of optimizer",
        ),
    ],
)
def test_every_config_words_an_unknown_key_the_same_way(build, error, message):
    with pytest.raises(error) as err:
        build()
    assert str(err.value).startswith(message + "; valid: ")
    assert "did you mean" in str(err.value)
