"""The L2P recipe end to end in the toy world: convert the source LDM, fine-tune, evaluate — cached runs.

Every run is keyed by its full config, so notebooks share runs (the best recipe's runs that notebook 03
shows are the ones 04 · `combined_long` compares) and a re-run computes only
what changed.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
import torch

from ..cache import cached, run_threads, without_late_defaults
from ..config import TOY_DETAILER, TOY_DETAILER_FINE, DetailerConfig
from ..model import ZImageDiT
from ..train import TrainConfig, train
from .world import ToyWorld


@dataclass(frozen=True)
class FinetuneConfig:
    """One toy fine-tuning run."""

    policy: str = "paper"
    n: int = 1  # the toy trunk has 4 main layers: n=1 trains layers 0 and 3, freezes 1–2 (as 5…24 of 30)
    init: str = "release"  # "release", "vae_fit" (l2p convert inits) or "scratch" (no transfer)
    corpus: str = "source"  # "source" (the LDM's own renders), "ground_truth" or "cross" (another LDM's)
    corpus_size: int = 2000
    steps: int = 1500
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 50
    shift: float = 3.0
    patch: int = 16
    image_size: int = 64
    eval_every: int = 250
    eval_prompts: int = 100
    seed: int = 0
    prediction: str = "velocity"  # the Detailer Head's output: "velocity" (release), "x" (JiT) or "edm" (options)
    head_channels: Optional[tuple[int, ...]] = None  # Detailer Head widths; None = the world's (toy_detailer)
    ema_decay: Optional[float] = None  # evaluate an exponential moving average of the weights at the end
    seeded_noise: bool = True  # ε from each image's seed, the same every epoch (the release); False: fresh ε
    caption_dropout: float = 0.0  # the release trains on captions only; > 0 also trains the unconditional branch
    lr_decay: str = "constant"  # the release keeps the learning rate constant; "cosine" decays it to 0
    head_time: bool = False  # True: a σ-conditioned (FiLM) Detailer Head, DetailerConfig.time_conditioning
    head_upsample: str = "nearest"  # "learned": transposed-conv upsampling in the head, DetailerConfig.upsample
    latent_loss: float = 0.0  # > 0: also match the toy VAE encoder's latents of x̂0 and x0 (TrainConfig option)
    vae_fit_gain: Optional[float] = None  # init="vae_fit": cap on the fit's noise gain (convert's vae_fit_noise_gain)
    # A finished run to continue: its merged model is this run's init (fresh optimizer; built if not cached).
    # With lr_decay="cosine" that is a cooldown of a constant-rate run, as in warmup-stable-decay schedules.
    start_from: Optional["FinetuneConfig"] = None

    def replace(self, **kw) -> "FinetuneConfig":
        return replace(self, **kw)

    def key(self) -> dict:
        """The cache key: fields added later are left out at their defaults, so older runs stay valid."""
        key = without_late_defaults(self, _LATE_FIELDS)
        if self.start_from is not None:
            key["start_from"] = self.start_from.key()
        return key


_LATE_FIELDS = {"prediction": "velocity", "head_channels": None, "ema_decay": None, "seeded_noise": True,
                "caption_dropout": 0.0, "lr_decay": "constant", "head_time": False,
                "head_upsample": "nearest", "latent_loss": 0.0, "vae_fit_gain": None, "start_from": None}
# What a continuation must share with the run it starts from: they fix the model it loads.
_CONTINUATION_FIELDS = ("init", "vae_fit_gain", "patch", "image_size", "prediction", "head_channels", "head_time",
                        "head_upsample")


EVAL_SEED = 4242  # the prompt set every fine-tuning run is evaluated on (and the source, to compare)

# The release's recipe at the toy budget (1500 × 32), and its smoke-sized twin
FINETUNE_MODES = {"full": FinetuneConfig(), "smoke": FinetuneConfig(corpus_size=16, steps=4, batch_size=4,
                                                                    eval_every=2, eval_prompts=8)}

# Named recipes (changes to FINETUNE_MODES). "best" is the best 04 found (`combined_long`, 16-wide head): a
# σ-conditioned Detailer Head as wide as the toy VAE's decoder, the embedder initialised by a capped fit to the
# VAE, and a loss on the VAE's latents of x̂0 (λ=0.5), trained 4× the release's steps. Notebook 03 trains it.
RECIPES = {
    "release": {},
    "best": {"head_time": True, "init": "vae_fit", "vae_fit_gain": 1.0, "latent_loss": 0.5,
             "head_channels": (16, 32, 64, 64), "steps": 6000, "eval_every": 500},
}
BUDGET_FIELDS = ("steps", "eval_every", "corpus_size", "batch_size", "eval_prompts")  # what smoke mode keeps tiny
# The guidance scale each recipe's pixel model samples best at, as notebook 03 measured it (3 seeds, 300 prompts:
# the best recipe scores 0.569 at 1.0 and 0.44 at the world's 3.0); None: the world's scale. Notebooks 02 and 05
# sample the pixel model at it. A default setting, as Z-Image's cfg 2.0 is; 03 re-measures it on every run.
RECIPE_CFG = {"release": None, "best": 1.0}


def _known_recipe(recipe: str) -> None:
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}: choose one of {', '.join(RECIPES)}")


def recipe_config(recipe: str = "best", mode: str = "full", **changes) -> FinetuneConfig:
    """A named recipe at `mode`'s scale (smoke keeps its tiny budget), with any fields changed."""
    _known_recipe(recipe)
    if mode not in FINETUNE_MODES:
        raise ValueError(f"unknown mode {mode!r}: choose one of {', '.join(FINETUNE_MODES)}")
    fields = {k: v for k, v in RECIPES[recipe].items() if mode != "smoke" or k not in BUDGET_FIELDS}
    unknown = sorted(set(changes) - set(FinetuneConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown fine-tuning fields {unknown}: see FinetuneConfig")
    if changes.get("head_channels") is not None:  # a JSON or papermill list
        changes["head_channels"] = tuple(changes["head_channels"])
    return FINETUNE_MODES[mode].replace(**{**fields, **changes})


def recipe_cfg(recipe: str, world: ToyWorld) -> float:
    """The guidance scale to sample `recipe`'s pixel model at (`RECIPE_CFG`, else the world's)."""
    _known_recipe(recipe)
    return RECIPE_CFG.get(recipe) or world.cfg_scale


def from_scratch(cfg: FinetuneConfig) -> FinetuneConfig:
    """The same run from random init: no transfer, so nothing of the VAE fit's settings applies."""
    return cfg.replace(init="scratch", vae_fit_gain=None)


@dataclass
class FinetuneRun:
    """A finished run: the merged pixel model, its loss history and its evaluation curve."""

    config: FinetuneConfig
    model: ZImageDiT
    history: pd.DataFrame
    evals: pd.DataFrame
    path: Path
    samples: dict  # step -> (8, 3, H, W) samples of the first eval prompts, same seeds at every step


# ----------------------------------------------------------------------------------------------
#                                        Conversion
# ----------------------------------------------------------------------------------------------

def source_checkpoint(world: ToyWorld) -> Path:
    """The source LDM as a safetensors file (it lives in the world's cache entry)."""
    from ..cache import cache_dir, key_for
    return cache_dir() / key_for("toy_source_ldm", world.spec.ldm_key(), world.spec.ldm.seed) / "model.safetensors"


def pixel_init(world: ToyWorld, init: str = "release", patch_sizes=(16,), detailer: DetailerConfig = TOY_DETAILER,
               seed: int = 0, vae_fit_gain: Optional[float] = None):
    """`l2p convert` of the toy source LDM (cached): (path to the pixel-init file, ConvertReport dict)."""
    from ..convert import convert
    from .scenes import generate, to_tensor

    if vae_fit_gain is not None and init != "vae_fit":
        raise ValueError(f"vae_fit_gain applies to init='vae_fit' only, not {init!r}")

    def save(_, p):
        kw = {}
        if init == "vae_fit":
            kw = {"vae": world.vae, "sample_images": to_tensor(generate(256, 777, world.world)[0]),
                  "vae_fit_noise_gain": vae_fit_gain}
        rep = convert(source_checkpoint(world), p / "pixel_init.safetensors", patch_sizes=tuple(patch_sizes),
                      detailer=detailer, init=init, seed=seed, progress=False, **kw)
        rep.save_json(p / "report.json")

    key = {"world": world.spec.key(), "init": init, "patches": list(patch_sizes),
           "detailer": {"channels": list(detailer.channels), "out_channels": detailer.out_channels}}
    if detailer.time_conditioning:  # only then, so that the keys of earlier inits stay valid
        key["detailer"]["time_conditioning"] = True
    if detailer.upsample != "nearest":
        key["detailer"]["upsample"] = detailer.upsample
    if vae_fit_gain is not None:
        key["vae_fit_gain"] = vae_fit_gain
    path = cached("toy_pixel_init", key, seed, build_fn=lambda: None, save_fn=save, load_fn=lambda p: p)
    return path / "pixel_init.safetensors"


def toy_detailer(world: ToyWorld) -> DetailerConfig:
    """The toy Detailer Head whose bottleneck sits on this world's token grid (depth log2 of its pixel patch)."""
    heads = {16: TOY_DETAILER, 8: TOY_DETAILER_FINE}
    if world.spec.pixel_patch not in heads:
        raise ValueError(f"no toy Detailer Head for pixel patch {world.spec.pixel_patch}; known: {sorted(heads)}")
    return heads[world.spec.pixel_patch]


def _detailer(world: ToyWorld, cfg: FinetuneConfig) -> DetailerConfig:
    return DetailerConfig(channels=tuple(cfg.head_channels or toy_detailer(world).channels),
                          prediction=cfg.prediction, time_conditioning=cfg.head_time, upsample=cfg.head_upsample)


def _init_path(world: ToyWorld, cfg: FinetuneConfig) -> Path:
    """The converted file a run starts from (from scratch: the release init's file, for its architecture)."""
    return pixel_init(world, "release" if cfg.init == "scratch" else cfg.init, (cfg.patch,),
                      detailer=replace(_detailer(world, cfg), prediction="velocity"), vae_fit_gain=cfg.vae_fit_gain)


def initial_model(world: ToyWorld, cfg: FinetuneConfig) -> ZImageDiT:
    """The converted init, the same architecture from scratch (no transfer), or a finished run to continue."""
    if cfg.start_from is not None:
        parent = cfg.start_from
        for f in _CONTINUATION_FIELDS:
            if getattr(parent, f) != getattr(cfg, f):
                raise ValueError(f"start_from has {f}={getattr(parent, f)!r} and this run {f}={getattr(cfg, f)!r}: "
                                 "a continuation keeps the model of the run it starts from")
        return finetune(world, parent, progress=False).model
    det = _detailer(world, cfg)
    model = ZImageDiT.from_pretrained(_init_path(world, cfg))
    model.cfg = model.cfg.replace(detailer=det)  # what the head predicts does not change its weights
    if cfg.init == "scratch":
        torch.manual_seed(cfg.seed)
        model = ZImageDiT(model.cfg).init_for_training_from_scratch(torch.Generator().manual_seed(cfg.seed))
    return model


# ----------------------------------------------------------------------------------------------
#                                        Fine-tuning
# ----------------------------------------------------------------------------------------------

def corpus_dir(world: ToyWorld, cfg: FinetuneConfig) -> Path:
    if cfg.corpus != "ground_truth" and cfg.image_size != world.image_size:
        raise ValueError(f"the {cfg.corpus!r} corpus is rendered at {world.image_size}²; at {cfg.image_size}² "
                         "train on the ground-truth corpus")
    if cfg.corpus == "source":
        return world.corpus(cfg.corpus_size)
    if cfg.corpus == "ground_truth":
        return world.ground_truth_corpus(cfg.corpus_size, size=cfg.image_size)
    if cfg.corpus == "cross":
        return world.corpus(cfg.corpus_size, source=cross_source(world), name="toy_cross_corpus")
    raise ValueError(f"unknown corpus {cfg.corpus!r}: source, ground_truth or cross")


def cross_source(world: ToyWorld) -> ZImageDiT:
    """A second toy LDM: another seed, another image stream, half the steps (the paper's "cross-model" data).

    Half the training keeps the report's budget; it also makes the second model differ in quality, as two
    real models do.
    """
    from .world import cached_ldm
    ldm = world.spec.ldm.replace(seed=world.spec.ldm.seed + 1, data_seed=world.spec.ldm.data_seed + 1,
                                 steps=max(1, world.spec.ldm.steps // 2))
    return cached_ldm(world.spec, ldm, world.vae, world.text, progress=False)[0]


def prepare(world: ToyWorld, cfg: FinetuneConfig) -> None:
    """Build (or find) what a run needs before it trains: its corpus, a second LDM for it, its converted init.

    These are built on `build_threads()`; the report's prebuild makes them one by one before its 1-thread
    run workers start, so that no 2-thread build shares the cores with them.
    """
    corpus_dir(world, cfg)
    _init_path(world, cfg)


def _dataset(world: ToyWorld, cfg: FinetuneConfig):
    """The training images at the run's resolution (the corpus is rendered at the world's size)."""
    from ..data import ImageTextDataset
    root = corpus_dir(world, cfg)
    ds = ImageTextDataset(root, max_pixels=cfg.image_size ** 2)
    world.text.prefill([e.prompt for e in ds.entries] + [""], batch_size=256)
    return ds


def evaluate_pixel(world: ToyWorld, model: ZImageDiT, cfg: FinetuneConfig, cache: bool = True) -> dict:
    """`ToyWorld.evaluate` of a pixel model as a run with `cfg` is evaluated: its prompts, seed, size and shift.

    On a finished run's model it re-samples the run's last evaluation exactly, so its "geneval" is the
    run's final score and its "scores" hold every judge check behind it. The evaluations during training
    pass `cache=False`: their weights are never seen again.
    """
    return world.evaluate(world.pixel_pipeline(model.eval()), world.prompts(cfg.eval_prompts, seed=EVAL_SEED),
                          seed=cfg.seed, image_size=cfg.image_size, shift=cfg.shift, cache=cache)


def evaluate_source(world: ToyWorld, cfg: FinetuneConfig) -> dict:
    """The source LDM judged as a run with `cfg` is: on its evaluation prompts and seed, so the two compare."""
    return world.evaluate(world.latent_pipeline(), world.prompts(cfg.eval_prompts, seed=EVAL_SEED), seed=cfg.seed)


def finetune(world: ToyWorld, cfg: FinetuneConfig = FinetuneConfig(), progress: bool = True,
             log: Optional[Callable[[str], None]] = None) -> FinetuneRun:
    """Fine-tune the converted toy model (cached by config): L2P's step 3, plus the merge of step 4.

    `log`, if given, receives one line per evaluation while the run trains ("step 250/1500: toy-GenEval …"),
    a heartbeat for runs whose progress bar is off (the prebuild's workers); a cached run logs nothing.
    """

    def build():
        t0 = time.perf_counter()
        model = initial_model(world, cfg)
        ds = _dataset(world, cfg)
        evals, samples = [], {}

        def eval_fn(m, step):
            m.eval()
            r = evaluate_pixel(world, m, cfg, cache=False)
            m.train()
            row = {"step": step, "geneval": r["geneval"], "fid": r["fid"], "spectral": r["spectral"]}
            evals.append(row)
            samples[step] = r["images"][:8].clone()
            if log is not None:
                log(f"step {step}/{cfg.steps}: toy-GenEval {r['geneval']:.3f} "
                    f"({(time.perf_counter() - t0) / 60:.1f} min in)")
            return row

        eval_fn(model, 0)
        tcfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup,
                           policy="full" if cfg.init == "scratch" else cfg.policy, n_keep=cfg.n, shift=cfg.shift,
                           seeded_noise=cfg.seeded_noise, eval_every=cfg.eval_every, seed=cfg.seed, verbose=progress,
                           log_every=25, ema_decay=cfg.ema_decay,
                           caption_dropout=cfg.caption_dropout, lr_decay=cfg.lr_decay,
                           latent_loss_weight=cfg.latent_loss)
        encoder = None
        if cfg.latent_loss > 0:
            from ..pipeline import vae_latents
            vae = world.vae.eval().requires_grad_(False)
            encoder = lambda x: vae_latents(vae, x)  # noqa: E731
        history = train(model, ds, world.text.encode_list, tcfg, eval_fn=eval_fn, latent_encoder=encoder)
        if not evals or evals[-1]["step"] != cfg.steps:
            eval_fn(model, cfg.steps)
        return model, history, pd.DataFrame(evals), samples

    def save(art, p):
        from ..checkpoint import atomic_save
        model, history, evals, samples = art
        atomic_save({k: v.contiguous() for k, v in model.state_dict().items()}, p / "model.safetensors",
                    metadata={"l2p_config": json.dumps(model.cfg.to_dict())})
        history.to_csv(p / "history.csv", index=False)
        evals.to_csv(p / "evals.csv", index=False)
        torch.save({int(k): v for k, v in samples.items()}, p / "samples.pt")

    def load(p):
        return FinetuneRun(cfg, ZImageDiT.from_pretrained(p / "model.safetensors"), pd.read_csv(p / "history.csv"),
                           pd.read_csv(p / "evals.csv"), p, torch.load(p / "samples.pt"))

    return cached("toy_finetune", run_key(world.spec, cfg), cfg.seed, build_fn=build, save_fn=save, load_fn=load,
                  threads=run_threads())


def run_key(spec, cfg: FinetuneConfig) -> dict:
    """The cache key of a fine-tuning run: its world's key and its own config."""
    return {"world": spec.key(), **cfg.key()}
