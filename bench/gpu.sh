#!/usr/bin/env bash
# GPU benchmarks in one go (under 8 minutes on an H100-class card): 2D/3D inference latency in fp32, with AMP,
# with AMP + channels-last and with torch.compile, peak GPU memory, training throughput, and the dMoE layer
# against the per-sample loop version.
#
#   bench/gpu.sh [WHEELS_DIR] [--device cpu] [--quick]
#
# Needs only Python 3.12 and torch. The project's other needs come from WHEELS_DIR when given (pip --no-index,
# nothing is downloaded); the project itself runs from this checkout (PYTHONPATH), not installed. Prepare the
# folder on a machine with network access:
#
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       --platform manylinux_2_28_x86_64 --no-deps -d wheels \
#       numpy monai einops safetensors nibabel pydicom pyyaml packaging
#   pip wheel --no-deps . -w wheels        # optional: the project as a wheel (not needed by this script)
#
# `--device cpu --quick` checks the Python parts on a machine without a GPU. Output also goes to
# bench/gpu_results.txt (or $GPU_RESULTS).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

WHEELS=""
if [[ $# -gt 0 && -d "$1" ]]; then WHEELS="$1"; shift; fi
DEVICE=cuda
QUICK=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --quick) QUICK="--quick"; shift ;;
        *) echo "gpu.sh: unknown argument '$1'; usage: bench/gpu.sh [WHEELS_DIR] [--device cpu] [--quick]" >&2; exit 2 ;;
    esac
done

if [[ -n "$WHEELS" ]]; then
    # --no-index: only the local folder; torch is already installed and satisfies monai's requirement
    "$PY" -m pip install --no-index --find-links "$WHEELS" numpy monai einops safetensors nibabel pydicom pyyaml
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - "$DEVICE" <<'PYEOF'
import sys, torch
device = sys.argv[1]
if device.startswith("cuda") and not torch.cuda.is_available():
    sys.exit(f"gpu.sh: torch {torch.__version__} sees no CUDA device; use --device cpu --quick to check the script")
import monai, safetensors  # noqa: F401  (fail early, with the name, if a wheel is missing)
print(f"torch {torch.__version__}, monai {monai.__version__}, python {sys.version.split()[0]}")
PYEOF

OUT="${GPU_RESULTS:-bench/gpu_results.txt}"
: > "$OUT"
run() {  # run one bench with a time limit, keep going if it fails, log everything
    echo "=== $*" | tee -a "$OUT"
    timeout "${LIMIT:-120}" "$PY" "$@" 2>&1 | tee -a "$OUT" || echo "(failed or timed out: $*)" | tee -a "$OUT"
}
run bench/bench_gpu.py --device "$DEVICE" $QUICK
if [[ -z "$QUICK" ]]; then  # torch.compile on its own: its first call compiles for a minute or more
    LIMIT=120 run bench/bench_gpu.py --device "$DEVICE" --variants compile --cases 3d-paper,2d-small --repeats 3
fi
run bench/bench_training.py --device "$DEVICE" $QUICK
run bench/bench_moe_layer.py --device "$DEVICE" $QUICK
echo "=== summary lines (also in $OUT)"
grep -E '^[a-z0-9_]+=[^ ]+( [a-z0-9_]+=[^ ]+)+$' "$OUT" || true
