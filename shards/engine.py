"""The shard's engine: the RPCs of generate.proto over the model runner, the KV blocks and batches.

The gRPC server (server.py) and the in-process offline API both drive this class with the same
protobuf requests; a Prefill or Decode answers plain data (`prefill_step`, `decode_step`: what
the in-process router reads), which `prefill` and `decode` encode for the wire. Every method
runs on one thread, in the order the router sends the calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shardline import shard_answers as answers
from shardline.proto import generate_pb2 as pb
from shardline.shard_answers import GenerationColumns, Tokens
from shardline.shards import fault_injection
from shardline.shards.batch import ShardBatch
from shardline.shards.engine_facts import engine_info, engine_stats
from shardline.shards.kv_cache import BlockAllocator, KVCacheExhaustedError
from shardline.shards.lookahead import StepAhead, can_launch_ahead
from shardline.shards.model_runner import Ahead, ModelRunner, grow_blocks
from shardline.shards.models.config import ModelConfig
from shardline.shards.prefix_cache import clear_prefix_cache, new_allocator
from shardline.shards.prompt_chunks import (
    PartialPrompts,
    PrefillPass,
    ScheduledChunk,
    remember_prompts,
    run_excess_ahead,
    run_prefill_pass,
)
from shardline.shards.request_checks import InvalidRequestError, admit, check_batch
from shardline.shards.sampling.grammar import GrammarLoader
from shardline.shards.sequences.generations import advance, prompt_tokens_by_row
from shardline.shards.sequences.samples import (
    check_fork_blocks,
    first_token_sampling,
    fork_samples,
    start_beam_searches,
)
from shardline.shards.stage_pending import PendingSteps, needs_more_than_fresh
from shardline.shards.step_result import PendingStep, StepResult
from shardline.shards.utils.dist import TPGroup
from shardline.shards.warmup import warm_up

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSettings:
    """A ShardConfig's engine settings, resolved (shards/bootstrap.py:create_engine)."""

    block_size: int
    kv_cache_bytes: int | None
    gpu_memory_utilization: float
    attention_impl: str
    cuda_graph_buckets: tuple[int, ...]
    kv_cache_dtype: torch.dtype | None = None  # None: the model's dtype
    quantization: str | None = None  # the FP8 weights' format (quantization.py), for /info
    prefix_caching: bool = True


class ShardEngine:
    def __init__(
        self,
        model: torch.nn.Module,
        config: ModelConfig,
        tp: TPGroup,
        device: torch.device,
        settings: EngineSettings,
    ) -> None:
        self.model = model
        self.config = config
        self.tp = tp
        self.device = device
        self.settings = settings
        self.runner = ModelRunner(model, device, tp.stage)
        self.allocator: BlockAllocator | None = None
        self.batches: dict[int, ShardBatch] = {}
        self._ahead: StepAhead | None = None
        # Decodes a stage but the last answered before their tokens came (stage_pending.py).
        self._held = PendingSteps()
        self._partial = PartialPrompts()
        self.prefill_limit: int | None = None  # the largest pass warmup sized the memory for
        self.grammars = GrammarLoader(sorted(config.eos_token_ids), config.vocab_size)

    @property
    def max_positions(self) -> int:
        """The longest sequence served; sliding-window models serve their full context."""
        return self.config.max_position_embeddings

    def bind_thread(self) -> None:
        """Makes this engine's GPU the current one of the calling thread: Triton launches on the
        current device, and a new thread's is device 0 whatever the rank."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    # ---- facts -------------------------------------------------------------------------------

    def info(self) -> pb.InfoResponse:
        return engine_info(self)

    def stats(self) -> pb.StatsResponse:
        return engine_stats(self)

    # ---- warmup ------------------------------------------------------------------------------

    def warmup(self, request: pb.WarmupRequest) -> pb.WarmupResponse:
        return warm_up(self, request)

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        return self.settings.kv_cache_dtype or self.model.dtype

    def allocate_cache(self, num_blocks: int) -> None:
        self.runner.allocate_cache(num_blocks, self.settings.block_size, self.kv_cache_dtype)
        self.allocator = new_allocator(
            num_blocks, self.settings.block_size, self.settings.prefix_caching
        )

    def release_cache(self) -> None:
        self.runner.release_cache()
        self.allocator = None

    # ---- generation --------------------------------------------------------------------------

    def prefill(self, request: pb.PrefillRequest) -> pb.PrefillResponse:
        return answers.prefill_response(self.prefill_step(request))

    def prefill_step(self, request: pb.PrefillRequest) -> answers.StepResult:
        """The new requests' prompts (or the next chunk of each) and the first tokens of the
        prompts completed. With `cached_batches`, those batches decode one step too, in the
        same forward pass (one weight read for both; or from the step launched ahead for them):
        their generations come first, and the answered batch holds every row. A request whose
        data is invalid is refused alone (`refused`), the others run."""
        started = time.perf_counter_ns()
        self._complete_held()
        batch_pb, refused = self._admit(request.batch)
        if not batch_pb.requests:
            return self._prefill_none(request, refused, started)
        cached = self._pop_batches(request.cached_batches)
        try:
            running, running_step = self._running_step(cached)
            result = self._prefill_new(batch_pb, running if running_step is None else None)
        except BaseException:
            for batch in cached:
                self.batches[batch.id] = batch
            raise
        joined, step, prompt_tokens = self._joined(running, running_step, result)
        if request.launch_next and joined is not None and self._may_launch_ahead(joined):
            # every row's next step, queued behind the prompts' pass before any token is read
            running_rows = 0 if running is None else running.size
            ahead = [1] * running_rows + [0] * (joined.size - running_rows)
            self._ahead = self._launch(joined, joined.last_tokens, ahead=ahead)
        generations = GenerationColumns()
        batch = None
        if joined is not None and step is not None:
            batch = self._advance(joined, step.result(), generations, prompt_tokens)
        cached_batch = None if batch is None else batch.to_proto()
        decode_ns = result.step.result().sample_ns if result.step else 0
        timings = answers.Timings(result.forward_ns, decode_ns, time.perf_counter_ns() - started)
        return answers.StepResult(generations, cached_batch, timings, refused, result.cached_tokens)

    def _prefill_none(
        self, request: pb.PrefillRequest, refused: dict[int, str], started: int
    ) -> answers.StepResult:
        """Every new request was refused: the running batches carried decode their step."""
        if not request.cached_batches:
            timings = answers.Timings(0, 0, time.perf_counter_ns() - started)
            return answers.StepResult(GenerationColumns(), None, timings, refused)
        answer = self.decode_step(pb.DecodeRequest(batches=request.cached_batches))
        spent = answer.timings
        timings = answers.Timings(
            spent.forward_ns, spent.decode_ns, time.perf_counter_ns() - started
        )
        return answers.StepResult(answer.generations, answer.batch, timings, refused)

    def _joined(
        self, running: ShardBatch | None, running_step: PendingStep | None, result: PrefillPass
    ) -> tuple[ShardBatch | None, PendingStep | None, dict[int, Tokens]]:
        """The running rows (their step launched ahead, or run in the prompts' pass) and the
        rows of the prompts the pass completed, as one batch under the running id, before any
        token is recorded; its step, and the new prompts' logprobs by its rows."""
        parts: list[ShardBatch] = []
        steps: list[PendingStep] = []
        if running is not None:
            parts.append(running)
            steps.append(running_step or result.running_step)
        prompt_tokens: dict[int, Tokens] = {}
        if result.batch is not None and result.step is not None:
            by_row = prompt_tokens_by_row(
                result.requests, result.prompt_logprobs, result.sampled_from
            )
            start_beam_searches(result.batch, result.requests, by_row)
            offset = 0 if running is None else running.size
            prompt_tokens = {offset + row: tokens for row, tokens in by_row.items()}
            parts.append(result.batch)
            steps.append(result.step)
        if not parts:
            return None, None, prompt_tokens
        if self.tp.stage.size > 1:  # a stage but the last records the tokens as they arrive
            for step in steps:
                step.result()
        joined = ShardBatch.concatenate(parts)
        step = PendingStep.concatenate(steps)
        joined.last_tokens = step.next_tokens
        return joined, step, prompt_tokens

    def _running_step(
        self, cached: list[ShardBatch]
    ) -> tuple[ShardBatch | None, PendingStep | None]:
        """The running batch a prefill decodes, and its step where it does not run in the
        prompts' forward pass (the step was launched ahead for some of its rows)."""
        if not cached:
            return None, None
        if self._ahead is not None and any(self._ahead.covers(batch) for batch in cached):
            return self._step(cached)
        self._ahead = None
        running = ShardBatch.concatenate(cached)
        grow_blocks(running, self._require_allocator(), self.settings.block_size)
        return running, None

    def _prefill_new(self, batch_pb: pb.Batch, running: ShardBatch | None) -> PrefillPass:
        """Runs the forward pass of the requests' prompt chunks (with `running`'s step): a new
        prompt takes the blocks of all its tokens; one left in part is kept for its next chunk."""
        allocator = self._require_allocator()
        chunks = self._partial.schedule(batch_pb.requests, allocator, self.config.eos_token_ids)
        try:
            completing = [chunk.request for chunk in chunks if chunk.completes]
            check_fork_blocks(completing, allocator, batch_pb.id)
            result = self._prefill_forward(batch_pb.id, chunks, running)
            remember_prompts(chunks, allocator)
            cache = self.runner.kv_cache
            result.batch = fork_samples(result.batch, result.requests, allocator, cache)
        except BaseException:
            for chunk in chunks:
                allocator.free(chunk.sequence.blocks)
            raise
        for row, chunk in enumerate(chunks):
            if not chunk.completes:
                logprobs = result.chunk_logprobs.get(row, [])
                self._partial.put(chunk.request.id, chunk.partial(logprobs))
        return result

    def _pop_batches(self, cached: Sequence[pb.CachedBatch]) -> list[ShardBatch]:
        """All the named batches, or none taken and an error naming one that is missing."""
        for batch in cached:
            if batch.id not in self.batches:
                raise InvalidRequestError(f"no cached batch with id {batch.id}")
        return [self._pop_batch(batch.id) for batch in cached]

    def _prefill_forward(
        self, batch_id: int, chunks: list[ScheduledChunk], running: ShardBatch | None
    ) -> PrefillPass:
        requests = [chunk.request for chunk in chunks if chunk.completes]
        sampling = None
        if requests:
            sampling = first_token_sampling(
                requests,
                model_eos_ids=self.config.eos_token_ids,
                vocab_size=self.config.vocab_size,
                device=self.device,
                grammars=self.grammars,
            )
        block_size = self.settings.block_size
        run_excess_ahead(self.runner, batch_id, chunks, self.prefill_limit, block_size)
        return run_prefill_pass(self.runner, batch_id, chunks, sampling, block_size, running)

    def decode(self, request: pb.DecodeRequest) -> pb.DecodeResponse:
        return answers.decode_response(self.decode_step(request))

    def decode_step(self, request: pb.DecodeRequest) -> answers.StepResult:
        """One decode step of the named batches, concatenated.

        With `launch_next` the router expects to decode the batch this step returns next, with
        nothing joining it: the step after this one is launched on the device before this one's
        tokens are read back, so the device works while the host answers and the router
        prepares the next call. A later Decode takes the rows it names from that step (a filter
        in between only drops rows); batches it did not cover (just prefilled) run on their own
        and are concatenated.
        """
        started = time.perf_counter_ns()
        if not request.batches:
            raise InvalidRequestError("Decode needs at least one cached batch")
        self._complete_held([batch.id for batch in request.batches])
        batches = self._pop_batches(request.batches)
        try:
            fault_injection.maybe_fail("decode")
            if self._held and needs_more_than_fresh(batches, self._require_allocator()):
                self._complete_held()
            batch, step = self._step(batches)
        except BaseException:
            for batch in batches:
                self.batches[batch.id] = batch
            raise
        batch.id = batches[0].id
        concat_done = time.perf_counter_ns()
        self._complete_held()  # the step before this one: its tokens came while this one ran
        if not self.tp.stage.is_last and not batch.beams:
            self._held.hold(batch, step)  # the router reads the last stage's answer
            timings = answers.Timings(0, 0, time.perf_counter_ns() - started)
            return answers.StepResult(GenerationColumns(), None, timings)
        if request.launch_next and self._may_launch_ahead(batch):
            self._ahead = self._launch(batch, step.next_tokens, ahead=1)
        result = step.result()
        batch.last_tokens = result.next_tokens
        generations = GenerationColumns()
        kept = self._advance(batch, result, generations)
        cached_batch = None if kept is None else kept.to_proto()
        timings = answers.Timings(
            result.forward_ns,
            result.sample_ns,
            time.perf_counter_ns() - started,
            concat_ns=concat_done - started,
        )
        return answers.StepResult(generations, cached_batch, timings)

    def _step(self, batches: list[ShardBatch]) -> tuple[ShardBatch, PendingStep]:
        """One decode step of `batches`: the rows of those the step launched ahead covers taken
        from it, the others launched now; the batch they make together (covered rows first)."""
        ahead, self._ahead = self._ahead, None
        covered = [batch for batch in batches if ahead is not None and ahead.covers(batch)]
        fresh = [batch for batch in batches if not any(batch is c for c in covered)]
        parts: list[PendingStep] = []
        if covered:
            assert ahead is not None
            parts.append(ahead.select([seq for b in covered for seq in b.sequences]))
        if fresh:
            batch = ShardBatch.concatenate(fresh)
            positions = grow_blocks(batch, self._require_allocator(), self.settings.block_size)
            parts.append(self.runner.decode(batch, batch.last_tokens, positions))
            covered = [*covered, batch]
        return ShardBatch.concatenate(covered), PendingStep.concatenate(parts)

    def _may_launch_ahead(self, batch: ShardBatch) -> bool:
        return self.tp.stage.size == 1 and can_launch_ahead(batch)

    def _launch(self, batch: ShardBatch, tokens: torch.Tensor, ahead: Ahead) -> StepAhead | None:
        """The decode step of `batch` on `tokens`, `ahead` of its recorded ones, launched before
        the router asks for it."""
        allocator = self._require_allocator()
        try:
            positions = grow_blocks(batch, allocator, self.settings.block_size, ahead=ahead)
        except KVCacheExhaustedError:
            return None  # the next Decode runs its step then, or the router preempts
        return StepAhead(self.runner.decode(batch, tokens, positions), batch.sequences)

    def filter_batch(self, request: pb.FilterBatchRequest) -> pb.FilterBatchResponse:
        self._complete_held()
        batch = self._pop_batch(request.batch_id)
        wanted = set(request.request_ids)
        stopped = {(ref.request_id, ref.sequence_index) for ref in request.stopped_sequences}
        rows = [
            row
            for row, seq in enumerate(batch.sequences)
            if seq.request_id in wanted and (seq.request_id, seq.sequence_index) not in stopped
        ]
        kept = batch.keep(rows, self._require_allocator())
        if kept is None:
            return pb.FilterBatchResponse(batch=pb.CachedBatch(id=request.batch_id))
        self.batches[kept.id] = kept
        return pb.FilterBatchResponse(batch=kept.to_proto())

    def clear_cache(self, request: pb.ClearCacheRequest) -> pb.ClearCacheResponse:
        self._complete_held()
        self._ahead = None
        self._partial.drop(list(request.prefilling_request_ids), self.allocator)
        if request.HasField("id"):
            ids = [request.id]
        elif request.prefilling_request_ids:
            ids = []
        else:
            ids = list(self.batches)
            self._partial.drop_all(self.allocator)
            if not request.keep_prefix_cache:
                clear_prefix_cache(self.allocator)
        for batch_id in ids:
            batch = self.batches.pop(batch_id, None)
            if batch is not None and self.allocator is not None:
                batch.free_all(self.allocator)
        return pb.ClearCacheResponse()

    # ---- helpers -----------------------------------------------------------------------------

    def _complete_held(self, batch_ids: list[int] | None = None) -> None:
        if not self._held:  # every call asks, and almost always nothing is held
            return
        self._held.complete(
            lambda batch, step: self._advance(batch, step, GenerationColumns()), batch_ids
        )

    def _advance(
        self,
        batch: ShardBatch,
        step: StepResult,
        generations: GenerationColumns,
        prompt_tokens: dict[int, Tokens] | None = None,
    ) -> ShardBatch | None:
        """The step's Generations, added to `generations`; the batch that goes on, cached
        under its id."""
        allocator = self._require_allocator()
        kept = advance(batch, step, allocator, self.runner.kv_cache, generations, prompt_tokens)
        if kept is not None:
            self.batches[kept.id] = kept
        return kept

    def _admit(self, batch: pb.Batch) -> tuple[pb.Batch, dict[int, str]]:
        """The batch without the requests the shard refuses; nothing of those is kept (a prompt
        they had prefilled in part is dropped)."""
        check_batch(batch, cached_batch_ids=self.batches.keys())
        admitted, reasons = admit(
            batch,
            vocab_size=self.config.vocab_size,
            max_positions=self.max_positions,
            load_grammar=self.grammars.load,
        )
        self._partial.drop(list(reasons), self.allocator)
        return admitted, reasons

    def _pop_batch(self, batch_id: int) -> ShardBatch:
        batch = self.batches.pop(batch_id, None)
        if batch is None:
            raise InvalidRequestError(f"no cached batch with id {batch_id}")
        return batch

    def _require_allocator(self) -> BlockAllocator:
        if self.allocator is None:
            raise RuntimeError("the KV cache is not allocated: call Warmup first")
        return self.allocator
