"""Seeing the denoising: per-step states of latent and pixel sampling, spectra, token features, the Detailer Head.

`capture(pipe, prompts, seed, ...)` runs a pipeline's own guided Euler loop and keeps, at every step, the
noisy state x_t, the guided x0 prediction and velocity, the conditional pass's x0 prediction and the DiT's
last-layer image-token features. Latent states are also decoded through the VAE so both sides can be shown
in pixels. The helpers below turn trajectories into figures (matplotlib `Figure`s, no pyplot state).

Detailer Head vs a linear readout: the pixel model's head sees the whole noisy image plus the tokens. To
show what it adds, we fit a ridge-regularised least-squares map from each token's features (with a σ-scaled
copy, standing in for the adaLN time modulation of a plain DiT final layer) to the 16×16×3 patch of the
*head's own x0 prediction*, and unpatchify it. We fit to the head's output rather than to a target image
because generated samples have no ground truth, and so the residual is exactly the part of the head's
output that the tokens cannot carry linearly — what the full-resolution path contributes. We fit in x0 space:
a readout of the raw output (≈ x0 − ε) would get x_t's per-pixel noise re-injected by x0 = x_t + σ·out,
which is not the tokens' doing. The fit is in-sample by default, which flatters the linear map.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure

from .flow import velocity_from_output, x0_from_velocity
from .metrics import high_frequency_energy_ratio, psnr, radial_power_spectrum, spectral_fidelity
from .pipeline import FlowPipeline, LatentPipeline
from .sampler import euler_sample, guide
from .schedule import dit_time, sampling_sigmas
from .viz import to_hwc


# ----------------------------------------------------------------------------------------------
#                                          Capture
# ----------------------------------------------------------------------------------------------

@dataclass
class Trajectory:
    """Every step of one sampling run; leading dims (S steps, B items). States are in the sampled space."""

    name: str
    prompts: list[str]
    seed: int
    sigmas: torch.Tensor  # (S + 1,) the schedule, terminal 0 included
    x_t: torch.Tensor  # (S, B, C, h, w) state before each step
    x0: torch.Tensor  # (S, B, C, h, w) guided x0 prediction
    velocity: torch.Tensor  # (S, B, C, h, w) guided velocity
    x_t_pixels: torch.Tensor  # (S, B, 3, H, W) x_t in pixels (latent side: VAE decode of the noisy latent)
    x0_pixels: torch.Tensor  # (S, B, 3, H, W) x0 in pixels (latent side: VAE decode)
    final: torch.Tensor  # (B, 3, H, W) the sample in pixels, exactly what `pipe.sample` returns
    seconds: float  # wall time of the sampling loop and decode
    features: Optional[torch.Tensor] = None  # (S, B, D, H/16, W/16) conditional-pass image tokens
    x0_cond: Optional[torch.Tensor] = None  # (S, B, C, h, w) conditional-pass x0 (pixel side: the head's output)
    config: dict = field(default_factory=dict)
    kept: Optional[list[int]] = None  # schedule steps captured (capture's keep_steps); None: all of them

    @property
    def num_steps(self) -> int:
        """Captured steps S (fewer than the schedule's when only some were kept)."""
        return self.x_t.shape[0]

    @property
    def step_index(self) -> list[int]:
        """The schedule step of each captured step, (S,)."""
        return list(self.kept) if self.kept is not None else list(range(self.num_steps))

    @property
    def step_sigmas(self) -> torch.Tensor:
        """σ at which each captured step was evaluated, (S,)."""
        return self.sigmas[:-1][self.step_index]


def _feature_velocity_fn(pipe: FlowPipeline, caps, neg_caps, cfg_scale: float, feats: list, x0_cond: list,
                         keep: set):
    """`FlowPipeline.velocity_fn` with return_features=True, keeping the conditional half's tokens and x0
    at the steps in `keep` (one call per Euler step)."""
    use_cfg = cfg_scale != 1.0
    calls = itertools.count()

    @torch.no_grad()
    def fn(x, sigma):
        step = next(calls)
        t = dit_time(sigma).to(pipe.device)
        b = x.shape[0]
        if use_cfg:
            out, aux = pipe.dit(torch.cat([x, x]).to(pipe.dtype), torch.cat([t, t]), list(caps) + list(neg_caps),
                                return_features=True)
            v_pos, v_neg = velocity_from_output(out.float()).chunk(2)
            v = guide(v_pos, v_neg, cfg_scale)
        else:
            out, aux = pipe.dit(x.to(pipe.dtype), t, caps, return_features=True)
            v = v_pos = velocity_from_output(out.float())
        if step in keep:
            feats.append(torch.stack(aux["features"][:b]).float().cpu())
            x0_cond.append(x0_from_velocity(x, v_pos, sigma).cpu())
        return v
    return fn


def _decode(pipe: FlowPipeline, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """(S, B, ...) sampled-space states → (S, B, 3, H, W) pixels."""
    flat = x.flatten(0, 1)
    out = torch.cat([pipe.to_pixels(c.to(pipe.device)).float().cpu() for c in flat.split(batch)])
    return out.unflatten(0, x.shape[:2])


@torch.no_grad()
def capture(pipe: FlowPipeline, prompts: Union[str, Sequence[str]], seed: int = 0, steps: int = 8,
            cfg_scale: float = 1.0, shift: float = 3.0, height: int = 64, width: int = 64,
            negative_prompt: str = "", features: bool = True, name: Optional[str] = None,
            keep_steps: Optional[Sequence[int]] = None) -> Trajectory:
    """Sample like `pipe.sample` (same noise, schedule, guidance) and keep every step, or only `keep_steps`.

    At 1024² the DiT features alone are ~63 MB per step and image (3840 × 64 × 64 floats), so keep a few
    steps for real models; the final image is the same either way.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    kept = sorted(set(keep_steps)) if keep_steps is not None else list(range(steps))
    if not kept or kept[0] < 0 or kept[-1] >= steps:
        raise ValueError(f"keep_steps {list(keep_steps or [])}: indices in 0…{steps - 1}, at least one")
    caps = pipe.encode(prompts)
    neg = pipe.encode([negative_prompt] * len(prompts)) if cfg_scale != 1.0 else None
    x = pipe.initial_noise(len(prompts), height, width, seed)
    sigmas = sampling_sigmas(steps, shift).to(pipe.device)
    feats, x0c, infos, keep = [], [], [], set(kept)
    fn = (_feature_velocity_fn(pipe, caps, neg, cfg_scale, feats, x0c, keep) if features
          else pipe.velocity_fn(caps, neg, cfg_scale))
    keep_info = lambda info: infos.append(info) if info.step in keep else None  # noqa: E731
    t0 = time.perf_counter()
    z = euler_sample(fn, x, sigmas, keep_info)
    final = pipe.to_pixels(z).float().cpu()
    seconds = time.perf_counter() - t0

    stack = lambda key: torch.stack([getattr(i, key).float().cpu() for i in infos])
    x_t, x0, vel = stack("x_t"), stack("x0"), stack("velocity")
    latent = isinstance(pipe, LatentPipeline)
    return Trajectory(
        name=name or ("latent" if latent else "pixel"), prompts=prompts, seed=seed, sigmas=sigmas.cpu(),
        x_t=x_t, x0=x0, velocity=vel,
        x_t_pixels=_decode(pipe, x_t) if latent else x_t, x0_pixels=_decode(pipe, x0) if latent else x0,
        final=final, seconds=seconds,
        features=torch.stack(feats) if features else None, x0_cond=torch.stack(x0c) if features else None,
        config={"steps": steps, "cfg_scale": cfg_scale, "shift": shift, "height": height, "width": width},
        kept=None if keep_steps is None else kept)


def capture_pair(latent_pipe: FlowPipeline, pixel_pipe: FlowPipeline, prompts, seed: int = 0,
                 pixel_cfg_scale: Optional[float] = None, **kw) -> dict[str, Trajectory]:
    """Latent and pixel trajectories for the same prompts, seed and schedule (the pixel model guided at
    `pixel_cfg_scale` when given, else at the same `cfg_scale`)."""
    pixel_kw = kw if pixel_cfg_scale is None else {**kw, "cfg_scale": pixel_cfg_scale}
    return {"latent": capture(latent_pipe, prompts, seed, name="latent", **kw),
            "pixel": capture(pixel_pipe, prompts, seed, name="pixel", **pixel_kw)}


def pick_steps(num_steps: int, k: int = 6) -> list[int]:
    """k step indices spread evenly from the first to the last (fewer when there are fewer steps)."""
    return sorted(set(np.linspace(0, num_steps - 1, min(k, num_steps)).round().astype(int).tolist()))


# ----------------------------------------------------------------------------------------------
#                                      Trajectory figures
# ----------------------------------------------------------------------------------------------

def _blank(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def trajectory_figure(trajs: Mapping[str, Trajectory], item: int = 0, steps: Optional[Sequence[int]] = None,
                      k: int = 6, size: float = 1.3, title: Optional[str] = None) -> Figure:
    """Rows: x_t and predicted x0 of each trajectory (pixels); columns: chosen steps, then the final sample."""
    first = next(iter(trajs.values()))
    steps = list(steps) if steps is not None else pick_steps(first.num_steps, k)
    rows = [(name, kind) for name in trajs for kind in ("x_t", "x̂0")]
    fig = Figure(figsize=(size * (len(steps) + 1), size * len(rows) + 0.5), layout="constrained")
    axes = fig.subplots(len(rows), len(steps) + 1, squeeze=False)
    for r, (name, kind) in enumerate(rows):
        tr = trajs[name]
        src = tr.x_t_pixels if kind == "x_t" else tr.x0_pixels
        for c, s in enumerate(steps):
            ax = axes[r, c]
            ax.imshow(to_hwc(src[s, item]), interpolation="nearest")
            _blank(ax)
            if r == 0:
                ax.set_title(f"step {tr.step_index[s]}  σ={float(tr.step_sigmas[s]):.2f}", fontsize=7)
            if c == 0:
                ax.set_ylabel(f"{name} {kind}", fontsize=8)
        ax = axes[r, -1]
        _blank(ax)
        if kind == "x̂0":
            ax.imshow(to_hwc(tr.final[item]), interpolation="nearest")
            ax.set_xlabel(f"{tr.seconds:.2f} s", fontsize=7)
        else:
            ax.set_axis_off()
        if r == 0:
            ax.set_title("final", fontsize=7)
    fig.suptitle(title or _short(first.prompts[item]), fontsize=9)
    return fig


def _short(text: str, n: int = 90) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# ----------------------------------------------------------------------------------------------
#                                         Spectra
# ----------------------------------------------------------------------------------------------

def step_spectra(traj: Trajectory, which: str = "x0_pixels") -> tuple[np.ndarray, np.ndarray]:
    """(freqs, power (S, bins)): the radially averaged power spectrum of `which` at every step, mean over items."""
    x = getattr(traj, which)
    out = [radial_power_spectrum(x[s]) for s in range(x.shape[0])]
    return out[0][0].numpy(), np.stack([p.numpy() for _, p in out])


def spectral_distance_over_steps(traj: Trajectory, reference, which: str = "x0_pixels") -> np.ndarray:
    """`metrics.spectral_fidelity` of `which` at each step against reference images, (S,)."""
    x = getattr(traj, which)
    return np.array([spectral_fidelity(x[s], reference) for s in range(x.shape[0])])


def spectra_figure(trajs: Mapping[str, Trajectory], which: str = "x0_pixels", reference=None,
                   title: str = "spectra of the predicted x0 over the steps") -> Figure:
    """One panel per trajectory: log power against frequency, one line per step coloured by σ."""
    fig = Figure(figsize=(4.2 * len(trajs), 3.3), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(trajs), sharey=True))
    cmap = colormaps["viridis"]
    ref = radial_power_spectrum(reference) if reference is not None else None
    for ax, (name, tr) in zip(axes, trajs.items()):
        f, p = step_spectra(tr, which)
        sig = tr.step_sigmas.numpy()
        for s in range(len(p)):
            ax.semilogy(f[1:], p[s, 1:], color=cmap(1 - sig[s]), lw=1)
        ax.semilogy(f[1:], radial_power_spectrum(tr.final)[1][1:].numpy(), color="k", lw=1.5, label="final")
        if ref is not None:
            ax.semilogy(ref[0][1:].numpy(), ref[1][1:].numpy(), "k--", lw=1, label="ground truth")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("cycles / pixel")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("power (colour: σ, yellow = clean)")
    fig.suptitle(title, fontsize=10)
    return fig


def spectral_distance_figure(trajs: Mapping[str, Trajectory], reference, which: str = "x0_pixels"
                             ) -> tuple[Figure, dict[str, np.ndarray]]:
    """Each trajectory's `spectral_distance_over_steps` against σ, and the distances {name: (S,)} behind it."""
    fig = Figure(figsize=(5, 3.2), layout="constrained")
    ax = fig.subplots()
    dists = {}
    for name, tr in trajs.items():
        dists[name] = spectral_distance_over_steps(tr, reference, which)
        ax.plot(tr.step_sigmas.numpy(), dists[name], "o-", label=name)
    ax.invert_xaxis()  # sampling runs left to right, from noise towards clean
    ax.set_xlabel("σ (sampling runs left to right, towards clean)")
    ax.set_ylabel("spectral distance (decades)")
    ax.set_title("x̂0 spectrum vs ground-truth renders")
    ax.legend(fontsize=8)
    return fig, dists


# ----------------------------------------------------------------------------------------------
#                                   Token-feature PCA maps
# ----------------------------------------------------------------------------------------------

def pca_rgb(features: torch.Tensor, fit: Optional[torch.Tensor] = None, q: float = 0.01) -> torch.Tensor:
    """(..., D, h, w) feature maps → (..., 3, h, w) in [0, 1]: the top 3 principal components as RGB.

    The basis is fitted on `fit` (default: all of `features`) so colours mean the same across steps
    and items; signs are fixed (largest loading positive) and each component is stretched between its
    q and 1−q quantiles.
    """
    d = features.shape[-3]
    tokens = lambda f: f.movedim(-3, -1).reshape(-1, d).double()
    xf = tokens(fit if fit is not None else features)
    mean = xf.mean(0)
    _, _, vh = torch.linalg.svd(xf - mean, full_matrices=False)
    basis = vh[:3]
    basis = basis * torch.sign(basis.gather(1, basis.abs().argmax(1, keepdim=True)))
    ref = (xf - mean) @ basis.T
    lo, hi = torch.quantile(ref, q, dim=0), torch.quantile(ref, 1 - q, dim=0)
    proj = ((tokens(features) - mean) @ basis.T - lo) / (hi - lo).clamp(min=1e-12)
    shape = features.shape[:-3] + features.shape[-2:] + (3,)
    return proj.clamp(0, 1).float().reshape(shape).movedim(-1, -3)


def pca_figure(trajs: Mapping[str, Trajectory], item: int = 0, steps: Optional[Sequence[int]] = None, k: int = 6,
               size: float = 1.3) -> Figure:
    """Rows: each trajectory's token-feature PCA (one basis per model, over all its steps); columns: steps."""
    first = next(iter(trajs.values()))
    steps = list(steps) if steps is not None else pick_steps(first.num_steps, k)
    fig = Figure(figsize=(size * (len(steps) + 1), size * len(trajs) + 0.5), layout="constrained")
    axes = fig.subplots(len(trajs), len(steps) + 1, squeeze=False)
    for r, (name, tr) in enumerate(trajs.items()):
        if tr.features is None:
            raise ValueError(f"trajectory {name!r} was captured without features")
        rgb = pca_rgb(tr.features)
        for c, s in enumerate(steps):
            axes[r, c].imshow(rgb[s, item].permute(1, 2, 0).numpy(), interpolation="nearest")
            _blank(axes[r, c])
            if r == 0:
                axes[r, c].set_title(f"step {tr.step_index[s]}  σ={float(tr.step_sigmas[s]):.2f}", fontsize=7)
        axes[r, 0].set_ylabel(f"{name} tokens", fontsize=8)
        axes[r, -1].imshow(to_hwc(tr.final[item]), interpolation="nearest")
        _blank(axes[r, -1])
        if r == 0:
            axes[r, -1].set_title("final", fontsize=7)
    fig.suptitle("last-layer image tokens, PCA → RGB", fontsize=9)
    return fig


# ----------------------------------------------------------------------------------------------
#                              Detailer Head vs a linear readout
# ----------------------------------------------------------------------------------------------

@dataclass
class LinearReadout:
    """Per-token least squares [f, σ·f, 1] → p×p×3 patch, unpatchified: a plain DiT final layer in x0 space."""

    weight: torch.Tensor  # (2D + 1, p·p·3) float64
    patch: int
    ridge: float

    def __call__(self, features: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Predicted images (N, 3, h·p, w·p)."""
        n, _, h, w = features.shape
        p = self.patch
        y = (_design(features, sigma) @ self.weight).float()
        return y.reshape(n, h, w, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(n, 3, h * p, w * p)


def _design(features: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """(N, D, h, w), (N,) → (N·h·w, 2D + 1) regression rows [f, σ·f, 1], tokens row-major."""
    f = features.double().flatten(2).transpose(1, 2)  # (N, hw, D)
    s = sigma.double().reshape(-1, 1, 1).expand(f.shape[0], f.shape[1], 1)
    return torch.cat([f, s * f, torch.ones_like(s)], -1).flatten(0, 1)


def _patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, 3, H, W) → (N·H/p·W/p, p·p·3), tokens row-major, each (ph, pw, c) as `model.patchify`."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(-1, p * p * c)


def fit_linear_readout(features: torch.Tensor, sigma: torch.Tensor, target: torch.Tensor,
                       ridge: float = 1e-3) -> LinearReadout:
    """Ridge least squares from token features (N, D, h, w) at σ (N,) to target images (N, 3, H, W).

    `ridge` is relative: λ = ridge · mean diagonal of XᵀX, so it does not depend on the feature scale.
    """
    p = target.shape[-1] // features.shape[-1]
    x, y = _design(features, sigma), _patches(target.double(), p)
    gram = x.T @ x
    lam = ridge * gram.diagonal().mean()
    weight = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), x.T @ y)
    return LinearReadout(weight, p, ridge)


def _flat_steps(traj: Trajectory) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features, σ and head x0 of every (step, item), flattened to N = S·B."""
    s, b = traj.features.shape[:2]
    return traj.features.flatten(0, 1), traj.step_sigmas.repeat_interleave(b), traj.x0_cond.flatten(0, 1)


def fit_readout(trajs: Union[Trajectory, Sequence[Trajectory]], ridge: float = 1e-3) -> LinearReadout:
    """Fit the linear readout on every step and item of pixel trajectories (targets: the head's x0)."""
    trajs = [trajs] if isinstance(trajs, Trajectory) else list(trajs)
    parts = [_flat_steps(t) for t in trajs]
    return fit_linear_readout(*(torch.cat(z) for z in zip(*parts)), ridge=ridge)


@torch.no_grad()
def fit_readout_on_images(pipe: FlowPipeline, images: torch.Tensor, prompts: Sequence[str],
                          sigmas: Optional[Sequence[float]] = None, seed: int = 0, ridge: float = 1e-3,
                          batch_size: int = 32) -> LinearReadout:
    """Fit the readout on held-out images: each noised to every σ in `sigmas`, one conditional pass each.

    Many more tokens than a trajectory gives (N·len(σ)·h·w rows against 2D + 1 unknowns), so the fit is
    not an interpolation of what it is then shown on.
    """
    sigmas = list(sigmas) if sigmas is not None else sampling_sigmas(8, 3.0)[:-1].tolist()
    g = torch.Generator().manual_seed(seed)
    caps = pipe.encode(list(prompts))
    feats, sig, head = [], [], []
    for s in sigmas:
        for k in range(0, len(images), batch_size):
            x0 = images[k : k + batch_size].float()
            sigma = torch.full((len(x0),), float(s))
            x = ((1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g))
            x = x.to(pipe.device)
            out, aux = pipe.dit(x.to(pipe.dtype), dit_time(sigma).to(pipe.device), caps[k : k + batch_size],
                                return_features=True)
            feats.append(torch.stack(aux["features"]).float().cpu())
            head.append(x0_from_velocity(x, velocity_from_output(out.float()), sigma.to(pipe.device)).cpu())
            sig.append(sigma)
    return fit_linear_readout(torch.cat(feats), torch.cat(sig), torch.cat(head), ridge=ridge)


@dataclass
class DetailerComparison:
    """The head's x0 beside the linear readout's, per step and item, with per-step agreement."""

    x_t: torch.Tensor  # (S, B, 3, H, W)
    head: torch.Tensor  # (S, B, 3, H, W) the Detailer Head's x0 (conditional pass)
    linear: torch.Tensor  # (S, B, 3, H, W) the linear readout of the same tokens
    sigmas: torch.Tensor  # (S,)
    table: object  # DataFrame: step, sigma, psnr (linear vs head), residual_fraction, hf_ratio (head / linear)
    in_sample: bool


def detailer_comparison(traj: Trajectory, readout: Optional[LinearReadout] = None,
                        ridge: float = 1e-3) -> DetailerComparison:
    """Compare the head's output with a linear readout of its input tokens (fit on `traj` when not given)."""
    import pandas as pd

    if traj.features is None or traj.x0_cond is None:
        raise ValueError("detailer_comparison needs a pixel trajectory captured with features=True")
    in_sample = readout is None
    readout = readout or fit_readout(traj, ridge)
    feats, sig, head = _flat_steps(traj)
    lin = readout(feats, sig).unflatten(0, traj.features.shape[:2])
    head = head.unflatten(0, traj.features.shape[:2])
    rows = []
    for s in range(traj.num_steps):
        resid = (head[s] - lin[s]).pow(2).sum() / (head[s] - head[s].mean()).pow(2).sum().clamp(min=1e-12)
        rows.append({"step": traj.step_index[s], "sigma": float(traj.step_sigmas[s]), "psnr": psnr(lin[s], head[s]),
                     "residual_fraction": float(resid), "hf_ratio": high_frequency_energy_ratio(head[s], lin[s])})
    return DetailerComparison(traj.x_t_pixels, head, lin, traj.step_sigmas, pd.DataFrame(rows), in_sample)


def detailer_figure(comp: DetailerComparison, item: int = 0, steps: Optional[Sequence[int]] = None, k: int = 4,
                    size: float = 1.5, gain: float = 4.0) -> Figure:
    """Columns x_t | head x0 | linear readout x0 | gain·(head − linear); one row per chosen step."""
    steps = list(steps) if steps is not None else pick_steps(comp.head.shape[0], k)
    cols = ["x_t", "Detailer Head x̂0", "linear readout x̂0", f"{gain:g}× (head − linear)"]
    fig = Figure(figsize=(size * len(cols), size * len(steps) + 0.6), layout="constrained")
    axes = fig.subplots(len(steps), len(cols), squeeze=False)
    for r, s in enumerate(steps):
        imgs = [comp.x_t[s, item], comp.head[s, item], comp.linear[s, item],
                gain * (comp.head[s, item] - comp.linear[s, item])]
        for c, im in enumerate(imgs):
            axes[r, c].imshow(to_hwc(im), interpolation="nearest")
            _blank(axes[r, c])
            if r == 0:
                axes[r, c].set_title(cols[c], fontsize=7)
        row = comp.table.iloc[s]
        axes[r, 0].set_ylabel(f"σ={row.sigma:.2f}", fontsize=8)
        axes[r, 2].set_xlabel(f"PSNR {row.psnr:.1f} dB", fontsize=7)
    fit = "in-sample fit" if comp.in_sample else "fit on other samples"
    fig.suptitle(f"what the Detailer Head adds to a linear patch readout ({fit})", fontsize=9)
    return fig
