"""Training speed and memory of our trainer on a GPU, SD 1.x size, 512 px, 1 instance + 1 class
image per step, random weights. Run beside ../shared/bench/diffusers_recipe.py A L in the same call.

    python bench/train_speed.py default      # the default profile, through train.DreamBooth + Lightning
    python bench/train_speed.py low_memory   # train.low_memory: true
    python bench/train_speed.py curve        # loss of recipe A's numerics vs ours, same seed and data

Results: printed, and $OUT/train-<name>.json (curve: $OUT/curve.csv, $OUT/curve.png).
"""

import json
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
from common import FLOP_STEP, random_sd1, save  # noqa: E402

from dreampipe import speed, train  # noqa: E402


def train_defaults() -> dict:
    """The schema's train defaults (read directly: the GPU image lacks jsonschema)."""
    import yaml

    schema = yaml.safe_load((Path(train.__file__).parent.parent / "schemas" / "config.schema.yaml").read_text())
    return {k: v["default"] for k, v in schema["properties"]["train"]["properties"].items()}


def fake_data(folder: Path, size: int = 512):
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
    """Times steps [warm, warm + n) and profiles the GPU over the next 5."""

    def __init__(self, warm, n):
        self.warm, self.n = warm, n

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.warm:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()
        if batch_idx == self.warm + self.n:
            from torch.profiler import ProfilerActivity, profile

            torch.cuda.synchronize()
            self.seconds = (time.perf_counter() - self.t0) / self.n
            self.step_peak = torch.cuda.max_memory_allocated() / 2**30
            self.prof = profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU])
            self.prof.__enter__()
            self.p0 = time.perf_counter()

    def on_train_end(self, trainer, module):
        torch.cuda.synchronize()
        wall = (time.perf_counter() - self.p0) / 5
        self.prof.__exit__(None, None, None)
        events = [e for e in self.prof.key_averages() if e.device_type.name == "CUDA"]
        self.gpu_ms = sum(e.self_device_time_total for e in events) / 5 / 1000
        self.kernels = sum(e.count for e in events) / 5
        self.prof_wall_ms = wall * 1000
        self.top = sorted(((e.self_device_time_total / 5000, e.key[:60]) for e in events), reverse=True)[:12]


def measure(profile: str, warm: int, n: int):
    settings = {**train_defaults(), "resolution": 512, "max_steps": warm + n + 5,
                "sample_every_n_steps": 0, "save_state_every_n_steps": 0,
                "low_memory": profile == "low_memory"}
    work = Path(tempfile.mkdtemp())
    instance_dir, class_manifest = fake_data(work)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = random_sd1()
    model.to(dtype=torch.float32)
    data = train.DreamBoothData(instance_dir, class_manifest, settings)
    module = train.DreamBooth(model, settings)
    timer = Timer(warm, n)
    trainer = pl.Trainer(max_steps=settings["max_steps"], accelerator="gpu", devices=1,
                         precision=train.precision(settings["precision"]),
                         gradient_clip_val=settings["max_grad_norm"] or None,
                         callbacks=[train.Progress(work), timer], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         use_distributed_sampler=False)
    trainer.fit(module, datamodule=data)
    sec = timer.seconds
    save(f"train-{profile}", {
        "profile": profile, "it_s": 1 / sec, "s_per_step": sec, "step_peak_gib": timer.step_peak,
        "run_peak_gib": torch.cuda.max_memory_allocated() / 2**30, "tflops": FLOP_STEP / sec / 1e12,
        "gpu_busy_ms_per_step": timer.gpu_ms, "profiled_wall_ms_per_step": timer.prof_wall_ms,
        "kernels_per_step": timer.kernels, "top_kernels_ms": timer.top,
        "wall_s_incl_build_and_compile": time.perf_counter() - t0,
        "optimizer": type(trainer.optimizers[0]).__name__,
        "unet_dtype": str(next(model.unet.parameters()).dtype),
        "last_loss": float(trainer.callback_metrics["loss"])})


def curve(steps: int = 150, lr: float = 1e-5):
    """The same data, noise and timesteps for each: recipe A's numerics (fp32 weights, bf16
    autocast, AdamW), ours (bf16 weights, AdamWBF16) and plain bf16 AdamW (round to nearest)."""
    from diffusers import DDPMScheduler

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 64, 64, generator=g).cuda()
    context = torch.randn(2, 77, 768, generator=g).cuda()
    losses = {}
    for name in ("recipe_A", "ours", "bf16_round_to_nearest"):
        model = random_sd1(seed=0)
        unet = model.unet.train()
        del model
        if name != "recipe_A":
            unet.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
        params = list(unet.parameters())
        opt = (speed.AdamWBF16(params, lr=lr) if name == "ours"
               else torch.optim.AdamW(params, lr=lr, foreach=True))
        sched = DDPMScheduler.from_config(train.checkpoint.sd1_architecture()["scheduler"])
        losses[name] = []
        for k in range(steps):
            gk = torch.Generator().manual_seed(k)
            noise = torch.randn(latents.shape, generator=gk).cuda()
            t = torch.randint(0, 1000, (2,), generator=gk).cuda()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                pred = unet(sched.add_noise(latents, noise, t), t, context).sample
            loss = F.mse_loss(pred.float(), noise)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
        del unet, opt, params
        torch.cuda.empty_cache()
    import os

    out = Path(os.environ.get("OUT", "."))
    rows = ["step," + ",".join(losses)] + [f"{k}," + ",".join(f"{losses[n][k]:.6f}" for n in losses) for k in range(steps)]
    (out / "curve.csv").write_text("\n".join(rows) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for n, v in losses.items():
        w = 10
        ax.plot(range(w - 1, steps), np.convolve(v, np.ones(w) / w, "valid"), label=n)
    ax.set(xlabel="step", ylabel=f"loss (mean of {w})", title=f"SD 1.x UNet, random init, lr {lr}")
    ax.legend()
    fig.savefig(out / "curve.png")
    save("train-curve", {n: {"first10": float(np.mean(v[:10])), "last20": float(np.mean(v[-20:]))} for n, v in losses.items()})


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    which = sys.argv[1]
    if which == "curve":
        curve()
    else:
        measure(which, warm=10, n=50 if which == "default" else 20)
