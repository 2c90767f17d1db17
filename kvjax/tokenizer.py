"""Tokenizer and chat template from the model's own files (GGUF metadata or tokenizer.json)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_SPECIAL_TYPES = (3, 4)


@dataclasses.dataclass
class Tokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer` with ids and a Jinja chat template."""

    backend: HFTokenizer
    bos_id: int | None
    eos_ids: tuple[int, ...]
    chat_template: str | None = None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added (special-token strings inside the
        text, such as <|im_start|>, map to their ids)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render messages [{'role','content'}] with the model's template (Jinja)."""
        if not self.chat_template:
            raise ValueError("this model ships no chat template; pass a plain prompt instead")
        import jinja2

        env = jinja2.Environment(trim_blocks=False, lstrip_blocks=False)
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt
        )

    @classmethod
    def from_gguf_parts(cls, parts: dict) -> Tokenizer:
        vocab = {tok: i for i, tok in enumerate(parts["tokens"])}
        merges = [tuple(m.split(" ", 1)) for m in parts["merges"]]
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        # SmolLM2/llama.cpp 'smollm' pre-tokenizer: digits split one by one, then byte-level.
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        tok.decoder = decoders.ByteLevel()
        types = parts["token_type"]
        specials = [
            AddedToken(parts["tokens"][i], special=True, normalized=False)
            for i, t in enumerate(types)
            if t in _SPECIAL_TYPES
        ]
        tok.add_special_tokens(specials)
        eos = parts["eos_id"]
        return cls(tok, parts["bos_id"], (int(eos),) if eos is not None else (), parts["chat_template"])

    @classmethod
    def from_hf_dir(cls, directory: str, bos_id, eos_ids) -> Tokenizer:
        import json
        import os

        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory}: no tokenizer.json")
        template = None
        cfg_path = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                template = json.load(f).get("chat_template")
        tmpl_path = os.path.join(directory, "chat_template.jinja")
        if template is None and os.path.isfile(tmpl_path):
            with open(tmpl_path) as f:
                template = f.read()
        return cls(HFTokenizer.from_file(path), bos_id, tuple(eos_ids), template)
