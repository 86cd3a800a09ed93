#!/usr/bin/env bash
# Issue 22's figures on one GPU (FP8), each step under a time limit that the whole run's budget
# caps: the 8B shape offline (1,000 ShareGPT-shaped requests, at most 512 at once), batch-1
# decode against its roofline and an 8,192-token prefill, with bf16 weights, FP8 weights, FP8
# weights with an FP8 KV cache, and those with the LM head in FP8 too (SHARDLINE_FP8_LM_HEAD=1),
# all in one run on one card; then the FP8 GPU tests. Logs and
# JSON go to ${OUT:-/tmp/issue22}; each step ends with its table. STEPS (comma-separated names)
# runs a part, so that the whole fits two device calls.
#   bash benchmarks/issue22_run.sh WHEELS_DIR BUDGET_SECONDS [STEPS]
set -u
wheels=${1:-.wheels}
deadline=$((SECONDS + ${2:-560}))
only=${3:-}
out=${OUT:-/tmp/issue22}
source "$(dirname "$0")/bench_steps.sh"
modes=(--shape 8b --model-dir /tmp/m8 --modes single,prefill,offline --max-num-seqs 512)
step bf16 190 "${bench[@]}" "${modes[@]}" --json "$out/bf16.json"
step fp8 190 "${bench[@]}" "${modes[@]}" --quantize fp8 --json "$out/fp8.json"
step fp8_kv 190 "${bench[@]}" "${modes[@]}" --quantize fp8 --kv-cache-dtype fp8_e4m3fn \
    --json "$out/fp8_kv.json"
step fp8_kv_head 190 env SHARDLINE_FP8_LM_HEAD=1 "${bench[@]}" "${modes[@]}" --quantize fp8 \
    --kv-cache-dtype fp8_e4m3fn --json "$out/fp8_kv_head.json"
step gpu_tests 200 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu_fp8.py \
    tests/test_triton_attention.py tests/test_triton_prefill.py tests/test_triton_layers.py
