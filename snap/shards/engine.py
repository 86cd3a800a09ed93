"""The shard's engine: the RPCs of generate.proto over the model runner, the KV blocks and batches.

The gRPC server (server.py) and the in-process offline API both drive this class with the same
protobuf messages; every method runs on one thread, in the order the router sends the calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shardline.gc_pauses import freeze_long_lived_objects
from shardline.proto import generate_pb2 as pb
from shardline.shards import fault_injection
from shardline.shards.batch import SequenceState, ShardBatch, build_block_table
from shardline.shards.beam_search import BeamSearch, candidates_per_step
from shardline.shards.cuda_graphs import buckets_up_to
from shardline.shards.generations import (
    beam_candidates,
    beam_generation,
    prompt_tokens_by_row,
    rows_by_request,
    token_generation,
)
from shardline.shards.kv_cache import BlockAllocator, KVCacheExhaustedError
from shardline.shards.kv_sizing import agree_on_min, blocks_that_fit, warmup_lengths, warmup_request
from shardline.shards.lookahead import StepAhead, can_launch_ahead
from shardline.shards.model_runner import ModelRunner, PendingStep, StepResult, grow_blocks
from shardline.shards.models.config import ModelConfig
from shardline.shards.prompt_chunks import PartialPrompts, ScheduledChunk, chunk_end
from shardline.shards.request_checks import InvalidRequestError, admit, check_batch
from shardline.shards.utils.dist import TPGroup
from shardline.shards.utils.grammar import GrammarCompiler
from shardline.shards.utils.sampling import SamplingState

logger = logging.getLogger(__name__)


@dataclass
class EngineSettings:
    block_size: int = 16
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.90
    attention_impl: str = "torch"
    cuda_graph_buckets: tuple[int, ...] = ()
    tokenizer_dir: Path | None = None  # read on the first request with a grammar


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
        self.runner = ModelRunner(model, device)
        self.allocator: BlockAllocator | None = None
        self.batches: dict[int, ShardBatch] = {}
        self._ahead: StepAhead | None = None
        self._partial = PartialPrompts()
        self.grammars = GrammarCompiler(
            settings.tokenizer_dir, sorted(config.eos_token_ids), config.vocab_size
        )

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
        return pb.InfoResponse(
            requires_padding=False,
            dtype=str(self.model.dtype).removeprefix("torch."),
            device_type=self.device.type,
            window_size=self.config.sliding_window,
            speculate=0,
            support_chunking=True,
            use_prefix_caching=False,
            attention_impl=self.settings.attention_impl,
            block_size=self.settings.block_size,
            model_type=self.config.model_type,
            world_size=self.tp.world_size,
            vocab_size=self.config.vocab_size,
            max_position_embeddings=self.max_positions,
            eos_token_ids=sorted(self.config.eos_token_ids),
        )

    def stats(self) -> pb.StatsResponse:
        allocator = self.allocator
        return pb.StatsResponse(
            total_blocks=allocator.num_blocks if allocator else 0,
            free_blocks=allocator.num_free if allocator else 0,
            block_size=self.settings.block_size,
            num_sequences=sum(batch.size for batch in self.batches.values()),
            num_batches=len(self.batches),
        )

    # ---- warmup ------------------------------------------------------------------------------

    def warmup(self, request: pb.WarmupRequest) -> pb.WarmupResponse:
        max_prefill = request.max_prefill_tokens or 4096
        max_input = request.max_input_tokens if request.HasField("max_input_tokens") else None
        positions = self.max_positions
        if request.HasField("max_total_tokens") and request.max_total_tokens > positions:
            raise InvalidRequestError(
                f"max_total_tokens {request.max_total_tokens} exceeds the model's "
                f"{positions} positions"
            )
        self.clear_cache(pb.ClearCacheRequest())
        longest_prompt = min(max_input or max_prefill, positions - 1)
        max_batch = request.max_batch_size if request.HasField("max_batch_size") else None
        buckets = buckets_up_to(self.settings.cuda_graph_buckets, max_batch)
        # A prefill may carry the running batch's rows: as many as the router runs at once, or
        # (where it sets no limit) an estimate, the largest CUDA-graph batch.
        decode_rows = max_batch if max_batch is not None else max(buckets, default=0)
        peak_bytes = self._run_warmup_prefill(max_prefill, longest_prompt, decode_rows)
        fit = blocks_that_fit(
            self.model,
            self.device,
            peak_bytes,
            block_size=self.settings.block_size,
            gpu_memory_utilization=self.settings.gpu_memory_utilization,
            kv_cache_bytes=self.settings.kv_cache_bytes,
        )
        num_blocks = agree_on_min(fit, self.tp, self.device)
        block_size = self.settings.block_size
        self.runner.allocate_cache(num_blocks, block_size)
        self.allocator = BlockAllocator(num_blocks, block_size)
        supported = num_blocks * block_size
        max_total = request.max_total_tokens if request.HasField("max_total_tokens") else None
        max_total = max_total or min(supported, positions)
        if self._graphs_wanted():
            self.runner.capture_graphs(buckets, -(-max_total // block_size))
        self._run_greedy_steps()
        freeze_long_lived_objects()
        logger.info(
            "kv cache ready: %d blocks of %d tokens (%d tokens)", num_blocks, block_size, supported
        )
        return pb.WarmupResponse(
            max_supported_total_tokens=supported,
            max_input_tokens=max_input or max(max_total - 1, 1),
            max_total_tokens=max_total,
        )

    def _run_warmup_prefill(
        self, max_prefill_tokens: int, max_input_tokens: int, decode_rows: int
    ) -> int:
        """Runs the largest prefill the router may send (with the decode rows it may carry);
        returns the peak device bytes it used."""
        lengths = warmup_lengths(max_prefill_tokens, max_input_tokens, decode_rows, self.device)
        block_size = self.settings.block_size
        blocks = sum(-(-n // block_size) for n in lengths) + len(lengths)
        self.runner.release_cache()
        self.runner.allocate_cache(blocks, block_size)
        self.allocator = BlockAllocator(blocks, block_size)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        batch = pb.Batch(
            id=0,
            requests=[warmup_request(i, n, self.config.vocab_size) for i, n in enumerate(lengths)],
        )
        self.prefill(pb.PrefillRequest(batch=batch))
        self.clear_cache(pb.ClearCacheRequest())
        peak = 0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        self.runner.release_cache()
        self.allocator = None
        return peak

    def _run_greedy_steps(self) -> None:
        """A greedy request's prompt in two chunks and a decode step, so that the kernels of the
        greedy path and of chunked prefill compile now rather than on the first request."""
        request = warmup_request(0, 2, self.config.vocab_size, max_new_tokens=3, sample=False)
        request.chunk_len = 1
        self.prefill(pb.PrefillRequest(batch=pb.Batch(id=0, requests=[request])))
        request.prefix_len = 1
        answer = self.prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=[request])))
        self.decode(pb.DecodeRequest(batches=[answer.batch]))
        self.clear_cache(pb.ClearCacheRequest())

    def _graphs_wanted(self) -> bool:
        return (
            self.device.type == "cuda"
            and bool(self.settings.cuda_graph_buckets)
            and self.settings.attention_impl == "triton"
        )

    # ---- generation --------------------------------------------------------------------------

    def prefill(self, request: pb.PrefillRequest) -> pb.PrefillResponse:
        """The new requests' prompts (or the next chunk of each) and the first tokens of the
        prompts completed. With `cached_batches`, those batches decode one step too, in the
        same forward pass (one weight read for both; or from the step launched ahead for them):
        their generations come first, and the answered batch holds every row. A request whose
        data is invalid is refused alone (`refused`), the others run."""
        started = time.perf_counter_ns()
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
        generations, batch = self._first_tokens(result)
        if running is not None:
            step = (running_step or result.running_step).result()
            running.last_tokens = step.next_tokens
            running_generations, kept = self._advance(running, step)
            generations = running_generations + generations
            batch = self._merge(kept, batch)
        return pb.PrefillResponse(
            generations=generations,
            batch=batch.to_proto() if batch else None,
            forward_ns=result.forward_ns,
            decode_ns=result.step.sample_ns if result.step else 0,
            total_ns=time.perf_counter_ns() - started,
            refused=refused,
        )

    def _prefill_none(
        self, request: pb.PrefillRequest, refused: list[pb.RefusedRequest], started: int
    ) -> pb.PrefillResponse:
        """Every new request was refused: the running batches carried decode their step."""
        if not request.cached_batches:
            return pb.PrefillResponse(refused=refused, total_ns=time.perf_counter_ns() - started)
        answer = self.decode(pb.DecodeRequest(batches=request.cached_batches))
        return pb.PrefillResponse(
            generations=answer.generations,
            batch=answer.batch if answer.HasField("batch") else None,
            forward_ns=answer.forward_ns,
            decode_ns=answer.decode_ns,
            total_ns=time.perf_counter_ns() - started,
            refused=refused,
        )

    def _first_tokens(
        self, result: _PrefillResult
    ) -> tuple[list[pb.Generation], ShardBatch | None]:
        """The Generations of the prompts a prefill completed, and their batch."""
        if result.batch is None or result.step is None:
            return [], None
        prompt_tokens = prompt_tokens_by_row(
            result.requests, result.prompt_logprobs, result.sampled_from
        )
        self._start_beam_searches(result.batch, result.requests, prompt_tokens)
        return self._advance(result.batch, result.step, prompt_tokens)

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

    def _prefill_new(self, batch_pb: pb.Batch, running: ShardBatch | None) -> _PrefillResult:
        """Runs the forward pass of the requests' prompt chunks (with `running`'s step): a new
        prompt takes the blocks of all its tokens; one left in part is kept for its next chunk."""
        allocator = self._require_allocator()
        chunks = self._schedule_chunks(batch_pb.requests)
        try:
            self._check_fork_copies(batch_pb.id, chunks)
            result = self._prefill_forward(batch_pb.id, chunks, running)
            result.batch = self._fork_samples(result.batch, result.requests)
        except BaseException:
            for chunk in chunks:
                allocator.free(chunk.sequence.blocks)
            raise
        for row, chunk in enumerate(chunks):
            if not chunk.completes:
                logprobs = result.chunk_logprobs.get(row, [])
                self._partial.put(chunk.request.id, chunk.partial(logprobs))
        return result

    def _schedule_chunks(self, requests: Sequence[pb.Request]) -> list[ScheduledChunk]:
        """Each request's chunk: the earlier chunks of continued prompts taken back, the blocks
        of new prompts allocated (all or none)."""
        allocator = self._require_allocator()
        for request in requests:
            self._partial.check(request)
        new = [request for request in requests if request.prefix_len == 0]
        needed = [allocator.blocks_for(len(request.input_ids)) for request in new]
        if sum(needed) > allocator.num_free:
            raise KVCacheExhaustedError(
                f"the prompts of {len(new)} new requests need {sum(needed)} KV blocks, "
                f"{allocator.num_free} are free"
            )
        continued = {r.id: self._partial.take(r.id) for r in requests if r.prefix_len}
        blocks = {r.id: allocator.allocate(n) for r, n in zip(new, needed, strict=True)}
        chunks = []
        for request in requests:
            partial = continued.get(request.id)
            if partial is None:
                sequence, earlier = self._new_sequence(request, blocks[request.id]), []
            else:
                sequence, earlier = partial.sequence, partial.prompt_logprobs
            end = chunk_end(request)
            chunks.append(ScheduledChunk(request, sequence, request.prefix_len, end, earlier))
        return chunks

    def _check_fork_copies(self, batch_id: int, chunks: list[ScheduledChunk]) -> None:
        copies = sum(self._fork_copies(chunk.request) for chunk in chunks if chunk.completes)
        if copies > self._require_allocator().num_free:
            raise KVCacheExhaustedError(
                f"the samples of batch {batch_id} need {copies} KV blocks, "
                f"{self._require_allocator().num_free} are free"
            )

    def _merge(self, kept: ShardBatch | None, new: ShardBatch | None) -> ShardBatch | None:
        """One cached batch of the running rows kept and the new ones, under the running id."""
        if kept is None or new is None:
            return kept or new
        merged = ShardBatch.concatenate([self.batches.pop(kept.id), self.batches.pop(new.id)])
        self.batches[merged.id] = merged
        return merged

    def _pop_batches(self, cached: Sequence[pb.CachedBatch]) -> list[ShardBatch]:
        """All the named batches, or none taken and an error naming one that is missing."""
        for batch in cached:
            if batch.id not in self.batches:
                raise InvalidRequestError(f"no cached batch with id {batch.id}")
        return [self._pop_batch(batch.id) for batch in cached]

    def _prefill_forward(
        self, batch_id: int, chunks: list[ScheduledChunk], running: ShardBatch | None
    ) -> _PrefillResult:
        finishing = [row for row, chunk in enumerate(chunks) if chunk.completes]
        requests = [chunks[row].request for row in finishing]
        sampled_from = [r for r, request in enumerate(requests) for _ in _samples(request)]
        rows = [(requests[r], i) for r, i in zip(sampled_from, _sample_indices(requests))]
        sampling = None
        if requests:
            sampling = SamplingState.from_requests(
                params=[_sample_parameters(request, i) for request, i in rows],
                stopping=[request.stopping_parameters for request, _ in rows],
                prompt_ids=[list(request.input_ids) for request, _ in rows],
                eos_token_ids=sorted(self.config.eos_token_ids),
                top_n_tokens=[self._top_n_tokens(request) for request, _ in rows],
                vocab_size=self.config.vocab_size,
                device=self.device,
                grammar=self.grammars.rows([request.parameters for request, _ in rows]),
            )
        table = build_block_table([chunk.sequence for chunk in chunks], self.settings.block_size)
        sample_rows = torch.tensor([finishing[r] for r in sampled_from], dtype=torch.long)
        output = self.runner.prefill(
            [chunk.model_input() for chunk in chunks], sampling, table, sample_rows, running
        )
        result = _PrefillResult(
            requests=requests,
            sampled_from=sampled_from,
            step=output.step,
            running_step=output.running_step,
            chunk_logprobs=output.prompt_logprobs,
            forward_ns=output.forward_ns,
        )
        if sampling is None or output.step is None:
            return result
        result.batch = ShardBatch(
            id=batch_id,
            sequences=[chunks[row].sequence for row in finishing],
            sampling=sampling,
            block_table=table.index_select(0, torch.tensor(finishing, dtype=torch.long)),
            last_tokens=output.step.next_tokens,
        )
        result.prompt_logprobs = {
            r: chunks[row].prompt_logprobs(output.prompt_logprobs[row])
            for r, row in enumerate(finishing)
            if row in output.prompt_logprobs
        }
        return result

    def _fork_samples(
        self, batch: ShardBatch | None, requests: list[pb.Request]
    ) -> ShardBatch | None:
        """Gives each sampled sequence of a request its own row, forked from the prompt's."""
        sampled_from = [r for r, request in enumerate(requests) for _ in _samples(request)]
        if batch is None or len(sampled_from) == batch.size:
            return batch
        forked = batch.regroup(
            sampled_from,
            self._require_allocator(),
            self.runner.kv_cache,
            last_tokens=batch.last_tokens,
            sampling=batch.sampling,
        )
        indices = _sample_indices(requests)
        for seq, row, index in zip(forked.sequences, sampled_from, indices, strict=True):
            seq.sequence_index = index
            seq.seed = _sample_seed(requests[row].parameters.seed, index)
        return forked

    def _start_beam_searches(
        self, batch: ShardBatch, requests: list[pb.Request], prompt_tokens: dict[int, pb.Tokens]
    ) -> None:
        first_rows = {}
        for row, seq in enumerate(batch.sequences):
            first_rows.setdefault(seq.request_id, row)
        for request in requests:
            if request.HasField("beam_search"):
                seq = batch.sequences[first_rows[request.id]]
                batch.beams[request.id] = BeamSearch(
                    width=request.beam_search.beam_width,
                    length_penalty=request.beam_search.length_penalty,
                    early_stopping=request.beam_search.early_stopping,
                    num_return_sequences=request.beam_search.num_return_sequences,
                    max_new_tokens=seq.max_new_tokens,
                    eos_token_ids=seq.eos_token_ids,
                    stop_token_ids=seq.stop_token_ids,
                    prompt_tokens=prompt_tokens.pop(first_rows[request.id], None),
                )

    def _top_n_tokens(self, request: pb.Request) -> int:
        """A beam search reads its candidates from the sampler's top-n tokens."""
        if not request.HasField("beam_search"):
            return request.top_n_tokens
        eos_ids, stop_ids = self._stop_ids(request)
        return candidates_per_step(request.beam_search.beam_width, len(eos_ids | stop_ids))

    def _stop_ids(self, request: pb.Request) -> tuple[frozenset[int], frozenset[int]]:
        """The EOS ids that end this request (none with ignore_eos) and its stop token ids."""
        stopping = request.stopping_parameters
        eos = frozenset() if stopping.ignore_eos_token else frozenset(self.config.eos_token_ids)
        return eos, frozenset(stopping.stop_token_ids)

    def _fork_copies(self, request: pb.Request) -> int:
        """Partial-block copies the forks of this request need right after its prefill."""
        partial = len(request.input_ids) % self.settings.block_size != 0
        forks = request.beam_search.beam_width if request.HasField("beam_search") else 0
        forks = forks or max(request.num_sequences, 1)
        return (forks - 1) * partial

    def decode(self, request: pb.DecodeRequest) -> pb.DecodeResponse:
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
        batches = self._pop_batches(request.batches)
        try:
            fault_injection.maybe_fail("decode")
            batch, step = self._step(batches)
        except BaseException:
            for batch in batches:
                self.batches[batch.id] = batch
            raise
        batch.id = batches[0].id
        concat_done = time.perf_counter_ns()
        if request.launch_next and can_launch_ahead(batch):
            self._ahead = self._launch_ahead(batch, step)
        result = step.result()
        batch.last_tokens = result.next_tokens
        generations, kept = self._advance(batch, result)
        return pb.DecodeResponse(
            generations=generations,
            batch=kept.to_proto() if kept else None,
            concat_ns=concat_done - started,
            forward_ns=result.forward_ns,
            decode_ns=result.sample_ns,
            total_ns=time.perf_counter_ns() - started,
        )

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
            grow_blocks(batch, self._require_allocator(), self.settings.block_size)
            parts.append(self.runner.decode(batch, batch.last_tokens))
            covered = [*covered, batch]
        return ShardBatch.concatenate(covered), PendingStep.concatenate(parts)

    def _launch_ahead(self, batch: ShardBatch, step: PendingStep) -> StepAhead | None:
        try:
            grow_blocks(batch, self._require_allocator(), self.settings.block_size, ahead=1)
        except KVCacheExhaustedError:
            return None  # the next Decode runs its step then, or the router preempts
        return StepAhead(self.runner.decode(batch, step.next_tokens, ahead=1), batch.sequences)

    def filter_batch(self, request: pb.FilterBatchRequest) -> pb.FilterBatchResponse:
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
        self._ahead = None
        self._partial.drop(list(request.prefilling_request_ids), self.allocator)
        if request.HasField("id"):
            ids = [request.id]
        elif request.prefilling_request_ids:
            ids = []
        else:
            ids = list(self.batches)
            self._partial.drop_all(self.allocator)
        for batch_id in ids:
            batch = self.batches.pop(batch_id, None)
            if batch is not None and self.allocator is not None:
                batch.free_all(self.allocator)
        return pb.ClearCacheResponse()

    # ---- helpers -----------------------------------------------------------------------------

    def _advance(
        self, batch: ShardBatch, step: StepResult, prompt_tokens: dict[int, pb.Tokens] | None = None
    ) -> tuple[list[pb.Generation], ShardBatch | None]:
        """Records each row's new token and answers its Generation; drops finished rows; moves
        each beam search a step on, forking the beams it keeps and answering when it ends."""
        generations: list[pb.Generation] = []
        parents: list[int] = []
        beam_tokens: dict[int, int] = {}
        beam_rows = rows_by_request(batch, set(batch.beams))
        for row, seq in enumerate(batch.sequences):
            rows = beam_rows.get(seq.request_id)
            if rows is None:
                generation = token_generation(seq, row, step, (prompt_tokens or {}).get(row))
                generations.append(generation)
                if generation.finish_reason == pb.FINISH_REASON_NONE:
                    parents.append(row)
                continue
            seq.generated += 1  # the beam's token is chosen below, with its whole search
            if row == rows[-1]:
                outcome = batch.beams[seq.request_id].step(*beam_candidates(step, rows))
                if outcome.done:
                    generations.append(beam_generation(seq, batch.beams[seq.request_id]))
                for parent, token in zip(outcome.parents, outcome.token_ids, strict=True):
                    beam_tokens[len(parents)] = token
                    parents.append(rows[parent])
        kept = self._regroup(batch, parents, beam_tokens)
        if kept is not None:
            self.batches[kept.id] = kept
        return generations, kept

    def _regroup(
        self, batch: ShardBatch, parents: list[int], beam_tokens: dict[int, int]
    ) -> ShardBatch | None:
        allocator = self._require_allocator()
        if not beam_tokens:
            return batch.keep(parents, allocator)
        index = torch.tensor(parents, dtype=torch.long, device=batch.last_tokens.device)
        last_tokens = batch.last_tokens.index_select(0, index)
        rows = torch.tensor(list(beam_tokens), dtype=torch.long, device=last_tokens.device)
        tokens = torch.tensor(list(beam_tokens.values()), dtype=last_tokens.dtype)
        last_tokens[rows] = tokens.to(last_tokens.device)
        return batch.regroup(parents, allocator, self.runner.kv_cache, last_tokens=last_tokens)

    def _admit(self, batch: pb.Batch) -> tuple[pb.Batch, list[pb.RefusedRequest]]:
        """The batch without the requests the shard refuses; nothing of those is kept (a prompt
        they had prefilled in part is dropped)."""
        check_batch(batch, cached_batch_ids=self.batches.keys())
        admitted, reasons = admit(
            batch,
            vocab_size=self.config.vocab_size,
            max_positions=self.max_positions,
            compile_grammar=self.grammars.compile,
        )
        self._partial.drop(list(reasons), self.allocator)
        return admitted, [pb.RefusedRequest(request_id=i, reason=r) for i, r in reasons.items()]

    def _new_sequence(self, request: pb.Request, blocks: list[int]) -> SequenceState:
        stopping = request.stopping_parameters
        eos_ids, stop_ids = self._stop_ids(request)
        return SequenceState(
            request_id=request.id,
            prompt_len=len(request.input_ids),
            max_new_tokens=stopping.max_new_tokens,
            min_new_tokens=stopping.min_new_tokens,
            eos_token_ids=eos_ids,
            stop_token_ids=stop_ids,
            seed=request.parameters.seed,
            top_n_tokens=request.top_n_tokens,
            blocks=blocks,
        )

    def _pop_batch(self, batch_id: int) -> ShardBatch:
        batch = self.batches.pop(batch_id, None)
        if batch is None:
            raise InvalidRequestError(f"no cached batch with id {batch_id}")
        return batch

    def _require_allocator(self) -> BlockAllocator:
        if self.allocator is None:
            raise RuntimeError("the KV cache is not allocated: call Warmup first")
        return self.allocator


@dataclass
class _PrefillResult:
    requests: list[pb.Request]  # those whose prompts the pass completed
    sampled_from: list[int]  # for each sampling row, the request (of `requests`) it samples after
    step: StepResult | None
    running_step: PendingStep | None  # the running batch's step, run in the same pass
    chunk_logprobs: dict[int, list[float]]  # by chunk row, the pass's own prompt logprobs
    forward_ns: int
    batch: ShardBatch | None = None  # the completed prompts' rows
    prompt_logprobs: dict[int, list[float]] = field(default_factory=dict)  # by request


def _samples(request: pb.Request) -> range:
    """The sampling rows of a request's prefill: one per sampled sequence, one for a beam
    search (its first step ranks the candidates of the prompt alone)."""
    if request.HasField("beam_search"):
        return range(1)
    return range(max(request.num_sequences, 1))


def _sample_indices(requests: list[pb.Request]) -> list[int]:
    return [index for request in requests for index in _samples(request)]


def _sample_seed(seed: int, index: int) -> int:
    return (seed + index) % (1 << 64)


def _sample_parameters(request: pb.Request, index: int) -> pb.NextTokenChooserParameters:
    params = pb.NextTokenChooserParameters()
    params.CopyFrom(request.parameters)
    params.seed = _sample_seed(params.seed, index)
    return params
