"""Reference attention in plain torch: runs on CPU and on any device, one sequence at a time."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shardline.shards.layers.attention.metadata import AttentionMetadata
from shardline.shards.layers.rotary import RotaryEmbedding


class TorchNativeBackend:
    name = "torch"

    def write_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        keep = slot_mapping >= 0
        slots = slot_mapping[keep]
        k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
        v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)

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
    ) -> None:
        rotary.rotate_(q, positions)
        rotary.rotate_(k, positions)
        self.write_kv(k, v, k_cache, v_cache, slot_mapping)

    def prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int = 0,
    ) -> torch.Tensor:
        """Causal attention within each packed sequence, over the last `window` keys if set."""
        out = torch.empty_like(q)
        bounds = meta.cu_seqlens.tolist()
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            mask = sliding_window_mask(end - start, window, q.device) if window else None
            out[start:end] = _attend(
                q[start:end], k[start:end], v[start:end], scale, mask=mask, causal=not window
            )
        return out

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int = 0,
    ) -> torch.Tensor:
        """Each sequence's one query token against its cached tokens (the last `window` if set)."""
        out = torch.empty_like(q)
        block_size = k_cache.shape[1]
        for i, context_len in enumerate(meta.context_lens.tolist()):
            first = max(0, context_len - window) if window else 0
            blocks = meta.block_tables[i, first // block_size : -(-context_len // block_size)]
            skip = first % block_size
            k = k_cache[blocks].flatten(0, 1)[skip : skip + context_len - first]
            v = v_cache[blocks].flatten(0, 1)[skip : skip + context_len - first]
            out[i : i + 1] = _attend(q[i : i + 1], k, v, scale)
        return out


def sliding_window_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    """[length, length] bool, True where query p may see key j: 0 <= p - j < window, as
    transformers' sliding-window causal mask has it (the query itself and window - 1 before)."""
    pos = torch.arange(length, device=device)
    offset = pos[:, None] - pos[None, :]
    return (offset >= 0) & (offset < window)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """q [Tq, H, D] over k, v [Tk, H_kv, D], grouped-query; returns [Tq, H, D]."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1).to(q.dtype),
        v.transpose(0, 1).to(q.dtype),
        attn_mask=mask,
        is_causal=causal,
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(0, 1)
