"""The flow-matching path and loss in the release's sign convention.

x_σ = (1−σ)·x0 + σ·ε; velocity v = ε − x0; the DiT's raw output is ≈ x0 − ε, so v = −out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _b(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample σ of shape (B,) against a (B, ...) tensor."""
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    return sigma.reshape(-1, *([1] * (like.ndim - 1))) if sigma.ndim else sigma


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_σ = (1−σ)·x0 + σ·ε."""
    s = _b(sigma, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The training target v* = ε − x0."""
    return noise - x0


def velocity_from_output(raw: torch.Tensor) -> torch.Tensor:
    """The DiT predicts x0 − ε; pipelines negate it."""
    return -raw


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0̂ = x_σ − σ·v."""
    return x_t - _b(sigma, x_t) * v


def noise_from_velocity(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """ε̂ = x_σ + (1−σ)·v."""
    return x_t + (1 - _b(sigma, x_t)) * v


def flow_matching_loss(raw: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Plain MSE between −DiT(x_σ) and ε − x0, in float32 (the release's unweighted loss)."""
    return F.mse_loss(velocity_from_output(raw).float(), velocity_target(x0, noise).float())


def latent_matching_loss(raw: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor,
                         encoder) -> torch.Tensor:
    """MSE between a frozen encoder's latents of the one-step x̂0 and of x0 (an option; not in the release).

    Pixel MSE weighs every pixel alike, so the outline that tells a small circle from a square costs little;
    a VAE encoder's latents weigh what its decoder needs to draw the image. Gradients reach the model
    through x̂0 = x_σ − σ·v̂; the encoder's own weights should be frozen.
    """
    x0_hat = x0_from_velocity(x_t.float(), velocity_from_output(raw).float(), sigma)
    with torch.no_grad():
        target = encoder(x0.float())
    z = encoder(x0_hat)
    if x0_hat.requires_grad and not z.requires_grad:
        raise ValueError("the latent encoder cuts the gradient to x̂0 (does it run under torch.no_grad?)")
    return F.mse_loss(z.float(), target.float())
