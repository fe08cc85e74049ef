"""Synthetic corpus generation (`l2p synth`): a model renders prompts into images/ + metadata.csv.

The corpus is what L2P fine-tunes on: images the latent source model generated itself, each with its
prompt and the seed of its initial noise (columns `image,prompt,seed`; the release's README calls them
`file_name,text`, which `l2p.data` also accepts). Generation is resumable: existing images are skipped.
At real scale, `accelerate launch -m l2p.cli synth ...` splits the prompts across GPUs. Given an L2P
checkpoint and no `--vae`, it renders with the pixel model instead, so both models' renders of one prompt
file and seeds can be compared with `l2p eval`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import torch
from tqdm.auto import tqdm

from ..data import write_metadata
from ..pipeline import to_pil


def synth_corpus(pipe, prompts: Sequence[str], out_dir: Union[str, Path], base_seed: int = 0,
                 num_inference_steps: int = 20, cfg_scale: float = 3.0, shift: float = 3.0,
                 height: int = 64, width: int = 64, batch_size: int = 64, progress: bool = True,
                 accelerator=None, **sample_kw) -> Path:
    """Render prompt i with seed base_seed + i into out_dir/images/{i:06d}.png; write metadata.csv last.

    `pipe` is a `LatentPipeline` (a training corpus) or an `L2PPipeline` (renders to score with `l2p eval`);
    `sample_kw` goes to `pipe.sample` (e.g. `patch_size=64`, `solver="heun"`)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    names = [f"images/{i:06d}.png" for i in range(len(prompts))]
    todo = [i for i in range(rank, len(prompts), world) if not (out / names[i]).exists()]
    bar = tqdm(total=len(todo), disable=not progress, desc="synth")
    for k in range(0, len(todo), batch_size):
        run = todo[k : k + batch_size]
        # Each image's noise comes from its own seed, so the result does not depend on batching.
        noise = torch.cat([pipe.initial_noise(1, height, width, base_seed + i) for i in run])
        px = pipe.sample([prompts[i] for i in run], noise=noise, num_inference_steps=num_inference_steps,
                         cfg_scale=cfg_scale, shift=shift, height=height, width=width, **sample_kw)
        for i, x in zip(run, px):
            tmp = out / (names[i] + ".tmp")
            to_pil(x).save(tmp, format="PNG")
            tmp.replace(out / names[i])
        bar.update(len(run))
    bar.close()
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if rank == 0:
        write_metadata(out, [{"image": n, "prompt": p, "seed": base_seed + i}
                             for i, (n, p) in enumerate(zip(names, prompts))])
    return out


def read_prompt_file(path: Union[str, Path]) -> list[str]:
    """One prompt per line (blank lines skipped), or a CSV with a `prompt`/`text` column."""
    path = Path(path)
    if path.suffix == ".csv":
        import pandas as pd
        df = pd.read_csv(path)
        col = "prompt" if "prompt" in df else "text" if "text" in df else None
        if col is None:
            raise ValueError(f"{path}: no `prompt` or `text` column (found {list(df.columns)})")
        return [str(p) for p in df[col]]
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


TOY_WORLDS = ["full", "fine", "smoke", "strong"]  # `world.SPECS`'s names, without importing the models here


def add_synth_parser(sub) -> None:
    from ..cli import add_model_options, add_sampling_options
    p = sub.add_parser("synth", help="render prompts into images/ + metadata.csv: a training corpus with the "
                                      "latent source model (--vae), or an L2P model's renders to score")
    p.add_argument("--out", required=True, help="output folder (images/ + metadata.csv)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", help="prompt file: one per line, or a CSV with a prompt/text column")
    src.add_argument("--toy-prompts", type=int, metavar="N", help="N prompts from the toy world's caption generator")
    p.add_argument("--toy", choices=TOY_WORLDS,
                   help="use the toy world's source LDM (built/cached on demand); fine: the 8-px-patch world; "
                        "strong: VAE and source trained longer (source over 0.80, ~1 h to build on 2 cores)")
    add_model_options(p)
    p.add_argument("--steps", type=int, default=None, help="default: 8 latent (Turbo), 30 L2P")
    p.add_argument("--cfg", type=float, default=None, help="default: 1.0 latent (Turbo), 2.0 L2P")
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--size", type=int, default=None, help="square image size")
    add_sampling_options(p)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="base seed: prompt i gets seed + i")
    p.add_argument("--dtype", default=None, help="bf16 on a GPU, fp32 on CPU by default")
    p.set_defaults(func=run_synth)


def run_synth(a) -> int:
    from accelerate import Accelerator

    from ..cli import _dtype, load_cli_pipeline, sampling_kwargs
    acc = Accelerator(cpu=not torch.cuda.is_available())
    if a.toy:
        from .world import build_toy_world
        world = build_toy_world(a.toy, progress=acc.is_main_process)
        pipe = world.latent_pipeline()
        steps, cfg, size = a.steps or world.sample_steps, a.cfg or world.cfg_scale, a.size or world.image_size
    else:
        pipe = load_cli_pipeline(a, _dtype(a.dtype or ("bf16" if torch.cuda.is_available() else "fp32")), acc.device)
        latent = not pipe.dit.cfg.is_pixel
        steps, cfg, size = a.steps or (8 if latent else 30), a.cfg or (1.0 if latent else 2.0), a.size or 1024
    if a.prompts:
        prompts = read_prompt_file(a.prompts)
    elif a.toy_prompts:
        from .scenes import generate
        prompts = generate(a.toy_prompts, seed=a.seed + 10_000)[1]
    else:
        raise SystemExit("give --prompts FILE or --toy-prompts N")
    out = synth_corpus(pipe, prompts, a.out, a.seed, steps, cfg, a.shift, size, size, a.batch_size,
                       progress=acc.is_main_process, accelerator=acc, **sampling_kwargs(a))
    if acc.is_main_process:
        print(f"wrote {len(prompts)} images and {out / 'metadata.csv'}")
    return 0
