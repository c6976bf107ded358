"""Sample: a grid of fixed prompts x seeds from a model, optionally above the same grid from the
base model (before/after)."""

from __future__ import annotations

import time
from pathlib import Path

from . import sampling
from .images import grid, save_atomic, stack


def run(model_path, out: Path, prompts: list[str], seeds: list[int], resolution: int, *, steps: int,
        guidance_scale: float, sampler: str, tokenizer=None, base_model=None, base_options: dict | None = None,
        log=print) -> Path:
    """The grid of the model, below that of base_model (loaded with `base_options`: use_ema, fallback).
    One set of networks draws both: the base model's, which then take the model's weights, so the
    networks are built and put on the device once."""
    start = time.perf_counter()
    model = sampling.load(base_model or model_path, tokenizer, base_options if base_model else None)
    log(f"sample: {'base model' if base_model else 'model'} loaded in {time.perf_counter() - start:.1f} s")
    sheets = []
    if base_model:
        sheets.append(_grid(model, prompts, seeds, resolution, steps, guidance_scale, sampler, "before", log))
        start = time.perf_counter()
        sampling.load_weights(model, model_path, tokenizer)
        log(f"sample: the model's weights loaded into its networks in {time.perf_counter() - start:.1f} s")
    sheets.append(_grid(model, prompts, seeds, resolution, steps, guidance_scale, sampler, "after", log))
    save_atomic(stack(sheets), out)
    return Path(out)


def _grid(model, prompts, seeds, resolution, steps, guidance_scale, sampler, title, log):
    ps = [p for p in prompts for _ in seeds]
    ss = [s for _ in prompts for s in seeds]
    start = time.perf_counter()
    images = sampling.generate(model, ps, ss, resolution=resolution, steps=steps, guidance_scale=guidance_scale,
                               sampler=sampler)
    log(f"sample: {len(images)} '{title}' images sampled in {time.perf_counter() - start:.1f} s")
    return grid(images, [f"seed {s}" for s in ss], columns=len(seeds), row_titles=[f"{title}: {p}" for p in prompts])
