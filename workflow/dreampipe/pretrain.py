"""Pretrain the toy base model: a tiny SD-architecture model that has learned the toy world.

Stage "vae": the VAE learns to reconstruct fresh toy-world pictures. Stage "unet": the UNet and
text encoder learn noise prediction on the VAE's latents of captioned pictures, a tenth of the
captions empty for classifier-free guidance. Stage "classifier": the attribute classifier of
evaluate.py learns to read toy-world pictures, half of them reconstructions by the model's VAE.
Stage "check": the base model draws fully described held-out things, and the classifier says how
often each attribute came out as asked. Every picture comes from a seed (whichever the number of
data-loading workers), so a rerun on one machine repeats the run. On a GPU the networks train
there in fp32 (TF32 matmuls: at this size the steps are launch-bound, and bf16 would only add
cast kernels), the UNet's forward and backward replayed as CUDA graphs, pictures drawn by worker
processes, and the run is sized by time budgets (the steps they gave are recorded, to repeat it).
Written: one SD single-file checkpoint (fp16), its tokenizer, the classifier, the loss log and
its plot, sample grids and pretrain.json.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from . import checkpoint, evaluate, sampling, speed, tiny, toyworld
from .files import write_json
from .images import grid, save_atomic, save_figure
from .losses import min_snr_weight, noise_loss

log = logging.getLogger("dreampipe.pretrain")
MODEL_FILE = "toy-sd.safetensors"
# Toy captions are at most 13 tokens; a short context makes every cross-attention cheaper.
MAX_TOKENS = 20
SAMPLE_PROMPTS = ["a photo of a star", "a photo of a red circle on a white background",
                  "a photo of a blue striped square", "a photo of a yellow dotted triangle",
                  "a photo of a purple striped star", "a photo of a purple dotted star"]
# Seed ranges of the pictures each stage draws, apart from each other and from the evaluation's
# held-out seeds (evaluate.SEED_SETS, from 10**6): the UNet's captioned pictures come from 0 up.
VAE_SEEDS, RECONSTRUCTION_SEEDS, CLASSIFIER_TEST_SEEDS, ROUND_TRIP_SEEDS = 10**7, 2 * 10**6, 3 * 10**6, 8 * 10**6
# A time budget times the steps between these two (after any start-up such as graph capture)
# and then fixes the number of steps.
CALIBRATION = (10, 50)
# The CPU default: about an hour on 2 cores (docs/quality.md). *_seconds: a time budget for the
# stage, which then runs as many of its *_steps as fit.
DEFAULTS = {"vae_steps": 1000, "vae_seconds": None, "vae_warmup_steps": 300, "vae_batch_size": 16,
            "vae_learning_rate": 2e-3, "vae_channels": [8, 16, 32, 32], "kl_weight": 1e-6,
            "classifier_steps": 3000, "classifier_reconstructions": 512,
            "latents": 16384, "unet_steps": 12000, "unet_seconds": None, "unet_warmup_steps": 1200,
            "unet_batch_size": 64, "unet_learning_rate": 1e-3, "caption_dropout": 0.1, "min_snr_gamma": 5.0,
            "seed": 0, "cpu_threads": 1, "workers": 0, "log_every": 1,
            "sample_seeds": 4, "check_seeds": 64, "check_steps": 20}
# On a GPU (bench/pretrain_toy_gpu.sh): 8x the pictures, a wider VAE, 4x the batch, as many steps
# as fit in about 5 minutes of training. The run of 2026-11-30 (docs/quality.md) had 150 s of UNet
# and 9078 steps, short of the pattern goal: the UNet now gets 240 s.
GPU_SETTINGS = {"vae_steps": 100000, "vae_seconds": 50, "vae_batch_size": 64, "vae_channels": [16, 32, 64, 64],
                "classifier_reconstructions": 4096, "latents": 131072, "unet_steps": 500000,
                "unet_seconds": 240, "unet_warmup_steps": 1000, "unet_batch_size": 256,
                "cpu_threads": 0, "workers": 12, "log_every": 10}


def settings_for(device, overrides: dict | None = None) -> dict:
    """DEFAULTS, with GPU_SETTINGS on a GPU, with the caller's overrides."""
    return {**DEFAULTS, **(GPU_SETTINGS if speed.on_gpu(device) else {}), **(overrides or {})}


def architecture(vocab_size: int, vae_channels=DEFAULTS["vae_channels"]) -> dict:
    """The tiny model's architecture with one layer per block and a narrow VAE: cheap enough to
    pretrain on a CPU and to finetune in the demo; still the SD 1.x block structure and key layout."""
    arch = tiny.architecture(vocab_size)
    arch["vae"].update(block_out_channels=list(vae_channels), layers_per_block=1, norm_num_groups=8)
    arch["unet"].update(layers_per_block=1)
    return arch


def pictures(seeds) -> tuple[np.ndarray, list[toyworld.Thing]]:
    """The toy pictures of these seeds as uint8 (N, 64, 64, 3) (sampling.from_uint8 makes them
    network input), and what they show."""
    examples = [toyworld.example(s) for s in seeds]
    return np.stack([np.asarray(im) for im, _, _ in examples]), [t for _, t, _ in examples]


def batch_loader(data: torch.utils.data.Dataset, *, workers: int):
    """The items of `data` (each a whole batch) in order, made by `workers` processes (0: this
    one). Items are numpy arrays and plain objects, passed back pickled: tensors would go through
    shared memory, which containers often keep at 64 MB."""
    return torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers, collate_fn=_as_is,
                                       prefetch_factor=4 if workers else None)


def _as_is(item):
    return item


class _Batches(torch.utils.data.Dataset):
    """Batch i: the pictures of seeds first + i * size ... first + (i + 1) * size - 1."""

    def __init__(self, first: int, size: int, count: int):
        self.first, self.size, self.count = first, size, count

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        return pictures(range(self.first + i * self.size, self.first + (i + 1) * self.size))


def batches(first: int, size: int, count: int, *, workers: int):
    """`count` batches of toy pictures and what they show, in order, drawn by `workers` processes
    (0: this one); the same pictures whatever the number of workers."""
    return batch_loader(_Batches(first, size, count), workers=workers)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """The learning rate's share of its peak: from 1/25 up to 1 over `warmup` steps (the same
    whatever the total, so a time budget can fix the total later), then a cosine down to 0 at `total`."""
    warmup = min(warmup, total)
    if step < warmup:
        return 1 / 25 + (1 - 1 / 25) * step / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def fit(opt: torch.optim.Optimizer, step_fn, *, steps: int, seconds: float | None = None, warmup: int = 0,
        record: "Log", device, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> int:
    """Train: step_fn(step) computes the gradients and returns the loss (a tensor, not read here,
    so a GPU runs ahead), then the optimizer steps. All `steps`, or with a time budget as many as
    fit in `seconds`, counted from the pace between the CALIBRATION steps. The learning rate
    follows lr_factor (`warmup`), or `scheduler`, one made for exactly `steps` (then no budget).
    Returns the steps run."""
    if scheduler and seconds is not None:
        raise ValueError("a scheduler made for a number of steps cannot follow a time budget")
    sched = scheduler or torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, steps, warmup))
    started, marks, step = time.time(), {}, 0
    while step < steps:
        loss = step_fn(step)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        record(step, loss)
        step += 1
        if seconds is not None and step in CALIBRATION and steps > CALIBRATION[1]:
            if speed.on_gpu(device):
                torch.cuda.synchronize(device)
            marks[step] = time.time()
            if step == CALIBRATION[1]:
                pace = (marks[CALIBRATION[1]] - marks[CALIBRATION[0]]) / (CALIBRATION[1] - CALIBRATION[0])
                steps = min(steps, step + max(0, int((seconds - (time.time() - started)) / pace)))
                log.info("%s: %.1f ms a step, %d steps fit in %.0f s", record.stage, 1000 * pace, steps, seconds)
    record.flush()
    return steps


class Log:
    """A stage's loss rows in a CSV (replacing that stage's rows of an earlier run), one row per
    `every` steps (their mean loss), and a line to the logger now and then. Losses may be GPU
    tensors: they are read in bulk, so the GPU is not waited for at every step."""

    def __init__(self, path: Path, stage: str, every: int = 1):
        self.path, self.stage, self.every, self.start, self.pending = path, stage, every, time.time(), []
        rows = path.read_text().splitlines()[1:] if path.exists() else []
        path.write_text("\n".join(["stage,step,loss,seconds"] + [r for r in rows if not r.startswith(stage + ",")]) + "\n")

    def __call__(self, step: int, loss):
        self.pending.append((step, loss))
        if len(self.pending) >= self.every * -(-100 // self.every):  # whole rows of `every` steps
            self.flush()

    def flush(self):
        if not self.pending:
            return
        steps = [s for s, _ in self.pending]
        losses = torch.stack([torch.as_tensor(l).float() for _, l in self.pending]).tolist()
        self.pending, seconds = [], time.time() - self.start
        with self.path.open("a") as f:
            for i in range(0, len(steps), self.every):
                window = losses[i:i + self.every]
                f.write(f"{self.stage},{steps[i + len(window) - 1]},{sum(window) / len(window):.5f},{seconds:.1f}\n")
        log.info("%s step %d loss %.4f (%.0f s)", self.stage, steps[-1], losses[-1], seconds)


def train_vae(vae, s: dict, record: Log, device) -> int:
    with torch.no_grad():  # a nearly deterministic posterior at first: at log-variance 0 the
        vae.quant_conv.bias[vae.config.latent_channels:].fill_(-8.0)  # decoder would see only noise
    opt = torch.optim.AdamW(vae.parameters(), lr=s["vae_learning_rate"], fused=speed.on_gpu(device))
    data = iter(batches(VAE_SEEDS, s["vae_batch_size"], s["vae_steps"], workers=s["workers"]))

    def step(_):
        x = sampling.from_uint8(next(data)[0], device)
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample()).sample
        loss = F.mse_loss(recon, x) + s["kl_weight"] * dist.kl().mean()
        loss.backward()
        return loss.detach()

    return fit(opt, step, steps=s["vae_steps"], seconds=s["vae_seconds"], warmup=s["vae_warmup_steps"],
               record=record, device=device)


@torch.no_grad()
def encode(vae, seeds, workers: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[toyworld.Thing]]:
    """Posterior means and standard deviations of the pictures of these seeds (consecutive when
    drawn by workers), on the VAE's device."""
    device = next(vae.parameters()).device
    chunk = 256
    if workers:
        parts = batches(seeds[0], chunk, math.ceil(len(seeds) / chunk), workers=workers)
    else:
        parts = (pictures(seeds[i:i + chunk]) for i in range(0, len(seeds), chunk))
    means, stds, things = [], [], []
    dtype = next(vae.parameters()).dtype
    for x, t in parts:
        dist = vae.encode(sampling.from_uint8(x, device).to(dtype)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        things += t
    n = len(seeds)
    return torch.cat(means)[:n], torch.cat(stds)[:n], things[:n]


def caption_table(things: list[toyworld.Thing], tokenizer):
    """Every caption of every thing (toyworld.caption_variants) as token ids: (table of distinct
    things x 8 variants x tokens, their probabilities (0 for padding), index of each thing's row,
    ids of the empty caption). The toy world has a few hundred distinct things, so each is
    tokenized once, and a step draws captions as toyworld.example would, on the device."""
    rows, index = {}, []
    for t in things:
        index.append(rows.setdefault(t, len(rows)))
    variants = [list(toyworld.caption_variants(t).items()) for t in rows]
    width = max(len(v) for v in variants)
    captions = [c for v in variants for c, _ in v + [("", 0.0)] * (width - len(v))] + [""]
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    weights = torch.tensor([[p for _, p in v] + [0.0] * (width - len(v)) for v in variants])
    return ids[:-1].view(len(rows), width, -1), weights, torch.tensor(index), ids[-1]


def train_unet(model: checkpoint.StableDiffusion, latents, stds, things: list[toyworld.Thing],
               s: dict, record: Log, device) -> tuple[int, bool]:
    """Returns the steps run and whether the UNet ran as CUDA graphs."""
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(model.architecture["scheduler"])
    params = list(model.unet.parameters()) + list(model.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=s["unet_learning_rate"], weight_decay=0.0, fused=speed.on_gpu(device))
    table, weights, row_of, empty = (t.to(device) for t in caption_table(things, model.tokenizer))
    g = torch.Generator(device).manual_seed(s["seed"])
    scale = model.vae.config.scaling_factor
    alphas = noise_scheduler.alphas_cumprod.to(device)
    unet_call = speed.GraphedUNet(model.unet) if speed.on_gpu(device) else None
    bs, n = s["unet_batch_size"], len(latents)

    def unet(noisy, t, context):
        nonlocal unet_call
        if unet_call is not None:
            try:
                return unet_call(noisy, t, context)
            except RuntimeError as e:  # a capture that fails costs speed, not the run
                log.warning("CUDA graphs failed (%s); the UNet runs eagerly", str(e).splitlines()[0])
                unet_call = None
        return model.unet(noisy, t, encoder_hidden_states=context).sample

    def step(_):
        idx = torch.randint(0, n, (bs,), generator=g, device=device)
        x0 = (latents[idx] + stds[idx] * torch.randn(latents[idx].shape, generator=g, device=device)) * scale
        u = torch.rand(bs, 1, generator=g, device=device)  # inverse CDF: no wait for the GPU
        variant = (u > weights[row_of[idx]].cumsum(1)).sum(1).clamp(max=weights.shape[1] - 1)
        dropped = torch.rand(bs, generator=g, device=device) < s["caption_dropout"]
        ids = torch.where(dropped[:, None], empty, table[row_of[idx], variant])
        noise = torch.randn(x0.shape, generator=g, device=device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bs,), generator=g, device=device)
        pred = unet(noise_scheduler.add_noise(x0, noise, t), t, model.text_encoder(ids)[0])
        # Min-SNR-gamma weighting: converges faster
        weight = min_snr_weight(alphas, t, s["min_snr_gamma"]) if s["min_snr_gamma"] else None
        loss = noise_loss(pred, noise, item_weights=weight).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        return loss.detach()

    steps = fit(opt, step, steps=s["unet_steps"], seconds=s["unet_seconds"], warmup=s["unet_warmup_steps"],
                record=record, device=device)
    return steps, unet_call is not None


STAGES = ("vae", "unet", "classifier", "check")


def run(out_dir: Path, settings: dict | None = None, stages=STAGES) -> Path:
    """Run the stages, each reading what the one before wrote to out_dir: "vae" writes
    toy-sd.safetensors (trained VAE, untrained rest) and tokenizer/, "unet" trains the UNet and
    text encoder on that VAE and writes the final toy-sd.safetensors and samples.png,
    "classifier" writes attributes.safetensors, "check" scores the model's samples with it
    (check.png). Losses go to pretrain-loss.csv and .png, and what each stage did (time, device,
    steps, accuracy) to pretrain.json, with the settings that repeat it."""
    device = sampling.pick_device()
    s = settings_for(device, settings)
    if s["cpu_threads"]:  # on a shared CPU one thread per process beats several that wait on each other
        torch.set_num_threads(s["cpu_threads"])
    if speed.on_gpu(device):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary_path = out_dir / "pretrain.json"
    for stage in stages:
        started = time.time()
        done = {"vae": pretrain_vae, "unet": pretrain_unet, "classifier": pretrain_classifier,
                "check": pretrain_check}[stage](out_dir, s, device)
        # a time budget's steps, recorded as plain steps: these settings repeat the run
        ran = {**s, **({f"{stage}_steps": done["steps"], f"{stage}_seconds": None} if f"{stage}_seconds" in s else {})}
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        summary[stage] = {**done, "seconds": round(time.time() - started), "torch": torch.__version__,
                          "device": torch.cuda.get_device_name(device) if speed.on_gpu(device)
                          else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
                          "settings": ran}
        write_json(summary, summary_path)
        if (out_dir / "pretrain-loss.csv").exists():
            plot_loss(out_dir / "pretrain-loss.csv", out_dir / "pretrain-loss.png")
    return out_dir / MODEL_FILE


def plot_loss(csv: Path, png: Path) -> None:
    """One panel per stage: loss over steps, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for row in csv.read_text().splitlines()[1:]:
        stage, step, loss, _ = row.split(",")
        curves.setdefault(stage, ([], []))
        curves[stage][0].append(int(step))
        curves[stage][1].append(float(loss))
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.5), dpi=100, squeeze=False)
    for ax, (stage, (steps, losses)) in zip(axes[0], curves.items()):
        ax.plot(steps, losses, lw=0.8)
        ax.set(xlabel="step", ylabel="loss", title=stage, yscale="log" if min(losses) > 0 else "linear")
    fig.tight_layout()
    save_figure(fig, png)


def build(out_dir: Path, s: dict) -> checkpoint.StableDiffusion:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    arch = architecture(tiny.write_tokenizer(out_dir / "tokenizer", max_length=MAX_TOKENS), s["vae_channels"])
    torch.manual_seed(s["seed"])
    return checkpoint.StableDiffusion(
        unet=UNet2DConditionModel(**arch["unet"]), vae=AutoencoderKL(**arch["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**arch["text_encoder"])),
        tokenizer=CLIPTokenizer.from_pretrained(str(out_dir / "tokenizer")), architecture=arch)


def save(model: checkpoint.StableDiffusion, out_dir: Path, s: dict) -> None:
    checkpoint.save(model, out_dir / MODEL_FILE, dtype="fp16",
                    metadata={"dreampipe.model": "toy-sd", "dreampipe.pretrain": json.dumps(s)})


def load(out_dir: Path, device) -> checkpoint.StableDiffusion:
    return checkpoint.load(out_dir / MODEL_FILE, tokenizer=out_dir / "tokenizer", device=device)


def pretrain_vae(out_dir: Path, s: dict, device) -> dict:
    model = build(out_dir, s)
    model.vae.to(device)
    steps = train_vae(model.vae, s, Log(out_dir / "pretrain-loss.csv", "vae", s["log_every"]), device)
    save(model, out_dir, s)
    return {"steps": steps, "pictures": steps * s["vae_batch_size"],
            "vae_parameters": sum(p.numel() for p in model.vae.parameters())}


def pretrain_unet(out_dir: Path, s: dict, device) -> dict:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    model = load(out_dir, device)
    torch.manual_seed(s["seed"])
    model.unet = UNet2DConditionModel(**model.architecture["unet"]).to(device)
    model.text_encoder = CLIPTextModel(CLIPTextConfig(**model.architecture["text_encoder"])).to(device)
    model.vae.eval().requires_grad_(False)
    means, stds, things = encode(model.vae, list(range(s["latents"])), s["workers"])
    # as SD's 0.18215: scale latents to unit variance for the noise schedule
    scale = float(1 / means.std())
    model.vae.register_to_config(scaling_factor=scale)
    model.architecture["vae"]["scaling_factor"] = scale
    steps, graphs = train_unet(model, means, stds, things, s,
                               Log(out_dir / "pretrain-loss.csv", "unet", s["log_every"]), device)
    model.unet.eval()
    model.text_encoder.eval()
    summary = out_dir / "pretrain.json"  # the VAE stage's steps, where a time budget chose them
    vae = json.loads(summary.read_text()).get("vae", {}).get("settings", {}) if summary.exists() else {}
    save(model, out_dir, {**s, **{k: vae[k] for k in ("vae_steps", "vae_seconds") if k in vae},
                          "unet_steps": steps, "unet_seconds": None})
    seeds = list(range(s["sample_seeds"]))
    images = sampling.generate(model, [p for p in SAMPLE_PROMPTS for _ in seeds], seeds * len(SAMPLE_PROMPTS),
                               resolution=64, steps=20, guidance_scale=5.0)
    save_atomic(grid(images, [p[11:] for p in SAMPLE_PROMPTS for _ in seeds], columns=len(seeds)),
                out_dir / "samples.png")
    return {"steps": steps, "pictures": s["latents"], "samples_seen": steps * s["unet_batch_size"],
            "unet_graphs": graphs, "vae_scaling_factor": scale,
            "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in
                           (("unet", model.unet), ("vae", model.vae), ("text_encoder", model.text_encoder))}}


def labels(things: list[toyworld.Thing]) -> dict:
    return {name: torch.tensor([values.index(getattr(t, name)) for t in things])
            for name, values in toyworld.ATTRIBUTES.items()}


def augment(image: Image.Image, rng: random.Random) -> Image.Image:
    """Blur and noise, as in pictures decoded from a small VAE."""
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.5)))
    noise = torch.randn(64, 64, 3, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
    arr = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32))
    arr = (arr + noise * rng.uniform(0, 12)).clamp(0, 255).to(torch.uint8)
    return Image.fromarray(arr.numpy())


class _ClassifierBatches(torch.utils.data.Dataset):
    """Batch i of the classifier's training data: fresh toy-world pictures (augmented) mixed half
    and half with `extra` labelled pictures, drawn by a random generator of (seed, i) alone, so
    the same whatever the number of workers that draw them. Pixels as uint8 (N, 64, 64, 3)."""

    def __init__(self, extra: list, seed: int, size: int, count: int):
        self.extra, self.seed, self.size, self.count = extra, seed, size, count

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        rng = random.Random(f"{self.seed}/{i}")
        batch = []
        for _ in range(self.size):
            if self.extra and rng.random() < 0.5:
                batch.append(rng.choice(self.extra))
            else:
                im, thing, _ = toyworld.example(rng.randrange(2**31))
                batch.append((augment(im, rng), thing))
        return np.stack([np.asarray(im.convert("RGB")) for im, _ in batch]), [t for _, t in batch]


def train_classifier(extra: list[tuple[Image.Image, toyworld.Thing]], *, steps: int, seed: int, record: Log,
                     device, batch_size: int = 64, workers: int = 0) -> evaluate.AttributeClassifier:
    """evaluate.py's attribute classifier, on fresh toy-world pictures every step (augmented),
    mixed with `extra` labelled pictures (VAE reconstructions, so that it knows what decoded
    pictures look like), drawn by `workers` processes; a one-cycle learning rate up to 3e-3."""
    torch.manual_seed(seed)
    net = evaluate.AttributeClassifier().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    data = iter(batch_loader(_ClassifierBatches(list(extra), seed, batch_size, steps), workers=workers))

    def step(_):
        pixels, things = next(data)
        logits = net(sampling.from_uint8(pixels, device))
        target = labels(things)
        loss = sum(F.cross_entropy(logits[k], target[k].to(device)) for k in logits)
        loss.backward()
        return loss.detach()

    fit(opt, step, steps=steps, record=record, device=device,
        scheduler=torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps))
    return net.eval()


def pretrain_classifier(out_dir: Path, s: dict, device) -> dict:
    model = load(out_dir, device)
    seeds = range(RECONSTRUCTION_SEEDS, RECONSTRUCTION_SEEDS + s["classifier_reconstructions"])
    means, _, things = encode(model.vae, list(seeds), s["workers"])
    with torch.no_grad():
        recon = sampling.to_pil(torch.cat([model.vae.decode(m).sample for m in means.split(256)]))
    classifier = train_classifier(list(zip(recon, things)), steps=s["classifier_steps"], seed=s["seed"],
                                  record=Log(out_dir / "pretrain-loss.csv", "classifier", s["log_every"]),
                                  device=device, workers=s["workers"])
    evaluate.save_classifier(classifier, out_dir / evaluate.CLASSIFIER_FILE)
    return {"accuracy_on_toy_world": evaluate.accuracy(classifier, range(CLASSIFIER_TEST_SEEDS, CLASSIFIER_TEST_SEEDS + 500))}


def pretrain_check(out_dir: Path, s: dict, device) -> dict:
    """The base model's samples of fully described things ("a photo of a red striped star on a
    blue background") on the held-out test seeds: the share whose shape, colour, pattern and
    background the classifier reads as asked (a lower bound: a miss is the model's or the
    classifier's), beside the classifier's accuracy on VAE round trips of held-out pictures."""
    model = sampling.load(out_dir / MODEL_FILE, out_dir / "tokenizer")
    net = evaluate.load_classifier(out_dir / evaluate.CLASSIFIER_FILE).to(device)
    seeds = list(evaluate.SEED_SETS["test"][:s["check_seeds"]])
    agreement, images, things = evaluate.prompt_agreement(model, net, seeds, steps=s["check_steps"],
                                                          guidance_scale=5.0)
    shown = evaluate.GRID_SEEDS
    save_atomic(grid(images[:shown], [t.caption()[11:] for t in things[:shown]], columns=8), out_dir / "check.png")
    round_trip_seeds = list(range(ROUND_TRIP_SEEDS, ROUND_TRIP_SEEDS + s["check_seeds"]))
    means, _, originals = encode(model.vae, round_trip_seeds)
    with torch.no_grad():
        round_trips = sampling.to_pil(model.vae.decode(means.to(next(model.vae.parameters()).dtype)).sample)
    return {"seeds": seeds, "steps": s["check_steps"], "guidance_scale": 5.0, **agreement,
            "round_trip_accuracy": evaluate.agreement(net.predict(round_trips), originals)[0]}
