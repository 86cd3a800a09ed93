"""Batched logit processors: one set of tensor ops for the whole batch, one value per row.

Every function takes scores [B, V] (float32) and per-row parameters [B] on the same device and
returns new scores (inputs are never modified). A row whose parameter is neutral comes back
bit-for-bit unchanged, so rows with different settings share one launch and no row is sliced out.
Filtered tokens get -inf, as transformers' warpers do. Nothing here reads a tensor back to the host,
so these ops can run inside a CUDA graph.
"""

from __future__ import annotations

import torch

_NEG_INF = float("-inf")


def apply_repetition_penalty(
    scores: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """transformers' repetition penalty: a seen token's score is divided by the penalty when
    positive and multiplied by it when negative. `seen` [B, V] bool marks prompt and generated
    tokens; penalty 1 is neutral."""
    row_penalty = penalty[:, None]
    penalized = torch.where(scores < 0, scores * row_penalty, scores / row_penalty)
    return torch.where(seen, penalized, scores)


def apply_frequency_presence_penalties(
    scores: torch.Tensor, counts: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor
) -> torch.Tensor:
    """OpenAI's formula: score -= count * frequency + (count > 0) * presence, where `counts`
    [B, V] counts the generated tokens only; 0 and 0 are neutral."""
    occurrences = counts.to(scores.dtype)
    present = (counts > 0).to(scores.dtype)
    return scores - occurrences * frequency[:, None] - present * presence[:, None]


def mask_token_ids(
    scores: torch.Tensor, token_ids: torch.Tensor, row_active: torch.Tensor
) -> torch.Tensor:
    """Sets scores[i, token_ids[i, :]] to -inf for the rows where row_active[i].

    token_ids [B, S] is padded by repeating ids of the same row (any id for a row that is never
    active), so duplicate indices always write the same value."""
    masked = scores.gather(1, token_ids).masked_fill(row_active[:, None], _NEG_INF)
    return scores.scatter(1, token_ids, masked)


def apply_temperature(scores: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    return scores / temperature[:, None]


def apply_top_k(scores: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """top-k alone, as transformers' TopK, from one torch.topk of the batch's largest k.

    top_k [B] int64 in [1, V] (V is neutral); max_top_k: the largest top_k below V of the batch,
    known on the host. Scores below the row's k-th largest go (ties kept)."""
    kth_largest = _kth_largest(scores.topk(max_top_k, dim=-1).values, top_k)
    return scores.masked_fill(scores < kth_largest, _NEG_INF)


def apply_top_k_top_p(
    scores: torch.Tensor, top_k: torch.Tensor, top_p_tail: torch.Tensor
) -> torch.Tensor:
    """top-k then top-p (nucleus) filtering on one ascending sort, as transformers' TopK then TopP.

    top_k [B] int64 in [1, V] (V is neutral): scores below the k-th largest go (ties kept).
    top_p_tail [B] = 1 - top_p, computed on the host in double precision as transformers does
    (0 is neutral): the smallest tokens whose cumulative probability stays <= top_p_tail go,
    the most likely token always stays.
    """
    sorted_scores, order = scores.sort(dim=-1)
    vocab_size = scores.shape[-1]
    kth_largest = sorted_scores.gather(1, (vocab_size - top_k)[:, None])
    sorted_scores = sorted_scores.masked_fill(sorted_scores < kth_largest, _NEG_INF)
    sorted_scores = _drop_outside_nucleus(sorted_scores, top_p_tail)
    return torch.empty_like(scores).scatter_(1, order, sorted_scores)


def apply_top_k_top_p_candidates(
    scores: torch.Tensor, top_k: torch.Tensor, top_p_tail: torch.Tensor, max_top_k: int
) -> torch.Tensor:
    """apply_top_k_top_p without a sort of the vocabulary, for batches where every row with top-p
    also has a top-k: the nucleus is cut from the row's top-k candidates of one torch.topk.

    The same result as apply_top_k_top_p up to the rounding of the candidates' softmax, except
    that in a row with top-p, tokens tied with its k-th largest score beyond the batch's largest
    k (`max_top_k`) are dropped rather than kept."""
    values, ids = scores.topk(max_top_k, dim=-1)
    kth_largest = _kth_largest(values, top_k)
    candidates = values.masked_fill(values < kth_largest, _NEG_INF).flip(-1)
    candidates = _drop_outside_nucleus(candidates, top_p_tail)
    nucleus = torch.full_like(scores, _NEG_INF).scatter_(1, ids.flip(-1), candidates)
    top_k_only = scores.masked_fill(scores < kth_largest, _NEG_INF)
    return torch.where((top_p_tail > 0)[:, None], nucleus, top_k_only)


def _kth_largest(descending: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """[B, 1]: each row's k-th value of its largest values `descending` [B, K]; -inf for the rows
    whose k is above K (top-k off)."""
    width = descending.shape[-1]
    kth = descending.gather(1, (top_k.clamp(max=width) - 1)[:, None])
    return kth.masked_fill((top_k > width)[:, None], _NEG_INF)


def _drop_outside_nucleus(ascending: torch.Tensor, top_p_tail: torch.Tensor) -> torch.Tensor:
    """Sets to -inf the smallest scores of each ascending row whose cumulative probability stays
    <= top_p_tail (0 is neutral); the last (largest) score always stays."""
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    outside_nucleus = (cumulative <= top_p_tail[:, None]) & (top_p_tail > 0)[:, None]
    outside_nucleus[:, -1] = False
    return ascending.masked_fill(outside_nucleus, _NEG_INF)


def apply_min_p(scores: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drops tokens less likely than min_p times the most likely one; 0 is neutral."""
    probs = scores.softmax(dim=-1)
    unlikely = probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return scores.masked_fill(unlikely, _NEG_INF)


def apply_typical_p(scores: torch.Tensor, typical_p: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling (Meister et al.): keeps the tokens whose surprise is closest to
    the entropy until their mass reaches typical_p; 1 is neutral."""
    logprobs = scores.log_softmax(dim=-1)
    entropy = -(logprobs * logprobs.exp()).nansum(dim=-1, keepdim=True)
    sorted_gap, order = (-logprobs - entropy).abs().sort(dim=-1)
    cumulative = scores.gather(1, order).softmax(dim=-1).cumsum(dim=-1)
    last_kept = (cumulative < typical_p[:, None]).sum(dim=-1).clamp_(max=scores.shape[-1] - 1)
    sorted_atypical = sorted_gap > sorted_gap.gather(1, last_kept[:, None])
    sorted_atypical[:, 0] = False
    sorted_atypical &= (typical_p < 1)[:, None]
    atypical = torch.empty_like(sorted_atypical).scatter_(1, order, sorted_atypical)
    return scores.masked_fill(atypical, _NEG_INF)
