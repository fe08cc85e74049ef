"""Latent Z-Image checkpoint → L2P pixel-space initialisation, streamed one tensor at a time.

The release's rule (`L2P_convert_weight.py`): walk the pixel model's keys; copy a tensor when the source has the
same key and shape, otherwise keep a fresh PyTorch-default init. For Z-Image-Turbo → L2P 1K that is 515 copied,
30 new (the 16-1 RGB embedder and the Detailer Head) and 6 dropped (the 2-1 latent embedder and final layer).

Here nothing is held beyond one tensor: copies of unchanged dtype are raw byte copies, new tensors are made one
module at a time with a per-module seeded generator, and every copy is verified bit for bit before the output
files are published.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from l2p.checkpoint import (CheckpointError, CheckpointReader, StreamingWriter, check_not_input,
                            checkpoint_config, dtype_name, model_shapes, parse_size, same_bytes)
from l2p.config import PREDICTIONS, UPSAMPLES, DetailerConfig, DiTConfig

OUT_DTYPES = {"source": None, "bf16": torch.bfloat16, "fp32": torch.float32}
PAPER_FIRST_TRAINABLE, PAPER_LAST_TRAINABLE = 5, 5  # `freeze_except`: layers[5 : n_layers - 5] stay frozen


# ----------------------------------------------------------------------------------------------
#                                         Reports
# ----------------------------------------------------------------------------------------------

def paper_frozen_layers(n_layers: int) -> range:
    """Main blocks the release keeps frozen during L2P training (layers 5..n_layers-6)."""
    return range(PAPER_FIRST_TRAINABLE, n_layers - PAPER_LAST_TRAINABLE)


def tensor_group(key: str, n_layers: int) -> str:
    """Report group of a state-dict key; main layers split by the paper's freeze policy."""
    head = key.split(".", 1)[0]
    if head in ("x_pad_token", "cap_pad_token", "all_x_embedder", "t_embedder", "cap_embedder"):
        return "embedders"
    if head == "layers":
        frozen = int(key.split(".")[1]) in paper_frozen_layers(n_layers)
        return "layers (frozen)" if frozen else "layers (trainable)"
    return {"all_final_layer": "final_layer"}.get(head, head)


def _layer_index(key: str) -> Optional[int]:
    m = re.match(r"layers\.(\d+)\.", key)
    return int(m.group(1)) if m else None


@dataclass
class TensorReport:
    """One row per tensor (key, status, shape, dtype, numel, group, ...), with tables for people and tests."""

    rows: list[dict] = field(default_factory=list)

    def add(self, key: str, status: str, shape: Sequence[int], dtype: torch.dtype, n_layers: int, **extra) -> None:
        group = tensor_group(key, n_layers)
        self.rows.append({"key": key, "status": status, "shape": list(shape), "dtype": dtype_name(dtype),
                          "numel": math.prod(shape), "group": group, "layer": _layer_index(key),
                          "trainable": group != "layers (frozen)", **extra})

    def to_dataframe(self):
        import pandas as pd
        return pd.DataFrame(self.rows)

    def counts(self) -> dict[str, tuple[int, int]]:
        """status -> (tensors, parameters)."""
        out: dict[str, tuple[int, int]] = {}
        for r in self.rows:
            n, p = out.get(r["status"], (0, 0))
            out[r["status"]] = (n + 1, p + r["numel"])
        return out

    def summary(self, by: str = "group"):
        """Tensors and parameters per `by` value and status, with a total row."""
        df = self.to_dataframe()
        order = list(dict.fromkeys(df[by]))
        t = (df.groupby([by, "status"], sort=False).agg(tensors=("key", "size"), params=("numel", "sum"))
             .unstack("status", fill_value=0).reindex(order))
        t.loc["total"] = t.sum()
        return t.astype("int64")

    def meta(self) -> dict:
        """Run-level fields (everything but the rows)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "rows"}

    def save_json(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**self.meta(), "rows": self.rows}, indent=1, default=str))
        return path

    def __str__(self) -> str:
        import pandas as pd
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            table = self.summary().to_string()
        lines = [f"{type(self).__name__}:"]
        for k, v in self.meta().items():
            if isinstance(v, list) and len(v) > 2:  # long shard lists: first file and a count
                v = f"{v[0]} … ({len(v)} files)"
            if v not in (None, [], {}) and not k.endswith("_config"):
                lines.append(f"  {k}: {v}")
        return "\n".join(lines) + "\n" + table


@dataclass
class ConvertReport(TensorReport):
    """What `convert` did to every tensor, plus the run's settings and checks."""

    source_files: list[str] = field(default_factory=list)
    output_files: list[str] = field(default_factory=list)
    source_config: dict = field(default_factory=dict)
    target_config: dict = field(default_factory=dict)
    init: str = "release"
    out_dtype: str = "source"
    seed: int = 0
    verified: int = 0  # copied tensors re-read from the output and found bit-identical
    vae_fit: Optional[dict] = None
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------
#                                      Fresh initialisation
# ----------------------------------------------------------------------------------------------

def module_seed(seed: int, module: str) -> int:
    """Seed for one module's generator: a new tensor's values depend only on (seed, module name)."""
    return int.from_bytes(hashlib.sha256(f"l2p-init/{seed}/{module}".encode()).digest()[:8], "little") >> 1


def new_module_init(module: str, shapes: dict[str, Sequence[int]], seed: int) -> dict[str, torch.Tensor]:
    """A new module's tensors: `release_init`, except the Detailer Head's optional layers, which start where
    the release's head is: FiLM layers at 0, learned upsamplers (up{k}.0) as nearest ×2."""
    from l2p.model import FILM_PREFIX, nearest_upsample_weight
    if module.startswith("local_decoder." + FILM_PREFIX):
        return {leaf: torch.zeros(tuple(shape)) for leaf, shape in shapes.items()}
    if re.fullmatch(r"local_decoder\.up\d+\.0", module):
        return {"weight": nearest_upsample_weight(shapes["weight"][0]), "bias": torch.zeros(tuple(shapes["bias"]))}
    return release_init(module, shapes, seed)


def release_init(module: str, shapes: dict[str, Sequence[int]], seed: int) -> dict[str, torch.Tensor]:
    """PyTorch's default nn.Linear / nn.Conv2d init for one module (float32), from a seeded generator.

    weight: kaiming_uniform(a=√5), i.e. U(±1/√fan_in); bias: U(±1/√fan_in). Drawn weight first, as
    `reset_parameters` does. `shapes` maps the module's leaf names ("weight", "bias") to shapes.
    """
    unknown = set(shapes) - {"weight", "bias"}
    if unknown or "weight" not in shapes or len(shapes["weight"]) < 2:
        raise CheckpointError(f"no default init for new tensors {module}.{sorted(shapes)} "
                              f"(only Linear/Conv weights with optional bias)")
    g = torch.Generator().manual_seed(module_seed(seed, module))
    weight = torch.empty(tuple(shapes["weight"]))
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=g)
    out = {"weight": weight}
    if "bias" in shapes:
        bound = 1 / math.sqrt(math.prod(shapes["weight"][1:]))
        out["bias"] = torch.empty(tuple(shapes["bias"])).uniform_(-bound, bound, generator=g)
    return out


@dataclass
class VaeFit:
    """Least-squares map from RGB patches to VAE latent patches: z ≈ A·x + a0."""

    A: torch.Tensor  # (latent patch dim, pixel patch dim), float64
    a0: torch.Tensor  # (latent patch dim,)
    r2: float  # pooled over all latent coordinates, in-sample (the fit needs ≥ 2 samples per unknown)
    noise_gain: float  # mean over latent coordinates of ||A_row||²: variance unit pixel noise puts on each
    samples: int
    ridge: float = 0.0  # the ridge used, relative to the mean of diag(XᵀX)

    def summary(self) -> dict:
        return {"r2": self.r2, "noise_gain": self.noise_gain, "samples": self.samples, "ridge": self.ridge}


def _as_image_batches(images) -> Iterable[torch.Tensor]:
    """(N, 3, H, W) float batches in [-1, 1] from a tensor, tensors, PIL images or image paths."""
    import numpy as np
    from PIL import Image

    if isinstance(images, torch.Tensor):
        images = [images]
    for item in images:
        if isinstance(item, (str, Path)):
            item = Image.open(item)
        if isinstance(item, Image.Image):
            item = torch.from_numpy(np.array(item.convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1
        yield item if item.ndim == 4 else item[None]


@torch.no_grad()
def encode_samples(vae, images) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(image, latent) pairs, the latent normalised as the DiT sees it: (mean − shift_factor) · scaling_factor."""
    from l2p.pipeline import vae_latents
    pairs = []
    for batch in _as_image_batches(images):
        pairs += list(zip(batch.double(), vae_latents(vae, batch).double()))
    return pairs


def fit_vae_patch_map(pairs: list[tuple[torch.Tensor, torch.Tensor]], pixel_patch: int, latent_patch: int,
                      ridge: float = 1e-6, noise_gain: Optional[float] = None) -> VaeFit:
    """Fit z_patch ≈ A·x_patch + a0 by ridge least squares over every patch of the (image, latent) pairs.

    x_patch: a (pixel_patch² · 3) RGB patch in [-1, 1]; z_patch: the (latent_patch² · C) latent patch over the
    same pixels. Both flattened (ph, pw, c) with the channel fastest, as `l2p.model.patchify` does. The normal
    equations accumulate in float64, so any number of images fits in constant memory.

    noise_gain: a cap on the variance unit pixel noise puts on each latent coordinate. A fit above it takes the
    larger ridge (bisection; the gain falls as the ridge grows) that brings it down to the cap. 1.0 makes
    x_σ's noise reach the trunk no stronger than z_σ's did, so the embedder agrees with the schedule at every σ,
    at some cost in clean R².
    """
    from l2p.model import patchify

    xtx = xtz = zsum = None
    ztz, n = 0.0, 0
    for x, z in pairs:
        if x.shape[-1] % pixel_patch or x.shape[-2] % pixel_patch:
            raise ValueError(f"sample image size {tuple(x.shape[-2:])} is not a multiple of {pixel_patch}")
        if x.shape[-1] * latent_patch != z.shape[-1] * pixel_patch:
            raise ValueError(f"the VAE maps a {pixel_patch}² pixel patch to "
                             f"{pixel_patch * z.shape[-1] // x.shape[-1]}² latents, not {latent_patch}²")
        xp, zp = patchify(x, pixel_patch), patchify(z, latent_patch)
        xp = torch.cat([xp, torch.ones(len(xp), 1, dtype=xp.dtype)], 1)  # intercept column
        xtx = xp.T @ xp if xtx is None else xtx + xp.T @ xp
        xtz = xp.T @ zp if xtz is None else xtz + xp.T @ zp
        zsum = zp.sum(0) if zsum is None else zsum + zp.sum(0)
        ztz += (zp * zp).sum().item()
        n += len(zp)
    d = pixel_patch ** 2 * 3
    if n < 2 * (d + 1):  # fewer patches than ~2× unknowns: the in-sample R² would mean nothing
        raise ValueError(f"vae_fit: {n} sample patches for {d + 1} unknowns per latent channel; "
                         f"give at least {2 * (d + 1)} patches (e.g. 6 images of 256²)")
    scale = xtx.diagonal()[:d].mean()

    def solve(r: float) -> torch.Tensor:
        reg = torch.zeros(d + 1, dtype=torch.float64)
        reg[:d] = r * scale  # no penalty on the intercept
        return torch.linalg.solve(xtx + torch.diag(reg), xtz)  # (d + 1, latent dim)

    gain = lambda c: float((c[:d] ** 2).sum(0).mean())  # noqa: E731
    if noise_gain is not None and noise_gain <= 0:
        raise ValueError(f"vae_fit: noise_gain must be > 0, got {noise_gain}")
    coef = solve(ridge)
    if noise_gain is not None and gain(coef) > noise_gain:  # a cap: a quieter fit is kept as it is
        lo, hi = math.log10(ridge), 12.0  # log10 ridge; the gain falls towards 0 as the ridge grows
        while hi - lo > 1e-4:
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if gain(solve(10 ** mid)) > noise_gain else (lo, mid)
        ridge = 10 ** hi
        coef = solve(ridge)
    sse = ztz - 2 * (coef * xtz).sum() + (coef * (xtx @ coef)).sum()
    sst = ztz - (zsum * zsum).sum() / n
    A, a0 = coef[:d].T.contiguous(), coef[d].clone()
    return VaeFit(A=A, a0=a0, r2=float(1 - sse / sst), noise_gain=gain(coef), samples=n, ridge=ridge)


def vae_fit_embedder(w_lat: torch.Tensor, b_lat: torch.Tensor, fit: VaeFit) -> dict[str, torch.Tensor]:
    """The RGB embedder that reproduces the latent one on fitted latents: W_lat(A x + a0) + b_lat."""
    w, b = w_lat.double(), b_lat.double()
    return {"weight": (w @ fit.A).float(), "bias": (b + w @ fit.a0).float()}


# ----------------------------------------------------------------------------------------------
#                                          Planning
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: copied from the source or made new."""

    key: str
    status: str  # "copied" | "new"
    shape: tuple[int, ...]
    dtype: torch.dtype  # in the output
    note: str = ""


def plan_conversion(source: dict[str, tuple[torch.dtype, Sequence[int]]], target: dict[str, Sequence[int]],
                    out_dtype: Optional[torch.dtype]) -> tuple[list[PlannedTensor], list[tuple]]:
    """Target tensors in model order (copied when key and shape match, else new) and the dropped source keys.

    out_dtype None keeps each copied tensor's dtype and makes new ones float32 (as the release does).
    """
    planned = []
    for key, shape in target.items():
        shape = tuple(shape)
        if key in source and tuple(source[key][1]) == shape:
            planned.append(PlannedTensor(key, "copied", shape, out_dtype or source[key][0]))
        else:
            note = f"source shape {tuple(source[key][1])}" if key in source else ""
            planned.append(PlannedTensor(key, "new", shape, out_dtype or torch.float32, note=note))
    dropped = [(k, tuple(s), dt) for k, (dt, s) in source.items() if k not in target]
    return planned, dropped


def _modules(planned: list[PlannedTensor]) -> dict[str, dict[str, tuple]]:
    """New tensors grouped by module: module path -> {leaf name: shape}."""
    mods: dict[str, dict[str, tuple]] = {}
    for t in planned:
        if t.status == "new":
            mod, _, leaf = t.key.rpartition(".")
            mods.setdefault(mod, {})[leaf] = t.shape
    return mods


# ----------------------------------------------------------------------------------------------
#                                          Convert
# ----------------------------------------------------------------------------------------------

def _verify(planned: list[PlannedTensor], src: CheckpointReader, out: CheckpointReader) -> int:
    """Check every copied tensor in the output against the source (cast alike), bit for bit; returns how many."""
    copied = [t.key for t in planned if t.status == "copied"]
    bad = [k for k in copied if not same_bytes(src, k, out)]
    if bad:
        raise CheckpointError(f"{out.files[0]}: copied tensors differ from the source after writing: {bad[:8]}")
    return len(copied)


def convert(latent_paths, output_path, *, patch_sizes: Sequence[int] = (16,), detailer: Optional[DetailerConfig] = None,
            init: str = "release", out_dtype: str = "source", seed: int = 0, max_shard_bytes=None,
            overwrite: bool = False, report_path=None, vae=None, sample_images=None,
            vae_fit_noise_gain: Optional[float] = None, progress: bool = True) -> ConvertReport:
    """Turn a latent Z-Image checkpoint into an L2P pixel-space initialisation, streaming to `output_path`.

    init="release": every new tensor gets PyTorch's default Linear/Conv2d init (as the release, but seeded per
    module, so the output is reproducible and independent of key order).

    init="vae_fit": as "release", except the RGB patch embedder whose patch is the VAE's footprint of the latent
    patch (16 = 8 × 2). It starts as the latent embedder composed with a linear stand-in for the VAE encoder:
    fit z ≈ A·x + a0 from RGB patches x to the VAE latent patches z of `sample_images` (ridge least squares),
    then W_pix = W_lat·A and b_pix = b_lat + W_lat·a0, so the first DiT block initially sees roughly the tokens
    of the latent model on the encoded image. The report gives the fit's R² and its noise gain: the variance
    white pixel noise of unit variance puts on each latent coordinate. The plain fit leaves it where it falls;
    on the toy VAE it is ~1,700 (R² 0.84): the fit cancels large weights on smooth images, so x_σ's noise
    reaches the trunk ~40× stronger than z_σ's at the same σ, and such a model barely learns (README).
    `vae_fit_noise_gain=1.0` caps the gain at 1 by a larger ridge, so the embedder agrees with the schedule at
    every σ, at some cost in clean-image R². (A Procrustes fit with A·Aᵀ = I would do the same for white
    noise by another route; not implemented.)

    out_dtype: "source" keeps every copied tensor's dtype (new ones float32), "bf16"/"fp32" cast everything.
    """
    t0 = time.perf_counter()
    if init not in ("release", "vae_fit"):
        raise ValueError(f"init must be 'release' or 'vae_fit', not {init!r}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {list(OUT_DTYPES)}, not {out_dtype!r}")
    if init == "vae_fit" and (vae is None or sample_images is None):
        raise ValueError("init='vae_fit' needs a VAE encoder (vae=) and sample images (sample_images=)")
    if vae_fit_noise_gain is not None and init != "vae_fit":
        raise ValueError(f"vae_fit_noise_gain applies to init='vae_fit' only, not {init!r}")

    with CheckpointReader(latent_paths) as src:
        names = ", ".join(str(f) for f in src.files)
        check_not_input(output_path, src.files)
        source_cfg = checkpoint_config(src)
        if source_cfg.is_pixel:
            raise CheckpointError(f"{names}: already a pixel (L2P) checkpoint (it has local_decoder.*)")
        target_cfg = source_cfg.to_pixel(tuple(patch_sizes), detailer)
        planned, dropped = plan_conversion({k: (src.dtype(k), src.shape(k)) for k in src.keys()},
                                           model_shapes(target_cfg), OUT_DTYPES[out_dtype])
        modules = _modules(planned)
        report = ConvertReport(source_files=[str(f) for f in src.files], source_config=source_cfg.to_dict(),
                               target_config=target_cfg.to_dict(), init=init, out_dtype=out_dtype, seed=seed)

        fitted = {}
        if init == "vae_fit":
            fitted = _vae_fit_modules(src, source_cfg, target_cfg, vae, sample_images, report, vae_fit_noise_gain)

        metadata = {"format": "pt", "l2p_config": json.dumps(target_cfg.to_dict()),
                    "l2p_convert": json.dumps({"source": [f.name for f in src.files], "init": init, "seed": seed,
                                               "out_dtype": out_dtype,
                                               **({"vae_fit_noise_gain": vae_fit_noise_gain}
                                                  if vae_fit_noise_gain is not None else {})})}
        plan = [(t.key, t.dtype, t.shape) for t in planned]
        with StreamingWriter(output_path, plan, parse_size(max_shard_bytes), metadata, overwrite) as w:
            bar = tqdm(total=sum(t.dtype.itemsize * math.prod(t.shape) for t in planned), unit="B", unit_scale=True,
                       desc="convert", disable=not progress)
            module, made = None, {}
            for t in planned:
                if t.status == "copied":  # raw byte copy, or a chunked cast: never a whole tensor in memory
                    w.copy_from(src, t.key, dtype=t.dtype)
                else:
                    mod, _, leaf = t.key.rpartition(".")
                    if mod != module:  # one module at a time (its tensors are adjacent in the plan)
                        module, made = mod, fitted.get(mod) or new_module_init(mod, modules[mod], seed)
                    w.write(t.key, made.pop(leaf).to(t.dtype))
                bar.update(t.dtype.itemsize * math.prod(t.shape))
            bar.close()
            with CheckpointReader(w.finish()) as out:
                report.verified = _verify(planned, src, out)
        report.output_files = [str(p) for p in w.final_paths]

    for t in planned:
        report.add(t.key, t.status, t.shape, t.dtype, target_cfg.n_layers, note=t.note)
    for key, shape, dt in dropped:
        report.add(key, "dropped", shape, dt, target_cfg.n_layers, note="")
    report.seconds = round(time.perf_counter() - t0, 3)
    if report_path is not None:
        report.save_json(report_path)
    return report


def _vae_fit_modules(src: CheckpointReader, source_cfg: DiTConfig, target_cfg: DiTConfig, vae, images,
                     report: ConvertReport, noise_gain: Optional[float] = None) -> dict[str, dict[str, torch.Tensor]]:
    """The fitted RGB embedder(s): module path -> {"weight", "bias"} (float32)."""
    if isinstance(vae, (str, Path)):
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(vae)
    lp, lf = source_cfg.all_patch_size[0], source_cfg.all_f_patch_size[0]
    w_lat = src.get(f"all_x_embedder.{lp}-{lf}.weight", torch.float64)
    b_lat = src.get(f"all_x_embedder.{lp}-{lf}.bias", torch.float64)
    pairs = encode_samples(vae, images)
    footprint = pairs[0][0].shape[-1] // pairs[0][1].shape[-1] * lp if pairs else None
    out, fits = {}, {}
    for p, f in zip(target_cfg.all_patch_size, target_cfg.all_f_patch_size):
        if p != footprint or f != lf:  # e.g. the 64-1 4K embedder: no latent embedder sees those pixels
            fits[f"{p}-{f}"] = f"release init (the latent patch covers {footprint}² pixels)"
            continue
        fit = fit_vae_patch_map(pairs, p, lp, noise_gain=noise_gain)
        out[f"all_x_embedder.{p}-{f}"] = vae_fit_embedder(w_lat, b_lat, fit)
        fits[f"{p}-{f}"] = fit.summary()
    if not out:
        raise ValueError(f"vae_fit: no target patch size matches the VAE footprint of latent patch {lp}: {fits}")
    report.vae_fit = fits
    return out


# ----------------------------------------------------------------------------------------------
#                                            CLI
# ----------------------------------------------------------------------------------------------

def _add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--latent_ckpt_files", "--latent-ckpt-files", nargs="+", required=True, dest="latent_ckpt_files",
                   metavar="PATH",
                   help="Z-Image transformer checkpoint: file(s), index json or folder")
    p.add_argument("--output_path", "--output-path", required=True, dest="output_path", metavar="PATH",
                   help="output .safetensors (sharded as name-0000i-of-0000N when over --max-shard-size)")
    p.add_argument("--init", choices=["release", "vae_fit"], default="release")
    p.add_argument("--dtype", choices=list(OUT_DTYPES), default="source", help="output dtype (default: keep source)")
    p.add_argument("--patch-sizes", type=int, nargs="+", default=[16], metavar="P",
                   help="RGB patch embedders (e.g. 16 64)")
    p.add_argument("--detailer-channels", type=int, nargs="+", default=None, metavar="C",
                   help="Detailer Head widths (default: 64 128 256 512 for patch 16)")
    p.add_argument("--prediction", choices=PREDICTIONS, default="velocity",
                   help="what the Detailer Head predicts: velocity (the release), x (the clean image, JiT) or edm "
                        "(Karras et al.'s skip/out preconditioning); stored in the file's l2p_config")
    p.add_argument("--head-time-conditioning", action="store_true",
                   help="give the Detailer Head FiLM layers driven by the DiT's timestep embedding (zero-initialised; "
                        "not in the release, whose head has no time input)")
    p.add_argument("--head-upsample", choices=UPSAMPLES, default="nearest",
                   help="how the Detailer Head's decoder goes up a level: nearest (the release) or learned (a 2x2 "
                        "transposed conv that starts as nearest; not in the release)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-size", default=None, help="e.g. 5GB; default one file, as the release")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--report", default=None, help="write the per-tensor report as JSON here")
    p.add_argument("--vae", default=None, help="diffusers AutoencoderKL folder (for --init vae_fit)")
    p.add_argument("--sample-images", nargs="+", default=None, metavar="IMG", help="images for --init vae_fit")
    p.add_argument("--image-size", type=int, default=256, help="vae_fit: center crop of the sample images")
    p.add_argument("--vae-fit-noise-gain", type=float, default=None, metavar="G",
                   help="vae_fit: cap the variance unit pixel noise puts on each latent coordinate at G by a larger "
                        "ridge (1.0: as the schedule expects); default: the plain fit, whatever its gain")


def run_convert(a: argparse.Namespace) -> int:
    """Run the `convert` subcommand and print its summary."""
    images = None
    if a.sample_images:
        images = list(load_sample_images(a.sample_images, a.image_size))
    detailer = DetailerConfig(channels=tuple(a.detailer_channels)) if a.detailer_channels else None
    if a.prediction != "velocity" or a.head_time_conditioning or a.head_upsample != "nearest":
        detailer = replace(detailer or DetailerConfig.for_patch(a.patch_sizes[0]), prediction=a.prediction,
                           time_conditioning=a.head_time_conditioning, upsample=a.head_upsample)
    try:
        report = convert(a.latent_ckpt_files, a.output_path, patch_sizes=tuple(a.patch_sizes), detailer=detailer,
                         init=a.init, out_dtype=a.dtype, seed=a.seed, max_shard_bytes=parse_size(a.max_shard_size),
                         overwrite=a.overwrite, report_path=a.report, vae=a.vae, sample_images=images,
                         vae_fit_noise_gain=a.vae_fit_noise_gain)
    except (CheckpointError, ValueError) as e:
        print(f"l2p convert: error: {e}", file=sys.stderr)
        return 2
    print(report)
    return 0


def load_sample_images(paths: Sequence[Union[str, Path]], size: int) -> Iterable[torch.Tensor]:
    """(1, 3, size, size) tensors in [-1, 1]: each image (or each image in a folder) resized and center-cropped."""
    from PIL import Image

    files = [f for p in map(Path, paths) for f in (sorted(p.iterdir()) if p.is_dir() else [p])
             if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp")]
    for f in files:
        img = Image.open(f).convert("RGB")
        s = size / min(img.size)
        img = img.resize((max(size, round(img.width * s)), max(size, round(img.height * s))), Image.BICUBIC)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        yield from _as_image_batches([img.crop((left, top, left + size, top + size))])


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """Register `convert` on an argparse subparsers object."""
    p = subparsers.add_parser("convert", help="latent Z-Image checkpoint → L2P pixel init (streaming)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_convert_args(p)
    p.set_defaults(func=run_convert)
    return p


def main_convert(argv=None) -> int:
    """`python -m l2p.convert ...`"""
    p = argparse.ArgumentParser(prog="l2p convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_convert_args(p)
    return run_convert(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main_convert())
