"""The evaluation tasks: one definition of each, used by `kvjax eval`, `kvjax sweep`, the
notebooks and the benchmarks (SCBench-style: one shared context, several questions asked on it).

Every generator is `make(tokenizer, context, depth, seed, text, **options) -> Episode`, with
`text` the haystack itself (see `texts.load_text`), deterministic per (seed, depth, text), the
context plus the first question at most `context` tokens, and every answer present in the
context:

* passkey — a 5-digit key hidden at `depth` (string retrieval, one turn);
* kv_retrieval — `pairs` "The code for WORD is NNNN." lines in one block at `depth`;
  `turns` of them are asked, one per turn (string retrieval, multi-turn);
* prefix_suffix — entries "PREFIX-NNNN-SUFFIX" spread over the context; asked for the
  number of the entry with a given prefix and suffix, among distractors sharing its suffix
  (and, with `prefix_distractors`, its prefix) (string retrieval);
* qa — questions answerable from one passage of the text itself (no insertions): facts
  "X the son of Y", "X the wife of Y", "X the daughter of Y", "X (the) king of Y" found in the
  context become "Who was the father of X?" ...; the answer prefix quotes the text's words
  before the answer ("And Gaal the son of"; `quote` of them ahead of the subject). Facts must
  be unambiguous in the window: one answer however often stated, not a link of a chain or
  genealogy ("Abimelech the son of Jerubbaal" with "Jerubbaal the son of Joash"; "Tola the son
  of Puah, the son of Dodo"), no apposition ("Balak the son of Zippor, king of Moab" makes no
  Zippor king), and the turns of an episode have distinct answers (semantic retrieval,
  multi-turn; needs a narrative text such as kjv-judges);
* majority — `votes` lines "Vote for the ANIMAL." spread evenly over the whole context; asked
  which animal got the most votes (global information);
* mix — passkey, then kv_retrieval, then qa on the same context (multi-task).

`TASKS` holds each task's generator and version. A version is bumped whenever a task's
episodes change, so that a resumed sweep redoes the cells of the old version and a report
labels them (qa and mix are at version 2: unambiguous facts and quoted answer prefixes).
"ppl" (perplexity, `kvjax.eval.ppl`) is the one task without episodes.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable

import numpy as np

_WORDS = (
    "apple", "river", "stone", "cloud", "tiger", "piano", "garden", "silver", "candle", "forest", "mirror",
    "rocket", "pepper", "violet", "harbor", "castle", "meadow", "thunder", "lantern", "falcon", "copper",
    "orchid", "glacier", "compass", "velvet", "saddle", "walnut", "beacon", "canyon", "marble", "willow",
    "ember", "quartz", "dolphin", "maple", "cobalt", "nectar", "prairie", "summit", "pebble", "raven",
    "cedar", "tulip", "anchor", "blossom", "coral", "dune", "fern", "harvest", "island", "jasmine", "kettle",
    "ladder", "mango", "nickel", "oasis", "parrot", "quiver", "ribbon", "sparrow", "timber", "umbrella",
    "vessel", "wagon", "yarrow", "zephyr"
)  # fmt: skip
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
PPL = "ppl"


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

    @property
    def prompt(self) -> str:
        """The context and the first question as one text (what a single `generate` call is given)."""
        return self.context + self.pieces()[0]

    @property
    def answer(self) -> str:
        """The first turn's answer."""
        return self.turns[0].answer


def check(generated: str, answer: str) -> bool:
    """Digits: the generation's first number equals the answer. Words: its first word
    equals the answer (case and punctuation ignored)."""
    if answer.isdigit():
        nums = re.findall(r"\d+", generated)
        return bool(nums) and nums[0] == answer
    words = re.findall(r"[A-Za-z]+", generated)
    return bool(words) and words[0].lower() == answer.lower()


def _filler_tokens(tokenizer, text: str, n: int, seed: int) -> list[int]:
    """n tokens of filler starting at a seed-dependent paragraph of `text`."""
    ids = tokenizer.encode(text[: 40 * n + 4000]) if len(text) > 40 * n + 4000 else tokenizer.encode(text)
    if len(ids) < n:
        reps = -(-n // max(1, len(ids)))
        ids = (ids + tokenizer.encode("\n")) * reps
    start = int(np.random.default_rng(seed).integers(0, max(1, len(ids) - n)))
    return ids[start : start + n]


def _weave(tokenizer, budget: int, text: str, seed: int, inserts) -> str:
    """HEAD + `text` filler of about `budget` tokens with each (depth, line) of `inserts`
    on its own line at that relative depth."""
    fixed = len(tokenizer.encode(HEAD)) + sum(len(tokenizer.encode(s)) + 2 for _, s in inserts)
    n = budget - fixed
    if n < 64:
        raise ValueError(f"context of {budget} tokens is too short for this task (needs > {fixed + 64})")
    filler = _filler_tokens(tokenizer, text, n, seed)
    cuts = sorted((round(d * len(filler)), s) for d, s in inserts)
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


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


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
    _need(1 <= pairs <= len(_WORDS), f"pairs={pairs} must be in [1, {len(_WORDS)}]")
    _need(1 <= turns <= pairs, f"turns={turns} must be in [1, pairs={pairs}]")
    _need(repeat >= 1, f"repeat={repeat} must be >= 1")
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
    elsewhere sharing its suffix (and, if asked, its prefix). No prefix distractor by
    default: with one, a small model copies the digits after the first matching prefix."""
    n = 2 + suffix_distractors + prefix_distractors
    _need(turns >= 1, f"turns={turns} must be >= 1")
    _need(min(suffix_distractors, prefix_distractors) >= 0, "suffix_distractors and prefix_distractors must be >= 0")
    _need(n * turns <= len(_WORDS), f"turns x (2 + distractors) = {n * turns} words; at most {len(_WORDS)} exist")
    rng = np.random.default_rng(seed)
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
    "Jerubbaal the son of Joash": a small model answers the grandfather) and it is not a later
    link of a genealogy ("Tola the son of Puah, the son of Dodo": Puah's). mentions > 0: only
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
    module doc); mentions > 0: ask only about people named at most that often in the window;
    quote: words of the sentence before the subject kept in the answer prefix (0: "X the son
    of" only). `depth` is not used: the episode's depth is where its first fact stands."""
    _need(turns >= 1, f"turns={turns} must be >= 1")
    _need(mentions >= 0 and quote >= 0, f"mentions={mentions} and quote={quote} must be >= 0")
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
    votes seen more often weigh more (a prefix such as "The animal with the most votes is
    the" asks the model to count, which a small model cannot)."""
    _need(
        votes // 2 < winner <= votes and votes - winner < len(_ANIMALS),
        f"winner={winner} must be a strict majority of votes={votes}",
    )
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
    before the passkey turn (a code question asked right after the passkey turn tempts a
    small model to repeat the pass key)."""
    _need(1 <= pairs <= len(_WORDS), f"pairs={pairs} must be in [1, {len(_WORDS)}]")
    _need(repeat >= 1, f"repeat={repeat} must be >= 1")
    _need(mentions >= 0 and quote >= 0, f"mentions={mentions} and quote={quote} must be >= 0")
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


@dataclasses.dataclass(frozen=True)
class Task:
    """One task: its episode generator, its version (bumped whenever its episodes change),
    whether it reads facts from a narrative text, and the sweep's default number of trials."""

    name: str
    make: Callable[..., Episode]
    version: int = 1
    narrative: bool = False
    default_trials: int = 10

    def option_defaults(self) -> dict:
        """{option: default} of the generator's keyword options."""
        params = list(inspect.signature(self.make).parameters.values())[5:]  # after (tok, context, depth, seed, text)
        return {p.name: p.default for p in params}


TASKS = {
    t.name: t
    for t in (
        Task("passkey", passkey, default_trials=20),
        Task("kv_retrieval", kv_retrieval),
        Task("prefix_suffix", prefix_suffix),
        Task("qa", qa, version=2, narrative=True),
        Task("majority", majority),
        Task("mix", mix, version=2, narrative=True),
    )
}
TASK_NAMES = (*TASKS, PPL)


def _task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {TASK_NAMES}")
    return TASKS[name]


def task_version(task: str) -> int:
    """The current version of `task`'s episodes ("ppl": 1)."""
    return 1 if task == PPL else _task(task).version


class _OptionsChecked(Exception):
    """Raised by `_NoTokenizer`: the generator got past its option checks."""


class _NoTokenizer:
    def encode(self, text):
        raise _OptionsChecked

    decode = encode


def check_options(task: str, options: dict | None) -> dict:
    """Raise ValueError naming the option and what was expected for an option `task` does
    not take, a value of the wrong type, or a value out of range; return the options. Every
    generator checks its options before it reads the tokenizer, so they are checked here by
    running it with a tokenizer that stops it at first use (no model needed)."""
    t = _task(task)
    options = dict(options or {})
    defaults = t.option_defaults()
    for k, v in options.items():
        if k not in defaults:
            takes = ", ".join(f"{n}={d}" for n, d in defaults.items()) or "no options"
            raise ValueError(f"task {task!r} has no option {k!r}; it takes {takes}")
        want = type(defaults[k])
        ok = isinstance(v, bool) if want is bool else isinstance(v, (int, np.integer)) and not isinstance(v, bool)
        if not ok:
            raise ValueError(f"{task} option {k}={v!r} must be {'true or false' if want is bool else 'an integer'}")
    try:
        t.make(_NoTokenizer(), 4096, 0.5, 0, "", **options)
    except _OptionsChecked:
        pass
    except ValueError as e:
        raise ValueError(f"{task} options: {e}") from None
    return options


def check_text(task: str, haystack: str, name: str = "the text") -> None:
    """Raise ValueError when `task` reads facts from a narrative text (qa, mix) and
    `haystack` states none ("X the son of Y", ...)."""
    if task != PPL and _task(task).narrative and not _facts(haystack):
        raise ValueError(
            f"task {task!r} asks about facts stated in the text ('X the son of Y', 'X king of Y', ...) and "
            f"{name} states none; use a narrative text such as 'kjv-judges'"
        )


def make_episode(task: str, tokenizer, context: int, depth: float, seed: int, text: str, **options) -> Episode:
    """One episode of `task` (see module doc); `text` is the haystack itself (`load_text(name)`)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    return _task(task).make(tokenizer, context, depth, seed, text, **check_options(task, options))


def make_episodes(task: str, tokenizer, context: int, trials: int, seed: int, text: str, **options) -> list[Episode]:
    """`trials` episodes of `task`, depths spread evenly over [0.05, 0.95] (0.5 for one),
    episode i seeded `seed * 100003 + i`: the episodes `kvjax eval` and `kvjax sweep` score."""
    if trials < 1:
        raise ValueError(f"trials={trials} must be >= 1")
    options = check_options(task, options)
    depths = np.linspace(0.05, 0.95, trials) if trials > 1 else np.array([0.5])
    make = _task(task).make
    return [make(tokenizer, context, float(d), seed * 100003 + i, text, **options) for i, d in enumerate(depths)]
