"""ImageTextDataset: validation report, mode conversions, the release's resize rule, batching."""
import csv

import numpy as np
import pytest
import torch
from PIL import Image

from l2p.data import (BucketBatchSampler, DatasetError, ImageTextDataset, collate, load_image, parse_seed,
                      resize_crop, size_buckets, target_size, validate_metadata, write_metadata)


def save_rgb(path, w=40, h=32, color=(200, 30, 60)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), color).save(path)


def write_csv(root, header, rows, name="metadata.csv"):
    with open(root / name, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture
def bad_folder(tmp_path):
    """One good row and one row per rejection kind; row numbers are 1-based data rows."""
    save_rgb(tmp_path / "img" / "ok.png")
    save_rgb(tmp_path / "img" / "tiny.png", 12, 40)
    save_rgb(tmp_path / "img" / "sliver.png", 16, 5000)  # fine as is, but 0 px wide after the max_pixels cap
    (tmp_path / "img" / "zero.png").write_bytes(b"")
    (tmp_path / "img" / "junk.png").write_bytes(b"not an image at all")
    save_rgb(tmp_path.parent / "outside.png")
    rows = [
        ["img/ok.png", "a red square", "1"],        # 1 good
        ["img/missing.png", "gone", "2"],           # 2 missing file
        ["img/zero.png", "empty file", "3"],        # 3 zero bytes
        ["img/junk.png", "junk bytes", "4"],        # 4 unreadable
        ["../outside.png", "escapes", "5"],         # 5 '..'
        [str(tmp_path / "img/ok.png"), "abs", "6"],  # 6 absolute
        ["img/ok.png", "   ", "7"],                 # 7 empty prompt
        ["img/ok.png", "bad seed", "seven"],        # 8 non-integer seed
        ["img/tiny.png", "too small", "9"],         # 9 < 16 px
        ["img/sliver.png", "sliver", "10"],         # 10 extreme aspect ratio
        ["img/ok.png", "multi\nline prompt", ""],   # 11 good (empty seed = None), spans two lines
        ["img/ok.png", "a", "b", "extra"],          # 12 too many fields
    ]
    write_csv(tmp_path, ["image", "prompt", "seed"], rows)
    return tmp_path, {2: "file not found", 3: "0 bytes", 4: "unreadable", 5: "'..'", 6: "absolute",
                      7: "empty prompt", 8: "not an integer", 9: "at least 16 px", 10: "aspect ratio",
                      12: "4 fields but the header has 3"}


def test_report_lists_every_bad_row(bad_folder):
    root, expected = bad_folder
    report = validate_metadata(root, "metadata.csv", max_pixels=64 * 64)
    assert report.n_rows == 12
    assert report.rows == sorted(expected)
    for b in report:
        assert expected[b.row] in b.reason, (b.row, b.reason)
    # line = file line where the record starts: header is line 1; row 11's prompt spans two lines
    lines = {b.row: b.line for b in report}
    assert lines[2] == 3 and lines[10] == 11 and lines[12] == 14
    df = report.to_dataframe()
    assert list(df.columns) == ["row", "line", "image", "reason"] and len(df) == len(expected)
    assert [e.row for e in report.entries] == [1, 11]


def test_bad_rows_raise_or_skip(bad_folder, tmp_path_factory):
    root, expected = bad_folder
    with pytest.raises(DatasetError, match=r"10 bad row\(s\) of 12") as err:
        ImageTextDataset(root, max_pixels=64 * 64)
    assert "row 2 (line 3)" in str(err.value) and "… and" not in str(err.value).split("\n")[0]
    assert len(err.value.report) == 10
    ds = ImageTextDataset(root, max_pixels=64 * 64, skip_bad=True)
    assert len(ds) == 2 and ds.skipped.rows == sorted(expected)
    saved = ds.skipped.save(tmp_path_factory.mktemp("rep") / "skipped.csv")
    assert saved.read_text().startswith("row,line,image,reason")
    # The remaining rows train: items decode and batch.
    items = [ds[i] for i in range(len(ds))]
    assert items[0]["seed"] == 1 and items[1]["seed"] is None and items[1]["prompt"] == "multi\nline prompt"
    assert [it["row"] for it in items] == [1, 11]
    batch = collate(items)
    assert batch["x"].shape == (2, 3, 32, 32) and batch["row"] == [1, 11]


def test_missing_columns_named(tmp_path):
    write_csv(tmp_path, ["path", "caption"], [["a.png", "x"]])
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['image', 'prompt'\]; found \['path', 'caption'\]"):
        ImageTextDataset(tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        validate_metadata(tmp_path, "nope.csv")


def test_release_column_names(tmp_path):
    save_rgb(tmp_path / "a.png")
    write_csv(tmp_path, ["file_name", "text"], [["a.png", "a red square"]])
    ds = ImageTextDataset(tmp_path)
    item = ds[0]
    assert item["prompt"] == "a red square" and item["seed"] is None and item["row"] == 1


def _mode_images(root):
    """One file per awkward mode; returns {name: expected RGB at (0, 0)}."""
    g16 = np.full((32, 48), 257 * 100, dtype=np.uint16)
    Image.fromarray(g16).save(root / "g16.png")  # Pillow: mode I;16
    Image.new("CMYK", (48, 32), (0, 255, 255, 0)).save(root / "cmyk.jpg")  # pure red in CMYK
    rgba = Image.new("RGBA", (48, 32), (0, 0, 255, 0))  # fully transparent blue → white
    rgba.putpixel((47, 31), (0, 0, 255, 255))
    rgba.save(root / "rgba.png")
    Image.new("LA", (48, 32), (10, 128)).save(root / "la.png")  # half-transparent dark grey on white
    Image.new("L", (48, 32), 77).save(root / "grey.png")
    p = Image.new("P", (48, 32), 0)
    p.putpalette([0, 255, 0] + [0, 0, 0] * 255)
    p.info["transparency"] = 0
    p.save(root / "pal.png")
    half = round(10 * 128 / 255 + 255 * (1 - 128 / 255))
    return {"g16.png": (100, 100, 100), "cmyk.jpg": (255, 0, 0), "rgba.png": (255, 255, 255),
            "la.png": (half,) * 3, "grey.png": (77, 77, 77), "pal.png": (255, 255, 255)}


def test_modes_convert_to_rgb(tmp_path):
    expected = _mode_images(tmp_path)
    write_csv(tmp_path, ["image", "prompt", "seed"], [[n, "x", i] for i, n in enumerate(expected)])
    ds = ImageTextDataset(tmp_path)
    assert len(ds.report.converted) == len(expected)
    for i, (name, rgb) in enumerate(expected.items()):
        img = load_image(tmp_path / name)
        assert img.mode == "RGB"
        got = img.getpixel((0, 0))
        assert np.abs(np.subtract(got, rgb)).max() <= 3, (name, got, rgb)  # JPEG/compositing rounding
        x = ds[i]["x"]
        assert x.shape == (3, 32, 48) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
    assert load_image(tmp_path / "rgba.png").getpixel((47, 31)) == (0, 0, 255)


@pytest.mark.parametrize("w,h,mp", [(1024, 1024, 1024 ** 2), (1280, 720, 1024 ** 2), (3000, 2000, 1024 ** 2),
                                    (333, 517, 1024 ** 2), (999, 101, 128 * 128), (4000, 300, 512 * 512)])
def test_target_size_rule(w, h, mp):
    tw, th = target_size(w, h, mp)
    assert tw % 16 == 0 and th % 16 == 0 and 0 < tw <= w and 0 < th <= h and tw * th <= mp
    if w * h <= mp:
        assert (tw, th) == (w // 16 * 16, h // 16 * 16)


def test_release_sizes():
    assert target_size(1024, 1024) == (1024, 1024)
    assert target_size(1280, 720) == (1280, 720)
    assert target_size(2048, 1536) == (1168, 880)  # 2048/√3 = 1182.4 → 1182 → 1168; 1536/√3 → 886 → 880


def test_resize_crop_centres(tmp_path):
    img = Image.new("RGB", (100, 60), (0, 0, 0))
    img.paste((255, 255, 255), (40, 0, 60, 60))  # white vertical stripe in the middle
    out = resize_crop(img, 48, 48)
    assert out.size == (48, 48)
    assert out.getpixel((24, 24)) == (255, 255, 255) and out.getpixel((2, 24)) == (0, 0, 0)
    # Through the dataset: multiples of 16 within max_pixels, values in [-1, 1].
    img.save(tmp_path / "s.png")
    write_metadata(tmp_path, [("s.png", "stripe", 3)])
    x = ImageTextDataset(tmp_path, max_pixels=40 * 40)[0]["x"]
    assert x.shape[1] % 16 == 0 and x.shape[2] % 16 == 0 and x.shape[1] * x.shape[2] <= 40 * 40
    assert x.shape == (3, 16, 48)  # 100x60 → √(6000/1600)=1.94 → 51x30 → 48x16
    assert x.max() == 1.0 and x.min() == -1.0


def test_write_metadata_roundtrip(tmp_path):
    save_rgb(tmp_path / "a.png")
    save_rgb(tmp_path / "sub" / "b.png")
    path = write_metadata(tmp_path, [{"image": "a.png", "prompt": 'a "quoted", comma', "seed": 7},
                                     ("sub/b.png", "second", None)])
    assert path.read_text().splitlines()[0] == "image,prompt,seed"
    assert not list(tmp_path.glob("*.tmp"))
    ds = ImageTextDataset(tmp_path)
    assert [(e.prompt, e.seed) for e in ds.entries] == [('a "quoted", comma', 7), ("second", None)]
    with pytest.raises(ValueError, match=r"row 1: image '\.\./x\.png'"):
        write_metadata(tmp_path, [("../x.png", "p", 1)])
    assert ImageTextDataset(tmp_path).entries[0].seed == 7  # the failed write left the file intact


def test_parse_seed():
    assert parse_seed("42") == 42 and parse_seed(" -3 ") == -3 and parse_seed("42.0") == 42
    assert parse_seed("") is None
    for bad in ("4.5", "x", str(2 ** 64)):
        with pytest.raises(ValueError):
            parse_seed(bad)


def test_collate_and_buckets(tmp_path):
    save_rgb(tmp_path / "a.png", 32, 32)
    save_rgb(tmp_path / "b.png", 48, 32)
    write_metadata(tmp_path, [("a.png", "a", 0), ("b.png", "b", 1), ("a.png", "c", 2), ("b.png", "d", 3),
                              ("a.png", "e", 4)])
    ds = ImageTextDataset(tmp_path)
    with pytest.raises(ValueError, match=r"different sizes \(row 1: \(32, 32\), row 2: \(32, 48\)\)"):
        collate([ds[0], ds[1]])
    assert size_buckets(ds) == {(32, 32): [0, 2, 4], (32, 48): [1, 3]}
    sampler = BucketBatchSampler(ds, batch_size=2, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 and sorted(i for b in batches for i in b) == list(range(5))
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    for batch in loader:
        assert batch["x"].shape[0] == len(batch["row"])
    assert len(BucketBatchSampler(ds, batch_size=2, drop_last=True)) == 2
