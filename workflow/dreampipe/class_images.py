"""Class (regularization) images: a shared, growing store of generated images, or the user's own.

Image i of a generated set is a function of the set's key (base model content hash, prompt,
negative prompt, sampler, steps, guidance scale, resolution) and of i, whose seed is i itself.
The store is not a Snakemake output, so raising the count only generates the missing indexes,
lowering it reuses the first N, and a killed run keeps every finished image. Jobs that share a
store take turns on a lock, so two of them never make the same image or write the same manifest.

Whatever the source, training reads one class manifest: {"prompt": ..., "images": [paths]}.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import DreampipeError
from .files import write_json

KEYWORDS = ("generate", "instance", "none", "prior_prediction")
# Compiling the UNet's blocks (27 s with cold caches on an H200) pays for itself from about this
# many images x sampling steps (250 images at 50 steps; docs/benchmarks.md); below, the GPU samples eagerly.
COMPILE_FROM_IMAGE_STEPS = 12500
# A 512 px PNG takes 30-120 ms to encode (Pillow's default level, 2-core VM), a batch of 16 about
# 3 s to sample on an H200: two threads keep up with room to spare.
WRITERS = 2


def source(class_data: str, character_file) -> str:
    """generate, instance, none, prior_prediction, or folder (class_data is then the folder of the
    user's photos)."""
    if class_data in KEYWORDS:
        return class_data
    if Path(class_data).is_dir():
        return "folder"
    raise DreampipeError(
        f"{character_file}: class_images.class_data is '{class_data}', which is neither "
        f"{', '.join(KEYWORDS)} nor a folder; use one of those words, or the path of a folder "
        "of your own class photos (relative to the workflow folder)")


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


@contextmanager
def store_lock(store: Path, log=print):
    """Held while generating into a store; the OS drops it when its holder dies, even by SIGKILL."""
    import fcntl

    store.mkdir(parents=True, exist_ok=True)
    with open(store / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"class images: waiting for another job generating into {store}")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def run(model_path, tokenizer, store: Path, manifest: Path, count: int, prompt: str,
        negative_prompt: str, sampler: str, steps: int, guidance_scale: float, resolution: int,
        batch_size: int | str = "auto", log=print, base_options: dict | None = None) -> list[int]:
    """Make the missing images of the first `count`, then write the manifest and contact sheet.
    Returns the indexes this call made. `base_options` are checkpoint.load's use_ema and fallback."""
    store = Path(store)
    with store_lock(store, log):  # the manifest too: a job of the same count may be writing it
        todo = missing_indexes(store, count)
        log(f"class images: {count - len(todo)} of {count} already in {store}, {len(todo)} to make")
        if todo:
            _generate(model_path, tokenizer, store, todo, prompt, negative_prompt, sampler,
                      steps, guidance_scale, resolution, batch_size, base_options or {}, log)
        start = time.perf_counter()
        write_manifest(Path(manifest), prompt, [image_path(store, i) for i in range(count)])
        log(f"class images: manifest and contact sheet of {count} written in {time.perf_counter() - start:.1f} s")
    return todo


def from_prepared(prepared_dir: Path, manifest: Path, prompt: str) -> list[Path]:
    """Class manifest of a folder made by `prepare` (the instance images, or the user's class photos)."""
    prepared_dir = Path(prepared_dir)
    files = [prepared_dir / m["file"] for m in json.loads((prepared_dir / "manifest.json").read_text())]
    write_manifest(Path(manifest), prompt, files)
    return files


def write_manifest(manifest: Path, prompt: str, files: list[Path]) -> None:
    """The manifest training reads, and beside it a contact sheet of its first 64 images.
    Each count has its own file names, so jobs for two counts of one set never collide."""
    from PIL import Image

    from .images import grid, save_atomic

    sheet = []
    for f in files[:64]:
        with Image.open(f) as im:
            sheet.append(im.convert("RGB"))
    save_atomic(grid(sheet, [f.stem for f in files[:64]]), manifest.with_suffix(".png"))
    write_json({"prompt": prompt, "images": [str(f) for f in files]}, manifest)


def _generate(model_path, tokenizer, store, todo, prompt, negative_prompt, sampler, steps,
              guidance_scale, resolution, batch_size, base_options, log):
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from . import images, sampling, speed

    start = time.perf_counter()
    model = sampling.load(model_path, tokenizer, base_options)
    on_gpu = speed.on_gpu(sampling.pick_device())
    if batch_size == "auto":
        batch_size = 16 if on_gpu else 4
    compiled = on_gpu and len(todo) * steps >= COMPILE_FROM_IMAGE_STEPS
    if compiled:
        speed.prepare_sampling(model, "cuda", scope="blocks")
    load_s, sampling_s, write_s = time.perf_counter() - start, 0.0, []

    def write(image, index):
        t = time.perf_counter()
        images.save_atomic(image, image_path(store, index))
        write_s.append(time.perf_counter() - t)

    # PNG encoding (zlib, which releases the GIL) runs in threads while the next batch samples.
    # Waiting for one batch's writes before queueing the next one's bounds the images in memory and
    # stops the job at a failed write; leaving the pool waits for the writes queued, so a failed
    # batch keeps the images of those before it.
    with ThreadPoolExecutor(WRITERS) as writers, tqdm(total=len(todo), unit="img", desc="class images") as bar:
        queued = []
        for first in range(0, len(todo), batch_size):
            indexes = todo[first:first + batch_size]
            # compiled, the last batch is padded to the full size: a compiled graph keeps its shape
            seeds = indexes + [indexes[-1]] * (batch_size - len(indexes)) if compiled else indexes
            t = time.perf_counter()
            batch = sampling.generate(model, [prompt] * len(seeds), seeds, resolution=resolution, steps=steps,
                                      guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                                      sampler=sampler)
            sampling_s += time.perf_counter() - t
            bar.update(_wait(queued))
            queued = [writers.submit(write, image, i) for i, image in zip(indexes, batch)]
        t = time.perf_counter()
        bar.update(_wait(queued))
    log(f"class images: model loaded in {load_s:.1f} s, {len(todo)} sampled in {sampling_s:.1f} s "
        f"({len(todo) / sampling_s:.2f} img/s), PNGs written in {sum(write_s):.1f} s by {WRITERS} writer "
        f"threads beside sampling, {time.perf_counter() - t:.1f} s past the last batch")


def _wait(futures) -> int:
    for f in futures:
        f.result()
    return len(futures)
