#!/usr/bin/env bash
# GPU readiness check, run as is on a machine with a CUDA GPU (about 5-8 minutes):
#   1. the CUDA build of torch (installed if the environment has the CPU build) and bitsandbytes (optional extra);
#   2. the tests marked `gpu` (device selection, bf16 autocast, export, a 2-client real-model run, 4-bit backbone);
#   3. local DPO against TRL's DPOTrainer on the GPU (benchmarks/bench_local_dpo.py --device cuda), both sides in bf16;
#   4. a demo-size run (configs/demo.toml on the GPU);
# then one summary table (also written to $GPU_CHECK_OUT/summary.md). On a machine without a GPU it says so and
# exits 0 without installing anything (the default test suite checks that).
#
#   bash benchmarks/gpu_check.sh                       # results under runs/gpu_check
#   GPU_CHECK_OUT=/tmp/g GPU_CHECK_DATA=pairs.jsonl bash benchmarks/gpu_check.sh
#
# Environment: PYTHON (default .venv/bin/python, else a python3 that has torch and fedpdpo's needs, else `make
# install`'s .venv, else python3), GPU_CHECK_OUT, GPU_CHECK_DATA (IMDB pairs; default
# the shared copy next to the checkout), TORCH_INDEX (the CUDA wheel index, default cu128).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q "GPU"; then
    echo "gpu_check: no CUDA GPU on this machine (nvidia-smi finds none): nothing to check; run this where there is one"
    exit 0
fi

OUT=${GPU_CHECK_OUT:-runs/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
START=$(date +%s)
declare -a ROWS=()
row() { ROWS+=("| $1 | $2 | $3 |"); echo "gpu_check: $1: $2 ($3)"; }
elapsed() { echo $(( $(date +%s) - START )); }

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python
    # a machine image whose python3 already has torch and fedpdpo's needs (no network needed, nothing installed)
    elif python3 -c 'import torch, transformers, peft, safetensors, gguf, rich, tomli_w' 2>/dev/null; then PYTHON=python3
    elif [ -f Makefile ] && command -v make >/dev/null && timeout 300 make install >"$OUT/install.log" 2>&1; then
        PYTHON=.venv/bin/python
    else PYTHON=python3
    fi
fi
export HF_HUB_OFFLINE=1 PYTHONPATH="$ROOT/src:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1 >"$OUT/gpu.txt"
GPU_NAME=$(cut -d, -f1 "$OUT/gpu.txt")

# 1. CUDA torch and bitsandbytes
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    VERSION=$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || echo "")
    echo "gpu_check: this torch has no CUDA; installing the CUDA build ${VERSION:+of $VERSION}"
    timeout 240 "$PYTHON" -m pip install -q --retries 1 --timeout 15 --force-reinstall --no-deps "torch${VERSION:+==$VERSION}" \
        --index-url "${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}" >>"$OUT/install.log" 2>&1
fi
if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    row "CUDA torch" "ok" "$("$PYTHON" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda, "bf16", torch.cuda.is_bf16_supported())')"
else
    row "CUDA torch" "FAILED" "no CUDA build could be installed (see $OUT/install.log)"
    printf '%s\n' "${ROWS[@]}" >"$OUT/summary.md"
    exit 1
fi
"$PYTHON" -c 'import bitsandbytes' 2>/dev/null \
    || timeout 120 "$PYTHON" -m pip install -q --retries 1 --timeout 15 "bitsandbytes>=0.45" >>"$OUT/install.log" 2>&1 \
    || echo "gpu_check: bitsandbytes could not be installed: the 4-bit test skips"

# 2. the gpu tests
timeout 200 "$PYTHON" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -rs >"$OUT/tests.log" 2>&1
rc=$?
row "pytest -m gpu" "$([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc)")" "$(tail -1 "$OUT/tests.log")"

# 3. local DPO against TRL on the GPU
DATA=${GPU_CHECK_DATA:-}
for candidate in /work/shared/data/imdb_sentiment_pairs.jsonl "$ROOT/../shared/data/imdb_sentiment_pairs.jsonl"; do
    [ -z "$DATA" ] && [ -f "$candidate" ] && DATA=$candidate
done
if [ -z "$DATA" ]; then
    DATA="$ROOT/data/tiny_pairs.jsonl"
    echo "gpu_check: no IMDB pairs found (set GPU_CHECK_DATA): the benchmark and the demo use $DATA"
fi
# Sized for a GPU: the CPU job (8 pairs x 128 tokens, 8 steps) takes 1-2 s there and measures kernel launches and
# Python overhead, not the GPU (docs/performance.md, "GPU"); 32 pairs x 256 tokens, 16 steps, 2 repeats, bf16 on both
# sides only: each side's process took 30-40 s to start on an H200, so the fp32 pair would not fit the timeout.
timeout 240 "$PYTHON" benchmarks/bench_local_dpo.py --device cuda --precision auto --data "$DATA" --threads 4 \
    --sides fedpdpo,trl --batch-size 32 --max-length 256 --steps 16 --epochs 4 --repeats 2 \
    --json "$OUT/bench_local_dpo.json" >"$OUT/bench.log" 2>&1
rc=$?
if [ $rc -eq 0 ]; then
    row "local DPO vs TRL, 4 epochs" "ok" "$(grep -E '^(like for like|bf16 gain|vs TRL fp32|fp32 like)' "$OUT/bench.log" | cut -d';' -f1 | paste -sd';' -)"
else
    row "local DPO vs TRL, 4 epochs" "FAILED (exit $rc)" "see $OUT/bench.log"
fi

# 4. a demo-size run
demo_start=$(date +%s)
timeout 150 "$PYTHON" -m fedpdpo.cli run --config configs/demo.toml --out "$OUT/demo" --overwrite --quiet \
    --set 'device="cuda"' --set "data.path=\"$DATA\"" >"$OUT/demo.log" 2>&1
rc=$?
if [ $rc -eq 0 ]; then
    row "demo run (3 clients x 3 rounds)" "ok" "$(( $(date +%s) - demo_start )) s; $("$PYTHON" -c "import json; s = json.load(open('$OUT/demo/summary.json')); print('accuracy by round', {k: round(v, 3) for k, v in s['mean_accuracy_by_round'].items()}, 'precision', s.get('precision_used'))")"
else
    row "demo run (3 clients x 3 rounds)" "FAILED (exit $rc)" "see $OUT/demo.log"
fi

{
    echo "GPU check on ${GPU_NAME:-?}, $(date -u +%Y-%m-%dT%H:%MZ), $(elapsed) s"
    echo
    echo "| step | result | details |"
    echo "|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
} | tee "$OUT/summary.md"
grep -q FAILED "$OUT/summary.md" && exit 1
exit 0
