#!/usr/bin/env bash
# The soak on a GPU: serves MODEL_DIR through text-generation-launcher, runs benchmarks.soak
# against it (RSS of router and shards, GPU memory, KV blocks), then SIGTERMs the launcher and
# prints its exit code.
#   bash benchmarks/gpu_soak.sh MODEL_DIR [REQUESTS] [DURATION_S] [NUM_SHARD]
set -u
model_dir=$1 requests=${2:-3000} duration=${3:-240} num_shard=${4:-1}
port=39518
text-generation-launcher --model-id "$model_dir" --num-shard "$num_shard" --port "$port" \
    --max-input-tokens 512 --max-total-tokens 1024 >/tmp/gpu_soak_launcher.log 2>&1 &
launcher=$!
python3 - "$port" <<'PY' || { tail -30 /tmp/gpu_soak_launcher.log; kill "$launcher"; exit 1; }
import sys, time, urllib.request
for _ in range(300):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=2)
        sys.exit(0)
    except Exception:
        time.sleep(1)
sys.exit(1)
PY
pids=$(pgrep -d, -f "shardline|text-generation-router|shardline-router")
python3 -m benchmarks.soak --url "http://127.0.0.1:$port" --requests "$requests" \
    --duration "$duration" --concurrency 32 --pids "$pids"
soak_rc=$?
kill -TERM "$launcher"
wait "$launcher"
echo "soak exit $soak_rc, launcher exit $?"
