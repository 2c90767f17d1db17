"""Offline texts for haystacks and perplexity. Nothing is downloaded.

Names: "kjv-judges" — the book of Judges from the public-domain King James Bible, shipped
in the package (kvjax/data/kjv_judges.txt, built from Debian's bible-kjv-text by
benchmarks/make_kjv_text.sh; about 25k tokens of plain prose, no digits); "pydoc" — the
Python reference topics of the standard library (`pydoc_data.topics`, always present);
anything else is read as a file path (UTF-8).
"""

from __future__ import annotations

import os

BUILTIN = ("kjv-judges", "pydoc")
DEFAULT_TEXT = "kjv-judges"


def load_text(name_or_path: str = DEFAULT_TEXT) -> str:
    """Return the text called `name_or_path` (see module doc). Raises ValueError for an
    unreadable or empty file."""
    if name_or_path == "pydoc":
        import pydoc_data.topics as topics

        return "\n\n".join(topics.topics[k].strip() for k in sorted(topics.topics))
    if name_or_path == "kjv-judges":
        with open(
            os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "kjv_judges.txt"), encoding="utf-8"
        ) as f:
            return f.read()
    path = os.path.expanduser(name_or_path)
    if not os.path.isfile(path):
        raise ValueError(f"text {name_or_path!r} is neither a built-in text {BUILTIN} nor a readable file")
    try:
        with open(path, encoding="utf-8", errors="strict") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read text file {path}: {e}") from e
    if len(text.split()) < 50:
        raise ValueError(f"text file {path} holds only {len(text.split())} words; a haystack needs more")
    return text
