"""Constrained decoding: token-level automata of TGI's `grammar` (JSON schema or regex).

outlines-core turns a regex (a JSON schema first becomes one) and the model's vocabulary into an
index: a DFA whose transitions are token ids. `GrammarCompiler` (one per shard) loads the
tokenizer lazily, on the first grammar request, and keeps the last compiled grammars by
(type, value). `GrammarRows` keeps the DFA state of each row of a batch (None for a free row):
it builds the [B, V] mask of allowed tokens, advances with each appended token, and lets EOS
through only where the DFA accepts. A row's state is a plain int, so filter, concatenate and
forks copy it.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import outlines_core
import torch

from shardline.proto import generate_pb2 as pb

_CACHE_SIZE = 64
_MASKS_PER_GRAMMAR = 1024
_SENTENCEPIECE_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class InvalidGrammarError(ValueError):
    """A grammar that does not compile: bad regex, unsupported schema, or no token path."""


def schema_regex(schema: str) -> str:
    """The regex of a JSON schema given as JSON text; cheap (no vocabulary)."""
    try:
        return outlines_core.json_schema.build_regex_from_schema(schema)
    except (ValueError, TypeError) as error:
        raise InvalidGrammarError(f"invalid JSON schema grammar: {error}") from error


def grammar_regex(grammar_type: int, value: str) -> str:
    if grammar_type == pb.GRAMMAR_TYPE_JSON:
        return schema_regex(value)
    if grammar_type == pb.GRAMMAR_TYPE_REGEX:
        return value
    raise InvalidGrammarError(f"unknown grammar type {grammar_type}")


class CompiledGrammar:
    """One grammar's index over the vocabulary, with the allowed ids of its states memoized."""

    def __init__(self, index: outlines_core.Index, vocab_size: int) -> None:
        self.index = index
        self.vocab_size = vocab_size
        self.initial_state: int = index.get_initial_state()
        self.allowed_ids = functools.lru_cache(maxsize=_MASKS_PER_GRAMMAR)(self._allowed_ids)

    def _allowed_ids(self, state: int, eos_ids: tuple[int, ...]) -> torch.Tensor:
        ids = set(self.index.get_allowed_tokens(state))
        if self.index.is_final_state(state):
            ids.update(eos_ids)
        return torch.tensor(sorted(i for i in ids if i < self.vocab_size), dtype=torch.int64)

    def next_state(self, state: int, token_id: int) -> int:
        """The state after `token_id`; an EOS (or a token let through with every score -inf)
        leaves it where it is."""
        following = self.index.get_next_state(state, token_id)
        return state if following is None else following


class GrammarCompiler:
    """Compiles grammars against the tokenizer of `tokenizer_dir`, loaded on first use."""

    def __init__(
        self, tokenizer_dir: Path | None, eos_token_ids: Sequence[int], vocab_size: int
    ) -> None:
        self.tokenizer_dir = tokenizer_dir
        self.eos_token_ids = tuple(sorted(eos_token_ids))
        self.vocab_size = vocab_size
        self.compile = functools.lru_cache(maxsize=_CACHE_SIZE)(self._compile)

    @functools.cached_property
    def vocabulary(self) -> outlines_core.Vocabulary:
        if self.tokenizer_dir is None:
            raise InvalidGrammarError("grammar needs the model's tokenizer, which is not loaded")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        return build_vocabulary(tokenizer, self.eos_token_ids)

    def _compile(self, grammar_type: int, value: str) -> CompiledGrammar:
        regex = grammar_regex(grammar_type, value)
        try:
            index = outlines_core.Index(regex, self.vocabulary)
        except ValueError as error:
            raise InvalidGrammarError(f"grammar does not compile: {error}") from error
        return CompiledGrammar(index, self.vocab_size)

    def rows(self, params: Sequence[pb.NextTokenChooserParameters]) -> GrammarRows | None:
        """The grammar rows of a new batch; None when no row has a grammar."""
        if all(p.grammar_type == pb.GRAMMAR_TYPE_NONE for p in params):
            return None
        grammars = [
            None
            if p.grammar_type == pb.GRAMMAR_TYPE_NONE
            else self.compile(p.grammar_type, p.grammar)
            for p in params
        ]
        states = [None if g is None else g.initial_state for g in grammars]
        return GrammarRows(grammars, states, self.eos_token_ids)


def build_vocabulary(tokenizer, eos_token_ids: tuple[int, ...]) -> outlines_core.Vocabulary:
    """outlines-core's vocabulary: each token as the bytes it decodes to, special tokens out."""
    byte_level = '"ByteLevel"' in json.dumps(_decoder_config(tokenizer))
    added = tokenizer.get_added_vocab()
    special = set(tokenizer.all_special_ids) | set(eos_token_ids)
    tokens: dict[bytes, list[int]] = {}
    for token, token_id in tokenizer.get_vocab().items():
        if token_id in special:
            continue
        text = token.encode() if token in added else _token_bytes(token, byte_level)
        tokens.setdefault(text, []).append(token_id)
    eos = eos_token_ids[0] if eos_token_ids else len(tokenizer)
    return outlines_core.Vocabulary(eos, tokens)


def _decoder_config(tokenizer) -> object:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()).get("decoder") if backend is not None else None


def _token_bytes(token: str, byte_level: bool) -> bytes:
    if byte_level:
        return bytes(_UNICODE_TO_BYTE.get(char, 0) for char in token)
    byte = _SENTENCEPIECE_BYTE.fullmatch(token)
    if byte:
        return bytes([int(byte.group(1), 16)])
    return token.replace("\u2581", " ").encode()


def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's byte-level alphabet: printable bytes stand for themselves, the
    others for the code points from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    mapping = {chr(b): b for b in printable}
    mapping.update({chr(256 + n): b for n, b in enumerate(others)})
    return mapping


_UNICODE_TO_BYTE = _unicode_to_byte()


@dataclass
class GrammarRows:
    """The grammar and DFA state of each row of a batch (None: the row is free)."""

    grammars: list[CompiledGrammar | None]
    states: list[int | None]
    eos_token_ids: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.states)

    def allowed_mask(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """[B, V] bool: True where the token may come next; free rows allow everything."""
        mask = torch.ones((len(self), vocab_size), dtype=torch.bool)
        for row, (grammar, state) in enumerate(zip(self.grammars, self.states, strict=True)):
            if grammar is not None:
                mask[row] = False
                mask[row, grammar.allowed_ids(state, self.eos_token_ids)] = True
        return mask.to(device, non_blocking=True)

    def advance(self, token_ids: Sequence[int]) -> None:
        for row, (grammar, token) in enumerate(zip(self.grammars, token_ids, strict=True)):
            if grammar is not None:
                self.states[row] = grammar.next_state(self.states[row], token)

    def filter(self, keep: Sequence[int]) -> GrammarRows | None:
        grammars = [self.grammars[i] for i in keep]
        if all(g is None for g in grammars):
            return None
        return GrammarRows(grammars, [self.states[i] for i in keep], self.eos_token_ids)

    @classmethod
    def concatenate(cls, parts: Sequence[tuple[GrammarRows | None, int]]) -> GrammarRows | None:
        """Joins the grammar rows of batches given as (rows or None, batch size)."""
        present = [rows for rows, _ in parts if rows is not None]
        if not present:
            return None
        grammars: list[CompiledGrammar | None] = []
        states: list[int | None] = []
        for rows, size in parts:
            grammars += rows.grammars if rows is not None else [None] * size
            states += rows.states if rows is not None else [None] * size
        return cls(grammars, states, present[0].eos_token_ids)
