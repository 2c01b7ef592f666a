#!/usr/bin/env bash
# Set-up plus the main job on the embedded default, Fashion-MNIST: train a small teacher briefly,
# store its soft labels (safetensors), distill the thesis's general student at T = 9, and print
# the soft-label entropy across temperatures. The whole script took 392 s on a busy 2-core CPU,
# set-up from a fresh checkout included (scripts/setup.sh: Triton only where there is a GPU).
# RBKD_DEMO_LIMIT (examples per split used) and RBKD_DEMO_OUT (output folder) change it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate

out=${RBKD_DEMO_OUT:-runs/demo-$(date +%Y%m%d-%H%M%S)}
limit=${RBKD_DEMO_LIMIT:-12000}
mkdir -p "$out"

# A larger batch and a single short epoch: the thesis's chapter 6 recipe for a teacher whose soft
# labels keep the similarity between classes.
rbkd train-teacher --dataset fashion-mnist --capacity small --epochs 1 --batch-size 256 \
  --limit "$limit" --out "$out/teacher"

rbkd distill --teacher "$out/teacher" --T 9 --alpha 0.99 --student general --epochs 3 \
  --batch-size 64 --limit "$limit" --out "$out/student"

rbkd analyze entropy --teacher "$out/teacher" --T 1,3,6,9,12,15,18,20 --label-smoothing-curve \
  --plot "$out/entropy.png" --json "$out/entropy.json"

echo "demo: everything is in $out (teacher/, student/, entropy.png, entropy.json)"
