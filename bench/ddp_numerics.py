"""How close DDP of two GPUs can land to one GPU of the same global batch, emulated on the CPU.

    PYTHONPATH=workflow python bench/ddp_numerics.py [--steps 3] [--noise 0.002 0.004]

The tiny model trains as on a GPU: bf16 UNet weights, AdamWBF16 (stochastic rounding), the UNet
called in bf16 without autocast (as GraphedUNet does), max_steps at lr 1e-4 (tests' settings).
Each run's trained UNet is measured against two of them, as a share of the distance the first
moved from the base (cast to bf16, where training starts):
  a  one process at batch 2 (the global batch of two ranks at batch 1);
  b  batch 1 with 2 accumulation steps: DDP's arithmetic (each half-batch's gradient rounded to
     bf16, then their mean rounded once), the same global batch;
  a, b with noise: the same, each bf16 gradient x (1 + N(0, noise)) (GPU kernels are not
     deterministic: atomic adds in the backward), for each --noise;
  wrong batch: one process at batch 1; one rank: only rank 0's items (the other rank's gradients lost).
With --fp32 the same runs train as on the CPU (fp32, torch AdamW) for comparison.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from dreampipe import checkpoint, config, speed, tiny, train

UNET = checkpoint.UNET_PREFIX


def gpu_numerics_on_the_cpu() -> None:
    """bf16 weights, AdamWBF16 and the bf16 UNet call of the GPU path, on the CPU."""
    speed.bf16_weights = lambda settings, device: True

    def prepare_training(model, settings, device):
        model.unet.to(dtype=torch.bfloat16)

        def call(sample, timesteps, context):
            bf16 = torch.bfloat16
            return model.unet(sample.to(bf16), timesteps, encoder_hidden_states=context.to(bf16)).sample
        return call

    speed.prepare_training = prepare_training


def perturb_gradients(noise: float):
    """Every bf16 gradient x (1 + N(0, noise)) before the optimizer step, from a fixed stream; the
    unperturbed step, to put back."""
    step, g = speed.AdamWBF16.step, torch.Generator().manual_seed(1)

    def noisy(self, closure):
        def backward_then_noise():  # Lightning's closure runs the step's backward and clipping
            loss = closure()
            for flat in self._flat:
                flat["grad"].copy_(flat["grad"].float() * (1 + noise * torch.randn(flat["grad"].shape, generator=g)))
            return loss
        return step(self, backward_then_noise)

    speed.AdamWBF16.step = noisy
    return step


def one_rank_only():
    """The items of rank 0 of two: the other rank's half of each global batch is never seen (DDP
    that averages no gradient, as before the fix of issue 20); the class to put back."""
    indices = train.StepIndices

    class RankZero(indices):
        def __init__(self, settings, instance_counts, class_counts, start, total, rank=0, world_size=1):
            super().__init__(settings, instance_counts, class_counts, start, total, rank=0, world_size=2)

    train.StepIndices = RankZero
    return indices


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--noise", type=float, nargs="*", default=[0.002, 0.004])
    p.add_argument("--fp32", action="store_true", help="train as on the CPU (fp32, torch AdamW)")
    args = p.parse_args()
    torch.set_num_threads(1)
    if not args.fp32:
        gpu_numerics_on_the_cpu()
    root = Path(tempfile.mkdtemp(prefix="ddp-numerics-"))
    model = tiny.build(root / "tiny.safetensors", root / "tokenizer")
    instance = root / "instance"
    instance.mkdir()
    rng = np.random.default_rng(0)  # as tests/test_gpu.py's instance_folder: 3 random images
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(instance / f"{i}.png")
    (instance / "manifest.json").write_text(json.dumps(
        [{"file": f"{i}.png", "caption": "a photo of zxq robot"} for i in range(3)]))
    base_settings = {**config.defaults()["train"], "resolution": 64, "max_steps": args.steps, "learning_rate": 1e-4,
                     "sample_every_n_steps": 0, "sample_steps": 2, "sample_prompts": ["a photo of zxq robot"],
                     "sample_seeds": [0], "save_state_every_n_steps": 0, "save_state_every_n_minutes": 0}

    def run(name, **overrides):
        folder = root / name
        out = train.run(model, root / "tokenizer", [(instance, None)], {**base_settings, **overrides},
                        folder / ".state", folder / "train", folder / "model.safetensors")
        weights = {k: v for k, v in load_file(out).items() if k.startswith(UNET)}
        assert {v.dtype for v in weights.values()} == {torch.float32 if args.fp32 else torch.bfloat16}
        return {k: v.float() for k, v in weights.items()}

    trained = {"a": run("a", batch_size=2), "b": run("b", batch_size=1, gradient_accumulation_steps=2),
               "wrong batch": run("wrong", batch_size=1)}
    indices = one_rank_only()
    trained["one rank"] = run("rank0", batch_size=1)
    train.StepIndices = indices
    if not args.fp32:
        for noise in args.noise:
            step = perturb_gradients(noise)
            trained[f"a, noise {noise:g}"] = run(f"a{noise:g}", batch_size=2)
            trained[f"b, noise {noise:g}"] = run(f"b{noise:g}", batch_size=1, gradient_accumulation_steps=2)
            speed.AdamWBF16.step = step
    dtype = torch.float32 if args.fp32 else torch.bfloat16
    base = {k: v.to(dtype).float() for k, v in load_file(model).items() if k.startswith(UNET)}

    def distance(x, y):
        return float(sum((x[k] - y[k]).norm() ** 2 for k in x)) ** 0.5

    moved = distance(trained["a"], base)
    print(f"ddp-numerics ({'fp32, torch AdamW' if args.fp32 else 'bf16 weights, AdamWBF16'}, {args.steps} steps): "
          f"distances as shares of the distance `a` moved from the base ({moved:.4g})")
    print("| run | to a (batch 2) | to b (batch 1 x 2 accumulated: DDP's arithmetic) |\n|---|---|---|")
    for name, weights in trained.items():
        to_a, to_b = (distance(weights, trained[ref]) / moved for ref in ("a", "b"))
        print(f"| {name} | {to_a:.3f} | {to_b:.3f} |")
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
