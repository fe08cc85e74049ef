"""The toy source LDM: the foundation's DiT in latent form, trained from scratch on toy-VAE latents.

It stands in for Z-Image-Turbo: same blocks, schedule, sign and time conventions, trained by the same
loop (`l2p.train`) with caption dropout so that classifier-free guidance works.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

import pandas as pd
import torch

from ..config import DiTConfig, get_config
from ..model import ZImageDiT
from ..train import TrainConfig, train
from .scenes import ToyWorldConfig, generate, single_object_world, to_tensor
from .vae import encode


@dataclass(frozen=True)
class LDMTrainConfig:
    """How to train the toy source model (defaults: full mode)."""

    preset: str = "toy_latent"
    n_images: int = 20_000  # ground-truth renders, encoded once
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 100
    # None: keep the final weights. A 0.999 EMA over a 1500-step run is dominated by early, weaker weights:
    # on one build it scored 0.45 on toy-GenEval where the raw weights of the same run scored 0.59.
    ema_decay: Optional[float] = None
    caption_dropout: float = 0.1
    seed: int = 0
    data_seed: int = 0  # which image stream it learns from (a "cross-model" source uses another)
    world: ToyWorldConfig = field(default_factory=single_object_world)

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **kw) -> "LDMTrainConfig":
        return replace(self, **kw)


LDM_MODES = {
    "full": LDMTrainConfig(),
    "smoke": LDMTrainConfig(n_images=64, steps=4, batch_size=16),
}


def ldm_train_config(mode: Union[str, LDMTrainConfig] = "full") -> LDMTrainConfig:
    return mode if isinstance(mode, LDMTrainConfig) else LDM_MODES[mode]


class LatentItems(torch.utils.data.Dataset):
    """Pre-encoded latents with their captions, as the training loop's items."""

    def __init__(self, latents: torch.Tensor, captions: list[str]):
        self.latents, self.captions = latents, captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.latents[i], "prompt": self.captions[i], "seed": None}


def source_config(cfg: LDMTrainConfig, cap_feat_dim: int) -> DiTConfig:
    return get_config(cfg.preset).replace(cap_feat_dim=cap_feat_dim)


def train_source_ldm(cfg: Union[str, LDMTrainConfig], vae, text, progress: bool = True
                     ) -> tuple[ZImageDiT, pd.DataFrame]:
    """Train the latent DiT from scratch (DiT-style init, optional EMA) on the VAE latents of ground-truth renders."""
    cfg = ldm_train_config(cfg)
    images, captions, _ = generate(cfg.n_images, cfg.data_seed, cfg.world)
    latents = encode(vae, to_tensor(images))
    text.prefill(sorted(set(captions)) + [""], batch_size=256)
    torch.manual_seed(cfg.seed)
    model = ZImageDiT(source_config(cfg, text.dim)).init_for_training_from_scratch(
        torch.Generator().manual_seed(cfg.seed))
    tcfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=0.0,
                       warmup_steps=cfg.warmup, grad_clip=1.0, policy="full", seeded_noise=False,
                       caption_dropout=cfg.caption_dropout, ema_decay=cfg.ema_decay, seed=cfg.seed,
                       verbose=progress, log_every=25)
    history = train(model, LatentItems(latents, captions), text.encode_list, tcfg)
    return model.requires_grad_(False), history


def save_ldm(model: ZImageDiT, history: Optional[pd.DataFrame], path: Union[str, Path]) -> None:
    """safetensors with its config in the metadata (loads with `ZImageDiT.from_pretrained`)."""
    import json
    from ..checkpoint import atomic_save
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_save({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors",
                metadata={"l2p_config": json.dumps(model.cfg.to_dict())})
    if history is not None:
        history.to_csv(path / "history.csv", index=False)


def load_ldm(path: Union[str, Path]) -> tuple[ZImageDiT, Optional[pd.DataFrame]]:
    path = Path(path)
    hist = path / "history.csv"
    return ZImageDiT.from_pretrained(path / "model.safetensors"), (pd.read_csv(hist) if hist.exists() else None)
