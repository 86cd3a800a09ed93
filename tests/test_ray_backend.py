"""`--distributed-executor-backend ray`: a local Ray cluster (`ray start --head` on this machine,
two CPUs) places the two shards of TP 2 as actors; served through HTTP token-exact, everything
stopped with the launcher."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import unused_port

from tests.launcher_harness import LIMITS, Launcher, is_alive, transformers_greedy

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parent.parent
PROMPT = "the model server"


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A one-node Ray cluster started for this module, in its own process group, killed as a
    group (`ray stop` would stop every Ray process of the machine)."""
    port = unused_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    argv = ["ray", "start", "--head", "--block", "--port", str(port), "--num-cpus", "2"]
    argv += ["--num-gpus", "0", "--include-dashboard=false", "--disable-usage-stats"]
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), *argv[1:], "--temp-dir", temp_dir],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert head.stdout is not None
    for line in head.stdout:
        if "will now block" in line:
            break
    try:
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # its state lives in temp_dir, dropped too
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def started_pids(launcher: Launcher) -> list[int]:
    """The pids the launcher logged as started (its lines beside Ray's own)."""
    pids = []
    for line in launcher.lines:
        if line.startswith("{"):
            event = json.loads(line)
            if str(event["message"]).endswith(" started"):
                pids.append(int(event["pid"]))
    return pids


def test_ray_places_tensor_parallel_shards(ray_address, tiny_llama_dir, tmp_path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "TMPDIR": str(tmp_path),
        "CUDA_VISIBLE_DEVICES": "",
        "RAY_ADDRESS": ray_address,
    }
    env.pop("SHARDLINE_CLUSTER_TOKEN", None)  # the launcher makes one for the run
    argv = ["--model-id", str(tiny_llama_dir), "--num-shard", "2", *LIMITS, "--json-output"]
    argv += ["--distributed-executor-backend", "ray"]
    argv += ["--hostname", "127.0.0.1", "--port", str(unused_port())]
    launcher = Launcher(argv, env)
    try:
        ready = launcher.wait_for_line("Shardline is ready", timeout_s=180)
        url = json.loads(ready)["message"].split(" on ")[1]
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "details": True}}
        request = urllib.request.Request(
            f"{url}/generate", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            tokens = [t["id"] for t in json.load(response)["details"]["tokens"]]
        assert tokens == transformers_greedy(tiny_llama_dir, PROMPT, 8)
        pids = started_pids(launcher)
        assert len(pids) == 3  # two shards (in their actors) and the router
        launcher.process.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout_s=60) == 0
    finally:
        launcher.kill()
    deadline = time.monotonic() + 10
    while any(is_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(is_alive(pid) for pid in pids)
