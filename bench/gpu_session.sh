#!/usr/bin/env bash
# All GPU checks and benchmarks of one device session, results under $OUT (default ./gpu-out).
#   OUT=/tmp/gpu BUDGET=540 bash bench/gpu_session.sh
# A device command may run 600 s, so the steps share one deadline (BUDGET seconds from the start): each gets
# at most its own limit and what is left, a step that would get under 20 s is skipped, and the steps run in
# the order of what the open issues still need measured: load to GPU (issue 18), the GPU tests, scoring
# throughput, gather bandwidth, the CUDA prune smoke test, decode speed. The whole log is kept in
# $OUT/session.log, so a step cut short still reports what it printed.
set -u
OUT=${OUT:-gpu-out}
BUDGET=${BUDGET:-540}
mkdir -p "$OUT"
export PYTHONPATH=.
export TRITON_INTERPRET=0
export PYTHONUNBUFFERED=1
DEADLINE=$(( $(date +%s) + BUDGET ))
LOG="$OUT/session.log"
: > "$LOG"
python - <<'PY' 2>&1 | tee -a "$LOG"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
for m in ("transformers", "triton", "safetensors", "accelerate", "typer", "rich", "numpy"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "MISSING", e)
PY
# step NAME LIMIT_S CMD...: runs CMD with min(LIMIT_S, time left) and logs it; skipped under 20 s.
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) - 5 ))
  (( left < limit )) && limit=$left
  if (( limit < 20 )); then
    echo "=== SKIPPED $name: ${left} s left of BUDGET=${BUDGET}" | tee -a "$LOG"
    return
  fi
  echo "=== $name (limit ${limit} s)" | tee -a "$LOG"
  local t=$(date +%s)
  timeout "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  (( rc == 124 )) && echo "=== TIMED OUT after ${limit} s" >> "$LOG"
  echo "=== $name: rc=$rc in $(( $(date +%s) - t )) s" | tee -a "$LOG"
}
step "load to GPU (7B-shaped layers, 8 of 32)" 240 python bench/gpu_load.py --out "$OUT" --layers 8 --repeats 3 --cases dense,auto-0.4-ranked,auto-0.4
step "gpu tests" 90 python -m pytest -q -m gpu -p no:cacheprovider tests
step "scoring throughput" 200 python bench/gpu_scoring.py --out "$OUT"
step "gather bandwidth" 120 python bench/gpu_gather.py --out "$OUT" --profile
step "prune smoke on cuda" 60 python bench/gpu_smoke.py --out "$OUT"
step "decode speed, static cache + compile (7B shape)" 300 python bench/gpu_decode.py --out "$OUT"
echo "=== done, $(( BUDGET - (DEADLINE - $(date +%s)) )) s of BUDGET=${BUDGET}" | tee -a "$LOG"
grep -E "^=== " "$LOG" | tail -n 20
