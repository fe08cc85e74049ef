"""Flow-matching fine-tuning of the DiT (step 3 of the L2P recipe), in one readable file.

The same loop trains the toy source LDM on VAE latents (from scratch, with caption dropout) and the
pixel model from a converted init (selective freeze or LoRA). Per step, for each item: draw σ uniformly
over the indices of the 500-step shift-3 grid, x_σ = (1−σ)·x0 + σ·ε, loss = MSE(−DiT(x_σ, 1−σ), ε − x0)
(z_image_facts.md §5, §10).

Noise. With ``seeded_noise`` (the default, as the release) an item whose row has a ``seed`` gets
ε = randn(Generator().manual_seed(seed)): the *same* ε every epoch, so each image is only ever seen with one
noise pattern, at varying σ. Items without a seed, and all items with ``seeded_noise=False``, get fresh ε each
step. The release draws on the CUDA generator; we draw on the CPU one, so equal seeds give different ε.

Determinism. Data order, σ, fresh noise and caption dropout are pure functions of (seed, step, rank):
every micro-batch gets its own generator seeded from them. The step number is therefore the whole RNG and
data state, which makes resume exact (bit for bit on CPU, tested) and gives each process distinct draws.

Multi-GPU: run the same command under ``accelerate launch -m l2p.cli train ...`` (DDP). Each process takes
its own batches of the global batch; only the main process writes files. DeepSpeed/FSDP are not supported:
their optimizer state is sharded, and the resume state here is a plain ``optimizer.state_dict()``.

Output folder: ``step-N.safetensors`` (the trained tensors under the model's own key names, the release's
layout with no ``pipe.dit.`` prefix, ready for ``l2p merge``; LoRA adapters under peft's names),
``state-N.pt`` (optimizer, scheduler, EMA, history, config), ``loss.csv``, ``eval.csv``. Each file appears
atomically (temp name + rename), so a kill at any moment leaves the previous checkpoint usable.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .checkpoint import atomic_save, key_seed, read_state_dict
from .flow import add_noise, flow_matching_loss, latent_matching_loss
from .freeze import FreezeSummary, apply_policy, canonical, parameter_table
from .schedule import dit_time, sample_training_sigma


@dataclass
class TrainConfig:
    """Hyper-parameters; defaults are the release's (`train_run.sh`, DiffSynth's runner) where it has one."""

    steps: int = 1000
    batch_size: int = 1  # per process; the release uses 1 per GPU
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int = 0
    lr_decay: str = "constant"  # after warmup: "constant" (the release) or "cosine" (to 0 at the last step)
    grad_accum: int = 1
    grad_clip: Optional[float] = None  # the release does not clip; the norm is logged either way
    policy: str = "paper"  # see l2p.freeze
    n_keep: int = 5  # paper policy: the first and last n main layers train
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    lora_rank: int = 0  # > 0: LoRA adapters instead of the freeze policy
    lora_alpha: Optional[float] = None  # None: = rank (scale 1)
    lora_blocks: Optional[Sequence[int]] = None  # main layers that get adapters; None: all
    lora_train_head: bool = False  # also train the Detailer Head in full
    shift: float = 3.0  # larger for high resolution / large patches (the 4K model)
    patch_size: Optional[int] = None  # which RGB embedder trains, e.g. 64 for the 4K path (None: the first)
    num_train_timesteps: int = 500
    seeded_noise: bool = True  # ε from each image's `seed` column: the same ε every epoch (module docstring)
    caption_dropout: float = 0.0  # > 0 when training a model for classifier-free guidance
    mixed_precision: str = "no"  # "bf16": autocast (used when train() builds the Accelerator itself)
    gradient_checkpointing: bool = False
    offload_text_encoder: bool = False  # encode every prompt once up front, then move the encoder to the CPU
    ema_decay: Optional[float] = None
    # > 0: add this times `flow.latent_matching_loss` (a frozen encoder's latents of x̂0 vs x0; pass the encoder
    # as train(latent_encoder=...)). Not in the release. The logged "loss" stays the flow-matching term alone.
    latent_loss_weight: float = 0.0
    num_workers: int = 0  # DataLoader workers decoding images
    log_every: int = 10  # progress-bar refresh
    save_every: int = 0  # 0: only at the end
    keep_states: int = 1  # resume states kept (each holds the optimizer: 2× the trained weights)
    eval_every: int = 0
    seed: int = 0
    verbose: bool = True  # freeze table and progress bar (main process only)


# Changing these between a checkpoint and its resume would silently change the run.
_RESUME_FIELDS = ("batch_size", "grad_accum", "seed", "policy", "n_keep", "include", "exclude", "lora_rank",
                  "lora_alpha", "lora_blocks", "lora_train_head", "shift", "num_train_timesteps", "seeded_noise",
                  "patch_size", "lr_decay", "latent_loss_weight")
LOG_COLUMNS = ("step", "loss", "lr", "grad_norm", "sec")
LR_DECAYS = ("constant", "cosine")


class TrainingDiverged(RuntimeError):
    """Loss (or gradient norm) became NaN/inf; nothing was updated and the last checkpoint is intact."""

    def __init__(self, message: str, step: int, checkpoint: Optional[Path]):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


# ----------------------------------------------------------------------------------------------
#                                  Deterministic data order
# ----------------------------------------------------------------------------------------------

class StepBatches(torch.utils.data.Sampler):
    """The batches one process sees for steps start … end−1, each a pure function of (seed, step, rank).

    An epoch is BucketBatchSampler's shuffle for that epoch (one image size per batch). Local batch b of the
    whole run is batch b mod L of epoch b div L, where L is the number of batches per epoch; micro-step m of
    global step s on rank r of w uses b = (s·grad_accum + m)·w + r.
    """

    def __init__(self, sizes: Sequence[tuple[int, int]], batch_size: int, seed: int, start: int, end: int,
                 grad_accum: int = 1, rank: int = 0, world: int = 1):
        from .data import BucketBatchSampler
        self.sampler = BucketBatchSampler(sizes, batch_size, shuffle=True, seed=seed)
        self.n_batches = len(self.sampler)
        self.first, self.last = start * grad_accum, end * grad_accum
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return self.last - self.first

    def __iter__(self):
        epoch, plan = None, None
        for micro in range(self.first, self.last):
            e, k = divmod(micro * self.world + self.rank, self.n_batches)
            if e != epoch:
                self.sampler.set_epoch(e)
                epoch, plan = e, list(self.sampler)
            yield plan[k]


def dataset_sizes(dataset) -> list[tuple[int, int]]:
    """Training (H, W) per item when the dataset knows them without decoding; else one shared bucket."""
    return dataset.sizes() if hasattr(dataset, "sizes") else [(0, 0)] * len(dataset)


def collate(items: list[dict]) -> dict:
    """Stack one-size images; mixed sizes stay a list (the DiT pads and masks between items)."""
    xs = [it["x"] for it in items]
    same = len({tuple(x.shape) for x in xs}) == 1
    return {"x": torch.stack(xs) if same else xs, "prompt": [it["prompt"] for it in items],
            "seed": [it.get("seed") for it in items]}


def _dataset_prompts(dataset) -> list[str]:
    """Every prompt, without decoding images when the dataset keeps its rows (ImageTextDataset)."""
    if hasattr(dataset, "entries"):
        return [e.prompt for e in dataset.entries]
    return [dataset[i]["prompt"] for i in range(len(dataset))]


# ----------------------------------------------------------------------------------------------
#                                  Trainable subset and LoRA
# ----------------------------------------------------------------------------------------------

LORA_FFN_ATTN = r"(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.(w1|w2|w3))"


def lora_target(blocks: Optional[Sequence[int]] = None) -> str:
    """peft target regex: the attention and FFN Linears of the chosen main layers (ai-toolkit style)."""
    idx = r"\d+" if blocks is None else "|".join(str(int(b)) for b in blocks)
    return rf"layers\.({idx})\.{LORA_FFN_ATTN}"


def add_lora(model: nn.Module, rank: int, alpha: Optional[float] = None, target: str = lora_target(),
             train_head: bool = False, seed: int = 0) -> nn.Module:
    """Inject peft LoRA adapters in place; only they train (plus the Detailer Head with train_head)."""
    from peft import LoraConfig, inject_adapter_in_model

    for p in model.parameters():
        p.requires_grad_(False)
    alpha = alpha or rank
    with torch.random.fork_rng(devices=[]):  # peft draws lora_A from the global RNG: make it a function of seed
        torch.manual_seed(seed)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=target), model)
    if train_head:
        for name, p in model.named_parameters():
            if canonical(name).startswith("local_decoder."):
                p.requires_grad_(True)
    # Written into each step file's metadata, so load_lora can rebuild the same adapters.
    model.l2p_lora = {"r": rank, "alpha": alpha, "target": target, "train_head": train_head}
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base Linear and drop peft's wrappers: the release's keys again."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    for attr in ("peft_config", "l2p_lora"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def load_lora(model: nn.Module, path) -> nn.Module:
    """Inject the adapters a LoRA step file describes (its `l2p_lora` metadata) and load its tensors."""
    from .checkpoint import CheckpointReader

    with CheckpointReader(path) as r:
        if "l2p_lora" not in r.metadata:
            raise ValueError(f"{path}: not a LoRA checkpoint (no l2p_lora metadata)")
        spec = json.loads(r.metadata["l2p_lora"])
    add_lora(model, spec["r"], spec["alpha"], spec["target"], spec["train_head"])
    _load_trainable(model, read_state_dict(path), str(path))
    return model


def prepare_trainable(model: nn.Module, cfg: TrainConfig) -> FreezeSummary:
    """Apply the freeze policy, or inject LoRA adapters; returns the summary (prints as a table)."""
    if cfg.lora_rank > 0:
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, lora_target(cfg.lora_blocks), cfg.lora_train_head, cfg.seed)
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        return FreezeSummary(policy=f"lora r={cfg.lora_rank}", trainable=names, table=parameter_table(model, names))
    exclude = list(cfg.exclude) + _unused_embedders(model, cfg.patch_size)
    return apply_policy(model, cfg.policy, n=cfg.n_keep, include=list(cfg.include) or None,
                        exclude=exclude or None)


def _unused_embedders(model: nn.Module, patch_size: Optional[int]) -> list[str]:
    """Patch embedders this run never calls (a 4K model trained at patch 64 leaves 16-1 idle).

    They would get no gradient: DDP stops on trainable parameters without one, and the step file would
    carry an untouched copy. So they stay frozen whatever the policy says.
    """
    cfg = getattr(model, "cfg", None)
    if cfg is None or len(cfg.all_patch_size) < 2:
        return []
    used = patch_size or cfg.default_patch
    if used not in cfg.all_patch_size:
        raise ValueError(f"patch_size {used}: the model has embedders for {list(cfg.all_patch_size)}")
    return [f"all_x_embedder.{p}-{f}.*" for p, f in zip(cfg.all_patch_size, cfg.all_f_patch_size) if p != used]


def _file_key(name: str) -> str:
    """Checkpoint key of a parameter: wrapper prefixes dropped, peft's adapter name dropped (its file layout)."""
    return re.sub(r"\.(lora_[AB])\.default\.", r".\1.", canonical(name))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors under release key names (LoRA: peft's `...lora_A.weight` names)."""
    return {_file_key(n): p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a step file into the trainable tensors; every one must be there, nothing else may be."""
    names = {_file_key(n): n for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(names) - set(state)), sorted(set(state) - set(names))
    if missing or extra:
        raise ValueError(f"{source} does not match the trainable set: missing {missing[:5]}, unexpected {extra[:5]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, t in state.items():
            params[names[key]].copy_(t)


# ----------------------------------------------------------------------------------------------
#                                       Checkpoints
# ----------------------------------------------------------------------------------------------

_STATE = re.compile(r"state-(\d+)\.pt")


def _state_steps(out: Path) -> list[int]:
    return [int(m.group(1)) for p in out.glob("state-*.pt") if (m := _STATE.fullmatch(p.name))]


def latest_checkpoint(out_dir) -> Optional[int]:
    """The newest step whose weights and resume state are both complete (temp files never count)."""
    out = Path(out_dir)
    steps = [s for s in _state_steps(out) if (out / f"step-{s}.safetensors").is_file()]
    return max(steps) if steps else None


def _metadata(model: nn.Module, step: int) -> dict[str, str]:
    meta = {"step": str(step)}
    if hasattr(model, "cfg") and hasattr(model.cfg, "to_dict"):  # what merge needs beyond the shapes
        meta["l2p_config"] = json.dumps(model.cfg.to_dict())
    if hasattr(model, "l2p_lora"):
        meta["l2p_lora"] = json.dumps(model.l2p_lora)
    return meta


def ema_weights(ema: dict, decay: float, steps: int) -> dict:
    """The bias-corrected average: the zero-started accumulator divided by 1 − decay^steps."""
    return {n: t / (1 - decay ** max(steps, 1)) for n, t in ema.items()}


def _save(out: Path, step: int, model: nn.Module, opt, sched, ema, history: list, cfg: TrainConfig) -> None:
    """Weights first, then the state that makes them resumable: a kill in between leaves the older pair."""
    atomic_save(trainable_state(model), out / f"step-{step}.safetensors", metadata=_metadata(model, step))
    if ema is not None:
        atomic_save({_file_key(n): t for n, t in ema_weights(ema, cfg.ema_decay, step).items()},
                    out / f"ema-{step}.safetensors", metadata=_metadata(model, step))
    state = {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "ema": ema,
             "history": history, "config": asdict(cfg)}
    tmp = out / f".state-{step}.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(out / f"state-{step}.pt")
    older = sorted(s for s in _state_steps(out) if s < step)
    for old in older[: max(len(older) - cfg.keep_states + 1, 0)]:
        (out / f"state-{old}.pt").unlink()


def _remove_stale_temps(out: Path) -> None:
    """Temp files of a save that was killed half-way (ours: `.state-N.pt.tmp`, atomic_save's `.name.tag.tmp`)."""
    for p in out.glob(".*.tmp"):
        if p.name.startswith((".state-", ".step-", ".ema-", ".loss.csv", ".eval.csv")):
            p.unlink(missing_ok=True)


def _check_resume(saved: dict, cfg: TrainConfig, path: Path) -> None:
    """Refuse to resume with settings that would make a different run than the one saved."""
    now = asdict(cfg)
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    fields = _RESUME_FIELDS + (("steps",) if cfg.lr_decay != "constant" else ())  # the decay ends at `steps`
    was = lambda k: saved.get(k, TrainConfig.__dataclass_fields__[k].default)  # noqa: E731  (older states)
    diff = [f"{k}: saved {was(k)!r}, now {now[k]!r}" for k in fields if norm(was(k)) != norm(now[k])]
    if diff:
        raise ValueError(f"{path} was written with other settings ({'; '.join(diff)}); "
                         f"use another output folder or the same settings")


def _write_csv(path: Path, rows: list[dict], columns: Sequence[str]) -> None:
    """Rewrite a small CSV atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def _write_logs(out: Path, history: list[dict], loss: bool = True) -> None:
    """loss.csv (every step) and eval.csv (steps with eval results) from the history."""
    if loss:
        _write_csv(out / "loss.csv", history, LOG_COLUMNS)
    evals = [r for r in history if len(r) > len(LOG_COLUMNS)]
    if evals:
        keys = dict.fromkeys(k for r in evals for k in r if k not in LOG_COLUMNS)
        _write_csv(out / "eval.csv", evals, ["step", *keys])
    else:
        (out / "eval.csv").unlink(missing_ok=True)


def _append_csv(path: Path, row: dict, columns: Sequence[str]) -> None:
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore").writerow(row)


# ----------------------------------------------------------------------------------------------
#                                         The loop
# ----------------------------------------------------------------------------------------------

def _lr_lambda(warmup: int, decay: str = "constant", steps: int = 0):
    """Linear warmup, then constant or a cosine to 0 at `steps`."""
    if decay not in LR_DECAYS:
        raise ValueError(f"lr_decay {decay!r}: one of {LR_DECAYS}")

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if decay == "cosine" and steps > warmup:
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (steps - warmup))))
        return 1.0
    return factor


def _noise(x0, seeds, gen: torch.Generator, seeded: bool) -> list[torch.Tensor]:
    """ε per item: from the item's own seed (seeded_noise), else from the step's generator."""
    return [torch.randn(x.shape, generator=torch.Generator().manual_seed(int(s)) if seeded and s is not None
                        else gen) for x, s in zip(x0, seeds)]


def _encoder(encode, cfg: TrainConfig, dataset):
    """A prompt → features callable; a TextEncoder is wrapped in a cache so it runs once per prompt."""
    from .text import EmbeddingCache, TextEncoder

    if not isinstance(encode, TextEncoder):
        return encode
    cache = EmbeddingCache(encode)
    if cfg.offload_text_encoder:
        cache.prefill(_dataset_prompts(dataset) + ([""] if cfg.caption_dropout > 0 else []))
        encode.model.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return cache


def train(model: nn.Module, dataset, encode, cfg: TrainConfig, out_dir: Optional[Union[str, Path]] = None,
          resume: bool = True, eval_fn: Optional[Callable[[nn.Module, int], dict]] = None, accelerator=None,
          latent_encoder: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
    """Train `model` in place on `dataset` (items {"x", "prompt", "seed"}); returns the history DataFrame.

    `encode` is a TextEncoder (cached per prompt here) or any `prompts -> [(L_i, D)]` callable. With
    `out_dir`, checkpoints and logs go there and the run resumes from its newest complete checkpoint.
    `eval_fn(model, step) -> dict` runs every `eval_every` steps on the main process (no_grad, eval mode).
    `latent_encoder` (images → latents, frozen) is what `cfg.latent_loss_weight` > 0 matches x̂0 through.
    """
    import pandas as pd
    from accelerate import Accelerator

    if not 0.0 <= cfg.caption_dropout <= 1.0:
        raise ValueError(f"caption_dropout {cfg.caption_dropout}: a fraction in [0, 1]")
    if cfg.latent_loss_weight < 0 or (cfg.latent_loss_weight > 0) != (latent_encoder is not None):
        raise ValueError(f"latent_loss_weight {cfg.latent_loss_weight} needs a latent_encoder (and one is only "
                         f"used with a weight > 0)")
    acc = accelerator or Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    summary = prepare_trainable(model, cfg)
    if cfg.verbose:
        acc.print(summary)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing = True
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"policy {summary.policy!r} leaves nothing to train")
    encode = _encoder(encode, cfg, dataset)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, cfg.lr_decay, cfg.steps))
    # EMA starts at zero and is bias-corrected when read (as Adam's moments): started from the init
    # weights instead, a short run's average keeps d^T of the init (22% after 1500 steps at 0.999).
    ema = ({n: torch.zeros_like(p.detach()) for n, p in model.named_parameters() if p.requires_grad}
           if cfg.ema_decay else None)
    history, start = [], 0

    out = Path(out_dir) if out_dir is not None else None
    last = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if acc.is_main_process:
            _remove_stale_temps(out)
        last = latest_checkpoint(out) if resume else None
        if last is not None:
            st = torch.load(out / f"state-{last}.pt", weights_only=True)
            _check_resume(st["config"], cfg, out / f"state-{last}.pt")
            _load_trainable(model, read_state_dict(out / f"step-{last}.safetensors"), f"step-{last}.safetensors")
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            history, start, ema = st["history"], st["step"], st["ema"]
            acc.print(f"resuming from {out / f'step-{last}.safetensors'}")
        if acc.is_main_process:  # drop rows a killed run logged after its last checkpoint
            _write_logs(out, history)
    model, opt = acc.prepare(model, opt)
    model.train()

    loader = torch.utils.data.DataLoader(
        dataset, collate_fn=collate, num_workers=cfg.num_workers,
        batch_sampler=StepBatches(dataset_sizes(dataset), cfg.batch_size, cfg.seed, start, cfg.steps,
                                  cfg.grad_accum, acc.process_index, acc.num_processes))
    batches = iter(loader)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train",
               disable=not (cfg.verbose and acc.is_main_process))
    evaluating = eval_fn is not None and cfg.eval_every > 0 and acc.is_main_process
    for step in bar:
        t0 = time.perf_counter()
        lr = opt.param_groups[0]["lr"]
        total = torch.zeros((), device=acc.device)
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            gen = torch.Generator().manual_seed(key_seed(cfg.seed, f"{step}/{micro}/{acc.process_index}"))
            prompts = batch["prompt"]
            sigma = sample_training_sigma(len(prompts), gen, cfg.num_train_timesteps, cfg.shift)
            noise = _noise(batch["x"], batch["seed"], gen, cfg.seeded_noise)
            if cfg.caption_dropout > 0:
                drop = torch.rand(len(prompts), generator=gen) < cfg.caption_dropout
                prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
            caps = [c.to(acc.device) for c in encode(prompts)]
            sigma = sigma.to(acc.device)
            if isinstance(batch["x"], torch.Tensor):
                x0, noise = batch["x"].to(acc.device), torch.stack(noise).to(acc.device)
                x_t = add_noise(x0, noise, sigma)
            else:  # mixed sizes: per-item tensors, one MSE over all their elements
                x0 = [x.to(acc.device) for x in batch["x"]]
                noise = [n.to(acc.device) for n in noise]
                x_t = [add_noise(x, n, s) for x, n, s in zip(x0, noise, sigma)]
            sync = micro == cfg.grad_accum - 1  # all-reduce gradients once per step, not per micro-batch
            with contextlib.nullcontext() if sync else acc.no_sync(model):
                with acc.autocast():
                    raw = model(x_t, dit_time(sigma), caps, patch_size=cfg.patch_size)
                if isinstance(raw, list):
                    raw, x0, noise = (torch.cat([t.flatten() for t in v]) for v in (raw, x0, noise))
                loss = flow_matching_loss(raw, x0, noise) / cfg.grad_accum
                objective = loss
                if cfg.latent_loss_weight > 0:
                    if not isinstance(x_t, torch.Tensor):
                        raise ValueError("latent_loss_weight needs batches of one image size (got mixed sizes)")
                    objective = loss + cfg.latent_loss_weight * latent_matching_loss(
                        raw, x_t, x0, sigma, latent_encoder) / cfg.grad_accum
                acc.backward(objective)
            total += loss.detach()
        gnorm = acc.clip_grad_norm_(params, cfg.grad_clip or math.inf)
        total = acc.reduce(total, "mean")  # every process sees the same value, so all stop together
        if not (torch.isfinite(total) and torch.isfinite(gnorm)):
            what = "loss" if not torch.isfinite(total) else "gradient norm"
            ckpt = out / f"step-{last}.safetensors" if last is not None else None
            raise TrainingDiverged(f"{what} is {float(total if what == 'loss' else gnorm)} at step {step + 1}; "
                                   f"weights not updated; last good checkpoint: {ckpt or 'none saved yet'}",
                                   step + 1, ckpt)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                for n, p in acc.unwrap_model(model).named_parameters():
                    if n in ema:
                        ema[n].lerp_(p.detach(), 1 - cfg.ema_decay)
        row = {"step": step + 1, "loss": total.item(), "lr": lr, "grad_norm": gnorm.item(),
               "sec": time.perf_counter() - t0}
        last_with_ema = ema is not None and step + 1 == cfg.steps  # evaluated below, on the averaged weights
        if evaluating and (step + 1) % cfg.eval_every == 0 and not last_with_ema:
            model.eval()
            with torch.no_grad():
                row.update(eval_fn(acc.unwrap_model(model), step + 1))
            model.train()
        history.append(row)
        if (step + 1) % cfg.log_every == 0:
            bar.set_postfix(loss=f"{row['loss']:.4f}")
        if out is not None and acc.is_main_process:
            _append_csv(out / "loss.csv", row, LOG_COLUMNS)
            if len(row) > len(LOG_COLUMNS):
                _write_logs(out, history, loss=False)
        if out is not None and ((cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.steps):
            if acc.is_main_process:
                _save(out, step + 1, acc.unwrap_model(model), opt, sched, ema, history, cfg)
            last = step + 1
    bar.close()
    acc.wait_for_everyone()
    model = acc.unwrap_model(model)
    if ema is not None:  # the averaged weights are the result
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in ema_weights(ema, cfg.ema_decay, cfg.steps).items():
                params[n].copy_(t)
        if evaluating and cfg.steps % cfg.eval_every == 0 and history and history[-1]["step"] == cfg.steps:
            model.eval()
            with torch.no_grad():
                history[-1].update(eval_fn(model, cfg.steps))
            if out is not None:
                _write_logs(out, history, loss=False)
    model.eval()
    return pd.DataFrame(history)


# ----------------------------------------------------------------------------------------------
#                                            CLI
# ----------------------------------------------------------------------------------------------

def _blocks(text: str) -> list[int]:
    """'0-4,25-29' → [0, 1, 2, 3, 4, 25, …, 29]."""
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Register `l2p train` (also under `accelerate launch -m l2p.cli train ...`)."""
    p = subparsers.add_parser("train", help="fine-tune a pixel-init checkpoint with flow matching",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True, nargs="+", help="pixel-init checkpoint: file(s), index json or folder")
    p.add_argument("--data", required=True, help="folder with metadata.csv (image,prompt[,seed])")
    p.add_argument("--text-encoder", nargs="+", help="text encoder folder or shard files")
    p.add_argument("--tokenizer", help="tokenizer folder (default: found beside the encoder)")
    p.add_argument("--toy-text", action="store_true", help="the toy encoder (MiniLM, D=384) instead")
    p.add_argument("--offload-text-encoder", action="store_true",
                   help="encode all prompts first, then move the encoder to the CPU")
    p.add_argument("--out", required=True, help="output folder (resumes from its newest checkpoint)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=1, help="per process")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--lr-decay", choices=LR_DECAYS, default="constant",
                   help="after warmup: constant (the release) or a cosine to 0 at the last step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--clip", type=float, default=0.0, help="max gradient norm; 0: no clipping (the release)")
    p.add_argument("--policy", default="paper", help="paper, full, head-only, embedder+head, custom")
    p.add_argument("--n", "--n-keep", dest="n", type=int, default=5,
                   help="paper policy: first and last n main layers train (--n-keep under torchrun, which takes --n)")
    p.add_argument("--include", nargs="*", default=[], help="glob patterns added to the trainable set")
    p.add_argument("--exclude", nargs="*", default=[], help="glob patterns removed from the trainable set")
    p.add_argument("--lora-rank", type=int, default=0, help="> 0: train LoRA adapters instead of --policy")
    p.add_argument("--lora-blocks", type=_blocks, default=None, help="main layers with adapters, e.g. 0-4,25-29")
    p.add_argument("--lora-train-head", action="store_true", help="with LoRA, also train the Detailer Head")
    p.add_argument("--shift", type=float, default=3.0, help="training noise shift (larger for 4K)")
    p.add_argument("--patch-size", type=int, default=None, help="RGB embedder to train, e.g. 64 for the 4K path")
    p.add_argument("--max-pixels", type=int, default=1024 * 1024)
    p.add_argument("--skip-bad", action="store_true",
                   help="train on the usable rows; the bad ones are listed in OUT/skipped_rows.csv")
    p.add_argument("--seeded-noise", action=argparse.BooleanOptionalAction, default=True,
                   help="ε from each row's seed, the same every epoch (the release)")
    p.add_argument("--caption-dropout", type=float, default=0.0,
                   help="fraction of captions replaced by the empty prompt (the release: 0)")
    p.add_argument("--latent-loss", type=float, default=0.0, metavar="W",
                   help="> 0: add W × the MSE between --latent-loss-vae's latents of the one-step x̂0 and of x0 "
                        "(not in the release; the VAE is used in training only)")
    p.add_argument("--latent-loss-vae", default=None, metavar="DIR",
                   help="diffusers AutoencoderKL folder for --latent-loss, e.g. Z-Image-Turbo/vae")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    p.add_argument("--save-every", type=int, default=5000)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="fp32", help="weights: fp32 or bf16")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=run_train)
    return p


def run_train(a: argparse.Namespace) -> int:
    """The `train` subcommand: validate data, load models, print the freeze table, train."""
    from accelerate import Accelerator

    from .cli import _dtype
    from .data import DatasetError, ImageTextDataset
    from .model import ZImageDiT
    from .text import TextEncoder

    acc = Accelerator(cpu=a.device == "cpu" or not torch.cuda.is_available(),
                      mixed_precision="bf16" if a.bf16 else "no")
    out = Path(a.out)
    try:
        dataset = ImageTextDataset(a.data, max_pixels=a.max_pixels, skip_bad=a.skip_bad)
    except DatasetError as e:
        print(f"l2p train: error: {e}", file=sys.stderr)
        return 2
    if dataset.skipped.bad and acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        dataset.skipped.save(out / "skipped_rows.csv")
        print(f"{dataset.skipped.summary()}\ntraining on {len(dataset)} rows; "
              f"skipped rows listed in {out / 'skipped_rows.csv'}")
    if a.toy_text:
        encoder = TextEncoder.toy(device=acc.device)
    elif a.text_encoder:
        encoder = TextEncoder.from_pretrained(a.text_encoder, a.tokenizer, device=acc.device,
                                              dtype=torch.bfloat16 if acc.device.type == "cuda" else torch.float32)
    else:
        print("l2p train: error: give --text-encoder (or --toy-text)", file=sys.stderr)
        return 2
    model = ZImageDiT.from_pretrained(a.init, dtype=_dtype(a.dtype), device=acc.device)
    latent_encoder = None
    if a.latent_loss > 0 or a.latent_loss_vae:
        if not (a.latent_loss > 0 and a.latent_loss_vae):
            print("l2p train: error: --latent-loss W (> 0) and --latent-loss-vae DIR go together", file=sys.stderr)
            return 2
        from diffusers import AutoencoderKL

        from .pipeline import vae_latents
        vae = AutoencoderKL.from_pretrained(a.latent_loss_vae, local_files_only=True)
        vae = vae.to(acc.device, _dtype(a.dtype)).eval().requires_grad_(False)
        latent_encoder = lambda x: vae_latents(vae, x)  # noqa: E731
    if model.cfg.cap_feat_dim != encoder.dim:
        print(f"l2p train: error: the model takes {model.cfg.cap_feat_dim}-d captions but the text encoder "
              f"gives {encoder.dim}-d", file=sys.stderr)
        return 2
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup_steps=a.warmup, lr_decay=a.lr_decay,
                      grad_accum=a.grad_accum,
                      grad_clip=a.clip or None, policy=a.policy, n_keep=a.n, include=a.include, exclude=a.exclude,
                      lora_rank=a.lora_rank, lora_blocks=a.lora_blocks, lora_train_head=a.lora_train_head,
                      shift=a.shift, patch_size=a.patch_size, seeded_noise=a.seeded_noise,
                      caption_dropout=a.caption_dropout, mixed_precision="bf16" if a.bf16 else "no",
                      gradient_checkpointing=a.grad_ckpt, offload_text_encoder=a.offload_text_encoder,
                      num_workers=a.workers, save_every=a.save_every, seed=a.seed, latent_loss_weight=a.latent_loss)
    try:
        history = train(model, dataset, encoder, cfg, out_dir=out, accelerator=acc, latent_encoder=latent_encoder)
    except TrainingDiverged as e:
        print(f"l2p train: {e}", file=sys.stderr)
        return 3
    if len(history):
        acc.print(f"done: step {int(history.step.iloc[-1])}, loss {history.loss.iloc[-1]:.4f}; "
                  f"checkpoints in {out}")
    return 0
