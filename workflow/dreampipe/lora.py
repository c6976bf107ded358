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
For SD 1.x that is 192 UNet and 72 text encoder layers, 278 UNet layers with LoCon (the counts
sd-scripts prints; tests/test_lora.py checks them and names from its networks/lora.py).

`extract` turns a finetune into a LoRA of the base model (sd-scripts' extract_lora_from_models.py,
without its clamping of outliers): the truncated SVD of each layer's weight change.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors import safe_open

from . import checkpoint, modelspec
from .errors import DreampipeError
from .files import human_size

PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te"}
PART_NAMES = {"unet": "UNet", "text_encoder": "text encoder"}
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
    `resolution` and `settings` when known) and kohya's ss_network_* keys, read off the layers;
    `metadata` adds keys or overrides them."""
    title = title or Path(path).name.removesuffix(".safetensors").removesuffix(".lora")
    meta = {**modelspec.metadata(title, lora=True, resolution=resolution, settings=settings),
            **kohya_metadata(layers), **(metadata or {})}
    return checkpoint.write_file(to_state_dict(layers), path, dtype, meta)


def kohya_metadata(layers: dict) -> dict:
    """The ss_* keys sd-scripts writes, which UIs show: rank and alpha, LoCon's conv rank and alpha."""
    def first(wide: bool):
        return next(((down.shape[0], alpha) for down, _, alpha in layers.values()
                     if (down.dim() == 4 and down.shape[-1] > 1) == wide), (None, None))

    (rank, alpha), (conv_rank, conv_alpha) = first(False), first(True)
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(float(alpha)),
            "ss_v2": "False", "ss_base_model_version": "sd_v1",
            "ss_network_args": json.dumps({} if conv_rank is None else
                                          {"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_alpha))})}


def load(path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """A kohya-layout LoRA file's layers by name (of a .safetensors, only the LoRA's tensors are
    read: a model train.method lora wrote holds its layers beside 2 GB of weights)."""
    prefixes = tuple(p + "_" for p in PREFIXES.values())
    if Path(path).suffix == ".safetensors":
        with safe_open(path, "pt") as f:
            weights = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefixes)}
    else:
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


def extract(finetuned: checkpoint.StableDiffusion, base: checkpoint.StableDiffusion, rank: int,
            conv_rank: int | None = None, *, log=None) -> dict:
    """The LoRA layers that move `base` towards `finetuned`: for each layer kohya adapts (3x3 convs
    too with conv_rank: LoCon), the SVD of the weight change (in fp32; a conv flattened to
    [out, in*k*k]) truncated to the top rank singular values: up = U sqrt(S), down = sqrt(S) Vh,
    alpha = the rank (scale 1). A layer the finetune left as it was (equal in the lower precision of
    the two) is left out, so an untrained text encoder gets none. `log` gets one summary line."""
    from tqdm import tqdm

    pairs = []
    for part in PREFIXES:
        mine, theirs = (targets(getattr(m, part), part, conv=conv_rank is not None) for m in (finetuned, base))
        if mine != theirs:
            raise DreampipeError(f"the finetuned and the base model differ in their {PART_NAMES[part]}'s "
                                 "layers: they are of two architectures; extract a LoRA from a finetune of that base")
        pairs += [(part, name, wide) for name, wide in theirs.items()]
    layers, energy, skipped = {}, {part: [0.0, 0.0] for part in PREFIXES}, 0
    for part, name, wide in tqdm(pairs, desc="extract-lora", unit="layer", disable=None, mininterval=1):
        new, old = (getattr(m, part).get_submodule(name).weight.detach() for m in (finetuned, base))
        if new.shape != old.shape:
            raise DreampipeError(f"layer {kohya_name(part, name)} is {tuple(new.shape)} in the finetuned model, "
                                 f"{tuple(old.shape)} in the base: they are of two architectures")
        if _unchanged(new, old):
            skipped += 1
            continue
        change = new.float() - old.float()
        down, up, kept, total = _low_rank(change, conv_rank if wide else rank)
        layers[kohya_name(part, name)] = (down, up, float(down.shape[0]))
        energy[part][0] += kept
        energy[part][1] += total
    if log:
        log(_summary(layers, energy, skipped, rank, conv_rank))
    return layers


def _unchanged(new: torch.Tensor, old: torch.Tensor) -> bool:
    """Equal in the lower precision of the two: a finetune saved in fp16 of an fp32 base differs
    from it by rounding alone where it was not trained."""
    low = new.dtype if new.element_size() < old.element_size() else old.dtype
    return torch.equal(new.to(low), old.to(low))


def _low_rank(change: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(down, up, kept, total): the rank-`rank` factors of `change` (shaped as a LoRA layer's),
    the squared Frobenius norm they keep and that of the whole change."""
    matrix = change.flatten(1)
    wide = matrix.shape[0] < matrix.shape[1]  # LAPACK is faster on the tall side (2x at 1280x11520)
    u, s, vh = torch.linalg.svd(matrix.T if wide else matrix, full_matrices=False)
    if wide:
        u, vh = vh.T, u.T
    r = min(rank, len(s))
    root = s[:r].sqrt()
    up, down = u[:, :r] * root, root[:, None] * vh[:r]
    if change.dim() == 4:  # conv: down [rank, in, k, k], up [out, rank, 1, 1]
        up, down = up[:, :, None, None], down.reshape(r, *change.shape[1:])
    return down.contiguous(), up.contiguous(), s[:r].square().sum().item(), s.square().sum().item()


def _summary(layers: dict, energy: dict, skipped: int, rank: int, conv_rank: int | None) -> str:
    counts = {part: sum(n.startswith(PREFIXES[part] + "_") for n in layers) for part in PREFIXES}
    kept, total = (sum(e[i] for e in energy.values()) for i in (0, 1))
    share = lambda e: f"{100 * (e[0] / e[1]) ** 0.5:.1f}%" if e[1] else "-"  # noqa: E731
    parts = ", ".join(f"{counts[p]} {PART_NAMES[p]} ({share(energy[p])})" for p in PREFIXES if counts[p])
    ranks = f"rank {rank}" + (f", 3x3 convs rank {conv_rank}" if conv_rank is not None else "")
    params = sum(down.numel() + up.numel() for down, up, _ in layers.values())
    return (f"keeps {share((kept, total))} of the difference's Frobenius norm in {len(layers)} layers at {ranks}: "
            f"{parts}; {params / 1e6:.2f} M weights; {skipped} layers unchanged, left out")


def run(finetuned, base, out, rank: int | None = None, conv_rank: int | None = None, dtype: str = "fp16", *,
        base_options: dict | None = None, settings: dict | None = None, log=print) -> Path:
    """`dreampipe extract-lora`: the LoRA of `finetuned` against `base` (files or diffusers
    folders), written to `out` with kohya's and modelspec's metadata. A model that train.method
    lora wrote carries the layers it trained (lora_* keys beside its weights): those are written
    as trained, exact where an extraction would be an approximation, and no rank is needed."""
    start = time.perf_counter()
    layers = load(finetuned) if Path(finetuned).is_file() else {}
    if layers:
        log(f"extract-lora: {finetuned} holds the LoRA it was trained as ({len(layers)} layers): written as trained")
    elif rank is None:
        raise DreampipeError(f"{finetuned}: holds no trained LoRA; give --rank to extract one against {base}")
    else:
        if rank < 1 or conv_rank is not None and conv_rank < 1:
            raise DreampipeError(f"extract-lora {finetuned}: --rank and --conv-rank must be at least 1")
        finetune = checkpoint.load(finetuned, dtype=None, need_tokenizer=False)  # in the files' own dtypes
        original = checkpoint.load(base, dtype=None, need_tokenizer=False, **(base_options or {}))
        try:
            layers = extract(finetune, original, rank, conv_rank, log=lambda line: log(f"extract-lora: {line}"))
        except DreampipeError as e:
            raise DreampipeError(f"{finetuned} against {base}: {e}") from None
        if not layers:
            raise DreampipeError(f"{finetuned}: no layer differs from {base}'s: is it a finetune of that model?")
    settings = settings or {}
    written = save(layers, out, dtype, settings=settings or None, resolution=settings.get("resolution"))
    log(f"extract-lora: {human_size(Path(written).stat().st_size)} written to {written} "
        f"in {time.perf_counter() - start:.1f} s")
    return written
