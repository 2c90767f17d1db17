"""SCBench-style tasks: one shared context, several questions (turns) asked on it.

Every generator is `make(tokenizer, context, depth, seed, text, **options) -> Episode`,
deterministic per (seed, depth, text), with every answer present in the context:

* passkey — a 5-digit key hidden at `depth` (string retrieval, one turn);
* kv_retrieval — `pairs` "The code for WORD is NNNN." lines in one block at `depth`;
  `turns` of them are asked, one per turn (string retrieval, multi-turn);
* prefix_suffix — entries "PREFIX-NNNN-SUFFIX" spread over the context; asked for the
  number of the entry with a given prefix and suffix, among distractors sharing its suffix
  (and, with `prefix_distractors`, its prefix) (string retrieval);
* qa — questions answerable from one passage of the text itself (no insertions): facts
  "X the son of Y", "X the wife of Y", "X the daughter of Y", "X (the) king of Y" found in the
  context become "Who was the father of X?" ...; the answer prefix quotes the text's words
  before the answer ("And Gaal the son of"; `quote` of them ahead of the subject, 6 by
  default). Facts must be unambiguous in the window: one answer however often stated, not a
  link of a chain or genealogy ("Abimelech the son of Jerubbaal" with "Jerubbaal the son of
  Joash"; "Tola the son of Puah, the son of Dodo"), no apposition ("Balak the son of Zippor,
  king of Moab" makes no Zippor king), and the turns of an episode have distinct answers
  (semantic retrieval, multi-turn; needs a narrative text such as kjv-judges). Full cache on
  SmolLM2 (kjv-judges, 10 episodes x 2 turns, seed 0): 20/20 at 2k, 18/20 at 4k; without the
  quote ("Gaal the son of", quote=0) 18/20 and 13/20, and before the unambiguity rules (with
  "X the Gileadite" facts, asked "Jephthah the" -> "son of ...") 15/20 and 11/20;
* majority — `votes` lines "Vote for the ANIMAL." spread evenly over the whole context; asked
  which animal got the most votes (global information);
* mix — passkey, then kv_retrieval, then qa on the same context (multi-task).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from .tasks import _WORDS, _filler_tokens

_ANIMALS = ["horse", "camel", "eagle", "lion", "wolf", "bear", "goat", "sheep", "otter", "badger", "heron", "beaver"]
_STOP = {"And", "So", "Then", "But", "Now", "For", "The", "When", "Also", "Thus", "Behold", "Lord", "God", "LORD"}
_FACTS = (  # (regex, question); group 1 = subject, group 2 = answer
    (r"\b([A-Z][a-z]+),? the son of ([A-Z][a-z]+)\b", "Who was the father of {x}?"),
    (r"\b([A-Z][a-z]+),? the wife of ([A-Z][a-z]+)\b", "Whose wife was {x}?"),
    (r"\b([A-Z][a-z]+),? the daughter of ([A-Z][a-z]+)\b", "Whose daughter was {x}?"),
    # no comma: in "Balak the son of Zippor, king of Moab" the king is Balak, not Zippor
    (r"\b([A-Z][a-z]+) (?:the )?king of ([A-Z][a-z]+)\b", "Of which land was {x} king?"),
)
_KIN = r"(?:son|wife|daughter) of"
_LONGEST_QA = "Question: Of which land was Chushanrishathaim king?\nAnswer: Chushanrishathaim the king of"
# Text windows tried per qa / mix episode (seed, seed + 7919, ...) before giving up: facts are
# sparse, and the unambiguity rules and mentions= filter many of them out.
_ATTEMPTS = 48
HEAD = "Below is a long text. Read it carefully: I will ask you several questions about it.\n\n"


@dataclasses.dataclass(frozen=True)
class Turn:
    """question: text asked (ends with an answer prefix); answer: expected digits or word."""

    question: str
    answer: str


@dataclasses.dataclass(frozen=True)
class Episode:
    """A shared context and the turns asked on it. `pieces()` are the texts appended after
    the context: turn 0's question, then (previous gold answer + question) per later turn."""

    task: str
    context: str
    turns: tuple
    seed: int
    depth: float

    def pieces(self) -> list[str]:
        out = []
        for i, t in enumerate(self.turns):
            prev = f" {self.turns[i - 1].answer}." if i else ""
            out.append(prev + "\n\n" + t.question)
        return out


def check(generated: str, answer: str) -> bool:
    """Digits: the generation's first number equals the answer. Words: its first word
    equals the answer (case and punctuation ignored)."""
    if answer.isdigit():
        nums = re.findall(r"\d+", generated)
        return bool(nums) and nums[0] == answer
    words = re.findall(r"[A-Za-z]+", generated)
    return bool(words) and words[0].lower() == answer.lower()


def _weave(tokenizer, budget: int, text: str, seed: int, inserts) -> str:
    """HEAD + `text` filler of about `budget` tokens with each (depth, line) of `inserts`
    on its own line at that relative depth."""
    fixed = len(tokenizer.encode(HEAD)) + sum(len(tokenizer.encode(s)) + 2 for _, s in inserts)
    n = budget - fixed
    if n < 64:
        raise ValueError(f"context of {budget} tokens is too short for this task (needs > {fixed + 64})")
    filler = _filler_tokens(tokenizer, text, n, seed)
    cuts = sorted((int(round(d * len(filler))), s) for d, s in inserts)
    parts, prev = [], 0
    for cut, line in cuts:
        parts.append(tokenizer.decode(filler[prev:cut]) + "\n" + line + "\n")
        prev = cut
    parts.append(tokenizer.decode(filler[prev:]))
    return HEAD + "".join(parts)


def _fit(tokenizer, context: int, build, question: str) -> str:
    """Build a context so that it plus the first question holds at most `context` tokens."""
    q = len(tokenizer.encode("\n\n" + question))
    budget = context - q
    for _ in range(4):
        ctx = build(budget)
        excess = len(tokenizer.encode(ctx)) + q - context
        if excess <= 0:
            return ctx
        budget -= excess + 2
    raise ValueError(f"could not fit the task into context={context} tokens")


def passkey(tokenizer, context, depth, seed, text):
    """One 5-digit key at `depth`; one turn."""
    key = str(int(np.random.default_rng(seed).integers(10000, 100000)))
    q = "What is the pass key? Answer with the five-digit number only.\nAnswer: The pass key is"
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    ctx = _fit(tokenizer, context, lambda n: _weave(tokenizer, n, text, seed, [(depth, needle)]), q)
    return Episode("passkey", ctx, (Turn(q, key),), seed, depth)


def _kv_lines(rng, pairs: int):
    keys = rng.choice(len(_WORDS), size=pairs, replace=False)
    values = rng.integers(1000, 10000, size=pairs)
    return [(_WORDS[k], str(v)) for k, v in zip(keys, values)]


def _kv_turn(word, value):
    return Turn(
        f"What is the code for {word}? Answer with the four-digit number only.\nAnswer: The code for {word} is", value
    )


def kv_retrieval(tokenizer, context, depth, seed, text, pairs: int = 2, turns: int = 1, repeat: int = 1):
    """`pairs` word->4-digit lines in one block at `depth`; `turns` distinct keys asked.
    repeat: each line stated that many times in a row (as the passkey needle states its key
    twice), which makes the task easier for a small model at long context."""
    if not 1 <= turns <= pairs:
        raise ValueError(f"turns={turns} must be in [1, pairs={pairs}]")
    if repeat < 1:
        raise ValueError(f"repeat={repeat} must be >= 1")
    rng = np.random.default_rng(seed)
    kv = _kv_lines(rng, pairs)
    block = "\n".join(" ".join([f"The code for {w} is {v}."] * repeat) for w, v in kv)
    asked = [_kv_turn(*kv[i]) for i in rng.permutation(pairs)[:turns]]
    ctx = _fit(tokenizer, context, lambda n: _weave(tokenizer, n, text, seed, [(depth, block)]), asked[0].question)
    return Episode("kv_retrieval", ctx, tuple(asked), seed, depth)


def prefix_suffix(
    tokenizer, context, depth, seed, text, turns: int = 1, suffix_distractors: int = 2, prefix_distractors: int = 0
):
    """Per turn, a target entry at a spread depth (the first at `depth`) and distractors
    elsewhere sharing its suffix (and, if asked, its prefix). With a prefix distractor the
    full cache on SmolLM2 scored 2/4 at 2k (it copies the digits after the first matching
    prefix), so there is none by default."""
    rng = np.random.default_rng(seed)
    n = 2 + suffix_distractors + prefix_distractors
    words = [_WORDS[i] for i in rng.choice(len(_WORDS), size=n * turns, replace=False)]
    inserts, asked = [], []
    for t in range(turns):
        w = words[n * t : n * (t + 1)]
        p, s = w[0], w[1]
        nums = [str(x) for x in rng.choice(np.arange(1000, 10000), size=n - 1, replace=False)]
        lines = [f"Entry: {p}-{nums[0]}-{s}."]
        lines += [f"Entry: {w[2 + i]}-{nums[1 + i]}-{s}." for i in range(suffix_distractors)]
        lines += [
            f"Entry: {p}-{nums[1 + suffix_distractors + i]}-{w[2 + suffix_distractors + i]}."
            for i in range(prefix_distractors)
        ]
        d0 = depth if t == 0 else float(rng.uniform(0.05, 0.95))
        inserts += [(d0, lines[0])] + [(float(d), x) for d, x in zip(rng.uniform(0.05, 0.95, n - 2), lines[1:])]
        asked.append(
            Turn(f'Which entry starts with "{p}" and ends with "{s}"? Answer with its number.\nAnswer: {p}-', nums[0])
        )
    ctx = _fit(tokenizer, context, lambda k: _weave(tokenizer, k, text, seed, inserts), asked[0].question)
    return Episode("prefix_suffix", ctx, tuple(asked), seed, depth)


def _facts(ctx: str, mentions: int = 0, quote: int = 0):
    """Unambiguous facts [(char offset, question, answer prefix, answer)] in `ctx`; the
    answer prefix is the context's own words before the answer ("Ehud the son of").
    A fact is kept only if every statement of it in `ctx` gives the same answer, its answer
    is not itself given a father / husband in `ctx` ("Abimelech the son of Jerubbaal" with
    "Jerubbaal the son of Joash": SmolLM2 answers the grandfather) and it is not a later link
    of a genealogy ("Tola the son of Puah, the son of Dodo": Puah's). mentions > 0: only
    facts whose subject is named at most that often in `ctx`. quote > 0: the answer prefix
    starts up to that many words earlier in the sentence (never at or before the answer)."""
    found = [(q, m) for regex, q in _FACTS for m in re.finditer(regex, ctx)]
    kin = r"\b([A-Z][a-z]+),? the " + _KIN
    has_kin = {m.group(1) for m in re.finditer(kin, ctx)}
    seen: dict = {}
    for q, m in found:
        x, y = m.group(1), m.group(2)
        if x in _STOP or y in _STOP or x == y or x.endswith("ites"):
            continue
        if mentions and len(re.findall(rf"\b{x}\b", ctx)) > mentions:
            continue
        chained = y in has_kin or re.search(_KIN + r",? $", ctx[max(0, m.start() - 16) : m.start()]) is not None
        prefix = ctx[m.start() : m.start(2)].rstrip()
        if quote:  # up to `quote` more words of the sentence, never reaching back to the answer
            words = re.split(r"[.;:?!\n]", ctx[max(0, m.start() - 200) : m.start()])[-1].split()[-quote:]
            while words and any(re.search(rf"\b{y}\b", w) for w in words):
                words = words[1:]
            prefix = " ".join(words + [prefix])
        seen.setdefault((q, x), []).append((m.start(), prefix, y, chained))
    out = []
    for (q, x), hits in seen.items():
        if len({h[2] for h in hits}) == 1 and not any(h[3] for h in hits):
            out.append((hits[0][0], q.format(x=x), hits[0][1], hits[0][2]))
    return sorted(out)


def qa(tokenizer, context, depth, seed, text, turns: int = 2, mentions: int = 0, quote: int = 6):
    """`turns` questions about facts of the text window itself, with distinct answers (see
    module doc); mentions > 0: ask only about people named at most that often in the window
    (did not help: 15/20 at 2k, 13/20 at 4k before the unambiguity rules); quote: words of
    the sentence before the subject kept in the answer prefix (0: "X the son of" only)."""
    rng = np.random.default_rng(seed)
    for attempt in range(_ATTEMPTS):
        s = seed + 7919 * attempt
        ctx = _fit(
            tokenizer,
            context,
            lambda n: _weave(tokenizer, n, text, s, []),
            _LONGEST_QA.replace("Answer: ", "Answer: " + "Jerubbaal " * quote),
        )
        by_answer: dict = {}  # one episode never asks two facts with the same answer
        for f in _facts(ctx, mentions, quote):
            by_answer.setdefault(f[3], []).append(f)
        if len(by_answer) >= turns:
            break
    else:
        raise ValueError(
            f"text has fewer than {turns} facts ('X the son of Y', 'X king of Y', ...) with distinct "
            f"answers in a {context}-token window; the qa task needs a narrative text such as 'kjv-judges'"
        )
    answers = sorted(by_answer)
    picked = [by_answer[answers[i]] for i in rng.choice(len(answers), size=turns, replace=False)]
    picked = [f[int(rng.integers(0, len(f)))] for f in picked]
    asked = tuple(Turn(f"Question: {q}\nAnswer: {prefix}", y) for _, q, prefix, y in picked)
    return Episode("qa", ctx, asked, seed, picked[0][0] / len(ctx))


def majority(tokenizer, context, depth, seed, text, votes: int = 5, winner: int = 3):
    """`votes` lines "Vote for the ANIMAL." spread evenly over the context, `winner` of them
    for one animal, the others for distinct animals; asks which animal won. The answer
    prefix repeats the vote line's words, so the model's copy of an earlier line decides:
    votes seen more often weigh more (with "The animal with the most votes is the" the full
    cache scored 0/4 at 2k)."""
    if not votes // 2 < winner <= votes or votes - winner >= len(_ANIMALS):
        raise ValueError(f"winner={winner} must be a strict majority of votes={votes}")
    rng = np.random.default_rng(seed)
    names = [_ANIMALS[i] for i in rng.choice(len(_ANIMALS), size=1 + votes - winner, replace=False)]
    ballot = [names[0]] * winner + names[1:]
    ballot = [ballot[i] for i in rng.permutation(votes)]
    inserts = [(float(d), f"Vote for the {a}.") for d, a in zip(np.linspace(0.05, 0.95, votes), ballot)]
    q = "Votes were cast all through the text above. Which animal won the most votes?\nAnswer: Vote for the"
    ctx = _fit(tokenizer, context, lambda n: _weave(tokenizer, n, text, seed, inserts), q)
    return Episode("majority", ctx, (Turn(q, names[0]),), seed, depth)


def mix(
    tokenizer,
    context,
    depth,
    seed,
    text,
    pairs: int = 2,
    mentions: int = 0,
    quote: int = 6,
    repeat: int = 1,
    kv_first: bool = False,
):
    """passkey, kv_retrieval and qa turns over one context (qa facts from the text; mentions
    and quote as in qa; pairs and repeat as in kv_retrieval). kv_first: the kv_retrieval turn
    before the passkey turn (at 4k SmolLM2 answers a code question asked right after the
    passkey turn with the pass key again: 1/3 with the full cache)."""
    if repeat < 1:
        raise ValueError(f"repeat={repeat} must be >= 1")
    rng = np.random.default_rng(seed)
    key = str(int(rng.integers(10000, 100000)))
    kv = _kv_lines(rng, pairs)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    block = "\n".join(" ".join([f"The code for {w} is {v}."] * repeat) for w, v in kv)
    pk = Turn("What is the pass key? Answer with the five-digit number only.\nAnswer: The pass key is", key)
    inserts = [(depth, needle), (float((depth + 0.5) % 1.0), block)]
    for attempt in range(_ATTEMPTS):
        s = seed + 7919 * attempt
        ctx = _fit(tokenizer, context, lambda n: _weave(tokenizer, n, text, s, inserts), pk.question)
        facts = _facts(ctx, mentions, quote)
        if facts:
            break
    else:
        raise ValueError(
            f"text has no facts ('X the son of Y', ...) in a {context}-token window; "
            "the mix task needs a narrative text such as 'kjv-judges'"
        )
    _, q, prefix, y = facts[int(rng.integers(0, len(facts)))]
    kv_turn = _kv_turn(*kv[int(rng.integers(0, pairs))])
    turns = ((kv_turn, pk) if kv_first else (pk, kv_turn)) + (Turn(f"Question: {q}\nAnswer: {prefix}", y),)
    return Episode("mix", ctx, turns, seed, depth)


# Generator versions: bumped when a task's episodes change, so that a resumed sweep redoes the
# cells of the old version and a report labels them (qa/mix 2: 2026-11-27, unambiguous facts
# and quoted answer prefixes).
VERSIONS = {"qa": 2, "mix": 2}


def task_version(task: str) -> int:
    """The current generator version of `task` (1 unless bumped in VERSIONS)."""
    return VERSIONS.get(task, 1)


EPISODES = {
    "passkey": passkey,
    "kv_retrieval": kv_retrieval,
    "prefix_suffix": prefix_suffix,
    "qa": qa,
    "majority": majority,
    "mix": mix,
}


def make_episodes(task: str, tokenizer, context: int, trials: int, seed: int, text: str, **options) -> list[Episode]:
    """`trials` episodes of `task`, depths spread over [0.05, 0.95], sample seeds derived
    from `seed` as `kvjax.eval.evaluate` derives them."""
    if task not in EPISODES:
        raise ValueError(f"unknown task {task!r}; expected one of {tuple(EPISODES)} or 'ppl'")
    depths = np.linspace(0.05, 0.95, trials) if trials > 1 else np.array([0.5])
    return [
        EPISODES[task](tokenizer, context, float(d), seed * 100003 + i, text, **options) for i, d in enumerate(depths)
    ]
