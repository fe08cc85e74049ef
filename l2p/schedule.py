"""Z-Image's shift flow-match schedule (sampling and training) and the DiT's time convention.

σ = 1 is pure noise, σ = 0 is clean. The scheduler's timestep is T = 1000·σ; the DiT is fed t = 1 − σ
(0 = noise, 1 = clean) and multiplies by t_scale itself.
"""
from __future__ import annotations

import torch


def shift(s: torch.Tensor, shift: float) -> torch.Tensor:
    """The static time shift σ = shift·s / (1 + (shift−1)·s); shift > 1 spends more steps at high noise."""
    return shift * s / (1 + (shift - 1) * s)


def sampling_sigmas(num_steps: int, shift_value: float = 3.0) -> torch.Tensor:
    """`num_steps` shifted sigmas from 1 downwards plus a terminal 0 (float64 → float32, as diffusers)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be ≥ 1, got {num_steps}")
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
    sig = shift(s, shift_value)
    return torch.cat([sig, sig.new_zeros(1)]).float()


def training_sigmas(num_train_steps: int = 500, shift_value: float = 3.0) -> torch.Tensor:
    """The release's training grid: the `num_train_steps` sampling sigmas without the terminal 0."""
    return sampling_sigmas(num_train_steps, shift_value)[:-1]


def sample_training_sigma(batch: int, generator: torch.Generator | None = None, num_train_steps: int = 500,
                          shift_value: float = 3.0) -> torch.Tensor:
    """σ drawn uniformly over the indices of the training grid (mean ≈ 0.68 at shift 3), shape (batch,)."""
    grid = training_sigmas(num_train_steps, shift_value)
    idx = torch.randint(0, num_train_steps, (batch,), generator=generator)
    return grid[idx]


def dit_time(sigma: torch.Tensor) -> torch.Tensor:
    """What the DiT is fed: t = 1 − σ."""
    return 1.0 - sigma
