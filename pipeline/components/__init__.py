"""Component families. Each module holds small nn.Modules, a registry and a build function."""

from pipeline.components.attention import ATTENTION, build_attention
from pipeline.components.ffn import FFN, build_ffn
from pipeline.components.norm import NORM, build_norm
from pipeline.components.pos_enc import POS_ENC, build_pos_enc

REGISTRIES = {"pos_enc": POS_ENC, "norm": NORM, "attention": ATTENTION, "ffn": FFN}

__all__ = ["ATTENTION", "FFN", "NORM", "POS_ENC", "REGISTRIES", "build_attention", "build_ffn",
           "build_norm", "build_pos_enc"]
