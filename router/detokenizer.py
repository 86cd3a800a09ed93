"""Incremental detokenization that never emits a broken UTF-8 character.

Built on `tokenizers`' DecodeStream, which buffers a byte-level token that splits a character
until the character completes and keeps a little context so leading spaces decode as in full
text. The stream is primed with the end of the prompt when that ends on a whole character.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers.decoders import DecodeStream

_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


def backend_tokenizer(tokenizer: Any) -> Any:
    """The `tokenizers.Tokenizer` behind a transformers fast tokenizer (or itself)."""
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = backend_tokenizer(tokenizer)
        self._skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(
            ids=self._clean_context(prompt_ids), skip_special_tokens=skip_special_tokens
        )
        self._pending: list[int] = []

    def _clean_context(self, prompt_ids: Sequence[int]) -> list[int]:
        """The prompt's last ids, unless they end inside a character (then no context)."""
        context = list(prompt_ids[-_CONTEXT_TOKENS:])
        text = self._tokenizer.decode(context, skip_special_tokens=self._skip_special_tokens)
        return [] if _REPLACEMENT_CHAR in text else context

    def add(self, token_id: int) -> str:
        """Adds one generated id; returns the text it completes (often "", never half a char)."""
        text = self._stream.step(self._tokenizer, token_id)
        if text is None:  # held back: `flush` decodes what is pending
            self._pending.append(token_id)
            return ""
        if self._pending:
            self._pending.clear()
        return text

    def flush(self) -> str:
        """The text still held back at the end of generation (a broken character shows as U+FFFD)."""
        pending, self._pending = self._pending, []
        if not pending:
            return ""
        return self._tokenizer.decode(pending, skip_special_tokens=self._skip_special_tokens)
