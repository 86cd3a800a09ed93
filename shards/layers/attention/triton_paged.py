"""The CUDA attention backend: Triton paged decode, the rotary embedding fused into the KV-cache
write, varlen causal prefill.

Prefill goes through flash-attn's `flash_attn_varlen_func` when flash-attn is installed and
through this package's Triton varlen kernel otherwise (one launch for the whole packed batch,
where per-sequence SDPA would loop in Python over many short prompts). Triton itself is imported
when a backend is built, so CPU-only installs can import and list this backend.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from shardline.shards.layers.attention.metadata import AttentionMetadata
from shardline.shards.layers.rotary import RotaryEmbedding


def _flash_attn_varlen() -> Callable[..., torch.Tensor] | None:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


class TritonAttentionBackend:
    name = "triton"
    scales_qkv = True

    def __init__(self, device: torch.device | str = "cuda", use_flash_attn: bool = True) -> None:
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"the triton attention backend needs a CUDA device, got {device}")
        from shardline.shards.layers.attention import triton_decode, triton_kv_write, triton_prefill

        self._decode = triton_decode.paged_decode_attention
        self._rotate_and_write_kv = triton_kv_write.rotate_and_write_kv_cache
        self._write_kv = triton_kv_write.write_kv_cache
        self._varlen = triton_prefill.varlen_causal_attention
        self._cached_prefix = triton_prefill.CachedPrefix
        self._flash_varlen = _flash_attn_varlen() if use_flash_attn else None

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
    ) -> None:
        self._rotate_and_write_kv(
            q, k, v, positions, rotary.cos, rotary.sin, k_cache, v_cache, slot_mapping, qkv_scales
        )

    def write_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        self._write_kv(k, v, k_cache, v_cache, slot_mapping)

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
    ) -> torch.Tensor:
        """A pass with cached prefixes (chunked prefill) goes through the Triton kernel, which
        reads them from the paged cache, and so does one with soft-capped scores."""
        if meta.cu_seqlens is None:
            raise ValueError("prefill needs meta.cu_seqlens")
        max_seqlen = meta.max_seqlen or int((meta.cu_seqlens[1:] - meta.cu_seqlens[:-1]).max())
        prefix = None
        if meta.prefix_lens is not None and meta.prefix_block_tables is not None:
            prefix = self._cached_prefix(
                meta.prefix_lens, meta.prefix_block_tables, k_cache, v_cache
            )
        if self._flash_varlen is None or prefix is not None or softcap:
            return self._varlen(
                q,
                k,
                v,
                meta.cu_seqlens,
                max_seqlen,
                scale,
                window=window,
                prefix=prefix,
                alibi_slopes=alibi_slopes,
                softcap=softcap,
            )
        return self._flash_varlen(
            q,
            k,
            v,
            meta.cu_seqlens,
            meta.cu_seqlens,
            max_seqlen,
            max_seqlen,
            softmax_scale=scale,
            causal=True,
            window_size=(window - 1, 0) if window else (-1, -1),
            alibi_slopes=alibi_slopes,
        )

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
    ) -> torch.Tensor:
        if meta.block_tables is None or meta.context_lens is None:
            raise ValueError("decode needs meta.block_tables and meta.context_lens")
        return self._decode(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.context_lens,
            scale,
            window=window,
            alibi_slopes=alibi_slopes,
            softcap=softcap,
        )
