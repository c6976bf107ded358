"""Train: DreamBooth finetuning with prior preservation, in Lightning, resumable after a kill.

Every random draw of micro-batch k (which images, flips, noise, timesteps) comes from a generator
seeded with (seed, k), so a run resumed from its saved state makes exactly the draws the
uninterrupted run would have made, and ends with bit-identical weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from . import checkpoint, sampling, speed
from .errors import DreampipeError
from .images import grid, save_atomic

log = logging.getLogger("dreampipe.train")
STATE_FILE = "last.ckpt"


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + stream)


def cycle_index(seed: int, stream: int, position: int, count: int) -> int:
    """Item `position` of an endless sequence of shuffled passes over `count` items."""
    perm = torch.randperm(count, generator=step_generator(seed, position // count, stream))
    return int(perm[position % count])


class StepIndices(IterableDataset):
    """Micro-batch k: which instance and class images, and which to flip. Any counts work:
    the instance and class streams cycle independently and max_steps alone ends training."""

    def __init__(self, settings: dict, n_instance: int, n_class: int, start: int, total: int):
        self.s, self.n_instance, self.n_class, self.start, self.total = settings, n_instance, n_class, start, total

    def __iter__(self):
        bs, seed = self.s["batch_size"], self.s["seed"]
        for k in range(self.start, self.total):
            inst = [cycle_index(seed, 1, k * bs + j, self.n_instance) for j in range(bs)]
            cls = [cycle_index(seed, 2, k * bs + j, self.n_class) for j in range(bs)] if self.n_class else []
            flip = (torch.rand(len(inst) + len(cls), generator=step_generator(seed, k, 3)) < 0.5
                    if self.s["random_flip"] else torch.zeros(len(inst) + len(cls), dtype=torch.bool))
            yield {"step": k, "instance": torch.tensor(inst), "class": torch.tensor(cls, dtype=torch.long),
                   "flip": flip}


class DreamBoothData(pl.LightningDataModule):
    def __init__(self, instance_dir: Path, class_manifest: Path | None, settings: dict):
        super().__init__()
        from PIL import Image

        manifest = json.loads((Path(instance_dir) / "manifest.json").read_text())
        self.settings = settings
        self.instance_images = sampling.from_pil([Image.open(Path(instance_dir) / m["file"]) for m in manifest])
        self.instance_captions = [m["caption"] for m in manifest]
        self.class_images, self.class_prompt = torch.empty(0), ""
        if class_manifest:
            cm = json.loads(Path(class_manifest).read_text())
            self.class_images = sampling.from_pil([Image.open(f) for f in cm["images"]])
            self.class_prompt = cm["prompt"]

    def train_dataloader(self):
        accum = self.settings["gradient_accumulation_steps"]
        start = self.trainer.global_step * accum  # restored already when resuming
        data = StepIndices(self.settings, len(self.instance_images), len(self.class_images),
                           start, self.settings["max_steps"] * accum)
        return DataLoader(data, batch_size=None, num_workers=0)


class DreamBooth(pl.LightningModule):
    """Noise-prediction MSE on instance images + prior_loss_weight x the same on class images."""

    def __init__(self, model: checkpoint.StableDiffusion, settings: dict):
        super().__init__()
        from diffusers import DDPMScheduler

        self.sd, self.s = model, settings
        self.unet, self.vae, self.text_encoder = model.unet, model.vae, model.text_encoder
        self.noise_scheduler = DDPMScheduler.from_config(model.architecture["scheduler"])
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(settings["train_text_encoder"])
        if settings["gradient_checkpointing"]:
            self.unet.enable_gradient_checkpointing()
        self.strict_loading = False  # saved state holds only the trained networks

    # -- caches: the VAE is frozen, so latents are encoded once; so are captions when the text
    #    encoder is frozen.
    def on_fit_start(self):
        dm = self.trainer.datamodule
        self.vae.eval()
        self.instance_latents = self._encode_images(dm.instance_images)
        self.class_latents = self._encode_images(dm.class_images) if len(dm.class_images) else None
        self.captions = dm.instance_captions + [dm.class_prompt]
        self.caption_embeddings = None if self.s["train_text_encoder"] else self._embed(self.captions).detach()

    @torch.no_grad()
    def _encode_images(self, pixels: torch.Tensor) -> dict:
        out = {"mean": [], "std": [], "mean_flip": [], "std_flip": []}
        for chunk in pixels.split(8):
            for suffix, x in (("", chunk), ("_flip", chunk.flip(-1))):
                dist = self.vae.encode(x.to(self.device, self.vae.dtype)).latent_dist
                out["mean" + suffix].append(dist.mean.float())
                out["std" + suffix].append(dist.std.float())
        return {k: torch.cat(v) for k, v in out.items()}

    def _embed(self, captions: list[str]) -> torch.Tensor:
        ids = self.sd.tokenizer(captions, padding="max_length", truncation=True,
                                max_length=self.sd.tokenizer.model_max_length, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0]

    def _latents(self, cache: dict, index: torch.Tensor, flip: torch.Tensor, g: torch.Generator):
        index = index.to(self.device)
        flip = flip.to(self.device)[:, None, None, None]
        mean = torch.where(flip, cache["mean_flip"][index], cache["mean"][index])
        std = torch.where(flip, cache["std_flip"][index], cache["std"][index])
        eps = torch.randn(mean.shape, generator=g).to(self.device)
        return (mean + std * eps) * self.vae.config.scaling_factor

    def training_step(self, batch, batch_idx):
        g = step_generator(self.s["seed"], int(batch["step"]), 0)
        n_inst, n_cls = len(batch["instance"]), len(batch["class"])
        latents = [self._latents(self.instance_latents, batch["instance"], batch["flip"][:n_inst], g)]
        caption_ids = batch["instance"].tolist()
        if n_cls:
            latents.append(self._latents(self.class_latents, batch["class"], batch["flip"][n_inst:], g))
            caption_ids += [len(self.captions) - 1] * n_cls
        latents = torch.cat(latents)
        noise = torch.randn(latents.shape, generator=g)
        if self.s["offset_noise"]:
            noise += self.s["offset_noise"] * torch.randn(*latents.shape[:2], 1, 1, generator=g)
        noise = noise.to(self.device)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(latents),),
                                  generator=g).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.caption_embeddings is None:
            context = self._embed([self.captions[i] for i in caption_ids])
        else:
            context = self.caption_embeddings[torch.tensor(caption_ids, device=self.device)]
        pred = self.unet(noisy, timesteps, encoder_hidden_states=context).sample
        loss = instance_loss = F.mse_loss(pred[:n_inst].float(), noise[:n_inst].float())
        self.log("instance_loss", instance_loss)
        if n_cls:
            prior_loss = F.mse_loss(pred[n_inst:].float(), noise[n_inst:].float())
            loss = loss + self.s["prior_loss_weight"] * prior_loss
            self.log("prior_loss", prior_loss)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        from diffusers.optimization import get_scheduler

        speed.prepare_training(self.sd, self.s, self.device)
        groups = [{"params": [p for p in self.unet.parameters() if p.requires_grad], "lr": self.s["learning_rate"]}]
        if self.s["train_text_encoder"]:
            groups.append({"params": list(self.text_encoder.parameters()),
                           "lr": self.s["text_encoder_learning_rate"] or self.s["learning_rate"]})
        optimizer = speed.optimizer(groups, self.s, self.device)
        scheduler = get_scheduler(self.s["lr_scheduler"], optimizer, num_warmup_steps=self.s["lr_warmup_steps"],
                                  num_training_steps=self.s["max_steps"])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, ckpt):
        trained = ("unet.", "text_encoder.") if self.s["train_text_encoder"] else ("unet.",)
        ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if k.startswith(trained)}


class SaveState(pl.Callback):
    """Lightning state (weights, optimizer, scheduler, step) every n steps and at SIGTERM/SIGINT,
    written atomically into the state dir, which Snakemake never deletes."""

    def __init__(self, state_dir: Path, every_n_steps: int):
        self.path, self.every = Path(state_dir) / STATE_FILE, every_n_steps
        self.interrupted = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        self.interrupted = signal.Signals(signum).name

    def save(self, trainer):
        tmp = self.path.with_name(self.path.name + ".tmp")
        trainer.save_checkpoint(tmp)
        os.replace(tmp, self.path)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        at_boundary = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if self.interrupted and at_boundary:
            self.save(trainer)
            trainer.should_stop = True
        elif at_boundary and self.every and step % self.every == 0 and step < trainer.max_steps:
            self.save(trainer)


class Progress(pl.Callback):
    """A bar over optimizer steps (so rate and ETA are right after a resume) and a loss CSV."""

    def __init__(self, workdir: Path):
        self.csv = Path(workdir) / "loss.csv"

    def on_train_start(self, trainer, module):
        from tqdm import tqdm

        self.bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, unit="step", desc="train")
        rows = self.csv.read_text().splitlines()[1:] if self.csv.exists() and trainer.global_step else []
        kept = [r for r in rows if int(r.split(",")[0]) <= trainer.global_step]
        self.csv.write_text("\n".join(["step,loss,instance_loss,prior_loss", *kept]) + "\n")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        m = trainer.callback_metrics
        loss = float(m["loss"])
        with self.csv.open("a") as f:
            f.write(f"{trainer.global_step},{loss:.6f},{float(m['instance_loss']):.6f},"
                    f"{float(m.get('prior_loss', float('nan'))):.6f}\n")
        self.bar.set_postfix(loss=f"{loss:.4f}")
        self.bar.update(trainer.global_step - self.bar.n)
        if trainer.global_step % 50 == 0 or trainer.global_step == trainer.max_steps:
            log.info("step %d/%d loss %.4f (%s)", trainer.global_step, trainer.max_steps, loss, self.bar.format_dict.get("rate"))

    def on_train_end(self, trainer, module):
        self.bar.close()


class SampleGrid(pl.Callback):
    """The guide's image logging: a grid for fixed prompts and seeds every n steps."""

    def __init__(self, workdir: Path, settings: dict):
        self.dir, self.s = Path(workdir) / "samples", settings

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        every = self.s["sample_every_n_steps"]
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0 and every and trainer.global_step % every == 0:
            self.write(module, trainer.global_step)

    def write(self, module, step):
        prompts = [p for p in self.s["sample_prompts"] for _ in self.s["sample_seeds"]]
        seeds = [s for _ in self.s["sample_prompts"] for s in self.s["sample_seeds"]]
        module.unet.eval()
        with speed.eager():
            images = sampling.generate(module.sd, prompts, seeds, resolution=self.s["resolution"],
                                       steps=self.s["sample_steps"], guidance_scale=self.s["sample_guidance_scale"])
        module.unet.train()
        labels = [f"{p} #{s}" for p, s in zip(prompts, seeds)]
        save_atomic(grid(images, labels, columns=len(self.s["sample_seeds"])), self.dir / f"step-{step:05d}.png")


def fingerprint(settings: dict, inputs: list[Path]) -> str:
    """What shaped this run: the settings and the content of every input file."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in inputs:
        h.update(hashlib.sha256(Path(path).read_bytes()).digest() if Path(path).is_file() else str(path).encode())
    return h.hexdigest()


def precision(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def run(model_path, tokenizer, instance_dir: Path, class_manifest: Path | None, settings: dict,
        state_dir: Path, workdir: Path, out: Path) -> Path:
    state_dir, workdir, out = Path(state_dir), Path(workdir), Path(out)
    for name in ("pytorch_lightning", "lightning_fabric"):  # they reset their levels on import
        logging.getLogger(name).setLevel(logging.ERROR)
    inputs = [Path(model_path), Path(instance_dir) / "manifest.json"] + ([Path(class_manifest)] if class_manifest else [])
    fp = fingerprint(settings, inputs)
    resume = state_dir / STATE_FILE
    if resume.exists() and (state_dir / "fingerprint").read_text() == fp:
        log.info("resuming from %s", resume)
        ckpt_path = resume
    else:
        if state_dir.exists():
            log.info("settings or inputs changed since the saved state: starting fresh")
            shutil.rmtree(state_dir)
        state_dir.mkdir(parents=True)
        (state_dir / "fingerprint").write_text(fp)
        shutil.rmtree(workdir / "samples", ignore_errors=True)
        ckpt_path = None
    workdir.mkdir(parents=True, exist_ok=True)

    pl.seed_everything(settings["seed"], verbose=False)
    model = checkpoint.load(model_path, tokenizer=tokenizer)
    data = DreamBoothData(instance_dir, class_manifest, settings)
    module = DreamBooth(model, settings)
    saver = SaveState(state_dir, settings["save_state_every_n_steps"])
    sampler = SampleGrid(workdir, settings)
    trainer = pl.Trainer(
        max_steps=settings["max_steps"], accelerator="auto", devices=1,
        precision=precision(settings["precision"]),
        accumulate_grad_batches=settings["gradient_accumulation_steps"],
        gradient_clip_val=settings["max_grad_norm"] or None,
        callbacks=[saver, Progress(workdir), sampler], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        use_distributed_sampler=False)
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    except torch.cuda.OutOfMemoryError:
        raise DreampipeError(
            "CUDA out of memory while training. In the character file set train.gradient_checkpointing: "
            "true, train.optimizer: adamw8bit, or a smaller train.batch_size") from None
    if saver.interrupted:
        raise DreampipeError(f"training stopped by {saver.interrupted} at step {trainer.global_step}; "
                             f"state saved in {state_dir}: run the same command again to resume")
    sampler.write(module, trainer.global_step)
    plot_loss(workdir / "loss.csv", workdir / "loss.png")
    model.to("cpu", torch.float32)
    checkpoint.save(model, out, dtype="fp32", metadata={"dreampipe.steps": trainer.global_step})
    if not settings["keep_state"]:
        shutil.rmtree(state_dir)
    return out


def plot_loss(csv: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r.split(",") for r in csv.read_text().splitlines()[1:]]
    steps, loss = [int(r[0]) for r in rows], [float(r[1]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, loss, lw=0.6, alpha=0.4, label="loss")
    window = max(1, len(loss) // 20)
    smooth = [sum(loss[max(0, i - window + 1):i + 1]) / len(loss[max(0, i - window + 1):i + 1]) for i in range(len(loss))]
    ax.plot(steps, smooth, lw=1.5, label=f"mean of {window}")
    ax.set(xlabel="step", ylabel="loss", title="training loss")
    ax.legend()
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png)
