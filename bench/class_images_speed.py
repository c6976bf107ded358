"""Class images/s: 50 DDIM steps, CFG 10, random weights, through sampling.generate after
speed.prepare_sampling (bf16, channels-last, the UNet compiled as --compile says), SD 1.x size at
512 px on a GPU (or the tiny demo size on the CPU, `--size tiny`, as the tests run it).
Run beside ../shared/bench/diffusers_recipe.py T in the same call.

    python bench/class_images_speed.py [--compile blocks|unet|false] [--batch 16] [--batches 3]
                                       [--sampler ddim|dpmsolver++] [--steps 50] [--cudnn-benchmark]
                                       [--layout channels-last] [--profile N]

--layout channels-last: the networks in that memory format whatever prepare_sampling chose (eager
sampling is NCHW); --profile N prints the N GPU kernels that take the most time over one batch
(torch.profiler) and where the time goes by kind.

Reports the seconds to the end of the first batch (compile included), then img/s over the other
batches, how far images 0-3 are from the eager path, and the milliseconds to encode one of the
first batch's images as PNG (what the class-images job's writer threads do beside sampling).
Results: printed, and $OUT/class-images-<compile>[-cudnn][-channels-last].json.
"""

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import FLOP_IMG, RESOLUTION, device, peak_gib, random_sd1, save, synchronize  # noqa: E402

from dreampipe import sampling, speed  # noqa: E402


def profile(make, seeds, rows: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        make(seeds)
        synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events)
    kinds = {}
    for e in events:
        name = e.key.lower()
        kind = next((k for k, words in (("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_generated")),
                                        ("gemm/conv", ("gemm", "conv", "xmma", "sm90", "cutlass", "implicit", "dgrad")),
                                        ("norm", ("norm", "welford")), ("elementwise", ("elementwise", "vectorized")))
                     if any(w in name for w in words)), "other")
        kinds[kind] = kinds.get(kind, 0) + e.device_time_total
    print("profile: GPU time by kind:", {k: f"{v / total:.1%}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])})
    for e in sorted(events, key=lambda e: -e.device_time_total)[:rows]:
        print(f"profile: {e.device_time_total / total:6.1%} {e.count:6d}x  {e.key[:150]}")


def main(size: str, compile: str, batch: int, batches: int, steps: int, sampler: str, cudnn_benchmark: bool,
         layout: str | None = None, profile_rows: int = 0):
    torch.backends.cudnn.benchmark = cudnn_benchmark  # cuDNN times its conv algorithms per shape, once
    dev = device()
    model = random_sd1(size=size).to(dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
    res = RESOLUTION[size]

    def make(seeds):
        return sampling.generate(model, ["a photo of a dog"] * len(seeds), seeds, resolution=res, steps=steps,
                                 guidance_scale=10.0, sampler=sampler)

    eager = make([0, 1, 2, 3])
    speed.prepare_sampling(model, dev, scope=None if compile == "false" else compile)
    if layout:
        model.unet.to(memory_format=torch.channels_last)
        model.vae.to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    first = make(list(range(batch)))
    synchronize()
    first_s = time.perf_counter() - t0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for r in range(1, batches):
        make(list(range(r * batch, (r + 1) * batch)))
    synchronize()
    sec = (time.perf_counter() - t0) / max(1, batches - 1)
    if profile_rows and dev == "cuda":
        profile(make, list(range(batch)), profile_rows)
    t0 = time.perf_counter()
    for image in first:
        image.save(io.BytesIO(), format="PNG")
    png_ms = (time.perf_counter() - t0) / len(first) * 1000
    n = min(4, batch)
    a = np.stack([np.asarray(im, dtype=np.float32) for im in eager[:n]])
    b = np.stack([np.asarray(im, dtype=np.float32) for im in first[:n]])
    name = f"class-images-{compile}{'-cudnn' if cudnn_benchmark else ''}{'-channels-last' if layout else ''}"
    save(name, {
        "size": size, "compile": compile, "cudnn_benchmark": cudnn_benchmark,
        "channels_last": model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last),
        "batch": batch, "sampler": sampler,
        "steps": steps, "img_s": batch / sec, "first_batch_s": first_s, "png_ms": png_ms, "peak_gib": peak_gib(),
        "tflops": FLOP_IMG * batch / sec / 1e12 if size == "sd1" and steps == 50 and sampler == "ddim" else None,
        "vs_eager_mean_abs_diff_of_255": float(np.abs(a - b).mean())})


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["sd1", "tiny"], default="sd1")
    p.add_argument("--compile", choices=["blocks", "unet", "false"], default="blocks")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=3, help="the first one includes the compile")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", choices=["ddim", "dpmsolver++"], default="ddim",
                   help="the class images' default is dpmsolver++ at 25 steps")
    p.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its convolution algorithms")
    p.add_argument("--layout", choices=["channels-last"], help="the networks in this memory format")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="print the N kernels taking most GPU time")
    a = p.parse_args()
    with torch.no_grad():
        main(a.size, a.compile, a.batch, a.batches, a.steps, a.sampler, a.cudnn_benchmark, a.layout, a.profile)
