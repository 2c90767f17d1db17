"""Helpers shared by the tests of tests/eval: a character tokenizer and the tiny random model
built on it (fast enough to run real sweeps, episodes and calibrations on CPU)."""

from __future__ import annotations

import types

import jax.numpy as jnp


class CharTokenizer:
    """Printable ASCII -> ids 3..96 (newlines become spaces); enough for the tiny model."""

    eos_ids = (2,)

    def encode(self, text):
        return [min(max(ord(c), 32), 125) - 29 for c in text.replace("\n", " ")]

    def decode(self, ids):
        return "".join(chr(int(i) + 29) for i in ids if int(i) >= 3)


def tiny_model(config, params):
    """A model object as `kvjax.loaders.load` returns one, for the tiny config and params."""
    return types.SimpleNamespace(config=config, params=params, dtype=jnp.float32, tokenizer=CharTokenizer())
