#!/usr/bin/env bash
# Builds, here, everything the GPU check needs, so a lent GPU is never spent on set-up (issue 21):
#   bash bench/gpu/prepare.sh
# then the `device` tool's `run` with the call this prints. What it makes is in .gpu/ (git-ignored):
#   .gpu/wheels/                  the packages the device machine lacks (wandb, jsonargparse and their needs),
#                                 for its Python 3.12, at this machine's tested versions
#   .gpu/cifar10-train-jpeg.tar.gz  the 50k shared JPEGs (../shared does not travel)
# and it checks, with no registry, that the wheels install alone for Python 3.12, and that what travels fits.
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEELS=.gpu/wheels
# What the device image lacks (the device tool's KINDS.md lists what it has: torch 2.11, lightning 2.6.6,
# torchmetrics, torchvision, onnx, onnxruntime, onnxscript, rich, matplotlib, pytest, ...).
NEEDED="wandb jsonargparse[signatures,ruamel]"
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"
TARGET="--only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS"
LIMIT=$((64 * 1024 * 1024))  # bytes that may travel with one call: the working tree and `carry`

# The pins come from python3's own packages: it must be the environment the app is tested in (issue 28).
python3 -c "import wandb, jsonargparse" 2>/dev/null || {
  echo "error: $(command -v python3) cannot import wandb and jsonargparse; the wheels are pinned to what python3 runs:"
  echo "       run this with the project's environment first on PATH (e.g. PATH=/path/to/venv/bin:\$PATH)"; exit 2; }
mkdir -p .gpu
grep -qxF '/.gpu/' .gitignore || { echo "error: .gitignore must list /.gpu/ (the wheels and data never go into git)"; exit 2; }

# 1. The wheels, with every package they need, pinned to the versions this machine runs (and tests) the app with.
rm -rf "$WHEELS" && mkdir -p "$WHEELS"
python3 -m pip freeze --exclude-editable | grep -E '^[A-Za-z0-9_.-]+==' > .gpu/constraints.txt
python3 -m pip download -q $TARGET -c .gpu/constraints.txt -d "$WHEELS" $NEEDED 2>&1 | { grep -v "is ignored" || true; }
projects=$(ls "$WHEELS" | sed -E 's/-[0-9][^-]*-.*//' | tr 'A-Z_' 'a-z-' | sort)
if [ -n "$(echo "$projects" | uniq -d)" ]; then
  echo "error: two versions of $(echo "$projects" | uniq -d | head -1) in $WHEELS: the device's install would stop"; exit 1
fi

# 2. The data: the JPEG copy is small (16 MB); the lossless PNGs (113 MB) would not fit in a call.
cp ../shared/data/cifar10-train-jpeg.tar.gz .gpu/

# 3. The wheel set is complete for Python 3.12 with no registry: pip resolves it from these files alone.
rm -rf /tmp/gpu-dry-install
python3 -m pip install -q --dry-run --no-index --find-links "$WHEELS" $TARGET --target /tmp/gpu-dry-install $NEEDED
echo "wheels: $(ls "$WHEELS" | wc -l) files, $(du -sh "$WHEELS" | cut -f1): resolve for Python 3.12 with no index"

# 4. What travels: tracked and untracked-not-ignored files, plus the carried .gpu/.
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
carried=$(du -sb .gpu | cut -f1)
total=$((tree + carried))
echo "travels: working tree $((tree / 1024)) KiB + .gpu $((carried / 1024 / 1024)) MiB = $((total / 1024 / 1024)) MiB of 64 MiB"
[ "$total" -lt "$LIMIT" ] || { echo "error: $total bytes would travel, over 64 MiB"; exit 1; }

CALL=$(sed -nE 's/^CALL=([0-9]+).*/\1/p' bench/gpu/run.sh)  # the call's timeout, as run.sh plans its steps for it
cat <<EOF

Ready. The GPU check is one call of the device tool's run (logs and summary.txt come back under \$OUT; a machine's
           start adds a minute or two: a rerun fits in the 15 minutes only if this one stops early):
  command:   bash bench/gpu/run.sh
  carry:     [".gpu"]
  timeout_s: $CALL
Rehearse it here first (the device's Python and packages, the CPU, tiny runs):  bash bench/gpu/rehearse.sh
EOF
