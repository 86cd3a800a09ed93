"""What a model class needs to run as one pipeline stage (shards/utils/pipeline.py).

A model's forward is embed → decoder layers → final norm, and compute_logits the LM head. Built
on stage `weights.tp.stage`, a model holds the embedding only on the first stage, only the
layers of its stage (`stage_layers`), and the final norm and LM head only on the last. Its
forward starts from `stage_input` (the embedding, or what the previous stage sent) and, on every
stage but the last, ends with `send_on` instead of the norm. The activations are the hidden
states and, for a model whose layers carry the residual stream beside them (Llama's fused
add-and-norm), that residual too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from shardline.progress import logged_progress
from shardline.shards.layers.fp8 import Product, dense
from shardline.shards.utils.pipeline import PipelineStage


def stage_layers(
    stage: PipelineStage, num_layers: int, build: Callable[[int], nn.Module], logger: logging.Logger
) -> nn.ModuleList:
    """The stage's decoder layers, `build(i)` with i each layer's index in the whole model."""
    indices = stage.layers(num_layers)
    return nn.ModuleList(
        build(i) for i in logged_progress(indices, len(indices), "loading layers", logger)
    )


def stage_input(
    stage: PipelineStage,
    embed: Callable[[torch.Tensor], torch.Tensor] | None,
    input_ids: torch.Tensor,
    hidden_size: int,
    dtype: torch.dtype,
    with_residual: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first stage's embedding (no residual yet; `embed` is None on the other stages); a later
    stage's hidden states (and residual, `with_residual`) received from the stage before."""
    if embed is not None:
        return embed(input_ids), None
    shape = (input_ids.shape[0], hidden_size)
    received = stage.receive(2 if with_residual else 1, shape, dtype, input_ids.device)
    return received[0], received[1] if with_residual else None


def send_on(stage: PipelineStage, hidden: Product, residual: torch.Tensor | None) -> torch.Tensor:
    """Hands the activations to the next stage; returns `hidden` (no stage but the last has
    logits, see ModelRunner)."""
    hidden = dense(hidden)
    stage.send([hidden] if residual is None else [hidden, residual])
    return hidden
