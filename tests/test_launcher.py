"""text-generation-launcher: flags and env vars, child commands, supervision through real processes.

The supervision tests run the real launcher with stand-in shard and router executables (small
Python programs in tests/data) first on PATH; the end-to-end tests run the real shards and router.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import unused_port

from shardline.launcher.args import parse_args, resolve_num_shard
from shardline.launcher.commands import router_spec
from shardline.launcher.env_report import runtime_environment
from shardline.launcher.output import ChildOutput
from shardline.launcher.shards import ShardLaunch, shard_config, shard_spec

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parent.parent
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}


# ---- flags and environment variables ------------------------------------------------------------


def test_defaults_are_tgis() -> None:
    args = parse_args([], CPU_ONLY)
    assert (args.hostname, args.port) == ("0.0.0.0", 3000)
    assert (args.master_addr, args.master_port) == ("localhost", 29500)
    assert args.max_concurrent_requests == 128
    assert (args.max_best_of, args.max_stop_sequences, args.max_top_n_tokens) == (2, 4, 5)
    assert (args.waiting_served_ratio, args.max_waiting_tokens) == (0.3, 20)
    assert args.max_input_tokens is None and args.max_batch_prefill_tokens is None
    assert args.model_id is None and args.shard_uds_path is None
    assert args.num_shard == 1 and args.json_output is False


def test_every_flag_reads_tgis_environment_variable() -> None:
    environ = {
        **CPU_ONLY,
        "MODEL_ID": "org/model",
        "REVISION": "v1",
        "NUM_SHARD": "2",
        "PORT": "8080",
        "HOSTNAME": "127.0.0.1",
        "DTYPE": "bfloat16",
        "MAX_INPUT_TOKENS": "100",
        "MAX_TOTAL_TOKENS": "200",
        "MAX_BATCH_PREFILL_TOKENS": "300",
        "MAX_BATCH_TOTAL_TOKENS": "4000",
        "MAX_BATCH_SIZE": "8",
        "WAITING_SERVED_RATIO": "1.2",
        "MAX_WAITING_TOKENS": "10",
        "MAX_CONCURRENT_REQUESTS": "7",
        "CUDA_GRAPHS": "1,2",
        "CUDA_MEMORY_FRACTION": "0.5",
        "SHARD_UDS_PATH": "/tmp/x/sock",
        "MASTER_ADDR": "127.0.0.2",
        "MASTER_PORT": "29600",
        "API_KEY": "secret",
        "JSON_OUTPUT": "true",
        "TRUST_REMOTE_CODE": "1",
        "ATTENTION": "torch",
    }
    args = parse_args([], environ)
    assert (args.model_id, args.revision, args.num_shard) == ("org/model", "v1", 2)
    assert (args.port, args.hostname, args.dtype) == (8080, "127.0.0.1", "bfloat16")
    assert (args.max_input_tokens, args.max_total_tokens) == (100, 200)
    assert (args.max_batch_prefill_tokens, args.max_batch_total_tokens) == (300, 4000)
    assert (args.max_batch_size, args.waiting_served_ratio, args.max_waiting_tokens) == (8, 1.2, 10)
    assert (args.max_concurrent_requests, args.cuda_graphs) == (7, "1,2")
    assert (args.cuda_memory_fraction, args.shard_uds_path) == (0.5, "/tmp/x/sock")
    assert (args.master_addr, args.master_port, args.api_key) == ("127.0.0.2", 29600, "secret")
    assert args.json_output and args.trust_remote_code and args.attention == "torch"


def test_a_flag_wins_over_its_environment_variable() -> None:
    args = parse_args(
        ["--port", "9000", "--gpu-memory-utilization", "0.8"], {**CPU_ONLY, "PORT": "1"}
    )
    assert args.port == 9000 and args.cuda_memory_fraction == 0.8


def test_an_invalid_environment_value_names_the_variable(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args([], {**CPU_ONLY, "PORT": "eighty"})
    assert exit_info.value.code == 2
    assert "PORT='eighty'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("sharded", "num_shard", "gpus", "expected"),
    [
        (None, None, "", 1),
        (None, None, "0,1,2,3", 4),
        (None, 2, "", 2),
        (False, None, "0,1", 1),
        (True, None, "0,1", 2),
        (True, 4, "", 4),
    ],
)
def test_shard_count_follows_tgis_rules(sharded, num_shard, gpus, expected) -> None:
    environ = {"CUDA_VISIBLE_DEVICES": gpus}
    assert resolve_num_shard(sharded, num_shard, environ) == expected


@pytest.mark.parametrize(("sharded", "num_shard"), [(False, 2), (True, 1), (None, 0), (True, None)])
def test_contradictory_shard_settings_are_refused(sharded, num_shard) -> None:
    with pytest.raises(ValueError):
        resolve_num_shard(sharded, num_shard, {"CUDA_VISIBLE_DEVICES": "0"})


def test_shard_command_and_environment(tmp_path: Path) -> None:
    args = parse_args(
        ["--num-shard", "2", "--dtype", "float32", "--block-size", "32", "--json-output"], CPU_ONLY
    )
    environ = {"PATH": os.environ["PATH"], "NCCL_DEBUG": "INFO", "NVSHMEM_X": "1"}
    config, launch = shard_config(args, tmp_path), ShardLaunch.from_args(args, "/run/s/shard")
    spec = shard_spec(config, launch, 1, environ)
    assert spec.argv[1:3] == ["serve", str(tmp_path)]
    expected = "--rank 1 --world-size 2 --uds-path /run/s/shard --master-addr localhost "
    expected += (
        "--master-port 29500 --dtype float32 --block-size 32 --json-output --logger-level INFO"
    )
    assert " ".join(spec.argv[3:]) == expected
    env = spec.env
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("1", "1", "2")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("localhost", "29500")
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert env["NCCL_DEBUG"] == "INFO" and env["NVSHMEM_X"] == "1"
    kept = shard_spec(config, launch, 0, {**environ, "NCCL_NVLS_ENABLE": "1"}).env
    assert kept["NCCL_NVLS_ENABLE"] == "1"
    tgi_level = {**environ, "LOG_LEVEL": "debug,text_generation_router=info"}
    assert shard_spec(config, launch, 0, tgi_level).argv[-2:] == ["--logger-level", "DEBUG"]


def test_router_command_passes_limits_only_when_set(tmp_path: Path) -> None:
    args = parse_args(["--max-input-tokens", "64", "--api-key", "k", "--port", "81"], CPU_ONLY)
    argv = router_spec(args, tmp_path, "/run/s/shard", {"PATH": os.environ["PATH"]}).argv
    options = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert options["--master-shard-uds-path"] == "/run/s/shard-0"
    assert options["--tokenizer-name"] == str(tmp_path)
    assert options["--model-id"] == "smollm2-135m-instruct"
    assert (options["--port"], options["--max-input-tokens"], options["--api-key"]) == (
        "81",
        "64",
        "k",
    )
    assert options["--shutdown-timeout"] == "60.0"
    assert options["--shard-step-timeout"] == "60.0"
    assert "--max-total-tokens" not in argv and "--json-output" not in argv


def test_json_output_tags_child_lines_with_process_and_rank(tmp_path: Path) -> None:
    args = parse_args(["--num-shard", "2"], CPU_ONLY)
    launch = ShardLaunch.from_args(args, "/s")
    spec = shard_spec(shard_config(args, tmp_path), launch, 1, {"PATH": os.environ["PATH"]})
    path = tmp_path / "out.log"
    with path.open("w") as stream:
        output = ChildOutput(json_output=True, stream=stream)
        output.write(spec, "plain text")
        output.write(spec, json.dumps({"level": "WARNING", "message": "from the shard"}))
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert events[0]["message"] == "plain text" and events[0]["rank"] == 1
    assert events[1]["level"] == "WARNING" and events[1]["process"] == "shard"


def test_env_report_redacts_secrets() -> None:
    report = runtime_environment({"HF_TOKEN": "hf_abc", "NCCL_DEBUG": "INFO", "HOME": "/root"})
    assert report["env"] == {"HF_TOKEN": "<redacted>", "NCCL_DEBUG": "INFO"}
    assert report["packages"]["torch"]


# ---- the launcher as a process ------------------------------------------------------------------


class Launcher:
    """A running text-generation-launcher; its stderr collected line by line."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "shardline.launcher.cli", *argv],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for_line(self, text: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = next((line for line in self.lines if text in line), None)
            if found is not None:
                return found
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no line with {text!r}; output:\n" + "\n".join(self.lines))

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.lines]

    def child_pids(self) -> list[int]:
        return [int(e["pid"]) for e in self.events() if str(e["message"]).endswith(" started")]

    def wait(self, timeout_s: float) -> int:
        code = self.process.wait(timeout=timeout_s)
        self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def is_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] != "Z"


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


# ---- end to end: the real shards and router -----------------------------------------------------

LIMITS = ["--max-input-tokens", "128", "--max-total-tokens", "512"]
LIMITS += ["--max-batch-prefill-tokens", "512", "--kv-cache-bytes", str(64 << 20)]
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


def transformers_greedy(model_dir: Path, prompt: str, max_new_tokens: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs.input_ids.shape[1] :].tolist()


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
