#!/usr/bin/env bash
# The GPU paths on a CUDA machine (written for one H200), in one go:
#   1. the Triton local-attention backend's GPU tests (realistic shapes against the reference),
#   2. every registered model on CUDA in fp32 and bf16 against its CPU output, and SmolLM2's
#      greedy tokens on CUDA (dense and static caches) against the CPU's (tests/test_gpu.py),
#   3. the benchmark: ours vs FlexAttention vs SDPA with a band mask (a markdown table).
# Run from the repository root, in an environment with torch and triton:
#   bash benchmarks/gpu_check.sh
# Each step has a hard time limit (about 8 minutes in all at most); a failing step is
# reported and the next one still runs. Exit status 0 when all passed.
set -u
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
    for venv in .venv venv; do
        if [ -f "$venv/bin/activate" ]; then source "$venv/bin/activate"; break; fi
    done
fi
PY=${PYTHON:-python}
if ! "$PY" -c "import archopt" 2>/dev/null; then
    "$PY" -m pip install -q -e . --no-deps || exit 1
fi
"$PY" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__,
      '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null

status=0
echo; echo "== Triton attention on the GPU =="
timeout -k 10 110 "$PY" -m pytest -m gpu tests/test_triton_attention.py -v -p no:cacheprovider
rc=$?
if [ $rc -ne 0 ]; then status=1; echo "Triton GPU tests: exit $rc (124 = time limit)"; fi

echo; echo "== every model on CUDA against the CPU; SmolLM2's greedy tokens =="
timeout -k 10 220 "$PY" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider -rf
rc=$?
if [ $rc -ne 0 ]; then status=1; echo "model GPU tests: exit $rc (124 = time limit)"; fi

echo; echo "== benchmark =="
timeout -k 10 130 "$PY" -m archopt.bench.attention_gpu --budget-s 100 --flex-budget-s 50
rc=$?
if [ $rc -ne 0 ]; then status=1; echo "benchmark: exit $rc (124 = time limit)"; fi
exit $status
