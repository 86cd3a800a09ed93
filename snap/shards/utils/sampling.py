"""Batched, seeded sampling on device tensors: the shard's next-token chooser.

`SamplingState` holds what the sampler needs for every sequence of a batch (its settings as
tensors, how many tokens it generated, its penalty statistics); `Sampler` turns a batch of
logits into next tokens, logprobs and top-n alternatives with one set of tensor ops per step.

Order of the processors: the grammar mask (a row with a grammar keeps only the tokens its
automaton allows; a batch without one skips it), repetition penalty (prompt + generated tokens,
transformers), frequency and presence penalties (generated tokens only, OpenAI/vLLM), the
min_tokens mask, then the warpers in transformers' order: temperature, top-k, top-p, min-p, typical-p. Greedy rows
(do_sample false or temperature < 1e-5) take the argmax of the penalized scores; their warpers
are neutral, so they share every op with the sampled rows and are left untouched by them.

Logprobs follow TGI: the log-softmax of the scores the token was chosen from, i.e. after the
penalties, the min_tokens mask and (for sampled rows) the warpers; a token filtered out by top-k,
top-p, min-p or typical-p has logprob -inf. top-n alternatives come from the same logprobs, and
like TGI leave out filtered tokens (`top_counts` says how many entries of a row are real); unlike
TGI, ties past the n-th token are not added, so the shape stays fixed.

Seeded randomness without a torch.Generator per row: the uniform noise of token t for a row at
generation step s is a counter-based hash of (seed, s, t) computed with integer tensor ops, then
turned into Gumbel noise (the exponential race: argmax(log p + Gumbel) is a draw from p). So a
request's tokens depend only on its seed and its own logits, never on its batch companions or
its row, and the whole step stays on the device (no host sync), as a CUDA graph needs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from shardline.proto import generate_pb2
from shardline.shards.utils import logits_process
from shardline.shards.utils.grammar import GrammarRows
from shardline.shards.utils.transfer import index_on, to_device

GREEDY_TEMPERATURE = 1e-5
_MASK_32 = 0xFFFFFFFF
_UNIFORM_BITS = 24


@dataclass(frozen=True)
class RowConfig:
    """One sequence's settings as the sampler applies them; a greedy row keeps neutral warpers.

    min_new_tokens is 0 when the row has no id to mask (ignore_eos and no stop_token_ids)."""

    sample: bool
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int = 0
    min_new_tokens: int = 0
    min_tokens_ids: tuple[int, ...] = ()
    top_n_tokens: int = 0

    @classmethod
    def from_proto(
        cls,
        params: generate_pb2.NextTokenChooserParameters,
        stopping: generate_pb2.StoppingCriteriaParameters,
        eos_token_ids: Sequence[int],
        top_n_tokens: int,
        vocab_size: int,
    ) -> RowConfig:
        sample = params.do_sample and params.temperature >= GREEDY_TEMPERATURE
        warpers = {}
        if sample:
            warpers = {
                "temperature": params.temperature,
                "top_k": min(params.top_k, vocab_size),
                "top_p": _unset_as(params.top_p, 1.0),
                "min_p": params.min_p,
                "typical_p": _unset_as(params.typical_p, 1.0),
            }
        masked = [*stopping.stop_token_ids, *([] if stopping.ignore_eos_token else eos_token_ids)]
        masked_ids = tuple(dict.fromkeys(t for t in masked if 0 <= t < vocab_size))
        return cls(
            sample=sample,
            **warpers,
            repetition_penalty=_unset_as(params.repetition_penalty, 1.0),
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
            seed=params.seed,
            min_new_tokens=stopping.min_new_tokens if masked_ids else 0,
            min_tokens_ids=masked_ids,
            top_n_tokens=min(top_n_tokens, vocab_size),
        )

    @property
    def repetition(self) -> bool:
        return self.repetition_penalty != 1.0

    @property
    def frequency_presence(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def _unset_as(value: float, neutral: float) -> float:
    """proto3 sends an unset float as 0, never a valid top_p, typical_p or repetition penalty."""
    return value if value != 0.0 else neutral


@dataclass(frozen=True)
class RowTensors:
    """The per-row settings of a batch on the device, one contiguous [B] tensor each."""

    sample: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor  # in [1, V]; V when off
    top_p_tail: torch.Tensor  # 1 - top_p, computed in double precision as transformers does
    min_p: torch.Tensor
    typical_p: torch.Tensor
    repetition_penalty: torch.Tensor
    frequency_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    seed_low: torch.Tensor  # the seed's two 32-bit halves, so the hash never overflows int64
    seed_high: torch.Tensor
    min_new_tokens: torch.Tensor
    top_n_tokens: torch.Tensor
    min_tokens_ids: torch.Tensor  # [B, S], padded by repeating the row's own ids

    @classmethod
    def build(cls, rows: Sequence[RowConfig], vocab_size: int, device: torch.device) -> RowTensors:
        floats = torch.tensor(
            [
                [
                    r.temperature,
                    1.0 - r.top_p,
                    r.min_p,
                    r.typical_p,
                    r.repetition_penalty,
                    r.frequency_penalty,
                    r.presence_penalty,
                ]
                for r in rows
            ],
            dtype=torch.float32,
        ).reshape(len(rows), 7)
        ints = torch.tensor(
            [
                [
                    r.sample,
                    r.top_k or vocab_size,
                    r.seed & _MASK_32,
                    r.seed >> 32,
                    r.min_new_tokens,
                    r.top_n_tokens,
                ]
                for r in rows
            ],
            dtype=torch.int64,
        ).reshape(len(rows), 6)
        # one copy each, transposed first so that every [B] setting is contiguous (Triton reads it)
        floats, ints = (
            to_device(floats.T.contiguous(), device),
            to_device(ints.T.contiguous(), device),
        )
        temperature, top_p_tail, min_p, typical_p, repetition, frequency, presence = floats
        sample, top_k, seed_low, seed_high, min_new_tokens, top_n = ints
        return cls(
            sample=sample.bool(),
            temperature=temperature,
            top_k=top_k,
            top_p_tail=top_p_tail,
            min_p=min_p,
            typical_p=typical_p,
            repetition_penalty=repetition,
            frequency_penalty=frequency,
            presence_penalty=presence,
            seed_low=seed_low,
            seed_high=seed_high,
            min_new_tokens=min_new_tokens,
            top_n_tokens=top_n,
            min_tokens_ids=to_device(_padded_ids([r.min_tokens_ids for r in rows]), device),
        )


def _padded_ids(ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """[B, S] int64; a short row repeats its first id (0 for an empty row)."""
    width = max((len(row) for row in ids), default=0) or 1
    padded = [list(row) + [row[0] if row else 0] * (width - len(row)) for row in ids]
    return torch.tensor(padded, dtype=torch.int64).reshape(len(ids), width)


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
    tensors: RowTensors = field(init=False)

    def __post_init__(self) -> None:
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
        rows = [
            RowConfig.from_proto(p, s, eos_token_ids, n, vocab_size)
            for p, s, n in zip(params, stopping, top_n_tokens, strict=True)
        ]
        size = (len(rows), vocab_size)
        seen = _prompt_tokens(prompt_ids, size, device) if any(r.repetition for r in rows) else None
        counts = None
        if any(r.frequency_presence for r in rows):
            counts = torch.zeros(size, dtype=torch.int32, device=device)
        generated = torch.zeros(len(rows), dtype=torch.int64, device=device)
        return cls(rows, vocab_size, torch.device(device), generated, seen, counts, grammar)

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
        return SamplingState(rows, self.vocab_size, self.device, generated, seen, counts, grammar)

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
        return cls(rows, first.vocab_size, first.device, generated, seen, counts, grammar)

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
        )


@dataclass
class SamplerOutput:
    next_token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] float32, of the chosen tokens (see the module docstring)
    top_ids: torch.Tensor | None = None  # [B, max_top_n] int64, most likely first
    top_logprobs: torch.Tensor | None = None  # [B, max_top_n] float32
    top_counts: torch.Tensor | None = None  # [B] int64: leading entries of row i to report


class Sampler:
    """Chooses the next token of every row of a batch from its logits [B, V]."""

    def __init__(self) -> None:
        self._token_keys: dict[tuple[int, torch.device], torch.Tensor] = {}

    def __call__(self, logits: torch.Tensor, state: SamplingState) -> SamplerOutput:
        if logits.is_cuda and not _processed(state):
            return _fused_choice(logits, state)  # upcasts in registers: no float32 copy
        scores = process_logits(logits.float(), state)
        if scores.is_cuda:
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
        row_keys = _pcg_hash(_pcg_hash(tensors.seed_low) ^ tensors.seed_high)
        row_keys = _pcg_hash(row_keys ^ (state.generated & _MASK_32))
        bits = _pcg_hash(self._keys(vocab_size, device)[None, :] ^ row_keys[:, None])
        uniform = ((bits >> (32 - _UNIFORM_BITS)).float() + 0.5) * 2.0**-_UNIFORM_BITS
        return -torch.log(-torch.log(uniform))

    def _keys(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """Hashed token ids [V], built once per vocabulary and device."""
        key = (vocab_size, device)
        if key not in self._token_keys:
            ids = torch.arange(vocab_size, dtype=torch.int64, device=device)
            self._token_keys[key] = _pcg_hash(ids)
        return self._token_keys[key]


def _fused_choice(scores: torch.Tensor, state: SamplingState) -> SamplerOutput:
    """The CUDA choice: one Triton pass over the scores (see triton_sampling), the noise made in
    registers; logprobs are the scores minus the row's logsumexp, no [B, V] log-softmax."""
    from shardline.shards.utils import triton_sampling

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
    real = output.top_logprobs.isfinite().sum(dim=-1)
    output.top_counts = torch.minimum(state.tensors.top_n_tokens, real)


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
        )
    )


def process_logits(scores: torch.Tensor, state: SamplingState) -> torch.Tensor:
    """Applies the processors some row of the batch needs, in the module docstring's order."""
    flags, rows = state.flags, state.tensors
    if state.grammar is not None:
        allowed = state.grammar.allowed_mask(scores.shape[-1], scores.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
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


def _pcg_hash(values: torch.Tensor) -> torch.Tensor:
    """The PCG RXS-M-XS 32-bit hash (Jarzynski and Olano, "Hash Functions for GPU Rendering") of
    int64 tensors holding values in [0, 2^32). Both multipliers are below 2^31, so no product
    reaches 2^63: int64 arithmetic is exact, on every device."""
    state = (values * 747796405).add_(2891336453).bitwise_and_(_MASK_32)
    word = (state >> (state >> 28).add_(4)).bitwise_xor_(state)
    word.mul_(277803737).bitwise_and_(_MASK_32)
    return (word >> 22).bitwise_xor_(word)
