"""Retrieval tasks over a haystack, generated deterministically from a seed.

passkey: a 5-digit pass key hidden at a chosen depth of a long filler text; the model is
asked for it at the end (plain prompt, no chat template: that scores best on SmolLM2).
kv_retrieval: many "key: value" lines (short word keys, 4-digit values) inside filler;
the model is asked for one key's value. Both return the prompt and the expected answer.
"""

from __future__ import annotations

import dataclasses

import numpy as np

_WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "piano",
    "garden",
    "silver",
    "candle",
    "forest",
    "mirror",
    "rocket",
    "pepper",
    "violet",
    "harbor",
    "castle",
    "meadow",
    "thunder",
    "lantern",
    "falcon",
    "copper",
    "orchid",
    "glacier",
    "compass",
    "velvet",
    "saddle",
    "walnut",
    "beacon",
    "canyon",
    "marble",
    "willow",
    "ember",
    "quartz",
    "dolphin",
    "maple",
    "cobalt",
    "nectar",
    "prairie",
    "summit",
    "pebble",
    "raven",
    "cedar",
    "tulip",
    "anchor",
    "blossom",
    "coral",
    "dune",
    "fern",
    "harvest",
    "island",
    "jasmine",
    "kettle",
    "ladder",
    "mango",
    "nickel",
    "oasis",
    "parrot",
    "quiver",
    "ribbon",
    "sparrow",
    "timber",
    "umbrella",
    "vessel",
    "wagon",
    "yarrow",
    "zephyr",
]


@dataclasses.dataclass(frozen=True)
class Sample:
    """prompt: full text fed to the model; answer: expected continuation (stripped);
    needle_position: token index where the needle starts (approx.)."""

    prompt: str
    answer: str
    depth: float
    seed: int


def _filler_tokens(tokenizer, text: str, n: int, seed: int) -> list[int]:
    """n tokens of filler starting at a seed-dependent paragraph of `text`."""
    ids = tokenizer.encode(text[: 40 * n + 4000]) if len(text) > 40 * n + 4000 else tokenizer.encode(text)
    if len(ids) < n:
        reps = -(-n // max(1, len(ids)))
        ids = (ids + tokenizer.encode("\n")) * reps
    start = int(np.random.default_rng(seed).integers(0, max(1, len(ids) - n)))
    return ids[start : start + n]


def _assemble(tokenizer, context: int, head: str, needle: str, question: str, text: str, depth: float, seed: int):
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    fixed = len(tokenizer.encode(head)) + len(tokenizer.encode(needle)) + len(tokenizer.encode(question)) + 4
    n_fill = context - fixed
    if n_fill < 16:
        raise ValueError(f"context={context} tokens is too short for this task (needs > {fixed + 16})")
    filler = _filler_tokens(tokenizer, text, n_fill, seed)
    cut = int(round(depth * len(filler)))
    before = tokenizer.decode(filler[:cut])
    after = tokenizer.decode(filler[cut:])
    # Put the needle on its own line so it never fuses with neighbouring tokens.
    return head + before + "\n" + needle + "\n" + after + "\n" + question


def passkey_sample(tokenizer, context: int, depth: float, seed: int, text: str) -> Sample:
    """Passkey retrieval prompt of about `context` tokens; needle at relative `depth`."""
    rng = np.random.default_rng(seed)
    key = str(int(rng.integers(10000, 100000)))
    head = (
        "There is an important piece of information hidden inside a lot of irrelevant text. "
        "Find it and memorize it. I will quiz you about it.\n\n"
    )
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    question = "\n\nWhat is the pass key? Answer with the five-digit number only.\nAnswer: The pass key is"
    return Sample(_assemble(tokenizer, context, head, needle, question, text, depth, seed), key, depth, seed)


def kv_retrieval_sample(tokenizer, context: int, depth: float, seed: int, text: str, pairs: int = 2) -> Sample:
    """Key-value retrieval: `pairs` word->4-digit lines in one block at `depth`; asks one.
    Two pairs by default: with three, the full cache on SmolLM2 scored 3/6 at 2k."""
    rng = np.random.default_rng(seed)
    keys = rng.choice(len(_WORDS), size=pairs, replace=False)
    values = rng.integers(1000, 10000, size=pairs)
    lines = "\n".join(f"The code for {_WORDS[k]} is {v}." for k, v in zip(keys, values))
    target = int(rng.integers(0, pairs))
    head = "Below is a long text. Somewhere in it is a list of secret codes. Find the list and remember every code.\n\n"
    word = _WORDS[keys[target]]
    question = (
        f"\n\nWhat is the code for {word}? Answer with the four-digit number only.\nAnswer: The code for {word} is"
    )
    return Sample(
        _assemble(tokenizer, context, head, lines, question, text, depth, seed), str(values[target]), depth, seed
    )


TASKS = {"passkey": passkey_sample, "kv_retrieval": kv_retrieval_sample}


def is_correct(generated: str, answer: str) -> bool:
    """The answer's digits must open the generation (whitespace and punctuation skipped)."""
    digits = "".join(ch for ch in generated.strip() if ch.isdigit() or ch.isspace()).split()
    return bool(digits) and digits[0] == answer
