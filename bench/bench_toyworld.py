"""Time and measure the toy world's pieces: data generation, the toy VAE, the judge (evaluator).

    python bench/bench_toyworld.py --mode smoke          # seconds
    python bench/bench_toyworld.py --mode full           # ~10 min on 2 cores: trains VAE and judge from scratch
    python bench/bench_toyworld.py --mode full --cache   # reuse cached artefacts (timings are then load times)

Runs with 2 threads (the toy world's budget: ≤ 15 min full, ≤ 2 min smoke, all parts together).
The LDM part is added by the lead.
"""
from __future__ import annotations

import argparse
import json
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["smoke", "full", "both"], default="smoke")
    ap.add_argument("--cache", action="store_true", help="load/store artefacts in the cache instead of retraining")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    modes = ["smoke", "full"] if args.mode == "both" else [args.mode]
    results = {"data": bench_data()}
    print(f"data: {results['data']['images_per_s']:.0f} images/s")
    for mode in modes:
        t0 = time.perf_counter()
        r_vae, vae = bench_vae(mode, args.cache)
        r_ev, _ = bench_evaluator(mode, args.cache, vae)
        results[mode] = {"vae": r_vae, "evaluator": r_ev, "total_s": time.perf_counter() - t0}
        print(f"\n== {mode} ==")
        print(f"VAE: {r_vae['wall_s']:.1f} s ({r_vae['steps']} steps × {r_vae['batch_size']}), "
              f"PSNR {r_vae['psnr']:.2f} dB, HF ratio {r_vae['hf_ratio']:.3f}, "
              f"spectral error {r_vae['spectral_fidelity']:.3f}, latent std {r_vae['latent_std']:.3f}")
        for bg in sc.BACKGROUNDS:
            if f"psnr/{bg}" in r_vae:
                print(f"   {bg:9s} PSNR {r_vae[f'psnr/{bg}']:.2f} dB, HF ratio {r_vae[f'hf_ratio/{bg}']:.3f}")
        print(f"judge: {r_ev['wall_s']:.1f} s ({r_ev['steps']} steps), held-out accuracy:")
        print("   " + ", ".join(f"{k} {v:.3f}" for k, v in r_ev["held_out"].items()))
        print("   judge on VAE reconstructions: " + ", ".join(f"{k} {v:.3f}" for k, v in r_ev["vae_recon"].items()))
        print(f"   toy FID recon↔GT {r_ev['toy_fid_recon_vs_gt']:.3f}, GT↔GT {r_ev['toy_fid_gt_vs_gt']:.3f}")
        print(f"total ({mode}, VAE + judge + scoring): {results[mode]['total_s']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=float)
    return results


if __name__ == "__main__":
    main()
