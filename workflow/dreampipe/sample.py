"""Sample: a grid of fixed prompts x seeds from a model, optionally above the same grid from the
base model (before/after)."""

from __future__ import annotations

from pathlib import Path

from . import sampling
from .images import grid, save_atomic, stack


def model_grid(model_path, tokenizer, prompts, seeds, resolution, steps, guidance_scale, title, base_options=None):
    model = sampling.load(model_path, tokenizer, base_options)
    ps = [p for p in prompts for _ in seeds]
    ss = [s for _ in prompts for s in seeds]
    images = sampling.generate(model, ps, ss, resolution=resolution, steps=steps, guidance_scale=guidance_scale)
    return grid(images, [f"seed {s}" for s in ss], columns=len(seeds),
                row_titles=[f"{title}: {p}" for p in prompts])


def run(model_path, out: Path, prompts: list[str], seeds: list[int], resolution: int, steps: int = 50,
        guidance_scale: float = 7.5, tokenizer=None, base_model=None, base_options: dict | None = None) -> Path:
    """The grid of the model, below that of base_model (loaded with `base_options`: use_ema, fallback)."""
    sheets = [model_grid(model_path, tokenizer, prompts, seeds, resolution, steps, guidance_scale, "after")]
    if base_model:
        sheets.insert(0, model_grid(base_model, tokenizer, prompts, seeds, resolution, steps, guidance_scale, "before",
                                    base_options))
    save_atomic(stack(sheets), out)
    return Path(out)
