"""Model configurations: one dataclass for both forms of the DiT, sizes as named presets.

The latent form (Z-Image) has a latent patch embedder and a final layer; the pixel form (L2P) has an
RGB patch embedder and a Detailer Head (`local_decoder`) instead of the final layer.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

ADALN_EMBED_DIM = 256  # width of the timestep embedding fed to every adaLN Linear
SEQ_MULTI_OF = 32  # image and caption tokens are each padded to a multiple of this
X_PRED_SIGMA_MIN = 0.05  # x-prediction divides by σ; clamp it as JiT does so the last steps stay finite
PREDICTIONS = ("velocity", "x", "edm")
UPSAMPLES = ("nearest", "learned")
EDM_SIGMA_DATA = 0.5  # the std of x0 that "edm" preconditioning assumes (Karras et al. use 0.5 for [-1, 1] images)


@dataclass(frozen=True)
class DetailerConfig:
    """The Detailer Head: a small U-Net over the whole noisy image, joined with DiT tokens at its bottleneck."""

    channels: tuple[int, ...] = (64, 128, 256, 512)  # encoder widths, one per level (depth = len)
    out_channels: int = 3
    # What out_conv's output means. "velocity": the release (≈ x0 − ε, like the latent final layer).
    # "x": the clean image x̂0, turned into the same x0 − ε output as (x̂0 − x_σ)/σ (JiT's reparametrisation;
    # not in the paper). "edm": x̂0 = c_skip(σ)·x_σ + c_out(σ)·output, Karras et al.'s preconditioning for this
    # path: a skip that carries x_σ at low σ (noise prediction) and x-prediction near σ = 1 (not in the paper).
    # The model's output contract, loss and samplers are the same for all three.
    prediction: str = "velocity"
    # The release's head has no time input: σ reaches it only through the DiT tokens at its bottleneck, so its
    # full-resolution convs act the same at every noise level. True adds a FiLM (per-channel scale and shift from
    # the DiT's timestep embedding, zero-initialised: it starts as the release head) after every encoder and
    # decoder conv, keys local_decoder.film_enc{k} / film_dec{k}. Not in the paper.
    time_conditioning: bool = False
    # How the decoder goes up a level. "nearest": the release (nearest ×2, then the 3×3 conv up{k}.1), so the
    # four pixels under a coarse pixel start from one vector and a DiT token alone cannot place detail inside its
    # 16×16 patch. "learned": a 2×2 stride-2 transposed conv (up{k}.0, initialised to nearest, so it starts as
    # the release) gives each sub-position its own weights before up{k}.1. Not in the paper.
    upsample: str = "nearest"

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"Detailer Head prediction {self.prediction!r}: expected one of {PREDICTIONS}")
        if self.upsample not in UPSAMPLES:
            raise ValueError(f"Detailer Head upsample {self.upsample!r}: expected one of {UPSAMPLES}")

    @property
    def depth(self) -> int:
        return len(self.channels)

    @staticmethod
    def for_patch(patch: int, widths: tuple[int, ...] = (64, 128, 256, 512, 512, 512)) -> "DetailerConfig":
        """Depth log2(patch): the bottleneck then sits on the DiT token grid (4 levels for patch 16)."""
        depth = int(round(math.log2(patch)))
        return DetailerConfig(channels=tuple(widths[:depth]))


@dataclass(frozen=True)
class DiTConfig:
    """Sizes of a Z-Image / L2P DiT. Field names follow the released `config.json`."""

    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1536, 512, 512)
    # Pixel form: a Detailer Head replaces the final layer. None means the latent form.
    detailer: Optional[DetailerConfig] = None
    # Image and caption tokens are each padded to a multiple of this (the release: 32). The toy presets use
    # 16: their 4×4 grid would otherwise be half padding, and the CPU pays for every token.
    seq_multiple: int = SEQ_MULTI_OF

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.dim // self.n_heads != sum(self.axes_dims):
            raise ValueError(f"head_dim {self.dim // self.n_heads} != sum(axes_dims) {sum(self.axes_dims)}")
        if any(d % 2 for d in self.axes_dims):
            raise ValueError(f"axes_dims {self.axes_dims} must be even (RoPE uses complex pairs)")
        if len(self.all_patch_size) != len(self.all_f_patch_size):
            raise ValueError("all_patch_size and all_f_patch_size must have the same length")

    @property
    def is_pixel(self) -> bool:
        return self.detailer is not None

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        return int(self.dim / 3 * 8)

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, ADALN_EMBED_DIM)

    @property
    def patch_keys(self) -> list[str]:
        return [f"{p}-{f}" for p, f in zip(self.all_patch_size, self.all_f_patch_size)]

    @property
    def default_patch(self) -> int:
        return self.all_patch_size[0]

    def replace(self, **kw) -> "DiTConfig":
        return replace(self, **kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["detailer"] = None if self.detailer is None else asdict(self.detailer)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        d = dict(d)
        det = d.pop("detailer", None)
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        if det is not None:
            kw["detailer"] = DetailerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in det.items()})
        return cls(**kw)

    def to_pixel(self, patch_sizes: tuple[int, ...] = (16,), detailer: Optional[DetailerConfig] = None) -> "DiTConfig":
        """The L2P pixel config converted from this latent config (same trunk, RGB patches, Detailer Head)."""
        det = detailer or DetailerConfig.for_patch(patch_sizes[0])
        return replace(self, all_patch_size=tuple(patch_sizes), all_f_patch_size=(1,) * len(patch_sizes),
                       in_channels=3, detailer=det)


# ----------------------------------------------------------------------------------------------
#                                          Presets
# ----------------------------------------------------------------------------------------------

def z_image_turbo() -> DiTConfig:
    """Z-Image-Turbo transformer, 6.15B (the source latent model)."""
    return DiTConfig()


def l2p_1k() -> DiTConfig:
    """The released L2P 1K model: patch 16 RGB embedder + Detailer Head, 6.17B."""
    return DiTConfig(all_patch_size=(16,), in_channels=3, axes_lens=(1024, 512, 512), detailer=DetailerConfig())


def l2p_4k() -> DiTConfig:
    """L2P with an extra 64-1 embedder for 4K: 64² patches keep 4096² at 4096 tokens; the head is shared."""
    return DiTConfig(all_patch_size=(16, 64), all_f_patch_size=(1, 1), in_channels=3,
                     axes_lens=(1024, 512, 512), detailer=DetailerConfig())


def toy_latent(cap_feat_dim: int = 384) -> DiTConfig:
    """Toy source LDM for 64² images: 8×8×16 latents, patch 2 → 16 tokens; dim 128, 4 layers (~1.5M params).

    Sequences are padded to multiples of 16, not 32: 16 image + ≤16 caption tokens instead of 32 + 32.
    """
    return DiTConfig(all_patch_size=(2,), in_channels=16, dim=128, n_layers=4, n_refiner_layers=1, n_heads=4,
                     n_kv_heads=4, cap_feat_dim=cap_feat_dim, axes_dims=(8, 12, 12), axes_lens=(256, 64, 64),
                     seq_multiple=16)


TOY_DETAILER = DetailerConfig(channels=(8, 16, 32, 64))  # full-resolution convs dominate the CPU cost


def toy_latent_fine(cap_feat_dim: int = 384) -> DiTConfig:
    """Toy source for the fine-grid world: a stride-4, 4-channel VAE gives 16×16×4 latents, patch 2 → 8×8 tokens.

    The latent holds as many values as `toy_latent`'s (1,024), but the token grid is twice as fine, so the
    toy's objects span about two tokens across instead of one (at 1024² the real model's span many).
    """
    return toy_latent(cap_feat_dim).replace(in_channels=4)


# Depth 3: the bottleneck sits at H/8, the fine-grid world's token grid.
TOY_DETAILER_FINE = DetailerConfig(channels=(8, 16, 32))


def toy_pixel_fine(cap_feat_dim: int = 384) -> DiTConfig:
    """`toy_latent_fine` converted to pixels: RGB patch 8 → the same 8×8 grid, a depth-3 Detailer Head."""
    return toy_latent_fine(cap_feat_dim).to_pixel((8,), TOY_DETAILER_FINE)


def toy_pixel(cap_feat_dim: int = 384) -> DiTConfig:
    """The toy source converted to pixels: RGB patch 16 → the same 4×4 grid, narrow Detailer Head."""
    return toy_latent(cap_feat_dim).to_pixel((16,), TOY_DETAILER)


def tiny_latent() -> DiTConfig:
    """A few-thousand-parameter latent DiT for unit tests."""
    return DiTConfig(all_patch_size=(2,), in_channels=16, dim=64, n_layers=2, n_refiner_layers=1, n_heads=2,
                     n_kv_heads=2, cap_feat_dim=32, axes_dims=(8, 12, 12), axes_lens=(1024, 512, 512))


def tiny_pixel() -> DiTConfig:
    """Tiny pixel DiT for unit tests (patch 16, Detailer Head of widths 8..32)."""
    return tiny_latent().to_pixel((16,), DetailerConfig(channels=(8, 8, 16, 32)))


PRESETS = {
    "z_image_turbo": z_image_turbo,
    "l2p_1k": l2p_1k,
    "l2p_4k": l2p_4k,
    "toy_latent": toy_latent,
    "toy_pixel": toy_pixel,
    "toy_latent_fine": toy_latent_fine,
    "toy_pixel_fine": toy_pixel_fine,
    "tiny_latent": tiny_latent,
    "tiny_pixel": tiny_pixel,
}


def get_config(name_or_cfg) -> DiTConfig:
    """A preset by name, or a DiTConfig / dict passed through."""
    if isinstance(name_or_cfg, DiTConfig):
        return name_or_cfg
    if isinstance(name_or_cfg, dict):
        return DiTConfig.from_dict(name_or_cfg)
    try:
        return PRESETS[name_or_cfg]()
    except KeyError:
        raise KeyError(f"unknown preset {name_or_cfg!r}; known: {sorted(PRESETS)}") from None
