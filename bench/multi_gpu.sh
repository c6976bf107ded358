#!/usr/bin/env bash
# Issue 20's figures on one machine of 2 or more GPUs, SD 1.x size (random weights), 20 photos of
# 1200x1600 per character, in one device call of at most 8 minutes. On the GPU machine, from the
# project root, after `source .devkit/setup.sh` (../shared/tools/device-workflow-kit.sh):
#   1. alice and bob one after the other on one GPU (--resources gpu=1), then side by side
#      (--resources gpu=2), each run up to their exported models (UNTIL=export; UNTIL= runs the
#      whole workflow, samples included, about 30 s more a character): the wall time of each, their
#      ratio (goal: at most 0.55) and the GPUs each job took (each sees only its own);
#   2. alice with train.devices 2 (DDP, batch 1 a GPU) against alice on one GPU (from run 1): it/s
#      and images/s (goal: at least 1.8x the images/s), the lines each rank logged, and the trained
#      UNet against a one-GPU run of the same global batch (batch_size 2): their distance as a
#      share of the distance training moved the weights, beside the same share for one GPU at
#      batch 1 (the wrong global batch). The CPU test trains 3 steps (bound: under 0.3 for DDP,
#      over 0.5 for the wrong batch); over more steps runs that differ only in float rounding drift
#      apart (tiny model on a CPU: DDP 0.22 of the distance moved after 3 steps, 0.72 after 10,
#      against 1.16 and 1.09 for the wrong batch), so at STEPS steps the two shares are context,
#      and the check is the GPU twins of the CPU test, which run first (tests/test_gpu_slots.py
#      -k ddp_on_two_gpus: tiny model, 3 steps, judged beside one GPU accumulating 2 micro-batches
#      and its rerun; they print their figures as "GPU ddp: ...", about 2 minutes in all).
# To fit the call: STEPS (150) steps, NCLASS (16) class images, made once for both characters (both
# are "woman") by a warm-up run before the timed ones. The warm-up also trains WARM_STEPS (30)
# steps where no compile cache is on the machine yet (bench/e2e_gpu.sh leaves one; WARM_STEPS=0
# skips it). PAIR=0 leaves bob and the side-by-side run out (part 2 only), TWINS=0 the GPU twins. The DDP run runs the UNet as train.compile auto does (CUDA graphs) unless DDP_COMPILE says
# otherwise. The snakemake calls stop at DEADLINE (420) s after the start, leaving time for the
# figures: a part that did not finish says so.
# Works in /tmp/multi (reusing /tmp/base, the base model bench/e2e_gpu.sh builds). Writes
# $OUT/multi-<run>.log and $OUT/multi-<run>-<name>-train.log; the figures at the end.
# On a CPU (SIZE=tiny DREAMPIPE_GPUS=2: two fake GPU slots, DDP over CPU processes) it checks itself.
set -u
START=$(date +%s)
# the compile caches bench/e2e_gpu.sh keeps (warm when it ran on this machine)
export TRITON_CACHE_DIR=/tmp/e2e-cache/triton TORCHINDUCTOR_CACHE_DIR=/tmp/e2e-cache/inductor
OUT=${OUT:-/tmp/multi-out}; mkdir -p "$OUT"
STEPS=${STEPS:-150}; NCLASS=${NCLASS:-16}; UNTIL=${UNTIL-export}; SIZE=${SIZE:-sd1}
WORK=${WORK:-/tmp/multi}; BASE=${BASE:-/tmp/base}; [ "$SIZE" = tiny ] && BASE=$WORK/base
END=$((START + ${DEADLINE:-420}))
ROOT=$PWD
# a CUDA_VISIBLE_DEVICES of the machine would show every job every GPU (gpu_slots then takes none)
[ -n "${CUDA_VISIBLE_DEVICES+x}" ] && echo "CUDA_VISIBLE_DEVICES was '$CUDA_VISIBLE_DEVICES': unset" && unset CUDA_VISIBLE_DEVICES
mkdir -p "$WORK" && tar --exclude=./.whl --exclude=./.devkit --exclude=./results --exclude=./.snakemake \
  --exclude=./config/characters -cf - . | tar -xf - -C "$WORK"
cd "$WORK" || exit 1
python3 bench/sd1_base.py "$BASE" --size "$SIZE"
for n in alice bob; do [ -d "$WORK/photos/$n" ] || python3 bench/e2e_photos.py "$WORK/photos/$n"; done
{ echo "base_model: $BASE/sd1-random.safetensors"; echo "tokenizer: $BASE/tokenizer"; } > config/config.yaml
[ "$SIZE" = tiny ] && cat >> config/config.yaml <<YAML
prepare: {resolution: 64}
class_images: {steps: 2}
train: {sample_steps: 2, sample_every_n_steps: 0}
sample: {steps: 2, seeds: [0]}
YAML
rm -rf models "$OUT/alice-1.log" "$OUT/alice-2.log"  # nothing of an earlier run is compared
mkdir -p config/characters models

character() {  # NAME DEVICES STEPS [BATCH [COMPILE]]: rewrites the only character files there are
  cat > "config/characters/$1.yaml" <<YAML
instance_dir: $WORK/photos/$1
token: sks
class_word: woman
class_images:
  num_class_images: $NCLASS
train:
  max_steps: $3
  devices: $2
  batch_size: ${4:-1}
  compile: ${5:-auto}
YAML
}

WALL=0
run() {  # LABEL GPUS UNTIL: one snakemake call from fresh character results (the class set stays)
  rm -rf results/alice results/bob
  local left=$((END - $(date +%s))) S E rc
  if [ "$left" -lt 20 ]; then echo "$1: skipped, the deadline is near"; WALL=nan; return 1; fi
  S=$(date +%s.%N)
  timeout "$left" snakemake --cores 16 --resources gpu="$2" ${3:+--until "$3"} > "$OUT/multi-$1.log" 2>&1; rc=$?
  E=$(date +%s.%N)
  WALL=$(python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$S" "$E")
  echo "$1 rc=$rc wall $WALL s (--resources gpu=$2${3:+, until $3})"
  [ "$rc" = 0 ] || { tail -25 "$OUT/multi-$1.log"; WALL=nan; }
  for f in results/*/logs/train.log; do
    [ -f "$f" ] || continue
    name=$(basename "$(dirname "$(dirname "$f")")")
    cp "$f" "$OUT/multi-$1-$name-train.log"
    echo "  $name: $(grep -h "using GPU" "$f" | sed 's/^[0-9-]* [0-9:,]* //' | tr '\n' ';')" \
      "train $(tail -1 "results/$name/benchmarks/train.tsv" 2>/dev/null | cut -f1) s"
  done
  return "$rc"
}

keep() {  # NAME: alice's trained model, kept for the comparison at the end
  mv results/alice/train/model.safetensors "models/$1.safetensors" 2>/dev/null
}

rm -f config/characters/*.yaml
character alice 1 "${WARM_STEPS:-30}"
if [ "${WARM_STEPS:-30}" -gt 0 ] && [ ! -d /tmp/e2e-cache/triton ]; then run warmup 1 train; else run warmup 1 class_images; fi

rm -f config/characters/*.yaml
character alice 1 "$STEPS"; [ "${PAIR:-1}" = 1 ] && character bob 1 "$STEPS"
run one-gpu-in-turn 1 "$UNTIL"; SEQ=$WALL; cp "$OUT/multi-one-gpu-in-turn-alice-train.log" "$OUT/alice-1.log" 2>/dev/null
keep b1
PAR=nan; [ "${PAIR:-1}" = 1 ] && { run side-by-side 2 "$UNTIL"; PAR=$WALL; }

rm -f config/characters/*.yaml
character alice 2 "$STEPS" 1 "${DDP_COMPILE:-auto}"
run devices-2 2 train && keep ddp && cp results/alice/logs/train.log "$OUT/alice-2.log"
character alice 1 "$STEPS" 2
# the GPU twins of the CPU tests (train, and resume after a kill), at their own size and bound
# (about 40 s each), before the longer SD-size run
if [ "${TWINS:-1}" = 0 ]; then
  echo "tests/test_gpu_slots.py -k ddp_on_two_gpus: left out (TWINS=0)"
elif [ $((END - $(date +%s))) -gt 90 ]; then
  (cd "$ROOT" && timeout $((END - $(date +%s))) python3 -m pytest -q -m gpu tests/test_gpu_slots.py \
    -s -k ddp_on_two_gpus 2>&1 | grep -E "passed|failed|^FAILED|^E |Error|^GPU ddp" | tail -80)
else
  echo "tests/test_gpu_slots.py -k ddp_on_two_gpus: skipped, the deadline is near"
fi
if [ $((END - $(date +%s))) -gt 45 ]; then
  run one-gpu-batch-2 1 train && keep b2
else
  echo "one-gpu-batch-2: skipped, the deadline is near"
fi

echo "== figures (STEPS=$STEPS, NCLASS=$NCLASS, SIZE=$SIZE, $(($(date +%s) - START)) s in all)"
python3 - "$SEQ" "$PAR" "$OUT" "$STEPS" <<'PY'
import re, sys
from datetime import datetime
from pathlib import Path

seq, par, out, steps = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
if "nan" in (seq, par):
    print(f"two characters: in turn {seq} s, side by side {par} s: no ratio")
else:
    print(f"two characters: in turn on one GPU {seq} s, side by side on two {par} s: "
          f"{float(par) / float(seq):.3f}x (goal <= 0.55)")


def rate(log: Path):
    """Rank 0's steps a second between its first logged step and the last (compile and load left out)."""
    if not log.exists():
        return None
    at = [(int(m[3]), datetime.strptime(f"{m[1]} {m[2]}", "%Y-%m-%d %H:%M:%S,%f")) for m in
          re.finditer(r"^(\S+) (\S+) dreampipe\.train: step (\d+)/\d+", log.read_text(), re.M)]
    if len(at) < 2 or at[-1][0] != steps:
        return None
    return (at[-1][0] - at[0][0]) / (at[-1][1] - at[0][1]).total_seconds()


one, two = rate(out / "alice-1.log"), rate(out / "alice-2.log")
if one and two:
    print(f"train.devices 1: {one:.2f} it/s; devices 2: {two:.2f} it/s of a global batch twice as large: "
          f"{2 * two / one:.2f}x the images a second of one GPU (goal >= 1.8)")
else:
    print(f"no it/s: devices 1 {one}, devices 2 {two}")
log = out / "alice-2.log"
if log.exists():
    lines = log.read_text().splitlines()
    ranks = sum(" rank 1 " in line for line in lines)
    print(f"train.log of devices 2: {len(lines) - ranks} lines of rank 0, {ranks} of rank 1, "
          f"'train done' by {sum(': train done in' in line for line in lines)} ranks")
PY
python3 - "$BASE/sd1-random.safetensors" models/b1.safetensors models/b2.safetensors models/ddp.safetensors <<'PY'
import sys
from pathlib import Path

import torch
from safetensors import safe_open

base, b1, b2, ddp = sys.argv[1:]
if not all(Path(p).exists() for p in sys.argv[1:]):
    sys.exit(f"no comparison of the trained UNets: missing {[p for p in sys.argv[1:] if not Path(p).exists()]}")
files = {n: safe_open(p, framework="pt") for n, p in (("base", base), ("b1", b1), ("b2", b2), ("ddp", ddp))}
sq = {"moved": 0.0, "ddp": 0.0, "b1": 0.0}
for k in files["b2"].keys():
    if not k.startswith("model.diffusion_model."):
        continue
    trained = files["b2"].get_tensor(k)
    ref = trained.float()
    start = files["base"].get_tensor(k).to(trained.dtype).float()  # training starts from the cast weights
    sq["moved"] += float((ref - start).square().sum())
    sq["ddp"] += float((files["ddp"].get_tensor(k).float() - ref).square().sum())
    sq["b1"] += float((files["b1"].get_tensor(k).float() - ref).square().sum())
moved = sq["moved"] ** 0.5
print(f"trained UNet against one GPU at the same global batch (batch_size 2), as a share of the distance it moved "
      f"({moved:.4g}): devices 2 {sq['ddp'] ** 0.5 / moved:.3f}; one GPU at batch 1, the wrong global batch: "
      f"{sq['b1'] ** 0.5 / moved:.3f} (the CPU test, at 3 steps: < 0.3 and > 0.5)")
PY
