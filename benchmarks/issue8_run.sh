#!/usr/bin/env bash
# Issue 8's figures, each step under a time limit that the whole run's budget caps: the 8B shape's
# single stream, 8,192-token prefill and offline throughput (at most 512 requests at once), the
# 1.7B shape's single stream, the 8B shape served over HTTP (all at once, then 300 requests at
# a Poisson 4 req/s),
# the GPU correctness tests, HF transformers' generate on the same 8B model, how long an
# 8k-token prompt stalls 64 running decodes under three prefill budgets (chunked prefill), the
# router's CPU cost per streamed token over an instant fake shard (this host's CPU alone), and
# offline at vLLM's default of 256 requests at once. Logs and JSON go to ${OUT:-/tmp/issue8};
# each step ends with its table. STEPS (comma-separated names) runs a part, so that the whole
# fits two device calls.
#   bash benchmarks/issue8_run.sh WHEELS_DIR BUDGET_SECONDS [STEPS]
set -u
wheels=${1:-.wheels}
deadline=$((SECONDS + ${2:-560}))
only=${3:-}
out=${OUT:-/tmp/issue8}
source "$(dirname "$0")/bench_steps.sh"
step engine_8b 190 "${bench[@]}" --shape 8b --model-dir /tmp/m8 --modes single,prefill,offline \
    --max-num-seqs 512 --json "$out/engine_8b.json"
step engine_1.7b 90 "${bench[@]}" --shape 1.7b --model-dir /tmp/m17b --modes single \
    --json "$out/engine_1.7b.json"
step served_8b 260 python3 -m benchmarks.serve_bench --model-dir /tmp/m8 --num-shards 1 \
    --workload "$work" --rate 4 --rate-requests 300 --json "$out/served_8b.json"
step gpu_tests 200 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu_engine.py \
    tests/test_triton_attention.py tests/test_triton_prefill.py tests/test_triton_layers.py \
    tests/test_sampling.py tests/test_logits_process.py tests/test_llm_logit_bias_watermark.py
step hf_8b 100 "${bench[@]}" --shape 8b --model-dir /tmp/m8 --modes hf --hf-batches 64,128 \
    --json "$out/hf_8b.json"
step stall_8b 120 "${bench[@]}" --shape 8b --model-dir /tmp/m8 --modes stall \
    --json "$out/stall_8b.json"
step router 60 python3 -m benchmarks.router_bench --rounds 3
step engine_8b_256 90 "${bench[@]}" --shape 8b --model-dir /tmp/m8 --modes offline \
    --max-num-seqs 256 --json "$out/engine_8b_256.json"
