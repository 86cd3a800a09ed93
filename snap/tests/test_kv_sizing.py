"""The warmup prefill's shape: the largest prefill the router may send, with its decode rows."""

from __future__ import annotations

import torch

from shardline.shards.kv_sizing import warmup_lengths


def test_prompts_fill_the_prefill_budget_and_each_decode_row_adds_a_one_token_prompt():
    lengths = warmup_lengths(100, 40, 3, torch.device("cuda"))
    assert lengths == [40, 40, 20, 1, 1, 1]


def test_cpu_warms_up_with_a_short_prefill_and_no_decode_rows():
    assert warmup_lengths(4096, 1024, 256, torch.device("cpu")) == [64]
