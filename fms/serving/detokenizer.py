"""Incremental detokenization of one request's output, and the stop strings that end it.

Each new token decodes only a short window of ids, never the whole output again:

    ids:   ... p p p | o o o o | n          prefix_offset .. read_offset: already turned into text
                     ^prefix    ^read        new text = decode(prefix..end) minus decode(prefix..read)

The window starts a few tokens back (prefix_offset) so that a tokenizer that drops or adds a leading
space (SentencePiece) or splits one character over several byte tokens decodes the new token in
context; text ending in U+FFFD (an incomplete UTF-8 sequence) waits for the next token.

Stop strings are searched only in the text the new token added plus the max_stop_len - 1 characters
before it, so a stop string that spans tokens, or decode-window boundaries, is still found.
"""

from __future__ import annotations

from typing import Sequence

# Prompt tokens decoded as context before the first output token (as vLLM and HF's text streamer do).
INITIAL_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """text: the output's text so far, cut before a stop string once one is found (or after it, when
    include_stop_str_in_output)."""

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], stop: Sequence[str] = (),
                 include_stop_str_in_output: bool = False, min_tokens: int = 0):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.min_tokens = min_tokens
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        context = list(prompt_token_ids[-INITIAL_CONTEXT_TOKENS:])
        self._ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self.num_output_tokens = 0
        self.text = ""
        self.stop_reason: str | None = None  # the stop string found

    def add_tokens(self, token_ids: Sequence[int]) -> int | None:
        """Append new output tokens. -> None, or how many of them to keep when a stop string ended the
        text (the token that completed the stop string is the last one kept).

        A decode window's tokens are decoded together (two tokenizer calls, not two per token); only when
        a stop string may have appeared are they replayed one by one to find the token that completed it.
        They are replayed too when the window gave no text: its last token ends mid-character, which holds
        back the text of the tokens before it, and a stop string among them would be found one window late
        and credited to a later token.
        """
        if len(token_ids) > 1:
            saved = (len(self._ids), self._prefix_offset, self._read_offset, self.num_output_tokens, self.text)
            self._ids.extend(int(t) for t in token_ids)
            self.num_output_tokens += len(token_ids)
            start = len(self.text)
            new_text = self._next_text()
            self.text += new_text
            if not self.stop or self.num_output_tokens <= self.min_tokens or (new_text and not self._has_stop(start)):
                return None
            num_ids, self._prefix_offset, self._read_offset, self.num_output_tokens, self.text = saved
            del self._ids[num_ids:]
        return self._add_one_by_one(token_ids)

    def _add_one_by_one(self, token_ids: Sequence[int]) -> int | None:
        for j, token in enumerate(token_ids):
            self._ids.append(int(token))
            self.num_output_tokens += 1
            new_text = self._next_text()
            if not new_text:
                continue
            start = len(self.text)
            self.text += new_text
            if self.stop and self.num_output_tokens > self.min_tokens and self._find_stop(start):
                return j + 1
        return None

    def stable_text(self, finished: bool) -> str:
        """The text a stream may send now: while the request runs, the last max_stop_len - 1 characters
        are held back, since they may be the start of a stop string that the next token completes."""
        if finished or self.max_stop_len <= 1:
            return self.text
        return self.text[:max(len(self.text) - (self.max_stop_len - 1), 0)]

    def _next_text(self) -> str:
        decode = self.tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = decode(self._ids[self._prefix_offset:])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""  # nothing printable yet (a special token, or part of a multi-byte character)
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full_text[len(prefix_text):]

    def _has_stop(self, start: int) -> bool:
        search_from = max(start - self.max_stop_len + 1, 0)
        return any(self.text.find(stop, search_from) != -1 for stop in self.stop)

    def _find_stop(self, start: int) -> bool:
        """Look for a stop string ending in the text added from `start` on; cut the text at the earliest."""
        search_from = max(start - self.max_stop_len + 1, 0)
        best = None
        for stop in self.stop:
            index = self.text.find(stop, search_from)
            if index != -1 and (best is None or index < best[0]):
                best = index, stop
        if best is None:
            return False
        index, stop = best
        self.stop_reason = stop
        self.text = self.text[:index + len(stop)] if self.include_stop_str_in_output else self.text[:index]
        return True
