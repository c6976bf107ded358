#!/usr/bin/env bash
# One character end to end on one GPU, the way a user runs it: 20 photos of 1200x1600, an SD 1.x-size
# base model (random weights, fp16 LDM .safetensors), NCLASS class images, STEPS training steps,
# export and samples, through `snakemake --cores 16 --resources gpu=1`.
# On the GPU machine, from the project root, after `source .devkit/setup.sh` and `source bench/gpu_bytecode.sh`
# (../shared/tools/device-workflow-kit.sh). Works in /tmp/e2e (kept between calls of one machine, so
# a second character there finds the base model and warm compile caches).
# Env: NAME (alice), CLASS (woman), STEPS (1000), NCLASS (200), LIMIT (540 s), COLD=1 empties the
# compile caches (Triton's and inductor's, under /tmp/e2e-cache) first, TRAIN_EXTRA (yaml lines under train:),
# CHARACTER_EXTRA (top-level yaml lines of the character file), MASKS=1 (a subject mask beside each photo),
# CLASS_DATA (class_images.class_data: generate, or prior_prediction).
# CPUS (e.g. 0-15): run on those cores only (taskset), so that a baseline beside it on the other
# GPU gets the other half of the host: the diffusers example is CPU-bound and slowed by a third
# when both shared 32 cores (docs/benchmarks.md, call 9).
# Prints per-rule seconds from Snakemake's benchmark files; writes $OUT/e2e-$NAME.log.
set -u
OUT=${OUT:-/tmp/e2e-out}; mkdir -p "$OUT"
NAME=${NAME:-alice}; CLASS=${CLASS:-woman}; STEPS=${STEPS:-1000}
mkdir -p /tmp/e2e && tar --exclude=./.whl --exclude=./.devkit --exclude=./results --exclude=./.snakemake --exclude=./config/characters -cf - . | tar -xf - -C /tmp/e2e
cd /tmp/e2e
# compile caches of its own (a test run beside it on another GPU does not warm them)
export TRITON_CACHE_DIR=/tmp/e2e-cache/triton TORCHINDUCTOR_CACHE_DIR=/tmp/e2e-cache/inductor
[ -n "${COLD:-}" ] && rm -rf /tmp/e2e-cache results
secs() { python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$@"; }
python3 bench/sd1_base.py /tmp/base
python3 bench/e2e_photos.py "/tmp/photos/$NAME" ${MASKS:+--masks}
cat > config/config.yaml <<YAML
base_model: /tmp/base/sd1-random.safetensors
tokenizer: /tmp/base/tokenizer
YAML
mkdir -p config/characters; rm -f config/characters/*.yaml
cat > "config/characters/$NAME.yaml" <<YAML
instance_dir: /tmp/photos/$NAME
token: sks
class_word: $CLASS
class_images:
  num_class_images: ${NCLASS:-200}
  class_data: ${CLASS_DATA:-generate}
train:
  max_steps: $STEPS
${TRAIN_EXTRA:-}
${CHARACTER_EXTRA:-}
YAML
S=$(date +%s.%N)
TORCH_LOGS=recompiles timeout ${LIMIT:-540} ${CPUS:+taskset -c $CPUS} snakemake --cores 16 --resources gpu=1 > "$OUT/e2e-$NAME.log" 2>&1; rc=$?
E=$(date +%s.%N)
echo "e2e $NAME rc=$rc wall $(secs $S $E) s (steps $STEPS, class images ${NCLASS:-200})"
[ $rc = 0 ] || tail -25 "$OUT/e2e-$NAME.log"
for f in results/class/*/benchmarks/*.tsv results/$NAME/benchmarks/*.tsv results/$NAME/benchmarks/*/*.tsv; do
  [ -f "$f" ] && echo "  $(basename $(dirname $(dirname $f)))/$(basename $f .tsv): $(tail -1 $f | cut -f1) s, max RSS $(tail -1 $f | cut -f3) MB"
done
echo "  recompiles: $(cat results/$NAME/logs/*.log results/class/*/logs/*.log 2>/dev/null | grep -c Recompiling)"
grep -h "using GPU\|done in\|loaded\|cached\|step 25/\|step $STEPS/\|written\|state of step" results/$NAME/logs/*.log results/class/*/logs/*.log 2>/dev/null | cut -c1-200 | tail -14
echo "  train log:"; grep -v "it/s\]" results/$NAME/logs/train.log | head -6 | cut -c1-160
# where the class-images, sample and export jobs' seconds go (load, sampling, PNG writes, contact sheet, file IO)
grep -h "class images: model loaded\|contact sheet of\|sample: \|export: " results/class/*/logs/*.log \
  results/$NAME/logs/sample.log results/$NAME/logs/export-*.log 2>/dev/null | cut -c1-260
ls -la results/$NAME/*.safetensors
cp results/$NAME/samples/final.png "$OUT/final-$NAME.png" 2>/dev/null
tar czf "$OUT/logs-$NAME.tgz" results/$NAME/logs results/$NAME/benchmarks results/$NAME/train/loss.csv results/class/*/logs 2>/dev/null
