"""Image metrics: spectra (what a stride-8 VAE loses), PSNR, toy FID/KID on judge features, real-scale metrics.

Conventions: float images are N×3×H×W in [-1, 1]; uint8 images may be N×H×W×3 or N×3×H×W (see `to_float`).
The real-scale metrics (Inception FID / IS, CLIP score) never download: they need local weights and say
which file or package is missing otherwise.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

ImageLike = Union[torch.Tensor, np.ndarray]


def to_float(images: ImageLike) -> torch.Tensor:
    """Any image batch → float32 N×3×H×W in [-1, 1]. uint8 is read as [0, 255]; floats as [-1, 1]; HWC or CHW."""
    x = torch.as_tensor(np.asarray(images)) if isinstance(images, np.ndarray) else images
    if x.ndim == 3:
        x = x[None]
    if x.shape[1] != 3 and x.shape[-1] == 3:  # channels last
        x = x.permute(0, 3, 1, 2)
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1.0
    return x.float()


def to_unit(images: ImageLike) -> torch.Tensor:
    """Any image batch → float32 N×3×H×W in [0, 1] (clamped)."""
    return ((to_float(images) + 1) / 2).clamp(0, 1)


def to_uint8_nchw(images: ImageLike) -> torch.Tensor:
    """Any image batch → uint8 N×3×H×W."""
    return (to_unit(images) * 255).round().to(torch.uint8)


# ----------------------------------------------------------------------------------------------
#                                    Spectra and PSNR
# ----------------------------------------------------------------------------------------------

def radial_power_spectrum(images: ImageLike, window: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Radially averaged power spectrum, mean over channels and images.

    Returns (freqs, power): freqs in cycles/pixel from 0 to 0.5 (Nyquist) in 1/H steps, one bin per integer
    radius of the centred 2-D spectrum; power = mean |FFT|²/(H·W) in the ring. Each image's mean is removed
    (bin 0 is then ~0), so the spectrum describes structure, not brightness. With `window`, a 2-D Hann
    window (normalised to unit mean power) stops the image border, which the FFT treats as periodic, from
    leaking a smooth gradient's energy into every frequency.
    """
    x = to_float(images).double()
    n, c, h, w = x.shape
    if h != w:
        raise ValueError("radial_power_spectrum expects square images")
    win = torch.ones(h, w, dtype=torch.float64)
    if window:
        win = torch.hann_window(h, periodic=False, dtype=torch.float64)
        win = win[:, None] * win[None, :]
        win = win / win.pow(2).mean().sqrt()
    # Remove the window-weighted mean, so the windowed image has no DC term.
    x = (x - (x * win).sum(dim=(-2, -1), keepdim=True) / win.sum()) * win
    p = torch.fft.fftshift(torch.fft.fft2(x).abs().pow(2) / (h * w), dim=(-2, -1)).mean(dim=(0, 1))
    fy, fx = torch.meshgrid(torch.arange(h) - h // 2, torch.arange(w) - w // 2, indexing="ij")
    r = torch.sqrt((fx ** 2 + fy ** 2).double()).round().long().flatten()
    nbins = h // 2 + 1  # radii beyond Nyquist (the corners) are dropped
    keep = r < nbins
    power = torch.zeros(nbins, dtype=torch.float64).index_add_(0, r[keep], p.flatten()[keep])
    count = torch.zeros(nbins, dtype=torch.float64).index_add_(0, r[keep], torch.ones_like(p.flatten()[keep]))
    freqs = torch.arange(nbins, dtype=torch.float64) / h
    return freqs, power / count.clamp(min=1)


def _hf_energy(freqs: torch.Tensor, power: torch.Tensor, cutoff: float) -> float:
    return power[freqs > cutoff * 0.5].sum().item()


def _log_distance(pg: torch.Tensor, pr: torch.Tensor, eps: float) -> float:
    return (torch.log10(pg[1:] + eps) - torch.log10(pr[1:] + eps)).abs().mean().item()


def high_frequency_energy(images: ImageLike, cutoff: float = 0.25) -> float:
    """Total ring power above `cutoff` × Nyquist (cutoff 0.25 ↔ periods shorter than 8 px)."""
    return _hf_energy(*radial_power_spectrum(images), cutoff)


def high_frequency_energy_ratio(gen: ImageLike, ref: ImageLike, cutoff: float = 0.25) -> float:
    """HF energy of `gen` over that of `ref`: 1 = detail kept, <1 = lost (blur), >1 = added (noise, aliasing)."""
    return high_frequency_energy(gen, cutoff) / max(high_frequency_energy(ref, cutoff), 1e-20)


def spectral_fidelity(gen: ImageLike, ref: ImageLike, eps: float = 1e-10) -> float:
    """Mean |log10 P_gen(f) − log10 P_ref(f)| over the non-DC frequency bins, in decades. Lower is better, 0 = same.

    A value of 1 means the two radial spectra differ by 10× on average; it penalises lost high
    frequencies (blur) and spurious ones (noise) alike, which PSNR and FID barely see at 64².
    """
    return _log_distance(radial_power_spectrum(gen)[1], radial_power_spectrum(ref)[1], eps)


class SpectrumMeter:
    """The mean radial power spectrum of an image set, accumulated batch by batch: after every batch of a set
    has been added, `spectrum()` is what `radial_power_spectrum` gives for the whole set at once (up to float
    rounding), without holding the set in memory. All images must have one square size."""

    def __init__(self):
        self.freqs: Optional[torch.Tensor] = None
        self.total: Optional[torch.Tensor] = None  # Σ over batches of (batch mean power × batch size)
        self.count = 0
        self.size: Optional[tuple[int, int]] = None

    def update(self, images: ImageLike) -> None:
        x = to_float(images)
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            raise ValueError(f"image size {tuple(x.shape[-2:])} differs from the first batch's {self.size}: "
                             "spectra of different sizes have different frequency bins")
        f, p = radial_power_spectrum(x)
        self.size, self.freqs = tuple(x.shape[-2:]), f
        self.total = p * len(x) if self.total is None else self.total + p * len(x)
        self.count += len(x)

    def spectrum(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(freqs, mean power), as `radial_power_spectrum` returns them."""
        if not self.count:
            raise ValueError("no images were added")
        return self.freqs, self.total / self.count

    def high_frequency_energy(self, cutoff: float = 0.25) -> float:
        """`high_frequency_energy` of the images added."""
        return _hf_energy(*self.spectrum(), cutoff)

    def distance(self, ref: "SpectrumMeter", eps: float = 1e-10) -> float:
        """`spectral_fidelity` of these images against `ref`'s, in decades."""
        if self.size != ref.size:
            raise ValueError(f"spectra of {self.size} and {ref.size} images cannot be compared")
        return _log_distance(self.spectrum()[1], ref.spectrum()[1], eps)


def psnr(a: ImageLike, b: ImageLike, data_range: float = 2.0) -> float:
    """Mean over images of the per-image PSNR in dB (data_range 2 for [-1, 1] images)."""
    mse = (to_float(a) - to_float(b)).pow(2).flatten(1).mean(1).clamp(min=1e-12)
    return (10 * torch.log10(data_range ** 2 / mse)).mean().item()


def spectrum_figure(sets: dict, cutoff: Optional[float] = 0.25, title: str = "Radially averaged power spectrum"):
    """A matplotlib Figure with the radial spectra of named image sets (log power vs cycles/pixel)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for name, imgs in sets.items():
        f, p = radial_power_spectrum(imgs)
        ax.semilogy(f[1:].numpy(), p[1:].numpy(), label=name)
    if cutoff is not None:
        ax.axvline(cutoff * 0.5, color="grey", ls=":", lw=1, label=f"HF cutoff ({cutoff:g}·Nyquist)")
    ax.set(xlabel="frequency (cycles / pixel)", ylabel="power", title=title)
    ax.legend(fontsize=8)
    return fig


# ----------------------------------------------------------------------------------------------
#                                Toy FID / KID on judge features
# ----------------------------------------------------------------------------------------------

class FeatureExtractor(nn.Module):
    """Wraps a `features(x[-1,1]) -> (N, D)` callable as the module torchmetrics' FID/KID call.

    torchmetrics hands a custom module the images untouched (its `normalize` flag only picks the dtype of
    a probe image, which `num_features` lets us skip), so this module accepts uint8 [0, 255] or float [0, 1].
    """

    def __init__(self, features_fn, num_features: int):
        super().__init__()
        self.features_fn = features_fn
        self.num_features = int(num_features)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return self.features_fn(x * 2 - 1).double()


def _feature_module(evaluator) -> FeatureExtractor:
    return FeatureExtractor(evaluator.features, evaluator.feature_dim)


def _batches(x: torch.Tensor, batch_size: int):
    return (x[i:i + batch_size] for i in range(0, len(x), batch_size))


def toy_fid_metric(evaluator):
    """torchmetrics' FID on judge features, to `update(float N×3×H×W in [0, 1], real=…)` batch by batch."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=_feature_module(evaluator), normalize=True)


def toy_fid(gen: ImageLike, ref: ImageLike, evaluator, batch_size: int = 256) -> float:
    """Fréchet distance between judge features (`evaluator.features`) of two image sets (torchmetrics FID)."""
    fid = toy_fid_metric(evaluator)
    for xb in _batches(to_unit(ref), batch_size):
        fid.update(xb, real=True)
    for xb in _batches(to_unit(gen), batch_size):
        fid.update(xb, real=False)
    return float(fid.compute())


def toy_kid(gen: ImageLike, ref: ImageLike, evaluator, subsets: int = 50, subset_size: int = 100,
            batch_size: int = 256, seed: int = 0) -> tuple[float, float]:
    """Kernel distance (mean, std over subsets) between judge features of two image sets (torchmetrics KID)."""
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance

    g, r = to_unit(gen), to_unit(ref)
    subset_size = min(subset_size, len(g), len(r))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=_feature_module(evaluator), subsets=subsets, subset_size=subset_size,
                                      normalize=True)
    for xb in _batches(r, batch_size):
        kid.update(xb, real=True)
    for xb in _batches(g, batch_size):
        kid.update(xb, real=False)
    state = torch.random.get_rng_state()  # KID draws subsets with the global RNG: make it reproducible
    torch.manual_seed(seed)
    try:
        mean, std = kid.compute()
    finally:
        torch.random.set_rng_state(state)
    return float(mean), float(std)


# ----------------------------------------------------------------------------------------------
#                       Real-scale metrics (local weights only, never downloaded)
# ----------------------------------------------------------------------------------------------

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_ENV = "L2P_INCEPTION_WEIGHTS"
CLIP_ENV = "L2P_CLIP_MODEL"


class MissingWeightsError(FileNotFoundError):
    """A metric's weights (or the package that runs them) are not available locally."""


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _require_torch_fidelity() -> None:
    """torchmetrics runs Inception through torch-fidelity's port of the TF graph."""
    if not _has_module("torch_fidelity"):
        raise MissingWeightsError(
            "Inception FID / IS need the `torch-fidelity` package (torchmetrics' Inception port), which is not "
            "installed. Install it with `pip install torch-fidelity` (or `pip install torchmetrics[image]`), and "
            f"provide its weights file {INCEPTION_WEIGHTS_FILE} locally (nothing is downloaded at run time).")


def inception_weights_path(weights_path: Optional[Union[str, Path]] = None) -> Path:
    """The local Inception weights: the argument, else ${INCEPTION_ENV}; a clear error when absent."""
    p = weights_path or os.environ.get(INCEPTION_ENV)
    if not p or not Path(p).expanduser().is_file():
        where = f"'{p}' does not exist" if p else f"no path given and ${INCEPTION_ENV} is not set"
        raise MissingWeightsError(
            f"Inception weights not found ({where}). l2p never downloads at run time: fetch torch-fidelity's "
            f"'{INCEPTION_WEIGHTS_FILE}' (github.com/toshas/torch-fidelity releases) on a machine with network "
            f"access, then pass weights_path=... or set ${INCEPTION_ENV}=/path/to/{INCEPTION_WEIGHTS_FILE}.")
    return Path(p).expanduser()


def _inception(features: str, weights_path) -> nn.Module:
    """torchmetrics' Inception-v3 (FID variant) loaded from a local file."""
    _require_torch_fidelity()
    path = inception_weights_path(weights_path)
    from torchmetrics.image.fid import NoTrainInceptionV3

    return NoTrainInceptionV3(name="inception-v3-compat", features_list=[features],
                              feature_extractor_weights_path=str(path))


def inception_fid_metric(weights_path: Optional[Union[str, Path]] = None):
    """torchmetrics' FID on local Inception weights, to `update(uint8 N×3×H×W, real=…)` batch by batch."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    net = _inception("2048", weights_path)
    net.num_features = 2048
    return FrechetInceptionDistance(feature=net)  # the module takes uint8 [0, 255]


def inception_score_metric(weights_path: Optional[Union[str, Path]] = None, splits: int = 10):
    """torchmetrics' Inception Score on local weights, to `update(uint8 N×3×H×W)` batch by batch."""
    import warnings

    from torchmetrics.image.inception import InceptionScore

    net = _inception("logits_unbiased", weights_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        return InceptionScore(feature=net, splits=splits, normalize=False)


def inception_fid(gen: ImageLike, ref: ImageLike, weights_path: Optional[Union[str, Path]] = None,
                  batch_size: int = 64) -> float:
    """Standard FID (Inception-v3 pool3, 2048-d) from local weights; images are resized inside to 299²."""
    fid = inception_fid_metric(weights_path)
    for xb in _batches(to_uint8_nchw(ref), batch_size):
        fid.update(xb, real=True)
    for xb in _batches(to_uint8_nchw(gen), batch_size):
        fid.update(xb, real=False)
    return float(fid.compute())


def inception_score(images: ImageLike, weights_path: Optional[Union[str, Path]] = None, splits: int = 10,
                    batch_size: int = 64) -> tuple[float, float]:
    """Inception Score (mean, std over splits) from local weights."""
    metric = inception_score_metric(weights_path, splits)
    for xb in _batches(to_uint8_nchw(images), batch_size):
        metric.update(xb)
    mean, std = metric.compute()
    return float(mean), float(std)


def clip_model_path(model_path: Optional[Union[str, Path]] = None) -> Path:
    """A local Hugging Face CLIP folder: the argument, else ${CLIP_ENV}; a clear error when absent."""
    p = model_path or os.environ.get(CLIP_ENV)
    if not p or not (Path(p).expanduser() / "config.json").is_file():
        where = f"'{p}' has no config.json" if p else f"no path given and ${CLIP_ENV} is not set"
        raise MissingWeightsError(
            f"CLIP model not found ({where}). l2p never downloads at run time: save a CLIP checkpoint (e.g. "
            "openai/clip-vit-large-patch14 via CLIPModel/CLIPProcessor.save_pretrained) into a folder on a machine "
            f"with network access, then pass model_path=... or set ${CLIP_ENV}=/path/to/folder.")
    return Path(p).expanduser()


def clip_score_metric(model_path: Optional[Union[str, Path]] = None):
    """torchmetrics' CLIP score on a local CLIP folder, to `update(list of uint8 3×H×W, prompts)` batch by batch."""
    path = clip_model_path(model_path)
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    def load():
        return (CLIPModel.from_pretrained(path, local_files_only=True).eval(),
                CLIPProcessor.from_pretrained(path, local_files_only=True))

    return CLIPScore(model_name_or_path=load)


def clip_score(images: ImageLike, prompts: Sequence[str], model_path: Optional[Union[str, Path]] = None,
               batch_size: int = 32) -> float:
    """CLIP score (torchmetrics: 100 · mean cosine(image, text), floored at 0) from a local CLIP folder."""
    metric = clip_score_metric(model_path)
    x = to_uint8_nchw(images)
    prompts = list(prompts)
    if len(prompts) != len(x):
        raise ValueError(f"{len(x)} images but {len(prompts)} prompts")
    for i in range(0, len(x), batch_size):
        metric.update(list(x[i:i + batch_size]), prompts[i:i + batch_size])
    return float(metric.compute())
