"""Figures for the notebooks: image grids, spectra, curves. Each returns a matplotlib Figure."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure


def to_hwc(img) -> np.ndarray:
    """[-1, 1] CHW tensor or uint8 HWC array → float HWC in [0, 1]."""
    if isinstance(img, torch.Tensor):
        return ((img.detach().float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()
    arr = np.asarray(img)
    return arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr


def image_grid(images: Sequence, titles: Optional[Sequence[str]] = None, ncols: int = 8, size: float = 1.6,
               row_labels: Optional[Sequence[str]] = None, suptitle: Optional[str] = None,
               fontsize: int = 6) -> Figure:
    """A grid of images with optional wrapped titles (e.g. captions) and row labels."""
    n = len(images)
    ncols = min(ncols, n) or 1
    nrows = -(-n // ncols)
    fig = Figure(figsize=(size * ncols, size * nrows * (1.25 if titles else 1.0)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for i, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            ax.set_axis_off()
            continue
        ax.imshow(to_hwc(images[i]), interpolation="nearest")
        if titles is not None:
            ax.set_title(_wrap(titles[i], 28), fontsize=fontsize)
        if row_labels is not None and i % ncols == 0:
            ax.set_ylabel(row_labels[i // ncols], fontsize=fontsize + 2)
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def _wrap(text: str, width: int) -> str:
    import textwrap
    return "\n".join(textwrap.wrap(str(text), width)[:3])


def spectra_plot(sets: Mapping[str, object], title: str = "radially averaged power spectrum") -> Figure:
    """Log power against frequency (cycles/pixel) for several image sets."""
    from .metrics import radial_power_spectrum
    fig = Figure(figsize=(5, 3.4), layout="constrained")
    ax = fig.subplots()
    for name, imgs in sets.items():
        f, p = radial_power_spectrum(imgs)
        f, p = np.asarray(f), np.asarray(p)
        keep = f > 0  # the DC bin (≈ 0 once the mean is removed) would stretch the log axis over 30 decades
        ax.semilogy(f[keep], p[keep], label=name)
    ax.set_xlabel("spatial frequency (cycles / pixel)")
    ax.set_ylabel("power")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def curves(df, x: str, ys: Sequence[str], title: str = "", logy: bool = False, smooth: int = 1,
           ax=None) -> Figure:
    """Line plot of DataFrame columns against `x` (rolling mean over `smooth` rows)."""
    fig = None
    if ax is None:
        fig = Figure(figsize=(5, 3.2), layout="constrained")
        ax = fig.subplots()
    for y in ys:
        if y in df:
            ax.plot(df[x], df[y].rolling(smooth, min_periods=1).mean(), label=y)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig if fig is not None else ax.figure


def per_sigma_plot(df, title: str, references: Sequence[str] = (), logy: bool = True) -> Figure:
    """One line per column of a σ-indexed table (log y unless `logy=False`); `references` (baselines) dashed."""
    fig = Figure(figsize=(5.5, 3.4), layout="constrained")
    ax = fig.subplots()
    for col in df.columns:
        ax.plot(df.index, df[col], "--" if col in references else "o-", label=col)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("σ")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return fig
