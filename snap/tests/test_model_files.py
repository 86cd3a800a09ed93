"""Model resolution: local folders, the offline hub cache, and the packaged GGUF converted once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shardline import model_files
from shardline.model_files import ModelNotFoundError, resolve_model


def _model_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (path / "model.safetensors").write_bytes(b"")
    (path / "tokenizer.json").write_text("{}")
    return path


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache for this test alone."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(home / "hub"))
    return home


def test_local_folder_is_returned_as_is(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path / "model")
    assert resolve_model(str(folder)) == folder.resolve()


def test_local_folder_without_weights_names_what_is_missing(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path / "model")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match=r"lacks \*\.safetensors weights"):
        resolve_model(str(folder))


def test_missing_path_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        resolve_model(str(tmp_path / "nothing-here"))


def test_missing_hub_id_says_what_is_missing_and_how_to_get_it(hf_home: Path) -> None:
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model("someorg/not-downloaded", revision="v2")
    message = str(error.value)
    assert "'someorg/not-downloaded' (revision v2)" in message
    assert str(hf_home / "hub") in message
    assert "hf download someorg/not-downloaded" in message
    assert "\n" not in message


def test_invalid_hub_id_is_one_clear_error(hf_home: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="nor a valid hub id"):
        resolve_model("not a model!!")


def test_hub_id_resolves_from_the_local_cache(hf_home: Path) -> None:
    repo = hf_home / "hub" / "models--someorg--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = _model_folder(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert resolve_model("someorg/tiny") == snapshot
    assert resolve_model("someorg/tiny", revision=commit) == snapshot


def test_cache_key_follows_file_identity_and_dtype(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SHARDLINE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    first = model_files.converted_gguf_dir(gguf)
    assert first.parent == tmp_path / "cache" / "gguf"
    assert model_files.converted_gguf_dir(gguf, "float32") == first
    assert model_files.converted_gguf_dir(gguf, "bfloat16") != first
    gguf.write_bytes(b"xy")
    assert model_files.converted_gguf_dir(gguf) != first


def test_importing_model_files_does_not_import_torch() -> None:
    code = "import sys, shardline.model_files; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def converted_smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packaged SmolLM2 GGUF converted into a cache of its own, once for this module."""
    cache = tmp_path_factory.mktemp("shardline-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SHARDLINE_CACHE", str(cache))
        return resolve_model(None)


def test_packaged_gguf_converts_to_a_complete_folder(converted_smollm2: Path) -> None:
    names = {p.name for p in converted_smollm2.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    config = json.loads((converted_smollm2 / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert config["dtype"] == "float32"
    assert "quantization_config" not in config


def test_converted_tokenizer_follows_the_gguf_metadata(converted_smollm2: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted_smollm2)
    assert tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_converted_weights_continue_with_paris(converted_smollm2: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted_smollm2)
    model = AutoModelForCausalLM.from_pretrained(converted_smollm2)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(out[0, inputs.input_ids.shape[1] :]).startswith(" Paris")


def test_conversion_is_cached_and_reused(
    converted_smollm2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHARDLINE_CACHE", str(converted_smollm2.parent.parent))

    def no_second_conversion(*args: object) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(model_files, "_write_converted", no_second_conversion)
    gguf = model_files.packaged_gguf_path()
    assert resolve_model("smollm2-135m-instruct") == converted_smollm2
    assert resolve_model(str(gguf)) == converted_smollm2
    assert resolve_model(str(gguf.parent)) == converted_smollm2
    assert not [p for p in converted_smollm2.parent.iterdir() if p.name.startswith(".")]


def test_failed_conversion_leaves_no_partial_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHARDLINE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF")

    def fail_midway(gguf_path: Path, out_dir: Path, dtype: str) -> None:
        (out_dir / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(model_files, "_write_converted", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        resolve_model(str(gguf))
    leftovers = [p for p in (tmp_path / "cache" / "gguf").iterdir() if p.suffix != ".lock"]
    assert leftovers == []
