"""One-GPU check of the real architectures with random bf16 weights: step times, peak memory, sanity checks.

    python bench/gpu_check.py [--quick] [--out gpu_check.json]   # one H100/H200: ~2-4 min (budget guard 7 min)
    python bench/gpu_check.py --tiny                             # every section, tiny presets, on the CPU (tests)

Models are built on the meta device and materialised on the GPU in bf16 (no CPU copy of 6B parameters);
text features are random (L, 2560) tensors. Sections, in this order, each guarded so that an OOM or an
error marks its rows and the next section still runs:

  sweep     Z-Image-Turbo step + Flux VAE decode, l2p_1k step at patch 16, l2p_4k step at patch 64, at 1024²
            and 4096² (grids up to 4096 tokens; l2p.efficiency.measure)
  train     one l2p_1k training step at 1024²: paper freeze policy (l2p.train.prepare_trainable), AdamW on the
            trainable subset, gradient checkpointing, bf16 weights; peak includes gradients and AdamW state
  bf16      bf16 vs fp32 agreement of the l2p_1k forward on a 256² input (TF32 off for the reference)
  odd-grid  l2p_1k forward at 1280×720: a 45×80 = 3600-token grid, not a multiple of 32
  cfg       latent and patch-16 steps at 1024² with CFG (positive and negative in one batch of 2)
  offload   a 2-step CFG sample at 1024² through L2PPipeline with a Qwen3-4B-sized text encoder (random weights,
            random token ids: no tokenizer), both models resident vs model CPU offload: peak GPU memory, time
  train-full (not with --quick) the same training step under the `full` policy, for the paper/full ratio
  sweep+    (not with --quick) 2048² for every arm, and the latent and patch-16 models at 4096²

Prints one table (peak = weights + largest transient, MiB); --out writes the rows and the sweep as JSON.
Sections that would start after --budget-s seconds are skipped, so the table always comes out.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from l2p.config import get_config, tiny_pixel  # noqa: E402
from l2p.efficiency import (PeakMemory, build_dit, caption_features, free_memory, is_oom, measure,  # noqa: E402
                            param_mb, real_arms, ratios, time_call, tiny_arms)


@dataclass(frozen=True)
class Scale:
    """Sizes for one run: the real architectures on a GPU, or tiny stand-ins on the CPU."""

    device: str
    dtype: torch.dtype
    arms: tuple
    pixel: object  # preset name or DiTConfig of the 1K pixel model (train, bf16, odd-grid)
    res: int  # "1024²"
    res4k: int  # "4096²"
    res_mid: int  # "2048²"
    odd: tuple  # (height, width) whose token grid is not a multiple of 32
    small: int  # bf16 vs fp32 input side
    cap_len: int
    n_keep: int  # paper policy: first and last n main layers train


def real_scale() -> Scale:
    return Scale("cuda", torch.bfloat16, tuple(real_arms()), "l2p_1k", 1024, 4096, 2048, (720, 1280), 256, 128, 5)


def tiny_scale() -> Scale:
    # 4 layers so that paper n=1 freezes the middle two, as n=5 freezes 20 of 30.
    # Sides keep the real ratios where they can: "1024²" is 2×2 tokens, "4096²" at patch 64 is 1 token.
    return Scale("cpu", torch.float32, tuple(tiny_arms()), tiny_pixel().replace(n_layers=4), 32, 64, 48,
                 (48, 80), 32, 8, 1)


# ----------------------------------------------------------------------------------------------
#                                          Sections
# ----------------------------------------------------------------------------------------------

def _num(x):
    """A float for the table, None for missing or NaN."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def sweep_rows(df, section):
    """Table rows from an l2p.efficiency sweep."""
    rows = []
    for _, r in df.iterrows():
        measured = r.step_ms == r.step_ms and r.step_ms is not None  # not NaN / None
        note = f"{int(r.tokens)} tokens" if measured else ""
        if measured and r.decode_ms == r.decode_ms and r.decode_ms is not None:
            note += (f"; decode {r.decode_ms:,.0f} ms once per sample, {r.per_step_ms:,.0f} ms/step over "
                     f"{r.num_steps} steps ({100 * r.decode_share:.0f}% of a sample)")
        rows.append(dict(section=section, what=f"{r.arm} {r.resolution}" + (" CFG" if r.cfg else ""),
                         status=r.status, ms=_num(r.step_ms), peak_mib=_num(r.peak_mb), note=note))
    return rows


def _repeats(args):
    return 1 if args.quick or args.tiny else 2


def _measure(sc, state, arms, resolutions, **kw):
    """l2p.efficiency.measure in-process (on the GPU it always is), models built once per arm."""
    df = measure(list(arms), resolutions, device=sc.device, dtype=sc.dtype, cap_len=sc.cap_len, isolate=False,
                 deadline=state["deadline"], **kw)
    state["sweep"].append(df)
    return df


def section_sweep(sc, args, state):
    # Up to 4096 tokens: latent and patch 16 at 1024², patch 64 at 1024² and 4096².
    df = _measure(sc, state, sc.arms, [sc.res, sc.res4k], repeats=_repeats(args), max_tokens=(sc.res // 16) ** 2)
    return sweep_rows(df, "sweep")


def section_sweep_more(sc, args, state):
    lat, p16, _ = sc.arms
    mid = _measure(sc, state, sc.arms, [sc.res_mid], repeats=_repeats(args))
    big = _measure(sc, state, [lat, p16], [sc.res4k], repeats=1)  # 65536 tokens: seconds per step
    return sweep_rows(mid, "sweep+") + sweep_rows(big, "sweep+")


def section_cfg(sc, args, state):
    lat, p16, _ = sc.arms
    return sweep_rows(_measure(sc, state, [lat, p16], [sc.res], guidance=True, repeats=_repeats(args)), "cfg")


def section_train(sc, args, state, policy="paper"):
    from l2p.flow import add_noise, flow_matching_loss
    from l2p.schedule import dit_time, sample_training_sigma
    from l2p.train import TrainConfig, prepare_trainable

    dev = sc.device
    model = build_dit(sc.pixel, dev, sc.dtype, seed=0)
    model.gradient_checkpointing = True
    model.train()
    summary = prepare_trainable(model, TrainConfig(policy=policy, n_keep=sc.n_keep))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=5e-5, weight_decay=0.01)  # the release's settings
    g = torch.Generator(dev).manual_seed(0)
    x0 = torch.rand(1, 3, sc.res, sc.res, generator=g, device=dev) * 2 - 1
    caps = caption_features(1, sc.cap_len, get_config(sc.pixel).cap_feat_dim, dev, sc.dtype)
    losses = []

    def step():
        sigma = sample_training_sigma(1, torch.Generator().manual_seed(len(losses))).to(dev)
        noise = torch.randn(x0.shape, generator=g, device=dev)
        raw = model(add_noise(x0, noise, sigma).to(sc.dtype), dit_time(sigma), caps)
        loss = flow_matching_loss(raw, x0, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    weights = param_mb(model)
    with PeakMemory(dev) as mem:  # from the first step: gradients and AdamW state are part of the cost
        times = time_call(step, dev, warmup=1, repeats=_repeats(args))
    ok = all(math.isfinite(v) for v in losses)
    note = (f"{summary.trainable_params:,} trainable / {summary.frozen_params:,} frozen; "
            f"loss {', '.join(f'{v:.3f}' for v in losses)}; first step (allocates AdamW state) excluded from ms")
    model = opt = trainable = None  # frees the GPU memory (`step` shares these cells; pyflakes misreads a del)
    state.setdefault("train", {})[policy] = (min(times), weights + mem.peak_mb)
    return [dict(section="train", what=f"{policy} policy, grad ckpt, AdamW {sc.res}²",
                 status="ok" if ok else "non-finite loss", ms=min(times), peak_mib=weights + mem.peak_mb, note=note)]


def section_bf16(sc, args, state):
    dev = sc.device
    model = build_dit(sc.pixel, dev, torch.float32, seed=0)
    cfg = model.cfg
    g = torch.Generator(dev).manual_seed(0)
    x = torch.randn(1, 3, sc.small, sc.small, generator=g, device=dev)
    caps = caption_features(1, 32, cfg.cap_feat_dim, dev, torch.float32)
    t = torch.tensor([0.5], device=dev)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # a true fp32 reference
    try:
        with torch.inference_mode():
            ref = model(x, t, caps).float()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    model.to(torch.bfloat16)  # the same weights, rounded
    with torch.inference_mode():
        out = model(x.to(torch.bfloat16), t, [c.to(torch.bfloat16) for c in caps]).float()
    diff = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    finite = math.isfinite(diff) and bool(torch.isfinite(out).all())
    status = "ok" if finite and cos > 0.99 else ("non-finite" if not finite else "low agreement")
    del model
    return [dict(section="bf16", what=f"bf16 vs fp32 forward {sc.small}²", status=status, ms=None, peak_mib=None,
                 note=f"max |Δ| {diff:.4g} (max |fp32| {scale:.4g}, relative {diff / max(scale, 1e-12):.3g}); "
                      f"cosine {cos:.6f}")]


def section_odd(sc, args, state):
    dev = sc.device
    model = build_dit(sc.pixel, dev, sc.dtype, seed=0)
    h, w = sc.odd
    tokens = (h // 16) * (w // 16)
    g = torch.Generator(dev).manual_seed(0)
    x = torch.randn(1, 3, h, w, generator=g, device=dev).to(sc.dtype)
    caps = caption_features(1, sc.cap_len, model.cfg.cap_feat_dim, dev, sc.dtype)
    out = {}

    @torch.inference_mode()
    def fwd():
        out["y"] = model(x, torch.tensor([0.5], device=dev), caps)

    weights = param_mb(model)
    time_call(fwd, dev, 1, 0)
    with PeakMemory(dev) as mem:
        times = time_call(fwd, dev, 0, 1)
    y = out.pop("y")
    ok = tuple(y.shape) == tuple(x.shape) and bool(torch.isfinite(y).all())
    model = None  # frees the GPU memory (`fwd` shares the cell; pyflakes misreads a del)
    return [dict(section="odd-grid", what=f"forward {w}×{h}", status="ok" if ok else f"bad output {tuple(y.shape)}",
                 ms=times[0], peak_mib=weights + mem.peak_mb,
                 note=f"{h // 16}×{w // 16} = {tokens} tokens ({tokens} mod 32 = {tokens % 32})")]


class RandomTokenText(torch.nn.Module):
    """A text encoder fed `length` random token ids per prompt: its size and cost without a tokenizer (none can be
    downloaded); the features are its hidden_states[-2], as Z-Image takes them."""

    def __init__(self, model, length: int):
        super().__init__()
        self.model, self.length = model, length

    @torch.no_grad()
    def encode_list(self, prompts):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.model.config.vocab_size, (len(prompts), self.length), generator=g)
        out = self.model(input_ids=ids.to(self.model.embed_tokens.weight.device), output_hidden_states=True)
        return list(out.hidden_states[-2])


def section_offload(sc, args, state):
    from transformers import Qwen3Config, Qwen3Model

    from l2p.pipeline import L2PPipeline
    from l2p.text import z_image_text_config

    dev = sc.device
    dit = build_dit(sc.pixel, dev, sc.dtype, seed=0)
    tcfg = z_image_text_config() if torch.device(dev).type == "cuda" else Qwen3Config(
        vocab_size=64, hidden_size=dit.cfg.cap_feat_dim, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    default = torch.get_default_dtype()
    torch.set_default_dtype(sc.dtype)  # built in its dtype on the device: no fp32 copy of 4B parameters
    try:
        with torch.device(dev):
            torch.manual_seed(0)
            enc = Qwen3Model(tcfg).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(default)
    weights = f"weights: DiT {param_mb(dit):,.0f} MiB, text encoder {param_mb(enc):,.0f} MiB"
    pipe = L2PPipeline(dit, RandomTokenText(enc, sc.cap_len), device=dev, dtype=sc.dtype)
    kw = dict(seed=0, num_inference_steps=2, cfg_scale=2.0, height=sc.res, width=sc.res, output_type="pt")
    rows, outs = [], {}
    for name in ("resident", "cpu offload"):
        if name == "cpu offload":
            pipe.enable_model_cpu_offload()
            free_memory(dev)

        def call(_name=name):
            outs[_name] = pipe("a cat", **kw)
        call()  # warm-up
        with PeakMemory(dev) as mem:
            ms = time_call(call, dev, 0, 1)[0]
        # absolute: what was resident when the call began (the weights, or nothing under offload) + its peak above
        peak = mem.before + mem.peak_mb if torch.device(dev).type == "cuda" else None
        rows.append(dict(section="offload", what=f"2-step CFG sample {sc.res}², {name}", status="ok", ms=ms,
                         peak_mib=peak, note=weights if name == "resident" else ""))
    diff = (outs["cpu offload"].float() - outs["resident"].float()).abs().max().item()
    finite = bool(torch.isfinite(outs["resident"]).all())
    rows[-1]["note"] = f"output max |Δ| vs resident {diff:.3g}"
    if not finite or diff > 1e-2:
        rows[-1]["status"] = "non-finite" if not finite else "differs"
    del pipe, dit, enc
    return rows


def section_env(sc, args, state):
    if torch.device(sc.device).type == "cuda":
        p = torch.cuda.get_device_properties(0)
        what = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}"
    else:
        what = f"CPU, {torch.get_num_threads()} threads"
    note = f"torch {torch.__version__}, {str(sc.dtype).replace('torch.', '')}"
    if torch.device(sc.device).type == "cuda":
        note += f", CUDA {torch.version.cuda}, flash SDPA {torch.backends.cuda.flash_sdp_enabled()}"
    return [dict(section="env", what=what, status="ok", ms=None, peak_mib=None, note=note)]


# ----------------------------------------------------------------------------------------------
#                                          Driver
# ----------------------------------------------------------------------------------------------

def run_section(name, fn, sc, args, state):
    """Run one section; an error or OOM becomes a row and memory is released for the next one."""
    if time.monotonic() > state["deadline"]:
        return [dict(section=name, what="", status="skipped: time budget", ms=None, peak_mib=None, note="")]
    t0 = time.monotonic()
    try:
        rows = fn(sc, args, state)
    except Exception as e:  # noqa: BLE001: keep the table
        if not is_oom(e):
            traceback.print_exc()
        rows = [dict(section=name, what="", status="OOM" if is_oom(e) else f"error: {type(e).__name__}: {e}"[:200],
                     ms=None, peak_mib=None, note="")]
    free_memory(sc.device)
    for r in rows:
        print(format_row(r), flush=True)
    print(f"  [{name}: {time.monotonic() - t0:.0f} s]", flush=True)
    return rows


HEADER = f"{'section':9} {'what':34} {'status':8} {'ms':>10} {'peak MiB':>10}  note"


def format_row(r):
    """One table line; a status longer than its column (why skipped, which error) moves into the note."""
    ms = "" if r["ms"] is None else f"{r['ms']:,.1f}"
    peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:,.0f}"
    status, note = r["status"], r["note"]
    if len(status) > 8:
        status, note = status.split(":")[0][:8], f"{status}; {note}" if note else status
    return f"{r['section']:9} {r['what'][:34]:34} {status:8} {ms:>10} {peak:>10}  {note}"


def headline(state):
    """The paper's comparison in two lines, from whatever the sweeps measured."""
    import pandas as pd
    lines = []
    tr = state.get("train", {})
    if "paper" in tr and "full" in tr:
        (tp, mp), (tf, mf) = tr["paper"], tr["full"]
        lines.append(f"training step paper / full: time {tp / tf:.2f}×, peak memory {mp / mf:.2f}× "
                     f"(goal ≤ 0.8×, ≤ 0.7×)")
    if not state["sweep"]:
        return lines
    df = pd.concat(state["sweep"], ignore_index=True)
    df = df[~df.cfg]
    rt = ratios(df.drop_duplicates(["arm", "resolution"], keep="last"))
    return lines + [f"{r.arm} / latent at {r.resolution}: step {r.step_vs_latent_step:.2f}×, step vs latent step + amortised "
            f"decode {r.step_vs_latent_per_step:.2f}×, peak memory {r.peak_vs_latent_peak:.2f}×"
            for r in rt.itertuples() if r.step_vs_latent_step == r.step_vs_latent_step]


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item"):
        return _clean(v.item())
    return v


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one timed repeat, no 2048² / large-grid 4096² sweep")
    ap.add_argument("--tiny", action="store_true", help="tiny presets on the CPU (every code path, seconds)")
    ap.add_argument("--out", type=Path, help="write the table and the sweep as JSON here")
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no section after this many seconds")
    ap.add_argument("--sections", help="comma-separated subset to run, e.g. env,train,train-full")
    args = ap.parse_args(argv)

    sc = tiny_scale() if args.tiny else real_scale()
    if sc.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU, or use --tiny for the CPU check")
    if sc.device == "cpu":
        torch.set_num_threads(1)  # tiny models: one thread is faster on a shared machine
    t_start = time.monotonic()
    state = {"deadline": t_start + args.budget_s, "sweep": []}
    sections = [("env", section_env), ("sweep", section_sweep), ("train", section_train), ("bf16", section_bf16),
                ("odd-grid", section_odd), ("cfg", section_cfg), ("offload", section_offload)]
    if not args.quick:
        # The paper's claim for its freeze policy, measured: the same step with everything trained.
        sections += [("train-full", lambda *a: section_train(*a, policy="full")), ("sweep+", section_sweep_more)]
    if args.sections:
        wanted = args.sections.split(",")
        unknown = sorted(set(wanted) - {n for n, _ in sections})
        if unknown:
            sys.exit(f"unknown section(s) {unknown}; choose from {[n for n, _ in sections]}")
        sections = [(n, f) for n, f in sections if n in wanted]
    print(HEADER, flush=True)
    rows = []
    for name, fn in sections:
        rows += run_section(name, fn, sc, args, state)
    elapsed = time.monotonic() - t_start

    print(f"\n{'=' * 30} gpu_check ({'tiny, CPU' if args.tiny else 'real'}{', quick' if args.quick else ''}): "
          f"{elapsed:.0f} s {'=' * 30}")
    print(HEADER)
    for r in rows:
        print(format_row(r))
    lines = headline(state)
    for line in lines:
        print(line)
    if args.out:
        import pandas as pd
        sweep = pd.concat(state["sweep"], ignore_index=True) if state["sweep"] else pd.DataFrame()
        payload = {"mode": "tiny" if args.tiny else "real", "quick": args.quick, "elapsed_s": elapsed,
                   "rows": [{k: _clean(v) for k, v in r.items()} for r in rows], "headline": lines,
                   "sweep": [{k: _clean(v) for k, v in rec.items()} for rec in sweep.to_dict("records")]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=1, default=str))
        print(f"wrote {args.out}")
    failed = [r for r in rows if not (r["status"] == "ok" or r["status"].startswith("skipped"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
