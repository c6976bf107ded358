"""Sample: a grid of fixed prompts x seeds from a model, optionally above the same grid from the
base model (before/after)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from . import checkpoint, sampling
from .images import grid, save_atomic


def model_grid(model_path, tokenizer, prompts, seeds, resolution, steps, guidance_scale, title):
    model = checkpoint.load(model_path, tokenizer=tokenizer).to(sampling.pick_device())
    ps = [p for p in prompts for _ in seeds]
    ss = [s for _ in prompts for s in seeds]
    images = sampling.generate(model, ps, ss, resolution=resolution, steps=steps, guidance_scale=guidance_scale)
    return grid(images, [f"{title}: {p} #{s}" for p, s in zip(ps, ss)], columns=len(seeds))


def run(model_path, out: Path, prompts: list[str], seeds: list[int], resolution: int, steps: int = 50,
        guidance_scale: float = 7.5, tokenizer=None, base_model=None) -> Path:
    sheets = [model_grid(model_path, tokenizer, prompts, seeds, resolution, steps, guidance_scale, "after")]
    if base_model:
        sheets.insert(0, model_grid(base_model, tokenizer, prompts, seeds, resolution, steps, guidance_scale, "before"))
    sheet = Image.new("RGB", (sheets[0].width, sum(s.height for s in sheets) + 8 * (len(sheets) - 1)), "gray")
    y = 0
    for s in sheets:
        sheet.paste(s, (0, y))
        y += s.height + 8
    save_atomic(sheet, out)
    return Path(out)
