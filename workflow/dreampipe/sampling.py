"""Text-to-image with a StableDiffusion model: the one loop behind class images, training samples
and final grids. Every image's starting noise comes from its own seed (drawn on the CPU), so an
image depends on its seed alone, never on the batch it was made in or the device's RNG."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .checkpoint import StableDiffusion

SAMPLERS = ("ddim", "dpmsolver++")


def make_scheduler(model: StableDiffusion, sampler: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    config = model.architecture["scheduler"]
    if sampler == "ddim":
        return DDIMScheduler.from_config(config)  # eta 0 in step(): deterministic, as the guide's
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")


@torch.no_grad()
def encode_prompts(model: StableDiffusion, prompts: list[str]) -> torch.Tensor:
    tok = model.tokenizer(prompts, padding="max_length", truncation=True,
                          max_length=model.tokenizer.model_max_length, return_tensors="pt")
    device = next(model.text_encoder.parameters()).device
    return model.text_encoder(tok.input_ids.to(device))[0]


def initial_noise(seed: int, resolution: int, channels: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, channels, resolution // 8, resolution // 8, generator=g)


@torch.no_grad()
def generate(model: StableDiffusion, prompts: list[str], seeds: list[int], *, resolution: int,
             steps: int = 50, guidance_scale: float = 7.5, negative_prompt: str = "",
             sampler: str = "ddim", decode_batch: int | None = None) -> list[Image.Image]:
    """One image per (prompt, seed) pair, all in one batch; the VAE decodes decode_batch of
    them at a time (all by default; 1 where memory is short)."""
    unet, vae = model.unet, model.vae
    device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    cond = encode_prompts(model, list(prompts))
    uncond = encode_prompts(model, [negative_prompt] * len(prompts))
    context = torch.cat([uncond, cond]).to(dtype)
    scheduler = make_scheduler(model, sampler)
    scheduler.set_timesteps(steps)
    latents = torch.cat([initial_noise(s, resolution) for s in seeds]).to(device, dtype)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        eps_uncond, eps_cond = unet(x, t, encoder_hidden_states=context).sample.chunk(2)
        eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents).prev_sample
    vae_dtype = next(vae.parameters()).dtype
    latents = latents.to(vae_dtype) / vae.config.scaling_factor
    return [image for part in latents.split(decode_batch or len(latents)) for image in to_pil(vae.decode(part).sample)]


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a) for a in arr.permute(0, 2, 3, 1).cpu().numpy()]


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load(path, tokenizer, base_options: dict | None = None) -> StableDiffusion:
    """A model ready to sample: on the GPU in bf16 (channels-last), else on the CPU in fp32.
    `base_options` are checkpoint.load's use_ema and fallback, for a base model."""
    from . import checkpoint, speed

    device = pick_device()
    model = checkpoint.load(path, tokenizer=tokenizer, device=device,
                            dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, **(base_options or {}))
    speed.prepare_sampling(model, device, scope=None)
    return model


def load_weights(model: StableDiffusion, path, tokenizer) -> None:
    """The weights of the model at `path` (same architecture) into `model`'s networks, which keep
    their device, dtype and memory format: nothing is built or moved but the weights themselves."""
    from . import checkpoint

    # in the file's dtypes: load_state_dict casts into the networks' own, on their device
    other = checkpoint.load(path, tokenizer=tokenizer, device=next(model.unet.parameters()).device, dtype=None)
    for mine, theirs in ((model.unet, other.unet), (model.vae, other.vae), (model.text_encoder, other.text_encoder)):
        mine.load_state_dict(theirs.state_dict())


def from_pil(images: list[Image.Image]) -> torch.Tensor:
    return from_uint8(np.stack([np.asarray(im.convert("RGB")) for im in images]))


def from_uint8(pixels: np.ndarray, device=None) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], converted on `device` (a quarter of
    the bytes of floats to copy there)."""
    return torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
