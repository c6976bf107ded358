"""Pretrain the toy base model: a tiny SD-architecture model that has learned the toy world.

Stage "model": (1) the VAE learns to reconstruct fresh toy-world pictures; (2) the UNet and text
encoder learn noise prediction on the VAE's latents of captioned pictures, a tenth of the captions
empty for classifier-free guidance. Stage "classifier": the attribute classifier of evaluate.py
learns to read toy-world pictures, half of them reconstructions by the model's VAE. Every picture
comes from a seed, so a rerun on one machine repeats the run. Written: one SD single-file
checkpoint (fp16), its tokenizer, the classifier, a loss log, a sample grid and pretrain.json.
"""

from __future__ import annotations

import json
import logging
import platform
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint, evaluate, sampling, tiny, toyworld
from .files import write_json
from .images import grid, save_atomic

log = logging.getLogger("dreampipe.pretrain")
MODEL_FILE = "toy-sd.safetensors"
# Toy captions are at most 13 tokens; a short context makes every cross-attention cheaper.
MAX_TOKENS = 20
SAMPLE_PROMPTS = ["a photo of a star", "a photo of a red circle on a white background",
                  "a photo of a blue striped square", "a photo of a yellow dotted triangle",
                  "a photo of a purple striped star", "a photo of a purple dotted star"]
# The committed model's settings: about an hour on 2 CPU cores (see docs/quality.md).
DEFAULTS = {"vae_steps": 1000, "vae_batch_size": 16, "vae_learning_rate": 2e-3, "kl_weight": 1e-6,
            "classifier_steps": 3000, "classifier_reconstructions": 512,
            "latents": 16384, "unet_steps": 12000, "unet_batch_size": 64, "unet_learning_rate": 1e-3,
            "caption_dropout": 0.1, "min_snr_gamma": 5.0, "seed": 0, "cpu_threads": 1}


def architecture(vocab_size: int) -> dict:
    """The tiny model's architecture with one layer per block and a narrow VAE: cheap enough to
    pretrain on a CPU; still the SD 1.x block structure and key layout."""
    arch = tiny.architecture(vocab_size)
    arch["vae"].update(block_out_channels=[8, 16, 32, 32], layers_per_block=1, norm_num_groups=8)
    arch["unet"].update(layers_per_block=1)
    return arch


def pictures(seeds) -> tuple[torch.Tensor, list[toyworld.Thing]]:
    examples = [toyworld.example(s) for s in seeds]
    return sampling.from_pil([im for im, _, _ in examples]), [t for _, t, _ in examples]


class Log:
    """A stage's loss rows in a CSV (replacing that stage's rows of an earlier run), and a line
    to the logger now and then."""

    def __init__(self, path: Path, stage: str):
        self.path, self.stage, self.start = path, stage, time.time()
        rows = path.read_text().splitlines()[1:] if path.exists() else []
        path.write_text("\n".join(["stage,step,loss,seconds"] + [r for r in rows if not r.startswith(stage + ",")]) + "\n")

    def __call__(self, step: int, loss: float, every: int = 25):
        with self.path.open("a") as f:
            f.write(f"{self.stage},{step},{loss:.5f},{time.time() - self.start:.1f}\n")
        if step % every == 0:
            log.info("%s step %d loss %.4f (%.0f s)", self.stage, step, loss, time.time() - self.start)


def train_vae(vae, s: dict, record: Log) -> None:
    with torch.no_grad():  # a nearly deterministic posterior at first: at log-variance 0 the
        vae.quant_conv.bias[vae.config.latent_channels:].fill_(-8.0)  # decoder would see only noise
    opt = torch.optim.AdamW(vae.parameters(), lr=s["vae_learning_rate"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, s["vae_learning_rate"], total_steps=s["vae_steps"])
    bs = s["vae_batch_size"]
    for step in range(s["vae_steps"]):
        x, _ = pictures(range(10**6 + step * bs, 10**6 + (step + 1) * bs))
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample()).sample
        loss = F.mse_loss(recon, x) + s["kl_weight"] * dist.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        record(step, loss.item())


@torch.no_grad()
def encode(vae, seeds) -> tuple[torch.Tensor, torch.Tensor, list[toyworld.Thing]]:
    means, stds, things = [], [], []
    for chunk in range(0, len(seeds), 64):
        x, t = pictures(seeds[chunk:chunk + 64])
        dist = vae.encode(x).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        things += t
    return torch.cat(means), torch.cat(stds), things


def train_unet(model: checkpoint.StableDiffusion, latents, stds, captions: list[list[str]],
               s: dict, record: Log) -> None:
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(model.architecture["scheduler"])
    params = list(model.unet.parameters()) + list(model.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=s["unet_learning_rate"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, s["unet_learning_rate"], total_steps=s["unet_steps"],
                                                pct_start=0.1)
    g = torch.Generator().manual_seed(s["seed"])
    rng = random.Random(s["seed"])
    scale = model.vae.config.scaling_factor
    alphas = noise_scheduler.alphas_cumprod
    for step in range(s["unet_steps"]):
        idx = torch.randint(0, len(latents), (s["unet_batch_size"],), generator=g)
        x0 = (latents[idx] + stds[idx] * torch.randn(latents[idx].shape, generator=g)) * scale
        text = ["" if rng.random() < s["caption_dropout"] else rng.choice(captions[i]) for i in idx.tolist()]
        ids = model.tokenizer(text, padding="max_length", truncation=True,
                              max_length=model.tokenizer.model_max_length, return_tensors="pt").input_ids
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x0),), generator=g)
        pred = model.unet(noise_scheduler.add_noise(x0, noise, t), t,
                          encoder_hidden_states=model.text_encoder(ids)[0]).sample
        # Min-SNR-gamma weighting (Hang et al. 2023): the nearly clean timesteps, whose noise is
        # hardest to see and least useful to learn, stop dominating the gradient; converges faster
        snr = alphas[t] / (1 - alphas[t])
        weight = snr.clamp(max=s["min_snr_gamma"]) / snr if s["min_snr_gamma"] else torch.ones_like(snr)
        loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        record(step, loss.item())


STAGES = ("vae", "unet", "classifier")


def run(out_dir: Path, settings: dict | None = None, stages=STAGES) -> Path:
    """Run the stages, each reading what the one before wrote to out_dir: "vae" writes
    toy-sd.safetensors (trained VAE, untrained rest) and tokenizer/, "unet" trains the UNet and
    text encoder on that VAE and writes the final toy-sd.safetensors and samples.png,
    "classifier" writes attributes.safetensors. Losses go to pretrain-loss.csv, and what each
    stage did (time, device, accuracy) to pretrain.json."""
    s = {**DEFAULTS, **(settings or {})}
    if s["cpu_threads"]:  # on a shared CPU one thread per process beats several that wait on each other
        torch.set_num_threads(s["cpu_threads"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary_path = out_dir / "pretrain.json"
    for stage in stages:
        started = time.time()
        done = {"vae": pretrain_vae, "unet": pretrain_unet, "classifier": pretrain_classifier}[stage](out_dir, s)
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        summary[stage] = {**done, "seconds": round(time.time() - started), "torch": torch.__version__,
                          "device": torch.cuda.get_device_name() if torch.cuda.is_available()
                          else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
                          "settings": s}
        write_json(summary, summary_path)
    return out_dir / MODEL_FILE


def build(out_dir: Path, seed: int) -> checkpoint.StableDiffusion:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    arch = architecture(tiny.write_tokenizer(out_dir / "tokenizer", max_length=MAX_TOKENS))
    torch.manual_seed(seed)
    return checkpoint.StableDiffusion(
        unet=UNet2DConditionModel(**arch["unet"]), vae=AutoencoderKL(**arch["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**arch["text_encoder"])),
        tokenizer=CLIPTokenizer.from_pretrained(str(out_dir / "tokenizer")), architecture=arch)


def save(model: checkpoint.StableDiffusion, out_dir: Path, s: dict) -> None:
    checkpoint.save(model, out_dir / MODEL_FILE, dtype="fp16",
                    metadata={"dreampipe.model": "toy-sd", "dreampipe.pretrain": json.dumps(s)})


def pretrain_vae(out_dir: Path, s: dict) -> dict:
    model = build(out_dir, s["seed"])
    train_vae(model.vae, s, Log(out_dir / "pretrain-loss.csv", "vae"))
    save(model, out_dir, s)
    return {"vae_parameters": sum(p.numel() for p in model.vae.parameters())}


def pretrain_unet(out_dir: Path, s: dict) -> dict:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    model = checkpoint.load(out_dir / MODEL_FILE, tokenizer=out_dir / "tokenizer")
    torch.manual_seed(s["seed"])
    model.unet = UNet2DConditionModel(**model.architecture["unet"])
    model.text_encoder = CLIPTextModel(CLIPTextConfig(**model.architecture["text_encoder"]))
    model.vae.eval().requires_grad_(False)
    means, stds, things = encode(model.vae, list(range(s["latents"])))
    # as SD's 0.18215: scale latents to unit variance for the noise schedule
    scale = float(1 / means.std())
    model.vae.register_to_config(scaling_factor=scale)
    model.architecture["vae"]["scaling_factor"] = scale
    captions = [[t.caption(random.Random(j)) for j in range(8)] for t in things]
    train_unet(model, means, stds, captions, s, Log(out_dir / "pretrain-loss.csv", "unet"))
    model.unet.eval()
    model.text_encoder.eval()
    save(model, out_dir, s)
    seeds = [0, 1, 2, 3]
    images = sampling.generate(model, [p for p in SAMPLE_PROMPTS for _ in seeds], seeds * len(SAMPLE_PROMPTS),
                               resolution=64, steps=20, guidance_scale=5.0)
    save_atomic(grid(images, [p[11:] for p in SAMPLE_PROMPTS for _ in seeds], columns=len(seeds)),
                out_dir / "samples.png")
    return {"vae_scaling_factor": scale,
            "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in
                           (("unet", model.unet), ("vae", model.vae), ("text_encoder", model.text_encoder))}}


def pretrain_classifier(out_dir: Path, s: dict) -> dict:
    model = checkpoint.load(out_dir / MODEL_FILE, tokenizer=out_dir / "tokenizer")
    seeds = list(range(2 * 10**6, 2 * 10**6 + s["classifier_reconstructions"]))
    x, things = pictures(seeds)
    with torch.no_grad():
        recon = sampling.to_pil(model.vae.decode(model.vae.encode(x).latent_dist.mean).sample)
    classifier = evaluate.train_classifier(s["classifier_steps"], list(zip(recon, things)), seed=s["seed"],
                                           log=log.info)
    evaluate.save_classifier(classifier, out_dir / evaluate.CLASSIFIER_FILE)
    return {"accuracy_on_toy_world": evaluate.accuracy(classifier, range(3 * 10**6, 3 * 10**6 + 500))}
