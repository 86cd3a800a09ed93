"""Constrained decoding: token-level automata of TGI's `grammar` (JSON schema or regex).

The router compiles each grammar into outlines-core's index (a DFA whose transitions are token
ids) under its time and size budget, and sends it with the request (`grammar_index`): a shard
only loads it (`GrammarLoader`, one per shard, keeps the last ones by (type, value)) and never
compiles one. `GrammarRows` keeps the DFA state of each row of a batch (None for a free row):
it builds the [B, V] mask of allowed tokens, advances with each appended token, and lets EOS
through only where the DFA accepts. A row's state is a plain int, so filter, concatenate and
forks copy it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import outlines_core
import torch
from cachetools import LRUCache

from shardline.proto import generate_pb2 as pb

_CACHE_BYTES = 512 << 20  # of the indexes' binary form
_MASKS_PER_GRAMMAR = 1024


class InvalidGrammarError(ValueError):
    """A request's grammar that cannot be loaded: its index is missing or damaged."""


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


class GrammarLoader:
    """The requests' compiled grammars, loaded from their `grammar_index` and kept by
    (type, value), so a grammar seen before costs nothing."""

    def __init__(self, eos_token_ids: Sequence[int], vocab_size: int) -> None:
        self.eos_token_ids = tuple(sorted(eos_token_ids))
        self.vocab_size = vocab_size
        self._loaded: LRUCache[tuple[int, str], tuple[CompiledGrammar, int]] = LRUCache(
            _CACHE_BYTES, getsizeof=lambda entry: entry[1]
        )

    def load(self, params: pb.NextTokenChooserParameters) -> CompiledGrammar:
        key = (params.grammar_type, params.grammar)
        entry = self._loaded.get(key)
        if entry is None:
            entry = (self._from_binary(params.grammar_index), len(params.grammar_index))
            self._loaded[key] = entry
        return entry[0]

    def _from_binary(self, binary: bytes) -> CompiledGrammar:
        if not binary:
            raise InvalidGrammarError("its grammar comes without the router-compiled index")
        try:
            index = outlines_core.Index.from_binary(binary)
        except Exception as error:  # whatever outlines-core makes of damaged bytes
            raise InvalidGrammarError(f"its grammar index does not load: {error}") from error
        return CompiledGrammar(index, self.vocab_size)

    def rows(self, params: Sequence[pb.NextTokenChooserParameters]) -> GrammarRows | None:
        """The grammar rows of a new batch; None when no row has a grammar."""
        if all(p.grammar_type == pb.GRAMMAR_TYPE_NONE for p in params):
            return None
        grammars = [
            None if p.grammar_type == pb.GRAMMAR_TYPE_NONE else self.load(p) for p in params
        ]
        states = [None if g is None else g.initial_state for g in grammars]
        return GrammarRows(grammars, states, self.eos_token_ids)


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
