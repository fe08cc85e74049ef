"""Detailer Head on CPU: NCHW vs channels-last memory layout, side by side in one run.

`DetailerHead.cpu_channels_last` (on by default) feeds the head's convs channels-last tensors on CPU. This
prints the median time of one forward + backward of the head alone and of a whole toy pixel-model training
step, for each layout, alternating the two so that load from other processes hits both alike, and the
largest output difference (fp32 rounding only).

    python bench/bench_head_layout.py [--batch 32] [--size 64] [--reps 7] [--threads 2]
"""
import argparse
import statistics
import time

import torch

from l2p.config import TOY_DETAILER, DetailerConfig, toy_pixel
from l2p.model import DetailerHead, ZImageDiT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--channels", type=int, nargs="+", default=list(TOY_DETAILER.channels))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = toy_pixel().replace(detailer=DetailerConfig(channels=tuple(a.channels)))
    model = ZImageDiT(cfg)
    x = torch.randn(a.batch, 3, a.size, a.size)
    t = torch.rand(a.batch)
    caps = [torch.randn(12, cfg.cap_feat_dim) for _ in range(a.batch)]
    grid = a.size // 16
    feat = torch.randn(a.batch, cfg.dim, grid, grid)

    def head():
        model.local_decoder(x, feat).pow(2).mean().backward()

    def step():
        model(x, t, caps).pow(2).mean().backward()

    rows = []
    for name, fn in (("Detailer Head fwd+bwd", head), ("toy pixel training step", step)):
        times = {False: [], True: []}
        for cl in (False, True):  # warm-up both
            DetailerHead.cpu_channels_last = cl
            fn()
        for _ in range(a.reps):
            for cl in (False, True):
                DetailerHead.cpu_channels_last = cl
                t0 = time.perf_counter()
                fn()
                times[cl].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((name, med[False], med[True]))
    with torch.no_grad():
        DetailerHead.cpu_channels_last = False
        ref = model(x, t, caps)
        DetailerHead.cpu_channels_last = True
        new = model(x, t, caps)
    print(f"batch {a.batch}, {a.size}², head widths {tuple(a.channels)}, {a.threads} threads, median of {a.reps}")
    print(f"{'':26s} {'NCHW':>9s} {'chan-last':>10s} {'ratio':>7s}")
    for name, nchw, cl in rows:
        print(f"{name:26s} {nchw * 1e3:7.1f}ms {cl * 1e3:8.1f}ms {cl / nchw:7.2f}×")
    print(f"max |output difference|: {(ref - new).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
