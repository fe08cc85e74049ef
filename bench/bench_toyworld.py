"""Time the toy world's build from scratch (VAE, judge, source LDM, corpus) and measure its pieces.

    python bench/bench_toyworld.py --mode smoke          # seconds: builds in a temporary cache
    python bench/bench_toyworld.py --mode full           # ~25 min on 2 cores: builds everything from scratch
    python bench/bench_toyworld.py --mode full --cache   # the cached world: prints the times its first build took

Runs with 2 threads. Budget (issue #3): ≤ 15 min full, ≤ 2 min smoke, all parts together. Each piece's
time is its build + save as the cache recorded it (`l2p.cache.build_seconds`), so `--cache` reports the
first build's times without redoing it; the quality figures (VAE PSNR, judge accuracy) are measured now.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

from l2p.metrics import high_frequency_energy_ratio, toy_fid
from l2p.toyworld import scenes as sc
from l2p.toyworld import vae as tv
from l2p.toyworld.evaluator import (Evaluator, evaluator_train_config, held_out_accuracy, load_or_train_evaluator,
                                    train_evaluator)


def bench_data(n: int = 2048) -> dict:
    """Scene generation throughput."""
    t = time.perf_counter()
    sc.generate(n, seed=0)
    dt = time.perf_counter() - t
    return {"images_per_s": n / dt}


def bench_vae(mode: str, use_cache: bool) -> tuple[dict, object]:
    """Train (or load) the VAE; wall time and held-out reconstruction figures."""
    cfg = tv.vae_train_config(mode)
    t = time.perf_counter()
    vae, hist = tv.load_or_train_vae(cfg, progress=True) if use_cache else tv.train_vae(cfg, progress=True)
    wall = time.perf_counter() - t
    out = {"wall_s": wall, "steps": cfg.steps, "batch_size": cfg.batch_size,
           "params": sum(p.numel() for p in vae.parameters()),
           "scaling_factor": vae.config.scaling_factor, "shift_factor": vae.config.shift_factor}
    out.update(tv.evaluate_vae(vae, n=256 if mode == "full" else 32))
    return out, vae


def bench_evaluator(mode: str, use_cache: bool, vae=None) -> tuple[dict, Evaluator]:
    """Train (or load) the judge; wall time, held-out accuracy per category, and what it reads in VAE recons."""
    cfg = evaluator_train_config(mode)
    t = time.perf_counter()
    ev = load_or_train_evaluator(cfg, progress=True) if use_cache else train_evaluator(cfg, progress=True)[0]
    wall = time.perf_counter() - t
    n = 800 if mode == "full" else 80
    df, summ = held_out_accuracy(ev, n=n)
    out = {"wall_s": wall, "steps": cfg.steps, "params": sum(p.numel() for p in ev.net.parameters()),
           "held_out": summ["accuracy"].round(4).to_dict(),
           "held_out_attributes": Evaluator.attribute_accuracy(df).round(4).to_dict()}
    if vae is not None:
        # The same prompts, rendered then passed through the VAE: the latent model's ceiling.
        prompts = sc.prompt_set(n, seed=4321)
        gt = sc.to_tensor(np.stack([sc.render(p.scene) for p in prompts]))
        rec = tv.reconstruct(vae, gt)
        df_rec = ev.score(rec, prompts)
        out["vae_recon"] = Evaluator.summary(df_rec)["accuracy"].round(4).to_dict()
        out["vae_recon_attributes"] = Evaluator.attribute_accuracy(df_rec).round(4).to_dict()
        out["toy_fid_recon_vs_gt"] = toy_fid(rec, gt, ev)
        other = sc.to_tensor(np.stack([sc.render(p.scene) for p in sc.prompt_set(n, seed=999)]))
        out["toy_fid_gt_vs_gt"] = toy_fid(other, gt, ev)
        out["hf_ratio_recon"] = high_frequency_energy_ratio(rec, gt)
    return out, ev


BUDGET_S = {"full": 15 * 60, "smoke": 2 * 60}


def bench_build(mode: str) -> dict:
    """Build (or load) the world and its corpus; the recorded seconds of each piece."""
    from l2p.toyworld.world import build_toy_world
    t = time.perf_counter()
    world = build_toy_world(mode, progress=mode == "full")
    world.corpus()
    wall = time.perf_counter() - t
    times = world.build_times()
    print(f"\n== {mode}: build (budget {BUDGET_S[mode] / 60:.0f} min) ==")
    for piece, sec in times.seconds.items():
        print(f"   {piece:22s} {sec / 60:6.2f} min")
    total = float(times.seconds["total"])
    print(f"   → {total / 60:.2f} min = {total / BUDGET_S[mode]:.2f}× the budget (wall now {wall:.0f} s)")
    return {"pieces_s": times.seconds.to_dict(), "total_s": total, "budget_s": BUDGET_S[mode], "wall_now_s": wall}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["smoke", "full", "both"], default="smoke")
    ap.add_argument("--cache", action="store_true", help="use the project's cache (report its recorded build times)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    modes = ["smoke", "full"] if args.mode == "both" else [args.mode]
    results = {"data": bench_data()}
    print(f"data: {results['data']['images_per_s']:.0f} images/s")
    for mode in modes:
        if not args.cache:  # a fresh, temporary cache: everything is built now
            os.environ["L2P_CACHE"] = tempfile.mkdtemp(prefix=f"l2p-bench-{mode}-")
        build = bench_build(mode)
        t0 = time.perf_counter()
        r_vae, vae = bench_vae(mode, True)
        r_ev, _ = bench_evaluator(mode, True, vae)
        results[mode] = {"build": build, "vae": r_vae, "evaluator": r_ev, "total_s": time.perf_counter() - t0}
        print(f"\n== {mode} ==")
        print(f"VAE ({r_vae['steps']} steps × {r_vae['batch_size']}): "
              f"PSNR {r_vae['psnr']:.2f} dB, HF ratio {r_vae['hf_ratio']:.3f}, "
              f"spectral error {r_vae['spectral_fidelity']:.3f}, latent std {r_vae['latent_std']:.3f}")
        for bg in sc.BACKGROUNDS:
            if f"psnr/{bg}" in r_vae:
                print(f"   {bg:9s} PSNR {r_vae[f'psnr/{bg}']:.2f} dB, HF ratio {r_vae[f'hf_ratio/{bg}']:.3f}")
        print(f"judge ({r_ev['steps']} steps), held-out accuracy:")
        print("   " + ", ".join(f"{k} {v:.3f}" for k, v in r_ev["held_out"].items()))
        print("   judge on VAE reconstructions: " + ", ".join(f"{k} {v:.3f}" for k, v in r_ev["vae_recon"].items()))
        print(f"   toy FID recon↔GT {r_ev['toy_fid_recon_vs_gt']:.3f}, GT↔GT {r_ev['toy_fid_gt_vs_gt']:.3f}")
        print(f"scoring ({mode}): {results[mode]['total_s']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=float)
    return results


if __name__ == "__main__":
    main()
