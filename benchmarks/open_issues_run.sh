#!/usr/bin/env bash
# What the open issues still need from one GPU (after session 17, benchmarks/RESULTS.md), in
# priority order under one budget: the GPU tests (gpu_tests, with the one-row GEMVs' FP8 tilings
# of session 17; gpu_fp8_gemm_tests); the FP8 decode attention's tilings (attention_fp8: the FP8
# run's largest loss, 50 % of copy; more warps an SM lost, session 17); torch's bf16 GEMMs
# through cuBLASLt against cuBLAS (bf16_gemm_blas: 2-4 % faster to 192 rows, session 17); the
# decode step's small kernels against copy (step_kernels); the kernel
# profiles, split by call kind with the GEMM and attention rates achieved; the paced offline run
# beside the served ones (fcfs and --scheduling-policy paced); the FP8 + FP8-KV offline run
# beside bf16 (issue 22's ratio); issue 22's bf16 / FP8 / FP8 + FP8-KV triple (batch-1, 8k
# prefill, offline); the host's Python under py-spy; the FP8 linears per M. Logs and JSON go to
# ${OUT:-/tmp/open} (a device call brings back 8 files: name few steps); STEPS (comma-separated
# names) runs a part. Runs on one machine differ by up to ~12 % from another's, and the first
# served run on a machine is the slower one: compare within a call, base first.
# Not yet run: offline_fp8_process (after offline_fp8_kv, its reference), served_8b_paced_clients
# (after served_8b_paced; session 28).
#   bash benchmarks/open_issues_run.sh WHEELS_DIR BUDGET_SECONDS [STEPS]
set -u
wheels=${1:-.wheels}
deadline=$((SECONDS + ${2:-560}))
only=${3:-}
out=${OUT:-/tmp/open}
source "$(dirname "$0")/bench_steps.sh"
step gpu_tests 400 bash benchmarks/gpu_tests.sh 100 tests/test_triton_attention.py \
    tests/test_triton_alibi.py tests/test_gpu_fp8.py tests/test_triton_layers.py tests/test_gpu_engine.py
# the Triton FP8 GEMM of decode-sized calls (session 15), its tilings against cuBLASLt's
step gpu_fp8_gemm_tests 200 bash benchmarks/gpu_tests.sh 100 tests/test_triton_fp8_gemm.py \
    tests/test_gpu_fp8.py
# The engine's FP8 tilings against cuBLASLt's per layer and rows (session 15-16: Triton wins
# at 9-128 rows only; a 128-256-row step in one row block lost on every layer)
step fp8_gemm_tilings 200 python3 -m benchmarks.fp8_gemm_bench --rows 16,64,128,192,256 \
    --layers qkv,o,gate_up,down
# The FP8 GEMV's tilings at one row (the batch-1 path; session 12: qkv / o / down at 76 / 68 /
# 85 % of copy under tilings tuned on bf16 weights of the 1.7B shape)
step gemv_fp8_tilings 120 python3 -m benchmarks.fp8_gemm_bench --rows 1 --layers \
    qkv,o,gate_up,down --tilings= --gemv-tilings \
    n1k2048w4,n2k2048w4,n4k1024w4,n4k2048w4,n4k2048w8,n8k1024w8,n8k2048w8,n2k4096w8,n2k1024w2
# torch's bf16 GEMMs through cuBLAS, then cuBLASLt, at the bf16 run's decode rows (one process
# each: the library is chosen per process)
bf16_rows=(python3 -m benchmarks.fp8_gemm_bench --rows 64,128,192,256,320 --layers \
    qkv,o,gate_up,down --tilings=)
step bf16_gemm_blas 200 bash -c "${bf16_rows[*]} --blas cublas && ${bf16_rows[*]} --blas cublaslt"
# the decode step's RMSNorm, SiLU * up and rotary + KV write at the offline run's rows, against
# copy (bf16 run: ~0.5 s of the decode steps' GPU time)
step step_kernels 120 python3 -m benchmarks.step_kernels_bench
step gpu_bench_tests 60 bash benchmarks/gpu_tests.sh 50 tests/test_triton_attention_bench.py \
    tests/test_gpu_idle.py
fp8_kv=(--quantize fp8 --kv-cache-dtype fp8_e4m3fn)
offline=("${bench[@]}" --shape 8b --model-dir /tmp/m8 --modes offline --max-num-seqs 512)
step offline_paced 110 "${offline[@]}" --json "$out/offline_paced.json"  # the reference
step offline_fp8_kv 110 "${offline[@]}" "${fp8_kv[@]}" \
    --json "$out/offline_fp8_kv.json"
# The FP8 run with the shard in its own process (no meter there: compare output tok/s with
# offline_fp8_kv's, run first; a 0.5 ms GIL switch interval did not help, session 27)
step offline_fp8_process 110 "${offline[@]}" "${fp8_kv[@]}" --shard-process \
    --json "$out/offline_fp8_process.json"
# the served run's admission (all at once, in arrival order) played offline: served >= 95 % of
# this isolates the router and HTTP path from the offline API's pacing (session 12: served 88 %
# of the paced offline run)
step offline_arrival 110 "${offline[@]}" --submission arrival --json "$out/offline_arrival.json"
step served_8b 260 python3 -m benchmarks.serve_bench --model-dir /tmp/m8 --num-shards 1 \
    --workload "$work" --rate 4 --rate-requests 300 --json "$out/served_8b.json"
# FP8 served, Poisson 4 req/s (session 16: ~5 requests at once, most steps on the GEMV path;
# latency equal with and without the Triton FP8 GEMM once the base served first)
fp8_server="--dtype bfloat16 --max-input-tokens 1024 --max-total-tokens 2048 \
--max-batch-prefill-tokens 8192 --max-concurrent-requests 2048 --max-batch-size 512 \
--quantize fp8 --kv-cache-dtype fp8_e4m3fn"
step served_8b_fp8 260 python3 -m benchmarks.serve_bench --model-dir /tmp/m8 --num-shards 1 \
    --workload "$work" --rate 4 --rate-requests 300 --json "$out/served_8b_fp8.json" \
    --launcher-args "$fp8_server"
# FP8 served all at once with the offline admission (session 16: fcfs served 13.4-13.9k against
# 15.8k offline, 85-88 %; the bar is 95 %)
step served_8b_fp8_paced 200 python3 -m benchmarks.serve_bench --model-dir /tmp/m8 \
    --num-shards 1 --workload "$work" --scheduling-policy paced --launcher-args "$fp8_server" \
    --json "$out/served_8b_fp8_paced.json"
# the same burst with the server admitting as the offline LLM does (router/paced_admission.py):
# served against offline_paced with one admission rule (session 27: 94.4-94.7 %); its
# `all_at_once_costs` line gives each process's CPU seconds and the router's shard-call seconds
served_paced=(python3 -m benchmarks.serve_bench --model-dir /tmp/m8 --num-shards 1 --workload
    "$work" --scheduling-policy paced)
step served_8b_paced 200 "${served_paced[@]}" --json "$out/served_8b_paced.json"
# the same burst from 4 client processes (one Python process takes ~1.2 s to send 1,000 streams:
# session 28's whole served gap), against served_8b_paced on one machine
step served_8b_paced_clients 200 "${served_paced[@]}" --client-processes 4 \
    --json "$out/served_8b_paced_clients.json"
# the same with 8 tokenizer workers in the router (TGI's default 2): the burst's 1,000 prompts
# are tokenized inside the timed run (the offline run's before its clock)
step served_8b_paced_workers 200 "${served_paced[@]}" --json "$out/served_8b_paced_workers.json" \
    --more-launcher-args "--validation-workers 8"
# the same under py-spy (every process of the server, all threads, GIL or not), by function
python3 -m pip install -q --no-index --no-deps --target /tmp/spy "$wheels"/spy/*.whl >/dev/null 2>&1
step served_8b_paced_spy 220 bash -c "/tmp/spy/bin/py-spy record --subprocesses --rate 100 \
    --format raw -o $out/spy_served.txt -- ${served_paced[*]} && python3 -m benchmarks.spy_summary \
    $out/spy_served.txt 30"
fp8_mixed=(python3 -m benchmarks.attention_kernels --no-prefill --batches 64,128,256,512
    --contexts 2048 --lengths mixed --workload "$work" --orders random --kv-dtype fp8_e4m3fn)
# The default n128w4s5 holds 201 registers a thread: 2 programs, 8 warps an SM on an H100
# (`benchmarks/kernel_resources.py`, session 16); n64w8s5, n32w4s5 and n32w2s5 hold 14-16 warps
# an SM (fewer stages than 5 only drop to one buffer, and free no registers)
step attention_fp8 150 bash -c "${fp8_mixed[*]} --splits 1 --balanced '' --configs \
    n128w4s5,n64w8s5,n32w4s5,n32w2s5,n64w4s5"
# The bf16 default, balanced n64w4s5 (2 programs, 8 warps an SM by its 192 registers), against
# tilings that hold 12-16 warps an SM (kernel_resources, session 17: n64w8s3 2 / 16, n64w4s3 and
# n32w4s3 3 / 12), at 2 (the plan) and 3 programs an SM: the bf16 run's decode attention is at
# 81 % of copy
bf16_mixed=("${fp8_mixed[@]/fp8_e4m3fn/bf16}")
step attention_bf16 180 bash -c "${bf16_mixed[*]} --splits '' --balanced 3 --configs \
    n64w4s5,n64w8s3,n64w4s3,n32w4s3,n32w4s5"
profile=("${bench[@]}" --shape 8b --model-dir /tmp/m8 --modes profile --max-num-seqs 512)
step profile_fp8_kv 150 "${profile[@]}" "${fp8_kv[@]}" --json "$out/profile_fp8_kv.json"
for budget in 2048 512; do
    step "offline_budget_$budget" 110 "${offline[@]}" --max-num-batched-tokens "$budget" \
        --json "$out/offline_budget_$budget.json"
done
step offline_pace_3 110 "${offline[@]}" --pace-factor 3 --json "$out/offline_pace_3.json"
single=(--shape 8b --model-dir /tmp/m8 --modes single,prefill,offline --max-num-seqs 512)
step bf16 190 "${bench[@]}" "${single[@]}" --json "$out/bf16.json"
step fp8 190 "${bench[@]}" "${single[@]}" --quantize fp8 --json "$out/fp8.json"
step fp8_kv 190 "${bench[@]}" "${single[@]}" "${fp8_kv[@]}" --json "$out/fp8_kv.json"
mixed=(python3 -m benchmarks.attention_kernels --no-prefill --batches 64,128,256,512 --contexts 2048
    --lengths mixed --workload "$work" --splits 1,2 --balanced 2 --orders random)
step attention_mixed 150 bash -c "${mixed[*]} --kv-dtype bf16 && ${mixed[*]} --kv-dtype \
    fp8_e4m3fn && python3 -m benchmarks.attention_kernels --no-prefill --batches 128,256,512 \
    --contexts 384,2048 --kv-dtype fp8_e4m3fn --sweep"
step profile_bf16 150 "${profile[@]}" --json "$out/profile_bf16.json"
# The host's Python during the bf16 offline run (sampled while holding the GIL), summarized by
# function; the raw stacks stay in $out.
spy=(/tmp/spy/bin/py-spy record --gil --rate 250 --format raw -o "$out/spy_bf16.txt" --)
step spy_bf16 150 bash -c "${spy[*]} ${offline[*]} && python3 -m benchmarks.spy_summary \
    $out/spy_bf16.txt 45"
