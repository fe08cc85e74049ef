"""The paper's claims as toy experiments: each a set of fine-tuning variants, each variant over ≥3 seeds.

Runs are cached by config (`recipe.finetune`), so variants shared between experiments — the baseline
appears in most of them — are trained once, and a re-run only computes what changed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .recipe import BUDGET_FIELDS, EVAL_SEED, RECIPES, FinetuneConfig, evaluate_pixel, finetune


@dataclass(frozen=True)
class Experiment:
    """A question, the paper's answer, and the variants (overrides of the base config) that test it."""

    name: str
    question: str
    claim: str
    variants: dict = field(default_factory=dict)
    base: dict = field(default_factory=dict)  # overrides applied to every variant
    # How `verdict` tests the claim: "first_best" (the first variant, the paper's choice, beats the others),
    # "saturates" (gains shrink as the variants grow), "transfer", "vs_source" (the best variant against the source
    # itself), "larger_shift"; "" for questions the paper does not answer (does any variant beat the first?).
    rule: str = ""

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"experiment {self.name!r}: unknown rule {self.rule!r}; choose one of {RULES}")


RULES = ("", "first_best", "saturates", "transfer", "vs_source", "larger_shift")


ABLATION_BASE = {
    # Short runs at batch 16 (≈ 1 min each on 2 cores; the report's budget holds ~40 of them): comparisons at
    # equal budget, not converged. `_LONG` experiments and notebook 03 show longer runs.
    "full": FinetuneConfig(steps=300, batch_size=16, eval_every=100, eval_prompts=48),
    # smoke: two seeds and two evaluations per run, the fewest that still exercise the spread and the curves
    "smoke": FinetuneConfig(corpus_size=16, steps=2, batch_size=4, eval_every=2, eval_prompts=8),
}
SEEDS = {"full": (0, 1, 2), "smoke": (0, 1)}
# The release's toy budget (FINETUNE_MODES: 1500 × 32), for experiments whose effect only shows once the model
# learns; their baseline runs are `transfer`'s converted runs (notebook 03 with `-p recipe=release`).
_LONG = {"steps": 1500, "batch_size": 32, "eval_every": 250, "eval_prompts": 100}
# The three changes that each beat the release at that budget, together (`combined`, `combined_long`)
_COMBINED = "σ-head + capped vae_fit + latent loss λ=0.5"
_COMBINATION = {_COMBINED: {k: RECIPES["best"][k] for k in ("head_time", "init", "vae_fit_gain", "latent_loss")}}
_WIDE = _COMBINED + ", 16-wide head"
# Fig. 9b's training policies (the paper's first), Fig. 9a's corpora (the source's own renders first) and
# Fig. 9c's corpus sizes (smallest first)
_FREEZE_POLICIES = {"paper (n=1)": {}, "full": {"policy": "full"}, "embedder+head": {"policy": "embedder+head"},
                    "head-only": {"policy": "head-only"}}
_DATA_SOURCES = {"source's own": {}, "ground truth (real)": {"corpus": "ground_truth"},
                 "cross-model": {"corpus": "cross"}}
_DATA_SIZES = {f"{n} images": {"corpus_size": n} for n in (125, 500, 2000)}
# Fig. 12's noise shifts (the 1K default of 3 in the middle) at 128² with a 32-px patch: the 4K path's toy
# counterpart, trained on ground truth since the source renders 64²
_SHIFTS = {f"shift {s:g}": {"shift": s} for s in (1.0, 3.0, 12.0)}
_HIGHRES = {"image_size": 128, "patch": 32, "corpus": "ground_truth", "steps": 200, "eval_every": 100}

EXPERIMENTS = [
    Experiment("transfer", "Does the latent model's knowledge transfer, or is the pixel model learning from scratch?",
               "Transfer from the latent model reaches the source's quality with far less compute than training the "
               "same pixel architecture from scratch (the paper's efficiency argument).",
               {"converted init": {}, "from scratch": {"init": "scratch"}},
               # at the release's 1500-step budget (`transfer`'s runs are shared): at 300 steps both sit near the floor
               _LONG, rule="transfer"),
    Experiment("freeze_policy", "Which parts must train?",
               "Freezing the middle of the trunk and training the ends, embedders and Detailer Head (the default) beats "
               "training everything (Fig. 9b: 'Full-Layer' is worse) and beats training only the head/embedder.",
               _FREEZE_POLICIES, rule="first_best"),
    Experiment("freeze_at_budget", "Does training the trunk's first and last layers help once the model learns?",
               "freeze_policy's claim (Fig. 9b: the paper's policy beats training every layer, and training only the "
               "embedder and the head), at the release's 1500-step budget: at 300 steps the policies end within their "
               "seed spread. Session 10's probe (03) saw the paper policy's trained layers lose the caption's shape "
               "from the tokens at high σ.",
               _FREEZE_POLICIES, _LONG, rule="first_best"),
    Experiment("data_source", "Does it matter whose images the pixel model learns from?",
               "Training on the source model's own generations transfers best; real images or another model's "
               "generations are worse at equal budget (Fig. 9a).",
               _DATA_SOURCES, rule="first_best"),
    Experiment("data_source_at_budget", "Does it matter whose images the pixel model learns from, once it learns?",
               "data_source's claim (Fig. 9a: the source's own generations transfer best), at the release's "
               "1500-step budget: at 300 steps the three corpora end within their seed spread, near the floor.",
               _DATA_SOURCES, _LONG, rule="first_best"),
    Experiment("data_quantity", "How many images are needed?",
               "A small synthetic corpus suffices; quality saturates quickly with corpus size (Fig. 9c).",
               _DATA_SIZES, rule="saturates"),
    Experiment("data_quantity_at_budget", "How many images are needed, once the model learns?",
               "data_quantity's claim (Fig. 9c: quality saturates quickly with corpus size), at the release's "
               "1500-step budget, where 125 images are seen 384 times each and 2,000 images 24 times.",
               _DATA_SIZES, _LONG, rule="saturates"),
    Experiment("embedder_init", "Does a VAE-informed init of the new patch embedder help?",
               "Not in the paper (the release initialises the embedder randomly). vae_fit composes the latent "
               "embedder with a ridge fit of the VAE encoder on RGB patches. The plain fit passes white pixel noise "
               "to the latents with a large gain (~1,700 on the toy VAE), so the trunk sees x_σ as far noisier than "
               "σ says; the capped variant takes the ridge that brings the gain to 1 (`--vae-fit-noise-gain 1`). "
               "At the release's 1500-step budget: at 300 steps all three sit near the floor.",
               {"release (random)": {}, "vae_fit": {"init": "vae_fit"},
                "vae_fit, noise gain ≤ 1": {"init": "vae_fit", "vae_fit_gain": 1.0}},
               _LONG),
    Experiment("detailer_head", "Is the toy Detailer Head too small, or predicting the wrong thing?",
               "Not in the paper: the release's head (64 wide at full resolution) predicts velocity. The toy head "
               "is 8 wide to keep CPU cost down; JiT (Li & He, 2025) argues pixel models should predict the clean "
               "image; EDM's preconditioning (Karras et al., 2022) predicts noise at low σ and the clean image at "
               "high σ. All are tried here under the same v-loss.",
               {"toy head (8 wide)": {}, "16 wide": {"head_channels": (16, 32, 64, 64)},
                "x-prediction": {"prediction": "x"}, "edm preconditioning": {"prediction": "edm"}}),
    Experiment("training_choices", "What do two of the release's training choices change?",
               "Not in the paper. The release draws each image's ε from its `seed` column, the same ε every epoch, "
               "and never drops the caption, yet samples with classifier-free guidance (cfg 2.0). The toy corpus is "
               "seen 24 times at this budget, so a fixed ε per image could be memorised.",
               {"release (seeded ε, no dropout)": {}, "fresh ε every step": {"seeded_noise": False},
                "caption dropout 0.1": {"caption_dropout": 0.1}},
               _LONG),
    Experiment("head_time", "Does the Detailer Head need to know the noise level?",
               "Not in the paper. The release's head has no time input: σ reaches it only through the DiT tokens at "
               "its bottleneck, so its full-resolution convs act the same at every noise level. The variant adds a "
               "zero-initialised FiLM from the timestep embedding after every head conv (`--head-time-conditioning`). "
               "Crossed with fresh ε, as the two interact in single-seed probes.",
               {"release head": {}, "σ-conditioned head": {"head_time": True},
                "fresh ε": {"seeded_noise": False},
                "σ-conditioned head + fresh ε": {"head_time": True, "seeded_noise": False}},
               _LONG),
    Experiment("head_upsample", "Can the Detailer Head draw a shape inside one token?",
               "Not in the paper. The toy's objects are 10–24 px across, about one 16-px token, and shape is where the "
               "pixel model falls furthest behind the source. The release head goes up a level by nearest ×2, so the "
               "four pixels under a coarse pixel start from one vector: what a token alone says cannot vary inside its "
               "patch, and detail there must come through the noisy image's skips. The variant learns the upsampling "
               "(a 2×2 transposed conv that starts as nearest, `--head-upsample learned`).",
               {"release head (nearest)": {}, "learned upsampling": {"head_upsample": "learned"}},
               _LONG),
    Experiment("latent_loss", "Does a loss that weighs what the VAE weighs teach the pixel model shapes?",
               "Not in the paper, which trains with plain pixel flow matching. Pixel MSE weighs every pixel alike, "
               "so the outline that tells a small circle from a square costs little, while the source learned in "
               "latents that weigh what the VAE decoder needs. The variants add λ × the MSE between the frozen toy "
               "VAE encoder's latents of the one-step x̂0 and of x0 (`TrainConfig.latent_loss_weight`); the VAE is "
               "used in training only, never at sampling.",
               {"flow matching only (release)": {}, "+ latent loss λ=0.5": {"latent_loss": 0.5},
                "+ latent loss λ=2": {"latent_loss": 2.0}},
               _LONG),
    Experiment("combined", "Do the changes that help one by one add up?",
               "Not in the paper. Three changes each beat the release's recipe by more than the seed spread at this "
               "budget: the σ-conditioned head (head_time), the capped vae_fit embedder init (embedder_init) and the "
               "latent loss (latent_loss). The variant uses all three, with λ=0.5 as in the single-seed probe that "
               "first tried them together.",
               {"release": {}, **_COMBINATION},
               _LONG),
    Experiment("combined_long", "Does 4× the release's 1500-step budget bring the combined recipe to 90% of the source?",
               "The paper's pixel model reaches 93% of its source's GenEval; this project's goal is 0.9×. At 1500 × 32 "
               "every recipe stays below 0.6× at the world's cfg. Here `combined`'s recipe trains 6000 × 32 (96 "
               "epochs of the 2,000-image corpus), evaluated every 500 steps, with the toy Detailer Head and with one "
               "twice as wide (as wide as the toy VAE's decoder, 16 channels at full resolution; the release's head is "
               "64). No release baseline at this budget: it would cost three more hour-long runs, and its single-seed "
               "probe scored 0.64× at its best cfg.",
               {**_COMBINATION, _WIDE: {**_COMBINATION[_COMBINED], "head_channels": RECIPES["best"]["head_channels"]}},
               {**_LONG, "steps": 6000, "eval_every": 500}, rule="vs_source"),
    Experiment("noise_shift_highres", "At higher resolution with a larger patch, which noise shift?",
               "High-resolution training with a larger patch embedder needs a larger noise shift to break local "
               "pixel correlation and force global structure (Fig. 12).",
               _SHIFTS, _HIGHRES, rule="larger_shift"),
    Experiment("noise_shift_at_budget", "At higher resolution with a larger patch, which noise shift, once it learns?",
               "noise_shift_highres's claim (Fig. 12: a larger noise shift is better at high resolution with a larger "
               "patch), at the release's 1500-step budget: at 200 steps every shift scores the untrained model's "
               "0.067, on every seed.",
               _SHIFTS, {**_HIGHRES, **_LONG}, rule="larger_shift"),
    # the same shifts at the base resolution, 64² with 16-px patches (the toy's 1K), on the same ground-truth data
    # and budget: Fig. 12 asks for a larger shift because of the resolution, so here the 1K default should do.
    # Its shift-3 runs are `data_source_at_budget`'s ground-truth runs.
    Experiment("noise_shift_base_res", "At the base resolution, which noise shift?",
               "At the base resolution the release keeps Z-Image's shift of 3; Fig. 12 asks for a larger shift "
               "only at high resolution, where neighbouring pixels are more alike.",
               {"shift 3": _SHIFTS["shift 3"], "shift 1": _SHIFTS["shift 1"], "shift 12": _SHIFTS["shift 12"]},
               {**_LONG, "corpus": "ground_truth"}, rule="first_best"),
]


def get_experiment(name: str) -> Experiment:
    for e in EXPERIMENTS:
        if e.name == name:
            return e
    raise KeyError(f"unknown experiment {name!r}; known: {[e.name for e in EXPERIMENTS]}")


def variant_config(exp: Experiment, overrides: dict, mode: str, seed: int) -> FinetuneConfig:
    base = ABLATION_BASE[mode]
    if mode == "smoke":  # keep smoke runs tiny whatever the experiment asks for
        extra = {k: v for k, v in {**exp.base, **overrides}.items() if k not in BUDGET_FIELDS}
    else:
        extra = {**exp.base, **overrides}
    return base.replace(**extra, seed=seed)


def run_experiment(world, exp: Experiment | str, mode: Optional[str] = None, seeds=None, progress: bool = False
                   ) -> pd.DataFrame:
    """Every (variant, seed) run's evaluation curve, one row per evaluation."""
    exp = get_experiment(exp) if isinstance(exp, str) else exp
    mode = mode or world.mode
    rows = []
    for label, overrides in exp.variants.items():
        for seed in seeds or SEEDS[mode]:
            run = finetune(world, variant_config(exp, overrides, mode, seed), progress=progress)
            ev = run.evals.assign(variant=label, seed=seed)
            ev["final_loss"] = float(run.history["loss"].tail(25).mean())
            rows.append(ev)
    return pd.concat(rows, ignore_index=True)


def variant_runs(world, exp: Experiment | str, mode: Optional[str] = None, seed: int = 0) -> dict:
    """Each variant's run (cached) for one seed: {label: FinetuneRun}."""
    exp = get_experiment(exp) if isinstance(exp, str) else exp
    mode = mode or world.mode
    return {label: finetune(world, variant_config(exp, ov, mode, seed), progress=False)
            for label, ov in exp.variants.items()}


def _final_checks(world, exp: Experiment | str, mode: Optional[str], seeds, shifts=None) -> list:
    """One row per (seed, variant): the judge's checks and "overall" of the run's final model, sampled as the run
    was evaluated (`evaluate_pixel`); with `shifts`, one row per (seed, variant, shift) sampled with that noise
    shift, its "sampling shift" column saying which."""
    from .evaluator import Evaluator
    exp = get_experiment(exp) if isinstance(exp, str) else exp
    mode = mode or world.mode
    rows = []
    for seed in seeds or SEEDS[mode]:
        for label, run in variant_runs(world, exp, mode, seed).items():
            for shift in shifts or [None]:
                cfg, extra = run.config, {}
                if shift is not None:
                    cfg, extra = cfg.replace(shift=float(shift)), {"sampling shift": float(shift)}
                r = evaluate_pixel(world, run.model, cfg)
                rows.append({"variant": label, **extra, "seed": seed, **Evaluator.attribute_accuracy(r["scores"]),
                             "overall": r["geneval"]})
    return rows


def _over_seeds(rows: pd.DataFrame, keys: list, values: Optional[list] = None) -> pd.DataFrame:
    """Mean and std over the seeds of `values` (default: every other column), by `keys` in first-seen order, with
    the number of seeds: columns "NAME mean", "NAME std", "seeds"."""
    groups = rows.groupby(keys, sort=False)
    out = groups[values or [c for c in rows.columns if c not in keys + ["seed"]]].agg(["mean", "std"])
    out.columns = [f"{a} {b}" for a, b in out.columns]
    out["seeds"] = groups.seed.nunique()
    return out


def check_accuracy(world, exp: Experiment | str, mode: Optional[str] = None, seeds=None) -> pd.DataFrame:
    """Each judge check's accuracy (shape, colour, …) of every variant's final model, mean over seeds.

    Re-samples each run's last evaluation exactly (same prompts, seed and settings), so the "overall" column
    equals that run's final toy-GenEval.
    """
    df = pd.DataFrame(_final_checks(world, exp, mode, seeds))
    return df.drop(columns="seed").groupby("variant", sort=False).mean()


def checks_across(world, experiments: dict, mode: Optional[str] = None, checks=("overall", "position", "background"),
                  rows: Optional[list] = None) -> pd.DataFrame:
    """`check_accuracy` of experiments that share their variant labels, side by side: {column label: experiment}
    → rows the variants (`rows`, else the first experiment's order), columns (check, column label)."""
    tables = {label: check_accuracy(world, exp, mode).reindex(columns=list(checks)) for label, exp in experiments.items()}
    order = rows or list(next(iter(tables.values())).index)
    return pd.concat({(check, label): t[check].reindex(order) for check in checks for label, t in tables.items()},
                     axis=1)


def sampling_shift_table(world, exp: Experiment | str, shifts, mode: Optional[str] = None, seeds=None
                         ) -> pd.DataFrame:
    """Every variant's final models sampled with each noise shift in `shifts`, whatever shift they trained with:
    toy-GenEval ("overall") and each judge check (as `check_accuracy`), mean and std over seeds (rows: variant ×
    sampling shift).

    A run's shift sets both the σ it trains on and the schedule it samples with; this separates the two. The
    diagonal (each run's own shift) re-samples its last evaluation exactly, so it equals its final score.
    """
    return _over_seeds(pd.DataFrame(_final_checks(world, exp, mode, seeds, shifts)), ["variant", "sampling shift"])


def guidance_table(world, exp: Experiment | str, scales, mode: Optional[str] = None, seeds=None,
                   prompts: Optional[int] = None) -> pd.DataFrame:
    """toy-GenEval and toy-FID of every variant's final models at each cfg scale, mean ± std over seeds, with the
    source LDM on the same prompts and seeds as one more "variant" (rows: variant × cfg scale).

    `prompts`: how many evaluation prompts (default: the runs' own `eval_prompts`); more narrow the ±0.05 that
    one 100-prompt score carries.

    The runs are scored at the world's cfg; the release samples L2P at 2.0 and a pixel model trained without
    caption dropout may prefer less. Comparing each model at its own best scale keeps a ratio from resting on
    one shared choice.
    """
    exp = get_experiment(exp) if isinstance(exp, str) else exp
    mode = mode or world.mode
    runs = {seed: variant_runs(world, exp, mode, seed) for seed in seeds or SEEDS[mode]}
    return summarize_guidance(guidance_rows(world, runs, scales, prompts))


def guidance_rows(world, runs: dict, scales, prompts: Optional[int] = None) -> pd.DataFrame:
    """One row (variant, cfg, seed, geneval, fid) per model, scale and seed, for runs given as
    {seed: {label: FinetuneRun}}: each seed's runs and the source LDM sampled with that seed."""
    rows = []
    for seed, by_label in runs.items():
        cfg = next(iter(by_label.values())).config
        if cfg.image_size != world.image_size:
            raise ValueError(f"a run of seed {seed} trains at {cfg.image_size}²; the source LDM samples at "
                             f"{world.image_size}²")
        chosen = world.prompts(prompts or cfg.eval_prompts, seed=EVAL_SEED)
        sweeps = {"source LDM": world.guidance_sweep(world.latent_pipeline(), scales, chosen, seed=seed)}
        for label, run in by_label.items():  # sampled as the run was evaluated (`evaluate_pixel`), at each scale
            sweeps[label] = world.guidance_sweep(world.pixel_pipeline(run.model.eval()), scales, chosen, seed=seed,
                                                 image_size=run.config.image_size, shift=run.config.shift)
        for label, sweep in sweeps.items():
            rows += [{"variant": label, "cfg": s, "seed": seed, "geneval": r.geneval, "fid": r.fid}
                     for s, r in sweep.iterrows()]
    return pd.DataFrame(rows)


def summarize_guidance(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std over seeds of `guidance_rows` (rows: variant × cfg scale, in the order given)."""
    order = list(dict.fromkeys(rows.variant))
    return _over_seeds(rows, ["variant", "cfg"], ["geneval", "fid"]).reindex(order, level=0)


def best_guidance(table: pd.DataFrame) -> pd.DataFrame:
    """Each variant's best cfg scale (by mean toy-GenEval) and its score there, from `guidance_table`."""
    best = table["geneval mean"].groupby(level="variant", sort=False).idxmax()
    return pd.DataFrame([{"variant": v, "best cfg": idx[1], "geneval mean": table.loc[idx, "geneval mean"],
                          "geneval std": table.loc[idx, "geneval std"]} for v, idx in best.items()]).set_index("variant")


def plot_guidance(table: pd.DataFrame, title: str = "final models") -> Figure:
    """toy-GenEval and toy-FID against the cfg scale, one line per variant (mean ± std), from `guidance_table`."""
    fig = Figure(figsize=(9, 3), layout="constrained")
    for ax, key in zip(fig.subplots(1, 2), ("geneval", "fid")):
        for variant, g in table.groupby(level="variant", sort=False):
            g = g.droplevel("variant")
            ax.errorbar(g.index, g[f"{key} mean"], yerr=g[f"{key} std"].fillna(0), fmt="o-", capsize=3, label=variant)
        ax.set_xlabel("cfg scale")
        ax.set_title(f"toy-{'GenEval' if key == 'geneval' else 'FID'}, {title}")
        ax.legend(fontsize=7)
    return fig


def final_samples(runs: dict, title: str = "final samples, seed 0 (one row per variant)") -> Figure:
    """The last evaluation's first 8 samples of each run, a row per run (same prompts and seeds in each row)."""
    from .. import viz
    import torch
    finals = [(label, r.samples[max(r.samples)]) for label, r in runs.items()]
    return viz.image_grid(torch.cat([imgs for _, imgs in finals]), ncols=len(finals[0][1]), size=1.3,
                          row_labels=[label for label, _ in finals], fontsize=7, suptitle=title)


def final_table(curves: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std over seeds of the last evaluation of each variant."""
    last = curves[curves.step == curves.groupby(["variant", "seed"]).step.transform("max")]
    order = list(dict.fromkeys(curves.variant))
    agg = last.groupby("variant")[["geneval", "fid", "spectral", "final_loss"]].agg(["mean", "std"]).reindex(order)
    agg.columns = [f"{a} {b}" for a, b in agg.columns]
    agg["seeds"] = last.groupby("variant").seed.nunique().reindex(order)
    return agg


def summary_table(tables: dict) -> pd.DataFrame:
    """Every experiment's variants in one table, from {experiment name: `final_table`}."""
    return pd.DataFrame([{"experiment": name, "variant": v, "toy-GenEval": t.loc[v, "geneval mean"],
                          "± std": t.loc[v, "geneval std"], "toy-FID": t.loc[v, "fid mean"], "seeds": t.loc[v, "seeds"]}
                         for name, t in tables.items() for v in t.index])


def steps_to_reach(curves: pd.DataFrame, threshold: float, metric: str = "geneval") -> pd.DataFrame:
    """First evaluated step at which each (variant, seed) run reaches `threshold` (NaN: not within the run)."""
    out = []
    for (v, s), g in curves.groupby(["variant", "seed"], sort=False):
        hit = g[g[metric] >= threshold].step
        out.append({"variant": v, "seed": s, "steps": float(hit.min()) if len(hit) else np.nan,
                    "max_step": int(g.step.max())})
    return pd.DataFrame(out)


def plot_curves(curves: pd.DataFrame, title: str = "", reference: Optional[dict] = None) -> Figure:
    """toy-GenEval and toy-FID against steps: mean over seeds with a min–max band."""
    fig = Figure(figsize=(10, 3.3), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("geneval", "fid")):
        for v, g in curves.groupby("variant", sort=False):
            stats = g.groupby("step")[metric].agg(["mean", "min", "max"])
            ax.plot(stats.index, stats["mean"], "o-", ms=3, label=v)
            ax.fill_between(stats.index, stats["min"], stats["max"], alpha=0.2)
        if reference and metric in reference:
            ax.axhline(reference[metric], color="gray", ls="--", label="source LDM")
        ax.set_xlabel("fine-tuning step")
        ax.set_title(f"toy-{'GenEval' if metric == 'geneval' else 'FID'} {title}")
        ax.legend(fontsize=7)
    return fig


def plot_final(table: pd.DataFrame, metric: str = "geneval", title: str = "") -> Figure:
    """Bar chart of the final metric, mean ± std over seeds."""
    fig = Figure(figsize=(5, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(table)), table[f"{metric} mean"], yerr=table[f"{metric} std"].fillna(0), capsize=4)
    ax.set_xticks(range(len(table)), table.index, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"toy-{'GenEval' if metric == 'geneval' else metric}")
    ax.set_title(title)
    return fig


def introduce(exp: Experiment, budget: FinetuneConfig, source_geneval: float) -> str:
    """An experiment's heading in Markdown: its question, the paper's claim and the budget of its runs."""
    return (f"## {exp.name}\n**Question.** {exp.question}\n\n**Paper.** {exp.claim}\n\n"
            f"**Budget.** {budget.steps} steps × batch {budget.batch_size} per run, evaluated every "
            f"{budget.eval_every} steps on {budget.eval_prompts} prompts; source LDM on those prompts: "
            f"{source_geneval:.3f}")


def _ms(table: pd.DataFrame, v: str, metric: str = "geneval") -> str:
    return f"{table.loc[v, f'{metric} mean']:.3f} ± {table.loc[v, f'{metric} std']:.3f}"


def verdict(exp: Experiment | str, curves: pd.DataFrame, source_geneval: float) -> tuple[str, str]:
    """(what was found, agreement) in words, computed from the runs — never hand-written."""
    exp = get_experiment(exp) if isinstance(exp, str) else exp
    t = final_table(curves)
    default = t.index[0]
    best = t["geneval mean"].idxmax()
    margin = lambda a, b: t.loc[a, "geneval mean"] - t.loc[b, "geneval mean"]
    noise = lambda a, b: (t.loc[a, "geneval std"] ** 2 + t.loc[b, "geneval std"] ** 2) ** 0.5
    if exp.rule == "transfer":
        goal = 0.9 * source_geneval
        st = steps_to_reach(curves, goal)
        conv = st[st.variant == t.index[0]]
        scratch = st[st.variant == t.index[1]]
        n_conv, n_scr = conv.steps.mean(), scratch.steps.mean()
        horizon = int(curves.step.max())
        if goal <= 0:
            return "The source model scores 0, so '90% of the source' is no target.", "inconclusive"
        if np.isnan(n_conv) or n_conv == 0:
            found = (f"Neither run reached 90% of the source's toy-GenEval ({goal:.3f}) within {horizon} steps "
                     f"(final: converted {_ms(t, t.index[0])}, scratch {_ms(t, t.index[1])}).")
            # A weaker but measurable form of the claim: steps the converted init needs to match what
            # training from scratch reached at the end of its budget.
            level = float(t.loc[t.index[1], "geneval mean"])
            reach = steps_to_reach(curves[curves.variant == t.index[0]], level).steps.mean()
            if level > 0 and not np.isnan(reach) and reach > 0:
                found += (f" The converted init matched scratch's final score ({level:.3f}) after {reach:.0f} "
                          f"steps: ≥ {horizon / reach:.1f}× fewer.")
                return found, f"inconclusive on the 90% goal; in direction, transfer is ≥ {horizon / reach:.1f}× faster"
            return found, "inconclusive"
        if scratch.steps.isna().any():
            ratio = horizon / n_conv
            found = (f"The converted model reached 90% of the source ({goal:.3f}) after {n_conv:.0f} steps on "
                     f"average; from scratch did not reach it within {horizon} steps in "
                     f"{int(scratch.steps.isna().sum())}/{len(scratch)} seeds (final {_ms(t, t.index[1])}): "
                     f"step ratio > {ratio:.1f}×.")
        else:
            ratio = n_scr / n_conv
            found = f"Steps to 90% of the source: converted {n_conv:.0f}, scratch {n_scr:.0f}: ratio {ratio:.1f}×."
        lower_bound = bool(scratch.steps.isna().any())  # scratch never got there: the true ratio is larger
        if ratio >= 10:
            return found, "agrees (≥ 10×)"
        if ratio > 1 or lower_bound:
            return found, f"agrees in direction; {'≥ ' if lower_bound else ''}{ratio:.1f}× measured (goal 10×)"
        return found, "disagrees"
    found = "Final toy-GenEval (mean ± std over seeds): " + "; ".join(f"{v} {_ms(t, v)}" for v in t.index) + "."
    if curves.step.min() == 0:  # each run is also scored untrained: a short budget can end where it began
        start = curves[curves.step == 0].groupby("variant").geneval.mean().reindex(t.index)
        found += f" Untrained (step 0): {start.min():.3f}" + (f"–{start.max():.3f}." if start.max() > start.min()
                                                                 else ".")
        if ((t["geneval mean"] - start) <= t["geneval std"].fillna(0)).all():
            return found, ("inconclusive: no variant ends above its untrained score by more than the seed spread; "
                           "this budget is too short to tell them apart")
    if exp.rule == "first_best":
        others = [v for v in t.index if v != default]
        wins = [v for v in others if margin(default, v) > noise(default, v)]
        ties = [v for v in others if abs(margin(default, v)) <= noise(default, v)]
        if len(wins) == len(others):
            return found, f"agrees: {default} beats every alternative by more than the seed spread"
        if best == default:
            return found, f"agrees in direction: {default} is best, but within the seed spread of {', '.join(ties)}"
        if margin(best, default) <= noise(best, default):
            return found, (f"inconclusive: {best} scores higher than {default} by {margin(best, default):.3f}, "
                           f"within the seed spread ({noise(best, default):.3f})")
        return found, f"disagrees: {best} beats {default} by more than the seed spread"
    if exp.rule == "saturates":  # variants run from the smallest corpus to the largest
        g, largest = t["geneval mean"].values, t.index[-1]
        worst = t["geneval mean"].idxmin()
        if len(g) < 3 or margin(best, worst) <= noise(best, worst):
            # flat within the spread: saturation and "nothing learned yet" look alike, so no verdict
            return found, "inconclusive: no corpus size differs from another by more than the seed spread"
        if best != largest and margin(best, largest) > noise(best, largest):
            return found, f"disagrees: {best} beats the largest corpus ({largest}) by more than the seed spread"
        first, last = g[1] - g[0], g[-1] - g[1]
        return found, ("agrees: gains shrink as the corpus grows" if 0 <= last < first else
                       "disagrees: the larger corpus still helps as much or more")
    if exp.rule == "vs_source":  # measured against the source itself: the best variant
        if source_geneval <= 0:
            return found, "inconclusive: the source scores 0"
        ratio = float(t.loc[best, "geneval mean"]) / source_geneval
        found += f" The best, {best}, is {ratio:.2f}× the source's {source_geneval:.3f} at the same cfg."
        return found, ("agrees: ≥ 0.9× the source" if ratio >= 0.9 else
                       f"disagrees at this cfg: {ratio:.2f}× the source (paper: 0.93×; goal 0.9×)")
    if exp.rule == "larger_shift":
        best_shift = float(best.split()[-1])
        ties = [v for v in t.index if v != best and abs(margin(best, v)) <= noise(best, v)]
        if ties:
            return found, f"inconclusive: {best} is within the seed spread of {', '.join(ties)}"
        return found, ("agrees: a shift above the 1K default of 3 is best" if best_shift > 3 else
                       f"disagrees: the best shift here is {best_shift:g}")
    if best == default or margin(best, default) <= noise(best, default):
        return found, (f"no claim in the paper; no variant beats {default} by more than the seed spread"
                       + ("" if best == default else f" ({best} is {margin(best, default):+.3f}, spread "
                                                     f"{noise(best, default):.3f})"))
    return found, f"no claim in the paper; {best} beats {default} by more than the seed spread"
