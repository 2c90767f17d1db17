"""Evaluation: offline texts, the tasks (`tasks`), perplexity with a policy active (`ppl`),
one cell (`evaluate`) and resumable sweeps (`sweep`, `report`).

    texts.py     load_text: built-in texts and files, nothing downloaded
    tasks.py     the task definitions: Episode, generators, answer check, versions
    ppl.py       perplexity: prefix prefilled and compressed, the rest teacher-forced
    session.py   compress a context once, ask its questions turn by turn
    shared.py    one dense capture for every policy that only evicts after prefill
    sweep.py     cells, settings, resume rules, the runner (`kvjax sweep`)
    run.py       evaluate: one sweep cell in memory (`kvjax eval`)
    report.py    markdown tables and PNG plots of a sweep folder (`kvjax report`)
    kvpress_bridge.py  the same sessions through HF transformers + kvpress
    commands.py  parsing of the CLI's lists and options
"""

from .ppl import perplexity
from .run import evaluate
from .sweep import CellFailed, SettingsMismatch
from .tasks import TASK_NAMES, Episode, Turn, check, make_episode, make_episodes
from .texts import load_text

__all__ = [
    "TASK_NAMES",
    "CellFailed",
    "Episode",
    "SettingsMismatch",
    "Turn",
    "check",
    "evaluate",
    "load_text",
    "make_episode",
    "make_episodes",
    "perplexity",
]

_MOVED = {
    "passkey_sample": "make_episode('passkey', tokenizer, context, depth, seed, text)",
    "kv_retrieval_sample": "make_episode('kv_retrieval', tokenizer, context, depth, seed, text, pairs=2)",
    "Sample": "Episode (its .prompt and .answer are the old Sample's fields)",
}


def __getattr__(name):
    # ImportError, not AttributeError: `from kvjax.eval import passkey_sample` turns an
    # AttributeError into a generic "cannot import name" and would lose the pointer
    if name in _MOVED:
        raise ImportError(
            f"kvjax.eval.{name} was replaced by kvjax.eval.{_MOVED[name]}: the one task definition "
            "that `kvjax eval` and `kvjax sweep` score"
        )
    raise AttributeError(f"module 'kvjax.eval' has no attribute {name!r}")
