"""Training speed and memory of our trainer: 1 instance + 1 class image per step, random weights,
SD 1.x size at 512 px on a GPU (or the tiny demo size on the CPU, `--size tiny`, as the tests run it).
Run beside ../shared/bench/diffusers_recipe.py A L in the same call.

    python bench/train_speed.py default [--compile blocks|unet|false]  # the default profile, through train.DreamBooth + Lightning
    python bench/train_speed.py low_memory                          # train.low_memory: true
    python bench/train_speed.py curve                               # loss of recipe A's numerics vs ours, same seed and data

Results: printed, and $OUT/train-<name>.json (curve: $OUT/curve.csv, $OUT/curve.png).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import FLOP_STEP, RESOLUTION, device, peak_gib, random_sd1, save, synchronize  # noqa: E402

from dreampipe import speed, train  # noqa: E402


def train_defaults() -> dict:
    """The schema's train defaults (read directly: the GPU image lacks jsonschema)."""
    import yaml

    schema = yaml.safe_load((Path(train.__file__).parent.parent / "schemas" / "config.schema.yaml").read_text())
    return {k: v["default"] for k, v in schema["properties"]["train"]["properties"].items()}


def fake_data(folder: Path, size: int):
    rng = np.random.default_rng(0)
    inst, cls = folder / "instance", folder / "class"
    inst.mkdir(parents=True), cls.mkdir()
    for d in (inst, cls):
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    (inst / "manifest.json").write_text(json.dumps([{"file": f"{i}.png", "caption": "a photo of sks dog"} for i in range(2)]))
    (folder / "class.json").write_text(json.dumps({"prompt": "a photo of a dog", "images": [str(cls / f"{i}.png") for i in range(2)]}))
    return inst, folder / "class.json"


class Timer(pl.Callback):
    """Seconds from the start of training to the end of its first step (load of the caches,
    compile), and per step over steps [warm, warm + n)."""

    def __init__(self, warm, n):
        self.warm, self.n = warm, n

    def on_train_start(self, trainer, module):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == 0:
            synchronize()
            self.first_step = time.perf_counter() - self.start
        if batch_idx == self.warm - 1:
            synchronize()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()
        if batch_idx == self.warm + self.n - 1:
            synchronize()
            self.seconds = (time.perf_counter() - self.t0) / self.n
            self.step_peak = peak_gib()


def measure(profile: str, size: str, compile: str, warm: int, n: int):
    settings = {**train_defaults(), "resolution": RESOLUTION[size], "max_steps": warm + n,
                "sample_every_n_steps": 0, "save_state_every_n_steps": 0, "save_state_every_n_minutes": 0,
                "low_memory": profile == "low_memory", "compile": compile}
    work = Path(tempfile.mkdtemp())
    instance_dir, class_manifest = fake_data(work, RESOLUTION[size])
    t0 = time.perf_counter()
    model = random_sd1(size=size)
    data = train.DreamBoothData([(instance_dir, class_manifest)], settings)
    module = train.DreamBooth(model, settings)
    timer = Timer(warm, n)
    trainer = pl.Trainer(max_steps=settings["max_steps"], accelerator="auto", devices=1,
                         precision=train.precision(settings["precision"]),
                         gradient_clip_val=settings["max_grad_norm"] or None,
                         callbacks=[train.Progress(work), timer], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         use_distributed_sampler=False)
    trainer.fit(module, datamodule=data)
    sec = timer.seconds
    save(f"train-{profile}-{compile}", {
        "profile": profile, "compile": compile, "size": size, "it_s": 1 / sec, "s_per_step": sec,
        "first_step_s": timer.first_step, "step_peak_gib": timer.step_peak, "run_peak_gib": peak_gib(),
        "tflops": FLOP_STEP / sec / 1e12 if size == "sd1" else None,
        "wall_s_incl_build": time.perf_counter() - t0,
        "optimizer": type(trainer.optimizers[0]).__name__,
        "unet_dtype": str(next(model.unet.parameters()).dtype)})


def curve(size: str, steps: int, lr: float = 1e-5):
    """The same data, noise and timesteps for each: recipe A's numerics (fp32 weights, bf16
    autocast, AdamW), ours (bf16 weights, AdamWBF16) and plain bf16 AdamW (round to nearest)."""
    from diffusers import DDPMScheduler

    dev, res = device(), RESOLUTION[size] // 8
    g = torch.Generator().manual_seed(0)
    first = random_sd1(size=size)
    latents = torch.randn(2, 4, res, res, generator=g).to(dev)
    context = torch.randn(2, 77, first.architecture["unet"]["cross_attention_dim"], generator=g).to(dev)
    del first
    losses = {}
    for name in ("recipe_A", "ours", "bf16_round_to_nearest"):
        unet = random_sd1(seed=0, size=size).unet.train()
        if name != "recipe_A":
            unet.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
        params = list(unet.parameters())
        opt = (speed.AdamWBF16(params, lr=lr) if name == "ours"
               else torch.optim.AdamW(params, lr=lr, foreach=True))
        sched = DDPMScheduler.from_config(train.checkpoint.sd1_architecture()["scheduler"])
        losses[name] = []
        for k in range(steps):
            gk = torch.Generator().manual_seed(k)
            noise = torch.randn(latents.shape, generator=gk).to(dev)
            t = torch.randint(0, 1000, (2,), generator=gk).to(dev)
            with torch.autocast(dev, dtype=torch.bfloat16):
                pred = unet(sched.add_noise(latents, noise, t), t, context).sample
            loss = F.mse_loss(pred.float(), noise)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
        del unet, opt, params
    out = Path(os.environ.get("OUT", "."))
    rows = ["step," + ",".join(losses)] + [f"{k}," + ",".join(f"{losses[n][k]:.6f}" for n in losses) for k in range(steps)]
    (out / "curve.csv").write_text("\n".join(rows) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = min(10, steps)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for n, v in losses.items():
        ax.plot(range(w - 1, steps), np.convolve(v, np.ones(w) / w, "valid"), label=n)
    ax.set(xlabel="step", ylabel=f"loss (mean of {w})", title=f"{size} UNet, random init, lr {lr}")
    ax.legend()
    fig.savefig(out / "curve.png")
    save("train-curve", {n: {"first10": float(np.mean(v[:10])), "last20": float(np.mean(v[-20:]))} for n, v in losses.items()})


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profile", choices=["default", "low_memory", "curve"])
    p.add_argument("--size", choices=["sd1", "tiny"], default="sd1")
    p.add_argument("--compile", choices=["auto", "graphs", "blocks", "unet", "false"], default="auto")
    p.add_argument("--warm", type=int, default=10, help="steps before the timed ones")
    p.add_argument("--steps", type=int, default=50, help="timed steps (curve: steps of each run)")
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if a.profile == "curve":
        curve(a.size, a.steps)
    else:
        measure(a.profile, a.size, False if a.compile == "false" else a.compile, a.warm, a.steps)
