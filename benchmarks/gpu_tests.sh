#!/usr/bin/env bash
# The GPU test files, one pytest run each under its own limit (a hang costs one file, not the
# run), verbose into one log ($OUT/pytest_verbose.log: a device call brings back only a few files),
# printing each file's summary line and its failures.
#   bash benchmarks/gpu_tests.sh SECONDS_PER_FILE FILE...
set -u
per=${1:-100}
shift
log=${OUT:-/tmp/gpu_tests}/pytest_verbose.log  # not gpu_tests.log: the step of that name logs there
mkdir -p "$(dirname "$log")"  # appended to: a call's $OUT starts empty
for file in "$@"; do
    started=$SECONDS
    echo "##### $file" >>"$log"
    timeout "$per" python3 -m pytest -v -p no:cacheprovider -rfE --tb=short "$file" \
        >"$log.part" 2>&1
    code=$?
    cat "$log.part" >>"$log"
    echo "== $file exit $code $((SECONDS - started)) s: $(tail -1 "$log.part")"
    grep -E '^(FAILED|ERROR)' "$log.part" | cut -c1-300
done
rm -f "$log.part"
