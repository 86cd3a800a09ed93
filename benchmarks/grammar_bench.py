"""Grammar compilation costs: outlines-core's index build, its binary size, a shard's load of
it (`Index.from_binary`), and the router's GrammarCompiler (worker process, cache) end to end.

    python -m benchmarks.grammar_bench                  # the packaged SmolLM2 tokenizer (49k)
    python -m benchmarks.grammar_bench --tokenizer DIR  # another tokenizer folder

Prints one JSON line per grammar. No GPU; the numbers are the CPU's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import outlines_core
from transformers import AutoTokenizer

from shardline.model_files import resolve_model
from shardline.proto import generate_pb2 as pb
from shardline.router.errors import ValidationError
from shardline.router.grammar_compiler import GrammarBudget, GrammarCompiler, build_vocabulary
from shardline.router.grammar_worker import compile_index

_PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
GRAMMARS = {
    "digits": (pb.GRAMMAR_TYPE_REGEX, "[0-9]{1,3}"),
    "person_schema": (pb.GRAMMAR_TYPE_JSON, json.dumps(_PERSON)),
    "word_50": (pb.GRAMMAR_TYPE_REGEX, r"\w{1,50}"),
    "bomb_word_2000": (pb.GRAMMAR_TYPE_REGEX, r"\w{1,2000}"),
}
_NO_LIMIT = 1 << 40


def in_process(vocabulary: outlines_core.Vocabulary, grammar: tuple[int, str]) -> dict:
    started = time.perf_counter()
    binary = compile_index(*grammar, vocabulary, _NO_LIMIT)
    built = time.perf_counter()
    outlines_core.Index.from_binary(binary)
    loaded = time.perf_counter()
    return {
        "build_s": round(built - started, 4),
        "index_bytes": len(binary),
        "load_ms": round((loaded - built) * 1e3, 2),
    }


async def through_compiler(compiler: GrammarCompiler, grammar: tuple[int, str]) -> dict:
    timings = {}
    for attempt in ("first_s", "cached_s"):
        started = time.perf_counter()
        try:
            await compiler.compile(*grammar)
            outcome = "compiled"
        except ValidationError as error:
            outcome = str(error)[:60]
        timings[attempt] = round(time.perf_counter() - started, 4)
    return {**timings, "outcome": outcome}


async def bench(tokenizer_dir: str, timeout_s: float) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = (tokenizer.eos_token_id,)
    started = time.perf_counter()
    vocabulary = build_vocabulary(tokenizer, eos)
    print(
        json.dumps({"vocabulary_tokens": len(tokenizer), "build_s": time.perf_counter() - started})
    )
    compiler = GrammarCompiler(tokenizer, list(eos), GrammarBudget(timeout_s=timeout_s))
    try:
        for name, grammar in GRAMMARS.items():
            row = {"grammar": name, **await through_compiler(compiler, grammar)}
            if not name.startswith("bomb"):
                row.update(in_process(vocabulary, grammar))
            print(json.dumps(row), flush=True)
    finally:
        compiler.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokenizer", help="tokenizer folder; default: the packaged SmolLM2")
    parser.add_argument("--timeout", type=float, default=GrammarBudget.timeout_s)
    args = parser.parse_args()
    asyncio.run(bench(args.tokenizer or str(resolve_model(None)), args.timeout))


if __name__ == "__main__":
    main()
