"""Training data: a folder of images plus ``metadata.csv`` (columns ``image``, ``prompt``, optional ``seed``).

Matches the release's loader (z_image_facts.md §10) where it matters for training:

* resize: if w·h > max_pixels, scale down by √(w·h / max_pixels); floor both sides to a multiple of 16; then
  bilinear-resize to *cover* that size and center-crop (DiffSynth ``ImageCropAndResize``);
* pixels map to [-1, 1] as ``x·2/255 − 1`` (the release computes this in bf16; we return float32);
* ``seed`` seeds the per-image training noise (the release reuses the same noise every epoch).

Beyond the release, every row is checked when the dataset is built (``validate_metadata``), so a broken row fails
at construction with its row number instead of hours into training.

Row numbering convention used in every message and report:
``row`` is the 1-based *data* row (the header is not counted, blank lines are skipped; ``row − 1`` is the pandas
index), and ``line`` is the 1-based line in the file where that record starts (the header is line 1; differs
from ``row + 1`` only when prompts contain newlines or there are blank lines).

Image modes are converted to RGB rather than rejected:
16-bit greyscale (``I;16``/``I``) is scaled by 1/257 (a plain ``convert("RGB")`` would clip it to white);
alpha (RGBA, LA, PA, P or L/RGB with a transparency key) is composited onto **white**, because transparent
pixels often hold arbitrary colour (commonly black) that would otherwise show through, and white is the usual
display background of cut-out images; CMYK uses Pillow's plain conversion (no ICC profile); greyscale is
replicated to three channels. EXIF orientation is *not* applied, as in the release.
"""
from __future__ import annotations

import csv
import math
import os
import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

PathLike = Union[str, os.PathLike]

COLUMNS = ("image", "prompt", "seed")
REQUIRED = ("image", "prompt")
# The release README documents "file_name,text"; its code reads "image,prompt". Accept both.
ALIASES = {"file_name": "image", "text": "prompt"}
DEFAULT_MAX_PIXELS = 1024 * 1024
MIN_SIDE = 16

SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


class DatasetError(ValueError):
    """A metadata file or its rows are unusable; ``.report`` holds the full ValidationReport (if any)."""

    def __init__(self, message: str, report: Optional["ValidationReport"] = None):
        super().__init__(message)
        self.report = report


# ----------------------------------------------------------------------------------------------
#                                      Validation report
# ----------------------------------------------------------------------------------------------

@dataclass
class BadRow:
    """One rejected row: 1-based data row, file line where it starts, its image cell and why."""

    row: int
    line: int
    image: str
    reason: str

    def __str__(self) -> str:
        return f"row {self.row} (line {self.line}) {self.image!r}: {self.reason}"


@dataclass
class Entry:
    """One usable row, with the sizes needed to bucket it without decoding the image."""

    row: int
    line: int
    image: str  # as written in the CSV, relative to root
    path: Path
    prompt: str
    seed: Optional[int]
    size: tuple[int, int]  # original (w, h)
    target: tuple[int, int]  # training (w, h) after the release's resize rule
    mode: str


@dataclass
class ValidationReport:
    """Every bad row of a metadata file, plus the rows whose image mode will be converted to RGB."""

    csv_path: Path
    n_rows: int = 0
    bad: list[BadRow] = field(default_factory=list)
    converted: list[tuple[int, str]] = field(default_factory=list)  # (row, original mode)
    entries: list[Entry] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return not self.bad

    def __len__(self) -> int:
        return len(self.bad)

    def __iter__(self) -> Iterator[BadRow]:
        return iter(self.bad)

    @property
    def rows(self) -> list[int]:
        """The 1-based data-row numbers of the bad rows."""
        return [b.row for b in self.bad]

    def summary(self, limit: int = 10) -> str:
        """A short human-readable account: counts, then the first ``limit`` bad rows."""
        head = (f"{self.csv_path}: {len(self.bad)} bad row(s) of {self.n_rows} "
                f"(row = 1-based data row, header not counted; line = line in the file)")
        lines = [head] + [f"  {b}" for b in self.bad[:limit]]
        if len(self.bad) > limit:
            lines.append(f"  … and {len(self.bad) - limit} more")
        if self.converted:
            modes = sorted({m for _, m in self.converted})
            lines.append(f"  {len(self.converted)} row(s) will be converted to RGB from modes {modes}")
        return "\n".join(lines)

    __str__ = summary

    def to_dataframe(self):
        """The bad rows as a pandas DataFrame (columns row, line, image, reason)."""
        import pandas as pd

        return pd.DataFrame([vars(b) for b in self.bad], columns=["row", "line", "image", "reason"])

    def save(self, path: PathLike) -> Path:
        """Write the bad rows as CSV."""
        path = Path(path)
        self.to_dataframe().to_csv(path, index=False)
        return path


# ----------------------------------------------------------------------------------------------
#                                     Images and resizing
# ----------------------------------------------------------------------------------------------

def target_size(w: int, h: int, max_pixels: int = DEFAULT_MAX_PIXELS, multiple: int = 16) -> tuple[int, int]:
    """The release's training size (w, h): cap the area at max_pixels, then floor both sides to ``multiple``."""
    if w * h > max_pixels:
        scale = math.sqrt(w * h / max_pixels)
        w, h = int(w / scale), int(h / scale)
    return w // multiple * multiple, h // multiple * multiple


def _composite_on_white(img: Image.Image) -> Image.Image:
    """Flatten an image with alpha onto a white background."""
    rgba = img.convert("RGBA")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit RGB (see the module docstring for each mode)."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in SIXTEEN_BIT:
        # 16-bit data (Pillow also uses "I" for 16-bit PNG/TIFF): map 0..65535 onto 0..255.
        a = np.asarray(img, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = a * 255.0 if np.nanmax(a) <= 1.0 else a  # float images are usually [0, 1]
        return Image.fromarray(np.clip(np.round(np.nan_to_num(a)), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        return _composite_on_white(img)
    return img.convert("RGB")  # L, 1, P without transparency, CMYK, YCbCr, LAB, HSV


def _conversion_kind(img: Image.Image) -> Optional[str]:
    """A note for the report when to_rgb will change the image's mode, None for plain RGB."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return None
    return img.mode + ("+transparency" if "transparency" in img.info else "")


def load_image(path: PathLike) -> Image.Image:
    """Decode an image file to RGB."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def resize_crop(img: Image.Image, w: int, h: int) -> Image.Image:
    """Bilinear-resize to cover (w, h), then center-crop, as torchvision resize + center_crop in the release."""
    W, H = img.size
    scale = max(w / W, h / H)
    rw, rh = max(w, round(W * scale)), max(h, round(H * scale))
    if (rw, rh) != (W, H):
        img = img.resize((rw, rh), Image.BILINEAR)
    left, top = int(round((rw - w) / 2.0)), int(round((rh - h) / 2.0))
    return img.crop((left, top, left + w, top + h))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image → float32 CHW tensor in [-1, 1] (x·2/255 − 1)."""
    a = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(a * (2.0 / 255.0) - 1.0).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------------------------
#                                   Reading and checking rows
# ----------------------------------------------------------------------------------------------

def _read_csv(csv_path: Path) -> tuple[dict[str, int], list[tuple[int, int, list[str]]], int]:
    """Column index by canonical name, records as (row, line, cells), and the header's field count."""
    if not csv_path.is_file():
        raise DatasetError(f"metadata file not found: {csv_path}")
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:  # -sig: tolerate Excel's BOM
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DatasetError(f"{csv_path} is empty (no header)") from None
        records, row, start = [], 0, reader.line_num + 1
        for cells in reader:
            if cells and any(c.strip() for c in cells):  # blank lines are skipped, like pandas
                row += 1
                records.append((row, start, cells))
            start = reader.line_num + 1
    cols = {name: i for i, name in enumerate(header) if name}
    if len(cols) != len([h for h in header if h]):
        dup = sorted({h for h in header if header.count(h) > 1})
        raise DatasetError(f"{csv_path}: duplicate column(s) {dup} in header {header}")
    for alias, name in ALIASES.items():
        if name not in cols and alias in cols:
            cols[name] = cols[alias]
    missing = [c for c in REQUIRED if c not in cols]
    if missing:
        raise DatasetError(f"{csv_path}: missing column(s) {missing}; found {header}. Expected "
                           f"'image,prompt[,seed]' (or the release README's 'file_name,text')")
    return cols, records, len(header)


_INT = re.compile(r"[+-]?\d+")


def parse_seed(cell: str) -> Optional[int]:
    """An integer seed from a CSV cell; empty means None. '42.0' (a pandas float artefact) is accepted."""
    s = cell.strip()
    if not s:
        return None
    if _INT.fullmatch(s):
        v = int(s)
    else:
        try:
            f = float(s)
        except ValueError:
            raise ValueError(f"seed {cell!r} is not an integer") from None
        if not f.is_integer() or abs(f) > 2 ** 53:
            raise ValueError(f"seed {cell!r} is not an integer")
        v = int(f)
    if not -(2 ** 63) <= v < 2 ** 64:  # what torch.Generator.manual_seed accepts
        raise ValueError(f"seed {v} is outside the 64-bit range")
    return v


def check_relative_path(cell: str) -> PurePosixPath:
    """The image cell as a path inside the dataset folder; raises ValueError if it could escape it."""
    s = cell.strip().replace("\\", "/")
    if not s:
        raise ValueError("empty image path")
    p = PurePosixPath(s)
    if p.is_absolute() or re.match(r"^[A-Za-z]:", s) or os.path.isabs(cell.strip()):
        raise ValueError("absolute path (must be relative to the dataset folder)")
    if ".." in p.parts:
        raise ValueError("path contains '..' (must stay inside the dataset folder)")
    return p


def _check_row(root: Path, cols: dict[str, int], cells: list[str], n_header: int, max_pixels: int,
               multiple: int, decode: bool):
    """Validate one record; returns (entry fields, converted mode or None) or raises ValueError(reason)."""
    if len(cells) > n_header:
        raise ValueError(f"{len(cells)} fields but the header has {n_header} (unquoted comma in a prompt?)")
    get = lambda name: cells[cols[name]] if name in cols and cols[name] < len(cells) else ""  # noqa: E731
    rel = check_relative_path(get("image"))
    prompt = get("prompt")
    if not prompt.strip():
        raise ValueError("empty prompt")
    seed = parse_seed(get("seed")) if "seed" in cols else None

    path = root / rel
    if not path.exists():
        raise ValueError(f"file not found: {path}")
    if not path.is_file():
        raise ValueError(f"not a file: {path}")
    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    try:
        with Image.open(path) as img:
            size, mode, note = img.size, img.mode, _conversion_kind(img)
            if decode:
                img.load()
            else:
                img.verify()  # cheap structural check; full decoding happens in __getitem__
    except Exception as e:  # Pillow raises many types for broken files
        raise ValueError(f"unreadable image ({type(e).__name__}: {e})") from None
    w, h = size
    if min(w, h) < MIN_SIDE:
        raise ValueError(f"image is {w}x{h}; both sides must be at least {MIN_SIDE} px")
    tw, th = target_size(w, h, max_pixels, multiple)
    if tw < multiple or th < multiple:
        raise ValueError(f"image {w}x{h} would train at {tw}x{th} after the max_pixels={max_pixels} cap "
                         f"(aspect ratio too extreme)")
    return dict(image=get("image").strip(), path=path, prompt=prompt, seed=seed, size=(w, h),
                target=(tw, th), mode=mode), note


def validate_metadata(root: PathLike, metadata: PathLike = "metadata.csv", max_pixels: int = DEFAULT_MAX_PIXELS,
                      multiple: int = 16, decode: bool = False) -> ValidationReport:
    """Check every row of ``root/metadata``; the report lists each bad row with its row number and reason.

    Raises DatasetError only for file-level problems (missing file, missing columns). ``decode=True`` fully
    decodes every image (slow); the default reads headers and runs Pillow's ``verify``.
    """
    root = Path(root)
    csv_path = root / metadata
    cols, records, n_header = _read_csv(csv_path)
    report = ValidationReport(csv_path=csv_path, n_rows=len(records))
    for row, line, cells in records:
        image_cell = cells[cols["image"]] if cols["image"] < len(cells) else ""
        try:
            fields, note = _check_row(root, cols, cells, n_header, max_pixels, multiple, decode)
        except ValueError as e:
            report.bad.append(BadRow(row, line, image_cell, str(e)))
            continue
        report.entries.append(Entry(row=row, line=line, **fields))
        if note:
            report.converted.append((row, note))
    return report


# ----------------------------------------------------------------------------------------------
#                                         The dataset
# ----------------------------------------------------------------------------------------------

class ImageTextDataset(torch.utils.data.Dataset):
    """Images + prompts (+ seeds) from a folder.

    Items are dicts: ``x`` the image in [-1, 1], float32 (3, H, W); ``prompt``; ``seed`` (int or None); ``row`` the
    1-based data row in the CSV; ``path`` the image cell. (``x`` is the key l2p.train reads.)

    Construction validates every row. With ``skip_bad=False`` any bad row raises DatasetError (its ``.report``
    lists them all); with ``skip_bad=True`` the bad rows are left out and listed in ``.skipped``.
    """

    def __init__(self, root: PathLike, metadata: PathLike = "metadata.csv", max_pixels: int = DEFAULT_MAX_PIXELS,
                 multiple: int = 16, skip_bad: bool = False, decode: bool = False):
        self.root = Path(root)
        self.max_pixels, self.multiple = max_pixels, multiple
        report = validate_metadata(self.root, metadata, max_pixels, multiple, decode)
        if report.bad and not skip_bad:
            raise DatasetError(report.summary() + "\nPass skip_bad=True to train on the other rows, "
                               "or fix the CSV (err.report.save(path) writes the full list).", report)
        if not report.entries:
            raise DatasetError(f"{report.csv_path}: no usable rows\n{report.summary()}", report)
        self.report = report
        self.skipped = report  # the rows left out (empty unless skip_bad found some)
        self.entries = report.entries

    def __len__(self) -> int:
        return len(self.entries)

    def sizes(self) -> list[tuple[int, int]]:
        """Training (H, W) of every item, known without decoding."""
        return [(e.target[1], e.target[0]) for e in self.entries]

    def __getitem__(self, i: int) -> dict:
        e = self.entries[i]
        try:
            img = load_image(e.path)
        except Exception as err:
            raise DatasetError(f"row {e.row} (line {e.line}) {e.image!r}: cannot decode image: {err}") from err
        img = resize_crop(img, *e.target)
        return {"x": to_tensor(img), "prompt": e.prompt, "seed": e.seed, "row": e.row, "path": e.image}


def write_metadata(root: PathLike, rows: Iterable, metadata: str = "metadata.csv") -> Path:
    """Write ``root/metadata`` with columns image,prompt,seed, atomically (temp file + rename).

    ``rows``: dicts with keys image, prompt and optional seed, or tuples (image, prompt[, seed]).
    Image paths must be relative to ``root``; a None seed is written as an empty cell (read back as None).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for n, r in enumerate(rows, start=1):
        if isinstance(r, dict):
            image, prompt, seed = r.get("image"), r.get("prompt"), r.get("seed")
        else:
            image, prompt, seed = (tuple(r) + (None,))[:3]
        image = Path(image).as_posix() if isinstance(image, os.PathLike) else image
        if not isinstance(image, str) or not isinstance(prompt, str):
            raise TypeError(f"row {n}: image and prompt must be strings, got {type(image).__name__}, "
                            f"{type(prompt).__name__}")
        try:
            check_relative_path(image)
        except ValueError as e:
            raise ValueError(f"row {n}: image {image!r}: {e}") from None
        out.append([image, prompt, "" if seed is None else str(int(seed))])
    path = root / metadata
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=root)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(COLUMNS)
            w.writerows(out)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# ----------------------------------------------------------------------------------------------
#                                          Batching
# ----------------------------------------------------------------------------------------------

def collate(samples: Sequence[dict]) -> dict:
    """Stack items of one size into a batch. The release trains with batch 1; use BucketBatchSampler for more."""
    shapes = {tuple(s["x"].shape) for s in samples}
    if len(shapes) > 1:
        detail = ", ".join(f"row {s.get('row', i)}: {tuple(s['x'].shape[1:])}" for i, s in enumerate(samples))
        raise ValueError(f"cannot batch images of different sizes ({detail}); use batch_size=1 "
                         f"or BucketBatchSampler so each batch holds one size")
    return {"x": torch.stack([s["x"] for s in samples]),
            **{k: [s.get(k) for s in samples] for k in ("prompt", "seed", "row", "path")}}


def size_buckets(sizes: Union[ImageTextDataset, Sequence[tuple[int, int]]]) -> dict[tuple[int, int], list[int]]:
    """Item indices grouped by training size (H, W)."""
    sizes = sizes.sizes() if isinstance(sizes, ImageTextDataset) else sizes
    buckets: dict[tuple[int, int], list[int]] = {}
    for i, hw in enumerate(sizes):
        buckets.setdefault(tuple(hw), []).append(i)
    return buckets


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of indices that share one training size, shuffled per epoch (call set_epoch) from a fixed seed."""

    def __init__(self, sizes, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        self.buckets = size_buckets(sizes)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        batches = []
        for _, idx in sorted(self.buckets.items()):
            idx = list(idx)
            if self.shuffle:
                rng.shuffle(idx)
            for s in range(0, len(idx), self.batch_size):
                b = idx[s:s + self.batch_size]
                if len(b) == self.batch_size or not self.drop_last:
                    batches.append(b)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        if self.drop_last:
            return sum(len(v) // self.batch_size for v in self.buckets.values())
        return sum(math.ceil(len(v) / self.batch_size) for v in self.buckets.values())
