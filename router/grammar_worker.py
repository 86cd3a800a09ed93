"""The process that compiles grammars: `python -m shardline.router.grammar_worker`.

A grammar (TGI's JSON schema or regex) becomes outlines-core's `Index`, a DFA over the model's
token ids, which can take minutes and gigabytes for a hostile regex (`\\w{1,2000}`). The build
runs here, in a process of its own, so the router can kill it at its deadline
(grammar_pool.py). Protocol, pickled on stdin and stdout: the vocabulary's binary form first
(answered with `READY`), then (grammar_type, value, max_bytes) requests, each answered with
("compiled", index bytes) or ("refused", reason).

This module imports nothing heavy: a worker starts in a fraction of a second.
"""

from __future__ import annotations

import pickle
import sys
from typing import Any, BinaryIO

import outlines_core

from shardline.proto import generate_pb2 as pb

READY = "ready"
_ERROR_CHARS = 300


class InvalidGrammarError(ValueError):
    """A grammar that does not compile: bad schema or regex, or past the size budget."""


def binary_form(value: outlines_core.Index | outlines_core.Vocabulary) -> bytes:
    """The bytes that `from_binary` takes back (what outlines-core pickles)."""
    _, (binary,) = value.__reduce__()
    return binary


def compile_index(
    grammar_type: int, value: str, vocabulary: outlines_core.Vocabulary, max_bytes: int
) -> bytes:
    """The grammar's index in its binary form; InvalidGrammarError says why there is none."""
    regex = _grammar_regex(grammar_type, value)
    name = "guided_json" if grammar_type == pb.GRAMMAR_TYPE_JSON else "guided_regex"
    try:
        index = outlines_core.Index(regex, vocabulary)
    except Exception as error:  # any failure here is the grammar's (bad syntax, bad text)
        raise InvalidGrammarError(f"`{name}` does not compile: {_short(error)}") from error
    binary = binary_form(index)
    if len(binary) > max_bytes:
        raise InvalidGrammarError(
            f"`{name}` compiles to an automaton of {len(binary)} bytes over this model's "
            f"vocabulary, more than the {max_bytes} this server allows (--max-grammar-bytes): "
            "simplify it (bound fewer repetitions)"
        )
    return binary


def _grammar_regex(grammar_type: int, value: str) -> str:
    if grammar_type == pb.GRAMMAR_TYPE_REGEX:
        return value
    if grammar_type != pb.GRAMMAR_TYPE_JSON:
        raise InvalidGrammarError(f"unknown grammar type {grammar_type}")
    try:
        return outlines_core.json_schema.build_regex_from_schema(value)
    except Exception as error:
        raise InvalidGrammarError(
            f"`guided_json` is not a usable JSON schema: {_short(error)}"
        ) from error


def _short(error: Exception) -> str:
    return str(error)[:_ERROR_CHARS]


def serve(requests: BinaryIO, answers: BinaryIO) -> None:
    """Answers compile requests until the router closes the pipe."""
    vocabulary = outlines_core.Vocabulary.from_binary(pickle.load(requests))
    _send(answers, READY)
    while True:
        try:
            grammar_type, value, max_bytes = pickle.load(requests)
        except EOFError:
            return
        try:
            answer = ("compiled", compile_index(grammar_type, value, vocabulary, max_bytes))
        except InvalidGrammarError as error:
            answer = ("refused", str(error))
        _send(answers, answer)


def _send(answers: BinaryIO, answer: Any) -> None:
    pickle.dump(answer, answers, protocol=pickle.HIGHEST_PROTOCOL)
    answers.flush()


if __name__ == "__main__":
    channel = sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the answers
    serve(sys.stdin.buffer, channel)
