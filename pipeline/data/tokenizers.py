"""Tokenizers: UTF-8 bytes (default, offline) or a `transformers` tokenizer."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int | None  # appended after every document
    dtype: type  # smallest numpy dtype holding every id

    def encode(self, text: str) -> np.ndarray: ...
    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, nothing to download, no unknown tokens (as in ByT5).

    Documents end with the NUL byte (id 0), which real text does not contain, so the model sees
    document boundaries without a vocabulary larger than 256.
    """

    name = "byte"
    vocab_size = 256
    eos_id = 0
    dtype = np.uint8

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `transformers` tokenizer by hub name or local directory (needs a network for hub names)."""

    def __init__(self, name: str):
        from transformers import AutoTokenizer

        self.name = name
        self.tok = AutoTokenizer.from_pretrained(name)
        self.tok.model_max_length = sys.maxsize  # documents are longer than the model's context; no warning
        self.vocab_size = len(self.tok)
        self.eos_id = self.tok.eos_token_id
        self.dtype = np.uint16 if self.vocab_size <= 2**16 else np.int32

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False), dtype=self.dtype)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids])


def build_tokenizer(name: str) -> Tokenizer:
    return ByteTokenizer() if name == "byte" else HFTokenizer(name)
