"""Stable Diffusion 1.x checkpoints: read every layout users have, write the one every UI loads.

Reading (LDM single file -> diffusers modules) uses diffusers' own converters; writing
(diffusers modules -> LDM single file, the layout of sd-v1-5.safetensors that AUTOMATIC1111,
ComfyUI and InvokeAI load) is the key mapping below, generic over block counts so the tiny demo
model and a full SD 1.x model share one code path.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from . import modelspec
from .errors import DreampipeError
from .files import human_size, temp_beside, umask_mode

# diffusers warns about every dtype cast of a model it did not load itself. It reads this when
# first imported (always later, inside functions): importing it here would cost every command,
# prune included, a second.
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

SD1_CONFIGS = Path(__file__).parent / "configs" / "sd1"
# Models whose architecture differs from SD 1.x (our tiny demo model) carry it in the metadata.
ARCHITECTURE_KEY = "dreampipe.architecture"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CLIP_L_REPO = "openai/clip-vit-large-patch14"


def sd1_architecture() -> dict:
    return {name: json.loads((SD1_CONFIGS / f"{name}.json").read_text())
            for name in ("unet", "vae", "text_encoder", "scheduler")}


@dataclass
class StableDiffusion:
    """The three networks of an SD 1.x model plus what is needed to run them."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    architecture: dict

    def to(self, device=None, dtype=None):
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device=device, dtype=dtype)
        return self


# ---------------------------------------------------------------------------------------------
# reading


def read_state_dict(path: Path, *, mmap: bool = False) -> tuple[dict, dict]:
    """Tensors and metadata of a .safetensors or .ckpt file, never executing pickled code.

    The format is told by the file's first bytes, not its name: users rename files. A
    .safetensors file is always mapped, not read; a .ckpt (zip) file too with `mmap`, so that a
    tensor is read only when used.
    """
    path = Path(path)
    if not path.is_file():
        raise DreampipeError(f"{path}: no such checkpoint file; set base_model to an SD 1.x "
                             ".ckpt/.safetensors file or a diffusers folder")
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" or path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as e:  # safetensors raises plain exceptions for bad headers/truncation
            raise DreampipeError(f"{path}: not a readable .safetensors file ({_first_line(e)}); "
                                 "the download may be truncated: fetch it again") from None
    if not head.startswith((b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")):
        raise DreampipeError(f"{path}: not a checkpoint (neither a .ckpt pickle nor a "
                             ".safetensors file); set base_model to an SD 1.x checkpoint")
    try:
        with torch.serialization.safe_globals(_harmless_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and head.startswith(b"PK"))
    except Exception as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            found = re.search(r"GLOBAL (\S+)", str(e))
            raise DreampipeError(
                f"{path}: refused to load: the pickle asks to call "
                f"{found.group(1) if found else 'code'} on load. "
                "Only plain tensor checkpoints are accepted; convert it to .safetensors with a "
                "tool you trust") from None
        raise DreampipeError(f"{path}: cannot read checkpoint ({_first_line(e)}); the file may "
                             "be truncated: fetch it again") from None
    meta = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        obj = obj["state_dict"]  # Lightning/CompVis checkpoint: weights, optimizer, step...
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise DreampipeError(f"{path}: holds no state dict of tensors; is this a Stable "
                             "Diffusion checkpoint?")
    return tensors, {str(k): str(v) for k, v in meta.items()}


class _LightningCallbackKey:
    """Stands in for a class the pickle only names and never calls."""


def _harmless_globals() -> list:
    """Names that real SD 1.x .ckpt files carry besides tensors, none of which runs code:
    sd-v1-4.ckpt keys its callback state by the ModelCheckpoint class, some files hold numpy
    scalars (the same allowances AUTOMATIC1111's restricted unpickler makes)."""
    import numpy as np

    scalar = np._core.multiarray.scalar
    return [(_LightningCallbackKey, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
            (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
            np.dtype, *(type(np.dtype(t)) for t in "efdbhilqBHILQ?")]


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:200]


def check_sd1(sd: dict, path: Path, arch: dict | None = None) -> None:
    """Refuse what is not SD 1.x, naming what was found (key shapes tell the families apart)."""
    if any(k.startswith("conditioner.embedders.") for k in sd):
        _refuse(path, "an SDXL checkpoint")
    if any(k.startswith("cond_stage_model.model.") for k in sd):
        _refuse(path, "a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder)")
    conv_in = sd.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        raise DreampipeError(f"{path}: no UNet weights ({UNET_PREFIX}*) found; is this a "
                             "Stable Diffusion checkpoint?")
    if conv_in.shape[1] != 4:
        _refuse(path, f"a UNet taking {conv_in.shape[1]} input channels (an inpainting, depth "
                      "or instruct model)")
    context = sd.get(UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    expected = (arch or sd1_architecture())["unet"]["cross_attention_dim"]
    if context is not None and context.shape[1] != expected:
        _refuse(path, f"a UNet attending to {context.shape[1]}-wide text features (SD 1.x: "
                      f"{expected}; 1024 is Stable Diffusion 2.x)")


def _refuse(path, found: str):
    raise DreampipeError(f"{path}: this is {found}; dreampipe supports plain Stable Diffusion "
                         "1.x models only for now: pick an SD 1.x base model")


def load(path, tokenizer=None, use_ema: bool = False, fallback=None, device=None,
         dtype: torch.dtype = torch.float32, *, need_tokenizer: bool = True) -> StableDiffusion:
    """Load an SD 1.x model from a single file (.ckpt/.safetensors) or a diffusers folder, as
    `dtype` on `device` (the file's tensors go to the device first and are cast there). Without
    `need_tokenizer` a single file's model has none unless `tokenizer` names it (the weights alone).

    `fallback` is a second checkpoint supplying the VAE and/or text encoder when `path` lacks them.
    """
    path = Path(path)
    if path.is_dir():
        return _load_diffusers_folder(path, tokenizer).to(device, dtype)
    sd, meta = read_state_dict(path)
    arch = architecture_of(meta)
    check_sd1(sd, path, arch)
    sd = inference_weights(sd, use_ema, path)
    if fallback and not (_has(sd, VAE_PREFIX) and _has(sd, TEXT_PREFIX)):
        extra = inference_weights(read_state_dict(Path(fallback))[0], source=fallback)
        sd = {**{k: v for k, v in extra.items() if not k.startswith(UNET_PREFIX)}, **sd}
    for prefix, what in ((VAE_PREFIX, "VAE"), (TEXT_PREFIX, "text encoder")):
        if not _has(sd, prefix):
            raise DreampipeError(f"{path}: the checkpoint has no {what} weights ({prefix}*); set "
                                 "base_model_fallback to a full SD 1.x checkpoint to take them from")
    if device is not None:  # the file's bytes go to the device as they are: casting there is fast, on the CPU not
        sd = {k: v.to(device, non_blocking=True) for k, v in sd.items()}
    tok = load_tokenizer(tokenizer, path) if tokenizer or need_tokenizer else None
    return from_ldm(sd, arch, tok, source=path).to(device, dtype)


def architecture_of(meta: dict) -> dict:
    return json.loads(meta[ARCHITECTURE_KEY]) if ARCHITECTURE_KEY in meta else sd1_architecture()


def _has(sd: dict, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in sd)


def inference_weights(sd: dict, use_ema: bool = False, source="checkpoint") -> dict:
    """The UNet, VAE and text encoder weights of an LDM state dict, under today's key names.

    Drops optimizer state, the EMA copy (or takes the UNet from it), noise-schedule buffers and
    logs. Text encoders saved with transformers < 4.19 lack the `text_model.` level.
    """
    out = {}
    for k, v in sd.items():
        if k.startswith(UNET_PREFIX):
            if use_ema:  # LDM stores EMA weights flattened: model_ema.diffusion_modelinput_blocks00weight
                v = sd.get("model_ema." + "".join(k.split(".")[1:]))
                if v is None:
                    raise DreampipeError(f"{source}: use_ema is set but the checkpoint has no EMA "
                                         f"copy of {k} (model_ema.*); set use_ema: false")
            out[k] = v
        elif k.startswith(VAE_PREFIX):
            out[k] = v
        elif k.startswith(TEXT_PREFIX):
            rest = k[len(TEXT_PREFIX):]
            out[TEXT_PREFIX + ("" if rest.startswith("text_model.") else "text_model.") + rest] = v
    positions = TEXT_PREFIX + "text_model.embeddings.position_ids"
    if positions in out:  # merged/fp16 files often carry them as rounded floats: rebuild
        out[positions] = torch.arange(out[positions].shape[-1])[None]
    return out


def from_ldm(sd: dict, arch: dict, tokenizer, source="checkpoint") -> StableDiffusion:
    """Build the networks from LDM weights. They are created on the meta device and take the
    loaded tensors as they are, in the file's dtype: no random initialisation (20 s for an SD 1.x
    UNet on a CPU)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint,
                                                     convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(arch["unet"])
        vae = AutoencoderKL.from_config(arch["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**arch["text_encoder"]))
    text = convert_ldm_clip_checkpoint(sd)
    text.pop("text_model.embeddings.position_ids", None)
    own = text_encoder.state_dict()  # transformers >= 5 drops the text_model. level
    text = {k if k in own else k.removeprefix("text_model."): v for k, v in text.items()}
    parts = ((unet, convert_ldm_unet_checkpoint(sd, unet.config), "UNet"),
             (vae, convert_ldm_vae_checkpoint(sd, vae.config), "VAE"),
             (text_encoder, text, "text encoder"))
    for module, weights, what in parts:
        try:
            module.load_state_dict(weights, strict=True, assign=True)
        except RuntimeError as e:
            raise DreampipeError(f"{source}: the {what} weights do not fit the SD 1.x "
                                 f"architecture ({_first_line(e)})") from None
    # position_ids is CLIP's one non-persistent buffer (not in any state dict): give it values
    for name, buffer in list(text_encoder.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        if buffer.is_meta and leaf == "position_ids":
            n = text_encoder.config.max_position_embeddings
            text_encoder.get_submodule(owner).register_buffer("position_ids", torch.arange(n)[None],
                                                              persistent=False)
    return StableDiffusion(unet, vae, text_encoder, tokenizer, arch)


def _load_diffusers_folder(path: Path, tokenizer) -> StableDiffusion:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    if not (path / "model_index.json").exists():
        raise DreampipeError(f"{path}: a folder, but not a diffusers model (no model_index.json)")
    _check_diffusers_sd1(path)
    unet, vae, text_encoder = (
        _from_pretrained(cls, path, sub, what) for cls, sub, what in
        ((UNet2DConditionModel, "unet", "UNet"), (AutoencoderKL, "vae", "VAE"),
         (CLIPTextModel, "text_encoder", "text encoder")))
    arch = {"unet": _public(unet.config), "vae": _public(vae.config),
            "text_encoder": _public(text_encoder.config.to_dict()),
            "scheduler": sd1_architecture()["scheduler"]}
    tok = load_tokenizer(tokenizer or (path / "tokenizer"), path)
    return StableDiffusion(unet, vae, text_encoder, tok, arch)


def _from_pretrained(cls, path: Path, subfolder: str, what: str):
    """One network of a diffusers folder. Pickled .bin weights are read with torch.load's
    weights_only, which refuses anything but tensors."""
    try:
        return cls.from_pretrained(path / subfolder, local_files_only=True, variant=_variant(path / subfolder))
    except (OSError, ValueError, RuntimeError) as e:
        raise DreampipeError(f"{path}: cannot load the {what} from {subfolder}/ ({_first_line(e)}); if it holds "
                             "pickled .bin weights, convert the folder to .safetensors with a tool you trust, "
                             "or fetch it again") from None


def _public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _variant(folder: Path) -> str | None:
    """"fp16" for a folder holding only the fp16 weight files (diffusers' `variant` downloads)."""
    weights = [f.name for f in folder.glob("*") if f.suffix in (".safetensors", ".bin")]
    return "fp16" if weights and all(".fp16." in w for w in weights) else None


def _check_diffusers_sd1(path: Path) -> None:
    pipeline = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
    unet_config = path / "unet" / "config.json"
    if not unet_config.exists():
        raise DreampipeError(f"{path}: diffusers folder without unet/config.json; is the copy complete?")
    cfg = json.loads(unet_config.read_text())
    if "XL" in pipeline or cfg.get("addition_embed_type") == "text_time":
        _refuse(path, "an SDXL model")
    if cfg.get("in_channels", 4) != 4:
        _refuse(path, f"a UNet taking {cfg['in_channels']} input channels (an inpainting, depth "
                      "or instruct model)")
    if cfg.get("cross_attention_dim") == 1024 or cfg.get("use_linear_projection"):
        _refuse(path, "a Stable Diffusion 2.x model")


def load_tokenizer(tokenizer, model_path):
    """The CLIP tokenizer from a folder, or from the local Hugging Face cache; never downloaded."""
    from transformers import CLIPTokenizer

    if tokenizer:
        if not Path(tokenizer).is_dir():
            raise DreampipeError(f"tokenizer folder {tokenizer} does not exist; set `tokenizer` "
                                 "in config/config.yaml to a folder with vocab.json and merges.txt")
        return CLIPTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    try:
        return CLIPTokenizer.from_pretrained(CLIP_L_REPO, local_files_only=True)
    except OSError:
        raise DreampipeError(
            f"{model_path}: no CLIP tokenizer found offline. Set `tokenizer` in config/config.yaml "
            f"to the tokenizer/ folder of any SD 1.x diffusers model, or put {CLIP_L_REPO} in "
            "the Hugging Face cache") from None


# ---------------------------------------------------------------------------------------------
# writing: diffusers -> LDM


def _unet_prefixes(cfg: dict) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) pairs for a UNet2DConditionModel config."""
    pairs = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
             ("mid_block.resnets.1.", "middle_block.2.")]
    n, per = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    for i in range(n):
        for j in range(per):
            pairs += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{(per + 1) * i + j + 1}.0."),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{(per + 1) * i + j + 1}.1.")]
        pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(per + 1) * (i + 1)}.0.op."))
        has_attn = cfg["up_block_types"][i].startswith("CrossAttn")
        for j in range(per + 1):
            pairs += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{(per + 1) * i + j}.0."),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{(per + 1) * i + j}.1.")]
        pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(per + 1) * i + per}.{2 if has_attn else 1}."))
    return pairs


_UNET_RESNET = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
                ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."),
                ("conv_shortcut.", "skip_connection.")]


def _vae_prefixes(cfg: dict) -> list[tuple[str, str]]:
    pairs = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out.")]
    n, per = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    for side in ("encoder", "decoder"):
        pairs += [(f"{side}.mid_block.resnets.{k}.", f"{side}.mid.block_{k + 1}.") for k in range(2)]
        pairs.append((f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1."))
    for i in range(n):
        pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(per)]
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        pairs += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.")
                  for j in range(per + 1)]
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample."))
    return pairs


_VAE_ATTN = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
             ("to_out.0.", "proj_out.")]


def _rename(key: str, prefixes: list[tuple[str, str]], leaves: list[tuple[str, str]]) -> str:
    for new, old in sorted(prefixes, key=lambda p: -len(p[0])):
        if key.startswith(new):
            rest = key[len(new):]
            for leaf_new, leaf_old in leaves:
                if rest.startswith(leaf_new):
                    rest = leaf_old + rest[len(leaf_new):]
                    break
            return old + rest
    return key


def to_ldm(model: StableDiffusion, unet_weights: dict | None = None) -> dict:
    """The model's weights under the original SD 1.x (LDM) key names; `unet_weights` (diffusers
    names) replace the UNet's own, e.g. its EMA average."""
    out = {}
    unet_pairs = _unet_prefixes(model.architecture["unet"])
    for k, v in {**model.unet.state_dict(), **(unet_weights or {})}.items():
        leaves = _UNET_RESNET if ".resnets." in k else []
        out[UNET_PREFIX + _rename(k, unet_pairs, leaves)] = v
    vae_pairs = _vae_prefixes(model.architecture["vae"])
    for k, v in model.vae.state_dict().items():
        leaves = _VAE_ATTN if ".attentions." in k else [("conv_shortcut.", "nin_shortcut.")]
        name = _rename(k, vae_pairs, leaves)
        if ".mid.attn_1." in name and name.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        out[VAE_PREFIX + name] = v
    for k, v in model.text_encoder.state_dict().items():
        out[TEXT_PREFIX + ("" if k.startswith("text_model.") else "text_model.") + k] = v
    # Real SD files carry the (int64) position ids; some UIs check for them.
    positions = model.text_encoder.config.max_position_embeddings
    out[TEXT_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    return out


FILE_SUFFIXES = (".safetensors", ".ckpt")


def save(model: StableDiffusion, path, dtype: str | None = "fp16", metadata: dict | None = None,
         unet_weights: dict | None = None, extra: dict | None = None) -> Path:
    """Write the model as one LDM-layout file (.safetensors, or .ckpt), atomically, from whichever
    device its weights are on; `extra`: more tensors under their own keys."""
    meta = dict(metadata or {})
    if not is_sd1(model.architecture):
        meta[ARCHITECTURE_KEY] = json.dumps(model.architecture)
    return write_file({**to_ldm(model, unet_weights), **(extra or {})}, path, dtype, meta)


def is_sd1(arch: dict) -> bool:
    """Whether `arch` has the SD 1.x shapes (then the file needs no architecture metadata)."""
    sd1 = sd1_architecture()
    plain = lambda v: json.loads(json.dumps(v))  # noqa: E731  tuples and lists compare alike
    return all(plain(arch[part].get(k)) == plain(v)
               for part in ("unet", "vae", "text_encoder") for k, v in sd1[part].items())


def write_file(weights: dict, path, dtype: str | None = "fp16", metadata: dict | None = None, *,
               release_source: bool = False) -> Path:
    """An LDM state dict as .safetensors (or, by the name's suffix, a .ckpt that A1111 reads:
    {"state_dict": ...}), floats cast to `dtype` (None: each keeps its own), written atomically.
    A .safetensors is written a tensor at a time (to the CPU, cast, write, next), so memory never
    holds a copy of the whole dict; release_source hands each source tensor's pages back once
    written (tensors mapped from a file)."""
    path = Path(path)
    if path.suffix not in FILE_SUFFIXES:
        raise DreampipeError(f"{path}: unknown checkpoint type; name the output *.safetensors or *.ckpt")
    dtypes = {k: DTYPES.get(dtype, v.dtype) if v.is_floating_point() else v.dtype for k, v in weights.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    check_disk_space(path, sum(v.numel() * dtypes[k].itemsize for k, v in weights.items()))
    tmp = temp_beside(path)
    if path.suffix == ".ckpt":  # the modelspec hashes are of a safetensors file's data
        meta = {k: v for k, v in meta.items() if not (k in modelspec.HASH_FORMATS and v == modelspec.PENDING)}
        torch.save({"state_dict": {k: _on_cpu(v, dtypes[k]) for k, v in weights.items()}, "metadata": meta}, tmp)
    else:
        _write_safetensors(weights, dtypes, tmp, meta, release_source)
    umask_mode(tmp)
    os.replace(tmp, path)
    return path


def _on_cpu(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """To the CPU, then cast: a model on the GPU is never copied whole there."""
    return tensor.detach().cpu().to(dtype).contiguous()


_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
                       torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
                       torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def _write_safetensors(weights: dict, dtypes: dict, path: Path, metadata: dict, release_source: bool) -> None:
    """The safetensors format (a JSON header of dtypes, shapes and byte ranges, then the bytes),
    written without building the file in memory: the header needs only shapes. Metadata hashes left
    modelspec.PENDING get the SHA-256 of the bytes after the header: hashed while written, then
    patched into the header (its length unchanged)."""
    import hashlib

    pending = {k: form for k, form in modelspec.HASH_FORMATS.items() if metadata.get(k) == modelspec.PENDING}
    metadata = {**metadata, **{k: form.format("0" * 64) for k, form in pending.items()}}
    header, offset = {"__metadata__": metadata}, 0
    for k, v in weights.items():
        size = v.numel() * dtypes[k].itemsize
        header[k] = {"dtype": _SAFETENSORS_DTYPES[dtypes[k]], "shape": list(v.shape),
                     "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for k, v in weights.items():
            data = _on_cpu(v, dtypes[k]).reshape(-1).view(torch.uint8).numpy()
            f.write(data)
            if pending:
                digest.update(data)
            if release_source:
                _release_pages(v)
        for k, form in pending.items():
            f.seek(8 + head.index(json.dumps(k).encode() + b':"') + len(json.dumps(k)) + 2)
            f.write(form.format(digest.hexdigest()).encode())


_MADV_PAGEOUT = 21  # Linux's value; Python's mmap module names it only when built on Linux >= 5.4


def _release_pages(tensor: torch.Tensor) -> None:
    """Drop the pages of a file-mapped tensor from this process (Linux MADV_PAGEOUT; elsewhere, or
    on kernels before 5.4, nothing happens). Without it every page read stays resident, and a
    7.7 GB checkpoint costs its kept 4 GB of memory. Anonymous memory is left intact (at most swapped)."""
    import ctypes
    import mmap

    storage = tensor.untyped_storage()
    start = -(-storage.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (storage.data_ptr() + storage.nbytes()) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start and sys.platform == "linux":
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_PAGEOUT)


def save_diffusers(model: StableDiffusion, folder, dtype: str = "fp16") -> Path:
    """Write the model as a diffusers folder (StableDiffusionPipeline layout), atomically.
    Casts the model to `dtype` in place: export loads a fresh model for each output."""
    import shutil

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    folder = Path(folder)
    model.to(dtype=DTYPES[dtype])
    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=DDIMScheduler.from_config(model.architecture["scheduler"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    params = [p for m in (model.unet, model.vae, model.text_encoder) for p in m.parameters()]
    check_disk_space(folder, sum(p.numel() * p.element_size() for p in params))
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    umask_mode(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def check_disk_space(path: Path, nbytes: int) -> None:
    import shutil

    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if free < nbytes * 1.1:
        raise DreampipeError(f"{path}: needs {human_size(nbytes)} but only {human_size(free)} is free "
                             "on that disk; free some space")
