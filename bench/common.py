"""Shared by the GPU benchmarks: an SD 1.x-size model with random weights, made on the device.
Every benchmark also runs at the tiny demo size on the CPU (`--size tiny`), which the tests do so
that an API change breaks CI rather than the next GPU measurement."""

import json
import os
import tempfile
from pathlib import Path

import torch

from dreampipe import checkpoint, tiny

FLOP_STEP = 2 * 2028.6e9  # UNet fwd+bwd of two 512 px samples (../shared/bench/diffusers_recipe.py)
FLOP_IMG = 50 * 2 * 677.2e9 + 2480.2e9  # 50 CFG steps + one VAE decode
RESOLUTION = {"sd1": 512, "tiny": 64}


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def random_sd1(device: str | None = None, seed: int = 0, size: str = "sd1") -> checkpoint.StableDiffusion:
    """Random weights with the SD 1.x architecture (size sd1) or the tiny demo one (size tiny)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok_dir = Path(tempfile.mkdtemp()) / "tokenizer"
    vocab = tiny.write_tokenizer(tok_dir)
    arch = checkpoint.sd1_architecture() if size == "sd1" else tiny.architecture(vocab)
    torch.manual_seed(seed)
    with torch.device(device or globals()["device"]()):
        model = checkpoint.StableDiffusion(
            unet=UNet2DConditionModel(**arch["unet"]), vae=AutoencoderKL(**arch["vae"]),
            text_encoder=CLIPTextModel(CLIPTextConfig(**arch["text_encoder"])),
            tokenizer=checkpoint.load_tokenizer(tok_dir, None), architecture=arch)
    return model


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def save(name: str, result: dict) -> None:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"device": dev, "torch": torch.__version__, **result}
    print(name, json.dumps(result), flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out, f"{name}.json").write_text(json.dumps(result, indent=1))
