"""Sample: a grid of fixed prompts x seeds from a model, optionally above the same grid from the
base model (before/after).

The train job draws both rows while it holds the networks on the GPU (the "before" row from the
base weights before its first step, the "after" row from the weights it writes) and keeps them
beside the model with what they were drawn for (`keep`). This job then only stacks them: no model
load, no sampling, no torch import. A row drawn for other prompts, seeds or sampling settings, or
from a model file or base model that has changed since, is drawn here again."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from PIL import Image

from . import config
from .files import write_json
from .images import grid, save_atomic, stack


def request(prompts: list[str], seeds: list[int], resolution: int, *, steps: int, guidance_scale: float,
            sampler: str) -> dict:
    """What a row depends on besides the weights."""
    return {"prompts": list(prompts), "seeds": list(seeds), "resolution": resolution, "steps": steps,
            "guidance_scale": guidance_scale, "sampler": sampler}


def rows_dir(model_path) -> Path:
    """Where the train job keeps the rows it drew: beside the trained model."""
    return Path(model_path).parent / "sheets"


def _files(path) -> list:
    """Each file of a model as it is now, cheaply: not its mtime, which Snakemake sets again on a
    job's outputs after the job; its inode (a file rewritten through a temporary file has a new
    one), size, and the hash of its first, middle and last MiB."""
    out = []
    for f in map(Path, config.model_files(str(path))):
        st, h = f.stat(), hashlib.sha256()
        with f.open("rb") as stream:
            for offset in sorted({0, max(0, st.st_size // 2 - (1 << 19)), max(0, st.st_size - (1 << 20))}):
                stream.seek(offset)
                h.update(stream.read(1 << 20))
        out.append([str(f.resolve()), st.st_dev, st.st_ino, st.st_size, h.hexdigest()[:16]])
    return out


def model_source(model_path) -> dict:
    return {"model": _files(model_path)}


def base_source(base_model, base_options: dict | None) -> dict:
    """The base model as it is loaded: its files, use_ema, and the fallback's files."""
    o = base_options or {}
    return {"base": _files(base_model), "use_ema": bool(o.get("use_ema")),
            "fallback": _files(o["fallback"]) if o.get("fallback") else None}


def keep(folder: Path, title: str, row: Image.Image, req: dict, source: dict) -> None:
    """A row and what it was drawn for; the JSON last, so a row without one is never used."""
    (folder / f"{title}.json").unlink(missing_ok=True)
    save_atomic(row, folder / f"{title}.png")
    write_json({"request": req, "source": source}, folder / f"{title}.json")


def kept(folder: Path, title: str, req: dict, source: dict) -> Image.Image | None:
    try:
        drawn_for = json.loads((folder / f"{title}.json").read_text())
        if drawn_for != json.loads(json.dumps({"request": req, "source": source})):
            return None
        with Image.open(folder / f"{title}.png") as im:
            return im.convert("RGB")
    except (OSError, ValueError):
        return None


def run(model_path, out: Path, prompts: list[str], seeds: list[int], resolution: int, *, steps: int,
        guidance_scale: float, sampler: str, tokenizer=None, base_model=None, base_options: dict | None = None,
        log=print) -> Path:
    """The grid of the model, below that of base_model (loaded with `base_options`: use_ema, fallback).
    Rows the train job kept for this request are stacked as they are; one set of networks draws the
    others: the base model's, which then take the model's weights, so the networks are built and put
    on the device once."""
    req = request(prompts, seeds, resolution, steps=steps, guidance_scale=guidance_scale, sampler=sampler)
    folder = rows_dir(model_path)
    before = kept(folder, "before", req, base_source(base_model, base_options)) if base_model else None
    after = kept(folder, "after", req, model_source(model_path))
    for title, row in (("before", before), ("after", after)):
        if row is not None:
            log(f"sample: the '{title}' row drawn by the train job")
    draw_before = base_model is not None and before is None
    if draw_before or after is None:
        from . import sampling

        start = time.perf_counter()
        first = base_model if draw_before else model_path
        model = sampling.load(first, tokenizer, base_options if draw_before else None)
        log(f"sample: {'base model' if draw_before else 'model'} loaded in {time.perf_counter() - start:.1f} s")
        if draw_before:
            before = sheet(model, req, "before", log)
        if after is None:
            if draw_before:
                start = time.perf_counter()
                sampling.load_weights(model, model_path, tokenizer)
                log(f"sample: the model's weights loaded into its networks in {time.perf_counter() - start:.1f} s")
            after = sheet(model, req, "after", log)
    save_atomic(stack([row for row in (before, after) if row is not None]), out)
    return Path(out)


def sheet(model, req: dict, title: str, log=print, decode_batch: int | None = None) -> Image.Image:
    """One row of the grid: every prompt x seed, titled."""
    from . import sampling

    ps = [p for p in req["prompts"] for _ in req["seeds"]]
    ss = [s for _ in req["prompts"] for s in req["seeds"]]
    start = time.perf_counter()
    images = sampling.generate(model, ps, ss, resolution=req["resolution"], steps=req["steps"],
                               guidance_scale=req["guidance_scale"], sampler=req["sampler"],
                               decode_batch=decode_batch)
    log(f"sample: {len(images)} '{title}' images sampled in {time.perf_counter() - start:.1f} s")
    return grid(images, [f"seed {s}" for s in ss], columns=len(req["seeds"]),
                row_titles=[f"{title}: {p}" for p in req["prompts"]])
