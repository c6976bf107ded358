"""The diffusion loss of one item, shared by training (train.py) and the toy pretraining (pretrain.py)."""

from __future__ import annotations

import torch


def min_snr_weight(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float,
                   prediction_type: str = "epsilon") -> torch.Tensor:
    """Min-SNR-gamma weighting (Hang et al. 2023) of each item's loss: min(SNR(t), gamma) / SNR(t)
    for noise (epsilon) prediction, min(SNR(t), gamma) / (SNR(t) + 1) for v-prediction, with
    SNR(t) = alphas_cumprod[t] / (1 - alphas_cumprod[t]). The nearly clean timesteps, whose noise
    is hardest to see and least useful to learn, stop dominating the gradient."""
    alphas = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1 - alphas)
    return snr.clamp(max=gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)


def noise_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None,
               item_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-item squared error, in fp32: the mean over each item's elements, or with `weights` (a
    per-pixel weight broadcast over the channels, e.g. a subject mask at latent size) the weighted
    mean sum(w * err) / sum(w), so the loss keeps its scale whatever share of the picture the
    subject covers (an item whose weights are all 0 has loss 0); times `item_weights` (e.g.
    min_snr_weight) when given."""
    err = (pred.float() - target.float()).square()
    if weights is None:
        per_item = err.mean(dim=tuple(range(1, err.dim())))
    else:
        w = weights.float().expand_as(err)
        dims = tuple(range(1, err.dim()))
        per_item = (w * err).sum(dim=dims) / w.sum(dim=dims).clamp(min=torch.finfo(torch.float32).tiny)
    return per_item if item_weights is None else per_item * item_weights
