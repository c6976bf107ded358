"""Train: DreamBooth finetuning with prior preservation, in Lightning, resumable after a kill.

Every random draw is a pure function of the seed and a position: which images the k-th
micro-batch holds, and for the item at global position p (counted over all devices) its flip,
latent sample, noise and timestep. A run resumed from its saved state therefore makes exactly
the draws the uninterrupted run would have made and ends with bit-identical weights, and the
draws of an item do not depend on the batch it lands in.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities.exceptions import SIGTERMException
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from . import checkpoint, config, lora, lora_training, sample, sampling, speed, state_folder
from .errors import DreampipeError
from .images import save_atomic, save_figure, stack
from .losses import min_snr_weight, noise_loss

log = logging.getLogger("dreampipe.train")
STATE_FILE = "last.ckpt"
# Reading a loss waits for the GPU: the loss CSV and TensorBoard read them every this many steps.
LOG_EVERY_N_STEPS = 25
# Settings that do not change the trained weights: changing one resumes the saved state instead of
# starting over. The devices too: the fingerprint holds the world size, which is what counts.
NOT_SHAPING_WEIGHTS = (*config.NON_SHAPING_SETTINGS, "devices")


def rng(*key) -> torch.Generator:
    """A generator seeded by a hash of `key`: independent streams with no seed arithmetic to collide."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def caption_dropped(seed: int, position: int, probability: float) -> bool:
    """train.caption_dropout: whether the instance item at `position` trains on the empty caption."""
    return bool(torch.rand((), generator=rng(seed, "caption_dropout", position)) < probability)


def cycle_index(seed: int, stream, position: int, count: int) -> int:
    """Item `position` of an endless sequence of shuffled passes over `count` items."""
    perm = torch.randperm(count, generator=rng(seed, "pass", stream, position // count))
    return int(perm[position % count])


class StepIndices(IterableDataset):
    """Micro-batch k of this rank: the global positions of its items, and for each the instance
    and class image. The global batch of micro-batch k is positions k*B .. k*B+B-1 with
    B = batch_size x world_size; rank r takes its batch_size of them. Position p belongs to
    subject p mod S (round robin); each subject's instance and class images cycle independently
    in shuffled passes, so any counts work and max_steps alone ends training."""

    def __init__(self, settings: dict, instance_counts: list[int], class_counts: list[int],
                 start: int, total: int, rank: int = 0, world_size: int = 1):
        self.s, self.start, self.total, self.rank, self.world = settings, start, total, rank, world_size
        self.n_inst, self.n_cls = instance_counts, class_counts
        self.inst_offset = [sum(instance_counts[:i]) for i in range(len(instance_counts))]
        self.cls_offset = [sum(class_counts[:i]) for i in range(len(class_counts))]

    def item(self, p: int) -> tuple[int, int | None]:
        seed, subjects = self.s["seed"], len(self.n_inst)
        s, q = p % subjects, p // subjects
        inst = self.inst_offset[s] + cycle_index(seed, ("instance", s), q, self.n_inst[s])
        cls = self.cls_offset[s] + cycle_index(seed, ("class", s), q, self.n_cls[s]) if self.n_cls[s] else None
        return inst, cls

    def __iter__(self):
        bs = self.s["batch_size"]
        for k in range(self.start, self.total):
            positions = [(k * self.world + self.rank) * bs + j for j in range(bs)]
            items = [self.item(p) for p in positions]
            # plain ints: DDP would move tensors to the GPU, and the step uses these on the CPU
            yield {"step": k, "position": positions, "instance": [i for i, _ in items],
                   "class": [c for _, c in items if c is not None]}


class DreamBoothData(pl.LightningDataModule):
    """The prepared images of every subject (instance folder + optional class manifest each),
    flattened into one table each for instance and class images, with a caption per image."""

    def __init__(self, subjects: list[tuple[Path, Path | None]], settings: dict):
        super().__init__()
        self.settings = settings
        classes, self.instance_counts, self.class_counts, self.class_captions = [], [], [], []
        entries, held_entries = [], []  # (instance folder, manifest entry) of the photos trained on, held out
        for instance_dir, class_manifest in subjects:
            manifest, kept = hold_out(Path(instance_dir) / "manifest.json", settings.get("validation_photos", 0))
            entries += [(Path(instance_dir), m) for m in manifest]
            held_entries += [(Path(instance_dir), m) for m in kept]
            self.instance_counts.append(len(manifest))
            files = json.loads(Path(class_manifest).read_text()) if class_manifest else {"images": []}
            classes += files["images"]
            self.class_captions += [files.get("prompt", "")] * len(files["images"])
            self.class_counts.append(len(files["images"]))
        self.instance_captions = [m["caption"] for _, m in entries]
        self.validation_captions = [m["caption"] for _, m in held_entries]
        if any(self.class_counts) and not all(self.class_counts):
            raise DreampipeError("every subject needs class images, or none: give each subject a class manifest")
        prior = settings.get("prior_prediction")
        if prior and (any(self.class_counts) or len(prior) != len(subjects)):
            raise DreampipeError("prior_prediction takes one class prompt per subject and no class manifests "
                                 "(class_images.class_data prior_prediction needs no class images)")
        self.instance_images = sampling.from_pil(read_images([d / m["file"] for d, m in entries]))
        self.class_images = sampling.from_pil(read_images(classes)) if classes else torch.empty(0)
        self.instance_masks = self.validation_masks = None
        if settings["masked_loss"]:  # of the held-out photos too: the validation loss weighs as training does
            masks = read_masks(entries + held_entries, self.instance_images.shape[-2:])
            self.instance_masks, self.validation_masks = masks[:len(entries)], masks[len(entries):]
        self.validation_images = (sampling.from_pil(read_images([d / m["file"] for d, m in held_entries]))
                                  if held_entries else torch.empty(0))

    def train_dataloader(self):
        accum, trainer = self.settings["gradient_accumulation_steps"], self.trainer
        start = trainer.global_step * accum  # restored already when resuming
        data = StepIndices(self.settings, self.instance_counts, self.class_counts, start,
                           self.settings["max_steps"] * accum, trainer.global_rank, trainer.world_size)
        return DataLoader(data, batch_size=None, num_workers=0)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # indices stay on the CPU, where they are used; the module uploads what the GPU needs


def read_masks(entries: list[tuple[Path, dict]], size) -> torch.Tensor:
    """train.masked_loss: the subject mask of every instance image (the "mask" of its manifest
    entry, written by prepare; entries: (instance folder, entry)), N x 1 x H x W in 0..1; an image
    without one is all subject (1)."""
    masks, missing = [], []
    for instance_dir, m in entries:
        if "mask" in m:
            with Image.open(instance_dir / m["mask"]) as im:
                masks.append(torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32) / 255))
        else:
            masks.append(torch.ones(tuple(size)))
            missing.append(m["source"])
    if len(missing) == len(masks):
        folders = ", ".join(sorted({str(Path(m).parent) for m in missing}))  # the photo folders
        raise DreampipeError(
            f"train.masked_loss is true but no photo in {folders} has a subject mask: put name.mask.png "
            "(white = subject, black = background) beside name.jpg, or use photos with a transparent background "
            "(then prepare again), or set train.masked_loss: false")
    if missing:
        log.warning("%d instance image(s) have no subject mask and are learned whole: %s", len(missing),
                    ", ".join(Path(m).name for m in missing))
    return torch.stack(masks)[:, None]


def hold_out(manifest_file: Path, count: int) -> tuple[list[dict], list[dict]]:
    """(the photos to train on, the last `count` of the manifest, held out for the validation loss)."""
    manifest = json.loads(Path(manifest_file).read_text())
    if count and count >= len(manifest):
        raise DreampipeError(
            f"{manifest_file}: train.validation_photos is {count} but this subject has {len(manifest)} photos, "
            f"which leaves none to train on; set train.validation_photos below {len(manifest)} (0 measures the "
            "validation loss on the training photos)")
    return (manifest[:-count], manifest[-count:]) if count else (manifest, [])


def read_images(files: list) -> list[Image.Image]:
    """Decoded in threads (PIL releases the GIL while decoding): hundreds of class images."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda f: Image.open(f).convert("RGB"), files))


class DreamBooth(pl.LightningModule):
    """Noise-prediction MSE on instance images + prior_loss_weight x the same on class images."""

    def __init__(self, model: checkpoint.StableDiffusion, settings: dict):
        super().__init__()
        from diffusers import DDPMScheduler

        self.sd, self.s = model, settings
        self.unet, self.vae, self.text_encoder = model.unet, model.vae, model.text_encoder
        self.noise_scheduler = DDPMScheduler.from_config(model.architecture["scheduler"])
        # for Min-SNR weights on the training device (not in the state: persistent=False)
        self.register_buffer("alphas_cumprod", self.noise_scheduler.alphas_cumprod.clone(), persistent=False)
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(settings["train_text_encoder"])
        # method lora: adapters on the frozen networks, the only weights that train
        self.lora = lora_training.Adapters(model, settings) if settings["method"] == "lora" else None
        if settings["gradient_checkpointing"]:
            speed.checkpointing(self.unet)
        # an fp32 copy: made before the weights are cast to bf16 for training on a GPU
        self.ema = ema_model(self.ema_parameters(), settings["ema_decay"]) if settings["ema"] else None
        self.strict_loading = False  # saved state holds only the trained networks: on_load_checkpoint checks the keys

    # -- caches: the VAE is frozen, so latents are encoded once; so are captions while the text
    #    encoder is frozen. Encoded in setup, before the UNet is on the device and the optimizer's
    #    moments exist, so the encoders never add to the training peak (low_memory at SD size:
    #    6.1 GiB when they did). Not in configure_model, where tensors are made on the device.
    def setup(self, stage: str):
        self.cache(self.trainer.strategy.root_device)

    def cache(self, device: torch.device):
        dm = self.trainer.datamodule
        self.vae.eval()
        self._frozen_to(device)
        prior_prompts = self.s.get("prior_prediction") or []
        empty = [""] if self.s["caption_dropout"] else []  # the caption of dropped ones
        self.captions = list(dict.fromkeys(dm.instance_captions + dm.class_captions + dm.validation_captions
                                           + prior_prompts + empty))
        index = {c: i for i, c in enumerate(self.captions)}
        self.instance_caption = torch.tensor([index[c] for c in dm.instance_captions])
        self.class_caption = torch.tensor([index[c] for c in dm.class_captions], dtype=torch.long)
        self.caption_embeddings = None
        if not self.text_encoder_trained():
            self.cache_captions()
        if prior_prompts:
            self.cache_prior_prompts(prior_prompts, index, dm.instance_counts, device)
        self.instance_latents = self._encode_images(dm.instance_images)
        self.instance_masks = self._latent_masks(dm.instance_masks)
        self.class_latents = self._encode_images(dm.class_images) if len(dm.class_images) else None
        log.info("latents of %d images cached", len(dm.instance_images) + len(dm.class_images))
        held = len(dm.validation_images) > 0
        self.validation = validation_batch(
            self, self._encode_images(dm.validation_images) if held else self.instance_latents,
            [index[c] for c in (dm.validation_captions or dm.instance_captions)],
            self._latent_masks(dm.validation_masks) if held else self.instance_masks)

    def on_fit_start(self):
        if self.ema:
            self.ema.to(self.device)
        if self.s["low_memory"]:
            self.park_frozen()  # here, not after caching: the strategy moves the whole module in between

    def frozen(self) -> list[torch.nn.Module]:
        return [self.vae] + ([] if self.s["train_text_encoder"] else [self.text_encoder])

    def park_frozen(self):
        """low_memory: the frozen VAE and text encoder (0.4 GiB at SD size) wait on the CPU once
        latents and captions are cached; moving them back and forth keeps them bit for bit."""
        self._frozen_to("cpu")

    def _frozen_to(self, device):
        for net in self.frozen():
            net.to(device)

    @contextlib.contextmanager
    def frozen_on_device(self):
        """The frozen networks on the training device for a sample grid, parked again after."""
        if not self.s["low_memory"]:
            yield
            return
        self._frozen_to(self.device)
        try:
            yield
        finally:
            self.park_frozen()

    @contextlib.contextmanager
    def drawing(self):
        """For sample pictures: the UNet in eval mode and eager, the frozen networks on the device."""
        self.unet.eval()
        try:
            with speed.eager(), self.frozen_on_device():
                yield
        finally:
            self.unet.train()

    def cache_captions(self):
        """Embed every caption once: the text encoder is frozen, from the start or since text_encoder_steps."""
        self.text_encoder.requires_grad_(False)
        with torch.no_grad():
            self.caption_embeddings = self._embed(self.captions)

    def cache_prior_prompts(self, prompts: list[str], index: dict, instance_counts: list[int], device):
        """prior_prediction: each instance image's subject and the caption index of its class prompt;
        the base model's context of each class prompt, from the text encoder before any step."""
        self.instance_subject = torch.repeat_interleave(torch.arange(len(instance_counts)), torch.tensor(instance_counts))
        self.prior_caption = torch.tensor([index[p] for p in prompts])
        with torch.no_grad():  # on the training device: a trained text encoder may still be on the CPU here
            self.prior_context = (self.caption_embeddings[self.prior_caption.to(self.caption_embeddings.device)]
                                  if self.caption_embeddings is not None else self._embed(prompts)).to(device)

    @torch.no_grad()
    def base_prediction(self, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The base model's noise prediction, prior_prediction's target: a full finetune runs the
        frozen copy of the base UNet made in configure_model; a LoRA, its own UNet with the adapters off."""
        unet = self.unet if self.lora else self.base_unet[0]
        around = (lambda: self.lora.off(unet)) if self.lora else contextlib.nullcontext
        if self.base_call is None:  # on a GPU replayed as a CUDA graph where the step is (compile: graphs)
            graphed = speed.on_gpu(self.device) and speed.compile_scope(self.s) == "graphs"
            self.base_call = speed.GraphedForward(unet, around, capture=graphed)
        dtype = next(unet.parameters()).dtype
        return self.base_call(noisy.to(dtype), timesteps, context.to(dtype))

    @torch.no_grad()
    def validation_loss(self) -> torch.Tensor:
        """The loss of the fixed validation batch (validation_batch) on the weights being trained:
        the UNet in eval mode and eager, no gradients, no random draw; on the device, unsynced."""
        v = self.validation
        noisy = self.noise_scheduler.add_noise(v["latents"], v["noise"], v["timesteps"])
        context = (self.caption_embeddings[v["captions"]] if self.caption_embeddings is not None
                   else self._embed([self.captions[i] for i in v["captions"].tolist()]))
        dtype = next(self.unet.parameters()).dtype
        self.unet.eval()
        try:
            with speed.eager(), self.trainer.precision_plugin.forward_context():
                pred = self.unet(noisy.to(dtype), v["timesteps"], encoder_hidden_states=context.to(dtype)).sample
        finally:
            self.unet.train()
        return self.noise_loss(pred, v["noise"], v["timesteps"], v["weights"]).mean()

    def text_encoder_trained(self) -> bool:
        stop = self.s["text_encoder_steps"]
        return self.s["train_text_encoder"] and (stop is None or self.global_step < stop)

    @torch.no_grad()
    def _encode_images(self, pixels: torch.Tensor) -> dict:
        """The frozen VAE keeps its loaded dtype (so it is written out exactly as loaded); on a
        GPU it encodes under bf16 autocast. The mirror images only for random_flip ("_flip": the
        same latents without it)."""
        out = {"mean": [], "std": [], "mean_flip": [], "std_flip": []}
        device = self.vae.device
        fast = torch.autocast(device.type, torch.bfloat16, enabled=speed.bf16_weights(self.s, device))
        flips = self.s["random_flip"]
        for chunk in pixels.split(1 if self.s["low_memory"] else 8):  # 8 at 512 px: 1.4 GiB more at the peak
            with fast:  # with flips each image and its mirror image in one batch
                batch = torch.cat([chunk, chunk.flip(-1)]) if flips else chunk
                dist = self.vae.encode(batch.to(device, self.vae.dtype)).latent_dist
            for key, value in (("mean", dist.mean), ("std", dist.std)):
                out[key].append(value[:len(chunk)].float())
                out[key + "_flip"].append(value[len(chunk):].float())
        out = {k: torch.cat(v) for k, v in out.items() if v}
        return out if flips else {**out, "mean_flip": out["mean"], "std_flip": out["std"]}

    def _latent_masks(self, masks: torch.Tensor | None) -> dict | None:
        """train.masked_loss: each instance image's subject mask at latent size (the area average
        of its pixels) as loss weights, mask_min + (1 - mask_min) x mask, beside the latents,
        with its mirror image ("_flip") for random_flip; None without masks."""
        if masks is None:
            return None
        latents = self.instance_latents["mean"]
        w = F.interpolate(masks, size=latents.shape[-2:], mode="area").to(latents.device)
        w = self.s["mask_min"] + (1 - self.s["mask_min"]) * w
        return {"mask": w, "mask_flip": w.flip(-1)}

    def _embed(self, captions: list[str]) -> torch.Tensor:
        ids = self.sd.tokenizer(captions, padding="max_length", truncation=True,
                                max_length=self.sd.tokenizer.model_max_length, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    def _items(self, cache: dict, index: list[int], positions: list[int], kind: str, masks: dict | None = None):
        """Latents, noise and timesteps of the items, each drawn from its own (seed, position) stream;
        given `masks` (_latent_masks), also their pixel weights, flipped with their latents."""
        shape = cache["mean"].shape[1:]
        flips, eps, noise, timesteps = [], [], [], []
        for p in positions:
            g = rng(self.s["seed"], "item", kind, p)
            flips.append(bool(torch.rand((), generator=g) < 0.5) if self.s["random_flip"] else False)
            eps.append(torch.randn(shape, generator=g))
            n = torch.randn(shape, generator=g)
            if self.s["offset_noise"]:
                n = n + self.s["offset_noise"] * torch.randn(shape[0], 1, 1, generator=g)
            noise.append(n)
            timesteps.append(torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (), generator=g))
        index, flip, eps, noise, timesteps = upload(
            self.device, torch.tensor(index), torch.tensor(flips)[:, None, None, None], torch.stack(eps), torch.stack(noise),
            torch.stack(timesteps))
        mean = torch.where(flip, cache["mean_flip"][index], cache["mean"][index])
        std = torch.where(flip, cache["std_flip"][index], cache["std"][index])
        latents = (mean + std * eps) * self.vae.config.scaling_factor
        if masks is None:
            return latents, noise, timesteps
        return latents, noise, timesteps, torch.where(flip, masks["mask_flip"][index], masks["mask"][index])

    def noise_loss(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
        """Per-item loss (losses.noise_loss): the squared error, weighted per latent pixel by
        `weights` (subject masks) and per item by Min-SNR-gamma when train.snr_gamma is set."""
        gamma = self.s["snr_gamma"]
        snr = None if gamma is None else min_snr_weight(self.alphas_cumprod, timesteps, gamma,
                                                        self.noise_scheduler.config.prediction_type)
        return noise_loss(pred, target, weights, snr)

    def drop_captions(self, caption_ids: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """train.caption_dropout: the items' captions, the empty one where the item's own draw drops it."""
        if not self.s["caption_dropout"]:
            return caption_ids
        dropped = torch.tensor([caption_dropped(self.s["seed"], p, self.s["caption_dropout"]) for p in positions])
        return torch.where(dropped, self.captions.index(""), caption_ids)

    def training_step(self, batch, batch_idx):
        if self.caption_embeddings is None and not self.text_encoder_trained():
            self.cache_captions()
        positions = batch["position"]
        n_inst, n_cls = len(batch["instance"]), len(batch["class"])
        instance = self._items(self.instance_latents, batch["instance"], positions, "instance", self.instance_masks)
        parts, pixel_weights = [instance[:3]], instance[3] if len(instance) > 3 else None
        caption_ids = [self.drop_captions(self.instance_caption[batch["instance"]], positions)]
        if n_cls:
            parts.append(self._items(self.class_latents, batch["class"], positions, "class"))
            caption_ids.append(self.class_caption[batch["class"]])
        prior_subjects = self.instance_subject[batch["instance"]] if self.s.get("prior_prediction") else None
        if prior_subjects is not None:  # the instance items again, each with its subject's class prompt
            parts.append(parts[0])
            caption_ids.append(self.prior_caption[prior_subjects])
        latents, noise, timesteps = (torch.cat(t) for t in zip(*parts))
        caption_ids = torch.cat(caption_ids)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.caption_embeddings is None:
            context = self._embed([self.captions[i] for i in caption_ids.tolist()])
        else:
            context = self.caption_embeddings[upload(self.device, caption_ids)[0]]
        pred = self.unet_call(noisy, timesteps, context)
        loss = instance_loss = self.noise_loss(pred[:n_inst], noise[:n_inst], timesteps[:n_inst], pixel_weights).mean()
        prior_loss = torch.full_like(loss, float("nan"))
        self.log("instance_loss", instance_loss)
        if prior_subjects is not None:
            n_cls, context = n_inst, self.prior_context[upload(self.device, prior_subjects)[0]]
            target = self.base_prediction(noisy[:n_inst], timesteps[:n_inst], context)
            noise = torch.cat([noise[:n_inst], target.to(noise.dtype)])
        if n_cls:
            prior_loss = self.noise_loss(pred[n_inst:], noise[n_inst:], timesteps[n_inst:]).mean()  # never masked
            loss = loss + self.s["prior_loss_weight"] * prior_loss
            self.log("prior_loss", prior_loss)
        self.log("loss", loss, prog_bar=True)
        self.losses = torch.stack([loss, instance_loss, prior_loss]).detach()  # read by Progress, no sync here
        return loss

    def configure_model(self):
        # before the strategy's setup, where DDP hooks each weight's gradient as the weight is then:
        # a weight cast afterwards (bf16) gets gradients that DDP silently never averages
        device = self.trainer.strategy.root_device
        self.base_call = None  # base_prediction's
        if self.s.get("prior_prediction") and not self.lora:  # the base weights, before any step and any compiling
            self.base_unet = (frozen_copy(self.unet, device),)  # a tuple: not a submodule, not in the saved state
        self.unet_call = speed.prepare_training(self.sd, self.s, device)

    def configure_optimizers(self):
        from diffusers.optimization import get_scheduler

        factor = lr_factor(self.s, self.trainer.world_size, len(self.trainer.datamodule.instance_captions))
        unet_lr, text_lr = lora_training.rates(self.s)
        groups = [{"params": [p for p in self.unet.parameters() if p.requires_grad], "lr": unet_lr * factor}]
        if self.s["train_text_encoder"]:
            groups.append({"params": self.trained_parameters(self.text_encoder), "lr": text_lr * factor})
        if factor != 1:
            log.info("learning rate scaled x%g (%s) to %s", factor, self.s["scale_lr"], [g["lr"] for g in groups])
        optimizer = make_optimizer(groups, self.s, self.device, world_size=self.trainer.world_size)
        scheduler = get_scheduler(self.s["lr_scheduler"], optimizer, num_warmup_steps=self.s["lr_warmup_steps"],
                                  num_training_steps=self.s["max_steps"])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # AdamWBF16 sums the gradients of an accumulation window in fp32 (bf16 would drop small parts)
    def on_before_backward(self, loss):
        if isinstance(self.trainer.optimizers[0], speed.AdamWBF16):
            self.trainer.optimizers[0].before_backward()

    def on_after_backward(self):
        if isinstance(self.trainer.optimizers[0], speed.AdamWBF16):
            self.trainer.optimizers[0].after_backward()

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        if self.ema:
            self.ema.step(self.ema_parameters())

    def trained_parameters(self, net: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The weights of a trained network that train: all of them, or with method lora its adapters
        (whether or not they still train: text_encoder_steps stops them midway)."""
        return list(lora_training.Adapters.parameters(net).values() if self.lora else net.parameters())

    def ema_parameters(self) -> list[torch.nn.Parameter]:
        return self.trained_parameters(self.unet)

    def trained_prefixes(self) -> tuple[str, ...]:
        return ("unet.", "text_encoder.") if self.s["train_text_encoder"] else ("unet.",)

    def is_trained(self, key: str) -> bool:
        """Whether a state-dict key is a trained weight, which the saved state holds."""
        return key.startswith(self.trained_prefixes()) and (not self.lora or lora_training.is_adapter(key))

    def on_save_checkpoint(self, ckpt):
        ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if self.is_trained(k)}
        if self.ema:
            ckpt["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, ckpt):
        expected = {k for k in self.state_dict() if self.is_trained(k)}
        missing, unexpected = sorted(expected - ckpt["state_dict"].keys()), sorted(ckpt["state_dict"].keys() - expected)
        if missing or unexpected:
            raise DreampipeError(
                f"{self.trainer.ckpt_path}: the saved training state does not match the model ({len(missing)} missing "
                f"keys, e.g. {missing[:1]}; {len(unexpected)} unexpected, e.g. {unexpected[:1]}): delete "
                f"{Path(self.trainer.ckpt_path).parent} to start over")
        if self.ema:
            self.ema.load_state_dict(ckpt["ema"])

    def trained_unet(self) -> dict | None:
        """UNet weights to write instead of the parameters: the EMA average, from its fp32 copy
        (method lora: of the adapters, by PEFT name)."""
        if not self.ema:
            return None
        names = lora_training.Adapters.parameters(self.unet) if self.lora else dict(self.unet.named_parameters())
        return dict(zip(names, self.ema.shadow_params))

    def lora_layers(self) -> dict:
        """method lora: the trained layers by kohya name (the UNet's from the EMA when EMA is on)."""
        return self.lora.layers({"unet": self.trained_unet() or {}})

    def save_model(self, path: Path, step: int) -> None:
        """The model as base + what was trained (WriteModel). Method lora: the base as loaded with
        the adapters merged in, and beside its weights the trained layers themselves in kohya's
        layout (lora_unet_*, lora_te_*: keys every reader of the model ignores), which the export
        job writes as the LoRA file."""
        meta = {"dreampipe.steps": step}
        if not self.lora:
            checkpoint.save(self.sd, path, dtype=None, metadata=meta, unet_weights=self.trained_unet())
            return
        layers = self.lora_layers()
        checkpoint.save(self.lora.merged(layers), path, dtype=None, metadata=meta, extra=lora.to_state_dict(layers))

    def with_ema_weights(self, action):
        """Run action() with the EMA weights in the UNet (if EMA is on), then put the raw ones back
        (for sample grids: the weights pass through the UNet's dtype)."""
        if not self.ema:
            return action()
        self.ema.store(self.ema_parameters())
        self.ema.copy_to(self.ema_parameters())
        try:
            return action()
        finally:
            self.ema.restore(self.ema_parameters())

    def state_bytes(self) -> int:
        """About how large a saved state is: trained weights, two Adam moments each, EMA."""
        trained = [p for p in self.parameters() if p.requires_grad]
        size = sum(p.numel() * p.element_size() for p in trained) * 3
        return size + (sum(p.numel() * 4 for p in self.ema_parameters()) if self.ema else 0)


def frozen_copy(unet: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A frozen copy of the UNet on `device` (in bf16 and channels-last on a GPU), for inference
    only, made a tensor at a time: never a second copy in the loaded dtype (fp32: 3.4 GB at SD size)."""
    dtype = torch.bfloat16 if speed.on_gpu(device) else None
    with torch.device("meta"):
        base = type(unet).from_config(unet.config)
    base.load_state_dict({k: v.detach().to(device, dtype, copy=True) for k, v in unet.state_dict().items()},
                         assign=True)
    base.requires_grad_(False).eval()
    return base.to(memory_format=torch.channels_last) if dtype else base


# The validation batch: as many (photo latent, noise, timestep) triples, timesteps spread evenly.
VALIDATION_ITEMS = 8


def validation_batch(module: DreamBooth, latents: dict, captions: list[int], masks: dict | None = None) -> dict:
    """Item i of the validation batch: photo i mod n of `latents` with its caption (and its subject
    mask's weights, given `masks`), a latent sample and noise from the stream rng(seed,
    "validation", i), no flip, and timestep (i + 1/2) T / 8 of the T of the schedule: the same
    draws at every measure, and no draw from training's streams."""
    steps, shape = module.noise_scheduler.config.num_train_timesteps, latents["mean"].shape[1:]
    eps, noise = [], []
    for i in range(VALIDATION_ITEMS):
        g = rng(module.s["seed"], "validation", i)
        eps.append(torch.randn(shape, generator=g))
        noise.append(torch.randn(shape, generator=g))
    device = latents["mean"].device
    photo = torch.arange(VALIDATION_ITEMS, device=device) % len(captions)
    sample = latents["mean"][photo] + latents["std"][photo] * torch.stack(eps).to(device)
    return {"latents": sample * module.vae.config.scaling_factor, "noise": torch.stack(noise).to(device),
            "timesteps": torch.tensor([int((i + 0.5) * steps / VALIDATION_ITEMS) for i in range(VALIDATION_ITEMS)],
                                      device=device),
            "captions": torch.tensor(captions, device=device)[photo],
            "weights": None if masks is None else masks["mask"][photo]}


def ema_model(parameters, decay: float):
    """An EMA of the weights that is the plain mean of the steps' weights until 1/(1 - decay) steps,
    then the exponential average with this decay. (diffusers' default ramp, (1 + s) / (10 + s),
    holds the decay below 0.99 for 890 steps, so that every decay above behaved alike in a
    DreamBooth run.)"""
    from diffusers.training_utils import EMAModel

    # warm-up 1 - (1 + s / inv_gamma)^-power = s / (1 + s) at update s + 1: the running mean
    return EMAModel(parameters, decay=decay, use_ema_warmup=True, inv_gamma=1.0, power=1.0, foreach=True)


def lr_factor(settings: dict, world_size: int, instance_images: int) -> float:
    """scale_lr: batch = x batch_size x accumulation x devices (the CompVis rule); batch_and_images
    also x the number of instance images."""
    if settings["scale_lr"] == "none":
        return 1
    batch = settings["batch_size"] * settings["gradient_accumulation_steps"] * world_size
    return batch * (instance_images if settings["scale_lr"] == "batch_and_images" else 1)


def make_optimizer(groups: list[dict], settings: dict, device: torch.device, *,
                   world_size: int = 1) -> torch.optim.Optimizer:
    if settings["optimizer"] == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise DreampipeError("train.optimizer is adamw8bit but bitsandbytes is not installed: "
                                 "pip install bitsandbytes (on a CUDA machine), or set train.optimizer: adamw") from None
        return bitsandbytes.optim.AdamW8bit(groups, weight_decay=settings["adam_weight_decay"])
    return speed.optimizer(groups, settings, device, world_size=world_size)


def upload(device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """CPU tensors to the device, on CUDA from pinned memory without waiting for the GPU."""
    if device.type != "cuda":
        return [t.to(device) for t in tensors]
    return [t.pin_memory().to(device, non_blocking=True) for t in tensors]


def at_step_end(trainer, batch_idx: int) -> bool:
    """This micro-batch completed an optimizer step."""
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0


class SaveState(pl.Callback):
    """Lightning state (weights, optimizer, EMA, scheduler, step) every n steps or minutes and at
    SIGTERM/SIGINT, written atomically into the state dir, which Snakemake never deletes.

    A save must not stall training: the state is snapshotted (on the GPU when it has room, a copy
    at memory speed) and written to disk by a background thread while training goes on. Only a
    save at a signal waits for the write."""

    def __init__(self, state_dir: Path, every_n_steps: int, every_n_minutes: float):
        self.path, self.every, self.minutes = Path(state_dir) / STATE_FILE, every_n_steps, every_n_minutes
        self.interrupted, self.saved_step = None, None
        self.previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        self.writer, self.error, self.last_save = None, None, time.monotonic()

    def on_train_start(self, trainer, module):
        # installed after Lightning's own SIGTERM handler, which would exit at once, mid-accumulation
        for sig in self.previous:
            signal.signal(sig, self._on_signal)
        self.last_save = time.monotonic()

    def _on_signal(self, signum, frame):
        self.interrupted = signal.Signals(signum).name

    def restore_signals(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def save(self, trainer, background: bool = True):
        self.wait()
        if trainer.is_global_zero:
            checkpoint.check_disk_space(self.path, trainer.lightning_module.state_bytes())
        state = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        if trainer.is_global_zero:
            self.writer = threading.Thread(target=self._write, args=(snapshot(state), trainer.global_step),
                                           name="save-state", daemon=True)
            self.writer.start()
            if not background:
                self.wait()
        trainer.strategy.barrier("save-state")
        self.saved_step, self.last_save = trainer.global_step, time.monotonic()

    def _write(self, state: dict, step: int):
        try:
            state = to_cpu(state)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            log.info("state of step %d saved", step)
        except Exception as e:  # raised in the training thread by wait()
            self.error = e

    def wait(self):
        """Until the state being written is on disk."""
        if self.writer:
            self.writer.join()
            self.writer = None
        if self.error:
            error, self.error = self.error, None
            raise DreampipeError(f"{self.path}: could not save the training state ({error})") from error

    def due(self, trainer) -> bool:
        step = trainer.global_step
        if step >= trainer.max_steps:
            return False  # the model is written next
        by_steps = bool(self.every) and step % self.every == 0
        by_time = bool(self.minutes) and time.monotonic() - self.last_save >= self.minutes * 60
        # every rank must save at the same step: rank 0's clock decides
        return by_steps or trainer.strategy.broadcast(by_time)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if not at_step_end(trainer, batch_idx):
            return
        # every rank must stop at the same step, whichever got the signal
        stop = trainer.strategy.reduce_boolean_decision(bool(self.interrupted), all=False)
        if stop:
            self.interrupted = self.interrupted or "a signal to another rank"
            if trainer.global_step < trainer.max_steps:
                self.save(trainer, background=False)
            trainer.should_stop = True
        elif self.due(trainer):
            self.save(trainer)

    def on_train_end(self, trainer, module):
        self.wait()


def snapshot(state):
    """A copy of the state's tensors that training cannot change: on the GPU when it has room for
    it (a device copy is a few milliseconds), else on the CPU."""
    from lightning_utilities.core.apply_func import apply_to_collection

    tensors = []
    apply_to_collection(state, torch.Tensor, tensors.append)
    on_gpu = [t for t in tensors if t.is_cuda]
    room = on_gpu and torch.cuda.mem_get_info(on_gpu[0].device)[0] > 2 * sum(t.nbytes for t in on_gpu)
    return apply_to_collection(state, torch.Tensor, lambda t: t.clone() if t.is_cuda and room else t.to("cpu", copy=True))


def to_cpu(state):
    """The snapshot on the CPU, copied on a side stream so that training's stream never waits."""
    from lightning_utilities.core.apply_func import apply_to_collection

    if not torch.cuda.is_available():
        return state
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the snapshot's copies are done
    with torch.cuda.stream(stream):
        return apply_to_collection(state, torch.Tensor, lambda t: t.to("cpu"))


# loss.csv: val_loss is empty where it was not measured (and absent from rows of older runs)
LOSS_COLUMNS = "step,loss,instance_loss,prior_loss,val_loss"


class Validation(pl.Callback):
    """The loss of the fixed validation batch every n optimizer steps and at the last, on the first
    rank, for Progress to write (val_loss): computed on the device, read at Progress's flush."""

    def __init__(self, every_n_steps: int | None):
        self.every, self.losses = every_n_steps or 0, {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if (trainer.is_global_zero and self.every and at_step_end(trainer, batch_idx)
                and (step % self.every == 0 or step == trainer.max_steps)):
            self.losses[step] = module.validation_loss()

    def take(self) -> dict[int, float]:
        """The losses measured since the last call, by step."""
        taken = {step: float(loss) for step, loss in self.losses.items()}
        self.losses = {}
        for step, loss in taken.items():
            log.info("step %d validation loss %.4f", step, loss)
        return taken


class Progress(pl.Callback):
    """A bar over optimizer steps (so rate and ETA are right after a resume) and a loss CSV.
    Reading a loss waits for the GPU, so the rows are collected on the device and written every
    `every` steps and before each state save (a resume then finds every row up to its step)."""

    def __init__(self, workdir: Path, every: int = LOG_EVERY_N_STEPS, validation: Validation | None = None):
        self.csv, self.every, self.pending, self.validation = Path(workdir) / "loss.csv", every, [], validation

    def on_train_start(self, trainer, module):
        from tqdm import tqdm

        if not trainer.is_global_zero:
            return
        self.bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, unit="step", desc="train")
        rows = self.csv.read_text().splitlines()[1:] if self.csv.exists() and trainer.global_step else []
        kept = [r for r in rows if int(r.split(",")[0]) <= trainer.global_step]
        self.csv.write_text("\n".join([LOSS_COLUMNS, *kept]) + "\n")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if not (trainer.is_global_zero and at_step_end(trainer, batch_idx)):
            return
        step = trainer.global_step
        self.pending.append((step, module.losses))
        self.bar.update(step - self.bar.n)
        if step % self.every == 0 or step == trainer.max_steps:
            loss = self.flush()
            self.bar.set_postfix(loss=f"{loss:.4f}")
            if step % 50 == 0 or step == trainer.max_steps or step == self.every:
                log.info("step %d/%d loss %.4f (%s)", step, trainer.max_steps, loss, self.bar.format_dict.get("rate"))

    def flush(self) -> float:
        """Write the pending rows; the last step's loss."""
        if not self.pending:
            return float("nan")
        values = torch.stack([v for _, v in self.pending]).tolist()
        val = self.validation.take() if self.validation else {}
        with self.csv.open("a") as f:
            f.writelines(f"{step},{a:.6f},{b:.6f},{c:.6f},{format(val[step], '.6f') if step in val else ''}\n"
                         for (step, _), (a, b, c) in zip(self.pending, values))
        self.pending = []
        return values[-1][0]

    def on_save_checkpoint(self, trainer, module, ckpt):
        if trainer.is_global_zero:
            self.flush()

    def on_train_end(self, trainer, module):
        if trainer.is_global_zero:
            self.flush()
            self.bar.close()


class SampleGrid(pl.Callback):
    """The guide's image logging: a grid for fixed prompts and seeds every n steps."""

    def __init__(self, workdir: Path, settings: dict):
        self.dir, self.s = Path(workdir) / "samples", settings

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        every = self.s["sample_every_n_steps"]
        if trainer.is_global_zero and at_step_end(trainer, batch_idx) and every and trainer.global_step % every == 0:
            self.write(module, trainer.global_step)

    def write(self, module, step):
        req = sample.request(self.s["sample_prompts"], self.s["sample_seeds"], self.s["resolution"],
                             steps=self.s["sample_steps"], guidance_scale=self.s["sample_guidance_scale"],
                             sampler="ddim")
        with module.drawing():
            sheet = sample.sheet(module.sd, req, f"step {step}", log.debug,
                                 decode_batch=1 if self.s["low_memory"] else None)
        save_atomic(sheet, self.dir / f"step-{step:05d}.png")

    def over_steps(self, out: Path) -> None:
        """Every step's grid in one picture, earliest on top, for the report."""
        save_atomic(stack([Image.open(p) for p in sorted(self.dir.glob("step-*.png"))]), out)


class SaveCheckpoints(pl.Callback):
    """The guide's progressive checkpoints, but small: every n steps the model in the export format
    (fp16 inference weights, LDM layout; the EMA weights when EMA is on), keeping the last few."""

    def __init__(self, workdir: Path, every_n_steps: int, keep_last: int):
        self.dir, self.every, self.keep = Path(workdir) / "checkpoints", every_n_steps, keep_last

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not (trainer.is_global_zero and at_step_end(trainer, batch_idx) and self.every
                and step % self.every == 0 and step < trainer.max_steps):
            return
        from . import modelspec

        title = f"{self.dir.parent.parent.name}-step-{step:05d}"  # results/<name>/train/checkpoints
        if module.lora:  # the LoRA alone, as export writes it
            lora.save(module.lora_layers(), self.dir / f"step-{step:05d}.lora.safetensors", "fp16",
                      {"dreampipe.steps": step}, resolution=module.s["resolution"], title=title)
        else:
            meta = {**modelspec.metadata(title, resolution=module.s["resolution"]), "dreampipe.steps": step}
            checkpoint.save(module.sd, self.dir / f"step-{step:05d}.safetensors", dtype="fp16",
                            metadata=meta, unet_weights=module.trained_unet())
        if self.keep:
            for old in sorted(self.dir.glob("step-*.safetensors"))[:-self.keep]:
                old.unlink()


class SampleRows(pl.Callback):
    """The sample job's before/after rows (sample.py), drawn here while the networks are on the
    device, so that job loads no model: "before" from the base weights ahead of the first step,
    "after" (in WriteModel) from the weights written. Not in the low-memory profile, whose peak a
    batch of a dozen images would raise: there the sample job draws them."""

    def __init__(self, settings: dict, out: Path, base_model, base_options: dict):
        sheet = None if settings["low_memory"] else settings.get("sample_sheet")
        self.request = sheet and sample.request(**sheet, resolution=settings["resolution"])
        self.folder, self.base = sample.rows_dir(out), (base_model, base_options)

    def on_train_start(self, trainer, module):
        if self.request and trainer.is_global_zero and trainer.global_step == 0:  # a resumed run kept its row
            self.keep("before", self.draw(module, "before"), sample.base_source(*self.base))

    def draw(self, module, title: str):
        """The row, or None where none is asked or the GPU lacks the memory (the VAE decodes 4
        images at a time)."""
        if not self.request:
            return None
        try:
            with module.drawing():
                return sample.sheet(module.sd, self.request, title, log.info, decode_batch=4)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            log.warning("no GPU memory to draw the '%s' row of the final grid: the sample job draws it", title)

    def keep(self, title: str, row, source: dict) -> None:
        if row is None:
            return
        try:
            sample.keep(self.folder, title, row, self.request, source)
        except OSError as e:
            log.warning("the '%s' row of the final grid could not be kept (%s): the sample job draws it", title, e)


class WriteModel(pl.Callback):
    """After the last step, while the networks are still on the device (when fit returns, Lightning
    has moved them to the CPU): the final sample grid, and the model as base + what was trained:
    frozen networks as they were loaded, the UNet from its fp32 EMA copy when EMA is on."""

    def __init__(self, out: Path, sampler: SampleGrid, rows: SampleRows):
        self.out, self.sampler, self.rows, self.written = Path(out), sampler, rows, False

    def on_train_end(self, trainer, module):
        step = trainer.global_step
        if step < trainer.max_steps or not trainer.is_global_zero:
            return

        def draw():
            self.sampler.write(module, step)
            return self.rows.draw(module, "after")

        # the model is written by a thread, from a CUDA stream of its own, while the GPU draws
        side = torch.cuda.Stream(module.device) if module.device.type == "cuda" else None
        if side:
            side.wait_stream(torch.cuda.current_stream(module.device))
        with ThreadPoolExecutor(1) as pool:
            written = pool.submit(self.save, module, step, side)
            after = module.with_ema_weights(draw)
            written.result()
        log.info("model written to %s", self.out)
        self.rows.keep("after", after, sample.model_source(self.out))
        self.written = True

    def save(self, module, step: int, stream) -> None:
        """Each network in the dtype it holds: exact, and half the bytes of fp32 for a bf16 UNet
        (the UNet from its EMA copy when EMA is on, which drawing the grids does not touch)."""
        with torch.cuda.stream(stream) if stream else contextlib.nullcontext():
            module.save_model(self.out, step)


class StayOnDevice(pl.strategies.SingleDeviceStrategy):
    """One device, without the teardown's copy of the networks and the optimizer state to the CPU
    (seconds at SD size, for a process that ends: WriteModel has written everything by then)."""

    def teardown(self) -> None:
        self.precision_plugin.teardown()
        self.accelerator.teardown()
        self.checkpoint_io.teardown()


class FlatGradientDDP(pl.strategies.DDPStrategy):
    """DDP without torch's DistributedDataParallel wrapper, for bf16 weights: AdamWBF16 holds each
    group's gradients in one flat buffer and averages it over the ranks itself, in eight large
    buckets (speed.AdamWBF16._make_buckets), where DDP's reducer copies the 686 weights' gradients
    of the UNet into 25 MB buckets and back (on two H200s 1.39x the images a second of one GPU;
    one all-reduce of the whole buffer after the backward: 1.78x). As DDP does, the ranks start
    from rank 0's weights (one broadcast); they step alike, so their weights stay equal."""

    def configure_ddp(self) -> None:
        from pytorch_lightning.overrides.distributed import _sync_module_states

        _sync_module_states(self.model)


def strategy(settings: dict, world: int, one_gpu: bool):
    if world == 1:
        return StayOnDevice(torch.device("cuda", 0)) if one_gpu else "auto"
    if torch.cuda.is_available() and speed.bf16_weights(settings, "cuda"):
        return FlatGradientDDP()
    # after text_encoder_steps the text encoder gets no gradients, which DDP must be told
    te_stops = settings["train_text_encoder"] and settings["text_encoder_steps"] is not None
    return "ddp_find_unused_parameters_true" if te_stops else "ddp"


def fingerprint(settings: dict, inputs: list[Path], world_size: int, *, cache: Path) -> str:
    """What shaped this run's weights: the training settings and the content of every input, each
    hashed as a stream once and kept in `cache` by (path, size, mtime), so a resume does not read
    a multi-GB base model again."""
    shaping = {k: v for k, v in settings.items() if k not in NOT_SHAPING_WEIGHTS}
    h = hashlib.sha256(json.dumps({**shaping, "world_size": world_size}, sort_keys=True).encode())
    for path in inputs:
        h.update(config.model_id(str(path), cache).encode())
    return h.hexdigest()


def precision(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def world_size(devices) -> int:
    """Processes that train: `devices` GPUs (a count, a list of indexes into CUDA_VISIBLE_DEVICES,
    or auto = all of them), or processes on the CPU."""
    if devices == "auto":
        return max(1, torch.cuda.device_count())
    return len(devices) if isinstance(devices, list) else int(devices)


def tensorboard_logger(workdir: Path):
    """TensorBoard logs under train/tensorboard when tensorboard is installed (optional)."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        return False
    from pytorch_lightning.loggers import TensorBoardLogger

    return TensorBoardLogger(workdir, name="tensorboard", version="", default_hp_metric=False)


def run(model_path, tokenizer, subjects: list[tuple[Path, Path | None]], settings: dict,
        state_dir: Path, workdir: Path, out: Path, base_options: dict | None = None) -> Path:
    """Train on `subjects`, each (prepared instance folder, class manifest or None). `base_options`
    are how checkpoint.load reads the base model (use_ema, fallback)."""
    base_options = base_options or {}
    gc.collect()  # an earlier run in this process (tests, benchmarks) leaves its networks on the GPU until collected
    if lora_training.rates(settings)[1] == 0:  # a text encoder that cannot move is frozen, and exported as loaded
        settings = {**settings, "train_text_encoder": False}
    state_dir, workdir, out = Path(state_dir), Path(workdir), Path(out)
    for name in ("pytorch_lightning", "lightning_fabric"):  # they reset their levels on import
        logging.getLogger(name).setLevel(logging.ERROR)
    world = world_size(settings["devices"])
    inputs = [Path(p) for p in (model_path, base_options.get("fallback")) if p]
    inputs += [p for inst, cls in subjects for p in (Path(inst) / "manifest.json", cls) if p]
    # DDP starts the other ranks by running this command again: only the first prepares the folders
    first_rank = int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0
    if first_rank:
        state_folder.lock(state_dir)
    # the inputs' content hashes (seconds for a new base model) and the images are read while the model loads
    with ThreadPoolExecutor(2) as pool:
        data = pool.submit(DreamBoothData, subjects, settings)
        fp = pool.submit(fingerprint, {**settings, "use_ema": base_options.get("use_ema", False)}, inputs, world,
                         cache=state_dir.parent / ".cache" / "input-hashes.json")
        pl.seed_everything(settings["seed"], verbose=False)
        # on one GPU the model goes there at once, in the file's dtype, and is cast there
        one_gpu = world == 1 and torch.cuda.is_available() and not isinstance(settings["devices"], list)
        model = checkpoint.load(model_path, tokenizer=tokenizer, device="cuda" if one_gpu else None, **base_options)
        log.info("loaded %s", model_path)
        fp, data = fp.result(), data.result()
    if first_rank:
        state_folder.set_aside_if_unreadable(state_dir, STATE_FILE)
    resume = state_dir / STATE_FILE
    ckpt_path = resume if resume.exists() and (state_dir / "fingerprint").read_text() == fp else None
    if first_rank:
        if ckpt_path:
            log.info("resuming from %s", resume)
        else:
            if state_dir.exists():
                log.info("settings or inputs changed since the saved state: starting fresh")
                shutil.rmtree(state_dir)
            state_dir.mkdir(parents=True)
            (state_dir / "fingerprint").write_text(fp)
            for folder in (workdir / "samples", workdir / "checkpoints", workdir / "tensorboard", sample.rows_dir(out)):
                shutil.rmtree(folder, ignore_errors=True)
        workdir.mkdir(parents=True, exist_ok=True)

    module = DreamBooth(model, settings)
    saver = SaveState(state_dir, settings["save_state_every_n_steps"], settings["save_state_every_n_minutes"])
    sampler = SampleGrid(workdir, settings)
    rows = SampleRows(settings, out, model_path, base_options)
    writer = WriteModel(out, sampler, rows)
    logger = tensorboard_logger(workdir)
    # the state is saved last, so a kill after it finds this step's grid and checkpoint written
    validation = Validation(settings.get("validation_every_n_steps"))
    callbacks = [validation, Progress(workdir, validation=validation), sampler, rows,
                 SaveCheckpoints(workdir, settings["save_every_n_steps"], settings["keep_last"]), saver, writer]
    if logger:
        callbacks.append(pl.callbacks.LearningRateMonitor("step"))
    trainer = pl.Trainer(
        max_steps=settings["max_steps"], accelerator="auto", devices=settings["devices"],
        strategy=strategy(settings, world, one_gpu),
        precision=precision(settings["precision"]),
        accumulate_grad_batches=settings["gradient_accumulation_steps"],
        gradient_clip_val=settings["max_grad_norm"] or None,
        callbacks=callbacks, logger=logger, log_every_n_steps=LOG_EVERY_N_STEPS, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        use_distributed_sampler=False)
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:  # Lightning's handler: the signal came before training started
        saver.interrupted = "SIGTERM"
    except torch.cuda.OutOfMemoryError:
        raise DreampipeError(
            "CUDA out of memory while training. In the character file set train.low_memory: true, "
            "train.gradient_checkpointing: true, or a smaller train.batch_size") from None
    finally:
        saver.restore_signals()  # from here a kill is a kill: the state on disk stays until the model is written
        saver.wait()
    if not trainer.is_global_zero:
        return out
    if not writer.written:  # stopped by a signal before the last step
        saved = (f"state of step {saver.saved_step} saved in {state_dir}" if saver.saved_step is not None
                 else f"the state in {state_dir} (if any) is unchanged")
        raise DreampipeError(f"training stopped by {saver.interrupted} at step {trainer.global_step}; {saved}: "
                             "run the same command again to resume")
    sampler.over_steps(workdir / "samples.png")
    plot_loss(workdir / "loss.csv", workdir / "loss.png",
              ema_weights(module.ema.get_decay, trainer.global_step) if module.ema else None)
    if not settings["keep_state"]:
        shutil.rmtree(state_dir)
    return out


def ema_weights(decay, steps: int) -> list[float]:
    """The share of each step's weights in the EMA after `steps` updates, where update n keeps
    decay(n) of the average (so the shares add up to 1)."""
    shares, kept = [], 1.0
    for n in range(steps, 0, -1):
        d = decay(n)
        shares.append(kept * (1 - d))
        kept *= d
    return shares[::-1]


def plot_loss(csv: Path, png: Path, ema: list[float] | None = None) -> None:
    """The loss per step; with EMA on, beside it the share of each step in the written model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r.split(",") for r in csv.read_text().splitlines()[1:]]
    steps, loss = [int(r[0]) for r in rows], [float(r[1]) for r in rows]
    val = [(int(r[0]), float(r[4])) for r in rows if len(r) > 4 and r[4]]
    fig, axes = plt.subplots(1, 2 if ema else 1, figsize=(11 if ema else 6, 3.5), dpi=100, squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, loss, lw=0.6, alpha=0.4, label="loss")
    window = max(1, len(loss) // 20)
    smooth = [sum(loss[max(0, i - window + 1):i + 1]) / len(loss[max(0, i - window + 1):i + 1]) for i in range(len(loss))]
    ax.plot(steps, smooth, lw=1.5, label=f"mean of {window}")
    if val:
        ax.plot(*zip(*val), "o-", ms=3, lw=1.2, label=f"validation (last: {val[-1][1]:.4f})")
    ax.set(xlabel="step", ylabel="loss", title="training loss")
    ax.legend()
    if ema:
        age = sum((len(ema) - k) * w for k, w in enumerate(ema, 1))
        axes[0][1].plot(range(1, len(ema) + 1), ema)
        axes[0][1].set(xlabel="step", ylabel="share of the model", ylim=(0, None),
                       title=f"EMA: share of each step (mean age {age:.0f} steps)")
    fig.tight_layout()
    save_figure(fig, png)
