"""Export: the trained model as one file that AUTOMATIC1111, ComfyUI and InvokeAI load as is:
LDM key layout, inference weights only, fp16 by default, training settings in the metadata.
An output path without .safetensors/.ckpt suffix gets a diffusers folder instead."""

from __future__ import annotations

import json
from pathlib import Path

from . import checkpoint


def run(trained: Path, out: Path, dtype: str = "fp16", tokenizer=None, settings: dict | None = None) -> Path:
    if Path(out).suffix not in checkpoint.FILE_SUFFIXES:
        return checkpoint.save_diffusers(checkpoint.load(trained, tokenizer=tokenizer), out, dtype=dtype)
    meta = {"dreampipe.settings": json.dumps(settings or {}, sort_keys=True),
            "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1",
            "modelspec.title": Path(out).stem}
    if Path(trained).is_dir():
        return checkpoint.save(checkpoint.load(trained, tokenizer=tokenizer), out, dtype=dtype, metadata=meta)
    # a single file (training writes one) is in the LDM layout already: cast its tensors, build no networks
    weights, found = checkpoint.read_state_dict(trained)
    if checkpoint.ARCHITECTURE_KEY in found:
        meta[checkpoint.ARCHITECTURE_KEY] = found[checkpoint.ARCHITECTURE_KEY]
    return checkpoint.write_file(checkpoint.inference_weights(weights), out, dtype, meta)
