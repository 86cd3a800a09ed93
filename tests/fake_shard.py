"""Helpers for the router tests: a deterministic in-process shard and a tiny tokenizer.

`FakeShardClient` implements the `ShardClient` protocol the way the shards do: every sequence of
a request (its `num_sequences`: n / best_of) 'generates' the continuation `script(prompt_ids)`
one token per step, reports EOS / length /
stop_token_ids, refuses a prefill batch holding a prompt outside its vocabulary, keeps finished
requests until the router filters them, and counts the sequences it holds so tests can check
that nothing leaks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from shardline.proto import generate_pb2 as pb
from shardline.router.server import create_app
from shardline.router.startup import RouterSettings, start_router
from shardline.shard_answers import GenerationColumns, StepResult, Timings, Tokens
from tests.model_factory import train_tokenizer

CONTINUATION = " the café naïve 東京 ☃ 🙂 model server"


def tiny_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    train_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder)


def byte_ids(tokenizer, text: str) -> list[int]:
    """One byte-level token per UTF-8 byte, so multi-byte characters split across tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = bytes_to_unicode()
    return [tokenizer.convert_tokens_to_ids(chars[b]) for b in text.encode()]


@dataclass
class _Sequence:
    request: pb.Request
    script: list[int]
    index: int = 0  # its sequence_index among the request's
    generated: int = 0
    finished: bool = False


SequenceKey = tuple[int, int]  # request id, sequence index


@dataclass
class FakeShardClient:
    script: Callable[[list[int]], list[int]]
    eos_id: int
    step_delay: float = 0.0
    block_size: int = 1
    max_supported_total_tokens: int = 4096
    vocab_size: int = 384  # the tiny tokenizer's (`train_tokenizer`)
    fail_on: str | None = None
    healthy: bool = True
    support_chunking: bool = False
    calls: list[tuple] = field(default_factory=list)
    requests: list[pb.Request] = field(default_factory=list)  # every request prefilled
    carried: list[tuple[int, list[int]]] = field(default_factory=list)  # prefill id, running ids
    batches: dict[int, dict[SequenceKey, _Sequence]] = field(default_factory=dict)
    partial: dict[int, int] = field(default_factory=dict)  # prompts prefilled in part: tokens
    chunks: list[list[tuple[int, int, int]]] = field(default_factory=list)  # per prefill
    # The reason the shards refuse a request of a Prefill (None: they run it), as a real shard
    # refuses an entry whose data is invalid: the others of the batch run.
    refuse: Callable[[pb.Request], str | None] = lambda request: None

    async def info(self) -> pb.InfoResponse:
        return pb.InfoResponse(
            dtype="float32",
            device_type="cpu",
            block_size=self.block_size,
            max_position_embeddings=1024,
            eos_token_ids=[self.eos_id],
            world_size=1,
            vocab_size=self.vocab_size,
            support_chunking=self.support_chunking,
        )

    async def health(self) -> None:
        if not self.healthy:
            raise ConnectionError("shard 0 does not answer")

    async def warmup(self, request: pb.WarmupRequest) -> pb.WarmupResponse:
        self.calls.append(("warmup", request.max_prefill_tokens))
        max_total = request.max_total_tokens if request.HasField("max_total_tokens") else 512
        max_input = (
            request.max_input_tokens if request.HasField("max_input_tokens") else max_total - 1
        )
        return pb.WarmupResponse(
            max_supported_total_tokens=self.max_supported_total_tokens,
            max_input_tokens=max_input,
            max_total_tokens=max_total,
        )

    async def prefill(
        self,
        batch: pb.Batch,
        cached_batches: Sequence[pb.CachedBatch] = (),
        launch_next: bool = False,
    ) -> StepResult:
        """With `cached_batches`, those decode one step first and the answer's batch (under
        the first one's id) holds their rows and the new ones, as the real shard does."""
        self.calls.append(("prefill", batch.id, [r.id for r in batch.requests], batch.max_tokens))
        self.requests.extend(batch.requests)
        self.chunks.append([(r.id, r.prefix_len, r.chunk_len) for r in batch.requests])
        if cached_batches:
            self.carried.append((batch.id, [cached.id for cached in cached_batches]))
        await self._work("prefill")
        self._check_vocabulary(batch)
        refused = {r.id: reason for r in batch.requests if (reason := self.refuse(r)) is not None}
        batch = pb.Batch(id=batch.id, requests=[r for r in batch.requests if r.id not in refused])
        generations, batch_id = GenerationColumns(), batch.id
        if cached_batches:
            generations, batch_id = self._decode_step(cached_batches), cached_batches[0].id
        completed = self._prefill_chunks(batch)
        sequences = {
            (r.id, index): _Sequence(r, self.script(list(r.input_ids)), index)
            for r in completed
            for index in range(max(r.num_sequences, 1))
        }
        if not sequences and not cached_batches:
            return StepResult(generations, None, _TIMINGS, refused)
        self.batches.setdefault(batch_id, {}).update(sequences)
        for seq in sequences.values():
            self._generate(seq, generations, prefill=True)
        return StepResult(generations, self._cached(batch_id), _TIMINGS, refused)

    async def decode(
        self, batches: Sequence[pb.CachedBatch], launch_next: bool = False
    ) -> StepResult:
        self.calls.append(("decode", [b.id for b in batches]))
        await self._work("decode")
        generations = self._decode_step(batches)
        return StepResult(generations, self._cached(batches[0].id), _TIMINGS)

    def _decode_step(self, batches: Sequence[pb.CachedBatch]) -> GenerationColumns:
        merged: dict[SequenceKey, _Sequence] = {}
        for batch in batches:
            merged.update(self.batches.pop(batch.id))
        self.batches[batches[0].id] = merged
        generations = GenerationColumns()
        for seq in merged.values():
            if not seq.finished:
                self._generate(seq, generations)
        return generations

    async def filter_batch(
        self,
        batch_id: int,
        request_ids: Sequence[int],
        stopped_sequences: Sequence[pb.SequenceRef] = (),
    ) -> pb.CachedBatch | None:
        self.calls.append(("filter", batch_id, sorted(request_ids)))
        stopped = {(ref.request_id, ref.sequence_index) for ref in stopped_sequences}
        self.batches[batch_id] = {
            key: seq
            for key, seq in self.batches[batch_id].items()
            if key[0] in request_ids and key not in stopped
        }
        return self._cached(batch_id)

    async def clear_cache(
        self, batch_id: int | None = None, keep_prefix_cache: bool = False
    ) -> None:
        self.calls.append(("clear", batch_id))
        if batch_id is None:
            self.batches.clear()
            self.partial.clear()
        else:
            self.batches.pop(batch_id, None)

    async def drop_prefills(self, request_ids: Sequence[int]) -> None:
        self.calls.append(("drop_prefills", sorted(request_ids)))
        for request_id in request_ids:
            self.partial.pop(request_id, None)

    async def stats(self) -> pb.StatsResponse:
        return pb.StatsResponse(num_sequences=self.num_sequences, num_batches=len(self.batches))

    @property
    def num_sequences(self) -> int:
        return sum(len(seqs) for seqs in self.batches.values())

    def calls_of(self, kind: str) -> list[tuple]:
        return [call for call in self.calls if call[0] == kind]

    async def _work(self, method: str) -> None:
        if self.fail_on == method:
            raise RuntimeError(f"CUDA error during {method}")
        await asyncio.sleep(self.step_delay)

    def _prefill_chunks(self, batch: pb.Batch) -> list[pb.Request]:
        """Records the chunk of each prompt (as the real shard checks continuations); returns
        the requests whose prompts are complete."""
        completed = []
        for request in batch.requests:
            if request.prefix_len:
                assert self.partial.pop(request.id) == request.prefix_len
            end = request.prefix_len + (request.chunk_len or len(request.input_ids))
            if end < len(request.input_ids):
                self.partial[request.id] = end
            else:
                completed.append(request)
        return completed

    def _check_vocabulary(self, batch: pb.Batch) -> None:
        """The shards refuse the whole batch when one prompt leaves the vocabulary."""
        for request in batch.requests:
            if max(request.input_ids) >= self.vocab_size:
                raise ValueError(
                    f"request {request.id} has a token id >= the vocabulary size {self.vocab_size}"
                )

    def _generate(
        self, seq: _Sequence, generations: GenerationColumns, prefill: bool = False
    ) -> None:
        stopping = seq.request.stopping_parameters
        token = seq.script[seq.generated] if seq.generated < len(seq.script) else self.eos_id
        seq.generated += 1
        reason = pb.FINISH_REASON_NONE
        may_stop = seq.generated > stopping.min_new_tokens
        if token == self.eos_id and not stopping.ignore_eos_token and may_stop:
            reason = pb.FINISH_REASON_EOS_TOKEN
        elif token in stopping.stop_token_ids and may_stop:
            reason = pb.FINISH_REASON_STOP_SEQUENCE
        elif seq.generated >= stopping.max_new_tokens:
            reason = pb.FINISH_REASON_LENGTH
        seq.finished = reason != pb.FINISH_REASON_NONE
        row = generations.add_token(
            seq.request.id,
            seq.index,
            token,
            -0.5,
            reason,
            seq.generated,
            seq.request.parameters.seed,
        )
        if top_n := seq.request.top_n_tokens:
            alternatives = [token + offset for offset in range(top_n)]
            generations.top_tokens[row] = Tokens(alternatives, [-0.5] * top_n)
        if prefill and seq.request.decoder_input_details:
            ids = list(seq.request.input_ids)
            logprobs = [float("nan")] + [-1.0] * (len(ids) - 1)
            generations.prefill_tokens[row] = Tokens(ids, logprobs)

    def _cached(self, batch_id: int) -> pb.CachedBatch | None:
        sequences = self.batches[batch_id]
        if all(seq.finished for seq in sequences.values()):
            del self.batches[batch_id]
            return None
        request_ids = list(dict.fromkeys(request_id for request_id, _ in sequences))
        return pb.CachedBatch(
            id=batch_id,
            request_ids=request_ids,
            size=len(request_ids),
            current_tokens=sum(len(s.request.input_ids) + s.generated for s in sequences.values()),
        )


def fixed_script(tokenizer, text: str = CONTINUATION) -> Callable[[list[int]], list[int]]:
    """Every prompt continues with `text`, then EOS."""
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return lambda prompt: ids


async def router_client(fake: FakeShardClient, tokenizer, **settings) -> tuple[TestClient, object]:
    """A started router on a real local port, in front of `fake`; close the client after."""
    ctx = await start_router(fake, tokenizer, RouterSettings(model_id="tiny", **settings))
    client = TestClient(TestServer(create_app(ctx), handler_cancellation=True))
    await client.start_server()
    return client, ctx


_TIMINGS = Timings(forward_ns=1_000_000, decode_ns=0, total_ns=1_000_000)
