"""CPU step time of the tiny model's DreamBooth training (64 px, batch 1 + 1 class image).

    PYTHONPATH=workflow python bench/train_cpu.py [--threads 1] [--steps 30]

Each variant trains twice, for `short` and `short + steps` optimizer steps, in this process; the
difference of the two wall times over `steps` is the time of one step, without model loading,
latent caching and the final writes. Prints a markdown row per variant for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreampipe import config, example_photos, prepare, tiny, train

VARIANTS = {
    "default (frozen text encoder, cached embeddings)": {},
    "train_text_encoder": {"train_text_encoder": True},
    "ema": {"ema": True},
}


def setup(root: Path):
    model = tiny.build(root / "tiny.safetensors", root / "tokenizer")
    example_photos.write(root / "photos")
    prepare.run(root / "photos", root / "instance", 64, "pad", "white", "a photo of zxq robot")
    rng = np.random.default_rng(0)
    images = []
    for i in range(4):
        images.append(root / "class" / f"{i:05d}.png")
        images[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images[-1])
    manifest = root / "class.json"
    manifest.write_text(json.dumps({"prompt": "a photo of a robot", "images": [str(p) for p in images]}))
    return model, root / "tokenizer", [(root / "instance", manifest)]


def timed_run(model, tokenizer, subjects, root: Path, steps: int, overrides: dict) -> float:
    settings = {**config.defaults()["train"], "resolution": 64, "learning_rate": 1e-4, "max_steps": steps,
                "sample_every_n_steps": 0, "sample_steps": 1, "sample_prompts": ["a photo of zxq robot"],
                "sample_seeds": [0], "save_state_every_n_steps": 0, **overrides}
    folder = Path(tempfile.mkdtemp(dir=root))
    start = time.perf_counter()
    train.run(model, tokenizer, subjects, settings, folder / ".state", folder / "train", folder / "model.safetensors")
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--short", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, tokenizer, subjects = setup(root)
        timed_run(model, tokenizer, subjects, root, 2, {})  # warm-up: imports, allocator, kernels
        print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
              f"torch {torch.__version__}")
        for name, overrides in VARIANTS.items():
            short = timed_run(model, tokenizer, subjects, root, a.short, overrides)
            long = timed_run(model, tokenizer, subjects, root, a.short + a.steps, overrides)
            print(f"| tiny model train step, {name} | {1000 * (long - short) / a.steps:.0f} ms |")


if __name__ == "__main__":
    main()
