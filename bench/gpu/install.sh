#!/usr/bin/env bash
# The carried wheels (.gpu/wheels, from prepare.sh) for `python3`, added after its own packages, never in their
# place (issue 28): installed into SITE with --target, and SITE named in a .pth file in python3's site-packages,
# which Python appends to sys.path after them. So the image's torch, onnx, protobuf, numpy... stay the ones it
# ships, and only what it lacks (wandb, jsonargparse, and their needs the image has not) comes from SITE.
#   bash bench/gpu/install.sh [SITE]        # default /tmp/site; run.sh calls it, so does rehearse.sh --suite
# Then checks it: torch, onnx, protobuf, numpy and yaml must be the image's (exit 1 if not), and every requirement
# of a carried package should be met by the copy Python finds first, the image's where it has one (a warning: the
# GPU call goes on, its tests tell; bench/gpu/rehearse.sh counts it as a failure).
set -euo pipefail
cd "$(dirname "$0")/../.."
SITE=${1:-/tmp/site}
PTH=cifar-gpu-wheels.pth

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu/wheels/*.whl
purelib=$(python3 -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
echo "$SITE" >"$purelib/$PTH" || { echo "error: cannot write $purelib/$PTH (python3's site-packages)"; exit 1; }

python3 - "$SITE" <<'EOF'
import importlib, importlib.metadata as metadata, sys
from pathlib import Path
from packaging.requirements import Requirement

site = Path(sys.argv[1]).resolve()
IMAGE = {"torch": "torch", "onnx": "onnx", "google.protobuf": "protobuf", "numpy": "numpy", "yaml": "pyyaml"}
CARRIED = {"wandb": "wandb", "jsonargparse": "jsonargparse"}  # module: distribution

def where(module: str) -> Path:
    return Path(importlib.import_module(module).__file__).resolve()

def listing(modules: dict) -> str:
    """'torch 2.11.0, onnx 1.23.1 in /their/site-packages', one group per folder."""
    folders: dict[Path, list[str]] = {}
    for module, dist in modules.items():
        folder = where(module).parents[module.count(".") + 1]  # above the package (google/protobuf/: two up)
        folders.setdefault(folder, []).append(f"{dist} {metadata.version(dist)}")
    return "; ".join(f"{', '.join(found)} in {folder}" for folder, found in folders.items())

shadowed = [m for m in IMAGE if where(m).is_relative_to(site)]
own = [m for m in CARRIED if not where(m).is_relative_to(site)]  # an image that ships it: its copy is used
# Every requirement of a carried distribution, met by the distribution Python finds first under that name.
unmet = []
for dist in metadata.distributions(path=[str(site)]):
    for text in dist.requires or []:
        requirement = Requirement(text)
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue
        try:
            found = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            found = None
        if found is None or not requirement.specifier.contains(found, prereleases=True):
            unmet.append(f"{dist.metadata['Name']} needs {requirement}, finds {found}")
print(f"wheels: {len(list(site.glob('*.dist-info')))} in {site}, after site-packages: {listing(CARRIED)}")
print(f"the image's own: {listing(IMAGE)}")
for m in own:
    print(f"note: {m} is the image's own copy, not the carried one")
for problem in unmet:
    print(f"warning: {problem}")
for m in shadowed:
    print(f"error: {m} comes from the carried wheels, not the image's site-packages")
sys.exit(1 if shadowed else 0)
EOF
