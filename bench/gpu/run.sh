#!/usr/bin/env bash
# The GPU check in one call, on the device machine (bench/gpu/prepare.sh builds what it carries, and prints the call):
#   bash bench/gpu/run.sh              # there: carry [".gpu"], timeout_s $CALL
#   bash bench/gpu/run.sh --dry-run    # the same steps on the CPU accelerator, each run cut to a few batches; run it
#                                      # through bench/gpu/rehearse.sh: the device's Python and packages, minus CUDA
# Setup: the carried wheels after the image's own packages (install.sh), the 50k JPEGs unpacked, the versions.
# Then the steps, in order of value per second: the CUDA tests (pytest -m cuda), the fast recipe (3 seeds), the
# tutorial recipe's throughput against the tutorial's code and a raw loop, the first 40 steps of ResNet-18 and
# WRN-28-10 (configs/resnet18.yaml, configs/wrn28_10.yaml), a profiled fast-recipe epoch, and last
# the fast recipe compiled (two epochs of full batches: one compilation). Each step has a time limit; the limits,
# the setup's and a margin add up to the call's timeout (checked before anything runs). A step that fails or runs
# out of time is reported and the next one runs; one hung test is stopped by its own timeout (pytest-timeout).
# Each step adds its result to $OUT/summary.txt as it ends, so a call killed at its limit still brings back what
# ran. $OUT holds summary.txt, setup.log and one log a step: at most 8 files come back (checked with the budget).
# A step is one line in `steps` below: NAME, its limit in seconds on the GPU, the command.
set -u
cd "$(dirname "$0")/../.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-$(mktemp -d /tmp/gpu-out.XXXX)}
SCRATCH=${SCRATCH:-/tmp}  # the installed wheels, the unpacked images and the runs (the rehearsal gives its own)
CALL=560    # the call's timeout_s, seconds (prepare.sh prints it): at most 10 minutes, and a machine's start
            # (1-2 minutes) comes out of the session's 15 minutes of device time too
MARGIN=30   # seconds of the call no limit may use: a killed step's 10 s to exit, the tool's own start and end
SETUP=45    # seconds for the setup: installing the wheels (20), unpacking 50k JPEGs (10), importing for versions (15)
MAX_FILES=8 # the files the device tool brings back from $OUT
SCALE=$([ $DRY -eq 1 ] && echo "${DRY_SCALE:-6}" || echo 1)  # every limit x SCALE in a dry run: 2 CPU cores, no GPU
                                                               # (DRY_SCALE: more where others load the cores)
BUDGET=$(((CALL - MARGIN) * SCALE))
SITE=$SCRATCH/site
DATA=$SCRATCH/cifar10-jpeg
SUMMARY=$OUT/summary.txt
export PYTHONUNBUFFERED=1 WANDB_SILENT=true WANDB_MODE=offline PYTHONPATH=$PWD  # the project; the wheels: install.sh

if [ $DRY -eq 1 ]; then
  export CIFAR_CUDA_TESTS_ON=cpu  # tests/test_cuda.py on the CPU accelerator
  ACCEL=(--trainer.accelerator cpu --trainer.precision 32)
  CUT=(--trainer.limit_train_batches 3 --trainer.limit_val_batches 2)     # a few batches of each run
  SHORT=(--trainer.max_epochs 1 --trainer.check_val_every_n_epoch 1 "${CUT[@]}")
  FULL_BATCHES=3                         # the compiled step's batches an epoch
  STEPS=(--steps 12 --warmup 4)
  WORKERS=2                              # pytest-xdist processes for the CUDA tests
else
  ACCEL=()
  CUT=()
  SHORT=()
  FULL_BATCHES=29  # 45,000 / 1536: the full batches of an epoch; the short 30th (456) would compile again
  STEPS=(--steps 400 --warmup 100)
  WORKERS=4        # 16 cores, one GPU: each test's processes are small
fi

say() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME SECONDS COMMAND...: in the plan, adds SECONDS (x SCALE) to the limits; in the run, runs COMMAND with
# its output in $OUT/NAME.log for at most that long (less if the budget has less left; SECONDS+: all that is left),
# and adds its exit status, time and result lines to the summary.
PLANNING=1 PLANNED=$((SETUP * SCALE)) NSTEPS=0
step() {
  local name=$1 limit=$((${2%+} * SCALE)) rest=$([ "${2: -1}" = + ] && echo 1 || echo 0)
  shift 2
  if [ $PLANNING -eq 1 ]; then
    PLANNED=$((PLANNED + limit)) NSTEPS=$((NSTEPS + 1))
    return
  fi
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 20 ]; then
    say "SKIP  $name: ${left} s of the budget left"
    return
  fi
  [ "$limit" -gt "$left" ] || [ $rest -eq 1 ] && limit=$left
  say "run   $name: limit $limit s, at $((SECONDS - START)) s"
  local began=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local status=ok detail=""
  [ $rc -ne 0 ] && status=FAIL detail="(exit $rc$([ $rc -eq 124 ] && echo ", out of its ${limit} s"))"
  say "$(printf '%-5s %-11s %4d s of %d' $status "$name" $((SECONDS - began)) "$limit")  $detail"
  grep -iE "passed|failed|error|timeout|seed [0-9]|seeds:|fit phases|images/s|app / |fastest|ms a step|host time|device busy|recompil" \
    "$OUT/$name.log" | grep -v "^\s*$" | cut -c1-300 | tail -12 | sed 's/^/      /' | tee -a "$SUMMARY"
}

steps() {
  step tests 120 python3 -m pytest -m cuda -v -p no:cacheprovider -n $WORKERS --timeout $((100 * SCALE)) \
    tests/test_cuda.py
  step fast 110 python3 bench/fast.py --data "$DATA" --seeds 0 1 2 -- "${ACCEL[@]}" "${SHORT[@]}"
  step throughput 90 python3 bench/throughput.py --data "$DATA" "${STEPS[@]}" --repeats 1 --no-options
  # The classic recipes (issue 29), as their configs say: the seconds of their first 40 steps, ResNet-18 then
  # WRN-28-10 (bench/timer.py's fit phases), each process decoding the 50k JPEGs first (about 16 s).
  step recipes 55 bash -c 'for config in resnet18 wrn28_10; do python3 main.py fit --config configs/$config.yaml \
    --data.data_dir "$0" --trainer.logger false --trainer.enable_progress_bar false --trainer.max_epochs 1 \
    --trainer.limit_train_batches 40 --trainer.limit_val_batches 2 --trainer.default_root_dir "$1/$config-run" \
    --trainer.callbacks+=bench.timer.FitTimer "${@:2}" || exit; done' "$DATA" "$SCRATCH" "${ACCEL[@]}" "${CUT[@]}"
  step profile 40 python3 main.py fit --config configs/fast.yaml --data.data_dir "$DATA" --trainer.logger false \
    --trainer.enable_progress_bar false --trainer.default_root_dir "$SCRATCH/profile-run" --trainer.max_epochs 2 \
    --trainer.check_val_every_n_epoch 2 --trainer.callbacks+=bench.gpu.profile.EpochProfile \
    --trainer.callbacks.output null "${ACCEL[@]}" "${CUT[@]}"
  # Compiled last, with what is left: its compilation (forward and backward, from a cold cache) is the least
  # predictable cost. Full batches only and no validation, so it compiles once; epoch 1 is the compiled speed.
  step compiled 70+ env TORCH_LOGS=recompiles python3 main.py fit --config configs/fast.yaml --model.compile true \
    --data.data_dir "$DATA" --trainer.logger false --trainer.enable_progress_bar false --trainer.max_epochs 2 \
    --trainer.limit_train_batches $FULL_BATCHES --trainer.limit_val_batches 0 \
    --trainer.default_root_dir "$SCRATCH/compiled-run" --trainer.callbacks+=bench.gpu.epochs.EpochTimes \
    --trainer.callbacks+=bench.timer.FitTimer "${ACCEL[@]}"
}

# The plan: the limits and the setup's, with the margin, fit the call; the logs fit what comes back.
steps
PLANNING=0
if [ $PLANNED -gt $BUDGET ] || [ $((NSTEPS + 2)) -gt $MAX_FILES ]; then
  echo "error: the plan is $PLANNED s of the ${BUDGET} s budget and $((NSTEPS + 2)) files of $MAX_FILES: cut a step"
  exit 2
fi

START=$SECONDS
mkdir -p "$OUT"
: >"$SUMMARY"
say "plan: setup $((SETUP * SCALE)) s + $NSTEPS steps = $PLANNED s of $BUDGET ($((BUDGET - PLANNED)) s to spare);" \
  "call $((CALL * SCALE)) s$([ $DRY -eq 1 ] && echo ", DRY RUN on the CPU (limits x $SCALE)")"

# Setup. Where python3 has wandb already, it is not the device's environment: install.sh would add to it.
if [ $DRY -eq 1 ] && python3 -c "import wandb" 2>/dev/null; then
  say "error: this python3 has wandb: dry-run in the device's environment, bash bench/gpu/rehearse.sh"
  exit 2
fi
(
  { command -v nvidia-smi >/dev/null &&
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader; } || echo "no nvidia-smi"
  # Not on a GPU machine, the real call stops here, before install.sh adds to this python3 (rehearse.sh instead).
  [ $DRY -eq 1 ] || python3 -c "import sys, torch
sys.exit(0 if torch.cuda.is_available() else 'error: torch sees no CUDA device')" || exit 1
  timeout $((20 * SCALE)) bash bench/gpu/install.sh "$SITE" || exit 1
  archive=.gpu/cifar10-train-jpeg.tar.gz
  [ -f $archive ] || archive=../shared/data/cifar10-train-jpeg.tar.gz  # a dry run beside the shared data
  [ -d "$DATA/train" ] || { mkdir -p "$DATA" && timeout $((10 * SCALE)) tar -xzf $archive -C "$DATA"; } || exit 1
  echo "$(nproc) cores; images: $(find "$DATA/train" -type f | wc -l)"
  timeout $((15 * SCALE)) python3 -c "import sys, torch, lightning, torchmetrics, torchvision, onnx, wandb, jsonargparse as j
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'lightning',
      lightning.__version__, 'torchmetrics', torchmetrics.__version__, 'torchvision', torchvision.__version__, 'onnx',
      onnx.__version__, 'wandb', wandb.__version__, 'jsonargparse', j.__version__)
sys.exit(0 if torch.cuda.is_available() or $DRY else 'error: torch sees no CUDA device')" || exit 1
) >"$OUT/setup.log" 2>&1
rc=$?
say "$(printf '%-5s %-11s %4d s of %d' "$([ $rc -eq 0 ] && echo ok || echo FAIL)" setup $((SECONDS - START)) $((SETUP * SCALE)))"
grep -iE "nvidia|H100|H200|no nvidia-smi|cores|python |wheels|image's own|warning|error" "$OUT/setup.log" | cut -c1-400 |
  sed 's/^/      /' | tee -a "$SUMMARY"
[ $rc -eq 0 ] || { tail -20 "$OUT/setup.log"; exit 1; }

steps
say "total $((SECONDS - START)) s of $((CALL * SCALE)); $(find "$OUT" -type f | wc -l) files in \$OUT" \
  "(at most $MAX_FILES come back): $(ls "$OUT" | tr '\n' ' ')"
