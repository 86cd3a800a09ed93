#!/usr/bin/env bash
# What session 7 (2026-12-06) built and could not run on a GPU (no machine came), in priority
# order under one budget: every GPU test file (FP8, prefix caching, ALiBi, soft-capping, the new
# families, the refactored Triton tiles), then issue 27's offline 8B run first come first served
# vs longest first (prefix caching off, so that the order alone differs) and with caching on
# (issue 21: within 2 % of off on unshared traffic), FP8 weights + FP8 KV (issue 22), issue 21's
# shared-prompt and long-conversation workloads, and batch-1 decode of the Qwen3-8B and
# Gemma-2-9B shapes (issue 23). Logs and JSON go to ${OUT:-/tmp/open}; STEPS (comma-separated
# names) runs a part, so that the whole fits two or three device calls.
#   bash benchmarks/open_issues_run.sh WHEELS_DIR BUDGET_SECONDS [STEPS]
set -u
wheels=${1:-.wheels}
deadline=$((SECONDS + ${2:-560}))
only=${3:-}
out=${OUT:-/tmp/open}
source "$(dirname "$0")/bench_steps.sh"
offline=("${bench[@]}" --shape 8b --model-dir /tmp/m8 --modes offline --max-num-seqs 512)
step gpu_tests 330 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_fp8.py \
    tests/test_gpu_prefix_cache.py tests/test_triton_alibi.py tests/test_triton_softcap.py \
    tests/test_gpu_families.py tests/test_gpu_layer_norm_families.py tests/test_gpu_engine.py \
    tests/test_triton_prefill.py tests/test_triton_attention.py tests/test_triton_layers.py \
    tests/test_llm_logit_bias_watermark.py tests/test_sampling.py tests/test_logits_process.py
step offline_arrival 100 "${offline[@]}" --arrival-order --prefix-caching off \
    --json "$out/offline_arrival.json"
step offline_longest 100 "${offline[@]}" --prefix-caching off --json "$out/offline_longest.json"
step offline_cached 100 "${offline[@]}" --prefix-caching on --json "$out/offline_cached.json"
step offline_fp8_kv 120 "${offline[@]}" --quantize fp8 --kv-cache-dtype fp8_e4m3fn \
    --json "$out/offline_fp8_kv.json"
step prefix_shared_long 330 python3 -m benchmarks.prefix_bench --model-dir /tmp/m8 \
    --workload "$work" --workloads shared,long --json "$out/prefix_shared_long.json"
step qwen3_b1 150 "${bench[@]}" --shape qwen3-8b --model-dir /tmp/qwen3-8b --modes single \
    --json "$out/qwen3_b1.json"
step gemma2_b1 150 "${bench[@]}" --shape gemma2-9b --model-dir /tmp/gemma2-9b --modes single \
    --json "$out/gemma2_b1.json"
