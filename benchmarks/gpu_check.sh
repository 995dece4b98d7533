#!/usr/bin/env bash
# One-shot GPU check, for a session that has a lent GPU: about 2-4 minutes, at most 6.
#
#   bash benchmarks/gpu_check.sh                 # from anywhere; runs in the repo root
#
# On the lent machine (no internet, nothing carried): device.run with command
# `bash benchmarks/gpu_check.sh` and no carry — the image's python3 has torch, triton, pytest,
# tokenizers, jinja2 and safetensors; the repo's .venv (CPU torch, gigabytes) does not travel.
# Python: $PYTHON if set, else .venv/bin/python when it sees a GPU, else python3. Missing
# packages are installed only from wheels carried in .whl/ (see the device README); nothing
# is fetched. The default model's wheel is absent there, so gpu_bench.py uses a random-weight
# SmolLM2-135M-shaped stand-in (same speed).
#
# Stages, each under its own timeout; the script goes on after a failed stage and exits
# non-zero if any failed:
#   1. the card, driver, torch, triton
#   2. tests/test_triton_attention.py on the GPU (compiled kernels, bf16, CUDA-graph replay)
#   3. every other test named cuda / gpu / triton (modules needing service-only packages
#      fail to collect on the GPU image; that is expected and reported, not fatal)
#   4. benchmarks/gpu_bench.py: kernel vs reference, engine decode/prefill vs roofline
# Everything is tee'd to $OUT/gpu_check.log ($OUT set by the device tool), else
# reports/gpu_check.log; the bench's numbers also go to gpu_bench.json beside it.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
LOG_DIR="${OUT:-reports}"
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1

export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET            # the tests set it only where there is no GPU

echo "=== card"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi unavailable"

if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -x .venv/bin/python ]] && .venv/bin/python -c \
        "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    PY=.venv/bin/python
else
    PY=python3
fi

if ! "$PY" -c "import torch, triton, pytest, tokenizers, jinja2, safetensors, numpy" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        echo "=== installing carried wheels from .whl/ into /tmp/site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl
        export PYTHONPATH="/tmp/site:$PYTHONPATH"
    fi
fi

timeout 60 "$PY" - <<'EOF'
import sys
import torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "MISSING"
print(f"python {sys.version.split()[0]} ({sys.executable}); torch {torch.__version__}; "
      f"triton {triton_version}")
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch: nothing to check here")
props = torch.cuda.get_device_properties(0)
print(f"device: {torch.cuda.get_device_name(0)}, {props.total_memory / 2**30:.0f} GiB, "
      f"{props.multi_processor_count} SMs, capability {props.major}.{props.minor}")
EOF

RESULTS=()
FAILED=0
run_stage() {                      # run_stage NAME SECONDS FATAL(1|0) COMMAND...
    local name=$1 limit=$2 fatal=$3 rc=0 started=$SECONDS
    shift 3
    echo
    echo "=== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" || rc=$?
    echo "=== $name: rc=$rc after $((SECONDS - started)) s"
    RESULTS+=("$name: rc=$rc ($((SECONDS - started)) s)$([[ $fatal == 1 ]] || echo ', informational')")
    if [[ $rc != 0 && $fatal == 1 ]]; then FAILED=1; fi
}

run_stage "triton attention tests" 150 1 \
    "$PY" -m pytest tests/test_triton_attention.py -q -rs
run_stage "other cuda/gpu/triton tests" 60 0 \
    "$PY" -m pytest tests/ -k "cuda or gpu or triton" -q -rs --continue-on-collection-errors \
    --ignore=tests/test_triton_attention.py
run_stage "gpu_bench" 150 1 \
    "$PY" -m benchmarks.gpu_bench --json "$LOG_DIR/gpu_bench.json"

echo
echo "=== summary (log: $LOG)"
printf '  %s\n' "${RESULTS[@]}"
exit "$FAILED"
