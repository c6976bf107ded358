#!/usr/bin/env bash
# speed.FlatGradients on one GPU, on and off (the default since this ran, 2026-12-01;
# DREAMPIPE_FLAT_GRADIENTS=0 turns it off). On the GPU machine, from the project root, after
# `source .devkit/setup.sh` and `source bench/gpu_bytecode.sh` (about 6 minutes on an H200):
#   1. its GPU twins with it on: the graphed training step against eager (the weights' gradients
#      added into the flat buffer by the graph; the text context's gradient; the first step;
#      accumulation), and the low-memory profile at SD size (goal: <= 6 GiB at >= 15 it/s);
#   2. bench/train_speed.py's default and low-memory profiles without and with it (it/s, peak GiB).
# Writes $OUT/twins.txt and $OUT/speed-<profile>-<0|1>.txt.
set -u
OUT=${OUT:-/tmp/flat-out}; mkdir -p "$OUT"
export TRITON_CACHE_DIR=/tmp/flat-cache/triton TORCHINDUCTOR_CACHE_DIR=/tmp/flat-cache/inductor
DREAMPIPE_FLAT_GRADIENTS=1 timeout -k 10 "${TWINS_LIMIT:-240}" python3 -m pytest -q -s -m gpu tests/test_gpu.py \
  -k "compiled_training or low_memory" -p no:cacheprovider > "$OUT/twins.txt" 2>&1
echo "twins (DREAMPIPE_FLAT_GRADIENTS=1):"; grep -E "^GPU|passed|failed|^E " "$OUT/twins.txt" | tail -30
for profile in default low_memory; do
  for flat in 0 1; do
    DREAMPIPE_FLAT_GRADIENTS=$flat timeout -k 10 "${SPEED_LIMIT:-120}" python3 bench/train_speed.py "$profile" \
      --warm 10 --steps 50 > "$OUT/speed-$profile-$flat.txt" 2>&1
    echo "$profile, DREAMPIPE_FLAT_GRADIENTS=$flat: $(grep "^train-" "$OUT/speed-$profile-$flat.txt" | tail -1 | cut -c1-400)"
  done
done
