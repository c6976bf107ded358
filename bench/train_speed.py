"""Training speed and memory of our trainer: 1 instance + 1 class image per step, random weights,
SD 1.x size at 512 px on a GPU (or the tiny demo size on the CPU, `--size tiny`, as the tests run it).
Run beside ../shared/bench/diffusers_recipe.py A L in the same call.

    python bench/train_speed.py default [--compile blocks|unet|false]  # the default profile, through train.DreamBooth + Lightning
    python bench/train_speed.py low_memory                          # train.low_memory: true
    python bench/train_speed.py low_memory --profile                # and where the timed steps' time goes (torch.profiler)
    python bench/train_speed.py curve --steps 300                   # loss of the diffusers recipe vs our default profile, same seed and data (~2.5 min on an H200)
    python bench/train_speed.py default --method lora [--lora-conv-rank 8]  # train.method lora (rank 16, attention only; LoCon)
    python bench/train_speed.py default --prior-prediction          # class_data prior_prediction: the frozen base UNet's prediction, no class images
    python bench/train_speed.py default --validation-every 10       # and the validation loss every 10 steps (its cost: compare s_per_step)

Results: printed, and $OUT/train-<name>.json (<profile>-<compile>, -lora[-conv<rank>] for a LoRA) (curve: $OUT/curve.csv, $OUT/curve.png).
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
    compile), and per step over steps [warm, warm + n); peak memory before and during those."""

    def __init__(self, warm, n, profile=False):
        self.warm, self.n, self.warm_peak, self.phase_peaks = warm, n, 0.0, {}
        self.profiler = torch.profiler.profile() if profile else None

    def phase_end(self, name):
        """The peak since the last phase: where a run's peak comes from."""
        self.phase_peaks[name] = peak_gib()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_start(self, trainer, module):
        self.start = time.perf_counter()
        self.phase_end("setup")  # model moved and cast, latents cached, optimizer state

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == 0:
            synchronize()
            self.first_step = time.perf_counter() - self.start
        if batch_idx < min(3, self.warm - 1):
            synchronize()
            self.phase_end(f"step_{batch_idx}")
        if batch_idx == self.warm - 1:
            synchronize()
            self.warm_peak = max(peak_gib(), *self.phase_peaks.values())  # the whole fit before the timed steps
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()
            if self.profiler:
                self.profiler.start()
        if batch_idx == self.warm + self.n - 1:
            synchronize()
            self.seconds = (time.perf_counter() - self.t0) / self.n
            self.step_peak = peak_gib()
            if self.profiler:
                self.profiler.stop()
                ops = self.profiler.key_averages()
                for key in ("self_device_time_total", "self_cpu_time_total"):
                    print(ops.table(sort_by=key, row_limit=12, max_name_column_width=60), flush=True)


def measure(profile: str, size: str, compile: str, warm: int, n: int, trace: bool = False, method: str = "full",
            lora_conv_rank: int | None = None, prior_prediction: bool = False, validation_every: int = 0):
    settings = {**train_defaults(), "resolution": RESOLUTION[size], "max_steps": warm + n,
                "sample_every_n_steps": 0, "save_state_every_n_steps": 0, "save_state_every_n_minutes": 0,
                "low_memory": profile == "low_memory", "compile": compile, "method": method,
                "lora_conv_rank": lora_conv_rank, "validation_every_n_steps": validation_every,
                **({"prior_prediction": ["a photo of a dog"]} if prior_prediction else {})}
    work = Path(tempfile.mkdtemp())
    instance_dir, class_manifest = fake_data(work, RESOLUTION[size])
    t0 = time.perf_counter()
    model = random_sd1(size=size)
    data = train.DreamBoothData([(instance_dir, None if prior_prediction else class_manifest)], settings)
    module = train.DreamBooth(model, settings)
    timer = Timer(warm, n, trace)
    validation = train.Validation(validation_every)
    trainer = pl.Trainer(max_steps=settings["max_steps"], accelerator="auto", devices=1,
                         precision=train.precision(settings["precision"]),
                         gradient_clip_val=settings["max_grad_norm"] or None,
                         callbacks=[validation, train.Progress(work, validation=validation), timer], logger=False,
                         enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         use_distributed_sampler=False)
    trainer.fit(module, datamodule=data)
    sec = timer.seconds
    lora = f"-lora{f'-conv{lora_conv_rank}' if lora_conv_rank else ''}" if method == "lora" else ""
    variant = lora + "-prior_prediction" * prior_prediction + f"-val{validation_every}" * bool(validation_every)
    save(f"train-{profile}-{compile}{variant}", {
        "profile": profile, "compile": compile, "size": size, "method": method, "lora_rank": settings["lora_rank"],
        "lora_conv_rank": lora_conv_rank, "prior_prediction": prior_prediction,
        "validation_every_n_steps": validation_every, "it_s": 1 / sec, "s_per_step": sec,
        "trained_weights": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "first_step_s": timer.first_step, "step_peak_gib": timer.step_peak,
        "run_peak_gib": max(timer.warm_peak, peak_gib()),  # the whole fit: what a card must hold
        "phase_peaks_gib": timer.phase_peaks,
        "tflops": FLOP_STEP / sec / 1e12 if size == "sd1" else None,
        "wall_s_incl_build": time.perf_counter() - t0,
        "optimizer": type(trainer.optimizers[0]).__name__,
        "unet_dtype": str(next(model.unet.parameters()).dtype)})


def curve(size: str, steps: int, lr: float | None = None):
    """Loss over `steps` steps of our default profile against the diffusers recipe, on the same
    data (one instance and one class latent, fixed random), the same initial weights and the same
    noise and timesteps at every step (drawn from the step's seed), with the loss of our training
    step (instance + prior_loss_weight x class) and gradients clipped at max_grad_norm in all:
      recipe_A: the diffusers DreamBooth example's numerics (fp32 weights, bf16 autocast, torch AdamW);
      ours: the default profile's step (speed.prepare_training: bf16 channels-last UNet, replayed as
        CUDA graphs on a GPU; speed.optimizer: AdamWBF16's stochastic rounding);
      bf16_round_to_nearest: bf16 weights with torch's AdamW (what a plain bf16 cast would train).
    lr: the default learning rate unless given."""
    from diffusers import DDPMScheduler

    settings = {**train_defaults(), "resolution": RESOLUTION[size]}
    lr = settings["learning_rate"] if lr is None else lr
    dev, res = device(), RESOLUTION[size] // 8
    g = torch.Generator().manual_seed(0)
    first = random_sd1(size=size)
    latents = torch.randn(2, 4, res, res, generator=g).to(dev)  # [instance, class]
    context = torch.randn(2, 77, first.architecture["unet"]["cross_attention_dim"], generator=g).to(dev)
    sched = DDPMScheduler.from_config(first.architecture["scheduler"])
    del first
    losses, seconds = {}, {}
    for name in ("recipe_A", "ours", "bf16_round_to_nearest"):
        model = random_sd1(seed=0, size=size)
        model.unet.train()
        if name == "ours":
            call = speed.prepare_training(model, settings, dev)
        else:
            if name == "bf16_round_to_nearest":
                model.unet.to(dtype=torch.bfloat16, memory_format=torch.channels_last)

            def call(x, t, c, unet=model.unet):
                return unet(x, t, encoder_hidden_states=c).sample
        params = [p for p in model.unet.parameters() if p.requires_grad]
        groups = [{"params": params, "lr": lr}]
        opt = (speed.optimizer(groups, settings, dev) if name == "ours"
               else torch.optim.AdamW(groups, weight_decay=settings["adam_weight_decay"], foreach=True))
        accumulates = isinstance(opt, speed.AdamWBF16)
        losses[name] = []
        synchronize()
        t0 = time.perf_counter()
        for k in range(steps):
            gk = torch.Generator().manual_seed(k)
            noise = torch.randn(latents.shape, generator=gk).to(dev)
            t = torch.randint(0, 1000, (2,), generator=gk).to(dev)
            with torch.autocast(dev, dtype=torch.bfloat16):  # as Lightning's bf16-mixed and the recipe
                pred = call(sched.add_noise(latents, noise, t), t, context).float()
            loss = F.mse_loss(pred[:1], noise[:1]) + settings["prior_loss_weight"] * F.mse_loss(pred[1:], noise[1:])
            if accumulates:
                opt.before_backward()
            loss.backward()
            if accumulates:
                opt.after_backward()
            if settings["max_grad_norm"]:
                torch.nn.utils.clip_grad_norm_(params, settings["max_grad_norm"])
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.detach())
        losses[name] = torch.stack(losses[name]).tolist()
        seconds[name] = time.perf_counter() - t0
        print(f"curve {name}: {steps} steps in {seconds[name]:.1f} s", flush=True)
        del model, opt, params, groups, call
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    out = Path(os.environ.get("OUT", "."))
    rows = ["step," + ",".join(losses)] + [f"{k + 1}," + ",".join(f"{losses[n][k]:.6f}" for n in losses)
                                          for k in range(steps)]
    (out / "curve.csv").write_text("\n".join(rows) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = min(25, steps)
    smooth = {n: np.convolve(v, np.ones(w) / w, "valid") for n, v in losses.items()}
    x = range(w, steps + 1)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), dpi=100, sharex=True)
    for i, (n, v) in enumerate(smooth.items()):
        top.plot(x, v, label=n, color=f"C{i}")
        if n != "recipe_A":
            bottom.plot(x, v - smooth["recipe_A"], label=f"{n} - recipe_A", color=f"C{i}")
    top.set(ylabel=f"loss (mean of {w} steps)", title=f"{size} UNet, random init, lr {lr:g}, same noise and timesteps")
    bottom.set(xlabel="step", ylabel="difference to recipe_A")
    top.legend(), bottom.legend()
    fig.tight_layout()
    fig.savefig(out / "curve.png")
    save("train-curve", {"steps": steps, "lr": lr, **{n: {
        "first25": float(np.mean(v[:25])), "last25": float(np.mean(v[-25:])), "seconds": seconds[n],
        "mean_abs_diff_to_recipe_A_last25": float(np.mean(np.abs(np.subtract(v, losses["recipe_A"])[-25:])))}
        for n, v in losses.items()}})


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profile", choices=["default", "low_memory", "curve"])
    p.add_argument("--size", choices=["sd1", "tiny"], default="sd1")
    p.add_argument("--compile", choices=["auto", "graphs", "blocks", "unet", "false"], default="auto")
    p.add_argument("--warm", type=int, default=10, help="steps before the timed ones")
    p.add_argument("--steps", type=int, default=50, help="timed steps (curve: steps of each run)")
    p.add_argument("--profile", action="store_true", dest="trace", help="print torch.profiler's tables of the timed steps")
    p.add_argument("--lr", type=float, help="curve: learning rate (default: train.learning_rate's default)")
    p.add_argument("--method", choices=["full", "lora"], default="full", help="train.method (not for curve)")
    p.add_argument("--lora-conv-rank", type=int, help="train.lora_conv_rank with --method lora (LoCon)")
    p.add_argument("--prior-prediction", action="store_true",
                   help="class_images.class_data prior_prediction: no class image, the base UNet's prediction as prior target")
    p.add_argument("--validation-every", type=int, default=0, help="the validation loss every this many steps (0: off)")
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if a.profile == "curve":
        curve(a.size, a.steps, a.lr)
    else:
        measure(a.profile, a.size, False if a.compile == "false" else a.compile, a.warm, a.steps, a.trace, a.method,
                a.lora_conv_rank, a.prior_prediction, a.validation_every)
