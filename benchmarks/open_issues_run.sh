#!/usr/bin/env bash
# What the open issues still need from one GPU (after session 8's runs, benchmarks/RESULTS.md),
# in priority order under one budget: the GPU tests changed since (FP8: graphs on/off, the
# small-M FP8 GEMM), issue 27's offline run longest first all at once vs paced
# (shardline/offline_pacing.py), the FP8 GEMM shapes (to set its row threshold), the paged
# decode kernel with a bf16 vs FP8 cache and its tile sweep (FP8 KV barely sped up large
# decode steps in session 8), issue 22's bf16 / FP8 / FP8 + FP8-KV triple in one run (batch-1,
# 8k prefill, offline), issue 21's multi-turn chat and unshared workloads with caching on and
# off, and kernel profiles of the offline run in bf16 and FP8 (GPU busy vs idle: where issue
# 27's and 22's remaining seconds go). Logs and JSON go to ${OUT:-/tmp/open}; STEPS
# (comma-separated names) runs a part.
#   bash benchmarks/open_issues_run.sh WHEELS_DIR BUDGET_SECONDS [STEPS]
set -u
wheels=${1:-.wheels}
deadline=$((SECONDS + ${2:-560}))
only=${3:-}
out=${OUT:-/tmp/open}
source "$(dirname "$0")/bench_steps.sh"
single=(--shape 8b --model-dir /tmp/m8 --modes single,prefill,offline --max-num-seqs 512)
profile=("${bench[@]}" --shape 8b --model-dir /tmp/m8 --modes profile --max-num-seqs 512)
step gpu_tests 300 bash benchmarks/gpu_tests.sh 100 tests/test_gpu_fp8.py \
    tests/test_gpu_engine.py tests/test_gpu_prefix_cache.py
offline=("${bench[@]}" --shape 8b --model-dir /tmp/m8 --modes offline --max-num-seqs 512)
step offline_longest 100 "${offline[@]}" --submission longest --json "$out/offline_longest.json"
step offline_paced 100 "${offline[@]}" --submission paced --json "$out/offline_paced.json"
step fp8_gemm 180 python3 -m benchmarks.fp8_gemm_bench
attention=(python3 -m benchmarks.attention_kernels --sweep --no-prefill --batches 64,256,512
    --contexts 512,2048)
step decode_attention_kv 240 bash -c "${attention[*]} --kv-dtype bf16 && ${attention[*]} \
    --kv-dtype fp8_e4m3fn"
step bf16 190 "${bench[@]}" "${single[@]}" --json "$out/bf16.json"
step fp8 190 "${bench[@]}" "${single[@]}" --quantize fp8 --json "$out/fp8.json"
step fp8_kv 190 "${bench[@]}" "${single[@]}" --quantize fp8 --kv-cache-dtype fp8_e4m3fn \
    --json "$out/fp8_kv.json"
step prefix_chat_unshared 330 python3 -m benchmarks.prefix_bench --model-dir /tmp/m8 \
    --workload "$work" --workloads chat,unshared --json "$out/prefix_chat_unshared.json"
step profile_bf16 150 "${profile[@]}" --json "$out/profile_bf16.json"
step profile_fp8_kv 150 "${profile[@]}" --quantize fp8 --kv-cache-dtype fp8_e4m3fn \
    --json "$out/profile_fp8_kv.json"
