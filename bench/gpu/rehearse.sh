#!/usr/bin/env bash
# The GPU call rehearsed in the device's own environment, minus CUDA (issue 28), so that a lent GPU is not spent
# finding what a CPU could have:
#   bash bench/gpu/rehearse.sh                  # prepare.sh, then `run.sh --dry-run` as the device would run run.sh
#   DRY_SCALE=10 bash bench/gpu/rehearse.sh     # the same with every limit x 10, not x 6: where others load the cores
#   bash bench/gpu/rehearse.sh --suite [ARGS]   # the project's tests (pytest ARGS) in the same environment
# The environment is the device image's (the device tool's KINDS.md): Python 3.12, torch 2.11.0 (a CUDA build, which
# runs on the CPU), torchvision 0.26.0, torchmetrics 1.9.0, lightning 2.6.6, onnx 1.23.1, onnxruntime 1.30.0,
# onnxscript 0.7.2, numpy 2.5.2, pytest with pytest-timeout and pytest-xdist; and no wandb, jsonargparse or
# litserve: those come from the carried wheels, installed as the device installs them (install.sh). It is built
# from the registry once, into $REHEARSAL_ENV (default ~/.cache/cifar-gpu-rehearsal/..., outside the repository,
# so it never travels with a call), and reused while its versions are these. Its Python is $PYTHON312 (3.12.1
# here; the image has 3.12.3).
# The dry run runs in a copy of what the call carries (the working tree's tracked and untracked-not-ignored files,
# and .gpu/; not ../shared), with python3 first on PATH and nothing else of this shell's environment, $OUT empty.
# It passes when every step is `ok`, the wheels met every requirement, and $OUT holds at most 8 files.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
PYTHON312=${PYTHON312:-$(command -v python3.12 || echo /root/.pyenv/versions/3.12.1/bin/python3.12)}
IMAGE="torch==2.11.0 torchvision==0.26.0 torchmetrics==1.9.0 lightning==2.6.6 pytorch-lightning==2.6.6 onnx==1.23.1
onnxruntime==1.30.0 onnxscript==0.7.2 onnx-ir==1.0.0 numpy==2.5.2 pytest pytest-timeout pytest-xdist pillow pyyaml rich
matplotlib tensorboard protobuf requests psutil timm"  # the image's versions where KINDS.md gives them; the rest: the newest
ENV=${REHEARSAL_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/cifar-gpu-rehearsal/py3.12-torch2.11.0}
PTH=$ENV/lib/python3.12/site-packages/cifar-gpu-wheels.pth  # install.sh's; removed after each rehearsal
began=$SECONDS

# 1. The device's environment, built once.
if [ "$(cat "$ENV/image.txt" 2>/dev/null)" != "$IMAGE" ] || ! "$ENV/bin/python3" -c "import torch" 2>/dev/null; then
  echo "building the device's environment in $ENV (a few GB, minutes)"
  rm -rf "$ENV"
  "$PYTHON312" -m venv "$ENV"
  "$ENV/bin/python3" -m pip install -q --upgrade pip
  "$ENV/bin/python3" -m pip install -q $IMAGE
  echo "$IMAGE" >"$ENV/image.txt"
fi
"$ENV/bin/python3" - <<'EOF'
import importlib.util, sys, torch
present = [m for m in ("wandb", "jsonargparse", "litserve") if importlib.util.find_spec(m)]
if present:
    sys.exit(f"error: the device's environment must not have {', '.join(present)}: the carried wheels bring them")
print(f"environment: Python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda} build, "
      f"CUDA available: {torch.cuda.is_available()}), at {sys.prefix}")
EOF
rm -f "$PTH"
trap 'rm -f "$PTH"' EXIT
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cifar-rehearsal.XXXX")
device() {  # COMMAND...: as the device runs it: python3 first on PATH, no PYTHONPATH or venv of this shell
  env -i PATH="$ENV/bin:/usr/local/bin:/usr/bin:/bin" HOME="$HOME" LANG=C.UTF-8 \
    TORCHINDUCTOR_CACHE_DIR="$WORK/inductor" TRITON_CACHE_DIR="$WORK/triton" "$@"  # compilation from a cold cache
}

if [ "${1:-}" = "--suite" ]; then  # 2'. The project's tests, with the carried wheels (our second environment).
  shift
  [ -d .gpu/wheels ] || bash bench/gpu/prepare.sh >"$WORK/prepare.log"
  device bash bench/gpu/install.sh "$WORK/site"
  rc=0
  device CI="${CI:-}" python3 -m pytest -p no:cacheprovider "$@" || rc=$?
  rm -rf "$WORK"
  exit $rc
fi

# 2. What the call carries, made here as the device call needs it.
bash bench/gpu/prepare.sh >"$WORK/prepare.log" 2>&1 || { cat "$WORK/prepare.log"; exit 1; }
grep -E "^(wheels|travels):" "$WORK/prepare.log"
mkdir -p "$WORK/repo" "$WORK/out"
git ls-files -z --cached --others --exclude-standard | tar --null -T - --ignore-failed-read -cf - | tar -xf - -C "$WORK/repo"
cp -r .gpu "$WORK/repo/"
echo "prepared in $((SECONDS - began)) s; the call's copy in $WORK/repo"

# 3. The call, dry: every step on the CPU, in the device's environment.
cd "$WORK/repo"
device OUT="$WORK/out" SCRATCH="$WORK" DRY_SCALE="${DRY_SCALE:-6}" bash bench/gpu/run.sh --dry-run || true
cd "$REPO"
rm -rf "$WORK/site" "$WORK/cifar10-jpeg" "$WORK/profile-run" "$WORK/compiled-run" "$WORK/repo" "$WORK/inductor"
files=$(find "$WORK/out" -type f | wc -l)
failed=$(grep -cE "^(FAIL|SKIP)|^ *(warning|error):" "$WORK/out/summary.txt" || true)
steps=$(grep -cE "^ok " "$WORK/out/summary.txt" || true)
echo "rehearsal: $steps steps ok, $failed failed, skipped or warned; $files files in \$OUT ($WORK/out); $((SECONDS - began)) s"
[ "$failed" -eq 0 ] && [ "$files" -le 8 ] && grep -q "^total " "$WORK/out/summary.txt"
