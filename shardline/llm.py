"""The offline API, with vLLM's names: `LLM(model=...).generate(prompts, SamplingParams(...))`.

One shard runs in this process (no HTTP, no gRPC); `tensor_parallel_size > 1` (or
`shard_process=True`) starts shard processes through the launcher's `start_shards` and talks to
them over gRPC (offline_shards.py).
Requests go through the router's continuous batching, so a prompt list larger than the KV cache
still completes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from shardline.model_files import resolve_model
from shardline.offline_shards import open_shards
from shardline.outputs import (
    BeamSearchOutput,
    CompletionOutput,
    RequestOutput,
    beam_search_output,
    request_output,
)
from shardline.proto import generate_pb2 as pb
from shardline.router.batcher import Batcher, BatchingConfig
from shardline.router.errors import ValidationError
from shardline.router.grammar_compiler import GrammarBudget, GrammarCompiler
from shardline.router.metrics import RouterMetrics
from shardline.router.paced_admission import SchedulingPolicy, check_policy
from shardline.router.request_stream import RequestStream
from shardline.router.request_types import ValidRequest
from shardline.router.validation import ValidationLimits, Validator
from shardline.sampling_params import BeamSearchParams, SamplingParams
from shardline.shard_config import FIELD_NAMES as SHARD_FIELDS
from shardline.shard_config import ShardConfig

logger = logging.getLogger(__name__)

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "BeamSearchOutput", "EngineArgs"]


@dataclass(frozen=True)
class EngineArgs:
    """vLLM's engine arguments: the shard's settings (`ShardConfig`'s fields, by their names) and
    how this API batches requests."""

    shard: ShardConfig = field(default_factory=ShardConfig)
    max_num_batched_tokens: int | None = None
    max_num_seqs: int = 256
    max_model_len: int | None = None
    seed: int = 0
    waiting_served_ratio: float = 0.3
    max_waiting_tokens: int = 20
    enable_chunked_prefill: bool = True
    # vLLM's name; `paced` (longest first, at router/paced_admission.py's pace) by default here:
    # in an offline run only the last answer's time counts
    scheduling_policy: SchedulingPolicy = "paced"
    download_dir: str | None = None  # the Hugging Face cache folder hub models are downloaded to
    # The one shard of tensor_parallel_size 1 in a process of its own, as larger sizes run (vLLM
    # runs its engine core in one by default): the router's Python and the shard's then run on
    # two cores at once instead of taking turns under one interpreter lock.
    shard_process: bool = False

    def __post_init__(self) -> None:
        check_policy(self.scheduling_policy)

    @property
    def prefill_budget(self) -> int:
        """Prompt tokens one forward pass runs at most."""
        return self.max_num_batched_tokens or max(self.max_model_len or 4096, 4096)


_BATCHING_ARGS = frozenset(f.name for f in dataclasses.fields(EngineArgs)) - {"shard"}


def _engine_args(kwargs: dict[str, Any]) -> EngineArgs:
    """The engine arguments, from vLLM's names; ones with no counterpart here are logged."""
    kwargs = dict(kwargs)
    if kwargs.pop("enforce_eager", False):
        kwargs.setdefault("cuda_graphs", "0")
    if "tensor_parallel_size" in kwargs or "pipeline_parallel_size" in kwargs:
        stages = kwargs.get("pipeline_parallel_size", 1)
        kwargs["world_size"] = kwargs.pop("tensor_parallel_size", 1) * stages
    if kwargs.pop("trust_remote_code", False):
        logger.warning("trust_remote_code has no effect: Shardline runs its own model code")
    ignored = sorted(set(kwargs) - _BATCHING_ARGS - SHARD_FIELDS)
    if ignored:
        logger.warning("LLM ignores engine arguments with no Shardline counterpart: %s", ignored)
    shard = ShardConfig(**{k: v for k, v in kwargs.items() if k in SHARD_FIELDS})
    return EngineArgs(shard, **{k: v for k, v in kwargs.items() if k in _BATCHING_ARGS})


class LLM:
    def __init__(
        self, model: str | None = None, tokenizer: str | None = None, **kwargs: Any
    ) -> None:
        self.args = _engine_args(kwargs)
        self._seeds = random.Random(self.args.seed)
        revision, cache_dir = self.args.shard.revision, self.args.download_dir
        self.model_dir = resolve_model(model, revision, cache_dir=cache_dir)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or self.model_dir)
        self.shard_config = dataclasses.replace(self.args.shard, model=str(self.model_dir))
        self._shards = open_shards(self.shard_config, self.args.shard_process)
        warmup, info = asyncio.run(self._warmup())
        self.vocab_size = info.vocab_size
        self.max_model_len = warmup.max_total_tokens
        limits = ValidationLimits(self.max_model_len - 1, self.max_model_len, self.vocab_size)
        self._validator = Validator(self.tokenizer, limits, workers=1)
        self.max_batch_total_tokens = warmup.max_supported_total_tokens
        # The batching metrics of every call (the server's /metrics: `metrics.exposition()`).
        self.metrics = RouterMetrics()
        if not self.args.enable_chunked_prefill and self.args.prefill_budget < self.max_model_len:
            self.shutdown()
            raise ValueError(
                f"max_num_batched_tokens ({self.args.prefill_budget}) is smaller than "
                f"max_model_len ({self.max_model_len}): long prompts would never run; "
                "enable chunked prefill or raise max_num_batched_tokens"
            )

    async def _warmup(self) -> tuple[pb.WarmupResponse, pb.InfoResponse]:
        async with self._shards.client() as client:
            request = pb.WarmupRequest(
                max_prefill_tokens=self.args.prefill_budget, max_batch_size=self.args.max_num_seqs
            )
            if self.args.max_model_len:
                request.max_total_tokens = self.args.max_model_len
                request.max_input_tokens = self.args.max_model_len - 1
            return await client.warmup(request), await client.info()

    def shutdown(self) -> None:
        """Stops the shard processes of `tensor_parallel_size > 1` (also done at exit)."""
        self._shards.close()
        self._validator.close()  # and its grammar compiler, if a grammar started one

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

    def beam_search(
        self,
        prompts: Sequence[str | dict[str, Any]],
        params: BeamSearchParams,
        use_tqdm: bool = False,
    ) -> list[BeamSearchOutput]:
        """vLLM's: each prompt (text, or {"prompt": text} / {"prompt_token_ids": ids}) gives its
        beam_width beams, best first; the shard runs it (shards/sequences/beam_search.py)."""
        texts, token_ids = [], []
        for prompt in prompts:
            if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
                texts.append(None)
                token_ids.append(list(prompt["prompt_token_ids"]))
            else:
                text = prompt["prompt"] if isinstance(prompt, dict) else prompt
                texts.append(text)
                token_ids.append(self.tokenizer.encode(text))
        sampling = params.sampling_params()
        outputs = asyncio.run(self._generate(texts, token_ids, [sampling] * len(texts), use_tqdm))
        return [beam_search_output(output) for output in outputs]

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
            await self._compile_grammars(client, requests)
            batcher = Batcher(client, self.tokenizer, self._batching_config(), self.metrics)
            batcher.start()
            try:
                return await _collect_all(batcher, requests, use_tqdm)
            finally:
                await batcher.stop()
                # The batcher stops once every request has its last event, while the step it
                # sent ahead still holds rows the router ended (a stop string, a stopped
                # sample): free them, or the next call's batch 0 finds that batch still cached.
                if batcher.stuck is None:
                    await client.clear_cache(None, keep_prefix_cache=True)

    async def _compile_grammars(self, client: Any, requests: list[ValidRequest]) -> None:
        """Each grammar as the server compiles it: in a worker process, within the default
        GrammarBudget; one that does not compile or is past it raises ValueError."""
        for index, request in enumerate(requests):
            if request.params.grammar() is None:
                continue
            if self._validator.grammars is None:  # started by the first grammar
                eos_ids = list((await client.info()).eos_token_ids)
                self._validator.grammars = GrammarCompiler(self.tokenizer, eos_ids, GrammarBudget())
            try:
                request.grammar_index = await self._validator.grammar_index(request.params)
            except ValidationError as error:
                raise ValueError(f"prompt {index}: {error}") from None

    def _valid_request(
        self, text: str | None, ids: list[int], params: SamplingParams
    ) -> ValidRequest:
        try:
            max_new = self._validator.token_budget(ids, params)
        except ValidationError as error:
            raise ValueError(f"{error} (max_model_len {self.max_model_len})") from None
        if params.seed is None and not params.greedy:
            # vLLM's `seed` engine argument: unseeded requests draw from one seeded stream.
            params = dataclasses.replace(params, seed=self._seeds.getrandbits(63))
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
            block_size=self.shard_config.block_size,
            waiting_served_ratio=self.args.waiting_served_ratio,
            max_waiting_tokens=self.args.max_waiting_tokens,
            prefill_chunking=self.args.enable_chunked_prefill,
            prefix_caching=self.shard_config.enable_prefix_caching,
            batches_in_flight=self.shard_config.pipeline_parallel_size,
            scheduling_policy=self.args.scheduling_policy,
        )


async def _collect_all(
    batcher: Batcher, requests: list[ValidRequest], use_tqdm: bool
) -> list[RequestOutput]:
    """Every request's output, in the prompts' order; the first error cancels the others."""
    from tqdm.auto import tqdm

    progress = tqdm(total=len(requests), desc="Processed prompts", disable=not use_tqdm)

    async def one(index: int, stream: RequestStream) -> RequestOutput:
        events = await stream.collect()
        progress.update(1)
        return request_output(str(index), stream.request, events)

    streams = [batcher.submit(request) for request in requests]
    tasks = [asyncio.ensure_future(one(i, stream)) for i, stream in enumerate(streams)]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for stream, task in zip(streams, tasks, strict=True):
            if not task.done():
                stream.cancel()
                task.cancel()
        progress.close()


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
