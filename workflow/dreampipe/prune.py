"""Prune: an existing fat SD 1.x checkpoint (optimizer state, EMA copy, fp32: 4-12 GB) cut down
to the weights inference needs, fp16 by default: the job of the old prune_model.py scripts."""

from __future__ import annotations

from pathlib import Path

from . import checkpoint, modelspec


def run(src: Path, out: Path, use_ema: bool = False, dtype: str = "fp16") -> Path:
    """Non-EMA weights by default: DreamBooth runs of the CompVis-based repos trained without EMA,
    so their model_ema.* copy still holds the base model."""
    sd, meta = checkpoint.read_state_dict(src, mmap=True)  # each tensor is read once, then dropped
    checkpoint.check_sd1(sd, src, checkpoint.architecture_of(meta))
    weights = checkpoint.inference_weights(sd, use_ema, src)
    # the source's own modelspec keys stay (its title...), all but the hash of tensors it no longer holds
    meta = {**modelspec.metadata(Path(out).stem), **meta, modelspec.HASH_KEY: modelspec.PENDING,
            "dreampipe.pruned_from": Path(src).name, "dreampipe.unet": "ema" if use_ema else "non-ema"}
    return checkpoint.write_file(weights, out, dtype, meta, release_source=True)
