"""Class (regularization) images: a shared, growing store of generated images.

Image i of a set is a pure function of the set's key (base model content hash, prompt, negative
prompt, sampler, steps, guidance scale, resolution) and of i, whose seed is i itself. The store
is not a Snakemake output, so raising the count only generates the missing indexes, lowering it
reuses the first N, and a killed run keeps every finished image.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path


def set_dir(root: Path, model_id: str, prompt: str, negative_prompt: str, sampler: str,
            steps: int, guidance_scale: float, resolution: int) -> Path:
    """Where the class set with these settings lives (stdlib only: the Snakefile calls it)."""
    key = json.dumps([model_id, prompt, negative_prompt, sampler, steps, float(guidance_scale),
                      resolution])
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "class"
    return Path(root) / f"{slug}-{resolution}px-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def image_path(store: Path, index: int) -> Path:
    return Path(store) / f"{index:05d}.png"


def missing_indexes(store: Path, count: int) -> list[int]:
    return [i for i in range(count) if not image_path(store, i).exists()]


def run(model_path, tokenizer, store: Path, manifest: Path, count: int, prompt: str,
        negative_prompt: str, sampler: str, steps: int, guidance_scale: float, resolution: int,
        batch_size: int | str = "auto", log=print) -> list[int]:
    """Make the missing images of the first `count`, then write the manifest and contact sheet."""
    from .images import grid, save_atomic

    store, manifest = Path(store), Path(manifest)
    todo = missing_indexes(store, count)
    log(f"class images: {count - len(todo)} of {count} already in {store}, {len(todo)} to make")
    if todo:
        _generate(model_path, tokenizer, store, todo, prompt, negative_prompt, sampler, steps,
                  guidance_scale, resolution, batch_size)
    files = [str(image_path(store, i)) for i in range(count)]
    from PIL import Image

    save_atomic(grid([Image.open(f) for f in files[:64]], [Path(f).stem for f in files[:64]]),
                manifest.with_suffix(".png"))
    tmp = manifest.with_name(f".{manifest.name}.tmp")
    tmp.write_text(json.dumps({"prompt": prompt, "images": files}, indent=1))
    os.replace(tmp, manifest)
    return todo


def _generate(model_path, tokenizer, store, todo, prompt, negative_prompt, sampler, steps,
              guidance_scale, resolution, batch_size):
    import torch
    from tqdm import tqdm

    from . import checkpoint, sampling, speed
    from .images import save_atomic

    device = sampling.pick_device()
    model = checkpoint.load(model_path, tokenizer=tokenizer)
    model.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    speed.prepare_sampling(model, device)
    if batch_size == "auto":
        batch_size = 16 if device.type == "cuda" else 4
    with tqdm(total=len(todo), unit="img", desc="class images") as bar:
        for start in range(0, len(todo), batch_size):
            indexes = todo[start:start + batch_size]
            images = sampling.generate(model, [prompt] * len(indexes), indexes,
                                       resolution=resolution, steps=steps,
                                       guidance_scale=guidance_scale,
                                       negative_prompt=negative_prompt, sampler=sampler)
            for i, image in zip(indexes, images):
                save_atomic(image, image_path(store, i))
            bar.update(len(indexes))
