#!/usr/bin/env bash
# The baseline of e2e_gpu.sh: the diffusers DreamBooth example doing the same work (the same 20
# photos, SD 1.x-size random weights as a diffusers folder, NCLASS class images it generates itself,
# STEPS steps, bf16 mixed precision, prior preservation, its default state save every 500 steps).
# On the GPU machine from the project root after `source .devkit/setup.sh` (and `source bench/gpu_bytecode.sh`
# when e2e_gpu.sh runs with bytecode kept), with
# examples/dreambooth/train_dreambooth.py of huggingface/diffusers in .devkit/ (fetched, carried,
# never committed). Writes $OUT/diffusers.log.
# Env: STEPS (1000), NCLASS (200), LIMIT (540 s), CPUS (e.g. 16-31: those cores only, see e2e_gpu.sh),
# LORA=RANK: its LoRA example instead (examples/dreambooth/train_dreambooth_lora.py in .devkit/,
# that rank, learning rate 1e-4), the baseline of train.method: lora.
set -u
OUT=${OUT:-/tmp/e2e-out}; mkdir -p "$OUT"
rm -rf /tmp/dfx && mkdir -p /tmp/dfx
python3 - <<'PY'
import json, sys
sys.path.insert(0, "bench")
from pathlib import Path
from common import random_sd1
from dreampipe import checkpoint
checkpoint.save_diffusers(random_sd1(), "/tmp/dfx/model", dtype="fp32")
tc = Path("/tmp/dfx/model/tokenizer/tokenizer_config.json")
c = json.loads(tc.read_text()); c["tokenizer_class"] = "CLIPTokenizer"; tc.write_text(json.dumps(c))
PY
python3 bench/e2e_photos.py /tmp/dfx/photos
SCRIPT=train_dreambooth${LORA:+_lora}.py LR=${LORA:+1e-4}; LR=${LR:-2e-6}
cp ".devkit/$SCRIPT" /tmp/dfx/
python3 -c "import tensorboard" 2>/dev/null || sed -i 's/accelerator.init_trackers(\(.*\))$/pass/' "/tmp/dfx/$SCRIPT"
S=$(date +%s.%N)
timeout ${LIMIT:-540} ${CPUS:+taskset -c $CPUS} python3 "/tmp/dfx/$SCRIPT" --pretrained_model_name_or_path=/tmp/dfx/model \
  --instance_data_dir=/tmp/dfx/photos --class_data_dir=/tmp/dfx/class --output_dir=/tmp/dfx/out \
  --with_prior_preservation --prior_loss_weight=1.0 --instance_prompt="a photo of sks woman" \
  --class_prompt="a photo of a woman" --resolution=512 --train_batch_size=1 --learning_rate=$LR ${LORA:+--rank=$LORA} \
  --lr_scheduler=constant --lr_warmup_steps=0 --num_class_images=${NCLASS:-200} --max_train_steps=${STEPS:-1000} \
  --mixed_precision=bf16 --prior_generation_precision=bf16 > "$OUT/diffusers.log" 2>&1; rc=$?
E=$(date +%s.%N)
echo "diffusers e2e rc=$rc wall $(python3 -c "print(round($E - $S, 1))") s (steps ${STEPS:-1000}, class images ${NCLASS:-200})"
tr '\r' '\n' < "$OUT/diffusers.log" | grep -i "error\|Traceback" | head -5
tr '\r' '\n' < "$OUT/diffusers.log" | grep "Generating class images\|Steps:" | awk 'NR%40==0' | tail -6 | cut -c1-150
