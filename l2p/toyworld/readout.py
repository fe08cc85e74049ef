"""Readout probes: how much of an object's shape a noisy input, or a DiT's last-layer tokens, still hold.

The judge on one-step x̂0 (`ToyWorld.denoising_checks`) asks whether a model *draws* the shape. These probes
ask whether the shape is *there* to be drawn: a small MLP is trained to read the object's shape from a
representation of single-object scenes and scored on held-out scenes (chance: 1 / number of shapes).
Representations, per noise level σ:
  - "input: pixels" / "input: latents": the noisy input patch under the object's centre token (16×16×3 pixels,
    or the 2×2×16 latent values the source's embedder sees), before any model;
  - "tokens: <model>": the DiT's last-layer image token at the object's centre, concatenated with the mean of
    all image tokens (what reaches the Detailer Head or the latent final layer), caption given.
A linear probe reads shape from clean patches barely above chance here (outline is not linear in pixels), so
the probe is an MLP; it is the same for every representation, so the columns compare.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from ..flow import add_noise
from ..schedule import dit_time
from .scenes import BASE, SHAPES, generate, to_tensor

READOUT_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)


def mlp_readout(features: torch.Tensor, labels: torch.Tensor, n_train: int, epochs: int = 60,
                seed: int = 0) -> float:
    """Held-out accuracy of a 1-hidden-layer MLP trained on the first n_train rows (features standardised)."""
    if not 0 < n_train < len(features):
        raise ValueError(f"n_train must leave rows to test on: {n_train} of {len(features)}")
    f = features.float()
    f = (f - f[:n_train].mean(0)) / (f[:n_train].std(0) + 1e-6)
    g = torch.Generator().manual_seed(seed)
    n_cls = int(labels.max()) + 1
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(f.shape[1], 256), torch.nn.GELU(), torch.nn.Dropout(0.2),
                                  torch.nn.Linear(256, n_cls))
        opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=0.05)
        with torch.enable_grad():
            for _ in range(epochs):
                perm = torch.randperm(n_train, generator=g)
                for k in range(0, n_train, 128):
                    i = perm[k:k + 128]
                    opt.zero_grad()
                    F.cross_entropy(net(f[i]), labels[i]).backward()
                    opt.step()
    net.eval()
    with torch.no_grad():
        return (net(f[n_train:]).argmax(1) == labels[n_train:]).float().mean().item()


def _cells(scenes, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of the token under each scene's first object's centre, on a grid × grid token map."""
    cell = BASE / grid
    rows = torch.tensor([min(int(s.objects[0].cy // cell), grid - 1) for s in scenes])
    cols = torch.tensor([min(int(s.objects[0].cx // cell), grid - 1) for s in scenes])
    return rows, cols


def _patches(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, grid: int) -> torch.Tensor:
    """The input values under each item's (row, col) token, flattened."""
    p = x.shape[-1] // grid
    return torch.stack([x[i, :, r * p:(r + 1) * p, c * p:(c + 1) * p].reshape(-1)
                        for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist()))])


def _tokens(model, x, t, feats, rows, cols, batch_size: int) -> torch.Tensor:
    """Last-layer image token at (row, col) ++ the mean image token, per item."""
    out = []
    with torch.no_grad():
        for k in range(0, len(x), batch_size):
            b = slice(k, k + batch_size)
            _, extra = model(x[b], t[b], feats[b], return_features=True)
            fm = torch.stack(extra["features"]).float()  # (B, dim, h, w)
            i = torch.arange(len(fm))
            out.append(torch.cat([fm[i, :, rows[b], cols[b]], fm.mean((2, 3))], 1))
    return torch.cat(out)


def shape_readout(world, pixel_models: dict, sigmas: Sequence[float] = READOUT_SIGMAS, n_train: int = 2400,
                  n_test: int = 600, seed: int = 31_337, batch_size: int = 100, cache: bool = True) -> pd.DataFrame:
    """Probe accuracy of the object's shape per σ (rows) and representation (columns); see the module doc.

    Scenes are single-object renders of the world's scene config (stream `seed`); pixels and latents are
    noised with fixed ε, so every column sees the same noise draw. A readout done before with the same
    weights and settings is loaded (`evalcache.cached_table`; `cache=False` computes it afresh).
    """
    from .evalcache import cached_table
    params = {"sigmas": [float(s) for s in sigmas], "n_train": n_train, "n_test": n_test, "seed": seed,
              "batch_size": batch_size}
    compute = lambda: _shape_readout(world, pixel_models, sigmas, n_train, n_test, seed, batch_size)  # noqa: E731
    return cached_table(world, "shape_readout", pixel_models, params, compute) if cache else compute()


def _shape_readout(world, pixel_models: dict, sigmas, n_train: int, n_test: int, seed: int,
                   batch_size: int) -> pd.DataFrame:
    from .vae import encode

    n = n_train + n_test
    images, captions, scenes = generate(n, seed, replace(world.world, mix=(("single", 1.0),)))
    labels = torch.tensor([SHAPES.index(s.objects[0].shape) for s in scenes])
    x0 = to_tensor(images)
    feats = world.text.encode_list(list(captions))
    with torch.no_grad():
        z0 = encode(world.vae, x0).float()
    g = torch.Generator().manual_seed(seed)
    eps, eps_z = torch.randn(x0.shape, generator=g), torch.randn(z0.shape, generator=g)
    grid = z0.shape[-1] // world.source.cfg.default_patch
    rows, cols = _cells(scenes, grid)
    out = []
    for s in sigmas:
        t = dit_time(torch.full((n,), float(s)))
        xs, zs = add_noise(x0, eps, s), add_noise(z0, eps_z, s)
        reps = {"input: pixels": _patches(xs, rows, cols, grid), "input: latents": _patches(zs, rows, cols, grid),
                "tokens: source LDM": _tokens(world.source, zs, t, feats, rows, cols, batch_size)}
        for name, m in pixel_models.items():
            reps[f"tokens: {name}"] = _tokens(m, xs, t, feats, rows, cols, batch_size)
        out.append({"sigma": s, **{k: mlp_readout(v, labels, n_train) for k, v in reps.items()}})
    return pd.DataFrame(out).set_index("sigma")

