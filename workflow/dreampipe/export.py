"""Export: the trained model as one file that AUTOMATIC1111, ComfyUI and InvokeAI load as is:
LDM key layout, inference weights only, fp16 by default, training settings in the metadata.
An output path without .safetensors/.ckpt suffix gets a diffusers folder instead."""

from __future__ import annotations

import time
from pathlib import Path

from . import checkpoint, modelspec
from .files import human_size


def run(trained: Path, out: Path, dtype: str = "fp16", tokenizer=None, settings: dict | None = None, *,
        log=print) -> Path:
    start = time.perf_counter()
    written = _write(trained, out, dtype, tokenizer, settings)
    size = sum(f.stat().st_size for f in ([written] if written.is_file() else written.rglob("*")) if f.is_file())
    # the job's "done in" counts the imports too: this is the reading, casting and writing alone
    log(f"export: {human_size(size)} written to {written} in {time.perf_counter() - start:.1f} s")
    return written


def _write(trained: Path, out: Path, dtype: str, tokenizer, settings: dict | None) -> Path:
    if Path(out).suffix not in checkpoint.FILE_SUFFIXES:
        return checkpoint.save_diffusers(checkpoint.load(trained, tokenizer=tokenizer), out, dtype=dtype)
    settings = settings or {}
    if Path(trained).is_dir():
        model = checkpoint.load(trained, tokenizer=tokenizer)
        return checkpoint.save(model, out, dtype=dtype, metadata=_metadata(out, settings, model.architecture))
    # a single file (training writes one) is in the LDM layout already: cast its tensors, build no networks
    weights, found = checkpoint.read_state_dict(trained)
    meta = _metadata(out, settings, checkpoint.architecture_of(found))
    if checkpoint.ARCHITECTURE_KEY in found:
        meta[checkpoint.ARCHITECTURE_KEY] = found[checkpoint.ARCHITECTURE_KEY]
    return checkpoint.write_file(checkpoint.inference_weights(weights), out, dtype, meta)


def _metadata(out: Path, settings: dict, architecture: dict) -> dict:
    """modelspec keys (title: the file's name; the training resolution), the settings as JSON."""
    return modelspec.metadata(Path(out).stem, resolution=settings.get("resolution", 512), settings=settings,
                              prediction_type=prediction_type(architecture))


def prediction_type(architecture: dict) -> str:
    return architecture["scheduler"].get("prediction_type", "epsilon")
