"""benchmarks/served_costs.py: the CPU seconds of a launcher's children and the router's timed
shard calls, read as serve_bench reads them; the run edges it and engine_bench print; its
all-at-once run sent from several processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from shardline_client.loadgen import LoadRequest

from benchmarks.burst_clients import run_burst
from benchmarks.served_costs import ServedCosts, tree_cpu
from benchmarks.timed_requests import run_edges
from shardline.router.metrics import RouterMetrics
from tests import mock_tgi
from tests.mock_tgi import MockTGI

mock = mock_tgi.mock

BURNER = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\ntime.sleep(60)\n"
SPAWNS_BURNER = "import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-m', 'burner'])\ntime.sleep(60)\n"


def test_tree_cpu_names_processes_by_module_or_script_and_counts_their_cpu(tmp_path):
    (tmp_path / "burner.py").write_text(BURNER)
    (tmp_path / "spawner.py").write_text(SPAWNS_BURNER)
    spawner = subprocess.Popen([sys.executable, str(tmp_path / "spawner.py")], cwd=tmp_path)
    try:
        deadline, burned = time.monotonic() + 20, {}
        while time.monotonic() < deadline:
            found = tree_cpu(os.getpid())
            burned = {k: v for k, v in found.items() if k.startswith("burner ")}
            if burned and max(burned.values()) >= 0.25:
                break
            time.sleep(0.1)
        assert len(burned) == 1 and max(burned.values()) >= 0.25
        assert f"spawner.py {spawner.pid}" in found  # a script by its name, not its interpreter's
        assert tree_cpu(spawner.pid).keys() == burned.keys()  # descendants only
    finally:
        for label in tree_cpu(spawner.pid):
            subprocess.run(["kill", label.rsplit(" ", 1)[1]], check=False)
        spawner.kill()
        spawner.wait()


async def test_since_gives_the_shard_calls_of_the_run_alone():
    metrics = RouterMetrics()
    metrics.batch_inference_duration.labels("decode").observe(0.5)

    async def exposition(request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", exposition)
    async with TestServer(app) as server:
        costs = await ServedCosts(0, str(server.make_url("")).rstrip("/")).start()
        for seconds in (0.25, 0.125):
            metrics.batch_inference_duration.labels("decode").observe(seconds)
        metrics.batch_forward_duration.labels("prefill").observe(2.0)
        spent = await costs.since()
    calls = spent["shard_calls"]
    assert calls["tgi_batch_inference_duration decode sum"] == pytest.approx(0.375)
    assert calls["tgi_batch_inference_duration decode count"] == 2
    assert calls["tgi_batch_forward_duration prefill sum"] == pytest.approx(2.0)
    assert spent["wall_s"] >= 0


def test_run_edges_follow_the_longest_requests_by_their_output_tokens():
    outputs = [5] * 20 + [900] * 10 + [7] * 5
    first = [0.5] * 20 + [2.0] * 9 + [3.0] + [0.1] * 5
    last = [1.0] * 20 + [9.0] * 9 + [12.5] + [13.0] * 5
    edges = run_edges(first, last, outputs)
    assert edges == {
        "first_token_s": 0.1,
        "longest_first_token_s": 2.1,
        "longest_last_token_s": 12.5,
        "last_token_s": 13.0,
    }


def test_a_burst_from_two_processes_keeps_the_requests_order(mock: MockTGI) -> None:
    requests = [LoadRequest(f"r{i}", {"max_new_tokens": 1 + i % 5}) for i in range(9)]
    report = run_burst(mock.url, requests, 2, timeout=30)
    assert not report.errors
    assert [len(timing.token_times) for timing in report.timings] == [1 + i % 5 for i in range(9)]
    # counted from the first process's start: every process waited for the others
    assert all(0 <= timing.sent_at < 1.0 for timing in report.timings)
    assert report.wall_s == max(t.sent_at + t.latency for t in report.timings)
