"""The tiny SD-architecture model of the demo and the tests, built offline and deterministically.

Same diffusers/transformers classes and the same block structure as SD 1.x (so the same key
layout), small widths, 64 px images. Saved in the SD single-file layout like a real checkpoint.
"""

import json
from pathlib import Path

import torch

from . import checkpoint

# Words the demo prompts use get whole tokens; anything else still tokenizes, byte by byte.
WORDS = ("a photo of an the on in with and background sks zxq toy robot dog cat person man woman "
         "red green blue yellow orange purple white black striped dotted round circle square "
         "triangle star").split()


def architecture(vocab_size: int) -> dict:
    sd1 = checkpoint.sd1_architecture()
    return {
        "unet": {**sd1["unet"], "sample_size": 8, "block_out_channels": [32, 32, 64, 64],
                 "cross_attention_dim": 32},
        "vae": {**sd1["vae"], "sample_size": 64, "block_out_channels": [32, 32, 64, 64]},
        "text_encoder": {**sd1["text_encoder"], "vocab_size": vocab_size, "hidden_size": 32,
                         "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                         "projection_dim": 32, "bos_token_id": vocab_size - 2,
                         "eos_token_id": vocab_size - 1, "pad_token_id": vocab_size - 1},
        "scheduler": sd1["scheduler"],
    }


def write_tokenizer(folder: Path, max_length: int = 77) -> int:
    """A CLIP BPE tokenizer (vocab.json + merges.txt) built like CLIP's: bytes, merges, specials."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merge = f"{parts[0]} {parts[1]}"
            parts = [parts[0] + parts[1]] + parts[2:]
            if merge not in merges:
                merges.append(merge)
                vocab.append(parts[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": max_length, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
         "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    return len(vocab)


def build(out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    arch = architecture(write_tokenizer(Path(tokenizer_dir)))
    torch.manual_seed(seed)
    model = checkpoint.StableDiffusion(
        unet=UNet2DConditionModel(**arch["unet"]), vae=AutoencoderKL(**arch["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**arch["text_encoder"])),
        tokenizer=None, architecture=arch)
    return checkpoint.save(model, out, dtype="fp32", metadata={"dreampipe.model": "tiny-sd"})
