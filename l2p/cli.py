"""`l2p` command line: generate, convert, merge, synth, train, eval, reports."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _dtype(name: str):
    import torch
    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
            "fp16": torch.float16, "float16": torch.float16}[name]


def add_model_options(p) -> None:
    """Where a checkpoint and its text encoder are (`l2p generate`, `l2p synth`)."""
    p.add_argument("--model", nargs="+", help="DiT checkpoint: file(s), index json or folder; an L2P one, or a "
                                              "latent one with --vae")
    p.add_argument("--text-encoder", nargs="+", help="text encoder folder or shard files")
    p.add_argument("--tokenizer", help="tokenizer folder (default: found beside the text encoder)")
    p.add_argument("--vae", help="diffusers AutoencoderKL folder, for a latent model")
    p.add_argument("--cpu-offload", action="store_true",
                   help="keep the models on the CPU and move each to the device only while it runs: the GPU holds "
                        "the largest model, not all of them (at real scale about 13 GiB instead of 20 at 1024²)")


def add_sampling_options(p) -> None:
    """The sampler's options beyond steps, cfg and shift (`l2p generate`, `l2p synth`)."""
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="guide only for σ in [LO, HI] (Z-Image's cfg_truncation τ is LO = 1 − τ, HI = 1)")
    p.add_argument("--cfg-norm-cap", type=float, metavar="K",
                   help="cap each guided velocity at K × the conditional one's norm (Z-Image's cfg_normalization)")
    p.add_argument("--solver", choices=("euler", "heun"), default="euler",
                   help="euler (the release) or heun: second order, 2·steps − 1 model calls")
    p.add_argument("--patch-size", type=int, default=None, help="pixel patch (e.g. 64 for the 4K embedder)")


def sampling_kwargs(a) -> dict:
    """`pipe.sample` keywords from `add_sampling_options`' arguments."""
    kw = {"negative_prompt": a.negative_prompt, "solver": a.solver}
    if a.patch_size:
        kw["patch_size"] = a.patch_size
    if a.cfg_interval:
        kw["cfg_interval"] = tuple(a.cfg_interval)
    if a.cfg_norm_cap is not None:
        kw["cfg_norm_cap"] = a.cfg_norm_cap
    return kw


def load_cli_pipeline(a, dtype, device):
    """`load_pipeline` from `add_model_options`' arguments; a bad combination exits with its message."""
    from .pipeline import load_pipeline

    if not a.model or not a.text_encoder:
        raise SystemExit("give --model and --text-encoder (and --vae for a latent model)")
    try:
        pipe = load_pipeline(a.model, a.text_encoder, a.tokenizer, a.vae, dtype=dtype, device=device,
                             cpu_offload=a.cpu_offload)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    sizes = pipe.dit.cfg.all_patch_size if pipe.dit.cfg.is_pixel else ()
    if a.patch_size and a.patch_size not in sizes:
        raise SystemExit(f"--patch-size {a.patch_size}: the model's pixel patch sizes are "
                         f"{sizes or 'none (a latent model)'}")
    return pipe


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="text → image with an L2P checkpoint (or a latent one with --vae)")
    add_model_options(p)
    p.add_argument("--random-init", metavar="PRESET",
                   help="no checkpoint: a randomly initialised model of this preset (e.g. tiny_pixel), "
                        "with the toy text encoder — a smoke test of the whole path")
    p.add_argument("--prompt", required=True)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cfg", type=float, default=2.0, help="L2P cfg_scale (diffusers guidance_scale = cfg − 1)")
    p.add_argument("--shift", type=float, default=3.0)
    add_sampling_options(p)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--dtype", default="bf16" if _cuda() else "fp32")
    p.add_argument("--rand-device", default="cpu")
    p.add_argument("--output", "-o", default="l2p.png")
    p.set_defaults(func=run_generate)


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def run_generate(a) -> int:
    import torch
    from .pipeline import L2PPipeline

    dtype = _dtype(a.dtype)
    if a.random_init:
        from .config import get_config
        from .model import ZImageDiT
        from .text import TextEncoder
        te = TextEncoder.toy()
        torch.manual_seed(a.seed)
        dit = ZImageDiT(get_config(a.random_init).replace(cap_feat_dim=te.dim)).to(dtype)
        if not dit.cfg.is_pixel:
            raise SystemExit("--random-init needs a pixel preset (e.g. tiny_pixel, toy_pixel)")
        pipe = L2PPipeline(dit, te, device=a.device, dtype=dtype, cpu_offload=a.cpu_offload)
    else:
        pipe = load_cli_pipeline(a, dtype, a.device)
    img = pipe(prompt=a.prompt, seed=a.seed, rand_device=a.rand_device, num_inference_steps=a.steps,
               cfg_scale=a.cfg, height=a.height, width=a.width, shift=a.shift, progress=True, **sampling_kwargs(a))
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    img.save(tmp, format=out.suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG")
    tmp.replace(out)
    print(f"saved {out} ({img.width}×{img.height})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="l2p", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    # Each module registers its own subcommand; a missing optional piece should not break the rest.
    for mod, fn in [("convert", "add_convert_parser"), ("merge", "add_merge_parser"),
                    ("toyworld.corpus", "add_synth_parser"), ("train", "add_train_parser"),
                    ("evaluate", "add_eval_parser"), ("reports", "add_reports_parser")]:
        try:
            module = __import__(f"l2p.{mod}", fromlist=[fn])
        except ModuleNotFoundError as e:
            if not (e.name or "").startswith("l2p"):
                raise
            continue
        getattr(module, fn)(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
