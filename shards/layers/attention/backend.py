"""The interface every attention implementation follows, and the choice between them.

KV cache layout (per layer, per rank), the same as flash-attn's paged API:
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
That shape is logical: an FP8 v_cache is a strided view whose keys are contiguous within a block
(kv_cache.keys_major_values), so an implementation takes each cache's strides. The Triton one
writes no NaN into a keys-major v_cache: its decode reads the unwritten slots at zero weight.
Queries/keys/values arrive packed: q [num_tokens, num_heads, head_dim],
k and v [num_tokens, num_kv_heads, head_dim]; outputs are [num_tokens, num_heads, head_dim].

`rotate_and_write_kv` applies the rotary embedding to q and k in place (as `rotary.rotate_`,
bit for bit) and writes k and v into the cache at each token's slot, skipping negative slots; a
backend may do both in one kernel. `write_kv` writes them without rotating (models without
rotary embeddings: learned positions, ALiBi). A backend whose `scales_qkv` is set also takes
`qkv_scales` there: q, k and v are then an FP8 qkv projection's unscaled heads (fp8.ScaledProduct's
row and column scales), which it scales as it reads them and writes back scaled.

`prefill` attends each packed sequence causally to itself and, where `meta.prefix_lens` says a
sequence continues a cached prompt (chunked prefill), to that cached prefix first.

`window` is the layer's sliding window, a constant of the model (0: full causal attention):
the query at position p sees the keys at positions p - window + 1 .. p, as transformers'
sliding-window mask has it (Mistral v0.1, Qwen2 with use_sliding_window).

`alibi_slopes` (float32 [num_heads], None: no bias) adds slope * (key position - query
position) to each head's scaled scores (ALiBi: BLOOM, some Falcons).

`softcap` (0: none) caps each scaled score s at softcap * tanh(s / softcap) before any bias,
mask and softmax (Gemma 2's attention logit soft-capping).
"""

from __future__ import annotations

from typing import Protocol

import torch

from shardline.shards.layers.attention.metadata import AttentionMetadata
from shardline.shards.layers.rotary import RotaryEmbedding


class AttentionBackend(Protocol):
    name: str
    scales_qkv: bool

    def rotate_and_write_kv(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        qkv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None: ...

    def write_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None: ...

    def prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int = 0,
        alibi_slopes: torch.Tensor | None = None,
        softcap: float = 0.0,
    ) -> torch.Tensor: ...

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int = 0,
        alibi_slopes: torch.Tensor | None = None,
        softcap: float = 0.0,
    ) -> torch.Tensor: ...
