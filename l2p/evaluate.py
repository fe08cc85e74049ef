"""Scoring a folder of rendered images (`l2p eval`): every metric that runs offline, in one table.

A folder is what `l2p synth` writes (images + `metadata.csv` with image, prompt and seed), so the paper's
comparison is two renders of one prompt file with the same seeds, the source model's and the L2P model's:

    l2p synth --model Z-Image-Turbo/transformer --vae Z-Image-Turbo/vae --text-encoder … --prompts p.txt --out src/
    l2p synth --model l2p.safetensors --text-encoder … --prompts p.txt --out l2p/
    l2p eval l2p/ --reference src/ --clip clip-vit-large-patch14/ --out l2p_vs_src.json

Images are read batch by batch, so a folder of 10k images at 1024² costs one batch of memory. What runs:
- always: the high-frequency energy of the mean radial spectrum (the detail a stride-8 VAE loses, which a
  pixel model can keep; `l2p.metrics`); non-square images are centre-cropped to a square for the spectrum;
- with a reference folder: the HF energy ratio and spectral distance to it, and the PSNR over the pairs of
  rows rendered from the same prompt and seed;
- with local weights (never downloaded): Inception FID to the reference and Inception score (torch-fidelity's
  file, `--inception` or $L2P_INCEPTION_WEIGHTS), CLIP score (a CLIP folder, `--clip` or $L2P_CLIP_MODEL);
- with `--toy MODE`: the toy world's judge reads toy captions: toy-GenEval, and toy-FID to the reference.
A metric without weights is listed as skipped, with what it needs; weights named but unreadable are an error.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import pandas as pd
import torch
from tqdm.auto import tqdm

from . import metrics as M
from .data import DatasetError, Entry, load_image, to_tensor, validate_metadata

PathLike = Union[str, Path]


# ----------------------------------------------------------------------------------------------
#                                     Reading a folder
# ----------------------------------------------------------------------------------------------

@dataclass
class RenderedFolder:
    """A folder's usable rows, in metadata order, and their one image size (w, h)."""

    root: Path
    entries: list[Entry]
    size: tuple[int, int]

    def batches(self, batch_size: int) -> Iterator[tuple[list[Entry], torch.Tensor]]:
        """(rows, float N×3×H×W in [-1, 1]) batch by batch."""
        for i in range(0, len(self.entries), batch_size):
            rows = self.entries[i:i + batch_size]
            yield rows, load_batch(rows)


def load_batch(rows: Sequence[Entry]) -> torch.Tensor:
    """The rows' images at their own size, float N×3×H×W in [-1, 1]."""
    return torch.stack([to_tensor(load_image(e.path)) for e in rows])


def read_folder(root: PathLike, skip_bad: bool = False) -> RenderedFolder:
    """Check `root/metadata.csv` row by row (as training does) and that every image has the same size."""
    report = validate_metadata(root)
    if report.bad and not skip_bad:
        raise DatasetError(f"{report.summary()}\n(--skip-bad / skip_bad=True scores the other rows)", report)
    if not report.entries:
        raise DatasetError(f"{report.csv_path}: no usable rows", report)
    first = report.entries[0]
    for e in report.entries[1:]:
        if e.size != first.size:
            raise DatasetError(
                f"{report.csv_path}: row {e.row} ({e.image}) is {e.size[0]}×{e.size[1]}, but row {first.row} "
                f"({first.image}) is {first.size[0]}×{first.size[1]}: a folder is scored at one image size "
                "(render each size into its own folder)", report)
    return RenderedFolder(Path(root), report.entries, first.size)


def pair_rows(gen: RenderedFolder, ref: RenderedFolder) -> dict[int, Entry]:
    """gen row → the reference row rendered from the same prompt and seed (rows without a seed never pair)."""
    index = {(e.prompt, e.seed): e for e in ref.entries if e.seed is not None}
    return {g.row: index[(g.prompt, g.seed)] for g in gen.entries
            if g.seed is not None and (g.prompt, g.seed) in index}


def _square(x: torch.Tensor) -> torch.Tensor:
    """Centre crop to a square of the shorter side (the radial spectrum needs one)."""
    h, w = x.shape[-2:]
    s = min(h, w)
    return x[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]


def _weights(given: Optional[PathLike], env: str) -> Optional[PathLike]:
    """The weights to use: the argument, else the environment variable, else None (the metric is skipped)."""
    return given if given is not None else os.environ.get(env) or None


# ----------------------------------------------------------------------------------------------
#                                        Scoring
# ----------------------------------------------------------------------------------------------

def evaluate_folder(images: PathLike, reference: Optional[PathLike] = None, *, inception: Optional[PathLike] = None,
                    clip: Optional[PathLike] = None, toy=None, batch_size: int = 16,
                    skip_bad: bool = False, cutoff: float = 0.25, progress: bool = True) -> pd.DataFrame:
    """One row per metric: `metric`, `value`, `spread` (a std where the metric has one) and `note`.

    `inception` / `clip`: local weights (default: $L2P_INCEPTION_WEIGHTS / $L2P_CLIP_MODEL; without them the
    metric is a skipped row). `toy`: a toy world mode ("full" or "smoke") or its `Evaluator`, whose judge scores
    toy captions.
    """
    gen = read_folder(images, skip_bad)
    ref = read_folder(reference, skip_bad) if reference is not None else None
    rows: list[dict] = []

    def add(metric, value=float("nan"), note="", spread=float("nan")):
        rows.append({"metric": metric, "value": value, "spread": spread, "note": note})

    inception, clip = _weights(inception, M.INCEPTION_ENV), _weights(clip, M.CLIP_ENV)
    # build every metric first, so missing weights fail before any image is read
    fid = M.inception_fid_metric(inception) if inception is not None and ref is not None else None
    isc = M.inception_score_metric(inception) if inception is not None else None
    clip_metric = M.clip_score_metric(clip) if clip is not None else None
    judge = toy_fid = None
    if toy is not None:
        from .toyworld.evaluator import load_or_train_evaluator
        from .toyworld.scenes import parse_caption
        for e in gen.entries:  # the judge checks what a toy caption asks for: other prompts cannot be scored
            try:
                parse_caption(e.prompt)
            except ValueError as err:
                raise DatasetError(f"{gen.root / 'metadata.csv'}: row {e.row} ({e.image}): --toy scores toy "
                                   f"captions only, and this prompt is not one ({err})") from None
        judge = load_or_train_evaluator(toy, progress=progress) if isinstance(toy, str) else toy
        toy_fid = M.toy_fid_metric(judge) if ref is not None else None

    spec_gen, spec_ref = M.SpectrumMeter(), M.SpectrumMeter()
    pairs = pair_rows(gen, ref) if ref is not None else {}
    paired_psnr, toy_scores = [], []
    bar = tqdm(total=len(gen.entries) + (len(ref.entries) if ref else 0), disable=not progress, desc="eval")
    for entries, x in gen.batches(batch_size):
        spec_gen.update(_square(x))
        u8 = M.to_uint8_nchw(x)
        if fid is not None:
            fid.update(u8, real=False)
        if isc is not None:
            isc.update(u8)
        if clip_metric is not None:
            clip_metric.update(list(u8), [e.prompt for e in entries])
        if judge is not None:
            toy_scores.append(judge.score(x, [e.prompt for e in entries]))
            if toy_fid is not None:
                toy_fid.update(M.to_unit(x), real=False)
        both = [(i, pairs[e.row]) for i, e in enumerate(entries) if e.row in pairs]
        if both and gen.size == ref.size:
            idx = torch.tensor([i for i, _ in both])
            paired_psnr += _psnr_each(x[idx], load_batch([r for _, r in both]))
        bar.update(len(entries))
    if ref is not None:
        for entries, x in ref.batches(batch_size):
            spec_ref.update(_square(x))
            if fid is not None:
                fid.update(M.to_uint8_nchw(x), real=True)
            if toy_fid is not None:
                toy_fid.update(M.to_unit(x), real=True)
            bar.update(len(entries))
    bar.close()

    w, h = gen.size
    add("images", len(gen.entries), f"{w}×{h}, {gen.root}")
    add("high-frequency energy", spec_gen.high_frequency_energy(cutoff),
        f"ring power above {cutoff:g} × Nyquist" + (", centre square" if w != h else ""))
    if ref is not None:
        rw, rh = ref.size
        add("reference images", len(ref.entries), f"{rw}×{rh}, {ref.root}")
        add("reference high-frequency energy", spec_ref.high_frequency_energy(cutoff))
        if spec_gen.size == spec_ref.size:
            add("HF energy ratio to reference", spec_gen.high_frequency_energy(cutoff)
                / max(spec_ref.high_frequency_energy(cutoff), 1e-20), "1 = as much detail; < 1 blur; > 1 noise")
            add("spectral distance to reference (decades)", spec_gen.distance(spec_ref), "0 = same radial spectrum")
        else:  # spectra of different sizes have different frequency bins
            for metric in ("HF energy ratio to reference", "spectral distance to reference (decades)"):
                add(metric, note="skipped: the two folders' image sizes differ")
        if paired_psnr:
            add("paired PSNR to reference (dB)", sum(paired_psnr) / len(paired_psnr),
                f"{len(paired_psnr)} pairs of one prompt and seed",
                float(torch.tensor(paired_psnr).std()) if len(paired_psnr) > 1 else float("nan"))
        else:
            why = "sizes differ" if gen.size != ref.size else "no row shares a prompt and seed with the reference"
            add("paired PSNR to reference (dB)", note=f"skipped: {why}")
    no_inception = f"skipped: no Inception weights (--inception FILE or ${M.INCEPTION_ENV})"
    if fid is not None:
        add("Inception FID to reference", float(fid.compute()), "torchmetrics, Inception-v3 pool3")
    elif ref is not None:
        add("Inception FID to reference", note=no_inception)
    if isc is not None:
        mean, std = isc.compute()
        add("Inception score", float(mean), "mean ± std over 10 splits", float(std))
    else:
        add("Inception score", note=no_inception)
    if clip_metric is not None:
        add("CLIP score", float(clip_metric.compute()), "torchmetrics: 100 · cosine(image, prompt)")
    else:
        add("CLIP score", note=f"skipped: no CLIP model (--clip FOLDER or ${M.CLIP_ENV})")
    if judge is not None:
        df = pd.concat(toy_scores, ignore_index=True)
        add("toy-GenEval", float(judge.summary(df).loc["overall", "accuracy"]),
            f"the {toy} world's judge" if isinstance(toy, str) else "the toy judge")
        if toy_fid is not None:
            add("toy-FID to reference (judge features)", float(toy_fid.compute()))
    return pd.DataFrame(rows, columns=["metric", "value", "spread", "note"])


def _psnr_each(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return [M.psnr(x[None], y[None]) for x, y in zip(a, b)]


def save_table(df: pd.DataFrame, path: PathLike, **context) -> Path:
    """Write the table as JSON (`context` alongside) or, for a .csv name, CSV; atomically (temp name, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".csv":
        df.to_csv(tmp, index=False)
    else:
        records = json.loads(df.to_json(orient="records"))  # NaN → null
        tmp.write_text(json.dumps({**{k: str(v) for k, v in context.items()}, "metrics": records}, indent=1))
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------
#                                      Command line
# ----------------------------------------------------------------------------------------------

def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="score a folder of rendered images (images + metadata.csv), offline")
    p.add_argument("images", help="folder with metadata.csv (image, prompt, seed), e.g. from `l2p synth`")
    p.add_argument("--reference", help="a second folder to compare against (e.g. the source model's renders)")
    p.add_argument("--inception", help=f"torch-fidelity's {M.INCEPTION_WEIGHTS_FILE} (default ${M.INCEPTION_ENV})")
    p.add_argument("--clip", help=f"a local CLIP folder for the CLIP score (default ${M.CLIP_ENV})")
    p.add_argument("--toy", choices=["full", "smoke"], help="score toy captions with this toy world's judge")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--skip-bad", action="store_true", help="score the good rows when some are bad")
    p.add_argument("--out", help="write the table: .json (with the folders) or .csv")
    p.set_defaults(func=run_eval)


def run_eval(a) -> int:
    import sys
    try:
        df = evaluate_folder(a.images, a.reference, inception=a.inception, clip=a.clip, toy=a.toy,
                             batch_size=a.batch_size, skip_bad=a.skip_bad)
    except (DatasetError, M.MissingWeightsError) as e:
        print(f"l2p eval: error: {e}", file=sys.stderr)
        return 2
    with pd.option_context("display.max_colwidth", 80, "display.width", 160):
        print(df.to_string(index=False, na_rep=""))
    if a.out:
        print(f"wrote {save_table(df, a.out, images=a.images, reference=a.reference)}")
    return 0
