"""Reference attention in plain torch: runs on CPU and on any device, one sequence at a time."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shardline.shards.layers.attention.metadata import AttentionMetadata
from shardline.shards.layers.rotary import RotaryEmbedding


class TorchNativeBackend:
    name = "torch"
    scales_qkv = False

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
        pages, in_page = slots // k_cache.shape[1], slots % k_cache.shape[1]  # any layout
        k_cache[pages, in_page] = k[keep].to(k_cache.dtype)
        v_cache[pages, in_page] = v[keep].to(v_cache.dtype)

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
        qkv_scales: None = None,  # scales_qkv is off: the layer applies them before
    ) -> None:
        rotary.rotate_(q, positions)
        rotary.rotate_(k, positions)
        self.write_kv(k, v, k_cache, v_cache, slot_mapping)

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
        """Causal attention within each packed sequence and to its cached prefix, over the last
        `window` keys if set, with each head's ALiBi bias if `alibi_slopes` [heads] are given,
        the scaled scores capped at `softcap` (cap * tanh(score / cap)) if set."""
        out = torch.empty_like(q)
        bounds = meta.cu_seqlens.tolist()
        prefixes = (
            [0] * (len(bounds) - 1) if meta.prefix_lens is None else meta.prefix_lens.tolist()
        )
        for i, (start, end, prefix) in enumerate(
            zip(bounds[:-1], bounds[1:], prefixes, strict=True)
        ):
            keys, values = k[start:end], v[start:end]
            if prefix:
                table = meta.prefix_block_tables[i]
                keys = torch.cat([_gather(k_cache, table, 0, prefix).to(keys.dtype), keys])
                values = torch.cat([_gather(v_cache, table, 0, prefix).to(values.dtype), values])
            if prefix or window or softcap or alibi_slopes is not None:
                mask = causal_mask(end - start, prefix, window, q.device)
                if alibi_slopes is not None:
                    mask = alibi_bias(alibi_slopes, mask, q.dtype)
                out[start:end] = _attend(q[start:end], keys, values, scale, mask, softcap=softcap)
            else:
                out[start:end] = _attend(q[start:end], keys, values, scale, causal=True)
        return out

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
        """Each sequence's one query token against its cached tokens (the last `window` if set),
        with each head's ALiBi bias if `alibi_slopes` [heads] are given, capped at `softcap`."""
        out = torch.empty_like(q)
        for i, context_len in enumerate(meta.context_lens.tolist()):
            first = max(0, context_len - window) if window else 0
            table = meta.block_tables[i]
            k = _gather(k_cache, table, first, context_len)
            v = _gather(v_cache, table, first, context_len)
            mask = None
            if alibi_slopes is not None:
                visible = torch.ones((1, context_len - first), dtype=torch.bool, device=q.device)
                mask = alibi_bias(alibi_slopes, visible, q.dtype)
            out[i : i + 1] = _attend(q[i : i + 1], k, v, scale, mask, softcap=softcap)
        return out


def _gather(cache: torch.Tensor, block_table: torch.Tensor, first: int, end: int) -> torch.Tensor:
    """The cached tokens at positions first .. end - 1 of one sequence, [end - first, H_kv, D]."""
    block_size = cache.shape[1]
    blocks = block_table[first // block_size : -(-end // block_size)]
    skip = first % block_size
    return cache[blocks].flatten(0, 1)[skip : skip + end - first]


def causal_mask(length: int, prefix: int, window: int, device: torch.device) -> torch.Tensor:
    """[length, prefix + length] bool, True where the query at position prefix + p may see the
    key at position j: j <= prefix + p and, with a window, prefix + p - j < window (the query
    itself and window - 1 before it, as transformers' sliding-window mask has it)."""
    queries = torch.arange(prefix, prefix + length, device=device)
    offset = queries[:, None] - torch.arange(prefix + length, device=device)[None, :]
    visible = offset >= 0
    return visible & (offset < window) if window else visible


def alibi_bias(slopes: torch.Tensor, visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[heads, queries, keys] additive mask: slope * (key position - query position) where
    `visible` [queries, keys] (the queries are the keys' last ones), -inf elsewhere."""
    num_queries, num_keys = visible.shape
    keys = torch.arange(num_keys, device=visible.device)
    distance = keys[None, :] - keys[num_keys - num_queries :, None]
    bias = slopes.float()[:, None, None] * distance.float()
    return bias.masked_fill(~visible, float("-inf")).to(dtype)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    softcap: float = 0.0,
) -> torch.Tensor:
    """q [Tq, H, D] over k, v [Tk, H_kv, D], grouped-query; returns [Tq, H, D]. `mask`: where
    a query sees a key (bool) or a bias added to the scores (-inf: unseen)."""
    if softcap:
        return _capped_attend(q, k.to(q.dtype), v.to(q.dtype), scale, mask, softcap)
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


def _capped_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None,
    softcap: float,
) -> torch.Tensor:
    """Attention whose scaled scores are soft-capped before the mask and the softmax (float32),
    in transformers' order (Gemma 2)."""
    group = q.shape[1] // k.shape[1]
    keys = k.repeat_interleave(group, dim=1).transpose(0, 1)
    values = v.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = q.transpose(0, 1) @ keys.transpose(1, 2) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    return (probs @ values).transpose(0, 1)
