#!/usr/bin/env bash
# The GPU check, one prepared script (about 8 minutes on one H200): every speed figure of the GPU
# path in one file, gpu-figures.md, with the date, the commit and the device, then the CUDA tests.
#
#   bash scripts/gpu-check.sh [OUT_DIR]          (default: $OUT, else outputs/gpu-check)
#
# Python: $PY if set, else .venv/bin/python (after `make install` on a GPU machine with internet),
# else python3. On a machine without a package index, first run `bash scripts/gpu-wheels.sh` here
# and carry .whl/ and data/ (about 57 MB): the wheels go to a private folder, this checkout is put
# on PYTHONPATH as it is (freqexp runs from a source checkout), and Fashion-MNIST is installed where
# freqexp looks. Each step has its own time limit, and all of them share $GPU_CHECK_SECONDS (default
# 560), so one slow or failing step never hides the figures of the others.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT_DIR=$(mkdir -p "${1:-${OUT:-outputs/gpu-check}}" && cd "${1:-${OUT:-outputs/gpu-check}}" && pwd)
FIG="$OUT_DIR/gpu-figures.md"
LOG="$OUT_DIR/gpu-check.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
# as on a user's machine, a module's first import writes the .pyc that later imports read (a machine
# image may set PYTHONDONTWRITEBYTECODE; every process would then compile mlflow, hydra and freqexp
# from source: about 3x the import time here, benchmarks/import_time.py)
unset PYTHONDONTWRITEBYTECODE
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-560}))

if [ -z "${PY:-}" ]; then
  if ! ls .whl/*.whl >/dev/null 2>&1 && [ -x .venv/bin/python ]; then PY="$REPO/.venv/bin/python"; else PY=python3; fi
fi
if ls .whl/*.whl >/dev/null 2>&1; then  # offline machine: the carried wheels; freqexp itself from this checkout
  SITE=${SITE:-/tmp/freqexp-site}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl >>"$LOG" 2>&1
  export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
SYSTEM_DATA=/usr/share/datasets/fashion-mnist  # where freqexp looks for Fashion-MNIST
if [ -d data/fashion-mnist ] && ! ls "$SYSTEM_DATA"/train-images-idx3-ubyte* >/dev/null 2>&1; then
  mkdir -p "$SYSTEM_DATA" 2>>"$LOG" && cp data/fashion-mnist/*-ubyte* "$SYSTEM_DATA"/ 2>>"$LOG"
fi
WORK=$(mktemp -d)  # runs, stores and Hydra outputs of the steps below
cd "$WORK"

{
  echo "# freqexp GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), commit ${FREQEXP_COMMIT:-$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  echo
  "$PY" - <<'EOF2' 2>&1
import os, torch
ok = torch.cuda.is_available()
name = torch.cuda.get_device_name(0) if ok else "NONE (no CUDA device seen)"
print(f"- torch {torch.__version__}, CUDA {torch.version.cuda}, device: {name}, {os.cpu_count()} CPU cores")
try:
    import lightning, mlflow, hydra
    print(f"- lightning {lightning.__version__}, mlflow {mlflow.__version__}, hydra {hydra.__version__}")
except Exception as e:  # noqa: BLE001
    print(f"- imports FAILED: {type(e).__name__}: {e}")
EOF2
} >"$FIG"
if [ "${GPU_CHECK_CPU:-0}" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>>"$LOG"; then
  echo "gpu-check: no CUDA device seen by $PY; nothing to measure (GPU_CHECK_CPU=1 rehearses the steps on the CPU)" | tee -a "$FIG" >&2
  exit 1
fi
HW=hardware=gpu
[ "${GPU_CHECK_CPU:-0}" = 1 ] && HW=hardware=cpu  # a rehearsal of every step on a machine without a GPU
# not timed: a run's imports once, which compiles (and caches) what the wheels brought without .pyc
# (installed --no-compile above), so that each step below imports as a user's second run does
t0=$SECONDS
"$PY" -c "import freqexp.__main__, freqexp.run, freqexp.training, freqexp.evaluate, freqexp.figures, mlflow.tracking, \
mlflow.store.tracking.sqlalchemy_store" >>"$LOG" 2>&1
echo "- warm-up import (compiles and caches what has no .pyc yet; not part of any figure): $((SECONDS - t0)) s" >>"$FIG"

failed=0
# step NAME SECONDS LINES-KEPT COMMAND...: runs COMMAND with a time limit (cut to what is left of the
# whole check), keeps its last lines in the figures file. GPU_CHECK_ONLY="1a 3": only the steps whose
# names begin with those ids.
step() {
  local name=$1 limit=$2 keep=$3; shift 3
  if [ -n "${GPU_CHECK_ONLY:-}" ]; then
    local id=${name%%.*}
    case " $GPU_CHECK_ONLY " in *" $id "*) ;; *) return ;; esac
  fi
  local t0=$SECONDS rc left=$((DEADLINE - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  { echo; echo "## $name"; echo; echo '```'; echo "\$ python ${*:2}" | sed "s|$REPO/||g"; } >>"$FIG"
  if [ "$limit" -lt 15 ]; then
    echo '```' >>"$FIG"; echo "(SKIPPED: the check's time was spent)" >>"$FIG"; failed=$((failed + 1)); return
  fi
  echo "gpu-check: $name (at most ${limit} s) ..." >&2
  timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/step.out" 2>&1
  rc=$?
  { echo; echo "### $name"; cat "$OUT_DIR/step.out"; } >>"$LOG"
  grep -v '^\s*$' "$OUT_DIR/step.out" | grep -v 'profiler_st\|^USDT' | tail -n "$keep" >>"$FIG"
  echo '```' >>"$FIG"
  if [ $rc = 0 ]; then echo "(ok, $((SECONDS - t0)) s)" >>"$FIG"; else echo "(FAILED: exit $rc after $((SECONDS - t0)) s; 124 = time limit)" >>"$FIG"; failed=$((failed + 1)); fi
  rm -f "$OUT_DIR/step.out"
}

B="$REPO/benchmarks"
# GPU_CHECK_QUICK=1: tiny budgets, to rehearse every step on a CPU in a few minutes
if [ "${GPU_CHECK_QUICK:-0}" = 1 ]; then
  T=(--limit 512 --epochs 2 --repeats 1); T2=(--limit 512 --epochs 2 --repeats 1); R=(--runs 1 --baseline-env FREQEXP_STORE_PROCESS=0 trainer.max_epochs=1 dataset.limit_train=500)
  M=(--limit-train 20 --limit-test 40 ++model.input_size=64); L=(--images 512 --steps 3 --repeats 1)
  S=(--packings 1 2 --classes 0 --epochs 1 dataset.limit_train=300); F=(); P=(-x)
else
  T=(--epochs 4 --repeats ${GPU_CHECK_REPEATS:-2}); T2=(--epochs 4 --batch-size 1024); R=(--runs 2 --baseline-env FREQEXP_STORE_PROCESS=0); M=(--quick); L=(--images 10000 --steps 40)
  S=(--packings 1 4 8 --classes ${GPU_CHECK_CLASSES:-0,1,2,3} --epochs ${GPU_CHECK_EPOCHS:-10}); F=(); P=()
fi
# freqexp's path twice: as a run resolves trainer.steps_per_call (auto: 8 batches per pass of Lightning's loop
# on a GPU) and batch by batch (--steps-per-call 1, the path before groups)
step "1a. Training step: freqexp vs a plain PyTorch loop, batch 256 (with syncs and GPU busy share)" 115 19 \
  "$PY" "$B/throughput.py" "${T[@]}" --steps-per-call 1 $([ "${GPU_CHECK_DIAGNOSE:-1}" = 1 ] && echo --diagnose) "$HW"
step "1b. Training step, batch 1024" 90 13 \
  "$PY" "$B/throughput.py" "${T2[@]}" --steps-per-call 1 "$HW"
step "1c. Memory layout: NCHW vs NHWC (hardware.channels_last; auto keeps NCHW on a GPU until this is measured)" 40 4 \
  "$PY" "$B/channels_last.py" "${L[@]}" "$HW"
step "2a. A run's wall time, phase by phase (python -m freqexp $HW, 20 epochs), against the store opened in the run's process" 130 23 \
  "$PY" "$B/run_breakdown.py" "${R[@]}" "$HW"
step "2b. What the start-up imports cost, by package" 60 16 \
  "$PY" "$B/import_time.py" $([ "$HW" = hardware=gpu ] && echo --cuda)
step "4. Memory banks at 224 px: the fast path against the fp32 path before it (300 train / 500 test images)" 170 60 \
  "$PY" "$B/memory_bank_speed.py" "${M[@]}" "$HW"
step "3. A grid at jobs_per_device 1, 4, 8 (ae, cae, vae x classes ${GPU_CHECK_CLASSES:-0,1,2,3}, ${GPU_CHECK_EPOCHS:-10} epochs)" 200 14 \
  "$PY" "$B/sweep_jobs.py" "${S[@]}" "$HW"
step "5. Batched filters vs a per-image numpy loop" 45 10 \
  "$PY" "$B/filters.py" "${F[@]}" --device "$([ "$HW" = hardware=gpu ] && echo cuda || echo cpu)"
step "6. CUDA tests (16-mixed training of every model, memory-bank and MemAE CUDA paths, CAE and GANomaly steps without a sync)" 150 8 \
  "$PY" -m pytest -q -p no:cacheprovider "${P[@]}" --rootdir "$REPO" -k "cuda" "$REPO/tests/test_model_zoo.py" \
  "$REPO/tests/test_models_memae.py" "$REPO/tests/test_config.py" "$REPO/tests/test_data_cache.py" "$REPO/tests/test_training_step.py" \
  "$REPO/tests/test_memory_bank_speed_paths.py" "$REPO/tests/test_models_memory_bank.py"

echo >>"$FIG"
echo "$failed step(s) failed or were skipped; full log: $LOG" >>"$FIG"
cat "$FIG"
rm -rf "$WORK"
exit $failed
