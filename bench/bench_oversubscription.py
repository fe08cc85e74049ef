"""Why `make reports JOBS=N` never runs more workers than cores // threads: oversubscribed torch jobs.

The same short toy fine-tuning job (the toy pixel model, `l2p.train.train`, batch 16 of random 64² images) is
run in fresh subprocesses, side by side in one run of this script:
  - one after the other: 2 jobs × T threads, sequentially (the wall time the cores need for the work);
  - at once: the same 2 jobs started together, each still on T threads.
With 2·T threads on fewer cores, torch's OpenMP threads wait at every parallel region for threads the OS has
descheduled, so "at once" can take far longer than "one after the other". Also printed: the two jobs at
once on T/2 threads each, the split that does fit.

    python bench/bench_oversubscription.py [--threads 2] [--steps 20]
"""
import argparse
import os
import subprocess
import sys
import time

CHILD = r"""
import sys, torch
from l2p.config import toy_pixel
from l2p.model import ZImageDiT
from l2p.train import TrainConfig, train
threads, steps, batch, what = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(threads)
torch.manual_seed(0)
cfg = toy_pixel()
model = ZImageDiT(cfg)
g = torch.Generator().manual_seed(0)
if what == "train":
    data = [{"x": torch.rand(3, 64, 64, generator=g) * 2 - 1, "prompt": str(i), "seed": i} for i in range(batch)]
    feats = {str(i): torch.randn(12, cfg.cap_feat_dim, generator=g) for i in range(batch)}
    train(model, data, lambda ps: [feats[p] for p in ps], TrainConfig(steps=steps, batch_size=batch, verbose=False))
else:  # model calls as a sampler makes them: no grad, one after another
    x, caps = torch.randn(batch, 3, 64, 64, generator=g), [torch.randn(12, cfg.cap_feat_dim, generator=g)] * batch
    with torch.no_grad():
        for i in range(steps):
            x = x - 0.01 * model(x, torch.full((batch,), 0.5), caps)
"""


def jobs(n: int, threads: int, steps: int, together: bool, batch: int = 16, what: str = "train") -> float:
    """Wall seconds for n jobs, started together or one after the other."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-c", CHILD, str(threads), str(steps), str(batch), what]
    t0 = time.perf_counter()
    if together:
        procs = [subprocess.Popen(cmd, env=env) for _ in range(n)]
        codes = [p.wait() for p in procs]
    else:
        codes = [subprocess.run(cmd, env=env).returncode for _ in range(n)]
    if any(codes):
        raise SystemExit(f"a child job failed (exit codes {codes})")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    from l2p.cache import available_cores
    cores = available_cores()
    t = a.threads
    half = max(1, t // 2)
    jobs(1, t, 2, False)  # warm the file cache and imports
    print(f"{cores} core(s); 2 jobs of the toy pixel model (64²); wall seconds")
    for what, steps, batch in (("train", a.steps, 16), ("sample", 10 * a.steps, 2)):
        seq = jobs(2, t, steps, False, batch, what)
        par = jobs(2, t, steps, True, batch, what)
        fit = jobs(2, half, steps, True, batch, what)
        label = f"{steps} training steps, batch {batch}" if what == "train" else f"{steps} model calls, batch {batch}"
        print(f"{label}:")
        print(f"  one after the other, {t} threads each : {seq:7.1f}")
        print(f"  at once,             {t} threads each : {par:7.1f}   ({par / seq:.2f}× the sequential time)")
        print(f"  at once,             {half} thread(s) each: {fit:7.1f}   ({fit / seq:.2f}×)")


if __name__ == "__main__":
    main()
