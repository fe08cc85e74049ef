"""Two-stage handoff sampling: the latent model lays out the image, the pixel model finishes it.

The latent model integrates from pure noise down to σ_h on the shared shift schedule (σ_h is inserted
into the grid when it is not on it), predicts x0 there, which the VAE decodes to pixels; the pixel model
re-noises that to σ_h with seeded noise, x = (1−σ_h)·x0_pix + σ_h·ε, and finishes the remaining grid.
ε is the pixel pipeline's own initial noise for the seed, so σ_h = 1 *is* pure pixel sampling and σ_h = 0
*is* pure latent sampling + VAE decode, bit for bit (tests/test_trajectory.py checks both).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import pandas as pd
import torch

from .flow import add_noise, x0_from_velocity
from .pipeline import FlowPipeline, LatentPipeline, round_size
from .sampler import euler_sample
from .schedule import sampling_sigmas


def split_schedule(sigmas: torch.Tensor, sigma_h: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent sigmas from sigmas[0] down to σ_h, pixel sigmas from σ_h down to 0); both contain σ_h."""
    if not 0.0 <= sigma_h <= 1.0:
        raise ValueError(f"sigma_h must be in [0, 1], got {sigma_h}")
    s_h = sigmas.new_tensor([sigma_h])
    return torch.cat([sigmas[sigmas > s_h], s_h]), torch.cat([s_h, sigmas[sigmas < s_h]])


@dataclass
class HandoffResult:
    """Handoff samples with what the latent stage handed over and where the time went."""

    images: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    handoff: Optional[torch.Tensor]  # (B, 3, H, W) the latent stage's decoded x0 at σ_h (None at σ_h = 1)
    sigma_h: float
    latent_steps: int
    pixel_steps: int
    latent_seconds: float  # latent steps, the x0 evaluation at σ_h and the VAE decode
    pixel_seconds: float

    @property
    def seconds(self) -> float:
        return self.latent_seconds + self.pixel_seconds


@torch.no_grad()
def handoff_sample(latent_pipe: LatentPipeline, pixel_pipe: FlowPipeline, prompt: Union[str, Sequence[str]],
                   sigma_h: float, seed: int = 0, num_inference_steps: int = 8, cfg_scale: float = 1.0,
                   shift: float = 3.0, height: int = 64, width: int = 64, negative_prompt: str = "",
                   noise_seed: Optional[int] = None, callback: Optional[Callable[[str, object], None]] = None,
                   pixel_cfg_scale: Optional[float] = None) -> HandoffResult:
    """Latent model down to σ_h, decode its x0, re-noise in pixels, pixel model from σ_h to 0.

    `noise_seed` (default: `seed`) seeds the pixel re-noising ε; `pixel_cfg_scale` (default: `cfg_scale`)
    guides the pixel stage, since each model may sample best at its own scale; `callback(stage, StepInfo)`
    sees every step of both stages ("latent" then "pixel").
    """
    pixel_cfg = cfg_scale if pixel_cfg_scale is None else pixel_cfg_scale
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    n = len(prompts)
    height, width = round_size(height, width)
    lat_sig, pix_sig = split_schedule(sampling_sigmas(num_inference_steps, shift), float(sigma_h))
    stage_cb = (lambda stage: (lambda info: callback(stage, info))) if callback else (lambda stage: None)

    t0 = time.perf_counter()
    handoff = None
    if len(lat_sig) > 1:  # σ_h < 1: the latent model has steps to take
        pipe = latent_pipe
        caps = pipe.encode(prompts)
        neg = pipe.encode([negative_prompt] * n) if cfg_scale != 1.0 else None
        fn = pipe.velocity_fn(caps, neg, cfg_scale)
        z = euler_sample(fn, pipe.initial_noise(n, height, width, seed), lat_sig.to(pipe.device), stage_cb("latent"))
        if sigma_h > 0:  # one more evaluation: the latent model's own x0 at σ_h, not the last step's stale one
            s_h = lat_sig[-1:].to(pipe.device).expand(n)
            z = x0_from_velocity(z, fn(z, s_h).float(), s_h)
        handoff = pipe.to_pixels(z).float()
    t1 = time.perf_counter()

    pipe = pixel_pipe
    if sigma_h == 0:  # nothing left to denoise: the decoded latent sample is the answer
        x = handoff.to(pipe.device)
    else:
        eps = pipe.initial_noise(n, height, width, seed if noise_seed is None else noise_seed)
        x = eps if handoff is None else add_noise(handoff.to(pipe.device), eps, lat_sig[-1:].to(pipe.device))
    if len(pix_sig) > 1:
        caps = pipe.encode(prompts)
        neg = pipe.encode([negative_prompt] * n) if pixel_cfg != 1.0 else None
        x = euler_sample(pipe.velocity_fn(caps, neg, pixel_cfg), x, pix_sig.to(pipe.device), stage_cb("pixel"))
    images = pipe.to_pixels(x).float()
    t2 = time.perf_counter()
    return HandoffResult(images, handoff, float(sigma_h), len(lat_sig) - 1, len(pix_sig) - 1, t1 - t0, t2 - t1)


# ----------------------------------------------------------------------------------------------
#                                           Sweeps
# ----------------------------------------------------------------------------------------------

def ground_truth(prompts: Sequence, size: int = 64) -> torch.Tensor:
    """Procedural renders of toy `Prompt`s' scenes, (N, 3, size, size) in [-1, 1]."""
    import numpy as np

    from .toyworld.scenes import render, to_tensor

    return to_tensor(np.stack([render(p.scene, size) for p in prompts]))


def score_images(world, images: torch.Tensor, prompts: Sequence) -> dict:
    """ToyWorld.evaluate's scoring of given images: toy-GenEval, toy-FID and spectral distance vs the renders."""
    from .metrics import high_frequency_energy_ratio, spectral_fidelity, toy_fid
    from .toyworld.evaluator import Evaluator

    ref = ground_truth(prompts, images.shape[-1])
    summary = Evaluator.summary(world.evaluator.score(images, prompts))
    return {"geneval": float(summary.loc["overall", "accuracy"]), "fid": toy_fid(images, ref, world.evaluator),
            "spectral": spectral_fidelity(images, ref), "hf_ratio": high_frequency_energy_ratio(images, ref)}


def run_sweep(latent_pipe: LatentPipeline, pixel_pipe: FlowPipeline, sigmas: Sequence[float], prompts: Sequence[str],
              seed: int = 0, steps: int = 8, cfg_scale: float = 1.0, shift: float = 3.0, height: int = 64,
              width: int = 64, batch_size: int = 64, score_fn: Optional[Callable[[torch.Tensor], dict]] = None,
              warmup: bool = True, pixel_cfg_scale: Optional[float] = None
              ) -> tuple[pd.DataFrame, dict[float, torch.Tensor]]:
    """Handoff samples of every prompt at every σ_h, timed (and scored by `score_fn(images)` when given).

    Batch k of the prompts uses seed + k, as `ToyWorld.evaluate` does, so σ_h = 0 and 1 reproduce its samples.
    """
    kw = dict(num_inference_steps=steps, cfg_scale=cfg_scale, shift=shift, height=height, width=width,
              pixel_cfg_scale=pixel_cfg_scale)
    if warmup:  # the first call pays for lazy initialisation; keep that out of the timings
        handoff_sample(latent_pipe, pixel_pipe, prompts[:1], 0.5, seed, **{**kw, "num_inference_steps": 1})
    rows, images = [], {}
    for s_h in sigmas:
        parts, lat_t, pix_t, res = [], 0.0, 0.0, None
        for k in range(0, len(prompts), batch_size):
            res = handoff_sample(latent_pipe, pixel_pipe, list(prompts[k : k + batch_size]), s_h, seed + k, **kw)
            parts.append(res.images.cpu())
            lat_t, pix_t = lat_t + res.latent_seconds, pix_t + res.pixel_seconds
        gen = torch.cat(parts)
        images[float(s_h)] = gen
        row = {"sigma_h": float(s_h), "latent_steps": res.latent_steps, "pixel_steps": res.pixel_steps,
               "latent_seconds": lat_t, "pixel_seconds": pix_t, "seconds": lat_t + pix_t,
               "ms_per_image": 1000 * (lat_t + pix_t) / len(prompts)}
        if score_fn is not None:
            row.update(score_fn(gen))
        rows.append(row)
    return pd.DataFrame(rows), images


def handoff_sweep(world, pixel_model, sigmas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), prompts=None,
                  seed: int = 0, steps: Optional[int] = None, cfg_scale: Optional[float] = None, shift: float = 3.0,
                  batch_size: int = 64, latent_model=None, return_images: bool = False,
                  pixel_cfg_scale: Optional[float] = None):
    """Toy-world sweep over σ_h: toy-GenEval, toy-FID, spectral distance and wall time per σ_h.

    `prompts`: `Prompt`s, a count, or None for the world's evaluation set. Defaults (steps, cfg) are the
    world's, so σ_h = 0 / 1 score like `ToyWorld.evaluate` on the latent / pixel pipelines (at `cfg_scale` /
    `pixel_cfg_scale`, which defaults to `cfg_scale`).
    """
    if prompts is None or isinstance(prompts, int):
        prompts = world.prompts(prompts)
    prompts = list(prompts)
    df, images = run_sweep(world.latent_pipeline(latent_model), world.pixel_pipeline(pixel_model), sigmas,
                           [p.text for p in prompts], seed, steps or world.sample_steps,
                           cfg_scale or world.cfg_scale, shift, world.image_size, world.image_size, batch_size,
                           score_fn=lambda gen: score_images(world, gen, prompts), pixel_cfg_scale=pixel_cfg_scale)
    return (df, images) if return_images else df


def sweep_figure(df: pd.DataFrame, metrics: Sequence[str] = ("geneval", "fid", "spectral", "ms_per_image"),
                 title: str = "two-stage handoff: latent model to σ_h, pixel model from σ_h"):
    """One panel per metric against σ_h (σ_h = 0: pure latent + VAE, 1: pure pixel)."""
    from matplotlib.figure import Figure

    names = {"geneval": "toy-GenEval ↑", "fid": "toy-FID ↓", "spectral": "spectral distance ↓",
             "hf_ratio": "HF energy / ground truth", "ms_per_image": "wall time (ms / image)"}
    metrics = [m for m in metrics if m in df]
    fig = Figure(figsize=(3.2 * len(metrics), 2.9), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, m in zip(axes, metrics):
        ax.plot(df.sigma_h, df[m], "o-")
        ax.set_xlabel("σ_h (0: latent only, 1: pixel only)", fontsize=8)
        ax.set_title(names.get(m, m), fontsize=9)
    fig.suptitle(title, fontsize=10)
    return fig


# ----------------------------------------------------------------------------------------------
#                                  The two pipelines, for notebooks
# ----------------------------------------------------------------------------------------------

def load_pipelines(mode: str = "full", pixel_checkpoint: str = "", latent_checkpoint: str = "", vae: str = "",
                   text_encoder: str = "", tokenizer: str = "", device: str = "cpu",
                   dtype: torch.dtype = torch.float32, recipe: str = "best"):
    """(latent pipeline, pixel pipeline, toy world or None).

    Without paths: the toy world of `mode`, its source LDM and the cached fine-tuned pixel model of `recipe`
    (`finetune(world, recipe_config(recipe, mode)).model`: seed 0, the run notebook 03 trains first). With
    paths: both DiTs via `ZImageDiT.from_pretrained`, a diffusers `AutoencoderKL` folder and a text encoder
    (folder or shards; tokenizer found beside it).
    """
    paths = (pixel_checkpoint, latent_checkpoint, vae, text_encoder)
    if not any(paths):
        from .toyworld.recipe import finetune, recipe_config
        from .toyworld.world import build_toy_world

        config = recipe_config(recipe, mode)  # an unknown recipe fails here, before the world loads
        world = build_toy_world(mode)
        pixel = finetune(world, config).model
        return world.latent_pipeline(), world.pixel_pipeline(pixel), world
    if not all(paths):
        raise ValueError("checkpoint mode needs pixel_checkpoint, latent_checkpoint, vae and text_encoder")
    from diffusers import AutoencoderKL

    from .model import ZImageDiT
    from .pipeline import L2PPipeline
    from .text import TextEncoder

    te = TextEncoder.from_pretrained(text_encoder, tokenizer or None, dtype=dtype, device=device)
    latent = LatentPipeline(ZImageDiT.from_pretrained(latent_checkpoint, dtype=dtype, device=device), te,
                            AutoencoderKL.from_pretrained(vae, torch_dtype=dtype), device=device, dtype=dtype)
    pixel = L2PPipeline(ZImageDiT.from_pretrained(pixel_checkpoint, dtype=dtype, device=device), te,
                        device=device, dtype=dtype)
    return latent, pixel, None
