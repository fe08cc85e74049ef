"""Sampling the flow ODE (Euler, as the release, or Heun) with classifier-free guidance and a per-step callback.

Guidance follows the L2P/DiffSynth release: v = v_neg + c·(v_pos − v_neg), skipped at c = 1.
diffusers' Z-Image pipeline writes v = v_pos + g·(v_pos − v_neg), so `cfg_scale = c` is
`guidance_scale = c − 1` there (the recommended c = 2.0 is g = 1.0).

Two options that the release does not use, both off by default:
- a guidance interval (Kynkäänniemi et al. 2024): guide only for σ in [lo, hi]. Z-Image's
  `cfg_truncation = τ` (no guidance once the progress 1 − σ passes τ) is the interval [1 − τ, 1];
- a norm cap, Z-Image's `cfg_normalization = k`: each sample's guided velocity is scaled down to at most
  k × the norm of its conditional velocity.

`heun_sample` is the second-order alternative (EDM's Heun; diffusers' FlowMatchHeunDiscreteScheduler): it
averages the velocity at both ends of each step, 2n − 1 model calls for n steps (the last step, to σ = 0, stays
Euler), so compare it with Euler at about twice the steps.
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


def guide(v_pos: torch.Tensor, v_neg: Optional[torch.Tensor], cfg_scale: float,
          norm_cap: Optional[float] = None) -> torch.Tensor:
    """Classifier-free guidance in the release's convention, optionally norm-capped per sample."""
    if v_neg is None or cfg_scale == 1.0:
        return v_pos
    v = v_neg + cfg_scale * (v_pos - v_neg)
    if norm_cap is not None:
        dims = tuple(range(1, v.ndim))
        limit = norm_cap * torch.linalg.vector_norm(v_pos, dim=dims, keepdim=True)
        norm = torch.linalg.vector_norm(v, dim=dims, keepdim=True)
        v = v * torch.where(norm > limit, limit / norm.clamp_min(1e-12), torch.ones_like(norm))
    return v


def guided_at(sigma: float, interval: Optional[tuple[float, float]]) -> bool:
    """Whether guidance applies at σ: always without an interval, else lo ≤ σ ≤ hi."""
    if interval is None:
        return True
    lo, hi = interval
    if not 0.0 <= lo <= hi:
        raise ValueError(f"cfg_interval {interval!r}: want 0 <= lo <= hi")
    return lo <= sigma <= hi


VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _integrate(velocity_fn: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor, callback, progress: bool,
               start: int, heun: bool) -> torch.Tensor:
    """The loop both solvers share: an Euler step, then (Heun) the trapezoid correction where σ_next > 0."""
    x = x.float()
    n = len(sigmas) - 1
    for i in tqdm(range(start, n), disable=not progress, desc="sampling"):
        s, s_next = sigmas[i], sigmas[i + 1]
        v = velocity_fn(x, s.expand(x.shape[0])).float()
        x_next = x + (s_next - s) * v
        if heun and float(s_next) > 0:
            v2 = velocity_fn(x_next, s_next.expand(x.shape[0])).float()
            x_next = x + (s_next - s) * 0.5 * (v + v2)
        if callback is not None:
            callback(StepInfo(i, n, float(s), float(s_next), x, x0_from_velocity(x, v, s), v, x_next))
        x = x_next
    return x


def euler_sample(velocity_fn: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor,
                 callback: Optional[Callable[[StepInfo], None]] = None, progress: bool = False,
                 start: int = 0) -> torch.Tensor:
    """Integrate x from sigmas[start] to sigmas[-1]: x ← x + (σ_next − σ)·v(x, σ). State stays float32."""
    return _integrate(velocity_fn, x, sigmas, callback, progress, start, heun=False)


def heun_sample(velocity_fn: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor,
                callback: Optional[Callable[[StepInfo], None]] = None, progress: bool = False,
                start: int = 0) -> torch.Tensor:
    """Like `euler_sample`, with a trapezoid correction: x ← x + (σ_next − σ)·(v(x, σ) + v(x̃, σ_next)) / 2.

    The callback sees the first velocity (and its x0) and the corrected x_next. A step to σ = 0 stays Euler:
    the velocity there is undefined for a flow model trained on σ > 0, and the correction would cost a call.
    """
    return _integrate(velocity_fn, x, sigmas, callback, progress, start, heun=True)


SOLVERS = {"euler": euler_sample, "heun": heun_sample}


def get_solver(name: str):
    """The sampling function called `name` ("euler" or "heun")."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; known: {sorted(SOLVERS)}")
    return SOLVERS[name]
