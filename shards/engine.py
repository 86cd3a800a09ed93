"""The shard's engine: the RPCs of generate.proto over the model runner, the KV blocks and batches.

The gRPC server (server.py) and the in-process offline API both drive this class with the same
protobuf messages; every method runs on one thread, in the order the router sends the calls.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from shardline.proto import generate_pb2 as pb
from shardline.shards.batch import SequenceState, ShardBatch, build_block_table
from shardline.shards.kv_cache import BlockAllocator, KVCacheExhaustedError, bytes_per_block
from shardline.shards.model_runner import ModelRunner, StepResult, grow_blocks
from shardline.shards.models.config import ModelConfig
from shardline.shards.utils.dist import TPGroup
from shardline.shards.utils.sampling import SamplingState

logger = logging.getLogger(__name__)


class InvalidRequestError(ValueError):
    """A request the shard cannot run; nothing was changed."""


@dataclass
class EngineSettings:
    block_size: int = 16
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.90
    attention_impl: str = "torch"
    cuda_graph_buckets: tuple[int, ...] = ()


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

    # ---- facts -------------------------------------------------------------------------------

    def info(self) -> pb.InfoResponse:
        return pb.InfoResponse(
            requires_padding=False,
            dtype=str(self.model.dtype).removeprefix("torch."),
            device_type=self.device.type,
            window_size=self.config.sliding_window,
            speculate=0,
            support_chunking=False,
            use_prefix_caching=False,
            attention_impl=self.settings.attention_impl,
            block_size=self.settings.block_size,
            model_type=self.config.model_type,
            world_size=self.tp.world_size,
            vocab_size=self.config.vocab_size,
            max_position_embeddings=self.config.max_position_embeddings,
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
        self.clear_cache(pb.ClearCacheRequest())
        peak_bytes = self._run_warmup_prefill(max_prefill, max_input or max_prefill)
        num_blocks = self._agree_on_min(self._blocks_that_fit(peak_bytes))
        block_size = self.settings.block_size
        self.runner.allocate_cache(num_blocks, block_size)
        self.allocator = BlockAllocator(num_blocks, block_size)
        supported = num_blocks * block_size
        max_total = request.max_total_tokens if request.HasField("max_total_tokens") else None
        max_total = max_total or min(supported, self.config.max_position_embeddings)
        if self._graphs_wanted():
            self.runner.capture_graphs(
                self.settings.cuda_graph_buckets, -(-max_total // block_size)
            )
        logger.info(
            "kv cache ready: %d blocks of %d tokens (%d tokens)", num_blocks, block_size, supported
        )
        return pb.WarmupResponse(
            max_supported_total_tokens=supported,
            max_input_tokens=max_input or max(max_total - 1, 1),
            max_total_tokens=max_total,
        )

    def _run_warmup_prefill(self, max_prefill_tokens: int, max_input_tokens: int) -> int:
        """Runs the largest prefill the router may send; returns the peak device bytes it used."""
        lengths = _split_tokens(
            max_prefill_tokens, max(1, min(max_input_tokens, max_prefill_tokens))
        )
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
            requests=[_warmup_request(i, n, self.config.vocab_size) for i, n in enumerate(lengths)],
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

    def _graphs_wanted(self) -> bool:
        return (
            self.device.type == "cuda"
            and bool(self.settings.cuda_graph_buckets)
            and self.settings.attention_impl == "triton"
        )

    def _blocks_that_fit(self, peak_bytes: int) -> int:
        per_block = bytes_per_block(
            num_layers=self.model.num_layers,
            block_size=self.settings.block_size,
            num_kv_heads=self.model.num_kv_heads_per_rank,
            head_dim=self.model.head_dim,
            dtype=self.model.dtype,
        )
        if self.device.type == "cuda":
            _, total = torch.cuda.mem_get_info(self.device)
            budget = int(total * self.settings.gpu_memory_utilization) - peak_bytes
        else:
            budget = self.settings.kv_cache_bytes or 1 << 30
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise KVCacheExhaustedError(
                f"no memory left for the KV cache ({budget} bytes for blocks of {per_block} bytes); "
                "lower --max-batch-prefill-tokens or raise the memory fraction"
            )
        return int(num_blocks)

    def _agree_on_min(self, value: int) -> int:
        if self.tp.world_size == 1:
            return value
        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        tensor = torch.tensor([value], dtype=torch.long, device=device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN, group=self.tp.group)
        return int(tensor.item())

    # ---- generation --------------------------------------------------------------------------

    def prefill(self, request: pb.PrefillRequest) -> pb.PrefillResponse:
        started = time.perf_counter_ns()
        batch_pb = request.batch
        self._validate(batch_pb)
        allocator = self._require_allocator()
        prompts = [list(r.input_ids) for r in batch_pb.requests]
        needed = [allocator.blocks_for(len(prompt)) for prompt in prompts]
        if sum(needed) > allocator.num_free:
            raise KVCacheExhaustedError(
                f"the prompts of batch {batch_pb.id} need {sum(needed)} KV blocks, "
                f"{allocator.num_free} are free"
            )
        sequences = [
            self._new_sequence(r, allocator.allocate(n))
            for r, n in zip(batch_pb.requests, needed, strict=True)
        ]
        try:
            result = self._prefill_forward(batch_pb, sequences, prompts)
        except BaseException:
            for seq in sequences:
                allocator.free(seq.blocks)
            raise
        generations, batch = self._advance(
            result.batch, result.step, prefill_requests=batch_pb.requests
        )
        return pb.PrefillResponse(
            generations=generations,
            batch=batch.to_proto() if batch else None,
            forward_ns=result.step.forward_ns,
            decode_ns=result.step.sample_ns,
            total_ns=time.perf_counter_ns() - started,
        )

    def _prefill_forward(
        self, batch_pb: pb.Batch, sequences: list[SequenceState], prompts: list[list[int]]
    ) -> _PrefillResult:
        requests = list(batch_pb.requests)
        sampling = SamplingState.from_requests(
            params=[r.parameters for r in requests],
            stopping=[r.stopping_parameters for r in requests],
            prompt_ids=prompts,
            eos_token_ids=sorted(self.config.eos_token_ids),
            top_n_tokens=[r.top_n_tokens for r in requests],
            vocab_size=self.config.vocab_size,
            device=self.device,
        )
        table = build_block_table(sequences, self.settings.block_size)
        prompt_rows = [row for row, r in enumerate(requests) if r.decoder_input_details]
        step = self.runner.prefill(prompts, sampling, table, prompt_rows)
        batch = ShardBatch(
            id=batch_pb.id,
            sequences=sequences,
            sampling=sampling,
            block_table=table,
            last_tokens=step.next_tokens,
        )
        return _PrefillResult(batch=batch, step=step)

    def decode(self, request: pb.DecodeRequest) -> pb.DecodeResponse:
        started = time.perf_counter_ns()
        if not request.batches:
            raise InvalidRequestError("Decode needs at least one cached batch")
        batches = [self._pop_batch(cached.id) for cached in request.batches]
        batch = ShardBatch.concatenate(batches)
        concat_done = time.perf_counter_ns()
        try:
            grow_blocks(batch, self._require_allocator(), self.settings.block_size)
            step = self.runner.decode(batch)
        except BaseException:
            self.batches[batch.id] = batch
            raise
        batch.last_tokens = step.next_tokens
        generations, kept = self._advance(batch, step)
        return pb.DecodeResponse(
            generations=generations,
            batch=kept.to_proto() if kept else None,
            concat_ns=concat_done - started,
            forward_ns=step.forward_ns,
            decode_ns=step.sample_ns,
            total_ns=time.perf_counter_ns() - started,
        )

    def filter_batch(self, request: pb.FilterBatchRequest) -> pb.FilterBatchResponse:
        batch = self._pop_batch(request.batch_id)
        wanted = set(request.request_ids)
        rows = [row for row, seq in enumerate(batch.sequences) if seq.request_id in wanted]
        kept = batch.keep(rows, self._require_allocator())
        if kept is None:
            return pb.FilterBatchResponse(batch=pb.CachedBatch(id=request.batch_id))
        self.batches[kept.id] = kept
        return pb.FilterBatchResponse(batch=kept.to_proto())

    def clear_cache(self, request: pb.ClearCacheRequest) -> pb.ClearCacheResponse:
        ids = [request.id] if request.HasField("id") else list(self.batches)
        for batch_id in ids:
            batch = self.batches.pop(batch_id, None)
            if batch is not None and self.allocator is not None:
                batch.free_all(self.allocator)
        return pb.ClearCacheResponse()

    # ---- helpers -----------------------------------------------------------------------------

    def _advance(
        self, batch: ShardBatch, step: StepResult, prefill_requests: list[pb.Request] | None = None
    ) -> tuple[list[pb.Generation], ShardBatch | None]:
        """Records each row's new token, answers one Generation per row, drops finished rows."""
        generations = []
        keep_rows = []
        for row, seq in enumerate(batch.sequences):
            token = step.next_token_ids[row]
            reason = seq.record(token)
            generation = pb.Generation(
                request_id=seq.request_id,
                tokens=pb.Tokens(ids=[token], logprobs=[step.logprobs[row]]),
                finish_reason=reason,
                generated_tokens=seq.generated,
                seed=seq.seed,
            )
            if seq.top_n_tokens and step.top_ids is not None:
                n = seq.top_n_tokens
                generation.top_tokens.append(
                    pb.Tokens(ids=step.top_ids[row][:n], logprobs=step.top_logprobs[row][:n])
                )
            if row in step.prompt_logprobs:
                prompt = prefill_requests[row].input_ids
                generation.prefill_tokens.CopyFrom(
                    pb.Tokens(ids=prompt, logprobs=step.prompt_logprobs[row])
                )
            generations.append(generation)
            if reason == pb.FINISH_REASON_NONE:
                keep_rows.append(row)
        kept = batch.keep(keep_rows, self._require_allocator())
        if kept is not None:
            self.batches[kept.id] = kept
        return generations, kept

    def _validate(self, batch: pb.Batch) -> None:
        if not batch.requests:
            raise InvalidRequestError(f"batch {batch.id} has no requests")
        if batch.id in self.batches:
            raise InvalidRequestError(f"batch {batch.id} is already cached")
        ids = [r.id for r in batch.requests]
        if len(set(ids)) != len(ids):
            raise InvalidRequestError(f"batch {batch.id} repeats a request id")
        for r in batch.requests:
            if not r.input_ids:
                raise InvalidRequestError(f"request {r.id} has an empty prompt")
            if max(r.input_ids) >= self.config.vocab_size:
                raise InvalidRequestError(
                    f"request {r.id} has a token id >= the vocabulary size {self.config.vocab_size}"
                )
            if r.stopping_parameters.max_new_tokens < 1:
                raise InvalidRequestError(f"request {r.id} asks for max_new_tokens < 1")

    def _new_sequence(self, request: pb.Request, blocks: list[int]) -> SequenceState:
        stopping = request.stopping_parameters
        eos = frozenset() if stopping.ignore_eos_token else frozenset(self.config.eos_token_ids)
        return SequenceState(
            request_id=request.id,
            prompt_len=len(request.input_ids),
            max_new_tokens=stopping.max_new_tokens,
            min_new_tokens=stopping.min_new_tokens,
            eos_token_ids=eos,
            stop_token_ids=frozenset(stopping.stop_token_ids),
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
    batch: ShardBatch
    step: StepResult


def _split_tokens(total: int, per_sequence: int) -> list[int]:
    full, rest = divmod(total, per_sequence)
    return [per_sequence] * full + ([rest] if rest else [])


def _warmup_request(request_id: int, length: int, vocab_size: int) -> pb.Request:
    return pb.Request(
        id=request_id,
        input_ids=[(7 * i + 3) % vocab_size for i in range(length)],
        parameters=pb.NextTokenChooserParameters(
            temperature=0.9,
            top_k=20,
            top_p=0.9,
            typical_p=1.0,
            do_sample=True,
            seed=request_id,
            repetition_penalty=1.1,
            frequency_penalty=0.1,
            presence_penalty=0.1,
            min_p=0.0,
        ),
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=1),
    )
