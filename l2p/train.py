"""Flow-matching fine-tuning of the DiT (step 3 of the L2P recipe), in one readable file.

The same loop trains the toy source LDM on VAE latents (from scratch, with caption dropout) and the
pixel model from a converted init (selective freeze). Per step: draw σ from the 500-step shift-3 grid,
x_σ = (1−σ)·x0 + σ·ε, loss = MSE(−DiT(x_σ, 1−σ), ε − x0).

Determinism: data order, σ, noise and caption dropout each come from their own seeded generator, and
all of their states are checkpointed, so a run killed and resumed gives the same weights bit for bit
on CPU as an uninterrupted one.
"""
from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .flow import flow_matching_loss
from .schedule import dit_time, sample_training_sigma


@dataclass
class TrainConfig:
    """Hyper-parameters; defaults are the release's (`train_run.sh`) where it has one."""

    steps: int = 1000
    batch_size: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int = 0
    grad_accum: int = 1
    grad_clip: Optional[float] = 1.0
    policy: str = "paper"  # see l2p.freeze
    n_keep: int = 5  # paper policy: first and last n main layers train
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    lora_rank: int = 0  # > 0: LoRA adapters (peft) on `lora_targets` instead of the freeze policy
    lora_targets: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0")
    shift: float = 3.0
    num_train_timesteps: int = 500
    seeded_noise: bool = True  # the release draws ε from each image's `seed` column: the same ε every epoch
    caption_dropout: float = 0.0  # > 0 when training a model for classifier-free guidance
    mixed_precision: str = "no"  # "bf16" autocast on GPU
    gradient_checkpointing: bool = False
    ema_decay: Optional[float] = None
    log_every: int = 10
    save_every: int = 0  # 0: only at the end
    eval_every: int = 0
    seed: int = 0
    progress: bool = True


class TrainingDiverged(RuntimeError):
    """Loss became NaN/inf; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------------------------
#                                  Deterministic data order
# ----------------------------------------------------------------------------------------------

def batch_indices(n: int, batch_size: int, step: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Indices of global batch `step`: epoch permutations from seed + epoch, so any step is recomputable."""
    per_epoch = max(n // (batch_size * world), 1)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    start = k * batch_size * world + rank * batch_size
    return [perm[(start + j) % n] for j in range(batch_size)]


def collate(items: list[dict]) -> dict:
    """Stack equal-sized images; prompts and seeds stay lists."""
    shapes = {tuple(it["x"].shape) for it in items}
    if len(shapes) > 1:
        raise ValueError(f"a batch mixes image sizes {sorted(shapes)}; use batch_size 1 or bucket by size")
    return {"x": torch.stack([it["x"] for it in items]), "prompt": [it["prompt"] for it in items],
            "seed": [it.get("seed") for it in items]}


# ----------------------------------------------------------------------------------------------
#                                     Trainable subset
# ----------------------------------------------------------------------------------------------

def prepare_trainable(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Apply the freeze policy, or wrap the chosen Linears with LoRA adapters (everything else frozen)."""
    if cfg.lora_rank > 0:
        from peft import LoraConfig, inject_adapter_in_model
        for p in model.parameters():
            p.requires_grad_(False)
        lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, target_modules=list(cfg.lora_targets),
                          init_lora_weights=True)
        model = inject_adapter_in_model(lcfg, model)
        return model
    from .freeze import apply_policy
    apply_policy(model, cfg.policy, n=cfg.n_keep, include=list(cfg.include) or None,
                 exclude=list(cfg.exclude) or None)
    return model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors, under the model's own key names (the release's step-N layout)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k in names}


# ----------------------------------------------------------------------------------------------
#                                         The loop
# ----------------------------------------------------------------------------------------------

def _lr_lambda(cfg: TrainConfig):
    return lambda step: min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0


def _save(out_dir: Path, step: int, model, opt, sched, gens: dict, ema, history: list) -> None:
    """step-N.safetensors (trained subset) + state-N.pt (everything needed to resume), both atomic."""
    from .checkpoint import atomic_save
    atomic_save(trainable_state(model), out_dir / f"step-{step}.safetensors", metadata={"step": str(step)})
    state = {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "generators": {k: g.get_state() for k, g in gens.items()}, "history": history,
             "ema": None if ema is None else {k: v.clone() for k, v in ema.items()}}
    tmp = out_dir / f".state-{step}.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(out_dir / f"state-{step}.pt")


def latest_checkpoint(out_dir: Path) -> Optional[int]:
    """The newest step with both its weights and its resume state present."""
    steps = [int(p.stem.split("-")[1]) for p in Path(out_dir).glob("state-*.pt")]
    steps = [s for s in steps if (Path(out_dir) / f"step-{s}.safetensors").exists()]
    return max(steps) if steps else None


def train(model: nn.Module, dataset, encode: Callable[[list[str]], list[torch.Tensor]], cfg: TrainConfig,
          out_dir: Optional[str | Path] = None, resume: bool = True,
          eval_fn: Optional[Callable[[nn.Module, int], dict]] = None, accelerator=None):
    """Train `model` in place on `dataset` (items: {"x", "prompt", "seed"}); returns the history DataFrame.

    `encode(prompts)` gives per-prompt text features (use a cache). With `out_dir`, checkpoints and
    `loss.csv` go there and an interrupted run resumes from the newest complete checkpoint.
    """
    import pandas as pd
    from accelerate import Accelerator

    acc = accelerator or Accelerator(mixed_precision=cfg.mixed_precision if torch.cuda.is_available() else "no",
                                     cpu=not torch.cuda.is_available())
    model = prepare_trainable(model, cfg)
    if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing"):
        model.gradient_checkpointing = True
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"policy {cfg.policy!r} leaves nothing to train")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    gens = {name: torch.Generator().manual_seed(cfg.seed * 7919 + i)
            for i, name in enumerate(["sigma", "noise", "dropout"])}
    ema = ({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
           if cfg.ema_decay else None)
    history, start = [], 0

    out = Path(out_dir) if out_dir else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        last = latest_checkpoint(out) if resume else None
        if last is not None:
            from .checkpoint import read_state_dict
            model.load_state_dict(read_state_dict(out / f"step-{last}.safetensors"), strict=False)
            st = torch.load(out / f"state-{last}.pt", weights_only=False)
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            for k, g in gens.items():
                g.set_state(st["generators"][k])
            history, start, ema = st["history"], st["step"], st["ema"]
    model, opt = acc.prepare(model, opt)
    model.train()

    log_file = out / "loss.csv" if out is not None else None
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not (cfg.progress and acc.is_main_process),
               desc="train")
    for step in bar:
        t0 = time.perf_counter()
        total = 0.0
        for micro in range(cfg.grad_accum):
            gstep = step * cfg.grad_accum + micro
            batch = collate([dataset[i] for i in batch_indices(len(dataset), cfg.batch_size, gstep, cfg.seed,
                                                                acc.process_index, acc.num_processes)])
            x0 = batch["x"].to(acc.device)
            prompts = batch["prompt"]
            if cfg.caption_dropout > 0:
                drop = torch.rand(len(prompts), generator=gens["dropout"]) < cfg.caption_dropout
                prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
            sigma = sample_training_sigma(len(prompts), gens["sigma"], cfg.num_train_timesteps, cfg.shift)
            noise = torch.randn(x0.shape, generator=gens["noise"])  # always drawn: keeps the stream aligned
            if cfg.seeded_noise:
                for j, s in enumerate(batch["seed"]):
                    if s is not None:
                        noise[j] = torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(int(s)))
            noise, sigma = noise.to(acc.device), sigma.to(acc.device)
            s4 = sigma.view(-1, *([1] * (x0.ndim - 1)))
            x_t = (1 - s4) * x0 + s4 * noise
            caps = [c.to(acc.device) for c in encode(prompts)]
            with acc.autocast():
                raw = model(x_t, dit_time(sigma), caps)
            loss = flow_matching_loss(raw, x0, noise) / cfg.grad_accum
            if not torch.isfinite(loss):
                last = latest_checkpoint(out) if out is not None else None
                raise TrainingDiverged(f"loss is {loss.item()} at step {step}; "
                                       + (f"last good checkpoint: step-{last}" if last else "no checkpoint saved yet"))
            acc.backward(loss)
            total += loss.item()
        gnorm = acc.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip else torch.tensor(float("nan"))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                for n, p in acc.unwrap_model(model).named_parameters():
                    if n in ema:
                        ema[n].lerp_(p.detach(), 1 - cfg.ema_decay)
        row = {"step": step + 1, "loss": total, "lr": sched.get_last_lr()[0], "grad_norm": float(gnorm),
               "sec": time.perf_counter() - t0}
        if eval_fn is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            row.update(eval_fn(acc.unwrap_model(model), step + 1))
        history.append(row)
        if (step + 1) % cfg.log_every == 0:
            bar.set_postfix(loss=f"{total:.4f}")
        is_save = out is not None and ((cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.steps)
        if is_save and acc.is_main_process:
            _save(out, step + 1, acc.unwrap_model(model), opt, sched, gens, ema, history)
            _write_log(log_file, history)
    model = acc.unwrap_model(model)
    if ema is not None:  # the averaged weights are the result
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in ema:
                    p.copy_(ema[n])
    model.eval()
    return pd.DataFrame(history)


def _write_log(path: Path, history: list[dict]) -> None:
    """loss.csv, rewritten atomically (small)."""
    keys = list(dict.fromkeys(k for row in history for k in row))
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    tmp.replace(path)
