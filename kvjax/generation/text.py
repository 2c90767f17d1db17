"""Token ids to text, one token at a time, cut at the first stop string.

`RowText` turns one row's generated ids into printable pieces as they arrive: it decodes a
short window of recent ids (the incremental detokenization of HF's TextStreamer and vLLM),
holds back a piece that ends inside a multi-byte character (the tokenizer shows it as U+FFFD)
or that could be the start of a stop string, and stops at the first stop string. The pieces
of a row concatenate to its final text.
"""

from __future__ import annotations

_INCOMPLETE = "\ufffd"


class RowText:
    """One row's text. `push(token_id, last)` returns the newly printable piece ("" while
    held back); after a stop string, `stopped` is True and `n_tokens` counts the tokens up to
    and including the one that completed it (as a stop token counts)."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""  # decoded so far (a stop string and what follows it removed once found)
        self.emitted = 0  # characters of `text` handed out as pieces
        self.stopped = False
        self._prefix = 0  # ids[_prefix:_read] decode to the tail of `text` already read
        self._read = 0

    @property
    def n_tokens(self) -> int:
        return len(self.ids)

    def _advance(self) -> None:
        """Decode the ids not yet read into `text` (unless they end mid-character)."""
        window = self.tokenizer.decode(self.ids[self._prefix :])
        before = self.tokenizer.decode(self.ids[self._prefix : self._read])
        if len(window) > len(before) and not window.endswith(_INCOMPLETE):
            self.text += window[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)

    def _flush(self) -> None:
        """At the end: take whatever the unread ids decode to, replacement characters included."""
        if self._read < len(self.ids):
            window = self.tokenizer.decode(self.ids[self._prefix :])
            before = self.tokenizer.decode(self.ids[self._prefix : self._read])
            self.text += window[len(before) :]
            self._read = len(self.ids)

    def push(self, token_id: int, last: bool = False) -> str:
        """Add one generated token; `last`: the row ends with it (flush what was held)."""
        if self.stopped:
            return ""
        searched = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.ids.append(int(token_id))
        self._advance()
        if last:
            self._flush()
        hits = [i for i in (self.text.find(s, searched) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            last = True
        end = len(self.text) if last else len(self.text) - self._held_back()
        piece = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return piece

    def _held_back(self) -> int:
        """Length of the longest tail of `text` that begins some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best


def cut_at_stop(tokenizer, ids, stop: tuple[str, ...]) -> tuple[str, int]:
    """(text of `ids` up to the first stop string, tokens it took) for a finished row."""
    row = RowText(tokenizer, stop)
    for i, t in enumerate(ids):
        row.push(t, last=i == len(ids) - 1)
        if row.stopped:
            break
    return row.text, row.n_tokens
