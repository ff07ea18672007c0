"""The four component families, in the order every table and tag list uses (no torch import)."""

FAMILIES: tuple[str, ...] = ("pos_enc", "norm", "attention", "ffn")
