"""`dreampipe prune` beside the 10-line script a user would write, on a fat checkpoint: seconds
and peak resident memory (VmHWM) of each, in fresh processes, the file in the page cache.

    PYTHONPATH=workflow python bench/prune_memory.py [--size sd1|small] [--repeat 2] [--dir /tmp]

sd1: an SD 1.x Lightning-style .ckpt with fp32 weights and a flattened EMA copy of the UNet
(7.7 GB on disk, as sd-v1-4-full-ema.ckpt; 8 GB of RAM to build it, 10 GB of disk).
small: the tiny model plus 16 UNet-prefixed 26 MB tensors and their EMA copies (0.85 GB), as in
tests/test_checkpoint.py. Goal (issue 15): no slower than the script, peak under 4 GB at sd1.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from dreampipe import checkpoint, tiny

NAIVE = """
import torch
from safetensors.torch import save_file
sd = torch.load(SRC, mmap=True, weights_only=True, map_location="cpu")["state_dict"]
keep = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")
save_file({k: v.half() for k, v in sd.items() if k.startswith(keep)}, OUT)
"""
OURS = """
from dreampipe import cli
assert cli.main(["prune", SRC, OUT]) == 0
"""
PEAK = "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"


def sd1_weights() -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    arch = checkpoint.sd1_architecture()
    with torch.device("meta"):
        model = checkpoint.StableDiffusion(UNet2DConditionModel(**arch["unet"]), AutoencoderKL(**arch["vae"]),
                                           CLIPTextModel(CLIPTextConfig(**arch["text_encoder"])), None, arch)
    return {k: torch.empty(v.shape, dtype=v.dtype).fill_(0.01 if v.is_floating_point() else 1)
            for k, v in checkpoint.to_ldm(model).items()}


def small_weights(folder: Path) -> tuple[dict, dict]:
    sd, meta = checkpoint.read_state_dict(tiny.build(folder / "tiny.safetensors", folder / "tokenizer"))
    sd = {k: v.clone() for k, v in sd.items()}
    sd.update({f"{checkpoint.UNET_PREFIX}extra.{i}.weight": torch.full((2560, 2560), float(i)) for i in range(16)})
    return sd, meta


def build(size: str, folder: Path) -> Path:
    sd, meta = sd1_weights(), {}
    if size == "small":
        sd, meta = small_weights(folder)
    ema = {"model_ema." + "".join(k.split(".")[1:]): v.clone() for k, v in sd.items()
           if k.startswith(checkpoint.UNET_PREFIX)}
    path = folder / f"fat-{size}.ckpt"
    torch.save({"state_dict": {**sd, **ema, "model_ema.decay": torch.tensor(0.9999)}, "metadata": meta,
                "global_step": 470000, "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-6}]}]}, path)
    return path


def measure(code: str, src: Path, out: Path) -> tuple[float, float]:
    """(seconds, peak GB) of `code` in a fresh Python, the source file read into the page cache first."""
    with open(src, "rb") as f:
        while f.read(1 << 26):
            pass
    out.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "workflow")}
    script = f"SRC, OUT = {str(src)!r}, {str(out)!r}\nimport time\nt = time.perf_counter()\n{code}\n" \
             f"print(time.perf_counter() - t)\n{PEAK}"
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr[-3000:])
    seconds, peak_kb = r.stdout.split()[-2:]
    return float(seconds), int(peak_kb) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["sd1", "small"], default="sd1")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the fat file is written")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        src = build(a.size, Path(tmp))
        print(f"{src.name}: {src.stat().st_size / 1e9:.2f} GB; seconds (time in the process, after imports) "
              f"and peak resident GB, best/worst of {a.repeat}")
        results = {"naive script": [], "dreampipe prune": []}
        for _ in range(a.repeat):  # alternate, so that neither always runs on a quieter machine
            for name, code in (("naive script", NAIVE), ("dreampipe prune", OURS)):
                results[name].append(measure(code, src, Path(tmp) / "out.safetensors"))
        for name, runs in results.items():
            print(f"{name:16s} {min(s for s, _ in runs):6.1f} s  {max(g for _, g in runs):5.2f} GB peak")


if __name__ == "__main__":
    main()
