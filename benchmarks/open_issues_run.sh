#!/usr/bin/env bash
# What the open issues still need from one GPU (after session 9's runs, benchmarks/RESULTS.md),
# in priority order under one budget: the GPU tests changed since (FP8 decode attention in
# float16, prefills launching the next step, the attention bench's and GPU-idle tests); issue
# 22's FP8 + FP8-KV offline run in process and with the shard in its own process (the router's
# and the shard's Python on two cores); the paged decode kernel over ShareGPT-shaped context
# lengths (load balance by split count, bf16 and FP8 cache); issue 21's unshared workload with
# caching on and off; issue 22's bf16 / FP8 / FP8 + FP8-KV triple in one run (batch-1, 8k
# prefill, offline); kernel profiles of the offline run with its GPU idle gaps; the FP8 linears
# per M. Logs and JSON go to ${OUT:-/tmp/open}; STEPS (comma-separated names) runs a part.
#   bash benchmarks/open_issues_run.sh WHEELS_DIR BUDGET_SECONDS [STEPS]
set -u
wheels=${1:-.wheels}
deadline=$((SECONDS + ${2:-560}))
only=${3:-}
out=${OUT:-/tmp/open}
source "$(dirname "$0")/bench_steps.sh"
step gpu_tests 300 bash benchmarks/gpu_tests.sh 100 tests/test_gpu_fp8.py \
    tests/test_gpu_engine.py
step gpu_bench_tests 60 bash benchmarks/gpu_tests.sh 50 tests/test_triton_attention_bench.py \
    tests/test_gpu_idle.py
offline=("${bench[@]}" --shape 8b --model-dir /tmp/m8 --modes offline --max-num-seqs 512)
fp8_kv=(--quantize fp8 --kv-cache-dtype fp8_e4m3fn)
step offline_fp8_kv 110 "${offline[@]}" "${fp8_kv[@]}" --json "$out/offline_fp8_kv.json"
step offline_fp8_kv_process 110 "${offline[@]}" "${fp8_kv[@]}" --shard-process \
    --json "$out/offline_fp8_kv_process.json"
mixed=(python3 -m benchmarks.attention_kernels --no-prefill --batches 128,256,512 --contexts 2048
    --lengths mixed --workload "$work" --splits 1,2,4)
step attention_mixed 150 bash -c "${mixed[*]} --kv-dtype bf16 && ${mixed[*]} --kv-dtype \
    fp8_e4m3fn && python3 -m benchmarks.attention_kernels --no-prefill --batches 128,256,512 \
    --contexts 384,2048 --kv-dtype fp8_e4m3fn"
step prefix_unshared 200 python3 -m benchmarks.prefix_bench --model-dir /tmp/m8 \
    --workload "$work" --workloads unshared --json "$out/prefix_unshared.json"
single=(--shape 8b --model-dir /tmp/m8 --modes single,prefill,offline --max-num-seqs 512)
step bf16 190 "${bench[@]}" "${single[@]}" --json "$out/bf16.json"
step fp8 190 "${bench[@]}" "${single[@]}" --quantize fp8 --json "$out/fp8.json"
step fp8_kv 190 "${bench[@]}" "${single[@]}" "${fp8_kv[@]}" --json "$out/fp8_kv.json"
profile=("${bench[@]}" --shape 8b --model-dir /tmp/m8 --modes profile --max-num-seqs 512)
step profile_fp8_kv 150 "${profile[@]}" "${fp8_kv[@]}" --json "$out/profile_fp8_kv.json"
step profile_bf16 150 "${profile[@]}" --json "$out/profile_bf16.json"
step fp8_gemm 180 python3 -m benchmarks.fp8_gemm_bench
