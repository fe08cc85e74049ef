"""Peak RSS of `ZImageDiT.from_pretrained` ÷ checkpoint bytes on disk (goal ≤ 1.15).

A synthetic checkpoint with the real hidden size (3840) and real key layout but fewer layers is
written to a temporary folder (sharded, bf16), then loaded in a fresh subprocess that reports its
own peak RSS. The subprocess's RSS after `import torch, l2p` (the interpreter's floor) is printed
too, so the ratio can be read with and without it.

    python bench/bench_load.py [--layers 3] [--dtype bf16] [--keep DIR]
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
from l2p.model import ZImageDiT
def rss_mb(field="VmHWM"):
    # /proc, not ru_maxrss: after fork+exec, ru_maxrss can still report the parent's peak
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
base = rss_mb("VmRSS")
t0 = time.perf_counter()
m = ZImageDiT.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
dt = time.perf_counter() - t0
n = sum(p.numel() * p.element_size() for p in m.parameters())
print(json.dumps({"base_mb": base, "peak_mb": rss_mb(), "seconds": dt, "model_bytes": n}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--shard", default="1GB")
    args = ap.parse_args()

    import torch
    from l2p.checkpoint import make_synthetic_checkpoint, parse_size
    from l2p.config import z_image_turbo

    cfg = z_image_turbo().replace(n_layers=args.layers, n_refiner_layers=1)
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent) as tmp:
        out = Path(tmp) / "synthetic.safetensors"
        t0 = time.perf_counter()
        files = make_synthetic_checkpoint(cfg, out, dtype=getattr(torch, args.dtype),
                                          max_shard_bytes=parse_size(args.shard))
        disk = sum(f.stat().st_size for f in files)
        print(f"synthetic checkpoint: dim 3840, {args.layers} layers, {len(files)} shard(s), "
              f"{disk / 2**30:.2f} GiB {args.dtype}, written in {time.perf_counter() - t0:.1f}s")
        target = files[0].parent if len(files) > 1 else files[0]
        res = json.loads(subprocess.run([sys.executable, "-c", CHILD, str(target), args.dtype], check=True,
                                        capture_output=True, text=True).stdout.strip().splitlines()[-1])
    peak, base = res["peak_mb"] * 2**20, res["base_mb"] * 2**20
    print(f"load time            {res['seconds']:.2f} s ({disk / res['seconds'] / 2**30:.2f} GiB/s)")
    print(f"interpreter floor    {base / 2**20:.0f} MiB (python + torch + l2p imported)")
    print(f"peak RSS             {peak / 2**20:.0f} MiB")
    print(f"peak RSS / disk      {peak / disk:.3f}   (goal ≤ 1.15)")
    print(f"(peak − floor) / disk {(peak - base) / disk:.3f}")


if __name__ == "__main__":
    main()
