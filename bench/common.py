"""Shared by the GPU benchmarks: an SD 1.x-size model with random weights, made on the GPU."""

import json
import os
import tempfile
from pathlib import Path

import torch

from dreampipe import checkpoint, tiny

FLOP_STEP = 2 * 2028.6e9  # UNet fwd+bwd of two 512 px samples (../shared/bench/diffusers_recipe.py)
FLOP_IMG = 50 * 2 * 677.2e9 + 2480.2e9  # 50 CFG steps + one VAE decode


def random_sd1(device="cuda", seed=0) -> checkpoint.StableDiffusion:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok_dir = Path(tempfile.mkdtemp()) / "tokenizer"
    tiny.write_tokenizer(tok_dir)
    arch = checkpoint.sd1_architecture()
    torch.manual_seed(seed)
    with torch.device(device):
        model = checkpoint.StableDiffusion(
            unet=UNet2DConditionModel(**arch["unet"]), vae=AutoencoderKL(**arch["vae"]),
            text_encoder=CLIPTextModel(CLIPTextConfig(**arch["text_encoder"])),
            tokenizer=checkpoint.load_tokenizer(tok_dir, None), architecture=arch)
    return model


def save(name: str, result: dict) -> None:
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, **result}
    print(name, json.dumps(result), flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out, f"{name}.json").write_text(json.dumps(result, indent=1))
