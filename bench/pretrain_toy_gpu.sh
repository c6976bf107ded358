#!/usr/bin/env bash
# Issue 18 on one GPU: (a) pretrain the toy base model with `dreampipe pretrain-toy` (its GPU
# settings: time budgets of about 5 minutes in all), (b) check it: the classifier reads shape,
# colour, pattern and background of its samples as asked on the held-out test seeds (goal >= 0.9
# each), (c) while time is left, the recipe comparison on the test seeds from the new base model:
# our demo recipe, the diffusers example's, ours without prior preservation.
# On the GPU machine, from the project root:
#     source .devkit/setup.sh && bash bench/pretrain_toy_gpu.sh
# Writes into $OUT: toy-sd/ (the model, tokenizer, classifier, pretrain.json, pretrain-loss.csv/png,
# samples.png, check.png, pretrain.log), check.md, recipes.md and recipes/<recipe>/evaluation.*,
# device.txt, timings.txt.
# Env: SETTINGS (JSON over pretrain-toy's settings), RECIPE_ARGS (more bench/toy_recipes.py
# arguments), LIMIT (seconds for the whole script, 480: the comparison is cut off there).
set -u
OUT=${OUT:-/tmp/pretrain-toy-out}
mkdir -p "$OUT/toy-sd"
LIMIT=${LIMIT:-480}
SETTINGS=${SETTINGS:-'{}'}
rm -rf /tmp/toy-recipes
START=$(date +%s)
elapsed() { echo $(($(date +%s) - START)); }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  nproc; python3 -c "import torch; print('torch', torch.__version__)"; } > "$OUT/device.txt"
cat "$OUT/device.txt"

dreampipe pretrain-toy "$OUT/toy-sd" --settings "$SETTINGS" --log "$OUT/toy-sd/pretrain.log" || exit 1
echo "pretrain-toy: $(elapsed) s" | tee "$OUT/timings.txt"

python3 - "$OUT/toy-sd/pretrain.json" > "$OUT/check.md" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
c = s["check"]
print(f"Device {s['unet']['device']}, torch {s['unet']['torch']}; seconds per stage: "
      + ", ".join(f"{k} {v['seconds']}" for k, v in s.items()))
print(f"VAE {s['vae']['steps']} steps ({s['vae']['pictures']} pictures); UNet {s['unet']['steps']} steps of "
      f"{s['unet']['settings']['unet_batch_size']} on {s['unet']['pictures']} pictures, CUDA graphs {s['unet']['unet_graphs']}")
print(f"classifier on clean held-out pictures: {s['classifier']['accuracy_on_toy_world']}")
print(f"classifier on VAE round trips: {c['round_trip_accuracy']}")
print(f"\nBase model samples of fully described things, {len(c['seeds'])} test seeds, read as asked:\n")
print("| attribute | rate [95 % interval] |\n|---|---|")
for k, v in c["prompt_agreement"].items():
    print(f"| {k} | {v:.2f} [{c['ci95'][k][0]:.2f}, {c['ci95'][k][1]:.2f}] |")
print(f"\ngoal (>= 0.9 each): {'met' if min(c['prompt_agreement'].values()) >= 0.9 else 'NOT met'}")
PY
cat "$OUT/check.md"
echo "check: $(elapsed) s" | tee -a "$OUT/timings.txt"

LEFT=$((LIMIT - $(elapsed)))
if [ "$LEFT" -lt 60 ]; then
  echo "no time left for the recipe comparison ($LEFT s)"
  exit 0
fi
# Training as on any GPU (bf16 weights); work in /tmp, the evaluations to $OUT.
# The issue's three recipes first (demo, diffusers example, no prior preservation), then as many
# of the variations as the limit leaves time for (about 25 s each on an H200).
timeout "$LEFT" python3 bench/toy_recipes.py --base-model "$OUT/toy-sd" --out /tmp/toy-recipes \
  ${RECIPE_ARGS:-} > "$OUT/recipes.md" 2> "$OUT/recipes.log"
rc=$?
echo "recipes rc=$rc (124: cut off at the limit)"
[ $rc = 0 ] || grep -v "^train:" "$OUT/recipes.log" | tail -20
cat "$OUT/recipes.md"
for d in /tmp/toy-recipes/*/; do
  [ -f "$d/evaluation.json" ] && mkdir -p "$OUT/recipes/$(basename "$d")" && cp "$d"/evaluation.* "$OUT/recipes/$(basename "$d")/"
done
cp /tmp/toy-recipes/summary.json "$OUT/recipes/" 2>/dev/null
echo "total: $(elapsed) s" | tee -a "$OUT/timings.txt"
