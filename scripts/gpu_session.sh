#!/usr/bin/env bash
# The GPU work of issues #6 and #8 in one command, for a session lent a GPU machine.
#
# The device image has CuPy, NumPy, SciPy, torch (CUDA), hypothesis, pytest and
# pytest-xdist, but not the array-API packages, and it cannot reach a package index.
# Before the call, in the repository root here:
#
#   echo /.whl/ >> .git/info/exclude
#   python -m pip download --no-deps --only-binary=:all: -d .whl \
#       "array-api-compat==$(python -c 'import array_api_compat as m; print(m.__version__)')" \
#       "array-api-extra==$(python -c 'import array_api_extra as m; print(m.__version__)')" \
#       "array-api-strict==$(python -c 'import array_api_strict as m; print(m.__version__)')"
#
# then run it on the device with `.whl` carried, in two calls of under 10 minutes:
#
#   bash scripts/gpu_session.sh checks   # pytest -m gpu, gpu-check, the CuPy benchmarks
#   bash scripts/gpu_session.sh suite    # the whole test suite, CuPy included, 8 workers
#
# Everything is logged under $OUT (or ./gpu-out when OUT is unset, e.g. a dry run on a
# CPU machine, where the CuPy parts skip or exit 2 with one line each).  Record the
# results in docs/gpu.md and docs/performance.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

{
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    python3 - <<'EOF'
import importlib
for name in ("numpy", "cupy", "torch", "array_api_compat", "array_api_extra",
             "array_api_strict", "hypothesis", "scipy"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # report and go on: this is an inventory
        print(name, "unavailable:", exc)
EOF
} > "$out/device.txt" 2>&1

status=0
case "${1:-checks}" in
    checks)
        python3 -m pytest -m gpu -rs -q -p no:cacheprovider 2>&1 | tee "$out/pytest-gpu.txt" \
            || status=1
        python3 -m condconv_ref.cli gpu-check --cases 8 2>&1 | tee "$out/gpu-check.txt" \
            || status=1
        python3 -m benchmarks --backend cupy --json "$out/bench-gpu.json" 2>&1 \
            | tee "$out/bench-gpu.txt" || status=1
        ;;
    suite)
        python3 -m pytest -q -rs -p no:cacheprovider -n 8 2>&1 | tee "$out/pytest-all.txt" \
            || status=1
        ;;
    *)
        echo "usage: bash scripts/gpu_session.sh [checks|suite]" >&2
        exit 2
        ;;
esac
exit "$status"
