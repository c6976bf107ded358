"""Export: the trained model as one file that AUTOMATIC1111, ComfyUI and InvokeAI load as is:
LDM key layout, inference weights only, fp16 by default, training settings in the metadata."""

from __future__ import annotations

import json
from pathlib import Path

from . import checkpoint


def run(trained: Path, out: Path, dtype: str = "fp16", tokenizer=None, settings: dict | None = None) -> Path:
    model = checkpoint.load(trained, tokenizer=tokenizer)
    meta = {"dreampipe.settings": json.dumps(settings or {}, sort_keys=True),
            "modelspec.architecture": "stable-diffusion-v1"}
    return checkpoint.save(model, out, dtype=dtype, metadata=meta)
