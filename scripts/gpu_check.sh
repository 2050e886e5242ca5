#!/usr/bin/env bash
# The GPU checks in one command, for a machine with an NVIDIA GPU and a Python that has torch and
# triton (and pytest): the kernel and transformer tests on the GPU (the attention grid compiled,
# the `gpu`-marked cases, CUDA graphs), then the learner's examples/s for every attention backend,
# eager and captured as CUDA graphs, for C and G in {1, 8, 32} at D = 1280, W = 64, then the
# attention kernels alone. About 8 minutes on an H100; each part has its own time limit, so one
# that hangs cannot take the others with it.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # default: $OUT if set, else runs/gpu_check
#
# Needs Python 3.11+ and none of ocl's other dependencies (hydra, Avalanche, ...): it imports the
# package from this checkout through a tree of symbolic links that mirrors pyproject.toml's
# package-dir mapping. Logs: OUT_DIR/device.log, tests.log, learner.log, kernel.log; the exit code is
# the worst part's (124: a time limit).
set -uo pipefail

out=${1:-${OUT:-runs/gpu_check}}
py=${PYTHON:-python3}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"

# ocl -> ocl/, ocl.kernels -> kernels/, ...: the package tree bench_speed.py stages from pyproject.toml
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
"$py" -P -c 'import runpy, sys; from pathlib import Path
runpy.run_path(sys.argv[1])["stage_package"](Path(sys.argv[2]), Path(sys.argv[3]))' \
    "$repo/scripts/bench_speed.py" "$repo" "$stage" || { echo "error: could not stage ocl with $py" >&2; exit 2; }
export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# python -P (3.11+): the checkout's own ocl/ (without kernels/ etc. under it) must not shadow the staged one

"$py" -P - <<'EOF' 2>&1 | tee "$out/device.log"
import torch, triton, ocl, ocl.kernels, ocl.learners.transformer
print(f"torch {torch.__version__}, triton {triton.__version__}, ocl from {ocl.__file__}")
print("cuda:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NOT AVAILABLE")
EOF
if (( PIPESTATUS[0] != 0 )); then
    echo "error: $py cannot import torch, triton and ocl's kernels and transformer (above)" >&2
    exit 2
fi
if ! "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "error: no CUDA GPU here: these are the GPU checks (the CPU ones are the test suite)" >&2
    exit 2
fi

status=0
run() {  # run LIMIT_S LOG CMD...: one part, its output in OUT/LOG and on the terminal
    local limit=$1 log=$2; shift 2
    echo "== $*" | tee "$out/$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$out/$log"
    local rc=${PIPESTATUS[0]}
    echo "== exit $rc" | tee -a "$out/$log"
    (( rc > status )) && status=$rc
    return 0
}

cd "$repo"
run 240 tests.log "$py" -P -m pytest -q -p no:cacheprovider --import-mode=importlib \
    tests/kernels tests/learners/transformer -rs
run 240 learner.log "$py" -P scripts/bench_attention.py learner --device cuda --cuda-graph --examples 2000 \
    --features 1280 --learner-windows 64 --learner-chunks 1 8 32 --learner-segments 1 8 32
run 90 kernel.log "$py" -P scripts/bench_attention.py kernel --device cuda --streams 4
exit $status
