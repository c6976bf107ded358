"""Where a GPU job's start goes, in a fresh process: the imports, CUDA's start, and the base
model's load, each timed apart (the e2e benchmark's jobs each pay them).

    python bench/startup.py MODEL TOKENIZER   # e.g. /tmp/base/sd1-random.safetensors /tmp/base/tokenizer

Prints one `startup` line of JSON (seconds). Run it twice: the second process finds the file in
the page cache; a Python that keeps no bytecode (PYTHONDONTWRITEBYTECODE) compiles every import
again each time.
"""

import json
import sys
import time

laps, t0 = {}, time.perf_counter()


def lap(what: str) -> None:
    global t0
    laps[what] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()


import torch  # noqa: E402

lap("import torch")
import pytorch_lightning  # noqa: E402, F401

lap("import pytorch_lightning")
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402, F401
from transformers import CLIPTextModel  # noqa: E402, F401

lap("import diffusers, transformers")
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.zeros(1, device=device)
lap("device start")
from pathlib import Path  # noqa: E402

from dreampipe import checkpoint, config  # noqa: E402

model, tokenizer = sys.argv[1:3]
dtype = torch.bfloat16 if device == "cuda" else torch.float32
for what in ("checkpoint.load", "checkpoint.load again"):
    checkpoint.load(model, tokenizer=tokenizer, device=device, dtype=dtype)
    if device == "cuda":
        torch.cuda.synchronize()
    lap(what)
tensors = {k: v.to(device) for k, v in checkpoint.read_state_dict(Path(model))[0].items()}
if device == "cuda":
    torch.cuda.synchronize()
lap("the file's tensors to the device alone")
config.model_id(model, Path(f"/tmp/startup-hashes-{time.time_ns()}.json"))
lap("content hash of the file")
print("startup", json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                             "dont_write_bytecode": sys.dont_write_bytecode, **laps}))
