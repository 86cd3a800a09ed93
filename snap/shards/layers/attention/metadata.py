"""What one forward pass tells every attention layer about the packed batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Describes a packed (unpadded) batch of tokens.

    Prefill: the tokens of every sequence are concatenated; `cu_seqlens` marks where each
    sequence starts (exclusive prefix sums, int32, length num_seqs + 1).
    Decode: one token per sequence; `block_tables` and `context_lens` locate each sequence's
    KV in the paged cache (context_lens counts the current token, whose KV is written first).
    Mixed (prefill with `num_decode_tokens` > 0): the first `num_decode_tokens` tokens are
    decode tokens located by `block_tables` / `context_lens`, the rest are prefill tokens that
    `cu_seqlens` describes (counted from the first of them).
    Chunked prefill: a prefill sequence may continue a prompt whose first `prefix_lens[i]`
    tokens are already cached; its tokens then sit at positions prefix_lens[i] onwards and
    attend to that prefix too, found through `prefix_block_tables[i]` (None: no prefixes).
    `slot_mapping[i]` is the flat cache slot (block * block_size + offset) where token i's
    K and V are written; a negative slot means "do not write" (padding in CUDA graphs).
    """

    is_prefill: bool
    slot_mapping: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    block_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    max_context_len: int = 0
    num_decode_tokens: int = 0
    prefix_lens: torch.Tensor | None = None
    prefix_block_tables: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])
