"""TGI's `watermark`: the soft green-list watermark of Kirchenbauer et al. 2023 ("A Watermark for
Large Language Models").

At each step the previous token seeds a split of the vocabulary: a fraction gamma of it is
"green" and gets delta added to its logits, so a watermarked text holds measurably more green
tokens than the gamma expected of any other text (a z-test over its tokens detects it). gamma and
delta come from the shard's environment, `WATERMARK_GAMMA` (default 0.5) and `WATERMARK_DELTA`
(default 2.0), as in TGI.

The split is a counter-based hash of (previous token, token id), computed for the whole batch in
one set of integer tensor ops: no generator per row, no host sync.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from shardline.shards.sampling.counter_hash import MASK_32, pcg_hash

# Mixed into every previous token: green lists of this server, not of any hash of token ids.
_HASH_KEY = 15485863


@dataclass(frozen=True)
class WatermarkSettings:
    gamma: float = 0.5
    delta: float = 2.0

    @classmethod
    def from_env(cls) -> WatermarkSettings:
        settings = cls(
            gamma=float(os.environ.get("WATERMARK_GAMMA", cls.gamma)),
            delta=float(os.environ.get("WATERMARK_DELTA", cls.delta)),
        )
        if not 0.0 < settings.gamma < 1.0:
            raise ValueError(f"WATERMARK_GAMMA must be in (0, 1) (got {settings.gamma})")
        return settings


def green_mask(previous_tokens: torch.Tensor, vocab_size: int, gamma: torch.Tensor) -> torch.Tensor:
    """[B, V] bool: the green list of each row, seeded by its previous token [B] (int64); gamma
    [B] is the row's green fraction."""
    row_keys = pcg_hash((previous_tokens ^ _HASH_KEY) & MASK_32)
    token_ids = torch.arange(vocab_size, dtype=torch.int64, device=previous_tokens.device)
    bits = pcg_hash(pcg_hash(token_ids)[None, :] ^ row_keys[:, None])
    return bits < (gamma * 2.0**32)[:, None]


def apply_watermark(
    scores: torch.Tensor, previous_tokens: torch.Tensor, gamma: torch.Tensor, delta: torch.Tensor
) -> torch.Tensor:
    """Adds delta [B] to the scores of each row's green tokens; delta 0 is neutral."""
    green = green_mask(previous_tokens, scores.shape[-1], gamma)
    return scores + green.to(scores.dtype) * delta[:, None]
