"""A tiny model with a real tokenizer for the API and CLI tests: the random `tiny_params` Llama
(tests/helpers.py TINY, 97 tokens) and a character-level `kvjax.tokenizer.Tokenizer` whose 97
ids are 4 specials and 93 characters (letters, digits, space, newline, punctuation), with a
ChatML-style chat template. Every id decodes to text, so any generated token is printable."""

from __future__ import annotations

import string

import jax.numpy as jnp
import pytest
from helpers import TINY
from tokenizers import AddedToken, decoders, models
from tokenizers import Tokenizer as HFTokenizer

from kvjax.loaders import Model
from kvjax.tokenizer import Tokenizer

SPECIALS = ("<pad>", "<|im_start|>", "<|im_end|>", "<unk>")  # ids 0 (TINY.pad_id), 1 (bos), 2 (eos), 3
CHARS = [c for c in string.ascii_letters + string.digits + " \n" + string.punctuation if c not in "`~^"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_tokenizer() -> Tokenizer:
    vocab = {t: i for i, t in enumerate(SPECIALS + tuple(CHARS))}
    assert len(vocab) == TINY.vocab_size
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS[:3]])
    return Tokenizer(backend, bos_id=1, eos_ids=(2,), chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_model(tiny_params) -> Model:
    return Model(TINY, tiny_params, char_tokenizer(), jnp.float32, "tiny")
