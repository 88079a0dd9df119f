#!/usr/bin/env bash
# The GPU check in one call, on the device machine (bench/gpu/prepare.sh builds what it carries, and prints the call):
#   bash bench/gpu/run.sh              # there: with carry [".gpu"] and timeout_s 560, at most 8 minutes of steps
#   bash bench/gpu/run.sh --dry-run    # here: the same steps on the CPU accelerator, each run cut to a few batches
# Steps: install the carried wheels (the image's torch stays), unpack the 50k JPEGs, `pytest -m cuda`, the fast recipe
# (3 seeds; then compiled), the tutorial recipe's throughput against the tutorial's code and a raw loop, and a
# profile of one fast-recipe epoch. A step that fails or runs out of time is reported; the others still run.
# Logs go to $OUT (the device tool brings them back; at most 8 files); one summary is printed last.
set -u
cd "$(dirname "$0")/../.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-$(mktemp -d /tmp/gpu-out.XXXX)}
BUDGET=${BUDGET:-$([ $DRY -eq 1 ] && echo 2400 || echo 480)}  # seconds for all steps: the call's 560 s less a margin
SCALE=$([ $DRY -eq 1 ] && echo 5 || echo 1)  # each step's time limit x SCALE: the dry run's 2 CPU cores are slower
START=$SECONDS
DATA=/tmp/cifar10-jpeg
SUMMARY=$OUT/summary.txt
export PYTHONUNBUFFERED=1 WANDB_SILENT=true WANDB_MODE=offline
: >"$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME SECONDS COMMAND...: runs COMMAND with its output in $OUT/NAME.log, for at most SECONDS (less if the
# budget has less left), and notes its exit status, time and result lines in the summary.
step() {
  local name=$1 limit=$(($2 * SCALE))
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 20 ]; then
    say "SKIP  $name: ${left} s of the budget left"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local began=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local status=ok
  [ $rc -ne 0 ] && status="FAIL (exit $rc$([ $rc -eq 124 ] && echo ", out of its ${limit} s"))"
  say "$(printf '%-5s %-11s %4d s' "${status%% *}" "$name" $((SECONDS - began)))  ${status#ok}"
  grep -E "passed|failed|error|seed [0-9]|seeds:|fit phases|images/s|app / |fastest|ms a step|host time|device busy" \
    "$OUT/$name.log" | grep -v "^\s*$" | tail -12 | sed 's/^/      /' | tee -a "$SUMMARY"
}

if [ $DRY -eq 1 ]; then
  say "DRY RUN on the CPU: $(nproc) cores, $(python3 -c 'import torch; print("torch", torch.__version__)')"
  export CIFAR_CUDA_TESTS_ON=cpu  # tests/test_cuda.py on the CPU accelerator
  ACCEL=(--trainer.accelerator cpu)
  SHORT=(--trainer.max_epochs 1 --trainer.check_val_every_n_epoch 1 --trainer.limit_train_batches 3
         --trainer.limit_val_batches 2 --trainer.precision 32)  # fmt: a few batches of each run
  STEPS=(--steps 12 --warmup 4)
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl \
    >"$OUT/install.log" 2>&1 || { echo "installing the carried wheels failed:"; tail -20 "$OUT/install.log"; exit 1; }
  ACCEL=()
  SHORT=()
  STEPS=(--steps 400 --warmup 100)
fi
export PYTHONPATH=$PWD
[ $DRY -eq 0 ] && export PYTHONPATH=$PWD:/tmp/site  # the carried wheels, after the project
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import sys, torch, lightning, torchmetrics, wandb, jsonargparse as j; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'lightning', lightning.__version__, 'torchmetrics', \
torchmetrics.__version__, 'wandb', wandb.__version__, 'jsonargparse', j.__version__)"
  echo "$(nproc) cores"
} 2>&1 | tee -a "$SUMMARY"

mkdir -p "$DATA"
[ -d "$DATA/train" ] || tar -xzf .gpu/cifar10-train-jpeg.tar.gz -C "$DATA" 2>/dev/null || tar -xzf ../shared/data/cifar10-train-jpeg.tar.gz -C "$DATA"

step tests 180 python3 -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py
step fast 100 python3 bench/fast.py --data "$DATA" --seeds 0 1 2 -- "${ACCEL[@]}" "${SHORT[@]}"
step compiled 100 python3 bench/fast.py --data "$DATA" --seeds 0 -- --model.compile true "${ACCEL[@]}" "${SHORT[@]}"
step profile 50 python3 main.py fit --config configs/fast.yaml --data.data_dir "$DATA" --trainer.logger false \
  --trainer.enable_progress_bar false --trainer.default_root_dir /tmp/profile-run --trainer.max_epochs 2 \
  --trainer.check_val_every_n_epoch 2 --trainer.callbacks+=bench.gpu.profile.EpochProfile \
  --trainer.callbacks.output "$OUT/torch-profile.txt" "${ACCEL[@]}" \
  $([ $DRY -eq 1 ] && echo "--trainer.limit_train_batches 3 --trainer.limit_val_batches 2 --trainer.precision 32")

step throughput 60 python3 bench/throughput.py --data "$DATA" "${STEPS[@]}" --repeats 1 --no-options

say "total $((SECONDS - START)) s; logs in $OUT: $(ls "$OUT" | tr '\n' ' ')"
