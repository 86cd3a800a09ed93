"""Turns settings and a connected `ShardClient` into a ready `RouterContext`: warmup, limits."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from shardline import __version__
from shardline.proto import generate_pb2 as pb
from shardline.router.batcher import Batcher, BatchingConfig
from shardline.router.client import ShardClient, ShardDeadlines
from shardline.router.grammar_compiler import GrammarBudget, GrammarCompiler
from shardline.router.http import PAYLOAD_LIMIT, RouterContext
from shardline.router.metrics import RouterMetrics
from shardline.router.paced_admission import SERVER_SCHEDULING_POLICY, SchedulingPolicy
from shardline.router.validation import ValidationLimits, Validator

logger = logging.getLogger(__name__)

_DEFAULT_PREFILL_TOKENS = 4096
_PREFILL_MARGIN = 50  # TGI's default prefill budget is max_input_tokens + 50
# /health answers 503 once a shard step has run this fraction of --shard-step-timeout, so that
# readiness takes the pod out well before the router gives up on the shard and exits.
UNREADY_STEP_FRACTION = 0.5


class StartupError(RuntimeError):
    """The settings cannot work with these shards; the message says which flag to change."""


@dataclass(frozen=True)
class RouterSettings:
    model_id: str
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    waiting_served_ratio: float = 0.3
    max_batch_prefill_tokens: int | None = None
    max_batch_total_tokens: int | None = None
    max_waiting_tokens: int = 20
    max_batch_size: int | None = None
    scheduling_policy: SchedulingPolicy = SERVER_SCHEDULING_POLICY
    validation_workers: int = 2
    max_client_batch_size: int = 4
    api_key: str | None = None
    metrics_without_auth: bool = False
    payload_limit: int = PAYLOAD_LIMIT
    shard_step_timeout: float | None = ShardDeadlines.step  # as the client's; None or 0: none
    grammar_budget: GrammarBudget | None = GrammarBudget()  # None: grammars are refused


@dataclass(frozen=True)
class _Limits:
    max_input_tokens: int
    max_total_tokens: int
    max_batch_prefill_tokens: int
    max_batch_total_tokens: int


async def start_router(
    client: ShardClient, tokenizer: Any, settings: RouterSettings
) -> RouterContext:
    """Warms the shards up, settles the token limits and starts the batching loop."""
    await client.clear_cache(None)
    shard_info = await client.info()
    limits = await _warmup(client, settings, shard_info.support_chunking)
    logger.info("limits settled", extra=vars(limits))
    metrics = RouterMetrics()
    batcher = Batcher(
        client,
        tokenizer,
        BatchingConfig(
            max_batch_prefill_tokens=limits.max_batch_prefill_tokens,
            max_batch_total_tokens=limits.max_batch_total_tokens,
            max_batch_size=settings.max_batch_size,
            waiting_served_ratio=settings.waiting_served_ratio,
            max_waiting_tokens=settings.max_waiting_tokens,
            block_size=max(shard_info.block_size, 1),
            prefill_chunking=shard_info.support_chunking,
            prefix_caching=shard_info.use_prefix_caching,
            batches_in_flight=max(shard_info.pipeline_parallel_size, 1),
            scheduling_policy=settings.scheduling_policy,
        ),
        metrics,
    )
    validator = Validator(
        tokenizer,
        ValidationLimits(
            max_input_tokens=limits.max_input_tokens,
            max_total_tokens=limits.max_total_tokens,
            vocab_size=shard_info.vocab_size,
            max_best_of=settings.max_best_of,
            max_stop_sequences=settings.max_stop_sequences,
            max_top_n_tokens=settings.max_top_n_tokens,
            max_client_batch_size=settings.max_client_batch_size,
        ),
        settings.validation_workers,
        _grammar_compiler(tokenizer, shard_info, settings.grammar_budget),
    )
    batcher.start()
    return RouterContext(
        client=client,
        validator=validator,
        batcher=batcher,
        metrics=metrics,
        info=_info(settings, shard_info, limits),
        max_concurrent_requests=settings.max_concurrent_requests,
        api_key=settings.api_key,
        metrics_without_auth=settings.metrics_without_auth,
        payload_limit=settings.payload_limit,
        unready_step_s=(
            settings.shard_step_timeout * UNREADY_STEP_FRACTION
            if settings.shard_step_timeout
            else None
        ),
    )


async def _warmup(client: ShardClient, settings: RouterSettings, chunking: bool) -> _Limits:
    """Shards that prefill in chunks take prompts longer than the prefill budget."""
    max_input = settings.max_input_tokens
    if max_input is None and settings.max_total_tokens is not None:
        max_input = settings.max_total_tokens - 1
    prefill = settings.max_batch_prefill_tokens or (
        max_input + _PREFILL_MARGIN if max_input else _DEFAULT_PREFILL_TOKENS
    )
    request = pb.WarmupRequest(max_prefill_tokens=prefill)
    if max_input is not None:
        request.max_input_tokens = max_input
    if settings.max_total_tokens is not None:
        request.max_total_tokens = settings.max_total_tokens
    if settings.max_batch_size is not None:
        request.max_batch_size = settings.max_batch_size
    answer = await client.warmup(request)
    if max_input is None:
        max_input = answer.max_input_tokens if chunking else min(answer.max_input_tokens, prefill)
    max_total = answer.max_total_tokens
    supported = (
        answer.max_supported_total_tokens if answer.HasField("max_supported_total_tokens") else None
    )
    batch_total = settings.max_batch_total_tokens or supported
    _check(batch_total is not None, "set --max-batch-total-tokens: the shards did not report one")
    _check(
        max_input < max_total,
        f"`max_input_tokens` ({max_input}) must be < `max_total_tokens` ({max_total})",
    )
    _check(
        chunking or prefill >= max_input,
        f"`max_batch_prefill_tokens` ({prefill}) must be >= `max_input_tokens` ({max_input})",
    )
    _check(
        max_total <= batch_total,
        f"`max_total_tokens` ({max_total}) must be <= `max_batch_total_tokens` ({batch_total}): "
        "the KV cache cannot hold one full-length request",
    )
    return _Limits(max_input, max_total, prefill, batch_total)


def _grammar_compiler(
    tokenizer: Any, shard_info: pb.InfoResponse, budget: GrammarBudget | None
) -> GrammarCompiler | None:
    if budget is None:
        return None
    return GrammarCompiler(tokenizer, list(shard_info.eos_token_ids), budget)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise StartupError(message)


def _info(settings: RouterSettings, shard_info: pb.InfoResponse, limits: _Limits) -> dict[str, Any]:
    return {
        "model_id": settings.model_id,
        "model_sha": None,
        "model_dtype": shard_info.dtype,
        "model_device_type": shard_info.device_type,
        "quantize": shard_info.quantize or None,
        "kv_cache_dtype": shard_info.kv_cache_dtype or None,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": settings.max_concurrent_requests,
        "max_best_of": settings.max_best_of,
        "max_stop_sequences": settings.max_stop_sequences,
        "max_input_tokens": limits.max_input_tokens,
        "max_total_tokens": limits.max_total_tokens,
        "validation_workers": settings.validation_workers,
        "max_client_batch_size": settings.max_client_batch_size,
        "router": "text-generation-router",
        "version": __version__,
        "sha": None,
        "docker_label": None,
    }
