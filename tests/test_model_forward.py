"""The model on a paged KV cache gives transformers' logits: packed prefill, then decode steps."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from shardline.shards.layers.attention import AttentionMetadata, get_attention_backend
from shardline.shards.models import FAMILIES, CausalLM, ModelConfig, load_model
from shardline.shards.utils.dist import TPGroup
from tests.model_factory import TinyModelSpec, build_tiny_model
from tests.shard_harness import EXACT_ATTENTION

PROMPT_LENGTHS = (5, 11, 1)
DECODE_STEPS = 4
CPU = torch.device("cpu")
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
}


def prompts(
    vocab_size: int, seed: int = 0, lengths: tuple[int, ...] = PROMPT_LENGTHS
) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(n)] for n in lengths]


def load(model_dir: Path, tp: TPGroup | None = None) -> CausalLM:
    backend = get_attention_backend("torch", CPU)
    return load_model(
        model_dir, dtype=torch.float32, device=CPU, tp=tp or TPGroup(), attention_backend=backend
    )


class PagedSequences:
    """Sequences on a paged KV cache whose blocks are handed out in shuffled order."""

    def __init__(
        self,
        model: CausalLM,
        block_size: int,
        num_blocks: int = 64,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        shape = (num_blocks, block_size, model.num_kv_heads_per_rank, model.head_dim)
        dtype = kv_dtype or model.dtype
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
            for _ in range(model.num_layers)
        ]
        self.block_size = block_size
        self.free_blocks = list(range(num_blocks))
        random.Random(1).shuffle(self.free_blocks)
        self.block_tables: list[list[int]] = []
        self.lengths: list[int] = []

    def append(self, seq: int, count: int) -> list[int]:
        """Reserves slots for `count` more tokens of sequence `seq`; returns them."""
        start = self.lengths[seq]
        self.lengths[seq] += count
        while len(self.block_tables[seq]) * self.block_size < self.lengths[seq]:
            self.block_tables[seq].append(self.free_blocks.pop())
        return [self.slot(seq, pos) for pos in range(start, self.lengths[seq])]

    def slot(self, seq: int, pos: int) -> int:
        return (
            self.block_tables[seq][pos // self.block_size] * self.block_size + pos % self.block_size
        )

    def prefill_meta(self, lengths: list[int]) -> AttentionMetadata:
        slots: list[int] = []
        for length in lengths:
            self.block_tables.append([])
            self.lengths.append(0)
            slots += self.append(len(self.lengths) - 1, length)
        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        return AttentionMetadata(
            is_prefill=True,
            slot_mapping=torch.tensor(slots),
            cu_seqlens=cu_seqlens,
            max_seqlen=max(lengths),
        )

    def decode_meta(self) -> AttentionMetadata:
        slots = [self.append(seq, 1)[0] for seq in range(len(self.lengths))]
        width = max(len(table) for table in self.block_tables)
        tables = [table + [0] * (width - len(table)) for table in self.block_tables]
        return AttentionMetadata(
            is_prefill=False,
            slot_mapping=torch.tensor(slots),
            block_tables=torch.tensor(tables, dtype=torch.int32),
            context_lens=torch.tensor(self.lengths, dtype=torch.int32),
        )


@torch.inference_mode()
def run_engine(
    model: CausalLM,
    prompt_ids: list[list[int]],
    fed_tokens: list[list[int]],
    block_size: int,
    kv_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Logits [num_seqs, vocab] after the packed prefill and after each decode step, where
    step s feeds fed_tokens[s] (one token per sequence); the cache in `kv_dtype` (default: the
    model's)."""
    paged = PagedSequences(model, block_size, kv_dtype=kv_dtype)
    lengths = [len(p) for p in prompt_ids]
    meta = paged.prefill_meta(lengths)
    input_ids = torch.tensor([t for p in prompt_ids for t in p])
    positions = torch.tensor([pos for n in lengths for pos in range(n)])
    hidden = model(input_ids, positions, paged.kv_caches, meta)
    last = meta.cu_seqlens[1:].long() - 1
    step_logits = [model.compute_logits(hidden[last])]
    for tokens in fed_tokens:
        positions = torch.tensor(paged.lengths)
        meta = paged.decode_meta()
        hidden = model(torch.tensor(tokens), positions, paged.kv_caches, meta)
        step_logits.append(model.compute_logits(hidden))
    return step_logits


@torch.inference_mode()
def transformers_reference(
    model_dir: Path, prompt_ids: list[list[int]], steps: int
) -> tuple[list[torch.Tensor], list[list[int]]]:
    """transformers' last-token logits per step and its greedy tokens, fed back each step."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, **EXACT_ATTENTION
    ).eval()
    sequences = [list(p) for p in prompt_ids]
    step_logits, fed = [], []
    for _ in range(steps + 1):
        logits = torch.stack([hf(torch.tensor([s])).logits[0, -1] for s in sequences])
        step_logits.append(logits)
        tokens = logits.argmax(-1).tolist()
        fed.append(tokens)
        for seq, token in zip(sequences, tokens, strict=True):
            seq.append(token)
    return step_logits, fed[:-1]


@torch.inference_mode()
def transformers_cached_logits(model_dir: Path, prompt: list[int], steps: int):
    """transformers' last-token logits of the prompt, then of each of its greedy tokens fed one
    at a time through its KV cache (generate re-prefills a Phi-3 prompt once the sequence
    passes original_max_position_embeddings; a paged cache keeps what it has)."""
    from transformers import AutoModelForCausalLM, DynamicCache

    hf = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, **EXACT_ATTENTION
    ).eval()
    cache = DynamicCache(config=hf.config)
    out = hf(torch.tensor([prompt]), cache=cache)
    step_logits, fed = [out.logits[:, -1]], []
    for position in range(len(prompt), len(prompt) + steps):
        token = int(step_logits[-1].argmax())
        fed.append([token])
        out = hf(
            torch.tensor([[token]]),
            cache=cache,
            position_ids=torch.tensor([[position]]),
        )
        step_logits.append(out.logits[:, -1])
    return step_logits, fed


def assert_paged_forward_matches(
    model_dir: Path, lengths: tuple[int, ...], steps: int, block_size: int, seed: int = 0
) -> None:
    """The paged forward's last-token logits at every step equal transformers' (its greedy
    tokens fed back) for random prompts of `lengths`."""
    model = load(model_dir)
    prompt_ids = prompts(model.config.vocab_size, seed, lengths)
    expected, fed = transformers_reference(model_dir, prompt_ids, steps)
    assert_logits_close(run_engine(model, prompt_ids, fed, block_size), expected)


def assert_logits_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.dtype == torch.float32
        assert a.shape == e.shape, f"step {step}"
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=f"logits differ at step {step}")


VARIANTS = {
    "llama3-rope": TinyModelSpec(architecture="llama", rope_scaling=dict(LLAMA3_SCALING), seed=3),
    "tied": TinyModelSpec(architecture="llama", tie_word_embeddings=True, num_kv_heads=2, seed=4),
}


@pytest.mark.parametrize(
    ("name", "block_size"),
    [("llama", 4), ("mistral", 16), ("qwen2", 4), ("llama3-rope", 4), ("tied", 16)],
)
def test_paged_forward_matches_transformers(
    tmp_path: Path, tiny_model_dirs: dict[str, Path], name: str, block_size: int
) -> None:
    if name in VARIANTS:
        model_dir = build_tiny_model(tmp_path / name, VARIANTS[name])
    else:
        model_dir = tiny_model_dirs[name]
    assert_paged_forward_matches(model_dir, PROMPT_LENGTHS, DECODE_STEPS, block_size)


def test_write_kv_skips_negative_slots() -> None:
    backend = get_attention_backend("torch", CPU)
    k_cache = torch.zeros(3, 2, 1, 4)
    v_cache = torch.zeros(3, 2, 1, 4)
    k = torch.arange(1.0, 4.0).view(3, 1, 1).expand(3, 1, 4)
    backend.write_kv(k, -k, k_cache, v_cache, torch.tensor([5, -1, 0]))
    flat_k, flat_v = k_cache.view(6, 4), v_cache.view(6, 4)
    assert torch.equal(flat_k[5], torch.full((4,), 1.0))
    assert torch.equal(flat_k[0], torch.full((4,), 3.0))
    assert torch.equal(flat_v[0], torch.full((4,), -3.0))
    assert flat_k[1:5].abs().sum() == 0 and flat_v[1:5].abs().sum() == 0


def test_config_reads_old_style_rope_keys_and_every_eos_id() -> None:
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rope_theta": 500000.0,
        "rope_scaling": {**LLAMA3_SCALING, "rope_type": None, "type": "llama3"},
        "eos_token_id": 128001,
        "torch_dtype": "bfloat16",
    }
    config = ModelConfig.from_dicts(raw, {"eos_token_id": [128001, 128008, 128009]})
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == LLAMA3_SCALING
    assert config.eos_token_ids == (128001, 128008, 128009)
    assert config.head_dim == 128 and config.torch_dtype == torch.bfloat16
    assert not config.attention_bias and config.sliding_window is None


def test_unsupported_architecture_names_the_supported_ones() -> None:
    raw = {"architectures": ["MambaForCausalLM"], "model_type": "mamba"}
    with pytest.raises(ValueError, match="MambaForCausalLM") as refused:
        ModelConfig.from_dicts(raw, {})
    for family in FAMILIES:
        for architecture in family.architectures:
            assert architecture in str(refused.value)


def test_model_type_picks_the_family_without_architectures() -> None:
    raw = {**QWEN2_RAW, "architectures": None, "model_type": "mistral", "hidden_act": "silu"}
    assert ModelConfig.from_dicts(raw, {}).layer_windows == (16,) * 4
    with pytest.raises(ValueError, match="hidden_act 'gelu'.*silu"):
        ModelConfig.from_dicts({**raw, "hidden_act": "gelu"}, {})


def with_config_changes(model_dir: Path, out_dir: Path, changes: dict) -> Path:
    """A copy of model_dir whose config.json has `changes` applied (None removes a key)."""
    shutil.copytree(model_dir, out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    config.update(changes)
    config = {key: value for key, value in config.items() if value is not None}
    (out_dir / "config.json").write_text(json.dumps(config))
    return out_dir


WINDOW = 8
SLIDING_VARIANTS = {
    "mistral": ({"sliding_window": WINDOW}, (WINDOW, WINDOW)),
    "qwen2": (
        {
            "use_sliding_window": True,
            "sliding_window": WINDOW,
            "max_window_layers": 1,
            "layer_types": None,
        },
        (0, WINDOW),
    ),
}


@pytest.mark.parametrize("arch", list(SLIDING_VARIANTS))
def test_sliding_window_forward_matches_transformers(
    tmp_path: Path, tiny_model_dirs: dict[str, Path], arch: str
) -> None:
    """Prompts and decode steps well past the window: prefill masks, decode reads the last W."""
    changes, layer_windows = SLIDING_VARIANTS[arch]
    model_dir = with_config_changes(tiny_model_dirs[arch], tmp_path / arch, changes)
    model = load(model_dir)
    assert model.config.layer_windows == layer_windows
    prompt_ids = prompts(model.config.vocab_size, seed=5, lengths=(21, 34, 3, 9))
    expected, fed = transformers_reference(model_dir, prompt_ids, steps=8)
    actual = run_engine(model, prompt_ids, fed, block_size=4)
    assert_logits_close(actual, expected)


QWEN2_RAW = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "sliding_window": 16,
}


@pytest.mark.parametrize(
    "changes",
    [
        {"use_sliding_window": False, "max_window_layers": 1},
        {"use_sliding_window": True, "max_window_layers": 2},
        {"use_sliding_window": True},
        {"use_sliding_window": True, "sliding_window": None},
        {
            "use_sliding_window": True,
            "layer_types": ["sliding_attention", "full_attention"] * 2,
        },
    ],
)
def test_qwen2_sliding_layers_follow_transformers(changes: dict) -> None:
    from transformers import Qwen2Config

    raw = {**QWEN2_RAW, **changes}
    reference = Qwen2Config(**raw)
    expected = tuple(
        reference.sliding_window if kind == "sliding_attention" and reference.sliding_window else 0
        for kind in reference.layer_types
    )
    config = ModelConfig.from_dicts(raw, {})
    assert config.layer_windows == expected
    assert config.sliding_window == (max(expected) or None)


def test_mistral_slides_in_every_layer_and_llama_in_none() -> None:
    mistral = {**QWEN2_RAW, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}
    assert ModelConfig.from_dicts(mistral, {}).layer_windows == (16,) * 4
    llama = {**QWEN2_RAW, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    assert ModelConfig.from_dicts(llama, {}).layer_windows == (0,) * 4
    assert ModelConfig.from_dicts({**mistral, "sliding_window": None}, {}).sliding_window is None
