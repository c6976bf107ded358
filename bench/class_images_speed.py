"""Class images/s on a GPU: 512 px, 50 DDIM steps, CFG 10, SD 1.x-size random weights, through
sampling.generate after speed.prepare_sampling (bf16, channels-last, compiled UNet), batch 16.
Run beside ../shared/bench/diffusers_recipe.py T in the same call.

    python bench/class_images_speed.py

Also checks that images 0-3 match the eager path (batch 4, not compiled) up to bf16 noise.
Results: printed, and $OUT/class-images.json.
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import FLOP_IMG, random_sd1, save  # noqa: E402

from dreampipe import sampling, speed  # noqa: E402


def attention_backends() -> dict:
    """ms per SDPA call at SD 1.x's 64x64 self-attention shape (CFG batch 32, 8 heads of 40)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    q, k, v = (torch.randn(32, 8, 4096, 40, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = {}
    for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel([b]):
                out[b.name] = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), return_mode="median")
        except RuntimeError as e:
            out[b.name] = str(e).splitlines()[0]
    return out


def main(batch: int = 16, repeats: int = 2):
    attention = attention_backends()
    print("attention ms", attention, flush=True)
    model = random_sd1().to(dtype=torch.bfloat16)
    prompt = "a photo of a dog"

    def make(seeds):
        return sampling.generate(model, [prompt] * len(seeds), seeds, resolution=512, steps=50, guidance_scale=10.0)

    with torch.no_grad():
        eager = make([0, 1, 2, 3])
        speed.prepare_sampling(model, "cuda")
        t0 = time.perf_counter()
        make(list(range(batch)))  # compile + warm-up
        compile_s = time.perf_counter() - t0
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for r in range(repeats):
            fast = make(list(range(batch)))
        sec = (time.perf_counter() - t0) / repeats
    a = np.stack([np.asarray(im, dtype=np.float32) for im in eager])
    b = np.stack([np.asarray(im, dtype=np.float32) for im in fast[:4]])
    save("class-images", {
        "batch": batch, "img_s": batch / sec, "s_per_img": sec / batch, "tflops": FLOP_IMG * batch / sec / 1e12,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "compile_and_first_batch_s": compile_s,
        "vs_eager_mean_abs_diff_of_255": float(np.abs(a - b).mean()),
        "vs_eager_rel_l2": float(np.linalg.norm(a - b) / np.linalg.norm(a - 127.5)),
        "eager_image_std_of_255": float(a.std()), "sdpa_ms_32x8x4096x40": attention})


if __name__ == "__main__":
    main()
