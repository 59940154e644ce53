#!/usr/bin/env bash
# The GPU check, one prepared script (about 8 minutes on one GPU): the CUDA tests, the default
# experiment with hardware=gpu (CUDA + 16-mixed), benchmarks/throughput.py and
# benchmarks/filters.py on the GPU. Every figure goes into one file, gpu-figures.md.
#
#   bash scripts/gpu-check.sh [OUT_DIR]          (default: $OUT, else outputs/gpu-check)
#
# Python: $PY if set, else .venv/bin/python (after `make install` on a GPU machine with
# internet), else python3. On a machine without internet, carry the wheels that
# scripts/gpu-wheels.sh downloads into .whl/: they are installed to a private folder first.
# Each step has its own time limit, so one slow or failing step never hides the others' figures.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT_DIR=${1:-${OUT:-outputs/gpu-check}}
mkdir -p "$OUT_DIR"
FIG="$OUT_DIR/gpu-figures.md"
LOG="$OUT_DIR/gpu-check.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

if [ -z "${PY:-}" ]; then
  if ! ls .whl/*.whl >/dev/null 2>&1 && [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ls .whl/*.whl >/dev/null 2>&1; then  # offline machine: the carried wheels, then freqexp itself
  SITE=${SITE:-/tmp/freqexp-site}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl >>"$LOG" 2>&1
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$SITE" . >>"$LOG" 2>&1
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

{
  echo "# freqexp GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  "$PY" - <<'EOF' 2>&1
import torch
ok = torch.cuda.is_available()
print(f"- torch {torch.__version__}, CUDA {torch.version.cuda}, device: {torch.cuda.get_device_name(0) if ok else 'NONE (no CUDA device seen)'}")
EOF
} >"$FIG"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>>"$LOG"; then
  echo "gpu-check: no CUDA device seen by $PY; nothing to measure" | tee -a "$FIG" >&2
  exit 1
fi

failed=0
# step NAME SECONDS LINES-KEPT COMMAND...: runs COMMAND with a time limit, keeps its last lines in the figures file
step() {
  local name=$1 limit=$2 keep=$3; shift 3
  local t0=$SECONDS rc
  echo "gpu-check: $name ..." >&2
  { echo; echo "## $name"; echo; echo '```'; } >>"$FIG"
  timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/step.out" 2>&1
  rc=$?
  cat "$OUT_DIR/step.out" >>"$LOG"
  grep -v '^\s*$' "$OUT_DIR/step.out" | tail -n "$keep" >>"$FIG"
  echo '```' >>"$FIG"
  if [ $rc = 0 ]; then echo "(ok, $((SECONDS - t0)) s)" >>"$FIG"; else echo "(FAILED: exit $rc after $((SECONDS - t0)) s; 124 = time limit)" >>"$FIG"; failed=$((failed + 1)); fi
  rm -f "$OUT_DIR/step.out"
}

STORE="sqlite:///$REPO/$OUT_DIR/gpu.db"
step "CUDA tests (16-mixed training of every model, memory-bank and MemAE CUDA paths)" 200 15 \
  "$PY" -m pytest -q -p no:cacheprovider -k "cuda" tests/test_model_zoo.py tests/test_models_memae.py tests/test_config.py tests/test_data_cache.py
step "The default experiment on the GPU (python -m freqexp hardware=gpu, 10 epochs)" 150 12 \
  "$PY" -m freqexp hardware=gpu trainer.progress_bar=false trainer.max_epochs=10 tracking.uri="$STORE"
step "Training throughput: freqexp vs a plain PyTorch loop (benchmarks/throughput.py hardware=gpu)" 120 12 \
  "$PY" benchmarks/throughput.py --epochs 3 hardware=gpu
step "Batched filters on the GPU vs a per-image numpy loop (benchmarks/filters.py --device cuda)" 60 10 \
  "$PY" benchmarks/filters.py --device cuda

echo >>"$FIG"
echo "$failed step(s) failed; full log: $LOG" >>"$FIG"
cat "$FIG"
exit $failed
