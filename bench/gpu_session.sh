#!/usr/bin/env bash
# All GPU checks and benchmarks of one device session, results under $OUT (default ./gpu-out).
#   OUT=/tmp/gpu bash bench/gpu_session.sh
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=.
export TRITON_INTERPRET=0
python - <<'PY' > "$OUT/env.txt" 2>&1
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
for m in ("transformers", "triton", "safetensors", "typer", "rich", "numpy", "matplotlib"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "MISSING", e)
PY
cat "$OUT/env.txt"
step() { echo "=== $1"; shift; local t=$(date +%s); timeout "${LIMIT:-240}" "$@"; echo "=== rc=$? in $(( $(date +%s) - t )) s"; }
step "gpu tests" python -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -30
step "prune smoke on cuda" python bench/gpu_smoke.py --out "$OUT" 2>&1 | tail -30
step "gather bandwidth" python bench/gpu_gather.py --out "$OUT" 2>&1 | tail -40
step "scoring throughput" python bench/gpu_scoring.py --out "$OUT" 2>&1 | tail -20
LIMIT=300 step "load to GPU (7B shape)" python bench/gpu_load.py --out "$OUT" 2>&1 | tail -20
LIMIT=300 step "decode speed, static cache + compile (7B shape)" python bench/gpu_decode.py --out "$OUT" 2>&1 | tail -12
