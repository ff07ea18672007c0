r"""Analytic inference cost of any configuration, without training or building the model.

    python -m pipeline.cost model=llama model.n_layers=32 model.d_model=4096 model.n_heads=32 \
        model.attention.n_kv_heads=8 model.vocab_size=32000 cost.context=32768 cost.batch=1

Overrides are the training command's (pipeline/conf/train.yaml) plus `cost.context` (default: the
model's context_length), `cost.batch` (1) and `cost.bytes` (bytes per KV element, 2) from
pipeline/conf/cost/default.yaml. The training budget is left out, so a preset keeps its own size
(`model=gpt3` is GPT-3 Small at 2048 context); pass `budget=cpu|gpu` to see a budget's model.
Conventions of every number: pipeline/evaluate/cost.py and docs/evaluation.md.
"""

from __future__ import annotations

import sys

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline import CONF_DIR
from pipeline.evaluate.cost import analytic_cost, format_table
from pipeline.model import ConfigError, ModelConfig
from pipeline.run.spec import model_from_config, resolve_budget


def compose_config(overrides: list[str]) -> DictConfig:
    """The train config with the `cost` node added and, unless asked for, no training budget."""
    extra = ["+cost=default"]
    if any(o.startswith("budget=") for o in overrides):
        overrides = resolve_budget(overrides)
    else:
        extra.append("~budget")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=extra + list(overrides))


def describe(m: ModelConfig, preset: str | None) -> str:
    kv = f" ({m.n_kv_heads} kv heads)" if m.n_kv_heads != m.n_heads else ""
    ffn = m.ffn.name + (f" ({m.ffn.top_k} of {m.ffn.n_experts} experts)" if m.ffn.name == "moe" else "")
    head = f"{preset}: " if preset else ""
    return (
        f"{head}{m.pos_enc.name} / {m.norm.name} ({m.placement}) / {m.attention.name}{kv} / {ffn}; "
        f"d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads, vocab {m.vocab_size}, "
        f"trained context {m.context_length}"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        cfg = compose_config(argv)
        model, preset = model_from_config(OmegaConf.to_container(cfg, resolve=True))  # as training builds it
        c = cfg.cost
        cost = analytic_cost(model, context_length=c.context, batch=c.batch, bytes_per_element=c.bytes)
    except (HydraException, OmegaConfBaseException, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(model, preset))
    print(format_table(cost))
    limit = model.pos_enc.max_positions()
    if limit is not None and cost["context_length"] > limit:
        print(
            f"note: context {int(cost['context_length'])} is past what pos_enc '{model.pos_enc.name}' can "
            f"encode (model.pos_enc.{model.pos_enc.limit_key}={limit}); this model cannot run there"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
