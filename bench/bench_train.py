"""Step time and peak memory of the `paper` freeze policy vs `full` training (goal: ≤ 0.8× time, ≤ 0.7× memory).

Each (model, policy) run is `l2p.train.train` in a fresh subprocess on random in-memory images and fixed
random caption features, so memory peaks do not mix. Runs alternate paper, full, paper, full, … so that load
from other processes on a shared machine hits both alike. Step time: the median (and the min, the figure
least disturbed by other load) of all steps after the warm-up ones, pooled over rounds. Memory: the peak
RSS (ru_maxrss) minus the RSS just before training (model, data and imports already resident), i.e. what
training adds (gradients, AdamW state, activations); median over rounds. The raw peak is printed too.

FLOPs of one forward + backward are counted on the meta device with torch's FlopCounterMode (matmuls,
convolutions, attention): immune to machine load, and possible for the released L2P 1K too, which cannot
run here. For it the bytes of fp32 weights + gradients + AdamW state are printed as well.

`wide` has one refiner block per stream (as the toy) so that paper n=2 freezes 8 of its 14 blocks (57 %),
close to the release's 20 of 34 (59 %); the toy's 4 layers allow only n=1 (2 of 6 blocks).

    python bench/bench_train.py [--rounds 2] [--steps 4] [--warmup 1] [--threads 1] [--grad-ckpt] [--only toy|wide]
"""
import argparse
import json
import statistics
import subprocess
import sys

PRESETS = r"""
from l2p.config import DetailerConfig, l2p_1k, toy_pixel
PRESETS = {"toy": toy_pixel(),
           "wide": l2p_1k().replace(dim=512, n_layers=12, n_refiner_layers=1, n_heads=4, axes_dims=(32, 48, 48),
                                    cap_feat_dim=384, detailer=DetailerConfig(channels=(32, 64, 128, 256))),
           "l2p_1k": l2p_1k()}
"""

TRAIN_CHILD = PRESETS + r"""
import json, resource, sys, torch
from l2p.model import ZImageDiT
from l2p.train import TrainConfig, train

name, policy, n, size, batch, steps, threads, ckpt = sys.argv[1:9]
n, size, batch, steps = int(n), int(size), int(batch), int(steps)
torch.set_num_threads(int(threads))
cfg = PRESETS[name]
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
             TrainConfig(steps=steps, batch_size=batch, lr=1e-5, policy=policy, n_keep=n, verbose=False,
                         gradient_checkpointing=ckpt == "1"))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
params = dict(model.named_parameters())
print(json.dumps({"sec": hist.sec.tolist(), "before_mb": before, "peak_mb": peak,
                  "trainable": sum(p.numel() for p in params.values() if p.requires_grad),
                  "total": sum(p.numel() for p in params.values()),
                  "n_layers": cfg.n_layers, "blocks": cfg.n_layers + 2 * cfg.n_refiner_layers}))
"""

# `_run`'s `bool(mask.all())` cannot run on meta tensors; with equal-length items the mask is all True and
# the model drops it anyway, so it is dropped here up front.
META_CHILD = PRESETS + r"""
import json, sys, torch
from torch.utils.flop_counter import FlopCounterMode
from l2p.freeze import apply_policy
from l2p.model import ZImageDiT

run = ZImageDiT._run
ZImageDiT._run = lambda self, blocks, x, freqs, mask, temb=None: run(self, blocks, x, freqs, None, temb)
name, n, size, batch, cap_len, ckpt = sys.argv[1], *map(int, sys.argv[2:7])
with torch.device("meta"):
    model = ZImageDiT(PRESETS[name])
    x, t = torch.randn(batch, 3, size, size), torch.full((batch,), 0.5)
    caps = [torch.randn(cap_len, model.cfg.cap_feat_dim)] * batch
model.gradient_checkpointing = bool(ckpt)
res = {}
for policy in ("paper", "full"):
    apply_policy(model, policy, n=n)
    with FlopCounterMode(display=False) as fc:
        model(x, t, caps).square().mean().backward()
    model.zero_grad(set_to_none=True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    res[policy] = {"flops": fc.get_total_flops(), "state_bytes": 4 * model.num_params() + 12 * trainable}
print(json.dumps(res))
"""

# name, image size, batch, paper n (frozen main layers n … N−n−1)
CONFIGS = [("toy", 64, 16, 1), ("wide", 256, 2, 2)]


def child(script, *args):
    out = subprocess.run([sys.executable, "-c", script, *map(str, args)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="paper/full pairs per model")
    ap.add_argument("--steps", type=int, default=4, help="steps per run, warm-up included")
    ap.add_argument("--warmup", type=int, default=1, help="first steps of each run left out")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing, as the release trains")
    ap.add_argument("--only", choices=[c[0] for c in CONFIGS])
    args = ap.parse_args()
    ckpt = int(args.grad_ckpt)

    print(f"{args.threads} thread(s), gradient checkpointing {'on' if ckpt else 'off'}, "
          f"{args.rounds} round(s) × {args.steps - args.warmup} timed steps per policy")
    print(f"{'model':5} {'policy':9} {'frozen blocks':>13} {'trainable':>11} {'frozen':>7} {'GFLOP':>6} "
          f"{'step s med':>10} {'min':>6} {'train MiB':>9} {'peak MiB':>8}")
    for name, size, batch, n in CONFIGS:
        if args.only and name != args.only:
            continue
        runs = {"paper": [], "full": []}
        for _ in range(args.rounds):
            for policy in runs:
                runs[policy].append(child(TRAIN_CHILD, name, policy, n, size, batch, args.steps, args.threads, ckpt))
        flops = child(META_CHILD, name, n, size, batch, 20, ckpt)
        res = {}
        for policy, rs in runs.items():
            secs = [s for r in rs for s in r["sec"][args.warmup:]]
            r = res[policy] = {**rs[0], "flops": flops[policy]["flops"], "med": statistics.median(secs),
                               "min": min(secs), "peak_mb": statistics.median(r["peak_mb"] for r in rs),
                               "train_mb": statistics.median(r["peak_mb"] - r["before_mb"] for r in rs)}
            frozen = f"{max(r['n_layers'] - 2 * n, 0) if policy == 'paper' else 0}/{r['blocks']}"
            label = policy + (f" n={n}" if policy == "paper" else "")
            print(f"{name:5} {label:9} {frozen:>13} "
                  f"{r['trainable']:>11,} {100 * (1 - r['trainable'] / r['total']):>6.1f}% {r['flops'] / 1e9:>6.1f} "
                  f"{r['med']:>10.3f} {r['min']:>6.3f} {r['train_mb']:>9.0f} {r['peak_mb']:>8.0f}")
        p, f = res["paper"], res["full"]
        print(f"{name:5} paper/full ({size}×{size}, batch {batch}): FLOPs {p['flops'] / f['flops']:.2f}×, step time "
              f"{p['med'] / f['med']:.2f}× median, {p['min'] / f['min']:.2f}× min (goal ≤ 0.8); training memory "
              f"{p['train_mb'] / f['train_mb']:.2f}× (goal ≤ 0.7); peak RSS {p['peak_mb'] / f['peak_mb']:.2f}×")

    m = child(META_CHILD, "l2p_1k", 5, 1024, 1, 100, ckpt)
    p, f = m["paper"], m["full"]
    print(f"l2p_1k (meta device, 1024², batch 1, 100-token caption): FLOPs paper {p['flops'] / 1e12:.1f} T / full "
          f"{f['flops'] / 1e12:.1f} T = {p['flops'] / f['flops']:.2f}×; fp32 weights + grads + AdamW "
          f"{p['state_bytes'] / 2**30:.1f} / {f['state_bytes'] / 2**30:.1f} GiB = "
          f"{p['state_bytes'] / f['state_bytes']:.2f}× (activations excluded)")


if __name__ == "__main__":
    main()
