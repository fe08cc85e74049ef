"""Euler sampling of the flow ODE with classifier-free guidance and a per-step callback.

Guidance follows the L2P/DiffSynth release: v = v_neg + c·(v_pos − v_neg), skipped at c = 1.
diffusers' Z-Image pipeline writes v = v_pos + g·(v_pos − v_neg), so `cfg_scale = c` is
`guidance_scale = c − 1` there (the recommended c = 2.0 is g = 1.0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from .flow import x0_from_velocity


@dataclass
class StepInfo:
    """What a callback sees after each step: the state before the step and what the model predicted."""

    step: int
    num_steps: int
    sigma: float
    sigma_next: float
    x_t: torch.Tensor  # the noisy sample at σ
    x0: torch.Tensor  # predicted clean sample x_t − σ·v
    velocity: torch.Tensor  # guided velocity ε − x0
    x_next: torch.Tensor  # the sample after the Euler step


def guide(v_pos: torch.Tensor, v_neg: Optional[torch.Tensor], cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance in the release's convention."""
    if v_neg is None or cfg_scale == 1.0:
        return v_pos
    return v_neg + cfg_scale * (v_pos - v_neg)


def euler_sample(velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                 sigmas: torch.Tensor, callback: Optional[Callable[[StepInfo], None]] = None,
                 progress: bool = False, start: int = 0) -> torch.Tensor:
    """Integrate x from sigmas[start] to sigmas[-1]: x ← x + (σ_next − σ)·v(x, σ). State stays float32."""
    x = x.float()
    n = len(sigmas) - 1
    for i in tqdm(range(start, n), disable=not progress, desc="sampling"):
        s, s_next = sigmas[i], sigmas[i + 1]
        v = velocity_fn(x, s.expand(x.shape[0])).float()
        x_next = x + (s_next - s) * v
        if callback is not None:
            callback(StepInfo(i, n, float(s), float(s_next), x, x0_from_velocity(x, v, s), v, x_next))
        x = x_next
    return x
