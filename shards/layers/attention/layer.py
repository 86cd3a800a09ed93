"""One layer's attention over the paged KV cache, whatever the model's position scheme.

The caller hands this pass's q, k and v heads (split from its own qkv projection); the layer
rotates q and k and writes k and v into the layer's cache (rotary models), or only writes them
(learned positions, ALiBi), then attends: decode tokens through the paged cache, prefill tokens
among themselves and to their cached prefix. A mixed pass has its decode tokens first (see
AttentionMetadata). An FP8 cache with the checkpoint's k/v scales gets them applied around the
kernels (fp8_kv.KVScales).
"""

from __future__ import annotations

import torch
from torch import nn

from shardline.shards.layers.attention.backend import AttentionBackend
from shardline.shards.layers.attention.fp8_kv import KVScales
from shardline.shards.layers.attention.metadata import AttentionMetadata
from shardline.shards.layers.gemv_plan import RopeKV
from shardline.shards.layers.rotary import RotaryEmbedding

KVCache = tuple[torch.Tensor, torch.Tensor]


class PagedAttention(nn.Module):
    def __init__(
        self,
        backend: AttentionBackend,
        num_heads: int,
        head_dim: int,
        *,
        scale: float | None = None,
        softcap: float = 0.0,
        rotary: RotaryEmbedding | None = None,
        window: int = 0,
        alibi_slopes: torch.Tensor | None = None,
        kv_scales: KVScales | None = None,
    ) -> None:
        """`num_heads` and `alibi_slopes` [num_heads] (float32) are this rank's; `scale` the
        softmax scale (None: head_dim ** -0.5); `softcap` the scores' cap (0: none, see
        backend.py); `kv_scales` the checkpoint's FP8 cache scales of this layer (None: 1.0)."""
        super().__init__()
        self.backend = backend
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.softcap = softcap
        self.rotary = rotary
        self.window = window
        self.register_buffer("alibi_slopes", alibi_slopes, persistent=False)
        self.kv_scales = kv_scales or KVScales()

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        written: bool = False,
        qkv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """q [T, heads, head_dim], k and v [T, kv_heads, head_dim] -> [T, heads * head_dim].
        `written`: q and k come rotated and k and v are in the cache already (the qkv
        projection did both with `rope_kv`'s arguments). `qkv_scales`: q, k and v are an FP8
        qkv product's unscaled heads, where `takes_qkv_scales` says so."""
        k_cache, v_cache = kv_cache
        scaled = self.kv_scales.applies(k_cache)
        if scaled:
            q, k, v = self.kv_scales.into_cache(q, k, v)
        if written:
            assert not scaled, "rope_kv hands no scaled cache over"
        elif self.rotary is None:
            self.backend.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        else:
            self.backend.rotate_and_write_kv(
                q, k, v, positions, self.rotary, k_cache, v_cache, meta.slot_mapping, qkv_scales
            )
        out = self._attend(q, k, v, k_cache, v_cache, meta)
        if scaled:
            out = self.kv_scales.out_of_cache(out)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def takes_qkv_scales(self, kv_cache: KVCache) -> bool:
        """Whether `forward` can apply an FP8 qkv product's scales in its rotary + KV write: a
        rotary model on a backend that does it, no checkpoint KV scales to apply before."""
        return (
            self.rotary is not None
            and self.backend.scales_qkv
            and not self.kv_scales.applies(kv_cache[0])
        )

    def rope_kv(
        self, positions: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> RopeKV | None:
        """What the batch-1 qkv GEMV needs to rotate q and k and write k and v into this layer's
        cache itself (gemv_plan.RopeKV), or None where it cannot: no rotary embedding, or an FP8
        cache with the checkpoint's scales (applied between the projection and the write)."""
        k_cache, v_cache = kv_cache
        if self.rotary is None or self.kv_scales.applies(k_cache):
            return None
        cos, sin = self.rotary.cos, self.rotary.sin
        fused = RopeKV(positions, cos, sin, k_cache, v_cache, meta.slot_mapping, self.num_heads)
        return fused if fused.layouts_agree() else None

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        options = dict(window=self.window, softcap=self.softcap, alibi_slopes=self.alibi_slopes)
        if not meta.is_prefill:
            return self.backend.decode(q, k_cache, v_cache, meta, self.scale, **options)
        decoded = meta.num_decode_tokens
        prefilled = self.backend.prefill(
            q[decoded:], k[decoded:], v[decoded:], k_cache, v_cache, meta, self.scale, **options
        )
        if not decoded:
            return prefilled
        decoding = self.backend.decode(q[:decoded], k_cache, v_cache, meta, self.scale, **options)
        return torch.cat([decoding, prefilled])
