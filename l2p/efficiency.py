"""Inference cost against resolution: latent DiT + VAE decode vs the pixel DiT with patch 16 and a large patch.

The paper's Fig. 4 argument: a pixel model with patch 16 sees the same token grid as the latent model
(stride 8 × patch 2), so its trunk costs the same per step, it adds only the Detailer Head, and it needs no
VAE decode; a larger patch (64 for 4K) keeps 4096² at 4096 tokens. Three "arms" are measured side by side:

* latent + VAE: the latent DiT (patch 2 on stride-8 latents); the VAE decode runs once per sample and is
  reported separately and amortised over `num_steps` (per_step_ms = step_ms + decode_ms / num_steps);
* pixel p16: the L2P model on RGB with patch 16;
* pixel p64 (or any large patch): the same with the large-patch embedder; the Detailer Head is shared and
  meets the coarser DiT map through its nearest-resized bottleneck.

One step is what `l2p.pipeline` does per step: the velocity (with CFG, positive and negative passes, batched
as the package's pipeline does, or one after the other as the release does) and the Euler update.
Models are randomly initialised (cost does not depend on the weights), built on the meta device and
materialised directly on the target device; bf16 on CUDA, fp32 on CPU unless told otherwise.

Memory. peak_mb = weights_mb + the largest transient that a step or a decode adds above what is resident
after its warm-up call (weights, inputs, lazily initialised kernels). On CUDA the transient is
`max_memory_allocated` − `memory_allocated`, the peak reset after the warm-up. On CPU it is VmHWM − VmRSS
from /proc/self/status, the high-water mark reset through /proc/self/clear_refs; by default each
configuration runs in its own process forked from `ForkServer`, which has the imports loaded (a fork of the
caller would inherit its RSS; a fresh interpreter spends seconds importing). Caveat on CPU: memory the
warm-up freed into the C heap can be reused unseen, so small transients are under-counted.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Union

import pandas as pd
import torch
import torch.nn as nn

from .config import DiTConfig, get_config, tiny_pixel, toy_pixel
from .model import RMSNorm, ZImageDiT

# The Flux VAE that Z-Image uses (z_image_facts.md §1): stride 8, 16 latent channels, 83.8M parameters.
FLUX_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
    shift_factor=0.1159, latents_mean=None, latents_std=None, force_upcast=True, use_quant_conv=False,
    use_post_quant_conv=False, mid_block_add_attention=True)

COLUMNS = ["arm", "model", "patch", "resolution", "height", "width", "side", "tokens", "batch", "cfg", "passes",
           "num_steps", "device", "dtype", "params", "weights_mb", "step_ms", "step_ms_min", "decode_ms",
           "per_step_ms", "sample_ms", "decode_share", "step_act_mb", "decode_act_mb", "peak_mb", "mem_method",
           "status"]


# ----------------------------------------------------------------------------------------------
#                                     What is compared
# ----------------------------------------------------------------------------------------------

def with_patch(cfg: DiTConfig, patch: int) -> DiTConfig:
    """`cfg` with an extra `{patch}-1` embedder (as l2p_4k adds 64-1 to l2p_1k); the Detailer Head is shared."""
    if patch in cfg.all_patch_size:
        return cfg
    return cfg.replace(all_patch_size=cfg.all_patch_size + (patch,), all_f_patch_size=cfg.all_f_patch_size + (1,))


@dataclass(frozen=True)
class Arm:
    """One curve of the figure: a DiT, the patch it is run with and, for the latent model, its VAE."""

    name: str
    model: Union[str, DiTConfig]
    patch: int
    vae: Optional[dict] = None  # AutoencoderKL kwargs; only the decoder is built (text-to-image needs no encoder)
    label: str = ""  # how the table names a model given as a DiTConfig

    @property
    def config(self) -> DiTConfig:
        return get_config(self.model)

    @property
    def model_name(self) -> str:
        return self.model if isinstance(self.model, str) else (self.label or "custom")

    @property
    def stride(self) -> int:
        """Pixels per input position: the VAE's downsampling for the latent model, 1 for pixels."""
        return 1 if self.vae is None else 2 ** (len(self.vae["block_out_channels"]) - 1)

    def grid(self, height: int, width: int) -> Optional[tuple[int, int]]:
        """The DiT token grid at this image size, or None when the size does not divide."""
        unit = self.stride * self.patch
        if height % unit or width % unit:
            return None
        if self.vae is None and self.config.is_pixel:
            # The Detailer Head pools `depth` times, so the image must also divide by 2^depth.
            pool = 2 ** self.config.detailer.depth
            if height % pool or width % pool:
                return None
        return height // unit, width // unit


def toy_arms(large_patch: int = 64) -> list[Arm]:
    """toy_latent + a random toy VAE, toy_pixel at patch 16, and toy_pixel with a large-patch embedder."""
    from .toyworld.vae import toy_vae_config
    return [Arm("latent + VAE", "toy_latent", 2, vae=toy_vae_config()),
            Arm("pixel p16", "toy_pixel", 16),
            Arm(f"pixel p{large_patch}", with_patch(toy_pixel(), large_patch), large_patch,
                label=f"toy_pixel + {large_patch}-1")]


def real_arms() -> list[Arm]:
    """The real architectures: Z-Image-Turbo + the Flux VAE, L2P 1K at patch 16, L2P 4K at patch 64."""
    return [Arm("latent + VAE", "z_image_turbo", 2, vae=FLUX_VAE_CONFIG),
            Arm("pixel p16", "l2p_1k", 16),
            Arm("pixel p64", "l2p_4k", 64)]


def tiny_arms(large_patch: int = 64) -> list[Arm]:
    """Unit-test sizes: tiny_latent + a 2-level-wide tiny VAE, tiny_pixel at patch 16 and a large patch."""
    from .toyworld.vae import toy_vae_config
    return [Arm("latent + VAE", "tiny_latent", 2, vae=toy_vae_config((8, 8, 8, 8))),
            Arm("pixel p16", "tiny_pixel", 16),
            Arm(f"pixel p{large_patch}", with_patch(tiny_pixel(), large_patch), large_patch,
                label=f"tiny_pixel + {large_patch}-1")]


def describe_arms(arms: Sequence[Arm], resolutions: Sequence = ()) -> pd.DataFrame:
    """What each arm is: its DiT, patch, parameter counts (counted on the meta device) and tokens per resolution."""
    rows = []
    for arm in arms:
        with torch.device("meta"):
            dit = ZImageDiT(arm.config)
            dec = None
            if arm.vae is not None:
                from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
                dec = sum(p.numel() for p in AutoencoderKL(**arm.vae).decoder.parameters())
        row = dict(arm=arm.name, model=arm.model_name, patch=arm.patch, stride=arm.stride, dit_params=dit.num_params(),
                   vae_decoder_params=dec)
        for res in resolutions:
            h, w = _size(res)
            grid = arm.grid(h, w)
            row[f"tokens {h}²" if h == w else f"tokens {h}×{w}"] = grid[0] * grid[1] if grid else None
        rows.append(row)
    df = pd.DataFrame(rows)
    return df.astype({c: "Int64" for c in df.columns if c == "vae_decoder_params" or c.startswith("tokens")})


ARM_SETS = {"toy": toy_arms, "real": real_arms, "tiny": tiny_arms}


# ----------------------------------------------------------------------------------------------
#                                  Random models, built in place
# ----------------------------------------------------------------------------------------------

def resolve_dtype(dtype, device) -> torch.dtype:
    """None → bf16 on CUDA, fp32 elsewhere; strings such as "bfloat16" are accepted."""
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


@torch.no_grad()
def random_init_(module: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Fill every parameter in place: torch's default init where a layer has one, 1 for norm weights, N(0, std) else."""
    torch.manual_seed(seed)  # seeds every device's default generator
    for m in module.modules():
        own = list(m.named_parameters(recurse=False))
        if not own:
            continue
        if isinstance(m, RMSNorm):
            m.weight.fill_(1.0)
        elif hasattr(m, "reset_parameters"):
            m.reset_parameters()
        else:  # e.g. the DiT's pad tokens
            for _, p in own:
                p.normal_(0.0, std)
    return module


def _materialise(build, device, dtype, seed) -> nn.Module:
    """Construct on meta, cast there, allocate on `device` and init in place: no CPU copy of the weights."""
    with torch.device("meta"):
        module = build()
    # nn.Module.to: diffusers' ModelMixin.to warns about modules to keep in fp32 (the VAE has none).
    module = nn.Module.to(module, dtype=dtype).to_empty(device=device)
    if any(True for _ in module.buffers()):  # none today; to_empty would leave them uninitialised
        raise RuntimeError(f"{type(module).__name__} has buffers; random_init_ does not fill them")
    return random_init_(module, seed).eval().requires_grad_(False)


def build_dit(cfg: Union[str, DiTConfig], device="cpu", dtype=None, seed: int = 0) -> ZImageDiT:
    """A randomly initialised ZImageDiT, materialised directly on `device` in `dtype`."""
    return _materialise(lambda: ZImageDiT(cfg), device, resolve_dtype(dtype, device), seed)


def build_vae(config: dict, device="cpu", dtype=None, seed: int = 0, decoder_only: bool = True):
    """A randomly initialised diffusers AutoencoderKL; by default without its encoder (unused for sampling)."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    def build():
        vae = AutoencoderKL(**config)
        if decoder_only:
            vae.encoder = None
        return vae
    return _materialise(build, device, resolve_dtype(dtype, device), seed)


def param_mb(module: nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20


def caption_features(n: int, length: int, dim: int, device="cpu", dtype=torch.float32, seed: int = 0):
    """Random (length, dim) text features per item (no text encoder weights are needed to time the DiT)."""
    g = torch.Generator(device).manual_seed(seed)
    return [torch.randn(length, dim, generator=g, device=device).to(dtype) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
#                                  Clocks and memory meters
# ----------------------------------------------------------------------------------------------

def _proc_status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_cpu_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux ≥ 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Context manager: the peak memory (MiB) its block adds above what was resident when it began."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak_mb = float("nan")
        self.exact = True

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "cuda allocator"
        return "VmHWM" if self.exact else "VmHWM not reset (upper bound)"

    def __enter__(self):
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            # Without a reset the high-water mark may predate the block: then the figure is an upper bound.
            self.exact = reset_cpu_peak()
            self.before = _proc_status_mb("VmRSS")
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak = _proc_status_mb("VmHWM")
        self.peak_mb = max(0.0, peak - self.before)
        return False


def time_call(fn, device, warmup: int = 1, repeats: int = 3) -> list[float]:
    """Wall time of `fn()` in ms, `repeats` times after `warmup` untimed calls (device synchronised)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_memory(device) -> None:
    """Release what the last configuration left (CUDA only: on the CPU tensors are freed by refcount)."""
    if torch.device(device).type == "cuda":
        gc.collect()  # an OOM's traceback can hold tensors in reference cycles
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
#                                    One configuration
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchOptions:
    """How each configuration is run; one object travels to the worker processes."""

    device: str = "cpu"
    dtype: Optional[str] = None  # None: bf16 on CUDA, fp32 elsewhere
    guidance: bool = False  # CFG: a positive and a negative pass per step
    cfg_batched: bool = True  # CFG passes in one batch of 2 (l2p.pipeline) or one after the other (the release)
    cfg_scale: float = 2.0
    num_steps: int = 8  # sampling steps the VAE decode is amortised over (Turbo: 8)
    batch: int = 1
    cap_len: int = 128  # text tokens of the prompt (padded to 32 inside the DiT)
    neg_cap_len: int = 16  # the empty negative prompt is a few template tokens
    warmup: int = 1
    repeats: int = 3
    threads: Optional[int] = None  # torch threads (CPU); None: the caller's setting
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype, self.device)


def denoise_step(dit: ZImageDiT, arm: Arm, height: int, width: int, opts: BenchOptions):
    """A closure running one sampling step at this size, as `l2p.pipeline` does it (state float32)."""
    from .pipeline import FlowPipeline
    from .sampler import guide

    dev, dtype, cfg = torch.device(opts.device), opts.torch_dtype, arm.config
    g = torch.Generator(dev).manual_seed(opts.seed)
    c = cfg.in_channels
    x = torch.randn(opts.batch, c, height // arm.stride, width // arm.stride, generator=g, device=dev)
    caps = caption_features(opts.batch, opts.cap_len, cfg.cap_feat_dim, dev, dtype, opts.seed)
    neg = caption_features(opts.batch, opts.neg_cap_len, cfg.cap_feat_dim, dev, dtype, opts.seed + 1)
    sigma, sigma_next = torch.tensor(0.75, device=dev), torch.tensor(0.6429, device=dev)  # cost does not depend on σ
    s = sigma.expand(opts.batch)
    pipe = FlowPipeline(dit, None, device=dev, dtype=dtype)
    if not opts.guidance or opts.cfg_batched:
        velocity = pipe.velocity_fn(caps, neg, opts.cfg_scale if opts.guidance else 1.0, patch_size=arm.patch)
    else:
        pos_fn = pipe.velocity_fn(caps, None, 1.0, patch_size=arm.patch)
        neg_fn = pipe.velocity_fn(neg, None, 1.0, patch_size=arm.patch)
        velocity = lambda x, s: guide(pos_fn(x, s), neg_fn(x, s), opts.cfg_scale)  # noqa: E731

    @torch.inference_mode()
    def step():
        return x + (sigma_next - sigma) * velocity(x, s)
    return step


def vae_decode(vae, arm: Arm, height: int, width: int, opts: BenchOptions):
    """A closure decoding one batch of normalised latents to pixels, as `LatentPipeline.to_pixels` does."""
    dev = torch.device(opts.device)
    g = torch.Generator(dev).manual_seed(opts.seed)
    z = torch.randn(opts.batch, arm.vae["latent_channels"], height // arm.stride, width // arm.stride,
                    generator=g, device=dev)
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0

    @torch.inference_mode()
    def decode():
        return vae.decode((z / scale + shift).to(vae.dtype)).sample.float().clamp(-1, 1)
    return decode


def measure_parts(arm: Arm, height: int, width: int, opts: BenchOptions, parts=("step", "decode"),
                  dit: Optional[ZImageDiT] = None, vae=None) -> dict:
    """Time and peak memory of a step and/or a VAE decode at one size; builds the models not given.

    Each part is guarded: an out-of-memory in one leaves the other's figures and says which failed.
    """
    dev, out, failed = opts.device, {}, []
    if "step" in parts:
        try:
            dit = dit if dit is not None else build_dit(arm.config, dev, opts.torch_dtype, opts.seed)
            out["params"], out["dit_weights_mb"] = dit.num_params(), param_mb(dit)
            fn = denoise_step(dit, arm, height, width, opts)
            time_call(fn, dev, max(1, opts.warmup), 0)  # lazy init and first-touch pages stay out of the peak
            with PeakMemory(dev) as mem:
                times = time_call(fn, dev, 0, opts.repeats)
            del fn
            out.update(step_ms=statistics.median(times), step_ms_min=min(times), step_act_mb=mem.peak_mb,
                       mem_method=mem.method)
        except Exception as e:  # noqa: BLE001: report it in the table instead of losing the run
            failed.append(f"step {'OOM' if is_oom(e) else f'error: {type(e).__name__}: {e}'}")
        free_memory(dev)
    if "decode" in parts and arm.vae is not None:
        try:
            vae = vae if vae is not None else build_vae(arm.vae, dev, opts.torch_dtype, opts.seed)
            out["vae_weights_mb"] = param_mb(vae)
            fn = vae_decode(vae, arm, height, width, opts)
            time_call(fn, dev, max(1, opts.warmup), 0)
            with PeakMemory(dev) as mem:
                times = time_call(fn, dev, 0, opts.repeats)
            del fn
            out.update(decode_ms=statistics.median(times), decode_act_mb=mem.peak_mb, mem_method=mem.method)
        except Exception as e:  # noqa: BLE001
            failed.append(f"decode {'OOM' if is_oom(e) else f'error: {type(e).__name__}: {e}'}")
        free_memory(dev)
    out["status"] = "; ".join(failed) or "ok"
    return out


# ----------------------------------------------------------------------------------------------
#                              Isolated worker processes (CPU)
# ----------------------------------------------------------------------------------------------

class ForkServer:
    """A process that imports torch, the package and diffusers once, then forks one child per job.

    Each child starts with the imports resident (~0.3 s instead of seconds per fresh interpreter) but without
    anything the caller allocated, which a plain fork of the caller (a notebook kernel) would inherit.
    multiprocessing's forkserver would also re-import the caller's __main__ (ipykernel) in every child.
    Jobs and results travel pickled over pipes; the children's stdout goes to stderr.
    """

    def __init__(self, with_vae: bool = True):
        import subprocess
        import sys
        self.with_vae = with_vae
        preload = ["l2p.efficiency", "l2p.pipeline"]
        if with_vae:
            preload.append("diffusers.models.autoencoders.autoencoder_kl")
        self.proc = subprocess.Popen([sys.executable, "-m", "l2p.efficiency", "--serve", *preload],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)

    def run(self, job: tuple, timeout: float) -> dict:
        """Send one job (arm, height, width, opts, parts); its result dict, or a status saying why none came."""
        import pickle
        import select
        try:
            pickle.dump(job, self.proc.stdin)
            self.proc.stdin.flush()
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            if not ready:
                self.close(kill=True)
                return {"status": f"timeout after {timeout:.0f} s"}
            return pickle.load(self.proc.stdout)
        except (EOFError, BrokenPipeError):
            self.close(kill=True)
            return {"status": "worker server died"}
        except BaseException:  # e.g. an interrupted notebook cell: a late result would answer the next job
            self.close(kill=True)
            raise

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self, kill: bool = False) -> None:
        import os
        import signal
        if kill and self.alive:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its running child
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait()


_SERVER: Optional[ForkServer] = None


def fork_server(with_vae: bool = True) -> ForkServer:
    """The shared server (started on first use, stopped at exit); with_vae: diffusers preloaded too.

    Starting it early, before the caller's own heavy imports, lets the two sets of imports overlap.
    """
    import atexit
    global _SERVER
    if _SERVER is not None and _SERVER.alive and (_SERVER.with_vae or not with_vae):
        return _SERVER
    if _SERVER is not None:
        _SERVER.close()
    _SERVER = ForkServer(with_vae)
    atexit.register(_SERVER.close)
    return _SERVER


def _serve(preload: Sequence[str]) -> None:
    """The server loop (`python -m l2p.efficiency --serve MODULE ...`): one forked child per job."""
    import importlib
    import os
    import pickle
    import sys
    for name in preload:
        importlib.import_module(name)
    jobs = sys.stdin.buffer
    results = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # children's prints must not corrupt the result stream
    while True:
        try:
            job = pickle.load(jobs)
        except EOFError:
            return
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                arm, height, width, opts, parts = job
                if opts.threads:
                    torch.set_num_threads(opts.threads)
                res = measure_parts(arm, height, width, opts, parts)
            except BaseException as e:  # noqa: BLE001
                res = {"status": f"error: {type(e).__name__}: {e}"}
            with os.fdopen(w, "wb") as f:
                pickle.dump(res, f)
            os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        res = pickle.loads(data) if data else {"status": f"crashed (exit {os.waitstatus_to_exitcode(status)})"}
        pickle.dump(res, results)
        results.flush()


def run_isolated(arm: Arm, height: int, width: int, opts: BenchOptions, parts, timeout: float = 600.0) -> dict:
    """measure_parts in a fresh child of the fork server; a crash (e.g. killed for memory) becomes the status."""
    out = fork_server(with_vae=arm.vae is not None).run((arm, height, width, opts, tuple(parts)), timeout)
    if "mem_method" in out:
        out["mem_method"] += ", own process"
    return out


def _merge(a: dict, b: dict) -> dict:
    """Merge the step and decode results of separate processes (statuses joined)."""
    status = "; ".join(s for s in (a.get("status"), b.get("status")) if s and s != "ok") or "ok"
    return {**a, **b, "status": status}


# ----------------------------------------------------------------------------------------------
#                                        The sweep
# ----------------------------------------------------------------------------------------------

def _size(res) -> tuple[int, int]:
    """An int is a square side; a pair is (height, width)."""
    return (int(res), int(res)) if isinstance(res, (int, float)) else (int(res[0]), int(res[1]))


def _row(arm: Arm, h: int, w: int, opts: BenchOptions, res: dict) -> dict:
    """One table row: the measured parts plus the derived per-step and per-sample figures."""
    grid = arm.grid(h, w)
    row = dict(arm=arm.name, model=arm.model_name, patch=arm.patch, resolution=f"{h}²" if h == w else f"{h}×{w}",
               height=h, width=w, side=math.sqrt(h * w), tokens=grid[0] * grid[1] if grid else None,
               batch=opts.batch, cfg=opts.guidance, passes=2 if opts.guidance else 1, num_steps=opts.num_steps,
               device=str(opts.device), dtype=str(opts.torch_dtype).replace("torch.", ""))
    row.update({k: res.get(k) for k in ("params", "step_ms", "step_ms_min", "decode_ms", "step_act_mb",
                                        "decode_act_mb", "mem_method", "status")})
    row["weights_mb"] = (res.get("dit_weights_mb") or 0.0) + (res.get("vae_weights_mb") or 0.0) or None
    step = res.get("step_ms")
    dec = res.get("decode_ms") if arm.vae is not None else 0.0  # pixel models decode nothing
    if step is not None and dec is not None:
        row["per_step_ms"] = step + dec / opts.num_steps
        row["sample_ms"] = step * opts.num_steps + dec
        row["decode_share"] = dec / row["sample_ms"] if arm.vae is not None else None
    acts = [a for a in (res.get("step_act_mb"), res.get("decode_act_mb")) if a is not None]
    if row["weights_mb"] is not None and acts and (arm.vae is None or len(acts) == 2):
        row["peak_mb"] = row["weights_mb"] + max(acts)
    return row


def measure(arms: Sequence[Arm], resolutions: Sequence, device: str = "cpu", dtype=None, guidance: bool = False,
            cfg_batched: bool = True, num_steps: int = 8, batch: int = 1, cap_len: int = 128, neg_cap_len: int = 16,
            warmup: int = 1, repeats: int = 3, threads: Optional[int] = None, isolate: Optional[bool] = None,
            max_tokens: Optional[int] = None, timeout: float = 600.0, deadline: Optional[float] = None,
            seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """Step time, VAE decode time and peak memory for every arm at every resolution; one row each.

    resolutions: ints (square sides) or (height, width) pairs. Sizes an arm cannot take (not divisible by
    its stride × patch), grids above `max_tokens` and configurations due after `deadline` (a
    time.monotonic() value) are listed as skipped. isolate (CPU only; default
    True there): each configuration in its own forked process. On CUDA each arm's models are built once
    and freed before the next arm; an OOM marks its row and the sweep goes on.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be ≥ 1, got {repeats}")
    dtype_name = str(resolve_dtype(dtype, device)).replace("torch.", "")
    opts = BenchOptions(device=str(device), dtype=dtype_name, guidance=guidance, cfg_batched=cfg_batched,
                        num_steps=num_steps, batch=batch, cap_len=cap_len, neg_cap_len=neg_cap_len, warmup=warmup,
                        repeats=repeats, threads=threads, seed=seed)
    on_cuda = torch.device(device).type == "cuda"
    isolate = (not on_cuda) if isolate is None else (isolate and not on_cuda)
    if isolate and not threads:  # workers start with torch's default: give them the caller's setting
        opts = replace(opts, threads=torch.get_num_threads())
    sizes = sorted({_size(r) for r in resolutions}, key=lambda hw: (hw[0] * hw[1], hw))
    old_threads = torch.get_num_threads()
    if threads and not isolate:
        torch.set_num_threads(threads)
    rows = []
    try:
        for arm in arms:
            done, todo = {}, []  # this arm's rows by size, listed in size order at the end
            for h, w in sizes:
                grid = arm.grid(h, w)
                if grid is None:
                    why = f"{h}×{w} does not divide by {arm.stride * arm.patch}"
                elif max_tokens is not None and grid[0] * grid[1] > max_tokens:
                    why = f"{grid[0] * grid[1]} tokens > {max_tokens}"
                else:
                    todo.append((h, w))
                    continue
                done[h, w] = _row(arm, h, w, opts, {"status": f"skipped: {why}"})
            if todo:
                done.update(_measure_arm(arm, todo, opts, isolate, timeout, deadline, progress))
            rows += [done[hw] for hw in sizes]
    finally:
        torch.set_num_threads(old_threads)
    return pd.DataFrame(rows).reindex(columns=COLUMNS)


def _measure_arm(arm: Arm, sizes, opts: BenchOptions, isolate: bool, timeout: float, deadline, progress) -> dict:
    """Rows for one arm at the given sizes: in worker processes, or in-process with the models built once."""
    dev, out = opts.device, {}
    dit = vae = None
    if not isolate:
        try:
            dit = build_dit(arm.config, dev, opts.torch_dtype, opts.seed)
            vae = build_vae(arm.vae, dev, opts.torch_dtype, opts.seed) if arm.vae is not None else None
        except Exception as e:  # noqa: BLE001: a model that does not fit marks every size of its arm
            msg = f"build {'OOM' if is_oom(e) else f'error: {type(e).__name__}: {e}'}"
            dit = vae = None
            free_memory(dev)
            return {(h, w): _row(arm, h, w, opts, {"status": msg}) for h, w in sizes}
    # Step and decode share a worker only if its high-water mark can be reset between them.
    together = reset_cpu_peak() or arm.vae is None
    for h, w in sizes:
        if deadline is not None and time.monotonic() > deadline:
            out[h, w] = _row(arm, h, w, opts, {"status": "skipped: time budget"})
            continue
        if isolate and together:
            res = run_isolated(arm, h, w, opts, ("step", "decode"), timeout)
        elif isolate:
            res = _merge(run_isolated(arm, h, w, opts, ("step",), timeout),
                         run_isolated(arm, h, w, opts, ("decode",), timeout))
        else:
            res = measure_parts(arm, h, w, opts, dit=dit, vae=vae)
            if "mem_method" in res and torch.device(dev).type != "cuda":
                res["mem_method"] += ", shared process"
        r = out[h, w] = _row(arm, h, w, opts, res)
        if progress:
            print(f"{arm.name:>14} {r['resolution']:>10}: step {_f(r.get('step_ms'))} ms, decode "
                  f"{_f(r.get('decode_ms'))} ms, peak {_f(r.get('peak_mb'))} MiB  [{r['status']}]", flush=True)
    del dit, vae
    free_memory(dev)
    return out


def _f(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.1f}"


# ----------------------------------------------------------------------------------------------
#                                   Tables and the figure
# ----------------------------------------------------------------------------------------------

def _latent_name(df: pd.DataFrame) -> Optional[str]:
    """The arm that has a VAE decode (the latent model)."""
    names = df.loc[df.decode_ms.notna(), "arm"].unique()
    return names[0] if len(names) else None


RATIO_COLUMNS = ["resolution", "arm", "step_vs_latent_step", "step_vs_latent_per_step", "peak_vs_latent_peak",
                 "latent_decode_share"]


def ratios(df: pd.DataFrame) -> pd.DataFrame:
    """Per resolution and pixel arm: pixel / latent step time, per-step time with the decode amortised, peak memory."""
    lat = _latent_name(df)
    if lat is None:
        return pd.DataFrame(columns=RATIO_COLUMNS)
    ref = df[df.arm == lat].set_index("resolution")
    rows = []
    for _, r in df[(df.arm != lat) & df.step_ms.notna()].iterrows():
        if r.resolution not in ref.index:
            continue
        L = ref.loc[r.resolution]
        rows.append(dict(resolution=r.resolution, side=r.side, arm=r.arm,
                         step_vs_latent_step=r.step_ms / L.step_ms,
                         step_vs_latent_per_step=r.step_ms / L.per_step_ms,
                         peak_vs_latent_peak=r.peak_mb / L.peak_mb, latent_decode_share=L.decode_share))
    if not rows:
        return pd.DataFrame(columns=RATIO_COLUMNS)
    return pd.DataFrame(rows).sort_values(["side", "arm"], kind="stable")[RATIO_COLUMNS].reset_index(drop=True)


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """Compact view for notebooks: one row per configuration, the columns a reader compares."""
    cols = ["arm", "resolution", "tokens", "step_ms", "decode_ms", "per_step_ms", "decode_share", "peak_mb", "status"]
    return df[cols].round({"step_ms": 1, "decode_ms": 1, "per_step_ms": 1, "decode_share": 3, "peak_mb": 1})


def plot_efficiency(df: pd.DataFrame, title: Optional[str] = None):
    """The Fig. 4-style figure: time per step and peak memory against resolution, one curve per arm.

    The latent model has two time curves: the DiT step alone (dotted) and with the VAE decode amortised over
    the sampling steps (solid), which is what a sample costs per step.
    """
    from matplotlib.figure import Figure  # here, so that GPU-only scripts need no matplotlib
    from matplotlib.ticker import LogFormatter, NullLocator

    ok = df[df.step_ms.notna()]
    lat = _latent_name(df)
    gib = ok.peak_mb.max() > 8 * 1024 if ok.peak_mb.notna().any() else False
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_t, ax_m = fig.subplots(1, 2)
    for i, (arm, g) in enumerate(ok.groupby("arm", sort=False)):
        g, color = g.sort_values("side"), f"C{i}"
        if arm == lat:
            n = int(g.num_steps.iloc[0])
            ax_t.plot(g.side, g.per_step_ms, "o-", color=color, label=f"{arm} (decode / {n} steps)")
            ax_t.plot(g.side, g.step_ms, "o:", color=color, alpha=0.7, label=f"{arm}: DiT step only")
        else:
            ax_t.plot(g.side, g.step_ms, "o-", color=color, label=arm)
        mem = g.dropna(subset=["peak_mb"])
        ax_m.plot(mem.side, mem.peak_mb / (1024 if gib else 1), "o-", color=color, label=arm)
    sides = sorted(ok.side.unique())
    labels = [ok.loc[ok.side == s, "resolution"].iloc[0] for s in sides]
    for ax, ylabel in ((ax_t, "time per step (ms)"), (ax_m, f"peak memory ({'GiB' if gib else 'MiB'})")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sides, labels)
        ax.xaxis.set_minor_locator(NullLocator())  # only the measured sides on x
        ax.yaxis.set_major_formatter(LogFormatter())  # 60 rather than 6×10¹
        ax.yaxis.set_minor_formatter(LogFormatter(minor_thresholds=(2, 0.5)))
        ax.set_xlabel("resolution")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend(fontsize=8)
    ax_t.set_title("time per denoising step" + (" (CFG)" if df.cfg.any() else ""))
    ax_m.set_title("peak memory (weights + largest transient)")
    if title is None and len(df):
        r = df.iloc[0]
        title = f"{r['device']}, {r['dtype']}, batch {r['batch']}"
    if title:
        fig.suptitle(title)
    return fig


if __name__ == "__main__":
    import sys
    if sys.argv[1:2] == ["--serve"]:
        from l2p.efficiency import _serve as serve  # the package's module, not this __main__ copy
        serve(sys.argv[2:])
