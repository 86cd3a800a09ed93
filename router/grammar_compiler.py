"""Grammars compiled off the event loop, under a time and a size budget, and cached.

Validation awaits `GrammarCompiler.compile` for each request with a grammar: the index comes
from the cache, or from a worker process (grammar_pool.py) killed at `timeout_s`; one past the
budget or that does not compile is refused with a ValidationError (422), and the refusal is
remembered for a while, so a bomb sent again costs nothing. The index travels to the shards in
the request (`NextTokenChooserParameters.grammar_index`): no shard ever compiles one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import outlines_core
from cachetools import LRUCache, TTLCache

from shardline.router.errors import ValidationError
from shardline.router.grammar_pool import GrammarTimeoutError, GrammarWorkers
from shardline.router.grammar_worker import InvalidGrammarError, binary_form

logger = logging.getLogger(__name__)

_CACHE_BYTES = 512 << 20
_REFUSALS_KEPT = 1024
_REFUSAL_TTL_S = 300.0
_SENTENCEPIECE_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

GrammarKey = tuple[int, str]  # (GrammarType, the schema's JSON text or the regex)


@dataclass(frozen=True)
class GrammarBudget:
    timeout_s: float = 5.0
    max_bytes: int = 64 << 20
    workers: int = 2


class GrammarCompiler:
    """Compiles grammars over `tokenizer`'s vocabulary (EOS ids left out, as the shard has it);
    the worker processes start with the first grammar."""

    def __init__(self, tokenizer: Any, eos_token_ids: list[int], budget: GrammarBudget) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(sorted(eos_token_ids))
        self.budget = budget
        self.compilations = 0  # compiles run (cache misses), refused ones included
        self._lock = threading.Lock()
        self._workers_lock = threading.Lock()
        self._compiled: LRUCache[GrammarKey, bytes] = LRUCache(_CACHE_BYTES, getsizeof=len)
        self._refused: TTLCache[GrammarKey, str] = TTLCache(_REFUSALS_KEPT, _REFUSAL_TTL_S)
        self._pending: dict[GrammarKey, Future[bytes]] = {}
        self._threads = ThreadPoolExecutor(budget.workers, thread_name_prefix="grammar")
        self._workers: GrammarWorkers | None = None

    async def compile(self, grammar_type: int, value: str) -> bytes:
        """The grammar's index in outlines-core's binary form; ValidationError if refused."""
        key = (grammar_type, value)
        with self._lock:
            compiled = self._compiled.get(key)
            refusal = self._refused.get(key)
            if compiled is None and refusal is None:
                pending = self._pending.get(key)
                if pending is None:
                    pending = self._threads.submit(self._compile, key)
                    self._pending[key] = pending
        if compiled is not None:
            return compiled
        if refusal is not None:
            raise ValidationError(refusal)
        try:
            return await asyncio.shield(asyncio.wrap_future(pending))
        except InvalidGrammarError as error:
            raise ValidationError(str(error)) from None

    def _compile(self, key: GrammarKey) -> bytes:
        started = time.monotonic()
        try:
            binary = self._run(key)
        except InvalidGrammarError as error:
            with self._lock:
                self._refused[key] = str(error)
                del self._pending[key]
            raise
        except BaseException:
            with self._lock:
                del self._pending[key]
            raise
        with self._lock:
            self._compiled[key] = binary
            del self._pending[key]
        logger.info(
            "grammar compiled",
            extra={"seconds": round(time.monotonic() - started, 3), "bytes": len(binary)},
        )
        return binary

    def _run(self, key: GrammarKey) -> bytes:
        budget = self.budget
        with self._lock:
            self.compilations += 1
        with self._workers_lock:  # not the cache's: the vocabulary takes a while to build
            if self._workers is None:
                vocabulary = binary_form(build_vocabulary(self.tokenizer, self.eos_token_ids))
                self._workers = GrammarWorkers(vocabulary, budget.workers)
        try:
            return self._workers.compile(*key, budget.max_bytes, budget.timeout_s)
        except GrammarTimeoutError:
            raise GrammarTimeoutError(
                f"`grammar` takes longer than {budget.timeout_s:g} s to compile over this "
                "model's vocabulary (--grammar-compile-timeout): simplify it (bound fewer "
                "repetitions)"
            ) from None

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        if self._workers is not None:
            self._workers.close()


def build_vocabulary(tokenizer: Any, eos_token_ids: tuple[int, ...]) -> outlines_core.Vocabulary:
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


def _decoder_config(tokenizer: Any) -> object:
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
