#!/usr/bin/env bash
# The GPU paths on a CUDA machine (written for one H200), in one go:
#   1. the Triton local-attention backend's GPU tests (realistic shapes against the reference),
#   2. every registered model on CUDA in fp32 and bf16 against its CPU output, the default
#      optimize_for_inference and generate on CUDA (a CUDA graph step: the eager tokens), and
#      SmolLM2's greedy tokens on CUDA against the CPU's when the checkpoint is installed
#      (tests/test_gpu.py),
#   3. local attention: ours vs FlexAttention vs SDPA with a band mask (a markdown table),
#   4. KV caching: the lecture's no-cache loop vs archopt's caches vs HF generate (a table).
# Run from the repository root, in an environment with torch and triton (archopt itself is
# taken from this checkout when it is not installed):
#   bash benchmarks/gpu_check.sh
# Each step has a hard time limit (about 9 minutes in all at most); a failing step is
# reported and the next one still runs. Exit status 0 when all passed. With OUT set, the whole
# output is also written to $OUT/gpu_check.log.
set -u
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
    for venv in .venv venv; do
        if [ -f "$venv/bin/activate" ]; then source "$venv/bin/activate"; break; fi
    done
fi
PY=${PYTHON:-python3}
if ! "$PY" -c "import archopt" 2>/dev/null; then
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 ARCHOPT_CACHE="${ARCHOPT_CACHE:-$(mktemp -d)}"
if [ -n "${OUT:-}" ] && [ -z "${GPU_CHECK_LOGGED:-}" ]; then
    export GPU_CHECK_LOGGED=1
    set -o pipefail
    bash "$0" 2>&1 | tee "$OUT/gpu_check.log"
    exit $?
fi
"$PY" -c "import torch, triton, sys; print('python', sys.version.split()[0], '| torch',
      torch.__version__, '| triton', triton.__version__, '|',
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader 2>/dev/null
date -u

status=0
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo; echo "== $name (at most $limit s) =="
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@"
    local rc=$?
    echo "-- $name: exit $rc in $((SECONDS - t0)) s (124 = time limit)"
    if [ $rc -ne 0 ]; then status=1; fi
}
step "Triton attention on the GPU" 110 \
    "$PY" -m pytest -m gpu tests/test_triton_attention.py -q -p no:cacheprovider -rfE
step "every model on CUDA against the CPU; generate and optimize_for_inference" 170 \
    "$PY" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider -rfEs
step "local attention: ours vs FlexAttention vs SDPA" 130 \
    "$PY" -m archopt.bench.attention_gpu --budget-s 100 --flex-budget-s 50
step "KV caching: no cache vs caches vs HF" 130 \
    "$PY" -m archopt.bench.decode_gpu --budget-s 100
exit $status
