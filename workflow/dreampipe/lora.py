"""LoRA files in the layout AUTOMATIC1111, ComfyUI and diffusers load: kohya's.

Each adapted layer is named after its module path in the diffusers network, dots turned to
underscores, behind `lora_unet_` or `lora_te_` (sd-scripts' naming, which the UIs read; they do
not read diffusers' own SD 1.5 LoRA keys), and stored as three tensors:

    <name>.lora_down.weight  [rank, in] (conv: [rank, in, k, k])
    <name>.lora_up.weight    [out, rank] (conv: [out, rank, 1, 1])
    <name>.alpha             scalar; the layer adds up @ down * alpha / rank

Which layers: kohya's rule. Every Linear and Conv2d inside the UNet's Transformer2DModel blocks
and the text encoder's CLIPAttention/CLIPMLP blocks; with LoCon (conv_rank) also those inside
ResnetBlock2D, Downsample2D and Upsample2D, 3x3 convs at conv_rank, Linear and 1x1 at rank.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint, modelspec
from .errors import DreampipeError

PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te"}
ATTENTION_BLOCKS = {"unet": ("Transformer2DModel",), "text_encoder": ("CLIPAttention", "CLIPMLP")}
CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
ARCHITECTURE = modelspec.ARCHITECTURE + "/lora"


def targets(net: torch.nn.Module, part: str, conv: bool = False) -> dict[str, bool]:
    """The module names (in `net`) kohya adapts, each with whether it is a 3x3 (or larger) conv,
    which LoCon gives conv_rank. Only attention blocks unless `conv`."""
    blocks = ATTENTION_BLOCKS[part] + (CONV_BLOCKS if conv and part == "unet" else ())
    found = {}
    for name, module in net.named_modules():
        if type(module).__name__ not in blocks:
            continue
        for child, layer in module.named_modules():
            if isinstance(layer, torch.nn.Linear) or isinstance(layer, torch.nn.Conv2d):
                wide = isinstance(layer, torch.nn.Conv2d) and layer.kernel_size != (1, 1)
                found[f"{name}.{child}" if child else name] = wide
    return found


def kohya_name(part: str, module: str) -> str:
    """("unet", "down_blocks.0.attentions.0.proj_in") -> "lora_unet_down_blocks_0_attentions_0_proj_in".
    The text encoder's names keep CLIPTextModel's `text_model.` level, which transformers >= 5 drops."""
    if part == "text_encoder" and not module.startswith("text_model."):
        module = "text_model." + module
    return f"{PREFIXES[part]}_{module.replace('.', '_')}"


def from_peft(state: dict, part: str, alpha: float) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """The layers of a PEFT adapter state dict (peft.get_peft_model_state_dict of one network:
    keys "<module>.lora_A.weight" / "<module>.lora_B.weight") by kohya name: (down, up, alpha)."""
    layers = {}
    for key, down in state.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            layers[kohya_name(part, module)] = (down, state[f"{module}.lora_B.weight"], alpha)
    return layers


def to_state_dict(layers: dict) -> dict[str, torch.Tensor]:
    out = {}
    for name, (down, up, alpha) in layers.items():
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def save(layers: dict, path, dtype: str | None = "fp16", metadata: dict | None = None, *,
         settings: dict | None = None, resolution: int | None = None, title: str | None = None) -> Path:
    """Write `layers` (kohya name -> (down, up, alpha)) as one .safetensors, atomically, with the
    modelspec keys of a LoRA (modelspec.py: title the file's name unless given; the training
    `resolution` and `settings` when known); `metadata` adds keys or overrides them."""
    meta = {**modelspec.metadata(title or Path(path).stem, lora=True, resolution=resolution, settings=settings),
            "ss_network_module": "networks.lora", **(metadata or {})}
    return checkpoint.write_file(to_state_dict(layers), path, dtype, meta)


def load(path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """A kohya-layout LoRA file's layers by name."""
    weights, _ = checkpoint.read_state_dict(Path(path))
    return {key[: -len(".lora_down.weight")]: (down, weights[key.replace("lora_down", "lora_up")],
                                               float(weights[key.replace(".lora_down.weight", ".alpha")]))
            for key, down in weights.items() if key.endswith(".lora_down.weight")}


def delta(down: torch.Tensor, up: torch.Tensor, alpha: float) -> torch.Tensor:
    """The weight change a layer adds, shaped as the weight."""
    rank = down.shape[0]
    if down.dim() == 2:
        return (up.float() @ down.float()) * (alpha / rank)
    # conv: up is [out, rank, 1, 1]; down [rank, in, k, k]
    return torch.einsum("or,rikl->oikl", up.float().flatten(1), down.float()) * (alpha / rank)


def merge(model: checkpoint.StableDiffusion, layers: dict, scale: float = 1.0, *, source="the LoRA") -> None:
    """Add the layers' weight changes to the model's networks, in place. A layer the model lacks,
    or of another shape, is refused before anything changes (`source` names the file in the message)."""
    modules = {}
    for part in PREFIXES:
        net = getattr(model, part)
        modules.update({kohya_name(part, n): m for n, m in net.named_modules()})
    deltas = {}
    for name, (down, up, alpha) in sorted(layers.items()):
        weight = getattr(modules.get(name), "weight", None)
        change = None if weight is None else delta(down, up, alpha)
        if change is None or change.numel() != weight.numel():  # 1x1 convs may come as linears
            what = (f"the model has no layer {name}" if weight is None else
                    f"layer {name} is {tuple(change.shape)} here, {tuple(weight.shape)} in the model")
            raise DreampipeError(f"{source}: {what}: it was made for another architecture; use it with a "
                                 "model of the architecture it was trained on")
        deltas[name] = change
    with torch.no_grad():
        for name, change in deltas.items():
            weight = modules[name].weight
            weight += (scale * change).to(weight.dtype).reshape(weight.shape)
