"""train.method lora: PEFT LoRA adapters on the layers kohya's sd-scripts adapt (lora.targets),
trained on frozen base weights, and what training writes from them.

The adapters are PEFT's (lora_A = kohya's down, lora_B = up, scaling lora_alpha / r = kohya's
alpha / rank), on the UNet and, with train_text_encoder, on the text encoder. Their initial
weights are drawn from the seed on the CPU (lora_A as torch initialises a Linear, lora_B zero),
so a run starts alike on any device and whatever else drew from torch's global generator.

The base networks are kept as loaded, on the CPU (a reference where the model is there already;
on a GPU a copy, taken before training casts the networks to bf16): the model training writes is
those weights with the adapters merged in (lora.merge), in the dtype they were loaded in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re

import torch

from . import checkpoint, lora

ADAPTER = "default"  # PEFT's adapter name
_LORA_KEY = re.compile(r"\.lora_[AB]\.")


def rates(settings: dict) -> tuple[float, float]:
    """(UNet's learning rate, text encoder's) of the method."""
    if settings["method"] == "lora":
        te = settings["lora_text_encoder_learning_rate"]
        return settings["lora_learning_rate"], settings["lora_learning_rate"] if te is None else te
    te = settings["text_encoder_learning_rate"]
    return settings["learning_rate"], settings["learning_rate"] if te is None else te


def is_adapter(name: str) -> bool:
    """Whether a parameter or state-dict name is an adapter weight."""
    return bool(_LORA_KEY.search(name))


class Adapters:
    """LoRA adapters injected into the trained networks of `model` (in place), with the base
    weights kept to merge into."""

    def __init__(self, model: checkpoint.StableDiffusion, settings: dict):
        from peft import LoraConfig, inject_adapter_in_model

        self.model, self.alpha = model, settings["lora_alpha"]
        self.parts = ["unet"] + (["text_encoder"] if settings["train_text_encoder"] else [])
        self.targets, self.base = {}, {}
        for part in self.parts:
            net = getattr(model, part)
            self.base[part] = {k: v.detach().to("cpu") for k, v in net.state_dict().items()}
            conv = part == "unet" and settings["lora_conv_rank"] is not None
            self.targets[part] = lora.targets(net, part, conv=conv)
            wide = [name for name, is_wide in self.targets[part].items() if is_wide]
            # the exact module names (a pattern PEFT matches whole), so nothing else is adapted
            config = LoraConfig(r=settings["lora_rank"], lora_alpha=self.alpha, lora_dropout=0.0,
                                target_modules="|".join(map(re.escape, self.targets[part])),
                                rank_pattern={f"^{re.escape(n)}": settings["lora_conv_rank"] for n in wide})
            net.requires_grad_(False)
            inject_adapter_in_model(config, net, adapter_name=ADAPTER)
            init(net, settings["seed"], part)

    @staticmethod
    def parameters(net: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """The adapter weights of `net` by PEFT's state-dict name (<module>.lora_A.weight)."""
        return {n.replace(f".{ADAPTER}.", "."): p for n, p in net.named_parameters() if is_adapter(n)}

    def layers(self, replace: dict | None = None) -> dict:
        """The trained layers by kohya name, (down, up, alpha), detached on the CPU; `replace`:
        {part: {PEFT name: weight}} to write instead of the networks' own (the EMA average)."""
        out = {}
        for part in self.parts:
            weights = {**self.parameters(getattr(self.model, part)), **(replace or {}).get(part, {})}
            out.update(lora.from_peft(weights, part, self.alpha))
        return {k: (d.detach().cpu(), u.detach().cpu(), a) for k, (d, u, a) in out.items()}

    @contextlib.contextmanager
    def off(self, net: torch.nn.Module):
        """`net` as the base model, its adapters bypassed (prior_prediction's target): PEFT's own
        switch, set on each adapted layer, without its set_adapter, which would toggle requires_grad."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        adapted = [m for m in net.modules() if isinstance(m, BaseTunerLayer)]
        for m in adapted:
            m._disable_adapters = True
        try:
            yield
        finally:
            for m in adapted:
                m._disable_adapters = False

    def merged(self, layers: dict) -> checkpoint.StableDiffusion:
        """The model as loaded with `layers` merged into its weights: networks without adapters,
        on the CPU (the frozen VAE, and a text encoder without adapters, as they are)."""
        nets = {}
        for part in self.parts:
            weights = dict(self.base[part])
            for module in self.targets[part]:  # merged in place: never into the weights training holds
                weights[f"{module}.weight"] = weights[f"{module}.weight"].clone()
            nets[part] = plain(getattr(self.model, part), part, weights)
        model = dataclasses.replace(self.model, **nets)
        lora.merge(model, layers)
        return model


def init(net: torch.nn.Module, seed: int, part: str) -> None:
    """lora_A as torch initialises a Linear or Conv2d (Kaiming uniform, a = sqrt(5): PEFT's
    choice), drawn on the CPU from (seed, part); lora_B zero, so training starts at the base model."""
    from .train import rng

    g = rng(seed, "lora", part)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".lora_A." in name:
                w = torch.empty(p.shape, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
                p.copy_(w)
            elif ".lora_B." in name:
                p.zero_()


def plain(net: torch.nn.Module, part: str, weights: dict) -> torch.nn.Module:
    """A network of `net`'s architecture, without adapters, holding `weights` (no copies), and
    `net`'s buffers that no state dict holds (CLIP's position_ids), which would stay on the meta device."""
    with torch.device("meta"):
        copy = type(net).from_config(net.config) if part == "unet" else type(net)(net.config)
    copy.load_state_dict(weights, strict=True, assign=True)
    own = dict(net.named_buffers())
    for name, buffer in list(copy.named_buffers()):
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            copy.get_submodule(owner).register_buffer(leaf, own[name].detach().to("cpu").clone(), persistent=False)
    return copy
