"""Token-grid study: does the pixel model's gap to its source depend on how many tokens an object spans?

At 1024² the real model's 64×64 token grid puts many tokens on every object. The default toy world's 4×4
grid (64², 16-px patches) puts about one token on each 11–19 px object, so the toy Detailer Head has to
draw a shape inside a token. The fine-grid world keeps the images, captions, judge, text encoder and the
latent's size (1,024 values), but halves the VAE stride (4, with 4 channels): patches are 8 px and the
grid is 8×8. Here both worlds are trained alike (source LDM: 1500 steps of 64 images, raw final weights;
pixel model: the release's recipe at 1500 × 32, ≥ 3 seeds), so that only the grid differs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch

from . import recipe
from .evaluator import Evaluator
from .ldm import LDMTrainConfig, ldm_train_config
from .recipe import FINETUNE_MODES, FinetuneConfig, FinetuneRun, finetune
from .world import SPECS, ToyWorld, WorldSpec, build_toy_world

GRIDS = {
    "full": {
        "coarse": WorldSpec(ldm=LDMTrainConfig(batch_size=64)),  # the default, trained as "fine"
        "fine": SPECS["fine"],
    },
    "smoke": {
        "coarse": SPECS["smoke"],
        "fine": WorldSpec(mode="smoke", vae_mode="fine-smoke", ldm=ldm_train_config("smoke").replace(
            preset="toy_latent_fine"), corpus_size=16, eval_prompts=16, sample_steps=2),
    },
}
SEEDS = {"full": (0, 1, 2), "smoke": (0,)}
EVAL_SEED = recipe.EVAL_SEED  # the prompt set every fine-tuning run, and the source here, are judged on


def grid_world(name: str, mode: str = "full", progress: bool = True) -> ToyWorld:
    """The coarse- or fine-grid world (cached; trained on a miss)."""
    if name not in GRIDS[mode]:
        raise KeyError(f"unknown grid {name!r}; known: {sorted(GRIDS[mode])}")
    return build_toy_world(spec=GRIDS[mode][name], progress=progress)


def grid_worlds(mode: str = "full", progress: bool = True) -> dict[str, ToyWorld]:
    """Both worlds, {grid: world}: load them once and pass them to `compare`, `curves` and `shape_per_sigma`."""
    return {name: grid_world(name, mode, progress) for name in GRIDS[mode]}


def pixel_config(world: ToyWorld, mode: str = "full", seed: int = 0, **kw) -> FinetuneConfig:
    """The release's fine-tuning recipe (FINETUNE_MODES) with the patch that puts the pixel tokens on this world's grid."""
    return FINETUNE_MODES[mode].replace(patch=world.spec.pixel_patch, seed=seed, **kw)


def pixel_runs(world: ToyWorld, mode: str = "full", seeds: Optional[Sequence[int]] = None,
               progress: bool = False) -> dict[int, FinetuneRun]:
    """The release recipe's run for each seed (cached): {seed: run}."""
    return {s: finetune(world, pixel_config(world, mode, s), progress=progress) for s in seeds or SEEDS[mode]}


def grid_runs(worlds: dict[str, ToyWorld], mode: str = "full", seeds: Optional[Sequence[int]] = None,
              progress: bool = False) -> dict[str, dict[int, FinetuneRun]]:
    """Every world's pixel runs, {grid: {seed: run}}."""
    return {name: pixel_runs(w, mode, seeds, progress) for name, w in worlds.items()}


def vae_ceiling(world: ToyWorld, n: int = 300, seed: int = 99) -> dict:
    """`ToyWorld.vae_ceiling` as a table row: toy-GenEval and every check on VAE reconstructions."""
    return Evaluator.scorecard(world.vae_ceiling(n, seed))


def _row(r: dict) -> dict:
    """An `evaluate` result as a table row: toy-GenEval, every check, FID and spectral distance."""
    return {**Evaluator.scorecard(r["scores"]), "fid": r["fid"], "spectral": r["spectral"]}


def compare(worlds: dict[str, ToyWorld], runs: dict[str, dict[int, FinetuneRun]], mode: str = "full"
            ) -> pd.DataFrame:
    """One row per (grid, model, seed): toy-GenEval, FID, spectral distance and every judge check.

    Models: "VAE ceiling" (reconstructions of ground truth), "source LDM" (sampled with each run's seed) and
    "pixel (L2P)", the latter re-sampled from each run's final weights on the runs' own prompts and seed, so
    its "geneval" equals the run's last evaluation.
    """
    rows = []
    n = FINETUNE_MODES[mode].eval_prompts
    for name, world in worlds.items():
        info = {"grid": name, "patch (px)": world.spec.pixel_patch,
                "tokens": f"{world.image_size // world.spec.pixel_patch}²"}
        rows.append({**info, "model": "VAE ceiling", "seed": 0, **vae_ceiling(world, n=n)})
        for s in runs[name]:
            r = world.evaluate(world.latent_pipeline(), world.prompts(n, seed=EVAL_SEED), seed=s)
            rows.append({**info, "model": "source LDM", "seed": s, **_row(r)})
        for s, run in runs[name].items():
            rows.append({**info, "model": "pixel (L2P)", "seed": s,
                         **_row(recipe.evaluate_pixel(world, run.model, run.config))})
    return pd.DataFrame(rows)


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per grid: source and pixel toy-GenEval (mean ± std over seeds), the ratio, and the shape checks."""
    out = []
    for name, g in df.groupby("grid", sort=False):
        src, pix = g[g.model == "source LDM"], g[g.model == "pixel (L2P)"]
        ceil = g[g.model == "VAE ceiling"]
        out.append({"grid": name, "patch (px)": int(g["patch (px)"].iloc[0]), "tokens": g["tokens"].iloc[0],
                    "VAE ceiling": float(ceil.geneval.mean()),
                    "source": float(src.geneval.mean()), "source std": float(src.geneval.std(ddof=1)),
                    "pixel": float(pix.geneval.mean()), "pixel std": float(pix.geneval.std(ddof=1)),
                    "pixel / source": float(pix.geneval.mean() / max(src.geneval.mean(), 1e-9)),
                    "shape: source": float(src["shape"].mean()), "shape: pixel": float(pix["shape"].mean()),
                    "seeds": int(pix.seed.nunique())})
    return pd.DataFrame(out).set_index("grid")


def check_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean of every judge check per (grid, model)."""
    checks = [c for c in df.columns if c not in ("grid", "patch (px)", "tokens", "model", "seed", "fid", "spectral")]
    return df.groupby(["grid", "model"], sort=False)[checks].mean()


def curves(runs: dict[str, dict[int, FinetuneRun]]) -> pd.DataFrame:
    """Each pixel run's evaluation curve, with its grid: the rows `ablations.plot_curves` reads (variant = grid)."""
    return pd.concat([run.evals.assign(variant=f"{name} grid", seed=s)
                      for name, by_seed in runs.items() for s, run in by_seed.items()], ignore_index=True)


def shape_per_sigma(worlds: dict[str, ToyWorld], runs: dict[str, dict[int, FinetuneRun]],
                    sigmas: Sequence[float] = (0.2, 0.4, 0.6, 0.95), n: int = 100, seed: int = 0) -> pd.DataFrame:
    """The shape check on one-step x̂0 of held-out ground truth per σ, for each grid's seed-`seed` pixel model,
    source, and the two identities (`ToyWorld.denoising_checks`)."""
    frames = []
    for name, world in worlds.items():
        with torch.no_grad():
            d = world.denoising_checks({"pixel (L2P)": runs[name][seed].model.eval()}, sigmas, n=n)
        frames.append(d["shape"].unstack("model").assign(grid=name))
    return pd.concat(frames).reset_index().set_index(["grid", "sigma"])


def finding(table: pd.DataFrame, goal: float = 0.9) -> str:
    """What the study found, in words computed from `summary(...)` (never hand-written)."""
    c, f = table.loc["coarse"], table.loc["fine"]
    ms = lambda r, k: f"{r[k]:.3f} ± {r[k + ' std']:.3f}"  # noqa: E731
    spread = (c["pixel std"] ** 2 + f["pixel std"] ** 2) ** 0.5
    moved = f["pixel / source"] - c["pixel / source"]
    lines = [f"Coarse grid ({c['tokens']} tokens): pixel {ms(c, 'pixel')} vs source {ms(c, 'source')}, "
             f"{c['pixel / source']:.2f}× the source.",
             f"Fine grid ({f['tokens']} tokens): pixel {ms(f, 'pixel')} vs source {ms(f, 'source')}, "
             f"{f['pixel / source']:.2f}× the source."]
    if np.isnan(spread):
        lines.append(f"The pixel model's own score moves by {f['pixel'] - c['pixel']:+.3f} (one seed: no spread).")
    elif abs(f["pixel"] - c["pixel"]) <= spread:
        lines.append(f"The pixel model's own score moves by {f['pixel'] - c['pixel']:+.3f}, within the seed spread "
                     f"({spread:.3f}).")
    else:
        lines.append(f"The pixel model's own score moves by {f['pixel'] - c['pixel']:+.3f}, beyond the seed spread "
                     f"({spread:.3f}).")
    lines.append(f"The ratio to the source moves by {moved:+.2f}; the {goal:.0%} goal is "
                 + ("met" if f["pixel / source"] >= goal else "not met") + " on the fine grid and "
                 + ("met" if c["pixel / source"] >= goal else "not met") + " on the coarse one.")
    lines.append(f"Shape check, pixel / source: coarse {c['shape: pixel']:.2f} / {c['shape: source']:.2f}, "
                 f"fine {f['shape: pixel']:.2f} / {f['shape: source']:.2f}.")
    return " ".join(lines)
