"""text-generation-launcher as a process: supervision and shutdown through real processes.

The supervision tests run the real launcher with stand-in shard and router executables (small
Python programs in tests/data) first on PATH; the end-to-end tests run the real shards and router."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import unused_port

from tests.launcher_harness import LIMITS, Launcher, is_alive, transformers_greedy

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose PATH finds the stand-in shard and router first."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, script in (
        ("shardline-shard", "fake_shard.py"),
        ("shardline-router", "fake_router.py"),
    ):
        exe = bin_dir / name
        exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{DATA / script}" "$@"\n')
        exe.chmod(0o755)
    records = tmp_path / "records"
    records.mkdir()
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "FAKE_RECORD_DIR": str(records),
        "TMPDIR": str(tmp_path),
        "HF_HOME": str(tmp_path / "hf"),
        "CUDA_VISIBLE_DEVICES": "",
    }


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (folder / name).write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


@pytest.fixture
def launch(fake_env: dict[str, str], model_dir: Path) -> Iterator:
    started: list[Launcher] = []

    def start(*extra: str, env: dict[str, str] | None = None) -> Launcher:
        argv = [
            "--model-id",
            str(model_dir),
            "--port",
            str(unused_port()),
            "--hostname",
            "127.0.0.1",
        ]
        launcher = Launcher([*argv, "--json-output", *extra], {**fake_env, **(env or {})})
        started.append(launcher)
        return launcher

    yield start
    for launcher in started:
        launcher.kill()


def records(env: dict[str, str]) -> dict[str, dict]:
    folder = Path(env["FAKE_RECORD_DIR"])
    return {path.stem: json.loads(path.read_text()) for path in folder.glob("*.json")}


def socket_dirs(env: dict[str, str]) -> list[Path]:
    return list(Path(env["TMPDIR"]).glob("shardline-*"))


@pytest.mark.parametrize("model_id", ["/no/such/model", "someorg/not-downloaded", "bad id!!"])
def test_bad_model_id_is_one_error_line_and_nothing_starts(fake_env, model_id: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shardline.launcher.cli", "--model-id", model_id],
        env=fake_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and model_id in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert records(fake_env) == {} and socket_dirs(fake_env) == []


def test_serves_then_stops_gracefully_on_sigterm(launch, fake_env) -> None:
    launcher = launch("--num-shard", "2", env={"FAKE_ROUTER_DRAIN_S": "1"})
    ready = launcher.wait_for_line("Shardline is ready on http://127.0.0.1:", timeout_s=60)
    url = json.loads(ready)["message"].split(" on ")[1]
    assert urllib.request.urlopen(f"{url}/health", timeout=5).status == 200
    (sock_dir,) = socket_dirs(fake_env)
    assert stat.S_IMODE(sock_dir.stat().st_mode) == 0o700
    seen = records(fake_env)
    assert seen["shard-1"]["env"]["RANK"] == "1" and seen["shard-1"]["env"]["WORLD_SIZE"] == "2"
    assert seen["shard-0"]["env"]["NCCL_NVLS_ENABLE"] == "0"
    assert str(sock_dir / "shard-0") in seen["router"]["argv"]
    pids = launcher.child_pids()
    assert len(pids) == 3

    launcher.process.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout_s=30) == 0
    seen = records(fake_env)
    router_stopped = seen["router"]["stopped_at"]
    assert all(seen[f"shard-{r}"]["stopped_at"] >= router_stopped for r in (0, 1))
    assert not any(is_alive(pid) for pid in pids)
    assert socket_dirs(fake_env) == []


def test_sigkill_of_a_shard_tears_everything_down_naming_the_rank(launch, fake_env) -> None:
    launcher = launch("--num-shard", "2")
    launcher.wait_for_line("Shardline is ready", timeout_s=60)
    pids = launcher.child_pids()
    os.kill(records(fake_env)["shard-1"]["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    assert launcher.wait(timeout_s=10) == 1
    assert time.monotonic() - killed_at < 10
    error = next(e for e in launcher.events() if e["level"] == "ERROR")
    assert error["rank"] == 1 and "shard 1 was killed by SIGKILL" in error["message"]
    assert "serving on" in error["message"]
    assert not any(is_alive(pid) for pid in pids)
    assert socket_dirs(fake_env) == []


def test_a_shard_failing_at_startup_is_reported_with_its_last_lines(launch, fake_env) -> None:
    launcher = launch("--num-shard", "2", env={"FAKE_SHARD_CRASH_RANK": "0"})
    assert launcher.wait(timeout_s=30) == 1
    error = next(e for e in launcher.events() if e["level"] == "ERROR")
    assert "shard 0 exited with code 3" in error["message"]
    assert "CUDA out of memory (fake)" in error["message"]
    assert "router" not in records(fake_env)
    assert not any(is_alive(pid) for pid in launcher.child_pids())


def test_router_death_stops_the_shards(launch, fake_env) -> None:
    launcher = launch(env={"FAKE_ROUTER_EXIT_AFTER_S": "2"})
    launcher.wait_for_line("Shardline is ready", timeout_s=60)
    assert launcher.wait(timeout_s=15) == 1
    error = next(e for e in launcher.events() if e["level"] == "ERROR")
    assert "router exited with code 5" in error["message"]
    assert "lost the shards" in error["message"]
    assert not any(is_alive(pid) for pid in launcher.child_pids())


def test_sigterm_while_shards_load_stops_them(launch, fake_env) -> None:
    launcher = launch("--num-shard", "2", env={"FAKE_SHARD_LOAD_S": "60"})
    launcher.wait_for_line("loading weights rank=1", timeout_s=30)
    launcher.process.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout_s=15) == 0
    assert "router" not in records(fake_env)
    assert not any(is_alive(pid) for pid in launcher.child_pids())
    assert socket_dirs(fake_env) == []


def test_a_killed_launcher_takes_its_children_along(launch, fake_env) -> None:
    launcher = launch("--num-shard", "2")
    launcher.wait_for_line("Shardline is ready", timeout_s=60)
    pids = launcher.child_pids()
    launcher.process.kill()
    launcher.process.wait()
    deadline = time.monotonic() + 5
    while any(is_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(is_alive(pid) for pid in pids)


def test_text_output_prefixes_child_lines_with_their_name(fake_env, model_dir) -> None:
    argv = ["--model-id", str(model_dir), "--port", str(unused_port()), "--hostname", "127.0.0.1"]
    launcher = Launcher(argv, {**fake_env, "FAKE_SHARD_CRASH_RANK": "0"})
    assert launcher.wait(timeout_s=30) == 1
    assert "[shard 0] RuntimeError: CUDA out of memory (fake)" in launcher.lines


def test_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "shardline.launcher.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "text-generation-launcher 0.1.0"


def test_env_logs_the_runtime_environment(fake_env) -> None:
    argv = ["--env", "--json-output", "--model-id", "/no/such/model"]
    result = subprocess.run(
        [sys.executable, "-m", "shardline.launcher.cli", *argv],
        env={**fake_env, "NCCL_DEBUG": "WARN"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    report = json.loads(result.stderr.splitlines()[0])
    assert report["message"] == "runtime environment"
    assert report["env"]["NCCL_DEBUG"] == "WARN" and report["packages"]["torch"]


PROMPT = "the model server shard"


@pytest.fixture
def serve_tiny(tiny_llama_dir: Path, tmp_path: Path) -> Iterator:
    started: list[Launcher] = []
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "TMPDIR": str(tmp_path),
        "CUDA_VISIBLE_DEVICES": "",
    }

    def start(num_shard: int) -> tuple[Launcher, str]:
        argv = ["--model-id", str(tiny_llama_dir), "--num-shard", str(num_shard), "--json-output"]
        argv += ["--hostname", "127.0.0.1", "--port", str(unused_port())]
        argv += ["--master-port", str(unused_port()), *LIMITS]
        launcher = Launcher(argv, env)
        started.append(launcher)
        ready = launcher.wait_for_line("Shardline is ready", timeout_s=180)
        return launcher, json.loads(ready)["message"].split(" on ")[1]

    yield start
    for launcher in started:
        launcher.kill()


def post(url: str, body: dict) -> urllib.request.Request:
    data = json.dumps(body).encode()
    return urllib.request.Request(url, data, {"Content-Type": "application/json"})


@pytest.mark.slow
@pytest.mark.parametrize("num_shard", [1, 2])
def test_end_to_end_generate_equals_transformers(serve_tiny, tiny_llama_dir, num_shard) -> None:
    launcher, url = serve_tiny(num_shard)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 12, "details": True}}
    with urllib.request.urlopen(post(f"{url}/generate", body), timeout=60) as response:
        tokens = [t["id"] for t in json.load(response)["details"]["tokens"]]
    assert tokens == transformers_greedy(tiny_llama_dir, PROMPT, 12)
    launcher.process.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout_s=60) == 0


@pytest.mark.slow
def test_end_to_end_sigterm_during_a_stream_lets_it_finish(serve_tiny, tmp_path) -> None:
    launcher, url = serve_tiny(1)
    pids = launcher.child_pids()
    parameters = {"max_new_tokens": 150, "ignore_eos": True, "details": True}
    request = post(f"{url}/generate_stream", {"inputs": PROMPT, "parameters": parameters})
    events = []
    with urllib.request.urlopen(request, timeout=60) as response:
        for raw in response:
            if raw.startswith(b"data:"):
                events.append(json.loads(raw[5:]))
                if len(events) == 1:
                    launcher.process.send_signal(signal.SIGTERM)
    assert len(events) == 150
    assert events[-1]["details"]["finish_reason"] == "length"
    assert launcher.wait(timeout_s=60) == 0
    assert not any(is_alive(pid) for pid in pids)
    assert list(tmp_path.glob("shardline-*")) == []


@pytest.mark.slow
def test_end_to_end_sigkill_of_a_shard_exits_non_zero_naming_it(serve_tiny, tmp_path) -> None:
    launcher, _ = serve_tiny(2)
    pids = launcher.child_pids()
    shard_1 = next(int(e["pid"]) for e in launcher.events() if e["message"] == "shard 1 started")
    os.kill(shard_1, signal.SIGKILL)
    killed_at = time.monotonic()
    assert launcher.wait(timeout_s=10) == 1
    assert time.monotonic() - killed_at < 10
    error = next(e for e in launcher.events() if e["level"] == "ERROR")
    assert error["rank"] == 1 and "shard 1 was killed by SIGKILL" in error["message"]
    assert not any(is_alive(pid) for pid in pids)
    assert list(tmp_path.glob("shardline-*")) == []
