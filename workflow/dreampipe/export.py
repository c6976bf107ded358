"""Export: the trained model as one file that AUTOMATIC1111, ComfyUI and InvokeAI load as is:
LDM key layout, inference weights only, fp16 by default, training settings in the metadata.
An output path without .safetensors/.ckpt suffix gets a diffusers folder instead; one ending in
.lora.safetensors gets the LoRA a train.method lora run trained, in kohya's layout."""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import checkpoint, lora
from .errors import DreampipeError
from .files import human_size

LORA_SUFFIX = ".lora.safetensors"


def run(trained: Path, out: Path, dtype: str = "fp16", tokenizer=None, settings: dict | None = None, *,
        log=print) -> Path:
    start = time.perf_counter()
    written = _write(trained, out, dtype, tokenizer, settings)
    size = sum(f.stat().st_size for f in ([written] if written.is_file() else written.rglob("*")) if f.is_file())
    # the job's "done in" counts the imports too: this is the reading, casting and writing alone
    log(f"export: {human_size(size)} written to {written} in {time.perf_counter() - start:.1f} s")
    return written


def _write(trained: Path, out: Path, dtype: str, tokenizer, settings: dict | None) -> Path:
    if Path(out).name.endswith(LORA_SUFFIX):
        return _write_lora(trained, out, dtype, settings)
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


def _write_lora(trained: Path, out: Path, dtype: str, settings: dict | None) -> Path:
    """The LoRA that training keeps beside the merged model's weights (lora_unet_*, lora_te_*)."""
    layers = lora.load(trained)
    if not layers:
        raise DreampipeError(f"{trained}: holds no LoRA (it was trained with train.method full); "
                             "set train.method: lora in the character file to train one")
    meta = {"dreampipe.settings": json.dumps(settings or {}, sort_keys=True),
            "modelspec.title": Path(out).name[: -len(LORA_SUFFIX)]}
    return lora.save(layers, out, dtype, meta)
