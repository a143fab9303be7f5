#!/usr/bin/env bash
# Everything only a GPU shows, as one prepared command for a short loan of a GPU machine
# (issue 12's seeded ablations, demo-recipe screening, the CUDA tests, the speed tables).
#
#   bash benchmarks/gpu_session.sh OUT_DIR [SECONDS]
#
# SECONDS (default 570) is the wall budget of the whole script; every phase has its own share
# and ends in time, so the results of the finished runs always reach OUT_DIR:
#   - the CUDA tests (tests/test_cuda.py and the other -k cuda tests), in the background;
#   - the ablation sweep: benchmarks/ablations.py, tiny default model and recipe (no --demo),
#     160 px, batch 16, 3,000 steps, configurations n8 fixed n1 no-estimator n24 no-global,
#     seeds 0 1 2, seed-major order (so a sweep cut short has every configuration at seeds
#     0 and 1 first), 7 runs at a time;
#   - the reference configuration at twice the budget (6,000 steps, evaluated every 1,000)
#     to see where its validation curve flattens;
#   - demo candidates (two lanes): the demo as it is (the flip, 14 epochs), the demo without the
#     flip, the demo at 4,500 steps, the tiny default at 128 px and 900 steps;
#   - benchmarks/gpu_suite.py dynconv + model (--quick) once the trainings are stopped.
# Runs that are not finished when their phase ends are stopped and marked so.
# PHASES (default "tests sweep long demo speed") picks the phases; SWEEP_CONFIGS, SWEEP_SEEDS,
# SWEEP_JOBS, SWEEP_NAME and SWEEP_STEPS (default 3000) change the sweep (e.g. the seeds a
# cut-short session left: PHASES="tests sweep" SWEEP_CONFIGS="n1 no-estimator" SWEEP_SEEDS=2
# SWEEP_NAME=ablations_tiny_rest; the sweep at twice the budget, planned as two calls (a 6,000-step
# run took 5.9 min among 10 on an H200):
# PHASES=sweep SWEEP_STEPS=6000 SWEEP_JOBS=10 SWEEP_SEEDS="0 1" SWEEP_NAME=ablations_tiny_6000_sweep,
# then SWEEP_SEEDS=2 SWEEP_NAME=ablations_tiny_6000_sweep_s2). SWEEP_PRESET=demo runs the sweep on
# the demo's model and recipe (default: the tiny default at 160 px; at 6,000 steps its reference
# still gains 1.5-3.2 mIoU over the last 1,000, benchmarks/README.md); the configurations the
# CPU did not reach (it ran n8, fixed, n1, no-estimator at 3 seeds): PHASES=sweep SWEEP_PRESET=demo
# SWEEP_STEPS=6000 SWEEP_CONFIGS="n24 no-global" SWEEP_JOBS=12 SWEEP_NAME=ablations_demo_6000_rest.
# SMOKE=1 checks the script on a CPU in a few minutes: every training 4 steps (the sweep's:
# SWEEP_STEPS if given) on 8 validation sentences, one seed, device cpu; no MPS, no speed tables.
set -u
OUT=${1:?usage: gpu_session.sh OUT_DIR [SECONDS]}
BUDGET=${2:-570}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
MISC=$(mktemp -d /tmp/gpu-misc.XXXXXX)  # logs and tables, bundled into OUT/results.tgz (few files come back)
LOG="$OUT/session.log"
exec > >(tee -a "$LOG") 2>&1
PY=${PYTHON:-python3}

# --- setup: packages the image lacks travel as wheels in .whl/
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi -L; nproc
$PY - <<'EOF'
import platform, torch, transformers, timm, einops, pycocotools, safetensors
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "timm", timm.__version__, "einops", einops.__version__)
print(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory // 2**30, "GiB")
EOF

# --- MPS lets the small trainings' kernels run side by side; without it they take turns.
MPS=off
if [ "${SMOKE:-0}" != 1 ] && command -v nvidia-cuda-mps-control >/dev/null 2>&1; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d && timeout 60 $PY -c "import torch; assert torch.ones(2, device='cuda').sum().item() == 2"; then
    MPS=on
  else
    echo quit | nvidia-cuda-mps-control 2>/dev/null; sleep 2
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  fi
fi
echo "MPS $MPS at $(elapsed) s"

PHASES=" ${PHASES:-tests sweep long demo speed} "
has() { [[ "$PHASES" == *" $1 "* ]]; }
read -r -a CONFIGS <<< "${SWEEP_CONFIGS:-n8 fixed n1 no-estimator n24 no-global}"
DEVICE=cuda; read -r -a SEEDS <<< "${SWEEP_SEEDS:-0 1 2}"; S1=${SWEEP_STEPS:-3000}; S2=6000; EVAL=1000; DEMO_EXTRA=(); TINY_STEPS=900; LONG_STEPS=4500
if [ "${SMOKE:-0}" = 1 ]; then
  DEVICE=cpu; SEEDS=(0); S1=${SWEEP_STEPS:-4}; S2=4; EVAL=2; TINY_STEPS=4; LONG_STEPS=4
  DEMO_EXTRA=(--max-steps 4 --val-samples 8 --eval-every 2)
fi
RUNS=$(mktemp -d /tmp/gpu-runs.XXXXXX)  # the trainings' folders; bundled, without weights, into OUT/runs.tgz
CACHE=${CACHE_DIR:-/tmp/synthetic}
$PY -c "from vlaligner.data.cache import ensure_synthetic_set as e; print(e('$CACHE', num_images=800))"
echo "synthetic set at $(elapsed) s"

# --- CUDA tests (background; small)
PIDS=()
has tests && ( timeout 150 $PY -m pytest -q -p no:cacheprovider -k cuda tests/test_cuda.py tests/test_aligner_modules.py \
    tests/test_deployment.py > "$MISC/cuda_tests.txt" 2>&1; echo "exit $?" >> "$MISC/cuda_tests.txt" ) &

# --- the ablation sweep and the long reference
COMMON=(--preset paper --model tiny --img-size 160 --batch-size 16 --device "$DEVICE" --num-workers 1 --threads 1
        --cache-dir "$CACHE" --synthetic-images 800)
# SWEEP_PRESET=demo: the sweep on the demo's model, recipe and input size (ablations.py --preset demo)
SWEEP_COMMON=("${COMMON[@]}")
[ "${SWEEP_PRESET:-tiny}" = demo ] && SWEEP_COMMON=(--preset demo --device "$DEVICE" --num-workers 1 --threads 1
        --cache-dir "$CACHE" --synthetic-images 800)
[ "${SMOKE:-0}" = 1 ] && COMMON+=(--val-samples 8) && SWEEP_COMMON+=(--val-samples 8)
if has sweep; then
$PY benchmarks/ablations.py "${SWEEP_COMMON[@]}" --steps $S1 --configs "${CONFIGS[@]}" \
    --seeds "${SEEDS[@]}" --jobs "${SWEEP_JOBS:-7}" --output-dir "$RUNS/ablations-$S1" \
    --results-name "${SWEEP_NAME:-ablations_tiny}" --results-dir "$MISC" --train-args --eval-every $EVAL > "$MISC/sweep.log" 2>&1 &
PIDS+=($!)
fi
has long && $PY benchmarks/ablations.py "${COMMON[@]}" --steps $S2 --configs n8 --seeds 0 --jobs 1 \
    --output-dir "$RUNS/ablations-6000" --results-name ablations_tiny_6000 --results-dir "$MISC" \
    --train-args --eval-every $EVAL > "$MISC/long.log" 2>&1 &
has long && PIDS+=($!)

# --- demo candidates, two lanes
demo_run() {  # name, then train_eavl.py options
  local name=$1; shift
  [ "$(elapsed)" -lt $((BUDGET - 240)) ] || { echo "skip $name (time)"; return; }
  echo "start $name at $(elapsed) s"
  $PY examples/train_eavl.py "$@" "${DEMO_EXTRA[@]}" --device "$DEVICE" --cache-dir "$CACHE" --num-workers 1 --threads 1 --no-progress \
      --overwrite --output-dir "$RUNS/demo/$name" > "$RUNS/demo/$name.stdout.log" 2>&1
  echo "end $name at $(elapsed) s (exit $?)"
}
mkdir -p "$RUNS/demo"
TINY128=(--model tiny --img-size 128 --batch-size 16 --max-steps $TINY_STEPS --epochs 100 --eval-every 225)
has demo && ( demo_run noflip-s0 --demo --no-augment --seed 0; demo_run tiny128-s0 "${TINY128[@]}" --seed 0
  demo_run noflip-s1 --demo --no-augment --seed 1; demo_run tiny128-s1 "${TINY128[@]}" --seed 1 ) > "$MISC/demo_laneA.log" 2>&1 &
has demo && PIDS+=($!)
has demo && ( demo_run demo-s0 --demo --seed 0; demo_run long-s0 --demo --max-steps $LONG_STEPS --epochs 100 --eval-every 500 --seed 0
  demo_run demo-s1 --demo --seed 1; demo_run long-s1 --demo --max-steps $LONG_STEPS --epochs 100 --eval-every 500 --seed 1 ) > "$MISC/demo_laneB.log" 2>&1 &
has demo && PIDS+=($!)

# --- stop the trainings when their share of the budget is spent
alive() { local p; for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
kill_tree() {  # a process and all its descendants (no procps needed)
  local p=$1 c
  for c in $(cat /proc/"$p"/task/*/children 2>/dev/null); do kill_tree "$c"; done
  kill -TERM "$p" 2>/dev/null
}
STOP=$((BUDGET - 120))
has speed || STOP=$((BUDGET - 25))
while [ "$(elapsed)" -lt "$STOP" ] && alive; do
  sleep 5
  if [ $(( $(elapsed) % 60 )) -lt 5 ]; then
    echo "t=$(elapsed) s: $(ls "$RUNS"/ablations-$S1/*.ablation.json 2>/dev/null | wc -l) sweep runs done"
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
  fi
done
for p in "${PIDS[@]}"; do kill_tree "$p"; done
sleep 3
echo "trainings stopped at $(elapsed) s"
[ "$MPS" = on ] && { echo quit | nvidia-cuda-mps-control; sleep 2; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; }

# --- speed tables (the GPU to itself)
wait_tests=0; while [ $wait_tests -lt 20 ] && has tests && ! grep -q "^exit" "$MISC/cuda_tests.txt" 2>/dev/null; do sleep 1; wait_tests=$((wait_tests + 1)); done
{ [ "${SMOKE:-0}" = 1 ] || ! has speed; } && BUDGET=0
LEFT=$((BUDGET - $(elapsed) - 20))
[ "$LEFT" -gt 10 ] && timeout "$LEFT" $PY benchmarks/gpu_suite.py --steps dynconv model --quick > "$MISC/gpu_suite.log" 2>&1
echo "speed tables done at $(elapsed) s"

# --- bring back: the tables, and every run's logs and metrics (no weights)
cp benchmarks/results/gpu_*.json "$MISC"/ 2>/dev/null  # gpu_suite.py writes there
tar -czf "$OUT/runs.tgz" -C "$RUNS" --exclude='*.safetensors' --exclude='*.png' . 2>/dev/null
tar -czf "$OUT/results.tgz" -C "$MISC" . 2>/dev/null
echo "done at $(elapsed) s"
ls -la "$OUT"
