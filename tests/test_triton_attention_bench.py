"""benchmarks/attention_kernels.py's decode problems: each row reads pages of its own, and the
mixed-lengths rows go through the real kernel with every split choice and KV dtype (the timing
itself, CUDA graphs and events, is stubbed: it runs on the GPU only).

Runs on CUDA; skipped elsewhere unless TRITON_INTERPRET=1 (about 10 s under the interpreter)."""

from tests.triton_device import DEVICE  # isort: skip (skips first)

import pytest
import torch

from benchmarks import attention_kernels as bench
from benchmarks.attention_kernels import (
    KV_DTYPES,
    DecodeProblem,
    MixedLengths,
    mixed_rows,
)
from shardline.shards.layers.attention.decode_plan import (
    BalancedPlan,
    DecodeConfig,
    SplitPlan,
)

BYTES_PER_KEY = 2 * bench.KV_HEADS * bench.HEAD_DIM * 2  # K and V, bf16


def test_each_row_reads_pages_of_its_own_in_every_round(monkeypatch):
    lengths = [1, 16, 17, 40]  # 1, 1, 2 and 3 pages of 16
    monkeypatch.setattr(bench, "ROTATION_BYTES", 3 * sum(lengths) * BYTES_PER_KEY)
    problem = DecodeProblem(lengths, 4, device=DEVICE.type)
    assert problem.rounds == 3
    assert problem.tables.shape == (3, 4, 4)
    assert problem.context_lens.tolist() == lengths
    assert problem.k_cache.shape[0] == 3 * 7
    used = [problem.tables[r, i, :n].tolist() for r in range(3) for i, n in enumerate([1, 1, 2, 3])]
    assert sorted(page for pages in used for page in pages) == list(range(21))
    unread = [
        problem.tables[r, i, n:].tolist() for r in range(3) for i, n in enumerate([1, 1, 2, 3])
    ]
    assert all(page == 0 for pages in unread for page in pages)
    q_and_out = 2 * 4 * bench.HEADS * bench.HEAD_DIM * 2
    assert problem.bytes_per_call == sum(lengths) * BYTES_PER_KEY + q_and_out


def test_the_uniform_problem_is_every_row_at_the_context(monkeypatch):
    monkeypatch.setattr(bench, "ROTATION_BYTES", 1)
    problem = DecodeProblem([40] * 3, 3, torch.float8_e4m3fn, DEVICE.type)
    assert problem.rounds == 1
    assert problem.k_cache.dtype == torch.float8_e4m3fn
    assert sorted(problem.tables.flatten().tolist()) == list(range(9))
    assert problem.bytes_per_call == 3 * 40 * BYTES_PER_KEY // 2 + 2 * 3 * 32 * 128 * 2


@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8_e4m3fn"])
def test_mixed_rows_run_every_split_choice_in_both_orders(monkeypatch, kv_dtype):
    monkeypatch.setattr(bench, "ROTATION_BYTES", 1)
    calls = []

    def run_once(problem: DecodeProblem, config, plan: SplitPlan | None) -> float:
        problem.run_round(config, plan)  # the real kernel, on the problem's tables
        calls.append((problem.context_lens.tolist(), plan))
        return 50.0

    monkeypatch.setattr(DecodeProblem, "time_per_call_us", run_once)
    mixed = MixedLengths([(20, 30), (70, 40)], [1, 3], [2], seed=5)
    rows = mixed_rows(2e12, [3], [96], KV_DTYPES[kv_dtype], mixed, DEVICE.type)

    assert len(rows) == 1 + 2 * 4
    assert rows[0].startswith(f"decode-mixed {kv_dtype} b=3   ctx=96    workload rows=3 keys")
    drawn = calls[0][0]
    assert all(21 <= n <= 96 for n in drawn)
    assert [lengths for lengths, _ in calls] == [drawn] * 4 + [sorted(drawn, reverse=True)] * 4
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE.type == "cuda" else 1
    _, chosen = bench.planned(3, 96, KV_DTYPES[kv_dtype], sms)  # 2 splits on a GPU
    assert [plan for _, plan in calls] == [chosen, SplitPlan(1), SplitPlan(3), BalancedPlan(2)] * 2
    choices = [f"plan({bench.plan_name(chosen)})", "1", "3", "bal2"] * 2
    assert [row.split("splits=")[1].split()[0] for row in rows[1:]] == choices
    assert all("order=random " in row for row in rows[1:5])
    assert all("order=longest" in row for row in rows[5:])
    key_bytes = BYTES_PER_KEY // (1 if kv_dtype == "bf16" else 2)
    gbs = (sum(drawn) * key_bytes + 2 * 3 * 32 * 128 * 2) / 50e-6 / 1e9
    assert f"{gbs:7.0f} GB/s  {gbs * 1e9 / 2e12:5.1%} of copy" in rows[1]


def test_the_command_line_reads_the_workload_and_the_split_counts(monkeypatch, tmp_path, capsys):
    workload = tmp_path / "w.jsonl"
    workload.write_text('{"input_len": 5, "output_len": 9}\n{"input_len": 7, "output_len": 2}\n')
    seen = []

    def rows(bandwidth, batches, contexts, kv_dtype, mixed):
        seen.append((batches, contexts, kv_dtype, mixed))
        return ["mixed row"]

    monkeypatch.setattr(bench, "mixed_rows", rows)
    monkeypatch.setattr(bench, "copy_bandwidth", lambda: 3e12)
    monkeypatch.setattr(bench, "matmul_rate", lambda: 8e14)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "card")
    argv = "--no-prefill --batches 256,512 --contexts 2048 --lengths mixed --splits 1,2,4"
    argv += f" --kv-dtype fp8_e4m3fn --seed 3 --workload {workload} --balanced 4,8"
    argv += " --configs n32w4s5,n128w8s2 --orders longest"
    monkeypatch.setattr("sys.argv", ["attention_kernels", *argv.split()])
    bench.main()
    configs = (DecodeConfig(32, 4, 5), DecodeConfig(128, 8, 2))
    mixed = MixedLengths([(5, 9), (7, 2)], [1, 2, 4], [4, 8], 3, configs, ("longest",))
    assert seen == [([256, 512], [2048], torch.float8_e4m3fn, mixed)]
    assert capsys.readouterr().out.splitlines()[1:] == ["mixed row"]
