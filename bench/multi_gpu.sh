#!/usr/bin/env bash
# Issue 20's figures on one machine of 2 or more GPUs, SD 1.x size (random weights), 20 photos of
# 1200x1600 per character, as a user runs it. On the GPU machine, from the project root, after
# `source .devkit/setup.sh` (../shared/tools/device-workflow-kit.sh):
#   1. alice and bob one after the other on one GPU (--resources gpu=1), then side by side
#      (--resources gpu=2): the wall time of each, their ratio (goal: at most 0.55) and the GPUs
#      each job took (each sees only its own);
#   2. alice with train.devices 1, then 2 (same per-GPU batch): the it/s of each from the train
#      log's last step line (goal: at least 1.8x), and how many lines each rank logged.
# A warm-up run of STEPS_WARM steps first makes the class set (shared, kept) and warms the caches.
# Works in /tmp/multi. Env: STEPS (500), STEPS_WARM (50), NCLASS (50), LIMIT (s per snakemake call, 500).
# Writes $OUT/multi-<run>.log and $OUT/multi-<run>-<name>-train.log.
set -u
OUT=${OUT:-/tmp/multi-out}; mkdir -p "$OUT"
STEPS=${STEPS:-500}
mkdir -p /tmp/multi && tar --exclude=./.whl --exclude=./.devkit --exclude=./results --exclude=./.snakemake --exclude=./config/characters -cf - . | tar -xf - -C /tmp/multi
cd /tmp/multi
secs() { python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$@"; }
python3 bench/sd1_base.py /tmp/base
for n in alice bob; do python3 bench/e2e_photos.py "/tmp/photos/$n"; done
cat > config/config.yaml <<YAML
base_model: /tmp/base/sd1-random.safetensors
tokenizer: /tmp/base/tokenizer
YAML
mkdir -p config/characters

character() {  # NAME DEVICES STEPS: the only characters are those written since `rm`
  cat > "config/characters/$1.yaml" <<YAML
instance_dir: /tmp/photos/$1
token: sks
class_word: woman
class_images:
  num_class_images: ${NCLASS:-50}
train:
  max_steps: $3
  devices: $2
YAML
}

WALL=0
run() {  # LABEL GPUS: one snakemake call from fresh character results (the class set stays)
  rm -rf results/alice results/bob
  local S E rc
  S=$(date +%s.%N)
  timeout "${LIMIT:-500}" snakemake --cores 16 --resources gpu="$2" > "$OUT/multi-$1.log" 2>&1; rc=$?
  E=$(date +%s.%N)
  WALL=$(secs "$S" "$E")
  echo "$1 rc=$rc wall $WALL s (--resources gpu=$2)"
  [ "$rc" = 0 ] || tail -25 "$OUT/multi-$1.log"
  for f in results/*/logs/train.log; do
    [ -f "$f" ] || continue
    name=$(basename "$(dirname "$(dirname "$f")")")
    cp "$f" "$OUT/multi-$1-$name-train.log"
    echo "  $name: $(grep -h "using GPU" "$f" | sed 's/^[0-9-]* [0-9:,]* //' | tr '\n' ';')" \
      "train $(tail -1 "results/$name/benchmarks/train.tsv" 2>/dev/null | cut -f1) s"
  done
}

rate() {  # it/s of rank 0's last step line of alice's training
  grep -v " rank [1-9]" results/alice/logs/train.log | grep "step $STEPS/$STEPS" | tail -1 | sed 's/.*(\(.*\))$/\1/'
}

rm -f config/characters/*.yaml
character alice 1 "${STEPS_WARM:-50}"
run warmup 1

rm -f config/characters/*.yaml
character alice 1 "$STEPS"; character bob 1 "$STEPS"
run one-gpu-in-turn 1; SEQ=$WALL
run side-by-side 2; PAR=$WALL
echo "side by side / in turn: $(python3 -c "print(round($PAR / $SEQ, 3))") (goal <= 0.55)"

rm -f config/characters/*.yaml
character alice 1 "$STEPS"
run devices-1 1; R1=$(rate)
character alice 2 "$STEPS"
run devices-2 2; R2=$(rate)
echo "it/s: devices 1 $R1, devices 2 $R2: $(python3 -c "print(round($R2 / $R1, 2))")x (goal >= 1.8)"
echo "lines logged by rank 0: $(grep -vc " rank [1-9]" results/alice/logs/train.log)," \
  "rank 1: $(grep -c " rank 1 " results/alice/logs/train.log)"
