"""Load and export time of an SD 1.x single file on this machine's CPU, ours beside diffusers'.

    PYTHONPATH=workflow python bench/checkpoint_io.py [--size tiny|sd1|both] [--repeat 3]

tiny: the demo model. sd1: the full SD 1.x architecture with random weights (about 9 GB of RAM,
2.1 GB of disk). Seconds, the best of --repeat runs (sd1: one run).
  load:     LDM .safetensors (fp16) -> fp32 networks, `checkpoint.load`
  export:   fp32 networks -> LDM fp16 .safetensors on disk, `checkpoint.save`
  baseline: the same file through diffusers' `StableDiffusionPipeline.from_single_file`
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from dreampipe import checkpoint, tiny


def best_of(repeat: int, fn):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def random_sd1(tokenizer) -> checkpoint.StableDiffusion:
    """SD 1.x shapes, random weights, without the slow per-layer initialisers."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    arch = checkpoint.sd1_architecture()
    with torch.device("meta"):
        nets = (UNet2DConditionModel(**arch["unet"]), AutoencoderKL(**arch["vae"]),
                CLIPTextModel(CLIPTextConfig(**arch["text_encoder"])))
    nets = [n.to_empty(device="cpu") for n in nets]
    for n in nets:
        for p in n.parameters():
            p.data.normal_(0, 0.02)
    return checkpoint.StableDiffusion(*nets, tokenizer, arch)


def diffusers_configs(model: checkpoint.StableDiffusion, folder: Path) -> Path:
    """The config-only diffusers folder that from_single_file needs offline."""
    from diffusers import DDIMScheduler

    model.unet.save_config(folder / "unet")
    model.vae.save_config(folder / "vae")
    model.text_encoder.config.save_pretrained(folder / "text_encoder")
    model.tokenizer.save_pretrained(folder / "tokenizer")
    DDIMScheduler.from_config(model.architecture["scheduler"]).save_config(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}))
    return folder


def bench(size: str, repeat: int, work: Path) -> dict:
    from diffusers import StableDiffusionPipeline

    tokenizer_dir = work / "tokenizer"
    source = tiny.build(work / "tiny.safetensors", tokenizer_dir)
    model = checkpoint.load(source, tokenizer_dir)
    if size == "sd1":
        model = random_sd1(model.tokenizer)
    configs = diffusers_configs(model, work / f"{size}-configs")
    out = work / f"{size}.safetensors"
    export_s, _ = best_of(repeat, lambda: checkpoint.save(model, out, "fp16"))
    model = None  # free it before loading
    load_s, loaded = best_of(repeat, lambda: checkpoint.load(out, tokenizer_dir))
    del loaded
    baseline_s, pipe = best_of(repeat, lambda: StableDiffusionPipeline.from_single_file(
        str(out), config=str(configs), local_files_only=True, safety_checker=None, requires_safety_checker=False))
    del pipe
    return {"size": size, "file_bytes": out.stat().st_size, "load_s": load_s, "export_s": export_s,
            "diffusers_from_single_file_s": baseline_s}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "sd1", "both"], default="both")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    print(f"# CPU: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}")
    for size in (["tiny", "sd1"] if a.size == "both" else [a.size]):
        with tempfile.TemporaryDirectory() as work:
            r = bench(size, a.repeat if size == "tiny" else 1, Path(work))
        print(json.dumps(r))


if __name__ == "__main__":
    main()
