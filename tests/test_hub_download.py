"""Models from the hub: `download-weights` and the offline `LLM` against a local stand-in hub.

Each download runs in a subprocess whose HF_ENDPOINT points at the stand-in (huggingface_hub
reads it at import), as a user's `text-generation-launcher download-weights` would.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hub_standin import HubStandIn, RunningHub, folder_files
from tests.shard_harness import random_prompts, transformers_greedy

TOKEN = "hf_standin_secret"
# huggingface_hub writes what it receives in 10 MiB chunks: a dropped connection keeps whole ones
LARGE_WEIGHTS = random.Random(0).randbytes(24 << 20)
NOT_SERVED = {
    "pytorch_model.bin": b"pickle",
    "onnx/model.onnx": b"onnx",
    "original/consolidated.safetensors": b"nested",
    "README.md": b"# tiny",
}


@pytest.fixture(scope="module")
def hub(tiny_llama_dir: Path):
    files = folder_files(tiny_llama_dir)
    tagged = {**files, "config.json": _with_marker(files["config.json"])}
    standin = HubStandIn()
    standin.add_repo("org/tiny", {"main": {**files, **NOT_SERVED}, "v1": tagged})
    standin.add_repo("org/gated", {"main": files}, gated_token=TOKEN)
    standin.add_repo("org/resume", {"main": {**files, "model.safetensors": LARGE_WEIGHTS}})
    bin_only = {k: v for k, v in files.items() if not k.endswith(".safetensors")}
    standin.add_repo("org/bin-only", {"main": {**bin_only, "pytorch_model.bin": b"pickle"}})
    running = RunningHub(standin)
    yield standin
    running.stop()


@pytest.fixture(scope="module")
def served(tiny_llama_dir: Path) -> set[str]:
    """What save_pretrained wrote: weights, configs, tokenizer, chat template; all to download."""
    return set(folder_files(tiny_llama_dir))


def _with_marker(config: bytes) -> bytes:
    return json.dumps({**json.loads(config), "standin_revision": "v1"}).encode()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def hub_env(endpoint: str, hf_home: Path, **extra: str) -> dict[str, str]:
    """This environment without the caller's HF_* settings, pointed at `endpoint` and `hf_home`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    return {**env, "HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), **extra}


def download(
    env: dict[str, str], *args: str, json_output: bool = True
) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "shardline.launcher.cli", "download-weights", *args]
    if json_output:
        command.append("--json-output")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def snapshot_of(result: subprocess.CompletedProcess) -> Path:
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip())


def one_error(result: subprocess.CompletedProcess) -> str:
    """The one error line of a failed run (JSON lines, no traceback)."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]
    errors = [event["message"] for event in events if event["level"] == "ERROR"]
    assert len(errors) == 1, result.stderr
    return errors[0]


def commit_of(hub: HubStandIn, repo: str, revision: str = "main") -> str:
    return hub.repos[repo].revisions[revision].sha


def test_download_weights_fetches_serving_files_only_with_progress_lines(hub, tmp_path, served):
    result = download(hub_env(hub.url, tmp_path / "hf"), "org/tiny")
    snapshot = snapshot_of(result)
    assert snapshot == tmp_path / "hf" / "hub" / "models--org--tiny" / "snapshots" / commit_of(
        hub, "org/tiny"
    )
    assert {path.name for path in snapshot.iterdir()} == served
    events = [json.loads(line) for line in result.stderr.splitlines()]
    progress = [e for e in events if e["message"].startswith("downloaded bytes")]
    weights = len((snapshot / "model.safetensors").read_bytes())
    assert progress and progress[-1]["done"] == progress[-1]["total"] >= weights
    assert events[-1]["model_dir"] == str(snapshot)


def test_progress_is_logged_as_text_lines_off_a_terminal(hub, tmp_path):
    result = download(hub_env(hub.url, tmp_path), "org/tiny", json_output=False)
    snapshot_of(result)
    lines = result.stderr.splitlines()
    assert any(" INFO shardline.hub_download: downloaded files: " in line for line in lines)
    assert "\r" not in result.stderr


def test_revision_downloads_that_commit(hub, tmp_path):
    snapshot = snapshot_of(download(hub_env(hub.url, tmp_path), "org/tiny", "--revision", "v1"))
    assert snapshot.name == commit_of(hub, "org/tiny", "v1")
    assert json.loads((snapshot / "config.json").read_text())["standin_revision"] == "v1"
    by_env = download(hub_env(hub.url, tmp_path, REVISION="v1"), "org/tiny")
    assert snapshot_of(by_env) == snapshot


def test_missing_revision_is_one_clear_error(hub, tmp_path):
    error = one_error(download(hub_env(hub.url, tmp_path), "org/tiny", "--revision", "v9"))
    assert (
        error
        == f"model 'org/tiny' has no revision 'v9' on {hub.url} (no such branch, tag or commit)"
    )


def test_missing_repo_is_one_clear_error(hub, tmp_path):
    error = one_error(download(hub_env(hub.url, tmp_path), "org/nothing"))
    assert error.startswith(f"model 'org/nothing' was not found on {hub.url} (HTTP 404)")


def test_gated_repo_needs_a_token(hub, tmp_path, served):
    error = one_error(download(hub_env(hub.url, tmp_path / "none"), "org/gated"))
    assert f"model 'org/gated' is gated on {hub.url} (HTTP 401)" in error and "HF_TOKEN" in error
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):  # TGI's older name too
        env = hub_env(hub.url, tmp_path / variable, **{variable: TOKEN})
        assert {p.name for p in snapshot_of(download(env, "org/gated")).iterdir()} == served
    sent = [r.headers.get("Authorization") for r in hub.requests if "/org/gated/resolve/" in r.path]
    assert f"Bearer {TOKEN}" in sent and None in sent


def test_a_cached_model_needs_no_network(hub, tmp_path):
    snapshot = snapshot_of(download(hub_env(hub.url, tmp_path), "org/tiny"))
    gone = closed_port_url()
    assert (
        snapshot_of(download(hub_env(gone, tmp_path, HF_HUB_OFFLINE="1"), "org/tiny")) == snapshot
    )
    assert snapshot_of(download(hub_env(gone, tmp_path), "org/tiny")) == snapshot


def test_no_network_and_not_cached_is_one_clear_error(tmp_path):
    gone = closed_port_url()
    error = one_error(download(hub_env(gone, tmp_path), "org/tiny"))
    assert error.startswith(f"model 'org/tiny' (revision main) is not in the local Hugging Face cache {tmp_path / 'hub'} and {gone} could not be reached")  # fmt: skip
    offline = one_error(download(hub_env(gone, tmp_path, HF_HUB_OFFLINE="1"), "org/tiny"))
    assert "HF_HUB_OFFLINE is set" in offline


def test_an_interrupted_download_resumes_with_a_range_request(hub, tmp_path):
    """The stand-in closes the connection half-way through the weights, the first time only."""
    hub.drop_once.add("org/resume/model.safetensors")
    snapshot = snapshot_of(download(hub_env(hub.url, tmp_path), "org/resume"))
    assert (snapshot / "model.safetensors").read_bytes() == LARGE_WEIGHTS
    path = f"/org/resume/resolve/{commit_of(hub, 'org/resume')}/model.safetensors"
    ranges = [r.headers.get("Range") for r in hub.requests if r.method == "GET" and r.path == path]
    assert ranges == [None, f"bytes={10 << 20}-"]


def test_a_repository_without_safetensors_is_named_as_such(hub, tmp_path):
    error = one_error(download(hub_env(hub.url, tmp_path), "org/bin-only"))
    assert error.startswith(
        "model 'org/bin-only' has no safetensors weights (it has pytorch_model.bin)"
    )


def test_offline_llm_downloads_a_hub_id_and_generates_as_transformers(
    hub, tmp_path, tiny_llama_dir
):
    """vLLM's `revision` and `download_dir` arguments; the weights of tag v1 are main's."""
    prompts = random_prompts(2, 384, seed=5)
    code = (
        "import json, sys\n"
        "from shardline import LLM, SamplingParams\n"
        "llm = LLM(model='org/tiny', revision='v1', download_dir=sys.argv[2], block_size=4,\n"
        "    kv_cache_bytes=1 << 20, max_model_len=128)\n"
        "outputs = llm.generate(prompt_token_ids=json.loads(sys.argv[1]),\n"
        "    sampling_params=SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)\n"
        "print(llm.model_dir)\n"
        "print(json.dumps([o.outputs[0].token_ids for o in outputs]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(prompts), str(tmp_path / "downloads")],
        env=hub_env(hub.url, tmp_path / "hf"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    model_dir, tokens = result.stdout.splitlines()[-2:]
    assert json.loads(tokens) == transformers_greedy(tiny_llama_dir, prompts, [8, 8])
    commit = commit_of(hub, "org/tiny", "v1")
    assert model_dir == str(tmp_path / "downloads" / "models--org--tiny" / "snapshots" / commit)
