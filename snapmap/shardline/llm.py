"""The offline API, with vLLM's names: `LLM(model=...).generate(prompts, SamplingParams(...))`.

One shard runs in this process (no HTTP, no gRPC); `tensor_parallel_size > 1` starts shard
processes and talks to them over gRPC. Requests go through the router's continuous batching,
so a prompt list larger than the KV cache still completes.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import dataclasses
import logging
import os
import random
import shutil
import socket
import tempfile
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardline.model_files import resolve_model
from shardline.proto import generate_pb2 as pb
from shardline.router.batcher import Batcher, BatchingConfig
from shardline.router.request_types import FinishReason, StreamEvent, ValidRequest
from shardline.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_VLLM_FINISH_REASONS = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS_TOKEN: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
}


@dataclass(frozen=True)
class Logprob:
    """vLLM's: a token's logprob, its rank among the alternatives (1 = most likely), its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    stop_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool = True


@dataclass
class EngineArgs:
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    gpu_memory_utilization: float = 0.90
    block_size: int = 16
    max_num_batched_tokens: int | None = None
    max_num_seqs: int = 256
    max_model_len: int | None = None
    kv_cache_bytes: int | None = None
    attention: str = "auto"
    cuda_graphs: str | None = None
    seed: int = 0
    waiting_served_ratio: float = 0.3
    max_waiting_tokens: int = 20
    enable_chunked_prefill: bool = True

    @property
    def prefill_budget(self) -> int:
        """Prompt tokens one forward pass runs at most."""
        return self.max_num_batched_tokens or max(self.max_model_len or 4096, 4096)


def _engine_args(kwargs: dict[str, Any]) -> EngineArgs:
    """The engine arguments, from vLLM's names; ones with no counterpart here are logged."""
    kwargs = dict(kwargs)
    if kwargs.pop("enforce_eager", False):
        kwargs.setdefault("cuda_graphs", "0")
    if kwargs.pop("trust_remote_code", False):
        logger.warning("trust_remote_code has no effect: Shardline runs its own model code")
    known = {f.name for f in dataclasses.fields(EngineArgs)}
    ignored = sorted(set(kwargs) - known)
    if ignored:
        logger.warning("LLM ignores engine arguments with no Shardline counterpart: %s", ignored)
    return EngineArgs(**{k: v for k, v in kwargs.items() if k in known})


class LLM:
    def __init__(
        self, model: str | None = None, tokenizer: str | None = None, **kwargs: Any
    ) -> None:
        self.args = _engine_args(kwargs)
        self._seeds = random.Random(self.args.seed)
        self.model_dir = Path(resolve_model(model))
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or self.model_dir)
        self._shards = _start_shards(self.model_dir, self.args)
        warmup = asyncio.run(self._warmup())
        self.max_model_len = warmup.max_total_tokens
        self.max_batch_total_tokens = warmup.max_supported_total_tokens
        if not self.args.enable_chunked_prefill and self.args.prefill_budget < self.max_model_len:
            self.shutdown()
            raise ValueError(
                f"max_num_batched_tokens ({self.args.prefill_budget}) is smaller than "
                f"max_model_len ({self.max_model_len}): long prompts would never run; "
                "enable chunked prefill or raise max_num_batched_tokens"
            )

    async def _warmup(self) -> pb.WarmupResponse:
        async with self._shards.client() as client:
            request = pb.WarmupRequest(
                max_prefill_tokens=self.args.prefill_budget, max_batch_size=self.args.max_num_seqs
            )
            if self.args.max_model_len:
                request.max_total_tokens = self.args.max_model_len
                request.max_input_tokens = self.args.max_model_len - 1
            return await client.warmup(request)

    def shutdown(self) -> None:
        """Stops the shard processes of `tensor_parallel_size > 1` (also done at exit)."""
        self._shards.close()

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        texts, token_ids = self._inputs(prompts, prompt_token_ids)
        params = _per_prompt(sampling_params, len(token_ids))
        return asyncio.run(self._generate(texts, token_ids, params, use_tqdm))

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [
            self.tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            for conversation in conversations
        ]
        token_ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        params = _per_prompt(sampling_params, len(prompts))
        return asyncio.run(self._generate(prompts, token_ids, params, use_tqdm))

    def _inputs(
        self, prompts: str | Sequence[str] | None, prompt_token_ids: Sequence[Sequence[int]] | None
    ) -> tuple[list[str | None], list[list[int]]]:
        if prompt_token_ids is not None:
            return [None] * len(prompt_token_ids), [list(ids) for ids in prompt_token_ids]
        if prompts is None:
            raise ValueError("generate() needs prompts or prompt_token_ids")
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        return texts, [self.tokenizer.encode(text) for text in texts]

    async def _generate(
        self,
        texts: list[str | None],
        token_ids: list[list[int]],
        params: list[SamplingParams],
        use_tqdm: bool,
    ) -> list[RequestOutput]:
        requests = [self._valid_request(t, ids, p) for t, ids, p in zip(texts, token_ids, params)]
        async with self._shards.client() as client:
            batcher = Batcher(client, self.tokenizer, self._batching_config())
            batcher.start()
            try:
                return await _collect_all(batcher, requests, params, use_tqdm)
            finally:
                await batcher.stop()

    def _valid_request(
        self, text: str | None, ids: list[int], params: SamplingParams
    ) -> ValidRequest:
        if not ids:
            raise ValueError("a prompt must have at least one token")
        room = self.max_model_len - len(ids)
        if room < 1:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; the model's limit is {self.max_model_len}"
            )
        if params.seed is None and not params.greedy:
            # vLLM's `seed` engine argument: unseeded requests draw from one seeded stream.
            params = dataclasses.replace(params, seed=self._seeds.getrandbits(63))
        max_new = room if params.max_tokens is None else params.max_tokens
        if max_new > room:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({max_new}) exceeds max_model_len "
                f"({self.max_model_len})"
            )
        return ValidRequest(
            inputs=text or "",
            input_ids=ids,
            params=params,
            max_new_tokens=max_new,
            top_n_tokens=params.logprobs or 0,
            decoder_input_details=params.prompt_logprobs is not None,
        )

    def _batching_config(self) -> BatchingConfig:
        return BatchingConfig(
            max_batch_prefill_tokens=self.args.prefill_budget,
            max_batch_total_tokens=self.max_batch_total_tokens,
            max_batch_size=self.args.max_num_seqs,
            block_size=self.args.block_size,
            waiting_served_ratio=self.args.waiting_served_ratio,
            max_waiting_tokens=self.args.max_waiting_tokens,
            prefill_chunking=self.args.enable_chunked_prefill,
        )


async def _collect_all(
    batcher: Batcher,
    requests: list[ValidRequest],
    params: list[SamplingParams],
    use_tqdm: bool,
) -> list[RequestOutput]:
    from tqdm.auto import tqdm

    progress = tqdm(total=len(requests), desc="Processed prompts", disable=not use_tqdm)

    async def one(index: int, request: ValidRequest) -> RequestOutput:
        events = await batcher.submit(request).collect()
        progress.update(1)
        return _request_output(str(index), request, events)

    try:
        return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(requests))))
    finally:
        progress.close()


def _request_output(
    request_id: str, request: ValidRequest, events: list[StreamEvent]
) -> RequestOutput:
    """All n sequences; of best_of samples, the n with the highest cumulative logprob (vLLM's
    rule); beams come best first from the shard."""
    by_sequence: dict[int, list[StreamEvent]] = {}
    for event in events:
        by_sequence.setdefault(event.sequence_index, []).append(event)
    with_logprobs = request.top_n_tokens > 0
    completions = [_completion(i, by_sequence[i], with_logprobs) for i in sorted(by_sequence)]
    if not request.params.use_beam_search and len(completions) > request.params.n:
        completions.sort(key=lambda c: c.cumulative_logprob or 0.0, reverse=True)
        completions = completions[: request.params.n]
    first = events[0]
    prompt_logprobs = (
        [
            None if t.logprob is None else {t.id: Logprob(t.logprob, None, t.text)}
            for t in first.prefill
        ]
        if request.decoder_input_details
        else None
    )
    return RequestOutput(
        request_id=request_id,
        prompt=request.inputs or None,
        prompt_token_ids=request.input_ids,
        prompt_logprobs=prompt_logprobs,
        outputs=completions,
    )


def _completion(index: int, events: list[StreamEvent], with_logprobs: bool) -> CompletionOutput:
    finished = events[-1].finished
    logprobs = [event.token.logprob for event in events]
    known = [lp for lp in logprobs if lp is not None]
    return CompletionOutput(
        index=index,
        text=finished.generated_text if finished else "",
        token_ids=[event.token.id for event in events],
        cumulative_logprob=sum(known) if known else None,
        logprobs=[_step_logprobs(event) for event in events] if with_logprobs else None,
        finish_reason=_VLLM_FINISH_REASONS[finished.reason] if finished else None,
    )


def _step_logprobs(event: StreamEvent) -> dict[int, Logprob]:
    """The chosen token and the top alternatives of one step, ranked as vLLM ranks them."""
    ranked = {
        t.id: Logprob(t.logprob, rank, t.text)
        for rank, t in enumerate(event.top_tokens, start=1)
        if t.logprob is not None
    }
    chosen = event.token
    if chosen.id not in ranked and chosen.logprob is not None:
        ranked[chosen.id] = Logprob(chosen.logprob, None, chosen.text)
    return ranked


def _per_prompt(
    sampling_params: SamplingParams | Sequence[SamplingParams] | None, count: int
) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()] * count
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * count
    if len(sampling_params) != count:
        raise ValueError(
            f"got {len(sampling_params)} SamplingParams for {count} prompts: give one, or one each"
        )
    return list(sampling_params)


class _InProcessShards:
    """One shard in this process."""

    def __init__(self, model_dir: Path, args: EngineArgs) -> None:
        from shardline.shards.bootstrap import ShardArgs, create_engine

        self.engine = create_engine(
            ShardArgs(
                model_dir=model_dir,
                dtype=args.dtype,
                block_size=args.block_size,
                kv_cache_bytes=args.kv_cache_bytes,
                gpu_memory_utilization=args.gpu_memory_utilization,
                attention=args.attention,
                cuda_graphs=args.cuda_graphs,
            )
        )

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[Any]:
        from shardline.in_process import InProcessShardClient

        client = InProcessShardClient(self.engine)
        try:
            yield client
        finally:
            await client.close()

    def close(self) -> None:
        """Nothing to stop: the engine lives as long as this process."""


class _ShardProcesses:
    """`tensor_parallel_size` shard processes, started and watched as the launcher does."""

    def __init__(self, model_dir: Path, args: EngineArgs) -> None:
        from shardline.launcher.commands import shard_socket, shard_spec
        from shardline.launcher.output import ChildOutput
        from shardline.launcher.readiness import shard_is_healthy
        from shardline.launcher.supervisor import Child, ChildDied, wait_until_ready

        self._socket_dir = tempfile.mkdtemp(prefix="shardline-llm-")
        self._prefix = os.path.join(self._socket_dir, "shard")
        options = argparse.Namespace(
            num_shard=args.tensor_parallel_size,
            master_addr="127.0.0.1",
            master_port=_free_port(),
            dtype=args.dtype,
            block_size=args.block_size,
            kv_cache_bytes=args.kv_cache_bytes,
            cuda_memory_fraction=args.gpu_memory_utilization,
            attention=args.attention,
            cuda_graphs=args.cuda_graphs,
            json_output=False,
        )
        output = ChildOutput(json_output=False)
        self._children = [
            Child(shard_spec(options, model_dir, self._prefix, rank, os.environ), output)
            for rank in range(args.tensor_parallel_size)
        ]
        atexit.register(self.close)
        try:
            wait_until_ready(
                self._children,
                lambda child: shard_is_healthy(shard_socket(self._prefix, child.spec.rank)),
                self._children,
                threading.Event(),
            )
        except ChildDied as died:
            self.close()
            raise RuntimeError(f"a shard process failed to start: {died}") from died

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[Any]:
        from shardline.launcher.commands import shard_socket
        from shardline.router.client import ShardedClient

        client = await ShardedClient.connect(shard_socket(self._prefix, 0))
        try:
            yield client
        finally:
            await client.close()

    def close(self) -> None:
        from shardline.launcher.supervisor import stop_children

        stop_children(self._children, timeout_s=30, abort=threading.Event())
        shutil.rmtree(self._socket_dir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_shards(model_dir: Path, args: EngineArgs) -> _InProcessShards | _ShardProcesses:
    if args.tensor_parallel_size < 1:
        raise ValueError(
            f"tensor_parallel_size must be at least 1 (got {args.tensor_parallel_size})"
        )
    if args.tensor_parallel_size == 1:
        return _InProcessShards(model_dir, args)
    return _ShardProcesses(model_dir, args)
