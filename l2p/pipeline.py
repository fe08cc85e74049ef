"""Text-to-image pipelines: the L2P pixel model, and the latent source model with its VAE.

`L2PPipeline` keeps the release's call shape, so a script written for it changes only its import:

    pipe = L2PPipeline.from_pretrained(torch_dtype=torch.bfloat16, device="cuda",
        model_configs=[ModelConfig(path=[main_model_path]), ModelConfig(path=text_encoder_paths)],
        tokenizer_config=ModelConfig(path=tokenizer_path))
    image = pipe(prompt="...", seed=42, rand_device="cuda", num_inference_steps=30, cfg_scale=2.0)
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .flow import velocity_from_output
from .model import ZImageDiT
from .sampler import StepInfo, get_solver, guide, guided_at
from .schedule import dit_time, sampling_sigmas


@dataclass
class ModelConfig:
    """Where a model's files are: one path or a list of shard paths (the release's `ModelConfig`)."""

    path: Union[str, Sequence[str], None] = None
    model_id: Optional[str] = None  # accepted for compatibility; nothing is downloaded
    origin_file_pattern: Optional[str] = None


def round_size(height: int, width: int, multiple: int = 16) -> tuple[int, int]:
    """Round up to a multiple of 16 with a warning, as the release does."""
    h, w = -(-height // multiple) * multiple, -(-width // multiple) * multiple
    if (h, w) != (height, width):
        warnings.warn(f"height/width {height}×{width} rounded up to {h}×{w} (must be multiples of {multiple})")
    return h, w


def to_pil(x: torch.Tensor) -> Image.Image:
    """[-1, 1] CHW → uint8 PIL image, as the release maps its output."""
    arr = ((x.float().clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr))


class FlowPipeline:
    """Shared text encoding and guided Euler loop; subclasses say what space they sample in."""

    def __init__(self, dit: ZImageDiT, text_encoder, device="cpu", dtype: torch.dtype = torch.float32,
                 cpu_offload: bool = False):
        self.dit, self.text_encoder = dit.eval(), text_encoder
        self.device, self.dtype = torch.device(device), dtype
        self.cpu_offload = False
        if cpu_offload:
            self.enable_model_cpu_offload()
        else:
            self.dit.to(device)

    # -- model offload -------------------------------------------------------------------------
    def models(self) -> list:
        """The models a call runs, in the order it runs them."""
        return [self.text_encoder, self.dit]

    def enable_model_cpu_offload(self) -> "FlowPipeline":
        """Keep every model on the CPU and move each to the device only while it runs (diffusers' name for it).

        The device then holds the largest model instead of all of them: at real scale the L2P DiT (12.9 GiB
        peak at 1024², bf16) and Qwen3-4B (7.5 GiB) stop needing a 24 GB card together. Each call pays a
        host↔device copy of each model. Outputs do not change.
        """
        self.cpu_offload, self._resident = True, object()  # nothing known: park everything
        self._use(None)
        return self

    def _use(self, model) -> None:
        """Under offload: every other model to the CPU first (so two never share the device), then `model` in."""
        if not self.cpu_offload or model is self._resident:
            return
        for m in self.models():
            if m is not model and isinstance(m, torch.nn.Module):
                m.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the freed blocks back before the next model asks for its own
        if isinstance(model, torch.nn.Module):
            model.to(self.device)
        self._resident = model

    # -- to be specialised ---------------------------------------------------------------------
    def noise_shape(self, height: int, width: int) -> tuple[int, ...]:
        raise NotImplementedError

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Sampled state → pixels in [-1, 1]."""
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        self._use(self.text_encoder)
        return [c.to(self.device, self.dtype) for c in self.text_encoder.encode_list(list(prompts))]

    def initial_noise(self, n: int, height: int, width: int, seed: Optional[int], rand_device="cpu") -> torch.Tensor:
        """float32 noise per item from Generator(rand_device).manual_seed(seed + i) (None: unseeded)."""
        out = []
        for i in range(n):
            g = torch.Generator(rand_device)
            g.manual_seed(seed + i) if seed is not None else g.seed()
            out.append(torch.randn((1, *self.noise_shape(height, width)), generator=g, device=rand_device))
        return torch.cat(out).to(self.device)

    def velocity_fn(self, caps, neg_caps, cfg_scale: float, patch_size=None,
                    cfg_interval: Optional[tuple[float, float]] = None, cfg_norm_cap: Optional[float] = None):
        """v(x, σ): positive and negative passes share one batch (masks make that exact).

        Outside `cfg_interval` the negative pass is skipped (see `l2p.sampler` for both options).
        """
        use_cfg = cfg_scale != 1.0
        guided_at(1.0, cfg_interval)  # check the interval once, before sampling

        @torch.no_grad()
        def fn(x, sigma):
            self._use(self.dit)  # under offload; a no-op once it is there
            t = dit_time(sigma).to(self.device)
            if use_cfg and guided_at(float(sigma.flatten()[0]), cfg_interval):
                out = self.dit(torch.cat([x, x]).to(self.dtype), torch.cat([t, t]), list(caps) + list(neg_caps),
                               patch_size=patch_size)
                v_pos, v_neg = velocity_from_output(out.float()).chunk(2)
                return guide(v_pos, v_neg, cfg_scale, cfg_norm_cap)
            return velocity_from_output(self.dit(x.to(self.dtype), t, caps, patch_size=patch_size).float())
        return fn

    def sample(self, prompt: Union[str, Sequence[str]], negative_prompt: str = "", seed: Optional[int] = None,
               rand_device: str = "cpu", num_inference_steps: int = 8, cfg_scale: float = 1.0,
               height: int = 1024, width: int = 1024, shift: float = 3.0,
               callback: Optional[Callable[[StepInfo], None]] = None, progress: bool = False,
               noise: Optional[torch.Tensor] = None, solver: str = "euler", **kw) -> torch.Tensor:
        """Sampled pixels in [-1, 1], (B, 3, H, W) float32. `solver`: "euler" (the release) or "heun"."""
        sample_fn = get_solver(solver)  # fail on a bad name before any model call
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        height, width = round_size(height, width)
        caps = self.encode(prompts)
        neg = self.encode([negative_prompt] * len(prompts)) if cfg_scale != 1.0 else None
        x = noise if noise is not None else self.initial_noise(len(prompts), height, width, seed, rand_device)
        sigmas = sampling_sigmas(num_inference_steps, shift).to(self.device)
        try:
            x = sample_fn(self.velocity_fn(caps, neg, cfg_scale, **kw), x, sigmas, callback, progress)
            return self.to_pixels(x)
        finally:
            self._use(None)  # under offload the device is empty between calls

    def __call__(self, prompt, *args, output_type: str = "pil", **kwargs):
        """PIL image for one prompt, a list for several (output_type="pt" gives the tensor)."""
        px = self.sample(prompt, *args, **kwargs)
        if output_type == "pt":
            return px
        images = [to_pil(p) for p in px]
        return images[0] if isinstance(prompt, str) else images


class L2PPipeline(FlowPipeline):
    """The pixel-space L2P model: noise is (3, H, W); the output is the sample itself."""

    def noise_shape(self, height, width):
        return (3, height, width)

    def to_pixels(self, x):
        return x

    @classmethod
    def from_pretrained(cls, torch_dtype: torch.dtype = torch.bfloat16, device: str = "cuda",
                        model_configs: Sequence[ModelConfig] = (), tokenizer_config: Optional[ModelConfig] = None,
                        cpu_offload: bool = False, **kw) -> "L2PPipeline":
        """Load the DiT (first ModelConfig) and the text encoder (second) from local files (`load_pipeline`).

        `cpu_offload`: load both onto the CPU and move each to `device` only while it runs
        (`enable_model_cpu_offload`)."""
        if len(model_configs) != 2:
            raise ValueError("model_configs must be [ModelConfig(path=dit_files), ModelConfig(path=text_encoder_files)]")
        dit_cfg, te_cfg = model_configs
        for mc in model_configs:
            if mc.path is None:
                raise ValueError(f"ModelConfig(model_id={mc.model_id!r}) has no local path; l2p never downloads")
        return load_pipeline(dit_cfg.path, te_cfg.path, tokenizer_config.path if tokenizer_config else None,
                             dtype=torch_dtype, device=device, cpu_offload=cpu_offload)


def load_pipeline(model, text_encoder, tokenizer=None, vae=None, dtype: torch.dtype = torch.float32,
                  device="cpu", cpu_offload: bool = False) -> FlowPipeline:
    """The pipeline a checkpoint samples with: `L2PPipeline` for an L2P (pixel) one, `LatentPipeline` with its
    `vae` (a diffusers AutoencoderKL folder) for a latent one. `text_encoder`: a folder or shard files; the
    tokenizer is found beside them unless `tokenizer` names it. `cpu_offload`: every model is loaded onto the
    CPU and goes to `device` only while it runs (`FlowPipeline.enable_model_cpu_offload`)."""
    from .text import TextEncoder

    home = "cpu" if cpu_offload else device
    dit = ZImageDiT.from_pretrained(model, dtype=dtype, device=home)
    name = " ".join(map(str, model)) if isinstance(model, (list, tuple)) else str(model)
    if dit.cfg.is_pixel and vae:
        raise ValueError(f"{name} is an L2P (pixel) checkpoint: it samples pixels, without a VAE")
    if not dit.cfg.is_pixel and not vae:
        raise ValueError(f"{name} is a latent checkpoint: give its VAE, use LatentPipeline, or convert it with "
                         "`l2p convert`")
    te = TextEncoder.from_pretrained(text_encoder, tokenizer, dtype=dtype, device=home)
    if not vae:
        return L2PPipeline(dit, te, device=device, dtype=dtype, cpu_offload=cpu_offload)
    from diffusers import AutoencoderKL
    return LatentPipeline(dit, te, AutoencoderKL.from_pretrained(vae, local_files_only=True, torch_dtype=dtype),
                          device=device, dtype=dtype, cpu_offload=cpu_offload)


def vae_latents(vae, x: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] → a diffusers AutoencoderKL's normalised latents (posterior mean − shift) · scale, as the
    DiT sees them. Differentiable in x (for `flow.latent_matching_loss`); wrap it in no_grad to only encode."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    scale = getattr(vae.config, "scaling_factor", None) or 1.0
    dtype = next(vae.parameters()).dtype
    return (vae.encode(x.to(dtype)).latent_dist.mean.float() - shift) * scale


class LatentPipeline(FlowPipeline):
    """The latent source model + a diffusers AutoencoderKL (Flux-style scaling and shift)."""

    def __init__(self, dit: ZImageDiT, text_encoder, vae, device="cpu", dtype: torch.dtype = torch.float32,
                 cpu_offload: bool = False):
        self.vae = vae.eval()  # before the base class, which parks every model under offload
        self.stride = 2 ** (len(vae.config.block_out_channels) - 1)
        super().__init__(dit, text_encoder, device, dtype, cpu_offload)
        if not cpu_offload:
            self.vae.to(device)

    def models(self) -> list:
        return [self.text_encoder, self.dit, self.vae]

    def noise_shape(self, height, width):
        return (self.vae.config.latent_channels, height // self.stride, width // self.stride)

    @torch.no_grad()
    def to_pixels(self, z):
        """Undo the latent normalisation (z / scale + shift), then decode."""
        c = self.vae.config
        self._use(self.vae)
        z = z / c.scaling_factor + (c.shift_factor or 0.0)
        return self.vae.decode(z.to(self.vae.dtype)).sample.float().clamp(-1, 1)

    @torch.no_grad()
    def encode_pixels(self, x):
        """Pixels in [-1, 1] → normalised latents (posterior mean)."""
        self._use(self.vae)
        return vae_latents(self.vae, x.to(self.device))
