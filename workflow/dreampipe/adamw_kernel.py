"""AdamWBF16's update (speed.adamw_sr_) as one hand-written Triton kernel.

The same formula and the same random bits as speed.adamw_sr_, but compiled by Triton alone in about
a second, where torch.compile of the same function takes about 20 s with cold caches (tracing,
graph lowering, code generation), which was most of the time before a first CUDA training step.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _hash(x):
    # speed._hash: lowbias32 on int32 (products wrap; >> is arithmetic, hence the masks)
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * -2073254261
    return x ^ ((x >> 16) & 0xFFFF)


@triton.jit
def _round_stochastic(x, bits):
    return ((x.to(tl.int32, bitcast=True) + bits) & -65536).to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def _adamw_sr(p_ptr, g_ptr, m_ptr, v_ptr, lr_ptr, step_ptr, offset_ptr, n, seed, beta1, beta2,
              log2_beta1, log2_beta2, eps, weight_decay, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    lr = tl.load(lr_ptr)
    step = tl.load(step_ptr)
    g = tl.load(g_ptr + i, mask=inside).to(tl.float32)
    m = tl.load(m_ptr + i, mask=inside).to(tl.float32) * beta1 + g * (1 - beta1)
    v = tl.load(v_ptr + i, mask=inside).to(tl.float32) * beta2 + g * g * (1 - beta2)
    correction1 = 1 - tl.exp2(step * log2_beta1)  # 1 - beta1 ** step
    correction2 = 1 - tl.exp2(step * log2_beta2)
    update = tl.div_rn(tl.div_rn(m, correction1), tl.sqrt_rn(tl.div_rn(v, correction2)) + eps)
    p = tl.load(p_ptr + i, mask=inside).to(tl.float32) * (1 - lr * weight_decay) - lr * update
    key = _hash(step.to(tl.int32) * -1640531535 + seed)
    bits = _hash((i + tl.load(offset_ptr)) * -1640531535 ^ key)
    tl.store(p_ptr + i, _round_stochastic(p, bits & 0xFFFF), mask=inside)
    tl.store(v_ptr + i, _round_stochastic(v, (bits >> 16) & 0xFFFF), mask=inside)
    tl.store(m_ptr + i, m.to(tl.bfloat16, fp_downcast_rounding="rtne"), mask=inside)


def adamw_sr_(p, g, m, v, lr, step, seed: int, offset, beta1: float, beta2: float, eps: float,
              weight_decay: float) -> None:
    """speed.adamw_sr_ (same arguments) on CUDA tensors: p, m, v flat bf16, g flat."""
    n = p.numel()
    _adamw_sr[(triton.cdiv(n, BLOCK),)](
        p, g, m, v, lr, step, offset, n, seed, beta1, beta2, math.log2(beta1),
        math.log2(beta2), eps, weight_decay, BLOCK=BLOCK, num_warps=8)

