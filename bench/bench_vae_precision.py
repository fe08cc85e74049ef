"""Toy-VAE training step on CPU: fp32 vs bf16 autocast, side by side in one run.

The toy world's VAE presets pick bf16 autocast only where the CPU computes bf16 in hardware
(`l2p.cache.native_bf16`: AVX512-BF16 or AMX). This prints what the choice is worth on this machine:
the median time of one training step (encode, decode, L1, backward) of the full-mode VAE at its batch, in
each precision, alternating the two so that load from other processes hits both alike.

    python bench/bench_vae_precision.py [--batch 8] [--reps 5] [--threads 2]
"""
import argparse
import statistics
import time

import torch

from l2p.cache import native_bf16, vae_precision
from l2p.toyworld.scenes import generate, to_tensor
from l2p.toyworld.vae import build_vae, vae_train_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=None, help="default: the full preset's batch")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = vae_train_config("full")
    batch = a.batch or cfg.batch_size
    vae = build_vae(cfg).train()
    x = to_tensor(generate(batch, 0, cfg.world)[0])

    def step(bf16: bool) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample.float()
        (rec - x).abs().mean().backward()
        vae.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    times = {False: [], True: []}
    for bf16 in (False, True):  # warm-up both
        step(bf16)
    for _ in range(a.reps):
        for bf16 in (False, True):
            times[bf16].append(step(bf16))
    fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
    print(f"CPU bf16 in hardware: {native_bf16()}; presets train in: {vae_precision()!r}; "
          f"{a.threads} threads, batch {batch}, {a.reps} reps")
    print(f"{'toy VAE training step':<24} fp32 {fp32 * 1e3:8.1f} ms   bf16 autocast {bf16 * 1e3:8.1f} ms   "
          f"bf16 / fp32 = {bf16 / fp32:.2f}×")
    print(f"full preset ({cfg.steps} steps): fp32 ≈ {cfg.steps * fp32 / 60:.1f} min, bf16 ≈ {cfg.steps * bf16 / 60:.1f} min")


if __name__ == "__main__":
    main()
