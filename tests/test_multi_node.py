"""Several nodes: two launchers on this machine (node ranks 0 and 1 on 127.0.0.1), each with one
shard of a two-stage pipeline; node 0 serves HTTP. The nodes authenticate each other, the
router's calls to the other node carry the cluster token, and a node that dies or never joins
brings every launcher down with exit 1."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from aiohttp.test_utils import unused_port

from shardline.proto import generate_pb2, generate_pb2_grpc
from tests.launcher_harness import LIMITS, Launcher, is_alive, transformers_greedy

REPO = Path(__file__).resolve().parent.parent
PROMPT = "the model server"
TOKEN = "test-cluster-secret"


def free_port_run(length: int = 3) -> int:
    """A port p with p .. p + length - 1 free: rendezvous, node 0's launcher, node 1's shard."""
    while True:
        base = unused_port()
        try:
            for port in range(base, base + length):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator:
    started: list[Launcher] = []
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "TMPDIR": str(tmp_path),
        "CUDA_VISIBLE_DEVICES": "",
        "SHARDLINE_CLUSTER_TOKEN": TOKEN,
    }

    def start(node_rank: int, master_port: int, *extra: str, token: str = TOKEN) -> Launcher:
        argv = ["--nnodes", "2", "--node-rank", str(node_rank), "--json-output"]
        argv += ["--master-addr", "127.0.0.1", "--master-port", str(master_port), *extra]
        launcher = Launcher(argv, {**env, "SHARDLINE_CLUSTER_TOKEN": token})
        started.append(launcher)
        return launcher

    yield start
    for launcher in started:
        launcher.kill()


def post(url: str, body: dict) -> urllib.request.Request:
    data = json.dumps(body).encode()
    return urllib.request.Request(url, data, {"Content-Type": "application/json"})


def test_two_nodes_serve_a_pipeline_and_fall_together(nodes, tiny_llama_dir: Path) -> None:
    base = free_port_run()
    model = ["--model-id", str(tiny_llama_dir), "--num-shard", "1", *LIMITS]
    model += ["--pipeline-parallel-size", "2", "--max-batch-size", "1"]
    leader = nodes(0, base, *model, "--hostname", "127.0.0.1", "--port", str(unused_port()))
    worker = nodes(1, base, *model)
    ready = leader.wait_for_line("Shardline is ready", timeout_s=180)
    url = json.loads(ready)["message"].split(" on ")[1]

    def generate(max_new_tokens: int) -> list[int]:
        parameters = {"max_new_tokens": max_new_tokens, "details": True}
        body = {"inputs": PROMPT, "parameters": parameters}
        with urllib.request.urlopen(post(f"{url}/generate", body), timeout=60) as response:
            return [t["id"] for t in json.load(response)["details"]["tokens"]]

    with ThreadPoolExecutor(2) as pool:  # two batches of one, in flight at once (PP 2)
        answers = list(pool.map(generate, [8, 24]))
    expected = transformers_greedy(tiny_llama_dir, PROMPT, 24)
    assert answers == [expected[:8], expected]
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    overlapped = next(m for m in metrics.splitlines() if m.startswith("shardline_batch_steps_ov"))
    assert float(overlapped.split()[-1]) > 0

    with grpc.insecure_channel(f"127.0.0.1:{base + 2}") as channel:  # node 1's shard
        stub = generate_pb2_grpc.TextGenerationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Health(generate_pb2.HealthRequest(), timeout=5)
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED

    pids = leader.child_pids() + worker.child_pids()
    assert len(pids) == 3  # two shards and the router
    worker.process.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    assert leader.wait(timeout_s=10) == 1
    assert time.monotonic() - killed < 10
    assert any("node 1 left the group" in line for line in leader.lines)
    deadline = time.monotonic() + 5
    while any(is_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(is_alive(pid) for pid in pids)


def test_a_node_without_the_token_never_joins_and_both_exit(nodes, tiny_llama_dir: Path) -> None:
    base = free_port_run()
    model = ["--model-id", str(tiny_llama_dir), "--rendezvous-timeout", "3"]
    leader = nodes(0, base, *model)
    intruder = nodes(1, base, *model, token="a-wrong-secret")
    assert intruder.wait(timeout_s=30) == 1
    assert leader.wait(timeout_s=30) == 1
    assert any("refused this node" in line for line in intruder.lines)
    assert any("refused a node" in line for line in leader.lines)
    assert any("node(s) 1 did not join within 3 s" in line for line in leader.lines)
    assert leader.child_pids() == [] and intruder.child_pids() == []


def test_a_lonely_worker_and_a_missing_token_are_clear_errors(nodes, tiny_llama_dir) -> None:
    model = ["--model-id", str(tiny_llama_dir), "--rendezvous-timeout", "1"]
    lonely = nodes(1, free_port_run(), *model)
    assert lonely.wait(timeout_s=30) == 1
    assert any("could not be reached within 1 s" in line for line in lonely.lines)
    untrusted = nodes(0, free_port_run(), *model, token="")
    assert untrusted.wait(timeout_s=30) == 1
    assert any("SHARDLINE_CLUSTER_TOKEN" in line for line in untrusted.lines)


def test_a_worker_whose_node_0_dies_exits_too(nodes, tiny_llama_dir: Path) -> None:
    base = free_port_run()
    model = ["--model-id", str(tiny_llama_dir), "--num-shard", "1", *LIMITS]
    model += ["--pipeline-parallel-size", "2"]
    leader = nodes(0, base, *model, "--hostname", "127.0.0.1", "--port", str(unused_port()))
    worker = nodes(1, base, *model)
    worker.wait_for_line("joined node 0", timeout_s=60)
    leader.process.send_signal(signal.SIGKILL)
    assert worker.wait(timeout_s=15) == 1
    assert any("node 0 left the group" in line for line in worker.lines)
    deadline = time.monotonic() + 5
    while any(is_alive(pid) for pid in worker.child_pids()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(is_alive(pid) for pid in worker.child_pids())
