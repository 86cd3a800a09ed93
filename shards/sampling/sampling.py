"""Batched, seeded sampling on device tensors: the shard's next-token chooser.

`SamplingState` holds what the sampler needs for every sequence of a batch (its settings as
tensors, how many tokens it generated, its penalty statistics); `Sampler` turns a batch of
logits into next tokens, logprobs and top-n alternatives with one set of tensor ops per step.

Order of the processors: the grammar mask (a row with a grammar keeps only the tokens its
automaton allows; a batch without one skips it), the watermark (watermark.py), the logit bias
(OpenAI/vLLM), repetition penalty (prompt + generated tokens, transformers), frequency and
presence penalties (generated tokens only, OpenAI/vLLM), the min_tokens mask, then the warpers
in transformers' order: temperature, top-k, top-p, min-p, typical-p. Greedy rows
(do_sample false or temperature < 1e-5) take the argmax of the penalized scores; their warpers
are neutral, so they share every op with the sampled rows and are left untouched by them.

Logprobs follow TGI: the log-softmax of the scores the token was chosen from, i.e. after the
penalties, the min_tokens mask and (for sampled rows) the warpers; a token filtered out by top-k,
top-p, min-p or typical-p has logprob -inf. top-n alternatives come from the same logprobs, and
like TGI leave out filtered tokens (`reported_top_count`: the sampler's tensors keep a fixed shape,
the -inf entries are cut on the host); unlike TGI, ties past the n-th token are not added.

Seeded randomness without a torch.Generator per row: the uniform noise of token t for a row at
generation step s is a counter-based hash of (seed, s, t) computed with integer tensor ops, then
turned into Gumbel noise (the exponential race: argmax(log p + Gumbel) is a draw from p). So a
request's tokens depend only on its seed and its own logits, never on its batch companions or
its row, and the whole step stays on the device (no host sync), as a CUDA graph needs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shardline.proto import generate_pb2
from shardline.shards.layers import custom_kernels
from shardline.shards.sampling import logits_process
from shardline.shards.sampling.counter_hash import MASK_32, pcg_hash
from shardline.shards.sampling.grammar import GrammarRows
from shardline.shards.sampling.sampling_rows import RowConfig, RowTensors
from shardline.shards.sampling.watermark import WatermarkSettings, apply_watermark
from shardline.shards.utils.transfer import index_on, to_device

_UNIFORM_BITS = 24


@dataclass
class SamplingState:
    """What the sampler keeps for a batch, row i being sequence i.

    Penalty statistics are dense [B, V] tensors, allocated only while some row of the batch uses
    a penalty: `seen` (bool, prompt + generated tokens) for the repetition penalty and `counts`
    (int32, generated tokens) for frequency/presence. At batch 256 and a 128k vocabulary that is
    32 MiB and 128 MiB; in exchange, appending a step is one scatter per tensor, applying a
    penalty is a fixed-shape elementwise pass (no ragged lists of ids, no sort, no unique, no host
    sync), and filter/concatenate are row gathers. Rows without that penalty hold zeros.
    """

    rows: list[RowConfig]
    vocab_size: int
    device: torch.device
    generated: torch.Tensor  # [B] int64: tokens generated so far (seeded step, min_tokens)
    seen: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    grammar: GrammarRows | None = None  # the DFA states of constrained rows (see grammar.py)
    # [B] int64, each row's last token (the prompt's, then its own): a watermark row's seed
    previous_tokens: torch.Tensor | None = None
    # built from `rows` when not given (filter and concatenate gather and join their parts')
    tensors: RowTensors | None = None

    def __post_init__(self) -> None:
        if self.tensors is None:
            self.tensors = RowTensors.build(self.rows, self.vocab_size, self.device)

    @classmethod
    def from_requests(
        cls,
        params: Sequence[generate_pb2.NextTokenChooserParameters],
        stopping: Sequence[generate_pb2.StoppingCriteriaParameters],
        prompt_ids: Sequence[Sequence[int]],
        eos_token_ids: Sequence[int],
        top_n_tokens: Sequence[int],
        vocab_size: int,
        device: torch.device,
        grammar: GrammarRows | None = None,
    ) -> SamplingState:
        _check_lengths(params, stopping, prompt_ids, top_n_tokens)
        watermark = WatermarkSettings.from_env() if any(p.watermark for p in params) else None
        rows = [
            RowConfig.from_proto(p, s, eos_token_ids, n, vocab_size, watermark)
            for p, s, n in zip(params, stopping, top_n_tokens, strict=True)
        ]
        size = (len(rows), vocab_size)
        seen = _prompt_tokens(prompt_ids, size, device) if any(r.repetition for r in rows) else None
        counts = None
        if any(r.frequency_presence for r in rows):
            counts = torch.zeros(size, dtype=torch.int32, device=device)
        generated = torch.zeros(len(rows), dtype=torch.int64, device=device)
        previous = None
        if watermark is not None:
            previous = to_device(torch.tensor([ids[-1] for ids in prompt_ids]), device)
        return cls(
            rows, vocab_size, torch.device(device), generated, seen, counts, grammar, previous
        )

    def __len__(self) -> int:
        return len(self.rows)

    def append(self, next_token_ids: torch.Tensor) -> None:
        """Records one generated token per row (in place, on the device)."""
        self.generated += 1
        column = next_token_ids.view(-1, 1)
        if self.seen is not None:
            self.seen.scatter_(1, column, True)
        if self.counts is not None:
            self.counts.scatter_add_(1, column, torch.ones_like(column, dtype=torch.int32))
        if self.previous_tokens is not None:
            self.previous_tokens.copy_(next_token_ids.view(-1))
        if self.grammar is not None:
            self.grammar.advance(next_token_ids.tolist())

    def filter(self, keep: Sequence[int]) -> SamplingState:
        """A new state with rows `keep`, in that order."""
        rows = [self.rows[i] for i in keep]
        index = index_on(keep, self.device)
        seen = _select(self.seen, index, any(r.repetition for r in rows))
        counts = _select(self.counts, index, any(r.frequency_presence for r in rows))
        generated = self.generated.index_select(0, index)
        grammar = self.grammar.filter(keep) if self.grammar is not None else None
        previous = _select(self.previous_tokens, index, any(r.watermark for r in rows))
        tensors = self.tensors.select(index)
        return SamplingState(
            rows, self.vocab_size, self.device, generated, seen, counts, grammar, previous, tensors
        )

    @classmethod
    def concatenate(cls, states: Sequence[SamplingState]) -> SamplingState:
        first = states[0]
        if any((s.vocab_size, s.device) != (first.vocab_size, first.device) for s in states):
            raise ValueError("cannot concatenate sampling states of different vocab or device")
        rows = [r for s in states for r in s.rows]
        seen = _concat(states, "seen", torch.bool) if any(r.repetition for r in rows) else None
        counts = None
        if any(r.frequency_presence for r in rows):
            counts = _concat(states, "counts", torch.int32)
        generated = torch.cat([s.generated for s in states])
        grammar = GrammarRows.concatenate([(s.grammar, len(s)) for s in states])
        previous = None
        if any(r.watermark for r in rows):
            previous = torch.cat([_previous_tokens(s) for s in states])
        tensors = RowTensors.concatenate([s.tensors for s in states])
        return cls(
            rows,
            first.vocab_size,
            first.device,
            generated,
            seen,
            counts,
            grammar,
            previous,
            tensors,
        )

    @functools.cached_property
    def flags(self) -> BatchFlags:
        return BatchFlags.of(self.rows, self.vocab_size)


def _prompt_tokens(
    prompt_ids: Sequence[Sequence[int]], size: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """[B, V] bool: True where the token occurs in the row's prompt."""
    lengths = torch.tensor([len(ids) for ids in prompt_ids], dtype=torch.int64)
    rows = torch.arange(len(prompt_ids)).repeat_interleave(lengths)
    columns = torch.tensor([t for ids in prompt_ids for t in ids], dtype=torch.int64)
    seen = torch.zeros(size, dtype=torch.bool, device=device)
    seen[rows.to(device), columns.to(device)] = True
    return seen


def _check_lengths(*per_row: Sequence[object]) -> None:
    if len({len(values) for values in per_row}) > 1:
        raise ValueError(f"per-request lists differ in length: {[len(v) for v in per_row]}")


def _select(stats: torch.Tensor | None, index: torch.Tensor, needed: bool) -> torch.Tensor | None:
    return stats.index_select(0, index) if stats is not None and needed else None


def _previous_tokens(state: SamplingState) -> torch.Tensor:
    """The state's previous tokens; zeros for a state without a watermark row (never read)."""
    if state.previous_tokens is not None:
        return state.previous_tokens
    return torch.zeros(len(state), dtype=torch.int64, device=state.device)


def _concat(states: Sequence[SamplingState], name: str, dtype: torch.dtype) -> torch.Tensor:
    """Concatenates one penalty statistic; states without it (no row using it) give zeros."""
    parts = []
    for state in states:
        stats = getattr(state, name)
        if stats is None:
            stats = torch.zeros((len(state), state.vocab_size), dtype=dtype, device=state.device)
        parts.append(stats)
    return torch.cat(parts)


@dataclass(frozen=True)
class BatchFlags:
    """Which processors some row of the batch needs: the others are skipped for everyone."""

    repetition: bool
    frequency_presence: bool
    min_tokens: bool
    sample: bool
    temperature: bool
    max_top_k: int  # the largest top-k below the vocabulary size; 0: no row filters by top-k
    top_p: bool
    top_p_without_top_k: bool  # some row's nucleus needs a sort of the whole vocabulary
    min_p: bool
    typical_p: bool
    max_top_n: int
    logit_bias: bool
    watermark: bool

    @classmethod
    def of(cls, rows: Sequence[RowConfig], vocab_size: int) -> BatchFlags:
        top_ks = [r.top_k if 0 < r.top_k < vocab_size else 0 for r in rows]
        return cls(
            repetition=any(r.repetition for r in rows),
            frequency_presence=any(r.frequency_presence for r in rows),
            min_tokens=any(r.min_new_tokens > 0 for r in rows),
            sample=any(r.sample for r in rows),
            temperature=any(r.temperature != 1.0 for r in rows),
            max_top_k=max(top_ks, default=0),
            top_p=any(r.top_p < 1.0 for r in rows),
            top_p_without_top_k=any(r.top_p < 1.0 and not k for r, k in zip(rows, top_ks)),
            min_p=any(r.min_p > 0.0 for r in rows),
            typical_p=any(r.typical_p < 1.0 for r in rows),
            max_top_n=max((r.top_n_tokens for r in rows), default=0),
            logit_bias=any(r.logit_bias for r in rows),
            watermark=any(r.watermark for r in rows),
        )


@dataclass
class SamplerOutput:
    next_token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] float32, of the chosen tokens (see the module docstring)
    top_ids: torch.Tensor | None = None  # [B, max_top_n] int64, most likely first
    top_logprobs: torch.Tensor | None = None  # [B, max_top_n] float32


class Sampler:
    """Chooses the next token of every row of a batch from its logits [B, V]."""

    def __init__(self) -> None:
        self._token_keys: dict[tuple[int, torch.device], torch.Tensor] = {}

    def __call__(self, logits: torch.Tensor, state: SamplingState) -> SamplerOutput:
        if custom_kernels.applies(logits) and not _processed(state):
            return _fused_choice(logits, state)  # upcasts in registers: no float32 copy
        scores = process_logits(logits.float(), state)
        if custom_kernels.applies(scores):
            return _fused_choice(scores, state)
        next_ids = self._choose(scores, state)
        logprobs = scores.log_softmax(dim=-1)
        output = SamplerOutput(next_ids, logprobs.gather(1, next_ids[:, None]).squeeze(1))
        _add_top_tokens(output, logprobs, state)
        return output

    def _choose(self, scores: torch.Tensor, state: SamplingState) -> torch.Tensor:
        """The reference choice (CPU): argmax, plus Gumbel noise on the sampled rows."""
        if not state.flags.sample:
            return scores.argmax(dim=-1)
        noise = self._gumbel_noise(state, scores.shape[-1], scores.device)
        return torch.where(state.tensors.sample[:, None], scores + noise, scores).argmax(dim=-1)

    def _gumbel_noise(
        self, state: SamplingState, vocab_size: int, device: torch.device
    ) -> torch.Tensor:
        """Gumbel(0, 1) noise [B, V], a pure function of (seed, generated tokens, token id)."""
        tensors = state.tensors
        row_keys = pcg_hash(pcg_hash(tensors.seed_low) ^ tensors.seed_high)
        row_keys = pcg_hash(row_keys ^ (state.generated & MASK_32))
        bits = pcg_hash(self._keys(vocab_size, device)[None, :] ^ row_keys[:, None])
        uniform = ((bits >> (32 - _UNIFORM_BITS)).float() + 0.5) * 2.0**-_UNIFORM_BITS
        return -torch.log(-torch.log(uniform))

    def _keys(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """Hashed token ids [V], built once per vocabulary and device."""
        key = (vocab_size, device)
        if key not in self._token_keys:
            ids = torch.arange(vocab_size, dtype=torch.int64, device=device)
            self._token_keys[key] = pcg_hash(ids)
        return self._token_keys[key]


def _fused_choice(scores: torch.Tensor, state: SamplingState) -> SamplerOutput:
    """The CUDA choice: one Triton pass over the scores (see triton_sampling), the noise made in
    registers; logprobs are the scores minus the row's logsumexp, no [B, V] log-softmax."""
    from shardline.shards.sampling import triton_sampling

    tensors = state.tensors
    next_ids, logprobs, log_norm = triton_sampling.choose_tokens(
        scores,
        tensors.sample,
        tensors.seed_low,
        tensors.seed_high,
        state.generated,
        state.flags.sample,
    )
    output = SamplerOutput(next_ids, logprobs)
    _add_top_tokens(output, scores, state, log_norm)
    return output


def _add_top_tokens(
    output: SamplerOutput,
    scores: torch.Tensor,
    state: SamplingState,
    log_norm: torch.Tensor | None = None,
) -> None:
    """The top-n alternatives of each row from its logprobs, or from its scores and their
    logsumexp `log_norm` (the same order: a row's logprobs are its scores shifted)."""
    if state.flags.max_top_n == 0:
        return
    top_values, output.top_ids = scores.topk(state.flags.max_top_n, dim=-1)
    output.top_logprobs = top_values if log_norm is None else top_values - log_norm[:, None]


def reported_top_count(top_logprobs: Sequence[float], top_n: int) -> int:
    """How many of a row's top tokens (most likely first) its answer lists: at most `top_n`, and
    none that a warper filtered out (logprob -inf), so each could have been picked."""
    return sum(1 for logprob in top_logprobs[:top_n] if logprob != -math.inf)


def _processed(state: SamplingState) -> bool:
    """Whether some processor changes some row's scores."""
    flags = state.flags
    return state.grammar is not None or any(
        (
            flags.repetition,
            flags.frequency_presence,
            flags.min_tokens,
            flags.temperature,
            flags.max_top_k,
            flags.top_p,
            flags.min_p,
            flags.typical_p,
            flags.logit_bias,
            flags.watermark,
        )
    )


def process_logits(scores: torch.Tensor, state: SamplingState) -> torch.Tensor:
    """Applies the processors some row of the batch needs, in the module docstring's order."""
    flags, rows = state.flags, state.tensors
    if state.grammar is not None:
        allowed = state.grammar.allowed_mask(scores.shape[-1], scores.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
    if flags.watermark:
        scores = apply_watermark(
            scores, state.previous_tokens, rows.watermark_gamma, rows.watermark_delta
        )
    if flags.logit_bias:
        scores = logits_process.apply_logit_bias(
            scores, rows.logit_bias_ids, rows.logit_bias_values
        )
    if flags.repetition:
        scores = logits_process.apply_repetition_penalty(
            scores, state.seen, rows.repetition_penalty
        )
    if flags.frequency_presence:
        scores = logits_process.apply_frequency_presence_penalties(
            scores, state.counts, rows.frequency_penalty, rows.presence_penalty
        )
    if flags.min_tokens:
        active = state.generated < rows.min_new_tokens
        masked = logits_process.mask_token_ids(scores, rows.min_tokens_ids, active)
        # A row left with no token at all (its grammar is complete: only EOS remains) ends.
        emptied = torch.isinf(masked).all(dim=-1, keepdim=True)
        scores = torch.where(emptied, scores, masked)
    if flags.temperature:
        scores = logits_process.apply_temperature(scores, rows.temperature)
    scores = _apply_top_k_top_p(scores, rows, flags)
    if flags.min_p:
        scores = logits_process.apply_min_p(scores, rows.min_p)
    if flags.typical_p:
        scores = logits_process.apply_typical_p(scores, rows.typical_p)
    return scores


def _apply_top_k_top_p(scores: torch.Tensor, rows: RowTensors, flags: BatchFlags) -> torch.Tensor:
    """A sort of the vocabulary only where some row's top-p has no top-k to cut it from."""
    if flags.top_p_without_top_k:
        return logits_process.apply_top_k_top_p(scores, rows.top_k, rows.top_p_tail)
    if flags.top_p:
        return logits_process.apply_top_k_top_p_candidates(
            scores, rows.top_k, rows.top_p_tail, flags.max_top_k
        )
    if flags.max_top_k:
        return logits_process.apply_top_k(scores, rows.top_k, flags.max_top_k)
    return scores
