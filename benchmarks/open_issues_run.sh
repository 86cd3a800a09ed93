#!/usr/bin/env bash
# What the open issues still need from one GPU (after session 10, benchmarks/RESULTS.md), in
# priority order under one budget: the GPU tests; where the FP8 + FP8-KV and bf16 runs' GPU time
# goes and where it idles (kernel profiles with idle gaps: since the faster decode attention the
# bf16 run looks paced by the host); the bf16 offline run against smaller prefill budgets and a
# pace of 3 (session 10: both lose, eager mixed steps are launch-bound); issue 22's bf16 / FP8 /
# FP8 + FP8-KV triple in one run (batch-1, 8k prefill, offline: the ratio on one machine, not yet
# measured with session 10's decode schedules); the decode kernels over ShareGPT-shaped lengths
# (the plan's choice against forced splits and the balanced kernel); the FP8 linears per M. Logs
# and JSON go to ${OUT:-/tmp/open} (a device call brings back 8 files: name few steps); STEPS
# (comma-separated names) runs a part.
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
fp8_kv=(--quantize fp8 --kv-cache-dtype fp8_e4m3fn)
profile=("${bench[@]}" --shape 8b --model-dir /tmp/m8 --modes profile --max-num-seqs 512)
step profile_fp8_kv 150 "${profile[@]}" "${fp8_kv[@]}" --json "$out/profile_fp8_kv.json"
offline=("${bench[@]}" --shape 8b --model-dir /tmp/m8 --modes offline --max-num-seqs 512)
step offline_paced 110 "${offline[@]}" --json "$out/offline_paced.json"  # the reference
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
step fp8_gemm 180 python3 -m benchmarks.fp8_gemm_bench
# The host's Python during the bf16 offline run (py-spy from $wheels/spy, sampled while holding
# the GIL), summarized by function; the raw stacks stay in $out.
spy=(py-spy record --gil --rate 250 --format raw -o "$out/spy_bf16.txt" --)
step spy_bf16 150 bash -c "${spy[*]} ${offline[*]} && python3 $wheels/spy_summary.py \
    $out/spy_bf16.txt 45"
