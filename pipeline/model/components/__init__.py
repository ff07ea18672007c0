"""Component families. Each module holds small nn.Modules, a registry and a build function."""

from pipeline.model.components.attention import ATTENTION, build_attention
from pipeline.model.components.ffn import FFN, build_ffn
from pipeline.model.components.norm import NORM, build_norm
from pipeline.model.components.pos_enc import POS_ENC, build_pos_enc
from pipeline.model.families import FAMILIES

REGISTRIES = dict(zip(FAMILIES, (POS_ENC, NORM, ATTENTION, FFN)))

__all__ = [
    "ATTENTION",
    "FFN",
    "NORM",
    "POS_ENC",
    "REGISTRIES",
    "build_attention",
    "build_ffn",
    "build_norm",
    "build_pos_enc",
]
