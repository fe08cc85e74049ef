"""Step time and peak memory of the `paper` freeze policy vs `full` fine-tuning (goal: ≤ 0.8× time, ≤ 0.7× memory).

Each (model, policy) pair runs `l2p.train.train` in a fresh subprocess on random in-memory images and
fixed random caption features, so peaks do not mix. Step time is the median of the steps after the
warm-up ones. Memory is the subprocess's peak RSS (ru_maxrss) minus its RSS just before training
(model, data and imports already in memory): what training itself adds (gradients, AdamW state,
activations). The raw peak is printed too.

The paper policy's n is chosen so that the frozen share of main layers is like the release's 20 of 30.

    python bench/bench_train.py [--steps 6] [--warmup 2] [--threads 1] [--only toy|wide]
"""
import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, torch
from l2p.config import DetailerConfig, l2p_1k, toy_pixel
from l2p.model import ZImageDiT
from l2p.train import TrainConfig, train

name, policy, n, size, batch, steps, threads = sys.argv[1:8]
n, size, batch, steps = int(n), int(size), int(batch), int(steps)
torch.set_num_threads(int(threads))
cfg = {"toy": toy_pixel(),
       "wide": l2p_1k().replace(dim=512, n_layers=12, n_heads=4, axes_dims=(32, 48, 48), cap_feat_dim=384,
                                detailer=DetailerConfig(channels=(32, 64, 128, 256)))}[name]
torch.manual_seed(0)
model = ZImageDiT(cfg)
g = torch.Generator().manual_seed(0)
data = [{"x": torch.rand(3, size, size, generator=g) * 2 - 1, "prompt": str(i), "seed": i} for i in range(batch)]
feats = {str(i): torch.randn(20, cfg.cap_feat_dim, generator=g) for i in range(batch)}

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

before = rss_mb()
hist = train(model, data, lambda ps: [feats[p] for p in ps],
             TrainConfig(steps=steps, batch_size=batch, lr=1e-5, policy=policy, n_keep=n, verbose=False))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
params = dict(model.named_parameters())
trainable = sum(p.numel() for p in params.values() if p.requires_grad)
print(json.dumps({"sec": hist.sec.tolist(), "before_mb": before, "peak_mb": peak, "trainable": trainable,
                  "total": sum(p.numel() for p in params.values()), "n_layers": cfg.n_layers}))
"""

# name, image size, batch, paper n (frozen layers n … N−n−1)
CONFIGS = [("toy", 64, 16, 1), ("wide", 256, 2, 2)]


def run(name, policy, n, size, batch, steps, threads):
    out = subprocess.run([sys.executable, "-c", CHILD, name, policy, str(n), str(size), str(batch), str(steps),
                          str(threads)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="steps per run, warm-up included")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--only", choices=[c[0] for c in CONFIGS])
    args = ap.parse_args()

    print(f"{'model':5} {'policy':9} {'frozen layers':>13} {'trainable':>11} {'frozen %':>8} "
          f"{'step s':>7} {'train MiB':>9} {'peak MiB':>8}")
    for name, size, batch, n in CONFIGS:
        if args.only and name != args.only:
            continue
        res = {}
        for policy in ("paper", "full"):
            r = res[policy] = run(name, policy, n, size, batch, args.steps, args.threads)
            r["step"] = statistics.median(r["sec"][args.warmup:])
            r["train_mb"] = r["peak_mb"] - r["before_mb"]
            frozen = f"{max(r['n_layers'] - 2 * n, 0)}/{r['n_layers']}" if policy == "paper" else f"0/{r['n_layers']}"
            print(f"{name:5} {policy + (f' n={n}' if policy == 'paper' else ''):9} {frozen:>13} "
                  f"{r['trainable']:>11,} {100 * (1 - r['trainable'] / r['total']):>7.1f}% {r['step']:>7.3f} "
                  f"{r['train_mb']:>9.0f} {r['peak_mb']:>8.0f}")
        p, f = res["paper"], res["full"]
        print(f"{name:5} paper/full: time {p['step'] / f['step']:.2f}× (goal ≤ 0.8), "
              f"training memory {p['train_mb'] / f['train_mb']:.2f}× (goal ≤ 0.7), "
              f"peak RSS {p['peak_mb'] / f['peak_mb']:.2f}×  [{name} {size}×{size}, batch {batch}, "
              f"{args.threads} thread(s)]")


if __name__ == "__main__":
    main()
